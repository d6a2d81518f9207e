//! Topics: publish/subscribe over the flood concern. A publication floods
//! the mesh once; every node hands it to its own subscribers of the topic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use bytes::Bytes;
use meshwork_peers::wire::NodeId;
use meshwork_peers::wire::proto::Published;
use prost::Message as _;
use tokio::sync::mpsc;

use crate::manager::{ConcernsConfig, TOPICS};
use crate::{BoxError, Concern, ConcernsError, Context, Reply};

/// Longest topic name, in bytes.
pub const MAX_TOPIC_LEN: usize = 256;

/// One message published on a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// The node that published it.
    pub origin: NodeId,
    /// The topic.
    pub topic: String,
    /// The message.
    pub payload: Bytes,
}

/// A subscriber: its id, its queue, and how many publications its full
/// queue made this node drop.
type Subscriber = (u64, mpsc::Sender<Publication>, Arc<AtomicU64>);
type Subscribers = HashMap<String, Vec<Subscriber>>;

pub(crate) struct Topics {
    subs: Arc<Mutex<Subscribers>>,
    /// Set at stop, under the lock of `subs`: no subscription after.
    closed: std::sync::atomic::AtomicBool,
    next: AtomicU64,
    queue: usize,
    delivered: AtomicU64,
    dropped: AtomicU64,
}

/// Messages published on one topic, from [`Concerns::subscribe`]. Dropping
/// it unsubscribes.
///
/// It keeps up to `ConcernsConfig::with_subscription_queue` publications
/// (256 by default) that were not received yet; the ones that arrive while
/// it is full are dropped, and [`dropped`](Subscription::dropped) counts
/// them.
///
/// [`Concerns::subscribe`]: crate::Concerns::subscribe
#[derive(Debug)]
pub struct Subscription {
    topic: String,
    id: u64,
    rx: mpsc::Receiver<Publication>,
    subs: Weak<Mutex<Subscribers>>,
    dropped: Arc<AtomicU64>,
}

impl Subscription {
    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The next publication; `None` once the node has shut down.
    ///
    /// Cancel safety: cancel-safe.
    pub async fn recv(&mut self) -> Option<Publication> {
        self.rx.recv().await
    }

    /// A publication already received, if any.
    pub fn try_recv(&mut self) -> Option<Publication> {
        self.rx.try_recv().ok()
    }

    /// Publications this subscription missed so far: they arrived while
    /// its queue was full (a subscriber that does not keep up). They are
    /// gone; compare the count with an earlier one to learn of a gap.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(subs) = self.subs.upgrade() {
            let mut subs = subs.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(list) = subs.get_mut(&self.topic) {
                list.retain(|(id, _, _)| *id != self.id);
                if list.is_empty() {
                    subs.remove(&self.topic);
                }
            }
        }
    }
}

fn check_topic(topic: &str) -> Result<(), ConcernsError> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_LEN {
        return Err(ConcernsError::InvalidArgument(format!(
            "a topic is 1 to {MAX_TOPIC_LEN} bytes, not {}",
            topic.len()
        )));
    }
    Ok(())
}

impl Topics {
    pub(crate) fn new(cfg: &ConcernsConfig) -> Self {
        Topics {
            subs: Arc::new(Mutex::new(HashMap::new())),
            closed: std::sync::atomic::AtomicBool::new(false),
            next: AtomicU64::new(1),
            queue: cfg.subscription_queue,
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    pub(crate) fn subscribe(&self, topic: &str) -> Result<Subscription, ConcernsError> {
        check_topic(topic)?;
        let (tx, rx) = mpsc::channel(self.queue);
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let dropped = Arc::new(AtomicU64::new(0));
        {
            let mut subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
            // Asked under the lock the stop clears the subscribers under:
            // a subscription is refused here or ended there.
            if self.closed.load(Ordering::SeqCst) {
                return Err(ConcernsError::Shutdown);
            }
            let entry = (id, tx, dropped.clone());
            subs.entry(topic.to_string()).or_default().push(entry);
        }
        Ok(Subscription {
            topic: topic.to_string(),
            id,
            rx,
            subs: Arc::downgrade(&self.subs),
            dropped,
        })
    }

    pub(crate) fn encode(&self, topic: &str, payload: Bytes) -> Result<Bytes, ConcernsError> {
        check_topic(topic)?;
        Ok(Published {
            topic: topic.to_string(),
            payload,
        }
        .encode_to_vec()
        .into())
    }

    /// Topics with at least one local subscriber.
    pub(crate) fn subscribed(&self) -> Vec<String> {
        let mut t: Vec<String> = self
            .subs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        t.sort();
        t
    }

    pub(crate) fn stats(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("delivered", self.delivered.load(Ordering::Relaxed)),
            ("dropped", self.dropped.load(Ordering::Relaxed)),
            ("topics", self.subscribed().len() as u64),
        ]
    }
}

#[async_trait]
impl Concern for Topics {
    fn command(&self) -> u32 {
        TOPICS
    }

    fn name(&self) -> &str {
        "topics"
    }

    fn max_concurrency(&self) -> usize {
        64
    }

    /// Ends every subscription: their `recv` returns what was received,
    /// then `None` (the senders they wait on go).
    async fn on_stop(&self, _ctx: &Context) {
        let mut subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
        self.closed.store(true, Ordering::SeqCst);
        subs.clear();
    }

    async fn on_request(
        &self,
        _ctx: &Context,
        from: &NodeId,
        payload: Bytes,
    ) -> Result<Option<Reply>, BoxError> {
        let p = Published::decode(payload)?;
        check_topic(&p.topic)?;
        let mut subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = subs.get_mut(&p.topic) {
            list.retain(|(_, tx, _)| !tx.is_closed());
            for (_, tx, missed) in list.iter() {
                let publication = Publication {
                    origin: from.clone(),
                    topic: p.topic.clone(),
                    payload: p.payload.clone(),
                };
                match tx.try_send(publication) {
                    Ok(()) => self.delivered.fetch_add(1, Ordering::Relaxed),
                    Err(_) => {
                        missed.fetch_add(1, Ordering::Relaxed);
                        self.dropped.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }
        Ok(None)
    }
}
