//! Connection behaviour over both transports: handshake, refusals, timeouts,
//! close, priorities, bad input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::*;
use meshwork_transport::{CloseReason, Direction, Priority, TransportError};
use meshwork_wire::Message;
use meshwork_wire::proto::{Concern, ConcernKind, DisconnectReason, PeerCount, Ping};
use tokio::io::AsyncWriteExt;

on_both_transports!(
    connect_exchange_and_identify,
    refuses_other_network,
    a_gate_declines_a_peer_within_the_handshake,
    advertised_addresses_replace_the_listeners_in_the_hello,
    refuses_other_version,
    refuses_connection_to_self,
    refuses_mismatched_required_metadata,
    refuses_first_message_other_than_hello,
    handshake_times_out_on_silent_peer,
    dial_times_out_on_silent_listener,
    graceful_close_delivers_queued_frames_then_disconnect,
    shutdown_says_goodbye_to_every_peer,
    dropping_a_connection_is_seen_as_eof,
    ping_measures_rtt_and_keepalive_keeps_idle_links,
    the_peer_count_set_goes_in_hellos_and_pongs,
    idle_timeout_closes_silent_peer,
    oversized_frames_are_refused_both_ways,
    garbage_after_handshake_is_a_protocol_error,
    pending_handshake_limit_sheds_excess_streams,
    recv_timeout_is_reported,
    a_slow_consumer_is_not_mistaken_for_a_silent_peer,
    idle_timeout_fires_while_streaming_to_a_silent_peer,
    oversized_local_hello_is_a_local_error,
    a_send_given_up_while_waiting_for_room_leaves_no_trace,
    large_messages_to_a_slow_reader_are_bounded_in_bytes,
    an_offer_to_a_full_lane_gives_the_message_back,
    concurrent_senders_keep_their_order_through_direct_writes_and_full_lanes,
    an_eager_send_writes_at_once_on_a_quiet_connection_and_never_overtakes,
);

fn concern(n: u64, payload: &'static [u8]) -> Message {
    common::concern_frame(n, payload)
}

async fn connect_exchange_and_identify(net: Net) {
    let (server, addr) = net
        .listening("server", config().with_metadata("role", "seed"))
        .await;
    let client = net.dialer("client", config().with_metadata("role", "leaf"));
    let to_server = client.connect(&addr).await.unwrap();
    let mut to_client = server.accept().await.unwrap();

    assert_eq!(to_server.node_id(), server.node_id());
    assert_eq!(to_client.node_id(), client.node_id());
    assert_eq!(to_server.info().direction, Direction::Outbound);
    assert_eq!(to_client.info().direction, Direction::Inbound);
    assert_eq!(to_server.info().hello.metadata["role"], "seed");
    assert_eq!(to_client.info().hello.metadata["role"], "leaf");
    assert_eq!(
        to_server.info().hello.listen_addrs,
        vec![addr.to_string()],
        "the server advertises where it listens"
    );

    for n in 0..100 {
        to_server
            .send(concern(n, b"ping-pong"), Priority::Normal)
            .await
            .unwrap();
    }
    for n in 0..100 {
        assert_eq!(to_client.recv().await.unwrap(), concern(n, b"ping-pong"));
    }
    to_client
        .send(concern(7, b"back"), Priority::Control)
        .await
        .unwrap();
    let mut to_server = to_server;
    assert_eq!(to_server.recv().await.unwrap(), concern(7, b"back"));
    assert_eq!(server.connections().len(), 1);
    assert_eq!(client.connections().len(), 1);
    assert_eq!(server.stats().handshakes_ok, 1);

    client.shutdown().await;
    server.shutdown().await;
}

async fn refuses_other_network(net: Net) {
    let (server, addr) = net.listening("server", config()).await;
    let stranger = net.dialer("stranger", meshwork_transport::Config::new("other-net"));
    let err = stranger.connect(&addr).await.unwrap_err();
    match &err {
        TransportError::Refused {
            reason, message, ..
        } => {
            assert_eq!(*reason, DisconnectReason::WrongNetwork);
            // Addressed to the refused node, whose log it ends up in.
            assert_eq!(
                message,
                "you are on network \"other-net\", we are on \"test-net\""
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The server refused too, and keeps serving good peers.
    let friend = net.dialer("friend", config());
    let _conn = friend.connect(&addr).await.unwrap();
    let accepted = server.accept().await.unwrap();
    assert_eq!(accepted.node_id(), friend.node_id());
    eventually("the stranger is counted", || {
        server.stats().handshakes_failed == 1
    })
    .await;
    friend.shutdown().await;
    server.shutdown().await;
}

/// Declines every peer but `admitted`, as a full node would, naming one
/// alternative; remembers the listen addresses of the Hellos it saw.
struct OnlyOne {
    admitted: meshwork_wire::NodeId,
    seen: std::sync::Mutex<Vec<Vec<String>>>,
}

impl meshwork_transport::Gate for OnlyOne {
    fn admit(
        &self,
        peer: &meshwork_wire::NodeId,
        hello: &meshwork_wire::proto::Hello,
    ) -> Result<(), meshwork_wire::proto::Disconnect> {
        self.seen.lock().unwrap().push(hello.listen_addrs.clone());
        if *peer == self.admitted {
            return Ok(());
        }
        let mut d = meshwork_wire::proto::Disconnect::new(
            DisconnectReason::TooManyPeers,
            "full".to_string(),
        );
        d.alternatives = vec![meshwork_wire::proto::PeerInfo {
            node_id: self.admitted.as_bytes().clone(),
            addrs: vec!["mem://elsewhere".to_string()],
            age_ms: None,
        }];
        Err(d)
    }
}

/// The application's gate refuses a dialler before the handshake ends: the
/// dialler's `connect` fails with the gate's reason and alternatives, the
/// server never hands that connection to `accept`, and counts it as
/// declined. A peer the gate admits connects as usual.
async fn a_gate_declines_a_peer_within_the_handshake(net: Net) {
    let (server, addr) = net.listening("server", config()).await;
    let welcome = net.dialer("welcome", config());
    let gate = std::sync::Arc::new(OnlyOne {
        admitted: welcome.node_id().clone(),
        seen: Default::default(),
    });
    assert!(server.set_gate(gate.clone()));
    assert!(!server.set_gate(gate.clone()), "one gate per endpoint");

    let turned_away = net.dialer("turned-away", config());
    match turned_away.connect(&addr).await.unwrap_err() {
        TransportError::Refused {
            reason,
            message,
            alternatives,
        } => {
            assert_eq!(reason, DisconnectReason::TooManyPeers);
            assert_eq!(message, "full");
            assert_eq!(alternatives.len(), 1);
            assert_eq!(&alternatives[0].node_id, welcome.node_id().as_bytes());
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let _conn = welcome.connect(&addr).await.unwrap();
    let accepted = server.accept().await.unwrap();
    assert_eq!(accepted.node_id(), welcome.node_id());
    let stats = server.stats();
    assert_eq!(stats.failures.get("declined"), Some(&1), "{stats:?}");
    assert_eq!(stats.handshakes_ok, 1, "{stats:?}");
    assert_eq!(gate.seen.lock().unwrap().len(), 2, "one call per dialler");
    welcome.shutdown().await;
    turned_away.shutdown().await;
    server.shutdown().await;
}

/// A node told what to advertise (listening on 0.0.0.0, behind a port
/// forward) gives peers that instead of its listener's address.
async fn advertised_addresses_replace_the_listeners_in_the_hello(net: Net) {
    let public: meshwork_transport::Address = "tcp://127.0.0.9:7000".parse().unwrap();
    let (server, addr) = net
        .listening("server", config().with_advertised_addr(public.clone()))
        .await;
    assert_eq!(server.listen_addrs(), vec![public.clone()]);
    assert_eq!(
        server.bound_addrs(),
        vec![addr.clone()],
        "what it is bound to"
    );
    let client = net.dialer("client", config());
    let to_server = client.connect(&addr).await.unwrap();
    assert_eq!(
        to_server.info().hello.listen_addrs,
        vec![public.to_string()]
    );
    client.shutdown().await;
    server.shutdown().await;
}

async fn refuses_other_version(net: Net) {
    let (server, addr) = net.listening("server", plain()).await;
    let mut raw = net.raw_plain("old", &addr).await;
    let future = config();
    write_msg(&mut raw, &hello_from(&future, 99, "test-net")).await;
    let seen = read_to_end(&mut raw).await;
    // The responder checks our Hello before sending its own.
    match &seen[0] {
        Message::Disconnect(d) => {
            assert_eq!(
                d.reason_or_unspecified(),
                DisconnectReason::IncompatibleVersion
            );
            assert!(d.message.contains("99"), "{}", d.message);
        }
        other => panic!("expected a Disconnect, got {other:?}"),
    }
    assert_eq!(seen.len(), 1, "the server closes after refusing");
    server.shutdown().await;
}

async fn refuses_mismatched_required_metadata(net: Net) {
    let leasing = |on: &str| config().with_required_metadata("meshwork.sync.leasing", on);
    let (server, addr) = net.listening("server", leasing("on")).await;
    // Another value: the server refuses the client's Hello with a reason.
    let off = net.dialer("off", leasing("off"));
    match off.connect(&addr).await.unwrap_err() {
        TransportError::Refused {
            reason, message, ..
        } => {
            assert_eq!(reason, DisconnectReason::IncompatibleSettings);
            assert!(message.contains("meshwork.sync.leasing"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // No value at all (a node that does not require it): refused too, and
    // the dialer that requires it refuses a listener without it.
    let bare = net.dialer("bare", config());
    assert!(matches!(
        bare.connect(&addr).await.unwrap_err(),
        TransportError::Refused {
            reason: DisconnectReason::IncompatibleSettings,
            ..
        }
    ));
    let (plain_server, plain_addr) = net.listening("plain-server", config()).await;
    assert!(matches!(
        off.connect(&plain_addr).await.unwrap_err(),
        TransportError::IncompatibleSettings { ref key, theirs: None, .. } if key == "meshwork.sync.leasing"
    ));
    // The same value: connected, and the entry is visible in the Hello.
    let on = net.dialer("on", leasing("on"));
    let conn = on.connect(&addr).await.unwrap();
    assert_eq!(
        conn.info()
            .hello
            .metadata
            .get("meshwork.sync.leasing")
            .map(String::as_str),
        Some("on")
    );
    for e in [server, plain_server, off, bare, on] {
        e.shutdown().await;
    }
}

async fn refuses_connection_to_self(net: Net) {
    let (server, addr) = net.listening("server", config()).await;
    let err = server.connect(&addr).await.unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::SelfConnection
                | TransportError::Refused {
                    reason: DisconnectReason::SelfConnection,
                    ..
                }
        ),
        "{err:?}"
    );
    assert!(server.connections().is_empty());
    server.shutdown().await;
}

async fn refuses_first_message_other_than_hello(net: Net) {
    let (server, addr) = net.listening("server", plain()).await;
    let mut raw = net.raw_plain("rude", &addr).await;
    write_msg(
        &mut raw,
        &Message::Ping(Ping {
            nonce: 1,
            timestamp_micros: 0,
        }),
    )
    .await;
    let seen = read_to_end(&mut raw).await;
    match seen.last() {
        Some(Message::Disconnect(d)) => {
            assert_eq!(d.reason_or_unspecified(), DisconnectReason::ProtocolError)
        }
        other => panic!("expected a Disconnect, got {other:?}"),
    }
    server.shutdown().await;
}

async fn handshake_times_out_on_silent_peer(net: Net) {
    let cfg = config().with_handshake_timeout(Duration::from_millis(200));
    let (server, addr) = net.listening("server", cfg).await;
    let mut raw = net.raw("silent", &addr).await;
    let started = tokio::time::Instant::now();
    let seen = read_raw_to_end(&mut raw).await;
    let waited = started.elapsed();
    assert_eq!(
        &seen[..6],
        b"mshwrk",
        "only the server's preamble: {seen:?}"
    );
    assert_eq!(seen.len(), 8);
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // The stream closes as the failed handshake is dropped, a moment before
    // the failure is counted.
    eventually("the failure is counted", || {
        server.stats().handshakes_failed == 1
    })
    .await;
    server.shutdown().await;
}

async fn dial_times_out_on_silent_listener(net: Net) {
    // A listener that accepts streams and never answers.
    let transport = net.transport("mute");
    let mut listener = transport.listen(&net.listen_addr("mute")).await.unwrap();
    let addr = listener.local_addr();
    let keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let client = net.dialer(
        "client",
        config().with_handshake_timeout(Duration::from_millis(200)),
    );
    let err = client.connect(&addr).await.unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Timeout {
                what: "handshake",
                ..
            }
        ),
        "{err:?}"
    );
    keep.abort();
    client.shutdown().await;
}

async fn graceful_close_delivers_queued_frames_then_disconnect(net: Net) {
    let (server, addr) = net.listening("server", config()).await;
    let client = net.dialer("client", config());
    let conn = client.connect(&addr).await.unwrap();
    let mut incoming = server.accept().await.unwrap();

    for n in 0..200 {
        conn.send(concern(n, b"queued"), Priority::Bulk)
            .await
            .unwrap();
    }
    conn.close(DisconnectReason::Other, "done here").await;
    assert!(matches!(
        conn.send(concern(0, b"late"), Priority::Normal).await,
        Err(TransportError::NotConnected)
    ));

    for n in 0..200 {
        assert_eq!(incoming.recv().await.unwrap(), concern(n, b"queued"));
    }
    match incoming.recv().await.unwrap() {
        Message::Disconnect(d) => {
            assert_eq!(d.reason_or_unspecified(), DisconnectReason::Other);
            assert_eq!(d.message, "done here");
        }
        other => panic!("expected Disconnect, got {other:?}"),
    }
    assert!(matches!(
        incoming.recv().await,
        Err(TransportError::NotConnected)
    ));
    incoming.closed().await;
    assert_eq!(
        incoming.close_reason(),
        Some(CloseReason::Remote {
            reason: DisconnectReason::Other,
            message: "done here".into()
        })
    );
    assert!(matches!(
        conn.close_reason(),
        Some(CloseReason::Local {
            reason: DisconnectReason::Other,
            ..
        })
    ));
    client.shutdown().await;
    server.shutdown().await;
}

async fn shutdown_says_goodbye_to_every_peer(net: Net) {
    let (server, addr) = net.listening("server", config()).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let ep = net.dialer(&format!("c{i}"), config());
        let conn = ep.connect(&addr).await.unwrap();
        clients.push((ep, conn));
    }
    for _ in 0..3 {
        let _ = server.accept().await.unwrap();
    }
    // Accepted connections were dropped above, which aborts them; connect
    // three fresh ones that stay alive.
    let mut live = Vec::new();
    for i in 0..3 {
        let ep = net.dialer(&format!("d{i}"), config());
        let conn = ep.connect(&addr).await.unwrap();
        live.push((ep, conn));
    }
    let mut kept = Vec::new();
    for _ in 0..3 {
        kept.push(server.accept().await.unwrap());
    }
    server.shutdown().await;
    assert!(server.connections().is_empty());
    assert!(server.accept().await.is_none());
    for (_, conn) in live.iter_mut() {
        match conn.recv().await {
            Ok(Message::Disconnect(d)) => {
                assert_eq!(d.reason_or_unspecified(), DisconnectReason::Shutdown)
            }
            other => panic!("expected Disconnect(shutdown), got {other:?}"),
        }
    }
    assert!(matches!(
        live[0].0.connect(&addr).await,
        Err(TransportError::Io(_))
    ));
    for (ep, _) in clients.into_iter().chain(live) {
        ep.shutdown().await;
    }
}

async fn dropping_a_connection_is_seen_as_eof(net: Net) {
    let (server, addr) = net.listening("server", config()).await;
    let client = net.dialer("client", config());
    let conn = client.connect(&addr).await.unwrap();
    let mut incoming = server.accept().await.unwrap();
    let handle = conn.handle();
    drop(conn);
    handle.closed().await;
    assert_eq!(handle.close_reason(), Some(CloseReason::Dropped));
    assert!(matches!(
        incoming.recv().await,
        Err(TransportError::NotConnected)
    ));
    incoming.closed().await;
    assert!(
        matches!(
            incoming.close_reason(),
            Some(CloseReason::Eof | CloseReason::Io(_))
        ),
        "{:?}",
        incoming.close_reason()
    );
    client.shutdown().await;
    server.shutdown().await;
}

async fn ping_measures_rtt_and_keepalive_keeps_idle_links(net: Net) {
    let fast = || {
        config().with_keepalive(
            Some(Duration::from_millis(50)),
            Some(Duration::from_millis(300)),
        )
    };
    let (server, addr) = net.listening("server", fast()).await;
    let client = net.dialer("client", fast());
    let conn = client.connect(&addr).await.unwrap();
    let incoming = server.accept().await.unwrap();

    let rtt = conn.ping(Duration::from_secs(2)).await.unwrap();
    assert!(rtt < Duration::from_secs(2));
    assert_eq!(conn.stats().last_rtt, Some(rtt));

    // Three idle timeouts pass without application traffic: keepalive pings
    // keep both sides open, and measure RTT on the accepting side too.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(!conn.is_closed() && !incoming.is_closed());
    assert!(incoming.stats().last_rtt.is_some());
    assert!(incoming.stats().frames_received >= 3);
    client.shutdown().await;
    server.shutdown().await;
}

/// What `Endpoint::set_peer_count` was last given goes in the Hello of
/// every handshake and in every Pong (protocol.md 4.2, 4.3); an endpoint
/// given none sends none.
async fn the_peer_count_set_goes_in_hellos_and_pongs(net: Net) {
    let count = |linked, min_peers| Some(PeerCount { linked, min_peers });
    let (server, addr) = net.listening("server", config()).await;
    let client = net.dialer("client", config());
    server.set_peer_count(count(3, 2));
    let conn = client.connect(&addr).await.unwrap();
    let incoming = server.accept().await.unwrap();
    assert_eq!(conn.info().hello.peer_count, count(3, 2));
    assert_eq!(incoming.info().hello.peer_count, None);
    let (_, said) = conn.ping_for_count(Duration::from_secs(2)).await.unwrap();
    assert_eq!(said, count(3, 2));
    // A change goes in the next Pong, on connections already open.
    server.set_peer_count(count(4, 2));
    assert_eq!(server.peer_count(), count(4, 2));
    let (_, said) = conn.ping_for_count(Duration::from_secs(2)).await.unwrap();
    assert_eq!(said, count(4, 2));
    let incoming = incoming.handle();
    let (_, said) = incoming
        .ping_for_count(Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(said, None);
    client.shutdown().await;
    server.shutdown().await;
}

async fn idle_timeout_closes_silent_peer(net: Net) {
    let cfg = plain().with_keepalive(None, Some(Duration::from_millis(300)));
    let (server, addr) = net.listening("server", cfg).await;
    // A peer that completes the handshake, then never says anything again.
    let mut raw = net.raw_plain("zombie", &addr).await;
    let me = config();
    write_msg(&mut raw, &current_hello(&me)).await;
    let started = tokio::time::Instant::now();
    let seen = read_to_end(&mut raw).await;
    assert!(matches!(seen[0], Message::Hello(_)));
    match seen.last() {
        Some(Message::Disconnect(d)) => {
            assert_eq!(d.reason_or_unspecified(), DisconnectReason::Timeout)
        }
        other => panic!("expected Disconnect(timeout), got {other:?}"),
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // Closing our side lets the server's graceful close finish at once.
    drop(raw);
    let conn = server.accept().await.unwrap();
    conn.closed().await;
    assert_eq!(conn.close_reason(), Some(CloseReason::IdleTimeout));
    server.shutdown().await;
}

async fn oversized_frames_are_refused_both_ways(net: Net) {
    let small = || plain().with_max_frame_len(1024);
    let (server, addr) = net.listening("server", small()).await;
    let client = net.dialer("client", small());
    let conn = client.connect(&addr).await.unwrap();
    let mut incoming = server.accept().await.unwrap();
    let big = Message::Concern(Concern {
        command: 1,
        kind: ConcernKind::Request as i32,
        payload: vec![0u8; 2048].into(),
        ..Default::default()
    });
    assert!(matches!(
        conn.send(big, Priority::Bulk).await,
        Err(TransportError::Wire(
            meshwork_wire::WireError::FrameTooLarge { .. }
        ))
    ));
    // The connection is still fine.
    conn.send(concern(1, b"ok"), Priority::Normal)
        .await
        .unwrap();
    assert_eq!(incoming.recv().await.unwrap(), concern(1, b"ok"));

    // A raw peer announcing a 1 GiB frame is cut off with a protocol error.
    let mut raw = net.raw_plain("liar", &addr).await;
    write_msg(&mut raw, &current_hello(&config())).await;
    raw.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
    let seen = read_to_end(&mut raw).await;
    match seen.last() {
        Some(Message::Disconnect(d)) => {
            assert_eq!(d.reason_or_unspecified(), DisconnectReason::ProtocolError);
            assert!(d.message.contains("exceeds"), "{}", d.message);
        }
        other => panic!("expected Disconnect(protocol error), got {other:?}"),
    }
    client.shutdown().await;
    server.shutdown().await;
}

async fn garbage_after_handshake_is_a_protocol_error(net: Net) {
    let (server, addr) = net.listening("server", plain()).await;
    let mut raw = net.raw_plain("noisy", &addr).await;
    write_msg(&mut raw, &current_hello(&config())).await;
    raw.write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let seen = read_to_end(&mut raw).await;
    match seen.last() {
        Some(Message::Disconnect(d)) => {
            assert_eq!(d.reason_or_unspecified(), DisconnectReason::ProtocolError)
        }
        other => panic!("expected Disconnect(protocol error), got {other:?}"),
    }
    let conn = server.accept().await.unwrap();
    conn.closed().await;
    assert!(matches!(
        conn.close_reason(),
        Some(CloseReason::Protocol(_))
    ));

    // Still serving good peers.
    let good = net.dialer("good", plain());
    let _c = good.connect(&addr).await.unwrap();
    good.shutdown().await;
    server.shutdown().await;
}

async fn pending_handshake_limit_sheds_excess_streams(net: Net) {
    let cfg = config()
        .with_max_pending_handshakes(2)
        .with_handshake_timeout(Duration::from_millis(300));
    let (server, addr) = net.listening("server", cfg).await;
    let mut silent = Vec::new();
    for i in 0..6 {
        silent.push(net.raw(&format!("s{i}"), &addr).await);
    }
    // Two are in the handshake; the other four were closed at once (over
    // TCP, one host) or evicted an older one (in memory, six hosts).
    eventually("four streams shed", || {
        let st = server.stats();
        st.rejected_busy + st.evicted_handshakes == 4
    })
    .await;
    // Once the silent ones time out, a good peer gets in.
    let good = net.dialer("good", config());
    let mut conn = None;
    for _ in 0..50 {
        match good.connect(&addr).await {
            Ok(c) => {
                conn = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(conn.is_some(), "good peer never got in");
    drop(silent);
    good.shutdown().await;
    server.shutdown().await;
}

async fn recv_timeout_is_reported(net: Net) {
    let (server, addr) = net.listening("server", config()).await;
    let client = net.dialer("client", config());
    let mut conn = client.connect(&addr).await.unwrap();
    let _incoming = server.accept().await.unwrap();
    assert!(matches!(
        conn.recv_timeout(Duration::from_millis(50)).await,
        Err(TransportError::Timeout { what: "recv", .. })
    ));
    client.shutdown().await;
    server.shutdown().await;
}

async fn a_slow_consumer_is_not_mistaken_for_a_silent_peer(net: Net) {
    let cfg = || {
        config().with_inbound_capacity(1).with_keepalive(
            Some(Duration::from_millis(50)),
            Some(Duration::from_millis(300)),
        )
    };
    let (server, addr) = net.listening("server", cfg()).await;
    let client = net.dialer("client", cfg());
    let conn = client.connect(&addr).await.unwrap();
    let mut incoming = server.accept().await.unwrap();
    for n in 0..100 {
        conn.send(concern(n, b"burst"), Priority::Normal)
            .await
            .unwrap();
    }
    // The server's consumer sleeps through three idle timeouts while its
    // reader is blocked on the full inbound queue.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for n in 0..100 {
        assert_eq!(incoming.recv().await.unwrap(), concern(n, b"burst"));
    }
    assert!(!incoming.is_closed(), "{:?}", incoming.close_reason());
    client.shutdown().await;
    server.shutdown().await;
}

async fn idle_timeout_fires_while_streaming_to_a_silent_peer(net: Net) {
    use tokio::io::AsyncReadExt;
    let cfg = plain().with_keepalive(None, Some(Duration::from_millis(300)));
    let (server, addr) = net.listening("server", cfg).await;
    let mut raw = net.raw_plain("sink", &addr).await;
    write_msg(&mut raw, &current_hello(&config())).await;
    // The sink reads everything and never says a word.
    let sink = tokio::spawn(async move {
        let mut chunk = vec![0u8; 64 * 1024];
        while let Ok(n) = raw.read(&mut chunk).await {
            if n == 0 {
                break;
            }
        }
    });
    let conn = server.accept().await.unwrap();
    let streamer = {
        let h = conn.handle();
        tokio::spawn(async move {
            let mut n = 0;
            while h.send(concern(n, b"stream"), Priority::Bulk).await.is_ok() {
                n += 1;
            }
        })
    };
    tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("idle timeout never fired while streaming");
    assert_eq!(conn.close_reason(), Some(CloseReason::IdleTimeout));
    streamer.await.unwrap();
    sink.await.unwrap();
    server.shutdown().await;
}

/// A client connected to a server whose reader stops at a full inbound
/// queue of 1 (while nobody reads it): the stream fills up, the client's
/// writer blocks, and its one-slot normal lane fills. Server, client, the
/// client's connection and the server's end.
async fn clogging_pair(
    net: &Net,
) -> (
    meshwork_transport::Endpoint,
    meshwork_transport::Endpoint,
    meshwork_transport::Connection,
    meshwork_transport::Connection,
) {
    let server_cfg = config().with_inbound_capacity(1).with_keepalive(None, None);
    let client_cfg = config()
        .with_lane_capacity(4, 1, 4)
        .with_keepalive(None, None);
    let (server, addr) = net.listening("server", server_cfg).await;
    let client = net.dialer("client", client_cfg);
    let conn = client.connect(&addr).await.unwrap();
    let incoming = server.accept().await.unwrap();
    (server, client, conn, incoming)
}

/// A send that waits for room on a full lane and is dropped by its caller
/// is not sent and leaves nothing counted: once the peer has read the rest,
/// nothing is queued.
async fn a_send_given_up_while_waiting_for_room_leaves_no_trace(net: Net) {
    let (server, client, conn, mut incoming) = clogging_pair(&net).await;
    const KIB: &[u8] = &[7; 1024];
    let mut sent = 0;
    loop {
        let send = conn.send(concern(sent, KIB), Priority::Normal);
        match tokio::time::timeout(Duration::from_millis(100), send).await {
            Ok(r) => r.unwrap(),
            // It waited for room and is given up: dropped.
            Err(_) => break,
        }
        sent += 1;
        assert!(sent < 50_000, "the lane never filled");
    }
    for n in 0..sent {
        assert_eq!(incoming.recv().await.unwrap(), concern(n, KIB));
    }
    eventually("nothing is left queued", || conn.stats().queued == 0).await;
    let more = incoming.recv_timeout(Duration::from_millis(100)).await;
    assert!(more.is_err(), "the given-up message was sent: {more:?}");
    client.shutdown().await;
    server.shutdown().await;
}

/// Large messages to a peer that stops reading fill the queued-bytes budget,
/// not the lanes (1024 messages of 64 KiB would be 64 MiB): past it
/// `try_send` is refused and `send` waits, while small messages still go;
/// once the peer reads, everything arrives in order and the budget empties.
async fn large_messages_to_a_slow_reader_are_bounded_in_bytes(net: Net) {
    const BUDGET: usize = 512 * 1024;
    let big = || bytes::Bytes::from(vec![9u8; 64 * 1024]);
    let server_cfg = config().with_inbound_capacity(1).with_keepalive(None, None);
    let client_cfg = config()
        .with_max_queued_bytes(BUDGET)
        .with_send_timeout(Duration::from_millis(200))
        .with_keepalive(None, None);
    let (server, addr) = net.listening("server", server_cfg).await;
    let client = net.dialer("client", client_cfg);
    let conn = client.connect(&addr).await.unwrap();
    let mut incoming = server.accept().await.unwrap();
    // The server reads nothing: the stream and then the budget fill up.
    let mut sent = 0u64;
    let refused = loop {
        match conn.try_send(concern_frame(sent, big()), Priority::Normal) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 1000, "never refused: {:?}", conn.stats());
        assert!(conn.stats().queued_bytes <= BUDGET, "{:?}", conn.stats());
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    assert!(matches!(refused, TransportError::QueueFull(_)), "{refused}");
    let stats = conn.stats();
    assert!(stats.queued_bytes > BUDGET - 64 * 1024, "{stats:?}");
    assert!(
        stats.queued < 1024 / 2,
        "the lane is far from full: {stats:?}"
    );
    // `send` waits for room in the budget, up to the send timeout.
    let waited = conn
        .send(concern_frame(sent, big()), Priority::Normal)
        .await;
    assert!(
        matches!(waited, Err(TransportError::Timeout { .. })),
        "{waited:?}"
    );
    // A small message still goes.
    conn.try_send(concern_frame(sent, &b"small"[..]), Priority::Normal)
        .unwrap();
    // The peer reads: all arrive, in order, and the budget empties.
    let late = {
        let h = conn.handle();
        tokio::spawn(async move {
            h.send(concern_frame(sent + 1, big()), Priority::Normal)
                .await
        })
    };
    for n in 0..sent {
        assert_eq!(incoming.recv().await.unwrap(), concern_frame(n, big()));
    }
    assert_eq!(
        incoming.recv().await.unwrap(),
        concern_frame(sent, &b"small"[..])
    );
    assert_eq!(
        incoming.recv().await.unwrap(),
        concern_frame(sent + 1, big())
    );
    late.await.unwrap().unwrap();
    eventually("the budget to empty", || conn.stats().queued_bytes == 0).await;
    client.shutdown().await;
    server.shutdown().await;
}

/// `offer` takes messages while there is room and gives one back, queueing
/// nothing, when its lane is full; the caller can then `send` it, in order.
async fn an_offer_to_a_full_lane_gives_the_message_back(net: Net) {
    let (server, client, conn, mut incoming) = clogging_pair(&net).await;
    const KIB: &[u8] = &[7; 1024];
    let mut sent = 0;
    let back = loop {
        match conn.offer(concern(sent, KIB), Priority::Normal, None) {
            Ok(None) => sent += 1,
            Ok(Some(msg)) => break msg,
            Err(e) => panic!("offer failed: {e}"),
        }
        assert!(sent < 50_000, "the lane never filled");
        // Let the writer take what it can before the next offer.
        tokio::task::yield_now().await;
    };
    assert_eq!(back, concern(sent, KIB), "not the message offered");
    // Given back, then sent by the caller: it comes after all the others.
    let send = {
        let h = conn.handle();
        tokio::spawn(async move { h.send(back, Priority::Normal).await })
    };
    for n in 0..=sent {
        assert_eq!(incoming.recv().await.unwrap(), concern(n, KIB));
    }
    send.await.unwrap().unwrap();
    let more = incoming.recv_timeout(Duration::from_millis(100)).await;
    assert!(more.is_err(), "a message arrived twice: {more:?}");
    client.shutdown().await;
    server.shutdown().await;
}

/// A send on a quiet connection goes straight into the write half (no
/// lane); once a lane holds anything, sends queue behind it. Several tasks
/// sending at once, with the lane filling and draining as the peer reads in
/// spurts, each see their frames arrive in the order they sent them.
async fn concurrent_senders_keep_their_order_through_direct_writes_and_full_lanes(net: Net) {
    let quiet = || config().with_keepalive(None, None);
    let (server, addr) = net
        .listening("server", quiet().with_inbound_capacity(4))
        .await;
    let client = net.dialer("client", quiet().with_lane_capacity(4, 2, 4));
    let conn = client.connect(&addr).await.unwrap();
    let mut incoming = server.accept().await.unwrap();
    eventually("the handshake's frames are out", || {
        conn.stats().queued == 0
    })
    .await;
    // Quiet: taken at once, nothing left on a lane.
    let before = conn.stats().frames_sent;
    conn.send(concern(0, b"x"), Priority::Normal).await.unwrap();
    assert_eq!(conn.stats().frames_sent, before + 1, "not written directly");
    assert_eq!(conn.stats().queued, 0);
    assert_eq!(incoming.recv().await.unwrap(), concern(0, b"x"));

    const SENDERS: u64 = 4;
    const EACH: u64 = 2_000;
    const KIB: &[u8] = &[1; 1024];
    let senders: Vec<_> = (0..SENDERS)
        .map(|t| {
            let h = conn.handle();
            tokio::spawn(async move {
                for n in 0..EACH {
                    h.send(concern(t << 32 | n, KIB), Priority::Normal)
                        .await
                        .unwrap();
                    if n % 7 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    let mut next = [0u64; SENDERS as usize];
    for i in 0..SENDERS * EACH {
        let Message::Concern(c) = incoming.recv().await.unwrap() else {
            panic!("not a concern frame");
        };
        let (t, n) = ((c.request_id >> 32) as usize, c.request_id & 0xffff_ffff);
        assert_eq!(n, next[t], "sender {t} out of order");
        next[t] += 1;
        // Read in spurts, so the stream and the lanes fill up now and then.
        if i % 500 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    for s in senders {
        s.await.unwrap();
    }
    client.shutdown().await;
    server.shutdown().await;
}

/// `send_eager` on a quiet connection is written by the caller before it
/// returns (no hop to the writer task); behind queued frames it takes its
/// turn like `send`.
async fn an_eager_send_writes_at_once_on_a_quiet_connection_and_never_overtakes(net: Net) {
    let quiet = || config().with_keepalive(None, None);
    let (server, addr) = net.listening("server", quiet()).await;
    let client = net.dialer("client", quiet());
    let conn = client.connect(&addr).await.unwrap();
    let mut incoming = server.accept().await.unwrap();
    eventually("the handshake's frames are out", || {
        conn.stats().queued == 0
    })
    .await;

    for n in 0..3u64 {
        let before = conn.stats().frames_sent;
        conn.send_eager(concern(n, b"lone"), Priority::Normal)
            .await
            .unwrap();
        assert_eq!(
            conn.stats().frames_sent,
            before + 1,
            "frame {n} not written at once"
        );
        assert_eq!(incoming.recv().await.unwrap(), concern(n, b"lone"));
    }

    // Bursts of queued frames, each followed by an eager one: order holds.
    let mut next = 3u64;
    for _ in 0..20 {
        for _ in 0..50 {
            conn.send(concern(next, b"queued"), Priority::Normal)
                .await
                .unwrap();
            next += 1;
        }
        conn.send_eager(concern(next, b"queued"), Priority::Normal)
            .await
            .unwrap();
        next += 1;
    }
    for n in 3..next {
        assert_eq!(incoming.recv().await.unwrap(), concern(n, b"queued"));
    }
    client.shutdown().await;
    server.shutdown().await;
}

async fn oversized_local_hello_is_a_local_error(net: Net) {
    let (server, addr) = net.listening("server", config()).await;
    let long = meshwork_transport::Config::new("n".repeat(500));
    let client = net.dialer("client", long);
    let err = client.connect(&addr).await.unwrap_err();
    assert!(
        matches!(
            &err,
            TransportError::Wire(meshwork_wire::WireError::Invalid {
                field: "hello.network_id",
                ..
            })
        ),
        "{err:?}"
    );
    client.shutdown().await;
    server.shutdown().await;
}

/// In memory only, where socket buffers are small and known: a control frame
/// sent after a pile of bulk frames overtakes everything still queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_frames_overtake_queued_bulk_frames() {
    let net = Net::mem();
    // The receiver buffers one frame, so the backlog stays on the sender.
    let (server, addr) = net
        .listening("server", config().with_inbound_capacity(1))
        .await;
    let client = net.dialer("client", config());
    let conn = client.connect(&addr).await.unwrap();
    let mut incoming = server.accept().await.unwrap();

    static CHUNK: [u8; 64 * 1024] = [7u8; 64 * 1024];
    for n in 0..64 {
        conn.send(concern(n, &CHUNK), Priority::Bulk).await.unwrap();
    }
    conn.send(concern(9999, b"urgent"), Priority::Control)
        .await
        .unwrap();
    let mut position = None;
    for i in 0..65 {
        if let Message::Concern(c) = incoming.recv().await.unwrap() {
            if c.request_id == 9999 {
                position = Some(i);
            }
        }
    }
    let position = position.expect("control frame delivered");
    assert!(
        position < 16,
        "control frame arrived after {position} bulk frames"
    );
    client.shutdown().await;
    server.shutdown().await;
}

/// Bytes split across reads in every way still decode: a peer writing one
/// byte at a time is served like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_at_a_time_peer_is_served() {
    let net = Net::Tcp;
    let (server, addr) = net.listening("server", plain()).await;
    let mut raw = net.raw("slow", &addr).await;
    for b in PLAIN_PREAMBLE.iter() {
        raw.write_all(&[*b]).await.unwrap();
        raw.flush().await.unwrap();
    }
    let mut preamble = [0u8; 8];
    tokio::io::AsyncReadExt::read_exact(&mut raw, &mut preamble)
        .await
        .unwrap();
    let frame = meshwork_wire::encode_frame(&current_hello(&config()), 1 << 20).unwrap();
    for b in frame.iter() {
        raw.write_all(&[*b]).await.unwrap();
        raw.flush().await.unwrap();
    }
    let mut buf = BytesMut::new();
    assert!(matches!(
        read_msg(&mut raw, &mut buf).await,
        Some(Message::Hello(_))
    ));
    let conn = server.accept().await.unwrap();
    assert!(!conn.is_closed());
    drop(raw);
    conn.closed().await;
    assert_eq!(conn.close_reason(), Some(CloseReason::Eof));
    server.shutdown().await;
}

/// A peer that never stops sending, and ignores our Disconnect, cannot keep
/// a shutting-down endpoint alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_peer_does_not_delay_shutdown() {
    let net = Net::Tcp;
    let cfg = plain().with_close_timeout(Duration::from_millis(300));
    let (server, addr) = net.listening("server", cfg).await;
    let mut raw = net.raw_plain("firehose", &addr).await;
    write_msg(&mut raw, &current_hello(&config())).await;
    let frame = meshwork_wire::encode_frame(&concern(1, b"more"), 1 << 20).unwrap();
    let burst: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * 256)
        .collect();
    let firehose = tokio::spawn(async move { while raw.write_all(&burst).await.is_ok() {} });
    let mut incoming = server.accept().await.unwrap();
    let drain = tokio::spawn(async move { while incoming.recv().await.is_ok() {} });
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::time::timeout(Duration::from_secs(5), server.shutdown())
        .await
        .expect("shutdown finished while the peer kept streaming");
    firehose.abort();
    drain.abort();
}
