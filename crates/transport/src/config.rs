//! Endpoint configuration: identity, limits and timeouts.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use meshwork_wire::{DEFAULT_MAX_FRAME_LEN, Limits, NodeId};

use crate::Address;
use crate::identity::{Identity, NetworkKey};

/// How the bytes of a connection are protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Security {
    /// Noise `XXpsk0` with X25519, AES-256-GCM and BLAKE2s: encrypted,
    /// both ends authenticated by their static keys. The default.
    Noise,
    /// No encryption, no authentication: node ids are taken on trust. Only
    /// for tests and debugging; set with [`Config::with_insecure_plaintext`].
    InsecurePlaintext,
}

impl Security {
    /// A short name for logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Security::Noise => "noise",
            Security::InsecurePlaintext => "plaintext",
        }
    }
}

/// How an [`Endpoint`](crate::Endpoint) identifies itself and how patient it is.
///
/// Every limit is on by default; `Option` settings are off when `None`.
///
/// ```
/// use std::time::Duration;
/// use meshwork_transport::Config;
///
/// let config = Config::new("my-mesh")
///     .with_metadata("role", "seed")
///     .with_handshake_timeout(Duration::from_secs(5))
///     .with_keepalive(Some(Duration::from_secs(10)), Some(Duration::from_secs(30)));
/// assert_eq!(config.network_id(), "my-mesh");
/// ```
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) network_id: String,
    pub(crate) identity: Identity,
    pub(crate) security: Security,
    pub(crate) network_key: Option<NetworkKey>,
    pub(crate) allowed_peers: Option<HashSet<NodeId>>,
    pub(crate) metadata: HashMap<String, String>,
    pub(crate) required_metadata: Vec<String>,
    pub(crate) capabilities: u64,
    pub(crate) handshake_timeout: Duration,
    pub(crate) send_timeout: Duration,
    pub(crate) write_timeout: Duration,
    pub(crate) close_timeout: Duration,
    pub(crate) keepalive_interval: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) max_frame_len: usize,
    pub(crate) limits: Limits,
    pub(crate) lane_capacity: [usize; 3],
    pub(crate) inbound_capacity: usize,
    pub(crate) max_queued_bytes: usize,
    pub(crate) max_pending_handshakes: usize,
    pub(crate) max_outstanding_pings: usize,
    pub(crate) advertised: Vec<Address>,
}

impl Config {
    /// Default settings for network `network_id`: encrypted, with a fresh
    /// random identity.
    pub fn new(network_id: impl Into<String>) -> Self {
        Config {
            network_id: network_id.into(),
            identity: Identity::generate(),
            security: Security::Noise,
            network_key: None,
            allowed_peers: None,
            metadata: HashMap::new(),
            required_metadata: Vec::new(),
            capabilities: 0,
            handshake_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(5),
            keepalive_interval: Some(Duration::from_secs(15)),
            idle_timeout: Some(Duration::from_secs(60)),
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            limits: Limits::default(),
            lane_capacity: [256, 1024, 64],
            inbound_capacity: 1024,
            max_queued_bytes: 32 << 20,
            max_pending_handshakes: 64,
            max_outstanding_pings: 16,
            advertised: Vec::new(),
        }
    }

    /// Uses `identity` (e.g. loaded from a key file) instead of a fresh one.
    /// The node id is its public key.
    pub fn with_identity(mut self, identity: Identity) -> Self {
        self.identity = identity;
        self
    }

    /// Requires every peer to hold the same network key: nodes without it
    /// cannot complete the handshake. Combined with the network id check.
    pub fn with_network_key(mut self, key: NetworkKey) -> Self {
        self.network_key = Some(key);
        self
    }

    /// Only these nodes may connect, in either direction; anyone else is
    /// refused with Disconnect(not allowed) right after authentication.
    pub fn with_allowed_peers(mut self, peers: impl IntoIterator<Item = NodeId>) -> Self {
        self.allowed_peers = Some(peers.into_iter().collect());
        self
    }

    /// Turns encryption and authentication OFF. Anyone can read and forge
    /// traffic and claim any node id. For tests and debugging only; both ends
    /// must agree, an encrypted node refuses a plaintext one.
    pub fn with_insecure_plaintext(mut self) -> Self {
        self.security = Security::InsecurePlaintext;
        self
    }

    /// Adds a metadata entry sent in the Hello that every peer must send
    /// with the same value: a peer that sends another value, or none, is
    /// refused with `Disconnect(INCOMPATIBLE_SETTINGS)` (and refuses us the
    /// same way). For settings that must agree across a mesh, such as the
    /// sync layer's leasing mode.
    pub fn with_required_metadata(
        mut self,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        let key = key.into();
        self.metadata.insert(key.clone(), value.into());
        if !self.required_metadata.contains(&key) {
            self.required_metadata.push(key);
        }
        self
    }

    /// Advertises `addr` to peers (in the Hello, and so in their gossip)
    /// instead of the addresses the endpoint's listeners are bound to; call
    /// it once per address. For a node that peers must dial at another
    /// address than the one it binds: listening on `0.0.0.0` (advertised
    /// otherwise as the IP the host name resolves to, often a loopback one),
    /// behind a port forward, or by a DNS name.
    pub fn with_advertised_addr(mut self, addr: Address) -> Self {
        if !self.advertised.contains(&addr) {
            self.advertised.push(addr);
        }
        self
    }

    /// Adds a metadata entry sent in the Hello (e.g. a role or a height).
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets the capability bits sent in the Hello.
    pub fn with_capabilities(mut self, bits: u64) -> Self {
        self.capabilities = bits;
        self
    }

    /// Time allowed from an open stream to a checked Hello (default 10 s).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Time [`ConnectionHandle::send`](crate::ConnectionHandle::send) waits for
    /// room in a full lane before failing (default 10 s).
    pub fn with_send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = timeout;
        self
    }

    /// Time a socket may refuse to take bytes before the connection is
    /// considered stalled and closed (default 30 s).
    pub fn with_write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// Time a graceful close may take (flush, Disconnect, wait for the peer)
    /// before the connection is dropped (default 5 s).
    pub fn with_close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// Keepalive: send a Ping after `interval` without outgoing traffic, and
    /// close the connection after `idle_timeout` without incoming traffic.
    /// Defaults: 15 s and 60 s. `None` turns either off (the peer manager
    /// may run its own heartbeats instead).
    pub fn with_keepalive(
        mut self,
        interval: Option<Duration>,
        idle_timeout: Option<Duration>,
    ) -> Self {
        self.keepalive_interval = interval;
        self.idle_timeout = idle_timeout;
        self
    }

    /// Largest frame sent or accepted (default 16 MiB). Larger incoming
    /// frames close the connection as a protocol error before any buffering.
    /// Values above `u32::MAX` (what the length prefix can express) are clamped.
    pub fn with_max_frame_len(mut self, max: usize) -> Self {
        self.max_frame_len = max.min(meshwork_wire::MAX_FRAME_LEN_LIMIT);
        self
    }

    /// Bounds on decoded message fields.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Queue capacity, in frames, of the control, normal and bulk lanes
    /// (default 256, 1024, 64). Each is at least 1.
    pub fn with_lane_capacity(mut self, control: usize, normal: usize, bulk: usize) -> Self {
        self.lane_capacity = [control.max(1), normal.max(1), bulk.max(1)];
        self
    }

    /// Received frames buffered per connection before the reader stops
    /// reading from the socket (default 1024, at least 1).
    pub fn with_inbound_capacity(mut self, frames: usize) -> Self {
        self.inbound_capacity = frames.max(1);
        self
    }

    /// Bytes of large messages (4 KiB or more) a connection's send lanes
    /// hold at most (default 32 MiB; one such message is always taken when
    /// none is queued). Past it `send` waits, like for a full lane, and
    /// `try_send` gives [`TransportError::QueueFull`](crate::TransportError::QueueFull): a peer that reads
    /// slowly while asking for large answers holds this much memory at
    /// most, not the lanes' lengths times the frame limit.
    pub fn with_max_queued_bytes(mut self, bytes: usize) -> Self {
        self.max_queued_bytes = bytes;
        self
    }

    /// Incoming connections allowed in the handshake at once (default 64, at
    /// least 1). When all are taken, a newcomer evicts the oldest pending
    /// handshake of a host holding more of them than the newcomer's host,
    /// or else one pending for half the handshake timeout; if neither
    /// exists it is closed right after accept.
    pub fn with_max_pending_handshakes(mut self, n: usize) -> Self {
        self.max_pending_handshakes = n.max(1);
        self
    }

    /// The network id.
    pub fn network_id(&self) -> &str {
        &self.network_id
    }

    /// The node id (the identity's public key).
    pub fn node_id(&self) -> &NodeId {
        self.identity.node_id()
    }

    /// The node's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// How connections are protected.
    pub fn security(&self) -> Security {
        self.security
    }

    /// The metadata sent in the Hello.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The largest frame sent or accepted.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Time allowed from an open stream to a checked Hello
    /// ([`with_handshake_timeout`](Self::with_handshake_timeout)).
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }
}
