//! An established connection: priority lanes out, a bounded queue in, one
//! reader task and one writer task.
//!
//! ```text
//!   send(msg, Control) ─┐                          ┌─► Ping → Pong (control lane)
//!   send(msg, Normal)  ─┼─► writer task ─► socket ─► reader task ─┼─► Pong → RTT
//!   send(msg, Bulk)    ─┘   (biased: control       (validates     └─► others → recv()
//!                            first, batches)        every frame)
//! ```
//!
//! The size of a message is checked on the caller's task, so a too-large one
//! fails at `send` with [`WireError::FrameTooLarge`](meshwork_wire::WireError).
//! The writer encodes queued messages straight into one batch buffer (no
//! allocation per message) and writes large Concern payloads from their own
//! buffer without copying them. The writer always takes the control lane first,
//! then normal, then bulk, so a Ping or a control message never waits behind
//! queued bulk frames (it can wait for the one frame being written at that
//! moment). A graceful close is the exception by design: it flushes every
//! queued frame first and writes the Disconnect last.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use futures_util::StreamExt;
use meshwork_wire::proto::{Disconnect, DisconnectReason, Hello, Ping, Pong};
use meshwork_wire::{FrameCodec, Message, NodeId, WireError};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use crate::handshake::{BoxRead, BoxWrite, Handshaken};
use crate::{Address, Config, TransportError};

/// Which outgoing lane a frame takes. Lower lanes are always served first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    /// Heartbeats, RPC replies, anything latency-critical: never queued
    /// behind frames of the other lanes. (The Disconnect of a graceful
    /// [`close`](ConnectionHandle::close) is deliberately written last, after
    /// everything already queued.)
    Control = 0,
    /// Ordinary traffic.
    Normal = 1,
    /// Large transfers that may wait (e.g. anti-entropy).
    Bulk = 2,
}

/// Takes a connection's incoming messages on its reader task, in order, in
/// place of [`Connection::recv`]; installed with [`Connection::deliver_to`].
///
/// Handing messages over on the reader saves a queue and a task switch per
/// message, which is most of the cost of a small request.
pub trait Deliver: Send + Sync + 'static {
    /// One message from the peer (never a Ping or a Pong; a Disconnect from
    /// the peer comes last). Runs on the connection's reader task: while it
    /// runs nothing more is read from this peer, so it must not block; hand
    /// slow work to another task.
    fn deliver(&self, conn: &ConnectionHandle, msg: Message);
}

/// Who opened the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The peer dialled us.
    Inbound,
    /// We dialled the peer.
    Outbound,
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// We closed it, and told the peer why.
    Local {
        /// The reason sent to the peer.
        reason: DisconnectReason,
        /// The text sent to the peer.
        message: String,
    },
    /// The peer sent a Disconnect.
    Remote {
        /// The reason the peer gave.
        reason: DisconnectReason,
        /// The peer's text.
        message: String,
    },
    /// The peer closed the stream without a Disconnect.
    Eof,
    /// Nothing arrived from the peer within the idle timeout.
    IdleTimeout,
    /// The socket took no bytes within the write timeout.
    WriteTimeout,
    /// The peer sent a frame we refused; we sent Disconnect(protocol error).
    Protocol(String),
    /// The stream failed.
    Io(String),
    /// The [`Connection`] was dropped without [`close`](ConnectionHandle::close).
    Dropped,
}

/// What is known about the other end once the handshake is done.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// Process-unique id of this connection.
    pub id: u64,
    /// The peer's node id (checked in the handshake).
    pub node_id: NodeId,
    /// The transport address of the other end of this stream.
    pub remote_addr: Address,
    /// Who dialled.
    pub direction: Direction,
    /// The peer's Hello: listen addresses, metadata, capabilities.
    pub hello: Hello,
}

/// Counters and timings of one connection.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectionStats {
    /// Frames written to the stream.
    pub frames_sent: u64,
    /// Bytes written to the stream, prefixes included.
    pub bytes_sent: u64,
    /// Frames read from the stream.
    pub frames_received: u64,
    /// Bytes read from the stream, prefixes included.
    pub bytes_received: u64,
    /// Round-trip time of the latest answered Ping.
    pub last_rtt: Option<Duration>,
    /// Smoothed round-trip time (EWMA, 1/8 weight for each new sample).
    pub smoothed_rtt: Option<Duration>,
    /// Time since the last frame from the peer.
    pub idle_for: Duration,
    /// Time since the handshake completed.
    pub age: Duration,
}

struct Shared {
    info: ConnectionInfo,
    lanes: [mpsc::Sender<Message>; 3],
    max_frame_len: usize,
    send_timeout: Duration,
    close_timeout: Duration,
    max_pings: usize,
    established: Instant,
    closing: AtomicBool,
    close_requested: CancellationToken,
    cancel: CancellationToken,
    reader_ended: CancellationToken,
    terminated: CancellationToken,
    tasks_alive: AtomicUsize,
    state: Mutex<CloseState>,
    frames_sent: AtomicU64,
    bytes_sent: AtomicU64,
    frames_received: AtomicU64,
    bytes_received: AtomicU64,
    last_received_nanos: AtomicU64,
    last_sent_nanos: AtomicU64,
    /// Set while the reader waits for room in the inbound queue: the peer is
    /// not silent, we are slow, so the idle timeout must not fire.
    reader_backpressured: AtomicBool,
    rtt: Mutex<(Option<Duration>, Option<Duration>)>,
    pings: Mutex<HashMap<u64, PendingPing>>,
    /// A sink from [`Connection::deliver_to`] with the inbound queue's
    /// receiver, for the reader to take over (it drains the queue first, so
    /// the order holds).
    handoff: Mutex<HandoffSlot>,
    handoff_ready: AtomicBool,
    handoff_notify: Notify,
    /// The peer's Disconnect when it found the inbound queue full: handed
    /// out after everything queued.
    last_word: Mutex<Option<Message>>,
}

type Handoff = (Arc<dyn Deliver>, mpsc::Receiver<Message>);

#[derive(Default)]
struct HandoffSlot {
    pending: Option<Handoff>,
    /// Set when the reader has ended: a late sink drains the queue itself.
    reader_done: bool,
}

/// Hands `sink` every message left in `queued`, in order, and the peer's
/// Disconnect if it did not fit in the queue.
fn drain_to(
    sink: &Arc<dyn Deliver>,
    queued: &mut mpsc::Receiver<Message>,
    conn: &ConnectionHandle,
) {
    while let Ok(msg) = queued.try_recv() {
        sink.deliver(conn, msg);
    }
    if let Some(msg) = lock(&conn.shared.last_word).take() {
        sink.deliver(conn, msg);
    }
}

#[derive(Default)]
struct CloseState {
    reason: Option<CloseReason>,
    disconnect: Option<Disconnect>,
    on_terminate: Option<Box<dyn FnOnce() + Send>>,
    terminated: bool,
}

struct PendingPing {
    sent: Instant,
    waiter: Option<oneshot::Sender<Duration>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Cuts a Disconnect text to the protocol's default limit, on a char boundary.
pub(crate) fn truncate_text(mut text: String) -> String {
    let max = meshwork_wire::Limits::default().max_text_len;
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

fn wall_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl Shared {
    fn nanos_since_start(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.established).as_nanos() as u64
    }

    fn since(&self, nanos: &AtomicU64, now: Instant) -> Duration {
        let then = Duration::from_nanos(nanos.load(Ordering::Relaxed));
        now.saturating_duration_since(self.established + then)
    }

    /// Records why the connection ends (the first reason wins) and asks the
    /// writer to flush, send `disconnect` if any, and close.
    fn request_close(&self, reason: CloseReason, disconnect: Option<Disconnect>) {
        {
            let mut state = lock(&self.state);
            if state.reason.is_none() {
                state.reason = Some(reason);
                state.disconnect = disconnect;
            }
        }
        self.closing.store(true, Ordering::Release);
        self.close_requested.cancel();
    }

    /// Ends the connection at once, without a Disconnect.
    fn abort(&self, reason: CloseReason) {
        {
            let mut state = lock(&self.state);
            if state.reason.is_none() {
                state.reason = Some(reason);
            }
        }
        self.closing.store(true, Ordering::Release);
        self.cancel.cancel();
    }

    fn task_ended(&self) {
        if self.tasks_alive.fetch_sub(1, Ordering::AcqRel) == 1 {
            let callback = {
                let mut state = lock(&self.state);
                state.terminated = true;
                state.on_terminate.take()
            };
            // Fail every waiting ping now rather than at its timeout.
            lock(&self.pings).clear();
            // The callback (e.g. leaving the endpoint's registry) runs before
            // waiters of `closed()` wake, so they see its effect.
            if let Some(callback) = callback {
                callback();
            }
            self.terminated.cancel();
        }
    }

    fn record_rtt(&self, sample: Duration) {
        let mut rtt = lock(&self.rtt);
        rtt.0 = Some(sample);
        rtt.1 = Some(match rtt.1 {
            None => sample,
            Some(old) => (old * 7 + sample) / 8,
        });
    }

    fn on_pong(&self, nonce: u64, now: Instant) {
        let pending = lock(&self.pings).remove(&nonce);
        if let Some(p) = pending {
            let sample = now.saturating_duration_since(p.sent);
            self.record_rtt(sample);
            if let Some(w) = p.waiter {
                let _ = w.send(sample);
            }
        }
    }

    /// Registers an outgoing ping; returns its nonce.
    fn new_ping(
        &self,
        now: Instant,
        waiter: Option<oneshot::Sender<Duration>>,
    ) -> Result<u64, TransportError> {
        let mut pings = lock(&self.pings);
        if pings.len() >= self.max_pings {
            return Err(TransportError::QueueFull("ping"));
        }
        let mut nonce: u64 = rand::random();
        while pings.contains_key(&nonce) {
            nonce = rand::random();
        }
        pings.insert(nonce, PendingPing { sent: now, waiter });
        Ok(nonce)
    }
}

/// A cheap, cloneable handle to send on and close a connection.
#[derive(Clone)]
pub struct ConnectionHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for ConnectionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionHandle")
            .field("id", &self.shared.info.id)
            .field("peer", &self.shared.info.node_id)
            .field("addr", &self.shared.info.remote_addr)
            .finish()
    }
}

impl ConnectionHandle {
    /// The peer and how we reached it.
    pub fn info(&self) -> &ConnectionInfo {
        &self.shared.info
    }

    /// The peer's node id.
    pub fn node_id(&self) -> &NodeId {
        &self.shared.info.node_id
    }

    /// Encodes `msg` and queues it on `priority`'s lane, waiting up to the send
    /// timeout for room.
    ///
    /// Returns once the frame is queued, not when it is written. Fails with
    /// [`TransportError::NotConnected`] once the connection is closing,
    /// [`TransportError::Wire`] for a message over the frame limit, and
    /// [`TransportError::Timeout`] if the lane stayed full.
    ///
    /// Cancel safety: dropping the future before it completes means the frame
    /// was not queued.
    pub async fn send(&self, msg: Message, priority: Priority) -> Result<(), TransportError> {
        self.check(&msg)?;
        let lane = &self.shared.lanes[priority as usize];
        match lane.try_send(msg) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(TransportError::NotConnected),
            Err(mpsc::error::TrySendError::Full(msg)) => {
                let timeout = self.shared.send_timeout;
                match tokio::time::timeout(timeout, lane.send(msg)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(TransportError::NotConnected),
                    Err(_) => Err(TransportError::Timeout {
                        what: "send queue",
                        after: timeout,
                    }),
                }
            }
        }
    }

    /// Like [`send`](Self::send) but never waits: a full lane is
    /// [`TransportError::QueueFull`].
    pub fn try_send(&self, msg: Message, priority: Priority) -> Result<(), TransportError> {
        self.check(&msg)?;
        match self.shared.lanes[priority as usize].try_send(msg) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(TransportError::NotConnected),
            Err(mpsc::error::TrySendError::Full(_)) => Err(TransportError::QueueFull("send")),
        }
    }

    /// Refuses messages once closing, and messages over the frame limit.
    fn check(&self, msg: &Message) -> Result<(), TransportError> {
        if self.shared.closing.load(Ordering::Acquire) {
            return Err(TransportError::NotConnected);
        }
        let len = msg.encoded_len();
        let max = self.shared.max_frame_len;
        if len > max {
            return Err(WireError::FrameTooLarge { len, max }.into());
        }
        Ok(())
    }

    /// Sends a Ping and waits for its Pong; returns the round-trip time.
    pub async fn ping(&self, timeout: Duration) -> Result<Duration, TransportError> {
        let (tx, rx) = oneshot::channel();
        let nonce = self.shared.new_ping(Instant::now(), Some(tx))?;
        let ping = Message::Ping(Ping {
            nonce,
            timestamp_micros: wall_micros(),
        });
        if let Err(e) = self.send(ping, Priority::Control).await {
            lock(&self.shared.pings).remove(&nonce);
            return Err(e);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(rtt)) => Ok(rtt),
            Ok(Err(_)) => Err(TransportError::NotConnected),
            Err(_) => {
                lock(&self.shared.pings).remove(&nonce);
                Err(TransportError::Timeout {
                    what: "ping",
                    after: timeout,
                })
            }
        }
    }

    /// Closes gracefully: frames already queued are written, then a
    /// Disconnect with `reason`, then the stream is shut down. Returns when
    /// both tasks have ended, at most the close timeout later.
    ///
    /// `message` is cut to 1024 bytes, the protocol's limit.
    pub async fn close(&self, reason: DisconnectReason, message: impl Into<String>) {
        self.close_with(Disconnect::new(reason, message.into()))
            .await;
    }

    /// Like [`close`](Self::close) with a whole Disconnect, e.g. one that
    /// carries `alternatives`: other peers the refused node may try (cut to
    /// the protocol's limit of 16, as the text is cut to 1024 bytes).
    pub async fn close_with(&self, mut disconnect: Disconnect) {
        disconnect.message = truncate_text(std::mem::take(&mut disconnect.message));
        // More than the protocol allows would make the peer refuse the frame.
        let max = meshwork_wire::Limits::default().max_alternatives;
        disconnect.alternatives.truncate(max);
        let reason = disconnect.reason_or_unspecified();
        self.shared.request_close(
            CloseReason::Local {
                reason,
                message: disconnect.message.clone(),
            },
            Some(disconnect),
        );
        let timeout = self.shared.close_timeout;
        if tokio::time::timeout(timeout, self.shared.terminated.cancelled())
            .await
            .is_err()
        {
            self.shared.cancel.cancel();
            self.shared.terminated.cancelled().await;
        }
    }

    /// Ends the connection at once, without a Disconnect.
    pub fn abort(&self) {
        self.shared.abort(CloseReason::Local {
            reason: DisconnectReason::Other,
            message: "aborted".into(),
        });
    }

    /// True once the connection is closing or closed.
    pub fn is_closed(&self) -> bool {
        self.shared.closing.load(Ordering::Acquire) || self.shared.terminated.is_cancelled()
    }

    /// Waits until both of the connection's tasks have ended.
    pub async fn closed(&self) {
        self.shared.terminated.cancelled().await;
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        lock(&self.shared.state).reason.clone()
    }

    /// Time since the last frame from the peer (any frame: traffic, Ping or
    /// Pong). Cheaper than [`stats`](Self::stats).
    pub fn idle_for(&self) -> Duration {
        self.shared
            .since(&self.shared.last_received_nanos, Instant::now())
    }

    /// A snapshot of counters and timings.
    pub fn stats(&self) -> ConnectionStats {
        let s = &self.shared;
        let now = Instant::now();
        let (last_rtt, smoothed_rtt) = *lock(&s.rtt);
        ConnectionStats {
            frames_sent: s.frames_sent.load(Ordering::Relaxed),
            bytes_sent: s.bytes_sent.load(Ordering::Relaxed),
            frames_received: s.frames_received.load(Ordering::Relaxed),
            bytes_received: s.bytes_received.load(Ordering::Relaxed),
            last_rtt,
            smoothed_rtt,
            idle_for: s.since(&s.last_received_nanos, now),
            age: now.saturating_duration_since(s.established),
        }
    }

    /// Runs `f` once, when the connection has fully ended.
    pub(crate) fn on_terminate(&self, f: impl FnOnce() + Send + 'static) {
        let mut state = lock(&self.shared.state);
        if state.terminated {
            drop(state);
            f();
        } else {
            state.on_terminate = Some(Box::new(f));
        }
    }
}

/// An established, checked connection to a peer.
///
/// Receive with [`recv`](Connection::recv); send and close through the
/// methods of [`ConnectionHandle`], which this derefs to and which can be
/// cloned and shared with other tasks.
///
/// Dropping the `Connection` aborts it (reason [`CloseReason::Dropped`]);
/// call [`close`](ConnectionHandle::close) first for a graceful goodbye.
pub struct Connection {
    handle: ConnectionHandle,
    inbound: Option<mpsc::Receiver<Message>>,
    /// Messages taken from `inbound` in one go, in reverse order.
    received: Vec<Message>,
}

/// Messages taken from the inbound queue at once by [`Connection::recv`].
const RECV_BATCH: usize = 16;

impl Drop for Connection {
    fn drop(&mut self) {
        // After `deliver_to` the connection lives on without its owner.
        if self.inbound.is_some() {
            self.handle.shared.abort(CloseReason::Dropped);
        }
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Connection").field(&self.handle).finish()
    }
}

impl std::ops::Deref for Connection {
    type Target = ConnectionHandle;

    fn deref(&self) -> &ConnectionHandle {
        &self.handle
    }
}

impl Connection {
    /// A handle for sending from other tasks.
    pub fn handle(&self) -> ConnectionHandle {
        self.handle.clone()
    }

    /// Waits for the next message from the peer.
    ///
    /// Pings and Pongs are answered and measured by the connection and never
    /// show here. A Disconnect from the peer is delivered once; after it, or
    /// after any other end, this returns [`TransportError::NotConnected`].
    ///
    /// Cancel safety: cancel-safe; no message is lost if the future is dropped.
    pub async fn recv(&mut self) -> Result<Message, TransportError> {
        if let Some(msg) = self.received.pop() {
            return Ok(msg);
        }
        let Some(inbound) = self.inbound.as_mut() else {
            return Err(TransportError::NotConnected);
        };
        // Taking several at once saves a synchronisation per message when
        // the peer is streaming.
        if inbound.recv_many(&mut self.received, RECV_BATCH).await == 0 {
            let last = lock(&self.handle.shared.last_word).take();
            return last.ok_or(TransportError::NotConnected);
        }
        self.received.reverse();
        self.received.pop().ok_or(TransportError::NotConnected)
    }

    /// Hands every message from now on to `sink`, called on the connection's
    /// reader task, instead of [`recv`](Self::recv): messages already queued
    /// first, then each as it is read, in order. (Messages an earlier `recv`
    /// had already taken from the queue are handed over by this call,
    /// before it returns.)
    ///
    /// The connection no longer has an owner: it lives until it is closed
    /// through a handle, by the peer, or by its endpoint's shutdown (not
    /// when the returned handle is dropped).
    pub fn deliver_to(mut self, sink: Arc<dyn Deliver>) -> ConnectionHandle {
        let handle = self.handle.clone();
        // Messages `recv` already took come before the queued ones.
        while let Some(msg) = self.received.pop() {
            sink.deliver(&handle, msg);
        }
        if let Some(mut inbound) = self.inbound.take() {
            let shared = &handle.shared;
            let mut slot = lock(&shared.handoff);
            if slot.reader_done {
                // Nothing more will be read: what is queued is all there is.
                drop(slot);
                drain_to(&sink, &mut inbound, &handle);
            } else {
                slot.pending = Some((sink, inbound));
                drop(slot);
                shared.handoff_ready.store(true, Ordering::Release);
                shared.handoff_notify.notify_one();
            }
        }
        handle
    }

    /// [`recv`](Self::recv) with a timeout.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<Message, TransportError> {
        match tokio::time::timeout(timeout, self.recv()).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::Timeout {
                what: "recv",
                after: timeout,
            }),
        }
    }

    /// Starts the reader and writer tasks for a handshaken stream.
    pub(crate) fn spawn(
        hs: Handshaken,
        id: u64,
        remote_addr: Address,
        direction: Direction,
        config: &Config,
        tracker: &tokio_util::task::TaskTracker,
        parent: &CancellationToken,
    ) -> Connection {
        let [c, n, b] = config.lane_capacity;
        let (control_tx, control_rx) = mpsc::channel(c);
        let (normal_tx, normal_rx) = mpsc::channel(n);
        let (bulk_tx, bulk_rx) = mpsc::channel(b);
        let (inbound_tx, inbound_rx) = mpsc::channel(config.inbound_capacity);
        let cancel = parent.child_token();
        let shared = Arc::new(Shared {
            info: ConnectionInfo {
                id,
                node_id: hs.node_id,
                remote_addr,
                direction,
                hello: hs.hello,
            },
            lanes: [control_tx, normal_tx, bulk_tx],
            max_frame_len: config.max_frame_len,
            send_timeout: config.send_timeout,
            close_timeout: config.close_timeout,
            max_pings: config.max_outstanding_pings,
            established: Instant::now(),
            closing: AtomicBool::new(false),
            close_requested: CancellationToken::new(),
            cancel: cancel.clone(),
            reader_ended: CancellationToken::new(),
            terminated: CancellationToken::new(),
            tasks_alive: AtomicUsize::new(2),
            state: Mutex::new(CloseState::default()),
            frames_sent: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            frames_received: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            last_received_nanos: AtomicU64::new(0),
            last_sent_nanos: AtomicU64::new(0),
            reader_backpressured: AtomicBool::new(false),
            rtt: Mutex::new((None, None)),
            pings: Mutex::new(HashMap::new()),
            handoff: Mutex::new(HandoffSlot::default()),
            handoff_ready: AtomicBool::new(false),
            handoff_notify: Notify::new(),
            last_word: Mutex::new(None),
        });
        let span = info_span!(
            "conn",
            id,
            peer = %shared.info.node_id.short(),
            addr = %shared.info.remote_addr,
            dir = ?direction,
        );
        let writer = Writer {
            shared: shared.clone(),
            io: hs.writer,
            lanes: [control_rx, normal_rx, bulk_rx],
            keepalive: config.keepalive_interval,
            idle_timeout: config.idle_timeout,
            write_timeout: config.write_timeout,
            close_timeout: config.close_timeout,
            buf: BytesMut::new(),
            batch: Vec::new(),
        };
        tracker.spawn(writer.run().instrument(span.clone()));
        tracker.spawn(read_loop(shared.clone(), hs.reader, inbound_tx).instrument(span));
        debug!(id, peer = %shared.info.node_id.short(), "connection established");
        Connection {
            handle: ConnectionHandle { shared },
            inbound: Some(inbound_rx),
            received: Vec::new(),
        }
    }
}

/// Bytes gathered before a write; small frames are encoded into one buffer.
const WRITE_BATCH: usize = 256 * 1024;
/// Concern payloads at least this large are written from their own buffer.
const DIRECT_WRITE: usize = 32 * 1024;
/// A batch buffer that grew beyond this is released after its write.
const KEEP_WRITE_BUFFER: usize = 16 * 1024;
/// An empty read buffer that grew beyond this is replaced by a small one.
const KEEP_READ_BUFFER: usize = 16 * 1024;

struct Writer {
    shared: Arc<Shared>,
    io: BoxWrite,
    lanes: [mpsc::Receiver<Message>; 3],
    keepalive: Option<Duration>,
    idle_timeout: Option<Duration>,
    write_timeout: Duration,
    close_timeout: Duration,
    buf: BytesMut,
    batch: Vec<Message>,
}

enum WriteOutcome {
    Ok,
    Cancelled,
    Failed(CloseReason),
}

impl Writer {
    async fn run(mut self) {
        let shared = self.shared.clone();
        let tick_every = match (self.keepalive, self.idle_timeout) {
            (Some(k), Some(i)) => Some(k.min(i / 2)),
            (Some(k), None) => Some(k),
            (None, Some(i)) => Some(i / 2),
            (None, None) => None,
        };
        // With keepalive and idle timeout both off the timer still exists but
        // fires once a day and finds nothing to do.
        let period = tick_every.unwrap_or(Duration::from_secs(24 * 3600));
        let mut tick = tokio::time::interval_at(Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let cancelled = shared.cancel.cancelled();
        let close_requested = shared.close_requested.cancelled();
        tokio::pin!(cancelled, close_requested);
        let graceful = loop {
            let [control, normal, bulk] = &mut self.lanes;
            let first = tokio::select! {
                biased;
                _ = &mut cancelled => break false,
                _ = &mut close_requested => break true,
                // Before the lanes: a busy stream must not starve the
                // keepalive and idle checks. It is ready only when due.
                _ = tick.tick() => {
                    match self.keepalive_tick() {
                        Some(ping) => ping,
                        None => continue,
                    }
                }
                Some(m) = control.recv() => m,
                Some(m) = normal.recv() => m,
                Some(m) = bulk.recv() => m,
            };
            self.batch.push(first);
            self.fill_batch();
            match self.write_batch().await {
                WriteOutcome::Ok => {}
                WriteOutcome::Cancelled => break false,
                WriteOutcome::Failed(r) => {
                    shared.abort(r);
                    break false;
                }
            }
        };
        if graceful {
            let close_timeout = self.close_timeout;
            let _ = tokio::time::timeout(close_timeout, self.finish()).await;
        }
        // Stop the reader (if the peer did not close first) and end.
        shared.cancel.cancel();
        drop(self);
        shared.task_ended();
    }

    /// Adds queued messages to the batch, control lane first, up to
    /// [`WRITE_BATCH`] bytes.
    fn fill_batch(&mut self) {
        let mut size: usize = self.batch.iter().map(Message::encoded_len).sum();
        while size < WRITE_BATCH {
            match self.next_ready() {
                Some(m) => {
                    size += m.encoded_len();
                    self.batch.push(m);
                }
                None => break,
            }
        }
    }

    /// Takes the next queued message, control lane first.
    fn next_ready(&mut self) -> Option<Message> {
        self.lanes.iter_mut().find_map(|lane| lane.try_recv().ok())
    }

    /// Graceful end: flush what is queued, send the Disconnect, shut the
    /// stream down, and give the peer a moment to close its side.
    async fn finish(&mut self) {
        while let Some(m) = self.next_ready() {
            self.batch.push(m);
        }
        let disconnect = lock(&self.shared.state).disconnect.take();
        if let Some(d) = disconnect {
            self.batch.push(Message::Disconnect(d));
        }
        if !matches!(self.write_batch().await, WriteOutcome::Ok) {
            return;
        }
        let _ = self.io.shutdown().await;
        tokio::select! {
            _ = self.shared.reader_ended.cancelled() => {}
            _ = self.shared.cancel.cancelled() => {}
        }
    }

    /// Sends a Ping when the link has been quiet, and closes it when the peer
    /// has been silent too long. Returns a Ping to write, if one is due.
    fn keepalive_tick(&mut self) -> Option<Message> {
        let shared = &self.shared;
        let now = Instant::now();
        if let Some(idle) = self.idle_timeout {
            if shared.reader_backpressured.load(Ordering::Relaxed) {
                // Our consumer is behind; the peer is not the one idling.
                let nanos = shared.nanos_since_start(now);
                shared.last_received_nanos.store(nanos, Ordering::Relaxed);
            } else if shared.since(&shared.last_received_nanos, now) >= idle {
                warn!(?idle, "peer silent for too long; closing");
                shared.request_close(
                    CloseReason::IdleTimeout,
                    Some(Disconnect::new(
                        DisconnectReason::Timeout,
                        format!("nothing received for {idle:?}"),
                    )),
                );
                return None;
            }
            // Forget pings that will never be answered.
            lock(&shared.pings).retain(|_, p| now.saturating_duration_since(p.sent) < idle);
        }
        let interval = self.keepalive?;
        if shared.since(&shared.last_sent_nanos, now) < interval {
            return None;
        }
        let nonce = shared.new_ping(now, None).ok()?;
        Some(Message::Ping(Ping {
            nonce,
            timestamp_micros: wall_micros(),
        }))
    }

    /// Encodes and writes the batch, then empties it.
    async fn write_batch(&mut self) -> WriteOutcome {
        let shared = self.shared.clone();
        let count = self.batch.len() as u64;
        let result = {
            let (io, buf, batch) = (&mut self.io, &mut self.buf, &mut self.batch);
            let write = async {
                let mut total = 0u64;
                for msg in batch.drain(..) {
                    let before = buf.len();
                    let direct = meshwork_wire::encode_frame_into(&msg, buf, DIRECT_WRITE);
                    total += (buf.len() - before) as u64;
                    if let Some(payload) = direct {
                        total += payload.len() as u64;
                        io.write_all(buf).await?;
                        buf.clear();
                        io.write_all(&payload).await?;
                    }
                }
                if !buf.is_empty() {
                    io.write_all(buf).await?;
                    buf.clear();
                }
                io.flush().await.map(|()| total)
            };
            tokio::pin!(write);
            // Most writes complete at once: only arm the timer when one waits.
            match futures_util::FutureExt::now_or_never(write.as_mut()) {
                Some(r) => Ok(r),
                None => tokio::select! {
                    biased;
                    _ = shared.cancel.cancelled() => Err(None),
                    r = tokio::time::timeout(self.write_timeout, write) => r.map_err(|_| Some(())),
                },
            }
        };
        self.batch.clear();
        let mut total = 0;
        let outcome = match result {
            Ok(Ok(bytes)) => {
                total = bytes;
                WriteOutcome::Ok
            }
            Ok(Err(e)) => WriteOutcome::Failed(CloseReason::Io(e.to_string())),
            Err(None) => WriteOutcome::Cancelled,
            Err(Some(())) => WriteOutcome::Failed(CloseReason::WriteTimeout),
        };
        if matches!(outcome, WriteOutcome::Ok) {
            shared.frames_sent.fetch_add(count, Ordering::Relaxed);
            shared.bytes_sent.fetch_add(total, Ordering::Relaxed);
            let now = shared.nanos_since_start(Instant::now());
            shared.last_sent_nanos.store(now, Ordering::Relaxed);
        } else {
            self.buf.clear();
        }
        // An idle connection should not keep a big batch buffer around.
        if self.buf.capacity() > KEEP_WRITE_BUFFER {
            self.buf = BytesMut::new();
        }
        outcome
    }
}

/// Where the reader puts what it reads: the inbound queue until a
/// [`Deliver`] sink takes over.
struct Inlet {
    queue: Option<mpsc::Sender<Message>>,
    sink: Option<Arc<dyn Deliver>>,
    handle: ConnectionHandle,
    delivered_to_nobody: bool,
}

impl Inlet {
    /// Takes over a sink from [`Connection::deliver_to`], if one is waiting:
    /// hands it what is still queued (only the reader fills the queue, so
    /// nothing can overtake), then drops the queue.
    fn take_handoff(&mut self) {
        let shared = &self.handle.shared;
        if self.sink.is_some() || !shared.handoff_ready.load(Ordering::Acquire) {
            return;
        }
        let Some((sink, mut queued)) = lock(&shared.handoff).pending.take() else {
            return;
        };
        drain_to(&sink, &mut queued, &self.handle);
        self.queue = None;
        self.sink = Some(sink);
    }

    /// The reader has ended: a sink that arrived meanwhile still gets what
    /// was queued, and a later one will drain the queue itself.
    fn close(mut self) {
        let pending = {
            let mut slot = lock(&self.handle.shared.handoff);
            slot.reader_done = true;
            slot.pending.take()
        };
        if let Some((sink, mut queued)) = pending {
            drain_to(&sink, &mut queued, &self.handle);
        }
        self.queue = None;
    }

    /// Passes `msg` on; waits (or takes a sink over) while the queue is full.
    /// `Err` when the connection was cancelled meanwhile.
    async fn put(&mut self, msg: Message, cancelled: &CancellationToken) -> Result<(), ()> {
        let mut msg = msg;
        loop {
            self.take_handoff();
            if let Some(sink) = &self.sink {
                sink.deliver(&self.handle, msg);
                return Ok(());
            }
            let Some(queue) = self.queue.clone() else {
                return Ok(());
            };
            let sent = match queue.try_send(msg) {
                Ok(()) => Ok(()),
                Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
                Err(mpsc::error::TrySendError::Full(full)) => {
                    let shared = &self.handle.shared;
                    shared.reader_backpressured.store(true, Ordering::Relaxed);
                    let room = tokio::select! {
                        biased;
                        _ = cancelled.cancelled() => None,
                        permit = queue.reserve() => Some(permit.map_err(|_| ())),
                        _ = shared.handoff_notify.notified() => {
                            // A sink arrived: go round and hand it over.
                            shared.reader_backpressured.store(false, Ordering::Relaxed);
                            msg = full;
                            continue;
                        }
                    };
                    shared.reader_backpressured.store(false, Ordering::Relaxed);
                    match room {
                        None => return Err(()),
                        Some(Ok(permit)) => {
                            permit.send(full);
                            Ok(())
                        }
                        Some(Err(())) => Err(()),
                    }
                }
            };
            if sent.is_err() && !self.delivered_to_nobody {
                self.delivered_to_nobody = true;
                debug!("receiver dropped; discarding incoming messages");
            }
            return Ok(());
        }
    }
}

async fn read_loop(
    shared: Arc<Shared>,
    mut reader: FramedRead<BoxRead, FrameCodec>,
    inbound: mpsc::Sender<Message>,
) {
    let mut inlet = Inlet {
        queue: Some(inbound),
        sink: None,
        handle: ConnectionHandle {
            shared: shared.clone(),
        },
        delivered_to_nobody: false,
    };
    let cancelled = shared.cancel.cancelled();
    tokio::pin!(cancelled);
    // Set after a large frame: the read buffer (even when empty) may still
    // share that frame's allocation.
    let mut large_frame_seen = false;
    loop {
        // The fast path below never waits, so it must not be where a
        // streaming peer keeps an aborted connection's reader alive.
        if shared.cancel.is_cancelled() {
            break;
        }
        // While data keeps coming, read on; just before waiting for more, drop
        // a read buffer that a large frame left behind, so an idle connection
        // stays small without costing a reallocation per frame when busy.
        let next = match futures_util::FutureExt::now_or_never(reader.next()) {
            Some(next) => next,
            None => {
                let buf = reader.read_buffer_mut();
                if buf.is_empty() && (large_frame_seen || buf.capacity() > KEEP_READ_BUFFER) {
                    *buf = BytesMut::with_capacity(crate::handshake::READ_BUFFER);
                    large_frame_seen = false;
                }
                tokio::select! {
                    biased;
                    _ = &mut cancelled => break,
                    // A sink waiting to take over gets the queued messages
                    // now, not with the next frame.
                    _ = shared.handoff_notify.notified(), if inlet.sink.is_none() => {
                        inlet.take_handoff();
                        continue;
                    }
                    next = reader.next() => next,
                }
            }
        };
        let msg = match next {
            None => {
                shared.abort(CloseReason::Eof);
                break;
            }
            Some(Err(WireError::Io(e))) => {
                shared.abort(CloseReason::Io(e.to_string()));
                break;
            }
            Some(Err(e)) => {
                warn!(error = %e, "refusing frame from peer");
                shared.request_close(
                    CloseReason::Protocol(e.to_string()),
                    Some(Disconnect::new(
                        DisconnectReason::ProtocolError,
                        e.to_string(),
                    )),
                );
                break;
            }
            Some(Ok(msg)) => msg,
        };
        let now = Instant::now();
        shared.frames_received.fetch_add(1, Ordering::Relaxed);
        let decoded = reader.decoder().decoded_bytes();
        let frame_len = decoded - shared.bytes_received.swap(decoded, Ordering::Relaxed);
        large_frame_seen |= frame_len as usize > KEEP_READ_BUFFER;
        shared
            .last_received_nanos
            .store(shared.nanos_since_start(now), Ordering::Relaxed);
        match msg {
            Message::Ping(p) => {
                let pong = Message::Pong(Pong {
                    nonce: p.nonce,
                    timestamp_micros: wall_micros(),
                });
                // A full control lane means we are already busy answering;
                // the peer will ping again.
                let _ = shared.lanes[0].try_send(pong);
            }
            Message::Pong(p) => shared.on_pong(p.nonce, now),
            Message::Disconnect(d) => {
                debug!(reason = ?d.reason_or_unspecified(), message = %d.message, "peer disconnected");
                shared.abort(CloseReason::Remote {
                    reason: d.reason_or_unspecified(),
                    message: d.message.clone(),
                });
                inlet.take_handoff();
                match (&inlet.sink, &inlet.queue) {
                    (Some(sink), _) => sink.deliver(&inlet.handle, Message::Disconnect(d)),
                    (None, Some(queue)) => {
                        if let Err(mpsc::error::TrySendError::Full(msg)) =
                            queue.try_send(Message::Disconnect(d))
                        {
                            // Kept aside, so that it still comes last.
                            *lock(&shared.last_word) = Some(msg);
                        }
                    }
                    (None, None) => {}
                }
                break;
            }
            Message::Hello(_) => {
                let e = "hello after the handshake";
                shared.request_close(
                    CloseReason::Protocol(e.into()),
                    Some(Disconnect::new(DisconnectReason::ProtocolError, e)),
                );
                break;
            }
            msg => {
                if inlet.put(msg, &shared.cancel).await.is_err() {
                    break;
                }
            }
        }
    }
    inlet.close();
    shared.reader_ended.cancel();
    shared.task_ended();
}
