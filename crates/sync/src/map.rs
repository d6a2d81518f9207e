//! The tokio driver: the [`SyncMap`] handle, the sync concern that answers
//! peers, the eager pusher, housekeeping and anti-entropy rounds.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use meshwork_concerns::peers::{PeerEvent, PeersError};
use meshwork_concerns::transport::Priority;
use meshwork_concerns::wire::NodeId;
use meshwork_concerns::{
    BoxError, Concern, Concerns, ConcernsError, Context, FORWARD_WAIT, Reply, Via,
};
use prost::Message as _;
use rand::seq::IndexedRandom;
use tokio::sync::{Notify, Semaphore, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::entry::MAX_SPAN_MS;
use crate::proto::{self, sync_message::Body};
use crate::replica::{BUCKETS, Refused, Replica, ReplicaConfig, Write};
use crate::tree::Tree;
use crate::{Change, ChangeKind, Entry, Lease, Stamp, SyncConfig, SyncError};

/// The sync concern's command id.
pub const SYNC: u32 = 0xFFFF_0100;

/// The most chunks one anti-entropy round pulls from a peer. A chunk that
/// says more follow carries at least one entry, and at the default limits
/// up to 2048 entries or 256 KiB, so this moves up to 2M entries or 256 MiB
/// in a round: far more than rounds repair between writes. A bigger
/// difference (a late joiner to a huge map) takes further rounds, which
/// start from the buckets that still differ. Without a bound, a peer
/// answering "more" forever would keep the round, and with it the rounds
/// permit, and the memory of what it sent, growing without end.
const MAX_PULLS_PER_ROUND: usize = 1024;

/// How often a full replica says so in the log.
const FULL_LOG_EVERY: Duration = Duration::from_secs(60);

/// The most a graceful stop waits to tell the neighbours that this node's
/// ephemeral keys are gone ([`SyncMap::shutdown`]).
const GOODBYE_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Counters {
    writes: AtomicU64,
    applied: AtomicU64,
    stale: AtomicU64,
    refused: AtomicU64,
    refused_full: AtomicU64,
    /// When refusals for want of room were last logged.
    full_logged: Mutex<Option<tokio::time::Instant>>,
    pushes: AtomicU64,
    duplicates: AtomicU64,
    pushed_entries: AtomicU64,
    push_failures: AtomicU64,
    rounds: AtomicU64,
    rounds_equal: AtomicU64,
    round_failures: AtomicU64,
    rounds_cut: AtomicU64,
    pulled: AtomicU64,
    sent: AtomicU64,
    lease_lost: AtomicU64,
    lease_lapsed: AtomicU64,
}

/// Counters and sizes of the sync layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Live keys.
    pub keys: usize,
    /// Entries held, tombstones included.
    pub entries: usize,
    /// What the entries cost in memory (keys, values and about 200 bytes
    /// each), of at most [`max_bytes`](Self::max_bytes).
    pub bytes: usize,
    /// The replica's byte budget (`SyncConfig::with_max_bytes`).
    pub max_bytes: usize,
    /// The replica's digest ([`SyncMap::digest`]).
    pub digest: u64,
    /// Local writes.
    pub writes: u64,
    /// Entries from peers that changed the replica.
    pub applied: u64,
    /// Entries from peers that lost to what we hold (already seen or older).
    pub stale: u64,
    /// Entries from peers refused (stamped too far ahead, malformed, or no
    /// room).
    pub refused: u64,
    /// Of those, refused because the replica was at its byte budget.
    pub refused_full: u64,
    /// Eager pushes of local writes sent (one per batch).
    pub pushes: u64,
    /// Pushes received again (each prunes a link of the tree).
    pub duplicates: u64,
    /// Links that carry no eager pushes now.
    pub lazy_links: usize,
    /// Entries carried by eager pushes.
    pub pushed_entries: u64,
    /// Eager pushes that could not be sent.
    pub push_failures: u64,
    /// Anti-entropy rounds run by this node.
    pub rounds: u64,
    /// Of those, rounds that found the replicas equal.
    pub rounds_equal: u64,
    /// Rounds that failed (peer gone, timeout).
    pub round_failures: u64,
    /// Rounds cut short by the peer's chunks: a resume point that did not
    /// move forward (a broken or hostile peer; the round fails), or more
    /// chunks than one round pulls (1024: the rest waits for later rounds).
    pub rounds_cut: u64,
    /// Entries received by anti-entropy pulls.
    pub pulled: u64,
    /// Entries sent by anti-entropy pushes.
    pub sent: u64,
    /// Leases this node lost to another node's claim.
    pub lease_lost: u64,
    /// Leases seen to lapse or be released, any node's
    /// ([`ChangeKind::LeaseLapsed`]).
    pub lease_lapsed: u64,
}

/// A live entry, as [`SyncMap::entry`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    /// The value.
    pub value: Bytes,
    /// The version: the stamp of the write. It only grows along a key's
    /// history; with the lease epoch it is a fencing token.
    pub version: Stamp,
    /// Who wrote it.
    pub writer: NodeId,
    /// The live lease, if any.
    pub lease: Option<Lease>,
    /// For ephemeral keys, when the entry expires unless refreshed (ms
    /// since the Unix epoch).
    pub expires_at_ms: Option<u64>,
}

pub(crate) struct Inner {
    replica: Mutex<Replica>,
    cfg: SyncConfig,
    push_tx: mpsc::Sender<(Bytes, Entry)>,
    changes: broadcast::Sender<Change>,
    counters: Counters,
    cancel: CancellationToken,
    tracker: TaskTracker,
    rounds: Semaphore,
    /// Set when a repair changed the replica: run rounds with every
    /// neighbour (coalesced).
    cascade: Notify,
    /// Which links carry eager pushes, and the pushes seen.
    tree: Mutex<Tree>,
    /// Peers with a round of ours queued or running (one at a time each).
    in_rounds: Mutex<std::collections::HashSet<NodeId>>,
    /// When each peer is next within its repair rate (generic cell rate,
    /// in bytes of anti-entropy sent to it: pull answers and entries pushed
    /// back go while this is at most the burst ahead of now). Entries go
    /// when the peer leaves.
    repair_due: Mutex<HashMap<NodeId, tokio::time::Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn now(&self) -> u64 {
        self.cfg.clock.now_ms()
    }

    fn publish(&self, changes: Vec<Change>) {
        for c in changes {
            match c.kind {
                ChangeKind::LeaseLost { .. } => {
                    self.counters.lease_lost.fetch_add(1, Ordering::Relaxed);
                }
                ChangeKind::LeaseLapsed { .. } => {
                    self.counters.lease_lapsed.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            // No watcher is not an error.
            let _ = self.changes.send(c);
        }
    }

    /// Decodes entries from `sender`, counting and dropping bad ones.
    fn decode(&self, sender: &NodeId, entries: Vec<proto::Entry>) -> Vec<(Bytes, Entry)> {
        let (max_key, max_value) = (self.cfg.max_key_len, self.cfg.max_value_len);
        entries
            .into_iter()
            .filter_map(|p| match Entry::from_proto(p, sender, max_key, max_value) {
                Ok(e) => Some(e),
                Err(why) => {
                    self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    debug!(peer = %sender.short(), %why, "refused an entry");
                    None
                }
            })
            .collect()
    }

    /// Merges entries from `sender`; returns how many changed the replica.
    fn apply(&self, sender: &NodeId, entries: Vec<proto::Entry>) -> u32 {
        let entries = self.decode(sender, entries);
        self.merge(entries)
    }

    /// Merges decoded entries; returns how many changed the replica.
    fn merge(&self, entries: Vec<(Bytes, Entry)>) -> u32 {
        let now = self.now();
        let mut applied = 0;
        let mut full = 0;
        let mut changes = Vec::new();
        let rebased = {
            let mut replica = lock(&self.replica);
            for (key, entry) in entries {
                match replica.apply(key, entry, now) {
                    Ok(c) if c.is_empty() => {
                        self.counters.stale.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(c) => {
                        applied += 1;
                        changes.extend(c);
                    }
                    Err(Refused::Ahead(ahead)) => {
                        self.counters.refused.fetch_add(1, Ordering::Relaxed);
                        debug!(
                            ahead_ms = ahead.ahead_ms,
                            "refused an entry stamped in the future"
                        );
                    }
                    Err(Refused::Full) => full += 1,
                }
            }
            replica.take_rebased()
        };
        for w in rebased {
            // Full queue: anti-entropy carries it.
            let _ = self.push_tx.try_send(w);
        }
        self.counters
            .applied
            .fetch_add(u64::from(applied), Ordering::Relaxed);
        self.count_full(full);
        self.publish(changes);
        applied
    }

    /// Counts `n` entries refused for want of room, with a warning at most
    /// once a minute.
    fn count_full(&self, n: u64) {
        if n == 0 {
            return;
        }
        let c = &self.counters;
        c.refused.fetch_add(n, Ordering::Relaxed);
        let total = c.refused_full.fetch_add(n, Ordering::Relaxed) + n;
        let now = tokio::time::Instant::now();
        let mut logged = lock(&c.full_logged);
        if logged.is_none_or(|at| now.duration_since(at) >= FULL_LOG_EVERY) {
            *logged = Some(now);
            warn!(
                max_bytes = self.cfg.max_bytes,
                refused = total,
                "the replica is full: refusing new keys from peers, so it no longer converges \
                 (raise max_bytes, or delete keys)"
            );
        }
    }

    /// A push from neighbour `from`: apply and pass on along the tree the
    /// first time; prune the link on a duplicate.
    ///
    /// Pushes travel neighbour to neighbour. One whose sender is not a
    /// neighbour came through the flood or routing concern (`from` is then
    /// the origin it claims): its entries are applied like any others, but
    /// it does not touch the tree or the pushes seen, and is not passed on.
    async fn on_push(&self, ctx: &Context, from: &NodeId, push: proto::Push, payload: Bytes) {
        let Ok(origin) = NodeId::from_bytes(push.origin.clone()) else {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if !ctx.peers().is_neighbour(from) {
            debug!(peer = %from.short(), "a push not from a neighbour: tree left alone");
            if origin != *ctx.node_id() {
                self.apply(&origin, push.entries);
            }
            return;
        }
        let first = lock(&self.tree).first_time(push.id, tokio::time::Instant::now());
        if !first {
            self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            let neighbours = ctx.peers().neighbours();
            if lock(&self.tree).prune(from, &neighbours) {
                let _ = send(ctx, from, Body::Prune(proto::Prune {})).await;
            }
            return;
        }
        // Whoever pushes to us is on our tree.
        lock(&self.tree).graft(from);
        if origin == *ctx.node_id() {
            return;
        }
        self.apply(&origin, push.entries);
        // Passed on as received (duplicates stop it: each node passes a push
        // on once).
        self.push_to_tree(ctx, payload, &[from, &origin]).await;
    }

    /// A push of `entries` from `me` under a fresh id, encoded, the id
    /// remembered as seen (so that it is not taken again when it comes
    /// back).
    fn new_push(&self, me: &NodeId, entries: Vec<proto::Entry>) -> Bytes {
        let id = rand::random();
        lock(&self.tree).first_time(id, tokio::time::Instant::now());
        proto::SyncMessage {
            body: Some(Body::Push(proto::Push {
                id,
                origin: me.as_bytes().clone(),
                entries,
            })),
        }
        .encode_to_vec()
        .into()
    }

    /// Sends an encoded push to every eager neighbour but `except`.
    async fn push_to_tree(&self, ctx: &Context, payload: Bytes, except: &[&NodeId]) -> usize {
        let neighbours = ctx.peers().neighbours();
        let targets: Vec<NodeId> = lock(&self.tree)
            .eager(&neighbours, except)
            .cloned()
            .collect();
        let mut sent = 0;
        for peer in targets {
            // Waits for room as anything sent on another's behalf does
            // (`FORWARD_WAIT`); anti-entropy repairs what a skipped
            // neighbour missed.
            match tokio::time::timeout(FORWARD_WAIT, ctx.send(&peer, payload.clone())).await {
                Ok(Ok(())) => sent += 1,
                Ok(Err(e)) => debug!(peer = %peer.short(), error = %e, "push not sent"),
                Err(_) => debug!(peer = %peer.short(), "push not sent: its lane stayed full"),
            }
        }
        sent
    }

    fn encode(&self, entries: &[(Bytes, Entry)], me: &NodeId) -> Vec<proto::Entry> {
        entries.iter().map(|(k, e)| e.to_proto(k, me)).collect()
    }

    /// Whether `peer` may be sent more anti-entropy now: it is at most the
    /// burst ahead of its repair rate (checked before, charged after).
    fn within_repair_rate(&self, peer: &NodeId) -> bool {
        let now = tokio::time::Instant::now();
        let rate = self.cfg.repair_rate as f64;
        let burst = Duration::from_secs_f64(self.cfg.repair_burst as f64 / rate);
        lock(&self.repair_due)
            .get(peer)
            .is_none_or(|due| due.saturating_duration_since(now) <= burst)
    }

    /// Counts `bytes` of anti-entropy sent to `peer` against its rate.
    fn charge_repair(&self, peer: &NodeId, bytes: usize) {
        let now = tokio::time::Instant::now();
        let cost = Duration::from_secs_f64(bytes as f64 / self.cfg.repair_rate as f64);
        let mut due = lock(&self.repair_due);
        let at = due.entry(peer.clone()).or_insert(now);
        *at = (*at).max(now) + cost;
    }

    /// This replica's entries of the keys in `sent` (key, stamp, writer of
    /// the entry a peer sent) that are not the entry sent: the ones that beat
    /// it here. At most about a chunk's bytes; anti-entropy brings the rest.
    fn newer_than(&self, sent: &[(Bytes, Stamp, NodeId)], me: &NodeId) -> Vec<proto::Entry> {
        let replica = lock(&self.replica);
        let mut bytes = 0;
        let mut newer = Vec::new();
        for (key, stamp, writer) in sent {
            if bytes >= self.cfg.chunk_bytes {
                break;
            }
            match replica.entry(key) {
                Some(here) if here.stamp != *stamp || here.writer != *writer => {
                    bytes += key.len() + here.value.as_ref().map_or(0, |v| v.len());
                    newer.push(here.to_proto(key, me));
                }
                _ => {}
            }
        }
        newer
    }

    /// Answers a peer's sync message.
    fn answer(&self, from: &NodeId, msg: proto::SyncMessage) -> Result<Option<Reply>, BoxError> {
        let me = lock(&self.replica).me().clone();
        let reply = match msg.body {
            Some(Body::Entries(e)) => {
                let entries = self.decode(from, e.entries);
                // A confirm or a goodbye (not a repair, which compared
                // replicas first) learns of the entries here that beat
                // its own: the claim it confirms may have lost already.
                let sent: Vec<(Bytes, Stamp, NodeId)> = if e.repair {
                    Vec::new()
                } else {
                    entries
                        .iter()
                        .map(|(k, e)| (k.clone(), e.stamp, e.writer.clone()))
                        .collect()
                };
                let applied = self.merge(entries);
                if e.repair && applied > 0 {
                    self.cascade.notify_one();
                }
                // Anti-entropy like a pull's chunk, and as cheap to ask
                // for (an entry that loses brings back a value of up to a
                // MiB): within the peer's repair rate, else none (the
                // confirmer's next round brings them).
                let newer = if sent.is_empty() || !self.within_repair_rate(from) {
                    Vec::new()
                } else {
                    let newer = self.newer_than(&sent, &me);
                    let bytes = newer.iter().map(prost::Message::encoded_len).sum();
                    if bytes > 0 {
                        self.charge_repair(from, bytes);
                    }
                    newer
                };
                Body::Ack(proto::Ack { applied, newer })
            }
            Some(Body::Digest(q)) => {
                let replica = lock(&self.replica);
                if replica.root() == q.root {
                    Body::Answer(proto::DigestAnswer {
                        equal: true,
                        buckets: Vec::new(),
                        entries: replica.entries() as u64,
                    })
                } else {
                    Body::Answer(proto::DigestAnswer {
                        equal: false,
                        buckets: replica.bucket_hashes(),
                        entries: replica.entries() as u64,
                    })
                }
            }
            Some(Body::Pull(p)) => {
                if p.buckets.len() > BUCKETS || p.buckets.windows(2).any(|w| w[0] >= w[1]) {
                    return Err("pull: buckets must be ascending and at most 256".into());
                }
                if !self.within_repair_rate(from) {
                    return Err(OVER_REPAIR_RATE.into());
                }
                let after = p.resume.then_some((p.after_bucket, p.after_key));
                let (entries, next) = lock(&self.replica).chunk(
                    &p.buckets,
                    after,
                    self.cfg.chunk_entries,
                    self.cfg.chunk_bytes,
                );
                let entries = self.encode(&entries, &me);
                let (more, next_bucket, next_key) = match next {
                    Some((b, k)) => (true, b, k),
                    None => (false, 0, Bytes::new()),
                };
                let body = Body::Chunk(proto::Chunk {
                    entries,
                    more,
                    next_bucket,
                    next_key,
                });
                let bytes = proto::SyncMessage { body: Some(body) }.encode_to_vec();
                self.charge_repair(from, bytes.len());
                return Ok(Some(Reply::new(bytes).with_priority(Priority::Bulk)));
            }
            Some(
                Body::Answer(_)
                | Body::Chunk(_)
                | Body::Ack(_)
                | Body::Push(_)
                | Body::Prune(_)
                | Body::Graft(_),
            )
            | None => {
                return Err("unexpected sync message".into());
            }
        };
        let bytes = proto::SyncMessage { body: Some(reply) }.encode_to_vec();
        Ok(Some(Reply::new(bytes)))
    }
}

/// The concern that answers peers' sync traffic.
struct SyncConcern {
    inner: Arc<Inner>,
}

#[async_trait]
impl Concern for SyncConcern {
    fn command(&self) -> u32 {
        SYNC
    }

    fn name(&self) -> &str {
        "sync"
    }

    fn max_concurrency(&self) -> usize {
        8
    }

    /// Sync talks to neighbours only. A flooded or routed message's sender
    /// is its origin, which anyone can make up: each made-up origin would
    /// get a repair allowance of its own and an entry in `repair_due`, and
    /// every node a flooded `Pull` reached would build a chunk for nobody.
    fn accepts(&self, via: Via) -> bool {
        via == Via::Direct
    }

    async fn on_stop(&self, _ctx: &Context) {
        self.inner.cancel.cancel();
    }

    fn on_peer_left(&self, peer: &NodeId) {
        lock(&self.inner.repair_due).remove(peer);
    }

    async fn on_request(
        &self,
        ctx: &Context,
        from: &NodeId,
        payload: Bytes,
    ) -> Result<Option<Reply>, BoxError> {
        // Bounded: a peer's message of many tiny entries must not become
        // a gigabyte of structs before one of them is checked.
        let msg = crate::message::decode(payload.clone())?;
        match msg.body {
            Some(Body::Push(push)) => {
                self.inner.on_push(ctx, from, push, payload).await;
                Ok(None)
            }
            // Tree maintenance concerns the link to a neighbour: from anyone
            // else (through the flood or routing concern) it is ignored.
            Some(Body::Prune(_) | Body::Graft(_)) if !ctx.peers().is_neighbour(from) => {
                debug!(peer = %from.short(), "tree message not from a neighbour ignored");
                Ok(None)
            }
            Some(Body::Prune(_)) => {
                let neighbours = ctx.peers().neighbours();
                // Only a neighbour's link is ours to keep (`prune` ignores
                // anyone else, and so must the answer).
                let kept = neighbours.contains(from) && {
                    let mut tree = lock(&self.inner.tree);
                    !tree.prune(from, &neighbours) && !tree.is_lazy(from)
                };
                if kept {
                    // Our last eager link: the peer is asked to keep pushing
                    // to us too, so that links stay eager or lazy at both
                    // ends (one-sided, three nodes could each push to one
                    // that passed nothing on).
                    debug!(peer = %from.short(), "prune of our last eager link refused");
                    let _ = send(ctx, from, Body::Graft(proto::Graft {})).await;
                }
                Ok(None)
            }
            Some(Body::Graft(_)) => {
                lock(&self.inner.tree).graft(from);
                Ok(None)
            }
            body => self.inner.answer(from, proto::SyncMessage { body }),
        }
    }
}

/// The error a pull gets beyond the puller's repair rate: the puller waits
/// [`REPAIR_RATE_WAIT`] and asks again (within its round's timeout).
const OVER_REPAIR_RATE: &str = "pull: over this node's repair rate for the peer, ask again later";
const REPAIR_RATE_WAIT: Duration = Duration::from_millis(500);

fn over_repair_rate(e: &SyncError) -> bool {
    matches!(e, SyncError::Concerns(ConcernsError::Remote { message, .. }) if message == OVER_REPAIR_RATE)
}

/// The replicated map of one node. Cheap to clone; every clone is the same
/// map.
///
/// Writes apply locally at once, are pushed to the whole mesh (flooded,
/// batched under load), and are repaired by periodic anti-entropy, so late
/// joiners and healed partitions converge. See the crate docs and
/// `docs/sync.md` for the rules.
#[derive(Clone)]
pub struct SyncMap {
    inner: Arc<Inner>,
    ctx: Context,
}

impl std::fmt::Debug for SyncMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncMap")
            .field("node_id", self.ctx.node_id())
            .field("leasing", &self.inner.cfg.leasing)
            .finish()
    }
}

impl SyncMap {
    /// Starts the sync layer on a running concerns layer: registers the
    /// sync concern (command [`SYNC`]) and starts pushing, housekeeping and
    /// anti-entropy. The transport should require the same leasing mode of
    /// every peer ([`SyncConfig::hello_metadata`]); the `meshwork` facade
    /// does this.
    pub async fn start(concerns: &Concerns, config: SyncConfig) -> Result<SyncMap, SyncError> {
        config.validate()?;
        let ctx = concerns.context(SYNC);
        let me = ctx.node_id().clone();
        let replica = Replica::new(
            me,
            ReplicaConfig {
                leasing: config.leasing,
                lease_ms: span_ms(config.lease),
                tombstone_grace_ms: span_ms(config.tombstone_grace),
                max_skew_ms: span_ms(config.max_clock_skew),
                max_bytes: config.max_bytes,
            },
        );
        let (push_tx, push_rx) = mpsc::channel(config.push_queue.max(1));
        let (changes, _) = broadcast::channel(config.watch_capacity.max(1));
        let inner = Arc::new(Inner {
            replica: Mutex::new(replica),
            rounds: Semaphore::new(config.max_rounds.max(1)),
            cfg: config,
            push_tx,
            changes,
            counters: Counters::default(),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            cascade: Notify::new(),
            tree: std::sync::Mutex::new(Tree::new(65_536, Duration::from_secs(120))),
            in_rounds: std::sync::Mutex::new(std::collections::HashSet::new()),
            repair_due: Mutex::new(HashMap::new()),
        });
        concerns
            .add(SyncConcern {
                inner: inner.clone(),
            })
            .await?;
        let map = SyncMap { inner, ctx };
        map.spawn_tasks(push_rx);
        Ok(map)
    }

    fn spawn_tasks(&self, push_rx: mpsc::Receiver<(Bytes, Entry)>) {
        let inner = &self.inner;
        inner
            .tracker
            .spawn(pusher(inner.clone(), self.ctx.clone(), push_rx));
        inner.tracker.spawn(housekeeping(self.clone()));
        inner.tracker.spawn(anti_entropy(self.clone()));
        inner.tracker.close();
    }

    /// Stops pushing, housekeeping and anti-entropy and waits for them,
    /// then deletes this node's live ephemeral keys and tells the mesh (a
    /// push along the tree, and each neighbour until it acknowledges, at
    /// most 1 s in all), so that other nodes see them gone at
    /// once rather than after their ttl. Writes are refused from the start.
    /// (The node's concerns layer stops the sync concern itself; stopped
    /// that way, or killed, the node's ephemeral keys expire.)
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.tracker.wait().await;
        // After the tasks: no refresh can write a key again meanwhile.
        self.end_own_ephemeral().await;
    }

    /// Deletes this node's live ephemeral keys and sends the tombstones to
    /// the neighbours, within [`GOODBYE_WAIT`]. Once: the keys are
    /// forgotten as they are deleted.
    async fn end_own_ephemeral(&self) {
        let now = self.inner.now();
        let (written, changes) = lock(&self.inner.replica).end_own_ephemeral(now);
        self.inner.publish(changes);
        if written.is_empty() {
            return;
        }
        let n = written.len();
        let me = self.node_id().clone();
        let inner = &self.inner;
        let goodbye = async {
            for batch in written.chunks(inner.cfg.push_batch.max(1)) {
                let entries = inner.encode(batch, &me);
                // Along the tree, each node passing it on, as writes go.
                let push = inner.new_push(&me, entries.clone());
                inner.push_to_tree(&self.ctx, push, &[]).await;
                // And to every neighbour until it has applied them, before
                // the node closes its connections (as `confirm` does;
                // dropped at the timeout, what is left is aborted).
                self.entries_to_neighbours(entries, GOODBYE_WAIT).await;
            }
        };
        if tokio::time::timeout(GOODBYE_WAIT, goodbye).await.is_err() {
            debug!(
                keys = n,
                "not every neighbour heard that our ephemeral keys are gone"
            );
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        self.ctx.node_id()
    }

    /// Whether leasing is on.
    pub fn leasing(&self) -> bool {
        self.inner.cfg.leasing
    }

    fn check_sizes(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), SyncError> {
        let cfg = &self.inner.cfg;
        if key.is_empty() || key.len() > cfg.max_key_len {
            return Err(SyncError::TooLarge(format!(
                "key of {} bytes (1 to {} allowed)",
                key.len(),
                cfg.max_key_len
            )));
        }
        if let Some(v) = value {
            if v.len() > cfg.max_value_len {
                return Err(SyncError::TooLarge(format!(
                    "value of {} bytes (at most {} allowed)",
                    v.len(),
                    cfg.max_value_len
                )));
            }
        }
        Ok(())
    }

    async fn write(
        &self,
        key: Bytes,
        value: Option<Bytes>,
        what: Write,
    ) -> Result<Entry, SyncError> {
        self.check_sizes(&key, value.as_deref())?;
        if self.inner.cancel.is_cancelled() {
            return Err(SyncError::Shutdown);
        }
        let now = self.inner.now();
        let (entry, changes) = lock(&self.inner.replica).write(key.clone(), value, what, now)?;
        self.inner.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.publish(changes);
        self.inner
            .push_tx
            .send((key, entry.clone()))
            .await
            .map_err(|_| SyncError::Shutdown)?;
        Ok(entry)
    }

    /// Sets `key` to `value`. Returns the version once the write is applied
    /// locally and queued for the mesh. With leasing on, this node then
    /// holds the key's lease; [`SyncError::LeaseHeld`] if another node
    /// holds a live one.
    pub async fn set(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
    ) -> Result<Stamp, SyncError> {
        let key = Bytes::copy_from_slice(key.as_ref());
        Ok(self.write(key, Some(value.into()), Write::Set).await?.stamp)
    }

    /// Sets `key` to `value` as [`set`](Self::set) does, with a lease of
    /// `lease` from this write instead of the configured one
    /// ([`SyncConfig::with_lease`]): a key that another node may take soon
    /// after this one stops writing it (say, a job's state when its worker
    /// dies), where the default lease would keep it for an hour. Each later
    /// write by this node renews the lease by its own length. `lease` is
    /// at least 1 ms (and at most about 146 million years). With leasing off
    /// it is the same as `set`.
    pub async fn set_leased(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        lease: Duration,
    ) -> Result<Stamp, SyncError> {
        let key = Bytes::copy_from_slice(key.as_ref());
        let lease_ms = span_ms(lease).max(1);
        let what = Write::SetLeased { lease_ms };
        Ok(self.write(key, Some(value.into()), what).await?.stamp)
    }

    /// Sets many pairs (`dict.update`); stops at the first refusal.
    pub async fn update<K, V>(
        &self,
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Result<(), SyncError>
    where
        K: AsRef<[u8]>,
        V: Into<Bytes>,
    {
        for (k, v) in pairs {
            self.set(k, v).await?;
        }
        Ok(())
    }

    /// Sets a key that disappears everywhere `ttl` after its owner (this
    /// node) stops refreshing it; the node refreshes it while it runs. It is
    /// leased to this node for as long as it lives.
    pub async fn set_ephemeral(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        ttl: Duration,
    ) -> Result<Stamp, SyncError> {
        let key = Bytes::copy_from_slice(key.as_ref());
        let ttl_ms = span_ms(ttl).max(1);
        Ok(self
            .write(key, Some(value.into()), Write::Ephemeral { ttl_ms })
            .await?
            .stamp)
    }

    /// Deletes `key` (a tombstone, under the same lease rules) and returns
    /// its value; [`SyncError::NotFound`] if it has none.
    pub async fn pop(&self, key: impl AsRef<[u8]>) -> Result<Bytes, SyncError> {
        let key = Bytes::copy_from_slice(key.as_ref());
        let Some(value) = self.get(&key) else {
            return Err(SyncError::NotFound(key));
        };
        self.write(key, None, Write::Delete).await?;
        Ok(value)
    }

    /// Deletes `key` if it holds a value; returns whether it did.
    pub async fn remove(&self, key: impl AsRef<[u8]>) -> Result<bool, SyncError> {
        match self.pop(key).await {
            Ok(_) => Ok(true),
            Err(SyncError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes and returns some pair this node may delete (one it holds the
    /// lease on, or an unleased one); `None` if there is none.
    pub async fn popitem(&self) -> Result<Option<(Bytes, Bytes)>, SyncError> {
        let now = self.inner.now();
        let candidate = {
            let replica = lock(&self.inner.replica);
            let me = replica.me().clone();
            let leasing = replica.leasing();
            replica
                .live(now)
                .find(|(_, e)| !leasing || e.writer == me || !e.lease_live(now))
                .map(|(k, e)| (k.clone(), e.value.clone().unwrap_or_default()))
        };
        match candidate {
            Some((k, v)) => {
                self.write(k.clone(), None, Write::Delete).await?;
                Ok(Some((k, v)))
            }
            None => Ok(None),
        }
    }

    /// Gives up this node's lease on `key`, keeping the value: any node may
    /// write it from now on. [`SyncError::LeaseHeld`] if another node holds
    /// it, [`SyncError::NotFound`] if the key has no value.
    pub async fn release(&self, key: impl AsRef<[u8]>) -> Result<Stamp, SyncError> {
        let key = Bytes::copy_from_slice(key.as_ref());
        Ok(self.write(key, None, Write::Release).await?.stamp)
    }

    /// The value of `key`.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Option<Bytes> {
        let now = self.inner.now();
        lock(&self.inner.replica)
            .get(key.as_ref(), now)
            .and_then(|e| e.value.clone())
    }

    /// The value of `key` as UTF-8 text (`None` if absent or not UTF-8).
    pub fn get_str(&self, key: impl AsRef<[u8]>) -> Option<String> {
        self.get(key)
            .and_then(|v| String::from_utf8(v.to_vec()).ok())
    }

    /// The value of `key` with its version, writer, lease and expiry.
    pub fn entry(&self, key: impl AsRef<[u8]>) -> Option<EntryInfo> {
        let now = self.inner.now();
        let replica = lock(&self.inner.replica);
        let e = replica.get(key.as_ref(), now)?;
        Some(EntryInfo {
            value: e.value.clone().unwrap_or_default(),
            version: e.stamp,
            writer: e.writer.clone(),
            lease: replica.lease_of(e, now),
            expires_at_ms: (e.expires_at != 0).then_some(e.expires_at),
        })
    }

    /// The map's clock (ms since the Unix epoch): what expiries and leases
    /// are measured against, e.g. [`EntryInfo::expires_at_ms`].
    pub fn now_ms(&self) -> u64 {
        self.inner.now()
    }

    /// [`now_ms`](Self::now_ms) at `at`, a reading of tokio's clock the
    /// caller has just taken: the map's clock then need not read it again
    /// (see [`Clock::now_ms_at`](crate::Clock::now_ms_at)).
    pub fn now_ms_at(&self, at: tokio::time::Instant) -> u64 {
        self.inner.cfg.clock.now_ms_at(at)
    }

    /// True if `key` holds a value.
    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> bool {
        let now = self.inner.now();
        lock(&self.inner.replica).get(key.as_ref(), now).is_some()
    }

    /// The live lease on `key`: owner and expiry.
    pub fn lease(&self, key: impl AsRef<[u8]>) -> Option<Lease> {
        let now = self.inner.now();
        lock(&self.inner.replica).lease(key.as_ref(), now)
    }

    /// Every key holding a value, sorted.
    pub fn keys(&self) -> Vec<Bytes> {
        self.items().into_iter().map(|(k, _)| k).collect()
    }

    /// Every value, in key order.
    pub fn values(&self) -> Vec<Bytes> {
        self.items().into_iter().map(|(_, v)| v).collect()
    }

    /// Every pair, sorted by key.
    pub fn items(&self) -> Vec<(Bytes, Bytes)> {
        self.snapshot().into_iter().collect()
    }

    /// The pairs whose key starts with `prefix`, sorted by key.
    pub fn prefixed(&self, prefix: impl AsRef<[u8]>) -> Vec<(Bytes, Bytes)> {
        let prefix = prefix.as_ref();
        let now = self.inner.now();
        lock(&self.inner.replica)
            .live_prefixed(prefix, now)
            .map(|(k, e)| (k.clone(), e.value.clone().unwrap_or_default()))
            .collect()
    }

    /// The entries whose key starts with `prefix`, sorted by key, with
    /// their versions, writers, leases and expiry (one consistent view).
    pub fn prefixed_entries(&self, prefix: impl AsRef<[u8]>) -> Vec<(Bytes, EntryInfo)> {
        self.prefixed_entries_page(prefix, None, usize::MAX, usize::MAX)
            .0
    }

    /// One page of [`prefixed_entries`](Self::prefixed_entries): the entries
    /// whose key starts with `prefix` and sorts after `after` (from the first
    /// without it), sorted by key, at most `limit` of them and no more once
    /// their keys and values reach `max_bytes` (at least one entry, however
    /// large, and whatever `limit` says: a page is never empty while entries
    /// follow, so following pages always ends); and
    /// whether more follow. The next page starts after the last key of this
    /// one. Bounds what listing a large map holds in memory at once.
    pub fn prefixed_entries_page(
        &self,
        prefix: impl AsRef<[u8]>,
        after: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> (Vec<(Bytes, EntryInfo)>, bool) {
        let prefix = prefix.as_ref();
        let now = self.inner.now();
        let replica = lock(&self.inner.replica);
        let mut entries = replica.live_prefixed_after(prefix, after, now).peekable();
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        while out.is_empty() || (out.len() < limit && bytes < max_bytes) {
            let Some((k, e)) = entries.next() else { break };
            let value = e.value.clone().unwrap_or_default();
            bytes = bytes.saturating_add(k.len() + value.len());
            let info = EntryInfo {
                value,
                version: e.stamp,
                writer: e.writer.clone(),
                lease: replica.lease_of(e, now),
                expires_at_ms: (e.expires_at != 0).then_some(e.expires_at),
            };
            out.push((k.clone(), info));
        }
        let more = entries.peek().is_some();
        (out, more)
    }

    /// The settings this map runs with.
    pub fn config(&self) -> &SyncConfig {
        &self.inner.cfg
    }

    /// A copy of the whole map (py2p's `copy`).
    pub fn snapshot(&self) -> std::collections::BTreeMap<Bytes, Bytes> {
        let now = self.inner.now();
        lock(&self.inner.replica)
            .live(now)
            .map(|(k, e)| (k.clone(), e.value.clone().unwrap_or_default()))
            .collect()
    }

    /// Keys holding a value.
    pub fn len(&self) -> usize {
        let now = self.inner.now();
        lock(&self.inner.replica).live(now).count()
    }

    /// True if no key holds a value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A hash of the whole replica, tombstones and lease fields included:
    /// two nodes with the same digest hold the same entries.
    pub fn digest(&self) -> u64 {
        lock(&self.inner.replica).root()
    }

    /// Changes to keys starting with `prefix` (empty: all), as they are
    /// applied locally: this node's own writes too, and every rewrite,
    /// including one with the same value. An ephemeral key's owner
    /// rewrites it every third of its ttl, so a watch of it sees a `Set`
    /// that often; compare with the value held before to see a new one.
    /// A lease that lapses or is released is told too
    /// ([`ChangeKind::LeaseLapsed`]), though nothing is written.
    pub fn watch(&self, prefix: impl AsRef<[u8]>) -> Watch {
        Watch {
            rx: self.inner.changes.subscribe(),
            prefix: Bytes::copy_from_slice(prefix.as_ref()),
            stopped: self.inner.cancel.clone(),
        }
    }

    /// Counters and sizes.
    pub fn stats(&self) -> SyncStats {
        let c = &self.inner.counters;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (entries, bytes, digest) = {
            let replica = lock(&self.inner.replica);
            (replica.entries(), replica.bytes(), replica.root())
        };
        SyncStats {
            keys: self.len(),
            entries,
            bytes,
            max_bytes: self.inner.cfg.max_bytes,
            digest,
            writes: r(&c.writes),
            applied: r(&c.applied),
            stale: r(&c.stale),
            refused: r(&c.refused),
            refused_full: r(&c.refused_full),
            pushes: r(&c.pushes),
            duplicates: r(&c.duplicates),
            lazy_links: lock(&self.inner.tree).lazy_count(),
            pushed_entries: r(&c.pushed_entries),
            push_failures: r(&c.push_failures),
            rounds: r(&c.rounds),
            rounds_equal: r(&c.rounds_equal),
            round_failures: r(&c.round_failures),
            rounds_cut: r(&c.rounds_cut),
            pulled: r(&c.pulled),
            sent: r(&c.sent),
            lease_lost: r(&c.lease_lost),
            lease_lapsed: r(&c.lease_lapsed),
        }
    }

    /// Waits until every currently connected peer has applied the entry
    /// this node holds for `key` (or a later one): sends it to each and
    /// waits for their acknowledgements. A peer holding an entry of the key
    /// that beats this node's answers with it, and it is merged before this
    /// returns: a claim that lost to one a neighbour knows of shows as lost
    /// ([`lease`](Self::lease), [`ChangeKind::LeaseLost`]) once this returns.
    /// Only the current neighbours are asked (none: `Ok(0)`), not a majority
    /// of the mesh. Returns how many peers confirmed;
    /// [`SyncError::NotConfirmed`] lists those that did not within
    /// `timeout` (over 100 years, up to `Duration::MAX`, counts as 100
    /// years).
    pub async fn confirm(
        &self,
        key: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Result<usize, SyncError> {
        // Added to an instant below: `Duration::MAX` would overflow.
        let wait = timeout.min(FOREVER);
        let key = Bytes::copy_from_slice(key.as_ref());
        let entry = lock(&self.inner.replica).entry(&key).cloned();
        let Some(entry) = entry else {
            return Err(SyncError::NotFound(key));
        };
        let entries = vec![entry.to_proto(&key, self.node_id())];
        let (peers, missing) = self.entries_to_neighbours(entries, wait).await;
        if missing.is_empty() {
            Ok(peers.len())
        } else {
            Err(SyncError::NotConfirmed {
                peers: peers.len(),
                missing,
                after: timeout,
            })
        }
    }

    /// Sends `entries` to every neighbour as a request and waits, `wait`
    /// at most, until each has applied them: the neighbours asked, and
    /// those that did not acknowledge.
    async fn entries_to_neighbours(
        &self,
        entries: Vec<proto::Entry>,
        wait: Duration,
    ) -> (Vec<NodeId>, Vec<NodeId>) {
        let keys: Arc<HashSet<Bytes>> = Arc::new(entries.iter().map(|e| e.key.clone()).collect());
        let body = Body::Entries(proto::Entries {
            entries,
            repair: false,
        });
        let payload = Bytes::from(proto::SyncMessage { body: Some(body) }.encode_to_vec());
        let peers = self.ctx.peers().neighbours();
        let mut set = tokio::task::JoinSet::new();
        for peer in peers.clone() {
            let ctx = self.ctx.clone();
            let payload = payload.clone();
            let keys = keys.clone();
            set.spawn(async move {
                let ack = ctx
                    .request_with(&peer, payload, wait, Priority::Control)
                    .await
                    .ok()
                    .and_then(|b| match crate::message::decode(b).ok()?.body {
                        Some(Body::Ack(ack)) => Some(ack),
                        _ => None,
                    });
                // Only entries of the keys asked about: the rest would be
                // a push no one made.
                let newer = ack.as_ref().map(|a| {
                    a.newer
                        .iter()
                        .filter(|e| keys.contains(&e.key))
                        .cloned()
                        .collect::<Vec<_>>()
                });
                (peer, newer)
            });
        }
        let mut missing = Vec::new();
        while let Some(done) = set.join_next().await {
            match done {
                Ok((peer, Some(newer))) => {
                    // Merged before confirm returns: a claim that lost to
                    // one the neighbour holds shows as lost at once.
                    if !newer.is_empty() {
                        self.inner.apply(&peer, newer);
                    }
                }
                Ok((peer, None)) => missing.push(peer),
                Err(e) => warn!(error = %e, "confirm task failed"),
            }
        }
        (peers, missing)
    }

    /// Runs one anti-entropy round with `peer` now: compares digests, pulls
    /// the entries of the buckets that differ and pushes back what the peer
    /// lacks. Returns the entries received and sent.
    pub async fn sync_with(&self, peer: &NodeId) -> Result<(u64, u64), SyncError> {
        let _permit = self
            .inner
            .rounds
            .acquire()
            .await
            .map_err(|_| SyncError::Shutdown)?;
        // A whole round is bounded, not only each request: a peer that
        // answers slowly but forever must not hold the rounds permit.
        let limit = self.inner.cfg.round_timeout;
        let r = tokio::time::timeout(limit, self.round(peer))
            .await
            .unwrap_or(Err(SyncError::Concerns(ConcernsError::Timeout(limit))));
        let c = &self.inner.counters;
        c.rounds.fetch_add(1, Ordering::Relaxed);
        match &r {
            Ok(None) => {
                c.rounds_equal.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some((pulled, sent))) => {
                c.pulled.fetch_add(*pulled, Ordering::Relaxed);
                c.sent.fetch_add(*sent, Ordering::Relaxed);
            }
            Err(e) => {
                c.round_failures.fetch_add(1, Ordering::Relaxed);
                debug!(peer = %peer.short(), error = %e, "anti-entropy round failed");
            }
        }
        r.map(|o| o.unwrap_or((0, 0)))
    }

    async fn ask(&self, peer: &NodeId, body: Body, priority: Priority) -> Result<Body, SyncError> {
        let payload = proto::SyncMessage { body: Some(body) }.encode_to_vec();
        let reply = self
            .ctx
            .request_with(peer, payload, self.inner.cfg.request_timeout, priority)
            .await?;
        crate::message::decode(reply)
            .ok()
            .and_then(|m| m.body)
            .ok_or_else(|| {
                SyncError::Concerns(meshwork_concerns::ConcernsError::Decode(
                    "sync reply".into(),
                ))
            })
    }

    /// `Ok(None)`: the replicas were equal.
    async fn round(&self, peer: &NodeId) -> Result<Option<(u64, u64)>, SyncError> {
        let root = self.digest();
        let Body::Answer(answer) = self
            .ask(
                peer,
                Body::Digest(proto::DigestQuery { root }),
                Priority::Normal,
            )
            .await?
        else {
            return Err(bad_reply());
        };
        if answer.equal {
            return Ok(None);
        }
        if answer.buckets.len() != BUCKETS {
            return Err(bad_reply());
        }
        let ours = lock(&self.inner.replica).bucket_hashes();
        let differ: Vec<u32> = (0..BUCKETS)
            .filter(|&i| ours[i] != answer.buckets[i])
            .map(|i| i as u32)
            .collect();
        if differ.is_empty() {
            return Ok(Some((0, 0)));
        }
        // Pull theirs, remembering what they hold, then push back what they
        // lack or hold older.
        let mut theirs: HashMap<Bytes, u64> = HashMap::new();
        let mut pulled = 0u64;
        let mut changed = false;
        let mut after: Option<(u32, Bytes)> = None;
        let mut pulls = 0;
        // Set when the round stops pulling at the limit: the first bucket
        // not pulled in full.
        let mut cut_at: Option<u32> = None;
        loop {
            let pull = proto::Pull {
                buckets: differ.clone(),
                resume: after.is_some(),
                after_bucket: after.as_ref().map_or(0, |a| a.0),
                after_key: after.as_ref().map(|a| a.1.clone()).unwrap_or_default(),
            };
            // Beyond our repair rate at the peer, wait and ask again (an
            // honest peer's large map comes at that rate; the round's
            // timeout bounds the whole).
            let reply = loop {
                match self
                    .ask(peer, Body::Pull(pull.clone()), Priority::Bulk)
                    .await
                {
                    Err(e) if over_repair_rate(&e) => tokio::time::sleep(REPAIR_RATE_WAIT).await,
                    r => break r?,
                }
            };
            let Body::Chunk(chunk) = reply else {
                return Err(bad_reply());
            };
            pulls += 1;
            pulled += chunk.entries.len() as u64;
            let entries = self.inner.decode(peer, chunk.entries);
            for (k, e) in &entries {
                theirs.insert(k.clone(), e.hash(k));
            }
            if self.inner.merge(entries) > 0 {
                changed = true;
            }
            if !chunk.more {
                break;
            }
            let next = (chunk.next_bucket, chunk.next_key);
            // Chunks follow the (bucket, key) order: a resume point that
            // does not move strictly forward would pull forever.
            if after.as_ref().is_some_and(|a| next <= *a) {
                self.inner
                    .counters
                    .rounds_cut
                    .fetch_add(1, Ordering::Relaxed);
                warn!(
                    peer = %peer.short(),
                    bucket = next.0,
                    "anti-entropy round ended: the peer's chunks do not move forward"
                );
                return Err(SyncError::Concerns(ConcernsError::Decode(
                    "sync chunk: the resume point does not move forward".into(),
                )));
            }
            if pulls >= MAX_PULLS_PER_ROUND {
                self.inner
                    .counters
                    .rounds_cut
                    .fetch_add(1, Ordering::Relaxed);
                debug!(
                    peer = %peer.short(),
                    pulls,
                    bucket = next.0,
                    "anti-entropy round stops pulling at its limit"
                );
                cut_at = Some(next.0);
                break;
            }
            after = Some(next);
        }
        // Only the buckets pulled in full can be compared with ours.
        let differ: Vec<u32> = match cut_at {
            Some(cut) => differ.into_iter().filter(|&b| b < cut).collect(),
            None => differ,
        };
        // A peer far behind us (a late joiner) pulls what it lacks in its
        // own round; pushing it too would send the map twice, or once per
        // neighbour that connects to it.
        // `entries` is the peer's word: saturating, as it may be any u64.
        let ours_n = lock(&self.inner.replica).entries() as u64;
        if ours_n > answer.entries.saturating_mul(2).saturating_add(64) {
            return Ok(Some((pulled, 0)));
        }
        let to_send: Vec<Bytes> = lock(&self.inner.replica)
            .hashes_in(&differ)
            .into_iter()
            .filter(|(k, h)| theirs.get(k) != Some(h))
            .map(|(k, _)| k)
            .collect();
        if changed {
            // What we learnt may be news to our other neighbours too; and
            // the link to this peer should carry pushes again.
            self.inner.cascade.notify_one();
            lock(&self.inner.tree).graft(peer);
            let _ = send(&self.ctx, peer, Body::Graft(proto::Graft {})).await;
        }
        let mut sent = 0u64;
        let mut next = 0;
        while next < to_send.len() {
            // Chunks bounded by count and bytes, like the pulls.
            let entries: Vec<proto::Entry> = {
                let replica = lock(&self.inner.replica);
                let mut entries = Vec::new();
                let mut bytes = 0;
                while next < to_send.len()
                    && entries.len() < self.inner.cfg.chunk_entries.max(1)
                    && (entries.is_empty() || bytes < self.inner.cfg.chunk_bytes)
                {
                    let k = &to_send[next];
                    next += 1;
                    if let Some(e) = replica.entry(k) {
                        bytes += k.len() + e.value.as_ref().map_or(0, |v| v.len()) + 64;
                        entries.push(e.to_proto(k, self.node_id()));
                    }
                }
                entries
            };
            if entries.is_empty() {
                continue;
            }
            // Pushed back within the peer's repair rate, as pulls are
            // answered: a member claiming a huge map but sending none, and
            // starting rounds at will, had the whole map pushed to it at
            // every round (807 MB in 15 s in the audit).
            if !self.inner.within_repair_rate(peer) {
                debug!(peer = %peer.short(), "repairs not pushed: over the peer's repair rate");
                break;
            }
            let repairs = proto::Entries {
                entries,
                repair: true,
            };
            self.inner.charge_repair(peer, repairs.encoded_len());
            sent += repairs.entries.len() as u64;
            let Body::Ack(_) = self
                .ask(peer, Body::Entries(repairs), Priority::Bulk)
                .await?
            else {
                return Err(bad_reply());
            };
        }
        Ok(Some((pulled, sent)))
    }
}

/// The longest a timeout counts for ([`meshwork_concerns::peers::FOREVER`]).
pub(crate) const FOREVER: Duration = meshwork_concerns::peers::FOREVER;

/// A lease or time to live in ms, cut to [`MAX_SPAN_MS`] (so that adding
/// it to a time cannot overflow, and peers accept it).
fn span_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).map_or(MAX_SPAN_MS, |ms| ms.min(MAX_SPAN_MS))
}

fn bad_reply() -> SyncError {
    SyncError::Concerns(meshwork_concerns::ConcernsError::Decode(
        "unexpected sync reply".into(),
    ))
}

/// A stream of changes to keys with a prefix ([`SyncMap::watch`]).
#[derive(Debug)]
pub struct Watch {
    rx: broadcast::Receiver<Change>,
    prefix: Bytes,
    /// The map's cancellation: the channel itself closes only when the
    /// last handle of the map is dropped, which a stopped node's handles
    /// (kept by the application) may never be.
    stopped: CancellationToken,
}

impl Watch {
    /// The next change. [`SyncError::Lagged`] if this watcher fell behind
    /// and changes were skipped (it can carry on);
    /// [`SyncError::Shutdown`] once the map has stopped
    /// ([`SyncMap::shutdown`], or the node's shutdown) and the changes
    /// made before are taken.
    pub async fn recv(&mut self) -> Result<Change, SyncError> {
        loop {
            // The changes waiting first, then the stop.
            let r = tokio::select! {
                biased;
                r = self.rx.recv() => r,
                () = self.stopped.cancelled() => {
                    return self.try_recv()?.ok_or(SyncError::Shutdown);
                }
            };
            match r {
                Ok(c) if c.key.starts_with(&self.prefix) => return Ok(c),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => return Err(SyncError::Lagged(n)),
                Err(broadcast::error::RecvError::Closed) => return Err(SyncError::Shutdown),
            }
        }
    }

    /// The next change if one is waiting, without waiting (`Ok(None)`:
    /// none is, and the map runs); errors as [`recv`](Self::recv). A
    /// change is waiting here as soon as the write or merge that made it
    /// returns.
    pub fn try_recv(&mut self) -> Result<Option<Change>, SyncError> {
        use broadcast::error::TryRecvError;
        loop {
            match self.rx.try_recv() {
                Ok(c) if c.key.starts_with(&self.prefix) => return Ok(Some(c)),
                Ok(_) => {}
                Err(TryRecvError::Empty) if self.stopped.is_cancelled() => {
                    return Err(SyncError::Shutdown);
                }
                Err(TryRecvError::Empty) => return Ok(None),
                Err(TryRecvError::Lagged(n)) => return Err(SyncError::Lagged(n)),
                Err(TryRecvError::Closed) => return Err(SyncError::Shutdown),
            }
        }
    }
}

/// Sends a one-way sync message to a neighbour.
async fn send(ctx: &Context, peer: &NodeId, body: Body) -> Result<(), ConcernsError> {
    let payload = proto::SyncMessage { body: Some(body) }.encode_to_vec();
    ctx.send(peer, payload).await
}

/// Sends local writes to the mesh along the broadcast tree: one push per
/// batch, where a batch is whatever queued up while the previous one went
/// out.
async fn pusher(inner: Arc<Inner>, ctx: Context, mut rx: mpsc::Receiver<(Bytes, Entry)>) {
    let me = ctx.node_id().clone();
    loop {
        let first = tokio::select! {
            _ = inner.cancel.cancelled() => break,
            next = rx.recv() => match next {
                Some(w) => w,
                None => return,
            },
        };
        push_batch(&inner, &ctx, &me, first, &mut rx).await;
    }
    // Stopping: the writes still queued go out too (`set` returned once
    // they were queued for the mesh), within the goodbye's bound. A review
    // lost 2 304 of 2 560 writes made just before a graceful shutdown.
    let drain = async {
        while let Ok(first) = rx.try_recv() {
            push_batch(&inner, &ctx, &me, first, &mut rx).await;
        }
    };
    if tokio::time::timeout(GOODBYE_WAIT, drain).await.is_err() {
        debug!("not every write queued at shutdown was pushed");
    }
}

/// Pushes `first` and what else is queued behind it (up to a batch) along
/// the tree.
async fn push_batch(
    inner: &Inner,
    ctx: &Context,
    me: &NodeId,
    first: (Bytes, Entry),
    rx: &mut mpsc::Receiver<(Bytes, Entry)>,
) {
    let mut batch = vec![first];
    let mut bytes = 0;
    while batch.len() < inner.cfg.push_batch && bytes < inner.cfg.push_batch_bytes {
        match rx.try_recv() {
            Ok((k, e)) => {
                bytes += k.len() + e.value.as_ref().map_or(0, |v| v.len());
                batch.push((k, e));
            }
            Err(_) => break,
        }
    }
    // Only the latest write of a key in a batch matters.
    let mut latest: HashMap<Bytes, usize> = HashMap::new();
    for (i, (k, _)) in batch.iter().enumerate() {
        latest.insert(k.clone(), i);
    }
    let entries: Vec<proto::Entry> = batch
        .iter()
        .enumerate()
        .filter(|(i, (k, _))| latest.get(k) == Some(i))
        .map(|(_, (k, e))| e.to_proto(k, me))
        .collect();
    let n = entries.len() as u64;
    let push = inner.new_push(me, entries);
    if inner.push_to_tree(ctx, push, &[]).await > 0 {
        inner.counters.pushes.fetch_add(1, Ordering::Relaxed);
        inner
            .counters
            .pushed_entries
            .fetch_add(n, Ordering::Relaxed);
    } else if !ctx.peers().neighbours().is_empty() {
        inner.counters.push_failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// Expires ephemeral keys, collects old tombstones, refreshes our own
/// ephemeral keys.
async fn housekeeping(map: SyncMap) {
    let inner = map.inner.clone();
    let mut timer = tokio::time::interval(inner.cfg.sweep_interval);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = timer.tick() => {}
        }
        let now = inner.now();
        let (changes, due) = {
            let mut replica = lock(&inner.replica);
            (replica.sweep(now), replica.refresh_due(now))
        };
        inner.publish(changes);
        for (key, value, ttl_ms) in due {
            let r = map
                .write(key.clone(), Some(value), Write::Ephemeral { ttl_ms })
                .await;
            match r {
                Ok(_) => {}
                Err(SyncError::LeaseHeld { owner, .. }) => {
                    debug!(owner = %owner.short(), "an ephemeral key of ours was claimed by another node");
                    lock(&inner.replica).forget_ephemeral(&key);
                }
                Err(e) => debug!(error = %e, "ephemeral refresh failed"),
            }
        }
    }
}

/// A round with a random peer every interval, and one with every new peer
/// at once (late joiners and healed partitions converge without waiting).
async fn anti_entropy(map: SyncMap) {
    let inner = map.inner.clone();
    let mut events = map.ctx.peers().events();
    let mut timer = tokio::time::interval(inner.cfg.anti_entropy_interval);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer.tick().await;
    loop {
        let peers = tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = timer.tick() => {
                let peers = map.ctx.peers().neighbours();
                match peers.choose(&mut rand::rng()) {
                    Some(p) => vec![p.clone()],
                    None => continue,
                }
            }
            _ = inner.cascade.notified() => map.ctx.peers().neighbours(),
            event = events.recv() => match event {
                Ok(PeerEvent::Connected { peer, .. }) => vec![peer],
                Ok(PeerEvent::Disconnected { .. }) => {
                    // The tree may have lost a branch: regrow it.
                    lock(&inner.tree).reset();
                    continue;
                }
                Ok(_) | Err(PeersError::Lagged(_)) => continue,
                // The peer manager is gone: the node is stopping.
                Err(_) => return,
            },
        };
        for peer in peers {
            if !lock(&inner.in_rounds).insert(peer.clone()) {
                continue;
            }
            let map = map.clone();
            let cancel = inner.cancel.clone();
            inner.tracker.spawn(async move {
                // Taken out of the rounds in progress however the round
                // ends, a panic included: a round that panicked used to
                // leave the peer marked for good, and no round ran with it
                // again (mutation fuzzing found such a panic).
                let _in_round = InRound {
                    inner: map.inner.clone(),
                    peer: peer.clone(),
                };
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = map.sync_with(&peer) => {}
                }
            });
        }
    }
}

/// A peer's place in the rounds in progress, given up when dropped.
struct InRound {
    inner: Arc<Inner>,
    peer: NodeId,
}

impl Drop for InRound {
    fn drop(&mut self) {
        lock(&self.inner.in_rounds).remove(&self.peer);
    }
}

#[cfg(test)]
mod tests;
