//! A late joiner catching up: `catchup_100k_keys_tcp`; and what holding
//! the keys costs when nothing happens: `idle_cpu_100k_keys_2_nodes`.
//!
//! A 2-node loopback TCP mesh (default configs) is built once and node 0
//! writes `keys` keys (16-byte keys, 32-byte values); node 1 has them all
//! before anything is measured. The sides:
//!
//! - `sync` ([`join_run`]): a new node seeded with node 0 starts; timed from
//!   the start of [`NodeBuilder::start`] until its digest equals node 0's
//!   (polled every millisecond). It is shut down after; the next run starts
//!   another one. The bytes it read meanwhile, and the entries it received
//!   (`applied` + `stale`: entries it already held), are printed.
//! - `raw_tcp` ([`raw_run`]): as many bytes as the map's keys and values
//!   ([`map_bytes`]: 4.8 MB for 100k keys of 16 bytes with 32-byte values),
//!   written on a plain `TcpStream` (`TCP_NODELAY`, 64 KiB writes) to a
//!   task that reads them all; timed from the connect until the reader has
//!   the last byte. This is the wire's floor for moving the data the joiner
//!   needs, once, with no versions, leases, encryption, framing, hashing or
//!   merging.
//!
//! `idle_cpu_100k_keys_2_nodes` (% of one core): the CPU time of the whole
//! process (every thread, from `/proc/self/task/*/schedstat`; the bench
//! itself sleeps meanwhile) over one anti-entropy interval (2 s) while the
//! two nodes hold the keys and nothing is written, against `empty`: the
//! same two nodes before the keys were written.
//!
//! [`NodeBuilder::start`]: meshwork::NodeBuilder::start

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use futures_util::FutureExt as _;
use meshwork::sync::SyncConfig;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::{BENCH, Mesh, Net, key, start_node, value, wait_until};
use crate::harness::{Options, rotate};
use crate::report::{Better, Figure};

/// Time allowed for one run of one side.
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// Time the first nodes may take to agree after the writes.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);
/// Time a joiner may take to catch up.
const CATCHUP_LIMIT: Duration = Duration::from_secs(100);
/// Size of each write of the raw side.
const RAW_CHUNK: usize = 64 * 1024;

/// Quiet time after the nodes agree, before the idle CPU is measured.
const IDLE_SETTLE: Duration = Duration::from_millis(500);

/// How much work the measurement does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// Keys the mesh holds when the joiner comes.
    keys: usize,
    /// Window of each idle CPU measurement: one anti-entropy interval.
    idle_window: Duration,
}

impl Plan {
    /// A full run.
    pub(crate) const FULL: Plan = Plan {
        keys: 100_000,
        idle_window: Duration::from_secs(2),
    };
    /// A quick run: the same, as the figures are defined by it.
    pub(crate) const QUICK: Plan = Plan {
        keys: 100_000,
        idle_window: Duration::from_secs(2),
    };
}

/// The mesh, and the size of its map.
struct Bench {
    mesh: Mesh,
    next_joiner: AtomicU64,
    /// Bytes of the map's keys and values.
    map_bytes: usize,
}

/// Measures the catch-up of a joiner against moving its bytes over raw
/// TCP, and the idle CPU of the two nodes with the keys against without.
pub(crate) async fn measure(opts: &Options, plan: Plan) -> Result<Vec<Figure>> {
    let label = format!("catchup_{}k_keys_tcp", plan.keys / 1000);
    let mesh = Mesh::start(2, Net::Tcp, &SyncConfig::default()).await?;
    let prepared = async {
        let empty = idle_cpu(plan.idle_window).await?;
        let (wrote, agreed) = fill(&mesh, plan.keys).await?;
        tokio::time::sleep(IDLE_SETTLE).await;
        let full = idle_cpu(plan.idle_window).await?;
        anyhow::Ok((empty, full, wrote, agreed))
    };
    let (empty, full, wrote, agreed) = match prepared.await {
        Ok(p) => p,
        Err(e) => {
            mesh.stop().await;
            return Err(e);
        }
    };
    let (_, _, dropped) = super::flood_counters(&mesh.nodes);
    let refused = super::inbound_drops(&mesh.nodes);
    let writer = mesh.nodes[0].sync().stats();
    let reader = mesh.nodes[1].sync().stats();
    let map_bytes = map_bytes(&mesh);
    eprintln!(
        "  {label}: 2 loopback TCP nodes; {} keys written on node 0 in {:.0} ms ({} pushes; \
         {} flood copies dropped by the sender for a full lane, {} by the receiver for a full \
         queue), held by node 1 {:.0} ms later (node 1: {} entries \
         applied, {} stale, {} pulled in {} rounds; node 0: {} sent in {} rounds); the keys and values are {:.1} MiB; idle CPU {:.1}% of \
         a core with the keys, {:.1}% without",
        plan.keys,
        wrote.as_secs_f64() * 1e3,
        writer.pushes,
        dropped,
        refused,
        agreed.as_secs_f64() * 1e3,
        reader.applied,
        reader.stale,
        reader.pulled,
        reader.rounds,
        writer.sent,
        writer.rounds,
        map_bytes as f64 / (1024.0 * 1024.0),
        full,
        empty,
    );
    let bench = Arc::new(Bench {
        mesh,
        next_joiner: AtomicU64::new(2),
        map_bytes,
    });
    let sides = ["sync", "raw_tcp"];
    let result = rotate(&label, "ms", opts, RUN_LIMIT, &sides, |side| {
        let b = bench.clone();
        match side {
            0 => join_run(b).boxed(),
            _ => raw_run(b).boxed(),
        }
    })
    .await;
    bench.mesh.stop().await;
    let samples = result?;
    Ok(vec![
        Figure::compared(
            BENCH,
            label,
            "ms",
            Better::Lower,
            samples.median(0),
            ("raw_tcp", samples.median(1)),
        ),
        Figure::compared(
            BENCH,
            format!("idle_cpu_{}k_keys_2_nodes", plan.keys / 1000),
            "%",
            Better::Lower,
            full,
            ("empty", empty),
        ),
    ])
}

/// The CPU time of the whole process over `window`, as a percentage of one
/// core.
async fn idle_cpu(window: Duration) -> Result<f64> {
    let before = super::process_cpu_ns()?;
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let ns = super::process_cpu_ns()?.saturating_sub(before);
    Ok(ns as f64 / start.elapsed().as_nanos() as f64 * 100.0)
}

/// Writes `keys` keys on node 0; the time that took, and the time node 1
/// took after that to hold the same.
async fn fill(mesh: &Mesh, keys: usize) -> Result<(Duration, Duration)> {
    let start = Instant::now();
    let map = mesh.nodes[0].sync();
    let v = value(0);
    for k in 0..keys {
        map.set(key("c/", k as u64), v.clone())
            .await
            .context("node 0: set")?;
    }
    let wrote = start.elapsed();
    let agreed = wait_until(
        "node 1 to hold node 0's keys",
        SETTLE_LIMIT,
        Duration::from_millis(5),
        || super::all_equal(&mesh.digests()),
    )
    .await?;
    Ok((wrote, agreed))
}

/// One run of the `sync` side: a new node joins; the time until it holds
/// what node 0 holds, in ms.
async fn join_run(bench: Arc<Bench>) -> Result<f64> {
    let mesh = &bench.mesh;
    let target = mesh.nodes[0].sync().digest();
    let seed = mesh.nodes[0]
        .listen_addrs()
        .first()
        .cloned()
        .context("node 0 listens nowhere")?;
    let i = bench.next_joiner.fetch_add(1, Ordering::Relaxed) as usize;
    let start = Instant::now();
    let (joiner, bytes) = start_node(
        i,
        None,
        Some(&seed),
        SyncConfig::default(),
        mesh.deliveries_tx.clone(),
    )
    .await?;
    let caught_up = wait_until(
        "the joiner to catch up",
        CATCHUP_LIMIT,
        Duration::from_millis(1),
        || joiner.sync().digest() == target,
    )
    .await;
    let took = start.elapsed();
    let read = bytes.received();
    let stats = joiner.sync().stats();
    joiner.shutdown().await;
    caught_up?;
    eprintln!(
        "    joiner {i}: read {:.1} MiB ({:.1}× the keys and values); {} entries pulled, {} applied, {} \
         already held (stale), {} rounds",
        read as f64 / (1024.0 * 1024.0),
        read as f64 / bench.map_bytes as f64,
        stats.pulled,
        stats.applied,
        stats.stale,
        stats.rounds
    );
    Ok(took.as_secs_f64() * 1e3)
}

/// The bytes of node 0's keys and values, laid end to end.
fn map_bytes(mesh: &Mesh) -> usize {
    mesh.nodes[0]
        .sync()
        .items()
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum()
}

/// One run of the `raw_tcp` side: the map's bytes over a plain TCP
/// connection, in ms.
async fn raw_run(bench: Arc<Bench>) -> Result<f64> {
    let total = bench.map_bytes;
    ensure!(total > 0, "the map is empty");
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let reader = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await?;
        let mut buf = vec![0u8; RAW_CHUNK];
        let mut got = 0;
        while got < total {
            let n = stream.read(&mut buf).await?;
            ensure!(n > 0, "the writer closed after {got} of {total} bytes");
            got += n;
        }
        anyhow::Ok(Instant::now())
    });
    let chunk = vec![0x5au8; RAW_CHUNK];
    let start = Instant::now();
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut left = total;
    while left > 0 {
        let n = left.min(RAW_CHUNK);
        stream.write_all(&chunk[..n]).await?;
        left -= n;
    }
    stream.flush().await?;
    let done = reader.await.context("the raw reader failed")??;
    Ok(done.saturating_duration_since(start).as_secs_f64() * 1e3)
}
