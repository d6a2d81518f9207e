//! What the layer above sees: peer states, events and snapshots.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use meshwork_transport::{Address, CloseReason, Direction};
use meshwork_wire::NodeId;

/// Where a peer is in its life cycle.
///
/// ```text
///  Known ──dial──► Connecting ──ok──► Connected ◄──traffic──► Unresponsive
///    ▲                 │                  │                        │
///    └──── backoff ◄── Disconnected ◄─────┴──── close / dead ──────┘
///                           (ban at any point ──► Banned ──expiry──► Known)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerState {
    /// In the address book, not connected.
    Known,
    /// A dial is in flight.
    Connecting,
    /// Connected and heard from recently.
    Connected,
    /// Connected but silent past the unresponsive threshold: only heartbeats
    /// are sent to it.
    Unresponsive,
    /// The connection ended; the peer may be dialled again after a backoff.
    Disconnected,
    /// Refused until the ban expires.
    Banned,
}

impl PeerState {
    /// Lower-case name, as shown in the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Known => "known",
            PeerState::Connecting => "connecting",
            PeerState::Connected => "connected",
            PeerState::Unresponsive => "unresponsive",
            PeerState::Disconnected => "disconnected",
            PeerState::Banned => "banned",
        }
    }

    /// Connected or Unresponsive: a live connection exists.
    pub fn is_linked(self) -> bool {
        matches!(self, PeerState::Connected | PeerState::Unresponsive)
    }
}

impl fmt::Display for PeerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happened to a peer. Every state change is a
/// [`StateChanged`](PeerEvent::StateChanged); `Connected` and `Disconnected`
/// add the details.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum PeerEvent {
    /// A peer joined the pool.
    Connected {
        /// Who.
        peer: NodeId,
        /// Who dialled.
        direction: Direction,
        /// The other end of the stream.
        addr: Address,
    },
    /// A peer left the pool.
    Disconnected {
        /// Who.
        peer: NodeId,
        /// Why the connection ended.
        reason: CloseReason,
    },
    /// A peer moved from one state to another.
    StateChanged {
        /// Who.
        peer: NodeId,
        /// Before.
        from: PeerState,
        /// After.
        to: PeerState,
    },
    /// A node we did not know was announced by a peer.
    Discovered {
        /// The new node.
        peer: NodeId,
        /// Where it listens.
        addrs: Vec<Address>,
    },
}

/// A concern message from a peer, for the layer above.
#[derive(Debug, Clone, PartialEq)]
pub struct Inbound {
    /// The sender (a direct neighbour).
    pub from: NodeId,
    /// The message.
    pub message: meshwork_wire::proto::Concern,
}

/// One peer as the manager sees it at a moment.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSnapshot {
    /// The peer's node id.
    pub node_id: NodeId,
    /// Its state.
    pub state: PeerState,
    /// Who dialled, while connected.
    pub direction: Option<Direction>,
    /// Where it says it listens.
    pub addrs: Vec<Address>,
    /// The other end of the current stream, while connected.
    pub remote_addr: Option<Address>,
    /// The metadata from its Hello (empty until connected once).
    pub metadata: HashMap<String, String>,
    /// The latest heartbeat round trip; before the first, the round trip
    /// the transport measured in the handshake (a peer has one as soon as
    /// it is linked, except a peer that dialled this node in plaintext).
    pub rtt: Option<Duration>,
    /// Smoothed round trip (EWMA, 1/8 weight per sample).
    pub smoothed_rtt: Option<Duration>,
    /// Errors reported against it.
    pub errors: u32,
    /// Timeouts reported against it.
    pub timeouts: u32,
    /// Quality in `(0, 1]`, higher is better; 0 when not connected.
    pub score: f64,
    /// How long the current connection has lasted.
    pub connected_for: Option<Duration>,
    /// Time since anything arrived from it, while connected.
    pub idle_for: Option<Duration>,
    /// Dials that failed in a row.
    pub dial_failures: u32,
    /// While connected, the peer's own count of its peers and the count it
    /// wants (its `min_peers`), as it last told them (its Hello, then each
    /// Pong); `None` from a node that does not send them.
    pub peer_count: Option<meshwork_wire::proto::PeerCount>,
}

/// One seed as the manager sees it at a moment: whether it answers, and
/// why not (what an operator whose node does not join looks at first).
#[derive(Debug, Clone, PartialEq)]
pub struct SeedSnapshot {
    /// The seed's address, as configured.
    pub addr: Address,
    /// The node that answered there last, if any did.
    pub node_id: Option<NodeId>,
    /// Whether that node is connected now.
    pub connected: bool,
    /// Dials of this address that failed in a row.
    pub failures: u32,
    /// Why the last failed dial failed.
    pub last_error: Option<String>,
    /// When it is dialled next, if it is due for a dial (not connected, no
    /// dial in flight): from now.
    pub next_dial_in: Option<Duration>,
}
