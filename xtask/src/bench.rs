//! `cargo xtask bench [NAME]... [--json] [--quick] [--runs N]`
//!
//! Runs `cargo run --release -q -p meshwork-bench --features tarpc --
//! <args>`: the `tarpc` feature builds the `rpc` bench's tarpc baseline
//! (off by default so that building the workspace does not compile tarpc;
//! always on here so that every bench runs from one build). All arguments
//! are forwarded verbatim (the benchmark binary parses them, `--help`
//! included), its output is streamed as is (so `--json` output stays
//! machine-readable on stdout) and its exit code becomes ours.

use std::ffi::OsString;
use std::process::ExitCode;

use crate::{cargo, display_cmd};

pub(crate) fn run(args: &[OsString]) -> ExitCode {
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--release",
        "-q",
        "-p",
        "meshwork-bench",
        "--features",
        "tarpc",
        "--",
    ])
    .args(args);
    // stdout is the benchmark's own output; keep our chatter on stderr.
    eprintln!("$ {}", display_cmd(&cmd));
    match cmd.status() {
        Ok(status) => exit_code_of(status),
        Err(e) => {
            eprintln!("error: failed to run `{}`: {e}", display_cmd(&cmd));
            ExitCode::FAILURE
        }
    }
}

/// The exit code to propagate: the child's code, or `128 + signal` like a
/// shell does when it was killed by a signal.
fn exit_code_of(status: std::process::ExitStatus) -> ExitCode {
    if let Some(code) = status.code() {
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return ExitCode::from(u8::try_from(128 + sig).unwrap_or(1));
        }
    }
    ExitCode::FAILURE
}
