//! Concurrency review: `Concern::on_reply` and `Concern::tick` run outside
//! the layer's concurrency limit and outside its shutdown cancellation.
//!
//! `Inner::resolve` spawns one task per reply nobody waits for
//! (`self.tracker.spawn(on_reply)`), without the `cancel` select that
//! `Inner::spawn` gives request handlers and without any bound, and
//! `Concerns::shutdown` then waits for the tracker: a late reply whose
//! `on_reply` waits keeps `shutdown` from returning, and a peer sending
//! replies nobody asked for makes the node run any number of `on_reply`
//! at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use meshwork_concerns::peers::{ConcernFrame, PeerManager, PeersConfig};
use meshwork_concerns::transport::Priority;
use meshwork_concerns::transport::mem::MemNetwork;
use meshwork_concerns::wire::proto::ConcernKind;
use meshwork_concerns::wire::{Message, NodeId};
use meshwork_concerns::{BoxError, Concern, Concerns, ConcernsError, Context, Reply};
use tokio::time::{sleep, timeout};

mod support;
use support::listening;

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);
const LATE: u32 = 71;

/// Answers after 2 s; its `on_reply` (for late replies) waits for good,
/// as one forwarding to a full application channel would; counts the
/// `on_reply` calls running at once.
struct Late {
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    tick_forever: bool,
}

#[async_trait]
impl Concern for Late {
    fn command(&self) -> u32 {
        LATE
    }

    fn tick_interval(&self) -> Option<Duration> {
        self.tick_forever.then_some(100 * MS)
    }

    async fn tick(&self, _ctx: &Context) {
        std::future::pending::<()>().await;
    }

    async fn on_request(
        &self,
        _ctx: &Context,
        _from: &NodeId,
        payload: Bytes,
    ) -> Result<Option<Reply>, BoxError> {
        sleep(2 * S).await;
        Ok(Some(Reply::new(payload)))
    }

    async fn on_reply(&self, _ctx: &Context, _from: &NodeId, _payload: Bytes) {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        std::future::pending::<()>().await;
    }
}

fn late(tick_forever: bool) -> (Arc<dyn Concern>, Arc<AtomicUsize>) {
    let peak = Arc::new(AtomicUsize::new(0));
    let c = Late {
        running: Arc::new(AtomicUsize::new(0)),
        peak: peak.clone(),
        tick_forever,
    };
    (Arc::new(c), peak)
}

async fn node(net: &MemNetwork, name: &str, seeds: &[&str], concern: Arc<dyn Concern>) -> Concerns {
    let endpoint = listening(net, name).await;
    let seeds = seeds.iter().map(|a| a.parse().unwrap());
    let peers = PeerManager::start(endpoint, PeersConfig::default().with_seeds(seeds)).unwrap();
    Concerns::builder(peers)
        .only(vec![concern])
        .start()
        .await
        .unwrap()
}

/// A reply that comes after its request timed out goes to `on_reply`; an
/// `on_reply` that waits must not keep `Concerns::shutdown` from
/// returning (request handlers are dropped at shutdown, on_reply is not).
#[tokio::test(start_paused = true)]
async fn shutdown_returns_while_an_on_reply_waits() {
    let net = MemNetwork::new();
    let (cs, _) = late(false);
    let (cc, peak) = late(false);
    let s = node(&net, "s", &[], cs).await;
    let c = node(&net, "c", &["mem://s"], cc).await;
    c.peers().wait_for_peers(1, 5 * S).await.unwrap();
    let ctx = c.context(LATE);
    let r = ctx.request(s.peers().node_id(), "x", S).await;
    assert!(matches!(r, Err(ConcernsError::Timeout(_))), "{r:?}");
    // The late answer arrives and goes to c's on_reply.
    sleep(2 * S).await;
    assert_eq!(peak.load(Ordering::SeqCst), 1, "on_reply runs");
    let stopped = timeout(10 * S, c.shutdown()).await;
    assert!(
        stopped.is_ok(),
        "Concerns::shutdown still waits 10 s later for an on_reply task"
    );
    s.shutdown().await;
    s.peers().shutdown().await;
    c.peers().shutdown().await;
}

/// A tick in progress must not keep `Concerns::shutdown` from returning
/// either (the tick task only checks `cancel` between ticks).
#[tokio::test(start_paused = true)]
async fn shutdown_returns_while_a_tick_waits() {
    let net = MemNetwork::new();
    let (cs, _) = late(true);
    let s = node(&net, "s", &[], cs).await;
    sleep(S).await;
    let stopped = timeout(10 * S, s.shutdown()).await;
    assert!(
        stopped.is_ok(),
        "Concerns::shutdown still waits 10 s later for a tick in progress"
    );
    s.peers().shutdown().await;
}

/// Replies nobody asked for, from a neighbour: each starts an `on_reply`
/// task, with no bound (requests of the same concern are held to its
/// `max_concurrency`, 16 by default, and per-sender queues).
#[tokio::test(start_paused = true)]
async fn unsolicited_replies_do_not_run_unbounded_on_reply_tasks() {
    let net = MemNetwork::new();
    let (cs, peak) = late(false);
    let s = node(&net, "s", &[], cs).await;
    let endpoint = listening(&net, "m").await;
    let m = PeerManager::start(
        endpoint,
        PeersConfig::default().with_seeds(["mem://s".parse().unwrap()]),
    )
    .unwrap();
    m.wait_for_peers(1, 5 * S).await.unwrap();
    let to = s.peers().node_id().clone();
    for id in 1..=2_000u64 {
        let frame = ConcernFrame {
            command: LATE,
            request_id: id,
            kind: ConcernKind::Reply as i32,
            ttl: 0,
            flags: 0,
            payload: Bytes::from_static(b"unasked"),
        };
        m.send(&to, Message::Concern(frame), Priority::Normal)
            .await
            .unwrap();
    }
    sleep(S).await;
    let peak = peak.load(Ordering::SeqCst);
    assert!(
        peak <= 64,
        "{peak} on_reply calls running at once for one neighbour's unasked replies"
    );
    m.shutdown().await;
    let _ = timeout(S, s.shutdown()).await;
}
