//! What the peer manager's in-process tests share.

use std::time::Duration;

use meshwork_peers::PeersConfig;

pub(crate) const S: Duration = Duration::from_secs(1);

/// `mem://name`.
pub(crate) fn addr(name: &str) -> meshwork_transport::Address {
    format!("mem://{name}").parse().unwrap()
}

/// Between `min` and `max` peers, with quick heartbeats, backoff and
/// discovery.
pub(crate) fn config(min: usize, max: usize) -> PeersConfig {
    PeersConfig::default()
        .with_min_peers(min)
        .with_max_peers(max)
        .with_heartbeat(S, 5 * S, 10 * S)
        .with_backoff(Duration::from_millis(200), 5 * S)
        .with_discovery(5 * S, 16)
}
