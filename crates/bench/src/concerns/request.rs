//! Request/reply through a concern over loopback TCP: `request_seq_64B`
//! and `pipelined64_64B`, each with `_noise` and `_layer` variants.
//!
//! Each run of a side sets up its own pair on `127.0.0.1` (not timed) and
//! tears it down after. The sides, taken in turn:
//!
//! - `raw`: tokio's `Framed<TcpStream, LengthDelimitedCodec>` with
//!   `TCP_NODELAY` and an echo task, the `transport` bench's baseline
//!   ([`crate::transport::raw_rtt`], [`crate::transport::raw_pipelined`]);
//! - `endpoints`: two bare plaintext [`Endpoint`]s, the server echoing each
//!   Concern request frame as a reply frame, the `transport` bench's
//!   meshwork side ([`crate::transport::mesh_rtt`],
//!   [`crate::transport::mesh_pipelined`]);
//! - `plaintext`: two nodes, each an [`Endpoint`] with
//!   [`Config::with_insecure_plaintext`] under a [`PeerManager`] with the
//!   default [`PeersConfig`] and [`Concerns`] with the echo concern (command
//!   7, default concurrency 16); the client node is seeded with the server
//!   and calls [`Context::request`];
//! - `noise`: the same with the default [`Config`] (Noise).
//!
//! The sequential figures measure each call from `request` to its reply
//! (the median, in µs); the pipelined ones keep [`DEPTH`] calls in flight
//! from one task (a `FuturesUnordered`, refilled as each reply arrives) and
//! count replies per second in a window after a warm-up, exactly as the raw
//! and bare-endpoint sides count theirs.
//!
//! [`Context::request`]: meshwork_concerns::Context::request
//! [`Endpoint`]: meshwork_transport::Endpoint
//! [`PeerManager`]: meshwork_peers::PeerManager

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use futures_util::FutureExt as _;
use meshwork_concerns::Concerns;
use meshwork_peers::{PeerManager, PeersConfig};
use meshwork_transport::{Address, Config, Endpoint, TcpTransport};
use meshwork_wire::NodeId;

use super::{BENCH, ECHO, Echo, PAYLOAD, REQUEST_TIMEOUT, check_echo, median_micros, stop};
use crate::harness::{Options, Run, Samples, rotate};
use crate::report::{Better, Figure};
use crate::transport::{
    DEPTH, NETWORK, Window, keep_in_flight, mesh_pipelined, mesh_rtt, payload, raw_pipelined,
    raw_rtt,
};

/// Time allowed for one run of one side, set-up and tear-down included.
const RUN_LIMIT: Duration = Duration::from_secs(30);
/// Time for the two nodes to link up before the run fails.
const LINK_LIMIT: Duration = Duration::from_secs(10);
/// Pipelined request/reply, plaintext: at least this share of raw TCP.
const PIPELINED_TARGET: f64 = 0.5;

/// How much work each run does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// Sequential calls before measuring.
    warmup: usize,
    /// Sequential calls measured, at most.
    rounds: usize,
    /// Stop measuring sequential calls after this long even if fewer were
    /// done.
    budget: Duration,
    /// The pipelined measurement window.
    window: Window,
}

impl Plan {
    /// A full run.
    pub(crate) const FULL: Plan = Plan {
        warmup: 2_000,
        rounds: 20_000,
        budget: Duration::from_millis(1_000),
        window: Window {
            warmup: Duration::from_millis(100),
            length: Duration::from_millis(500),
        },
    };
    /// A quick run.
    pub(crate) const QUICK: Plan = Plan {
        warmup: 500,
        rounds: 8_000,
        budget: Duration::from_millis(300),
        window: Window {
            warmup: Duration::from_millis(50),
            length: Duration::from_millis(250),
        },
    };
}

/// The sides of a measurement, in the order [`rotate`] reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Raw framed TCP.
    Raw,
    /// Bare plaintext endpoints.
    Endpoints,
    /// The concerns layer without encryption.
    Plaintext,
    /// The concerns layer with the default configuration: Noise.
    Noise,
}

impl Side {
    /// The name in progress lines and in the table's `vs` column.
    fn name(self) -> &'static str {
        match self {
            Side::Raw => "raw",
            Side::Endpoints => "endpoints",
            Side::Plaintext => "plaintext",
            Side::Noise => "noise",
        }
    }
}

/// Every side, in the order of [`Side`].
const SIDES: [Side; 4] = [Side::Raw, Side::Endpoints, Side::Plaintext, Side::Noise];

/// The median of `side` in `samples` (measured with [`SIDES`]).
fn of(samples: &Samples, side: Side) -> f64 {
    SIDES
        .iter()
        .position(|s| *s == side)
        .map_or(f64::NAN, |i| samples.median(i))
}

/// `side` as a baseline: its name and median.
fn vs(samples: &Samples, side: Side) -> (&'static str, f64) {
    (side.name(), of(samples, side))
}

/// The three figures of one measurement: plaintext against raw (with
/// `target`, if any), Noise against raw, plaintext against bare endpoints.
fn figures(
    metric: &str,
    unit: &'static str,
    better: Better,
    samples: &Samples,
    target: Option<f64>,
) -> Vec<Figure> {
    use Side::{Endpoints, Noise, Plaintext, Raw};
    let plain = of(samples, Plaintext);
    let main = Figure::compared(BENCH, metric, unit, better, plain, vs(samples, Raw));
    let main = match target {
        Some(t) => main.with_target(t),
        None => main,
    };
    vec![
        main,
        Figure::compared(
            BENCH,
            format!("{metric}_noise"),
            unit,
            better,
            of(samples, Noise),
            vs(samples, Raw),
        ),
        Figure::compared(
            BENCH,
            format!("{metric}_layer"),
            unit,
            better,
            plain,
            vs(samples, Endpoints),
        ),
    ]
}

/// Measures the sequential and the pipelined figures.
pub(crate) async fn measure(opts: &Options, plan: Plan) -> Result<Vec<Figure>> {
    let names = SIDES.map(Side::name);
    let size = PAYLOAD;
    let metric = "request_seq_64B";
    let (warmup, rounds, budget) = (plan.warmup, plan.rounds, plan.budget);
    let seq = rotate(metric, "us", opts, RUN_LIMIT, &names, |i| -> Run {
        match SIDES[i] {
            Side::Raw => raw_rtt(size, warmup, rounds, budget).boxed(),
            Side::Endpoints => mesh_rtt(true, size, warmup, rounds, budget).boxed(),
            side => concerns_rtt(side == Side::Plaintext, size, warmup, rounds, budget).boxed(),
        }
    })
    .await?;
    let rate = |side| 1e6 / of(&seq, side);
    eprintln!(
        "  {metric}: one call at a time = {:.0} calls/s plaintext, {:.0} noise, {:.0} raw, \
         {:.0} endpoints",
        rate(Side::Plaintext),
        rate(Side::Noise),
        rate(Side::Raw),
        rate(Side::Endpoints),
    );
    let mut all = figures(metric, "us", Better::Lower, &seq, None);

    let metric = format!("pipelined{DEPTH}_64B");
    let window = plan.window;
    let piped = rotate(&metric, "msg/s", opts, RUN_LIMIT, &names, |i| -> Run {
        match SIDES[i] {
            Side::Raw => raw_pipelined(size, window).boxed(),
            Side::Endpoints => mesh_pipelined(true, size, window).boxed(),
            side => concerns_pipelined(side == Side::Plaintext, size, window).boxed(),
        }
    })
    .await?;
    all.extend(figures(
        &metric,
        "msg/s",
        Better::Higher,
        &piped,
        Some(PIPELINED_TARGET),
    ));
    Ok(all)
}

/// Two nodes linked over loopback TCP, the echo concern on both.
struct TcpPair {
    /// The node that dialled (seeded with the server) and asks.
    client: Concerns,
    /// The node that answers.
    server: Concerns,
}

impl TcpPair {
    /// Starts both nodes, plaintext or Noise, and waits until each has the
    /// other as a responsive neighbour.
    async fn start(plaintext: bool) -> Result<Self> {
        let (server, server_addr) = tcp_node(plaintext, PeersConfig::default()).await?;
        let client = tcp_node(plaintext, PeersConfig::default().with_seed(server_addr)).await;
        let client = match client {
            Ok((client, _)) => client,
            Err(e) => {
                stop(&[server]).await;
                return Err(e);
            }
        };
        let pair = TcpPair { client, server };
        if let Err(e) = pair.linked().await {
            pair.finish().await;
            return Err(e);
        }
        Ok(pair)
    }

    /// Waits until each node has the other as a responsive neighbour.
    async fn linked(&self) -> Result<()> {
        let deadline = Instant::now() + LINK_LIMIT;
        let (c, s) = (self.client.peers(), self.server.peers());
        while !(c.is_neighbour(s.node_id()) && s.is_neighbour(c.node_id())) {
            if Instant::now() >= deadline {
                bail!("the nodes did not link up within {LINK_LIMIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// The server's node id.
    fn server_id(&self) -> NodeId {
        self.server.peers().node_id().clone()
    }

    /// Shuts both nodes down.
    async fn finish(self) {
        stop(&[self.client, self.server]).await;
    }
}

/// A node listening on loopback with `peers`' settings and the echo
/// concern, and its address.
async fn tcp_node(plaintext: bool, peers: PeersConfig) -> Result<(Concerns, Address)> {
    let config = Config::new(NETWORK);
    let config = if plaintext {
        config.with_insecure_plaintext()
    } else {
        config
    };
    let endpoint = Endpoint::new(config, TcpTransport::new());
    let listen: Address = "tcp://127.0.0.1:0".parse().context("listen address")?;
    let addr = endpoint.listen(&listen).await.context("listening")?;
    let manager = PeerManager::start(endpoint, peers).context("starting the peer manager")?;
    let concerns = Concerns::builder(manager.clone())
        .concern(Echo)
        .start()
        .await;
    match concerns {
        Ok(c) => Ok((c, addr)),
        Err(e) => {
            manager.shutdown().await;
            Err(e).context("starting the concerns layer")
        }
    }
}

/// Sequential calls through the echo concern over TCP; the median in µs.
async fn concerns_rtt(
    plaintext: bool,
    size: usize,
    warmup: usize,
    rounds: usize,
    budget: Duration,
) -> Result<f64> {
    let pair = TcpPair::start(plaintext).await?;
    let result = rtt_on(&pair, size, warmup, rounds, budget).await;
    pair.finish().await;
    result
}

/// The sequential calls of [`concerns_rtt`] on a running pair.
async fn rtt_on(
    pair: &TcpPair,
    size: usize,
    warmup: usize,
    rounds: usize,
    budget: Duration,
) -> Result<f64> {
    let payload = payload(size);
    let ctx = pair.client.context(ECHO);
    let server = pair.server_id();
    let mut samples = Vec::with_capacity(rounds);
    let mut deadline = None;
    for n in 0..warmup + rounds {
        if n == warmup {
            deadline = Some(Instant::now() + budget);
        }
        let start = Instant::now();
        let reply = ctx
            .request(&server, payload.clone(), REQUEST_TIMEOUT)
            .await
            .context("concern request")?;
        let rtt = start.elapsed();
        check_echo(&reply, size)?;
        if n >= warmup {
            samples.push(rtt);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    median_micros(&mut samples)
}

/// [`DEPTH`] calls in flight through the echo concern over TCP; replies
/// per second.
async fn concerns_pipelined(plaintext: bool, size: usize, window: Window) -> Result<f64> {
    let pair = TcpPair::start(plaintext).await?;
    let result = pipelined_on(&pair, size, window).await;
    pair.finish().await;
    result
}

/// The pipelined calls of [`concerns_pipelined`] on a running pair.
async fn pipelined_on(pair: &TcpPair, size: usize, window: Window) -> Result<f64> {
    let payload = payload(size);
    let ctx = pair.client.context(ECHO);
    let server = pair.server_id();
    keep_in_flight(
        window,
        || ctx.request(&server, payload.clone(), REQUEST_TIMEOUT),
        |reply| check_echo(&reply.context("concern request")?, size),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_concerns_sides_run() {
        let window = Window {
            warmup: Duration::from_millis(5),
            length: Duration::from_millis(20),
        };
        let budget = Duration::from_millis(50);
        for plaintext in [true, false] {
            assert!(
                concerns_rtt(plaintext, PAYLOAD, 5, 20, budget)
                    .await
                    .unwrap()
                    > 0.0
            );
            assert!(
                concerns_pipelined(plaintext, PAYLOAD, window)
                    .await
                    .unwrap()
                    > 0.0
            );
        }
    }
}
