//! Seeds pinned to a node id (dial-by-id): only that node is accepted at the
//! seed's address.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meshwork_peers::{PeerManager, PeersConfig, PeersError};
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

/// A wait for peers that runs out says why, as far as the manager knows:
/// the seeds' last dial errors and the failed handshakes (it said only
/// "timed out after 2s waiting for peers").
#[tokio::test(start_paused = true)]
async fn waiting_for_peers_in_vain_says_why() {
    let net = MemNetwork::new();
    // Nobody listens at the seed's address.
    let alone = node(&net, "alone", config().with_seed(addr("nobody"))).await;
    let e = alone.wait_for_peers(1, 2 * S).await.unwrap_err();
    let PeersError::Timeout { after, detail, .. } = &e else {
        panic!("{e:?}");
    };
    assert_eq!(*after, 2 * S);
    let seed = &alone.seeds()[0];
    let last = seed.last_error.clone().expect("a failed dial");
    assert!(seed.failures >= 2, "{seed:?}");
    assert!(
        detail.starts_with("0 of 1 peers linked; seed mem://nobody: "),
        "{detail}"
    );
    assert!(detail.contains(&last), "{detail}");
    assert!(
        e.to_string().starts_with(
            "timed out after 2s waiting for peers: 0 of 1 peers linked; seed mem://nobody"
        ),
        "{e}"
    );

    // The seed is on another network: refused in the handshake.
    let endpoint = Endpoint::new(Config::new("another-network"), net.transport("elsewhere"));
    endpoint.listen(&addr("elsewhere")).await.unwrap();
    let elsewhere = PeerManager::start(endpoint, config()).unwrap();
    let lost = node(&net, "lost", config().with_seed(addr("elsewhere"))).await;
    let e = lost.wait_for_peers(1, 2 * S).await.unwrap_err().to_string();
    assert!(e.contains("seed mem://elsewhere: "), "{e}");
    assert!(e.contains("another-network"), "{e}");
    assert!(e.contains("failed handshakes: refused_by_peer "), "{e}");

    for n in [alone, elsewhere, lost] {
        n.shutdown().await;
    }
}

/// A peer has an RTT as soon as it is linked: the round trip the
/// handshake measured (it was `None` until the first heartbeat's Pong, so
/// the README's first example printed `rtt None`). With Noise both sides
/// measure one; in plaintext the dialling side.
#[tokio::test(start_paused = true)]
async fn a_new_link_has_the_handshakes_round_trip_at_once() {
    const MS: Duration = Duration::from_millis(1);
    let near = |d: Option<Duration>| d.is_some_and(|d| d >= 40 * MS && d < 45 * MS);
    for plaintext in [false, true] {
        let net = MemNetwork::new();
        // 20 ms each way.
        net.set_latency("a", "b", 20 * MS);
        let start = |name: &'static str, config: PeersConfig| {
            let net = net.clone();
            async move {
                let mut transport = Config::new("seeds-test");
                if plaintext {
                    transport = transport.with_insecure_plaintext();
                }
                let endpoint = Endpoint::new(transport, net.transport(name));
                endpoint.listen(&addr(name)).await.unwrap();
                PeerManager::start(endpoint, config).unwrap()
            }
        };
        let a = start("a", config()).await;
        let b = start("b", config().with_seed(addr("a"))).await;
        b.wait_for_peers(1, 5 * S).await.unwrap();
        let seen_by_b = &b.connected()[0];
        assert!(near(seen_by_b.rtt), "{plaintext}: {seen_by_b:?}");
        assert_eq!(seen_by_b.smoothed_rtt, seen_by_b.rtt);
        a.wait_for_peers(1, 5 * S).await.unwrap();
        let seen_by_a = &a.connected()[0];
        if plaintext {
            // Nothing answered the responder's Hello: the first Pong will.
            assert_eq!(seen_by_a.rtt, None, "{seen_by_a:?}");
        } else {
            assert!(near(seen_by_a.rtt), "{seen_by_a:?}");
        }
        for n in [a, b] {
            n.shutdown().await;
        }
    }
}

/// A node dials its seeds as it starts, not a maintenance tick later: a
/// restarted `meshwork node` waited the whole first tick (250 ms) before
/// its first dial, with nothing else to do.
#[tokio::test(start_paused = true)]
async fn a_node_dials_its_seeds_as_it_starts() {
    let net = MemNetwork::new();
    let seed = node(&net, "seed", config()).await;
    let tick = Duration::from_millis(250);
    let joiner = node(
        &net,
        "joiner",
        config().with_tick(tick).with_seed(addr("seed")),
    )
    .await;
    let start = tokio::time::Instant::now();
    joiner.wait_for_peers(1, 5 * S).await.unwrap();
    let took = start.elapsed();
    assert!(took < tick / 5, "first peer after {took:?}");
    for n in [seed, joiner] {
        n.shutdown().await;
    }
}
