//! The node's demo concern, `echo` (command [`ECHO_COMMAND`]), and the
//! recording of topic publications.
//!
//! `echo` answers every request with the message it carried and records
//! each delivery in the node's [`EventLog`]: broadcasts (floods) as
//! [`EventKind::Broadcast`], requests that want an answer as
//! [`EventKind::Request`]. [`TopicRecorder`] records the publications on
//! the topics given to `meshwork node --subscribe`.
//!
//! # Telling broadcasts from requests
//!
//! The `Concern` trait hands a handler the sender and the bytes, not whether
//! an answer is wanted nor whether the message was flooded, routed or sent
//! directly. So the echo messages meshwork-cli sends say it themselves,
//! with one leading byte that can never start UTF-8 text:
//!
//! ```text
//! 0xFE message   a broadcast (sent one-way, flooded): recorded as "broadcast"
//! 0xFF message   a request (an answer is wanted): recorded as "request",
//!                answered with `message`
//! anything else  from another program: recorded as "broadcast" (every
//!                one-way delivery is one), answered with the whole payload
//! ```

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use meshwork::Node;
use meshwork::concerns::{BoxError, Concern, ConcernsError, Context, Reply};
use meshwork::wire::NodeId;
use tokio::task::JoinHandle;

use crate::events::{EventKind, EventLog};

/// The echo concern's command id.
pub(crate) const ECHO_COMMAND: u32 = 0x100;
/// Hops a broadcast travels (the library's default flood TTL).
pub(crate) const BROADCAST_TTL: u32 = 16;

/// First byte of a broadcast's payload.
const TAG_BROADCAST: u8 = 0xFE;
/// First byte of a request's payload.
const TAG_REQUEST: u8 = 0xFF;

fn tagged(tag: u8, message: &[u8]) -> Bytes {
    let mut payload = Vec::with_capacity(1 + message.len());
    payload.push(tag);
    payload.extend_from_slice(message);
    payload.into()
}

/// What an echo payload is, and the message it carries.
fn untag(payload: Bytes) -> (EventKind, Bytes) {
    match payload.first() {
        Some(&TAG_BROADCAST) => (EventKind::Broadcast, payload.slice(1..)),
        Some(&TAG_REQUEST) => (EventKind::Request, payload.slice(1..)),
        _ => (EventKind::Broadcast, payload),
    }
}

/// Floods `message` to the echo concern of every other node; returns the
/// flood's message id.
pub(crate) async fn broadcast(node: &Node, message: &[u8]) -> Result<u64, ConcernsError> {
    node.concerns()
        .context(ECHO_COMMAND)
        .broadcast(tagged(TAG_BROADCAST, message), BROADCAST_TTL)
        .await
}

/// Asks the echo concern of `target` (a neighbour or not: the request is
/// routed) to send `message` back, and returns the answer.
pub(crate) async fn request(
    node: &Node,
    target: &NodeId,
    message: &[u8],
    timeout: Duration,
) -> Result<Bytes, ConcernsError> {
    node.concerns()
        .context(ECHO_COMMAND)
        .request_to(target, tagged(TAG_REQUEST, message), timeout)
        .await
}

/// The echo concern: records every delivery and answers with the message.
#[derive(Debug)]
pub(crate) struct Echo {
    log: Arc<EventLog>,
}

impl Echo {
    /// An echo concern recording into `log`.
    pub(crate) fn new(log: Arc<EventLog>) -> Self {
        Echo { log }
    }

    fn handle(&self, from: &NodeId, payload: Bytes) -> Reply {
        let (kind, message) = untag(payload);
        self.log.record(kind, from, None, &message);
        Reply::new(message)
    }
}

// What `#[async_trait]` expands `async fn on_request` to, written out so the
// crate needs no proc-macro of its own; the handler never waits.
impl Concern for Echo {
    fn command(&self) -> u32 {
        ECHO_COMMAND
    }

    fn name(&self) -> &str {
        "echo"
    }

    fn on_request<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        _ctx: &'life1 Context,
        from: &'life2 NodeId,
        payload: Bytes,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<Option<Reply>, BoxError>> + Send + 'async_trait,
        >,
    >
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        let reply = self.handle(from, payload);
        Box::pin(std::future::ready(Ok(Some(reply))))
    }
}

/// Records every publication on some topics as [`EventKind::Publication`]
/// events, one task per topic. Dropping it unsubscribes.
#[derive(Debug)]
pub(crate) struct TopicRecorder {
    topics: Vec<String>,
    tasks: Vec<JoinHandle<()>>,
}

impl TopicRecorder {
    /// Subscribes `node` to each of `topics` (duplicates once) and starts
    /// recording into `log`. Fails on an invalid topic (empty or over 256
    /// bytes).
    pub(crate) fn start(
        node: &Node,
        topics: &[String],
        log: &Arc<EventLog>,
    ) -> Result<Self, ConcernsError> {
        let mut topics = topics.to_vec();
        topics.sort();
        topics.dedup();
        let mut subscriptions = Vec::with_capacity(topics.len());
        for topic in &topics {
            subscriptions.push(node.concerns().subscribe(topic)?);
        }
        let tasks = subscriptions
            .into_iter()
            .map(|mut sub| {
                let log = log.clone();
                tokio::spawn(async move {
                    while let Some(p) = sub.recv().await {
                        log.record(
                            EventKind::Publication,
                            &p.origin,
                            Some(&p.topic),
                            &p.payload,
                        );
                    }
                })
            })
            .collect();
        Ok(TopicRecorder { topics, tasks })
    }

    /// The topics subscribed to, sorted.
    pub(crate) fn topics(&self) -> &[String] {
        &self.topics
    }
}

impl Drop for TopicRecorder {
    fn drop(&mut self) {
        // The subscriptions end with their tasks.
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_payloads_say_what_they_are() {
        assert_eq!(
            untag(tagged(TAG_BROADCAST, b"hi")),
            (EventKind::Broadcast, Bytes::from("hi"))
        );
        assert_eq!(
            untag(tagged(TAG_REQUEST, b"")),
            (EventKind::Request, Bytes::new())
        );
        // From another program: one-way as far as we can tell, kept whole.
        assert_eq!(
            untag(Bytes::from("hi")),
            (EventKind::Broadcast, Bytes::from("hi"))
        );
        assert_eq!(untag(Bytes::new()), (EventKind::Broadcast, Bytes::new()));
        // No UTF-8 text starts with a tag byte.
        assert!(std::str::from_utf8(&[TAG_BROADCAST]).is_err());
        assert!(std::str::from_utf8(&[TAG_REQUEST]).is_err());
    }

    #[test]
    fn echo_records_and_answers_with_the_message() {
        let log = Arc::new(EventLog::new());
        let echo = Echo::new(log.clone());
        let from = NodeId::from_bytes(vec![7; 4]).unwrap();
        let reply = echo.handle(&from, tagged(TAG_REQUEST, b"ping"));
        assert_eq!(reply.payload, Bytes::from("ping"));
        echo.handle(&from, tagged(TAG_BROADCAST, b"all"));
        let (events, next) = log.since(0);
        assert_eq!(next, 2);
        assert_eq!(
            (
                events[0].kind,
                events[0].payload.as_str(),
                events[0].from.as_str()
            ),
            (EventKind::Request, "ping", "07070707")
        );
        assert_eq!(
            (events[1].kind, events[1].payload.as_str()),
            (EventKind::Broadcast, "all")
        );
        assert_eq!((echo.command(), echo.name()), (0x100, "echo"));
    }
}
