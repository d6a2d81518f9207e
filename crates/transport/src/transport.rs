//! The [`Transport`] trait: how byte streams are opened, whatever carries them.

use std::fmt;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{Address, TransportError};

/// A bidirectional byte stream a connection runs over.
///
/// Implemented for every `AsyncRead + AsyncWrite + Send + Unpin + 'static`
/// type: TCP streams, in-memory pipes, and (later) encrypted wrappers of
/// either. The framing above never knows which one it has.
///
/// (`Any` lets the handshake recognise a TCP stream and split it into halves
/// that need no lock between them.)
pub trait ByteStream:
    AsyncRead + AsyncWrite + Send + Unpin + fmt::Debug + std::any::Any + 'static
{
}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + fmt::Debug + 'static> ByteStream for T {}

/// A boxed [`ByteStream`].
pub type BoxStream = Box<dyn ByteStream>;

/// Opens listeners and dials addresses. [`crate::TcpTransport`] and
/// [`crate::mem::MemTransport`] implement it.
///
/// A transport only moves bytes: the handshake, framing and everything above
/// are done by [`crate::Endpoint`] the same way for every transport.
#[async_trait]
pub trait Transport: Send + Sync + fmt::Debug + 'static {
    /// Starts listening on `addr`. The listener reports the address actually
    /// bound (e.g. the port chosen for port 0).
    async fn listen(&self, addr: &Address) -> Result<Box<dyn Listener>, TransportError>;

    /// Opens a stream to `addr`. Returns the stream and the address it
    /// actually reached (e.g. the resolved IP for a host name).
    async fn dial(&self, addr: &Address) -> Result<(BoxStream, Address), TransportError>;
}

/// Accepts incoming streams.
#[async_trait]
pub trait Listener: Send + fmt::Debug {
    /// The address this listener is bound to.
    fn local_addr(&self) -> Address;

    /// Waits for the next incoming stream and the address it came from.
    ///
    /// An error concerns one incoming stream (or a passing condition such as
    /// running out of file descriptors); the listener stays usable unless it
    /// returns [`TransportError::Shutdown`].
    async fn accept(&mut self) -> Result<(BoxStream, Address), TransportError>;
}
