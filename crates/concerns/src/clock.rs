//! The wall clock that stamps messages which travel through other nodes.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Instant as StdInstant, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;
use tracing::info;

/// How far the system clock may move against the monotonic one before the
/// stamps follow it.
const STEP_MS: i64 = 1_000;
/// How often (by tokio's clock) the system clock is looked at.
const CHECK_EVERY_MS: u64 = 1_000;

/// Milliseconds since the Unix epoch: the wall clock read at start,
/// advanced by tokio's clock (monotonic, and paused tests drive it), plus
/// any step the system clock has made since.
///
/// The step matters: a node started before its clock was set (a machine
/// that boots before NTP has run) would otherwise stamp and judge every
/// flood and routed request by the wrong time until restarted (audit round
/// five). A step is what the system clock moved beyond the monotonic
/// clock (`std::time::Instant`, which paused tests do not touch), so the
/// paused clock of tests never looks like one.
pub(crate) struct WallClock {
    start_ms: u64,
    start: Instant,
    system_start: SystemTime,
    monotonic_start: StdInstant,
    /// The system clock's step since start, in ms (applied to stamps).
    step_ms: AtomicI64,
    /// When (ms of tokio's clock since start) the system clock was last
    /// looked at.
    checked_at: AtomicU64,
}

impl WallClock {
    pub(crate) fn new() -> Self {
        let system_start = SystemTime::now();
        let start_ms = system_start
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        WallClock {
            start_ms,
            start: Instant::now(),
            system_start,
            monotonic_start: StdInstant::now(),
            step_ms: AtomicI64::new(0),
            checked_at: AtomicU64::new(0),
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        let elapsed = self.start.elapsed().as_millis() as u64;
        if elapsed.saturating_sub(self.checked_at.load(Ordering::Relaxed)) >= CHECK_EVERY_MS {
            self.checked_at.store(elapsed, Ordering::Relaxed);
            self.follow_system_clock();
        }
        let step = self.step_ms.load(Ordering::Relaxed);
        (self.start_ms + elapsed).saturating_add_signed(step)
    }

    /// Takes in a step of the system clock of more than [`STEP_MS`].
    fn follow_system_clock(&self) {
        let monotonic = self.monotonic_start.elapsed().as_millis() as i64;
        let system = match SystemTime::now().duration_since(self.system_start) {
            Ok(d) => d.as_millis() as i64,
            Err(e) => -(e.duration().as_millis() as i64),
        };
        let step = system - monotonic;
        let old = self.step_ms.load(Ordering::Relaxed);
        if (step - old).abs() > STEP_MS {
            self.step_ms.store(step, Ordering::Relaxed);
            info!(
                step_ms = step - old,
                "the system clock was set: message stamps follow it"
            );
        }
    }

    #[cfg(test)]
    fn with_system_start(system_start: SystemTime) -> Self {
        let clock = WallClock::new();
        WallClock {
            system_start,
            ..clock
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn stamps_follow_tokios_clock_and_steps_of_the_system_clock() {
        // Paused time moves tokio's clock only: no step is seen.
        let clock = WallClock::new();
        let t0 = clock.now_ms();
        tokio::time::sleep(Duration::from_secs(120)).await;
        let t1 = clock.now_ms();
        assert!((120_000..121_000).contains(&(t1 - t0)), "{}", t1 - t0);

        // A clock whose system start lies 70 s in the future: as if the
        // system clock had been set back 70 s since. Stamps follow once it
        // is looked at (at most a second of tokio's clock later).
        let stepped = WallClock::with_system_start(SystemTime::now() + Duration::from_secs(70));
        let before = stepped.now_ms();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let after = stepped.now_ms();
        let moved = after as i64 - before as i64;
        assert!((-68_600..=-68_400).contains(&moved), "{moved}");
    }
}
