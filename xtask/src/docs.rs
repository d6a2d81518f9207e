//! `cargo xtask docs`
//!
//! Builds `cargo doc --workspace --no-deps` with rustdoc warnings denied, then
//! prints where each workspace crate's `index.html` is and checks it exists.

use std::env;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{cargo, display_cmd, target_dir, usage};

const HELP: &str = "\
cargo xtask docs

Runs `cargo doc --workspace --no-deps` with `-D warnings` appended to
RUSTDOCFLAGS, then prints the index.html of every workspace crate with a
library target (binary-only crates: their bin docs if built, else skipped).
Fails if rustdoc warns or an index.html is missing.
";

pub(crate) fn run(args: &[String]) -> Result<()> {
    if let Some(arg) = args.first() {
        if arg == "-h" || arg == "--help" {
            print!("{HELP}");
            return Ok(());
        }
        return Err(usage(format!("docs: unexpected argument `{arg}`")));
    }

    let mut cmd = cargo();
    cmd.args(["doc", "--workspace", "--no-deps"]);
    // cargo ignores RUSTDOCFLAGS when CARGO_ENCODED_RUSTDOCFLAGS is set, so
    // extend whichever one is in effect.
    let flags_desc = if let Some(encoded) = env::var_os("CARGO_ENCODED_RUSTDOCFLAGS") {
        let mut flags = encoded.to_string_lossy().into_owned();
        if !flags.is_empty() {
            flags.push('\x1f');
        }
        flags.push_str("-D\x1fwarnings");
        let desc = format!("CARGO_ENCODED_RUSTDOCFLAGS={:?}", flags);
        cmd.env("CARGO_ENCODED_RUSTDOCFLAGS", flags);
        desc
    } else {
        let flags = append_flags(env::var("RUSTDOCFLAGS").ok().as_deref(), "-D warnings");
        let desc = format!("RUSTDOCFLAGS={flags:?}");
        cmd.env("RUSTDOCFLAGS", flags);
        desc
    };
    println!("$ {flags_desc} {}", display_cmd(&cmd));
    let status = cmd
        .status()
        .with_context(|| format!("failed to run `{}`", display_cmd(&cmd)))?;
    if !status.success() {
        bail!(
            "`{}` failed ({status}); fix the warnings above",
            display_cmd(&cmd)
        );
    }

    let metadata = cargo_metadata()?;
    let doc_dir = target_dir().join("doc");
    let targets = doc_targets(&metadata)?;
    let collisions = collisions(&targets);
    let mut missing = Vec::new();
    println!();
    for c in reported(&targets) {
        let index = index_html(&doc_dir, &c.crate_name);
        let clash = if collisions.iter().any(|(name, _)| *name == c.crate_name) {
            " (COLLISION, see below)"
        } else {
            ""
        };
        match c.kind {
            DocKind::Lib if index.is_file() => {
                println!("{:<28} {}{clash}", c.package, index.display());
            }
            DocKind::Lib => {
                println!("{:<28} MISSING {}", c.package, index.display());
                missing.push(index);
            }
            DocKind::Bin if c.documented && index.is_file() => {
                println!("{:<28} {} (bin){clash}", c.package, index.display());
            }
            DocKind::Bin => println!("{:<28} skipped (binary only, no docs)", c.package),
        }
    }
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
        bail!("docs missing for: {}", list.join(", "));
    }
    if !collisions.is_empty() {
        println!();
        for (_, msg) in &collisions {
            println!("error: doc output collision: {msg}");
        }
        bail!("doc output collision: the printed index.html may not be the crate it claims to be");
    }
    Ok(())
}

/// `existing` (RUSTDOCFLAGS as set by the user) followed by `extra`.
fn append_flags(existing: Option<&str>, extra: &str) -> String {
    match existing.map(str::trim) {
        Some(existing) if !existing.is_empty() => format!("{existing} {extra}"),
        _ => extra.to_owned(),
    }
}

fn cargo_metadata() -> Result<Value> {
    let mut cmd = cargo();
    cmd.args(["metadata", "--no-deps", "--format-version", "1"]);
    let out = cmd
        .output()
        .with_context(|| format!("failed to run `{}`", display_cmd(&cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}):\n{}",
            display_cmd(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("cargo metadata printed invalid JSON")
}

#[derive(Debug, PartialEq, Eq)]
enum DocKind {
    Lib,
    Bin,
}

impl std::fmt::Display for DocKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DocKind::Lib => "lib",
            DocKind::Bin => "bin",
        })
    }
}

#[derive(Debug, PartialEq, Eq)]
struct DocTarget {
    package: String,
    /// Directory name under `target/doc/`: the crate name with `-` as `_`.
    crate_name: String,
    kind: DocKind,
    /// Whether `cargo doc` documents it (`doc = true`, and not a bin named
    /// like its package's lib).
    documented: bool,
}

/// Every lib and bin target of the workspace packages, sorted by package.
fn doc_targets(metadata: &Value) -> Result<Vec<DocTarget>> {
    let packages = metadata["packages"]
        .as_array()
        .context("cargo metadata: no `packages` array")?;
    let mut out = Vec::new();
    for pkg in packages {
        let name = pkg["name"]
            .as_str()
            .context("cargo metadata: package without a name")?;
        let targets = pkg["targets"]
            .as_array()
            .with_context(|| format!("cargo metadata: package {name} has no targets"))?;
        let has_kind = |t: &Value, wanted: &[&str]| {
            t["kind"].as_array().is_some_and(|ks| {
                ks.iter()
                    .any(|k| k.as_str().is_some_and(|k| wanted.contains(&k)))
            })
        };
        let lib_kinds = ["lib", "rlib", "dylib", "cdylib", "staticlib", "proc-macro"];
        let mut lib_name = None;
        for t in targets {
            let kind = if has_kind(t, &lib_kinds) {
                DocKind::Lib
            } else if has_kind(t, &["bin"]) {
                DocKind::Bin
            } else {
                continue;
            };
            let crate_name = t["name"]
                .as_str()
                .with_context(|| format!("cargo metadata: nameless target in {name}"))?
                .replace('-', "_");
            if kind == DocKind::Lib {
                lib_name = Some(crate_name.clone());
            }
            out.push(DocTarget {
                package: name.to_owned(),
                crate_name,
                kind,
                documented: t["doc"].as_bool().unwrap_or(true),
            });
        }
        // cargo doc skips a bin named like its own package's lib.
        if let Some(lib_name) = lib_name {
            for t in out.iter_mut().filter(|t| t.package == name) {
                if t.kind == DocKind::Bin && t.crate_name == lib_name {
                    t.documented = false;
                }
            }
        }
    }
    out.sort_by(|a, b| a.package.cmp(&b.package));
    Ok(out)
}

/// What to print: each package's lib, or its bins if it has no lib.
fn reported(targets: &[DocTarget]) -> Vec<&DocTarget> {
    targets
        .iter()
        .filter(|t| {
            t.kind == DocKind::Lib
                || !targets
                    .iter()
                    .any(|o| o.package == t.package && o.kind == DocKind::Lib)
        })
        .collect()
}

/// Documented targets of different packages that write the same
/// `target/doc/<crate>/` directory, so one silently overwrites the other
/// (cargo only warns: <https://github.com/rust-lang/cargo/issues/6313>).
/// Returns `(crate name, explanation)` pairs.
fn collisions(targets: &[DocTarget]) -> Vec<(String, String)> {
    let documented: Vec<&DocTarget> = targets.iter().filter(|t| t.documented).collect();
    let mut out = Vec::new();
    for (i, a) in documented.iter().enumerate() {
        for b in &documented[i + 1..] {
            if a.crate_name == b.crate_name {
                let msg = format!(
                    "{} target `{}` of package {} and {} target `{}` of package {} both write \
                     target/doc/{}/ (one overwrites the other); rename one, or set `doc = false` \
                     on the bin target",
                    a.kind, a.crate_name, a.package, b.kind, b.crate_name, b.package, a.crate_name
                );
                out.push((a.crate_name.clone(), msg));
            }
        }
    }
    out
}

/// Where cargo puts a crate's docs.
fn index_html(doc_dir: &Path, crate_name: &str) -> PathBuf {
    doc_dir.join(crate_name).join("index.html")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_appended() {
        assert_eq!(append_flags(None, "-D warnings"), "-D warnings");
        assert_eq!(append_flags(Some("  "), "-D warnings"), "-D warnings");
        assert_eq!(
            append_flags(Some("--cfg docsrs"), "-D warnings"),
            "--cfg docsrs -D warnings"
        );
    }

    #[test]
    fn lib_and_bin_targets() {
        let metadata = serde_json::json!({
            "packages": [
                {"name": "meshwork-wire", "targets": [
                    {"name": "meshwork_wire", "kind": ["lib"], "doc": true},
                    {"name": "build-script-build", "kind": ["custom-build"], "doc": false}
                ]},
                {"name": "meshwork", "targets": [
                    {"name": "meshwork", "kind": ["lib"], "doc": true},
                    {"name": "meshwork", "kind": ["bin"], "doc": true},
                    {"name": "helper", "kind": ["bin"], "doc": true}
                ]},
                {"name": "meshwork-cli", "targets": [{"name": "mw", "kind": ["bin"], "doc": true}]},
                {"name": "xtask", "targets": [{"name": "xtask", "kind": ["bin"], "doc": false}]},
                {"name": "meshwork-integration-tests", "targets": [
                    {"name": "meshwork-integration-tests", "kind": ["lib"], "doc": true},
                    {"name": "mesh", "kind": ["test"], "doc": false}
                ]}
            ]
        });
        let targets = doc_targets(&metadata).unwrap();
        let summary: Vec<(&str, &str, String, bool)> = reported(&targets)
            .iter()
            .map(|t| {
                (
                    t.package.as_str(),
                    t.crate_name.as_str(),
                    t.kind.to_string(),
                    t.documented,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("meshwork", "meshwork", "lib".to_owned(), true),
                ("meshwork-cli", "mw", "bin".to_owned(), true),
                (
                    "meshwork-integration-tests",
                    "meshwork_integration_tests",
                    "lib".to_owned(),
                    true
                ),
                ("meshwork-wire", "meshwork_wire", "lib".to_owned(), true),
                ("xtask", "xtask", "bin".to_owned(), false),
            ]
        );
        // The same-named bin of a lib package is not documented, so no clash.
        assert!(collisions(&targets).is_empty());
    }

    #[test]
    fn bin_named_like_another_packages_lib_collides() {
        let metadata = serde_json::json!({
            "packages": [
                {"name": "meshwork", "targets": [{"name": "meshwork", "kind": ["lib"], "doc": true}]},
                {"name": "meshwork-cli", "targets": [{"name": "meshwork", "kind": ["bin"], "doc": true}]},
                {"name": "other-cli", "targets": [{"name": "meshwork", "kind": ["bin"], "doc": false}]}
            ]
        });
        let targets = doc_targets(&metadata).unwrap();
        let found = collisions(&targets);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, "meshwork");
        assert!(found[0].1.contains("meshwork-cli"), "{}", found[0].1);
    }
}
