//! Serving the admin API: HTTP/1.1 over hyper, with the limits a server
//! needs and `axum::serve` does not set.
//!
//! `axum::serve` gives hyper no timer, so hyper's header read timeout never
//! fires, and it accepts connections without limit: a client that opens
//! connections and sends nothing holds a task and a file descriptor each,
//! forever. Here a client has [`Limits::header_timeout`] to send each
//! request's head, [`Limits::body_timeout`] to send its body, and a
//! response it does not read for [`Limits::write_timeout`] ends its
//! connection; at most [`Limits::max_connections`] are served at once (the
//! next wait in the kernel's accept queue).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tracing::debug;

use crate::admin::ShutdownSignal;

/// How the admin server bounds its clients.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// The time a client has to send a request's head (from the start of
    /// the connection, or from the end of its previous request).
    pub(crate) header_timeout: Duration,
    /// The time a client has to send a request's body, from the end of its
    /// head: a handler reading the body past it gets an error (the admin
    /// API answers 408 `timeout`), and the connection ends with the answer.
    pub(crate) body_timeout: Duration,
    /// How long a write of the answer may wait for the client to read:
    /// past it the connection ends.
    pub(crate) write_timeout: Duration,
    /// Connections served at once.
    pub(crate) max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            max_connections: 64,
        }
    }
}

/// After an accept error (e.g. out of file descriptors), wait this long
/// before accepting again rather than spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves `router` on `listener` until `stop` fires, then lets the requests
/// being answered finish (idle connections are closed at once).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    stop: ShutdownSignal,
    limits: Limits,
) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let body_timeout = limits.body_timeout;
    let router = router.layer(axum::middleware::map_request(move |request: Request| {
        std::future::ready(with_body_deadline(request, body_timeout))
    }));
    loop {
        let permit = tokio::select! {
            _ = stop.stopped() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // never closed
            },
        };
        let stream = tokio::select! {
            _ = stop.stopped() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    debug!(error = %e, "admin API: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(
                TokioIo::new(WriteDeadline::new(stream, limits.write_timeout)),
                TowerToHyperService::new(router.clone()),
            );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "admin API: connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// `request` with a body that fails once `timeout` has passed before all
/// of it arrived: without it, a client that sent a head and never its
/// whole body held a connection slot for as long as it kept the
/// connection open, and 64 of them kept everyone else out, `/shutdown`
/// included.
fn with_body_deadline(request: Request, timeout: Duration) -> Request {
    let (parts, body) = request.into_parts();
    let body = Body::new(BodyDeadline {
        inner: body,
        deadline: Box::pin(tokio::time::sleep(timeout)),
        timeout,
    });
    Request::from_parts(parts, body)
}

/// A request body that ends with an error ([`io::ErrorKind::TimedOut`]) at
/// its deadline. A body of its own, not a stream of its data: it keeps the
/// inner body's size hint (the `Content-Length`), so that a body limit still
/// refuses an over-long one at once, before reading any of it.
struct BodyDeadline {
    inner: Body,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
}

impl HttpBody for BodyDeadline {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if let Poll::Ready(next) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(next.map(|r| r.map_err(io::Error::other)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let timeout = self.timeout;
            return Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the request body did not arrive within {timeout:?}"),
            ))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection whose writes fail once one has waited `timeout` for the
/// client to read: without it, a client that sent requests and read no
/// answer held a connection slot for as long as it kept the connection
/// open, and 64 of them kept everyone else out.
struct WriteDeadline<S> {
    inner: S,
    timeout: Duration,
    /// Set while a write waits; cleared by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S, timeout: Duration) -> Self {
        WriteDeadline {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// `poll`'s result, or an error when it has been pending for `timeout`.
    fn check<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stalled.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {timeout:?}"),
            )));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::extract::rejection::BytesRejection;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::time::Instant;

    use super::*;

    const LIMITS: Limits = Limits {
        header_timeout: Duration::from_secs(2),
        body_timeout: Duration::from_secs(3),
        write_timeout: Duration::from_secs(4),
        max_connections: 2,
    };

    async fn start() -> (SocketAddr, ShutdownSignal, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = ShutdownSignal::new();
        let router = Router::new()
            .route("/health", get(|| async { "ok" }))
            .route(
                "/echo",
                axum::routing::post(|body: Result<Bytes, BytesRejection>| async move {
                    match body {
                        Ok(body) => body.len().to_string(),
                        Err(e) => format!("refused: {}", e.body_text()),
                    }
                }),
            )
            .route("/big", get(|| async { vec![b'x'; 16 << 20] }));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                serve(listener, router, stop, LIMITS).await;
            }
        });
        (addr, stop, task)
    }

    /// Reads until the server closes the connection; what it sent.
    async fn read_to_close(stream: &mut TcpStream) -> String {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut got))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        String::from_utf8_lossy(&got).into_owned()
    }

    async fn health(addr: SocketAddr) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        read_to_close(&mut stream).await
    }

    /// A client that connects and sends nothing, or half a request head, is
    /// disconnected at the header timeout; one that sends its request is
    /// answered.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_sends_no_request_head_is_closed_at_the_timeout() {
        let (addr, stop, task) = start().await;
        for sent in [&b""[..], b"GET /health HTTP/1.1\r\nHost: x\r\n"] {
            let started = Instant::now();
            let mut silent = TcpStream::connect(addr).await.unwrap();
            silent.write_all(sent).await.unwrap();
            let answer = read_to_close(&mut silent).await;
            let waited = started.elapsed();
            assert!(
                waited >= LIMITS.header_timeout && waited < LIMITS.header_timeout * 2,
                "closed after {waited:?}"
            );
            assert!(!answer.contains("200 OK"), "{answer}");
        }
        assert!(health(addr).await.ends_with("ok"));
        stop.trigger();
        task.await.unwrap();
    }

    /// With every connection slot held, the next client waits until one is
    /// free (here: until a silent client is timed out), then is served.
    #[tokio::test(start_paused = true)]
    async fn connections_beyond_the_limit_wait_for_a_free_slot() {
        let (addr, stop, task) = start().await;
        let mut silent = Vec::new();
        for _ in 0..LIMITS.max_connections {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        let started = Instant::now();
        assert!(health(addr).await.ends_with("ok"));
        assert!(
            started.elapsed() >= LIMITS.header_timeout,
            "served after {:?}, before a slot was free",
            started.elapsed()
        );
        stop.trigger();
        task.await.unwrap();
    }

    /// Stopping closes idle connections and ends the server.
    #[tokio::test(start_paused = true)]
    async fn stop_ends_the_server_and_its_idle_connections() {
        let (addr, stop, task) = start().await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 17];
        idle.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200 OK\r\n");
        let started = Instant::now();
        stop.trigger();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the server ended")
            .unwrap();
        read_to_close(&mut idle).await;
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    /// Clients that send a request head and not all of its body, as many
    /// as there are connection slots, are answered at the body timeout and
    /// their connections end: `/health` is served then. Before, they held
    /// every slot for as long as they kept their connections open.
    #[tokio::test(start_paused = true)]
    async fn clients_that_never_send_their_whole_body_are_cut_at_the_body_timeout() {
        let (addr, stop, task) = start().await;
        let mut slow = Vec::new();
        for _ in 0..LIMITS.max_connections {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
                .await
                .unwrap();
            slow.push(s);
        }
        let started = Instant::now();
        assert!(health(addr).await.ends_with("ok"));
        let waited = started.elapsed();
        assert!(
            waited >= LIMITS.body_timeout && waited < LIMITS.body_timeout * 2,
            "served after {waited:?}"
        );
        for mut s in slow {
            let answer = read_to_close(&mut s).await;
            assert!(answer.contains("refused"), "{answer}");
        }
        // A whole body is read as before.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc",
        )
        .await
        .unwrap();
        assert!(read_to_close(&mut s).await.ends_with("\r\n\r\n3"));
        stop.trigger();
        task.await.unwrap();
    }

    /// Clients that ask for an answer larger than the socket buffers and do
    /// not read it, as many as there are connection slots, lose their
    /// connections at the write timeout: `/health` is served then. Before,
    /// they held every slot for as long as they kept their connections open.
    #[tokio::test(start_paused = true)]
    async fn clients_that_do_not_read_their_answers_are_cut_at_the_write_timeout() {
        let (addr, stop, task) = start().await;
        let mut deaf = Vec::new();
        for _ in 0..LIMITS.max_connections {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            deaf.push(s);
        }
        let started = Instant::now();
        assert!(health(addr).await.ends_with("ok"));
        let waited = started.elapsed();
        assert!(
            waited >= LIMITS.write_timeout && waited < LIMITS.write_timeout * 2,
            "served after {waited:?}"
        );
        stop.trigger();
        task.await.unwrap();
    }
}
