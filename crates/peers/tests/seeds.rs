//! Seeds pinned to a node id (dial-by-id): only that node is accepted at the
//! seed's address.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meshwork_peers::{PeerManager, PeersConfig};
use meshwork_transport::mem::MemNetwork;
use meshwork_transport::{Address, Config, Endpoint};

const S: Duration = Duration::from_secs(1);

fn addr(name: &str) -> Address {
    Address::mem(name)
}

async fn node(net: &MemNetwork, name: &str, config: PeersConfig) -> PeerManager {
    let endpoint = Endpoint::new(Config::new("seeds-test"), net.transport(name));
    endpoint.listen(&addr(name)).await.unwrap();
    PeerManager::start(endpoint, config).unwrap()
}

fn config() -> PeersConfig {
    PeersConfig::default()
        .with_min_peers(1)
        .with_max_peers(4)
        .with_backoff(Duration::from_millis(200), 2 * S)
}

/// A joiner whose seed is pinned to one node never links to another node
/// found at that address (each dial is refused in the handshake and
/// retried with backoff); pinned to the node that is there, it links.
#[tokio::test(start_paused = true)]
async fn a_seed_pinned_to_a_node_id_accepts_only_that_node() {
    let net = MemNetwork::new();
    let real = node(&net, "real", config()).await;
    let impostor = node(&net, "impostor", config()).await;

    let fooled = node(
        &net,
        "fooled",
        config().with_seed_id(addr("impostor"), real.node_id().clone()),
    )
    .await;
    tokio::time::sleep(10 * S).await;
    assert!(fooled.connected().is_empty(), "{:?}", fooled.connected());
    assert!(impostor.connected().is_empty());
    let refused = fooled.endpoint().stats().failures;
    assert!(
        refused.get("unexpected_peer").copied().unwrap_or(0) >= 2,
        "refused, and retried: {refused:?}"
    );

    let joiner = node(
        &net,
        "joiner",
        config().with_seed_id(addr("real"), real.node_id().clone()),
    )
    .await;
    joiner.wait_for_peers(1, 5 * S).await.unwrap();
    assert_eq!(&joiner.connected()[0].node_id, real.node_id());

    for n in [real, impostor, fooled, joiner] {
        n.shutdown().await;
    }
}
