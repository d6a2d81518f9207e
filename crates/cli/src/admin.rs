//! The admin HTTP API of `meshwork node` (JSON over HTTP/1.1, axum).
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/health` | 200 `ok` |
//! | GET | `/status` | 200 [`StatusJson`] |
//! | POST | `/peers/{id}/disconnect` | 200 `{"disconnected":"<id>"}`; 404 when that peer is not connected; 400 for this node's own id |
//! | POST | `/peers/{id}/block` | 200 `{"blocked":"<id>"}`: its connection ends and handshakes with it are refused until unblocked |
//! | POST | `/peers/{id}/unblock` | 200 `{"unblocked":"<id>"}` |
//! | POST | `/broadcast` | body = message; floods it to the echo concern (command 0x100) of every node, TTL 16: 200 `{"message_id":n}`; 503 `no_neighbours` when no peer is connected (it would reach nobody) |
//! | POST | `/publish/{topic}` | body = message; publishes it on `topic`: 200 `{"message_id":n}`; 400 for a topic that is empty or over 256 bytes; 503 `no_neighbours` as `/broadcast` |
//! | POST | `/request/{id}?timeout_ms=N` | body = message; asks node `id`'s echo concern, routed if it is not a neighbour (`timeout_ms` 1 to 600000, default 5000): 200 `{"reply":text,"elapsed_ms":x}` |
//! | GET | `/events?since=SEQ` | 200 `{"events":[...],"next":n}`: the deliveries recorded after `SEQ` (default 0), see [`EventLog`] |
//! | GET | `/kv/{key}` | 200 [`KvEntryJson`]: the key's value (UTF-8, invalid bytes replaced), version, writer, lease and expiry; 404 when it holds no value |
//! | PUT | `/kv/{key}?ttl_ms=N` or `?lease_ms=N` | body = value; sets the key (ephemeral with `ttl_ms`, 1 to 86400000: it vanishes everywhere `ttl_ms` after this node stops refreshing it; with `lease_ms`, 1 to 31536000000, leased for that long instead of `--lease-secs`, renewed by each write): 200 `{"version":n}`; 409 `lease_held` |
//! | DELETE | `/kv/{key}` | 200 `{"deleted":true}`; 404 when it holds no value; 409 `lease_held` |
//! | POST | `/kv/{key}/release` | gives up this node's lease, keeping the value: 200 `{"released":true,"version":n}`; 404; 409 `lease_held` |
//! | POST | `/kv/{key}/confirm?timeout_ms=N` | waits until every connected peer has applied this node's entry for the key (`timeout_ms` as for `/request`): 200 `{"peers":n}`; 504 `timeout` with `peers` and `missing` (ids); 404 |
//! | GET | `/kv?prefix=P&limit=N&after=K` | 200 `{"items":[{"key","value","version","writer"}...],"count":n,"next","next_hex"}`: the keys starting with `P` (default: all), sorted, after `K` (or `after_hex`), a page of at most `limit` (default 1000, at most 10000) and about 1 MiB of keys and values; `next` (and `next_hex`, exact where a key is not UTF-8) name the last key when more follow, else null |
//! | GET | `/kv-digest` | 200 `{"digest":"<16 hex digits>","keys":n,"entries":n}`: a hash of the whole replica (tombstones and leases included): equal digests, equal replicas |
//! | POST | `/rpc/{service}/{method}?deadline_ms=N&idempotent=B&version=V&provider=ID` | body = the arguments as a JSON array (empty: none); calls the method from this node in JSON through [`Rpc::call_raw`](meshwork::rpc::Rpc::call_raw) (`deadline_ms` 1 to 600000, default `--rpc-deadline-ms`; `idempotent=true` allows a retry on another provider after a timeout; `version` 0, the default, takes any; `provider` calls that node and no other, 404 `no_provider` at once if it does not serve the service): 200 `{"result":<json>,"elapsed_ms":x}` |
//! | GET | `/rpc/{service}/providers` | 200 `{"service":name,"providers":[{"node_id","reach","version","methods","latency_ms","in_flight"}]}`: the registry's providers, nearest first (`reach` `local`, `neighbour` or `routed`; `latency_ms` the smoothed round trip of this node's calls to it, null before one succeeded; `in_flight` its calls from this node waiting for their answer now) |
//! | POST | `/shutdown` | 202 `{"shutting_down":true}`, then a graceful shutdown |
//! | any | anything else | 404 (405 for a known path) |
//!
//! The server ([`crate::http::serve`]) gives a client 10 s to send each
//! request's head and 30 s for its body (then 408 `timeout`), ends a
//! connection whose client has not read its answer for 30 s, and serves
//! 64 connections at once; of those, at most 48
//! requests wait on the mesh (`POST /request`, `POST /rpc`, `POST
//! /kv/{key}/confirm`), more get 503 `busy` at once, so that `/health`,
//! `/status` and `/shutdown` stay reachable.
//! An unknown query parameter is a 400 `bad_request` on every route, and
//! the request is not carried out (a typo such as `?ttl=` must not be
//! ignored; `POST /shutdown?now=1` does not shut down). `{id}` is a node
//! id, 64 hex digits (as in `/status`; another length only for an id this
//! node knows of); anything else is a 400. Block and unblock
//! take any well-formed id, known or not (a block can be set up before the
//! peer appears). Request bodies are at most 2 MiB: a larger one answers 413
//! `too_large`. Keys under `rpc/services/` are the RPC registry, kept by the
//! nodes that serve each service: `PUT`, `DELETE` and `release` of them
//! answer 403 `reserved` (reading them is fine).
//! `{key}` is the key as UTF-8 text, percent-encoded where needed (`a%2Fb`
//! is the key `a/b`). A `version` is the write's hybrid-logical-clock stamp
//! (ms since the Unix epoch << 16 | counter): it only grows along a key's
//! history, so it serves as a fencing token. It is above 2^53: parse it as
//! a 64-bit integer, not a double.
//! Block and unblock are fault injection: `cargo xtask test-mesh` makes
//! partitions out of real processes with them.
//!
//! Every error answer is `{"error": text, "code": kind}`. `POST /request`
//! answers 404 `unreachable` (no route found, also when `timeout_ms` ran
//! out before one was), 504 `timeout` (routed, no answer in time), 502
//! `remote` (the target answered with an error; `remote_code` says which,
//! e.g. `unknown_command`), 503 `not_connected`, `unresponsive`, `dropped`
//! or `shutdown`, 400 `bad_request` (bad id, this node's own id, bad
//! `timeout_ms`). The `/kv` endpoints answer 409 `lease_held` (with `owner`,
//! the holder's id, `until_ms`, when its lease lapses in ms since the Unix
//! epoch, and a `hint` when the holder is not connected, as when it was this
//! node before a restart without `--key`) when another node holds the key's
//! lease, 400 `bad_request`
//! for an empty key (`/kv/`, `/kv//release`), 400 `too_large` for a key
//! over 1024 bytes or a value over 1 MiB, 503 `shutdown`.
//! `POST /rpc` answers with the call error's label as the `code` (see
//! [`ApiError::from_rpc`]) and `elapsed_ms`: 404 `no_provider` (at once: no
//! node serves the name), `unknown_service`, `unknown_method`; 504
//! `timeout` (with `deadline_ms`); 409 `version_mismatch` (with `wanted`,
//! `served`); 503 `overloaded`, `disconnected`, `cancelled`; 422
//! `application`, the method's own error, with `application`: its JSON
//! value; 400 `decode` (arguments that do not fit the method), `local` (bad
//! service name) or `bad_request` (a body that is not a JSON array, a bad
//! query); 500 `internal` (the method panicked). Other codes: `not_found`,
//! `method_not_allowed`, `internal`.
//!
//! To add an endpoint: write a handler taking `State<AdminState>` and an
//! [`ApiQuery`] (`ApiQuery<NoQuery>` when it takes no parameters) and
//! returning `Result<Json<T>, ApiError>`, add one `.route(...)` line in
//! [`router`], and add the route to the test
//! `every_route_refuses_unknown_query_parameters`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use meshwork::concerns::{ConcernStats, ConcernsError, Route};
use meshwork::peers::PeerSnapshot;
use meshwork::rpc::{CallOptions, CallStats, Codec, Provider, RpcError, ServedStats};
use meshwork::sync::{EntryInfo, SyncError, SyncStats};
use meshwork::transport::{Direction, Security};
use meshwork::wire::NodeId;
use meshwork::wire::proto::ErrorCode;
use meshwork::{ConnectionStatus, Node, NodeStatus};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::info;

use crate::echo;
use crate::events::{Event, EventLog};

/// `POST /request` waits this long unless `timeout_ms` says otherwise.
const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 5_000;
/// The longest `timeout_ms` accepted (10 minutes).
const MAX_REQUEST_TIMEOUT_MS: u64 = 600_000;
/// The longest `ttl_ms` of an ephemeral key (a day).
const MAX_TTL_MS: u64 = 24 * 60 * 60 * 1000;
/// The longest `lease_ms` of a write (a year).
const MAX_LEASE_MS: u64 = 365 * 24 * 60 * 60 * 1000;
/// `POST /rpc` waits this long unless `deadline_ms` or
/// [`AdminState::with_rpc_deadline`] say otherwise.
const DEFAULT_RPC_DEADLINE_MS: u64 = 10_000;

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
    events: Arc<EventLog>,
    subscriptions: Arc<[String]>,
    rpc_deadline: Duration,
    /// Slots for requests that wait on the mesh ([`MAX_WAITING`]).
    waiting: Arc<tokio::sync::Semaphore>,
}

/// Requests that wait on the mesh (`POST /request`, `POST /rpc`, `POST
/// /kv/{key}/confirm`) answered at once, at most: fewer than the server's
/// 64 connections, so that `/health`, `/status` and `/shutdown` stay
/// reachable while they wait (64 long RPC calls held `/shutdown` for 7 s
/// in a check with processes). Past it such a request is a 503 `busy` at
/// once.
pub(crate) const MAX_WAITING: usize = 48;

impl AdminState {
    /// State for serving `node`; `POST /shutdown` triggers `shutdown`.
    /// `GET /events` shows an empty log until [`with_events`](Self::with_events).
    pub(crate) fn new(node: Node, shutdown: ShutdownSignal) -> Self {
        AdminState {
            node,
            shutdown,
            events: Arc::new(EventLog::new()),
            subscriptions: Arc::new([]),
            rpc_deadline: Duration::from_millis(DEFAULT_RPC_DEADLINE_MS),
            waiting: Arc::new(tokio::sync::Semaphore::new(MAX_WAITING)),
        }
    }

    /// A slot for a request that waits on the mesh, held while it waits;
    /// a 503 `busy` when all [`MAX_WAITING`] are taken.
    fn wait_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.waiting.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{MAX_WAITING} requests are waiting on the mesh already; retry later"),
            )
            .with_code("busy")
        })
    }

    /// The deadline of `POST /rpc` calls without `deadline_ms` (default
    /// 10 s, as the RPC layer's).
    pub(crate) fn with_rpc_deadline(mut self, deadline: Duration) -> Self {
        self.rpc_deadline = deadline;
        self
    }

    /// Serves `events` (the log the node's echo concern and topic recorder
    /// write to) and lists `subscriptions` in `/status`.
    pub(crate) fn with_events(mut self, events: Arc<EventLog>, subscriptions: &[String]) -> Self {
        self.events = events;
        self.subscriptions = subscriptions.into();
        self
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
        .route("/broadcast", post(broadcast))
        .route("/publish/{topic}", post(publish))
        .route("/publish", post(publish_without_topic))
        .route("/publish/", post(publish_without_topic))
        .route("/request/{id}", post(request))
        .route("/events", get(events))
        .route("/kv", get(kv_list))
        .route(
            "/kv/",
            get(kv_without_key)
                .put(kv_without_key)
                .delete(kv_without_key),
        )
        .route("/kv/{key}", get(kv_get).put(kv_put).delete(kv_delete))
        .route("/kv/{key}/release", post(kv_release))
        .route("/kv/{key}/confirm", post(kv_confirm))
        .route("/kv-digest", get(kv_digest))
        .route("/rpc/{service}/{method}", post(rpc_call))
        // A method named `providers` is still callable.
        .route(
            "/rpc/{service}/providers",
            get(rpc_providers).post(rpc_call_providers),
        )
        .route("/shutdown", post(shutdown))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_request(refuse_long_bodies))
        .with_state(state)
}

/// Answers 413 `too_large` at once to a request whose `Content-Length` is
/// over [`MAX_BODY_BYTES`], before reading any of its body: without it the
/// connection waited for the body up to the limit (or the body timeout, 30 s,
/// for a client that sends less).
async fn refuse_long_bodies(
    request: axum::extract::Request,
) -> Result<axum::extract::Request, ApiError> {
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    Ok(request)
}

/// The 413 of a body over [`MAX_BODY_BYTES`].
fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the body is over the admin API's limit of {MAX_BODY_BYTES} bytes"),
    )
    .with_code("too_large")
}

/// An error answer: a status code and `{"error": message, "code": kind}`,
/// plus fields that depend on the kind (e.g. `owner` for `lease_held`).
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    remote_code: Option<String>,
    extra: serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    /// An error with this status code and message; its `code` is the
    /// status's usual kind (`bad_request`, `not_found`, ...).
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        let code = match status {
            StatusCode::BAD_REQUEST => "bad_request",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::GATEWAY_TIMEOUT => "timeout",
            _ => "internal",
        };
        ApiError {
            status,
            code,
            message: message.into(),
            remote_code: None,
            extra: serde_json::Map::new(),
        }
    }

    /// The same error with another `code`.
    fn with_code(mut self, code: &'static str) -> Self {
        self.code = code;
        self
    }

    /// The same error with one more field in its body.
    fn with_field(mut self, name: &str, value: impl Into<serde_json::Value>) -> Self {
        self.extra.insert(name.to_owned(), value.into());
        self
    }

    /// The answer to a refused or failed call into the sync layer.
    fn from_sync(e: &SyncError) -> Self {
        match e {
            SyncError::LeaseHeld {
                owner, until_ms, ..
            } => ApiError::new(StatusCode::CONFLICT, e.to_string())
                .with_code("lease_held")
                .with_field("owner", owner.to_string())
                .with_field("until_ms", *until_ms),
            SyncError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            SyncError::TooLarge(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, e.to_string()).with_code("too_large")
            }
            SyncError::Full { limit, .. } => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
                    .with_code("full")
                    .with_field("max_bytes", *limit)
            }
            SyncError::NotConfirmed { peers, missing, .. } => {
                let missing: Vec<serde_json::Value> =
                    missing.iter().map(|id| id.to_string().into()).collect();
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, e.to_string())
                    .with_field("peers", *peers)
                    .with_field("missing", missing)
            }
            SyncError::Shutdown => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).with_code("shutdown")
            }
            SyncError::Concerns(inner) => ApiError::from_concerns(inner),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }

    /// The answer to a failed call into the concerns layer.
    fn from_concerns(e: &ConcernsError) -> Self {
        let (status, code) = match e {
            ConcernsError::Unreachable(_) | ConcernsError::RouteLost(_) => {
                (StatusCode::NOT_FOUND, "unreachable")
            }
            ConcernsError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ConcernsError::Remote { .. } => (StatusCode::BAD_GATEWAY, "remote"),
            ConcernsError::NotConnected(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_connected"),
            ConcernsError::Unresponsive(_) => (StatusCode::SERVICE_UNAVAILABLE, "unresponsive"),
            ConcernsError::Dropped(_) => (StatusCode::SERVICE_UNAVAILABLE, "dropped"),
            ConcernsError::Shutdown => (StatusCode::SERVICE_UNAVAILABLE, "shutdown"),
            ConcernsError::NoNeighbours => (StatusCode::SERVICE_UNAVAILABLE, "no_neighbours"),
            ConcernsError::Decode(_) | ConcernsError::InvalidArgument(_) => {
                (StatusCode::BAD_REQUEST, "bad_request")
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        let mut error = ApiError::new(status, e.to_string()).with_code(code);
        if let ConcernsError::Remote { code, .. } = e {
            error.remote_code = Some(remote_code_name(*code));
        }
        error
    }
}

impl ApiError {
    /// The answer to a failed call (`POST /rpc`): the status by kind, the
    /// error's [label](RpcError::label) as the code, and for an application
    /// error the method's own error as JSON in `application` (a string if
    /// the provider sent something else).
    pub(crate) fn from_rpc(e: &RpcError<Bytes>) -> Self {
        let status = match e {
            RpcError::NoProvider(_)
            | RpcError::UnknownService(_)
            | RpcError::UnknownMethod { .. } => StatusCode::NOT_FOUND,
            RpcError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            RpcError::VersionMismatch { .. } => StatusCode::CONFLICT,
            RpcError::Overloaded(_) | RpcError::Disconnected(_) | RpcError::Cancelled => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            RpcError::Application(_) => StatusCode::UNPROCESSABLE_ENTITY,
            RpcError::Decode(_) | RpcError::Local(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = match e {
            RpcError::Application(body) => {
                format!("the method failed: {}", String::from_utf8_lossy(body))
            }
            other => other.to_string(),
        };
        let error = ApiError::new(status, message).with_code(e.label());
        match e {
            RpcError::Application(body) => {
                let value = serde_json::from_slice::<serde_json::Value>(body)
                    .unwrap_or_else(|_| text(body).into());
                error.with_field("application", value)
            }
            RpcError::Timeout(d) => error.with_field("deadline_ms", ms(*d)),
            RpcError::VersionMismatch { wanted, served, .. } => error
                .with_field("wanted", *wanted)
                .with_field("served", *served),
            _ => error,
        }
    }
}

/// `ERROR_CODE_UNKNOWN_COMMAND` → `unknown_command`.
fn remote_code_name(code: ErrorCode) -> String {
    let name = code.as_str_name();
    name.strip_prefix("ERROR_CODE_")
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// The body of an error answer.
#[derive(Debug, Serialize)]
struct ErrorJson<'a> {
    error: &'a str,
    code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_code: Option<&'a str>,
    #[serde(flatten)]
    extra: &'a serde_json::Map<String, serde_json::Value>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorJson {
                error: &self.message,
                code: self.code,
                remote_code: self.remote_code.as_deref(),
                extra: &self.extra,
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
    /// Pending incoming handshakes evicted to admit a newcomer (a host
    /// holding more of them, or one silent for half the handshake timeout).
    pub(crate) evicted_handshakes: u64,
    /// Incoming handshakes holding one of the 64 slots now.
    pub(crate) pending_handshakes: usize,
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
    /// The seeds (`--seed`), as given: who answered at each, whether it is
    /// connected, and why the last dials failed.
    pub(crate) seeds: Vec<SeedJson>,
    /// Peers blocked through `POST /peers/{id}/block`, hex, sorted.
    pub(crate) blocked: Vec<String>,
    /// Open connections, oldest first.
    pub(crate) connections: Vec<ConnectionJson>,
    /// Every concern (the node's `echo` and the built-in ones) with its
    /// counters, by command id.
    pub(crate) concerns: Vec<ConcernJson>,
    /// Nodes reached through other nodes: the routing table, by target.
    pub(crate) routes: Vec<RouteJson>,
    /// The replicated map: its mode, sizes, digest and counters.
    pub(crate) sync: SyncJson,
    /// Counters of the built-in concerns: `{"flood": {"sent": n, ...},
    /// "routing": {...}, "topics": {...}}`.
    pub(crate) builtin: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    /// Topics this node subscribed to (`--subscribe`), sorted.
    pub(crate) subscriptions: Vec<String>,
    /// Requests for command ids nobody handles here, since start.
    pub(crate) unknown_commands: u64,
    /// Answers dropped since start: the asker's lane stayed full for a
    /// second (`Concerns::unsent_answers`).
    pub(crate) unsent_answers: u64,
    /// Error answers dropped since start: they could not go out at once
    /// (`Concerns::unsent_errors`).
    pub(crate) unsent_errors: u64,
    /// Requests of this node waiting for their answer now, direct and
    /// routed (`Concerns::pending_requests`).
    pub(crate) pending_requests: usize,
    /// Services served here (`--serve-demo`), by name, with their counters.
    pub(crate) served: Vec<ServedJson>,
    /// Counters of the RPC calls this node made.
    pub(crate) calls: CallsJson,
}

/// One service in [`StatusJson`]'s `served`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ServedJson {
    /// The name it is served under.
    pub(crate) name: String,
    /// Its version.
    pub(crate) version: u32,
    /// Its methods.
    pub(crate) methods: Vec<String>,
    /// Calls started.
    pub(crate) calls: u64,
    /// Calls that ended with an error (application errors included).
    pub(crate) errors: u64,
    /// Calls refused at the concurrency limit (`--rpc-concurrency`).
    pub(crate) overloaded: u64,
    /// Calls stopped because their caller cancelled or they ran out of time.
    pub(crate) cancelled: u64,
    /// Calls running now.
    pub(crate) in_flight: usize,
    /// Times its registry entry was written again after another node had
    /// taken it.
    pub(crate) relisted: u64,
}

/// [`StatusJson`]'s `calls`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct CallsJson {
    /// Calls made.
    pub(crate) calls: u64,
    /// Calls that failed (any error, application errors included).
    pub(crate) failures: u64,
    /// Extra attempts on another provider.
    pub(crate) retries: u64,
}

fn served_json(s: &ServedStats) -> ServedJson {
    ServedJson {
        name: s.name.clone(),
        version: s.version,
        methods: s.methods.clone(),
        calls: s.calls,
        errors: s.errors,
        overloaded: s.overloaded,
        cancelled: s.cancelled,
        in_flight: s.in_flight,
        relisted: s.relisted,
    }
}

fn calls_json(c: &CallStats) -> CallsJson {
    CallsJson {
        calls: c.calls,
        failures: c.failures,
        retries: c.retries,
    }
}

/// One concern in [`StatusJson`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ConcernJson {
    /// Its command id (`echo` is 256; the built-in ones are 0xFFFF0001 up).
    pub(crate) command: u32,
    /// Its name.
    pub(crate) name: String,
    /// Requests handled (started).
    pub(crate) requests: u64,
    /// Replies sent.
    pub(crate) replies: u64,
    /// Requests that failed (error or panic).
    pub(crate) errors: u64,
    /// Of those, panics.
    pub(crate) panics: u64,
    /// Requests refused because their sender's queue, or the byte budget,
    /// was full.
    pub(crate) dropped: u64,
    /// Requests running now.
    pub(crate) in_flight: usize,
    /// Requests waiting now.
    pub(crate) queued: usize,
    /// Bytes of large requests (4 KiB or more) held now.
    pub(crate) held_bytes: usize,
}

/// One route in [`StatusJson`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct RouteJson {
    /// The node it leads to, hex.
    pub(crate) target: String,
    /// The neighbour messages for it go to, hex.
    pub(crate) next_hop: String,
    /// Hops from here.
    pub(crate) hops: u32,
    /// Ms since the route was last confirmed.
    pub(crate) age_ms: f64,
}

/// The replicated map in [`StatusJson`]: every figure of
/// [`SyncStats`], and the leasing mode.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct SyncJson {
    /// Leasing on (the default) or off (`--no-leasing`: last writer wins).
    pub(crate) leasing: bool,
    /// Keys holding a value.
    pub(crate) keys: usize,
    /// Entries held, tombstones included.
    pub(crate) entries: usize,
    /// What the entries cost in memory, of at most `max_bytes`.
    pub(crate) bytes: usize,
    /// The replica's byte budget (`--kv-max-mib`).
    pub(crate) max_bytes: usize,
    /// A hash of the whole replica, 16 hex digits (as `GET /kv-digest`).
    pub(crate) digest: String,
    /// Writes made on this node.
    pub(crate) writes: u64,
    /// Entries from peers that changed the replica.
    pub(crate) applied: u64,
    /// Entries from peers that lost to what the replica held.
    pub(crate) stale: u64,
    /// Entries from peers refused (stamped too far ahead, malformed, no
    /// room).
    pub(crate) refused: u64,
    /// Of those, refused because the replica was at its byte budget.
    pub(crate) refused_full: u64,
    /// Eager pushes (floods) sent.
    pub(crate) pushes: u64,
    /// Entries those pushes carried.
    pub(crate) pushed_entries: u64,
    /// Pushes that could not be sent.
    pub(crate) push_failures: u64,
    /// Anti-entropy rounds this node ran.
    pub(crate) rounds: u64,
    /// Of those, rounds that found the replicas equal.
    pub(crate) rounds_equal: u64,
    /// Rounds that failed (peer gone, timeout).
    pub(crate) round_failures: u64,
    /// Rounds cut short by the peer's chunks (no progress, or the pull limit).
    pub(crate) rounds_cut: u64,
    /// Entries received by anti-entropy.
    pub(crate) pulled: u64,
    /// Entries sent by anti-entropy.
    pub(crate) sent: u64,
    /// Leases this node lost to another node's claim.
    pub(crate) lease_lost: u64,
    /// Leases seen to lapse or be released.
    pub(crate) lease_lapsed: u64,
}

/// A digest as shown by the admin API: 16 hex digits.
fn digest_hex(digest: u64) -> String {
    format!("{digest:016x}")
}

fn sync_json(s: &SyncStats, leasing: bool) -> SyncJson {
    SyncJson {
        leasing,
        keys: s.keys,
        entries: s.entries,
        bytes: s.bytes,
        max_bytes: s.max_bytes,
        digest: digest_hex(s.digest),
        writes: s.writes,
        applied: s.applied,
        stale: s.stale,
        refused: s.refused,
        refused_full: s.refused_full,
        pushes: s.pushes,
        pushed_entries: s.pushed_entries,
        push_failures: s.push_failures,
        rounds: s.rounds,
        rounds_equal: s.rounds_equal,
        round_failures: s.round_failures,
        rounds_cut: s.rounds_cut,
        pulled: s.pulled,
        sent: s.sent,
        lease_lost: s.lease_lost,
        lease_lapsed: s.lease_lapsed,
    }
}

/// What [`StatusJson`] shows of the concerns layer besides [`NodeStatus`].
#[derive(Debug, Clone, Default)]
pub(crate) struct ConcernsInfo {
    /// `Concerns::builtin_stats`: (concern, counter, value).
    pub(crate) builtin: Vec<(&'static str, &'static str, u64)>,
    /// Topics subscribed to.
    pub(crate) subscriptions: Vec<String>,
    /// `Concerns::unknown_commands`.
    pub(crate) unknown_commands: u64,
    /// `Concerns::unsent_answers`.
    pub(crate) unsent_answers: u64,
    /// `Concerns::unsent_errors`.
    pub(crate) unsent_errors: u64,
    /// `Concerns::pending_requests`.
    pub(crate) pending_requests: usize,
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
    /// `Discovered` messages dropped unread (a peer sending more than 8 at
    /// once or one a second after that).
    pub(crate) ignored_discovered: u64,
    /// Connections from a node already connected from a place advertising
    /// other addresses: most likely two nodes sharing one key file (each is
    /// also logged at warn, once per node per 10 minutes).
    pub(crate) suspected_twins: u64,
    /// Dials of a full pool to a peer it lost, to give it its youngest
    /// link's slot (rejoining the halves of a saturated mesh).
    pub(crate) swaps: u64,
    /// Outbound links closed to give their slot back to an inbound dialler
    /// (the pool was full only because its own dials took slots of the
    /// inbound share).
    pub(crate) reclaims: u64,
    /// Inbound links closed to hand their slot to a dialler with no peer,
    /// each closed peer having said it had peers to spare (what lets a node
    /// new to a mesh of full pools in).
    pub(crate) handovers: u64,
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
    /// `"disconnected"` or `"banned"` from the peer manager, or `"routed"`:
    /// not linked, but reached through `via` (the routing table).
    pub(crate) state: &'static str,
    /// For a routed peer, the neighbour messages for it go to, hex; else
    /// null.
    pub(crate) via: Option<String>,
    /// For a routed peer, its distance in hops as far as we know; else null.
    pub(crate) hops: Option<u32>,
    /// `"inbound"` or `"outbound"` while connected, else null.
    pub(crate) direction: Option<&'static str>,
    /// The other end of the current stream, null when not connected.
    pub(crate) addr: Option<String>,
    /// Where the peer says it listens.
    pub(crate) listen: Vec<String>,
    /// Latest round trip in ms (the handshake's, then each heartbeat's); null
    /// until one was timed (a plaintext dialler's link: its first pong).
    pub(crate) rtt_ms: Option<f64>,
    /// Smoothed round trip in ms, null as `rtt_ms` is.
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
    /// While connected, how many peers the peer says it has, null if it
    /// does not say (an older node) or when not connected.
    pub(crate) peer_linked: Option<u32>,
    /// While connected, how many it says it wants (its `min_peers`), null
    /// as `peer_linked` is.
    pub(crate) peer_min_peers: Option<u32>,
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
    /// Latest round-trip time in ms (the handshake's, then each
    /// heartbeat's); null until one was timed (a plaintext dialler's
    /// connection: its first pong).
    pub(crate) rtt_ms: Option<f64>,
    /// Smoothed round-trip time in ms, null as `rtt_ms` is.
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

/// [`ApiError::from_sync`], with a hint when a lease is held by a node
/// this one has no link to: most often this very node before a restart
/// without `--key` (a new id each start), whose old id keeps its leases
/// until they lapse.
fn kv_error(node: &Node, e: &SyncError) -> ApiError {
    let error = ApiError::from_sync(e);
    match e {
        SyncError::LeaseHeld { owner, .. }
            if !node.peers().connected().iter().any(|p| &p.node_id == owner) =>
        {
            error.with_field(
                "hint",
                "the owner is not connected to this node: if it was a node restarted \
                 without --key (a new id at each start), its lease lapses at until_ms",
            )
        }
        _ => error,
    }
}

/// One seed in `GET /status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct SeedJson {
    /// The address given with `--seed`.
    pub(crate) addr: String,
    /// The node that answered there last, hex (absent until one did).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) node_id: Option<String>,
    /// Whether that node is connected now.
    pub(crate) connected: bool,
    /// Dials of the address that failed in a row.
    pub(crate) failures: u32,
    /// Why the last failed dial failed (absent once one succeeds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) last_error: Option<String>,
    /// Milliseconds until the next dial, when one is due (not connected, no
    /// dial in flight).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) next_dial_ms: Option<u64>,
}

/// Converts a node snapshot, its security mode, its handshake counters
/// (`node.endpoint().stats()`), its pool limits, the rest of its concerns
/// layer and its leasing mode to the JSON form.
pub(crate) fn status_json(
    status: &NodeStatus,
    security: Security,
    limits: Limits,
    concerns: &ConcernsInfo,
    leasing: bool,
) -> StatusJson {
    let pool = &status.pool;
    let mut blocked: Vec<String> = status.blocked.iter().map(|id| id.to_string()).collect();
    blocked.sort_unstable();
    let mut builtin: BTreeMap<&'static str, BTreeMap<&'static str, u64>> = BTreeMap::new();
    for &(concern, counter, value) in &concerns.builtin {
        builtin.entry(concern).or_default().insert(counter, value);
    }
    let mut subscriptions = concerns.subscriptions.clone();
    subscriptions.sort();
    StatusJson {
        node_id: status.node_id.to_string(),
        network_id: status.network_id.clone(),
        security: security.name(),
        handshakes_ok: status.handshakes.handshakes_ok,
        handshake_failures: status.handshakes.failures.clone(),
        rejected_busy: status.handshakes.rejected_busy,
        evicted_handshakes: status.handshakes.evicted_handshakes,
        pending_handshakes: status.handshakes.pending_handshakes,
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
            ignored_discovered: pool.ignored_discovered,
            suspected_twins: pool.suspected_twins,
            swaps: pool.swaps,
            reclaims: pool.reclaims,
            handovers: pool.handovers,
            dropped_inbound: pool.dropped_inbound,
            min_peers: limits.min_peers,
            max_peers: limits.max_peers,
        },
        peers: peers_json(&status.peers, &status.routes),
        seeds: status
            .seeds
            .iter()
            .map(|s| SeedJson {
                addr: s.addr.to_string(),
                node_id: s.node_id.as_ref().map(|id| id.to_string()),
                connected: s.connected,
                failures: s.failures,
                last_error: s.last_error.clone(),
                next_dial_ms: s
                    .next_dial_in
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            })
            .collect(),
        blocked,
        connections: status.connections.iter().map(connection_json).collect(),
        concerns: status.concerns.iter().map(concern_json).collect(),
        routes: status.routes.iter().map(route_json).collect(),
        sync: sync_json(&status.sync, leasing),
        builtin,
        subscriptions,
        unknown_commands: concerns.unknown_commands,
        unsent_answers: concerns.unsent_answers,
        pending_requests: concerns.pending_requests,
        unsent_errors: concerns.unsent_errors,
        served: status.served.iter().map(served_json).collect(),
        calls: calls_json(&status.calls),
    }
}

fn concern_json(c: &ConcernStats) -> ConcernJson {
    ConcernJson {
        command: c.command,
        name: c.name.clone(),
        requests: c.requests,
        replies: c.replies,
        errors: c.errors,
        panics: c.panics,
        dropped: c.dropped,
        in_flight: c.in_flight,
        queued: c.queued,
        held_bytes: c.held_bytes,
    }
}

fn route_json(r: &Route) -> RouteJson {
    RouteJson {
        target: r.target.to_string(),
        next_hop: r.next_hop.to_string(),
        hops: r.hops,
        age_ms: ms(r.age),
    }
}

fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::Inbound => "inbound",
        Direction::Outbound => "outbound",
    }
}

/// The peer table, with the nodes reached through routes marked `routed`:
/// a known peer that is not linked takes that state, and a node the peer
/// manager never heard of is added at the end.
fn peers_json(peers: &[PeerSnapshot], routes: &[Route]) -> Vec<PeerJson> {
    let mut out: Vec<PeerJson> = peers.iter().map(peer_json).collect();
    for r in routes {
        let target = r.target.to_string();
        let via = Some(r.next_hop.to_string());
        match out.iter_mut().find(|p| p.node_id == target) {
            Some(p) if p.state == "connected" || p.state == "unresponsive" => {}
            Some(p) => {
                p.state = "routed";
                p.via = via;
                p.hops = Some(r.hops);
            }
            None => out.push(PeerJson {
                node_id: target,
                state: "routed",
                via,
                hops: Some(r.hops),
                direction: None,
                addr: None,
                listen: Vec::new(),
                rtt_ms: None,
                srtt_ms: None,
                errors: 0,
                timeouts: 0,
                score: 0.0,
                connected_secs: None,
                idle_ms: None,
                dial_failures: 0,
                peer_linked: None,
                peer_min_peers: None,
                metadata: BTreeMap::new(),
            }),
        }
    }
    out
}

fn peer_json(p: &PeerSnapshot) -> PeerJson {
    PeerJson {
        node_id: p.node_id.to_string(),
        state: p.state.as_str(),
        via: None,
        hops: None,
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
        peer_linked: p.peer_count.map(|c| c.linked),
        peer_min_peers: p.peer_count.map(|c| c.min_peers),
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

/// The query string of a request, parsed into `T`: a struct of the route's
/// parameters with `#[serde(deny_unknown_fields)]`, or [`NoQuery`] for a
/// route without any. Every handler takes one, so an unknown parameter (a
/// typo such as `?ttl=`) is a 400 `bad_request` on every route, before the
/// handler does anything.
struct ApiQuery<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(query) = Query::<T>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
        Ok(ApiQuery(query))
    }
}

/// The query of a route that takes no parameters: any is refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoQuery {}

async fn health(_: ApiQuery<NoQuery>) -> &'static str {
    "ok"
}

async fn status(State(state): State<AdminState>, _: ApiQuery<NoQuery>) -> Json<StatusJson> {
    let node = &state.node;
    let endpoint = node.endpoint();
    let concerns = ConcernsInfo {
        builtin: node.concerns().builtin_stats(),
        subscriptions: state.subscriptions.to_vec(),
        unknown_commands: node.concerns().unknown_commands(),
        unsent_answers: node.concerns().unsent_answers(),
        pending_requests: node.concerns().pending_requests(),
        unsent_errors: node.concerns().unsent_errors(),
    };
    Json(status_json(
        &node.status(),
        endpoint.config().security(),
        Limits::of(node),
        &concerns,
        node.sync().leasing(),
    ))
}

/// Parses the `{id}` of a `/peers/{id}/...` or `/request/{id}` path: 64
/// hex digits (a public key, as every authenticated node has), or any
/// other id this node knows of (a peer of an `--insecure` mesh may claim
/// an id of another length). A mistyped id is refused here rather than
/// blocked, unblocked or asked for in vain.
fn parse_peer(node: &Node, id: Result<Path<String>, PathRejection>) -> Result<NodeId, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    if id.len() != crate::node::NODE_ID_HEX_DIGITS {
        if let Ok(known) = NodeId::from_hex(&id.to_ascii_lowercase()) {
            if node.peers().by_id(&known).is_some() {
                return Ok(known);
            }
        }
    }
    parse_node_id(&id)
}

/// A node id given in full: 64 hex digits, either case (as `--allow` and
/// `--seed` take it).
fn parse_node_id(hex: &str) -> Result<NodeId, ApiError> {
    crate::node::parse_node_id(hex).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))
}

/// The largest request body the admin API reads (2 MiB; a value of the
/// replicated map is at most 1 MiB). Larger bodies answer 413 `too_large`.
pub(crate) const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// A request body, or the JSON error for one that could not be read (413
/// `too_large` over [`MAX_BODY_BYTES`], 408 `timeout` when it did not all
/// arrive within the server's body timeout, [`crate::http::Limits`]).
fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if timed_out(&e) {
            ApiError::new(StatusCode::REQUEST_TIMEOUT, e.body_text()).with_code("timeout")
        } else if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, e.body_text())
        }
    })
}

/// True if `e` is the body timeout of [`crate::http`] (an
/// [`std::io::ErrorKind::TimedOut`] somewhere in its sources).
fn timed_out(e: &BytesRejection) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// Refuses writes to the RPC registry (`rpc/services/...`): its entries are
/// written and refreshed by the nodes that serve the services, and one
/// overwritten or deleted by hand would hide a live service from the whole
/// mesh or list a dead one forever.
fn check_writable(key: &str) -> Result<(), ApiError> {
    if key.starts_with(meshwork::rpc::REGISTRY_PREFIX) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "keys under {:?} are the RPC registry, kept by the nodes serving each \
                 service; stop or serve the service instead (GET /rpc/{{service}}/providers \
                 lists them)",
                meshwork::rpc::REGISTRY_PREFIX
            ),
        )
        .with_code("reserved"));
    }
    Ok(())
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
    _: ApiQuery<NoQuery>,
) -> Result<Json<Disconnected>, ApiError> {
    let peer = parse_peer(&state.node, id)?;
    if &peer == state.node.node_id() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{peer} is this node's own id"),
        ));
    }
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
    _: ApiQuery<NoQuery>,
) -> Result<Json<Blocked>, ApiError> {
    let peer = parse_peer(&state.node, id)?;
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
    _: ApiQuery<NoQuery>,
) -> Result<Json<Unblocked>, ApiError> {
    let peer = parse_peer(&state.node, id)?;
    state.node.peers().unblock(&peer);
    info!(peer = %peer.short(), "peer unblocked through the admin API");
    Ok(Json(Unblocked {
        unblocked: peer.to_string(),
    }))
}

/// The body of `POST /broadcast` and `POST /publish/{topic}`.
#[derive(Debug, Serialize)]
struct MessageId {
    message_id: u64,
}

/// Floods the body to the echo concern of every other node.
async fn broadcast(
    State(state): State<AdminState>,
    _: ApiQuery<NoQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<MessageId>, ApiError> {
    let body = read_body(body)?;
    let message_id = echo::broadcast(&state.node, &body)
        .await
        .map_err(|e| ApiError::from_concerns(&e))?;
    Ok(Json(MessageId { message_id }))
}

/// Publishes the body on a topic.
async fn publish(
    State(state): State<AdminState>,
    topic: Result<Path<String>, PathRejection>,
    _: ApiQuery<NoQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<MessageId>, ApiError> {
    let Path(topic) = topic.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let body = read_body(body)?;
    let message_id = state
        .node
        .concerns()
        .publish(&topic, body)
        .map_err(|e| ApiError::from_concerns(&e))?;
    Ok(Json(MessageId { message_id }))
}

/// `POST /publish` and `POST /publish/`: the topic is empty.
async fn publish_without_topic() -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "a topic is 1 to 256 bytes: POST /publish/{topic}",
    )
}

/// The query of `POST /request/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestQuery {
    timeout_ms: Option<u64>,
}

/// The body of `POST /request/{id}`.
#[derive(Debug, Serialize)]
struct RequestReply {
    reply: String,
    elapsed_ms: f64,
}

/// Asks a node's echo concern to send the body back, by a route if it is
/// not a neighbour.
async fn request(
    State(state): State<AdminState>,
    id: Result<Path<String>, PathRejection>,
    ApiQuery(query): ApiQuery<RequestQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RequestReply>, ApiError> {
    let target = parse_peer(&state.node, id)?;
    let body = read_body(body)?;
    let timeout_ms = check_timeout_ms(query.timeout_ms)?;
    let _slot = state.wait_slot()?;
    let node = &state.node;
    if &target == node.node_id() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{target} is this node's own id"),
        ));
    }
    let started = Instant::now();
    let timeout = Duration::from_millis(timeout_ms);
    match echo::request(node, &target, &body, timeout).await {
        Ok(reply) => Ok(Json(RequestReply {
            reply: String::from_utf8_lossy(&reply).into_owned(),
            elapsed_ms: ms(started.elapsed()),
        })),
        // The library says "timeout" whether the route search or the answer
        // ran out of time; without a route there was nobody to answer.
        Err(ConcernsError::Timeout(_)) if !has_route(node, &target) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no route to {target} found within {timeout_ms} ms"),
        )
        .with_code("unreachable")),
        Err(e) => Err(ApiError::from_concerns(&e)),
    }
}

/// A `timeout_ms` query parameter: 1 to [`MAX_REQUEST_TIMEOUT_MS`], default
/// [`DEFAULT_REQUEST_TIMEOUT_MS`].
fn check_timeout_ms(timeout_ms: Option<u64>) -> Result<u64, ApiError> {
    let timeout_ms = timeout_ms.unwrap_or(DEFAULT_REQUEST_TIMEOUT_MS);
    if (1..=MAX_REQUEST_TIMEOUT_MS).contains(&timeout_ms) {
        Ok(timeout_ms)
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("timeout_ms must be 1 to {MAX_REQUEST_TIMEOUT_MS}, got {timeout_ms}"),
        ))
    }
}

/// True when `target` is a responsive neighbour or the routing table has a
/// route to it.
fn has_route(node: &Node, target: &NodeId) -> bool {
    let neighbour = node
        .peers()
        .by_id(target)
        .is_some_and(|p| p.state == meshwork::peers::PeerState::Connected);
    neighbour || node.concerns().routes().iter().any(|r| &r.target == target)
}

/// The query of `GET /events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    since: Option<u64>,
}

/// The body of `GET /events`.
#[derive(Debug, Serialize)]
struct EventsJson {
    events: Vec<Event>,
    /// The last sequence number handed out (0 before the first event):
    /// `?since=` this gets only newer events.
    next: u64,
}

/// The deliveries recorded after `since`.
async fn events(
    State(state): State<AdminState>,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Json<EventsJson>, ApiError> {
    let (events, next) = state.events.since(query.since.unwrap_or(0));
    Ok(Json(EventsJson { events, next }))
}

// The replicated map: /kv and /kv-digest.

/// Parses the `{key}` of a `/kv/{key}...` path (percent-decoded by axum);
/// an empty one (`/kv//release`) is refused.
fn parse_key(key: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(key) = key.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    if key.is_empty() {
        return Err(empty_key());
    }
    Ok(key)
}

/// The 400 of an empty key.
fn empty_key() -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "empty key: a key is 1 to 1024 bytes, /kv/{key}",
    )
}

/// Bytes as text: UTF-8, invalid bytes replaced.
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A lease in [`KvEntryJson`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct LeaseJson {
    /// The node holding it, hex.
    pub(crate) owner: String,
    /// When it lapses, in ms since the Unix epoch.
    pub(crate) until_ms: u64,
    /// Increases with each new claim of the key.
    pub(crate) epoch: u64,
}

/// `GET /kv/{key}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct KvEntryJson {
    /// The key.
    pub(crate) key: String,
    /// The value as UTF-8 (invalid bytes replaced).
    pub(crate) value: String,
    /// The version: the write's stamp, a fencing token.
    pub(crate) version: u64,
    /// The node that wrote it, hex.
    pub(crate) writer: String,
    /// The live lease; null when there is none (or leasing is off).
    pub(crate) lease: Option<LeaseJson>,
    /// For an ephemeral key, when it vanishes unless its owner refreshes it
    /// (ms since the Unix epoch); null otherwise.
    pub(crate) expires_at_ms: Option<u64>,
}

fn kv_entry_json(key: &str, e: &EntryInfo) -> KvEntryJson {
    KvEntryJson {
        key: key.to_owned(),
        value: text(&e.value),
        version: e.version.as_u64(),
        writer: e.writer.to_string(),
        lease: e.lease.as_ref().map(|l| LeaseJson {
            owner: l.owner.to_string(),
            until_ms: l.until_ms,
            epoch: l.epoch,
        }),
        expires_at_ms: e.expires_at_ms,
    }
}

/// The 404 of a key without a value.
fn no_value(key: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("key {key:?} holds no value"))
}

/// The key's value, version, writer, lease and expiry.
async fn kv_get(
    State(state): State<AdminState>,
    key: Result<Path<String>, PathRejection>,
    _: ApiQuery<NoQuery>,
) -> Result<Json<KvEntryJson>, ApiError> {
    let key = parse_key(key)?;
    match state.node.sync().entry(&key) {
        Some(e) => Ok(Json(kv_entry_json(&key, &e))),
        None => Err(no_value(&key)),
    }
}

/// The query of `PUT /kv/{key}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KvPutQuery {
    ttl_ms: Option<u64>,
    lease_ms: Option<u64>,
}

/// The body of `PUT /kv/{key}`.
#[derive(Debug, Serialize)]
struct KvVersion {
    version: u64,
}

/// Sets the key to the body (ephemeral with `ttl_ms`; leased for
/// `lease_ms` instead of `--lease-secs` with that).
async fn kv_put(
    State(state): State<AdminState>,
    key: Result<Path<String>, PathRejection>,
    ApiQuery(query): ApiQuery<KvPutQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<KvVersion>, ApiError> {
    let key = parse_key(key)?;
    check_writable(&key)?;
    let value = read_body(body)?;
    let sync = state.node.sync();
    let written = match (query.ttl_ms, query.lease_ms) {
        (Some(_), Some(_)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "ttl_ms and lease_ms together: an ephemeral key is leased for as long as it lives"
                    .to_owned(),
            ));
        }
        (None, None) => sync.set(&key, value).await,
        (None, Some(lease_ms)) if (1..=MAX_LEASE_MS).contains(&lease_ms) => {
            sync.set_leased(&key, value, Duration::from_millis(lease_ms))
                .await
        }
        (None, Some(lease_ms)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("lease_ms must be 1 to {MAX_LEASE_MS}, got {lease_ms}"),
            ));
        }
        (Some(ttl_ms), None) => match ttl_ms {
            ttl_ms if (1..=MAX_TTL_MS).contains(&ttl_ms) => {
                sync.set_ephemeral(&key, value, Duration::from_millis(ttl_ms))
                    .await
            }
            ttl_ms => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("ttl_ms must be 1 to {MAX_TTL_MS}, got {ttl_ms}"),
                ));
            }
        },
    };
    let version = written.map_err(|e| kv_error(&state.node, &e))?;
    Ok(Json(KvVersion {
        version: version.as_u64(),
    }))
}

/// The body of `DELETE /kv/{key}`.
#[derive(Debug, Serialize)]
struct KvDeleted {
    deleted: bool,
}

/// Deletes the key (a tombstone, under the lease rules).
async fn kv_delete(
    State(state): State<AdminState>,
    key: Result<Path<String>, PathRejection>,
    _: ApiQuery<NoQuery>,
) -> Result<Json<KvDeleted>, ApiError> {
    let key = parse_key(key)?;
    check_writable(&key)?;
    match state.node.sync().remove(&key).await {
        Ok(true) => Ok(Json(KvDeleted { deleted: true })),
        Ok(false) => Err(no_value(&key)),
        Err(e) => Err(kv_error(&state.node, &e)),
    }
}

/// The body of `POST /kv/{key}/release`.
#[derive(Debug, Serialize)]
struct KvReleased {
    released: bool,
    version: u64,
}

/// Gives up this node's lease on the key, keeping the value.
async fn kv_release(
    State(state): State<AdminState>,
    key: Result<Path<String>, PathRejection>,
    _: ApiQuery<NoQuery>,
) -> Result<Json<KvReleased>, ApiError> {
    let key = parse_key(key)?;
    check_writable(&key)?;
    match state.node.sync().release(&key).await {
        Ok(version) => Ok(Json(KvReleased {
            released: true,
            version: version.as_u64(),
        })),
        Err(SyncError::NotFound(_)) => Err(no_value(&key)),
        Err(e) => Err(kv_error(&state.node, &e)),
    }
}

/// The body of `POST /kv/{key}/confirm`.
#[derive(Debug, Serialize)]
struct KvConfirmed {
    peers: usize,
}

/// Waits until every connected peer has applied this node's entry for the
/// key.
async fn kv_confirm(
    State(state): State<AdminState>,
    key: Result<Path<String>, PathRejection>,
    ApiQuery(query): ApiQuery<RequestQuery>,
) -> Result<Json<KvConfirmed>, ApiError> {
    let key = parse_key(key)?;
    let timeout_ms = check_timeout_ms(query.timeout_ms)?;
    let _slot = state.wait_slot()?;
    match state
        .node
        .sync()
        .confirm(&key, Duration::from_millis(timeout_ms))
        .await
    {
        Ok(peers) => Ok(Json(KvConfirmed { peers })),
        Err(SyncError::NotFound(_)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("this node holds no entry for key {key:?}"),
        )),
        Err(e) => Err(ApiError::from_sync(&e)),
    }
}

/// The query of `GET /kv`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KvListQuery {
    prefix: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
    after_hex: Option<String>,
}

/// Keys in a page of `GET /kv` unless `limit` says otherwise.
const KV_PAGE: usize = 1000;
/// Most keys a page of `GET /kv` may ask for.
const KV_PAGE_MAX: usize = 10_000;
/// A page of `GET /kv` ends once its keys and values reach this many bytes (it holds
/// at least one key): 64 clients listing a 21 MB map at once took a node
/// from 121 MB to 613 MB, each answer built whole in memory.
const KV_PAGE_BYTES: usize = 1 << 20;

/// One item of `GET /kv`.
#[derive(Debug, Serialize)]
struct KvItem {
    key: String,
    value: String,
    version: u64,
    writer: String,
}

/// The body of `GET /kv`.
#[derive(Debug, Serialize)]
struct KvList {
    items: Vec<KvItem>,
    count: usize,
    /// When more keys follow: the last key of this page, to pass as
    /// `after` for the next (as text, invalid UTF-8 replaced).
    next: Option<String>,
    /// The same key in hex, to pass as `after_hex` (exact for any key).
    next_hex: Option<String>,
}

/// The keys starting with `prefix` (after `after`), sorted, with values and
/// versions: a page of at most `limit` keys and about a MiB of values.
async fn kv_list(
    State(state): State<AdminState>,
    ApiQuery(query): ApiQuery<KvListQuery>,
) -> Result<Json<KvList>, ApiError> {
    let limit = query.limit.unwrap_or(KV_PAGE);
    if !(1..=KV_PAGE_MAX).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("limit must be 1 to {KV_PAGE_MAX}, got {limit}"),
        ));
    }
    let prefix = query.prefix.unwrap_or_default();
    let after: Option<Vec<u8>> = match (query.after, query.after_hex) {
        (Some(_), Some(_)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "after and after_hex together: give one".to_owned(),
            ));
        }
        (Some(text), None) => Some(text.into_bytes()),
        (None, Some(h)) => Some(
            hex::decode(&h)
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("after_hex: {e}")))?,
        ),
        (None, None) => None,
    };
    let (page, more) =
        state
            .node
            .sync()
            .prefixed_entries_page(&prefix, after.as_deref(), limit, KV_PAGE_BYTES);
    let last = page.last().filter(|_| more).map(|(key, _)| key.clone());
    let items: Vec<KvItem> = page
        .into_iter()
        .map(|(key, e)| KvItem {
            key: text(&key),
            value: text(&e.value),
            version: e.version.as_u64(),
            writer: e.writer.to_string(),
        })
        .collect();
    Ok(Json(KvList {
        count: items.len(),
        items,
        next: last.as_ref().map(|k| text(k)),
        next_hex: last.as_ref().map(hex::encode),
    }))
}

/// `/kv/`: the key is empty.
async fn kv_without_key() -> ApiError {
    empty_key()
}

/// The body of `GET /kv-digest`.
#[derive(Debug, Serialize)]
struct KvDigest {
    digest: String,
    keys: usize,
    entries: usize,
}

/// A hash of the replica, to compare nodes.
async fn kv_digest(State(state): State<AdminState>, _: ApiQuery<NoQuery>) -> Json<KvDigest> {
    let stats = state.node.sync().stats();
    Json(KvDigest {
        digest: digest_hex(stats.digest),
        keys: stats.keys,
        entries: stats.entries,
    })
}

// Services: /rpc.

/// The query of `POST /rpc/{service}/{method}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RpcQuery {
    deadline_ms: Option<u64>,
    idempotent: Option<bool>,
    version: Option<u32>,
    /// Call this provider (a node id in hex) and no other.
    provider: Option<String>,
}

/// The body of `POST /rpc/{service}/{method}`.
#[derive(Debug, Serialize)]
struct RpcResult {
    result: serde_json::Value,
    elapsed_ms: f64,
}

/// Calls a method from this node, in JSON.
async fn rpc_call(
    State(state): State<AdminState>,
    path: Result<Path<(String, String)>, PathRejection>,
    ApiQuery(query): ApiQuery<RpcQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RpcResult>, ApiError> {
    let Path((service, method)) =
        path.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    call_method(&state, &service, &method, query, body).await
}

/// `POST /rpc/{service}/providers`: calls the method `providers`.
async fn rpc_call_providers(
    State(state): State<AdminState>,
    service: Result<Path<String>, PathRejection>,
    ApiQuery(query): ApiQuery<RpcQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RpcResult>, ApiError> {
    let Path(service) =
        service.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    call_method(&state, &service, "providers", query, body).await
}

/// The arguments of a call: the body, a JSON array (an empty body is
/// `[]`).
fn rpc_args(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    let body = read_body(body)?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Bytes::from_static(b"[]"));
    }
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Array(_)) => Ok(body),
        Ok(other) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the body must be a JSON array of the method's arguments (e.g. [\"hi\"]), \
                 got {other}"
            ),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body must be a JSON array of the method's arguments: {e}"),
        )),
    }
}

async fn call_method(
    state: &AdminState,
    service: &str,
    method: &str,
    query: RpcQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RpcResult>, ApiError> {
    let _slot = state.wait_slot()?;
    let deadline = match query.deadline_ms {
        None => state.rpc_deadline,
        Some(d) if (1..=MAX_REQUEST_TIMEOUT_MS).contains(&d) => Duration::from_millis(d),
        Some(d) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("deadline_ms must be 1 to {MAX_REQUEST_TIMEOUT_MS}, got {d}"),
            ));
        }
    };
    let provider = match &query.provider {
        Some(hex) => Some(parse_node_id(hex).map_err(|e| e.with_field("field", "provider"))?),
        None => None,
    };
    let args = rpc_args(body)?;
    let options = CallOptions {
        deadline,
        version: query.version.unwrap_or(0),
        idempotent: query.idempotent.unwrap_or(false),
        codec: Codec::Json,
    };
    let started = Instant::now();
    // If the HTTP client goes away, this future is dropped, and with it the
    // call: the provider is told to stop.
    let rpc = state.node.rpc();
    let outcome = match &provider {
        Some(provider) => {
            rpc.call_raw_on(provider, service, method, args, options)
                .await
        }
        None => rpc.call_raw(service, method, args, options).await,
    };
    let elapsed_ms = ms(started.elapsed());
    let bytes = outcome.map_err(|e| {
        let mut error = ApiError::from_rpc(&e);
        if let (RpcError::NoProvider(_), Some(provider)) = (&e, &provider) {
            // The error names the service only (the caller named the
            // node): say which node had none.
            error.message = format!(
                "no provider for service {service:?} on node {}",
                provider.short()
            );
        }
        error.with_field("elapsed_ms", elapsed_ms)
    })?;
    let result = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the provider's result is not JSON: {e}"),
        )
        .with_code("decode")
        .with_field("elapsed_ms", elapsed_ms)
    })?;
    Ok(Json(RpcResult { result, elapsed_ms }))
}

/// One provider in `GET /rpc/{service}/providers`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ProviderJson {
    /// The node serving it, hex.
    pub(crate) node_id: String,
    /// `"local"` (this node), `"neighbour"` or `"routed"`.
    pub(crate) reach: &'static str,
    /// The version served.
    pub(crate) version: u32,
    /// Its methods.
    pub(crate) methods: Vec<String>,
    /// Smoothed round trip of this node's calls to it, null before one
    /// succeeded.
    pub(crate) latency_ms: Option<f64>,
    /// This node's calls to it waiting for their answer now.
    pub(crate) in_flight: u32,
}

fn provider_json(p: &Provider) -> ProviderJson {
    ProviderJson {
        node_id: p.node_id.to_string(),
        reach: p.reach,
        version: p.record.version,
        methods: p.record.methods.clone(),
        latency_ms: p.latency.map(ms),
        in_flight: p.in_flight,
    }
}

/// The body of `GET /rpc/{service}/providers`.
#[derive(Debug, Serialize)]
struct ProvidersJson {
    service: String,
    providers: Vec<ProviderJson>,
}

/// The providers of a service in this node's registry, nearest first.
async fn rpc_providers(
    State(state): State<AdminState>,
    service: Result<Path<String>, PathRejection>,
    _: ApiQuery<NoQuery>,
) -> Result<Json<ProvidersJson>, ApiError> {
    let Path(service) =
        service.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    meshwork::rpc::check_service_name(&service)
        .map_err(|e| ApiError::from_rpc(&e.map_app(|n| match n {})))?;
    let providers = state.node.rpc().providers(&service);
    Ok(Json(ProvidersJson {
        service,
        providers: providers.iter().map(provider_json).collect(),
    }))
}

/// The body of `POST /shutdown`.
#[derive(Debug, Serialize)]
struct ShuttingDown {
    shutting_down: bool,
}

async fn shutdown(
    State(state): State<AdminState>,
    _: ApiQuery<NoQuery>,
) -> (StatusCode, Json<ShuttingDown>) {
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
    let path = uri.path();
    // `/kv/a/b` is not the key `a/b`: a `/` in a key is percent-encoded.
    let hint = match path.strip_prefix("/kv/") {
        Some(rest) if rest.contains('/') => format!(
            " (a key containing '/' is written percent-encoded: /kv/{})",
            rest.replace('/', "%2F")
        ),
        _ => String::new(),
    };
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {method} {path}{hint}"),
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
    use crate::demo_service::DemoService;
    use crate::echo::{Echo, TopicRecorder};
    use meshwork::NodeBuilder;
    use meshwork::peers::{PeerEvent, PeerState, PeersConfig, PoolStats, SeedSnapshot};
    use meshwork::transport::EndpointStats;
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
        request_with_body(addr, method, path, b"").await
    }

    /// [`request`] with a body.
    async fn request_with_body(
        addr: std::net::SocketAddr,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> (u16, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        stream.write_all(&req).await.unwrap();
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
        post_body(addr, path, "").await
    }

    /// POSTs `body` and parses the JSON answer.
    async fn post_body(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, Value) {
        let (code, body) = request_with_body(addr, "POST", path, body.as_bytes()).await;
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
        serve_with(AdminState::new(node.clone(), ShutdownSignal::new())).await
    }

    /// Serves `state` on a loopback port; its shutdown signal stops the server.
    async fn serve_with(state: AdminState) -> (std::net::SocketAddr, ShutdownSignal) {
        let shutdown = state.shutdown.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(state);
        let stop = shutdown.clone();
        tokio::spawn(crate::http::serve(
            listener,
            app,
            stop,
            crate::http::Limits::default(),
        ));
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
    // `..SyncStats::default()` stays right when the sync layer adds counters.
    #[allow(clippy::needless_update)]
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
                ignored_discovered: 4,
                suspected_twins: 6,
                swaps: 7,
                reclaims: 8,
                handovers: 9,
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
                    peer_count: Some(meshwork::wire::proto::PeerCount {
                        linked: 5,
                        min_peers: 4,
                    }),
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
                    peer_count: None,
                },
            ],
            seeds: vec![
                SeedSnapshot {
                    addr: "tcp://127.0.0.1:7001".parse().unwrap(),
                    node_id: Some(peer.clone()),
                    connected: true,
                    failures: 0,
                    last_error: None,
                    next_dial_in: None,
                },
                SeedSnapshot {
                    addr: "tcp://127.0.0.1:7009".parse().unwrap(),
                    node_id: None,
                    connected: false,
                    failures: 4,
                    last_error: Some("Connection refused (os error 111)".into()),
                    next_dial_in: Some(Duration::from_millis(2500)),
                },
            ],
            blocked: vec![known.clone(), peer.clone()],
            concerns: vec![ConcernStats {
                command: 0x100,
                name: "echo".into(),
                requests: 7,
                replies: 6,
                errors: 1,
                panics: 1,
                dropped: 2,
                in_flight: 3,
                queued: 4,
                held_bytes: 5,
            }],
            routes: vec![Route {
                target: known,
                next_hop: peer.clone(),
                hops: 2,
                age: Duration::from_micros(2500),
            }],
            sync: SyncStats {
                keys: 2,
                entries: 3,
                bytes: 600,
                max_bytes: 1024,
                digest: 0x00ab_cdef_0123_4567,
                writes: 4,
                applied: 5,
                stale: 6,
                refused: 7,
                refused_full: 1,
                pushes: 8,
                pushed_entries: 9,
                push_failures: 10,
                rounds: 11,
                rounds_equal: 12,
                round_failures: 13,
                rounds_cut: 17,
                pulled: 14,
                sent: 15,
                lease_lost: 16,
                lease_lapsed: 18,
                // Counters /status does not show.
                ..SyncStats::default()
            },
            served: vec![ServedStats {
                name: "demo".into(),
                version: 1,
                methods: vec!["echo".into(), "add".into()],
                calls: 17,
                errors: 18,
                overloaded: 19,
                cancelled: 20,
                in_flight: 21,
                relisted: 25,
            }],
            calls: CallStats {
                calls: 22,
                failures: 23,
                retries: 24,
            },
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
            handshakes: EndpointStats {
                failures: [("crypto", 2), ("not_allowed", 1)].into(),
                handshakes_ok: 5,
                handshakes_failed: 3,
                rejected_busy: 7,
                evicted_handshakes: 2,
                pending_handshakes: 3,
                open_connections: 1,
            },
        };
        let limits = Limits {
            min_peers: 4,
            max_peers: 16,
        };
        let concerns = ConcernsInfo {
            builtin: vec![
                ("flood", "sent", 1),
                ("flood", "relayed", 2),
                ("routing", "routes", 1),
                ("topics", "topics", 2),
            ],
            subscriptions: vec!["b".into(), "a".into()],
            unknown_commands: 9,
            unsent_answers: 4,
            unsent_errors: 5,
            pending_requests: 6,
        };
        let json = serde_json::to_value(status_json(
            &status,
            Security::Noise,
            limits,
            &concerns,
            true,
        ))
        .unwrap();
        // Apart: one json! of the whole status passes the macro recursion limit.
        let sync = json!({
            "leasing": true,
            "keys": 2,
            "entries": 3,
            "bytes": 600,
            "max_bytes": 1024,
            "digest": "00abcdef01234567",
            "writes": 4,
            "applied": 5,
            "stale": 6,
            "refused": 7,
            "refused_full": 1,
            "pushes": 8,
            "pushed_entries": 9,
            "push_failures": 10,
            "rounds": 11,
            "rounds_equal": 12,
            "round_failures": 13,
            "rounds_cut": 17,
            "pulled": 14,
            "sent": 15,
            "lease_lost": 16,
            "lease_lapsed": 18
        });
        assert_eq!(
            json,
            json!({
                "node_id": "abcd",
                "network_id": "net",
                "security": "noise",
                "handshakes_ok": 5,
                "handshake_failures": {"crypto": 2, "not_allowed": 1},
                "rejected_busy": 7,
                "evicted_handshakes": 2,
                "pending_handshakes": 3,
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
                    "ignored_discovered": 4,
                    "suspected_twins": 6,
                    "swaps": 7,
                    "reclaims": 8,
                    "handovers": 9,
                    "dropped_inbound": 3,
                    "min_peers": 4,
                    "max_peers": 16
                },
                "peers": [{
                    "node_id": "010203",
                    "state": "connected",
                    "via": null,
                    "hops": null,
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
                    "peer_linked": 5,
                    "peer_min_peers": 4,
                    "metadata": {"role": "leaf"}
                }, {
                    "node_id": "04",
                    "state": "routed",
                    "via": "010203",
                    "hops": 2,
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
                    "peer_linked": null,
                    "peer_min_peers": null,
                    "metadata": {}
                }],
                "seeds": [
                    {"addr": "tcp://127.0.0.1:7001", "node_id": "010203", "connected": true, "failures": 0},
                    {
                        "addr": "tcp://127.0.0.1:7009",
                        "connected": false,
                        "failures": 4,
                        "last_error": "Connection refused (os error 111)",
                        "next_dial_ms": 2500
                    }
                ],
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
                }],
                "concerns": [{
                    "command": 256,
                    "name": "echo",
                    "requests": 7,
                    "replies": 6,
                    "errors": 1,
                    "panics": 1,
                    "dropped": 2,
                    "in_flight": 3,
                    "queued": 4,
                    "held_bytes": 5
                }],
                "routes": [{"target": "04", "next_hop": "010203", "hops": 2, "age_ms": 2.5}],
                "sync": sync,
                "builtin": {
                    "flood": {"sent": 1, "relayed": 2},
                    "routing": {"routes": 1},
                    "topics": {"topics": 2}
                },
                "subscriptions": ["a", "b"],
                "unknown_commands": 9,
                "unsent_answers": 4,
                "unsent_errors": 5,
                "pending_requests": 6,
                "served": [{
                    "name": "demo",
                    "version": 1,
                    "methods": ["echo", "add"],
                    "calls": 17,
                    "errors": 18,
                    "overloaded": 19,
                    "cancelled": 20,
                    "in_flight": 21,
                    "relisted": 25
                }],
                "calls": {"calls": 22, "failures": 23, "retries": 24}
            })
        );
        let plain = status_json(
            &NodeStatus {
                handshakes: EndpointStats::default(),
                ..status
            },
            Security::InsecurePlaintext,
            limits,
            &ConcernsInfo::default(),
            false,
        );
        let json = serde_json::to_value(plain).unwrap();
        assert_eq!(json["security"], "plaintext");
        assert_eq!(json["sync"]["leasing"], false);
        assert_eq!(json["handshake_failures"], json!({}));
        assert_eq!(json["handshakes_ok"], 0);
    }

    #[tokio::test]
    async fn status_health_and_errors_over_http() {
        let (a, b) = two_nodes().await;
        let (addr, _shutdown) = serve(&a).await;

        assert_eq!(request(addr, "GET", "/health").await, (200, "ok".into()));

        // Wait until the connection has an RTT (the handshake's, with Noise).
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
        assert_eq!(
            status["metadata"],
            json!({"role": "a", "meshwork.sync.leasing": "on", "meshwork.sync.max_clock_skew_ms": "60000"}),
            "the Hello metadata, with the sync settings peers must share"
        );
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
        assert_eq!(
            p["metadata"],
            json!({"role": "b", "meshwork.sync.leasing": "on", "meshwork.sync.max_clock_skew_ms": "60000"})
        );

        // b dialled a, its seed; b keeps the default limits.
        let status = wait_status(addr_b, "a listed as connected", |s| connected(s, &a)).await;
        let p = peer_entry(&status, &a).unwrap();
        assert_eq!(p["direction"], "outbound");
        assert_eq!(p["addr"], "mem://a");
        assert_eq!(
            p["metadata"],
            json!({"role": "a", "meshwork.sync.leasing": "on", "meshwork.sync.max_clock_skew_ms": "60000"})
        );
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

        // A node id is 64 hex digits: a typo (one pair too many or too few)
        // is refused, by block as well, rather than acted on in vain.
        let (long, short) = ("ab".repeat(33), "ab".repeat(31));
        for bad in ["zz", "abc", "not-hex", &long, &short] {
            for action in ["disconnect", "block", "unblock"] {
                let (code, body) = post_json(addr, &format!("/peers/{bad}/{action}")).await;
                assert_eq!(code, 400, "{action} {bad}: {body}");
                assert!(
                    body["error"].as_str().unwrap().contains("node id"),
                    "{body}"
                );
            }
        }
        for action in ["disconnect", "block"] {
            let (code, body) = post_json(addr, &format!("/peers/{}/{action}", a.node_id())).await;
            assert_eq!(code, 400, "{action} of itself: {body}");
            assert!(body["error"].as_str().unwrap().contains("own id"), "{body}");
        }
        let upper = b.node_id().to_string().to_ascii_uppercase();
        let (code, body) = post_json(addr, &format!("/peers/{upper}/unblock")).await;
        assert_eq!(code, 200, "upper-case hex is the same id: {body}");
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

    /// Every route answers 400 `bad_request` to an unknown query parameter,
    /// before doing anything: nothing is blocked, written, sent or shut
    /// down. Add each new route here.
    #[tokio::test]
    async fn every_route_refuses_unknown_query_parameters() {
        let (a, b) = two_nodes().await;
        let (addr, shutdown) = serve(&a).await;
        let peer = b.node_id().to_string();
        let peer_path = |action: &str| format!("/peers/{peer}/{action}");
        let request_path = format!("/request/{peer}?timeout=100");
        let routes = [
            ("GET", "/health?x=1".to_string()),
            ("GET", "/status?verbose=1".to_string()),
            ("POST", peer_path("disconnect?x=1")),
            ("POST", peer_path("block?for_ms=100")),
            ("POST", peer_path("unblock?x=1")),
            ("POST", "/broadcast?ttl=1".to_string()),
            ("POST", "/publish/news?ttl=1".to_string()),
            ("POST", request_path),
            ("GET", "/events?sinc=1".to_string()),
            ("GET", "/kv?x=1".to_string()),
            ("PUT", "/kv/k?ttl=1000".to_string()),
            ("GET", "/kv/k?x=1".to_string()),
            ("DELETE", "/kv/k?x=1".to_string()),
            ("POST", "/kv/k/release?x=1".to_string()),
            ("POST", "/kv/k/confirm?timeout=1".to_string()),
            ("GET", "/kv-digest?x=1".to_string()),
            ("POST", "/rpc/demo/echo?deadline=1".to_string()),
            ("GET", "/rpc/demo/providers?x=1".to_string()),
            ("POST", "/rpc/demo/providers?x=1".to_string()),
            ("POST", "/shutdown?now=1".to_string()),
        ];
        for (method, path) in &routes {
            let (code, body) = request_with_body(addr, method, path, b"[]").await;
            let answer: Value =
                serde_json::from_str(&body).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
            assert_eq!(
                (code, &answer["code"]),
                (400, &json!("bad_request")),
                "{method} {path}: {answer}"
            );
            assert!(
                answer["error"].as_str().unwrap().contains("unknown field"),
                "{method} {path}: {answer}"
            );
        }
        // Nothing was done.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), shutdown.stopped())
                .await
                .is_err(),
            "POST /shutdown?now=1 must not shut down"
        );
        assert_eq!(request(addr, "GET", "/health").await, (200, "ok".into()));
        assert!(a.peers().blocked().is_empty());
        assert!(
            a.peers()
                .by_id(b.node_id())
                .is_some_and(|p| p.state == PeerState::Connected)
        );
        assert_eq!(get_json(addr, "/kv/k").await.0, 404, "nothing was written");
        assert_eq!(get_json(addr, "/events").await.1["next"], 0);
        b.shutdown().await;
        a.shutdown().await;
    }

    // Messaging: broadcast, publish, request, events. Every node runs the
    // echo concern of `meshwork node` unless said otherwise.

    /// A served node of the messaging tests, with its event log and topic
    /// subscriptions.
    struct Served {
        node: Node,
        addr: std::net::SocketAddr,
        _shutdown: ShutdownSignal,
        _topics: TopicRecorder,
    }

    /// A node `mem://{name}` on `net`, seeding `seed`, keeping `min` peers.
    fn mem_node(net: &MemNetwork, name: &str, seed: Option<&str>, min: usize) -> NodeBuilder {
        let builder = Node::builder("admin-test")
            .transport(net.transport(name))
            .listen(format!("mem://{name}").parse().unwrap())
            .min_peers(min)
            .peers(quick);
        match seed {
            Some(seed) => builder.seed(seed.parse().unwrap()),
            None => builder,
        }
    }

    /// Starts a node as `meshwork node` does (the echo concern if `echo`,
    /// subscribed to `topics`) and serves its admin API.
    async fn start_served(builder: NodeBuilder, echo: bool, topics: &[&str]) -> Served {
        let log = Arc::new(EventLog::new());
        let mut builder = builder;
        if echo {
            builder = builder.concern(Echo::new(log.clone()));
        }
        let node = builder.start().await.unwrap();
        let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        let recorder = TopicRecorder::start(&node, &topics, &log).unwrap();
        let state = AdminState::new(node.clone(), ShutdownSignal::new()).with_events(log, &topics);
        let (addr, shutdown) = serve_with(state).await;
        Served {
            node,
            addr,
            _shutdown: shutdown,
            _topics: recorder,
        }
    }

    /// Three nodes that are all neighbours: `b` and `c` seed `a`, and find
    /// each other. `b` subscribes to `news`, `c` to `other`.
    async fn triangle() -> [Served; 3] {
        let net = MemNetwork::new();
        let a = start_served(mem_node(&net, "a", None, 2), true, &[]).await;
        let b = start_served(mem_node(&net, "b", Some("mem://a"), 2), true, &["news"]).await;
        let c = start_served(mem_node(&net, "c", Some("mem://a"), 2), true, &["other"]).await;
        for n in [&a, &b, &c] {
            n.node.wait_for_peers(2, TIMEOUT).await.unwrap();
        }
        [a, b, c]
    }

    async fn stop_all(nodes: impl IntoIterator<Item = Served>) {
        for n in nodes {
            n.node.shutdown().await;
        }
    }

    /// Polls `/events` until `done` holds, and returns that answer.
    async fn wait_events(
        addr: std::net::SocketAddr,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let (code, events) = get_json(addr, "/events").await;
            assert_eq!(code, 200, "{events}");
            if done(&events) {
                return events;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} not within {TIMEOUT:?}: {events}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// The events of `kind` carrying `payload` in a `/events` answer.
    fn events_of<'a>(events: &'a Value, kind: &str, payload: &str) -> Vec<&'a Value> {
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == kind && e["payload"] == payload)
            .collect()
    }

    /// A built-in concern's counter in a `/status`.
    fn builtin(status: &Value, concern: &str, counter: &str) -> u64 {
        status["builtin"][concern][counter].as_u64().unwrap()
    }

    /// A broadcast reaches every other node's echo concern exactly once,
    /// although in a triangle each of them also gets a relayed copy.
    #[tokio::test]
    async fn broadcast_is_delivered_once_by_every_other_node() {
        let [a, b, c] = triangle().await;
        let (code, body) = post_body(a.addr, "/broadcast", "hello mesh").await;
        assert_eq!(code, 200, "{body}");
        assert!(body["message_id"].is_u64(), "{body}");
        assert_eq!(body.as_object().unwrap().len(), 1, "{body}");

        // Each of b and c gets a's copy and the other's relayed one, and
        // drops the second: once both have, the flood is over.
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let (_, sb) = get_json(b.addr, "/status").await;
            let (_, sc) = get_json(c.addr, "/status").await;
            if builtin(&sb, "flood", "duplicates") + builtin(&sc, "flood", "duplicates") == 2 {
                assert_eq!(builtin(&sb, "flood", "delivered"), 1, "{sb}");
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{sb} {sc}");
            tokio::time::sleep(POLL).await;
        }
        for n in [&b, &c] {
            let (code, events) = get_json(n.addr, "/events").await;
            assert_eq!(code, 200);
            let got = events_of(&events, "broadcast", "hello mesh");
            assert_eq!(got.len(), 1, "{events}");
            let e = got[0];
            assert_eq!(e["from"], a.node.node_id().to_string());
            assert_eq!(e["topic"], Value::Null);
            assert!(
                e["seq"].as_u64().unwrap() >= 1 && e["at_ms"].is_u64(),
                "{e}"
            );
        }
        // The sender does not deliver its own broadcast.
        let (_, events) = get_json(a.addr, "/events").await;
        assert_eq!(events, json!({"events": [], "next": 0}));
        let (_, status) = get_json(a.addr, "/status").await;
        assert_eq!(builtin(&status, "flood", "sent"), 1, "{status}");
        stop_all([a, b, c]).await;
    }

    /// A publication reaches the subscribers of its topic and nobody else.
    #[tokio::test]
    async fn publish_reaches_subscribers_only() {
        let [a, b, c] = triangle().await;
        let (code, body) = post_body(a.addr, "/publish/news", "extra").await;
        assert_eq!(code, 200, "{body}");
        assert!(body["message_id"].is_u64(), "{body}");

        let events = wait_events(b.addr, "the publication at b", |e| {
            !events_of(e, "publication", "extra").is_empty()
        })
        .await;
        let got = events_of(&events, "publication", "extra");
        assert_eq!(got.len(), 1, "{events}");
        assert_eq!(got[0]["topic"], "news");
        assert_eq!(got[0]["from"], a.node.node_id().to_string());

        // c handled the publication (its topics concern ran and is idle)
        // without recording anything: it subscribed to another topic.
        let status = wait_status(c.addr, "c done with the publication", |s| {
            s["concerns"].as_array().unwrap().iter().any(|k| {
                k["name"] == "topics"
                    && k["requests"].as_u64() >= Some(1)
                    && k["in_flight"] == 0
                    && k["queued"] == 0
            })
        })
        .await;
        assert_eq!(status["subscriptions"], json!(["other"]));
        let (_, events) = get_json(c.addr, "/events").await;
        assert_eq!(events["events"], json!([]), "{events}");

        // Topics: empty, too long, just long enough, percent-encoded.
        for path in ["/publish", "/publish/"] {
            let (code, body) = post_body(a.addr, path, "x").await;
            assert_eq!(code, 400, "{path}: {body}");
            assert_eq!(body["code"], "bad_request", "{body}");
        }
        let (code, body) = post_body(a.addr, &format!("/publish/{}", "t".repeat(257)), "x").await;
        assert_eq!(
            (code, &body["code"]),
            (400, &json!("bad_request")),
            "{body}"
        );
        let (code, body) = post_body(a.addr, &format!("/publish/{}", "t".repeat(256)), "x").await;
        assert_eq!(code, 200, "{body}");
        let (code, body) = post_body(a.addr, "/publish/a%20b", "x").await;
        assert_eq!(code, 200, "{body}");
        stop_all([a, b, c]).await;
    }

    /// A line a - b - c (a refuses c): a's request reaches c by a route
    /// through b; b has no echo concern.
    #[tokio::test]
    async fn request_is_routed_and_errors_have_codes() {
        let net = MemNetwork::new();
        let a = start_served(mem_node(&net, "a", None, 1), true, &[]).await;
        let b = start_served(mem_node(&net, "b", Some("mem://a"), 1), false, &[]).await;
        let c_identity = meshwork::transport::Identity::generate();
        let c_id = c_identity.node_id().clone();
        a.node.peers().block(&c_id);
        let c = mem_node(&net, "c", Some("mem://b"), 1).identity(c_identity);
        let c = start_served(c, true, &[]).await;
        b.node.wait_for_peers(2, TIMEOUT).await.unwrap();
        assert!(
            a.node
                .peers()
                .by_id(&c_id)
                .is_none_or(|p| !p.state.is_linked())
        );

        let path = format!("/request/{c_id}");
        let (code, body) = post_body(a.addr, &path, "ping").await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["reply"], "ping");
        assert!(body["elapsed_ms"].as_f64().unwrap() > 0.0, "{body}");
        assert_eq!(body.as_object().unwrap().len(), 2, "{body}");
        let (_, events) = get_json(c.addr, "/events").await;
        let got = events_of(&events, "request", "ping");
        assert_eq!(got.len(), 1, "{events}");
        assert_eq!(got[0]["from"], a.node.node_id().to_string());
        let (_, status) = get_json(a.addr, "/status").await;
        let routes = status["routes"].as_array().unwrap();
        let route = routes.iter().find(|r| r["target"] == c_id.to_string());
        let route = route.unwrap_or_else(|| panic!("no route to c: {status}"));
        assert_eq!(route["next_hop"], b.node.node_id().to_string());
        assert_eq!(route["hops"], 2);
        assert!(route["age_ms"].as_f64().unwrap() >= 0.0);
        // The peer table shows the same node as routed, through b.
        let peers = status["peers"].as_array().unwrap();
        let routed = peers.iter().find(|p| p["node_id"] == c_id.to_string());
        let routed = routed.unwrap_or_else(|| panic!("c not in the peer table: {status}"));
        assert_eq!(routed["state"], "routed", "{routed}");
        assert_eq!(routed["via"], b.node.node_id().to_string());
        assert_eq!(routed["hops"], 2);
        let (_, status) = get_json(c.addr, "/status").await;
        let echo = status["concerns"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["name"] == "echo")
            .cloned();
        let echo = echo.unwrap_or_else(|| panic!("{status}"));
        assert_eq!(
            (&echo["command"], &echo["requests"], &echo["replies"]),
            (&json!(256), &json!(1), &json!(1))
        );

        // b has no echo concern: its error comes back as "remote".
        let path = format!("/request/{}?timeout_ms=2000", b.node.node_id());
        let (code, body) = post_body(a.addr, &path, "ping").await;
        assert_eq!(code, 502, "{body}");
        assert_eq!(body["code"], "remote");
        assert_eq!(body["remote_code"], "unknown_command");
        let (_, status) = get_json(b.addr, "/status").await;
        assert_eq!(status["unknown_commands"], 1, "{status}");

        // Nobody has this id.
        let stranger = "ab".repeat(32);
        let (code, body) =
            post_body(a.addr, &format!("/request/{stranger}?timeout_ms=200"), "x").await;
        assert_eq!(code, 404, "{body}");
        assert_eq!(body["code"], "unreachable", "{body}");

        for (path, what) in [
            ("/request/zz".to_string(), "node id"),
            (format!("/request/{}", a.node.node_id()), "own id"),
            (format!("/request/{c_id}?timeout_ms=0"), "timeout_ms"),
            (format!("/request/{c_id}?timeout_ms=600001"), "timeout_ms"),
            (format!("/request/{c_id}?timeout_ms=soon"), "timeout_ms"),
        ] {
            let (code, body) = post_body(a.addr, &path, "x").await;
            assert_eq!(code, 400, "{path}: {body}");
            assert_eq!(body["code"], "bad_request", "{path}: {body}");
            assert!(
                body["error"].as_str().unwrap().contains(what),
                "{path}: {body}"
            );
        }
        stop_all([c, b, a]).await;
    }

    /// `/events?since=` pages through the log; a bad `since` is a 400.
    #[tokio::test]
    async fn events_since_returns_only_newer_events() {
        let net = MemNetwork::new();
        let a = start_served(mem_node(&net, "a", None, 1), true, &[]).await;
        let b = start_served(mem_node(&net, "b", Some("mem://a"), 1), true, &[]).await;
        a.node.wait_for_peers(1, TIMEOUT).await.unwrap();
        let path = format!("/request/{}", b.node.node_id());
        for body in ["one", "two", "three"] {
            let (code, answer) = post_body(a.addr, &path, body).await;
            assert_eq!((code, &answer["reply"]), (200, &json!(body)), "{answer}");
        }
        let (_, all) = get_json(b.addr, "/events").await;
        assert_eq!(all["next"], 3, "{all}");
        let payloads = |v: &Value| -> Vec<String> {
            v["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["payload"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(payloads(&all), ["one", "two", "three"]);
        let seqs: Vec<u64> = all["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
        let (code, newer) = get_json(b.addr, "/events?since=1").await;
        assert_eq!(code, 200);
        assert_eq!(
            (payloads(&newer), &newer["next"]),
            (vec!["two".to_string(), "three".to_string()], &json!(3))
        );
        let (_, none) = get_json(b.addr, "/events?since=3").await;
        assert_eq!(none, json!({"events": [], "next": 3}));
        let (code, body) = get_json(b.addr, "/events?since=-1").await;
        assert_eq!(
            (code, &body["code"]),
            (400, &json!("bad_request")),
            "{body}"
        );
        stop_all([b, a]).await;
    }

    // The replicated map: /kv, /kv-digest, and `sync` in /status.

    /// `method` `path` with `body`; the answer parsed as JSON.
    async fn send_json(
        addr: std::net::SocketAddr,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> (u16, Value) {
        let (code, text) = request_with_body(addr, method, path, body).await;
        let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        (code, json)
    }

    /// Polls `GET path` on `addr` until `done` holds for (status, body).
    async fn wait_get(
        addr: std::net::SocketAddr,
        path: &str,
        what: &str,
        done: impl Fn(u16, &Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let (code, body) = get_json(addr, path).await;
            if done(code, &body) {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} not within {TIMEOUT:?}: {code} {body}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// A 409 `lease_held` naming `owner`, lapsing in the future.
    fn assert_lease_held(code: u16, body: &Value, owner: &Node) {
        assert_eq!(code, 409, "{body}");
        assert_eq!(body["code"], "lease_held", "{body}");
        assert_eq!(body["owner"], owner.node_id().to_string(), "{body}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(body["until_ms"].as_u64().unwrap() > now, "{body}");
        assert!(body["error"].as_str().unwrap().contains("leased"), "{body}");
        assert_eq!(body["hint"], Value::Null, "the owner is connected: {body}");
    }

    /// A key written on `a` reaches `b`, which may not overwrite, delete or
    /// release it until `a` releases it; then `b` owns it.
    #[tokio::test]
    async fn kv_writes_are_leased_until_released() {
        let (a, b) = two_nodes().await;
        let (addr_a, _stop_a) = serve(&a).await;
        let (addr_b, _stop_b) = serve(&b).await;

        let (code, body) = send_json(addr_a, "PUT", "/kv/greeting", b"hello").await;
        assert_eq!(code, 200, "{body}");
        let v1 = body["version"].as_u64().unwrap();
        assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
        let (code, entry) = get_json(addr_a, "/kv/greeting").await;
        assert_eq!(code, 200, "{entry}");
        let a_id = a.node_id().to_string();
        assert_eq!(entry["key"], "greeting");
        assert_eq!(entry["value"], "hello");
        assert_eq!(entry["version"], v1);
        assert_eq!(entry["writer"], a_id.as_str());
        assert_eq!(entry["lease"]["owner"], a_id.as_str());
        assert_eq!(entry["lease"]["epoch"], 1);
        assert!(
            entry["lease"]["until_ms"].as_u64().unwrap() > v1 >> 16,
            "{entry}"
        );
        assert_eq!(entry["expires_at_ms"], Value::Null);

        // Every connected peer (b) has applied it once confirm answers.
        let (code, body) =
            send_json(addr_a, "POST", "/kv/greeting/confirm?timeout_ms=5000", b"").await;
        assert_eq!((code, body), (200, json!({"peers": 1})));
        let (code, on_b) = get_json(addr_b, "/kv/greeting").await;
        assert_eq!((code, &on_b), (200, &entry));

        // b may not overwrite, delete or release it.
        let (code, body) = send_json(addr_b, "PUT", "/kv/greeting", b"mine").await;
        assert_lease_held(code, &body, &a);
        let (code, body) = send_json(addr_b, "DELETE", "/kv/greeting", b"").await;
        assert_lease_held(code, &body, &a);
        let (code, body) = send_json(addr_b, "POST", "/kv/greeting/release", b"").await;
        assert_lease_held(code, &body, &a);
        assert_eq!(get_json(addr_b, "/kv/greeting").await.1["value"], "hello");

        // a releases (keeping the value); once b sees it, b takes over.
        let (code, body) = send_json(addr_a, "POST", "/kv/greeting/release", b"").await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["released"], true);
        assert!(body["version"].as_u64().unwrap() > v1, "{body}");
        wait_get(addr_b, "/kv/greeting", "the release at b", |code, e| {
            code == 200 && e["lease"].is_null() && e["value"] == "hello"
        })
        .await;
        let (code, body) = send_json(addr_b, "PUT", "/kv/greeting", b"mine").await;
        assert_eq!(code, 200, "{body}");
        let v2 = body["version"].as_u64().unwrap();
        assert!(v2 > v1);
        let b_id = b.node_id().to_string();
        let entry = wait_get(addr_a, "/kv/greeting", "b's write at a", |code, e| {
            code == 200 && e["value"] == "mine"
        })
        .await;
        assert_eq!(entry["writer"], b_id.as_str());
        assert_eq!(entry["lease"]["owner"], b_id.as_str());
        assert_eq!(entry["lease"]["epoch"], 2, "a new claim: {entry}");
        let (code, body) = send_json(addr_a, "PUT", "/kv/greeting", b"back").await;
        assert_lease_held(code, &body, &b);

        // b deletes it: gone everywhere; deleting again is a 404.
        let (code, body) = send_json(addr_b, "DELETE", "/kv/greeting", b"").await;
        assert_eq!((code, body), (200, json!({"deleted": true})));
        wait_get(addr_a, "/kv/greeting", "the delete at a", |code, _| {
            code == 404
        })
        .await;
        for (method, path) in [
            ("GET", "/kv/greeting"),
            ("DELETE", "/kv/greeting"),
            ("POST", "/kv/greeting/release"),
            ("GET", "/kv/never-written"),
            ("POST", "/kv/never-written/confirm"),
        ] {
            let (code, body) = send_json(addr_b, method, path, b"").await;
            assert_eq!(code, 404, "{method} {path}: {body}");
            assert_eq!(body["code"], "not_found", "{method} {path}: {body}");
        }

        // A key whose owner is gone (a node restarted without --key comes
        // back as another id): the 409 says what may be going on.
        let (code, body) = send_json(addr_b, "PUT", "/kv/kept", b"b's").await;
        assert_eq!(code, 200, "{body}");
        wait_get(addr_a, "/kv/kept", "b's key at a", |code, _| code == 200).await;
        b.shutdown().await;
        wait_get(addr_a, "/status", "b gone from a", |_, s| {
            s["pool"]["connected"] == 0
        })
        .await;
        let (code, body) = send_json(addr_a, "PUT", "/kv/kept", b"a's").await;
        assert_eq!((code, &body["code"]), (409, &json!("lease_held")), "{body}");
        assert!(
            body["hint"]
                .as_str()
                .unwrap()
                .contains("restarted without --key"),
            "{body}"
        );
        a.shutdown().await;
    }

    /// A body declared longer than the limit is refused at once, before any
    /// of it is read: the connection used to wait for the body (up to the
    /// 30 s body timeout for a client that sends less).
    #[tokio::test]
    async fn a_body_declared_too_long_is_refused_at_once() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, _b) = two_nodes().await;
        let (addr, _stop) = serve(&a).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "PUT /kv/x HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\nabc",
            MAX_BODY_BYTES + 1
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut answer))
            .await
            .expect("an answer before the body")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("too_large"), "{answer}");
    }

    /// `PUT /kv/{key}?lease_ms=N`: the key is leased for that long, not
    /// `--lease-secs` (an hour), and the other node may take it after.
    #[tokio::test]
    async fn kv_put_with_a_lease_of_its_own() {
        let (a, b) = two_nodes().await;
        let (addr_a, _stop_a) = serve(&a).await;
        let (addr_b, _stop_b) = serve(&b).await;
        let (code, body) = send_json(addr_a, "PUT", "/kv/job?lease_ms=300", b"a").await;
        assert_eq!(code, 200, "{body}");
        let (code, e) = get_json(addr_a, "/kv/job").await;
        assert_eq!(code, 200, "{e}");
        let version_ms = e["version"].as_u64().unwrap() >> 16;
        assert_eq!(
            e["lease"]["until_ms"].as_u64(),
            Some(version_ms + 300),
            "{e}"
        );
        assert_eq!(e["expires_at_ms"], serde_json::Value::Null, "{e}");
        wait_get(addr_b, "/kv/job", "the key at b", |code, _| code == 200).await;
        // Refused while the lease lasts, taken once it has lapsed (by the
        // wall clock, which the leases run on).
        let until = version_ms + 300;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (code, body) = send_json(addr_b, "PUT", "/kv/job", b"b").await;
            let now = b.sync().now_ms();
            if code == 200 {
                assert!(now >= until, "taken at {now}, leased until {until}");
                break;
            }
            assert_eq!(body["code"], "lease_held", "{body}");
            assert!(
                std::time::Instant::now() < deadline,
                "still held at {now}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Ephemeral keys, listing by prefix, the digest, `sync` in /status,
    /// and bad input.
    #[tokio::test]
    async fn kv_lists_digests_and_refuses_bad_input() {
        let (a, b) = two_nodes().await;
        let (addr_a, _stop_a) = serve(&a).await;
        let (addr_b, _stop_b) = serve(&b).await;

        for (path, value) in [
            ("/kv/app%2Fb", "2"),
            ("/kv/app%2Fa", "1"),
            ("/kv/other", "x"),
            ("/kv/app%2Fc?ttl_ms=60000", "3"),
        ] {
            let (code, body) = send_json(addr_a, "PUT", path, value.as_bytes()).await;
            assert_eq!(code, 200, "{path}: {body}");
        }
        let (code, e) = get_json(addr_a, "/kv/app%2Fc").await;
        assert_eq!(code, 200, "{e}");
        assert_eq!(e["key"], "app/c");
        let expires = e["expires_at_ms"].as_u64().unwrap();
        let version_ms = e["version"].as_u64().unwrap() >> 16;
        assert!(
            (version_ms + 59_000..=version_ms + 61_000).contains(&expires),
            "{e}"
        );
        // Non-UTF-8 values are shown with replacement characters.
        let (code, _) = send_json(addr_a, "PUT", "/kv/bin", &[0x66, 0xff, 0x6f]).await;
        assert_eq!(code, 200);
        assert_eq!(get_json(addr_a, "/kv/bin").await.1["value"], "f\u{fffd}o");

        let list = wait_get(addr_b, "/kv?prefix=app%2F", "the keys at b", |code, l| {
            code == 200 && l["count"] == 3
        })
        .await;
        let keys: Vec<&str> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, ["app/a", "app/b", "app/c"]);
        let first = &list["items"][0];
        assert_eq!(first["value"], "1");
        assert_eq!(first["writer"], a.node_id().to_string());
        assert!(first["version"].is_u64());
        assert_eq!(first.as_object().unwrap().len(), 4, "{first}");
        let (_, all) = get_json(addr_b, "/kv").await;
        assert_eq!(all["count"], 5, "{all}");
        // Pages: `next` names the last key while more follow.
        let keys = |l: &serde_json::Value| -> Vec<String> {
            let items = l["items"].as_array().unwrap();
            items
                .iter()
                .map(|i| i["key"].as_str().unwrap().to_owned())
                .collect()
        };
        let (_, p1) = get_json(addr_b, "/kv?limit=2").await;
        assert_eq!(
            (keys(&p1), &p1["next"]),
            (vec!["app/a".into(), "app/b".into()], &json!("app/b"))
        );
        let (_, p2) = get_json(addr_b, "/kv?limit=2&after=app%2Fb").await;
        assert_eq!(
            (keys(&p2), &p2["next"]),
            (vec!["app/c".into(), "bin".into()], &json!("bin"))
        );
        assert_eq!(p2["next_hex"], "62696e");
        let (_, p3) = get_json(addr_b, "/kv?limit=2&after_hex=62696e").await;
        assert_eq!(
            (keys(&p3), &p3["next"]),
            (vec!["other".into()], &json!(null))
        );
        let (_, p) = get_json(addr_b, "/kv?prefix=app%2F&after=app%2Fa").await;
        assert_eq!(keys(&p), vec!["app/b".to_owned(), "app/c".into()]);
        let (_, none) = get_json(addr_b, "/kv?prefix=zzz").await;
        assert_eq!(
            none,
            json!({"items": [], "count": 0, "next": null, "next_hex": null})
        );

        // Both replicas the same: the same digest, in /kv-digest and /status.
        let digest = wait_get(addr_b, "/kv-digest", "b's replica to match a's", |_, d| {
            d["keys"] == 5
        })
        .await;
        let (_, on_a) = get_json(addr_a, "/kv-digest").await;
        assert_eq!(digest, on_a);
        let hex = digest["digest"].as_str().unwrap();
        assert!(
            hex.len() == 16 && hex.chars().all(|c| c.is_ascii_hexdigit()),
            "{digest}"
        );
        assert_eq!(digest["entries"], 5);
        let (_, status) = get_json(addr_a, "/status").await;
        let sync = &status["sync"];
        assert_eq!(sync["digest"], hex);
        assert_eq!(sync["leasing"], true);
        assert_eq!((&sync["keys"], &sync["writes"]), (&json!(5), &json!(5)));
        assert!(sync["pushes"].as_u64().unwrap() >= 1, "{sync}");
        assert_eq!(sync.as_object().unwrap().len(), 22, "{sync}");
        let (_, status) = get_json(addr_b, "/status").await;
        assert_eq!(status["sync"]["applied"], 5, "{status}");

        // Bad input.
        let long_key = format!("/kv/{}", "k".repeat(1025));
        let too_long_value = vec![b'v'; (1 << 20) + 1];
        let over_body_limit = vec![b'v'; MAX_BODY_BYTES + 1];
        for (method, path, body, code, kind) in [
            ("PUT", "/kv/x?ttl_ms=0", &b"v"[..], 400, "bad_request"),
            ("PUT", "/kv/x?ttl_ms=86400001", b"v", 400, "bad_request"),
            ("PUT", "/kv/x?ttl_ms=soon", b"v", 400, "bad_request"),
            ("PUT", "/kv/x?lease_ms=0", b"v", 400, "bad_request"),
            (
                "PUT",
                "/kv/x?lease_ms=31536000001",
                b"v",
                400,
                "bad_request",
            ),
            (
                "PUT",
                "/kv/x?ttl_ms=5000&lease_ms=5000",
                b"v",
                400,
                "bad_request",
            ),
            ("PUT", "/kv/x?ttl=5", b"v", 400, "bad_request"),
            ("GET", "/kv?prefx=a", b"", 400, "bad_request"),
            ("GET", "/kv?limit=0", b"", 400, "bad_request"),
            ("GET", "/kv?limit=10001", b"", 400, "bad_request"),
            ("GET", "/kv?after=a&after_hex=61", b"", 400, "bad_request"),
            ("GET", "/kv?after_hex=zz", b"", 400, "bad_request"),
            ("PUT", "/kv/a/b", b"v", 404, "not_found"),
            ("PUT", long_key.as_str(), b"v", 400, "too_large"),
            ("PUT", "/kv/x", &too_long_value, 400, "too_large"),
            ("PUT", "/kv/x", &over_body_limit, 413, "too_large"),
            ("POST", "/broadcast", &over_body_limit, 413, "too_large"),
            (
                "PUT",
                "/kv/rpc%2Fservices%2Fdemo%2Fab",
                b"v",
                403,
                "reserved",
            ),
            (
                "DELETE",
                "/kv/rpc%2Fservices%2Fdemo%2Fab",
                b"",
                403,
                "reserved",
            ),
            (
                "POST",
                "/kv/rpc%2Fservices%2Fdemo%2Fab/release",
                b"",
                403,
                "reserved",
            ),
            ("PUT", "/kv/", b"v", 400, "bad_request"),
            ("GET", "/kv/", b"", 400, "bad_request"),
            ("DELETE", "/kv/", b"", 400, "bad_request"),
            ("POST", "/kv//release", b"", 400, "bad_request"),
            ("POST", "/kv//confirm", b"", 400, "bad_request"),
            ("GET", "/kv/%FF", b"", 400, "bad_request"),
            (
                "POST",
                "/kv/other/confirm?timeout_ms=0",
                b"",
                400,
                "bad_request",
            ),
            ("POST", "/kv/other", b"", 405, "method_not_allowed"),
            ("PUT", "/kv-digest", b"", 405, "method_not_allowed"),
        ] {
            let (got, answer) = send_json(addr_a, method, path, body).await;
            assert_eq!(
                (got, &answer["code"]),
                (code, &json!(kind)),
                "{method} {}: {answer}",
                &path[..path.len().min(40)]
            );
        }
        let (_, answer) = send_json(addr_a, "PUT", "/kv/a/b", b"v").await;
        assert!(
            answer["error"].as_str().unwrap().contains("/kv/a%2Fb"),
            "{answer}"
        );
        let (_, answer) = get_json(addr_a, "/kv/").await;
        assert!(
            answer["error"].as_str().unwrap().starts_with("empty key"),
            "{answer}"
        );
        let (_, answer) = send_json(addr_a, "PUT", "/kv/x?ttl=5", b"v").await;
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains("unknown field `ttl`"),
            "{answer}"
        );
        assert_eq!(
            get_json(addr_a, "/kv/x").await.0,
            404,
            "nothing was written"
        );
        b.shutdown().await;
        a.shutdown().await;
    }

    /// With leasing off, any node overwrites any key (last writer wins),
    /// and /status says so.
    #[tokio::test]
    async fn without_leasing_the_last_writer_wins() {
        let net = MemNetwork::new();
        let no_leasing = || meshwork::sync::SyncConfig::default().with_leasing(false);
        let a = mem_node(&net, "a", None, 1)
            .sync_config(no_leasing())
            .start()
            .await
            .unwrap();
        let b = mem_node(&net, "b", Some("mem://a"), 1)
            .sync_config(no_leasing())
            .start()
            .await
            .unwrap();
        a.wait_for_peers(1, TIMEOUT).await.unwrap();
        let (addr_a, _stop_a) = serve(&a).await;
        let (addr_b, _stop_b) = serve(&b).await;
        let (code, _) = send_json(addr_a, "PUT", "/kv/k", b"a").await;
        assert_eq!(code, 200);
        let (code, _) = send_json(addr_a, "POST", "/kv/k/confirm", b"").await;
        assert_eq!(code, 200);
        let (code, body) = send_json(addr_b, "PUT", "/kv/k", b"b").await;
        assert_eq!(code, 200, "{body}");
        let e = wait_get(addr_a, "/kv/k", "b's write at a", |_, e| e["value"] == "b").await;
        assert_eq!(e["lease"], Value::Null);
        assert_eq!(e["writer"], b.node_id().to_string());
        let (_, status) = get_json(addr_a, "/status").await;
        assert_eq!(status["sync"]["leasing"], false);
        b.shutdown().await;
        a.shutdown().await;
    }

    #[test]
    fn sync_errors_map_to_status_codes() {
        let owner = NodeId::from_bytes(vec![0xab; 4]).unwrap();
        let held = SyncError::LeaseHeld {
            key: "k".into(),
            owner: owner.clone(),
            until_ms: 1234,
        };
        let e = ApiError::from_sync(&held);
        assert_eq!((e.status.as_u16(), e.code), (409, "lease_held"));
        let body = serde_json::to_value(ErrorJson {
            error: &e.message,
            code: e.code,
            remote_code: None,
            extra: &e.extra,
        })
        .unwrap();
        assert_eq!(
            body,
            json!({"error": held.to_string(), "code": "lease_held", "owner": "abababab",
                   "until_ms": 1234})
        );
        let not_confirmed = SyncError::NotConfirmed {
            peers: 3,
            missing: vec![owner],
            after: Duration::from_secs(1),
        };
        let e = ApiError::from_sync(&not_confirmed);
        assert_eq!((e.status.as_u16(), e.code), (504, "timeout"));
        assert_eq!(e.extra["peers"], 3);
        assert_eq!(e.extra["missing"], json!(["abababab"]));
        let full = SyncError::Full {
            key: "k".into(),
            limit: 1 << 20,
        };
        let e = ApiError::from_sync(&full);
        assert_eq!((e.status.as_u16(), e.code), (507, "full"));
        assert_eq!(e.extra["max_bytes"], 1 << 20);
        for (e, status, code) in [
            (SyncError::NotFound("k".into()), 404, "not_found"),
            (SyncError::TooLarge("big".into()), 400, "too_large"),
            (SyncError::Shutdown, 503, "shutdown"),
            (SyncError::Lagged(3), 500, "internal"),
            (SyncError::Config("bad".into()), 500, "internal"),
            (
                SyncError::Concerns(ConcernsError::Timeout(Duration::from_secs(1))),
                504,
                "timeout",
            ),
        ] {
            let error = ApiError::from_sync(&e);
            assert_eq!((error.status.as_u16(), error.code), (status, code), "{e}");
            assert!(error.extra.is_empty(), "{e}");
        }
    }

    #[test]
    fn concerns_errors_map_to_status_codes() {
        let id = NodeId::from_bytes(vec![1; 4]).unwrap();
        let remote = ConcernsError::Remote {
            code: ErrorCode::Overloaded,
            message: "busy".into(),
        };
        for (e, status, code) in [
            (ConcernsError::Unreachable(id.clone()), 404, "unreachable"),
            (ConcernsError::RouteLost(id.clone()), 404, "unreachable"),
            (
                ConcernsError::Timeout(Duration::from_secs(1)),
                504,
                "timeout",
            ),
            (remote, 502, "remote"),
            (
                ConcernsError::NotConnected(id.clone()),
                503,
                "not_connected",
            ),
            (ConcernsError::Unresponsive(id), 503, "unresponsive"),
            (ConcernsError::Dropped("full".into()), 503, "dropped"),
            (ConcernsError::Shutdown, 503, "shutdown"),
            (ConcernsError::Decode("topic".into()), 400, "bad_request"),
            (
                ConcernsError::InvalidArgument("ttl".into()),
                400,
                "bad_request",
            ),
            (ConcernsError::NoNeighbours, 503, "no_neighbours"),
            (ConcernsError::NotInstalled("flood"), 500, "internal"),
        ] {
            let error = ApiError::from_concerns(&e);
            assert_eq!((error.status.as_u16(), error.code), (status, code), "{e}");
            assert_eq!(error.message, e.to_string());
            assert_eq!(error.remote_code.is_some(), code == "remote");
        }
        let e = ConcernsError::Remote {
            code: ErrorCode::Overloaded,
            message: "busy".into(),
        };
        assert_eq!(
            ApiError::from_concerns(&e).remote_code.as_deref(),
            Some("overloaded")
        );
        assert_eq!(
            remote_code_name(ErrorCode::UnknownCommand),
            "unknown_command"
        );
    }

    // Services: /rpc, and `served` and `calls` in /status.

    /// `a` and `b` as [`two_nodes`], `b` serving the demo service as
    /// `demo` (`b` runs at most `concurrency` calls of it at once), both
    /// served; returns once `a` lists `b` as its provider.
    async fn demo_pair(concurrency: usize) -> (Served, Served) {
        let net = MemNetwork::new();
        let rpc = meshwork::rpc::RpcConfig::default().with_concurrency(concurrency);
        let a = start_served(mem_node(&net, "a", None, 1), true, &[]).await;
        let b = mem_node(&net, "b", Some("mem://a"), 1).rpc_config(rpc);
        let b = start_served(b, true, &[]).await;
        a.node.wait_for_peers(1, TIMEOUT).await.unwrap();
        let service = DemoService::server(b.node.node_id().to_string());
        b.node.rpc().serve("demo", service).await.unwrap();
        wait_get(a.addr, "/rpc/demo/providers", "b listed at a", |code, p| {
            code == 200 && p["providers"].as_array().is_some_and(|l| !l.is_empty())
        })
        .await;
        (a, b)
    }

    /// Requests that wait on the mesh take at most `MAX_WAITING` of the
    /// server's connections: one more is a 503 `busy` at once, and
    /// `/health` and `/status` still answer at once (64 long calls held
    /// `/shutdown` for 7 s in a check with processes).
    #[tokio::test]
    async fn long_requests_leave_room_for_health_status_and_shutdown() {
        let (a, _b) = demo_pair(256).await;
        let long: Vec<_> = (0..MAX_WAITING)
            .map(|_| {
                let addr = a.addr;
                tokio::spawn(async move { post_body(addr, "/rpc/demo/sleep", "[2000]").await })
            })
            .collect();
        wait_status(a.addr, "every long call started", |s| {
            s["calls"]["calls"].as_u64() == Some(MAX_WAITING as u64)
        })
        .await;
        let started = tokio::time::Instant::now();
        let (code, body) = post_body(a.addr, "/rpc/demo/echo", r#"["x"]"#).await;
        assert_eq!((code, body["code"].as_str()), (503, Some("busy")), "{body}");
        let (code, _) = request(a.addr, "GET", "/health").await;
        assert_eq!(code, 200);
        let (code, _) = get_json(a.addr, "/status").await;
        assert_eq!(code, 200);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        for call in long {
            let (code, body) = call.await.unwrap();
            assert_eq!(code, 200, "{body}");
        }
        let (code, body) = post_body(a.addr, "/rpc/demo/echo", r#"["x"]"#).await;
        assert_eq!(code, 200, "{body}");
    }

    /// Results, typed errors and refusals of `POST /rpc`, the providers
    /// list, and the counters in /status.
    #[tokio::test]
    async fn rpc_calls_return_results_and_typed_errors() {
        let (a, b) = demo_pair(256).await;
        let b_id = b.node.node_id().to_string();

        let (code, body) = get_json(a.addr, "/rpc/demo/providers").await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            body,
            json!({"service": "demo", "providers": [{
                "node_id": b_id,
                "reach": "neighbour",
                "version": 1,
                "methods": ["echo", "add", "fail", "sleep", "whoami"],
                "latency_ms": null,
                "in_flight": 0
            }]})
        );
        let (_, on_b) = get_json(b.addr, "/rpc/demo/providers").await;
        assert_eq!(on_b["providers"][0]["reach"], "local", "{on_b}");
        let (code, none) = get_json(a.addr, "/rpc/nobody.here/providers").await;
        assert_eq!(
            (code, none),
            (200, json!({"service": "nobody.here", "providers": []}))
        );

        let (code, body) = post_body(a.addr, "/rpc/demo/echo", r#"["hi there"]"#).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["result"], "hi there");
        assert!(body["elapsed_ms"].as_f64().unwrap() > 0.0, "{body}");
        assert_eq!(body.as_object().unwrap().len(), 2, "{body}");
        // One counter, on b, whoever calls.
        for (addr, n, total) in [(a.addr, 2, 2), (a.addr, 3, 5), (b.addr, -1, 4)] {
            let (code, body) = post_body(addr, "/rpc/demo/add", &format!("[{n}]")).await;
            assert_eq!((code, &body["result"]), (200, &json!(total)), "{body}");
        }
        // No arguments: an empty body, or [].
        for args in ["", " [ ] "] {
            let (code, body) = post_body(a.addr, "/rpc/demo/whoami?idempotent=true", args).await;
            assert_eq!((code, &body["result"]), (200, &json!(b_id)), "{body}");
        }
        let (_, body) = get_json(a.addr, "/rpc/demo/providers").await;
        let latency = body["providers"][0]["latency_ms"].as_f64();
        assert!(latency.is_some_and(|l| l > 0.0), "{body}");
        // A call on its way counts in flight until its answer.
        let slow = tokio::spawn(post_body(a.addr, "/rpc/demo/sleep", "[300]"));
        wait_get(a.addr, "/rpc/demo/providers", "a call in flight", |_, p| {
            p["providers"][0]["in_flight"] == 1
        })
        .await;
        assert_eq!(slow.await.unwrap().0, 200);
        let (_, body) = get_json(a.addr, "/rpc/demo/providers").await;
        assert_eq!(body["providers"][0]["in_flight"], 0, "{body}");

        // The application error, typed, as JSON.
        let (code, body) = post_body(a.addr, "/rpc/demo/fail", r#"["boom"]"#).await;
        assert_eq!(code, 422, "{body}");
        assert_eq!(body["code"], "application");
        assert_eq!(body["application"], json!({"refused": {"message": "boom"}}));
        assert!(body["error"].as_str().unwrap().contains("boom"), "{body}");
        assert!(body["elapsed_ms"].is_f64(), "{body}");

        // Refusals, each with its code.
        let started = Instant::now();
        for (path, args, status, kind) in [
            ("/rpc/nobody.here/echo", r#"["x"]"#, 404, "no_provider"),
            ("/rpc/demo/nope", "[]", 404, "unknown_method"),
            ("/rpc/demo/add", r#"["two"]"#, 400, "decode"),
            ("/rpc/demo/add", "[1, 2]", 400, "decode"),
            (
                "/rpc/demo/echo?version=2",
                r#"["x"]"#,
                409,
                "version_mismatch",
            ),
            ("/rpc/bad%20name/echo", r#"["x"]"#, 400, "local"),
            ("/rpc/demo/echo", r#"{"text": "x"}"#, 400, "bad_request"),
            ("/rpc/demo/echo", "\"x\"", 400, "bad_request"),
            ("/rpc/demo/echo", "[", 400, "bad_request"),
            (
                "/rpc/demo/echo?deadline_ms=0",
                r#"["x"]"#,
                400,
                "bad_request",
            ),
            (
                "/rpc/demo/echo?deadline_ms=600001",
                r#"["x"]"#,
                400,
                "bad_request",
            ),
            (
                "/rpc/demo/echo?idempotent=maybe",
                r#"["x"]"#,
                400,
                "bad_request",
            ),
        ] {
            let (code, body) = post_body(a.addr, path, args).await;
            assert_eq!(
                (code, &body["code"]),
                (status, &json!(kind)),
                "{path} {args}: {body}"
            );
            assert!(body["error"].is_string(), "{body}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let (code, body) = post_body(a.addr, "/rpc/demo/echo?version=2", r#"["x"]"#).await;
        assert_eq!(
            (code, &body["wanted"], &body["served"]),
            (409, &json!(2), &json!(1))
        );
        let (code, body) = get_json(a.addr, "/rpc/demo/echo").await;
        assert_eq!((code, &body["code"]), (405, &json!("method_not_allowed")));
        let (code, body) = get_json(a.addr, "/rpc/bad%20name/providers").await;
        assert_eq!((code, &body["code"]), (400, &json!("local")), "{body}");
        // A method named `providers` is called, not listed.
        let (code, body) = post_body(a.addr, "/rpc/demo/providers", "[]").await;
        assert_eq!(
            (code, &body["code"]),
            (404, &json!("unknown_method")),
            "{body}"
        );

        // The counters: b served echo, add x3, whoami x2, sleep, fail, the
        // two decode failures, and providers (refused: no such method, like
        // nope and the version mismatches, before it counts).
        let (_, status) = get_json(b.addr, "/status").await;
        assert_eq!(
            status["served"],
            json!([{
                "name": "demo",
                "version": 1,
                "methods": ["echo", "add", "fail", "sleep", "whoami"],
                "calls": 10,
                "errors": 3,
                "overloaded": 0,
                "cancelled": 0,
                "in_flight": 0,
                "relisted": 0
            }])
        );
        assert_eq!(
            status["calls"],
            json!({"calls": 1, "failures": 0, "retries": 0})
        );
        let (_, status) = get_json(a.addr, "/status").await;
        assert_eq!(status["served"], json!([]));
        // 6 answered; fail, the refusals that reached call_raw (no
        // provider, unknown method, 2 decode, 2 version, the bad name) and
        // the method `providers` failed.
        assert_eq!(
            status["calls"],
            json!({"calls": 15, "failures": 9, "retries": 0})
        );

        // `provider`: that node and no other.
        let (code, body) = post_body(
            a.addr,
            &format!("/rpc/demo/whoami?provider={}", b_id.to_ascii_uppercase()),
            "",
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert!(body["result"].to_string().contains(&b_id), "{body}");
        let a_id = a.node.node_id().to_string();
        let (code, body) = post_body(
            a.addr,
            &format!("/rpc/demo/echo?provider={a_id}"),
            r#"["x"]"#,
        )
        .await;
        assert_eq!(
            (code, &body["code"]),
            (404, &json!("no_provider")),
            "{body}"
        );
        assert_eq!(
            body["error"],
            format!(
                "no provider for service \"demo\" on node {}",
                a.node.node_id().short()
            ),
            "the node is outside the name's quotes"
        );
        let (code, body) = post_body(a.addr, "/rpc/demo/echo?provider=abcd", r#"["x"]"#).await;
        assert_eq!((code, &body["field"]), (400, &json!("provider")), "{body}");
        stop_all([b, a]).await;
    }

    /// A call out of time answers 504 at once and is cancelled at the
    /// provider; the default deadline is the node's; a provider at its
    /// limit answers 503 overloaded.
    #[tokio::test]
    async fn rpc_deadlines_cancel_and_the_limit_refuses() {
        let (a, b) = demo_pair(1).await;
        let started = Instant::now();
        let (code, body) = post_body(a.addr, "/rpc/demo/sleep?deadline_ms=200", "[5000]").await;
        let took = started.elapsed();
        assert_eq!((code, &body["code"]), (504, &json!("timeout")), "{body}");
        assert_eq!(body["deadline_ms"], 200.0, "{body}");
        assert!(took >= Duration::from_millis(200), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        let status = wait_status(b.addr, "the call cancelled at b", |s| {
            s["served"][0]["cancelled"] == 1 && s["served"][0]["in_flight"] == 0
        })
        .await;
        assert_eq!(status["served"][0]["calls"], 1, "{status}");

        // A short sleep completes, and says how long it slept.
        let (code, body) = post_body(a.addr, "/rpc/demo/sleep", "[20]").await;
        assert_eq!(code, 200, "{body}");
        assert!(body["result"].as_u64().unwrap() >= 20, "{body}");

        // The default deadline: the node's (`--rpc-deadline-ms`).
        let state = AdminState::new(a.node.clone(), ShutdownSignal::new())
            .with_rpc_deadline(Duration::from_millis(150));
        let (addr, _stop) = serve_with(state).await;
        let started = Instant::now();
        let (code, body) = post_body(addr, "/rpc/demo/sleep", "[5000]").await;
        assert_eq!((code, &body["code"]), (504, &json!("timeout")), "{body}");
        assert!(started.elapsed() < Duration::from_secs(4));
        wait_status(b.addr, "the second call cancelled at b", |s| {
            s["served"][0]["cancelled"] == 2 && s["served"][0]["in_flight"] == 0
        })
        .await;

        // b runs one call at a time: a second one is refused at once.
        let long = tokio::spawn(post_body(
            a.addr,
            "/rpc/demo/sleep?deadline_ms=3000",
            "[1000]",
        ));
        wait_status(b.addr, "the long call running at b", |s| {
            s["served"][0]["in_flight"] == 1
        })
        .await;
        let (code, body) = post_body(a.addr, "/rpc/demo/echo", r#"["x"]"#).await;
        assert_eq!((code, &body["code"]), (503, &json!("overloaded")), "{body}");
        let (code, body) = long.await.unwrap();
        assert_eq!(code, 200, "{body}");
        let (_, status) = get_json(b.addr, "/status").await;
        assert_eq!(status["served"][0]["overloaded"], 1, "{status}");
        stop_all([b, a]).await;
    }

    #[test]
    fn rpc_errors_map_to_status_codes() {
        let d = Duration::from_millis(1500);
        for (e, status, code) in [
            (RpcError::NoProvider("s".into()), 404, "no_provider"),
            (RpcError::UnknownService("s".into()), 404, "unknown_service"),
            (
                RpcError::UnknownMethod {
                    service: "s".into(),
                    method: "m".into(),
                },
                404,
                "unknown_method",
            ),
            (RpcError::Timeout(d), 504, "timeout"),
            (
                RpcError::VersionMismatch {
                    service: "s".into(),
                    wanted: 2,
                    served: 1,
                },
                409,
                "version_mismatch",
            ),
            (RpcError::Overloaded("s".into()), 503, "overloaded"),
            (RpcError::Disconnected("gone".into()), 503, "disconnected"),
            (RpcError::Cancelled, 503, "cancelled"),
            (RpcError::Decode("bad".into()), 400, "decode"),
            (RpcError::Local("bad name".into()), 400, "local"),
            (RpcError::Internal("panicked".into()), 500, "internal"),
            (
                RpcError::Application(Bytes::from_static(b"{\"refused\":{\"message\":\"x\"}}")),
                422,
                "application",
            ),
        ] {
            let error = ApiError::from_rpc(&e);
            assert_eq!((error.status.as_u16(), error.code), (status, code), "{e}");
        }
        let e = ApiError::from_rpc(&RpcError::Timeout(d));
        assert_eq!(e.extra["deadline_ms"], 1500.0);
        let app = ApiError::from_rpc(&RpcError::Application(Bytes::from_static(b"[1,2]")));
        assert_eq!(app.extra["application"], json!([1, 2]));
        assert_eq!(app.message, "the method failed: [1,2]");
        // Not JSON: kept as text.
        let app = ApiError::from_rpc(&RpcError::Application(Bytes::from_static(b"\x01oops")));
        assert_eq!(app.extra["application"], "\u{1}oops");
    }
}
