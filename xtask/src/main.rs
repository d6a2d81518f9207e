//! Developer tasks for the meshwork workspace, in the style of
//! [rust-analyzer's xtask](https://github.com/rust-lang/rust-analyzer/tree/master/xtask).
//!
//! Run `cargo xtask --help` for the list of tasks. Each task lives in its own
//! module; this file only parses the command line and dispatches.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod bench;
mod docs;
mod test;
mod test_mesh;

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

const USAGE: &str = "\
Developer tasks for meshwork.

USAGE:
    cargo xtask <TASK> [OPTIONS]

TASKS:
    test        Run everything CI runs: unit + integration tests (cargo nextest,
                or cargo test if nextest is not installed), doc tests, and the
                multi-process test-mesh scenarios. Stops at the first failure.
    test-mesh   Start a real mesh of `meshwork node` processes on loopback and
                check it through the nodes' admin HTTP API.
                [--nodes N] [--scenario NAME]... [--release] [--keep-logs] [--list]
    docs        Build the workspace docs with warnings denied and print where
                each crate's index.html is.
    bench       Run the benchmarks (meshwork-bench, release build).
                [NAME]... [--json] [--quick] [--runs N]

Run `cargo xtask <TASK> --help` for the options of a task.
";

fn main() -> ExitCode {
    let mut args = env::args_os().skip(1);
    let task = args.next();
    let rest: Vec<OsString> = args.collect();
    let task = match task.as_ref().map(|t| t.to_str()) {
        None | Some(Some("-h" | "--help" | "help")) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(Some(task)) => task,
        Some(None) => return usage_error(None, "task name is not valid UTF-8"),
    };

    let result = match task {
        // `bench` forwards its arguments verbatim (including `--help`) and
        // propagates the benchmark binary's own exit code.
        "bench" => return bench::run(&rest),
        "test" => match string_args(rest) {
            Ok(rest) => test::run(&rest),
            Err(e) => return usage_error(Some(task), &e),
        },
        "test-mesh" => match string_args(rest) {
            Ok(rest) => test_mesh::run_cli(&rest),
            Err(e) => return usage_error(Some(task), &e),
        },
        "docs" => match string_args(rest) {
            Ok(rest) => docs::run(&rest),
            Err(e) => return usage_error(Some(task), &e),
        },
        other => return usage_error(None, &format!("unknown task `{other}`")),
    };

    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if err.is::<Reported>() {
                return ExitCode::FAILURE;
            }
            if err.is::<UsageError>() {
                return usage_error(Some(task), &err.to_string());
            }
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// A command-line mistake: reported with a hint to `--help` and exit code 2.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// A failure that has already been reported on the terminal: exit 1 without
/// printing anything more.
#[derive(Debug)]
struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("failed (see above)")
    }
}

impl std::error::Error for Reported {}

/// Builds an `anyhow::Error` for a bad command line.
fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

fn usage_error(task: Option<&str>, msg: &str) -> ExitCode {
    eprintln!("error: {msg}");
    match task {
        Some(task) => eprintln!("Run `cargo xtask {task} --help` for usage."),
        None => eprintln!("Run `cargo xtask --help` for usage."),
    }
    ExitCode::from(2)
}

fn string_args(args: Vec<OsString>) -> Result<Vec<String>, String> {
    args.into_iter()
        .map(|a| {
            a.into_string()
                .map_err(|a| format!("argument {a:?} is not valid UTF-8"))
        })
        .collect()
}

/// The workspace root: the parent of this crate's manifest directory.
fn project_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.to_path_buf(), Path::to_path_buf)
}

/// Cargo's target directory as a user gets it: `$CARGO_TARGET_DIR` if set
/// (relative paths are relative to the current directory, like cargo does),
/// else `<workspace root>/target`.
fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                env::current_dir().map(|cwd| cwd.join(&dir)).unwrap_or(dir)
            }
        }
        _ => project_root().join("target"),
    }
}

/// A `cargo` command run from the workspace root. Uses the same cargo that
/// launched us (`$CARGO`) when available, so toolchain overrides carry over.
/// An explicit `CARGO_TARGET_DIR` is passed on as an absolute path, since the
/// child runs in the workspace root rather than the caller's directory.
fn cargo() -> Command {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(cargo);
    cmd.current_dir(project_root());
    if env::var_os("CARGO_TARGET_DIR").is_some_and(|d| !d.is_empty()) {
        cmd.env("CARGO_TARGET_DIR", target_dir());
    }
    cmd
}

/// Renders a command for humans: `cargo build -p meshwork-cli`.
fn display_cmd(cmd: &Command) -> String {
    let mut out = String::new();
    let program = Path::new(cmd.get_program());
    // Show `cargo`, not `/home/me/.rustup/toolchains/.../bin/cargo`.
    let name = program
        .file_name()
        .map_or_else(|| program.to_string_lossy(), |n| n.to_string_lossy());
    out.push_str(&name);
    for arg in cmd.get_args() {
        out.push(' ');
        out.push_str(&arg.to_string_lossy());
    }
    out
}

/// Formats a duration for humans: `850ms`, `12.3s`.
fn fmt_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_root_has_workspace_manifest() {
        assert!(project_root().join("Cargo.toml").is_file());
        assert!(project_root().join("xtask").is_dir());
    }

    #[test]
    fn display_cmd_is_readable() {
        let mut cmd = Command::new("/some/toolchain/bin/cargo");
        cmd.args(["build", "-p", "meshwork-cli"]);
        assert_eq!(display_cmd(&cmd), "cargo build -p meshwork-cli");
    }

    #[test]
    fn durations() {
        assert_eq!(fmt_duration(Duration::from_millis(12_345)), "12.3s");
        assert_eq!(fmt_duration(Duration::from_millis(10_000)), "10.0s");
        assert_eq!(fmt_duration(Duration::from_micros(85_400)), "85ms");
    }
}
