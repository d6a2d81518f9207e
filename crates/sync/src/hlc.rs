//! Hybrid logical clock: physical milliseconds plus a counter, advanced by
//! every stamp received, so a write is always stamped later than every
//! write its node has seen, whatever the wall clocks say.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use meshwork_concerns::ClockSteps;
use tokio::time::Instant;

/// A hybrid logical clock stamp: milliseconds since the Unix epoch in the
/// high 48 bits, a counter in the low 16, so it orders as one number.
///
/// ```
/// use meshwork_sync::Stamp;
/// let a = Stamp::new(1_000, 0);
/// assert!(a.next() > a);
/// assert_eq!(a.next().millis(), 1_000);
/// assert!(Stamp::new(1_001, 0) > Stamp::new(1_000, 65_535));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Stamp(u64);

impl Stamp {
    /// The stamp at `millis` with `counter`.
    pub const fn new(millis: u64, counter: u16) -> Self {
        Stamp((millis << 16) | counter as u64)
    }

    /// From the packed form used on the wire.
    pub const fn from_u64(packed: u64) -> Self {
        Stamp(packed)
    }

    /// The packed form used on the wire.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Milliseconds since the Unix epoch.
    pub const fn millis(self) -> u64 {
        self.0 >> 16
    }

    /// The logical counter within the millisecond.
    pub const fn counter(self) -> u16 {
        (self.0 & 0xFFFF) as u16
    }

    /// The next stamp (a counter overflow carries into the milliseconds).
    pub const fn next(self) -> Self {
        Stamp(self.0.saturating_add(1))
    }
}

impl std::fmt::Display for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.millis(), self.counter())
    }
}

/// Physical time in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Now.
    fn now_ms(&self) -> u64;

    /// The time at `at`, a reading of tokio's clock the caller has just
    /// taken (a caller that needs both spares a second read). A clock that
    /// does not follow tokio's reads itself: the default.
    fn now_ms_at(&self, at: Instant) -> u64 {
        let _ = at;
        self.now_ms()
    }
}

/// The default clock: the wall clock read at start, advanced by tokio's
/// monotonic clock, plus how far the system clock has been set forward
/// since ([`ClockSteps::forward_step_ms`]). It never goes backwards, and
/// follows a paused test clock (`tokio::time::pause`).
///
/// A forward step is followed so that a node started before its clock was
/// set (a machine without a battery-backed clock, booting before NTP has
/// run) does not judge expiry by the wrong time until it restarts. A step
/// back is not: going back would let an expired entry reappear and break
/// the order of this node's stamps, so the clock keeps its pace and stays
/// ahead by the step (see sync.md, "Clocks").
#[derive(Debug, Clone)]
pub struct SystemClock {
    /// The wall clock at `base`, in µs (kept finer than ms so that the
    /// reading is cut to ms once, not twice).
    base_us: u64,
    base: Instant,
    steps: Arc<ClockSteps>,
}

impl SystemClock {
    /// A clock reading the wall clock now.
    pub fn new() -> Self {
        Self::with_steps(ClockSteps::new())
    }

    /// A clock reading the wall clock now, told of the system clock's steps
    /// by `steps`.
    pub fn with_steps(steps: ClockSteps) -> Self {
        let base_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        SystemClock {
            base_us,
            base: Instant::now(),
            steps: Arc::new(steps),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        self.now_ms_at(Instant::now())
    }

    fn now_ms_at(&self, now: Instant) -> u64 {
        // One read of tokio's clock for both (the RPC layer reads this
        // clock on every call, and passes the reading it takes anyway).
        let forward = self.steps.forward_step_ms_at(now).max(0) as u64;
        (self.base_us + now.saturating_duration_since(self.base).as_micros() as u64) / 1000
            + forward
    }
}

/// A clock that says what it is told: for tests of clock skew.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<std::sync::atomic::AtomicU64>);

impl ManualClock {
    /// A clock at `ms`.
    pub fn new(ms: u64) -> Self {
        ManualClock(Arc::new(ms.into()))
    }

    /// Sets the time.
    pub fn set(&self, ms: u64) {
        self.0.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Moves the time forward.
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A stamp from too far in the future was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooFarAhead {
    pub(crate) ahead_ms: u64,
}

/// The hybrid logical clock of one node.
#[derive(Debug, Clone)]
pub(crate) struct Hlc {
    last: Stamp,
    max_skew_ms: u64,
    /// How far ahead of our physical clock the fastest clock we heard from
    /// was, and when (our physical time) we last saw it that far ahead.
    ahead_ms: u64,
    ahead_seen: u64,
}

/// How long an observed clock lead is trusted in full; it halves with each
/// further period without a new observation.
const AHEAD_HALF_LIFE_MS: u64 = 60_000;

impl Hlc {
    pub(crate) fn new(max_skew_ms: u64) -> Self {
        Hlc {
            last: Stamp::default(),
            max_skew_ms,
            ahead_ms: 0,
            ahead_seen: 0,
        }
    }

    /// A new stamp, later than every stamp issued or observed.
    pub(crate) fn stamp(&mut self, physical_ms: u64) -> Stamp {
        let pt = Stamp::new(physical_ms, 0);
        self.last = if pt > self.last { pt } else { self.last.next() };
        self.last
    }

    /// Advances past a received stamp, unless it is more than the allowed
    /// skew ahead of our physical clock (a broken or hostile clock would
    /// otherwise drag every node into the future).
    pub(crate) fn observe(&mut self, remote: Stamp, physical_ms: u64) -> Result<(), TooFarAhead> {
        let limit = physical_ms.saturating_add(self.max_skew_ms);
        if remote.millis() > limit {
            return Err(TooFarAhead {
                ahead_ms: remote.millis() - physical_ms,
            });
        }
        if remote > self.last {
            self.last = remote;
        }
        let lead = remote.millis().saturating_sub(physical_ms);
        if lead > 0 && lead >= self.ahead(physical_ms) {
            self.ahead_ms = lead;
            self.ahead_seen = physical_ms;
        }
        Ok(())
    }

    /// How far ahead of our physical clock the fastest clock recently heard
    /// from runs (0 if none is ahead). Work that must happen before other
    /// nodes' clocks reach a time (refreshing an ephemeral key) adds it.
    pub(crate) fn ahead(&self, physical_ms: u64) -> u64 {
        let halvings = physical_ms.saturating_sub(self.ahead_seen) / AHEAD_HALF_LIFE_MS;
        self.ahead_ms.checked_shr(halvings as u32).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_system_clock_follows_steps_forward_and_never_goes_back() {
        let set_forward = SystemClock::with_steps(ClockSteps::since(
            SystemTime::now() - std::time::Duration::from_secs(3_600),
        ));
        let set_back = SystemClock::with_steps(ClockSteps::since(
            SystemTime::now() + std::time::Duration::from_secs(3_600),
        ));
        let (f0, b0) = (set_forward.now_ms(), set_back.now_ms());
        tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
        let moved = set_forward.now_ms() - f0;
        assert!((3_601_300..=3_601_700).contains(&moved), "{moved}");
        // Set back: it keeps its pace instead.
        let moved = set_back.now_ms() - b0;
        assert!((1_500..=1_510).contains(&moved), "{moved}");
    }

    #[test]
    fn stamps_increase_even_when_the_clock_stands_still_or_steps_back() {
        let mut hlc = Hlc::new(60_000);
        let a = hlc.stamp(1_000);
        let b = hlc.stamp(1_000);
        let c = hlc.stamp(900);
        assert!(a < b && b < c);
        assert_eq!(c.millis(), 1_000);
        assert_eq!(c.counter(), 2);
        assert_eq!(hlc.stamp(2_000), Stamp::new(2_000, 0));
    }

    #[test]
    fn observing_a_later_stamp_moves_the_clock_past_it() {
        let mut hlc = Hlc::new(60_000);
        hlc.stamp(1_000);
        hlc.observe(Stamp::new(5_000, 7), 1_000).unwrap();
        let s = hlc.stamp(1_001);
        assert_eq!(s, Stamp::new(5_000, 8));
        // An earlier stamp changes nothing.
        hlc.observe(Stamp::new(10, 0), 1_002).unwrap();
        assert!(hlc.stamp(1_002) > s);
    }

    #[test]
    fn a_stamp_beyond_the_skew_is_refused() {
        let mut hlc = Hlc::new(60_000);
        let err = hlc.observe(Stamp::new(70_001, 0), 10_000).unwrap_err();
        assert_eq!(err.ahead_ms, 60_001);
        hlc.observe(Stamp::new(70_000, 0), 10_000).unwrap();
    }

    #[test]
    fn a_clock_ahead_of_ours_is_remembered_and_forgotten_slowly() {
        let mut hlc = Hlc::new(60_000);
        assert_eq!(hlc.ahead(1_000), 0);
        hlc.observe(Stamp::new(3_500, 0), 1_000).unwrap();
        assert_eq!(hlc.ahead(1_000), 2_500);
        // A smaller lead does not lower it; time does, slowly.
        hlc.observe(Stamp::new(2_000, 0), 1_500).unwrap();
        assert_eq!(hlc.ahead(2_000), 2_500);
        assert_eq!(hlc.ahead(1_000 + 60_000), 1_250);
        assert_eq!(hlc.ahead(1_000 + 600_000), 2);
    }

    #[test]
    fn counter_overflow_carries_into_the_millis() {
        let s = Stamp::new(5, u16::MAX);
        assert_eq!(s.next(), Stamp::new(6, 0));
    }
}
