//! Local write rate: `writes_per_s`.
//!
//! The sides, taking turns:
//!
//! - `sync` ([`sync_run`]): a fresh 2-node in-memory mesh (default configs)
//!   per run, so every run starts from an empty replica; after
//!   [`Plan::warmup`] unmeasured writes, node 0 calls
//!   [`SyncMap::set`](meshwork::sync::SyncMap::set) for `writes` new keys
//!   (16 bytes, values 32 bytes), one after the other from one task. A set
//!   returns once the write is applied locally and queued for the pusher, so
//!   this includes waiting for the push queue when the pusher falls behind.
//!   The time node 1 then takes to hold the same, and the pushes it refused
//!   because their sender's queue was full, are printed (not part of the
//!   figure).
//! - `mutex_map` ([`map_run`]): the same keys and values inserted into a
//!   `Mutex<HashMap<Bytes, Bytes>>`, locking for each insert and copying
//!   each key into a `Bytes` as `set` does. A lower bound: no clock, no
//!   lease, no hash of the entry, no watchers, no push.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use futures_util::FutureExt as _;
use meshwork::sync::SyncConfig;

use super::{BENCH, Mesh, Net, all_equal, key, value, wait_until};
use crate::harness::{Options, median, rotate};
use crate::report::{Better, Figure};

/// Time allowed for one run of one side.
const RUN_LIMIT: Duration = Duration::from_secs(60);
/// Time node 1 may take to hold node 0's writes.
const PEER_LIMIT: Duration = Duration::from_secs(50);

/// How much work each run does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// Unmeasured writes first.
    warmup: usize,
    /// Measured writes.
    writes: usize,
}

impl Plan {
    /// A full run.
    pub(crate) const FULL: Plan = Plan {
        warmup: 2_000,
        writes: 50_000,
    };
    /// A quick run.
    pub(crate) const QUICK: Plan = Plan {
        warmup: 1_000,
        writes: 20_000,
    };
}

/// Measures `writes_per_s` against `mutex_map`.
pub(crate) async fn measure(opts: &Options, plan: Plan) -> Result<Figure> {
    let label = "writes_per_s";
    eprintln!(
        "  {label}: {} sets on node 0 of a fresh 2-node in-memory mesh per run, one task",
        plan.writes
    );
    let keys: Arc<Vec<String>> = Arc::new((0..plan.writes as u64).map(|k| key("k/", k)).collect());
    let peer: Arc<Mutex<Vec<(f64, f64)>>> = Arc::new(Mutex::new(Vec::new()));
    let samples = rotate(
        label,
        "writes/s",
        opts,
        RUN_LIMIT,
        &["mutex_map", "sync"],
        |side| match side {
            0 => map_run(keys.clone()).boxed(),
            _ => sync_run(plan, keys.clone(), peer.clone()).boxed(),
        },
    )
    .await?;
    let (caught_up, drops): (Vec<f64>, Vec<f64>) = super::lock(&peer).iter().copied().unzip();
    eprintln!(
        "  {label}: node 1 held every write {:.0} ms after the last set returned, having \
         refused {:.0} pushes for a full queue (medians)",
        median(&caught_up),
        median(&drops)
    );
    Ok(Figure::compared(
        BENCH,
        label,
        "writes/s",
        Better::Higher,
        samples.median(1),
        ("mutex_map", samples.median(0)),
    ))
}

/// One run of the `sync` side: sets per second; notes how long node 1 took
/// to catch up, in ms, and how many pushes it refused.
async fn sync_run(
    plan: Plan,
    keys: Arc<Vec<String>>,
    peer: Arc<Mutex<Vec<(f64, f64)>>>,
) -> Result<f64> {
    let mesh = Mesh::start(2, Net::Mem, &SyncConfig::default()).await?;
    let result = async {
        let map = mesh.nodes[0].sync();
        let v = value(1);
        for k in 0..plan.warmup {
            map.set(key("u/", k as u64), v.clone()).await?;
        }
        let start = Instant::now();
        for k in keys.iter() {
            map.set(k, v.clone()).await?;
        }
        let took = start.elapsed();
        let caught_up = wait_until(
            "node 1 to hold node 0's writes",
            PEER_LIMIT,
            Duration::from_millis(2),
            || all_equal(&mesh.digests()),
        )
        .await?;
        anyhow::Ok((took, caught_up, super::inbound_drops(&mesh.nodes)))
    }
    .await
    .context("writing");
    mesh.stop().await;
    let (took, caught_up, drops) = result?;
    super::lock(&peer).push((caught_up.as_secs_f64() * 1e3, drops as f64));
    Ok(keys.len() as f64 / took.as_secs_f64())
}

/// One run of the `mutex_map` side: inserts per second.
async fn map_run(keys: Arc<Vec<String>>) -> Result<f64> {
    let map: Mutex<HashMap<Bytes, Bytes>> = Mutex::new(HashMap::new());
    let v = value(1);
    let start = Instant::now();
    for k in keys.iter() {
        let key = Bytes::copy_from_slice(k.as_bytes());
        super::lock(&map).insert(key, v.clone());
    }
    let took = start.elapsed();
    let len = super::lock(&map).len();
    anyhow::ensure!(len == keys.len(), "{len} keys in the map");
    Ok(keys.len() as f64 / took.as_secs_f64())
}
