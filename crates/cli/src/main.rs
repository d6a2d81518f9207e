//! `meshwork`: run a mesh node from the command line, or watch a demo mesh.
//!
//! - `meshwork node` runs one node, optionally with a local admin HTTP API
//!   (see [`admin`]), prints one JSON `ready` line on stdout when it is up and
//!   shuts down gracefully on Ctrl-C, SIGTERM or `POST /shutdown`. With
//!   `--serve-demo [NAME]` it serves the built-in demo service
//!   ([`demo_service`]), which any node calls with admin `POST /rpc/...`.
//! - `meshwork keygen` creates a node key (`--key`) or a network key
//!   (`--network-key`) file.
//! - `meshwork demo` starts a small mesh in this process and shows it forming.
//!
//! Links are encrypted by default (Noise, see `meshwork::transport::noise`);
//! `meshwork node --insecure` is the explicit opt-out.
//!
//! Logs go to stderr; stdout carries only the machine-readable `ready` line
//! (node), the node id (keygen) or the demo's display.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod admin;
mod demo;
mod demo_service;
mod echo;
mod events;
mod http;
mod keygen;
mod node;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// meshwork: a peer-to-peer mesh node.
#[derive(Debug, Parser)]
#[command(
    name = "meshwork",
    version,
    about = "meshwork: run a peer-to-peer mesh node, create its keys, or watch a demo mesh form",
    propagate_version = true
)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax, e.g. `debug` or
    /// `meshwork=debug,info`). Overrides RUST_LOG. Logs go to stderr.
    /// Default: `info` for `node`, `warn` for the other commands.
    #[arg(long, global = true, value_name = "FILTER")]
    log: Option<String>,

    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run a mesh node.
    // Boxed: its many options make it far larger than the other variants.
    Node(Box<node::NodeArgs>),
    /// Create a node key or a network key file.
    Keygen(keygen::KeygenArgs),
    /// Start a small mesh in this process and watch it form.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();

    // Checks clap cannot express, reported like clap's own usage errors (exit 2).
    let invalid = match &cli.command {
        Command::Node(args) => args.validate().err(),
        Command::Keygen(_) | Command::Demo(_) => None,
    };
    if let Some(message) = invalid {
        usage_error(cli.command.name(), message);
    }

    let default_filter = match cli.command {
        Command::Node(_) => "info",
        Command::Keygen(_) | Command::Demo(_) => "warn",
    };
    if let Err(e) = init_logging(cli.log.as_deref(), default_filter) {
        usage_error(cli.command.name(), e);
    }

    // Key generation needs no runtime.
    if let Command::Keygen(args) = &cli.command {
        return finish(keygen::run(args));
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Node(args) => node::run(*args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Keygen(args) => keygen::run(&args),
        }
    });
    // Don't let a stuck task (e.g. a blocking DNS lookup) delay the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    finish(result)
}

/// The exit code of a subcommand; an error is printed with its causes
/// (e.g. `error: cannot use the node key (--key k): key file k: corrupt key ...`)
/// and exits 1.
fn finish(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

impl Command {
    /// The subcommand's name on the command line.
    fn name(&self) -> &'static str {
        match self {
            Command::Node(_) => "node",
            Command::Keygen(_) => "keygen",
            Command::Demo(_) => "demo",
        }
    }
}

/// Exits with a usage error (code 2) formatted by clap, with the usage of
/// `subcommand`.
fn usage_error(subcommand: &str, message: String) -> ! {
    let mut cli = Cli::command();
    cli.build();
    let cmd = cli.find_subcommand_mut(subcommand).cloned().unwrap_or(cli);
    cmd.clone()
        .error(clap::error::ErrorKind::ValueValidation, message)
        .exit()
}

/// Sends `tracing` output to stderr, filtered by `--log`, else `RUST_LOG`,
/// else `default`.
fn init_logging(flag: Option<&str>, default: &str) -> Result<(), String> {
    let filter = match flag {
        Some(f) => EnvFilter::try_new(f).map_err(|e| format!("invalid --log filter {f:?}: {e}"))?,
        None => match std::env::var("RUST_LOG") {
            Ok(env) if !env.trim().is_empty() => EnvFilter::try_new(&env)
                .map_err(|e| format!("invalid RUST_LOG filter {env:?}: {e}"))?,
            _ => EnvFilter::new(default),
        },
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir.
    pub(crate) fn temp_dir(name: &str) -> std::path::PathBuf {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "meshwork-cli-{name}-{}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
