use std::io;
use std::time::Duration;

use meshwork_wire::WireError;
use meshwork_wire::proto::DisconnectReason;

/// Everything the transport layer can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// An address string could not be parsed.
    #[error("invalid address {input:?}: {reason}")]
    InvalidAddress {
        /// The text that was given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The transport does not handle this kind of address (e.g. `mem://` on TCP).
    #[error("address {0} is not supported by this transport")]
    UnsupportedAddress(String),
    /// A host name resolved to no address.
    #[error("could not resolve {host}: {reason}")]
    Resolve {
        /// The host name.
        host: String,
        /// Why resolution failed.
        reason: String,
    },
    /// An operating-system or in-memory I/O error.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// A frame could not be encoded or decoded.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// An operation did not finish in time.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What was being waited for.
        what: &'static str,
        /// The timeout that elapsed.
        after: Duration,
    },
    /// The connection is closed (or closing); nothing more can be sent or received.
    #[error("not connected")]
    NotConnected,
    /// The remote side refused the handshake with a Disconnect.
    #[error("refused by peer ({reason:?}): {message}")]
    Refused {
        /// The reason the peer gave.
        reason: DisconnectReason,
        /// The peer's explanation.
        message: String,
    },
    /// The remote Hello named another network id; we refused it.
    #[error("peer is on network {theirs:?}, we are on {ours:?}")]
    WrongNetwork {
        /// Our network id.
        ours: String,
        /// The peer's network id.
        theirs: String,
    },
    /// The remote Hello named a protocol version we do not speak; we refused it.
    #[error("peer speaks protocol version {theirs}, we speak {ours}")]
    IncompatibleVersion {
        /// Our protocol version.
        ours: u32,
        /// The peer's protocol version.
        theirs: u32,
    },
    /// The remote node has our own node id: we dialled ourselves.
    #[error("connection to self")]
    SelfConnection,
    /// The peer broke the protocol (e.g. did not start with a Hello).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The endpoint is shutting down or has shut down.
    #[error("endpoint is shut down")]
    Shutdown,
    /// A bounded queue is full (e.g. too many pings outstanding).
    #[error("{0} queue is full")]
    QueueFull(&'static str),
}

impl TransportError {
    /// The Disconnect reason we send when we refuse a handshake with this error.
    pub(crate) fn disconnect_reason(&self) -> DisconnectReason {
        match self {
            TransportError::WrongNetwork { .. } => DisconnectReason::WrongNetwork,
            TransportError::IncompatibleVersion { .. } => DisconnectReason::IncompatibleVersion,
            TransportError::SelfConnection => DisconnectReason::SelfConnection,
            TransportError::Timeout { .. } => DisconnectReason::Timeout,
            TransportError::Shutdown => DisconnectReason::Shutdown,
            TransportError::Wire(_) | TransportError::Protocol(_) => {
                DisconnectReason::ProtocolError
            }
            _ => DisconnectReason::Other,
        }
    }
}
