//! Write-to-all latency (`write_to_all_*_{p50,p99}`) and bytes per update
//! per receiver (`bytes_per_update_*`), on the meshes of [`CASES`]: 10 and
//! 100 in-memory nodes, 10 loopback TCP nodes, and 10 and 100 in-memory
//! nodes whose links carry 1 ms each way ([`MemNetwork::set_default_latency`];
//! tokio's timers round that up, so the round trip measured there is about
//! 4 ms, and it is the measured one the baseline uses).
//!
//! Each mesh is built once ([`Mesh::start`]) and every node watches the
//! keys written here ([`SyncMap::watch`]), noting when each change reaches
//! it. The sides, taking turns on the same mesh:
//!
//! - `sync` ([`sync_run`]): a few unmeasured writes, then `writes` writes,
//!   one at a time, write `k` by node `k mod n`, each timed from `set` until
//!   the last of the other `n − 1` watchers has it; the run's p50 and p99.
//!   The bytes every node wrote from the first measured write until the
//!   copies of the last have died out ([`SETTLE`] later), divided by
//!   `writes × (n − 1)`, are the run's bytes per update per receiver.
//! - `diam×rtt` ([`hops_run`]): the diameter of the mesh (hops, over the
//!   links both ends route over, taken at each run) times the round trip of
//!   `rtts` direct requests to an echo concern, node `k mod n` to one of
//!   its neighbours in turn, one at a time (p50 and p99). No write can reach
//!   the farthest node in fewer hops than the diameter, and each hop costs
//!   at least half a round trip: this is the issue's yardstick, "2× the mesh
//!   diameter in link round trips".
//! - `flood` ([`flood_run`]): `writes` rounds of a [`FLOOD_PAYLOAD`]-byte
//!   payload (about a push of one small entry) broadcast by node `k mod n`
//!   through the concerns layer's flood (TTL 16) to a sink concern,
//!   timed until the last of the other `n − 1` nodes has it: the plain
//!   way to reach every node, without the map (the sync layer's first eager
//!   push was this flood; it now pushes along a broadcast tree).
//!   `write_to_all_*_p50_flood` compares with its p50; the bytes and copies
//!   of a flood per receiver are printed.
//! - `1_copy` ([`one_copy_run`], on the meshes whose bytes are reported):
//!   the `sync` side's writes on a separate 2-node in-memory mesh, where
//!   each write is pushed once, to the one other node; its bytes per update
//!   per receiver are what one copy of a push costs on the wire, in the
//!   sync layer's own format, whatever that is. Anything above it in a
//!   bigger mesh is what the way pushes spread costs: copies a receiver
//!   gets more than once, and whatever else travels.
//!
//! The slower meshes do fewer writes and round trips per run
//! ([`Case::share`]). p99 is the nearest rank: with fewer than 100 writes
//! per run, the run's slowest write.
//!
//! [`Mesh::start`]: super::Mesh::start
//! [`MemNetwork::set_default_latency`]: meshwork::transport::mem::MemNetwork::set_default_latency
//! [`SyncMap::watch`]: meshwork::sync::SyncMap::watch

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use bytes::Bytes;
use futures_util::FutureExt as _;
use meshwork::sync::{ChangeKind, SyncConfig, SyncError};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;

use super::{BENCH, ECHO, Mesh, Net, SINK, diameter, key, quantile_micros, value};
use crate::harness::{Options, median, rotate_units};
use crate::report::{Better, Figure};

/// Time allowed for one run of one side.
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// Time every node may take to get one write or message.
const DELIVERY_LIMIT: Duration = Duration::from_secs(10);
/// Quiet time after the last write of a run, for its flood's last copies
/// to be written (and counted).
const SETTLE: Duration = Duration::from_millis(50);
/// Payload of the echo requests.
const ECHO_PAYLOAD: usize = 64;
/// The target: p50 at most this many times diameter × link RTT.
const TARGET_RATIO: f64 = 2.0;
/// The target for bytes per update per receiver.
const TARGET_BYTES: f64 = 150.0;
/// One-way latency of the links of the `*_1ms` meshes.
const LINK_LATENCY: Duration = Duration::from_millis(1);
/// Payload of the `flood` side's broadcasts: about the size of a push of
/// one small entry.
const FLOOD_PAYLOAD: usize = 100;
/// Hops a broadcast may travel: the sync layer's default for its pushes.
const FLOOD_TTL: u32 = 16;
/// Prefix of every key written here.
const PREFIX: &str = "w/";

/// How much work each run does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// Unmeasured writes at the start of each `sync` run.
    warmup: usize,
    /// Measured writes per `sync` run, rounds per `direct` run.
    writes: usize,
    /// Round trips per `diam×rtt` run.
    rtts: usize,
}

impl Plan {
    /// A full run.
    pub(crate) const FULL: Plan = Plan {
        warmup: 5,
        writes: 100,
        rtts: 200,
    };
    /// A quick run.
    pub(crate) const QUICK: Plan = Plan {
        warmup: 3,
        writes: 40,
        rtts: 100,
    };
}

/// One mesh measured.
struct Case {
    /// Name in the metrics, e.g. `10_nodes_tcp`.
    name: &'static str,
    nodes: usize,
    net: Net,
    /// One-way latency of every in-memory link.
    latency: Duration,
    /// The plan's writes and round trips are divided by this (slow meshes).
    share: usize,
    /// Whether to report bytes per update.
    bytes: bool,
}

const CASES: [Case; 5] = [
    Case {
        name: "10_nodes",
        nodes: 10,
        net: Net::Mem,
        latency: Duration::ZERO,
        share: 1,
        bytes: true,
    },
    Case {
        name: "100_nodes",
        nodes: 100,
        net: Net::Mem,
        latency: Duration::ZERO,
        share: 2,
        bytes: true,
    },
    Case {
        name: "10_nodes_tcp",
        nodes: 10,
        net: Net::Tcp,
        latency: Duration::ZERO,
        share: 1,
        bytes: false,
    },
    Case {
        name: "10_nodes_1ms",
        nodes: 10,
        net: Net::Mem,
        latency: LINK_LATENCY,
        share: 2,
        bytes: false,
    },
    Case {
        name: "100_nodes_1ms",
        nodes: 100,
        net: Net::Mem,
        latency: LINK_LATENCY,
        share: 4,
        bytes: false,
    },
];

/// The mesh of the `1_copy` side: two nodes, in memory.
const PAIR: Case = Case {
    name: "pair",
    nodes: 2,
    net: Net::Mem,
    latency: Duration::ZERO,
    share: 1,
    bytes: false,
};

/// The sides of a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// [`hops_run`].
    Hops,
    /// [`flood_run`].
    Flood,
    /// [`sync_run`].
    Sync,
    /// [`one_copy_run`].
    OneCopy,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Hops => "diam×rtt",
            Side::Flood => "flood",
            Side::Sync => "sync",
            Side::OneCopy => "1_copy",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Side::OneCopy => "B",
            _ => "us",
        }
    }
}

/// A change seen by a watcher.
#[derive(Debug)]
struct Arrival {
    node: usize,
    key: Bytes,
    at: Instant,
}

/// What runs note besides the value they return.
#[derive(Debug, Default)]
struct Extras {
    /// p99 of each `sync` run, µs.
    p99: Vec<f64>,
    /// Bytes per update per receiver of each `sync` run.
    bytes: Vec<f64>,
    /// diameter × p99 link RTT of each `diam×rtt` run, µs.
    hops_p99: Vec<f64>,
    /// Diameter and median link RTT (µs) of each `diam×rtt` run.
    diameters: Vec<(usize, f64)>,
    /// Bytes per receiver of each `flood` run.
    flood_bytes: Vec<f64>,
    /// Copies each receiver got of each broadcast, in each `flood` run.
    flood_copies: Vec<f64>,
    /// Cores busy (the process's CPU time over the wall time) during each
    /// `sync` run's measured writes.
    cores: Vec<f64>,
}

/// A mesh whose nodes watch the keys written here.
struct Bench {
    mesh: Mesh,
    arrivals: Mutex<mpsc::UnboundedReceiver<Arrival>>,
    watchers: Vec<JoinHandle<()>>,
    next_seq: AtomicU64,
    extras: std::sync::Mutex<Extras>,
}

/// Measures every [`CASES`] mesh.
pub(crate) async fn measure(opts: &Options, plan: Plan) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for case in &CASES {
        figures.extend(measure_case(opts, plan, case).await?);
    }
    Ok(figures)
}

async fn measure_case(opts: &Options, plan: Plan, case: &Case) -> Result<Vec<Figure>> {
    let plan = Plan {
        warmup: plan.warmup,
        writes: plan.writes.div_ceil(case.share),
        rtts: plan.rtts.div_ceil(case.share),
    };
    let label = format!("write_to_all_{}", case.name);
    let bench = Arc::new(Bench::start(case).await?);
    let links = bench.mesh.links();
    let degrees: Vec<usize> = links.iter().map(Vec::len).collect();
    eprintln!(
        "  {label}: {} nodes ({}), Noise, default configs; {} links, degree {}..={}, \
         diameter {}; {} writes and {} round trips per run",
        case.nodes,
        match case.net {
            Net::Mem if case.latency.is_zero() => "in memory".to_string(),
            Net::Mem => format!("in memory, {:?} each way on every link", case.latency),
            Net::Tcp => "loopback TCP".to_string(),
        },
        degrees.iter().sum::<usize>() / 2,
        degrees.iter().min().unwrap_or(&0),
        degrees.iter().max().unwrap_or(&0),
        diameter(&links).map_or_else(|| "-".into(), |d| d.to_string()),
        plan.writes,
        plan.rtts,
    );
    // The pair of the `1_copy` side, only where bytes are reported.
    let pair = match case.bytes {
        true => match Bench::start(&PAIR).await {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                bench.stop().await;
                return Err(e);
            }
        },
        false => None,
    };
    let mut sides = vec![Side::Hops, Side::Flood, Side::Sync];
    if pair.is_some() {
        sides.push(Side::OneCopy);
    }
    let names: Vec<&str> = sides.iter().map(|s| s.name()).collect();
    let units: Vec<&str> = sides.iter().map(|s| s.unit()).collect();
    let result = rotate_units(&label, &units, opts, RUN_LIMIT, &names, |i| {
        let b = bench.clone();
        match (sides[i], &pair) {
            (Side::Hops, _) => hops_run(b, plan.rtts).boxed(),
            (Side::Flood, _) => flood_run(b, plan.writes).boxed(),
            (Side::OneCopy, Some(pair)) => one_copy_run(pair.clone(), plan).boxed(),
            _ => sync_run(b, plan).boxed(),
        }
    })
    .await;
    if let Some(pair) = &pair {
        pair.stop().await;
    }
    let stats = bench.sync_counters();
    bench.stop().await;
    let samples = result?;
    let side = |which: Side| {
        sides
            .iter()
            .position(|&s| s == which)
            .map_or(f64::NAN, |i| samples.median(i))
    };
    let extras = std::mem::take(&mut *super::lock(&bench.extras));
    let (d, rtt): (Vec<f64>, Vec<f64>) =
        extras.diameters.iter().map(|&(d, r)| (d as f64, r)).unzip();
    let one_copy = match pair.is_some() {
        true => format!(", {:.0} (1_copy)", side(Side::OneCopy)),
        false => String::new(),
    };
    eprintln!(
        "  {label}: diameter {} (median), link RTT {:.0} us (median); bytes per update per \
         receiver {:.0} (sync), {:.0} (flood of {FLOOD_PAYLOAD} B, {:.1} copies per \
         receiver){one_copy}; {:.2} cores busy during the writes; over the mesh: {stats}",
        median(&d),
        median(&rtt),
        median(&extras.bytes),
        median(&extras.flood_bytes),
        median(&extras.flood_copies),
        median(&extras.cores),
    );
    let mut figures = vec![
        Figure::compared(
            BENCH,
            format!("{label}_p50"),
            "us",
            Better::Lower,
            side(Side::Sync),
            ("diam×rtt", side(Side::Hops)),
        )
        .with_target(TARGET_RATIO),
        Figure::compared(
            BENCH,
            format!("{label}_p50_flood"),
            "us",
            Better::Lower,
            side(Side::Sync),
            ("flood", side(Side::Flood)),
        ),
        Figure::compared(
            BENCH,
            format!("{label}_p99"),
            "us",
            Better::Lower,
            median(&extras.p99),
            ("diam×rtt", median(&extras.hops_p99)),
        ),
    ];
    if case.bytes {
        figures.push(
            Figure::compared(
                BENCH,
                format!("bytes_per_update_{}", case.name),
                "B",
                Better::Lower,
                median(&extras.bytes),
                ("1_copy", side(Side::OneCopy)),
            )
            .with_value_target(TARGET_BYTES),
        );
    }
    Ok(figures)
}

impl Bench {
    /// Starts the mesh of `case` and a watcher on every node.
    async fn start(case: &Case) -> Result<Self> {
        let mesh =
            Mesh::start_with_latency(case.nodes, case.net, &SyncConfig::default(), case.latency)
                .await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let watchers = mesh
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let mut watch = node.sync().watch(PREFIX);
                let tx = tx.clone();
                tokio::spawn(async move {
                    loop {
                        match watch.recv().await {
                            Ok(change) => {
                                let at = Instant::now();
                                if matches!(change.kind, ChangeKind::Set(_)) {
                                    let arrival = Arrival {
                                        node: i,
                                        key: change.key,
                                        at,
                                    };
                                    if tx.send(arrival).is_err() {
                                        return;
                                    }
                                }
                            }
                            Err(SyncError::Lagged(_)) => {}
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        Ok(Bench {
            mesh,
            arrivals: Mutex::new(rx),
            watchers,
            next_seq: AtomicU64::new(0),
            extras: std::sync::Mutex::new(Extras::default()),
        })
    }

    /// One write from the next node in turn; the time until every other
    /// node's watcher had it.
    async fn write_to_all(&self) -> Result<Duration> {
        let n = self.mesh.nodes.len();
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let origin = (seq % n as u64) as usize;
        let key = key(PREFIX, seq);
        let mut arrivals = self.arrivals.lock().await;
        let start = Instant::now();
        self.mesh.nodes[origin]
            .sync()
            .set(&key, value(seq as u8))
            .await
            .with_context(|| format!("node {origin}: set"))?;
        let deadline = tokio::time::Instant::now() + DELIVERY_LIMIT;
        let mut got = vec![false; n];
        got[origin] = true;
        let mut missing = n - 1;
        let mut last = start;
        while missing > 0 {
            let a = match tokio::time::timeout_at(deadline, arrivals.recv()).await {
                Ok(Some(a)) => a,
                Ok(None) => bail!("every watcher is gone"),
                Err(_) => bail!(
                    "write {seq} from node {origin}: {missing} of {} nodes did not see it \
                     within {DELIVERY_LIMIT:?}",
                    n - 1
                ),
            };
            if a.key != key.as_bytes() || got[a.node] {
                continue;
            }
            got[a.node] = true;
            missing -= 1;
            last = last.max(a.at);
        }
        Ok(last.saturating_duration_since(start))
    }

    /// The sync layer's counters summed over the mesh, for the report.
    fn sync_counters(&self) -> String {
        let (mut pushes, mut entries, mut applied, mut stale, mut rounds, mut equal) =
            (0, 0, 0, 0, 0, 0);
        for n in &self.mesh.nodes {
            let s = n.sync().stats();
            pushes += s.pushes;
            entries += s.pushed_entries;
            applied += s.applied;
            stale += s.stale;
            rounds += s.rounds;
            equal += s.rounds_equal;
        }
        let (_, _, dropped) = super::flood_counters(&self.mesh.nodes);
        format!(
            "{pushes} pushes of {entries} entries, {applied} applied, {stale} stale, \
             {rounds} anti-entropy rounds of which {equal} equal; {dropped} flood copies \
             dropped for a full lane, {} sync or flood messages refused by receivers for a \
             full queue",
            super::inbound_drops(&self.mesh.nodes)
        )
    }

    /// Stops the watchers and the mesh.
    async fn stop(&self) {
        for w in &self.watchers {
            w.abort();
        }
        self.mesh.stop().await;
    }
}

/// One run of the `sync` side: the p50 of `plan.writes` writes to all, in
/// µs; notes the p99 and the bytes per update per receiver.
async fn sync_run(bench: Arc<Bench>, plan: Plan) -> Result<f64> {
    let n = bench.mesh.nodes.len();
    for _ in 0..plan.warmup {
        bench.write_to_all().await?;
    }
    tokio::time::sleep(SETTLE).await;
    let before = bench.mesh.sent();
    let (cpu, wall) = (super::process_cpu_ns()?, Instant::now());
    let mut took = Vec::with_capacity(plan.writes);
    for _ in 0..plan.writes {
        took.push(bench.write_to_all().await?);
    }
    let cpu = (super::process_cpu_ns()? - cpu) as f64 / wall.elapsed().as_nanos() as f64;
    tokio::time::sleep(SETTLE).await;
    let bytes = (bench.mesh.sent() - before) as f64 / (plan.writes * (n - 1)) as f64;
    took.sort_unstable();
    let mut extras = super::lock(&bench.extras);
    extras.p99.push(quantile_micros(&took, 0.99));
    extras.bytes.push(bytes);
    extras.cores.push(cpu);
    Ok(quantile_micros(&took, 0.5))
}

/// One run of the `diam×rtt` side: the diameter times the median of `rtts`
/// round trips between neighbours, in µs; notes the same with the p99.
async fn hops_run(bench: Arc<Bench>, rtts: usize) -> Result<f64> {
    let mesh = &bench.mesh;
    let links = mesh.links();
    let diam = diameter(&links).context("the mesh is not connected")?;
    let ids: Vec<_> = mesh.nodes.iter().map(|n| n.node_id().clone()).collect();
    let payload = Bytes::from(vec![0xa5; ECHO_PAYLOAD]);
    let mut took = Vec::with_capacity(rtts);
    for k in 0..rtts {
        let from = k % mesh.nodes.len();
        let Some(&to) = links[from].get((k / mesh.nodes.len()) % links[from].len().max(1)) else {
            bail!("node {from} has no links");
        };
        let ctx = mesh.nodes[from].concerns().context(ECHO);
        let start = Instant::now();
        let reply = ctx
            .request(&ids[to], payload.clone(), DELIVERY_LIMIT)
            .await
            .with_context(|| format!("echo from node {from} to node {to}"))?;
        took.push(start.elapsed());
        ensure!(reply.len() == ECHO_PAYLOAD, "echo of {} bytes", reply.len());
    }
    took.sort_unstable();
    let (p50, p99) = (quantile_micros(&took, 0.5), quantile_micros(&took, 0.99));
    let mut extras = super::lock(&bench.extras);
    extras.hops_p99.push(diam as f64 * p99);
    extras.diameters.push((diam, p50));
    Ok(diam as f64 * p50)
}

/// One run of the `flood` side: the median over `rounds` broadcasts of a
/// push's payload of the time until every other node's sink had it, in
/// µs; notes the bytes written per receiver.
async fn flood_run(bench: Arc<Bench>, rounds: usize) -> Result<f64> {
    let mesh = &bench.mesh;
    let n = mesh.nodes.len();
    let mut deliveries = mesh.deliveries.lock().await;
    while deliveries.try_recv().is_ok() {}
    let before = mesh.sent();
    let (_, duplicates, _) = super::flood_counters(&mesh.nodes);
    let mut took = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let origin = r % n;
        let ctx = mesh.nodes[origin].concerns().context(SINK);
        let payload = Bytes::from(vec![r as u8; FLOOD_PAYLOAD]);
        let start = Instant::now();
        ctx.broadcast(payload, FLOOD_TTL)
            .await
            .with_context(|| format!("node {origin}: broadcast"))?;
        let deadline = tokio::time::Instant::now() + DELIVERY_LIMIT;
        let mut got = vec![false; n];
        got[origin] = true;
        let mut missing = n - 1;
        while missing > 0 {
            let d = match tokio::time::timeout_at(deadline, deliveries.recv()).await {
                Ok(Some(d)) => d,
                Ok(None) => bail!("every sink is gone"),
                Err(_) => bail!("{missing} nodes did not get a broadcast in {DELIVERY_LIMIT:?}"),
            };
            ensure!(!got[d.node], "node {} got a broadcast twice", d.node);
            got[d.node] = true;
            missing -= 1;
        }
        took.push(start.elapsed());
    }
    drop(deliveries);
    tokio::time::sleep(SETTLE).await;
    let receivers = (rounds * (n - 1)) as f64;
    let bytes = (mesh.sent() - before) as f64 / receivers;
    let duplicates = super::flood_counters(&mesh.nodes).1 - duplicates;
    let mut extras = super::lock(&bench.extras);
    extras.flood_bytes.push(bytes);
    extras
        .flood_copies
        .push(1.0 + duplicates as f64 / receivers);
    drop(extras);
    took.sort_unstable();
    Ok(quantile_micros(&took, 0.5))
}

/// One run of the `1_copy` side on the 2-node `pair`: the bytes per
/// update per receiver of a [`sync_run`] there, where every write is pushed
/// once, to the one other node.
async fn one_copy_run(pair: Arc<Bench>, plan: Plan) -> Result<f64> {
    sync_run(pair.clone(), plan).await?;
    let bytes = super::lock(&pair.extras).bytes.pop();
    bytes.context("the pair's run noted no bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_side_runs_on_a_small_mesh() {
        let case = Case {
            name: "5_nodes",
            nodes: 5,
            net: Net::Mem,
            latency: Duration::ZERO,
            share: 1,
            bytes: true,
        };
        let bench = Arc::new(Bench::start(&case).await.unwrap());
        let pair = Arc::new(Bench::start(&PAIR).await.unwrap());
        let plan = Plan {
            warmup: 1,
            writes: 5,
            rtts: 10,
        };
        let hops = hops_run(bench.clone(), plan.rtts).await;
        let one_copy = one_copy_run(pair.clone(), plan).await;
        let flood = flood_run(bench.clone(), plan.writes).await;
        let sync = sync_run(bench.clone(), plan).await;
        bench.stop().await;
        pair.stop().await;
        assert!(hops.unwrap() > 0.0);
        assert!(one_copy.unwrap() > 0.0);
        assert!(flood.unwrap() > 0.0);
        assert!(sync.unwrap() > 0.0);
        assert!(super::super::lock(&bench.extras).bytes[0] > 0.0);
    }
}
