//! Round-robin queues, one per sender: a sender that floods fills its own
//! queue and then gets "overloaded", while every other sender keeps its turn.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Bounded per-key FIFO queues served in turn, with a bound on all of them
/// together: keys can be claimed by peers (the origin of a flooded or
/// routed message is whatever it says), so new keys alone must not grow it.
#[derive(Debug)]
pub(crate) struct FairQueue<K, T> {
    queues: HashMap<K, VecDeque<T>>,
    /// Keys with queued items, in serving order.
    ring: VecDeque<K>,
    per_key: usize,
    max_len: usize,
    len: usize,
}

impl<K: Hash + Eq + Clone, T> FairQueue<K, T> {
    pub(crate) fn new(per_key: usize, max_len: usize) -> Self {
        FairQueue {
            queues: HashMap::new(),
            ring: VecDeque::new(),
            per_key: per_key.max(1),
            max_len: max_len.max(1),
            len: 0,
        }
    }

    /// Queues `item` behind `key`'s earlier ones; gives it back if `key`'s
    /// queue, or the whole queue, is full.
    pub(crate) fn push(&mut self, key: K, item: T) -> Result<(), T> {
        if self.len >= self.max_len {
            return Err(item);
        }
        let queue = self.queues.entry(key.clone()).or_default();
        if queue.len() >= self.per_key {
            return Err(item);
        }
        if queue.is_empty() {
            self.ring.push_back(key);
        }
        queue.push_back(item);
        self.len += 1;
        Ok(())
    }

    /// The next item: the oldest of the key whose turn it is.
    pub(crate) fn pop(&mut self) -> Option<(K, T)> {
        let key = self.ring.pop_front()?;
        let queue = self.queues.get_mut(&key)?;
        let item = queue.pop_front()?;
        self.len -= 1;
        if queue.is_empty() {
            self.queues.remove(&key);
        } else {
            self.ring.push_back(key.clone());
        }
        Some((key, item))
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_keys_cannot_grow_it_past_its_bound() {
        let mut q = FairQueue::new(4, 10);
        for k in 0..10 {
            q.push(k, k).unwrap();
        }
        assert_eq!(q.push(99, 99), Err(99), "a new key past the bound");
        assert_eq!(q.push(0, 0), Err(0), "an old key past the bound");
        assert_eq!(q.len(), 10);
        assert!(q.pop().is_some());
        q.push(99, 99).unwrap();
    }

    #[test]
    fn senders_take_turns() {
        let mut q = FairQueue::new(100, 1000);
        for i in 0..5 {
            q.push("flood", i).unwrap();
        }
        q.push("quiet", 100).unwrap();
        q.push("other", 200).unwrap();
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            order,
            vec![
                ("flood", 0),
                ("quiet", 100),
                ("other", 200),
                ("flood", 1),
                ("flood", 2),
                ("flood", 3),
                ("flood", 4)
            ]
        );
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn a_full_queue_refuses_only_its_own_sender() {
        let mut q = FairQueue::new(2, 1000);
        q.push("a", 1).unwrap();
        q.push("a", 2).unwrap();
        assert_eq!(q.push("a", 3), Err(3));
        q.push("b", 1).unwrap();
        assert_eq!(q.len(), 3);
        assert_eq!(q.pop(), Some(("a", 1)));
        q.push("a", 4).unwrap();
    }
}
