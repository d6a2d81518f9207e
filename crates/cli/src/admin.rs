//! The admin HTTP API of `meshwork node` (JSON over HTTP/1.1, axum).
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/health` | 200 `ok` |
//! | GET | `/status` | 200 [`StatusJson`] |
//! | POST | `/shutdown` | 202 `{"shutting_down":true}`, then a graceful shutdown |
//! | any | anything else | 404 (405 for a known path) `{"error":"..."}` |
//!
//! To add an endpoint: write a handler taking `State<AdminState>` and
//! returning `Result<Json<T>, ApiError>`, and add one `.route(...)` line in
//! [`router`].

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use meshwork::transport::{Direction, EndpointStats, Security};
use meshwork::{ConnectionStatus, Node, NodeStatus};
use serde::Serialize;
use tokio::sync::watch;
use tracing::info;

/// A one-shot "please shut down" flag shared by the admin API and the
/// signal handlers. Cheap to clone; every clone is the same flag.
#[derive(Debug, Clone)]
pub(crate) struct ShutdownSignal(watch::Sender<bool>);

impl ShutdownSignal {
    /// A flag that is not set.
    pub(crate) fn new() -> Self {
        ShutdownSignal(watch::Sender::new(false))
    }

    /// Sets the flag (again is fine).
    pub(crate) fn trigger(&self) {
        self.0.send_replace(true);
    }

    /// Returns once the flag is set (at once if it already is).
    pub(crate) async fn stopped(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives in `self`, so this cannot fail.
        let _ = rx.wait_for(|set| *set).await;
    }
}

/// What every handler can reach.
#[derive(Debug, Clone)]
pub(crate) struct AdminState {
    node: Node,
    shutdown: ShutdownSignal,
}

impl AdminState {
    /// State for serving `node`; `POST /shutdown` triggers `shutdown`.
    pub(crate) fn new(node: Node, shutdown: ShutdownSignal) -> Self {
        AdminState { node, shutdown }
    }
}

/// The admin API routes.
pub(crate) fn router(state: AdminState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/status", get(status))
        .route("/shutdown", post(shutdown))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// An error answer: a status code and `{"error": message}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// An error with this status code and message.
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

/// The body of an error answer.
#[derive(Debug, Serialize)]
struct ErrorJson<'a> {
    error: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorJson {
                error: &self.message,
            }),
        )
            .into_response()
    }
}

/// `GET /status`, built from [`Node::status`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct StatusJson {
    /// This node's id, hex.
    pub(crate) node_id: String,
    /// Its network.
    pub(crate) network_id: String,
    /// How its links are protected: `"noise"` (encrypted, the default) or
    /// `"plaintext"` (`--insecure`).
    pub(crate) security: &'static str,
    /// Handshakes that completed, both directions.
    pub(crate) handshakes_ok: u64,
    /// Failed handshakes by cause (e.g. `"crypto"`: another network key or
    /// not a meshwork node; `"not_allowed"`; `"wrong_network"`), both
    /// directions. Causes that never happened are absent.
    pub(crate) handshake_failures: BTreeMap<&'static str, u64>,
    /// Incoming streams closed at once because too many handshakes were pending.
    pub(crate) rejected_busy: u64,
    /// Where it accepts connections.
    pub(crate) listen: Vec<String>,
    /// The metadata it sends to peers (`--meta`).
    pub(crate) metadata: BTreeMap<String, String>,
    /// Seconds since start.
    pub(crate) uptime_secs: f64,
    /// Open connections, oldest first.
    pub(crate) connections: Vec<ConnectionJson>,
}

/// One connection in [`StatusJson`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ConnectionJson {
    /// The peer's id, hex.
    pub(crate) node_id: String,
    /// The other end of the stream.
    pub(crate) addr: String,
    /// `"inbound"` (the peer dialled) or `"outbound"`.
    pub(crate) direction: &'static str,
    /// Where the peer says it listens.
    pub(crate) listen_addrs: Vec<String>,
    /// The metadata the peer sent in its Hello.
    pub(crate) metadata: BTreeMap<String, String>,
    /// Latest round-trip time in ms, null before the first pong.
    pub(crate) rtt_ms: Option<f64>,
    /// Smoothed round-trip time in ms, null before the first pong.
    pub(crate) smoothed_rtt_ms: Option<f64>,
    /// Seconds since the handshake.
    pub(crate) age_secs: f64,
    /// Frames sent on this connection.
    pub(crate) frames_sent: u64,
    /// Frames received on this connection.
    pub(crate) frames_received: u64,
}

/// Milliseconds, as exact as an f64 allows (120 µs is 0.12, not 0.12000000000000001).
fn ms(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1e6
}

/// Converts a node snapshot, its security mode and its handshake counters
/// (`node.endpoint().stats()`) to the JSON form.
pub(crate) fn status_json(
    status: &NodeStatus,
    security: Security,
    stats: &EndpointStats,
) -> StatusJson {
    StatusJson {
        node_id: status.node_id.to_string(),
        network_id: status.network_id.clone(),
        security: security.name(),
        handshakes_ok: stats.handshakes_ok,
        handshake_failures: stats.failures.clone(),
        rejected_busy: stats.rejected_busy,
        listen: status.listen.iter().map(|a| a.to_string()).collect(),
        metadata: status.metadata.clone().into_iter().collect(),
        uptime_secs: status.uptime.as_secs_f64(),
        connections: status.connections.iter().map(connection_json).collect(),
    }
}

fn connection_json(c: &ConnectionStatus) -> ConnectionJson {
    ConnectionJson {
        node_id: c.node_id.to_string(),
        addr: c.addr.to_string(),
        direction: match c.direction {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        },
        listen_addrs: c.listen_addrs.clone(),
        metadata: c.metadata.clone().into_iter().collect(),
        rtt_ms: c.rtt.map(ms),
        smoothed_rtt_ms: c.smoothed_rtt.map(ms),
        age_secs: c.age.as_secs_f64(),
        frames_sent: c.frames_sent,
        frames_received: c.frames_received,
    }
}

async fn health() -> &'static str {
    "ok"
}

async fn status(State(state): State<AdminState>) -> Json<StatusJson> {
    let node = &state.node;
    let endpoint = node.endpoint();
    Json(status_json(
        &node.status(),
        endpoint.config().security(),
        &endpoint.stats(),
    ))
}

/// The body of `POST /shutdown`.
#[derive(Debug, Serialize)]
struct ShuttingDown {
    shutting_down: bool,
}

async fn shutdown(State(state): State<AdminState>) -> (StatusCode, Json<ShuttingDown>) {
    info!("shutdown requested through the admin API");
    state.shutdown.trigger();
    (
        StatusCode::ACCEPTED,
        Json(ShuttingDown {
            shutting_down: true,
        }),
    )
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} not allowed on {}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwork::transport::mem::MemNetwork;
    use meshwork::wire::NodeId;
    use serde_json::Value;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const TIMEOUT: Duration = Duration::from_secs(2);

    // The nodes run on the in-memory network; only the admin API uses
    // loopback TCP, as it does in production.

    /// A minimal HTTP/1.1 client: one request, `Connection: close`, returns
    /// the status code and the body.
    async fn request(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut raw))
            .await
            .expect("response in time")
            .unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("header end");
        assert!(
            !head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "{head}"
        );
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status code");
        (code, body.to_string())
    }

    async fn get_json(addr: std::net::SocketAddr, path: &str) -> (u16, Value) {
        let (code, body) = request(addr, "GET", path).await;
        (code, serde_json::from_str(&body).unwrap())
    }

    async fn serve(node: &Node) -> (std::net::SocketAddr, ShutdownSignal) {
        let shutdown = ShutdownSignal::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(AdminState::new(node.clone(), shutdown.clone()));
        let stop = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.stopped().await })
                .await
        });
        (addr, shutdown)
    }

    /// Two connected nodes on an in-memory network: `b` seeds `a`.
    async fn two_nodes() -> (Node, Node) {
        let net = MemNetwork::new();
        let a = Node::builder("admin-test")
            .transport(net.transport("a"))
            .listen("mem://a".parse().unwrap())
            .ping_interval(Duration::from_millis(20))
            .start()
            .await
            .unwrap();
        let b = Node::builder("admin-test")
            .transport(net.transport("b"))
            .listen("mem://b".parse().unwrap())
            .seed("mem://a".parse().unwrap())
            .ping_interval(Duration::from_millis(20))
            .start()
            .await
            .unwrap();
        a.wait_for_connections(1, TIMEOUT).await.unwrap();
        b.wait_for_connections(1, TIMEOUT).await.unwrap();
        (a, b)
    }

    #[test]
    fn status_json_converts_units_and_names() {
        let id = NodeId::from_bytes(vec![0xab, 0xcd]).unwrap();
        let peer = NodeId::from_bytes(vec![0x01, 0x02, 0x03]).unwrap();
        let status = NodeStatus {
            node_id: id,
            network_id: "net".into(),
            listen: vec!["tcp://127.0.0.1:7000".parse().unwrap()],
            metadata: [("role".to_string(), "seed".to_string())].into(),
            uptime: Duration::from_millis(1500),
            connections: vec![ConnectionStatus {
                node_id: peer,
                addr: "tcp://127.0.0.1:40000".parse().unwrap(),
                direction: Direction::Inbound,
                listen_addrs: vec!["tcp://127.0.0.1:7001".into()],
                metadata: Default::default(),
                rtt: Some(Duration::from_micros(120)),
                smoothed_rtt: None,
                age: Duration::from_millis(250),
                frames_sent: 3,
                frames_received: 4,
            }],
        };
        let stats = EndpointStats {
            failures: [("crypto", 2), ("not_allowed", 1)].into(),
            handshakes_ok: 5,
            handshakes_failed: 3,
            rejected_busy: 7,
            open_connections: 1,
        };
        let json = serde_json::to_value(status_json(&status, Security::Noise, &stats)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "node_id": "abcd",
                "network_id": "net",
                "security": "noise",
                "handshakes_ok": 5,
                "handshake_failures": {"crypto": 2, "not_allowed": 1},
                "rejected_busy": 7,
                "listen": ["tcp://127.0.0.1:7000"],
                "metadata": {"role": "seed"},
                "uptime_secs": 1.5,
                "connections": [{
                    "node_id": "010203",
                    "addr": "tcp://127.0.0.1:40000",
                    "direction": "inbound",
                    "listen_addrs": ["tcp://127.0.0.1:7001"],
                    "metadata": {},
                    "rtt_ms": 0.12,
                    "smoothed_rtt_ms": null,
                    "age_secs": 0.25,
                    "frames_sent": 3,
                    "frames_received": 4
                }]
            })
        );
        let plain = status_json(
            &status,
            Security::InsecurePlaintext,
            &EndpointStats::default(),
        );
        let json = serde_json::to_value(plain).unwrap();
        assert_eq!(json["security"], "plaintext");
        assert_eq!(json["handshake_failures"], serde_json::json!({}));
        assert_eq!(json["handshakes_ok"], 0);
    }

    #[tokio::test]
    async fn status_health_and_errors_over_http() {
        let (a, b) = two_nodes().await;
        let (addr, _shutdown) = serve(&a).await;

        assert_eq!(request(addr, "GET", "/health").await, (200, "ok".into()));

        // Poll until the first pong has given the connection an RTT.
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let status = loop {
            let (code, status) = get_json(addr, "/status").await;
            assert_eq!(code, 200);
            if status["connections"][0]["rtt_ms"].is_f64() {
                break status;
            }
            assert!(tokio::time::Instant::now() < deadline, "no RTT: {status}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(status["node_id"], a.node_id().to_string());
        assert_eq!(status["network_id"], "admin-test");
        assert_eq!(status["security"], "noise", "encrypted by default");
        assert!(status["handshakes_ok"].as_u64().unwrap() >= 1, "{status}");
        assert_eq!(status["handshake_failures"], serde_json::json!({}));
        assert_eq!(status["rejected_busy"], 0);
        assert_eq!(status["listen"][0], a.listen_addrs()[0].to_string());
        assert!(status["uptime_secs"].as_f64().unwrap() > 0.0);
        let conns = status["connections"].as_array().unwrap();
        assert_eq!(conns.len(), 1, "{status}");
        let c = &conns[0];
        assert_eq!(c["node_id"], b.node_id().to_string());
        assert_eq!(c["direction"], "inbound");
        assert_eq!(c["listen_addrs"][0], b.listen_addrs()[0].to_string());
        assert_eq!(c["addr"], "mem://b");
        assert!(c["smoothed_rtt_ms"].as_f64().unwrap() > 0.0);
        assert!(c["age_secs"].as_f64().unwrap() >= 0.0);
        assert!(c["frames_sent"].as_u64().unwrap() >= 1);
        assert!(c["frames_received"].as_u64().unwrap() >= 1);

        let (code, body) = get_json(addr, "/nope").await;
        assert_eq!(code, 404);
        assert!(body["error"].as_str().unwrap().contains("/nope"), "{body}");
        let (code, body) = get_json(addr, "/shutdown").await;
        assert_eq!(code, 405);
        assert!(body["error"].is_string(), "{body}");

        b.shutdown().await;
        a.shutdown().await;
    }

    /// A node with another network key never gets in; the failed
    /// handshakes show up in `/status` as `crypto`.
    #[tokio::test]
    async fn network_key_mismatch_shows_as_crypto_failures() {
        let net = MemNetwork::new();
        let a = Node::builder("admin-test")
            .transport(net.transport("a"))
            .listen("mem://a".parse().unwrap())
            .start()
            .await
            .unwrap();
        let key = meshwork::transport::NetworkKey::from_secret(b"a secret of 16+ bytes").unwrap();
        let outsider = Node::builder("admin-test")
            .transport(net.transport("c"))
            .network_key(key)
            .seed("mem://a".parse().unwrap())
            .redial_backoff(Duration::from_millis(10), Duration::from_millis(50))
            .start()
            .await
            .unwrap();
        let (addr, _shutdown) = serve(&a).await;
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let (code, status) = get_json(addr, "/status").await;
            assert_eq!(code, 200);
            assert_eq!(status["connections"], serde_json::json!([]), "{status}");
            if status["handshake_failures"]["crypto"].as_u64() >= Some(2) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no crypto failures: {status}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        outsider.shutdown().await;
        a.shutdown().await;
    }

    #[tokio::test]
    async fn post_shutdown_fires_the_signal() {
        let node = Node::builder("admin-test")
            .transport(MemNetwork::new().transport("a"))
            .listen("mem://a".parse().unwrap())
            .start()
            .await
            .unwrap();
        let (addr, shutdown) = serve(&node).await;
        let (code, body) = request(addr, "POST", "/shutdown").await;
        assert_eq!(code, 202);
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            serde_json::json!({"shutting_down": true})
        );
        tokio::time::timeout(TIMEOUT, shutdown.stopped())
            .await
            .expect("shutdown signal fired");
        node.shutdown().await;
    }
}
