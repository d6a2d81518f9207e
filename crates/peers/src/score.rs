//! Peer quality: one score from round-trip time, failures and uptime, and a
//! weighted random choice by score.

use std::time::Duration;

use rand::Rng;

/// Round-trip time at which the latency factor is one half.
const RTT_HALF: Duration = Duration::from_millis(50);
/// Assumed round-trip time of a peer never measured.
const RTT_UNKNOWN: Duration = Duration::from_millis(100);
/// Uptime after which a peer gets its full uptime factor.
const UPTIME_FULL: Duration = Duration::from_secs(300);

/// A peer's score in `(0, 1]`: higher is better.
///
/// `score = latency × failures × uptime`, where
/// - latency = `1 / (1 + rtt / 50 ms)` (100 ms assumed until measured),
/// - failures = `1 / ((1 + errors) · (1 + timeouts))`,
/// - uptime = `0.5 + 0.5 · min(connected_for / 5 min, 1)`.
///
/// A fast, clean, long-lived peer scores near 1; every error or timeout
/// halves the score at first, and a new peer starts at half the uptime
/// factor, so a proven peer is preferred over an unknown one of the same
/// speed.
pub(crate) fn score(rtt: Option<Duration>, errors: u32, timeouts: u32, uptime: Duration) -> f64 {
    let rtt = rtt.unwrap_or(RTT_UNKNOWN);
    let latency = 1.0 / (1.0 + rtt.as_secs_f64() / RTT_HALF.as_secs_f64());
    let failures = 1.0 / ((1.0 + f64::from(errors)) * (1.0 + f64::from(timeouts)));
    let up = (uptime.as_secs_f64() / UPTIME_FULL.as_secs_f64()).min(1.0);
    latency * failures * (0.5 + 0.5 * up)
}

/// Picks an index with probability proportional to its weight. Weights that
/// are not positive and finite count as zero; `None` if all are zero.
pub(crate) fn weighted_choice(weights: &[f64], rng: &mut impl Rng) -> Option<usize> {
    let clean = |w: f64| if w.is_finite() && w > 0.0 { w } else { 0.0 };
    let total: f64 = weights.iter().copied().map(clean).sum();
    if total <= 0.0 {
        return None;
    }
    let mut target = rng.random::<f64>() * total;
    let mut last = None;
    for (i, w) in weights.iter().copied().map(clean).enumerate() {
        if w == 0.0 {
            continue;
        }
        last = Some(i);
        if target < w {
            return Some(i);
        }
        target -= w;
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn faster_cleaner_older_is_better() {
        let base = score(Some(20 * MS), 0, 0, Duration::from_secs(60));
        assert!(score(Some(5 * MS), 0, 0, Duration::from_secs(60)) > base);
        assert!(score(Some(200 * MS), 0, 0, Duration::from_secs(60)) < base);
        assert!(score(Some(20 * MS), 1, 0, Duration::from_secs(60)) < base);
        assert!(score(Some(20 * MS), 0, 1, Duration::from_secs(60)) < base);
        assert!(score(Some(20 * MS), 0, 0, Duration::from_secs(600)) > base);
        assert!(score(None, 0, 0, Duration::from_secs(60)) < base);
    }

    #[test]
    fn score_is_in_unit_interval() {
        for rtt in [None, Some(Duration::ZERO), Some(Duration::from_secs(3600))] {
            for e in [0, 1, 1000, u32::MAX] {
                let s = score(rtt, e, e, Duration::from_secs(1_000_000));
                assert!(s > 0.0 && s <= 1.0, "{s}");
            }
        }
        assert_eq!(score(Some(Duration::ZERO), 0, 0, UPTIME_FULL), 1.0);
    }

    #[test]
    fn weighted_choice_follows_the_weights() {
        let mut rng = StdRng::seed_from_u64(7);
        let weights = [1.0, 3.0, 0.0, f64::NAN];
        let mut counts = [0u32; 4];
        for _ in 0..10_000 {
            counts[weighted_choice(&weights, &mut rng).unwrap()] += 1;
        }
        assert_eq!(counts[2] + counts[3], 0);
        let ratio = f64::from(counts[1]) / f64::from(counts[0]);
        assert!((2.6..3.4).contains(&ratio), "ratio {ratio}");
        assert_eq!(weighted_choice(&[0.0, -1.0], &mut rng), None);
        assert_eq!(weighted_choice(&[], &mut rng), None);
    }
}
