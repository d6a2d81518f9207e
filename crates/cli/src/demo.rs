//! `meshwork demo`: a small mesh in one process, shown live as it forms.
//!
//! Every node knows only node 0 (the seed) and finds the others by
//! discovery; each peer manager keeps few peers ([`PeerLimits`]), so the
//! mesh is sparse: some nodes reach others only through a third.
//!
//! Every node runs the `echo` concern of `meshwork node`. Once the mesh has
//! formed, node 0 floods a broadcast that every other node must deliver
//! exactly once, and the two nodes farthest apart exchange a routed
//! request; a request to a node id nobody has must be answered
//! unreachable. Then the replicated map: node 0 writes a key that must reach
//! every node, another node's overwrite of it must be refused (node 0 holds
//! its lease). Then services: a node serves the demo service
//! ([`demo_service`]) and the node farthest from it (node 0 if it is as
//! far from some node as any) calls it through the typed client, once for
//! an echo and once for a typed application error. Last,
//! the mesh is cut in two halves that both write, then healed: every
//! replica must end up identical.
//!
//! The demo is a sequence of steps ([`Demo::start_nodes`],
//! [`Demo::form_mesh`], [`Demo::broadcast`], [`Demo::routed_request`],
//! [`Demo::kv_write`], [`Demo::kv_refused`], [`Demo::rpc_call`],
//! [`Demo::kv_heal`], [`Demo::measure_rtt`], then always [`Demo::shut_down`] and
//! [`Demo::summary`]). Each step draws on the
//! [`Screen`] and adds lines to the summary; a layer that wants to show
//! itself off adds one step in [`run`].

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use meshwork::concerns::{Bytes, ConcernsError};
use meshwork::peers::{PeerSnapshot, PeerState, PeersConfig};
use meshwork::rpc::RpcError;
use meshwork::sync::{SyncConfig, SyncError};
use meshwork::transport::noise::NOISE_PARAMS;
use meshwork::transport::{Address, Identity, Security};
use meshwork::wire::NodeId;
use meshwork::{Node, NodeStatus};
use tokio::time::Instant;

use crate::demo_service::{self, DemoClient, DemoError, DemoService};
use crate::echo::{self, BROADCAST_TTL, Echo};
use crate::events::{EventKind, EventLog};

/// How often the live table is redrawn on a terminal.
const REFRESH: Duration = Duration::from_millis(500);
/// How often the nodes are polled while waiting for something.
const POLL: Duration = Duration::from_millis(10);
/// Heartbeat interval of the demo nodes: short, so RTTs show up quickly.
const HEARTBEAT: Duration = Duration::from_millis(250);
/// The longest the heartbeat of a quiet, healthy peer stretches to.
const HEARTBEAT_MAX: Duration = Duration::from_secs(1);
/// How often the demo nodes exchange samples of their address books.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(1);
/// The broadcast must reach every node, and the routed request be answered,
/// within this.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// The mesh must be formed within this, or the demo fails.
const MESH_TIMEOUT: Duration = Duration::from_secs(15);
/// Each node must shut down within this.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Network name of the demo nodes.
const NETWORK: &str = "meshwork-demo";
/// How often the demo nodes compare replicas with a random peer (they also
/// do at once with every new peer).
const ANTI_ENTROPY: Duration = Duration::from_millis(500);
/// The halves of the cut mesh must separate, and then have identical
/// replicas again after the heal, within this.
const HEAL_TIMEOUT: Duration = Duration::from_secs(10);
/// The key node 0 writes and another node tries to overwrite.
const KV_KEY: &str = "demo/greeting";
/// How long the halves of the cut mesh get to agree within themselves
/// before their replicas are shown.
const HALF_SETTLE: Duration = Duration::from_secs(2);
/// The key both halves of the cut mesh write.
const HEAL_KEY: &str = "demo/contested";
/// The name the farthest node serves the demo service under.
const RPC_SERVICE: &str = demo_service::DEFAULT_NAME;
/// What node 0 asks the demo service's `fail` to refuse with.
const RPC_REFUSAL: &str = "no, thank you";

/// Options of `meshwork demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Number of nodes to start, 2 to 64.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u16).range(2..=64))]
    nodes: u16,

    /// How long the mesh runs before it is shut down, in seconds (at least
    /// until it has formed).
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
        demo.broadcast().await?;
        demo.routed_request().await?;
        demo.kv_write().await?;
        demo.kv_refused().await?;
        // Before the heal, which leaves every node a neighbour of every
        // other: the provider is then more likely routed to.
        demo.rpc_call().await?;
        demo.kv_heal().await?;
        demo.measure_rtt().await;
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
    /// How many peers each node keeps.
    limits: PeerLimits,
    /// When the demo started; every time shown is relative to this.
    t0: Instant,
    /// When the mesh is shut down.
    deadline: Instant,
    /// The nodes started so far, in order.
    nodes: Vec<Node>,
    /// What reached each node (its echo concern's log), in node order.
    logs: Vec<Arc<EventLog>>,
    /// The message node 0 broadcast, once it has.
    broadcast: Option<String>,
    /// The last snapshot of every node (taken by [`Demo::refresh`]).
    statuses: Vec<NodeStatus>,
    /// When the mesh formed (relative to `t0`).
    mesh_formed_after: Option<Duration>,
    /// Lines of the summary, added by the steps: (label, value).
    report: Vec<(String, String)>,
    screen: Screen,
}

impl Demo {
    fn new(args: &DemoArgs, screen: Screen) -> Self {
        let t0 = Instant::now();
        let count = usize::from(args.nodes);
        let limits = PeerLimits::for_nodes(count);
        Demo {
            count,
            limits,
            t0,
            deadline: t0 + Duration::from_secs_f64(args.seconds),
            nodes: Vec::new(),
            logs: Vec::new(),
            broadcast: None,
            statuses: Vec::new(),
            mesh_formed_after: None,
            report: Vec::new(),
            screen,
        }
    }

    fn intro(&mut self) {
        self.screen.print(&format!(
            "meshwork demo: {} nodes on TCP loopback, network {NETWORK:?}, heartbeat every {} ms\n\
             node 0 is the seed: the others know only node 0 and find each other by discovery;\n\
             each node keeps {} to {} peers; nodes that are not neighbours talk through routes\n\
             every link is encrypted and authenticated ({NOISE_PARAMS}); \
             a node id is the node's X25519 public key\n\
             every node holds a replica of one key-value map; a write leases its key to the writer\n\
             a node serves a typed service, which the node farthest from it calls\n\
             broadcasts are signed by their sender; routed messages are sealed for their target\n\
             tables: \"peers\" counts connected peers, \"known\" nodes heard of but not connected, \
             \"route\" nodes reached through others\n\n",
            self.count,
            HEARTBEAT.as_millis(),
            self.limits.min,
            self.limits.max,
        ));
    }

    /// Takes a fresh snapshot of every node.
    fn refresh(&mut self) {
        self.statuses = self.nodes.iter().map(Node::status).collect();
    }

    fn frame(&self, phase: &str) -> String {
        render(&self.statuses, phase, self.t0.elapsed())
    }

    /// The peer manager settings of the demo nodes: their [`PeerLimits`],
    /// and quick heartbeats and discovery, so the table fills in within a
    /// second or two.
    fn peer_settings(&self, config: PeersConfig) -> PeersConfig {
        let config = config
            .with_min_peers(self.limits.min)
            .with_max_peers(self.limits.max);
        let config = match self.limits.outbound_reserved {
            Some(n) => config.with_outbound_reserved(n),
            None => config,
        };
        config
            .with_heartbeat(HEARTBEAT, 10 * HEARTBEAT_MAX, 20 * HEARTBEAT_MAX)
            .with_heartbeat_slow_down(HEARTBEAT, HEARTBEAT_MAX)
            .with_discovery(DISCOVERY_INTERVAL, crate::node::DISCOVERY_SAMPLE)
    }

    /// Step: start the nodes; every node after the first seeds node 0.
    async fn start_nodes(&mut self) -> anyhow::Result<()> {
        let mut seed: Option<Address> = None;
        for i in 0..self.count {
            let log = Arc::new(EventLog::new());
            let mut builder = Node::builder(NETWORK)
                .concern(Echo::new(log.clone()))
                .sync_config(SyncConfig::default().with_anti_entropy_interval(ANTI_ENTROPY))
                .listen("tcp://127.0.0.1:0".parse()?)
                .metadata("demo-index", i.to_string())
                .peers(|c| self.peer_settings(c));
            if let Some(addr) = &seed {
                builder = builder.seed(addr.clone());
            }
            let node = builder
                .start()
                .await
                .with_context(|| format!("starting node {i}"))?;
            if seed.is_none() {
                let addr = node.listen_addrs().into_iter().next();
                seed = Some(addr.context("the seed node has no listen address")?);
            }
            self.nodes.push(node);
            self.logs.push(log);
        }
        Ok(())
    }

    /// Step: wait until every node has at least `limits.min` peers and the
    /// graph of links is connected.
    async fn form_mesh(&mut self) -> anyhow::Result<()> {
        let min = self.limits.min;
        let mut next_draw = Instant::now();
        let mut first = true;
        loop {
            self.refresh();
            let mesh = Mesh::of(&self.statuses);
            if mesh.formed(min) {
                let took = self.t0.elapsed();
                let (lo, hi) = mesh.degree_range();
                let peers = if lo == hi {
                    count(lo, "peer")
                } else {
                    format!("{lo} to {hi} peers")
                };
                let links = count(mesh.links.len(), "link");
                self.screen.print(&format!(
                    "mesh formed after {}: {links}, every node has {peers}\n",
                    fmt_duration(took)
                ));
                self.report.push((
                    "peers".into(),
                    format!(
                        "{links} when formed; every node has {peers} (min {min}); graph connected"
                    ),
                ));
                self.report
                    .push(("time to form".into(), fmt_duration(took)));
                self.mesh_formed_after = Some(took);
                self.record_security()?;
                return Ok(());
            }
            if self.t0.elapsed() >= MESH_TIMEOUT {
                let phase = format!(
                    "mesh NOT formed after {}: {}",
                    fmt_duration(MESH_TIMEOUT),
                    mesh.progress(min)
                );
                self.screen.draw(&self.frame(&phase), true);
                self.report
                    .push(("peers".into(), mesh.shortfall(&self.statuses, min)));
                bail!(
                    "the mesh did not form within {}",
                    fmt_duration(MESH_TIMEOUT)
                );
            }
            if Instant::now() >= next_draw {
                let phase = format!("forming: {}", mesh.progress(min));
                self.screen.draw(&self.frame(&phase), first);
                first = false;
                next_draw += REFRESH;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Demo {
    /// How often each node has delivered the broadcast `message`.
    fn deliveries(&self, message: &str) -> Vec<usize> {
        self.logs
            .iter()
            .map(|log| log.count(EventKind::Broadcast, message))
            .collect()
    }

    /// Step: node 0 floods a message; every other node must deliver it
    /// (exactly once: checked again at shutdown, see [`Demo::check_broadcast`]).
    async fn broadcast(&mut self) -> anyhow::Result<()> {
        let others = self.count - 1;
        let message = format!("hello from #0 ({})", self.nodes[0].node_id().short());
        let started = Instant::now();
        echo::broadcast(&self.nodes[0], message.as_bytes())
            .await
            .context("broadcast from node 0")?;
        self.broadcast = Some(message.clone());
        loop {
            let reached = self.deliveries(&message)[1..]
                .iter()
                .filter(|&&n| n > 0)
                .count();
            let took = started.elapsed();
            if reached == others || took >= MESSAGE_TIMEOUT {
                let line = broadcast_line(reached, others, took);
                self.screen.print(&format!("broadcast: {line}\n"));
                self.report.push(("broadcast".into(), line));
                if reached < others {
                    bail!(
                        "the broadcast reached {reached} of {others} nodes within {}",
                        fmt_duration(MESSAGE_TIMEOUT)
                    );
                }
                return Ok(());
            }
            // Polled finely: the time shown is when the last node had it.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Step: the two nodes farthest apart in the mesh (not neighbours, if
    /// any two are not) exchange a routed request through their echo concerns.
    async fn routed_request(&mut self) -> anyhow::Result<()> {
        self.refresh();
        let Some((a, b, distance)) = Mesh::of(&self.statuses).farthest_pair() else {
            return Ok(());
        };
        let target = self.nodes[b].node_id().clone();
        let message = format!("ping from #{a}");
        let started = Instant::now();
        let what = || format!("routed request from node {a} to node {b}");
        let reply = self
            .echo_request(a, &target, message.as_bytes(), &what())
            .await?
            .with_context(what)?;
        let took = started.elapsed();
        if reply != message.as_bytes() {
            bail!("node {b} answered {reply:?} to {message:?}");
        }
        let received = self.logs[b].count(EventKind::Request, &message);
        if received != 1 {
            bail!("node {b} recorded the request {received} times");
        }
        let index: HashMap<&NodeId, usize> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.node_id(), i))
            .collect();
        let route = self.nodes[a]
            .concerns()
            .routes()
            .into_iter()
            .find(|r| r.target == target)
            .map(|r| (index.get(&r.next_hop).copied(), r.hops));
        let line = route_line(a, b, distance, route, took);
        self.screen.print(&format!("routed request: {line}\n\n"));
        self.report.push(("routed request".into(), line));

        // And to a node nobody has: the route search ends once every node
        // has answered "not through me", not after its timeout.
        let nobody = Identity::generate().node_id().clone();
        let started = Instant::now();
        let what = format!("request from node {a} to a node nobody has");
        match self.echo_request(a, &nobody, b"anyone?", &what).await? {
            Err(ConcernsError::Unreachable(_)) => {}
            other => bail!("{what} gave {other:?}, not unreachable"),
        }
        let line = unreachable_line(a, started.elapsed());
        self.screen.print(&format!("unreachable: {line}\n\n"));
        self.report.push(("unreachable".into(), line));
        Ok(())
    }

    /// Node `a`'s echo request to `target`, in a task with a deadline of
    /// our own: a library call that never returns must not hang the demo.
    /// `what` names it in errors.
    async fn echo_request(
        &self,
        a: usize,
        target: &NodeId,
        message: &[u8],
        what: &str,
    ) -> anyhow::Result<Result<Bytes, ConcernsError>> {
        let request = tokio::spawn({
            let (node, target, message) = (self.nodes[a].clone(), target.clone(), message.to_vec());
            async move { echo::request(&node, &target, &message, MESSAGE_TIMEOUT).await }
        });
        let Ok(joined) =
            tokio::time::timeout(MESSAGE_TIMEOUT + Duration::from_secs(1), request).await
        else {
            bail!("{what} did not return");
        };
        joined.with_context(|| what.to_owned())
    }

    /// Step: node 0 writes [`KV_KEY`]; every node must hold the value
    /// within [`MESSAGE_TIMEOUT`]. Shows when the last one had it.
    async fn kv_write(&mut self) -> anyhow::Result<()> {
        let value = format!("hello from #0 ({})", self.nodes[0].node_id().short());
        let started = Instant::now();
        let version = self.nodes[0]
            .sync()
            .set(KV_KEY, value.clone())
            .await
            .context("node 0 writing a key")?;
        let mut arrived: Vec<Option<Duration>> = vec![None; self.count];
        loop {
            let took = started.elapsed();
            for (i, node) in self.nodes.iter().enumerate() {
                if arrived[i].is_none() && node.sync().get_str(KV_KEY).as_deref() == Some(&value) {
                    arrived[i] = Some(took);
                }
            }
            let held = arrived.iter().filter(|a| a.is_some()).count();
            if held == self.count || took >= MESSAGE_TIMEOUT {
                let last = arrived.iter().flatten().max().copied().unwrap_or_default();
                let line = kv_write_line(held, self.count, last);
                self.screen.print(&format!("kv write: {line}\n"));
                self.report.push(("kv write".into(), line));
                if held < self.count {
                    let missing: Vec<String> = (0..self.count)
                        .filter(|&i| arrived[i].is_none())
                        .map(|i| format!("#{i}"))
                        .collect();
                    bail!(
                        "{KV_KEY:?} (version {}) had not reached {} within {}",
                        version.as_u64(),
                        missing.join(", "),
                        fmt_duration(MESSAGE_TIMEOUT)
                    );
                }
                return Ok(());
            }
            // Polled finely: the time shown is when the last node had it.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Step: the last node tries to overwrite [`KV_KEY`], which node 0
    /// holds the lease on: it must be refused, naming node 0.
    async fn kv_refused(&mut self) -> anyhow::Result<()> {
        let i = self.count - 1;
        let owner = self.nodes[0].node_id().clone();
        let refused = self.nodes[i].sync().set(KV_KEY, "mine now").await;
        let line = match refused {
            Err(SyncError::LeaseHeld {
                owner: holder,
                until_ms,
                ..
            }) if holder == owner => {
                let left = Duration::from_millis(until_ms.saturating_sub(unix_ms()));
                format!(
                    "#{i}'s overwrite of {KV_KEY:?} refused: leased to #0 ({}) for another {}",
                    owner.short(),
                    fmt_minutes(left)
                )
            }
            Err(SyncError::LeaseHeld { owner: holder, .. }) => bail!(
                "#{i}'s overwrite was refused naming {} as the owner, not #0 ({})",
                holder.short(),
                owner.short()
            ),
            Err(e) => {
                bail!("#{i}'s overwrite of {KV_KEY:?} failed with {e} instead of a lease refusal")
            }
            Ok(_) => bail!("#{i} overwrote {KV_KEY:?}, whose lease #0 holds"),
        };
        let value = self.nodes[0].sync().get_str(KV_KEY);
        if value
            .as_deref()
            .is_none_or(|v| !v.starts_with("hello from #0"))
        {
            bail!("after the refused overwrite node 0 holds {value:?}");
        }
        self.screen.print(&format!("lease: {line}\n"));
        self.report.push(("lease".into(), line));
        Ok(())
    }

    /// Step: cut the mesh in two halves (each node blocks the other half),
    /// write [`HEAL_KEY`] on both sides (and one key each), heal, and wait
    /// until every replica is identical: one value and one owner for the
    /// contested key, and the losing writer told it lost the lease.
    async fn kv_heal(&mut self) -> anyhow::Result<()> {
        let half = self.count / 2;
        let (left, right): (Vec<usize>, Vec<usize>) = (0..self.count).partition(|&i| i < half);
        let (a, b) = (left[0], right[0]);
        let ids: Vec<NodeId> = self.nodes.iter().map(|n| n.node_id().clone()).collect();
        self.set_blocks(&left, &right, true);
        let result = self.split_and_write(&left, &right).await;
        let healed_at = Instant::now();
        self.set_blocks(&left, &right, false);
        let (split, lost_before) = result?;

        // Heal: every replica the same.
        let took = loop {
            let digests: BTreeSet<u64> = self.nodes.iter().map(|n| n.sync().digest()).collect();
            if digests.len() == 1 {
                break healed_at.elapsed();
            }
            if healed_at.elapsed() >= HEAL_TIMEOUT {
                bail!(
                    "replicas still differ {} after the heal: digests {}",
                    fmt_duration(HEAL_TIMEOUT),
                    digest_groups(&self.digests())
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        // One value and one owner for the contested key, on every node.
        let entries: Vec<_> = self
            .nodes
            .iter()
            .map(|n| n.sync().entry(HEAL_KEY))
            .collect();
        let Some(Some(winner)) = entries.first().cloned() else {
            bail!("node 0 lost {HEAL_KEY:?} in the heal");
        };
        for (i, e) in entries.iter().enumerate() {
            if e.as_ref() != Some(&winner) {
                bail!("after the heal #{i} holds {e:?} for {HEAL_KEY:?}, node 0 {winner:?}");
            }
        }
        let (won, lost) = if winner.writer == ids[a] {
            (a, b)
        } else if winner.writer == ids[b] {
            (b, a)
        } else {
            bail!(
                "{HEAL_KEY:?} ended up written by {}, which never wrote it",
                winner.writer.short()
            );
        };
        if winner.value != format!("from #{won}").as_bytes() {
            bail!("{HEAL_KEY:?} is #{won}'s but holds {:?}", winner.value);
        }
        if winner.lease.as_ref().is_none_or(|l| l.owner != ids[won]) {
            bail!(
                "{HEAL_KEY:?} is #{won}'s but its lease is {:?}",
                winner.lease
            );
        }
        for (i, key) in [(a, "demo/left"), (b, "demo/right")] {
            if let Some(j) = (0..self.count).find(|&j| self.nodes[j].sync().get(key).is_none()) {
                bail!("after the heal #{j} lacks {key:?}, written by #{i}");
            }
        }
        let lease_lost = self.nodes[lost].sync().stats().lease_lost;
        if lease_lost <= lost_before[lost] {
            bail!("#{lost} lost {HEAL_KEY:?} to #{won} but was not told it lost the lease");
        }
        let healed = format!(
            "healed: all {} replicas identical {} after the unblock; {HEAL_KEY:?} is #{won}'s on \
             every node (the earlier claim by clock stamp), #{lost} told it lost the lease",
            self.count,
            fmt_duration(took)
        );
        self.screen
            .print(&format!("heal: {split}\n      {healed}\n\n"));
        let line = format!("{split}; {healed}");
        self.report.push(("heal".into(), line));
        Ok(())
    }

    /// Step: of the two nodes farthest apart (node 0 and the node farthest
    /// from it when node 0 is one of them), the second serves the demo
    /// service as [`RPC_SERVICE`]; once the first's registry lists it, the
    /// first calls it through the typed client: `echo` must come back
    /// (shown with how the caller reaches the provider and how long it
    /// took), and `fail` must give the caller the typed [`DemoError`].
    async fn rpc_call(&mut self) -> anyhow::Result<()> {
        self.refresh();
        let mesh = Mesh::of(&self.statuses);
        let Some((c, p, hops)) = mesh.farthest_pair().map(|(a, b, d)| {
            // Prefer node 0 as the caller when it is as far from some node.
            match mesh.farthest_from(0) {
                Some((far, hops)) if hops == d => (0, far, hops),
                _ => (a, b, d),
            }
        }) else {
            bail!("no two connected nodes to call between");
        };
        let provider = self.nodes[p].node_id().clone();
        self.nodes[p]
            .rpc()
            .serve(RPC_SERVICE, DemoService::server(provider.to_string()))
            .await
            .with_context(|| format!("node {p} serving {RPC_SERVICE:?}"))?;
        // The caller learns of it through the registry, a key of the map.
        let started = Instant::now();
        let listed = loop {
            let providers = self.nodes[c].rpc().providers(RPC_SERVICE);
            if let Some(found) = providers.into_iter().find(|x| x.node_id == provider) {
                break found;
            }
            if started.elapsed() >= MESSAGE_TIMEOUT {
                bail!(
                    "node {c} did not list node {p} as serving {RPC_SERVICE:?} within {}",
                    fmt_duration(MESSAGE_TIMEOUT)
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let listed_after = started.elapsed();

        let client = self.nodes[c]
            .rpc()
            .client::<DemoClient>(RPC_SERVICE)
            .with_deadline(MESSAGE_TIMEOUT);
        // A deadline of our own too: a library call that never returns
        // must not hang the demo.
        let guard = MESSAGE_TIMEOUT + Duration::from_secs(1);
        let text = format!("hello #{p}, from #{c}");
        let started = Instant::now();
        let Ok(echoed) = tokio::time::timeout(guard, client.echo(text.clone())).await else {
            bail!("node {c}'s call of echo on node {p} did not return");
        };
        let took = started.elapsed();
        let echoed = echoed.with_context(|| format!("node {c} calling echo on node {p}"))?;
        if echoed != text {
            bail!("node {p}'s echo answered {echoed:?} to {text:?}");
        }
        let Ok(refused) = tokio::time::timeout(guard, client.fail(RPC_REFUSAL.into())).await else {
            bail!("node {c}'s call of fail on node {p} did not return");
        };
        let expected = DemoError::Refused {
            message: RPC_REFUSAL.into(),
        };
        let error = match refused {
            Err(RpcError::Application(e)) if e == expected => e,
            other => bail!(
                "node {c}'s call of fail({RPC_REFUSAL:?}) on node {p} gave {other:?}, expected \
                 the typed application error {expected:?}"
            ),
        };
        let served = self.nodes[p].rpc().served();
        let counted = served
            .iter()
            .find(|s| s.name == RPC_SERVICE)
            .map(|s| (s.calls, s.errors));
        if counted != Some((2, 1)) {
            bail!(
                "node {p} counts {counted:?} calls and errors of {RPC_SERVICE:?}, expected 2 and 1"
            );
        }
        let line = rpc_line(
            (c, p),
            hops,
            listed.reach,
            listed_after,
            (&text, took),
            &error,
        );
        self.screen.print(&format!("rpc: {line}\n\n"));
        self.report.push(("rpc".into(), line));
        Ok(())
    }

    /// Blocks (or unblocks) every node of `left` on every node of `right`
    /// and back.
    fn set_blocks(&self, left: &[usize], right: &[usize], block: bool) {
        for (from, to) in [(left, right), (right, left)] {
            for &i in from {
                for &j in to {
                    let peers = self.nodes[i].peers();
                    let id = self.nodes[j].node_id();
                    if block {
                        peers.block(id);
                    } else {
                        peers.unblock(id);
                    }
                }
            }
        }
    }

    /// The part of [`Demo::kv_heal`] while the halves are cut: waits until no
    /// link crosses, then the first node of each half writes [`HEAL_KEY`]
    /// and a key of its own. Both writes must be accepted (neither side can
    /// see the other's lease). Returns a line on the split, and every node's
    /// `lease_lost` count before the heal.
    async fn split_and_write(
        &mut self,
        left: &[usize],
        right: &[usize],
    ) -> anyhow::Result<(String, Vec<u64>)> {
        let started = Instant::now();
        let separated = loop {
            self.refresh();
            let crossing = Mesh::of(&self.statuses)
                .links
                .iter()
                .any(|&(i, j)| left.contains(&i) != left.contains(&j));
            let connections = self.statuses.iter().enumerate().any(|(i, s)| {
                let other = if left.contains(&i) { right } else { left };
                s.connections
                    .iter()
                    .any(|c| other.iter().any(|&j| &c.node_id == self.nodes[j].node_id()))
            });
            if !crossing && !connections {
                break started.elapsed();
            }
            if started.elapsed() >= HEAL_TIMEOUT {
                bail!(
                    "halves still linked {} after blocking each other",
                    fmt_duration(HEAL_TIMEOUT)
                );
            }
            tokio::time::sleep(POLL).await;
        };
        let (a, b) = (left[0], right[0]);
        for (i, own) in [(a, "demo/left"), (b, "demo/right")] {
            let sync = self.nodes[i].sync();
            let value = format!("from #{i}");
            match sync.set(HEAL_KEY, value.clone()).await {
                Ok(_) => {}
                Err(e) => bail!("#{i} could not write {HEAL_KEY:?} while cut off: {e}"),
            }
            sync.set(own, value)
                .await
                .with_context(|| format!("#{i} writing {own:?}"))?;
        }
        // Give each half a moment to agree within itself (a node cut off
        // from all its peers redials within its half), for the display.
        let settle = Instant::now();
        let mut digests = self.digests();
        while settle.elapsed() < HALF_SETTLE
            && [left, right]
                .iter()
                .any(|half| half.iter().any(|&i| digests[i] != digests[half[0]]))
        {
            tokio::time::sleep(POLL).await;
            digests = self.digests();
        }
        if digests[a] == digests[b] {
            bail!(
                "#{a} and #{b} wrote different values while cut off, yet hold identical replicas"
            );
        }
        let lost_before = self
            .nodes
            .iter()
            .map(|n| n.sync().stats().lease_lost)
            .collect();
        let half = |nodes: &[usize]| {
            let names: Vec<String> = nodes.iter().map(|i| format!("#{i}")).collect();
            names.join(" ")
        };
        let split = format!(
            "cut into {} | {} (no link across after {}); #{a} and #{b} both wrote \
             {HEAL_KEY:?}, both accepted: replicas {}",
            half(left),
            half(right),
            fmt_duration(separated),
            digest_groups(&digests)
        );
        Ok((split, lost_before))
    }

    /// Every node's replica digest, in node order.
    fn digests(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.sync().digest()).collect()
    }

    /// At the end: every node but node 0 delivered the broadcast exactly
    /// once (node 0, its sender, never). Adds the flood's copy counts to the
    /// summary; returns the problems.
    fn check_broadcast(&mut self) -> Vec<String> {
        let Some(message) = &self.broadcast else {
            return Vec::new();
        };
        let mut problems = Vec::new();
        for (i, n) in self.deliveries(message).into_iter().enumerate() {
            let expected = usize::from(i > 0);
            if n != expected {
                problems.push(format!(
                    "node {i} delivered the broadcast {n} times (expected {expected})"
                ));
            }
        }
        let (mut relayed, mut duplicates) = (0, 0);
        for node in &self.nodes {
            for (concern, counter, value) in node.concerns().builtin_stats() {
                match (concern, counter) {
                    ("flood", "relayed") => relayed += value,
                    ("flood", "duplicates") => duplicates += value,
                    _ => {}
                }
            }
        }
        if let Some((_, line)) = self.report.iter_mut().find(|(k, _)| k == "broadcast") {
            if problems.is_empty() {
                line.push_str(", each exactly once");
            }
            let copies = if relayed == 1 { "copy" } else { "copies" };
            let _ = write!(
                line,
                "; {relayed} {copies} relayed, {duplicates} dropped as already seen"
            );
        }
        problems
    }

    /// Step: keep the mesh running until the deadline, showing the RTTs.
    async fn measure_rtt(&mut self) {
        let formed = self.mesh_formed_after.unwrap_or_default();
        // Leave time for a couple of pings even when --seconds is tiny.
        let deadline = self.deadline.max(Instant::now() + 2 * HEARTBEAT);
        let mut first = true;
        loop {
            self.refresh();
            let left = deadline.saturating_duration_since(Instant::now());
            let phase = format!(
                "mesh formed after {}; measuring RTT, shutting down in {:.1}s",
                fmt_duration(formed),
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

    /// Shuts every node down, newest first (so the seed goes last), and
    /// checks that none is left with a connection.
    /// Returns true when everything went cleanly.
    async fn shut_down(&mut self) -> bool {
        let n = self.nodes.len();
        if n == 0 {
            return true;
        }
        self.refresh();
        self.record_rtt();
        let mut problems = self.check_broadcast();
        let phase = format!("shutting down {n} nodes, newest first");
        self.screen.draw(&self.frame(&phase), true);
        self.screen.commit();

        let started = Instant::now();
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
            .flat_map(|s| &s.peers)
            .filter(|p| p.state.is_linked())
            .filter_map(|p| p.smoothed_rtt.or(p.rtt))
            .collect();
        let links = Mesh::of(&self.statuses).links.len();
        let value = match rtt_stats(&mut samples) {
            Some((median, min, max)) => format!(
                "median {}, min {}, max {} ({}: {}, both ends)",
                fmt_duration(median),
                fmt_duration(min),
                fmt_duration(max),
                count(samples.len(), "sample"),
                count(links, "link"),
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

/// How many peers each demo node keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PeerLimits {
    /// A node dials while it has fewer (or every other node, if fewer).
    min: usize,
    /// A node never holds more.
    max: usize,
    /// Outbound slots a node fills even above `min` (`None`: the library's
    /// default, 2).
    outbound_reserved: Option<usize>,
}

impl PeerLimits {
    /// Up to 5 nodes: 2 to 4 peers and no reserved outbound slots, so a
    /// node dials only while it has fewer than 2 and the mesh stays sparse
    /// (some pairs are not neighbours). Any mesh of up to 5 nodes in which
    /// every node has 2 peers is connected: a part on its own would need 3
    /// nodes, the rest only 2. (With a maximum of 3, four nodes can fill up
    /// among themselves and lock the fifth out.)
    ///
    /// Larger meshes keep 3 to 8 peers with the default reserved outbound
    /// slots: with only 2 each, 6 or more nodes can settle in separate
    /// parts that never join.
    fn for_nodes(n: usize) -> Self {
        let others = n.saturating_sub(1);
        if n <= 5 {
            PeerLimits {
                min: 2.min(others),
                max: 4,
                outbound_reserved: Some(0),
            }
        } else {
            PeerLimits {
                min: 3,
                max: 8,
                outbound_reserved: None,
            }
        }
    }
}

/// The mesh the demo nodes form, as seen in a snapshot.
#[derive(Debug)]
struct Mesh {
    /// Linked pairs of node indexes (smaller first), seen from both ends.
    links: BTreeSet<(usize, usize)>,
    /// Each node's live peers among the demo nodes, as its own pool sees them.
    degree: Vec<usize>,
}

impl Mesh {
    fn of(statuses: &[NodeStatus]) -> Self {
        let index: HashMap<&NodeId, usize> = statuses
            .iter()
            .enumerate()
            .map(|(i, s)| (&s.node_id, i))
            .collect();
        let linked: Vec<BTreeSet<usize>> = statuses
            .iter()
            .map(|s| {
                s.peers
                    .iter()
                    .filter(|p| p.state.is_linked())
                    .filter_map(|p| index.get(&p.node_id).copied())
                    .collect()
            })
            .collect();
        let mut links = BTreeSet::new();
        for (i, peers) in linked.iter().enumerate() {
            for &j in peers.iter().filter(|&&j| j > i) {
                if linked[j].contains(&i) {
                    links.insert((i, j));
                }
            }
        }
        Mesh {
            links,
            degree: linked.iter().map(BTreeSet::len).collect(),
        }
    }

    /// The nodes with fewer than `min` peers.
    fn short_of(&self, min: usize) -> Vec<usize> {
        (0..self.degree.len())
            .filter(|&i| self.degree[i] < min)
            .collect()
    }

    /// The number of connected parts of the graph of links.
    fn parts(&self) -> usize {
        let n = self.degree.len();
        // Union-find over the node indexes.
        let mut parent: Vec<usize> = (0..n).collect();
        fn root(parent: &mut [usize], mut i: usize) -> usize {
            while parent[i] != i {
                parent[i] = parent[parent[i]];
                i = parent[i];
            }
            i
        }
        let mut parts = n;
        for &(a, b) in &self.links {
            let (ra, rb) = (root(&mut parent, a), root(&mut parent, b));
            if ra != rb {
                parent[ra] = rb;
                parts -= 1;
            }
        }
        parts
    }

    /// True when every node has `min` peers and every node can reach every
    /// other one.
    fn formed(&self, min: usize) -> bool {
        self.short_of(min).is_empty() && self.parts() <= 1
    }

    /// The hops from node `a` to every node by the links (`usize::MAX` for
    /// nodes it cannot reach).
    fn hops_from(&self, a: usize) -> Vec<usize> {
        let n = self.degree.len();
        let mut adjacent = vec![Vec::new(); n];
        for &(x, y) in &self.links {
            adjacent[x].push(y);
            adjacent[y].push(x);
        }
        // Breadth-first from `a`.
        let mut hops = vec![usize::MAX; n];
        if a >= n {
            return hops;
        }
        hops[a] = 0;
        let mut queue = VecDeque::from([a]);
        while let Some(i) = queue.pop_front() {
            for &j in &adjacent[i] {
                if hops[j] == usize::MAX {
                    hops[j] = hops[i] + 1;
                    queue.push_back(j);
                }
            }
        }
        hops
    }

    /// The two nodes farthest apart (fewest hops between them, by the
    /// links), the first such pair in node order: `(a, b, hops)` with
    /// `a < b`. `None` without two connected nodes.
    fn farthest_pair(&self) -> Option<(usize, usize, usize)> {
        let mut best: Option<(usize, usize, usize)> = None;
        for a in 0..self.degree.len() {
            for (b, &d) in self.hops_from(a).iter().enumerate().skip(a + 1) {
                if d != usize::MAX && best.is_none_or(|(_, _, most)| d > most) {
                    best = Some((a, b, d));
                }
            }
        }
        best
    }

    /// The node farthest from node `a` that it can reach (the last one on
    /// a tie), and its hops. `None` if `a` reaches no other node.
    fn farthest_from(&self, a: usize) -> Option<(usize, usize)> {
        self.hops_from(a)
            .into_iter()
            .enumerate()
            .filter(|&(b, d)| b != a && d != usize::MAX)
            .max_by_key(|&(b, d)| (d, b))
    }

    /// The smallest and largest number of peers of a node.
    fn degree_range(&self) -> (usize, usize) {
        let lo = self.degree.iter().copied().min().unwrap_or(0);
        let hi = self.degree.iter().copied().max().unwrap_or(0);
        (lo, hi)
    }

    /// One line on how far the mesh is.
    fn progress(&self, min: usize) -> String {
        let n = self.degree.len();
        let ready = n - self.short_of(min).len();
        let parts = match self.parts() {
            1 => "graph connected".to_string(),
            k => format!("graph in {k} parts"),
        };
        format!(
            "{ready} of {n} nodes have {min}+ peers, {} links, {parts}",
            self.links.len()
        )
    }

    /// What is missing, for the summary: the nodes short of peers
    /// (`i (short): k of min`) and the number of parts.
    fn shortfall(&self, statuses: &[NodeStatus], min: usize) -> String {
        let short: Vec<String> = self
            .short_of(min)
            .into_iter()
            .map(|i| {
                let id = statuses
                    .get(i)
                    .map_or_else(String::new, |s| s.node_id.short());
                format!("{i} ({id}): {} of {min}", self.degree[i])
            })
            .collect();
        let mut out = format!(
            "{} links; graph in {} part(s)",
            self.links.len(),
            self.parts()
        );
        if !short.is_empty() {
            let _ = write!(out, "; short of peers: {}", short.join(", "));
        }
        out
    }
}

/// `1 link`, `2 links`.
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// The broadcast's line: `4 of 4 other nodes delivered it within 3.10ms`.
fn broadcast_line(reached: usize, others: usize, took: Duration) -> String {
    format!(
        "#0 flooded a message (TTL {BROADCAST_TTL}); {reached} of {others} other nodes delivered it within {}",
        fmt_duration(took)
    )
}

/// The routed request's line. `route` is the sender's route to the target
/// after the request, if any: (index of the next hop, hops).
fn route_line(
    a: usize,
    b: usize,
    distance: usize,
    route: Option<(Option<usize>, u32)>,
    took: Duration,
) -> String {
    let pair = if distance > 1 {
        format!("#{a} -> #{b}, not neighbours ({distance} hops apart)")
    } else {
        format!("#{a} -> #{b}, neighbours (every node is a neighbour of every other)")
    };
    let way = match route {
        Some((next, hops)) => {
            let next = next.map_or_else(|| "?".to_string(), |i| format!("#{i}"));
            format!("route via {next}, {}", count(hops as usize, "hop"))
        }
        None => "sent directly".to_string(),
    };
    format!("{pair}: echoed in {}, {way}", fmt_duration(took))
}

/// The line of the request to a node nobody has, answered unreachable
/// after `took`.
fn unreachable_line(a: usize, took: Duration) -> String {
    format!(
        "#{a} -> a node id nobody has: unreachable in {}, once every node answered \
         \"not through me\" and #{a}'s neighbours had stayed the same for 1s (the route \
         search timeout is 3s)",
        fmt_duration(took)
    )
}

/// The rpc step's line: who serves, how the caller reaches it, what the
/// two calls gave.
fn rpc_line(
    (caller, provider): (usize, usize),
    hops: usize,
    reach: &str,
    listed: Duration,
    (text, took): (&str, Duration),
    error: &DemoError,
) -> String {
    format!(
        "#{provider} serves {RPC_SERVICE:?} ({} from #{caller}, {reach}; in #{caller}'s \
         registry after {}); #{caller}'s typed call echo({text:?}) came back in {}; \
         fail({RPC_REFUSAL:?}) gave #{caller} the typed error DemoError::{error:?}",
        count(hops, "hop"),
        fmt_duration(listed),
        fmt_duration(took)
    )
}

/// The kv write's line: `#0 wrote "demo/greeting"; 5 of 5 nodes held it within 2.31ms`.
fn kv_write_line(held: usize, nodes: usize, took: Duration) -> String {
    format!(
        "#0 wrote {KV_KEY:?}; {held} of {nodes} nodes held it within {}",
        fmt_duration(took)
    )
}

/// Nodes grouped by digest: `#0 #1 3f2a91c0, #2 #3 #4 9c1d0e2b` (the
/// first 8 hex digits of each digest).
fn digest_groups(digests: &[u64]) -> String {
    let mut groups: Vec<(u64, Vec<usize>)> = Vec::new();
    for (i, &d) in digests.iter().enumerate() {
        match groups.iter_mut().find(|(g, _)| *g == d) {
            Some((_, nodes)) => nodes.push(i),
            None => groups.push((d, vec![i])),
        }
    }
    let parts: Vec<String> = groups
        .iter()
        .map(|(d, nodes)| {
            let names: Vec<String> = nodes.iter().map(|i| format!("#{i}")).collect();
            format!("{} {:08x}", names.join(" "), d >> 32)
        })
        .collect();
    parts.join(", ")
}

/// A long duration: `59m59s`, `2h01m`, or as [`fmt_duration`] under a minute.
fn fmt_minutes(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 3600 {
        format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
    } else if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        fmt_duration(d)
    }
}

/// Now, in ms since the Unix epoch (lease expiries are given so).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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

/// The live table: a phase line, then per node its live peers and its
/// peers in other states but `known` (counted on the node's line, with its
/// routes to non-neighbours), in node order, each with its state, RTT and
/// score.
///
/// ```text
/// [   0.6s] forming: 4 of 5 nodes have 3+ peers, ...
///   #0 3f2a91c0  tcp://127.0.0.1:40211  peers 3, 1 known, 1 route
///        #1 a1b2c3d4  connected       85µs  score 0.97
///        #4 77e0f1a2  connecting
/// ```
pub(crate) fn render(statuses: &[NodeStatus], phase: &str, elapsed: Duration) -> String {
    let mut out = format!("[{:>6.1}s] {phase}\n", elapsed.as_secs_f64());
    let order: HashMap<&NodeId, usize> = statuses
        .iter()
        .enumerate()
        .map(|(i, s)| (&s.node_id, i))
        .collect();
    let label = |id: &NodeId| match order.get(id) {
        Some(i) => format!("#{i:<2} {}", id.short()),
        None => format!("#?  {}", id.short()),
    };
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
        let linked = s.peers.iter().filter(|p| p.state.is_linked()).count();
        let known = s
            .peers
            .iter()
            .filter(|p| p.state == PeerState::Known)
            .count();
        let _ = write!(
            out,
            "  {}  {listen:<width$}  peers {linked}",
            label(&s.node_id)
        );
        if known > 0 {
            let _ = write!(out, ", {known} known");
        }
        if !s.routes.is_empty() {
            let _ = write!(out, ", {}", count(s.routes.len(), "route"));
        }
        out.push('\n');
        let mut shown: Vec<&PeerSnapshot> = s
            .peers
            .iter()
            .filter(|p| p.state != PeerState::Known)
            .collect();
        shown.sort_by_key(|p| (order.get(&p.node_id).copied(), p.node_id.clone()));
        for p in shown {
            let _ = write!(
                out,
                "       {}  {:<12}",
                label(&p.node_id),
                p.state.as_str()
            );
            if p.state.is_linked() {
                let rtt = p
                    .smoothed_rtt
                    .or(p.rtt)
                    .map_or_else(|| "-".into(), fmt_duration);
                let _ = write!(out, "  {rtt:>7}  score {:.2}", p.score);
            }
            // No trailing spaces after a bare state.
            let len = out.trim_end_matches(' ').len();
            out.truncate(len);
            out.push('\n');
        }
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
    use meshwork::transport::Direction;

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes(vec![b; 8]).unwrap()
    }

    /// A peer `p` of node `i` in state `state`, with an RTT in µs.
    fn peer(i: u8, p: u8, state: PeerState, rtt_us: Option<u64>, score: f64) -> PeerSnapshot {
        let linked = state.is_linked();
        PeerSnapshot {
            node_id: id(p),
            state,
            direction: linked.then_some(if p < i {
                Direction::Outbound
            } else {
                Direction::Inbound
            }),
            addrs: vec![],
            remote_addr: None,
            metadata: Default::default(),
            rtt: rtt_us.map(Duration::from_micros),
            smoothed_rtt: rtt_us.map(Duration::from_micros),
            errors: 0,
            timeouts: 0,
            score,
            connected_for: linked.then_some(Duration::from_millis(500)),
            idle_for: linked.then_some(Duration::from_millis(5)),
            dial_failures: 0,
            peer_count: None,
        }
    }

    fn node(i: u8, peers: Vec<PeerSnapshot>) -> NodeStatus {
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
            pool: Default::default(),
            peers,
            seeds: vec![],
            blocked: vec![],
            concerns: vec![],
            routes: vec![],
            sync: Default::default(),
            served: Vec::new(),
            calls: Default::default(),
            connections: vec![],
            handshakes: Default::default(),
        }
    }

    /// Node `i` connected to each of `peers`, without RTTs.
    fn linked(i: u8, peers: &[u8]) -> NodeStatus {
        let peers = peers
            .iter()
            .map(|&p| peer(i, p, PeerState::Connected, None, 0.5))
            .collect();
        node(i, peers)
    }

    #[test]
    fn render_shows_each_nodes_peers_with_state_rtt_and_score() {
        use PeerState::*;
        let statuses = [
            node(
                0xa1,
                vec![
                    peer(0xa1, 0xd4, Connecting, None, 0.0),
                    peer(0xa1, 0xc3, Connected, Some(85), 0.97),
                    peer(0xa1, 0xb2, Unresponsive, Some(1_240), 0.1),
                    peer(0xa1, 0xee, Known, None, 0.0),
                ],
            ),
            node(0xb2, vec![peer(0xb2, 0xa1, Connected, None, 0.5)]),
            node(0xc3, vec![peer(0xc3, 0xa1, Known, None, 0.0)]),
            node(0xd4, vec![]),
        ];
        let mut statuses = statuses;
        let route = |target: u8, hops: u32| meshwork::concerns::Route {
            target: id(target),
            next_hop: id(0xa1),
            hops,
            age: Duration::from_secs(1),
        };
        statuses[1].routes = vec![route(0xc3, 2)];
        statuses[3].routes = vec![route(0xb2, 3), route(0xc3, 2)];
        let text = render(&statuses, "forming", Duration::from_millis(600));
        let expected = "\
[   0.6s] forming
  #0  a1a1a1a1  tcp://127.0.0.1:40161  peers 2, 1 known
       #1  b2b2b2b2  unresponsive   1.24ms  score 0.10
       #2  c3c3c3c3  connected        85µs  score 0.97
       #3  d4d4d4d4  connecting
  #1  b2b2b2b2  tcp://127.0.0.1:40178  peers 1, 1 route
       #0  a1a1a1a1  connected           -  score 0.50
  #2  c3c3c3c3  tcp://127.0.0.1:40195  peers 0, 1 known
  #3  d4d4d4d4  tcp://127.0.0.1:40212  peers 0, 2 routes
";
        assert_eq!(text, expected);
    }

    #[test]
    fn the_mesh_is_formed_when_every_node_has_its_peers_and_the_graph_is_connected() {
        // Two triangles: every node has 2 peers, but the graph is in 2 parts.
        let split = [
            linked(0, &[1, 2]),
            linked(1, &[0, 2]),
            linked(2, &[0, 1]),
            linked(3, &[4, 5]),
            linked(4, &[3, 5]),
            linked(5, &[3, 4]),
        ];
        let mesh = Mesh::of(&split);
        assert_eq!(mesh.links.len(), 6);
        assert_eq!(mesh.parts(), 2);
        assert!(mesh.short_of(2).is_empty());
        assert!(!mesh.formed(2));
        assert_eq!(
            mesh.progress(2),
            "6 of 6 nodes have 2+ peers, 6 links, graph in 2 parts"
        );

        // A chain 0-1-2-3: connected, but the ends have a single peer; a
        // link seen from one end only (3 -> 0) does not count.
        let chain = [
            linked(0, &[1]),
            linked(1, &[0, 2]),
            linked(2, &[1, 3]),
            linked(3, &[2, 0]),
        ];
        let mesh = Mesh::of(&chain);
        assert_eq!(mesh.links, BTreeSet::from([(0, 1), (1, 2), (2, 3)]));
        assert_eq!(mesh.parts(), 1);
        assert!(mesh.formed(1));
        assert_eq!(mesh.short_of(2), vec![0]);
        assert!(!mesh.formed(2));
        assert_eq!(
            mesh.shortfall(&chain, 2),
            "3 links; graph in 1 part(s); short of peers: 0 (00000000): 1 of 2"
        );

        // Peers that are not demo nodes, or not linked, do not count.
        let mut ring = vec![
            linked(0, &[1, 2, 9]),
            linked(1, &[0, 2]),
            linked(2, &[0, 1]),
        ];
        ring[1].peers.push(peer(1, 3, PeerState::Known, None, 0.0));
        let mesh = Mesh::of(&ring);
        assert_eq!(mesh.degree, vec![2, 2, 2]);
        assert_eq!(mesh.degree_range(), (2, 2));
        assert!(mesh.formed(2));
    }

    #[test]
    fn durations_and_stats() {
        assert_eq!(fmt_duration(Duration::from_micros(85)), "85µs");
        assert_eq!(fmt_duration(Duration::from_micros(1_240)), "1.24ms");
        assert_eq!(fmt_duration(Duration::from_millis(143)), "143ms");
        assert_eq!(fmt_duration(Duration::from_millis(2_500)), "2.50s");
        let us = Duration::from_micros;
        assert_eq!(
            (count(1, "link"), count(0, "link")),
            ("1 link".into(), "0 links".into())
        );
        assert_eq!(rtt_stats(&mut []), None);
        assert_eq!(
            rtt_stats(&mut [us(30), us(10), us(20)]),
            Some((us(20), us(10), us(30)))
        );
        assert_eq!(
            rtt_stats(&mut [us(40), us(10), us(20), us(30)]),
            Some((us(25), us(10), us(40)))
        );
    }

    #[test]
    fn the_farthest_pair_is_found_by_hops() {
        // A chain 0-1-2-3 with a spur 1-4: 0 and 3 are 3 hops apart.
        let mesh = Mesh::of(&[
            linked(0, &[1]),
            linked(1, &[0, 2, 4]),
            linked(2, &[1, 3]),
            linked(3, &[2]),
            linked(4, &[1]),
        ]);
        assert_eq!(mesh.farthest_pair(), Some((0, 3, 3)));
        // Everyone a neighbour: the first pair, one hop.
        let triangle = Mesh::of(&[linked(0, &[1, 2]), linked(1, &[0, 2]), linked(2, &[0, 1])]);
        assert_eq!(triangle.farthest_pair(), Some((0, 1, 1)));
        // Unconnected nodes are never a pair.
        assert_eq!(
            Mesh::of(&[linked(0, &[]), linked(1, &[])]).farthest_pair(),
            None
        );
        assert_eq!(Mesh::of(&[]).farthest_pair(), None);
        // From one node: the farthest it reaches, the last on a tie.
        assert_eq!(mesh.farthest_from(0), Some((3, 3)));
        assert_eq!(mesh.farthest_from(1), Some((3, 2)));
        assert_eq!(mesh.farthest_from(4), Some((3, 3)));
        assert_eq!(triangle.farthest_from(0), Some((2, 1)));
        assert_eq!(
            Mesh::of(&[linked(0, &[]), linked(1, &[])]).farthest_from(0),
            None
        );
        assert_eq!(Mesh::of(&[]).farthest_from(0), None);
    }

    #[test]
    fn rpc_line() {
        let error = DemoError::Refused {
            message: RPC_REFUSAL.into(),
        };
        assert_eq!(
            super::rpc_line(
                (1, 3),
                2,
                "routed",
                Duration::from_micros(2_500),
                ("hi", Duration::from_micros(1_250)),
                &error
            ),
            "#3 serves \"demo\" (2 hops from #1, routed; in #1's registry after 2.50ms); #1's \
             typed call echo(\"hi\") came back in 1.25ms; fail(\"no, thank you\") gave #1 the \
             typed error DemoError::Refused { message: \"no, thank you\" }"
        );
    }

    #[test]
    fn broadcast_and_route_lines() {
        let ms = Duration::from_millis;
        assert_eq!(
            broadcast_line(4, 4, ms(3)),
            "#0 flooded a message (TTL 16); 4 of 4 other nodes delivered it within 3.00ms"
        );
        assert_eq!(
            route_line(1, 3, 2, Some((Some(0), 2)), ms(2)),
            "#1 -> #3, not neighbours (2 hops apart): echoed in 2.00ms, route via #0, 2 hops"
        );
        assert_eq!(
            route_line(0, 1, 1, None, Duration::from_micros(700)),
            "#0 -> #1, neighbours (every node is a neighbour of every other): \
             echoed in 700µs, sent directly"
        );
        assert_eq!(
            route_line(2, 4, 3, Some((None, 3)), ms(12)),
            "#2 -> #4, not neighbours (3 hops apart): echoed in 12ms, route via ?, 3 hops"
        );
        assert_eq!(
            unreachable_line(1, ms(2)),
            "#1 -> a node id nobody has: unreachable in 2.00ms, once every node answered \
             \"not through me\" and #1's neighbours had stayed the same for 1s (the route \
             search timeout is 3s)"
        );
    }

    #[test]
    fn kv_lines() {
        assert_eq!(
            kv_write_line(5, 5, Duration::from_micros(2_310)),
            "#0 wrote \"demo/greeting\"; 5 of 5 nodes held it within 2.31ms"
        );
        assert_eq!(
            digest_groups(&[
                0x3f2a_91c0_0000_0001,
                0x3f2a_91c0_0000_0001,
                0x9c1d_0e2b_ffff_ffff
            ]),
            "#0 #1 3f2a91c0, #2 9c1d0e2b"
        );
        assert_eq!(digest_groups(&[]), "");
        let s = Duration::from_secs;
        assert_eq!(fmt_minutes(s(3599)), "59m59s");
        assert_eq!(fmt_minutes(s(7260)), "2h01m");
        assert_eq!(fmt_minutes(Duration::from_millis(2_500)), "2.50s");
    }

    #[test]
    fn small_meshes_are_sparse_and_large_ones_cannot_split() {
        let sparse = PeerLimits {
            min: 2,
            max: 4,
            outbound_reserved: Some(0),
        };
        assert_eq!(PeerLimits::for_nodes(5), sparse);
        assert_eq!(PeerLimits::for_nodes(3), sparse);
        assert_eq!(PeerLimits::for_nodes(2).min, 1);
        let wide = PeerLimits::for_nodes(6);
        assert_eq!((wide.min, wide.max, wide.outbound_reserved), (3, 8, None));
        assert_eq!(PeerLimits::for_nodes(64), wide);
    }

    /// Five nodes that only know node 0 find each other by discovery; a
    /// broadcast from node 0 reaches every other node once, two nodes that
    /// are not neighbours talk through a route, a key written by node 0
    /// reaches every node and cannot be overwritten by another, and a cut
    /// mesh whose halves both wrote heals to identical replicas.
    #[tokio::test]
    async fn a_small_demo_forms_the_mesh_by_discovery_and_shuts_down() {
        let args = DemoArgs {
            nodes: 5,
            seconds: 0.0,
        };
        let mut demo = Demo::new(&args, Screen::quiet());
        assert_eq!(demo.limits.min, 2);
        demo.start_nodes().await.unwrap();
        demo.form_mesh().await.unwrap();
        assert!(demo.mesh_formed_after.is_some());
        let mesh = Mesh::of(&demo.statuses);
        assert!(mesh.formed(2), "{:?}", demo.report);
        demo.broadcast().await.unwrap();
        demo.routed_request().await.unwrap();
        demo.kv_write().await.unwrap();
        demo.kv_refused().await.unwrap();
        demo.rpc_call().await.unwrap();
        demo.kv_heal().await.unwrap();
        assert!(demo.shut_down().await, "{:?}", demo.report);
        let labels: Vec<_> = demo.report.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            labels,
            [
                "peers",
                "time to form",
                "encryption",
                "broadcast",
                "routed request",
                "unreachable",
                "kv write",
                "lease",
                "rpc",
                "heal",
                "rtt",
                "shutdown"
            ]
        );
        let row = |label: &str| &demo.report.iter().find(|(k, _)| k == label).unwrap().1;
        assert!(
            row("broadcast").contains("4 of 4 other nodes delivered it")
                && row("broadcast").contains("each exactly once"),
            "{}",
            row("broadcast")
        );
        assert!(
            row("kv write").contains("5 of 5 nodes held it"),
            "{}",
            row("kv write")
        );
        assert!(
            row("lease").contains("refused: leased to #0"),
            "{}",
            row("lease")
        );
        assert!(
            row("heal").contains("all 5 replicas identical"),
            "{}",
            row("heal")
        );
        // The service is called across the same farthest pair, routed.
        assert!(
            row("rpc").contains(" hops from #")
                && row("rpc").contains("routed")
                && row("rpc").contains("DemoError::Refused"),
            "{}",
            row("rpc")
        );
        // A node dials only while it has fewer than 2 peers, the first
        // dial going to node 0: at most 8 of the 10 possible links form, so
        // some pair is not neighbours.
        assert!(
            row("routed request").contains("not neighbours"),
            "{}",
            row("routed request")
        );
        // The step fails unless the request to nobody was unreachable.
        assert!(
            row("unreachable").contains("a node id nobody has: unreachable in"),
            "{}",
            row("unreachable")
        );
    }

    #[test]
    fn a_small_mesh_asks_for_every_other_node() {
        let args = DemoArgs {
            nodes: 2,
            seconds: 0.0,
        };
        assert_eq!(Demo::new(&args, Screen::quiet()).limits.min, 1);
    }
}
