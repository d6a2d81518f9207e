//! What reached this node: a bounded log of delivery events, read through
//! the admin API's `GET /events`.
//!
//! Every broadcast and request the echo concern receives, and every
//! publication on a topic the node subscribed to, becomes one [`Event`]
//! with a sequence number (1, 2, ... per node). The log keeps the newest
//! [`EVENT_CAPACITY`]; a reader asks for the events after the last sequence
//! number it saw.

use std::collections::VecDeque;
use std::sync::Mutex;

use meshwork::wire::NodeId;
use serde::Serialize;
use tokio::time::Instant;

/// The log keeps this many events, the newest.
pub(crate) const EVENT_CAPACITY: usize = 1000;
/// Bytes of a message's payload an event keeps (the rest is counted in
/// `bytes`, not kept). Any peer can send a message as large as a frame
/// (16 MiB) to the echo concern, and a flood takes it to every node: kept
/// whole, 1000 of them were up to 48 GB per node (invalid UTF-8 triples
/// when shown as text).
pub(crate) const EVENT_PAYLOAD: usize = 1024;

/// How a message reached this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum EventKind {
    /// A one-way message for the echo concern (a flood, in practice).
    Broadcast,
    /// A request for the echo concern that wanted an answer (direct or routed).
    Request,
    /// A message published on a topic this node subscribed to.
    Publication,
}

/// One delivery, as `GET /events` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Event {
    /// 1 for the node's first event, then one more for each.
    pub(crate) seq: u64,
    /// How it arrived.
    pub(crate) kind: EventKind,
    /// The node it came from (the origin, not the last hop), hex.
    pub(crate) from: String,
    /// The topic of a publication, else null.
    pub(crate) topic: Option<String>,
    /// The message's first [`EVENT_PAYLOAD`] bytes, as UTF-8 (invalid bytes,
    /// and a character the cut splits, become U+FFFD).
    pub(crate) payload: String,
    /// The message's whole length in bytes.
    pub(crate) bytes: usize,
    /// When it arrived, in ms since the node started.
    pub(crate) at_ms: u64,
}

/// A bounded, thread-safe log of [`Event`]s.
#[derive(Debug)]
pub(crate) struct EventLog {
    started: Instant,
    capacity: usize,
    ring: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    events: VecDeque<Event>,
    last_seq: u64,
}

impl EventLog {
    /// An empty log keeping [`EVENT_CAPACITY`] events; times count from now.
    pub(crate) fn new() -> Self {
        Self::with_capacity(EVENT_CAPACITY)
    }

    /// An empty log keeping the newest `capacity` events.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        EventLog {
            started: Instant::now(),
            capacity: capacity.max(1),
            ring: Mutex::new(Ring::default()),
        }
    }

    /// Records a delivery and returns its sequence number.
    pub(crate) fn record(
        &self,
        kind: EventKind,
        from: &NodeId,
        topic: Option<&str>,
        payload: &[u8],
    ) -> u64 {
        let at_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.last_seq += 1;
        let event = Event {
            seq: ring.last_seq,
            kind,
            from: from.to_string(),
            topic: topic.map(str::to_string),
            payload: String::from_utf8_lossy(&payload[..payload.len().min(EVENT_PAYLOAD)])
                .into_owned(),
            bytes: payload.len(),
            at_ms,
        };
        if ring.events.len() == self.capacity {
            ring.events.pop_front();
        }
        ring.events.push_back(event);
        ring.last_seq
    }

    /// The events kept with `seq > since`, oldest first, and the last
    /// sequence number handed out (0 before the first event): pass it as
    /// `since` next time to get only newer events.
    pub(crate) fn since(&self, since: u64) -> (Vec<Event>, u64) {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        // Sequence numbers are consecutive, so the first newer one is at a
        // known offset from the front.
        let first = ring.events.front().map_or(0, |e| e.seq);
        let skip = usize::try_from(since.saturating_add(1).saturating_sub(first))
            .unwrap_or(usize::MAX)
            .min(ring.events.len());
        let events = ring.events.iter().skip(skip).cloned().collect();
        (events, ring.last_seq)
    }

    /// How many of the events kept are of `kind` and carry `payload`.
    pub(crate) fn count(&self, kind: EventKind, payload: &str) -> usize {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.events
            .iter()
            .filter(|e| e.kind == kind && e.payload == payload)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes(vec![b; 4]).unwrap()
    }

    #[test]
    fn events_are_numbered_from_one_and_serialised_as_documented() {
        let log = EventLog::new();
        assert_eq!(log.since(0), (vec![], 0));
        assert_eq!(log.record(EventKind::Broadcast, &id(1), None, b"hi"), 1);
        assert_eq!(
            log.record(EventKind::Publication, &id(2), Some("news"), b"\xffok"),
            2
        );
        let (events, next) = log.since(0);
        assert_eq!(next, 2);
        let json = serde_json::to_value(&events).unwrap();
        let at = |i: usize| json[i]["at_ms"].clone();
        assert!(at(0).is_u64() && at(1).is_u64(), "{json}");
        assert_eq!(
            json,
            json!([
                {"seq": 1, "kind": "broadcast", "from": "01010101", "topic": null,
                 "payload": "hi", "bytes": 2, "at_ms": at(0)},
                {"seq": 2, "kind": "publication", "from": "02020202", "topic": "news",
                 "payload": "\u{fffd}ok", "bytes": 3, "at_ms": at(1)},
            ])
        );
        let (events, next) = log.since(1);
        assert_eq!((events.len(), events[0].seq, next), (1, 2, 2));
        assert_eq!(log.since(2), (vec![], 2));
        assert_eq!(log.since(99), (vec![], 2));
        assert_eq!(log.count(EventKind::Broadcast, "hi"), 1);
        assert_eq!(log.count(EventKind::Request, "hi"), 0);
    }

    #[test]
    fn events_keep_the_start_of_large_payloads_only() {
        let log = EventLog::with_capacity(4);
        // 1 MiB of bytes that are not UTF-8: each would become 3 bytes.
        let big = vec![0x80u8; 1 << 20];
        for _ in 0..4 {
            log.record(EventKind::Broadcast, &id(1), None, &big);
        }
        let (events, _) = log.since(0);
        for e in &events {
            assert_eq!(e.bytes, 1 << 20);
            assert_eq!(e.payload.chars().count(), EVENT_PAYLOAD);
            assert!(e.payload.len() <= 3 * EVENT_PAYLOAD);
        }
        // Within the bound, a payload is kept whole.
        let text = "x".repeat(EVENT_PAYLOAD);
        log.record(EventKind::Request, &id(2), None, text.as_bytes());
        assert_eq!(log.count(EventKind::Request, &text), 1);
    }

    #[test]
    fn the_log_keeps_the_newest_events_only() {
        let log = EventLog::with_capacity(3);
        for i in 0..5u8 {
            log.record(EventKind::Request, &id(1), None, &[b'a' + i]);
        }
        let (events, next) = log.since(0);
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!((seqs, next), (vec![3, 4, 5], 5));
        assert_eq!(events[0].payload, "c");
        let (events, _) = log.since(3);
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(EventLog::new().capacity, EVENT_CAPACITY);
    }
}
