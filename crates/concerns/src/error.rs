use std::time::Duration;

use meshwork_peers::PeersError;
use meshwork_peers::wire::NodeId;
use meshwork_peers::wire::proto::ErrorCode;

/// What a handler may fail with: any error, boxed. The caller receives its
/// text in a [`ConcernsError::Remote`] with [`ErrorCode::HandlerFailed`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of the concerns layer.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ConcernsError {
    /// A concern for this command id is already registered.
    #[error("command {0:#x} already has a concern")]
    DuplicateCommand(u32),
    /// The peer is not a connected neighbour.
    #[error("peer {0} is not connected")]
    NotConnected(NodeId),
    /// The peer is connected but silent; only heartbeats go to it.
    #[error("peer {0} is unresponsive")]
    Unresponsive(NodeId),
    /// No route to this node was found: the message was not sent.
    #[error("no route to {0}")]
    Unreachable(NodeId),
    /// A routed request was sent, and a node on its way answered that it
    /// had no route on to this node. The request may still have arrived: an
    /// honest node says so when a route broke, but any node on the way can
    /// say it of a request it passed on, so the request is not known to be
    /// undelivered (retry only what is safe to run twice).
    #[error("a node on the way to {0} had no route on")]
    RouteLost(NodeId),
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The other side answered with an error.
    #[error("remote error ({code:?}): {message}")]
    Remote {
        /// What kind of failure.
        code: ErrorCode,
        /// The remote's description.
        message: String,
    },
    /// The request was sent, but the neighbour it went to disconnected
    /// before answering: it may or may not have been handled.
    #[error("{0} disconnected before answering")]
    ConnectionLost(NodeId),
    /// A local queue was full; the message was not sent.
    #[error("dropped: {0}")]
    Dropped(String),
    /// A message could not be decoded.
    #[error("undecodable message: {0}")]
    Decode(String),
    /// The built-in concern this needs (flood, routing, topics) is not
    /// installed.
    #[error("the {0} concern is not installed")]
    NotInstalled(&'static str),
    /// The peer manager refused.
    #[error("{0}")]
    Peers(String),
    /// The concerns layer is shut down.
    #[error("the concerns layer is shut down")]
    Shutdown,
    /// A broadcast or publication found no neighbour to take it: this node
    /// has no connected peer now, or every one's queue was full (a peer that
    /// stopped reading), so it reached nobody.
    #[error(
        "no neighbour took the message (none is connected, or every one's queue is full): it reached nobody"
    )]
    NoNeighbours,
    /// A payload larger than any message a peer takes: nothing was sent.
    /// The bound is the transport's largest frame less room for the
    /// envelopes of routed and flooded messages
    /// ([`Concerns::max_payload`](crate::Concerns::max_payload)).
    #[error("a payload of {len} bytes is larger than the largest a message carries ({max} bytes)")]
    PayloadTooLarge {
        /// The payload's length.
        len: usize,
        /// The largest payload.
        max: usize,
    },
    /// An argument the call cannot take (an empty topic, a TTL of 0, a
    /// command id reserved for the built-in concerns).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl From<PeersError> for ConcernsError {
    fn from(e: PeersError) -> Self {
        match e {
            PeersError::NotConnected(id) => ConcernsError::NotConnected(id),
            PeersError::Unresponsive(id) => ConcernsError::Unresponsive(id),
            PeersError::Shutdown => ConcernsError::Shutdown,
            PeersError::Transport(t) => ConcernsError::Dropped(t.to_string()),
            other => ConcernsError::Peers(other.to_string()),
        }
    }
}

impl ConcernsError {
    /// True for failures to hand the message over at all (the peer is gone,
    /// unresponsive or unreachable), as opposed to queues being full.
    pub(crate) fn is_send_failure(&self) -> bool {
        matches!(
            self,
            ConcernsError::NotConnected(_)
                | ConcernsError::Unresponsive(_)
                | ConcernsError::Unreachable(_)
                | ConcernsError::RouteLost(_)
                | ConcernsError::Shutdown
        )
    }
}
