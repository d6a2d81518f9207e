//! A [`Transport`] wrapper that counts the bytes its streams write and
//! read: what actually goes on the wire, Noise records, handshakes and
//! length prefixes included (the transport's own `ConnectionStats` count
//! frames before encryption, and forget a connection once it closes).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use async_trait::async_trait;
use meshwork_transport::{Address, BoxStream, Listener, Transport, TransportError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes written and read by every stream of one transport.
#[derive(Debug, Default)]
pub(crate) struct Bytes {
    sent: AtomicU64,
    received: AtomicU64,
}

impl Bytes {
    /// Bytes written so far.
    pub(crate) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Bytes read so far.
    pub(crate) fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// `inner`, with every stream it opens or accepts counted in `bytes`.
#[derive(Debug, Clone)]
pub(crate) struct Counting<T> {
    inner: T,
    bytes: Arc<Bytes>,
}

impl<T> Counting<T> {
    /// Wraps `inner`; the counters are [`Counting::bytes`].
    pub(crate) fn new(inner: T) -> Self {
        Counting {
            inner,
            bytes: Arc::default(),
        }
    }

    /// The counters of every stream of this transport.
    pub(crate) fn bytes(&self) -> Arc<Bytes> {
        self.bytes.clone()
    }
}

#[async_trait]
impl<T: Transport> Transport for Counting<T> {
    async fn listen(&self, addr: &Address) -> Result<Box<dyn Listener>, TransportError> {
        let inner = self.inner.listen(addr).await?;
        Ok(Box::new(CountingListener {
            inner,
            bytes: self.bytes.clone(),
        }))
    }

    async fn dial(&self, addr: &Address) -> Result<(BoxStream, Address), TransportError> {
        let (stream, addr) = self.inner.dial(addr).await?;
        Ok((wrap(stream, &self.bytes), addr))
    }
}

#[derive(Debug)]
struct CountingListener {
    inner: Box<dyn Listener>,
    bytes: Arc<Bytes>,
}

#[async_trait]
impl Listener for CountingListener {
    fn local_addr(&self) -> Address {
        self.inner.local_addr()
    }

    async fn accept(&mut self) -> Result<(BoxStream, Address), TransportError> {
        let (stream, addr) = self.inner.accept().await?;
        Ok((wrap(stream, &self.bytes), addr))
    }
}

fn wrap(inner: BoxStream, bytes: &Arc<Bytes>) -> BoxStream {
    Box::new(CountingStream {
        inner,
        bytes: bytes.clone(),
    })
}

#[derive(Debug)]
struct CountingStream {
    inner: BoxStream,
    bytes: Arc<Bytes>,
}

impl AsyncRead for CountingStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let n = (buf.filled().len() - before) as u64;
        this.bytes.received.fetch_add(n, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for CountingStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.bytes.sent.fetch_add(n as u64, Ordering::Relaxed);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        this.bytes.sent.fetch_add(n as u64, Ordering::Relaxed);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use meshwork_transport::mem::MemNetwork;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn both_ends_count_what_crosses() {
        let net = MemNetwork::new();
        let a = Counting::new(net.transport("a"));
        let b = Counting::new(net.transport("b"));
        let mut listener = b.listen(&Address::mem("b")).await.unwrap();
        let (mut out, _) = a.dial(&Address::mem("b")).await.unwrap();
        let (mut inn, _) = listener.accept().await.unwrap();
        out.write_all(&[7; 100]).await.unwrap();
        let mut buf = [0; 100];
        inn.read_exact(&mut buf).await.unwrap();
        inn.write_all(&[1; 10]).await.unwrap();
        out.read_exact(&mut buf[..10]).await.unwrap();
        assert_eq!((a.bytes().sent(), a.bytes().received()), (100, 10));
        assert_eq!((b.bytes().sent(), b.bytes().received()), (10, 100));
    }
}
