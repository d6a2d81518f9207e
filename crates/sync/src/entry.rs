//! One replicated entry and the rule that decides between two of them.
//!
//! The merge of two entries for the same key is `max` under a total order
//! ([`Entry::beats`]), so it is commutative, associative and idempotent by
//! construction: replicas that have seen the same writes, in any order and
//! any number of times, hold the same entry for every key.

use std::cmp::Ordering;

use bytes::Bytes;
use meshwork_concerns::wire::NodeId;
use sha2::{Digest, Sha256};

use crate::Stamp;
use crate::proto;

/// The largest lease epoch accepted from a peer. Honest epochs count the
/// claims of one key (one per lapsed or released lease) and never come near;
/// refusing larger ones leaves 2^62 local claims of headroom, so the next
/// epoch (`epoch + 1`) of a received entry never reaches `u64::MAX`.
pub(crate) const MAX_EPOCH: u64 = 1 << 62;

/// The longest time to live (and lease) in ms, about 146 million years:
/// accepted from peers, and what longer local settings are cut to. Any
/// stamp's time (at most 2^48 ms) plus this stays within the range of
/// times the wire carries (`i64` ms), so `at + ttl_ms` cannot overflow.
pub(crate) const MAX_SPAN_MS: u64 = 1 << 62;

/// The latest write to a key that a replica knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value; `None` for a tombstone (a delete).
    pub value: Option<Bytes>,
    /// The write's hybrid logical clock stamp; also its version.
    pub stamp: Stamp,
    /// Who wrote it; with leasing on, the lease owner.
    pub writer: NodeId,
    /// The lease epoch: 1 for the first claim of a key, one more for each
    /// claim that followed a lapsed or released lease; 0 with leasing off.
    pub epoch: u64,
    /// The stamp of the write that began the writer's current claim.
    pub claim: Stamp,
    /// When the lease lapses, in ms since the Unix epoch (0: no lease).
    pub lease_until: u64,
    /// When an ephemeral entry expires unless refreshed (0: never).
    pub expires_at: u64,
    /// The time to live an ephemeral entry is refreshed with, in ms.
    pub ttl_ms: u64,
}

impl Entry {
    /// True for a tombstone.
    pub fn is_deleted(&self) -> bool {
        self.value.is_none()
    }

    /// True if the lease is live at `now_ms`.
    pub fn lease_live(&self, now_ms: u64) -> bool {
        self.lease_until > now_ms
    }

    /// True if this ephemeral entry has expired at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_at != 0 && self.expires_at <= now_ms
    }

    /// True if `self` wins over `other` (an entry for the same key).
    ///
    /// With leasing on, a later lease epoch wins; within an epoch the claim
    /// that began first wins (then the smaller writer id), so concurrent
    /// claims of an open key resolve to the same owner everywhere; within
    /// one claim, the owner's later write wins. With leasing off, the later
    /// stamp wins, then the larger writer id. Remaining ties (the same
    /// writer and stamp, e.g. after a node lost its state) are broken on the
    /// other fields so that the order is total.
    pub fn beats(&self, other: &Entry, leasing: bool) -> bool {
        self.cmp_rank(other, leasing) == Ordering::Greater
    }

    fn cmp_rank(&self, o: &Entry, leasing: bool) -> Ordering {
        let primary = if leasing {
            self.epoch
                .cmp(&o.epoch)
                .then_with(|| o.claim.cmp(&self.claim))
                .then_with(|| o.writer.cmp(&self.writer))
                .then_with(|| self.stamp.cmp(&o.stamp))
        } else {
            self.stamp
                .cmp(&o.stamp)
                .then_with(|| self.writer.cmp(&o.writer))
        };
        primary
            .then_with(|| self.is_deleted().cmp(&o.is_deleted()))
            .then_with(|| self.value.cmp(&o.value))
            .then_with(|| self.lease_until.cmp(&o.lease_until))
            .then_with(|| self.expires_at.cmp(&o.expires_at))
            .then_with(|| self.ttl_ms.cmp(&o.ttl_ms))
            .then_with(|| self.epoch.cmp(&o.epoch))
            .then_with(|| self.claim.cmp(&o.claim))
            .then_with(|| self.writer.cmp(&o.writer))
    }

    /// A stable 64-bit hash of the entry with its key, for digests.
    pub(crate) fn hash(&self, key: &[u8]) -> u64 {
        let mut h = Sha256::new();
        h.update((key.len() as u64).to_be_bytes());
        h.update(key);
        match &self.value {
            Some(v) => {
                h.update([1]);
                h.update((v.len() as u64).to_be_bytes());
                h.update(v);
            }
            None => h.update([0]),
        }
        h.update(self.stamp.as_u64().to_be_bytes());
        h.update((self.writer.as_bytes().len() as u64).to_be_bytes());
        h.update(self.writer.as_bytes());
        for n in [
            self.epoch,
            self.claim.as_u64(),
            self.lease_until,
            self.expires_at,
            self.ttl_ms,
        ] {
            h.update(n.to_be_bytes());
        }
        let out = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&out[..8]);
        u64::from_be_bytes(first)
    }

    /// The wire form; the writer is left out when it is `sender`.
    pub(crate) fn to_proto(&self, key: &Bytes, sender: &NodeId) -> proto::Entry {
        proto::Entry {
            key: key.clone(),
            value: self.value.clone().unwrap_or_default(),
            deleted: self.value.is_none(),
            stamp: self.stamp.as_u64(),
            writer: if &self.writer == sender {
                Bytes::new()
            } else {
                self.writer.as_bytes().clone()
            },
            epoch: self.epoch,
            claim_delta: self.stamp.as_u64().wrapping_sub(self.claim.as_u64()),
            lease_delta: (self.lease_until as i64).wrapping_sub(self.stamp.millis() as i64),
            no_lease: self.lease_until == 0,
            expires_delta: if self.ttl_ms == 0 {
                0
            } else {
                (self.expires_at as i64).wrapping_sub(self.stamp.millis() as i64)
            },
            ttl_ms: self.ttl_ms,
        }
    }

    /// From the wire form; an empty writer is `sender`.
    pub(crate) fn from_proto(
        p: proto::Entry,
        sender: &NodeId,
        max_key: usize,
        max_value: usize,
    ) -> Result<(Bytes, Entry), String> {
        if p.key.is_empty() {
            return Err("empty key".into());
        }
        if p.key.len() > max_key {
            return Err(format!("key of {} bytes (limit {max_key})", p.key.len()));
        }
        if p.value.len() > max_value {
            return Err(format!(
                "value of {} bytes (limit {max_value})",
                p.value.len()
            ));
        }
        if p.deleted && !p.value.is_empty() {
            return Err("a tombstone with a value".into());
        }
        if p.epoch > MAX_EPOCH {
            return Err(format!("lease epoch {} (limit {MAX_EPOCH})", p.epoch));
        }
        if p.ttl_ms > MAX_SPAN_MS {
            return Err(format!("ttl of {} ms (limit {MAX_SPAN_MS})", p.ttl_ms));
        }
        let stamp = Stamp::from_u64(p.stamp);
        let claim = p
            .stamp
            .checked_sub(p.claim_delta)
            .ok_or("claim after the stamp")?;
        let at = |delta: i64| {
            (stamp.millis() as i64)
                .checked_add(delta)
                .filter(|t| *t > 0)
                .map(|t| t as u64)
                .ok_or("time out of range")
        };
        let lease_until = if p.no_lease { 0 } else { at(p.lease_delta)? };
        let expires_at = if p.ttl_ms == 0 {
            if p.expires_delta != 0 {
                return Err("an expiry without a ttl".into());
            }
            0
        } else {
            at(p.expires_delta)?
        };
        let writer = if p.writer.is_empty() {
            sender.clone()
        } else {
            NodeId::from_bytes(p.writer).map_err(|e| e.to_string())?
        };
        // Copied: decoded, they are slices of the received frame, and a
        // stored slice keeps the whole frame (up to 16 MiB) alive with it.
        Ok((
            Bytes::copy_from_slice(&p.key),
            Entry {
                value: if p.deleted {
                    None
                } else {
                    Some(Bytes::copy_from_slice(&p.value))
                },
                stamp,
                writer,
                epoch: p.epoch,
                claim: Stamp::from_u64(claim),
                lease_until,
                expires_at,
                ttl_ms: p.ttl_ms,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_received_entry_does_not_keep_its_frame() {
        let frame = Bytes::from(vec![5u8; 1 << 20]);
        let p = proto::Entry {
            key: frame.slice(10..20),
            value: frame.slice(20..120),
            stamp: Stamp::new(1_000_000, 0).as_u64(),
            ..Default::default()
        };
        let (key, e) = Entry::from_proto(p, &id(1), 64, 1024).unwrap();
        let inside = |b: &Bytes| {
            let start = frame.as_ptr() as usize;
            (start..start + frame.len()).contains(&(b.as_ptr() as usize))
        };
        assert!(!inside(&key), "the key points into the frame");
        assert!(
            !inside(e.value.as_ref().unwrap()),
            "the value points into the frame"
        );
        assert_eq!(
            (key, e.value.unwrap()),
            (frame.slice(10..20), frame.slice(20..120))
        );
    }

    fn id(n: u8) -> NodeId {
        NodeId::from_bytes(vec![n; 32]).unwrap()
    }

    fn entry(writer: u8, stamp: u64, epoch: u64, claim: u64) -> Entry {
        Entry {
            value: Some(Bytes::from(format!("{writer}@{stamp}"))),
            stamp: Stamp::new(stamp, 0),
            writer: id(writer),
            epoch,
            claim: Stamp::new(claim, 0),
            lease_until: stamp + 1000,
            expires_at: 0,
            ttl_ms: 0,
        }
    }

    #[test]
    fn leasing_on_higher_epoch_then_earliest_claim_then_later_write() {
        let first_claim = entry(2, 100, 1, 100);
        let rival_claim = entry(1, 150, 1, 150);
        assert!(first_claim.beats(&rival_claim, true));
        assert!(!rival_claim.beats(&first_claim, true));
        // The owner's later write within its claim wins over its earlier one.
        let renewal = entry(2, 300, 1, 100);
        assert!(renewal.beats(&first_claim, true));
        // A claim after the lease lapsed has the next epoch and wins over all.
        let successor = entry(1, 2000, 2, 2000);
        assert!(successor.beats(&renewal, true));
        // Same claim stamp on two nodes: the smaller writer id wins.
        assert!(entry(1, 100, 1, 100).beats(&entry(2, 100, 1, 100), true));
    }

    #[test]
    fn leasing_off_last_writer_wins() {
        let a = entry(2, 100, 0, 0);
        let b = entry(1, 150, 0, 0);
        assert!(b.beats(&a, false));
        assert!(entry(2, 100, 0, 0).beats(&entry(1, 100, 0, 0), false));
    }

    #[test]
    fn the_order_is_total_and_irreflexive() {
        let a = entry(1, 100, 1, 100);
        assert!(!a.beats(&a, true));
        let mut b = a.clone();
        b.value = Some(Bytes::from_static(b"other"));
        assert!(a.beats(&b, true) != b.beats(&a, true));
    }

    #[test]
    fn wire_form_round_trips_and_elides_the_sender() {
        let e = entry(3, 100, 1, 100);
        let key = Bytes::from_static(b"k");
        let p = e.to_proto(&key, &id(3));
        assert!(p.writer.is_empty());
        let (k, back) = Entry::from_proto(p, &id(3), 1024, 1024).unwrap();
        assert_eq!((k, back), (key.clone(), e.clone()));
        let p = e.to_proto(&key, &id(9));
        assert_eq!(p.writer.len(), 32);
        let (_, back) = Entry::from_proto(p, &id(9), 1024, 1024).unwrap();
        assert_eq!(back.writer, id(3));
    }

    #[test]
    fn bad_wire_entries_are_errors() {
        let e = entry(3, 100, 1, 100);
        let mut p = e.to_proto(&Bytes::from_static(b"k"), &id(3));
        p.key = Bytes::new();
        assert!(Entry::from_proto(p.clone(), &id(3), 8, 8).is_err());
        p.key = Bytes::from_static(b"123456789");
        assert!(Entry::from_proto(p.clone(), &id(3), 8, 64).is_err());
        p.key = Bytes::from_static(b"k");
        p.deleted = true;
        assert!(Entry::from_proto(p, &id(3), 8, 64).is_err());
    }

    #[test]
    fn epochs_and_ttls_past_their_limits_are_refused() {
        let key = Bytes::from_static(b"k");
        let mut e = entry(3, 100, MAX_EPOCH, 100);
        e.ttl_ms = MAX_SPAN_MS;
        e.expires_at = 100 + MAX_SPAN_MS;
        assert!(Entry::from_proto(e.to_proto(&key, &id(3)), &id(3), 8, 8).is_ok());
        // A peer's epoch at u64::MAX would make the next claim overflow.
        let mut p = entry(3, 100, u64::MAX, 100).to_proto(&key, &id(3));
        assert!(Entry::from_proto(p.clone(), &id(3), 8, 8).is_err());
        p.epoch = MAX_EPOCH + 1;
        assert!(Entry::from_proto(p, &id(3), 8, 8).is_err());
        // A ttl of u64::MAX would overflow `at + ttl_ms`.
        let mut p = e.to_proto(&key, &id(3));
        p.epoch = 1;
        p.ttl_ms = u64::MAX;
        assert!(Entry::from_proto(p, &id(3), 8, 8).is_err());
    }
}
