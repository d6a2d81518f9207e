//! `meshwork node`: run one mesh node until Ctrl-C, SIGTERM or `POST /shutdown`.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use meshwork::Node;
use meshwork::transport::Address;
use serde::Serialize;
use tracing::{info, warn};

use crate::admin::{self, AdminState, ShutdownSignal};

/// How long a graceful shutdown may take before we give up and exit non-zero.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Options of `meshwork node`.
#[derive(Debug, clap::Args)]
pub(crate) struct NodeArgs {
    /// Address to accept peers on (repeatable); port 0 picks a free port.
    #[arg(long, value_name = "ADDR", default_value = "tcp://127.0.0.1:7000")]
    listen: Vec<Address>,

    /// Node to dial at start and redial when the connection drops (repeatable).
    #[arg(long, value_name = "ADDR")]
    seed: Vec<Address>,

    /// Serve the admin HTTP API on HOST:PORT (loopback only unless
    /// --admin-allow-remote); port 0 picks a free port.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_admin_addr)]
    admin: Option<SocketAddr>,

    /// Allow --admin on a non-loopback address. The admin API has no
    /// authentication: anyone who can reach it can stop the node.
    #[arg(long, requires = "admin")]
    admin_allow_remote: bool,

    /// Network name; nodes of other networks are refused.
    #[arg(long, value_name = "NAME", default_value = "meshwork")]
    network: String,

    /// Metadata sent to peers in the handshake (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_meta)]
    meta: Vec<(String, String)>,

    /// How often each peer is pinged to measure round-trip time, in ms
    /// (default: the library's, 1000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    ping_interval_ms: Option<u64>,
}

impl NodeArgs {
    /// Checks that span several options (clap checks each one alone).
    pub(crate) fn validate(&self) -> Result<(), String> {
        if let Some(admin) = self.admin {
            if !admin.ip().is_loopback() && !self.admin_allow_remote {
                return Err(format!(
                    "--admin {admin} is not a loopback address; the admin API has no \
                     authentication, so it only listens on 127.0.0.1/::1 unless you \
                     also pass --admin-allow-remote"
                ));
            }
        }
        if self.network.is_empty() {
            return Err("--network must not be empty".into());
        }
        Ok(())
    }
}

/// Parses `--admin`: `IP:PORT`, `[IPv6]:PORT` or `localhost:PORT`.
fn parse_admin_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Some(port) = s.strip_prefix("localhost:") {
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("port must be a number from 0 to 65535, got {port:?}"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    Err("expected HOST:PORT with an IP host, e.g. 127.0.0.1:7100 or [::1]:7100".into())
}

/// Parses `--meta KEY=VALUE`.
fn parse_meta(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err("expected KEY=VALUE with a non-empty KEY".into()),
    }
}

/// The one line printed on stdout once the node is up.
#[derive(Debug, Serialize)]
struct Ready {
    event: &'static str,
    node_id: String,
    listen: Vec<String>,
    admin: Option<String>,
}

/// Why the node is stopping.
#[derive(Debug, Clone, Copy)]
enum StopCause {
    Interrupt,
    Terminate,
    AdminRequest,
}

/// Runs the node until it is asked to stop, then shuts it down gracefully.
pub(crate) async fn run(args: NodeArgs) -> anyhow::Result<ExitCode> {
    // Bind the admin port first: it is the cheapest thing to fail.
    let admin_listener = match args.admin {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot bind the admin API on {addr}"))?,
        ),
        None => None,
    };
    let admin_addr = admin_listener
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()
        .context("admin listener address")?;

    let mut builder = Node::builder(&args.network);
    for addr in &args.listen {
        builder = builder.listen(addr.clone());
    }
    for addr in &args.seed {
        builder = builder.seed(addr.clone());
    }
    for (k, v) in &args.meta {
        builder = builder.metadata(k.clone(), v.clone());
    }
    if let Some(ms) = args.ping_interval_ms {
        builder = builder.ping_interval(Duration::from_millis(ms));
    }
    let node = builder.start().await.with_context(|| {
        let listen: Vec<String> = args.listen.iter().map(|a| a.to_string()).collect();
        format!("cannot start the node (listening on {})", listen.join(", "))
    })?;

    let shutdown = ShutdownSignal::new();
    let server = admin_listener.map(|listener| {
        let router = admin::router(AdminState::new(node.clone(), shutdown.clone()));
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let serve = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.stopped().await });
            if let Err(e) = serve.await {
                warn!(error = %e, "admin API failed");
            }
        })
    });
    if let Some(addr) = admin_addr {
        info!(%addr, "admin API listening");
    }

    let mut signals = match StopSignals::install() {
        Ok(signals) => signals,
        Err(e) => {
            node.shutdown().await;
            return Err(e);
        }
    };
    if let Err(e) = print_ready(&node, admin_addr) {
        node.shutdown().await;
        return Err(e.context("cannot write the ready line to stdout"));
    }

    let cause = wait_for_stop(&mut signals, &shutdown).await;
    info!(?cause, "shutting down");
    let graceful = async {
        node.shutdown().await;
        // Stops the admin server (if the request was not already the trigger).
        shutdown.trigger();
        if let Some(server) = server {
            let _ = server.await;
        }
    };
    tokio::select! {
        done = tokio::time::timeout(SHUTDOWN_TIMEOUT, graceful) => match done {
            Ok(()) => {
                info!("shut down cleanly");
                Ok(ExitCode::SUCCESS)
            }
            Err(_) => {
                warn!(timeout = ?SHUTDOWN_TIMEOUT, "graceful shutdown did not finish in time; exiting anyway");
                Ok(ExitCode::FAILURE)
            }
        },
        _ = signals.next() => {
            warn!("second signal: exiting without finishing the shutdown");
            Ok(ExitCode::from(130))
        }
    }
}

/// Prints the `ready` line on stdout and flushes it.
fn print_ready(node: &Node, admin: Option<SocketAddr>) -> anyhow::Result<()> {
    let ready = Ready {
        event: "ready",
        node_id: node.node_id().to_string(),
        listen: node.listen_addrs().iter().map(|a| a.to_string()).collect(),
        admin: admin.map(|a| a.to_string()),
    };
    let line = serde_json::to_string(&ready)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// Waits for Ctrl-C, SIGTERM or an admin `POST /shutdown`.
async fn wait_for_stop(signals: &mut StopSignals, shutdown: &ShutdownSignal) -> StopCause {
    tokio::select! {
        cause = signals.next() => cause,
        _ = shutdown.stopped() => StopCause::AdminRequest,
    }
}

/// SIGINT and SIGTERM handlers. Installed before the ready line is printed,
/// so a signal sent as soon as the line is read is never fatal.
#[derive(Debug)]
struct StopSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(StopSignals {
                interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
                terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        Ok(StopSignals {})
    }

    /// The next SIGINT or SIGTERM.
    async fn next(&mut self) -> StopCause {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => StopCause::Interrupt,
                _ = self.terminate.recv() => StopCause::Terminate,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            StopCause::Interrupt
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Wrap {
        #[command(flatten)]
        args: NodeArgs,
    }

    fn parse(argv: &[&str]) -> Result<NodeArgs, clap::Error> {
        Wrap::try_parse_from(std::iter::once("node").chain(argv.iter().copied())).map(|w| w.args)
    }

    #[test]
    fn defaults() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.listen, vec!["tcp://127.0.0.1:7000".parse().unwrap()]);
        assert_eq!(a.network, "meshwork");
        assert!(a.admin.is_none() && a.seed.is_empty() && a.meta.is_empty());
        assert!(a.validate().is_ok());
    }

    #[test]
    fn parses_every_option() {
        let a = parse(&[
            "--listen",
            "tcp://127.0.0.1:0",
            "--listen",
            "tcp://[::1]:0",
            "--seed",
            "tcp://localhost:7000",
            "--admin",
            "localhost:0",
            "--network",
            "test",
            "--meta",
            "role=a=b",
            "--ping-interval-ms",
            "250",
        ])
        .unwrap();
        assert_eq!(a.listen.len(), 2);
        assert_eq!(a.admin, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(a.meta, vec![("role".to_string(), "a=b".to_string())]);
        assert_eq!(a.ping_interval_ms, Some(250));
        assert!(a.validate().is_ok());
    }

    #[test]
    fn rejects_bad_input_with_clear_messages() {
        let e = parse(&["--listen", "127.0.0.1:7000"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("scheme"), "{e}");
        assert!(parse(&["--seed", "tcp://host"]).is_err());
        assert!(parse(&["--meta", "=x"]).is_err());
        assert!(parse(&["--ping-interval-ms", "0"]).is_err());
        assert!(parse(&["--admin", "nowhere"]).is_err());
        assert!(parse(&["--admin-allow-remote"]).is_err());
    }

    #[test]
    fn admin_must_be_loopback_unless_allowed() {
        let a = parse(&["--admin", "0.0.0.0:7100"]).unwrap();
        assert!(a.validate().unwrap_err().contains("--admin-allow-remote"));
        let a = parse(&["--admin", "0.0.0.0:7100", "--admin-allow-remote"]).unwrap();
        assert!(a.validate().is_ok());
        let a = parse(&["--admin", "[::1]:0"]).unwrap();
        assert!(a.validate().is_ok());
    }
}
