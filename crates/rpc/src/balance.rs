//! Provider choice: local first, then neighbours, then routed providers;
//! among those, the better of two random ones by latency and recent
//! failures (power of two choices). Plain code with explicit time.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// How long it takes recent failures to count half as much.
const FAILURE_HALF_LIFE: Duration = Duration::from_secs(5);

/// How long it takes a provider's latency figure to count half as much
/// while no call to it is answered: it decays toward zero ("unknown, so
/// fast"), as tower's peak-EWMA balancer decays its cost. Otherwise a
/// provider that was slow for a while lost every choice for good, since
/// only its own answers update its figure: one `k` times slower than the
/// best is tried again after about `10 s × log2(k)` without calls.
pub(crate) const LATENCY_HALF_LIFE: Duration = Duration::from_secs(10);

/// What a caller remembers about one provider.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProviderStats {
    /// Smoothed round trip of answered calls (EWMA, 1/4 weight), as of
    /// its last sample; [`latency`](Self::latency) decays it since.
    pub(crate) ewma: Option<Duration>,
    /// When `ewma` was last sampled.
    sampled: Option<Instant>,
    /// Failures, decayed over time.
    failures: f64,
    /// When `failures` was last brought up to date.
    updated: Option<Instant>,
    /// Calls sent to it now.
    pub(crate) in_flight: u32,
    /// Failures since its last success: each weighs twice the one before
    /// (up to 2^10), so a provider that keeps failing sits out longer and
    /// longer (about 5 s more each time) instead of every 8 s.
    streak: u32,
}

impl ProviderStats {
    fn decayed(&self, now: Instant) -> f64 {
        match self.updated {
            Some(t) => {
                let half_lives = now.saturating_duration_since(t).as_secs_f64()
                    / FAILURE_HALF_LIFE.as_secs_f64();
                self.failures * 0.5f64.powf(half_lives)
            }
            None => 0.0,
        }
    }

    /// A call was answered (successfully or not) at `now`, in `rtt`: the
    /// figure decayed to `now`, then the sample blended in.
    pub(crate) fn answered(&mut self, rtt: Duration, now: Instant) {
        self.ewma = Some(match self.latency(now) {
            Some(old) => (old * 3 + rtt) / 4,
            None => rtt,
        });
        self.sampled = Some(now);
    }

    /// The latency figure at `now`: the smoothed round trip, halved for
    /// every [`LATENCY_HALF_LIFE`] since its last sample (`None`: no call
    /// was answered yet).
    pub(crate) fn latency(&self, now: Instant) -> Option<Duration> {
        let ewma = self.ewma?;
        let Some(at) = self.sampled else {
            return Some(ewma);
        };
        let since = now.saturating_duration_since(at);
        // Calls in a row (the usual case, on every answer) skip the `powf`:
        // under a millisecond the figure moves by less than 0.01%.
        if since < Duration::from_millis(1) {
            return Some(ewma);
        }
        let half_lives = since.as_secs_f64() / LATENCY_HALF_LIFE.as_secs_f64();
        Some(ewma.mul_f64(0.5f64.powf(half_lives)))
    }

    /// A call failed (not delivered, timed out, overloaded, or answered with
    /// a failure).
    pub(crate) fn failure(&mut self, now: Instant) {
        self.failures = self.decayed(now) + f64::from(1u32 << self.streak.min(10));
        self.streak = self.streak.saturating_add(1);
        self.updated = Some(now);
    }

    /// A call succeeded: failures to come weigh one again.
    pub(crate) fn succeeded(&mut self) {
        self.streak = 0;
    }

    /// Whether it failed recently (at least half a failure left after
    /// decay: one failure counts for about 5 s).
    pub(crate) fn failing(&self, now: Instant) -> bool {
        self.decayed(now) >= 0.5
    }

    /// Lower is better: latency (unknown counts as fast, so new providers
    /// get tried, and it decays toward that while the provider is not
    /// called), times calls in flight, times recent failures.
    pub(crate) fn cost(&self, now: Instant) -> f64 {
        let latency = self.latency(now).map_or(0.0, |d| d.as_secs_f64() * 1e6) + 1.0;
        latency * (1.0 + f64::from(self.in_flight)) * (1.0 + 4.0 * self.decayed(now))
    }
}

/// Where a provider is, as seen from the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Reach {
    /// This node.
    Local,
    /// A connected neighbour.
    Neighbour,
    /// Through the routing concern.
    Routed,
}

/// Picks one of `candidates` (`(reach, cost, failing)`): those that did not
/// fail recently if there are any, then the nearest reach class present,
/// then the cheaper of two random picks within it. `None` if there are
/// none.
///
/// Failing providers sit out first, whatever their cost: a provider that
/// fails every call at once is as fast as any, and against a provider slow
/// to answer (one latency figure for all its methods) no multiple of its
/// latency made it lose (a third of the calls still failed in the audit's
/// re-run), nor could any when two such providers were drawn together.
pub(crate) fn choose(candidates: &[(Reach, f64, bool)], rng: &mut impl Rng) -> Option<usize> {
    let healthy = candidates.iter().any(|c| !c.2);
    let eligible = |i: usize| !healthy || !candidates[i].2;
    let best = (0..candidates.len())
        .filter(|&i| eligible(i))
        .map(|i| candidates[i].0)
        .min()?;
    let pool: Vec<usize> = (0..candidates.len())
        .filter(|&i| eligible(i) && candidates[i].0 == best)
        .collect();
    if pool.len() == 1 {
        return Some(pool[0]);
    }
    let a = pool[rng.random_range(0..pool.len())];
    let mut b = pool[rng.random_range(0..pool.len() - 1)];
    if b == a {
        b = pool[pool.len() - 1];
    }
    Some(if candidates[b].1 < candidates[a].1 {
        b
    } else {
        a
    })
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn nearer_reach_wins_whatever_the_cost() {
        let mut rng = StdRng::seed_from_u64(1);
        let c = [
            (Reach::Routed, 1.0, false),
            (Reach::Neighbour, 1e9, false),
            (Reach::Routed, 0.5, false),
        ];
        for _ in 0..50 {
            assert_eq!(choose(&c, &mut rng), Some(1));
        }
        assert_eq!(choose(&[], &mut rng), None);
        assert_eq!(
            choose(
                &[(Reach::Local, 5.0, false), (Reach::Neighbour, 1.0, false)],
                &mut rng
            ),
            Some(0)
        );
    }

    #[test]
    fn two_choices_prefer_the_faster_provider() {
        let mut rng = StdRng::seed_from_u64(7);
        let c = [
            (Reach::Neighbour, 100.0, false),
            (Reach::Neighbour, 10.0, false),
        ];
        for _ in 0..50 {
            assert_eq!(choose(&c, &mut rng), Some(1));
        }
        // With three, the slowest is never picked and the fastest most often.
        let c = [
            (Reach::Neighbour, 100.0, false),
            (Reach::Neighbour, 10.0, false),
            (Reach::Neighbour, 50.0, false),
        ];
        let mut picks = [0; 3];
        for _ in 0..300 {
            picks[choose(&c, &mut rng).unwrap()] += 1;
        }
        assert_eq!(picks[0], 0);
        assert!(picks[1] > picks[2], "{picks:?}");
    }

    #[test]
    fn providers_failing_recently_sit_out_while_others_do_not() {
        let mut rng = StdRng::seed_from_u64(3);
        // Two fast failing ones (one a neighbour), a slow healthy routed one.
        let c = [
            (Reach::Neighbour, 1.0, true),
            (Reach::Neighbour, 2.0, true),
            (Reach::Routed, 1e6, false),
        ];
        for _ in 0..50 {
            assert_eq!(choose(&c, &mut rng), Some(2));
        }
        // All failing: the usual choice among them.
        let c = [(Reach::Neighbour, 1.0, true), (Reach::Routed, 0.5, true)];
        assert_eq!(choose(&c, &mut rng), Some(0));
        // One failure sits a provider out for about 5 s; each failure in
        // a row longer; a success starts over.
        let t0 = Instant::now();
        let mut s = ProviderStats::default();
        let sit_out = |s: &ProviderStats, from: Instant| {
            (1..1000u64)
                .map(|n| Duration::from_millis(100 * n))
                .find(|d| !s.failing(from + *d))
                .unwrap()
        };
        let mut at = t0;
        let mut outs = Vec::new();
        for _ in 0..4 {
            s.failure(at);
            let out = sit_out(&s, at);
            outs.push(out.as_secs_f64().round() as u64);
            at += out;
        }
        assert_eq!(outs[0], 5, "{outs:?}");
        assert!(outs.windows(2).all(|w| w[1] > w[0]), "{outs:?}");
        assert!(outs[3] >= 15, "{outs:?}");
        s.succeeded();
        s.failure(at);
        assert!(sit_out(&s, at) < Duration::from_secs(10), "{outs:?}");
    }

    /// Provider `a` answered a few slow calls (500 ms), then is as fast
    /// as `b` (1 ms): it must be tried again once idle for a while. Its
    /// figure used to change only when it was picked, so every later call
    /// went to `b`, for good.
    #[test]
    fn an_idle_providers_latency_decays_so_it_is_tried_again() {
        let mut rng = StdRng::seed_from_u64(5);
        let t0 = Instant::now();
        let (slow, fast) = (Duration::from_millis(500), Duration::from_millis(1));
        let mut stats = [ProviderStats::default(), ProviderStats::default()];
        for i in 0..3 {
            stats[0].answered(slow, t0 + slow * i);
            stats[1].answered(fast, t0 + slow * i);
        }
        // A call every 0.6 s for 3 minutes, each answered in 1 ms.
        let mut picks: Vec<(Duration, usize)> = Vec::new();
        for n in 0..300u32 {
            let at = t0 + Duration::from_millis(1500 + 600 * u64::from(n));
            let c: Vec<(Reach, f64, bool)> = stats
                .iter()
                .map(|s| (Reach::Neighbour, s.cost(at), s.failing(at)))
                .collect();
            let i = choose(&c, &mut rng).unwrap();
            stats[i].answered(fast, at);
            picks.push((at - t0, i));
        }
        let first = picks.iter().find(|p| p.1 == 0).map(|p| p.0);
        // 500 times slower: tried again after about 10 s x log2(500), 90 s.
        let first = first.expect("a was never tried again");
        assert!(
            first > Duration::from_secs(80) && first < Duration::from_secs(100),
            "a tried again after {first:?}"
        );
        // As fast as b again, it gets its share from then on.
        let to_a = picks[250..].iter().filter(|p| p.1 == 0).count();
        assert!((10..=40).contains(&to_a), "a got {to_a} of the last 50");
        // A figure just sampled is the smoothed one; half of it after 10 s.
        let mut s = ProviderStats::default();
        s.answered(slow, t0);
        assert_eq!(s.latency(t0), Some(slow));
        assert_eq!(s.latency(t0 + LATENCY_HALF_LIFE), Some(slow / 2));
        assert_eq!(ProviderStats::default().latency(t0), None);
    }

    #[test]
    fn failures_raise_the_cost_and_fade() {
        let t0 = Instant::now();
        let mut s = ProviderStats::default();
        s.answered(Duration::from_micros(100), t0);
        let healthy = s.cost(t0);
        s.failure(t0);
        s.failure(t0);
        assert!(s.cost(t0) > 8.0 * healthy);
        let later = t0 + Duration::from_secs(60);
        // The failures faded (and the latency figure with them).
        assert!(s.cost(later) < 1.01 * healthy);
        s.answered(Duration::from_micros(100), later);
        let healthy = s.cost(later);
        // Calls in flight count too.
        s.in_flight = 3;
        assert!(s.cost(later) > 3.9 * healthy);
    }
}
