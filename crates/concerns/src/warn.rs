//! Rationed warnings: what peers can cause at will is logged loudly a few
//! times a period, then at debug level (the counters go on).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Warnings of one kind per [`WARNING_PERIOD`]; the rest go to the debug
/// level (peers can cause them at will, and log lines cost).
const WARNINGS_PER_PERIOD: u64 = 8;
const WARNING_PERIOD: Duration = Duration::from_secs(600);

/// Counts warnings of one kind in periods of [`WARNING_PERIOD`]: a few each
/// period, so that one burst early on cannot silence later ones for good.
pub(crate) struct WarnBudget {
    period: AtomicU64,
    used: AtomicU64,
    start: Instant,
}

impl WarnBudget {
    pub(crate) fn new() -> Self {
        WarnBudget {
            period: AtomicU64::new(0),
            used: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    /// Whether this one may be a warning.
    pub(crate) fn take(&self) -> bool {
        let period = (self.start.elapsed().as_secs() / WARNING_PERIOD.as_secs()) + 1;
        if self.period.swap(period, Ordering::Relaxed) != period {
            self.used.store(0, Ordering::Relaxed);
        }
        self.used.fetch_add(1, Ordering::Relaxed) < WARNINGS_PER_PERIOD
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_few_warnings_a_period_however_many_come() {
        let budget = WarnBudget::new();
        let burst = (0..100).filter(|_| budget.take()).count();
        assert_eq!(burst as u64, WARNINGS_PER_PERIOD);
        tokio::time::sleep(WARNING_PERIOD / 2).await;
        assert!(!budget.take());
        tokio::time::sleep(WARNING_PERIOD / 2).await;
        let later = (0..100).filter(|_| budget.take()).count();
        assert_eq!(later as u64, WARNINGS_PER_PERIOD);
    }
}
