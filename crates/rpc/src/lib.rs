//! meshwork-rpc: typed services served on one node and called from any
//! other.
//!
//! This layer owns services and their proxies. A node serves an object
//! under a name ([`Rpc::serve`]); the registration is an ephemeral key of
//! the synced map (`rpc/services/{name}/{node}`), so every node learns who
//! serves what, and a node that stops or dies disappears from it. Any node
//! asks for a typed client by name ([`Rpc::client`]) and calls methods as
//! if they were local. Each call:
//!
//! - chooses a provider from the registry: this node first, then
//!   neighbours, then nodes reached through the routing concern; among
//!   those, the better of two random ones by latency and recent failures;
//! - carries its deadline as a relative budget; the provider stops the work
//!   when it runs out, and dropping the call's future cancels it there;
//! - fails over: a call that could not be delivered is tried on another
//!   provider, and so is a timed-out call of a method marked idempotent,
//!   within a retry budget;
//! - fails with one error enum, [`RpcError`], whose
//!   [`Application`](RpcError::Application) variant carries the method's
//!   own error type.
//!
//! Only services that were explicitly served are reachable; nothing is
//! loaded or run by name. [`Rpc::call_raw`] is the untyped path for tools.
//!
//! The [`service`](macro@service) attribute turns a trait of async methods into a server
//! adapter (`FooServer`) and a typed client (`FooClient`); see its docs for
//! exactly what it generates.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use meshwork_rpc::{Rpc, RpcConfig, RpcError, service};
//! use meshwork_rpc::sync::{SyncConfig, SyncMap};
//! use meshwork_rpc::sync::concerns::Concerns;
//! use meshwork_rpc::sync::concerns::peers::{PeerManager, PeersConfig};
//! use meshwork_rpc::sync::concerns::transport::{Config, Endpoint, mem::MemNetwork};
//!
//! #[service]
//! pub trait Calc {
//!     async fn add(&self, a: i64, b: i64) -> i64;
//!     async fn div(&self, a: i64, b: i64) -> Result<i64, String>;
//! }
//!
//! struct MyCalc;
//!
//! impl Calc for MyCalc {
//!     async fn add(&self, a: i64, b: i64) -> i64 { a + b }
//!     async fn div(&self, a: i64, b: i64) -> Result<i64, String> {
//!         if b == 0 { Err("division by zero".into()) } else { Ok(a / b) }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let net = MemNetwork::new();
//! let mut nodes = Vec::new();
//! for name in ["a", "b"] {
//!     let (key, value) = SyncConfig::default().hello_metadata();
//!     let config = Config::new("example").with_required_metadata(key, value);
//!     let endpoint = Endpoint::new(config, net.transport(name));
//!     endpoint.listen(&format!("mem://{name}").parse()?).await?;
//!     let seeds = if name == "b" { vec!["mem://a".parse()?] } else { vec![] };
//!     let peers = PeerManager::start(endpoint, PeersConfig::default().with_seeds(seeds))?;
//!     let concerns = Concerns::builder(peers.clone()).start().await?;
//!     let sync = SyncMap::start(&concerns, SyncConfig::default()).await?;
//!     let rpc = Rpc::start(&concerns, &sync, RpcConfig::default()).await?;
//!     nodes.push((rpc, sync, concerns, peers));
//! }
//! nodes[1].3.wait_for_peers(1, Duration::from_secs(5)).await?;
//!
//! nodes[0].0.serve("calc", CalcServer::new(MyCalc)).await?;
//! let key = format!("rpc/services/calc/{}", nodes[0].0.node_id());
//! nodes[0].1.confirm(&key, Duration::from_secs(5)).await?; // b knows of it
//!
//! let calc: CalcClient = nodes[1].0.client("calc");
//! assert_eq!(calc.add(2, 3).await?, 5);
//! assert_eq!(calc.div(1, 0).await, Err(RpcError::Application("division by zero".into())));
//!
//! for (rpc, sync, concerns, peers) in nodes {
//!     rpc.shutdown().await;
//!     sync.shutdown().await;
//!     concerns.shutdown().await;
//!     peers.shutdown().await;
//! }
//! # Ok(())
//! # }
//! ```

mod balance;
mod codec;
mod error;
mod rpc;
mod service;

/// The generated protobuf messages of the RPC layer (`proto/rpc.proto`).
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/meshwork.rpc.v1.rs"));
}

/// The sync layer underneath, for the layers above.
pub use meshwork_sync as sync;

pub use codec::Codec;
pub use error::{NoError, RpcError};
pub use meshwork_rpc_macros::service;
pub use rpc::{
    CallOptions, CallStats, Client, MAX_METHODS, MAX_PROVIDERS, MAX_RECORD_BYTES, MAX_SERVICE_NAME,
    Provider, REGISTRY_PREFIX, RPC, Rpc, RpcConfig, ServedStats, ServiceRecord, check_service_name,
};
pub use service::{CallCancel, CallContext, Service, ServiceClient, ServiceError, call_context};

/// What the `#[service]` macro's expansion refers to. Not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use async_trait::async_trait;
    pub use bytes::Bytes;
    pub use serde;
    pub use serde_bytes;

    pub use crate::rpc::unframe;
}
