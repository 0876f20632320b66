//! Engine errors. The HTTP layer maps each variant to a status once (`http::error`).

use super::validate::ValidationError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// 400: a field is out of range or inconsistent; the error names it.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// 429: the queue is full.
    #[error("the server is at capacity ({queued} requests queued); retry later")]
    Overloaded { queued: usize },
    /// 429: the queue was full and a request of a higher `priority` took this one's place.
    #[error("the server is at capacity ({queued} requests queued) and a request of a higher priority took this one's place; retry later")]
    Displaced { queued: usize },
    /// 408-style timeout, reported as 503 per `--request-timeout`.
    #[error("request timed out after {seconds:.1} s (--request-timeout)")]
    Timeout { seconds: f64 },
    /// 503: the server's shutdown grace period ended before the request did.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// 503: the engine is shutting down or has stopped.
    #[error("the engine is not running")]
    Unavailable,
    /// 500: the model failed; details are logged, not returned.
    #[error("internal error: {0}")]
    Internal(String),
}
