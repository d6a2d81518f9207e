//! [`Both`]: two futures run by one task, each polled only when it was
//! woken.
//!
//! A connection's reader and writer run this way, on one task (see
//! [`crate::connection`]). `futures_util::future::join` would poll both
//! halves whenever either is woken (the writer's lanes, timers and socket
//! each time a frame arrives); `FuturesUnordered` polls only the woken one
//! but is built for any number of futures. This is the two-future case of
//! the latter: one flag and one waker per half.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// What one half's waker does: mark the half as woken, then wake the task
/// that runs both.
#[derive(Debug)]
struct Flag {
    /// Set by the half's waker, cleared just before the half is polled.
    woken: AtomicBool,
    /// The waker of the task running [`Both`], from its last poll.
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// One half: the future (`None` once it finished), its flag, and the waker
/// built on that flag (made once).
struct Half<F> {
    future: Option<Pin<Box<F>>>,
    flag: Arc<Flag>,
    waker: Waker,
}

impl<F: Future<Output = ()>> Half<F> {
    fn new(future: F) -> Self {
        // Woken to begin with: the first poll polls it.
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Half {
            future: Some(Box::pin(future)),
            waker: Waker::from(flag.clone()),
            flag,
        }
    }

    /// Polls the future if it was woken since its last poll; true once it
    /// has finished.
    fn poll(&mut self, task: &Waker) -> bool {
        let Some(future) = self.future.as_mut() else {
            return true;
        };
        self.flag.task.register(task);
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return false;
        }
        if future
            .as_mut()
            .poll(&mut Context::from_waker(&self.waker))
            .is_ready()
        {
            self.future = None;
            return true;
        }
        false
    }
}

/// Runs `a` and `b` to completion on the task that awaits it, polling each
/// only after its own waker was used (or on the first poll).
pub(crate) struct Both<A, B> {
    a: Half<A>,
    b: Half<B>,
    /// Which half goes first this time: they take turns, as tokio's
    /// `join!` rotates, since the two share the task's cooperative budget
    /// (a half that always went first and always had work could spend it
    /// all on every poll and leave the other none).
    b_first: bool,
}

impl<A: Future<Output = ()>, B: Future<Output = ()>> Both<A, B> {
    /// Both futures, neither polled yet.
    pub(crate) fn new(a: A, b: B) -> Self {
        Both {
            a: Half::new(a),
            b: Half::new(b),
            b_first: false,
        }
    }
}

impl<A: Future<Output = ()>, B: Future<Output = ()>> Future for Both<A, B> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Both halves are boxed: `Both` itself is Unpin.
        let this = self.get_mut();
        this.b_first = !this.b_first;
        let (a_done, b_done) = if this.b_first {
            let b_done = this.b.poll(cx.waker());
            (this.a.poll(cx.waker()), b_done)
        } else {
            let a_done = this.a.poll(cx.waker());
            (a_done, this.b.poll(cx.waker()))
        };
        if a_done && b_done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::Notify;

    /// `future`, counting every poll it gets.
    struct Counted<F> {
        future: Pin<Box<F>>,
        polls: Arc<AtomicUsize>,
    }

    impl<F: Future<Output = ()>> Future for Counted<F> {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            self.future.as_mut().poll(cx)
        }
    }

    /// A future that finishes after two notifications of `go`, and the
    /// count of its polls.
    fn twice(go: Arc<Notify>) -> (Counted<impl Future<Output = ()>>, Arc<AtomicUsize>) {
        let polls = Arc::new(AtomicUsize::new(0));
        let future = async move {
            go.notified().await;
            go.notified().await;
        };
        let counted = Counted {
            future: Box::pin(future),
            polls: polls.clone(),
        };
        (counted, polls)
    }

    fn counts(a: &AtomicUsize, b: &AtomicUsize) -> (usize, usize) {
        (a.load(Ordering::Relaxed), b.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn only_the_woken_half_is_polled_and_both_finish() {
        let (ga, gb) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let (a, pa) = twice(ga.clone());
        let (b, pb) = twice(gb.clone());
        let task = tokio::spawn(Both::new(a, b));
        tokio::task::yield_now().await;
        assert_eq!(counts(&pa, &pb), (1, 1));
        // Waking `a` polls `a` only (a join of both would poll `b` too).
        ga.notify_one();
        tokio::task::yield_now().await;
        assert_eq!(counts(&pa, &pb), (2, 1));
        gb.notify_one();
        tokio::task::yield_now().await;
        assert_eq!(counts(&pa, &pb), (2, 2));
        // `a` finishes; `b` still runs, and the task ends with it.
        ga.notify_one();
        tokio::task::yield_now().await;
        assert_eq!(counts(&pa, &pb), (3, 2));
        assert!(!task.is_finished());
        gb.notify_one();
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("both halves finish")
            .expect("no panic");
        assert_eq!(counts(&pa, &pb), (3, 3));
    }
}
