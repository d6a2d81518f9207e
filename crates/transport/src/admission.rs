//! Admission of incoming streams into the handshake: a bounded set of
//! pending handshakes, shared fairly between source hosts.
//!
//! When every slot is taken, a newcomer may still get one by evicting a
//! pending handshake (whose stream is then closed):
//!
//! 1. **Fair share.** If the source holding the most pending handshakes is
//!    not the newcomer's and holds more than the newcomer's source does,
//!    its oldest handshake goes. One host can fill every slot only while
//!    nobody else wants one.
//! 2. **Stale first.** Otherwise the oldest pending handshake goes if it has
//!    waited at least half the handshake timeout: under pressure, the
//!    timeout is effectively halved.
//!
//! Otherwise the newcomer is closed at once, as before any byte is sent.
//! A handshake that completed holds its slot until the application takes
//! the connection, but can no longer be evicted.
//!
//! A source is an IPv4 address, an IPv6 /64 (what one host usually gets),
//! or the whole address for other transports (an in-memory host name).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{Address, Host};

/// The host an incoming stream comes from, for fair sharing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    /// An IPv4 host (IPv4-mapped IPv6 addresses included).
    V4([u8; 4]),
    /// The /64 prefix of an IPv6 address.
    V6([u8; 8]),
    /// Anything else, e.g. `mem://name`.
    Other(String),
}

impl Source {
    pub(crate) fn of(addr: &Address) -> Self {
        match addr {
            Address::Tcp {
                host: Host::Ip(IpAddr::V4(ip)),
                ..
            } => Source::V4(ip.octets()),
            Address::Tcp {
                host: Host::Ip(IpAddr::V6(ip)),
                ..
            } => match ip.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.octets()),
                None => {
                    let mut prefix = [0; 8];
                    prefix.copy_from_slice(&ip.octets()[..8]);
                    Source::V6(prefix)
                }
            },
            Address::Tcp {
                host: Host::Name(name),
                ..
            } => Source::Other(name.clone()),
            Address::Mem(name) => Source::Other(name.clone()),
        }
    }
}

/// What [`PendingHandshakes::admit`] decided besides admitting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// A slot was free.
    Free,
    /// A pending handshake was evicted to make room.
    Evicted,
}

struct Entry {
    source: Source,
    started: Instant,
    evict: CancellationToken,
}

#[derive(Default)]
struct Table {
    next: u64,
    /// Evictable (still handshaking) entries by id; ids grow with arrival,
    /// so the first entry is the oldest.
    pending: BTreeMap<u64, Entry>,
    /// Completed handshakes still holding a slot.
    settled: usize,
}

/// The bounded set of pending incoming handshakes of one endpoint.
pub(crate) struct PendingHandshakes {
    max: usize,
    stale_after: Duration,
    table: Mutex<Table>,
}

impl PendingHandshakes {
    /// At most `max` pending handshakes (at least one); a pending one is
    /// stale after half of `handshake_timeout`.
    pub(crate) fn new(max: usize, handshake_timeout: Duration) -> Arc<Self> {
        Arc::new(PendingHandshakes {
            max: max.max(1),
            stale_after: handshake_timeout / 2,
            table: Mutex::new(Table::default()),
        })
    }

    /// A slot for a stream from `source`, or `None` when it must be closed.
    pub(crate) fn admit(
        self: &Arc<Self>,
        source: Source,
        now: Instant,
    ) -> Option<(Slot, Admission)> {
        let mut t = crate::lock(&self.table);
        let mut how = Admission::Free;
        if t.pending.len() + t.settled >= self.max {
            let victim = self.victim(&t, &source, now)?;
            if let Some(e) = t.pending.remove(&victim) {
                e.evict.cancel();
            }
            how = Admission::Evicted;
        }
        t.next += 1;
        let id = t.next;
        let evict = CancellationToken::new();
        t.pending.insert(
            id,
            Entry {
                source,
                started: now,
                evict: evict.clone(),
            },
        );
        let slot = Slot {
            table: Arc::clone(self),
            id,
            evicted: evict,
            settled: false,
        };
        Some((slot, how))
    }

    /// The pending handshake to evict for a newcomer from `source`, if any.
    fn victim(&self, t: &Table, source: &Source, now: Instant) -> Option<u64> {
        // Per source: how many, and the oldest (first seen in id order).
        let mut per_source: HashMap<&Source, (usize, u64)> = HashMap::new();
        for (id, e) in &t.pending {
            per_source.entry(&e.source).or_insert((0, *id)).0 += 1;
        }
        let ours = per_source.get(source).map_or(0, |(n, _)| *n);
        let top = per_source
            .iter()
            .max_by(|a, b| a.1.0.cmp(&b.1.0).then(b.1.1.cmp(&a.1.1)));
        match top {
            Some((top_source, (n, oldest))) if *top_source != source && *n > ours => {
                return Some(*oldest);
            }
            _ => {}
        }
        let (id, oldest) = t.pending.first_key_value()?;
        (now.saturating_duration_since(oldest.started) >= self.stale_after).then_some(*id)
    }

    /// Slots in use: handshakes in progress, and completed ones not yet
    /// taken by the application.
    pub(crate) fn len(&self) -> usize {
        let t = crate::lock(&self.table);
        t.pending.len() + t.settled
    }
}

/// One admitted stream's slot, given back when dropped.
pub(crate) struct Slot {
    table: Arc<PendingHandshakes>,
    id: u64,
    evicted: CancellationToken,
    settled: bool,
}

impl Slot {
    /// Fires when a newcomer evicted this handshake.
    pub(crate) fn evicted(&self) -> &CancellationToken {
        &self.evicted
    }

    /// The handshake completed: the slot is kept (until dropped) but can no
    /// longer be evicted. False if it was evicted first.
    pub(crate) fn settle(&mut self) -> bool {
        let mut t = crate::lock(&self.table.table);
        if t.pending.remove(&self.id).is_none() {
            return false;
        }
        t.settled += 1;
        self.settled = true;
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut t = crate::lock(&self.table.table);
        if self.settled {
            t.settled -= 1;
        } else {
            t.pending.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(name: &str) -> Source {
        Source::Other(name.into())
    }

    const TIMEOUT: Duration = Duration::from_secs(10);

    #[test]
    fn sources_are_hosts_not_ports() {
        let a: Address = "tcp://127.0.0.1:4000".parse().unwrap();
        let b: Address = "tcp://127.0.0.1:4001".parse().unwrap();
        let c: Address = "tcp://127.0.0.2:4000".parse().unwrap();
        assert_eq!(Source::of(&a), Source::of(&b));
        assert_ne!(Source::of(&a), Source::of(&c));
        let v6a: Address = "tcp://[2001:db8:1:2::1]:4000".parse().unwrap();
        let v6b: Address = "tcp://[2001:db8:1:2:ffff::9]:4000".parse().unwrap();
        let v6c: Address = "tcp://[2001:db8:1:3::1]:4000".parse().unwrap();
        assert_eq!(Source::of(&v6a), Source::of(&v6b));
        assert_ne!(Source::of(&v6a), Source::of(&v6c));
        let mapped: Address = "tcp://[::ffff:127.0.0.1]:9".parse().unwrap();
        assert_eq!(Source::of(&mapped), Source::of(&a));
        assert_eq!(
            Source::of(&"mem://x".parse().unwrap()),
            Source::Other("x".into())
        );
    }

    #[test]
    fn slots_are_bounded_and_given_back() {
        let p = PendingHandshakes::new(2, TIMEOUT);
        let now = Instant::now();
        let a = p.admit(src("a"), now).unwrap();
        let b = p.admit(src("a"), now).unwrap();
        assert_eq!((a.1, b.1), (Admission::Free, Admission::Free));
        assert!(p.admit(src("a"), now).is_none(), "full, one source, fresh");
        drop(a);
        assert_eq!(p.len(), 1);
        assert!(p.admit(src("a"), now).is_some());
    }

    #[test]
    fn a_host_holding_more_slots_yields_its_oldest_to_another() {
        let p = PendingHandshakes::new(3, TIMEOUT);
        let now = Instant::now();
        let hog: Vec<_> = (0..3)
            .map(|_| p.admit(src("hog"), now).unwrap().0)
            .collect();
        let (_new, how) = p.admit(src("new"), now).expect("fair share");
        assert_eq!(how, Admission::Evicted);
        assert!(hog[0].evicted().is_cancelled(), "the oldest goes");
        assert!(!hog[1].evicted().is_cancelled() && !hog[2].evicted().is_cancelled());
        assert_eq!(p.len(), 3);
        // The hog gets nothing back by reconnecting: it still holds more.
        assert!(p.admit(src("hog"), now).is_none());
        // A second newcomer takes from the hog (2) too, not from "new" (1).
        let (_n2, _) = p.admit(src("new2"), now).unwrap();
        assert!(hog[1].evicted().is_cancelled());
        // Now every source holds one: none of them gets a second while fresh.
        assert!(p.admit(src("hog"), now).is_none());
        assert!(p.admit(src("new"), now).is_none());
        drop(hog);
    }

    #[test]
    fn among_equal_holders_the_oldest_handshake_goes() {
        let p = PendingHandshakes::new(2, TIMEOUT);
        let t0 = Instant::now();
        let a = p.admit(src("a"), t0).unwrap().0;
        let b = p.admit(src("b"), t0 + Duration::from_millis(1)).unwrap().0;
        // Both hold one, the newcomer none: the older (a) goes.
        let _c = p.admit(src("c"), t0 + Duration::from_millis(2)).unwrap();
        assert!(a.evicted().is_cancelled());
        assert!(!b.evicted().is_cancelled());
    }

    #[test]
    fn stale_handshakes_are_evicted_under_pressure() {
        let p = PendingHandshakes::new(2, TIMEOUT);
        let t0 = Instant::now();
        let a = p.admit(src("x"), t0).unwrap().0;
        let b = p.admit(src("x"), t0 + Duration::from_secs(1)).unwrap().0;
        let just_before = t0 + TIMEOUT / 2 - Duration::from_millis(1);
        assert!(p.admit(src("x"), just_before).is_none());
        let (_c, how) = p.admit(src("x"), t0 + TIMEOUT / 2).unwrap();
        assert_eq!(how, Admission::Evicted);
        assert!(a.evicted().is_cancelled() && !b.evicted().is_cancelled());
    }

    #[test]
    fn settled_handshakes_keep_their_slot_and_are_not_evicted() {
        let p = PendingHandshakes::new(1, TIMEOUT);
        let t0 = Instant::now();
        let mut a = p.admit(src("a"), t0).unwrap().0;
        assert!(a.settle());
        assert!(p.admit(src("b"), t0 + TIMEOUT).is_none());
        assert!(!a.evicted().is_cancelled());
        drop(a);
        assert_eq!(p.len(), 0);
        let a = p.admit(src("a"), t0).unwrap().0;
        let _b = p.admit(src("b"), t0).unwrap();
        let mut a = a;
        assert!(!a.settle(), "evicted before it completed");
        drop(a);
        assert_eq!(p.len(), 1);
    }
}
