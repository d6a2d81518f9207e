//! The flood concern: a message for every node of the mesh, delivered and
//! relayed once per node (py2p's waterfall, ChaskiNode's propagate).
//!
//! The origin sends a `Flooded { origin, message_id, command, payload, ttl,
//! sent_at_ms, signature }` to each neighbour. A node that has not seen
//! `(origin, message_id)` before checks the stamp and the origin's signature,
//! remembers it (a bounded, expiring [`SeenCache`](crate::seen::SeenCache)), relays it with `ttl - 1`
//! to every neighbour except the one it came from and the origin, and hands
//! the payload to its own concern for `command`.
//!
//! The signature (XEdDSA under the origin's node id, over every field but
//! the TTL) is what lets a node trust `origin` although the message reached
//! it through others: no member can broadcast or publish in another's name,
//! nor alter what it relays. Every node checks before it relays, so a
//! neighbour handing over a flood whose signature does not hold made it up:
//! it is banned. The stamp bounds replays: a flood stamped further from this
//! node's clock than half the seen-cache lifetime is dropped, so one that
//! was recorded cannot be delivered again once the cache has forgotten it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use meshwork_peers::transport::{Identity, VerifyingKey};
use meshwork_peers::wire::NodeId;
use meshwork_peers::wire::proto::Flooded;
use prost::Message as _;
use tracing::{debug, warn};

use crate::clock::WallClock;
use crate::manager::{ConcernsConfig, FLOOD, Inner, Job, ReplyPath};
use crate::replay::{ReplayGuard, Verdict};
use crate::warn::WarnBudget;
use crate::{BoxError, Concern, ConcernsError, Context, Reply};

pub(crate) struct Flood {
    /// Message ids by origin, while their stamps are in the window; when
    /// full, the origin holding the most loses its oldest and refuses
    /// what it stamped before (see `replay`). Keyed by origin, which the
    /// signature proves: whoever hands floods over, only their origins pay
    /// for them (keyed by the neighbour that brought them, filler relayed
    /// by an honest node pushed out that node's other floods: audit round
    /// five).
    seen: Mutex<ReplayGuard<u64>>,
    /// The most hops a message is relayed from here on, whatever TTL it
    /// arrived with (this node's `flood_ttl`).
    max_ttl: u32,
    sent: AtomicU64,
    delivered: AtomicU64,
    relayed: AtomicU64,
    duplicates: AtomicU64,
    dropped: AtomicU64,
    /// Origins' keys in the form that checks signatures (bounded).
    keys: Mutex<HashMap<NodeId, VerifyingKey>>,
    clock: Arc<WallClock>,
    /// How far from this node's clock a flood may be stamped, in ms.
    window_ms: u64,
    /// Floods whose signature did not hold (their bringers were banned).
    forged: AtomicU64,
    /// Floods stamped outside the window.
    stale: AtomicU64,
    /// Floods a banned neighbour had sent before its ban took effect.
    from_banned: AtomicU64,
    stale_warnings: WarnBudget,
    forged_warnings: WarnBudget,
}

/// Origins whose signature-checking keys are kept; past it one is dropped.
const KEY_CACHE: usize = 4096;
/// How long a neighbour that handed over a forged flood is refused.
const FORGER_BAN: Duration = Duration::from_secs(600);
/// Domain separation: a signature made for a flood serves no other purpose.
const SIGNED_LABEL: &[u8] = b"meshwork flood v1";

/// Signs `flooded` as `identity`, whose node id its `origin` must be: sets
/// its `signature` over every other field but `ttl` (see the protocol spec,
/// section "Flood"). For tools and tests that make Flood frames by hand;
/// [`Context::broadcast`] signs its own.
pub fn sign_flooded(identity: &Identity, flooded: &mut Flooded) {
    flooded.signature = Bytes::copy_from_slice(&identity.sign(&signed_bytes(flooded)));
}

/// The bytes a flood's signature covers: every field but the TTL (which
/// each hop lowers) and the signature.
fn signed_bytes(f: &Flooded) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNED_LABEL.len() + 1 + f.origin.len() + 20 + f.payload.len());
    m.extend_from_slice(SIGNED_LABEL);
    // Ids are at most 64 bytes: one length byte keeps the parts apart.
    m.push(f.origin.len() as u8);
    m.extend_from_slice(&f.origin);
    m.extend_from_slice(&f.message_id.to_be_bytes());
    m.extend_from_slice(&f.command.to_be_bytes());
    m.extend_from_slice(&f.sent_at_ms.to_be_bytes());
    m.extend_from_slice(&f.payload);
    m
}

impl Flood {
    pub(crate) fn new(cfg: &ConcernsConfig, clock: Arc<WallClock>) -> Self {
        Flood {
            seen: Mutex::new(ReplayGuard::new(
                (cfg.seen_ttl / 2).as_millis().max(1) as u64,
                cfg.seen_capacity,
            )),
            max_ttl: cfg.flood_ttl,
            sent: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            relayed: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            keys: Mutex::new(HashMap::new()),
            clock,
            window_ms: (cfg.seen_ttl / 2).as_millis().max(1) as u64,
            forged: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            from_banned: AtomicU64::new(0),
            stale_warnings: WarnBudget::new(),
            forged_warnings: WarnBudget::new(),
        }
    }

    /// What the replay guard makes of `f` from `origin`; records it if
    /// `record` and fresh.
    fn judge(&self, origin: &NodeId, f: &Flooded, record: bool) -> Verdict {
        let now = self.clock.now_ms();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if record {
            seen.check(origin, f.message_id, f.sent_at_ms, now)
        } else {
            seen.peek(origin, f.message_id, f.sent_at_ms, now)
        }
    }

    /// Bans `from`, which handed over a forged flood.
    fn ban_forger(&self, ctx: &Context, from: &NodeId, origin: &NodeId) {
        self.forged.fetch_add(1, Ordering::Relaxed);
        // Every node checks before it relays: the bringer made it up. Said
        // loudly a few times a period only: fresh ids cost an attacker little.
        if self.forged_warnings.take() {
            warn!(from = %from.short(), origin = %origin.short(), "flood with a bad signature: dropped, its bringer banned");
        } else {
            debug!(from = %from.short(), origin = %origin.short(), "flood with a bad signature: dropped, its bringer banned");
        }
        ctx.inner.peers.ban(from, FORGER_BAN);
    }

    /// Checks `f`'s signature by `origin`.
    fn signed_by(&self, origin: &NodeId, f: &Flooded) -> bool {
        let key = {
            let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
            match keys.get(origin) {
                Some(k) => k.clone(),
                None => {
                    let Ok(k) = VerifyingKey::from_node_id(origin) else {
                        return false;
                    };
                    if keys.len() >= KEY_CACHE
                        && let Some(any) = keys.keys().next().cloned()
                    {
                        keys.remove(&any);
                    }
                    keys.insert(origin.clone(), k.clone());
                    k
                }
            }
        };
        key.verify(&signed_bytes(f), &f.signature).is_ok()
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

    /// Starts a flood from this node; returns its message id, or
    /// `NoNeighbours` if no neighbour took it.
    pub(crate) fn broadcast(
        &self,
        inner: &Arc<Inner>,
        command: u32,
        payload: Bytes,
        ttl: u32,
    ) -> Result<u64, ConcernsError> {
        let me = inner.peers.node_id().clone();
        // Ours are never judged here (a node drops floods from itself), so
        // they are not recorded: a random id is all they need.
        let id = rand::random::<u64>();
        let mut f = Flooded {
            origin: me.as_bytes().clone(),
            message_id: id,
            command,
            payload,
            ttl: ttl.max(1),
            sent_at_ms: self.clock.now_ms(),
            signature: Bytes::new(),
        };
        sign_flooded(inner.peers.endpoint().config().identity(), &mut f);
        if self.relay(inner, &f, &[]) == 0 {
            return Err(ConcernsError::NoNeighbours);
        }
        self.sent.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    pub(crate) fn stats(&self) -> Vec<(&'static str, u64)> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("sent", get(&self.sent)),
            ("delivered", get(&self.delivered)),
            ("relayed", get(&self.relayed)),
            ("duplicates", get(&self.duplicates)),
            ("dropped", get(&self.dropped)),
            ("from_banned", get(&self.from_banned)),
            ("forged", get(&self.forged)),
            ("stale", get(&self.stale)),
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
        if ctx.inner.peers.is_banned(from) {
            // Sent before its ban cut it off (a forger's, or any other's).
            self.from_banned.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        let f = Flooded::decode(payload)?;
        let origin = NodeId::from_bytes(f.origin.clone())?;
        if origin == *ctx.node_id() {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        match self.judge(&origin, &f, false) {
            Verdict::Fresh => {}
            Verdict::Replayed => {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            Verdict::Stale { off_ms } => {
                // Not the bringer's fault: its clock may differ from ours.
                self.stale.fetch_add(1, Ordering::Relaxed);
                // Usually clocks that disagree, which the operator must fix: said
                // loudly a few times a period (not more: anyone can send these).
                if self.stale_warnings.take() {
                    warn!(origin = %origin.short(), off_ms, window_ms = self.window_ms, "flood stamped outside the clock window: dropped (are the two nodes' clocks in sync?)");
                } else {
                    debug!(origin = %origin.short(), off_ms, "flood stamped outside the clock window: dropped");
                }
                return Ok(None);
            }
        }
        if !self.signed_by(&origin, &f) {
            self.ban_forger(ctx, from, &origin);
            return Ok(None);
        }
        if self.judge(&origin, &f, true) != Verdict::Fresh {
            // Another copy got through the checks meanwhile.
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
            via: crate::Via::Flooded,
            held: None,
        };
        ctx.inner.deliver_local(job)?;
        Ok(None)
    }
}
