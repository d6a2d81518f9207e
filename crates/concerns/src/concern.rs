//! The `Concern` trait: one handler per command id.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use meshwork_peers::transport::Priority;
use meshwork_peers::wire::NodeId;

use crate::{BoxError, ConcernsError, Context};

/// The answer a handler gives to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The reply's bytes.
    pub payload: Bytes,
    /// The lane it goes back on; `None` (the default): the lane the request
    /// came on.
    pub priority: Option<Priority>,
}

impl Reply {
    /// A reply on the lane its request came on.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Reply {
            payload: payload.into(),
            priority: None,
        }
    }

    /// The same reply on `priority`'s lane.
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = Some(priority);
        self
    }
}

/// How a request reached this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Via {
    /// From the neighbour that sent it ([`Context::send`],
    /// [`Context::request`]).
    Direct,
    /// Routed from a node that is not a neighbour ([`Context::send_to`],
    /// [`Context::request_to`]); the sender is the origin.
    Routed,
    /// Flooded to every node of the mesh ([`Context::broadcast`]); the
    /// sender is the origin, and no answer goes back.
    Flooded,
}

impl Via {
    /// Every way, in order.
    pub const ALL: [Via; 3] = [Via::Direct, Via::Routed, Via::Flooded];

    pub(crate) fn index(self) -> usize {
        match self {
            Via::Direct => 0,
            Via::Routed => 1,
            Via::Flooded => 2,
        }
    }
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Via::Direct => "direct",
            Via::Routed => "routed",
            Via::Flooded => "flooded",
        })
    }
}

/// A handler for one command id: it answers requests for that id, may send
/// messages of its own through its [`Context`], and is told about its own
/// lifecycle and the fate of what it sent.
///
/// Only [`command`](Concern::command) and [`on_request`](Concern::on_request)
/// are required.
///
/// ```
/// use async_trait::async_trait;
/// use bytes::Bytes;
/// use meshwork_concerns::{BoxError, Concern, Context, Reply};
/// use meshwork_concerns::wire::NodeId;
///
/// /// Answers every request with the same bytes.
/// struct Echo;
///
/// #[async_trait]
/// impl Concern for Echo {
///     fn command(&self) -> u32 {
///         7
///     }
///
///     async fn on_request(
///         &self,
///         _ctx: &Context,
///         _from: &NodeId,
///         payload: Bytes,
///     ) -> Result<Option<Reply>, BoxError> {
///         Ok(Some(Reply::new(payload)))
///     }
/// }
/// ```
#[async_trait]
pub trait Concern: Send + Sync + 'static {
    /// The command id this concern owns. Ids from `0xFFFF_0000` up are
    /// reserved for meshwork's own concerns (flood, routing and topics here,
    /// sync and RPC above); an application picks ids below. Nothing refuses
    /// a free id of that range, but a later meshwork may take it; one taken
    /// already is a [`DuplicateCommand`](ConcernsError::DuplicateCommand).
    fn command(&self) -> u32;

    /// A short name for status pages and logs.
    fn name(&self) -> &str {
        "concern"
    }

    /// At most this many requests run at once (default 16); more wait in
    /// per-sender queues served in turn.
    fn max_concurrency(&self) -> usize {
        16
    }

    /// Whether this concern takes requests that reached the node `via`
    /// that way (asked once, when it is added). Default: every way. Refused
    /// requests are counted as dropped, and a routed one that wants an
    /// answer gets a `BAD_REQUEST` error.
    ///
    /// Refuse [`Via::Flooded`] when a request does work on its sender's
    /// behalf: anyone can broadcast one under an origin of their own
    /// making (a node id costs nothing), and every node of the mesh runs
    /// it.
    fn accepts(&self, via: Via) -> bool {
        let _ = via;
        true
    }

    /// How often [`tick`](Concern::tick) runs, if at all (p2p0mq's
    /// `execute`). Default: never.
    fn tick_interval(&self) -> Option<Duration> {
        None
    }

    /// Called once when the concern starts (with the node, or when added to
    /// a running node).
    async fn on_start(&self, _ctx: &Context) {}

    /// Called once when the node stops.
    async fn on_stop(&self, _ctx: &Context) {}

    /// Called every [`tick_interval`](Concern::tick_interval). A tick
    /// still running when the node shuts down is dropped.
    async fn tick(&self, _ctx: &Context) {}

    /// Handles a request from `from` (the sender: a neighbour for direct
    /// messages, the origin for broadcast and routed ones). A reply goes
    /// back when the sender asked for one; `Ok(None)` then sends an empty
    /// reply. An error (or a panic) becomes an error reply and is counted.
    async fn on_request(
        &self,
        ctx: &Context,
        from: &NodeId,
        payload: Bytes,
    ) -> Result<Option<Reply>, BoxError>;

    /// A reply nobody was waiting for (late, or to a one-way send).
    ///
    /// The same reply may come more than once: a node on the way of a
    /// routed answer can record it and send it again (it cannot alter or
    /// forge one, protocol.md 10.3.1), and only the first finds its request
    /// waiting. Treat what arrives here as possibly repeated.
    ///
    /// Each runs in a task of its own, at most
    /// [`max_concurrency`](Concern::max_concurrency) at once: more are
    /// dropped (and counted as dropped), so that a peer sending replies
    /// nobody asked for cannot start a task each. One still running when
    /// the node shuts down is dropped.
    async fn on_reply(&self, _ctx: &Context, _from: &NodeId, _payload: Bytes) {}

    /// A message this concern sent was queued on the connection to `to`.
    fn on_sent(&self, _to: &NodeId) {}

    /// A message this concern sent could not be handed to `to` (not
    /// connected, unresponsive, unreachable).
    fn on_send_failed(&self, _to: &NodeId, _error: &ConcernsError) {}

    /// A message this concern sent to `to` was dropped because a queue was
    /// full.
    fn on_dropped(&self, _to: &NodeId) {}

    /// The neighbour `peer` left (its connection closed): work kept for it
    /// or through it (routes, calls it started) can go. Called on the
    /// layer's event task: keep it short.
    fn on_peer_left(&self, _peer: &NodeId) {}
}
