//! The wall clock that stamps messages which travel through other nodes.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Milliseconds since the Unix epoch: the wall clock read once at start,
/// advanced by tokio's clock (monotonic, and paused tests drive it).
pub(crate) struct WallClock {
    start_ms: u64,
    start: Instant,
}

impl WallClock {
    pub(crate) fn new() -> Self {
        let start_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        WallClock {
            start_ms,
            start: Instant::now(),
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.start_ms + self.start.elapsed().as_millis() as u64
    }
}
