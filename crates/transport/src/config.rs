//! Endpoint configuration: identity, limits and timeouts.

use std::collections::HashMap;
use std::time::Duration;

use meshwork_wire::{DEFAULT_MAX_FRAME_LEN, Limits, NodeId};

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
    pub(crate) node_id: NodeId,
    pub(crate) metadata: HashMap<String, String>,
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
    pub(crate) max_pending_handshakes: usize,
    pub(crate) max_outstanding_pings: usize,
}

impl Config {
    /// Default settings for network `network_id`, with a fresh random node id.
    pub fn new(network_id: impl Into<String>) -> Self {
        Config {
            network_id: network_id.into(),
            node_id: random_node_id(),
            metadata: HashMap::new(),
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
            max_pending_handshakes: 64,
            max_outstanding_pings: 16,
        }
    }

    /// Uses `node_id` instead of a random one.
    pub fn with_node_id(mut self, node_id: NodeId) -> Self {
        self.node_id = node_id;
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
        self.max_frame_len = max.min(u32::MAX as usize);
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

    /// Incoming connections allowed in the handshake at once; more are
    /// closed right after accept (default 64, at least 1).
    pub fn with_max_pending_handshakes(mut self, n: usize) -> Self {
        self.max_pending_handshakes = n.max(1);
        self
    }

    /// The network id.
    pub fn network_id(&self) -> &str {
        &self.network_id
    }

    /// The node id.
    pub fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    /// The metadata sent in the Hello.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The largest frame sent or accepted.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }
}

/// A fresh random 32-byte node id.
pub fn random_node_id() -> NodeId {
    let bytes: [u8; 32] = rand::random();
    // 32 bytes is within the 1..=64 the protocol allows.
    NodeId::from_bytes(bytes.to_vec()).unwrap_or_else(|_| unreachable!("32-byte id is valid"))
}
