//! Many nodes in one process: joining through a seed, redialling a seed
//! that restarts, and riding out a partition. The in-memory network runs on
//! tokio's paused clock, so these are deterministic and take milliseconds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meshwork::transport::mem::MemNetwork;
use meshwork::transport::{Address, Direction};
use meshwork::{Node, NodeBuilder};

const NET: &str = "it-mesh";

fn builder(net: &MemNetwork, host: &str) -> NodeBuilder {
    Node::builder(NET)
        .transport(net.transport(host))
        .listen(Address::mem(host))
        .configure(|c| {
            c.with_keepalive(
                Some(Duration::from_millis(200)),
                Some(Duration::from_secs(1)),
            )
        })
        .ping_interval(Duration::from_millis(100))
        .redial_backoff(Duration::from_millis(50), Duration::from_millis(400))
}

/// Starts a node on `host` whose seed is the node on `mem://seed`.
async fn start_leaf(net: &MemNetwork, host: &str) -> Node {
    builder(net, host)
        .seed(Address::mem("seed"))
        .start()
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn many_nodes_join_through_one_seed() {
    let net = MemNetwork::new();
    let seed = builder(&net, "seed").start().await.unwrap();
    let mut nodes = Vec::new();
    for i in 0..30 {
        let node = start_leaf(&net, &format!("n{i}")).await;
        nodes.push(node);
    }
    seed.wait_for_connections(30, Duration::from_secs(10))
        .await
        .unwrap();
    // Let a few pings go by so every link has an RTT.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let status = seed.status();
    let mut seen: Vec<_> = status
        .connections
        .iter()
        .map(|c| c.node_id.clone())
        .collect();
    seen.sort();
    let mut expected: Vec<_> = nodes.iter().map(|n| n.node_id().clone()).collect();
    expected.sort();
    assert_eq!(seen, expected);
    assert!(
        status
            .connections
            .iter()
            .all(|c| c.direction == Direction::Inbound && c.rtt.is_some())
    );
    for node in &nodes {
        let s = node.status();
        assert_eq!(s.connections.len(), 1);
        assert_eq!(&s.connections[0].node_id, seed.node_id());
        assert_eq!(
            s.connections[0].listen_addrs,
            vec!["mem://seed".to_string()]
        );
    }

    for node in nodes {
        node.shutdown().await;
    }
    // Every peer said goodbye; the seed is alone again.
    assert!(seed.status().connections.is_empty());
    seed.shutdown().await;
    assert_eq!(net.open_connections(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_restarted_seed_is_redialled() {
    let net = MemNetwork::new();
    let seed = builder(&net, "seed").start().await.unwrap();
    let leaf = start_leaf(&net, "leaf").await;
    leaf.wait_for_connections(1, Duration::from_secs(5))
        .await
        .unwrap();
    let first_id = seed.node_id().clone();

    seed.shutdown().await;
    wait_until(|| leaf.status().connections.is_empty()).await;

    // A new node (new id) comes up on the same address.
    let seed2 = builder(&net, "seed").start().await.unwrap();
    leaf.wait_for_connections(1, Duration::from_secs(5))
        .await
        .unwrap();
    let status = leaf.status();
    assert_eq!(&status.connections[0].node_id, seed2.node_id());
    assert_ne!(seed2.node_id(), &first_id);
    leaf.shutdown().await;
    seed2.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_partition_is_detected_and_healed() {
    let net = MemNetwork::new();
    let seed = builder(&net, "seed").start().await.unwrap();
    let a = start_leaf(&net, "a").await;
    let b = start_leaf(&net, "b").await;
    seed.wait_for_connections(2, Duration::from_secs(5))
        .await
        .unwrap();

    net.partition(&["a"], &["seed", "b"]);
    // Silence on the link: the idle timeout (1 s) closes it on both sides,
    // while b and the seed stay connected.
    wait_until(|| a.status().connections.is_empty() && seed.status().connections.len() == 1).await;
    assert_eq!(&seed.status().connections[0].node_id, b.node_id());

    net.heal();
    a.wait_for_connections(1, Duration::from_secs(5))
        .await
        .unwrap();
    seed.wait_for_connections(2, Duration::from_secs(5))
        .await
        .unwrap();
    for node in [a, b, seed] {
        node.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_link_is_redialled() {
    let net = MemNetwork::new();
    let seed = builder(&net, "seed").start().await.unwrap();
    let leaf = start_leaf(&net, "leaf").await;
    leaf.wait_for_connections(1, Duration::from_secs(5))
        .await
        .unwrap();
    net.drop_link("leaf", "seed");
    wait_until(|| leaf.status().connections.is_empty()).await;
    leaf.wait_for_connections(1, Duration::from_secs(5))
        .await
        .unwrap();
    leaf.shutdown().await;
    seed.shutdown().await;
}

/// Nodes of another network are never connected, however long they try.
#[tokio::test(start_paused = true)]
async fn another_network_never_joins() {
    let net = MemNetwork::new();
    let seed = builder(&net, "seed").start().await.unwrap();
    let stranger = Node::builder("other")
        .transport(net.transport("stranger"))
        .seed(Address::mem("seed"))
        .redial_backoff(Duration::from_millis(50), Duration::from_millis(100))
        .start()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(seed.status().connections.is_empty());
    assert!(stranger.status().connections.is_empty());
    assert!(seed.endpoint().stats().handshakes_failed >= 10);
    stranger.shutdown().await;
    seed.shutdown().await;
}

/// Real sockets: five nodes over TCP on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_over_tcp() {
    let seed = Node::builder(NET)
        .listen("tcp://127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .unwrap();
    let seed_addr = seed.listen_addrs()[0].clone();
    let mut nodes = Vec::new();
    for _ in 0..4 {
        nodes.push(
            Node::builder(NET)
                .listen("tcp://127.0.0.1:0".parse().unwrap())
                .seed(seed_addr.clone())
                .ping_interval(Duration::from_millis(50))
                .start()
                .await
                .unwrap(),
        );
    }
    seed.wait_for_connections(4, Duration::from_secs(10))
        .await
        .unwrap();
    for node in &nodes {
        // The seed may finish its side of a handshake before the dialer does.
        node.wait_for_connections(1, Duration::from_secs(5))
            .await
            .unwrap();
        let s = node.status();
        assert_eq!(s.connections.len(), 1);
        assert_eq!(s.connections[0].listen_addrs, vec![seed_addr.to_string()]);
    }
    for node in nodes {
        node.shutdown().await;
    }
    seed.shutdown().await;
}

/// Polls `cond` on the (paused) clock for up to 10 simulated seconds.
async fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A node listed as its own seed notices once and stops dialling itself.
#[tokio::test(start_paused = true)]
async fn a_node_does_not_keep_dialling_itself() {
    let net = MemNetwork::new();
    let node = builder(&net, "me")
        .seed(Address::mem("me"))
        .start()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    // One attempt: refused by itself as responder, given up as dialler.
    assert_eq!(node.endpoint().stats().handshakes_failed, 2);
    assert!(node.status().connections.is_empty());
    node.shutdown().await;
}
