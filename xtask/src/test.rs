//! `cargo xtask test`: the project's one test command (what CI runs).
//!
//! Steps, stopping at the first failure:
//! 1. `cargo nextest run --workspace` (or `cargo test --workspace` when
//!    cargo-nextest is not installed),
//! 2. `cargo test --workspace --doc` (nextest does not run doc tests),
//! 3. the test-mesh scenarios (all of them, default node count), in-process.

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{Reported, cargo, display_cmd, fmt_duration, test_mesh, usage};

const HELP: &str = "\
cargo xtask test

Runs, stopping at the first failure:
  1. cargo nextest run --workspace   (cargo test --workspace if nextest is missing)
  2. cargo test --workspace --doc
  3. cargo xtask test-mesh           (all scenarios, 5 nodes)
and prints one summary line per step, then `xtask test: N passed, M failed`.
";

/// One step of `cargo xtask test`.
struct Step {
    name: String,
    run: Box<dyn FnOnce() -> Result<()>>,
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    if let Some(arg) = args.first() {
        if arg == "-h" || arg == "--help" {
            print!("{HELP}");
            return Ok(());
        }
        return Err(usage(format!("test: unexpected argument `{arg}`")));
    }

    let mut unit = cargo();
    if nextest_available() {
        // `--no-tests=warn`: a workspace (or a filter) without tests is not a
        // failure, same as with `cargo test`.
        unit.args(["nextest", "run", "--workspace", "--no-tests=warn"]);
    } else {
        println!(
            "xtask test: cargo-nextest is not installed (`cargo nextest --version` failed); \
             falling back to `cargo test --workspace`. Install it with `cargo install cargo-nextest`."
        );
        unit.args(["test", "--workspace"]);
    }
    let mut doc = cargo();
    doc.args(["test", "--workspace", "--doc"]);

    let steps = vec![
        command_step(unit),
        command_step(doc),
        Step {
            name: "test-mesh (all scenarios, 5 nodes)".to_owned(),
            run: Box::new(|| test_mesh::run(&test_mesh::Options::default())),
        },
    ];

    let total = steps.len();
    let mut passed = 0;
    for (i, step) in steps.into_iter().enumerate() {
        println!("\n==> xtask test [{}/{total}]: {}", i + 1, step.name);
        let started = Instant::now();
        let result = (step.run)();
        let took = fmt_duration(started.elapsed());
        match result {
            Ok(()) => {
                passed += 1;
                println!("==> ok     [{}/{total}] {} ({took})", i + 1, step.name);
            }
            Err(err) => {
                println!(
                    "==> FAILED [{}/{total}] {} ({took}): {err:#}",
                    i + 1,
                    step.name
                );
                println!("\nxtask test: {passed} passed, 1 failed");
                return Err(Reported.into());
            }
        }
    }
    println!("\nxtask test: {passed} passed, 0 failed");
    Ok(())
}

fn command_step(mut cmd: Command) -> Step {
    let name = display_cmd(&cmd);
    Step {
        name: name.clone(),
        run: Box::new(move || {
            let status = cmd
                .status()
                .with_context(|| format!("failed to start `{name}`"))?;
            if !status.success() {
                bail!("{status}");
            }
            Ok(())
        }),
    }
}

fn nextest_available() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
