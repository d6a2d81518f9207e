//! What a served object implements (the `#[service]` macro writes it).

use async_trait::async_trait;
use bytes::Bytes;
use meshwork_sync::concerns::wire::NodeId;
use tokio_util::sync::CancellationToken;

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
    /// The method.
    pub method: String,
    /// Cancelled when the caller cancels, or the deadline passes.
    pub cancel: CancellationToken,
}

tokio::task_local! {
    pub(crate) static CALL: CallContext;
}

/// The context of the call being served on this task, if any. A long
/// method can watch `cancel` to stop early; the RPC layer also drops the
/// method's future when the call is cancelled or runs out of time.
pub fn call_context() -> Option<CallContext> {
    CALL.try_with(Clone::clone).ok()
}
