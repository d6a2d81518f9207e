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

/// Watches the system clock for steps: moves it made beyond the monotonic
/// clock (`std::time::Instant`), as when it is set by hand or by NTP.
///
/// A node keeps its own time as the wall clock read at start advanced by
/// tokio's clock (monotonic, and paused tests drive it). Alone, that time
/// never learns that the system clock was set after the node started: a
/// machine that boots before NTP has run would stamp and judge messages by
/// the wrong time until the node restarts (hostile-peer audit, round five).
/// Adding [`step_ms`](Self::step_ms) (or
/// [`forward_step_ms`](Self::forward_step_ms)) fixes that. The system
/// clock is looked at once a second of tokio's clock at most, and moves of
/// at most a second are not steps. Paused tests move tokio's clock only, so
/// they never look like a step.
#[derive(Debug)]
pub struct ClockSteps {
    start: Instant,
    system_start: SystemTime,
    monotonic_start: StdInstant,
    /// The step since start, in ms, as last taken in.
    step_ms: AtomicI64,
    /// The largest step taken in so far (never below 0).
    forward_ms: AtomicI64,
    /// When (ms of tokio's clock since start) the system clock was last
    /// looked at.
    checked_at: AtomicU64,
}

impl ClockSteps {
    /// Watches for steps from now on.
    pub fn new() -> Self {
        Self::since(SystemTime::now())
    }

    /// Watches for steps since the system clock read `system_start`,
    /// taken to be now by the monotonic clock: a `system_start` an hour
    /// ago reads as the system clock having been set an hour forward.
    pub fn since(system_start: SystemTime) -> Self {
        ClockSteps {
            start: Instant::now(),
            system_start,
            monotonic_start: StdInstant::now(),
            step_ms: AtomicI64::new(0),
            forward_ms: AtomicI64::new(0),
            checked_at: AtomicU64::new(0),
        }
    }

    /// How far the system clock was set since start (negative: back), in
    /// ms, as of the last look.
    pub fn step_ms(&self) -> i64 {
        self.step_ms_at(Instant::now())
    }

    /// [`step_ms`](Self::step_ms), for a caller that has just read tokio's
    /// clock (`now`) and so spares this a second read.
    pub fn step_ms_at(&self, now: Instant) -> i64 {
        self.look(now);
        self.step_ms.load(Ordering::Relaxed)
    }

    /// The furthest forward the system clock has been set since start, in
    /// ms (0 if only ever back): for a time that must never go back.
    pub fn forward_step_ms(&self) -> i64 {
        self.forward_step_ms_at(Instant::now())
    }

    /// [`forward_step_ms`](Self::forward_step_ms), for a caller that has
    /// just read tokio's clock (`now`) and so spares this a second read
    /// (a clock read is a good part of what a time stamp costs).
    pub fn forward_step_ms_at(&self, now: Instant) -> i64 {
        self.look(now);
        self.forward_ms.load(Ordering::Relaxed)
    }

    /// Looks at the system clock if a second of tokio's clock has passed
    /// since the last look (tokio's clock reading `now`), and takes in a
    /// step of more than [`STEP_MS`].
    fn look(&self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.start).as_millis() as u64;
        if elapsed.saturating_sub(self.checked_at.load(Ordering::Relaxed)) < CHECK_EVERY_MS {
            return;
        }
        self.checked_at.store(elapsed, Ordering::Relaxed);
        let monotonic = self.monotonic_start.elapsed().as_millis() as i64;
        let system = match SystemTime::now().duration_since(self.system_start) {
            Ok(d) => d.as_millis() as i64,
            Err(e) => -(e.duration().as_millis() as i64),
        };
        let step = system - monotonic;
        let old = self.step_ms.load(Ordering::Relaxed);
        if (step - old).abs() > STEP_MS {
            self.step_ms.store(step, Ordering::Relaxed);
            self.forward_ms.fetch_max(step, Ordering::Relaxed);
            info!(step_ms = step - old, "the system clock was set");
        }
    }
}

impl Default for ClockSteps {
    fn default() -> Self {
        Self::new()
    }
}

/// Milliseconds since the Unix epoch: the wall clock read at start,
/// advanced by tokio's clock, plus any step the system clock has made
/// since ([`ClockSteps`]), back or forward.
pub(crate) struct WallClock {
    start_ms: u64,
    start: Instant,
    steps: ClockSteps,
}

impl WallClock {
    pub(crate) fn new() -> Self {
        Self::with_steps(ClockSteps::new())
    }

    fn with_steps(steps: ClockSteps) -> Self {
        let start_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        WallClock {
            start_ms,
            start: Instant::now(),
            steps,
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        // One read of tokio's clock for both.
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.start).as_millis() as u64;
        (self.start_ms + elapsed).saturating_add_signed(self.steps.step_ms_at(now))
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
        let stepped = WallClock::with_steps(ClockSteps::since(
            SystemTime::now() + Duration::from_secs(70),
        ));
        let before = stepped.now_ms();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let after = stepped.now_ms();
        let moved = after as i64 - before as i64;
        assert!((-68_600..=-68_400).contains(&moved), "{moved}");
    }

    #[tokio::test(start_paused = true)]
    async fn forward_steps_are_kept_and_backward_ones_are_not() {
        // Set 70 s forward, then (as seen from another start) 70 s back.
        let forward = ClockSteps::since(SystemTime::now() - Duration::from_secs(70));
        let back = ClockSteps::since(SystemTime::now() + Duration::from_secs(70));
        assert_eq!(forward.step_ms(), 0, "looked at no sooner than a second in");
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let near = |v: i64, want: i64| (v - want).abs() <= 200;
        assert!(near(forward.step_ms(), 70_000), "{}", forward.step_ms());
        assert!(near(forward.forward_step_ms(), 70_000));
        assert!(near(back.step_ms(), -70_000), "{}", back.step_ms());
        assert_eq!(back.forward_step_ms(), 0);
    }
}
