//! The `sync` bench: the replicated map (`meshwork-sync`) on meshes of
//! [`Node`]s built by the `meshwork` facade, each figure beside a baseline
//! measured in the same run (the sides taking turns, medians over the runs,
//! see [`crate::harness::rotate`]) unless said otherwise.
//!
//! Every node is a [`Node`] with the defaults: Noise, the default
//! [`PeersConfig`](meshwork::peers::PeersConfig) (`min_peers` 4,
//! `max_peers` 16), the default [`SyncConfig`] (leasing on, anti-entropy
//! every 2 s), every node but the first seeded with the first. Its
//! transport is wrapped in a byte counter ([`count`]), so "bytes" are what
//! the node writes on the wire: Noise records, frame prefixes, heartbeats
//! and everything else included. Keys are 16 bytes, values 32.
//!
//! - `write_to_all_{10,100}_nodes_{p50,p99}` (in memory),
//!   `write_to_all_10_nodes_tcp_{p50,p99}` (loopback TCP) and
//!   `write_to_all_{10,100}_nodes_1ms_{p50,p99}` (in memory, 1 ms added to
//!   every link each way), µs: from
//!   [`SyncMap::set`](meshwork::sync::SyncMap::set) on one node (each write
//!   from the next node in turn) until every other node's
//!   [`watch`](meshwork::sync::SyncMap::watch) has reported it. Baseline
//!   `diam×rtt`: the mesh's diameter (in hops, over the links both ends
//!   route over) times the round trip of a direct concern request between
//!   neighbours of the same mesh (median for p50, p99 for p99), measured in
//!   the same run. The target: p50 at most 2× that. In process and
//!   on loopback a link round trip is a few µs of CPU while a write to all
//!   costs CPU for every copy the flood makes, so there the ratio measures
//!   the fan-out's CPU on 2 cores; the `_1ms` meshes, where links take
//!   time as real ones do, are where the target means what the issue meant
//!   ("no waiting for a gossip round"). `write_to_all_*_p50_flood`: the same
//!   p50 against `flood`, the concerns layer's flood of the same payload to
//!   a plain concern: what the map adds to the flood it rides on. 100 nodes
//!   over TCP are left out: 100 nodes with their sockets, Noise and timers
//!   on 2 cores measure the scheduler more than the map. See [`latency`].
//! - `bytes_per_update_{10,100}_nodes` (B): the bytes written by every node
//!   of the in-memory mesh during the measured writes above, divided by
//!   writes × (nodes − 1). Baseline `1_copy`: the same, on a 2-node mesh,
//!   where each write is pushed once to its one receiver: what one copy of
//!   a push costs, in whatever format the sync layer uses. Target ≤ 150 B (the
//!   issue's; chitchat reports ~90-150 B per update per receiver, a figure
//!   quoted, not measured here).
//! - `idle_bytes_per_node_s` (B/s): bytes written per node per second by an
//!   idle, converged 10-node in-memory mesh with anti-entropy every 2 s.
//!   Baseline `ae_off`: an identical mesh whose anti-entropy interval is an
//!   hour (heartbeats and the rest of the node only), measured over the same
//!   windows. See [`idle`].
//! - `heal_10k_conflicts_10_nodes` (ms): a 10-node in-memory mesh split in
//!   two halves of 5 (every node blocks every node of the other half), each
//!   half writing the same 10k keys with its own values; once each half
//!   agrees, the blocks are lifted and the time until all 10 digests are
//!   equal is measured. Baseline `ae_interval`: the anti-entropy interval
//!   (2 s), a setting, not a measurement; target ratio ≤ 1 (the issue's:
//!   heal within one interval after connectivity returns). See [`heal`].
//! - `catchup_100k_keys_tcp` (ms): a node joining a 2-node loopback TCP mesh
//!   holding 100k keys, from its start until its digest equals theirs.
//!   Baseline `raw_tcp`: as many bytes as the keys and values, written on a
//!   plain TCP connection from connect until the other end has read them. `idle_cpu_100k_keys_2_nodes` (% of a core):
//!   the process's CPU over 2 s while the two nodes hold the keys and
//!   nothing happens, against `empty`, the same nodes before the writes.
//!   See [`catchup`].
//! - `writes_per_s` (writes/s): `set` in a loop on one node of a 2-node
//!   in-memory mesh. Baseline `mutex_map`: the same keys and values inserted
//!   into a `Mutex<HashMap<Bytes, Bytes>>`, a lower bound on what any
//!   shared map costs. See [`writes`].
//!
//! Besides the figures, stderr shows what explains them: copies of each
//! flood per receiver, pushes refused by receivers for a full queue, the
//! cores busy during the writes, what a joiner received.
//!
//! [`Node`]: meshwork::Node

pub(crate) mod catchup;
pub(crate) mod count;
pub(crate) mod heal;
pub(crate) mod idle;
pub(crate) mod latency;
pub(crate) mod writes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use async_trait::async_trait;
use bytes::Bytes;
use meshwork::Node;
use meshwork::concerns::{BoxError, Concern, Context, Reply};
use meshwork::peers::PeerManager;
use meshwork::sync::SyncConfig;
use meshwork::transport::mem::MemNetwork;
use meshwork::transport::{Address, TcpTransport};
use meshwork::wire::NodeId;
use tokio::sync::mpsc;

use crate::concerns::flood::eccentricity;
use crate::concerns::{ECHO, Echo};
use crate::harness::Options;
use crate::peers::mutual_links;
use crate::report::Figure;

/// The bench's name, in every figure.
pub(crate) const BENCH: &str = "sync";
/// Network id of every node.
const NETWORK: &str = "bench-sync";
/// The sink concern's command id (the `flood` side's broadcasts).
const SINK: u32 = 12;
/// Bytes of every key.
const KEY_LEN: usize = 16;
/// Bytes of every value.
const VALUE_LEN: usize = 32;
/// Time a mesh may take to link up.
const LINK_LIMIT: Duration = Duration::from_secs(60);

/// How much work each measurement does.
#[derive(Debug, Clone, Copy)]
struct Plan {
    latency: latency::Plan,
    idle: idle::Plan,
    heal: heal::Plan,
    catchup: catchup::Plan,
    writes: writes::Plan,
}

impl Plan {
    /// The plan for a full run, or a shorter one with `quick`.
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                latency: latency::Plan::QUICK,
                idle: idle::Plan::QUICK,
                heal: heal::Plan::QUICK,
                catchup: catchup::Plan::QUICK,
                writes: writes::Plan::QUICK,
            }
        } else {
            Plan {
                latency: latency::Plan::FULL,
                idle: idle::Plan::FULL,
                heal: heal::Plan::FULL,
                catchup: catchup::Plan::FULL,
                writes: writes::Plan::FULL,
            }
        }
    }
}

/// Runs the bench: write-to-all latency and bytes, idle bytes, heal,
/// catch-up, writes per second.
pub(crate) async fn run(opts: &Options) -> Result<Vec<Figure>> {
    let plan = Plan::new(opts.quick);
    let mut figures = latency::measure(opts, plan.latency).await?;
    figures.push(idle::measure(opts, plan.idle).await?);
    figures.push(heal::measure(opts, plan.heal).await?);
    figures.extend(catchup::measure(opts, plan.catchup).await?);
    figures.push(writes::measure(opts, plan.writes).await?);
    Ok(figures)
}

/// What carries a mesh's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Net {
    /// The in-memory network.
    Mem,
    /// Loopback TCP.
    Tcp,
}

/// A message seen by a node's sink concern.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Delivery {
    /// The node that got it.
    pub(crate) node: usize,
}

/// Notes every message it gets, and drops it.
#[derive(Debug)]
struct Sink {
    node: usize,
    deliveries: mpsc::UnboundedSender<Delivery>,
}

#[async_trait]
impl Concern for Sink {
    fn command(&self) -> u32 {
        SINK
    }

    fn name(&self) -> &str {
        "sink"
    }

    async fn on_request(
        &self,
        _ctx: &Context,
        _from: &NodeId,
        _payload: Bytes,
    ) -> Result<Option<Reply>, BoxError> {
        // Closed only if the bench stopped reading.
        let _ = self.deliveries.send(Delivery { node: self.node });
        Ok(None)
    }
}

/// The name of node `i` on the in-memory network.
fn host(i: usize) -> String {
    format!("s{i}")
}

/// One node, started and listening: on `mem://s{i}` of `mem`, or on a
/// loopback port without it; seeded with `seed` if given. Its sink
/// reports to `deliveries`.
pub(crate) async fn start_node(
    i: usize,
    mem: Option<&MemNetwork>,
    seed: Option<&Address>,
    sync: SyncConfig,
    deliveries: mpsc::UnboundedSender<Delivery>,
) -> Result<(Node, Arc<count::Bytes>)> {
    let mut builder = Node::builder(NETWORK)
        .sync_config(sync)
        .concern(Echo)
        .concern(Sink {
            node: i,
            deliveries,
        });
    if let Some(seed) = seed {
        builder = builder.seed(seed.clone());
    }
    let (builder, bytes) = match mem {
        Some(net) => {
            let t = count::Counting::new(net.transport(&host(i)));
            let bytes = t.bytes();
            (builder.transport(t).listen(Address::mem(host(i))), bytes)
        }
        None => {
            let t = count::Counting::new(TcpTransport::new());
            let bytes = t.bytes();
            let any: Address = "tcp://127.0.0.1:0".parse()?;
            (builder.transport(t).listen(any), bytes)
        }
    };
    let node = builder
        .start()
        .await
        .with_context(|| format!("starting node {i}"))?;
    Ok((node, bytes))
}

/// Nodes linked into one mesh, each with its byte counters.
pub(crate) struct Mesh {
    pub(crate) nodes: Vec<Node>,
    pub(crate) bytes: Vec<Arc<count::Bytes>>,
    /// The in-memory network, for an in-memory mesh.
    pub(crate) mem: Option<MemNetwork>,
    /// What the nodes' sinks got.
    pub(crate) deliveries: tokio::sync::Mutex<mpsc::UnboundedReceiver<Delivery>>,
    /// For nodes started later.
    pub(crate) deliveries_tx: mpsc::UnboundedSender<Delivery>,
}

impl Mesh {
    /// Starts `n` nodes on `net` with `sync`, every node but node 0 seeded
    /// with node 0, and waits until each has `min(4, n − 1)` links and the
    /// links form one connected graph.
    pub(crate) async fn start(n: usize, net: Net, sync: &SyncConfig) -> Result<Mesh> {
        Self::start_with_latency(n, net, sync, Duration::ZERO).await
    }

    /// [`Mesh::start`], with `latency` added to every byte each way on the
    /// in-memory network.
    pub(crate) async fn start_with_latency(
        n: usize,
        net: Net,
        sync: &SyncConfig,
        latency: Duration,
    ) -> Result<Mesh> {
        let mem = (net == Net::Mem).then(MemNetwork::new);
        if let Some(mem) = &mem {
            mem.set_default_latency(latency);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let mut mesh = Mesh {
            nodes: Vec::with_capacity(n),
            bytes: Vec::with_capacity(n),
            mem,
            deliveries: tokio::sync::Mutex::new(rx),
            deliveries_tx: tx,
        };
        let mut seed = None;
        for i in 0..n {
            let started = start_node(
                i,
                mesh.mem.as_ref(),
                seed.as_ref(),
                sync.clone(),
                mesh.deliveries_tx.clone(),
            )
            .await;
            let (node, bytes) = match started {
                Ok(s) => s,
                Err(e) => {
                    mesh.stop().await;
                    return Err(e);
                }
            };
            if seed.is_none() {
                seed = node.listen_addrs().first().cloned();
            }
            mesh.nodes.push(node);
            mesh.bytes.push(bytes);
        }
        if let Err(e) = mesh.wait_linked(n.saturating_sub(1).min(4)).await {
            mesh.stop().await;
            return Err(e);
        }
        Ok(mesh)
    }

    /// Waits until every node has `min` links and the mesh is connected.
    async fn wait_linked(&self, min: usize) -> Result<()> {
        let deadline = tokio::time::Instant::now() + LINK_LIMIT;
        let counts = futures_util::future::join_all(
            self.nodes
                .iter()
                .map(|n| n.peers().wait_for_peers(min, LINK_LIMIT)),
        );
        let _ = tokio::time::timeout_at(deadline, counts).await;
        loop {
            let links = self.links();
            let low = links.iter().filter(|l| l.len() < min).count();
            if low == 0 && diameter(&links).is_some() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{} nodes did not link up within {LINK_LIMIT:?}: {low} below {min} links, \
                     connected: {}",
                    self.nodes.len(),
                    diameter(&links).is_some()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The peer managers, in node order.
    pub(crate) fn managers(&self) -> Vec<PeerManager> {
        self.nodes.iter().map(|n| n.peers().clone()).collect()
    }

    /// The links both ends route over ([`mutual_links`]).
    pub(crate) fn links(&self) -> Vec<Vec<usize>> {
        mutual_links(&self.managers())
    }

    /// Bytes written by every node so far.
    pub(crate) fn sent(&self) -> u64 {
        self.bytes.iter().map(|b| b.sent()).sum()
    }

    /// Every node's digest.
    pub(crate) fn digests(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.sync().digest()).collect()
    }

    /// Shuts every node down, all at once.
    pub(crate) async fn stop(&self) {
        futures_util::future::join_all(self.nodes.iter().map(Node::shutdown)).await;
    }
}

/// The largest eccentricity over `links`; `None` if the graph is not
/// connected (or empty).
pub(crate) fn diameter(links: &[Vec<usize>]) -> Option<usize> {
    if links.is_empty() {
        return None;
    }
    (0..links.len()).try_fold(0, |d, i| Some(d.max(eccentricity(links, i)?)))
}

/// True if the nodes `members` are connected by the links among them.
pub(crate) fn connected_among(links: &[Vec<usize>], members: &[usize]) -> bool {
    let Some(&first) = members.first() else {
        return true;
    };
    let mut seen = vec![false; links.len()];
    seen[first] = true;
    let mut stack = vec![first];
    let mut count = 1;
    while let Some(i) = stack.pop() {
        for &j in &links[i] {
            if members.contains(&j) && !seen[j] {
                seen[j] = true;
                count += 1;
                stack.push(j);
            }
        }
    }
    count == members.len()
}

/// The 16-byte key of write `seq` under the 2-byte `prefix`.
pub(crate) fn key(prefix: &str, seq: u64) -> String {
    debug_assert_eq!(prefix.len(), 2);
    let key = format!("{prefix}{seq:014}");
    debug_assert_eq!(key.len(), KEY_LEN);
    key
}

/// A 32-byte value with `tag` in its first byte.
pub(crate) fn value(tag: u8) -> Bytes {
    let mut v = vec![0x5a; VALUE_LEN];
    v[0] = tag;
    Bytes::from(v)
}

/// The value at quantile `q` (nearest rank) of `sorted`, in µs.
pub(crate) fn quantile_micros(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1e6
}

/// Polls `done` every `every` until it is true, for at most `limit`;
/// the time it took.
pub(crate) async fn wait_until(
    what: &str,
    limit: Duration,
    every: Duration,
    mut done: impl FnMut() -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if done() {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= limit {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Locks `m`, whether or not a holder panicked.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Time every live thread of this process has spent on a CPU, in ns
/// (`/proc/self/task/*/schedstat`, first field).
pub(crate) fn process_cpu_ns() -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc/self/task").context("listing /proc/self/task")? {
        let entry = entry.context("listing /proc/self/task")?;
        // A thread may end between the listing and the read.
        if let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) {
            total += text
                .split_whitespace()
                .next()
                .and_then(|ns| ns.parse::<u64>().ok())
                .with_context(|| format!("unexpected schedstat: {text:?}"))?;
        }
    }
    Ok(total)
}

/// The flood concern's counters summed over `nodes`: relayed, duplicates,
/// dropped (full lane).
pub(crate) fn flood_counters(nodes: &[Node]) -> (u64, u64, u64) {
    let mut sums = (0, 0, 0);
    for n in nodes {
        for (concern, counter, value) in n.concerns().builtin_stats() {
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

/// Messages for the sync and flood concerns that `nodes` refused because
/// their sender's queue was full (`ConcernStats::dropped`).
pub(crate) fn inbound_drops(nodes: &[Node]) -> u64 {
    nodes
        .iter()
        .flat_map(|n| n.concerns().stats())
        .filter(|c| c.name == "sync" || c.name == "flood")
        .map(|c| c.dropped)
        .sum()
}

/// True if every value of `v` is the same.
pub(crate) fn all_equal(v: &[u64]) -> bool {
    v.windows(2).all(|w| w[0] == w[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diameters_and_halves() {
        let line = [vec![1], vec![0, 2], vec![1, 3], vec![2]];
        assert_eq!(diameter(&line), Some(3));
        assert_eq!(diameter(&[vec![1], vec![0], vec![]]), None);
        assert_eq!(diameter(&[]), None);
        assert!(connected_among(&line, &[0, 1]));
        assert!(!connected_among(&line, &[0, 2]));
        assert!(connected_among(&line, &[]));
    }

    #[test]
    fn keys_values_quantiles() {
        assert_eq!(key("w/", 42), "w/00000000000042");
        assert_eq!(value(3).len(), VALUE_LEN);
        let ms = |n| Duration::from_millis(n);
        let sorted: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(quantile_micros(&sorted, 0.5), 50_000.0);
        assert_eq!(quantile_micros(&sorted, 0.99), 99_000.0);
        assert_eq!(quantile_micros(&sorted[..1], 0.99), 1_000.0);
        assert!(quantile_micros(&[], 0.5).is_nan());
        assert!(all_equal(&[1, 1, 1]) && !all_equal(&[1, 2]));
        assert!(process_cpu_ns().unwrap() > 0);
    }
}
