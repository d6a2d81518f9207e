//! Idle traffic: `idle_bytes_per_node_s`.
//!
//! Two 10-node in-memory meshes are built and left alone for [`Plan::settle`]
//! (the rounds every node runs with each new peer are over by then): one
//! with the default [`SyncConfig`] (anti-entropy every 2 s), and `ae_off`,
//! the same with an anti-entropy interval of an hour, so that only the
//! rest of the node talks (heartbeats, discovery). Each run then reads the
//! bytes every node of both meshes wrote over the same window: both sides
//! are measured at once rather than in turn, which is fairer still for an
//! idle figure, as no side sees a different moment of the machine.

use std::time::Duration;

use anyhow::Result;
use meshwork::sync::SyncConfig;

use super::{BENCH, Mesh, Net};
use crate::harness::{Options, median};
use crate::report::{Better, Figure};

/// How much work the measurement does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// Nodes of each mesh.
    nodes: usize,
    /// Time left alone before the first window.
    settle: Duration,
    /// Length of each run's window.
    window: Duration,
}

impl Plan {
    /// A full run.
    pub(crate) const FULL: Plan = Plan {
        nodes: 10,
        settle: Duration::from_secs(3),
        window: Duration::from_secs(4),
    };
    /// A quick run.
    pub(crate) const QUICK: Plan = Plan {
        nodes: 10,
        settle: Duration::from_secs(2),
        window: Duration::from_secs(2),
    };
}

/// Measures `idle_bytes_per_node_s` against `ae_off`.
pub(crate) async fn measure(opts: &Options, plan: Plan) -> Result<Figure> {
    let label = "idle_bytes_per_node_s";
    let defaults = SyncConfig::default();
    let off = SyncConfig::default().with_anti_entropy_interval(Duration::from_secs(3600));
    let on = Mesh::start(plan.nodes, Net::Mem, &defaults).await?;
    let quiet = match Mesh::start(plan.nodes, Net::Mem, &off).await {
        Ok(m) => m,
        Err(e) => {
            on.stop().await;
            return Err(e);
        }
    };
    eprintln!(
        "  {label}: two idle {}-node in-memory meshes, anti-entropy every 2 s and every hour; \
         {:?} windows after {:?}",
        plan.nodes, plan.window, plan.settle
    );
    tokio::time::sleep(plan.settle).await;
    let rounds_before: u64 = on.nodes.iter().map(|n| n.sync().stats().rounds).sum();
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for r in 0..opts.runs {
        let (a, b) = (on.sent(), quiet.sent());
        tokio::time::sleep(plan.window).await;
        let per_node_s = |bytes: u64| bytes as f64 / plan.nodes as f64 / plan.window.as_secs_f64();
        with.push(per_node_s(on.sent() - a));
        without.push(per_node_s(quiet.sent() - b));
        eprintln!(
            "  {label:<28} run {}/{}: ae_off {:>9.1} B/s, sync {:>9.1} B/s",
            r + 1,
            opts.runs,
            without[r],
            with[r]
        );
    }
    let rounds: u64 = on
        .nodes
        .iter()
        .map(|n| n.sync().stats().rounds)
        .sum::<u64>()
        - rounds_before;
    let seconds = plan.window.as_secs_f64() * opts.runs as f64;
    eprintln!(
        "  {label}: {:.2} anti-entropy rounds per node per second",
        rounds as f64 / plan.nodes as f64 / seconds
    );
    on.stop().await;
    quiet.stop().await;
    Ok(Figure::compared(
        BENCH,
        label,
        "B/s",
        Better::Lower,
        median(&with),
        ("ae_off", median(&without)),
    ))
}
