//! The peer manager on the in-memory network, on a paused clock: many nodes
//! in one process, deterministic and quick.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::borrow::Borrow;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use meshwork_peers::{PeerEvent, PeerManager, PeerState, PeersConfig, PeersError};
use meshwork_transport::mem::MemNetwork;
use meshwork_transport::{CloseReason, Config, Direction, Endpoint, Identity, Priority};
use meshwork_wire::proto::{Concern, ConcernKind, DisconnectReason};
use meshwork_wire::{Message, NodeId};
use tokio::time::{Instant, sleep};

mod common;
use common::{S, addr, config};

const MS: Duration = Duration::from_millis(1);

/// A peer manager for `name`, listening on `mem://name`.
async fn node(net: &MemNetwork, name: &str, config: PeersConfig) -> PeerManager {
    let transport = Config::new("mesh-test")
        .with_insecure_plaintext()
        .with_keepalive(None, None);
    let endpoint = Endpoint::new(transport, net.transport(name));
    endpoint.listen(&addr(name)).await.unwrap();
    PeerManager::start(endpoint, config).unwrap()
}

/// Nodes `{prefix}0` to `{prefix}{n-1}` with `config`, started one after
/// another, each seeded with every node started before it.
async fn joined_in_turn(
    net: &MemNetwork,
    prefix: &str,
    n: usize,
    config: PeersConfig,
) -> Vec<PeerManager> {
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let mut nodes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let c = names[..i]
            .iter()
            .fold(config.clone(), |c, other| c.with_seed(addr(other)));
        nodes.push(node(net, name, c).await);
    }
    nodes
}

/// A Concern request (command 7, id 1) carrying `payload`.
fn request(payload: &[u8]) -> Concern {
    Concern {
        command: 7,
        request_id: 1,
        kind: ConcernKind::Request as i32,
        payload: payload.to_vec().into(),
        ..Concern::default()
    }
}

/// Who each node is linked to, by index.
fn adjacency<N: Borrow<PeerManager>>(nodes: &[N]) -> Vec<BTreeSet<usize>> {
    let index: HashMap<NodeId, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.borrow().node_id().clone(), i))
        .collect();
    nodes
        .iter()
        .map(|n| {
            n.borrow()
                .connected()
                .iter()
                .filter_map(|p| index.get(&p.node_id).copied())
                .collect()
        })
        .collect()
}

/// Nodes reachable from node 0.
fn reachable(adj: &[BTreeSet<usize>]) -> usize {
    let mut seen = vec![false; adj.len()];
    let mut queue = VecDeque::from([0]);
    seen[0] = true;
    let mut count = 1;
    while let Some(i) = queue.pop_front() {
        for &j in &adj[i] {
            if !seen[j] {
                seen[j] = true;
                count += 1;
                queue.push_back(j);
            }
        }
    }
    count
}

/// Waits (on the paused clock) until `done` holds, checking every second.
async fn settle(within: Duration, done: impl FnMut() -> bool) -> Duration {
    let took = settled(within, done).await;
    took.unwrap_or_else(|| panic!("not settled within {within:?}"))
}

/// [`settle`], or `None` if `done` does not hold within `within`.
async fn settled(within: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() >= within {
            return None;
        }
        sleep(S).await;
    }
    Some(start.elapsed())
}

fn healthy<N: Borrow<PeerManager>>(nodes: &[N], min: usize, max: usize) -> bool {
    let adj = adjacency(nodes);
    let symmetric = adj
        .iter()
        .enumerate()
        .all(|(i, peers)| peers.iter().all(|&j| adj[j].contains(&i)));
    symmetric
        && adj.iter().all(|p| (min..=max).contains(&p.len()))
        && reachable(&adj) == nodes.len()
}

async fn shutdown_all(nodes: Vec<PeerManager>) {
    futures_util::future::join_all(nodes.iter().map(|n| n.shutdown())).await;
}

#[tokio::test(start_paused = true)]
async fn a_hundred_nodes_seeded_with_one_form_one_connected_graph() {
    let net = MemNetwork::new();
    let (min, max) = (4, 10);
    let mut nodes = vec![node(&net, "n0", config(min, max)).await];
    for i in 1..100 {
        let c = config(min, max).with_seed(addr("n0"));
        nodes.push(node(&net, &format!("n{i}"), c).await);
    }
    let took = settle(120 * S, || healthy(&nodes, min, max)).await;
    eprintln!("100 nodes converged in {took:?} (simulated)");
    // The seed was never over its limit.
    assert!(nodes[0].stats().connected <= max);
    assert!(nodes[0].stats().inbound <= nodes[0].config().inbound_limit());
    shutdown_all(nodes).await;
}

/// Twenty nodes split into halves of ten for `apart`, then healed: they
/// must be one healthy mesh again within `rejoin`. Returns how long that
/// took.
async fn partition_and_heal(
    config: impl Fn() -> PeersConfig,
    apart: Duration,
    rejoin: Duration,
) -> Duration {
    let net = MemNetwork::new();
    let (min, max) = (3, 8);
    let names: Vec<String> = (0..20).map(|i| format!("p{i}")).collect();
    let mut nodes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut c = config();
        if i > 0 {
            c = c.with_seed(addr(&names[0]));
        }
        nodes.push(node(&net, name, c).await);
    }
    settle(60 * S, || healthy(&nodes, min, max)).await;
    // Every node knows every other (from gossip) before the cut: one that
    // knew only the peers it had, all of them across the cut, would know
    // nobody in its own half to dial (a run failed so, such a node alone).
    settle(120 * S, || {
        nodes.iter().all(|n| {
            let s = n.stats();
            s.connected + s.known >= names.len() - 1
        })
    })
    .await;

    let (left, right): (Vec<&str>, Vec<&str>) = (
        names[..10].iter().map(|s| s.as_str()).collect(),
        names[10..].iter().map(|s| s.as_str()).collect(),
    );
    net.partition(&left, &right);
    let cut = Instant::now();
    // Links across go silent, die, and each half keeps itself above min.
    settle(60 * S, || {
        let adj = adjacency(&nodes);
        let crossing = adj
            .iter()
            .enumerate()
            .any(|(i, p)| p.iter().any(|&j| (i < 10) != (j < 10)));
        !crossing && adj.iter().all(|p| p.len() >= min)
    })
    .await;
    assert!(reachable(&adjacency(&nodes)) <= 10, "the halves are apart");
    sleep(apart.saturating_sub(cut.elapsed())).await;
    assert!(reachable(&adjacency(&nodes)) <= 10, "the halves are apart");

    net.heal();
    let took = settle(rejoin, || healthy(&nodes, min, max)).await;
    shutdown_all(nodes).await;
    took
}

#[tokio::test(start_paused = true)]
async fn halves_of_a_partition_rejoin_after_heal() {
    let took = partition_and_heal(|| config(3, 8), 60 * S, 120 * S).await;
    eprintln!("rejoined {took:?} after heal (simulated)");
}

/// Past the lost-peer window (a minute here) only the feelers dial across:
/// one per node per interval (20 s here) is enough to join the halves.
#[tokio::test(start_paused = true)]
async fn halves_of_a_partition_longer_than_the_lost_peer_window_rejoin() {
    let config = || {
        config(3, 8)
            .with_lost_peer_retry(60 * S)
            .with_feeler_interval(20 * S)
    };
    let took = partition_and_heal(config, 300 * S, 60 * S).await;
    eprintln!("rejoined {took:?} after heal (simulated)");
}

/// Ten nodes whose pools fill up (`min_peers` = `max_peers` = 4) are split in halves of five until each half is a
/// complete graph of full pools, then healed: nobody has room to dial
/// across, but full pools swap their youngest link for a peer they lost
/// that they knew longer, and the halves are one mesh again. (With swaps
/// off, `with_feeler_interval(ZERO)`, they stay apart.)
#[tokio::test(start_paused = true)]
async fn halves_of_a_saturated_mesh_rejoin_after_heal() {
    // No inbound share: every half can become a complete graph of full
    // pools (with 2 of 4 slots kept for dials, two nodes each needing one
    // more link can only dial each other, and both refuse).
    let c = config(4, 4)
        .with_outbound_reserved(0)
        .with_feeler_interval(20 * S);
    // With every pool full, the nodes joining in turn can also form two
    // meshes from the start (about 1 run in 400): the later ones find the
    // first five full and unknown to them (guide.md, "keep some room").
    // Such a start proves nothing here: built again.
    let mut tries = 0;
    let (net, nodes) = loop {
        tries += 1;
        let net = MemNetwork::new();
        let nodes = joined_in_turn(&net, "s", 10, c.clone()).await;
        if settled(120 * S, || reachable(&adjacency(&nodes)) == 10)
            .await
            .is_some()
        {
            break (net, nodes);
        }
        assert!(tries < 3, "the mesh formed in pieces {tries} times");
        shutdown_all(nodes).await;
    };
    let names: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
    let (left, right): (Vec<&str>, Vec<&str>) = (
        names[..5].iter().map(|s| s.as_str()).collect(),
        names[5..].iter().map(|s| s.as_str()).collect(),
    );
    let crossing = |adj: &[BTreeSet<usize>]| {
        adj.iter()
            .enumerate()
            .any(|(i, p)| p.iter().any(|&j| (i < 5) != (j < 5)))
    };
    assert!(crossing(&adjacency(&nodes)), "no link across to lose");
    net.partition(&left, &right);
    settle(120 * S, || {
        !crossing(&adjacency(&nodes)) && nodes.iter().all(|n| n.stats().connected == 4)
    })
    .await;
    net.heal();
    // Most runs rejoin 10 s after the heal, a few take a minute or two
    // (swaps refused while the eviction budgets recover).
    let took = settle(600 * S, || reachable(&adjacency(&nodes)) == 10).await;
    let swaps: u64 = nodes.iter().map(|n| n.stats().swaps).sum();
    eprintln!("one mesh {took:?} after the heal; {swaps} swap dials");
    assert!(swaps > 0);
    assert!(nodes.iter().all(|n| n.stats().connected <= 4));
    shutdown_all(nodes).await;
}

/// With `min_peers` close to `max_peers` (4 of 5, 2 kept for outbound
/// links), nodes joining one after another can leave one short of peers:
/// every node it knows is full, some because they dialled more than their
/// reserved outbound links. Those give such a slot back to an inbound
/// dialler, and every node reaches `min_peers`. (Without that, this test
/// failed 5 runs of 32; with it, none in 64. At 4 of 4 nothing is given
/// back, see `a_mesh_that_cannot_satisfy_every_node_settles`, and a node
/// is left short in 24 runs of 32.)
#[tokio::test(start_paused = true)]
async fn nodes_short_of_peers_take_back_slots_that_full_nodes_dials_borrowed() {
    let net = MemNetwork::new();
    let nodes = joined_in_turn(&net, "t", 10, config(4, 5)).await;
    let took = settle(120 * S, || healthy(&nodes, 4, 5)).await;
    let reclaims: u64 = nodes.iter().map(|n| n.stats().reclaims).sum();
    eprintln!("every node within 4-5 peers after {took:?}; {reclaims} slots given back");
    shutdown_all(nodes).await;
}

/// A node below `min_peers` whose seed knew nobody when it joined asks its
/// peers for addresses instead of waiting for their gossip: it hears of the
/// nodes that joined the seed after it within seconds, not at the seed's
/// next gossip, 30 s after the start. Those nodes are content with the seed
/// alone (one peer, one outbound slot), so they never dial it.
#[tokio::test(start_paused = true)]
async fn a_node_below_min_hears_of_later_joiners_without_waiting_for_gossip() {
    let net = MemNetwork::new();
    let gossip = 30 * S;
    let config = |min| config(min, 8).with_discovery(gossip, 16);
    let seed = node(&net, "seed", config(1)).await;
    let early = node(&net, "early", config(3).with_seed(addr("seed"))).await;
    early.wait_for_peers(1, S).await.unwrap();
    // The seed had nobody to tell it about.
    assert_eq!(early.peers().len(), 1);
    let mut nodes = vec![seed, early];
    for name in ["late1", "late2"] {
        sleep(2 * S).await;
        let content = config(1).with_outbound_reserved(1);
        nodes.push(node(&net, name, content.with_seed(addr("seed"))).await);
    }
    let took = settle(10 * S, || nodes[1].stats().connected == 3).await;
    eprintln!("linked to both later joiners {took:?} after the last joined (simulated)");
    // It dialled them itself: they, content with the seed, never dial it.
    assert!(
        nodes[1]
            .connected()
            .iter()
            .all(|p| p.direction == Some(Direction::Outbound))
    );
    shutdown_all(nodes).await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_goes_unresponsive_then_disconnected_within_the_thresholds() {
    let net = MemNetwork::new();
    let a = node(&net, "a", config(1, 4)).await;
    let b = node(&net, "b", config(1, 4).with_seed(addr("a"))).await;
    a.wait_for_peers(1, 10 * S).await.unwrap();
    let mut events = a.events();
    let silent_from = Instant::now();
    net.partition(&["a"], &["b"]);
    let mut unresponsive_at = None;
    let disconnected_at;
    loop {
        match tokio::time::timeout(30 * S, events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            PeerEvent::StateChanged {
                peer,
                to: PeerState::Unresponsive,
                ..
            } => {
                assert_eq!(&peer, b.node_id());
                assert!(
                    a.send(
                        &peer,
                        Message::Concern(Concern::default()),
                        Priority::Normal
                    )
                    .await
                    .is_err_and(|e| matches!(e, PeersError::Unresponsive(_)))
                );
                unresponsive_at = Some(silent_from.elapsed());
            }
            PeerEvent::Disconnected { peer, reason } => {
                assert_eq!(&peer, b.node_id());
                assert!(
                    matches!(
                        reason,
                        CloseReason::Local {
                            reason: DisconnectReason::Timeout,
                            ..
                        }
                    ),
                    "{reason:?}"
                );
                disconnected_at = silent_from.elapsed();
                break;
            }
            _ => {}
        }
    }
    // The silent peer cannot read our goodbye; the connection is cut soon
    // after instead of lingering for the whole close timeout.
    sleep(S).await;
    assert!(a.endpoint().connections().is_empty());
    let unresponsive_at = unresponsive_at.expect("Unresponsive before Disconnected");
    // Last traffic was at most one heartbeat before the partition; the
    // check runs every tick (250 ms).
    assert!(
        (4 * S..=6 * S).contains(&unresponsive_at),
        "{unresponsive_at:?}"
    );
    assert!(
        (9 * S..=11 * S).contains(&disconnected_at),
        "{disconnected_at:?}"
    );
    net.heal();
    shutdown_all(vec![a, b]).await;
}

#[tokio::test(start_paused = true)]
async fn crossed_dials_leave_one_connection_the_same_on_both_sides() {
    let net = MemNetwork::new();
    for pair in 0..8 {
        let (x, y) = (format!("x{pair}"), format!("y{pair}"));
        // Both listen before either dials, so the dials cross.
        let ex = Endpoint::new(
            Config::new("mesh-test").with_insecure_plaintext(),
            net.transport(&x),
        );
        let ey = Endpoint::new(
            Config::new("mesh-test").with_insecure_plaintext(),
            net.transport(&y),
        );
        ex.listen(&addr(&x)).await.unwrap();
        ey.listen(&addr(&y)).await.unwrap();
        let a = PeerManager::start(ex, config(1, 4).with_seed(addr(&y))).unwrap();
        let b = PeerManager::start(ey, config(1, 4).with_seed(addr(&x))).unwrap();
        sleep(5 * S).await;
        let (ca, cb) = (a.endpoint().connections(), b.endpoint().connections());
        assert_eq!((ca.len(), cb.len()), (1, 1), "pair {pair}");
        let (da, db) = (ca[0].info().direction, cb[0].info().direction);
        assert_ne!(da, db, "both ends keep the same connection");
        // The survivor is the one the smaller id opened.
        let a_smaller = a.node_id() < b.node_id();
        assert_eq!(da == Direction::Outbound, a_smaller);
        shutdown_all(vec![a, b]).await;
    }
}

/// Crossed dials where one end reads the other's close of the duplicate
/// before the survivor's handshake has ended at its own end. The node `n`
/// (the smaller id, so its dial survives) dials `e` over a slow link; `e`,
/// a bare endpoint playing a peer, dials back over the link made fast
/// again, then closes that duplicate at once, long before `n`'s dial is
/// through. `n` must not lose `e` meanwhile: no event, and its dial takes
/// the link over.
#[tokio::test(start_paused = true)]
async fn a_duplicate_closed_before_the_survivor_arrives_is_no_disconnection() {
    let net = MemNetwork::new();
    let (mut small, mut large) = (Identity::generate(), Identity::generate());
    if small.node_id() > large.node_id() {
        std::mem::swap(&mut small, &mut large);
    }
    let transport = |identity: Identity| {
        Config::new("mesh-test")
            .with_insecure_plaintext()
            .with_keepalive(None, None)
            .with_identity(identity)
    };
    let e = Endpoint::new(transport(large), net.transport("e"));
    e.listen(&addr("e")).await.unwrap();
    let e_id = e.node_id().clone();
    let endpoint = Endpoint::new(transport(small), net.transport("n"));
    endpoint.listen(&addr("n")).await.unwrap();

    // n dials e at its first tick; every byte of that dial takes 1 s.
    net.set_latency("n", "e", S);
    let n = PeerManager::start(endpoint, config(1, 4).with_seed(addr("e"))).unwrap();
    sleep(300 * Duration::from_millis(1)).await;
    assert_eq!(n.stats().pending_dials, 1);
    net.set_latency("n", "e", Duration::ZERO);

    // e dials back (the bytes of n's dial are still on their way) and n
    // takes that connection.
    let duplicate = e.connect(&addr("n")).await.unwrap();
    settle(S, || n.is_neighbour(&e_id)).await;
    assert_eq!(
        n.connection(&e_id).unwrap().info().direction,
        Direction::Inbound
    );
    let mut events = n.events();
    // e keeps the connection n opened (the smaller id's): it closes its
    // own as the duplicate before n's dial has completed.
    duplicate
        .handle()
        .close(
            DisconnectReason::DuplicateConnection,
            "duplicate connection",
        )
        .await;
    sleep(Duration::from_millis(10)).await;
    assert_eq!(n.stats().pending_dials, 1, "n's dial is not through yet");
    assert_eq!(n.by_id(&e_id).unwrap().state, PeerState::Connected);
    assert_eq!(n.stats().connected, 1);

    // n's dial completes: the survivor is the link.
    let survivor = e.accept().await.unwrap();
    settle(5 * S, || {
        n.connection(&e_id)
            .is_some_and(|c| c.info().direction == Direction::Outbound)
    })
    .await;
    assert_eq!(n.by_id(&e_id).unwrap().state, PeerState::Connected);
    let mut seen = Vec::new();
    while let Ok(Ok(ev)) = tokio::time::timeout(Duration::ZERO, events.recv()).await {
        seen.push(ev);
    }
    assert!(seen.is_empty(), "the peer was never lost: {seen:?}");
    // Traffic flows on the survivor.
    let hello = Concern {
        command: 7,
        kind: ConcernKind::Request as i32,
        payload: b"hi".to_vec().into(),
        ..Concern::default()
    };
    n.send(&e_id, Message::Concern(hello.clone()), Priority::Normal)
        .await
        .unwrap();
    let mut survivor = survivor;
    let got = survivor.recv_timeout(S).await.unwrap();
    assert_eq!(got, Message::Concern(hello));
    n.shutdown().await;
    e.shutdown().await;
}

/// Log lines, for checking what an operator would see.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Captures what this thread logs at `level` and above until the guard
    /// is dropped (the tests' runtime has one thread: the managers' tasks
    /// log here too).
    fn start(level: tracing::Level) -> (Captured, tracing::subscriber::DefaultGuard) {
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    /// What was logged so far.
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// Two processes started with one key file connect to a node from two
/// places advertising different addresses: the node says so at `warn`, once,
/// and counts each such connection.
#[tokio::test(start_paused = true)]
async fn one_key_file_on_two_nodes_is_reported() {
    let (logs, _guard) = Captured::start(tracing::Level::WARN);

    let net = MemNetwork::new();
    let p = node(&net, "p", config(1, 4)).await;
    let key = Identity::generate();
    let mut twins = Vec::new();
    for host in ["t1", "t2"] {
        let config = Config::new("mesh-test")
            .with_insecure_plaintext()
            .with_keepalive(None, None)
            .with_identity(key.clone());
        let endpoint = Endpoint::new(config, net.transport(host));
        endpoint.listen(&addr(host)).await.unwrap();
        twins.push(endpoint);
    }
    let mut conns = Vec::new();
    for round in 0..2 {
        for t in &twins {
            conns.push(t.connect(&addr("p")).await.unwrap());
            sleep(Duration::from_millis(10)).await;
        }
        if round == 0 {
            assert_eq!(p.stats().suspected_twins, 1);
        }
    }
    assert!(p.stats().suspected_twins >= 2, "{:?}", p.stats());
    let text = logs.text();
    let warned: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("two nodes may be sharing one key file"))
        .collect();
    assert_eq!(warned.len(), 1, "{text}");
    assert!(warned[0].contains("WARN"), "{text}");
    assert!(warned[0].contains("(mem://t1 vs mem://t2)"), "{text}");
    assert!(
        warned[0].contains(&format!("node {} ", key.node_id().short())),
        "{text}"
    );
    drop(conns);
    p.shutdown().await;
    for t in twins {
        t.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_node_holds_at_max_and_sends_dialers_elsewhere() {
    let net = MemNetwork::new();
    let hub = node(&net, "hub", config(2, 2)).await;
    let hub_id = hub.node_id().clone();
    let mut nodes = vec![hub];
    let mut events = Vec::new();
    for i in 0..6 {
        let c = config(2, 8).with_seed(addr("hub"));
        let n = node(&net, &format!("d{i}"), c).await;
        events.push(n.events());
        nodes.push(n);
    }
    settle(60 * S, || {
        let adj = adjacency(&nodes);
        reachable(&adj) == nodes.len() && adj[1..].iter().all(|p| p.len() >= 2)
    })
    .await;
    for _ in 0..20 {
        assert!(nodes[0].stats().connected <= 2);
        sleep(S).await;
    }
    assert_eq!(nodes[0].stats().connected, 2);
    // Those it did not keep were refused in the handshake with
    // Disconnect(too many peers) and counted; the dialers found each other
    // (through the refusals' alternatives and discovery).
    let declined = nodes[0]
        .endpoint()
        .stats()
        .failures
        .get("declined")
        .copied();
    assert!(declined.unwrap_or(0) > 0, "no refusal in the handshake");
    let refused = nodes[0].stats().refused;
    assert!(refused > 0, "no refusal counted");
    for (i, n) in nodes[1..].iter().enumerate() {
        let known = n.peers().len();
        assert!(known >= 3, "dialer {i} knows only {known} peers");
    }
    // No dialer saw the hub connect, then close for want of room.
    let mut brief = 0;
    for e in &mut events {
        loop {
            let ev = match tokio::time::timeout(Duration::ZERO, e.recv()).await {
                Ok(Ok(ev)) => ev,
                Ok(Err(PeersError::Lagged(_))) => continue,
                _ => break,
            };
            if let PeerEvent::Disconnected {
                peer,
                reason:
                    CloseReason::Remote {
                        reason: DisconnectReason::TooManyPeers,
                        ..
                    },
            } = ev
            {
                if peer == hub_id {
                    brief += 1;
                }
            }
        }
    }
    // Six dialled it at once: the gate held the slots it let through for
    // their handshakes, so none was let in only to be refused.
    assert_eq!(
        brief, 0,
        "a dialer was connected to the full hub, then refused"
    );
    shutdown_all(nodes).await;
}

/// A connection the pool refuses when it takes it hands nothing to the
/// layer above. `p` (one slot) dials `r` over a slow link; meanwhile `q`
/// dials `p` and takes the slot, so `p` closes its own dial to `r` once it
/// completes. `r`, which let `p` in, sends it a message at once: it reaches
/// `p` on the refused connection and is dropped (counted), not delivered.
#[tokio::test(start_paused = true)]
async fn a_connection_refused_when_taken_delivers_nothing() {
    let net = MemNetwork::new();
    net.set_latency("p", "r", 100 * MS);
    let r = node(&net, "r", config(1, 4)).await;
    let mut r_events = r.events();
    let p = node(&net, "p", config(1, 1).with_seed(addr("r"))).await;
    let mut inbox = p.take_inbound().unwrap();
    let q = node(&net, "q", config(1, 4).with_seed(addr("p"))).await;
    let msg = request(b"from r");
    // r sends as soon as it sees p connected.
    let sent = loop {
        match tokio::time::timeout(5 * S, r_events.recv()).await {
            Ok(Ok(PeerEvent::Connected { peer, .. })) if peer == *p.node_id() => {
                break r
                    .send(p.node_id(), Message::Concern(msg.clone()), Priority::Normal)
                    .await;
            }
            Ok(Ok(_) | Err(PeersError::Lagged(_))) => {}
            other => panic!("r never saw p connect: {other:?}"),
        }
    };
    assert!(sent.is_ok(), "{sent:?}");
    sleep(S).await;
    assert!(
        p.by_id(q.node_id()).is_some_and(|x| x.state.is_linked()),
        "q took p's slot"
    );
    assert!(!p.by_id(r.node_id()).is_some_and(|x| x.state.is_linked()));
    assert!(inbox.try_recv().is_err(), "r's message was delivered");
    assert_eq!(p.stats().dropped_inbound, 1);
    shutdown_all(vec![p, q, r]).await;
}

#[tokio::test(start_paused = true)]
async fn messages_events_and_a_graceful_goodbye() {
    let net = MemNetwork::new();
    let a = node(&net, "a", config(1, 4)).await;
    let mut events = a.events();
    let b = node(&net, "b", config(1, 4).with_seed(addr("a"))).await;
    let mut inbox = b.take_inbound().unwrap();
    assert!(matches!(b.take_inbound(), Err(PeersError::InboundTaken)));
    a.wait_for_peers(1, 10 * S).await.unwrap();
    b.wait_for_peers(1, 10 * S).await.unwrap();

    let connected = tokio::time::timeout(S, events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(connected, PeerEvent::StateChanged { ref peer, from: PeerState::Known, to: PeerState::Connected } if peer == b.node_id()),
        "{connected:?}"
    );

    let msg = request(b"hi");
    a.send(b.node_id(), Message::Concern(msg.clone()), Priority::Normal)
        .await
        .unwrap();
    let got = tokio::time::timeout(S, inbox.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((&got.from, &got.message), (a.node_id(), &msg));

    let stranger = NodeId::from_bytes(vec![9; 32]).unwrap();
    let err = a
        .send(&stranger, Message::Concern(msg), Priority::Normal)
        .await
        .unwrap_err();
    assert!(matches!(err, PeersError::NotConnected(ref id) if *id == stranger));

    b.shutdown().await;
    loop {
        match tokio::time::timeout(5 * S, events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            PeerEvent::Disconnected { peer, reason } => {
                assert_eq!(&peer, b.node_id());
                assert!(
                    matches!(
                        reason,
                        CloseReason::Remote {
                            reason: DisconnectReason::Shutdown,
                            ..
                        }
                    ),
                    "{reason:?}"
                );
                break;
            }
            _ => continue,
        }
    }
    assert_eq!(a.by_id(b.node_id()).unwrap().state, PeerState::Disconnected);
    a.shutdown().await;
}

/// Waiting for peers ends at once when the manager shuts down, during the
/// wait or before it, instead of running out its timeout.
#[tokio::test(start_paused = true)]
async fn waiting_for_peers_ends_with_the_manager() {
    let net = MemNetwork::new();
    let a = node(&net, "a", config(1, 4)).await;
    let started = Instant::now();
    let waiting = {
        let a = a.clone();
        tokio::spawn(async move { a.wait_for_peers(1, 60 * S).await })
    };
    tokio::time::sleep(S).await;
    a.shutdown().await;
    let r = waiting.await.unwrap();
    assert!(matches!(r, Err(PeersError::Shutdown)), "{r:?}");
    let r = a.wait_for_peers(1, 60 * S).await;
    assert!(matches!(r, Err(PeersError::Shutdown)), "{r:?}");
    assert!(started.elapsed() < 2 * S, "{:?}", started.elapsed());
}

#[tokio::test(start_paused = true)]
async fn too_many_errors_disconnect_a_peer_and_selection_skips_it() {
    let net = MemNetwork::new();
    let a = node(&net, "a", config(1, 4).with_max_error_count(2)).await;
    let b = node(&net, "b", config(1, 4).with_seed(addr("a"))).await;
    let c = node(&net, "c", config(1, 4).with_seed(addr("a"))).await;
    a.wait_for_peers(2, 10 * S).await.unwrap();
    assert_eq!(a.report_error(b.node_id()), Some(1));
    for _ in 0..20 {
        let pick = a.least_failed(|_| true).unwrap();
        assert_eq!(&pick.node_id, c.node_id());
    }
    assert_eq!(a.report_timeout(b.node_id()), Some(1));
    assert_eq!(a.report_error(b.node_id()), Some(2));
    sleep(S).await;
    assert!(!a.by_id(b.node_id()).unwrap().state.is_linked());
    assert_eq!(a.stats().connected, 1);
    shutdown_all(vec![a, b, c]).await;
}

/// With `min_peers` = `max_peers` and a mesh that cannot give every node
/// its `min_peers` (7 nodes of 3 peers: 21 link ends, an odd number), one
/// node is always short. It settles so, with no slot given back: with such
/// settings none is. (From a review: the short node took a borrowed slot,
/// which left the evicted peer short, which took another, and so on, 55
/// links closed between minutes 10 and 30.)
#[tokio::test(start_paused = true)]
async fn a_mesh_that_cannot_satisfy_every_node_settles() {
    let net = MemNetwork::new();
    let nodes = joined_in_turn(&net, "c", 7, config(3, 3)).await;
    sleep(600 * S).await;
    let reclaims = |nodes: &[PeerManager]| nodes.iter().map(|n| n.stats().reclaims).sum::<u64>();
    let before = reclaims(&nodes);
    sleep(1200 * S).await;
    let after = reclaims(&nodes);
    shutdown_all(nodes).await;
    assert!(
        after - before <= 1,
        "{} links given back between 10 and 30 minutes ({before} in the first 10)",
        after - before
    );
}

/// A seed restarted after a graceful shutdown (here with a fresh identity,
/// as `meshwork node` without `--key`), with newcomers that join through
/// it: the nodes that were linked to it redial it, and the mesh is one
/// graph again. Every other node had refilled its pool meanwhile, so none
/// of them needs the seed; before, a seed's goodbye was not a lost link,
/// and the restarted seed and its newcomers stayed a mesh of their own
/// (found with 40 `meshwork node` processes: a broadcast reached 9 of 39).
#[tokio::test(start_paused = true)]
async fn a_seed_restarted_after_a_graceful_shutdown_joins_the_mesh_again() {
    let net = MemNetwork::new();
    let (min, max) = (2, 6);
    let seeded = || config(min, max).with_seed(addr("s0"));
    let seed = node(&net, "s0", config(min, max)).await;
    let mut nodes = Vec::new();
    for i in 0..8 {
        nodes.push(node(&net, &format!("a{i}"), seeded()).await);
    }
    nodes.insert(0, seed);
    settle(60 * S, || healthy(&nodes, min, max)).await;

    // The seed stops; the others refill their pools among themselves.
    let old = nodes.remove(0);
    old.shutdown().await;
    drop(old);
    settle(60 * S, || healthy(&nodes, min, max)).await;

    // It comes back with a new key at its address, and two nodes join
    // through it.
    let seed = node(&net, "s0", config(min, max)).await;
    nodes.insert(0, seed);
    for i in 0..2 {
        nodes.push(node(&net, &format!("b{i}"), seeded()).await);
    }
    let took = settled(120 * S, || {
        healthy(&nodes, min, max) && reachable(&adjacency(&nodes)) == nodes.len()
    })
    .await;
    let adj = adjacency(&nodes);
    assert!(
        took.is_some(),
        "one graph again: {} of {} nodes reachable from the seed, {adj:?}",
        reachable(&adj),
        nodes.len()
    );
    eprintln!("one graph {took:?} after the seed's restart (simulated)");
    shutdown_all(nodes).await;
}

/// Nodes that join through a full seed are refused with the seed's peers
/// as alternatives, and join those: nothing for the operator, so no warning
/// that the seed cannot be reached (of 60 `meshwork node` processes started
/// together, 45 each logged one).
#[tokio::test(start_paused = true)]
async fn joining_through_a_full_seed_that_names_others_warns_nobody() {
    let (logs, _guard) = Captured::start(tracing::Level::WARN);

    let net = MemNetwork::new();
    let mut nodes = vec![node(&net, "s", config(1, 2)).await];
    for i in 0..4 {
        let c = config(1, 4).with_seed(addr("s"));
        nodes.push(node(&net, &format!("j{i}"), c).await);
        sleep(S).await;
    }
    settle(30 * S, || healthy(&nodes, 1, 4)).await;
    assert!(nodes[0].stats().refused > 0, "{:?}", nodes[0].stats());
    let text = logs.text();
    assert!(!text.contains("cannot reach seed"), "{text}");
    shutdown_all(nodes).await;
}

/// Every line the manager logs about a connection names the node that logs
/// it, the dialler's as the acceptor's: a dial's lines came without the
/// `peers{node=..}` span, so that in one process with many nodes (or one
/// log of many processes) half of the `peer connected` lines said nothing
/// of whose connection it was.
#[tokio::test(start_paused = true)]
async fn a_dialled_connection_is_logged_in_the_dialling_nodes_span() {
    let (logs, _guard) = Captured::start(tracing::Level::INFO);

    let net = MemNetwork::new();
    let a = node(&net, "a", config(1, 4)).await;
    let b = node(&net, "b", config(1, 4).with_seed(addr("a"))).await;
    b.wait_for_peers(1, 10 * S).await.unwrap();
    sleep(S).await;
    let text = logs.text();
    let connected: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("peer connected"))
        .collect();
    assert_eq!(connected.len(), 2, "{text}");
    for (who, direction) in [(&b, "Outbound"), (&a, "Inbound")] {
        let span = format!("peers{{node={}}}", who.node_id().short());
        assert!(
            connected
                .iter()
                .any(|l| l.contains(&span) && l.contains(direction)),
            "{text}"
        );
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// `n` nodes `{prefix}0..` at `min`-`max` peers with the library's default
/// timings (as `meshwork node` runs), each seeded with the one before it
/// (`meshscale.py --seeds chain`), started 50 ms apart, formed.
async fn chain(
    net: &MemNetwork,
    prefix: &str,
    n: usize,
    min: usize,
    max: usize,
) -> Vec<PeerManager> {
    let mut nodes = Vec::new();
    for i in 0..n {
        nodes.push(node(net, &format!("{prefix}{i}"), chained(prefix, i, min, max)).await);
        sleep(50 * MS).await;
    }
    settle(60 * S, || healthy(&nodes, min, max)).await;
    nodes
}

/// The settings of node `i` of a [`chain`].
fn chained(prefix: &str, i: usize, min: usize, max: usize) -> PeersConfig {
    let c = PeersConfig::default()
        .with_min_peers(min)
        .with_max_peers(max);
    match i {
        0 => c,
        _ => c.with_seed(addr(&format!("{prefix}{}", i - 1))),
    }
}

/// Kills nodes `which` of `nodes` as kill -9 would (no goodbye), leaving
/// their slots for [`restart`].
async fn crash(net: &MemNetwork, prefix: &str, nodes: &mut [Option<PeerManager>], which: &[usize]) {
    let hosts: Vec<String> = which.iter().map(|i| format!("{prefix}{i}")).collect();
    let hosts: Vec<&str> = hosts.iter().map(|h| h.as_str()).collect();
    let others: Vec<String> = (0..nodes.len())
        .filter(|i| !which.contains(i))
        .map(|i| format!("{prefix}{i}"))
        .collect();
    let others: Vec<&str> = others.iter().map(|h| h.as_str()).collect();
    // Cut first, so that nothing they say on the way down gets through.
    net.partition(&hosts, &others);
    for h in &hosts {
        net.crash(h);
    }
    for &i in which {
        if let Some(n) = nodes[i].take() {
            n.shutdown().await;
        }
    }
    net.heal();
}

fn live(nodes: &[Option<PeerManager>]) -> Vec<&PeerManager> {
    nodes.iter().flatten().collect()
}

/// Every slot of `nodes` running, and [`healthy`].
fn healthy_all(nodes: &[Option<PeerManager>], min: usize, max: usize) -> bool {
    nodes.iter().all(Option::is_some) && healthy(&live(nodes), min, max)
}

/// Without `--key`, a restarted node comes back under a fresh id. Its old
/// id was passed around in discovery as long as nobody's dial of it
/// failed, and nodes content with their pools never dial: `meshscale.py
/// churn` found 30+ old ids listed as `known` in every `/status` after
/// three waves of restarts, 10 minutes and more after. Discovery now
/// carries how long ago some node was last linked to each entry, and an
/// entry nobody has vouched for within the lost-peer window is neither
/// passed on nor kept (save by the nodes that lost it themselves, which
/// list it as disconnected). A 16-node 2/3 chain, gossip spread for 90 s
/// (every node hears of every other), nodes 3, 7, 10 and 13 crash and come
/// back with fresh ids 35 s later: within the window and a margin after
/// the crash, no node lists an old id as known.
#[tokio::test(start_paused = true)]
async fn the_old_ids_of_restarted_nodes_are_forgotten() {
    let net = MemNetwork::new();
    let (min, max) = (2, 3);
    let victims = [3, 7, 10, 13];
    let formed = chain(&net, "o", 16, min, max).await;
    // The default lost-peer window, as `chained` leaves it.
    let window = 600 * S;
    let mut nodes: Vec<Option<PeerManager>> = formed.into_iter().map(Some).collect();
    sleep(90 * S).await;
    let old = ids(&nodes, &victims);
    assert!(
        known(&nodes, &old) > 0,
        "gossip spread no old id beyond its peers"
    );

    crash(&net, "o", &mut nodes, &victims).await;
    let crashed = Instant::now();
    sleep(35 * S).await;
    for i in victims {
        nodes[i] = Some(node(&net, &format!("o{i}"), chained("o", i, min, max)).await);
    }
    settle(60 * S, || healthy_all(&nodes, min, max)).await;
    let until = window + 90 * S;
    let gone = settled(until.saturating_sub(crashed.elapsed()), || {
        known(&nodes, &old) == 0
    })
    .await;
    let after = crashed.elapsed();
    assert!(
        gone.is_some(),
        "{} old ids still listed as known {after:?} after the crash",
        known(&nodes, &old)
    );
    eprintln!("old ids forgotten {after:?} after the crash (simulated)");
    // Nothing the mesh needs went with them.
    assert!(healthy_all(&nodes, min, max));
    shutdown_all(nodes.into_iter().flatten().collect()).await;
}

/// The ids of nodes `which`.
fn ids(nodes: &[Option<PeerManager>], which: &[usize]) -> Vec<NodeId> {
    which
        .iter()
        .filter_map(|&i| nodes[i].as_ref())
        .map(|n| n.node_id().clone())
        .collect()
}

/// How many times the running nodes list one of `old` as known (heard
/// of, never linked).
fn known(nodes: &[Option<PeerManager>], old: &[NodeId]) -> usize {
    live(nodes)
        .iter()
        .flat_map(|n| n.peers())
        .filter(|p| p.state == PeerState::Known && old.contains(&p.node_id))
        .count()
}

/// `meshscale.py churn 30 --min 2 --max 3 --seeds chain`: three waves of
/// seven crashes, each node back with a fresh id 35 s later. A node whose
/// seed answered its dial when its pool was full keeps the seed's node id
/// without ever linking to it: restarted with a fresh id, that old id
/// stayed known for good, as a seed's node (1 to 3 such ids in 4 runs of
/// 5; 3 with processes). Within the lost-peer window and a margin after
/// the last wave, no old id is known anywhere.
#[tokio::test(start_paused = true)]
async fn three_waves_of_restarts_leave_no_old_id_known() {
    let net = MemNetwork::new();
    let (min, max) = (2, 3);
    let formed = chain(&net, "w", 30, min, max).await;
    let mut nodes: Vec<Option<PeerManager>> = formed.into_iter().map(Some).collect();
    sleep(10 * S).await;
    let mut old = Vec::new();
    let waves = [
        [2, 4, 8, 18, 24, 25, 27],
        [3, 12, 14, 15, 20, 24, 28],
        [0, 3, 6, 12, 13, 15, 25],
    ];
    for victims in waves {
        old.extend(ids(&nodes, &victims));
        crash(&net, "w", &mut nodes, &victims).await;
        sleep(35 * S).await;
        for i in victims {
            nodes[i] = Some(node(&net, &format!("w{i}"), chained("w", i, min, max)).await);
        }
        settle(180 * S, || healthy_all(&nodes, min, max)).await;
    }
    // The default lost-peer window, and a margin.
    let gone = settled(700 * S, || known(&nodes, &old) == 0).await;
    assert!(
        gone.is_some(),
        "{} old ids still known",
        known(&nodes, &old)
    );
    assert!(healthy_all(&nodes, min, max));
    shutdown_all(nodes.into_iter().flatten().collect()).await;
}

/// A 2/3 chain (`meshscale.py churn 40 --min 2 --max 3 --seeds chain`):
/// nodes 0 (no seed) and 1 (seed: node 0) crash, stay down for 35 s (as
/// long as the script's wait), and come back together with fresh ids.
/// They know only each other, so their asks for more peers go unanswered;
/// the mesh must come to them, within seconds. Before, their former peers
/// redialled their addresses at a backoff grown while they were down, and
/// a full seeder never: 12 to 31 s in every run. Now 1 to 4 s in 57 runs
/// of 60, 24 s in 3 (their former peers all full, none of them seeding
/// them: gossip finds them; 2 of 75 in a later count). Five meshes: the
/// median within 10 s (two slow meshes of five are a few in 10 000 runs),
/// all within 60 s.
#[tokio::test(start_paused = true)]
async fn two_restarted_nodes_that_know_only_each_other_rejoin_within_seconds() {
    let mut took = Vec::new();
    for _ in 0..5 {
        took.push(restart_the_first_two_of_a_chain().await);
    }
    took.sort();
    eprintln!("one graph {took:?} after the restart (simulated)");
    assert!(took[2] <= 10 * S && took[4] <= 60 * S, "{took:?}");
}

/// The mesh of [`two_restarted_nodes_that_know_only_each_other_rejoin_within_seconds`]:
/// how long after the restart it is one graph again.
async fn restart_the_first_two_of_a_chain() -> Duration {
    let net = MemNetwork::new();
    let (min, max) = (2, 3);
    let formed = chain(&net, "k", 16, min, max).await;
    let mut nodes: Vec<Option<PeerManager>> = formed.into_iter().map(Some).collect();
    crash(&net, "k", &mut nodes, &[0, 1]).await;
    sleep(35 * S).await;
    for i in [0, 1] {
        nodes[i] = Some(node(&net, &format!("k{i}"), chained("k", i, min, max)).await);
    }
    let one = || reachable(&adjacency(&live(&nodes))) == nodes.len();
    let took = settled(180 * S, one).await.unwrap_or(180 * S);
    settle(60 * S, || healthy_all(&nodes, min, max)).await;
    shutdown_all(nodes.into_iter().flatten().collect()).await;
    took
}

/// Two parts of a sparse mesh joined only through two nodes that dialled
/// into both: when those two crash, every other node keeps `min_peers`
/// (it lost an inbound link, and had one to spare), so nobody dialled and
/// the parts stayed apart for good (`meshscale.py churn 40 --min 2 --max 3
/// --seeds chain`: survivors in parts of 14 and 16, and of 5 and 25, for
/// the 150 s the script waits). The nodes that lost a link to a bridge
/// dial its other peers: one graph again within seconds.
#[tokio::test(start_paused = true)]
async fn the_parts_a_crash_leaves_find_each_other() {
    let mut took = Vec::new();
    // A mesh whose parts have no node with room for a bridge is laid out
    // again.
    for run in 0..12 {
        if took.len() == 3 {
            break;
        }
        if let Some(t) = bridges_crash(run).await {
            took.push(t);
        }
    }
    eprintln!("one graph after {took:?} (simulated)");
    assert_eq!(took.len(), 3, "meshes laid out as wanted");
    assert!(
        took.iter().all(|t| t.is_some_and(|t| t <= 10 * S)),
        "{took:?}"
    );
}

/// The mesh of [`the_parts_a_crash_leaves_find_each_other`]: how long
/// after the crash it is one graph again (`None`: not within 5 minutes);
/// `None` if no node of a part had room for a bridge.
async fn bridges_crash(run: usize) -> Option<Option<Duration>> {
    let net = MemNetwork::new();
    let (min, max) = (2, 3);
    let mut nodes: Vec<Option<PeerManager>> = Vec::new();
    // Parts a and b, 2/3 chains of their own.
    for part in ["a", "b"] {
        for n in chain(&net, &format!("{part}{run}-"), 10, min, max).await {
            nodes.push(Some(n));
        }
    }
    // Two bridges, each seeded with a node of each part that has room for
    // it (the first and the last such).
    let bridges = [format!("x{run}-0"), format!("x{run}-1")];
    for (k, x) in bridges.iter().enumerate() {
        let with_room = |part: usize| {
            let room = (0..10).filter(|&i| {
                nodes[part * 10 + i]
                    .as_ref()
                    .is_some_and(|n| n.connected().len() < max)
            });
            if k == 0 { room.min() } else { room.max() }
        };
        let (Some(a), Some(b)) = (with_room(0), with_room(1)) else {
            shutdown_all(nodes.into_iter().flatten().collect()).await;
            return None;
        };
        let c = PeersConfig::default()
            .with_min_peers(min)
            .with_max_peers(max)
            .with_seed(addr(&format!("a{run}-{a}")))
            .with_seed(addr(&format!("b{run}-{b}")));
        nodes.push(Some(node(&net, x, c).await));
        let ids: Vec<NodeId> = live(&nodes).iter().map(|n| n.node_id().clone()).collect();
        let spans = |nodes: &[Option<PeerManager>]| {
            let linked = nodes.last().and_then(Option::as_ref).map(|n| n.connected());
            let to = |part: &[NodeId]| linked.iter().flatten().any(|p| part.contains(&p.node_id));
            to(&ids[..10]) && to(&ids[10..20])
        };
        if settled(10 * S, || spans(&nodes)).await.is_none() {
            shutdown_all(nodes.into_iter().flatten().collect()).await;
            return None;
        }
    }
    let one = |nodes: &[Option<PeerManager>]| {
        let live = live(nodes);
        reachable(&adjacency(&live)) == live.len()
    };
    settle(60 * S, || one(&nodes)).await;
    // Gossip spreads the books across the bridges.
    sleep(90 * S).await;
    // The bridges crash (kill -9: no goodbye).
    let others: Vec<String> = (0..10)
        .flat_map(|i| [format!("a{run}-{i}"), format!("b{run}-{i}")])
        .collect();
    let others: Vec<&str> = others.iter().map(String::as_str).collect();
    net.partition(&[&bridges[0], &bridges[1]], &others);
    for (x, i) in bridges.iter().zip([20, 21]) {
        net.crash(x);
        if let Some(n) = nodes[i].take() {
            n.shutdown().await;
        }
    }
    net.heal();
    let took = settled(300 * S, || one(&nodes)).await;
    shutdown_all(nodes.into_iter().flatten().collect()).await;
    Some(took)
}

/// The settings of node `i` of a mesh laid out as `tools/restarts.py` lays
/// out its processes: `min`-`max` peers with the library's default timings
/// (as `meshwork node` runs), node `i` seeded with node `i - 1`, every third
/// with node 0.
fn restarts_py(prefix: &str, i: usize, min: usize, max: usize) -> PeersConfig {
    if i > 0 && i % 3 == 0 {
        chained(prefix, 0, min, max).with_seed(addr(&format!("{prefix}0")))
    } else {
        chained(prefix, i, min, max)
    }
}

/// Every running node of `nodes` full: at `max` peers, the default two of
/// them dialled by the node itself.
fn saturated(nodes: &[Option<PeerManager>], max: usize) -> bool {
    live(nodes).iter().all(|n| {
        let s = n.stats();
        s.connected == max && s.outbound == 2
    })
}

/// At 2/4 with the default two outbound slots kept, each node's own two
/// dials and two diallers can fill every slot of every node.
/// `tools/restarts.py` found a node restarted with a fresh id into such a
/// mesh (its neighbours had refilled their pools among themselves) alone
/// for 20 s and more after 5 restarts of 18: every pool full, nobody with a
/// borrowed slot to give back, and the newcomer known to nobody longer
/// than their inbound peers. Here the eight nodes of `restarts.py`, node 3
/// crashed, the other seven full (every slot of every node), node 3 back
/// with a fresh id: it had no peer 20 s after its restart before, in 10
/// runs of 10. Peers now tell each other their counts (Hello, Pongs): a
/// full pool hands a dialler with no peer the slot of an inbound peer with
/// peers to spare, and node 3 has its two peers within seconds (the
/// second one the peer that gave way, dialling to refill its outbound
/// share), every other node keeping at least its two. The peers that gave
/// way are not alone, so they take nobody's slot in turn: over the next
/// 10 minutes no slot changes hands. Then nodes 5 and 6 crash and come
/// back with fresh ids in turn, as `restarts.py` restarts them.
#[tokio::test(start_paused = true)]
async fn a_node_new_to_a_saturated_mesh_is_handed_a_slot() {
    let (min, max) = (2, 4);
    let mut tries = 0;
    // The seven fill every slot in most runs; a run that leaves a free
    // slot has room for node 3 anyway and proves nothing here: built again.
    let (net, mut nodes) = loop {
        tries += 1;
        let net = MemNetwork::new();
        let mut nodes: Vec<Option<PeerManager>> = Vec::new();
        for i in 0..8 {
            let n = node(&net, &format!("r{i}"), restarts_py("r", i, min, max)).await;
            nodes.push(Some(n));
            sleep(50 * MS).await;
        }
        settle(60 * S, || healthy_all(&nodes, min, max)).await;
        crash(&net, "r", &mut nodes, &[3]).await;
        let full = settled(60 * S, || saturated(&nodes, max)).await;
        if full.is_some() {
            break (net, nodes);
        }
        assert!(tries < 10, "the seven did not fill up in {tries} tries");
        shutdown_all(nodes.into_iter().flatten().collect()).await;
    };
    let handovers = |nodes: &[Option<PeerManager>]| -> u64 {
        live(nodes).iter().map(|n| n.stats().handovers).sum()
    };
    let before = handovers(&nodes);

    nodes[3] = Some(node(&net, "r3", restarts_py("r", 3, min, max)).await);
    let newcomer = |nodes: &[Option<PeerManager>]| nodes[3].as_ref().unwrap().stats().connected;
    let took = settled(20 * S, || newcomer(&nodes) >= min).await;
    assert!(
        took.is_some(),
        "node 3 has {} peers 20 s after its restart",
        newcomer(&nodes)
    );
    eprintln!("node 3 had {min} peers {took:?} after its restart");
    assert!(live(&nodes).iter().all(|n| n.stats().connected >= min));
    // No chain of evictions follows.
    let after_join = handovers(&nodes);
    assert!(after_join > before);
    sleep(600 * S).await;
    assert!(healthy_all(&nodes, min, max));
    assert_eq!(handovers(&nodes), after_join, "slots changed hands later");

    for i in [5, 6] {
        crash(&net, "r", &mut nodes, &[i]).await;
        sleep(S).await;
        let name = format!("r{i}");
        nodes[i] = Some(node(&net, &name, restarts_py("r", i, min, max)).await);
        let back = settled(20 * S, || nodes[i].as_ref().unwrap().stats().connected > 0).await;
        assert!(back.is_some(), "node {i} alone 20 s after its restart");
        settle(120 * S, || healthy_all(&nodes, min, max)).await;
    }
    eprintln!("{} slots handed to nodes with no peer", handovers(&nodes));
    shutdown_all(nodes.into_iter().flatten().collect()).await;
}

/// A peer's count of its peers, as it tells it (its Hello, then its
/// Pongs), shows in the snapshot of it (and so in `/status`): an operator
/// sees which neighbours are full.
#[tokio::test(start_paused = true)]
async fn a_peers_told_count_shows_in_its_snapshot() {
    let net = MemNetwork::new();
    let a = node(&net, "pc-a", config(1, 4)).await;
    let b = node(&net, "pc-b", config(3, 4).with_seed(addr("pc-a"))).await;
    let told = |n: &PeerManager, of: &PeerManager| {
        n.peers()
            .into_iter()
            .find(|p| &p.node_id == of.node_id())
            .and_then(|p| p.peer_count)
            .map(|c| (c.linked, c.min_peers))
    };
    // b has one peer (a) and wants three; a has one and wants one.
    settle(30 * S, || {
        told(&a, &b) == Some((1, 3)) && told(&b, &a) == Some((1, 1))
    })
    .await;
    b.shutdown().await;
    settle(10 * S, || told(&a, &b).is_none()).await;
    a.shutdown().await;
}
