//! The tokio driver: it owns the tasks and sockets and does what the
//! [`Pool`] decides.
//!
//! - one accept task hands inbound connections to the pool;
//! - one maintenance task polls the pool every tick (heartbeats, dials,
//!   gossip);
//! - each connection's reader hands Concern messages straight to the layer
//!   above (an [`InboundHandler`], or the queue of
//!   [`PeerManager::take_inbound`]) and Discovered lists to the pool, with no
//!   task of ours in between; one small task per connection waits for its
//!   end;
//! - short-lived tasks dial, ping and close.
//!
//! Every call into the pool happens under one mutex, and the actions it
//! returns are carried out after the lock is released, except route updates
//! and events, which are applied under the lock so they keep their order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use rustc_hash::FxHashMap;

use meshwork_transport::{
    CloseReason, Connection, ConnectionHandle, Deliver, Endpoint, Gate, Priority, TransportError,
};
use meshwork_wire::proto::{Disconnect, DisconnectReason, Hello, PeerCount};
use meshwork_wire::{Message, NodeId};
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, trace, warn};

use crate::event::{Inbound, PeerEvent, PeerSnapshot, SeedSnapshot};
use crate::pool::{Action, ConnId, DialFailure, DialId, LinkInfo, Pool};
use crate::{PeersConfig, PeersError};

/// Counts of the pool at a moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Peers with a live connection (Connected or Unresponsive).
    pub connected: usize,
    /// Of those, the ones that dialled us.
    pub inbound: usize,
    /// Of those, the ones we dialled.
    pub outbound: usize,
    /// Dials in flight.
    pub pending_dials: usize,
    /// Peers in the address book without a connection.
    pub known: usize,
    /// Connections refused because the pool was full (Disconnect(too many
    /// peers)), since start.
    pub refused: u64,
    /// `Discovered` messages dropped unread because their peer sent more
    /// than 8 at once or more than one a second after that, since start.
    pub ignored_discovered: u64,
    /// Connections from a node already connected whose Hello advertised
    /// listen addresses sharing none with those of the connection it
    /// already had, since start: most likely two nodes sharing one key
    /// file (one node id). Each is also logged at `warn`, at most once per
    /// node per 10 minutes.
    pub suspected_twins: u64,
    /// Dials a full pool made to a peer it lost, linked before its
    /// youngest link, to give that peer the youngest link's slot (what joins
    /// the halves of a saturated mesh again after a partition), since start.
    pub swaps: u64,
    /// Outbound links closed to give their slot back to an inbound
    /// dialler: the pool was full only because more of its links than
    /// `outbound_reserved` were its own dials, while its inbound share had
    /// room (what lets a node short of peers in when `min_peers` is close
    /// to `max_peers`), since start.
    pub reclaims: u64,
    /// Inbound links closed to hand their slot to a dialler with no peer
    /// (its Hello said so), each closed peer having said lately that it
    /// has more peers than its own `min_peers` (what lets a node new to a
    /// mesh of full pools in), since start.
    pub handovers: u64,
    /// Concern messages dropped: nobody took the inbound queue, it was full,
    /// or they came on a connection the pool refused.
    pub dropped_inbound: u64,
}

#[derive(Clone)]
struct Route {
    handle: ConnectionHandle,
    usable: bool,
}

struct Inner {
    endpoint: Endpoint,
    config: PeersConfig,
    pool: Mutex<Pool>,
    handles: Mutex<HashMap<ConnId, ConnectionHandle>>,
    /// The neighbours' connections, looked up for every message sent:
    /// FxHash (at most `max_peers` keys, so a peer choosing its id to
    /// collide cannot make lookups long).
    routes: Mutex<FxHashMap<NodeId, Route>>,
    events: broadcast::Sender<PeerEvent>,
    inbound_tx: mpsc::Sender<Inbound>,
    inbound_rx: Mutex<Option<mpsc::Receiver<Inbound>>>,
    inbound_taken: AtomicBool,
    handler: OnceLock<Arc<dyn InboundHandler>>,
    dropped_inbound: AtomicU64,
    connected: watch::Sender<usize>,
    wake: Notify,
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// `peers{node=..}`: the span of every task the manager spawns, so that
    /// what a dial logs (a connection, a seed that does not answer) says
    /// which node it is, as what the accept loop logs does.
    span: tracing::Span,
}

/// The peer manager: keeps a healthy pool of peers on an [`Endpoint`].
///
/// Cheap to clone; every clone drives the same pool. See the
/// [crate documentation](crate) for an example.
#[derive(Clone)]
pub struct PeerManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PeerManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerManager")
            .field("node_id", self.inner.endpoint.node_id())
            .field("stats", &self.stats())
            .finish()
    }
}

/// A receiver of [`PeerEvent`]s, from [`PeerManager::events`].
#[derive(Debug)]
pub struct PeerEvents {
    rx: broadcast::Receiver<PeerEvent>,
}

impl PeerEvents {
    /// The next event. [`PeersError::Lagged`] says how many were missed by
    /// a receiver that fell behind (the next call continues with the oldest
    /// kept); [`PeersError::Shutdown`] once the manager is gone.
    ///
    /// Cancel safety: cancel-safe.
    pub async fn recv(&mut self) -> Result<PeerEvent, PeersError> {
        match self.rx.recv().await {
            Ok(e) => Ok(e),
            Err(broadcast::error::RecvError::Lagged(n)) => Err(PeersError::Lagged(n)),
            Err(broadcast::error::RecvError::Closed) => Err(PeersError::Shutdown),
        }
    }
}

/// How long a Disconnect(timeout) to a silent peer may take before the
/// connection is cut.
const DEAD_CLOSE_GRACE: Duration = Duration::from_millis(500);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn classify(e: &TransportError) -> DialFailure {
    match e {
        TransportError::SelfConnection
        | TransportError::Refused {
            reason: DisconnectReason::SelfConnection,
            ..
        } => DialFailure::SelfConnection,
        TransportError::WrongNetwork { .. }
        | TransportError::IncompatibleVersion { .. }
        | TransportError::IncompatibleSettings { .. }
        | TransportError::SecurityMismatch { .. }
        | TransportError::NotMeshwork
        | TransportError::NotAllowed(_)
        | TransportError::UnexpectedPeer { .. }
        | TransportError::Refused {
            reason:
                DisconnectReason::WrongNetwork
                | DisconnectReason::IncompatibleVersion
                | DisconnectReason::IncompatibleSettings
                | DisconnectReason::NotAllowed,
            ..
        } => DialFailure::Incompatible,
        TransportError::Refused {
            reason: DisconnectReason::TooManyPeers,
            ..
        } => DialFailure::Full,
        TransportError::Shutdown => DialFailure::Shutdown,
        _ => DialFailure::Transient,
    }
}

/// Whether a dial's failure is a full node's refusal naming other nodes to
/// try: the dialler has somewhere to go, nothing for the operator to do.
fn names_others(e: &TransportError) -> bool {
    matches!(e, TransportError::Refused { reason: DisconnectReason::TooManyPeers, alternatives, .. } if !alternatives.is_empty())
}

impl PeerManager {
    /// Takes over `endpoint` (its listeners should already be bound, so that
    /// our own addresses are known) and starts keeping the pool: dials the
    /// seeds, accepts peers, runs heartbeats and discovery.
    ///
    /// The manager is the endpoint's only acceptor. Its heartbeats replace
    /// the transport's keepalive, which may be turned off
    /// ([`Config::with_keepalive`](meshwork_transport::Config::with_keepalive)).
    pub fn start(endpoint: Endpoint, config: PeersConfig) -> Result<Self, PeersError> {
        config.validate()?;
        let now = Instant::now();
        let pool = Pool::new(
            config.clone(),
            endpoint.node_id().clone(),
            endpoint.listen_addrs(),
            endpoint.config().handshake_timeout(),
            now,
        );
        let (events, _) = broadcast::channel(config.event_capacity);
        let (inbound_tx, inbound_rx) = mpsc::channel(config.inbound_capacity);
        let (connected, _) = watch::channel(0);
        let endpoint_id = endpoint.node_id().clone();
        let inner = Arc::new(Inner {
            endpoint,
            config,
            pool: Mutex::new(pool),
            handles: Mutex::new(HashMap::new()),
            routes: Mutex::new(FxHashMap::default()),
            events,
            inbound_tx,
            inbound_rx: Mutex::new(Some(inbound_rx)),
            inbound_taken: AtomicBool::new(false),
            handler: OnceLock::new(),
            dropped_inbound: AtomicU64::new(0),
            connected,
            wake: Notify::new(),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            span: info_span!("peers", node = %endpoint_id.short()),
        });
        // A dialler the pool has no room for is refused in the handshake,
        // not right after it (the manager is the endpoint's only acceptor).
        let gate = PoolGate(Arc::downgrade(&inner));
        if !inner.endpoint.set_gate(Arc::new(gate)) {
            warn!("the endpoint already has a gate: a second peer manager on one endpoint");
        }
        // No peer yet: dialled nodes hear so in our first Hellos.
        inner.endpoint.set_peer_count(Some(inner.peer_count(0)));
        inner.spawn(Inner::accept_loop(inner.clone()));
        inner.spawn(Inner::maintain(inner.clone()));
        Ok(PeerManager { inner })
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        self.inner.endpoint.node_id()
    }

    /// The endpoint underneath.
    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    /// The settings.
    pub fn config(&self) -> &PeersConfig {
        &self.inner.config
    }

    /// Subscribes to peer events from now on.
    pub fn events(&self) -> PeerEvents {
        PeerEvents {
            rx: self.inner.events.subscribe(),
        }
    }

    /// The queue of Concern messages from peers, for the layer above. It can
    /// be taken once, and not after
    /// [`set_inbound_handler`](Self::set_inbound_handler); until it is, such
    /// messages are dropped
    /// and counted in [`PoolStats::dropped_inbound`], as are messages that
    /// find the queue full (its capacity is
    /// [`PeersConfig::with_inbound_capacity`]).
    pub fn take_inbound(&self) -> Result<mpsc::Receiver<Inbound>, PeersError> {
        if self.inner.handler.get().is_some() {
            return Err(PeersError::InboundTaken);
        }
        let rx = lock(&self.inner.inbound_rx).take();
        let rx = rx.ok_or(PeersError::InboundTaken)?;
        self.inner.inbound_taken.store(true, Ordering::Release);
        Ok(rx)
    }

    /// Hands every Concern message from peers to `handler`, called on the
    /// reader of the connection it arrived on: no queue and no task switch
    /// in between. The alternative to [`take_inbound`](Self::take_inbound);
    /// one or the other, once.
    pub fn set_inbound_handler(&self, handler: Arc<dyn InboundHandler>) -> Result<(), PeersError> {
        let mut rx = lock(&self.inner.inbound_rx);
        if rx.is_none() || self.inner.handler.set(handler).is_err() {
            return Err(PeersError::InboundTaken);
        }
        *rx = None;
        self.inner.inbound_taken.store(true, Ordering::Release);
        Ok(())
    }

    fn route(&self, peer: &NodeId) -> Result<ConnectionHandle, PeersError> {
        let route = lock(&self.inner.routes).get(peer).cloned();
        match route {
            None => Err(PeersError::NotConnected(peer.clone())),
            Some(r) if !r.usable => Err(PeersError::Unresponsive(peer.clone())),
            Some(r) => Ok(r.handle),
        }
    }

    fn map_send(peer: &NodeId, e: TransportError) -> PeersError {
        match e {
            TransportError::NotConnected => PeersError::NotConnected(peer.clone()),
            e => PeersError::Transport(e),
        }
    }

    /// Sends `message` to a connected peer on `priority`'s lane, waiting up
    /// to the transport's send timeout for room in the queue.
    ///
    /// Fails with [`PeersError::NotConnected`] when the peer is gone,
    /// [`PeersError::Unresponsive`] while it is silent (only heartbeats go to
    /// it then), and [`PeersError::Transport`] when the lane stayed full or
    /// the message is too large.
    pub fn send(
        &self,
        peer: &NodeId,
        message: Message,
        priority: Priority,
    ) -> impl Future<Output = Result<(), PeersError>> + Send {
        // Not an `async fn` forwarding to `send_inner`: that layer would
        // store the message again in every caller's future.
        self.send_inner(peer, message, priority, false)
    }

    /// [`send`](Self::send) for a lone, latency-bound message: written at
    /// once from the calling task when the connection is quiet (see
    /// [`ConnectionHandle::send_eager`](meshwork_transport::ConnectionHandle::send_eager)).
    pub fn send_eager(
        &self,
        peer: &NodeId,
        message: Message,
        priority: Priority,
    ) -> impl Future<Output = Result<(), PeersError>> + Send {
        self.send_inner(peer, message, priority, true)
    }

    #[allow(clippy::manual_async_fn)] // an async block on purpose: see the comment inside
    fn send_inner(
        &self,
        peer: &NodeId,
        message: Message,
        priority: Priority,
        eager: bool,
    ) -> impl Future<Output = Result<(), PeersError>> + Send {
        // An `async move` block: an `async fn` would store the message
        // twice in the future.
        async move {
            let handle = self.route(peer)?;
            let sent = if eager {
                handle.send_eager(message, priority).await
            } else {
                handle.send(message, priority).await
            };
            sent.map_err(|e| Self::map_send(peer, e))
        }
    }

    /// [`send`](Self::send) (or [`send_eager`](Self::send_eager) when
    /// `eager` is given: a clock reading the caller just took, which dates
    /// a frame written at once) as far as it goes without waiting:
    /// `Ok(None)` when the message was taken, `Ok(Some(message))` when the
    /// peer's lane is full (nothing queued; wait with `send`). See
    /// [`ConnectionHandle::offer`](meshwork_transport::ConnectionHandle::offer).
    pub fn offer(
        &self,
        peer: &NodeId,
        message: Message,
        priority: Priority,
        eager: Option<Instant>,
    ) -> Result<Option<Message>, PeersError> {
        let handle = self.route(peer)?;
        handle
            .offer(message, priority, eager)
            .map_err(|e| Self::map_send(peer, e))
    }

    /// Like [`send`](Self::send) but never waits: a full lane is an error.
    pub fn try_send(
        &self,
        peer: &NodeId,
        message: Message,
        priority: Priority,
    ) -> Result<(), PeersError> {
        let handle = self.route(peer)?;
        handle
            .try_send(message, priority)
            .map_err(|e| Self::map_send(peer, e))
    }

    /// The responsive neighbours (state Connected), cheaply: no snapshot is
    /// built. For relaying to every neighbour.
    pub fn neighbours(&self) -> Vec<NodeId> {
        lock(&self.inner.routes)
            .iter()
            .filter(|(_, r)| r.usable)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// True if `peer` is a responsive neighbour (state Connected).
    pub fn is_neighbour(&self, peer: &NodeId) -> bool {
        lock(&self.inner.routes).get(peer).is_some_and(|r| r.usable)
    }

    /// The connection used for `peer`, if any (for its stats, or to send
    /// regardless of the peer's state).
    pub fn connection(&self, peer: &NodeId) -> Option<ConnectionHandle> {
        lock(&self.inner.routes).get(peer).map(|r| r.handle.clone())
    }

    /// Every known peer with its state and stats: connected ones first.
    pub fn peers(&self) -> Vec<PeerSnapshot> {
        lock(&self.inner.pool).snapshot(Instant::now())
    }

    /// The seeds, in the order configured: the node that answered at each,
    /// whether it is connected, and why the last dials failed.
    pub fn seeds(&self) -> Vec<SeedSnapshot> {
        lock(&self.inner.pool).seed_snapshots(Instant::now())
    }

    /// The peers with a live connection.
    pub fn connected(&self) -> Vec<PeerSnapshot> {
        let mut all = self.peers();
        all.retain(|p| p.state.is_linked());
        all
    }

    /// One peer, connected or not (neo3's `get_node_by_nodeid`).
    pub fn by_id(&self, peer: &NodeId) -> Option<PeerSnapshot> {
        lock(&self.inner.pool).peer(peer, Instant::now())
    }

    /// A responsive peer passing `filter` with the fewest errors and
    /// timeouts; among equals, chosen at random weighted by score (neo3's
    /// `get_least_failed_node`).
    pub fn least_failed(&self, filter: impl Fn(&PeerSnapshot) -> bool) -> Option<PeerSnapshot> {
        lock(&self.inner.pool).choose(Instant::now(), true, filter)
    }

    /// A responsive peer whose Hello metadata satisfies `predicate`, chosen
    /// at random weighted by score, so the same peer is not hit every time
    /// (neo3's `get_node_with_height`):
    ///
    /// ```no_run
    /// # fn f(peers: &meshwork_peers::PeerManager) {
    /// let tall = peers.by_metadata(|m| {
    ///     m.get("height").and_then(|h| h.parse::<u64>().ok()) >= Some(1000)
    /// });
    /// # }
    /// ```
    pub fn by_metadata(
        &self,
        predicate: impl Fn(&HashMap<String, String>) -> bool,
    ) -> Option<PeerSnapshot> {
        lock(&self.inner.pool).choose(Instant::now(), false, |p| predicate(&p.metadata))
    }

    /// The stream addresses of the connected peers (neo3's
    /// `get_node_addresses`).
    pub fn addresses(&self) -> Vec<meshwork_transport::Address> {
        self.connected()
            .into_iter()
            .filter_map(|p| p.remote_addr)
            .collect()
    }

    /// Counts of the pool.
    pub fn stats(&self) -> PoolStats {
        let c = lock(&self.inner.pool).counts();
        PoolStats {
            connected: c.linked,
            inbound: c.inbound,
            outbound: c.outbound,
            pending_dials: c.pending_dials,
            known: c.known,
            refused: c.refused,
            ignored_discovered: c.ignored_discovered,
            suspected_twins: c.suspected_twins,
            swaps: c.swaps,
            reclaims: c.reclaims,
            handovers: c.handovers,
            dropped_inbound: self.inner.dropped_inbound.load(Ordering::Relaxed),
        }
    }

    /// Counts an error response against `peer` (neo3's
    /// `increase_node_error_count`); at the configured maximum the peer is
    /// disconnected and banned for the longest backoff. Returns the new
    /// count, `None` for a peer we do not know.
    pub fn report_error(&self, peer: &NodeId) -> Option<u32> {
        self.inner.with_pool(|p, now| p.report(peer, false, now))
    }

    /// Counts a timeout against `peer` (neo3's
    /// `increase_node_timeout_count`), with the same maximum.
    pub fn report_timeout(&self, peer: &NodeId) -> Option<u32> {
        self.inner.with_pool(|p, now| p.report(peer, true, now))
    }

    /// Disconnects `peer` (Disconnect "other") and backs off before
    /// dialling it again. False if it was not connected.
    pub fn disconnect(&self, peer: &NodeId) -> bool {
        self.inner.with_pool(|p, now| p.disconnect(peer, now))
    }

    /// Disconnects `peer` and refuses it for `duration`.
    pub fn ban(&self, peer: &NodeId, duration: Duration) {
        self.inner.with_pool(|p, now| p.ban(peer, duration, now));
    }

    /// Whether `peer` is banned now (by [`ban`](Self::ban), or by the pool
    /// for too many errors). Cheap: for checks on every message.
    pub fn is_banned(&self, peer: &NodeId) -> bool {
        lock(&self.inner.pool).is_banned(peer, Instant::now())
    }

    /// Lifts a ban.
    pub fn unban(&self, peer: &NodeId) {
        self.inner.with_pool(|p, _| p.unban(peer));
    }

    /// Fault injection: cuts all traffic with `peer` as if the network
    /// between us broke (its connection ends, handshakes with it are
    /// refused) until [`unblock`](Self::unblock). For tests that make
    /// partitions out of real processes.
    pub fn block(&self, peer: &NodeId) {
        self.inner.with_pool(|p, now| p.block(peer, now));
    }

    /// Ends a [`block`](Self::block); the peer is redialled if the pool has
    /// room.
    pub fn unblock(&self, peer: &NodeId) {
        self.inner.with_pool(|p, now| p.unblock(peer, now));
        self.inner.wake.notify_one();
    }

    /// The peers currently blocked.
    pub fn blocked(&self) -> Vec<NodeId> {
        lock(&self.inner.pool).blocked()
    }

    /// Waits until at least `n` peers are connected: `Timeout` after
    /// `timeout`, `Shutdown` at once if the manager shuts down (or has).
    /// The timeout's message says what the manager knew then: how many
    /// peers were linked, the last dial error of each seed not connected,
    /// and the failed handshakes by cause (e.g. `timed out after 2s waiting
    /// for peers: 0 of 1 peers linked; seed tcp://127.0.0.1:4000: ...
    /// Connection refused (3 failed dials)`).
    pub async fn wait_for_peers(&self, n: usize, timeout: Duration) -> Result<(), PeersError> {
        let mut rx = self.inner.connected.subscribe();
        let cancel = &self.inner.cancel;
        let reached = async {
            tokio::select! {
                biased;
                r = rx.wait_for(|c| *c >= n) => r.is_ok(),
                // Nothing connects any more: waiting on would only time out.
                () = cancel.cancelled() => false,
            }
        };
        match tokio::time::timeout(timeout, reached).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(PeersError::Shutdown),
            Err(_) => Err(PeersError::Timeout {
                what: "peers",
                after: timeout,
                detail: self.shortfall(n),
            }),
        }
    }

    /// Why fewer than `n` peers are linked, as far as the manager knows,
    /// in a line: the peers linked, each seed not connected with its last
    /// dial error (the first few), the failed handshakes by cause.
    fn shortfall(&self, n: usize) -> String {
        /// Seeds named, and characters of each error kept.
        const SEEDS: usize = 3;
        const ERROR_CHARS: usize = 200;
        let mut parts = vec![format!("{} of {n} peers linked", self.stats().connected)];
        let seeds = self.seeds();
        let waiting: Vec<&SeedSnapshot> = seeds.iter().filter(|s| !s.connected).collect();
        for s in waiting.iter().take(SEEDS) {
            let dials = match s.failures {
                1 => " (1 failed dial)".to_string(),
                f => format!(" ({f} failed dials)"),
            };
            parts.push(match &s.last_error {
                Some(e) if e.chars().count() > ERROR_CHARS => {
                    let cut: String = e.chars().take(ERROR_CHARS).collect();
                    format!("seed {}: {cut}...{dials}", s.addr)
                }
                Some(e) => format!("seed {}: {e}{dials}", s.addr),
                None => format!("seed {}: no dial failed yet", s.addr),
            });
        }
        if waiting.len() > SEEDS {
            parts.push(format!(
                "{} more seeds not connected",
                waiting.len() - SEEDS
            ));
        }
        if seeds.is_empty() && self.stats().known == 0 {
            parts.push("no seeds, and no peer known".into());
        }
        let failures = self.inner.endpoint.stats().failures;
        if !failures.is_empty() {
            let counts: Vec<String> = failures.iter().map(|(k, v)| format!("{k} {v}")).collect();
            parts.push(format!("failed handshakes: {}", counts.join(", ")));
        }
        parts.join("; ")
    }

    /// True once [`shutdown`](Self::shutdown) has begun.
    pub fn is_shut_down(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Shuts down: stops dialling and accepting, sends Disconnect(shutdown)
    /// to every peer, shuts the endpoint down, and returns when every task
    /// has ended.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        inner.cancel.cancel();
        inner.with_pool(|p, _| p.shut_down());
        let handles: Vec<ConnectionHandle> = lock(&inner.handles).values().cloned().collect();
        let closes = handles
            .iter()
            .map(|h| h.close(DisconnectReason::Shutdown, "node shutting down"));
        futures_util::future::join_all(closes).await;
        inner.endpoint.shutdown().await;
        inner.tracker.close();
        inner.tracker.wait().await;
        info!(node = %inner.endpoint.node_id().short(), "peer manager stopped");
    }
}

impl Inner {
    /// Runs `f` on the pool, then carries out the actions it queued.
    fn with_pool<R>(self: &Arc<Self>, f: impl FnOnce(&mut Pool, Instant) -> R) -> R {
        let now = Instant::now();
        let (r, actions) = {
            let mut pool = lock(&self.pool);
            let r = f(&mut pool, now);
            let mut actions = pool.take_actions();
            // Routes and events in order, under the lock.
            actions.retain(|a| match a {
                Action::Route { peer, conn, usable } => {
                    self.set_route(peer, *conn, *usable);
                    false
                }
                Action::Event(e) => {
                    // What an operator watching the log at the default
                    // level wants to see: who came and went, and why.
                    match e {
                        PeerEvent::Connected {
                            peer,
                            direction,
                            addr,
                        } => info!(peer = %peer.short(), ?direction, %addr, "peer connected"),
                        PeerEvent::Disconnected { peer, reason } => {
                            info!(peer = %peer.short(), ?reason, "peer disconnected");
                        }
                        _ => trace!(event = ?e, "peer event"),
                    }
                    let _ = self.events.send(e.clone());
                    false
                }
                _ => true,
            });
            let linked = pool.counts().linked;
            if self
                .connected
                .send_if_modified(|c| std::mem::replace(c, linked) != linked)
            {
                // What our Hellos and Pongs tell peers from now on.
                self.endpoint.set_peer_count(Some(self.peer_count(linked)));
            }
            (r, actions)
        };
        for action in actions {
            self.perform(action);
        }
        r
    }

    /// Our count of peers as we tell it (protocol.md 4.2, 4.3): `linked`,
    /// and the pool's target (`min_peers`, at most `max_peers`).
    fn peer_count(&self, linked: usize) -> PeerCount {
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        PeerCount {
            linked: count(linked),
            min_peers: count(self.config.target()),
        }
    }

    fn set_route(&self, peer: &NodeId, conn: Option<ConnId>, usable: bool) {
        let handle = conn.and_then(|c| lock(&self.handles).get(&c).cloned());
        let mut routes = lock(&self.routes);
        match handle {
            Some(handle) => {
                routes.insert(peer.clone(), Route { handle, usable });
            }
            None => {
                routes.remove(peer);
            }
        }
    }

    /// Spawns one of the manager's tasks, in its `peers{node=..}` span.
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tracker.spawn(task.instrument(self.span.clone()));
    }

    fn handle(&self, conn: ConnId) -> Option<ConnectionHandle> {
        lock(&self.handles).get(&conn).cloned()
    }

    fn perform(self: &Arc<Self>, action: Action) {
        match action {
            Action::Dial { dial, addr } => {
                let this = self.clone();
                self.spawn(async move {
                    let connect = async {
                        match this.config.seed_id(&addr) {
                            Some(id) => this.endpoint.connect_to(&addr, id).await,
                            None => this.endpoint.connect(&addr).await,
                        }
                    };
                    let result = tokio::select! {
                        _ = this.cancel.cancelled() => Err(TransportError::Shutdown),
                        r = connect => r,
                    };
                    match result {
                        Ok(conn) => this.adopt(conn, Some(dial)),
                        Err(e) => {
                            let failure = classify(&e);
                            // A setting that differs from the peer's (network,
                            // network key, leasing, ...) needs the operator: say
                            // so at the default level (once per backoff, at most
                            // a minute apart). Other failures are routine.
                            if failure == DialFailure::Incompatible
                                || matches!(e, TransportError::Crypto(_))
                            {
                                warn!(%addr, error = %e, "dial refused: this needs the operator (network, keys, settings, allow list or pinned id)");
                            } else if this.config.seeds().contains(&addr)
                                && *this.connected.borrow() == 0
                                && !names_others(&e)
                            {
                                // Alone, and a seed does not answer (wrong
                                // address, down, nothing listening), or is
                                // full and names nobody else: at the default
                                // level, once per backoff. A full seed that
                                // names its peers is how a crowd joins
                                // (three nodes in four of 60 started
                                // together, each warned once when it was).
                                warn!(%addr, error = %e, "cannot reach seed, and no peer is connected (retrying)");
                            } else {
                                debug!(%addr, error = %e, "dial failed");
                            }
                            this.with_pool(|p, now| {
                                p.on_dial_failed_with(dial, failure, Some(e.to_string()), now);
                                // A full node names some of its peers.
                                if let TransportError::Refused { alternatives, .. } = &e {
                                    p.on_discovered(alternatives, now);
                                }
                            });
                            // The slot is free: try the next candidate now
                            // rather than at the next tick (each failed entry
                            // waits out its backoff, so this cannot spin).
                            this.wake.notify_one();
                        }
                    }
                });
            }
            Action::Ping { conn } => {
                let Some(handle) = self.handle(conn) else {
                    self.with_pool(|p, _| p.on_ping_failed(conn));
                    return;
                };
                let this = self.clone();
                let timeout = self.config.heartbeat.unresponsive_after;
                self.spawn(async move {
                    match handle.ping_for_count(timeout).await {
                        Ok((rtt, count)) => {
                            this.with_pool(|p, now| p.on_pong(conn, rtt, count, now))
                        }
                        Err(_) => this.with_pool(|p, _| p.on_ping_failed(conn)),
                    }
                });
            }
            Action::Send { conn, message } => {
                if let Some(handle) = self.handle(conn) {
                    if let Err(e) = handle.try_send(message, Priority::Normal) {
                        debug!(conn, error = %e, "could not queue a peer list");
                    }
                }
            }
            Action::Close { conn, disconnect } => {
                if let Some(handle) = self.handle(conn) {
                    // A silent peer will not read our goodbye: give it a
                    // moment, then cut the connection instead of waiting for
                    // the whole close timeout.
                    let dead = disconnect.reason_or_unspecified() == DisconnectReason::Timeout;
                    self.spawn(async move {
                        if !dead {
                            handle.close_with(disconnect).await;
                        } else if tokio::time::timeout(
                            DEAD_CLOSE_GRACE,
                            handle.close_with(disconnect),
                        )
                        .await
                        .is_err()
                        {
                            handle.abort();
                        }
                    });
                }
            }
            Action::Ban { node, duration } => {
                let endpoint = self.endpoint.clone();
                self.tracker
                    .spawn(async move { endpoint.ban(&node, duration).await });
            }
            Action::Unban { node } => self.endpoint.unban(&node),
            Action::TwinSuspected {
                peer,
                existing,
                new,
            } => {
                let list = |addrs: &[meshwork_transport::Address]| {
                    addrs
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                warn!(
                    peer = %peer,
                    "node {} is connected from two places advertising different addresses \
                     ({} vs {}): two nodes may be sharing one key file",
                    peer.short(),
                    list(&existing),
                    list(&new),
                );
            }
            // Applied under the lock in with_pool.
            Action::Route { .. } | Action::Event(_) => {}
        }
    }

    /// Takes a handshaken connection into the pool and starts reading it.
    fn adopt(self: &Arc<Self>, conn: Connection, dial: Option<DialId>) {
        let info = conn.info();
        let id = info.id;
        let link = LinkInfo {
            node: info.node_id.clone(),
            direction: info.direction,
            remote_addr: info.remote_addr.clone(),
            listen_addrs: info.hello.listen_addrs.clone(),
            metadata: info.hello.metadata.clone(),
            // The handshake's round trip (the connection's only sample yet).
            rtt: conn.stats().last_rtt,
            count: info.hello.peer_count,
        };
        let span = info_span!("peer", peer = %link.node.short(), conn = id);
        lock(&self.handles).insert(id, conn.handle());
        let node = link.node.clone();
        let admitted = self.with_pool(|p, now| {
            match dial {
                Some(d) => p.on_dial_ok(d, id, link, now),
                None => p.on_connection(id, link, now),
            }
            p.is_linked(&node)
        });
        let sink = PeerSink {
            inner: Arc::downgrade(self),
            from: node,
            admitted,
        };
        let handle = conn.deliver_to(Arc::new(sink));
        let this = self.clone();
        self.tracker
            .spawn(this.watch_close(id, handle).instrument(span));
    }

    /// Waits for the end of a connection whose messages go to a
    /// [`PeerSink`], and tells the pool.
    async fn watch_close(self: Arc<Self>, id: ConnId, handle: ConnectionHandle) {
        handle.closed().await;
        let reason = handle.close_reason().unwrap_or(CloseReason::Eof);
        lock(&self.handles).remove(&id);
        self.with_pool(|p, now| p.on_closed(id, reason, now));
        self.wake.notify_one();
    }

    /// One Concern message from `from`, for the layer above.
    fn concern(&self, from: &NodeId, conn: &ConnectionHandle, message: ConcernFrame) {
        if let Some(handler) = self.handler.get() {
            handler.on_concern(from, conn, message);
            return;
        }
        if !self.inbound_taken.load(Ordering::Acquire) {
            self.dropped_inbound.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let inbound = Inbound {
            from: from.clone(),
            message,
        };
        if self.inbound_tx.try_send(inbound).is_err() {
            self.dropped_inbound.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn accept_loop(self: Arc<Self>) {
        loop {
            let conn = tokio::select! {
                _ = self.cancel.cancelled() => break,
                c = self.endpoint.accept() => c,
            };
            match conn {
                Some(conn) => self.adopt(conn, None),
                None => break,
            }
        }
    }

    async fn maintain(self: Arc<Self>) {
        let tick = self.config.tick;
        loop {
            // Polled first, then every tick: the seeds are dialled as the
            // node starts, not a tick later (a restarted `meshwork node`
            // had its first peer 250 ms after its start, all of it waiting).
            let now = Instant::now();
            let heard: HashMap<ConnId, Instant> = lock(&self.handles)
                .iter()
                .map(|(id, h)| (*id, now.checked_sub(h.idle_for()).unwrap_or(now)))
                .collect();
            self.with_pool(|p, now| p.poll(now, &heard));
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = tokio::time::sleep(tick) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}

/// A Concern frame as it arrives.
pub type ConcernFrame = meshwork_wire::proto::Concern;

/// Takes Concern messages from peers as they arrive, on the reader of the
/// connection they came on; installed with
/// [`PeerManager::set_inbound_handler`].
pub trait InboundHandler: Send + Sync + 'static {
    /// One message from the neighbour `from`, which arrived on `conn` (the
    /// natural way back for an answer). It runs on that connection's reader,
    /// so it must not block: nothing more is read from `from` meanwhile.
    fn on_concern(&self, from: &NodeId, conn: &ConnectionHandle, message: ConcernFrame);
}

/// What a connection's reader hands its messages to.
struct PeerSink {
    inner: Weak<Inner>,
    from: NodeId,
    /// Whether `from` was a neighbour once the pool had seen this
    /// connection. A connection the pool refused (no room, banned, ...)
    /// hands nothing to the layer above: its sender is no neighbour, and
    /// no answer could go back to it.
    admitted: bool,
}

impl Deliver for PeerSink {
    fn deliver(&self, conn: &ConnectionHandle, msg: Message) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        match msg {
            Message::Concern(_) if !self.admitted => {
                inner.dropped_inbound.fetch_add(1, Ordering::Relaxed);
            }
            Message::Concern(message) => inner.concern(&self.from, conn, message),
            Message::Discovered(d) => {
                let from = &self.from;
                if inner.with_pool(|p, now| p.on_discovered_from(from, &d.peers, now)) {
                    inner.wake.notify_one();
                }
            }
            Message::Disconnect(d) => {
                // The close itself is reported when the stream ends.
                inner.with_pool(|p, now| p.on_discovered(&d.alternatives, now));
            }
            other => debug!(kind = other.kind(), "ignored message"),
        }
    }
}

/// The pool's say in incoming handshakes (see [`Pool::gate`]).
struct PoolGate(Weak<Inner>);

impl Gate for PoolGate {
    fn admit(&self, peer: &NodeId, hello: &Hello) -> Result<(), Disconnect> {
        match self.0.upgrade() {
            Some(inner) => {
                lock(&inner.pool).gate(peer, &hello.listen_addrs, hello.peer_count, Instant::now())
            }
            // Stopping: nobody will take the connection anyway.
            None => Ok(()),
        }
    }

    fn release(&self, peer: &NodeId) {
        if let Some(inner) = self.0.upgrade() {
            lock(&inner.pool).release_gate(peer);
        }
    }
}
