//! A cache and configuration service: `cargo run -p meshwork --example cache`.
//!
//! Three nodes in one process over loopback TCP: `app`, which calls the
//! cache, and `cache-a` and `cache-b`, which both serve it.
//!
//! - the cache is a typed service (`#[meshwork::service]`) served under one
//!   name on two nodes: a call goes to either, and when one stops, calls go
//!   to the other;
//! - its configuration lives in the replicated map (`config/cache/...`):
//!   each server watches the prefix and applies a change as it arrives;
//! - a leased key (`locks/compact`) is a lock: one node at a time compacts,
//!   and a holder that dies frees it when its short lease lapses.

#![allow(clippy::print_stdout)] // an example prints what it does

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshwork::sync::{ChangeKind, SyncError, SyncMap};
use meshwork::{Address, Error, Node};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

const NETWORK: &str = "cache-example";
/// The cache's capacity, in entries: a number, as text.
const CAPACITY: &str = "config/cache/capacity";
const LOCK: &str = "locks/compact";
/// How long any one step may take.
const WAIT: Duration = Duration::from_secs(10);

/// A value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Cached {
    pub(crate) value: String,
    /// The server that answered.
    pub(crate) server: String,
    /// Whether it had the value already.
    pub(crate) hit: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum CacheError {
    /// Keys are 1 to 64 bytes.
    BadKey,
}

#[meshwork::service]
pub(crate) trait Cache {
    /// The value of `key`, worked out on a miss. Safe to run twice, so a
    /// call that times out is tried again on the other server.
    #[idempotent]
    async fn get(&self, key: String) -> Result<Cached, CacheError>;
    /// How many entries this server holds, and may hold.
    async fn size(&self) -> (usize, usize);
}

/// One server's cache: at most `capacity` entries, the oldest evicted first.
struct Store {
    name: String,
    capacity: AtomicUsize,
    entries: Mutex<(HashMap<String, String>, VecDeque<String>)>,
}

impl Store {
    fn evict(&self) {
        let capacity = self.capacity.load(Ordering::Relaxed);
        let mut guard = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (map, order) = &mut *guard;
        while order.len() > capacity {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }
}

impl Cache for Arc<Store> {
    async fn get(&self, key: String) -> Result<Cached, CacheError> {
        if key.is_empty() || key.len() > 64 {
            return Err(CacheError::BadKey);
        }
        let found = {
            let guard = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            guard.0.get(&key).cloned()
        };
        let hit = found.is_some();
        let value = match found {
            Some(v) => v,
            None => {
                let v = key.to_uppercase(); // the expensive part
                let mut guard = self.entries.lock().unwrap_or_else(|e| e.into_inner());
                guard.0.insert(key.clone(), v.clone());
                guard.1.push_back(key);
                drop(guard);
                self.evict();
                v
            }
        };
        let server = self.name.clone();
        Ok(Cached { value, server, hit })
    }

    async fn size(&self) -> (usize, usize) {
        let len = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .len();
        (len, self.capacity.load(Ordering::Relaxed))
    }
}

/// What the servers report, for the story to wait on.
type Log = mpsc::UnboundedSender<(String, String)>;

/// Starts a node; with a seed, it joins the mesh through it.
async fn start(seed: Option<Address>) -> Result<Node, Error> {
    let mut builder = Node::builder(NETWORK).listen("tcp://127.0.0.1:0".parse()?);
    if let Some(seed) = seed {
        builder = builder.seed(seed);
    }
    builder.start().await
}

/// Starts a cache server: serves `cache`, and applies the configuration
/// in the map now and whenever it changes.
async fn serve_cache(name: &str, seed: Address, log: Log) -> Result<Node, Error> {
    let node = start(Some(seed)).await?;
    let store = Arc::new(Store {
        name: name.to_string(),
        capacity: AtomicUsize::new(100),
        entries: Mutex::default(),
    });
    // Watch first, then read: a change landing in between is not missed.
    let mut changes = node.sync().watch("config/cache/");
    let (map, watched) = (node.sync().clone(), store.clone());
    tokio::spawn(async move {
        let apply = |value: &[u8]| {
            if let Ok(n) = String::from_utf8_lossy(value).parse() {
                watched.capacity.store(n, Ordering::Relaxed);
                watched.evict();
                println!("[{}] capacity is now {n}", watched.name);
                let _ = log.send((watched.name.clone(), format!("capacity {n}")));
            }
        };
        if let Some(value) = map.get(CAPACITY) {
            apply(&value);
        }
        loop {
            match changes.recv().await {
                Ok(c) if c.key == CAPACITY => {
                    if let ChangeKind::Set(value) = c.kind {
                        apply(&value);
                    }
                }
                Ok(_) | Err(SyncError::Lagged(_)) => {}
                Err(_) => break, // the node stopped
            }
        }
    });
    node.rpc().serve("cache", CacheServer::new(store)).await?;
    Ok(node)
}

/// Runs `work` while this node holds `key` as a lock: a key leased to it
/// for `lease` (so that it frees itself if this node dies), and removed
/// when the work is done. A lease belongs to the node, not to a task: take
/// a lock from one task of a node at a time. `confirm` asks the neighbours
/// only, so two nodes that are not neighbours could both pass the check
/// until their claims meet (guide.md, section 3): here every node is a
/// neighbour of every other.
async fn locked<T>(
    map: &SyncMap,
    key: &str,
    lease: Duration,
    work: impl Future<Output = T>,
) -> Result<T, Error> {
    let mut changes = map.watch(key);
    loop {
        match map.set_leased(key, map.node_id().to_string(), lease).await {
            Ok(_) => {
                // Neighbours that knew of an earlier claim tell us now.
                map.confirm(key, WAIT).await?;
                if map.lease(key).is_some_and(|l| &l.owner == map.node_id()) {
                    break;
                }
            }
            Err(SyncError::LeaseHeld { until_ms, .. }) => {
                // Removed by its holder, or lapsed: whichever comes first.
                let lapse = Duration::from_millis(until_ms.saturating_sub(map.now_ms()));
                let _ = tokio::time::timeout(lapse, changes.recv()).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let out = work.await;
    map.remove(key).await?;
    Ok(out)
}

/// What the story found, for the test to check.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// The server of the first call, stopped after it.
    pub(crate) stopped: String,
    /// The answer after it stopped.
    pub(crate) after_failover: Cached,
    /// The capacity the remaining server reported after the change.
    pub(crate) size: (usize, usize),
    /// Who compacted, in order.
    pub(crate) compactions: Vec<String>,
    /// The most nodes that held the lock at once.
    pub(crate) most_holders: usize,
}

pub(crate) async fn run() -> Result<Outcome, Error> {
    let (log, mut reports) = mpsc::unbounded_channel();
    let mut report = async |who: &str, what: &str| {
        let wanted = (who.to_string(), what.to_string());
        let read = async {
            while let Some(got) = reports.recv().await {
                if got == wanted {
                    return;
                }
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .map_err(|_| Error::Timeout(WAIT, "a report", format!("{who}: {what}")))
    };

    let app = start(None).await?;
    let seed = app.listen_addrs()[0].clone();
    // The configuration comes first; the servers read it when they start.
    app.sync().set(CAPACITY, "100").await?;
    let mut servers = HashMap::new();
    for name in ["cache-a", "cache-b"] {
        servers.insert(name, serve_cache(name, seed.clone(), log.clone()).await?);
    }
    for node in [&app, &servers["cache-a"], &servers["cache-b"]] {
        node.wait_for_peers(2, WAIT).await?; // every node a neighbour of every other
    }

    // Both servers listed before relying on failover between them.
    app.rpc().wait_for_providers("cache", 2, WAIT).await?;

    let cache: CacheClient = app.rpc().client("cache");
    let first = cache.get("mesh".into()).await?;
    println!("[app] {first:?}");
    assert_eq!(first.value, "MESH");
    match cache.get(String::new()).await {
        Err(meshwork::rpc::RpcError::Application(CacheError::BadKey)) => {}
        other => println!("[app] unexpected: {other:?}"),
    }

    // One compaction at a time, whoever asks.
    let holders = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let compactions = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    let nodes = [
        ("app", &app),
        ("cache-a", &servers["cache-a"]),
        ("cache-b", &servers["cache-b"]),
    ];
    for (name, node) in nodes {
        let (node, name) = (node.clone(), name.to_string());
        let (holders, most, compactions) = (holders.clone(), most.clone(), compactions.clone());
        tasks.spawn(async move {
            for _ in 0..2 {
                locked(node.sync(), LOCK, Duration::from_secs(5), async {
                    let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    println!("[{name}] compacting");
                    compactions
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(name.clone());
                    tokio::task::yield_now().await;
                    holders.fetch_sub(1, Ordering::SeqCst);
                })
                .await?;
            }
            Ok::<_, Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| Error::Application(e.to_string()))??;
    }

    // Fail over: stop the server that answered; the other takes the calls.
    let stopped = first.server.clone();
    if let Some(node) = servers.remove(stopped.as_str()) {
        node.shutdown().await;
    }
    let after_failover = cache.get("mesh".into()).await?;
    println!("[app] after {stopped} stopped: {after_failover:?}");

    // A new capacity: the remaining server applies it as it arrives.
    let remaining = if stopped == "cache-a" {
        "cache-b"
    } else {
        "cache-a"
    };
    app.sync().set(CAPACITY, "1").await?;
    report(remaining, "capacity 1").await?;
    cache.get("other".into()).await?;
    let size = cache.size().await?;
    println!("[app] {remaining} holds {} of {}", size.0, size.1);

    for node in servers.values() {
        node.shutdown().await;
    }
    app.shutdown().await;
    let compactions = std::mem::take(&mut *compactions.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(Outcome {
        stopped,
        after_failover,
        size,
        compactions,
        most_holders: most.load(Ordering::SeqCst),
    })
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let Outcome {
        stopped,
        after_failover,
        size,
        compactions,
        most_holders,
    } = run().await?;
    println!(
        "after {stopped} stopped, {} answered",
        after_failover.server
    );
    println!("it held {} of {} entries after the change", size.0, size.1);
    println!("compactions: {compactions:?}, at most {most_holders} at once");
    Ok(())
}
