use std::time::Duration;

use bytes::Bytes;
use meshwork_concerns::ConcernsError;
use meshwork_concerns::wire::NodeId;

/// Errors of the sync layer.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// Another node holds a live lease on the key (py2p's `KeyError`).
    #[error("key {} is leased to {} until {until_ms} ms", show(key), owner.short())]
    LeaseHeld {
        /// The key.
        key: Bytes,
        /// The lease owner.
        owner: NodeId,
        /// When the lease lapses, in ms since the Unix epoch.
        until_ms: u64,
    },
    /// The key holds no value.
    #[error("key {} not found", show(.0))]
    NotFound(Bytes),
    /// A key or value is empty or over the configured limit.
    #[error("{0}")]
    TooLarge(String),
    /// The replica is at its byte budget (`SyncConfig::with_max_bytes`):
    /// a new key or a larger value does not fit until others are deleted.
    #[error("the replica is full: {} does not fit in its {limit} bytes", show(key))]
    Full {
        /// The key.
        key: Bytes,
        /// The budget, in bytes.
        limit: usize,
    },
    /// Not every peer confirmed a write in time.
    #[error("{} of {} peers did not confirm within {after:?}", missing.len(), peers)]
    NotConfirmed {
        /// Peers asked.
        peers: usize,
        /// Peers that did not confirm.
        missing: Vec<NodeId>,
        /// The timeout.
        after: Duration,
    },
    /// A watcher fell behind and missed this many changes.
    #[error("watcher lagged behind by {0} changes")]
    Lagged(u64),
    /// The sync layer is shut down.
    #[error("the sync layer is shut down")]
    Shutdown,
    /// The concerns layer refused (e.g. the sync command id is taken).
    #[error(transparent)]
    Concerns(#[from] ConcernsError),
    /// The settings are contradictory.
    #[error("invalid sync settings: {0}")]
    Config(String),
}

fn show(key: &Bytes) -> String {
    match std::str::from_utf8(key) {
        Ok(s) => format!("{s:?}"),
        Err(_) => format!(
            "0x{}",
            key.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    }
}
