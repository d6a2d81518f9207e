//! `meshwork-bench`: meshwork measured against a plain baseline, in one
//! process.
//!
//! ```text
//! meshwork-bench [BENCH...] [--json] [--quick] [--runs N]
//! ```
//!
//! Every bench measures each figure for meshwork and for a baseline doing
//! the same job (raw TCP, meshwork without encryption when the point is the
//! cost of encryption, or bare endpoints when it is the cost of the peer
//! manager), taking turns for `--runs` runs, and reports both medians and
//! their ratio. By default a table is printed; with `--json`,
//! stdout carries only JSON lines, one per figure:
//!
//! ```text
//! {"bench":"transport","metric":"rtt_seq_64B","value":31.2,"unit":"us","baseline":27.9,"ratio":1.118}
//! ```
//!
//! Progress goes to stderr. A missed target is reported, never a failure:
//! the exit status is non-zero only when a bench could not run.
//!
//! Adding a bench: write a module with `async fn run(&Options) ->
//! Result<Vec<Figure>>`, and add it to [`BENCHES`] and [`run_bench`].

// A binary: printing results is its job.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod concerns;
mod harness;
mod idle;
mod peers;
mod report;
mod rpc;
mod sync;
mod transport;

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::harness::{DEFAULT_RUNS, Options, QUICK_RUNS};
use crate::report::Figure;

/// Every bench, in the order they run when none is named, with a summary.
const BENCHES: &[(&str, &str)] = &[
    (
        "transport",
        "raw TCP vs meshwork, plaintext and encrypted: RTT, throughput, idle memory",
    ),
    (
        "peers",
        "peer manager at 100/500 nodes: convergence, memory per node, heartbeat CPU",
    ),
    (
        "concerns",
        "concerns layer: request/reply over TCP vs raw, flood to 100 nodes, 5-hop routed request",
    ),
    (
        "sync",
        "replicated map: write-to-all latency, bytes per update, idle bytes, heal, catch-up, writes/s",
    ),
    (
        "rpc",
        "rpc layer: calls between two nodes over TCP vs raw framed TCP and tarpc, one at a time and 64 in flight",
    ),
];

/// The usage text, for `--help` and errors.
fn usage() -> String {
    let mut text = String::from(
        "usage: meshwork-bench [BENCH...] [--json] [--quick] [--runs N]\n\n\
         Runs the named benches (all of them when none is named).\n\n\
         options:\n  \
         --json       only JSON lines on stdout, one per figure\n  \
         --quick      fewer runs (3) and shorter measurements\n  \
         --runs N     measured runs of each side of each figure (default 5)\n\n\
         benches:\n",
    );
    for (name, summary) in BENCHES {
        text.push_str(&format!("  {name:<12} {summary}\n"));
    }
    text
}

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Args {
    /// Benches to run, in order, without duplicates.
    benches: Vec<&'static str>,
    /// JSON lines instead of a table.
    json: bool,
    /// Options passed to every bench.
    opts: Options,
}

/// Parses the arguments after the program name. `Ok(None)` means help was
/// asked for.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Args>> {
    let mut benches = Vec::new();
    let mut json = false;
    let mut quick = false;
    let mut runs = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--json" => json = true,
            "--quick" => quick = true,
            "--runs" => {
                let n = args.next().context("--runs needs a number")?;
                runs = Some(parse_runs(&n)?);
            }
            _ if arg.starts_with("--runs=") => runs = Some(parse_runs(&arg["--runs=".len()..])?),
            _ if arg.starts_with('-') => bail!("unknown option {arg:?}\n\n{}", usage()),
            name => {
                let Some(&(known, _)) = BENCHES.iter().find(|(b, _)| *b == name) else {
                    let names: Vec<&str> = BENCHES.iter().map(|(b, _)| *b).collect();
                    bail!(
                        "unknown bench {name:?}; known benches: {}",
                        names.join(", ")
                    );
                };
                if !benches.contains(&known) {
                    benches.push(known);
                }
            }
        }
    }
    if benches.is_empty() {
        benches = BENCHES.iter().map(|(b, _)| *b).collect();
    }
    let runs = runs.unwrap_or(if quick { QUICK_RUNS } else { DEFAULT_RUNS });
    Ok(Some(Args {
        benches,
        json,
        opts: Options { runs, quick },
    }))
}

/// Parses the value of `--runs`: a whole number of at least 1.
fn parse_runs(text: &str) -> Result<usize> {
    let n: usize = text
        .parse()
        .with_context(|| format!("--runs wants a whole number, not {text:?}"))?;
    if n == 0 {
        bail!("--runs must be at least 1");
    }
    Ok(n)
}

/// Runs the bench called `name`.
async fn run_bench(name: &str, opts: &Options) -> Result<Vec<Figure>> {
    match name {
        "transport" => transport::run(opts).await,
        "peers" => peers::run(opts).await,
        "concerns" => concerns::run(opts).await,
        "sync" => sync::run(opts).await,
        "rpc" => rpc::run(opts).await,
        other => bail!("bench {other:?} is listed but not dispatched"),
    }
}

/// The `main` of a measuring child.
type ChildMain = fn(&[String]) -> Result<()>;

fn main() -> ExitCode {
    // A measuring child started by a bench (see `idle` and `peers::memory`),
    // not a user.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let child: Option<(&str, ChildMain)> = match args.first().map(String::as_str) {
        Some(idle::CHILD_FLAG) => Some(("idle connections", idle::child_main)),
        Some(peers::memory::CHILD_FLAG) => Some(("peers memory", peers::memory::child_main)),
        _ => None,
    };
    if let Some((what, child_main)) = child {
        return match child_main(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("meshwork-bench ({what} child): error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the chain of causes on one line, without the
            // backtrace anyhow's `Debug` adds when RUST_BACKTRACE is set.
            eprintln!("meshwork-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parses the arguments, runs the benches and prints the figures.
fn run(args: Vec<String>) -> Result<()> {
    let Some(args) = parse_args(args)? else {
        print!("{}", usage());
        return Ok(());
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let mut all = Vec::new();
    for name in &args.benches {
        eprintln!(
            "{name}: {} runs of each side{}",
            args.opts.runs,
            if args.opts.quick { ", quick" } else { "" },
        );
        let started = Instant::now();
        let figures = runtime
            .block_on(run_bench(name, &args.opts))
            .with_context(|| format!("bench {name}"))?;
        eprintln!("{name}: done in {:.1} s", started.elapsed().as_secs_f64());
        if args.json {
            report::print_json(&figures);
        }
        all.extend(figures);
    }
    if !args.json {
        report::print_table(&all);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Args>> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn defaults_run_everything() {
        let args = parse(&[]).unwrap().unwrap();
        assert_eq!(
            args.benches,
            vec!["transport", "peers", "concerns", "sync", "rpc"]
        );
        assert!(!args.json);
        assert_eq!(
            args.opts,
            Options {
                runs: DEFAULT_RUNS,
                quick: false,
            }
        );
    }

    #[test]
    fn options_and_names() {
        let args = parse(&["transport", "--json", "--quick", "transport"])
            .unwrap()
            .unwrap();
        assert_eq!(args.benches, vec!["transport"]);
        assert!(args.json);
        assert_eq!(args.opts.runs, QUICK_RUNS);
        let args = parse(&["--quick", "--runs", "7"]).unwrap().unwrap();
        assert_eq!(args.opts.runs, 7);
        assert!(args.opts.quick);
        let args = parse(&["concerns", "peers", "--runs=2"]).unwrap().unwrap();
        assert_eq!(args.benches, vec!["concerns", "peers"]);
        assert_eq!(args.opts.runs, 2);
        assert!(parse(&["--help"]).unwrap().is_none());
    }

    #[test]
    fn errors_say_what_is_known() {
        let err = parse(&["routes"]).unwrap_err().to_string();
        assert!(
            err.contains("known benches: transport, peers, concerns, sync, rpc"),
            "{err}"
        );
        assert!(parse(&["--runs", "0"]).is_err());
        assert!(parse(&["--runs"]).is_err());
        assert!(parse(&["--runs", "x"]).is_err());
        assert!(parse(&["--fast"]).is_err());
        // Gone: every run measures plaintext and encrypted meshwork.
        assert!(parse(&["--plaintext"]).is_err());
    }
}
