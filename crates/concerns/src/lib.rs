//! meshwork-concerns: pluggable message handlers on top of the peer manager.
//!
//! This layer owns what the Concern frames between peers *mean*. A
//! [`Concern`] handles one command id: it answers requests, may send
//! messages of its own through its [`Context`], runs an optional periodic
//! [`tick`](Concern::tick), and hears about its own lifecycle and the fate of
//! what it sent (p2p0mq's concerns, made async and isolated).
//!
//! - **Dispatch**: requests go to their concern through one bounded queue
//!   per sender, served in turn, with a concurrency limit per concern: a
//!   peer that floods fills its own queue and is answered
//!   [`Overloaded`](wire::proto::ErrorCode::Overloaded) while every other
//!   peer keeps its turn. A handler that fails or panics becomes an error
//!   reply and a count; the node carries on. Unknown command ids get an error
//!   reply. Replies are matched to waiting requests by id and sender; waits
//!   have timeouts.
//! - **Priorities**: requests and replies choose their lane (control,
//!   normal, bulk) end to end; replies never wait in the request queues.
//! - **Built-in concerns** (installed unless
//!   [`ConcernsBuilder::only`] says otherwise):
//!   - *flood* ([`Context::broadcast`]): a message for every node, with a
//!     hop TTL, signed by its origin (no node can broadcast in another's
//!     name or alter what it relays) and deduplicated by origin while its
//!     stamp is fresh, so each node delivers and relays it once;
//!   - *routing* ([`Context::send_to`], [`Context::request_to`]): reach a
//!     node that is not a neighbour; routes are found by asking around
//!     (TTL-bounded, deduplicated, loop-free), cached with expiry, and
//!     replies come back the same way; [`Concerns::routes`] lists them.
//!     Routed messages are sealed by their origin for their target (the
//!     nodes on the way cannot read, alter, forge or replay them);
//!   - *topics* ([`Concerns::subscribe`], [`Concerns::publish`]): every
//!     subscriber in the mesh receives each publication once, except the
//!     publisher's own subscriptions (a publication travels as a flood).
//!
//! `docs/protocol.md` (section 10) specifies the payloads and rules.
//!
//! # Example
//!
//! An echo concern on one node, asked by another:
//!
//! ```
//! use std::time::Duration;
//! use async_trait::async_trait;
//! use bytes::Bytes;
//! use meshwork_concerns::peers::{PeerManager, PeersConfig};
//! use meshwork_concerns::transport::{Config, Endpoint, mem::MemNetwork};
//! use meshwork_concerns::wire::NodeId;
//! use meshwork_concerns::{BoxError, Concern, Concerns, Context, Reply};
//!
//! struct Echo;
//!
//! #[async_trait]
//! impl Concern for Echo {
//!     fn command(&self) -> u32 { 7 }
//!     async fn on_request(&self, _: &Context, _: &NodeId, payload: Bytes)
//!         -> Result<Option<Reply>, BoxError> {
//!         Ok(Some(Reply::new(payload)))
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let net = MemNetwork::new();
//! let mut nodes = Vec::new();
//! for name in ["a", "b"] {
//!     let endpoint = Endpoint::new(Config::new("example"), net.transport(name));
//!     endpoint.listen(&format!("mem://{name}").parse()?).await?;
//!     let seeds = if name == "b" { vec!["mem://a".parse()?] } else { vec![] };
//!     let peers = PeerManager::start(endpoint, PeersConfig::default().with_seeds(seeds))?;
//!     nodes.push(Concerns::builder(peers).concern(Echo).start().await?);
//! }
//! let (a, b) = (&nodes[0], &nodes[1]);
//! b.peers().wait_for_peers(1, Duration::from_secs(5)).await?;
//! let reply = b.context(7).request(a.peers().node_id(), "hi", Duration::from_secs(5)).await?;
//! assert_eq!(reply, Bytes::from("hi"));
//! for node in nodes {
//!     node.shutdown().await;
//!     node.peers().shutdown().await;
//! }
//! # Ok(())
//! # }
//! ```
mod budget;
mod clock;
mod concern;
mod context;
mod error;
mod fair;
mod flood;
mod manager;
mod pending;
mod replay;
mod route;
mod routing;
mod seen;
mod topics;
mod warn;

/// The peer manager underneath, for the layers above.
pub use meshwork_peers as peers;
/// The transport layer, for the layers above.
pub use meshwork_peers::transport;
/// The wire layer, for the layers above.
pub use meshwork_peers::wire;

/// Re-exported: [`Concern`] implementations need the macro and the type.
pub use async_trait::async_trait;
/// Re-exported: payloads are `Bytes`.
pub use bytes::Bytes;
pub use clock::ClockSteps;
pub use concern::{Concern, Reply, Via};
pub use context::Context;
pub use error::{BoxError, ConcernsError};
pub use flood::sign_flooded;
pub use manager::{
    ConcernStats, Concerns, ConcernsBuilder, ConcernsConfig, FLOOD, FORWARD_WAIT,
    RESERVED_COMMANDS, ROUTING, TOPICS,
};
pub use route::Route;
pub use routing::{sign_route_found, sign_route_query};
pub use topics::{MAX_TOPIC_LEN, Publication, Subscription};
