//! A JSON body extractor whose every rejection is an OpenAI error naming the field.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;

pub struct OpenAiJson<T>(pub T);

/// Set by the router from `--max-body-bytes`, read back for the 413 message.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OpenAiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
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
        let limit = req.extensions().get::<BodyLimit>().map_or(0, |l| l.0);
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit }
            } else {
                ApiError::bad(None, format!("cannot read the request body: {rej}"))
            }
        })?;
        parse(&bytes).map(OpenAiJson)
    }
}

/// Parses `bytes`, naming the failing field (`param`) as a dotted path.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let result: Result<T, _> = serde_path_to_error::deserialize(de);
    result.map_err(|err| {
        let inner = err.inner();
        let path = err.path().to_string();
        let message = inner.to_string();
        // serde names an unknown or missing field in its message; use it as the param.
        let named = between(&message, "unknown field `", "`")
            .or_else(|| between(&message, "missing field `", "`"));
        let param = match (path.as_str(), named) {
            (".", Some(f)) => Some(f.to_string()),
            (".", None) => None,
            (p, Some(f)) if message.starts_with("missing field") => Some(format!("{p}.{f}")),
            (p, _) => Some(p.to_string()),
        };
        let message = match inner.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                format!("the request body is not valid JSON: {message}")
            }
            _ if message.contains("untagged enum Prompt") => {
                "`prompt` must be a string, a list of strings, a list of token ids or a list of lists of token ids".into()
            }
            _ if message.contains("untagged enum Stop") => "`stop` must be a string or a list of strings".into(),
            _ => match &param {
                Some(p) => format!("invalid `{p}`: {message}"),
                None => format!("invalid request: {message}"),
            },
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
