//! A budget for log lines that peers can cause: a peer (or many made-up
//! ones, each completing a handshake) can make a node refuse frames as fast
//! as it connects, and a warning per refusal let one fuzzing run write
//! 4.6 MB of log in a few minutes. Past the budget, lines go to debug level
//! and are counted; the next warning says how many were held back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Warnings allowed per window.
const PER_WINDOW: u32 = 10;
/// The window.
const WINDOW: Duration = Duration::from_secs(60);

/// How many lines of one kind went out at warning level in the current
/// window, and how many were held back since the last one that went out.
#[derive(Debug, Default)]
pub(crate) struct LogLimit {
    window_start: Option<Instant>,
    used: u32,
    held_back: u64,
}

impl LogLimit {
    /// A new budget (usable in a `static`).
    pub(crate) const fn new() -> Self {
        LogLimit {
            window_start: None,
            used: 0,
            held_back: 0,
        }
    }

    /// Whether a line may go out at warning level at `now`: `Some(n)` with
    /// the number held back since the last one that did, or `None` (log it
    /// at debug level; it is counted).
    pub(crate) fn allow(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= WINDOW);
        if fresh {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used < PER_WINDOW {
            self.used += 1;
            Some(std::mem::take(&mut self.held_back))
        } else {
            self.held_back += 1;
            None
        }
    }
}

/// [`LogLimit::allow`] on a shared budget, at the current time.
pub(crate) fn allow(limit: &Mutex<LogLimit>) -> Option<u64> {
    limit
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .allow(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_a_minute_then_counted_and_reported() {
        let mut l = LogLimit::new();
        let t0 = Instant::now();
        for _ in 0..PER_WINDOW {
            assert_eq!(l.allow(t0), Some(0));
        }
        assert_eq!(l.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(l.allow(t0 + Duration::from_secs(59)), None);
        // A new window: the first line says how many were held back.
        assert_eq!(l.allow(t0 + WINDOW), Some(2));
        assert_eq!(l.allow(t0 + WINDOW), Some(0));
    }
}
