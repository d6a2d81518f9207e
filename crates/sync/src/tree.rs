//! The broadcast tree of eager pushes (Plumtree's eager/lazy split, with
//! anti-entropy in place of lazy announcements).
//!
//! Every link starts eager: a new entry is pushed to every eager neighbour.
//! A node that receives a push it has already seen marks the sender lazy
//! and tells it so (Prune), so after the first pushes only the links of a
//! spanning tree carry them: each node receives each push about once,
//! instead of once per neighbour as with flooding. What a lazy link misses
//! reaches the node by anti-entropy, and a round that brings missed entries
//! makes its link eager again (Graft). When a neighbour leaves, every link
//! becomes eager again, so the tree regrows around the gap at the cost of a
//! few duplicates.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use meshwork_concerns::wire::NodeId;
use tokio::time::Instant;

/// Push ids seen recently (bounded, expiring) and the lazy links.
#[derive(Debug)]
pub(crate) struct Tree {
    lazy: HashSet<NodeId>,
    seen: HashMap<u64, Instant>,
    order: VecDeque<(u64, Instant)>,
    capacity: usize,
    ttl: Duration,
}

impl Tree {
    pub(crate) fn new(capacity: usize, ttl: Duration) -> Self {
        Tree {
            lazy: HashSet::new(),
            seen: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            ttl,
        }
    }

    /// Records push `id`; false if it was seen already.
    pub(crate) fn first_time(&mut self, id: u64, now: Instant) -> bool {
        while let Some((old, at)) = self.order.front().cloned() {
            if now.saturating_duration_since(at) < self.ttl && self.order.len() < self.capacity {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&old) == Some(&at) {
                self.seen.remove(&old);
            }
        }
        if self.seen.contains_key(&id) {
            return false;
        }
        self.seen.insert(id, now);
        self.order.push_back((id, now));
        true
    }

    /// `peer`'s link stops carrying pushes. True if it was eager. Only
    /// links to `neighbours` (the current ones) are kept lazy: a peer that is
    /// not one is ignored, and links to neighbours gone since are forgotten,
    /// so the lazy set never holds more ids than the node has neighbours.
    ///
    /// The node's last eager link is never pruned. Duplicates of pushes from
    /// different origins prune links from different sides: three nodes
    /// writing at once each pruned both their links, and every push went to
    /// nobody until anti-entropy (test
    /// `concurrent_writers_keep_every_node_on_the_push_tree`).
    pub(crate) fn prune(&mut self, peer: &NodeId, neighbours: &[NodeId]) -> bool {
        if !neighbours.contains(peer) {
            return false;
        }
        self.lazy.retain(|p| neighbours.contains(p));
        let last_eager = neighbours
            .iter()
            .all(|n| n == peer || self.lazy.contains(n));
        if last_eager {
            return false;
        }
        self.lazy.insert(peer.clone())
    }

    /// Whether `peer`'s link is lazy.
    pub(crate) fn is_lazy(&self, peer: &NodeId) -> bool {
        self.lazy.contains(peer)
    }

    /// `peer`'s link carries pushes again. True if it was lazy.
    pub(crate) fn graft(&mut self, peer: &NodeId) -> bool {
        self.lazy.remove(peer)
    }

    /// A neighbour left: every link becomes eager again.
    pub(crate) fn reset(&mut self) {
        self.lazy.clear();
    }

    /// The neighbours to push to, of `neighbours`, but `except`.
    pub(crate) fn eager<'a>(
        &'a self,
        neighbours: &'a [NodeId],
        except: &'a [&NodeId],
    ) -> impl Iterator<Item = &'a NodeId> + 'a {
        neighbours
            .iter()
            .filter(move |n| !self.lazy.contains(*n) && !except.contains(n))
    }

    /// Lazy links now.
    pub(crate) fn lazy_count(&self) -> usize {
        self.lazy.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId::from_bytes(vec![n; 32]).unwrap()
    }

    #[test]
    fn duplicates_are_seen_and_forgotten_after_the_ttl_or_capacity() {
        let t0 = Instant::now();
        let mut t = Tree::new(3, Duration::from_secs(10));
        assert!(t.first_time(1, t0));
        assert!(!t.first_time(1, t0));
        assert!(t.first_time(2, t0));
        assert!(t.first_time(3, t0));
        assert!(t.first_time(4, t0), "capacity pushes out the oldest");
        assert!(t.first_time(1, t0));
        assert!(!t.first_time(4, t0 + Duration::from_secs(5)));
        assert!(t.first_time(4, t0 + Duration::from_secs(11)));
    }

    #[test]
    fn pruned_links_are_left_out_until_grafted_or_reset() {
        let mut t = Tree::new(16, Duration::from_secs(10));
        let all = [id(1), id(2), id(3)];
        assert_eq!(t.eager(&all, &[&id(3)]).count(), 2);
        assert!(t.prune(&id(1), &all));
        assert!(!t.prune(&id(1), &all));
        assert_eq!(
            t.eager(&all, &[]).cloned().collect::<Vec<_>>(),
            vec![id(2), id(3)]
        );
        assert!(t.graft(&id(1)));
        assert_eq!(t.eager(&all, &[]).count(), 3);
        t.prune(&id(2), &all);
        t.reset();
        assert_eq!(t.lazy_count(), 0);
    }

    #[test]
    fn only_neighbours_are_pruned_and_the_lazy_set_stays_within_them() {
        let mut t = Tree::new(16, Duration::from_secs(10));
        let all = [id(1), id(2)];
        // Ids that are not neighbours (sent through flood or routing) are
        // ignored, however many.
        for n in 10..=255 {
            assert!(!t.prune(&id(n), &all));
        }
        assert_eq!(t.lazy_count(), 0);
        assert!(t.prune(&id(1), &all));
        assert!(!t.prune(&id(2), &all), "the last eager link stays");
        assert_eq!(t.lazy_count(), 1);
        // Neighbour 1 left: pruning 2 again forgets it (and 2, now the only
        // neighbour, stays eager).
        assert!(!t.prune(&id(2), &[id(2)]));
        assert_eq!(t.lazy_count(), 0);
    }

    #[test]
    fn the_last_eager_link_is_never_pruned() {
        let mut t = Tree::new(16, Duration::from_secs(10));
        let all = [id(1), id(2), id(3)];
        assert!(t.prune(&id(1), &all));
        assert!(t.prune(&id(2), &all));
        assert!(!t.prune(&id(3), &all));
        assert_eq!(t.eager(&all, &[]).cloned().collect::<Vec<_>>(), vec![id(3)]);
        // A lone neighbour is never lazy.
        let mut t = Tree::new(16, Duration::from_secs(10));
        assert!(!t.prune(&id(1), &[id(1)]));
        assert_eq!(t.lazy_count(), 0);
    }
}
