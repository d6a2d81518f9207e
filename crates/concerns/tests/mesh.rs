//! The concerns layer on the in-memory network, on a paused clock.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use meshwork_concerns::peers::{PeerManager, PeersConfig};
use meshwork_concerns::transport::mem::MemNetwork;
use meshwork_concerns::transport::{Identity, Priority};
use meshwork_concerns::wire::NodeId;
use meshwork_concerns::wire::proto::ErrorCode;
use meshwork_concerns::wire::proto::{
    ConcernKind, Flooded, RouteFound, RouteMessage, RouteQuery, Routed, route_message,
};
use meshwork_concerns::{
    BoxError, Concern, Concerns, ConcernsConfig, ConcernsError, Context, FLOOD, ROUTING, Reply,
    Via, sign_flooded, sign_route_query,
};
use prost::Message as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::{Instant, sleep};

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);

mod support;
use support::{builtin_stat, flood_frame, listening, routing_frame, unix_ms};

/// Echoes, fails, panics or sleeps, by the first payload byte; counts what
/// it got from whom.
#[derive(Clone, Default)]
struct Probe {
    got: Arc<Mutex<HashMap<NodeId, Vec<Bytes>>>>,
}

const PROBE: u32 = 7;

#[async_trait]
impl Concern for Probe {
    fn command(&self) -> u32 {
        PROBE
    }
    fn name(&self) -> &str {
        "probe"
    }
    fn max_concurrency(&self) -> usize {
        1
    }
    async fn on_request(
        &self,
        _ctx: &Context,
        from: &NodeId,
        payload: Bytes,
    ) -> Result<Option<Reply>, BoxError> {
        self.got
            .lock()
            .unwrap()
            .entry(from.clone())
            .or_default()
            .push(payload.clone());
        match payload.first() {
            Some(b'e') => Err("asked to fail".into()),
            Some(b'p') => panic!("asked to panic"),
            Some(b's') => {
                sleep(10 * MS).await;
                Ok(Some(Reply::new(payload)))
            }
            Some(b'w') => {
                sleep(10 * S).await;
                Ok(Some(Reply::new(payload)))
            }
            // A reply larger than any frame (16 MiB by default).
            Some(b'B') => Ok(Some(Reply::new(vec![0u8; 17 << 20]))),
            _ => Ok(Some(Reply::new(payload))),
        }
    }
}

impl Probe {
    fn count_from(&self, from: &NodeId) -> usize {
        self.got.lock().unwrap().get(from).map_or(0, |v| v.len())
    }
    fn count_payload(&self, what: &[u8]) -> usize {
        self.got
            .lock()
            .unwrap()
            .values()
            .flatten()
            .filter(|p| &p[..] == what)
            .count()
    }
    fn total(&self) -> usize {
        self.got.lock().unwrap().values().map(|v| v.len()).sum()
    }
}

struct TestNode {
    /// Its host on the in-memory network.
    name: String,
    concerns: Concerns,
    probe: Probe,
}

impl TestNode {
    fn id(&self) -> &NodeId {
        self.concerns.peers().node_id()
    }
    fn ctx(&self) -> Context {
        self.concerns.context(PROBE)
    }
}

async fn start(net: &MemNetwork, name: &str, peers: PeersConfig) -> TestNode {
    start_with(net, name, peers, ConcernsConfig::default()).await
}

async fn start_with(
    net: &MemNetwork,
    name: &str,
    peers: PeersConfig,
    config: ConcernsConfig,
) -> TestNode {
    let peers = PeerManager::start(
        listening(net, name).await,
        peers
            .with_heartbeat(S, 5 * S, 10 * S)
            .with_backoff(100 * MS, 2 * S)
            .with_discovery(2 * S, 16),
    )
    .unwrap();
    let probe = Probe::default();
    let concerns = Concerns::builder(peers)
        .config(config)
        .concern(probe.clone())
        .start()
        .await
        .unwrap();
    TestNode {
        name: name.to_owned(),
        concerns,
        probe,
    }
}

fn seeded(addrs: &[String]) -> PeersConfig {
    PeersConfig::default().with_seeds(addrs.iter().map(|a| a.parse().unwrap()))
}

/// `name`, seeded with `seeds`, holding `min` to `max` peers.
async fn start_seeded(
    net: &MemNetwork,
    name: &str,
    seeds: &[&str],
    min: usize,
    max: usize,
) -> TestNode {
    let seeds: Vec<String> = seeds.iter().map(|s| format!("mem://{s}")).collect();
    let cfg = seeded(&seeds).with_min_peers(min).with_max_peers(max);
    start(net, name, cfg).await
}

/// `from`'s request to `to` (10 s timeout), running in its own task.
fn spawn_request(
    from: &TestNode,
    to: &TestNode,
    payload: &'static str,
) -> tokio::task::JoinHandle<Result<Bytes, ConcernsError>> {
    let ctx = from.ctx();
    let target = to.id().clone();
    tokio::spawn(async move { ctx.request_to(&target, payload, 10 * S).await })
}

/// `from` asks `to` for "wait" (its handler answers after 10 s; 30 s
/// timeout), `routed` or directly, in a task of its own; returns once `to`
/// is handling it.
async fn asked_to_wait(
    from: &TestNode,
    to: &TestNode,
    routed: bool,
) -> tokio::task::JoinHandle<Result<Bytes, ConcernsError>> {
    let ctx = from.ctx();
    let target = to.id().clone();
    let asked = tokio::spawn(async move {
        if routed {
            ctx.request_to(&target, "wait", 30 * S).await
        } else {
            ctx.request(&target, "wait", 30 * S).await
        }
    });
    while to.probe.count_payload(b"wait") == 0 {
        sleep(MS).await;
    }
    asked
}

/// Waits (30 s of simulated time at most) until each pair is linked.
async fn wait_linked(pairs: &[(&TestNode, &TestNode)], what: &str) {
    let deadline = Instant::now() + 30 * S;
    while !pairs.iter().all(|(a, b)| linked(a, b)) {
        assert!(Instant::now() < deadline, "{what} did not form");
        sleep(100 * MS).await;
    }
}

async fn stop(nodes: Vec<TestNode>) {
    for n in &nodes {
        n.concerns.shutdown().await;
    }
    futures_util::future::join_all(nodes.iter().map(|n| n.concerns.peers().shutdown())).await;
}

async fn pair(net: &MemNetwork) -> (TestNode, TestNode) {
    let a = start(net, "a", PeersConfig::default()).await;
    let b = start(net, "b", seeded(&["mem://a".into()])).await;
    b.concerns.peers().wait_for_peers(1, 5 * S).await.unwrap();
    a.concerns.peers().wait_for_peers(1, 5 * S).await.unwrap();
    (a, b)
}

#[tokio::test(start_paused = true)]
async fn request_reply_and_every_kind_of_failure() {
    let net = MemNetwork::new();
    let (a, b) = pair(&net).await;
    let ctx = a.ctx();
    assert_eq!(
        ctx.request(b.id(), "hello", S).await.unwrap(),
        Bytes::from("hello")
    );

    let err = ctx.request(b.id(), "error", S).await.unwrap_err();
    assert!(
        matches!(err, ConcernsError::Remote { code: ErrorCode::HandlerFailed, ref message } if message.contains("asked to fail")),
        "{err:?}"
    );

    let err = ctx.request(b.id(), "panic", S).await.unwrap_err();
    assert!(
        matches!(
            err,
            ConcernsError::Remote {
                code: ErrorCode::HandlerFailed,
                ..
            }
        ),
        "{err:?}"
    );
    // The node is still fine.
    assert_eq!(
        ctx.request(b.id(), "again", S).await.unwrap(),
        Bytes::from("again")
    );
    let stats = b
        .concerns
        .stats()
        .into_iter()
        .find(|s| s.command == PROBE)
        .unwrap();
    assert_eq!(
        (stats.requests, stats.replies, stats.errors, stats.panics),
        (4, 2, 2, 1)
    );

    let unknown = a.concerns.context(999);
    let err = unknown.request(b.id(), "?", S).await.unwrap_err();
    assert!(
        matches!(
            err,
            ConcernsError::Remote {
                code: ErrorCode::UnknownCommand,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(b.concerns.unknown_commands(), 1);

    let stranger = NodeId::from_bytes(vec![1; 32]).unwrap();
    assert!(matches!(
        ctx.request(&stranger, "x", S).await,
        Err(ConcernsError::NotConnected(_))
    ));

    // A slow handler past a deadline for its work: a timeout, but not the
    // peer's fault.
    let err = ctx
        .request_with_deadline(b.id(), "slow", 5 * MS, Priority::Normal)
        .await
        .unwrap_err();
    assert!(matches!(err, ConcernsError::Timeout(_)), "{err:?}");
    assert_eq!(a.concerns.peers().by_id(b.id()).unwrap().timeouts, 0);

    // A silent peer: the request times out, and the peer manager counts it.
    net.partition(&["a"], &["b"]);
    let err = ctx.request(b.id(), "lost", S).await.unwrap_err();
    assert!(matches!(err, ConcernsError::Timeout(_)), "{err:?}");
    assert_eq!(a.concerns.peers().by_id(b.id()).unwrap().timeouts, 1);
    net.heal();
    stop(vec![a, b]).await;
}

#[tokio::test(start_paused = true)]
async fn one_command_one_concern_and_late_additions_start_at_once() {
    struct Late(Arc<AtomicU64>);
    #[async_trait]
    impl Concern for Late {
        fn command(&self) -> u32 {
            42
        }
        fn tick_interval(&self) -> Option<Duration> {
            Some(100 * MS)
        }
        async fn on_start(&self, _ctx: &Context) {
            self.0.fetch_add(1000, Ordering::SeqCst);
        }
        async fn tick(&self, _ctx: &Context) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        async fn on_request(
            &self,
            _: &Context,
            _: &NodeId,
            p: Bytes,
        ) -> Result<Option<Reply>, BoxError> {
            Ok(Some(Reply::new(p)))
        }
    }
    let net = MemNetwork::new();
    let (a, b) = pair(&net).await;
    let err = b.concerns.add(Probe::default()).await.unwrap_err();
    assert!(matches!(err, ConcernsError::DuplicateCommand(PROBE)));
    let counter = Arc::new(AtomicU64::new(0));
    b.concerns.add(Late(counter.clone())).await.unwrap();
    assert_eq!(counter.load(Ordering::SeqCst), 1000, "started at once");
    sleep(S + 50 * MS).await;
    let ticks = counter.load(Ordering::SeqCst) - 1000;
    assert!((9..=11).contains(&ticks), "{ticks} ticks in 1 s at 100 ms");
    assert_eq!(
        a.concerns
            .context(42)
            .request(b.id(), "x", S)
            .await
            .unwrap(),
        Bytes::from("x")
    );
    stop(vec![a, b]).await;
}

/// `n` nodes, each seeded with up to 2 random earlier nodes, 2..4 peers:
/// a random sparse mesh.
async fn random_mesh(net: &MemNetwork, n: usize, seed: u64) -> Vec<TestNode> {
    random_mesh_max(net, n, 4, seed).await
}

/// A random mesh of `n` nodes holding at most `max` peers each, in one
/// piece. Node ids are random, so a seed does not fix the mesh, and with few
/// peers per node it can form in pieces (each piece full, nobody learning
/// of the other); these tests need one piece, so a split mesh is built
/// again from the next seed (printed).
async fn random_mesh_max(net: &MemNetwork, n: usize, max: usize, seed: u64) -> Vec<TestNode> {
    for attempt in 0..5u64 {
        let seed = seed + 1000 * attempt;
        let Some(nodes) = try_random_mesh(net, n, max, seed, &format!("r{attempt}-")).await else {
            continue;
        };
        let deadline = Instant::now() + 10 * S;
        loop {
            if distances(&nodes).iter().flatten().all(Option::is_some) {
                return nodes;
            }
            if Instant::now() >= deadline {
                break;
            }
            sleep(100 * MS).await;
        }
        eprintln!("seed {seed}: the mesh formed in pieces; building another");
        stop(nodes).await;
    }
    panic!("no mesh in one piece from seed {seed} and the four after it");
}

/// The nodes `{prefix}0` to `{prefix}{n-1}`, each seeded with two earlier
/// ones picked by `seed`, once every node has 2 peers; none (the nodes
/// stopped) if one is still short after 60 s. With 2 slots of 4 kept for
/// outbound links, the last joiners can find every node full (each node's
/// two inbound slots taken): rare (1 run in about 70 under load), and the
/// peers layer's to handle, not what these tests are about.
async fn try_random_mesh(
    net: &MemNetwork,
    n: usize,
    max: usize,
    seed: u64,
    prefix: &str,
) -> Option<Vec<TestNode>> {
    eprintln!("random mesh of {n} nodes, seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut nodes = Vec::new();
    for i in 0..n {
        let mut seeds = Vec::new();
        for _ in 0..2.min(i) {
            seeds.push(format!("mem://{prefix}{}", rng.random_range(0..i)));
        }
        let cfg = seeded(&seeds)
            .with_min_peers(2)
            .with_max_peers(max)
            .with_rng_seed(seed + i as u64);
        nodes.push(start(net, &format!("{prefix}{i}"), cfg).await);
    }
    let deadline = Instant::now() + 60 * S;
    while nodes
        .iter()
        .any(|n| n.concerns.peers().stats().connected < 2)
    {
        if Instant::now() >= deadline {
            eprintln!("seed {seed}: a node stayed below 2 peers for 60 s; building another");
            stop(nodes).await;
            return None;
        }
        sleep(100 * MS).await;
    }
    Some(nodes)
}

#[tokio::test(start_paused = true)]
async fn a_broadcast_reaches_every_node_of_a_sparse_mesh_exactly_once() {
    for seed in [1u64, 2, 3] {
        let net = MemNetwork::new();
        let nodes = random_mesh(&net, 60, seed).await;
        let origin = nodes[17].id().clone();
        for k in 0..3 {
            nodes[17]
                .ctx()
                .broadcast(format!("news {k}"), 32)
                .await
                .unwrap();
        }
        sleep(2 * S).await;
        for (i, n) in nodes.iter().enumerate() {
            let expected = if i == 17 { 0 } else { 3 };
            assert_eq!(
                n.probe.count_from(&origin),
                expected,
                "node {i}, seed {seed}"
            );
            assert_eq!(n.probe.total(), expected, "node {i}, seed {seed}");
        }
        let dup: u64 = nodes
            .iter()
            .flat_map(|n| n.concerns.builtin_stats())
            .filter(|(c, k, _)| *c == "flood" && *k == "duplicates")
            .map(|(_, _, v)| v)
            .sum();
        eprintln!("seed {seed}: {dup} duplicate copies absorbed");
        stop(nodes).await;
    }
}

/// Nodes in a line: each knows only the previous one and holds 2 peers.
/// Whether `a` has `b` as a linked peer.
fn linked(a: &TestNode, b: &TestNode) -> bool {
    a.concerns
        .peers()
        .by_id(b.id())
        .is_some_and(|p| p.state.is_linked())
}

async fn line(net: &MemNetwork, n: usize) -> Vec<TestNode> {
    line_with(net, n, ConcernsConfig::default).await
}

async fn line_with(
    net: &MemNetwork,
    n: usize,
    config: impl Fn() -> ConcernsConfig,
) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for i in 0..n {
        let seeds = if i == 0 {
            vec![]
        } else {
            vec![format!("mem://l{}", i - 1)]
        };
        let cfg = seeded(&seeds).with_min_peers(1).with_max_peers(2);
        nodes.push(start_with(net, &format!("l{i}"), cfg, config()).await);
    }
    let deadline = Instant::now() + 30 * S;
    while nodes[1..n - 1]
        .iter()
        .any(|n| n.concerns.peers().stats().connected < 2)
    {
        assert!(Instant::now() < deadline, "line did not form");
        sleep(100 * MS).await;
    }
    nodes
}

/// Payloads larger than any frame are refused before anything is sent,
/// with an error that says so, whichever way they would go; a handler's
/// reply that large reaches the asker at once as an error, not as a
/// timeout (a user walkthrough waited out the whole timeout for such a
/// reply, and a broadcast that large said "no neighbour").
#[tokio::test(start_paused = true)]
async fn payloads_larger_than_a_frame_are_refused_at_once() {
    let net = MemNetwork::new();
    let nodes = line(&net, 3).await;
    let (first, middle, last) = (&nodes[0], &nodes[1], &nodes[2]);
    let max = first.concerns.max_payload();
    assert!(max > 15 << 20 && max < 16 << 20, "{max}");
    let huge = || Bytes::from(vec![b'x'; max + 1]);
    let too_large = |e: Option<ConcernsError>| matches!(e, Some(ConcernsError::PayloadTooLarge { len, max: m }) if len == max + 1 && m == max);
    let ctx = first.ctx();
    assert!(too_large(
        ctx.request(middle.id(), huge(), 5 * S).await.err()
    ));
    assert!(too_large(ctx.send(middle.id(), huge()).await.err()));
    assert!(too_large(
        ctx.request_to(last.id(), huge(), 5 * S).await.err()
    ));
    assert!(too_large(ctx.send_to(last.id(), huge()).await.err()));
    assert!(too_large(ctx.broadcast(huge(), 4).await.err()));
    // Just fits: goes through.
    let fits = Bytes::from(vec![b'x'; max]);
    assert_eq!(
        ctx.request(middle.id(), fits.clone(), 5 * S).await.unwrap(),
        fits
    );
    // A handler's reply too large to send, directly and routed.
    for (to, routed) in [(middle, false), (last, true)] {
        let started = Instant::now();
        let r = if routed {
            ctx.request_to(to.id(), "B", 5 * S).await
        } else {
            ctx.request(to.id(), "B", 5 * S).await
        };
        assert!(
            matches!(&r, Err(ConcernsError::Remote { code: ErrorCode::HandlerFailed, message }) if message.contains("larger than")),
            "{r:?}"
        );
        assert!(started.elapsed() < S, "{:?}", started.elapsed());
    }
    stop(nodes).await;
}

/// `Duration::MAX` as a timeout means "no timeout to speak of", not a
/// panic ("overflow when adding duration to instant", found by a user
/// walkthrough), for direct and routed requests alike. And a request
/// routed to the node itself is refused at once.
#[tokio::test(start_paused = true)]
async fn a_timeout_of_duration_max_is_no_panic() {
    let net = MemNetwork::new();
    let nodes = line(&net, 3).await;
    let ctx = nodes[0].ctx();
    let r = ctx.request(nodes[1].id(), "x", Duration::MAX).await;
    assert_eq!(r.unwrap(), Bytes::from("x"));
    let r = ctx.request_to(nodes[2].id(), "y", Duration::MAX).await;
    assert_eq!(r.unwrap(), Bytes::from("y"));
    // Routed to itself: said at once, not searched for (it was
    // `Unreachable` after the search).
    let me = nodes[0].id().clone();
    let r = ctx.request_to(&me, "z", 5 * S).await;
    assert!(matches!(r, Err(ConcernsError::InvalidArgument(_))), "{r:?}");
    let r = ctx.send_to(&me, "z").await;
    assert!(matches!(r, Err(ConcernsError::InvalidArgument(_))), "{r:?}");
    stop(nodes).await;
}

/// A routed request to a node that was a neighbour fails as soon as that
/// neighbour leaves, as a direct one does, instead of waiting out its
/// timeout (a user walkthrough killed the target mid-request and waited
/// 8 s).
#[tokio::test(start_paused = true)]
async fn a_routed_request_to_a_neighbour_that_leaves_fails_at_once() {
    let net = MemNetwork::new();
    let (a, b) = pair(&net).await;
    let asked = asked_to_wait(&a, &b, true).await;
    let left = Instant::now();
    stop(vec![b]).await;
    let r = asked.await.unwrap();
    assert!(matches!(r, Err(ConcernsError::ConnectionLost(_))), "{r:?}");
    assert!(left.elapsed() < 2 * S, "{:?}", left.elapsed());
    stop(vec![a]).await;
}

/// Shutting down does not wait for handlers still running (one sleeping
/// 10 s held a user's shutdown for 20 s): they are dropped, as RPC calls
/// are. Subscriptions end with it: `recv` gives `None` (it waited for ever
/// while any handle of the node was alive), and subscribing afterwards is
/// refused.
#[tokio::test(start_paused = true)]
async fn shutdown_drops_running_handlers_and_ends_subscriptions() {
    let net = MemNetwork::new();
    let (a, b) = pair(&net).await;
    let mut sub = b.concerns.subscribe("news").unwrap();
    let asked = asked_to_wait(&a, &b, false).await;
    let started = Instant::now();
    b.concerns.shutdown().await;
    assert!(started.elapsed() < S, "{:?}", started.elapsed());
    let next = tokio::time::timeout(S, sub.recv()).await;
    assert!(matches!(next, Ok(None)), "{next:?}");
    assert!(matches!(
        b.concerns.subscribe("news"),
        Err(ConcernsError::Shutdown)
    ));
    // Nor is a concern added: it would start and never stop.
    struct Other;
    #[async_trait]
    impl Concern for Other {
        fn command(&self) -> u32 {
            44
        }
        async fn on_request(
            &self,
            _: &Context,
            _: &NodeId,
            p: Bytes,
        ) -> Result<Option<Reply>, BoxError> {
            Ok(Some(Reply::new(p)))
        }
    }
    assert!(matches!(
        b.concerns.add(Other).await,
        Err(ConcernsError::Shutdown)
    ));
    b.concerns.peers().shutdown().await;
    let r = asked.await.unwrap();
    assert!(r.is_err(), "{r:?}");
    stop(vec![a]).await;
}

/// A concern takes requests only the ways it accepts (`Concern::accepts`):
/// one that takes direct requests only hears nothing of a broadcast (the
/// node still relays it), and a routed request to it gets a `BAD_REQUEST`
/// error at once; both counted as dropped. The probe beside it, taking
/// every way, gets all three.
#[tokio::test(start_paused = true)]
async fn a_concern_gets_requests_only_the_ways_it_accepts() {
    /// Counts what it gets; takes direct requests only.
    struct DirectOnly(Arc<AtomicU64>);
    #[async_trait]
    impl Concern for DirectOnly {
        fn command(&self) -> u32 {
            43
        }
        fn accepts(&self, via: Via) -> bool {
            via == Via::Direct
        }
        async fn on_request(
            &self,
            _: &Context,
            _: &NodeId,
            p: Bytes,
        ) -> Result<Option<Reply>, BoxError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(Some(Reply::new(p)))
        }
    }
    let net = MemNetwork::new();
    let nodes = line(&net, 3).await;
    let (first, middle, last) = (&nodes[0], &nodes[1], &nodes[2]);
    let got = Arc::new(AtomicU64::new(0));
    for n in [middle, last] {
        n.concerns.add(DirectOnly(got.clone())).await.unwrap();
    }
    let strict = first.concerns.context(43);
    // Direct: taken.
    assert_eq!(
        strict.request(middle.id(), "direct", S).await.unwrap(),
        Bytes::from("direct")
    );
    assert_eq!(got.load(Ordering::SeqCst), 1);
    // Routed to the far end: refused, with an error that says why.
    let started = Instant::now();
    let err = strict
        .request_to(last.id(), "routed", 5 * S)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConcernsError::Remote { code: ErrorCode::BadRequest, ref message } if message.contains("routed")),
        "{err:?}"
    );
    assert!(started.elapsed() < S, "{:?}", started.elapsed());
    // Flooded: heard by nobody, passed on all the same.
    strict.broadcast("flooded", 4).await.unwrap();
    first.ctx().broadcast("to the probes", 4).await.unwrap();
    let deadline = Instant::now() + 5 * S;
    while last.probe.count_payload(b"to the probes") == 0 {
        assert!(
            Instant::now() < deadline,
            "the probe's broadcast did not arrive"
        );
        sleep(10 * MS).await;
    }
    sleep(S).await;
    assert_eq!(got.load(Ordering::SeqCst), 1, "only the direct request");
    let dropped = |n: &TestNode| {
        n.concerns
            .stats()
            .into_iter()
            .find(|c| c.command == 43)
            .map(|c| c.dropped)
    };
    assert_eq!((dropped(middle), dropped(last)), (Some(1), Some(2)));
    // The probe takes every way.
    assert_eq!(
        first
            .ctx()
            .request_to(last.id(), "routed", 5 * S)
            .await
            .unwrap(),
        Bytes::from("routed")
    );
    stop(nodes).await;
}

/// What a hostile neighbour can put in a Flood frame of its own is
/// contained: a TTL above the receiver's own is cut to it, and a flood
/// carrying another flood (which each node would unwrap and send on again,
/// one layer at a time) is relayed as one message but its cargo is
/// delivered nowhere.
#[tokio::test(start_paused = true)]
async fn forged_flood_frames_are_contained() {
    let net = MemNetwork::new();
    let nodes = line_with(&net, 4, || ConcernsConfig::default().with_flood_ttl(2)).await;
    let liar = nodes[0].concerns.context(FLOOD);
    let me = identity(&nodes[0]);
    let to = nodes[1].id().clone();
    let got = |i: usize, what: &[u8]| nodes[i].probe.count_payload(what);

    // A TTL of u32::MAX: l1 and l2 deliver (two hops, l2 relays no more).
    let far = flood_frame(me, 1, PROBE, &b"far"[..], u32::MAX);
    liar.send(&to, far.encode_to_vec()).await.unwrap();
    let deadline = Instant::now() + 5 * S;
    while got(2, b"far") == 0 {
        assert!(
            Instant::now() < deadline,
            "the forged flood never reached l2"
        );
        sleep(10 * MS).await;
    }
    sleep(S).await;
    assert_eq!((got(1, b"far"), got(2, b"far"), got(3, b"far")), (1, 1, 0));

    // A flood inside a flood: relayed once, its cargo delivered nowhere.
    let inner = flood_frame(me, 3, PROBE, &b"nested"[..], 2);
    let outer = flood_frame(me, 2, FLOOD, inner.encode_to_vec(), 2);
    let errors_before = flood_errors(&nodes[2]);
    liar.send(&to, outer.encode_to_vec()).await.unwrap();
    let deadline = Instant::now() + 5 * S;
    while flood_errors(&nodes[2]) == errors_before {
        assert!(Instant::now() < deadline, "l2 never saw the nested flood");
        sleep(10 * MS).await;
    }
    sleep(S).await;
    assert!((0..4).all(|i| got(i, b"nested") == 0));
    stop(nodes).await;
}

fn identity(node: &TestNode) -> &Identity {
    node.concerns.peers().endpoint().config().identity()
}

/// Flood counter `name` of `node`.
fn flood_stat(node: &TestNode, name: &str) -> u64 {
    builtin_stat(&node.concerns, "flood", name)
}

/// Floods travel through other nodes, yet no member can broadcast in
/// another's name or alter what it relays: a flood not signed by its
/// origin is delivered nowhere, and the neighbour that handed it over is
/// banned (every node checks before it relays, so that neighbour made it
/// up). A flood stamped outside the clock window is dropped without
/// blame, as the bringer's clock may be the one that is off.
#[tokio::test(start_paused = true)]
async fn a_flood_in_another_nodes_name_is_dropped_and_its_bringer_banned() {
    let net = MemNetwork::new();
    let nodes = line(&net, 4).await;
    let (liar, victim) = (&nodes[0], &nodes[3]);
    let to = nodes[1].id().clone();
    let send = |f: Flooded| {
        let ctx = liar.concerns.context(FLOOD);
        let to = to.clone();
        async move { ctx.send(&to, f.encode_to_vec()).await }
    };
    let got = |what: &[u8]| {
        (0..4)
            .map(|i| nodes[i].probe.count_payload(what))
            .sum::<usize>()
    };

    // Stale: signed by the liar itself, stamped 10 minutes ago.
    let mut old = flood_frame(identity(liar), 7, PROBE, &b"old"[..], 4);
    old.sent_at_ms -= 600_000;
    sign_flooded(identity(liar), &mut old);
    send(old).await.unwrap();
    let deadline = Instant::now() + 5 * S;
    while flood_stat(&nodes[1], "stale") == 0 {
        assert!(Instant::now() < deadline, "the stale flood was not counted");
        sleep(10 * MS).await;
    }
    assert!(nodes[1].concerns.peers().is_neighbour(liar.id()));

    // The victim's own broadcast, altered by the liar on the way.
    let mut altered = flood_frame(identity(victim), 8, PROBE, &b"pay 1"[..], 4);
    altered.payload = Bytes::from_static(b"pay 9");
    // And one in the victim's name, signed by the liar; and one unsigned.
    let mut posing = flood_frame(identity(liar), 9, PROBE, &b"posing"[..], 4);
    posing.origin = victim.id().as_bytes().clone();
    let mut unsigned = flood_frame(identity(victim), 10, PROBE, &b"unsigned"[..], 4);
    unsigned.signature = Bytes::new();
    for f in [altered, posing, unsigned] {
        // The first gets the liar banned: the rest may find no connection.
        let _ = send(f).await;
    }
    let deadline = Instant::now() + 5 * S;
    while nodes[1].concerns.peers().is_neighbour(liar.id()) {
        assert!(Instant::now() < deadline, "the liar was not banned");
        sleep(10 * MS).await;
    }
    sleep(S).await;
    // Those already on their way when the ban came are dropped unread (not
    // checked, not logged: audit round five).
    assert_eq!(flood_stat(&nodes[1], "forged"), 1);
    for what in [&b"old"[..], b"pay 1", b"pay 9", b"posing", b"unsigned"] {
        assert_eq!(
            got(what),
            0,
            "{:?} was delivered",
            String::from_utf8_lossy(what)
        );
    }
    // Honest floods still flow, the victim's included.
    victim.ctx().broadcast("still here", 4).await.unwrap();
    let deadline = Instant::now() + 5 * S;
    while nodes[1].probe.count_payload(b"still here") == 0 {
        assert!(Instant::now() < deadline, "an honest broadcast was lost");
        sleep(10 * MS).await;
    }
    stop(nodes).await;
}

/// A route query with a forged TTL above the maximum hop count is taken
/// as if it had the maximum: each further node counts the hops it really
/// travelled, instead of every node believing the origin one hop away. The
/// first node counts 2: the origin is not the neighbour that handed the
/// query over, whatever the TTL says. (The origin is an identity of the
/// test's, not a node: the query is signed and stamped, as every node
/// checks.) A copy stamped outside the window (a replay) teaches nothing.
#[tokio::test(start_paused = true)]
async fn a_forged_route_query_ttl_is_capped() {
    let net = MemNetwork::new();
    let nodes = line(&net, 4).await;
    let far = Identity::generate();
    let fake = far.node_id().clone();
    let nowhere = NodeId::from_bytes(vec![8; 32]).unwrap();
    let query = |query_id, sent_at_ms| {
        let mut q = RouteQuery {
            query_id,
            origin: fake.as_bytes().clone(),
            target: nowhere.as_bytes().clone(),
            ttl: u32::MAX,
            sent_at_ms,
            signature: Bytes::new(),
        };
        sign_route_query(&far, &mut q);
        RouteMessage {
            body: Some(route_message::Body::Query(q)),
        }
    };
    let hops = |i: usize| {
        nodes[i]
            .concerns
            .routes()
            .into_iter()
            .find(|r| r.target == fake)
            .map(|r| r.hops)
    };
    let ctx = nodes[0].concerns.context(ROUTING);
    let send = |q: RouteMessage| ctx.send(nodes[1].id(), q.encode_to_vec());
    send(query(1, unix_ms() - 61_000)).await.unwrap();
    sleep(100 * MS).await;
    assert_eq!(hops(1), None);
    assert_eq!(
        builtin_stat(&nodes[1].concerns, "routing", "stale_queries"),
        1
    );

    send(query(2, unix_ms())).await.unwrap();
    let deadline = Instant::now() + 5 * S;
    while hops(3).is_none() {
        assert!(Instant::now() < deadline, "the query never reached l3");
        sleep(10 * MS).await;
    }
    assert_eq!((hops(1), hops(2), hops(3)), (Some(2), Some(2), Some(3)));
    stop(nodes).await;
}

/// Requests the flood concern of `node` failed (it refuses what it cannot
/// deliver).
fn flood_errors(node: &TestNode) -> u64 {
    node.concerns
        .stats()
        .into_iter()
        .find(|s| s.command == FLOOD)
        .map_or(0, |s| s.errors)
}

#[tokio::test(start_paused = true)]
async fn a_request_routed_across_eight_hops_and_its_reply_come_back() {
    let net = MemNetwork::new();
    let nodes = line(&net, 9).await;
    let (first, last) = (&nodes[0], &nodes[8]);
    assert!(!linked(first, last), "the ends are not neighbours");
    let reply = first
        .ctx()
        .request_to(last.id(), "far", 5 * S)
        .await
        .unwrap();
    assert_eq!(reply, Bytes::from("far"));
    assert_eq!(last.probe.count_from(first.id()), 1);
    let routes = first.concerns.routes();
    let route = routes
        .iter()
        .find(|r| r.target == *last.id())
        .expect("a route to the last node");
    assert_eq!(&route.next_hop, nodes[1].id());
    assert_eq!(route.hops, 8);
    // One-way routed messages too, and in the other direction.
    last.ctx().send_to(first.id(), "back").await.unwrap();
    sleep(S).await;
    assert_eq!(first.probe.count_from(last.id()), 1);

    // Cut the line: the far end is unreachable, reported within the timeout.
    net.partition(&["l0", "l1", "l2", "l3"], &["l4", "l5", "l6", "l7", "l8"]);
    sleep(12 * S).await;
    let started = Instant::now();
    let err = first
        .ctx()
        .request_to(last.id(), "cut", 10 * S)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConcernsError::Unreachable(_) | ConcernsError::RouteLost(_)
        ),
        "{err:?}"
    );
    assert!(started.elapsed() <= 4 * S, "{:?}", started.elapsed());
    net.heal();
    stop(nodes).await;
}

/// A routed request outlives the relay it went through: the answer comes
/// back by whatever route the far end finds when it is ready (here a direct
/// link the two ends form once the relay is gone), within the request's
/// timeout. A request is not failed when its first hop leaves, unlike a
/// direct one when its peer does: the answer may still come another way.
#[tokio::test(start_paused = true)]
async fn a_routed_request_outlives_its_relay_when_another_path_forms() {
    let net = MemNetwork::new();
    let mut nodes = line(&net, 3).await;
    let relay = nodes.remove(1);
    let (first, last) = (&nodes[0], &nodes[1]);
    let asked = asked_to_wait(first, last, true).await;
    assert!(!linked(first, last), "the ends are not neighbours");
    stop(vec![relay]).await;
    let reply = asked.await.unwrap().unwrap();
    assert_eq!(reply, Bytes::from("wait"));
    assert!(first.concerns.peers().is_neighbour(last.id()));
    assert_eq!(last.probe.count_payload(b"wait"), 1, "handled once");
    stop(nodes).await;
}

/// A routed request whose own timeout ends during the route search must
/// not leave the search behind: a later request to the same target, once
/// it is reachable, searches afresh and gets through.
#[tokio::test(start_paused = true)]
async fn a_search_cut_short_by_its_callers_timeout_does_not_block_later_ones() {
    let net = MemNetwork::new();
    let mut nodes = line(&net, 3).await;
    // The link l1-l2 stalls (an in-memory partition holds the bytes in
    // flight): the search's query waits there, and nobody answers it
    // before the caller gives up. The far end joins l2 meanwhile.
    net.partition(&["l0", "l1"], &["l2", "l3"]);
    let cfg = seeded(&["mem://l2".into()])
        .with_min_peers(1)
        .with_max_peers(2);
    nodes.push(start(&net, "l3", cfg).await);
    let (first, last) = (&nodes[0], &nodes[3]);
    let err = first
        .ctx()
        .request_to(last.id(), "early", 100 * MS)
        .await
        .unwrap_err();
    // l1 waits for l2's answer: the search is not exhausted.
    assert!(matches!(err, ConcernsError::Timeout(_)), "{err:?}");
    assert_eq!(builtin_stat(&first.concerns, "routing", "exhausted"), 0);
    net.heal();
    let deadline = Instant::now() + 30 * S;
    while last.concerns.peers().stats().connected < 1 {
        assert!(Instant::now() < deadline, "the far end did not join");
        sleep(100 * MS).await;
    }
    // Before the fix this waited out a search nobody ran and failed.
    let started = Instant::now();
    let reply = first
        .ctx()
        .request_to(last.id(), "later", 5 * S)
        .await
        .unwrap();
    assert_eq!(reply, Bytes::from("later"));
    assert!(started.elapsed() < S, "{:?}", started.elapsed());
    stop(nodes).await;
}

/// A search for a node that is not in the mesh ends as soon as every way
/// has been tried, not after the search timeout: each node answers "not
/// through me" for copies of the query it had seen already and, once every
/// neighbour it passed the query to has answered so, for its own.
#[tokio::test(start_paused = true)]
async fn a_search_for_a_node_nobody_can_reach_ends_once_every_way_is_tried() {
    for seed in [1u64, 2] {
        let net = MemNetwork::new();
        let nodes = random_mesh(&net, 50, seed).await;
        let gone = Identity::generate().node_id().clone();
        let started = Instant::now();
        let err = nodes[7]
            .ctx()
            .request_to(&gone, "anyone?", 10 * S)
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(matches!(err, ConcernsError::Unreachable(_)), "{err:?}");
        // The search timeout is 3 s; node 7's neighbourhood may have changed
        // less than a second ago (the settling time).
        assert!(took <= S + 100 * MS, "{took:?} (seed {seed})");
        let stat = |n: &TestNode, k: &str| builtin_stat(&n.concerns, "routing", k);
        assert_eq!(
            (stat(&nodes[7], "searches"), stat(&nodes[7], "exhausted")),
            (1, 1),
            "seed {seed}"
        );
        eprintln!("seed {seed}: unreachable after {took:?}");
        // A node that is there is still found, from the same node.
        let far = nodes.len() - 1;
        let reply = nodes[7]
            .ctx()
            .request_to(nodes[far].id(), "here?", 10 * S)
            .await
            .unwrap_or_else(|e| panic!("node {far} (seed {seed}): {e}"));
        assert_eq!(reply, Bytes::from("here?"));
        stop(nodes).await;
    }
}

/// A target that a search did not find is not searched for again at once:
/// sends to it fail straight away for a search timeout, without a query
/// flooded per send, until this node's neighbours change or the time is up.
#[tokio::test(start_paused = true)]
async fn a_target_no_search_found_is_not_searched_for_again_at_once() {
    let net = MemNetwork::new();
    let (a, b) = pair(&net).await;
    let gone = Identity::generate().node_id().clone();
    let searches = |n: &TestNode| builtin_stat(&n.concerns, "routing", "searches");
    let held_back = |n: &TestNode| builtin_stat(&n.concerns, "routing", "held_back");
    let ask = |n: &TestNode| {
        let ctx = n.ctx();
        let gone = gone.clone();
        async move {
            let started = Instant::now();
            let err = ctx.request_to(&gone, "anyone?", 10 * S).await.unwrap_err();
            assert!(matches!(err, ConcernsError::Unreachable(_)), "{err:?}");
            started.elapsed()
        }
    };
    let exhausted = |n: &TestNode| builtin_stat(&n.concerns, "routing", "exhausted");
    // The first send searches; b, a's one neighbour, has nobody else to
    // ask and answers "not through me": once a's neighbourhood has been the
    // same for a second (it has just linked to b), the search ends, not
    // after the search timeout (3 s by default).
    let took = ask(&a).await;
    assert!(took >= 900 * MS && took < 1100 * MS, "{took:?}");
    assert_eq!((searches(&a), held_back(&a), exhausted(&a)), (1, 0, 1));
    // The next ones within the search timeout fail at once, and search
    // nothing.
    sleep(S).await;
    for _ in 0..3 {
        assert_eq!(ask(&a).await, Duration::ZERO);
    }
    assert_eq!((searches(&a), held_back(&a)), (1, 3));
    // Once the time is up, the next send searches again, and a's
    // neighbourhood has long been settled: it ends at once.
    sleep(2 * S).await;
    assert!(ask(&a).await < 100 * MS);
    let failed = Instant::now();
    assert_eq!((searches(&a), held_back(&a), exhausted(&a)), (2, 3, 2));
    // A new neighbour may know a way: the next send searches at once.
    let c = start(&net, "c", seeded(&["mem://a".into()])).await;
    while !linked(&a, &c) {
        assert!(failed.elapsed() < 3 * S, "c did not link to a in time");
        sleep(10 * MS).await;
    }
    assert!(failed.elapsed() < 3 * S, "{:?}", failed.elapsed());
    // c has just arrived: the search ends a second after it did.
    assert!(ask(&a).await < 1100 * MS);
    assert_eq!((searches(&a), held_back(&a), exhausted(&a)), (3, 3, 3));
    stop(vec![a, b, c]).await;
}

/// A route search asks a neighbour that arrives while it runs: a node still
/// joining the mesh (no neighbour at all when it sends) reaches its target
/// once it has a way there, not after the search timeout has run out.
#[tokio::test(start_paused = true)]
async fn a_search_asks_a_neighbour_that_arrives_while_it_runs() {
    let net = MemNetwork::new();
    // The ends keep one neighbour each: `a` cannot link to `c` itself.
    let ends = || PeersConfig::default().with_min_peers(1).with_max_peers(1);
    let a = start(&net, "a", ends()).await;
    let c = start(&net, "c", ends()).await;
    net.partition(&["a"], &["b"]);
    let b = start(&net, "b", seeded(&["mem://a".into(), "mem://c".into()])).await;
    let deadline = Instant::now() + 5 * S;
    while !linked(&b, &c) {
        assert!(Instant::now() < deadline, "b did not link to c");
        sleep(10 * MS).await;
    }
    assert!(a.concerns.peers().neighbours().is_empty());
    let started = Instant::now();
    let ask = spawn_request(&a, &c, "late");
    // The search has started, and asked nobody.
    sleep(500 * MS).await;
    assert_eq!(builtin_stat(&a.concerns, "routing", "searches"), 1);
    net.heal();
    let reply = ask.await.unwrap().unwrap();
    assert_eq!(reply, Bytes::from("late"));
    // The search timeout is 3 s: the answer came by the late ask.
    assert!(started.elapsed() < 3 * S, "{:?}", started.elapsed());
    assert_eq!(builtin_stat(&a.concerns, "routing", "searches"), 1);
    assert_eq!(builtin_stat(&a.concerns, "routing", "late_asks"), 1);
    assert_eq!(c.probe.count_from(a.id()), 1);
    stop(vec![a, b, c]).await;
}

#[tokio::test(start_paused = true)]
async fn topics_reach_every_subscriber_once_neighbour_or_not() {
    let net = MemNetwork::new();
    let nodes = line(&net, 6).await;
    let mut near = nodes[1].concerns.subscribe("weather").unwrap();
    let mut far = nodes[5].concerns.subscribe("weather").unwrap();
    let mut other = nodes[3].concerns.subscribe("sports").unwrap();
    {
        let _gone = nodes[4].concerns.subscribe("weather").unwrap();
    }
    nodes[0].concerns.publish("weather", "rain").unwrap();
    nodes[0].concerns.publish("weather", "sun").unwrap();
    sleep(S).await;
    for sub in [&mut near, &mut far] {
        let got: Vec<_> = std::iter::from_fn(|| sub.try_recv())
            .map(|p| p.payload)
            .collect();
        assert_eq!(got, vec![Bytes::from("rain"), Bytes::from("sun")]);
    }
    assert!(other.try_recv().is_none());
    let origin = far.try_recv();
    assert!(origin.is_none());
    assert!(matches!(
        nodes[0].concerns.subscribe(""),
        Err(ConcernsError::InvalidArgument(_))
    ));
    stop(nodes).await;
}

/// A subscriber that does not keep up loses what arrives while its queue is
/// full, and learns how much from its subscription (only a node-wide
/// counter said so); another subscription of the topic loses nothing.
#[tokio::test(start_paused = true)]
async fn a_subscriber_that_falls_behind_learns_what_it_missed() {
    let net = MemNetwork::new();
    let small = || ConcernsConfig::default().with_subscription_queue(2);
    let nodes = line_with(&net, 2, small).await;
    nodes[0]
        .concerns
        .peers()
        .wait_for_peers(1, 5 * S)
        .await
        .unwrap();
    let mut slow = nodes[1].concerns.subscribe("ticks").unwrap();
    for i in 0..5 {
        nodes[0].concerns.publish("ticks", format!("{i}")).unwrap();
    }
    sleep(S).await;
    assert_eq!(slow.dropped(), 3);
    let kept: Vec<_> = std::iter::from_fn(|| slow.try_recv())
        .map(|p| p.payload)
        .collect();
    assert_eq!(kept, vec![Bytes::from("0"), Bytes::from("1")]);
    let mut other = nodes[1].concerns.subscribe("ticks").unwrap();
    nodes[0].concerns.publish("ticks", "5").unwrap();
    sleep(S).await;
    assert_eq!((slow.dropped(), other.dropped()), (3, 0));
    assert_eq!(other.try_recv().map(|p| p.payload), Some(Bytes::from("5")));
    stop(nodes).await;
}

/// A broadcast or publication that cannot reach anyone says so instead of
/// returning an id: no neighbour yet, a TTL of 0, a carrier's command id
/// (delivered nowhere), a stopped layer.
#[tokio::test(start_paused = true)]
async fn a_broadcast_that_would_reach_nobody_is_an_error() {
    let net = MemNetwork::new();
    let alone = start(&net, "alone", PeersConfig::default()).await;
    let r = alone.ctx().broadcast("x", 4).await;
    assert!(matches!(r, Err(ConcernsError::NoNeighbours)), "{r:?}");
    let r = alone.concerns.publish("t", "x");
    assert!(matches!(r, Err(ConcernsError::NoNeighbours)), "{r:?}");
    assert_eq!(flood_stat(&alone, "sent"), 0);

    let other = start(&net, "other", seeded(&["mem://alone".into()])).await;
    let deadline = Instant::now() + 5 * S;
    while alone.concerns.peers().neighbours().is_empty() {
        assert!(Instant::now() < deadline, "no connection");
        sleep(10 * MS).await;
    }
    let r = alone.ctx().broadcast("x", 0).await;
    assert!(matches!(r, Err(ConcernsError::InvalidArgument(_))), "{r:?}");
    for carrier in [FLOOD, ROUTING] {
        let r = alone.concerns.context(carrier).broadcast("x", 4).await;
        assert!(matches!(r, Err(ConcernsError::InvalidArgument(_))), "{r:?}");
    }
    alone.ctx().broadcast("ok", 4).await.unwrap();
    let deadline = Instant::now() + 5 * S;
    while other.probe.count_payload(b"ok") == 0 {
        assert!(Instant::now() < deadline, "the broadcast never arrived");
        sleep(10 * MS).await;
    }
    assert_eq!(other.probe.total(), 1);

    alone.concerns.shutdown().await;
    let r = alone.ctx().broadcast("late", 4).await;
    assert!(matches!(r, Err(ConcernsError::Shutdown)), "{r:?}");
    let r = alone.concerns.publish("t", "late");
    assert!(matches!(r, Err(ConcernsError::Shutdown)), "{r:?}");
    stop(vec![alone, other]).await;
}

#[tokio::test(start_paused = true)]
async fn a_flooding_peer_does_not_starve_another() {
    let net = MemNetwork::new();
    let server = start(&net, "server", PeersConfig::default()).await;
    let flooder = start(&net, "flooder", seeded(&["mem://server".into()])).await;
    let polite = start(&net, "polite", seeded(&["mem://server".into()])).await;
    server
        .concerns
        .peers()
        .wait_for_peers(2, 5 * S)
        .await
        .unwrap();
    flooder
        .concerns
        .peers()
        .wait_for_peers(1, 5 * S)
        .await
        .unwrap();
    polite
        .concerns
        .peers()
        .wait_for_peers(1, 5 * S)
        .await
        .unwrap();

    // The probe runs one request at a time, 10 ms each.
    let sid = server.id().clone();
    let flood = {
        let ctx = flooder.ctx();
        let sid = sid.clone();
        tokio::spawn(async move {
            let calls = (0..300).map(|_| async {
                let t = Instant::now();
                let r = ctx.request(&sid, "slow", 60 * S).await;
                (r, t.elapsed())
            });
            let results = futures_util::future::join_all(calls).await;
            let overloaded = results
                .iter()
                .filter(|(r, _)| {
                    matches!(
                        r,
                        Err(ConcernsError::Remote {
                            code: ErrorCode::Overloaded,
                            ..
                        })
                    )
                })
                .count();
            let mut served: Vec<Duration> = results
                .iter()
                .filter(|(r, _)| r.is_ok())
                .map(|(_, t)| *t)
                .collect();
            served.sort_unstable();
            (served, overloaded)
        })
    };
    sleep(5 * MS).await;
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        polite.ctx().request(&sid, "slow", 10 * S).await.unwrap();
        worst = worst.max(t.elapsed());
    }
    let (served, overloaded) = flood.await.unwrap();
    let ok = served.len();
    let (median, slowest) = (served[ok / 2], served[ok - 1]);
    eprintln!(
        "polite: worst latency {worst:?}; flooder: {ok} served (median latency {median:?}, \
         worst {slowest:?}), {overloaded} overloaded"
    );
    // Round robin: the polite peer waits at most for the request running
    // and one flooder request ahead of its own (10 ms each), never for the
    // flooder's backlog (up to 64 queued: 640 ms)...
    assert!(worst <= 35 * MS, "polite peer waited {worst:?}");
    // ...which the flooder itself waits through.
    assert!(slowest >= 20 * worst, "flooder's worst {slowest:?}");
    assert!(median >= 10 * worst, "flooder's median {median:?}");
    assert_eq!(ok + overloaded, 300);
    assert!(overloaded > 0, "the flooder's own queue is bounded");
    stop(vec![server, flooder, polite]).await;
}

/// Hops between every pair of nodes over their responsive links, by BFS.
fn distances(nodes: &[TestNode]) -> Vec<Vec<Option<usize>>> {
    let index: HashMap<NodeId, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id().clone(), i))
        .collect();
    let adj: Vec<Vec<usize>> = nodes
        .iter()
        .map(|n| {
            n.concerns
                .peers()
                .neighbours()
                .iter()
                .filter_map(|p| index.get(p).copied())
                .collect()
        })
        .collect();
    (0..nodes.len())
        .map(|from| {
            let mut dist = vec![None; nodes.len()];
            dist[from] = Some(0);
            let mut queue = std::collections::VecDeque::from([from]);
            while let Some(i) = queue.pop_front() {
                let d = dist[i].unwrap_or(0);
                for &j in &adj[i] {
                    if dist[j].is_none() {
                        dist[j] = Some(d + 1);
                        queue.push_back(j);
                    }
                }
            }
            dist
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn requests_are_routed_across_six_and_more_hops_of_a_sparse_mesh() {
    for seed in [1u64, 2, 3] {
        let net = MemNetwork::new();
        // At most 3 peers each: long paths (diameters of 9 to 14 hops).
        let nodes = random_mesh_max(&net, 60, 3, seed).await;
        let dist = distances(&nodes);
        // The pairs 6 or more hops apart, farthest first; a few of them.
        let mut far: Vec<(usize, usize, usize)> = Vec::new();
        for (a, row) in dist.iter().enumerate() {
            for (b, d) in row.iter().enumerate() {
                let d = d.unwrap_or_else(|| panic!("{a} cannot reach {b} (seed {seed})"));
                // Beyond the maximum hop count (16 by default) is out of
                // reach by design.
                if a < b && (6..=16).contains(&d) {
                    far.push((d, a, b));
                }
            }
        }
        far.sort_unstable_by(|x, y| y.cmp(x));
        assert!(!far.is_empty(), "no pair 6 hops apart (seed {seed})");
        for &(d, a, b) in far.iter().step_by(far.len().div_ceil(5).max(1)) {
            let payload = format!("{a} to {b}");
            let reply = nodes[a]
                .ctx()
                .request_to(nodes[b].id(), payload.clone(), 10 * S)
                .await
                .unwrap_or_else(|e| panic!("{payload}, {d} hops (seed {seed}): {e}"));
            assert_eq!(reply, Bytes::from(payload.clone()), "seed {seed}");
            assert_eq!(nodes[b].probe.count_from(nodes[a].id()), 1, "seed {seed}");
            let route = nodes[a]
                .concerns
                .routes()
                .into_iter()
                .find(|r| r.target == *nodes[b].id())
                .unwrap_or_else(|| panic!("no route kept for {payload} (seed {seed})"));
            assert!(
                route.hops as usize >= d,
                "{payload}: a route of {} hops, {d} at least (seed {seed})",
                route.hops
            );
            eprintln!(
                "seed {seed}: {payload}: {d} hops apart, routed over {}",
                route.hops
            );
        }
        stop(nodes).await;
    }
}

/// Records its lifecycle, the fate of what it sent and unawaited replies;
/// echoes requests ('s…' after 50 ms, 'c…' on the control lane).
#[derive(Clone, Default)]
struct Hooks {
    log: Arc<Mutex<Vec<String>>>,
}

const HOOKS: u32 = 50;

impl Hooks {
    fn note(&self, what: String) {
        self.log.lock().unwrap().push(what);
    }
    fn seen(&self, what: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| *l == what)
            .count()
    }
}

#[async_trait]
impl Concern for Hooks {
    fn command(&self) -> u32 {
        HOOKS
    }
    async fn on_start(&self, _ctx: &Context) {
        self.note("start".into());
    }
    async fn on_stop(&self, _ctx: &Context) {
        self.note("stop".into());
    }
    async fn on_request(
        &self,
        _ctx: &Context,
        _from: &NodeId,
        payload: Bytes,
    ) -> Result<Option<Reply>, BoxError> {
        self.note(format!("request {}", String::from_utf8_lossy(&payload)));
        match payload.first() {
            Some(b's') => {
                sleep(50 * MS).await;
                Ok(Some(Reply::new(payload)))
            }
            Some(b'c') => Ok(Some(
                Reply::new(payload).with_priority(meshwork_concerns::transport::Priority::Control),
            )),
            _ => Ok(Some(Reply::new(payload))),
        }
    }
    async fn on_reply(&self, _ctx: &Context, from: &NodeId, payload: Bytes) {
        self.note(format!(
            "reply {} from {}",
            String::from_utf8_lossy(&payload),
            from.short()
        ));
    }
    fn on_sent(&self, to: &NodeId) {
        self.note(format!("sent to {}", to.short()));
    }
    fn on_send_failed(&self, to: &NodeId, _error: &ConcernsError) {
        self.note(format!("failed to {}", to.short()));
    }
    fn on_dropped(&self, to: &NodeId) {
        self.note(format!("dropped to {}", to.short()));
    }
}

/// A peer manager for `name` on `net`, seeded with `seeds`, nothing above it.
async fn bare_peers(net: &MemNetwork, name: &str, seeds: &[String]) -> PeerManager {
    PeerManager::start(listening(net, name).await, seeded(seeds)).unwrap()
}

#[tokio::test(start_paused = true)]
async fn lifecycle_hooks_delivery_callbacks_and_lanes() {
    let net = MemNetwork::new();
    let (ha, hb) = (Hooks::default(), Hooks::default());
    let pa = bare_peers(&net, "a", &[]).await;
    let pb = bare_peers(&net, "b", &["mem://a".into()]).await;
    let a = Concerns::builder(pa.clone())
        .concern(ha.clone())
        .start()
        .await
        .unwrap();
    let b = Concerns::builder(pb.clone())
        .concern(hb.clone())
        .start()
        .await
        .unwrap();
    assert_eq!((ha.seen("start"), hb.seen("start")), (1, 1));
    pa.wait_for_peers(1, 5 * S).await.unwrap();
    pb.wait_for_peers(1, 5 * S).await.unwrap();
    let idb = pb.node_id().clone();
    let ctx = a.context(HOOKS);

    // One-way sends: queued → on_sent; no such peer → on_send_failed.
    ctx.send(&idb, "one-way").await.unwrap();
    assert_eq!(ha.seen(&format!("sent to {}", idb.short())), 1);
    let stranger = NodeId::from_bytes(vec![3; 32]).unwrap();
    let err = ctx.send(&stranger, "x").await.unwrap_err();
    assert!(matches!(err, ConcernsError::NotConnected(_)), "{err:?}");
    assert_eq!(ha.seen(&format!("failed to {}", stranger.short())), 1);

    // Every lane carries requests, replies and one-way messages.
    ctx.send_with(&idb, "bulk", Priority::Bulk).await.unwrap();
    let reply = ctx
        .request_with(&idb, "control", S, Priority::Control)
        .await
        .unwrap();
    assert_eq!(reply, Bytes::from("control"));
    sleep(10 * MS).await;
    assert_eq!(hb.seen("request one-way"), 1);
    assert_eq!(hb.seen("request bulk"), 1);

    // A reply that comes after its request timed out goes to on_reply.
    let err = ctx.request(&idb, "slow", 10 * MS).await.unwrap_err();
    assert!(matches!(err, ConcernsError::Timeout(_)), "{err:?}");
    sleep(100 * MS).await;
    assert_eq!(ha.seen(&format!("reply slow from {}", idb.short())), 1);

    // Shutdown: on_stop once, waiting and later requests fail cleanly.
    let waiting = {
        let ctx = ctx.clone();
        let idb = idb.clone();
        tokio::spawn(async move { ctx.request(&idb, "slow again", 5 * S).await })
    };
    sleep(MS).await;
    a.shutdown().await;
    a.shutdown().await;
    assert_eq!(ha.seen("stop"), 1);
    let err = waiting.await.unwrap().unwrap_err();
    assert!(matches!(err, ConcernsError::Shutdown), "{err:?}");
    let err = ctx.request(&idb, "late", S).await.unwrap_err();
    assert!(matches!(err, ConcernsError::Shutdown), "{err:?}");
    b.shutdown().await;
    assert_eq!(hb.seen("stop"), 1);
    assert_eq!(hb.seen("request slow again"), 1);
    pa.shutdown().await;
    pb.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn builder_refuses_duplicates_and_only_leaves_the_builtins_out() {
    let net = MemNetwork::new();
    let peers = bare_peers(&net, "solo", &[]).await;
    let err = Concerns::builder(peers.clone())
        .concern(Hooks::default())
        .concern(Hooks::default())
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConcernsError::DuplicateCommand(HOOKS)),
        "{err:?}"
    );

    /// A user concern on the flood concern's id.
    struct Squatter;
    #[async_trait]
    impl Concern for Squatter {
        fn command(&self) -> u32 {
            meshwork_concerns::FLOOD
        }
        async fn on_request(
            &self,
            _: &Context,
            _: &NodeId,
            _: Bytes,
        ) -> Result<Option<Reply>, BoxError> {
            Ok(None)
        }
    }
    let err = Concerns::builder(peers.clone())
        .concern(Squatter)
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConcernsError::DuplicateCommand(meshwork_concerns::FLOOD)
        ),
        "{err:?}"
    );

    // The refusals left the peer manager untouched: a corrected list starts.
    let hooks = Hooks::default();
    let concerns = Concerns::builder(peers.clone())
        .only(vec![Arc::new(hooks.clone())])
        .start()
        .await
        .unwrap();
    assert_eq!(hooks.seen("start"), 1);
    let listed: Vec<u32> = concerns.stats().iter().map(|s| s.command).collect();
    assert_eq!(listed, vec![HOOKS]);
    let ctx = concerns.context(HOOKS);
    let me = NodeId::from_bytes(vec![4; 32]).unwrap();
    assert!(matches!(
        ctx.broadcast("x", 4).await,
        Err(ConcernsError::NotInstalled("flood"))
    ));
    assert!(matches!(
        ctx.send_to(&me, "x").await,
        Err(ConcernsError::NotInstalled("routing"))
    ));
    assert!(matches!(
        concerns.subscribe("t"),
        Err(ConcernsError::NotInstalled("topics"))
    ));
    assert!(concerns.routes().is_empty());
    assert!(concerns.builtin_stats().is_empty());
    concerns.shutdown().await;
    assert_eq!(hooks.seen("stop"), 1);
    peers.shutdown().await;
}

/// A member m, neighbour of a, lies about the way to c (a - b - c):
/// routed messages "from c" make no route (they only keep one alive that
/// goes through their sender), and route answers nobody asked for, or "I am
/// c" from another node, are not taken. Before, one such message sent a's
/// traffic for c into m for the route's lifetime (60 s), and kept sending
/// it there for as long as m repeated it. A routed request that times out
/// forgets its route.
#[tokio::test(start_paused = true)]
async fn a_member_cannot_black_hole_a_route_for_long() {
    let net = MemNetwork::new();
    let a = start_seeded(&net, "a", &[], 1, 8).await;
    let b = start_seeded(&net, "b", &["a"], 1, 2).await;
    let c = start_seeded(&net, "c", &["b"], 1, 1).await;
    let m = bare_peers(&net, "m", &["mem://a".into()]).await;
    m.wait_for_peers(1, 5 * S).await.unwrap();
    c.concerns.peers().wait_for_peers(1, 5 * S).await.unwrap();
    a.concerns.peers().wait_for_peers(2, 5 * S).await.unwrap();
    assert!(!linked(&a, &c));
    let route_to_c = || {
        a.concerns
            .routes()
            .into_iter()
            .find(|r| r.target == *c.id())
            .map(|r| r.next_hop)
    };
    let lie = |body| meshwork_concerns::wire::Message::Concern(routing_frame(body));
    let from_c = || {
        route_message::Body::Routed(Routed {
            origin: c.id().as_bytes().clone(),
            target: a.id().as_bytes().clone(),
            command: PROBE,
            request_id: 12345,
            kind: ConcernKind::Reply as i32,
            payload: Bytes::from("x"),
            ttl: 16,
            sent_at_ms: 0,
        })
    };

    // With no route known, messages "from c" through m make none...
    for _ in 0..3 {
        m.send(a.id(), lie(from_c()), Priority::Normal)
            .await
            .unwrap();
        sleep(10 * MS).await;
        assert_eq!(route_to_c(), None);
    }
    // ...and a request finds the way through b.
    let ok = a.ctx().request_to(c.id(), "found", 5 * S).await.unwrap();
    assert_eq!(ok, Bytes::from("found"));
    assert_eq!(route_to_c().as_ref(), Some(b.id()));

    // Now m claims c is itself (0 hops), or its neighbour (1 hop), in
    // answer to nothing, and sends more "from c": the route stays.
    for hops in [0, 1] {
        let found = route_message::Body::Found(RouteFound {
            query_id: 1,
            origin: a.id().as_bytes().clone(),
            target: c.id().as_bytes().clone(),
            hops,
            signature: Bytes::new(),
        });
        m.send(a.id(), lie(found), Priority::Normal).await.unwrap();
    }
    m.send(a.id(), lie(from_c()), Priority::Normal)
        .await
        .unwrap();
    sleep(10 * MS).await;
    assert_eq!(route_to_c().as_ref(), Some(b.id()));
    let ok = a.ctx().request_to(c.id(), "still", 5 * S).await.unwrap();
    assert_eq!(ok, Bytes::from("still"));

    // b goes on forwarding into a link to c that went silent: a's request
    // times out, and the route is forgotten (the next one searches).
    net.partition(&["b"], &["c"]);
    let lost = a.ctx().request_to(c.id(), "lost", S).await;
    assert!(matches!(lost, Err(ConcernsError::Timeout(_))), "{lost:?}");
    assert_eq!(route_to_c(), None);
    m.shutdown().await;
    stop(vec![a, b, c]).await;
}

/// Seen-cache tests: a line of `n` nodes remembering 64 floods each, after
/// node `origin` broadcast "honest" and node `watch` delivered it; returns
/// the nodes and the broadcast's id.
async fn line_after_a_broadcast(
    net: &MemNetwork,
    n: usize,
    origin: usize,
    watch: usize,
) -> (Vec<TestNode>, u64) {
    let config = || ConcernsConfig::default().with_seen_cache(64, 120 * S);
    let nodes = line_with(net, n, config).await;
    let id = nodes[origin].ctx().broadcast("honest", 4).await.unwrap();
    let deadline = Instant::now() + 5 * S;
    while nodes[watch].probe.count_payload(b"honest") == 0 {
        assert!(Instant::now() < deadline, "the broadcast never arrived");
        sleep(10 * MS).await;
    }
    (nodes, id)
}

/// Node `from` sends node `to` 1000 floods of its own with `ttl`.
async fn send_filler(nodes: &[TestNode], from: usize, to: usize, ttl: u32) {
    let ctx = nodes[from].concerns.context(FLOOD);
    for n in 0..1000u64 {
        let junk = flood_frame(identity(&nodes[from]), n, 4242, Bytes::new(), ttl);
        ctx.send(nodes[to].id(), junk.encode_to_vec())
            .await
            .unwrap();
    }
}

/// As in `a_flooded_seen_cache_does_not_deliver_a_replay_again`, with the
/// filler passed on by an honest node: l0 floods l1
/// with its own floods (TTL 3), which l1 relays to l2, the way l1's own
/// broadcast came. Judged by who handed entries over, l1's broadcast went
/// with the filler and l3 could replay it to l2 (audit round five: 70 000
/// floods through an honest relay, and the victim and the node behind it
/// delivered a broadcast twice). Judged by their origin, which signatures
/// now prove, the filler pushes out only the filler's own entries.
#[tokio::test(start_paused = true)]
async fn filler_relayed_by_an_honest_node_does_not_let_a_replay_through() {
    let net = MemNetwork::new();
    let (nodes, id) = line_after_a_broadcast(&net, 4, 1, 3).await;
    send_filler(&nodes, 0, 1, 3).await;
    sleep(S).await;
    let replay = flood_frame(identity(&nodes[1]), id, PROBE, &b"honest"[..], 4);
    let replayer = nodes[3].concerns.context(FLOOD);
    replayer
        .send(nodes[2].id(), replay.encode_to_vec())
        .await
        .unwrap();
    sleep(S).await;
    for i in [0, 2, 3] {
        assert_eq!(nodes[i].probe.count_payload(b"honest"), 1, "node {i}");
    }
    stop(nodes).await;
}

/// A member that fills a node's seen-cache with floods (TTL 1: relayed
/// nowhere) pushes out its own entries, not the id of a broadcast
/// another neighbour brought: replayed then, it is not delivered again.
/// (Oldest first across all neighbours, 65 536 such floods got an honest
/// broadcast delivered twice on every node: audit round three.)
#[tokio::test(start_paused = true)]
async fn a_flooded_seen_cache_does_not_deliver_a_replay_again() {
    let net = MemNetwork::new();
    let (nodes, id) = line_after_a_broadcast(&net, 3, 2, 0).await;
    // The liar fills nodes[1]'s cache with floods of its own (signed: it
    // cannot make up other origins), then replays the honest one.
    send_filler(&nodes, 0, 1, 1).await;
    let replay = flood_frame(identity(&nodes[2]), id, PROBE, &b"honest"[..], 4);
    let liar = nodes[0].concerns.context(FLOOD);
    liar.send(nodes[1].id(), replay.encode_to_vec())
        .await
        .unwrap();
    sleep(S).await;
    assert_eq!(nodes[1].probe.count_payload(b"honest"), 1);
    stop(nodes).await;
}

/// The line t-b-o-a: `o`'s neighbours are `a`, a dead end ("not through
/// me" at once), and `b`, the way to `t`.
async fn line_t_b_o_a(net: &MemNetwork) -> [TestNode; 4] {
    let t = start_seeded(net, "t", &[], 1, 1).await;
    let b = start_seeded(net, "b", &["t"], 2, 2).await;
    let o = start_seeded(net, "o", &["b"], 2, 2).await;
    let a = start_seeded(net, "a", &["o"], 1, 1).await;
    wait_linked(&[(&t, &b), (&b, &o), (&o, &a)], "the line t-b-o-a").await;
    assert!(!linked(&o, &t));
    [t, b, o, a]
}

/// A neighbour whose link resets and comes back during a search does not
/// make it "unreachable" while the answer is on its way through it. `o`'s
/// neighbours are `a` (a dead end: "not through me" at once) and `b`, whose
/// link to the target `t` is slow; the link o-b resets 50 ms in.
#[tokio::test(start_paused = true)]
async fn a_neighbour_that_flaps_during_a_search_does_not_make_it_fail() {
    let net = MemNetwork::new();
    let [t, b, o, a] = line_t_b_o_a(&net).await;
    net.set_latency("b", "t", 300 * MS);
    let ask = spawn_request(&o, &t, "hi");
    sleep(50 * MS).await;
    net.drop_link("o", "b");
    assert_eq!(ask.await.unwrap().unwrap(), Bytes::from("hi"));
    assert_eq!(builtin_stat(&o.concerns, "routing", "exhausted"), 0);
    stop(vec![t, b, o, a]).await;
}

/// A query lost with its connection is sent again when the neighbour comes
/// back: `o`'s one neighbour `b` (o and t cannot link); the link o-b resets
/// while the query is in flight on it.
#[tokio::test(start_paused = true)]
async fn a_neighbour_that_comes_back_during_a_search_is_asked_again() {
    let net = MemNetwork::new();
    let t = start_seeded(&net, "t", &[], 1, 1).await;
    let b = start_seeded(&net, "b", &["t"], 2, 2).await;
    let o = start_seeded(&net, "o", &["b"], 1, 1).await;
    wait_linked(&[(&t, &b), (&b, &o)], "the line t-b-o").await;
    net.partition(&["o"], &["t"]);
    net.set_latency("o", "b", 100 * MS);
    let started = Instant::now();
    let ask = spawn_request(&o, &t, "hi");
    sleep(50 * MS).await;
    net.drop_link("o", "b");
    net.set_latency("o", "b", Duration::ZERO);
    assert_eq!(ask.await.unwrap().unwrap(), Bytes::from("hi"));
    // The search timeout is 3 s: the answer came by the second ask.
    assert!(started.elapsed() < 3 * S, "{:?}", started.elapsed());
    assert_eq!(builtin_stat(&o.concerns, "routing", "late_asks"), 1);
    stop(vec![t, b, o]).await;
}

/// Searches for nodes that are there never end early as if nobody had them
/// (exhausted), whatever links reset while they run: a neighbour that
/// leaves mid-search silences its part of the wave (the answer may come
/// another way), and only a "not through me" from every way ends a search
/// early. In random meshes with 2 ms links, a link of the origin, one of
/// the target and one anywhere reset during each search; a search whose
/// answer was lost with a link runs to its timeout, as it always did.
#[tokio::test(start_paused = true)]
async fn links_that_reset_during_searches_never_make_a_present_node_unreachable() {
    for seed in [11u64, 12] {
        let net = MemNetwork::new();
        let nodes = random_mesh(&net, 30, seed).await;
        net.set_default_latency(2 * MS);
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut answered, mut failed) = (0, 0);
        for round in 0..8 {
            let dist = distances(&nodes);
            let far: Vec<(usize, usize)> = (0..nodes.len())
                .flat_map(|a| (0..nodes.len()).map(move |b| (a, b)))
                .filter(|&(a, b)| dist[a][b].is_some_and(|d| d >= 2))
                .collect();
            assert!(!far.is_empty(), "no two nodes 2 hops apart (seed {seed})");
            let (a, b) = far[rng.random_range(0..far.len())];
            let ask = spawn_request(&nodes[a], &nodes[b], "there?");
            // A link of the origin, one of the target, one anywhere.
            for i in [a, b, rng.random_range(0..nodes.len())] {
                sleep(rng.random_range(0..8u32) * MS).await;
                let links = nodes[i].concerns.peers().neighbours();
                if links.is_empty() {
                    continue;
                }
                let j = &links[rng.random_range(0..links.len())];
                if let Some(peer) = nodes.iter().find(|n| n.id() == j) {
                    net.drop_link(&nodes[i].name, &peer.name);
                }
            }
            // A search that times out (its answer lost with a link) is
            // unreachable too, as before "not through me"; an exhausted one
            // would say the node is not there.
            match ask.await.unwrap() {
                Ok(_) => answered += 1,
                Err(_) => failed += 1,
            }
            let exhausted = builtin_stat(&nodes[a].concerns, "routing", "exhausted");
            assert_eq!(exhausted, 0, "round {round}: {a} -> {b} (seed {seed})");
            // The pools refill before the next round.
            sleep(2 * S).await;
        }
        let exhausted: u64 = nodes
            .iter()
            .map(|n| builtin_stat(&n.concerns, "routing", "exhausted"))
            .sum();
        eprintln!("seed {seed}: {answered} answered, {failed} failed");
        assert_eq!(exhausted, 0, "seed {seed}");
        assert!(answered > 0, "seed {seed}");
        stop(nodes).await;
    }
}

/// A full node that the origin, short of peers, keeps dialling does not
/// keep its neighbourhood unsettled: it refuses in the handshake, so it
/// never becomes a neighbour for a moment, and the search for a node nobody
/// has ends once the dead ends `a` and `b` said "not through me" and a
/// second passed. (Before the peer manager's gate, `f` joined and left
/// `o`'s neighbours at each dial, and the search ran to its timeout, 3 s.)
#[tokio::test(start_paused = true)]
async fn a_full_node_the_origin_keeps_dialling_does_not_hold_the_search_back() {
    let net = MemNetwork::new();
    let g = start_seeded(&net, "g", &[], 1, 1).await;
    let f = start_seeded(&net, "f", &["g"], 1, 1).await;
    let a = start_seeded(&net, "a", &[], 1, 1).await;
    let b = start_seeded(&net, "b", &[], 1, 1).await;
    wait_linked(&[(&f, &g)], "f-g").await;
    // Redialling f at least every 300 ms.
    let seeds = ["mem://a".to_string(), "mem://b".into(), "mem://f".into()];
    let cfg = seeded(&seeds)
        .with_min_peers(3)
        .with_max_peers(3)
        .with_backoff(100 * MS, 300 * MS);
    let o = start(&net, "o", cfg).await;
    wait_linked(&[(&o, &a), (&o, &b)], "a-o-b").await;
    // The dead ends' "no" takes 1.2 s to come back: o dials f meanwhile.
    net.set_latency("o", "a", 600 * MS);
    net.set_latency("o", "b", 600 * MS);
    sleep(2 * S).await;
    let nobody = start_seeded(&MemNetwork::new(), "nobody", &[], 1, 1).await;
    // f and g (both full: o learns g from f's refusal) turn o away.
    let refusals = || f.concerns.peers().stats().refused + g.concerns.peers().stats().refused;
    let dials = refusals();
    let started = Instant::now();
    let err = spawn_request(&o, &nobody, "anyone?")
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, ConcernsError::Unreachable(_)), "{err:?}");
    assert!(started.elapsed() < 2 * S, "{:?}", started.elapsed());
    assert_eq!(builtin_stat(&o.concerns, "routing", "exhausted"), 1);
    // The premise: o keeps dialling them meanwhile (at least every 300 ms;
    // under load a refusal can land just after the search ended, 1 run in
    // about 30 when two stress runs shared the machine).
    while refusals() <= dials && started.elapsed() < 2 * S {
        sleep(50 * MS).await;
    }
    assert!(
        refusals() > dials,
        "o dialled neither f nor g within 2 s of the search's start"
    );
    assert!(!linked(&o, &f));
    stop(vec![a, b, f, g, o, nobody]).await;
}

/// A neighbour that answered "not through me" and then leaves does not
/// hold the search back: `o` asks `a` (a dead end: "no" at once) and `b`
/// (whose one other link, to the dead end `c`, is slow); `a` leaves for
/// good, then `b` answers "no" too, and the search ends, well before its
/// timeout (3 s). (`o` needs one peer only: it dials nobody new meanwhile.
/// A neighbour that comes and goes before it answers leaves the search to
/// its timeout.)
#[tokio::test(start_paused = true)]
async fn a_neighbour_that_said_no_and_left_does_not_hold_the_search_back() {
    let net = MemNetwork::new();
    let c = start_seeded(&net, "c", &[], 1, 1).await;
    let b = start_seeded(&net, "b", &["c"], 2, 2).await;
    let o = start_seeded(&net, "o", &["b"], 1, 2).await;
    let a = start_seeded(&net, "a", &["o"], 1, 1).await;
    wait_linked(&[(&c, &b), (&b, &o), (&o, &a)], "the line c-b-o-a").await;
    net.set_latency("b", "c", 300 * MS);
    let nobody = start_seeded(&MemNetwork::new(), "nobody", &[], 1, 1).await;
    let started = Instant::now();
    let ask = spawn_request(&o, &nobody, "anyone?");
    sleep(50 * MS).await;
    net.partition(&["o"], &["a"]);
    net.drop_link("o", "a");
    let err = ask.await.unwrap().unwrap_err();
    assert!(matches!(err, ConcernsError::Unreachable(_)), "{err:?}");
    assert!(started.elapsed() < 2 * S, "{:?}", started.elapsed());
    assert_eq!(builtin_stat(&o.concerns, "routing", "exhausted"), 1);
    stop(vec![a, b, c, o, nobody]).await;
}

/// A neighbour whose link is down when a search starts (it is being
/// redialled) is asked when it is back: a dead end's "not through me" does
/// not end the search while this node's neighbourhood has not settled.
/// Line t-b-o-a, `a` a dead end; the link o-b resets just before `o` asks
/// for `t`. (From a review of the first version, which answered
/// unreachable at once.) The search is never exhausted, and the request
/// gets through once o-b is back. It used to get through in 2 or 3 runs of
/// 10: `o`, short of a peer, also dialled the full `t`, which took the
/// connection's handshake and then refused it; meanwhile `o` saw `t` as a
/// neighbour, sent the request straight to it, and `t` handled it but could
/// not answer. A full node now refuses in the handshake (the pool's gate).
#[tokio::test(start_paused = true)]
async fn a_neighbour_reconnecting_when_a_search_starts_is_waited_for() {
    let net = MemNetwork::new();
    let [t, b, o, a] = line_t_b_o_a(&net).await;
    net.drop_link("o", "b");
    while o.concerns.peers().neighbours().contains(b.id()) {
        sleep(MS).await;
    }
    let started = Instant::now();
    let reply = spawn_request(&o, &t, "hi").await.unwrap();
    assert_eq!(reply.unwrap(), Bytes::from("hi"));
    assert!(started.elapsed() < S, "{:?}", started.elapsed());
    assert_eq!(builtin_stat(&o.concerns, "routing", "exhausted"), 0);
    assert_eq!(builtin_stat(&o.concerns, "routing", "late_asks"), 1);
    stop(vec![t, b, o, a]).await;
}

/// A node whose first copy of a query came with no hops left passes on a
/// later copy that has some, rather than answering it "not through me":
/// ring o-a-b-g-f-e-o with a tail b-c-t, at most 4 hops, the link a-b slow,
/// so b first hears of o's query from g (4 hops round), then from a (1
/// hop). t is 4 hops from o, through a and b. (From a review: the search
/// ended as unreachable, and before "not through me" it timed out.)
#[tokio::test(start_paused = true)]
async fn a_copy_with_hops_to_spare_is_passed_on_after_one_with_none() {
    let net = MemNetwork::new();
    let cfg = || ConcernsConfig::default().with_routing(4, 60 * S, 3 * S);
    let node = |name: &'static str, seeds: &'static [&'static str], n: usize| {
        let net = net.clone();
        async move {
            let seeds: Vec<String> = seeds.iter().map(|s| format!("mem://{s}")).collect();
            let peers = seeded(&seeds).with_min_peers(n).with_max_peers(n);
            start_with(&net, name, peers, cfg()).await
        }
    };
    let t = node("t", &[], 1).await;
    let c = node("c", &["t"], 2).await;
    let b = node("b", &["c"], 3).await;
    let a = node("a", &["b"], 2).await;
    let o = node("o", &["a"], 2).await;
    let e = node("e", &["o"], 2).await;
    let f = node("f", &["e"], 2).await;
    let g = node("g", &["f", "b"], 2).await;
    let edges = [
        (&t, &c),
        (&c, &b),
        (&b, &a),
        (&a, &o),
        (&o, &e),
        (&e, &f),
        (&f, &g),
        (&g, &b),
    ];
    wait_linked(&edges, "the ring and its tail").await;
    let all = [&t, &c, &b, &a, &o, &e, &f, &g];
    let links: usize = all
        .iter()
        .map(|n| n.concerns.peers().neighbours().len())
        .sum();
    assert_eq!(links, 2 * edges.len(), "links beyond the ring and tail");
    net.set_latency("a", "b", 50 * MS);
    sleep(2 * S).await;
    let started = Instant::now();
    let reply = spawn_request(&o, &t, "hi").await.unwrap();
    assert_eq!(reply.unwrap(), Bytes::from("hi"));
    assert!(started.elapsed() < S, "{:?}", started.elapsed());
    stop(vec![t, c, b, a, o, e, f, g]).await;
}
