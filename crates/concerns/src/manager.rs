//! The concerns manager: registration, lifecycle, dispatch, request/reply.
//!
//! There is no dispatcher task: the peer manager hands each Concern frame
//! to [`Inner::on_concern`] on the reader of the connection it came on, and
//! a flooded or routed message that reached this node comes the same way
//! from the task that received it.
//!
//! - A reply is matched to its waiting request at once, right there.
//! - A request starts at once if its concern has room (its concurrency) and
//!   nothing is waiting: the handler's first poll runs right there, and a
//!   handler that answers without waiting (most do) is answered without any
//!   task switch. One that waits moves to a task of its own.
//! - Otherwise the request waits in its concern's queues: one per lane
//!   (control first, then normal, then bulk), each a [`FairQueue`] with one
//!   bounded queue per sender served in turn. A task that finishes a request
//!   takes the next waiting one.
//!
//! Handlers are isolated: an error or a panic becomes an error reply and a
//! count.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use meshwork_peers::transport::ConnectionHandle;
use meshwork_peers::transport::{Priority, TransportError};
use meshwork_peers::wire::proto::{Concern as Frame, ConcernError, ConcernKind, ErrorCode};
use meshwork_peers::wire::{Message, NodeId};
use meshwork_peers::{ConcernFrame, InboundHandler, PeerEvent, PeerManager, PeerState, PeersError};
use prost::Message as _;
use rustc_hash::FxHashMap;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::budget::{ByteBudget, Held};
use crate::clock::WallClock;
use crate::fair::FairQueue;
use crate::flood::Flood;
use crate::pending::{Awaiting, Requests};
use crate::routing::Routing;
use crate::topics::{Subscription, Topics};
use crate::warn::WarnBudget;
use crate::{Concern, ConcernsError, Context, Reply, Route, Via};

/// Command ids from here up belong to meshwork's built-in concerns.
pub const RESERVED_COMMANDS: u32 = 0xFFFF_0000;
/// A concern's lane queues at most this many senders' worth of requests
/// (`per_sender_queue` each) in all: senders of flooded and routed requests
/// are whatever the messages claim, so a peer could otherwise invent a new
/// one per message.
const QUEUED_SENDERS: usize = 64;
/// The flood concern's command id.
pub const FLOOD: u32 = 0xFFFF_0001;
/// The routing concern's command id.
pub const ROUTING: u32 = 0xFFFF_0002;
/// The topics concern's command id (it arrives inside floods).
pub const TOPICS: u32 = 0xFFFF_0003;

/// Settings of the concerns layer, with defaults and chained setters.
#[derive(Debug, Clone)]
pub struct ConcernsConfig {
    pub(crate) per_sender_queue: usize,
    pub(crate) flood_ttl: u32,
    pub(crate) seen_capacity: usize,
    pub(crate) seen_ttl: Duration,
    pub(crate) max_hops: u32,
    pub(crate) route_ttl: Duration,
    pub(crate) route_capacity: usize,
    pub(crate) route_timeout: Duration,
    pub(crate) routed_window: Duration,
    pub(crate) subscription_queue: usize,
    pub(crate) request_bytes_per_sender: usize,
    pub(crate) request_bytes: usize,
}

impl Default for ConcernsConfig {
    fn default() -> Self {
        ConcernsConfig {
            per_sender_queue: 64,
            flood_ttl: 16,
            seen_capacity: 65_536,
            seen_ttl: Duration::from_secs(120),
            max_hops: 16,
            route_ttl: Duration::from_secs(60),
            route_capacity: 4096,
            route_timeout: Duration::from_secs(3),
            routed_window: Duration::from_secs(300),
            subscription_queue: 256,
            request_bytes_per_sender: 32 << 20,
            request_bytes: 256 << 20,
        }
    }
}

impl ConcernsConfig {
    /// Requests waiting per sender, concern and lane (default 64); beyond
    /// it the sender is answered "overloaded". Per lane, so that a backlog of
    /// bulk or normal requests never locks a sender's control requests out.
    pub fn with_per_sender_queue(mut self, n: usize) -> Self {
        self.per_sender_queue = n.max(1);
        self
    }

    /// Bytes of requests of 4 KiB or more that one concern holds, waiting
    /// or running: at most `per_sender` from one sender and `per_concern`
    /// in all (default 32 MiB and 256 MiB). Beyond, a request is answered
    /// "overloaded" at once. A sender holding none always gets one in,
    /// and so does a concern holding none, whatever its size. Counts and
    /// concurrency bound how many requests a node holds; this bounds their
    /// size, which peers choose (up to the 16 MiB frame limit).
    pub fn with_request_bytes(mut self, per_sender: usize, per_concern: usize) -> Self {
        self.request_bytes_per_sender = per_sender;
        self.request_bytes = per_concern;
        self
    }

    /// Hops a broadcast travels by default (default 16).
    pub fn with_flood_ttl(mut self, ttl: u32) -> Self {
        self.flood_ttl = ttl.max(1);
        self
    }

    /// The flood dedup cache: entries and how long each is kept (default
    /// 65 536 and 120 s). A flood must die out (its TTL) well within that
    /// time, or it could be delivered twice. Floods stamped further than
    /// half that time from this node's clock are dropped (counted `stale`),
    /// so that one recorded and sent again after the cache forgot it is
    /// refused: nodes whose clocks differ by more cannot flood each other.
    pub fn with_seen_cache(mut self, capacity: usize, ttl: Duration) -> Self {
        self.seen_capacity = capacity.max(1);
        self.seen_ttl = ttl;
        self
    }

    /// Routing: most hops to a target (default 16), how long a learnt route
    /// lives (default 60 s), and how long a route search may take before the
    /// target is reported unreachable (default 3 s). For as long again after
    /// a search that found nothing, sends to that target fail at once, unless
    /// a route to it is learnt or this node's neighbours change meanwhile.
    pub fn with_routing(
        mut self,
        max_hops: u32,
        route_ttl: Duration,
        search_timeout: Duration,
    ) -> Self {
        self.max_hops = max_hops.max(1);
        self.route_ttl = route_ttl;
        self.route_timeout = search_timeout;
        self
    }

    /// How far from this node's clock a routed request for it may be stamped
    /// (default 5 minutes; at least 1 s). Each request is remembered while
    /// its stamp is within this window, so that one sent again by a node on
    /// its way is refused; one stamped outside it is refused too, and its
    /// origin told why. Nodes whose clocks differ by more cannot make
    /// routed requests to each other (direct ones are not affected).
    pub fn with_routed_window(mut self, window: Duration) -> Self {
        self.routed_window = window.max(Duration::from_secs(1));
        self
    }

    /// See [`with_routed_window`](Self::with_routed_window).
    pub fn routed_window(&self) -> Duration {
        self.routed_window
    }

    /// Messages kept for a slow topic subscriber (default 256); more are
    /// dropped and counted.
    pub fn with_subscription_queue(mut self, n: usize) -> Self {
        self.subscription_queue = n.max(1);
        self
    }
}

/// Counters of one concern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConcernStats {
    /// Its command id.
    pub command: u32,
    /// Its name.
    pub name: String,
    /// Requests handled (started).
    pub requests: u64,
    /// Replies sent.
    pub replies: u64,
    /// Requests that failed (error or panic).
    pub errors: u64,
    /// Of those, panics.
    pub panics: u64,
    /// Requests refused because their sender's queue was full.
    pub dropped: u64,
    /// Requests running now.
    pub in_flight: usize,
    /// Requests waiting now.
    pub queued: usize,
    /// Bytes of the large requests (4 KiB or more) it holds now, waiting
    /// or running ([`ConcernsConfig::with_request_bytes`]).
    pub held_bytes: usize,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    replies: AtomicU64,
    errors: AtomicU64,
    panics: AtomicU64,
    dropped: AtomicU64,
    in_flight: AtomicUsize,
    queued: AtomicUsize,
    /// `on_reply` calls running now.
    replies_running: AtomicUsize,
}

/// One of a concern's `on_reply` slots, given back when its task ends
/// (also when it is dropped at shutdown).
struct ReplySlot(Arc<Registered>);

impl Drop for ReplySlot {
    fn drop(&mut self) {
        self.0
            .counters
            .replies_running
            .fetch_sub(1, Ordering::AcqRel);
    }
}

pub(crate) struct Registered {
    concern: Arc<dyn Concern>,
    name: String,
    max_concurrency: usize,
    /// What [`Concern::accepts`] said for each [`Via`].
    accepts: [bool; 3],
    counters: Counters,
    /// Bytes of large requests held, per sender and in all.
    budget: Arc<ByteBudget>,
    /// Its requests running and waiting for room: its own lock, taken
    /// twice per request (no map of all concerns' queues to look up).
    waiting: Mutex<Waiting>,
}

/// How the answer to a request goes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplyPath {
    /// No answer wanted.
    None,
    /// To the neighbour that sent it.
    Direct,
    /// Through the routing concern to the origin.
    Routed,
}

/// A request for a local concern.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) command: u32,
    pub(crate) from: NodeId,
    pub(crate) request_id: u64,
    pub(crate) payload: Bytes,
    pub(crate) reply: ReplyPath,
    /// The connection a direct request came on: its answer goes back there.
    /// For a routed request, the connection of the neighbour it came
    /// through: its answer goes that way if no route to its origin is known.
    pub(crate) conn: Option<ConnectionHandle>,
    /// The lane the request came on: it waits in that lane's queue, and its
    /// reply takes that lane unless the handler picks another.
    pub(crate) priority: Priority,
    /// How it reached this node.
    pub(crate) via: Via,
    /// Its share of its concern's byte budget, once admitted (boxed: most
    /// requests are small and hold none, and a job is moved around).
    pub(crate) held: Option<Box<Held>>,
}

/// Room kept in a frame for what wraps a payload: the concern frame's own
/// fields, and the envelope of a routed (sealed) or flooded (signed)
/// message, a few hundred bytes at most.
const ENVELOPE_ROOM: usize = 1024;

/// Routed error answers being sent at once, at most; more are dropped.
const MAX_ERROR_TASKS: usize = 256;
/// How long what a node sends on another's behalf (an answer, a routed
/// frame passed on, a relayed push) waits for room on a full lane before it
/// is dropped: the wait holds one of a concern's slots, and a peer that
/// does not read must not hold them all for the send timeout. Dropped
/// answers are counted in [`Concerns::unsent_answers`].
pub const FORWARD_WAIT: Duration = Duration::from_secs(1);

/// Concern frame flags owned by this layer: the lane a frame was sent on
/// (0 normal, 1 control, 2 bulk), so that a reply can take the request's.
const LANE_FLAGS: u32 = 0b11;

pub(crate) fn lane_flags(priority: Priority) -> u32 {
    match priority {
        Priority::Normal => 0,
        Priority::Control => 1,
        Priority::Bulk => 2,
    }
}

/// A Concern frame for a neighbour, sent on `priority`'s lane (which its
/// flags name).
fn direct_frame(
    command: u32,
    request_id: u64,
    kind: ConcernKind,
    priority: Priority,
    payload: Bytes,
) -> Message {
    Message::Concern(Frame {
        command,
        request_id,
        kind: kind as i32,
        ttl: 0,
        flags: lane_flags(priority),
        payload,
    })
}

fn lane_of(flags: u32) -> Priority {
    match flags & LANE_FLAGS {
        1 => Priority::Control,
        2 => Priority::Bulk,
        _ => Priority::Normal,
    }
}

/// The requests of one concern waiting for room: a fair queue per lane.
struct Waiting {
    lanes: [FairQueue<NodeId, Job>; 3],
    /// Requests of this concern running now.
    running: usize,
    /// Where [`pop`](Self::pop) is in [`LANE_TURNS`].
    turn: usize,
}

/// Which lane gets the next turn, in a cycle of 8 turns: 4 for control, 3
/// for normal, 1 for bulk. A lane whose turn it is but that is empty gives
/// the turn to the first lane with work, in priority order. Served
/// strictly in priority order, one peer sending everything on the control
/// lane (the sender picks the lane) kept every other peer's normal
/// requests waiting until they timed out, and their senders then blamed,
/// and banned, this node.
const LANE_TURNS: [usize; 8] = [0, 1, 0, 1, 0, 2, 0, 1];

impl Waiting {
    fn new(per_sender: usize) -> Self {
        Waiting {
            lanes: std::array::from_fn(|_| {
                FairQueue::new(per_sender, per_sender.saturating_mul(QUEUED_SENDERS))
            }),
            running: 0,
            turn: 0,
        }
    }

    fn len(&self) -> usize {
        self.lanes.iter().map(FairQueue::len).sum()
    }

    /// The next request: from the lane whose turn it is (see
    /// [`LANE_TURNS`]), round robin between senders within a lane.
    fn pop(&mut self) -> Option<Job> {
        let lane = LANE_TURNS[self.turn % LANE_TURNS.len()];
        self.turn = self.turn.wrapping_add(1);
        if let Some((_, job)) = self.lanes[lane].pop() {
            return Some(job);
        }
        self.lanes
            .iter_mut()
            .find_map(|q| q.pop().map(|(_, job)| job))
    }
}

pub(crate) struct Inner {
    pub(crate) peers: PeerManager,
    pub(crate) config: ConcernsConfig,
    /// The largest payload a message carries ([`Concerns::max_payload`]).
    max_payload: usize,
    /// By command id (ours to register): FxHash, looked up per message.
    registry: RwLock<FxHashMap<u32, Arc<Registered>>>,
    /// Requests of this node waiting for their answers.
    pending: Arc<Requests>,
    unknown: AtomicU64,
    unknown_warnings: WarnBudget,
    /// Error answers dropped because they could not go out at once.
    unsent_errors: AtomicU64,
    /// Answers dropped after waiting [`FORWARD_WAIT`] for room.
    unsent_answers: AtomicU64,
    /// Tasks sending routed error answers now.
    error_tasks: AtomicUsize,
    flood: OnceLock<Arc<Flood>>,
    routing: OnceLock<Arc<Routing>>,
    topics: OnceLock<Arc<Topics>>,
    started: std::sync::atomic::AtomicBool,
    /// Cancelled when the layer shuts down; awaited by its tasks.
    cancel: CancellationToken,
    /// Set just before `cancel` is cancelled: what the per-message paths
    /// check (the token's own check takes a lock, about 1.5% of a request's
    /// CPU when done per message).
    stopping: std::sync::atomic::AtomicBool,
    tracker: TaskTracker,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn error_payload(code: ErrorCode, message: impl Into<String>) -> Bytes {
    let mut message: String = message.into();
    if message.len() > 1024 {
        let mut cut = 1024;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    ConcernError {
        code: code as i32,
        message,
    }
    .encode_to_vec()
    .into()
}

pub(crate) fn decode_error(payload: &[u8]) -> ConcernsError {
    match ConcernError::decode(payload) {
        Ok(e) => ConcernsError::Remote {
            code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
            message: e.message,
        },
        Err(e) => ConcernsError::Decode(format!("error reply: {e}")),
    }
}

impl Inner {
    /// [`ConcernsError::PayloadTooLarge`] for a payload of `len` bytes
    /// that no message can carry.
    pub(crate) fn check_len(&self, len: usize) -> Result<(), ConcernsError> {
        if len > self.max_payload {
            return Err(ConcernsError::PayloadTooLarge {
                len,
                max: self.max_payload,
            });
        }
        Ok(())
    }

    /// [`ConcernsError::InvalidArgument`] for a message routed to this
    /// node itself (no route search could find it).
    pub(crate) fn check_not_me(&self, node: &NodeId) -> Result<(), ConcernsError> {
        if node == self.peers.node_id() {
            return Err(ConcernsError::InvalidArgument(
                "the target is this node itself: call its concern directly".into(),
            ));
        }
        Ok(())
    }

    /// True once the layer is shutting down.
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Fails the requests waiting on `peer`, which has left: direct ones,
    /// whose answers cannot come any more, and routed ones to `peer`
    /// itself (most likely gone, and if not, its answer may still come by
    /// another way, too late: an asker waiting out its whole timeout for a
    /// node it saw leave learns nothing more).
    pub(crate) fn peer_left(&self, peer: &NodeId) {
        self.pending.finish_where(
            |p| p.expect == *peer,
            || Err(ConcernsError::ConnectionLost(peer.clone())),
        );
        for reg in self.all_registered() {
            let hook = AssertUnwindSafe(|| reg.concern.on_peer_left(peer));
            if std::panic::catch_unwind(hook).is_err() {
                reg.counters.panics.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Spawns a task that ends with the layer (it must watch `cancel` or
    /// end by itself).
    pub(crate) fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = f => {}
            }
        });
    }

    pub(crate) fn context(self: &Arc<Self>, command: u32) -> Context {
        Context {
            inner: self.clone(),
            command,
            registered: OnceLock::new(),
        }
    }

    /// Every concern registered now (taken out of the registry's lock).
    fn all_registered(&self) -> Vec<Arc<Registered>> {
        self.registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub(crate) fn registered(&self, command: u32) -> Option<Arc<Registered>> {
        self.registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&command)
            .cloned()
    }

    pub(crate) fn flood(&self) -> Result<Arc<Flood>, ConcernsError> {
        self.flood
            .get()
            .cloned()
            .ok_or(ConcernsError::NotInstalled("flood"))
    }

    pub(crate) fn routing(&self) -> Result<Arc<Routing>, ConcernsError> {
        self.routing
            .get()
            .cloned()
            .ok_or(ConcernsError::NotInstalled("routing"))
    }

    fn topics(&self) -> Result<Arc<Topics>, ConcernsError> {
        self.topics
            .get()
            .cloned()
            .ok_or(ConcernsError::NotInstalled("topics"))
    }

    pub(crate) fn publish(
        self: &Arc<Self>,
        topic: &str,
        payload: Bytes,
    ) -> Result<u64, ConcernsError> {
        let body = self.topics()?.encode(topic, payload)?;
        self.flood_from_here(TOPICS, body, self.config.flood_ttl)
    }

    /// Starts a flood of `payload` for `command` (see [`Context::broadcast`]).
    pub(crate) fn broadcast(
        self: &Arc<Self>,
        command: u32,
        payload: Bytes,
        ttl: u32,
    ) -> Result<u64, ConcernsError> {
        if command == FLOOD || command == ROUTING {
            return Err(ConcernsError::InvalidArgument(format!(
                "command {command:#x} is a carrier: a flood of it is delivered nowhere"
            )));
        }
        if ttl == 0 {
            return Err(ConcernsError::InvalidArgument(
                "a broadcast travels at least 1 hop (ttl 0)".into(),
            ));
        }
        self.flood_from_here(command, payload, ttl)
    }

    fn flood_from_here(
        self: &Arc<Self>,
        command: u32,
        payload: Bytes,
        ttl: u32,
    ) -> Result<u64, ConcernsError> {
        let flood = self.flood()?;
        if self.stopping() {
            return Err(ConcernsError::Shutdown);
        }
        self.check_len(payload.len())?;
        flood.broadcast(self, command, payload, ttl)
    }

    /// Tells `reg`'s concern how a message it sent to `to` fared.
    pub(crate) fn notify(reg: &Registered, to: &NodeId, error: Option<&ConcernsError>) {
        match error {
            None => reg.concern.on_sent(to),
            Some(e) if e.is_send_failure() => reg.concern.on_send_failed(to, e),
            Some(ConcernsError::Dropped(_)) => reg.concern.on_dropped(to),
            Some(_) => {} // sent, but the answer was an error or never came
        }
    }

    /// Queues one Concern frame to a neighbour.
    pub(crate) async fn send_direct(
        &self,
        peer: &NodeId,
        command: u32,
        request_id: u64,
        kind: ConcernKind,
        payload: Bytes,
        priority: Priority,
    ) -> Result<(), ConcernsError> {
        self.check_len(payload.len())?;
        let frame = direct_frame(command, request_id, kind, priority, payload);
        self.peers
            .send(peer, frame, priority)
            .await
            .map_err(ConcernsError::from)
    }

    /// Like [`send_direct`](Self::send_direct) without waiting for room.
    pub(crate) fn try_send_direct(
        &self,
        peer: &NodeId,
        command: u32,
        payload: Bytes,
    ) -> Result<(), ConcernsError> {
        let frame = direct_frame(command, 0, ConcernKind::Request, Priority::Normal, payload);
        self.peers
            .try_send(peer, frame, Priority::Normal)
            .map_err(ConcernsError::from)
    }

    /// Registers a request to `expect` that times out after `timeout`, with
    /// the clock reading its deadline counts from (see
    /// [`Requests::insert`]); [`ConcernsError::Shutdown`] once the layer
    /// shuts down.
    fn new_request(
        &self,
        expect: &NodeId,
        command: u32,
        routed: bool,
        timeout: Duration,
    ) -> Result<(Awaiting<'_>, Instant), ConcernsError> {
        // Asked under the lock that shutdown clears the map under (after
        // cancelling): a request is either refused here or failed there.
        self.pending
            .insert(
                // Unpredictable: an id is all a forged answer would need
                // to guess (with the sender and the command, both public).
                rand::random::<u64>,
                expect,
                command,
                routed,
                timeout,
                || self.stopping(),
            )
            .ok_or(ConcernsError::Shutdown)
    }

    #[allow(clippy::manual_async_fn)] // an async block on purpose, as in `Context::direct`
    pub(crate) fn request_direct(
        &self,
        command: u32,
        peer: &NodeId,
        payload: Bytes,
        timeout: Duration,
        priority: Priority,
        blame_timeout: bool,
    ) -> impl Future<Output = Result<Bytes, ConcernsError>> + Send {
        async move {
            self.check_len(payload.len())?;
            let (waiting, now) = self.new_request(peer, command, false, timeout)?;
            let id = waiting.id();
            let frame = direct_frame(command, id, ConcernKind::Request, priority, payload);
            // A lone request is written at once by this task (dated with
            // the reading its deadline took); with others in flight the
            // connection's writer gathers them into fewer writes.
            let eager = waiting.alone().then_some(now);
            if let Some(frame) = self.peers.offer(peer, frame, priority, eager)? {
                // The lane is full: wait for room, until the request's own
                // deadline at most (the transport's send timeout, 10 s,
                // would outlast a shorter one). Boxed: rare, and the wait
                // would otherwise make every request's future larger.
                let deadline = now + timeout.min(meshwork_peers::FOREVER);
                let room = self.peers.send(peer, frame, priority);
                match Box::pin(tokio::time::timeout_at(deadline, room)).await {
                    Ok(sent) => sent?,
                    Err(_) => return Err(ConcernsError::Timeout(timeout)),
                }
            }
            let r = waiting.outcome().await;
            if blame_timeout && matches!(r, Err(ConcernsError::Timeout(_))) {
                self.peers.report_timeout(peer);
            }
            r
        }
    }

    pub(crate) async fn request_routed(
        self: &Arc<Self>,
        routing: &Routing,
        command: u32,
        node: &NodeId,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, ConcernsError> {
        self.check_len(payload.len())?;
        self.check_not_me(node)?;
        let (waiting, _) = self.new_request(node, command, true, timeout)?;
        let id = waiting.id();
        // The route search has its own end: the request's deadline.
        tokio::time::timeout(
            timeout,
            routing.send(self, node, command, id, ConcernKind::Request, payload),
        )
        .await
        .unwrap_or(Err(ConcernsError::Timeout(timeout)))?;
        let r = waiting.outcome().await;
        if matches!(r, Err(ConcernsError::Timeout(_))) {
            // The route may be a black hole (a member can claim routes it
            // then drops): the next request searches again.
            routing.forget(node);
        }
        r
    }

    /// A reply or error frame arrived from `from`: on a direct connection
    /// from that neighbour, or (`routed`) in a routed message whose origin
    /// says it is `from` (anyone on the way can claim that).
    pub(crate) fn resolve(
        self: &Arc<Self>,
        from: &NodeId,
        routed: bool,
        command: u32,
        id: u64,
        kind: ConcernKind,
        payload: Bytes,
    ) {
        let result = match kind {
            ConcernKind::Reply => Ok(payload.clone()),
            _ => Err(decode_error(&payload)),
        };
        let unreachable = matches!(
            result,
            Err(ConcernsError::Remote {
                code: ErrorCode::Unreachable,
                ..
            })
        );
        // An answer counts only for a request of its command sent the way
        // it came (a routed answer claiming to be from a neighbour we asked
        // directly is someone else's), and request ids are random: a member
        // cannot answer for another node by guessing them.
        let finished = self.pending.finish_if(
            id,
            |p| {
                p.command == command
                    && p.routed == routed
                    && (p.expect == *from || (routed && unreachable))
            },
            result,
        );
        match finished {
            Ok(()) => {}
            Err(result) => {
                if kind != ConcernKind::Reply {
                    debug!(command, id, from = %from.short(), error = ?result.err(), "unawaited error reply");
                    return;
                }
                if let Some(reg) = self.registered(command) {
                    // As many at once as the concern's requests, at most;
                    // past that dropped (and counted): a neighbour sending
                    // replies nobody asked for must not start a task each.
                    let running = &reg.counters.replies_running;
                    if running.fetch_add(1, Ordering::AcqRel) >= reg.max_concurrency {
                        running.fetch_sub(1, Ordering::AcqRel);
                        reg.counters.dropped.fetch_add(1, Ordering::Relaxed);
                        debug!(command, from = %from.short(), "unawaited reply dropped: too many running");
                        return;
                    }
                    let ctx = self.context(command);
                    let from = from.clone();
                    // Ends with the layer, as handlers do.
                    self.spawn(async move {
                        let _slot = ReplySlot(reg.clone());
                        let f = reg.concern.on_reply(&ctx, &from, payload);
                        if AssertUnwindSafe(f).catch_unwind().await.is_err() {
                            reg.counters.panics.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            }
        }
    }

    /// Hands a message that reached this node (flooded, routed) to its
    /// concern, through the same queues as direct requests.
    pub(crate) fn deliver_local(self: &Arc<Self>, job: Job) -> Result<(), ConcernsError> {
        if self.stopping() {
            return Err(ConcernsError::Shutdown);
        }
        // A carrier inside a carrier would be unwrapped and sent on again
        // one layer at a time, a fresh message id each: a frame of N nested
        // floods costs every node O(N^2) copies and relays. Nothing of ours
        // nests them.
        if job.command == FLOOD || job.command == ROUTING {
            return Err(ConcernsError::Dropped(format!(
                "a flooded or routed message may not carry command {:#x}",
                job.command
            )));
        }
        self.submit(job);
        Ok(())
    }

    /// One Concern frame from the neighbour `from`, on `conn`'s reader.
    fn on_concern(self: &Arc<Self>, from: &NodeId, conn: &ConnectionHandle, f: ConcernFrame) {
        match ConcernKind::try_from(f.kind) {
            Ok(ConcernKind::Request) => {
                let reply = if f.request_id == 0 {
                    ReplyPath::None
                } else {
                    ReplyPath::Direct
                };
                let job = Job {
                    command: f.command,
                    from: from.clone(),
                    request_id: f.request_id,
                    payload: f.payload,
                    reply,
                    conn: Some(conn.clone()),
                    priority: lane_of(f.flags),
                    via: Via::Direct,
                    held: None,
                };
                if self.stopping() {
                    let msg = "node shutting down".to_string();
                    self.answer_soon(job, ErrorCode::ShuttingDown, msg);
                    return;
                }
                self.submit(job);
            }
            Ok(kind @ (ConcernKind::Reply | ConcernKind::Error)) => {
                self.resolve(from, false, f.command, f.request_id, kind, f.payload);
            }
            // The wire layer refuses other kinds before they get here.
            _ => {}
        }
    }

    /// Starts `job` now if its concern has room and nothing waits, else
    /// queues it on its lane (or refuses it: the sender's queue is full).
    fn submit(self: &Arc<Self>, mut job: Job) {
        let command = job.command;
        let Some(reg) = self.registered(command) else {
            // Logged loudly a few times a period: a peer sending such
            // requests in bulk must not flood the log (the count goes on).
            self.unknown.fetch_add(1, Ordering::Relaxed);
            if self.unknown_warnings.take() {
                warn!(command = format_args!("{command:#x}"), from = %job.from.short(), "request for an unknown command");
            } else {
                debug!(command = format_args!("{command:#x}"), from = %job.from.short(), "request for an unknown command");
            }
            let msg = format!("no concern for command {command:#x}");
            self.answer_soon(job, ErrorCode::UnknownCommand, msg);
            return;
        };
        if !reg.accepts[job.via.index()] {
            reg.counters.dropped.fetch_add(1, Ordering::Relaxed);
            debug!(command = format_args!("{command:#x}"), from = %job.from.short(), via = %job.via, "request refused: not taken that way");
            let msg = format!("{} does not take {} requests", reg.name, job.via);
            self.answer_soon(job, ErrorCode::BadRequest, msg);
            return;
        }
        match reg.budget.admit(&job.from, job.payload.len()) {
            Ok(held) => job.held = held.map(Box::new),
            Err(_) => {
                reg.counters.dropped.fetch_add(1, Ordering::Relaxed);
                let msg = format!("{} holds too many request bytes", reg.name);
                self.answer_soon(job, ErrorCode::Overloaded, msg);
                return;
            }
        }
        let job = {
            let mut w = lock(&reg.waiting);
            if w.running < reg.max_concurrency && w.len() == 0 {
                w.running += 1;
                reg.counters.in_flight.store(w.running, Ordering::Relaxed);
                job
            } else {
                let lane = job.priority as usize;
                let pushed = w.lanes[lane].push(job.from.clone(), job);
                reg.counters.queued.store(w.len(), Ordering::Relaxed);
                drop(w);
                if let Err(job) = pushed {
                    reg.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    let msg = format!("{} is overloaded", reg.name);
                    self.answer_soon(job, ErrorCode::Overloaded, msg);
                }
                return;
            }
        };
        // `job` was not queued: it runs now. Its first poll happens here; a
        // handler that has to wait continues in a task of its own.
        let mut first = Box::pin(self.clone().run(reg.clone(), job));
        if first.as_mut().now_or_never().is_some() {
            if let Some(next) = self.next_job(&reg) {
                self.spawn_worker(reg, Some(next), None);
            }
        } else {
            self.spawn_worker(reg, None, Some(first));
        }
    }

    /// A finished request's slot: the next waiting request of the concern,
    /// which takes the slot over, or `None` (the slot is given back).
    fn next_job(&self, reg: &Registered) -> Option<Job> {
        let mut w = lock(&reg.waiting);
        let next = w.pop();
        if next.is_none() {
            w.running = w.running.saturating_sub(1);
        }
        reg.counters.in_flight.store(w.running, Ordering::Relaxed);
        reg.counters.queued.store(w.len(), Ordering::Relaxed);
        next
    }

    /// A task that finishes `first` (a request that had to wait) or runs
    /// `job`, then the concern's waiting requests while there are any.
    fn spawn_worker(
        self: &Arc<Self>,
        reg: Arc<Registered>,
        job: Option<Job>,
        first: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    ) {
        let this = self.clone();
        // Ends with the layer: a handler still running at shutdown is
        // dropped (its asker's connection closes next), as RPC calls are,
        // rather than hold the shutdown for as long as it runs.
        self.spawn(async move {
            if let Some(f) = first {
                f.await;
            }
            let mut next = match job {
                Some(job) => Some(job),
                None => this.next_job(&reg),
            };
            while let Some(job) = next {
                if this.stopping() {
                    let msg = "node shutting down".to_string();
                    this.answer_soon(job, ErrorCode::ShuttingDown, msg);
                } else {
                    this.clone().run(reg.clone(), job).await;
                }
                next = this.next_job(&reg);
            }
        });
    }

    /// Sends the answer to `job` along its reply path.
    async fn answer(
        self: &Arc<Self>,
        job: &Job,
        kind: ConcernKind,
        payload: Bytes,
        priority: Priority,
    ) {
        // Every wait below is boxed: this future is part of every request's
        // (boxed whole when its handler has to wait), and the usual answer,
        // on the connection the request came in on, is queued without one.
        let r = match (job.reply, &job.conn) {
            (ReplyPath::None, _) => return,
            (ReplyPath::Direct, Some(conn)) => {
                let frame = direct_frame(job.command, job.request_id, kind, priority, payload);
                match conn.offer(frame, priority, None) {
                    Ok(None) => Ok(()),
                    // The lane is full: wait for room, a little. The wait
                    // holds one of the concern's slots, and a peer that
                    // does not read its answers must not hold them all for
                    // the send timeout.
                    Ok(Some(frame)) => {
                        let send = conn.send(frame, priority);
                        match Box::pin(tokio::time::timeout(FORWARD_WAIT, send)).await {
                            Ok(r) => r,
                            Err(_) => {
                                self.unsent_answers.fetch_add(1, Ordering::Relaxed);
                                Err(TransportError::Timeout {
                                    what: "room for an answer",
                                    after: FORWARD_WAIT,
                                })
                            }
                        }
                    }
                    Err(e) => Err(e),
                }
                .map_err(|e| ConcernsError::Dropped(e.to_string()))
            }
            (ReplyPath::Direct, None) => {
                Box::pin(self.send_direct(
                    &job.from,
                    job.command,
                    job.request_id,
                    kind,
                    payload,
                    priority,
                ))
                .await
            }
            (ReplyPath::Routed, conn) => match self.routing() {
                Ok(routing) => {
                    Box::pin(routing.send_via(
                        self,
                        &job.from,
                        conn.as_ref().map(|c| c.node_id()),
                        job.command,
                        job.request_id,
                        kind,
                        payload,
                    ))
                    .await
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = r {
            debug!(to = %job.from.short(), command = job.command, error = %e, "reply not sent");
        }
    }

    /// Answers `job` with an error without waiting: a direct request on its
    /// connection if the lane has room (else the answer is dropped: the
    /// sender is not reading, or floods us, and will time out), a routed one
    /// from a task, at most [`MAX_ERROR_TASKS`] at once.
    ///
    /// Never a task per refused request: a peer that floods requests while
    /// not reading must not make this node pile up tasks or buffers.
    fn answer_soon(self: &Arc<Self>, job: Job, code: ErrorCode, message: String) {
        if job.reply == ReplyPath::None {
            return;
        }
        let payload = error_payload(code, message);
        if job.reply == ReplyPath::Direct {
            let kind = ConcernKind::Error;
            let msg = direct_frame(job.command, job.request_id, kind, job.priority, payload);
            let sent = match &job.conn {
                Some(conn) => conn.try_send(msg, job.priority).map_err(|e| e.to_string()),
                None => self
                    .peers
                    .try_send(&job.from, msg, job.priority)
                    .map_err(|e| e.to_string()),
            };
            if let Err(e) = sent {
                self.unsent_errors.fetch_add(1, Ordering::Relaxed);
                debug!(to = %job.from.short(), command = job.command, error = %e, "error answer dropped");
            }
            return;
        }
        if self.error_tasks.fetch_add(1, Ordering::AcqRel) >= MAX_ERROR_TASKS {
            self.error_tasks.fetch_sub(1, Ordering::AcqRel);
            self.unsent_errors.fetch_add(1, Ordering::Relaxed);
            debug!(to = %job.from.short(), command = job.command, "routed error answer dropped: too many pending");
            return;
        }
        let this = self.clone();
        self.tracker.spawn(async move {
            let lane = job.priority;
            this.answer(&job, ConcernKind::Error, payload, lane).await;
            this.error_tasks.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// Runs one request: the handler, then its answer.
    async fn run(self: Arc<Self>, reg: Arc<Registered>, job: Job) {
        reg.counters.requests.fetch_add(1, Ordering::Relaxed);
        let ctx = self.context(job.command);
        let call = reg.concern.on_request(&ctx, &job.from, job.payload.clone());
        let outcome = AssertUnwindSafe(call).catch_unwind().await;
        let (kind, payload, priority) = match outcome {
            Ok(Ok(reply)) => {
                let reply = reply.unwrap_or_else(|| Reply::new(Bytes::new()));
                let lane = reply.priority.unwrap_or(job.priority);
                match self.check_len(reply.payload.len()) {
                    Ok(()) => (ConcernKind::Reply, reply.payload, lane),
                    // Too large to send: the asker hears so at once rather
                    // than wait out its timeout for an answer never sent.
                    Err(e) => {
                        reg.counters.errors.fetch_add(1, Ordering::Relaxed);
                        warn!(concern = %reg.name, error = %e, "reply not sent");
                        let p = error_payload(ErrorCode::HandlerFailed, format!("the reply: {e}"));
                        (ConcernKind::Error, p, job.priority)
                    }
                }
            }
            Ok(Err(e)) => {
                reg.counters.errors.fetch_add(1, Ordering::Relaxed);
                debug!(concern = %reg.name, error = %e, "handler failed");
                let p = error_payload(ErrorCode::HandlerFailed, e.to_string());
                (ConcernKind::Error, p, job.priority)
            }
            Err(_) => {
                reg.counters.errors.fetch_add(1, Ordering::Relaxed);
                reg.counters.panics.fetch_add(1, Ordering::Relaxed);
                warn!(concern = %reg.name, from = %job.from.short(), "handler panicked");
                let p = error_payload(ErrorCode::HandlerFailed, "the handler panicked");
                (ConcernKind::Error, p, job.priority)
            }
        };
        if job.reply != ReplyPath::None {
            if kind == ConcernKind::Reply {
                reg.counters.replies.fetch_add(1, Ordering::Relaxed);
            }
            self.answer(&job, kind, payload, priority).await;
        }
    }
}

/// What the peer manager hands Concern frames to.
struct Handler(std::sync::Weak<Inner>);

impl InboundHandler for Handler {
    fn on_concern(&self, from: &NodeId, conn: &ConnectionHandle, message: ConcernFrame) {
        if let Some(inner) = self.0.upgrade() {
            inner.on_concern(from, conn, message);
        }
    }
}

/// The concerns layer of a node: add concerns, start them, and talk to the
/// mesh through their [`Context`]s. Cheap to clone.
#[derive(Clone)]
pub struct Concerns {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Concerns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Concerns")
            .field("node_id", self.inner.peers.node_id())
            .finish()
    }
}

/// Builds [`Concerns`] on a [`PeerManager`].
pub struct ConcernsBuilder {
    peers: PeerManager,
    config: ConcernsConfig,
    concerns: Vec<Arc<dyn Concern>>,
    builtins: bool,
}

impl std::fmt::Debug for ConcernsBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConcernsBuilder")
            .field("concerns", &self.concerns.len())
            .field("builtins", &self.builtins)
            .finish()
    }
}

impl ConcernsBuilder {
    /// Settings (queues, flood TTL, routing).
    pub fn config(mut self, config: ConcernsConfig) -> Self {
        self.config = config;
        self
    }

    /// Adds a concern (besides the built-in ones).
    pub fn concern(self, concern: impl Concern) -> Self {
        self.concern_arc(Arc::new(concern))
    }

    /// Adds a shared concern.
    pub fn concern_arc(mut self, concern: Arc<dyn Concern>) -> Self {
        self.concerns.push(concern);
        self
    }

    /// Uses exactly `concerns`, without the built-in flood, routing and
    /// topics concerns (p2p0mq's "the caller populates the list", made
    /// explicit). Broadcast, routed sends and topics then fail with
    /// [`ConcernsError::NotInstalled`].
    pub fn only(mut self, concerns: Vec<Arc<dyn Concern>>) -> Self {
        self.concerns = concerns;
        self.builtins = false;
        self
    }

    /// Registers everything, starts the dispatcher, then calls every
    /// concern's `on_start`. Fails with [`ConcernsError::DuplicateCommand`]
    /// on two concerns for one command id (the built-in ones included),
    /// before touching the peer manager, so that a corrected builder can
    /// still be started on the same one.
    pub async fn start(self) -> Result<Concerns, ConcernsError> {
        // Refuse a duplicate before taking the peer manager's inbound queue,
        // so that a corrected list can still be started on it.
        let mut commands: Vec<u32> = self.concerns.iter().map(|c| c.command()).collect();
        if self.builtins {
            commands.extend([FLOOD, ROUTING, TOPICS]);
        }
        commands.sort_unstable();
        if let Some(w) = commands.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConcernsError::DuplicateCommand(w[0]));
        }
        let max_payload = self
            .peers
            .endpoint()
            .config()
            .max_frame_len()
            .saturating_sub(ENVELOPE_ROOM);
        let inner = Arc::new(Inner {
            max_payload,
            peers: self.peers,
            config: self.config,
            registry: RwLock::new(FxHashMap::default()),
            pending: Arc::new(Requests::new()),
            unsent_errors: AtomicU64::new(0),
            unsent_answers: AtomicU64::new(0),
            error_tasks: AtomicUsize::new(0),
            unknown: AtomicU64::new(0),
            unknown_warnings: WarnBudget::new(),
            flood: OnceLock::new(),
            routing: OnceLock::new(),
            topics: OnceLock::new(),
            started: std::sync::atomic::AtomicBool::new(false),
            cancel: CancellationToken::new(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            tracker: TaskTracker::new(),
        });
        let concerns = Concerns { inner };
        let mut all = self.concerns;
        if self.builtins {
            let cfg = &concerns.inner.config;
            // One clock for all stamps, so that both follow a step of the
            // system clock at once.
            let clock = Arc::new(WallClock::new());
            let flood = Arc::new(Flood::new(cfg, clock.clone()));
            let routing = Arc::new(Routing::new(cfg, clock));
            let topics = Arc::new(Topics::new(cfg));
            let _ = concerns.inner.flood.set(flood.clone());
            let _ = concerns.inner.routing.set(routing.clone());
            let _ = concerns.inner.topics.set(topics.clone());
            all.insert(0, topics);
            all.insert(0, routing);
            all.insert(0, flood);
        }
        for c in &all {
            concerns.register(c.clone())?;
        }
        let handler = Handler(Arc::downgrade(&concerns.inner));
        concerns
            .inner
            .peers
            .set_inbound_handler(Arc::new(handler))
            .map_err(|e| ConcernsError::Peers(e.to_string()))?;
        let requests = concerns.inner.pending.clone();
        concerns.inner.spawn(async move { requests.sweep().await });
        // Requests waiting on a neighbour that leaves fail at once instead
        // of waiting out their timeouts, and each concern hears of it.
        let mut events = concerns.inner.peers.events();
        let weak = Arc::downgrade(&concerns.inner);
        concerns.inner.spawn(async move {
            loop {
                match events.recv().await {
                    Ok(PeerEvent::Disconnected { peer, .. }) => {
                        let Some(inner) = weak.upgrade() else { break };
                        inner.peer_left(&peer);
                        if let Ok(routing) = inner.routing() {
                            routing.neighbour_left(&peer);
                        }
                    }
                    Ok(PeerEvent::StateChanged {
                        peer,
                        to: PeerState::Connected,
                        ..
                    }) => {
                        let Some(inner) = weak.upgrade() else { break };
                        if let Ok(routing) = inner.routing() {
                            routing.neighbour_joined(&inner, &peer);
                        }
                    }
                    Ok(_) | Err(PeersError::Lagged(_)) => {}
                    Err(_) => break,
                }
            }
        });
        concerns.inner.started.store(true, Ordering::Release);
        for c in all {
            concerns.start_one(c).await;
        }
        Ok(concerns)
    }
}

impl Concerns {
    /// Starts building on `peers` (which must not have handed its inbound
    /// queue to anyone else). The built-in flood, routing and topics
    /// concerns are included unless [`only`](ConcernsBuilder::only) is used.
    pub fn builder(peers: PeerManager) -> ConcernsBuilder {
        ConcernsBuilder {
            peers,
            config: ConcernsConfig::default(),
            concerns: Vec::new(),
            builtins: true,
        }
    }

    /// The largest payload a message of this layer carries (requests,
    /// replies, one-way messages, broadcasts, publications, routed ones):
    /// the transport's largest frame less 1 KiB for what wraps it. A larger
    /// one is refused with [`ConcernsError::PayloadTooLarge`] before
    /// anything is sent, and a handler's reply that is larger becomes a
    /// `HANDLER_FAILED` error to the asker.
    pub fn max_payload(&self) -> usize {
        self.inner.max_payload
    }

    fn register(&self, concern: Arc<dyn Concern>) -> Result<(), ConcernsError> {
        let command = concern.command();
        let mut registry = self
            .inner
            .registry
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if registry.contains_key(&command) {
            return Err(ConcernsError::DuplicateCommand(command));
        }
        // Under the registry's lock, which shutdown reads every concern
        // under after setting the flag: a concern added is either refused
        // here or stopped there.
        if self.inner.stopping() {
            return Err(ConcernsError::Shutdown);
        }
        registry.insert(
            command,
            Arc::new(Registered {
                name: concern.name().to_string(),
                max_concurrency: concern.max_concurrency().max(1),
                accepts: Via::ALL.map(|via| concern.accepts(via)),
                concern,
                counters: Counters::default(),
                budget: ByteBudget::new(
                    self.inner.config.request_bytes_per_sender,
                    self.inner.config.request_bytes,
                ),
                waiting: Mutex::new(Waiting::new(self.inner.config.per_sender_queue)),
            }),
        );
        Ok(())
    }

    async fn start_one(&self, concern: Arc<dyn Concern>) {
        let ctx = self.inner.context(concern.command());
        concern.on_start(&ctx).await;
        if let Some(every) = concern.tick_interval() {
            let cancel = self.inner.cancel.clone();
            self.inner.tracker.spawn(async move {
                let mut timer = tokio::time::interval(every);
                timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                timer.tick().await;
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = timer.tick() => {}
                    }
                    // A tick still running at shutdown is dropped.
                    let tick = AssertUnwindSafe(concern.tick(&ctx)).catch_unwind();
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        r = tick => if r.is_err() {
                            warn!(concern = concern.name(), "tick panicked");
                        }
                    }
                }
            });
        }
    }

    /// Adds a concern to a running node; it starts at once. A second concern
    /// for the same command id is [`ConcernsError::DuplicateCommand`].
    pub async fn add(&self, concern: impl Concern) -> Result<(), ConcernsError> {
        let concern: Arc<dyn Concern> = Arc::new(concern);
        self.register(concern.clone())?;
        self.start_one(concern).await;
        Ok(())
    }

    /// A context for sending under `command` from outside any concern (an
    /// application, a tool). Replies to its requests come back to it; other
    /// messages for `command` go to the concern registered for it, if any.
    pub fn context(&self, command: u32) -> Context {
        self.inner.context(command)
    }

    /// The peer manager underneath.
    pub fn peers(&self) -> &PeerManager {
        &self.inner.peers
    }

    /// Subscribes to `topic`: messages published on it anywhere in the mesh
    /// (after now) arrive on the returned [`Subscription`]. Dropping it
    /// unsubscribes.
    pub fn subscribe(&self, topic: &str) -> Result<Subscription, ConcernsError> {
        self.inner.topics()?.subscribe(topic)
    }

    /// Publishes on `topic` (see [`Context::publish`], which fails the same
    /// way).
    pub fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<u64, ConcernsError> {
        self.inner.publish(topic, payload.into())
    }

    /// Nodes reached through other nodes: the routing concern's table.
    pub fn routes(&self) -> Vec<Route> {
        self.inner
            .routing
            .get()
            .map(|r| r.routes())
            .unwrap_or_default()
    }

    /// Counters of the built-in concerns: (name, counter, value).
    pub fn builtin_stats(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut out = Vec::new();
        if let Some(f) = self.inner.flood.get() {
            out.extend(f.stats().into_iter().map(|(k, v)| ("flood", k, v)));
        }
        if let Some(r) = self.inner.routing.get() {
            out.extend(r.stats().into_iter().map(|(k, v)| ("routing", k, v)));
        }
        if let Some(t) = self.inner.topics.get() {
            out.extend(t.stats().into_iter().map(|(k, v)| ("topics", k, v)));
        }
        out
    }

    /// Counters of every concern, by command id.
    pub fn stats(&self) -> Vec<ConcernStats> {
        let registry = self
            .inner
            .registry
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<ConcernStats> = registry
            .iter()
            .map(|(command, r)| {
                let c = &r.counters;
                ConcernStats {
                    command: *command,
                    name: r.name.clone(),
                    requests: c.requests.load(Ordering::Relaxed),
                    replies: c.replies.load(Ordering::Relaxed),
                    errors: c.errors.load(Ordering::Relaxed),
                    panics: c.panics.load(Ordering::Relaxed),
                    dropped: c.dropped.load(Ordering::Relaxed),
                    in_flight: c.in_flight.load(Ordering::Relaxed),
                    queued: c.queued.load(Ordering::Relaxed),
                    held_bytes: r.budget.held(),
                }
            })
            .collect();
        all.sort_by_key(|s| s.command);
        all
    }

    /// Requests for command ids nobody handles here, since start.
    pub fn unknown_commands(&self) -> u64 {
        self.inner.unknown.load(Ordering::Relaxed)
    }

    /// Error answers (unknown command, overloaded, shutting down) dropped
    /// since start because they could not go out at once: the asker's lane
    /// was full, or too many routed ones were on their way.
    pub fn unsent_errors(&self) -> u64 {
        self.inner.unsent_errors.load(Ordering::Relaxed)
    }

    /// Answers dropped since start because the asker's lane stayed full
    /// for a second (it does not read what it asked for).
    pub fn unsent_answers(&self) -> u64 {
        self.inner.unsent_answers.load(Ordering::Relaxed)
    }

    /// Requests of this node waiting for their answer now (direct and
    /// routed).
    pub fn pending_requests(&self) -> usize {
        self.inner.pending.len()
    }

    /// Stops: no more requests are taken, every concern's `on_stop` runs,
    /// waiting requests fail with [`ConcernsError::Shutdown`], and this
    /// returns when every task of the layer has ended. The peer manager is
    /// left running (shut it down after).
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        if inner.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        inner.cancel.cancel();
        for reg in inner.all_registered() {
            let ctx = inner.context(reg.concern.command());
            if AssertUnwindSafe(reg.concern.on_stop(&ctx))
                .catch_unwind()
                .await
                .is_err()
            {
                warn!(concern = %reg.name, "on_stop panicked");
            }
        }
        // Whatever still waits gets a clear answer.
        let waiting: Vec<Job> = {
            let registry = inner.registry.read().unwrap_or_else(|e| e.into_inner());
            registry
                .values()
                .flat_map(|reg| {
                    let mut w = lock(&reg.waiting);
                    std::iter::from_fn(|| w.pop()).collect::<Vec<_>>()
                })
                .collect()
        };
        for job in waiting {
            inner.answer_soon(job, ErrorCode::ShuttingDown, "node shutting down".into());
        }
        inner.pending.clear();
        inner.tracker.close();
        inner.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(from: u8, request_id: u64, priority: Priority) -> Job {
        Job {
            command: 1,
            from: NodeId::from_bytes(vec![from; 32]).expect("a valid id"),
            request_id,
            payload: Bytes::new(),
            reply: ReplyPath::None,
            conn: None,
            priority,
            via: Via::Direct,
            held: None,
        }
    }

    fn push(w: &mut Waiting, j: Job) {
        let lane = j.priority as usize;
        assert!(w.lanes[lane].push(j.from.clone(), j).is_ok());
    }

    /// With every lane full, 8 turns give control 4, normal 3 and bulk 1;
    /// an empty lane's turn goes to the first lane with work.
    #[test]
    fn lanes_take_turns_and_empty_ones_give_theirs_away() {
        let mut w = Waiting::new(64);
        for n in 0..16 {
            push(&mut w, job(1, n, Priority::Control));
            push(&mut w, job(2, n, Priority::Normal));
            push(&mut w, job(3, n, Priority::Bulk));
        }
        let lanes: Vec<Priority> = (0..16).map(|_| w.pop().unwrap().priority).collect();
        for cycle in lanes.chunks(8) {
            let count = |p| cycle.iter().filter(|l| **l == p).count();
            assert_eq!(
                (
                    count(Priority::Control),
                    count(Priority::Normal),
                    count(Priority::Bulk)
                ),
                (4, 3, 1),
                "{lanes:?}"
            );
        }
        // Only normal work left after the control lane empties: every turn
        // goes to it, in order.
        let mut w = Waiting::new(64);
        for n in 0..4 {
            push(&mut w, job(2, n, Priority::Normal));
        }
        let ids: Vec<u64> = std::iter::from_fn(|| w.pop().map(|j| j.request_id)).collect();
        assert_eq!(ids, [0, 1, 2, 3]);
    }
}
