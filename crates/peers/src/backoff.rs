//! Exponential backoff with jitter, driven by the caller's randomness.

use std::time::Duration;

/// Exponential backoff: `min`, `2·min`, `4·min`, ... capped at `max`, each
/// delay jittered into `[d/2, d)` ("equal jitter") so that nodes that failed
/// together do not retry in lockstep.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempts: u32,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempts: 0,
        }
    }

    /// The un-jittered delay of the next failure.
    fn base(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempts.min(31)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// Records a failure and returns how long to wait. `jitter` is a uniform
    /// sample from `[0, 1)`.
    pub(crate) fn fail(&mut self, jitter: f64) -> Duration {
        let base = self.base();
        self.attempts = self.attempts.saturating_add(1);
        let half = base / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// The longest wait, jittered: for a peer we want to stay away from.
    pub(crate) fn penalty(&mut self, jitter: f64) -> Duration {
        self.attempts = 31;
        self.fail(jitter)
    }

    /// Forgets past failures (after a success).
    pub(crate) fn reset(&mut self) {
        self.attempts = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_up_to_the_cap() {
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        // jitter 0.999... gives almost the full base delay; 0 gives half.
        let full: Vec<_> = (0..6).map(|_| b.fail(1.0)).collect();
        assert_eq!(full, [100, 200, 400, 800, 1000, 1000].map(|m| m * MS));
        b.reset();
        assert_eq!(b.fail(0.0), 50 * MS);
        assert_eq!(b.fail(0.5), 150 * MS);
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let mut b = Backoff::new(MS, 64 * MS);
        for i in 0..100 {
            let base = b.base();
            let d = b.fail(i as f64 / 100.0);
            assert!(
                d >= base / 2 && d <= base,
                "{d:?} outside [{:?}, {base:?}]",
                base / 2
            );
        }
    }

    #[test]
    fn penalty_is_the_cap() {
        let mut b = Backoff::new(10 * MS, 5000 * MS);
        assert_eq!(b.penalty(1.0), 5000 * MS);
        assert_eq!(b.fail(1.0), 5000 * MS);
        b.reset();
        assert_eq!(b.fail(1.0), 10 * MS);
    }

    #[test]
    fn no_overflow_after_many_failures() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::MAX);
        for _ in 0..100 {
            b.fail(0.5);
        }
        assert!(b.fail(1.0) >= Duration::from_secs(1 << 30));
    }
}
