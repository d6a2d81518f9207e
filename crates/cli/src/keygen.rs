//! `meshwork keygen`: create a node key or a network key file.
//!
//! Both are written with mode 0600 and never over an existing file. For a
//! node key the node id (its public key, hex) is the only line on stdout,
//! so scripts can capture it for `--allow`; messages go to stderr.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use meshwork::transport::{Identity, NetworkKey};

/// Options of `meshwork keygen`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("kind").required(true).args(["key", "network_key"])))]
pub(crate) struct KeygenArgs {
    /// Create a node key (a node's identity, for `meshwork node --key`) in
    /// FILE and print its node id. Refuses to overwrite an existing file.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,

    /// Create a network key (a shared secret, for `meshwork node
    /// --network-key`) in FILE. Refuses to overwrite an existing file.
    #[arg(long, value_name = "FILE")]
    network_key: Option<PathBuf>,
}

/// What `keygen` made.
#[derive(Debug)]
enum Created {
    /// A node key, with its node id in hex.
    NodeKey(String),
    /// A network key.
    NetworkKey,
}

/// Creates the requested key file and reports it.
pub(crate) fn run(args: &KeygenArgs) -> anyhow::Result<ExitCode> {
    let (path, created) = create(args)?;
    match created {
        Created::NodeKey(node_id) => {
            eprintln!(
                "created node key {} (mode 0600); node id:\n  {node_id}\n\
                 Keep the file secret: whoever holds it is this node. \
                 Use it with `meshwork node --key {0}`.",
                path.display()
            );
            let mut out = std::io::stdout().lock();
            writeln!(out, "{node_id}")
                .and_then(|()| out.flush())
                .context("cannot write the node id to stdout")?;
        }
        Created::NetworkKey => eprintln!(
            "created network key {} (mode 0600).\n\
             Copy it (over a secure channel) to every node of the network and start them with \
             `meshwork node --network-key FILE`; nodes without it cannot connect.",
            path.display()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

fn create(args: &KeygenArgs) -> anyhow::Result<(&Path, Created)> {
    match (&args.key, &args.network_key) {
        (Some(path), _) => {
            refuse_existing(path, "node key")?;
            // `load_or_create` creates the file exclusively (O_EXCL), so a
            // file that appears in the meantime is still never replaced.
            let identity = Identity::load_or_create(path).context("cannot create the node key")?;
            Ok((path, Created::NodeKey(identity.node_id().to_string())))
        }
        (None, Some(path)) => {
            refuse_existing(path, "network key")?;
            NetworkKey::create(path).context("cannot create the network key")?;
            Ok((path, Created::NetworkKey))
        }
        // clap's argument group requires one of them.
        (None, None) => bail!("give --key FILE or --network-key FILE"),
    }
}

/// Fails if anything (even a dangling symlink) is at `path`.
fn refuse_existing(path: &Path, what: &str) -> anyhow::Result<()> {
    if path.symlink_metadata().is_ok() {
        bail!(
            "key file {}: already exists; refusing to overwrite it with a new {what} \
             (delete it first if you really mean to replace it)",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::temp_dir;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Wrap {
        #[command(flatten)]
        args: KeygenArgs,
    }

    fn parse(argv: &[&str]) -> Result<KeygenArgs, clap::Error> {
        Wrap::try_parse_from(std::iter::once("keygen").chain(argv.iter().copied())).map(|w| w.args)
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn exactly_one_kind_of_key() {
        assert_eq!(parse(&[]).unwrap_err().exit_code(), 2);
        assert_eq!(
            parse(&["--key", "a", "--network-key", "b"])
                .unwrap_err()
                .exit_code(),
            2
        );
        assert!(parse(&["--key", "a"]).is_ok());
        assert!(parse(&["--network-key", "b"]).is_ok());
    }

    #[test]
    fn node_key_is_created_once_with_its_id() {
        let dir = temp_dir("keygen");
        let path = dir.join("node.key");
        let args = parse(&["--key", path.to_str().unwrap()]).unwrap();
        let (_, created) = create(&args).unwrap();
        let Created::NodeKey(id) = created else {
            panic!("expected a node key, got {created:?}")
        };
        assert_eq!(
            Identity::load(&path).unwrap().node_id().to_string(),
            id,
            "the printed id is the file's"
        );
        #[cfg(unix)]
        assert_eq!(mode(&path), 0o600);
        let before = std::fs::read(&path).unwrap();
        let e = format!("{:#}", create(&args).unwrap_err());
        assert!(
            e.contains("already exists") && e.contains(&path.display().to_string()),
            "{e}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), before, "never overwritten");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn network_key_is_created_once() {
        let dir = temp_dir("keygen-net");
        let path = dir.join("net.key");
        let args = parse(&["--network-key", path.to_str().unwrap()]).unwrap();
        assert!(matches!(create(&args).unwrap().1, Created::NetworkKey));
        NetworkKey::load(&path).unwrap();
        #[cfg(unix)]
        assert_eq!(mode(&path), 0o600);
        let before = std::fs::read(&path).unwrap();
        let e = format!("{:#}", create(&args).unwrap_err());
        assert!(e.contains("already exists"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), before, "never overwritten");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
