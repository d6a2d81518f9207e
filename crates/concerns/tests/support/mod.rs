//! Helpers shared by the concerns layer's integration tests.

// Each test file uses some of these.
#![allow(dead_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use meshwork_concerns::peers::ConcernFrame;
use meshwork_concerns::sign_flooded;
use meshwork_concerns::transport::mem::MemNetwork;
use meshwork_concerns::transport::{Config, Endpoint, Identity};
use meshwork_concerns::wire::proto::route_message::Body;
use meshwork_concerns::wire::proto::{ConcernKind, Flooded, RouteMessage};
use meshwork_concerns::{Concerns, ROUTING};
use prost::Message as _;

/// An endpoint of the tests' network listening on `mem://name`: plaintext,
/// no keepalives (the paused clock would fire them at will).
pub(crate) async fn listening(net: &MemNetwork, name: &str) -> Endpoint {
    let transport = Config::new("concerns-test")
        .with_insecure_plaintext()
        .with_keepalive(None, None);
    let endpoint = Endpoint::new(transport, net.transport(name));
    endpoint
        .listen(&format!("mem://{name}").parse().unwrap())
        .await
        .unwrap();
    endpoint
}

/// The wall clock in ms since the Unix epoch, as the concerns stamp their
/// messages (their start, advanced by tokio's paused clock: close enough
/// here).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A routing concern frame carrying `body`, as one neighbour sends another.
pub(crate) fn routing_frame(body: Body) -> ConcernFrame {
    ConcernFrame {
        command: ROUTING,
        request_id: 0,
        kind: ConcernKind::Request as i32,
        ttl: 0,
        flags: 0,
        payload: RouteMessage { body: Some(body) }.encode_to_vec().into(),
    }
}

/// A Flood frame's payload from `origin`, stamped now and signed by it, as
/// the origin's node would send it.
pub(crate) fn flood_frame(
    origin: &Identity,
    message_id: u64,
    command: u32,
    payload: impl Into<Bytes>,
    ttl: u32,
) -> Flooded {
    let mut f = Flooded {
        origin: origin.node_id().as_bytes().clone(),
        message_id,
        command,
        payload: payload.into(),
        ttl,
        sent_at_ms: unix_ms(),
        signature: Bytes::new(),
    };
    sign_flooded(origin, &mut f);
    f
}

/// Counter `name` of the built-in concern `concern` (e.g. "flood") of `node`.
pub(crate) fn builtin_stat(node: &Concerns, concern: &str, name: &str) -> u64 {
    node.builtin_stats()
        .into_iter()
        .find(|(c, k, _)| *c == concern && *k == name)
        .map_or(0, |(_, _, v)| v)
}
