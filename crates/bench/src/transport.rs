//! The `transport` bench: meshwork connections against raw framed TCP, and
//! encrypted meshwork against plaintext meshwork.
//!
//! Everything runs in this process on loopback. Each measurement has three
//! sides, run in turn ([`rotate`]):
//! - `raw`: tokio's `Framed<TcpStream, LengthDelimitedCodec>` with
//!   `TCP_NODELAY`, an echo server task per connection;
//! - `plaintext`: two [`Endpoint`]s over [`TcpTransport`] with
//!   [`Config::with_insecure_plaintext`], the server answering every Concern
//!   request with a Concern reply carrying the same payload and request id;
//! - `noise`: the same with the default [`Config`], i.e. Noise-encrypted.
//!
//! Both raw and meshwork batch what is ready: the raw echo server and the raw
//! pipelined client write every frame already received before flushing, as
//! meshwork's writer task does, so the comparison is with raw tokio used well.
//!
//! Figures, for payloads of 64 B and 64 KiB, first those of the foundation
//! issue (plaintext meshwork against raw TCP):
//! - `rtt_seq_*`: one request at a time, median round trip in µs
//!   (target ≤ 1.2× raw);
//! - `pipelined64_*`: 64 requests in flight, replies per second
//!   (target ≥ 0.7× raw);
//! - `oneway_*`: the client sends as fast as it can, MiB/s of payload from
//!   the first send until the server has the last frame (no target);
//!
//! then those of the secure-transport issue (encrypted meshwork), measured in
//! the same runs as the plaintext figures:
//! - `rtt_seq_*_noise` against raw (target ≤ 1.3× raw);
//! - `oneway_*_noise` against plaintext meshwork, so the ratio is the share
//!   of plaintext throughput kept with encryption (target for 64 KiB ≥ 0.5);
//! - `pipelined64_64B_noise` against raw (no target);
//! - `idle_conn_mem_noise_per_end`: resident memory per end of an idle
//!   encrypted connection, against plaintext (target ≤ 64 KiB, absolute);
//!   see [`crate::idle`].

use std::collections::VecDeque;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use bytes::Bytes;
use futures_util::{FutureExt as _, SinkExt, StreamExt as _};
use meshwork_transport::{
    Address, Config, Connection, Endpoint, Priority, TcpTransport, TransportError,
};
use meshwork_wire::Message;
use meshwork_wire::proto::{Concern, ConcernKind};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::harness::{Options, Run, Samples, rotate};
use crate::idle;
use crate::report::{Better, Figure};

/// The bench's name, in every figure.
pub(crate) const BENCH: &str = "transport";
/// Network id of both endpoints.
pub(crate) const NETWORK: &str = "bench";
/// The Concern command used for every request.
const COMMAND: u32 = 1;
/// Requests in flight in the pipelined figures.
pub(crate) const DEPTH: usize = 64;
/// Payload sizes, with the suffix of their metric names.
const SIZES: [(usize, &str); 2] = [(64, "64B"), (64 * 1024, "64KiB")];
/// Time allowed for one run of one side, set-up and tear-down included.
const RUN_LIMIT: Duration = Duration::from_secs(30);
/// Sequential RTT, plaintext: meshwork at most this many times raw.
const RTT_TARGET: f64 = 1.2;
/// Sequential RTT, encrypted: meshwork at most this many times raw.
const RTT_NOISE_TARGET: f64 = 1.3;
/// Pipelined throughput, plaintext: meshwork at least this share of raw.
const PIPELINED_TARGET: f64 = 0.7;
/// One-way throughput of 64 KiB frames: encrypted at least this share of
/// plaintext.
const ONEWAY_NOISE_TARGET: f64 = 0.5;

/// The sides of a measurement, in the order [`rotate`] reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Raw framed TCP.
    Raw,
    /// meshwork without encryption.
    Plaintext,
    /// meshwork with the default configuration: Noise.
    Noise,
}

impl Side {
    /// The name in progress lines and in the table's `vs` column.
    fn name(self) -> &'static str {
        match self {
            Side::Raw => "raw",
            Side::Plaintext => "plaintext",
            Side::Noise => "noise",
        }
    }
}

/// Every side, in the order of [`Side`].
const ALL_SIDES: [Side; 3] = [Side::Raw, Side::Plaintext, Side::Noise];

/// How much work each measurement does, per payload size (index into [`SIZES`]).
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Sequential round trips before measuring.
    rtt_warmup: [usize; 2],
    /// Sequential round trips measured, at most.
    rtt_rounds: [usize; 2],
    /// Stop measuring round trips after this long even if fewer were done.
    rtt_budget: Duration,
    /// Pipelined traffic before measuring.
    pipelined_warmup: Duration,
    /// Pipelined traffic measured.
    pipelined_window: Duration,
    /// One-way frames sent and acknowledged before measuring.
    oneway_warmup: [usize; 2],
    /// One-way frames measured.
    oneway_count: [usize; 2],
    /// The idle-connection measurement.
    idle: idle::Plan,
}

impl Plan {
    /// The plan for a full run, or a shorter one with `quick`.
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                rtt_warmup: [1_000, 100],
                rtt_rounds: [8_000, 800],
                rtt_budget: Duration::from_millis(400),
                pipelined_warmup: Duration::from_millis(50),
                pipelined_window: Duration::from_millis(250),
                oneway_warmup: [5_000, 50],
                oneway_count: [100_000, 2_000],
                idle: idle::Plan::QUICK,
            }
        } else {
            Plan {
                rtt_warmup: [2_000, 200],
                rtt_rounds: [20_000, 2_000],
                rtt_budget: Duration::from_millis(1_000),
                pipelined_warmup: Duration::from_millis(100),
                pipelined_window: Duration::from_millis(500),
                oneway_warmup: [10_000, 100],
                oneway_count: [300_000, 4_000],
                idle: idle::Plan::FULL,
            }
        }
    }
}

/// The medians of one measurement, by side.
struct Medians {
    sides: Vec<Side>,
    samples: Samples,
}

impl Medians {
    /// The median of `side` (NaN if it was not measured).
    fn of(&self, side: Side) -> f64 {
        self.sides
            .iter()
            .position(|s| *s == side)
            .map_or(f64::NAN, |i| self.samples.median(i))
    }

    /// `side` as a baseline: its name and median.
    fn vs(&self, side: Side) -> (&'static str, f64) {
        (side.name(), self.of(side))
    }
}

/// Measures `sides` in turn ([`rotate`]); `run(side)` makes one run of a side.
async fn measure<F>(
    metric: &str,
    unit: &str,
    opts: &Options,
    sides: &[Side],
    mut run: F,
) -> Result<Medians>
where
    F: FnMut(Side) -> Run,
{
    let names: Vec<&str> = sides.iter().map(|s| s.name()).collect();
    let samples = rotate(metric, unit, opts, RUN_LIMIT, &names, |i| run(sides[i])).await?;
    Ok(Medians {
        sides: sides.to_vec(),
        samples,
    })
}

/// Runs the bench: the foundation figures (plaintext meshwork against raw),
/// then the secure-transport figures (encrypted meshwork), every one with
/// its baseline measured in the same run.
pub(crate) async fn run(opts: &Options) -> Result<Vec<Figure>> {
    use Side::{Noise, Plaintext, Raw};
    let plan = Plan::new(opts.quick);
    // Before anything else: a too low limit on open files fails at once.
    let idle_plan = idle::fit_fd_limit(plan.idle)?;
    // The figures of the foundation issue, and of the secure-transport issue.
    let mut plain = Vec::new();
    let mut noise = Vec::new();

    for (i, &(size, label)) in SIZES.iter().enumerate() {
        let metric = format!("rtt_seq_{label}");
        let (warmup, rounds, budget) = (plan.rtt_warmup[i], plan.rtt_rounds[i], plan.rtt_budget);
        let m = measure(&metric, "us", opts, &ALL_SIDES, |side| match side {
            Raw => raw_rtt(size, warmup, rounds, budget).boxed(),
            _ => mesh_rtt(side == Plaintext, size, warmup, rounds, budget).boxed(),
        })
        .await?;
        let unit = "us";
        plain.push(
            Figure::compared(
                BENCH,
                &metric,
                unit,
                Better::Lower,
                m.of(Plaintext),
                m.vs(Raw),
            )
            .with_target(RTT_TARGET),
        );
        let metric = format!("{metric}_noise");
        noise.push(
            Figure::compared(BENCH, metric, unit, Better::Lower, m.of(Noise), m.vs(Raw))
                .with_target(RTT_NOISE_TARGET),
        );
    }

    for &(size, label) in &SIZES {
        let metric = format!("pipelined{DEPTH}_{label}");
        let window = Window {
            warmup: plan.pipelined_warmup,
            length: plan.pipelined_window,
        };
        // Encrypted only for small frames (what the issue asks for).
        let sides: &[Side] = if size == 64 {
            &ALL_SIDES
        } else {
            &[Raw, Plaintext]
        };
        let m = measure(&metric, "msg/s", opts, sides, |side| match side {
            Raw => raw_pipelined(size, window).boxed(),
            _ => mesh_pipelined(side == Plaintext, size, window).boxed(),
        })
        .await?;
        let unit = "msg/s";
        plain.push(
            Figure::compared(
                BENCH,
                &metric,
                unit,
                Better::Higher,
                m.of(Plaintext),
                m.vs(Raw),
            )
            .with_target(PIPELINED_TARGET),
        );
        if sides.contains(&Noise) {
            let metric = format!("{metric}_noise");
            noise.push(Figure::compared(
                BENCH,
                metric,
                unit,
                Better::Higher,
                m.of(Noise),
                m.vs(Raw),
            ));
        }
    }

    for (i, &(size, label)) in SIZES.iter().enumerate() {
        let metric = format!("oneway_{label}");
        let (warmup, count) = (plan.oneway_warmup[i], plan.oneway_count[i]);
        let m = measure(&metric, "MiB/s", opts, &ALL_SIDES, |side| match side {
            Raw => raw_oneway(size, warmup, count).boxed(),
            _ => mesh_oneway(side == Plaintext, size, warmup, count).boxed(),
        })
        .await?;
        let unit = "MiB/s";
        plain.push(Figure::compared(
            BENCH,
            &metric,
            unit,
            Better::Higher,
            m.of(Plaintext),
            m.vs(Raw),
        ));
        // Against plaintext meshwork: the ratio is what encryption leaves.
        let metric = format!("{metric}_noise");
        let figure = Figure::compared(
            BENCH,
            metric,
            unit,
            Better::Higher,
            m.of(Noise),
            m.vs(Plaintext),
        );
        noise.push(if size == 64 * 1024 {
            figure.with_target(ONEWAY_NOISE_TARGET)
        } else {
            figure
        });
    }

    noise.push(idle::measure(opts, idle_plan).await?);

    // The secure-transport issue's order: RTT, one-way, pipelined, memory.
    let rank = |f: &Figure| {
        ["rtt_seq", "oneway", "pipelined", "idle"]
            .iter()
            .position(|p| f.metric.starts_with(p))
    };
    noise.sort_by_key(rank);
    plain.extend(noise);
    Ok(plain)
}

/// A payload of `size` bytes.
pub(crate) fn payload(size: usize) -> Bytes {
    Bytes::from(vec![0xa5; size])
}

/// The median of `samples`, in microseconds.
pub(crate) fn median_micros(samples: &mut [Duration]) -> Result<f64> {
    ensure!(!samples.is_empty(), "no round trip was measured");
    samples.sort_unstable();
    let n = samples.len();
    let mid = if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2
    };
    Ok(mid.as_secs_f64() * 1e6)
}

/// MiB per second for `count` payloads of `size` bytes in `elapsed`.
fn mib_per_sec(count: usize, size: usize, elapsed: Duration) -> f64 {
    (count * size) as f64 / elapsed.as_secs_f64() / (1024.0 * 1024.0)
}

/// The server's side of the one-way figures: reports the `Instant` at which
/// the frame count reached each mark.
struct Marks {
    /// Frame counts, increasing, and who to tell when each is reached.
    pending: VecDeque<(usize, oneshot::Sender<Instant>)>,
}

impl Marks {
    /// Marks at `warmup` frames and at `warmup + count` frames, and the
    /// receivers for the client.
    fn new(
        warmup: usize,
        count: usize,
    ) -> (Self, oneshot::Receiver<Instant>, oneshot::Receiver<Instant>) {
        let (warm_tx, warm_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let pending = VecDeque::from([(warmup, warm_tx), (warmup + count, done_tx)]);
        (Marks { pending }, warm_rx, done_rx)
    }

    /// Called with the number of frames received so far.
    fn reached(&mut self, received: usize) {
        while self.pending.front().is_some_and(|(n, _)| *n <= received) {
            if let Some((_, tx)) = self.pending.pop_front() {
                // Fails only if the client stopped waiting, i.e. failed already.
                let _ = tx.send(Instant::now());
            }
        }
    }
}

/// The measurement window of the pipelined figures, counted in replies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    /// Traffic before counting starts.
    pub(crate) warmup: Duration,
    /// How long replies are counted.
    pub(crate) length: Duration,
}

/// Keeps [`DEPTH`] calls made by `call` in flight from one task, making a
/// new one as each completes, and checks each result with `check`; replies
/// per second within `window`.
pub(crate) async fn keep_in_flight<F: Future>(
    window: Window,
    mut call: impl FnMut() -> F,
    mut check: impl FnMut(F::Output) -> Result<()>,
) -> Result<f64> {
    let mut pending: futures_util::stream::FuturesUnordered<F> =
        (0..DEPTH).map(|_| call()).collect();
    let mut counter = WindowCounter::new(window);
    while let Some(reply) = pending.next().await {
        check(reply)?;
        if counter.reply() {
            pending.push(call());
        }
    }
    counter.rate()
}

/// Counts replies within a [`Window`].
pub(crate) struct WindowCounter {
    window: Window,
    warm_until: Instant,
    started: Option<Instant>,
    counted: u64,
    elapsed: Option<Duration>,
}

impl WindowCounter {
    pub(crate) fn new(window: Window) -> Self {
        WindowCounter {
            window,
            warm_until: Instant::now() + window.warmup,
            started: None,
            counted: 0,
            elapsed: None,
        }
    }

    /// Records a reply; returns whether to keep sending.
    pub(crate) fn reply(&mut self) -> bool {
        if self.elapsed.is_some() {
            return false;
        }
        let now = Instant::now();
        match self.started {
            None if now >= self.warm_until => self.started = Some(now),
            None => {}
            Some(start) => {
                self.counted += 1;
                let elapsed = now - start;
                if elapsed >= self.window.length {
                    self.elapsed = Some(elapsed);
                    return false;
                }
            }
        }
        true
    }

    /// Replies per second over the window.
    pub(crate) fn rate(&self) -> Result<f64> {
        let elapsed = self.elapsed.context("the window never closed")?;
        Ok(self.counted as f64 / elapsed.as_secs_f64())
    }
}

// ---------------------------------------------------------------------------
// Baseline: Framed<TcpStream, LengthDelimitedCodec>.

/// A raw framed TCP stream.
type Raw = Framed<TcpStream, LengthDelimitedCodec>;

/// A raw client stream and the task serving the other end.
struct RawPair<T> {
    client: Raw,
    server: JoinHandle<Result<T>>,
}

impl<T> RawPair<T> {
    /// Connects a client to a fresh listener whose single connection is
    /// handed to `serve`.
    async fn connect<S, F>(serve: S) -> Result<Self>
    where
        S: FnOnce(Raw) -> F + Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .context("binding the raw listener")?;
        let addr = listener.local_addr().context("raw listener address")?;
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.context("raw accept")?;
            serve(raw_framed(stream)?).await
        });
        let client = match TcpStream::connect(addr).await {
            Ok(stream) => raw_framed(stream),
            Err(e) => Err(e).context("raw connect"),
        };
        match client {
            Ok(client) => Ok(RawPair { client, server }),
            Err(e) => {
                server.abort();
                Err(e)
            }
        }
    }

    /// Closes the client and waits for the server task's result.
    async fn finish(self) -> Result<T> {
        drop(self.client);
        self.server.await.context("raw server task")?
    }
}

/// Frames `stream` with `TCP_NODELAY` on.
fn raw_framed(stream: TcpStream) -> Result<Raw> {
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    Ok(Framed::new(stream, LengthDelimitedCodec::new()))
}

/// Writes out everything fed to `framed`.
async fn raw_flush(framed: &mut Raw) -> std::io::Result<()> {
    SinkExt::<Bytes>::flush(framed).await
}

/// Receives the next frame; the stream ending is an error.
async fn raw_next(framed: &mut Raw) -> Result<Bytes> {
    Ok(framed
        .next()
        .await
        .context("raw stream closed early")?
        .context("raw read")?
        .freeze())
}

/// A frame already buffered or readable without waiting, if any.
fn raw_ready(framed: &mut Raw) -> Result<Option<Bytes>> {
    match framed.next().now_or_never() {
        None => Ok(None),
        Some(None) => bail!("raw stream closed early"),
        Some(Some(frame)) => Ok(Some(frame.context("raw read")?.freeze())),
    }
}

/// Echoes every frame back, writing all frames that are ready before
/// flushing, until the client closes.
async fn raw_echo(mut framed: Raw) -> Result<()> {
    while let Some(frame) = framed.next().await {
        framed
            .feed(frame.context("echo read")?.freeze())
            .await
            .context("echo write")?;
        loop {
            match framed.next().now_or_never() {
                None => break,
                Some(None) => {
                    raw_flush(&mut framed).await.context("echo flush")?;
                    return Ok(());
                }
                Some(Some(frame)) => framed
                    .feed(frame.context("echo read")?.freeze())
                    .await
                    .context("echo write")?,
            }
        }
        raw_flush(&mut framed).await.context("echo flush")?;
    }
    Ok(())
}

/// Counts incoming frames of `size` bytes, firing `marks`, until the client closes.
async fn raw_sink(mut framed: Raw, size: usize, mut marks: Marks) -> Result<usize> {
    let mut received = 0;
    while let Some(frame) = framed.next().await {
        let frame = frame.context("sink read")?;
        ensure!(
            frame.len() == size,
            "frame of {} bytes, sent {size}",
            frame.len()
        );
        received += 1;
        marks.reached(received);
    }
    Ok(received)
}

/// Sequential round trips over raw framed TCP; the median in µs.
pub(crate) async fn raw_rtt(
    size: usize,
    warmup: usize,
    rounds: usize,
    budget: Duration,
) -> Result<f64> {
    let mut samples = raw_rtt_samples(size, warmup, rounds, budget).await?;
    median_micros(&mut samples)
}

/// The round trips of [`raw_rtt`], every one measured, in order.
pub(crate) async fn raw_rtt_samples(
    size: usize,
    warmup: usize,
    rounds: usize,
    budget: Duration,
) -> Result<Vec<Duration>> {
    let payload = payload(size);
    let mut pair = RawPair::connect(raw_echo).await?;
    let mut samples = Vec::with_capacity(rounds);
    let mut deadline = None;
    for n in 0..warmup + rounds {
        if n == warmup {
            deadline = Some(Instant::now() + budget);
        }
        let start = Instant::now();
        pair.client
            .send(payload.clone())
            .await
            .context("raw send")?;
        let reply = raw_next(&mut pair.client).await?;
        let rtt = start.elapsed();
        ensure!(
            reply.len() == size,
            "reply of {} bytes, sent {size}",
            reply.len()
        );
        if n >= warmup {
            samples.push(rtt);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    pair.finish().await?;
    Ok(samples)
}

/// [`DEPTH`] requests in flight over raw framed TCP; replies per second.
pub(crate) async fn raw_pipelined(size: usize, window: Window) -> Result<f64> {
    let payload = payload(size);
    let mut pair = RawPair::connect(raw_echo).await?;
    let client = &mut pair.client;
    for _ in 0..DEPTH {
        client.feed(payload.clone()).await.context("raw send")?;
    }
    raw_flush(client).await.context("raw flush")?;
    let mut in_flight = DEPTH;
    let mut counter = WindowCounter::new(window);
    let mut next = Some(raw_next(client).await?);
    while let Some(reply) = next {
        ensure!(
            reply.len() == size,
            "reply of {} bytes, sent {size}",
            reply.len()
        );
        in_flight -= 1;
        if counter.reply() {
            client.feed(payload.clone()).await.context("raw send")?;
            in_flight += 1;
        }
        next = match raw_ready(client)? {
            Some(reply) => Some(reply),
            None if in_flight == 0 => None,
            None => {
                raw_flush(client).await.context("raw flush")?;
                Some(raw_next(client).await?)
            }
        };
    }
    pair.finish().await?;
    counter.rate()
}

/// One-way throughput over raw framed TCP; MiB/s of payload.
async fn raw_oneway(size: usize, warmup: usize, count: usize) -> Result<f64> {
    let payload = payload(size);
    let (marks, warm, done) = Marks::new(warmup, count);
    let mut pair = RawPair::connect(move |framed| raw_sink(framed, size, marks)).await?;
    let client = &mut pair.client;
    for _ in 0..warmup {
        client.feed(payload.clone()).await.context("raw send")?;
    }
    raw_flush(client).await.context("raw flush")?;
    warm.await.context("raw sink ended before the warm-up")?;
    let start = Instant::now();
    for _ in 0..count {
        client.feed(payload.clone()).await.context("raw send")?;
    }
    raw_flush(client).await.context("raw flush")?;
    let last = done.await.context("raw sink ended early")?;
    let received = pair.finish().await?;
    ensure!(received == warmup + count, "sink got {received} frames");
    Ok(mib_per_sec(
        count,
        size,
        last.saturating_duration_since(start),
    ))
}

// ---------------------------------------------------------------------------
// meshwork: two Endpoints over TcpTransport.

/// Two endpoints, the client's connection, and the task serving the
/// server's end of it.
struct MeshPair<T> {
    client: Endpoint,
    server: Endpoint,
    conn: Connection,
    task: JoinHandle<Result<T>>,
}

impl<T> MeshPair<T> {
    /// Starts a server endpoint on loopback, connects a client endpoint to
    /// it, and hands the server's end of the connection to `serve`. Both
    /// endpoints use [`mesh_config`].
    async fn connect<S, F>(plaintext: bool, serve: S) -> Result<Self>
    where
        S: FnOnce(Connection) -> F + Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let server = Endpoint::new(mesh_config(plaintext), TcpTransport::new());
        let listen: Address = "tcp://127.0.0.1:0".parse().context("listen address")?;
        let addr = server.listen(&listen).await.context("meshwork listen")?;
        let acceptor = server.clone();
        let task = tokio::spawn(async move {
            let conn = acceptor
                .accept()
                .await
                .context("server endpoint stopped before accepting")?;
            serve(conn).await
        });
        let client = Endpoint::new(mesh_config(plaintext), TcpTransport::new());
        let conn = match client.connect(&addr).await {
            Ok(conn) => conn,
            Err(e) => {
                // Ends the acceptor task too.
                client.shutdown().await;
                server.shutdown().await;
                return Err(e).context("meshwork connect");
            }
        };
        Ok(MeshPair {
            client,
            server,
            conn,
            task,
        })
    }

    /// Shuts the client down (the server sees a Disconnect), waits for the
    /// server task's result, and shuts the server down.
    async fn finish(self) -> Result<T> {
        self.client.shutdown().await;
        drop(self.conn);
        let result = self.task.await.context("meshwork server task");
        self.server.shutdown().await;
        result?
    }
}

/// The configuration of each endpoint: the defaults (encrypted, with a
/// fresh identity), or the defaults without encryption when `plaintext`.
fn mesh_config(plaintext: bool) -> Config {
    let config = Config::new(NETWORK);
    if plaintext {
        config.with_insecure_plaintext()
    } else {
        config
    }
}

/// A Concern request.
fn request(request_id: u64, payload: &Bytes) -> Message {
    Message::Concern(Concern {
        command: COMMAND,
        request_id,
        kind: ConcernKind::Request as i32,
        payload: payload.clone(),
        ..Default::default()
    })
}

/// Checks that `msg` is the reply to request `request_id` with `size` bytes.
fn check_reply(msg: &Message, request_id: u64, size: usize) -> Result<()> {
    let Message::Concern(c) = msg else {
        bail!("expected a Concern reply, got {}", msg.kind());
    };
    ensure!(
        c.kind == ConcernKind::Reply as i32 && c.command == COMMAND,
        "not a reply: kind {} command {}",
        c.kind,
        c.command
    );
    ensure!(
        c.request_id == request_id,
        "reply to request {}, expected {request_id}",
        c.request_id
    );
    ensure!(
        c.payload.len() == size,
        "reply of {} bytes, sent {size}",
        c.payload.len()
    );
    Ok(())
}

/// The next Concern from the peer; `None` once the peer disconnected.
async fn mesh_next(conn: &mut Connection) -> Result<Option<Concern>> {
    match conn.recv().await {
        Ok(Message::Concern(c)) => Ok(Some(c)),
        Ok(Message::Disconnect(_)) | Err(TransportError::NotConnected) => Ok(None),
        Ok(other) => bail!("unexpected {} message", other.kind()),
        Err(e) => Err(e).context("meshwork recv"),
    }
}

/// Answers every request with a reply carrying the same payload and request
/// id, until the client disconnects.
async fn mesh_echo(mut conn: Connection) -> Result<()> {
    while let Some(c) = mesh_next(&mut conn).await? {
        let reply = Message::Concern(Concern {
            kind: ConcernKind::Reply as i32,
            ..c
        });
        match conn.send(reply, Priority::Normal).await {
            Ok(()) => {}
            // The client is going away; it checks it got every reply.
            Err(TransportError::NotConnected) => break,
            Err(e) => return Err(e).context("meshwork reply"),
        }
    }
    Ok(())
}

/// Counts incoming requests of `size` bytes, firing `marks`, until the
/// client disconnects.
async fn mesh_sink(mut conn: Connection, size: usize, mut marks: Marks) -> Result<usize> {
    let mut received = 0;
    while let Some(c) = mesh_next(&mut conn).await? {
        ensure!(
            c.payload.len() == size,
            "frame of {} bytes, sent {size}",
            c.payload.len()
        );
        received += 1;
        marks.reached(received);
    }
    Ok(received)
}

/// Sequential round trips between two endpoints; the median in µs.
pub(crate) async fn mesh_rtt(
    plaintext: bool,
    size: usize,
    warmup: usize,
    rounds: usize,
    budget: Duration,
) -> Result<f64> {
    let payload = payload(size);
    let mut pair = MeshPair::connect(plaintext, mesh_echo).await?;
    let mut samples = Vec::with_capacity(rounds);
    let mut deadline = None;
    for n in 0..warmup + rounds {
        if n == warmup {
            deadline = Some(Instant::now() + budget);
        }
        let id = n as u64 + 1;
        let start = Instant::now();
        pair.conn
            .send(request(id, &payload), Priority::Normal)
            .await
            .context("meshwork send")?;
        let reply = pair.conn.recv().await.context("meshwork recv")?;
        let rtt = start.elapsed();
        check_reply(&reply, id, size)?;
        if n >= warmup {
            samples.push(rtt);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    pair.finish().await?;
    median_micros(&mut samples)
}

/// [`DEPTH`] requests in flight between two endpoints; replies per second.
pub(crate) async fn mesh_pipelined(plaintext: bool, size: usize, window: Window) -> Result<f64> {
    let payload = payload(size);
    let mut pair = MeshPair::connect(plaintext, mesh_echo).await?;
    let conn = &mut pair.conn;
    let mut sent = 0u64;
    let mut answered = 0u64;
    for _ in 0..DEPTH {
        sent += 1;
        conn.send(request(sent, &payload), Priority::Normal)
            .await
            .context("meshwork send")?;
    }
    let mut counter = WindowCounter::new(window);
    while answered < sent {
        let reply = conn.recv().await.context("meshwork recv")?;
        answered += 1;
        check_reply(&reply, answered, size)?;
        if counter.reply() {
            sent += 1;
            conn.send(request(sent, &payload), Priority::Normal)
                .await
                .context("meshwork send")?;
        }
    }
    pair.finish().await?;
    counter.rate()
}

/// One-way throughput between two endpoints; MiB/s of payload.
async fn mesh_oneway(plaintext: bool, size: usize, warmup: usize, count: usize) -> Result<f64> {
    let payload = payload(size);
    let (marks, warm, done) = Marks::new(warmup, count);
    let pair = MeshPair::connect(plaintext, move |conn| mesh_sink(conn, size, marks)).await?;
    // request_id 0: no reply wanted.
    for _ in 0..warmup {
        pair.conn
            .send(request(0, &payload), Priority::Normal)
            .await
            .context("meshwork send")?;
    }
    warm.await
        .context("meshwork sink ended before the warm-up")?;
    let start = Instant::now();
    for _ in 0..count {
        pair.conn
            .send(request(0, &payload), Priority::Normal)
            .await
            .context("meshwork send")?;
    }
    let last = done.await.context("meshwork sink ended early")?;
    let received = pair.finish().await?;
    ensure!(received == warmup + count, "sink got {received} frames");
    Ok(mib_per_sec(
        count,
        size,
        last.saturating_duration_since(start),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_counts_only_inside_the_window() {
        let mut counter = WindowCounter::new(Window {
            warmup: Duration::ZERO,
            length: Duration::from_millis(20),
        });
        assert!(counter.reply()); // opens the window
        assert!(counter.reply());
        std::thread::sleep(Duration::from_millis(25));
        assert!(!counter.reply()); // closes it
        assert!(!counter.reply());
        assert_eq!(counter.counted, 2);
        assert!(counter.rate().unwrap() > 0.0);
    }

    #[tokio::test]
    async fn marks_fire_in_order() {
        let (mut marks, warm, done) = Marks::new(2, 3);
        marks.reached(1);
        marks.reached(2);
        let warm_at = warm.await.unwrap();
        marks.reached(5);
        assert!(done.await.unwrap() >= warm_at);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_measurement_runs_once() {
        let window = Window {
            warmup: Duration::from_millis(5),
            length: Duration::from_millis(20),
        };
        let budget = Duration::from_millis(50);
        for size in [64, 64 * 1024] {
            assert!(raw_rtt(size, 5, 20, budget).await.unwrap() > 0.0);
            assert!(raw_pipelined(size, window).await.unwrap() > 0.0);
            assert!(raw_oneway(size, 10, 100).await.unwrap() > 0.0);
            for plaintext in [false, true] {
                assert!(mesh_rtt(plaintext, size, 5, 20, budget).await.unwrap() > 0.0);
                assert!(mesh_pipelined(plaintext, size, window).await.unwrap() > 0.0);
                assert!(mesh_oneway(plaintext, size, 10, 100).await.unwrap() > 0.0);
            }
        }
    }
}
