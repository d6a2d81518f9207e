//! The requests of this node waiting for their answers, and their
//! timeouts.
//!
//! One sweeper task times out every request, instead of a timer per
//! request: a tokio timer is registered with the runtime's timer wheel
//! when first polled and taken out again when the answer comes, which with
//! many requests in flight cost about 8% of the whole request path. The
//! sweeper sleeps until the earliest deadline it knows of. A request with
//! the usual timeout ends later than every one before it, so registering
//! it costs a comparison; only an earlier deadline wakes the sweeper to
//! sleep less. When it wakes it fails what is due and finds the next
//! deadline in one pass over the waiting requests (answered ones are gone
//! from the map, so at most one wake-up per timeout period finds nothing).

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use meshwork_peers::wire::NodeId;
use rustc_hash::FxHashMap;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::ConcernsError;

/// How a request ends: its answer, or why there is none.
pub(crate) type Outcome = Result<Bytes, ConcernsError>;

/// A request waiting for its answer.
pub(crate) struct Pending {
    /// Who must answer (a reply from anyone else is not for this request).
    pub(crate) expect: NodeId,
    /// The command asked (an answer for another is not for this request).
    pub(crate) command: u32,
    /// Whether it was sent routed: then only a routed answer counts (and a
    /// routed "unreachable" from an intermediate node); else only one on a
    /// direct connection from `expect`.
    pub(crate) routed: bool,
    tx: oneshot::Sender<Outcome>,
    deadline: Instant,
    timeout: Duration,
}

impl Pending {
    /// Ends the request with `outcome` (nobody may wait any more).
    pub(crate) fn finish(self, outcome: Outcome) {
        let _ = self.tx.send(outcome);
    }
}

struct Table {
    /// Keyed by our own request ids: FxHash, not SipHash (a peer cannot
    /// choose which keys go in, so there is nothing to flood).
    map: FxHashMap<u64, Pending>,
    /// The deadline the sweeper sleeps until (`None`: it waits for one).
    armed: Option<Instant>,
}

/// The waiting requests, by request id.
pub(crate) struct Requests {
    table: Mutex<Table>,
    /// Wakes the sweeper for a deadline earlier than the one it sleeps to.
    rearm: Notify,
}

impl Requests {
    pub(crate) fn new() -> Self {
        Requests {
            table: Mutex::new(Table {
                map: FxHashMap::default(),
                armed: None,
            }),
            rearm: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a request to `expect` that times out after `timeout`, under
    /// an id from `next_id` not in use (never 0). `None` if `refuse` says so,
    /// asked under the lock that [`clear`](Self::clear) takes.
    pub(crate) fn insert(
        &self,
        mut next_id: impl FnMut() -> u64,
        expect: &NodeId,
        command: u32,
        routed: bool,
        timeout: Duration,
        refuse: impl FnOnce() -> bool,
    ) -> Option<Awaiting<'_>> {
        let (tx, rx) = oneshot::channel();
        let deadline = Instant::now() + timeout;
        let (id, earlier, alone) = {
            let mut t = self.lock();
            if refuse() {
                return None;
            }
            let mut id = next_id();
            while id == 0 || t.map.contains_key(&id) {
                id = next_id();
            }
            let p = Pending {
                expect: expect.clone(),
                command,
                routed,
                tx,
                deadline,
                timeout,
            };
            t.map.insert(id, p);
            let earlier = t.armed.is_none_or(|at| deadline < at);
            if earlier {
                t.armed = Some(deadline);
            }
            (id, earlier, t.map.len() == 1)
        };
        if earlier {
            self.rearm.notify_one();
        }
        Some(Awaiting {
            requests: self,
            id,
            alone,
            rx: Some(rx),
        })
    }

    /// Takes request `id` out if `matches` says so.
    pub(crate) fn take_if(
        &self,
        id: u64,
        matches: impl FnOnce(&Pending) -> bool,
    ) -> Option<Pending> {
        let mut t = self.lock();
        if t.map.get(&id).is_some_and(matches) {
            t.map.remove(&id)
        } else {
            None
        }
    }

    /// Takes out every request `matches` says so of.
    pub(crate) fn take_where(&self, matches: impl FnMut(&Pending) -> bool) -> Vec<Pending> {
        take_matching(&mut self.lock().map, matches)
    }

    /// Drops every request: their callers see their answer channel closed.
    pub(crate) fn clear(&self) {
        self.lock().map.clear();
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Fails the requests whose deadline is at or before `now` with
    /// [`ConcernsError::Timeout`], and arms the next deadline.
    fn expire(&self, now: Instant) {
        let due = {
            let mut t = self.lock();
            let due = take_matching(&mut t.map, |p| p.deadline <= now);
            t.armed = t.map.values().map(|p| p.deadline).min();
            due
        };
        for p in due {
            let timeout = p.timeout;
            p.finish(Err(ConcernsError::Timeout(timeout)));
        }
    }

    /// Times requests out, for as long as it is polled.
    pub(crate) async fn sweep(&self) {
        loop {
            let armed = self.lock().armed;
            match armed {
                None => self.rearm.notified().await,
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => self.expire(Instant::now()),
                        () = self.rearm.notified() => {}
                    }
                }
            }
        }
    }
}

/// Takes the requests `matches` says so of out of `map`.
fn take_matching(
    map: &mut FxHashMap<u64, Pending>,
    mut matches: impl FnMut(&Pending) -> bool,
) -> Vec<Pending> {
    let ids: Vec<u64> = map
        .iter()
        .filter(|(_, p)| matches(p))
        .map(|(id, _)| *id)
        .collect();
    ids.iter().filter_map(|id| map.remove(id)).collect()
}

/// A caller's registered request. Dropped before its outcome arrived (an
/// error on the way, or the caller's own deadline or `select!` dropping the
/// request's future), it takes the request out of the map, which would
/// otherwise keep it for good if the peer never answers.
pub(crate) struct Awaiting<'a> {
    requests: &'a Requests,
    id: u64,
    /// No other request of this node was waiting when this one was made.
    alone: bool,
    /// Until the outcome arrived.
    rx: Option<oneshot::Receiver<Outcome>>,
}

impl Awaiting<'_> {
    /// The request id to send.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// True if no other request of this node was waiting when this one was
    /// made: a lone request, worth writing at once rather than batching.
    pub(crate) fn alone(&self) -> bool {
        self.alone
    }

    /// The answer, the sweeper's timeout, or `Shutdown` if the map was
    /// cleared.
    pub(crate) async fn outcome(mut self) -> Outcome {
        let Some(rx) = self.rx.as_mut() else {
            return Err(ConcernsError::Shutdown);
        };
        let r = rx.await.unwrap_or(Err(ConcernsError::Shutdown));
        // Whoever sent the outcome took the request out of the map.
        self.rx = None;
        r
    }
}

impl Drop for Awaiting<'_> {
    fn drop(&mut self) {
        if self.rx.is_some() {
            self.requests.lock().map.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn node(n: u8) -> NodeId {
        NodeId::from_bytes(vec![n; 8]).expect("a valid id")
    }

    /// A table with its sweeper running, and an id source.
    fn running() -> (Arc<Requests>, impl FnMut() -> u64 + Clone) {
        let requests = Arc::new(Requests::new());
        let sweeper = requests.clone();
        tokio::spawn(async move { sweeper.sweep().await });
        let ids = Arc::new(AtomicU64::new(1));
        (requests, move || ids.fetch_add(1, Ordering::Relaxed))
    }

    fn ask(r: &Requests, ids: impl FnMut() -> u64, timeout: Duration) -> Awaiting<'_> {
        r.insert(ids, &node(1), 1, false, timeout, || false)
            .expect("not refused")
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_times_out_at_its_deadline_not_before() {
        let (r, ids) = running();
        let start = Instant::now();
        let outcome = ask(&r, ids, 100 * MS).outcome().await;
        assert!(matches!(outcome, Err(ConcernsError::Timeout(t)) if t == 100 * MS));
        assert_eq!(Instant::now() - start, 100 * MS);
        assert_eq!(r.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_registered_later_wakes_the_sweeper() {
        let (r, ids) = running();
        let start = Instant::now();
        let slow = ask(&r, ids.clone(), 10_000 * MS);
        tokio::task::yield_now().await; // the sweeper sleeps to 10 s
        let fast = ask(&r, ids, 50 * MS);
        assert!(matches!(
            fast.outcome().await,
            Err(ConcernsError::Timeout(_))
        ));
        assert_eq!(Instant::now() - start, 50 * MS);
        assert_eq!(r.len(), 1, "the slow one still waits");
        assert!(matches!(
            slow.outcome().await,
            Err(ConcernsError::Timeout(_))
        ));
        assert_eq!(Instant::now() - start, 10_000 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn answered_and_dropped_requests_never_time_out() {
        let (r, ids) = running();
        let a = ask(&r, ids.clone(), 100 * MS);
        let b = ask(&r, ids.clone(), 100 * MS);
        let c = ask(&r, ids, 300 * MS);
        r.take_if(a.id(), |p| p.expect == node(1))
            .expect("waiting")
            .finish(Ok(Bytes::from("answer")));
        // Its caller stops waiting: it leaves the map at once (a left when
        // answered).
        drop(b);
        assert_eq!(r.len(), 1);
        let answer = a.outcome().await;
        assert!(matches!(answer, Ok(ref b) if b == "answer"), "{answer:?}");
        // The sweeper wakes at 100 ms to nothing due, then times out c.
        assert!(matches!(c.outcome().await, Err(ConcernsError::Timeout(_))));
        assert_eq!(r.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_request_is_not_registered_and_ids_are_unique() {
        let (r, _) = running();
        assert!(r.insert(|| 5, &node(1), 1, false, MS, || true).is_none());
        assert_eq!(r.len(), 0);
        // 0 and ids in use are skipped.
        let mut seq = [0u64, 7, 7, 8].into_iter();
        let first = ask(&r, || seq.next().unwrap_or(9), 10 * MS);
        let second = ask(&r, || seq.next().unwrap_or(9), 10 * MS);
        assert_eq!((first.id(), second.id()), (7, 8));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cleared_table_ends_its_requests_with_shutdown() {
        let (r, ids) = running();
        let waiting = ask(&r, ids, 100 * MS);
        r.clear();
        assert!(matches!(
            waiting.outcome().await,
            Err(ConcernsError::Shutdown)
        ));
    }
}
