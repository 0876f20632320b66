//! A JSON body extractor whose every rejection is an OpenAI error naming the field.

use std::time::{Duration, Instant};

use axum::body::BodyDataStream;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::shutdown::Shutdown;
use crate::engine::{Engine, ValidationSlot};

/// A JSON request body, read in full under the body policy, not yet parsed: parsing waits
/// for a validation slot (see `Engine::validation_slot`), so that the memory it takes is
/// bounded by the number of slots rather than of connections.
pub struct JsonBody {
    pub bytes: Vec<u8>,
    /// When the handler started reading it: the request's clock starts here.
    pub arrived: Instant,
}

/// A parsed body, with the validation slot it was parsed under (hold it while validating)
/// and the request's deadline.
pub struct Parsed<T> {
    pub req: T,
    pub slot: ValidationSlot,
    pub deadline: Instant,
}

impl JsonBody {
    /// Waits for a validation slot (up to the request's deadline, `--request-timeout` from
    /// its arrival), then parses; the raw bytes are freed once parsed. Parsing and
    /// tokenizing take memory and CPU in proportion to the body: only a bounded number of
    /// requests do them at once, the others wait here with their bytes.
    pub async fn parse_in_slot<T: DeserializeOwned>(
        self,
        engine: &Engine,
    ) -> Result<Parsed<T>, ApiError> {
        let deadline = self.arrived + engine.validator().limits().request_timeout;
        let slot = engine.validation_slot(deadline).await?;
        let req = parse(&self.bytes)?;
        Ok(Parsed {
            req,
            slot,
            deadline,
        })
    }
}

/// Set by the router from the configuration.
#[derive(Clone)]
pub struct BodyPolicy {
    /// `--max-body-bytes` (413 above).
    pub limit: usize,
    /// `--body-read-timeout`, capped by `--request-timeout` (408 past it).
    pub read_timeout: Duration,
    /// A body still arriving when the server starts to drain is refused (503).
    pub shutdown: Shutdown,
}

impl Default for BodyPolicy {
    fn default() -> Self {
        Self {
            limit: 1 << 20,
            read_timeout: Duration::from_secs(30),
            shutdown: Shutdown::never(),
        }
    }
}

/// How much of an oversized body is read and dropped, in multiples of the limit.
const DRAIN_FACTOR: usize = 32;

/// Reads and drops up to `most` bytes of the body, keeping none.
async fn drain(req: Request, most: usize) {
    let _ = drain_rest(&mut req.into_body().into_data_stream(), 0, most).await;
}

/// Reads and drops what is left of `body` while no more than `most` bytes have come (`seen`
/// already have); the first read error, if one comes first.
async fn drain_rest(
    body: &mut BodyDataStream,
    mut seen: usize,
    most: usize,
) -> Result<(), axum::Error> {
    while seen <= most {
        match body.next().await {
            Some(chunk) => seen += chunk?.len(),
            None => break,
        }
    }
    Ok(())
}

/// Reads the body up to `limit` bytes. An oversized body is still read (and dropped) up to
/// `DRAIN_FACTOR` times the limit, so that an ordinary client that sends it all receives the
/// 413 instead of a broken pipe; beyond that the connection is simply dropped.
async fn read_limited(req: Request, limit: usize) -> Result<Vec<u8>, ApiError> {
    let unreadable =
        |e: axum::Error| ApiError::bad(None, format!("cannot read the request body: {e}"));
    let mut body = req.into_body().into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(unreadable)?;
        if buf.len() + chunk.len() > limit {
            let seen = buf.len() + chunk.len();
            drain_rest(&mut body, seen, limit.saturating_mul(DRAIN_FACTOR))
                .await
                .map_err(unreadable)?;
            return Err(ApiError::PayloadTooLarge { limit });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let arrived = Instant::now();
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| {
                let m = m.trim();
                m.eq_ignore_ascii_case("application/json") || m.ends_with("+json")
            });
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let policy = req
            .extensions()
            .get::<BodyPolicy>()
            .cloned()
            .unwrap_or_default();
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > policy.limit as u64) {
            // Refused before any byte is read: a client that asked `Expect: 100-continue`
            // never gets its go-ahead (hyper sends it only when the body is read); one that
            // sends anyway has what it sends drained in the background, so that it reads
            // the 413 rather than a broken pipe.
            if !expects_continue(&req) {
                let most = policy.limit.saturating_mul(DRAIN_FACTOR);
                tokio::spawn(tokio::time::timeout(policy.read_timeout, drain(req, most)));
            }
            return Err(ApiError::PayloadTooLarge {
                limit: policy.limit,
            });
        }
        let read = tokio::time::timeout(policy.read_timeout, read_limited(req, policy.limit));
        let bytes = tokio::select! {
            r = read => r.map_err(|_| ApiError::BodyTimeout {
                seconds: policy.read_timeout.as_secs_f64(),
            })??,
            _ = policy.shutdown.draining() => return Err(ApiError::shutting_down()),
        };
        Ok(JsonBody { bytes, arrived })
    }
}

fn expects_continue(req: &Request) -> bool {
    req.headers()
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
}

/// Parses `bytes` as a JSON object into `T`, naming the failing field (`param`) as a dotted path.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad(None, format!("the request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad(
            None,
            "the request body must be a JSON object",
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let message = err.inner().to_string();
        // serde names an unknown or missing field in its message; use it as the param.
        let named = between(&message, "unknown field `", "`")
            .or_else(|| between(&message, "missing field `", "`"));
        let param = match (path.as_str(), named) {
            (".", Some(f)) => Some(f.to_string()),
            (".", None) => None,
            (p, Some(f)) if p != f && !p.ends_with(&format!(".{f}")) => Some(format!("{p}.{f}")),
            (p, _) => Some(p.to_string()),
        };
        let message = if message.contains("untagged enum Prompt") {
            "`prompt` must be a string, a list of strings, a list of token ids or a list of lists of token ids".into()
        } else if message.contains("untagged enum Stop") {
            "`stop` must be a string or a list of strings".into()
        } else if message.starts_with("missing field") {
            format!("`{}` is required", param.as_deref().unwrap_or("?"))
        } else {
            match &param {
                Some(p) => format!("invalid `{p}`: {message}"),
                None => format!("invalid request: {message}"),
            }
        };
        ApiError::BadRequest {
            message,
            param,
            code: None,
        }
    })
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let i = s.find(start)? + start.len();
    let j = s[i..].find(end)? + i;
    Some(&s[i..j])
}
