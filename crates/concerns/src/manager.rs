//! The concerns manager: registration, lifecycle, dispatch, request/reply.
//!
//! One dispatcher task reads every Concern frame the peer manager hands up
//! and every local delivery (a flooded or routed message that reached this
//! node). Replies are matched to waiting requests at once. Requests go into
//! their concern's [`FairQueue`], one bounded queue per sender served in
//! turn, and start as the concern's concurrency allows; each runs in its own
//! task, isolated: an error or a panic becomes an error reply and a count.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use meshwork_peers::transport::Priority;
use meshwork_peers::wire::proto::{Concern as Frame, ConcernError, ConcernKind, ErrorCode};
use meshwork_peers::wire::{Message, NodeId};
use meshwork_peers::{Inbound, PeerEvent, PeerManager, PeersError};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::fair::FairQueue;
use crate::flood::Flood;
use crate::routing::Routing;
use crate::topics::{Subscription, Topics};
use crate::{Concern, ConcernsError, Context, Reply, Route};

/// Command ids from here up belong to meshwork's built-in concerns.
pub const RESERVED_COMMANDS: u32 = 0xFFFF_0000;
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
    pub(crate) local_queue: usize,
    pub(crate) flood_ttl: u32,
    pub(crate) seen_capacity: usize,
    pub(crate) seen_ttl: Duration,
    pub(crate) max_hops: u32,
    pub(crate) route_ttl: Duration,
    pub(crate) route_capacity: usize,
    pub(crate) route_timeout: Duration,
    pub(crate) subscription_queue: usize,
}

impl Default for ConcernsConfig {
    fn default() -> Self {
        ConcernsConfig {
            per_sender_queue: 64,
            local_queue: 1024,
            flood_ttl: 16,
            seen_capacity: 65_536,
            seen_ttl: Duration::from_secs(120),
            max_hops: 16,
            route_ttl: Duration::from_secs(60),
            route_capacity: 4096,
            route_timeout: Duration::from_secs(3),
            subscription_queue: 256,
        }
    }
}

impl ConcernsConfig {
    /// Requests waiting per sender and concern (default 64); beyond it the
    /// sender is answered "overloaded".
    pub fn with_per_sender_queue(mut self, n: usize) -> Self {
        self.per_sender_queue = n.max(1);
        self
    }

    /// Hops a broadcast travels by default (default 16).
    pub fn with_flood_ttl(mut self, ttl: u32) -> Self {
        self.flood_ttl = ttl.max(1);
        self
    }

    /// The flood dedup cache: entries and how long each is kept (default
    /// 65 536 and 120 s). A flood must die out (its TTL) well within that
    /// time, or it could be delivered twice.
    pub fn with_seen_cache(mut self, capacity: usize, ttl: Duration) -> Self {
        self.seen_capacity = capacity.max(1);
        self.seen_ttl = ttl;
        self
    }

    /// Routing: most hops to a target (default 16), how long a learnt route
    /// lives (default 60 s), and how long a route search may take before the
    /// target is reported unreachable (default 3 s).
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
}

struct Registered {
    concern: Arc<dyn Concern>,
    name: String,
    max_concurrency: usize,
    counters: Counters,
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
}

struct Pending {
    /// Who must answer (a reply from anyone else is not for this request).
    expect: NodeId,
    /// Whether a routed "unreachable" from an intermediate node counts.
    routed: bool,
    tx: oneshot::Sender<Result<Bytes, ConcernsError>>,
}

pub(crate) struct Inner {
    pub(crate) peers: PeerManager,
    pub(crate) config: ConcernsConfig,
    registry: RwLock<HashMap<u32, Arc<Registered>>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_request: AtomicU64,
    jobs: mpsc::Sender<Job>,
    unknown: AtomicU64,
    flood: OnceLock<Arc<Flood>>,
    routing: OnceLock<Arc<Routing>>,
    topics: OnceLock<Arc<Topics>>,
    started: std::sync::atomic::AtomicBool,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
    /// Spawns a task that ends with the layer (it must watch `cancel` or
    /// end by itself).
    /// Fails the direct requests waiting on `peer`, which has left: their
    /// answers cannot come any more.
    pub(crate) fn peer_left(&self, peer: &NodeId) {
        let lost: Vec<Pending> = {
            let mut pending = lock(&self.pending);
            let ids: Vec<u64> = pending
                .iter()
                .filter(|(_, p)| !p.routed && p.expect == *peer)
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| pending.remove(id)).collect()
        };
        for p in lost {
            let _ = p.tx.send(Err(ConcernsError::ConnectionLost(peer.clone())));
        }
    }

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
        }
    }

    fn registered(&self, command: u32) -> Option<Arc<Registered>> {
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
        let topics = self.topics()?;
        let flood = self.flood()?;
        let body = topics.encode(topic, payload)?;
        Ok(flood.broadcast(self, TOPICS, body, self.config.flood_ttl))
    }

    /// Tells the sending concern what became of a message.
    pub(crate) fn notify(&self, command: u32, to: &NodeId, error: Option<&ConcernsError>) {
        let Some(reg) = self.registered(command) else {
            return;
        };
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
        let frame = Frame {
            command,
            request_id,
            kind: kind as i32,
            ttl: 0,
            flags: 0,
            payload,
        };
        self.peers
            .send(peer, Message::Concern(frame), priority)
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
        let frame = Frame {
            command,
            request_id: 0,
            kind: ConcernKind::Request as i32,
            ttl: 0,
            flags: 0,
            payload,
        };
        self.peers
            .try_send(peer, Message::Concern(frame), Priority::Normal)
            .map_err(ConcernsError::from)
    }

    fn new_request(
        &self,
        expect: &NodeId,
        routed: bool,
    ) -> (u64, oneshot::Receiver<Result<Bytes, ConcernsError>>) {
        let (tx, rx) = oneshot::channel();
        let mut pending = lock(&self.pending);
        let mut id = self.next_request.fetch_add(1, Ordering::Relaxed);
        while id == 0 || pending.contains_key(&id) {
            id = self.next_request.fetch_add(1, Ordering::Relaxed);
        }
        pending.insert(
            id,
            Pending {
                expect: expect.clone(),
                routed,
                tx,
            },
        );
        (id, rx)
    }

    async fn wait_reply(
        &self,
        id: u64,
        rx: oneshot::Receiver<Result<Bytes, ConcernsError>>,
        timeout: Duration,
    ) -> Result<Bytes, ConcernsError> {
        let r = tokio::select! {
            _ = self.cancel.cancelled() => Err(ConcernsError::Shutdown),
            r = tokio::time::timeout(timeout, rx) => match r {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(ConcernsError::Shutdown),
                Err(_) => Err(ConcernsError::Timeout(timeout)),
            },
        };
        lock(&self.pending).remove(&id);
        r
    }

    pub(crate) async fn request_direct(
        &self,
        command: u32,
        peer: &NodeId,
        payload: Bytes,
        timeout: Duration,
        priority: Priority,
    ) -> Result<Bytes, ConcernsError> {
        let (id, rx) = self.new_request(peer, false);
        let sent = self
            .send_direct(peer, command, id, ConcernKind::Request, payload, priority)
            .await;
        if let Err(e) = sent {
            lock(&self.pending).remove(&id);
            return Err(e);
        }
        let r = self.wait_reply(id, rx, timeout).await;
        if matches!(r, Err(ConcernsError::Timeout(_))) {
            self.peers.report_timeout(peer);
        }
        r
    }

    pub(crate) async fn request_routed(
        self: &Arc<Self>,
        routing: &Routing,
        command: u32,
        node: &NodeId,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, ConcernsError> {
        let (id, rx) = self.new_request(node, true);
        let started = tokio::time::Instant::now();
        let sent = tokio::time::timeout(
            timeout,
            routing.send(self, node, command, id, ConcernKind::Request, payload),
        )
        .await
        .unwrap_or(Err(ConcernsError::Timeout(timeout)));
        if let Err(e) = sent {
            lock(&self.pending).remove(&id);
            return Err(e);
        }
        let left = timeout.saturating_sub(started.elapsed());
        self.wait_reply(id, rx, left).await
    }

    /// A reply or error frame (direct or routed) arrived from `from`.
    pub(crate) fn resolve(
        self: &Arc<Self>,
        from: &NodeId,
        command: u32,
        id: u64,
        kind: ConcernKind,
        payload: Bytes,
    ) {
        let result = match kind {
            ConcernKind::Reply => Ok(payload.clone()),
            _ => Err(decode_error(&payload)),
        };
        let waiter = {
            let mut pending = lock(&self.pending);
            let matches = pending.get(&id).is_some_and(|p| {
                p.expect == *from
                    || (p.routed
                        && matches!(
                            result,
                            Err(ConcernsError::Remote {
                                code: ErrorCode::Unreachable,
                                ..
                            })
                        ))
            });
            if matches { pending.remove(&id) } else { None }
        };
        match waiter {
            Some(p) => {
                let _ = p.tx.send(result);
            }
            None => {
                if kind != ConcernKind::Reply {
                    debug!(command, id, from = %from.short(), error = ?result.err(), "unawaited error reply");
                    return;
                }
                if let Some(reg) = self.registered(command) {
                    let ctx = self.context(command);
                    let from = from.clone();
                    self.tracker.spawn(async move {
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
    /// concern, through the same fair queues as direct requests.
    pub(crate) async fn deliver_local(&self, job: Job) -> Result<(), ConcernsError> {
        self.jobs
            .send(job)
            .await
            .map_err(|_| ConcernsError::Shutdown)
    }

    /// Sends the answer to `job` along its reply path.
    async fn answer(
        self: &Arc<Self>,
        job: &Job,
        kind: ConcernKind,
        payload: Bytes,
        priority: Priority,
    ) {
        let r = match job.reply {
            ReplyPath::None => return,
            ReplyPath::Direct => {
                self.send_direct(
                    &job.from,
                    job.command,
                    job.request_id,
                    kind,
                    payload,
                    priority,
                )
                .await
            }
            ReplyPath::Routed => match self.routing() {
                Ok(routing) => {
                    routing
                        .send(self, &job.from, job.command, job.request_id, kind, payload)
                        .await
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = r {
            debug!(to = %job.from.short(), command = job.command, error = %e, "reply not sent");
        }
    }

    fn answer_soon(self: &Arc<Self>, job: Job, code: ErrorCode, message: String) {
        if job.reply == ReplyPath::None {
            return;
        }
        let this = self.clone();
        self.tracker.spawn(async move {
            this.answer(
                &job,
                ConcernKind::Error,
                error_payload(code, message),
                Priority::Normal,
            )
            .await;
        });
    }

    /// Runs one request in its own task.
    async fn run(self: Arc<Self>, reg: Arc<Registered>, job: Job) {
        let ctx = self.context(job.command);
        let call = reg.concern.on_request(&ctx, &job.from, job.payload.clone());
        let outcome = AssertUnwindSafe(call).catch_unwind().await;
        let (kind, payload, priority) = match outcome {
            Ok(Ok(reply)) => {
                let reply = reply.unwrap_or_else(|| Reply::new(Bytes::new()));
                (ConcernKind::Reply, reply.payload, reply.priority)
            }
            Ok(Err(e)) => {
                reg.counters.errors.fetch_add(1, Ordering::Relaxed);
                debug!(concern = %reg.name, error = %e, "handler failed");
                let p = error_payload(ErrorCode::HandlerFailed, e.to_string());
                (ConcernKind::Error, p, Priority::Normal)
            }
            Err(_) => {
                reg.counters.errors.fetch_add(1, Ordering::Relaxed);
                reg.counters.panics.fetch_add(1, Ordering::Relaxed);
                warn!(concern = %reg.name, from = %job.from.short(), "handler panicked");
                let p = error_payload(ErrorCode::HandlerFailed, "the handler panicked");
                (ConcernKind::Error, p, Priority::Normal)
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
        let inbound = self
            .peers
            .take_inbound()
            .map_err(|e| ConcernsError::Peers(e.to_string()))?;
        let (jobs_tx, jobs_rx) = mpsc::channel(self.config.local_queue);
        let inner = Arc::new(Inner {
            peers: self.peers,
            config: self.config,
            registry: RwLock::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(rand::random::<u64>() >> 1),
            jobs: jobs_tx,
            unknown: AtomicU64::new(0),
            flood: OnceLock::new(),
            routing: OnceLock::new(),
            topics: OnceLock::new(),
            started: std::sync::atomic::AtomicBool::new(false),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
        });
        let concerns = Concerns { inner };
        let mut all = self.concerns;
        if self.builtins {
            let cfg = &concerns.inner.config;
            let flood = Arc::new(Flood::new(cfg));
            let routing = Arc::new(Routing::new(cfg));
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
        let span = info_span!("concerns", node = %concerns.inner.peers.node_id().short());
        let dispatcher = Dispatcher {
            inner: concerns.inner.clone(),
            queues: HashMap::new(),
        };
        concerns
            .inner
            .tracker
            .spawn(dispatcher.run(inbound, jobs_rx).instrument(span));
        // Requests waiting on a neighbour that leaves fail at once instead
        // of waiting out their timeouts.
        let mut events = concerns.inner.peers.events();
        let weak = Arc::downgrade(&concerns.inner);
        concerns.inner.spawn(async move {
            loop {
                match events.recv().await {
                    Ok(PeerEvent::Disconnected { peer, .. }) => {
                        let Some(inner) = weak.upgrade() else { break };
                        inner.peer_left(&peer);
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
        registry.insert(
            command,
            Arc::new(Registered {
                name: concern.name().to_string(),
                max_concurrency: concern.max_concurrency().max(1),
                concern,
                counters: Counters::default(),
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
                    if AssertUnwindSafe(concern.tick(&ctx))
                        .catch_unwind()
                        .await
                        .is_err()
                    {
                        warn!(concern = concern.name(), "tick panicked");
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

    /// Publishes on `topic` (see [`Context::publish`]).
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

    /// Stops: no more requests are taken, every concern's `on_stop` runs,
    /// waiting requests fail with [`ConcernsError::Shutdown`], and this
    /// returns when every task of the layer has ended. The peer manager is
    /// left running (shut it down after).
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        if inner.cancel.is_cancelled() {
            return;
        }
        inner.cancel.cancel();
        let all: Vec<Arc<Registered>> = inner
            .registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for reg in all {
            let ctx = inner.context(reg.concern.command());
            if AssertUnwindSafe(reg.concern.on_stop(&ctx))
                .catch_unwind()
                .await
                .is_err()
            {
                warn!(concern = %reg.name, "on_stop panicked");
            }
        }
        lock(&inner.pending).clear();
        inner.tracker.close();
        inner.tracker.wait().await;
    }
}

/// The dispatcher task's state: fair queues per concern.
struct Dispatcher {
    inner: Arc<Inner>,
    queues: HashMap<u32, FairQueue<NodeId, Job>>,
}

impl Dispatcher {
    async fn run(mut self, mut inbound: mpsc::Receiver<Inbound>, mut jobs: mpsc::Receiver<Job>) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<u32>();
        loop {
            tokio::select! {
                biased;
                _ = self.inner.cancel.cancelled() => break,
                Some(command) = done_rx.recv() => {
                    if let Some(reg) = self.inner.registered(command) {
                        reg.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
                    }
                    self.pump(command, &done_tx);
                }
                Some(job) = jobs.recv() => self.enqueue(job, &done_tx),
                msg = inbound.recv() => match msg {
                    Some(m) => self.on_inbound(m, &done_tx),
                    None => break,
                },
            }
        }
        // Whatever is still queued gets a clear answer.
        for (_, mut q) in self.queues.drain() {
            while let Some((_, job)) = q.pop() {
                self.inner
                    .answer_soon(job, ErrorCode::ShuttingDown, "node shutting down".into());
            }
        }
    }

    fn on_inbound(&mut self, m: Inbound, done: &mpsc::UnboundedSender<u32>) {
        let f = m.message;
        match ConcernKind::try_from(f.kind) {
            Ok(ConcernKind::Request) => {
                let reply = if f.request_id == 0 {
                    ReplyPath::None
                } else {
                    ReplyPath::Direct
                };
                let job = Job {
                    command: f.command,
                    from: m.from,
                    request_id: f.request_id,
                    payload: f.payload,
                    reply,
                };
                self.enqueue(job, done);
            }
            Ok(kind @ (ConcernKind::Reply | ConcernKind::Error)) => {
                self.inner
                    .resolve(&m.from, f.command, f.request_id, kind, f.payload);
            }
            // The wire layer refuses other kinds before they get here.
            _ => {}
        }
    }

    fn enqueue(&mut self, job: Job, done: &mpsc::UnboundedSender<u32>) {
        let command = job.command;
        let Some(reg) = self.inner.registered(command) else {
            self.inner.unknown.fetch_add(1, Ordering::Relaxed);
            warn!(command = format_args!("{command:#x}"), from = %job.from.short(), "request for an unknown command");
            let msg = format!("no concern for command {command:#x}");
            self.inner.answer_soon(job, ErrorCode::UnknownCommand, msg);
            return;
        };
        let per_sender = self.inner.config.per_sender_queue;
        let queue = self
            .queues
            .entry(command)
            .or_insert_with(|| FairQueue::new(per_sender));
        match queue.push(job.from.clone(), job) {
            Ok(()) => {
                reg.counters.queued.store(queue.len(), Ordering::Relaxed);
            }
            Err(job) => {
                reg.counters.dropped.fetch_add(1, Ordering::Relaxed);
                let msg = format!("{} is overloaded", reg.name);
                self.inner.answer_soon(job, ErrorCode::Overloaded, msg);
            }
        }
        self.pump(command, done);
    }

    /// Starts queued requests of `command` while its concurrency allows.
    fn pump(&mut self, command: u32, done: &mpsc::UnboundedSender<u32>) {
        let Some(reg) = self.inner.registered(command) else {
            return;
        };
        let Some(queue) = self.queues.get_mut(&command) else {
            return;
        };
        while reg.counters.in_flight.load(Ordering::Relaxed) < reg.max_concurrency {
            let Some((_, job)) = queue.pop() else { break };
            reg.counters.in_flight.fetch_add(1, Ordering::Relaxed);
            reg.counters.requests.fetch_add(1, Ordering::Relaxed);
            let inner = self.inner.clone();
            let reg2 = reg.clone();
            let done = done.clone();
            self.inner.tracker.spawn(async move {
                inner.run(reg2, job).await;
                let _ = done.send(command);
            });
        }
        reg.counters.queued.store(queue.len(), Ordering::Relaxed);
    }
}
