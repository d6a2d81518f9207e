//! Bytes of request payloads a concern holds (waiting or running), per
//! sender and in all. Queue lengths and concurrency bound how many requests
//! a concern holds, not how large they are: without this, peers sending
//! requests of the largest frame size (16 MiB) to a slow concern could make
//! a node hold gigabytes. Past the budget a request is answered
//! "overloaded" at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use meshwork_peers::wire::NodeId;

/// Payloads smaller than this are not counted: their number is bounded
/// already, and the common small request takes no lock for it.
pub(crate) const COUNTED_FROM: usize = 4096;

/// The byte budget of one concern's requests.
#[derive(Debug)]
pub(crate) struct ByteBudget {
    per_sender: usize,
    total: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    held: usize,
    by_sender: HashMap<NodeId, usize>,
}

/// Over budget: the sender's share or the concern's total is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OverBudget;

impl ByteBudget {
    /// At most `per_sender` bytes from one sender and `total` in all.
    pub(crate) fn new(per_sender: usize, total: usize) -> Arc<Self> {
        Arc::new(ByteBudget {
            per_sender,
            total,
            state: Mutex::new(State::default()),
        })
    }

    /// Room for a payload of `size` bytes from `from`, held until the
    /// returned guard drops (`None`: a small payload, not counted). A
    /// sender holding nothing may always hold one request, and a concern
    /// holding nothing may always take one, whatever their size: a frame
    /// is at most the transport's limit anyway.
    pub(crate) fn admit(
        self: &Arc<Self>,
        from: &NodeId,
        size: usize,
    ) -> Result<Option<Held>, OverBudget> {
        if size < COUNTED_FROM {
            return Ok(None);
        }
        let mut st = crate::manager::lock(&self.state);
        let theirs = st.by_sender.get(from).copied().unwrap_or(0);
        let sender_full = theirs > 0 && theirs + size > self.per_sender;
        let all_full = st.held > 0 && st.held + size > self.total;
        if sender_full || all_full {
            return Err(OverBudget);
        }
        st.held += size;
        *st.by_sender.entry(from.clone()).or_default() += size;
        Ok(Some(Held {
            budget: Arc::clone(self),
            from: from.clone(),
            size,
        }))
    }

    /// Bytes held now.
    pub(crate) fn held(&self) -> usize {
        crate::manager::lock(&self.state).held
    }
}

/// A request's share of its concern's budget, given back when dropped
/// (with the request, however it ends).
#[derive(Debug)]
pub(crate) struct Held {
    budget: Arc<ByteBudget>,
    from: NodeId,
    size: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut st = crate::manager::lock(&self.budget.state);
        st.held -= self.size;
        if let Some(n) = st.by_sender.get_mut(&self.from) {
            *n -= self.size;
            if *n == 0 {
                st.by_sender.remove(&self.from);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId::from_bytes(vec![n; 32]).unwrap()
    }

    #[test]
    fn small_payloads_are_not_counted() {
        let b = ByteBudget::new(COUNTED_FROM, COUNTED_FROM);
        let held: Vec<_> = (0..100)
            .map(|_| b.admit(&id(1), COUNTED_FROM - 1).unwrap())
            .collect();
        assert!(held.iter().all(Option::is_none));
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn a_sender_gets_its_share_and_others_still_get_in() {
        let mb = 1 << 20;
        let b = ByteBudget::new(4 * mb, 10 * mb);
        let hog: Vec<_> = (0..4).map(|_| b.admit(&id(1), mb).unwrap()).collect();
        assert_eq!(b.admit(&id(1), mb).unwrap_err(), OverBudget, "its share");
        let other = b.admit(&id(2), 2 * mb).unwrap();
        assert_eq!(b.held(), 6 * mb);
        // A sender holding nothing gets one request in whatever its size,
        // while the total has room for it.
        let big = b.admit(&id(3), 4 * mb).unwrap();
        assert_eq!(b.admit(&id(4), mb).unwrap_err(), OverBudget, "the total");
        drop(hog);
        assert_eq!(b.held(), 6 * mb);
        assert!(b.admit(&id(1), 4 * mb).unwrap().is_some(), "room again");
        drop((other, big));
    }

    #[test]
    fn an_empty_concern_takes_one_request_of_any_size() {
        let b = ByteBudget::new(1 << 20, 1 << 20);
        let huge = b.admit(&id(1), 16 << 20).unwrap();
        assert!(huge.is_some());
        assert_eq!(b.admit(&id(2), 1 << 20).unwrap_err(), OverBudget);
        drop(huge);
        assert_eq!(b.held(), 0);
        assert!(b.admit(&id(2), 1 << 20).unwrap().is_some());
    }
}
