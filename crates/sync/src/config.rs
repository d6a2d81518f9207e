//! Settings of the sync layer.

use std::sync::Arc;
use std::time::Duration;

use crate::SyncError;
use crate::hlc::{Clock, SystemClock};

/// The Hello metadata key that carries the leasing mode; peers whose mode
/// differs are refused (`INCOMPATIBLE_SETTINGS`).
pub const LEASING_METADATA: &str = "meshwork.sync.leasing";

/// The Hello metadata key that carries `max_clock_skew` in ms; peers whose
/// value differs are refused too. Replicas with different skews collect
/// expiry tombstones at different times, and one refuses as collected what
/// the others still hold: their digests differ until all have collected
/// them (minutes, in the third hostile-peer audit).
pub const CLOCK_SKEW_METADATA: &str = "meshwork.sync.max_clock_skew_ms";

/// Settings of the sync layer, with defaults and chained setters.
///
/// ```
/// use std::time::Duration;
/// use meshwork_sync::SyncConfig;
///
/// let config = SyncConfig::default()
///     .with_lease(Duration::from_secs(60))
///     .with_anti_entropy_interval(Duration::from_secs(1));
/// assert!(config.leasing());
/// assert_eq!(config.hello_metadata(), ("meshwork.sync.leasing", "on"));
/// ```
#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub(crate) leasing: bool,
    pub(crate) lease: Duration,
    pub(crate) tombstone_grace: Duration,
    pub(crate) max_clock_skew: Duration,
    pub(crate) anti_entropy_interval: Duration,
    pub(crate) sweep_interval: Duration,
    pub(crate) max_key_len: usize,
    pub(crate) max_value_len: usize,
    pub(crate) max_bytes: usize,
    pub(crate) push_queue: usize,
    pub(crate) push_batch: usize,
    pub(crate) push_batch_bytes: usize,
    pub(crate) chunk_entries: usize,
    pub(crate) chunk_bytes: usize,
    pub(crate) repair_rate: u64,
    pub(crate) repair_burst: u64,
    pub(crate) request_timeout: Duration,
    pub(crate) round_timeout: Duration,
    pub(crate) watch_capacity: usize,
    pub(crate) max_rounds: usize,
    pub(crate) clock: Arc<dyn Clock>,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            leasing: true,
            lease: Duration::from_secs(3600),
            tombstone_grace: Duration::from_secs(24 * 3600),
            max_clock_skew: Duration::from_secs(60),
            anti_entropy_interval: Duration::from_secs(2),
            sweep_interval: Duration::from_millis(250),
            max_key_len: 1024,
            max_value_len: 1 << 20,
            max_bytes: 256 << 20,
            push_queue: 4096,
            push_batch: 256,
            push_batch_bytes: 64 * 1024,
            chunk_entries: 2048,
            chunk_bytes: 256 * 1024,
            repair_rate: 16 << 20,
            repair_burst: 32 << 20,
            request_timeout: Duration::from_secs(10),
            round_timeout: Duration::from_secs(60),
            watch_capacity: 1024,
            max_rounds: 1,
            clock: Arc::new(SystemClock::new()),
        }
    }
}

impl SyncConfig {
    /// Leasing on (the default) or off. On: a key written by one node cannot
    /// be overwritten by another until the lease lapses. Off: last writer
    /// wins. Every node of a mesh must agree; the handshake refuses peers
    /// that don't.
    pub fn with_leasing(mut self, on: bool) -> Self {
        self.leasing = on;
        self
    }

    /// How long a write holds its key (default 1 hour).
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long tombstones of deletes are kept (default 24 hours). A node
    /// cut off for longer than this can bring a deleted key back; keep it
    /// longer than any partition you expect to heal. Tombstones of expired
    /// ephemeral entries go sooner: one ttl plus twice the clock skew
    /// allowed after the expiry (at most this grace).
    pub fn with_tombstone_grace(mut self, grace: Duration) -> Self {
        self.tombstone_grace = grace;
        self
    }

    /// Writes stamped further ahead of our clock than this are refused
    /// (default 60 s). Tombstones of expired ephemeral entries are kept
    /// their ttl plus twice this.
    pub fn with_max_clock_skew(mut self, skew: Duration) -> Self {
        self.max_clock_skew = skew;
        self
    }

    /// How often a node compares its replica with a random peer (default
    /// 2 s). A node also does so at once with every new peer.
    pub fn with_anti_entropy_interval(mut self, every: Duration) -> Self {
        self.anti_entropy_interval = every;
        self
    }

    /// How often expired ephemeral keys and old tombstones are swept and
    /// this node's ephemeral keys refreshed (default 250 ms).
    pub fn with_sweep_interval(mut self, every: Duration) -> Self {
        self.sweep_interval = every;
        self
    }

    /// Largest key and value, in bytes (default 1 KiB and 1 MiB).
    pub fn with_max_sizes(mut self, key: usize, value: usize) -> Self {
        self.max_key_len = key;
        self.max_value_len = value;
        self
    }

    /// The most a replica holds, in bytes (default 256 MiB): keys and
    /// values, tombstones included, plus about 200 bytes per entry. At the
    /// budget, a local write of a new key or a larger value fails with
    /// [`SyncError::Full`] and such entries from
    /// peers are refused (counted in `SyncStats::refused_full`); updates
    /// that do not grow the replica and deletes go on. So no member can
    /// make every replica grow without bound; the price is that a full
    /// replica stops converging on new keys until room is made.
    pub fn with_max_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// The most a replica holds, in bytes.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// How many bytes of anti-entropy (answers to its pulls, entries pushed
    /// back to it) one peer is sent: a burst of `burst`, then `per_second`
    /// (default 16 MiB/s after 32 MiB). A pull beyond that gets an error,
    /// and the puller's next round resumes; a round stops pushing back.
    /// Pulls of all 256 buckets, 390 bytes each, made a node send one peer
    /// 6 GB in 15 s at 65% of a core.
    pub fn with_repair_rate(mut self, per_second: u64, burst: u64) -> Self {
        self.repair_rate = per_second;
        self.repair_burst = burst;
        self
    }

    /// Timeout of each anti-entropy or confirm request (default 10 s; over
    /// 100 years, up to `Duration::MAX`, counts as 100 years).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout.min(crate::map::FOREVER);
        self
    }

    /// Timeout of a whole anti-entropy round with one peer (default 60 s).
    /// Rounds run one at a time by default, so this bounds how long one
    /// slow or hostile peer can hold up anti-entropy with the others; what
    /// a round merged before it ran out stays, and later rounds carry on.
    pub fn with_round_timeout(mut self, timeout: Duration) -> Self {
        self.round_timeout = timeout;
        self
    }

    /// The physical clock (default: [`SystemClock`]).
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Whether leasing is on.
    pub fn leasing(&self) -> bool {
        self.leasing
    }

    /// How long a write holds its key.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// How often a node compares its replica with a random peer.
    pub fn anti_entropy_interval(&self) -> Duration {
        self.anti_entropy_interval
    }

    /// How long tombstones of deletes are kept.
    pub fn tombstone_grace(&self) -> Duration {
        self.tombstone_grace
    }

    /// How far ahead of our clock a write's stamp may be.
    pub fn max_clock_skew(&self) -> Duration {
        self.max_clock_skew
    }

    /// The Hello metadata entry that must match across the mesh: the
    /// leasing mode. See [`required_metadata`](Self::required_metadata) for
    /// all of them.
    pub fn hello_metadata(&self) -> (&'static str, &'static str) {
        (LEASING_METADATA, if self.leasing { "on" } else { "off" })
    }

    /// Every Hello metadata entry that must match across the mesh: the
    /// leasing mode and the clock skew allowed (what the `meshwork` facade
    /// requires of its peers).
    pub fn required_metadata(&self) -> [(&'static str, String); 2] {
        let (key, value) = self.hello_metadata();
        [
            (key, value.to_string()),
            (
                CLOCK_SKEW_METADATA,
                self.max_clock_skew.as_millis().to_string(),
            ),
        ]
    }

    /// Refuses contradictory settings.
    pub fn validate(&self) -> Result<(), SyncError> {
        let bad = |m: &str| Err(SyncError::Config(m.into()));
        if self.repair_rate == 0 || self.repair_burst == 0 {
            return bad("repair rate and burst must be above zero");
        }
        if self.leasing && self.lease.is_zero() {
            return bad("lease must be above zero");
        }
        if self.anti_entropy_interval.is_zero() || self.sweep_interval.is_zero() {
            return bad("intervals must be above zero");
        }
        if self.round_timeout.is_zero() {
            return bad("the round timeout must be above zero");
        }
        if self.max_key_len == 0 || self.max_value_len == 0 {
            return bad("size limits must be above zero");
        }
        if self.tombstone_grace <= self.max_clock_skew {
            return bad("tombstone grace must be longer than the clock skew allowed");
        }
        Ok(())
    }
}
