//! The routing concern ("ask-around"): reach nodes that are not neighbours.
//!
//! - To find `target`, the origin floods a `RouteQuery` (bounded by its TTL
//!   and deduplicated by `(origin, query_id)`, so it is loop-free). Every
//!   node it passes learns the way back to the origin. The target, or a
//!   neighbour of it, answers `RouteFound`, which walks back along the
//!   learnt path; every node on the way learns the next hop to the target.
//! - A `Routed` message then goes hop by hop by the route table. Every hop
//!   remembers the neighbour a request came from (by origin and request
//!   id), and its answer goes back that way: the request may have followed
//!   routes the origin's query never taught the hops on the way back.
//!   Routed frames only keep alive a route through their sender; they never
//!   make or change one (the origin they claim is not checked).
//! - Route answers are taken only for queries seen; "0 hops" only from the
//!   target itself.
//! - A hop with no route (or out of TTL) answers a request with an error
//!   `UNREACHABLE` routed back to the origin, which forgets the route; so
//!   does a routed request that times out.
//! - Routes expire, and those through a neighbour that disconnects are
//!   dropped at once.
//! - A routed message's payload is sealed by its origin for its target
//!   with the key the two share ([`PairKey`]), bound to its header (origin,
//!   target, command, request id, kind, stamp). The hops on the way can
//!   drop it but not read, alter or forge it; the target refuses what does
//!   not open, and requests it has seen already or stamped outside its
//!   clock window (see `replay`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use meshwork_peers::transport::{PairKey, Priority};
use meshwork_peers::wire::NodeId;
use meshwork_peers::wire::proto::route_message::Body;
use meshwork_peers::wire::proto::{
    ConcernKind, ErrorCode, RouteFound, RouteMessage, RouteQuery, Routed,
};
use prost::Message as _;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use crate::manager::{ConcernsConfig, FORWARD_WAIT, Inner, Job, ROUTING, ReplyPath, error_payload};
use crate::replay::{ReplayGuard, Verdict};
use crate::route::RouteTable;
use crate::seen::SeenCache;
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

/// A search in progress: its query, and a watch that flips when found.
struct Search {
    query_id: u64,
    found: watch::Sender<bool>,
}

pub(crate) struct Routing {
    table: Mutex<RouteTable>,
    /// By (origin, query id), owned by the neighbour that brought it.
    queries: Mutex<SeenCache<(NodeId, u64), NodeId>>,
    /// Searches in progress, by target.
    searches: Mutex<HashMap<NodeId, Search>>,
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
    /// Routed messages not forwarded: the next hop's lane stayed full.
    dropped: AtomicU64,
    /// Keys shared with the origins and targets of routed messages.
    keys: Mutex<KeyCache>,
    /// The nonces of routed requests taken, to refuse them sent again.
    replay: Mutex<ReplayGuard>,
    /// The clock routed messages are stamped with.
    clock: WallClock,
    /// Routed messages for this node that did not open (forged, altered,
    /// or from an origin whose key could not be made).
    refused: AtomicU64,
    /// Routed requests for this node refused as seen before.
    replayed: AtomicU64,
    /// Routed requests for this node stamped outside the clock window.
    stale: AtomicU64,
}

/// Keys kept at most; past this, an arbitrary one is dropped (made again
/// when needed).
const KEY_CACHE: usize = 4096;
/// New keys made per second for messages that arrive, after a burst of as
/// many: each costs an X25519 operation, and node ids are free to mint.
const NEW_KEYS_PER_SEC: f64 = 256.0;

/// The keys this node shares with others, made on first use.
struct KeyCache {
    keys: HashMap<NodeId, PairKey>,
    /// Keys that may still be made for arriving messages now (a token
    /// bucket of [`NEW_KEYS_PER_SEC`]), and when it was last filled.
    tokens: f64,
    filled: Instant,
}

/// Milliseconds since the Unix epoch: the wall clock read once at start,
/// advanced by tokio's clock (monotonic, and paused tests drive it).
struct WallClock {
    start_ms: u64,
    start: Instant,
}

impl WallClock {
    fn new() -> Self {
        let start_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        WallClock {
            start_ms,
            start: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start_ms + self.start.elapsed().as_millis() as u64
    }
}

/// What a routed message's seal is bound to: every field but the payload
/// and the TTL (which each hop lowers).
fn seal_ad(r: &Routed) -> Vec<u8> {
    const LABEL: &[u8] = b"meshwork routed v1";
    let mut ad = Vec::with_capacity(LABEL.len() + 2 + r.origin.len() + r.target.len() + 24);
    ad.extend_from_slice(LABEL);
    // Ids are at most 64 bytes: one length byte each keeps the parts apart.
    ad.push(r.origin.len() as u8);
    ad.extend_from_slice(&r.origin);
    ad.push(r.target.len() as u8);
    ad.extend_from_slice(&r.target);
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
    pub(crate) fn new(cfg: &ConcernsConfig) -> Self {
        Routing {
            table: Mutex::new(RouteTable::new(cfg.route_ttl, cfg.route_capacity)),
            queries: Mutex::new(SeenCache::new(cfg.seen_capacity, cfg.seen_ttl)),
            searches: Mutex::new(HashMap::new()),
            breadcrumbs: Mutex::new(SeenCache::new(cfg.seen_capacity, cfg.seen_ttl)),
            max_hops: cfg.max_hops,
            search_timeout: cfg.route_timeout,
            window: cfg.routed_window,
            forwarded: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            unreachable: AtomicU64::new(0),
            searches_started: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            keys: Mutex::new(KeyCache {
                keys: HashMap::new(),
                tokens: NEW_KEYS_PER_SEC,
                filled: Instant::now(),
            }),
            replay: Mutex::new(ReplayGuard::new(
                cfg.routed_window.as_millis() as u64,
                cfg.seen_capacity,
            )),
            clock: WallClock::new(),
            refused: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            stale: AtomicU64::new(0),
        }
    }

    /// The key shared with `node`, made if need be. `arriving`: for a
    /// message that came in, whose origin anyone can make up; those keys
    /// are made at a bounded rate. `None` if `node` is not a usable key or
    /// the rate is spent.
    fn key(&self, inner: &Inner, node: &NodeId, arriving: bool) -> Option<PairKey> {
        let mut cache = lock(&self.keys);
        if let Some(k) = cache.keys.get(node) {
            return Some(k.clone());
        }
        if arriving {
            let now = Instant::now();
            let refill =
                now.saturating_duration_since(cache.filled).as_secs_f64() * NEW_KEYS_PER_SEC;
            cache.tokens = (cache.tokens + refill).min(NEW_KEYS_PER_SEC);
            cache.filled = now;
            if cache.tokens < 1.0 {
                debug!(node = %node.short(), "routed message dropped: too many new keys a second");
                return None;
            }
            cache.tokens -= 1.0;
        }
        let key = match inner.peers.endpoint().config().identity().pair_key(node) {
            Ok(k) => k,
            Err(e) => {
                debug!(node = %node.short(), error = %e, "no key shared with this node");
                return None;
            }
        };
        if cache.keys.len() >= KEY_CACHE
            && let Some(any) = cache.keys.keys().next().cloned()
        {
            cache.keys.remove(&any);
        }
        cache.keys.insert(node.clone(), key.clone());
        Some(key)
    }

    /// A routed message from this node to `target`, its payload sealed.
    #[allow(clippy::too_many_arguments)]
    fn sealed(
        &self,
        inner: &Inner,
        target: &NodeId,
        command: u32,
        request_id: u64,
        kind: ConcernKind,
        payload: &[u8],
        ttl: u32,
    ) -> Option<Routed> {
        let key = self.key(inner, target, false)?;
        let mut r = Routed {
            origin: inner.peers.node_id().as_bytes().clone(),
            target: target.as_bytes().clone(),
            command,
            request_id,
            kind: kind as i32,
            payload: Bytes::new(),
            ttl,
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
        origin: &NodeId,
        r: &Routed,
        kind: ConcernKind,
    ) -> Result<Bytes, Option<String>> {
        let opened = self
            .key(inner, origin, true)
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
            r.command,
            r.request_id,
            ConcernKind::Error,
            &payload,
            self.max_hops,
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
            ("forwarded", get(&self.forwarded)),
            ("delivered", get(&self.delivered)),
            ("unreachable", get(&self.unreachable)),
            ("dropped", get(&self.dropped)),
            ("refused", get(&self.refused)),
            ("replayed", get(&self.replayed)),
            ("stale", get(&self.stale)),
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
            None => self.search(inner, target).await?,
        };
        let routed = self
            .sealed(
                inner,
                target,
                command,
                request_id,
                kind,
                &payload,
                self.max_hops,
            )
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

    /// Floods a query for `target` (or joins one in progress) and waits for
    /// a route, at most the search timeout.
    async fn search(&self, inner: &Arc<Inner>, target: &NodeId) -> Result<NodeId, ConcernsError> {
        let query_id: u64 = rand::random();
        let (mut rx, first) = {
            let mut searches = lock(&self.searches);
            match searches.get(target) {
                Some(s) => (s.found.subscribe(), false),
                None => {
                    let (found, rx) = watch::channel(false);
                    searches.insert(target.clone(), Search { query_id, found });
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
            let query = RouteQuery {
                query_id,
                origin: me.as_bytes().clone(),
                target: target.as_bytes().clone(),
                ttl: self.max_hops,
            };
            lock(&self.queries).insert((me.clone(), query.query_id), me, Instant::now());
            let body = encode(Body::Query(query));
            for p in inner.peers.neighbours() {
                let _ = inner.try_send_direct(&p, ROUTING, body.clone());
            }
        }
        // `wait_for` returns a read guard of the channel: drop it at once,
        // before anything takes the searches lock (`on_found` sends while
        // holding that lock, and the send needs the channel's write lock).
        let found = tokio::time::timeout(self.search_timeout, rx.wait_for(|found| *found))
            .await
            .is_ok_and(|r| r.is_ok());
        drop(_guard);
        match found {
            true => self
                .next_hop(inner, target)
                .ok_or_else(|| ConcernsError::Unreachable(target.clone())),
            false => {
                self.unreachable.fetch_add(1, Ordering::Relaxed);
                Err(ConcernsError::Unreachable(target.clone()))
            }
        }
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
        if origin == *me || !lock(&self.queries).insert((origin.clone(), q.query_id), from, now) {
            return Ok(());
        }
        lock(&self.table).learn(&origin, from, self.hops_relayed(q.ttl), now);
        let hops = if target == *me {
            Some(0)
        } else if target != *from && Self::is_neighbour(inner, &target) {
            Some(1)
        } else {
            None
        };
        if let Some(hops) = hops {
            let found = RouteFound {
                query_id: q.query_id,
                origin: q.origin,
                target: q.target,
                hops,
            };
            inner.try_send_direct(from, ROUTING, encode(Body::Found(found)))?;
            return Ok(());
        }
        if q.ttl > 1 {
            let next = encode(Body::Query(RouteQuery {
                ttl: q.ttl - 1,
                ..q
            }));
            for p in inner.peers.neighbours() {
                if p != *from && p != origin {
                    let _ = inner.try_send_direct(&p, ROUTING, next.clone());
                }
            }
        }
        Ok(())
    }

    /// A route answer. Only answers to a query this node made (its search
    /// for that target is running) or relayed (seen, from someone else) are
    /// taken, and "I am the target" (0 hops) only from the target itself: an
    /// unsolicited answer was one message to black-hole a route for its
    /// lifetime.
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
                .map(|s| s.found.clone());
            let Some(found) = found else {
                return Ok(()); // not asked, or asked and answered already
            };
            lock(&self.table).learn(&target, from, hops, now);
            found.send_replace(true);
            return Ok(());
        }
        if !lock(&self.queries).contains(&(origin.clone(), f.query_id), now) {
            return Ok(());
        }
        lock(&self.table).learn(&target, from, hops, now);
        if let Some(next) = self.next_hop(inner, &origin) {
            let back = RouteFound { hops, ..f };
            inner.try_send_direct(&next, ROUTING, encode(Body::Found(back)))?;
        }
        Ok(())
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
            let payload = match self.open(inner, &origin, &r, kind) {
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
            None => return Err("empty route message".into()),
        }
        Ok(None)
    }
}
