//! An established connection: priority lanes out, a bounded queue in, a
//! reader and a writer run by one task.
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
//!
//! The reader and the writer are two futures on one task ([`Both`], each
//! polled only when woken), as a hand-written echo server does both
//! directions on one task: they never run at once on two worker threads,
//! so they never wait for each other on the socket's lock in the kernel,
//! and a send that wakes the writer does not wake a second worker.
//!
//! Shortcuts past the lanes: a control or normal frame sent while the lanes
//! are empty is encoded into the write half at once (behind nothing, so it
//! overtakes nothing), up to 256 KiB pending, and the writer task is woken
//! to write it with whatever else gathers meanwhile. While the reader hands
//! a burst of frames to a [`Deliver`] sink, such frames (typically answers
//! computed right on the reader) are left for the reader, which writes them
//! all in one go when it pauses: an echo-like exchange then costs no task
//! switch on the answering side. And a lone message sent with
//! [`send_eager`](ConnectionHandle::send_eager) on a quiet connection is
//! written by its sender.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::StreamExt;
use meshwork_wire::proto::{Disconnect, DisconnectReason, Hello, PeerCount, Ping, Pong};
use meshwork_wire::{FrameCodec, Message, NodeId, WireError};
use tokio::io::AsyncWrite;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use crate::both::Both;
use crate::handshake::{BoxRead, BoxWrite, Handshaken};
use crate::loglimit::LogLimit;
use crate::{Address, Config, TransportError, lock};

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

/// How a message that may skip the lanes is written (see
/// [`Shared::try_direct`]).
#[derive(Debug, Clone, Copy)]
enum Haste {
    /// By the writer task, gathered with whatever else is sent meanwhile
    /// (or by the reader, with its answers, while it is corked).
    Gather,
    /// By its sender, at once, when the connection is quiet: dated with
    /// the clock reading given (one the sender just took), else a fresh one.
    Eager(Option<Instant>),
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
    /// Round-trip time of the latest answered Ping; before the first, the
    /// round trip measured in the handshake (by both sides with Noise, by
    /// the dialling side in plaintext).
    pub last_rtt: Option<Duration>,
    /// Smoothed round-trip time (EWMA, 1/8 weight for each new sample).
    pub smoothed_rtt: Option<Duration>,
    /// Time since the last frame from the peer.
    pub idle_for: Duration,
    /// Time since the handshake completed.
    pub age: Duration,
    /// Messages waiting to be written: on the send lanes, or waiting for
    /// room on one.
    pub queued: usize,
    /// Bytes of the large messages (4 KiB or more) on the send lanes, of
    /// at most `Config::with_max_queued_bytes`.
    pub queued_bytes: usize,
}

/// Messages at least this large count against a connection's queued-bytes
/// budget; smaller ones are bounded by the lanes' lengths alone.
const COUNTED_FRAME: usize = 4096;

struct Shared {
    info: ConnectionInfo,
    lanes: [mpsc::Sender<Message>; 3],
    /// Bytes of large messages on the lanes (see [`COUNTED_FRAME`]).
    queued_bytes: AtomicUsize,
    max_queued_bytes: usize,
    /// Notified when the writer takes large messages off the lanes, and
    /// when the connection ends.
    room: Notify,
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
    /// The stream's write side, shared by the writer task and direct
    /// senders.
    write: Mutex<WriteHalf>,
    /// Wakes the writer task to finish bytes a sender left pending.
    write_kick: Notify,
    /// Messages on the lanes not yet encoded by the writer task: while there
    /// are any, a sender may not write directly (it would overtake them).
    queued: AtomicUsize,
    /// Set while the reader handles a burst of frames (at most
    /// [`CORK_FRAMES`]): what is sent meanwhile, typically answers a handler
    /// gave right on the reader, is gathered in the write half, and the
    /// reader writes it all when it pauses.
    corked: AtomicBool,
    /// The peer count our Pongs carry, the endpoint's.
    own_count: OwnCount,
}

type Handoff = (Arc<dyn Deliver>, mpsc::Receiver<Message>);

#[derive(Default)]
struct HandoffSlot {
    pending: Option<Handoff>,
    /// Set when the reader has ended: a late sink drains the queue itself.
    reader_done: bool,
}

impl HandoffSlot {
    /// The reader has ended: marks it so, and gives back a sink still
    /// waiting for the hand-off, with its queue.
    fn reader_ended(slot: &Mutex<HandoffSlot>) -> Option<Handoff> {
        let mut slot = lock(slot);
        slot.reader_done = true;
        slot.pending.take()
    }
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
    /// Told the round trip and the peer count the Pong carried.
    waiter: Option<oneshot::Sender<(Duration, Option<PeerCount>)>>,
}

/// What a connection takes from its endpoint: the settings, the task
/// tracker and cancellation token its tasks run under, and the peer count
/// its Pongs carry.
pub(crate) struct Home<'a> {
    pub(crate) config: &'a Config,
    pub(crate) tracker: &'a tokio_util::task::TaskTracker,
    pub(crate) parent: &'a CancellationToken,
    pub(crate) own_count: &'a OwnCount,
}

/// The peer count this node tells its peers (see
/// [`Endpoint::set_peer_count`](crate::Endpoint::set_peer_count)): set by
/// the endpoint's owner, read for every Hello and every Pong sent.
pub(crate) type OwnCount = Arc<Mutex<Option<PeerCount>>>;

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

    /// The clock now, as [`nanos_since_start`](Self::nanos_since_start).
    fn nanos_now(&self) -> u64 {
        self.nanos_since_start(Instant::now())
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

    /// Drops the stream's write half (handles may outlive the connection),
    /// which the peer sees as the end of the stream, and wakes senders
    /// waiting for queued bytes to find the connection gone.
    fn drop_write_half(&self) {
        let io = {
            let mut w = lock(&self.write);
            w.failed = true;
            w.pending.clear();
            std::mem::replace(&mut w.io, Box::new(tokio::io::sink()))
        };
        drop(io);
        self.room.notify_waiters();
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

    fn on_pong(&self, pong: &Pong, now: Instant) {
        let pending = lock(&self.pings).remove(&pong.nonce);
        if let Some(p) = pending {
            let sample = now.saturating_duration_since(p.sent);
            self.record_rtt(sample);
            if let Some(w) = p.waiter {
                let _ = w.send((sample, pong.peer_count));
            }
        }
    }

    /// Registers an outgoing ping; returns its nonce.
    fn new_ping(
        &self,
        now: Instant,
        waiter: Option<oneshot::Sender<(Duration, Option<PeerCount>)>>,
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

/// Held by each half of a connection's task (the reader, the writer): if
/// the half's future is dropped before it finished (made with the future,
/// so even one never polled), as when either half panics (they share one
/// task) or a runtime shuts down, the connection
/// still ends as a finished half would end it: closed with a reason, the
/// reader's end signalled, the stream's write half dropped (the peer sees
/// the end of the stream), and the half counted as ended, so `closed()`
/// returns and the endpoint forgets the connection instead of keeping it
/// half alive.
struct HalfGuard {
    shared: Arc<Shared>,
    reader: bool,
    /// Cleared by a half that ends normally (it does all this itself).
    armed: bool,
}

impl Drop for HalfGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let shared = &self.shared;
        shared.abort(CloseReason::Io(
            "the connection's task stopped before the connection ended".into(),
        ));
        if self.reader {
            // A sink handed over later gets what is queued at once; one
            // waiting for the hand-off now is let go with its queue (not
            // called: this may run while a panic unwinds).
            drop(HandoffSlot::reader_ended(&shared.handoff));
            shared.reader_ended.cancel();
        } else {
            shared.drop_write_half();
        }
        shared.task_ended();
    }
}

/// Gives back the queued bytes a waiting sender took, unless its message
/// made it onto its lane (`len` 0).
struct Reserved<'a> {
    shared: &'a Shared,
    len: usize,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if self.len > 0 {
            self.shared.release_bytes(self.len);
        }
    }
}

/// Takes a message waiting for room back out of [`Shared::queued`] unless it
/// made it onto its lane. A count left behind would keep every later sender
/// off the direct path for good.
struct Uncount<'a> {
    queued: &'a AtomicUsize,
    armed: bool,
}

impl Drop for Uncount<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
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
    pub fn send(
        &self,
        msg: Message,
        priority: Priority,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        // Not an `async fn` forwarding to `send_inner`: each such layer
        // stores the message again in the future, which every caller's
        // future then carries.
        self.send_inner(msg, priority, false)
    }

    /// [`send`](Self::send) for a lone, latency-bound message (a request
    /// with nothing else in flight): when the connection is quiet (nothing
    /// queued or being written) the frame is written from the calling task
    /// at once instead of by the connection's writer task, which saves a
    /// task wake-up per message (on loopback about 0.7 µs of a 5 µs round
    /// trip). Otherwise, and for [`Priority::Bulk`], it is exactly `send`.
    ///
    /// Not for streams of messages: each would be its own write call,
    /// where `send` lets the writer gather them into one.
    pub fn send_eager(
        &self,
        msg: Message,
        priority: Priority,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.send_inner(msg, priority, true)
    }

    #[allow(clippy::manual_async_fn)] // an async block on purpose: see the comment inside
    fn send_inner(
        &self,
        msg: Message,
        priority: Priority,
        eager: bool,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        // An `async move` block rather than an `async fn`, whose arguments
        // are stored twice in its future (once as passed, once moved into
        // the body); nothing happens before the first poll either way.
        let haste = if eager {
            Haste::Eager(None)
        } else {
            Haste::Gather
        };
        async move {
            match self.try_push(msg, priority, haste)? {
                None => Ok(()),
                // Boxed: the wait (a timer and a queue slot) would otherwise
                // make every caller's future larger, full lane or not.
                Some((msg, len)) => Box::pin(self.wait_send(msg, priority, len)).await,
            }
        }
    }

    /// [`send`](Self::send) when the lane (or, for a large message, the
    /// queued-bytes budget) is full: waits for room, up to the send timeout.
    async fn wait_send(
        &self,
        msg: Message,
        priority: Priority,
        len: usize,
    ) -> Result<(), TransportError> {
        let shared = &self.shared;
        let timeout = shared.send_timeout;
        let deadline = Instant::now() + timeout;
        let timed_out = || TransportError::Timeout {
            what: "send queue",
            after: timeout,
        };
        let lane = &shared.lanes[priority as usize];
        // Counted while it waits, so no direct write overtakes it; uncounted
        // again unless it made it onto the lane (where the writer uncounts
        // it): when the wait fails, and when the caller drops this future.
        shared.queued.fetch_add(1, Ordering::AcqRel);
        let mut waiting = Uncount {
            queued: &shared.queued,
            armed: true,
        };
        let mut bytes = Reserved { shared, len: 0 };
        while !shared.reserve_bytes(len) {
            let room = shared.room.notified();
            tokio::pin!(room);
            // Registered before the check: a release in between wakes it.
            room.as_mut().enable();
            if shared.closing.load(Ordering::Acquire) || shared.cancel.is_cancelled() {
                return Err(TransportError::NotConnected);
            }
            if shared.reserve_bytes(len) {
                break;
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return Err(timed_out());
            }
        }
        bytes.len = len;
        let r = tokio::time::timeout_at(deadline, lane.send(msg)).await;
        let sent = matches!(r, Ok(Ok(())));
        waiting.armed = !sent;
        drop(waiting);
        if sent {
            // On the lane now: the writer gives the bytes back.
            bytes.len = 0;
        }
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(TransportError::NotConnected),
            Err(_) => Err(timed_out()),
        }
    }

    /// Like [`send`](Self::send) but never waits: a full lane is
    /// [`TransportError::QueueFull`].
    pub fn try_send(&self, msg: Message, priority: Priority) -> Result<(), TransportError> {
        match self.try_push(msg, priority, Haste::Gather)? {
            None => Ok(()),
            Some(_) => Err(TransportError::QueueFull("send")),
        }
    }

    /// [`send`](Self::send) (or [`send_eager`](Self::send_eager) when
    /// `eager` is given) as far as it goes without waiting: `Ok(None)` when
    /// the message was taken, `Ok(Some(msg))`, the message given back and
    /// nothing queued, when its lane is full. The caller can then wait with
    /// `send`, and keeps the waiting machinery out of its own future unless
    /// it needs it.
    ///
    /// `eager` is a reading of the clock the caller has just taken (e.g.
    /// for the deadline of the request it sends): a frame written at once
    /// is dated with it, for the keepalive, instead of reading the clock
    /// again. It must be fresh: a stale one would let the keepalive think
    /// the link was quiet for longer than it was.
    pub fn offer(
        &self,
        msg: Message,
        priority: Priority,
        eager: Option<Instant>,
    ) -> Result<Option<Message>, TransportError> {
        let haste = eager.map_or(Haste::Gather, |now| Haste::Eager(Some(now)));
        Ok(self.try_push(msg, priority, haste)?.map(|(msg, _)| msg))
    }

    /// [`offer`](Self::offer), giving back the encoded length with the
    /// message, for the wait that follows.
    fn try_push(
        &self,
        msg: Message,
        priority: Priority,
        haste: Haste,
    ) -> Result<Option<(Message, usize)>, TransportError> {
        let len = self.check(&msg)?;
        match self.shared.push(msg, priority, haste, len) {
            Ok(()) => Ok(None),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(TransportError::NotConnected),
            Err(mpsc::error::TrySendError::Full(msg)) => Ok(Some((msg, len))),
        }
    }

    /// Refuses messages once closing, and messages over the frame limit;
    /// the encoded length otherwise.
    fn check(&self, msg: &Message) -> Result<usize, TransportError> {
        if self.shared.closing.load(Ordering::Acquire) {
            return Err(TransportError::NotConnected);
        }
        let len = meshwork_wire::encoded_len(msg);
        let max = self.shared.max_frame_len;
        if len > max {
            return Err(WireError::FrameTooLarge { len, max }.into());
        }
        Ok(len)
    }

    /// Sends a Ping and waits for its Pong; returns the round-trip time.
    pub async fn ping(&self, timeout: Duration) -> Result<Duration, TransportError> {
        self.ping_for_count(timeout).await.map(|(rtt, _)| rtt)
    }

    /// [`ping`](Self::ping), with the peer count the Pong carried, if any:
    /// how many peers the other node says it has now, and how many it wants
    /// (protocol.md 4.3).
    pub async fn ping_for_count(
        &self,
        timeout: Duration,
    ) -> Result<(Duration, Option<PeerCount>), TransportError> {
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
            Ok(Ok(answer)) => Ok(answer),
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
            queued: s.queued.load(Ordering::Acquire),
            queued_bytes: s.queued_bytes.load(Ordering::Acquire),
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

    /// Starts the connection's task (its reader and writer) for a handshaken
    /// stream, on the endpoint `home`.
    pub(crate) fn spawn(
        hs: Handshaken,
        id: u64,
        remote_addr: Address,
        direction: Direction,
        home: Home<'_>,
    ) -> Connection {
        let Home {
            config,
            tracker,
            parent,
            own_count,
        } = home;
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
            queued_bytes: AtomicUsize::new(0),
            max_queued_bytes: config.max_queued_bytes,
            room: Notify::new(),
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
            // The handshake's round trip, if this side measured one, is
            // the first sample: a new connection has an RTT at once.
            rtt: Mutex::new((hs.rtt, hs.rtt)),
            pings: Mutex::new(HashMap::new()),
            handoff: Mutex::new(HandoffSlot::default()),
            handoff_ready: AtomicBool::new(false),
            handoff_notify: Notify::new(),
            last_word: Mutex::new(None),
            write: Mutex::new(WriteHalf::new(hs.writer)),
            write_kick: Notify::new(),
            queued: AtomicUsize::new(0),
            corked: AtomicBool::new(false),
            own_count: own_count.clone(),
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
            lanes: [control_rx, normal_rx, bulk_rx],
            keepalive: config.keepalive_interval,
            idle_timeout: config.idle_timeout,
            write_timeout: config.write_timeout,
            close_timeout: config.close_timeout,
            batch: Vec::new(),
            from_lanes: 0,
        };
        // One task for both directions: the reader and the writer never
        // run at once on two threads, so they never contend for the
        // socket, and a send's wake-up of the writer stays on its thread.
        let guard = |reader| HalfGuard {
            shared: shared.clone(),
            reader,
            armed: true,
        };
        let reader = read_loop(shared.clone(), hs.reader, inbound_tx, guard(true));
        let writer = writer.run(guard(false));
        tracker.spawn(Both::new(writer, reader).instrument(span));
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
/// Bytes a sender may leave waiting in the write half (the stream was not
/// ready) before it must queue on its lane instead.
const DIRECT_PENDING_LIMIT: usize = 256 * 1024;
/// Frames the reader handles, its answers gathered, before it writes them.
///
/// Small on purpose: the peer starts on the first answers while this side
/// handles the rest, so both ends work at once. With 64 requests in flight
/// through a concern, 8 gave about 520 k/s where 64 gave 390 k/s, 16 gave
/// 430 k/s and 4 gave 480 k/s; bare endpoints measured the same with 8 and
/// 64 (one write call per 8 frames costs them nothing measurable).
const CORK_FRAMES: usize = 8;
/// Frames the reader handles in a burst between two readings of the clock.
const CLOCK_FRAMES: usize = 32;
/// Frames the reader handles per unit of tokio's cooperative budget: with
/// the default budget of 128 units, a reader that never has to wait yields
/// after about 2 000 frames (a few ms of handlers at most).
const BUDGET_FRAMES: usize = 16;

/// The write side of the stream, shared by the writer task and by the
/// reader, which writes the answers it produced while handling a burst of
/// frames itself (see [`Shared::corked`]): no writer wake-up for them.
struct WriteHalf {
    io: BoxWrite,
    /// Encoded frames not yet taken by the stream, in order.
    pending: VecDeque<Bytes>,
    /// Bytes of `pending`'s front already taken.
    offset: usize,
    /// Total bytes in `pending` (the front's taken ones included).
    pending_bytes: usize,
    /// Where small frames are encoded before they join `pending`.
    scratch: BytesMut,
    /// Bytes were written and not flushed yet.
    needs_flush: bool,
    /// The writer task is finishing a write that had to wait, with its own
    /// waker registered: nobody else polls the stream meanwhile.
    writer_draining: bool,
    /// A write failed; the connection is being torn down.
    failed: bool,
}

impl WriteHalf {
    fn new(io: BoxWrite) -> Self {
        WriteHalf {
            io,
            pending: VecDeque::new(),
            offset: 0,
            pending_bytes: 0,
            scratch: BytesMut::new(),
            needs_flush: false,
            writer_draining: false,
            failed: false,
        }
    }

    /// True when nothing is waiting to be written or flushed.
    fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.scratch.is_empty() && !self.needs_flush
    }

    /// Encodes `msg` after everything already pending; returns its size.
    fn encode(&mut self, msg: &Message) -> u64 {
        let before = self.scratch.len();
        let direct = meshwork_wire::encode_frame_into(msg, &mut self.scratch, DIRECT_WRITE);
        let mut total = self.scratch.len() - before;
        if let Some(payload) = direct {
            self.seal();
            total += payload.len();
            self.pending_bytes += payload.len();
            self.pending.push_back(payload);
        }
        total as u64
    }

    /// Moves what `scratch` holds to the end of `pending`.
    fn seal(&mut self) {
        if !self.scratch.is_empty() {
            let chunk = self.scratch.split().freeze();
            self.pending_bytes += chunk.len();
            self.pending.push_back(chunk);
        }
    }

    /// Writes everything pending, then flushes.
    fn poll_drain(&mut self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        // Nothing queued before the small frames: written from `scratch`
        // where they were encoded, not split off into `pending` (which
        // makes the buffer shared: an allocation and atomic counts per
        // write). What the stream does not take stays at the front of
        // `scratch`, still ahead of anything encoded after it.
        if self.pending.is_empty() {
            while !self.scratch.is_empty() {
                let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.scratch))?;
                if n == 0 {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                self.needs_flush = true;
                self.scratch.advance(n);
            }
        }
        self.seal();
        while let Some(front) = self.pending.front() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &front[self.offset..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.needs_flush = true;
            self.offset += n;
            if self.offset == front.len() {
                self.pending_bytes -= front.len();
                self.pending.pop_front();
                self.offset = 0;
            }
        }
        if self.needs_flush {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.needs_flush = false;
        }
        // An idle connection should not keep a big batch buffer around.
        if self.scratch.capacity() > KEEP_WRITE_BUFFER {
            self.scratch = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl Shared {
    /// Writes what is pending from the calling task, if the writer task is
    /// not already at it: one try, without waiting. If the stream is not
    /// ready the writer task takes over (with its own waker).
    ///
    /// `now` ([`nanos_since_start`](Self::nanos_since_start)) dates the
    /// write for the keepalive: a reading the caller took moments ago (the
    /// reader's when it woke, a sender's for its request's deadline), so
    /// that one reading of the clock serves both.
    fn drain_here(&self, w: &mut WriteHalf, now: u64) {
        if w.writer_draining || w.failed || w.is_idle() {
            return;
        }
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        self.last_sent_nanos.store(now, Ordering::Relaxed);
        match w.poll_drain(&mut cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => {
                w.failed = true;
                self.abort(CloseReason::Io(e.to_string()));
            }
            Poll::Pending => {
                w.writer_draining = true;
                self.write_kick.notify_one();
            }
        }
    }

    /// Puts `msg` in the write half instead of its lane, if nothing is
    /// queued on the lanes (so it overtakes nothing), the write half is
    /// free and holds less than [`DIRECT_PENDING_LIMIT`] bytes; returns
    /// `msg` back otherwise. Then:
    ///
    /// - while the reader handles a burst (corked), the frame waits for the
    ///   reader to write it with the rest when it pauses;
    /// - when [`Haste::Eager`] (a lone message, see
    ///   [`send_eager`](ConnectionHandle::send_eager)) and the connection is
    ///   quiet (nothing pending, the writer not at it), the calling task
    ///   writes it now, saving the hop to the writer task;
    /// - otherwise the writer task is woken to write it, with whatever else
    ///   gathers meanwhile: one write call for many frames, as from the
    ///   lanes, without the queue (a sender that wrote every frame itself
    ///   would make one write call per frame, which with many requests in
    ///   flight cost more than the wake-ups it saves).
    fn try_direct(&self, msg: Message, haste: Haste) -> Result<(), Message> {
        if self.queued.load(Ordering::Acquire) != 0 {
            return Err(msg);
        }
        let Ok(mut w) = self.write.try_lock() else {
            return Err(msg);
        };
        // The cork is read again under the lock, which `uncork` holds while
        // lifting it: a frame added while corked is always drained by it.
        let corked = self.corked.load(Ordering::Acquire);
        let eager = matches!(haste, Haste::Eager(_));
        let now = eager && !corked && !w.writer_draining && w.is_idle();
        let room = now || w.pending_bytes + w.scratch.len() < DIRECT_PENDING_LIMIT;
        if !room || w.failed || self.queued.load(Ordering::Acquire) != 0 {
            return Err(msg);
        }
        let bytes = w.encode(&msg);
        self.frames_sent.fetch_add(1, Ordering::Relaxed);
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        if now {
            let at = match haste {
                Haste::Eager(Some(at)) => self.nanos_since_start(at),
                _ => self.nanos_now(),
            };
            self.drain_here(&mut w, at);
        } else if !corked && !w.writer_draining {
            // (A writer already draining takes these bytes in the same go:
            // it stops only once nothing is pending, under this lock.)
            drop(w);
            self.write_kick.notify_one();
        }
        Ok(())
    }

    /// Writes `msg` directly if it can (see [`try_direct`](Self::try_direct)),
    /// else queues it on its lane.
    fn push(
        &self,
        msg: Message,
        priority: Priority,
        haste: Haste,
        len: usize,
    ) -> Result<(), mpsc::error::TrySendError<Message>> {
        // Bulk frames always take their lane, so that nothing gathered
        // directly can hold up a later control frame.
        if priority == Priority::Bulk {
            return self.enqueue(msg, priority, len);
        }
        match self.try_direct(msg, haste) {
            Ok(()) => Ok(()),
            Err(msg) => self.enqueue(msg, priority, len),
        }
    }

    /// Queues `msg` (`len` bytes encoded) on its lane for the writer task;
    /// `Full` when the lane is, or when a large message finds the
    /// queued-bytes budget taken.
    fn enqueue(
        &self,
        msg: Message,
        priority: Priority,
        len: usize,
    ) -> Result<(), mpsc::error::TrySendError<Message>> {
        if !self.reserve_bytes(len) {
            return Err(mpsc::error::TrySendError::Full(msg));
        }
        self.queued.fetch_add(1, Ordering::AcqRel);
        let r = self.lanes[priority as usize].try_send(msg);
        if r.is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.release_bytes(len);
        }
        r
    }

    /// Takes `len` bytes of the queued-bytes budget for a large message
    /// (small ones take none); false when that would pass the budget. An
    /// empty budget always takes one, whatever its size.
    fn reserve_bytes(&self, len: usize) -> bool {
        if len < COUNTED_FRAME {
            return true;
        }
        let mut held = self.queued_bytes.load(Ordering::Acquire);
        loop {
            if held > 0 && held + len > self.max_queued_bytes {
                return false;
            }
            match self.queued_bytes.compare_exchange_weak(
                held,
                held + len,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => held = now,
            }
        }
    }

    /// Gives back what [`reserve_bytes`](Self::reserve_bytes) took.
    fn release_bytes(&self, len: usize) {
        if len >= COUNTED_FRAME {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.room.notify_waiters();
        }
    }

    /// The reader pauses: writes the answers it gathered, dated `now`
    /// (the reader's clock reading, see [`drain_here`](Self::drain_here)).
    fn uncork(&self, now: u64) {
        // Under the lock: a sender that saw the flag set and appended under
        // the same lock did so before this, so its frame is drained here.
        let mut w = lock(&self.write);
        self.corked.store(false, Ordering::Release);
        self.drain_here(&mut w, now);
    }
}

struct Writer {
    shared: Arc<Shared>,
    lanes: [mpsc::Receiver<Message>; 3],
    keepalive: Option<Duration>,
    idle_timeout: Option<Duration>,
    write_timeout: Duration,
    close_timeout: Duration,
    batch: Vec<Message>,
    /// How many of `batch` came from the lanes (and count in `queued`).
    from_lanes: usize,
}

enum WriteOutcome {
    Ok,
    Cancelled,
    Failed(CloseReason),
}

impl Writer {
    async fn run(mut self, mut guard: HalfGuard) {
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
            tokio::select! {
                biased;
                _ = &mut cancelled => break false,
                _ = &mut close_requested => break true,
                // Before the lanes: a busy stream must not starve the
                // keepalive and idle checks. It is ready only when due.
                _ = tick.tick() => {
                    match self.keepalive_tick() {
                        Some(ping) => self.batch.push(ping),
                        None => continue,
                    }
                }
                // A sender left bytes the stream did not take at once.
                _ = shared.write_kick.notified() => {}
                Some(m) = control.recv() => {
                    self.batch.push(m);
                    self.from_lanes += 1;
                }
                Some(m) = normal.recv() => {
                    self.batch.push(m);
                    self.from_lanes += 1;
                }
                Some(m) = bulk.recv() => {
                    self.batch.push(m);
                    self.from_lanes += 1;
                }
            }
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
        // Stop the reader (if the peer did not close first) and end. The
        // stream's write half is dropped now (handles may outlive the
        // connection), which the peer sees as the end of the stream.
        shared.cancel.cancel();
        shared.drop_write_half();
        drop(self);
        // Disarmed only now: a panic above still ends the half.
        guard.armed = false;
        shared.task_ended();
    }

    /// Adds queued messages to the batch, control lane first, up to
    /// [`WRITE_BATCH`] bytes.
    fn fill_batch(&mut self) {
        let mut size: usize = self.batch.iter().map(meshwork_wire::encoded_len).sum();
        while size < WRITE_BATCH {
            match self.next_ready() {
                Some(m) => {
                    size += meshwork_wire::encoded_len(&m);
                    self.batch.push(m);
                    self.from_lanes += 1;
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
            self.from_lanes += 1;
        }
        let disconnect = lock(&self.shared.state).disconnect.take();
        if let Some(d) = disconnect {
            self.batch.push(Message::Disconnect(d));
        }
        if !matches!(self.write_batch().await, WriteOutcome::Ok) {
            return;
        }
        let shared = self.shared.clone();
        let _ = std::future::poll_fn(|cx| Pin::new(&mut lock(&shared.write).io).poll_shutdown(cx))
            .await;
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

    /// Encodes the batch after whatever senders left pending, then writes
    /// it all.
    async fn write_batch(&mut self) -> WriteOutcome {
        let shared = self.shared.clone();
        let count = self.batch.len() as u64;
        let mut total = 0;
        {
            let mut w = lock(&shared.write);
            if w.failed {
                return WriteOutcome::Cancelled;
            }
            let mut released = 0;
            for msg in self.batch.drain(..) {
                let n = w.encode(&msg);
                total += n;
                // Large ones came from the lanes (pings and the Disconnect
                // are small): their bytes go back to the budget.
                if n as usize >= COUNTED_FRAME {
                    let len = meshwork_wire::encoded_len(&msg);
                    if len >= COUNTED_FRAME {
                        released += len;
                    }
                }
            }
            if released > 0 {
                shared.queued_bytes.fetch_sub(released, Ordering::AcqRel);
                shared.room.notify_waiters();
            }
            // Encoded under the lock: from here a sender may write directly
            // again without overtaking these.
            shared
                .queued
                .fetch_sub(std::mem::take(&mut self.from_lanes), Ordering::AcqRel);
            w.writer_draining = true;
        }
        let write = std::future::poll_fn(|cx| {
            let mut w = lock(&shared.write);
            let r = w.poll_drain(cx);
            if r.is_ready() {
                w.writer_draining = false;
                w.failed |= matches!(r, Poll::Ready(Err(_)));
            }
            r
        });
        tokio::pin!(write);
        // Most writes complete at once: only arm the timer when one waits.
        let result = match futures_util::FutureExt::now_or_never(write.as_mut()) {
            Some(r) => Ok(r),
            None => tokio::select! {
                biased;
                _ = shared.cancel.cancelled() => Err(None),
                r = tokio::time::timeout(self.write_timeout, write) => r.map_err(|_| Some(())),
            },
        };
        let outcome = match result {
            Ok(Ok(())) => WriteOutcome::Ok,
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
            lock(&shared.write).failed = true;
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
        if let Some((sink, mut queued)) = HandoffSlot::reader_ended(&self.handle.shared.handoff) {
            drain_to(&sink, &mut queued, &self.handle);
        }
        self.queue = None;
    }

    /// Passes `msg` on; waits (or takes a sink over) while the queue is full.
    /// `Err` when the connection was cancelled meanwhile.
    /// `Ok(true)` when it had to wait for room. `now` is the reader's clock
    /// reading, which dates the answers it writes before such a wait.
    async fn put(
        &mut self,
        msg: Message,
        cancelled: &CancellationToken,
        now: u64,
    ) -> Result<bool, ()> {
        let mut msg = msg;
        let mut waited = false;
        loop {
            self.take_handoff();
            if let Some(sink) = &self.sink {
                sink.deliver(&self.handle, msg);
                return Ok(waited);
            }
            let Some(queue) = &self.queue else {
                return Ok(waited);
            };
            let sent = match queue.try_send(msg) {
                Ok(()) => Ok(()),
                Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
                Err(mpsc::error::TrySendError::Full(full)) => {
                    waited = true;
                    // Only here, waiting, is the sender cloned (the borrow of
                    // `self` must end before the sink can be taken over).
                    let queue = queue.clone();
                    let shared = &self.handle.shared;
                    // Answers gathered so far must not wait for the room.
                    shared.uncork(now);
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
            return Ok(waited);
        }
    }
}

async fn read_loop(
    shared: Arc<Shared>,
    mut reader: FramedRead<BoxRead, FrameCodec>,
    inbound: mpsc::Sender<Message>,
    mut guard: HalfGuard,
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
    // Frames handled since the reader corked the write side (see `corked`).
    let mut corked = 0usize;
    // The clock is read when the reader wakes (from a wait for the stream,
    // for room in the inbound queue, or after yielding) and every
    // CLOCK_FRAMES frames of a burst, not for every frame: it only dates the
    // last sign of life, and the answers the reader writes (see `uncork`).
    // Kept as `Shared::nanos_since_start`, the form both are stored in.
    let mut now = shared.nanos_now();
    let mut unclocked = 0usize;
    // Frames handled since the reader last spent a unit of tokio's budget.
    let mut budgeted = 0usize;
    loop {
        // While data keeps coming, read on; just before waiting for more, drop
        // a read buffer that a large frame left behind, so an idle connection
        // stays small without costing a reallocation per frame when busy.
        let next = match futures_util::FutureExt::now_or_never(reader.next()) {
            Some(next) => {
                unclocked += 1;
                if unclocked >= CLOCK_FRAMES {
                    // The fast path never waits, so it must not be where a
                    // streaming peer keeps an aborted connection's reader
                    // alive: checked here, every CLOCK_FRAMES frames (the
                    // check takes the token's lock, too dear per frame).
                    if shared.cancel.is_cancelled() {
                        break;
                    }
                    now = shared.nanos_now();
                    unclocked = 0;
                }
                next
            }
            None => {
                // About to wait: write the answers gathered meanwhile.
                if corked > 0 {
                    shared.uncork(now);
                    corked = 0;
                }
                let buf = reader.read_buffer_mut();
                if buf.is_empty() && (large_frame_seen || buf.capacity() > KEEP_READ_BUFFER) {
                    *buf = BytesMut::with_capacity(crate::handshake::READ_BUFFER);
                    large_frame_seen = false;
                }
                let next = tokio::select! {
                    biased;
                    // The stream first: woken by a frame, the reader takes it
                    // without polling the cancellation (two locks per poll).
                    // That is polled whenever nothing is ready to read, and
                    // checked every CLOCK_FRAMES frames whichever way they
                    // came (below): a peer whose frames are always ready when
                    // the reader gets here cannot keep a cancelled reader
                    // alive either.
                    next = reader.next() => next,
                    _ = &mut cancelled => break,
                    // A sink waiting to take over gets the queued messages
                    // now, not with the next frame (and before any frame,
                    // which `put` hands it over first).
                    _ = shared.handoff_notify.notified(), if inlet.sink.is_none() => {
                        inlet.take_handoff();
                        // Woken: the next frame may come at once, by the
                        // fast path, which does not read the clock.
                        now = shared.nanos_now();
                        continue;
                    }
                };
                now = shared.nanos_now();
                unclocked += 1;
                if unclocked >= CLOCK_FRAMES {
                    if shared.cancel.is_cancelled() {
                        break;
                    }
                    unclocked = 0;
                }
                next
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
                // Peers can cause these as fast as they connect: a budget.
                static REFUSED: Mutex<LogLimit> = Mutex::new(LogLimit::new());
                match crate::loglimit::allow(&REFUSED) {
                    Some(0) => warn!(error = %e, "refusing frame from peer"),
                    Some(held_back) => warn!(
                        error = %e,
                        held_back,
                        "refusing frame from peer (and {held_back} more refused since the last \
                         warning, logged at debug level)"
                    ),
                    None => debug!(error = %e, "refusing frame from peer"),
                }
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
        // Only this task writes the received counters: a load and a store
        // each, not a locked read-modify-write per frame (others only read).
        let frames = shared.frames_received.load(Ordering::Relaxed);
        shared.frames_received.store(frames + 1, Ordering::Relaxed);
        let decoded = reader.decoder().decoded_bytes();
        let frame_len = decoded - shared.bytes_received.load(Ordering::Relaxed);
        shared.bytes_received.store(decoded, Ordering::Relaxed);
        large_frame_seen |= frame_len as usize > KEEP_READ_BUFFER;
        shared.last_received_nanos.store(now, Ordering::Relaxed);
        match msg {
            Message::Ping(p) => {
                let pong = Message::Pong(Pong {
                    nonce: p.nonce,
                    timestamp_micros: wall_micros(),
                    peer_count: *lock(&shared.own_count),
                });
                // A full control lane means we are already busy answering;
                // the peer will ping again.
                // A Pong is small: it never counts against the queued bytes.
                let _ = shared.push(pong, Priority::Control, Haste::Gather, 0);
            }
            Message::Pong(p) => shared.on_pong(&p, Instant::now()),
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
                if corked == 0 {
                    shared.corked.store(true, Ordering::Release);
                }
                corked += 1;
                match inlet.put(msg, &shared.cancel, now).await {
                    Err(()) => break,
                    // It waited for room, maybe for long: the clock reading
                    // the next frames would be dated with is stale, and would
                    // make the peer look silent to the idle check (which
                    // kept it alive while we waited).
                    Ok(true) => {
                        now = shared.nanos_now();
                        unclocked = 0;
                    }
                    Ok(false) => {}
                }
                if corked >= CORK_FRAMES {
                    shared.uncork(now);
                    corked = 0;
                }
                // A peer that streams without pause must not keep this
                // worker thread to itself: one unit of tokio's cooperative
                // budget per BUDGET_FRAMES frames (reads alone count per read
                // call, and one read can carry hundreds of frames handled
                // right here).
                budgeted += 1;
                if budgeted >= BUDGET_FRAMES {
                    budgeted = 0;
                    if tokio::task::coop::has_budget_remaining() {
                        // Takes a unit without yielding.
                        tokio::task::coop::consume_budget().await;
                    } else {
                        // About to yield: the answers gathered go out first.
                        if corked > 0 {
                            shared.uncork(now);
                            corked = 0;
                        }
                        tokio::task::coop::consume_budget().await;
                        // Other tasks ran meanwhile, for who knows how long.
                        now = shared.nanos_now();
                        unclocked = 0;
                    }
                }
            }
        }
    }
    shared.uncork(shared.nanos_now());
    // Hands a waiting sink what is queued: a sink that panics here still
    // leaves the half to its guard.
    inlet.close();
    shared.reader_ended.cancel();
    guard.armed = false;
    shared.task_ended();
}

#[cfg(test)]
mod tests {
    use meshwork_wire::proto::{Concern, ConcernKind};

    use super::*;
    use crate::mem::MemNetwork;
    use crate::{Config, Endpoint};

    /// Answers every Concern right on the reader, through the connection it
    /// came on: the answer is gathered while the reader is corked, and
    /// written by `uncork`.
    struct Echo;

    impl Deliver for Echo {
        fn deliver(&self, conn: &ConnectionHandle, msg: Message) {
            if let Message::Concern(c) = msg {
                let reply = Concern {
                    kind: ConcernKind::Reply as i32,
                    ..c
                };
                conn.try_send(Message::Concern(reply), Priority::Normal)
                    .expect("room for the answer");
            }
        }
    }

    fn request(n: u64) -> Message {
        Message::Concern(Concern {
            command: 1,
            request_id: n,
            kind: ConcernKind::Request as i32,
            payload: Bytes::from_static(b"ping"),
            ..Default::default()
        })
    }

    /// A sink with a bug: it panics on every message.
    struct Faulty;

    impl Deliver for Faulty {
        fn deliver(&self, _: &ConnectionHandle, _: Message) {
            panic!("a bug in the layer above");
        }
    }

    /// A panic on a connection's task (here in the sink its reader calls)
    /// ends the connection as a close would: it counts as ended (`closed`
    /// returns, the endpoint forgets it) and the peer sees the end of the
    /// stream, instead of both halves dying silently and the connection
    /// staying listed, half alive.
    #[tokio::test]
    async fn a_panic_on_the_connections_task_ends_the_connection() {
        let net = MemNetwork::new();
        let config = || Config::new("test-net");
        let server = Endpoint::with_transport(config(), Arc::new(net.transport("server")));
        let addr = server.listen(&Address::mem("server")).await.unwrap();
        let client = Endpoint::with_transport(config(), Arc::new(net.transport("client")));
        let mut conn = client.connect(&addr).await.unwrap();
        let incoming = server.accept().await.unwrap().deliver_to(Arc::new(Faulty));
        assert_eq!(server.connections().len(), 1);
        conn.send(request(1), Priority::Normal).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), incoming.closed())
            .await
            .expect("the connection whose task panicked ends");
        assert!(
            matches!(incoming.close_reason(), Some(CloseReason::Io(_))),
            "{:?}",
            incoming.close_reason()
        );
        assert!(server.connections().is_empty(), "the endpoint forgot it");
        let end = tokio::time::timeout(Duration::from_secs(5), conn.recv())
            .await
            .expect("the peer sees the end");
        assert!(end.is_err(), "{end:?}");
        assert_eq!(conn.close_reason(), Some(CloseReason::Eof));
        client.shutdown().await;
        server.shutdown().await;
    }

    /// How long before `now` the connection last received and last sent.
    fn ages(conn: &ConnectionHandle, now: Instant) -> (Duration, Duration) {
        let s = &conn.shared;
        (
            s.since(&s.last_received_nanos, now),
            s.since(&s.last_sent_nanos, now),
        )
    }

    /// The reader reads the clock once when it wakes, and that reading
    /// dates both the frame it woke for and the answer a handler gave on
    /// the reader: after ten silent seconds, neither is dated with the
    /// reading of the wake before. A request written at once by its sender
    /// is dated with the reading the sender passed.
    #[tokio::test(start_paused = true)]
    async fn a_reader_that_slept_dates_what_it_reads_and_answers_anew() {
        let net = MemNetwork::new();
        // No keepalive: only the test's frames cross the link.
        let quiet = || Config::new("test-net").with_keepalive(None, None);
        let server = Endpoint::with_transport(quiet(), Arc::new(net.transport("server")));
        let addr = server.listen(&Address::mem("server")).await.unwrap();
        let client = Endpoint::with_transport(quiet(), Arc::new(net.transport("client")));
        let mut conn = client.connect(&addr).await.unwrap();
        let incoming = server.accept().await.unwrap().deliver_to(Arc::new(Echo));
        for n in 1..=3 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let asked = Instant::now();
            let sent = conn.offer(request(n), Priority::Normal, Some(asked));
            assert!(matches!(sent, Ok(None)), "{sent:?}");
            assert_eq!(conn.stats().frames_sent, n, "written at once");
            let reply = conn.recv().await.unwrap();
            assert!(matches!(reply, Message::Concern(c) if c.request_id == n));
            let now = Instant::now();
            assert_eq!(ages(&incoming, now), (Duration::ZERO, Duration::ZERO));
            assert_eq!(ages(&conn, now), (Duration::ZERO, Duration::ZERO));
        }
        // The sender's reading, not a fresh one, dates the eager write.
        let earlier = Instant::now() - Duration::from_secs(1);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(matches!(
            conn.offer(request(4), Priority::Normal, Some(earlier)),
            Ok(None)
        ));
        let now = Instant::now();
        assert_eq!(ages(&conn, now).1, Duration::from_secs(11));
        conn.recv().await.unwrap();
        assert_eq!(ages(&incoming, now), (Duration::ZERO, Duration::ZERO));
        client.shutdown().await;
        server.shutdown().await;
    }
}
