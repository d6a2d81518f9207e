//! Settings of the peer manager.

use std::time::Duration;

use meshwork_transport::Address;
use meshwork_wire::NodeId;

use crate::PeersError;
use crate::heartbeat::HeartbeatTiming;

/// Settings of a [`PeerManager`](crate::PeerManager), with defaults and
/// chained setters.
///
/// ```
/// use std::time::Duration;
/// use meshwork_peers::PeersConfig;
///
/// let config = PeersConfig::default()
///     .with_seed("tcp://127.0.0.1:7000".parse().unwrap())
///     .with_min_peers(3)
///     .with_max_peers(8)
///     .with_heartbeat(Duration::from_secs(1), Duration::from_secs(5), Duration::from_secs(10));
/// assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone)]
pub struct PeersConfig {
    pub(crate) seeds: Vec<Address>,
    /// Seeds pinned to a node id: every dial of such an address expects it.
    pub(crate) seed_ids: Vec<(Address, NodeId)>,
    pub(crate) min_peers: usize,
    pub(crate) max_peers: usize,
    pub(crate) max_pending_dials: usize,
    pub(crate) outbound_reserved: usize,
    pub(crate) heartbeat: HeartbeatTiming,
    pub(crate) max_error_count: u32,
    pub(crate) failure_memory: Duration,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) max_dial_failures: u32,
    pub(crate) lost_peer_retry: Duration,
    pub(crate) lost_peer_backoff: Duration,
    pub(crate) feeler_interval: Duration,
    pub(crate) discovery_interval: Duration,
    pub(crate) discovery_sample: usize,
    pub(crate) address_book_capacity: usize,
    pub(crate) alternatives: usize,
    pub(crate) tick: Duration,
    pub(crate) inbound_capacity: usize,
    pub(crate) event_capacity: usize,
    pub(crate) rng_seed: Option<u64>,
}

impl Default for PeersConfig {
    fn default() -> Self {
        PeersConfig {
            seeds: Vec::new(),
            seed_ids: Vec::new(),
            min_peers: 4,
            max_peers: 16,
            max_pending_dials: 8,
            outbound_reserved: 2,
            heartbeat: HeartbeatTiming {
                interval: Duration::from_secs(2),
                slow_down: Duration::from_secs(1),
                max_interval: Duration::from_secs(8),
                unresponsive_after: Duration::from_secs(15),
                dead_after: Duration::from_secs(30),
            },
            max_error_count: 5,
            failure_memory: Duration::from_secs(600),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            max_dial_failures: 8,
            lost_peer_retry: Duration::from_secs(600),
            lost_peer_backoff: Duration::from_secs(5),
            feeler_interval: Duration::from_secs(60),
            discovery_interval: Duration::from_secs(30),
            discovery_sample: 16,
            address_book_capacity: 1024,
            alternatives: 8,
            tick: Duration::from_millis(250),
            inbound_capacity: 1024,
            event_capacity: 256,
            rng_seed: None,
        }
    }
}

impl PeersConfig {
    /// Adds a seed: an address dialled at start, and again whenever the pool
    /// is below `min_peers` and the seed is not connected.
    pub fn with_seed(mut self, addr: Address) -> Self {
        self.seeds.push(addr);
        self
    }

    /// Adds a seed pinned to a node id (dial-by-id): every dial of `addr`
    /// completes only if the node answering there is `id`; any other node
    /// (one that took over the address, or someone on the path with a key of
    /// its own) is refused during the handshake, logged at `warn` and retried
    /// with backoff like any refused dial. The id is the seed's public key, as
    /// its ready line or `meshwork keygen --key` prints it.
    pub fn with_seed_id(mut self, addr: Address, id: NodeId) -> Self {
        self.seed_ids.retain(|(a, _)| *a != addr);
        self.seed_ids.push((addr.clone(), id));
        self.seeds.push(addr);
        self
    }

    /// Adds several seeds.
    pub fn with_seeds(mut self, addrs: impl IntoIterator<Item = Address>) -> Self {
        self.seeds.extend(addrs);
        self
    }

    /// The pool dials known peers while it has fewer than `n` (default 4).
    /// Below `n` with nobody left to dial (no dial in flight), it asks its
    /// peers for addresses (an empty `Discovered`, which they answer with a
    /// sample of their address books) rather than wait for their periodic
    /// sample: 0.5 to 1 s after its last new peer, then twice as far apart
    /// each time up to the discovery interval
    /// ([`with_discovery`](Self::with_discovery)), from the start again at
    /// each new peer.
    pub fn with_min_peers(mut self, n: usize) -> Self {
        self.min_peers = n;
        self
    }

    /// The pool never holds more than `n` peers (default 16); inbound
    /// connections beyond it are refused with Disconnect(too many peers)
    /// naming other peers to try.
    pub fn with_max_peers(mut self, n: usize) -> Self {
        self.max_peers = n;
        self
    }

    /// At most `n` dials in flight at once (default 8).
    pub fn with_max_pending_dials(mut self, n: usize) -> Self {
        self.max_pending_dials = n;
        self
    }

    /// Slots kept for peers we dial ourselves (default 2): inbound peers may
    /// fill at most `max_peers - n`, so peers that dial us cannot alone
    /// surround (eclipse) a node. Capped at half of `max_peers`.
    pub fn with_outbound_reserved(mut self, n: usize) -> Self {
        self.outbound_reserved = n;
        self
    }

    /// Heartbeats: ping a link after `interval` of silence (default 2 s);
    /// a peer silent for `unresponsive_after` (default 15 s) is Unresponsive,
    /// for `dead_after` (default 30 s) it is disconnected. The slowed-down
    /// interval is capped at half of `unresponsive_after`.
    pub fn with_heartbeat(
        mut self,
        interval: Duration,
        unresponsive_after: Duration,
        dead_after: Duration,
    ) -> Self {
        self.heartbeat.interval = interval;
        self.heartbeat.unresponsive_after = unresponsive_after;
        self.heartbeat.dead_after = dead_after;
        // Keep the slowed-down interval well inside the unresponsive threshold.
        let max = self.heartbeat.max_interval.min(unresponsive_after / 2);
        self.heartbeat.max_interval = max.max(interval);
        self
    }

    /// The slow-down of idle heartbeats: each ping to a healthy, quiet peer
    /// stretches its interval by `step` up to `max_interval` (default 1 s
    /// and 8 s). The maximum must stay below `unresponsive_after`.
    pub fn with_heartbeat_slow_down(mut self, step: Duration, max_interval: Duration) -> Self {
        self.heartbeat.slow_down = step;
        self.heartbeat.max_interval = max_interval;
        self
    }

    /// Errors or timeouts ([`report_error`](crate::PeerManager::report_error),
    /// [`report_timeout`](crate::PeerManager::report_timeout)) within the
    /// [failure memory](Self::with_failure_memory) after which a peer is
    /// disconnected and banned for the longest backoff (default 5; errors
    /// and timeouts count apart).
    pub fn with_max_error_count(mut self, n: u32) -> Self {
        self.max_error_count = n;
        self
    }

    /// How long a reported error or timeout counts against its peer
    /// (default 10 minutes): a sliding window, so `max_error_count` failures
    /// within it ban the peer, while sporadic ones on a link that stays up
    /// for days never add up. The peer's score and `least_failed` also see
    /// only the failures within it.
    pub fn with_failure_memory(mut self, memory: Duration) -> Self {
        self.failure_memory = memory;
        self
    }

    /// Bounds of the exponential backoff between dials of one peer (default
    /// 500 ms to 60 s, jittered).
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max;
        self
    }

    /// A discovered peer that failed this many dials in a row is forgotten
    /// (default 8). Seeds are never forgotten.
    pub fn with_max_dial_failures(mut self, n: u32) -> Self {
        self.max_dial_failures = n;
        self
    }

    /// For how long a peer whose connection broke (not a graceful goodbye)
    /// is redialled even when the pool is above `min_peers`, as long as it is
    /// below `max_peers` (default 10 min). This is what rejoins the halves of
    /// a healed partition.
    pub fn with_lost_peer_retry(mut self, window: Duration) -> Self {
        self.lost_peer_retry = window;
        self
    }

    /// The longest wait between the redials of a lost peer whose dials go
    /// unanswered, within the lost-peer window (default 5 s, each wait
    /// jittered into its upper half; never longer than the
    /// [backoff](Self::with_backoff)'s maximum, which other dials wait, up
    /// to 60 s by default). A peer that refuses us as full waits the full
    /// backoff. Redials still need room in the pool, except those of a
    /// seed's node, which a full pool makes too. A lost peer that restarts
    /// is linked again within about this long: nodes restarted together
    /// with fresh ids whose seeds restarted with them know only each other,
    /// and only the nodes that knew their addresses can join them to the
    /// mesh again (an operator's 2/3 chain of processes kept two such nodes
    /// apart for 30 s to more than 3 minutes while the backoff of their
    /// former peers grew). The cost: up to two dials per this long, for the
    /// window, of a peer gone for good, from each node that lost it and has
    /// room, one at a time; and from a full pool, one per lost seed.
    pub fn with_lost_peer_backoff(mut self, max: Duration) -> Self {
        self.lost_peer_backoff = max;
        self
    }

    /// How often, past that window, one lost peer is redialled ("feeler";
    /// default every 60 s, one dial at a time, only while below
    /// `max_peers`). Without it the halves of a partition longer than the
    /// window would stay apart for good once each half is back at
    /// `min_peers`. `Duration::ZERO` turns feelers off.
    pub fn with_feeler_interval(mut self, interval: Duration) -> Self {
        self.feeler_interval = interval;
        self
    }

    /// How often peers are sent a sample of the address book (default 30 s;
    /// a new peer gets one at once, and a peer that asks gets one in
    /// answer), and how many entries it holds (default 16). The interval
    /// also caps the wait between the asks of a node below `min_peers`
    /// ([`with_min_peers`](Self::with_min_peers)).
    pub fn with_discovery(mut self, interval: Duration, sample: usize) -> Self {
        self.discovery_interval = interval;
        self.discovery_sample = sample;
        self
    }

    /// Most peers remembered beyond the connected ones (default 1024); the
    /// least recently seen are forgotten first.
    pub fn with_address_book_capacity(mut self, n: usize) -> Self {
        self.address_book_capacity = n;
        self
    }

    /// How often the pool is maintained: heartbeats checked, dials started
    /// (default 250 ms).
    pub fn with_tick(mut self, tick: Duration) -> Self {
        self.tick = tick;
        self
    }

    /// Capacity of the queue of Concern messages handed to the layer above
    /// (default 1024). When full, reading from peers waits.
    pub fn with_inbound_capacity(mut self, n: usize) -> Self {
        self.inbound_capacity = n;
        self
    }

    /// Events kept for slow [`events`](crate::PeerManager::events)
    /// receivers (default 256); a receiver further behind is told how many
    /// it missed.
    pub fn with_event_capacity(mut self, n: usize) -> Self {
        self.event_capacity = n;
        self
    }

    /// Seeds the manager's randomness (peer choice, jitter) for reproducible
    /// simulations.
    pub fn with_rng_seed(mut self, seed: u64) -> Self {
        self.rng_seed = Some(seed);
        self
    }

    /// The seeds.
    pub fn seeds(&self) -> &[Address] {
        &self.seeds
    }

    /// The node id a seed address is pinned to ([`with_seed_id`](Self::with_seed_id)).
    pub fn seed_id(&self, addr: &Address) -> Option<&NodeId> {
        self.seed_ids
            .iter()
            .find(|(a, _)| a == addr)
            .map(|(_, id)| id)
    }

    /// The minimum pool size.
    pub fn min_peers(&self) -> usize {
        self.min_peers
    }

    /// The maximum pool size.
    pub fn max_peers(&self) -> usize {
        self.max_peers
    }

    /// Inbound peers accepted at most: `max_peers` minus the reserved
    /// outbound slots.
    pub fn inbound_limit(&self) -> usize {
        self.max_peers - self.reserved_outbound()
    }

    pub(crate) fn reserved_outbound(&self) -> usize {
        self.outbound_reserved.min(self.max_peers / 2)
    }

    /// The pool aims for this many peers: `min_peers`, but never more than
    /// `max_peers`.
    pub(crate) fn target(&self) -> usize {
        self.min_peers.min(self.max_peers)
    }

    /// Checks that the settings make sense together.
    pub fn validate(&self) -> Result<(), PeersError> {
        let bad = |msg: String| Err(PeersError::Config(msg));
        let h = &self.heartbeat;
        if self.max_peers == 0 {
            return bad("max_peers must be at least 1".into());
        }
        if self.min_peers > self.max_peers {
            return bad(format!(
                "min_peers ({}) is above max_peers ({})",
                self.min_peers, self.max_peers
            ));
        }
        if self.max_pending_dials == 0 {
            return bad("max_pending_dials must be at least 1".into());
        }
        if h.interval.is_zero() || self.tick.is_zero() || self.discovery_interval.is_zero() {
            return bad("heartbeat interval, tick and discovery interval must be positive".into());
        }
        if h.max_interval < h.interval {
            return bad("the heartbeat maximum interval is below the base interval".into());
        }
        if h.max_interval >= h.unresponsive_after {
            return bad(format!(
                "heartbeat interval (up to {:?}) must be shorter than unresponsive_after ({:?})",
                h.max_interval, h.unresponsive_after
            ));
        }
        if h.unresponsive_after >= h.dead_after {
            return bad(format!(
                "unresponsive_after ({:?}) must be shorter than dead_after ({:?})",
                h.unresponsive_after, h.dead_after
            ));
        }
        if self.max_error_count == 0 {
            return bad("max_error_count must be at least 1".into());
        }
        if self.failure_memory.is_zero() {
            return bad("failure_memory must be longer than zero".into());
        }
        if self.backoff_min.is_zero() || self.backoff_max < self.backoff_min {
            return bad("backoff needs 0 < min <= max".into());
        }
        if self.lost_peer_backoff.is_zero() {
            return bad("lost_peer_backoff must be longer than zero".into());
        }
        if self.inbound_capacity == 0 || self.event_capacity == 0 {
            return bad("queue capacities must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        PeersConfig::default().validate().unwrap();
    }

    #[test]
    fn nonsense_is_refused_with_a_reason() {
        let s = Duration::from_secs(1);
        let cases = [
            PeersConfig::default().with_max_peers(0),
            PeersConfig::default().with_min_peers(5).with_max_peers(3),
            PeersConfig::default().with_heartbeat(s, s, 2 * s),
            PeersConfig::default().with_heartbeat(s, 3 * s, 2 * s),
            PeersConfig::default().with_heartbeat_slow_down(s, 20 * s),
            PeersConfig::default().with_backoff(2 * s, s),
            PeersConfig::default().with_max_error_count(0),
            PeersConfig::default().with_lost_peer_backoff(Duration::ZERO),
        ];
        for c in cases {
            let err = c.validate().unwrap_err();
            assert!(matches!(err, PeersError::Config(_)), "{err}");
        }
    }

    #[test]
    fn reserved_outbound_slots_leave_room_for_inbound() {
        let c = PeersConfig::default()
            .with_max_peers(10)
            .with_outbound_reserved(3);
        assert_eq!(c.inbound_limit(), 7);
        // With max 2, at most one slot is reserved.
        let c = PeersConfig::default().with_max_peers(2).with_min_peers(2);
        assert_eq!(c.inbound_limit(), 1);
        assert_eq!(c.target(), 2);
    }
}
