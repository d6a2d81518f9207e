//! `meshwork node`: run one mesh node until Ctrl-C, SIGTERM or `POST /shutdown`.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use meshwork::Node;
use meshwork::concerns::{ConcernsConfig, MAX_TOPIC_LEN};
use meshwork::peers::PeersConfig;
use meshwork::rpc::{RpcConfig, check_service_name};
use meshwork::sync::SyncConfig;
use meshwork::transport::{Address, Host, Identity, NetworkKey};
use meshwork::wire::NodeId;
use serde::Serialize;
use tracing::{info, warn};

use crate::admin::{self, AdminState, ShutdownSignal};
use crate::demo_service::{self, DemoService};
use crate::echo::{Echo, TopicRecorder};
use crate::events::EventLog;
use crate::http;

/// How long a graceful shutdown may take before we give up and exit non-zero.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// The shortest wait between dials of one peer (capped by --backoff-max-ms).
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Address book entries sent in each discovery message (the library default).
pub(crate) const DISCOVERY_SAMPLE: usize = 16;
/// Largest value of a duration flag: one day, in ms.
const MAX_MILLIS: u64 = 24 * 60 * 60 * 1000;
/// Longest lease (`--lease-secs`): a year.
const MAX_LEASE_SECS: u64 = 365 * 24 * 60 * 60;

/// Options of `meshwork node`.
#[derive(Debug, clap::Args)]
pub(crate) struct NodeArgs {
    /// Address to accept peers on (repeatable); port 0 picks a free port.
    #[arg(long, value_name = "ADDR", default_value = "tcp://127.0.0.1:7000")]
    listen: Vec<Address>,

    /// Address to give peers instead of the --listen addresses (repeatable):
    /// what they should dial when this node listens on 0.0.0.0 (advertised
    /// otherwise as the IP its host name resolves to), behind a port
    /// forward, or under a DNS name. `/status` lists these as `listen`;
    /// the ready line lists the bound addresses.
    #[arg(long, value_name = "ADDR", value_parser = parse_advertised)]
    advertise: Vec<Address>,

    /// Node to dial at start, and again whenever fewer than --min-peers are
    /// connected and it is not one of them (repeatable). One seed is enough
    /// to join a mesh: the others are found by discovery. Written
    /// NODE_ID@ADDR (the id as in the seed's ready line, 64 hex digits), only
    /// that node is accepted at the address: any other that answers there is
    /// refused.
    #[arg(long, value_name = "[NODE_ID@]ADDR", value_parser = parse_seed)]
    seed: Vec<Seed>,

    /// Serve the admin HTTP API on HOST:PORT (loopback only unless
    /// --admin-allow-remote); port 0 picks a free port.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_admin_addr)]
    admin: Option<SocketAddr>,

    /// Allow --admin on a non-loopback address. The admin API has no
    /// authentication: anyone who can reach it can stop the node.
    #[arg(long, requires = "admin")]
    admin_allow_remote: bool,

    /// Network name; nodes of other networks are refused.
    #[arg(long, value_name = "NAME", default_value = "meshwork")]
    network: String,

    /// Metadata sent to peers in the handshake (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_meta)]
    meta: Vec<(String, String)>,

    /// Dial known peers while fewer than N are connected.
    #[arg(long, value_name = "N", default_value_t = 4)]
    min_peers: usize,

    /// Never hold more than N peers; inbound peers beyond the limit are
    /// refused and told about others to try.
    #[arg(long, value_name = "N", default_value_t = 16)]
    max_peers: usize,

    /// Base heartbeat interval, in ms: a peer silent this long is pinged
    /// (the interval stretches for long-idle healthy peers, up to 8 s or
    /// half of --unresponsive-ms, whichever is less). Pongs give each peer
    /// its round-trip time.
    #[arg(long, value_name = "MS", default_value_t = 2_000, value_parser = millis())]
    heartbeat_ms: u64,

    /// A peer silent this long, in ms, is unresponsive: only heartbeats go to it.
    #[arg(long, value_name = "MS", default_value_t = 15_000, value_parser = millis())]
    unresponsive_ms: u64,

    /// A peer silent this long, in ms, is disconnected.
    #[arg(long, value_name = "MS", default_value_t = 30_000, value_parser = millis())]
    dead_ms: u64,

    /// Longest wait between dials of one peer, in ms (the backoff starts at
    /// 500 ms, or at this if smaller, and doubles with jitter).
    #[arg(long, value_name = "MS", default_value_t = 60_000, value_parser = millis())]
    backoff_max_ms: u64,

    /// How often peers exchange samples of their address books, in ms (a new
    /// peer gets one at once).
    #[arg(long, value_name = "MS", default_value_t = 30_000, value_parser = millis())]
    discovery_ms: u64,

    /// For how long, in ms, a peer whose connection broke is redialled even
    /// above --min-peers (what rejoins a healed partition).
    #[arg(long, value_name = "MS", default_value_t = 600_000, value_parser = millis())]
    lost_peer_retry_ms: u64,

    /// Past --lost-peer-retry-ms, one lost peer is redialled every this many
    /// ms (a feeler: what rejoins the halves of a longer partition); 0 turns
    /// feelers off.
    #[arg(long, value_name = "MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(0..=MAX_MILLIS))]
    feeler_ms: u64,

    /// The node's key file: loaded if it exists, else created (mode 0600)
    /// with a new key. The node id is the key's public half, so it stays the
    /// same across restarts. A file that is corrupt or readable by other
    /// users is an error; it is never replaced. Without --key the node has a
    /// fresh identity on every start.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,

    /// A network key file shared by every member (create one with `meshwork
    /// keygen --network-key FILE`): nodes without the same key cannot
    /// complete the handshake.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    network_key: Option<PathBuf>,

    /// Allow only the listed nodes to connect, in either direction (seeds
    /// included). Repeatable: each --allow adds one node id, 64 hex digits
    /// as printed in a node's ready line or by `meshwork keygen --key`.
    #[arg(long = "allow", value_name = "NODE_ID_HEX", value_parser = parse_node_id)]
    allow: Vec<NodeId>,

    /// Subscribe to a topic (repeatable): every message published on it
    /// anywhere in the mesh is recorded as a `publication` event (admin
    /// `GET /events`). A topic is 1 to 256 bytes.
    #[arg(long, value_name = "TOPIC", value_parser = parse_topic)]
    subscribe: Vec<String>,

    /// Turn encryption and authentication OFF: anyone on the path can read
    /// and forge traffic and claim any node id. For tests and debugging
    /// only; every peer must use it too.
    #[arg(long)]
    insecure: bool,

    /// Turn leasing of the replicated map OFF: any node may overwrite any
    /// key, and the last writer wins. Every node of a mesh must agree:
    /// peers with the other mode are refused at the handshake.
    #[arg(long, conflicts_with = "lease_secs")]
    no_leasing: bool,

    /// How long a write to the replicated map holds its key, in seconds:
    /// until then other nodes' writes to it are refused (409 from the
    /// admin API).
    #[arg(long, value_name = "S", default_value_t = 3_600,
          value_parser = clap::value_parser!(u64).range(1..=MAX_LEASE_SECS))]
    lease_secs: u64,

    /// How often the node compares its replica of the map with a random
    /// peer and repairs the differences, in ms (it also does so at once
    /// with every new peer).
    #[arg(long, value_name = "MS", default_value_t = 2_000, value_parser = millis())]
    anti_entropy_ms: u64,

    /// The clock skew the replicated map allows between nodes, in ms:
    /// writes stamped further ahead of this node's clock are refused, and
    /// tombstones of expired ephemeral keys (a departed RPC provider's
    /// registry entry) are forgotten their ttl plus twice this after the
    /// expiry. Lower it only where clocks are kept in step (NTP). Every
    /// node of a mesh must use the same value: peers with another are
    /// refused at the handshake.
    #[arg(long, value_name = "MS", default_value_t = 60_000, value_parser = millis())]
    max_clock_skew_ms: u64,

    /// How far from this node's clock a request routed to it (from a node
    /// that is not a neighbour, RPC calls included) may be stamped, in ms:
    /// outside it the request is refused and its caller told, and within
    /// it each request is taken once. Nodes whose clocks differ by more
    /// cannot call each other through routes.
    #[arg(long, value_name = "MS", default_value_t = 300_000,
          value_parser = clap::value_parser!(u64).range(1_000..=MAX_MILLIS))]
    routed_window_ms: u64,

    /// The most this node's replica of the map holds, in MiB (keys and
    /// values, tombstones included, plus about 200 bytes per entry). When
    /// full, writes of new keys answer 507 and new keys from peers are
    /// refused (counted in /status `sync.refused_full`).
    #[arg(long, value_name = "MIB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    kv_max_mib: u64,

    /// Serve the built-in demo service under NAME (default `demo`): `echo`,
    /// `add` (a counter), `fail` (a typed error), `sleep` and `whoami`. Any
    /// node calls it with admin `POST /rpc/NAME/METHOD`. A name is 1 to 200
    /// letters, digits, `.`, `-` and `_`.
    #[arg(long, value_name = "NAME", num_args = 0..=1,
          default_missing_value = demo_service::DEFAULT_NAME, value_parser = parse_service_name)]
    serve_demo: Option<String>,

    /// Deadline of the RPC calls this node makes (admin `POST /rpc/...`
    /// without `deadline_ms`), retries included, in ms; also the time a call
    /// served here may run when its caller sent no budget.
    #[arg(long, value_name = "MS", default_value_t = 10_000, value_parser = millis())]
    rpc_deadline_ms: u64,

    /// Calls of one service that may run here at once; more are refused at
    /// once as overloaded, so their callers can go elsewhere.
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    rpc_concurrency: u32,
}

impl NodeArgs {
    /// Checks that span several options (clap checks each one alone).
    pub(crate) fn validate(&self) -> Result<(), String> {
        if let Some(admin) = self.admin {
            if !admin.ip().is_loopback() && !self.admin_allow_remote {
                return Err(format!(
                    "--admin {admin} is not a loopback address; the admin API has no \
                     authentication, so it only listens on 127.0.0.1/::1 unless you \
                     also pass --admin-allow-remote"
                ));
            }
        }
        if let Some(admin) = self.admin {
            let admin_addr = Address::tcp(admin);
            if let Some(listen) = self.listen.iter().find(|l| same_endpoint(&admin_addr, l)) {
                return Err(format!(
                    "--admin and --listen use the same address ({admin} and {listen}): \
                     the admin API needs a port of its own"
                ));
            }
        }
        if let Some((seed, listen)) = seed_on_own_address(&self.seed, &self.listen) {
            return Err(format!(
                "--seed {} is this node's own --listen address {listen}: a node cannot seed \
                 itself; give the address of another node of the mesh",
                seed.addr
            ));
        }
        if self.network.is_empty() {
            return Err("--network must not be empty".into());
        }
        self.peer_settings(PeersConfig::default())
            .validate()
            .map_err(|e| with_flag_names(&e.to_string()))?;
        self.sync_settings().validate().map_err(|e| e.to_string())
    }

    /// The settings of the replicated map: `--no-leasing`, `--lease-secs`,
    /// `--anti-entropy-ms`, `--max-clock-skew-ms`, `--kv-max-mib`.
    pub(crate) fn sync_settings(&self) -> SyncConfig {
        SyncConfig::default()
            .with_leasing(!self.no_leasing)
            .with_lease(Duration::from_secs(self.lease_secs))
            .with_anti_entropy_interval(Duration::from_millis(self.anti_entropy_ms))
            .with_max_clock_skew(Duration::from_millis(self.max_clock_skew_ms))
            .with_max_bytes(usize::try_from(self.kv_max_mib << 20).unwrap_or(usize::MAX))
    }

    /// The settings of the concerns layer: `--routed-window-ms`.
    pub(crate) fn concerns_settings(&self) -> ConcernsConfig {
        ConcernsConfig::default().with_routed_window(Duration::from_millis(self.routed_window_ms))
    }

    /// The settings of the RPC layer: `--rpc-deadline-ms`,
    /// `--rpc-concurrency`.
    pub(crate) fn rpc_settings(&self) -> RpcConfig {
        RpcConfig::default()
            .with_deadline(self.rpc_deadline())
            .with_concurrency(self.rpc_concurrency as usize)
    }

    /// `--rpc-deadline-ms`.
    pub(crate) fn rpc_deadline(&self) -> Duration {
        Duration::from_millis(self.rpc_deadline_ms)
    }

    /// Applies the peer manager options to `config` (seeds are added
    /// separately).
    fn peer_settings(&self, config: PeersConfig) -> PeersConfig {
        let ms = Duration::from_millis;
        let backoff_max = ms(self.backoff_max_ms);
        config
            .with_min_peers(self.min_peers)
            .with_max_peers(self.max_peers)
            .with_heartbeat(
                ms(self.heartbeat_ms),
                ms(self.unresponsive_ms),
                ms(self.dead_ms),
            )
            .with_backoff(BACKOFF_MIN.min(backoff_max), backoff_max)
            .with_discovery(ms(self.discovery_ms), DISCOVERY_SAMPLE)
            .with_lost_peer_retry(ms(self.lost_peer_retry_ms))
            .with_feeler_interval(ms(self.feeler_ms))
    }
}

/// The peer manager names its settings as in its API; say which flag sets
/// each one instead.
fn with_flag_names(message: &str) -> String {
    [
        ("min_peers", "--min-peers"),
        ("max_peers", "--max-peers"),
        ("unresponsive_after", "--unresponsive-ms"),
        ("dead_after", "--dead-ms"),
        ("heartbeat interval", "--heartbeat-ms"),
        ("discovery interval", "--discovery-ms"),
    ]
    .iter()
    .fold(message.to_string(), |m, (name, flag)| m.replace(name, flag))
}

/// A duration flag in ms: at least 1, at most a day (far larger values
/// would overflow the clock arithmetic).
fn millis() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(1..=MAX_MILLIS)
}

/// Parses `--admin`: `IP:PORT`, `[IPv6]:PORT` or `localhost:PORT`.
fn parse_admin_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Some(port) = s.strip_prefix("localhost:") {
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("port must be a number from 0 to 65535, got {port:?}"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    Err("expected HOST:PORT with an IP host, e.g. 127.0.0.1:7100 or [::1]:7100".into())
}

/// A `--seed`: an address, optionally pinned to a node id.
#[derive(Debug, Clone, PartialEq)]
struct Seed {
    addr: Address,
    id: Option<NodeId>,
}

/// Parses `--advertise`: an address peers can dial (not port 0).
fn parse_advertised(s: &str) -> Result<Address, String> {
    let addr = s.parse::<Address>().map_err(|e| e.to_string())?;
    if let Address::Tcp { port: 0, .. } = addr {
        return Err(format!(
            "peers cannot dial port 0 ({addr}): advertise the port this node listens on"
        ));
    }
    Ok(addr)
}

/// Parses `--seed`: `ADDR` or `NODE_ID@ADDR`. Port 0 is refused: it means
/// "any free port" only when listening, and no node can be dialled there.
fn parse_seed(s: &str) -> Result<Seed, String> {
    let (id, addr) = match s.split_once('@') {
        Some((id, addr)) => (Some(parse_node_id(id)?), addr),
        None => (None, s),
    };
    let addr = addr.parse::<Address>().map_err(|e| e.to_string())?;
    if let Address::Tcp { port: 0, .. } = addr {
        return Err(format!(
            "a seed cannot be dialled on port 0 ({addr}): port 0 means \"any free port\" \
             only for --listen; give the port the seed node listens on (its ready line \
             lists it)"
        ));
    }
    Ok(Seed { addr, id })
}

/// True when `a` and `b` may be the same socket: two in-memory addresses
/// of one name, or TCP addresses with one port (not 0: unknown until
/// bound) whose hosts are the same, where one is a wildcard (`0.0.0.0`,
/// `[::]`), or `localhost` and a loopback address. Other host names are
/// not resolved, so they match only themselves.
fn same_endpoint(a: &Address, b: &Address) -> bool {
    match (a, b) {
        (Address::Mem(a), Address::Mem(b)) => a == b,
        (
            Address::Tcp {
                host: host_a,
                port: port_a,
            },
            Address::Tcp {
                host: host_b,
                port: port_b,
            },
        ) => port_a == port_b && *port_a != 0 && same_host(host_a, host_b),
        _ => false,
    }
}

/// A host that names this machine: loopback, wildcard or `localhost`.
fn is_local(h: &Host) -> bool {
    match h {
        Host::Ip(ip) => ip.is_loopback() || ip.is_unspecified(),
        Host::Name(name) => name == "localhost",
    }
}

/// The host part of [`same_endpoint`].
fn same_host(a: &Host, b: &Host) -> bool {
    match (a, b) {
        _ if a == b => true,
        (Host::Ip(ip), _) | (_, Host::Ip(ip)) if ip.is_unspecified() => true,
        (Host::Name(name), other) | (other, Host::Name(name)) if name == "localhost" => {
            is_local(other)
        }
        _ => false,
    }
}

/// True when dialling `seed` may reach this node's listener `listen`: as
/// [`same_endpoint`], except that a wildcard listener (`0.0.0.0`, `[::]`)
/// is reached only through a local host (loopback, wildcard, `localhost`),
/// not through any other host on the same port.
fn seed_reaches_listener(seed: &Address, listen: &Address) -> bool {
    match (seed, listen) {
        (Address::Tcp { host: sh, port: sp }, Address::Tcp { host: lh, port: lp }) => {
            let wildcard = |h: &Host| matches!(h, Host::Ip(ip) if ip.is_unspecified());
            sp == lp
                && *sp != 0
                && if wildcard(lh) || wildcard(sh) {
                    is_local(sh) && is_local(lh)
                } else {
                    same_host(sh, lh)
                }
        }
        _ => same_endpoint(seed, listen),
    }
}

/// The first seed that reaches one of `listen` (see
/// [`seed_reaches_listener`]), with that listen address.
fn seed_on_own_address<'a>(
    seeds: &'a [Seed],
    listen: &'a [Address],
) -> Option<(&'a Seed, &'a Address)> {
    seeds.iter().find_map(|seed| {
        listen
            .iter()
            .find(|l| seed_reaches_listener(&seed.addr, l))
            .map(|l| (seed, l))
    })
}

/// Hex digits of a node id: a node's X25519 public key.
pub(crate) const NODE_ID_HEX_DIGITS: usize = 64;

/// Parses `--allow`: a node id is an X25519 public key, 64 hex digits.
pub(crate) fn parse_node_id(s: &str) -> Result<NodeId, String> {
    if s.len() != NODE_ID_HEX_DIGITS || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "expected a node id: {NODE_ID_HEX_DIGITS} hex digits (a node's public key, as printed in \
             its ready line or by `meshwork keygen --key`), got {} characters",
            s.chars().count()
        ));
    }
    NodeId::from_hex(&s.to_ascii_lowercase()).map_err(|e| e.to_string())
}

/// Parses `--subscribe`: 1 to 256 bytes.
fn parse_topic(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > MAX_TOPIC_LEN {
        return Err(format!(
            "a topic is 1 to {MAX_TOPIC_LEN} bytes, got {}",
            s.len()
        ));
    }
    Ok(s.to_string())
}

/// Parses `--serve-demo NAME`: a service name.
fn parse_service_name(s: &str) -> Result<String, String> {
    check_service_name(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// Parses `--meta KEY=VALUE`.
fn parse_meta(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err("expected KEY=VALUE with a non-empty KEY".into()),
    }
}

/// The keys a node starts with, read from the files named on the command line.
#[derive(Debug)]
struct Keys {
    identity: Identity,
    network_key: Option<NetworkKey>,
}

/// Loads (or creates) the node key and loads the network key. Errors name
/// the file and what is wrong with it; nothing is ever overwritten.
fn load_keys(args: &NodeArgs) -> anyhow::Result<Keys> {
    // The network key first: reading it has no side effects, while a missing
    // node key file is created.
    let network_key = match &args.network_key {
        Some(path) => {
            let key =
                NetworkKey::load(path).context("cannot use the network key (--network-key)")?;
            info!(path = %path.display(), "network key loaded: only holders of it can connect");
            Some(key)
        }
        None => None,
    };
    let identity = match &args.key {
        Some(path) => {
            let existed = path.symlink_metadata().is_ok();
            let identity =
                Identity::load_or_create(path).context("cannot use the node key (--key)")?;
            if existed {
                info!(path = %path.display(), node_id = %identity.node_id(), "node key loaded");
            } else {
                info!(
                    path = %path.display(),
                    node_id = %identity.node_id(),
                    "created a new node key (mode 0600); this node keeps its id across restarts"
                );
            }
            identity
        }
        None => {
            let identity = Identity::generate();
            info!(
                node_id = %identity.node_id(),
                "no --key: using a fresh ephemeral identity; the node id changes on every \
                 start (pass --key FILE to keep it)"
            );
            identity
        }
    };
    Ok(Keys {
        identity,
        network_key,
    })
}

/// The one line printed on stdout once the node is up.
#[derive(Debug, Serialize)]
struct Ready {
    event: &'static str,
    node_id: String,
    listen: Vec<String>,
    admin: Option<String>,
}

/// Why the node is stopping.
#[derive(Debug, Clone, Copy)]
enum StopCause {
    Interrupt,
    Terminate,
    AdminRequest,
}

/// Runs the node until it is asked to stop, then shuts it down gracefully.
pub(crate) async fn run(args: NodeArgs) -> anyhow::Result<ExitCode> {
    // Key files first: a bad one must stop the node before it binds anything.
    let keys = load_keys(&args)?;

    // Then the admin port: it is the cheapest thing to fail.
    let admin_listener = match args.admin {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot bind the admin API on {addr}"))?,
        ),
        None => None,
    };
    let admin_addr = admin_listener
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()
        .context("admin listener address")?;

    let events = Arc::new(EventLog::new());
    let mut builder = Node::builder(&args.network)
        .identity(keys.identity)
        .concern(Echo::new(events.clone()));
    if let Some(key) = keys.network_key {
        builder = builder.network_key(key);
    }
    if !args.allow.is_empty() {
        let allowed = args.allow.clone();
        info!(
            peers = allowed.len(),
            "allow list: only these nodes may connect"
        );
        builder = builder.configure(|c| c.with_allowed_peers(allowed));
    }
    if args.insecure {
        warn!(
            "--insecure: ENCRYPTION AND AUTHENTICATION ARE OFF. Anyone on the path can read and \
             forge this node's traffic and claim any node id{}. Use only for tests and debugging.",
            if args.allow.is_empty() {
                ""
            } else {
                " (so --allow only checks ids peers claim, which anyone can forge)"
            }
        );
        builder = builder.insecure_plaintext();
    }
    for addr in &args.listen {
        builder = builder.listen(addr.clone());
    }
    let advertised = args.advertise.clone();
    builder = builder.configure(|c| {
        advertised
            .into_iter()
            .fold(c, |c, a| c.with_advertised_addr(a))
    });
    for seed in &args.seed {
        builder = match &seed.id {
            Some(id) => builder.seed_id(seed.addr.clone(), id.clone()),
            None => builder.seed(seed.addr.clone()),
        };
    }
    for (k, v) in &args.meta {
        builder = builder.metadata(k.clone(), v.clone());
    }
    builder = builder
        .peers(|c| args.peer_settings(c))
        .concerns_config(args.concerns_settings())
        .sync_config(args.sync_settings())
        .rpc_config(args.rpc_settings());
    if args.no_leasing {
        info!("--no-leasing: the replicated map is last-writer-wins; every peer must agree");
    }
    let node = builder.start().await.with_context(|| {
        let listen: Vec<String> = args.listen.iter().map(|a| a.to_string()).collect();
        format!("cannot start the node (listening on {})", listen.join(", "))
    })?;

    // A --listen on port 0 got its port only now: a seed may turn out to be
    // this node (validate() refused the ones it could see).
    let bound = node.endpoint().bound_addrs();
    if let Some((seed, listen)) = seed_on_own_address(&args.seed, &bound) {
        warn!(
            seed = %seed.addr,
            listen = %listen,
            "--seed {} is this node's own listen address (the port picked for --listen \
             port 0): dialling it reaches only this node, so that seed is dropped",
            seed.addr
        );
    }

    let topics = match TopicRecorder::start(&node, &args.subscribe, &events) {
        Ok(t) => t,
        Err(e) => {
            node.shutdown().await;
            return Err(anyhow::Error::new(e).context("cannot subscribe (--subscribe)"));
        }
    };
    if !topics.topics().is_empty() {
        info!(topics = %topics.topics().join(" "), "subscribed");
    }
    if let Some(name) = &args.serve_demo {
        let service = DemoService::server(node.node_id().to_string());
        if let Err(e) = node.rpc().serve(name, service).await {
            node.shutdown().await;
            return Err(anyhow::Error::new(e).context(format!(
                "cannot serve the demo service as {name:?} (--serve-demo)"
            )));
        }
        info!(service = %name, "serving the demo service");
    }

    let shutdown = ShutdownSignal::new();
    let server = admin_listener.map(|listener| {
        let state = AdminState::new(node.clone(), shutdown.clone())
            .with_events(events.clone(), topics.topics())
            .with_rpc_deadline(args.rpc_deadline());
        let router = admin::router(state);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            http::serve(listener, router, stop, http::Limits::default()).await;
        })
    });
    if let Some(addr) = admin_addr {
        info!(%addr, "admin API listening");
    }

    let mut signals = match StopSignals::install() {
        Ok(signals) => signals,
        Err(e) => {
            node.shutdown().await;
            return Err(e);
        }
    };
    if let Err(e) = print_ready(&node, admin_addr) {
        node.shutdown().await;
        return Err(e.context("cannot write the ready line to stdout"));
    }

    let cause = wait_for_stop(&mut signals, &shutdown).await;
    info!(?cause, "shutting down");
    let graceful = async {
        node.shutdown().await;
        drop(topics);
        // Stops the admin server (if the request was not already the trigger).
        shutdown.trigger();
        if let Some(server) = server {
            let _ = server.await;
        }
    };
    tokio::select! {
        done = tokio::time::timeout(SHUTDOWN_TIMEOUT, graceful) => match done {
            Ok(()) => {
                info!("shut down cleanly");
                Ok(ExitCode::SUCCESS)
            }
            Err(_) => {
                warn!(timeout = ?SHUTDOWN_TIMEOUT, "graceful shutdown did not finish in time; exiting anyway");
                Ok(ExitCode::FAILURE)
            }
        },
        _ = signals.next() => {
            warn!("second signal: exiting without finishing the shutdown");
            Ok(ExitCode::from(130))
        }
    }
}

/// Prints the `ready` line on stdout and flushes it.
fn print_ready(node: &Node, admin: Option<SocketAddr>) -> anyhow::Result<()> {
    let ready = Ready {
        event: "ready",
        node_id: node.node_id().to_string(),
        listen: node
            .endpoint()
            .bound_addrs()
            .iter()
            .map(|a| a.to_string())
            .collect(),
        admin: admin.map(|a| a.to_string()),
    };
    let line = serde_json::to_string(&ready)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// Waits for Ctrl-C, SIGTERM or an admin `POST /shutdown`.
async fn wait_for_stop(signals: &mut StopSignals, shutdown: &ShutdownSignal) -> StopCause {
    tokio::select! {
        cause = signals.next() => cause,
        _ = shutdown.stopped() => StopCause::AdminRequest,
    }
}

/// SIGINT and SIGTERM handlers. Installed before the ready line is printed,
/// so a signal sent as soon as the line is read is never fatal.
#[derive(Debug)]
struct StopSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(StopSignals {
                interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
                terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        Ok(StopSignals {})
    }

    /// The next SIGINT or SIGTERM.
    async fn next(&mut self) -> StopCause {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => StopCause::Interrupt,
                _ = self.terminate.recv() => StopCause::Terminate,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            StopCause::Interrupt
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::temp_dir;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Wrap {
        #[command(flatten)]
        args: NodeArgs,
    }

    fn parse(argv: &[&str]) -> Result<NodeArgs, clap::Error> {
        Wrap::try_parse_from(std::iter::once("node").chain(argv.iter().copied())).map(|w| w.args)
    }

    #[test]
    fn defaults() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.listen, vec!["tcp://127.0.0.1:7000".parse().unwrap()]);
        assert_eq!(a.network, "meshwork");
        assert!(a.admin.is_none() && a.seed.is_empty() && a.meta.is_empty());
        assert!(a.subscribe.is_empty());
        assert!(a.validate().is_ok());
    }

    #[test]
    fn parses_every_option() {
        let a = parse(&[
            "--listen",
            "tcp://127.0.0.1:0",
            "--listen",
            "tcp://[::1]:0",
            "--seed",
            "tcp://localhost:7000",
            "--admin",
            "localhost:0",
            "--network",
            "test",
            "--meta",
            "role=a=b",
            "--min-peers",
            "2",
            "--max-peers",
            "5",
            "--heartbeat-ms",
            "250",
            "--unresponsive-ms",
            "1000",
            "--dead-ms",
            "2000",
            "--backoff-max-ms",
            "300",
            "--discovery-ms",
            "700",
            "--lost-peer-retry-ms",
            "5000",
            "--feeler-ms",
            "0",
            "--subscribe",
            "news",
            "--subscribe",
            &"t".repeat(256),
        ])
        .unwrap();
        assert_eq!(a.subscribe, ["news".to_string(), "t".repeat(256)]);
        assert_eq!(
            a.seed,
            [Seed {
                addr: "tcp://localhost:7000".parse().unwrap(),
                id: None
            }]
        );
        let id = "AB".repeat(32);
        let pinned = parse(&["--seed", &format!("{id}@tcp://127.0.0.1:7000")]).unwrap();
        assert_eq!(
            pinned.seed,
            [Seed {
                addr: "tcp://127.0.0.1:7000".parse().unwrap(),
                id: Some(NodeId::from_hex(&id.to_ascii_lowercase()).unwrap()),
            }]
        );
        assert_eq!(a.listen.len(), 2);
        assert_eq!(a.admin, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(a.meta, vec![("role".to_string(), "a=b".to_string())]);
        assert_eq!((a.min_peers, a.max_peers), (2, 5));
        assert_eq!(
            (a.heartbeat_ms, a.unresponsive_ms, a.dead_ms),
            (250, 1000, 2000)
        );
        assert_eq!((a.backoff_max_ms, a.discovery_ms), (300, 700));
        assert_eq!((a.lost_peer_retry_ms, a.feeler_ms), (5000, 0));
        assert!(a.validate().is_ok());
        let c = a.peer_settings(PeersConfig::default());
        assert_eq!((c.min_peers(), c.max_peers()), (2, 5));
        // The backoff minimum (500 ms) is capped by a smaller maximum.
        c.validate().unwrap();
    }

    #[test]
    fn peer_defaults_match_the_documented_ones() {
        let a = parse(&[]).unwrap();
        assert_eq!((a.min_peers, a.max_peers), (4, 16));
        assert_eq!(
            (a.heartbeat_ms, a.unresponsive_ms, a.dead_ms),
            (2_000, 15_000, 30_000)
        );
        assert_eq!((a.backoff_max_ms, a.discovery_ms), (60_000, 30_000));
        assert_eq!((a.lost_peer_retry_ms, a.feeler_ms), (600_000, 60_000));
    }

    #[test]
    fn contradictory_peer_options_are_refused_naming_the_flags() {
        for (argv, expected) in [
            (
                &["--min-peers", "5", "--max-peers", "3"][..],
                "--min-peers (5) is above --max-peers (3)",
            ),
            (
                &["--max-peers", "0", "--min-peers", "0"],
                "--max-peers must be at least 1",
            ),
            (
                &["--unresponsive-ms", "30000", "--dead-ms", "30000"],
                "--unresponsive-ms (30s) must be shorter than --dead-ms (30s)",
            ),
            (
                &["--heartbeat-ms", "20000"],
                "--heartbeat-ms (up to 20s) must be shorter than --unresponsive-ms (15s)",
            ),
        ] {
            let e = parse(argv).unwrap().validate().unwrap_err();
            assert!(e.contains(expected), "{argv:?}: {e}");
        }
    }

    #[test]
    fn rejects_bad_input_with_clear_messages() {
        let e = parse(&["--listen", "127.0.0.1:7000"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("scheme"), "{e}");
        assert!(parse(&["--seed", "tcp://host"]).is_err());
        let e = parse(&["--seed", "abcd@tcp://127.0.0.1:7000"]).unwrap_err();
        assert!(e.to_string().contains("64 hex digits"), "{e}");
        assert!(parse(&["--meta", "=x"]).is_err());
        assert!(parse(&["--heartbeat-ms", "0"]).is_err());
        assert!(parse(&["--dead-ms", "100000000000"]).is_err());
        assert!(parse(&["--min-peers", "-1"]).is_err());
        assert!(
            parse(&["--ping-interval-ms", "250"]).is_err(),
            "replaced by --heartbeat-ms"
        );
        assert!(parse(&["--admin", "nowhere"]).is_err());
        for topic in [String::new(), "t".repeat(257)] {
            let e = parse(&["--subscribe", &topic]).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains("1 to 256 bytes"), "{e}");
        }
        assert!(parse(&["--admin-allow-remote"]).is_err());
    }

    #[test]
    fn sync_options() {
        let a = parse(&[]).unwrap();
        assert!(!a.no_leasing);
        assert_eq!((a.lease_secs, a.anti_entropy_ms), (3_600, 2_000));
        assert_eq!(a.sync_settings().max_clock_skew(), Duration::from_secs(60));
        assert!(a.sync_settings().leasing());
        assert_eq!(
            a.sync_settings().hello_metadata(),
            ("meshwork.sync.leasing", "on")
        );

        let a = parse(&["--no-leasing", "--anti-entropy-ms", "500"]).unwrap();
        assert!(a.validate().is_ok());
        let c = a.sync_settings();
        assert!(!c.leasing());
        assert_eq!(c.hello_metadata(), ("meshwork.sync.leasing", "off"));
        assert_eq!(a.anti_entropy_ms, 500);

        assert_eq!(a.sync_settings().max_bytes(), 256 << 20);
        let a = parse(&["--kv-max-mib", "1"]).unwrap();
        assert_eq!(a.sync_settings().max_bytes(), 1 << 20);

        let a = parse(&["--max-clock-skew-ms", "1000"]).unwrap();
        assert_eq!(a.sync_settings().max_clock_skew(), Duration::from_secs(1));

        let a = parse(&[]).unwrap();
        assert_eq!(
            a.concerns_settings().routed_window(),
            Duration::from_secs(300)
        );
        let a = parse(&["--routed-window-ms", "90000"]).unwrap();
        assert_eq!(
            a.concerns_settings().routed_window(),
            Duration::from_secs(90)
        );

        let a = parse(&["--lease-secs", "60"]).unwrap();
        assert_eq!(a.lease_secs, 60);
        assert!(a.validate().is_ok());

        for bad in [
            &["--lease-secs", "0"][..],
            &["--lease-secs", "31536001"],
            &["--anti-entropy-ms", "0"],
            &["--anti-entropy-ms", "soon"],
            &["--max-clock-skew-ms", "0"],
            &["--routed-window-ms", "999"],
            &["--kv-max-mib", "0"],
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
        // A lease time means nothing without leasing.
        let e = parse(&["--no-leasing", "--lease-secs", "60"]).unwrap_err();
        assert!(e.to_string().contains("cannot be used with"), "{e}");
    }

    #[test]
    fn rpc_options() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.serve_demo, None);
        assert_eq!((a.rpc_deadline_ms, a.rpc_concurrency), (10_000, 256));
        assert_eq!(a.rpc_deadline(), Duration::from_secs(10));

        // The name is optional; the flag may come last or before another.
        for (argv, name) in [
            (&["--serve-demo"][..], "demo"),
            (&["--serve-demo", "--min-peers", "2"], "demo"),
            (&["--serve-demo", "storage.blobs-2_x"], "storage.blobs-2_x"),
            (&["--serve-demo=calc"], "calc"),
        ] {
            let a = parse(argv).unwrap();
            assert_eq!(a.serve_demo.as_deref(), Some(name), "{argv:?}");
            assert!(a.validate().is_ok());
        }
        let a = parse(&["--rpc-deadline-ms", "250", "--rpc-concurrency", "1"]).unwrap();
        assert_eq!(a.rpc_deadline(), Duration::from_millis(250));
        assert_eq!(a.rpc_concurrency, 1);
        let _ = a.rpc_settings();

        for bad in [
            &["--serve-demo", "bad name"][..],
            &["--serve-demo", ""],
            &["--serve-demo", &"x".repeat(201)],
            &["--rpc-deadline-ms", "0"],
            &["--rpc-concurrency", "0"],
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
        let e = parse(&["--serve-demo", "a/b"]).unwrap_err();
        assert!(e.to_string().contains("invalid service name"), "{e}");
    }

    #[test]
    fn security_options() {
        let id = "ab".repeat(32);
        let a = parse(&[
            "--key",
            "node.key",
            "--network-key",
            "net.key",
            "--allow",
            &id,
            "--allow",
            &"CD".repeat(32),
        ])
        .unwrap();
        assert_eq!(a.key.as_deref(), Some(std::path::Path::new("node.key")));
        assert_eq!(
            a.network_key.as_deref(),
            Some(std::path::Path::new("net.key"))
        );
        assert_eq!(a.allow.len(), 2);
        assert_eq!(a.allow[0].to_string(), id);
        assert_eq!(a.allow[1].to_string(), "cd".repeat(32));
        assert!(!a.insecure);
        assert!(parse(&["--insecure"]).unwrap().insecure);
    }

    #[test]
    fn rejects_bad_security_options() {
        for bad in [
            "abcd".to_string(),
            "ab".repeat(33),
            format!("+{}", "a".repeat(63)),
            format!("{}zz", "a".repeat(62)),
            format!("{}é", "a".repeat(62)),
        ] {
            let e = parse(&["--allow", &bad]).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains("64 hex digits"), "{bad}: {e}");
        }
        // The network key only exists in the encrypted handshake.
        let e = parse(&["--insecure", "--network-key", "net.key"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("cannot be used with"), "{e}");
    }

    #[test]
    fn key_files_are_created_reused_and_never_replaced() {
        let dir = temp_dir("keys");
        let key = dir.join("node.key");
        let key_arg = key.to_str().unwrap();
        let first = load_keys(&parse(&["--key", key_arg]).unwrap()).unwrap();
        let again = load_keys(&parse(&["--key", key_arg]).unwrap()).unwrap();
        assert_eq!(first.identity.node_id(), again.identity.node_id());
        assert!(first.network_key.is_none());
        let ephemeral = load_keys(&parse(&[]).unwrap()).unwrap();
        assert_ne!(ephemeral.identity.node_id(), first.identity.node_id());

        let bad = dir.join("bad.key");
        std::fs::write(&bad, "not a key\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let e = load_keys(&parse(&["--key", bad.to_str().unwrap()]).unwrap()).unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.contains(&bad.display().to_string()) && text.contains("corrupt"),
            "{text}"
        );
        assert_eq!(std::fs::read_to_string(&bad).unwrap(), "not a key\n");

        let missing = dir.join("missing.net");
        let e =
            load_keys(&parse(&["--network-key", missing.to_str().unwrap()]).unwrap()).unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.contains("--network-key") && text.contains(&missing.display().to_string()),
            "{text}"
        );
        assert!(
            !missing.exists(),
            "a network key is never created by `node`"
        );

        let net = dir.join("net.key");
        NetworkKey::create(&net).unwrap();
        let keys = load_keys(&parse(&["--network-key", net.to_str().unwrap()]).unwrap()).unwrap();
        assert!(keys.network_key.is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_seed_on_port_0_is_refused() {
        for seed in [
            "tcp://127.0.0.1:0",
            "tcp://localhost:0",
            &format!("{}@tcp://[::1]:0", "ab".repeat(32)),
        ] {
            let e = parse(&["--seed", seed]).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{seed}");
            assert!(e.to_string().contains("port 0"), "{seed}: {e}");
        }
        assert!(parse(&["--seed", "tcp://127.0.0.1:1"]).is_ok());
    }

    #[test]
    fn advertised_addresses_must_be_dialable() {
        let e = parse(&["--advertise", "tcp://127.0.0.1:0"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("port 0"), "{e}");
        let a = parse(&[
            "--advertise",
            "tcp://node-1.example.org:7000",
            "--advertise",
            "tcp://127.0.0.1:7000",
        ])
        .unwrap();
        assert_eq!(a.advertise.len(), 2);
    }

    #[test]
    fn admin_and_listen_must_not_share_an_address() {
        for argv in [
            &[
                "--listen",
                "tcp://127.0.0.1:27011",
                "--admin",
                "127.0.0.1:27011",
            ][..],
            &[
                "--listen",
                "tcp://0.0.0.0:27011",
                "--admin",
                "127.0.0.1:27011",
            ],
            &[
                "--listen",
                "tcp://localhost:27011",
                "--admin",
                "localhost:27011",
            ],
            &["--listen", "tcp://[::1]:27011", "--admin", "[::1]:27011"],
            &[
                "--listen",
                "tcp://127.0.0.1:7000",
                "--listen",
                "tcp://127.0.0.1:27011",
                "--admin",
                "127.0.0.1:27011",
            ],
        ] {
            let e = parse(argv).unwrap().validate().unwrap_err();
            assert!(
                e.contains("--admin and --listen use the same address"),
                "{argv:?}: {e}"
            );
        }
        for argv in [
            &[
                "--listen",
                "tcp://127.0.0.1:27011",
                "--admin",
                "127.0.0.1:27012",
            ][..],
            &["--listen", "tcp://127.0.0.1:0", "--admin", "127.0.0.1:0"],
            &[
                "--listen",
                "tcp://127.0.0.2:27011",
                "--admin",
                "127.0.0.1:27011",
            ],
            &[
                "--listen",
                "tcp://[::1]:27011",
                "--admin",
                "127.0.0.1:27011",
            ],
        ] {
            let a = parse(argv).unwrap();
            assert!(a.validate().is_ok(), "{argv:?}");
        }
    }

    /// Review: every node of a deployment listening on 0.0.0.0:7000 and
    /// seeded with another host on the same port is refused at start.
    #[test]
    fn a_wildcard_listener_may_seed_another_host_on_the_same_port() {
        for seed in [
            "tcp://192.0.2.10:7000",
            "tcp://seed-1.example.org:7000",
            "tcp://[2001:db8::1]:7000",
        ] {
            let a = parse(&["--listen", "tcp://0.0.0.0:7000", "--seed", seed]).unwrap();
            assert_eq!(a.validate(), Ok(()), "{seed}");
        }
    }

    #[test]
    fn a_node_cannot_seed_itself() {
        let id = "ab".repeat(32);
        let pinned = format!("{id}@tcp://127.0.0.1:7000");
        for argv in [
            &["--seed", "tcp://127.0.0.1:7000"][..],
            &[
                "--listen",
                "tcp://0.0.0.0:7000",
                "--seed",
                "tcp://127.0.0.1:7000",
            ],
            &[
                "--listen",
                "tcp://127.0.0.1:7000",
                "--seed",
                "tcp://localhost:7000",
            ],
            &["--seed", "tcp://127.0.0.1:7001", "--seed", &pinned],
        ] {
            let e = parse(argv).unwrap().validate().unwrap_err();
            assert!(
                e.contains("is this node's own --listen address"),
                "{argv:?}: {e}"
            );
        }
        for argv in [
            &["--seed", "tcp://127.0.0.1:7001"][..],
            &[
                "--listen",
                "tcp://127.0.0.1:0",
                "--seed",
                "tcp://127.0.0.1:7000",
            ],
            &[
                "--listen",
                "tcp://127.0.0.1:7000",
                "--seed",
                "tcp://127.0.0.2:7000",
            ],
            &[
                "--listen",
                "tcp://127.0.0.1:7000",
                "--seed",
                "tcp://example.com:7000",
            ],
        ] {
            let a = parse(argv).unwrap();
            assert!(a.validate().is_ok(), "{argv:?}");
        }
        // With --listen on port 0 the port is known once bound: `run` warns
        // then, checking the bound addresses the same way.
        let a = parse(&[
            "--listen",
            "tcp://127.0.0.1:0",
            "--seed",
            "tcp://127.0.0.1:40123",
        ])
        .unwrap();
        let bound: Vec<Address> = vec!["tcp://127.0.0.1:40123".parse().unwrap()];
        let (seed, listen) = seed_on_own_address(&a.seed, &bound).unwrap();
        assert_eq!((&seed.addr, listen), (&bound[0], &bound[0]));
        assert!(seed_on_own_address(&a.seed, &a.listen).is_none());
        let mem: Vec<Address> = vec!["mem://a".parse().unwrap()];
        let mem_seed = [Seed {
            addr: "mem://a".parse().unwrap(),
            id: None,
        }];
        assert!(seed_on_own_address(&mem_seed, &mem).is_some());
    }

    #[test]
    fn admin_must_be_loopback_unless_allowed() {
        let a = parse(&["--admin", "0.0.0.0:7100"]).unwrap();
        assert!(a.validate().unwrap_err().contains("--admin-allow-remote"));
        let a = parse(&["--admin", "0.0.0.0:7100", "--admin-allow-remote"]).unwrap();
        assert!(a.validate().is_ok());
        let a = parse(&["--admin", "[::1]:0"]).unwrap();
        assert!(a.validate().is_ok());
    }
}
