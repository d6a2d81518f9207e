//! What every bench shares: the options, running meshwork and its
//! baselines in turn under a time limit, and medians.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use futures_util::future::BoxFuture;

/// Options common to every bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Options {
    /// Measured runs of each side of each figure.
    pub(crate) runs: usize,
    /// Shorter runs, for a quick look (and CI).
    pub(crate) quick: bool,
}

/// Runs per side by default.
pub(crate) const DEFAULT_RUNS: usize = 5;
/// Runs per side with `--quick`.
pub(crate) const QUICK_RUNS: usize = 3;

/// One run of one side of a measurement: a future giving the measured value.
pub(crate) type Run = BoxFuture<'static, Result<f64>>;

/// The values of every run of every side of one measurement.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Samples {
    /// One list per side, in the order the sides were given, with one value
    /// per run.
    pub(crate) sides: Vec<Vec<f64>>,
}

impl Samples {
    /// The median of side `side`'s runs.
    pub(crate) fn median(&self, side: usize) -> f64 {
        self.sides.get(side).map_or(f64::NAN, |v| median(v))
    }
}

/// Measures the sides named `sides` (e.g. raw TCP, plaintext meshwork,
/// encrypted meshwork) `opts.runs` times each, taking turns, so that drift
/// of the machine (frequency, other load) hits every side alike. Run `r`
/// starts with side `r mod n`, so no side always follows the same one.
///
/// `run(i)` makes the future for one run of side `i`; it is spawned on the
/// runtime (so it runs on a worker thread like the tasks it talks to) and
/// abandoned with an error if it takes longer than `limit`. Progress goes to
/// stderr, labelled `label`, with values in `unit`.
pub(crate) async fn rotate<F>(
    label: &str,
    unit: &str,
    opts: &Options,
    limit: Duration,
    sides: &[&str],
    run: F,
) -> Result<Samples>
where
    F: FnMut(usize) -> Run,
{
    let units = vec![unit; sides.len()];
    rotate_units(label, &units, opts, limit, sides, run).await
}

/// [`rotate`] for sides measuring different things: side `i`'s values are
/// in `units[i]` (for the progress lines only).
pub(crate) async fn rotate_units<F>(
    label: &str,
    units: &[&str],
    opts: &Options,
    limit: Duration,
    sides: &[&str],
    mut run: F,
) -> Result<Samples>
where
    F: FnMut(usize) -> Run,
{
    let n = sides.len();
    let mut samples = Samples {
        sides: vec![Vec::with_capacity(opts.runs); n],
    };
    for r in 0..opts.runs {
        for k in 0..n {
            let side = (r + k) % n;
            let what = format!("{label}: {} run {}", sides[side], r + 1);
            let value = bounded(&what, limit, run(side)).await?;
            samples.sides[side].push(value);
        }
        let values: Vec<String> = sides
            .iter()
            .zip(&samples.sides)
            .zip(units)
            .map(|((name, values), unit)| format!("{name} {:>9.1} {unit}", values[r]))
            .collect();
        eprintln!(
            "  {label:<28} run {}/{}: {}",
            r + 1,
            opts.runs,
            values.join(", ")
        );
    }
    Ok(samples)
}

/// Runs `fut` as its own task and waits for it at most `limit`.
async fn bounded<F>(what: &str, limit: Duration, fut: F) -> Result<f64>
where
    F: Future<Output = Result<f64>> + Send + 'static,
{
    let mut task = tokio::spawn(fut);
    match tokio::time::timeout(limit, &mut task).await {
        Ok(Ok(result)) => result.with_context(|| what.to_string()),
        Ok(Err(join)) => Err(anyhow!("{what}: task failed: {join}")),
        Err(_) => {
            task.abort();
            bail!("{what}: timed out after {limit:?}")
        }
    }
}

/// The median of `values` (the mean of the middle two for an even count);
/// NaN for none.
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt as _;

    use super::*;

    #[test]
    fn medians() {
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[3.0]), 3.0);
        assert_eq!(median(&[5.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[tokio::test]
    async fn a_slow_run_is_an_error_not_a_hang() {
        let opts = Options {
            runs: 1,
            quick: true,
        };
        let err = rotate(
            "slow",
            "us",
            &opts,
            Duration::from_millis(50),
            &["fast", "slow"],
            |side| {
                async move {
                    if side == 1 {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    Ok(side as f64)
                }
                .boxed()
            },
        )
        .await
        .expect_err("the slow side is too slow");
        assert!(err.to_string().contains("slow run 1: timed out"), "{err}");
    }

    #[tokio::test]
    async fn every_side_runs_every_time_in_turn() {
        let opts = Options {
            runs: 3,
            quick: true,
        };
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = order.clone();
        let samples = rotate(
            "turns",
            "us",
            &opts,
            Duration::from_secs(5),
            &["a", "b", "c"],
            move |side| {
                seen.lock().unwrap().push(side);
                async move { Ok(side as f64 * 10.0) }.boxed()
            },
        )
        .await
        .unwrap();
        assert_eq!(*order.lock().unwrap(), [0, 1, 2, 1, 2, 0, 2, 0, 1]);
        assert_eq!(samples.sides, [[0.0; 3], [10.0; 3], [20.0; 3]]);
        assert_eq!(samples.median(1), 10.0);
        assert!(samples.median(3).is_nan());
    }
}
