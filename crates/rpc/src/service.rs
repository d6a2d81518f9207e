//! What a served object implements (the `#[service]` macro writes it).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use async_trait::async_trait;
use bytes::Bytes;
use meshwork_sync::concerns::wire::NodeId;

use tokio::sync::Notify;

use crate::Codec;

/// How a call failed on the serving side, before or besides the method's
/// own result.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServiceError {
    /// The service has no such method.
    UnknownMethod,
    /// The arguments could not be decoded.
    Decode(String),
    /// The method returned its application error, encoded in the call's
    /// codec.
    Application(Bytes),
    /// Something else failed.
    Internal(String),
}

/// A service as the RPC layer serves it: a name-keyed set of methods that
/// take encoded arguments and return an encoded result. The
/// `#[service]` macro generates one for a trait (`FooServer`); write one
/// by hand for dynamic services.
#[async_trait]
pub trait Service: Send + Sync + 'static {
    /// The method names.
    fn methods(&self) -> Vec<&'static str>;

    /// The version served (callers built for another one are refused).
    fn version(&self) -> u32 {
        1
    }

    /// Runs `method` with `args` encoded in `codec`; the result in the same
    /// codec.
    async fn call(&self, method: &str, codec: Codec, args: Bytes) -> Result<Bytes, ServiceError>;

    /// True if the RPC layer is to run calls with
    /// [`call_framed`](Self::call_framed) (asked once, when the service is
    /// served). What `#[service]` writes; not part of the stable API.
    #[doc(hidden)]
    fn frames_results(&self) -> bool {
        false
    }

    /// [`call`](Self::call) with a result returned as the RPC layer sends
    /// it: the whole answer (`RpcMessage { outcome { result } }`), encoded
    /// ([`Codec::encode_framed`]), so the result is encoded once behind its
    /// header instead of encoded and then copied behind it. Errors as
    /// `call`'s. What `#[service]` writes; not part of the stable API.
    #[doc(hidden)]
    async fn call_framed(
        &self,
        method: &str,
        codec: Codec,
        args: Bytes,
    ) -> Result<Bytes, ServiceError> {
        self.call(method, codec, args)
            .await
            .map(|ok| crate::rpc::frame_ok(&ok))
    }
}

/// A generated typed client (`FooClient`): how the RPC layer builds one.
pub trait ServiceClient: Sized {
    /// The service version it was built for.
    const VERSION: u32;

    /// Wraps an untyped client of a service.
    fn from_client(client: crate::Client) -> Self;
}

/// What a method being served can learn about its call, from
/// [`call_context`].
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The calling node.
    pub caller: NodeId,
    /// The method (its name as the service lists it).
    pub method: &'static str,
    /// Cancelled when the caller cancels, or the deadline passes.
    pub cancel: CallCancel,
}

/// Tells a method being served that its call is over: the caller
/// cancelled it, its deadline passed, or the node is shutting down.
/// Cheap to clone and to check (an atomic flag; no lock).
///
/// Used to be tokio-util's `CancellationToken`, whose clone, drop and check
/// each take a lock: one per call made them about 5% of a served call's CPU.
#[derive(Debug, Clone, Default)]
pub struct CallCancel(Arc<CancelState>);

#[derive(Debug, Default)]
struct CancelState {
    cancelled: AtomicBool,
    notify: Notify,
}

impl CallCancel {
    /// A signal not yet given.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// True once the call is over.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::Acquire)
    }

    /// Completes once the call is over (at once if it already is).
    pub async fn cancelled(&self) {
        loop {
            // Made before the check: `notify_waiters` wakes every
            // `Notified` that exists when it runs, polled or not.
            let notified = self.0.notify.notified();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }

    /// Gives the signal (once; later calls do nothing).
    pub(crate) fn cancel(&self) {
        if !self.0.cancelled.swap(true, Ordering::AcqRel) {
            self.0.notify.notify_waiters();
        }
    }
}

/// The call whose method is being polled on this thread, if any.
#[derive(Debug)]
struct Current {
    caller: NodeId,
    method: &'static str,
    /// Made when first wanted: by [`call_context`], or by the server once
    /// the call waits (most calls answer in their first poll, and never
    /// need one).
    cancel: Option<CallCancel>,
}

impl Current {
    fn cancel(&mut self) -> &CallCancel {
        self.cancel.get_or_insert_with(CallCancel::new)
    }
}

thread_local! {
    static CURRENT: Cell<Option<Current>> = const { Cell::new(None) };
}

/// The context of the call being served on this task, if any. A long
/// method can watch `cancel` to stop early; the RPC layer also drops the
/// method's future when the call is cancelled or runs out of time.
pub fn call_context() -> Option<CallContext> {
    // `try_with`: `None` rather than a panic in a thread's last moments.
    CURRENT
        .try_with(|c| {
            let mut current = c.take()?;
            let cx = CallContext {
                caller: current.caller.clone(),
                method: current.method,
                cancel: current.cancel().clone(),
            };
            c.set(Some(current));
            Some(cx)
        })
        .ok()
        .flatten()
}

/// A served method's future and its call, which [`call_context`] tells
/// while the future is polled or dropped (what a tokio task-local does,
/// with the call's cancel signal made only when wanted: an allocation
/// fewer for each call that answers at once).
pub(crate) struct InCall<F> {
    current: Option<Current>,
    /// `None` once finished (dropped within the call).
    fut: Option<F>,
}

impl<F: Future + Unpin> InCall<F> {
    pub(crate) fn new(caller: NodeId, method: &'static str, fut: F) -> Self {
        InCall {
            current: Some(Current {
                caller,
                method,
                cancel: None,
            }),
            fut: Some(fut),
        }
    }

    /// The call's cancel signal (made now if nobody asked for it yet).
    pub(crate) fn cancel(&mut self) -> CallCancel {
        match &mut self.current {
            Some(current) => current.cancel().clone(),
            // Only while polled, when nobody holds this.
            None => CallCancel::new(),
        }
    }
}

/// Puts a call in [`CURRENT`], and the one before back when dropped (also
/// when the method panics). Enters nothing once the thread's locals are
/// gone (a future dropped as its thread ends), as tokio's task-locals.
struct Entered<'a> {
    slot: &'a mut Option<Current>,
    /// The call before, if the slot's was put in.
    before: Option<Option<Current>>,
}

impl<'a> Entered<'a> {
    fn new(slot: &'a mut Option<Current>) -> Self {
        let before = CURRENT.try_with(|c| c.replace(slot.take())).ok();
        Entered { slot, before }
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        if let Some(before) = self.before.take() {
            if let Ok(current) = CURRENT.try_with(|c| c.replace(before)) {
                *self.slot = current;
            }
        }
    }
}

impl<F: Future + Unpin> Future for InCall<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let _in = Entered::new(&mut this.current);
        let Some(fut) = &mut this.fut else {
            return Poll::Pending;
        };
        let r = Pin::new(fut).poll(cx);
        if r.is_ready() {
            this.fut = None;
        }
        r
    }
}

impl<F> Drop for InCall<F> {
    fn drop(&mut self) {
        if self.fut.is_some() {
            let _in = Entered::new(&mut self.current);
            self.fut = None;
        }
    }
}

impl<F> std::fmt::Debug for InCall<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InCall")
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::CallCancel;

    #[tokio::test(start_paused = true)]
    async fn a_cancel_reaches_every_clone_and_every_waiter() {
        let cancel = CallCancel::new();
        assert!(!cancel.is_cancelled());
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let c = cancel.clone();
                tokio::spawn(async move { c.cancelled().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(waiters.iter().all(|w| !w.is_finished()));
        // Not yet: waiting times out.
        let early = tokio::time::timeout(Duration::from_millis(10), cancel.cancelled()).await;
        assert!(early.is_err());

        cancel.clone().cancel();
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(1), w)
                .await
                .expect("a waiter was not woken")
                .unwrap();
        }
        assert!(cancel.is_cancelled());
        // Already given: at once, and again.
        cancel.cancelled().await;
        cancel.cancel();
        assert!(cancel.is_cancelled());
    }
}
