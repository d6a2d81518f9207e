//! `Connection::deliver_to` over both transports: a `Deliver` sink takes over
//! from `recv` without losing, duplicating or reordering a message (whether
//! `recv` had batched some, the reader was idle, blocked on a full inbound
//! queue, or already ended by the peer's Disconnect), it sees its own
//! connection's handle, and the connection outlives the returned handle.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use meshwork_transport::{
    CloseReason, Config, Connection, ConnectionHandle, Deliver, Endpoint, Priority,
};
use meshwork_wire::Message;
use meshwork_wire::proto::{Concern, ConcernKind, DisconnectReason};
use tokio::sync::Notify;

on_both_transports!(
    order_holds_across_the_handoff,
    a_handoff_while_the_peer_streams_keeps_order,
    an_idle_handoff_delivers_queued_messages_at_once,
    an_idle_handoff_delivers_messages_recv_had_batched,
    a_reader_blocked_on_a_full_queue_hands_over,
    a_blocked_reader_hands_over_after_recv_batched_some,
    a_peer_gone_before_the_handoff_still_delivers_everything,
    a_peer_that_closes_while_the_reader_is_blocked_is_delivered_in_full,
    the_sink_replies_through_its_connection,
    the_connection_outlives_its_handle,
    pings_and_pongs_never_reach_the_sink,
    a_disconnect_that_finds_the_queue_full_is_still_delivered,
    frames_sent_while_the_reader_is_corked_are_never_stranded,
);

/// The failure guard of every wait.
const PATIENCE: Duration = Duration::from_secs(5);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

fn concern(n: u64) -> Message {
    common::concern_frame(n, n.to_be_bytes().to_vec())
}

fn reply_to(request: &Concern) -> Message {
    Message::Concern(Concern {
        kind: ConcernKind::Reply as i32,
        ..request.clone()
    })
}

fn numbered(range: std::ops::Range<u64>) -> Vec<Message> {
    range.map(concern).collect()
}

/// No keepalive: nothing but the test's own frames crosses the link, so a
/// delivery is never woken by a stray Ping.
fn quiet() -> Config {
    config().with_keepalive(None, None)
}

/// A server and a client endpoint, connected: (server, client, the client's
/// connection to the server, the server's connection to the client).
async fn pair(net: &Net, server_config: Config) -> (Endpoint, Endpoint, Connection, Connection) {
    let (server, addr) = net.listening("server", server_config).await;
    let client = net.dialer("client", quiet());
    let to_server = within("connect", client.connect(&addr)).await.unwrap();
    let to_client = within("accept", server.accept()).await.unwrap();
    (server, client, to_server, to_client)
}

async fn send_all(conn: &ConnectionHandle, range: std::ops::Range<u64>) {
    for n in range {
        within("send", conn.send(concern(n), Priority::Normal))
            .await
            .unwrap();
    }
}

async fn close(conn: &ConnectionHandle, message: &str) {
    within("close", conn.close(DisconnectReason::Other, message)).await;
}

/// Waits until `conn`'s reader has read exactly `frames` frames, and checks
/// that it reads no more (it is blocked, or nothing more was sent).
async fn read_exactly(conn: &ConnectionHandle, frames: u64) {
    eventually("the reader reads up to its limit", || {
        conn.stats().frames_received >= frames
    })
    .await;
    assert_eq!(conn.stats().frames_received, frames);
}

/// A sink that records every message, the id of the connection it came
/// with, and whether two deliveries ever overlapped.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<Message>>,
    conn_ids: Mutex<Vec<u64>>,
    arrived: Notify,
    busy: AtomicBool,
    overlapped: AtomicBool,
}

impl Deliver for Recorder {
    fn deliver(&self, conn: &ConnectionHandle, msg: Message) {
        if self.busy.swap(true, Ordering::SeqCst) {
            self.overlapped.store(true, Ordering::SeqCst);
        }
        self.conn_ids.lock().unwrap().push(conn.info().id);
        self.seen.lock().unwrap().push(msg);
        self.busy.store(false, Ordering::SeqCst);
        self.arrived.notify_one();
    }
}

impl Recorder {
    fn new() -> Arc<Self> {
        Arc::default()
    }

    fn seen(&self) -> Vec<Message> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the messages seen so far; returns them.
    async fn wait_until(&self, what: &str, done: impl Fn(&[Message]) -> bool) -> Vec<Message> {
        let wait = async {
            loop {
                let arrived = self.arrived.notified();
                {
                    let seen = self.seen.lock().unwrap();
                    if done(&seen) {
                        return seen.clone();
                    }
                }
                arrived.await;
            }
        };
        match tokio::time::timeout(PATIENCE, wait).await {
            Ok(seen) => seen,
            Err(_) => panic!("timed out: {what}; the sink saw {:?}", self.seen()),
        }
    }

    async fn wait_for(&self, count: usize) -> Vec<Message> {
        self.wait_until(&format!("{count} messages"), |seen| seen.len() >= count)
            .await
    }

    async fn wait_for_disconnect(&self) -> Vec<Message> {
        self.wait_until("the Disconnect", |seen| {
            matches!(seen.last(), Some(Message::Disconnect(_)))
        })
        .await
    }

    /// Every delivery came with `conn`, one at a time.
    fn check_deliveries(&self, conn: &ConnectionHandle) {
        let id = conn.info().id;
        let ids = self.conn_ids.lock().unwrap();
        assert!(ids.iter().all(|&i| i == id), "{ids:?} should all be {id}");
        assert!(
            !self.overlapped.load(Ordering::SeqCst),
            "deliveries overlapped"
        );
    }
}

/// Checks that `seen` is `expected` followed by the peer's Disconnect with
/// `message`.
fn assert_then_disconnect(seen: &[Message], expected: &[Message], message: &str) {
    let (last, rest) = seen.split_last().expect("nothing delivered");
    match last {
        Message::Disconnect(d) => {
            assert_eq!(d.reason_or_unspecified(), DisconnectReason::Other);
            assert_eq!(d.message, message);
        }
        other => panic!("expected the Disconnect last, got {other:?}"),
    }
    assert_eq!(rest.len(), expected.len(), "message count");
    assert_eq!(rest, expected);
}

async fn assert_closed_by_peer(conn: &ConnectionHandle, message: &str) {
    within("the connection ends", conn.closed()).await;
    assert_eq!(
        conn.close_reason(),
        Some(CloseReason::Remote {
            reason: DisconnectReason::Other,
            message: message.into(),
        })
    );
}

async fn order_holds_across_the_handoff(net: Net) {
    let (server, client, to_server, mut incoming) = pair(&net, quiet()).await;
    send_all(&to_server, 0..200).await;
    // With all 200 queued, the first recv takes a batch of several: after
    // five recvs some are still held inside the Connection.
    read_exactly(&incoming, 200).await;
    for n in 0..5 {
        let got = within("recv", incoming.recv()).await.unwrap();
        assert_eq!(got, concern(n));
    }
    let sink = Recorder::new();
    let handle = incoming.deliver_to(sink.clone());
    send_all(&to_server, 200..400).await;
    close(&to_server, "done").await;

    let seen = sink.wait_for_disconnect().await;
    assert_then_disconnect(&seen, &numbered(5..400), "done");
    assert_closed_by_peer(&handle, "done").await;
    assert_eq!(
        sink.seen().len(),
        seen.len(),
        "nothing after the Disconnect"
    );
    sink.check_deliveries(&handle);
    client.shutdown().await;
    server.shutdown().await;
}

async fn a_handoff_while_the_peer_streams_keeps_order(net: Net) {
    const TOTAL: u64 = 5000;
    let (server, client, to_server, mut incoming) = pair(&net, quiet()).await;
    let streamer = {
        let h = to_server.handle();
        tokio::spawn(async move {
            send_all(&h, 0..TOTAL).await;
            close(&h, "streamed").await;
        })
    };
    // Hand over in the middle of the stream, wherever the reader is.
    for n in 0..3 {
        let got = within("recv", incoming.recv()).await.unwrap();
        assert_eq!(got, concern(n));
    }
    let sink = Recorder::new();
    let handle = incoming.deliver_to(sink.clone());

    let seen = sink.wait_for_disconnect().await;
    assert_then_disconnect(&seen, &numbered(3..TOTAL), "streamed");
    within("the streamer ends", streamer).await.unwrap();
    assert_closed_by_peer(&handle, "streamed").await;
    sink.check_deliveries(&handle);
    client.shutdown().await;
    server.shutdown().await;
}

async fn an_idle_handoff_delivers_queued_messages_at_once(net: Net) {
    let (server, client, to_server, incoming) = pair(&net, quiet()).await;
    send_all(&to_server, 0..10).await;
    read_exactly(&incoming, 10).await;
    // The reader now waits for a frame that never comes; the queued ten
    // must reach the sink anyway.
    let sink = Recorder::new();
    let handle = incoming.deliver_to(sink.clone());
    assert_eq!(sink.wait_for(10).await, numbered(0..10));
    assert!(!handle.is_closed());
    // And the sink goes on taking what comes next.
    send_all(&to_server, 10..12).await;
    assert_eq!(sink.wait_for(12).await, numbered(0..12));
    assert_eq!(handle.stats().frames_received, 12, "no other frame arrived");
    sink.check_deliveries(&handle);
    client.shutdown().await;
    server.shutdown().await;
}

async fn an_idle_handoff_delivers_messages_recv_had_batched(net: Net) {
    let (server, client, to_server, mut incoming) = pair(&net, quiet()).await;
    send_all(&to_server, 0..10).await;
    read_exactly(&incoming, 10).await;
    // One recv takes all ten from the queue: nine wait inside the
    // Connection and the queue is empty.
    assert_eq!(within("recv", incoming.recv()).await.unwrap(), concern(0));
    let sink = Recorder::new();
    let handle = incoming.deliver_to(sink.clone());
    assert_eq!(sink.wait_for(9).await, numbered(1..10));
    send_all(&to_server, 10..20).await;
    close(&to_server, "bye").await;
    let seen = sink.wait_for_disconnect().await;
    assert_then_disconnect(&seen, &numbered(1..20), "bye");
    assert_closed_by_peer(&handle, "bye").await;
    sink.check_deliveries(&handle);
    client.shutdown().await;
    server.shutdown().await;
}

async fn a_reader_blocked_on_a_full_queue_hands_over(net: Net) {
    let (server, client, to_server, incoming) = pair(&net, quiet().with_inbound_capacity(4)).await;
    send_all(&to_server, 0..100).await;
    // Four queued, the fifth read and waiting for room.
    read_exactly(&incoming, 5).await;
    let sink = Recorder::new();
    let handle = incoming.deliver_to(sink.clone());
    assert_eq!(sink.wait_for(100).await, numbered(0..100));
    close(&to_server, "drained").await;
    let seen = sink.wait_for_disconnect().await;
    assert_then_disconnect(&seen, &numbered(0..100), "drained");
    assert_closed_by_peer(&handle, "drained").await;
    sink.check_deliveries(&handle);
    client.shutdown().await;
    server.shutdown().await;
}

async fn a_blocked_reader_hands_over_after_recv_batched_some(net: Net) {
    let (server, client, to_server, mut incoming) =
        pair(&net, quiet().with_inbound_capacity(4)).await;
    send_all(&to_server, 0..100).await;
    read_exactly(&incoming, 5).await;
    // recv takes the four queued at once (or more: the reader may refill
    // the queue while recv is still taking); the reader fills the queue
    // again and blocks on the ninth or a later one.
    assert_eq!(within("recv", incoming.recv()).await.unwrap(), concern(0));
    eventually("the reader fills the queue again", || {
        incoming.stats().frames_received >= 9
    })
    .await;
    let sink = Recorder::new();
    let handle = incoming.deliver_to(sink.clone());
    send_all(&to_server, 100..150).await;
    close(&to_server, "drained").await;
    let seen = sink.wait_for_disconnect().await;
    assert_then_disconnect(&seen, &numbered(1..150), "drained");
    assert_closed_by_peer(&handle, "drained").await;
    sink.check_deliveries(&handle);
    client.shutdown().await;
    server.shutdown().await;
}

async fn a_peer_gone_before_the_handoff_still_delivers_everything(net: Net) {
    let (server, client, to_server, incoming) = pair(&net, quiet()).await;
    send_all(&to_server, 0..10).await;
    close(&to_server, "gone").await;
    // The reader has read the Disconnect and both tasks have ended.
    within("the connection ends", incoming.closed()).await;
    let sink = Recorder::new();
    let handle = incoming.deliver_to(sink.clone());
    let seen = sink.wait_for_disconnect().await;
    assert_then_disconnect(&seen, &numbered(0..10), "gone");
    assert_closed_by_peer(&handle, "gone").await;
    sink.check_deliveries(&handle);
    client.shutdown().await;
    server.shutdown().await;
}

async fn a_peer_that_closes_while_the_reader_is_blocked_is_delivered_in_full(net: Net) {
    let (server, client, to_server, incoming) = pair(&net, quiet().with_inbound_capacity(4)).await;
    send_all(&to_server, 0..20).await;
    read_exactly(&incoming, 5).await;
    // The peer's close writes everything and the Disconnect, then waits for
    // us to read them: it can only finish once the sink has taken over.
    let closing = {
        let h = to_server.handle();
        tokio::spawn(async move { close(&h, "gone").await })
    };
    let sink = Recorder::new();
    let handle = incoming.deliver_to(sink.clone());
    let seen = sink.wait_for_disconnect().await;
    assert_then_disconnect(&seen, &numbered(0..20), "gone");
    within("the peer's close", closing).await.unwrap();
    assert_closed_by_peer(&handle, "gone").await;
    sink.check_deliveries(&handle);
    client.shutdown().await;
    server.shutdown().await;
}

/// The peer's Disconnect arrives just as its last message fills the inbound
/// queue, before anyone takes from it. `Deliver` promises the Disconnect
/// last (and `recv` promises it once), but `read_loop` hands it to the queue
/// with `try_send` and drops it when the queue is full.
async fn a_disconnect_that_finds_the_queue_full_is_still_delivered(net: Net) {
    let (server, client, to_server, incoming) = pair(&net, quiet().with_inbound_capacity(4)).await;
    send_all(&to_server, 0..4).await;
    close(&to_server, "gone").await;
    within("the connection ends", incoming.closed()).await;
    let sink = Recorder::new();
    let handle = incoming.deliver_to(sink.clone());
    // Everything the peer sent was read (four Concerns and the Disconnect).
    assert_eq!(handle.stats().frames_received, 5);
    let seen = sink.wait_for_disconnect().await;
    assert_then_disconnect(&seen, &numbered(0..4), "gone");
    client.shutdown().await;
    server.shutdown().await;
}

/// Answers every Concern through the connection it came on, then records it.
struct Echo {
    log: Arc<Recorder>,
    send_failures: AtomicUsize,
}

impl Deliver for Echo {
    fn deliver(&self, conn: &ConnectionHandle, msg: Message) {
        if let Message::Concern(c) = &msg {
            if conn.try_send(reply_to(c), Priority::Normal).is_err() {
                self.send_failures.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.log.deliver(conn, msg);
    }
}

async fn the_sink_replies_through_its_connection(net: Net) {
    let (server, client, mut to_server, mut incoming) = pair(&net, quiet()).await;
    send_all(&to_server, 0..10).await;
    read_exactly(&incoming, 10).await;
    // Some requests are batched inside the Connection at the handoff, some
    // still queued, the rest sent after it: all are answered.
    assert_eq!(within("recv", incoming.recv()).await.unwrap(), concern(0));
    let log = Recorder::new();
    let echo = Arc::new(Echo {
        log: log.clone(),
        send_failures: AtomicUsize::new(0),
    });
    let handle = incoming.deliver_to(echo.clone());
    send_all(&to_server, 10..50).await;
    for n in 1..50 {
        let got = within("reply", to_server.recv()).await.unwrap();
        assert_eq!(got, reply_to(&as_concern(concern(n))));
    }
    assert_eq!(echo.send_failures.load(Ordering::SeqCst), 0);
    assert_eq!(log.wait_for(49).await, numbered(1..50));
    // The sink was given this very connection: the one to the client.
    log.check_deliveries(&handle);
    assert_eq!(handle.node_id(), client.node_id());
    client.shutdown().await;
    server.shutdown().await;
}

fn as_concern(msg: Message) -> Concern {
    match msg {
        Message::Concern(c) => c,
        other => panic!("not a Concern: {other:?}"),
    }
}

async fn the_connection_outlives_its_handle(net: Net) {
    let (server, client, mut to_server, incoming) = pair(&net, quiet()).await;
    let sink = Recorder::new();
    let id = incoming.info().id;
    drop(incoming.deliver_to(sink.clone()));
    // Neither dropping the Connection (inside deliver_to) nor the handle
    // closed it: it still reads.
    send_all(&to_server, 0..20).await;
    assert_eq!(sink.wait_for(20).await, numbered(0..20));
    let on_server = server.connections();
    assert_eq!(on_server.len(), 1);
    assert_eq!(on_server[0].info().id, id);
    assert!(!on_server[0].is_closed());
    // The endpoint's shutdown still closes it, with a goodbye to the peer.
    within("server shutdown", server.shutdown()).await;
    match within("the goodbye", to_server.recv()).await {
        Ok(Message::Disconnect(d)) => {
            assert_eq!(d.reason_or_unspecified(), DisconnectReason::Shutdown)
        }
        other => panic!("expected Disconnect(shutdown), got {other:?}"),
    }
    assert!(on_server[0].is_closed());
    assert!(matches!(
        on_server[0].close_reason(),
        Some(CloseReason::Local {
            reason: DisconnectReason::Shutdown,
            ..
        })
    ));
    sink.check_deliveries(&on_server[0]);
    client.shutdown().await;
}

async fn pings_and_pongs_never_reach_the_sink(net: Net) {
    let (server, client, to_server, incoming) = pair(&net, quiet()).await;
    let sink = Recorder::new();
    let handle = incoming.deliver_to(sink.clone());
    // Both directions: the reader answers the peer's Ping and takes the
    // Pong to ours, and hands neither to the sink.
    within("ping from the client", to_server.ping(PATIENCE))
        .await
        .unwrap();
    within("ping from the server", handle.ping(PATIENCE))
        .await
        .unwrap();
    send_all(&to_server, 0..1).await;
    close(&to_server, "bye").await;
    let seen = sink.wait_for_disconnect().await;
    assert_then_disconnect(&seen, &numbered(0..1), "bye");
    assert_eq!(
        handle.stats().frames_received,
        4,
        "Ping, Pong, Concern, Disconnect"
    );
    sink.check_deliveries(&handle);
    client.shutdown().await;
    server.shutdown().await;
}

/// Frames in each of the client's bursts, and rounds, in
/// `frames_sent_while_the_reader_is_corked_are_never_stranded`.
const BURST: u64 = 16;
const ROUNDS: u64 = 1500;
/// How long a frame may take to cross an idle loopback link before it
/// counts as stranded.
const STRANDED: Duration = Duration::from_secs(2);
/// The sender's delay after a burst's last delivery sweeps 0, 1 × … up to
/// `SWEEP_STEPS - 1` × this, round after round: past the moment the reader
/// lifts its cork, whenever on this machine that comes.
const SWEEP_STEP: Duration = Duration::from_nanos(40);
const SWEEP_STEPS: u64 = 64;

/// Counts (and checks the order of) the client's frames on the server's
/// reader, and wakes the sender thread when a burst begins.
#[derive(Default)]
struct BurstCounter {
    delivered: std::sync::atomic::AtomicU64,
    out_of_order: AtomicBool,
    sender: Mutex<Option<std::thread::Thread>>,
}

impl Deliver for BurstCounter {
    fn deliver(&self, _: &ConnectionHandle, msg: Message) {
        let n = self.delivered.load(Ordering::Acquire);
        if msg != concern(n) {
            self.out_of_order.store(true, Ordering::SeqCst);
        }
        self.delivered.store(n + 1, Ordering::Release);
        if n % BURST == 0 {
            if let Some(sender) = &*self.sender.lock().unwrap() {
                sender.unpark();
            }
        }
    }
}

/// The server's sender thread: in each round, once the burst is all
/// delivered (the reader is still corked, or about to lift the cork),
/// waits the round's share of the sweep and sends the round's one frame.
fn send_one_per_round(conn: &ConnectionHandle, sink: &BurstCounter) -> Result<(), String> {
    for round in 0..ROUNDS {
        let deadline = std::time::Instant::now() + PATIENCE;
        let mut spins = 0u32;
        loop {
            let n = sink.delivered.load(Ordering::Acquire);
            if n >= (round + 1) * BURST {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "round {round}: the burst never arrived ({n} delivered)"
                ));
            }
            // Spin while the burst is being delivered (briefly: the reader
            // may need this CPU); sleep between bursts.
            if n > round * BURST && spins < 10_000 {
                spins += 1;
                std::hint::spin_loop();
            } else if n > round * BURST {
                std::thread::yield_now();
            } else {
                std::thread::park_timeout(Duration::from_millis(1));
            }
        }
        let delay = SWEEP_STEP * (round % SWEEP_STEPS) as u32;
        let start = std::time::Instant::now();
        while start.elapsed() < delay {
            std::hint::spin_loop();
        }
        conn.try_send(concern(round), Priority::Normal)
            .map_err(|e| format!("round {round}: {e}"))?;
    }
    Ok(())
}

/// A frame sent from another thread while the reader is corked handing a
/// burst to its sink, and in particular just as it lifts the cork, is
/// written without waiting for anything else to happen on the connection.
///
/// The client sends bursts to the server's sink; after each burst has been
/// delivered, a thread of the server's sends one frame back through the
/// connection, at a delay that sweeps across the moment the reader lifts
/// its cork. The client then sends nothing (and with keepalive off, no
/// Ping wakes the link either): a frame left gathered in the write half
/// after the reader's last drain would never be written.
///
/// The sender is a plain thread (`try_send` needs no runtime), so that it
/// sends at a chosen moment, in parallel with the reader. The race it looks
/// for (a sender that saw the cork set appends its frame just after the
/// reader's last drain) is a window of a few hundred nanoseconds: with the
/// fix undone, about one run in three fails (one transport or both).
async fn frames_sent_while_the_reader_is_corked_are_never_stranded(net: Net) {
    let (server, client, mut to_server, incoming) = pair(&net, quiet()).await;
    let sink = Arc::new(BurstCounter::default());
    let handle = incoming.deliver_to(sink.clone());
    let sender = {
        let (conn, sink) = (handle.clone(), sink.clone());
        std::thread::spawn(move || send_one_per_round(&conn, &sink))
    };
    *sink.sender.lock().unwrap() = Some(sender.thread().clone());

    for round in 0..ROUNDS {
        send_all(&to_server, round * BURST..(round + 1) * BURST).await;
        match tokio::time::timeout(STRANDED, to_server.recv()).await {
            Ok(Ok(got)) => assert_eq!(got, concern(round), "round {round}: frame out of order"),
            Ok(Err(e)) => panic!("round {round}: {e}"),
            Err(_) if sender.is_finished() => {
                panic!("round {round}: the sender gave up: {:?}", sender.join())
            }
            Err(_) => panic!(
                "round {round}: the server's frame was not written within {STRANDED:?} \
                 ({} of the client's frames delivered)",
                sink.delivered.load(Ordering::SeqCst)
            ),
        }
    }
    eventually("the sender thread ends", || sender.is_finished()).await;
    sender.join().unwrap().unwrap();
    assert_eq!(sink.delivered.load(Ordering::SeqCst), ROUNDS * BURST);
    assert!(
        !sink.out_of_order.load(Ordering::SeqCst),
        "the sink saw the bursts out of order"
    );
    // Nothing but the bursts and the answers crossed the link. (A writer
    // counts its frames once its write call returns, which may be after the
    // peer has already answered them.)
    eventually("the client to count every burst frame as sent", || {
        to_server.stats().frames_sent >= ROUNDS * BURST
    })
    .await;
    assert_eq!(to_server.stats().frames_sent, ROUNDS * BURST);
    assert_eq!(to_server.stats().frames_received, ROUNDS);
    assert_eq!(handle.stats().frames_received, ROUNDS * BURST);
    client.shutdown().await;
    server.shutdown().await;
}
