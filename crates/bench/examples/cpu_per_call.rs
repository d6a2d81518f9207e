//! CPU per request or call between two nodes on a one-thread runtime, where
//! a change's cost is not hidden by hand-offs between worker threads (the
//! figures `cargo xtask bench` gives run on tokio's default runtime).
//!
//! ```text
//! cargo run --release -p meshwork-bench --example cpu_per_call -- MODE [SECS] [WORKERS] [--child]
//! ```
//!
//! WORKERS (default 0: the one-thread runtime) runs the same on a
//! multi-thread runtime with that many workers, the calls made from a task
//! on it as in `cargo xtask bench`: what the hand-offs between threads cost
//! shows as CPU above wall time. `--child` runs the server node in a child
//! process (on a runtime of the same kind), as two nodes of a real mesh
//! run; the child's CPU time counts too.
//!
//! MODE is `rpc-seq` (one RPC call at a time), `rpc-64` (64 in flight),
//! `concern-seq` or `concern-64` (the same through an echo concern, the
//! layer RPC rides on), `raw-seq` (the `rpc` bench's sequential baseline:
//! one 64-byte frame at a time, echoed by tokio's length-delimited codec
//! over loopback TCP), or `raw-64` (the benches' baseline: tokio's
//! length-delimited frames echoed over loopback TCP, 64 in flight, each
//! side writing what it gathered once nothing more is ready to read). Two nodes over loopback TCP with the default
//! configuration (Noise; plaintext when the environment variable
//! `CPU_PER_CALL_PLAINTEXT` is set, as the `concerns` bench's main figures
//! run; with `CPU_PER_CALL_PROVIDERS=N`, N more providers of the service
//! are listed, on made-up nodes the calls never go to, their entries sent
//! by the server's node as if those nodes wrote them; not with
//! `--child`), 64-byte payloads, SECS seconds (default 2). It
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
    if std::env::var_os("CPU_PER_CALL_PLAINTEXT").is_some() {
        builder = builder.insecure_plaintext();
    }
    Ok(builder.start().await?)
}

/// The server node, serving the echo service; and its address.
async fn server_node() -> Result<(Node, Address)> {
    let server = node(None).await?;
    server.rpc().serve("echo", EchoServer::new(Echoer)).await?;
    let addr = server
        .listen_addrs()
        .first()
        .cloned()
        .context("no listen address")?;
    Ok((server, addr))
}

/// Sends `to`, from `server`, registry entries of `echo` for `n` made-up
/// nodes, as if each had written its own.
async fn list_made_up_providers(server: &Node, to: &NodeId, n: usize) -> Result<()> {
    use meshwork::sync::proto::{Entries, Entry, SyncMessage, sync_message};
    use meshwork::transport::Priority;
    use meshwork::wire::Message;
    use meshwork::wire::proto::{Concern as ConcernFrame, ConcernKind};
    use prost::Message as _;

    let stamp = server.sync().now_ms() << 16;
    let entries = (0..n)
        .map(|i| -> Result<Entry> {
            let writer = NodeId::from_hex(&format!("{:064x}", i + 1))?;
            let key = format!("{}echo/{writer}", meshwork::rpc::REGISTRY_PREFIX);
            Ok(Entry {
                key: key.into(),
                value: Bytes::from_static(br#"{"version":1,"methods":["echo"]}"#),
                stamp,
                writer: writer.as_bytes().clone(),
                epoch: 1,
                lease_delta: 3_600_000,
                ..Entry::default()
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let body = sync_message::Body::Entries(Entries {
        entries,
        repair: false,
    });
    let frame = ConcernFrame {
        command: meshwork::sync::SYNC,
        request_id: 0,
        kind: ConcernKind::Request as i32,
        ttl: 0,
        flags: 0,
        payload: SyncMessage { body: Some(body) }.encode_to_vec().into(),
    };
    server
        .peers()
        .send(to, Message::Concern(frame), Priority::Normal)
        .await
        .context("sending the made-up providers' entries")?;
    Ok(())
}

/// User plus system CPU time of this process so far.
fn cpu_time() -> Result<Duration> {
    stat_cpu("/proc/self/stat")
}

/// User plus system CPU time of the process whose stat file is `path`.
fn stat_cpu(path: &str) -> Result<Duration> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
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
    if depth == 1 {
        // Awaited in turn, as the benches' sequential loops do: a
        // `FuturesUnordered` of one wakes its task after every poll that
        // leaves its future pending (it yields once it has polled them
        // all), and on a multi-thread runtime each such yield wakes an idle
        // worker that may take the task over, a thread hand-off per call
        // that is the harness's, not the call's.
        while Instant::now() < end {
            call().await?;
            done += 1;
        }
        return Ok(done);
    }
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
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // `--child`, anywhere: the server node runs in a child process.
    let child = args.iter().any(|a| a == "--child");
    args.retain(|a| a != "--child");
    let mut args = args.into_iter();
    let mode = args.next().unwrap_or_default();
    if mode == "serve" {
        return serve_main(args.next());
    }
    let secs: f64 = match args.next() {
        Some(s) => s.parse().context("SECS")?,
        None => 2.0,
    };
    let workers: usize = match args.next() {
        Some(s) => s.parse().context("WORKERS")?,
        None => 0,
    };
    if mode == "raw-64" || mode == "raw-seq" {
        return raw_main(&mode, secs, workers);
    }
    let (rpc, depth) = match mode.as_str() {
        "rpc-seq" => (true, 1),
        "rpc-64" => (true, DEPTH),
        "concern-seq" => (false, 1),
        "concern-64" => (false, DEPTH),
        _ => bail!(
            "usage: cpu_per_call rpc-seq|rpc-64|concern-seq|concern-64|raw-seq|raw-64 \
             [SECS] [WORKERS] [--child]"
        ),
    };
    let server = child.then_some(workers);
    if workers == 0 {
        return runtime(0)?.block_on(run(mode, rpc, depth, secs, server));
    }
    // Spawned, so the calls start on a worker thread as the bench's runs do
    // (the future given to `block_on` runs on the main thread instead).
    runtime(workers)?.block_on(async move {
        tokio::spawn(run(mode, rpc, depth, secs, server))
            .await
            .context("the run panicked")?
    })
}

/// Two nodes, then calls in `mode` for `secs` seconds; prints the figures.
/// With `child` (its worker count), the server node runs in a child
/// process, whose CPU time counts too.
async fn run(mode: String, rpc: bool, depth: usize, secs: f64, child: Option<usize>) -> Result<()> {
    let (server, mut process, seed, server_id) = if let Some(workers) = child {
        let mut process = std::process::Command::new(std::env::current_exe()?)
            .arg("serve")
            .arg(workers.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(process.stdout.take().context("child stdout")?),
            &mut line,
        )?;
        let (addr, id) = line.trim().split_once(' ').context("child's line")?;
        (None, Some(process), addr.parse()?, NodeId::from_hex(id)?)
    } else {
        let (server, seed) = server_node().await?;
        let id = server.node_id().clone();
        (Some(server), None, seed, id)
    };
    let client = node(Some(seed)).await?;
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
    // More providers of `echo` listed, on made-up nodes nobody can reach:
    // the calls still go to the server (a neighbour is preferred to any
    // routed provider), so the figure shows what looking at a longer list
    // of providers costs each call.
    let extra: usize = match std::env::var("CPU_PER_CALL_PROVIDERS") {
        Ok(n) => n.parse().context("CPU_PER_CALL_PROVIDERS")?,
        Err(_) => 0,
    };
    if extra > 0 {
        // A provider's entry must be written by the node its key names, so
        // the server's node sends the client entries claiming to be those
        // nodes' (entries are not signed), over its connection to it.
        let server = server
            .as_ref()
            .context("CPU_PER_CALL_PROVIDERS needs the server in this process (no --child)")?;
        list_made_up_providers(server, client.node_id(), extra).await?;
        let ready = Instant::now() + Duration::from_secs(10);
        loop {
            let listed = client.rpc().providers("echo").len();
            if listed == extra + 1 {
                break;
            }
            if Instant::now() > ready {
                bail!("{listed} providers listed, not {}", extra + 1);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let data = vec![7u8; 64];
    let payload = Bytes::from(data.clone());
    let echo: EchoClient = client.rpc().client("echo");
    let ctx = client.concerns().context(ECHO);
    let to = server_id;
    // What `drive` allocates per call (glibc's allocator takes a slower
    // path past about 1 KiB).
    let future_size = if rpc {
        std::mem::size_of_val(&echo.echo(data.clone()))
    } else {
        std::mem::size_of_val(&ctx.request(&to, payload.clone(), Duration::from_secs(5)))
    };
    let child_pid = process.as_ref().map(|p| p.id());
    let (cpu0, wall0) = (cpu_time()? + child_cpu(child_pid)?, Instant::now());
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
    let (cpu, wall) = (cpu_time()? + child_cpu(child_pid)? - cpu0, wall0.elapsed());
    let per = |d: Duration| d.as_secs_f64() * 1e6 / done as f64;
    println!(
        "{mode}{}: {done} calls, {:.3} us wall and {:.3} us CPU per call \
         (a call's future: {future_size} bytes)",
        if child.is_some() {
            " (server in a child process)"
        } else {
            ""
        },
        per(wall),
        per(cpu)
    );
    client.shutdown().await;
    if let Some(server) = server {
        server.shutdown().await;
    }
    if let Some(mut p) = process.take() {
        drop(p.stdin.take());
        p.wait()?;
    }
    Ok(())
}

/// CPU time of the child process `pid`, if any.
fn child_cpu(pid: Option<u32>) -> Result<Duration> {
    match pid {
        None => Ok(Duration::ZERO),
        Some(pid) => stat_cpu(&format!("/proc/{pid}/stat")),
    }
}

/// `serve [WORKERS]`: the server node of `--child`, in the child process:
/// prints its address and node id, then serves until stdin closes.
fn serve_main(workers: Option<String>) -> Result<()> {
    let workers: usize = match workers {
        Some(s) => s.parse().context("WORKERS")?,
        None => 0,
    };
    runtime(workers)?.block_on(async {
        let (server, addr) = server_node().await?;
        println!("{addr} {}", server.node_id());
        tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut sink);
        })
        .await?;
        server.shutdown().await;
        anyhow::Ok(())
    })
}

/// A runtime of `workers` worker threads (0: the one-thread runtime).
fn runtime(workers: usize) -> Result<tokio::runtime::Runtime> {
    Ok(if workers == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()?
    })
}

/// `raw-64`: the bench's baseline, length-delimited frames over loopback
/// TCP echoed back, `DEPTH` in flight, each side writing whatever it has
/// gathered when nothing more is ready to read.
fn raw_main(mode: &str, secs: f64, workers: usize) -> Result<()> {
    let depth = if mode == "raw-seq" { 1 } else { DEPTH };
    let done = runtime(workers)?.block_on(async move {
        tokio::spawn(raw_run(secs, depth))
            .await
            .context("the run panicked")?
    })?;
    let (calls, cpu, wall) = done;
    let per = |d: Duration| d.as_secs_f64() * 1e6 / calls as f64;
    println!(
        "{mode}: {calls} calls, {:.3} us wall and {:.3} us CPU per call",
        per(wall),
        per(cpu)
    );
    Ok(())
}

type Raw =
    tokio_util::codec::Framed<tokio::net::TcpStream, tokio_util::codec::LengthDelimitedCodec>;

async fn raw_run(secs: f64, depth: usize) -> Result<(u64, Duration, Duration)> {
    use futures_util::{FutureExt as _, SinkExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let mut framed: Raw = tokio_util::codec::Framed::new(stream, Default::default());
        while let Some(frame) = framed.next().await {
            framed.feed(frame?.freeze()).await?;
            while let Some(Some(frame)) = framed.next().now_or_never() {
                framed.feed(frame?.freeze()).await?;
            }
            SinkExt::<Bytes>::flush(&mut framed).await?;
        }
        anyhow::Ok(())
    });
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut client: Raw = tokio_util::codec::Framed::new(stream, Default::default());
    let payload = Bytes::from(vec![7u8; 64]);
    let (cpu0, wall0) = (cpu_time()?, Instant::now());
    let end = wall0 + Duration::from_secs_f64(secs);
    for _ in 0..depth {
        client.feed(payload.clone()).await?;
    }
    SinkExt::<Bytes>::flush(&mut client).await?;
    let (mut in_flight, mut done) = (depth, 0u64);
    while in_flight > 0 {
        let reply = match client.next().now_or_never() {
            Some(reply) => reply,
            None => {
                SinkExt::<Bytes>::flush(&mut client).await?;
                client.next().await
            }
        };
        reply.context("server closed")??;
        in_flight -= 1;
        done += 1;
        if Instant::now() < end {
            client.feed(payload.clone()).await?;
            in_flight += 1;
        }
    }
    let (cpu, wall) = (cpu_time()? - cpu0, wall0.elapsed());
    drop(client);
    server.await.context("the echo task panicked")??;
    Ok((done, cpu, wall))
}
