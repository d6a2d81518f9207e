use std::io;
use std::time::Duration;

use meshwork_wire::proto::{Disconnect, DisconnectReason, PeerInfo};
use meshwork_wire::{NodeId, WireError};

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
    #[error("refused by peer ({reason:?}), which says: {message}")]
    Refused {
        /// The reason the peer gave.
        reason: DisconnectReason,
        /// The peer's explanation.
        message: String,
        /// Other nodes the peer suggests instead (a full node's refusal
        /// names some of its own peers).
        alternatives: Vec<PeerInfo>,
    },
    /// This node's [`Gate`](crate::Gate) declined an incoming peer during
    /// the handshake; the peer was sent this Disconnect.
    #[error("declined ({:?}): {}", .0.reason_or_unspecified(), .0.message)]
    Declined(Box<Disconnect>),
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
    /// The remote Hello carried another value for a metadata entry that
    /// must match ours ([`Config::with_required_metadata`]); we refused it.
    ///
    /// [`Config::with_required_metadata`]: crate::Config::with_required_metadata
    #[error(
        "peer has {key}={}, we require {key}={ours} (every node of a mesh must agree)",
        .theirs.as_deref().unwrap_or("(unset)")
    )]
    IncompatibleSettings {
        /// The metadata key.
        key: String,
        /// Our value.
        ours: String,
        /// The peer's value (`None`: it sent none).
        theirs: Option<String>,
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
    /// The Noise handshake or decryption failed: another network key,
    /// another network, a forged key, or not a meshwork node.
    #[error("encryption handshake failed: {0}")]
    Crypto(String),
    /// The peer wants another security mode (e.g. plaintext against encrypted).
    #[error("peer uses security mode {theirs}, we use {ours}")]
    SecurityMismatch {
        /// Our mode.
        ours: &'static str,
        /// The peer's mode, as announced.
        theirs: String,
    },
    /// The stream did not start with the meshwork preamble.
    #[error("peer is not a meshwork node (bad preamble)")]
    NotMeshwork,
    /// The node id in the peer's Hello is not the key it authenticated with.
    #[error("peer claims node id {claimed:?} but authenticated as {authenticated:?}")]
    IdentityMismatch {
        /// The id in the Hello.
        claimed: NodeId,
        /// The id of the key proven in the Noise handshake.
        authenticated: NodeId,
    },
    /// The node answering a dial-by-id
    /// ([`Endpoint::connect_to`](crate::Endpoint::connect_to)) is not the one
    /// expected; we refused it.
    #[error("expected node {expected} at that address, found {found}")]
    UnexpectedPeer {
        /// The id the dial asked for.
        expected: NodeId,
        /// The id of the node that answered.
        found: NodeId,
    },
    /// The peer is not on our allow list.
    #[error("peer {0:?} is not on the allow list")]
    NotAllowed(NodeId),
    /// The peer is banned.
    #[error("peer {0:?} is banned")]
    Banned(NodeId),
    /// A key file could not be used. Nothing was overwritten.
    #[error("key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A signature (see [`verify`](crate::verify)) does not hold: the
    /// message was altered, or the claimed signer did not sign it.
    #[error("bad signature: {0}")]
    BadSignature(String),
}

impl TransportError {
    /// The text of the Disconnect we send when we refuse a handshake with
    /// this error: addressed to the peer, so that its log reads right
    /// ("refused by peer ..., which says: you are on network ...").
    pub(crate) fn to_peer(&self) -> String {
        match self {
            TransportError::WrongNetwork { ours, theirs } => {
                format!("you are on network {theirs:?}, we are on {ours:?}")
            }
            TransportError::IncompatibleVersion { ours, theirs } => {
                format!("you speak protocol version {theirs}, we speak {ours}")
            }
            TransportError::IncompatibleSettings { key, ours, theirs } => format!(
                "you have {key}={}, we require {key}={ours} (every node of a mesh must agree)",
                theirs.as_deref().unwrap_or("(unset)")
            ),
            TransportError::SecurityMismatch { ours, theirs } => {
                format!("you use security mode {theirs}, we use {ours}")
            }
            TransportError::IdentityMismatch {
                claimed,
                authenticated,
            } => format!("you claim node id {claimed:?} but authenticated as {authenticated:?}"),
            TransportError::UnexpectedPeer { expected, found } => {
                format!("we expected node {expected} at this address, not {found}")
            }
            TransportError::NotAllowed(_) => "you are not on our allow list".to_string(),
            TransportError::Banned(_) => "you are banned here".to_string(),
            other => other.to_string(),
        }
    }

    /// The Disconnect reason we send when we refuse a handshake with this error.
    pub(crate) fn disconnect_reason(&self) -> DisconnectReason {
        match self {
            TransportError::WrongNetwork { .. } => DisconnectReason::WrongNetwork,
            TransportError::IncompatibleVersion { .. } => DisconnectReason::IncompatibleVersion,
            TransportError::IncompatibleSettings { .. } => DisconnectReason::IncompatibleSettings,
            TransportError::SelfConnection => DisconnectReason::SelfConnection,
            TransportError::Timeout { .. } => DisconnectReason::Timeout,
            TransportError::Shutdown => DisconnectReason::Shutdown,
            TransportError::Wire(_)
            | TransportError::Protocol(_)
            | TransportError::IdentityMismatch { .. } => DisconnectReason::ProtocolError,
            TransportError::NotAllowed(_) | TransportError::UnexpectedPeer { .. } => {
                DisconnectReason::NotAllowed
            }
            TransportError::Banned(_) => DisconnectReason::Banned,
            TransportError::Declined(d) => d.reason_or_unspecified(),
            _ => DisconnectReason::Other,
        }
    }

    /// A short stable label for metrics, e.g. `"wrong_network"`.
    pub fn label(&self) -> &'static str {
        match self {
            TransportError::InvalidAddress { .. } => "invalid_address",
            TransportError::UnsupportedAddress(_) => "unsupported_address",
            TransportError::Resolve { .. } => "resolve",
            TransportError::Io(_) => "io",
            TransportError::Wire(_) => "bad_frame",
            TransportError::Timeout { .. } => "timeout",
            TransportError::NotConnected => "not_connected",
            TransportError::Refused { .. } => "refused_by_peer",
            TransportError::Declined(_) => "declined",
            TransportError::WrongNetwork { .. } => "wrong_network",
            TransportError::IncompatibleVersion { .. } => "incompatible_version",
            TransportError::IncompatibleSettings { .. } => "incompatible_settings",
            TransportError::SelfConnection => "self_connection",
            TransportError::Protocol(_) => "protocol",
            TransportError::Shutdown => "shutdown",
            TransportError::QueueFull(_) => "queue_full",
            TransportError::Crypto(_) => "crypto",
            TransportError::SecurityMismatch { .. } => "security_mismatch",
            TransportError::NotMeshwork => "not_meshwork",
            TransportError::IdentityMismatch { .. } => "identity_mismatch",
            TransportError::NotAllowed(_) => "not_allowed",
            TransportError::UnexpectedPeer { .. } => "unexpected_peer",
            TransportError::Banned(_) => "banned",
            TransportError::KeyFile { .. } => "key_file",
            TransportError::BadSignature(_) => "bad_signature",
        }
    }
}
