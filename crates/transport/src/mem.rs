//! An in-process network for tests and simulation.
//!
//! A [`MemNetwork`] is a set of named **hosts**. Each host gets a
//! [`MemTransport`] from [`MemNetwork::transport`]; it may listen on
//! `mem://<its name>` and dial any other host's `mem://` address. A dial
//! creates a connected pair of in-memory byte streams, one per side.
//!
//! Each direction of a stream is a bounded byte queue
//! ([`PIPE_CAPACITY`] bytes): a writer that finds it full waits for the reader
//! (backpressure), exactly like a socket with a small buffer.
//!
//! **Links** between two hosts can be given a one-way latency
//! ([`MemNetwork::set_latency`], [`MemNetwork::set_default_latency`]): every
//! byte becomes readable `latency` after it was written. Time is
//! [`tokio::time`], so tests using `tokio::time::pause()` (or
//! `#[tokio::test(start_paused = true)]`) are deterministic.
//!
//! **Faults**:
//! - [`MemNetwork::partition`] cuts hosts apart. Existing streams across the
//!   cut go silent without an error: written bytes are held (up to the queue
//!   capacity, then writers block) and delivered in order after
//!   [`MemNetwork::heal`]. New dials across the cut fail with
//!   [`io::ErrorKind::HostUnreachable`].
//! - [`MemNetwork::drop_link`] resets every connection between two hosts:
//!   reads and writes fail with [`io::ErrorKind::ConnectionReset`].
//! - [`MemNetwork::crash`] removes a host's listener and resets all its
//!   connections; the host may listen again later (a restart).
//!
//! ```
//! use meshwork_transport::mem::MemNetwork;
//! use meshwork_transport::{Address, Listener, Transport};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let net = MemNetwork::new();
//! let (alice, bob) = (net.transport("alice"), net.transport("bob"));
//! let mut listener = bob.listen(&"mem://bob".parse()?).await?;
//!
//! let (mut to_bob, _) = alice.dial(&Address::mem("bob")).await?;
//! let (mut from_alice, who) = listener.accept().await?;
//! assert_eq!(who, Address::mem("alice"));
//!
//! to_bob.write_all(b"hello").await?;
//! let mut buf = [0; 5];
//! from_alice.read_exact(&mut buf).await?;
//! assert_eq!(&buf, b"hello");
//! assert_eq!(net.open_connections(), 1);
//! # Ok(())
//! # }
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

use crate::transport::{BoxStream, Listener, Transport};
use crate::{Address, TransportError, lock};

/// Bytes one direction of a stream holds before writers must wait.
pub const PIPE_CAPACITY: usize = 256 * 1024;

/// Dialled streams a listener holds before further dials are refused.
pub const ACCEPT_BACKLOG: usize = 128;

fn io_err(kind: io::ErrorKind, msg: String) -> TransportError {
    TransportError::Io(io::Error::new(kind, msg))
}

fn set_waker(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

fn wake(slot: &mut Option<Waker>) {
    if let Some(w) = slot.take() {
        w.wake();
    }
}

/// A simulated network: hosts, links between them, and faults.
///
/// Cloning gives another handle to the same network.
#[derive(Clone, Default)]
pub struct MemNetwork {
    net: Arc<Mutex<NetState>>,
}

#[derive(Default)]
struct NetState {
    /// Host name → (listener id, its accept queue).
    listeners: HashMap<String, (u64, mpsc::Sender<(MemStream, String)>)>,
    /// Per-link latency, stored in both directions.
    latency: HashMap<String, HashMap<String, Duration>>,
    default_latency: Duration,
    /// Active partitions: (side a, side b).
    cuts: Vec<(HashSet<String>, HashSet<String>)>,
    /// Open connections by id.
    conns: HashMap<u64, Arc<Conn>>,
    /// Readers waiting for `heal`, by (connection id, reading side).
    parked: HashMap<(u64, usize), Waker>,
    next_id: u64,
}

impl NetState {
    fn is_cut(&self, a: &str, b: &str) -> bool {
        self.cuts
            .iter()
            .any(|(x, y)| (x.contains(a) && y.contains(b)) || (x.contains(b) && y.contains(a)))
    }

    fn latency(&self, a: &str, b: &str) -> Duration {
        self.latency
            .get(a)
            .and_then(|m| m.get(b))
            .copied()
            .unwrap_or(self.default_latency)
    }

    /// Unregisters the matching connections; the caller resets them unlocked.
    fn take_conns(&mut self, matches: impl Fn(&Conn) -> bool) -> Vec<Arc<Conn>> {
        let (gone, kept): (HashMap<_, _>, _) = self.conns.drain().partition(|(_, c)| matches(c));
        self.conns = kept;
        gone.into_values().collect()
    }
}

impl fmt::Debug for MemNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = lock(&self.net);
        let mut listening: Vec<&String> = st.listeners.keys().collect();
        listening.sort();
        f.debug_struct("MemNetwork")
            .field("listening", &listening)
            .field("open_connections", &st.conns.len())
            .field("partitions", &st.cuts.len())
            .finish_non_exhaustive()
    }
}

impl MemNetwork {
    /// An empty network: no listeners, no latency, no faults.
    pub fn new() -> Self {
        Self::default()
    }

    /// A transport for host `name`. It may listen only on `mem://<name>`;
    /// streams it dials come from host `name`.
    pub fn transport(&self, host: &str) -> MemTransport {
        MemTransport {
            net: self.clone(),
            host: host.to_string(),
        }
    }

    /// One-way latency added to every byte written from `a` to `b` and from
    /// `b` to `a` (a symmetric link setting). Applies to bytes written from
    /// now on, on existing and new connections. Streams with latency must be
    /// read inside a Tokio runtime with its time driver enabled.
    pub fn set_latency(&self, a: &str, b: &str, latency: Duration) {
        let mut st = lock(&self.net);
        for (x, y) in [(a, b), (b, a)] {
            st.latency
                .entry(x.to_string())
                .or_default()
                .insert(y.to_string(), latency);
        }
    }

    /// Latency for links without their own setting (default zero).
    pub fn set_default_latency(&self, latency: Duration) {
        lock(&self.net).default_latency = latency;
    }

    /// Blocks all traffic between every host in `side_a` and every host in
    /// `side_b`, both directions, until [`heal`](Self::heal).
    ///
    /// Existing connections stall: bytes already written, and bytes written
    /// later, are held (not lost) and delivered in order after the heal; new
    /// dials across the cut fail at once with
    /// [`io::ErrorKind::HostUnreachable`]. As with a real partition nobody gets
    /// an error on existing streams: the silence must be detected by timeouts.
    /// Partitions add up; traffic within each side is unaffected.
    pub fn partition(&self, side_a: &[&str], side_b: &[&str]) {
        let set = |s: &[&str]| s.iter().map(|h| h.to_string()).collect::<HashSet<_>>();
        let cut = (set(side_a), set(side_b));
        let mut st = lock(&self.net);
        if !cut.0.is_empty() && !cut.1.is_empty() && !st.cuts.contains(&cut) {
            st.cuts.push(cut);
        }
    }

    /// Removes every partition; held bytes flow again.
    pub fn heal(&self) {
        let parked: Vec<Waker> = {
            let mut st = lock(&self.net);
            st.cuts.clear();
            st.parked.drain().map(|(_, w)| w).collect()
        };
        parked.into_iter().for_each(Waker::wake);
    }

    /// Resets every existing connection between `a` and `b`: both ends'
    /// pending and future reads and writes fail with
    /// [`io::ErrorKind::ConnectionReset`]. New dials still work (unless
    /// partitioned).
    pub fn drop_link(&self, a: &str, b: &str) {
        let conns = lock(&self.net).take_conns(|c| {
            (c.hosts[0] == a && c.hosts[1] == b) || (c.hosts[0] == b && c.hosts[1] == a)
        });
        conns.iter().for_each(|c| c.reset());
    }

    /// Crashes `host`: removes its listener (whose `accept` then returns
    /// [`TransportError::Shutdown`] once its queue is drained) and resets all
    /// its connections. The host may listen and dial again afterwards.
    pub fn crash(&self, host: &str) {
        let (listener, conns) = {
            let mut st = lock(&self.net);
            let listener = st.listeners.remove(host);
            (
                listener,
                st.take_conns(|c| c.hosts.iter().any(|h| h == host)),
            )
        };
        drop(listener);
        conns.iter().for_each(|c| c.reset());
    }

    /// Number of currently open connections: dialled, not reset, and not yet
    /// dropped at both ends.
    pub fn open_connections(&self) -> usize {
        lock(&self.net).conns.len()
    }
}

/// One host's view of a [`MemNetwork`]; implements [`Transport`].
#[derive(Clone, Debug)]
pub struct MemTransport {
    net: MemNetwork,
    host: String,
}

impl MemTransport {
    /// The name of the host this transport belongs to.
    pub fn host(&self) -> &str {
        &self.host
    }
}

#[async_trait]
impl Transport for MemTransport {
    async fn listen(&self, addr: &Address) -> Result<Box<dyn Listener>, TransportError> {
        let Address::Mem(name) = addr else {
            return Err(TransportError::UnsupportedAddress(addr.to_string()));
        };
        if *name != self.host {
            return Err(TransportError::InvalidAddress {
                input: addr.to_string(),
                reason: "a MemTransport may listen only on mem://<its own host name>",
            });
        }
        let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
        let mut st = lock(&self.net.net);
        if st.listeners.contains_key(name) {
            return Err(io_err(
                io::ErrorKind::AddrInUse,
                format!("{addr} is already listening"),
            ));
        }
        st.next_id += 1;
        let id = st.next_id;
        st.listeners.insert(name.clone(), (id, tx));
        Ok(Box::new(MemListener {
            net: self.net.clone(),
            host: name.clone(),
            id,
            rx,
        }))
    }

    async fn dial(&self, addr: &Address) -> Result<(BoxStream, Address), TransportError> {
        let Address::Mem(target) = addr else {
            return Err(TransportError::UnsupportedAddress(addr.to_string()));
        };
        let net = &self.net.net;
        let mut st = lock(net);
        if st.is_cut(&self.host, target) {
            return Err(io_err(
                io::ErrorKind::HostUnreachable,
                format!("{addr} is partitioned from mem://{}", self.host),
            ));
        }
        let refused = || {
            let msg = format!("{addr} refused the connection");
            io_err(io::ErrorKind::ConnectionRefused, msg)
        };
        st.next_id += 1;
        let id = st.next_id;
        let Some((_, tx)) = st.listeners.get(target) else {
            return Err(refused());
        };
        let conn = Arc::new(Conn {
            id,
            hosts: [self.host.clone(), target.clone()],
            state: Mutex::new(ConnState {
                reset: false,
                ends: 2,
                pipes: Default::default(),
            }),
        });
        let ours = MemStream::new(net, &conn, 0);
        let theirs = MemStream::new(net, &conn, 1);
        if let Err(e) = tx.try_send((theirs, self.host.clone())) {
            drop(st); // the rejected stream's Drop locks the network
            drop(e);
            return Err(refused());
        }
        st.conns.insert(conn.id, conn);
        Ok((Box::new(ours), addr.clone()))
    }
}

/// A listener on a [`MemNetwork`]; dropping it unregisters the name.
#[derive(Debug)]
struct MemListener {
    net: MemNetwork,
    host: String,
    id: u64,
    rx: mpsc::Receiver<(MemStream, String)>,
}

#[async_trait]
impl Listener for MemListener {
    fn local_addr(&self) -> Address {
        Address::mem(self.host.clone())
    }

    async fn accept(&mut self) -> Result<(BoxStream, Address), TransportError> {
        match self.rx.recv().await {
            Some((stream, from)) => Ok((Box::new(stream), Address::mem(from))),
            None => Err(TransportError::Shutdown),
        }
    }
}

impl Drop for MemListener {
    fn drop(&mut self) {
        let mut st = lock(&self.net.net);
        // After a crash and a new listen, the name belongs to someone else.
        let ours = st
            .listeners
            .get(&self.host)
            .is_some_and(|(id, _)| *id == self.id);
        let removed = if ours {
            st.listeners.remove(&self.host)
        } else {
            None
        };
        drop(st);
        drop(removed);
    }
}

/// One connection: two pipes, `pipes[i]` carrying the bytes side `i` writes.
/// Side 0 is the dialer (`hosts[0]`), side 1 the acceptor.
#[derive(Debug)]
struct Conn {
    id: u64,
    hosts: [String; 2],
    state: Mutex<ConnState>,
}

#[derive(Debug)]
struct ConnState {
    reset: bool,
    /// Stream ends not yet dropped.
    ends: u8,
    pipes: [Pipe; 2],
}

#[derive(Debug, Default)]
struct Pipe {
    /// (deliver at, bytes), in write order with non-decreasing times.
    chunks: VecDeque<(Instant, BytesMut)>,
    len: usize,
    write_closed: bool,
    read_closed: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl Conn {
    fn reset(&self) {
        let mut st = lock(&self.state);
        st.reset = true;
        for pipe in &mut st.pipes {
            pipe.chunks.clear();
            pipe.len = 0;
            wake(&mut pipe.reader);
            wake(&mut pipe.writer);
        }
    }
}

/// One end of an in-memory connection.
struct MemStream {
    net: Arc<Mutex<NetState>>,
    conn: Arc<Conn>,
    /// Our side: we write `pipes[side]` and read `pipes[1 - side]`.
    side: usize,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl fmt::Debug for MemStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemStream")
            .field("local", &self.local())
            .field("peer", &self.peer())
            .field("conn", &self.conn.id)
            .finish_non_exhaustive()
    }
}

impl MemStream {
    fn new(net: &Arc<Mutex<NetState>>, conn: &Arc<Conn>, side: usize) -> Self {
        MemStream {
            net: net.clone(),
            conn: conn.clone(),
            side,
            sleep: None,
        }
    }

    fn local(&self) -> &str {
        &self.conn.hosts[self.side]
    }

    fn peer(&self) -> &str {
        &self.conn.hosts[1 - self.side]
    }
}

fn reset_err() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "in-memory connection reset")
}

impl AsyncRead for MemStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let cut = {
                let mut net = lock(&this.net);
                let cut = net.is_cut(this.local(), this.peer());
                if cut {
                    // Registered under the network lock, so `heal` cannot miss us.
                    net.parked
                        .insert((this.conn.id, this.side), cx.waker().clone());
                }
                cut
            };
            let mut st = lock(&this.conn.state);
            if st.reset {
                return Poll::Ready(Err(reset_err()));
            }
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let pipe = &mut st.pipes[1 - this.side];
            if cut {
                set_waker(&mut pipe.reader, cx);
                return Poll::Pending;
            }
            let now = Instant::now();
            let Some(&(first_due, _)) = pipe.chunks.front() else {
                if pipe.write_closed {
                    return Poll::Ready(Ok(())); // EOF
                }
                set_waker(&mut pipe.reader, cx);
                return Poll::Pending;
            };
            if first_due > now {
                set_waker(&mut pipe.reader, cx);
                drop(st);
                let sleep = match &mut this.sleep {
                    Some(s) if s.deadline() == first_due => s,
                    Some(s) => {
                        s.as_mut().reset(first_due);
                        s
                    }
                    // Needs a runtime with the time driver (any #[tokio::main/test]).
                    None => this
                        .sleep
                        .insert(Box::pin(tokio::time::sleep_until(first_due))),
                };
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => continue,
                    Poll::Pending => return Poll::Pending,
                }
            }
            while buf.remaining() > 0 {
                let Some((due, chunk)) = pipe.chunks.front_mut() else {
                    break;
                };
                if *due > now {
                    break;
                }
                let n = chunk.len().min(buf.remaining());
                buf.put_slice(&chunk[..n]);
                chunk.advance(n);
                pipe.len -= n;
                if chunk.is_empty() {
                    pipe.chunks.pop_front();
                }
            }
            wake(&mut pipe.writer);
            return Poll::Ready(Ok(()));
        }
    }
}

impl AsyncWrite for MemStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let latency = lock(&self.net).latency(self.local(), self.peer());
        let mut st = lock(&self.conn.state);
        if st.reset {
            return Poll::Ready(Err(reset_err()));
        }
        let pipe = &mut st.pipes[self.side];
        if pipe.write_closed || pipe.read_closed {
            // We shut down our write side, or the peer dropped its stream.
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room = PIPE_CAPACITY - pipe.len;
        if room == 0 {
            set_waker(&mut pipe.writer, cx);
            return Poll::Pending;
        }
        let n = buf.len().min(room);
        let due = Instant::now() + latency;
        match pipe.chunks.back_mut() {
            // Keep delivery times non-decreasing; bytes due together share a chunk.
            Some((last, chunk)) if *last >= due => chunk.extend_from_slice(&buf[..n]),
            _ => pipe.chunks.push_back((due, BytesMut::from(&buf[..n]))),
        }
        pipe.len += n;
        wake(&mut pipe.reader);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = lock(&self.conn.state);
        let pipe = &mut st.pipes[self.side];
        pipe.write_closed = true;
        wake(&mut pipe.reader);
        Poll::Ready(Ok(()))
    }
}

impl Drop for MemStream {
    fn drop(&mut self) {
        let last = {
            let mut st = lock(&self.conn.state);
            let ours = &mut st.pipes[self.side];
            ours.write_closed = true;
            wake(&mut ours.reader);
            let theirs = &mut st.pipes[1 - self.side];
            theirs.read_closed = true;
            theirs.chunks.clear();
            theirs.len = 0;
            wake(&mut theirs.writer);
            st.ends = st.ends.saturating_sub(1);
            st.ends == 0
        };
        let mut net = lock(&self.net);
        net.parked.remove(&(self.conn.id, self.side));
        if last {
            net.conns.remove(&self.conn.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::timeout;

    fn kind(e: TransportError) -> io::ErrorKind {
        match e {
            TransportError::Io(e) => e.kind(),
            other => panic!("expected an i/o error, got {other:?}"),
        }
    }

    /// `a` dials `b` (which listens); returns (a's stream, b's stream, b's listener).
    async fn pair(net: &MemNetwork, a: &str, b: &str) -> (BoxStream, BoxStream, Box<dyn Listener>) {
        let mut l = net.transport(b).listen(&Address::mem(b)).await.unwrap();
        let (sa, to) = net.transport(a).dial(&Address::mem(b)).await.unwrap();
        let (sb, from) = l.accept().await.unwrap();
        assert_eq!((to, from), (Address::mem(b), Address::mem(a)));
        (sa, sb, l)
    }

    fn expect_err<T, E>(r: Result<T, E>) -> E {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    async fn read_n(s: &mut BoxStream, n: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; n];
        s.read_exact(&mut buf).await.map(|_| buf)
    }

    #[tokio::test]
    async fn round_trip_both_ways() {
        let net = MemNetwork::new();
        let (mut a, mut b, l) = pair(&net, "a", "b").await;
        assert_eq!(l.local_addr(), Address::mem("b"));
        a.write_all(b"ping").await.unwrap();
        assert_eq!(read_n(&mut b, 4).await.unwrap(), b"ping");
        b.write_all(b"pong").await.unwrap();
        assert_eq!(read_n(&mut a, 4).await.unwrap(), b"pong");
        assert_eq!(net.transport("a").host(), "a");
    }

    #[tokio::test(start_paused = true)]
    async fn large_transfer_survives_backpressure() {
        let net = MemNetwork::new();
        let (mut a, mut b, _l) = pair(&net, "a", "b").await;
        let data: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        // Nobody reads yet: the queue takes exactly its capacity, then blocks.
        assert_eq!(a.write(&data).await.unwrap(), PIPE_CAPACITY);
        assert!(
            timeout(Duration::from_secs(1), a.write(b"x"))
                .await
                .is_err()
        );
        let rest = data[PIPE_CAPACITY..].to_vec();
        let writer = tokio::spawn(async move {
            a.write_all(&rest).await.unwrap();
            a.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert!(
            got == data,
            "{} bytes arrived, corrupted or reordered",
            got.len()
        );
    }

    #[tokio::test]
    async fn eof_after_shutdown_or_drop() {
        let net = MemNetwork::new();
        let (mut a, mut b, _l) = pair(&net, "a", "b").await;
        a.write_all(b"last words").await.unwrap();
        a.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words");
        assert_eq!(
            kind(a.write(b"x").await.unwrap_err().into()),
            io::ErrorKind::BrokenPipe
        );
        // The other direction still works, and dropping ends it the same way.
        b.write_all(b"ok").await.unwrap();
        drop(b);
        let mut got = Vec::new();
        a.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ok");
    }

    #[tokio::test(start_paused = true)]
    async fn latency_delays_delivery_exactly() {
        let net = MemNetwork::new();
        net.set_latency("a", "b", Duration::from_millis(50));
        net.set_default_latency(Duration::from_millis(7));
        let (mut a, mut b, _l) = pair(&net, "a", "b").await;
        for _ in 0..2 {
            let t0 = Instant::now();
            a.write_all(b"hi").await.unwrap();
            let early = timeout(Duration::from_millis(49), read_n(&mut b, 2)).await;
            assert!(early.is_err(), "delivered before the latency elapsed");
            assert_eq!(read_n(&mut b, 2).await.unwrap(), b"hi");
            assert_eq!(t0.elapsed(), Duration::from_millis(50));
            std::mem::swap(&mut a, &mut b); // now the other direction
        }
        // A link without its own setting uses the default.
        let (mut c, mut b2, _l) = pair(&net, "c", "b2").await;
        let t0 = Instant::now();
        c.write_all(b"x").await.unwrap();
        read_n(&mut b2, 1).await.unwrap();
        assert_eq!(t0.elapsed(), Duration::from_millis(7));
    }

    #[tokio::test(start_paused = true)]
    async fn partition_holds_bytes_and_heal_delivers_them_in_order() {
        let net = MemNetwork::new();
        let (mut a, mut b, _l) = pair(&net, "a", "b").await;
        let (mut c, mut bc, _lc) = pair(&net, "c", "b-side").await;
        a.write_all(b"one,").await.unwrap();
        net.partition(&["a"], &["b", "x"]);
        a.write_all(b"two,").await.unwrap();
        b.write_all(b"back").await.unwrap();
        let wait = Duration::from_secs(10);
        assert!(timeout(wait, read_n(&mut b, 1)).await.is_err());
        assert!(timeout(wait, read_n(&mut a, 1)).await.is_err());
        // Hosts outside the cut are unaffected.
        c.write_all(b"free").await.unwrap();
        assert_eq!(read_n(&mut bc, 4).await.unwrap(), b"free");
        // A reader parked on the cut wakes up on heal.
        let reader = tokio::spawn(async move { read_n(&mut b, 12).await.map(|v| (v, b)) });
        tokio::time::sleep(wait).await;
        a.write_all(b"three").await.unwrap();
        assert!(!reader.is_finished());
        net.heal();
        let (got, _b) = reader.await.unwrap().unwrap();
        assert_eq!(got, b"one,two,thre");
        assert_eq!(read_n(&mut a, 4).await.unwrap(), b"back");
    }

    #[tokio::test]
    async fn dial_across_partition_is_unreachable() {
        let net = MemNetwork::new();
        let _l = net.transport("b").listen(&Address::mem("b")).await.unwrap();
        net.partition(&["b"], &["a"]);
        let err = expect_err(net.transport("a").dial(&Address::mem("b")).await);
        assert_eq!(kind(err), io::ErrorKind::HostUnreachable);
        net.heal();
        assert!(net.transport("a").dial(&Address::mem("b")).await.is_ok());
    }

    #[tokio::test]
    async fn drop_link_resets_both_ends() {
        let net = MemNetwork::new();
        let (mut a, mut b, mut l) = pair(&net, "a", "b").await;
        let (_c, _bc) = (
            net.transport("c").dial(&Address::mem("b")).await.unwrap(),
            l.accept().await.unwrap(),
        );
        assert_eq!(net.open_connections(), 2);
        let pending = tokio::spawn(async move { read_n(&mut b, 1).await.map(|_| b) });
        tokio::task::yield_now().await;
        net.drop_link("b", "a");
        let err = expect_err(pending.await.unwrap());
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(
            a.write(b"x").await.unwrap_err().kind(),
            io::ErrorKind::ConnectionReset
        );
        assert_eq!(
            read_n(&mut a, 1).await.unwrap_err().kind(),
            io::ErrorKind::ConnectionReset
        );
        assert_eq!(net.open_connections(), 1);
        // New dials still work.
        let (mut a2, _) = net.transport("a").dial(&Address::mem("b")).await.unwrap();
        let (mut b2, _) = l.accept().await.unwrap();
        a2.write_all(b"again").await.unwrap();
        assert_eq!(read_n(&mut b2, 5).await.unwrap(), b"again");
    }

    #[tokio::test]
    async fn crash_removes_listener_and_resets_connections() {
        let net = MemNetwork::new();
        let (mut a, mut b, mut l) = pair(&net, "a", "b").await;
        let (mut c, mut bc, _lc) = pair(&net, "c", "d").await;
        net.crash("b");
        assert_eq!(
            a.write(b"x").await.unwrap_err().kind(),
            io::ErrorKind::ConnectionReset
        );
        assert_eq!(
            read_n(&mut b, 1).await.unwrap_err().kind(),
            io::ErrorKind::ConnectionReset
        );
        let err = expect_err(net.transport("a").dial(&Address::mem("b")).await);
        assert_eq!(kind(err), io::ErrorKind::ConnectionRefused);
        assert!(matches!(l.accept().await, Err(TransportError::Shutdown)));
        assert_eq!(net.open_connections(), 1);
        c.write_all(b"alive").await.unwrap();
        assert_eq!(read_n(&mut bc, 5).await.unwrap(), b"alive");
        // b restarts; dropping its old listener must not unregister the new one.
        let _l2 = net.transport("b").listen(&Address::mem("b")).await.unwrap();
        drop(l);
        assert!(net.transport("a").dial(&Address::mem("b")).await.is_ok());
    }

    #[tokio::test]
    async fn listen_and_dial_errors() {
        let net = MemNetwork::new();
        let t = net.transport("a");
        let l = t.listen(&Address::mem("a")).await.unwrap();
        assert_eq!(
            kind(t.listen(&Address::mem("a")).await.unwrap_err()),
            io::ErrorKind::AddrInUse
        );
        drop(l);
        let _l = t.listen(&Address::mem("a")).await.unwrap();
        assert!(matches!(
            t.listen(&Address::mem("b")).await,
            Err(TransportError::InvalidAddress { .. })
        ));
        let tcp: Address = "tcp://127.0.0.1:1".parse().unwrap();
        assert!(matches!(
            t.listen(&tcp).await,
            Err(TransportError::UnsupportedAddress(_))
        ));
        assert!(matches!(
            t.dial(&tcp).await,
            Err(TransportError::UnsupportedAddress(_))
        ));
        let err = expect_err(t.dial(&Address::mem("nobody")).await);
        assert_eq!(kind(err), io::ErrorKind::ConnectionRefused);
        // Self-dial is allowed; a full accept queue refuses.
        let mut held = Vec::new();
        for _ in 0..ACCEPT_BACKLOG {
            held.push(t.dial(&Address::mem("a")).await.unwrap());
        }
        let err = expect_err(t.dial(&Address::mem("a")).await);
        assert_eq!(kind(err), io::ErrorKind::ConnectionRefused);
        assert_eq!(net.open_connections(), ACCEPT_BACKLOG);
    }

    #[tokio::test]
    async fn dropped_reader_breaks_the_pipe() {
        let net = MemNetwork::new();
        let (mut a, b, _l) = pair(&net, "a", "b").await;
        a.write_all(&[0; 1000]).await.unwrap();
        drop(b);
        assert_eq!(
            a.write(b"x").await.unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
    }

    #[tokio::test]
    async fn open_connections_counts_until_both_ends_drop() {
        let net = MemNetwork::new();
        assert_eq!(net.open_connections(), 0);
        let (a, b, mut l) = pair(&net, "a", "b").await;
        let (c, _) = net.transport("c").dial(&Address::mem("b")).await.unwrap();
        assert_eq!(net.open_connections(), 2);
        drop(a);
        assert_eq!(net.open_connections(), 2);
        drop(b);
        assert_eq!(net.open_connections(), 1);
        drop(c);
        drop(l.accept().await.unwrap());
        assert_eq!(net.open_connections(), 0);
        assert!(format!("{net:?}").contains("open_connections: 0"));
    }
}
