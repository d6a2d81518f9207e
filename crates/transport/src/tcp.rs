//! TCP transport on tokio.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::net::{TcpListener, TcpStream};

use crate::addr::Resolver;
use crate::transport::{BoxStream, Listener, Transport};
use crate::{Address, TransportError};

/// TCP over tokio, with `TCP_NODELAY` on every stream (the connection does
/// its own batching) and a shared host-name cache.
#[derive(Debug, Clone, Default)]
pub struct TcpTransport {
    resolver: Arc<Resolver>,
}

impl TcpTransport {
    /// A TCP transport with a fresh resolver cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// A TCP transport that shares `resolver` with other components.
    pub fn with_resolver(resolver: Arc<Resolver>) -> Self {
        TcpTransport { resolver }
    }
}

#[async_trait]
impl Transport for TcpTransport {
    async fn listen(&self, addr: &Address) -> Result<Box<dyn Listener>, TransportError> {
        let addrs = self.resolver.resolve(addr).await?;
        let listener = TcpListener::bind(&addrs[..]).await?;
        let local = Address::tcp(listener.local_addr()?);
        Ok(Box::new(TcpListenerHandle { listener, local }))
    }

    async fn dial(&self, addr: &Address) -> Result<(BoxStream, Address), TransportError> {
        let addrs = self.resolver.resolve(addr).await?;
        let mut last_err = None;
        for candidate in addrs {
            match TcpStream::connect(candidate).await {
                Ok(stream) => return Ok((configure(stream)?, Address::tcp(candidate))),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err
            .map(TransportError::Io)
            .unwrap_or_else(|| TransportError::UnsupportedAddress(addr.to_string())))
    }
}

fn configure(stream: TcpStream) -> Result<BoxStream, TransportError> {
    stream.set_nodelay(true)?;
    Ok(Box::new(stream))
}

#[derive(Debug)]
struct TcpListenerHandle {
    listener: TcpListener,
    local: Address,
}

#[async_trait]
impl Listener for TcpListenerHandle {
    fn local_addr(&self) -> Address {
        self.local.clone()
    }

    async fn accept(&mut self) -> Result<(BoxStream, Address), TransportError> {
        let (stream, peer): (TcpStream, SocketAddr) = self.listener.accept().await?;
        Ok((configure(stream)?, Address::tcp(peer)))
    }
}
