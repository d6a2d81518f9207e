//! The meshwork transport: connections between nodes, whatever carries them.
//!
//! This layer owns everything between "here is an address" and "here is a
//! checked peer you can exchange [`Message`](meshwork_wire::Message)s with":
//!
//! - [`Address`]es (`tcp://host:port`, `tcp://[::1]:7000`, `mem://name`),
//!   host-name resolution with a cache, and the local-host fallback;
//! - the [`Transport`] trait, implemented by [`TcpTransport`] and by the
//!   in-memory [`mem::MemTransport`], whose [`mem::MemNetwork`] can add
//!   latency, drop links and partition hosts for tests;
//! - the secure handshake: a preamble, Noise `XXpsk0` (encrypted and mutually
//!   authenticated by default; the node id is the static public key; an
//!   optional [`NetworkKey`] keeps non-members out), then a Hello exchange
//!   within a timeout; another network id, another protocol version, our own
//!   node id, a forged node id, a node off the allow list or banned is refused
//!   with a Disconnect carrying the reason;
//! - [`Connection`]: priority lanes out (control frames never queue behind
//!   bulk ones), a bounded queue in, a reader and a writer on one task, Ping/Pong
//!   answered and timed, keepalive and idle timeout, graceful close;
//! - [`Endpoint`]: listeners, dialling, the set of live connections, and a
//!   shutdown that says goodbye to every peer and waits for every task.
//!
//! Policy is left to the layer above: which peers to dial, how many to keep,
//! whom to drop. The peer manager (`meshwork-peers`) decides; this crate
//! executes.
//!
//! # Getting started
//!
//! Two nodes over TCP on loopback:
//!
//! ```
//! use meshwork_transport::{Config, Endpoint, Priority, TcpTransport};
//! use meshwork_wire::{Message, proto::{Concern, ConcernKind}};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), meshwork_transport::TransportError> {
//! let server = Endpoint::new(Config::new("example"), TcpTransport::new());
//! let addr = server.listen(&"tcp://127.0.0.1:0".parse()?).await?;
//!
//! let client = Endpoint::new(Config::new("example"), TcpTransport::new());
//! let conn = client.connect(&addr).await?;
//! let mut incoming = server.accept().await.expect("server is running");
//!
//! let msg = Message::Concern(Concern {
//!     command: 7,
//!     kind: ConcernKind::Request as i32,
//!     payload: "hello".into(),
//!     ..Default::default()
//! });
//! conn.send(msg.clone(), Priority::Normal).await?;
//! assert_eq!(incoming.recv().await?, msg);
//!
//! let rtt = conn.ping(std::time::Duration::from_secs(1)).await?;
//! assert!(rtt < std::time::Duration::from_secs(1));
//!
//! client.shutdown().await;
//! server.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # The stack
//!
//! ```text
//!  Endpoint ── connect/accept ──► Connection (lanes, reader, writer)
//!                                   │ frames: meshwork-wire FrameCodec
//!                                   │ security stage: Noise transport messages (or opt-in plaintext)
//!                                   │ ByteStream: TCP socket or in-memory pipe
//! ```

mod addr;
mod admission;
mod both;
mod config;
mod connection;
mod endpoint;
mod error;
mod handshake;
mod identity;
mod loglimit;
pub mod mem;
pub mod noise;
mod pairkey;
mod signature;
mod tcp;
mod transport;

/// The wire layer underneath, for the layers above.
pub use meshwork_wire as wire;

pub use addr::{Address, Host, Resolver, filter_ip_addresses, local_host_ip};
pub use config::{Config, Security};
pub use connection::{
    CloseReason, Connection, ConnectionHandle, ConnectionInfo, ConnectionStats, Deliver, Direction,
    Priority,
};
pub use endpoint::{Endpoint, EndpointStats, Gate};
pub use error::TransportError;
pub use identity::{Identity, NetworkKey};
pub use pairkey::{PairKey, SEAL_OVERHEAD};
pub use signature::{SIGNATURE_LEN, Signature, VerifyingKey, verify};
pub use tcp::TcpTransport;
pub use transport::{BoxStream, ByteStream, Listener, Transport};

/// Locks `m`, ignoring poisoning: every critical section in this crate
/// leaves its data consistent, so a panic elsewhere does not spoil it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
