//! The replica: every key's latest entry, the lease rules for local writes,
//! the merge of remote entries, and the digests anti-entropy compares.
//!
//! Plain code, no I/O: every method takes the current physical time in
//! milliseconds and returns what changed, so the rules are unit-tested with
//! explicit clocks.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use bytes::Bytes;
use meshwork_concerns::wire::NodeId;

use crate::entry::{MAX_EPOCH, MAX_SPAN_MS};
use crate::hlc::{Hlc, TooFarAhead};
use crate::{Entry, Stamp, SyncError};

/// Where an anti-entropy pull resumes: after this key of this bucket.
pub(crate) type Cursor = (u32, Bytes);

/// Number of digest buckets; a key's bucket is a hash of the key.
pub(crate) const BUCKETS: usize = 256;

/// The bucket of `key` (FNV-1a, stable across builds and platforms).
pub(crate) fn bucket_of(key: &[u8]) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h >> 56) as usize
}

/// A change to the replica, as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    /// The key now holds this value.
    Set(Bytes),
    /// The key was deleted (or its ephemeral entry expired).
    Deleted,
    /// A key this node held a lease on now belongs to another node's claim;
    /// our value was replaced (by the change that follows, or already).
    LeaseLost {
        /// The new owner.
        new_owner: NodeId,
    },
    /// The key's lease ran out without being renewed, or its holder
    /// released it: any node may claim the key now. The value stays.
    /// Told once per lease, within a sweep interval of its end (at once
    /// for a release), as this node's clock judges it; with leasing on
    /// only.
    LeaseLapsed {
        /// The node whose lease it was.
        owner: NodeId,
    },
}

/// One change applied to the local replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The key.
    pub key: Bytes,
    /// What happened.
    pub kind: ChangeKind,
    /// The version (stamp) of the entry now held.
    pub version: Stamp,
    /// Who wrote the entry now held.
    pub writer: NodeId,
}

/// What a local write does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Write {
    /// Set a value (leased for the configured lease time).
    Set,
    /// Set a value leased for `lease_ms` from this write.
    SetLeased { lease_ms: u64 },
    /// Set a value that expires after `ttl_ms` unless refreshed.
    Ephemeral { ttl_ms: u64 },
    /// Delete (a tombstone; the lease is given up with it).
    Delete,
    /// Keep the value, give up the lease.
    Release,
}

/// A lease as the local replica sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The node holding it.
    pub owner: NodeId,
    /// When it lapses, in ms since the Unix epoch.
    pub until_ms: u64,
    /// The lease epoch (increases with each new claim of the key).
    pub epoch: u64,
}

#[derive(Debug, Default)]
struct Bucket {
    entries: BTreeMap<Bytes, (Entry, u64)>,
    hash: u64,
}

/// The tombstone an expired ephemeral entry becomes, the same on every
/// replica: stamped at its expiry (or just after its own stamp), with the
/// lease lapsed then, and keeping its ttl and expiry, which mark it as an
/// expiry (collected sooner than a delete, see `Replica::collect_at`).
fn expiry_tombstone(e: &Entry, leasing: bool) -> Entry {
    Entry {
        value: None,
        stamp: Stamp::new(e.expires_at, 0).max(e.stamp.next()),
        lease_until: if leasing { e.expires_at } else { 0 },
        ..e.clone()
    }
}

/// Settings of a replica.
#[derive(Debug, Clone)]
pub(crate) struct ReplicaConfig {
    pub(crate) leasing: bool,
    pub(crate) lease_ms: u64,
    pub(crate) tombstone_grace_ms: u64,
    pub(crate) max_skew_ms: u64,
    /// The most the replica may hold, by [`stored_size`].
    pub(crate) max_bytes: usize,
}

/// Bytes an entry is taken to cost besides its key and value: the entry
/// itself, its digest hash, its place in the bucket, key set and deadlines.
pub(crate) const ENTRY_OVERHEAD: usize = 192;

/// What an entry for `key` is taken to cost in memory.
pub(crate) fn stored_size(key: &[u8], entry: &Entry) -> usize {
    key.len() + entry.value.as_ref().map_or(0, |v| v.len()) + ENTRY_OVERHEAD
}

/// Why `Replica::apply` refused an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Stamped too far ahead of our clock.
    Ahead(TooFarAhead),
    /// Storing it would take the replica over its byte budget.
    Full,
}

/// Every key's latest entry.
#[derive(Debug)]
pub(crate) struct Replica {
    me: NodeId,
    cfg: ReplicaConfig,
    hlc: Hlc,
    buckets: Vec<Bucket>,
    root: u64,
    entries: usize,
    /// What the entries held cost, by [`stored_size`].
    bytes: usize,
    /// This node's ephemeral keys: value and ttl. The node keeps them alive
    /// for as long as it runs, even through an expiry it did not see.
    own_ephemeral: HashMap<Bytes, (Bytes, u64)>,
    /// Our own writes re-issued in a claim of ours from before a restart
    /// (see `apply`), to push to the mesh.
    rebased: Vec<(Bytes, Entry)>,
    /// When something may need sweeping: an ephemeral entry's expiry, a
    /// tombstone's collection. Checked against the entry held when due
    /// (entries replaced since leave stale deadlines behind), so a sweep
    /// costs what is due, not the size of the map.
    deadlines: std::collections::BTreeSet<(u64, Bytes)>,
    /// Keys with a live lease whose lapse has a deadline in `deadlines`:
    /// one each, moved on when it comes due after a renewal (a deadline
    /// per write would pile up for the whole lease, an hour by default).
    lapse_due: std::collections::HashSet<Bytes>,
    /// Every key held, sorted: prefix queries cost what they return.
    keys: std::collections::BTreeSet<Bytes>,
}

impl Replica {
    pub(crate) fn new(me: NodeId, cfg: ReplicaConfig) -> Self {
        Replica {
            me,
            hlc: Hlc::new(cfg.max_skew_ms),
            cfg,
            buckets: (0..BUCKETS).map(|_| Bucket::default()).collect(),
            root: 0,
            entries: 0,
            bytes: 0,
            own_ephemeral: HashMap::new(),
            rebased: Vec::new(),
            deadlines: std::collections::BTreeSet::new(),
            lapse_due: std::collections::HashSet::new(),
            keys: std::collections::BTreeSet::new(),
        }
    }

    pub(crate) fn me(&self) -> &NodeId {
        &self.me
    }

    pub(crate) fn leasing(&self) -> bool {
        self.cfg.leasing
    }

    /// The entry held for `key`, tombstones and expired entries included.
    pub(crate) fn entry(&self, key: &[u8]) -> Option<&Entry> {
        self.buckets[bucket_of(key)]
            .entries
            .get(key)
            .map(|(e, _)| e)
    }

    /// The live value of `key`: not deleted, not expired.
    pub(crate) fn get(&self, key: &[u8], now_ms: u64) -> Option<&Entry> {
        self.entry(key)
            .filter(|e| !e.is_deleted() && !e.expired(now_ms))
    }

    /// The live lease on `key`, if any.
    pub(crate) fn lease(&self, key: &[u8], now_ms: u64) -> Option<Lease> {
        self.lease_of(self.entry(key)?, now_ms)
    }

    /// The live lease of `e` (an entry of this replica), if any: for a
    /// caller that holds the entry already.
    pub(crate) fn lease_of(&self, e: &Entry, now_ms: u64) -> Option<Lease> {
        (self.cfg.leasing && e.lease_live(now_ms)).then(|| Lease {
            owner: e.writer.clone(),
            until_ms: e.lease_until,
            epoch: e.epoch,
        })
    }

    /// Every live entry, in bucket then key order.
    pub(crate) fn live(&self, now_ms: u64) -> impl Iterator<Item = (&Bytes, &Entry)> {
        self.buckets.iter().flat_map(move |b| {
            b.entries
                .iter()
                .filter(move |(_, (e, _))| !e.is_deleted() && !e.expired(now_ms))
                .map(|(k, (e, _))| (k, e))
        })
    }

    /// The live entries whose key starts with `prefix`, in key order.
    pub(crate) fn live_prefixed<'a>(
        &'a self,
        prefix: &'a [u8],
        now_ms: u64,
    ) -> impl Iterator<Item = (&'a Bytes, &'a Entry)> + 'a {
        self.live_prefixed_after(prefix, None, now_ms)
    }

    /// [`live_prefixed`](Self::live_prefixed) from the first key after
    /// `after` (all of them without it).
    pub(crate) fn live_prefixed_after<'a>(
        &'a self,
        prefix: &'a [u8],
        after: Option<&'a [u8]>,
        now_ms: u64,
    ) -> impl Iterator<Item = (&'a Bytes, &'a Entry)> + 'a {
        use std::ops::Bound;
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        self.keys
            .range::<[u8], _>((start, Bound::Unbounded))
            .take_while(move |k| k.starts_with(prefix))
            .filter_map(move |k| self.get(k, now_ms).map(|e| (k, e)))
    }

    /// Entries held, tombstones included.
    /// What the entries held cost, by [`stored_size`]: at most the budget.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// True if storing `entry` for `key` in place of what costs `old` keeps
    /// the replica within its byte budget (anything that does not grow it
    /// always does).
    fn fits(&self, old: usize, key: &[u8], entry: &Entry) -> bool {
        let new = stored_size(key, entry);
        new <= old || self.bytes - old + new <= self.cfg.max_bytes
    }

    pub(crate) fn entries(&self) -> usize {
        self.entries
    }

    /// XOR of every entry's hash: equal replicas have equal roots.
    pub(crate) fn root(&self) -> u64 {
        self.root
    }

    /// The hash of every bucket.
    pub(crate) fn bucket_hashes(&self) -> Vec<u64> {
        self.buckets.iter().map(|b| b.hash).collect()
    }

    /// Applies a local write under the lease rules and returns the entry
    /// written (to push to the mesh) and the changes.
    pub(crate) fn write(
        &mut self,
        key: Bytes,
        value: Option<Bytes>,
        what: Write,
        now_ms: u64,
    ) -> Result<(Entry, Vec<Change>), SyncError> {
        let stamp = self.hlc.stamp(now_ms);
        // Judged by the write's own stamp, which is at least now.
        let at = stamp.millis();
        let current = self.entry(&key).cloned();
        let old_size = current.as_ref().map_or(0, |e| stored_size(&key, e));
        if what == Write::Release {
            // Only a live value can be released, and only by its owner.
            match &current {
                Some(e) if e.is_deleted() || e.expired(at) => return Err(SyncError::NotFound(key)),
                None => return Err(SyncError::NotFound(key)),
                Some(e) if self.cfg.leasing && e.writer != self.me && e.lease_live(at) => {
                    return Err(SyncError::LeaseHeld {
                        key,
                        owner: e.writer.clone(),
                        until_ms: e.lease_until,
                    });
                }
                Some(e) if self.cfg.leasing && !e.lease_live(at) => {
                    // Nothing to give up: the key is open already.
                    return Ok((e.clone(), Vec::new()));
                }
                Some(_) => {}
            }
        }
        let (epoch, claim) = if !self.cfg.leasing {
            (0, stamp)
        } else {
            match &current {
                None => (1, stamp),
                Some(e) if e.lease_live(at) && e.writer != self.me => {
                    return Err(SyncError::LeaseHeld {
                        key,
                        owner: e.writer.clone(),
                        until_ms: e.lease_until,
                    });
                }
                Some(e) if e.lease_live(at) => (e.epoch, e.claim),
                // `MAX_EPOCH` is the last epoch peers accept (honest claims
                // never get near it: only a forged entry does). A claim past
                // it would be refused by every other replica while this one
                // kept it, splitting the map for good; and a new claim in
                // the last epoch ranks after the holder's earlier one, so it
                // would be overturned everywhere. The key stays with whoever
                // holds it in the last epoch: its owner writes on in its
                // claim, anyone else is told the lease is held for good.
                Some(e) if e.epoch >= MAX_EPOCH && e.writer == self.me => (e.epoch, e.claim),
                Some(e) if e.epoch >= MAX_EPOCH => {
                    return Err(SyncError::LeaseHeld {
                        key,
                        owner: e.writer.clone(),
                        until_ms: u64::MAX,
                    });
                }
                Some(e) => (e.epoch + 1, stamp),
            }
        };
        let (value, lease_until, expires_at, ttl_ms) = match what {
            Write::Set => (value, at.saturating_add(self.cfg.lease_ms), 0, 0),
            Write::SetLeased { lease_ms } => (value, at.saturating_add(lease_ms), 0, 0),
            Write::Ephemeral { ttl_ms } => {
                // Its time to live counts from the fastest clock heard from,
                // as its refreshes are timed (`refresh_due`): counted from
                // our stamp alone, a lead of more than a third of the ttl
                // left every refresh due again at once, and owners rewrote
                // their keys at every sweep for minutes after one entry
                // stamped ahead arrived. (A key then outlives a dead owner
                // by that lead on slower clocks, at most the allowed skew.)
                let until = at.max(self.fastest_clock(now_ms)).saturating_add(ttl_ms);
                (value, until, until, ttl_ms)
            }
            // Deleting our own live ephemeral key ends it early, like an
            // expiry (ttl kept, collected as soon): nobody else can have
            // written it under our lease, so no rival value can come back.
            Write::Delete => match &current {
                Some(e)
                    if self.cfg.leasing && e.ttl_ms != 0 && !e.is_deleted() && !e.expired(at) =>
                {
                    (None, at, at, e.ttl_ms)
                }
                _ => (None, at, 0, 0),
            },
            Write::Release => {
                let Some(e) = current.filter(|e| !e.is_deleted() && !e.expired(at)) else {
                    return Err(SyncError::NotFound(key));
                };
                (e.value, at, e.expires_at, e.ttl_ms)
            }
        };
        let entry = Entry {
            value,
            stamp,
            writer: self.me.clone(),
            epoch,
            claim,
            lease_until: if self.cfg.leasing { lease_until } else { 0 },
            expires_at,
            ttl_ms,
        };
        if !self.fits(old_size, &key, &entry) {
            return Err(SyncError::Full {
                key,
                limit: self.cfg.max_bytes,
            });
        }
        match (what, &entry.value) {
            (Write::Ephemeral { ttl_ms }, Some(v)) => {
                self.own_ephemeral.insert(key.clone(), (v.clone(), ttl_ms));
            }
            _ => {
                self.own_ephemeral.remove(&key);
            }
        }
        let changes = self.put(key, entry.clone(), at);
        Ok((entry, changes))
    }

    /// Merges an entry from another node. `Ok(changes)` (empty when ours
    /// wins); an error when its stamp is too far ahead of our clock, or it
    /// is a tombstone older than the grace period (it was collected here and
    /// must not come back).
    pub(crate) fn apply(
        &mut self,
        key: Bytes,
        entry: Entry,
        now_ms: u64,
    ) -> Result<Vec<Change>, Refused> {
        self.hlc
            .observe(entry.stamp, now_ms)
            .map_err(Refused::Ahead)?;
        if entry.is_deleted() && self.collectable(&entry, now_ms) {
            return Ok(Vec::new());
        }
        // An entry expired on every replica's clock: each has swept it into
        // a tombstone or collected that already, so it is as good as
        // collected and must not come back.
        if !entry.is_deleted()
            && entry.expires_at != 0
            && entry.expires_at.saturating_add(self.two_skews()) <= now_ms
        {
            return Ok(Vec::new());
        }
        let current = self.entry(&key);
        let old_size = current.map_or(0, |e| stored_size(&key, e));
        if let Some(current) = current {
            if !entry.beats(current, self.cfg.leasing) {
                return Ok(Vec::new());
            }
            // Our own entry from before a restart (same id, older stamp)
            // beats the write we made since, not knowing of it: an earlier
            // claim in the same epoch, or any entry of a later epoch (the
            // key changed hands before the restart, while our write started
            // at epoch 1). Our latest write is re-issued as if written now
            // over that entry, instead of being lost: in its claim while
            // its lease is live (it is ours), else as the next claim.
            if self.cfg.leasing
                && entry.writer == self.me
                && current.writer == self.me
                && current.stamp > entry.stamp
            {
                let current = current.clone();
                let stamp = self.hlc.stamp(now_ms);
                let at = stamp.millis();
                // As `write` decides for a write over `entry` (ours).
                let (epoch, claim) = if entry.lease_live(at) || entry.epoch >= MAX_EPOCH {
                    (entry.epoch, entry.claim)
                } else {
                    (entry.epoch + 1, stamp)
                };
                let rebased = Entry {
                    stamp,
                    epoch,
                    claim,
                    lease_until: if current.is_deleted() {
                        at
                    } else if current.ttl_ms != 0 {
                        // Saturating: the ttl came from a peer (checked in
                        // `Entry::from_proto`, but this must not panic).
                        at.saturating_add(current.ttl_ms)
                    } else {
                        // The lease the write had: the configured one, a
                        // `set_leased` one, or none for a release (its
                        // lease ends at its stamp; re-leasing it for the
                        // configured hour kept out the nodes it let in).
                        // At most the longest `set_leased` takes: the entry
                        // may be a peer's forgery naming us, and a span to
                        // `i64::MAX` put the rebased lease past what any
                        // peer decodes.
                        let span = current.lease_until.saturating_sub(current.stamp.millis());
                        at.saturating_add(span.min(MAX_SPAN_MS))
                    },
                    expires_at: if current.is_deleted() {
                        current.expires_at
                    } else if current.ttl_ms != 0 {
                        at.saturating_add(current.ttl_ms)
                    } else {
                        0
                    },
                    ..current
                };
                self.rebased.push((key.clone(), rebased.clone()));
                return Ok(self.put(key, rebased, now_ms));
            }
        }
        if !self.fits(old_size, &key, &entry) {
            return Err(Refused::Full);
        }
        Ok(self.put(key, entry, now_ms))
    }

    /// Writes re-issued by `apply` since the last call, to push.
    pub(crate) fn take_rebased(&mut self) -> Vec<(Bytes, Entry)> {
        std::mem::take(&mut self.rebased)
    }

    /// Twice the clock skew allowed: once that long after an instant by
    /// one replica's clock, it has passed on every replica's clock.
    fn two_skews(&self) -> u64 {
        self.cfg.max_skew_ms.saturating_mul(2)
    }

    fn collectable(&self, tombstone: &Entry, now_ms: u64) -> bool {
        self.collect_at(tombstone) <= now_ms
    }

    /// When `tombstone` may be forgotten. A delete's, after the grace
    /// period: until then an older value cannot come back. An expiry's (it
    /// keeps the expired entry's ttl, see [`expiry_tombstone`]; so does the
    /// delete of an own ephemeral key) one ttl plus twice the clock skew
    /// allowed after its stamp: every older version of the key (each
    /// expiring within a ttl of its own stamp) has expired by then on
    /// every replica's clock, and `apply` refuses entries expired that
    /// long, so nothing can bring the key back but a new write. Ephemeral keys of nodes that come and go
    /// (an RPC registry under churn) are then forgotten within seconds,
    /// not kept for the grace period.
    fn collect_at(&self, tombstone: &Entry) -> u64 {
        let grace = if tombstone.ttl_ms != 0 {
            tombstone
                .ttl_ms
                .saturating_add(self.two_skews())
                .min(self.cfg.tombstone_grace_ms)
        } else {
            self.cfg.tombstone_grace_ms
        };
        tombstone.stamp.millis().saturating_add(grace)
    }

    /// Stores `entry` (already known to win) and says what changed.
    fn put(&mut self, key: Bytes, entry: Entry, now_ms: u64) -> Vec<Change> {
        if entry.is_deleted() {
            self.deadlines
                .insert((self.collect_at(&entry), key.clone()));
        } else if entry.expires_at != 0 {
            self.deadlines.insert((entry.expires_at, key.clone()));
        }
        if self.cfg.leasing
            && !entry.is_deleted()
            && entry.lease_live(now_ms)
            && !self.lapse_due.contains(&key)
        {
            self.deadlines.insert((entry.lease_until, key.clone()));
            self.lapse_due.insert(key.clone());
        }
        let hash = entry.hash(&key);
        let size = stored_size(&key, &entry);
        let bucket = &mut self.buckets[bucket_of(&key)];
        let old = bucket.entries.insert(key.clone(), (entry.clone(), hash));
        bucket.hash ^= hash;
        self.root ^= hash;
        self.bytes += size;
        if let Some((old_entry, old_hash)) = &old {
            bucket.hash ^= old_hash;
            self.root ^= old_hash;
            self.bytes -= stored_size(&key, old_entry);
        } else {
            self.entries += 1;
            self.keys.insert(key.clone());
        }
        let mut changes = Vec::new();
        let old = old.map(|(e, _)| e);
        if let Some(old) = &old {
            // Our live lease, replaced by another node's claim (a rival
            // claim that won, seen after a partition or a race).
            if self.cfg.leasing
                && old.writer == self.me
                && entry.writer != self.me
                && !old.is_deleted()
                && old.lease_live(now_ms)
            {
                changes.push(Change {
                    key: key.clone(),
                    kind: ChangeKind::LeaseLost {
                        new_owner: entry.writer.clone(),
                    },
                    version: entry.stamp,
                    writer: entry.writer.clone(),
                });
            }
        }
        let was_live = old
            .as_ref()
            .is_some_and(|e| !e.is_deleted() && !e.expired(now_ms));
        let kind = match (&entry.value, entry.expired(now_ms)) {
            (Some(v), false) => Some(ChangeKind::Set(v.clone())),
            _ if was_live => Some(ChangeKind::Deleted),
            _ => None,
        };
        // A live lease given up while the value stays (a release): its
        // lapse is told now, not at the deadline it had.
        let released = self.cfg.leasing
            && was_live
            && !entry.is_deleted()
            && !entry.expired(now_ms)
            && !entry.lease_live(now_ms)
            && old.as_ref().is_some_and(|o| o.lease_live(now_ms));
        if released {
            self.lapse_due.remove(&key);
        }
        let lapsed = released.then(|| Change {
            key: key.clone(),
            kind: ChangeKind::LeaseLapsed {
                owner: entry.writer.clone(),
            },
            version: entry.stamp,
            writer: entry.writer.clone(),
        });
        if let Some(kind) = kind {
            changes.push(Change {
                key,
                kind,
                version: entry.stamp,
                writer: entry.writer,
            });
        }
        changes.extend(lapsed);
        changes
    }

    /// Housekeeping at `now_ms`: expired ephemeral entries become
    /// tombstones (the same tombstone on every node: stamped at the expiry,
    /// in the owner's claim), tombstones older than the grace period are
    /// collected, and leases that ran out are told
    /// ([`ChangeKind::LeaseLapsed`]).
    pub(crate) fn sweep(&mut self, now_ms: u64) -> Vec<Change> {
        let mut expired = Vec::new();
        let mut collect = Vec::new();
        let mut lapsed = Vec::new();
        while let Some((at, _)) = self.deadlines.first() {
            if *at > now_ms {
                break;
            }
            let Some((_, k)) = self.deadlines.pop_first() else {
                break;
            };
            if self.lapse_due.contains(&k) {
                // Still live and leased: renewed since, the lapse moves to
                // the lease's end; lapsed: told. Gone: nothing to tell.
                let lease = self
                    .entry(&k)
                    .filter(|e| !e.is_deleted() && !e.expired(now_ms))
                    .map(|e| (e.lease_until, e.stamp, e.writer.clone()));
                match lease {
                    Some((until, _, _)) if until > now_ms => {
                        self.deadlines.insert((until, k.clone()));
                    }
                    Some((_, stamp, owner)) => {
                        self.lapse_due.remove(&k);
                        lapsed.push(Change {
                            key: k.clone(),
                            kind: ChangeKind::LeaseLapsed {
                                owner: owner.clone(),
                            },
                            version: stamp,
                            writer: owner,
                        });
                    }
                    None => {
                        self.lapse_due.remove(&k);
                    }
                }
            }
            let Some(e) = self.entry(&k) else { continue };
            if e.is_deleted() {
                if self.collectable(e, now_ms) {
                    collect.push(k);
                }
            } else if e.expired(now_ms) {
                expired.push((k, e.clone()));
            }
        }
        let mut changes = Vec::new();
        for (k, e) in expired {
            let tombstone = expiry_tombstone(&e, self.cfg.leasing);
            self.put(k.clone(), tombstone.clone(), now_ms);
            changes.push(Change {
                key: k,
                kind: ChangeKind::Deleted,
                version: tombstone.stamp,
                writer: tombstone.writer,
            });
        }
        for k in collect {
            let bucket = &mut self.buckets[bucket_of(&k)];
            if let Some((e, hash)) = bucket.entries.remove(&k) {
                bucket.hash ^= hash;
                self.root ^= hash;
                self.bytes -= stored_size(&k, &e);
                self.entries -= 1;
                self.keys.remove(&k);
                self.lapse_due.remove(&k);
            }
        }
        changes.extend(lapsed);
        changes
    }

    /// This node's ephemeral keys to rewrite now: those a third or more
    /// through their time to live, and those that expired or were deleted
    /// while the node ran (another node swept them during a partition, and
    /// the sweep reached us after the heal). Keys another node has claimed
    /// since are given up.
    pub(crate) fn refresh_due(&mut self, now_ms: u64) -> Vec<(Bytes, Bytes, u64)> {
        // Refresh by the fastest clock heard from, so that a node whose
        // clock runs ahead does not see our keys expire between refreshes.
        let now_ms = self.fastest_clock(now_ms);
        let mut due = Vec::new();
        let mut lost = Vec::new();
        for (k, (v, ttl)) in &self.own_ephemeral {
            let e = self.buckets[bucket_of(k)].entries.get(k).map(|(e, _)| e);
            match e {
                Some(e) if e.writer != self.me && (!e.is_deleted() || e.lease_live(now_ms)) => {
                    lost.push(k.clone());
                }
                Some(e) if e.writer == self.me && !e.is_deleted() && !e.expired(now_ms) => {
                    let left = e.expires_at.saturating_sub(now_ms);
                    if left.saturating_mul(3) <= e.ttl_ms.saturating_mul(2) {
                        due.push((k.clone(), v.clone(), *ttl));
                    }
                }
                _ => due.push((k.clone(), v.clone(), *ttl)),
            }
        }
        for k in lost {
            self.own_ephemeral.remove(&k);
        }
        due
    }

    /// What the fastest clock heard from reads when ours reads `now_ms`:
    /// ephemeral keys are timed by it, so that they do not expire early on
    /// a node whose clock runs ahead.
    fn fastest_clock(&self, now_ms: u64) -> u64 {
        now_ms.saturating_add(self.hlc.ahead(now_ms))
    }

    /// Stops keeping `key` alive (another node holds it now).
    pub(crate) fn forget_ephemeral(&mut self, key: &[u8]) {
        self.own_ephemeral.remove(key);
    }

    /// Ends this node's live ephemeral keys, for a node stopping cleanly:
    /// each is deleted as its owner deletes it (an early expiry, see
    /// `write`), and none is kept alive any more. Returns the tombstones
    /// written (to send to the mesh) and the changes. Keys another node
    /// holds now, or that are gone already, are only forgotten.
    pub(crate) fn end_own_ephemeral(&mut self, now_ms: u64) -> (Vec<(Bytes, Entry)>, Vec<Change>) {
        let mut keys: Vec<Bytes> = self.own_ephemeral.drain().map(|(k, _)| k).collect();
        // In key order: the same writes whatever the map's order.
        keys.sort();
        let mut written = Vec::new();
        let mut changes = Vec::new();
        for key in keys {
            if self.get(&key, now_ms).is_none_or(|e| e.writer != self.me) {
                continue;
            }
            if let Ok((entry, c)) = self.write(key.clone(), None, Write::Delete, now_ms) {
                written.push((key, entry));
                changes.extend(c);
            }
        }
        (written, changes)
    }

    /// Entries of `buckets` (ascending) after `after`, at most
    /// `max_entries` or about `max_bytes`; with the position to resume at
    /// when more remain.
    pub(crate) fn chunk(
        &self,
        buckets: &[u32],
        after: Option<Cursor>,
        max_entries: usize,
        max_bytes: usize,
    ) -> (Vec<(Bytes, Entry)>, Option<Cursor>) {
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut last = None;
        for &b in buckets {
            let Some(bucket) = self.buckets.get(b as usize) else {
                continue;
            };
            let range = match &after {
                Some((ab, _)) if b < *ab => continue,
                Some((ab, k)) if b == *ab => bucket
                    .entries
                    .range::<Bytes, _>((Bound::Excluded(k.clone()), Bound::Unbounded)),
                _ => bucket.entries.range::<Bytes, _>(..),
            };
            for (k, (e, _)) in range {
                if out.len() >= max_entries || (bytes >= max_bytes && !out.is_empty()) {
                    return (out, last);
                }
                bytes += k.len() + e.value.as_ref().map_or(0, |v| v.len()) + 64;
                out.push((k.clone(), e.clone()));
                last = Some((b, k.clone()));
            }
        }
        (out, None)
    }

    /// The hashes of the entries in `buckets`, by key.
    pub(crate) fn hashes_in(&self, buckets: &[u32]) -> Vec<(Bytes, u64)> {
        buckets
            .iter()
            .filter_map(|b| self.buckets.get(*b as usize))
            .flat_map(|b| b.entries.iter().map(|(k, (_, h))| (k.clone(), *h)))
            .collect()
    }
}

#[cfg(test)]
mod tests;
