use std::time::Duration;

/// The application error of a method that cannot fail: no value exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NoError {}

impl std::fmt::Display for NoError {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {}
    }
}

/// Errors of a call (and of the RPC layer), with the method's own error
/// type `E` in [`Application`](RpcError::Application): a method returning
/// `Result<T, E>` gives its caller `Result<T, RpcError<E>>`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError<E = NoError> {
    /// No node serves this service (now, as far as the registry shows).
    /// The message says what a first call made too early should do.
    #[error(
        "no provider for service {0:?} is listed here (one served on another node a moment ago \
         is listed once its registry entry arrives: wait for it with wait_for_provider)"
    )]
    NoProvider(String),
    /// The deadline passed before an answer came.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The call was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The provider does not serve this service (any more).
    #[error("unknown service {0:?}")]
    UnknownService(String),
    /// The service has no such method.
    #[error("service {service:?} has no method {method:?}")]
    UnknownMethod {
        /// The service.
        service: String,
        /// The method.
        method: String,
    },
    /// The provider serves another version of the service.
    #[error("service {service:?} is version {served} there, the client wants {wanted}")]
    VersionMismatch {
        /// The service.
        service: String,
        /// The version the client was built for.
        wanted: u32,
        /// The version served.
        served: u32,
    },
    /// The provider is at its concurrency limit for this service.
    #[error("service {0:?} is overloaded")]
    Overloaded(String),
    /// The call could not be delivered (every provider tried was gone).
    #[error("disconnected: {0}")]
    Disconnected(String),
    /// Arguments or outcome could not be encoded or decoded.
    #[error("decode: {0}")]
    Decode(String),
    /// The handler failed without an application error (e.g. it panicked).
    #[error("internal error in the provider: {0}")]
    Internal(String),
    /// The method's own error.
    #[error("application error: {0:?}")]
    Application(E),
    /// The RPC layer is shut down, or the service name is invalid.
    #[error("{0}")]
    Local(String),
}

impl<E> RpcError<E> {
    /// The same error with another application error type (for every
    /// variant but [`Application`](RpcError::Application), which `f` maps).
    pub fn map_app<F>(self, f: impl FnOnce(E) -> F) -> RpcError<F> {
        match self.split_app() {
            Ok(e) => e,
            Err(app) => RpcError::Application(f(app)),
        }
    }

    /// `Err(e)` for an [`Application`](RpcError::Application) error `e`;
    /// any other error as it is, with any application error type.
    pub fn split_app<F>(self) -> Result<RpcError<F>, E> {
        Ok(match self {
            RpcError::NoProvider(s) => RpcError::NoProvider(s),
            RpcError::Timeout(d) => RpcError::Timeout(d),
            RpcError::Cancelled => RpcError::Cancelled,
            RpcError::UnknownService(s) => RpcError::UnknownService(s),
            RpcError::UnknownMethod { service, method } => {
                RpcError::UnknownMethod { service, method }
            }
            RpcError::VersionMismatch {
                service,
                wanted,
                served,
            } => RpcError::VersionMismatch {
                service,
                wanted,
                served,
            },
            RpcError::Overloaded(s) => RpcError::Overloaded(s),
            RpcError::Disconnected(s) => RpcError::Disconnected(s),
            RpcError::Decode(s) => RpcError::Decode(s),
            RpcError::Internal(s) => RpcError::Internal(s),
            RpcError::Application(e) => return Err(e),
            RpcError::Local(s) => RpcError::Local(s),
        })
    }

    /// A short stable label, e.g. `"no_provider"` (for metrics and the
    /// admin API).
    pub fn label(&self) -> &'static str {
        match self {
            RpcError::NoProvider(_) => "no_provider",
            RpcError::Timeout(_) => "timeout",
            RpcError::Cancelled => "cancelled",
            RpcError::UnknownService(_) => "unknown_service",
            RpcError::UnknownMethod { .. } => "unknown_method",
            RpcError::VersionMismatch { .. } => "version_mismatch",
            RpcError::Overloaded(_) => "overloaded",
            RpcError::Disconnected(_) => "disconnected",
            RpcError::Decode(_) => "decode",
            RpcError::Internal(_) => "internal",
            RpcError::Application(_) => "application",
            RpcError::Local(_) => "local",
        }
    }
}
