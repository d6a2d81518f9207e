//! Dispatch and lanes of the concerns layer on the in-memory network, on a
//! paused clock (one test on many threads and the real clock): waiting
//! requests are served control first, then normal, then bulk; answers take
//! the request's lane unless the handler picks another; handlers that answer
//! without awaiting are answered inline on the connection's reader; the
//! concurrency limit and the per-sender queues hold; a request given up
//! leaves nothing pending.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use meshwork_concerns::peers::{ConcernFrame, InboundHandler, PeerManager, PeersConfig};
use meshwork_concerns::transport::mem::MemNetwork;
use meshwork_concerns::transport::{Config, Connection, ConnectionHandle, Endpoint, Priority};
use meshwork_concerns::wire::proto::{ConcernError, ConcernKind, ErrorCode};
use meshwork_concerns::wire::{Message, NodeId};
use meshwork_concerns::{
    BoxError, Concern, ConcernStats, Concerns, ConcernsConfig, ConcernsError, Context, Reply,
};
use prost::Message as _;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);
/// How long any single wait of these tests may take before it counts as a
/// failure (paused clock: only reached when something is stuck).
const GUARD: Duration = Duration::from_secs(10);

mod support;
use support::{listening, routing_frame};

/// A peer manager for `name` on `net`, seeded with `seeds`, nothing above it.
async fn bare_peers(net: &MemNetwork, name: &str, seeds: &[&str]) -> PeerManager {
    let endpoint = listening(net, name).await;
    let seeds = seeds.iter().map(|a| a.parse().unwrap());
    PeerManager::start(endpoint, PeersConfig::default().with_seeds(seeds)).unwrap()
}

/// A node running exactly `concerns` (no built-in ones).
async fn node(
    net: &MemNetwork,
    name: &str,
    seeds: &[&str],
    config: ConcernsConfig,
    concerns: Vec<Arc<dyn Concern>>,
) -> Concerns {
    let peers = bare_peers(net, name, seeds).await;
    Concerns::builder(peers)
        .config(config)
        .only(concerns)
        .start()
        .await
        .unwrap()
}

/// A server "s" running `concerns` and `clients` nodes seeded with it, all
/// connected.
async fn star(
    net: &MemNetwork,
    config: ConcernsConfig,
    concerns: Vec<Arc<dyn Concern>>,
    clients: usize,
) -> (Concerns, Vec<Concerns>) {
    let server = node(net, "s", &[], config, concerns).await;
    let mut all = Vec::new();
    for i in 0..clients {
        let c = node(
            net,
            &format!("c{i}"),
            &["mem://s"],
            ConcernsConfig::default(),
            vec![],
        )
        .await;
        c.peers().wait_for_peers(1, 5 * S).await.unwrap();
        all.push(c);
    }
    server.peers().wait_for_peers(clients, 5 * S).await.unwrap();
    (server, all)
}

async fn stop(nodes: Vec<Concerns>) {
    for n in &nodes {
        n.shutdown().await;
    }
    for n in &nodes {
        n.peers().shutdown().await;
    }
}

fn stats_of(node: &Concerns, command: u32) -> ConcernStats {
    node.stats()
        .into_iter()
        .find(|s| s.command == command)
        .expect("the concern is registered")
}

/// Waits (bounded) until `cond` holds; panics naming `what` otherwise.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + GUARD;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(MS).await;
    }
}

/// Awaits `fut`, bounded; panics naming `what` if it takes too long.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    timeout(GUARD, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn is_overloaded(r: &Result<Bytes, ConcernsError>) -> bool {
    matches!(
        r,
        Err(ConcernsError::Remote {
            code: ErrorCode::Overloaded,
            ..
        })
    )
}

/// Records the requests it starts, in order; a request whose payload starts
/// with "gate" waits for a permit of `gate` (held by the test). One request
/// at a time. Echoes.
#[derive(Clone)]
struct Gated {
    gate: Arc<Semaphore>,
    started: Arc<Mutex<Vec<String>>>,
}

const GATED: u32 = 60;

impl Gated {
    fn new() -> Self {
        Gated {
            gate: Arc::new(Semaphore::new(0)),
            started: Arc::default(),
        }
    }
    fn started(&self) -> Vec<String> {
        self.started.lock().unwrap().clone()
    }
}

#[async_trait]
impl Concern for Gated {
    fn command(&self) -> u32 {
        GATED
    }
    fn name(&self) -> &str {
        "gated"
    }
    fn max_concurrency(&self) -> usize {
        1
    }
    async fn on_request(
        &self,
        _ctx: &Context,
        _from: &NodeId,
        payload: Bytes,
    ) -> Result<Option<Reply>, BoxError> {
        self.started.lock().unwrap().push(text(&payload));
        if payload.starts_with(b"gate") {
            let _permit = self.gate.acquire().await?;
        }
        Ok(Some(Reply::new(payload)))
    }
}

/// A server "s" running the gated concern, and one client.
async fn gated_star(net: &MemNetwork) -> (Gated, Concerns, Vec<Concerns>) {
    let gated = Gated::new();
    let concerns: Vec<Arc<dyn Concern>> = vec![Arc::new(gated.clone())];
    let (server, clients) = star(net, ConcernsConfig::default(), concerns, 1).await;
    (gated, server, clients)
}

/// Sends `payload` from `ctx` to `to` on `lane` in a task of its own.
fn spawn_request(
    ctx: &Context,
    to: &NodeId,
    payload: &str,
    lane: Priority,
) -> JoinHandle<Result<Bytes, ConcernsError>> {
    let (ctx, to, payload) = (ctx.clone(), to.clone(), payload.to_string());
    tokio::spawn(async move { ctx.request_with(&to, payload, GUARD, lane).await })
}

/// While the only slot is taken, bulk requests wait; a normal one that
/// comes later overtakes them, and a control one that comes last overtakes
/// everything. Within a lane, requests keep their order.
#[tokio::test(start_paused = true)]
async fn control_overtakes_normal_which_overtakes_bulk_while_waiting() {
    let net = MemNetwork::new();
    let (gated, server, clients) = gated_star(&net).await;
    let sid = server.peers().node_id().clone();
    let ctx = clients[0].context(GATED);

    let mut calls = vec![(
        "gate".to_string(),
        spawn_request(&ctx, &sid, "gate", Priority::Normal),
    )];
    wait_until("the gated request to start", || {
        gated.started() == ["gate"] && stats_of(&server, GATED).in_flight == 1
    })
    .await;
    let later = [
        ("bulk 0", Priority::Bulk),
        ("bulk 1", Priority::Bulk),
        ("bulk 2", Priority::Bulk),
        ("normal", Priority::Normal),
        ("control", Priority::Control),
    ];
    for (queued, (name, lane)) in later.into_iter().enumerate() {
        calls.push((name.to_string(), spawn_request(&ctx, &sid, name, lane)));
        wait_until(&format!("{name} to be queued"), || {
            stats_of(&server, GATED).queued == queued + 1
        })
        .await;
    }
    // Nothing but the gated request has started meanwhile.
    assert_eq!(gated.started(), ["gate"]);

    gated.gate.add_permits(1);
    for (name, call) in calls {
        let reply = within(&name, call)
            .await
            .expect("the request task")
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(reply, Bytes::from(name.clone()), "{name}");
    }
    assert_eq!(
        gated.started(),
        ["gate", "control", "normal", "bulk 0", "bulk 1", "bulk 2"]
    );
    let stats = stats_of(&server, GATED);
    assert_eq!((stats.requests, stats.replies), (6, 6));
    wait_until("the slot to be given back", || {
        let s = stats_of(&server, GATED);
        (s.in_flight, s.queued) == (0, 0)
    })
    .await;
    let mut all = vec![server];
    all.extend(clients);
    stop(all).await;
}

/// Echoes; 'e…' fails, 's…' answers after 10 ms, 'C…' / 'B…' / 'N…' answer
/// on the control / bulk / normal lane whatever the request's.
struct Laner;

const LANER: u32 = 63;

#[async_trait]
impl Concern for Laner {
    fn command(&self) -> u32 {
        LANER
    }
    async fn on_request(
        &self,
        _ctx: &Context,
        _from: &NodeId,
        payload: Bytes,
    ) -> Result<Option<Reply>, BoxError> {
        let reply = Reply::new(payload.clone());
        Ok(Some(match payload.first() {
            Some(b'e') => return Err("asked to fail".into()),
            Some(b's') => {
                sleep(10 * MS).await;
                reply
            }
            Some(b'C') => reply.with_priority(Priority::Control),
            Some(b'B') => reply.with_priority(Priority::Bulk),
            Some(b'N') => reply.with_priority(Priority::Normal),
            _ => reply,
        }))
    }
}

/// Hands every Concern frame it receives to the test.
struct Recorder(mpsc::UnboundedSender<ConcernFrame>);

impl InboundHandler for Recorder {
    fn on_concern(&self, _from: &NodeId, _conn: &ConnectionHandle, message: ConcernFrame) {
        let _ = self.0.send(message);
    }
}

/// The lane a frame was sent on, as its flags name it (protocol section 10:
/// bits 0-1, 0 normal, 1 control, 2 bulk).
fn flags_of(lane: Priority) -> u32 {
    match lane {
        Priority::Normal => 0,
        Priority::Control => 1,
        Priority::Bulk => 2,
    }
}

/// The answer to a request goes back on the request's lane (its frame says
/// so in its flags), replies and errors alike, inline or after awaiting,
/// unless the handler picked a lane with `Reply::with_priority`. The client
/// here is a bare peer manager that writes and reads the Concern frames
/// itself.
#[tokio::test(start_paused = true)]
async fn an_answer_goes_back_on_the_requests_lane_unless_the_handler_picks_one() {
    let net = MemNetwork::new();
    let server = node(
        &net,
        "s",
        &[],
        ConcernsConfig::default(),
        vec![Arc::new(Laner)],
    )
    .await;
    let client = bare_peers(&net, "c", &["mem://s"]).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    client.set_inbound_handler(Arc::new(Recorder(tx))).unwrap();
    client.wait_for_peers(1, 5 * S).await.unwrap();
    server.peers().wait_for_peers(1, 5 * S).await.unwrap();
    let sid = server.peers().node_id().clone();

    use Priority::{Bulk, Control, Normal};
    // (command, payload, request lane, request flags, answer kind, answer lane)
    let cases: &[(u32, &str, Priority, u32, ConcernKind, Priority)] = &[
        (LANER, "plain", Control, 1, ConcernKind::Reply, Control),
        (LANER, "plain", Normal, 0, ConcernKind::Reply, Normal),
        (LANER, "plain", Bulk, 2, ConcernKind::Reply, Bulk),
        // Flags 3 read as normal, whatever lane carried the frame.
        (LANER, "plain", Bulk, 3, ConcernKind::Reply, Normal),
        // Answered after awaiting, from a task of its own.
        (LANER, "slow", Bulk, 2, ConcernKind::Reply, Bulk),
        (LANER, "slow", Control, 1, ConcernKind::Reply, Control),
        // The handler's choice wins.
        (LANER, "C", Bulk, 2, ConcernKind::Reply, Control),
        (LANER, "B", Control, 1, ConcernKind::Reply, Bulk),
        (LANER, "N", Control, 1, ConcernKind::Reply, Normal),
        // Errors: a failing handler, a command nobody handles.
        (LANER, "error", Bulk, 2, ConcernKind::Error, Bulk),
        (LANER, "error", Control, 1, ConcernKind::Error, Control),
        (999, "unknown", Control, 1, ConcernKind::Error, Control),
        (999, "unknown", Bulk, 2, ConcernKind::Error, Bulk),
    ];
    for (i, &(command, payload, lane, flags, kind, answer_lane)) in cases.iter().enumerate() {
        let case = format!("case {i}: {payload:?} on {lane:?} (flags {flags})");
        let request_id = 100 + i as u64;
        let frame = ConcernFrame {
            command,
            request_id,
            kind: ConcernKind::Request as i32,
            ttl: 0,
            flags,
            payload: Bytes::from(payload),
        };
        client
            .send(&sid, Message::Concern(frame), lane)
            .await
            .unwrap();
        let answer = within(&case, rx.recv())
            .await
            .expect("the handler is installed");
        assert_eq!(answer.request_id, request_id, "{case}");
        assert_eq!(answer.command, command, "{case}");
        assert_eq!(answer.kind, kind as i32, "{case}");
        assert_eq!(answer.flags, flags_of(answer_lane), "{case}: answer's lane");
        if kind == ConcernKind::Reply {
            assert_eq!(answer.payload, Bytes::from(payload), "{case}");
        } else {
            let e = ConcernError::decode(answer.payload.clone()).unwrap();
            let expected = if command == LANER {
                ErrorCode::HandlerFailed
            } else {
                ErrorCode::UnknownCommand
            };
            assert_eq!(e.code, expected as i32, "{case}: {e:?}");
        }
    }
    assert!(rx.try_recv().is_err(), "one answer per request");
    server.shutdown().await;
    server.peers().shutdown().await;
    client.shutdown().await;
}

/// 'i…' answers at once, 'w…' after awaiting 10 ms; records the task each
/// handler started and ended on. Two at a time.
#[derive(Clone, Default)]
struct Mixed {
    tasks: Arc<Mutex<HashMap<String, (tokio::task::Id, tokio::task::Id)>>>,
}

const MIXED: u32 = 61;

#[async_trait]
impl Concern for Mixed {
    fn command(&self) -> u32 {
        MIXED
    }
    fn max_concurrency(&self) -> usize {
        2
    }
    async fn on_request(
        &self,
        _ctx: &Context,
        _from: &NodeId,
        payload: Bytes,
    ) -> Result<Option<Reply>, BoxError> {
        let first = tokio::task::try_id().expect("handlers run in tasks");
        match payload.first() {
            Some(b'i') => {}
            Some(b'w') => sleep(10 * MS).await,
            _ => return Err("unexpected payload".into()),
        }
        let last = tokio::task::try_id().expect("handlers run in tasks");
        self.tasks
            .lock()
            .unwrap()
            .insert(text(&payload), (first, last));
        Ok(Some(Reply::new(format!("{}!", text(&payload)))))
    }
}

/// A handler that answers without awaiting is answered right on the
/// connection's reader (no task of its own); one that awaits starts there
/// and carries on in a task of its own. Mixed and concurrent, every request
/// gets its own answer and the counters end balanced.
#[tokio::test(start_paused = true)]
async fn inline_and_awaiting_handlers_both_answer_and_the_counters_balance() {
    let net = MemNetwork::new();
    let mixed = Mixed::default();
    let (server, clients) = star(
        &net,
        ConcernsConfig::default(),
        vec![Arc::new(mixed.clone())],
        1,
    )
    .await;
    let sid = server.peers().node_id().clone();
    let ctx = clients[0].context(MIXED);

    // One at a time: every handler starts on the same task, the reader of
    // the one connection; those that await finish on another one.
    for p in ["i-seq-0", "w-seq-0", "i-seq-1", "w-seq-1", "i-seq-2"] {
        let reply = within(p, ctx.request(&sid, p, GUARD)).await.unwrap();
        assert_eq!(reply, Bytes::from(format!("{p}!")));
    }
    let tasks = mixed.tasks.lock().unwrap().clone();
    let reader = tasks["i-seq-0"].0;
    for p in ["i-seq-0", "i-seq-1", "i-seq-2"] {
        assert_eq!(tasks[p], (reader, reader), "{p} ran inline on the reader");
    }
    for p in ["w-seq-0", "w-seq-1"] {
        let (first, last) = tasks[p];
        assert_eq!(first, reader, "{p}'s first poll ran on the reader");
        assert_ne!(last, reader, "{p} carried on in a task of its own");
    }
    let before = stats_of(&server, MIXED);
    assert_eq!((before.requests, before.replies), (5, 5));

    // Twenty at once, mixed.
    let payloads: Vec<String> = (0..20)
        .map(|i| format!("{}-{i}", if i % 3 == 0 { 'w' } else { 'i' }))
        .collect();
    let calls = payloads.iter().map(|p| ctx.request(&sid, p.clone(), GUARD));
    let replies = within("20 requests", futures_util::future::join_all(calls)).await;
    for (p, r) in payloads.iter().zip(replies) {
        assert_eq!(r.unwrap(), Bytes::from(format!("{p}!")), "{p}");
    }
    wait_until("the server to be idle", || {
        let s = stats_of(&server, MIXED);
        (s.in_flight, s.queued) == (0, 0)
    })
    .await;
    let stats = stats_of(&server, MIXED);
    assert_eq!(
        (stats.requests, stats.replies, stats.errors, stats.dropped),
        (25, 25, 0, 0),
        "{stats:?}"
    );
    let mut all = vec![server];
    all.extend(clients);
    stop(all).await;
}

/// A caller that stops waiting leaves no pending request behind: not when
/// it drops the request (a deadline of its own) while the handler still
/// works and the answer never comes in time, not when the request times out;
/// and the late answers, when they come, are ignored.
#[tokio::test(start_paused = true)]
async fn a_request_given_up_leaves_nothing_pending() {
    let net = MemNetwork::new();
    let (gated, server, clients) = gated_star(&net).await;
    let sid = server.peers().node_id().clone();
    let client = &clients[0];
    let ctx = client.context(GATED);

    let dropped = timeout(50 * MS, ctx.request(&sid, "gate-dropped", GUARD)).await;
    assert!(dropped.is_err(), "the handler is held at the gate");
    assert_eq!(client.pending_requests(), 0, "a dropped request");

    let timed_out = ctx.request(&sid, "gate-timeout", 100 * MS).await;
    assert!(
        matches!(timed_out, Err(ConcernsError::Timeout(_))),
        "{timed_out:?}"
    );
    assert_eq!(client.pending_requests(), 0, "a timed-out request");

    // Both gated requests now finish and answer; nobody waits for them.
    gated.gate.add_permits(2);
    let reply = within("a later request", ctx.request(&sid, "after", GUARD)).await;
    assert_eq!(reply.unwrap(), Bytes::from("after"));
    assert_eq!(gated.started(), ["gate-dropped", "gate-timeout", "after"]);
    assert_eq!(client.pending_requests(), 0, "an answered request");
    let mut all = vec![server];
    all.extend(clients);
    stop(all).await;
}

/// Counts the handlers running at once and the most ever seen; 'i…'
/// answers at once, others after 5 ms. Three at a time.
#[derive(Clone, Default)]
struct Counting {
    now: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    handled: Arc<AtomicUsize>,
}

const COUNTING: u32 = 62;

#[async_trait]
impl Concern for Counting {
    fn command(&self) -> u32 {
        COUNTING
    }
    fn max_concurrency(&self) -> usize {
        3
    }
    async fn on_request(
        &self,
        _ctx: &Context,
        _from: &NodeId,
        payload: Bytes,
    ) -> Result<Option<Reply>, BoxError> {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        if !payload.starts_with(b"i") {
            sleep(5 * MS).await;
        }
        self.now.fetch_sub(1, Ordering::SeqCst);
        self.handled.fetch_add(1, Ordering::SeqCst);
        Ok(Some(Reply::new(payload)))
    }
}

/// Fires `n` requests from each client at once at `server`'s `command`;
/// returns every (payload, result).
async fn burst(
    clients: &[Concerns],
    server: &NodeId,
    command: u32,
    n: usize,
    payload: impl Fn(usize, usize) -> String,
) -> Vec<(String, Result<Bytes, ConcernsError>)> {
    let mut tasks = Vec::new();
    for (c, client) in clients.iter().enumerate() {
        let ctx = client.context(command);
        let payloads: Vec<String> = (0..n).map(|i| payload(c, i)).collect();
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            let calls = payloads
                .iter()
                .map(|p| ctx.request(&server, p.clone(), GUARD));
            let results = futures_util::future::join_all(calls).await;
            payloads.into_iter().zip(results).collect::<Vec<_>>()
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(within("a burst", t).await.unwrap());
    }
    all
}

/// Thirty requests at once from two peers, some answered inline, some
/// awaiting: never more than three handlers at once, and three are reached.
#[tokio::test(start_paused = true)]
async fn the_concurrency_limit_holds_with_inline_starts() {
    let net = MemNetwork::new();
    let counting = Counting::default();
    let (server, clients) = star(
        &net,
        ConcernsConfig::default(),
        vec![Arc::new(counting.clone())],
        2,
    )
    .await;
    let sid = server.peers().node_id().clone();
    let results = burst(&clients, &sid, COUNTING, 15, |c, i| {
        let kind = if i % 4 == 1 { 'i' } else { 'w' };
        format!("{kind} {c}-{i}")
    })
    .await;
    assert_eq!(results.len(), 30);
    for (p, r) in results {
        assert_eq!(r.unwrap(), Bytes::from(p.clone()), "{p}");
    }
    assert_eq!(counting.most.load(Ordering::SeqCst), 3, "most at once");
    assert_eq!(counting.handled.load(Ordering::SeqCst), 30);
    assert_eq!(counting.now.load(Ordering::SeqCst), 0);
    wait_until("the server to be idle", || {
        let s = stats_of(&server, COUNTING);
        (s.in_flight, s.queued) == (0, 0)
    })
    .await;
    let stats = stats_of(&server, COUNTING);
    assert_eq!((stats.requests, stats.replies, stats.dropped), (30, 30, 0));
    let mut all = vec![server];
    all.extend(clients);
    stop(all).await;
}

/// The same on a multi-threaded runtime and the real clock, where the two
/// peers' readers start requests truly at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_concurrency_limit_holds_with_inline_starts_on_many_threads() {
    let net = MemNetwork::new();
    let counting = Counting::default();
    let (server, clients) = star(
        &net,
        ConcernsConfig::default(),
        vec![Arc::new(counting.clone())],
        2,
    )
    .await;
    let sid = server.peers().node_id().clone();
    for round in 0..5 {
        let results = burst(&clients, &sid, COUNTING, 40, |c, i| {
            let kind = if i % 2 == 1 { 'i' } else { 'w' };
            format!("{kind} {round} {c}-{i}")
        })
        .await;
        assert_eq!(results.len(), 80);
        for (p, r) in results {
            assert_eq!(r.unwrap(), Bytes::from(p.clone()), "{p}");
        }
        assert!(
            counting.most.load(Ordering::SeqCst) <= 3,
            "round {round}: {} at once",
            counting.most.load(Ordering::SeqCst)
        );
    }
    assert_eq!(counting.handled.load(Ordering::SeqCst), 400);
    wait_until("the server to be idle", || {
        let s = stats_of(&server, COUNTING);
        (s.in_flight, s.queued) == (0, 0)
    })
    .await;
    let stats = stats_of(&server, COUNTING);
    assert_eq!(
        (stats.requests, stats.replies, stats.dropped),
        (400, 400, 0)
    );
    let mut all = vec![server];
    all.extend(clients);
    stop(all).await;
}

/// From `ctx` (a client of `server`, whose only slot `gated` holds shut):
/// a "gate" request that starts and blocks, then `waiting` normal requests
/// that queue behind it, each seen queued before the next is sent. The
/// calls, by name.
async fn fill_share(
    server: &Concerns,
    gated: &Gated,
    ctx: &Context,
    waiting: [&str; 2],
) -> Vec<(String, JoinHandle<Result<Bytes, ConcernsError>>)> {
    let sid = server.peers().node_id().clone();
    let mut calls = vec![(
        "gate".to_string(),
        spawn_request(ctx, &sid, "gate", Priority::Normal),
    )];
    wait_until("the gated request to start", || {
        gated.started() == ["gate"] && stats_of(server, GATED).in_flight == 1
    })
    .await;
    for (queued, name) in waiting.into_iter().enumerate() {
        calls.push((
            name.to_string(),
            spawn_request(ctx, &sid, name, Priority::Normal),
        ));
        wait_until(&format!("{name} to be queued"), || {
            stats_of(server, GATED).queued == queued + 1
        })
        .await;
    }
    calls
}

/// One request running and two waiting fill a sender's share: its next
/// request is refused "overloaded" at once, while another sender's is still
/// taken; when the slot frees up, every accepted request is answered.
#[tokio::test(start_paused = true)]
async fn a_full_sender_queue_is_refused_at_once_and_the_rest_are_served() {
    let net = MemNetwork::new();
    let gated = Gated::new();
    let (server, clients) = star(
        &net,
        ConcernsConfig::default().with_per_sender_queue(2),
        vec![Arc::new(gated.clone())],
        2,
    )
    .await;
    let sid = server.peers().node_id().clone();
    let ctx = clients[0].context(GATED);

    let mut calls = fill_share(&server, &gated, &ctx, ["queued 0", "queued 1"]).await;

    let t = Instant::now();
    let refused = within("the refusal", ctx.request(&sid, "one too many", GUARD)).await;
    assert!(is_overloaded(&refused), "{refused:?}");
    assert!(t.elapsed() < 10 * MS, "refused after {:?}", t.elapsed());
    let stats = stats_of(&server, GATED);
    assert_eq!((stats.dropped, stats.queued, stats.in_flight), (1, 2, 1));
    assert_eq!(gated.started(), ["gate"], "the gate is still closed");

    // Another sender has a queue of its own.
    let other = clients[1].context(GATED);
    calls.push((
        "other".to_string(),
        spawn_request(&other, &sid, "other", Priority::Normal),
    ));
    wait_until("the other sender's request to be queued", || {
        stats_of(&server, GATED).queued == 3
    })
    .await;
    assert_eq!(stats_of(&server, GATED).dropped, 1);

    gated.gate.add_permits(1);
    for (name, call) in calls {
        let reply = within(&name, call)
            .await
            .expect("the request task")
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(reply, Bytes::from(name.clone()), "{name}");
    }
    let mut started = gated.started();
    started.sort();
    assert_eq!(started, ["gate", "other", "queued 0", "queued 1"]);
    let stats = stats_of(&server, GATED);
    assert_eq!(
        (stats.requests, stats.replies, stats.dropped),
        (4, 4, 1),
        "{stats:?}"
    );
    let mut all = vec![server];
    all.extend(clients);
    stop(all).await;
}

/// A sender's share of a concern's queue is per lane: a sender whose normal
/// queue is full is refused another normal request, but its control request
/// still waits (and goes first), so a bulk or normal backlog never locks a
/// sender's control traffic out.
#[tokio::test(start_paused = true)]
async fn a_senders_share_is_per_lane() {
    let net = MemNetwork::new();
    let gated = Gated::new();
    let (server, clients) = star(
        &net,
        ConcernsConfig::default().with_per_sender_queue(2),
        vec![Arc::new(gated.clone())],
        1,
    )
    .await;
    let sid = server.peers().node_id().clone();
    let ctx = clients[0].context(GATED);

    let mut calls = fill_share(&server, &gated, &ctx, ["normal 0", "normal 1"]).await;
    // The normal share (2) is taken: one more normal request is refused.
    let refused = spawn_request(&ctx, &sid, "normal 2", Priority::Normal);
    let refused = within("normal 2", refused).await.expect("the request task");
    assert!(is_overloaded(&refused), "{refused:?}");
    // A control request from the same sender still gets in.
    calls.push((
        "control".to_string(),
        spawn_request(&ctx, &sid, "control", Priority::Control),
    ));
    wait_until("the control request to be queued", || {
        stats_of(&server, GATED).queued == 3
    })
    .await;
    let stats = stats_of(&server, GATED);
    assert_eq!((stats.queued, stats.dropped), (3, 1), "{stats:?}");
    gated.gate.add_permits(1);
    for (name, call) in calls {
        within(&name, call)
            .await
            .expect("the request task")
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
    let mut all = vec![server];
    all.extend(clients);
    stop(all).await;
}

/// A server "s" running the gated concern, with short lanes (8 frames
/// each, so that its answers back up quickly), and a rude peer: a bare
/// endpoint connected to it whose answers nobody reads.
async fn rude_peer(net: &MemNetwork) -> (Concerns, Endpoint, Connection) {
    let config = Config::new("concerns-test")
        .with_insecure_plaintext()
        .with_keepalive(None, None)
        .with_lane_capacity(8, 8, 8);
    let endpoint = Endpoint::new(config, net.transport("s"));
    endpoint.listen(&"mem://s".parse().unwrap()).await.unwrap();
    let peers = PeerManager::start(endpoint, PeersConfig::default()).unwrap();
    let server = Concerns::builder(peers)
        .only(vec![Arc::new(Gated::new())])
        .start()
        .await
        .unwrap();
    let rude = Endpoint::new(
        Config::new("concerns-test")
            .with_insecure_plaintext()
            .with_keepalive(None, None)
            .with_inbound_capacity(1),
        net.transport("rude"),
    );
    let conn = within("the rude dial", rude.connect(&"mem://s".parse().unwrap()))
        .await
        .unwrap();
    (server, rude, conn)
}

/// A plain node "polite" connected to "s".
async fn polite_peer(net: &MemNetwork) -> Concerns {
    let polite = node(
        net,
        "polite",
        &["mem://s"],
        ConcernsConfig::default(),
        vec![],
    )
    .await;
    polite.peers().wait_for_peers(1, 5 * S).await.unwrap();
    polite
}

/// A peer that floods requests while never reading its answers: once the
/// answers fill the stream and the lane, further error answers are dropped
/// and counted (not queued, not a task each), and the node keeps answering
/// a polite peer at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_its_answers_costs_only_counted_drops() {
    const UNKNOWN: u32 = 0x999;
    const FLOOD: u64 = 12_000;
    let net = MemNetwork::new();
    let (server, rude, conn) = rude_peer(&net).await;
    for n in 1..=FLOOD {
        let ask = Message::Concern(meshwork_concerns::wire::proto::Concern {
            command: UNKNOWN,
            request_id: n,
            kind: ConcernKind::Request as i32,
            ttl: 0,
            flags: 0,
            payload: Bytes::new(),
        });
        within("a rude request", conn.send(ask, Priority::Normal))
            .await
            .unwrap();
    }
    wait_until("the server to read every rude request", || {
        server.unknown_commands() == FLOOD
    })
    .await;
    let dropped = server.unsent_errors();
    assert!(
        dropped > 0 && dropped < FLOOD,
        "{dropped} of {FLOOD} error answers dropped"
    );

    // A polite peer is still answered at once.
    let polite = polite_peer(&net).await;
    let sid = server.peers().node_id().clone();
    let answer = within(
        "the polite request",
        polite.context(GATED).request(&sid, "hello", 5 * S),
    )
    .await
    .expect("the polite peer is answered");
    assert_eq!(text(&answer), "hello");

    drop(conn);
    rude.shutdown().await;
    stop(vec![server, polite]).await;
}

/// A peer that never reads its answers and sends every request on the
/// control lane: its answers wait for room on its full lane a second at
/// most (holding the concern's only slot meanwhile), and its control
/// requests do not take every turn, so another peer's normal requests are
/// still answered in time. Before, each such answer held the slot for the
/// send timeout (10 s) and control requests were always served first: the
/// polite peer's requests timed out, and it would have blamed (and, after
/// five, banned) the server.
#[tokio::test(start_paused = true)]
async fn a_peer_that_never_reads_cannot_starve_another_peers_requests() {
    let net = MemNetwork::new();
    let (server, rude, conn) = rude_peer(&net).await;
    let polite = polite_peer(&net).await;
    let sid = server.peers().node_id().clone();
    // The rude peer keeps the gated concern's queue full of control-lane
    // requests (echoed at once: 4 MiB of answers, far more than the
    // in-memory stream holds) while never reading the answers.
    let rude_sender = conn.handle();
    let kib = Bytes::from(vec![b'x'; 1024]);
    let flood = tokio::spawn(async move {
        for n in 1..=4_000u64 {
            let ask = Message::Concern(meshwork_concerns::wire::proto::Concern {
                command: GATED,
                request_id: n,
                kind: ConcernKind::Request as i32,
                ttl: 0,
                flags: 1, // the control lane
                payload: kib.clone(),
            });
            if rude_sender.send(ask, Priority::Normal).await.is_err() {
                break;
            }
        }
    });
    wait_until("the rude answers to back up", || {
        server.unsent_answers() > 0
    })
    .await;
    // Each waits for the slot behind at most a few rude answers' second.
    for i in 0..5 {
        let answer = polite
            .context(GATED)
            .request(&sid, format!("polite {i}"), 5 * S)
            .await
            .unwrap_or_else(|e| panic!("polite request {i}: {e:?}"));
        assert_eq!(text(&answer), format!("polite {i}"));
    }
    assert!(server.unsent_answers() > 0);
    flood.abort();
    drop(conn);
    rude.shutdown().await;
    stop(vec![server, polite]).await;
}

/// Large requests count against a byte budget per sender and per concern:
/// past it they are refused "overloaded" at once, however short the queues,
/// and the bytes are given back as requests end.
#[tokio::test(start_paused = true)]
async fn large_requests_are_refused_past_the_byte_budget() {
    const KIB64: usize = 64 * 1024;
    let net = MemNetwork::new();
    let gated = Gated::new();
    let (server, clients) = star(
        &net,
        ConcernsConfig::default().with_request_bytes(4 * KIB64, 8 * KIB64),
        vec![Arc::new(gated.clone())],
        3,
    )
    .await;
    let sid = server.peers().node_id().clone();
    let large = |tag: &str| format!("gate {tag} {}", "x".repeat(KIB64 - 6 - tag.len()));
    assert_eq!(large("c0-0").len(), KIB64);
    let mut admitted = Vec::new();
    let mut refused = 0;
    // Senders 0, 1 and 2 send 6, 2 and 3: sender 0 gets its share of 4 (one
    // running, three waiting), sender 1 both, sender 2 what is left of the
    // concern's 8.
    for (c, n) in [(0, 6), (1, 2), (2, 3)] {
        let ctx = clients[c].context(GATED);
        for k in 0..n {
            let call = spawn_request(&ctx, &sid, &large(&format!("c{c}-{k}")), Priority::Normal);
            // One at a time, so that the outcome is the budget's, not a race.
            let settled = |s: &ConcernStats| s.in_flight + s.queued + s.dropped as usize;
            let before = stats_of(&server, GATED);
            wait_until("the request to be taken or refused", || {
                settled(&stats_of(&server, GATED)) == settled(&before) + 1
            })
            .await;
            if stats_of(&server, GATED).dropped > before.dropped {
                let r = within("the refusal", call).await.unwrap();
                assert!(is_overloaded(&r), "{r:?}");
                refused += 1;
            } else {
                admitted.push(call);
            }
        }
    }
    assert_eq!((admitted.len(), refused), (8, 3));
    let stats = stats_of(&server, GATED);
    assert_eq!((stats.held_bytes, stats.dropped), (8 * KIB64, 3));
    // Small requests are not counted: the budget does not stop them.
    let small = spawn_request(&clients[0].context(GATED), &sid, "small", Priority::Normal);
    wait_until("the small request to be queued", || {
        stats_of(&server, GATED).queued == 8
    })
    .await;
    gated.gate.add_permits(100);
    for call in admitted {
        within("an admitted request", call).await.unwrap().unwrap();
    }
    assert_eq!(within("small", small).await.unwrap().unwrap(), "small");
    assert_eq!(stats_of(&server, GATED).held_bytes, 0);
    let mut all = vec![server];
    all.extend(clients);
    stop(all).await;
}

/// Sends `frame` from `from` to `to` on the normal lane.
async fn say(from: &PeerManager, to: &NodeId, frame: ConcernFrame) {
    from.send(to, Message::Concern(frame), Priority::Normal)
        .await
        .unwrap();
}

/// Answers that are not the asked node's own do not end a request: a
/// routed answer claiming to be from a neighbour asked directly (any member
/// can claim any origin), a direct answer from another neighbour, and one
/// for another command. Request ids are random, so such answers would have
/// to guess them; here the test hands the attacker the id.
#[tokio::test(start_paused = true)]
async fn only_the_asked_node_answers_a_request() {
    use meshwork_concerns::wire::proto::{Routed, route_message::Body};
    const ASK: u32 = 77;
    let net = MemNetwork::new();
    let h_peers = bare_peers(&net, "h", &[]).await;
    let h = Concerns::builder(h_peers).start().await.unwrap();
    let t = bare_peers(&net, "t", &["mem://h"]).await;
    let (tx, mut asked) = mpsc::unbounded_channel();
    t.set_inbound_handler(Arc::new(Recorder(tx))).unwrap();
    let m = bare_peers(&net, "m", &["mem://h"]).await;
    m.set_inbound_handler(Arc::new(Recorder(mpsc::unbounded_channel().0)))
        .unwrap();
    t.wait_for_peers(1, 5 * S).await.unwrap();
    m.wait_for_peers(1, 5 * S).await.unwrap();
    h.peers().wait_for_peers(2, 5 * S).await.unwrap();
    let (hid, tid) = (h.peers().node_id().clone(), t.node_id().clone());

    let ctx = h.context(ASK);
    let call = {
        let tid = tid.clone();
        tokio::spawn(async move { ctx.request(&tid, "question", 10 * S).await })
    };
    let first = within("the request at t", asked.recv()).await.unwrap();
    let answer = |command, payload: &'static str| ConcernFrame {
        command,
        request_id: first.request_id,
        kind: ConcernKind::Reply as i32,
        ttl: 0,
        flags: 0,
        payload: Bytes::from(payload),
    };
    // The attacker m: a routed reply "from t", and a direct one.
    let carrier = routing_frame(Body::Routed(Routed {
        origin: tid.as_bytes().clone(),
        target: hid.as_bytes().clone(),
        command: ASK,
        request_id: first.request_id,
        kind: ConcernKind::Reply as i32,
        payload: Bytes::from("spoofed routed"),
        ttl: 8,
        sent_at_ms: 0,
    }));
    say(&m, &hid, carrier).await;
    say(&m, &hid, answer(ASK, "spoofed direct")).await;
    // t itself, for another command, then the real answer.
    say(&t, &hid, answer(ASK + 1, "wrong command")).await;
    sleep(100 * MS).await;
    assert!(!call.is_finished(), "a spoofed answer ended the request");
    say(&t, &hid, answer(ASK, "the answer")).await;
    let got = within("the answer", call).await.unwrap().unwrap();
    assert_eq!(got, Bytes::from("the answer"));

    // Ids do not follow one another.
    let ctx = h.context(ASK);
    let tid2 = tid.clone();
    let again = tokio::spawn(async move { ctx.request(&tid2, "q", S).await });
    let second = within("the second request", asked.recv()).await.unwrap();
    assert_ne!(second.request_id, first.request_id.wrapping_add(1));
    let _ = within("the second request's end", again).await;
    h.shutdown().await;
    for p in [h.peers(), &t, &m] {
        p.shutdown().await;
    }
}

/// A request to a neighbour that has stopped reading waits for room on its
/// full lane no longer than the request's own timeout: it waited the
/// transport's send timeout (10 s) whatever the caller had asked for, so
/// an RPC call with a 1 s deadline could answer 10 s late.
#[tokio::test(start_paused = true)]
async fn a_request_waiting_for_room_ends_at_its_own_timeout() {
    let net = MemNetwork::new();
    let (server, rude, conn) = rude_peer(&net).await;
    let rude_id = rude.node_id().clone();
    wait_until("the rude peer to be a neighbour", || {
        server.peers().is_neighbour(&rude_id)
    })
    .await;
    // Requests the rude peer never reads, until the lane to it is full.
    let ctx = server.context(GATED);
    let big = Bytes::from(vec![b'x'; 64 * 1024]);
    let mut fillers = Vec::new();
    for _ in 0..256 {
        let (ctx, id, big) = (ctx.clone(), rude_id.clone(), big.clone());
        fillers.push(tokio::spawn(async move {
            let _ = ctx.request(&id, big, 120 * S).await;
        }));
    }
    sleep(S).await;
    let started = Instant::now();
    let r = ctx.request(&rude_id, "late?", S).await;
    let took = started.elapsed();
    assert!(
        matches!(r, Err(ConcernsError::Timeout(_))),
        "{r:?} after {took:?}"
    );
    assert!(took <= S + 100 * MS, "a 1 s request took {took:?}");
    for f in fillers {
        f.abort();
    }
    drop(conn);
    rude.shutdown().await;
    stop(vec![server]).await;
}
