//! `meshwork demo`: a small mesh in one process, shown live as it forms.
//!
//! The demo is a sequence of steps ([`Demo::start_nodes`],
//! [`Demo::form_mesh`], [`Demo::measure_rtt`], then always
//! [`Demo::shut_down`] and [`Demo::summary`]). Each step draws on the
//! [`Screen`] and adds lines to the summary; a layer that wants to show
//! itself off adds one step in [`run`].

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use meshwork::transport::Security;
use meshwork::transport::noise::NOISE_PARAMS;
use meshwork::wire::NodeId;
use meshwork::{Node, NodeStatus};
use tokio::time::Instant;

/// How often the live table is redrawn on a terminal.
const REFRESH: Duration = Duration::from_millis(500);
/// How often the nodes are polled while waiting for something.
const POLL: Duration = Duration::from_millis(10);
/// Ping interval of the demo nodes: short, so RTTs show up quickly.
const PING_INTERVAL: Duration = Duration::from_millis(250);
/// The mesh must be complete within this, or the demo fails.
const MESH_TIMEOUT: Duration = Duration::from_secs(10);
/// Each node must shut down within this.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Network name of the demo nodes.
const NETWORK: &str = "meshwork-demo";

/// Options of `meshwork demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Number of nodes to start.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u16).range(2..=64))]
    nodes: u16,

    /// How long the mesh runs before it is shut down, in seconds (at least
    /// until it is complete).
    #[arg(long, value_name = "S", default_value_t = 8.0, value_parser = parse_seconds)]
    seconds: f64,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=3600.0).contains(&v) => Ok(v),
        _ => Err("expected a number of seconds from 0 to 3600".into()),
    }
}

/// Runs the demo; exits non-zero if the mesh did not form or a node did not
/// shut down cleanly.
pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let mut demo = Demo::new(&args, Screen::detect());
    demo.intro();
    let steps = async {
        demo.start_nodes().await?;
        demo.form_mesh().await?;
        demo.measure_rtt().await;
        // Steps of the later layers (peers, flooding, kv, rpc) go here.
        anyhow::Ok(())
    };
    let mut interrupted = false;
    let outcome = tokio::select! {
        r = steps => r,
        _ = tokio::signal::ctrl_c() => {
            interrupted = true;
            Err(anyhow::anyhow!("interrupted (Ctrl-C); press it again to stop at once"))
        }
    };
    if let Err(e) = &outcome {
        demo.screen.print(&format!("demo stopped: {e:#}\n\n"));
    }
    // Shut down even after a failure or an interrupt; a second Ctrl-C
    // abandons the shutdown.
    let clean = tokio::select! {
        clean = demo.shut_down() => Some(clean),
        _ = tokio::signal::ctrl_c() => None,
    };
    let Some(clean) = clean else {
        demo.screen
            .print("\nsecond interrupt: exiting without finishing the shutdown\n");
        return Ok(ExitCode::from(130));
    };
    let code = demo.summary(outcome.is_ok() && clean);
    Ok(if interrupted {
        ExitCode::from(130)
    } else {
        code
    })
}

/// The state shared by the demo steps.
#[derive(Debug)]
struct Demo {
    /// Nodes asked for.
    count: usize,
    /// When the demo started; every time shown is relative to this.
    t0: Instant,
    /// When the mesh is shut down.
    deadline: Instant,
    /// The nodes started so far, in order.
    nodes: Vec<Node>,
    /// The last snapshot of every node (taken by [`Demo::refresh`]).
    statuses: Vec<NodeStatus>,
    /// When the mesh became complete (relative to `t0`).
    mesh_complete_after: Option<Duration>,
    /// Lines of the summary, added by the steps: (label, value).
    report: Vec<(String, String)>,
    screen: Screen,
}

impl Demo {
    fn new(args: &DemoArgs, screen: Screen) -> Self {
        let t0 = Instant::now();
        Demo {
            count: usize::from(args.nodes),
            t0,
            deadline: t0 + Duration::from_secs_f64(args.seconds),
            nodes: Vec::new(),
            statuses: Vec::new(),
            mesh_complete_after: None,
            report: Vec::new(),
            screen,
        }
    }

    fn intro(&mut self) {
        self.screen.print(&format!(
            "meshwork demo: {} nodes on TCP loopback, network {NETWORK:?}, pinging every {} ms\n\
             node 0 is the seed; node i dials nodes 0..i, so they form a full mesh\n\
             every link is encrypted and authenticated ({NOISE_PARAMS}); \
             a node id is the node's X25519 public key\n\n",
            self.count,
            PING_INTERVAL.as_millis(),
        ));
    }

    /// Takes a fresh snapshot of every node.
    fn refresh(&mut self) {
        self.statuses = self.nodes.iter().map(Node::status).collect();
    }

    fn frame(&self, phase: &str) -> String {
        render(&self.statuses, phase, self.t0.elapsed())
    }

    /// Step: start the nodes, node i seeding nodes 0..i.
    async fn start_nodes(&mut self) -> anyhow::Result<()> {
        for i in 0..self.count {
            let mut builder = Node::builder(NETWORK)
                .listen("tcp://127.0.0.1:0".parse()?)
                .metadata("demo-index", i.to_string())
                .ping_interval(PING_INTERVAL);
            for earlier in &self.nodes {
                let addr = earlier
                    .listen_addrs()
                    .into_iter()
                    .next()
                    .context("a demo node has no listen address")?;
                builder = builder.seed(addr);
            }
            let node = builder
                .start()
                .await
                .with_context(|| format!("starting node {i}"))?;
            self.nodes.push(node);
        }
        Ok(())
    }

    /// Step: wait until every node is connected to every other one.
    async fn form_mesh(&mut self) -> anyhow::Result<()> {
        let expected = pairs(self.count);
        let mut next_draw = Instant::now();
        let mut first = true;
        loop {
            self.refresh();
            let links = Links::of(&self.statuses);
            if links.complete(&self.statuses) {
                let took = self.t0.elapsed();
                self.report.push((
                    "links formed".into(),
                    format!("{} of {expected} expected (full mesh)", links.seen.len()),
                ));
                self.report
                    .push(("time to full mesh".into(), fmt_duration(took)));
                self.mesh_complete_after = Some(took);
                self.record_security()?;
                return Ok(());
            }
            if self.t0.elapsed() >= MESH_TIMEOUT {
                let missing = links.missing(&self.statuses);
                let phase = format!(
                    "mesh NOT complete after {}: {} of {expected} links up",
                    fmt_duration(MESH_TIMEOUT),
                    links.seen.len()
                );
                self.screen.draw(&self.frame(&phase), true);
                self.report.push((
                    "links formed".into(),
                    format!(
                        "{} of {expected} expected; missing: {}",
                        links.seen.len(),
                        missing.join(", ")
                    ),
                ));
                bail!(
                    "the mesh did not form within {}",
                    fmt_duration(MESH_TIMEOUT)
                );
            }
            if Instant::now() >= next_draw {
                let phase = format!("connecting: {} of {expected} links up", links.seen.len());
                self.screen.draw(&self.frame(&phase), first);
                first = false;
                next_draw += REFRESH;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Demo {
    /// Step: keep the mesh running until the deadline, showing the RTTs.
    async fn measure_rtt(&mut self) {
        let complete = self.mesh_complete_after.unwrap_or_default();
        // Leave time for a couple of pings even when --seconds is tiny.
        let deadline = self.deadline.max(Instant::now() + 2 * PING_INTERVAL);
        let mut first = true;
        loop {
            self.refresh();
            let left = deadline.saturating_duration_since(Instant::now());
            let phase = format!(
                "mesh complete after {}; measuring RTT, shutting down in {:.1}s",
                fmt_duration(complete),
                left.as_secs_f64()
            );
            self.screen.draw(&self.frame(&phase), first);
            first = false;
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left.min(REFRESH)).await;
        }
    }

    /// Shuts every node down, newest first (so no node sees its seed vanish
    /// and redials it), and checks that none is left with a connection.
    /// Returns true when everything went cleanly.
    async fn shut_down(&mut self) -> bool {
        let n = self.nodes.len();
        if n == 0 {
            return true;
        }
        self.refresh();
        self.record_rtt();
        let phase = format!("shutting down {n} nodes, newest first");
        self.screen.draw(&self.frame(&phase), true);
        self.screen.commit();

        let started = Instant::now();
        let mut problems = Vec::new();
        for (i, node) in self.nodes.iter().enumerate().rev() {
            if tokio::time::timeout(SHUTDOWN_TIMEOUT, node.shutdown())
                .await
                .is_err()
            {
                problems.push(format!(
                    "node {i} ({}) did not stop within {}",
                    node.node_id().short(),
                    fmt_duration(SHUTDOWN_TIMEOUT)
                ));
            }
            self.screen.draw(
                &format!("shutting down: {} of {n} nodes stopped\n", n - i),
                false,
            );
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let left = node.status().connections.len();
            if left > 0 {
                problems.push(format!(
                    "node {i} ({}) still has {left} connections after shutdown",
                    node.node_id().short()
                ));
            }
        }
        let took = fmt_duration(started.elapsed());
        let line = if problems.is_empty() {
            format!("all {n} nodes shut down cleanly in {took}")
        } else {
            format!("shutdown problems: {}", problems.join("; "))
        };
        self.screen.draw(&format!("{line}\n"), true);
        self.screen.commit();
        self.report.push(("shutdown".into(), line));
        problems.is_empty()
    }

    /// Checks that every node encrypts (the library default) and adds the
    /// handshake counts to the summary.
    fn record_security(&mut self) -> anyhow::Result<()> {
        let (mut ok, mut failed) = (0, 0);
        for (i, node) in self.nodes.iter().enumerate() {
            let security = node.endpoint().config().security();
            if security != Security::Noise {
                bail!("node {i} runs {} instead of noise", security.name());
            }
            let stats = node.endpoint().stats();
            ok += stats.handshakes_ok;
            failed += stats.handshakes_failed;
        }
        self.report.push((
            "encryption".into(),
            format!(
                "{NOISE_PARAMS} on every link; handshakes {ok} ok, {failed} failed \
                 (counted at both ends)"
            ),
        ));
        Ok(())
    }

    /// Adds the RTT figures of the last snapshot to the summary.
    fn record_rtt(&mut self) {
        let mut samples: Vec<Duration> = self
            .statuses
            .iter()
            .flat_map(|s| &s.connections)
            .filter_map(|c| c.smoothed_rtt.or(c.rtt))
            .collect();
        let links = Links::of(&self.statuses).seen.len();
        let value = match rtt_stats(&mut samples) {
            Some((median, min, max)) => format!(
                "median {}, min {}, max {} ({} samples: {links} links, both ends)",
                fmt_duration(median),
                fmt_duration(min),
                fmt_duration(max),
                samples.len(),
            ),
            None => "no measurement yet (the mesh ran too briefly)".into(),
        };
        self.report.push(("rtt".into(), value));
    }

    /// Prints the summary and picks the exit code.
    fn summary(&mut self, ok: bool) -> ExitCode {
        let mut rows = vec![("nodes".to_string(), self.count.to_string())];
        rows.append(&mut self.report);
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::from("summary\n");
        for (k, v) in &rows {
            let _ = writeln!(out, "  {k:<width$}  {v}");
        }
        out.push_str(if ok {
            "\ndemo finished: OK\n"
        } else {
            "\ndemo FAILED (see above)\n"
        });
        self.screen.print(&out);
        if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

/// Number of links in a full mesh of `n` nodes.
fn pairs(n: usize) -> usize {
    n * n.saturating_sub(1) / 2
}

/// The links between the nodes of a snapshot.
#[derive(Debug)]
struct Links {
    /// Unordered pairs (smaller id first) seen from at least one end.
    seen: BTreeSet<(NodeId, NodeId)>,
}

impl Links {
    fn of(statuses: &[NodeStatus]) -> Self {
        let known: BTreeSet<&NodeId> = statuses.iter().map(|s| &s.node_id).collect();
        let mut seen = BTreeSet::new();
        for s in statuses {
            for c in &s.connections {
                if known.contains(&c.node_id) && c.node_id != s.node_id {
                    let (a, b) = if s.node_id < c.node_id {
                        (&s.node_id, &c.node_id)
                    } else {
                        (&c.node_id, &s.node_id)
                    };
                    seen.insert((a.clone(), b.clone()));
                }
            }
        }
        Links { seen }
    }

    /// True when every node is connected to every other one (seen from both ends).
    fn complete(&self, statuses: &[NodeStatus]) -> bool {
        self.missing(statuses).is_empty()
    }

    /// The pairs not connected from both ends, as `i-j (short-short)`.
    fn missing(&self, statuses: &[NodeStatus]) -> Vec<String> {
        let sees = |s: &NodeStatus, id: &NodeId| s.connections.iter().any(|c| &c.node_id == id);
        let mut missing = Vec::new();
        for (i, a) in statuses.iter().enumerate() {
            for (j, b) in statuses.iter().enumerate().skip(i + 1) {
                if !sees(a, &b.node_id) || !sees(b, &a.node_id) {
                    missing.push(format!(
                        "{i}-{j} ({}-{})",
                        a.node_id.short(),
                        b.node_id.short()
                    ));
                }
            }
        }
        missing
    }
}

/// Median, min and max (sorts `samples`); `None` when empty.
fn rtt_stats(samples: &mut [Duration]) -> Option<(Duration, Duration, Duration)> {
    samples.sort_unstable();
    let (&min, &max) = (samples.first()?, samples.last()?);
    let mid = samples.len() / 2;
    let median = if samples.len() % 2 == 1 {
        samples[mid]
    } else {
        (samples[mid - 1] + samples[mid]) / 2
    };
    Some((median, min, max))
}

/// A short human form: `85µs`, `1.24ms`, `143ms`, `2.50s`.
fn fmt_duration(d: Duration) -> String {
    let us = d.as_micros();
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 10_000 {
        format!("{:.2}ms", d.as_secs_f64() * 1e3)
    } else if us < 1_000_000 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.2}s", d.as_secs_f64())
    }
}

/// The live table: a phase line, then one row per node with its peers
/// (in node order) and their RTT.
///
/// ```text
/// [  0.6s] mesh complete after 143ms; ...
///   3f2a91c0  tcp://127.0.0.1:40211  peers 4  rtt: a1b2c3d4 85µs, ...
/// ```
pub(crate) fn render(statuses: &[NodeStatus], phase: &str, elapsed: Duration) -> String {
    let mut out = format!("[{:>6.1}s] {phase}\n", elapsed.as_secs_f64());
    let order: HashMap<&NodeId, usize> = statuses
        .iter()
        .enumerate()
        .map(|(i, s)| (&s.node_id, i))
        .collect();
    let listens: Vec<String> = statuses
        .iter()
        .map(|s| {
            s.listen
                .first()
                .map_or_else(|| "-".into(), |a| a.to_string())
        })
        .collect();
    let width = listens.iter().map(String::len).max().unwrap_or(0);
    for (s, listen) in statuses.iter().zip(&listens) {
        let mut peers: Vec<_> = s.connections.iter().collect();
        peers.sort_by_key(|c| (order.get(&c.node_id).copied(), c.node_id.clone()));
        let _ = write!(out, "  {}  {listen:<width$}  ", s.node_id.short());
        if peers.is_empty() {
            out.push_str("peers 0\n");
            continue;
        }
        let _ = write!(out, "{:<8} rtt: ", format!("peers {}", peers.len()));
        for (k, c) in peers.iter().enumerate() {
            let rtt = c
                .smoothed_rtt
                .or(c.rtt)
                .map_or_else(|| "-".into(), fmt_duration);
            let sep = if k + 1 < peers.len() { ", " } else { "" };
            let _ = write!(out, "{} {rtt}{sep}", c.node_id.short());
        }
        out.push('\n');
    }
    out
}

/// Where the demo draws: redrawn in place on a terminal, printed at phase
/// changes only otherwise (CI logs, pipes).
#[derive(Debug)]
struct Screen {
    /// stdout is a terminal that understands ANSI escapes.
    tty: bool,
    /// Draw nothing at all (tests).
    quiet: bool,
    /// Lines of the live frame currently on screen (tty only).
    live_lines: usize,
}

impl Screen {
    fn detect() -> Self {
        let tty =
            std::io::stdout().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb");
        Screen {
            tty,
            quiet: false,
            live_lines: 0,
        }
    }

    /// A screen that shows nothing.
    #[cfg(test)]
    fn quiet() -> Self {
        Screen {
            tty: false,
            quiet: true,
            live_lines: 0,
        }
    }

    fn write(&mut self, text: &str) {
        if self.quiet {
            return;
        }
        // A closed pipe (e.g. `| head`) must not kill the demo mid-shutdown.
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }

    /// Prints text that stays, below the live frame (which stays too).
    fn print(&mut self, text: &str) {
        self.commit();
        self.write(text);
    }

    /// Shows a live frame. On a terminal it replaces the previous live frame;
    /// elsewhere it is printed only when it starts a new phase.
    fn draw(&mut self, frame: &str, phase_change: bool) {
        if self.tty {
            // No line wrapping while the frame is drawn: a wrapped row would
            // break the line count the next redraw relies on (rows wider than
            // the terminal are cut instead).
            let mut text = String::from("\x1b[?7l");
            if self.live_lines > 0 {
                // Up to the first line of the previous frame, then clear to the end.
                let _ = write!(text, "\x1b[{}A\r\x1b[J", self.live_lines);
            }
            text.push_str(frame);
            text.push_str("\x1b[?7h");
            self.live_lines = frame.matches('\n').count();
            self.write(&text);
        } else if phase_change {
            self.write(frame);
            self.write("\n");
        }
    }

    /// Leaves the current live frame on screen, followed by a blank line
    /// (as frames are elsewhere); the next draw goes below it.
    fn commit(&mut self) {
        if self.tty && self.live_lines > 0 {
            self.live_lines = 0;
            self.write("\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwork::ConnectionStatus;
    use meshwork::transport::Direction;

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes(vec![b; 8]).unwrap()
    }

    fn node(i: u8, peers: &[(u8, Option<u64>)]) -> NodeStatus {
        NodeStatus {
            node_id: id(i),
            network_id: NETWORK.into(),
            listen: vec![
                format!("tcp://127.0.0.1:{}", 40000 + u16::from(i))
                    .parse()
                    .unwrap(),
            ],
            metadata: Default::default(),
            uptime: Duration::from_secs(1),
            connections: peers
                .iter()
                .map(|&(p, rtt_us)| ConnectionStatus {
                    node_id: id(p),
                    addr: "tcp://127.0.0.1:50000".parse().unwrap(),
                    direction: if p < i {
                        Direction::Outbound
                    } else {
                        Direction::Inbound
                    },
                    listen_addrs: vec![],
                    metadata: Default::default(),
                    rtt: rtt_us.map(Duration::from_micros),
                    smoothed_rtt: rtt_us.map(Duration::from_micros),
                    age: Duration::from_millis(500),
                    frames_sent: 1,
                    frames_received: 1,
                })
                .collect(),
        }
    }

    #[test]
    fn render_shows_one_row_per_node_with_peers_in_node_order() {
        let statuses = [
            node(0xa1, &[(0xc3, Some(85)), (0xb2, Some(1_240))]),
            node(0xb2, &[(0xa1, None)]),
            node(0xc3, &[]),
        ];
        let text = render(
            &statuses,
            "connecting: 2 of 3 links up",
            Duration::from_millis(600),
        );
        let expected = "\
[   0.6s] connecting: 2 of 3 links up
  a1a1a1a1  tcp://127.0.0.1:40161  peers 2  rtt: b2b2b2b2 1.24ms, c3c3c3c3 85µs
  b2b2b2b2  tcp://127.0.0.1:40178  peers 1  rtt: a1a1a1a1 -
  c3c3c3c3  tcp://127.0.0.1:40195  peers 0
";
        assert_eq!(text, expected);
    }

    #[test]
    fn links_count_pairs_and_detect_the_full_mesh() {
        let partial = [
            node(1, &[(2, None)]),
            node(2, &[(1, None), (3, None)]),
            node(3, &[]),
        ];
        let links = Links::of(&partial);
        assert_eq!(links.seen.len(), 2);
        assert!(!links.complete(&partial));
        assert_eq!(
            links.missing(&partial),
            vec!["0-2 (01010101-03030303)", "1-2 (02020202-03030303)"]
        );
        let full = [
            node(1, &[(2, None), (3, None)]),
            node(2, &[(1, None), (3, None)]),
            node(3, &[(1, None), (2, None)]),
        ];
        assert!(Links::of(&full).complete(&full));
        assert_eq!(Links::of(&full).seen.len(), pairs(3));
    }

    #[test]
    fn durations_and_stats() {
        assert_eq!(fmt_duration(Duration::from_micros(85)), "85µs");
        assert_eq!(fmt_duration(Duration::from_micros(1_240)), "1.24ms");
        assert_eq!(fmt_duration(Duration::from_millis(143)), "143ms");
        assert_eq!(fmt_duration(Duration::from_millis(2_500)), "2.50s");
        let us = Duration::from_micros;
        assert_eq!(rtt_stats(&mut []), None);
        assert_eq!(
            rtt_stats(&mut [us(30), us(10), us(20)]),
            Some((us(20), us(10), us(30)))
        );
        assert_eq!(
            rtt_stats(&mut [us(40), us(10), us(20), us(30)]),
            Some((us(25), us(10), us(40)))
        );
        assert_eq!(pairs(5), 10);
        assert_eq!(pairs(1), 0);
    }

    #[tokio::test]
    async fn a_small_demo_forms_the_mesh_and_shuts_down() {
        let args = DemoArgs {
            nodes: 3,
            seconds: 0.0,
        };
        let mut demo = Demo::new(&args, Screen::quiet());
        demo.start_nodes().await.unwrap();
        demo.form_mesh().await.unwrap();
        assert!(demo.mesh_complete_after.is_some());
        assert!(demo.shut_down().await);
        let labels: Vec<_> = demo.report.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            labels,
            [
                "links formed",
                "time to full mesh",
                "encryption",
                "rtt",
                "shutdown"
            ]
        );
    }
}
