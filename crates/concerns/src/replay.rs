//! Replay detection for messages whose origin is proven (routed requests,
//! sealed; floods, signed): the proof says who made a message, not that it
//! is new, and every node on its way saw it go by and could send it again.
//!
//! Such a message carries its origin's clock (ms since the Unix epoch) and a
//! nonce (random for routed requests, the message id for floods), both
//! under the proof. A node takes a message only if its stamp is within a
//! window of its own clock and its nonce was not seen from that origin;
//! nonces are kept until their stamp leaves the window, so a replay is
//! either remembered or too old.
//!
//! Memory is bounded: past `capacity` nonces, the origin holding the most
//! loses its oldest, and its *floor* rises to that nonce's stamp. Messages
//! from that origin stamped at or below its floor are refused, since the
//! guard can no longer tell whether they are new. So an origin sending more
//! than the guard holds within the window only costs itself its late
//! messages, and never lets a replay through. Origins left with a floor and
//! no nonce are kept until the floor leaves the window, at most `capacity`
//! more of them: past that they are forgotten, each floor folded into one
//! of `4 × capacity` *buckets* (at least 1024), chosen by a keyed hash of
//! the origin that other nodes cannot predict, and no more than a second
//! ahead of our clock. Messages of any origin stamped at or below its
//! bucket's floor are refused. Many made-up origins thus cost the origins
//! that share their buckets (about a fifth per round of forgetting) their
//! messages of that second, never a second delivery of a message stamped
//! no later than a second ahead. One floor for all, folded in whole, let
//! made-up origins stamped ahead block every origin's messages for as long
//! (audit round five, follow-up: 135 000 of them stamped 55 s ahead stopped
//! every broadcast for 55 s).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};

use meshwork_peers::wire::NodeId;

/// The nonce of a sealed message.
pub(crate) type Nonce = [u8; 24];

/// Buckets of forgotten floors, at the least.
const MIN_BUCKETS: usize = 1024;
/// Buckets per nonce of capacity: one round of forgetting (about
/// `capacity` origins) raises about a fifth of them.
const BUCKETS_PER_NONCE: usize = 4;
/// How far past our clock a forgotten floor may hold a bucket (ms).
const FOLD_AHEAD_MS: u64 = 1_000;

/// What the guard makes of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Not seen before, within the window: take it.
    Fresh,
    /// Seen before, or at or below its origin's floor.
    Replayed,
    /// Stamped `off_ms` from our clock (negative: behind it), outside the
    /// window.
    Stale { off_ms: i64 },
}

struct Origin<N> {
    nonces: HashSet<N>,
    /// In arrival order, with their stamps.
    order: VecDeque<(u64, N)>,
    /// Stamps at or below this are refused (see the module docs).
    floor: u64,
}

impl<N> Default for Origin<N> {
    fn default() -> Self {
        Origin {
            nonces: HashSet::new(),
            order: VecDeque::new(),
            floor: 0,
        }
    }
}

/// The nonces of recent messages, by origin.
pub(crate) struct ReplayGuard<N = Nonce> {
    window_ms: u64,
    capacity: usize,
    origins: HashMap<NodeId, Origin<N>>,
    /// The floors of forgotten origins, folded by a keyed hash of the
    /// origin (see the module docs).
    buckets: Vec<u64>,
    /// Mixed into the bucket hash: secret, so that nobody can aim made-up
    /// origins at the bucket of another.
    salt: u64,
    /// The origins holding nonces, by how many: the one holding the most
    /// is found at once (a scan of 65 536 one-nonce origins took 210 µs
    /// per request: audit round four).
    by_count: BTreeMap<usize, HashSet<NodeId>>,
    len: usize,
    /// When the guard last dropped what left the window.
    swept_at: u64,
}

impl<N: Copy + Eq + std::hash::Hash> ReplayGuard<N> {
    /// Takes messages stamped within `window_ms` of our clock; remembers at
    /// most `capacity` nonces.
    pub(crate) fn new(window_ms: u64, capacity: usize) -> Self {
        ReplayGuard {
            window_ms: window_ms.max(1),
            capacity: capacity.max(1),
            origins: HashMap::new(),
            // Zeroed pages cost no memory until a bucket is raised.
            buckets: vec![0; capacity.saturating_mul(BUCKETS_PER_NONCE).max(MIN_BUCKETS)],
            salt: rand::random(),
            by_count: BTreeMap::new(),
            len: 0,
            swept_at: 0,
        }
    }

    /// Judges a message from `origin` stamped `stamp` (its clock) with
    /// `nonce`, at `now` (our clock, same unit); records it when fresh.
    pub(crate) fn check(&mut self, origin: &NodeId, nonce: N, stamp: u64, now: u64) -> Verdict {
        let verdict = self.peek(origin, nonce, stamp, now);
        if verdict == Verdict::Fresh {
            self.record(origin, nonce, stamp, now);
        }
        verdict
    }

    /// Judges as [`check`](Self::check) does, without recording: for a
    /// message whose proof is checked next, and recorded only if it holds.
    pub(crate) fn peek(&mut self, origin: &NodeId, nonce: N, stamp: u64, now: u64) -> Verdict {
        // In i128: stamps are whatever a peer sends, up to u64::MAX.
        let off = i128::from(stamp) - i128::from(now);
        if off.unsigned_abs() > u128::from(self.window_ms) {
            let off_ms = i64::try_from(off).unwrap_or(if off < 0 { i64::MIN } else { i64::MAX });
            return Verdict::Stale { off_ms };
        }
        if now.saturating_sub(self.swept_at) >= self.window_ms / 4 {
            self.sweep(now);
        }
        if stamp <= self.buckets[self.bucket(origin)] {
            return Verdict::Replayed;
        }
        if let Some(o) = self.origins.get(origin)
            && (stamp <= o.floor || o.nonces.contains(&nonce))
        {
            return Verdict::Replayed;
        }
        Verdict::Fresh
    }

    /// Records a nonce [`peek`](Self::peek) just found fresh.
    fn record(&mut self, origin: &NodeId, nonce: N, stamp: u64, now: u64) {
        while self.len >= self.capacity && self.evict_one() {}
        if self.origins.len() >= 2 * self.capacity {
            self.forget_floors(now);
        }
        let o = self.origins.entry(origin.clone()).or_default();
        // Eviction just now may have raised this origin's floor past it:
        // then it is not recorded (and was judged fresh a moment before
        // the floor rose, which is what any earlier arrival would get).
        if stamp <= o.floor || !o.nonces.insert(nonce) {
            return;
        }
        o.order.push_back((stamp, nonce));
        let count = o.order.len();
        self.len += 1;
        self.recount(origin, count - 1, count);
    }

    /// Forgets the origins that hold a floor and no nonce, folding their
    /// floors into their buckets (see the module docs).
    fn forget_floors(&mut self, now: u64) {
        let mut forgotten = Vec::new();
        self.origins.retain(|origin, o| {
            let keep = !o.order.is_empty();
            if !keep {
                forgotten.push((origin.clone(), o.floor));
            }
            keep
        });
        // A floor ahead of our clock is folded in as no more than a second
        // ahead: made-up origins stamped up to the window ahead would
        // otherwise hold their buckets' honest origins back for that long
        // (55 s in audit round five). What that lets through is a replay of
        // a forgotten message stamped over a second ahead: one of a member
        // whose clock runs ahead, or of a made-up origin.
        let cap = now.saturating_add(FOLD_AHEAD_MS);
        for (origin, floor) in forgotten {
            let b = self.bucket(&origin);
            self.buckets[b] = self.buckets[b].max(floor.min(cap));
        }
    }

    /// The bucket `origin`'s forgotten floor goes to.
    fn bucket(&self, origin: &NodeId) -> usize {
        let mut h = std::hash::DefaultHasher::new();
        (self.salt, origin).hash(&mut h);
        (h.finish() % self.buckets.len() as u64) as usize
    }

    /// Moves `origin` from holding `old` nonces to holding `new` in
    /// [`by_count`](Self::by_count) (0: not there).
    fn recount(&mut self, origin: &NodeId, old: usize, new: usize) {
        if old > 0
            && let Some(set) = self.by_count.get_mut(&old)
        {
            set.remove(origin);
            if set.is_empty() {
                self.by_count.remove(&old);
            }
        }
        if new > 0 {
            self.by_count.entry(new).or_default().insert(origin.clone());
        }
    }

    /// Forgets the oldest nonce of the origin holding the most, raising its
    /// floor; false if there is none.
    fn evict_one(&mut self) -> bool {
        let Some(origin) = self
            .by_count
            .last_key_value()
            .and_then(|(_, set)| set.iter().next().cloned())
        else {
            return false;
        };
        let Some(o) = self.origins.get_mut(&origin) else {
            return false;
        };
        let Some((stamp, nonce)) = o.order.pop_front() else {
            return false;
        };
        o.nonces.remove(&nonce);
        o.floor = o.floor.max(stamp);
        let count = o.order.len();
        self.len -= 1;
        self.recount(&origin, count + 1, count);
        true
    }

    /// Drops nonces (and floors) whose stamps left the window: a request
    /// stamped that early is refused as stale anyway.
    fn sweep(&mut self, now: u64) {
        self.swept_at = now;
        let horizon = now.saturating_sub(self.window_ms);
        let mut removed = 0;
        let mut recounts = Vec::new();
        self.origins.retain(|origin, o| {
            // Arrival order is about stamp order; one stamped late behind
            // an early one waits for it, which only keeps it longer.
            let before = o.order.len();
            while o.order.front().is_some_and(|(s, _)| *s < horizon) {
                if let Some((_, n)) = o.order.pop_front() {
                    o.nonces.remove(&n);
                    removed += 1;
                }
            }
            if o.order.len() != before {
                recounts.push((origin.clone(), before, o.order.len()));
            }
            !o.order.is_empty() || o.floor >= horizon
        });
        self.len -= removed;
        for (origin, old, new) in recounts {
            self.recount(&origin, old, new);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u8) -> NodeId {
        NodeId::from_bytes(vec![n; 32]).unwrap()
    }

    fn nonce(n: u32) -> Nonce {
        let mut b = [0u8; 24];
        b[..4].copy_from_slice(&n.to_be_bytes());
        b
    }

    #[test]
    fn peek_judges_without_recording() {
        let mut g = ReplayGuard::new(1_000, 100);
        let now = 50_000;
        assert_eq!(g.peek(&node(1), nonce(1), now, now), Verdict::Fresh);
        assert_eq!(g.peek(&node(1), nonce(1), now, now), Verdict::Fresh);
        assert_eq!(g.len(), 0);
        assert_eq!(g.check(&node(1), nonce(1), now, now), Verdict::Fresh);
        assert_eq!(g.peek(&node(1), nonce(1), now, now), Verdict::Replayed);
        assert_eq!(g.len(), 1);
    }

    /// Made-up origins, one message each, past what the guard holds: it
    /// never holds more than its capacity of nonces nor twice that of
    /// origins, and a replay of any of them is refused, remembered, under
    /// its origin's floor, or under its bucket's.
    #[test]
    fn made_up_origins_past_the_bound_are_forgotten_into_floors() {
        let mut g = ReplayGuard::new(10_000, 4);
        let now = 50_000;
        assert_eq!(g.check(&node(1), nonce(1), now - 100, now), Verdict::Fresh);
        for n in 2..40u8 {
            let stamp = now + u64::from(n);
            assert_eq!(g.check(&node(n), nonce(1), stamp, now), Verdict::Fresh);
            assert!(g.len() <= 4);
            assert!(g.origins.len() <= 8, "{}", g.origins.len());
        }
        assert!(g.buckets.iter().any(|&f| f > 0));
        assert_eq!(
            g.check(&node(1), nonce(1), now - 100, now),
            Verdict::Replayed
        );
        for n in 2..40u8 {
            let stamp = now + u64::from(n);
            assert_eq!(
                g.check(&node(n), nonce(1), stamp, now),
                Verdict::Replayed,
                "{n}"
            );
        }
        // Messages stamped after all of those are still taken.
        assert_eq!(g.check(&node(99), nonce(1), now + 100, now), Verdict::Fresh);
        assert_eq!(g.check(&node(1), nonce(2), now + 101, now), Verdict::Fresh);
    }

    /// Made-up origins stamped 55 s ahead of our clock, forgotten, raise
    /// the floors of their buckets only, and by a second at most: an origin
    /// in another bucket still gets its messages stamped now through, and
    /// two seconds later every origin does (with one floor for all, folded
    /// in whole, every origin's were refused for 55 s).
    #[test]
    fn forgotten_origins_stamped_ahead_block_only_their_buckets() {
        // 256 nonces and 1 024 buckets: the ratio of the defaults.
        let mut g = ReplayGuard::new(60_000, 256);
        assert_eq!(g.buckets.len(), 256 * BUCKETS_PER_NONCE);
        g.salt = 1; // the same buckets on every run
        let now = 1_000_000;
        // 600: one round of forgetting (at 512 origins kept), 256 folded.
        for n in 0..600u32 {
            let mut id = vec![7u8; 32];
            id[..4].copy_from_slice(&n.to_be_bytes());
            let sybil = NodeId::from_bytes(id).unwrap();
            // Fresh, or refused where an earlier one's floor went.
            g.check(&sybil, nonce(1), now + 55_000, now);
        }
        let raised = g.buckets.iter().filter(|&&f| f > now).count();
        // At most one bucket per origin folded (256), about a fifth.
        assert!(raised > 0 && raised <= 256, "{raised}");
        // Folded in at most a second ahead, not 55 s.
        assert!(g.buckets.iter().all(|&f| f <= now + FOLD_AHEAD_MS));
        // Honest origins in untouched buckets are not held back; those in
        // raised ones are (late messages lost, never a replay let in).
        let mut free = 0;
        for n in 0..64u8 {
            let honest = node(n);
            let held_back = g.buckets[g.bucket(&honest)] >= now;
            let verdict = g.peek(&honest, nonce(9), now, now);
            if !held_back {
                assert_eq!(verdict, Verdict::Fresh, "origin {n}");
                free += 1;
            } else {
                assert_eq!(verdict, Verdict::Replayed, "origin {n}");
            }
        }
        assert!(free > 32, "{free} of 64 honest origins got through");
        // Two seconds on, no bucket holds back a new origin (judged without
        // recording: recording would forget more made-up origins, whose
        // floors go in at most a second ahead of that moment).
        let later = now + 2 * FOLD_AHEAD_MS;
        for n in 100..164u8 {
            let verdict = g.peek(&node(n), nonce(9), later, later);
            assert_eq!(verdict, Verdict::Fresh, "origin {n}");
        }
    }

    #[test]
    fn a_request_is_taken_once_within_the_window() {
        let mut g = ReplayGuard::new(1_000, 100);
        let now = 50_000;
        assert_eq!(g.check(&node(1), nonce(1), now, now), Verdict::Fresh);
        assert_eq!(
            g.check(&node(1), nonce(1), now, now + 10),
            Verdict::Replayed
        );
        // The same nonce from another origin is another message.
        assert_eq!(g.check(&node(2), nonce(1), now, now), Verdict::Fresh);
        // Clocks apart by up to the window, either way.
        assert_eq!(
            g.check(&node(1), nonce(2), now - 1_000, now),
            Verdict::Fresh
        );
        assert_eq!(
            g.check(&node(1), nonce(3), now + 1_000, now),
            Verdict::Fresh
        );
        assert_eq!(
            g.check(&node(1), nonce(4), now - 1_001, now),
            Verdict::Stale { off_ms: -1_001 }
        );
        assert_eq!(
            g.check(&node(1), nonce(5), now + 5_000, now),
            Verdict::Stale { off_ms: 5_000 }
        );
        // Replayed once its stamp left the window: stale, though forgotten.
        assert_eq!(
            g.check(&node(1), nonce(1), now, now + 1_001),
            Verdict::Stale { off_ms: -1_001 }
        );
        g.sweep(now + 2_000);
        assert_eq!(g.len(), 1, "only the one stamped in the future is kept");
    }

    /// Stamps anywhere in u64 are judged without overflow.
    #[test]
    fn extreme_stamps_are_stale() {
        let mut g = ReplayGuard::new(1_000, 100);
        let now = 1_700_000_000_000;
        for stamp in [0, u64::MAX, 1 << 63, (1 << 63) - 1] {
            assert!(
                matches!(
                    g.check(&node(1), nonce(1), stamp, now),
                    Verdict::Stale { .. }
                ),
                "{stamp}"
            );
        }
        assert_eq!(
            g.check(&node(1), nonce(1), u64::MAX, 0),
            Verdict::Stale { off_ms: i64::MAX }
        );
    }

    /// Full of one-nonce origins, the guard still finds the biggest at once
    /// and keeps its counts right as nonces come, go and expire.
    #[test]
    fn a_guard_full_of_origins_evicts_the_biggest() {
        let mut g = ReplayGuard::new(60_000, 1_000);
        let t = 100_000;
        for i in 0..999u32 {
            let id = NodeId::from_bytes(i.to_be_bytes().repeat(8)).unwrap();
            assert_eq!(g.check(&id, nonce(i), t, t), Verdict::Fresh);
        }
        for i in 0..5 {
            assert_eq!(
                g.check(&node(7), nonce(i), t + 1 + u64::from(i), t),
                Verdict::Fresh
            );
        }
        assert_eq!(g.len(), 1_000);
        // node 7 holds the most: it loses its oldest, again and again.
        for i in 5..20 {
            assert_eq!(
                g.check(&node(9), nonce(i), t + 50 + u64::from(i), t),
                Verdict::Fresh
            );
        }
        assert_eq!(g.len(), 1_000);
        assert_eq!(g.check(&node(7), nonce(0), t + 1, t), Verdict::Replayed);
        let counted: usize = g.by_count.iter().map(|(n, set)| n * set.len()).sum();
        assert_eq!(counted, g.len());
        g.sweep(t + 200_000);
        assert_eq!(g.len(), 0);
        assert!(g.by_count.is_empty());
    }

    /// Past its capacity the guard forgets the biggest origin's oldest
    /// nonces and refuses that origin's requests stamped as early: what it
    /// forgot can never be replayed, and other origins are not affected.
    #[test]
    fn a_full_guard_refuses_what_it_forgot_of_the_biggest_origin_only() {
        let mut g = ReplayGuard::new(60_000, 10);
        let t = 100_000;
        for i in 0..3 {
            assert_eq!(g.check(&node(1), nonce(i), t + i as u64, t), Verdict::Fresh);
        }
        for i in 0..20 {
            assert_eq!(
                g.check(&node(9), nonce(i), t + i as u64, t + 20),
                Verdict::Fresh
            );
        }
        assert_eq!(g.len(), 10);
        // node 9's first 13 were forgotten; each one is refused, and so is a
        // new one stamped as early (it cannot be told from a replay).
        for i in 0..13 {
            assert_eq!(
                g.check(&node(9), nonce(i), t + i as u64, t + 30),
                Verdict::Replayed
            );
        }
        assert_eq!(
            g.check(&node(9), nonce(99), t + 5, t + 30),
            Verdict::Replayed
        );
        assert_eq!(g.check(&node(9), nonce(98), t + 50, t + 50), Verdict::Fresh);
        // node 1's are all still remembered, and it is not held back.
        for i in 0..3 {
            assert_eq!(
                g.check(&node(1), nonce(i), t + i as u64, t + 30),
                Verdict::Replayed
            );
        }
        assert_eq!(g.check(&node(1), nonce(50), t + 1, t + 30), Verdict::Fresh);
    }
}
