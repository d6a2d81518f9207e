use std::time::Duration;

use meshwork_transport::TransportError;
use meshwork_wire::NodeId;

/// Errors of the peer manager.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeersError {
    /// The settings contradict each other.
    #[error("invalid peer manager settings: {0}")]
    Config(String),
    /// No connection to this peer.
    #[error("peer {0} is not connected")]
    NotConnected(NodeId),
    /// The peer is connected but has been silent too long; only heartbeats
    /// are sent to it until it answers again.
    #[error("peer {0} is unresponsive")]
    Unresponsive(NodeId),
    /// The connection refused the message (queue full, closed, too large).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A wait ran out of time.
    #[error("timed out after {after:?} waiting for {what}{}", with_detail(.detail))]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        after: Duration,
        /// What the manager knew when it gave up, briefly (for
        /// [`wait_for_peers`](crate::PeerManager::wait_for_peers): the
        /// peers linked, the seeds' last dial errors, the failed handshakes
        /// by cause); empty if nothing. Part of the message.
        detail: String,
    },
    /// [`PeerManager::take_inbound`](crate::PeerManager::take_inbound) was
    /// already called.
    #[error("the inbound message queue was already taken")]
    InboundTaken,
    /// An events receiver fell behind and missed this many events.
    #[error("missed {0} peer events")]
    Lagged(u64),
    /// The manager is shutting down.
    #[error("the peer manager is shut down")]
    Shutdown,
}

/// `detail` as the end of a message: `": detail"`, or nothing.
fn with_detail(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}
