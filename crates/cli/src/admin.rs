//! The admin HTTP API of `meshwork node` (JSON over HTTP/1.1, axum).
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/health` | 200 `ok` |
//! | GET | `/status` | 200 [`StatusJson`] |
//! | POST | `/peers/{id}/disconnect` | 200 `{"disconnected":"<id>"}`; 404 when that peer is not connected |
//! | POST | `/peers/{id}/block` | 200 `{"blocked":"<id>"}`: its connection ends and handshakes with it are refused until unblocked |
//! | POST | `/peers/{id}/unblock` | 200 `{"unblocked":"<id>"}` |
//! | POST | `/shutdown` | 202 `{"shutting_down":true}`, then a graceful shutdown |
//! | any | anything else | 404 (405 for a known path) `{"error":"..."}` |
//!
//! `{id}` is a node id in hex (as in `/status`); anything else is a 400.
//! Block and unblock are fault injection: `cargo xtask test-mesh` makes
//! partitions out of real processes with them.
//!
//! To add an endpoint: write a handler taking `State<AdminState>` and
//! returning `Result<Json<T>, ApiError>`, and add one `.route(...)` line in
//! [`router`].

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use meshwork::peers::PeerSnapshot;
use meshwork::transport::{Direction, EndpointStats, Security};
use meshwork::wire::NodeId;
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
        .route("/peers/{id}/disconnect", post(disconnect_peer))
        .route("/peers/{id}/block", post(block_peer))
        .route("/peers/{id}/unblock", post(unblock_peer))
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
    /// Counts and limits of the peer pool.
    pub(crate) pool: PoolJson,
    /// Every known peer, connected ones first.
    pub(crate) peers: Vec<PeerJson>,
    /// Peers blocked through `POST /peers/{id}/block`, hex, sorted.
    pub(crate) blocked: Vec<String>,
    /// Open connections, oldest first.
    pub(crate) connections: Vec<ConnectionJson>,
}

/// The pool in [`StatusJson`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct PoolJson {
    /// Peers with a live connection (connected or unresponsive).
    pub(crate) connected: usize,
    /// Of those, the ones that dialled us.
    pub(crate) inbound: usize,
    /// Of those, the ones we dialled.
    pub(crate) outbound: usize,
    /// Dials in flight.
    pub(crate) pending_dials: usize,
    /// Peers in the address book without a connection.
    pub(crate) known: usize,
    /// Connections refused because the pool was full, since start.
    pub(crate) refused: u64,
    /// Messages for the layers above dropped because nobody took them.
    pub(crate) dropped_inbound: u64,
    /// The pool dials known peers while it has fewer (`--min-peers`).
    pub(crate) min_peers: usize,
    /// The pool never holds more (`--max-peers`).
    pub(crate) max_peers: usize,
}

/// One peer in [`StatusJson`], from the peer manager's snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct PeerJson {
    /// The peer's id, hex.
    pub(crate) node_id: String,
    /// `"known"`, `"connecting"`, `"connected"`, `"unresponsive"`,
    /// `"disconnected"` or `"banned"`.
    pub(crate) state: &'static str,
    /// `"inbound"` or `"outbound"` while connected, else null.
    pub(crate) direction: Option<&'static str>,
    /// The other end of the current stream, null when not connected.
    pub(crate) addr: Option<String>,
    /// Where the peer says it listens.
    pub(crate) listen: Vec<String>,
    /// Latest heartbeat round trip in ms, null before the first pong.
    pub(crate) rtt_ms: Option<f64>,
    /// Smoothed round trip in ms, null before the first pong.
    pub(crate) srtt_ms: Option<f64>,
    /// Errors reported against it.
    pub(crate) errors: u32,
    /// Timeouts reported against it.
    pub(crate) timeouts: u32,
    /// Quality in (0, 1], higher is better; 0 when not connected.
    pub(crate) score: f64,
    /// Seconds the current connection has lasted, null when not connected.
    pub(crate) connected_secs: Option<f64>,
    /// Ms since anything arrived from it, null when not connected.
    pub(crate) idle_ms: Option<f64>,
    /// Dials that failed in a row.
    pub(crate) dial_failures: u32,
    /// The metadata from its Hello (empty until connected once).
    pub(crate) metadata: BTreeMap<String, String>,
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

/// The pool size limits shown in [`PoolJson`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// `--min-peers`.
    pub(crate) min_peers: usize,
    /// `--max-peers`.
    pub(crate) max_peers: usize,
}

impl Limits {
    /// The limits `node` runs with.
    pub(crate) fn of(node: &Node) -> Self {
        let config = node.peers().config();
        Limits {
            min_peers: config.min_peers(),
            max_peers: config.max_peers(),
        }
    }
}

/// Converts a node snapshot, its security mode, its handshake counters
/// (`node.endpoint().stats()`) and its pool limits to the JSON form.
pub(crate) fn status_json(
    status: &NodeStatus,
    security: Security,
    stats: &EndpointStats,
    limits: Limits,
) -> StatusJson {
    let pool = &status.pool;
    let mut blocked: Vec<String> = status.blocked.iter().map(|id| id.to_string()).collect();
    blocked.sort_unstable();
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
        pool: PoolJson {
            connected: pool.connected,
            inbound: pool.inbound,
            outbound: pool.outbound,
            pending_dials: pool.pending_dials,
            known: pool.known,
            refused: pool.refused,
            dropped_inbound: pool.dropped_inbound,
            min_peers: limits.min_peers,
            max_peers: limits.max_peers,
        },
        peers: status.peers.iter().map(peer_json).collect(),
        blocked,
        connections: status.connections.iter().map(connection_json).collect(),
    }
}

fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::Inbound => "inbound",
        Direction::Outbound => "outbound",
    }
}

fn peer_json(p: &PeerSnapshot) -> PeerJson {
    PeerJson {
        node_id: p.node_id.to_string(),
        state: p.state.as_str(),
        direction: p.direction.map(direction_name),
        addr: p.remote_addr.as_ref().map(|a| a.to_string()),
        listen: p.addrs.iter().map(|a| a.to_string()).collect(),
        rtt_ms: p.rtt.map(ms),
        srtt_ms: p.smoothed_rtt.map(ms),
        errors: p.errors,
        timeouts: p.timeouts,
        score: p.score,
        connected_secs: p.connected_for.map(|d| d.as_secs_f64()),
        idle_ms: p.idle_for.map(ms),
        dial_failures: p.dial_failures,
        metadata: p.metadata.clone().into_iter().collect(),
    }
}

fn connection_json(c: &ConnectionStatus) -> ConnectionJson {
    ConnectionJson {
        node_id: c.node_id.to_string(),
        addr: c.addr.to_string(),
        direction: direction_name(c.direction),
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
        Limits::of(node),
    ))
}

/// Parses the `{id}` of a `/peers/{id}/...` path.
fn parse_peer(id: Result<Path<String>, PathRejection>) -> Result<NodeId, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    NodeId::from_hex(&id).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a node id (hex, as in /status): {e}"),
        )
    })
}

/// The body of `POST /peers/{id}/disconnect`.
#[derive(Debug, Serialize)]
struct Disconnected {
    disconnected: String,
}

/// Closes the connection to a peer (Disconnect "other"); the peer manager
/// backs off before dialling it again, but the peer may dial back.
async fn disconnect_peer(
    State(state): State<AdminState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Disconnected>, ApiError> {
    let peer = parse_peer(id)?;
    if !state.node.peers().disconnect(&peer) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("peer {peer} is not connected"),
        ));
    }
    info!(peer = %peer.short(), "peer disconnected through the admin API");
    Ok(Json(Disconnected {
        disconnected: peer.to_string(),
    }))
}

/// The body of `POST /peers/{id}/block`.
#[derive(Debug, Serialize)]
struct Blocked {
    blocked: String,
}

/// Fault injection: cuts the peer off until it is unblocked. Any id can be
/// blocked, known or not, except this node's own.
async fn block_peer(
    State(state): State<AdminState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Blocked>, ApiError> {
    let peer = parse_peer(id)?;
    if &peer == state.node.node_id() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{peer} is this node's own id"),
        ));
    }
    state.node.peers().block(&peer);
    info!(peer = %peer.short(), "peer blocked through the admin API");
    Ok(Json(Blocked {
        blocked: peer.to_string(),
    }))
}

/// The body of `POST /peers/{id}/unblock`.
#[derive(Debug, Serialize)]
struct Unblocked {
    unblocked: String,
}

/// Ends a block (a peer that was not blocked is fine too); the peer is
/// redialled if the pool has room.
async fn unblock_peer(
    State(state): State<AdminState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Unblocked>, ApiError> {
    let peer = parse_peer(id)?;
    state.node.peers().unblock(&peer);
    info!(peer = %peer.short(), "peer unblocked through the admin API");
    Ok(Json(Unblocked {
        unblocked: peer.to_string(),
    }))
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
    use meshwork::peers::{PeerEvent, PeerState, PeersConfig, PoolStats};
    use meshwork::transport::mem::MemNetwork;
    use serde_json::{Value, json};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Upper bound of every wait; a passing test waits only as long as the
    /// condition takes.
    const TIMEOUT: Duration = Duration::from_secs(10);
    /// How often `/status` is polled while waiting.
    const POLL: Duration = Duration::from_millis(10);

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

    async fn post_json(addr: std::net::SocketAddr, path: &str) -> (u16, Value) {
        let (code, body) = request(addr, "POST", path).await;
        let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
        (code, json)
    }

    /// Polls `/status` until `done` holds, and returns that status.
    async fn wait_status(
        addr: std::net::SocketAddr,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let (code, status) = get_json(addr, "/status").await;
            assert_eq!(code, 200);
            if done(&status) {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} not within {TIMEOUT:?}: {status}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// The entry of `peer` in a `/status` peers list, if any.
    fn peer_entry<'a>(status: &'a Value, peer: &Node) -> Option<&'a Value> {
        let id = peer.node_id().to_string();
        status["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["node_id"] == id.as_str())
    }

    /// True when `status` shows a live link with `peer`.
    fn linked(status: &Value, peer: &Node) -> bool {
        peer_entry(status, peer).is_some_and(|p| {
            let state = p["state"].as_str().unwrap();
            state == PeerState::Connected.as_str() || state == PeerState::Unresponsive.as_str()
        })
    }

    /// True when `status` shows `peer` connected and responsive.
    fn connected(status: &Value, peer: &Node) -> bool {
        peer_entry(status, peer).is_some_and(|p| p["state"] == "connected")
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

    /// Peer settings for tests: quick heartbeats, ticks and redials, and
    /// thresholds far enough away that a slow machine does not trip them.
    fn quick(c: PeersConfig) -> PeersConfig {
        let ms = Duration::from_millis;
        c.with_heartbeat(ms(20), ms(5_000), ms(10_000))
            .with_backoff(ms(10), ms(200))
            .with_tick(ms(10))
    }

    /// Two connected nodes on an in-memory network: `b` seeds `a`. `a`
    /// keeps 2 to 6 peers; each sends its name as metadata `role`.
    async fn two_nodes() -> (Node, Node) {
        let net = MemNetwork::new();
        let a = Node::builder("admin-test")
            .transport(net.transport("a"))
            .listen("mem://a".parse().unwrap())
            .metadata("role", "a")
            .min_peers(2)
            .max_peers(6)
            .peers(quick)
            .start()
            .await
            .unwrap();
        let b = Node::builder("admin-test")
            .transport(net.transport("b"))
            .listen("mem://b".parse().unwrap())
            .metadata("role", "b")
            .seed("mem://a".parse().unwrap())
            .peers(quick)
            .start()
            .await
            .unwrap();
        a.wait_for_peers(1, TIMEOUT).await.unwrap();
        b.wait_for_peers(1, TIMEOUT).await.unwrap();
        (a, b)
    }

    #[test]
    fn status_json_converts_units_and_names() {
        let id = NodeId::from_bytes(vec![0xab, 0xcd]).unwrap();
        let peer = NodeId::from_bytes(vec![0x01, 0x02, 0x03]).unwrap();
        let known = NodeId::from_bytes(vec![0x04]).unwrap();
        let status = NodeStatus {
            node_id: id,
            network_id: "net".into(),
            listen: vec!["tcp://127.0.0.1:7000".parse().unwrap()],
            metadata: [("role".to_string(), "seed".to_string())].into(),
            uptime: Duration::from_millis(1500),
            pool: PoolStats {
                connected: 1,
                inbound: 1,
                outbound: 0,
                pending_dials: 2,
                known: 1,
                refused: 5,
                dropped_inbound: 3,
            },
            peers: vec![
                PeerSnapshot {
                    node_id: peer.clone(),
                    state: PeerState::Connected,
                    direction: Some(Direction::Inbound),
                    addrs: vec!["tcp://127.0.0.1:7001".parse().unwrap()],
                    remote_addr: Some("tcp://127.0.0.1:40000".parse().unwrap()),
                    metadata: [("role".to_string(), "leaf".to_string())].into(),
                    rtt: Some(Duration::from_micros(120)),
                    smoothed_rtt: Some(Duration::from_micros(250)),
                    errors: 1,
                    timeouts: 2,
                    score: 0.5,
                    connected_for: Some(Duration::from_millis(250)),
                    idle_for: Some(Duration::from_micros(1500)),
                    dial_failures: 0,
                },
                PeerSnapshot {
                    node_id: known.clone(),
                    state: PeerState::Known,
                    direction: None,
                    addrs: vec![],
                    remote_addr: None,
                    metadata: Default::default(),
                    rtt: None,
                    smoothed_rtt: None,
                    errors: 0,
                    timeouts: 0,
                    score: 0.0,
                    connected_for: None,
                    idle_for: None,
                    dial_failures: 3,
                },
            ],
            blocked: vec![known, peer.clone()],
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
        let limits = Limits {
            min_peers: 4,
            max_peers: 16,
        };
        let json =
            serde_json::to_value(status_json(&status, Security::Noise, &stats, limits)).unwrap();
        assert_eq!(
            json,
            json!({
                "node_id": "abcd",
                "network_id": "net",
                "security": "noise",
                "handshakes_ok": 5,
                "handshake_failures": {"crypto": 2, "not_allowed": 1},
                "rejected_busy": 7,
                "listen": ["tcp://127.0.0.1:7000"],
                "metadata": {"role": "seed"},
                "uptime_secs": 1.5,
                "pool": {
                    "connected": 1,
                    "inbound": 1,
                    "outbound": 0,
                    "pending_dials": 2,
                    "known": 1,
                    "refused": 5,
                    "dropped_inbound": 3,
                    "min_peers": 4,
                    "max_peers": 16
                },
                "peers": [{
                    "node_id": "010203",
                    "state": "connected",
                    "direction": "inbound",
                    "addr": "tcp://127.0.0.1:40000",
                    "listen": ["tcp://127.0.0.1:7001"],
                    "rtt_ms": 0.12,
                    "srtt_ms": 0.25,
                    "errors": 1,
                    "timeouts": 2,
                    "score": 0.5,
                    "connected_secs": 0.25,
                    "idle_ms": 1.5,
                    "dial_failures": 0,
                    "metadata": {"role": "leaf"}
                }, {
                    "node_id": "04",
                    "state": "known",
                    "direction": null,
                    "addr": null,
                    "listen": [],
                    "rtt_ms": null,
                    "srtt_ms": null,
                    "errors": 0,
                    "timeouts": 0,
                    "score": 0.0,
                    "connected_secs": null,
                    "idle_ms": null,
                    "dial_failures": 3,
                    "metadata": {}
                }],
                "blocked": ["010203", "04"],
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
            limits,
        );
        let json = serde_json::to_value(plain).unwrap();
        assert_eq!(json["security"], "plaintext");
        assert_eq!(json["handshake_failures"], json!({}));
        assert_eq!(json["handshakes_ok"], 0);
    }

    #[tokio::test]
    async fn status_health_and_errors_over_http() {
        let (a, b) = two_nodes().await;
        let (addr, _shutdown) = serve(&a).await;

        assert_eq!(request(addr, "GET", "/health").await, (200, "ok".into()));

        // Wait until the first pong has given the connection an RTT.
        let status = wait_status(addr, "an RTT", |s| {
            s["connections"][0]["smoothed_rtt_ms"].is_f64()
        })
        .await;
        assert_eq!(status["node_id"], a.node_id().to_string());
        assert_eq!(status["network_id"], "admin-test");
        assert_eq!(status["security"], "noise", "encrypted by default");
        assert!(status["handshakes_ok"].as_u64().unwrap() >= 1, "{status}");
        assert_eq!(status["handshake_failures"], json!({}));
        assert_eq!(status["rejected_busy"], 0);
        assert_eq!(status["listen"][0], a.listen_addrs()[0].to_string());
        assert_eq!(status["metadata"], json!({"role": "a"}));
        assert!(status["uptime_secs"].as_f64().unwrap() > 0.0);
        let conns = status["connections"].as_array().unwrap();
        assert_eq!(conns.len(), 1, "{status}");
        let c = &conns[0];
        assert_eq!(c["node_id"], b.node_id().to_string());
        assert_eq!(c["direction"], "inbound");
        assert_eq!(c["listen_addrs"][0], b.listen_addrs()[0].to_string());
        assert_eq!(c["addr"], "mem://b");
        assert!(c["rtt_ms"].as_f64().unwrap() > 0.0);
        assert!(c["age_secs"].as_f64().unwrap() >= 0.0);
        assert!(c["frames_sent"].as_u64().unwrap() >= 1);
        assert!(c["frames_received"].as_u64().unwrap() >= 1);

        let (code, body) = get_json(addr, "/nope").await;
        assert_eq!(code, 404);
        assert!(body["error"].as_str().unwrap().contains("/nope"), "{body}");
        let (code, body) = get_json(addr, "/shutdown").await;
        assert_eq!(code, 405);
        assert!(body["error"].is_string(), "{body}");
        let path = format!("/peers/{}/block", b.node_id());
        let (code, body) = get_json(addr, &path).await;
        assert_eq!(code, 405, "{body}");

        b.shutdown().await;
        a.shutdown().await;
    }

    /// `/status` shows the pool with its limits and every peer, from both
    /// ends of a link.
    #[tokio::test]
    async fn status_lists_the_pool_and_every_peer() {
        let (a, b) = two_nodes().await;
        let (addr_a, _stop_a) = serve(&a).await;
        let (addr_b, _stop_b) = serve(&b).await;

        let status = wait_status(addr_a, "a pong from b", |s| {
            s["peers"][0]["srtt_ms"].is_f64()
        })
        .await;
        let pool = &status["pool"];
        assert_eq!(pool["connected"], 1, "{status}");
        assert_eq!(pool["inbound"], 1, "{status}");
        assert_eq!(pool["outbound"], 0, "{status}");
        assert_eq!(pool["known"], 0, "{status}");
        assert_eq!(pool["dropped_inbound"], 0, "{status}");
        assert!(pool["pending_dials"].is_u64(), "{status}");
        assert_eq!(
            (&pool["min_peers"], &pool["max_peers"]),
            (&json!(2), &json!(6))
        );
        assert_eq!(status["blocked"], json!([]));

        let peers = status["peers"].as_array().unwrap();
        assert_eq!(peers.len(), 1, "{status}");
        let p = &peers[0];
        assert_eq!(p["node_id"], b.node_id().to_string());
        assert_eq!(p["state"], "connected");
        assert_eq!(p["direction"], "inbound");
        assert_eq!(p["addr"], "mem://b");
        assert_eq!(p["listen"], json!(["mem://b"]));
        assert!(p["rtt_ms"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["srtt_ms"].as_f64().unwrap() > 0.0, "{p}");
        assert_eq!((&p["errors"], &p["timeouts"]), (&json!(0), &json!(0)));
        let score = p["score"].as_f64().unwrap();
        assert!(score > 0.0 && score <= 1.0, "{p}");
        assert!(p["connected_secs"].as_f64().unwrap() >= 0.0, "{p}");
        assert!(p["idle_ms"].as_f64().unwrap() >= 0.0, "{p}");
        assert_eq!(p["dial_failures"], 0);
        assert_eq!(p["metadata"], json!({"role": "b"}));

        // b dialled a, its seed; b keeps the default limits.
        let status = wait_status(addr_b, "a listed as connected", |s| connected(s, &a)).await;
        let p = peer_entry(&status, &a).unwrap();
        assert_eq!(p["direction"], "outbound");
        assert_eq!(p["addr"], "mem://a");
        assert_eq!(p["metadata"], json!({"role": "a"}));
        assert_eq!(status["pool"]["outbound"], 1, "{status}");
        assert_eq!(status["pool"]["min_peers"], 4);
        assert_eq!(status["pool"]["max_peers"], 16);

        b.shutdown().await;
        a.shutdown().await;
    }

    #[tokio::test]
    async fn disconnect_answers_200_404_and_400() {
        let (a, b) = two_nodes().await;
        let (addr, _shutdown) = serve(&a).await;
        let mut events = a.peers().events();

        for bad in ["zz", "abc", "not-hex"] {
            let (code, body) = post_json(addr, &format!("/peers/{bad}/disconnect")).await;
            assert_eq!(code, 400, "{bad}: {body}");
            assert!(
                body["error"].as_str().unwrap().contains("node id"),
                "{body}"
            );
        }
        let stranger = "ab".repeat(32);
        let (code, body) = post_json(addr, &format!("/peers/{stranger}/disconnect")).await;
        assert_eq!(code, 404, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("not connected"),
            "{body}"
        );

        let id = b.node_id().to_string();
        let (code, body) = post_json(addr, &format!("/peers/{id}/disconnect")).await;
        assert_eq!((code, body), (200, json!({"disconnected": id})));
        // The link to b ends (b, whose seed is a, may well dial back later).
        tokio::time::timeout(TIMEOUT, async {
            loop {
                match events.recv().await.unwrap() {
                    PeerEvent::Disconnected { peer, .. } if &peer == b.node_id() => break,
                    _ => {}
                }
            }
        })
        .await
        .expect("b disconnected");

        b.shutdown().await;
        a.shutdown().await;
    }

    /// Block cuts a peer off (and keeps it off although it keeps dialling)
    /// until unblock; both show in `/status`.
    #[tokio::test]
    async fn block_cuts_a_peer_off_until_unblocked() {
        let (a, b) = two_nodes().await;
        let (addr, _shutdown) = serve(&a).await;
        let id = b.node_id().to_string();

        for path in ["/peers/zz/block", "/peers/zz/unblock"] {
            let (code, body) = post_json(addr, path).await;
            assert_eq!(code, 400, "{path}: {body}");
            assert!(body["error"].is_string(), "{body}");
        }
        let own = format!("/peers/{}/block", a.node_id());
        let (code, body) = post_json(addr, &own).await;
        assert_eq!(code, 400, "{body}");
        assert!(body["error"].as_str().unwrap().contains("own"), "{body}");

        // Upper-case hex is accepted; answers use the canonical lower case.
        let path = format!("/peers/{}/block", id.to_ascii_uppercase());
        let (code, body) = post_json(addr, &path).await;
        assert_eq!((code, body), (200, json!({"blocked": id})));
        // b keeps redialling its seed and is refused at the handshake.
        let status = wait_status(addr, "b cut off and refused", |s| {
            !linked(s, &b)
                && s["connections"] == json!([])
                && s["handshake_failures"]["banned"].as_u64() >= Some(1)
        })
        .await;
        assert_eq!(status["blocked"], json!([id]));
        assert_eq!(status["pool"]["connected"], 0, "{status}");
        assert!(a.peers().connected().is_empty());
        let (code, body) = post_json(addr, &format!("/peers/{id}/disconnect")).await;
        assert_eq!(code, 404, "a blocked peer is not connected: {body}");

        let (code, body) = post_json(addr, &format!("/peers/{id}/unblock")).await;
        assert_eq!((code, body), (200, json!({"unblocked": id})));
        let status = wait_status(addr, "b back", |s| connected(s, &b)).await;
        assert_eq!(status["blocked"], json!([]));
        // Unblocking a peer that is not blocked is fine.
        let (code, _) = post_json(addr, &format!("/peers/{id}/unblock")).await;
        assert_eq!(code, 200);

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
            .peers(quick)
            .start()
            .await
            .unwrap();
        let (addr, _shutdown) = serve(&a).await;
        wait_status(addr, "two crypto failures", |s| {
            assert_eq!(s["connections"], json!([]), "{s}");
            assert_eq!(s["peers"], json!([]), "{s}");
            s["handshake_failures"]["crypto"].as_u64() >= Some(2)
        })
        .await;
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
        let (code, body) = post_json(addr, "/shutdown").await;
        assert_eq!((code, body), (202, json!({"shutting_down": true})));
        tokio::time::timeout(TIMEOUT, shutdown.stopped())
            .await
            .expect("shutdown signal fired");
        node.shutdown().await;
    }
}
