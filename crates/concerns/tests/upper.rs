//! Hostile review, round seven (concerns layer): what a member that
//! completed the handshake can make a node keep.
//!
//! Resident memory (with glibc's mmap threshold fixed, see `live_mib`)
//! shows memory kept alive by slices of received frames.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::time::Duration;

use bytes::Bytes;
use meshwork_concerns::peers::{PeerManager, PeersConfig};
use meshwork_concerns::transport::Identity;
use meshwork_concerns::transport::mem::MemNetwork;
use meshwork_concerns::wire::proto::{RouteMessage, RouteQuery, route_message};
use meshwork_concerns::{Concerns, ROUTING, sign_route_query};
use prost::Message as _;
use tokio::time::{Instant, sleep};

mod support;
use support::{builtin_stat, listening, unix_ms};

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);

/// Resident memory of this process, in MiB (from /proc/self/statm). The
/// tests run in a child process with `MALLOC_MMAP_THRESHOLD_=65536`
/// ([`in_child`]), so that glibc gives every large buffer back to the
/// system when it is freed: the figure then follows the large buffers
/// alive.
fn live_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: f64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096.0 / (1 << 20) as f64
}

/// Set in the child process a test runs its body in.
const THRESHOLD_VAR: &str = "MALLOC_MMAP_THRESHOLD_";

/// Unless this process is already one, runs the test `name` again in a
/// child process with glibc's mmap threshold fixed (see [`live_mib`]) and
/// asserts that it passed there; true if it did so (the caller returns).
fn in_child(name: &str) -> bool {
    if std::env::var_os(THRESHOLD_VAR).is_some() {
        return false;
    }
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture"])
        .env(THRESHOLD_VAR, "65536")
        .status()
        .unwrap();
    assert!(status.success(), "{name} failed in its child process");
    true
}

/// Runs `f` on a one-thread runtime whose clock is paused.
fn paused<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(f)
}

async fn node(net: &MemNetwork, name: &str, seeds: &[&str]) -> Concerns {
    let peers = PeersConfig::default()
        .with_seeds(seeds.iter().map(|s| s.parse().unwrap()))
        .with_min_peers(1)
        .with_max_peers(2)
        .with_heartbeat(S, 5 * S, 10 * S)
        .with_backoff(100 * MS, 2 * S)
        .with_discovery(2 * S, 16);
    let peers = PeerManager::start(listening(net, name).await, peers).unwrap();
    Concerns::builder(peers).start().await.unwrap()
}

/// A line m - r - c: `m` the member, `r` the honest relay under attack, `c`
/// another honest node (so that `r` passes queries on and keeps a wave).
async fn line(net: &MemNetwork) -> [Concerns; 3] {
    let m = node(net, "m", &[]).await;
    let r = node(net, "r", &["mem://m"]).await;
    let c = node(net, "c", &["mem://r"]).await;
    let deadline = Instant::now() + 30 * S;
    while r.peers().stats().connected < 2 {
        assert!(Instant::now() < deadline, "line did not form");
        sleep(100 * MS).await;
    }
    [m, r, c]
}

/// `msg` encoded, then an unknown length-delimited field (15) of `pad`
/// bytes: prost skips it on decoding.
fn padded(msg: &RouteMessage, pad: usize) -> Vec<u8> {
    let mut out = msg.encode_to_vec();
    out.push((15 << 3) | 2);
    prost::encoding::encode_varint(pad as u64, &mut out);
    out.resize(out.len() + pad, 0);
    out
}

/// A member sends a relay route queries of its own (signed by it, stamped
/// now, for made-up targets), each in a frame padded to 4 MiB with a field
/// nobody reads. The relay keeps a `Wave` per query it passes on, for the
/// seen-cache lifetime (120 s), up to 4096 of them, and the wave's `target`
/// was a slice of the received frame (prost decodes `Bytes` fields without
/// copying, and the frame is split off the connection's read buffer), so
/// each wave of ~100 bytes kept the whole 4 MiB frame alive: 128 MiB kept
/// here, and at 16 MiB frames and 4096 waves 64 GiB on one relay. The
/// target is copied now.
#[test]
fn route_query_waves_pin_whole_frames() {
    if in_child("route_query_waves_pin_whole_frames") {
        return;
    }
    let (grew, waves) = paused(padded_queries(0));
    assert!(
        grew < 16.0,
        "the relay keeps {grew:.1} MiB for {waves} waves of route queries"
    );
}

/// The control: the same padded frames, stamped 61 s ago, are dropped as
/// stale before any wave is kept, and nothing stays (this passes).
#[test]
fn stale_padded_queries_keep_nothing() {
    if in_child("stale_padded_queries_keep_nothing") {
        return;
    }
    let (grew, waves) = paused(padded_queries(61_000));
    assert_eq!(waves, 0);
    assert!(grew < 16.0, "{grew:.1} MiB kept");
}

/// Sends the relay 32 padded queries of the member's, stamped `ago_ms`
/// ago; returns how much resident memory grew (MiB) and the waves kept.
async fn padded_queries(ago_ms: u64) -> (f64, u64) {
    let net = MemNetwork::new();
    let [m, r, c] = line(&net).await;
    let me: &Identity = m.peers().endpoint().config().identity();
    let ctx = m.context(ROUTING);
    sleep(S).await;
    let before = live_mib();
    const QUERIES: u64 = 32;
    const PAD: usize = 4 << 20;
    for id in 0..QUERIES {
        let mut q = RouteQuery {
            query_id: 1000 + id,
            origin: me.node_id().as_bytes().clone(),
            target: Bytes::from(vec![id as u8 + 1; 32]),
            ttl: 16,
            sent_at_ms: unix_ms() - ago_ms,
            signature: Bytes::new(),
        };
        sign_route_query(me, &mut q);
        let msg = RouteMessage {
            body: Some(route_message::Body::Query(q)),
        };
        ctx.send(r.peers().node_id(), padded(&msg, PAD))
            .await
            .unwrap();
        sleep(10 * MS).await;
    }
    // Every query handled, answered "not through me" by c, and the frames
    // long gone from every queue.
    sleep(5 * S).await;
    let waves = builtin_stat(&r, "routing", "waves");
    let after = live_mib();
    eprintln!(
        "live heap: {before:.1} MiB before, {after:.1} MiB after {QUERIES} padded queries \
         ({:.1} MiB for {} MiB of frames received); waves kept on the relay: {waves}",
        after - before,
        (QUERIES as usize * PAD) >> 20
    );
    for n in [m, r, c] {
        n.shutdown().await;
        n.peers().shutdown().await;
    }
    (after - before, waves)
}
