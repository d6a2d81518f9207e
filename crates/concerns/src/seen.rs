//! A bounded, expiring set of recently seen message ids.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

/// Remembers keys for `ttl`, at most `capacity` of them (the oldest go
/// first). `insert` says whether a key is new, which is how a flooded
/// message is delivered and relayed once per node.
#[derive(Debug)]
pub(crate) struct SeenCache<K> {
    seen: HashMap<K, Instant>,
    order: VecDeque<(K, Instant)>,
    capacity: usize,
    ttl: Duration,
}

impl<K: Hash + Eq + Clone> SeenCache<K> {
    pub(crate) fn new(capacity: usize, ttl: Duration) -> Self {
        SeenCache {
            seen: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            ttl,
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((key, at)) = self.order.front() {
            if now.saturating_duration_since(*at) < self.ttl && self.order.len() < self.capacity {
                break;
            }
            if self.seen.get(key) == Some(at) {
                self.seen.remove(key);
            }
            self.order.pop_front();
        }
    }

    /// Records `key`; true if it was not already remembered.
    pub(crate) fn insert(&mut self, key: K, now: Instant) -> bool {
        self.expire(now);
        if let Some(at) = self.seen.get(&key) {
            if now.saturating_duration_since(*at) < self.ttl {
                return false;
            }
        }
        self.seen.insert(key.clone(), now);
        self.order.push_back((key, now));
        true
    }

    /// Whether `key` is remembered (inserted less than the ttl ago).
    pub(crate) fn contains(&self, key: &K, now: Instant) -> bool {
        self.seen
            .get(key)
            .is_some_and(|at| now.saturating_duration_since(*at) < self.ttl)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_key_is_new_once_until_it_expires() {
        let t0 = Instant::now();
        let mut c = SeenCache::new(100, 10 * S);
        assert!(c.insert("a", t0));
        assert!(!c.insert("a", t0 + 5 * S));
        assert!(c.insert("b", t0 + 5 * S));
        assert!(c.insert("a", t0 + 10 * S), "expired");
        assert!(!c.insert("b", t0 + 14 * S));
    }

    #[test]
    fn capacity_bounds_memory_oldest_first() {
        let t0 = Instant::now();
        let mut c = SeenCache::new(3, 100 * S);
        for k in 0..3 {
            assert!(c.insert(k, t0));
        }
        assert!(c.insert(3, t0), "room is made");
        assert_eq!(c.len(), 3);
        assert!(c.insert(0, t0), "the oldest was forgotten");
        assert!(!c.insert(3, t0), "the newest was not");
        for k in 10..10_000 {
            c.insert(k, t0);
        }
        assert_eq!(c.len(), 3);
    }
}
