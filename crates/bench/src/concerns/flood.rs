//! Flood delivery time to every node of a 100-node in-memory mesh:
//! `flood_100_nodes` (against direct sends to every node) and
//! `flood_100_nodes_hops` (against the mesh's hop chain); and the time the
//! same mesh takes to tell that a node nobody has cannot be reached:
//! `unreachable_100_nodes` (against the flood).
//!
//! Every node is an endpoint on a [`MemNetwork`] with the default transport
//! config (Noise), a peer manager, and the concerns layer (with its
//! built-in flood concern) plus a recording concern that notes when each
//! 64 B payload arrives. Two networks are built once, before anything is
//! measured, and every side then runs on them in turn:
//!
//! - the *mesh*: the `peers` bench's ([`crate::peers`]), the default
//!   [`PeersConfig`] (`min_peers` 4, `max_peers` 16) on every node, each
//!   seeded with node 0, converged (every node at `min_peers`, one connected
//!   graph) before use;
//! - the *star*: node 0 holds a link to each of the 99 others (its
//!   `max_peers` raised to fit them; the others have `min_peers` 1 and are
//!   seeded with node 0).
//!
//! The sides:
//!
//! - `flood` ([`flood_run`]): node 50 of the mesh calls
//!   [`Context::broadcast`] (TTL 16, the default); timed until the
//!   recording concern of the last of the 99 other nodes has it. Every node
//!   must get it exactly once.
//! - `unicast` ([`unicast_run`]): node 0 of the star calls [`Context::send`]
//!   to each of the 99 others in turn; timed until the last of them has
//!   it. This is what the origin could do instead of flooding if it held a
//!   direct connection to every node: the same delivery by the same layer,
//!   with one copy per node instead of the flood's one per link direction,
//!   and no relaying.
//! - `hops` ([`hops_run`]): the eccentricity `e` of the flood's origin in the
//!   mesh (hops to its farthest node, a breadth-first search over the links
//!   both ends route over, taken at each run) times the one-hop delivery
//!   time: the median time from a direct [`Context::send`] to one of the
//!   origin's neighbours until that neighbour's recording concern has it,
//!   each sent when the previous one arrived. No flood can reach the
//!   farthest node in fewer than `e` hops, so this is the flood with
//!   nothing paid for fanning out: a latency floor.
//! - `unreachable` ([`unreachable_run`]): node 50 of the mesh makes a
//!   routed request ([`Context::request_to`]) to a node id nobody has (a
//!   new one each time); timed until it fails with `Unreachable`. The route
//!   search floods its query like a broadcast, and ends once every node has
//!   answered "not through me" back along the tree the query made, so a
//!   flood out and the echo back is its floor; without those answers it
//!   would wait out the search timeout (3 s).
//!
//! The flood and unicast runs are the median of several rounds each,
//! spaced so that the copies of one have died out before the next. The
//! unicast ratio says what flooding costs over sending to everyone
//! directly; the hops ratio says how far the flood is from its latency
//! floor. The copies each broadcast moves (one per link direction but
//! those back to the origin: about 6 per node here) are printed to stderr
//! with the time half the nodes took.
//!
//! [`Context::broadcast`]: meshwork_concerns::Context::broadcast
//! [`Context::request_to`]: meshwork_concerns::Context::request_to
//! [`Context::send`]: meshwork_concerns::Context::send
//! [`MemNetwork`]: meshwork_transport::mem::MemNetwork
//! [`PeersConfig`]: meshwork_peers::PeersConfig

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use async_trait::async_trait;
use bytes::{BufMut as _, Bytes, BytesMut};
use futures_util::FutureExt as _;
use meshwork_concerns::wire::NodeId;
use meshwork_concerns::{BoxError, Concern, Concerns, ConcernsError, Context, Reply};
use meshwork_peers::{PeerManager, PeersConfig};
use meshwork_transport::mem::MemNetwork;
use meshwork_transport::{Endpoint, Identity};
use tokio::sync::{Mutex, mpsc};

use super::{BENCH, PAYLOAD, median_micros, stop};
use crate::harness::{Options, rotate};
use crate::peers::{
    MeshState, addr, endpoints, mutual_links, shutdown_mesh, start_mesh, wait_converged,
};
use crate::report::{Better, Figure};

/// The recording concern's command id.
const RECORD: u32 = 11;
/// Hops a broadcast may travel: the concerns layer's default.
const FLOOD_TTL: u32 = 16;
/// Time the mesh may take to converge, or the star to form.
const CONVERGE_LIMIT: Duration = Duration::from_secs(60);
/// Time every node may take to get one broadcast or send.
const DELIVERY_LIMIT: Duration = Duration::from_secs(5);
/// Time allowed for one run of one side.
const RUN_LIMIT: Duration = Duration::from_secs(60);
/// Quiet time after each broadcast or round of sends, for the copies still
/// going round to die out before the next one.
const SETTLE: Duration = Duration::from_millis(50);
/// Direct sends before measuring, in each run of the `hops` side.
const HOP_WARMUP: usize = 4;

/// How much work the measurement does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// Nodes of the mesh.
    nodes: usize,
    /// Broadcasts per run of the `flood` side, and rounds of sends per run
    /// of the `unicast` side.
    broadcasts: usize,
    /// Direct sends per run of the `hops` side.
    sends: usize,
}

impl Plan {
    /// A full run.
    pub(crate) const FULL: Plan = Plan {
        nodes: 100,
        broadcasts: 5,
        sends: 12,
    };
    /// A quick run.
    pub(crate) const QUICK: Plan = Plan {
        nodes: 100,
        broadcasts: 3,
        sends: 8,
    };
}

/// A message seen by a recording concern.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    /// The node that got it.
    node: usize,
    /// Its sequence number (the payload's first 8 bytes).
    seq: u64,
    /// When the concern got it.
    at: Instant,
}

/// Notes the arrival of every message for [`RECORD`] on its node.
#[derive(Debug)]
struct Recorder {
    node: usize,
    arrivals: mpsc::Sender<Arrival>,
}

#[async_trait]
impl Concern for Recorder {
    fn command(&self) -> u32 {
        RECORD
    }

    fn name(&self) -> &str {
        "recorder"
    }

    async fn on_request(
        &self,
        _ctx: &Context,
        _from: &NodeId,
        payload: Bytes,
    ) -> Result<Option<Reply>, BoxError> {
        let at = Instant::now();
        let seq: [u8; 8] = payload
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or("payload too short")?;
        let arrival = Arrival {
            node: self.node,
            seq: u64::from_be_bytes(seq),
            at,
        };
        // Full only if the bench stopped reading, i.e. failed already.
        let _ = self.arrivals.try_send(arrival);
        Ok(None)
    }
}

/// How the nodes are linked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// The peer manager's own mesh, every node seeded with node 0; the
    /// origin is node `n / 2`.
    Mesh,
    /// Node 0, the origin, linked to every other node.
    Star,
}

/// Linked nodes, their recorders' arrivals, and the origin.
struct Mesh {
    nodes: Vec<Concerns>,
    managers: Vec<PeerManager>,
    origin: usize,
    arrivals: Mutex<mpsc::Receiver<Arrival>>,
    next_seq: AtomicU64,
    /// For every round, when half of the other nodes had it.
    halfway: std::sync::Mutex<Vec<Duration>>,
}

/// Measures `flood_{nodes}_nodes` against the star's direct sends, and
/// `flood_{nodes}_nodes_hops` against the mesh's hop chain.
pub(crate) async fn measure(opts: &Options, plan: Plan) -> Result<Vec<Figure>> {
    let metric = format!("flood_{}_nodes", plan.nodes);
    let mesh = Arc::new(Mesh::start(plan.nodes, Shape::Mesh).await?);
    let star = match Mesh::start(plan.nodes, Shape::Star).await {
        Ok(star) => Arc::new(star),
        Err(e) => {
            mesh.stop().await;
            return Err(e);
        }
    };
    let (state, ecc) = mesh.shape();
    eprintln!(
        "  {metric}: default PeersConfig, Noise, in memory; {state}; origin node {} with {} \
         links, eccentricity {}",
        mesh.origin,
        mutual_links(&mesh.managers)[mesh.origin].len(),
        ecc.map_or_else(|| "-".into(), |e| e.to_string()),
    );
    let sides = ["unicast", "hops", "flood", "unreachable"];
    let result = rotate(&metric, "us", opts, RUN_LIMIT, &sides, |side| match side {
        0 => unicast_run(star.clone(), plan.broadcasts).boxed(),
        1 => hops_run(mesh.clone(), plan.sends).boxed(),
        2 => flood_run(mesh.clone(), plan.broadcasts).boxed(),
        _ => unreachable_run(mesh.clone(), plan.broadcasts).boxed(),
    })
    .await;
    let counters = mesh.flood_counters();
    let rounds = (opts.runs * plan.broadcasts) as f64;
    // Every copy sent is received once: the first at each node, or a
    // duplicate.
    let copies = counters.1 as f64 / rounds + (plan.nodes - 1) as f64;
    let (flood_half, star_half) = (mesh.halfway(), star.halfway());
    eprintln!(
        "  {metric}: per broadcast: {:.0} copies relayed, {:.0} duplicates absorbed, \
         {:.0} dropped (full lane), {copies:.0} copies received; half the nodes had it \
         after {flood_half:.0} us (median); unicast: after {star_half:.0} us",
        counters.0 as f64 / rounds,
        counters.1 as f64 / rounds,
        counters.2 as f64 / rounds,
    );
    mesh.stop().await;
    star.stop().await;
    let samples = result?;
    let flood = samples.median(2);
    Ok(vec![
        Figure::compared(
            BENCH,
            &metric,
            "us",
            Better::Lower,
            flood,
            ("unicast", samples.median(0)),
        ),
        Figure::compared(
            BENCH,
            format!("{metric}_hops"),
            "us",
            Better::Lower,
            flood,
            ("hops", samples.median(1)),
        ),
        Figure::compared(
            BENCH,
            format!("unreachable_{}_nodes", plan.nodes),
            "us",
            Better::Lower,
            samples.median(3),
            ("flood", flood),
        ),
    ])
}

/// One run of the `unreachable` side: the median over `searches` routed
/// requests to node ids nobody has of the time until each fails with
/// `Unreachable`, in µs.
async fn unreachable_run(mesh: Arc<Mesh>, searches: usize) -> Result<f64> {
    let ctx = mesh.nodes[mesh.origin].context(RECORD);
    let mut samples = Vec::with_capacity(searches);
    for _ in 0..searches {
        let nobody = Identity::generate().node_id().clone();
        let start = Instant::now();
        let outcome = ctx.request_to(&nobody, "anyone?", DELIVERY_LIMIT).await;
        let took = start.elapsed();
        match outcome {
            Err(ConcernsError::Unreachable(_)) => samples.push(took),
            other => bail!("a request to a node nobody has gave {other:?}, not Unreachable"),
        }
        // The "not through me" answers still on their way die out.
        tokio::time::sleep(SETTLE).await;
    }
    median_micros(&mut samples)
}

/// One run of the `flood` side: the median over `broadcasts` broadcasts of
/// the time until the last node has it, in µs.
async fn flood_run(mesh: Arc<Mesh>, broadcasts: usize) -> Result<f64> {
    let ctx = mesh.nodes[mesh.origin].context(RECORD);
    let mut samples = Vec::with_capacity(broadcasts);
    for _ in 0..broadcasts {
        let ctx = &ctx;
        let took = mesh
            .round("broadcast", |payload| async move {
                ctx.broadcast(payload, FLOOD_TTL)
                    .await
                    .context("broadcast")
                    .map(drop)
            })
            .await?;
        samples.push(took);
    }
    median_micros(&mut samples)
}

/// One run of the `unicast` side: the median over `rounds` rounds of the
/// time from the first of the origin's direct sends to the other nodes
/// until the last of them has it, in µs.
async fn unicast_run(star: Arc<Mesh>, rounds: usize) -> Result<f64> {
    let origin = &star.nodes[star.origin];
    let ctx = origin.context(RECORD);
    let others = origin.peers().neighbours();
    ensure!(
        others.len() == star.nodes.len() - 1,
        "the star's centre has {} neighbours, not {}",
        others.len(),
        star.nodes.len() - 1
    );
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let (ctx, others) = (&ctx, &others);
        let took = star
            .round("direct sends", |payload| async move {
                for peer in others {
                    ctx.send(peer, payload.clone())
                        .await
                        .context("direct send")?;
                }
                Ok(())
            })
            .await?;
        samples.push(took);
    }
    median_micros(&mut samples)
}

/// One run of the `hops` side: the origin's eccentricity times the median
/// one-hop delivery time over `sends` direct sends to its neighbours, in
/// µs.
async fn hops_run(mesh: Arc<Mesh>, sends: usize) -> Result<f64> {
    let (_, ecc) = mesh.shape();
    let ecc = ecc.context("the origin does not reach every node")?;
    let origin = &mesh.nodes[mesh.origin];
    let neighbours = origin.peers().neighbours();
    ensure!(!neighbours.is_empty(), "the origin has no neighbours");
    let index = |id: &NodeId| mesh.nodes.iter().position(|n| n.peers().node_id() == id);
    let ctx = origin.context(RECORD);
    let mut samples = Vec::with_capacity(sends);
    for k in 0..HOP_WARMUP + sends {
        let to = &neighbours[k % neighbours.len()];
        let node = index(to).context("a neighbour outside the mesh")?;
        let (seq, payload) = mesh.payload();
        let mut arrivals = mesh.arrivals.lock().await;
        let start = Instant::now();
        ctx.send(to, payload).await.context("direct send")?;
        let deadline = tokio::time::Instant::now() + DELIVERY_LIMIT;
        let at = loop {
            let a = next_arrival(&mut arrivals, deadline)
                .await
                .with_context(|| format!("node {node} did not get the direct send"))?;
            if a.seq == seq {
                ensure!(a.node == node, "node {} got a send for node {node}", a.node);
                break a.at;
            }
        };
        if k >= HOP_WARMUP {
            samples.push(at.saturating_duration_since(start));
        }
    }
    Ok(ecc as f64 * median_micros(&mut samples)?)
}

/// The next arrival, waiting until `deadline`.
async fn next_arrival(
    arrivals: &mut mpsc::Receiver<Arrival>,
    deadline: tokio::time::Instant,
) -> Result<Arrival> {
    match tokio::time::timeout_at(deadline, arrivals.recv()).await {
        Ok(Some(a)) => Ok(a),
        Ok(None) => bail!("every recorder is gone"),
        Err(_) => bail!("nothing arrived within {DELIVERY_LIMIT:?}"),
    }
}

impl Mesh {
    /// Builds `n` nodes linked as `shape` says, and waits until they are.
    async fn start(n: usize, shape: Shape) -> Result<Self> {
        let net = MemNetwork::new();
        let endpoints = endpoints(&net, n).await?;
        let managers = match shape {
            Shape::Mesh => start_mesh(endpoints)?,
            Shape::Star => start_star(endpoints)?,
        };
        let formed = match shape {
            Shape::Mesh => {
                let (converged, state) = wait_converged(&managers, CONVERGE_LIMIT).await;
                match converged {
                    true => Ok(()),
                    false => Err(anyhow!(
                        "{n} nodes did not converge within {CONVERGE_LIMIT:?}: {state}"
                    )),
                }
            }
            Shape::Star => wait_star(&managers).await,
        };
        if let Err(e) = formed {
            shutdown_mesh(managers).await;
            return Err(e);
        }
        // Enough for every recorder to hold a few broadcasts' arrivals.
        let (tx, rx) = mpsc::channel(4 * n);
        let mut nodes = Vec::with_capacity(n);
        for (i, m) in managers.iter().enumerate() {
            let recorder = Recorder {
                node: i,
                arrivals: tx.clone(),
            };
            match Concerns::builder(m.clone()).concern(recorder).start().await {
                Ok(c) => nodes.push(c),
                Err(e) => {
                    stop(&nodes).await;
                    shutdown_mesh(managers).await;
                    return Err(e).with_context(|| format!("node {i}: starting concerns"));
                }
            }
        }
        Ok(Mesh {
            nodes,
            managers,
            origin: match shape {
                Shape::Mesh => n / 2,
                Shape::Star => 0,
            },
            arrivals: Mutex::new(rx),
            next_seq: AtomicU64::new(1),
            halfway: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// A fresh sequence number and a [`PAYLOAD`]-byte payload carrying it.
    fn payload(&self) -> (u64, Bytes) {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let mut buf = BytesMut::with_capacity(PAYLOAD);
        buf.put_u64(seq);
        buf.resize(PAYLOAD, 0xa5);
        (seq, buf.freeze())
    }

    /// One timed round: `send` is given a fresh payload and sends it from
    /// the origin (by broadcast or direct sends); the time until every
    /// other node's recorder had it exactly once. Notes when half of them
    /// had it, then waits [`SETTLE`].
    async fn round<F, Fut>(&self, what: &str, send: F) -> Result<Duration>
    where
        F: FnOnce(Bytes) -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let others = self.nodes.len() - 1;
        let (seq, payload) = self.payload();
        let mut arrivals = self.arrivals.lock().await;
        let start = Instant::now();
        send(payload).await?;
        let deadline = tokio::time::Instant::now() + DELIVERY_LIMIT;
        let mut got = vec![false; self.nodes.len()];
        let mut times = Vec::with_capacity(others);
        while times.len() < others {
            let a = next_arrival(&mut arrivals, deadline)
                .await
                .with_context(|| format!("{} of {others} nodes got the {what}", times.len()))?;
            if a.seq != seq {
                continue;
            }
            ensure!(a.node != self.origin, "the origin got its own {what}");
            ensure!(!got[a.node], "node {} got the {what} twice", a.node);
            got[a.node] = true;
            times.push(a.at.saturating_duration_since(start));
        }
        drop(arrivals);
        times.sort_unstable();
        lock(&self.halfway).push(times[others / 2]);
        tokio::time::sleep(SETTLE).await;
        Ok(times[others - 1])
    }

    /// The median over every round so far of the time until half the
    /// other nodes had it, in µs.
    fn halfway(&self) -> f64 {
        median_micros(&mut lock(&self.halfway).clone()).unwrap_or(f64::NAN)
    }

    /// The mesh's state now, and the origin's eccentricity (`None` if it
    /// does not reach every node).
    fn shape(&self) -> (MeshState, Option<usize>) {
        let min = self.managers[0].config().min_peers();
        let state = MeshState::of(&self.managers, min);
        let links = mutual_links(&self.managers);
        (state, eccentricity(&links, self.origin))
    }

    /// The flood concern's counters summed over the mesh: relayed,
    /// duplicates, dropped.
    fn flood_counters(&self) -> (u64, u64, u64) {
        let mut sums = (0, 0, 0);
        for n in &self.nodes {
            for (concern, counter, value) in n.builtin_stats() {
                match (concern, counter) {
                    ("flood", "relayed") => sums.0 += value,
                    ("flood", "duplicates") => sums.1 += value,
                    ("flood", "dropped") => sums.2 += value,
                    _ => {}
                }
            }
        }
        sums
    }

    /// Shuts every node down.
    async fn stop(&self) {
        stop(&self.nodes).await;
    }
}

/// Starts a manager on every endpoint: node 0 with room for all the others
/// (`max_peers` beyond them and its outbound reserve), every other node
/// seeded with node 0 and content with that one peer (`min_peers` 1).
fn start_star(endpoints: Vec<Endpoint>) -> Result<Vec<PeerManager>> {
    let n = endpoints.len();
    endpoints
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let config = match i {
                0 => PeersConfig::default().with_max_peers(n + 8),
                _ => PeersConfig::default().with_min_peers(1).with_seed(addr(0)),
            };
            PeerManager::start(e, config).with_context(|| format!("star node {i}"))
        })
        .collect()
}

/// Waits until node 0 and every other node have each other as responsive
/// neighbours.
async fn wait_star(managers: &[PeerManager]) -> Result<()> {
    let deadline = Instant::now() + CONVERGE_LIMIT;
    let centre = &managers[0];
    loop {
        let linked = managers[1..]
            .iter()
            .filter(|m| m.is_neighbour(centre.node_id()) && centre.is_neighbour(m.node_id()))
            .count();
        if linked == managers.len() - 1 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the star did not form within {CONVERGE_LIMIT:?}: {linked} of {} linked",
                managers.len() - 1
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Locks `m`, whether or not a holder panicked.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Hops from `from` to the farthest node over `links`; `None` if some node
/// cannot be reached.
pub(crate) fn eccentricity(links: &[Vec<usize>], from: usize) -> Option<usize> {
    let mut hops = vec![None; links.len()];
    *hops.get_mut(from)? = Some(0);
    let mut queue = VecDeque::from([from]);
    while let Some(i) = queue.pop_front() {
        let next = hops[i].map(|h: usize| h + 1);
        for &j in &links[i] {
            if hops[j].is_none() {
                hops[j] = next;
                queue.push_back(j);
            }
        }
    }
    hops.into_iter().try_fold(0, |far, h| Some(far.max(h?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eccentricity_is_the_farthest_hop_count() {
        let line = [vec![1], vec![0, 2], vec![1, 3], vec![2]];
        assert_eq!(eccentricity(&line, 0), Some(3));
        assert_eq!(eccentricity(&line, 1), Some(2));
        assert_eq!(eccentricity(&[vec![], vec![]], 0), None);
        assert_eq!(eccentricity(&[vec![]], 0), Some(0));
        assert_eq!(eccentricity(&[], 0), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_side_runs_on_a_small_mesh() {
        let mesh = Arc::new(Mesh::start(12, Shape::Mesh).await.unwrap());
        let star = Arc::new(Mesh::start(12, Shape::Star).await.unwrap());
        let hops = hops_run(mesh.clone(), 3).await;
        let flood = flood_run(mesh.clone(), 2).await;
        let unicast = unicast_run(star.clone(), 2).await;
        let unreachable = unreachable_run(mesh.clone(), 2).await;
        mesh.stop().await;
        star.stop().await;
        assert!(hops.unwrap() > 0.0);
        assert!(flood.unwrap() > 0.0);
        assert!(unicast.unwrap() > 0.0);
        // Well within the search timeout (3 s): every node said no.
        let unreachable = unreachable.unwrap();
        assert!(unreachable > 0.0 && unreachable < 2e6, "{unreachable} us");
    }
}
