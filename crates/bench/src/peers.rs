//! The `peers` bench: the peer manager (`meshwork-peers`) with hundreds of
//! nodes in one process, on the in-memory network ([`MemNetwork`]), in real
//! time on a multi-threaded runtime, every endpoint with the default
//! transport [`Config`] (Noise) unless said otherwise.
//!
//! Figures, each against a baseline measured in the same run, the sides
//! taking turns ([`crate::harness::rotate`]):
//!
//! - `converge_100_nodes`, `converge_500_nodes` (ms): N nodes with the
//!   default [`PeersConfig`] (`min_peers` 4, `max_peers` 16, tick 250 ms),
//!   each seeded with node 0 only, from starting the managers until every
//!   node has at least `min_peers` links and the links form one connected
//!   graph (a link counts when both ends' managers route to each other).
//!   Baseline `star`: the same N endpoints without managers, each completing
//!   one handshake with node 0. That is the least any join through one seed
//!   could cost, so the ratio is what discovering peers, dialling them at
//!   the manager's pace and settling the pool add to it. See [`converge`];
//!   the 500-node runs happen in the children of [`memory`], which build
//!   that mesh anyway.
//! - `mem_per_node_500` (KiB): resident memory per node of a converged
//!   500-node mesh, in a fresh child process per run. Baseline `bare`: 500
//!   endpoints without managers holding as many connections as that mesh
//!   (a star around node 0, then a ring lattice), nobody reading them. The
//!   ratio is what the manager adds to the connections it keeps: pool,
//!   address book, queues, a reader task per link, and whatever the heap
//!   kept from getting there. See [`memory`].
//! - `heartbeat_cpu_500_peers` (% of one core): a hub whose manager
//!   (`max_peers` 512) holds 500 idle peers and pings each after 1 s of
//!   silence; the CPU time of the hub's threads over a fixed window. The
//!   leaves are bare endpoints on a runtime of their own in the same
//!   process, so their share (answering Pings) is counted apart. Baseline
//!   `keepalive`: the same hub and leaves without a manager, the hub's
//!   transport keepalive set to the same interval. See [`heartbeat`].

pub(crate) mod converge;
pub(crate) mod heartbeat;
pub(crate) mod memory;

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use anyhow::{Context as _, Result};
use meshwork_peers::{PeerManager, PeersConfig};
use meshwork_transport::mem::MemNetwork;
use meshwork_transport::{Address, Config, Endpoint};
use meshwork_wire::NodeId;

use crate::harness::Options;
use crate::report::Figure;

/// The bench's name, in every figure.
pub(crate) const BENCH: &str = "peers";
/// Network id of every endpoint.
const NETWORK: &str = "bench-peers";

/// How much work each measurement does.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Nodes of the convergence figure measured in this process (the larger
    /// one comes with the memory figure).
    converge_nodes: usize,
    /// The memory measurement, and the larger convergence figure.
    memory: memory::Plan,
    /// The heartbeat measurement.
    heartbeat: heartbeat::Plan,
}

impl Plan {
    /// The plan for a full run, or a shorter one with `quick`.
    fn new(quick: bool) -> Self {
        Plan {
            converge_nodes: 100,
            memory: if quick {
                memory::Plan::QUICK
            } else {
                memory::Plan::FULL
            },
            heartbeat: if quick {
                heartbeat::Plan::QUICK
            } else {
                heartbeat::Plan::FULL
            },
        }
    }
}

/// Runs the bench: convergence, memory, heartbeat CPU.
pub(crate) async fn run(opts: &Options) -> Result<Vec<Figure>> {
    let plan = Plan::new(opts.quick);
    let mut figures = vec![converge::measure(opts, plan.converge_nodes).await?];
    figures.extend(memory::measure(opts, plan.memory).await?);
    figures.push(heartbeat::measure(opts, plan.heartbeat).await?);
    Ok(figures)
}

/// The name of node `i`: its host on the in-memory network.
fn host(i: usize) -> String {
    format!("n{i}")
}

/// The address node `i` listens on.
pub(crate) fn addr(i: usize) -> Address {
    Address::mem(host(i))
}

/// The default transport configuration (encrypted, keepalive on).
fn transport_config() -> Config {
    Config::new(NETWORK)
}

/// `n` endpoints on `net` with [`transport_config`], node `i` listening on
/// [`addr`]`(i)`.
pub(crate) async fn endpoints(net: &MemNetwork, n: usize) -> Result<Vec<Endpoint>> {
    let mut all = Vec::with_capacity(n);
    for i in 0..n {
        let endpoint = Endpoint::new(transport_config(), net.transport(&host(i)));
        endpoint
            .listen(&addr(i))
            .await
            .with_context(|| format!("node {i} listening"))?;
        all.push(endpoint);
    }
    Ok(all)
}

/// The peer manager settings of the mesh figures: the defaults, seeded with
/// node 0 for every other node.
fn mesh_config(i: usize) -> PeersConfig {
    let config = PeersConfig::default();
    if i == 0 {
        config
    } else {
        config.with_seed(addr(0))
    }
}

/// Starts a manager on every endpoint, node `i` with [`mesh_config`]`(i)`.
pub(crate) fn start_mesh(endpoints: Vec<Endpoint>) -> Result<Vec<PeerManager>> {
    endpoints
        .into_iter()
        .enumerate()
        .map(|(i, e)| PeerManager::start(e, mesh_config(i)).with_context(|| format!("node {i}")))
        .collect()
}

/// Shuts every manager down, all at once.
pub(crate) async fn shutdown_mesh(nodes: Vec<PeerManager>) {
    futures_util::future::join_all(nodes.iter().map(|n| n.shutdown())).await;
}

/// The links of a mesh: node `j` is in `links[i]` when both `i` and `j`
/// have a route to each other (a live, adopted connection on both sides).
pub(crate) fn mutual_links(nodes: &[PeerManager]) -> Vec<Vec<usize>> {
    let index: HashMap<&NodeId, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.node_id(), i))
        .collect();
    // Who each node routes to, from its open connections (cheap, unlike a
    // snapshot of the whole address book).
    let routed: Vec<Vec<usize>> = nodes
        .iter()
        .map(|n| {
            let mut peers: Vec<usize> = n
                .endpoint()
                .connections()
                .iter()
                .filter(|c| n.connection(c.node_id()).is_some())
                .filter_map(|c| index.get(c.node_id()).copied())
                .collect();
            peers.sort_unstable();
            peers.dedup();
            peers
        })
        .collect();
    routed
        .iter()
        .enumerate()
        .map(|(i, peers)| {
            peers
                .iter()
                .copied()
                .filter(|&j| routed[j].binary_search(&i).is_ok())
                .collect()
        })
        .collect()
}

/// Nodes reachable from node 0 over `links`.
fn reachable(links: &[Vec<usize>]) -> usize {
    if links.is_empty() {
        return 0;
    }
    let mut seen = vec![false; links.len()];
    let mut queue = VecDeque::from([0]);
    seen[0] = true;
    let mut count = 1;
    while let Some(i) = queue.pop_front() {
        for &j in &links[i] {
            if !seen[j] {
                seen[j] = true;
                count += 1;
                queue.push_back(j);
            }
        }
    }
    count
}

/// What a mesh looks like, for the convergence check and for reports when
/// it does not converge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MeshState {
    /// Nodes.
    nodes: usize,
    /// Nodes with fewer than `min_peers` mutual links.
    below_min: usize,
    /// Nodes reachable from node 0.
    reachable: usize,
    /// Mutual links (each counted once).
    links: usize,
    /// Smallest and largest number of links of a node.
    degree: (usize, usize),
}

impl MeshState {
    /// Looks at `nodes`.
    pub(crate) fn of(nodes: &[PeerManager], min_peers: usize) -> Self {
        let links = mutual_links(nodes);
        let degrees = links.iter().map(Vec::len);
        MeshState {
            nodes: nodes.len(),
            below_min: links.iter().filter(|l| l.len() < min_peers).count(),
            reachable: reachable(&links),
            links: links.iter().map(Vec::len).sum::<usize>() / 2,
            degree: (
                degrees.clone().min().unwrap_or(0),
                degrees.max().unwrap_or(0),
            ),
        }
    }

    /// Every node at `min_peers` or more, all in one connected graph.
    fn converged(&self) -> bool {
        self.below_min == 0 && self.reachable == self.nodes
    }
}

impl std::fmt::Display for MeshState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} nodes, {} below min_peers, {} reachable from node 0, {} links, degree {}..={}",
            self.nodes, self.below_min, self.reachable, self.links, self.degree.0, self.degree.1
        )
    }
}

/// Waits until the mesh of `nodes` has converged ([`MeshState::converged`])
/// or `limit` passed; the state at the end. Waits for every node's own
/// count of peers first (no polling), then checks the links every
/// [`POLL`].
pub(crate) async fn wait_converged(nodes: &[PeerManager], limit: Duration) -> (bool, MeshState) {
    let min = PeersConfig::default().min_peers();
    let deadline = tokio::time::Instant::now() + limit;
    let counts = futures_util::future::join_all(nodes.iter().map(|n| n.wait_for_peers(min, limit)));
    let _ = tokio::time::timeout_at(deadline, counts).await;
    loop {
        let state = MeshState::of(nodes, min);
        if state.converged() {
            return (true, state);
        }
        if tokio::time::Instant::now() >= deadline {
            return (false, state);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// How often [`wait_converged`] looks at the links once every node has
/// counted enough peers.
const POLL: Duration = Duration::from_millis(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reachability() {
        assert_eq!(reachable(&[]), 0);
        assert_eq!(reachable(&[vec![1], vec![0], vec![]]), 2);
        assert_eq!(reachable(&[vec![1], vec![0, 2], vec![1]]), 3);
    }
}
