//! A whole node (concerns, sync and RPC) fed mangled frames by a hostile
//! neighbour, on the in-memory network with a paused clock.
//!
//! The neighbour first listens, as an honest peer would, to what the node
//! sends it while an honest node works the mesh (sync pushes and digests,
//! relayed floods and publications, route queries), and adds routed
//! messages, RPC calls and cancels of its own. It then sends the node
//! thousands of mangled copies of those frames: bytes flipped, cut,
//! inserted, varints set to their largest, commands and kinds swapped,
//! request ids made up; one in 16 is a mangled message of the peer layer
//! (Ping, Pong, Discovered, Disconnect). Each time the node drops it (a ban
//! for a forged signature, say), it comes back under a new identity.
//!
//! Nothing may panic, anywhere in the process (a panic hook counts them,
//! also in tasks whose panics tokio would swallow), and afterwards the
//! honest node still calls the node's service, writes keys it stores, and
//! floods reach it. The seed of the mangling is printed on failure.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use meshwork::Node;
use meshwork::concerns::ROUTING;
use meshwork::concerns::peers::ConcernFrame;
use meshwork::transport::mem::MemNetwork;
use meshwork::transport::{Address, Priority};
use meshwork::wire::proto::{
    ConcernKind, Disconnect, Discovered, Envelope, PeerInfo, Ping, Pong, RouteMessage, Routed,
    route_message,
};
use meshwork::wire::{Message, NodeId};
use meshwork_rpc::proto::{Call, Cancel, RpcMessage, rpc_message::Body};
use meshwork_rpc::sync::proto::{DigestQuery, Pull, sync_message};
use meshwork_rpc::{RPC, service};
use prost::Message as _;
use tokio::time::{Instant, sleep};

mod common;
use common::{neighbour, sync_frame};

const NET: &str = "hostile-test";
const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);
/// Mangled frames sent in all (`HOSTILE_FRAMES` for a longer run).
const FRAMES: usize = 20_000;
/// Mangled frames between two rounds of fresh honest traffic to hear seeds
/// from.
const REFRESH: usize = 5_000;
/// Seeds heard kept at most (the newest).
const MAX_HEARD: usize = 512;
/// Identities the hostile neighbour may go through, per 10 000 frames.
const IDENTITIES: usize = 100;

#[service]
trait Adder {
    async fn add(&self, a: i64, b: i64) -> i64;
}

struct Imp;

impl Adder for Imp {
    async fn add(&self, a: i64, b: i64) -> i64 {
        a.wrapping_add(b)
    }
}

/// A small deterministic generator (xorshift64*): the test needs no more.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.next() % one_in == 0
    }
}

/// `payload` with one to four mutations.
fn mangle(rng: &mut Rng, payload: &[u8]) -> Bytes {
    let mut p = payload.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(p.len() + 1);
        match rng.below(7) {
            // Flip one bit.
            0 if !p.is_empty() => {
                let i = at.min(p.len() - 1);
                p[i] ^= 1 << rng.below(8);
            }
            // Set one byte.
            1 if !p.is_empty() => {
                let i = at.min(p.len() - 1);
                p[i] = rng.next() as u8;
            }
            // Cut the rest.
            2 => p.truncate(at),
            // Insert random bytes.
            3 => {
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                p.splice(at..at, bytes);
            }
            // The largest varint (u64::MAX), over what was there.
            4 => {
                let max = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
                let end = (at + max.len()).min(p.len());
                p.splice(at..end, max);
            }
            // Repeat a slice.
            5 if !p.is_empty() => {
                let from = rng.below(p.len());
                let to = (from + 1 + rng.below(32)).min(p.len());
                let copy = p[from..to].to_vec();
                p.splice(at..at, copy);
            }
            // A length byte (any byte) made large.
            _ if !p.is_empty() => {
                let i = at.min(p.len() - 1);
                p[i] = 0x7f;
            }
            _ => {}
        }
    }
    Bytes::from(p)
}

fn builder(net: &MemNetwork, host: &str) -> meshwork::NodeBuilder {
    common::builder(net, NET, host)
}

/// An RPC frame to send: a call of `method` on `service` (JSON arguments),
/// or a cancel.
fn rpc_frame(call_id: u64, service: &str, method: &str, args: &str) -> ConcernFrame {
    let body = Body::Call(Call {
        call_id,
        service: service.into(),
        method: method.into(),
        args: Bytes::copy_from_slice(args.as_bytes()),
        codec: 1,
        budget_ms: 1000,
        version: 0,
    });
    common::rpc_request(call_id, body)
}

/// Node "a" serving "adder", and node "b" linked to it.
async fn provider_and_caller(net: &MemNetwork) -> (Node, Node) {
    let a = builder(net, "a").start().await.unwrap();
    a.rpc().serve("adder", AdderServer::new(Imp)).await.unwrap();
    let b = builder(net, "b")
        .seed(Address::mem("a"))
        .start()
        .await
        .unwrap();
    b.wait_for_peers(1, 5 * S).await.unwrap();
    (a, b)
}

/// Seeds of our own making: routed messages stamped now (their seal made
/// up) for a neighbour of the node, for the node itself and for a node
/// nobody knows; RPC calls of a method served, one not served, a service
/// nobody serves; and a Cancel.
fn made_up(a: &Node, b: &Node, nowhere: &NodeId) -> Vec<ConcernFrame> {
    let now_ms = a.sync().now_ms();
    let mut seeds = Vec::new();
    for target in [b.node_id(), a.node_id(), nowhere] {
        let routed = Routed {
            origin: b.node_id().as_bytes().clone(),
            target: target.as_bytes().clone(),
            command: 50,
            request_id: 9,
            kind: ConcernKind::Request as i32,
            payload: vec![0x5a; 56].into(),
            ttl: 8,
            sent_at_ms: now_ms,
        };
        let body = RouteMessage {
            body: Some(route_message::Body::Routed(routed)),
        };
        seeds.push(ConcernFrame {
            command: ROUTING,
            payload: body.encode_to_vec().into(),
            ..rpc_frame(0, "", "", "")
        });
    }
    seeds.push(rpc_frame(1, "adder", "add", "[1,2]"));
    seeds.push(rpc_frame(2, "adder", "nope", "[]"));
    seeds.push(rpc_frame(3, "no.such", "add", "[1,2]"));
    seeds.push(ConcernFrame {
        payload: RpcMessage {
            body: Some(Body::Cancel(Cancel { call_id: 1 })),
        }
        .encode_to_vec()
        .into(),
        ..rpc_frame(0, "", "", "")
    });
    seeds
}

/// The honest traffic the seeds are heard from: b writes keys, broadcasts
/// and publishes; a searches for a node nobody knows (its route queries
/// reach the neighbours). Stamped and signed now.
async fn honest_traffic(a: &Node, b: &Node, round: usize) -> tokio::task::JoinHandle<()> {
    for i in 0..20 {
        // Keys of its own each round; a mangled entry may still have taken
        // one (any member can), which costs the round a key, nothing more.
        let _ = b.sync().set(format!("k{round}.{i}"), format!("v{i}")).await;
    }
    b.concerns()
        .context(50)
        .broadcast(format!("hello all, round {round}"), 4)
        .await
        .unwrap();
    b.concerns()
        .publish("news", format!("news of round {round}"))
        .unwrap();
    let nowhere = meshwork::transport::Identity::generate().node_id().clone();
    let ctx = a.concerns().context(50);
    tokio::spawn(async move {
        let _ = ctx.request_to(&nowhere, "anyone?", S).await;
    })
}

#[tokio::test(start_paused = true)]
async fn mangled_frames_from_a_neighbour_break_nothing() {
    let panics = Arc::new(AtomicU64::new(0));
    let hook = std::panic::take_hook();
    std::panic::set_hook({
        let panics = panics.clone();
        Box::new(move |info| {
            panics.fetch_add(1, Ordering::SeqCst);
            hook(info);
        })
    });
    let seed = std::env::var("HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0005_eed0_fa11_u64);
    eprintln!("hostile seed: {seed} (HOSTILE_SEED to run it again)");
    let mut rng = Rng(seed | 1);
    let frames = std::env::var("HOSTILE_FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(FRAMES);

    let net = MemNetwork::new();
    let (a, b) = provider_and_caller(&net).await;
    let mut topic = a.concerns().subscribe("news").unwrap();

    // Listen as an honest neighbour while b works the mesh.
    let tap = Arc::new(Mutex::new(Vec::new()));
    let spy = neighbour(&net, NET, "m0", "a", &a, &tap)
        .await
        .expect("the spy links");
    let search = honest_traffic(&a, &b, 0).await;
    let nowhere_id = meshwork::transport::Identity::generate().node_id().clone();
    // Ask for a digest and every bucket, as an anti-entropy round does: the
    // answers are seeds too.
    let asks = [
        sync_message::Body::Digest(DigestQuery { root: 1 }),
        sync_message::Body::Pull(Pull {
            buckets: (0..256).collect(),
            ..Pull::default()
        }),
    ];
    for (i, body) in asks.into_iter().enumerate() {
        let frame = sync_frame(100 + i as u64, body);
        tap.lock().unwrap().push(frame.clone());
        spy.send(a.node_id(), Message::Concern(frame), Priority::Normal)
            .await
            .unwrap();
    }
    // Long enough for anti-entropy rounds too.
    sleep(10 * S).await;
    let _ = search.await;
    let mut heard: Vec<ConcernFrame> = tap.lock().unwrap().drain(..).collect();
    let commands: std::collections::BTreeSet<u32> = heard.iter().map(|f| f.command).collect();
    eprintln!("{} frames heard, commands {commands:x?}", heard.len());
    assert!(heard.len() >= 5, "too little traffic to start from");
    let mut seeds = heard.clone();
    seeds.extend(made_up(&a, &b, &nowhere_id));
    let builtins: Vec<u32> = commands.iter().copied().chain([RPC]).collect();
    let peer_info = |id: &NodeId, addr: &str| PeerInfo {
        node_id: id.as_bytes().clone(),
        addrs: vec![addr.into()],
        age_ms: Some(0),
    };
    let peer_seeds = [
        Message::Ping(Ping {
            nonce: 7,
            timestamp_micros: 1,
        }),
        Message::Pong(Pong {
            nonce: 7,
            timestamp_micros: 1,
            peer_count: None,
        }),
        Message::Discovered(Discovered {
            peers: vec![
                peer_info(b.node_id(), "mem://b"),
                peer_info(a.node_id(), "mem://a"),
                peer_info(&nowhere_id, "tcp://127.0.0.1:9"),
            ],
        }),
        Message::Disconnect(Disconnect {
            reason: 2,
            message: "too many".into(),
            alternatives: vec![peer_info(b.node_id(), "mem://b")],
        }),
    ];

    // Mangle and send.
    let mut m = spy;
    let mut identities = 1;
    let mut sent = 0;
    let mut rounds = 0;
    while sent < frames {
        if sent > 0 && sent % REFRESH == 0 && sent / REFRESH > rounds {
            // Simulated time has moved on (reconnections, pauses): stamps
            // heard at the start would soon be refused as stale before any
            // signature is checked. Fresh traffic, heard by the neighbour
            // of the moment, keeps the seeds current.
            rounds = sent / REFRESH;
            tap.lock().unwrap().clear();
            let search = honest_traffic(&a, &b, rounds).await;
            sleep(200 * MS).await;
            search.abort();
            let fresh: Vec<ConcernFrame> = tap
                .lock()
                .unwrap()
                .drain(..)
                .filter(|f| f.kind != ConcernKind::Error as i32)
                .collect();
            heard.extend(fresh);
            let keep = heard.len().saturating_sub(MAX_HEARD);
            heard.drain(..keep);
            seeds = heard.clone();
            seeds.extend(made_up(&a, &b, &nowhere_id));
        }
        let seed_frame = &seeds[rng.below(seeds.len())];
        let mut frame = ConcernFrame {
            payload: if rng.chance(10) {
                seed_frame.payload.clone()
            } else {
                mangle(&mut rng, &seed_frame.payload)
            },
            ..seed_frame.clone()
        };
        if rng.chance(8) {
            frame.command = builtins[rng.below(builtins.len())];
        }
        if rng.chance(8) {
            frame.kind =
                [ConcernKind::Request, ConcernKind::Reply, ConcernKind::Error][rng.below(3)] as i32;
        }
        if rng.chance(4) {
            frame.request_id = if rng.chance(4) { 0 } else { rng.next() };
        }
        if rng.chance(8) {
            frame.flags = rng.next() as u32 & 0xff;
        }
        // One in 16 is a message of the peer layer instead, mangled as a
        // whole envelope (what still decodes is sent).
        let message = if rng.chance(16) {
            let seed_message = peer_seeds[rng.below(peer_seeds.len())].clone();
            let bytes = Envelope {
                body: Some(seed_message),
            }
            .encode_to_vec();
            match Envelope::decode(mangle(&mut rng, &bytes)) {
                Ok(Envelope { body: Some(body) }) => body,
                _ => continue,
            }
        } else {
            Message::Concern(frame)
        };
        let priority = [Priority::Control, Priority::Normal, Priority::Bulk][rng.below(3)];
        match m.try_send(a.node_id(), message, priority) {
            Ok(()) => sent += 1,
            Err(_) if m.is_neighbour(a.node_id()) => sleep(MS).await,
            Err(_) => {
                // Dropped (banned, or cut for a protocol error): come back
                // under a new identity.
                m.shutdown().await;
                assert!(
                    identities < IDENTITIES * (1 + frames / 10_000),
                    "seed {seed}: out of identities"
                );
                loop {
                    identities += 1;
                    let host = format!("m{identities}");
                    if let Some(next) = neighbour(&net, NET, &host, "a", &a, &tap).await {
                        m = next;
                        break;
                    }
                    assert!(
                        identities < IDENTITIES * (1 + frames / 10_000),
                        "seed {seed}: out of identities"
                    );
                }
            }
        }
        if sent % 256 == 0 {
            sleep(MS).await;
        }
    }
    m.shutdown().await;
    eprintln!(
        "{sent} mangled frames sent by {identities} identities, {rounds} fresh rounds of seeds"
    );
    let judged: Vec<String> = a
        .concerns()
        .builtin_stats()
        .into_iter()
        .filter(|(_, k, _)| {
            [
                "stale",
                "forged",
                "duplicates",
                "delivered",
                "stale_queries",
            ]
            .contains(k)
        })
        .map(|(c, k, v)| format!("{c}.{k}={v}"))
        .collect();
    eprintln!("judged by the node: {}", judged.join(" "));
    sleep(5 * S).await;

    assert_eq!(panics.load(Ordering::SeqCst), 0, "seed {seed}: a panic");
    for c in a.concerns().stats() {
        assert_eq!(c.panics, 0, "seed {seed}: {} panicked", c.name);
    }
    // The honest node still gets its work done with the node. (Not the
    // keys b wrote before, nor the listing of "adder": any member can take
    // a key, and some mangled entries did. See security.md.)
    b.wait_for_peers(1, 10 * S).await.unwrap();
    eprintln!(
        "adder listed at b after the mangling: {}",
        !b.rpc().providers("adder").is_empty()
    );
    a.rpc()
        .serve("adder2", AdderServer::new(Imp))
        .await
        .unwrap();
    let deadline = Instant::now() + 10 * S;
    while b.rpc().providers("adder2").is_empty() {
        assert!(
            Instant::now() < deadline,
            "seed {seed}: adder2 never listed at b"
        );
        sleep(10 * MS).await;
    }
    let adder: AdderClient = b.rpc().client("adder2");
    assert_eq!(adder.add(40, 2).await.unwrap(), 42, "seed {seed}");
    b.sync().set("after", "still here").await.unwrap();
    let deadline = Instant::now() + 10 * S;
    while a.sync().get_str("after").as_deref() != Some("still here") {
        assert!(
            Instant::now() < deadline,
            "seed {seed}: b's write never reached a"
        );
        sleep(10 * MS).await;
    }
    b.concerns().publish("news", "second").unwrap();
    let deadline = Instant::now() + 10 * S;
    let mut got = Vec::new();
    while !got.contains(&Bytes::from("second")) {
        assert!(
            Instant::now() < deadline,
            "seed {seed}: the publication never came"
        );
        while let Some(p) = topic.try_recv() {
            got.push(p.payload);
        }
        sleep(10 * MS).await;
    }
    // What the node keeps for others stays bounded.
    assert!(a.concerns().pending_requests() < 100, "seed {seed}");
    b.shutdown().await;
    a.shutdown().await;
}

/// A member that takes a provider's registry entry (entries are not
/// signed, so any member can: security.md) with a tombstone under a short
/// lease of its own unlists the service; once that lease lapses the
/// provider lists itself again, and the service is callable. Before, the
/// provider gave its entry up for good.
#[tokio::test(start_paused = true)]
async fn a_provider_whose_entry_was_taken_lists_itself_again() {
    use meshwork_rpc::sync::proto::{Entries, Entry};

    let net = MemNetwork::new();
    let (a, b) = provider_and_caller(&net).await;
    let listed = |n: &Node| !n.rpc().providers("adder").is_empty();
    let deadline = Instant::now() + 10 * S;
    while !listed(&b) {
        assert!(Instant::now() < deadline, "b never listed a's service");
        sleep(10 * MS).await;
    }
    let tap = Arc::new(Mutex::new(Vec::new()));
    let m = neighbour(&net, NET, "m", "a", &a, &tap)
        .await
        .expect("m links");

    let key = format!("{}adder/{}", meshwork_rpc::REGISTRY_PREFIX, a.node_id());
    assert!(a.sync().entry(&key).is_some());
    let lease = 2 * S;
    let taken = Entry {
        key: key.clone().into(),
        deleted: true,
        stamp: a.sync().now_ms() << 16,
        epoch: 9,
        lease_delta: lease.as_millis() as i64,
        ..Entry::default()
    };
    let body = sync_message::Body::Entries(Entries {
        entries: vec![taken],
        repair: false,
    });
    let frame = sync_frame(0, body);
    let sent = Instant::now();
    m.send(a.node_id(), Message::Concern(frame), Priority::Normal)
        .await
        .unwrap();
    while listed(&a) {
        assert!(
            sent.elapsed() < S,
            "the forged claim did not take the entry"
        );
        sleep(10 * MS).await;
    }
    assert_eq!(
        a.sync().lease(&key).map(|l| l.owner),
        Some(m.node_id().clone())
    );
    // Listed again once the claim's lease has lapsed: at the first check
    // after it (every third of the registry ttl, 10 s by default).
    while !(listed(&a) && listed(&b)) {
        assert!(sent.elapsed() < lease + 5 * S, "not listed again");
        sleep(10 * MS).await;
    }
    assert!(sent.elapsed() >= lease, "{:?}", sent.elapsed());
    assert_eq!(a.rpc().served()[0].relisted, 1);
    let adder: AdderClient = b.rpc().client("adder");
    assert_eq!(adder.add(40, 2).await.unwrap(), 42);
    m.shutdown().await;
    b.shutdown().await;
    a.shutdown().await;
}
