//! Memory per node of a converged mesh, `mem_per_node_{N}`, and the time
//! it took to converge, `converge_{N}_nodes`.
//!
//! Each run is a fresh child process (this binary, started with
//! [`CHILD_FLAG`]), as in [`crate::idle`], so that memory the allocator kept
//! from earlier figures or runs cannot absorb the growth being measured.
//! The child, on the multi-threaded runtime:
//!
//! 1. builds a warm-up group of [`Plan::warmup`] nodes on an in-memory
//!    network of its own, in the same way as the measured ones (below), so
//!    thread arenas, the runtime's slabs and lazily created statics exist
//!    before measuring;
//! 2. waits [`Plan::idle`] and reads the resident set size from
//!    `/proc/self/statm`;
//! 3. builds the measured N nodes on another network, timing how long they
//!    take to connect, waits [`Plan::idle`] and reads it again;
//! 4. reports the growth divided by N, the time, and how many connections
//!    the N nodes hold.
//!
//! The sides, all endpoints with the default transport configuration
//! (Noise):
//!
//! - `peers`: each endpoint with a manager with the default
//!   [`PeersConfig`](meshwork_peers::PeersConfig), seeded with node 0, left
//!   to converge ([`converge()`]); the memory is that of the steady state,
//!   after the dials, refusals and gossip of getting there;
//! - `bare`: no manager. Every node dials node 0 ([`star()`], the baseline of
//!   the convergence figure), then more connections are opened among nodes
//!   1.. as a ring lattice (node `i` dials `i + 1`, then `i + 2`, ...)
//!   until they hold as many as the latest `peers` run ended with. Nobody
//!   reads them. So the memory ratio is what the manager adds per node to
//!   the connections it keeps: its pool and address book, queues, and a
//!   reader task per link. The `peers` side runs first, so the count is
//!   known.
//!
//! Both ends of every connection are in the process, and counted: the
//! figure is per node, not per connection. As in [`crate::idle`], the
//! growth of the data segment is printed on stderr alongside.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use futures_util::{FutureExt as _, StreamExt as _};
use meshwork_transport::mem::MemNetwork;
use meshwork_transport::{Connection, Endpoint};

use super::converge::{self, converge, star};
use super::{BENCH, addr, endpoints};
use crate::harness::{Options, Samples, median, rotate};
use crate::idle::{Statm, page_size, statm};
use crate::report::{Better, Figure};

/// The first argument that makes this binary a measuring child.
pub(crate) const CHILD_FLAG: &str = "--peers-memory-child";
/// Dials in flight at once while opening the `bare` side's connections.
const DIAL_IN_FLIGHT: usize = 32;
/// Time a child may take before it gives up.
const CHILD_LIMIT: Duration = Duration::from_secs(120);
/// Time allowed for one run, as seen from the parent.
const RUN_LIMIT: Duration = Duration::from_secs(150);

/// How many nodes, and how long they idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Nodes built before the first reading.
    pub(crate) warmup: usize,
    /// Nodes measured.
    pub(crate) nodes: usize,
    /// Time left idle before each reading.
    pub(crate) idle: Duration,
}

impl Plan {
    /// A full run.
    pub(crate) const FULL: Plan = Plan {
        warmup: 50,
        nodes: 500,
        idle: Duration::from_millis(500),
    };
    /// A `--quick` run (the same: the figure is about 500 nodes).
    pub(crate) const QUICK: Plan = Plan {
        warmup: 50,
        nodes: 500,
        idle: Duration::from_millis(300),
    };
}

/// What one child measured, per node, in KiB.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Reading {
    /// Growth of the resident set.
    rss: f64,
    /// Growth of the data segment (allocated, not necessarily resident).
    data: f64,
    /// Connections the measured nodes held (each counted once).
    connections: u64,
    /// Handshakes the measured nodes completed (each counted once), kept
    /// or not.
    handshakes: u64,
    /// Time the measured nodes took to converge (`peers`) or to dial node 0
    /// (`bare`), in ms.
    build_ms: f64,
}

/// Measures both figures: `peers` and `bare` children in turn, `opts.runs`
/// of each; the medians. The convergence figure first.
pub(crate) async fn measure(opts: &Options, plan: Plan) -> Result<[Figure; 2]> {
    let metric = format!("mem_per_node_{}", plan.nodes);
    let page = page_size();
    let sides = ["peers", "bare"];
    // Connections of the latest `peers` run, for the next `bare` one.
    let latest: Arc<Mutex<Option<u64>>> = Arc::default();
    // The readings of every run, per side, for the notes below.
    let readings: Arc<Mutex<[Vec<Reading>; 2]>> = Arc::default();
    let samples = rotate(&metric, "KiB", opts, RUN_LIMIT, &sides, |side| {
        let (latest, readings) = (latest.clone(), readings.clone());
        async move {
            let conns = match side {
                0 => None,
                _ => Some(lock(&latest).context("no peers run yet to copy")?),
            };
            let reading = tokio::task::spawn_blocking(move || run_child(conns, plan, page))
                .await
                .context("peers memory child")??;
            if side == 0 {
                *lock(&latest) = Some(reading.connections);
            }
            lock(&readings)[side].push(reading);
            Ok(reading.rss)
        }
        .boxed()
    })
    .await?;
    {
        let readings = lock(&readings);
        let of = |side: usize, f: fn(&Reading) -> f64| {
            median(&readings[side].iter().map(f).collect::<Vec<_>>())
        };
        eprintln!(
            "  {metric}: RSS growth / {} nodes, both ends of every connection in one process; \
             after {} warm-up nodes and {} ms idle; {page}-byte pages; \
             connections held: {:.0}, handshakes completed to get there: peers {:.0}, bare {:.0}",
            plan.nodes,
            plan.warmup,
            plan.idle.as_millis(),
            of(0, |r| r.connections as f64),
            of(0, |r| r.handshakes as f64),
            of(1, |r| r.handshakes as f64),
        );
        eprintln!(
            "  {metric}: data-segment growth per node (allocated, not necessarily resident): \
             peers {:.1} KiB, bare {:.1} KiB",
            of(0, |r| r.data),
            of(1, |r| r.data),
        );
    }
    let times = Samples {
        sides: lock(&readings)
            .iter()
            .map(|side| side.iter().map(|r| r.build_ms).collect())
            .collect(),
    };
    let list = |side: usize| {
        let ms: Vec<String> = times.sides[side]
            .iter()
            .map(|t| format!("{t:.0}"))
            .collect();
        ms.join(", ")
    };
    eprintln!(
        "  {}: runs in the children above: peers {} ms; star {} ms",
        converge::metric(plan.nodes),
        list(0),
        list(1),
    );
    let converged = converge::figure(plan.nodes, &times, 0, 1);
    let memory = Figure::compared(
        BENCH,
        metric,
        "KiB",
        Better::Lower,
        samples.median(0),
        ("bare", samples.median(1)),
    );
    Ok([converged, memory])
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs one child: a `peers` one without `conns`, a `bare` one holding
/// `conns` connections. Blocking.
fn run_child(conns: Option<u64>, plan: Plan, page: u64) -> Result<Reading> {
    let exe = std::env::current_exe().context("finding this program")?;
    let side = match conns {
        None => "peers".to_string(),
        Some(n) => format!("bare:{n}"),
    };
    let out = Command::new(&exe)
        .args([
            CHILD_FLAG.to_string(),
            side,
            plan.warmup.to_string(),
            plan.nodes.to_string(),
            plan.idle.as_millis().to_string(),
            page.to_string(),
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("starting the peers memory child")?;
    ensure!(
        out.status.success(),
        "peers memory child failed ({})",
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let value: serde_json::Value = serde_json::from_str(text.trim())
        .with_context(|| format!("peers memory child said {text:?}"))?;
    let field = |name: &str| {
        value[name]
            .as_f64()
            .with_context(|| format!("no {name} in {text:?}"))
    };
    Ok(Reading {
        rss: field("rss_kib_per_node")?,
        data: field("data_kib_per_node")?,
        connections: field("connections")? as u64,
        handshakes: field("handshakes")? as u64,
        build_ms: field("build_ms")?,
    })
}

/// The child's `main`: measures, prints one JSON object on stdout.
pub(crate) fn child_main(args: &[String]) -> Result<()> {
    let [side, warmup, nodes, idle_ms, page] = args else {
        bail!("expected: peers|bare:CONNS WARMUP NODES IDLE_MS PAGE_SIZE, got {args:?}");
    };
    let conns = match side.as_str() {
        "peers" => None,
        other => match other.strip_prefix("bare:") {
            Some(n) => Some(n.parse::<u64>().context("connections")?),
            None => bail!("unknown side {other:?}"),
        },
    };
    let plan = Plan {
        warmup: warmup.parse().context("warm-up nodes")?,
        nodes: nodes.parse().context("nodes")?,
        idle: Duration::from_millis(idle_ms.parse().context("idle time")?),
    };
    ensure!(plan.nodes >= 2 && plan.warmup >= 2, "too few nodes");
    let page: u64 = page.parse().context("page size")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let m = runtime.block_on(async {
        tokio::time::timeout(CHILD_LIMIT, child_measure(conns, plan))
            .await
            .with_context(|| format!("timed out after {CHILD_LIMIT:?}"))?
    })?;
    let per_node = |pages_before: u64, pages_after: u64| {
        pages_after.saturating_sub(pages_before) as f64 * page as f64 / plan.nodes as f64 / 1024.0
    };
    let line = serde_json::json!({
        "rss_kib_per_node": per_node(m.before.resident, m.after.resident),
        "data_kib_per_node": per_node(m.before.data, m.after.data),
        "connections": m.connections,
        "handshakes": m.handshakes,
        "build_ms": m.build.as_secs_f64() * 1e3,
    });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").context("writing the result")?;
    stdout.flush().context("writing the result")?;
    // Leave without shutting hundreds of nodes down one by one.
    drop(stdout);
    std::process::exit(0)
}

/// What a child saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Measured {
    /// `statm` before building the measured nodes.
    before: Statm,
    /// `statm` once they were connected and idle.
    after: Statm,
    /// Connections they held, each counted once.
    connections: u64,
    /// Handshakes they completed, each counted once.
    handshakes: u64,
    /// Time they took to converge, or to complete the star.
    build: Duration,
}

/// Builds the warm-up group, then the measured one, reading `statm` before
/// and after the measured one. Every node stays up until the process exits.
async fn child_measure(conns: Option<u64>, plan: Plan) -> Result<Measured> {
    // A warm-up mesh, or a star and lattice where nodes have 4 connections
    // on average.
    let (_, warm) = group(conns.map(|_| 2 * plan.warmup as u64), plan.warmup).await?;
    tokio::time::sleep(plan.idle).await;
    let before = statm()?;
    let (build, measured) = group(conns, plan.nodes).await?;
    tokio::time::sleep(plan.idle).await;
    let after = statm()?;
    let (connections, handshakes) = measured.counts();
    if let Some(n) = conns {
        ensure!(
            connections == n,
            "holding {connections} connections, not {n}"
        );
    }
    // Dropped only when the process exits.
    std::mem::forget((warm, measured));
    Ok(Measured {
        before,
        after,
        connections,
        handshakes,
        build,
    })
}

/// A group of nodes kept alive for the measurement.
enum Group {
    /// Endpoints with managers.
    Peers(Vec<meshwork_peers::PeerManager>),
    /// Bare endpoints, and both ends of their connections (held only).
    Bare {
        endpoints: Vec<Endpoint>,
        _held: Vec<Connection>,
    },
}

impl Group {
    /// Connections open in the group, and handshakes completed by it, each
    /// counted once (both ends are in the group).
    fn counts(&self) -> (u64, u64) {
        let endpoints: Vec<&Endpoint> = match self {
            Group::Peers(nodes) => nodes.iter().map(|n| n.endpoint()).collect(),
            Group::Bare { endpoints, .. } => endpoints.iter().collect(),
        };
        let (mut open, mut handshakes) = (0, 0);
        for stats in endpoints.iter().map(|e| e.stats()) {
            open += stats.open_connections as u64;
            handshakes += stats.handshakes_ok;
        }
        (open / 2, handshakes / 2)
    }
}

/// Builds `n` nodes on a network of their own: a converged mesh without
/// `conns`, bare endpoints holding `conns` connections with it (a star
/// around node 0, then a lattice among the others). The time to converge,
/// or to complete the star.
async fn group(conns: Option<u64>, n: usize) -> Result<(Duration, Group)> {
    let net = MemNetwork::new();
    let endpoints = endpoints(&net, n).await?;
    let Some(conns) = conns else {
        let (elapsed, nodes) = converge(endpoints).await?;
        return Ok((elapsed, Group::Peers(nodes)));
    };
    let conns = conns as usize;
    ensure!(
        conns >= n - 1,
        "{conns} connections are fewer than a star of {n} nodes"
    );
    let (elapsed, mut held) = star(&endpoints).await?;
    // The rest among nodes 1..n, so no pair is connected twice.
    let edges: Vec<(usize, usize)> = lattice(n - 1, conns - (n - 1))?
        .into_iter()
        .map(|(i, j)| (i + 1, j + 1))
        .collect();
    let mut inbound = vec![0usize; n];
    for &(_, j) in &edges {
        inbound[j] += 1;
    }
    // Every endpoint accepts until it holds its share of the connections.
    let accepts = futures_util::future::try_join_all(endpoints.iter().zip(&inbound).map(
        |(e, &count)| async move {
            let mut held = Vec::with_capacity(count);
            while held.len() < count {
                held.push(e.accept().await.context("an endpoint stopped accepting")?);
            }
            anyhow::Ok(held)
        },
    ));
    let dials = futures_util::stream::iter(&edges)
        .map(|&(i, j)| {
            let endpoint = &endpoints[i];
            async move { endpoint.connect(&addr(j)).await }
        })
        .buffer_unordered(DIAL_IN_FLIGHT)
        .collect::<Vec<_>>();
    let (accepted, dialled) = tokio::join!(accepts, dials);
    for conn in dialled {
        held.push(conn.context("dialling")?);
    }
    held.extend(accepted?.into_iter().flatten());
    Ok((
        elapsed,
        Group::Bare {
            endpoints,
            _held: held,
        },
    ))
}

/// `count` distinct links among `n` nodes as (dialler, listener): node `i`
/// to `i + 1`, then every node to `i + 2`, and so on (a ring lattice).
fn lattice(n: usize, count: usize) -> Result<Vec<(usize, usize)>> {
    ensure!(
        count == 0 || (n >= 2 && count <= n * (n - 1) / 2),
        "{count} links do not fit among {n} nodes"
    );
    let mut edges = Vec::with_capacity(count);
    'outer: for step in 1..=n / 2 {
        for i in 0..n {
            if edges.len() == count {
                break 'outer;
            }
            // With an even n, the last step would pair every node twice.
            if 2 * step == n && i >= n / 2 {
                continue;
            }
            edges.push((i, (i + step) % n));
        }
    }
    ensure!(edges.len() == count, "only {} links fit", edges.len());
    Ok(edges)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn lattice_links_are_distinct() {
        let edges = lattice(6, 15).unwrap();
        let set: HashSet<(usize, usize)> =
            edges.iter().map(|&(i, j)| (i.min(j), i.max(j))).collect();
        assert_eq!(set.len(), 15);
        assert!(edges.iter().all(|&(i, j)| i != j));
        assert_eq!(
            lattice(5, 7).unwrap()[..5],
            [(0, 1), (1, 2), (2, 3), (3, 4), (4, 0)]
        );
        assert!(lattice(4, 7).is_err());
        assert!(lattice(1, 0).unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_sides_measure() {
        let plan = Plan {
            warmup: 5,
            nodes: 12,
            idle: Duration::from_millis(10),
        };
        let peers = child_measure(None, plan).await.unwrap();
        let conns = peers.connections;
        assert!(conns >= 12 * 4 / 2, "{conns}");
        assert!(peers.handshakes >= conns);
        let bare = child_measure(Some(conns), plan).await.unwrap();
        assert_eq!((bare.connections, bare.handshakes), (conns, conns));
    }
}
