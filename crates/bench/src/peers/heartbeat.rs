//! CPU cost of heartbeats to idle peers: `heartbeat_cpu_{N}_peers`.
//!
//! One hub and N leaves on a fresh in-memory network, in this process, all
//! with the default transport [`Config`] (Noise) except for keepalive. The
//! leaves are bare endpoints with keepalive off, on a tokio runtime of their
//! own (one worker thread named [`LEAF_THREAD`]): they dial the hub (at most
//! [`DIAL_IN_FLIGHT`] at a time), hold their connection and never send
//! anything but the Pongs their connection answers Pings with. The sides
//! differ only in the hub, which runs on the bench's runtime:
//!
//! - `peers`: a [`PeerManager`] (`max_peers` [`HUB_MAX_PEERS`]) on an
//!   endpoint with the transport keepalive off, its heartbeat fixed at
//!   [`Plan::interval`] (no slow-down): every tick (250 ms) it looks at every
//!   link and pings those quiet for the interval, each ping a task that
//!   waits for its Pong and reports the RTT to the pool;
//! - `keepalive`: a bare endpoint that accepts and holds the connections,
//!   its transport keepalive set to the same interval (each connection's
//!   writer wakes every interval and pings if it sent nothing for that
//!   long).
//!
//! Once all N links are up the hub is left alone for [`Plan::settle`], then
//! CPU time is counted over [`Plan::window`]: per thread, the time on CPU
//! from `/proc/self/task/*/schedstat` (nanoseconds). The figure is the time
//! of every thread but the leaves' (the hub, the bench's runtime, the main
//! thread) as a percentage of the window: 100 % is one core busy. The
//! leaves' own share (answering Pings) and the Pings the hub sent per second
//! are printed on stderr for both sides, since the transport's keepalive and
//! the manager's tick do not round the interval the same way.
//!
//! [`Config`]: meshwork_transport::Config

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use futures_util::{FutureExt as _, StreamExt as _};
use meshwork_peers::{PeerManager, PeersConfig};
use meshwork_transport::mem::MemNetwork;
use meshwork_transport::{Address, Config, Connection, Endpoint};
use tokio::task::JoinHandle;

use super::{BENCH, NETWORK};
use crate::harness::{Options, median, rotate};
use crate::report::{Better, Figure};

/// `max_peers` of the hub's manager: room for every leaf (it accepts at
/// most this minus the 2 slots reserved for its own dials).
const HUB_MAX_PEERS: usize = 512;
/// The name of the leaves' runtime thread, to tell its CPU time apart.
const LEAF_THREAD: &str = "bench-leaf";
/// Leaves dialling the hub at once.
const DIAL_IN_FLIGHT: usize = 32;
/// Time allowed for one run, set-up and shut-down included.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// How many peers, how often they are pinged, and for how long CPU is
/// counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Idle peers of the hub.
    pub(crate) peers: usize,
    /// Ping a peer after this long without traffic.
    pub(crate) interval: Duration,
    /// Time between the last link coming up and the window.
    pub(crate) settle: Duration,
    /// Time over which CPU is counted.
    pub(crate) window: Duration,
}

impl Plan {
    /// A full run.
    pub(crate) const FULL: Plan = Plan {
        peers: 500,
        interval: Duration::from_secs(1),
        settle: Duration::from_millis(1_500),
        window: Duration::from_secs(3),
    };
    /// A `--quick` run.
    pub(crate) const QUICK: Plan = Plan {
        peers: 500,
        interval: Duration::from_secs(1),
        settle: Duration::from_millis(1_500),
        window: Duration::from_secs(2),
    };
}

/// What one run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Reading {
    /// CPU time of every thread but the leaves' over the window, in % of
    /// one core.
    hub_percent: f64,
    /// CPU time of the leaves' thread over the window, in % of one core.
    leaves_percent: f64,
    /// Frames the hub sent per second over the window (Pings, on an idle
    /// link).
    pings_per_sec: f64,
}

/// Measures the figure: keepalive and manager in turn; the medians.
pub(crate) async fn measure(opts: &Options, plan: Plan) -> Result<Figure> {
    let metric = format!("heartbeat_cpu_{}_peers", plan.peers);
    let sides = ["keepalive", "peers"];
    let readings: Arc<Mutex<[Vec<Reading>; 2]>> = Arc::default();
    let samples = rotate(&metric, "%", opts, RUN_LIMIT, &sides, |side| {
        let readings = readings.clone();
        async move {
            let reading = one_run(side == 1, plan).await?;
            lock(&readings)[side].push(reading);
            Ok(reading.hub_percent)
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
            "  {metric}: CPU of every thread but the leaves' over {} ms, starting {} ms after \
             the last of {} links came up; ping after {} ms of silence",
            plan.window.as_millis(),
            plan.settle.as_millis(),
            plan.peers,
            plan.interval.as_millis(),
        );
        for (side, name) in sides.iter().enumerate() {
            let (pings, hub) = (of(side, |r| r.pings_per_sec), of(side, |r| r.hub_percent));
            eprintln!(
                "  {metric}: {name}: hub sent {pings:.0} pings/s, {:.1} us of hub CPU per ping; \
                 leaves' thread {:.2} %",
                hub / 100.0 * 1e6 / pings,
                of(side, |r| r.leaves_percent),
            );
        }
    }
    Ok(Figure::compared(
        BENCH,
        metric,
        "%",
        Better::Lower,
        samples.median(1),
        ("keepalive", samples.median(0)),
    ))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The hub of one run.
enum Hub {
    /// A peer manager.
    Peers(PeerManager),
    /// A bare endpoint and the task holding what it accepted.
    Bare(Endpoint, JoinHandle<Vec<Connection>>),
}

impl Hub {
    /// A hub listening on `mem://hub` on `net`: a manager when `peers`.
    async fn start(net: &MemNetwork, peers: bool, plan: Plan) -> Result<Self> {
        let keepalive = (!peers).then_some(plan.interval);
        let endpoint = Endpoint::new(
            Config::new(NETWORK).with_keepalive(keepalive, None),
            net.transport("hub"),
        );
        endpoint.listen(&hub_addr()).await.context("hub listen")?;
        if peers {
            let config = PeersConfig::default()
                .with_max_peers(HUB_MAX_PEERS)
                .with_heartbeat(plan.interval, 5 * plan.interval, 10 * plan.interval)
                .with_heartbeat_slow_down(Duration::ZERO, plan.interval);
            return Ok(Hub::Peers(
                PeerManager::start(endpoint, config).context("hub manager")?,
            ));
        }
        let acceptor = endpoint.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(conn) = acceptor.accept().await {
                held.push(conn);
            }
            held
        });
        Ok(Hub::Bare(endpoint, task))
    }

    fn endpoint(&self) -> &Endpoint {
        match self {
            Hub::Peers(m) => m.endpoint(),
            Hub::Bare(e, _) => e,
        }
    }

    /// Waits until the hub has adopted `n` links (at most 10 s).
    async fn wait_for(&self, n: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let open = self.endpoint().stats().open_connections;
            let adopted = match self {
                Hub::Peers(m) => m.stats().connected,
                Hub::Bare(..) => open,
            };
            if open == n && adopted == n {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the hub has {open} connections open and {adopted} adopted, not {n}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn shutdown(self) {
        match self {
            Hub::Peers(m) => m.shutdown().await,
            Hub::Bare(e, task) => {
                e.shutdown().await;
                drop(task.await);
            }
        }
    }
}

/// The hub's address.
fn hub_addr() -> Address {
    Address::mem("hub")
}

/// The leaves of one run: endpoints and their connections to the hub.
struct Leaves {
    endpoints: Vec<Endpoint>,
    held: Vec<Connection>,
}

impl Leaves {
    /// `n` leaves on `net`, each connected to the hub.
    async fn connect(net: MemNetwork, n: usize) -> Result<Self> {
        let endpoints: Vec<Endpoint> = (0..n)
            .map(|i| {
                let config = Config::new(NETWORK).with_keepalive(None, None);
                Endpoint::new(config, net.transport(&format!("leaf{i}")))
            })
            .collect();
        let dialled: Vec<_> = futures_util::stream::iter(endpoints.clone())
            .map(|leaf| async move { leaf.connect(&hub_addr()).await })
            .buffer_unordered(DIAL_IN_FLIGHT)
            .collect()
            .await;
        let mut held = Vec::with_capacity(n);
        let mut failed = None;
        for d in dialled {
            match d {
                Ok(conn) => held.push(conn),
                Err(e) => failed = Some(e),
            }
        }
        let leaves = Leaves { endpoints, held };
        if let Some(e) = failed {
            leaves.shutdown().await;
            return Err(e).context("a leaf dialling the hub");
        }
        Ok(leaves)
    }

    async fn shutdown(self) {
        drop(self.held);
        futures_util::future::join_all(self.endpoints.iter().map(Endpoint::shutdown)).await;
    }
}

/// One run of one side: the hub is a manager when `peers`.
async fn one_run(peers: bool, plan: Plan) -> Result<Reading> {
    let leaf_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(LEAF_THREAD)
        .enable_all()
        .build()
        .context("starting the leaves' runtime")?;
    let net = MemNetwork::new();
    let hub = Hub::start(&net, peers, plan).await?;
    let leaves = leaf_runtime
        .spawn(Leaves::connect(net, plan.peers))
        .await
        .context("the leaves' task")?;
    let result = match leaves {
        Ok(leaves) => {
            let result = measure_idle(&hub, plan).await;
            // The leaves' tasks live on their runtime: end them there.
            let _ = leaf_runtime.spawn(leaves.shutdown()).await;
            result
        }
        Err(e) => Err(e),
    };
    hub.shutdown().await;
    // Dropping a runtime blocks; this does not.
    leaf_runtime.shutdown_background();
    result
}

/// Waits for every link, lets the hub settle, and counts CPU over the
/// window.
async fn measure_idle(hub: &Hub, plan: Plan) -> Result<Reading> {
    hub.wait_for(plan.peers).await?;
    tokio::time::sleep(plan.settle).await;
    let (sent_before, cpu_before, start) =
        (frames_sent(hub.endpoint()), cpu_times()?, Instant::now());
    tokio::time::sleep(plan.window).await;
    let (sent_after, cpu_after, elapsed) =
        (frames_sent(hub.endpoint()), cpu_times()?, start.elapsed());
    let open = hub.endpoint().stats().open_connections;
    ensure!(
        open == plan.peers,
        "the hub had {open} connections open at the end of the window, not {}",
        plan.peers
    );
    let percent = |leaf: bool| {
        cpu_delta(&cpu_before, &cpu_after, leaf).as_secs_f64() / elapsed.as_secs_f64() * 100.0
    };
    Ok(Reading {
        hub_percent: percent(false),
        leaves_percent: percent(true),
        pings_per_sec: sent_after.saturating_sub(sent_before) as f64 / elapsed.as_secs_f64(),
    })
}

/// Frames sent on every open connection of `endpoint`.
fn frames_sent(endpoint: &Endpoint) -> u64 {
    endpoint
        .connections()
        .iter()
        .map(|c| c.stats().frames_sent)
        .sum()
}

/// One thread's time on CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ThreadCpu {
    /// Nanoseconds on CPU since the thread started.
    ns: u64,
    /// Whether it is a thread of the leaves' runtime.
    leaf: bool,
}

/// Time on CPU of every thread of this process, by thread id, from
/// `/proc/self/task/<tid>/schedstat` (its first field) and `comm`.
fn cpu_times() -> Result<HashMap<u64, ThreadCpu>> {
    let mut times = HashMap::new();
    for entry in std::fs::read_dir("/proc/self/task").context("listing /proc/self/task")? {
        let entry = entry.context("listing /proc/self/task")?;
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A thread may end between the listing and the reads.
        let (Ok(text), Ok(name)) = (
            std::fs::read_to_string(entry.path().join("schedstat")),
            std::fs::read_to_string(entry.path().join("comm")),
        ) else {
            continue;
        };
        let ns = parse_schedstat(&text)
            .with_context(|| format!("unexpected schedstat of thread {tid}: {text:?}"))?;
        let leaf = name.trim_end() == LEAF_THREAD;
        times.insert(tid, ThreadCpu { ns, leaf });
    }
    ensure!(!times.is_empty(), "no thread in /proc/self/task");
    Ok(times)
}

/// The time on CPU, in ns, from the text of a `schedstat` file.
fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// CPU time spent between two [`cpu_times`] readings by the leaves' threads
/// (`leaf`) or by the others: the growth of every such thread alive at the
/// second reading (a thread started since counts from zero). A thread that
/// ended in between is not counted; the runtimes' workers live as long as
/// their runtime, and blocking threads end only after idling.
fn cpu_delta(
    before: &HashMap<u64, ThreadCpu>,
    after: &HashMap<u64, ThreadCpu>,
    leaf: bool,
) -> Duration {
    let ns = after
        .iter()
        .filter(|(_, t)| t.leaf == leaf)
        .map(|(tid, t)| t.ns.saturating_sub(before.get(tid).map_or(0, |b| b.ns)))
        .sum();
    Duration::from_nanos(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_of_this_process_grows() {
        assert_eq!(
            parse_schedstat("394944997 199466203 87\n"),
            Some(394_944_997)
        );
        assert_eq!(parse_schedstat(""), None);
        // Spinning shows up as CPU time (however loaded the machine: the
        // loop runs until it does, for at most 10 s of wall time).
        let before = cpu_times().unwrap();
        let start = Instant::now();
        let mut x = 0u64;
        loop {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            let spent = cpu_delta(&before, &cpu_times().unwrap(), false);
            if spent >= Duration::from_millis(20) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{spent:?} of CPU counted in 10 s of spinning"
            );
        }
        let t = |ns, leaf| ThreadCpu { ns, leaf };
        let then = HashMap::from([(1, t(10, false)), (2, t(5, false)), (4, t(1, true))]);
        let now = HashMap::from([(1, t(15, false)), (3, t(7, false)), (4, t(4, true))]);
        assert_eq!(cpu_delta(&then, &now, false), Duration::from_nanos(12));
        assert_eq!(cpu_delta(&then, &now, true), Duration::from_nanos(3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_sides_run_with_a_few_peers() {
        let plan = Plan {
            peers: 10,
            interval: Duration::from_millis(200),
            settle: Duration::from_millis(300),
            window: Duration::from_millis(500),
        };
        for peers in [false, true] {
            let reading = one_run(peers, plan).await.unwrap();
            assert!(reading.hub_percent > 0.0, "{reading:?}");
            assert!(reading.pings_per_sec > 0.0, "{reading:?}");
        }
    }
}
