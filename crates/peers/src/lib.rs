//! meshwork-peers: the peer manager.
//!
//! This layer owns *which* peers a node is connected to and how healthy they
//! are. On top of a transport [`Endpoint`](meshwork_transport::Endpoint) it
//! keeps a pool between `min_peers` and `max_peers`:
//!
//! - **Pool**: dials the seeds, then whatever the address book offers while
//!   below `min_peers`, with at most `max_pending_dials` in flight and an
//!   exponential, jittered backoff per peer. Inbound peers beyond their
//!   share (`max_peers` minus the slots reserved for our own dials) are
//!   refused with Disconnect(too many peers) naming other peers to try.
//!   Crossed dials between two nodes resolve to the same single connection
//!   on both sides (the one opened by the smaller node id), and the end
//!   that learns of the other's choice before its own copy of the survivor
//!   is through does not lose the peer meanwhile. Addresses that turn out
//!   to be our own are dropped.
//! - **Discovery**: a bounded address book, fed by Hellos, by `Discovered`
//!   lists that peers exchange on connect, periodically, and on the ask of
//!   a node below `min_peers` with nobody left to dial, and by the
//!   alternatives of refusals. Connecting to one node of a mesh is enough to
//!   join it. Peers whose link broke are redialled for a while even above
//!   `min_peers`, which is what rejoins the halves of a healed partition.
//! - **Liveness**: any frame from a peer counts as a sign of life; a Ping
//!   goes out only after a quiet interval that stretches for long-idle
//!   healthy peers and snaps back on trouble. A silent peer becomes
//!   [`Unresponsive`](PeerState::Unresponsive) (only heartbeats go to it),
//!   then is disconnected.
//! - **Quality and selection**: error and timeout counts
//!   ([`report_error`](PeerManager::report_error),
//!   [`report_timeout`](PeerManager::report_timeout)) disconnect a peer at a
//!   maximum within a sliding window (10 minutes by default); a score combines RTT, failures and uptime;
//!   [`least_failed`](PeerManager::least_failed) and
//!   [`by_metadata`](PeerManager::by_metadata) choose at random weighted by
//!   score.
//! - **Interface to the layer above**: [`events`](PeerManager::events),
//!   [`send`](PeerManager::send) with priorities, and the queue of Concern
//!   messages ([`take_inbound`](PeerManager::take_inbound)).
//!
//! Every decision lives in a plain state machine (`pool.rs`) driven by time
//! and events and unit-tested without sockets; the tokio driver only carries
//! out its actions.
//!
//! # Example
//!
//! Three nodes on the in-memory network; `b` and `c` only know `a`, and
//! find each other through it:
//!
//! ```
//! use std::time::Duration;
//! use meshwork_peers::{PeerManager, PeersConfig};
//! use meshwork_transport::{Config, Endpoint, mem::MemNetwork};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let net = MemNetwork::new();
//! let mut nodes = Vec::new();
//! for name in ["a", "b", "c"] {
//!     let endpoint = Endpoint::new(Config::new("example"), net.transport(name));
//!     endpoint.listen(&format!("mem://{name}").parse()?).await?;
//!     let mut config = PeersConfig::default().with_min_peers(2);
//!     if name != "a" {
//!         config = config.with_seed("mem://a".parse()?);
//!     }
//!     nodes.push(PeerManager::start(endpoint, config)?);
//! }
//! for node in &nodes {
//!     node.wait_for_peers(2, Duration::from_secs(10)).await?;
//! }
//! let b = &nodes[1];
//! assert!(b.by_id(nodes[2].node_id()).is_some_and(|p| p.state.is_linked()));
//! for node in nodes {
//!     node.shutdown().await;
//! }
//! # Ok(())
//! # }
//! ```

mod backoff;
mod config;
mod error;
mod event;
mod heartbeat;
mod manager;
mod pool;
mod score;

/// The transport layer underneath, for the layers above.
pub use meshwork_transport as transport;
/// The wire layer underneath, for the layers above.
pub use meshwork_wire as wire;

pub use config::PeersConfig;

/// The longest any timeout, deadline or block counts for in meshwork: 100
/// years. A longer one, up to `Duration::MAX`, means "practically for
/// ever" and is cut to this, so that adding it to an instant cannot
/// overflow (which panics). The layers above cut what they are given to it.
pub const FOREVER: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 3600);
pub use error::PeersError;
pub use event::{Inbound, PeerEvent, PeerSnapshot, PeerState, SeedSnapshot};
pub use manager::{ConcernFrame, InboundHandler, PeerEvents, PeerManager, PoolStats};
