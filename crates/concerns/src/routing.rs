//! The routing concern ("ask-around"): reach nodes that are not neighbours.
//!
//! - To find `target`, the origin floods a `RouteQuery` (bounded by its TTL
//!   and deduplicated by `(origin, query_id)`, so it is loop-free). Every
//!   node it passes learns the way back to the origin, once it has checked
//!   the query's stamp (within half the seen-cache lifetime of its clock)
//!   and the origin's signature: a query "from" a node made up by a member
//!   drew the traffic for that node into the member. The target answers
//!   `RouteFound`, which walks back along the learnt path; every node on
//!   the way learns the next hop to the target.
//! - Only the target answers, and it signs its answer (XEdDSA under its node
//!   id, over the query id, origin and target). A neighbour of the target
//!   passes the query to it rather than answering for it. Every node checks
//!   the signature before it learns the route or passes the answer on, so
//!   a member can no longer claim a way to a node it cannot reach and draw
//!   its traffic into a black hole; the neighbour that hands over an answer
//!   whose signature does not hold made it up, and is banned.
//! - A `Routed` message then goes hop by hop by the route table. Every hop
//!   remembers the neighbour a request came from (by origin and request
//!   id), and its answer goes back that way: the request may have followed
//!   routes the origin's query never taught the hops on the way back.
//!   Routed frames only keep alive a route through their sender; they never
//!   make or change one (the origin they claim is not checked).
//! - Route answers are taken only for queries seen, once per neighbour;
//!   "0 hops" only from the target itself. The target answers each
//!   neighbour that brings it a query once (the way the first copy came may
//!   be gone before the answer goes back).
//! - A search asks the neighbours the node has when it starts, and each one
//!   that becomes responsive while it runs (`late_asks`): a node joining the
//!   mesh starts with none. An answer whose route is gone by the time the
//!   searcher looks does not end the search.
//! - "Not through me" (`RouteNotFound`) makes a search that cannot succeed
//!   end early, as an echo wave: a node answers it to a neighbour that
//!   passes it a query it has seen already or that it can pass to nobody,
//!   and, for the first copy, once every neighbour it passed the query to
//!   has answered so. The origin reports the target unreachable once every
//!   neighbour it asked has answered so and its own neighbourhood has been
//!   the same for a second ([`SETTLE`]: a neighbour being redialled, or one
//!   arriving as the node joins, is asked when it comes), not after the
//!   search timeout (`exhausted`). A neighbour that leaves before it answers
//!   makes the wave say nothing more (its part of the mesh may still answer
//!   by another way), and at the origin is asked again if it comes back. A
//!   node whose first copy came with no hops left says nothing and passes
//!   on a later copy that has some. Nodes that stay silent leave the search
//!   to its timeout, as before; an answer that comes after its search
//!   ended still teaches the route (`late_answers`).
//! - A hop with no route (or out of TTL) answers a request with an error
//!   `UNREACHABLE` routed back to the origin, which forgets the route; so
//!   does a routed request that times out.
//! - Routes expire, and those through a neighbour that disconnects are
//!   dropped at once.
//! - A search that finds nothing is not made again for one search timeout
//!   while this node's neighbours stay the same: sends to that target fail
//!   at once meanwhile (counted `held_back`), so a caller that keeps sending
//!   to a node that is gone neither waits out a search per send nor floods
//!   the mesh with a query per send.
//! - A routed message's payload is sealed by its origin for its target
//!   with the key the two share ([`PairKey`]), bound to its header (origin,
//!   target, command, request id, kind, stamp). The hops on the way can
//!   drop it but not read, alter or forge it; the target refuses what does
//!   not open, and requests it has seen already or stamped outside its
//!   clock window (see `replay`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use meshwork_peers::transport::{Identity, PairKey, Priority, verify};
use meshwork_peers::wire::NodeId;
use meshwork_peers::wire::proto::route_message::Body;
use meshwork_peers::wire::proto::{
    ConcernKind, ErrorCode, RouteFound, RouteMessage, RouteNotFound, RouteQuery, Routed,
};
use prost::Message as _;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::clock::WallClock;
use crate::manager::{ConcernsConfig, FORWARD_WAIT, Inner, Job, ROUTING, ReplyPath, error_payload};
use crate::replay::{ReplayGuard, Verdict};
use crate::route::RouteTable;
use crate::seen::SeenCache;
use crate::warn::WarnBudget;
use crate::{BoxError, Concern, ConcernsError, Context, Reply, Route};

/// Removes a search's entry when its first searcher is done or dropped.
struct SearchGuard<'a> {
    searches: &'a Mutex<HashMap<NodeId, Search>>,
    target: NodeId,
}

impl Drop for SearchGuard<'_> {
    fn drop(&mut self) {
        lock(self.searches).remove(&self.target);
    }
}

/// A search in progress: its query, and a watch bumped at every change
/// its waiters may care about (an answer, a "not through me", a neighbour
/// asked or gone).
struct Search {
    query_id: u64,
    progress: watch::Sender<u64>,
    /// The signed query as sent (empty until it is): a neighbour that
    /// arrives during the search is asked too.
    query: Bytes,
    /// The neighbours asked while they stay connected (each once).
    asked: HashSet<NodeId>,
    /// Those of them whose answer is still awaited.
    waiting: HashSet<NodeId>,
    /// Neighbours asked that left (or could not be sent the query) before
    /// they answered: while one of them has not been asked again (when it
    /// is back), the search is not exhausted. Its way may still bring an
    /// answer, by another route, and a neighbour that comes back may have
    /// lost the query with its connection.
    gone: HashSet<NodeId>,
    /// Whether a neighbour has answered "not through me": a search that
    /// has heard nothing is never exhausted (on a node without neighbours,
    /// it waits its timeout for one to arrive, and asks it).
    refused: bool,
    /// True until the neighbours the node had at the start have been asked.
    asking: bool,
}

impl Search {
    /// Whether every neighbour asked has answered "not through me" and none
    /// left without answering (whether the search may end as exhausted
    /// also depends on this node's neighbourhood: see [`SETTLE`]).
    fn refused_everywhere(&self) -> bool {
        self.refused && !self.asking && self.waiting.is_empty() && self.gone.is_empty()
    }

    /// `peer` answered "not through me": whether it was awaited.
    fn refuse(&mut self, peer: &NodeId) -> bool {
        if !self.waiting.remove(peer) {
            return false;
        }
        self.refused = true;
        true
    }

    /// `peer` left, or its query could not be sent. If its answer was still
    /// awaited, it is asked again when it comes back, and the search waits
    /// for that (or its timeout); its "not through me", if it said so
    /// already, stands.
    fn lose(&mut self, peer: &NodeId) -> bool {
        if !self.waiting.remove(peer) {
            return false;
        }
        self.asked.remove(peer);
        self.gone.insert(peer.clone());
        true
    }

    /// Whether `peer` is to be asked now (and if so, counts it as asked).
    fn take_asked(&mut self, peer: &NodeId) -> bool {
        if self.query.is_empty() || !self.asked.insert(peer.clone()) {
            return false;
        }
        self.gone.remove(peer);
        self.waiting.insert(peer.clone());
        true
    }
}

/// How long this node's neighbourhood must have stayed the same (no
/// neighbour come or gone) before a search every neighbour answered "not
/// through me" for may end: a neighbour whose link broke just before (it
/// is being redialled), or a node still joining the mesh, may have a way
/// the others do not, and is asked when it arrives.
const SETTLE: Duration = Duration::from_secs(1);

/// Where a query this node passed on stands ([`Wave`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaveState {
    /// Waiting for the neighbours it went to.
    Open,
    /// Every one of them answered "not through me", and so did this node.
    Refused,
    /// A route answer came back through this node: it says nothing more.
    Found,
    /// One of them left before it answered: its part of the mesh may still
    /// answer by another way, so this node says nothing (the search runs
    /// to its timeout unless an answer comes).
    Lost,
    /// The query came with no hops left and was passed to nobody, though
    /// this node has other neighbours: it says nothing, to anyone (the
    /// target may be within reach of a copy with hops to spare, which is
    /// passed on).
    Cut,
}

/// A query this node passed on (the first copy it got): the neighbour it
/// came from, and those it went to that have not answered yet. When the
/// last of them answers "not through me", this node answers so to the
/// first.
struct Wave {
    parent: NodeId,
    /// A copy: a slice of the received query would keep its whole frame
    /// alive for as long as the wave is kept.
    target: Bytes,
    waiting: Vec<NodeId>,
    state: WaveState,
}

impl Wave {
    /// `peer` answered "not through me" (`said`) or left: the answer to
    /// send to the parent, if that was the last one awaited.
    fn strike(
        &mut self,
        peer: &NodeId,
        said: bool,
        query_id: u64,
        origin: &NodeId,
    ) -> Option<(NodeId, Bytes)> {
        let at = self.waiting.iter().position(|p| p == peer)?;
        self.waiting.swap_remove(at);
        if !said && self.state == WaveState::Open {
            self.state = WaveState::Lost;
        }
        if self.state != WaveState::Open || !self.waiting.is_empty() {
            return None;
        }
        self.state = WaveState::Refused;
        Some((self.parent.clone(), self.refusal(query_id, origin)))
    }

    /// This node's "not through me" for the query.
    fn refusal(&self, query_id: u64, origin: &NodeId) -> Bytes {
        not_found(query_id, origin.as_bytes().clone(), self.target.clone())
    }
}

/// A `RouteNotFound`, encoded.
fn not_found(query_id: u64, origin: Bytes, target: Bytes) -> Bytes {
    encode(Body::NotFound(RouteNotFound {
        query_id,
        origin,
        target,
    }))
}

/// A target whose last search found no route: it is not searched for
/// again before `until` while this node's neighbours are still those it
/// had then ([`neighbourhood`]); sends to it fail at once meanwhile.
struct Unfound {
    until: Instant,
    neighbours: u64,
}

/// Queries passed on whose "not through me" is still kept track of
/// ([`Wave`]), at most: a few hundred bytes each (the neighbours awaited),
/// and a wave matters only while its search runs. Past it the neighbour
/// that brought the most loses its oldest, which then says nothing (its
/// search runs to its timeout): queries made up in bulk by a member cost
/// their own waves.
const MAX_WAVES: usize = 4096;

/// Targets remembered as not found, at most: past it the expired go, and
/// if none has, all (forgetting one only costs a search).
const MAX_UNFOUND: usize = 1024;

/// The targets recent searches did not find ([`Unfound`]), at most
/// `max`, with explicit time.
struct UnfoundTable {
    map: HashMap<NodeId, Unfound>,
    max: usize,
}

impl UnfoundTable {
    fn new(max: usize) -> Self {
        UnfoundTable {
            map: HashMap::new(),
            max: max.max(1),
        }
    }

    /// The neighbours' fingerprint a search for `target` found nothing
    /// with, if that was less than its back-off before `now` (an expired
    /// entry goes).
    fn lately(&mut self, target: &NodeId, now: Instant) -> Option<u64> {
        match self.map.get(target) {
            None => None,
            Some(u) if now < u.until => Some(u.neighbours),
            Some(_) => {
                self.map.remove(target);
                None
            }
        }
    }

    /// Remembers that a search for `target` found nothing at `now`, with
    /// the neighbours `neighbours`, for `back_off`.
    fn insert(&mut self, target: &NodeId, neighbours: u64, now: Instant, back_off: Duration) {
        if self.map.len() >= self.max && !self.map.contains_key(target) {
            self.map.retain(|_, u| u.until > now);
            if self.map.len() >= self.max {
                self.map.clear();
            }
        }
        let until = now + back_off;
        self.map
            .insert(target.clone(), Unfound { until, neighbours });
    }

    fn remove(&mut self, target: &NodeId) {
        if !self.map.is_empty() {
            self.map.remove(target);
        }
    }
}

/// A fingerprint of the node's neighbours, whatever their order: it
/// changes when one comes or goes, and with it the ways a search can take.
fn neighbourhood(inner: &Inner) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    let hasher = BuildHasherDefault::<std::hash::DefaultHasher>::default();
    let neighbours = inner.peers.neighbours();
    neighbours
        .iter()
        .fold(neighbours.len() as u64, |acc, n| acc ^ hasher.hash_one(n))
}

pub(crate) struct Routing {
    table: Mutex<RouteTable>,
    /// By (origin, query id), owned by the neighbour that brought it.
    queries: Mutex<SeenCache<(NodeId, u64), NodeId>>,
    /// The queries passed on whose "not through me" is still to come from
    /// some neighbour, by (origin, query id), owned by the neighbour that
    /// brought them.
    waves: Mutex<SeenCache<(NodeId, u64), NodeId, Wave>>,
    /// Answers taken, by (origin, query id, the neighbour that brought
    /// it): a repeat is dropped before its signature costs a check.
    answers: Mutex<SeenCache<(NodeId, u64, NodeId), NodeId>>,
    /// The queries for this node answered, by origin, query id and the
    /// neighbour that brought them (each such neighbour is answered once).
    answered: Mutex<SeenCache<(NodeId, u64, NodeId), NodeId>>,
    /// The signed answers of this node to queries for it, encoded, by
    /// origin and query id: signed once however many neighbours ask.
    signed_answers: Mutex<SeenCache<(NodeId, u64), NodeId, Bytes>>,
    /// Searches in progress, by target.
    searches: Mutex<HashMap<NodeId, Search>>,
    /// Targets the last search for found no route (see [`Unfound`]): a
    /// caller that keeps sending to a node that is gone gets its answer at
    /// once, and the mesh is not flooded with a query per send.
    unfound: Mutex<UnfoundTable>,
    /// The way back of routed requests passed on, by (origin, request id):
    /// the neighbour each came from, owned by it. Answers go back that way.
    breadcrumbs: Mutex<SeenCache<(NodeId, u64), NodeId, NodeId>>,
    max_hops: u32,
    search_timeout: Duration,
    /// How far from our clock a routed request may be stamped.
    window: Duration,
    forwarded: AtomicU64,
    delivered: AtomicU64,
    unreachable: AtomicU64,
    searches_started: AtomicU64,
    /// Sends failed at once, their target not found by a search moments
    /// before ([`Unfound`]).
    held_back: AtomicU64,
    /// Queries of searches in progress sent to a neighbour that arrived
    /// after they started.
    late_asks: AtomicU64,
    /// Searches ended before their timeout: every neighbour asked answered
    /// "not through me".
    exhausted: AtomicU64,
    /// When a neighbour last came or went (see [`SETTLE`]).
    neighbourhood_changed: Mutex<Instant>,
    /// Route answers to this node's queries taken after their search had
    /// ended (the route is learnt for the next send).
    late_answers: AtomicU64,
    /// Routed messages not forwarded: the next hop's lane stayed full.
    dropped: AtomicU64,
    /// Keys shared with the origins and targets of routed messages.
    keys: Mutex<KeyCache>,
    /// The nonces of routed requests taken, to refuse them sent again.
    replay: Mutex<ReplayGuard>,
    /// The clock routed messages are stamped with.
    clock: Arc<WallClock>,
    /// Routed messages for this node that did not open (forged, altered,
    /// or from an origin whose key could not be made).
    refused: AtomicU64,
    /// Routed requests for this node refused as seen before.
    replayed: AtomicU64,
    /// Routed requests for this node stamped outside the clock window.
    stale: AtomicU64,
    /// Route queries and answers whose signature did not hold (their
    /// bringers were banned).
    forged: AtomicU64,
    /// Route queries stamped outside the window.
    stale_queries: AtomicU64,
    /// How far from this node's clock a route query may be stamped, in ms.
    query_window_ms: u64,
    forged_warnings: WarnBudget,
}

/// How long a neighbour that handed over a forged route answer is refused
/// (as one that hands over a forged flood).
const FORGER_BAN: Duration = Duration::from_secs(600);
/// Domain separation: a route answer's signature serves no other purpose.
const FOUND_LABEL: &[u8] = b"meshwork route found v1";
/// The same for route queries.
const QUERY_LABEL: &[u8] = b"meshwork route query v1";

/// The bytes a route query's signature covers: every field but `ttl`
/// (which each hop lowers) and the signature.
fn query_bytes(q: &RouteQuery) -> Vec<u8> {
    let mut m = labelled_ends(QUERY_LABEL, &q.origin, &q.target, 16);
    m.extend_from_slice(&q.query_id.to_be_bytes());
    m.extend_from_slice(&q.sent_at_ms.to_be_bytes());
    m
}

/// Signs `query` as `identity`, whose node id its `origin` must be: sets
/// its `signature` (see the protocol spec, section "Routing"). For tools
/// and tests that make route queries by hand; the routing concern signs
/// its own.
pub fn sign_route_query(identity: &Identity, query: &mut RouteQuery) {
    query.signature = Bytes::copy_from_slice(&identity.sign(&query_bytes(query)));
}

/// The bytes a route answer's signature covers: every field but `hops`
/// (which each hop raises) and the signature.
fn found_bytes(f: &RouteFound) -> Vec<u8> {
    let mut m = labelled_ends(FOUND_LABEL, &f.origin, &f.target, 8);
    m.extend_from_slice(&f.query_id.to_be_bytes());
    m
}

/// `label`, then `origin` and `target` each after its length, with room
/// for `more` bytes: how signed and sealed routing messages begin.
fn labelled_ends(label: &[u8], origin: &[u8], target: &[u8], more: usize) -> Vec<u8> {
    let mut m = Vec::with_capacity(label.len() + 2 + origin.len() + target.len() + more);
    m.extend_from_slice(label);
    // Ids are at most 64 bytes: one length byte each keeps the parts apart.
    m.push(origin.len() as u8);
    m.extend_from_slice(origin);
    m.push(target.len() as u8);
    m.extend_from_slice(target);
    m
}

/// Signs `found` as `identity`, whose node id its `target` must be: sets
/// its `signature` (see the protocol spec, section "Routing"). For tools
/// and tests that answer route queries by hand; the routing concern signs
/// its own.
pub fn sign_route_found(identity: &Identity, found: &mut RouteFound) {
    found.signature = Bytes::copy_from_slice(&identity.sign(&found_bytes(found)));
}

/// Keys kept at most; past this, the one used longest ago is dropped (made
/// again when needed).
const KEY_CACHE: usize = 4096;
/// New keys made per second for messages that arrive, after a burst of as
/// many: each costs an X25519 operation (about 65 µs), and node ids are
/// free to mint. At most this many in all...
const NEW_KEYS_PER_SEC: f64 = 512.0;
/// ...and this many for the messages one neighbour hands over, so that a
/// member sending messages from made-up origins spends its own share, not
/// the keys of the origins others bring.
const NEW_KEYS_PER_NEIGHBOUR: f64 = 128.0;

/// A token bucket: `rate` a second, as many at once.
struct Bucket {
    tokens: f64,
    filled: Instant,
}

impl Bucket {
    fn full(rate: f64, now: Instant) -> Self {
        Bucket {
            tokens: rate,
            filled: now,
        }
    }

    /// Whether a token is left now (then it is taken).
    fn take(&mut self, rate: f64, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.filled).as_secs_f64() * rate;
        self.tokens = (self.tokens + refill).min(rate);
        self.filled = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// The keys this node shares with others, made on first use.
struct KeyCache {
    /// With when each was last used (a count of uses).
    keys: HashMap<NodeId, (PairKey, u64)>,
    uses: u64,
    /// Keys that may still be made for arriving messages, in all and by
    /// the neighbour that handed the message over.
    all: Bucket,
    by_neighbour: HashMap<NodeId, Bucket>,
}

impl KeyCache {
    /// Whether a key may be made now for a message `via` handed over.
    fn may_make(&mut self, via: &NodeId) -> bool {
        let now = Instant::now();
        if self.by_neighbour.len() > KEY_CACHE {
            // Neighbours come and go: forget the buckets of those gone
            // quiet (a full bucket is what a new one starts with anyway).
            self.by_neighbour
                .retain(|_, b| now.saturating_duration_since(b.filled) < Duration::from_secs(1));
        }
        let mine = self
            .by_neighbour
            .entry(via.clone())
            .or_insert_with(|| Bucket::full(NEW_KEYS_PER_NEIGHBOUR, now));
        // The neighbour's share first: a spent one leaves the others' alone.
        mine.take(NEW_KEYS_PER_NEIGHBOUR, now) && self.all.take(NEW_KEYS_PER_SEC, now)
    }

    fn insert(&mut self, node: &NodeId, key: PairKey) {
        if self.keys.len() >= KEY_CACHE {
            // The least recently used goes: keys of origins that keep
            // talking stay, whatever a flood of made-up ones brings.
            let oldest = self
                .keys
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(n, _)| n.clone());
            if let Some(oldest) = oldest {
                self.keys.remove(&oldest);
            }
        }
        self.uses += 1;
        self.keys.insert(node.clone(), (key, self.uses));
    }
}

/// What a routed message's seal is bound to: every field but the payload
/// and the TTL (which each hop lowers).
fn seal_ad(r: &Routed) -> Vec<u8> {
    const LABEL: &[u8] = b"meshwork routed v1";
    let mut ad = labelled_ends(LABEL, &r.origin, &r.target, 24);
    ad.extend_from_slice(&r.command.to_be_bytes());
    ad.extend_from_slice(&r.request_id.to_be_bytes());
    ad.extend_from_slice(&r.kind.to_be_bytes());
    ad.extend_from_slice(&r.sent_at_ms.to_be_bytes());
    ad
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn encode(body: Body) -> Bytes {
    RouteMessage { body: Some(body) }.encode_to_vec().into()
}

impl Routing {
    pub(crate) fn new(cfg: &ConcernsConfig, clock: Arc<WallClock>) -> Self {
        Routing {
            table: Mutex::new(RouteTable::new(cfg.route_ttl, cfg.route_capacity)),
            queries: Mutex::new(SeenCache::new(cfg.seen_capacity, cfg.seen_ttl)),
            waves: Mutex::new(SeenCache::new(
                cfg.seen_capacity.min(MAX_WAVES),
                cfg.seen_ttl,
            )),
            answers: Mutex::new(SeenCache::new(cfg.seen_capacity, cfg.seen_ttl)),
            answered: Mutex::new(SeenCache::new(cfg.seen_capacity, cfg.seen_ttl)),
            signed_answers: Mutex::new(SeenCache::new(cfg.seen_capacity, cfg.seen_ttl)),
            searches: Mutex::new(HashMap::new()),
            unfound: Mutex::new(UnfoundTable::new(MAX_UNFOUND)),
            breadcrumbs: Mutex::new(SeenCache::new(cfg.seen_capacity, cfg.seen_ttl)),
            max_hops: cfg.max_hops,
            search_timeout: cfg.route_timeout,
            window: cfg.routed_window,
            forwarded: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            unreachable: AtomicU64::new(0),
            searches_started: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
            late_asks: AtomicU64::new(0),
            exhausted: AtomicU64::new(0),
            neighbourhood_changed: Mutex::new(Instant::now()),
            late_answers: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            keys: Mutex::new(KeyCache {
                keys: HashMap::new(),
                uses: 0,
                all: Bucket::full(NEW_KEYS_PER_SEC, Instant::now()),
                by_neighbour: HashMap::new(),
            }),
            replay: Mutex::new(ReplayGuard::new(
                cfg.routed_window.as_millis() as u64,
                cfg.seen_capacity,
            )),
            clock,
            refused: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            forged: AtomicU64::new(0),
            forged_warnings: WarnBudget::new(),
            stale_queries: AtomicU64::new(0),
            query_window_ms: (cfg.seen_ttl / 2).as_millis() as u64,
        }
    }

    /// The key shared with `node`, made if need be. `via`: the neighbour
    /// that handed over the message it is for (whose origin, or whatever
    /// node it names, anyone can make up); such keys are made at a bounded
    /// rate. `None` for the messages this node starts. `None` back if `node`
    /// is not a usable key or the rate is spent.
    fn key(&self, inner: &Inner, node: &NodeId, via: Option<&NodeId>) -> Option<PairKey> {
        let mut cache = lock(&self.keys);
        cache.uses += 1;
        let uses = cache.uses;
        if let Some((k, used)) = cache.keys.get_mut(node) {
            *used = uses;
            return Some(k.clone());
        }
        if let Some(via) = via
            && !cache.may_make(via)
        {
            debug!(node = %node.short(), via = %via.short(), "routed message dropped: too many new keys a second");
            return None;
        }
        let key = match inner.peers.endpoint().config().identity().pair_key(node) {
            Ok(k) => k,
            Err(e) => {
                debug!(node = %node.short(), error = %e, "no key shared with this node");
                return None;
            }
        };
        cache.insert(node, key.clone());
        Some(key)
    }

    /// A routed message from this node to `target`, its payload sealed.
    /// `via`: as for [`key`](Self::key), when `target` comes from a message
    /// that arrived (an error sent back to its origin).
    #[allow(clippy::too_many_arguments)]
    fn sealed(
        &self,
        inner: &Inner,
        target: &NodeId,
        via: Option<&NodeId>,
        command: u32,
        request_id: u64,
        kind: ConcernKind,
        payload: &[u8],
    ) -> Option<Routed> {
        let key = self.key(inner, target, via)?;
        let mut r = Routed {
            origin: inner.peers.node_id().as_bytes().clone(),
            target: target.as_bytes().clone(),
            command,
            request_id,
            kind: kind as i32,
            payload: Bytes::new(),
            ttl: self.max_hops,
            sent_at_ms: self.clock.now_ms(),
        };
        r.payload = key.seal(&seal_ad(&r), payload);
        Some(r)
    }

    /// Opens a routed message for this node from `origin`; for a request,
    /// also checks it is not a replay. `Err` (counted) if it is refused,
    /// with what to tell the origin, if anything.
    fn open(
        &self,
        inner: &Inner,
        from: &NodeId,
        origin: &NodeId,
        r: &Routed,
        kind: ConcernKind,
    ) -> Result<Bytes, Option<String>> {
        let opened = self
            .key(inner, origin, Some(from))
            .and_then(|k| k.open(&seal_ad(r), &r.payload).ok());
        let (Some(payload), Some(nonce)) = (opened, PairKey::nonce_of(&r.payload)) else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            debug!(origin = %origin.short(), command = r.command, "routed message does not open: dropped");
            return Err(None);
        };
        if kind != ConcernKind::Request {
            // An answer is taken once, by a request waiting under a random
            // id: a replay finds nobody waiting.
            return Ok(payload);
        }
        let verdict = lock(&self.replay).check(origin, nonce, r.sent_at_ms, self.clock.now_ms());
        match verdict {
            Verdict::Fresh => Ok(payload),
            Verdict::Replayed => {
                self.replayed.fetch_add(1, Ordering::Relaxed);
                debug!(origin = %origin.short(), command = r.command, "routed request seen before: dropped");
                Err(None)
            }
            Verdict::Stale { off_ms } => {
                self.stale.fetch_add(1, Ordering::Relaxed);
                debug!(origin = %origin.short(), off_ms, "routed request stamped outside the clock window: dropped");
                // Told (sealed): an origin whose clock is off learns why
                // instead of waiting for its timeout.
                Err(Some(format!(
                    "request stamped {:.1} s {} this node's clock, beyond the {:?} allowed",
                    off_ms.unsigned_abs() as f64 / 1e3,
                    if off_ms < 0 { "behind" } else { "ahead of" },
                    self.window,
                )))
            }
        }
    }

    /// Answers the routed request `r` from `origin` with an error of our
    /// own, back through `from`, the neighbour it came from.
    fn bounce(
        &self,
        inner: &Inner,
        from: &NodeId,
        origin: &NodeId,
        r: &Routed,
        code: ErrorCode,
        message: String,
    ) -> Result<(), BoxError> {
        if r.request_id == 0 {
            return Ok(());
        }
        let payload = error_payload(code, message);
        let back = self.sealed(
            inner,
            origin,
            Some(from),
            r.command,
            r.request_id,
            ConcernKind::Error,
            &payload,
        );
        if let Some(back) = back {
            inner.try_send_direct(from, ROUTING, encode(Body::Routed(back)))?;
        }
        Ok(())
    }

    pub(crate) fn routes(&self) -> Vec<Route> {
        lock(&self.table).snapshot(Instant::now())
    }

    pub(crate) fn forget(&self, target: &NodeId) {
        lock(&self.table).forget(target);
    }

    pub(crate) fn stats(&self) -> Vec<(&'static str, u64)> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("routes", self.routes().len() as u64),
            ("searches", get(&self.searches_started)),
            ("held_back", get(&self.held_back)),
            ("late_asks", get(&self.late_asks)),
            ("exhausted", get(&self.exhausted)),
            ("late_answers", get(&self.late_answers)),
            ("waves", lock(&self.waves).len() as u64),
            ("forwarded", get(&self.forwarded)),
            ("delivered", get(&self.delivered)),
            ("unreachable", get(&self.unreachable)),
            ("dropped", get(&self.dropped)),
            ("refused", get(&self.refused)),
            ("replayed", get(&self.replayed)),
            ("stale", get(&self.stale)),
            ("forged", get(&self.forged)),
            ("stale_queries", get(&self.stale_queries)),
        ]
    }

    fn is_neighbour(inner: &Inner, node: &NodeId) -> bool {
        inner.peers.is_neighbour(node)
    }

    /// The neighbour to hand a message for `target` to, if known now.
    fn next_hop(&self, inner: &Inner, target: &NodeId) -> Option<NodeId> {
        if Self::is_neighbour(inner, target) {
            return Some(target.clone());
        }
        lock(&self.table).next_hop(target, Instant::now())
    }

    fn hops_travelled(&self, ttl: u32) -> u32 {
        self.max_hops.saturating_sub(ttl).saturating_add(1)
    }

    /// The hops from a message's origin when a neighbour other than the
    /// origin handed it over: at least 2, whatever TTL it claims (a fresh
    /// TTL would claim 1 and win every route to the origin).
    fn hops_relayed(&self, ttl: u32) -> u32 {
        self.hops_travelled(ttl).max(2)
    }

    /// Sends a message to `target` by its route, searching for one first if
    /// none is known.
    pub(crate) async fn send(
        &self,
        inner: &Arc<Inner>,
        target: &NodeId,
        command: u32,
        request_id: u64,
        kind: ConcernKind,
        payload: Bytes,
    ) -> Result<(), ConcernsError> {
        self.send_via(inner, target, None, command, request_id, kind, payload)
            .await
    }

    /// [`send`](Self::send), by the neighbour `back` (the one a request
    /// came through) if no route to `target` is known.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send_via(
        &self,
        inner: &Arc<Inner>,
        target: &NodeId,
        back: Option<&NodeId>,
        command: u32,
        request_id: u64,
        kind: ConcernKind,
        payload: Bytes,
    ) -> Result<(), ConcernsError> {
        let me = inner.peers.node_id();
        if target == me {
            return Err(ConcernsError::Unreachable(target.clone()));
        }
        let back = back.filter(|b| Self::is_neighbour(inner, b)).cloned();
        let next = match back.or_else(|| self.next_hop(inner, target)) {
            Some(n) => n,
            None if self.not_found_lately(inner, target) => {
                self.held_back.fetch_add(1, Ordering::Relaxed);
                return Err(ConcernsError::Unreachable(target.clone()));
            }
            None => self.search(inner, target).await?,
        };
        let routed = self
            .sealed(inner, target, None, command, request_id, kind, &payload)
            .ok_or_else(|| ConcernsError::Unreachable(target.clone()))?;
        let body = encode(Body::Routed(routed));
        inner
            .send_direct(
                &next,
                ROUTING,
                0,
                ConcernKind::Request,
                body,
                Priority::Normal,
            )
            .await
            .map_err(|e| match e {
                ConcernsError::NotConnected(_) | ConcernsError::Unresponsive(_) => {
                    self.forget(target);
                    ConcernsError::Unreachable(target.clone())
                }
                e => e,
            })
    }

    /// True if a search for `target` found no route less than a search
    /// timeout ago, and this node's neighbours are still the ones it had
    /// then: a new search would most likely find nothing either.
    fn not_found_lately(&self, inner: &Inner, target: &NodeId) -> bool {
        // The peer manager's lock (for the neighbours) is not taken under
        // this one.
        let Some(neighbours) = lock(&self.unfound).lately(target, Instant::now()) else {
            return false;
        };
        if neighbours == neighbourhood(inner) {
            return true;
        }
        lock(&self.unfound).remove(target);
        false
    }

    /// Remembers that a search for `target` found no route (see
    /// [`Unfound`]).
    fn not_found(&self, inner: &Inner, target: &NodeId) {
        let neighbours = neighbourhood(inner);
        lock(&self.unfound).insert(target, neighbours, Instant::now(), self.search_timeout);
    }

    /// A route to `target` was learnt: whatever a search found before no
    /// longer holds.
    fn found(&self, target: &NodeId) {
        lock(&self.unfound).remove(target);
    }

    /// Floods a query for `target` (or joins one in progress) and waits for
    /// a route, at most the search timeout.
    async fn search(&self, inner: &Arc<Inner>, target: &NodeId) -> Result<NodeId, ConcernsError> {
        let query_id: u64 = rand::random();
        let (mut rx, first) = {
            let mut searches = lock(&self.searches);
            match searches.get(target) {
                Some(s) => (s.progress.subscribe(), false),
                None => {
                    let (progress, rx) = watch::channel(0);
                    let search = Search {
                        query_id,
                        progress,
                        query: Bytes::new(),
                        asked: HashSet::new(),
                        waiting: HashSet::new(),
                        gone: HashSet::new(),
                        refused: false,
                        asking: true,
                    };
                    searches.insert(target.clone(), search);
                    (rx, true)
                }
            }
        };
        // The entry goes when the first searcher is done, also when its
        // future is dropped mid-search (a caller's timeout), or later
        // searches would join a search nobody runs.
        let _guard = first.then(|| SearchGuard {
            searches: &self.searches,
            target: target.clone(),
        });
        if first {
            self.searches_started.fetch_add(1, Ordering::Relaxed);
            let me = inner.peers.node_id();
            let mut query = RouteQuery {
                query_id,
                origin: me.as_bytes().clone(),
                target: target.as_bytes().clone(),
                ttl: self.max_hops,
                sent_at_ms: self.clock.now_ms(),
                signature: Bytes::new(),
            };
            sign_route_query(inner.peers.endpoint().config().identity(), &mut query);
            lock(&self.queries).insert((me.clone(), query.query_id), me, Instant::now());
            let body = encode(Body::Query(query));
            // Kept before the neighbours are read, so that one arriving in
            // between is asked (once: by whichever comes first).
            if let Some(s) = lock(&self.searches).get_mut(target) {
                s.query = body.clone();
            }
            let neighbours = inner.peers.neighbours();
            let ask: Vec<NodeId> = match lock(&self.searches).get_mut(target) {
                Some(s) => {
                    let ask = neighbours.into_iter().filter(|p| s.take_asked(p)).collect();
                    s.asking = false;
                    ask
                }
                None => Vec::new(),
            };
            for p in ask {
                self.ask(inner, target, &p, body.clone());
            }
        }
        // Woken at every change: a route an answer taught may be gone by
        // the time this task looks (its next hop left at once), and a later
        // answer, by another way, may still come within the timeout. A
        // search every neighbour asked has answered "not through me" for
        // ends once this node's neighbourhood has settled.
        let mut exhausted = false;
        let wait = async {
            loop {
                if let Some(hop) = self.next_hop(inner, target) {
                    return Some(hop);
                }
                let settled_at = self.refused_everywhere_at(target);
                if settled_at.is_some_and(|at| Instant::now() >= at) {
                    exhausted = true;
                    return None;
                }
                let changed = rx.changed();
                let gone = match settled_at {
                    Some(at) => matches!(tokio::time::timeout_at(at, changed).await, Ok(Err(_))),
                    None => changed.await.is_err(),
                };
                if gone {
                    // The first searcher is done: its route, if any.
                    return self.next_hop(inner, target);
                }
            }
        };
        let hop = tokio::time::timeout(self.search_timeout, wait)
            .await
            .ok()
            .flatten();
        let found = hop.is_some();
        // Remembered before the search's entry goes, so that a send coming
        // in between joins nothing and searches nothing either. Only a
        // search waited out to its end (or exhausted) counts (a caller that
        // gave up earlier proves nothing).
        if first && !found {
            self.not_found(inner, target);
            if exhausted {
                self.exhausted.fetch_add(1, Ordering::Relaxed);
            }
        }
        drop(_guard);
        match hop {
            Some(hop) => Ok(hop),
            None => {
                self.unreachable.fetch_add(1, Ordering::Relaxed);
                Err(ConcernsError::Unreachable(target.clone()))
            }
        }
    }

    /// When the search for `target` may end as exhausted: `None` while some
    /// neighbour it asked has not answered "not through me", else once this
    /// node's neighbourhood has been the same for [`SETTLE`].
    fn refused_everywhere_at(&self, target: &NodeId) -> Option<Instant> {
        let refused = lock(&self.searches)
            .get(target)
            .is_some_and(Search::refused_everywhere);
        refused.then(|| *lock(&self.neighbourhood_changed) + SETTLE)
    }

    /// Wakes the waiters of the searches given (outside the searches lock:
    /// see `search`).
    fn bump(searches: impl IntoIterator<Item = watch::Sender<u64>>) {
        for progress in searches {
            progress.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// `peer` became a responsive neighbour: it is asked every search in
    /// progress, which otherwise asked only the neighbours there were when
    /// it started (none at all, on a node still joining the mesh).
    pub(crate) fn neighbour_joined(&self, inner: &Inner, peer: &NodeId) {
        *lock(&self.neighbourhood_changed) = Instant::now();
        let (queries, changed): (Vec<(NodeId, Bytes)>, Vec<watch::Sender<u64>>) =
            lock(&self.searches)
                .iter_mut()
                .filter_map(|(target, s)| {
                    s.take_asked(peer)
                        .then(|| ((target.clone(), s.query.clone()), s.progress.clone()))
                })
                .unzip();
        Self::bump(changed);
        for (target, query) in queries {
            self.late_asks.fetch_add(1, Ordering::Relaxed);
            self.ask(inner, &target, peer, query);
        }
    }

    /// `peer` is no longer a neighbour: the searches that awaited its
    /// answer ask it again when it is back (see [`Search::lose`]), and the
    /// waves that awaited it say nothing more (see [`WaveState::Lost`]).
    pub(crate) fn neighbour_left(&self, peer: &NodeId) {
        *lock(&self.neighbourhood_changed) = Instant::now();
        let changed: Vec<watch::Sender<u64>> = lock(&self.searches)
            .values_mut()
            .filter_map(|s| s.lose(peer).then(|| s.progress.clone()))
            .collect();
        Self::bump(changed);
        let now = Instant::now();
        for ((origin, query_id), w) in lock(&self.waves).live_mut(now) {
            if w.state == WaveState::Open {
                // Says nothing: the wave is lost.
                let _ = w.strike(peer, false, *query_id, origin);
            }
        }
    }

    /// Sends the query of this node's search for `target` to `peer`
    /// (already in its `asked` and `waiting`); one that could not be sent
    /// is taken as gone (see [`Search::lose`]).
    fn ask(&self, inner: &Inner, target: &NodeId, peer: &NodeId, query: Bytes) {
        if inner.try_send_direct(peer, ROUTING, query).is_ok() {
            return;
        }
        let changed = lock(&self.searches)
            .get_mut(target)
            .and_then(|s| s.lose(peer).then(|| s.progress.clone()));
        Self::bump(changed);
    }

    /// Answers "not through me" to `to` for a query.
    fn answer_none(&self, inner: &Inner, to: &NodeId, q: &RouteQuery) {
        let body = not_found(q.query_id, q.origin.clone(), q.target.clone());
        let _ = inner.try_send_direct(to, ROUTING, body);
    }

    /// A neighbour's "not through me" for a query this node made or passed
    /// to it; taken once, and only from a neighbour the query went to.
    fn on_not_found(&self, inner: &Inner, from: &NodeId, n: RouteNotFound) -> Result<(), BoxError> {
        let origin = NodeId::from_bytes(n.origin)?;
        let target = NodeId::from_bytes(n.target)?;
        if origin != *inner.peers.node_id() {
            let key = (origin, n.query_id);
            self.refused_by(inner, from, &key, Instant::now());
            return Ok(());
        }
        let changed = lock(&self.searches)
            .get_mut(&target)
            .filter(|s| s.query_id == n.query_id)
            .and_then(|s| s.refuse(from).then(|| s.progress.clone()));
        Self::bump(changed);
        Ok(())
    }

    fn on_query(&self, inner: &Arc<Inner>, from: &NodeId, q: RouteQuery) -> Result<(), BoxError> {
        // A forged TTL above ours would claim the origin is one hop away
        // (see `hops_travelled`) and win every route to it.
        let q = RouteQuery {
            ttl: q.ttl.min(self.max_hops),
            ..q
        };
        let origin = NodeId::from_bytes(q.origin.clone())?;
        let target = NodeId::from_bytes(q.target.clone())?;
        let me = inner.peers.node_id();
        let now = Instant::now();
        let key = (origin.clone(), q.query_id);
        if origin == *me {
            return Ok(());
        }
        // The target answers each neighbour that brings it the query, once:
        // the copy that came first may have come over a link that is gone
        // before the answer can go back (a neighbour asked while it was
        // joining, then dropped), while the copies that came after have a
        // way back. Anyone else passes a query on once.
        let for_me = target == *me;
        let seen = lock(&self.queries).contains(&key, now);
        let answer = (origin.clone(), q.query_id, from.clone());
        // A copy with hops to spare, after one that came with none: passed
        // on now, as a first copy.
        let rescue = seen && !for_me && q.ttl > 1 && self.cut(&key, now);
        if seen && !for_me && !rescue {
            self.answer_seen(inner, from, &key, &q, now);
            return Ok(());
        }
        if seen && lock(&self.answered).contains(&answer, now) {
            return Ok(());
        }
        let off = i128::from(self.clock.now_ms()) - i128::from(q.sent_at_ms);
        if off.unsigned_abs() > u128::from(self.query_window_ms) {
            // A replay of one recorded earlier (its id forgotten), or a
            // clock far off: nobody banned.
            self.stale_queries.fetch_add(1, Ordering::Relaxed);
            debug!(origin = %origin.short(), off_ms = %off, "route query stamped outside the window: dropped");
            return Ok(());
        }
        if verify(&origin, &query_bytes(&q), &q.signature).is_err() {
            self.ban_forger(inner, from, "route query not signed by its origin", &origin);
            return Ok(());
        }
        if !lock(&self.queries).insert(key.clone(), from, now) && !for_me && !rescue {
            self.answer_seen(inner, from, &key, &q, now);
            return Ok(());
        }
        lock(&self.table).learn(&origin, from, self.hops_relayed(q.ttl), now);
        self.found(&origin);
        if for_me {
            if !lock(&self.answered).insert(answer, from, now) {
                return Ok(());
            }
            // One answer, signed once, for every neighbour that asks: it
            // says nothing about the way it goes back.
            let query = (origin, q.query_id);
            let signed = lock(&self.signed_answers).get(&query, now).cloned();
            let body = match signed {
                Some(body) => body,
                None => {
                    let mut found = RouteFound {
                        query_id: q.query_id,
                        origin: q.origin,
                        target: q.target,
                        hops: 0,
                        signature: Bytes::new(),
                    };
                    sign_route_found(inner.peers.endpoint().config().identity(), &mut found);
                    let body = encode(Body::Found(found));
                    lock(&self.signed_answers).insert_value(query, body.clone(), from, now);
                    body
                }
            };
            inner.try_send_direct(from, ROUTING, body)?;
            return Ok(());
        }
        let to_target = target != *from && Self::is_neighbour(inner, &target);
        let (next, to) = if to_target {
            // Only the target's word is taken: pass the query to it alone,
            // also on the query's last hop (a neighbour's own answer used
            // to end it here).
            let next = RouteQuery {
                ttl: q.ttl.saturating_sub(1).max(1),
                ..q.clone()
            };
            (next, vec![target])
        } else {
            let next = RouteQuery {
                ttl: q.ttl.saturating_sub(1),
                ..q.clone()
            };
            let others: Vec<NodeId> = inner
                .peers
                .neighbours()
                .into_iter()
                .filter(|p| p != from && *p != origin)
                .collect();
            (next, others)
        };
        // Out of hops, with others to ask: a copy with hops to spare may come.
        let cut = !to_target && q.ttl <= 1 && !to.is_empty();
        if to.is_empty() || cut {
            if cut {
                let wave = Wave {
                    parent: from.clone(),
                    target: Bytes::copy_from_slice(&q.target),
                    waiting: Vec::new(),
                    state: WaveState::Cut,
                };
                lock(&self.waves).insert_value(key, wave, from, now);
            } else {
                // Nobody else to ask.
                self.answer_none(inner, from, &q);
            }
            return Ok(());
        }
        // The wave is kept before the query goes on: a quick "not through
        // me" handled on another worker must find it.
        let wave = Wave {
            parent: from.clone(),
            target: Bytes::copy_from_slice(&q.target),
            waiting: to.clone(),
            state: WaveState::Open,
        };
        {
            let mut waves = lock(&self.waves);
            match waves.get_mut(&key, now) {
                // A rescued copy's wave replaces the cut one.
                Some(w) => *w = wave,
                None => {
                    waves.insert_value(key.clone(), wave, from, now);
                }
            }
        }
        let next = encode(Body::Query(next));
        for p in to {
            if inner.try_send_direct(&p, ROUTING, next.clone()).is_err() {
                // Never sent: not waited for, and nothing to say for it.
                self.refused_by(inner, &p, &key, now);
            }
        }
        Ok(())
    }

    /// A copy of a query this node has seen, from `from`: "not through me"
    /// (it went on by another way), unless `from` is the neighbour the
    /// first copy came from and this node's answer to it is still to come
    /// or was a route answer. After this node's "not through me", `from`
    /// asks again only if its connection was lost in between (with the
    /// answer, perhaps): it is answered again.
    fn answer_seen(
        &self,
        inner: &Inner,
        from: &NodeId,
        key: &(NodeId, u64),
        q: &RouteQuery,
        now: Instant,
    ) {
        let silent = lock(&self.waves).get(key, now).is_some_and(|w| {
            w.state == WaveState::Cut || (w.parent == *from && w.state != WaveState::Refused)
        });
        if !silent {
            self.answer_none(inner, from, q);
        }
    }

    /// Whether the query `key` came to this node with no hops left and was
    /// passed to nobody ([`WaveState::Cut`]).
    fn cut(&self, key: &(NodeId, u64), now: Instant) -> bool {
        lock(&self.waves)
            .get(key, now)
            .is_some_and(|w| w.state == WaveState::Cut)
    }

    /// `peer` answered "not through me" for the query `key` this node
    /// passed it, or it could not be sent: this node's own answer goes to
    /// the wave's parent if that was the last one awaited.
    fn refused_by(&self, inner: &Inner, peer: &NodeId, key: &(NodeId, u64), now: Instant) {
        let answer = lock(&self.waves)
            .get_mut(key, now)
            .and_then(|w| w.strike(peer, true, key.1, &key.0));
        if let Some((parent, body)) = answer {
            let _ = inner.try_send_direct(&parent, ROUTING, body);
        }
    }

    /// A route answer. Only answers to a query this node made (its search
    /// for that target is running) or relayed (seen, from someone else) are
    /// taken, once from each neighbour, signed by the target, and "I am the
    /// target" (0 hops) only from the target itself: an unsolicited answer
    /// was one message to black-hole a route for its lifetime, and an
    /// answer for the target from its "neighbour" one for as long as the
    /// member gave it.
    fn on_found(&self, inner: &Arc<Inner>, from: &NodeId, f: RouteFound) -> Result<(), BoxError> {
        let origin = NodeId::from_bytes(f.origin.clone())?;
        let target = NodeId::from_bytes(f.target.clone())?;
        if f.hops == 0 && *from != target {
            return Err("a route answer claiming to be the target from another node".into());
        }
        let hops = f.hops.saturating_add(1);
        if hops > self.max_hops {
            return Ok(());
        }
        let me = inner.peers.node_id();
        let now = Instant::now();
        if origin == *me {
            // Send outside the lock (see `search`).
            let found = lock(&self.searches)
                .get(&target)
                .filter(|s| s.query_id == f.query_id)
                .map(|s| s.progress.clone());
            // An answer to a query of this node whose search has ended (it
            // timed out, or every neighbour said "not through me" while the
            // answer went around one that did not wait for it) still
            // teaches the route, for the next send.
            let late =
                found.is_none() && lock(&self.queries).contains(&(origin.clone(), f.query_id), now);
            if found.is_none() && !late {
                return Ok(()); // not asked
            }
            if !self.signed_answer(inner, from, &origin, &target, &f, now) {
                return Ok(());
            }
            lock(&self.table).learn(&target, from, hops, now);
            self.found(&target);
            match found {
                Some(found) => Self::bump([found]),
                None => {
                    self.late_answers.fetch_add(1, Ordering::Relaxed);
                }
            }
            return Ok(());
        }
        if !lock(&self.queries).contains(&(origin.clone(), f.query_id), now)
            || !self.signed_answer(inner, from, &origin, &target, &f, now)
        {
            return Ok(());
        }
        lock(&self.table).learn(&target, from, hops, now);
        self.found(&target);
        if let Some(w) = lock(&self.waves).get_mut(&(origin.clone(), f.query_id), now) {
            w.state = WaveState::Found;
        }
        if let Some(next) = self.next_hop(inner, &origin) {
            let back = RouteFound { hops, ..f };
            inner.try_send_direct(&next, ROUTING, encode(Body::Found(back)))?;
        }
        Ok(())
    }

    /// Whether `f`, handed over by `from`, is the first answer to its
    /// query from that neighbour and signed by its target. A bad signature
    /// bans `from`: every node checks before it passes an answer on, so the
    /// neighbour that handed it over made it up.
    fn signed_answer(
        &self,
        inner: &Inner,
        from: &NodeId,
        origin: &NodeId,
        target: &NodeId,
        f: &RouteFound,
        now: Instant,
    ) -> bool {
        let first =
            lock(&self.answers).insert((origin.clone(), f.query_id, from.clone()), from, now);
        if !first {
            return false;
        }
        if verify(target, &found_bytes(f), &f.signature).is_ok() {
            return true;
        }
        self.ban_forger(inner, from, "route answer not signed by its target", target);
        false
    }

    /// Bans `from`, which handed over a query or answer whose signature
    /// (by `signer`) did not hold: every node checks before it passes them
    /// on, so `from` made it up.
    fn ban_forger(&self, inner: &Inner, from: &NodeId, what: &str, signer: &NodeId) {
        self.forged.fetch_add(1, Ordering::Relaxed);
        // Said loudly a few times a period only: fresh ids cost little.
        if self.forged_warnings.take() {
            warn!(from = %from.short(), signer = %signer.short(), "{what}: dropped, its bringer banned");
        } else {
            debug!(from = %from.short(), signer = %signer.short(), "{what}: dropped, its bringer banned");
        }
        inner.peers.ban(from, FORGER_BAN);
    }

    async fn on_routed(
        &self,
        inner: &Arc<Inner>,
        from: &NodeId,
        r: Routed,
    ) -> Result<(), BoxError> {
        let r = Routed {
            ttl: r.ttl.min(self.max_hops),
            ..r
        };
        let origin = NodeId::from_bytes(r.origin.clone())?;
        let target = NodeId::from_bytes(r.target.clone())?;
        let kind = ConcernKind::try_from(r.kind).unwrap_or(ConcernKind::Unspecified);
        if kind == ConcernKind::Unspecified {
            return Err("routed message of unspecified kind".into());
        }
        let me = inner.peers.node_id();
        if origin != *from {
            // Traffic from the origin confirms a route to it through the
            // same neighbour; it never makes one (the origin a routed
            // message claims is not checked: a member sending frames "from
            // X" took over the route to X of any node that had none).
            lock(&self.table).refresh(&origin, from, Instant::now());
        }
        if target == *me {
            let payload = match self.open(inner, from, &origin, &r, kind) {
                Ok(p) => p,
                Err(Some(why)) => {
                    return self.bounce(inner, from, &origin, &r, ErrorCode::BadRequest, why);
                }
                Err(None) => return Ok(()),
            };
            self.delivered.fetch_add(1, Ordering::Relaxed);
            if kind == ConcernKind::Request {
                let reply = if r.request_id == 0 {
                    ReplyPath::None
                } else {
                    ReplyPath::Routed
                };
                let job = Job {
                    command: r.command,
                    from: origin,
                    request_id: r.request_id,
                    payload,
                    reply,
                    // The way it came: the answer goes back through that
                    // neighbour when no route to the origin is known (the
                    // search may have been answered by a neighbour of ours,
                    // and the query never passed here).
                    conn: inner.peers.connection(from),
                    priority: Priority::Normal,
                    via: crate::Via::Routed,
                    held: None,
                };
                inner.deliver_local(job)?;
            } else {
                inner.resolve(&origin, true, r.command, r.request_id, kind, payload);
            }
            return Ok(());
        }
        let now = Instant::now();
        let next = if r.ttl <= 1 {
            None
        } else if kind == ConcernKind::Request {
            if r.request_id != 0 && origin != *from {
                // Its answer comes back this way.
                lock(&self.breadcrumbs).insert_value(
                    (origin.clone(), r.request_id),
                    from.clone(),
                    from,
                    now,
                );
            }
            self.next_hop(inner, &target)
        } else {
            // An answer: back the way its request came, if it passed here
            // (routes are learnt from queries only, and the request may
            // have taken routes the query did not teach everyone on the
            // way back), else by the route table.
            let back = lock(&self.breadcrumbs)
                .get(&(target.clone(), r.request_id), now)
                .filter(|b| Self::is_neighbour(inner, b))
                .cloned();
            back.or_else(|| self.next_hop(inner, &target))
        };
        let Some(next) = next else {
            self.unreachable.fetch_add(1, Ordering::Relaxed);
            if kind == ConcernKind::Request {
                // Tell the origin, by the way the message came.
                let why = format!("no route to {target}");
                self.bounce(inner, from, &origin, &r, ErrorCode::Unreachable, why)?;
            }
            return Ok(());
        };
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        let fwd = encode(Body::Routed(Routed {
            ttl: r.ttl - 1,
            ..r
        }));
        // Waits for room on the next hop's lane a little only (as answers
        // do): the wait holds one of the routing concern's slots, and a next
        // hop that does not read must not hold them all for the send timeout.
        let send = inner.send_direct(
            &next,
            ROUTING,
            0,
            ConcernKind::Request,
            fwd,
            Priority::Normal,
        );
        match tokio::time::timeout(FORWARD_WAIT, send).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                debug!(next = %next.short(), error = %e, "routed message not forwarded");
                Ok(())
            }
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                debug!(next = %next.short(), "routed message not forwarded: its lane stayed full");
                Ok(())
            }
        }
    }
}

#[async_trait]
impl Concern for Routing {
    fn command(&self) -> u32 {
        ROUTING
    }

    fn name(&self) -> &str {
        "routing"
    }

    fn max_concurrency(&self) -> usize {
        64
    }

    fn on_peer_left(&self, peer: &NodeId) {
        // Routes through a neighbour that leaves are dead.
        lock(&self.table).forget_via(peer);
    }

    async fn on_request(
        &self,
        ctx: &Context,
        from: &NodeId,
        payload: Bytes,
    ) -> Result<Option<Reply>, BoxError> {
        let msg = RouteMessage::decode(payload)?;
        match msg.body {
            Some(Body::Query(q)) => self.on_query(&ctx.inner, from, q)?,
            Some(Body::Found(f)) => self.on_found(&ctx.inner, from, f)?,
            Some(Body::Routed(r)) => self.on_routed(&ctx.inner, from, r).await?,
            Some(Body::NotFound(n)) => self.on_not_found(&ctx.inner, from, n)?,
            None => return Err("empty route message".into()),
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use meshwork_peers::transport::Identity;

    use super::*;

    fn empty_cache() -> KeyCache {
        KeyCache {
            keys: HashMap::new(),
            uses: 0,
            all: Bucket::full(NEW_KEYS_PER_SEC, Instant::now()),
            by_neighbour: HashMap::new(),
        }
    }

    fn node(i: usize) -> NodeId {
        NodeId::from_bytes(i.to_be_bytes().repeat(4)).unwrap()
    }

    #[test]
    fn the_unfound_table_forgets_with_time_and_stays_bounded() {
        let t0 = Instant::now();
        let back_off = Duration::from_secs(3);
        let mut t = UnfoundTable::new(3);
        t.insert(&node(1), 7, t0, back_off);
        assert_eq!(t.lately(&node(1), t0), Some(7));
        assert_eq!(
            t.lately(&node(1), t0 + back_off - Duration::from_millis(1)),
            Some(7)
        );
        assert_eq!(t.lately(&node(2), t0), None);
        // Expired: gone, and stays gone.
        assert_eq!(t.lately(&node(1), t0 + back_off), None);
        assert!(t.map.is_empty());
        // Full: the expired make room first.
        t.insert(&node(1), 1, t0, back_off);
        t.insert(&node(2), 2, t0 + Duration::from_secs(2), back_off);
        t.insert(&node(3), 3, t0 + Duration::from_secs(2), back_off);
        t.insert(&node(4), 4, t0 + Duration::from_secs(4), back_off);
        assert_eq!(t.map.len(), 3);
        assert_eq!(t.lately(&node(1), t0), None, "the expired one went");
        assert_eq!(t.lately(&node(4), t0 + Duration::from_secs(4)), Some(4));
        // Full of live ones: all go, the new one stays.
        let t4 = t0 + Duration::from_secs(4);
        t.insert(&node(5), 5, t4, back_off);
        assert_eq!(t.map.len(), 1);
        assert_eq!(t.lately(&node(5), t4), Some(5));
        // A target already in takes no room, and is remembered anew.
        t.insert(&node(6), 6, t4, back_off);
        t.insert(&node(7), 7, t4, back_off);
        t.insert(&node(7), 8, t4, back_off);
        assert_eq!(t.map.len(), 3);
        assert_eq!(t.lately(&node(7), t4), Some(8));
        // A route learnt to it: forgotten.
        t.remove(&node(7));
        assert_eq!(t.lately(&node(7), t4), None);
    }

    /// A full cache drops the key used longest ago: origins that keep
    /// talking keep theirs, whatever number of one-off origins come by.
    #[test]
    fn a_full_key_cache_drops_the_key_used_longest_ago() {
        let me = Identity::generate();
        let key = me.pair_key(Identity::generate().node_id()).unwrap();
        let mut cache = empty_cache();
        for i in 0..KEY_CACHE {
            cache.insert(&node(i), key.clone());
        }
        // Node 0 keeps talking (as `Routing::key` marks a use).
        let touch = |c: &mut KeyCache, i: usize| {
            c.uses += 1;
            let uses = c.uses;
            c.keys.get_mut(&node(i)).unwrap().1 = uses;
        };
        touch(&mut cache, 0);
        cache.insert(&node(KEY_CACHE), key.clone());
        assert_eq!(cache.keys.len(), KEY_CACHE);
        assert!(cache.keys.contains_key(&node(0)));
        assert!(!cache.keys.contains_key(&node(1)), "the oldest unused goes");
        for i in KEY_CACHE + 1..KEY_CACHE + 100 {
            touch(&mut cache, 0);
            cache.insert(&node(i), key.clone());
        }
        assert!(cache.keys.contains_key(&node(0)));
        assert!(!cache.keys.contains_key(&node(100)));
        assert!(cache.keys.contains_key(&node(101)));
    }

    /// Each neighbour has its own share of new keys a second, within a
    /// share for all.
    #[tokio::test(start_paused = true)]
    async fn new_keys_are_rationed_by_neighbour_then_in_all() {
        let mut cache = empty_cache();
        let n = |b: usize| node(b);
        let granted = |c: &mut KeyCache, via: &NodeId, tries: usize| {
            (0..tries).filter(|_| c.may_make(via)).count()
        };
        let share = NEW_KEYS_PER_NEIGHBOUR as usize;
        assert_eq!(granted(&mut cache, &n(1), 1000), share);
        assert_eq!(granted(&mut cache, &n(2), 1000), share);
        // The neighbours' shares add up past the share for all.
        let all = NEW_KEYS_PER_SEC as usize;
        let rest: usize = (3..10).map(|b| granted(&mut cache, &n(b), 1000)).sum();
        assert_eq!(2 * share + rest, all);
        // A second later, each share is back.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(granted(&mut cache, &n(1), 1000), share);
    }
}
