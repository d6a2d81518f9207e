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
//! | 2 | `meshwork-peers`: the pool of peers, discovery, heartbeats, selection | [`peers`] |
//! | 3 | `meshwork-concerns`: handlers, request/reply, flooding, routing, topics | [`concerns`] |
//! | 4 | `meshwork-sync`: the replicated key-value map with leases | [`sync`] |
//! | 5 | `meshwork-rpc`: typed services callable from any node | [`rpc`], [`service`] |
//!
//! The [`guide`] walks through each layer with complete examples.
//!
//! Every node runs every layer: [`Node::sync`] is its replicated map,
//! [`Node::rpc`] serves and calls services. A node keeps
//! between `min_peers` and `max_peers` peers, found from its seeds and then
//! by discovery: connecting to one node of a mesh is enough to join it.
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
//!     .listen("mem://a".parse()?)
//!     .seed("mem://seed".parse()?)
//!     .start()
//!     .await?;
//! let b = Node::builder("example")
//!     .transport(net.transport("b"))
//!     .listen("mem://b".parse()?)
//!     .seed("mem://seed".parse()?)
//!     .start()
//!     .await?;
//!
//! // a and b only know the seed, and find each other through it.
//! a.wait_for_peers(2, Duration::from_secs(5)).await?;
//! let status = a.status();
//! assert_eq!(status.peers.iter().filter(|p| p.state.is_linked()).count(), 2);
//!
//! for node in [a, b, seed] {
//!     node.shutdown().await;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Messages: broadcasts, topics, requests
//!
//! Topics need no code of your own ([`Concerns::subscribe`],
//! [`Concerns::publish`]). Broadcasts and requests are for a
//! [`Concern`]: a handler of one command id, added to
//! every node that should receive them (ids from `0xFFFF_0000` up are
//! meshwork's own). Broadcasts and publications are best effort: they go
//! to the peers connected when they are sent, and fail with
//! [`ConcernsError::NoNeighbours`]
//! when there are none.
//!
//! ```
//! use std::time::Duration;
//! use meshwork::concerns::{BoxError, Bytes, Concern, Context, Reply, async_trait};
//! use meshwork::{Node, NodeId, transport::mem::MemNetwork};
//! use tokio::sync::mpsc;
//!
//! /// Hands every message for command 0x100 to a channel.
//! struct Inbox(mpsc::Sender<Bytes>);
//!
//! #[async_trait]
//! impl Concern for Inbox {
//!     fn command(&self) -> u32 {
//!         0x100
//!     }
//!     async fn on_request(
//!         &self,
//!         _ctx: &Context,
//!         _from: &NodeId,
//!         payload: Bytes,
//!     ) -> Result<Option<Reply>, BoxError> {
//!         let _ = self.0.try_send(payload); // a full inbox drops it
//!         Ok(None) // no reply (a request would get Some(Reply::new(..)))
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let net = MemNetwork::new();
//! let (tx, mut inbox) = mpsc::channel(16);
//! let a = Node::builder("example")
//!     .transport(net.transport("a"))
//!     .listen("mem://a".parse()?)
//!     .start()
//!     .await?;
//! let b = Node::builder("example")
//!     .transport(net.transport("b"))
//!     .listen("mem://b".parse()?)
//!     .seed("mem://a".parse()?)
//!     .concern(Inbox(tx))
//!     .start()
//!     .await?;
//! // The sender must count the link itself (b may see it first).
//! a.wait_for_peers(1, Duration::from_secs(5)).await?;
//!
//! let mut news = b.concerns().subscribe("news")?;
//! a.concerns().context(0x100).broadcast("to every node", 16).await?;
//! a.concerns().publish("news", "to subscribers")?;
//! let wait = Duration::from_secs(5);
//! assert_eq!(tokio::time::timeout(wait, inbox.recv()).await?, Some("to every node".into()));
//! let got = tokio::time::timeout(wait, news.recv()).await?.expect("subscribed");
//! assert_eq!((got.origin, got.payload), (a.node_id().clone(), "to subscribers".into()));
//! for node in [a, b] {
//!     node.shutdown().await;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Services are called the same way from any node; one served elsewhere a
//! moment ago is listed once its registry entry arrives
//! ([`Rpc::wait_for_provider`](rpc::Rpc::wait_for_provider)).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use meshwork_concerns::{Concern, ConcernStats, Concerns, ConcernsConfig, ConcernsError, Route};
use meshwork_peers::{PeerManager, PeerSnapshot, PeersConfig, PeersError, PoolStats, SeedSnapshot};
use meshwork_rpc::{CallStats, Rpc, RpcConfig, RpcError, ServedStats};
use meshwork_sync::{SyncConfig, SyncError, SyncMap, SyncStats};
use meshwork_transport::{
    Config, Direction, Endpoint, EndpointStats, TcpTransport, Transport, TransportError,
};
use tokio::time::Instant;
use tracing::info;

/// A guide for users: nodes, messages, the replicated map and services,
/// each with a complete example (the text of `docs/guide.md`, whose
/// examples run as this crate's doc tests).
#[doc = include_str!("../../../docs/guide.md")]
pub mod guide {}

pub use meshwork_concerns as concerns;
pub use meshwork_peers as peers;
pub use meshwork_rpc as rpc;
pub use meshwork_rpc::service;
pub use meshwork_sync as sync;
pub use meshwork_transport as transport;
pub use meshwork_wire as wire;

/// The types nearly every application names, here as well as in their
/// layers: a node's id (what a concern's `from` is, what `send_to` takes),
/// an address to listen on or seed with, and an identity to keep a node's
/// id across restarts.
pub use meshwork_transport::{Address, Identity};
pub use meshwork_wire::NodeId;

/// Errors of the facade.
///
/// Every error of a layer converts into it with `?`, including a failed
/// call of any typed client (`RpcError<E>`, whatever the method's error
/// `E`): the method's own error becomes [`Application`](Error::Application),
/// as text.
///
/// ```
/// use meshwork::{Node, service, transport::mem::MemNetwork};
///
/// #[service]
/// trait Calc {
///     async fn div(&self, a: i64, b: i64) -> Result<i64, String>;
/// }
///
/// struct Imp;
///
/// impl Calc for Imp {
///     async fn div(&self, a: i64, b: i64) -> Result<i64, String> {
///         a.checked_div(b).ok_or_else(|| "division by zero".to_string())
///     }
/// }
///
/// /// `?` on the call's `Result<i64, RpcError<String>>`.
/// async fn halve_and_divide(calc: &CalcClient, a: i64, b: i64) -> meshwork::Result<i64> {
///     let half = calc.div(a, 2).await?;
///     Ok(calc.div(half, b).await?)
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> meshwork::Result<()> {
/// let net = MemNetwork::new();
/// let node = Node::builder("example")
///     .transport(net.transport("a"))
///     .listen("mem://a".parse()?)
///     .start()
///     .await?;
/// node.rpc().serve("calc", CalcServer::new(Imp)).await?;
/// let calc: CalcClient = node.rpc().client("calc");
/// assert_eq!(halve_and_divide(&calc, 84, 7).await?, 6);
/// let e = halve_and_divide(&calc, 84, 0).await.unwrap_err();
/// assert!(matches!(&e, meshwork::Error::Application(m) if m.contains("division by zero")));
/// assert_eq!(e.to_string(), r#"application error: "division by zero""#);
/// node.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The transport layer failed (bad address, dial failure, ...).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A listener could not be started on `addr`, for the reason `cause`.
    /// The message includes the reason (not kept as `source()` as well, so
    /// that a report of the whole chain, such as anyhow's `{:#}`, names it
    /// once).
    #[error("cannot listen on {addr}: {cause}")]
    Listen {
        /// The address that was asked for.
        addr: Address,
        /// Why it failed.
        cause: TransportError,
    },
    /// The peer manager refused its settings, or failed.
    #[error(transparent)]
    Peers(#[from] PeersError),
    /// The concerns layer refused (e.g. two concerns for one command id).
    #[error(transparent)]
    Concerns(#[from] ConcernsError),
    /// The sync layer refused its settings, or failed.
    #[error(transparent)]
    Sync(#[from] SyncError),
    /// The RPC layer failed: to start, or a call failed (any way but with
    /// the method's own error, which is [`Application`](Error::Application)).
    #[error(transparent)]
    Rpc(RpcError),
    /// A called method's own error
    /// ([`RpcError::Application`]), as its
    /// `Debug` text (its type is the method's), e.g. `"\"division by
    /// zero\""` for a `String`. The message is `RpcError`'s own:
    /// `application error: ...`.
    #[error("application error: {0}")]
    Application(String),
    /// A wait ran out of time: how long, what for, and what the node
    /// knew when it gave up, briefly (empty if nothing; for
    /// [`Node::wait_for_peers`], the peers linked, the seeds' last dial
    /// errors and the failed handshakes by cause). All three are in the
    /// message.
    #[error("timed out after {after:?} waiting for {what}{detail}", after = .0, what = .1, detail = detail(.2))]
    Timeout(Duration, &'static str, String),
}

/// `": detail"`, or nothing for no detail.
fn detail(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

/// A result with the facade's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Any call's error: the method's own error (`E`) as
/// [`Application`](Error::Application), any other as [`Rpc`](Error::Rpc).
impl<E: std::fmt::Debug> From<RpcError<E>> for Error {
    fn from(e: RpcError<E>) -> Self {
        match e.split_app() {
            Ok(other) => Error::Rpc(other),
            Err(app) => Error::Application(format!("{app:?}")),
        }
    }
}

/// Builds and starts a [`Node`].
pub struct NodeBuilder {
    config: Config,
    listen: Vec<Address>,
    peers: PeersConfig,
    concerns_config: ConcernsConfig,
    concerns: Vec<Arc<dyn Concern>>,
    builtin_concerns: bool,
    sync: SyncConfig,
    rpc: RpcConfig,
    transport: Option<Arc<dyn Transport>>,
}

impl std::fmt::Debug for NodeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeBuilder")
            .field("config", &self.config)
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .field("concerns", &self.concerns.len())
            .finish()
    }
}

impl NodeBuilder {
    fn new(network_id: &str) -> Self {
        NodeBuilder {
            // The peer manager's heartbeats replace the transport keepalive.
            config: Config::new(network_id).with_keepalive(None, None),
            listen: Vec::new(),
            peers: PeersConfig::default(),
            concerns_config: ConcernsConfig::default(),
            concerns: Vec::new(),
            builtin_concerns: true,
            sync: SyncConfig::default(),
            rpc: RpcConfig::default(),
            transport: None,
        }
    }

    /// Adds a concern: a handler for one command id (besides the built-in
    /// flood, routing and topics concerns).
    pub fn concern(mut self, concern: impl Concern) -> Self {
        self.concerns.push(Arc::new(concern));
        self
    }

    /// Uses exactly these concerns, without the built-in ones.
    pub fn only_concerns(mut self, concerns: Vec<Arc<dyn Concern>>) -> Self {
        self.concerns = concerns;
        self.builtin_concerns = false;
        self
    }

    /// Settings of the concerns layer (queues, flood TTL, routing).
    pub fn concerns_config(mut self, config: ConcernsConfig) -> Self {
        self.concerns_config = config;
        self
    }

    /// Settings of the replicated map (leasing on/off, lease time,
    /// anti-entropy interval). Every node of a mesh must use the same
    /// leasing mode; the handshake refuses peers that don't.
    pub fn sync_config(mut self, config: SyncConfig) -> Self {
        self.sync = config;
        self
    }

    /// Settings of the RPC layer (default deadline, registry ttl, retries,
    /// concurrency per service).
    pub fn rpc_config(mut self, config: RpcConfig) -> Self {
        self.rpc = config;
        self
    }

    /// Adds an address to listen on (none: the node only dials out).
    pub fn listen(mut self, addr: Address) -> Self {
        self.listen.push(addr);
        self
    }

    /// Adds a seed: a node dialled at start, and again whenever the pool is
    /// below `min_peers` and the seed is not connected.
    pub fn seed(mut self, addr: Address) -> Self {
        self.peers = self.peers.with_seed(addr);
        self
    }

    /// A seed pinned to its node id: only the node `id` is accepted at `addr`
    /// (see [`PeersConfig::with_seed_id`](peers::PeersConfig::with_seed_id)).
    pub fn seed_id(mut self, addr: Address, id: NodeId) -> Self {
        self.peers = self.peers.with_seed_id(addr, id);
        self
    }

    /// The pool dials known peers while it has fewer than `n` (default 4).
    pub fn min_peers(mut self, n: usize) -> Self {
        self.peers = self.peers.with_min_peers(n);
        self
    }

    /// The pool never holds more than `n` peers (default 16).
    pub fn max_peers(mut self, n: usize) -> Self {
        self.peers = self.peers.with_max_peers(n);
        self
    }

    /// Adjusts the peer manager's settings (heartbeats, backoff, discovery).
    pub fn peers(mut self, f: impl FnOnce(PeersConfig) -> PeersConfig) -> Self {
        self.peers = f(self.peers);
        self
    }

    /// Adds a metadata entry sent to peers in the Hello (peer selection can
    /// filter on it, e.g. a height or a role).
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

    /// Binds the listeners, then starts the peer manager: dialling seeds,
    /// accepting peers, heartbeats and discovery.
    pub async fn start(mut self) -> Result<Node, Error> {
        self.peers.validate()?;
        self.sync.validate()?;
        for (key, value) in self.sync.required_metadata() {
            self.config = self.config.with_required_metadata(key, value);
        }
        let transport = self
            .transport
            .unwrap_or_else(|| Arc::new(TcpTransport::new()));
        let endpoint = Endpoint::with_transport(self.config, transport);
        for addr in &self.listen {
            if let Err(cause) = endpoint.listen(addr).await {
                endpoint.shutdown().await;
                return Err(Error::Listen {
                    addr: addr.clone(),
                    cause,
                });
            }
        }
        let peers = match PeerManager::start(endpoint.clone(), self.peers) {
            Ok(p) => p,
            Err(e) => {
                endpoint.shutdown().await;
                return Err(e.into());
            }
        };
        let mut concerns = Concerns::builder(peers.clone()).config(self.concerns_config);
        if self.builtin_concerns {
            for c in self.concerns {
                concerns = concerns.concern_arc(c);
            }
        } else {
            concerns = concerns.only(self.concerns);
        }
        let concerns = match concerns.start().await {
            Ok(c) => c,
            Err(e) => {
                peers.shutdown().await;
                return Err(e.into());
            }
        };
        let sync = match SyncMap::start(&concerns, self.sync).await {
            Ok(s) => s,
            Err(e) => {
                concerns.shutdown().await;
                peers.shutdown().await;
                return Err(e.into());
            }
        };
        let rpc = match Rpc::start(&concerns, &sync, self.rpc).await {
            Ok(r) => r,
            Err(e) => {
                sync.shutdown().await;
                concerns.shutdown().await;
                peers.shutdown().await;
                return Err(e.into());
            }
        };
        let node = Node {
            inner: Arc::new(NodeInner {
                peers,
                concerns,
                sync,
                rpc,
                started: Instant::now(),
            }),
        };
        let join = |addrs: Vec<Address>| {
            addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (bound, advertised) = (node.endpoint().bound_addrs(), node.listen_addrs());
        if bound == advertised {
            info!(node = %node.node_id(), listen = %join(bound), "node started");
        } else {
            info!(
                node = %node.node_id(),
                listen = %join(bound),
                advertised = %join(advertised),
                "node started"
            );
        }
        Ok(node)
    }
}

struct NodeInner {
    peers: PeerManager,
    concerns: Concerns,
    sync: SyncMap,
    rpc: Rpc,
    started: Instant,
}

/// A running mesh node. Cheap to clone; every clone is the same node.
///
/// Dropping the handles does not stop it: its tasks go on serving the mesh
/// until [`shutdown`](Node::shutdown), which tells its peers and waits for
/// the layers to stop.
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

/// A snapshot of a node, its peers and its connections.
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
    /// Counts of the pool.
    pub pool: PoolStats,
    /// Every known peer with its state and quality, connected ones first.
    pub peers: Vec<PeerSnapshot>,
    /// The seeds, as configured: who answers at each and why dials failed.
    pub seeds: Vec<SeedSnapshot>,
    /// Peers blocked by fault injection.
    pub blocked: Vec<NodeId>,
    /// Every concern with its counters.
    pub concerns: Vec<ConcernStats>,
    /// Nodes reached through other nodes (the routing concern's table).
    pub routes: Vec<Route>,
    /// The replicated map's sizes and counters.
    pub sync: SyncStats,
    /// Services served here, with their counters.
    pub served: Vec<ServedStats>,
    /// Counters of the calls this node made.
    pub calls: CallStats,
    /// Every open transport connection, oldest first (during a duplicate
    /// resolution or a refusal there can briefly be more than peers).
    pub connections: Vec<ConnectionStatus>,
    /// Handshakes and admission: why peers that never connect failed, by
    /// reason (e.g. `crypto` for another network key or security mode,
    /// `wrong_network`, `incompatible_settings`).
    pub handshakes: EndpointStats,
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
        self.inner.peers.node_id()
    }

    /// Where this node accepts connections, as peers are told
    /// ([`Endpoint::listen_addrs`]: the advertised addresses, if any).
    pub fn listen_addrs(&self) -> Vec<Address> {
        self.endpoint().listen_addrs()
    }

    /// The transport endpoint underneath (for the layers above and tools).
    pub fn endpoint(&self) -> &Endpoint {
        self.inner.peers.endpoint()
    }

    /// The peer manager: selection, events, send, fault injection.
    pub fn peers(&self) -> &PeerManager {
        &self.inner.peers
    }

    /// The concerns layer: contexts to send with, topics, routes, stats.
    pub fn concerns(&self) -> &Concerns {
        &self.inner.concerns
    }

    /// The replicated key-value map (see [`sync`]).
    pub fn sync(&self) -> &SyncMap {
        &self.inner.sync
    }

    /// The RPC layer: serve services, get typed clients (see [`rpc`]).
    pub fn rpc(&self) -> &Rpc {
        &self.inner.rpc
    }

    /// A snapshot of this node, its peers and its connections.
    pub fn status(&self) -> NodeStatus {
        let ep = self.endpoint();
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
        let peers = self.peers();
        NodeStatus {
            handshakes: ep.stats(),
            node_id: self.node_id().clone(),
            network_id: ep.config().network_id().to_string(),
            listen: self.listen_addrs(),
            metadata: ep.config().metadata().clone(),
            uptime: self.inner.started.elapsed(),
            pool: peers.stats(),
            peers: peers.peers(),
            seeds: peers.seeds(),
            blocked: peers.blocked(),
            concerns: self.inner.concerns.stats(),
            routes: self.inner.concerns.routes(),
            sync: self.inner.sync.stats(),
            served: self.inner.rpc.served(),
            calls: self.inner.rpc.call_stats(),
            connections,
        }
    }

    /// Waits until at least `n` peers are connected. On
    /// [`Timeout`](Error::Timeout), the message says why none or too few
    /// linked, as far as the node knows: e.g. `timed out after 2s waiting
    /// for peers: 0 of 1 peers linked; seed tcp://127.0.0.1:4000: refused
    /// by peer (WrongNetwork), ... (3 failed dials)` (what
    /// [`status`](Node::status)`().seeds` and `.handshakes` say then).
    pub async fn wait_for_peers(&self, n: usize, timeout: Duration) -> Result<(), Error> {
        self.peers()
            .wait_for_peers(n, timeout)
            .await
            .map_err(|e| match e {
                PeersError::Timeout { after, detail, .. } => Error::Timeout(after, "peers", detail),
                e => Error::Peers(e),
            })
    }

    /// Shuts down: stops dialling and accepting, sends Disconnect(shutdown)
    /// to every peer, and returns when every task has ended.
    pub async fn shutdown(&self) {
        self.inner.rpc.shutdown().await;
        self.inner.sync.shutdown().await;
        self.inner.concerns.shutdown().await;
        self.inner.peers.shutdown().await;
        info!(node = %self.node_id().short(), "node stopped");
    }
}
