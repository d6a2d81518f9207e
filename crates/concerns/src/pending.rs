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
//! deadline in one pass over the waiting requests (answered ones are
//! waiting no more, so at most one wake-up per timeout period finds
//! nothing).
//!
//! A request's outcome is handed over in its own entry of the table, not
//! through a channel: whoever ends the request (its answer, the sweeper, its
//! neighbour leaving) stores the outcome there and wakes the caller, under
//! the lock every one of them takes anyway; the caller takes it out. A
//! oneshot channel per request (an allocation, its atomics, and tokio's
//! cooperative budget on every poll of its receiver) was about 7% of the
//! instructions of a request between two nodes.

use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use meshwork_peers::wire::NodeId;
use rustc_hash::FxHashMap;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::ConcernsError;

/// How a request ends: its answer, or why there is none.
pub(crate) type Outcome = Result<Bytes, ConcernsError>;

/// A request of this node, from when it is sent until its caller has
/// taken its outcome.
pub(crate) struct Pending {
    /// Who must answer (a reply from anyone else is not for this request).
    pub(crate) expect: NodeId,
    /// The command asked (an answer for another is not for this request).
    pub(crate) command: u32,
    /// Whether it was sent routed: then only a routed answer counts (and a
    /// routed "unreachable" from an intermediate node); else only one on a
    /// direct connection from `expect`.
    pub(crate) routed: bool,
    deadline: Instant,
    timeout: Duration,
    state: State,
}

/// Where a request is.
enum State {
    /// No outcome yet; the caller's task to wake when it comes, once the
    /// caller has looked.
    Waiting(Option<Waker>),
    /// Ended: the outcome, for the caller to take.
    Done(Outcome),
}

impl Pending {
    fn waiting(&self) -> bool {
        matches!(self.state, State::Waiting(_))
    }

    /// Stores `outcome`; the waker to wake once the table's lock is let go.
    fn end(&mut self, outcome: Outcome) -> Option<Waker> {
        match std::mem::replace(&mut self.state, State::Done(outcome)) {
            State::Waiting(waker) => waker,
            State::Done(_) => None,
        }
    }
}

struct Table {
    /// Keyed by our own request ids: FxHash, not SipHash (a peer cannot
    /// choose which keys go in, so there is nothing to flood).
    map: FxHashMap<u64, Pending>,
    /// The deadline the sweeper sleeps until (`None`: it waits for one).
    armed: Option<Instant>,
}

/// The requests of this node, by request id.
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
    /// an id from `next_id` not in use (never 0), with the clock reading its
    /// deadline counts from: the caller dates the request's write with it
    /// rather than read the clock again. `None` if `refuse` says so, asked
    /// under the lock that [`clear`](Self::clear) takes.
    pub(crate) fn insert(
        &self,
        mut next_id: impl FnMut() -> u64,
        expect: &NodeId,
        command: u32,
        routed: bool,
        timeout: Duration,
        refuse: impl FnOnce() -> bool,
    ) -> Option<(Awaiting<'_>, Instant)> {
        let now = Instant::now();
        // `Duration::MAX` means no deadline to speak of, not a panic.
        let deadline = now + timeout.min(meshwork_peers::FOREVER);
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
                deadline,
                timeout,
                state: State::Waiting(None),
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
        let waiting = Awaiting {
            requests: self,
            id,
            alone,
            taken: false,
        };
        Some((waiting, now))
    }

    /// Ends request `id` with `outcome` if it still waits and `matches`
    /// says so; else gives `outcome` back.
    pub(crate) fn finish_if(
        &self,
        id: u64,
        matches: impl FnOnce(&Pending) -> bool,
        outcome: Outcome,
    ) -> Result<(), Outcome> {
        let waker = {
            let mut t = self.lock();
            match t.map.get_mut(&id) {
                Some(p) if p.waiting() && matches(p) => p.end(outcome),
                _ => return Err(outcome),
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Ends every waiting request `matches` says so of, each with the
    /// outcome `outcome` makes.
    pub(crate) fn finish_where(
        &self,
        mut matches: impl FnMut(&Pending) -> bool,
        outcome: impl Fn() -> Outcome,
    ) {
        let wakers: Vec<Waker> = {
            let mut t = self.lock();
            t.map
                .values_mut()
                .filter(|p| p.waiting() && matches(p))
                .filter_map(|p| p.end(outcome()))
                .collect()
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Drops every request: their callers see [`ConcernsError::Shutdown`].
    pub(crate) fn clear(&self) {
        let gone = std::mem::take(&mut self.lock().map);
        for p in gone.into_values() {
            if let State::Waiting(Some(w)) = p.state {
                w.wake();
            }
        }
    }

    /// The requests still waiting for their outcome.
    pub(crate) fn len(&self) -> usize {
        self.lock().map.values().filter(|p| p.waiting()).count()
    }

    /// Fails the requests whose deadline is at or before `now` with
    /// [`ConcernsError::Timeout`], and arms the next deadline.
    fn expire(&self, now: Instant) {
        let wakers: Vec<Waker> = {
            let mut t = self.lock();
            let wakers = t
                .map
                .values_mut()
                .filter(|p| p.waiting() && p.deadline <= now)
                .filter_map(|p| {
                    let timeout = p.timeout;
                    p.end(Err(ConcernsError::Timeout(timeout)))
                })
                .collect();
            t.armed = t
                .map
                .values()
                .filter(|p| p.waiting())
                .map(|p| p.deadline)
                .min();
            wakers
        };
        wakers.into_iter().for_each(Waker::wake);
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

    /// Request `id`'s outcome if it has one (taking the request out), else
    /// `cx`'s task is woken when it does.
    fn poll_outcome(&self, id: u64, cx: &mut Context<'_>) -> Poll<Outcome> {
        let mut t = self.lock();
        match t.map.get_mut(&id) {
            // Cleared: the layer shuts down.
            None => return Poll::Ready(Err(ConcernsError::Shutdown)),
            Some(Pending {
                state: State::Waiting(waker),
                ..
            }) => {
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
            Some(_) => {}
        }
        match t.map.remove(&id).map(|p| p.state) {
            Some(State::Done(outcome)) => Poll::Ready(outcome),
            _ => Poll::Ready(Err(ConcernsError::Shutdown)),
        }
    }
}

/// A caller's registered request. Dropped before its outcome was taken (an
/// error on the way, or the caller's own deadline or `select!` dropping the
/// request's future), it takes the request out of the table, which would
/// otherwise keep it for good if the peer never answers.
pub(crate) struct Awaiting<'a> {
    requests: &'a Requests,
    id: u64,
    /// No other request of this node was waiting when this one was made.
    alone: bool,
    /// Its outcome was taken (and the request with it).
    taken: bool,
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

    /// The answer, the sweeper's timeout, or `Shutdown` if the table was
    /// cleared.
    pub(crate) async fn outcome(mut self) -> Outcome {
        let (requests, id) = (self.requests, self.id);
        let r = std::future::poll_fn(|cx| requests.poll_outcome(id, cx)).await;
        // Taken out with its outcome.
        self.taken = true;
        r
    }
}

impl Drop for Awaiting<'_> {
    fn drop(&mut self) {
        if !self.taken {
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
            .0
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
        r.finish_if(a.id(), |p| p.expect == node(1), Ok(Bytes::from("answer")))
            .expect("waiting");
        // A second answer finds it ended.
        assert!(r.finish_if(a.id(), |_| true, Ok(Bytes::new())).is_err());
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

    /// A caller already waiting (its task parked on the outcome) is woken
    /// by whatever ends its request: an answer, a neighbour leaving, or a
    /// shutdown clearing the table.
    #[tokio::test(start_paused = true)]
    async fn a_parked_caller_is_woken_by_the_end_of_its_request() {
        let (r, ids) = running();
        for end in 0..3 {
            let (r2, ids) = (r.clone(), ids.clone());
            let (tx, rx) = tokio::sync::oneshot::channel();
            let caller = tokio::spawn(async move {
                let w = ask(&r2, ids, 10_000 * MS);
                let _ = tx.send(w.id());
                w.outcome().await
            });
            let id = rx.await.expect("the caller's id");
            tokio::task::yield_now().await; // it parks on its outcome
            match end {
                0 => r
                    .finish_if(id, |_| true, Ok(Bytes::from("answer")))
                    .expect("waiting"),
                1 => r.finish_where(
                    |p| p.expect == node(1),
                    || Err(ConcernsError::ConnectionLost(node(1))),
                ),
                _ => r.clear(),
            }
            let outcome = caller.await.expect("the caller ran");
            match end {
                0 => assert!(matches!(outcome, Ok(ref b) if b == "answer"), "{outcome:?}"),
                1 => assert!(matches!(outcome, Err(ConcernsError::ConnectionLost(_)))),
                _ => assert!(matches!(outcome, Err(ConcernsError::Shutdown))),
            }
            assert_eq!(r.len(), 0);
        }
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
