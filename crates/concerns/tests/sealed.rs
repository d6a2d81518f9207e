//! Routed traffic is sealed end to end (protocol.md 10.3): a member relaying
//! between two nodes can drop their messages, but not read, alter, forge or
//! replay them. The relay here is a bare peer manager driven by the test,
//! on the in-memory network with a paused clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use meshwork_concerns::peers::{ConcernFrame, InboundHandler, PeerManager, PeersConfig};
use meshwork_concerns::transport::mem::MemNetwork;
use meshwork_concerns::transport::{ConnectionHandle, Identity, Priority};
use meshwork_concerns::wire::proto::route_message::Body;
use meshwork_concerns::wire::proto::{
    ConcernError, ConcernKind, ErrorCode, RouteFound, RouteMessage, RouteNotFound, RouteQuery,
    Routed,
};
use meshwork_concerns::wire::{Message, NodeId};
use meshwork_concerns::{
    BoxError, Concern, Concerns, ConcernsConfig, ConcernsError, Context, ROUTING, Reply,
};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout};

mod support;
use support::{builtin_stat, listening, routing_frame, unix_ms};

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);
const ASK: u32 = 90;
/// t's clock window for routed requests.
const WINDOW: Duration = Duration::from_secs(30);

/// Answers every request with "re: " and its payload, counting them.
struct Answering(Arc<AtomicUsize>);

#[async_trait]
impl Concern for Answering {
    fn command(&self) -> u32 {
        ASK
    }
    async fn on_request(
        &self,
        _ctx: &Context,
        _from: &NodeId,
        payload: Bytes,
    ) -> Result<Option<Reply>, BoxError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(Some(Reply::new([b"re: ", &payload[..]].concat())))
    }
}

/// Passes every Concern frame the relay receives to the test.
struct Tap(mpsc::UnboundedSender<ConcernFrame>);

impl InboundHandler for Tap {
    fn on_concern(&self, _from: &NodeId, _conn: &ConnectionHandle, message: ConcernFrame) {
        let _ = self.0.send(message);
    }
}

fn seeded(seeds: &[&str], max: usize) -> PeersConfig {
    PeersConfig::default()
        .with_seeds(seeds.iter().map(|s| s.parse().unwrap()))
        .with_min_peers(1)
        .with_max_peers(max)
}

/// The next routing message the relay got.
async fn next_routing(frames: &mut mpsc::UnboundedReceiver<ConcernFrame>) -> Body {
    loop {
        let frame = timeout(10 * S, frames.recv())
            .await
            .expect("the relay got nothing")
            .unwrap();
        if frame.command == ROUTING {
            return RouteMessage::decode(frame.payload).unwrap().body.unwrap();
        }
    }
}

/// `body` sent by the relay to `to`.
async fn say(m: &PeerManager, to: &NodeId, body: Body) {
    let frame = Message::Concern(routing_frame(body));
    m.send(to, frame, Priority::Normal).await.unwrap();
}

/// The relay passes `h`'s route query on to its neighbour `t`, hands
/// `t`'s signed answer back to `h`, and returns the routed request that
/// follows.
async fn route_through(
    m: &PeerManager,
    frames: &mut mpsc::UnboundedReceiver<ConcernFrame>,
    h: &NodeId,
    t: &NodeId,
) -> Routed {
    let Body::Query(q) = next_routing(frames).await else {
        panic!("expected h's route query");
    };
    say(m, t, Body::Query(q)).await;
    let Body::Found(found) = next_routing(frames).await else {
        panic!("expected t's route answer");
    };
    assert_eq!(found.hops, 0);
    say(m, h, Body::Found(RouteFound { hops: 1, ..found })).await;
    let Body::Routed(request) = next_routing(frames).await else {
        panic!("expected h's routed request");
    };
    request
}

/// `r` sent by the relay to `to`, as it passes routed messages on.
async fn relay(m: &PeerManager, to: &NodeId, r: Routed) {
    say(m, to, Body::Routed(r)).await;
}

/// h — m — t: m, a bare peer manager between two nodes with the concerns
/// layer, driven by the test; the frames m receives; h; t, answering
/// [`ASK`]; and the count of requests t's handler took.
type ThreeInLine = (
    PeerManager,
    mpsc::UnboundedReceiver<ConcernFrame>,
    Concerns,
    Concerns,
    Arc<AtomicUsize>,
);

/// [`ThreeInLine`], linked up.
async fn h_m_t(net: &MemNetwork) -> ThreeInLine {
    let m_peers = PeerManager::start(listening(net, "m").await, seeded(&[], 4)).unwrap();
    let (tap, frames) = mpsc::unbounded_channel();
    m_peers.set_inbound_handler(Arc::new(Tap(tap))).unwrap();
    let h_peers = PeerManager::start(listening(net, "h").await, seeded(&["mem://m"], 1)).unwrap();
    let h = Concerns::builder(h_peers).start().await.unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let t_peers = PeerManager::start(listening(net, "t").await, seeded(&["mem://m"], 1)).unwrap();
    let t = Concerns::builder(t_peers)
        .config(ConcernsConfig::default().with_routed_window(WINDOW))
        .concern(Answering(handled.clone()))
        .start()
        .await
        .unwrap();
    m_peers.wait_for_peers(2, 5 * S).await.unwrap();
    (m_peers, frames, h, t, handled)
}

fn routing_stat(node: &Concerns, name: &str) -> u64 {
    builtin_stat(node, "routing", name)
}

/// h — m — t, with m the only way between h and t. m sees h's request go
/// by and tries everything a relay can: it changes the payload, the stamp,
/// the command; it answers for t, in clear and sealed with its own key; it
/// sends the request twice. Only the request as sealed reaches t's handler,
/// once, and only t's answer ends h's request.
#[tokio::test(start_paused = true)]
async fn a_relay_can_neither_read_alter_forge_nor_replay_routed_traffic() {
    let net = MemNetwork::new();
    let (m_peers, mut frames, h, t, handled) = h_m_t(&net).await;
    let (hid, tid) = (h.peers().node_id().clone(), t.peers().node_id().clone());

    let ctx = h.context(ASK);
    let call = {
        let tid = tid.clone();
        tokio::spawn(async move { ctx.request_to(&tid, "the secret question", 20 * S).await })
    };
    // h asks around for t; m passes the query on and t's answer back.
    let request = route_through(&m_peers, &mut frames, &hid, &tid).await;
    // Not readable on the way.
    let secret = b"the secret question";
    assert!(
        !request.payload.windows(secret.len()).any(|w| w == secret),
        "the payload travels in clear"
    );

    // Altered copies do not reach t's handler.
    let mut flipped = request.payload.to_vec();
    flipped[30] ^= 1;
    let altered = [
        Routed {
            payload: flipped.into(),
            ..request.clone()
        },
        Routed {
            sent_at_ms: request.sent_at_ms + 1,
            ..request.clone()
        },
        Routed {
            command: ASK + 1,
            ..request.clone()
        },
        Routed {
            request_id: request.request_id ^ 1,
            ..request.clone()
        },
    ];
    for r in altered {
        relay(&m_peers, &tid, r).await;
    }
    sleep(50 * MS).await;
    assert_eq!(handled.load(Ordering::SeqCst), 0);
    assert_eq!(routing_stat(&t, "refused"), 4);

    // Answers made up by m, for the request it saw: in clear, and sealed
    // with the key m shares with h.
    let forged = Routed {
        origin: tid.as_bytes().clone(),
        target: hid.as_bytes().clone(),
        command: ASK,
        request_id: request.request_id,
        kind: ConcernKind::Reply as i32,
        payload: Bytes::from("forged in clear"),
        ttl: 8,
        sent_at_ms: request.sent_at_ms,
    };
    let mine = m_peers
        .endpoint()
        .config()
        .identity()
        .pair_key(&hid)
        .unwrap();
    let resealed = Routed {
        payload: mine.seal(b"whatever m likes", b"forged and sealed"),
        ..forged.clone()
    };
    relay(&m_peers, &hid, forged).await;
    relay(&m_peers, &hid, resealed).await;
    sleep(50 * MS).await;
    assert!(!call.is_finished(), "a forged answer ended the request");
    assert_eq!(routing_stat(&h, "refused"), 2);

    // The request as sealed is handled, once however often it is sent.
    for _ in 0..3 {
        relay(&m_peers, &tid, request.clone()).await;
    }
    let Body::Routed(answer) = next_routing(&mut frames).await else {
        panic!("expected t's routed answer");
    };
    sleep(50 * MS).await;
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    assert_eq!(routing_stat(&t, "replayed"), 2);
    relay(&m_peers, &hid, answer.clone()).await;
    let got = timeout(10 * S, call).await.unwrap().unwrap().unwrap();
    assert_eq!(got, Bytes::from("re: the secret question"));
    // The answer again finds nobody waiting.
    relay(&m_peers, &hid, answer).await;

    // m passes a request on and also answers it "no route on" itself,
    // sealed as from m (any hop may say so): h learns that the route was
    // lost on the way, not that the request was never delivered.
    let ctx = h.context(ASK);
    let lost = {
        let tid = tid.clone();
        tokio::spawn(async move { ctx.request_to(&tid, "lost?", 20 * S).await })
    };
    let Body::Routed(request) = next_routing(&mut frames).await else {
        panic!("expected h's routed request");
    };
    relay(&m_peers, &tid, request.clone()).await;
    let no_route = ConcernError {
        code: ErrorCode::Unreachable as i32,
        message: "no route on".into(),
    }
    .encode_to_vec();
    let mut lie = Routed {
        origin: m_peers.node_id().as_bytes().clone(),
        target: hid.as_bytes().clone(),
        kind: ConcernKind::Error as i32,
        sent_at_ms: unix_ms(),
        ..request
    };
    lie = seal_as(m_peers.endpoint().config().identity(), &hid, lie, &no_route);
    relay(&m_peers, &hid, lie).await;
    let err = timeout(10 * S, lost).await.unwrap().unwrap().unwrap_err();
    assert!(matches!(err, ConcernsError::RouteLost(_)), "{err:?}");
    sleep(50 * MS).await;
    assert_eq!(handled.load(Ordering::SeqCst), 2, "it did arrive");
    let Body::Routed(late_answer) = next_routing(&mut frames).await else {
        panic!("expected t's answer");
    };
    assert_eq!(late_answer.kind, ConcernKind::Reply as i32);

    // A request recorded now and sent once the guard's window is past is
    // refused as stale, and its origin told (sealed) why.
    let ctx = h.context(ASK);
    let late = {
        let tid = tid.clone();
        tokio::spawn(async move { ctx.request_to(&tid, "late", 3 * WINDOW).await })
    };
    // (h forgot its route when told it was lost: it asks again.)
    let request = route_through(&m_peers, &mut frames, &hid, &tid).await;
    sleep(WINDOW + S).await;
    relay(&m_peers, &tid, request).await;
    let Body::Routed(refusal) = next_routing(&mut frames).await else {
        panic!("expected t's refusal");
    };
    assert_eq!(refusal.kind, ConcernKind::Error as i32);
    assert_eq!(handled.load(Ordering::SeqCst), 2);
    assert_eq!(routing_stat(&t, "stale"), 1);
    relay(&m_peers, &hid, refusal).await;
    let err = timeout(10 * S, late).await.unwrap().unwrap().unwrap_err();
    assert!(
        matches!(&err, ConcernsError::Remote { message, .. } if message.contains("behind")),
        "{err}"
    );

    h.shutdown().await;
    t.shutdown().await;
    for p in [h.peers(), t.peers(), &m_peers] {
        p.shutdown().await;
    }
}

/// `r` from `from` (any identity) sealed for its target as protocol.md
/// 10.3.1 lays it out, written here independently of the implementation.
fn seal_as(from: &Identity, target: &NodeId, mut r: Routed, plaintext: &[u8]) -> Routed {
    let mut ad = b"meshwork routed v1".to_vec();
    ad.push(r.origin.len() as u8);
    ad.extend_from_slice(&r.origin);
    ad.push(r.target.len() as u8);
    ad.extend_from_slice(&r.target);
    ad.extend_from_slice(&r.command.to_be_bytes());
    ad.extend_from_slice(&r.request_id.to_be_bytes());
    ad.extend_from_slice(&r.kind.to_be_bytes());
    ad.extend_from_slice(&r.sent_at_ms.to_be_bytes());
    r.payload = from.pair_key(target).unwrap().seal(&ad, plaintext);
    r
}

/// A member that keeps sending routed requests from made-up origins (each a
/// fresh key pair, so each costs the target a key) spends its own share of
/// the keys the target makes a second, not everyone's: an honest node that
/// starts talking to the target meanwhile, through another neighbour, gets
/// its requests through. (With one budget for all, the flood kept every new
/// origin out.) Its own made-up requests do open, up to its share.
#[tokio::test(start_paused = true)]
async fn made_up_origins_spend_their_neighbours_share_of_new_keys_only() {
    let net = MemNetwork::new();
    let handled = Arc::new(AtomicUsize::new(0));
    let t_peers = PeerManager::start(listening(&net, "t").await, seeded(&[], 4)).unwrap();
    let t = Concerns::builder(t_peers)
        .concern(Answering(handled.clone()))
        .start()
        .await
        .unwrap();
    let b_peers = PeerManager::start(listening(&net, "b").await, seeded(&["mem://t"], 2)).unwrap();
    let b = Concerns::builder(b_peers).start().await.unwrap();
    let h_peers = PeerManager::start(listening(&net, "h").await, seeded(&["mem://b"], 1)).unwrap();
    let h = Concerns::builder(h_peers).start().await.unwrap();
    let m = PeerManager::start(listening(&net, "m").await, seeded(&["mem://t"], 1)).unwrap();
    m.set_inbound_handler(Arc::new(Tap(mpsc::unbounded_channel().0)))
        .unwrap();
    m.wait_for_peers(1, 5 * S).await.unwrap();
    h.peers().wait_for_peers(1, 5 * S).await.unwrap();
    b.peers().wait_for_peers(2, 5 * S).await.unwrap();
    let tid = t.peers().node_id().clone();

    // m: 100 requests from fresh origins every 100 ms, 1000 a second (more
    // than the target makes keys for in all), for as
    // long as the test runs.
    let flood = {
        let (m, tid) = (m.clone(), tid.clone());
        tokio::spawn(async move {
            let mut sent = 0u64;
            loop {
                for _ in 0..100 {
                    let fake = Identity::generate();
                    let r = Routed {
                        origin: fake.node_id().as_bytes().clone(),
                        target: tid.as_bytes().clone(),
                        command: ASK,
                        request_id: 0,
                        kind: ConcernKind::Request as i32,
                        payload: Bytes::new(),
                        ttl: 8,
                        sent_at_ms: unix_ms(),
                    };
                    relay(&m, &tid, seal_as(&fake, &tid, r, b"made up")).await;
                    sent += 1;
                }
                sleep(100 * MS).await;
                if sent > 100_000 {
                    break;
                }
            }
        })
    };
    sleep(2 * S).await;
    let made_up = handled.load(Ordering::SeqCst);
    assert!(
        (128..=128 + 2 * 128 + 10).contains(&made_up),
        "{made_up} made-up requests handled in 2 s"
    );
    for i in 0..5 {
        let got = h
            .context(ASK)
            .request_to(&tid, format!("honest {i}"), 5 * S)
            .await
            .unwrap_or_else(|e| panic!("honest request {i}: {e}"));
        assert_eq!(got, Bytes::from(format!("re: honest {i}")));
    }
    assert!(routing_stat(&t, "refused") > 500);
    flood.abort();
    for c in [h, b, t] {
        c.shutdown().await;
        c.peers().shutdown().await;
    }
    m.shutdown().await;
}

/// a — b — c, with m, a member beside a that cannot reach c (a bare peer
/// manager whose frames the test reads), and the way through b slow (50 ms
/// a hop). c answers ASK requests.
struct Beside {
    a: Concerns,
    b: Concerns,
    c: Concerns,
    m: PeerManager,
    frames: mpsc::UnboundedReceiver<ConcernFrame>,
    handled: Arc<AtomicUsize>,
}

impl Beside {
    async fn start() -> Beside {
        let net = MemNetwork::new();
        net.set_latency("a", "b", 50 * MS);
        let node = |name: &'static str, seeds: &'static [&'static str], max| {
            let net = net.clone();
            async move { PeerManager::start(listening(&net, name).await, seeded(seeds, max)).unwrap() }
        };
        let a = Concerns::builder(node("a", &[], 4).await)
            .start()
            .await
            .unwrap();
        let b = Concerns::builder(node("b", &["mem://a"], 2).await)
            .start()
            .await
            .unwrap();
        let handled = Arc::new(AtomicUsize::new(0));
        let c = Concerns::builder(node("c", &["mem://b"], 1).await)
            .concern(Answering(handled.clone()))
            .start()
            .await
            .unwrap();
        let m = node("m", &["mem://a"], 1).await;
        let (tap, frames) = mpsc::unbounded_channel();
        m.set_inbound_handler(Arc::new(Tap(tap))).unwrap();
        m.wait_for_peers(1, 5 * S).await.unwrap();
        c.peers().wait_for_peers(1, 5 * S).await.unwrap();
        a.peers().wait_for_peers(2, 5 * S).await.unwrap();
        assert!(!a.peers().is_neighbour(c.peers().node_id()));
        Beside {
            a,
            b,
            c,
            m,
            frames,
            handled,
        }
    }

    /// a's request to c gets c's answer; a's route to c goes through b,
    /// and m is banned for what it sent.
    async fn check_honest_way(&self) {
        let cid = self.c.peers().node_id();
        let reply = self.a.context(ASK).request_to(cid, "hello", 5 * S).await;
        assert_eq!(reply.unwrap(), Bytes::from("re: hello"));
        assert_eq!(self.handled.load(Ordering::SeqCst), 1);
        let route = self.a.routes().into_iter().find(|r| r.target == *cid);
        assert_eq!(route.unwrap().next_hop, *self.b.peers().node_id());
        assert!(self.a.peers().is_banned(self.m.node_id()));
        assert_eq!(routing_stat(&self.a, "forged"), 1);
    }

    async fn stop(self) {
        for n in [self.a, self.b, self.c] {
            n.shutdown().await;
            n.peers().shutdown().await;
        }
        self.m.shutdown().await;
    }
}

/// m answers a's query for c at once with "c is my neighbour", which is
/// what a neighbour's answer used to be: a took the first answer, sent its
/// request into m and waited for its timeout. Now only c's signed word
/// makes a route: m's answer is refused, m banned, and the request goes
/// through b.
#[tokio::test(start_paused = true)]
async fn a_route_answer_not_signed_by_its_target_is_refused_and_its_bringer_banned() {
    let mut x = Beside::start().await;
    let (aid, cid) = (x.a.peers().node_id().clone(), x.c.peers().node_id().clone());
    let ctx = x.a.context(ASK);
    let call = {
        let cid = cid.clone();
        tokio::spawn(async move { ctx.request_to(&cid, "first", 5 * S).await })
    };
    let Body::Query(q) = next_routing(&mut x.frames).await else {
        panic!("expected a's route query");
    };
    assert_eq!(q.target, *cid.as_bytes());
    let lie = RouteFound {
        query_id: q.query_id,
        origin: q.origin,
        target: q.target,
        hops: 1,
        signature: Bytes::new(),
    };
    say(&x.m, &aid, Body::Found(lie)).await;
    let reply = timeout(10 * S, call).await.unwrap().unwrap();
    assert_eq!(reply.unwrap(), Bytes::from("re: first"));
    x.handled.store(0, Ordering::SeqCst);
    x.check_honest_way().await;
    x.stop().await;
}

/// m sends a a route query "from c", stamped now, with a signature c never
/// made: a took it as the way back to c, 2 hops through m (better than the
/// way through b), and sent its traffic for c into m until a request timed
/// out. Now a refuses it and bans m, and its request goes through b.
#[tokio::test(start_paused = true)]
async fn a_route_query_not_signed_by_its_origin_is_refused_and_its_bringer_banned() {
    let x = Beside::start().await;
    let aid = x.a.peers().node_id().clone();
    let lie = RouteQuery {
        query_id: 7,
        origin: x.c.peers().node_id().as_bytes().clone(),
        target: NodeId::from_bytes(vec![8; 32]).unwrap().as_bytes().clone(),
        ttl: 16,
        sent_at_ms: unix_ms(),
        signature: Bytes::from(vec![7; 64]),
    };
    say(&x.m, &aid, Body::Query(lie)).await;
    sleep(100 * MS).await;
    x.check_honest_way().await;
    x.stop().await;
}

/// A relay beside `t` (a bare peer manager seeded with it) and the routing
/// frames it receives.
async fn relay_beside(
    net: &MemNetwork,
    name: &str,
) -> (PeerManager, mpsc::UnboundedReceiver<ConcernFrame>) {
    let m = PeerManager::start(listening(net, name).await, seeded(&["mem://t"], 1)).unwrap();
    let (tap, frames) = mpsc::unbounded_channel();
    m.set_inbound_handler(Arc::new(Tap(tap))).unwrap();
    m.wait_for_peers(1, 5 * S).await.unwrap();
    (m, frames)
}

/// The target answers a query once for each neighbour that brings it, not
/// only the first: the first copy may have come over a link that is gone
/// before the answer can go back (a neighbour that was dropped as soon as
/// it joined), while a later copy has a way back. A neighbour that brings
/// the query again gets no second answer. The answer is signed once.
#[tokio::test(start_paused = true)]
async fn the_target_answers_each_neighbour_that_brings_a_query_once() {
    let net = MemNetwork::new();
    let peers = PeerManager::start(listening(&net, "t").await, seeded(&[], 4)).unwrap();
    let t = Concerns::builder(peers).start().await.unwrap();
    let (m1, mut frames1) = relay_beside(&net, "m1").await;
    let (m2, mut frames2) = relay_beside(&net, "m2").await;
    let tid = t.peers().node_id().clone();
    let origin = Identity::generate();
    let mut query = RouteQuery {
        query_id: 42,
        origin: origin.node_id().as_bytes().clone(),
        target: tid.as_bytes().clone(),
        ttl: 8,
        sent_at_ms: unix_ms(),
        signature: Bytes::new(),
    };
    meshwork_concerns::sign_route_query(&origin, &mut query);
    let mut answers = Vec::new();
    for (m, frames) in [(&m1, &mut frames1), (&m2, &mut frames2)] {
        say(m, &tid, Body::Query(query.clone())).await;
        let Body::Found(found) = next_routing(frames).await else {
            panic!("expected t's route answer");
        };
        assert_eq!((found.query_id, found.hops), (42, 0));
        assert_eq!(found.target, query.target);
        answers.push(found);
    }
    // Signed once (a signature is randomised: two would differ).
    assert_eq!(answers[0], answers[1]);
    say(&m1, &tid, Body::Query(query.clone())).await;
    sleep(S).await;
    assert!(
        frames1.try_recv().is_err(),
        "a second answer to one neighbour"
    );
    assert_eq!(routing_stat(&t, "forged"), 0);
    t.shutdown().await;
    t.peers().shutdown().await;
    m1.shutdown().await;
    m2.shutdown().await;
}

/// h — m — t, with m (driven by the test) the only way. "Not through me"
/// is taken only from a neighbour asked, for the query it was asked: one
/// about another query changes nothing. A lying m can end h's search at
/// once (it could as well drop the query: the search would time out), but
/// the answer it passes on afterwards still teaches h the route, and the
/// next request goes through without a new search.
#[tokio::test(start_paused = true)]
async fn not_through_me_is_taken_from_the_asked_only_and_a_late_answer_still_counts() {
    let net = MemNetwork::new();
    let (m_peers, mut frames, h, t, handled) = h_m_t(&net).await;
    let (hid, tid) = (h.peers().node_id().clone(), t.peers().node_id().clone());

    let ctx = h.context(ASK);
    let call = {
        let (ctx, tid) = (ctx.clone(), tid.clone());
        tokio::spawn(async move { ctx.request_to(&tid, "first", 20 * S).await })
    };
    let Body::Query(q) = next_routing(&mut frames).await else {
        panic!("expected h's route query");
    };
    let refusal = |query_id| {
        Body::NotFound(RouteNotFound {
            query_id,
            origin: q.origin.clone(),
            target: q.target.clone(),
        })
    };
    // About another query: ignored, the search goes on.
    say(&m_peers, &hid, refusal(q.query_id ^ 1)).await;
    sleep(100 * MS).await;
    assert!(!call.is_finished());
    assert_eq!(routing_stat(&h, "exhausted"), 0);
    // About h's query: h's one neighbour asked has said no.
    say(&m_peers, &hid, refusal(q.query_id)).await;
    let err = call.await.unwrap().unwrap_err();
    assert!(matches!(err, ConcernsError::Unreachable(_)), "{err:?}");
    assert_eq!(routing_stat(&h, "exhausted"), 1);

    // m passes the query on after all, and t's answer back to h.
    say(&m_peers, &tid, Body::Query(q.clone())).await;
    let Body::Found(found) = next_routing(&mut frames).await else {
        panic!("expected t's route answer");
    };
    say(&m_peers, &hid, Body::Found(RouteFound { hops: 1, ..found })).await;
    sleep(100 * MS).await;
    assert_eq!(routing_stat(&h, "late_answers"), 1);
    // The next request takes the route at once: no search, none held back.
    let call = {
        let tid = tid.clone();
        tokio::spawn(async move { ctx.request_to(&tid, "second", 20 * S).await })
    };
    let Body::Routed(request) = next_routing(&mut frames).await else {
        panic!("expected h's routed request, not another search");
    };
    relay(&m_peers, &tid, request).await;
    let Body::Routed(answer) = next_routing(&mut frames).await else {
        panic!("expected t's routed answer");
    };
    relay(&m_peers, &hid, answer).await;
    assert_eq!(call.await.unwrap().unwrap(), Bytes::from("re: second"));
    assert_eq!(
        (routing_stat(&h, "searches"), routing_stat(&h, "held_back")),
        (1, 0)
    );
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    for node in [h, t] {
        node.shutdown().await;
        node.peers().shutdown().await;
    }
    m_peers.shutdown().await;
}

/// A member that makes up route queries in bulk (each from a new origin,
/// signed by it, so every one is checked and passed on) makes its
/// neighbour keep at most 4096 waves ("not through me" still to come),
/// however many it sends: a few hundred bytes each.
#[tokio::test(start_paused = true)]
async fn made_up_route_queries_keep_a_bounded_number_of_waves() {
    let net = MemNetwork::new();
    let x_peers = PeerManager::start(listening(&net, "x").await, seeded(&[], 4)).unwrap();
    let x = Concerns::builder(x_peers).start().await.unwrap();
    let y_peers = PeerManager::start(listening(&net, "y").await, seeded(&["mem://x"], 1)).unwrap();
    let y = Concerns::builder(y_peers).start().await.unwrap();
    let m = PeerManager::start(listening(&net, "m").await, seeded(&["mem://x"], 1)).unwrap();
    let (tap, mut frames) = mpsc::unbounded_channel();
    m.set_inbound_handler(Arc::new(Tap(tap))).unwrap();
    m.wait_for_peers(1, 5 * S).await.unwrap();
    x.peers().wait_for_peers(2, 5 * S).await.unwrap();
    let xid = x.peers().node_id().clone();
    let nobody = Identity::generate().node_id().clone();
    const SENT: u64 = 5000;
    for query_id in 0..SENT {
        let fake = Identity::generate();
        let mut q = RouteQuery {
            query_id,
            origin: fake.node_id().as_bytes().clone(),
            target: nobody.as_bytes().clone(),
            ttl: 8,
            sent_at_ms: unix_ms(),
            signature: Bytes::new(),
        };
        meshwork_concerns::sign_route_query(&fake, &mut q);
        say(&m, &xid, Body::Query(q)).await;
        if query_id % 256 == 255 {
            sleep(10 * MS).await;
        }
    }
    // x passed every query on to y, which answered "not through me" (it has
    // no one else), and x told m so.
    let mut refused = 0;
    while refused < SENT {
        if let Body::NotFound(_) = next_routing(&mut frames).await {
            refused += 1;
        }
    }
    let waves = routing_stat(&x, "waves");
    assert!((4000..=4096).contains(&waves), "{waves} waves kept");
    assert_eq!(routing_stat(&x, "forged"), 0);
    for node in [x, y] {
        node.shutdown().await;
        node.peers().shutdown().await;
    }
    m.shutdown().await;
}
