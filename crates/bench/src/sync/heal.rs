//! Healing a partition: `heal_10k_conflicts_10_nodes`.
//!
//! Each run builds a fresh 10-node in-memory mesh (default configs, so
//! every run starts from the same empty replicas) and:
//!
//! 1. splits it into halves, nodes 0-4 and 5-9: every node blocks every
//!    node of the other half ([`PeerManager::block`]: its link ends and
//!    handshakes are refused, as if the network between them broke), and
//!    waits until no link crosses and each half is connected;
//! 2. has every node write its share of the same `keys` keys (16-byte keys,
//!    32-byte values), each half its own values, so every key is claimed
//!    on both sides: 10k conflicts for the merge to resolve;
//! 3. waits until the digests within each half are equal (and differ
//!    between the halves);
//! 4. lifts every block ([`PeerManager::unblock`]: the peer managers
//!    redial the peers they lost) and measures the time until all 10
//!    digests are equal, checking the key count.
//!
//! The baseline is the anti-entropy interval, a setting: the issue's
//! target is a heal within one interval after connectivity returns. The
//! time until the first link across is back is printed with the figure.
//!
//! [`PeerManager::block`]: meshwork::peers::PeerManager::block
//! [`PeerManager::unblock`]: meshwork::peers::PeerManager::unblock

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use futures_util::FutureExt as _;
use meshwork::sync::SyncConfig;

use super::{BENCH, Mesh, Net, all_equal, connected_among, key, value, wait_until};
use crate::harness::{Options, median, rotate};
use crate::report::{Better, Figure};

/// Time allowed for one run, set-up included.
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// Time the halves may take to separate, agree, or heal.
const STEP_LIMIT: Duration = Duration::from_secs(60);
/// How often the digests are compared.
const POLL: Duration = Duration::from_millis(2);
/// Nodes of the mesh.
const NODES: usize = 10;

/// How much work each run does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// Keys written on both sides.
    keys: usize,
}

impl Plan {
    /// A full run.
    pub(crate) const FULL: Plan = Plan { keys: 10_000 };
    /// A quick run: the same, as the figure is defined by it.
    pub(crate) const QUICK: Plan = Plan { keys: 10_000 };
}

/// Measures the heal time against the anti-entropy interval.
pub(crate) async fn measure(opts: &Options, plan: Plan) -> Result<Figure> {
    let label = format!("heal_{}k_conflicts_{NODES}_nodes", plan.keys / 1000);
    let interval = Duration::from_secs(2);
    eprintln!(
        "  {label}: a fresh {NODES}-node in-memory mesh per run, split 5/5 by blocks, \
         {} keys written on both sides, then unblocked; anti-entropy every {interval:?}",
        plan.keys
    );
    let reconnect = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let samples = rotate(&label, "ms", opts, RUN_LIMIT, &["sync"], |_| {
        heal_run(plan, reconnect.clone()).boxed()
    })
    .await?;
    let reconnect = median(&super::lock(&reconnect));
    eprintln!(
        "  {label}: the first link across was back {reconnect:.0} ms after the unblock (median)"
    );
    Ok(Figure::compared(
        BENCH,
        label,
        "ms",
        Better::Lower,
        samples.median(0),
        ("ae_interval", interval.as_secs_f64() * 1e3),
    )
    .with_target(1.0))
}

/// One run; the heal time in ms. Notes when the first link across was
/// back.
async fn heal_run(
    plan: Plan,
    reconnect: std::sync::Arc<std::sync::Mutex<Vec<f64>>>,
) -> Result<f64> {
    let mesh = Mesh::start(NODES, Net::Mem, &SyncConfig::default()).await?;
    let result = split_write_heal(&mesh, plan).await;
    mesh.stop().await;
    let (heal, first_link) = result?;
    super::lock(&reconnect).push(first_link.as_secs_f64() * 1e3);
    Ok(heal.as_secs_f64() * 1e3)
}

/// Steps 1 to 4 on `mesh`: the heal time, and the time until the first
/// link across was back.
async fn split_write_heal(mesh: &Mesh, plan: Plan) -> Result<(Duration, Duration)> {
    let half = NODES / 2;
    let (a, b): (Vec<usize>, Vec<usize>) = (0..NODES).partition(|&i| i < half);
    let crosses = |links: &[Vec<usize>]| a.iter().any(|&i| links[i].iter().any(|j| b.contains(j)));
    let pairs: Vec<(usize, usize)> = a
        .iter()
        .flat_map(|&i| b.iter().map(move |&j| (i, j)))
        .collect();
    let ids: Vec<_> = mesh.nodes.iter().map(|n| n.node_id().clone()).collect();
    for &(i, j) in &pairs {
        mesh.nodes[i].peers().block(&ids[j]);
        mesh.nodes[j].peers().block(&ids[i]);
    }
    wait_until("the halves to separate", STEP_LIMIT, POLL, || {
        let links = mesh.links();
        !crosses(&links) && connected_among(&links, &a) && connected_among(&links, &b)
    })
    .await?;
    // Every node writes its share, all at once.
    let writes = mesh.nodes.iter().enumerate().map(|(i, node)| {
        let side = u8::from(i >= half);
        let share = if i < half { i } else { i - half };
        async move {
            for k in (share..plan.keys).step_by(half) {
                node.sync()
                    .set(key("h/", k as u64), value(side))
                    .await
                    .with_context(|| format!("node {i}: set"))?;
            }
            anyhow::Ok(())
        }
    });
    futures_util::future::try_join_all(writes).await?;
    wait_until("each half to agree", STEP_LIMIT, POLL, || {
        let d = mesh.digests();
        all_equal(&d[..half]) && all_equal(&d[half..])
    })
    .await?;
    let d = mesh.digests();
    ensure!(d[0] != d[half], "the halves agree before the heal");
    let start = Instant::now();
    for &(i, j) in &pairs {
        mesh.nodes[i].peers().unblock(&ids[j]);
        mesh.nodes[j].peers().unblock(&ids[i]);
    }
    let mut first_link = None;
    wait_until("the mesh to heal", STEP_LIMIT, POLL, || {
        if first_link.is_none() && crosses(&mesh.links()) {
            first_link = Some(start.elapsed());
        }
        all_equal(&mesh.digests())
    })
    .await?;
    let heal = start.elapsed();
    let keys = mesh.nodes[0].sync().len();
    ensure!(
        keys == plan.keys,
        "{keys} keys after the heal, {} written",
        plan.keys
    );
    Ok((heal, first_link.unwrap_or(heal)))
}
