//! Serving the admin API: HTTP/1.1 over hyper, with the limits a server
//! needs and `axum::serve` does not set.
//!
//! `axum::serve` gives hyper no timer, so hyper's header read timeout never
//! fires, and it accepts connections without limit: a client that opens
//! connections and sends nothing holds a task and a file descriptor each,
//! forever. Here a client has [`Limits::header_timeout`] to send each
//! request's head, and at most [`Limits::max_connections`] are served at
//! once (the next wait in the kernel's accept queue).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::debug;

use crate::admin::ShutdownSignal;

/// How the admin server bounds its clients.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// The time a client has to send a request's head (from the start of
    /// the connection, or from the end of its previous request).
    pub(crate) header_timeout: Duration,
    /// Connections served at once.
    pub(crate) max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(10),
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
                TokioIo::new(stream),
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::time::Instant;

    use super::*;

    const LIMITS: Limits = Limits {
        header_timeout: Duration::from_secs(2),
        max_connections: 2,
    };

    async fn start() -> (SocketAddr, ShutdownSignal, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = ShutdownSignal::new();
        let router = Router::new().route("/health", get(|| async { "ok" }));
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
}
