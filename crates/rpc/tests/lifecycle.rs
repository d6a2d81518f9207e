//! Concurrency review: the provider keys the calls it runs by
//! `(caller, call_id)`, with the call id the caller's choice, and a second
//! call under a key in use overwrote the first's entry
//! (`Calls::register` inserted; `Running::drop` removed whatever held the
//! key; now such a call is refused). A call whose entry was overwritten is no longer seen by
//! `Server::caller_left`, by a Cancel, or by `Rpc::shutdown`: a neighbour
//! that reuses one call id for many long calls, then leaves, keeps them
//! running (holding the service's slots) for up to `max_budget`, which
//! `caller_left` exists to prevent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use meshwork::Node;
use meshwork::concerns::peers::ConcernFrame;
use meshwork::transport::mem::MemNetwork;
use meshwork::transport::{Address, Priority};
use meshwork::wire::Message;
use meshwork_rpc::proto::{Call, rpc_message::Body};
use meshwork_rpc::service;
use tokio::time::{Instant, sleep};

mod common;
use common::neighbour;

const NET: &str = "review-test";
const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);

#[service]
trait Slow {
    async fn wait(&self, ms: u64) -> u64;
}

struct Imp;

impl Slow for Imp {
    async fn wait(&self, ms: u64) -> u64 {
        sleep(Duration::from_millis(ms)).await;
        ms
    }
}

fn builder(net: &MemNetwork, host: &str) -> meshwork::NodeBuilder {
    common::builder(net, NET, host)
}

/// A call of `slow.wait` for an hour (budget: an hour, cut to the
/// provider's 300 s maximum), under `call_id`, as request `request_id`.
fn call(call_id: u64, request_id: u64) -> ConcernFrame {
    let body = Body::Call(Call {
        call_id,
        service: "slow".into(),
        method: "wait".into(),
        args: Bytes::from_static(b"[3600000]"),
        codec: 1,
        budget_ms: 3_600_000,
        version: 0,
    });
    common::rpc_request(request_id, body)
}

fn in_flight(a: &Node) -> usize {
    a.rpc()
        .served()
        .into_iter()
        .find(|s| s.name == "slow")
        .unwrap()
        .in_flight
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + 30 * S;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not in time");
        sleep(10 * MS).await;
    }
}

/// Sends `call_ids` as calls from a bare neighbour, waits until `running`
/// of them run, lets the neighbour leave, and returns how many are still
/// in flight 2 s later.
async fn calls_of_a_caller_that_leaves(call_ids: [u64; 4], running: usize) -> usize {
    let net = MemNetwork::new();
    let a = builder(&net, "a").start().await.unwrap();
    a.rpc().serve("slow", SlowServer::new(Imp)).await.unwrap();
    let tap = Arc::new(Mutex::new(Vec::new()));
    let m = neighbour(&net, NET, "m", "a", &a, &tap).await.unwrap();
    let m_id = m.node_id().clone();
    for (i, id) in call_ids.into_iter().enumerate() {
        m.send(
            a.node_id(),
            Message::Concern(call(id, i as u64 + 1)),
            Priority::Normal,
        )
        .await
        .unwrap();
    }
    wait_until("the calls run", || in_flight(&a) == running).await;
    // (A call under an id already running is refused, as cancelled, at
    // once; it must not stay in flight.)
    sleep(S).await;
    assert_eq!(in_flight(&a), running);
    // The caller leaves (a crash would do the same): no Cancel comes.
    m.shutdown().await;
    wait_until("a sees m go", || !a.peers().is_neighbour(&m_id)).await;
    sleep(2 * S).await;
    let left = in_flight(&a);
    a.shutdown().await;
    left
}

/// Control: four calls under distinct ids all stop when their caller
/// leaves (passes today).
#[tokio::test(start_paused = true)]
async fn calls_under_distinct_ids_stop_when_their_caller_leaves() {
    assert_eq!(calls_of_a_caller_that_leaves([11, 12, 13, 14], 4).await, 0);
}

/// Four calls under one id: only the last registered used to be stopped;
/// the other three kept their slots for the provider's max budget (300 s).
/// Now a call under an id of its caller's that is running is refused at
/// once: one runs, and it stops when its caller leaves.
#[tokio::test(start_paused = true)]
async fn calls_under_a_reused_id_stop_when_their_caller_leaves() {
    let left = calls_of_a_caller_that_leaves([7, 7, 7, 7], 1).await;
    assert_eq!(
        left, 0,
        "{left} calls of a caller that left still hold the service's slots"
    );
}

/// `Rpc::start` spawns `keep_listed` with a bare `tokio::spawn`, outside
/// every tracker: `Node::shutdown` returns with it still alive (it ends
/// only at its next tick, a third of the registry ttl later, 3.3 s by
/// default, or never returns while the runtime is torn down).
#[tokio::test(start_paused = true)]
async fn no_task_of_a_node_outlives_its_shutdown() {
    let net = MemNetwork::new();
    let a = builder(&net, "a").start().await.unwrap();
    a.rpc().serve("slow", SlowServer::new(Imp)).await.unwrap();
    sleep(S).await;
    a.shutdown().await;
    drop(a);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let metrics = tokio::runtime::Handle::current().metrics();
    let alive = metrics.num_alive_tasks();
    // Past keep_listed's next tick it is gone: it was the one.
    sleep(4 * S).await;
    let later = metrics.num_alive_tasks();
    assert_eq!(
        alive, 0,
        "{alive} task(s) alive after Node::shutdown returned ({later} once keep_listed's next tick passed)"
    );
}

/// `SyncMap::set` returns once the write is "applied locally and queued
/// for the mesh"; the pusher task then takes it from its queue in a
/// `select!` against the shutdown token (unbiased, so a ready token wins
/// half the time, and a batch taken before it is never re-examined).
/// `SyncMap::shutdown` cancels it without draining the queue: writes that
/// `set` acknowledged never leave a node that shuts down gracefully.
#[tokio::test(start_paused = true)]
async fn writes_acknowledged_before_a_graceful_shutdown_reach_the_neighbour() {
    let net = MemNetwork::new();
    let a = builder(&net, "a").start().await.unwrap();
    let b = builder(&net, "b")
        .seed(Address::mem("a"))
        .start()
        .await
        .unwrap();
    b.wait_for_peers(1, 5 * S).await.unwrap();
    a.wait_for_peers(1, 5 * S).await.unwrap();
    // Past the first rounds of anti-entropy: from now on pushes carry writes.
    sleep(3 * S).await;
    const N: usize = 2_560; // ten pushes of the default batch (256)
    // Written without yielding to the scheduler in between (no coop
    // budget): all ten batches are queued when the shutdown starts, and
    // the pusher meets a cancelled token before each (P(all pushed) =
    // 2^-10).
    tokio::task::unconstrained(async {
        for i in 0..N {
            a.sync().set(format!("k{i}"), "v").await.unwrap();
        }
    })
    .await;
    a.shutdown().await;
    sleep(5 * S).await;
    let missing = (0..N)
        .filter(|i| b.sync().get(format!("k{i}")).is_none())
        .count();
    b.shutdown().await;
    assert_eq!(
        missing, 0,
        "{missing} of {N} writes acknowledged by set() never reached the neighbour"
    );
}
