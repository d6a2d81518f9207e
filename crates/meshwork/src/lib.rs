//! meshwork: a peer-to-peer mesh library.
//!
//! This facade re-exports the layers and assembles them into one [`Node`].
//! Depend on it to get everything; depend on a single layer crate to get
//! just that layer.
//!
//! | layer | crate | re-exported as |
//! |---|---|---|
//! | 0 | `meshwork-wire`: messages and the frame codec | [`wire`] |
//! | 1 | `meshwork-transport`: connections, addresses, handshake | [`transport`] |
//!
//! The peer manager, concerns, sync and rpc layers join as they are built;
//! until the peer manager exists, a node keeps one connection to each of its
//! seeds (redialling with backoff) and accepts every peer that dials it.
//!
//! # Getting started
//!
//! Three nodes in one process, on the in-memory network:
//!
//! ```
//! use std::time::Duration;
//! use meshwork::{Node, transport::mem::MemNetwork};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), meshwork::Error> {
//! let net = MemNetwork::new();
//! let seed = Node::builder("example")
//!     .transport(net.transport("seed"))
//!     .listen("mem://seed".parse()?)
//!     .start()
//!     .await?;
//! let a = Node::builder("example")
//!     .transport(net.transport("a"))
//!     .seed("mem://seed".parse()?)
//!     .start()
//!     .await?;
//! let b = Node::builder("example")
//!     .transport(net.transport("b"))
//!     .seed("mem://seed".parse()?)
//!     .start()
//!     .await?;
//!
//! seed.wait_for_connections(2, Duration::from_secs(5)).await?;
//! let status = seed.status();
//! assert_eq!(status.connections.len(), 2);
//!
//! for node in [a, b, seed] {
//!     node.shutdown().await;
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use meshwork_transport::{
    Address, CloseReason, Config, Connection, Direction, Endpoint, TcpTransport, Transport,
    TransportError,
};
use meshwork_wire::NodeId;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

pub use meshwork_transport as transport;
pub use meshwork_wire as wire;

/// Errors of the facade.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The transport layer failed (bad address, dial failure, ...).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A listener could not be started on `addr`.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address that was asked for.
        addr: Address,
        /// Why it failed.
        source: TransportError,
    },
    /// A wait ran out of time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
}

/// Builds and starts a [`Node`].
#[derive(Debug)]
pub struct NodeBuilder {
    config: Config,
    listen: Vec<Address>,
    seeds: Vec<Address>,
    transport: Option<Arc<dyn Transport>>,
    ping_interval: Duration,
    redial_min: Duration,
    redial_max: Duration,
}

impl NodeBuilder {
    fn new(network_id: &str) -> Self {
        NodeBuilder {
            config: Config::new(network_id),
            listen: Vec::new(),
            seeds: Vec::new(),
            transport: None,
            ping_interval: Duration::from_secs(1),
            redial_min: Duration::from_millis(100),
            redial_max: Duration::from_secs(10),
        }
    }

    /// Adds an address to listen on (none: the node only dials out).
    pub fn listen(mut self, addr: Address) -> Self {
        self.listen.push(addr);
        self
    }

    /// Adds a seed: a node to dial at start and redial whenever the
    /// connection drops.
    pub fn seed(mut self, addr: Address) -> Self {
        self.seeds.push(addr);
        self
    }

    /// Adds a metadata entry sent to peers in the Hello.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config = self.config.with_metadata(key, value);
        self
    }

    /// Uses this identity (e.g. from [`Identity::load_or_create`]) instead of
    /// a fresh one; the node id is its public key.
    ///
    /// [`Identity::load_or_create`]: transport::Identity::load_or_create
    pub fn identity(mut self, identity: transport::Identity) -> Self {
        self.config = self.config.with_identity(identity);
        self
    }

    /// Only nodes holding the same network key can connect.
    pub fn network_key(mut self, key: transport::NetworkKey) -> Self {
        self.config = self.config.with_network_key(key);
        self
    }

    /// Turns encryption and authentication off. For tests and debugging
    /// only: anyone can read, forge, and claim any node id.
    pub fn insecure_plaintext(mut self) -> Self {
        self.config = self.config.with_insecure_plaintext();
        self
    }

    /// Uses this transport instead of TCP (e.g. an in-memory one for tests).
    pub fn transport(mut self, transport: impl Transport) -> Self {
        self.transport = Some(Arc::new(transport));
        self
    }

    /// Adjusts the transport configuration (timeouts, limits, node id).
    pub fn configure(mut self, f: impl FnOnce(Config) -> Config) -> Self {
        self.config = f(self.config);
        self
    }

    /// How often each peer is pinged to measure round-trip time (default 1 s).
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval;
        self
    }

    /// Bounds of the exponential backoff between dials of a seed
    /// (default 100 ms to 10 s, with jitter).
    pub fn redial_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.redial_min = min;
        self.redial_max = max.max(min);
        self
    }

    /// Binds the listeners, then starts dialling seeds and accepting peers.
    pub async fn start(self) -> Result<Node, Error> {
        let transport = self
            .transport
            .unwrap_or_else(|| Arc::new(TcpTransport::new()));
        let endpoint = Endpoint::with_transport(self.config, transport);
        for addr in &self.listen {
            if let Err(source) = endpoint.listen(addr).await {
                endpoint.shutdown().await;
                return Err(Error::Listen {
                    addr: addr.clone(),
                    source,
                });
            }
        }
        let (count_tx, _) = watch::channel(0usize);
        let node = Node {
            inner: Arc::new(NodeInner {
                endpoint,
                started: Instant::now(),
                cancel: CancellationToken::new(),
                tracker: TaskTracker::new(),
                ping_interval: self.ping_interval,
                connection_count: count_tx,
            }),
        };
        let listen: Vec<String> = node.listen_addrs().iter().map(|a| a.to_string()).collect();
        info!(node = %node.node_id(), listen = %listen.join(" "), "node started");
        let this = node.clone();
        node.inner.tracker.spawn(this.accept_loop());
        for seed in self.seeds {
            let this = node.clone();
            let span = info_span!("seed", addr = %seed);
            let backoff = (self.redial_min, self.redial_max);
            node.inner
                .tracker
                .spawn(this.seed_loop(seed, backoff).instrument(span));
        }
        Ok(node)
    }
}

struct NodeInner {
    endpoint: Endpoint,
    started: Instant,
    cancel: CancellationToken,
    tracker: TaskTracker,
    ping_interval: Duration,
    connection_count: watch::Sender<usize>,
}

/// A running mesh node. Cheap to clone; every clone is the same node.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", self.node_id())
            .finish()
    }
}

/// A snapshot of a node and its connections.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    /// This node's id.
    pub node_id: NodeId,
    /// The network it belongs to.
    pub network_id: String,
    /// Addresses it accepts connections on.
    pub listen: Vec<Address>,
    /// The metadata it sends to peers.
    pub metadata: HashMap<String, String>,
    /// Time since start.
    pub uptime: Duration,
    /// Every open connection, oldest first.
    pub connections: Vec<ConnectionStatus>,
}

/// One connection in a [`NodeStatus`].
#[derive(Debug, Clone)]
pub struct ConnectionStatus {
    /// The peer's node id.
    pub node_id: NodeId,
    /// The other end of the stream.
    pub addr: Address,
    /// Who dialled.
    pub direction: Direction,
    /// Where the peer says it listens, as it sent them (not necessarily
    /// parseable: a peer may speak schemes we don't).
    pub listen_addrs: Vec<String>,
    /// The metadata the peer sent in its Hello.
    pub metadata: HashMap<String, String>,
    /// Latest round-trip time.
    pub rtt: Option<Duration>,
    /// Smoothed round-trip time.
    pub smoothed_rtt: Option<Duration>,
    /// Time since the handshake.
    pub age: Duration,
    /// Frames sent.
    pub frames_sent: u64,
    /// Frames received.
    pub frames_received: u64,
}

impl Node {
    /// Starts building a node of network `network_id`.
    pub fn builder(network_id: &str) -> NodeBuilder {
        NodeBuilder::new(network_id)
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        self.inner.endpoint.node_id()
    }

    /// Where this node accepts connections.
    pub fn listen_addrs(&self) -> Vec<Address> {
        self.inner.endpoint.listen_addrs()
    }

    /// The transport endpoint underneath (for the layers above and tools).
    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    /// A snapshot of this node and its connections.
    pub fn status(&self) -> NodeStatus {
        let ep = &self.inner.endpoint;
        let connections = ep
            .connections()
            .into_iter()
            .map(|c| {
                let stats = c.stats();
                let info = c.info();
                ConnectionStatus {
                    node_id: info.node_id.clone(),
                    addr: info.remote_addr.clone(),
                    direction: info.direction,
                    listen_addrs: info.hello.listen_addrs.clone(),
                    metadata: info.hello.metadata.clone(),
                    rtt: stats.last_rtt,
                    smoothed_rtt: stats.smoothed_rtt,
                    age: stats.age,
                    frames_sent: stats.frames_sent,
                    frames_received: stats.frames_received,
                }
            })
            .collect();
        NodeStatus {
            node_id: self.node_id().clone(),
            network_id: ep.config().network_id().to_string(),
            listen: self.listen_addrs(),
            metadata: ep.config().metadata().clone(),
            uptime: self.inner.started.elapsed(),
            connections,
        }
    }

    /// Waits until at least `n` connections are open.
    pub async fn wait_for_connections(&self, n: usize, timeout: Duration) -> Result<(), Error> {
        let mut rx = self.inner.connection_count.subscribe();
        let wait = rx.wait_for(|count| *count >= n);
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(Error::Timeout(timeout, "connections")),
        }
    }

    /// Shuts down: stops dialling and accepting, sends Disconnect(shutdown)
    /// to every peer, and returns when every task has ended.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.endpoint.shutdown().await;
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
        info!(node = %self.node_id().short(), "node stopped");
    }

    async fn accept_loop(self) {
        loop {
            let conn = tokio::select! {
                _ = self.inner.cancel.cancelled() => break,
                c = self.inner.endpoint.accept() => c,
            };
            let Some(conn) = conn else { break };
            let this = self.clone();
            self.inner.tracker.spawn(this.run_connection(conn));
        }
    }

    async fn seed_loop(self, seed: Address, (min, max): (Duration, Duration)) {
        let mut backoff = min;
        loop {
            let attempt = tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                r = self.inner.endpoint.connect(&seed) => r,
            };
            match attempt {
                Ok(conn) => {
                    backoff = min;
                    self.clone().run_connection(conn).await;
                }
                Err(
                    TransportError::SelfConnection
                    | TransportError::Refused {
                        reason: wire::proto::DisconnectReason::SelfConnection,
                        ..
                    },
                ) => {
                    info!("seed is this node; not dialling it");
                    return;
                }
                Err(TransportError::Shutdown) => return,
                Err(e) => {
                    debug!(error = %e, retry_in = ?backoff, "seed dial failed");
                    backoff = (backoff * 2).min(max);
                }
            }
            // Jitter in [backoff/2, backoff) so restarted meshes don't dial in lockstep.
            let half = backoff / 2;
            let jitter = half.mul_f64(rand::random::<f64>());
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                _ = tokio::time::sleep(half + jitter) => {}
            }
        }
    }

    fn update_count(&self) {
        let n = self.inner.endpoint.stats().open_connections;
        self.inner.connection_count.send_replace(n);
    }

    /// Serves one connection until it ends: answers traffic, pings for RTT.
    async fn run_connection(self, mut conn: Connection) {
        let info = conn.info().clone();
        let span = info_span!("peer", peer = %info.node_id.short());
        async {
            info!(addr = %info.remote_addr, direction = ?info.direction, "peer connected");
            self.update_count();
            let handle = conn.handle();
            let pinger = {
                let handle = handle.clone();
                let interval = self.inner.ping_interval;
                async move {
                    let mut tick = tokio::time::interval(interval);
                    loop {
                        tick.tick().await;
                        match handle.ping(interval.max(Duration::from_secs(5))).await {
                            Ok(rtt) => debug!(?rtt, "pong"),
                            Err(TransportError::NotConnected) => break,
                            Err(e) => debug!(error = %e, "ping failed"),
                        }
                    }
                }
            };
            let receiver = async {
                // Until the concerns layer exists, traffic is only logged.
                while let Ok(msg) = conn.recv().await {
                    debug!(kind = msg.kind(), "message");
                }
            };
            tokio::select! {
                _ = pinger => {}
                _ = receiver => {}
            }
            handle.closed().await;
            match handle.close_reason() {
                Some(CloseReason::Local { .. }) | Some(CloseReason::Remote { .. }) | None => {
                    info!(reason = ?handle.close_reason(), "peer disconnected")
                }
                Some(other) => warn!(reason = ?other, "connection lost"),
            }
        }
        .instrument(span)
        .await;
        drop(conn);
        self.update_count();
    }
}
