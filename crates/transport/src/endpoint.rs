//! [`Endpoint`]: listeners, dialling, the handshake, and the set of live
//! connections of one node.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use meshwork_wire::NodeId;
use meshwork_wire::proto::{Disconnect, DisconnectReason, Hello, PeerCount};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::addr::{Host, local_host_ip};
use crate::admission::{Admission, PendingHandshakes, Slot, Source};
use crate::connection::{Connection, ConnectionHandle, Direction, Home, OwnCount};
use crate::handshake::{handshake, local_hello};
use crate::transport::{BoxStream, Listener, Transport};
use crate::{Address, Config, TransportError, lock};

/// Counters of an endpoint's handshakes, for logs and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Failed handshakes by cause ([`TransportError::label`]), both directions.
    pub failures: BTreeMap<&'static str, u64>,
    /// Handshakes that completed, both directions.
    pub handshakes_ok: u64,
    /// Handshakes that failed or were refused, both directions.
    pub handshakes_failed: u64,
    /// Incoming streams closed at once because too many handshakes were
    /// pending and none could be evicted.
    pub rejected_busy: u64,
    /// Pending incoming handshakes closed to make room for a newcomer: from
    /// a host holding more pending handshakes than the newcomer's, or
    /// waiting for more than half the handshake timeout.
    pub evicted_handshakes: u64,
    /// Incoming handshakes holding a slot now (in progress, or completed
    /// and not yet accepted), of at most `max_pending_handshakes`.
    pub pending_handshakes: usize,
    /// Connections currently open.
    pub open_connections: usize,
}

struct Inner {
    config: Config,
    transport: Arc<dyn Transport>,
    listen_addrs: Mutex<Vec<Address>>,
    connections: Mutex<HashMap<u64, ConnectionHandle>>,
    next_id: AtomicU64,
    incoming_tx: mpsc::Sender<Connection>,
    incoming_rx: tokio::sync::Mutex<mpsc::Receiver<Connection>>,
    pending: Arc<PendingHandshakes>,
    /// Fired first on shutdown: stop accepting and dialling.
    stopping: CancellationToken,
    /// Fired once connections were closed: ends every task.
    cancel: CancellationToken,
    tracker: TaskTracker,
    handshakes_ok: AtomicU64,
    handshakes_failed: AtomicU64,
    rejected_busy: AtomicU64,
    evicted_handshakes: AtomicU64,
    failures: Mutex<BTreeMap<&'static str, u64>>,
    bans: Mutex<HashMap<NodeId, Instant>>,
    gate: OnceLock<Arc<dyn Gate>>,
    /// What our Hellos and Pongs tell peers of our peer count
    /// ([`Endpoint::set_peer_count`]), shared with every connection.
    peer_count: OwnCount,
}

/// The application's say, during an incoming handshake, on whether it takes
/// the peer ([`Endpoint::set_gate`]): a node whose peer table is full
/// refuses a dialler before the handshake ends, so the dialler never sees a
/// connection that is closed as soon as it opens (and sends nothing into
/// it).
///
/// Called on the responder only, once the peer passed every protocol check,
/// the allow list and the bans, before this node's Hello goes out. It must
/// not block. What it admits can still be refused once the connection is
/// taken ([`Endpoint::accept`]): another peer may have taken the last slot
/// in between.
pub trait Gate: Send + Sync + 'static {
    /// `Ok` to go on with `peer` (authenticated, its Hello checked), or the
    /// Disconnect (reason, message, alternatives) it is refused with.
    fn admit(&self, peer: &NodeId, hello: &Hello) -> Result<(), Disconnect>;

    /// The handshake of a `peer` this gate admitted failed or was cut short
    /// (the peer closed, stalled past the timeout, or the node is stopping):
    /// no connection will come of it, so whatever the gate set aside for it
    /// can go. Not called for a handshake that completed, even if the
    /// connection is then never taken.
    fn release(&self, peer: &NodeId) {
        let _ = peer;
    }
}

/// One node's presence on a transport: it listens, dials, runs the Hello
/// handshake, and keeps track of its connections.
///
/// ```
/// use std::sync::Arc;
/// use meshwork_transport::{Config, Endpoint, Priority, mem::MemNetwork};
/// use meshwork_wire::{Message, proto::{Concern, ConcernKind}};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), meshwork_transport::TransportError> {
/// let net = MemNetwork::new();
/// let alice = Endpoint::new(Config::new("demo"), net.transport("alice"));
/// let bob = Endpoint::new(Config::new("demo"), net.transport("bob"));
/// let addr = alice.listen(&"mem://alice".parse()?).await?;
///
/// let to_alice = bob.connect(&addr).await?;
/// let mut from_bob = alice.accept().await.expect("alice is running");
/// assert_eq!(from_bob.node_id(), bob.node_id());
///
/// let hello = Concern { command: 1, kind: ConcernKind::Request as i32, payload: "hi".into(), ..Default::default() };
/// to_alice.send(Message::Concern(hello.clone()), Priority::Normal).await?;
/// assert_eq!(from_bob.recv().await?, Message::Concern(hello));
///
/// bob.shutdown().await; // sends Disconnect(shutdown) to alice
/// alice.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("node_id", self.inner.config.node_id())
            .field("network_id", &self.inner.config.network_id)
            .field("listen_addrs", &self.listen_addrs())
            .finish()
    }
}

/// Incoming handshaken connections waiting for [`Endpoint::accept`].
const INCOMING_QUEUE: usize = 64;

impl Endpoint {
    /// An endpoint with `config` on `transport`. It does nothing until told
    /// to [`listen`](Self::listen) or [`connect`](Self::connect).
    pub fn new(config: Config, transport: impl Transport) -> Self {
        Self::with_transport(config, Arc::new(transport))
    }

    /// Like [`new`](Self::new) with a shared transport.
    pub fn with_transport(config: Config, transport: Arc<dyn Transport>) -> Self {
        let (incoming_tx, incoming_rx) = mpsc::channel(INCOMING_QUEUE);
        let pending =
            PendingHandshakes::new(config.max_pending_handshakes, config.handshake_timeout);
        Endpoint {
            inner: Arc::new(Inner {
                config,
                transport,
                listen_addrs: Mutex::new(Vec::new()),
                connections: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                incoming_tx,
                incoming_rx: tokio::sync::Mutex::new(incoming_rx),
                pending,
                stopping: CancellationToken::new(),
                cancel: CancellationToken::new(),
                tracker: TaskTracker::new(),
                handshakes_ok: AtomicU64::new(0),
                handshakes_failed: AtomicU64::new(0),
                rejected_busy: AtomicU64::new(0),
                evicted_handshakes: AtomicU64::new(0),
                failures: Mutex::new(BTreeMap::new()),
                bans: Mutex::new(HashMap::new()),
                gate: OnceLock::new(),
                peer_count: OwnCount::default(),
            }),
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        self.inner.config.node_id()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Addresses we listen on, as advertised to peers in the Hello: those
    /// set with [`Config::with_advertised_addr`] if any, else the
    /// listeners' own, a listener bound to `0.0.0.0` or `[::]` advertised
    /// with the local host's IP ([`local_host_ip`]).
    pub fn listen_addrs(&self) -> Vec<Address> {
        if !self.inner.config.advertised.is_empty() {
            return self.inner.config.advertised.clone();
        }
        self.bound_addrs()
    }

    /// Addresses the listeners are bound to (the port a listen address of
    /// port 0 picked included), whatever is advertised; one bound to
    /// `0.0.0.0` or `[::]` as the local host's IP ([`local_host_ip`]).
    pub fn bound_addrs(&self) -> Vec<Address> {
        lock(&self.inner.listen_addrs).clone()
    }

    /// Starts listening on `addr` and returns the address actually bound.
    /// Incoming connections are handshaken in the background and handed out
    /// by [`accept`](Self::accept).
    pub async fn listen(&self, addr: &Address) -> Result<Address, TransportError> {
        if self.inner.stopping.is_cancelled() {
            return Err(TransportError::Shutdown);
        }
        let listener = self.inner.transport.listen(addr).await?;
        let bound = listener.local_addr();
        let advertised = match &bound {
            Address::Tcp {
                host: Host::Ip(ip),
                port,
            } if ip.is_unspecified() => Address::Tcp {
                host: Host::Ip(local_host_ip().await),
                port: *port,
            },
            _ => bound.clone(),
        };
        lock(&self.inner.listen_addrs).push(advertised);
        info!(addr = %bound, node = %self.node_id().short(), "listening");
        let this = self.clone();
        let span = info_span!("listener", addr = %bound);
        self.inner
            .tracker
            .spawn(this.accept_loop(listener).instrument(span));
        Ok(bound)
    }

    async fn accept_loop(self, mut listener: Box<dyn Listener>) {
        let inner = &self.inner;
        loop {
            let accepted = tokio::select! {
                _ = inner.stopping.cancelled() => break,
                r = listener.accept() => r,
            };
            let (stream, remote) = match accepted {
                Ok(x) => x,
                Err(TransportError::Shutdown) => break,
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some((slot, how)) = inner.pending.admit(Source::of(&remote), Instant::now()) else {
                inner.rejected_busy.fetch_add(1, Ordering::Relaxed);
                debug!(%remote, "too many pending handshakes; closing incoming stream");
                drop(stream);
                continue;
            };
            if how == Admission::Evicted {
                inner.evicted_handshakes.fetch_add(1, Ordering::Relaxed);
                debug!(%remote, "pending handshakes full; evicted one to admit this stream");
            }
            let this = self.clone();
            let span = info_span!("inbound", %remote);
            inner
                .tracker
                .spawn(this.accept_one(stream, remote, slot).instrument(span));
        }
    }

    /// Runs one incoming handshake; `slot` (its pending-handshake slot) is
    /// held until the application takes the connection.
    async fn accept_one(self, stream: BoxStream, remote: Address, mut slot: Slot) {
        let inner = &self.inner;
        let hello = local_hello(&inner.config, self.advertised(), self.peer_count());
        // The peer the gate admitted, told when its handshake comes to
        // nothing (so that an attacker stopping after the gate holds no
        // slot of the application's).
        let admitted: Mutex<Option<NodeId>> = Mutex::new(None);
        let release = || {
            if let (Some(id), Some(gate)) = (lock(&admitted).take(), inner.gate.get()) {
                gate.release(&id);
            }
        };
        let admit = |id: &NodeId, hello: Option<&Hello>| {
            self.admit(id)?;
            match (hello, self.inner.gate.get()) {
                (Some(hello), Some(gate)) => {
                    gate.admit(id, hello)
                        .map_err(|d| TransportError::Declined(Box::new(d)))?;
                    *lock(&admitted) = Some(id.clone());
                    Ok(())
                }
                _ => Ok(()),
            }
        };
        let evicted = slot.evicted().clone();
        let result = tokio::select! {
            _ = inner.stopping.cancelled() => return release(),
            _ = evicted.cancelled() => {
                debug!(%remote, "incoming handshake evicted to admit another");
                return release();
            }
            r = handshake(stream, &inner.config, hello, false, &admit) => r,
        };
        if result.is_err() {
            release();
        }
        match result {
            Ok(hs) if !slot.settle() => {
                release();
                debug!(%remote, peer = %hs.node_id.short(), "incoming handshake evicted as it completed");
            }
            Ok(hs) => {
                inner.handshakes_ok.fetch_add(1, Ordering::Relaxed);
                let conn = self.register(hs, remote.clone(), Direction::Inbound);
                // The handshake slot is held until the application takes the
                // connection, but not forever.
                let wait = inner.config.handshake_timeout;
                let queued = tokio::select! {
                    _ = inner.stopping.cancelled() => return,
                    r = tokio::time::timeout(wait, inner.incoming_tx.reserve()) => r,
                };
                match queued {
                    Ok(Ok(permit)) => permit.send(conn),
                    Ok(Err(_)) => {}
                    Err(_) => {
                        warn!(%remote, "connection not accepted in time; closing");
                        conn.close(DisconnectReason::TooManyPeers, "not accepted in time")
                            .await;
                    }
                }
            }
            Err(e @ TransportError::Declined(_)) => {
                // Routine: e.g. a full node turning a dialler away.
                self.count_failure(&e);
                debug!(%remote, error = %e, "incoming peer declined");
            }
            Err(e) => {
                self.count_failure(&e);
                info!(%remote, error = %e, "incoming handshake failed");
            }
        }
    }

    fn advertised(&self) -> Vec<String> {
        self.listen_addrs().iter().map(|a| a.to_string()).collect()
    }

    fn register(
        &self,
        hs: crate::handshake::Handshaken,
        remote: Address,
        direction: Direction,
    ) -> Connection {
        let inner = &self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Connection::spawn(
            hs,
            id,
            remote,
            direction,
            Home {
                config: &inner.config,
                tracker: &inner.tracker,
                parent: &inner.cancel,
                own_count: &inner.peer_count,
            },
        );
        lock(&inner.connections).insert(id, conn.handle());
        // A ban that landed while this handshake was in flight still applies.
        if self.is_banned(conn.node_id()) {
            let handle = conn.handle();
            inner.tracker.spawn(async move {
                handle.close(DisconnectReason::Banned, "banned").await;
            });
        }
        let weak = Arc::downgrade(&self.inner);
        conn.on_terminate(move || {
            if let Some(inner) = weak.upgrade() {
                lock(&inner.connections).remove(&id);
            }
        });
        conn
    }

    /// Waits for the next incoming connection that completed its handshake.
    /// Returns `None` once the endpoint is shut down.
    ///
    /// Cancel safety: cancel-safe.
    pub async fn accept(&self) -> Option<Connection> {
        let mut rx = tokio::select! {
            _ = self.inner.stopping.cancelled() => return None,
            rx = self.inner.incoming_rx.lock() => rx,
        };
        tokio::select! {
            _ = self.inner.stopping.cancelled() => None,
            c = rx.recv() => c,
        }
    }

    /// Dials `addr` and runs the handshake, within the handshake timeout.
    ///
    /// When the other side refuses us (another network, another version,
    /// ourselves, not allowed, banned) the error is [`TransportError::Refused`]
    /// with its reason. When we refuse the other side it is the matching
    /// variant ([`TransportError::WrongNetwork`],
    /// [`TransportError::NotAllowed`], ...). An encrypted handshake that fails
    /// (e.g. another network key) is [`TransportError::Crypto`]; a peer in
    /// another security mode is [`TransportError::SecurityMismatch`].
    pub async fn connect(&self, addr: &Address) -> Result<Connection, TransportError> {
        self.dial(addr, None).await
    }

    /// [`connect`](Self::connect), completed only if the node answering at
    /// `addr` is `expected`: dial-by-id. Any other node (one that took over
    /// the address, or someone in the path impersonating the address without
    /// being able to prove `expected`'s key) is refused during the handshake
    /// with [`TransportError::UnexpectedPeer`] (it is told `NOT_ALLOWED`).
    /// With encryption on, the id checked is the one the peer proved it holds
    /// the key of; in plaintext mode it is only the id the peer claims.
    ///
    /// ```
    /// use meshwork_transport::{Config, Endpoint, Identity, TcpTransport, TransportError};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), TransportError> {
    /// let key = Identity::generate();
    /// let id = key.node_id().clone();
    /// let server = Endpoint::new(Config::new("example").with_identity(key), TcpTransport::new());
    /// let addr = server.listen(&"tcp://127.0.0.1:0".parse()?).await?;
    ///
    /// let client = Endpoint::new(Config::new("example"), TcpTransport::new());
    /// let conn = client.connect_to(&addr, &id).await?;
    /// assert_eq!(conn.node_id(), &id);
    ///
    /// let someone_else = Identity::generate().node_id().clone();
    /// let refused = client.connect_to(&addr, &someone_else).await;
    /// assert!(matches!(refused, Err(TransportError::UnexpectedPeer { .. })));
    /// # client.shutdown().await;
    /// # server.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_to(
        &self,
        addr: &Address,
        expected: &NodeId,
    ) -> Result<Connection, TransportError> {
        self.dial(addr, Some(expected)).await
    }

    async fn dial(
        &self,
        addr: &Address,
        expected: Option<&NodeId>,
    ) -> Result<Connection, TransportError> {
        let inner = &self.inner;
        if inner.stopping.is_cancelled() {
            return Err(TransportError::Shutdown);
        }
        let timeout = inner.config.handshake_timeout;
        let dial = tokio::time::timeout(timeout, inner.transport.dial(addr));
        let (stream, reached) = tokio::select! {
            _ = inner.stopping.cancelled() => return Err(TransportError::Shutdown),
            r = dial => r.map_err(|_| TransportError::Timeout { what: "dial", after: timeout })??,
        };
        let hello = local_hello(&inner.config, self.advertised(), self.peer_count());
        let admit = |id: &NodeId, _: Option<&Hello>| match expected {
            Some(expected) if id != expected => Err(TransportError::UnexpectedPeer {
                expected: expected.clone(),
                found: id.clone(),
            }),
            _ => self.admit(id),
        };
        let result = tokio::select! {
            _ = inner.stopping.cancelled() => return Err(TransportError::Shutdown),
            r = handshake(stream, &inner.config, hello, true, &admit) => r,
        };
        match result {
            Ok(hs) => {
                inner.handshakes_ok.fetch_add(1, Ordering::Relaxed);
                Ok(self.register(hs, reached, Direction::Outbound))
            }
            Err(e) => {
                self.count_failure(&e);
                debug!(%addr, error = %e, "outgoing handshake failed");
                Err(e)
            }
        }
    }

    fn count_failure(&self, e: &TransportError) {
        self.inner.handshakes_failed.fetch_add(1, Ordering::Relaxed);
        *lock(&self.inner.failures).entry(e.label()).or_default() += 1;
    }

    /// Sets the [`Gate`] that incoming handshakes consult; false (and
    /// nothing changed) if one is set already. The peer manager sets one
    /// for its pool's limits.
    pub fn set_gate(&self, gate: Arc<dyn Gate>) -> bool {
        self.inner.gate.set(gate).is_ok()
    }

    /// Sets the count of peers this node tells its peers from now on: in
    /// the Hello of every handshake and in every Pong, on every connection
    /// (protocol.md 4.2, 4.3). `None` (the default) sends none. The peer
    /// manager keeps it up to date (its links, its `min_peers`), so that a
    /// full peer can tell whether this node can spare a link.
    pub fn set_peer_count(&self, count: Option<PeerCount>) {
        *lock(&self.inner.peer_count) = count;
    }

    /// The count set with [`set_peer_count`](Self::set_peer_count).
    pub fn peer_count(&self) -> Option<PeerCount> {
        *lock(&self.inner.peer_count)
    }

    /// The admission policy: the allow list, then the ban list.
    fn admit(&self, id: &NodeId) -> Result<(), TransportError> {
        if let Some(allowed) = &self.inner.config.allowed_peers {
            if !allowed.contains(id) {
                return Err(TransportError::NotAllowed(id.clone()));
            }
        }
        if self.is_banned(id) {
            return Err(TransportError::Banned(id.clone()));
        }
        Ok(())
    }

    /// Refuses `node` for `duration`: handshakes with it fail with
    /// Disconnect(banned), and open connections to it are closed the same way.
    pub async fn ban(&self, node: &NodeId, duration: Duration) {
        // A very long ban (e.g. Duration::MAX) is a ban for ~a century.
        let now = Instant::now();
        let until = now
            .checked_add(duration)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
        lock(&self.inner.bans).insert(node.clone(), until);
        let open: Vec<_> = self
            .connections()
            .into_iter()
            .filter(|c| c.node_id() == node)
            .collect();
        for c in open {
            c.close(DisconnectReason::Banned, "banned").await;
        }
    }

    /// Lifts a ban.
    pub fn unban(&self, node: &NodeId) {
        lock(&self.inner.bans).remove(node);
    }

    /// True while `node` is banned. Expired bans are forgotten here.
    pub fn is_banned(&self, node: &NodeId) -> bool {
        let mut bans = lock(&self.inner.bans);
        let now = Instant::now();
        bans.retain(|_, until| *until > now);
        bans.contains_key(node)
    }

    /// Handles of every open connection.
    pub fn connections(&self) -> Vec<ConnectionHandle> {
        let mut all: Vec<_> = lock(&self.inner.connections).values().cloned().collect();
        all.sort_by_key(|c| c.info().id);
        all
    }

    /// Handshake counters and the number of open connections.
    pub fn stats(&self) -> EndpointStats {
        let inner = &self.inner;
        EndpointStats {
            handshakes_ok: inner.handshakes_ok.load(Ordering::Relaxed),
            handshakes_failed: inner.handshakes_failed.load(Ordering::Relaxed),
            rejected_busy: inner.rejected_busy.load(Ordering::Relaxed),
            evicted_handshakes: inner.evicted_handshakes.load(Ordering::Relaxed),
            pending_handshakes: inner.pending.len(),
            failures: lock(&inner.failures).clone(),
            open_connections: lock(&inner.connections).len(),
        }
    }

    /// True once [`shutdown`](Self::shutdown) has begun.
    pub fn is_shut_down(&self) -> bool {
        self.inner.stopping.is_cancelled()
    }

    /// Shuts down gracefully: stops listening, closes every connection with
    /// Disconnect(shutdown) (each within the close timeout), and returns when
    /// every task of this endpoint has ended.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        // Stop accepting and dialling first, so no new connection slips in.
        inner.stopping.cancel();
        let conns = self.connections();
        let closes = conns
            .iter()
            .map(|c| c.close(DisconnectReason::Shutdown, "node shutting down"));
        futures_util::future::join_all(closes).await;
        inner.cancel.cancel();
        inner.tracker.close();
        inner.tracker.wait().await;
        lock(&inner.listen_addrs).clear();
        info!(node = %self.node_id().short(), "endpoint shut down");
    }
}
