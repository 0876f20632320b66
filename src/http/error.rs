//! The one mapping from errors to HTTP: `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::engine::EngineError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed or a field is out of range.
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    /// 401: missing or wrong API key.
    #[error("invalid or missing API key: send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// 404: unknown route.
    #[error("{0}")]
    NotFound(String),
    /// 404: the `model` field names a model this server does not serve; `served` lists the
    /// accepted forms.
    #[error("the model `{requested}` does not exist; this server serves {served}")]
    ModelNotFound { requested: String, served: String },
    /// 405: the route exists with another method.
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// 408: the body did not arrive in time (`--body-read-timeout`).
    #[error("the request body did not arrive within {seconds} s (--body-read-timeout)")]
    BodyTimeout { seconds: f64 },
    /// 413: body over the limit.
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// 415: not `application/json`.
    #[error("expected `Content-Type: application/json`")]
    UnsupportedMediaType,
    /// 429: queue full; the client should retry after a moment.
    #[error("{0}")]
    Overloaded(String),
    /// 503: timed out (`--request-timeout`) or engine down.
    #[error("{message}")]
    Unavailable { message: String, code: &'static str },
    /// 500: details are logged, the client gets a generic message.
    #[error("internal server error")]
    Internal(String),
}

impl ApiError {
    pub fn bad(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: param.map(str::to_string),
            code: None,
        }
    }

    /// 503 while the server drains or when its grace period ends.
    pub fn shutting_down() -> Self {
        ApiError::Unavailable {
            message: "the server is shutting down".into(),
            code: "shutting_down",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) | ApiError::ModelNotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error object (also sent as an SSE event when a stream fails).
    pub fn body(&self) -> serde_json::Value {
        let (kind, param, code): (&str, Option<String>, Option<&str>) = match self {
            ApiError::BadRequest { param, code, .. } => {
                ("invalid_request_error", param.clone(), *code)
            }
            ApiError::Unauthorized => ("invalid_request_error", None, Some("invalid_api_key")),
            ApiError::NotFound(_) => ("invalid_request_error", None, Some("not_found")),
            ApiError::ModelNotFound { .. } => (
                "invalid_request_error",
                Some("model".into()),
                Some("model_not_found"),
            ),
            ApiError::MethodNotAllowed => {
                ("invalid_request_error", None, Some("method_not_allowed"))
            }
            ApiError::BodyTimeout { .. } => {
                ("invalid_request_error", None, Some("request_timeout"))
            }
            ApiError::PayloadTooLarge { .. } => {
                ("invalid_request_error", None, Some("payload_too_large"))
            }
            ApiError::UnsupportedMediaType => (
                "invalid_request_error",
                None,
                Some("unsupported_media_type"),
            ),
            ApiError::Overloaded(_) => ("rate_limit_error", None, Some("rate_limit_exceeded")),
            ApiError::Unavailable { code, .. } => ("server_error", None, Some(*code)),
            ApiError::Internal(_) => ("server_error", None, Some("internal_error")),
        };
        json!({"error": {"message": self.to_string(), "type": kind, "param": param, "code": code}})
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Invalid(v) => ApiError::BadRequest {
                message: v.to_string(),
                param: Some(v.param()),
                code: v.code(),
            },
            EngineError::Overloaded { .. } | EngineError::Displaced { .. } => {
                ApiError::Overloaded(e.to_string())
            }
            EngineError::Timeout { .. } => ApiError::Unavailable {
                message: e.to_string(),
                code: "request_timeout",
            },
            EngineError::ShuttingDown => ApiError::shutting_down(),
            EngineError::Unavailable => ApiError::Unavailable {
                message: e.to_string(),
                code: "service_unavailable",
            },
            EngineError::Internal(detail) => ApiError::Internal(detail),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), error = ?self, "request failed");
        }
        let mut resp = (status, axum::Json(self.body())).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}
