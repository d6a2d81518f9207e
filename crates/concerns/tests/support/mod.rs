//! Helpers shared by the concerns layer's integration tests.

// Each test file uses some of these.
#![allow(dead_code)]

use meshwork_concerns::ROUTING;
use meshwork_concerns::peers::ConcernFrame;
use meshwork_concerns::transport::mem::MemNetwork;
use meshwork_concerns::transport::{Config, Endpoint};
use meshwork_concerns::wire::proto::route_message::Body;
use meshwork_concerns::wire::proto::{ConcernKind, RouteMessage};
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
