//! CPU per request or call between two nodes on a one-thread runtime, where
//! a change's cost is not hidden by hand-offs between worker threads (the
//! figures `cargo xtask bench` gives run on tokio's default runtime).
//!
//! ```text
//! cargo run --release -p meshwork-bench --example cpu_per_call -- MODE [SECS] [WORKERS]
//! ```
//!
//! WORKERS (default 0: the one-thread runtime) runs the same on a
//! multi-thread runtime with that many workers, the calls made from a task
//! on it as in `cargo xtask bench`: what the hand-offs between threads cost
//! shows as CPU above wall time.
//!
//! MODE is `rpc-seq` (one RPC call at a time), `rpc-64` (64 in flight),
//! `concern-seq` or `concern-64` (the same through an echo concern, the
//! layer RPC rides on). Two nodes over loopback TCP with the default
//! configuration (Noise), 64-byte payloads, SECS seconds (default 2). It
//! prints the wall time and the process's CPU time (user + system, from
//! `/proc/self/stat`) per call, and the size of one call's future. Compare
//! two builds by running them in turn, several times, and taking medians:
//! single runs vary by several percent.

// A command-line tool: its figure goes to stdout.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use meshwork::Node;
use meshwork::concerns::{BoxError, Concern, Context, Reply};
use meshwork::transport::Address;
use meshwork::wire::NodeId;

/// The echo service the RPC modes call.
#[meshwork::service]
pub trait Echo {
    /// Answers `data`.
    async fn echo(&self, data: Vec<u8>) -> Vec<u8>;
}

struct Echoer;

impl Echo for Echoer {
    async fn echo(&self, data: Vec<u8>) -> Vec<u8> {
        data
    }
}

/// The command of the echo concern.
const ECHO: u32 = 77;
/// Calls in flight in the `-64` modes.
const DEPTH: usize = 64;

/// The concern the `concern-` modes request.
struct EchoConcern;

#[async_trait]
impl Concern for EchoConcern {
    fn command(&self) -> u32 {
        ECHO
    }

    fn name(&self) -> &str {
        "echo"
    }

    async fn on_request(
        &self,
        _ctx: &Context,
        _from: &NodeId,
        payload: Bytes,
    ) -> Result<Option<Reply>, BoxError> {
        Ok(Some(Reply::new(payload)))
    }
}

async fn node(seed: Option<Address>) -> Result<Node> {
    let listen: Address = "tcp://127.0.0.1:0".parse()?;
    let mut builder = Node::builder("cpu-per-call")
        .listen(listen)
        .concern(EchoConcern);
    if let Some(seed) = seed {
        builder = builder.seed(seed);
    }
    Ok(builder.start().await?)
}

/// User plus system CPU time of this process so far.
fn cpu_time() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    // Fields after the command name (which is in parentheses and may hold
    // spaces): utime and stime are the 12th and 13th of them.
    let rest = stat
        .rsplit_once(')')
        .context("malformed /proc/self/stat")?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .context("short /proc/self/stat")?
        .iter()
        .map(|f| f.parse::<u64>())
        .sum::<Result<u64, _>>()
        .context("parsing /proc/self/stat")?;
    // The kernel's USER_HZ, 100 on Linux.
    Ok(Duration::from_millis(ticks * 10))
}

/// Runs `call` one at a time or `DEPTH` at once until `end`; the count.
async fn drive<F, Fut>(depth: usize, end: Instant, call: F) -> Result<u64>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut done = 0u64;
    let mut calls = FuturesUnordered::new();
    for _ in 0..depth {
        calls.push(call());
    }
    while let Some(r) = calls.next().await {
        r?;
        done += 1;
        if Instant::now() < end {
            calls.push(call());
        }
    }
    Ok(done)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_default();
    let secs: f64 = match args.next() {
        Some(s) => s.parse().context("SECS")?,
        None => 2.0,
    };
    let (rpc, depth) = match mode.as_str() {
        "rpc-seq" => (true, 1),
        "rpc-64" => (true, DEPTH),
        "concern-seq" => (false, 1),
        "concern-64" => (false, DEPTH),
        _ => bail!("usage: cpu_per_call rpc-seq|rpc-64|concern-seq|concern-64 [SECS] [WORKERS]"),
    };
    let workers: usize = match args.next() {
        Some(s) => s.parse().context("WORKERS")?,
        None => 0,
    };
    if workers == 0 {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return runtime.block_on(run(mode, rpc, depth, secs));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    // Spawned, so the calls start on a worker thread as the bench's runs do
    // (the future given to `block_on` runs on the main thread instead).
    runtime.block_on(async move {
        tokio::spawn(run(mode, rpc, depth, secs))
            .await
            .context("the run panicked")?
    })
}

/// Two nodes, then calls in `mode` for `secs` seconds; prints the figures.
async fn run(mode: String, rpc: bool, depth: usize, secs: f64) -> Result<()> {
    let server = node(None).await?;
    let seed = server
        .listen_addrs()
        .first()
        .cloned()
        .context("no listen address")?;
    let client = node(Some(seed)).await?;
    server.rpc().serve("echo", EchoServer::new(Echoer)).await?;
    let ready = Instant::now() + Duration::from_secs(10);
    while !client
        .rpc()
        .providers("echo")
        .iter()
        .any(|p| p.reach == "neighbour")
    {
        if Instant::now() > ready {
            bail!("the client never saw the service");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let data = vec![7u8; 64];
    let payload = Bytes::from(data.clone());
    let echo: EchoClient = client.rpc().client("echo");
    let ctx = client.concerns().context(ECHO);
    let to = server.node_id().clone();
    // What `drive` allocates per call (glibc's allocator takes a slower
    // path past about 1 KiB).
    let future_size = if rpc {
        std::mem::size_of_val(&echo.echo(data.clone()))
    } else {
        std::mem::size_of_val(&ctx.request(&to, payload.clone(), Duration::from_secs(5)))
    };
    let (cpu0, wall0) = (cpu_time()?, Instant::now());
    let end = wall0 + Duration::from_secs_f64(secs);
    let done = if rpc {
        drive(depth, end, || async {
            echo.echo(data.clone()).await.map(drop).context("rpc call")
        })
        .await?
    } else {
        drive(depth, end, || async {
            ctx.request(&to, payload.clone(), Duration::from_secs(5))
                .await
                .map(drop)
                .context("concern request")
        })
        .await?
    };
    let (cpu, wall) = (cpu_time()? - cpu0, wall0.elapsed());
    let per = |d: Duration| d.as_secs_f64() * 1e6 / done as f64;
    println!(
        "{mode}: {done} calls, {:.3} us wall and {:.3} us CPU per call \
         (a call's future: {future_size} bytes)",
        per(wall),
        per(cpu)
    );
    futures_util::future::join(client.shutdown(), server.shutdown()).await;
    Ok(())
}
