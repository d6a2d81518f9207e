//! What a concern can do: send, request, broadcast, route, publish.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use meshwork_peers::PeerManager;
use meshwork_peers::transport::Priority;
use meshwork_peers::wire::NodeId;
use meshwork_peers::wire::proto::{ConcernKind, ErrorCode};
use tokio::time::Instant;

use crate::ConcernsError;
use crate::manager::{Inner, Registered};

/// A concern's handle on the node: everything it sends goes out under its
/// command id. Cheap to clone.
#[derive(Clone)]
pub struct Context {
    pub(crate) inner: Arc<Inner>,
    pub(crate) command: u32,
    /// The concern registered for `command`, once it is (concerns are
    /// never removed): its delivery callbacks run for every message sent,
    /// without a registry lookup each time.
    pub(crate) registered: OnceLock<Arc<Registered>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("command", &format_args!("{:#x}", self.command))
            .finish()
    }
}

impl Context {
    /// Runs the concern's delivery callback for a message to `to`.
    fn notify(&self, to: &NodeId, error: Option<&ConcernsError>) {
        let reg = match self.registered.get() {
            Some(reg) => reg,
            None => match self.inner.registered(self.command) {
                Some(reg) => self.registered.get_or_init(|| reg),
                // Not (yet) registered: nobody to tell.
                None => return,
            },
        };
        Inner::notify(reg, to, error);
    }

    /// The command id messages from this context carry.
    pub fn command(&self) -> u32 {
        self.command
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        self.inner.peers.node_id()
    }

    /// The peer manager: selection (`least_failed`, `by_metadata`, ...),
    /// events, stats.
    pub fn peers(&self) -> &PeerManager {
        &self.inner.peers
    }

    /// The node's clock (tokio's, so a paused test clock applies).
    pub fn now(&self) -> Instant {
        Instant::now()
    }

    /// Sends a request to a neighbour and waits for its reply, for at most
    /// `timeout` from this call (waiting for room on a busy connection
    /// counts).
    ///
    /// Errors: [`NotConnected`](ConcernsError::NotConnected) /
    /// [`Unresponsive`](ConcernsError::Unresponsive) at once,
    /// [`Timeout`](ConcernsError::Timeout) (also counted against the peer in
    /// the peer manager), or the remote's [`Remote`](ConcernsError::Remote)
    /// error.
    pub fn request(
        &self,
        peer: &NodeId,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Bytes, ConcernsError>> + Send {
        // These forwarders are not `async fn`s: each such layer would store
        // its arguments again in the future every request carries.
        self.direct(peer, payload.into(), timeout, Priority::Normal, true)
    }

    /// [`request`](Self::request) on a chosen lane.
    pub fn request_with(
        &self,
        peer: &NodeId,
        payload: impl Into<Bytes>,
        timeout: Duration,
        priority: Priority,
    ) -> impl Future<Output = Result<Bytes, ConcernsError>> + Send {
        self.direct(peer, payload.into(), timeout, priority, true)
    }

    /// [`request_with`](Self::request_with) for work that may legitimately
    /// outlast its deadline: running out of `deadline` is not counted
    /// against the peer. A slow handler is not a failing peer, and a peer
    /// that stops answering altogether is found by the heartbeats anyway;
    /// what [`request`](Self::request) counts is meant for protocol
    /// exchanges a healthy peer always answers quickly. RPC calls (whose
    /// deadline is the caller's budget for the method) go this way, so a
    /// caller that gives a slow method a short deadline cannot get its
    /// provider banned.
    pub fn request_with_deadline(
        &self,
        peer: &NodeId,
        payload: impl Into<Bytes>,
        deadline: Duration,
        priority: Priority,
    ) -> impl Future<Output = Result<Bytes, ConcernsError>> + Send {
        self.direct(peer, payload.into(), deadline, priority, false)
    }

    #[allow(clippy::manual_async_fn)] // an async block on purpose: see the comment inside
    fn direct(
        &self,
        peer: &NodeId,
        payload: Bytes,
        timeout: Duration,
        priority: Priority,
        blame_timeout: bool,
    ) -> impl Future<Output = Result<Bytes, ConcernsError>> + Send {
        // `async move` blocks down to the connection: an `async fn` stores
        // its arguments twice in its future, and every request's future
        // carries all of these.
        async move {
            let r = self
                .inner
                .request_direct(
                    self.command,
                    peer,
                    payload,
                    timeout,
                    priority,
                    blame_timeout,
                )
                .await;
            self.notify(peer, r.as_ref().err());
            r
        }
    }

    /// Sends a one-way message to a neighbour. Returns when it is queued on
    /// the connection; the concern's `on_sent`/`on_send_failed`/`on_dropped`
    /// say the same.
    ///
    /// A connection whose lane is full (a peer reading slower than this node
    /// writes) makes this wait for room, at most the transport's send timeout
    /// (`Config::with_send_timeout`, 10 s by default), after which the
    /// message is [`Dropped`](ConcernsError::Dropped). For a shorter bound,
    /// wrap the call in `tokio::time::timeout`: a send dropped before it
    /// returns has queued nothing.
    pub async fn send(
        &self,
        peer: &NodeId,
        payload: impl Into<Bytes>,
    ) -> Result<(), ConcernsError> {
        self.send_with(peer, payload, Priority::Normal).await
    }

    /// [`send`](Self::send) on a chosen lane (e.g. [`Priority::Bulk`] for
    /// a transfer that must not hold up replies and control traffic).
    pub async fn send_with(
        &self,
        peer: &NodeId,
        payload: impl Into<Bytes>,
        priority: Priority,
    ) -> Result<(), ConcernsError> {
        let r = self
            .inner
            .send_direct(
                peer,
                self.command,
                0,
                ConcernKind::Request,
                payload.into(),
                priority,
            )
            .await;
        self.notify(peer, r.as_ref().err());
        r
    }

    /// Sends `payload` to every node of the mesh (through the flood
    /// concern), to travel at most `ttl` hops (1 or more; a node's own
    /// maximum, `ConcernsConfig::with_flood_ttl`, caps it on the way). Each
    /// node delivers it once to its concern for this command; the sender
    /// does not deliver it to itself. Returns the message id.
    ///
    /// Best effort, at the time of the call: it goes to the neighbours
    /// connected now, and on from them. [`ConcernsError::NoNeighbours`]
    /// when there were none (a node that has just started, or whose peer
    /// has just connected, may not count it yet: see
    /// `PeerManager::wait_for_peers`), [`ConcernsError::InvalidArgument`]
    /// for a TTL of 0 or a command id of the flood or routing concern
    /// (which no node would deliver), [`ConcernsError::Shutdown`] once the
    /// layer is stopping.
    pub async fn broadcast(
        &self,
        payload: impl Into<Bytes>,
        ttl: u32,
    ) -> Result<u64, ConcernsError> {
        self.inner.broadcast(self.command, payload.into(), ttl)
    }

    /// Sends a one-way message to any node, neighbour or not, through the
    /// routing concern (sealed for `node`, as [`request_to`](Self::request_to)).
    ///
    /// With no route to `node` known, it first searches for one, as
    /// `request_to` does: [`ConcernsError::Unreachable`] once the search
    /// has tried every way, or after the search timeout (3 s by default,
    /// `ConcernsConfig::with_routing`). It returns once the message is
    /// handed to the first node on the way; nothing answers a one-way
    /// message, so one lost after that (a node on the way lost its route,
    /// or `node` has no concern for this command) is lost without a word:
    /// use `request_to` to know that it arrived.
    /// [`ConcernsError::InvalidArgument`] for this node's own id,
    /// [`ConcernsError::PayloadTooLarge`] for a payload over
    /// [`Concerns::max_payload`](crate::Concerns::max_payload).
    pub async fn send_to(
        &self,
        node: &NodeId,
        payload: impl Into<Bytes>,
    ) -> Result<(), ConcernsError> {
        let routing = self.inner.routing()?;
        let payload = payload.into();
        self.inner.check_len(payload.len())?;
        self.inner.check_not_me(node)?;
        let r = routing
            .send(
                &self.inner,
                node,
                self.command,
                0,
                ConcernKind::Request,
                payload,
            )
            .await;
        self.notify(node, r.as_ref().err());
        r
    }

    /// Sends a request to any node through the routing concern and waits
    /// for its reply, which comes back the same way.
    ///
    /// [`ConcernsError::Unreachable`] when no route was found (nothing was
    /// sent), [`ConcernsError::RouteLost`] when a node on the way reported
    /// it had none (the request may have arrived all the same),
    /// [`ConcernsError::InvalidArgument`] for this node's own id.
    pub async fn request_to(
        &self,
        node: &NodeId,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes, ConcernsError> {
        let routing = self.inner.routing()?;
        let r = self
            .inner
            .request_routed(&routing, self.command, node, payload.into(), timeout)
            .await;
        let r = match r {
            Err(ConcernsError::Remote {
                code: ErrorCode::Unreachable,
                ..
            }) => {
                routing.forget(node);
                Err(ConcernsError::RouteLost(node.clone()))
            }
            r => r,
        };
        self.notify(node, r.as_ref().err());
        r
    }

    /// Publishes `payload` on `topic`: every node of the mesh subscribed to
    /// it receives it once (the publisher's own subscriptions excepted).
    /// Fails as [`broadcast`](Self::broadcast) does, and with
    /// [`ConcernsError::InvalidArgument`] for a topic that is empty or longer
    /// than [`MAX_TOPIC_LEN`](crate::MAX_TOPIC_LEN) bytes.
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
    ) -> Result<u64, ConcernsError> {
        self.inner.publish(topic, payload.into())
    }
}
