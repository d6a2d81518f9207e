//! The route table of the routing concern: next hops towards nodes that are
//! not neighbours, learnt from queries and routed traffic, with expiry.

use std::collections::HashMap;
use std::time::Duration;

use meshwork_peers::wire::NodeId;
use tokio::time::Instant;

/// A way to reach a node that is not a neighbour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The node the route leads to.
    pub target: NodeId,
    /// The neighbour to hand messages for it to.
    pub next_hop: NodeId,
    /// Hops from here, as far as we know.
    pub hops: u32,
    /// How long ago the route was last confirmed.
    pub age: Duration,
}

#[derive(Debug, Clone)]
struct Entry {
    next_hop: NodeId,
    hops: u32,
    learned: Instant,
}

/// Next hops by target, bounded and expiring.
#[derive(Debug)]
pub(crate) struct RouteTable {
    routes: HashMap<NodeId, Entry>,
    ttl: Duration,
    capacity: usize,
}

impl RouteTable {
    pub(crate) fn new(ttl: Duration, capacity: usize) -> Self {
        RouteTable {
            routes: HashMap::new(),
            ttl,
            capacity: capacity.max(1),
        }
    }

    fn live(&self, e: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(e.learned) < self.ttl
    }

    /// Records that `target` is `hops` away through `next_hop`. A live
    /// route as short or shorter through another hop is kept; a shorter
    /// one, or a refresh through the same hop, replaces it.
    pub(crate) fn learn(&mut self, target: &NodeId, next_hop: &NodeId, hops: u32, now: Instant) {
        if target == next_hop {
            return; // a neighbour needs no route
        }
        if let Some(e) = self.routes.get(target) {
            let keep = self.live(e, now) && e.next_hop != *next_hop && e.hops <= hops;
            if keep {
                return;
            }
        }
        if !self.routes.contains_key(target) && self.routes.len() >= self.capacity {
            self.routes
                .retain(|_, e| now.saturating_duration_since(e.learned) < self.ttl);
            if self.routes.len() >= self.capacity {
                let oldest = self
                    .routes
                    .iter()
                    .min_by_key(|(_, e)| e.learned)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    self.routes.remove(&k);
                }
            }
        }
        self.routes.insert(
            target.clone(),
            Entry {
                next_hop: next_hop.clone(),
                hops,
                learned: now,
            },
        );
    }

    /// Confirms a live route to `target` through `next_hop` (traffic came
    /// back that way): it lives on. Nothing else changes.
    pub(crate) fn refresh(&mut self, target: &NodeId, next_hop: &NodeId, now: Instant) {
        let ttl = self.ttl;
        if let Some(e) = self.routes.get_mut(target) {
            if e.next_hop == *next_hop && now.saturating_duration_since(e.learned) < ttl {
                e.learned = now;
            }
        }
    }

    /// The next hop towards `target`, if a live route is known.
    pub(crate) fn next_hop(&self, target: &NodeId, now: Instant) -> Option<NodeId> {
        self.routes
            .get(target)
            .filter(|e| self.live(e, now))
            .map(|e| e.next_hop.clone())
    }

    /// Forgets every route through `neighbour` (it disconnected).
    pub(crate) fn forget_via(&mut self, neighbour: &NodeId) {
        self.routes.retain(|_, e| e.next_hop != *neighbour);
    }

    /// Forgets the route to `target` (it proved wrong).
    pub(crate) fn forget(&mut self, target: &NodeId) {
        self.routes.remove(target);
    }

    /// Live routes, by target.
    pub(crate) fn snapshot(&self, now: Instant) -> Vec<Route> {
        let mut all: Vec<Route> = self
            .routes
            .iter()
            .filter(|(_, e)| self.live(e, now))
            .map(|(t, e)| Route {
                target: t.clone(),
                next_hop: e.next_hop.clone(),
                hops: e.hops,
                age: now.saturating_duration_since(e.learned),
            })
            .collect();
        all.sort_by(|a, b| a.target.cmp(&b.target));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn id(n: u8) -> NodeId {
        NodeId::from_bytes(vec![n; 8]).unwrap()
    }

    #[test]
    fn learns_prefers_short_routes_and_expires() {
        let t0 = Instant::now();
        let mut t = RouteTable::new(60 * S, 100);
        t.learn(&id(9), &id(1), 3, t0);
        assert_eq!(t.next_hop(&id(9), t0), Some(id(1)));
        // A longer route through another hop does not replace a live one.
        t.learn(&id(9), &id(2), 5, t0);
        assert_eq!(t.next_hop(&id(9), t0), Some(id(1)));
        // A shorter one does.
        t.learn(&id(9), &id(2), 2, t0);
        assert_eq!(t.next_hop(&id(9), t0), Some(id(2)));
        // A refresh through the same hop always does.
        t.learn(&id(9), &id(2), 4, t0 + 30 * S);
        assert_eq!(t.next_hop(&id(9), t0 + 80 * S), Some(id(2)));
        assert_eq!(t.next_hop(&id(9), t0 + 90 * S), None, "expired");
        // After expiry any route is taken.
        t.learn(&id(9), &id(3), 7, t0 + 91 * S);
        assert_eq!(t.next_hop(&id(9), t0 + 91 * S), Some(id(3)));
    }

    #[test]
    fn neighbours_and_dead_hops() {
        let t0 = Instant::now();
        let mut t = RouteTable::new(60 * S, 100);
        t.learn(&id(1), &id(1), 0, t0);
        assert!(t.snapshot(t0).is_empty());
        t.learn(&id(8), &id(1), 2, t0);
        t.learn(&id(9), &id(1), 2, t0);
        t.learn(&id(7), &id(2), 2, t0);
        t.forget_via(&id(1));
        let left: Vec<_> = t.snapshot(t0).into_iter().map(|r| r.target).collect();
        assert_eq!(left, vec![id(7)]);
        t.forget(&id(7));
        assert!(t.snapshot(t0).is_empty());
    }

    #[test]
    fn bounded() {
        let t0 = Instant::now();
        let mut t = RouteTable::new(60 * S, 4);
        for n in 10..50u8 {
            t.learn(&id(n), &id(1), 2, t0 + u32::from(n) * S / 100);
        }
        let left: Vec<_> = t.snapshot(t0 + S).into_iter().map(|r| r.target).collect();
        assert_eq!(left, vec![id(46), id(47), id(48), id(49)]);
    }
}
