//! axum and hyper only: routes, OpenAI wire types, errors, SSE, and the connections they
//! arrive on. Never touches a tensor.
#![forbid(unsafe_code)]

pub mod chat;
pub mod completions;
pub mod error;
mod generation;
pub mod inspect;
pub mod json;
pub mod models;
pub mod playground;
pub mod serve;
pub mod shutdown;
pub mod tokenize;
pub mod wire;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use subtle::ConstantTimeEq;
use tower_http::cors::{AllowOrigin, CorsLayer};

pub use error::ApiError;
pub use shutdown::Shutdown;

use crate::engine::Engine;

pub const OPENAPI_YAML: &str = include_str!("../../openapi.yaml");

pub struct AppState {
    pub engine: Engine,
    pub served_model_name: String,
    /// The ids clients may send in `model` (the name, and the name with a mode).
    pub models: models::ModelIds,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    pub body_read_timeout: Duration,
    /// The CORS origins allowed (`--cors-allow-origin`, checked by [`cors_origins`]); None:
    /// no CORS headers at all.
    pub cors_allow_origins: Option<AllowOrigin>,
    pub shutdown: Shutdown,
    pub created: u64,
    counter: AtomicU64,
}

impl AppState {
    /// With no mode presets; see [`models::ModelIds::new`] for them.
    pub fn new(engine: Engine, served_model_name: String) -> Self {
        let models =
            models::ModelIds::new(served_model_name.clone(), engine.validator().clone(), &[])
                .expect("no presets, nothing to refuse");
        Self {
            engine,
            served_model_name,
            models,
            api_key: None,
            max_body_bytes: 1 << 20,
            body_read_timeout: Duration::from_secs(30),
            cors_allow_origins: None,
            shutdown: Shutdown::never(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            counter: AtomicU64::new(0),
        }
    }

    /// A unique, unguessable-enough id suffix for `cmpl-…`.
    pub fn next_id(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{:x}{:08x}", self.created, n)
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let policy = json::BodyPolicy {
        limit: state.max_body_bytes,
        read_timeout: state
            .body_read_timeout
            .min(state.engine.validator().limits().request_timeout),
        shutdown: state.shutdown.clone(),
    };
    let mut app = Router::new()
        .route("/v1/completions", post(completions::create_completion))
        .route("/v1/chat/completions", post(chat::create_chat_completion))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/inspect", post(inspect::inspect))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/tokenizer_info", get(tokenize::tokenizer_info))
        .route("/metrics", get(metrics))
        .route("/openapi.yaml", get(openapi))
        .route("/health", get(health))
        .route("/", get(playground::index))
        .route("/playground.js", get(playground::script))
        .route("/playground.css", get(playground::style))
        .route("/favicon.svg", get(playground::icon))
        .route("/favicon.ico", get(playground::icon))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ))
        // The JSON extractor enforces the limit itself, with an OpenAI-shaped 413.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::Extension(policy));
    if let Some(origins) = state.cors_allow_origins.clone() {
        app = app.layer(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    // Spans name the method and path only: query strings may carry secrets.
    let trace = tower_http::trace::TraceLayer::new_for_http().make_span_with(|req: &Request| {
        tracing::debug_span!("http", method = %req.method(), path = %req.uri().path())
    });
    app.layer(trace).with_state(state)
}

/// `--cors-allow-origin` values as tower-http's list: `*`, or origins such as
/// `https://example.com:8443` (a scheme and a host, no path). Anything else is an error, so a
/// typo fails at start-up instead of silently allowing nothing.
pub fn cors_origins(origins: &[String]) -> Result<AllowOrigin, String> {
    if origins.iter().any(|o| o == "*") {
        return Ok(AllowOrigin::any());
    }
    let mut values = Vec::with_capacity(origins.len());
    for o in origins {
        let bad = |why: &str| format!("--cors-allow-origin `{o}`: {why}");
        let uri: Uri = o
            .parse()
            .map_err(|_| bad("not an origin such as https://example.com"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(bad("an origin is http:// or https:// and a host"));
        }
        if o.trim_start_matches(uri.scheme_str().unwrap_or_default())
            .trim_start_matches("://")
            .contains('/')
        {
            return Err(bad("an origin has no path, not even a trailing `/`"));
        }
        values.push(HeaderValue::from_str(o).map_err(|_| bad("not a valid header value"))?);
    }
    Ok(AllowOrigin::list(values))
}

/// With `--api-key`, every route but `/health` and the playground's static assets needs `Authorization: Bearer <key>`.
async fn require_api_key(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(key) = app.api_key.as_deref() else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if path == "/health"
        || playground::PUBLIC_PATHS.contains(&path)
        || req.method() == Method::OPTIONS
    {
        return next.run(req).await;
    }
    // The scheme name is case-insensitive (RFC 9110 section 11.1); the key is not.
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, key)| key.trim());
    if bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
        next.run(req).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

fn model_card(app: &AppState, id: &str, mode: Option<&crate::model::Mode>) -> serde_json::Value {
    let limits = app.engine.validator().limits();
    let mut card = json!({
        "id": id,
        "object": "model",
        "created": app.created,
        "owned_by": "exitserve",
        "root": app.served_model_name,
        "exit_layers": limits.exit_layers,
        "num_layers": limits.num_layers,
        "max_model_len": limits.max_positions,
        "max_inspect_positions": limits.max_inspect_positions,
        "modes": crate::model::Mode::LABELS,
        "default_mode": wire::MultiExitOut::from(&limits.default_mode),
        "multi_exit": wire::MultiExitOut::from(mode.unwrap_or(&limits.default_mode)),
    });
    // The served name's card says how each strategy is asked for (the playground's forms).
    if mode.is_none() {
        card["strategies"] = json!(crate::model::Mode::forms(&limits.shape()));
    }
    // A preset that decodes speculatively says so.
    if let Some(s) = app.models.speculative(id) {
        card["speculative"] = json!({
            "draft_layer": s.draft_layer,
            "max_draft_tokens": s.max_draft_tokens,
            "adaptive": s.adaptive,
        });
    }
    card
}

async fn list_models(State(app): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let data: Vec<serde_json::Value> = app
        .models
        .listed()
        .iter()
        .map(|(id, mode)| model_card(&app, id, mode.as_ref()))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// Answers for every valid id, listed or not.
async fn get_model(
    State(app): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mode = app.models.resolve(&id)?;
    Ok(Json(model_card(&app, &id, mode.as_ref())))
}

async fn health(State(app): State<Arc<AppState>>) -> Response {
    if app.engine.is_alive() {
        (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
    } else {
        ApiError::Unavailable {
            message: "the engine is not running".into(),
            code: "service_unavailable",
        }
        .into_response()
    }
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.engine.render_metrics(),
    )
        .into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI_YAML).into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
