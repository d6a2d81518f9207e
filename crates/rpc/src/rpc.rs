//! The RPC runtime: serving, the registry in the synced map, calling with
//! provider choice, deadlines, cancellation and failover.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};

use rustc_hash::FxHashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, Bytes};
use futures_util::FutureExt;
use futures_util::future::Either;
use meshwork_sync::concerns::transport::Priority;
use meshwork_sync::concerns::wire::NodeId;
use meshwork_sync::concerns::wire::proto::ErrorCode;
use meshwork_sync::concerns::{BoxError, Concern, Concerns, ConcernsError, Context, Reply, Via};
use meshwork_sync::{EntryInfo, Stamp, SyncError, SyncMap, Watch};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::balance::{ProviderStats, Reach, choose};
use crate::proto::{self, FailureCode, outcome, rpc_message::Body};
use crate::service::{CallCancel, InCall};
use crate::{Codec, RpcError, Service, ServiceClient, ServiceError};

/// The RPC concern's command id.
pub const RPC: u32 = 0xFFFF_0200;

/// Where services are registered in the synced map:
/// `rpc/services/{name}/{node id in hex}`.
pub const REGISTRY_PREFIX: &str = "rpc/services/";

/// Longest service name, in bytes.
pub const MAX_SERVICE_NAME: usize = 200;

/// The longest a deadline or timeout counts for
/// ([`meshwork_sync::concerns::peers::FOREVER`]).
pub(crate) const FOREVER: Duration = meshwork_sync::concerns::peers::FOREVER;

/// Settings of the RPC layer, with defaults and chained setters.
#[derive(Debug, Clone)]
pub struct RpcConfig {
    pub(crate) deadline: Duration,
    pub(crate) registry_ttl: Duration,
    pub(crate) max_retries: u32,
    pub(crate) concurrency: usize,
    pub(crate) max_budget: Duration,
}

impl Default for RpcConfig {
    fn default() -> Self {
        RpcConfig {
            deadline: Duration::from_secs(10),
            registry_ttl: Duration::from_secs(10),
            max_retries: 2,
            concurrency: 256,
            max_budget: Duration::from_secs(300),
        }
    }
}

impl RpcConfig {
    /// Default deadline of a call (10 s); clients can override it. Any
    /// deadline over 100 years (up to `Duration::MAX`) counts as 100 years.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Time to live of this node's registry entries (10 s): a node that
    /// dies disappears from the registry within it.
    pub fn with_registry_ttl(mut self, ttl: Duration) -> Self {
        self.registry_ttl = ttl;
        self
    }

    /// Extra attempts on other providers after a failure to deliver (and,
    /// for idempotent methods, after a timeout). Default 2.
    pub fn with_max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// Calls of one service run at once on this node (default 256); more
    /// are answered `Overloaded` at once.
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The longest a call served here may run (default 5 min), whatever
    /// time its caller gives it: past this it is stopped and answered
    /// `Deadline`. Callers choose their budget, and a caller that asked for
    /// years and went away (or was never a neighbour, so its departure is
    /// not seen) would otherwise hold the service's slots that long.
    pub fn with_max_budget(mut self, max: Duration) -> Self {
        self.max_budget = max.max(Duration::from_millis(1));
        self
    }
}

/// What the registry says about one provider of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// The version served.
    pub version: u32,
    /// Its methods.
    pub methods: Vec<String>,
}

/// One provider of a service, as [`Rpc::providers`] lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Provider {
    /// The node serving it.
    pub node_id: NodeId,
    /// What it registered.
    pub record: ServiceRecord,
    /// This node, a neighbour, or reached through other nodes.
    pub reach: &'static str,
    /// Smoothed round trip of our calls to it as of the last one answered,
    /// if any was (the provider choice decays it with the time since).
    pub latency: Option<Duration>,
    /// Our calls to it that are waiting for their answer now.
    pub in_flight: u32,
}

/// Counters of one service served here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedStats {
    /// The name it is served under.
    pub name: String,
    /// Its version.
    pub version: u32,
    /// Its methods.
    pub methods: Vec<String>,
    /// Calls started.
    pub calls: u64,
    /// Calls that ended with an error (application errors included).
    pub errors: u64,
    /// Calls refused at the concurrency limit.
    pub overloaded: u64,
    /// Calls cancelled or out of time.
    pub cancelled: u64,
    /// Calls running now.
    pub in_flight: usize,
    /// Times its registry entry was written again after another node had
    /// taken it (see [`Rpc::serve`]).
    pub relisted: u64,
}

/// Counters of the calls this node made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallStats {
    /// Calls made.
    pub calls: u64,
    /// Calls that failed (any error).
    pub failures: u64,
    /// Extra attempts on another provider.
    pub retries: u64,
}

struct Served {
    service: Arc<dyn Service>,
    /// Its calls run with [`Service::call_framed`].
    framed: bool,
    name: String,
    methods: Vec<&'static str>,
    version: u32,
    /// Its registry value: its [`ServiceRecord`] as JSON.
    record: Bytes,
    /// Calls it may run at once.
    limit: usize,
    calls: AtomicU64,
    errors: AtomicU64,
    overloaded: AtomicU64,
    cancelled: AtomicU64,
    in_flight: AtomicUsize,
    /// Times its registry entry was written again (see [`keep_listed`]).
    relisted: AtomicU64,
    /// Calls taken past half the limit, by caller (see [`Served::share`]).
    /// SipHash: callers are whoever calls.
    holders: Mutex<HashMap<NodeId, usize>>,
}

impl Served {
    /// A service about to be served, its counters at zero.
    fn new(
        service: Arc<dyn Service>,
        name: String,
        methods: Vec<&'static str>,
        version: u32,
        record: Bytes,
        limit: usize,
    ) -> Self {
        Served {
            framed: service.frames_results(),
            service,
            name,
            methods,
            version,
            record,
            limit,
            calls: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            overloaded: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            relisted: AtomicU64::new(0),
            holders: Mutex::new(HashMap::new()),
        }
    }

    /// The calls one caller may hold past half the limit: a quarter of it
    /// (at least one). One caller can so take at most three quarters of the
    /// slots, however fast it calls, and a quarter stays for the others.
    fn share(&self) -> usize {
        (self.limit / 4).max(1)
    }
}

/// Cancels that named no waiting call are remembered, the latest this
/// many: the call may not be registered yet.
const EARLY_CANCELS: usize = 64;
/// Of which one caller's take at most this many: a member's stray Cancels
/// push out its own, not an honest caller's that overtook its call.
const EARLY_CANCELS_PER_CALLER: usize = 16;

/// The calls being served that had to wait, and recent Cancels that found
/// none.
#[derive(Default)]
struct Calls {
    /// By caller and call id. SipHash: the call ids are the callers' choice.
    waiting: HashMap<(NodeId, u64), CallCancel>,
    /// Cancels for calls not (or no longer) waiting, oldest first. A call
    /// registers only once its first poll did not finish it, and a Cancel
    /// handled meanwhile on another worker (a call that was queued, or a
    /// routed one) would otherwise be lost and the call run to its
    /// deadline. Most are for calls already answered, and age out.
    early: VecDeque<(NodeId, u64)>,
    /// Waiting calls stopped because their caller left (see
    /// [`Server::caller_left`]): answered `Interrupted`, not `Cancelled`.
    left: HashSet<(NodeId, u64)>,
}

impl Calls {
    /// Registers a waiting call; cancels it at once if its Cancel came
    /// first. A call whose caller already has a waiting call under the same
    /// id is not registered, and cancelled at once (false): callers pick
    /// their ids at random, and one reusing an id would otherwise put its
    /// calls out of reach of its Cancels, of the stop when it leaves and of
    /// shutdown (a review held 3 of 4 such calls running after their
    /// caller left).
    fn register(&mut self, key: (NodeId, u64), cancel: &CallCancel) -> bool {
        if self.waiting.contains_key(&key) {
            cancel.cancel();
            return false;
        }
        if let Some(i) = self.early.iter().position(|k| *k == key) {
            self.early.remove(i);
            cancel.cancel();
        }
        self.waiting.insert(key, cancel.clone());
        true
    }

    /// A Cancel from `key.0` for its call `key.1`.
    fn cancel(&mut self, key: (NodeId, u64)) {
        match self.waiting.remove(&key) {
            Some(token) => token.cancel(),
            None => {
                let own = self.early.iter().filter(|(c, _)| *c == key.0).count();
                if own >= EARLY_CANCELS_PER_CALLER {
                    if let Some(oldest) = self.early.iter().position(|(c, _)| *c == key.0) {
                        self.early.remove(oldest);
                    }
                } else if self.early.len() >= EARLY_CANCELS {
                    self.early.pop_front();
                }
                self.early.push_back(key);
            }
        }
    }
}

/// The serving side, shared with the concern (which must not hold the
/// concerns layer's context, or the two would keep each other alive).
pub(crate) struct Server {
    /// Fx-hashed: looked up on every call, keyed by names served here.
    served: RwLock<FxHashMap<String, Arc<Served>>>,
    /// Calls that had to wait, for Cancels and shutdown.
    running: Mutex<Calls>,
    default_budget: Duration,
    /// The most time a call is given, whatever its caller asks.
    max_budget: Duration,
    /// Set once when the node's RPC layer shuts down (a flag, not a token:
    /// it is checked a few times per call and never awaited).
    shutdown: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn failure(code: FailureCode, message: impl Into<String>) -> outcome::Result {
    outcome::Result::Failure(proto::Failure {
        code: code as i32,
        message: message.into(),
        version: 0,
    })
}

impl Server {
    /// A server serving nothing yet, with calls' default and longest budgets.
    fn new(default_budget: Duration, max_budget: Duration) -> Self {
        Server {
            served: RwLock::new(FxHashMap::default()),
            running: Mutex::new(Calls::default()),
            default_budget,
            max_budget,
            shutdown: AtomicBool::new(false),
        }
    }

    fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    fn lookup(&self, name: &str) -> Option<Arc<Served>> {
        self.served
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Runs one call and says how it ended.
    async fn run(&self, caller: &NodeId, call: CallIn<'_>) -> Answer {
        if self.shutting_down() {
            return failure(FailureCode::ShuttingDown, "shutting down").into();
        }
        let Some(served) = self.lookup(&call.service) else {
            return failure(FailureCode::UnknownService, call.service.into_owned()).into();
        };
        if call.version != 0 && call.version != served.version {
            return outcome::Result::Failure(proto::Failure {
                code: FailureCode::VersionMismatch as i32,
                message: format!("{} is version {}", served.name, served.version),
                version: served.version,
            })
            .into();
        }
        let Some(&method) = served.methods.iter().find(|m| **m == call.method) else {
            return failure(FailureCode::UnknownMethod, call.method.into_owned()).into();
        };
        let Some(codec) = Codec::from_wire(call.codec) else {
            return failure(FailureCode::Decode, format!("unknown codec {}", call.codec)).into();
        };
        // The concurrency limit is the in-flight count itself (a counter,
        // not a semaphore: nothing ever waits for a slot, and a semaphore's
        // release takes a lock).
        // Taken only while below the limit, so the count never passes it
        // (a refused call does not make a concurrent one look over it).
        let limit = served.limit;
        let took = served
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            });
        let Ok(before) = took else {
            served.overloaded.fetch_add(1, Ordering::Relaxed);
            return failure(FailureCode::Overloaded, served.name.clone()).into();
        };
        // Past half the limit each caller gets its share only: one caller
        // kept every slot busy for as long as it liked (a lock is taken
        // only here, when the service is busy).
        let held = before >= limit / 2;
        if held {
            let mut holders = lock(&served.holders);
            let mine = holders.entry(caller.clone()).or_insert(0);
            if *mine >= served.share() {
                drop(holders);
                served.in_flight.fetch_sub(1, Ordering::AcqRel);
                served.overloaded.fetch_add(1, Ordering::Relaxed);
                return failure(FailureCode::Overloaded, served.name.clone()).into();
            }
            *mine += 1;
        }
        served.calls.fetch_add(1, Ordering::Relaxed);
        let budget = if call.budget_ms == 0 {
            self.default_budget
        } else {
            Duration::from_millis(call.budget_ms)
        }
        .min(self.max_budget);
        // Uncounts the call and counts it cancelled unless it finished,
        // however this future ends (including when it is dropped: a local
        // caller that gave up).
        let mut running = Running {
            server: self,
            served: &served,
            caller,
            held,
            key: None,
            cancel: None,
            finished: false,
        };
        let finished = {
            let mut work = InCall::new(
                caller.clone(),
                method,
                std::panic::AssertUnwindSafe(if served.framed {
                    served.service.call_framed(method, codec, call.args)
                } else {
                    served.service.call(method, codec, call.args)
                })
                .catch_unwind(),
            );
            // Most methods answer at once: no timer, no cancellation waiter,
            // no cancel signal (unless the method asked for its context)
            // and no entry in the running calls for them (a Cancel can only
            // come after the answer, and a shutdown waits for nothing).
            match (&mut work).now_or_never() {
                Some(r) => Some(r),
                None => {
                    // It waits: from now on a Cancel or a shutdown can stop
                    // it, through the running calls (a Cancel that came
                    // during the first poll is remembered there, and stops
                    // it at once). A token of its own, not
                    // a child of a shutdown token (a child registers with
                    // its parent under the parent's lock, which every call
                    // would contend for).
                    let cancel = work.cancel();
                    running.cancel = Some(cancel.clone());
                    let key = (caller.clone(), call.call_id);
                    if lock(&self.running).register(key.clone(), &cancel) {
                        running.key = Some(key);
                    }
                    // Checked after registering: a shutdown either saw this
                    // call in the map or is seen here.
                    if self.shutting_down() {
                        cancel.cancel();
                    }
                    if cancel.is_cancelled() {
                        None
                    } else {
                        // Boxed: the timer and the cancellation waiter
                        // would otherwise sit in every call's future.
                        Box::pin(async {
                            tokio::select! {
                                r = tokio::time::timeout(budget, &mut work) => r.ok(),
                                _ = cancel.cancelled() => None,
                            }
                        })
                        .await
                    }
                }
            }
        };
        let result = finished.map(|r| match r {
            Ok(r) => r,
            Err(_panic) => Err(ServiceError::Internal(format!(
                "method {} panicked",
                call.method
            ))),
        });
        let cancelled = running
            .cancel
            .as_ref()
            .is_some_and(CallCancel::is_cancelled);
        // Stopped because its caller left (looked up only for stopped calls).
        let caller_left = cancelled
            && running
                .key
                .as_ref()
                .is_some_and(|k| lock(&self.running).left.contains(k));
        // A method that watches the token ends on its own once cancelled,
        // and may win the race above against the token itself: its answer
        // goes to nobody, and the call counts as stopped either way.
        let result = if cancelled { None } else { result };
        running.finished = result.is_some();
        drop(running);
        Answer::Outcome(match result {
            Some(Ok(bytes)) if served.framed => return Answer::Encoded(bytes),
            Some(Ok(bytes)) => outcome::Result::Ok(bytes),
            Some(Err(e)) => {
                served.errors.fetch_add(1, Ordering::Relaxed);
                match e {
                    ServiceError::Application(b) => outcome::Result::AppError(b),
                    ServiceError::UnknownMethod => {
                        failure(FailureCode::UnknownMethod, call.method.into_owned())
                    }
                    ServiceError::Decode(m) => failure(FailureCode::Decode, m),
                    ServiceError::Internal(m) => failure(FailureCode::Internal, m),
                }
            }
            // Stopped: the node shuts down (the call did not complete; the
            // caller may go elsewhere), the caller cancelled (nobody waits),
            // or it ran out of time (the caller is about to give up too).
            None if self.shutting_down() => failure(
                FailureCode::Interrupted,
                "the provider shut down during the call",
            ),
            None if caller_left => failure(
                FailureCode::Interrupted,
                "the link to the caller went during the call",
            ),
            None if cancelled => failure(FailureCode::Cancelled, "cancelled"),
            None => failure(FailureCode::Deadline, format!("ran out of its {budget:?}")),
        })
    }

    fn cancel(&self, caller: &NodeId, call_id: u64) {
        lock(&self.running).cancel((caller.clone(), call_id));
    }

    /// The neighbour `caller` left: its calls waiting here are stopped (it
    /// failed them on its side when the link went, and cannot send a
    /// Cancel). Without this, a peer could start calls with a long budget
    /// and leave, holding the service's slots.
    ///
    /// Such a call is answered `Interrupted`, not `Cancelled`: the caller
    /// cancelled nothing, and the answer can still reach it when the link
    /// is cut from this side (a block, a peer declared dead), on the
    /// connection before it closes. Seen with real processes: a provider
    /// that blocked its caller answered a waiting call `Cancelled`, which
    /// the caller does not retry, so an idempotent call failed instead of
    /// going to another provider.
    fn caller_left(&self, caller: &NodeId) {
        let mut running = lock(&self.running);
        let running = &mut *running;
        let mut stopped = 0;
        for (key, cancel) in &running.waiting {
            if key.0 == *caller {
                running.left.insert(key.clone());
                cancel.cancel();
                stopped += 1;
            }
        }
        if stopped > 0 {
            debug!(caller = %caller.short(), stopped, "calls of a caller that left stopped");
        }
    }
}

/// One call being served: unregisters it and updates the counters when it
/// ends, however it ends.
struct Running<'a> {
    server: &'a Server,
    served: &'a Served,
    caller: &'a NodeId,
    /// Counted in the caller's share ([`Served::holders`]).
    held: bool,
    /// Its entry in the running calls, once it has one (only calls that
    /// wait do).
    key: Option<(NodeId, u64)>,
    /// Its cancel signal, once it has one (only calls that wait do).
    cancel: Option<CallCancel>,
    finished: bool,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let Some(key) = &self.key {
            let mut running = lock(&self.server.running);
            running.waiting.remove(key);
            running.left.remove(key);
        }
        if self.held {
            let mut holders = lock(&self.served.holders);
            if let Some(n) = holders.get_mut(self.caller) {
                *n -= 1;
                if *n == 0 {
                    holders.remove(self.caller);
                }
            }
        }
        self.served.in_flight.fetch_sub(1, Ordering::AcqRel);
        if !self.finished {
            self.served.cancelled.fetch_add(1, Ordering::Relaxed);
            // Tells a method that watches the token (on a deadline, or when
            // a local caller gave up).
            if let Some(cancel) = &self.cancel {
                cancel.cancel();
            }
        }
    }
}

struct RpcConcern {
    server: Arc<Server>,
}

#[async_trait]
impl Concern for RpcConcern {
    fn command(&self) -> u32 {
        RPC
    }

    fn name(&self) -> &str {
        "rpc"
    }

    fn max_concurrency(&self) -> usize {
        4096
    }

    /// Calls come from neighbours or are routed from their caller, never
    /// flooded: a flooded call would run on every provider of the mesh,
    /// under an origin anyone can make up, and hold its slots with nobody
    /// to answer.
    fn accepts(&self, via: Via) -> bool {
        via != Via::Flooded
    }

    fn on_peer_left(&self, peer: &NodeId) {
        // Calls of a neighbour that leaves stop with it.
        self.server.caller_left(peer);
    }

    async fn on_request(
        &self,
        _ctx: &Context,
        from: &NodeId,
        payload: Bytes,
    ) -> Result<Option<Reply>, BoxError> {
        // A call in its plain form is read in place; anything else (a
        // Cancel, or a call prost must judge) through prost.
        let call = match plain_call(&payload) {
            Some(call) => call,
            None => match proto::RpcMessage::decode(payload.clone())?.body {
                Some(Body::Call(call)) => CallIn::from(call),
                Some(Body::Cancel(c)) => {
                    self.server.cancel(from, c.call_id);
                    return Ok(None);
                }
                Some(Body::Outcome(_)) | None => return Err("unexpected rpc message".into()),
            },
        };
        let answer = self.server.run(from, call).await;
        Ok(Some(Reply::new(answer.encode())))
    }
}

/// `RpcMessage { outcome: { result } }` encoded, byte for byte what prost
/// writes; a result (the answer to almost every call) without prost's
/// generic code: its keys and lengths written at once, then its bytes.
fn encode_outcome(result: outcome::Result) -> Bytes {
    match result {
        outcome::Result::Ok(ok) => frame_ok(&ok),
        result => proto::RpcMessage {
            body: Some(Body::Outcome(proto::Outcome {
                result: Some(result),
            })),
        }
        .encode_to_vec()
        .into(),
    }
}

/// The length of `RpcMessage { outcome: { result: Ok } }` around a result
/// of `len` bytes.
pub(crate) fn framed_len(len: usize) -> usize {
    use prost::encoding::encoded_len_varint;
    // Outcome field 1 (bytes), inside RpcMessage field 3 (a message); a
    // oneof's field is written even when empty.
    let inner = 1 + encoded_len_varint(len as u64) + len;
    1 + encoded_len_varint(inner as u64) + inner
}

/// Appends the keys and lengths of `RpcMessage { outcome: { result: Ok } }`
/// for a result of `len` bytes, which go right after them.
pub(crate) fn put_ok_header(out: &mut Vec<u8>, len: usize) {
    let inner = 1 + prost::encoding::encoded_len_varint(len as u64) + len;
    put_key_varint(out, 0x1a, inner as u64);
    put_key_varint(out, 0x0a, len as u64);
}

/// `RpcMessage { outcome: { result: Ok(ok) } }` encoded, as prost writes it.
pub(crate) fn frame_ok(ok: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(framed_len(ok.len()));
    put_ok_header(&mut out, ok.len());
    out.extend_from_slice(ok);
    out.into()
}

/// A result out of the answer [`Codec::encode_framed`] framed it in. What
/// the code of `#[service]` calls; not part of the stable API.
#[doc(hidden)]
pub fn unframe(framed: Bytes) -> Bytes {
    // Always framed so: anything else is passed on as it is.
    plain_ok(framed).unwrap_or_else(|b| b)
}

/// How a served call ended.
#[derive(Debug)]
enum Answer {
    /// The whole answer, encoded: the result of a service that frames its
    /// results ([`Service::call_framed`]).
    Encoded(Bytes),
    /// Anything else.
    Outcome(outcome::Result),
}

impl From<outcome::Result> for Answer {
    fn from(o: outcome::Result) -> Self {
        Answer::Outcome(o)
    }
}

impl Answer {
    /// The answer as a caller receives it.
    fn encode(self) -> Bytes {
        match self {
            Answer::Encoded(b) => b,
            Answer::Outcome(o) => encode_outcome(o),
        }
    }

    /// The outcome (for a caller on this node).
    fn into_outcome(self) -> outcome::Result {
        match self {
            Answer::Encoded(b) => match plain_ok(b) {
                Ok(ok) => outcome::Result::Ok(ok),
                Err(_) => failure(FailureCode::Internal, "a result framed wrongly"),
            },
            Answer::Outcome(o) => o,
        }
    }
}

/// Appends a one-byte protobuf key (tags 1 to 15) and a varint. The callers
/// size `out` exactly first, so each byte is a store, not a call (prost's
/// `encode_varint` calls into the buffer per byte, and appending a slice
/// built on the stack costs a `memcpy` call per key, nine per round trip).
/// No `reserve` here: asking for a varint's worst case near the end of an
/// exactly sized vector would reallocate it.
fn put_key_varint(out: &mut Vec<u8>, key: u8, mut v: u64) {
    out.push(key);
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The result in `payload` if the payload is an Outcome holding nothing
/// but a result, in its plain form: the RpcMessage's field 3 covering the
/// whole payload and the Outcome's field 1 covering the whole of that. The
/// payload itself, cut to the result (as prost gives it, without a second
/// reference to count); `Err(payload)` for anything else, which the caller
/// decodes with prost. The answer to almost every call.
fn plain_ok(mut payload: Bytes) -> Result<Bytes, Bytes> {
    use prost::encoding::decode_varint;
    let head = |mut rest: &[u8]| {
        rest = rest.strip_prefix(&[0x1a])?;
        let len = decode_varint(&mut rest).ok()?;
        if len != rest.len() as u64 {
            return None;
        }
        rest = rest.strip_prefix(&[0x0a])?;
        let len = decode_varint(&mut rest).ok()?;
        (len == rest.len() as u64).then_some(rest.len())
    };
    match head(&payload) {
        Some(len) => {
            payload.advance(payload.len() - len);
            Ok(payload)
        }
        None => Err(payload),
    }
}

/// A [`proto::Call`] as the server runs it: its names borrowed from the
/// request that carried them when it could be read in place.
#[derive(Debug, PartialEq)]
struct CallIn<'a> {
    call_id: u64,
    service: Cow<'a, str>,
    method: Cow<'a, str>,
    args: Bytes,
    codec: u32,
    budget_ms: u64,
    version: u32,
}

impl From<proto::Call> for CallIn<'static> {
    fn from(c: proto::Call) -> Self {
        CallIn {
            call_id: c.call_id,
            service: Cow::Owned(c.service),
            method: Cow::Owned(c.method),
            args: c.args,
            codec: c.codec,
            budget_ms: c.budget_ms,
            version: c.version,
        }
    }
}

/// The call in `payload` if the payload is one in its plain form: the
/// RpcMessage's field 1 covering the whole payload, and in it only the
/// Call's own fields with their own wire types, in any order, repeats
/// allowed (the last wins, as in protobuf), names in UTF-8. The names are
/// borrowed and the arguments a slice of `payload`: no copy, no allocation.
///
/// `None` for anything else (unknown fields, a Cancel, malformed bytes):
/// the caller decodes it with prost, which says what is wrong. So this
/// path gives exactly prost's result, only sooner, for what every call is
/// (prost's decoding, with a String per name, was about a tenth of a
/// served call's CPU).
fn plain_call(payload: &Bytes) -> Option<CallIn<'_>> {
    use prost::encoding::decode_varint;
    let mut rest: &[u8] = payload.strip_prefix(&[0x0a])?;
    let len = decode_varint(&mut rest).ok()?;
    if len != rest.len() as u64 {
        return None;
    }
    let mut call = CallIn {
        call_id: 0,
        service: Cow::Borrowed(""),
        method: Cow::Borrowed(""),
        args: Bytes::new(),
        codec: 0,
        budget_ms: 0,
        version: 0,
    };
    while let Some((&key, after)) = rest.split_first() {
        rest = after;
        match key {
            // Tags 1, 5, 6 and 7: varints; uint32s keep the low 32 bits.
            0x08 => call.call_id = decode_varint(&mut rest).ok()?,
            0x28 => call.codec = decode_varint(&mut rest).ok()? as u32,
            0x30 => call.budget_ms = decode_varint(&mut rest).ok()?,
            0x38 => call.version = decode_varint(&mut rest).ok()? as u32,
            // Tags 2, 3 and 4: length-delimited.
            0x12 | 0x1a | 0x22 => {
                let n = usize::try_from(decode_varint(&mut rest).ok()?).ok()?;
                if n > rest.len() {
                    return None;
                }
                let (field, after) = rest.split_at(n);
                rest = after;
                match key {
                    0x12 => call.service = Cow::Borrowed(std::str::from_utf8(field).ok()?),
                    0x1a => call.method = Cow::Borrowed(std::str::from_utf8(field).ok()?),
                    _ => call.args = payload.slice_ref(field),
                }
            }
            _ => return None,
        }
    }
    Some(call)
}

#[derive(Default)]
struct ClientCounters {
    calls: AtomicU64,
    failures: AtomicU64,
    retries: AtomicU64,
    /// Cancels of dropped calls being sent now ([`CancelOnDrop`]).
    cancels_sending: AtomicUsize,
}

struct Inner {
    server: Arc<Server>,
    sync: SyncMap,
    ctx: Context,
    config: RpcConfig,
    /// By provider: each provider's cell, which its [`Listing`]s share, so
    /// a call reaches its provider's stats without hashing its id (SipHash,
    /// twice a call, was about 3% of a sequential call's instructions);
    /// the map is read when the registry is, to keep a provider's stats
    /// when its listing is parsed again. SipHash: any node can list
    /// providers under ids of its choosing in the registry, and unseeded
    /// FxHash has easy full collisions. At most [`MAX_STATS`] entries.
    stats: Mutex<HashMap<NodeId, StatsCell>>,
    counters: ClientCounters,
    /// The registry entries of each service asked for, parsed.
    registry: Mutex<FxHashMap<String, Listed>>,
    /// Changes to the registry (see [`Listed`]).
    registry_changes: Mutex<RegistryWatch>,
    /// Held while this node writes its own registry entries (serving,
    /// stopping, listing again), so that a service stopped meanwhile is
    /// not listed again.
    listing: tokio::sync::Mutex<()>,
    /// The task that lists this node's services again ([`keep_listed`]),
    /// stopped at shutdown.
    keep_listed: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Services whose parsed registry entries are kept at most: past this, the
/// cache starts over (a caller naming ever new services).
const MAX_LISTED: usize = 1024;

/// Registry entries longer than this are not parsed, and not listed: a
/// record is a version and method names (16 KiB holds hundreds of them),
/// and any member can write entries under any name. Without a bound, one
/// entry of a megabyte of empty names parses into 8 MB of strings, on
/// every caller of that service, again after each change to the map.
pub const MAX_RECORD_BYTES: usize = 16 * 1024;
/// Providers of one service that are parsed and listed at most (the first
/// in key order, which is by node id): what a caller reads and parses for
/// one call is bounded too.
pub const MAX_PROVIDERS: usize = 1024;
/// Methods a registry entry may list; one with more is not listed (what is
/// kept of an entry stays within a few times its size).
pub const MAX_METHODS: usize = 1024;

/// What a caller remembers about one provider, shared by the provider's
/// listings and the stats map.
type StatsCell = Arc<Mutex<ProviderStats>>;

/// One provider's registry entry, parsed.
#[derive(Debug, Clone)]
struct Listing {
    node_id: NodeId,
    /// Its registry key, and the version of the entry it was parsed from:
    /// while an entry keeps its version it is not parsed again.
    key: Bytes,
    version: Stamp,
    record: Arc<ServiceRecord>,
    /// When the entry expires unless refreshed, on the synced map's clock
    /// (`None`: never).
    expires_at_ms: Option<u64>,
    /// The provider's stats.
    stats: StatsCell,
}

impl Listing {
    /// Whether the entry is still live at `now_ms` (as the map decides).
    fn live(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_none_or(|t| now_ms < t)
    }
}

/// The live registry entries of one service, in key order, and where each
/// provider is among them by node id (for a call choosing among many, which
/// looks its neighbours up there instead of each provider among its
/// neighbours).
struct Listings {
    all: Vec<Listing>,
    /// Positions in `all`, sorted by node id.
    by_node: Vec<u32>,
}

impl Listings {
    fn new(all: Vec<Listing>) -> Self {
        let mut by_node: Vec<u32> = (0..all.len() as u32).collect();
        by_node.sort_by(|&a, &b| all[a as usize].node_id.cmp(&all[b as usize].node_id));
        Listings { all, by_node }
    }

    /// The listings of `node` (usually none or one).
    fn of(&self, node: &NodeId) -> impl Iterator<Item = &Listing> + '_ {
        let id = |i: &u32| &self.all[*i as usize].node_id;
        let start = self.by_node.partition_point(|i| id(i) < node);
        let end = start + self.by_node[start..].partition_point(|i| id(i) == node);
        self.by_node[start..end]
            .iter()
            .map(|&i| &self.all[i as usize])
    }
}

impl std::ops::Deref for Listings {
    type Target = [Listing];

    fn deref(&self) -> &[Listing] {
        &self.all
    }
}

/// Fitting providers past which a call does not weigh every one: it finds
/// the nearest class from its neighbours' side and compares two drawn from
/// it ([`Rpc::draw_two`]). Up to this many, weighing each is as cheap.
const FEW_PROVIDERS: usize = 3;

/// The registry entries of one service as they were when the map had
/// digest `digest`, at registry generation `generation` ([`RegistryWatch`]):
/// while either is the same the entries are the same, so they are read
/// again only after a registry entry changed, and in between only checked
/// for expiry.
struct Listed {
    /// The map's digest when they were read.
    digest: u64,
    generation: u64,
    listings: Arc<Listings>,
}

/// Counts the changes to registry entries, as the synced map reports them
/// to a watch of the registry's prefix: a write or merge elsewhere in the
/// map does not make callers read the registry again (with the map's digest
/// as the mark, as before, every write anywhere did, on every caller).
struct RegistryWatch {
    watch: Watch,
    generation: u64,
}

impl RegistryWatch {
    /// The generation now, counting the changes waiting in the watch.
    fn generation(&mut self) -> u64 {
        loop {
            match self.watch.try_recv() {
                // A change, or changes missed: either way the entries may
                // differ.
                Ok(Some(_)) | Err(SyncError::Lagged(_)) => {
                    self.generation = self.generation.wrapping_add(1);
                }
                Ok(None) | Err(_) => return self.generation,
            }
        }
    }
}

/// The RPC layer of one node: serve services, call them anywhere in the
/// mesh. Cheap to clone.
#[derive(Clone)]
pub struct Rpc {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Rpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rpc")
            .field("node_id", self.inner.ctx.node_id())
            .finish()
    }
}

/// Checks a service name: 1 to 200 bytes of letters, digits, `.`, `-`,
/// `_` (dots make hierarchies: `storage.blobs`).
pub fn check_service_name(name: &str) -> Result<(), RpcError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SERVICE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(RpcError::Local(format!(
            "invalid service name {name:?}: 1 to {MAX_SERVICE_NAME} letters, digits, '.', '-', '_'"
        )))
    }
}

/// Keeps this node's services listed while it serves them, checking every
/// `every`.
///
/// The synced map keeps an ephemeral key alive only while no other node
/// has claimed it, and gives it up for good once one has. No honest node
/// writes another's registry entry (the key names the provider), but any
/// member can (entries are not signed, security.md), and a provider whose
/// entry was taken stayed unlisted, and uncallable, for as long as it ran.
/// Now it writes its entry again as soon as the map lets it: once the
/// other claim's lease has lapsed. A claim with a lease of years is not
/// undone this way; signed entries would be needed for that.
async fn keep_listed(weak: std::sync::Weak<Inner>, every: Duration) {
    let mut timer = tokio::time::interval(every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer.tick().await;
    loop {
        timer.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        if inner.server.shutting_down() {
            return;
        }
        let _listing = inner.listing.lock().await;
        let served: Vec<Arc<Served>> = inner
            .server
            .served
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let me = inner.ctx.node_id().clone();
        for s in served {
            let key = registry_key(&s.name, &me);
            // Who wrote what is there now (`None`: nothing live).
            let holder = match inner.sync.entry(&key) {
                Some(e) if e.writer == me && e.value == s.record => continue,
                Some(e) => Some(e.writer),
                None => None,
            };
            match inner
                .sync
                .set_ephemeral(&key, s.record.clone(), inner.config.registry_ttl)
                .await
            {
                Ok(_) => {
                    s.relisted.fetch_add(1, Ordering::Relaxed);
                    let by = holder.map(|h| h.short());
                    warn!(service = %s.name, taken_by = ?by, "registry entry taken or gone: listed again");
                }
                Err(e) => {
                    debug!(service = %s.name, error = %e, "cannot list again yet");
                }
            }
        }
    }
}

fn registry_key(name: &str, node: &NodeId) -> String {
    format!("{REGISTRY_PREFIX}{name}/{node}")
}

/// Turns a concerns-layer error of one attempt into a call error, and says
/// whether another provider may be tried.
fn attempt_error(e: ConcernsError, deadline: Duration) -> (RpcError<Bytes>, Retry) {
    match e {
        ConcernsError::NotConnected(n) | ConcernsError::Unresponsive(n) => (
            RpcError::Disconnected(format!("{} is not connected", n.short())),
            Retry::Always,
        ),
        ConcernsError::Unreachable(n) => (
            RpcError::Disconnected(format!("no route to {}", n.short())),
            Retry::Always,
        ),
        // A node on the way said it had no route on: maybe true, maybe a
        // relay that passed the call on and lies (audit round four: every
        // `add` ran twice). The call may have run.
        ConcernsError::RouteLost(n) => (
            RpcError::Disconnected(format!("the route to {} broke on the way", n.short())),
            Retry::IfIdempotent,
        ),
        ConcernsError::Dropped(m) => (RpcError::Disconnected(m), Retry::Always),
        // Sent, then the provider left: it may have run the call.
        ConcernsError::ConnectionLost(n) => (
            RpcError::Disconnected(format!("{} left before answering", n.short())),
            Retry::IfIdempotent,
        ),
        ConcernsError::Timeout(_) => (RpcError::Timeout(deadline), Retry::IfIdempotent),
        ConcernsError::Remote { code, message } => match code {
            ErrorCode::Overloaded => (RpcError::Overloaded(message), Retry::Always),
            ErrorCode::ShuttingDown => (RpcError::Disconnected(message), Retry::Always),
            ErrorCode::UnknownCommand => (RpcError::UnknownService(message), Retry::Always),
            ErrorCode::Unreachable => (RpcError::Disconnected(message), Retry::Always),
            _ => (RpcError::Internal(message), Retry::Never),
        },
        ConcernsError::Decode(m) => (RpcError::Decode(m), Retry::Never),
        other => (RpcError::Local(other.to_string()), Retry::Never),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    Always,
    IfIdempotent,
    Never,
}

fn outcome_error(
    f: proto::Failure,
    service: &str,
    wanted: u32,
    deadline: Duration,
) -> (RpcError<Bytes>, Retry) {
    let code = FailureCode::try_from(f.code).unwrap_or(FailureCode::Unspecified);
    match code {
        FailureCode::UnknownService => (RpcError::UnknownService(service.into()), Retry::Always),
        FailureCode::UnknownMethod => (
            RpcError::UnknownMethod {
                service: service.into(),
                method: f.message,
            },
            Retry::Never,
        ),
        FailureCode::VersionMismatch => (
            RpcError::VersionMismatch {
                service: service.into(),
                wanted,
                served: f.version,
            },
            Retry::Always,
        ),
        FailureCode::Overloaded => (RpcError::Overloaded(service.into()), Retry::Always),
        FailureCode::Deadline => (RpcError::Timeout(deadline), Retry::Never),
        FailureCode::Cancelled => (RpcError::Cancelled, Retry::Never),
        FailureCode::Decode => (RpcError::Decode(f.message), Retry::Never),
        FailureCode::ShuttingDown => (RpcError::Disconnected(f.message), Retry::Always),
        FailureCode::Interrupted => (RpcError::Disconnected(f.message), Retry::IfIdempotent),
        FailureCode::Internal | FailureCode::Unspecified => {
            (RpcError::Internal(f.message), Retry::Never)
        }
    }
}

/// Cancels being sent at once by a node's dropped calls, at most: past
/// this a dropped call sends none (its provider stops it at its deadline).
const MAX_CANCELS_SENDING: usize = 256;
/// How long a Cancel may take to go out (a full lane, a route search).
const CANCEL_SEND_WAIT: Duration = Duration::from_secs(2);

/// Sends a Cancel for a call that is dropped while waiting.
struct CancelOnDrop<'a> {
    inner: &'a Arc<Inner>,
    peer: &'a NodeId,
    call_id: u64,
    routed: bool,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let msg = proto::RpcMessage {
            body: Some(Body::Cancel(proto::Cancel {
                call_id: self.call_id,
            })),
        }
        .encode_to_vec();
        // A task each, bounded in number and in time: calls dropped in bulk
        // to a peer that does not read must not pile up tasks.
        let sending = &self.inner.counters.cancels_sending;
        if sending.fetch_add(1, Ordering::AcqRel) >= MAX_CANCELS_SENDING {
            sending.fetch_sub(1, Ordering::AcqRel);
            debug!(peer = %self.peer.short(), "cancel not sent: too many being sent");
            return;
        }
        let (inner, peer, routed) = (self.inner.clone(), self.peer.clone(), self.routed);
        handle.spawn(async move {
            let ctx = &inner.ctx;
            let send = async {
                if routed {
                    ctx.send_to(&peer, msg).await
                } else {
                    ctx.send(&peer, msg).await
                }
            };
            match tokio::time::timeout(CANCEL_SEND_WAIT, send).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(peer = %peer.short(), error = %e, "could not send a cancel"),
                Err(_) => debug!(peer = %peer.short(), "could not send a cancel in time"),
            }
            inner
                .counters
                .cancels_sending
                .fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// Options of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallOptions {
    /// The whole call, retries included, must end within this.
    pub deadline: Duration,
    /// The service version the caller wants (0: any).
    pub version: u32,
    /// Whether it may be retried after a timeout (it is safe to run twice).
    pub idempotent: bool,
    /// The encoding of arguments and outcome.
    pub codec: Codec,
}

impl Rpc {
    /// Starts the RPC layer on a node's concerns and sync layers: registers
    /// the RPC concern (command [`RPC`]).
    pub async fn start(
        concerns: &Concerns,
        sync: &SyncMap,
        config: RpcConfig,
    ) -> Result<Rpc, RpcError> {
        let server = Arc::new(Server::new(config.deadline, config.max_budget));
        concerns
            .add(RpcConcern {
                server: server.clone(),
            })
            .await
            .map_err(|e| RpcError::Local(e.to_string()))?;
        let rpc = Rpc {
            inner: Arc::new(Inner {
                server,
                sync: sync.clone(),
                ctx: concerns.context(RPC),
                config,
                stats: Mutex::new(HashMap::new()),
                registry: Mutex::new(FxHashMap::default()),
                registry_changes: Mutex::new(RegistryWatch {
                    watch: sync.watch(REGISTRY_PREFIX),
                    generation: 0,
                }),
                // From a random start: a Cancel names the caller and the
                // call id, and the caller's id is only as good as the path
                // it came by (a flooded or routed message says who sent it,
                // unverified). Ids counting from 1 were easy to guess.
                counters: ClientCounters::default(),
                listing: tokio::sync::Mutex::new(()),
                keep_listed: Mutex::new(None),
            }),
        };
        let every = (rpc.inner.config.registry_ttl / 3).max(Duration::from_millis(100));
        let task = tokio::spawn(keep_listed(Arc::downgrade(&rpc.inner), every));
        *lock(&rpc.inner.keep_listed) = Some(task);
        Ok(rpc)
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        self.inner.ctx.node_id()
    }

    /// Serves `service` under `name` and publishes it in the registry (an
    /// ephemeral key of the synced map, refreshed while this node runs).
    /// Only services served this way are reachable; nothing is loaded by
    /// name.
    ///
    /// The entry is checked every third of the registry ttl: if another
    /// node has taken it (only a member that lies does), it is written again
    /// once that node's lease has lapsed, and counted in
    /// [`ServedStats::relisted`].
    pub async fn serve(&self, name: &str, service: impl Service) -> Result<(), RpcError> {
        check_service_name(name)?;
        let _listing = self.inner.listing.lock().await;
        let methods = service.methods();
        let version = service.version();
        let record = ServiceRecord {
            version,
            methods: methods.iter().map(|m| m.to_string()).collect(),
        };
        let record =
            Bytes::from(serde_json::to_vec(&record).map_err(|e| RpcError::Decode(e.to_string()))?);
        let served = Arc::new(Served::new(
            Arc::new(service),
            name.to_string(),
            methods,
            version,
            record.clone(),
            self.inner.config.concurrency,
        ));
        {
            let mut all = self
                .inner
                .server
                .served
                .write()
                .unwrap_or_else(|e| e.into_inner());
            if all.contains_key(name) {
                return Err(RpcError::Local(format!("{name:?} is already served here")));
            }
            all.insert(name.to_string(), served);
        }
        let key = registry_key(name, self.node_id());
        if let Err(e) = self
            .inner
            .sync
            .set_ephemeral(&key, record, self.inner.config.registry_ttl)
            .await
        {
            self.remove_served(name);
            return Err(RpcError::Local(format!("cannot publish {name:?}: {e}")));
        }
        Ok(())
    }

    fn remove_served(&self, name: &str) -> bool {
        self.inner
            .server
            .served
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .is_some()
    }

    /// Stops serving `name` and removes it from the registry. Returns
    /// whether it was served.
    pub async fn stop_serving(&self, name: &str) -> bool {
        let _listing = self.inner.listing.lock().await;
        let was = self.remove_served(name);
        let key = registry_key(name, self.node_id());
        if let Err(e) = self.inner.sync.remove(&key).await {
            debug!(service = name, error = %e, "could not remove a registry entry");
        }
        was
    }

    /// Stops serving everything (removing it from the registry, and telling
    /// the neighbours at once) and refuses calls from now on.
    pub async fn shutdown(&self) {
        // First: it would list the services again as they are stopped.
        let task = lock(&self.inner.keep_listed).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        let names: Vec<String> = self.served().into_iter().map(|s| s.name).collect();
        for name in &names {
            self.stop_serving(name).await;
            let key = registry_key(name, self.node_id());
            let _ = self
                .inner
                .sync
                .confirm(&key, Duration::from_millis(500))
                .await;
        }
        let server = &self.inner.server;
        server.shutdown.store(true, Ordering::SeqCst);
        // Calls running now stop (each has its own token; see `run`).
        let running: Vec<CallCancel> = lock(&server.running).waiting.values().cloned().collect();
        for token in running {
            token.cancel();
        }
    }

    /// A typed client of the service served under `name` (generated by
    /// `#[service]`, e.g. `CalcClient`).
    pub fn client<C: ServiceClient>(&self, name: &str) -> C {
        C::from_client(Client {
            rpc: self.clone(),
            service: Arc::from(name),
            version: C::VERSION,
            deadline: self.inner.config.deadline,
            provider: None,
            name_ok: check_service_name(name).is_ok(),
        })
    }

    /// [`client`](Self::client) whose calls all go to `provider` and no
    /// other node (ChaskiRemote's `proxy(name, edge)`): no provider choice,
    /// no failover; [`RpcError::NoProvider`] at once while the registry does
    /// not list `provider` for `name`.
    pub fn client_on<C: ServiceClient>(&self, name: &str, provider: NodeId) -> C {
        C::from_client(Client {
            rpc: self.clone(),
            service: Arc::from(name),
            version: C::VERSION,
            deadline: self.inner.config.deadline,
            provider: Some(provider),
            name_ok: check_service_name(name).is_ok(),
        })
    }

    /// Waits until the registry lists at least one provider of `name`, at
    /// most `timeout`, and returns them (nearest first). A service served
    /// on another node a moment ago may not be listed here yet: its
    /// registry entry is on its way through the mesh, and a call made
    /// before it arrives fails with [`RpcError::NoProvider`] at once (a
    /// call never waits for a provider to appear). Also
    /// [`RpcError::NoProvider`] if none is listed within `timeout` (over
    /// 100 years, up to `Duration::MAX`, counts as 100 years);
    /// [`RpcError::Local`] if the layer shuts down meanwhile.
    pub async fn wait_for_provider(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<Vec<Provider>, RpcError> {
        self.wait_for_providers(name, 1, timeout).await
    }

    /// [`wait_for_provider`](Self::wait_for_provider) for at least `n`
    /// providers of `name` (say, before relying on failover between them),
    /// and returns them all (nearest first). [`RpcError::NoProvider`] if
    /// fewer are listed within `timeout`; `n` of 0 returns at once.
    pub async fn wait_for_providers(
        &self,
        name: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Provider>, RpcError> {
        let deadline = Instant::now() + timeout.min(FOREVER);
        // Watch before looking, so that an entry landing in between wakes us.
        let mut changes = self.inner.sync.watch(format!("{REGISTRY_PREFIX}{name}/"));
        loop {
            let found = self.providers(name);
            if found.len() >= n {
                return Ok(found);
            }
            match tokio::time::timeout_at(deadline, changes.recv()).await {
                Err(_) => return Err(RpcError::NoProvider(name.to_string())),
                Ok(Ok(_) | Err(SyncError::Lagged(_))) => {}
                Ok(Err(e)) => return Err(RpcError::Local(e.to_string())),
            }
        }
    }

    /// The providers of `name` in the registry, nearest first.
    pub fn providers(&self, name: &str) -> Vec<Provider> {
        let listings = self.listed(name);
        let mut out: Vec<(Reach, Provider)> = listings
            .iter()
            .map(|l| {
                let reach = self.reach(&l.node_id);
                let stats = lock(&l.stats);
                let provider = Provider {
                    node_id: l.node_id.clone(),
                    record: ServiceRecord::clone(&l.record),
                    reach: match reach {
                        Reach::Local => "local",
                        Reach::Neighbour => "neighbour",
                        Reach::Routed => "routed",
                    },
                    latency: stats.ewma,
                    in_flight: stats.in_flight,
                };
                (reach, provider)
            })
            .collect();
        out.sort_by_key(|p| p.0);
        out.into_iter().map(|(_, p)| p).collect()
    }

    /// The choice of [`choose`] among many fitting providers, without
    /// weighing each: the nearest class present (this node, else the
    /// neighbours listed, found by looking each neighbour up, else every
    /// fitting provider), then the cheaper of two drawn from it. `None` when
    /// a provider drawn failed recently (or the class's only one did):
    /// [`choose`] then decides, weighing every provider (it lets failing
    /// providers sit out wherever they are). While both drawn are healthy
    /// the two are a uniform pair of the class's healthy providers, as
    /// [`choose`] draws them.
    fn draw_two<'l>(
        &self,
        listings: &'l Listings,
        fits: &impl Fn(&Listing) -> bool,
        at: Instant,
    ) -> Option<(&'l Listing, Reach)> {
        let mut reach = Reach::Local;
        let mut class: Vec<&Listing> = listings.of(self.node_id()).filter(|l| fits(l)).collect();
        if class.is_empty() {
            reach = Reach::Neighbour;
            for n in self.inner.ctx.peers().neighbours() {
                class.extend(listings.of(&n).filter(|l| fits(l)));
            }
        }
        if class.is_empty() {
            reach = Reach::Routed;
            class = listings.iter().filter(|l| fits(l)).collect();
        }
        // A healthy provider's cost; `None` for one that failed recently.
        let cost = |l: &Listing| {
            let s = lock(&l.stats);
            (!s.failing(at)).then(|| s.cost(at))
        };
        match class.len() {
            0 => None,
            1 => cost(class[0]).map(|_| (class[0], reach)),
            n => {
                let mut rng = rand::rng();
                let a = rand::Rng::random_range(&mut rng, 0..n);
                let mut b = rand::Rng::random_range(&mut rng, 0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (class[a], class[b]);
                let (ca, cb) = (cost(a)?, cost(b)?);
                Some((if cb < ca { b } else { a }, reach))
            }
        }
    }

    /// Where `node` is from here.
    fn reach(&self, node: &NodeId) -> Reach {
        if node == self.node_id() {
            Reach::Local
        } else if self.inner.ctx.peers().is_neighbour(node) {
            Reach::Neighbour
        } else {
            Reach::Routed
        }
    }

    /// The live registry entries of `name`, in key order: the parsed ones
    /// of the last read while no registry entry has changed (less any that
    /// expired since), else read again (parsing only the changed ones).
    fn listed(&self, name: &str) -> Arc<Listings> {
        self.listed_at(name, Instant::now()).0
    }

    /// [`listed`](Self::listed) at `at`, a reading of tokio's clock just
    /// taken; also whether the entries were read and parsed again (which
    /// takes a while).
    fn listed_at(&self, name: &str, at: Instant) -> (Arc<Listings>, bool) {
        let sync = &self.inner.sync;
        // The map's digest first (what a call usually needs: nothing in the
        // map changed since the entries were read), then, when it has
        // changed, whether a registry entry did. Both are read before the
        // entries: a change landing in between leaves a stale mark beside
        // them, so the next call reads them again. The digest kept is the
        // one of the read: while it differs, every call asks the watch (a
        // change it reports a moment after the map made it is not missed).
        let digest = sync.digest();
        let mut generation = None;
        // The listings kept, and whether they still hold.
        let kept = lock(&self.inner.registry).get(name).map(|l| {
            let same = l.digest == digest || {
                let g = lock(&self.inner.registry_changes).generation();
                generation = Some(g);
                l.generation == g
            };
            (l.listings.clone(), same)
        });
        let before = match kept {
            Some((listings, true)) => {
                // The same entries; only time can have expired some.
                let now = sync.now_ms_at(at);
                if listings.iter().all(|l| l.live(now)) {
                    return (listings, false);
                }
                let live = listings.iter().filter(|l| l.live(now)).cloned().collect();
                let live = Arc::new(Listings::new(live));
                // Kept in their place (unless a read replaced them
                // meanwhile): expired entries do not come back, and every
                // call would otherwise filter and sort them again until a
                // registry entry changes.
                if let Some(l) = lock(&self.inner.registry).get_mut(name) {
                    if Arc::ptr_eq(&l.listings, &listings) {
                        l.listings = live.clone();
                    }
                }
                return (live, false);
            }
            Some((listings, false)) => Some(listings),
            None => None,
        };
        let generation =
            generation.unwrap_or_else(|| lock(&self.inner.registry_changes).generation());
        let prefix = format!("{REGISTRY_PREFIX}{name}/");
        // The listings read last time, in key order as the entries come: an
        // entry whose version has not changed is not parsed again (one
        // provider's refresh made every caller parse every provider's
        // record, about 0.85 us each).
        let mut before = before
            .as_deref()
            .map_or(&[][..], |l| &l[..])
            .iter()
            .peekable();
        // Only a read of the registry takes the stats map's lock (calls
        // reach their provider's cell through its listing), so holding it
        // through the parse keeps nobody waiting.
        let mut stats = lock(&self.inner.stats);
        let entries = self.providers_kept(sync.prefixed_entries(&prefix), &prefix, &stats);
        let listings: Vec<Listing> = entries
            .into_iter()
            .filter_map(|(k, e, node_id)| {
                while before.next_if(|l| l.key < k).is_some() {}
                if let Some(l) = before.next_if(|l| l.key == k && l.version == e.version) {
                    // Its stats cell comes along (the stats map keeps
                    // cells for listings parsed anew).
                    return Some(Listing {
                        expires_at_ms: e.expires_at_ms,
                        ..l.clone()
                    });
                }
                let record: ServiceRecord = serde_json::from_slice(&e.value).ok()?;
                if record.methods.len() > MAX_METHODS {
                    return None;
                }
                Some(Listing {
                    stats: stats_cell(&mut stats, &node_id),
                    node_id,
                    key: k,
                    version: e.version,
                    record: Arc::new(record),
                    expires_at_ms: e.expires_at_ms,
                })
            })
            .collect();
        drop(stats);
        let listings = Arc::new(Listings::new(listings));
        let mut registry = lock(&self.inner.registry);
        if registry.len() >= MAX_LISTED && !registry.contains_key(name) {
            registry.clear();
        }
        registry.insert(
            name.to_string(),
            Listed {
                digest,
                generation,
                listings: listings.clone(),
            },
        );
        (listings, true)
    }

    /// The registry entries of one service (`entries`, under `prefix`, in
    /// key order) that a caller parses and lists, in key order, with the
    /// node id each is for: those of fitting size whose key names the node
    /// that wrote them, at most [`MAX_PROVIDERS`] of them.
    ///
    /// Any member can write keys under a service's name, so neither the
    /// key order nor the first entries may decide who is listed: 1024 junk
    /// keys sorting before every node id used to unlist the real provider
    /// on every caller, its own node included. An entry written by a node
    /// other than the one its key names is not a provider's (a provider
    /// writes its own entry). Past the bound, this node's entry, its
    /// neighbours' and those of providers that answered it before are kept
    /// first, then the others in an order no other node can predict (a hash
    /// keyed with a secret of this node).
    fn providers_kept(
        &self,
        entries: Vec<(Bytes, EntryInfo)>,
        prefix: &str,
        stats: &HashMap<NodeId, StatsCell>,
    ) -> Vec<(Bytes, EntryInfo, NodeId)> {
        let mut kept: Vec<(Bytes, EntryInfo, NodeId)> = entries
            .into_iter()
            .filter(|(_, e)| e.value.len() <= MAX_RECORD_BYTES)
            .filter_map(|(k, e)| {
                let id = k.get(prefix.len()..)?;
                let node_id = NodeId::from_hex(std::str::from_utf8(id).ok()?).ok()?;
                (e.writer == node_id).then_some((k, e, node_id))
            })
            .collect();
        if kept.len() > MAX_PROVIDERS {
            let neighbours: HashSet<NodeId> =
                self.inner.ctx.peers().neighbours().into_iter().collect();
            let rank = |id: &NodeId| {
                let class = if id == self.node_id() {
                    0
                } else if neighbours.contains(id) {
                    1
                } else if stats.get(id).is_some_and(|c| lock(c).ewma.is_some()) {
                    2
                } else {
                    3
                };
                (class, std::hash::BuildHasher::hash_one(stats.hasher(), id))
            };
            kept.sort_by_cached_key(|(_, _, id)| rank(id));
            kept.truncate(MAX_PROVIDERS);
            kept.sort_by(|a, b| a.0.cmp(&b.0));
        }
        kept
    }

    /// Every service served here, with its counters.
    pub fn served(&self) -> Vec<ServedStats> {
        let all = self
            .inner
            .server
            .served
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<ServedStats> = all
            .values()
            .map(|s| ServedStats {
                name: s.name.clone(),
                version: s.version,
                methods: s.methods.iter().map(|m| m.to_string()).collect(),
                calls: s.calls.load(Ordering::Relaxed),
                errors: s.errors.load(Ordering::Relaxed),
                overloaded: s.overloaded.load(Ordering::Relaxed),
                cancelled: s.cancelled.load(Ordering::Relaxed),
                in_flight: s.in_flight.load(Ordering::Relaxed),
                relisted: s.relisted.load(Ordering::Relaxed),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Counters of the calls this node made.
    pub fn call_stats(&self) -> CallStats {
        let c = &self.inner.counters;
        CallStats {
            calls: c.calls.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
        }
    }

    /// Calls `method` of `service` with arguments already encoded in
    /// `options.codec` (a tuple of the arguments; in JSON, an array), and
    /// returns the encoded result. An application error comes back encoded
    /// too. For tools and the admin API; typed clients use this underneath.
    #[allow(clippy::manual_async_fn)] // an async block on purpose: see the comment inside
    pub fn call_raw(
        &self,
        service: &str,
        method: &str,
        args: Bytes,
        options: CallOptions,
    ) -> impl Future<Output = Result<Bytes, RpcError<Bytes>>> + Send {
        // A combinator and `async move` blocks rather than `async fn`s on
        // the way down to `attempt`: an `async fn` stores its arguments
        // twice in its future, and a call's future is allocated whole
        // wherever it is spawned or pushed (past about 1 KiB, glibc's
        // allocator takes its slow path for it).
        self.call_raw_with(service, method, args, options, None)
    }

    /// [`call_raw`](Self::call_raw) on one provider only: the call goes to
    /// `provider` or fails, never to another node (no failover). If the
    /// registry does not list `provider` for `service` (or not with the
    /// version asked for), [`RpcError::NoProvider`] at once. For tools and
    /// tests that must reach a given node; [`Rpc::client_on`] is the typed
    /// form.
    pub fn call_raw_on(
        &self,
        provider: &NodeId,
        service: &str,
        method: &str,
        args: Bytes,
        options: CallOptions,
    ) -> impl Future<Output = Result<Bytes, RpcError<Bytes>>> + Send {
        self.call_raw_with(service, method, args, options, Some(provider))
    }

    fn call_raw_with(
        &self,
        service: &str,
        method: &str,
        args: Bytes,
        options: CallOptions,
        provider: Option<&NodeId>,
    ) -> impl Future<Output = Result<Bytes, RpcError<Bytes>>> + Send {
        let counters = &self.inner.counters;
        self.call_inner(service, method, args, options, provider, false)
            .map(move |r| {
                if r.is_err() {
                    counters.failures.fetch_add(1, Ordering::Relaxed);
                }
                r
            })
    }

    /// The call (failures not counted: its callers do). `name_checked`:
    /// the service name passed [`check_service_name`] already (a
    /// [`Client`]'s, when the client was made), so it is not checked again.
    #[allow(clippy::manual_async_fn)] // an async block on purpose, as in `call_raw`
    fn call_inner(
        &self,
        service: &str,
        method: &str,
        args: Bytes,
        o: CallOptions,
        provider: Option<&NodeId>,
        name_checked: bool,
    ) -> impl Future<Output = Result<Bytes, RpcError<Bytes>>> + Send {
        async move {
            self.inner.counters.calls.fetch_add(1, Ordering::Relaxed);
            if !name_checked {
                check_service_name(service).map_err(|e| e.map_app(|n| match n {}))?;
            }
            if self.inner.server.shutting_down() {
                return Err(RpcError::Local("the RPC layer is shut down".into()));
            }
            // One reading of the clock before the first attempt serves the
            // registry's expiry check, the provider choice and the send
            // time, from which the deadline runs; after each attempt, the
            // reading of its end serves the next.
            let mut deadline_at: Option<Instant> = None;
            let mut at = Instant::now();
            // Providers that failed, for the attempts after (few: a list).
            let mut tried: Vec<NodeId> = Vec::new();
            // Boxed: only retries have one, and every call's future holds it.
            let mut last: Option<Box<RpcError<Bytes>>> = None;
            for attempt in 0..=self.inner.config.max_retries {
                let (listings, parsed) = self.listed_at(service, at);
                if listings.is_empty() {
                    return Err(last.map_or_else(|| RpcError::NoProvider(service.into()), |e| *e));
                }
                if let Some(p) = provider {
                    if !listings.iter().any(|l| &l.node_id == p) {
                        // The service's name only: the caller named the node.
                        return Err(
                            last.map_or_else(|| RpcError::NoProvider(service.into()), |e| *e)
                        );
                    }
                }
                let fits = |l: &Listing| {
                    (o.version == 0 || l.record.version == o.version)
                        && !tried.contains(&l.node_id)
                        && provider.is_none_or(|p| *p == l.node_id)
                };
                let fitting = listings.iter().filter(|l| fits(l)).count();
                if fitting == 0 {
                    if let Some(e) = last {
                        return Err(*e);
                    }
                    // The version of the nearest provider (as `providers` lists).
                    let nearest = listings
                        .iter()
                        .min_by_key(|l| self.reach(&l.node_id))
                        .map_or(0, |l| l.record.version);
                    return Err(RpcError::VersionMismatch {
                        service: service.into(),
                        wanted: o.version,
                        served: nearest,
                    });
                }
                let (listing, reach) = {
                    // The costs, then the chosen provider's call counted in
                    // flight. Each provider's stats are locked on their own:
                    // two callers choosing at the same moment may both see
                    // a provider's count before the other's call (the
                    // choice among two is random anyway).
                    let chosen = if fitting == 1 {
                        listings
                            .iter()
                            .find(|l| fits(l))
                            .map(|l| (l, self.reach(&l.node_id)))
                    } else {
                        // Among many, two drawn from the nearest class
                        // usually decide; otherwise every one is weighed.
                        let drawn = if fitting > FEW_PROVIDERS {
                            self.draw_two(&listings, &fits, at)
                        } else {
                            None
                        };
                        drawn.or_else(|| {
                            let cands: Vec<(Reach, f64, bool, &Listing)> = listings
                                .iter()
                                .filter(|l| fits(l))
                                .map(|l| {
                                    let s = lock(&l.stats);
                                    let (cost, failing) = (s.cost(at), s.failing(at));
                                    drop(s);
                                    (self.reach(&l.node_id), cost, failing, l)
                                })
                                .collect();
                            let triples: Vec<(Reach, f64, bool)> =
                                cands.iter().map(|c| (c.0, c.1, c.2)).collect();
                            choose(&triples, &mut rand::rng()).map(|i| (cands[i].3, cands[i].0))
                        })
                    };
                    let Some((listing, reach)) = chosen else {
                        return Err(RpcError::NoProvider(service.into()));
                    };
                    if reach != Reach::Local {
                        lock(&listing.stats).in_flight += 1;
                    }
                    // Borrowed from the listings (kept until the attempt
                    // ends): no clone per call, and less in the future.
                    (listing, reach)
                };
                let node = &listing.node_id;
                // Uncounts the call unless the attempt records its outcome
                // (which uncounts it too): an early return here, or the caller
                // dropping the call meanwhile.
                let flight = InFlight {
                    listing,
                    armed: reach != Reach::Local,
                };
                let remaining = match deadline_at {
                    Some(deadline) => deadline.saturating_duration_since(at),
                    None => o.deadline.min(FOREVER),
                };
                if remaining.is_zero() {
                    return Err(RpcError::Timeout(o.deadline));
                }
                if attempt > 0 {
                    self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                }
                // An idempotent call may be retried after a timeout: share the
                // time left between this attempt and the ones that could follow
                // (as many as there are untried providers, within the budget).
                let budget = if o.idempotent {
                    let left = (self.inner.config.max_retries - attempt) as usize;
                    let slots = left.min(fitting - 1) as u32 + 1;
                    remaining / slots
                } else {
                    remaining
                };
                // Read again after a parse of the registry, which must not
                // count in the provider's latency.
                let sent = if parsed { Instant::now() } else { at };
                let (result, retry, ended) = self
                    .attempt(flight, reach, service, method, &args, o, budget, sent)
                    .await;
                deadline_at.get_or_insert(sent + o.deadline.min(FOREVER));
                at = ended;
                match result {
                    Ok(b) => return Ok(b),
                    Err(e) => {
                        let again = match retry {
                            Retry::Always => true,
                            Retry::IfIdempotent => o.idempotent,
                            Retry::Never => false,
                        };
                        if !again {
                            return Err(e);
                        }
                        debug!(service, method, provider = %node.short(), error = ?e, "retrying on another provider");
                        tried.push(node.clone());
                        last = Some(Box::new(e));
                    }
                }
            }
            Err(last.map_or_else(|| RpcError::NoProvider(service.into()), |e| *e))
        }
    }

    /// One try of a call at `flight`'s node, counted in flight there by
    /// the caller (unless local), sent at `sent`. Returns the result,
    /// whether another provider may be tried, and when it ended.
    #[allow(clippy::too_many_arguments)]
    fn attempt<'a>(
        &'a self,
        flight: InFlight<'a>,
        reach: Reach,
        service: &'a str,
        method: &'a str,
        args: &Bytes,
        o: CallOptions,
        remaining: Duration,
        sent: Instant,
    ) -> impl Future<Output = (Result<Bytes, RpcError<Bytes>>, Retry, Instant)> + Send + 'a {
        let node = &flight.listing.node_id;
        // Random: a Cancel names its call by (caller, id), and the caller a
        // routed Cancel claims is not checked; counted ids were guessed by
        // a member that cancelled other nodes' calls (audit round three).
        let call_id: u64 = rand::random();
        // Saturating: `as` would wrap a budget beyond u64 milliseconds.
        let budget_ms = u64::try_from(remaining.as_millis().max(1)).unwrap_or(u64::MAX);
        // Prepared before the future: it then holds the encoded call (or
        // the local call's boxed future), not everything it is made from.
        let work = if reach == Reach::Local {
            let call = CallIn {
                call_id,
                service: Cow::Borrowed(service),
                method: Cow::Borrowed(method),
                args: args.clone(),
                codec: o.codec.to_wire(),
                budget_ms,
                version: o.version,
            };
            // Boxed: rare, and the served call's future would otherwise make
            // every remote call's future larger too.
            Work::Local(Box::pin(
                self.inner.server.run(node, call).map(Answer::into_outcome),
            ))
        } else {
            Work::Remote(encode_call(&CallRef {
                call_id,
                service,
                method,
                args,
                codec: o.codec.to_wire(),
                budget_ms,
                version: o.version,
            }))
        };
        async move {
            // The whole guard into the future: used only through a field, it
            // would be captured as that field alone and dropped (uncounting
            // the call) as soon as this function returns.
            let mut flight = flight;
            let result = match work {
                Work::Local(run) => Ok(run.await),
                Work::Remote(payload) => {
                    let mut guard = CancelOnDrop {
                        inner: &self.inner,
                        peer: node,
                        call_id,
                        routed: reach == Reach::Routed,
                        armed: true,
                    };
                    let reply = if reach == Reach::Routed {
                        // Boxed: neighbours are the usual case.
                        Box::pin(self.inner.ctx.request_to(node, payload, remaining)).await
                    } else {
                        self.inner
                            .ctx
                            .request_with_deadline(node, payload, remaining, Priority::Normal)
                            .await
                    };
                    // Answered, or not delivered: nothing to cancel. A timeout
                    // leaves the guard armed, so the provider stops the work.
                    guard.armed = matches!(reply, Err(ConcernsError::Timeout(_)));
                    drop(guard);
                    reply.and_then(|b| {
                        let b = match plain_ok(b) {
                            Ok(ok) => return Ok(outcome::Result::Ok(ok)),
                            Err(b) => b,
                        };
                        proto::RpcMessage::decode(b)
                            .ok()
                            .and_then(|m| match m.body {
                                Some(Body::Outcome(o)) => o.result,
                                _ => None,
                            })
                            .ok_or_else(|| ConcernsError::Decode("rpc outcome".into()))
                    })
                }
            };
            let now = Instant::now();
            // The provider answered (with anything): its round trip counts.
            let answered = result.is_ok();
            let (r, retry) = match result {
                Ok(outcome::Result::Ok(b)) => (Ok(b), Retry::Never),
                Ok(outcome::Result::AppError(b)) => (Err(RpcError::Application(b)), Retry::Never),
                Ok(outcome::Result::Failure(f)) => {
                    let (e, r) = outcome_error(f, service, o.version, o.deadline);
                    (Err(e), r)
                }
                Err(e) => {
                    let (e, r) = attempt_error(e, o.deadline);
                    (Err(e), r)
                }
            };
            {
                // One look at the stats: out of flight, and how it went.
                let counted = std::mem::replace(&mut flight.armed, false);
                let mut s = lock(&flight.listing.stats);
                if counted {
                    s.in_flight = s.in_flight.saturating_sub(1);
                }
                if answered {
                    s.answered(now - sent, now);
                }
                // Every failure counts against the provider, retried or
                // not: a provider that answers every call at once with an
                // internal error (as quick as no answer at all) used to win
                // every choice it was in.
                if matches!(r, Ok(_) | Err(RpcError::Application(_))) {
                    s.succeeded();
                } else {
                    s.failure(now);
                }
            }
            (r, retry, now)
        }
    }
}

/// What one attempt of a call does, prepared before its future.
enum Work<'a> {
    /// Runs the service here.
    Local(Pin<Box<dyn Future<Output = outcome::Result> + Send + 'a>>),
    /// Sends this encoded call to the provider.
    Remote(Vec<u8>),
}

/// A call counted in flight to a provider: uncounted if its caller drops
/// it before the outcome is recorded (which uncounts it otherwise).
struct InFlight<'a> {
    listing: &'a Listing,
    armed: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut s = lock(&self.listing.stats);
            s.in_flight = s.in_flight.saturating_sub(1);
        }
    }
}

/// Providers whose stats are kept at most: past this, those with no call in
/// flight are forgotten (the registry can list any number of providers, and
/// any node can add some).
const MAX_STATS: usize = 4096;

/// `node`'s stats cell, made if new (no key clone when it exists, the
/// usual case, unlike `entry`). Past [`MAX_STATS`] the cells of providers
/// with no call in flight are forgotten first: listings parsed before keep
/// theirs, and a provider listed again starts afresh.
fn stats_cell(stats: &mut HashMap<NodeId, StatsCell>, node: &NodeId) -> StatsCell {
    if let Some(cell) = stats.get(node) {
        return cell.clone();
    }
    if stats.len() >= MAX_STATS {
        stats.retain(|_, c| lock(c).in_flight > 0);
    }
    let cell = StatsCell::default();
    stats.insert(node.clone(), cell.clone());
    cell
}

/// A [`proto::Call`] with borrowed strings and arguments.
struct CallRef<'a> {
    call_id: u64,
    service: &'a str,
    method: &'a str,
    args: &'a Bytes,
    codec: u32,
    budget_ms: u64,
    version: u32,
}

/// `RpcMessage { call }` encoded, byte for byte what prost writes for the
/// owned [`proto::Call`], without copying the names into Strings first.
fn encode_call(c: &CallRef<'_>) -> Vec<u8> {
    use prost::encoding::{WireType, encoded_len_varint, key_len};
    let varint = |tag: u32, v: u64| {
        if v == 0 {
            0
        } else {
            key_len(tag) + encoded_len_varint(v)
        }
    };
    let bytes = |tag: u32, len: usize| {
        if len == 0 {
            0
        } else {
            key_len(tag) + encoded_len_varint(len as u64) + len
        }
    };
    let body = varint(1, c.call_id)
        + bytes(2, c.service.len())
        + bytes(3, c.method.len())
        + bytes(4, c.args.len())
        + varint(5, u64::from(c.codec))
        + varint(6, c.budget_ms)
        + varint(7, u64::from(c.version));
    let mut out = Vec::with_capacity(key_len(1) + encoded_len_varint(body as u64) + body);
    // Keys (tags 1 to 7: one byte each) and varints.
    let key = |tag: u8, wire: WireType| tag << 3 | wire as u8;
    let put = put_key_varint;
    let put_varint = |out: &mut Vec<u8>, tag: u8, v: u64| {
        if v != 0 {
            put(out, key(tag, WireType::Varint), v);
        }
    };
    let put_bytes = |out: &mut Vec<u8>, tag: u8, b: &[u8]| {
        if !b.is_empty() {
            put(out, key(tag, WireType::LengthDelimited), b.len() as u64);
            out.extend_from_slice(b);
        }
    };
    put(&mut out, key(1, WireType::LengthDelimited), body as u64);
    put_varint(&mut out, 1, c.call_id);
    put_bytes(&mut out, 2, c.service.as_bytes());
    put_bytes(&mut out, 3, c.method.as_bytes());
    put_bytes(&mut out, 4, c.args);
    put_varint(&mut out, 5, u64::from(c.codec));
    put_varint(&mut out, 6, c.budget_ms);
    put_varint(&mut out, 7, u64::from(c.version));
    out
}

/// The codec of typed clients' calls.
const CLIENT_CODEC: Codec = Codec::Postcard;

/// An untyped client of one service: what a generated typed client wraps.
#[derive(Debug, Clone)]
pub struct Client {
    rpc: Rpc,
    service: Arc<str>,
    version: u32,
    deadline: Duration,
    /// The one provider calls go to ([`Rpc::client_on`]); `None`: any.
    provider: Option<NodeId>,
    /// The service name passed [`check_service_name`] when the client was
    /// made: its calls skip the check (with a bad name, each call fails
    /// with the check's error, as before).
    name_ok: bool,
}

impl Client {
    /// The provider every call goes to, if the client is pinned to one
    /// ([`Rpc::client_on`]).
    pub fn provider(&self) -> Option<&NodeId> {
        self.provider.as_ref()
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The deadline of each call (retries included).
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// The same client with another deadline. Any deadline over 100 years
    /// (up to `Duration::MAX`: practically none) counts as 100 years.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The RPC layer underneath.
    pub fn rpc(&self) -> &Rpc {
        &self.rpc
    }

    /// Calls `method` with `args` (a tuple of the arguments) and decodes
    /// its result, or its application error `E`.
    ///
    /// The arguments are encoded here, when the call is made; the call
    /// itself starts when the future is first polled.
    pub fn call<A, R, E>(
        &self,
        method: &'static str,
        args: &A,
        idempotent: bool,
    ) -> impl Future<Output = Result<R, RpcError<E>>> + Send + use<'_, A, R, E>
    where
        A: Serialize + ?Sized,
        R: serde::de::DeserializeOwned,
        E: serde::de::DeserializeOwned,
    {
        let args = CLIENT_CODEC.encode(args);
        self.call_encoded(method, args, idempotent, std::convert::identity)
    }

    /// [`call`](Self::call) with the arguments already encoded (with
    /// [`Codec::Postcard`], the codec of typed clients), and the decoded
    /// result passed through `finish`. What the code of `#[service]` calls:
    /// the future it returns does not borrow the arguments. Not part of the
    /// stable API.
    #[doc(hidden)]
    pub fn call_encoded<R, E, T>(
        &self,
        method: &'static str,
        args: Result<Bytes, String>,
        idempotent: bool,
        finish: fn(R) -> T,
    ) -> impl Future<Output = Result<T, RpcError<E>>> + Send
    where
        R: serde::de::DeserializeOwned,
        E: serde::de::DeserializeOwned,
    {
        let codec = CLIENT_CODEC;
        let options = CallOptions {
            deadline: self.deadline,
            version: self.version,
            idempotent,
            codec,
        };
        // Combinators rather than an `async` block: the future is
        // `call_raw`'s and nothing more (a block would keep the arguments
        // and options beside it).
        let args = match args {
            Ok(args) => args,
            Err(e) => {
                return Either::Left(futures_util::future::lazy(|_| Err(RpcError::Decode(e))));
            }
        };
        // `call_inner` itself, its failures counted here: one combinator
        // less to poll than through `call_raw_with`.
        let counters = &self.rpc.inner.counters;
        let call = self.rpc.call_inner(
            &self.service,
            method,
            args,
            options,
            self.provider.as_ref(),
            self.name_ok,
        );
        Either::Right(call.map(move |r| match r {
            Ok(bytes) => codec.decode(&bytes).map(finish).map_err(RpcError::Decode),
            Err(e) => {
                counters.failures.fetch_add(1, Ordering::Relaxed);
                Err(match e.split_app() {
                    Ok(other) => other,
                    Err(bytes) => match codec.decode::<E>(&bytes) {
                        Ok(app) => RpcError::Application(app),
                        Err(why) => RpcError::Decode(why),
                    },
                })
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn id(n: u32) -> NodeId {
        NodeId::from_bytes(n.to_be_bytes().to_vec()).expect("a valid id")
    }

    /// `Listings::of` finds a node's entries by id whatever their key
    /// order (a member may list one node twice, say under upper-case hex),
    /// and nothing for a node not listed.
    #[test]
    fn listings_find_a_nodes_entries_by_id() {
        let listing = |node: u32, key: &str| Listing {
            node_id: id(node),
            key: Bytes::from(key.to_owned()),
            version: Stamp::default(),
            record: Arc::new(ServiceRecord {
                version: 1,
                methods: Vec::new(),
            }),
            expires_at_ms: None,
            stats: StatsCell::default(),
        };
        let listings = Listings::new(vec![
            listing(5, "a"),
            listing(2, "b"),
            listing(9, "c"),
            listing(2, "d"),
            listing(7, "e"),
        ]);
        let keys =
            |node: u32| -> Vec<Bytes> { listings.of(&id(node)).map(|l| l.key.clone()).collect() };
        assert_eq!(keys(2), ["b", "d"]);
        assert_eq!(keys(5), ["a"]);
        assert_eq!(keys(9), ["c"]);
        assert!(keys(1).is_empty() && keys(6).is_empty() && keys(10).is_empty());
        assert_eq!(listings.len(), 5, "derefs to the entries in key order");
        assert_eq!(listings[1].key, "b");
    }

    /// Only what was certainly not delivered is retried whatever the
    /// method; a route reported lost on the way may have delivered the call
    /// (a relay can pass it on and say so: audit round four ran every `add`
    /// twice), so only idempotent calls go elsewhere.
    #[test]
    fn a_route_lost_on_the_way_retries_idempotent_calls_only() {
        let d = Duration::from_secs(1);
        let retry = |e| attempt_error(e, d).1;
        assert_eq!(retry(ConcernsError::Unreachable(id(1))), Retry::Always);
        assert_eq!(retry(ConcernsError::NotConnected(id(1))), Retry::Always);
        assert_eq!(retry(ConcernsError::RouteLost(id(1))), Retry::IfIdempotent);
        assert_eq!(
            retry(ConcernsError::ConnectionLost(id(1))),
            Retry::IfIdempotent
        );
    }

    /// A method that never ends by itself.
    struct Forever;

    #[async_trait]
    impl Service for Forever {
        fn methods(&self) -> Vec<&'static str> {
            vec!["wait"]
        }
        async fn call(&self, _: &str, _: Codec, _: Bytes) -> Result<Bytes, ServiceError> {
            std::future::pending().await
        }
    }

    /// A server serving [`Forever`] as `forever`.
    fn forever_server() -> Arc<Server> {
        let server = Arc::new(Server::new(
            Duration::from_secs(10),
            Duration::from_secs(300),
        ));
        let served = Arc::new(Served::new(
            Arc::new(Forever),
            "forever".into(),
            vec!["wait"],
            1,
            Bytes::new(),
            16,
        ));
        server
            .served
            .write()
            .expect("not poisoned")
            .insert("forever".into(), served);
        server
    }

    /// Runs `forever.wait` for `caller` as call `call_id` until `stop`
    /// stops it, and gives its outcome's failure code.
    async fn stopped_call(
        caller: u32,
        call_id: u64,
        stop: impl FnOnce(&Server),
    ) -> Option<FailureCode> {
        let server = forever_server();
        let call = CallIn {
            call_id,
            service: Cow::Borrowed("forever"),
            method: Cow::Borrowed("wait"),
            args: Bytes::new(),
            codec: Codec::Json.to_wire(),
            budget_ms: 60_000,
            version: 0,
        };
        let caller = id(caller);
        let run = server.run(&caller, call);
        let mut run = std::pin::pin!(run);
        // Polled until it waits (registered among the running calls).
        assert!((&mut run).now_or_never().is_none());
        assert_eq!(lock(&server.running).waiting.len(), 1);
        stop(&server);
        let outcome = run.await;
        let running = lock(&server.running);
        assert!(running.waiting.is_empty() && running.left.is_empty());
        match outcome.into_outcome() {
            outcome::Result::Failure(f) => FailureCode::try_from(f.code).ok(),
            _ => None,
        }
    }

    /// A call stopped because its caller left is answered `Interrupted`
    /// (the caller retries an idempotent call elsewhere), not `Cancelled`:
    /// the answer may still reach the caller when this node cut the link,
    /// and the caller cancelled nothing. A Cancel from the caller is still
    /// `Cancelled` (it reaches nobody).
    #[tokio::test(start_paused = true)]
    async fn a_call_stopped_because_its_caller_left_is_interrupted_not_cancelled() {
        let left = stopped_call(1, 7, |s| s.caller_left(&id(1))).await;
        assert_eq!(left, Some(FailureCode::Interrupted));
        let cancelled = stopped_call(1, 7, |s| s.cancel(&id(1), 7)).await;
        assert_eq!(cancelled, Some(FailureCode::Cancelled));
        // Another caller leaving stops nothing: the call runs to its budget.
        let other = stopped_call(1, 7, |s| s.caller_left(&id(2))).await;
        assert_eq!(other, Some(FailureCode::Deadline));
    }

    /// A Cancel that comes before its call registers (handled on another
    /// worker during the call's first poll) still stops it; Cancels for
    /// calls that never register are forgotten after a while.
    #[test]
    fn a_cancel_before_its_call_registers_still_stops_it() {
        let mut calls = Calls::default();
        // Registered first: cancelled and gone.
        let waiting = CallCancel::new();
        calls.register((id(1), 7), &waiting);
        calls.cancel((id(1), 7));
        assert!(waiting.is_cancelled());
        assert!(calls.waiting.is_empty() && calls.early.is_empty());
        // Cancel first: the call is cancelled as it registers.
        calls.cancel((id(1), 8));
        let late = CallCancel::new();
        calls.register((id(1), 8), &late);
        assert!(late.is_cancelled());
        assert!(calls.early.is_empty());
        // Another caller's Cancel with the same call id stops nothing.
        calls.cancel((id(2), 9));
        let other = CallCancel::new();
        calls.register((id(1), 9), &other);
        assert!(!other.is_cancelled());
        // Remembered Cancels are bounded; the oldest go first.
        for caller in 10..10 + 2 * (EARLY_CANCELS / EARLY_CANCELS_PER_CALLER) as u32 {
            for n in 0..EARLY_CANCELS_PER_CALLER as u64 {
                calls.cancel((id(caller), n));
            }
        }
        assert_eq!(calls.early.len(), EARLY_CANCELS);
        let old = CallCancel::new();
        calls.register((id(10), 0), &old);
        assert!(!old.is_cancelled(), "a forgotten Cancel stopped a call");
        let recent = CallCancel::new();
        let last = 9 + 2 * (EARLY_CANCELS / EARLY_CANCELS_PER_CALLER) as u32;
        calls.register((id(last), 0), &recent);
        assert!(recent.is_cancelled());
    }

    /// One caller's stray Cancels (a member's, for calls that never come)
    /// push out its own remembered Cancels, not another caller's: an honest
    /// Cancel that overtook its call still stops it (hostile review, round
    /// seven: one list for all let them push it out, and the call ran to
    /// its deadline).
    #[test]
    fn stray_cancels_of_one_caller_do_not_push_out_anothers() {
        let mut calls = Calls::default();
        calls.cancel((id(1), 7));
        for n in 0..10 * EARLY_CANCELS as u64 {
            calls.cancel((id(2), n));
        }
        assert_eq!(calls.early.len(), 1 + EARLY_CANCELS_PER_CALLER);
        let honest = CallCancel::new();
        calls.register((id(1), 7), &honest);
        assert!(honest.is_cancelled(), "the honest Cancel was pushed out");
        // The member's latest are the ones kept.
        let member = CallCancel::new();
        calls.register((id(2), 10 * EARLY_CANCELS as u64 - 1), &member);
        assert!(member.is_cancelled());
    }

    /// Providers listed in bulk (any node can list some) do not grow the
    /// stats without bound; those with calls in flight are kept.
    #[test]
    fn provider_stats_stay_bounded() {
        let mut stats = HashMap::new();
        for n in 0..MAX_STATS as u32 {
            lock(&stats_cell(&mut stats, &id(n))).in_flight = u32::from(n % 100 == 0);
        }
        assert_eq!(stats.len(), MAX_STATS);
        lock(&stats_cell(&mut stats, &id(u32::MAX))).in_flight = 1;
        let busy = MAX_STATS.div_ceil(100);
        assert_eq!(stats.len(), busy + 1);
        assert!(stats.values().all(|c| lock(c).in_flight == 1));
        // A known provider's cell is the one its listings share.
        let cell = stats_cell(&mut stats, &id(0));
        lock(&cell).in_flight += 1;
        assert_eq!(lock(&stats_cell(&mut stats, &id(0))).in_flight, 2);
        assert!(Arc::ptr_eq(&cell, &stats[&id(0)]));
    }

    proptest! {
        #[test]
        fn a_call_is_encoded_as_prost_encodes_it(
            call_id in any::<u64>(),
            service in "[a-z.]{0,12}",
            method in "[a-z_]{0,12}",
            args in proptest::collection::vec(any::<u8>(), 0..200),
            codec in 0u32..3,
            budget_ms in prop_oneof![Just(0u64), any::<u64>()],
            version in prop_oneof![Just(0u32), any::<u32>()],
        ) {
            let args = Bytes::from(args);
            let ours = encode_call(&CallRef {
                call_id,
                service: &service,
                method: &method,
                args: &args,
                codec,
                budget_ms,
                version,
            });
            let theirs = proto::RpcMessage {
                body: Some(Body::Call(proto::Call {
                    call_id,
                    service,
                    method,
                    args,
                    codec,
                    budget_ms,
                    version,
                })),
            }
            .encode_to_vec();
            prop_assert_eq!(&ours, &theirs);
            // And read back in place as prost reads it.
            let payload = Bytes::from(ours);
            let by_prost = match proto::RpcMessage::decode(payload.clone()).unwrap().body {
                Some(Body::Call(c)) => CallIn::from(c),
                other => panic!("not a call: {other:?}"),
            };
            prop_assert_eq!(plain_call(&payload), Some(by_prost));
        }

        /// An outcome is encoded as prost encodes it, whatever it holds.
        #[test]
        fn an_outcome_is_encoded_as_prost_encodes_it(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            kind in 0u8..3,
        ) {
            let bytes = Bytes::from(bytes);
            let result = match kind {
                0 => outcome::Result::Ok(bytes),
                1 => outcome::Result::AppError(bytes),
                _ => failure(FailureCode::Internal, String::from_utf8_lossy(&bytes)),
            };
            let theirs = proto::RpcMessage {
                body: Some(Body::Outcome(proto::Outcome {
                    result: Some(result.clone()),
                })),
            }
            .encode_to_vec();
            prop_assert_eq!(&encode_outcome(result)[..], &theirs[..]);
        }

        /// An outcome read in place is what prost reads, and every plain
        /// result is read in place.
        #[test]
        fn the_plain_result_path_agrees_with_prost(
            ok in proptest::collection::vec(any::<u8>(), 0..200),
            noise in proptest::collection::vec(any::<u8>(), 0..16),
            plain in any::<bool>(),
        ) {
            let payload = if plain {
                proto::RpcMessage {
                    body: Some(Body::Outcome(proto::Outcome {
                        result: Some(outcome::Result::Ok(Bytes::from(ok.clone()))),
                    })),
                }
                .encode_to_vec()
            } else {
                noise
            };
            let payload = Bytes::from(payload);
            let ours = plain_ok(payload.clone()).ok();
            if plain {
                prop_assert_eq!(ours.as_deref(), Some(&ok[..]));
            }
            if let Some(ours) = ours {
                let by_prost = proto::RpcMessage::decode(payload.clone()).map(|m| m.body);
                prop_assert!(
                    matches!(
                        by_prost,
                        Ok(Some(Body::Outcome(proto::Outcome {
                            result: Some(outcome::Result::Ok(ref b)),
                        }))) if *b == ours
                    ),
                    "{by_prost:?} vs {ours:?}"
                );
            }
        }

        /// Whatever the in-place reading of a call reads, prost reads the
        /// same; it may only pass on (to prost) what it does not read.
        #[test]
        fn the_plain_call_path_agrees_with_prost(
            fields in proptest::collection::vec((prop_oneof![
                Just(0x08u8), Just(0x12), Just(0x1a), Just(0x22), Just(0x28), Just(0x30),
                Just(0x38), any::<u8>(),
            ], proptest::collection::vec(any::<u8>(), 0..12)), 0..8),
            first in prop_oneof![Just(0x0au8), any::<u8>()],
            slack in 0usize..2,
        ) {
            let fields: Vec<u8> = fields
                .into_iter()
                .flat_map(|(key, rest)| std::iter::once(key).chain(rest))
                .collect();
            let mut payload = vec![first];
            prost::encoding::encode_varint((fields.len() + slack) as u64, &mut payload);
            payload.extend_from_slice(&fields);
            let payload = Bytes::from(payload);
            if let Some(c) = plain_call(&payload) {
                let by_prost = proto::RpcMessage::decode(payload.clone()).map(|m| m.body);
                prop_assert!(
                    matches!(by_prost, Ok(Some(Body::Call(ref p))) if CallIn::from(p.clone()) == c),
                    "{by_prost:?} vs {c:?}"
                );
            }
        }
    }
}
/// The size of a call's future, which every spawned or pushed call
/// allocates: past about 1 KiB with its task's header, glibc's allocator
/// leaves its per-thread cache for a slower path (4-5% of a call's CPU in
/// `malloc_consolidate` when it was 2 KiB).
#[cfg(test)]
mod future_size {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn returned<T: 'static, R>(_f: impl Fn(&'static T) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    #[test]
    fn a_typed_call_future_leaves_room_under_a_kibibyte() {
        let typed = returned(|c: &'static Client| {
            c.call_encoded::<u8, u8, u8>("m", Ok(Bytes::new()), false, std::convert::identity)
        });
        // 800 bytes when written; a tokio or FuturesUnordered task adds
        // 64 to 128 bytes, and the caller's own future wraps it.
        assert!(typed <= 880, "a typed call's future is {typed} bytes");
    }
}
