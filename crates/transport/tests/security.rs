//! The secure transport against honest and hostile peers, over both
//! transports: who gets in, who is refused, how fast, and that the node keeps
//! serving good peers afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use meshwork_transport::{Config, Identity, NetworkKey, Priority, Security, TransportError};
use meshwork_wire::Message;
use meshwork_wire::proto::{Concern, ConcernKind, DisconnectReason};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

on_both_transports!(
    matching_nodes_see_each_others_real_ids,
    another_network_key_is_refused,
    a_node_off_the_allow_list_is_refused_both_ways,
    random_bytes_are_dropped,
    a_stalled_handshake_is_closed_at_its_timeout,
    a_connection_flood_is_shed,
    plaintext_and_encrypted_nodes_refuse_each_other,
    frames_of_every_size_cross_the_encrypted_channel,
    a_banned_node_is_closed_and_refused_until_the_ban_expires,
    a_dial_by_id_refuses_any_other_node_at_the_address,
);

fn keyed(secret: &[u8]) -> Config {
    config().with_network_key(NetworkKey::from_secret(secret).unwrap())
}

const KEY_A: &[u8] = b"network key A, at least 16 bytes";
const KEY_B: &[u8] = b"network key B, at least 16 bytes";

/// A good peer can still connect and exchange a message.
async fn still_serves_good_peers(net: &Net, server: &meshwork_transport::Endpoint, cfg: Config) {
    let addr = server.listen_addrs()[0].clone();
    let good = net.dialer("good-peer", cfg);
    let conn = good.connect(&addr).await.expect("a good peer gets in");
    let msg = Message::Concern(Concern {
        command: 1,
        kind: ConcernKind::Request as i32,
        payload: "still here".into(),
        ..Default::default()
    });
    conn.send(msg, Priority::Normal).await.unwrap();
    let mut incoming = loop {
        let c = server.accept().await.unwrap();
        if c.node_id() == good.node_id() {
            break c;
        }
    };
    assert!(matches!(
        incoming.recv().await.unwrap(),
        Message::Concern(_)
    ));
    good.shutdown().await;
}

fn failures(server: &meshwork_transport::Endpoint, label: &str) -> u64 {
    server.stats().failures.get(label).copied().unwrap_or(0)
}

async fn matching_nodes_see_each_others_real_ids(net: Net) {
    let server_id = Identity::generate();
    let client_id = Identity::generate();
    let (server, addr) = net
        .listening("server", keyed(KEY_A).with_identity(server_id.clone()))
        .await;
    let client = net.dialer("client", keyed(KEY_A).with_identity(client_id.clone()));
    let conn = client.connect(&addr).await.unwrap();
    let incoming = server.accept().await.unwrap();
    assert_eq!(conn.node_id(), server_id.node_id());
    assert_eq!(incoming.node_id(), client_id.node_id());
    assert_eq!(
        conn.node_id().as_bytes().as_ref(),
        server_id.public_key(),
        "the node id is the authenticated public key"
    );
    assert_eq!(server.config().security(), Security::Noise, "the default");
    client.shutdown().await;
    server.shutdown().await;
}

async fn another_network_key_is_refused(net: Net) {
    let (server, addr) = net.listening("server", keyed(KEY_A)).await;
    for (host, cfg) in [("other-key", keyed(KEY_B)), ("no-key", config())] {
        let outsider = net.dialer(host, cfg);
        let started = tokio::time::Instant::now();
        let err = outsider.connect(&addr).await.unwrap_err();
        assert!(matches!(err, TransportError::Crypto(_)), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "refused quickly"
        );
        outsider.shutdown().await;
    }
    eventually("both refusals counted", || failures(&server, "crypto") == 2).await;
    assert!(server.connections().is_empty());
    still_serves_good_peers(&net, &server, keyed(KEY_A)).await;
    server.shutdown().await;
}

/// `connect_to`: the node answering must be the one asked for. Another node
/// at the address (one that took it over, or that only claims it) is
/// refused during the handshake and told so; nothing is adopted.
async fn a_dial_by_id_refuses_any_other_node_at_the_address(net: Net) {
    let server_key = Identity::generate();
    let (server, addr) = net
        .listening("server", config().with_identity(server_key.clone()))
        .await;
    let client = net.dialer("client", config());

    let expected = Identity::generate().node_id().clone();
    let err = client.connect_to(&addr, &expected).await.unwrap_err();
    match &err {
        TransportError::UnexpectedPeer { expected: e, found } => {
            assert_eq!((e, found), (&expected, server_key.node_id()));
        }
        other => panic!("not UnexpectedPeer: {other:?}"),
    }
    assert_eq!(err.label(), "unexpected_peer");
    eventually("the server was told it is not allowed", || {
        failures(&server, "refused_by_peer") == 1
    })
    .await;
    assert!(client.connections().is_empty());
    assert_eq!(client.stats().handshakes_ok, 0);

    let conn = client
        .connect_to(&addr, server_key.node_id())
        .await
        .unwrap();
    assert_eq!(conn.node_id(), server_key.node_id());
    client.shutdown().await;
    server.shutdown().await;
}

async fn a_node_off_the_allow_list_is_refused_both_ways(net: Net) {
    let friend = Identity::generate();
    let picky = || config().with_allowed_peers([friend.node_id().clone()]);
    let (server, addr) = net.listening("server", picky()).await;

    // A stranger dialling in is told why.
    let stranger = net.dialer("stranger", config());
    let err = stranger.connect(&addr).await.unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Refused {
                reason: DisconnectReason::NotAllowed,
                ..
            }
        ),
        "{err:?}"
    );
    eventually("refusal counted", || failures(&server, "not_allowed") == 1).await;

    // The picky node dialling a stranger refuses it too, before its Hello:
    // the stranger sees a refusal, never a connection.
    let (stranger_server, stranger_addr) = net.listening("stranger2", config()).await;
    let err = server.connect(&stranger_addr).await.unwrap_err();
    assert!(matches!(err, TransportError::NotAllowed(_)), "{err:?}");
    eventually("the stranger saw a refusal", || {
        stranger_server.stats().failures.get("refused_by_peer") == Some(&1)
    })
    .await;
    assert_eq!(stranger_server.stats().handshakes_ok, 0);

    still_serves_good_peers(&net, &server, config().with_identity(friend)).await;
    stranger.shutdown().await;
    stranger_server.shutdown().await;
    server.shutdown().await;
}

async fn random_bytes_are_dropped(net: Net) {
    let (server, addr) = net.listening("server", config()).await;
    let mut raw = net.raw("junk", &addr).await;
    let junk: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    let _ = raw.write_all(&junk).await;
    let seen = read_raw_to_end(&mut raw).await;
    // Only the server's preamble, then the stream is closed.
    assert_eq!(&seen[..6], b"mshwrk");
    eventually("counted as not meshwork", || {
        failures(&server, "not_meshwork") == 1
    })
    .await;

    // Right preamble, then garbage where the Noise handshake should be.
    let mut raw = net.raw("junk2", &addr).await;
    raw.write_all(b"mshwrk\x01\x01").await.unwrap();
    let _ = raw.write_all(&junk).await;
    read_raw_to_end(&mut raw).await;
    eventually("counted as a crypto failure", || {
        failures(&server, "crypto") == 1
    })
    .await;
    still_serves_good_peers(&net, &server, config()).await;
    server.shutdown().await;
}

async fn a_stalled_handshake_is_closed_at_its_timeout(net: Net) {
    let cfg = config().with_handshake_timeout(Duration::from_millis(300));
    let (server, addr) = net.listening("server", cfg).await;
    // Sends its preamble and half of Noise message 1, then nothing.
    let mut raw = net.raw("staller", &addr).await;
    raw.write_all(b"mshwrk\x01\x01\x00\x30\x01\x02\x03")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    read_raw_to_end(&mut raw).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    eventually("counted as a timeout", || failures(&server, "timeout") == 1).await;
    still_serves_good_peers(&net, &server, config()).await;
    server.shutdown().await;
}

async fn a_connection_flood_is_shed(net: Net) {
    let cfg = config()
        .with_max_pending_handshakes(8)
        .with_handshake_timeout(Duration::from_millis(500));
    let (server, addr) = net.listening("server", cfg).await;
    let mut flood = Vec::new();
    for i in 0..300 {
        // A full accept backlog may refuse some dials outright; fine.
        if let Ok((s, _)) = net.transport(&format!("flood{i}")).dial(&addr).await {
            flood.push(s);
        }
    }
    assert!(flood.len() >= 100, "only {} streams opened", flood.len());
    let opened = flood.len() as u64;
    // Shed: closed at once, or admitted by evicting an older one (each
    // in-memory dialler is a host of its own; over TCP all are 127.0.0.1).
    eventually("the excess was shed", || {
        let st = server.stats();
        st.rejected_busy + st.evicted_handshakes >= opened - 8
    })
    .await;
    // The eight in the handshake time out; then good peers get in again.
    eventually("pending handshakes timed out", || {
        failures(&server, "timeout") >= 8
    })
    .await;
    still_serves_good_peers(&net, &server, config()).await;
    drop(flood);
    server.shutdown().await;
}

async fn plaintext_and_encrypted_nodes_refuse_each_other(net: Net) {
    let (server, addr) = net.listening("server", config()).await;
    let plain_node = net.dialer("plain", plain());
    let err = plain_node.connect(&addr).await.unwrap_err();
    assert!(
        matches!(
            &err,
            TransportError::SecurityMismatch { ours: "plaintext", theirs } if theirs == "noise"
        ),
        "{err:?}"
    );
    eventually("server counted the mismatch", || {
        failures(&server, "security_mismatch") == 1
    })
    .await;
    plain_node.shutdown().await;
    server.shutdown().await;
}

async fn frames_of_every_size_cross_the_encrypted_channel(net: Net) {
    let (server, addr) = net.listening("server", config()).await;
    let client = net.dialer("client", config());
    let conn = client.connect(&addr).await.unwrap();
    let mut incoming = server.accept().await.unwrap();
    // One Noise message carries 65519 plaintext bytes; a frame of exactly
    // that size (prefix included) has this payload length:
    let one_message = {
        let probe = |n: usize| {
            meshwork_wire::encode_frame(&payload_msg(n), usize::MAX)
                .unwrap()
                .len()
        };
        (65_400..65_519)
            .find(|&n| probe(n) == 65_519)
            .expect("some payload length fills one Noise message exactly")
    };
    for len in [0, 1, one_message - 1, one_message, one_message + 1, 5 << 20] {
        let msg = payload_msg(len);
        conn.send(msg.clone(), Priority::Bulk).await.unwrap();
        let got = incoming
            .recv_timeout(Duration::from_secs(10))
            .await
            .unwrap();
        assert!(got == msg, "payload of {len} bytes changed in transit");
    }
    client.shutdown().await;
    server.shutdown().await;
}

fn payload_msg(len: usize) -> Message {
    Message::Concern(Concern {
        command: 9,
        request_id: len as u64,
        kind: ConcernKind::Request as i32,
        payload: (0..len)
            .map(|i| (i % 253) as u8)
            .collect::<Vec<u8>>()
            .into(),
        ..Default::default()
    })
}

async fn a_banned_node_is_closed_and_refused_until_the_ban_expires(net: Net) {
    let (server, addr) = net.listening("server", config()).await;
    let rogue = net.dialer("rogue", config());
    let mut conn = rogue.connect(&addr).await.unwrap();
    let _incoming = server.accept().await.unwrap();

    server
        .ban(rogue.node_id(), Duration::from_millis(400))
        .await;
    match conn.recv().await {
        Ok(Message::Disconnect(d)) => {
            assert_eq!(d.reason_or_unspecified(), DisconnectReason::Banned)
        }
        other => panic!("expected Disconnect(banned), got {other:?}"),
    }
    let err = rogue.connect(&addr).await.unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Refused {
                reason: DisconnectReason::Banned,
                ..
            }
        ),
        "{err:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!server.is_banned(rogue.node_id()));
    let _again = rogue.connect(&addr).await.expect("ban expired");
    rogue.shutdown().await;
    server.shutdown().await;
}

/// One host holding every pending-handshake slot with silent streams does
/// not keep another host out: the newcomer evicts the hog's oldest.
#[tokio::test(start_paused = true)]
async fn a_host_holding_every_handshake_slot_yields_one_to_another_host() {
    let net = Net::mem();
    let (server, addr) = net.listening("server", config()).await;
    let mut hog = Vec::new();
    for _ in 0..64 {
        hog.push(net.raw("hog", &addr).await);
    }
    // The hog's next streams are refused: it is the top holder and its
    // handshakes are fresh.
    let mut refused = Vec::new();
    for _ in 0..10 {
        refused.push(net.raw("hog", &addr).await);
    }
    eventually("the hog's excess refused", || {
        server.stats().rejected_busy == 10
    })
    .await;
    assert_eq!(server.stats().evicted_handshakes, 0);

    let good = net.dialer("good", config());
    let started = tokio::time::Instant::now();
    let conn = good.connect(&addr).await.expect("another host gets in");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(server.stats().evicted_handshakes, 1);
    assert_eq!(server.accept().await.unwrap().node_id(), good.node_id());
    // The evicted stream was closed; the other 63 still wait.
    let mut open = 0;
    for s in &mut hog {
        // Past the server's preamble: open streams go quiet, the evicted one ends.
        let mut chunk = [0u8; 256];
        loop {
            match tokio::time::timeout(Duration::from_millis(10), s.read(&mut chunk)).await {
                Err(_) => open += 1,
                Ok(Ok(n)) if n > 0 => continue,
                Ok(_) => {}
            }
            break;
        }
    }
    assert_eq!(open, 63);
    drop(conn);
    good.shutdown().await;
    server.shutdown().await;
}

/// Under pressure a handshake gets half its timeout: a newcomer from the
/// same host (as every node is on one loopback) evicts a stream that has
/// been silent that long.
#[tokio::test(start_paused = true)]
async fn a_stale_handshake_makes_room_when_every_slot_is_taken() {
    let net = Net::mem();
    let cfg = config().with_max_pending_handshakes(4);
    let (server, addr) = net.listening("server", cfg).await;
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(net.raw("shared-host", &addr).await);
    }
    let early = net.dialer("shared-host", config());
    let err = early.connect(&addr).await.expect_err("no room yet");
    assert!(
        !matches!(err, TransportError::Timeout { .. }),
        "closed at once: {err}"
    );
    assert_eq!(server.stats().rejected_busy, 1);

    tokio::time::sleep(Duration::from_secs(5)).await; // half the 10 s timeout
    let late = net.dialer("shared-host", config());
    let _conn = late.connect(&addr).await.expect("a stale one makes room");
    assert_eq!(server.stats().evicted_handshakes, 1);
    assert_eq!(server.accept().await.unwrap().node_id(), late.node_id());
    early.shutdown().await;
    late.shutdown().await;
    server.shutdown().await;
}
