#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use super::*;

const LEASE: u64 = 60_000;

fn id(n: u8) -> NodeId {
    NodeId::from_bytes(vec![n; 32]).unwrap()
}

fn replica(n: u8, leasing: bool) -> Replica {
    budgeted(n, leasing, usize::MAX)
}

fn budgeted(n: u8, leasing: bool, max_bytes: usize) -> Replica {
    Replica::new(
        id(n),
        ReplicaConfig {
            leasing,
            lease_ms: LEASE,
            tombstone_grace_ms: 600_000,
            max_skew_ms: 60_000,
            max_bytes,
        },
    )
}

fn k(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn ephemeral(r: &mut Replica, key: &str, value: &str, ttl_ms: u64, now: u64) -> Entry {
    r.write(k(key), Some(k(value)), Write::Ephemeral { ttl_ms }, now)
        .unwrap()
        .0
}

fn set(r: &mut Replica, key: &str, value: &str, now: u64) -> Result<Entry, SyncError> {
    r.write(k(key), Some(k(value)), Write::Set, now)
        .map(|(e, _)| e)
}

#[test]
fn a_live_lease_refuses_other_writers_and_lapses_by_the_writers_stamp() {
    let mut a = replica(1, true);
    let mut b = replica(2, true);
    let e = set(&mut a, "k", "a1", 1_000).unwrap();
    assert_eq!((e.epoch, e.lease_until), (1, 1_000 + LEASE));
    b.apply(k("k"), e, 1_000).unwrap();

    match set(&mut b, "k", "b1", 30_000) {
        Err(SyncError::LeaseHeld {
            owner, until_ms, ..
        }) => {
            assert_eq!(owner, id(1));
            assert_eq!(until_ms, 1_000 + LEASE);
        }
        other => panic!("expected LeaseHeld, got {other:?}"),
    }
    // The owner writes on; its claim and epoch stay, its lease is renewed.
    let e2 = set(&mut a, "k", "a2", 40_000).unwrap();
    assert_eq!((e2.epoch, e2.claim), (1, Stamp::new(1_000, 0)));
    assert_eq!(e2.lease_until, 40_000 + LEASE);
    b.apply(k("k"), e2, 40_000).unwrap();
    // Past the first lease, but not the renewed one.
    assert!(set(&mut b, "k", "b2", 1_000 + LEASE + 1).is_err());
    // Past the renewed one: b claims the next epoch.
    let e3 = set(&mut b, "k", "b3", 40_000 + LEASE).unwrap();
    assert_eq!((e3.epoch, e3.writer.clone()), (2, id(2)));
    let changes = a.apply(k("k"), e3, 40_000 + LEASE).unwrap();
    assert_eq!(a.get(b"k", 40_000 + LEASE).unwrap().value, Some(k("b3")));
    // a's lease had lapsed: a plain change, not a lost lease.
    assert!(
        changes
            .iter()
            .all(|c| !matches!(c.kind, ChangeKind::LeaseLost { .. }))
    );
}

#[test]
fn a_release_opens_the_key_at_once() {
    let mut a = replica(1, true);
    let mut b = replica(2, true);
    b.apply(k("k"), set(&mut a, "k", "a", 1_000).unwrap(), 1_000)
        .unwrap();
    let (released, _) = a.write(k("k"), None, Write::Release, 2_000).unwrap();
    assert_eq!(released.value, Some(k("a")), "the value stays");
    b.apply(k("k"), released, 2_000).unwrap();
    assert!(b.lease(b"k", 2_001).is_none());
    let e = set(&mut b, "k", "b", 2_001).unwrap();
    assert_eq!(e.epoch, 2);
    // Releasing an open key changes nothing.
    let root = a.root();
    let (same, changes) = a.write(k("k"), None, Write::Release, 2_500).unwrap();
    assert!(changes.is_empty());
    assert_eq!((same.epoch, a.root()), (1, root));
    // Releasing someone else's key is refused; an absent key is NotFound.
    a.apply(k("k"), e, 2_001).unwrap();
    assert!(matches!(
        a.write(k("k"), None, Write::Release, 2_500),
        Err(SyncError::LeaseHeld { .. })
    ));
    assert!(matches!(
        a.write(k("nothing"), None, Write::Release, 2_500),
        Err(SyncError::NotFound(_))
    ));
}

#[test]
fn concurrent_claims_resolve_to_the_earliest_and_the_loser_hears_of_it() {
    let mut a = replica(1, true);
    let mut b = replica(2, true);
    // Neither has seen the other's claim (a partition).
    let ea = set(&mut a, "k", "a", 5_000).unwrap();
    let eb = set(&mut b, "k", "b", 4_000).unwrap();
    let lost = a.apply(k("k"), eb.clone(), 5_001).unwrap();
    assert!(
        lost.iter()
            .any(|c| matches!(&c.kind, ChangeKind::LeaseLost { new_owner } if *new_owner == id(2)))
    );
    assert!(b.apply(k("k"), ea, 5_001).unwrap().is_empty());
    assert_eq!(a.entry(b"k"), b.entry(b"k"));
    assert_eq!(a.root(), b.root());
    assert_eq!(a.lease(b"k", 5_002).unwrap().owner, id(2));
}

#[test]
fn clock_skew_cannot_steal_a_lease_or_drag_the_clock_forward() {
    let mut a = replica(1, true);
    let mut b = replica(2, true);
    // b's wall clock is 10 s behind a's. a writes at its 100 000.
    let e = set(&mut a, "k", "a", 100_000).unwrap();
    b.apply(k("k"), e, 90_000).unwrap();
    // b's next stamp is after a's, though its wall clock is behind.
    let other = set(&mut b, "other", "x", 90_001).unwrap();
    assert!(other.stamp > Stamp::new(100_000, 0));
    // The lease is judged by b's write's stamp (at least a's), so b still
    // cannot write before a's lease lapses by that stamp.
    assert!(set(&mut b, "k", "b", 90_000 + LEASE).is_err());
    assert!(set(&mut b, "k", "b", 100_000 + LEASE).is_ok());
    // A stamp more than the allowed skew ahead is refused.
    let mut far = replica(3, true);
    let e = set(&mut far, "f", "x", 200_000).unwrap();
    assert!(a.apply(k("f"), e, 100_000).is_err());
    assert!(a.entry(b"f").is_none());
}

#[test]
fn same_millisecond_writes_are_ordered_by_stamp_not_by_node_id() {
    // py2p judged leases in whole seconds of the sender's clock; here two
    // writes in the same millisecond are still ordered by their stamps.
    let mut a = replica(9, false);
    let mut b = replica(1, false);
    let first = set(&mut a, "k", "first", 1_000).unwrap();
    b.apply(k("k"), first, 1_000).unwrap();
    let second = set(&mut b, "k", "second", 1_000).unwrap();
    assert!(second.stamp > Stamp::new(1_000, 0));
    a.apply(k("k"), second, 1_000).unwrap();
    assert_eq!(a.get(b"k", 1_000).unwrap().value, Some(k("second")));
    assert_eq!(a.root(), b.root());
}

#[test]
fn deletes_win_over_older_values_and_are_collected_after_the_grace() {
    let mut a = replica(1, true);
    let mut b = replica(2, true);
    let v = set(&mut a, "k", "v", 1_000).unwrap();
    b.apply(k("k"), v.clone(), 1_000).unwrap();
    let (tomb, changes) = a.write(k("k"), None, Write::Delete, 2_000).unwrap();
    assert!(matches!(changes[0].kind, ChangeKind::Deleted));
    assert!(a.get(b"k", 2_000).is_none());
    // b reconnects still holding the old value: it does not come back.
    assert!(a.apply(k("k"), v.clone(), 2_001).unwrap().is_empty());
    b.apply(k("k"), tomb.clone(), 2_001).unwrap();
    assert!(b.get(b"k", 2_001).is_none());
    assert_eq!(a.root(), b.root());
    // After the grace period the tombstone is collected, and an old copy of
    // it is not taken back.
    a.sweep(2_000 + 600_000);
    assert!(a.entry(b"k").is_none());
    assert_eq!(a.entries(), 0);
    assert!(a.apply(k("k"), tomb, 2_000 + 600_001).unwrap().is_empty());
    assert_eq!(a.root(), 0);
}

#[test]
fn ephemeral_entries_expire_into_the_same_tombstone_everywhere() {
    let mut a = replica(1, true);
    let mut b = replica(2, true);
    let e = ephemeral(&mut a, "svc", "up", 3_000, 1_000);
    assert_eq!((e.expires_at, e.lease_until), (4_000, 4_000));
    b.apply(k("svc"), e, 1_000).unwrap();
    // Refresh falls due a third of the way through.
    assert!(a.refresh_due(1_500).is_empty());
    assert_eq!(a.refresh_due(2_000).len(), 1);
    assert!(b.refresh_due(2_000).is_empty(), "only the owner refreshes");
    // Expired: hidden at once, then swept into a tombstone.
    assert!(b.get(b"svc", 4_000).is_none());
    let changes = b.sweep(4_100);
    assert!(matches!(changes[0].kind, ChangeKind::Deleted));
    a.sweep(4_500);
    assert_eq!(a.root(), b.root(), "both made the same tombstone");
    // Another node that has seen the expiry may claim it now (next epoch).
    let mut c = replica(3, true);
    c.apply(k("svc"), b.entry(b"svc").unwrap().clone(), 4_600)
        .unwrap();
    let claim = set(&mut c, "svc", "new", 5_000).unwrap();
    assert_eq!(claim.epoch, 2);
    b.apply(k("svc"), claim, 5_000).unwrap();
    assert_eq!(b.get(b"svc", 5_000).unwrap().writer, id(3));
}

/// One entry stamped ahead (within the allowed skew) must not make an
/// owner rewrite its ephemeral keys at every sweep: refreshes stay at one
/// per third of the ttl, measured by the fastest clock heard from.
#[test]
fn an_entry_stamped_ahead_does_not_make_refreshes_run_hot() {
    let mut a = replica(1, true);
    let mut other = replica(2, true);
    let ttl = 10_000;
    ephemeral(&mut a, "svc", "up", ttl, 1_000);
    // 59 s ahead of a's clock.
    let ahead = set(&mut other, "x", "y", 60_000).unwrap();
    a.apply(k("x"), ahead, 1_000).unwrap();
    // Five minutes of sweeps every 250 ms, rewriting whatever is due.
    let mut rewrites = 0;
    for tick in 1..=1_200u64 {
        let now = 1_000 + tick * 250;
        for (key, value, ttl) in a.refresh_due(now) {
            a.write(key, Some(value), Write::Ephemeral { ttl_ms: ttl }, now)
                .unwrap();
            rewrites += 1;
        }
        let e = a.entry(b"svc").unwrap();
        assert!(!e.expired(now + a.hlc.ahead(now)), "expired at {now}");
    }
    // A third of 10 s: at most about 90 in 300 s (fewer while the lead
    // decays, as keys were written to last longer); every sweep would be
    // 1 200.
    assert!((30..=100).contains(&rewrites), "{rewrites} rewrites");
}

#[test]
fn an_owner_brings_back_its_ephemeral_key_after_an_expiry_it_did_not_see() {
    let mut a = replica(1, true);
    let mut b = replica(2, true);
    let e = ephemeral(&mut a, "svc", "up", 3_000, 1_000);
    b.apply(k("svc"), e, 1_000).unwrap();
    // Cut off: a refreshes at 2 000 but b never hears of it, and expires the
    // key into a tombstone at 4 000.
    let due = a.refresh_due(2_000);
    assert_eq!(due.len(), 1);
    ephemeral(&mut a, "svc", "up", 3_000, 2_000);
    b.sweep(4_100);
    let tomb = b.entry(b"svc").unwrap().clone();
    assert!(tomb.is_deleted());
    // The heal: the tombstone (stamped at 4 000) beats a's refresh (2 000).
    a.apply(k("svc"), tomb, 4_200).unwrap();
    assert!(a.get(b"svc", 4_200).is_none());
    // a is alive and still wants its key: it is due at once, and the
    // rewrite is a new claim that wins everywhere.
    let due = a.refresh_due(4_300);
    assert_eq!(due, vec![(k("svc"), k("up"), 3_000)]);
    let back = ephemeral(&mut a, "svc", "up", 3_000, 4_300);
    assert_eq!(back.epoch, 2);
    b.apply(k("svc"), back, 4_300).unwrap();
    assert_eq!(b.get(b"svc", 4_300).unwrap().writer, id(1));
    assert_eq!(a.root(), b.root());
    // A key another node claims after a lapse is given up, and a delete
    // by the owner stops the refreshing.
    let mut c = replica(3, true);
    c.apply(k("svc"), b.entry(b"svc").unwrap().clone(), 8_000)
        .unwrap();
    c.sweep(8_000);
    let taken = set(&mut c, "svc", "mine", 8_001).unwrap();
    a.apply(k("svc"), taken, 8_001).unwrap();
    assert!(a.refresh_due(8_002).is_empty());
    assert!(a.refresh_due(20_000).is_empty());
    let mut d = replica(4, true);
    ephemeral(&mut d, "x", "v", 1_000, 0);
    d.write(k("x"), None, Write::Delete, 10).unwrap();
    assert!(d.refresh_due(5_000).is_empty());
}

/// A write with a lease of its own keeps that lease when a restart's
/// rebase re-issues it (it used to take the configured one).
#[test]
fn a_rebased_write_keeps_its_own_lease() {
    let mut before = replica(1, true);
    let old = set(&mut before, "k", "old", 1_000).unwrap();
    let mut after = replica(1, true);
    let lease = Write::SetLeased { lease_ms: 2_000 };
    let new = after.write(k("k"), Some(k("new")), lease, 5_000).unwrap().0;
    assert_eq!(new.lease_until, 7_000);
    after.apply(k("k"), old, 5_001).unwrap();
    let (_, e) = &after.take_rebased()[0];
    assert_eq!(e.value, Some(k("new")));
    assert_eq!(e.lease_until, e.stamp.millis() + 2_000);
}

#[test]
fn a_restarted_node_keeps_its_new_write_over_its_previous_runs_claim() {
    let mut b = replica(2, true);
    let mut before = replica(1, true);
    let old = set(&mut before, "k", "old", 1_000).unwrap();
    b.apply(k("k"), old.clone(), 1_000).unwrap();
    // Node 1 restarts with the same id and an empty replica, and writes.
    let mut after = replica(1, true);
    let new = set(&mut after, "k", "new", 5_000).unwrap();
    // The mesh's copy of the previous claim beats the new one (earlier
    // claim), but the node re-issues its write in that claim.
    assert!(old.beats(&new, true));
    after.apply(k("k"), old, 5_001).unwrap();
    let rebased = after.take_rebased();
    assert_eq!(rebased.len(), 1);
    let (_, e) = &rebased[0];
    assert_eq!(e.value, Some(k("new")));
    assert_eq!((e.epoch, e.claim), (1, Stamp::new(1_000, 0)));
    assert!(after.take_rebased().is_empty());
    b.apply(k("k"), new, 5_001).unwrap();
    b.apply(k("k"), e.clone(), 5_002).unwrap();
    assert_eq!(b.get(b"k", 5_002).unwrap().value, Some(k("new")));
    assert_eq!(after.root(), b.root());
}

/// The key changed hands before the restart (released, claimed again: epoch
/// 2), so the restarted node's first write (epoch 1) loses to its own older
/// entry on the epoch alone: it is re-issued over that entry all the same,
/// in its claim while the lease is live, as the next claim once it lapsed.
#[test]
fn a_restarted_nodes_write_is_rebased_over_its_own_entry_of_a_later_epoch() {
    let mut before = replica(1, true);
    set(&mut before, "k", "first", 1_000).unwrap();
    before.write(k("k"), None, Write::Release, 1_001).unwrap();
    let old = set(&mut before, "k", "old", 1_002).unwrap();
    assert_eq!(old.epoch, 2);

    // Restarted while the lease is live: rebased in the old claim.
    let mut after = replica(1, true);
    let new = set(&mut after, "k", "new", 5_000).unwrap();
    assert_eq!(new.epoch, 1);
    assert!(old.beats(&new, true));
    after.apply(k("k"), old.clone(), 5_001).unwrap();
    let rebased = after.take_rebased();
    assert_eq!(rebased.len(), 1, "the new write was silently replaced");
    let (_, e) = &rebased[0];
    assert_eq!(e.value, Some(k("new")));
    assert_eq!((e.epoch, e.claim), (2, old.claim));
    assert!(e.stamp > new.stamp);
    assert_eq!(after.get(b"k", 5_001).unwrap().value, Some(k("new")));

    // Restarted after the lease lapsed: rebased as the next claim.
    let late = 1_002 + LEASE + 10_000;
    let mut after = replica(1, true);
    set(&mut after, "k", "new", late).unwrap();
    after.apply(k("k"), old.clone(), late + 1).unwrap();
    let (_, e) = &after.take_rebased()[0];
    assert_eq!(e.value, Some(k("new")));
    assert_eq!((e.epoch, e.claim), (3, e.stamp));
    // Everywhere the same: it beats both older entries.
    assert!(e.beats(&old, true));
}

#[test]
fn chunks_resume_where_they_stopped_and_cover_every_entry_once() {
    let mut a = replica(1, false);
    for i in 0..500 {
        set(&mut a, &format!("key-{i}"), "v", 1_000 + i).unwrap();
    }
    let all: Vec<u32> = (0..BUCKETS as u32).collect();
    let mut seen = Vec::new();
    let mut after = None;
    let mut chunks = 0;
    loop {
        let (entries, next) = a.chunk(&all, after, 37, usize::MAX);
        assert!(entries.len() <= 37);
        seen.extend(entries.into_iter().map(|(k, _)| k));
        chunks += 1;
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(chunks, 500usize.div_ceil(37));
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 500);
    // A byte budget cuts chunks too, but always makes progress.
    let (entries, next) = a.chunk(&all, None, 1000, 1);
    assert_eq!(entries.len(), 1);
    assert!(next.is_some());
}

#[test]
fn prefix_queries_see_live_keys_in_order_and_forget_collected_ones() {
    let mut a = replica(1, false);
    for k in ["b/2", "a/1", "b/1", "c", "b", "b/3"] {
        set(&mut a, k, "v", 1_000).unwrap();
    }
    a.write(k("b/3"), None, Write::Delete, 1_001).unwrap();
    let got: Vec<&Bytes> = a.live_prefixed(b"b/", 1_002).map(|(k, _)| k).collect();
    assert_eq!(got, vec![&k("b/1"), &k("b/2")]);
    assert_eq!(a.live_prefixed(b"", 1_002).count(), 5);
    assert_eq!(a.live_prefixed(b"zz", 1_002).count(), 0);
    a.sweep(1_001 + 600_000);
    assert_eq!(a.entries(), 5);
    assert_eq!(a.live_prefixed(b"b", 1_002 + 600_000).count(), 3);
}

#[test]
fn sizes_of_keys_in_buckets_and_hashes_agree() {
    let mut a = replica(1, false);
    for i in 0..100 {
        set(&mut a, &format!("k{i}"), "v", 1_000).unwrap();
    }
    let all: Vec<u32> = (0..BUCKETS as u32).collect();
    assert_eq!(a.hashes_in(&all).len(), 100);
    let xor = a.bucket_hashes().iter().fold(0, |x, h| x ^ h);
    assert_eq!(xor, a.root());
}

// Property: any order and any duplication of the same writes gives the
// same replica, with leasing on and off.

#[derive(Debug, Clone)]
struct Op {
    writer: u8,
    key: u8,
    at: u64,
    what: u8,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        (1u8..5, 0u8..4, 0u64..200_000, 0u8..6).prop_map(|(writer, key, at, what)| Op {
            writer,
            key,
            at,
            what,
        }),
        1..40,
    )
}

/// Plays `ops` on per-writer replicas that exchange everything they write
/// only sometimes (`share`), so claims are concurrent; returns every entry
/// written.
fn history(ops: &[Op], leasing: bool, share: &[bool]) -> Vec<(Bytes, Entry)> {
    let mut writers: Vec<Replica> = (1..5).map(|n| replica(n, leasing)).collect();
    let mut written = Vec::new();
    let mut ops = ops.to_vec();
    ops.sort_by_key(|o| o.at);
    for (i, op) in ops.iter().enumerate() {
        let r = &mut writers[op.writer as usize - 1];
        let key = Bytes::from(vec![b'k', op.key]);
        let what = match op.what {
            0 => Write::Delete,
            1 => Write::Release,
            2 => Write::Ephemeral { ttl_ms: 30_000 },
            _ => Write::Set,
        };
        let value = Some(Bytes::from(format!("{}-{}", op.writer, op.at)));
        if let Ok((e, _)) = r.write(key.clone(), value, what, op.at) {
            written.push((key.clone(), e.clone()));
            if share.get(i).copied().unwrap_or(false) {
                for (j, other) in writers.iter_mut().enumerate() {
                    if j != op.writer as usize - 1 {
                        let _ = other.apply(key.clone(), e.clone(), op.at);
                    }
                }
            }
        }
    }
    written
}

fn replay(writes: &[(Bytes, Entry)], leasing: bool) -> (u64, Vec<(Bytes, Entry)>) {
    let mut r = replica(9, leasing);
    for (k, e) in writes {
        r.apply(k.clone(), e.clone(), 200_000).unwrap();
    }
    let all: Vec<u32> = (0..BUCKETS as u32).collect();
    let (mut entries, _) = r.chunk(&all, None, usize::MAX, usize::MAX);
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    (r.root(), entries)
}

proptest! {
    #[test]
    fn merge_is_order_and_duplicate_insensitive(
        ops in ops(),
        share in prop::collection::vec(any::<bool>(), 40),
        leasing in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let writes = history(&ops, leasing, &share);
        let reference = replay(&writes, leasing);
        // A shuffled copy with some writes repeated.
        let mut shuffled = writes.clone();
        let mut rng = seed;
        let mut next = || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
        for i in (1..shuffled.len()).rev() {
            let j = (next() % (i as u64 + 1)) as usize;
            shuffled.swap(i, j);
        }
        let dups: Vec<_> = shuffled.iter().filter(|_| next() % 3 == 0).cloned().collect();
        shuffled.extend(dups);
        prop_assert_eq!(replay(&shuffled, leasing), reference.clone());
        // Merging two halves separately, then one into the other, is the same.
        let (left, right) = shuffled.split_at(shuffled.len() / 2);
        let mut l = replica(7, leasing);
        for (k, e) in left { l.apply(k.clone(), e.clone(), 200_000).unwrap(); }
        let mut r = replica(8, leasing);
        for (k, e) in right { r.apply(k.clone(), e.clone(), 200_000).unwrap(); }
        let all: Vec<u32> = (0..BUCKETS as u32).collect();
        let (from_r, _) = r.chunk(&all, None, usize::MAX, usize::MAX);
        for (k, e) in from_r { l.apply(k, e, 200_000).unwrap(); }
        prop_assert_eq!(l.root(), reference.0);
    }

    #[test]
    fn with_leasing_a_key_never_has_two_owners_across_replicas(
        ops in ops(),
        share in prop::collection::vec(any::<bool>(), 40),
    ) {
        // Every replica that has seen all writes agrees on each key's owner,
        // which is the writer of the winning entry.
        let writes = history(&ops, true, &share);
        let (_, a) = replay(&writes, true);
        let mut reversed = writes.clone();
        reversed.reverse();
        let (_, b) = replay(&reversed, true);
        let owners = |v: &[(Bytes, Entry)]| v.iter().map(|(k, e)| (k.clone(), e.writer.clone())).collect::<Vec<_>>();
        prop_assert_eq!(owners(&a), owners(&b));
    }
}

#[test]
fn a_key_in_the_last_epoch_stays_with_its_holder() {
    // A (forged) entry in the last epoch peers accept, its lease lapsed: a
    // claim past it would be refused by every other replica, and one in it
    // would be overturned by the holder's earlier claim. Another node is
    // told the lease is held for good; the holder writes on.
    let mut holder = replica(1, true);
    let mut last = set(&mut holder, "k", "a", 1_000).unwrap();
    last.epoch = MAX_EPOCH;
    assert!(
        Entry::from_proto(last.to_proto(&k("k"), &id(1)), &id(1), 1024, 1 << 20).is_ok(),
        "peers accept the last epoch"
    );
    let mut b = replica(2, true);
    b.apply(k("k"), last.clone(), 1_000).unwrap();
    let err = set(&mut b, "k", "b", 1_000 + LEASE + 1).unwrap_err();
    assert!(
        matches!(&err, SyncError::LeaseHeld { owner, until_ms: u64::MAX, .. } if *owner == id(1)),
        "{err:?}"
    );
    assert_eq!(b.entry(&k("k")).unwrap().value.as_deref(), Some(&b"a"[..]));
    // The holder's own write, after its lease lapsed, stays in its claim
    // and wins on every replica.
    let mut holder = replica(1, true);
    holder.apply(k("k"), last, 1_000).unwrap();
    let e = set(&mut holder, "k", "a2", 1_000 + LEASE + 1).unwrap();
    assert_eq!((e.epoch, &e.writer), (MAX_EPOCH, &id(1)));
    b.apply(k("k"), e, 1_000 + LEASE + 1).unwrap();
    assert_eq!(b.entry(&k("k")).unwrap().value.as_deref(), Some(&b"a2"[..]));
}

#[test]
fn a_rebased_write_with_a_huge_ttl_saturates_instead_of_overflowing() {
    // Two entries under our own id, the later one with a ttl of u64::MAX
    // (peers' are refused above MAX_SPAN_MS; these come straight in). The
    // earlier claim wins, and our later write is re-issued in it.
    let mut a = replica(1, true);
    let mut current = set(&mut replica(1, true), "k", "later", 2_000).unwrap();
    current.claim = Stamp::new(1_500, 0);
    current.ttl_ms = u64::MAX;
    current.expires_at = u64::MAX;
    current.lease_until = u64::MAX;
    a.apply(k("k"), current, 2_000).unwrap();
    let earlier = set(&mut replica(1, true), "k", "earlier", 1_000).unwrap();
    a.apply(k("k"), earlier, 2_001).unwrap();
    let rebased = a.take_rebased();
    assert_eq!(rebased.len(), 1);
    let (_, e) = &rebased[0];
    assert_eq!(e.value, Some(k("later")));
    assert_eq!(e.claim, Stamp::new(1_000, 0));
    assert_eq!((e.lease_until, e.expires_at), (u64::MAX, u64::MAX));
    // Refreshing it does not overflow either.
    assert!(a.refresh_due(2_002).is_empty());
}

#[test]
fn an_expiry_is_forgotten_a_ttl_after_it_and_the_key_does_not_come_back() {
    const TTL: u64 = 3_000;
    const SKEW: u64 = 60_000; // as `replica` sets it
    let mut a = replica(1, true);
    let mut b = replica(2, true);
    let live = ephemeral(&mut a, "svc", "up", TTL, 1_000);
    b.apply(k("svc"), live.clone(), 1_000).unwrap();
    b.sweep(4_000);
    let tomb = b.entry(b"svc").unwrap().clone();
    assert!(tomb.is_deleted());
    assert_eq!(
        (tomb.ttl_ms, tomb.expires_at),
        (TTL, 4_000),
        "marked an expiry"
    );
    // It crosses the wire as it is.
    let (_, back) = Entry::from_proto(tomb.to_proto(&k("svc"), &id(2)), &id(2), 64, 64).unwrap();
    assert_eq!(back, tomb);

    let forget = 4_000 + TTL + 2 * SKEW;
    b.sweep(forget - 1);
    assert_eq!(b.entries(), 1);
    b.sweep(forget);
    assert_eq!(
        (b.entries(), b.root()),
        (0, 0),
        "forgotten long before the grace"
    );
    // Neither the tombstone nor the expired value is taken back.
    assert!(b.apply(k("svc"), tomb, forget).unwrap().is_empty());
    assert!(b.apply(k("svc"), live, forget).unwrap().is_empty());
    assert_eq!(b.entries(), 0);
    // An expired value that recent is still taken (and swept as usual).
    let late = ephemeral(&mut a, "late", "v", TTL, forget);
    b.apply(k("late"), late, forget + TTL + 1).unwrap();
    assert!(b.entry(b"late").is_some());
    // A new claim of the forgotten key starts afresh.
    let fresh = set(&mut b, "svc", "again", forget + 1).unwrap();
    assert_eq!((fresh.epoch, fresh.writer), (1, id(2)));
}

#[test]
fn deleting_an_own_ephemeral_key_is_forgotten_as_soon_as_an_expiry() {
    let mut a = replica(1, true);
    let mut b = replica(2, true);
    let live = ephemeral(&mut a, "svc", "up", 3_000, 1_000);
    b.apply(k("svc"), live.clone(), 1_000).unwrap();
    let (tomb, changes) = a.write(k("svc"), None, Write::Delete, 2_000).unwrap();
    assert!(matches!(changes[0].kind, ChangeKind::Deleted));
    assert_eq!(
        (tomb.ttl_ms, tomb.expires_at),
        (3_000, 2_000),
        "an early expiry"
    );
    b.apply(k("svc"), tomb.clone(), 2_000).unwrap();
    assert!(b.get(b"svc", 2_000).is_none());
    assert!(a.refresh_due(2_500).is_empty(), "no longer kept alive");
    let forget = 2_000 + 3_000 + 2 * 60_000;
    for r in [&mut a, &mut b] {
        r.sweep(forget - 1);
        assert_eq!(r.entries(), 1);
        r.sweep(forget);
        assert_eq!(r.entries(), 0);
        // The value it deleted cannot come back: it expired long ago.
        assert!(r.apply(k("svc"), live.clone(), forget).unwrap().is_empty());
        assert!(r.apply(k("svc"), tomb.clone(), forget).unwrap().is_empty());
        assert_eq!(r.entries(), 0);
    }
}

#[test]
fn a_delete_of_a_plain_key_is_kept_for_the_whole_grace() {
    let mut a = replica(1, true);
    set(&mut a, "k", "v", 1_000).unwrap();
    let (tomb, _) = a.write(k("k"), None, Write::Delete, 2_000).unwrap();
    assert_eq!(tomb.ttl_ms, 0, "a delete, not an expiry");
    a.sweep(2_000 + 600_000 - 1);
    assert_eq!(a.entries(), 1);
    a.sweep(2_000 + 600_000);
    assert_eq!(a.entries(), 0);
}

#[test]
fn a_replica_stays_within_its_byte_budget() {
    // Room for three entries of a 1-byte key and a 100-byte value.
    let one = 1 + 100 + ENTRY_OVERHEAD;
    let mut a = budgeted(1, true, 3 * one);
    let mut writer = replica(2, true);
    let v = |b: u8| Bytes::from(vec![b; 100]);
    let theirs: Vec<(Bytes, Entry)> = ["a", "b", "c", "d"]
        .iter()
        .map(|key| {
            let (e, _) = writer.write(k(key), Some(v(1)), Write::Set, 1_000).unwrap();
            (k(key), e)
        })
        .collect();
    for (key, e) in &theirs[..2] {
        a.apply(key.clone(), e.clone(), 1_000).unwrap();
    }
    set(&mut a, "x", &"x".repeat(100), 1_000).unwrap();
    assert_eq!(a.bytes(), 3 * one);
    // Full: a new key is refused, from a peer or from here, and nothing changes.
    let root = a.root();
    assert_eq!(
        a.apply(theirs[2].0.clone(), theirs[2].1.clone(), 1_000),
        Err(Refused::Full)
    );
    assert!(matches!(
        set(&mut a, "y", "v", 1_000),
        Err(SyncError::Full { .. })
    ));
    assert_eq!((a.root(), a.entries(), a.bytes()), (root, 3, 3 * one));
    // An update that does not grow it goes on; one that grows it does not.
    set(&mut a, "x", &"z".repeat(100), 2_000).unwrap();
    assert!(matches!(
        set(&mut a, "x", &"z".repeat(101), 2_000),
        Err(SyncError::Full { .. })
    ));
    // A delete makes room once its tombstone is collected.
    a.write(k("x"), None, Write::Delete, 3_000).unwrap();
    assert_eq!(a.bytes(), 2 * one + 1 + ENTRY_OVERHEAD);
    assert_eq!(
        a.apply(theirs[2].0.clone(), theirs[2].1.clone(), 3_000),
        Err(Refused::Full)
    );
    a.sweep(3_000 + 600_000);
    assert_eq!(a.bytes(), 2 * one);
    a.apply(theirs[3].0.clone(), theirs[3].1.clone(), 3_000 + 600_000)
        .unwrap();
    assert_eq!((a.entries(), a.bytes()), (3, 3 * one));
}

/// A write that gave up its lease (`release`) stays released when a
/// restart's rebase re-issues it: it was re-leased for the configured
/// lease (an hour), the rebase taking its lease of 0 ms for "unknown", and
/// no other node could take the key the owner had let go.
#[test]
fn a_rebased_release_stays_released() {
    let mut before = replica(1, true);
    let old = set(&mut before, "k", "old", 1_000).unwrap();
    let mut after = replica(1, true);
    set(&mut after, "k", "new", 5_000).unwrap();
    let released = after.write(k("k"), None, Write::Release, 5_001).unwrap().0;
    assert!(!released.lease_live(5_002));
    after.apply(k("k"), old, 5_002).unwrap();
    let (_, e) = &after.take_rebased()[0];
    assert_eq!(e.value, Some(k("new")));
    let at = e.stamp.millis();
    assert!(
        !e.lease_live(at + 1),
        "leased until {} at {at}",
        e.lease_until
    );
    assert!(after.lease_of(e, at + 1).is_none());
}

/// A rebase keeps the lease span of the entry it re-issues, which may have
/// come from a peer (entries name their writer; nothing stops a peer from
/// naming this node): one leased to the last millisecond a peer may send
/// (`i64::MAX`) was re-issued leased past it, and every peer refused the
/// rebased entry ("time out of range") while this replica kept it, so the
/// replicas never converged again.
#[test]
fn a_rebase_over_a_forged_endless_lease_stays_on_the_wire() {
    let mut before = replica(1, true);
    let old = set(&mut before, "k", "old", 1_000).unwrap();
    let mut forger = replica(1, true);
    let mut forged = set(&mut forger, "k", "forged", 5_000).unwrap();
    forged.lease_until = i64::MAX as u64;
    let me = forged.writer.clone();
    let (_, forged) = Entry::from_proto(forged.to_proto(&k("k"), &me), &me, 1024, 1024).unwrap();
    let mut after = replica(1, true);
    after.apply(k("k"), forged, 5_000).unwrap();
    after.apply(k("k"), old, 5_010).unwrap();
    let (key, e) = after.take_rebased().pop().expect("rebased");
    let wire = e.to_proto(&key, &me);
    assert!(
        Entry::from_proto(wire, &me, 1024, 1024).is_ok(),
        "the rebased entry (leased until {}) is refused by every peer",
        e.lease_until
    );
}

/// The lapses a sweep tells: `(key, owner)`.
fn lapses(changes: &[Change]) -> Vec<(Bytes, NodeId)> {
    changes
        .iter()
        .filter_map(|c| match &c.kind {
            ChangeKind::LeaseLapsed { owner } => Some((c.key.clone(), owner.clone())),
            _ => None,
        })
        .collect()
}

/// A lease that runs out is told once, by the sweep after its end, on
/// every replica holding it; a renewal moves the lapse to the new end; a
/// release tells it at once and not again at the old end; a deleted key
/// or leasing off tells none.
#[test]
fn a_lapsed_or_released_lease_is_told_once() {
    let mut a = replica(1, true);
    let mut b = replica(2, true);
    b.apply(k("k"), set(&mut a, "k", "a1", 1_000).unwrap(), 1_000)
        .unwrap();
    assert!(lapses(&b.sweep(1_000 + LEASE - 1)).is_empty(), "still live");
    assert_eq!(lapses(&b.sweep(1_000 + LEASE)), vec![(k("k"), id(1))]);
    assert!(lapses(&b.sweep(1_000 + 3 * LEASE)).is_empty(), "told once");
    assert_eq!(lapses(&a.sweep(1_000 + LEASE)), vec![(k("k"), id(1))]);

    // Renewed before its end: nothing at the first end, told at the second.
    let mut a = replica(1, true);
    let mut b = replica(2, true);
    b.apply(k("k"), set(&mut a, "k", "a1", 1_000).unwrap(), 1_000)
        .unwrap();
    b.apply(k("k"), set(&mut a, "k", "a2", 30_000).unwrap(), 30_000)
        .unwrap();
    assert!(lapses(&b.sweep(1_000 + LEASE)).is_empty(), "renewed");
    assert!(lapses(&b.sweep(30_000 + LEASE - 1)).is_empty());
    assert_eq!(lapses(&b.sweep(30_000 + LEASE)), vec![(k("k"), id(1))]);

    // Released: told with the release, on both sides, and not again.
    let mut a = replica(1, true);
    let mut b = replica(2, true);
    b.apply(k("k"), set(&mut a, "k", "a1", 1_000).unwrap(), 1_000)
        .unwrap();
    let (released, told) = a.write(k("k"), None, Write::Release, 2_000).unwrap();
    assert_eq!(lapses(&told), vec![(k("k"), id(1))]);
    let told = b.apply(k("k"), released, 2_000).unwrap();
    assert_eq!(lapses(&told), vec![(k("k"), id(1))]);
    assert!(lapses(&a.sweep(1_000 + LEASE)).is_empty());
    assert!(lapses(&b.sweep(1_000 + LEASE)).is_empty());

    // Deleted before its end: a delete, no lapse.
    let mut a = replica(1, true);
    set(&mut a, "k", "a1", 1_000).unwrap();
    a.write(k("k"), None, Write::Delete, 2_000).unwrap();
    assert!(lapses(&a.sweep(1_000 + LEASE)).is_empty());

    // Leasing off: no lease, no lapse.
    let mut a = replica(1, false);
    set(&mut a, "k", "a1", 1_000).unwrap();
    assert!(lapses(&a.sweep(1_000 + 2 * LEASE)).is_empty());
}

/// However often a leased key is rewritten, it has one lapse deadline
/// pending: a deadline a write would pile up for the whole lease (an hour
/// by default).
#[test]
fn rewrites_of_a_leased_key_keep_one_lapse_deadline() {
    let mut a = replica(1, true);
    for i in 0..1_000u64 {
        set(&mut a, "k", "v", 1_000 + i).unwrap();
    }
    assert_eq!(a.deadlines.len(), 1);
    assert_eq!(lapses(&a.sweep(1_000 + LEASE)), Vec::new(), "renewed");
    assert_eq!(a.deadlines.len(), 1, "moved to the lease's end");
    assert_eq!(lapses(&a.sweep(1_999 + LEASE)), vec![(k("k"), id(1))]);
    assert!(a.deadlines.is_empty() && a.lapse_due.is_empty());
}
