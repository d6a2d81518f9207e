//! The built-in demo service, `Demo`: what `meshwork node --serve-demo
//! [NAME]` serves (under `demo` by default) and `meshwork demo` calls.
//!
//! | method | arguments (JSON array) | result |
//! |---|---|---|
//! | `echo` | `[text]` | `text` |
//! | `add` | `[n]` (i64) | the running total of this provider's counter after adding `n` (saturating) |
//! | `fail` | `[message]` | always the application error [`DemoError::Refused`], `{"refused":{"message":..}}` in JSON |
//! | `sleep` | `[ms]` | after `ms` milliseconds, the ms slept; stops early (and is counted `cancelled`) when the call is cancelled or out of time |
//! | `whoami` | `[]` | this node's id, hex; `#[idempotent]`: a typed client retries it on another provider after a timeout |
//!
//! From the admin API: `POST /rpc/demo/echo` with the body `["hi"]`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use meshwork::rpc::call_context;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// The default name `--serve-demo` serves the demo service under.
pub(crate) const DEFAULT_NAME: &str = "demo";

/// The application error of [`Demo::fail`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DemoError {
    /// `fail` refuses, always, with the caller's message.
    Refused {
        /// The message the caller passed.
        message: String,
    },
}

impl std::fmt::Display for DemoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DemoError::Refused { message } => write!(f, "refused: {message}"),
        }
    }
}

/// The demo service: an echo, a counter, a method that always fails with a
/// typed error, a sleep that honours cancellation, and who serves it.
#[meshwork::service]
pub(crate) trait Demo {
    /// Returns `text`.
    async fn echo(&self, text: String) -> String;
    /// Adds `n` to this provider's counter and returns the new total.
    async fn add(&self, n: i64) -> i64;
    /// Fails with [`DemoError::Refused`] carrying `message`.
    async fn fail(&self, message: String) -> Result<(), DemoError>;
    /// Sleeps `ms` milliseconds (less if the call is cancelled or runs out
    /// of time) and returns the milliseconds slept.
    async fn sleep(&self, ms: u64) -> u64;
    /// The id of the node serving it, hex.
    #[idempotent]
    async fn whoami(&self) -> String;
}

/// The implementation a node serves.
#[derive(Debug)]
pub(crate) struct DemoService {
    node_id: String,
    total: AtomicI64,
}

impl DemoService {
    /// The service of the node with this id (hex), counter at 0.
    pub(crate) fn new(node_id: String) -> Self {
        DemoService {
            node_id,
            total: AtomicI64::new(0),
        }
    }

    /// Wrapped for `rpc.serve`.
    pub(crate) fn server(node_id: String) -> DemoServer<DemoService> {
        DemoServer::new(DemoService::new(node_id))
    }
}

impl Demo for DemoService {
    async fn echo(&self, text: String) -> String {
        text
    }

    async fn add(&self, n: i64) -> i64 {
        let update = |t: i64| Some(t.saturating_add(n));
        // The closure never refuses, so this is always `Ok`.
        let before = match self
            .total
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, update)
        {
            Ok(t) | Err(t) => t,
        };
        before.saturating_add(n)
    }

    async fn fail(&self, message: String) -> Result<(), DemoError> {
        Err(DemoError::Refused { message })
    }

    async fn sleep(&self, ms: u64) -> u64 {
        let started = Instant::now();
        let nap = tokio::time::sleep(Duration::from_millis(ms));
        // The RPC layer also drops this future when the call is cancelled
        // or runs out of time; watching the token stops it on our terms.
        match call_context() {
            Some(cx) => {
                tokio::select! {
                    () = nap => {}
                    () = cx.cancel.cancelled() => {}
                }
            }
            None => nap.await,
        }
        u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn whoami(&self) -> String {
        self.node_id.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn methods_called_directly() {
        let s = DemoService::new("ab".repeat(32));
        assert_eq!(s.echo("hi".into()).await, "hi");
        assert_eq!(s.add(2).await, 2);
        assert_eq!(s.add(-5).await, -3);
        assert_eq!(s.add(i64::MAX).await, i64::MAX - 3);
        assert_eq!(s.add(10).await, i64::MAX, "saturates");
        assert_eq!(
            s.fail("no".into()).await,
            Err(DemoError::Refused {
                message: "no".into()
            })
        );
        assert_eq!(s.whoami().await, "ab".repeat(32));
        assert!(s.sleep(5).await >= 5);
    }

    #[test]
    fn the_error_in_json_is_tagged_in_snake_case() {
        let e = DemoError::Refused {
            message: "boom".into(),
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"refused": {"message": "boom"}})
        );
        assert_eq!(e.to_string(), "refused: boom");
    }
}
