//! Liveness of one peer: when to ping, and when silence means trouble.
//!
//! Anything received from a peer counts as a sign of life; a Ping is sent
//! only after the link has been quiet for the current interval. Each ping to
//! a healthy peer stretches the interval by a step, up to a maximum (the
//! slow-down of p2p0mq's heart-beat concern), so long-idle healthy links cost
//! little; the interval snaps back to the base on trouble.

use std::time::Duration;

use tokio::time::Instant;

/// How a peer looks after a given silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// Heard from within the unresponsive threshold.
    Alive,
    /// Silent past the unresponsive threshold.
    Unresponsive,
    /// Silent past the dead threshold: disconnect.
    Dead,
}

/// Timing settings shared by every peer's [`Heartbeat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeartbeatTiming {
    pub(crate) interval: Duration,
    pub(crate) slow_down: Duration,
    pub(crate) max_interval: Duration,
    pub(crate) unresponsive_after: Duration,
    pub(crate) dead_after: Duration,
}

/// Per-peer heartbeat state.
#[derive(Debug, Clone)]
pub(crate) struct Heartbeat {
    interval: Duration,
    last_ping: Option<Instant>,
    in_flight: bool,
}

impl Heartbeat {
    pub(crate) fn new(timing: &HeartbeatTiming) -> Self {
        Heartbeat {
            interval: timing.interval,
            last_ping: None,
            in_flight: false,
        }
    }

    /// The current interval between pings of a quiet link.
    #[cfg(test)]
    pub(crate) fn interval(&self) -> Duration {
        self.interval
    }

    /// What a silence since `last_heard` means at `now`.
    pub(crate) fn liveness(
        timing: &HeartbeatTiming,
        last_heard: Instant,
        now: Instant,
    ) -> Liveness {
        let silence = now.saturating_duration_since(last_heard);
        if silence >= timing.dead_after {
            Liveness::Dead
        } else if silence >= timing.unresponsive_after {
            Liveness::Unresponsive
        } else {
            Liveness::Alive
        }
    }

    /// True when a ping should go out now; if so, records it as sent. At
    /// most one ping is in flight per peer.
    pub(crate) fn poll_ping(
        &mut self,
        timing: &HeartbeatTiming,
        last_heard: Instant,
        now: Instant,
    ) -> bool {
        if self.in_flight {
            return false;
        }
        let quiet_since = match self.last_ping {
            Some(p) => p.max(last_heard),
            None => last_heard,
        };
        if now.saturating_duration_since(quiet_since) < self.interval {
            return false;
        }
        self.in_flight = true;
        self.last_ping = Some(now);
        self.interval = (self.interval + timing.slow_down).min(timing.max_interval);
        true
    }

    /// True when a ping should go out now whatever the link's traffic (for
    /// the peer's count, which only Pongs refresh): none in flight and none
    /// sent within `every`. If so, records it as sent; the interval of
    /// quiet pings is left as it is.
    pub(crate) fn poll_every(&mut self, every: Duration, now: Instant) -> bool {
        if self.in_flight
            || self
                .last_ping
                .is_some_and(|p| now.saturating_duration_since(p) < every)
        {
            return false;
        }
        self.in_flight = true;
        self.last_ping = Some(now);
        true
    }

    /// The ping was answered (or failed): another may be sent.
    pub(crate) fn ping_done(&mut self) {
        self.in_flight = false;
    }

    /// Trouble (unresponsive, an error): back to the base interval.
    pub(crate) fn reset(&mut self, timing: &HeartbeatTiming) {
        self.interval = timing.interval;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn timing() -> HeartbeatTiming {
        HeartbeatTiming {
            interval: 2 * S,
            slow_down: S,
            max_interval: 5 * S,
            unresponsive_after: 10 * S,
            dead_after: 20 * S,
        }
    }

    #[test]
    fn traffic_postpones_pings() {
        let t = timing();
        let start = Instant::now();
        let mut hb = Heartbeat::new(&t);
        // Traffic keeps arriving every second: never a ping.
        for i in 1..10 {
            let now = start + i * S;
            assert!(!hb.poll_ping(&t, now - S / 2, now));
        }
        // Quiet for the interval: a ping.
        assert!(hb.poll_ping(&t, start + 9 * S, start + 11 * S));
    }

    #[test]
    fn interval_slows_down_to_the_maximum_and_resets_on_trouble() {
        let t = timing();
        let start = Instant::now();
        let mut hb = Heartbeat::new(&t);
        let mut now = start;
        let mut gaps = Vec::new();
        let mut last = start;
        // Each pong arrives at once; the link is otherwise idle.
        for _ in 0..6 {
            let interval = hb.interval();
            now += interval;
            assert!(hb.poll_ping(&t, last, now));
            hb.ping_done();
            gaps.push(now - last);
            last = now;
        }
        assert_eq!(gaps, [2, 3, 4, 5, 5, 5].map(|s| s * S));
        hb.reset(&t);
        assert_eq!(hb.interval(), 2 * S);
    }

    #[test]
    fn one_ping_in_flight() {
        let t = timing();
        let start = Instant::now();
        let mut hb = Heartbeat::new(&t);
        assert!(hb.poll_ping(&t, start, start + 2 * S));
        // No answer yet: no second ping however long we wait.
        assert!(!hb.poll_ping(&t, start, start + 9 * S));
        hb.ping_done();
        assert!(hb.poll_ping(&t, start, start + 9 * S));
    }

    #[test]
    fn silence_thresholds() {
        let t = timing();
        let heard = Instant::now();
        let at = |s: u32| Heartbeat::liveness(&t, heard, heard + s * S);
        assert_eq!(at(0), Liveness::Alive);
        assert_eq!(at(9), Liveness::Alive);
        assert_eq!(at(10), Liveness::Unresponsive);
        assert_eq!(at(19), Liveness::Unresponsive);
        assert_eq!(at(20), Liveness::Dead);
    }
}
