//! The `rpc` bench: calls through the whole stack (`meshwork-rpc` on sync,
//! concerns, peers and transport) between two [`Node`]s over loopback TCP,
//! beside raw framed TCP and tarpc measured in the same run, the sides
//! taking turns ([`crate::harness::rotate`]).
//!
//! Every side echoes 64 bytes; the RPC sides and tarpc call
//! `echo(Vec<u8>) -> Vec<u8>`:
//!
//! - `noise`: two nodes built by the facade with the defaults (Noise), the
//!   client seeded with the server; the server serves the `#[service]`
//!   echo, the client calls it through its typed client (see [`mesh`]);
//! - `plaintext`: the same with [`NodeBuilder::insecure_plaintext`], to
//!   separate the cost of encryption;
//! - `concerns`: the same two Noise nodes, the client asking an echo
//!   concern on the server with [`Context::request`]: the layers the RPC
//!   calls ride on, without the RPC layer;
//! - `raw`: tokio's `Framed<TcpStream, LengthDelimitedCodec>` echoing
//!   64-byte frames, the `transport` and `concerns` benches' baseline
//!   ([`crate::transport::raw_rtt_samples`],
//!   [`crate::transport::raw_pipelined`]);
//! - `tarpc`: a tarpc echo service over its serde transport (bincode,
//!   length-delimited) on TCP, one connection, requests spawned as tasks
//!   as tarpc's examples do (see `tarpc_echo`). Built only with the
//!   `tarpc` feature, which `cargo xtask bench` turns on; without it its
//!   rows say `tarpc not built`.
//!
//! Every side uses `TCP_NODELAY` (meshwork sets it; the baselines set it
//! on their sockets). Each run of a side sets up its own pair (not timed)
//! and tears it down after.
//!
//! Figures, meshwork with Noise unless the name says otherwise:
//!
//! - `call_seq_64B` (µs, median of one call at a time, from the call to
//!   its decoded result) against raw (target ≤ 1.5× raw), `_tarpc` against
//!   tarpc, `_plaintext` against plaintext meshwork (the ratio is what
//!   Noise costs), `_layer` against the echo concern (what the RPC layer
//!   adds to the request/reply it rides on);
//! - `call_seq_64B_p99` (µs, the 99th percentile of the same calls)
//!   against raw and tarpc;
//! - `call_seq_64B_rate` (calls/s one at a time: calls over the sum of
//!   their round trips) against raw and tarpc;
//! - `call_inflight64_64B` (calls/s with [`DEPTH`] calls in flight from
//!   one task, refilled as each result arrives, counted in a window after
//!   a warm-up) against tarpc (target ≥ 3× tarpc), `_raw` against raw,
//!   `_plaintext` against plaintext meshwork, `_layer` against the echo
//!   concern.
//!
//! Medians over `--runs` runs: each run gives a p50, a p99 and a rate; the
//! figure is the median of the runs' values.
//!
//! One call at a time is mostly hand-offs between tasks, and the sides other
//! than raw hand off between tokio's worker threads. On a small virtual
//! machine, waking a worker whose CPU sits idle costs tens of µs, and one
//! whose CPU is busy with something else far less, so those sides' sequential
//! figures come in two modes, slower on an otherwise idle machine (raw does
//! not move). Compare sides of the same run only.
//!
//! [`Context::request`]: meshwork::concerns::Context::request
//! [`Node`]: meshwork::Node
//! [`NodeBuilder::insecure_plaintext`]: meshwork::NodeBuilder::insecure_plaintext

pub(crate) mod mesh;
#[cfg(feature = "tarpc")]
pub(crate) mod tarpc_echo;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use futures_util::FutureExt as _;

use self::mesh::Via;
use crate::harness::{Options, Run, Samples, median, rotate};
use crate::report::{Better, Figure};
use crate::transport::{DEPTH, Window, raw_pipelined, raw_rtt_samples};

/// The bench's name, in every figure.
pub(crate) const BENCH: &str = "rpc";
/// Bytes echoed by every call.
pub(crate) const PAYLOAD: usize = 64;
/// Time a single call may take before the run fails.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for one run of one side, set-up and tear-down included.
const RUN_LIMIT: Duration = Duration::from_secs(30);
/// Sequential round trip: at most this many times raw framed TCP's.
const SEQ_TARGET: f64 = 1.5;
/// Calls/s with [`DEPTH`] in flight: at least this many times tarpc's.
const INFLIGHT_TARGET: f64 = 3.0;
/// What the tarpc rows say when the bench was built without it.
const TARPC_NOT_BUILT: &str = "tarpc not built";

/// How much work each run does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// Sequential calls before measuring.
    pub(crate) warmup: usize,
    /// Sequential calls measured, at most.
    pub(crate) rounds: usize,
    /// Stop measuring sequential calls after this long even if fewer were
    /// done.
    pub(crate) budget: Duration,
    /// The in-flight measurement window.
    pub(crate) window: Window,
}

impl Plan {
    /// A full run.
    const FULL: Plan = Plan {
        warmup: 2_000,
        rounds: 20_000,
        budget: Duration::from_millis(1_000),
        window: Window {
            warmup: Duration::from_millis(200),
            length: Duration::from_millis(800),
        },
    };
    /// A quick run.
    const QUICK: Plan = Plan {
        warmup: 500,
        rounds: 8_000,
        budget: Duration::from_millis(300),
        window: Window {
            warmup: Duration::from_millis(50),
            length: Duration::from_millis(250),
        },
    };
}

/// The sides of a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Raw framed TCP.
    Raw,
    /// tarpc over TCP (only with the `tarpc` feature).
    Tarpc,
    /// meshwork without encryption.
    Plaintext,
    /// meshwork with the default configuration: Noise.
    Noise,
    /// The same Noise nodes, through an echo concern instead of the RPC
    /// layer.
    Concerns,
}

impl Side {
    /// The name in progress lines and in the table's `vs` column.
    fn name(self) -> &'static str {
        match self {
            Side::Raw => "raw",
            Side::Tarpc => "tarpc",
            Side::Plaintext => "plaintext",
            Side::Noise => "noise",
            Side::Concerns => "concerns",
        }
    }
}

/// Every side measured in this build, in the order [`rotate`] reports them.
fn sides() -> Vec<Side> {
    let mut sides = vec![Side::Raw];
    if cfg!(feature = "tarpc") {
        sides.push(Side::Tarpc);
    }
    sides.extend([Side::Plaintext, Side::Noise, Side::Concerns]);
    sides
}

/// What one run of sequential calls gives, in µs and calls/s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SeqRun {
    /// The median round trip.
    pub(crate) p50: f64,
    /// The 99th percentile.
    pub(crate) p99: f64,
    /// Calls per second one at a time: calls over the sum of their round
    /// trips.
    pub(crate) rate: f64,
}

impl SeqRun {
    /// The figures of the round trips `samples`.
    pub(crate) fn of(samples: &[Duration]) -> Result<Self> {
        ensure!(!samples.is_empty(), "no call was measured");
        let mut micros: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        micros.sort_by(f64::total_cmp);
        let total: f64 = micros.iter().sum();
        Ok(SeqRun {
            p50: median(&micros),
            p99: percentile(&micros, 0.99),
            rate: micros.len() as f64 * 1e6 / total,
        })
    }
}

/// The `q` quantile (0..=1) of sorted `values`, nearest rank.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs the bench: sequential calls, then calls in flight.
pub(crate) async fn run(opts: &Options) -> Result<Vec<Figure>> {
    let plan = if opts.quick { Plan::QUICK } else { Plan::FULL };
    if !cfg!(feature = "tarpc") {
        eprintln!(
            "  {TARPC_NOT_BUILT}: its rows are empty (build with `--features tarpc`, \
             as `cargo xtask bench` does)"
        );
    }
    let mut figures = sequential(opts, plan).await?;
    figures.extend(in_flight(opts, plan).await?);
    Ok(figures)
}

/// The medians over the runs of each side of one measurement.
struct Medians {
    sides: Vec<Side>,
    values: Vec<f64>,
}

impl Medians {
    /// The median of `side`, if it was measured.
    fn of(&self, side: Side) -> Option<f64> {
        let i = self.sides.iter().position(|s| *s == side)?;
        self.values.get(i).copied()
    }

    /// meshwork's `side` against `baseline` as figure `metric`; a row
    /// without a baseline when the baseline was not measured (tarpc not
    /// built).
    fn figure(
        &self,
        metric: impl Into<String>,
        unit: &'static str,
        better: Better,
        side: Side,
        baseline: Side,
    ) -> Result<Figure> {
        let Some(value) = self.of(side) else {
            bail!("{} was not measured", side.name());
        };
        Ok(match self.of(baseline) {
            Some(base) => {
                Figure::compared(BENCH, metric, unit, better, value, (baseline.name(), base))
            }
            None => Figure {
                baseline: None,
                ratio: None,
                baseline_name: TARPC_NOT_BUILT,
                ..Figure::compared(BENCH, metric, unit, better, value, ("", f64::NAN))
            },
        })
    }
}

/// Sequential calls: p50, p99 and calls/s of each side.
async fn sequential(opts: &Options, plan: Plan) -> Result<Vec<Figure>> {
    let sides = sides();
    let names: Vec<&str> = sides.iter().map(|s| s.name()).collect();
    let metric = format!("call_seq_{PAYLOAD}B");
    // Every run's p99 and rate, per side; `rotate` keeps the p50s.
    let runs: Arc<Mutex<Vec<Vec<SeqRun>>>> = Arc::new(Mutex::new(vec![Vec::new(); sides.len()]));
    let seen = runs.clone();
    let p50s = rotate(&metric, "us", opts, RUN_LIMIT, &names, |i| -> Run {
        let side = sides[i];
        let seen = seen.clone();
        async move {
            let run = seq_run(side, plan).await?;
            seen.lock().unwrap_or_else(PoisonError::into_inner)[i].push(run);
            Ok(run.p50)
        }
        .boxed()
    })
    .await?;
    let runs = runs.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let of_runs = |f: fn(&SeqRun) -> f64| Medians {
        sides: sides.clone(),
        values: runs
            .iter()
            .map(|r| median(&r.iter().map(f).collect::<Vec<_>>()))
            .collect(),
    };
    let p50 = Medians {
        sides: sides.clone(),
        values: (0..sides.len()).map(|i| p50s.median(i)).collect(),
    };
    let p99 = of_runs(|r| r.p99);
    let rate = of_runs(|r| r.rate);
    for side in &sides {
        eprintln!(
            "  {metric}: {:<9} p50 {:>7.1} us, p99 {:>7.1} us, {:>7.0} calls/s",
            side.name(),
            p50.of(*side).unwrap_or(f64::NAN),
            p99.of(*side).unwrap_or(f64::NAN),
            rate.of(*side).unwrap_or(f64::NAN),
        );
    }
    use Side::{Concerns, Noise, Plaintext, Raw, Tarpc};
    let (lower, higher) = (Better::Lower, Better::Higher);
    Ok(vec![
        p50.figure(&metric, "us", lower, Noise, Raw)?
            .with_target(SEQ_TARGET),
        p50.figure(format!("{metric}_tarpc"), "us", lower, Noise, Tarpc)?,
        p50.figure(format!("{metric}_plaintext"), "us", lower, Noise, Plaintext)?,
        p50.figure(format!("{metric}_layer"), "us", lower, Noise, Concerns)?,
        p99.figure(format!("{metric}_p99"), "us", lower, Noise, Raw)?,
        p99.figure(format!("{metric}_p99_tarpc"), "us", lower, Noise, Tarpc)?,
        rate.figure(format!("{metric}_rate"), "calls/s", higher, Noise, Raw)?,
        rate.figure(
            format!("{metric}_rate_tarpc"),
            "calls/s",
            higher,
            Noise,
            Tarpc,
        )?,
    ])
}

/// One run of sequential calls on `side`.
async fn seq_run(side: Side, plan: Plan) -> Result<SeqRun> {
    let Plan {
        warmup,
        rounds,
        budget,
        ..
    } = plan;
    let samples = match side {
        Side::Raw => raw_rtt_samples(PAYLOAD, warmup, rounds, budget).await?,
        Side::Tarpc => tarpc_seq(plan).await?,
        Side::Plaintext => mesh::seq(true, Via::Rpc, plan).await?,
        Side::Noise => mesh::seq(false, Via::Rpc, plan).await?,
        Side::Concerns => mesh::seq(false, Via::Concern, plan).await?,
    };
    SeqRun::of(&samples)
}

/// Sequential calls through tarpc.
#[cfg(feature = "tarpc")]
async fn tarpc_seq(plan: Plan) -> Result<Vec<Duration>> {
    tarpc_echo::seq(plan).await
}

/// Not built: never called, as the side is not measured.
#[cfg(not(feature = "tarpc"))]
async fn tarpc_seq(_plan: Plan) -> Result<Vec<Duration>> {
    bail!("{TARPC_NOT_BUILT}")
}

/// Calls in flight through tarpc.
#[cfg(feature = "tarpc")]
async fn tarpc_in_flight(window: Window) -> Result<f64> {
    tarpc_echo::in_flight(window).await
}

/// Not built: never called, as the side is not measured.
#[cfg(not(feature = "tarpc"))]
async fn tarpc_in_flight(_window: Window) -> Result<f64> {
    bail!("{TARPC_NOT_BUILT}")
}

/// [`DEPTH`] calls in flight: calls/s of each side.
async fn in_flight(opts: &Options, plan: Plan) -> Result<Vec<Figure>> {
    let sides = sides();
    let names: Vec<&str> = sides.iter().map(|s| s.name()).collect();
    let metric = format!("call_inflight{DEPTH}_{PAYLOAD}B");
    let window = plan.window;
    let samples: Samples = rotate(&metric, "calls/s", opts, RUN_LIMIT, &names, |i| -> Run {
        match sides[i] {
            Side::Raw => raw_pipelined(PAYLOAD, window).boxed(),
            Side::Tarpc => tarpc_in_flight(window).boxed(),
            Side::Plaintext => mesh::in_flight(true, Via::Rpc, window).boxed(),
            Side::Noise => mesh::in_flight(false, Via::Rpc, window).boxed(),
            Side::Concerns => mesh::in_flight(false, Via::Concern, window).boxed(),
        }
    })
    .await?;
    let rate = Medians {
        sides: sides.clone(),
        values: (0..sides.len()).map(|i| samples.median(i)).collect(),
    };
    use Side::{Concerns, Noise, Plaintext, Raw, Tarpc};
    let higher = Better::Higher;
    Ok(vec![
        rate.figure(&metric, "calls/s", higher, Noise, Tarpc)?
            .with_target(INFLIGHT_TARGET),
        rate.figure(format!("{metric}_raw"), "calls/s", higher, Noise, Raw)?,
        rate.figure(
            format!("{metric}_plaintext"),
            "calls/s",
            higher,
            Noise,
            Plaintext,
        )?,
        rate.figure(
            format!("{metric}_layer"),
            "calls/s",
            higher,
            Noise,
            Concerns,
        )?,
    ])
}

/// Checks that a result echoes a payload of [`PAYLOAD`] bytes.
pub(crate) fn check_echo(reply: &[u8]) -> Result<()> {
    ensure!(
        reply.len() == PAYLOAD,
        "result of {} bytes, sent {PAYLOAD}",
        reply.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn a_run_of_calls_gives_p50_p99_and_rate() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let run = SeqRun::of(&samples).unwrap();
        assert_eq!(run.p50, 50.5);
        assert_eq!(run.p99, 99.0);
        // 100 calls in 5050 µs.
        assert!((run.rate - 100.0 * 1e6 / 5050.0).abs() < 1e-6);
        assert!(SeqRun::of(&[]).is_err());
    }

    #[test]
    fn rows_without_tarpc_say_so() {
        let m = Medians {
            sides: vec![Side::Raw, Side::Noise],
            values: vec![10.0, 12.0],
        };
        let f = m
            .figure("x", "us", Better::Lower, Side::Noise, Side::Tarpc)
            .unwrap();
        assert_eq!(f.baseline, None);
        assert_eq!(f.ratio, None);
        assert_eq!(f.baseline_name, TARPC_NOT_BUILT);
        let f = m
            .figure("x", "us", Better::Lower, Side::Noise, Side::Raw)
            .unwrap();
        assert_eq!(f.ratio, Some(1.2));
        assert!(
            m.figure("x", "us", Better::Lower, Side::Plaintext, Side::Raw)
                .is_err()
        );
    }
}
