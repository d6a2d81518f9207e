//! Helpers shared by the RPC test files: a bare peer (a peer manager of a
//! fresh identity, no concerns) that links to a node and sends it frames
//! of its own making. Each test file uses some of them.

#![allow(dead_code, unreachable_pub)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshwork::Node;
use meshwork::concerns::peers::{ConcernFrame, InboundHandler, PeerManager, PeersConfig};
use meshwork::transport::mem::MemNetwork;
use meshwork::transport::{Address, Config, ConnectionHandle, Endpoint, Priority};
use meshwork::wire::proto::ConcernKind;
use meshwork::wire::{Message, NodeId};
use meshwork_rpc::sync::proto::{Entries, Entry, SyncMessage, sync_message};
use meshwork_rpc::sync::{SYNC, SyncConfig};
use prost::Message as _;
use tokio::time::{Instant, sleep};

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);

/// Keeps the concern frames a bare peer receives (up to 10 000).
pub struct Tap(pub Arc<Mutex<Vec<ConcernFrame>>>);

impl InboundHandler for Tap {
    fn on_concern(&self, _from: &NodeId, _conn: &ConnectionHandle, message: ConcernFrame) {
        let mut frames = self.0.lock().unwrap();
        if frames.len() < 10_000 {
            frames.push(message);
        }
    }
}

/// A bare peer manager (a fresh identity) on network `network`
/// (plaintext, as the tests' nodes run), seeded with `victim` listening at
/// `mem://{victim_host}`, linked to it, keeping what it receives in `tap`;
/// `None` if it did not link within 5 s (the victim's pool may be full of
/// banned identities' leftovers for a while).
pub async fn neighbour(
    net: &MemNetwork,
    network: &str,
    host: &str,
    victim_host: &str,
    victim: &Node,
    tap: &Arc<Mutex<Vec<ConcernFrame>>>,
) -> Option<PeerManager> {
    // What the facade's nodes require of their peers (sync's settings).
    let config = SyncConfig::default().required_metadata().into_iter().fold(
        Config::new(network).with_insecure_plaintext(),
        |c, (k, v)| c.with_required_metadata(k, v),
    );
    let endpoint = Endpoint::new(config, net.transport(host));
    endpoint.listen(&Address::mem(host)).await.unwrap();
    let peers = PeersConfig::default()
        .with_seed(Address::mem(victim_host))
        .with_heartbeat(100 * MS, 500 * MS, 1000 * MS)
        .with_backoff(50 * MS, 400 * MS);
    let m = PeerManager::start(endpoint, peers).unwrap();
    m.set_inbound_handler(Arc::new(Tap(tap.clone()))).unwrap();
    let deadline = Instant::now() + 5 * S;
    while !m.is_neighbour(victim.node_id()) {
        if Instant::now() >= deadline {
            m.shutdown().await;
            return None;
        }
        sleep(10 * MS).await;
    }
    Some(m)
}

/// A node on network `network` at `mem://{host}` (plaintext, default RPC
/// settings, quick heartbeats and redials), to start.
pub fn builder(net: &MemNetwork, network: &str, host: &str) -> meshwork::NodeBuilder {
    Node::builder(network)
        .transport(net.transport(host))
        .listen(Address::mem(host))
        .insecure_plaintext()
        .rpc_config(meshwork_rpc::RpcConfig::default())
        .peers(|c| {
            c.with_heartbeat(100 * MS, 500 * MS, 1000 * MS)
                .with_backoff(50 * MS, 400 * MS)
                .with_discovery(500 * MS, 16)
        })
}

/// A sync frame to send: a request when `request_id` is not 0.
pub fn sync_frame(request_id: u64, body: sync_message::Body) -> ConcernFrame {
    request_frame(
        SYNC,
        request_id,
        SyncMessage { body: Some(body) }.encode_to_vec(),
    )
}

/// An RPC frame to send: `body` as a request `request_id` (one-way if 0).
pub fn rpc_request(request_id: u64, body: meshwork_rpc::proto::rpc_message::Body) -> ConcernFrame {
    let message = meshwork_rpc::proto::RpcMessage { body: Some(body) };
    request_frame(meshwork_rpc::RPC, request_id, message.encode_to_vec())
}

/// A request frame of `command` carrying `payload`.
pub fn request_frame(command: u32, request_id: u64, payload: Vec<u8>) -> ConcernFrame {
    ConcernFrame {
        command,
        request_id,
        kind: ConcernKind::Request as i32,
        ttl: 0,
        flags: 0,
        payload: payload.into(),
    }
}

/// Sends `victim`, from the bare peer `m`, entries claiming to be written
/// by other nodes: `(key, value, writer)`, stamped at the victim's clock
/// with an hour's lease. Entries are not signed (sync.md says what that
/// allows), so the victim takes them as the writers'.
pub async fn forge_entries(m: &PeerManager, victim: &Node, entries: &[(String, Vec<u8>, NodeId)]) {
    let stamp = victim.sync().now_ms() << 16;
    let entries = entries
        .iter()
        .map(|(key, value, writer)| Entry {
            key: key.clone().into(),
            value: value.clone().into(),
            stamp,
            writer: writer.as_bytes().clone(),
            epoch: 1,
            lease_delta: 3_600_000,
            ..Entry::default()
        })
        .collect();
    let body = sync_message::Body::Entries(Entries {
        entries,
        repair: false,
    });
    m.send(
        victim.node_id(),
        Message::Concern(sync_frame(0, body)),
        Priority::Normal,
    )
    .await
    .unwrap();
}
