//! Memory per idle connection: `idle_conn_mem_noise_per_end`.
//!
//! Each run is a fresh child process (this binary, started with
//! [`CHILD_FLAG`]), so that memory the allocator kept from earlier figures or
//! runs cannot absorb the growth being measured. The child:
//!
//! 1. starts two [`Endpoint`]s on loopback TCP with the default [`Config`]
//!    (encrypted), or with [`Config::with_insecure_plaintext`] for the
//!    baseline, and no other change to the limits;
//! 2. opens `warmup` connections (dialling at most [`DIAL_CONCURRENCY`] at
//!    once, the server accepting every one), so thread arenas, tokio's
//!    driver slabs and the endpoints' tables exist before measuring;
//! 3. waits `idle`, reads the resident set size from `/proc/self/statm`,
//!    opens `conns` more connections the same way, waits `idle` again and
//!    reads it again;
//! 4. reports the growth divided by `2 × conns`: both ends of every
//!    connection live in the process, so the figure is per end (one side's
//!    cost of one connection).
//!
//! `statm` counts pages; their size comes from `getconf PAGESIZE`, or is
//! taken to be 4096 bytes if that fails (said on stderr). Kernel memory
//! (socket buffers) is not in the RSS and not counted. The growth of the
//! data segment (`statm` field 6: heap and stacks, reserved but not
//! necessarily touched) is printed on stderr alongside, since buffers that
//! are allocated but not yet written do not show in the RSS.
//!
//! Every connection needs a file descriptor at each end: the child needs
//! `2 × (warmup + conns)` plus a few. If the soft limit is lower but the hard
//! limit allows it, the child is started through `sh -c 'ulimit -n …'`; if
//! the hard limit is too low as well, `conns` is reduced and stderr says so.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use futures_util::{FutureExt as _, StreamExt as _};
use meshwork_transport::{Address, Config, Connection, Endpoint, TcpTransport};

use crate::harness::{Options, median, rotate};
use crate::report::{Better, Figure};
use crate::transport::{BENCH, NETWORK};

/// The first argument that makes this binary a measuring child.
pub(crate) const CHILD_FLAG: &str = "--idle-connections-child";
/// The figure's name.
const METRIC: &str = "idle_conn_mem_noise_per_end";
/// Target: at most this many KiB per end of an idle encrypted connection.
const TARGET_KIB: f64 = 64.0;
/// Handshakes in progress at once while opening connections; well under
/// the default `max_pending_handshakes` (64), so no dial is turned away.
const DIAL_CONCURRENCY: usize = 16;
/// File descriptors the child needs besides two per connection: stdio, the
/// listener, the runtime's epoll and wakers, and some slack.
const FD_SLACK: u64 = 64;
/// Page size assumed when `getconf PAGESIZE` fails.
const DEFAULT_PAGE_SIZE: u64 = 4096;
/// Time a child may take before it gives up.
const CHILD_LIMIT: Duration = Duration::from_secs(25);
/// Time allowed for one run, as seen from the parent.
const RUN_LIMIT: Duration = Duration::from_secs(40);
/// Fewest measured connections worth reporting.
const MIN_CONNS: u64 = 50;

/// How many connections, and how long they idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Connections opened before the first reading.
    pub(crate) warmup: u64,
    /// Connections measured.
    pub(crate) conns: u64,
    /// Time left idle before each reading.
    pub(crate) idle: Duration,
}

impl Plan {
    /// A full run.
    pub(crate) const FULL: Plan = Plan {
        warmup: 50,
        conns: 500,
        idle: Duration::from_millis(300),
    };
    /// A `--quick` run.
    pub(crate) const QUICK: Plan = Plan {
        warmup: 50,
        conns: 250,
        idle: Duration::from_millis(200),
    };

    /// File descriptors the child needs.
    fn fds_needed(&self) -> u64 {
        2 * (self.warmup + self.conns) + FD_SLACK
    }
}

/// What one child measured, per end of a connection, in KiB.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Reading {
    /// Growth of the resident set.
    rss: f64,
    /// Growth of the data segment (allocated, not necessarily resident).
    data: f64,
}

/// Measures the figure: plaintext and encrypted children in turn,
/// `opts.runs` of each; the medians. `plan` comes from [`fit_fd_limit`].
pub(crate) async fn measure(opts: &Options, plan: Plan) -> Result<Figure> {
    let page = page_size();
    let sides = ["plaintext", "noise"];
    // The data-segment growth of every run, per side, for the note below.
    let data: Arc<Mutex<[Vec<f64>; 2]>> = Arc::default();
    let label = format!("idle_conn_mem ({} conns)", plan.conns);
    let samples = rotate(&label, "KiB", opts, RUN_LIMIT, &sides, |i| {
        let data = data.clone();
        async move {
            let reading = tokio::task::spawn_blocking(move || run_child(i == 0, plan, page))
                .await
                .context("idle connections child")??;
            lock(&data)[i].push(reading.data);
            Ok(reading.rss)
        }
        .boxed()
    })
    .await?;
    let (plain, noise) = (samples.median(0), samples.median(1));
    {
        let data = lock(&data);
        eprintln!(
            "  {METRIC}: RSS growth / (2 × {} connections): both ends are in one process; \
             after {} warm-up connections and {} ms idle; {page}-byte pages",
            plan.conns,
            plan.warmup,
            plan.idle.as_millis(),
        );
        eprintln!(
            "  {METRIC}: data-segment growth per end (allocated, not necessarily resident): \
             plaintext {:.1} KiB, noise {:.1} KiB",
            median(&data[0]),
            median(&data[1]),
        );
    }
    Ok(Figure::compared(
        BENCH,
        METRIC,
        "KiB",
        Better::Lower,
        noise,
        ("plaintext", plain),
    )
    .with_value_target(TARGET_KIB))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The page size from `getconf PAGESIZE`, or 4096 (said on stderr).
pub(crate) fn page_size() -> u64 {
    let asked = Command::new("getconf")
        .arg("PAGESIZE")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse::<u64>().ok())
        .filter(|&n| n > 0);
    asked.unwrap_or_else(|| {
        eprintln!("  {METRIC}: `getconf PAGESIZE` failed; assuming {DEFAULT_PAGE_SIZE}-byte pages");
        DEFAULT_PAGE_SIZE
    })
}

/// The soft and hard limits on open files from `/proc/self/limits`
/// (`u64::MAX` for unlimited); `None` if they cannot be read.
fn fd_limits() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_fd_limits(&text)
}

/// The "Max open files" line of a `/proc/<pid>/limits` text.
fn parse_fd_limits(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut values = line["Max open files".len()..].split_whitespace().map(|v| {
        if v == "unlimited" {
            Some(u64::MAX)
        } else {
            v.parse().ok()
        }
    });
    Some((values.next()??, values.next()??))
}

/// `plan`, with fewer connections if even the hard limit on open files is
/// too low for it (said on stderr).
pub(crate) fn fit_fd_limit(plan: Plan) -> Result<Plan> {
    let Some((_, hard)) = fd_limits() else {
        return Ok(plan);
    };
    if hard >= plan.fds_needed() {
        return Ok(plan);
    }
    let conns = (hard.saturating_sub(FD_SLACK) / 2).saturating_sub(plan.warmup);
    ensure!(
        conns >= MIN_CONNS,
        "{METRIC}: the open-file limit ({hard}) leaves room for only {conns} connections"
    );
    eprintln!(
        "  {METRIC}: open-file limit {hard} < {} needed for {} connections; measuring {conns}",
        plan.fds_needed(),
        plan.conns
    );
    Ok(Plan { conns, ..plan })
}

/// Runs one child and returns what it measured. Blocking.
fn run_child(plaintext: bool, plan: Plan, page: u64) -> Result<Reading> {
    let exe = std::env::current_exe().context("finding this program")?;
    let args = [
        CHILD_FLAG.to_string(),
        if plaintext { "plaintext" } else { "noise" }.to_string(),
        plan.warmup.to_string(),
        plan.conns.to_string(),
        plan.idle.as_millis().to_string(),
        page.to_string(),
    ];
    let need = plan.fds_needed();
    let mut cmd = match fd_limits() {
        // Raise the soft limit for the child only; `fit_fd_limit` made sure
        // the hard limit allows it.
        Some((soft, _)) if soft < need => {
            let mut cmd = Command::new("sh");
            cmd.arg("-c")
                .arg(r#"ulimit -n "$0" && exec "$@""#)
                .arg(need.to_string())
                .arg(&exe);
            cmd
        }
        _ => Command::new(&exe),
    };
    let out = cmd
        .args(&args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("starting the idle connections child")?;
    ensure!(
        out.status.success(),
        "idle connections child failed ({})",
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let value: serde_json::Value = serde_json::from_str(text.trim())
        .with_context(|| format!("idle connections child said {text:?}"))?;
    let field = |name: &str| {
        value[name]
            .as_f64()
            .with_context(|| format!("no {name} in {text:?}"))
    };
    Ok(Reading {
        rss: field("rss_kib_per_end")?,
        data: field("data_kib_per_end")?,
    })
}

/// The child's `main`: measures, prints one JSON object on stdout.
pub(crate) fn child_main(args: &[String]) -> Result<()> {
    let [security, warmup, conns, idle_ms, page] = args else {
        bail!("expected: plaintext|noise WARMUP CONNS IDLE_MS PAGE_SIZE, got {args:?}");
    };
    let plaintext = match security.as_str() {
        "plaintext" => true,
        "noise" => false,
        other => bail!("unknown security {other:?}"),
    };
    let plan = Plan {
        warmup: warmup.parse().context("warm-up connections")?,
        conns: conns.parse().context("connections")?,
        idle: Duration::from_millis(idle_ms.parse().context("idle time")?),
    };
    ensure!(plan.conns > 0, "no connections to measure");
    let page: u64 = page.parse().context("page size")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let (before, after) = runtime.block_on(async {
        tokio::time::timeout(CHILD_LIMIT, child_measure(plaintext, plan))
            .await
            .with_context(|| format!("timed out after {CHILD_LIMIT:?}"))?
    })?;
    let per_end = |pages_before: u64, pages_after: u64| {
        pages_after.saturating_sub(pages_before) as f64 * page as f64
            / (2 * plan.conns) as f64
            / 1024.0
    };
    let line = serde_json::json!({
        "rss_kib_per_end": per_end(before.resident, after.resident),
        "data_kib_per_end": per_end(before.data, after.data),
    });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").context("writing the result")?;
    stdout.flush().context("writing the result")?;
    // Leave without closing 2 × (warmup + conns) connections one by one.
    drop(stdout);
    std::process::exit(0)
}

/// Pages counted by `/proc/self/statm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Statm {
    /// Resident pages (field 2).
    pub(crate) resident: u64,
    /// Data and stack pages (field 6).
    pub(crate) data: u64,
}

/// Reads `/proc/self/statm`.
pub(crate) fn statm() -> Result<Statm> {
    let text = std::fs::read_to_string("/proc/self/statm").context("reading /proc/self/statm")?;
    parse_statm(&text).with_context(|| format!("unexpected /proc/self/statm: {text:?}"))
}

/// Parses the text of `/proc/<pid>/statm`.
fn parse_statm(text: &str) -> Option<Statm> {
    let fields: Vec<u64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    Some(Statm {
        resident: *fields.get(1)?,
        data: *fields.get(5)?,
    })
}

/// The configuration of both endpoints: the defaults, or the defaults
/// without encryption.
fn config(plaintext: bool) -> Config {
    let config = Config::new(NETWORK);
    if plaintext {
        config.with_insecure_plaintext()
    } else {
        config
    }
}

/// Opens the warm-up connections, then the measured ones; the `statm`
/// readings before and after the measured ones. The connections stay open
/// until the process exits.
async fn child_measure(plaintext: bool, plan: Plan) -> Result<(Statm, Statm)> {
    let server = Endpoint::new(config(plaintext), TcpTransport::new());
    let listen: Address = "tcp://127.0.0.1:0".parse().context("listen address")?;
    let addr = server.listen(&listen).await.context("meshwork listen")?;
    let client = Endpoint::new(config(plaintext), TcpTransport::new());
    let total = (plan.warmup + plan.conns) as usize;
    // Room for every connection up front, so this vector's growth is not
    // measured.
    let mut held: Vec<Connection> = Vec::with_capacity(2 * total);

    open(&client, &server, &addr, plan.warmup as usize, &mut held).await?;
    tokio::time::sleep(plan.idle).await;
    let before = statm()?;
    open(&client, &server, &addr, plan.conns as usize, &mut held).await?;
    tokio::time::sleep(plan.idle).await;
    let after = statm()?;

    for (name, endpoint) in [("server", &server), ("client", &client)] {
        let stats = endpoint.stats();
        ensure!(
            stats.open_connections == total,
            "the {name} has {} connections open, not {total}: {stats:?}",
            stats.open_connections
        );
        ensure!(
            stats.rejected_busy == 0
                && stats.evicted_handshakes == 0
                && stats.handshakes_failed == 0,
            "the {name} turned connections away: {stats:?}"
        );
    }
    ensure!(held.len() == 2 * total, "holding {} ends", held.len());
    Ok((before, after))
}

/// Opens `n` connections from `client` to `server`, accepting them all, and
/// keeps both ends in `held`.
async fn open(
    client: &Endpoint,
    server: &Endpoint,
    addr: &Address,
    n: usize,
    held: &mut Vec<Connection>,
) -> Result<()> {
    let dials = futures_util::stream::iter(0..n)
        .map(|_| client.connect(addr))
        .buffer_unordered(DIAL_CONCURRENCY)
        .collect::<Vec<_>>();
    let accepts = async {
        let mut accepted = Vec::with_capacity(n);
        for _ in 0..n {
            let conn = server
                .accept()
                .await
                .context("the server stopped accepting")?;
            accepted.push(conn);
        }
        anyhow::Ok(accepted)
    };
    let (dialled, accepted) = tokio::join!(dials, accepts);
    for conn in dialled {
        held.push(conn.context("meshwork connect")?);
    }
    held.extend(accepted?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             63704                63704                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_fd_limits(limits), Some((1024, 524_288)));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_fd_limits(unlimited), Some((u64::MAX, u64::MAX)));
        assert_eq!(parse_fd_limits("Max processes 1 1 processes\n"), None);
        assert_eq!(
            parse_statm("6047 1234 700 200 0 3000 0\n"),
            Some(Statm {
                resident: 1234,
                data: 3000
            })
        );
        assert_eq!(parse_statm("1 2"), None);
    }

    #[test]
    fn this_process_has_readable_limits() {
        let (soft, hard) = fd_limits().expect("Linux /proc");
        assert!(soft <= hard);
        let now = statm().unwrap();
        assert!(now.resident > 0 && now.data > 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_child_measurement_runs() {
        for plaintext in [true, false] {
            let plan = Plan {
                warmup: 5,
                conns: 20,
                idle: Duration::from_millis(10),
            };
            let (before, after) = child_measure(plaintext, plan).await.unwrap();
            assert!(after.data >= before.data / 2);
        }
    }
}
