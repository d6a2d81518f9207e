//! A request routed over 5 hops: `routed_request_5_hops`.
//!
//! Six nodes on a [`MemNetwork`] with the default transport config (Noise)
//! form a line: node `i` is seeded with node `i - 1` and its peer manager
//! holds 1 to 2 peers (`min_peers` 1, `max_peers` 2), so nodes 0 and 5 are
//! 5 hops apart; node `i` starts once node `i - 1` is linked. Every node runs the concerns layer (with the built-in
//! routing concern) and the echo concern. The line is built once and
//! checked (each node linked to exactly its two neighbours in the line);
//! then node 0 learns its route to node 5 with one routed request, which
//! must report 5 hops, before anything is measured.
//!
//! - `routed`: node 0 calls [`Context::request_to`] for node 5 with 64 B,
//!   one call at a time; the request and its reply each cross 5 hops,
//!   forwarded by the routing concern of nodes 1 to 4;
//! - `direct`: node 0 calls [`Context::request`] for its neighbour node 1.
//!
//! Each run gives the median of its calls, in µs. Since a routed call
//! crosses 5 links each way and a direct one 1, the ratio divided by 5 is
//! the cost of a routed hop relative to a direct one.
//!
//! [`Context::request`]: meshwork_concerns::Context::request
//! [`Context::request_to`]: meshwork_concerns::Context::request_to
//! [`MemNetwork`]: meshwork_transport::mem::MemNetwork

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use futures_util::FutureExt as _;
use meshwork_concerns::Concerns;
use meshwork_peers::{PeerManager, PeersConfig};
use meshwork_transport::Endpoint;
use meshwork_transport::mem::MemNetwork;

use super::{BENCH, ECHO, Echo, PAYLOAD, REQUEST_TIMEOUT, check_echo, median_micros, stop};
use crate::harness::{Options, rotate};
use crate::peers::{addr, endpoints, mutual_links, shutdown_mesh};
use crate::report::{Better, Figure};
use crate::transport::payload;

/// Hops from the first node of the line to the last.
const HOPS: usize = 5;
/// Time the line may take to form.
const FORM_LIMIT: Duration = Duration::from_secs(30);
/// Time allowed for one run of one side.
const RUN_LIMIT: Duration = Duration::from_secs(30);

/// How much work each run does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// Calls before measuring.
    warmup: usize,
    /// Calls measured, at most.
    rounds: usize,
    /// Stop measuring after this long even if fewer calls were done.
    budget: Duration,
}

impl Plan {
    /// A full run.
    pub(crate) const FULL: Plan = Plan {
        warmup: 200,
        rounds: 5_000,
        budget: Duration::from_millis(500),
    };
    /// A quick run.
    pub(crate) const QUICK: Plan = Plan {
        warmup: 100,
        rounds: 2_000,
        budget: Duration::from_millis(250),
    };
}

/// Measures `routed_request_5_hops` against a direct request.
pub(crate) async fn measure(opts: &Options, plan: Plan) -> Result<Figure> {
    let metric = format!("routed_request_{HOPS}_hops");
    let nodes = Arc::new(line(HOPS + 1).await?);
    let sides = ["direct", "routed"];
    let result = rotate(&metric, "us", opts, RUN_LIMIT, &sides, |side| {
        calls(nodes.clone(), side == 1, plan).boxed()
    })
    .await;
    let forwarded: u64 = nodes.iter().map(|n| routing_counter(n, "forwarded")).sum();
    stop(&nodes).await;
    let samples = result?;
    let (direct, routed) = (samples.median(0), samples.median(1));
    eprintln!(
        "  {metric}: line of {} nodes (min_peers 1, max_peers 2), Noise, in memory; \
         {:.2}× a direct call per routed hop; {forwarded} forwards in all",
        HOPS + 1,
        routed / direct / HOPS as f64,
    );
    Ok(Figure::compared(
        BENCH,
        metric,
        "us",
        Better::Lower,
        routed,
        ("direct", direct),
    ))
}

/// One run: node 0's calls to the last node of the line (`routed`) or to
/// node 1; the median in µs.
async fn calls(nodes: Arc<Vec<Concerns>>, routed: bool, plan: Plan) -> Result<f64> {
    let payload = payload(PAYLOAD);
    let ctx = nodes[0].context(ECHO);
    let to = nodes[if routed { nodes.len() - 1 } else { 1 }]
        .peers()
        .node_id();
    let target = &nodes[nodes.len() - 1];
    let delivered = routing_counter(target, "delivered");
    let mut samples = Vec::with_capacity(plan.rounds);
    let mut deadline = None;
    let mut made = 0;
    for n in 0..plan.warmup + plan.rounds {
        if n == plan.warmup {
            deadline = Some(Instant::now() + plan.budget);
        }
        let start = Instant::now();
        let reply = if routed {
            ctx.request_to(to, payload.clone(), REQUEST_TIMEOUT).await
        } else {
            ctx.request(to, payload.clone(), REQUEST_TIMEOUT).await
        };
        let rtt = start.elapsed();
        check_echo(&reply.context("concern request")?, PAYLOAD)?;
        made += 1;
        if n >= plan.warmup {
            samples.push(rtt);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    if routed {
        // Every call was routed all the way (not sent directly because the
        // line changed shape).
        let routed_calls = routing_counter(target, "delivered") - delivered;
        ensure!(
            routed_calls == made,
            "{routed_calls} of {made} calls reached the last node by routing"
        );
    }
    median_micros(&mut samples)
}

/// `n` nodes in a line, each with the concerns layer and the echo concern;
/// node 0 has learnt its route to node `n - 1`.
///
/// Node `i` starts only once node `i - 1` is linked to its predecessor, so
/// it always finds a free inbound slot there: started all at once, nodes
/// refused by a full neighbour try the alternatives it names and can close
/// triangles instead of a line.
async fn line(n: usize) -> Result<Vec<Concerns>> {
    let net = MemNetwork::new();
    let mut nodes: Vec<Concerns> = Vec::with_capacity(n);
    for (i, endpoint) in endpoints(&net, n).await?.into_iter().enumerate() {
        let node = line_node(i, endpoint).await;
        let linked = match node {
            Ok(node) => {
                nodes.push(node);
                match i {
                    0 => Ok(()),
                    _ => linked(&nodes[i - 1], &nodes[i]).await,
                }
            }
            Err(e) => Err(e),
        };
        if let Err(e) = linked {
            stop(&nodes).await;
            return Err(e).with_context(|| format!("node {i} of the line"));
        }
    }
    match learn_route(&nodes).await {
        Ok(()) => Ok(nodes),
        Err(e) => {
            stop(&nodes).await;
            Err(e)
        }
    }
}

/// Node `i` of the line: seeded with node `i - 1`, 1 to 2 peers, the echo
/// concern.
async fn line_node(i: usize, endpoint: Endpoint) -> Result<Concerns> {
    let config = PeersConfig::default().with_min_peers(1).with_max_peers(2);
    let config = match i {
        0 => config,
        _ => config.with_seed(addr(i - 1)),
    };
    let manager = PeerManager::start(endpoint, config).context("starting the peer manager")?;
    match Concerns::builder(manager.clone())
        .concern(Echo)
        .start()
        .await
    {
        Ok(c) => Ok(c),
        Err(e) => {
            shutdown_mesh(vec![manager]).await;
            Err(e).context("starting concerns")
        }
    }
}

/// Waits until `a` and `b` have each other as responsive neighbours.
async fn linked(a: &Concerns, b: &Concerns) -> Result<()> {
    let deadline = Instant::now() + FORM_LIMIT;
    let (a, b) = (a.peers(), b.peers());
    while !(a.is_neighbour(b.node_id()) && b.is_neighbour(a.node_id())) {
        if Instant::now() >= deadline {
            bail!("not linked to its seed within {FORM_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Checks that the nodes form exactly a line, then has node 0 learn its
/// route to the last node with one routed request, and checks its length.
async fn learn_route(nodes: &[Concerns]) -> Result<()> {
    let n = nodes.len();
    let managers: Vec<PeerManager> = nodes.iter().map(|c| c.peers().clone()).collect();
    let links = mutual_links(&managers);
    let is_line = links.iter().enumerate().all(|(i, l)| {
        let want: Vec<usize> = [i.checked_sub(1), (i + 1 < n).then_some(i + 1)]
            .into_iter()
            .flatten()
            .collect();
        *l == want
    });
    ensure!(is_line, "the nodes do not form a line: links {links:?}");
    let last = nodes[n - 1].peers().node_id();
    let reply = nodes[0]
        .context(ECHO)
        .request_to(last, payload(PAYLOAD), REQUEST_TIMEOUT)
        .await
        .context("the first routed request")?;
    check_echo(&reply, PAYLOAD)?;
    let routes = nodes[0].routes();
    let route = routes
        .iter()
        .find(|r| r.target == *last)
        .context("no route learnt to the last node")?;
    ensure!(
        route.hops as usize == n - 1,
        "the route to the last node has {} hops, not {}",
        route.hops,
        n - 1
    );
    Ok(())
}

/// A routing counter of `node` (`delivered`, `forwarded`, ...).
fn routing_counter(node: &Concerns, name: &str) -> u64 {
    node.builtin_stats()
        .into_iter()
        .find(|(c, k, _)| *c == "routing" && *k == name)
        .map_or(0, |(_, _, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_sides_run_on_a_short_line() {
        let nodes = Arc::new(line(3).await.unwrap());
        let plan = Plan {
            warmup: 5,
            rounds: 20,
            budget: Duration::from_millis(50),
        };
        let direct = calls(nodes.clone(), false, plan).await;
        let routed = calls(nodes.clone(), true, plan).await;
        stop(&nodes).await;
        assert!(direct.unwrap() > 0.0);
        assert!(routed.unwrap() > 0.0);
    }
}
