//! `cargo xtask test-mesh [--nodes N] [--scenario NAME]... [--release] [--keep-logs]`
//!
//! Starts a real mesh of `meshwork node` processes on loopback (OS-chosen
//! ports) and drives it through the nodes' admin HTTP API. The node contract
//! this relies on:
//!
//! * `meshwork node --listen tcp://127.0.0.1:0 --admin 127.0.0.1:0 --network NAME
//!   [--seed ADDR]... [--meta KEY=VALUE]... [--min-peers N] [--max-peers N]
//!   [--heartbeat-ms MS] [--unresponsive-ms MS] [--dead-ms MS] [--backoff-max-ms MS]
//!   [--discovery-ms MS]`; test-mesh passes short timings ([`NODE_TIMINGS`]) and
//!   the mesh's peer limits ([`PeerLimits::for_mesh`]) to every node.
//! * when ready the node prints exactly one stdout line:
//!   `{"event":"ready","node_id":"<hex>","listen":["tcp://..."],"admin":"127.0.0.1:PORT"}`;
//!   logs go to stderr.
//! * `GET /status` returns `{"node_id","network_id","security","handshakes_ok",
//!   "handshake_failures":{"<cause>":N,...},"rejected_busy","evicted_handshakes",
//!   "pending_handshakes","listen","uptime_secs","connections":[
//!   {"node_id","addr","direction","listen_addrs","rtt_ms","smoothed_rtt_ms","age_secs",
//!   "frames_sent","frames_received"}],"pool":{"connected","inbound","outbound",
//!   "pending_dials","known","dropped_inbound","min_peers","max_peers"},"peers":[
//!   {"node_id","state","via","hops","direction","addr","listen","rtt_ms","srtt_ms","errors",
//!   "timeouts","score","connected_secs","idle_ms","dial_failures","metadata"}],
//!   "blocked":["<hex>"]}`;
//!   `security` is `"noise"` unless the node was started with `--insecure` (test-mesh
//!   never does). `peers` lists every peer the node knows, connected ones first;
//!   `state` is one of [`PEER_STATES`]; `via` (hex) and `hops` are set exactly when it is
//!   `"routed"` (reached through the routing table, not linked).
//! * `POST /peers/{id}/disconnect` (200, 404 if not connected, 400 for a bad id),
//!   `POST /peers/{id}/block` and `/unblock` (200): a blocked peer is disconnected
//!   and refused until unblocked (test-mesh partitions the mesh with it).
//! * `POST /shutdown` (or SIGTERM / Ctrl-C) shuts down gracefully and exits 0.
//! * `meshwork node --key FILE` loads or creates (mode 0600) the node key, whose public
//!   half is the node id; `--network-key FILE` makes the node refuse (and be refused by)
//!   nodes without the same key; `meshwork keygen --network-key FILE` creates such a key,
//!   exits 0, and exits 1 without touching FILE if it exists.
//! * Concerns (protocol.md section 10): every node has an `echo` concern (command
//!   [`ECHO_COMMAND`]) that records what it is handed and replies with the payload;
//!   `meshwork node --subscribe TOPIC` (repeatable) subscribes it to topics.
//!   `POST /broadcast` and `POST /publish/{topic}` (body: the payload text) answer 200
//!   `{"message_id":N}`; `POST /request/{node_id}?timeout_ms=N` sends the body to that
//!   node's echo concern by routing and answers 200 `{"reply","elapsed_ms"}`, or
//!   `{"error","code"}` with 404 `unreachable`, 504 `timeout`, 502 `remote`, 400 for a
//!   bad id. `GET /events?since=SEQ` returns what the node's concerns recorded:
//!   `{"events":[{"seq","kind","from","topic","payload","at_ms"}],"next"}`, `kind`
//!   one of [`EVENT_KINDS`]. `/status` also has `"concerns":[{"command","name",
//!   "requests","replies","errors","panics","dropped","in_flight","queued"}]`,
//!   `"routes":[{"target","next_hop","hops","age_ms"}]`, `"builtin":{"flood":{..},
//!   "routing":{..},"topics":{..}}`, `"subscriptions":["<topic>"]` and
//!   `"unknown_commands"`.
//! * The replicated map (docs/sync.md): `meshwork node --anti-entropy-ms MS` (test-mesh
//!   passes 500), leasing on (the default, 1 hour). `PUT /kv/{key}[?ttl_ms=N]` (body: the
//!   value; with `ttl_ms` an ephemeral key that vanishes everywhere `ttl_ms` after its
//!   writer stops refreshing it) answers 200 `{"version":N}`; `GET /kv/{key}` 200
//!   `{"key","value","version","writer","lease":{"owner","until_ms","epoch"}|null,
//!   "expires_at_ms"}` or 404; `DELETE /kv/{key}` 200 `{"deleted":true}` or 404;
//!   `POST /kv/{key}/release` 200; `POST /kv/{key}/confirm?timeout_ms=N` 200
//!   `{"peers":N}`; a write to a key whose live lease another node holds answers 409
//!   `{"error","code":"lease_held","owner","until_ms"}`. `GET /kv?prefix=P` answers
//!   `{"items":[{"key","value","version","writer"}],"count"}` sorted by key, `GET
//!   /kv-digest` `{"digest":"<16 hex>","keys","entries"}` (equal digests: identical
//!   replicas), and `/status` has `"sync":{"leasing","keys","entries","digest",
//!   "lease_lost",..}`.
//! * Services (docs/rpc.md): `meshwork node --serve-demo [NAME]` serves the demo service
//!   (methods [`DEMO_METHODS`]; `NAME` defaults to `demo`). `POST
//!   /rpc/{service}/{method}?deadline_ms=N[&idempotent=true][&version=V]` with the arguments
//!   as a JSON array calls it from that node: 200 `{"result":<json>,"elapsed_ms"}`, or
//!   `{"error","code"}` with `code` one of [`RPC_ERROR_CODES`]: 404 `no_provider` (at once)
//!   or `unknown_method`, 504 `timeout`, 409 `version_mismatch` (with `wanted`, `served`),
//!   503 `disconnected` or `overloaded`, 422 `application` (with `application`: the method's
//!   error as JSON; the demo's `fail` gives `{"refused":{"message":..}}`), 400 `decode`.
//!   `GET /rpc/{service}/providers` answers `{"service","providers":[{"node_id","reach",
//!   "version","methods","latency_ms","in_flight"}]}`, `reach` one of [`RPC_REACHES`]. `/status` has
//!   `"served":[{"name","version","methods","calls","errors","overloaded","cancelled",
//!   "in_flight","relisted"}]` and `"calls":{"calls","failures","retries"}`.
//!
//! Node 0 starts first; the others get `--seed <node 0's listen address>` and
//! find the rest of the mesh through it.
//! Scenarios run in registry order ([`SCENARIOS`]) against the same mesh, so
//! destructive scenarios go last and every scenario first waits for its own
//! preconditions. Every wait has a deadline. All started processes are killed
//! when the [`Mesh`] guard is dropped, including on error and panic.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;

use crate::{cargo, display_cmd, fmt_duration, target_dir, usage};

mod hog;
use hog::{Hog, HogCounts};

/// How long a node may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a scenario condition may take to hold.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(30);
/// How often `/status` is polled while waiting for a condition.
const POLL_INTERVAL: Duration = Duration::from_millis(150);
/// How long a node may take to exit after being asked to shut down.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long peers may keep listing a node that shut down.
const PEER_DROP_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of each admin API request.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a node with another network key is watched for sneaking in.
const OUTSIDER_WINDOW: Duration = Duration::from_secs(3);
/// How long a short CLI command (`meshwork keygen`) may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the survivors of a crash may take to repair their mesh, and a
/// healed partition to become one mesh again.
const REPAIR_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the peer limit of the `limits` node is watched while dialers
/// arrive, before waiting for the group to settle (also watched).
const LIMIT_WINDOW: Duration = Duration::from_secs(3);
/// How long a partition is watched for links sneaking across it.
const PARTITION_WINDOW: Duration = Duration::from_secs(2);

/// Peer-manager and sync timings given to every node (the defaults are
/// 2000, 15000, 30000, 60000, 30000 and 2000 ms): failures show and the mesh
/// repairs within seconds, and replicas are compared every 500 ms.
const NODE_TIMINGS: &[(&str, &str)] = &[
    ("--heartbeat-ms", "200"),
    ("--unresponsive-ms", "1500"),
    ("--dead-ms", "3000"),
    ("--backoff-max-ms", "1000"),
    ("--discovery-ms", "1000"),
    ("--anti-entropy-ms", "500"),
    // One machine, one clock: tombstones of expired registry entries go
    // their ttl (10 s) plus 2 s after the expiry (`churn` checks it).
    ("--max-clock-skew-ms", "1000"),
];
/// How long a broadcast, publication or request may take to be recorded by
/// the nodes it is meant for.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the nodes' `/events` are then watched for duplicates and for
/// deliveries to nodes that should get nothing.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(1);
/// `timeout_ms` of the routed requests the `route` scenario sends.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How much longer than its `timeout_ms` a `POST /request` may take to answer.
const REQUEST_SLACK: Duration = Duration::from_secs(2);
/// The nodes' route search timeout (the routing concern's default). A
/// search for a node nobody can reach ends sooner, once every node has
/// answered "not through me"; only a silent node makes it wait this long.
const ROUTE_SEARCH_TIMEOUT: Duration = Duration::from_secs(3);

/// The command id of the nodes' `echo` concern.
const ECHO_COMMAND: u64 = 0x100;
/// The kinds of `/events` entries.
const EVENT_KINDS: &[&str] = &["broadcast", "request", "publication"];
/// The built-in concerns `/status` reports under `builtin`.
const BUILTIN_CONCERNS: &[&str] = &["flood", "routing", "topics"];
/// Nodes in the line the `route` and `topics` scenarios build.
const LINE_NODES: usize = 5;
/// Peer limits of the nodes of that line: an inner node takes its
/// predecessor (its seed) and its successor, and wants no more.
const LINE_LIMITS: PeerLimits = PeerLimits { min: 1, max: 2 };
/// Topics of the `topics` scenario: who subscribes to what, by position in
/// its line (the publisher, position 0, subscribes to nothing).
const TOPIC: &str = "test-mesh-x";
const OTHER_TOPIC: &str = "test-mesh-y";
const LINE_SUBSCRIPTIONS: [&[&str]; LINE_NODES] =
    [&[], &[], &[TOPIC], &[OTHER_TOPIC], &[TOPIC, OTHER_TOPIC]];

/// Writes the `kv` scenario spreads over the nodes.
const KV_WRITES: usize = 1000;
/// Keys written before the `late-join` node starts.
const LATE_JOIN_KEYS: usize = 200;
/// Keys both halves of the `kv-partition` scenario write, each its own value.
const SPLIT_CONFLICTS: usize = 40;
/// Keys each half of the `kv-partition` scenario writes alone.
const SPLIT_OWN_KEYS: usize = 10;
/// Keys one half writes before the `kv-partition` split and deletes during it.
const SPLIT_DELETES: usize = 10;
/// Ephemeral keys of the `kv-kill` scenario, and their time to live.
const EPHEMERAL_KEYS: usize = 10;
const EPHEMERAL_TTL: Duration = Duration::from_secs(3);
/// How long after the ttl a dead node's ephemeral keys may linger.
const EPHEMERAL_SLACK: Duration = Duration::from_secs(3);
/// How far a node's clock may trail the harness's when an expiry it set is
/// compared with the harness's clock.
const CLOCK_SKEW: Duration = Duration::from_millis(100);
/// How long writes may take to reach every node, replicas to agree after a
/// heal, or a late joiner to catch up.
const KV_TIMEOUT: Duration = Duration::from_secs(10);
/// How long replicas are watched for keys coming back after they agreed.
const KV_STABLE_WINDOW: Duration = Duration::from_secs(1);
/// `timeout_ms` of `POST /kv/{key}/confirm`.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// The methods of the demo service (`meshwork node --serve-demo [NAME]`),
/// in order.
const DEMO_METHODS: &[&str] = &["echo", "add", "fail", "sleep", "whoami"];
/// The name `--serve-demo` serves it under by default (the `rpc` scenario
/// uses it).
const DEMO_SERVICE: &str = "demo";
/// The names the other rpc scenarios serve it under: each its own, so that
/// a provider one scenario killed (listed until its registry entry
/// expires) never answers another's calls.
const RPC_ROUTE_SERVICE: &str = "tm.rpc-route";
const RPC_ERRORS_SERVICE: &str = "tm.rpc-errors";
const RPC_FAILOVER_SERVICE: &str = "tm.rpc-failover";
/// The `reach` of a provider in `GET /rpc/{service}/providers`.
const RPC_REACHES: &[&str] = &["local", "neighbour", "routed"];
/// The `code` of a failed `POST /rpc`: the RPC error labels, and
/// `bad_request` for what the admin API refuses itself.
const RPC_ERROR_CODES: &[&str] = &[
    "no_provider",
    "timeout",
    "cancelled",
    "unknown_service",
    "unknown_method",
    "version_mismatch",
    "overloaded",
    "disconnected",
    "decode",
    "internal",
    "application",
    "local",
    "bad_request",
];
/// `deadline_ms` of the rpc scenarios' calls.
const RPC_DEADLINE: Duration = Duration::from_secs(5);
/// How much longer than its `deadline_ms` a `POST /rpc` may take to answer.
const RPC_SLACK: Duration = Duration::from_secs(2);
/// How long a provider may take to be listed by every node.
const REGISTRY_TIMEOUT: Duration = Duration::from_secs(10);
/// A call to a service nobody serves must fail within this.
const NO_PROVIDER_LIMIT: Duration = Duration::from_secs(1);
/// The `rpc-errors` sleep: this long, with this deadline, answered (504)
/// within this, and counted cancelled by the provider within this again.
const SLEEP_MS: u64 = 5_000;
const SLEEP_DEADLINE: Duration = Duration::from_millis(300);
const SLEEP_ANSWER_LIMIT: Duration = Duration::from_secs(1);
/// The `rpc-failover` stream: calls, the threads making them, one call
/// every pace, each with this deadline; a failed call must have been
/// running at the kill (started before it plus the grace).
const FAILOVER_CALLS: usize = 200;
const FAILOVER_WORKERS: usize = 4;
const FAILOVER_PACE: Duration = Duration::from_millis(10);
const FAILOVER_DEADLINE: Duration = Duration::from_secs(2);
const FAILOVER_GRACE: Duration = Duration::from_secs(1);
/// One call in three of the stream sleeps this long, so that calls are
/// running when the provider dies.
const FAILOVER_SLEEP_MS: u64 = 50;
/// The service the `rpc-partition` scenario's provider serves.
const RPC_PARTITION_SERVICE: &str = "tm.rpc-partition";
/// `deadline_ms` of the calls made across the `rpc-partition` cut.
const PARTITION_CALL_DEADLINE: Duration = Duration::from_secs(3);
/// Time from the cut for the other half to forget the provider's registry
/// entry: the registry ttl (10 s) since the provider's last refresh that
/// reached it, plus slack.
const PARTITION_FORGET_TIMEOUT: Duration = Duration::from_secs(20);
/// The service the `churn` scenario's stable provider serves ...
const CHURN_SERVICE: &str = "tm.churn";
/// ... and the one its short-lived nodes serve.
const CHURNER_SERVICE: &str = "tm.churner";
/// Rounds of `churn`: each starts this many nodes, ...
const CHURN_ROUNDS: usize = 6;
const CHURNERS_PER_ROUND: usize = 3;
/// ... lets them run this long, then kills one in two (-9) and shuts the
/// others down.
const CHURN_LIFETIME: Duration = Duration::from_millis(500);
/// Time for every node to forget the short-lived nodes' registry entries:
/// the registry ttl (10 s) for the killed ones, plus slack.
const CHURN_REGISTRY_TIMEOUT: Duration = Duration::from_secs(15);
/// Time after that for every node to forget the tombstones of those
/// entries: the registry ttl plus twice the clock skew (1 s), plus slack.
const CHURN_TOMBSTONE_TIMEOUT: Duration = Duration::from_secs(20);
/// The service the `soak` scenario calls.
const SOAK_SERVICE: &str = "tm.soak";
/// How long the `soak` scenario loads the mesh unless told (`--soak-secs`).
const DEFAULT_SOAK: Duration = Duration::from_secs(10);
/// The longest `--soak-secs`: a day.
const MAX_SOAK_SECS: u64 = 24 * 60 * 60;
/// Each `soak` thread PUTs a key every this many echo calls ...
const SOAK_PUT_EVERY: usize = 5;
/// ... cycling through this many keys of its own ...
const SOAK_KEYS: usize = 100;
/// ... and broadcasts every this many.
const SOAK_BROADCAST_EVERY: usize = 50;
/// The RSS samples the `soak` scenario takes over its load, about.
const SOAK_SAMPLES: u32 = 30;
/// A node's RSS may reach this many times its RSS after the first third
/// of the load (a leak of a few hundred bytes per operation passes it
/// within minutes), ...
const SOAK_GROWTH_LIMIT: u64 = 4;
/// ... and never this many KiB.
const SOAK_RSS_LIMIT_KIB: u64 = 256 * 1024;

/// The peer states `/status` may report.
const PEER_STATES: &[&str] = &[
    "known",
    "connecting",
    "connected",
    "unresponsive",
    "disconnected",
    "banned",
    "routed",
];
/// `--max-peers` of the node the `limits` scenario fills.
const LIMITED_MAX_PEERS: usize = 2;
/// How many nodes dial the limited node in the `limits` scenario.
const LIMIT_DIALERS: usize = 6;
/// Peer limits of those dialers.
const DIALER_LIMITS: PeerLimits = PeerLimits { min: 3, max: 6 };

const DEFAULT_NODES: usize = 5;
const MIN_NODES: usize = 2;
const MAX_NODES: usize = 64;

const HELP: &str = "\
cargo xtask test-mesh [--nodes N] [--scenario NAME]... [--soak-secs S] [--release] [--keep-logs]

Builds the node (`cargo build -p meshwork-cli`), starts N `meshwork node`
processes on loopback (node 0 first, the others seeded with node 0's address),
runs the scenarios against them through their admin HTTP API, then shuts
every node down. Exits non-zero if any scenario fails.

OPTIONS:
    --nodes N           Number of nodes, 2..=64 (default 5)
    --scenario NAME     Run only this scenario (repeatable; default: all)
    --soak-secs S       How long the `soak` scenario loads the mesh, 1..=86400
                        (default 10); e.g. `--scenario soak --soak-secs 600`
    --release           Build and test the release binary
    --keep-logs         Keep the node logs even when everything passes
                        (they are always kept on failure)
    --node-bin PATH     Use this node binary instead of building meshwork-cli
    --list              List the scenarios and exit

Node logs (stderr): <target>/test-mesh/<run-id>/node-<i>.log (the key files the
scenarios create are in the same directory)
";

/// What `cargo xtask test-mesh` was asked to do.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// Number of nodes to start.
    pub(crate) nodes: usize,
    /// Scenario names to run; empty means all.
    pub(crate) scenarios: Vec<String>,
    /// Build with `--release`.
    pub(crate) release: bool,
    /// Keep the log directory on success.
    pub(crate) keep_logs: bool,
    /// Use this binary instead of building `meshwork-cli`.
    pub(crate) node_bin: Option<PathBuf>,
    /// How long the `soak` scenario keeps the mesh under load.
    pub(crate) soak: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: DEFAULT_NODES,
            scenarios: Vec::new(),
            release: false,
            keep_logs: false,
            node_bin: None,
            soak: DEFAULT_SOAK,
        }
    }
}

/// A named check run against a live mesh. `run` returns a one-line summary
/// on success; its error is the reason for the failure.
struct Scenario {
    name: &'static str,
    about: &'static str,
    run: fn(&mut Mesh) -> Result<String>,
}

/// The scenario registry, in run order. Scenarios share one mesh, so ones
/// that stop nodes go last; each waits for its own preconditions. `kill`
/// comes before `partition` so that it meets the sparse mesh `join` formed
/// (a healed partition redials every lost link: a full mesh, where a kill
/// leaves no node short of peers). The kv scenarios write keys of their
/// own (a unique prefix each) and compare whole replicas, so they work
/// whatever ran before; `late-join` and `kv-kill` start (and stop) a node
/// of their own. The rpc scenarios start their own providers (and stop or
/// kill them), each under its own service name; `rpc-failover`'s killed
/// provider stays in the registry (an ephemeral key) for its 10 s ttl.
const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "handshake",
        about: "node 0 lists exactly the other nodes, they all list node 0, every connection \
                carries the peer's listen address, and node 0 measures an RTT to each peer",
        run: scenario_handshake,
    },
    Scenario {
        name: "join",
        about: "seeded only with node 0, every node finds enough others to reach --min-peers \
                connected peers; the \"connected\" peers of all /status form one connected, \
                symmetric graph, and each node's connections, peers and pool counters agree",
        run: scenario_join,
    },
    Scenario {
        name: "flood",
        about: "POST /broadcast from a node farthest from some other (fewest peers on a tie): \
                every other node's /events \
                records it exactly once (kind broadcast, from the origin, same payload) within \
                10 s and still once 1 s later; the origin records nothing, and no node counts a \
                forged or stale flood (signatures and stamps hold between processes)",
        run: scenario_flood,
    },
    Scenario {
        name: "route",
        about: "5 new nodes in a line (each seeded with the previous, --min-peers 1 \
                --max-peers 2; the first --max-peers 1, or it would close the line into a \
                ring): the first one's POST /request to the last gets the echo back, only \
                the last records the request, and the first's /status routes list the last \
                4 hops away through the second, its peer table showing the last as routed \
                (via the second, 4 hops); a request to an unknown id answers 404 \
                unreachable within its timeout_ms, a bad id 400",
        run: scenario_route,
    },
    Scenario {
        name: "topics",
        about: "5 new nodes in a line, the 3rd and 5th started with --subscribe X, the 4th with \
                another topic: a POST /publish/X from the 1st reaches the 3rd and 5th exactly \
                once (kind publication, topic X, from the 1st) and no other node records it",
        run: scenario_topics,
    },
    Scenario {
        name: "kv",
        about: "1000 PUT /kv/{key} spread round robin over the nodes, one writer thread per \
                node: within 10 s every node's /kv-digest is the same with 1000 more keys, \
                every node lists the 1000 with the right values, writers and versions, and a \
                sample of GET /kv/{key} on every node shows value, writer and its lease",
        run: scenario_kv,
    },
    Scenario {
        name: "lease",
        about: "node A PUTs a key (POST /kv/{key}/confirm: every neighbour applied it); once \
                node B sees it, B's PUT, DELETE and release answer 409 lease_held naming A; \
                after A's release, B's PUT succeeds with a higher version, every node reads \
                B's value and lease, and A's PUT is now the one refused",
        run: scenario_lease,
    },
    Scenario {
        name: "late-join",
        about: "200 keys written over the mesh; a new node seeded with one node then reaches \
                the same /kv-digest as every other node within 10 s and lists the 200 keys",
        run: scenario_late_join,
    },
    Scenario {
        name: "rpc",
        about: "a new node seeded with node 0 serves the demo service (--serve-demo, as `demo`): \
                within 10 s every node's GET /rpc/demo/providers lists it (local on itself); \
                POST /rpc/demo/echo from every node returns the echo, add from each returns \
                the running total of the provider's one counter, whoami names the provider, \
                and the provider's /status served and the callers' calls count them",
        run: scenario_rpc,
    },
    Scenario {
        name: "rpc-route",
        about: "5 new nodes in a line as in `route`, the last serving the demo service: every \
                node lists it (routed, routed, routed, neighbour, local); the first's echo and \
                whoami reach it 4 hops away, its /status routes list the last 4 hops away \
                through the second, and the provider is listed as routed with a latency",
        run: scenario_rpc_route,
    },
    Scenario {
        name: "rpc-errors",
        about: "a new node serves the demo service; from a neighbour of it: an unknown service \
                answers 404 no_provider within 1 s, an unknown method 404 unknown_method, fail \
                422 application with the typed error as JSON, bad arguments 400 decode, \
                version 2 409 version_mismatch, and sleep(5000) with deadline_ms=300 504 \
                timeout within 1 s, the provider's /status counting it cancelled with nothing \
                in flight within 1 s more",
        run: scenario_rpc_errors,
    },
    Scenario {
        name: "rpc-failover",
        about: "two new nodes serve the demo service under one name, both seeded with the node \
                with the most room for inbound peers; that node, a neighbour of both, makes 200 calls \
                (whoami and sleep(50) idempotent, echo not) on 4 threads, one every 10 ms, and \
                a provider is killed (-9) midway while it runs calls: every call answers within \
                its deadline_ms (2000) plus 2 s, at most the 4 in flight at the kill fail and \
                only with disconnected or timeout, and whoami after the kill names the survivor",
        run: scenario_rpc_failover,
    },
    Scenario {
        name: "churn",
        about: "a new node serves the demo service; while each of its neighbours keeps \
                calling it (with PUTs and broadcasts, as in `soak`), 6 rounds of 3 new nodes \
                with fresh identities, each serving a service of their own, join and leave \
                after 0.5 s (kill -9 for one in two, POST /shutdown for the others): no \
                operation fails, no node lists any of them within 20 s, their registry entries \
                are gone from every node within 15 s and the tombstones of those entries within \
                20 s more (ttl 10 s plus twice the --max-clock-skew-ms of 1 s test-mesh sets), \
                and the others are one connected mesh again",
        run: scenario_churn,
    },
    Scenario {
        name: "soak",
        about: "a new node serves the demo service; for --soak-secs (default 10) one thread \
                per other node keeps calling echo through that node's admin API, PUTs one of \
                100 keys of its own every 5th call and broadcasts every 50th: no operation \
                fails, afterwards every node has the same /kv-digest within 10 s, and no \
                node's resident memory (VmRSS) passes 4× what it was after the first third \
                of the load, nor 256 MiB",
        run: scenario_soak,
    },
    Scenario {
        name: "network-key",
        about: "a node with a network key (from `meshwork keygen --network-key`) seeding node 0, \
                which has none, never appears in node 0's /status for 3 s, node 0 counts \
                crypto handshake failures, and the rest of the mesh is unaffected",
        run: scenario_network_key,
    },
    Scenario {
        name: "spec-peer",
        about: "tools/pypeer.py, a peer written in Python from docs/protocol.md alone, against \
                two new plaintext nodes of their own (--insecure, the first serving the demo \
                service): preamble, Hello, Ping, Discovered, the echo concern, a flood and \
                its signature, the replicated map's messages, RPC with the JSON codec, a \
                routed request to the second node, Disconnect, and the refusals of bad \
                handshakes and frames (--negative) all pass, so the spec still describes \
                the node",
        run: scenario_spec_peer,
    },
    Scenario {
        name: "persistent-identity",
        about: "a node started with --key FILE (created 0600) keeps its node id across a \
                restart, and node 0 lists it again under that id",
        run: scenario_persistent_identity,
    },
    Scenario {
        name: "pinned-seed",
        about: "a node started with --seed ID@ADDR naming node 0's address but another \
                node's id never connects to node 0 for 3 s, counts unexpected_peer \
                handshake failures and says why in its /status seeds; one started with \
                node 0's own id connects",
        run: scenario_pinned_seed,
    },
    Scenario {
        name: "limits",
        about: "a new node with --max-peers 2, dialled by 6 new nodes seeded only with it, \
                never has more than 2 connected peers and ends with exactly 2, declining the \
                others in the handshake; the dialers learn each other from its refusals and \
                the 7 form one connected graph",
        run: scenario_limits,
    },
    Scenario {
        name: "handshake-hog",
        about: "a new node with no seeds; one host holds 64 silent TCP connections to it (all \
                its handshake slots; 8 more from that host are refused at once) and reopens \
                any it closes: a node seeded only with it still becomes its peer within 3 s \
                when the hog is another host (127.0.0.2), and within 10 s when it is the \
                newcomer's own host (127.0.0.1: a stale handshake goes after 5 s, half the \
                handshake timeout); the node counts the evictions",
        run: scenario_handshake_hog,
    },
    Scenario {
        name: "kill",
        about: "kill -9 a node (not node 0; the one whose loss leaves most nodes short of \
                --min-peers): within 5 s no node lists it as connected, and within 20 s the \
                survivors are one connected graph again with --min-peers peers each (as far \
                as enough nodes remain)",
        run: scenario_kill,
    },
    Scenario {
        name: "partition",
        about: "POST /peers/{id}/disconnect answers 200/404/400 and the mesh repairs; then \
                every node blocks (POST /peers/{id}/block) the nodes of the other half: no \
                link crosses the halves for 2 s and each half is connected; after unblocking, \
                the whole mesh is one connected graph again within 20 s",
        run: scenario_partition,
    },
    Scenario {
        name: "kv-partition",
        about: "(the issue's kv `partition`) one half writes keys, then the halves block each \
                other (POST /peers/{id}/block): both halves PUT the same 40 fresh keys with \
                their own values (all accepted) and 10 keys of their own, and the first half \
                deletes the keys it wrote before; after unblocking, within 10 s every \
                /kv-digest is the same and stays so for 1 s, each contested key has one \
                value, writer and lease owner on every node, each losing writer counted one \
                lease_lost per key it lost, and no deleted key is back anywhere",
        run: scenario_kv_partition,
    },
    Scenario {
        name: "rpc-partition",
        about: "a new node serves the demo service as tm.rpc-partition; the halves block each \
                other, the provider in the first: calls from the first half keep answering, a \
                call from the second answers a typed error (disconnected, timeout or \
                no_provider) within its deadline, and within the registry ttl (10 s) plus \
                slack no node of the second half lists the provider and a call there answers \
                no_provider at once; after unblocking, every node lists the provider again \
                and calls from the second half answer, whoami naming the provider",
        run: scenario_rpc_partition,
    },
    Scenario {
        name: "kv-kill",
        about: "(the issue's kv `kill`) a new node PUTs 10 keys with ttl_ms=3000: every node \
                lists them, and still does 4 s later (the writer refreshes them); after kill -9 \
                of the writer no node has any of them within 3 s + 3 s, and the survivors' \
                digests agree",
        run: scenario_kv_kill,
    },
    Scenario {
        name: "kv-full",
        about: "a new node started with --kv-max-mib 1 while node 0 PUTs 400 keys of 4000 \
                bytes (1.6 MB): every other node lists all 400 within 10 s; the small node \
                holds what fits (/status sync.bytes at most its max_bytes, not all 400 keys, \
                refused_full counting the rest), answers a PUT of a new key with 507 full, and stays \
                connected",
        run: scenario_kv_full,
    },
    Scenario {
        name: "graceful-shutdown",
        about: "POST /shutdown to the last node: it exits 0 within 10 s and every node that \
                listed it (usually node 0 among them) stops listing it within 5 s",
        run: scenario_graceful_shutdown,
    },
];

/// Parses the command line of `cargo xtask test-mesh` and runs it.
pub(crate) fn run_cli(args: &[String]) -> Result<()> {
    let Some(opts) = parse_args(args)? else {
        return Ok(());
    };
    run(&opts)
}

/// `Ok(None)`: help or the scenario list was printed, nothing to run.
fn parse_args(args: &[String]) -> Result<Option<Options>> {
    let mut opts = Options::default();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| -> Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => args
                    .next()
                    .cloned()
                    .ok_or_else(|| usage(format!("test-mesh: {name} needs a value"))),
            }
        };
        match flag {
            "-h" | "--help" => {
                print!("{HELP}\nSCENARIOS (run in this order):\n");
                for s in SCENARIOS {
                    println!("    {:<20}{}", s.name, s.about);
                }
                return Ok(None);
            }
            "--list" => {
                for s in SCENARIOS {
                    println!("{:<20} {}", s.name, s.about);
                }
                return Ok(None);
            }
            "--nodes" | "-n" => {
                let v = value("--nodes")?;
                opts.nodes = v
                    .parse()
                    .map_err(|_| usage(format!("test-mesh: --nodes: `{v}` is not a number")))?;
            }
            "--scenario" => opts.scenarios.push(value("--scenario")?),
            "--node-bin" => opts.node_bin = Some(PathBuf::from(value("--node-bin")?)),
            "--soak-secs" => {
                let v = value("--soak-secs")?;
                let secs: u64 = v
                    .parse()
                    .map_err(|_| usage(format!("test-mesh: --soak-secs: `{v}` is not a number")))?;
                if !(1..=MAX_SOAK_SECS).contains(&secs) {
                    return Err(usage(format!(
                        "test-mesh: --soak-secs must be between 1 and {MAX_SOAK_SECS}, got {secs}"
                    )));
                }
                opts.soak = Duration::from_secs(secs);
            }
            "--release" if inline.is_none() => opts.release = true,
            "--keep-logs" if inline.is_none() => opts.keep_logs = true,
            _ => return Err(usage(format!("test-mesh: unexpected argument `{arg}`"))),
        }
    }
    check_options(&opts)?;
    Ok(Some(opts))
}

fn check_options(opts: &Options) -> Result<()> {
    if !(MIN_NODES..=MAX_NODES).contains(&opts.nodes) {
        return Err(usage(format!(
            "test-mesh: --nodes must be between {MIN_NODES} and {MAX_NODES}, got {}",
            opts.nodes
        )));
    }
    select_scenarios(&opts.scenarios).map(|_| ())
}

/// The scenarios to run, in registry order, without duplicates.
fn select_scenarios(names: &[String]) -> Result<Vec<&'static Scenario>> {
    for name in names {
        if !SCENARIOS.iter().any(|s| s.name == name) {
            let known: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
            return Err(usage(format!(
                "test-mesh: unknown scenario `{name}` (known: {})",
                known.join(", ")
            )));
        }
    }
    Ok(SCENARIOS
        .iter()
        .filter(|s| names.is_empty() || names.iter().any(|n| n == s.name))
        .collect())
}

/// Runs test-mesh: build, start the mesh, run the scenarios, shut down.
/// Returns an error if anything failed (after printing the details).
pub(crate) fn run(opts: &Options) -> Result<()> {
    check_options(opts)?;
    let scenarios = select_scenarios(&opts.scenarios)?;
    let bin = match &opts.node_bin {
        Some(bin) => {
            ensure!(bin.is_file(), "--node-bin {}: no such file", bin.display());
            bin.clone()
        }
        None => build_node(opts.release)?,
    };

    let pid = std::process::id();
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let run_id = format!("{pid}-{secs}");
    let network = format!("test-mesh-{pid}");
    let log_dir = target_dir().join("test-mesh").join(&run_id);
    fs::create_dir_all(&log_dir)
        .with_context(|| format!("cannot create log directory {}", log_dir.display()))?;

    println!(
        "test-mesh: {} nodes, network {network}, binary {}, logs in {}",
        opts.nodes,
        bin.display(),
        log_dir.display()
    );

    let outcome = run_scenarios(&bin, opts, &network, &log_dir, &scenarios);
    match outcome {
        Ok(()) => {
            if opts.keep_logs {
                println!("test-mesh: logs kept in {}", log_dir.display());
            } else if let Err(e) = fs::remove_dir_all(&log_dir) {
                eprintln!("warning: could not remove {}: {e}", log_dir.display());
            }
            Ok(())
        }
        Err(err) => {
            print_logs_on_failure(&log_dir, opts.nodes);
            Err(err.context(format!(
                "test-mesh failed; node logs kept in {}",
                log_dir.display()
            )))
        }
    }
}

/// Starts the mesh and runs the scenarios; always stops every node.
fn run_scenarios(
    bin: &Path,
    opts: &Options,
    network: &str,
    log_dir: &Path,
    scenarios: &[&'static Scenario],
) -> Result<()> {
    let started = Instant::now();
    let nodes = opts.nodes;
    let limits = PeerLimits::for_mesh(nodes);
    let mut mesh = Mesh::new(bin, network, log_dir, limits);
    mesh.soak = opts.soak;
    mesh.start(nodes)?;
    println!(
        "test-mesh: {nodes} nodes ready in {}",
        fmt_duration(started.elapsed())
    );
    for node in &mesh.nodes {
        println!(
            "  node {:<2} {} listen {} admin {}",
            node.index,
            short_id(&node.ready.node_id),
            node.ready.listen.join(","),
            node.ready.admin
        );
    }

    let mut failed = Vec::new();
    for scenario in scenarios {
        println!("\n--- scenario {}: {}", scenario.name, scenario.about);
        let t = Instant::now();
        let result = (scenario.run)(&mut mesh);
        let took = fmt_duration(t.elapsed());
        mesh.refresh_snapshot();
        print!("{}", mesh.table());
        match result {
            Ok(summary) => println!("PASS {} ({took}): {summary}", scenario.name),
            Err(err) => {
                println!("FAIL {} ({took}): {err:#}", scenario.name);
                failed.push(scenario.name);
            }
        }
    }

    println!("\ntest-mesh: stopping nodes");
    let problems = mesh.shutdown_all();
    for p in &problems {
        println!("FAIL shutdown: {p}");
    }
    drop(mesh);

    let passed = scenarios.len() - failed.len();
    println!(
        "\ntest-mesh: {passed} passed, {} failed{}",
        failed.len(),
        if problems.is_empty() {
            String::new()
        } else {
            format!(", {} shutdown problem(s)", problems.len())
        }
    );
    if !failed.is_empty() {
        bail!("scenario(s) failed: {}", failed.join(", "));
    }
    if !problems.is_empty() {
        bail!("nodes did not shut down cleanly");
    }
    Ok(())
}

/// `cargo build -p meshwork-cli [--release]`; returns the path of the
/// `meshwork` binary.
fn build_node(release: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "-p", "meshwork-cli"]);
    if release {
        cmd.arg("--release");
    }
    println!("$ {}", display_cmd(&cmd));
    // JSON on stdout tells us where the binary went (honours any target-dir
    // or target-triple configuration); diagnostics still render on stderr.
    cmd.arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to run `{}`", display_cmd(&cmd)))?;
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        stdout.read_to_string(&mut out)?;
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("building the node failed ({status})");
    }
    let from_json = out.lines().find_map(|line| {
        let msg: Value = serde_json::from_str(line).ok()?;
        if msg["reason"] != "compiler-artifact" || msg["target"]["name"] != "meshwork" {
            return None;
        }
        msg["executable"].as_str().map(PathBuf::from)
    });
    let bin = from_json.unwrap_or_else(|| {
        target_dir()
            .join(if release { "release" } else { "debug" })
            .join(format!("meshwork{}", std::env::consts::EXE_SUFFIX))
    });
    ensure!(
        bin.is_file(),
        "node binary not found at {} after building",
        bin.display()
    );
    Ok(bin)
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

fn scenario_handshake(mesh: &mut Mesh) -> Result<String> {
    let started = Instant::now();
    let others: Vec<usize> = mesh.alive().filter(|&i| i != 0).collect();
    ensure!(
        !others.is_empty(),
        "needs node 0 and at least one other running node"
    );
    mesh.poll_until(
        "the mesh to form",
        Poll::All,
        SCENARIO_TIMEOUT,
        |mesh, snap| {
            check_identity(mesh, snap)?;
            check_star(mesh, snap, &others)?;
            check_listen_addrs(mesh, snap)
        },
    )?;
    let formed = started.elapsed();

    let rtt_started = Instant::now();
    mesh.poll_until(
        "node 0 to measure an RTT to every peer",
        Poll::All,
        SCENARIO_TIMEOUT,
        |mesh, snap| {
            check_star(mesh, snap, &others)?;
            let s0 = snap.status(0)?;
            let missing: Vec<String> = s0
                .connections
                .iter()
                .filter(|c| c.rtt_ms.is_none())
                .map(|c| mesh.label(&c.node_id))
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(Wait::Pending(format!(
                    "node 0 has no rtt_ms yet for {}",
                    missing.join(", ")
                )))
            }
        },
    )?;
    Ok(format!(
        "node 0 connected to all {} peer(s) and every node lists node 0 after {}; \
         every node encrypted (noise); listen_addrs correct; RTTs measured {} later",
        others.len(),
        fmt_duration(formed),
        fmt_duration(rtt_started.elapsed())
    ))
}

/// Every node reports the node id of its ready line, our network, and
/// encrypted links (the default: test-mesh never passes `--insecure`).
fn check_identity(mesh: &Mesh, snap: &Snapshot) -> Result<(), Wait> {
    for i in mesh.alive() {
        let s = snap.status(i)?;
        let node = &mesh.nodes[i];
        if s.node_id != node.ready.node_id {
            return Err(Wait::Fatal(format!(
                "node {i}: /status node_id {} differs from its ready line's {}",
                s.node_id, node.ready.node_id
            )));
        }
        if s.network_id != mesh.network {
            return Err(Wait::Fatal(format!(
                "node {i}: /status network_id {:?}, expected {:?}",
                s.network_id, mesh.network
            )));
        }
        if s.security != "noise" {
            return Err(Wait::Fatal(format!(
                "node {i}: /status security {:?}, expected \"noise\" (encrypted is the default)",
                s.security
            )));
        }
    }
    Ok(())
}

/// Node 0 lists exactly `others` (once each) and each of them lists node 0.
fn check_star(mesh: &Mesh, snap: &Snapshot, others: &[usize]) -> Result<(), Wait> {
    let s0 = snap.status(0)?;
    let mut listed = Vec::new();
    let mut unknown = Vec::new();
    for c in &s0.connections {
        match mesh.index_of(&c.node_id) {
            Some(i) => listed.push(i),
            None => unknown.push(short_id(&c.node_id).to_owned()),
        }
    }
    listed.sort_unstable();
    if listed != others || !unknown.is_empty() {
        let set: BTreeSet<usize> = listed.iter().copied().collect();
        let missing: Vec<String> = others
            .iter()
            .filter(|i| !set.contains(i))
            .map(|i| format!("node {i}"))
            .collect();
        let mut extra: Vec<String> = listed
            .windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| format!("node {} (duplicate)", w[0]))
            .collect();
        extra.extend(
            listed
                .iter()
                .filter(|i| !others.contains(i))
                .map(|i| format!("node {i} (not running)")),
        );
        extra.extend(unknown.into_iter().map(|id| format!("unknown id {id}")));
        let mut reason = format!(
            "node 0 lists {} connection(s), expected exactly {}",
            s0.connections.len(),
            others.len()
        );
        if !missing.is_empty() {
            let _ = write!(reason, "; missing: {}", missing.join(", "));
        }
        if !extra.is_empty() {
            let _ = write!(reason, "; unexpected: {}", extra.join(", "));
        }
        return Err(Wait::Pending(reason));
    }
    let id0 = &mesh.nodes[0].ready.node_id;
    let lonely: Vec<String> = others
        .iter()
        .filter(|&&i| {
            snap.status(i)
                .map(|s| !s.connections.iter().any(|c| &c.node_id == id0))
                .unwrap_or(true)
        })
        .map(|i| format!("node {i}"))
        .collect();
    if !lonely.is_empty() {
        return Err(Wait::Pending(format!(
            "not listing node 0 yet: {}",
            lonely.join(", ")
        )));
    }
    Ok(())
}

/// Every connection of every node reports the peer's listen address(es).
fn check_listen_addrs(mesh: &Mesh, snap: &Snapshot) -> Result<(), Wait> {
    for i in mesh.alive() {
        let s = snap.status(i)?;
        for c in &s.connections {
            let Some(peer) = mesh.index_of(&c.node_id) else {
                continue; // reported by check_star for node 0; others may know more peers
            };
            let expected = &mesh.nodes[peer].ready.listen;
            if !expected.iter().all(|a| c.listen_addrs.contains(a)) {
                return Err(Wait::Pending(format!(
                    "node {i}'s {} connection to node {peer} reports listen_addrs {:?}, expected {:?}",
                    c.direction, c.listen_addrs, expected
                )));
            }
        }
    }
    Ok(())
}

fn scenario_network_key(mesh: &mut Mesh) -> Result<String> {
    ensure!(mesh.is_alive(0), "node 0 is not running");
    let members: Vec<usize> = mesh.alive().filter(|&i| i != 0).collect();

    // The key, made the way users make it; a second keygen must not touch it.
    let key = mesh.log_dir.join("network.key");
    let keygen: Vec<OsString> = vec!["keygen".into(), "--network-key".into(), key.clone().into()];
    let shown = format!("meshwork keygen --network-key {}", key.display());
    let (status, _, stderr) = mesh.run_cli(&keygen)?;
    ensure!(
        status.success(),
        "`{shown}` failed ({status}): {}",
        stderr.trim()
    );
    check_private_file(&key)?;
    let written = fs::read(&key).with_context(|| format!("cannot read {}", key.display()))?;
    let (status, _, stderr) = mesh.run_cli(&keygen)?;
    ensure!(
        status.code() == Some(1) && stderr.contains(&key.display().to_string()),
        "`{shown}` over an existing key must exit 1 naming the file; got {status}: {}",
        stderr.trim()
    );
    ensure!(
        fs::read(&key)? == written,
        "`{shown}` over an existing key changed the file"
    );

    let crypto_before = mesh.poll_until(
        "node 0's /status",
        Poll::Only(&[0]),
        SCENARIO_TIMEOUT,
        |_, snap| Ok(snap.status(0)?.failures("crypto")),
    )?;
    let seed = mesh.nodes[0].ready.listen[0].clone();
    let outsider = mesh.spawn_with(&[seed], &["--network-key".into(), key.into()])?;
    let result = check_outsider(mesh, outsider, &members, crypto_before);
    let stopped = mesh.stop(outsider);
    let summary = result?;
    stopped.with_context(|| format!("stopping node {outsider} (the one with the network key)"))?;
    Ok(summary)
}

/// Node `outsider` (with a network key) seeds node 0 (without): it must stay
/// out, and the `members` must stay connected.
fn check_outsider(
    mesh: &mut Mesh,
    outsider: usize,
    members: &[usize],
    crypto_before: u64,
) -> Result<String> {
    mesh.wait_ready(outsider)?;
    let id = mesh.nodes[outsider].ready.node_id.clone();
    let polls = mesh.watch_for(
        &format!("node {outsider} (network key) to stay out of node 0's /status"),
        Poll::Only(&[0, outsider]),
        OUTSIDER_WINDOW,
        |mesh, snap| {
            if snap.status(0)?.lists(&id) {
                return Err(Wait::Fatal(format!(
                    "node 0 lists node {outsider}, which has a network key node 0 lacks"
                )));
            }
            if let Some(c) = snap.status(outsider)?.connections.first() {
                return Err(Wait::Fatal(format!(
                    "node {outsider} (network key) is connected to {}",
                    mesh.label(&c.node_id)
                )));
            }
            Ok(())
        },
    )?;
    // Must hold now: the outsider has been dialling node 0 for the whole window.
    let (crypto, outsider_failures) =
        mesh.check_now("after the window", Poll::Only(&[0, outsider]), |_, snap| {
            let crypto = snap.status(0)?.failures("crypto");
            if crypto <= crypto_before {
                return Err(Wait::Pending(format!(
                    "node 0 counted no crypto handshake failure in {} (handshake_failures: {:?})",
                    fmt_duration(OUTSIDER_WINDOW),
                    snap.status(0)?.handshake_failures
                )));
            }
            let so = snap.status(outsider)?;
            if so.handshakes_ok != 0 {
                return Err(Wait::Fatal(format!(
                    "node {outsider} (network key) completed {} handshake(s)",
                    so.handshakes_ok
                )));
            }
            Ok((crypto - crypto_before, so.handshake_failures.clone()))
        })?;
    mesh.poll_until(
        "the other nodes to stay connected to node 0",
        Poll::All,
        SCENARIO_TIMEOUT,
        |mesh, snap| {
            check_identity(mesh, snap)?;
            check_star(mesh, snap, members)
        },
    )?;
    let seen: Vec<String> = outsider_failures
        .iter()
        .map(|(cause, n)| format!("{cause} {n}"))
        .collect();
    Ok(format!(
        "node {outsider} (network key) stayed out of node 0 for {} ({polls} polls); node 0 \
         counted {crypto} crypto handshake failure(s), node {outsider} saw: {}; the other {} \
         node(s) still connected",
        fmt_duration(OUTSIDER_WINDOW),
        if seen.is_empty() {
            "none".to_owned()
        } else {
            seen.join(", ")
        },
        members.len()
    ))
}

fn scenario_pinned_seed(mesh: &mut Mesh) -> Result<String> {
    ensure!(mesh.is_alive(0), "node 0 is not running");
    let addr = mesh.nodes[0].ready.listen[0].clone();
    let id0 = mesh.nodes[0].ready.node_id.clone();
    // Pinned to another node's id (any id but node 0's will do).
    let other = mesh
        .alive()
        .find(|&i| i != 0)
        .map_or_else(|| "ab".repeat(32), |i| mesh.nodes[i].ready.node_id.clone());

    // Listening where no node of the run has (see `LIMITED_LISTEN`): a
    // node 0 that redialled a departed node's port, reused by this one,
    // would link to it from its side.
    let listen = [OsString::from("--listen"), OsString::from(FOOLED_LISTEN)];
    let fooled = mesh.spawn_with(&[format!("{other}@{addr}")], &listen)?;
    let result = check_pinned_elsewhere(mesh, fooled, &id0);
    let stopped = mesh.stop(fooled);
    let refusals = result?;
    stopped.with_context(|| format!("stopping node {fooled} (seed pinned to another id)"))?;

    let pinned = mesh.spawn_with(&[format!("{id0}@{addr}")], &[])?;
    let result = mesh.wait_ready(pinned).and_then(|()| {
        let id = mesh.nodes[pinned].ready.node_id.clone();
        mesh.poll_until(
            &format!("node {pinned} (seed pinned to node 0's id) to connect to node 0"),
            Poll::Only(&[0, pinned]),
            SCENARIO_TIMEOUT,
            |_, snap| {
                let linked = snap.status(0)?.lists(&id) && snap.status(pinned)?.lists(&id0);
                if linked {
                    Ok(())
                } else {
                    Err(Wait::Pending("not connected yet".into()))
                }
            },
        )
    });
    let stopped = mesh.stop(pinned);
    result?;
    stopped.with_context(|| format!("stopping node {pinned} (seed pinned to node 0)"))?;
    Ok(format!(
        "node {fooled} (seed pinned to {}) stayed away from node 0 for {}, refusing it \
         {refusals} time(s) (unexpected_peer; its /status seeds say why); node {pinned} \
         (pinned to node 0's id) connected",
        short_id(&other),
        fmt_duration(OUTSIDER_WINDOW),
    ))
}

/// Node `fooled` seeds node 0's address pinned to another id: it must never
/// connect to node 0 (id `id0`), and count the refusals.
fn check_pinned_elsewhere(mesh: &mut Mesh, fooled: usize, id0: &str) -> Result<u64> {
    mesh.wait_ready(fooled)?;
    let id = mesh.nodes[fooled].ready.node_id.clone();
    mesh.watch_for(
        &format!("node {fooled} (seed pinned to another id) to stay away from node 0"),
        Poll::Only(&[0, fooled]),
        OUTSIDER_WINDOW,
        |_, snap| {
            if snap.status(0)?.lists(&id) || snap.status(fooled)?.lists(id0) {
                return Err(Wait::Fatal(format!(
                    "node {fooled} connected to node 0 although its seed is pinned to another id"
                )));
            }
            Ok(())
        },
    )?;
    let addr0 = mesh.nodes[0].ready.listen[0].clone();
    mesh.check_now("after the window", Poll::Only(&[fooled]), |_, snap| {
        let status = snap.status(fooled)?;
        let refused = status.failures("unexpected_peer");
        if refused == 0 {
            return Err(Wait::Fatal(format!(
                "node {fooled} counted no unexpected_peer failure (handshake_failures: {:?})",
                status.handshake_failures
            )));
        }
        // Its /status says why the seed does not answer.
        let says_why = status.seeds.iter().any(|s| {
            s.addr == addr0
                && !s.connected
                && s.failures > 0
                && s.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("expected node"))
        });
        if !says_why {
            return Err(Wait::Fatal(format!(
                "node {fooled}'s /status seeds do not say why {addr0} is refused: {:?}",
                status.seeds
            )));
        }
        Ok(refused)
    })
}

/// Time for `tools/pypeer.py` to run its checks (about 4 s).
const SPEC_PEER_TIMEOUT: Duration = Duration::from_secs(60);

fn scenario_spec_peer(mesh: &mut Mesh) -> Result<String> {
    // The settings pypeer announces: plaintext, and the default clock skew
    // (test-mesh's nodes run with 1 s, which a Hello must match).
    let plaintext: Vec<OsString> = ["--insecure", "--max-clock-skew-ms", "60000"]
        .map(OsString::from)
        .to_vec();
    let serving = [plaintext.as_slice(), &["--serve-demo".into()]].concat();
    let first = mesh.spawn_with(&[], &serving)?;
    let result = mesh.wait_ready(first).and_then(|()| {
        let seed = mesh.nodes[first].ready.listen[0].clone();
        let second = mesh.spawn_with(&[seed], &plaintext)?;
        let result = run_spec_peer(mesh, first, second);
        let stopped = mesh.stop(second);
        let summary = result?;
        stopped.with_context(|| format!("stopping node {second} (plaintext)"))?;
        Ok(summary)
    });
    let stopped = mesh.stop(first);
    let summary = result?;
    stopped.with_context(|| format!("stopping node {first} (plaintext, demo service)"))?;
    Ok(summary)
}

/// Runs `tools/pypeer.py` against plaintext node `first` once it lists
/// `second` (the target of the routed checks).
fn run_spec_peer(mesh: &mut Mesh, first: usize, second: usize) -> Result<String> {
    mesh.wait_ready(second)?;
    let id = mesh.nodes[second].ready.node_id.clone();
    mesh.poll_until(
        &format!("node {first} to list node {second}"),
        Poll::Only(&[first]),
        SCENARIO_TIMEOUT,
        |_, snap| {
            if snap.status(first)?.lists(&id) {
                Ok(())
            } else {
                Err(Wait::Pending(format!(
                    "node {first} does not list node {second} yet"
                )))
            }
        },
    )?;
    let node = &mesh.nodes[first].ready;
    let listen = node.listen[0].trim_start_matches("tcp://").to_owned();
    let script = crate::project_root().join("tools").join("pypeer.py");
    let log = mesh.log_dir.join("spec-peer.log");
    let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .args(["--insecure", "--node", &listen, "--admin", &node.admin])
        .args([
            "--network",
            &mesh.network,
            "--expect-discovered",
            "--negative",
        ])
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let shown = display_cmd(&cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to run `{shown}` (is python3 installed?)"))?;
    let Some(status) = wait_timeout(&mut child, SPEC_PEER_TIMEOUT)? else {
        let _ = child.kill();
        let _ = child.wait();
        bail!(
            "`{shown}` did not finish within {} (killed it; output: {})",
            fmt_duration(SPEC_PEER_TIMEOUT),
            log.display()
        );
    };
    let output = fs::read_to_string(&log)?;
    let failed: Vec<&str> = output.lines().filter(|l| l.starts_with("FAIL")).collect();
    let last = output.lines().last().unwrap_or("").to_owned();
    ensure!(
        status.success() && failed.is_empty() && last.ends_with(" 0 failed"),
        "`{shown}` exited {status}: {} (output: {})",
        if failed.is_empty() {
            last.as_str()
        } else {
            failed[0]
        },
        log.display()
    );
    Ok(format!(
        "{last} (tools/pypeer.py against nodes {first} and {second})"
    ))
}

fn scenario_persistent_identity(mesh: &mut Mesh) -> Result<String> {
    ensure!(mesh.is_alive(0), "node 0 is not running");
    let key = mesh.log_dir.join("persistent-node.key");
    ensure!(
        key.symlink_metadata().is_err(),
        "{} exists before the node created it",
        key.display()
    );
    let seed = mesh.nodes[0].ready.listen[0].clone();
    let args: Vec<OsString> = vec!["--key".into(), key.clone().into()];

    // First life: the node creates its key file.
    let first = mesh.spawn_with(std::slice::from_ref(&seed), &args)?;
    let result = check_keyed_node(mesh, first, &key, None);
    let stopped = mesh.stop(first);
    let (id, contents) = result?;
    stopped.with_context(|| format!("stopping node {first} (first start with --key)"))?;
    mesh.poll_until(
        &format!("node 0 to stop listing node {first}"),
        Poll::Only(&[0]),
        PEER_DROP_TIMEOUT,
        |_, snap| {
            if snap.status(0)?.lists(&id) {
                Err(Wait::Pending(format!(
                    "node 0 still lists node {first} after it exited"
                )))
            } else {
                Ok(())
            }
        },
    )?;

    // A node key is an identity: keygen must refuse to replace it.
    let keygen: Vec<OsString> = vec!["keygen".into(), "--key".into(), key.clone().into()];
    let (status, stdout, stderr) = mesh.run_cli(&keygen)?;
    ensure!(
        status.code() == Some(1)
            && stdout.is_empty()
            && stderr.contains(&key.display().to_string()),
        "`meshwork keygen --key {}` over an existing key must exit 1 naming the file and print \
         no node id; got {status}, stdout {stdout:?}, stderr: {}",
        key.display(),
        stderr.trim()
    );
    ensure!(
        fs::read(&key)? == contents,
        "`meshwork keygen --key {}` changed the existing key file",
        key.display()
    );

    // Second life: same file, same id.
    let second = mesh.spawn_with(&[seed], &args)?;
    let result = check_keyed_node(mesh, second, &key, Some((&id, &contents)));
    let stopped = mesh.stop(second);
    result?;
    stopped.with_context(|| format!("stopping node {second} (restart with --key)"))?;
    Ok(format!(
        "node {first} created {} (mode 0600) as {}; keygen refused to replace it; restarted as \
         node {second} with the same id, listed again by node 0; the key file is unchanged",
        key.file_name().map_or_else(
            || key.display().to_string(),
            |n| n.to_string_lossy().into_owned()
        ),
        short_id(&id)
    ))
}

/// Node `i` was started with `--key key`: checks the file (mode 0600, and
/// unchanged if `before` gives the id and contents of an earlier start),
/// that the ready line and `/status` carry the id, and that node 0 lists it.
/// Returns the id and the key file's contents.
fn check_keyed_node(
    mesh: &mut Mesh,
    i: usize,
    key: &Path,
    before: Option<(&str, &[u8])>,
) -> Result<(String, Vec<u8>)> {
    mesh.wait_ready(i)?;
    let id = mesh.nodes[i].ready.node_id.clone();
    ensure!(
        id.len() == 64,
        "node {i}: node id {id} is not 32 bytes (an X25519 public key)"
    );
    check_private_file(key)?;
    let contents = fs::read(key).with_context(|| format!("cannot read {}", key.display()))?;
    if let Some((old_id, old_contents)) = before {
        ensure!(
            id == old_id,
            "node {i} restarted with --key {} has node id {id}, not {old_id} as before",
            key.display()
        );
        ensure!(
            contents == old_contents,
            "{} changed across the restart",
            key.display()
        );
    }
    mesh.poll_until(
        &format!("node 0 to list node {i} ({})", short_id(&id)),
        Poll::Only(&[0, i]),
        SCENARIO_TIMEOUT,
        |_, snap| {
            let own = &snap.status(i)?.node_id;
            if own != &id {
                return Err(Wait::Fatal(format!(
                    "node {i}: /status node_id {own} differs from its ready line's {id}"
                )));
            }
            if snap.status(0)?.lists(&id) {
                Ok(())
            } else {
                Err(Wait::Pending(format!("node 0 does not list node {i}")))
            }
        },
    )?;
    Ok((id, contents))
}

/// `path` is a regular file only its owner can read or write (mode 0600).
fn check_private_file(path: &Path) -> Result<()> {
    let meta = fs::metadata(path).with_context(|| format!("{} was not created", path.display()))?;
    ensure!(meta.is_file(), "{} is not a regular file", path.display());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        ensure!(
            mode == 0o600,
            "{} has mode {mode:o}, expected 600",
            path.display()
        );
    }
    Ok(())
}

// Peer-manager scenarios: join, limits, partition, kill

fn scenario_join(mesh: &mut Mesh) -> Result<String> {
    let members: Vec<usize> = mesh.alive().collect();
    ensure!(
        members.first() == Some(&0) && members.len() >= 2,
        "needs node 0 and at least one other running node"
    );
    let limits = mesh.limits;
    let want = limits.min.min(members.len() - 1);
    let started = Instant::now();
    let graph = mesh.poll_until(
        &format!("every node to have at least {want} connected peer(s) in one connected mesh"),
        Poll::Only(&members),
        SCENARIO_TIMEOUT,
        |mesh, snap| {
            for &i in &members {
                check_pool_limits(snap, i, limits)?;
            }
            let graph = check_mesh(mesh, snap, &members, |_| want)?;
            check_views_agree(mesh, snap, &members)?;
            Ok(graph)
        },
    )?;
    Ok(format!(
        "{} nodes seeded only with node 0 joined in {}: {} links, degrees {} (--min-peers {} \
         --max-peers {}), one connected symmetric graph; connections, peers and pool agree",
        members.len(),
        fmt_duration(started.elapsed()),
        graph.links(),
        graph.degrees(),
        limits.min,
        limits.max
    ))
}

/// Node `i` reports the peer limits it was started with.
fn check_pool_limits(snap: &Snapshot, i: usize, limits: PeerLimits) -> Result<(), Wait> {
    let pool = &snap.status(i)?.pool;
    if (pool.min_peers, pool.max_peers) != (limits.min as u64, limits.max as u64) {
        return Err(Wait::Fatal(format!(
            "node {i}: /status pool has min_peers {} and max_peers {}, but it was started with \
             --min-peers {} --max-peers {}",
            pool.min_peers, pool.max_peers, limits.min, limits.max
        )));
    }
    Ok(())
}

/// The graph of the `members`' "connected" peers (ids mapped to node
/// indices). A node listing itself is fatal, an id that is no node of ours
/// is pending.
fn peer_graph(mesh: &Mesh, snap: &Snapshot, members: &[usize]) -> Result<Graph, Wait> {
    let mut graph = Graph::default();
    for &i in members {
        let s = snap.status(i)?;
        let mut listed = BTreeSet::new();
        for p in s.peers.iter().filter(|p| p.state == "connected") {
            match mesh.index_of(&p.node_id) {
                Some(j) if j == i => {
                    return Err(Wait::Fatal(format!("node {i} lists itself as connected")));
                }
                Some(j) => {
                    listed.insert(j);
                }
                None => {
                    return Err(Wait::Pending(format!(
                        "node {i} lists id {} as connected, which is none of our nodes",
                        short_id(&p.node_id)
                    )));
                }
            }
        }
        graph.listed.insert(i, listed);
    }
    Ok(graph)
}

/// The `members` form one connected graph of "connected" peers, each link
/// listed by both ends, none to a node outside `members`, and node `i` has
/// at least `want(i)` connected peers. Returns the graph.
fn check_mesh(
    mesh: &Mesh,
    snap: &Snapshot,
    members: &[usize],
    want: impl Fn(usize) -> usize,
) -> Result<Graph, Wait> {
    check_group(mesh, snap, members, want, false)
}

/// [`check_mesh`], but with `outside_ok` links from members to running
/// nodes outside them are allowed: a group started without seeds can still
/// be reached by a node redialling an address it knew, when the OS gave a
/// departed node's port to a member (it happened to `limits` at
/// `--nodes 32`, after `persistent-identity` stopped a node).
fn check_group(
    mesh: &Mesh,
    snap: &Snapshot,
    members: &[usize],
    want: impl Fn(usize) -> usize,
    outside_ok: bool,
) -> Result<Graph, Wait> {
    let graph = peer_graph(mesh, snap, members)?;
    let pending = |problem: String| {
        Err(Wait::Pending(format!(
            "{problem}; connected peers: {}",
            graph.describe()
        )))
    };
    let outside = graph
        .outside()
        .into_iter()
        .find(|&(_, b)| !outside_ok || !mesh.is_alive(b));
    if let Some((a, b)) = outside {
        return pending(format!(
            "node {a} lists node {b} as connected, which is {}",
            if mesh.is_alive(b) {
                "outside this group"
            } else {
                "not running"
            }
        ));
    }
    let one_sided: Vec<String> = graph
        .one_sided()
        .iter()
        .map(|(a, b)| format!("{a}->{b}"))
        .collect();
    if !one_sided.is_empty() {
        return pending(format!(
            "links listed by one end only (a->b: a lists b, b does not list a): {}",
            one_sided.join(" ")
        ));
    }
    let short: Vec<String> = members
        .iter()
        .filter(|&&i| graph.degree(i) < want(i))
        .map(|&i| format!("node {i} has {} (needs {})", graph.degree(i), want(i)))
        .collect();
    if !short.is_empty() {
        return pending(format!("too few connected peers: {}", short.join(", ")));
    }
    let components = graph.components();
    if components.len() > 1 {
        let parts: Vec<String> = components
            .iter()
            .map(|c| format!("[{}]", node_list(c)))
            .collect();
        return pending(format!(
            "not one connected graph: {} parts {}",
            components.len(),
            parts.join(" ")
        ));
    }
    Ok(graph)
}

/// Each member's `connections`, `peers` and `pool` describe the same peers:
/// linked peers (`connected`/`unresponsive`) are the connections, with the
/// same direction and the peer's `test-mesh-node` metadata; pool counters
/// add up; `peers` has no duplicates and lists connected peers first.
fn check_views_agree(mesh: &Mesh, snap: &Snapshot, members: &[usize]) -> Result<(), Wait> {
    for &i in members {
        let s = snap.status(i)?;
        let mut seen = BTreeSet::new();
        let mut unlinked_before = None;
        for p in &s.peers {
            if !seen.insert(p.node_id.as_str()) {
                return Err(Wait::Fatal(format!(
                    "node {i}: /status peers lists {} twice",
                    mesh.label(&p.node_id)
                )));
            }
            match (p.is_linked(), unlinked_before) {
                (false, None) => unlinked_before = Some(p),
                (true, Some(earlier)) => {
                    return Err(Wait::Fatal(format!(
                        "node {i}: /status peers lists {} ({}) after {} ({}); connected peers \
                         must come first",
                        mesh.label(&p.node_id),
                        p.state,
                        mesh.label(&earlier.node_id),
                        earlier.state
                    )));
                }
                _ => {}
            }
        }
        let linked: BTreeSet<&str> = s
            .peers
            .iter()
            .filter(|p| p.is_linked())
            .map(|p| p.node_id.as_str())
            .collect();
        let connected: BTreeSet<&str> = s.connections.iter().map(|c| c.node_id.as_str()).collect();
        if linked != connected {
            let labels = |ids: &BTreeSet<&str>| {
                let v: Vec<String> = ids.iter().map(|id| mesh.label(id)).collect();
                v.join(", ")
            };
            return Err(Wait::Pending(format!(
                "node {i}: connections lists [{}] but peers has [{}] connected/unresponsive",
                labels(&connected),
                labels(&linked)
            )));
        }
        for c in &s.connections {
            let Some(p) = s.peer(&c.node_id) else {
                continue;
            };
            if p.direction.as_deref() != Some(c.direction.as_str()) {
                return Err(Wait::Pending(format!(
                    "node {i}: {} is {} in connections but {:?} in peers",
                    mesh.label(&c.node_id),
                    c.direction,
                    p.direction
                )));
            }
            if let Some(j) = mesh.index_of(&c.node_id) {
                let expected = j.to_string();
                if p.metadata.get("test-mesh-node") != Some(&expected) {
                    return Err(Wait::Pending(format!(
                        "node {i}: peer node {j} has metadata {:?}, expected test-mesh-node={j}",
                        p.metadata
                    )));
                }
            }
        }
        let pool = &s.pool;
        if pool.inbound + pool.outbound != pool.connected || pool.connected != linked.len() as u64 {
            return Err(Wait::Pending(format!(
                "node {i}: pool says connected {} (inbound {} + outbound {}) but peers has {} \
                 connected/unresponsive",
                pool.connected,
                pool.inbound,
                pool.outbound,
                linked.len()
            )));
        }
    }
    Ok(())
}

fn scenario_limits(mesh: &mut Mesh) -> Result<String> {
    let limited_limits = PeerLimits {
        min: LIMITED_MAX_PEERS,
        max: LIMITED_MAX_PEERS,
    };
    // No seeds: the limited node and its dialers are a mesh of their own.
    // It listens where no node of the run has: on 127.0.0.1 it may get the
    // port of a node that left (churn's), which the mesh's nodes still know
    // and redial; two of them then held both its slots, and its dialers
    // never got in (a run of the whole suite failed so).
    let mut args = limited_limits.args();
    args.extend([OsString::from("--listen"), OsString::from(LIMITED_LISTEN)]);
    let limited = mesh.spawn_with(&[], &args)?;
    let mut group = vec![limited];
    let result = check_limits(mesh, &mut group);
    mesh.finish(&group, "the nodes of the limits scenario", result)
}

/// Where the `limits` scenario's limited node listens: a loopback address
/// of its own (see [`NEWCOMER_LISTEN`] for the same reason).
const LIMITED_LISTEN: &str = "tcp://127.0.0.4:0";
/// Where the `pinned-seed` scenario's node pinned to another id listens,
/// for the same reason.
const FOOLED_LISTEN: &str = "tcp://127.0.0.5:0";

/// The most the limited node was seen with.
#[derive(Debug, Default)]
struct Peak {
    polls: usize,
    linked: usize,
    connections: usize,
}

/// `group[0]` is the limited node (not ready yet); starts the dialers
/// (pushed onto `group`) and checks.
fn check_limits(mesh: &mut Mesh, group: &mut Vec<usize>) -> Result<String> {
    let limited = group[0];
    let max = LIMITED_MAX_PEERS;
    mesh.wait_ready(limited)?;
    let seed = mesh.nodes[limited].ready.listen[0].clone();
    for _ in 0..LIMIT_DIALERS {
        group.push(mesh.spawn_with(std::slice::from_ref(&seed), &DIALER_LIMITS.args())?);
    }
    let started = Instant::now();
    let mut peak = Peak::default();
    let what = format!("node {limited} (--max-peers {max}) to stay within its limit");
    for &i in &group[1..] {
        mesh.wait_ready(i)?;
        mesh.check_now(&what, Poll::Only(&[limited]), |_, snap| {
            check_peer_limit(snap, limited, max, &mut peak)
        })?;
    }
    let group = &group[..];
    mesh.watch_for(&what, Poll::Only(&[limited]), LIMIT_WINDOW, |_, snap| {
        check_peer_limit(snap, limited, max, &mut peak)
    })?;
    let want_dialer = DIALER_LIMITS.min.min(group.len() - 1);
    let graph = mesh.poll_until(
        &format!(
            "node {limited} to have exactly {max} peers and the {} nodes to form one connected \
             mesh",
            group.len()
        ),
        Poll::Only(group),
        SCENARIO_TIMEOUT,
        |mesh, snap| {
            check_peer_limit(snap, limited, max, &mut peak)?;
            let s = snap.status(limited)?;
            if s.pool.connected != max as u64 || s.connections.len() != max {
                return Err(Wait::Pending(format!(
                    "node {limited} has {} connected peer(s) in its pool and {} connection(s), \
                     expected exactly {max}",
                    s.pool.connected,
                    s.connections.len()
                )));
            }
            check_group(
                mesh,
                snap,
                group,
                |i| if i == limited { max } else { want_dialer },
                true,
            )
        },
    )?;
    let settled = started.elapsed();
    // A full node refuses in the handshake: counted as `declined` in its
    // /status handshakes. Six dialers seeded only with it, two slots: some
    // must have been turned away.
    let declined = mesh
        .snapshot
        .status(limited)
        .map_or(0, |s| s.failures("declined"));
    if declined == 0 {
        bail!(
            "node {limited} (--max-peers {max}) took {} of {LIMIT_DIALERS} dialers seeded only              with it, yet counts no dialer declined in the handshake",
            max
        );
    }
    // The dialers' view of their seed: those turned away never saw it
    // connected (`known`), and went on with the alternatives.
    let limited_id = mesh.nodes[limited].ready.node_id.clone();
    let mut seen_as = BTreeMap::<String, usize>::new();
    for &i in &group[1..] {
        if let Some(Some(Ok(s))) = mesh.snapshot.statuses.get(i) {
            let state = s.peer(&limited_id).map_or("unknown", |p| p.state.as_str());
            *seen_as.entry(state.to_owned()).or_default() += 1;
        }
    }
    let mut neighbours: Vec<usize> = graph.neighbours(limited).into_iter().collect();
    neighbours.sort_unstable();
    Ok(format!(
        "node {limited} (--max-peers {max}) never had more than {} connected peer(s) in {} polls \
         (/status connections peaked at {}) and ended with exactly {max} (nodes {}), having \
         declined {declined} dial(s) in the handshake; its {LIMIT_DIALERS} dialers see it as {}; \
         they formed one connected mesh with it after {}: {} links, degrees {}",
        peak.linked,
        peak.polls,
        peak.connections,
        node_list(&neighbours),
        counts(&seen_as),
        fmt_duration(settled),
        graph.links(),
        graph.degrees()
    ))
}

/// Node `i` reports `max` as its `max_peers` and has at most `max`
/// connected peers (by its pool and its peers list). The number of
/// connections is only recorded: a refused inbound shows there briefly.
fn check_peer_limit(snap: &Snapshot, i: usize, max: usize, peak: &mut Peak) -> Result<(), Wait> {
    let s = snap.status(i)?;
    if s.pool.max_peers != max as u64 {
        return Err(Wait::Fatal(format!(
            "node {i}: /status pool.max_peers is {}, but it was started with --max-peers {max}",
            s.pool.max_peers
        )));
    }
    let linked = s.peers.iter().filter(|p| p.is_linked()).count();
    peak.polls += 1;
    peak.linked = peak.linked.max(linked).max(s.pool.connected as usize);
    peak.connections = peak.connections.max(s.connections.len());
    if linked > max || s.pool.connected > max as u64 {
        return Err(Wait::Fatal(format!(
            "node {i} (--max-peers {max}) has {} connected peer(s) in its pool and {linked} \
             connected/unresponsive in its peers list",
            s.pool.connected
        )));
    }
    Ok(())
}

/// Where a hogged node's newcomers listen: a loopback address of its own.
const NEWCOMER_LISTEN: &str = "tcp://127.0.0.3:0";
/// Silent streams a hog holds: every handshake slot of a node.
const HOG_STREAMS: usize = 64;
/// Streams beyond those that must be refused at once.
const HOG_EXTRA: usize = 8;
/// How soon a node joins while another host hogs its seed's slots.
const HOG_OTHER_HOST_JOIN: Duration = Duration::from_secs(3);
/// How soon a node joins while its own host hogs its seed's slots: half the
/// default handshake timeout (10 s) plus dial backoff (`--backoff-max-ms`).
const HOG_SAME_HOST_JOIN: Duration = Duration::from_secs(10);

fn scenario_handshake_hog(mesh: &mut Mesh) -> Result<String> {
    let target = mesh.spawn_with(&[], &[])?;
    let mut group = vec![target];
    let result = check_handshake_hog(mesh, &mut group);
    mesh.finish(&group, "the nodes of the handshake-hog scenario", result)
}

/// `group[0]` is the hogged node (not ready yet); the newcomers are pushed
/// onto `group`.
fn check_handshake_hog(mesh: &mut Mesh, group: &mut Vec<usize>) -> Result<String> {
    let target = group[0];
    mesh.wait_ready(target)?;
    let seed = mesh.nodes[target].ready.listen[0].clone();
    let addr: SocketAddr = seed
        .strip_prefix("tcp://")
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("node {target} listens on {seed:?}, not tcp://IP:PORT"))?;
    let phases = [
        (
            "another host",
            IpAddr::from([127, 0, 0, 2]),
            HOG_OTHER_HOST_JOIN,
        ),
        (
            "the newcomer's host",
            IpAddr::from([127, 0, 0, 1]),
            HOG_SAME_HOST_JOIN,
        ),
    ];
    let mut parts = Vec::new();
    for (whose, from, limit) in phases {
        let hog = Hog::start(addr, from, HOG_STREAMS).with_context(|| {
            format!("the hog on {from} (127.0.0.2 is a loopback address on Linux)")
        })?;
        let joined = hogged_join(mesh, group, &seed, &hog, limit);
        let counts = hog.stop();
        let (took, evicted) = joined.with_context(|| format!("with {whose} ({from}) hogging"))?;
        parts.push(describe_hog(whose, from, took, evicted, counts));
        // The hog's streams gone before the next phase: the target still
        // closing some of them counted them as the next hog's, and the
        // newcomer took a slot they freed, with no eviction (a CI run).
        mesh.poll_until(
            &format!("node {target} to close the hog's streams"),
            Poll::Only(&[target]),
            SCENARIO_TIMEOUT,
            |_, snap| {
                let s = snap.status(target)?;
                if s.pending_handshakes == 0 {
                    Ok(())
                } else {
                    Err(Wait::Pending(format!(
                        "{} pending handshakes",
                        s.pending_handshakes
                    )))
                }
            },
        )?;
    }
    Ok(format!("node {target}: {}", parts.join("; ")))
}

/// While `hog` holds the slots of `group[0]`: the hog's extra streams are
/// refused, and a new node seeded with `seed` becomes a peer within `limit`.
/// Returns how long that took and the evictions counted meanwhile.
fn hogged_join(
    mesh: &mut Mesh,
    group: &mut Vec<usize>,
    seed: &str,
    hog: &Hog,
    limit: Duration,
) -> Result<(Duration, u64)> {
    let target = group[0];
    let before = mesh.poll_until(
        &format!("node {target} to hold the hog's {HOG_STREAMS} streams in the handshake"),
        Poll::Only(&[target]),
        SCENARIO_TIMEOUT,
        |_, snap| {
            let s = snap.status(target)?;
            if s.pending_handshakes >= HOG_STREAMS as u64 {
                Ok(s.clone())
            } else {
                Err(Wait::Pending(format!(
                    "{} pending handshakes",
                    s.pending_handshakes
                )))
            }
        },
    )?;
    let extra = (0..HOG_EXTRA)
        .map(|_| hog.extra())
        .collect::<Result<Vec<_>>>()?;
    mesh.poll_until(
        &format!("node {target} to refuse {HOG_EXTRA} more streams from the hog at once"),
        Poll::Only(&[target]),
        SCENARIO_TIMEOUT,
        |_, snap| {
            let s = snap.status(target)?;
            let refused = s.rejected_busy.saturating_sub(before.rejected_busy);
            if s.evicted_handshakes != before.evicted_handshakes {
                return Err(Wait::Fatal(format!(
                    "the hog's own streams evicted {} of its others",
                    s.evicted_handshakes - before.evicted_handshakes
                )));
            }
            if refused >= HOG_EXTRA as u64 {
                Ok(())
            } else {
                Err(Wait::Pending(format!("{refused} refused")))
            }
        },
    )?;
    drop(extra);
    let spawned = Instant::now();
    // Listening on an address no node of the run has used: on 127.0.0.1 the
    // newcomer may get the port of a node that left, which the mesh's nodes
    // still know and dial; linked to them, it has its --min-peers and stops
    // dialling its seed (a CI run failed so, the newcomer never arriving).
    // It still dials from 127.0.0.1, the hog's host in the second phase.
    let listen = [OsString::from("--listen"), OsString::from(NEWCOMER_LISTEN)];
    let newcomer = mesh.spawn_with(&[seed.to_owned()], &listen)?;
    group.push(newcomer);
    mesh.wait_ready(newcomer)?;
    let id = mesh.nodes[newcomer].ready.node_id.clone();
    let after = mesh
        .poll_until(
            &format!("node {newcomer}, seeded only with node {target}, to become its peer"),
            Poll::Only(&[target]),
            limit.saturating_sub(spawned.elapsed()),
            |_, snap| {
                let s = snap.status(target)?;
                match s.peer(&id) {
                    Some(p) if p.is_linked() => Ok(s.clone()),
                    Some(p) => Err(Wait::Pending(format!("node {newcomer} is {}", p.state))),
                    None => Err(Wait::Pending(format!("node {newcomer} is unknown"))),
                }
            },
        )
        .map_err(|e| e.context(newcomer_view(mesh, newcomer, target)))?;
    let evicted = after
        .evicted_handshakes
        .saturating_sub(before.evicted_handshakes);
    ensure!(
        evicted >= 1,
        "node {newcomer} got in, but node {target} counted no eviction: were the slots full?"
    );
    Ok((spawned.elapsed(), evicted))
}

/// What a newcomer that did not get in sees itself, for the failure
/// message: its pool, its connections and the peers it knows, and what the
/// target counted meanwhile.
fn newcomer_view(mesh: &Mesh, newcomer: usize, target: usize) -> String {
    let own = match mesh.http.status(mesh.admin(newcomer)) {
        Ok(s) => {
            let peers: Vec<String> = s
                .peers
                .iter()
                .map(|p| format!("{} {}", mesh.label(&p.node_id), p.state))
                .collect();
            format!(
                "node {newcomer}'s own /status: pool {:?}; {} connection(s); peers [{}]",
                s.pool,
                s.connections.len(),
                peers.join(", ")
            )
        }
        Err(e) => format!("node {newcomer}'s /status failed: {e:#}"),
    };
    let theirs = match mesh.http.status(mesh.admin(target)) {
        Ok(s) => format!(
            "node {target}: {} pending handshake(s), {} refused busy, {} evicted, {} handshakes ok",
            s.pending_handshakes, s.rejected_busy, s.evicted_handshakes, s.handshakes_ok
        ),
        Err(e) => format!("node {target}'s /status failed: {e:#}"),
    };
    format!("{own}; {theirs}")
}

fn describe_hog(whose: &str, from: IpAddr, took: Duration, evicted: u64, c: HogCounts) -> String {
    format!(
        "with {whose} ({from}) holding all {HOG_STREAMS} handshake slots ({HOG_EXTRA} more \
         refused; {} streams opened, {} closed by the node), a new node became its peer after \
         {} ({evicted} eviction(s))",
        c.opened,
        c.closed,
        fmt_duration(took)
    )
}

fn scenario_partition(mesh: &mut Mesh) -> Result<String> {
    let members: Vec<usize> = mesh.alive().collect();
    ensure!(members.len() >= 2, "needs at least two running nodes");
    let want = mesh.limits.min.min(members.len() - 1);
    let connected = |what: &str, mesh: &mut Mesh| {
        mesh.poll_until(
            what,
            Poll::Only(&members),
            SCENARIO_TIMEOUT,
            |mesh, snap| check_mesh(mesh, snap, &members, |_| want),
        )
    };
    connected("the mesh to be connected", mesh)?;
    check_peer_api(mesh, &members)?;
    connected(
        "the mesh to be connected again after POST /peers/{id}/disconnect",
        mesh,
    )?;

    let (left, right) = members.split_at(members.len() / 2);
    let split = check_split(mesh, left, right);
    let unblocked_at = Instant::now();
    let unblocked = set_blocks(mesh, left, right, "unblock");
    let split = split?;
    unblocked?;
    let graph = mesh.poll_until(
        &format!("the healed mesh to be connected, with at least {want} peer(s) per node"),
        Poll::Only(&members),
        REPAIR_TIMEOUT,
        |mesh, snap| {
            for &i in &members {
                let blocked = &snap.status(i)?.blocked;
                if !blocked.is_empty() {
                    return Err(Wait::Fatal(format!(
                        "node {i} still lists {} blocked id(s) after POST /unblock",
                        blocked.len()
                    )));
                }
            }
            check_mesh(mesh, snap, &members, |_| want)
        },
    )?;
    Ok(format!(
        "{split}; unblocked: one connected mesh again after {} ({} links, degrees {})",
        fmt_duration(unblocked_at.elapsed()),
        graph.links(),
        graph.degrees()
    ))
}

/// The admin API's answers for bad and unknown ids, and for disconnecting
/// a connected peer (the mesh must repair that before the partition).
fn check_peer_api(mesh: &mut Mesh, members: &[usize]) -> Result<()> {
    let i = members[0];
    let admin = mesh.nodes[i].ready.admin.clone();
    let stranger = "00".repeat(32);
    for (id, action, want) in [
        ("not-a-node-id", "disconnect", 400),
        ("not-a-node-id", "block", 400),
        (stranger.as_str(), "disconnect", 404),
    ] {
        let (code, body) = mesh.http.peer_action(&admin, id, action)?;
        ensure!(
            code == want,
            "node {i}: POST /peers/{id}/{action} answered {code}, expected {want}: {body}"
        );
    }
    let peer = mesh.check_now("a peer to disconnect", Poll::Only(&[i]), |_, snap| {
        let s = snap.status(i)?;
        s.connections
            .first()
            .map(|c| c.node_id.clone())
            .ok_or_else(|| Wait::Fatal(format!("node {i} has no connection")))
    })?;
    let (code, body) = mesh.http.peer_action(&admin, &peer, "disconnect")?;
    ensure!(
        code == 200,
        "node {i}: POST /peers/{}/disconnect ({}, connected) answered {code}, expected 200: \
         {body}",
        short_id(&peer),
        mesh.label(&peer)
    );
    Ok(())
}

/// Blocks every node of `left` on every node of `right` and back, then
/// checks the halves stay apart and connected. Returns a summary.
fn check_split(mesh: &mut Mesh, left: &[usize], right: &[usize]) -> Result<String> {
    let limits = mesh.limits;
    let blocked_at = Instant::now();
    set_blocks(mesh, left, right, "block")?;
    let members: Vec<usize> = left.iter().chain(right).copied().collect();
    let other_half = |i: usize| if left.contains(&i) { right } else { left };
    let check_blocked = |mesh: &Mesh, snap: &Snapshot| -> Result<(), Wait> {
        for &i in &members {
            let blocked: BTreeSet<String> = snap
                .status(i)?
                .blocked
                .iter()
                .map(|id| id.to_ascii_lowercase())
                .collect();
            let expected: BTreeSet<String> = other_half(i)
                .iter()
                .map(|&j| mesh.nodes[j].ready.node_id.to_ascii_lowercase())
                .collect();
            if blocked != expected {
                let labels: Vec<String> = blocked.iter().map(|id| mesh.label(id)).collect();
                return Err(Wait::Fatal(format!(
                    "node {i}: /status blocked is [{}], expected the other half [{}]",
                    labels.join(", "),
                    node_list(other_half(i))
                )));
            }
        }
        Ok(())
    };
    let no_crossing = |mesh: &Mesh, snap: &Snapshot| no_crossing(mesh, snap, left, right);
    let want = |half: &[usize]| limits.min.min(half.len() - 1);
    mesh.poll_until(
        &format!(
            "halves [{}] and [{}] to separate, each connected",
            node_list(left),
            node_list(right)
        ),
        Poll::Only(&members),
        SCENARIO_TIMEOUT,
        |mesh, snap| {
            check_blocked(mesh, snap)?;
            no_crossing(mesh, snap)?;
            check_mesh(mesh, snap, left, |_| want(left))?;
            check_mesh(mesh, snap, right, |_| want(right)).map(|_| ())
        },
    )?;
    let separated = blocked_at.elapsed();
    let polls = mesh.watch_for(
        "the partition to hold",
        Poll::Only(&members),
        PARTITION_WINDOW,
        |mesh, snap| {
            check_blocked(mesh, snap)?;
            no_crossing(mesh, snap)
        },
    )?;
    let halves = mesh.check_now(
        "each half after the window",
        Poll::Only(&members),
        |mesh, snap| {
            let l = check_mesh(mesh, snap, left, |_| want(left))?;
            let r = check_mesh(mesh, snap, right, |_| want(right))?;
            Ok(format!("{} | {}", l.degrees(), r.degrees()))
        },
    )?;
    Ok(format!(
        "blocked halves [{}] | [{}]: separated and each connected after {}, no link across for \
         {} ({polls} polls; degrees {halves})",
        node_list(left),
        node_list(right),
        fmt_duration(separated),
        fmt_duration(PARTITION_WINDOW)
    ))
}

/// No node of `left` lists a node of `right` as linked or in its
/// connections, nor the other way round.
fn no_crossing(mesh: &Mesh, snap: &Snapshot, left: &[usize], right: &[usize]) -> Result<(), Wait> {
    let mut crossing = Vec::new();
    for (from, to) in [(left, right), (right, left)] {
        for &i in from {
            let s = snap.status(i)?;
            for &j in to {
                if let Some(how) = s.lists_how(&mesh.nodes[j].ready.node_id) {
                    crossing.push(format!("node {i} lists node {j} ({how})"));
                }
            }
        }
    }
    if crossing.is_empty() {
        Ok(())
    } else {
        Err(Wait::Pending(format!(
            "links across the partition: {}",
            crossing.join("; ")
        )))
    }
}

/// POST /peers/{id}/`action` (`block` or `unblock`) on every node of each
/// half for every node of the other; every request is sent, the first
/// failure is returned.
fn set_blocks(mesh: &Mesh, left: &[usize], right: &[usize], action: &str) -> Result<()> {
    let mut first_error = None;
    for (from, to) in [(left, right), (right, left)] {
        for &i in from {
            if !mesh.is_alive(i) {
                continue;
            }
            let admin = &mesh.nodes[i].ready.admin;
            for &j in to {
                let id = &mesh.nodes[j].ready.node_id;
                let outcome = mesh
                    .http
                    .peer_action(admin, id, action)
                    .and_then(|(code, body)| {
                        ensure!(code == 200, "HTTP {code}: {body}");
                        Ok(())
                    })
                    .with_context(|| format!("node {i}: POST /peers/<node {j}>/{action}"));
                if let Err(e) = outcome {
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn scenario_kill(mesh: &mut Mesh) -> Result<String> {
    ensure!(mesh.is_alive(0), "node 0 is not running");
    let mut others: Vec<usize> = mesh.alive().filter(|&i| i != 0).collect();
    if others.len() < 2 {
        // Keep a node for graceful-shutdown: kill an extra one.
        let seed = mesh.nodes[0].ready.listen[0].clone();
        let extra = mesh.spawn_with(&[seed], &[])?;
        mesh.wait_ready(extra)?;
        others.push(extra);
    }
    let members: Vec<usize> = mesh.alive().collect();
    let limits = mesh.limits;
    let want = limits.min.min(members.len() - 1);
    let before = mesh.poll_until(
        "the mesh to be connected before the kill",
        Poll::Only(&members),
        SCENARIO_TIMEOUT,
        |mesh, snap| check_mesh(mesh, snap, &members, |_| want),
    )?;
    let want = limits.min.min(members.len() - 2);
    let victim = pick_victim(&before, &others, want);
    let victim_id = mesh.nodes[victim].ready.node_id.clone();
    let survivors: Vec<usize> = members.iter().copied().filter(|&i| i != victim).collect();
    let mut listers: Vec<usize> = before.neighbours(victim).into_iter().collect();
    listers.sort_unstable();
    let short: Vec<usize> = short_after_loss(&before, victim, want);

    mesh.kill(victim);
    let killed = Instant::now();
    mesh.poll_until(
        &format!("the survivors to stop listing node {victim}"),
        Poll::Only(&survivors),
        PEER_DROP_TIMEOUT,
        |_, snap| {
            let still = still_listing(snap, &survivors, &victim_id)?;
            if still.is_empty() {
                Ok(())
            } else {
                Err(Wait::Pending(format!(
                    "still listing node {victim} after kill -9: {}",
                    still.join(", ")
                )))
            }
        },
    )?;
    let dropped = killed.elapsed();
    let graph = mesh.poll_until(
        &format!(
            "the {} survivors to be one connected mesh with at least {want} peer(s) each",
            survivors.len()
        ),
        Poll::Only(&survivors),
        REPAIR_TIMEOUT,
        |mesh, snap| check_mesh(mesh, snap, &survivors, |_| want),
    )?;
    let repaired = killed.elapsed();
    let mut seen_as = BTreeMap::<String, usize>::new();
    for &i in &survivors {
        if let Some(Some(Ok(s))) = mesh.snapshot.statuses.get(i) {
            let state = s.peer(&victim_id).map_or("forgotten", |p| p.state.as_str());
            *seen_as.entry(state.to_owned()).or_default() += 1;
        }
    }
    Ok(format!(
        "kill -9 node {victim} (peers: {}; leaves {} short of {want} peers): dropped by all \
         survivors after {} (now seen as {}); the {} survivors were one connected mesh with \
         at least {want} peers each again after {} ({} links, degrees {})",
        node_list(&listers),
        if short.is_empty() {
            "no node".to_owned()
        } else {
            format!("nodes {}", node_list(&short))
        },
        fmt_duration(dropped),
        counts(&seen_as),
        survivors.len(),
        fmt_duration(repaired),
        graph.links(),
        graph.degrees()
    ))
}

fn scenario_graceful_shutdown(mesh: &mut Mesh) -> Result<String> {
    let victim = mesh
        .alive()
        .filter(|&i| i != 0)
        .max()
        .context("needs node 0 and at least one other running node")?;
    ensure!(mesh.is_alive(0), "node 0 is not running");
    let victim_id = mesh.nodes[victim].ready.node_id.clone();

    // With the peer manager, node 0 need not be connected to the last node;
    // whoever is must notice the shutdown.
    let listers = mesh.poll_until(
        &format!("node {victim} to be connected, and listed by its peers"),
        Poll::All,
        SCENARIO_TIMEOUT,
        |mesh, snap| {
            let own = snap.status(victim)?;
            if own.connections.is_empty() {
                return Err(Wait::Pending(format!("node {victim} has no connection")));
            }
            let mut listers = Vec::new();
            for c in &own.connections {
                let Some(peer) = mesh.index_of(&c.node_id).filter(|&p| mesh.is_alive(p)) else {
                    continue;
                };
                if !snap.status(peer)?.lists(&victim_id) {
                    return Err(Wait::Pending(format!(
                        "node {victim} lists node {peer}, which does not list it"
                    )));
                }
                listers.push(peer);
            }
            listers.sort_unstable();
            Ok(listers)
        },
    )?;

    let admin = mesh.nodes[victim].ready.admin.clone();
    let asked = Instant::now();
    mesh.http
        .shutdown(&admin)
        .with_context(|| format!("POST /shutdown to node {victim}"))?;
    let status = mesh.wait_exit(victim, EXIT_TIMEOUT)?;
    let exit_took = asked.elapsed();
    let Some(status) = status else {
        mesh.kill(victim);
        bail!(
            "node {victim} did not exit within {} of POST /shutdown (killed it)",
            fmt_duration(EXIT_TIMEOUT)
        );
    };
    ensure!(
        status.success(),
        "node {victim} exited with {status} after POST /shutdown, expected exit status 0"
    );

    let dropped = Instant::now();
    mesh.poll_until(
        &format!("its peers to stop listing node {victim}"),
        Poll::Only(&listers),
        PEER_DROP_TIMEOUT,
        |_, snap| {
            let still = still_listing(snap, &listers, &victim_id)?;
            if still.is_empty() {
                Ok(())
            } else {
                Err(Wait::Pending(format!(
                    "still listing node {victim} after it exited: {}",
                    still.join(", ")
                )))
            }
        },
    )?;
    Ok(format!(
        "node {victim} exited 0 {} after POST /shutdown; its {} peer(s) ({}) dropped it {} \
         after the exit",
        fmt_duration(exit_took),
        listers.len(),
        node_list(&listers),
        fmt_duration(dropped.elapsed())
    ))
}

/// Which of `nodes` still list `id` as a connection or a linked peer
/// (`connected` or `unresponsive`), as `node 3 (connected)`.
fn still_listing(snap: &Snapshot, nodes: &[usize], id: &str) -> Result<Vec<String>, Wait> {
    let mut still = Vec::new();
    for &i in nodes {
        if let Some(how) = snap.status(i)?.lists_how(id) {
            still.push(format!("node {i} ({how})"));
        }
    }
    Ok(still)
}

/// The node of `candidates` whose loss leaves the most other nodes with
/// fewer than `want` connected peers (so that the survivors must dial), the
/// first of them on a tie.
fn pick_victim(graph: &Graph, candidates: &[usize], want: usize) -> usize {
    let mut best = candidates[0];
    let mut best_short = 0;
    for &c in candidates {
        let short = short_after_loss(graph, c, want).len();
        if short > best_short {
            (best, best_short) = (c, short);
        }
    }
    best
}

/// The nodes left with fewer than `want` peers by the loss of `victim`.
fn short_after_loss(graph: &Graph, victim: usize, want: usize) -> Vec<usize> {
    graph
        .listed
        .iter()
        .filter(|&(&i, l)| i != victim && l.iter().filter(|&&j| j != victim).count() < want)
        .map(|(&i, _)| i)
        .collect()
}

/// `connected x2, disconnected x4`.
fn counts(counts: &BTreeMap<String, usize>) -> String {
    let parts: Vec<String> = counts.iter().map(|(s, n)| format!("{s} x{n}")).collect();
    parts.join(", ")
}

/// `0, 2, 3` (or `none`).
fn node_list(nodes: &[usize]) -> String {
    if nodes.is_empty() {
        return "none".to_owned();
    }
    let names: Vec<String> = nodes.iter().map(usize::to_string).collect();
    names.join(", ")
}

// ---------------------------------------------------------------------------
// Concern scenarios: flood, route, topics
// ---------------------------------------------------------------------------

fn scenario_flood(mesh: &mut Mesh) -> Result<String> {
    let members: Vec<usize> = mesh.alive().collect();
    ensure!(members.len() >= 2, "needs at least two running nodes");
    let want = mesh.limits.min.min(members.len() - 1);
    let graph = mesh.poll_until(
        "the mesh to be connected",
        Poll::Only(&members),
        SCENARIO_TIMEOUT,
        |mesh, snap| {
            check_concerns_listed(snap, &members)?;
            check_mesh(mesh, snap, &members, |_| want)
        },
    )?;
    let origin = pick_origin(&graph);
    let receivers: Vec<usize> = members.iter().copied().filter(|&i| i != origin).collect();
    let origin_id = mesh.nodes[origin].ready.node_id.clone();
    let payload = unique_payload("flood");
    let sent = Instant::now();
    let message_id = mesh
        .http
        .send_message(&mesh.nodes[origin].ready.admin, "/broadcast", &payload)
        .with_context(|| format!("node {origin}: POST /broadcast"))?;
    let delivery = Delivery {
        kind: "broadcast",
        topic: None,
        payload: &payload,
        from: &origin_id,
    };
    mesh.poll_events_until(
        &format!("every node but node {origin} to record the broadcast"),
        &members,
        DELIVERY_TIMEOUT,
        |mesh, log| delivery.check(mesh, log, &receivers, &[origin]),
    )?;
    let reached = sent.elapsed();
    let polls = mesh.watch_events(
        "the broadcast to stay recorded once by every node but the origin",
        &members,
        DUPLICATE_WINDOW,
        |mesh, log| delivery.check(mesh, log, &receivers, &[origin]),
    )?;
    // Floods are signed and stamped: between honest nodes on one clock, no
    // check may ever fail (a failure bans the neighbour that relayed it).
    for &i in &members {
        let status = mesh.http.status(&mesh.nodes[i].ready.admin)?;
        for counter in ["forged", "stale"] {
            let n = status.builtin["flood"][counter].as_u64().unwrap_or(0);
            ensure!(
                n == 0,
                "node {i} counted {n} {counter} flood(s) from honest nodes; expected none"
            );
        }
    }
    let farthest = graph.distances(origin).into_values().max().unwrap_or(0);
    Ok(format!(
        "node {origin} ({} peer(s)) broadcast message {message_id}: each of the {} other \
         node(s), up to {farthest} hop(s) away, recorded it once within {}, and still once {} \
         later ({polls} polls); node {origin} recorded nothing; no node counted a forged or \
         stale flood",
        graph.degree(origin),
        receivers.len(),
        fmt_duration(reached),
        fmt_duration(DUPLICATE_WINDOW)
    ))
}

fn scenario_route(mesh: &mut Mesh) -> Result<String> {
    let mut line = Vec::new();
    let result =
        spawn_line(mesh, &mut line, |_| Vec::new()).and_then(|()| check_route(mesh, &line));
    mesh.finish(&line, "the nodes of the route scenario", result)
}

/// `line` is a line of new nodes: requests along it, and to nowhere.
fn check_route(mesh: &mut Mesh, line: &[usize]) -> Result<String> {
    let formed = wait_line(mesh, line)?;
    let (first, second, last) = (line[0], line[1], line[line.len() - 1]);
    let hops = (line.len() - 1) as u64;
    let admin = mesh.nodes[first].ready.admin.clone();
    let first_id = mesh.nodes[first].ready.node_id.clone();
    let second_id = mesh.nodes[second].ready.node_id.clone();
    let last_id = mesh.nodes[last].ready.node_id.clone();
    let timeout_ms = REQUEST_TIMEOUT.as_millis();

    let payload = unique_payload("route");
    let asked = Instant::now();
    let answer = mesh
        .http
        .request(&admin, &last_id, &payload)
        .with_context(|| format!("node {first}: POST /request/<node {last}>"))?;
    let took = asked.elapsed();
    let (reply, elapsed_ms) = match &answer {
        RequestAnswer::Reply { reply, elapsed_ms } => (reply, *elapsed_ms),
        RequestAnswer::Error { http, code, error } => bail!(
            "node {first}: POST /request/<node {last}> ({hops} hops away) answered HTTP {http} \
             {code:?}: {error}; expected 200 with the echo"
        ),
    };
    ensure!(
        reply == &payload,
        "node {first}: the echo of node {last} replied {reply:?}, expected {payload:?}"
    );

    let delivery = Delivery {
        kind: "request",
        topic: None,
        payload: &payload,
        from: &first_id,
    };
    let relays = &line[..line.len() - 1];
    mesh.poll_events_until(
        &format!("node {last} (only) to record the request"),
        line,
        DELIVERY_TIMEOUT,
        |mesh, log| delivery.check(mesh, log, &[last], relays),
    )?;

    let route = mesh.poll_until(
        &format!(
            "node {first}'s /status to list node {last} {hops} hops away through node {second}"
        ),
        Poll::Only(line),
        DELIVERY_TIMEOUT,
        |mesh, snap| {
            let echo = snap.status(last)?.concern(ECHO_COMMAND);
            if echo.is_none_or(|c| c.requests == 0 || c.replies == 0) {
                return Err(Wait::Pending(format!(
                    "node {last}'s echo concern counts no request and reply yet: {echo:?}"
                )));
            }
            let s = snap.status(first)?;
            let Some(route) = s
                .routes
                .iter()
                .find(|r| r.target.eq_ignore_ascii_case(&last_id))
            else {
                return Err(Wait::Pending(format!(
                    "no route to node {last}; routes: {}",
                    describe_routes(mesh, &s.routes)
                )));
            };
            if route.hops != hops || !route.next_hop.eq_ignore_ascii_case(&second_id) {
                let graph = peer_graph(mesh, snap, line)?;
                return Err(Wait::Fatal(format!(
                    "node {first} routes to node {last} {} hop(s) through {}, expected {hops} \
                     through node {second}; connected peers now: {}",
                    route.hops,
                    mesh.label(&route.next_hop),
                    graph.describe()
                )));
            }
            // The peer table shows the same node as routed, through the second.
            let routed = s
                .peers
                .iter()
                .find(|p| p.node_id.eq_ignore_ascii_case(&last_id));
            match routed {
                Some(p)
                    if p.state == "routed"
                        && p.hops == Some(hops)
                        && p.via
                            .as_deref()
                            .is_some_and(|v| v.eq_ignore_ascii_case(&second_id)) => {}
                other => {
                    return Err(Wait::Fatal(format!(
                        "node {first}'s peer table shows node {last} as {other:?}, expected \
                         state routed via node {second}, {hops} hops"
                    )));
                }
            }
            Ok(route.clone())
        },
    )?;

    // A node that does not exist: the search finds nothing.
    let stranger = unknown_id();
    let asked = Instant::now();
    let answer = mesh
        .http
        .request(&admin, &stranger, &unique_payload("nowhere"))
        .with_context(|| format!("node {first}: POST /request/<unknown id>"))?;
    let unreachable_after = asked.elapsed();
    match &answer {
        RequestAnswer::Error {
            http: 404, code, ..
        } if code == "unreachable" => {}
        other => bail!(
            "node {first}: POST /request/{} (no such node) answered {other:?}, expected 404 \
             \"unreachable\"",
            short_id(&stranger)
        ),
    }
    ensure!(
        unreachable_after < ROUTE_SEARCH_TIMEOUT,
        "node {first}: POST /request/<unknown id>?timeout_ms={timeout_ms} took {}: the route \
         search waited out its timeout ({}) instead of ending once every node of the line \
         answered \"not through me\"",
        fmt_duration(unreachable_after),
        fmt_duration(ROUTE_SEARCH_TIMEOUT)
    );
    let answer = mesh
        .http
        .request(&admin, "not-a-node-id", "x")
        .with_context(|| format!("node {first}: POST /request/not-a-node-id"))?;
    ensure!(
        matches!(answer, RequestAnswer::Error { http: 400, .. }),
        "node {first}: POST /request/not-a-node-id answered {answer:?}, expected 400"
    );

    Ok(format!(
        "line {} formed in {}; node {first} -> node {last} ({hops} hops): echo back in {} \
         (elapsed_ms {elapsed_ms:.1}), recorded by node {last} only, route {} hops via node \
         {second} (age {:.0} ms); unknown id: 404 unreachable after {} (timeout_ms {timeout_ms}); \
         bad id: 400",
        line_name(line),
        fmt_duration(formed),
        fmt_duration(took),
        route.hops,
        route.age_ms,
        fmt_duration(unreachable_after)
    ))
}

fn scenario_topics(mesh: &mut Mesh) -> Result<String> {
    let mut line = Vec::new();
    let result = spawn_line(mesh, &mut line, |k| {
        LINE_SUBSCRIPTIONS[k]
            .iter()
            .flat_map(|t| [OsString::from("--subscribe"), OsString::from(t)])
            .collect()
    })
    .and_then(|()| check_topics(mesh, &line));
    mesh.finish(&line, "the nodes of the topics scenario", result)
}

/// `line` is a line of new nodes subscribed as [`LINE_SUBSCRIPTIONS`] says:
/// its first node publishes on [`TOPIC`].
fn check_topics(mesh: &mut Mesh, line: &[usize]) -> Result<String> {
    let formed = wait_line(mesh, line)?;
    mesh.check_now("the subscriptions in /status", Poll::Only(line), |_, snap| {
        for (k, &i) in line.iter().enumerate() {
            let got: BTreeSet<&str> = snap
                .status(i)?
                .subscriptions
                .iter()
                .map(String::as_str)
                .collect();
            let want: BTreeSet<&str> = LINE_SUBSCRIPTIONS[k].iter().copied().collect();
            if got != want {
                return Err(Wait::Fatal(format!(
                    "node {i} lists subscriptions {got:?}, but was started with --subscribe for \
                     {want:?}"
                )));
            }
        }
        Ok(())
    })?;
    let publisher = line[0];
    let publisher_id = mesh.nodes[publisher].ready.node_id.clone();
    let subscribers: Vec<usize> = line
        .iter()
        .enumerate()
        .filter(|(k, _)| LINE_SUBSCRIPTIONS[*k].contains(&TOPIC))
        .map(|(_, &i)| i)
        .collect();
    let others: Vec<usize> = line
        .iter()
        .copied()
        .filter(|i| !subscribers.contains(i))
        .collect();
    let payload = unique_payload("topics");
    let sent = Instant::now();
    let message_id = mesh
        .http
        .send_message(
            &mesh.nodes[publisher].ready.admin,
            &format!("/publish/{TOPIC}"),
            &payload,
        )
        .with_context(|| format!("node {publisher}: POST /publish/{TOPIC}"))?;
    let delivery = Delivery {
        kind: "publication",
        topic: Some(TOPIC),
        payload: &payload,
        from: &publisher_id,
    };
    mesh.poll_events_until(
        &format!("the subscribers of {TOPIC} to record the publication"),
        line,
        DELIVERY_TIMEOUT,
        |mesh, log| delivery.check(mesh, log, &subscribers, &others),
    )?;
    let reached = sent.elapsed();
    let polls = mesh.watch_events(
        "the publication to stay recorded once by each subscriber and by no other node",
        line,
        DUPLICATE_WINDOW,
        |mesh, log| delivery.check(mesh, log, &subscribers, &others),
    )?;
    let far: Vec<String> = subscribers
        .iter()
        .map(|&i| {
            let k = line.iter().position(|&j| j == i).unwrap_or_default();
            format!("node {i} ({k} hops)")
        })
        .collect();
    Ok(format!(
        "line {} formed in {}; node {publisher} published message {message_id} on {TOPIC}: \
         recorded once by its subscribers {} within {}, still once {} later ({polls} polls); \
         nodes {} (including node {publisher} and a subscriber of {OTHER_TOPIC} only) recorded \
         nothing",
        line_name(line),
        fmt_duration(formed),
        far.join(", "),
        fmt_duration(reached),
        fmt_duration(DUPLICATE_WINDOW),
        node_list(&others),
    ))
}

/// Starts [`LINE_NODES`] new nodes (pushed onto `line`), each seeded only
/// with the previous one and ready before the next starts, with
/// [`line_limits`] and `extra(position)` arguments.
fn spawn_line(
    mesh: &mut Mesh,
    line: &mut Vec<usize>,
    extra: impl Fn(usize) -> Vec<OsString>,
) -> Result<()> {
    for k in 0..LINE_NODES {
        let seeds: Vec<String> = line
            .last()
            .map(|&prev| mesh.nodes[prev].ready.listen[0].clone())
            .into_iter()
            .collect();
        let mut args = line_limits(k).args();
        args.extend(extra(k));
        let i = mesh.spawn_with(&seeds, &args)?;
        line.push(i);
        mesh.wait_ready(i)?;
    }
    Ok(())
}

/// Peer limits of the node at `position` in a line: [`LINE_LIMITS`], but
/// the first node takes a single peer. With `--max-peers 2` it would keep
/// one slot for a dial of its own (the pool reserves `max_peers / 2` slots
/// for outbound peers) and, knowing the line through discovery, dial the
/// only node with room, the last one: the line would close into a ring.
fn line_limits(position: usize) -> PeerLimits {
    if position == 0 {
        PeerLimits { min: 1, max: 1 }
    } else {
        LINE_LIMITS
    }
}

/// Waits for the `line` nodes to be connected as a line, and nothing else.
/// Returns how long that took.
fn wait_line(mesh: &mut Mesh, line: &[usize]) -> Result<Duration> {
    let started = Instant::now();
    mesh.poll_until(
        &format!("nodes {} to form a line", line_name(line)),
        Poll::Only(line),
        SCENARIO_TIMEOUT,
        |mesh, snap| {
            check_concerns_listed(snap, line)?;
            let graph = peer_graph(mesh, snap, line)?;
            match line_problem(&graph, line) {
                None => Ok(()),
                Some(problem) => Err(Wait::Pending(format!(
                    "{problem}; connected peers: {}",
                    graph.describe()
                ))),
            }
        },
    )?;
    Ok(started.elapsed())
}

/// What keeps `graph` from being exactly the line `line`: each node lists
/// its predecessor and its successor as connected, and no other node.
fn line_problem(graph: &Graph, line: &[usize]) -> Option<String> {
    let mut problems = Vec::new();
    for (k, &i) in line.iter().enumerate() {
        let want: BTreeSet<usize> = [k.checked_sub(1), Some(k + 1).filter(|&n| n < line.len())]
            .into_iter()
            .flatten()
            .map(|n| line[n])
            .collect();
        let got = graph.listed.get(&i).cloned().unwrap_or_default();
        if got != want {
            let got: Vec<usize> = got.into_iter().collect();
            let want: Vec<usize> = want.into_iter().collect();
            problems.push(format!(
                "node {i} lists [{}], expected [{}]",
                node_list(&got),
                node_list(&want)
            ));
        }
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// `5-6-7-8-9`.
fn line_name(line: &[usize]) -> String {
    let names: Vec<String> = line.iter().map(usize::to_string).collect();
    names.join("-")
}

/// Every node of `nodes` lists the echo concern and the built-in ones in
/// its `/status` (a contract violation, so fatal).
fn check_concerns_listed(snap: &Snapshot, nodes: &[usize]) -> Result<(), Wait> {
    for &i in nodes {
        let s = snap.status(i)?;
        if s.concern(ECHO_COMMAND).is_none() {
            let commands: Vec<String> = s
                .concerns
                .iter()
                .map(|c| format!("{:#x} {}", c.command, c.name))
                .collect();
            return Err(Wait::Fatal(format!(
                "node {i}: /status concerns has no echo concern (command {ECHO_COMMAND:#x}); \
                 it lists [{}]",
                commands.join(", ")
            )));
        }
    }
    Ok(())
}

/// The node of the graph farthest from some other node (so that its
/// broadcast has to be relayed), with the fewest peers on a tie, then the
/// lowest index; node 0 only if no other node qualifies as well.
fn pick_origin(graph: &Graph) -> usize {
    graph
        .listed
        .keys()
        .copied()
        .min_by_key(|&i| {
            let farthest = graph.distances(i).into_values().max().unwrap_or(0);
            (std::cmp::Reverse(farthest), graph.degree(i), i == 0, i)
        })
        .unwrap_or(0)
}

/// `node 6 via node 5, 1 hop; id 1a2b3c4d via node 5, 2 hops` (or `none`).
fn describe_routes(mesh: &Mesh, routes: &[Route]) -> String {
    if routes.is_empty() {
        return "none".to_owned();
    }
    let parts: Vec<String> = routes
        .iter()
        .map(|r| {
            format!(
                "{} via {}, {} hop(s)",
                mesh.label(&r.target),
                mesh.label(&r.next_hop),
                r.hops
            )
        })
        .collect();
    parts.join("; ")
}

/// A payload no node has seen: `test-mesh <tag> <pid>-<nanos>`.
fn unique_payload(tag: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("test-mesh {tag} {}-{nanos}", std::process::id())
}

/// A well-formed node id (32 bytes, hex) that no node has.
fn unknown_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{:032x}{nanos:032x}",
        u128::from(std::process::id()) | (0xdead_u128 << 64)
    )
}

/// What a node records when it is handed a broadcast, request or
/// publication: the check of the `/events` of the nodes.
#[derive(Debug, Clone, Copy)]
struct Delivery<'a> {
    kind: &'static str,
    topic: Option<&'a str>,
    /// Unique: the events with this payload are the ones to check.
    payload: &'a str,
    /// The origin's node id.
    from: &'a str,
}

impl Delivery<'_> {
    /// Every node of `receivers` recorded it exactly once (none yet is
    /// pending), no node of `others` did, and every record of the payload
    /// has the right kind, topic and origin.
    fn check(
        &self,
        mesh: &Mesh,
        log: &EventLog,
        receivers: &[usize],
        others: &[usize],
    ) -> Result<(), Wait> {
        let mut missing = Vec::new();
        for &i in receivers.iter().chain(others) {
            let events = log
                .get(&i)
                .ok_or_else(|| Wait::Fatal(format!("node {i}: /events not fetched")))?;
            let mine: Vec<&Event> = events
                .iter()
                .filter(|e| e.payload == self.payload)
                .collect();
            for e in &mine {
                if e.kind != self.kind
                    || e.topic.as_deref() != self.topic
                    || !e.from.eq_ignore_ascii_case(self.from)
                {
                    return Err(Wait::Fatal(format!(
                        "node {i} recorded the {} as {}; expected a {} from {}, topic {:?}",
                        self.kind,
                        e.describe(mesh),
                        self.kind,
                        mesh.label(self.from),
                        self.topic
                    )));
                }
            }
            let seqs: Vec<String> = mine.iter().map(|e| e.seq.to_string()).collect();
            if others.contains(&i) {
                if !mine.is_empty() {
                    return Err(Wait::Fatal(format!(
                        "node {i} recorded the {} {} time(s) (seq {}), but should not have",
                        self.kind,
                        mine.len(),
                        seqs.join(", ")
                    )));
                }
            } else if mine.is_empty() {
                missing.push(i);
            } else if mine.len() > 1 {
                return Err(Wait::Fatal(format!(
                    "node {i} recorded the {} {} times (seq {}), expected once",
                    self.kind,
                    mine.len(),
                    seqs.join(", ")
                )));
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Wait::Pending(format!(
                "not recorded yet by node(s) {}",
                node_list(&missing)
            )))
        }
    }
}

// ---------------------------------------------------------------------------
// Replicated map scenarios: kv, lease, late-join, kv-partition, kv-kill
// ---------------------------------------------------------------------------

fn scenario_kv(mesh: &mut Mesh) -> Result<String> {
    let members: Vec<usize> = mesh.alive().collect();
    ensure!(members.len() >= 2, "needs at least two running nodes");
    wait_connected(mesh, &members)?;
    let before = mesh.poll_fn_until(
        "every node's /kv-digest to agree before the writes",
        KV_TIMEOUT,
        |mesh| same_digest(mesh, &members),
    )?;
    let prefix = kv_prefix("kv");
    let writes: Vec<KvWrite> = (0..KV_WRITES)
        .map(|k| {
            let node = members[k % members.len()];
            KvWrite::set(
                node,
                format!("{prefix}{k:04}"),
                format!("value {k} from node {node}"),
            )
        })
        .collect();
    let started = Instant::now();
    let versions = put_all(mesh, &writes)?;
    let wrote = started.elapsed();
    let want = before.keys + KV_WRITES as u64;
    let agreed = mesh.poll_fn_until(
        &format!("every node's /kv-digest to agree, with {want} keys"),
        KV_TIMEOUT,
        |mesh| {
            let d = same_digest(mesh, &members)?;
            if d.keys == want {
                Ok(d)
            } else {
                Err(Wait::Pending(format!(
                    "every node has digest {} but with {} keys, expected {want}",
                    d.digest, d.keys
                )))
            }
        },
    )?;
    let converged = started.elapsed();

    // Every node lists the writes with their values, writers and versions.
    for &i in &members {
        let items = mesh
            .http
            .kv_list(mesh.admin(i), &prefix)
            .with_context(|| format!("node {i}"))?;
        ensure!(
            items.len() == KV_WRITES,
            "node {i} lists {} keys under {prefix:?}, expected {KV_WRITES}",
            items.len()
        );
        for ((item, w), &version) in items.iter().zip(&writes).zip(&versions) {
            check_item(mesh, i, item, w, version)?;
        }
    }
    // And GET shows each sampled key with its writer's lease.
    let sample: Vec<usize> = (0..KV_WRITES)
        .step_by(KV_WRITES / 10)
        .chain([KV_WRITES - 1])
        .collect();
    for &i in &members {
        for &k in &sample {
            let w = &writes[k];
            let e = mesh
                .http
                .kv_get(mesh.admin(i), &w.key)?
                .with_context(|| format!("node {i}: GET /kv/{} answered 404", w.key))?;
            let writer = mesh.id(w.node);
            ensure!(
                e.key == w.key
                    && Some(&e.value) == w.value.as_ref()
                    && e.writer == writer
                    && e.version == versions[k]
                    && e.lease
                        .as_ref()
                        .is_some_and(|l| l.owner == writer && l.epoch >= 1)
                    && e.expires_at_ms.is_none(),
                "node {i}: GET /kv/{} shows {e:?}; expected the value {:?} by node {} (version {}) \
                 leased to it, not ephemeral",
                w.key,
                w.value,
                w.node,
                versions[k]
            );
        }
    }
    Ok(format!(
        "{KV_WRITES} PUTs round robin over {} nodes (a writer thread each) took {}; every \
         /kv-digest agreed ({}, {} keys, {} entries) {} after the first PUT, {} after the last; \
         every node lists the {KV_WRITES} with their values, writers and versions; {} sampled \
         GETs per node show the writer's lease",
        members.len(),
        fmt_duration(wrote),
        agreed.digest,
        agreed.keys,
        agreed.entries,
        fmt_duration(converged),
        fmt_duration(converged.saturating_sub(wrote)),
        sample.len()
    ))
}

fn scenario_lease(mesh: &mut Mesh) -> Result<String> {
    let members: Vec<usize> = mesh.alive().collect();
    ensure!(members.len() >= 2, "needs at least two running nodes");
    wait_connected(mesh, &members)?;
    let (a, b) = (members[members.len() - 2], members[members.len() - 1]);
    let (id_a, id_b) = (mesh.id(a).to_owned(), mesh.id(b).to_owned());
    let key = format!("{}key", kv_prefix("lease"));
    let value_a = format!("from node {a}");
    let value_b = format!("from node {b}");

    // A writes and confirms.
    let started = Instant::now();
    let v1 = mesh
        .http
        .kv_set(mesh.admin(a), &key, &value_a)
        .with_context(|| format!("node {a}"))?;
    let path = format!("/confirm?timeout_ms={}", CONFIRM_TIMEOUT.as_millis());
    let (code, body) = mesh.http.kv_action(mesh.admin(a), "POST", &key, &path)?;
    ensure!(
        code == 200,
        "node {a}: POST /kv/{key}{path} answered {code}: {body}"
    );
    let confirmed = u64_field(&body, "peers").with_context(|| format!("confirm: {body}"))?;
    ensure!(
        confirmed >= 1,
        "node {a} confirmed its write with {confirmed} peers, but it is connected"
    );
    let confirm_took = started.elapsed();

    // Once B has it, B may not overwrite, delete or release it.
    let seen = mesh.poll_fn_until(
        &format!("node {b} to read node {a}'s value"),
        KV_TIMEOUT,
        |mesh| match kv_get_wait(mesh, b, &key)? {
            Some(e) if e.value == value_a => Ok(e),
            other => Err(Wait::Pending(format!("node {b} reads {other:?}"))),
        },
    )?;
    let seen_after = started.elapsed();
    ensure!(
        seen.writer == id_a
            && seen.version == v1
            && seen.lease.as_ref().is_some_and(|l| l.owner == id_a)
            && seen.expires_at_ms.is_none(),
        "node {b} reads {seen:?}; expected node {a}'s write (version {v1}), leased to it"
    );
    let until = seen.lease.as_ref().map_or(0, |l| l.until_ms);
    ensure!(
        until > unix_ms(),
        "node {b} shows node {a}'s lease lapsing at {until} ms, which is past; the lease is 1 hour"
    );
    let (code, body) = mesh.http.kv_put(mesh.admin(b), &key, &value_b, None)?;
    check_lease_held(code, &body, &id_a).with_context(|| format!("node {b}: PUT /kv/{key}"))?;
    for (method, suffix) in [("DELETE", ""), ("POST", "/release")] {
        let (code, body) = mesh.http.kv_action(mesh.admin(b), method, &key, suffix)?;
        check_lease_held(code, &body, &id_a)
            .with_context(|| format!("node {b}: {method} /kv/{key}{suffix}"))?;
    }
    // A's value is still what every node reads.
    mesh.poll_fn_until(
        &format!("every node to read node {a}'s value"),
        KV_TIMEOUT,
        |mesh| every_node_reads(mesh, &members, &key, &value_a, &id_a),
    )?;

    // A releases; once B sees that, B's write succeeds.
    let (code, body) = mesh
        .http
        .kv_action(mesh.admin(a), "POST", &key, "/release")?;
    ensure!(
        code == 200 && body["released"] == true,
        "node {a}: POST /kv/{key}/release answered {code}: {body}"
    );
    let released = Instant::now();
    mesh.poll_fn_until(
        &format!("node {b} to see node {a}'s release"),
        KV_TIMEOUT,
        |mesh| match kv_get_wait(mesh, b, &key)? {
            Some(e) if e.lease.is_none() => {
                if e.value == value_a {
                    Ok(())
                } else {
                    Err(Wait::Fatal(format!(
                        "node {b} reads {e:?} after node {a}'s release, which keeps the value"
                    )))
                }
            }
            other => Err(Wait::Pending(format!("node {b} reads {other:?}"))),
        },
    )?;
    let release_seen = released.elapsed();
    let v2 = mesh
        .http
        .kv_set(mesh.admin(b), &key, &value_b)
        .with_context(|| format!("node {b}, after node {a} released the key"))?;
    ensure!(
        v2 > v1,
        "node {b}'s write has version {v2}, not above node {a}'s {v1}: versions must grow"
    );
    let written = Instant::now();
    mesh.poll_fn_until(
        &format!("every node to read node {b}'s value, leased to it"),
        KV_TIMEOUT,
        |mesh| every_node_reads(mesh, &members, &key, &value_b, &id_b),
    )?;
    let everywhere = written.elapsed();
    let (code, body) = mesh.http.kv_put(mesh.admin(a), &key, &value_a, None)?;
    check_lease_held(code, &body, &id_b)
        .with_context(|| format!("node {a}: PUT /kv/{key} after node {b} took the key over"))?;
    Ok(format!(
        "node {a} wrote the key (confirmed by {confirmed} peer(s) in {}); node {b} read it after \
         {} and its PUT, DELETE and release answered 409 lease_held naming node {a}; node {b} saw \
         node {a}'s release after {}, then wrote (version grew), every node read its value and \
         lease {} later, and node {a}'s PUT was refused naming node {b}",
        fmt_duration(confirm_took),
        fmt_duration(seen_after),
        fmt_duration(release_seen),
        fmt_duration(everywhere)
    ))
}

fn scenario_late_join(mesh: &mut Mesh) -> Result<String> {
    let members: Vec<usize> = mesh.alive().collect();
    ensure!(!members.is_empty(), "needs a running node");
    wait_connected(mesh, &members)?;
    let before = mesh.poll_fn_until(
        "every node's /kv-digest to agree before the writes",
        KV_TIMEOUT,
        |mesh| same_digest(mesh, &members),
    )?;
    let prefix = kv_prefix("late");
    let writes: Vec<KvWrite> = (0..LATE_JOIN_KEYS)
        .map(|k| {
            let node = members[k % members.len()];
            KvWrite::set(
                node,
                format!("{prefix}{k:03}"),
                format!("late {k} from node {node}"),
            )
        })
        .collect();
    let versions = put_all(mesh, &writes)?;
    let want = before.keys + LATE_JOIN_KEYS as u64;
    let target = mesh.poll_fn_until(
        &format!("every node's /kv-digest to agree, with {want} keys"),
        KV_TIMEOUT,
        |mesh| {
            let d = same_digest(mesh, &members)?;
            if d.keys == want {
                Ok(d)
            } else {
                Err(Wait::Pending(format!("{} keys, expected {want}", d.keys)))
            }
        },
    )?;

    let seed_node = *members.last().unwrap_or(&0);
    let seed = mesh.nodes[seed_node].ready.listen[0].clone();
    let joiner = mesh.spawn_with(&[seed], &[])?;
    let late = LateJoin {
        joiner,
        seed: seed_node,
        members: &members,
        prefix: &prefix,
        writes: &writes,
        versions: &versions,
        target: &target,
    };
    let result = late.check(mesh);
    let stopped = mesh.stop(joiner);
    let summary = result?;
    stopped.with_context(|| format!("stopping node {joiner} (the late joiner)"))?;
    Ok(summary)
}

/// The `late-join` scenario's new node and what it must catch up with.
struct LateJoin<'a> {
    joiner: usize,
    seed: usize,
    members: &'a [usize],
    prefix: &'a str,
    writes: &'a [KvWrite],
    versions: &'a [u64],
    target: &'a KvDigest,
}

impl LateJoin<'_> {
    fn check(&self, mesh: &mut Mesh) -> Result<String> {
        let (joiner, seed, target) = (self.joiner, self.seed, self.target);
        mesh.wait_ready(joiner)?;
        let ready = Instant::now();
        let mut all = self.members.to_vec();
        all.push(joiner);
        let reached = mesh.poll_fn_until(
            &format!("node {joiner} (seeded with node {seed}) to reach the mesh's /kv-digest"),
            KV_TIMEOUT,
            |mesh| same_digest(mesh, &all),
        )?;
        let took = ready.elapsed();
        ensure!(
            reached.digest == target.digest,
            "every node agrees on digest {}, but the mesh had {} before node {joiner} joined and \
             nothing was written since",
            reached.digest,
            target.digest
        );
        let items = mesh
            .http
            .kv_list(mesh.admin(joiner), self.prefix)
            .with_context(|| format!("node {joiner}"))?;
        ensure!(
            items.len() == self.writes.len(),
            "node {joiner} lists {} keys under {:?}, expected {}",
            items.len(),
            self.prefix,
            self.writes.len()
        );
        for ((item, w), &version) in items.iter().zip(self.writes).zip(self.versions) {
            check_item(mesh, joiner, item, w, version)?;
        }
        let peers = mesh.http.status(mesh.admin(joiner))?.connections.len();
        Ok(format!(
            "{} keys written over {} node(s); node {joiner}, seeded with node {seed}, reached their \
             /kv-digest ({}, {} keys, {} entries) {} after its ready line, with {peers} peer(s), \
             and lists the {} keys with their values, writers and versions",
            self.writes.len(),
            self.members.len(),
            target.digest,
            target.keys,
            target.entries,
            fmt_duration(took),
            self.writes.len()
        ))
    }
}

fn scenario_kv_partition(mesh: &mut Mesh) -> Result<String> {
    let members: Vec<usize> = mesh.alive().collect();
    ensure!(members.len() >= 2, "needs at least two running nodes");
    wait_connected(mesh, &members)?;
    let (left, right) = members.split_at(members.len() / 2);
    let (l, r) = (left[0], right[0]);
    let (id_l, id_r) = (mesh.id(l).to_owned(), mesh.id(r).to_owned());
    let prefix = kv_prefix("split");
    let split = Split {
        left,
        right,
        prefix: &prefix,
    };

    // Before the split: the left writer writes the keys it will delete.
    let doomed: Vec<KvWrite> = (0..SPLIT_DELETES)
        .map(|k| KvWrite::set(l, split.doomed_key(k), format!("doomed {k}")))
        .collect();
    put_all(mesh, &doomed)?;
    mesh.poll_fn_until(
        &format!("every node to hold the {SPLIT_DELETES} keys node {l} will delete"),
        KV_TIMEOUT,
        |mesh| {
            same_digest(mesh, &members)?;
            for &i in &members {
                let n = kv_list_wait(mesh, i, &split.doomed_key_prefix())?.len();
                if n != SPLIT_DELETES {
                    return Err(Wait::Pending(format!("node {i} lists {n} of them")));
                }
            }
            Ok(())
        },
    )?;

    let result = split.cut_and_write(mesh);
    let unblocked_at = Instant::now();
    let unblocked = set_blocks(mesh, left, right, "unblock");
    let (cut, lost_before) = result?;
    unblocked?;

    // Heal: one replica, and it stays so.
    let healed = mesh.poll_fn_until(
        "every node's /kv-digest to agree after unblocking",
        KV_TIMEOUT,
        |mesh| same_digest(mesh, &members),
    )?;
    let heal_took = unblocked_at.elapsed();
    let polls = mesh.watch_fn_for(
        "the healed replicas to stay identical",
        KV_STABLE_WINDOW,
        |mesh| {
            let d = same_digest(mesh, &members)?;
            if d.digest == healed.digest {
                Ok(())
            } else {
                Err(Wait::Fatal(format!(
                    "every node moved from digest {} to {} with nothing written",
                    healed.digest, d.digest
                )))
            }
        },
    )?;

    // One value, writer and lease owner per contested key, on every node.
    let (mut won_l, mut won_r) = (0u64, 0u64);
    for k in 0..SPLIT_CONFLICTS {
        let key = split.contested_key(k);
        let mut first: Option<(usize, KvEntry)> = None;
        for &i in &members {
            let e = mesh
                .http
                .kv_get(mesh.admin(i), &key)?
                .with_context(|| format!("node {i} has no value for contested key {key}"))?;
            match &first {
                None => first = Some((i, e)),
                Some((j, f)) => ensure!(
                    e == *f,
                    "contested key {key}: node {i} holds {e:?} but node {j} {f:?}"
                ),
            }
        }
        let Some((_, e)) = first else { continue };
        let (count, value) = if e.writer == id_l {
            (&mut won_l, format!("left {k}"))
        } else if e.writer == id_r {
            (&mut won_r, format!("right {k}"))
        } else {
            bail!(
                "contested key {key} ended up written by {}: {e:?}",
                mesh.label(&e.writer)
            );
        };
        ensure!(
            e.value == value
                && e.lease
                    .as_ref()
                    .is_some_and(|lease| lease.owner == e.writer),
            "contested key {key}: {e:?}; expected the value {value:?} leased to its writer"
        );
        *count += 1;
    }
    // No delete came back; each half's own keys reached the other.
    for &i in &members {
        for k in 0..SPLIT_DELETES {
            let key = split.doomed_key(k);
            if let Some(e) = mesh.http.kv_get(mesh.admin(i), &key)? {
                bail!("node {i}: key {key}, deleted by node {l} during the split, is back: {e:?}");
            }
        }
        for (side, writer) in [("l", l), ("r", r)] {
            let items = mesh
                .http
                .kv_list(mesh.admin(i), &split.own_key_prefix(side))?;
            ensure!(
                items.len() == SPLIT_OWN_KEYS && items.iter().all(|e| e.writer == mesh.id(writer)),
                "node {i} lists {} of the {SPLIT_OWN_KEYS} keys node {writer} wrote alone during \
                 the split: {items:?}",
                items.len()
            );
        }
    }
    // Each losing writer was told once per key it lost.
    let lost_after = lease_lost(mesh, &[l, r])?;
    for (node, lost) in [(l, won_r), (r, won_l)] {
        let told = lost_after[&node].saturating_sub(lost_before[&node]);
        ensure!(
            told == lost,
            "node {node} lost {lost} contested key(s) but its /status sync.lease_lost rose by \
             {told}"
        );
    }
    Ok(format!(
        "{cut}; unblocked: every /kv-digest agreed after {} ({}, {} keys, {} entries) and held \
         for {} ({polls} polls); each contested key has one value, writer and lease on every \
         node (node {l} won {won_l}, node {r} won {won_r}, each loser counted as many \
         lease_lost); the {SPLIT_DELETES} deleted keys stayed deleted everywhere",
        fmt_duration(heal_took),
        healed.digest,
        healed.keys,
        healed.entries,
        fmt_duration(KV_STABLE_WINDOW)
    ))
}

/// The halves of the `kv-partition` scenario and its keys.
struct Split<'a> {
    left: &'a [usize],
    right: &'a [usize],
    prefix: &'a str,
}

impl Split<'_> {
    fn contested_key(&self, k: usize) -> String {
        format!("{}c.{k:02}", self.prefix)
    }

    fn doomed_key_prefix(&self) -> String {
        format!("{}del.", self.prefix)
    }

    fn doomed_key(&self, k: usize) -> String {
        format!("{}{k:02}", self.doomed_key_prefix())
    }

    /// `side` is `l` or `r`.
    fn own_key_prefix(&self, side: &str) -> String {
        format!("{}{side}.", self.prefix)
    }

    /// Blocks the halves from each other and waits until no link crosses;
    /// then the first node of each half writes every contested key and
    /// keys of its own (one thread each), and the left one deletes the
    /// keys it wrote before. Every write must be accepted: a 409 means a
    /// lease crossed the partition. Returns a summary and the writers'
    /// `lease_lost` counts.
    fn cut_and_write(&self, mesh: &mut Mesh) -> Result<(String, BTreeMap<usize, u64>)> {
        let (left, right) = (self.left, self.right);
        let (l, r) = (left[0], right[0]);
        let members: Vec<usize> = left.iter().chain(right).copied().collect();
        let blocked_at = Instant::now();
        set_blocks(mesh, left, right, "block")?;
        mesh.poll_until(
            &format!(
                "halves [{}] and [{}] to separate",
                node_list(left),
                node_list(right)
            ),
            Poll::Only(&members),
            SCENARIO_TIMEOUT,
            |mesh, snap| no_crossing(mesh, snap, left, right),
        )?;
        let separated = blocked_at.elapsed();

        let mut writes = Vec::new();
        for k in 0..SPLIT_CONFLICTS {
            writes.push(KvWrite::set(l, self.contested_key(k), format!("left {k}")));
            writes.push(KvWrite::set(r, self.contested_key(k), format!("right {k}")));
        }
        for k in 0..SPLIT_OWN_KEYS {
            for (side, node) in [("l", l), ("r", r)] {
                let key = format!("{}{k:02}", self.own_key_prefix(side));
                writes.push(KvWrite::set(node, key, format!("own {k}")));
            }
        }
        writes.extend((0..SPLIT_DELETES).map(|k| KvWrite::delete(l, self.doomed_key(k))));
        put_all(mesh, &writes)
            .context("writing on both sides of the partition (a 409 means a lease crossed it)")?;
        let (dl, dr) = (
            mesh.http.kv_digest(mesh.admin(l))?,
            mesh.http.kv_digest(mesh.admin(r))?,
        );
        ensure!(
            dl.digest != dr.digest,
            "nodes {l} and {r} wrote different values of the same keys on two sides of the \
             partition, yet have identical replicas ({})",
            dl.digest
        );
        mesh.check_now(
            "the partition after the writes",
            Poll::Only(&members),
            |mesh, snap| no_crossing(mesh, snap, left, right),
        )?;
        let lost = lease_lost(mesh, &[l, r])?;
        Ok((
            format!(
                "halves [{}] | [{}] separated {} after blocking; nodes {l} and {r} both wrote \
                 {SPLIT_CONFLICTS} contested keys (all accepted) and {SPLIT_OWN_KEYS} of their \
                 own, node {l} deleted {SPLIT_DELETES} it wrote before (digests {} | {})",
                node_list(left),
                node_list(right),
                fmt_duration(separated),
                dl.digest,
                dr.digest
            ),
            lost,
        ))
    }
}

fn scenario_kv_kill(mesh: &mut Mesh) -> Result<String> {
    ensure!(mesh.is_alive(0), "node 0 is not running");
    let members: Vec<usize> = mesh.alive().collect();
    wait_connected(mesh, &members)?;
    let seed = mesh.nodes[0].ready.listen[0].clone();
    let owner = mesh.spawn_with(&[seed], &[])?;
    let result = check_ephemeral(mesh, owner, &members);
    mesh.kill(owner);
    result
}

/// Keys node 0 writes in `kv-full`, and their size.
const FULL_KEYS: usize = 400;
const FULL_VALUE_LEN: usize = 4000;

fn scenario_kv_full(mesh: &mut Mesh) -> Result<String> {
    ensure!(mesh.is_alive(0), "node 0 is not running");
    let members: Vec<usize> = mesh.alive().collect();
    wait_connected(mesh, &members)?;
    let seed = mesh.nodes[0].ready.listen[0].clone();
    let small = mesh.spawn_with(
        &[seed],
        &[OsString::from("--kv-max-mib"), OsString::from("1")],
    )?;
    let result = check_kv_full(mesh, small, &members);
    mesh.finish(&[small], "the small node of kv-full", result)
}

/// Node 0 writes more than node `small` (new, `--kv-max-mib 1`) holds.
fn check_kv_full(mesh: &mut Mesh, small: usize, members: &[usize]) -> Result<String> {
    mesh.wait_ready(small)?;
    let small_id = mesh.id(small).to_owned();
    mesh.poll_until(
        &format!("node 0 to list node {small} as a connected peer"),
        Poll::Only(&[0]),
        SCENARIO_TIMEOUT,
        |_, snap| match snap.status(0)?.peer(&small_id) {
            Some(p) if p.is_linked() => Ok(()),
            _ => Err(Wait::Pending(format!(
                "node {small} not connected to node 0"
            ))),
        },
    )?;
    let prefix = kv_prefix("full");
    let value = "f".repeat(FULL_VALUE_LEN);
    let started = Instant::now();
    for k in 0..FULL_KEYS {
        mesh.http
            .kv_set(mesh.admin(0), &format!("{prefix}{k:03}"), &value)
            .with_context(|| format!("node 0: PUT key {k}"))?;
    }
    let others: Vec<usize> = members.iter().copied().filter(|&i| i != 0).collect();
    mesh.poll_fn_until(
        &format!("every node but node {small} to list the {FULL_KEYS} keys"),
        KV_TIMEOUT,
        |mesh| {
            for &i in &others {
                let n = mesh
                    .http
                    .kv_list(mesh.admin(i), &prefix)
                    .map_err(|e| Wait::Pending(format!("node {i}: {e:#}")))?
                    .len();
                if n != FULL_KEYS {
                    return Err(Wait::Pending(format!("node {i} lists {n} of the keys")));
                }
            }
            Ok(())
        },
    )?;
    let converged = started.elapsed();
    let sync = mesh.poll_until(
        &format!("node {small} to refuse what does not fit"),
        Poll::Only(&[small]),
        KV_TIMEOUT,
        |_, snap| {
            let s = &snap.status(small)?.sync;
            if s.bytes > s.max_bytes || s.max_bytes != 1 << 20 {
                return Err(Wait::Fatal(format!(
                    "node {small} (--kv-max-mib 1) holds {} bytes of max_bytes {}",
                    s.bytes, s.max_bytes
                )));
            }
            if s.refused_full == 0 {
                return Err(Wait::Pending(format!("node {small} refused nothing yet")));
            }
            Ok(s.clone())
        },
    )?;
    // What fits depends on what the map held before (the other scenarios'
    // keys): all that is sure is that not all 400 did.
    let held = mesh.http.kv_list(mesh.admin(small), &prefix)?.len();
    ensure!(
        held < FULL_KEYS,
        "node {small} holds all {FULL_KEYS} keys in 1 MiB"
    );
    let (code, body) =
        mesh.http
            .kv_put(mesh.admin(small), &format!("{prefix}new"), &value, None)?;
    ensure!(
        code == 507 && body["code"] == "full",
        "node {small}: PUT of a new key to a full replica answered HTTP {code}: {body}"
    );
    mesh.check_now(
        &format!("node {small} to stay connected"),
        Poll::Only(&[0]),
        |_, snap| match snap.status(0)?.peer(&small_id) {
            Some(p) if p.is_linked() => Ok(()),
            _ => Err(Wait::Fatal(format!("node 0 lost node {small}"))),
        },
    )?;
    Ok(format!(
        "node 0 wrote {FULL_KEYS} keys of {FULL_VALUE_LEN} bytes; every other node listed them \
         all after {}; node {small} (--kv-max-mib 1) holds {held} of them, {} of {} bytes, \
         refused {} entries, answered a new PUT 507 full, and stayed connected",
        fmt_duration(converged),
        sync.bytes,
        sync.max_bytes,
        sync.refused_full
    ))
}

/// Node `owner` (new, seeded with node 0) writes ephemeral keys; the
/// `members` must see them while it lives and lose them after its kill -9.
fn check_ephemeral(mesh: &mut Mesh, owner: usize, members: &[usize]) -> Result<String> {
    mesh.wait_ready(owner)?;
    let id = mesh.id(owner).to_owned();
    mesh.poll_until(
        &format!("node {owner} to be connected"),
        Poll::Only(&[owner]),
        SCENARIO_TIMEOUT,
        |_, snap| {
            if snap.status(owner)?.connections.is_empty() {
                Err(Wait::Pending(format!("node {owner} has no connection")))
            } else {
                Ok(())
            }
        },
    )?;
    let prefix = kv_prefix("ephemeral");
    let keys: Vec<String> = (0..EPHEMERAL_KEYS)
        .map(|k| format!("{prefix}{k:02}"))
        .collect();
    let ttl_ms = EPHEMERAL_TTL.as_millis() as u64;
    let put_at = unix_ms();
    for (k, key) in keys.iter().enumerate() {
        let (code, body) = mesh.http.kv_put(
            mesh.admin(owner),
            key,
            &format!("ephemeral {k}"),
            Some(EPHEMERAL_TTL),
        )?;
        ensure!(
            code == 200,
            "node {owner}: PUT /kv/{key}?ttl_ms={ttl_ms} answered {code}: {body}"
        );
    }
    let e = mesh
        .http
        .kv_get(mesh.admin(owner), &keys[0])?
        .with_context(|| format!("node {owner} does not hold {} it just wrote", keys[0]))?;
    let slack = EPHEMERAL_SLACK.as_millis() as u64;
    // The node's clock is its own reading of the wall clock (a monotonic
    // clock from a wall-clock start), which may trail ours by a few ms.
    let skew = CLOCK_SKEW.as_millis() as u64;
    ensure!(
        e.expires_at_ms
            .is_some_and(|at| at + skew >= put_at + ttl_ms && at <= unix_ms() + ttl_ms + slack)
            && e.lease.as_ref().is_some_and(|l| l.owner == id),
        "node {owner}: GET /kv/{} shows {e:?}; expected expires_at_ms about {ttl_ms} ms from \
         now and a lease of its own",
        keys[0]
    );

    let mut all = members.to_vec();
    all.push(owner);
    let started = Instant::now();
    let listing = |mesh: &Mesh, nodes: &[usize]| -> Result<BTreeMap<usize, usize>, Wait> {
        nodes
            .iter()
            .map(|&i| Ok((i, kv_list_wait(mesh, i, &prefix)?.len())))
            .collect()
    };
    let all_keys = |counts: &BTreeMap<usize, usize>| -> Result<(), Wait> {
        let short: Vec<String> = counts
            .iter()
            .filter(|&(_, &n)| n != EPHEMERAL_KEYS)
            .map(|(i, n)| format!("node {i} lists {n}"))
            .collect();
        if short.is_empty() {
            Ok(())
        } else {
            Err(Wait::Pending(short.join(", ")))
        }
    };
    mesh.poll_fn_until(
        &format!("every node to list node {owner}'s {EPHEMERAL_KEYS} ephemeral keys"),
        KV_TIMEOUT,
        |mesh| all_keys(&listing(mesh, &all)?),
    )?;
    let spread = started.elapsed();
    let window = EPHEMERAL_TTL + Duration::from_secs(1);
    let polls = mesh.watch_fn_for(
        &format!(
            "every node to keep listing them for {} (node {owner} refreshes them)",
            fmt_duration(window)
        ),
        window,
        |mesh| all_keys(&listing(mesh, &all)?),
    )?;

    mesh.kill(owner);
    let killed = Instant::now();
    let mut first_gone: Option<Duration> = None;
    mesh.poll_fn_until(
        &format!("no node to list node {owner}'s ephemeral keys after its kill -9"),
        EPHEMERAL_TTL + EPHEMERAL_SLACK,
        |mesh| {
            let counts = listing(mesh, members)?;
            if first_gone.is_none() && counts.values().any(|&n| n < EPHEMERAL_KEYS) {
                first_gone = Some(killed.elapsed());
            }
            let left: Vec<String> = counts
                .iter()
                .filter(|&(_, &n)| n > 0)
                .map(|(i, n)| format!("node {i} ({n})"))
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(Wait::Pending(format!(
                    "still listed by {}",
                    left.join(", ")
                )))
            }
        },
    )?;
    let gone = killed.elapsed();
    for &i in members {
        for key in &keys {
            if let Some(e) = mesh.http.kv_get(mesh.admin(i), key)? {
                bail!("node {i}: GET /kv/{key} still answers {e:?} after the writer died");
            }
        }
    }
    let agreed = mesh.poll_fn_until("the survivors' /kv-digest to agree", KV_TIMEOUT, |mesh| {
        same_digest(mesh, members)
    })?;
    Ok(format!(
        "node {owner} wrote {EPHEMERAL_KEYS} keys with ttl_ms={ttl_ms}: every node listed them \
         after {}, and still did {} later ({polls} polls); after kill -9 the first node dropped \
         them after {}, the last after {} (limit {}); the {} survivors agree ({})",
        fmt_duration(spread),
        fmt_duration(window),
        first_gone.map_or_else(|| "-".to_owned(), fmt_duration),
        fmt_duration(gone),
        fmt_duration(EPHEMERAL_TTL + EPHEMERAL_SLACK),
        members.len(),
        agreed.digest
    ))
}

/// Waits until the `members` form one connected mesh with enough peers
/// each (the kv scenarios' precondition: every write can reach every node).
fn wait_connected(mesh: &mut Mesh, members: &[usize]) -> Result<()> {
    let want = mesh.limits.min.min(members.len().saturating_sub(1));
    mesh.poll_until(
        "the mesh to be connected",
        Poll::Only(members),
        SCENARIO_TIMEOUT,
        |mesh, snap| check_mesh(mesh, snap, members, |_| want),
    )?;
    Ok(())
}

/// A key prefix no node has seen: `tm.<tag>.<pid>-<nanos>.`.
fn kv_prefix(tag: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("tm.{tag}.{}-{nanos}.", std::process::id())
}

/// Now, in ms since the Unix epoch (lease expiries are given so).
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One write of a scenario: node `node` PUTs `value` at `key`, or DELETEs
/// `key` (`value` none).
#[derive(Debug, Clone)]
struct KvWrite {
    node: usize,
    key: String,
    value: Option<String>,
}

impl KvWrite {
    fn set(node: usize, key: String, value: String) -> KvWrite {
        KvWrite {
            node,
            key,
            value: Some(value),
        }
    }

    fn delete(node: usize, key: String) -> KvWrite {
        KvWrite {
            node,
            key,
            value: None,
        }
    }
}

/// Sends every write, each node's in order on a thread of its own (the
/// nodes write at the same time); each must answer 200. Returns the
/// version of each PUT (0 for a DELETE), in `writes` order.
fn put_all(mesh: &Mesh, writes: &[KvWrite]) -> Result<Vec<u64>> {
    let nodes: BTreeSet<usize> = writes.iter().map(|w| w.node).collect();
    let http = &mesh.http;
    thread::scope(|scope| {
        let threads: Vec<_> = nodes
            .iter()
            .map(|&node| {
                let admin = mesh.admin(node).to_owned();
                scope.spawn(move || -> Result<Vec<(usize, u64)>> {
                    let mut done = Vec::new();
                    for (k, w) in writes.iter().enumerate().filter(|(_, w)| w.node == node) {
                        let version = match &w.value {
                            Some(value) => http.kv_set(&admin, &w.key, value),
                            None => http.kv_action(&admin, "DELETE", &w.key, "").and_then(
                                |(code, body)| {
                                    ensure!(
                                        code == 200 && body["deleted"] == true,
                                        "DELETE /kv/{}: HTTP {code}: {body}",
                                        w.key
                                    );
                                    Ok(0)
                                },
                            ),
                        };
                        done.push((k, version.with_context(|| format!("node {node}"))?));
                    }
                    Ok(done)
                })
            })
            .collect();
        let mut versions = vec![0; writes.len()];
        let mut first_error = None;
        for t in threads {
            match t.join() {
                Ok(Ok(done)) => {
                    for (k, v) in done {
                        versions[k] = v;
                    }
                }
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(anyhow!("a writer thread panicked"));
                }
            }
        }
        first_error.map_or(Ok(versions), Err)
    })
}

/// `item` (node `i`'s listing) is `w`, written with `version`.
fn check_item(mesh: &Mesh, i: usize, item: &KvItem, w: &KvWrite, version: u64) -> Result<()> {
    ensure!(
        item.key == w.key
            && Some(&item.value) == w.value.as_ref()
            && item.writer == mesh.id(w.node)
            && item.version == version,
        "node {i} lists {item:?}; expected {:?} = {:?} by node {} (version {version})",
        w.key,
        w.value,
        w.node
    );
    Ok(())
}

/// `GET /kv/{key}` on node `i`; a failed request is pending.
fn kv_get_wait(mesh: &Mesh, i: usize, key: &str) -> Result<Option<KvEntry>, Wait> {
    mesh.http
        .kv_get(mesh.admin(i), key)
        .map_err(|e| Wait::Pending(format!("node {i}: {e:#}")))
}

/// `GET /kv?prefix=` on node `i`; a failed request is pending.
fn kv_list_wait(mesh: &Mesh, i: usize, prefix: &str) -> Result<Vec<KvItem>, Wait> {
    mesh.http
        .kv_list(mesh.admin(i), prefix)
        .map_err(|e| Wait::Pending(format!("node {i}: {e:#}")))
}

/// Every node of `nodes` reads `value` at `key`, written by `writer` and
/// leased to it.
fn every_node_reads(
    mesh: &Mesh,
    nodes: &[usize],
    key: &str,
    value: &str,
    writer: &str,
) -> Result<(), Wait> {
    for &i in nodes {
        match kv_get_wait(mesh, i, key)? {
            Some(e)
                if e.value == value
                    && e.writer == writer
                    && e.lease.as_ref().is_some_and(|l| l.owner == writer) => {}
            other => {
                return Err(Wait::Pending(format!(
                    "node {i} reads {other:?}, expected {value:?} by {}, leased to it",
                    mesh.label(writer)
                )));
            }
        }
    }
    Ok(())
}

/// A write answered 409 `lease_held` naming `owner`, with a lease that has
/// not lapsed.
fn check_lease_held(code: u16, body: &Value, owner: &str) -> Result<()> {
    let kind = error_code(body).map(|(code, _)| code);
    let holder = body.get("owner").and_then(Value::as_str);
    let until = body.get("until_ms").and_then(Value::as_u64);
    ensure!(
        code == 409
            && kind == Some("lease_held")
            && holder == Some(owner)
            && until.is_some_and(|u| u > unix_ms()),
        "answered {code} {body}; expected 409 lease_held with owner {owner} and until_ms in the \
         future"
    );
    Ok(())
}

/// Every node's `/kv-digest` (a failed request is pending).
fn kv_digests(mesh: &Mesh, nodes: &[usize]) -> Result<BTreeMap<usize, KvDigest>, Wait> {
    nodes
        .iter()
        .map(|&i| {
            mesh.http
                .kv_digest(mesh.admin(i))
                .map(|d| (i, d))
                .map_err(|e| Wait::Pending(format!("node {i}: {e:#}")))
        })
        .collect()
}

/// The `nodes` hold identical replicas: one `/kv-digest`, returned.
fn same_digest(mesh: &Mesh, nodes: &[usize]) -> Result<KvDigest, Wait> {
    let all = kv_digests(mesh, nodes)?;
    let Some(first) = all.values().next().cloned() else {
        return Err(Wait::Fatal("no nodes to compare".to_owned()));
    };
    if all.values().all(|d| d.digest == first.digest) {
        Ok(first)
    } else {
        Err(Wait::Pending(format!(
            "digests differ: {}",
            describe_digests(&all)
        )))
    }
}

/// `nodes 0, 2: 3f2a91c0 (1000 keys); node 1: 9c1d0e2b (998 keys)`.
fn describe_digests(all: &BTreeMap<usize, KvDigest>) -> String {
    let mut groups: BTreeMap<&str, (Vec<usize>, u64)> = BTreeMap::new();
    for (&i, d) in all {
        let g = groups
            .entry(&d.digest)
            .or_insert_with(|| (Vec::new(), d.keys));
        g.0.push(i);
    }
    let parts: Vec<String> = groups
        .iter()
        .map(|(digest, (nodes, keys))| {
            format!(
                "node{} {}: {} ({keys} keys)",
                if nodes.len() > 1 { "s" } else { "" },
                node_list(nodes),
                digest.get(..8).unwrap_or(digest)
            )
        })
        .collect();
    parts.join("; ")
}

/// `/status` sync.lease_lost of the `nodes`.
fn lease_lost(mesh: &Mesh, nodes: &[usize]) -> Result<BTreeMap<usize, u64>> {
    nodes
        .iter()
        .map(|&i| {
            let s = mesh
                .http
                .status(mesh.admin(i))
                .with_context(|| format!("node {i}"))?;
            Ok((i, s.sync.lease_lost))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Services (RPC)
// ---------------------------------------------------------------------------

/// Starts a new node serving the demo service under `service` (the
/// default name, `demo`, if `None`), seeded with `seeds`, and waits until
/// it is ready, connected, and lists the service in its `/status` as the
/// contract says. Returns its index.
fn spawn_provider(mesh: &mut Mesh, seeds: &[String], service: Option<&str>) -> Result<usize> {
    let mut args = vec![OsString::from("--serve-demo")];
    args.extend(service.map(OsString::from));
    let i = mesh.spawn_with(seeds, &args)?;
    mesh.wait_ready(i)?;
    let name = service.unwrap_or(DEMO_SERVICE);
    mesh.poll_until(
        &format!("node {i} (serving {name}) to be connected"),
        Poll::Only(&[i]),
        SCENARIO_TIMEOUT,
        |_, snap| {
            let s = snap.status(i)?;
            check_served(s, i, name)?;
            if s.connections.is_empty() {
                Err(Wait::Pending(format!("node {i} has no connection")))
            } else {
                Ok(())
            }
        },
    )?;
    Ok(i)
}

/// Node `i`'s `/status` lists the demo service as `name` (version 1, its
/// methods), and nothing else.
fn check_served(s: &Status, i: usize, name: &str) -> Result<(), Wait> {
    let names: Vec<&str> = s.served.iter().map(|x| x.name.as_str()).collect();
    match s.served(name) {
        Some(x) if x.version == 1 && x.methods == DEMO_METHODS && names.len() == 1 => Ok(()),
        _ => Err(Wait::Fatal(format!(
            "node {i} was started with --serve-demo {name}, but its /status served is {:?}; \
             expected exactly {name:?}, version 1, methods {DEMO_METHODS:?}",
            s.served
        ))),
    }
}

/// `GET /rpc/{service}/providers` of node `i`; a failed request is pending.
fn providers_wait(mesh: &Mesh, i: usize, service: &str) -> Result<Vec<RpcProvider>, Wait> {
    mesh.http
        .rpc_providers(mesh.admin(i), service)
        .map_err(|e| Wait::Pending(format!("node {i}: {e:#}")))
}

/// Waits until each of the `callers` lists exactly the `providers` (node
/// indexes) for `service`, with the demo service's version and methods,
/// and `local` reach for itself. Returns each caller's list, by caller.
fn wait_providers(
    mesh: &mut Mesh,
    callers: &[usize],
    service: &str,
    providers: &[usize],
) -> Result<BTreeMap<usize, Vec<RpcProvider>>> {
    let want: BTreeSet<String> = providers.iter().map(|&p| mesh.id(p).to_owned()).collect();
    mesh.poll_fn_until(
        &format!(
            "nodes {} to list node(s) {} as the providers of {service}",
            node_list(callers),
            node_list(providers)
        ),
        REGISTRY_TIMEOUT,
        |mesh| {
            let mut lists = BTreeMap::new();
            for &i in callers {
                let list = providers_wait(mesh, i, service)?;
                let got: BTreeSet<String> = list.iter().map(|p| p.node_id.clone()).collect();
                if got != want {
                    let names: Vec<String> = got.iter().map(|id| mesh.label(id)).collect();
                    return Err(Wait::Pending(format!(
                        "node {i} lists [{}]",
                        names.join(", ")
                    )));
                }
                for p in &list {
                    let local = p.node_id == mesh.id(i);
                    if p.version != 1 || p.methods != DEMO_METHODS || local != (p.reach == "local")
                    {
                        return Err(Wait::Fatal(format!(
                            "node {i} lists {} as {p:?}; expected version 1, methods \
                             {DEMO_METHODS:?}, reach local exactly for itself",
                            mesh.label(&p.node_id)
                        )));
                    }
                }
                lists.insert(i, list);
            }
            Ok(lists)
        },
    )
}

/// The reach node `caller` lists `provider` with.
fn reach_of(lists: &BTreeMap<usize, Vec<RpcProvider>>, caller: usize, provider_id: &str) -> String {
    lists
        .get(&caller)
        .and_then(|l| l.iter().find(|p| p.node_id == provider_id))
        .map_or_else(|| "unlisted".to_owned(), |p| p.reach.clone())
}

/// `POST /rpc/{service}/{method}` from node `i` that must answer 200;
/// returns the result and `elapsed_ms`.
fn rpc_ok(
    mesh: &Mesh,
    i: usize,
    service: &str,
    method: &str,
    args: &Value,
) -> Result<(Value, f64)> {
    let answer = mesh
        .http
        .rpc_call(mesh.admin(i), service, method, "", args, RPC_DEADLINE)
        .with_context(|| format!("node {i}: POST /rpc/{service}/{method} {args}"))?;
    match answer {
        RpcAnswer::Result { result, elapsed_ms } => Ok((result, elapsed_ms)),
        other => bail!(
            "node {i}: POST /rpc/{service}/{method} {args} answered {}; expected 200",
            other.describe()
        ),
    }
}

/// `/status` `calls` of each of the `nodes`.
fn call_counters(mesh: &Mesh, nodes: &[usize]) -> Result<BTreeMap<usize, CallCounters>> {
    nodes
        .iter()
        .map(|&i| {
            let s = mesh
                .http
                .status(mesh.admin(i))
                .with_context(|| format!("node {i}"))?;
            Ok((i, s.calls))
        })
        .collect()
}

fn scenario_rpc(mesh: &mut Mesh) -> Result<String> {
    ensure!(mesh.is_alive(0), "node 0 is not running");
    let members: Vec<usize> = mesh.alive().collect();
    wait_connected(mesh, &members)?;
    let seed = mesh.nodes[0].ready.listen[0].clone();
    let provider = spawn_provider(mesh, &[seed], None)?;
    let result = check_rpc(mesh, provider, &members);
    let stopped = mesh.stop(provider);
    let summary = result?;
    stopped.context("stopping the provider of the rpc scenario")?;
    Ok(summary)
}

/// Node `provider` serves the demo service as `demo`: every node calls it.
fn check_rpc(mesh: &mut Mesh, provider: usize, members: &[usize]) -> Result<String> {
    let service = DEMO_SERVICE;
    let provider_id = mesh.id(provider).to_owned();
    let mut callers = members.to_vec();
    callers.push(provider);
    let started = Instant::now();
    let lists = wait_providers(mesh, &callers, service, &[provider])?;
    let listed = started.elapsed();
    let reaches: BTreeMap<usize, String> = callers
        .iter()
        .map(|&i| (i, reach_of(&lists, i, &provider_id)))
        .collect();
    let before = call_counters(mesh, &callers)?;
    let served_before = mesh
        .http
        .status(mesh.admin(provider))?
        .served(service)
        .map_or(0, |s| s.calls);

    // An echo from every node.
    let mut elapsed = Vec::new();
    for &i in &callers {
        let text = unique_payload(&format!("rpc from node {i}"));
        let (result, ms) = rpc_ok(mesh, i, service, "echo", &serde_json::json!([text]))?;
        ensure!(
            result == Value::String(text.clone()),
            "node {i}: echo of {text:?} answered {result}"
        );
        elapsed.push(ms);
    }
    // One counter, on the provider: each caller adds its position + 1.
    let mut total: i64 = 0;
    let mut totals = Vec::new();
    for (k, &i) in callers.iter().enumerate() {
        let n = k as i64 + 1;
        total += n;
        let (result, _) = rpc_ok(mesh, i, service, "add", &serde_json::json!([n]))?;
        ensure!(
            result.as_i64() == Some(total),
            "node {i}: add({n}) answered {result}; the counter on node {provider} should be at \
             {total} (each earlier caller added its position + 1)"
        );
        totals.push(total.to_string());
    }
    let (result, _) = rpc_ok(mesh, members[0], service, "whoami", &serde_json::json!([]))?;
    ensure!(
        result == Value::String(provider_id.clone()),
        "node {}: whoami answered {result}, expected node {provider}'s id",
        members[0]
    );

    // The counters: each caller made 2 calls (node 0 one more), the
    // provider served them all.
    let after = call_counters(mesh, &callers)?;
    for &i in &callers {
        let (b, a) = (before[&i], after[&i]);
        let want = if i == members[0] { 3 } else { 2 };
        ensure!(
            a.calls - b.calls == want && a.failures == b.failures,
            "node {i}'s /status calls went from {b:?} to {a:?}; it made {want} calls, all \
             answered"
        );
    }
    let calls = callers.len() as u64 * 2 + 1;
    let s = mesh.http.status(mesh.admin(provider))?;
    let served = s.served(service).cloned().unwrap_or_default();
    ensure!(
        served.calls - served_before == calls && served.errors == 0 && served.in_flight == 0,
        "node {provider}'s /status served {service} shows {served:?}; expected {calls} calls \
         more than {served_before}, no error, none in flight"
    );

    let mut counted: BTreeMap<String, usize> = BTreeMap::new();
    for r in reaches.values() {
        *counted.entry(r.clone()).or_default() += 1;
    }
    elapsed.sort_by(f64::total_cmp);
    Ok(format!(
        "node {provider} (new, seeded with node 0) serves {service}: listed by all {} nodes \
         within {} (reach: {}); echo from each node right (elapsed_ms median {:.1}, max {:.1}); \
         add from each: running totals {} on the one counter; whoami from node {} names node \
         {provider}; {calls} calls counted by the provider, each caller's calls counted",
        callers.len(),
        fmt_duration(listed),
        counts(&counted),
        median(&elapsed).unwrap_or_default(),
        elapsed.last().copied().unwrap_or_default(),
        totals.join(","),
        members[0]
    ))
}

fn scenario_rpc_route(mesh: &mut Mesh) -> Result<String> {
    let mut line = Vec::new();
    let result = spawn_line(mesh, &mut line, |k| {
        if k == LINE_NODES - 1 {
            vec![
                OsString::from("--serve-demo"),
                OsString::from(RPC_ROUTE_SERVICE),
            ]
        } else {
            Vec::new()
        }
    })
    .and_then(|()| check_rpc_route(mesh, &line));
    mesh.finish(&line, "the nodes of the rpc-route scenario", result)
}

/// `line` is a line of new nodes whose last one serves the demo service:
/// the first calls it, 4 hops away.
fn check_rpc_route(mesh: &mut Mesh, line: &[usize]) -> Result<String> {
    let service = RPC_ROUTE_SERVICE;
    let formed = wait_line(mesh, line)?;
    let (first, second, last) = (line[0], line[1], line[line.len() - 1]);
    let hops = (line.len() - 1) as u64;
    let (second_id, last_id) = (mesh.id(second).to_owned(), mesh.id(last).to_owned());
    mesh.check_now("the provider's /status", Poll::Only(&[last]), |_, snap| {
        check_served(snap.status(last)?, last, service)
    })?;

    // The registry entry travels along the line; each node sees the
    // provider as near as it is.
    let started = Instant::now();
    let lists = wait_providers(mesh, line, service, &[last])?;
    let listed = started.elapsed();
    for (k, &i) in line.iter().enumerate() {
        let want = match line.len() - 1 - k {
            0 => "local",
            1 => "neighbour",
            _ => "routed",
        };
        let got = reach_of(&lists, i, &last_id);
        ensure!(
            got == want,
            "node {i} ({} hops from node {last}) lists it as {got}, expected {want}",
            line.len() - 1 - k
        );
    }

    let text = unique_payload("rpc-route");
    let asked = Instant::now();
    let (result, elapsed_ms) = rpc_ok(mesh, first, service, "echo", &serde_json::json!([text]))?;
    let took = asked.elapsed();
    ensure!(
        result == Value::String(text.clone()),
        "node {first}: echo of {text:?} from node {last}, {hops} hops away, answered {result}"
    );
    let (who, whoami_ms) = rpc_ok(mesh, first, service, "whoami", &serde_json::json!([]))?;
    ensure!(
        who == Value::String(last_id.clone()),
        "node {first}: whoami answered {who}, expected node {last}'s id"
    );

    let route = mesh.poll_until(
        &format!(
            "node {first}'s /status to list node {last} {hops} hops away through node {second}"
        ),
        Poll::Only(line),
        DELIVERY_TIMEOUT,
        |mesh, snap| {
            let s = snap.status(first)?;
            let Some(route) = s.routes.iter().find(|r| r.target == last_id) else {
                return Err(Wait::Pending(format!(
                    "no route to node {last}; routes: {}",
                    describe_routes(mesh, &s.routes)
                )));
            };
            if route.hops != hops || route.next_hop != second_id {
                return Err(Wait::Fatal(format!(
                    "node {first} routes to node {last} {} hop(s) through {}, expected {hops} \
                     through node {second}",
                    route.hops,
                    mesh.label(&route.next_hop)
                )));
            }
            let served = snap
                .status(last)?
                .served(service)
                .cloned()
                .unwrap_or_default();
            if served.calls != 2 || served.errors != 0 {
                return Err(Wait::Fatal(format!(
                    "node {last}'s /status served shows {served:?}; expected the 2 calls, no error"
                )));
            }
            Ok(route.clone())
        },
    )?;
    let providers = mesh.http.rpc_providers(mesh.admin(first), service)?;
    let latency = providers.first().and_then(|p| p.latency_ms);
    ensure!(
        providers.len() == 1
            && providers[0].reach == "routed"
            && latency.is_some()
            && providers[0].in_flight == 0,
        "node {first} lists {providers:?} after two answered calls; expected node {last}, \
         routed, with a latency and no call in flight"
    );
    Ok(format!(
        "line {} formed in {}; node {last} serves {service}, listed along the line within {} \
         (routed, routed, routed, neighbour, local); node {first} -> node {last} ({hops} \
         hops): echo right in {} (elapsed_ms {elapsed_ms:.1}), whoami names node {last} \
         (elapsed_ms {whoami_ms:.1}); route {} hops via node {second}; provider latency {:.1} \
         ms",
        line_name(line),
        fmt_duration(formed),
        fmt_duration(listed),
        fmt_duration(took),
        route.hops,
        latency.unwrap_or_default()
    ))
}

fn scenario_rpc_errors(mesh: &mut Mesh) -> Result<String> {
    ensure!(mesh.is_alive(0), "node 0 is not running");
    let members: Vec<usize> = mesh.alive().collect();
    wait_connected(mesh, &members)?;
    let seed = mesh.nodes[0].ready.listen[0].clone();
    let provider = spawn_provider(mesh, &[seed], Some(RPC_ERRORS_SERVICE))?;
    let result = check_rpc_errors(mesh, provider, &members);
    let stopped = mesh.stop(provider);
    let summary = result?;
    stopped.context("stopping the provider of the rpc-errors scenario")?;
    Ok(summary)
}

/// `POST /rpc` from node `i` that must fail with HTTP `http` and `code`
/// within `limit`; returns the body and how long it took.
fn rpc_refused(
    mesh: &Mesh,
    i: usize,
    (service, method, query): (&str, &str, &str),
    args: &Value,
    deadline: Duration,
    (http, code): (u16, &str),
    limit: Duration,
) -> Result<(Value, Duration)> {
    let asked = Instant::now();
    let answer = mesh
        .http
        .rpc_call(mesh.admin(i), service, method, query, args, deadline)
        .with_context(|| format!("node {i}: POST /rpc/{service}/{method}{query} {args}"))?;
    let took = asked.elapsed();
    let body = match answer {
        RpcAnswer::Error {
            http: h,
            code: c,
            body,
            ..
        } if h == http && c == code => body,
        other => bail!(
            "node {i}: POST /rpc/{service}/{method}{query} {args} answered {}; expected HTTP \
             {http} {code:?}",
            other.describe()
        ),
    };
    ensure!(
        took <= limit,
        "node {i}: POST /rpc/{service}/{method}{query} answered {http} {code:?} after {}; \
         expected it within {}",
        fmt_duration(took),
        fmt_duration(limit)
    );
    Ok((body, took))
}

/// Node `provider` serves the demo service as [`RPC_ERRORS_SERVICE`]: a
/// neighbour of it gets every kind of refusal.
fn check_rpc_errors(mesh: &mut Mesh, provider: usize, members: &[usize]) -> Result<String> {
    let service = RPC_ERRORS_SERVICE;
    let provider_id = mesh.id(provider).to_owned();
    let lists = wait_providers(mesh, members, service, &[provider])?;
    let Some(caller) = members
        .iter()
        .copied()
        .find(|&i| reach_of(&lists, i, &provider_id) == "neighbour")
    else {
        bail!("no node lists node {provider} (seeded with node 0) as a neighbour provider");
    };
    let before = call_counters(mesh, &[caller])?[&caller];
    let served_before = mesh
        .http
        .status(mesh.admin(provider))?
        .served(service)
        .cloned()
        .unwrap_or_default();

    let nobody = format!("tm.nobody-{}", std::process::id());
    let (_, no_provider) = rpc_refused(
        mesh,
        caller,
        (&nobody, "echo", ""),
        &serde_json::json!(["x"]),
        RPC_DEADLINE,
        (404, "no_provider"),
        NO_PROVIDER_LIMIT,
    )?;
    rpc_refused(
        mesh,
        caller,
        (service, "nope", ""),
        &serde_json::json!([]),
        RPC_DEADLINE,
        (404, "unknown_method"),
        RPC_DEADLINE,
    )?;
    let message = unique_payload("rpc-errors");
    let (body, _) = rpc_refused(
        mesh,
        caller,
        (service, "fail", ""),
        &serde_json::json!([message]),
        RPC_DEADLINE,
        (422, "application"),
        RPC_DEADLINE,
    )?;
    let want = serde_json::json!({"refused": {"message": message}});
    ensure!(
        body.get("application") == Some(&want),
        "node {caller}: fail answered 422 {body}; expected \"application\": {want}"
    );
    rpc_refused(
        mesh,
        caller,
        (service, "add", ""),
        &serde_json::json!(["two"]),
        RPC_DEADLINE,
        (400, "decode"),
        RPC_DEADLINE,
    )?;
    let (body, _) = rpc_refused(
        mesh,
        caller,
        (service, "echo", "&version=2"),
        &serde_json::json!(["x"]),
        RPC_DEADLINE,
        (409, "version_mismatch"),
        RPC_DEADLINE,
    )?;
    ensure!(
        body.get("wanted") == Some(&Value::from(2)) && body.get("served") == Some(&Value::from(1)),
        "node {caller}: version 2 answered 409 {body}; expected wanted 2, served 1"
    );

    // A sleep far longer than its deadline: 504 at the deadline, and the
    // provider stops it (it would sleep for seconds more).
    let (_, timed_out) = rpc_refused(
        mesh,
        caller,
        (service, "sleep", ""),
        &serde_json::json!([SLEEP_MS]),
        SLEEP_DEADLINE,
        (504, "timeout"),
        SLEEP_ANSWER_LIMIT,
    )?;
    ensure!(
        timed_out + Duration::from_millis(50) >= SLEEP_DEADLINE,
        "node {caller}: sleep({SLEEP_MS}) with deadline_ms {} answered 504 after only {}",
        SLEEP_DEADLINE.as_millis(),
        fmt_duration(timed_out)
    );
    let cancel_started = Instant::now();
    let served = mesh.poll_until(
        &format!("node {provider}'s /status to count the sleep cancelled"),
        Poll::Only(&[provider]),
        SLEEP_ANSWER_LIMIT,
        |_, snap| {
            let s = snap
                .status(provider)?
                .served(service)
                .cloned()
                .unwrap_or_default();
            if s.cancelled > served_before.cancelled && s.in_flight == 0 {
                Ok(s)
            } else {
                Err(Wait::Pending(format!("served {service}: {s:?}")))
            }
        },
    )?;
    let cancelled_after = cancel_started.elapsed();
    // Ran: fail, add (its arguments did not decode), sleep.
    let ran = served.calls - served_before.calls;
    let errors = served.errors - served_before.errors;
    let cancelled = served.cancelled - served_before.cancelled;
    ensure!(
        (ran, errors, cancelled) == (3, 2, 1),
        "node {provider}'s served {service} went from {served_before:?} to {served:?}; \
         expected 3 calls more (fail, add, sleep), 2 errors (fail, add) and 1 cancelled (sleep)"
    );
    let after = call_counters(mesh, &[caller])?[&caller];
    ensure!(
        after.calls - before.calls == 6 && after.failures - before.failures == 6,
        "node {caller}'s /status calls went from {before:?} to {after:?}; it made 6 calls, \
         all failed"
    );
    Ok(format!(
        "node {caller} calls node {provider} (neighbour): unknown service 404 no_provider in {}, \
         unknown method 404 unknown_method, fail 422 application with the typed error {want}, \
         bad arguments 400 decode, version 2 409 version_mismatch; sleep({SLEEP_MS}) with \
         deadline_ms {}: 504 timeout after {}, counted cancelled by the provider (none in \
         flight) within {} of the 504",
        fmt_duration(no_provider),
        SLEEP_DEADLINE.as_millis(),
        fmt_duration(timed_out),
        fmt_duration(cancelled_after)
    ))
}

/// The running nodes once they form one connected mesh, and their listen
/// addresses (to seed a new node with all of them: it links to a few and
/// finds the rest by discovery).
fn members_and_seeds(mesh: &mut Mesh) -> Result<(Vec<usize>, Vec<String>)> {
    ensure!(mesh.is_alive(0), "node 0 is not running");
    let members: Vec<usize> = mesh.alive().collect();
    wait_connected(mesh, &members)?;
    let seeds: Vec<String> = members
        .iter()
        .map(|&i| mesh.nodes[i].ready.listen[0].clone())
        .collect();
    Ok((members, seeds))
}

/// Inbound slots a node of test-mesh keeps for its own dials (the peer
/// manager's default `outbound_reserved`, see [`PeerLimits::for_mesh`]).
const OUTBOUND_RESERVED: u64 = 2;

/// The node of `members` with the most room for inbound peers now: the
/// fewest of its inbound slots and of all its slots left. (Not the one with
/// the fewest connections: node 0, everybody's seed, has its inbound slots
/// full with fewer connections than others, and refuses in the handshake.)
fn most_inbound_room(mesh: &Mesh, members: &[usize]) -> Result<usize> {
    let mut best = None;
    for &i in members {
        let pool = mesh.http.status(mesh.admin(i))?.pool;
        let inbound_limit = pool.max_peers.saturating_sub(OUTBOUND_RESERVED);
        let room = inbound_limit
            .saturating_sub(pool.inbound)
            .min(pool.max_peers.saturating_sub(pool.connected));
        if best.is_none_or(|(_, r)| room > r) {
            best = Some((i, room));
        }
    }
    best.map(|(i, _)| i)
        .ok_or_else(|| anyhow!("no node to seed the providers with"))
}

fn scenario_rpc_failover(mesh: &mut Mesh) -> Result<String> {
    let (members, _) = members_and_seeds(mesh)?;
    // Both providers are seeded with one node only, the one with the most
    // room for inbound peers (two more), which then has both as neighbours
    // and makes the calls. (Seeded with every node, a provider links to a few
    // of them: in a mesh of 16, two providers may share no neighbour.)
    let caller = most_inbound_room(mesh, &members)?;
    let seeds = [mesh.nodes[caller].ready.listen[0].clone()];
    let mut providers = Vec::new();
    let mut result = Ok(String::new());
    for _ in 0..2 {
        match spawn_provider(mesh, &seeds, Some(RPC_FAILOVER_SERVICE)) {
            Ok(i) => providers.push(i),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if result.is_ok() {
        result = check_rpc_failover(mesh, &providers, &members, caller);
    }
    mesh.finish(
        &providers,
        "the surviving provider of the rpc-failover scenario",
        result,
    )
}

/// One call of the `rpc-failover` stream.
#[derive(Debug)]
struct StreamCall {
    k: usize,
    method: &'static str,
    /// Since the stream started.
    started: Duration,
    took: Duration,
    answer: Result<RpcAnswer, String>,
}

/// Two nodes serve [`RPC_FAILOVER_SERVICE`]; `caller`, a neighbour of both
/// (their seed), streams calls at them, and the one that answered most is
/// killed midway.
fn check_rpc_failover(
    mesh: &mut Mesh,
    providers: &[usize],
    members: &[usize],
    caller: usize,
) -> Result<String> {
    let service = RPC_FAILOVER_SERVICE;
    let ids: Vec<String> = providers.iter().map(|&p| mesh.id(p).to_owned()).collect();
    let lists = wait_providers(mesh, members, service, providers)?;
    ensure!(
        ids.iter()
            .all(|id| reach_of(&lists, caller, id) == "neighbour"),
        "node {caller}, the seed of both providers (nodes {}), does not list both as \
         neighbours: {lists:?}",
        node_list(providers)
    );
    let before = call_counters(mesh, &[caller])?[&caller];
    let admin = mesh.admin(caller).to_owned();

    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let calls = std::sync::Mutex::new(Vec::<StreamCall>::new());
    let t0 = Instant::now();
    let mut victim = None;
    let mut killed_at = None;
    thread::scope(|scope| {
        for _ in 0..FAILOVER_WORKERS {
            scope.spawn(|| {
                let http = Http::new();
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if k >= FAILOVER_CALLS {
                        break;
                    }
                    // Paced: call k goes out k paces after the start.
                    let at = t0 + FAILOVER_PACE * k as u32;
                    thread::sleep(at.saturating_duration_since(Instant::now()));
                    let (method, query, args) = match k % 3 {
                        0 => ("whoami", "&idempotent=true", serde_json::json!([])),
                        1 => ("echo", "", serde_json::json!([format!("call {k}")])),
                        _ => (
                            "sleep",
                            "&idempotent=true",
                            serde_json::json!([FAILOVER_SLEEP_MS]),
                        ),
                    };
                    let started = t0.elapsed();
                    let answer = http
                        .rpc_call(&admin, service, method, query, &args, FAILOVER_DEADLINE)
                        .map_err(|e| format!("{e:#}"));
                    let call = StreamCall {
                        k,
                        method,
                        started,
                        took: t0.elapsed() - started,
                        answer,
                    };
                    calls
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(call);
                    done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
        // Midway, kill a provider while it runs calls: the one running
        // most (the one that answered most whoami so far on a tie).
        let half = FAILOVER_CALLS / 2;
        let end = Instant::now() + FAILOVER_PACE * FAILOVER_CALLS as u32 + RPC_DEADLINE;
        while done.load(std::sync::atomic::Ordering::SeqCst) < half && Instant::now() < end {
            thread::sleep(Duration::from_millis(1));
        }
        let answered = {
            let calls = calls
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut n = vec![0usize; ids.len()];
            for c in calls.iter() {
                if let Ok(RpcAnswer::Result { result, .. }) = &c.answer {
                    if let Some(p) = ids.iter().position(|id| result.as_str() == Some(id)) {
                        n[p] += 1;
                    }
                }
            }
            n
        };
        let end = Instant::now() + FAILOVER_PACE * (FAILOVER_CALLS / 4) as u32;
        let (p, running) = loop {
            let running: Vec<u64> = providers
                .iter()
                .map(|&i| {
                    mesh.http
                        .status(mesh.admin(i))
                        .map_or(0, |s| s.served(service).map_or(0, |x| x.in_flight))
                })
                .collect();
            let p = (0..providers.len())
                .max_by_key(|&p| (running[p], answered[p]))
                .unwrap_or(0);
            if running[p] > 0 || Instant::now() >= end {
                break (p, running[p]);
            }
        };
        mesh.kill(providers[p]);
        killed_at = Some(t0.elapsed());
        victim = Some((p, answered, running));
    });
    let (Some((p, answered_before, running)), Some(killed_at)) = (victim, killed_at) else {
        bail!("the stream ended without a kill");
    };
    let (victim, survivor) = (providers[p], providers[1 - p]);
    let survivor_id = &ids[1 - p];
    let mut calls = calls
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    calls.sort_by_key(|c| c.k);
    ensure!(
        calls.len() == FAILOVER_CALLS,
        "{} of the {FAILOVER_CALLS} calls were made",
        calls.len()
    );

    let mut failed = Vec::new();
    let mut after_kill = 0;
    let mut max_took = Duration::ZERO;
    for c in &calls {
        max_took = max_took.max(c.took);
        let what = format!(
            "call {} ({}, started {} after the stream began; the kill was at {})",
            c.k,
            c.method,
            fmt_duration(c.started),
            fmt_duration(killed_at)
        );
        let answer = match &c.answer {
            Ok(a) => a,
            Err(e) => bail!(
                "{what}: no answer within its deadline ({}) plus {}: {e}",
                fmt_duration(FAILOVER_DEADLINE),
                fmt_duration(RPC_SLACK)
            ),
        };
        ensure!(
            c.took <= FAILOVER_DEADLINE + RPC_SLACK,
            "{what} took {}",
            fmt_duration(c.took)
        );
        match answer {
            RpcAnswer::Result { result, .. } => {
                let (right, expected) = match c.method {
                    "whoami" => (
                        ids.iter().any(|id| result.as_str() == Some(id))
                            && (c.started < killed_at || result.as_str() == Some(survivor_id)),
                        "a provider's id (the survivor's for a call started after the kill)",
                    ),
                    "sleep" => (
                        result.as_u64().is_some_and(|ms| ms >= FAILOVER_SLEEP_MS),
                        "the ms slept, at least the ms asked for",
                    ),
                    _ => (
                        result.as_str() == Some(&format!("call {}", c.k)),
                        "its echo",
                    ),
                };
                ensure!(right, "{what} answered {result}; expected {expected}");
                if c.started > killed_at {
                    after_kill += 1;
                }
            }
            RpcAnswer::Error { code, .. } => {
                ensure!(
                    code == "disconnected" || code == "timeout",
                    "{what} failed with {}; only disconnected or timeout may",
                    answer.describe()
                );
                ensure!(
                    c.started + c.took >= killed_at && c.started < killed_at + FAILOVER_GRACE,
                    "{what} failed with {}, but it was not in flight at the kill",
                    answer.describe()
                );
                failed.push(format!("{} {}", c.k, code));
            }
        }
    }
    ensure!(
        failed.len() <= FAILOVER_WORKERS,
        "{} calls failed ({}); at most the {FAILOVER_WORKERS} in flight at the kill may",
        failed.len(),
        failed.join(", ")
    );
    ensure!(after_kill > 0, "no call started after the kill succeeded");
    let after = call_counters(mesh, &[caller])?[&caller];
    ensure!(
        after.calls - before.calls == FAILOVER_CALLS as u64
            && after.failures - before.failures == failed.len() as u64,
        "node {caller}'s /status calls went from {before:?} to {after:?}; it made \
         {FAILOVER_CALLS} calls, {} failed",
        failed.len()
    );
    let s = mesh.http.status(mesh.admin(survivor))?;
    let served = s.served(service).cloned().unwrap_or_default();
    ensure!(
        served.in_flight == 0,
        "node {survivor} still runs {} calls: {served:?}",
        served.in_flight
    );
    Ok(format!(
        "nodes {victim} and {survivor} serve {service}; node {caller} (a neighbour of both) made \
         {FAILOVER_CALLS} calls on {FAILOVER_WORKERS} threads, one every {} (whoami and \
         sleep({FAILOVER_SLEEP_MS}) idempotent, echo not); kill -9 node {victim} at {} while it \
         ran {running} call(s) (it had answered {} whoami, node {survivor} {}): {} calls \
         failed ({}), {after_kill} started after the kill answered, whoami naming node \
         {survivor}; slowest call {}; {} retries on another provider; node {survivor} served {} \
         calls",
        fmt_duration(FAILOVER_PACE),
        fmt_duration(killed_at),
        answered_before[p],
        answered_before[1 - p],
        failed.len(),
        if failed.is_empty() {
            "none".to_owned()
        } else {
            failed.join(", ")
        },
        fmt_duration(max_took),
        after.retries - before.retries,
        served.calls
    ))
}

/// `churn`: a stable provider, load from every other node, and nodes
/// coming and going meanwhile (see the registry).
fn scenario_rpc_partition(mesh: &mut Mesh) -> Result<String> {
    let (members, seeds) = members_and_seeds(mesh)?;
    // Seeded with node 0, which is in the provider's half.
    let provider = spawn_provider(mesh, &seeds[..1], Some(RPC_PARTITION_SERVICE))?;
    let result = check_rpc_partition(mesh, provider, &members);
    mesh.finish(
        &[provider],
        "the provider of the rpc-partition scenario",
        result,
    )
}

/// Node `provider` serves the demo service as [`RPC_PARTITION_SERVICE`]:
/// the mesh is cut in two, the provider on node 0's side, and healed.
fn check_rpc_partition(mesh: &mut Mesh, provider: usize, members: &[usize]) -> Result<String> {
    let service = RPC_PARTITION_SERVICE;
    let mut everyone = members.to_vec();
    everyone.push(provider);
    wait_providers(mesh, &everyone, service, &[provider])?;
    let half = members.len() / 2;
    let mut first = members[..half].to_vec();
    first.push(provider);
    let second = members[half..].to_vec();

    let cut_at = Instant::now();
    let during = check_split(mesh, &first, &second).and_then(|split| {
        Ok(format!(
            "{split}; {}",
            check_cut(mesh, provider, &first, &second, cut_at)?
        ))
    });
    let unblocked_at = Instant::now();
    let unblocked = set_blocks(mesh, &first, &second, "unblock");
    let during = during?;
    unblocked?;

    let provider_id = mesh.id(provider).to_owned();
    mesh.poll_fn_until(
        &format!(
            "nodes {} to call {service} on node {provider} again after unblocking",
            node_list(&second)
        ),
        REPAIR_TIMEOUT,
        |mesh| {
            for &i in &second {
                whoami_across(mesh, i, &provider_id, provider)?;
            }
            Ok(())
        },
    )?;
    let healed = unblocked_at.elapsed();
    wait_providers(mesh, &everyone, service, &[provider])?;
    Ok(format!(
        "provider node {provider}; {during}; unblocked: nodes {} called it again after {}, \
         every node lists it",
        node_list(&second),
        fmt_duration(healed)
    ))
}

/// The calls while the halves are cut apart (since `cut_at`): the
/// provider's half keeps calling it; the other half gets a typed error,
/// then forgets the provider and answers `no_provider` at once.
fn check_cut(
    mesh: &mut Mesh,
    provider: usize,
    first: &[usize],
    second: &[usize],
    cut_at: Instant,
) -> Result<String> {
    let service = RPC_PARTITION_SERVICE;
    provider_half_calls(mesh, provider, first, "as the cut began")?;

    // A call from the far side while it may still list the provider.
    let far = second[0];
    let asked = Instant::now();
    let answer = whoami(mesh, far).context("across the cut")?;
    let took = asked.elapsed();
    // The route search ends once every node of the far half has answered
    // "not through me": well before its timeout, and so before the call's
    // deadline.
    let first_code = match answer {
        RpcAnswer::Error { code, .. }
            if ["disconnected", "no_provider"].contains(&code.as_str())
                && took < ROUTE_SEARCH_TIMEOUT =>
        {
            code
        }
        other => bail!(
            "node {far}: whoami across the cut answered {} after {}; expected disconnected or \
             no_provider within the route search timeout ({})",
            other.describe(),
            fmt_duration(took),
            fmt_duration(ROUTE_SEARCH_TIMEOUT)
        ),
    };

    // The far side forgets the provider once its registry entry expires.
    let limit = PARTITION_FORGET_TIMEOUT.saturating_sub(cut_at.elapsed());
    mesh.poll_fn_until(
        &format!(
            "nodes {} to stop listing node {provider} as a provider of {service}",
            node_list(second)
        ),
        limit,
        |mesh| {
            for &i in second {
                let list = providers_wait(mesh, i, service)?;
                if let Some(p) = list.first() {
                    return Err(Wait::Pending(format!(
                        "node {i} still lists {} ({})",
                        mesh.label(&p.node_id),
                        p.reach
                    )));
                }
            }
            Ok(())
        },
    )?;
    let forgot = cut_at.elapsed();
    let mut slowest = Duration::ZERO;
    for &i in second {
        let (_, took) = rpc_refused(
            mesh,
            i,
            (service, "whoami", ""),
            &serde_json::json!([]),
            PARTITION_CALL_DEADLINE,
            (404, "no_provider"),
            NO_PROVIDER_LIMIT,
        )?;
        slowest = slowest.max(took);
    }
    provider_half_calls(mesh, provider, first, "once the other half forgot it")?;
    Ok(format!(
        "across the cut node {far} answered {first_code} in {}; nodes {} forgot the provider \
         {} after the cut and answered no_provider within {}; nodes {} kept calling it",
        fmt_duration(took),
        node_list(second),
        fmt_duration(forgot),
        fmt_duration(slowest),
        node_list(&first[..first.len() - 1])
    ))
}

/// Every node of the provider's half (`first`, the provider last) calls
/// `whoami` and is answered with the provider's id; `when` names the moment
/// in the error.
fn provider_half_calls(mesh: &Mesh, provider: usize, first: &[usize], when: &str) -> Result<()> {
    let provider_id = mesh.id(provider);
    for &i in first.iter().filter(|&&i| i != provider) {
        if let Err(Wait::Pending(m) | Wait::Fatal(m)) =
            whoami_across(mesh, i, provider_id, provider)
        {
            bail!("in the provider's half, {when}: {m}");
        }
    }
    Ok(())
}

/// `POST /rpc/<rpc-partition service>/whoami` from node `i`.
fn whoami(mesh: &Mesh, i: usize) -> Result<RpcAnswer> {
    let service = RPC_PARTITION_SERVICE;
    mesh.http
        .rpc_call(
            mesh.admin(i),
            service,
            "whoami",
            "",
            &serde_json::json!([]),
            PARTITION_CALL_DEADLINE,
        )
        .with_context(|| format!("node {i}: POST /rpc/{service}/whoami"))
}

/// Node `i` calls `whoami` on the rpc-partition service: pending unless it
/// answers, fatal if it names anyone but `provider`.
fn whoami_across(mesh: &Mesh, i: usize, provider_id: &str, provider: usize) -> Result<(), Wait> {
    let answer = whoami(mesh, i).map_err(|e| Wait::Pending(format!("{e:#}")))?;
    match answer {
        RpcAnswer::Result { result, .. } if result == Value::String(provider_id.to_owned()) => {
            Ok(())
        }
        RpcAnswer::Result { result, .. } => Err(Wait::Fatal(format!(
            "node {i}: whoami answered {result}, expected node {provider}'s id"
        ))),
        other => Err(Wait::Pending(format!(
            "node {i}: whoami answered {}",
            other.describe()
        ))),
    }
}

fn scenario_churn(mesh: &mut Mesh) -> Result<String> {
    let (members, seeds) = members_and_seeds(mesh)?;
    let provider = spawn_provider(mesh, &seeds, Some(CHURN_SERVICE))?;
    let result = check_churn(mesh, provider, &members, &seeds);
    mesh.finish(&[provider], "the provider of the churn scenario", result)
}

/// Starts, then kills or stops, [`CHURN_ROUNDS`] rounds of
/// [`CHURNERS_PER_ROUND`] nodes (each seeded with one of `seeds`) while
/// `counts` shows no failure; their indexes and how many were killed.
fn churn_rounds(
    mesh: &mut Mesh,
    seeds: &[String],
    counts: &LoadCounts,
) -> Result<(Vec<usize>, usize)> {
    let mut churners = Vec::new();
    let mut killed = 0;
    for round in 0..CHURN_ROUNDS {
        if counts.failed() {
            break;
        }
        let mut batch = Vec::new();
        for k in 0..CHURNERS_PER_ROUND {
            let seed = &seeds[(round * CHURNERS_PER_ROUND + k) % seeds.len()];
            let args = [
                OsString::from("--serve-demo"),
                OsString::from(CHURNER_SERVICE),
            ];
            batch.push(mesh.spawn_with(std::slice::from_ref(seed), &args)?);
        }
        for &i in &batch {
            mesh.wait_ready(i)?;
        }
        churners.extend(&batch);
        thread::sleep(CHURN_LIFETIME);
        for (k, &i) in batch.iter().enumerate() {
            if (round * CHURNERS_PER_ROUND + k) % 2 == 0 {
                mesh.kill(i);
                killed += 1;
            } else {
                mesh.stop(i)?;
            }
        }
    }
    Ok((churners, killed))
}

/// Loads the mesh from the provider's neighbours among `members` (one
/// thread each, as in `soak`) while [`churn_rounds`] runs, then checks that the short-lived
/// nodes left no trace but tombstones.
fn check_churn(
    mesh: &mut Mesh,
    provider: usize,
    members: &[usize],
    seeds: &[String],
) -> Result<String> {
    use std::sync::atomic::Ordering::Relaxed;
    let lists = wait_providers(mesh, members, CHURN_SERVICE, &[provider])?;
    // Only the provider's neighbours call it: a routed call may go through
    // a short-lived node, and when that dies under the call the answer
    // comes back only if the provider finds another route in time.
    let provider_id = mesh.id(provider).to_owned();
    let callers: Vec<usize> = members
        .iter()
        .copied()
        .filter(|&i| reach_of(&lists, i, &provider_id) == "neighbour")
        .collect();
    ensure!(
        !callers.is_empty(),
        "no node lists node {provider} as a neighbour: {lists:?}"
    );
    let admins: Vec<String> = callers.iter().map(|&i| mesh.admin(i).to_owned()).collect();
    let tombstones_before = mesh.poll_until(
        "the nodes' /status before the churn",
        Poll::Only(members),
        SCENARIO_TIMEOUT,
        |_, snap| tombstones(snap, members),
    )?;
    let (churned, took, counts) = under_load(&admins, CHURN_SERVICE, "churn", |counts| {
        churn_rounds(mesh, seeds, counts)
    });
    let (churners, killed) = churned?;
    counts.check(took)?;
    let ids: Vec<String> = churners.iter().map(|&i| mesh.id(i).to_owned()).collect();
    let ended = Instant::now();
    mesh.poll_until(
        "no node to list the short-lived nodes",
        Poll::Only(members),
        REPAIR_TIMEOUT,
        |_, snap| {
            let mut still = Vec::new();
            for (&c, id) in churners.iter().zip(&ids) {
                for how in still_listing(snap, members, id)? {
                    still.push(format!("{how} lists node {c}"));
                }
            }
            if still.is_empty() {
                Ok(())
            } else {
                Err(Wait::Pending(still.join(", ")))
            }
        },
    )?;
    let forgotten = ended.elapsed();
    mesh.poll_fn_until(
        &format!("no node to list a provider of {CHURNER_SERVICE}"),
        CHURN_REGISTRY_TIMEOUT,
        |mesh| {
            for &i in members {
                let listed = providers_wait(mesh, i, CHURNER_SERVICE)?;
                if !listed.is_empty() {
                    return Err(Wait::Pending(format!(
                        "node {i} lists {} provider(s) of {CHURNER_SERVICE}",
                        listed.len()
                    )));
                }
            }
            Ok(())
        },
    )?;
    let unlisted = ended.elapsed();
    let tombstones_after = mesh.poll_until(
        "every node to forget the tombstones of the short-lived nodes' registry entries",
        Poll::Only(members),
        CHURN_TOMBSTONE_TIMEOUT,
        |_, snap| {
            let now = tombstones(snap, members)?;
            let left: Vec<String> = members
                .iter()
                .zip(now.iter().zip(&tombstones_before))
                .filter(|(_, (n, b))| n > b)
                .map(|(i, (n, b))| format!("node {i} holds {n} tombstones (had {b})"))
                .collect();
            if left.is_empty() {
                Ok(now)
            } else {
                Err(Wait::Pending(left.join(", ")))
            }
        },
    )?;
    let collected = ended.elapsed();
    let stayed: Vec<usize> = members.iter().copied().chain([provider]).collect();
    wait_connected(mesh, &stayed)?;
    Ok(format!(
        "node {provider} serves {CHURN_SERVICE}; {} nodes with fresh identities came and went \
         ({CHURN_ROUNDS} rounds of {CHURNERS_PER_ROUND}, {} each; {killed} killed -9, {} shut \
         down) in {}; meanwhile nodes {} (the provider's neighbours) made {} echo calls, {} PUTs and {} broadcasts, none \
         failed; no node listed them {} after the last left, none listed their service after \
         {}, every node had forgotten the tombstones of their registry entries after {} \
         (tombstones per node {}, before {}), and nodes {} are one connected mesh",
        churners.len(),
        fmt_duration(CHURN_LIFETIME),
        churners.len() - killed,
        fmt_duration(took),
        node_list(&callers),
        counts.calls.load(Relaxed),
        counts.puts.load(Relaxed),
        counts.broadcasts.load(Relaxed),
        fmt_duration(forgotten),
        fmt_duration(unlisted),
        fmt_duration(collected),
        join_counts(&tombstones_after),
        join_counts(&tombstones_before),
        node_list(&stayed),
    ))
}

/// `1/0/2`.
fn join_counts(counts: &[u64]) -> String {
    let all: Vec<String> = counts.iter().map(u64::to_string).collect();
    all.join("/")
}

/// Entries minus live keys (tombstones, and expired entries not swept yet)
/// of each node of `nodes`, by `/status` `sync`.
fn tombstones(snap: &Snapshot, nodes: &[usize]) -> Result<Vec<u64>, Wait> {
    nodes
        .iter()
        .map(|&i| {
            let s = snap.status(i)?;
            Ok(s.sync.entries.saturating_sub(s.sync.keys))
        })
        .collect()
}

/// `soak`: a provider of its own, load from every other node, then the
/// checks (see the registry).
fn scenario_soak(mesh: &mut Mesh) -> Result<String> {
    let (members, seeds) = members_and_seeds(mesh)?;
    let provider = spawn_provider(mesh, &seeds, Some(SOAK_SERVICE))?;
    let result = check_soak(mesh, provider, &members);
    mesh.finish(&[provider], "the provider of the soak scenario", result)
}

/// What the load threads of `soak` and `churn` did, together.
#[derive(Default)]
struct LoadCounts {
    calls: std::sync::atomic::AtomicU64,
    puts: std::sync::atomic::AtomicU64,
    broadcasts: std::sync::atomic::AtomicU64,
    /// The first operation that failed, if any: it stops every thread.
    failure: std::sync::Mutex<Option<String>>,
}

impl LoadCounts {
    fn failed(&self) -> bool {
        self.failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some()
    }

    /// The first failure, if any, as an error (`took`: how long the
    /// threads ran).
    fn check(&self, took: Duration) -> Result<()> {
        match self
            .failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            Some(failure) => bail!("after {}: {failure}", fmt_duration(took)),
            None => Ok(()),
        }
    }

    fn fail(&self, what: String) {
        self.failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert(what);
    }
}

/// One RSS reading of every node, `at` into the load.
struct RssSample {
    at: Duration,
    /// KiB, by position in the scenario's node list; `None` where it could
    /// not be read.
    kib: Vec<Option<u64>>,
}

/// A process's resident memory in KiB, from `/proc/{pid}/status`.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One load thread of `soak` or `churn`: echo calls of `service` through
/// `admin`, a PUT every [`SOAK_PUT_EVERY`] of them and a broadcast every
/// [`SOAK_BROADCAST_EVERY`], until `stop` or a failure.
fn load_worker(
    admin: &str,
    service: &str,
    keys: &str,
    stop: &std::sync::atomic::AtomicBool,
    counts: &LoadCounts,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let http = Http::new();
    let mut n = 0usize;
    while !stop.load(Relaxed) && !counts.failed() {
        let payload = format!("soak {n}");
        let args = serde_json::json!([payload]);
        match http.rpc_call(admin, service, "echo", "", &args, RPC_DEADLINE) {
            Ok(RpcAnswer::Result { result, .. }) if result.as_str() == Some(&payload) => {
                counts.calls.fetch_add(1, Relaxed);
            }
            Ok(answer) => {
                return counts.fail(format!("{admin} echo: {}", answer.describe()));
            }
            Err(e) => return counts.fail(format!("{admin} echo: {e:#}")),
        }
        if n % SOAK_PUT_EVERY == 0 {
            let key = format!("{keys}{}", (n / SOAK_PUT_EVERY) % SOAK_KEYS);
            if let Err(e) = http.kv_set(admin, &key, &format!("value {n}")) {
                return counts.fail(format!("{admin}: {e:#}"));
            }
            counts.puts.fetch_add(1, Relaxed);
        }
        if n % SOAK_BROADCAST_EVERY == 0 {
            if let Err(e) = http.send_message(admin, "/broadcast", &payload) {
                return counts.fail(format!("{admin} broadcast: {e:#}"));
            }
            counts.broadcasts.fetch_add(1, Relaxed);
        }
        n += 1;
    }
}

/// Runs `during` while one thread per address of `admins` loads the mesh
/// through it ([`load_worker`] on `service`, keys under a prefix of `tag`),
/// then stops them: what `during` gave, how long the load lasted and what
/// the threads did.
fn under_load<T>(
    admins: &[String],
    service: &str,
    tag: &str,
    during: impl FnOnce(&LoadCounts) -> T,
) -> (T, Duration, LoadCounts) {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    let prefix = kv_prefix(tag);
    let stop = AtomicBool::new(false);
    let counts = LoadCounts::default();
    let t0 = Instant::now();
    let out = thread::scope(|scope| {
        for (t, admin) in admins.iter().enumerate() {
            let (stop, counts) = (&stop, &counts);
            let keys = format!("{prefix}{t}.");
            scope.spawn(move || load_worker(admin, service, &keys, stop, counts));
        }
        let out = during(&counts);
        stop.store(true, Relaxed);
        out
    });
    (out, t0.elapsed(), counts)
}

/// Loads the mesh for `mesh.soak` from every node of `members` (one
/// thread each) while sampling every node's RSS, then checks the replicas
/// and the memory.
fn check_soak(mesh: &mut Mesh, provider: usize, members: &[usize]) -> Result<String> {
    use std::sync::atomic::Ordering::Relaxed;
    wait_providers(mesh, members, SOAK_SERVICE, &[provider])?;
    let all: Vec<usize> = members.iter().copied().chain([provider]).collect();
    let pids: Vec<u32> = all.iter().map(|&i| mesh.nodes[i].child.id()).collect();
    let admins: Vec<String> = members.iter().map(|&i| mesh.admin(i).to_owned()).collect();
    let length = mesh.soak;
    let interval =
        (length / SOAK_SAMPLES).clamp(Duration::from_millis(200), Duration::from_secs(10));
    let (samples, took, counts) = under_load(&admins, SOAK_SERVICE, "soak", |counts| {
        let t0 = Instant::now();
        let mut samples = Vec::new();
        loop {
            let at = t0.elapsed();
            let kib: Vec<Option<u64>> = pids.iter().map(|&pid| rss_kib(pid)).collect();
            samples.push(RssSample { at, kib });
            if at >= length || counts.failed() {
                break;
            }
            if let Err(e) = mesh.check_unexpected_exits() {
                counts.fail(format!("{e:#}"));
                break;
            }
            thread::sleep(interval.min(length - at));
        }
        samples
    });
    counts.check(took)?;
    let (calls, puts, broadcasts) = (
        counts.calls.load(Relaxed),
        counts.puts.load(Relaxed),
        counts.broadcasts.load(Relaxed),
    );
    ensure!(calls > 0, "no call completed in {}", fmt_duration(took));
    let digest = mesh.poll_fn_until(
        &format!(
            "nodes {} to agree on /kv-digest after the load",
            node_list(&all)
        ),
        KV_TIMEOUT,
        |mesh| same_digest(mesh, &all),
    )?;
    let memory = check_soak_memory(&all, &samples, length)?;
    let ops = calls + puts + broadcasts;
    Ok(format!(
        "node {provider} serves {SOAK_SERVICE}; {} threads (through nodes {}) made {calls} echo \
         calls, {puts} PUTs and {broadcasts} broadcasts in {} ({:.0} operations/s), none \
         failed; every node then had /kv-digest {} ({} keys); RSS in MiB (start, after the \
         first third, peak after it, end): {memory}",
        admins.len(),
        node_list(members),
        fmt_duration(took),
        ops as f64 / took.as_secs_f64(),
        digest.digest,
        digest.keys,
    ))
}

/// Checks every node's RSS samples against its RSS after the first third
/// of the load (see [`SOAK_GROWTH_LIMIT`]); describes them, node by node.
fn check_soak_memory(nodes: &[usize], samples: &[RssSample], length: Duration) -> Result<String> {
    let mib = |k: u64| k as f64 / 1024.0;
    let mut described = Vec::new();
    for (p, &i) in nodes.iter().enumerate() {
        let series: Vec<(Duration, u64)> = samples
            .iter()
            .filter_map(|s| s.kib[p].map(|k| (s.at, k)))
            .collect();
        let (Some(&(_, start)), Some(&(_, end))) = (series.first(), series.last()) else {
            described.push(format!("node {i} n/a"));
            continue;
        };
        // The first reading at or after a third of the load: the node has
        // warmed up (buffers, caches, allocator arenas) by then.
        let warm = series
            .iter()
            .find(|(at, _)| *at >= length / 3)
            .map_or(end, |&(_, k)| k);
        let peak = series
            .iter()
            .filter(|(at, _)| *at >= length / 3)
            .map(|&(_, k)| k)
            .max()
            .unwrap_or(end);
        ensure!(
            peak <= SOAK_RSS_LIMIT_KIB && peak <= warm.saturating_mul(SOAK_GROWTH_LIMIT),
            "node {i}'s RSS reached {:.1} MiB, from {:.1} MiB after the first third of the load \
             (limits: {SOAK_GROWTH_LIMIT}× that, {:.0} MiB): {series:?}",
            mib(peak),
            mib(warm),
            mib(SOAK_RSS_LIMIT_KIB),
        );
        described.push(format!(
            "node {i} {:.1} {:.1} {:.1} {:.1}",
            mib(start),
            mib(warm),
            mib(peak),
            mib(end)
        ));
    }
    Ok(described.join(", "))
}

// ---------------------------------------------------------------------------
// Peer limits and the graph of connected peers
// ---------------------------------------------------------------------------

/// `--min-peers` and `--max-peers` of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PeerLimits {
    min: usize,
    max: usize,
}

impl PeerLimits {
    /// The limits of a mesh of `nodes` started by test-mesh. `min` is 3 (less
    /// in tiny meshes), so joining needs peers found beyond the seed. `max`
    /// is `nodes + 2`: a node takes inbound peers up to `max` minus the 2
    /// slots it reserves for its own dials, so node 0, everybody's seed,
    /// takes every other node (the star the handshake scenario checks) plus
    /// one that a scenario adds.
    fn for_mesh(nodes: usize) -> PeerLimits {
        PeerLimits {
            min: 3.min(nodes.saturating_sub(1)).max(1),
            max: nodes + 2,
        }
    }

    fn flags(self) -> [(&'static str, String); 2] {
        [
            ("--min-peers", self.min.to_string()),
            ("--max-peers", self.max.to_string()),
        ]
    }

    /// The flags as `meshwork node` arguments.
    fn args(self) -> Vec<OsString> {
        self.flags()
            .into_iter()
            .flat_map(|(flag, value)| [OsString::from(flag), OsString::from(value)])
            .collect()
    }
}

/// Who lists whom as a connected peer, by node index: the mesh as its
/// nodes see it. Every node in `listed` was polled; a node may list nodes
/// that are not in the graph.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Graph {
    listed: BTreeMap<usize, BTreeSet<usize>>,
}

impl Graph {
    fn degree(&self, i: usize) -> usize {
        self.listed.get(&i).map_or(0, BTreeSet::len)
    }

    /// The nodes `i` lists and the nodes in the graph that list `i`.
    fn neighbours(&self, i: usize) -> BTreeSet<usize> {
        let mut n: BTreeSet<usize> = self.listed.get(&i).cloned().unwrap_or_default();
        n.extend(
            self.listed
                .iter()
                .filter(|(_, l)| l.contains(&i))
                .map(|(&j, _)| j),
        );
        n
    }

    /// Links `(a, b)` where `a` lists `b`, which is not in the graph.
    fn outside(&self) -> Vec<(usize, usize)> {
        self.links_where(|b| !self.listed.contains_key(&b))
    }

    /// Links `(a, b)` where `a` lists `b` and `b`, in the graph, does not
    /// list `a`.
    fn one_sided(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (&a, listed) in &self.listed {
            for &b in listed {
                if self.listed.get(&b).is_some_and(|l| !l.contains(&a)) {
                    out.push((a, b));
                }
            }
        }
        out
    }

    fn links_where(&self, keep: impl Fn(usize) -> bool) -> Vec<(usize, usize)> {
        self.listed
            .iter()
            .flat_map(|(&a, l)| l.iter().filter(|&&b| keep(b)).map(move |&b| (a, b)))
            .collect()
    }

    /// Distinct links inside the graph, whichever end lists them.
    fn links(&self) -> usize {
        let pairs: BTreeSet<(usize, usize)> = self
            .links_where(|b| self.listed.contains_key(&b))
            .into_iter()
            .map(|(a, b)| (a.min(b), a.max(b)))
            .collect();
        pairs.len()
    }

    /// The connected components (a link counts both ways; links to nodes
    /// outside the graph are ignored), each sorted, in order of their
    /// smallest node.
    fn components(&self) -> Vec<Vec<usize>> {
        let mut seen = BTreeSet::new();
        let mut parts = Vec::new();
        for &start in self.listed.keys() {
            if !seen.insert(start) {
                continue;
            }
            let mut part = vec![start];
            let mut todo = vec![start];
            while let Some(i) = todo.pop() {
                for j in self.neighbours(i) {
                    if self.listed.contains_key(&j) && seen.insert(j) {
                        part.push(j);
                        todo.push(j);
                    }
                }
            }
            part.sort_unstable();
            parts.push(part);
        }
        parts
    }

    /// Hops from `from` to each node of the graph it reaches (itself: 0),
    /// links counting both ways.
    fn distances(&self, from: usize) -> BTreeMap<usize, usize> {
        let mut dist = BTreeMap::from([(from, 0)]);
        let mut todo = std::collections::VecDeque::from([from]);
        while let Some(i) = todo.pop_front() {
            let d = dist[&i] + 1;
            for j in self.neighbours(i) {
                if self.listed.contains_key(&j) && !dist.contains_key(&j) {
                    dist.insert(j, d);
                    todo.push_back(j);
                }
            }
        }
        dist
    }

    /// `0:1,2 1:0 2:0` (each node: the nodes it lists).
    fn describe(&self) -> String {
        let parts: Vec<String> = self
            .listed
            .iter()
            .map(|(i, l)| {
                let l: Vec<String> = l.iter().map(usize::to_string).collect();
                format!(
                    "{i}:{}",
                    if l.is_empty() {
                        "-".into()
                    } else {
                        l.join(",")
                    }
                )
            })
            .collect();
        parts.join(" ")
    }

    /// The degrees in node order: `4,3,3,3,3`.
    fn degrees(&self) -> String {
        let d: Vec<String> = self.listed.values().map(|l| l.len().to_string()).collect();
        d.join(",")
    }
}

// ---------------------------------------------------------------------------
// The mesh: processes, the guard that kills them, polling
// ---------------------------------------------------------------------------

/// What a node announced on its ready line.
#[derive(Debug, Clone, Default, PartialEq)]
struct Ready {
    node_id: String,
    listen: Vec<String>,
    /// Validated loopback `host:port`.
    admin: String,
}

struct Node {
    index: usize,
    child: Child,
    log_path: PathBuf,
    /// Lines the node printed on stdout (read by a background thread).
    stdout: Receiver<String>,
    ready: Ready,
    /// Set once the process has been reaped.
    exit: Option<ExitStatus>,
}

/// The running nodes. Dropping it kills (SIGKILL) every node still running,
/// so no process outlives test-mesh, whatever happens.
struct Mesh {
    bin: PathBuf,
    network: String,
    log_dir: PathBuf,
    http: Http,
    /// Peer limits of every node a scenario does not give its own.
    limits: PeerLimits,
    nodes: Vec<Node>,
    /// The last `/status` of each node, for the result table.
    snapshot: Snapshot,
    /// How long the `soak` scenario loads the mesh (`--soak-secs`).
    soak: Duration,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// Why a condition does not hold (yet).
#[derive(Debug)]
enum Wait {
    /// Might still change: keep polling until the deadline.
    Pending(String),
    /// Cannot change (e.g. a contract violation): give up now.
    Fatal(String),
}

/// Which nodes' `/status` to fetch while polling.
#[derive(Debug, Clone, Copy)]
enum Poll<'a> {
    /// Every running node.
    All,
    /// Only these (to keep polls fast in big meshes).
    Only(&'a [usize]),
}

/// `/status` of the nodes at one moment; `None` for nodes not running or
/// not polled.
#[derive(Debug, Default)]
struct Snapshot {
    statuses: Vec<Option<Result<Status, String>>>,
}

impl Snapshot {
    fn status(&self, i: usize) -> Result<&Status, Wait> {
        match self.statuses.get(i) {
            Some(Some(Ok(s))) => Ok(s),
            Some(Some(Err(e))) => Err(Wait::Pending(format!("node {i}: {e}"))),
            _ => Err(Wait::Fatal(format!(
                "node {i}: not running (or not polled)"
            ))),
        }
    }
}

impl Mesh {
    fn new(bin: &Path, network: &str, log_dir: &Path, limits: PeerLimits) -> Mesh {
        Mesh {
            bin: bin.to_path_buf(),
            network: network.to_owned(),
            log_dir: log_dir.to_path_buf(),
            http: Http::new(),
            limits,
            nodes: Vec::new(),
            snapshot: Snapshot::default(),
            soak: DEFAULT_SOAK,
        }
    }

    /// Starts node 0, waits for it, then starts the others seeded with it.
    fn start(&mut self, n: usize) -> Result<()> {
        self.spawn(&[])?;
        self.wait_ready(0)?;
        let seed = self.nodes[0].ready.listen[0].clone();
        for _ in 1..n {
            self.spawn(std::slice::from_ref(&seed))?;
        }
        for i in 1..n {
            self.wait_ready(i)?;
        }
        Ok(())
    }

    fn spawn(&mut self, seeds: &[String]) -> Result<()> {
        self.spawn_with(seeds, &[]).map(|_| ())
    }

    /// Starts one more node seeded with `seeds`, with `extra` arguments for
    /// `meshwork node` (which replace the same flags of [`NODE_TIMINGS`] and
    /// the mesh's peer limits); returns its index (it has not printed its
    /// ready line yet: see [`Mesh::wait_ready`]).
    fn spawn_with(&mut self, seeds: &[String], extra: &[OsString]) -> Result<usize> {
        let index = self.nodes.len();
        let log_path = self.log_dir.join(format!("node-{index}.log"));
        let log = File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("node");
        if !extra.iter().any(|arg| arg == "--listen") {
            cmd.args(["--listen", "tcp://127.0.0.1:0"]);
        }
        cmd.args(["--admin", "127.0.0.1:0"])
            .args(["--network", &self.network]);
        for seed in seeds {
            cmd.args(["--seed", seed]);
        }
        let defaults = NODE_TIMINGS
            .iter()
            .map(|&(flag, value)| (flag, value.to_owned()))
            .chain(self.limits.flags());
        for (flag, value) in defaults {
            if !extra.iter().any(|arg| arg == flag) {
                cmd.args([flag, &value]);
            }
        }
        cmd.args(extra);
        cmd.args(["--meta", &format!("test-mesh-node={index}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("failed to start node {index}: {}", display_cmd(&cmd)))?;
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        self.nodes.push(Node {
            index,
            child,
            log_path,
            stdout: rx,
            ready: Ready::default(),
            exit: None,
        });
        Ok(index)
    }

    /// Stops node `i` with POST /shutdown and checks that it exits 0 within
    /// [`EXIT_TIMEOUT`]; kills it otherwise. Does nothing if it is not running.
    fn stop(&mut self, i: usize) -> Result<()> {
        if !self.is_alive(i) {
            return Ok(());
        }
        let admin = self.nodes[i].ready.admin.clone();
        if let Err(e) = self.http.shutdown(&admin) {
            self.kill(i);
            return Err(e.context(format!("POST /shutdown to node {i} (killed it)")));
        }
        match self.wait_exit(i, EXIT_TIMEOUT)? {
            Some(status) if status.success() => Ok(()),
            Some(status) => bail!(
                "node {i} exited with {status} after POST /shutdown, expected 0 (log: {})",
                self.nodes[i].log_path.display()
            ),
            None => {
                self.kill(i);
                bail!(
                    "node {i} did not exit within {} of POST /shutdown (killed it)",
                    fmt_duration(EXIT_TIMEOUT)
                )
            }
        }
    }

    /// Stops `nodes` (those a scenario started itself) and returns the
    /// scenario's `result`; if that succeeded, what stopping them failed
    /// with, if anything (`what` names them).
    fn finish(&mut self, nodes: &[usize], what: &str, result: Result<String>) -> Result<String> {
        let stopped = self.stop_all(nodes);
        let summary = result?;
        stopped.with_context(|| format!("stopping {what}"))?;
        Ok(summary)
    }

    /// Stops the `nodes` like [`Mesh::stop`], all at once: asks each to shut
    /// down, then waits. Every node is stopped (or killed); the first
    /// problem is returned.
    fn stop_all(&mut self, nodes: &[usize]) -> Result<()> {
        let mut first_error = None;
        let mut asked = Vec::new();
        for &i in nodes {
            if !self.is_alive(i) {
                continue;
            }
            if self.nodes[i].ready.admin.is_empty() {
                self.kill(i); // never got ready: nothing to ask
                continue;
            }
            match self.http.shutdown(&self.nodes[i].ready.admin) {
                Ok(()) => asked.push(i),
                Err(e) => {
                    self.kill(i);
                    first_error.get_or_insert(
                        e.context(format!("POST /shutdown to node {i} (killed it)")),
                    );
                }
            }
        }
        let deadline = Instant::now() + EXIT_TIMEOUT;
        for i in asked {
            let left = deadline.saturating_duration_since(Instant::now());
            let problem = match self.wait_exit(i, left) {
                Ok(Some(status)) if status.success() => continue,
                Ok(Some(status)) => anyhow!(
                    "node {i} exited with {status} after POST /shutdown, expected 0 (log: {})",
                    self.nodes[i].log_path.display()
                ),
                Ok(None) => {
                    self.kill(i);
                    anyhow!(
                        "node {i} did not exit within {} of POST /shutdown (killed it)",
                        fmt_duration(EXIT_TIMEOUT)
                    )
                }
                Err(e) => {
                    self.kill(i);
                    e
                }
            };
            first_error.get_or_insert(problem);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Runs the node binary with `args` (a short command such as `keygen`),
    /// killing it after [`CLI_TIMEOUT`]. Returns its exit status, stdout and
    /// stderr.
    fn run_cli(&self, args: &[OsString]) -> Result<(ExitStatus, String, String)> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let shown = display_cmd(&cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("failed to run `{shown}`"))?;
        // The output is a few lines: it fits the pipes, so waiting first is safe.
        let Some(status) = wait_timeout(&mut child, CLI_TIMEOUT)? else {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{shown}` did not finish within {} (killed it)",
                fmt_duration(CLI_TIMEOUT)
            );
        };
        let (mut out, mut err) = (String::new(), String::new());
        if let Some(mut s) = child.stdout.take() {
            s.read_to_string(&mut out)?;
        }
        if let Some(mut s) = child.stderr.take() {
            s.read_to_string(&mut err)?;
        }
        Ok((status, out, err))
    }

    /// Reads node `i`'s ready line (within [`READY_TIMEOUT`]).
    fn wait_ready(&mut self, i: usize) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let node = &mut self.nodes[i];
        let line = match node
            .stdout
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => bail!(
                "node {i} did not print its ready line within {} (log: {})",
                fmt_duration(READY_TIMEOUT),
                node.log_path.display()
            ),
            Err(RecvTimeoutError::Disconnected) => {
                // stdout closed: the process is exiting or gone.
                let status = wait_timeout(&mut node.child, Duration::from_secs(5))?;
                if let Some(status) = status {
                    node.exit = Some(status);
                }
                bail!(
                    "node {i} closed stdout without printing a ready line ({}); log: {}",
                    status.map_or_else(|| "still running".to_owned(), |s| s.to_string()),
                    node.log_path.display()
                );
            }
        };
        node.ready = parse_ready(&line).with_context(|| {
            format!(
                "node {i}: the first stdout line must be the ready line (log: {})",
                node.log_path.display()
            )
        })?;
        Ok(())
    }

    fn is_alive(&self, i: usize) -> bool {
        self.nodes.get(i).is_some_and(|n| n.exit.is_none())
    }

    /// Indices of the nodes not known to have exited.
    fn alive(&self) -> impl Iterator<Item = usize> + '_ {
        self.nodes
            .iter()
            .filter(|n| n.exit.is_none())
            .map(|n| n.index)
    }

    /// The index of the node with this id: the running one if a node was
    /// restarted with the same key, else the last one that had it.
    fn index_of(&self, node_id: &str) -> Option<usize> {
        let mut with_id = self.nodes.iter().filter(|n| n.ready.node_id == node_id);
        let last = with_id.clone().next_back().map(|n| n.index);
        with_id.find(|n| n.exit.is_none()).map(|n| n.index).or(last)
    }

    /// `node 3`, or `id 1a2b3c4d` for ids that are not ours.
    fn label(&self, node_id: &str) -> String {
        match self.index_of(node_id) {
            Some(i) => format!("node {i}"),
            None => format!("id {}", short_id(node_id)),
        }
    }

    /// Reaps nodes that exited on their own; errors if any did.
    fn check_unexpected_exits(&mut self) -> Result<()> {
        let mut died = Vec::new();
        for node in &mut self.nodes {
            if node.exit.is_some() {
                continue;
            }
            if let Ok(Some(status)) = node.child.try_wait() {
                node.exit = Some(status);
                died.push(format!(
                    "node {} exited unexpectedly ({status}); log: {}",
                    node.index,
                    node.log_path.display()
                ));
            }
        }
        if died.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(died.join("; ")))
        }
    }

    /// Fetches `/status` of every running node.
    fn refresh_snapshot(&mut self) {
        self.refresh_snapshot_of(Poll::All);
    }

    fn refresh_snapshot_of(&mut self, which: Poll<'_>) {
        let statuses = self
            .nodes
            .iter()
            .map(|n| {
                let wanted = match which {
                    Poll::All => true,
                    Poll::Only(list) => list.contains(&n.index),
                };
                (wanted && n.exit.is_none()).then(|| {
                    self.http
                        .status(&n.ready.admin)
                        .map_err(|e| format!("{e:#}"))
                })
            })
            .collect();
        self.snapshot = Snapshot { statuses };
    }

    /// Polls `/status` of the `which` nodes until `check` holds, it
    /// reports a fatal problem, a node dies, or `timeout` passes.
    fn poll_until<T>(
        &mut self,
        what: &str,
        which: Poll<'_>,
        timeout: Duration,
        mut check: impl FnMut(&Mesh, &Snapshot) -> Result<T, Wait>,
    ) -> Result<T> {
        self.poll_loop(what, timeout, |mesh| {
            mesh.refresh_snapshot_of(which);
            check(mesh, &mesh.snapshot)
        })
    }

    /// Fetches `/status` of the `which` nodes once and applies `check`.
    fn check_now<T>(
        &mut self,
        what: &str,
        which: Poll<'_>,
        check: impl FnOnce(&Mesh, &Snapshot) -> Result<T, Wait>,
    ) -> Result<T> {
        self.check_unexpected_exits()
            .with_context(|| format!("while checking {what}"))?;
        self.refresh_snapshot_of(which);
        check(self, &self.snapshot)
            .map_err(|(Wait::Fatal(reason) | Wait::Pending(reason))| anyhow!("{what}: {reason}"))
    }

    /// Polls `/status` of the `which` nodes for all of `duration` and
    /// fails as soon as `check` does not hold (or a node dies, or a
    /// `/status` fails). Returns the number of polls.
    fn watch_for(
        &mut self,
        what: &str,
        which: Poll<'_>,
        duration: Duration,
        mut check: impl FnMut(&Mesh, &Snapshot) -> Result<(), Wait>,
    ) -> Result<usize> {
        self.watch_loop(what, duration, |mesh| {
            mesh.refresh_snapshot_of(which);
            check(mesh, &mesh.snapshot)
        })
    }

    /// `GET /events` of the `nodes`; a failed request is pending.
    fn fetch_events(&self, nodes: &[usize]) -> Result<EventLog, Wait> {
        let mut log = EventLog::new();
        for &i in nodes {
            if !self.is_alive(i) {
                return Err(Wait::Fatal(format!("node {i} is not running")));
            }
            let events = self
                .http
                .events(&self.nodes[i].ready.admin)
                .map_err(|e| Wait::Pending(format!("node {i}: {e:#}")))?;
            log.insert(i, events);
        }
        Ok(log)
    }

    /// Polls `/events` of the `nodes` until `check` holds, it reports a
    /// fatal problem, a node dies, or `timeout` passes.
    fn poll_events_until<T>(
        &mut self,
        what: &str,
        nodes: &[usize],
        timeout: Duration,
        mut check: impl FnMut(&Mesh, &EventLog) -> Result<T, Wait>,
    ) -> Result<T> {
        self.poll_loop(what, timeout, |mesh| {
            mesh.fetch_events(nodes).and_then(|log| check(mesh, &log))
        })
    }

    /// Polls `/events` of the `nodes` for all of `duration` and fails as
    /// soon as `check` does not hold (or a node dies, or a request fails).
    /// Returns the number of polls.
    fn watch_events(
        &mut self,
        what: &str,
        nodes: &[usize],
        duration: Duration,
        mut check: impl FnMut(&Mesh, &EventLog) -> Result<(), Wait>,
    ) -> Result<usize> {
        self.watch_loop(what, duration, |mesh| {
            mesh.fetch_events(nodes).and_then(|log| check(mesh, &log))
        })
    }

    /// Polls `check`, which makes its own admin requests (a failed request
    /// is pending), until it holds, it reports a fatal problem, a node dies,
    /// or `timeout` passes.
    fn poll_fn_until<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Mesh) -> Result<T, Wait>,
    ) -> Result<T> {
        self.poll_loop(what, timeout, |mesh| check(mesh))
    }

    /// Polls `check` (as [`Mesh::poll_fn_until`]) for all of `duration`
    /// and fails as soon as it does not hold. Returns the number of polls.
    fn watch_fn_for(
        &mut self,
        what: &str,
        duration: Duration,
        mut check: impl FnMut(&Mesh) -> Result<(), Wait>,
    ) -> Result<usize> {
        self.watch_loop(what, duration, |mesh| check(mesh))
    }

    /// What every `poll_*` shares: `step` every [`POLL_INTERVAL`] until it
    /// holds, it reports a fatal problem, a node dies, or `timeout` passes.
    fn poll_loop<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut step: impl FnMut(&mut Mesh) -> Result<T, Wait>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_unexpected_exits()
                .with_context(|| format!("while waiting for {what}"))?;
            let reason = match step(self) {
                Ok(t) => return Ok(t),
                Err(Wait::Fatal(reason)) => bail!("{what}: {reason}"),
                Err(Wait::Pending(reason)) => reason,
            };
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {} waiting for {what}: {reason}",
                    fmt_duration(timeout)
                );
            }
            thread::sleep(POLL_INTERVAL.min(deadline.saturating_duration_since(Instant::now())));
        }
    }

    /// What every `watch_*` shares: `step` every [`POLL_INTERVAL`] for all
    /// of `duration`, failing as soon as it does not hold or a node dies.
    /// Returns the number of polls.
    fn watch_loop(
        &mut self,
        what: &str,
        duration: Duration,
        mut step: impl FnMut(&mut Mesh) -> Result<(), Wait>,
    ) -> Result<usize> {
        let started = Instant::now();
        let end = started + duration;
        let mut polls = 0;
        loop {
            self.check_unexpected_exits()
                .with_context(|| format!("while waiting for {what}"))?;
            polls += 1;
            if let Err(Wait::Fatal(reason) | Wait::Pending(reason)) = step(self) {
                bail!(
                    "{what}: failed after {}: {reason}",
                    fmt_duration(started.elapsed())
                );
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(polls);
            }
            thread::sleep(POLL_INTERVAL.min(left));
        }
    }

    /// Node `i`'s admin address.
    fn admin(&self, i: usize) -> &str {
        &self.nodes[i].ready.admin
    }

    /// Node `i`'s id.
    fn id(&self, i: usize) -> &str {
        &self.nodes[i].ready.node_id
    }

    /// Waits up to `timeout` for node `i` to exit; records its status.
    fn wait_exit(&mut self, i: usize, timeout: Duration) -> Result<Option<ExitStatus>> {
        let node = &mut self.nodes[i];
        if let Some(status) = node.exit {
            return Ok(Some(status));
        }
        let status = wait_timeout(&mut node.child, timeout)?;
        node.exit = status;
        Ok(status)
    }

    /// SIGKILLs node `i` if it is still running, and reaps it.
    fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if node.exit.is_some() {
            return;
        }
        if let Ok(Some(status)) = node.child.try_wait() {
            node.exit = Some(status);
            return;
        }
        let _ = node.child.kill();
        node.exit = node.child.wait().ok();
    }

    /// Asks every running node to shut down (POST /shutdown, falling back to
    /// SIGTERM), waits up to [`EXIT_TIMEOUT`], SIGKILLs stragglers. Returns
    /// the problems seen: non-zero exits, kills, stray stdout lines.
    fn shutdown_all(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let alive: Vec<usize> = self.alive().collect();
        for &i in &alive {
            if let Err(e) = self.http.shutdown(&self.nodes[i].ready.admin) {
                let pid = self.nodes[i].child.id().to_string();
                println!("  node {i}: POST /shutdown failed ({e:#}); sending SIGTERM");
                let _ = Command::new("kill")
                    .args(["-TERM", &pid])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let deadline = Instant::now() + EXIT_TIMEOUT;
        for &i in &alive {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.wait_exit(i, remaining) {
                Ok(Some(status)) if status.success() => {}
                Ok(Some(status)) => problems.push(format!(
                    "node {i} exited with {status} after shutdown, expected 0 (log: {})",
                    self.nodes[i].log_path.display()
                )),
                Ok(None) | Err(_) => {
                    self.kill(i);
                    problems.push(format!(
                        "node {i} did not exit within {} of shutdown; killed it (log: {})",
                        fmt_duration(EXIT_TIMEOUT),
                        self.nodes[i].log_path.display()
                    ));
                }
            }
        }
        for node in &self.nodes {
            let extra: Vec<String> = node.stdout.try_iter().collect();
            if let Some(first) = extra.first() {
                problems.push(format!(
                    "node {} printed {} stdout line(s) after its ready line \
                     (contract: exactly one line); first: {first}",
                    node.index,
                    extra.len()
                ));
            }
        }
        problems
    }

    /// The result table for the last snapshot.
    fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "  {:<4} {:<8}  {:<26} {:>5}  {:>9}  {:>10}  peers (rtt ms)",
            "node", "id", "listen", "conns", "in+out/kn", "median rtt"
        );
        for node in &self.nodes {
            let id = short_id(&node.ready.node_id);
            let listen = node.ready.listen.first().map_or("-", String::as_str);
            let line = match self.snapshot.statuses.get(node.index) {
                Some(Some(Ok(s))) => {
                    let rtts: Vec<f64> = s.connections.iter().filter_map(Connection::rtt).collect();
                    let median =
                        median(&rtts).map_or_else(|| "-".to_owned(), |m| format!("{m:.3} ms"));
                    let mut conns: Vec<&Connection> = s.connections.iter().collect();
                    conns.sort_by_key(|c| (self.index_of(&c.node_id), c.node_id.clone()));
                    let mut peers: Vec<String> = conns
                        .iter()
                        .take(8)
                        .map(|c| {
                            let who = self
                                .index_of(&c.node_id)
                                .map_or_else(|| short_id(&c.node_id).to_owned(), |i| i.to_string());
                            let rtt = c
                                .rtt()
                                .map_or_else(|| "-".to_owned(), |r| format!("{r:.3}"));
                            format!("{who}:{rtt}")
                        })
                        .collect();
                    if s.connections.len() > 8 {
                        peers.push(format!("+{} more", s.connections.len() - 8));
                    }
                    if !s.blocked.is_empty() {
                        peers.push(format!("(blocking {})", s.blocked.len()));
                    }
                    if !s.served.is_empty() {
                        let names: Vec<&str> = s.served.iter().map(|x| x.name.as_str()).collect();
                        peers.push(format!("[serves {}]", names.join(" ")));
                    }
                    peers.push(format!(
                        "[kv {} keys, digest {}]",
                        s.sync.keys,
                        s.sync.digest.get(..8).unwrap_or(&s.sync.digest)
                    ));
                    let pool = format!("{}+{}/{}", s.pool.inbound, s.pool.outbound, s.pool.known);
                    format!(
                        "{:>5}  {pool:>9}  {median:>10}  {}",
                        s.connections.len(),
                        peers.join(" ")
                    )
                }
                Some(Some(Err(e))) => format!("/status failed: {e}"),
                _ => match node.exit {
                    Some(status) => format!("exited ({status})"),
                    None => "-".to_owned(),
                },
            };
            let _ = writeln!(out, "  {:<4} {id:<8}  {listen:<26} {line}", node.index);
        }
        out
    }
}

/// Waits up to `timeout` for `child` to exit.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The indices of the `node-<i>.log` files in `log_dir`, in order (the mesh's
/// nodes and those the scenarios started).
fn node_logs(log_dir: &Path) -> Vec<usize> {
    let mut found: Vec<usize> = fs::read_dir(log_dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("node-")?
                .strip_suffix(".log")?
                .parse()
                .ok()
        })
        .collect();
    found.sort_unstable();
    found
}

/// On failure: the log paths and the tail of the logs of the first 8 of the
/// `nodes` mesh nodes and of every node a scenario started.
fn print_logs_on_failure(log_dir: &Path, nodes: usize) {
    const TAIL: usize = 20;
    const MESH_LOGS: usize = 8;
    println!("\ntest-mesh: node logs kept in {}", log_dir.display());
    let mut skipped = 0;
    for i in node_logs(log_dir) {
        if i >= MESH_LOGS && i < nodes {
            skipped += 1;
            continue;
        }
        let path = log_dir.join(format!("node-{i}.log"));
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        let lines: Vec<&str> = text.lines().collect();
        if lines.is_empty() {
            println!("--- {} (empty)", path.display());
            continue;
        }
        println!("--- {} (last {TAIL} lines)", path.display());
        for line in &lines[lines.len().saturating_sub(TAIL)..] {
            println!("  {line}");
        }
    }
    if skipped > 0 {
        println!("--- (not showing the logs of {skipped} other mesh node(s))");
    }
}

fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 0 {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

// ---------------------------------------------------------------------------
// The node contract: ready line, /status, admin HTTP
// ---------------------------------------------------------------------------

fn parse_ready(line: &str) -> Result<Ready> {
    let v: Value =
        serde_json::from_str(line).with_context(|| format!("stdout line is not JSON: {line:?}"))?;
    ensure!(
        v["event"] == "ready",
        "expected {{\"event\":\"ready\",...}}, got: {line}"
    );
    let node_id = str_field(&v, "node_id")?;
    ensure!(
        !node_id.is_empty() && node_id.chars().all(|c| c.is_ascii_hexdigit()),
        "ready line: node_id {node_id:?} is not hex"
    );
    let listen = str_list(&v, "listen").context("ready line")?;
    ensure!(!listen.is_empty(), "ready line: `listen` is empty");
    for addr in &listen {
        check_listen_addr(addr).context("ready line")?;
    }
    let admin = loopback_admin(&str_field(&v, "admin")?).context("ready line")?;
    Ok(Ready {
        node_id,
        listen,
        admin,
    })
}

/// A listen address we can seed other nodes with: `tcp://<loopback>:<port>`.
fn check_listen_addr(addr: &str) -> Result<()> {
    let rest = addr
        .strip_prefix("tcp://")
        .with_context(|| format!("listen address {addr:?} does not start with tcp://"))?;
    let sock: SocketAddr = rest
        .parse()
        .with_context(|| format!("listen address {addr:?} is not tcp://IP:PORT"))?;
    ensure!(
        sock.ip().is_loopback() && sock.port() != 0,
        "listen address {addr:?} is not a bound loopback address"
    );
    Ok(())
}

/// Validates an admin address and returns it as `host:port`. Only loopback
/// (127.0.0.0/8, ::1, localhost) is accepted: test-mesh must never send
/// `/shutdown` to anything else.
fn loopback_admin(addr: &str) -> Result<String> {
    if let Ok(sock) = addr.parse::<SocketAddr>() {
        ensure!(
            sock.ip().is_loopback(),
            "admin address {addr} is not loopback; refusing to talk to it"
        );
        ensure!(sock.port() != 0, "admin address {addr} has port 0");
        return Ok(sock.to_string());
    }
    if let Some(port) = addr.strip_prefix("localhost:") {
        let port: u16 = port
            .parse()
            .with_context(|| format!("admin address {addr:?}: bad port"))?;
        ensure!(port != 0, "admin address {addr} has port 0");
        return Ok(addr.to_owned());
    }
    if let Ok(ip) = addr.parse::<IpAddr>() {
        bail!("admin address {ip} has no port");
    }
    bail!("admin address {addr:?} is not a loopback host:port; refusing to talk to it")
}

/// `GET /status`, parsed.
#[derive(Debug, Clone, PartialEq)]
struct Status {
    node_id: String,
    network_id: String,
    /// `"noise"` or `"plaintext"`.
    security: String,
    handshakes_ok: u64,
    /// Failed handshakes by cause, e.g. `"crypto"`.
    handshake_failures: BTreeMap<String, u64>,
    rejected_busy: u64,
    /// Pending incoming handshakes evicted to admit a newcomer.
    evicted_handshakes: u64,
    /// Incoming handshakes holding a slot now.
    pending_handshakes: u64,
    listen: Vec<String>,
    uptime_secs: f64,
    connections: Vec<Connection>,
    pool: Pool,
    /// Every peer the node knows, connected ones first.
    peers: Vec<Peer>,
    /// Ids of the blocked nodes.
    blocked: Vec<String>,
    /// The node's `--seed`s and how its dials of them went.
    seeds: Vec<SeedStatus>,
    /// Every concern's counters, the built-in ones included.
    concerns: Vec<ConcernStats>,
    routes: Vec<Route>,
    /// The built-in concerns' own figures, by name ([`BUILTIN_CONCERNS`]),
    /// kept as JSON.
    builtin: BTreeMap<String, Value>,
    /// The topics the node subscribes to.
    subscriptions: Vec<String>,
    /// Requests for commands no concern handles.
    unknown_commands: u64,
    /// The replicated map.
    sync: SyncStatus,
    /// Services served by the node.
    served: Vec<ServedService>,
    /// Counters of the RPC calls the node made.
    calls: CallCounters,
}

/// One entry of `/status`'s `seeds`.
#[derive(Debug, Clone, Default, PartialEq)]
struct SeedStatus {
    addr: String,
    node_id: Option<String>,
    connected: bool,
    failures: u64,
    last_error: Option<String>,
}

fn parse_seed_status(v: &Value) -> Result<SeedStatus> {
    let opt_str = |name: &str| -> Result<Option<String>> {
        match v.get(name) {
            None => Ok(None),
            Some(f) => f
                .as_str()
                .map(|s| Some(s.to_owned()))
                .with_context(|| format!("`{name}` is not a string")),
        }
    };
    Ok(SeedStatus {
        addr: str_field(v, "addr")?,
        node_id: opt_str("node_id")?,
        connected: field(v, "connected")?
            .as_bool()
            .context("`connected` is not a boolean")?,
        failures: u64_field(v, "failures")?,
        last_error: opt_str("last_error")?,
    })
}

/// One entry of `/status`'s `served`.
#[derive(Debug, Clone, Default, PartialEq)]
struct ServedService {
    name: String,
    version: u64,
    methods: Vec<String>,
    calls: u64,
    errors: u64,
    overloaded: u64,
    cancelled: u64,
    in_flight: u64,
}

/// `/status`'s `calls`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct CallCounters {
    calls: u64,
    failures: u64,
    retries: u64,
}

fn parse_served(v: &Value) -> Result<ServedService> {
    Ok(ServedService {
        name: str_field(v, "name")?,
        version: u64_field(v, "version")?,
        methods: str_list(v, "methods")?,
        calls: u64_field(v, "calls")?,
        errors: u64_field(v, "errors")?,
        overloaded: u64_field(v, "overloaded")?,
        cancelled: u64_field(v, "cancelled")?,
        in_flight: u64_field(v, "in_flight")?,
    })
}

fn parse_calls(v: &Value) -> Result<CallCounters> {
    Ok(CallCounters {
        calls: u64_field(v, "calls")?,
        failures: u64_field(v, "failures")?,
        retries: u64_field(v, "retries")?,
    })
}

/// `/status`'s `sync`: the replicated map's mode, size, digest and the
/// counters the scenarios use (the others are checked to be there).
#[derive(Debug, Clone, Default, PartialEq)]
struct SyncStatus {
    leasing: bool,
    keys: u64,
    entries: u64,
    /// What the replica holds, of at most `max_bytes`.
    bytes: u64,
    max_bytes: u64,
    /// Entries from peers refused for want of room.
    refused_full: u64,
    /// 16 hex digits, as `GET /kv-digest`.
    digest: String,
    lease_lost: u64,
}

/// The counters of `/status`'s `sync`.
const SYNC_COUNTERS: &[&str] = &[
    "keys",
    "entries",
    "bytes",
    "max_bytes",
    "writes",
    "applied",
    "stale",
    "refused",
    "refused_full",
    "pushes",
    "pushed_entries",
    "push_failures",
    "rounds",
    "rounds_equal",
    "round_failures",
    "rounds_cut",
    "pulled",
    "sent",
    "lease_lost",
];

fn parse_sync_status(v: &Value) -> Result<SyncStatus> {
    for name in SYNC_COUNTERS {
        u64_field(v, name)?;
    }
    Ok(SyncStatus {
        leasing: field(v, "leasing")?
            .as_bool()
            .context("`leasing` is not a boolean")?,
        keys: u64_field(v, "keys")?,
        entries: u64_field(v, "entries")?,
        bytes: u64_field(v, "bytes")?,
        max_bytes: u64_field(v, "max_bytes")?,
        refused_full: u64_field(v, "refused_full")?,
        digest: hex_digest(v)?,
        lease_lost: u64_field(v, "lease_lost")?,
    })
}

/// The `digest` field of `v`: 16 hex digits.
fn hex_digest(v: &Value) -> Result<String> {
    let digest = str_field(v, "digest")?;
    ensure!(
        digest.len() == 16 && digest.chars().all(|c| c.is_ascii_hexdigit()),
        "`digest` {digest:?} is not 16 hex digits"
    );
    Ok(digest)
}

/// One entry of `/status`'s `concerns`.
#[derive(Debug, Clone, PartialEq)]
struct ConcernStats {
    command: u64,
    name: String,
    requests: u64,
    replies: u64,
    errors: u64,
    panics: u64,
    dropped: u64,
    in_flight: u64,
    queued: u64,
}

/// One entry of `/status`'s `routes`.
#[derive(Debug, Clone, PartialEq)]
struct Route {
    target: String,
    next_hop: String,
    hops: u64,
    age_ms: f64,
}

/// `/status`'s `pool`: the peer manager's counters and limits.
#[derive(Debug, Clone, Default, PartialEq)]
struct Pool {
    connected: u64,
    inbound: u64,
    outbound: u64,
    pending_dials: u64,
    known: u64,
    dropped_inbound: u64,
    min_peers: u64,
    max_peers: u64,
}

/// One entry of `/status`'s `peers`.
#[derive(Debug, Clone, PartialEq)]
struct Peer {
    node_id: String,
    /// One of [`PEER_STATES`].
    state: String,
    /// The next hop of a routed peer (hex).
    via: Option<String>,
    /// The distance of a routed peer.
    hops: Option<u64>,
    /// `"inbound"`, `"outbound"` or none (not connected).
    direction: Option<String>,
    addr: Option<String>,
    listen: Vec<String>,
    rtt_ms: Option<f64>,
    srtt_ms: Option<f64>,
    errors: u64,
    timeouts: u64,
    score: f64,
    connected_secs: Option<f64>,
    idle_ms: Option<f64>,
    dial_failures: u64,
    /// Values that are not strings are kept as JSON text.
    metadata: BTreeMap<String, String>,
}

impl Peer {
    /// `connected` or `unresponsive`: there is a connection.
    fn is_linked(&self) -> bool {
        self.state == "connected" || self.state == "unresponsive"
    }
}

/// One entry of `/status`'s `connections`.
#[derive(Debug, Clone, PartialEq)]
struct Connection {
    node_id: String,
    addr: String,
    direction: String,
    listen_addrs: Vec<String>,
    rtt_ms: Option<f64>,
    smoothed_rtt_ms: Option<f64>,
    age_secs: f64,
    frames_sent: u64,
    frames_received: u64,
}

impl Status {
    /// Failed handshakes with this cause (0 if none).
    fn failures(&self, cause: &str) -> u64 {
        self.handshake_failures.get(cause).copied().unwrap_or(0)
    }

    /// The `peers` entry of this node id.
    fn peer(&self, node_id: &str) -> Option<&Peer> {
        self.peers.iter().find(|p| p.node_id == node_id)
    }

    /// The `concerns` entry of this command id.
    fn concern(&self, command: u64) -> Option<&ConcernStats> {
        self.concerns.iter().find(|c| c.command == command)
    }

    /// The `served` entry of this service name.
    fn served(&self, name: &str) -> Option<&ServedService> {
        self.served.iter().find(|s| s.name == name)
    }

    /// Whether `connections` has this node id.
    fn lists(&self, node_id: &str) -> bool {
        self.connections.iter().any(|c| c.node_id == node_id)
    }

    /// How this node lists `node_id` as linked, if it does: `as connected`,
    /// `as unresponsive` (peers) or `in connections`.
    fn lists_how(&self, node_id: &str) -> Option<String> {
        if let Some(p) = self.peer(node_id).filter(|p| p.is_linked()) {
            Some(format!("as {}", p.state))
        } else {
            self.lists(node_id).then(|| "in connections".to_owned())
        }
    }
}

impl Connection {
    /// Latest RTT sample, else the smoothed one.
    fn rtt(&self) -> Option<f64> {
        self.rtt_ms.or(self.smoothed_rtt_ms)
    }
}

fn parse_status(v: &Value) -> Result<Status> {
    let connections = v
        .get("connections")
        .context("missing `connections`")?
        .as_array()
        .context("`connections` is not an array")?
        .iter()
        .enumerate()
        .map(|(i, c)| parse_connection(c).with_context(|| format!("connections[{i}]")))
        .collect::<Result<Vec<_>>>()?;
    let peers = field(v, "peers")?
        .as_array()
        .context("`peers` is not an array")?
        .iter()
        .enumerate()
        .map(|(i, p)| parse_peer(p).with_context(|| format!("peers[{i}]")))
        .collect::<Result<Vec<_>>>()?;
    let security = str_field(v, "security")?;
    ensure!(
        security == "noise" || security == "plaintext",
        "`security` is {security:?}, expected \"noise\" or \"plaintext\""
    );
    let handshake_failures = field(v, "handshake_failures")?
        .as_object()
        .context("`handshake_failures` is not an object")?
        .iter()
        .map(|(cause, n)| {
            n.as_u64().map(|n| (cause.clone(), n)).with_context(|| {
                format!("`handshake_failures.{cause}` is not a non-negative integer")
            })
        })
        .collect::<Result<_>>()?;
    Ok(Status {
        node_id: str_field(v, "node_id")?,
        network_id: str_field(v, "network_id")?,
        security,
        handshakes_ok: u64_field(v, "handshakes_ok")?,
        handshake_failures,
        rejected_busy: u64_field(v, "rejected_busy")?,
        evicted_handshakes: u64_field(v, "evicted_handshakes")?,
        pending_handshakes: u64_field(v, "pending_handshakes")?,
        listen: str_list(v, "listen")?,
        uptime_secs: num_field(v, "uptime_secs")?,
        connections,
        pool: parse_pool(field(v, "pool")?).context("pool")?,
        peers,
        blocked: str_list(v, "blocked")?,
        seeds: list_field(v, "seeds", parse_seed_status)?,
        concerns: list_field(v, "concerns", parse_concern_stats)?,
        routes: list_field(v, "routes", parse_route)?,
        builtin: parse_builtin(field(v, "builtin")?).context("builtin")?,
        subscriptions: str_list(v, "subscriptions")?,
        unknown_commands: u64_field(v, "unknown_commands")?,
        sync: parse_sync_status(field(v, "sync")?).context("sync")?,
        served: list_field(v, "served", parse_served)?,
        calls: parse_calls(field(v, "calls")?).context("calls")?,
    })
}

/// The array `name` of `v`, each element parsed with `parse`.
fn list_field<T>(v: &Value, name: &str, parse: fn(&Value) -> Result<T>) -> Result<Vec<T>> {
    field(v, name)?
        .as_array()
        .with_context(|| format!("`{name}` is not an array"))?
        .iter()
        .enumerate()
        .map(|(i, e)| parse(e).with_context(|| format!("{name}[{i}]")))
        .collect()
}

fn parse_concern_stats(c: &Value) -> Result<ConcernStats> {
    Ok(ConcernStats {
        command: u64_field(c, "command")?,
        name: str_field(c, "name")?,
        requests: u64_field(c, "requests")?,
        replies: u64_field(c, "replies")?,
        errors: u64_field(c, "errors")?,
        panics: u64_field(c, "panics")?,
        dropped: u64_field(c, "dropped")?,
        in_flight: u64_field(c, "in_flight")?,
        queued: u64_field(c, "queued")?,
    })
}

fn parse_route(r: &Value) -> Result<Route> {
    Ok(Route {
        target: str_field(r, "target")?,
        next_hop: str_field(r, "next_hop")?,
        hops: u64_field(r, "hops")?,
        age_ms: num_field(r, "age_ms")?,
    })
}

/// `builtin`: an object for each of [`BUILTIN_CONCERNS`] (and maybe more).
fn parse_builtin(v: &Value) -> Result<BTreeMap<String, Value>> {
    let map = v.as_object().context("not an object")?;
    for name in BUILTIN_CONCERNS {
        ensure!(
            map.get(*name).is_some_and(Value::is_object),
            "`{name}` is missing or not an object"
        );
    }
    Ok(map.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// One entry of `GET /events`.
#[derive(Debug, Clone, PartialEq)]
struct Event {
    seq: u64,
    /// One of [`EVENT_KINDS`].
    kind: String,
    /// The origin's node id.
    from: String,
    topic: Option<String>,
    payload: String,
    at_ms: f64,
}

/// The events of some nodes, by node index.
type EventLog = BTreeMap<usize, Vec<Event>>;

impl Event {
    /// `publication from node 3 on "t" (seq 4): "payload"`.
    fn describe(&self, mesh: &Mesh) -> String {
        let topic = self
            .topic
            .as_ref()
            .map_or_else(String::new, |t| format!(" on {t:?}"));
        format!(
            "{} from {}{topic} (seq {}): {:?}",
            self.kind,
            mesh.label(&self.from),
            self.seq,
            self.payload
        )
    }
}

/// `GET /events`: the events, in increasing `seq`.
fn parse_events(v: &Value) -> Result<Vec<Event>> {
    let events = list_field(v, "events", parse_event)?;
    let next = u64_field(v, "next")?;
    for pair in events.windows(2) {
        ensure!(
            pair[0].seq < pair[1].seq,
            "events are not in increasing seq order: {} then {}",
            pair[0].seq,
            pair[1].seq
        );
    }
    if let Some(last) = events.last() {
        ensure!(
            next >= last.seq,
            "`next` is {next}, below the last event's seq {}",
            last.seq
        );
    }
    Ok(events)
}

fn parse_event(e: &Value) -> Result<Event> {
    let kind = str_field(e, "kind")?;
    ensure!(
        EVENT_KINDS.contains(&kind.as_str()),
        "`kind` is {kind:?}, expected one of {EVENT_KINDS:?}"
    );
    let from = str_field(e, "from")?;
    ensure!(
        !from.is_empty() && from.chars().all(|c| c.is_ascii_hexdigit()),
        "`from` {from:?} is not a hex node id"
    );
    let topic = opt_str_field(e, "topic")?;
    ensure!(
        (kind == "publication") == topic.is_some(),
        "a {kind} event with topic {topic:?} (only publications have one)"
    );
    Ok(Event {
        seq: u64_field(e, "seq")?,
        kind,
        from,
        topic,
        payload: str_field(e, "payload")?,
        at_ms: num_field(e, "at_ms")?,
    })
}

fn parse_pool(v: &Value) -> Result<Pool> {
    Ok(Pool {
        connected: u64_field(v, "connected")?,
        inbound: u64_field(v, "inbound")?,
        outbound: u64_field(v, "outbound")?,
        pending_dials: u64_field(v, "pending_dials")?,
        known: u64_field(v, "known")?,
        dropped_inbound: u64_field(v, "dropped_inbound")?,
        min_peers: u64_field(v, "min_peers")?,
        max_peers: u64_field(v, "max_peers")?,
    })
}

fn parse_peer(p: &Value) -> Result<Peer> {
    let state = str_field(p, "state")?;
    ensure!(
        PEER_STATES.contains(&state.as_str()),
        "`state` is {state:?}, expected one of {PEER_STATES:?}"
    );
    let direction = opt_str_field(p, "direction")?;
    ensure!(
        direction
            .as_deref()
            .is_none_or(|d| d == "inbound" || d == "outbound"),
        "`direction` is {direction:?}, expected \"inbound\", \"outbound\" or null"
    );
    let metadata = field(p, "metadata")?
        .as_object()
        .context("`metadata` is not an object")?
        .iter()
        .map(|(k, v)| {
            let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
            (k.clone(), v)
        })
        .collect();
    let via = opt_str_field(p, "via")?;
    let hops = match field(p, "hops")? {
        Value::Null => None,
        v => Some(v.as_u64().context("`hops` is not a count")?),
    };
    let routed = state == "routed";
    ensure!(
        via.is_some() == routed && hops.is_some() == routed,
        "`via` {via:?} and `hops` {hops:?} must be set exactly for a routed peer (state {state:?})"
    );
    Ok(Peer {
        node_id: str_field(p, "node_id")?,
        state,
        via,
        hops,
        direction,
        addr: opt_str_field(p, "addr")?,
        listen: str_list(p, "listen")?,
        rtt_ms: opt_num_field(p, "rtt_ms")?,
        srtt_ms: opt_num_field(p, "srtt_ms")?,
        errors: u64_field(p, "errors")?,
        timeouts: u64_field(p, "timeouts")?,
        score: num_field(p, "score")?,
        connected_secs: opt_num_field(p, "connected_secs")?,
        idle_ms: opt_num_field(p, "idle_ms")?,
        dial_failures: u64_field(p, "dial_failures")?,
        metadata,
    })
}

fn parse_connection(c: &Value) -> Result<Connection> {
    let direction = str_field(c, "direction")?;
    ensure!(
        direction == "inbound" || direction == "outbound",
        "`direction` is {direction:?}, expected \"inbound\" or \"outbound\""
    );
    Ok(Connection {
        node_id: str_field(c, "node_id")?,
        addr: str_field(c, "addr")?,
        direction,
        listen_addrs: str_list(c, "listen_addrs")?,
        rtt_ms: opt_num_field(c, "rtt_ms")?,
        smoothed_rtt_ms: opt_num_field(c, "smoothed_rtt_ms")?,
        age_secs: num_field(c, "age_secs")?,
        frames_sent: u64_field(c, "frames_sent")?,
        frames_received: u64_field(c, "frames_received")?,
    })
}

/// `GET /kv/{key}`, parsed.
#[derive(Debug, Clone, PartialEq)]
struct KvEntry {
    key: String,
    value: String,
    version: u64,
    writer: String,
    lease: Option<KvLease>,
    expires_at_ms: Option<u64>,
}

/// The `lease` of a [`KvEntry`].
#[derive(Debug, Clone, PartialEq)]
struct KvLease {
    owner: String,
    until_ms: u64,
    epoch: u64,
}

/// One item of `GET /kv?prefix=`.
#[derive(Debug, Clone, PartialEq)]
struct KvItem {
    key: String,
    value: String,
    version: u64,
    writer: String,
}

/// `GET /kv-digest`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KvDigest {
    /// 16 hex digits.
    digest: String,
    keys: u64,
    entries: u64,
}

fn parse_kv_entry(v: &Value) -> Result<KvEntry> {
    let lease = field(v, "lease")?;
    let lease = if lease.is_null() {
        None
    } else {
        Some(KvLease {
            owner: str_field(lease, "owner").context("lease")?,
            until_ms: u64_field(lease, "until_ms").context("lease")?,
            epoch: u64_field(lease, "epoch").context("lease")?,
        })
    };
    let expires = field(v, "expires_at_ms")?;
    let expires_at_ms = if expires.is_null() {
        None
    } else {
        Some(
            expires
                .as_u64()
                .context("`expires_at_ms` is neither a non-negative integer nor null")?,
        )
    };
    Ok(KvEntry {
        key: str_field(v, "key")?,
        value: str_field(v, "value")?,
        version: u64_field(v, "version")?,
        writer: str_field(v, "writer")?,
        lease,
        expires_at_ms,
    })
}

/// One page of `GET /kv?prefix=P`: the items, each starting with
/// `prefix`, sorted, `count` of them; and `next_hex`, where the next page
/// starts (null on the last).
fn parse_kv_list(v: &Value, prefix: &str) -> Result<(Vec<KvItem>, Option<String>)> {
    let items = list_field(v, "items", |i| {
        Ok(KvItem {
            key: str_field(i, "key")?,
            value: str_field(i, "value")?,
            version: u64_field(i, "version")?,
            writer: str_field(i, "writer")?,
        })
    })?;
    let count = u64_field(v, "count")?;
    ensure!(
        count == items.len() as u64,
        "`count` is {count} but `items` has {}",
        items.len()
    );
    if let Some(item) = items.iter().find(|i| !i.key.starts_with(prefix)) {
        bail!("key {:?} does not start with {prefix:?}", item.key);
    }
    if let Some(w) = items.windows(2).find(|w| w[0].key >= w[1].key) {
        bail!("items are not sorted: {:?} before {:?}", w[0].key, w[1].key);
    }
    let next = match v.get("next_hex") {
        Some(Value::String(h)) => Some(h.clone()),
        Some(Value::Null) => None,
        other => bail!("`next_hex` is {other:?}, not a string or null"),
    };
    Ok((items, next))
}

/// A key as a path segment (or query value): everything but unreserved
/// characters percent-encoded.
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The body of an error answer: `(code, error)`; `None` if the body does
/// not have them.
fn error_code(body: &Value) -> Option<(&str, &str)> {
    Some((body.get("code")?.as_str()?, body.get("error")?.as_str()?))
}

fn field<'a>(v: &'a Value, name: &str) -> Result<&'a Value> {
    v.get(name).with_context(|| format!("missing `{name}`"))
}

fn str_field(v: &Value, name: &str) -> Result<String> {
    field(v, name)?
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("`{name}` is not a string"))
}

fn str_list(v: &Value, name: &str) -> Result<Vec<String>> {
    field(v, name)?
        .as_array()
        .with_context(|| format!("`{name}` is not an array"))?
        .iter()
        .map(|s| {
            s.as_str()
                .map(str::to_owned)
                .with_context(|| format!("`{name}` has a non-string element"))
        })
        .collect()
}

fn num_field(v: &Value, name: &str) -> Result<f64> {
    field(v, name)?
        .as_f64()
        .with_context(|| format!("`{name}` is not a number"))
}

fn opt_str_field(v: &Value, name: &str) -> Result<Option<String>> {
    let f = field(v, name)?;
    if f.is_null() {
        return Ok(None);
    }
    f.as_str()
        .map(|s| Some(s.to_owned()))
        .with_context(|| format!("`{name}` is neither a string nor null"))
}

fn opt_num_field(v: &Value, name: &str) -> Result<Option<f64>> {
    let f = field(v, name)?;
    if f.is_null() {
        return Ok(None);
    }
    f.as_f64()
        .map(Some)
        .with_context(|| format!("`{name}` is neither a number nor null"))
}

fn u64_field(v: &Value, name: &str) -> Result<u64> {
    field(v, name)?
        .as_u64()
        .with_context(|| format!("`{name}` is not a non-negative integer"))
}

/// A small HTTP client for the admin API: short timeouts, no proxies.
struct Http {
    agent: ureq::Agent,
}

impl Http {
    fn new() -> Http {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(HTTP_TIMEOUT))
            // Loopback only: never go through $HTTP_PROXY and friends.
            .proxy(None)
            .http_status_as_error(false)
            .build();
        Http {
            agent: config.into(),
        }
    }

    fn status(&self, admin: &str) -> Result<Status> {
        let url = format!("http://{}/status", loopback_admin(admin)?);
        let mut resp = self
            .agent
            .get(&url)
            .call()
            .with_context(|| format!("GET {url}"))?;
        let code = resp.status();
        let body = resp
            .body_mut()
            .read_to_string()
            .with_context(|| format!("GET {url}: reading the body"))?;
        ensure!(code.is_success(), "GET {url}: HTTP {code}: {body}");
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("GET {url}: body is not JSON: {body}"))?;
        parse_status(&v).with_context(|| format!("GET {url}: does not match the contract"))
    }

    /// `POST /peers/{id}/{action}`; returns the HTTP status and body.
    fn peer_action(&self, admin: &str, id: &str, action: &str) -> Result<(u16, String)> {
        let url = format!("http://{}/peers/{id}/{action}", loopback_admin(admin)?);
        let mut resp = self
            .agent
            .post(&url)
            .send_empty()
            .with_context(|| format!("POST {url}"))?;
        let body = resp.body_mut().read_to_string().unwrap_or_default();
        Ok((resp.status().as_u16(), body))
    }

    /// `POST path` (with its query) with the text `body`, waiting up to
    /// `timeout`; returns the HTTP status and the body.
    fn post_text(
        &self,
        admin: &str,
        path: &str,
        body: &str,
        timeout: Duration,
    ) -> Result<(u16, String)> {
        let url = format!("http://{}{path}", loopback_admin(admin)?);
        let mut resp = self
            .agent
            .post(&url)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .header("content-type", "text/plain; charset=utf-8")
            .send(body)
            .with_context(|| format!("POST {url}"))?;
        let text = resp
            .body_mut()
            .read_to_string()
            .with_context(|| format!("POST {url}: reading the body"))?;
        Ok((resp.status().as_u16(), text))
    }

    /// `POST /broadcast` or `/publish/{topic}` (`path`); returns the
    /// message id.
    fn send_message(&self, admin: &str, path: &str, payload: &str) -> Result<u64> {
        let (code, body) = self.post_text(admin, path, payload, HTTP_TIMEOUT)?;
        ensure!(code == 200, "HTTP {code}: {body}");
        let v: Value =
            serde_json::from_str(&body).with_context(|| format!("body is not JSON: {body}"))?;
        u64_field(&v, "message_id").with_context(|| format!("body {body}"))
    }

    /// `POST /request/{node_id}?timeout_ms=`[`REQUEST_TIMEOUT`] with
    /// `payload`, waiting up to that plus [`REQUEST_SLACK`].
    fn request(&self, admin: &str, node_id: &str, payload: &str) -> Result<RequestAnswer> {
        let path = format!(
            "/request/{node_id}?timeout_ms={}",
            REQUEST_TIMEOUT.as_millis()
        );
        let (code, body) =
            self.post_text(admin, &path, payload, REQUEST_TIMEOUT + REQUEST_SLACK)?;
        RequestAnswer::parse(code, &body)
    }

    /// `GET /events?since=0`, parsed.
    fn events(&self, admin: &str) -> Result<Vec<Event>> {
        let url = format!("http://{}/events?since=0", loopback_admin(admin)?);
        let mut resp = self
            .agent
            .get(&url)
            .call()
            .with_context(|| format!("GET {url}"))?;
        let code = resp.status();
        let body = resp
            .body_mut()
            .read_to_string()
            .with_context(|| format!("GET {url}: reading the body"))?;
        ensure!(code.is_success(), "GET {url}: HTTP {code}: {body}");
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("GET {url}: body is not JSON: {body}"))?;
        parse_events(&v).with_context(|| format!("GET {url}: does not match the contract"))
    }

    /// `method` (`GET`, `PUT`, `POST` or `DELETE`) `path` with `body` (none
    /// for GET and DELETE); returns the HTTP status and the body as JSON.
    fn call(&self, admin: &str, method: &str, path: &str, body: &str) -> Result<(u16, Value)> {
        let url = format!("http://{}{path}", loopback_admin(admin)?);
        let shown = format!("{method} {url}");
        let sent = match method {
            "GET" => self.agent.get(&url).call(),
            "DELETE" => self.agent.delete(&url).call(),
            "PUT" => self.agent.put(&url).send(body),
            "POST" => self.agent.post(&url).send(body),
            _ => bail!("unsupported method {method}"),
        };
        let mut resp = sent.with_context(|| shown.clone())?;
        let code = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .with_context(|| format!("{shown}: reading the body"))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{shown}: HTTP {code}, body is not JSON: {text}"))?;
        Ok((code, v))
    }

    /// `PUT /kv/{key}[?ttl_ms=N]` with `value`; returns the HTTP status and
    /// the body.
    fn kv_put(
        &self,
        admin: &str,
        key: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Result<(u16, Value)> {
        let mut path = format!("/kv/{}", encode_key(key));
        if let Some(ttl) = ttl {
            let _ = write!(path, "?ttl_ms={}", ttl.as_millis());
        }
        self.call(admin, "PUT", &path, value)
    }

    /// `PUT /kv/{key}` that must answer 200; returns the version.
    fn kv_set(&self, admin: &str, key: &str, value: &str) -> Result<u64> {
        let (code, body) = self.kv_put(admin, key, value, None)?;
        ensure!(code == 200, "PUT /kv/{key}: HTTP {code}: {body}");
        u64_field(&body, "version").with_context(|| format!("PUT /kv/{key}: {body}"))
    }

    /// `DELETE /kv/{key}`, `POST /kv/{key}/release` and the like:
    /// `action` is `DELETE`, or `POST` with `suffix` (`/release`,
    /// `/confirm?timeout_ms=N`).
    fn kv_action(
        &self,
        admin: &str,
        method: &str,
        key: &str,
        suffix: &str,
    ) -> Result<(u16, Value)> {
        self.call(
            admin,
            method,
            &format!("/kv/{}{suffix}", encode_key(key)),
            "",
        )
    }

    /// `GET /kv/{key}`: `None` on 404.
    fn kv_get(&self, admin: &str, key: &str) -> Result<Option<KvEntry>> {
        let (code, body) = self.call(admin, "GET", &format!("/kv/{}", encode_key(key)), "")?;
        match code {
            200 => parse_kv_entry(&body)
                .map(Some)
                .with_context(|| format!("GET /kv/{key}: {body}: does not match the contract")),
            404 => Ok(None),
            _ => bail!("GET /kv/{key}: HTTP {code}: {body}"),
        }
    }

    /// `GET /kv?prefix=`, every page, parsed; checks the counts and the
    /// order, within and across pages.
    fn kv_list(&self, admin: &str, prefix: &str) -> Result<Vec<KvItem>> {
        let mut all: Vec<KvItem> = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut path = format!("/kv?prefix={}", encode_key(prefix));
            if let Some(h) = &after {
                path.push_str(&format!("&after_hex={h}"));
            }
            let (code, body) = self.call(admin, "GET", &path, "")?;
            ensure!(code == 200, "GET {path}: HTTP {code}: {body}");
            let (items, next) = parse_kv_list(&body, prefix)
                .with_context(|| format!("GET {path}: does not match the contract"))?;
            if let (Some(last), Some(first)) = (all.last(), items.first()) {
                ensure!(
                    last.key < first.key,
                    "GET {path}: the page starts at {:?}, not after {:?}",
                    first.key,
                    last.key
                );
            }
            ensure!(
                next.is_none() || !items.is_empty(),
                "GET {path}: an empty page says more follow"
            );
            all.extend(items);
            match next {
                Some(h) => after = Some(h),
                None => return Ok(all),
            }
        }
    }

    /// `GET /kv-digest`, parsed.
    fn kv_digest(&self, admin: &str) -> Result<KvDigest> {
        let (code, body) = self.call(admin, "GET", "/kv-digest", "")?;
        ensure!(code == 200, "GET /kv-digest: HTTP {code}: {body}");
        let parse = || -> Result<KvDigest> {
            Ok(KvDigest {
                digest: hex_digest(&body)?,
                keys: u64_field(&body, "keys")?,
                entries: u64_field(&body, "entries")?,
            })
        };
        parse().with_context(|| format!("GET /kv-digest: {body}: does not match the contract"))
    }

    /// `POST /rpc/{service}/{method}?deadline_ms=<deadline>{query}` with the
    /// arguments `args` (a JSON array), waiting up to the deadline plus
    /// [`RPC_SLACK`] (an answer later than that is an error: a hang).
    fn rpc_call(
        &self,
        admin: &str,
        service: &str,
        method: &str,
        query: &str,
        args: &Value,
        deadline: Duration,
    ) -> Result<RpcAnswer> {
        let path = format!(
            "/rpc/{service}/{method}?deadline_ms={}{query}",
            deadline.as_millis()
        );
        let (code, body) = self.post_text(admin, &path, &args.to_string(), deadline + RPC_SLACK)?;
        RpcAnswer::parse(code, &body).with_context(|| format!("POST {path}"))
    }

    /// `GET /rpc/{service}/providers`, parsed.
    fn rpc_providers(&self, admin: &str, service: &str) -> Result<Vec<RpcProvider>> {
        let path = format!("/rpc/{service}/providers");
        let (code, body) = self.call(admin, "GET", &path, "")?;
        ensure!(code == 200, "GET {path}: HTTP {code}: {body}");
        parse_providers(&body, service)
            .with_context(|| format!("GET {path}: {body}: does not match the contract"))
    }

    fn shutdown(&self, admin: &str) -> Result<()> {
        let url = format!("http://{}/shutdown", loopback_admin(admin)?);
        let mut resp = self
            .agent
            .post(&url)
            .send_empty()
            .with_context(|| format!("POST {url}"))?;
        let code = resp.status();
        if !code.is_success() {
            let body = resp.body_mut().read_to_string().unwrap_or_default();
            bail!("POST {url}: HTTP {code}: {body}");
        }
        Ok(())
    }
}

/// The answer to `POST /request/{node_id}`.
#[derive(Debug, Clone, PartialEq)]
enum RequestAnswer {
    /// 200: the target's reply.
    Reply { reply: String, elapsed_ms: f64 },
    /// Any other status, with the body's `code` and `error`.
    Error {
        http: u16,
        code: String,
        error: String,
    },
}

impl RequestAnswer {
    /// The answer from the HTTP status and body of `POST /request`.
    fn parse(http: u16, body: &str) -> Result<RequestAnswer> {
        let parse = || -> Result<RequestAnswer> {
            let v: Value = serde_json::from_str(body).context("body is not JSON")?;
            Ok(if http == 200 {
                RequestAnswer::Reply {
                    reply: str_field(&v, "reply")?,
                    elapsed_ms: num_field(&v, "elapsed_ms")?,
                }
            } else {
                RequestAnswer::Error {
                    http,
                    code: str_field(&v, "code")?,
                    error: str_field(&v, "error")?,
                }
            })
        };
        parse().with_context(|| format!("HTTP {http} {body}: does not match the contract"))
    }
}

/// The answer to `POST /rpc/{service}/{method}`.
#[derive(Debug, Clone, PartialEq)]
enum RpcAnswer {
    /// 200: the method's result.
    Result { result: Value, elapsed_ms: f64 },
    /// Any other status: the body's `code` (the error's label) and `error`,
    /// and the whole body (`application`, `elapsed_ms`, ...).
    Error {
        http: u16,
        code: String,
        error: String,
        body: Value,
    },
}

impl RpcAnswer {
    /// The answer from the HTTP status and body of `POST /rpc`.
    fn parse(http: u16, body: &str) -> Result<RpcAnswer> {
        let parse = || -> Result<RpcAnswer> {
            let v: Value = serde_json::from_str(body).context("body is not JSON")?;
            Ok(if http == 200 {
                RpcAnswer::Result {
                    result: field(&v, "result")?.clone(),
                    elapsed_ms: num_field(&v, "elapsed_ms")?,
                }
            } else {
                let code = str_field(&v, "code")?;
                ensure!(
                    RPC_ERROR_CODES.contains(&code.as_str()),
                    "`code` {code:?} is not one of {RPC_ERROR_CODES:?}"
                );
                RpcAnswer::Error {
                    http,
                    code,
                    error: str_field(&v, "error")?,
                    body: v,
                }
            })
        };
        parse().with_context(|| format!("HTTP {http} {body}: does not match the contract"))
    }

    /// `HTTP 404 "no_provider"` or `200`, for messages.
    fn describe(&self) -> String {
        match self {
            RpcAnswer::Result { result, .. } => format!("200 {result}"),
            RpcAnswer::Error {
                http, code, error, ..
            } => format!("HTTP {http} {code:?} ({error})"),
        }
    }
}

/// One entry of `GET /rpc/{service}/providers`.
#[derive(Debug, Clone, PartialEq)]
struct RpcProvider {
    node_id: String,
    /// One of [`RPC_REACHES`].
    reach: String,
    version: u64,
    methods: Vec<String>,
    latency_ms: Option<f64>,
    /// The node's calls to it waiting for their answer.
    in_flight: u64,
}

/// `GET /rpc/{service}/providers`: the providers, for `service`.
fn parse_providers(v: &Value, service: &str) -> Result<Vec<RpcProvider>> {
    let named = str_field(v, "service")?;
    ensure!(
        named == service,
        "`service` is {named:?}, expected {service:?}"
    );
    list_field(v, "providers", |p| {
        let reach = str_field(p, "reach")?;
        ensure!(
            RPC_REACHES.contains(&reach.as_str()),
            "`reach` {reach:?} is not one of {RPC_REACHES:?}"
        );
        Ok(RpcProvider {
            node_id: str_field(p, "node_id")?,
            reach,
            version: u64_field(p, "version")?,
            methods: str_list(p, "methods")?,
            latency_ms: opt_num_field(p, "latency_ms")?,
            in_flight: u64_field(p, "in_flight")?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn parses_options() {
        let opts = parse_args(&args(
            "--nodes 3 --scenario handshake --scenario=graceful-shutdown --release --keep-logs",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(opts.nodes, 3);
        assert_eq!(opts.scenarios, ["handshake", "graceful-shutdown"]);
        assert!(opts.release && opts.keep_logs);
        let opts = parse_args(&args("--nodes=64 --soak-secs 600"))
            .unwrap()
            .unwrap();
        assert_eq!(opts.nodes, 64);
        assert_eq!(opts.soak, Duration::from_secs(600));
        let opts = parse_args(&[]).unwrap().unwrap();
        assert_eq!((opts.nodes, opts.soak), (DEFAULT_NODES, DEFAULT_SOAK));
    }

    #[test]
    fn rejects_bad_options() {
        for bad in [
            "--nodes 1",
            "--nodes 65",
            "--nodes x",
            "--nodes",
            "--scenario nope",
            "--release=yes",
            "--soak-secs 0",
            "--soak-secs 86401",
            "--soak-secs ten",
            "--frobnicate",
        ] {
            assert!(parse_args(&args(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn soak_memory_may_settle_but_not_keep_growing() {
        let length = Duration::from_secs(9);
        let samples = |kib: &[u64]| -> Vec<RssSample> {
            kib.iter()
                .enumerate()
                .map(|(s, &k)| RssSample {
                    at: Duration::from_secs(s as u64),
                    kib: vec![Some(k), None],
                })
                .collect()
        };
        // Warming up fast, then flat: fine, whatever the start.
        let settled = samples(&[
            8_000, 30_000, 35_000, 40_000, 41_000, 40_000, 41_000, 40_500, 41_000, 41_000,
        ]);
        let described = check_soak_memory(&[0, 7], &settled, length).unwrap();
        assert_eq!(described, "node 0 7.8 39.1 40.0 40.0, node 7 n/a");
        // Past 4× the RSS after a third of the load (second 3): a leak.
        let leaking = samples(&[
            8_000, 9_000, 9_500, 10_000, 15_000, 20_000, 30_000, 40_001, 41_000, 45_000,
        ]);
        let e = check_soak_memory(&[0, 7], &leaking, length).unwrap_err();
        assert!(
            e.to_string().contains("node 0's RSS reached 43.9 MiB"),
            "{e}"
        );
        // Past the ceiling, however it started.
        let huge = samples(&[
            200_000, 200_000, 200_000, 250_000, 270_000, 270_000, 270_000, 270_000, 270_000,
            270_000,
        ]);
        assert!(check_soak_memory(&[0, 7], &huge, length).is_err());
    }

    #[test]
    fn scenarios_run_in_registry_order_once() {
        let names: Vec<&str> = select_scenarios(&args("graceful-shutdown handshake handshake"))
            .unwrap()
            .iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["handshake", "graceful-shutdown"]);
        assert_eq!(select_scenarios(&[]).unwrap().len(), SCENARIOS.len());
    }

    #[test]
    fn ready_line() {
        let r = parse_ready(
            r#"{"event":"ready","node_id":"00aaff","listen":["tcp://127.0.0.1:4000"],"admin":"127.0.0.1:4001"}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Ready {
                node_id: "00aaff".into(),
                listen: vec!["tcp://127.0.0.1:4000".into()],
                admin: "127.0.0.1:4001".into(),
            }
        );
        for bad in [
            "starting up",
            r#"{"event":"listening"}"#,
            r#"{"event":"ready","node_id":"xyz","listen":["tcp://127.0.0.1:1"],"admin":"127.0.0.1:2"}"#,
            r#"{"event":"ready","node_id":"ab","listen":[],"admin":"127.0.0.1:2"}"#,
            r#"{"event":"ready","node_id":"ab","listen":["tcp://127.0.0.1:0"],"admin":"127.0.0.1:2"}"#,
            r#"{"event":"ready","node_id":"ab","listen":["tcp://127.0.0.1:1"],"admin":"10.0.0.1:2"}"#,
        ] {
            assert!(parse_ready(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn admin_must_be_loopback() {
        assert_eq!(loopback_admin("127.0.0.1:80").unwrap(), "127.0.0.1:80");
        assert_eq!(loopback_admin("[::1]:80").unwrap(), "[::1]:80");
        assert_eq!(loopback_admin("localhost:80").unwrap(), "localhost:80");
        for bad in [
            "192.168.1.1:80",
            "0.0.0.0:80",
            "example.com:80",
            "localhost.example.com:80",
            "127.0.0.1",
            "127.0.0.1:0",
            "http://127.0.0.1:80",
        ] {
            assert!(loopback_admin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn status_json() {
        let mut v = serde_json::json!({
            "node_id": "aa", "network_id": "n", "security": "noise", "handshakes_ok": 2,
            "handshake_failures": {"crypto": 3}, "rejected_busy": 0,
            "evicted_handshakes": 1, "pending_handshakes": 2,
            "listen": ["tcp://127.0.0.1:1"], "uptime_secs": 1.5,
            "connections": [{
                "node_id": "bb", "addr": "tcp://127.0.0.1:2", "direction": "inbound",
                "listen_addrs": ["tcp://127.0.0.1:3"], "rtt_ms": null, "smoothed_rtt_ms": 0.25,
                "age_secs": 1.2, "frames_sent": 3, "frames_received": 4
            }],
            "pool": {"connected": 1, "inbound": 1, "outbound": 0, "pending_dials": 0,
                     "known": 2, "dropped_inbound": 0, "min_peers": 3, "max_peers": 7},
            "peers": [{
                "node_id": "bb", "state": "connected", "via": null, "hops": null,
                "direction": "inbound",
                "addr": "tcp://127.0.0.1:2", "listen": ["tcp://127.0.0.1:3"], "rtt_ms": 0.2,
                "srtt_ms": 0.25, "errors": 0, "timeouts": 0, "score": 0.9,
                "connected_secs": 1.2, "idle_ms": 10, "dial_failures": 0,
                "metadata": {"test-mesh-node": "1", "n": 2}
            }, {
                "node_id": "cc", "state": "routed", "via": "bb", "hops": 2,
                "direction": null, "addr": null,
                "listen": ["tcp://127.0.0.1:4"], "rtt_ms": null, "srtt_ms": null,
                "errors": 0, "timeouts": 0, "score": 0, "connected_secs": null,
                "idle_ms": null, "dial_failures": 2, "metadata": {}
            }],
            "blocked": ["dd"],
            "concerns": [{
                "command": 256, "name": "echo", "requests": 2, "replies": 1, "errors": 0,
                "panics": 0, "dropped": 0, "in_flight": 1, "queued": 0
            }],
            "routes": [{"target": "ee", "next_hop": "bb", "hops": 3, "age_ms": 12.5}],
            "builtin": {"flood": {"seen": 3}, "routing": {}, "topics": {"topics": 1}},
            "subscriptions": ["t"],
            "unknown_commands": 0,
            "sync": {
                "leasing": true, "keys": 3, "entries": 4, "bytes": 900, "max_bytes": 1000,
                "digest": "00ab00cd00ef0012",
                "writes": 1, "applied": 2, "stale": 0, "refused": 0, "refused_full": 0, "pushes": 1,
                "pushed_entries": 1, "push_failures": 0, "rounds": 5, "rounds_equal": 4,
                "round_failures": 0, "rounds_cut": 0, "pulled": 2, "sent": 0, "lease_lost": 1
            },
            "served": [{
                "name": "demo", "version": 1, "methods": ["echo", "add"], "calls": 5,
                "errors": 1, "overloaded": 0, "cancelled": 2, "in_flight": 0
            }],
            "calls": {"calls": 7, "failures": 2, "retries": 1}
        });
        // Apart: one literal that large exceeds the macro's recursion limit.
        v["seeds"] = serde_json::json!([
            {"addr": "tcp://127.0.0.1:2", "node_id": "bb", "connected": true, "failures": 0},
            {"addr": "tcp://127.0.0.1:9", "connected": false, "failures": 3,
             "last_error": "refused", "next_dial_ms": 1500}
        ]);
        let s = parse_status(&v).unwrap();
        let echo = s.concern(ECHO_COMMAND).unwrap();
        assert_eq!(
            (echo.name.as_str(), echo.requests, echo.in_flight),
            ("echo", 2, 1)
        );
        assert!(s.concern(1).is_none());
        assert_eq!(
            s.routes,
            [Route {
                target: "ee".into(),
                next_hop: "bb".into(),
                hops: 3,
                age_ms: 12.5
            }]
        );
        assert_eq!(s.builtin["flood"]["seen"], 3);
        assert_eq!(s.subscriptions, ["t"]);
        assert_eq!(
            s.seeds,
            [
                SeedStatus {
                    addr: "tcp://127.0.0.1:2".into(),
                    node_id: Some("bb".into()),
                    connected: true,
                    failures: 0,
                    last_error: None,
                },
                SeedStatus {
                    addr: "tcp://127.0.0.1:9".into(),
                    node_id: None,
                    connected: false,
                    failures: 3,
                    last_error: Some("refused".into()),
                },
            ]
        );
        assert_eq!(
            s.sync,
            SyncStatus {
                leasing: true,
                keys: 3,
                entries: 4,
                bytes: 900,
                max_bytes: 1000,
                refused_full: 0,
                digest: "00ab00cd00ef0012".into(),
                lease_lost: 1,
            }
        );
        for (key, value) in [
            ("digest", serde_json::json!("00ab")),
            ("digest", serde_json::json!("00ab00cd00ef001z")),
            ("leasing", serde_json::json!("on")),
            ("rounds", serde_json::json!(-1)),
        ] {
            let mut bad = v.clone();
            bad["sync"][key] = value;
            let err = format!("{:#}", parse_status(&bad).unwrap_err());
            assert!(err.contains("sync") && err.contains(key), "{err}");
        }
        assert_eq!(
            s.served("demo"),
            Some(&ServedService {
                name: "demo".into(),
                version: 1,
                methods: vec!["echo".into(), "add".into()],
                calls: 5,
                errors: 1,
                overloaded: 0,
                cancelled: 2,
                in_flight: 0,
            })
        );
        assert!(s.served("other").is_none());
        assert_eq!(
            s.calls,
            CallCounters {
                calls: 7,
                failures: 2,
                retries: 1
            }
        );
        for (key, value) in [
            ("served", serde_json::json!([{"name": "demo"}])),
            ("served", serde_json::json!({})),
            ("calls", serde_json::json!({"calls": 1, "failures": 0})),
        ] {
            let mut bad = v.clone();
            bad[key] = value;
            let err = format!("{:#}", parse_status(&bad).unwrap_err());
            assert!(err.contains(key), "{err}");
        }
        assert_eq!(s.connections[0].rtt_ms, None);
        assert_eq!(s.connections[0].rtt(), Some(0.25));
        assert_eq!(s.security, "noise");
        assert_eq!((s.failures("crypto"), s.failures("io")), (3, 0));
        assert_eq!(
            (s.pool.min_peers, s.pool.max_peers, s.pool.known),
            (3, 7, 2)
        );
        assert_eq!(s.blocked, ["dd"]);
        let bb = s.peer("bb").unwrap();
        assert!(bb.is_linked() && bb.direction.as_deref() == Some("inbound"));
        assert_eq!(bb.metadata["test-mesh-node"], "1");
        assert_eq!(bb.metadata["n"], "2");
        let cc = s.peer("cc").unwrap();
        assert!(!cc.is_linked() && cc.direction.is_none() && cc.addr.is_none());
        assert_eq!(s.lists_how("bb").as_deref(), Some("as connected"));
        assert_eq!(s.lists_how("cc"), None);

        for (key, value) in [
            ("security", serde_json::json!("rot13")),
            ("handshake_failures", serde_json::json!({"crypto": -1})),
            ("handshake_failures", serde_json::json!([])),
            ("handshakes_ok", serde_json::json!(null)),
        ] {
            let mut bad = v.clone();
            bad[key] = value;
            assert!(parse_status(&bad).is_err(), "{bad}");
        }

        for (key, value) in [
            ("state", serde_json::json!("asleep")),
            ("direction", serde_json::json!("sideways")),
            ("addr", serde_json::json!(7)),
            ("metadata", serde_json::json!([])),
            ("dial_failures", serde_json::json!(-1)),
            ("score", serde_json::json!(null)),
        ] {
            let mut bad = v.clone();
            bad["peers"][1][key] = value;
            let err = format!("{:#}", parse_status(&bad).unwrap_err());
            assert!(err.contains("peers[1]") && err.contains(key), "{err}");
        }
        for (key, value) in [
            ("builtin", serde_json::json!({"flood": {}, "routing": {}})),
            (
                "builtin",
                serde_json::json!({"flood": {}, "routing": {}, "topics": 1}),
            ),
            (
                "routes",
                serde_json::json!([{"target": "ee", "next_hop": "bb", "hops": -1,
                                           "age_ms": 1}]),
            ),
            ("concerns", serde_json::json!([{"command": 256}])),
            ("subscriptions", serde_json::json!(["t", 1])),
        ] {
            let mut bad = v.clone();
            bad[key] = value;
            let err = format!("{:#}", parse_status(&bad).unwrap_err());
            assert!(err.contains(key), "{err}");
        }
        for key in [
            "pool",
            "peers",
            "blocked",
            "seeds",
            "concerns",
            "routes",
            "builtin",
            "subscriptions",
            "unknown_commands",
            "sync",
            "served",
            "calls",
        ] {
            let mut bad = v.clone();
            bad.as_object_mut().unwrap().remove(key);
            assert!(parse_status(&bad).is_err(), "without {key}");
        }
        let mut bad = v.clone();
        bad["pool"]["max_peers"] = "7".into();
        assert!(parse_status(&bad).is_err());

        let mut bad = v.clone();
        bad["connections"][0]["direction"] = "sideways".into();
        assert!(parse_status(&bad).is_err());
        let mut bad = v.clone();
        bad["connections"][0]
            .as_object_mut()
            .unwrap()
            .remove("listen_addrs");
        let err = format!("{:#}", parse_status(&bad).unwrap_err());
        assert!(
            err.contains("connections[0]") && err.contains("listen_addrs"),
            "{err}"
        );
    }

    fn graph(lists: &[(usize, &[usize])]) -> Graph {
        Graph {
            listed: lists
                .iter()
                .map(|(i, l)| (*i, l.iter().copied().collect()))
                .collect(),
        }
    }

    #[test]
    fn graph_connectivity() {
        let ring = graph(&[(0, &[1, 3]), (1, &[0, 2]), (2, &[1, 3]), (3, &[2, 0])]);
        assert_eq!(ring.components(), [vec![0, 1, 2, 3]]);
        assert_eq!((ring.links(), ring.degree(0), ring.degree(9)), (4, 2, 0));
        assert!(ring.one_sided().is_empty() && ring.outside().is_empty());
        assert_eq!(ring.degrees(), "2,2,2,2");
        assert_eq!(ring.describe(), "0:1,3 1:0,2 2:1,3 3:0,2");

        // Two halves and a loner; a link to a node outside the graph (9)
        // joins nothing.
        let split = graph(&[(0, &[1]), (1, &[0, 9]), (2, &[3]), (3, &[2]), (4, &[])]);
        assert_eq!(split.components(), [vec![0, 1], vec![2, 3], vec![4]]);
        assert_eq!(split.outside(), [(1, 9)]);
        assert_eq!(split.links(), 2);
        assert_eq!(split.describe(), "0:1 1:0,9 2:3 3:2 4:-");

        // One-sided links still connect (a link counts both ways) but are
        // reported; neighbours include who lists us.
        let lopsided = graph(&[(0, &[1, 2]), (1, &[0]), (2, &[])]);
        assert_eq!(lopsided.components(), [vec![0, 1, 2]]);
        assert_eq!(lopsided.one_sided(), [(0, 2)]);
        assert_eq!(lopsided.neighbours(2), BTreeSet::from([0]));
        assert_eq!(lopsided.links(), 2);
        assert_eq!(Graph::default().components(), Vec::<Vec<usize>>::new());
    }

    #[test]
    fn mesh_peer_limits() {
        // Node 0 (everybody's seed) takes every other node plus one more
        // inbound: max_peers minus the 2 slots reserved for its own dials.
        for nodes in MIN_NODES..=MAX_NODES {
            let l = PeerLimits::for_mesh(nodes);
            assert!(l.max - 2 > nodes - 1, "{nodes}: {l:?}");
            assert!((1..=3).contains(&l.min) && l.min < nodes, "{nodes}: {l:?}");
        }
        assert_eq!(PeerLimits::for_mesh(5), PeerLimits { min: 3, max: 7 });
        assert_eq!(PeerLimits::for_mesh(2), PeerLimits { min: 1, max: 4 });
        let args: Vec<String> = PeerLimits { min: 2, max: 6 }
            .args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(args, ["--min-peers", "2", "--max-peers", "6"]);
    }

    #[test]
    fn events_json() {
        let v = serde_json::json!({
            "events": [
                {"seq": 1, "kind": "broadcast", "from": "aa01", "topic": null,
                 "payload": "hi", "at_ms": 10},
                {"seq": 3, "kind": "publication", "from": "AA02", "topic": "t",
                 "payload": "p", "at_ms": 12.5},
            ],
            "next": 4
        });
        let events = parse_events(&v).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[1],
            Event {
                seq: 3,
                kind: "publication".into(),
                from: "AA02".into(),
                topic: Some("t".into()),
                payload: "p".into(),
                at_ms: 12.5,
            }
        );
        assert!(
            parse_events(&serde_json::json!({"events": [], "next": 0}))
                .unwrap()
                .is_empty()
        );
        for (path, value) in [
            ("/events/0/kind", serde_json::json!("gossip")),
            ("/events/0/from", serde_json::json!("node 1")),
            ("/events/0/topic", serde_json::json!("t")),
            ("/events/1/topic", serde_json::json!(null)),
            ("/events/1/seq", serde_json::json!(1)),
            ("/events/0/payload", serde_json::json!(null)),
            ("/next", serde_json::json!(2)),
        ] {
            let mut bad = v.clone();
            *bad.pointer_mut(path).unwrap() = value;
            assert!(parse_events(&bad).is_err(), "{path}: {bad}");
        }
    }

    #[test]
    fn request_answers() {
        assert_eq!(
            RequestAnswer::parse(200, r#"{"reply":"hi","elapsed_ms":1.5}"#).unwrap(),
            RequestAnswer::Reply {
                reply: "hi".into(),
                elapsed_ms: 1.5
            }
        );
        assert_eq!(
            RequestAnswer::parse(404, r#"{"error":"no route","code":"unreachable"}"#).unwrap(),
            RequestAnswer::Error {
                http: 404,
                code: "unreachable".into(),
                error: "no route".into()
            }
        );
        for (http, body) in [
            (200, r#"{"elapsed_ms":1}"#),
            (404, r#"{"error":"no route"}"#),
            (502, "Bad Gateway"),
        ] {
            let err = format!("{:#}", RequestAnswer::parse(http, body).unwrap_err());
            assert!(err.contains(body), "{err}");
        }
    }

    #[test]
    fn rpc_answers_and_providers() {
        let ok = RpcAnswer::parse(200, r#"{"result": {"a": [1]}, "elapsed_ms": 0.5}"#).unwrap();
        assert_eq!(
            ok,
            RpcAnswer::Result {
                result: serde_json::json!({"a": [1]}),
                elapsed_ms: 0.5
            }
        );
        assert_eq!(ok.describe(), r#"200 {"a":[1]}"#);
        let body = r#"{"error": "the method failed", "code": "application",
                       "application": {"refused": {"message": "x"}}, "elapsed_ms": 1.0}"#;
        let RpcAnswer::Error {
            http, code, body, ..
        } = RpcAnswer::parse(422, body).unwrap()
        else {
            panic!("not an error")
        };
        assert_eq!((http, code.as_str()), (422, "application"));
        assert_eq!(body["application"]["refused"]["message"], "x");
        for (http, bad) in [
            (200, r#"{"elapsed_ms": 1}"#),
            (200, r#"{"result": 1}"#),
            (404, r#"{"error": "x", "code": "gone_fishing"}"#),
            (404, r#"{"code": "no_provider"}"#),
            (504, "timeout"),
        ] {
            assert!(RpcAnswer::parse(http, bad).is_err(), "{http} {bad}");
        }

        let v = serde_json::json!({"service": "demo", "providers": [
            {"node_id": "aa", "reach": "routed", "version": 1, "methods": ["echo"],
             "latency_ms": null, "in_flight": 0},
            {"node_id": "bb", "reach": "local", "version": 2, "methods": [], "latency_ms": 0.5,
             "in_flight": 3}
        ]});
        let list = parse_providers(&v, "demo").unwrap();
        assert_eq!(
            list[0],
            RpcProvider {
                node_id: "aa".into(),
                reach: "routed".into(),
                version: 1,
                methods: vec!["echo".into()],
                latency_ms: None,
                in_flight: 0
            }
        );
        assert_eq!((list[1].latency_ms, list[1].in_flight), (Some(0.5), 3));
        assert!(parse_providers(&v, "other").is_err());
        let mut bad = v.clone();
        bad["providers"][0]["reach"] = "far".into();
        assert!(parse_providers(&bad, "demo").is_err());
        let mut bad = v.clone();
        bad["providers"][1]
            .as_object_mut()
            .unwrap()
            .remove("in_flight");
        assert!(parse_providers(&bad, "demo").is_err());
        let lists = BTreeMap::from([(3, list)]);
        assert_eq!(reach_of(&lists, 3, "aa"), "routed");
        assert_eq!(reach_of(&lists, 3, "cc"), "unlisted");
        assert_eq!(reach_of(&lists, 4, "aa"), "unlisted");
    }

    #[test]
    fn lines_and_distances() {
        let line = graph(&[(5, &[6]), (6, &[5, 7]), (7, &[6, 8]), (8, &[7])]);
        assert_eq!(line_problem(&line, &[5, 6, 7, 8]), None);
        assert_eq!(line_name(&[5, 6, 7, 8]), "5-6-7-8");
        assert_eq!(
            line.distances(5),
            BTreeMap::from([(5, 0), (6, 1), (7, 2), (8, 3)])
        );
        // A chord, a one-sided link, a node not there yet.
        let ring = graph(&[(5, &[6, 8]), (6, &[5, 7]), (7, &[6, 8]), (8, &[7, 5])]);
        assert_eq!(
            line_problem(&ring, &[5, 6, 7, 8]).unwrap(),
            "node 5 lists [6, 8], expected [6]; node 8 lists [5, 7], expected [7]"
        );
        let forming = graph(&[(5, &[]), (6, &[5])]);
        assert_eq!(
            line_problem(&forming, &[5, 6, 7]).unwrap(),
            "node 5 lists [none], expected [6]; node 6 lists [5], expected [5, 7]; \
             node 7 lists [none], expected [6]"
        );
        // Unreachable nodes are left out; links count both ways.
        let split = graph(&[(0, &[1]), (1, &[]), (2, &[])]);
        assert_eq!(split.distances(1), BTreeMap::from([(0, 1), (1, 0)]));
    }

    #[test]
    fn flood_origin() {
        // The ends of a line are farthest from the rest; node 0 comes last.
        let line = graph(&[(0, &[1]), (1, &[0, 2]), (2, &[1, 3]), (3, &[2])]);
        assert_eq!(pick_origin(&line), 3);
        let line = graph(&[(0, &[1]), (1, &[0, 2]), (2, &[1])]);
        assert_eq!(pick_origin(&line), 2);
        // A star around node 0: any leaf is 2 hops from another; the one
        // with fewest peers, then the lowest.
        let star = graph(&[(0, &[1, 2, 3]), (1, &[0, 3]), (2, &[0]), (3, &[0, 1])]);
        assert_eq!(pick_origin(&star), 2);
        // Complete: not node 0 if another node will do.
        let full = graph(&[(0, &[1, 2]), (1, &[0, 2]), (2, &[0, 1])]);
        assert_eq!(pick_origin(&full), 1);
        assert_eq!(pick_origin(&Graph::default()), 0);
    }

    #[test]
    fn deliveries() {
        let ev = |seq, kind: &str, from: &str, topic: Option<&str>, payload: &str| Event {
            seq,
            kind: kind.into(),
            from: from.into(),
            topic: topic.map(str::to_owned),
            payload: payload.into(),
            at_ms: 0.0,
        };
        let mesh = Mesh::new(
            Path::new("meshwork"),
            "n",
            Path::new("."),
            PeerLimits::for_mesh(3),
        );
        let d = Delivery {
            kind: "publication",
            topic: Some("t"),
            payload: "p",
            from: "aa",
        };
        let mine = ev(1, "publication", "AA", Some("t"), "p");
        let other = ev(2, "broadcast", "bb", None, "q");
        let log = |a: Vec<Event>, b: Vec<Event>, c: Vec<Event>| -> EventLog {
            BTreeMap::from([(0, a), (1, b), (2, c)])
        };
        let ok = log(
            vec![],
            vec![other.clone(), mine.clone()],
            vec![mine.clone()],
        );
        assert!(d.check(&mesh, &ok, &[1, 2], &[0]).is_ok());
        let pending = log(vec![], vec![other.clone()], vec![mine.clone()]);
        assert!(
            matches!(d.check(&mesh, &pending, &[1, 2], &[0]), Err(Wait::Pending(m)) if m.contains("node(s) 1"))
        );
        let twice = log(
            vec![],
            vec![mine.clone(), ev(3, "publication", "aa", Some("t"), "p")],
            vec![mine.clone()],
        );
        assert!(
            matches!(d.check(&mesh, &twice, &[1, 2], &[0]), Err(Wait::Fatal(m)) if m.contains("2 times"))
        );
        let leaked = log(vec![mine.clone()], vec![mine.clone()], vec![mine.clone()]);
        assert!(
            matches!(d.check(&mesh, &leaked, &[1, 2], &[0]), Err(Wait::Fatal(m)) if m.contains("node 0"))
        );
        let wrong_topic = log(
            vec![],
            vec![ev(1, "publication", "aa", Some("u"), "p")],
            vec![mine.clone()],
        );
        assert!(matches!(
            d.check(&mesh, &wrong_topic, &[1, 2], &[0]),
            Err(Wait::Fatal(_))
        ));
        let wrong_origin = log(
            vec![],
            vec![ev(1, "publication", "cc", Some("t"), "p")],
            vec![mine],
        );
        assert!(matches!(
            d.check(&mesh, &wrong_origin, &[1, 2], &[0]),
            Err(Wait::Fatal(_))
        ));
        assert!(matches!(
            d.check(&mesh, &ok, &[1, 2, 3], &[0]),
            Err(Wait::Fatal(_))
        ));
    }

    #[test]
    fn kv_json() {
        let entry = serde_json::json!({
            "key": "k", "value": "v", "version": 7_000_000_000_000_000_000u64, "writer": "aa",
            "lease": {"owner": "aa", "until_ms": 12, "epoch": 1}, "expires_at_ms": null
        });
        assert_eq!(
            parse_kv_entry(&entry).unwrap(),
            KvEntry {
                key: "k".into(),
                value: "v".into(),
                version: 7_000_000_000_000_000_000,
                writer: "aa".into(),
                lease: Some(KvLease {
                    owner: "aa".into(),
                    until_ms: 12,
                    epoch: 1
                }),
                expires_at_ms: None,
            }
        );
        let mut ephemeral = entry.clone();
        ephemeral["lease"] = Value::Null;
        ephemeral["expires_at_ms"] = 99.into();
        let e = parse_kv_entry(&ephemeral).unwrap();
        assert_eq!((e.lease, e.expires_at_ms), (None, Some(99)));
        for (key, value) in [
            ("version", serde_json::json!(1.5)),
            ("lease", serde_json::json!({"owner": "aa"})),
            ("expires_at_ms", serde_json::json!("soon")),
        ] {
            let mut bad = entry.clone();
            bad[key] = value;
            assert!(parse_kv_entry(&bad).is_err(), "{bad}");
        }

        let item =
            |key: &str| serde_json::json!({"key": key, "value": "v", "version": 1, "writer": "aa"});
        let list =
            serde_json::json!({"items": [item("p.a"), item("p.b")], "count": 2, "next_hex": null});
        let (items, next) = parse_kv_list(&list, "p.").unwrap();
        assert_eq!((items.len(), next), (2, None));
        assert_eq!(items[1].key, "p.b");
        let page = serde_json::json!({"items": [item("p.a")], "count": 1, "next_hex": "702e61"});
        assert_eq!(
            parse_kv_list(&page, "p.").unwrap().1.as_deref(),
            Some("702e61")
        );
        for bad in [
            serde_json::json!({"items": [item("p.a")], "count": 2}),
            serde_json::json!({"items": [item("p.b"), item("p.a")], "count": 2}),
            serde_json::json!({"items": [item("q.a")], "count": 1}),
            serde_json::json!({"items": [item("p.a"), item("p.a")], "count": 2}),
            serde_json::json!({"items": [item("p.a")], "count": 1, "next_hex": 5}),
        ] {
            assert!(parse_kv_list(&bad, "p.").is_err(), "{bad}");
        }
        assert_eq!(encode_key("tm.kv.1-2.0001"), "tm.kv.1-2.0001");
        assert_eq!(encode_key("a/b c%"), "a%2Fb%20c%25");
        assert_eq!(encode_key("é"), "%C3%A9");

        let d = |digest: &str, keys| KvDigest {
            digest: digest.into(),
            keys,
            entries: keys,
        };
        let all = BTreeMap::from([
            (0, d("0123456789abcdef", 3)),
            (1, d("fedcba9876543210", 2)),
            (2, d("0123456789abcdef", 3)),
        ]);
        assert_eq!(
            describe_digests(&all),
            "nodes 0, 2: 01234567 (3 keys); node 1: fedcba98 (2 keys)"
        );
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
