//! Time for N nodes seeded with one to form a mesh: `converge_{N}_nodes`.
//!
//! Both sides build N endpoints with the default transport [`Config`]
//! (Noise) on a fresh in-memory network, each listening, before the clock
//! starts; creating identities and listeners is not timed.
//!
//! - `peers` ([`converge`]): starts a manager with the default
//!   [`PeersConfig`] on every endpoint, node `i > 0` seeded with node 0, and
//!   times until every node has at least `min_peers` mutual links and they
//!   form one connected graph (see [`wait_converged`]);
//! - `star` ([`star`]): every node but node 0 dials node 0 once, at most
//!   [`STAR_IN_FLIGHT`] at a time (well within node 0's limit of handshakes
//!   in progress, so none is turned away); timed until node 0 accepted all
//!   N − 1. This is the least a join through one seed could cost: the same
//!   number of nodes, each doing one handshake, all through the same node.
//!
//! Here both run in this process, on the bench's runtime, and the nodes are
//! shut down after the clock stops. The 500-node figure is measured by the
//! children of [`super::memory`] with the same two functions, since they
//! build that mesh anyway.
//!
//! [`Config`]: meshwork_transport::Config

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use futures_util::{FutureExt as _, StreamExt as _};
use meshwork_peers::{PeerManager, PeersConfig};
use meshwork_transport::mem::MemNetwork;
use meshwork_transport::{Connection, Endpoint};

use super::{BENCH, addr, endpoints, shutdown_mesh, start_mesh, wait_converged};
use crate::harness::{Options, Samples, rotate};
use crate::report::{Better, Figure};

/// Dials to node 0 in flight at once in the star: half the default
/// `max_pending_handshakes` of an endpoint, since node 0 holds a handshake
/// slot a little longer than the dialler waits for it.
const STAR_IN_FLIGHT: usize = 32;
/// Time a mesh may take to converge before the run fails, with a report of
/// what the mesh looked like.
pub(super) const CONVERGE_LIMIT: Duration = Duration::from_secs(90);
/// Time allowed for one run, set-up and shut-down included.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// Measures `converge_{nodes}_nodes` in this process: the manager against
/// the star.
pub(crate) async fn measure(opts: &Options, nodes: usize) -> Result<Figure> {
    let metric = metric(nodes);
    let sides = ["star", "peers"];
    let samples = rotate(&metric, "ms", opts, RUN_LIMIT, &sides, |side| {
        if side == 0 {
            star_run(nodes).boxed()
        } else {
            mesh_run(nodes).boxed()
        }
    })
    .await?;
    Ok(figure(nodes, &samples, 1, 0))
}

/// The figure's name for `nodes` nodes.
pub(super) fn metric(nodes: usize) -> String {
    format!("converge_{nodes}_nodes")
}

/// The figure for `nodes` nodes from `samples` in ms, with the medians of
/// side `peers` and side `star`; says the settings on stderr.
pub(super) fn figure(nodes: usize, samples: &Samples, peers: usize, star: usize) -> Figure {
    let metric = metric(nodes);
    let config = PeersConfig::default();
    eprintln!(
        "  {metric}: default PeersConfig (min_peers {}, max_peers {}, tick 250 ms), Noise; \
         star: {} dials to node 0, {STAR_IN_FLIGHT} in flight",
        config.min_peers(),
        config.max_peers(),
        nodes - 1,
    );
    Figure::compared(
        BENCH,
        metric,
        "ms",
        Better::Lower,
        samples.median(peers),
        ("star", samples.median(star)),
    )
}

/// One run of the `peers` side: ms until `n` managers have converged.
async fn mesh_run(n: usize) -> Result<f64> {
    let net = MemNetwork::new();
    let endpoints = endpoints(&net, n).await?;
    let (elapsed, nodes) = converge(endpoints).await?;
    shutdown_mesh(nodes).await;
    Ok(elapsed.as_secs_f64() * 1e3)
}

/// Starts a manager on every endpoint (node `i > 0` seeded with node 0) and
/// waits until they have converged; the time that took, and the managers.
/// Fails, saying what the mesh looked like, if that takes longer than
/// [`CONVERGE_LIMIT`].
pub(super) async fn converge(endpoints: Vec<Endpoint>) -> Result<(Duration, Vec<PeerManager>)> {
    let n = endpoints.len();
    let start = Instant::now();
    let nodes = start_mesh(endpoints)?;
    let (converged, state) = wait_converged(&nodes, CONVERGE_LIMIT).await;
    let elapsed = start.elapsed();
    if !converged {
        let stats: Vec<_> = nodes.iter().map(|n| n.stats()).collect();
        let dialling = stats.iter().filter(|s| s.pending_dials > 0).count();
        let alone = stats.iter().filter(|s| s.connected == 0).count();
        let known: usize = stats.iter().map(|s| s.known).sum();
        shutdown_mesh(nodes).await;
        bail!(
            "{n} nodes did not converge within {CONVERGE_LIMIT:?}: {state}; \
             {alone} nodes without a peer, {dialling} dialling; \
             {known} address-book entries in all"
        );
    }
    Ok((elapsed, nodes))
}

/// One run of the `star` side: ms until node 0 has accepted one handshake
/// from each of the `n - 1` others.
async fn star_run(n: usize) -> Result<f64> {
    let net = MemNetwork::new();
    let endpoints = endpoints(&net, n).await?;
    let result = star(&endpoints).await;
    futures_util::future::join_all(endpoints.iter().map(Endpoint::shutdown)).await;
    let (elapsed, held) = result?;
    drop(held);
    Ok(elapsed.as_secs_f64() * 1e3)
}

/// Every endpoint but the first dials the first once; the time until the
/// first accepted them all, and both ends of every connection.
pub(super) async fn star(endpoints: &[Endpoint]) -> Result<(Duration, Vec<Connection>)> {
    let n = endpoints.len();
    ensure!(n >= 2, "a star needs two nodes");
    let hub = endpoints[0].clone();
    let start = Instant::now();
    let acceptor = tokio::spawn(async move {
        let mut held: Vec<Connection> = Vec::with_capacity(n - 1);
        while held.len() < n - 1 {
            match hub.accept().await {
                Some(conn) => held.push(conn),
                None => break,
            }
        }
        held
    });
    let dialled: Vec<_> = futures_util::stream::iter(endpoints[1..].to_vec())
        .map(|e| async move { e.connect(&addr(0)).await })
        .buffer_unordered(STAR_IN_FLIGHT)
        .collect()
        .await;
    let failed = dialled.iter().filter(|d| d.is_err()).count();
    if failed > 0 {
        acceptor.abort();
        bail!(
            "{failed} of {} dials to node 0 failed; node 0: {:?}",
            n - 1,
            endpoints[0].stats()
        );
    }
    let mut held = acceptor.await.context("node 0's acceptor")?;
    let elapsed = start.elapsed();
    ensure!(held.len() == n - 1, "node 0 accepted {}", held.len());
    held.extend(dialled.into_iter().flatten());
    Ok((elapsed, held))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_sides_run_on_a_small_mesh() {
        assert!(star_run(10).await.unwrap() > 0.0);
        assert!(mesh_run(10).await.unwrap() > 0.0);
    }
}
