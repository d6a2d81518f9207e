//! The flood concern: a message for every node of the mesh, delivered and
//! relayed once per node (py2p's waterfall, ChaskiNode's propagate).
//!
//! The origin sends a `Flooded { origin, message_id, command, payload, ttl }`
//! to each neighbour. A node that has not seen `(origin, message_id)` before
//! remembers it (a bounded, expiring [`SeenCache`]), relays it with
//! `ttl - 1` to every neighbour except the one it came from and the origin,
//! and hands the payload to its own concern for `command`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use meshwork_peers::wire::NodeId;
use meshwork_peers::wire::proto::Flooded;
use prost::Message as _;
use tokio::time::Instant;

use crate::manager::{ConcernsConfig, FLOOD, Inner, Job, ReplyPath};
use crate::seen::SeenCache;
use crate::{BoxError, Concern, Context, Reply};

pub(crate) struct Flood {
    /// By (origin, message id), owned by the neighbour that brought it.
    seen: Mutex<SeenCache<(NodeId, u64), NodeId>>,
    /// The most hops a message is relayed from here on, whatever TTL it
    /// arrived with (this node's `flood_ttl`).
    max_ttl: u32,
    sent: AtomicU64,
    delivered: AtomicU64,
    relayed: AtomicU64,
    duplicates: AtomicU64,
    dropped: AtomicU64,
}

impl Flood {
    pub(crate) fn new(cfg: &ConcernsConfig) -> Self {
        Flood {
            seen: Mutex::new(SeenCache::new(cfg.seen_capacity, cfg.seen_ttl)),
            max_ttl: cfg.flood_ttl,
            sent: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            relayed: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether `(origin, id)`, brought by `from`, is new.
    fn first_time(&self, origin: &NodeId, id: u64, from: &NodeId) -> bool {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(
            (origin.clone(), id),
            from,
            Instant::now(),
        )
    }

    /// Sends `f` to every responsive neighbour but those in `except`.
    fn relay(&self, inner: &Inner, f: &Flooded, except: &[&NodeId]) -> u64 {
        let body: Bytes = f.encode_to_vec().into();
        let mut n = 0;
        for p in inner.peers.neighbours() {
            if except.contains(&&p) {
                continue;
            }
            match inner.try_send_direct(&p, FLOOD, body.clone()) {
                Ok(()) => n += 1,
                Err(_) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        n
    }

    /// Starts a flood from this node; returns its message id.
    pub(crate) fn broadcast(
        &self,
        inner: &Arc<Inner>,
        command: u32,
        payload: Bytes,
        ttl: u32,
    ) -> u64 {
        let me = inner.peers.node_id().clone();
        let mut id = rand::random::<u64>();
        while !self.first_time(&me, id, &me) {
            id = rand::random();
        }
        let f = Flooded {
            origin: me.as_bytes().clone(),
            message_id: id,
            command,
            payload,
            ttl: ttl.max(1),
        };
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.relay(inner, &f, &[]);
        id
    }

    pub(crate) fn stats(&self) -> Vec<(&'static str, u64)> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("sent", get(&self.sent)),
            ("delivered", get(&self.delivered)),
            ("relayed", get(&self.relayed)),
            ("duplicates", get(&self.duplicates)),
            ("dropped", get(&self.dropped)),
        ]
    }
}

#[async_trait]
impl Concern for Flood {
    fn command(&self) -> u32 {
        FLOOD
    }

    fn name(&self) -> &str {
        "flood"
    }

    fn max_concurrency(&self) -> usize {
        64
    }

    async fn on_request(
        &self,
        ctx: &Context,
        from: &NodeId,
        payload: Bytes,
    ) -> Result<Option<Reply>, BoxError> {
        let f = Flooded::decode(payload)?;
        let origin = NodeId::from_bytes(f.origin.clone())?;
        if origin == *ctx.node_id() || !self.first_time(&origin, f.message_id, from) {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        // A peer's TTL is capped by ours: a forged huge one must not keep a
        // message going round once the seen-caches have forgotten it.
        let ttl = f.ttl.min(self.max_ttl);
        if ttl > 1 {
            let next = Flooded {
                ttl: ttl - 1,
                ..f.clone()
            };
            let n = self.relay(&ctx.inner, &next, &[from, &origin]);
            self.relayed.fetch_add(n, Ordering::Relaxed);
        }
        self.delivered.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            command: f.command,
            from: origin,
            request_id: 0,
            payload: f.payload,
            reply: ReplyPath::None,
            conn: None,
            priority: meshwork_peers::transport::Priority::Normal,
            held: None,
        };
        ctx.inner.deliver_local(job)?;
        Ok(None)
    }
}
