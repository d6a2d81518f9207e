//! meshwork-sync: a key-value map replicated across the mesh, with leases.
//!
//! This layer owns the replicated map: local writes and the lease rules,
//! the merge of writes from other nodes, tombstones, ephemeral keys, watches,
//! and the two ways writes travel, all as one concern of the layer below
//! (command [`SYNC`]):
//!
//! - **Eager push**: each write is pushed to the whole mesh at once along a
//!   broadcast tree (links that deliver duplicates are pruned, so each node
//!   receives a write about once), batched while the previous batch is on
//!   its way.
//! - **Anti-entropy**: every few seconds, and at once with every new peer,
//!   a node compares a digest of its replica with a peer's (a root hash,
//!   then 256 bucket hashes), pulls the entries of the buckets that differ in
//!   bounded chunks on the bulk lane, and pushes back what the peer lacks.
//!   Late joiners, reconnecting nodes and healed partitions converge; a lost
//!   push is repaired.
//!
//! Every write is stamped with a hybrid logical clock ([`Stamp`]). With
//! leasing on (the default, 1 hour), a write to a key whose live lease
//! another node holds is refused locally ([`SyncError::LeaseHeld`]);
//! concurrent claims of an open key resolve everywhere to the earliest
//! claim; the loser is told ([`ChangeKind::LeaseLost`]). With leasing off,
//! the last writer wins. The merge is a maximum under a total order
//! ([`Entry::beats`]), so it is commutative, associative and idempotent:
//! replicas that have seen the same writes are identical. `docs/sync.md`
//! gives the rules and their reasoning.
//!
//! What is left to the user: the leasing mode and times, and what values
//! mean (they are bytes; [`SyncMap::get_str`] reads text).
//!
//! # Example
//!
//! Two nodes on the in-memory network; a write on one appears on the
//! other, and the other cannot overwrite it while the lease lives:
//!
//! ```
//! use std::time::Duration;
//! use meshwork_sync::concerns::Concerns;
//! use meshwork_sync::concerns::peers::{PeerManager, PeersConfig};
//! use meshwork_sync::concerns::transport::{Config, Endpoint, mem::MemNetwork};
//! use meshwork_sync::{SyncConfig, SyncError, SyncMap};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let net = MemNetwork::new();
//! let mut maps = Vec::new();
//! let mut stops = Vec::new();
//! for name in ["a", "b"] {
//!     let sync = SyncConfig::default();
//!     let (key, value) = sync.hello_metadata();
//!     let config = Config::new("example").with_required_metadata(key, value);
//!     let endpoint = Endpoint::new(config, net.transport(name));
//!     endpoint.listen(&format!("mem://{name}").parse()?).await?;
//!     let seeds = if name == "b" { vec!["mem://a".parse()?] } else { vec![] };
//!     let peers = PeerManager::start(endpoint, PeersConfig::default().with_seeds(seeds))?;
//!     let concerns = Concerns::builder(peers.clone()).start().await?;
//!     maps.push(SyncMap::start(&concerns, sync).await?);
//!     stops.push((concerns, peers));
//! }
//! let (a, b) = (&maps[0], &maps[1]);
//! stops[1].1.wait_for_peers(1, Duration::from_secs(5)).await?;
//!
//! a.set("greeting", "hello").await?;
//! a.confirm("greeting", Duration::from_secs(5)).await?; // b has applied it
//! assert_eq!(b.get_str("greeting").as_deref(), Some("hello"));
//! assert!(matches!(b.set("greeting", "mine").await, Err(SyncError::LeaseHeld { .. })));
//!
//! for (map, (concerns, peers)) in maps.iter().zip(stops) {
//!     map.shutdown().await;
//!     concerns.shutdown().await;
//!     peers.shutdown().await;
//! }
//! # Ok(())
//! # }
//! ```

mod config;
mod entry;
mod error;
mod hlc;
mod map;
mod message;
mod replica;
mod tree;

/// The generated protobuf messages of the sync layer (`proto/sync.proto`).
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/meshwork.sync.v1.rs"));
}

/// The concerns layer underneath, for the layers above.
pub use meshwork_concerns as concerns;

pub use config::{CLOCK_SKEW_METADATA, LEASING_METADATA, SyncConfig};
pub use entry::Entry;
pub use error::SyncError;
pub use hlc::{Clock, ManualClock, Stamp, SystemClock};
pub use map::{EntryInfo, SYNC, SyncMap, SyncStats, Watch};
pub use replica::{Change, ChangeKind, Lease};
