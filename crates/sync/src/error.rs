use std::time::Duration;

use bytes::Bytes;
use meshwork_concerns::ConcernsError;
use meshwork_concerns::wire::NodeId;

/// Errors of the sync layer.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// Another node holds a live lease on the key (py2p's `KeyError`).
    #[error("key {} is leased to {} until {} (unix ms {until_ms})", show(key), owner.short(), utc(*until_ms))]
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

/// `ms` since the Unix epoch as an RFC 3339 UTC time, to the second.
fn utc(ms: u64) -> String {
    // humantime formats up to the end of the year 9999 (and fails past it);
    // a peer may stamp anything.
    const YEAR_10000_MS: u64 = 253_402_300_800_000;
    if ms >= YEAR_10000_MS {
        return "after the year 9999".into();
    }
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_times_read_as_utc_whatever_the_stamp() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_796_350_726_376), "2026-12-04T02:18:46Z");
        assert_eq!(utc(253_402_300_799_999), "9999-12-31T23:59:59Z");
        assert_eq!(utc(253_402_300_800_000), "after the year 9999");
        assert_eq!(utc(u64::MAX), "after the year 9999");
        let e = SyncError::LeaseHeld {
            key: Bytes::from_static(b"k"),
            owner: NodeId::from_bytes(vec![0xab; 32]).unwrap(),
            until_ms: 1_796_350_726_376,
        };
        let text = e.to_string();
        assert!(
            text.ends_with("until 2026-12-04T02:18:46Z (unix ms 1796350726376)"),
            "{text}"
        );
    }
}
