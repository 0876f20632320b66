//! Start-up: load the model, start the engine, build the router, serve until a signal.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{MatmulKernels, Settings, WeightDtype};
use crate::engine::request::{ModeSpec, UpperSpec};
use crate::engine::{BatchConfig, Engine, EngineConfig, Limits, Validator};
use crate::http::{self, AppState};
use crate::model::{self, LoadOptions};

/// A start-up failure: printed as one line, exit code 1.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot load the model: {0}")]
    Model(#[from] model::ModelError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// `original`, `exit:L`, `contrast:U,L` -> the mode object a request would send.
pub fn parse_mode_flag(s: &str) -> Result<ModeSpec, String> {
    let bad = || format!("--default-mode `{s}`: expected original, exit:L or contrast:U,L");
    let num = |v: &str| v.trim().parse::<i64>().map_err(|_| bad());
    if s == "original" {
        return Ok(ModeSpec::Original);
    }
    if let Some(l) = s.strip_prefix("exit:") {
        return Ok(ModeSpec::Exit {
            layer: Some(num(l)?),
        });
    }
    let (u, l) = s
        .strip_prefix("contrast:")
        .and_then(|r| r.split_once(','))
        .ok_or_else(bad)?;
    let upper = if u.trim() == "original" {
        UpperSpec::Original
    } else {
        UpperSpec::Layer(num(u)?)
    };
    Ok(ModeSpec::Contrast {
        upper: Some(upper),
        lower: Some(num(l)?),
        alpha: None,
        minimum_candidates: None,
    })
}

/// Loads the model and starts the engine; returns the app state for the router.
pub fn build_state(s: &Settings) -> Result<Arc<AppState>, StartupError> {
    build_state_with(s, |_| {})
}

/// As [`build_state`], with a last say on the engine configuration (tests use it for fault
/// injection).
pub fn build_state_with(
    s: &Settings,
    tune: impl FnOnce(&mut EngineConfig),
) -> Result<Arc<AppState>, StartupError> {
    let opts = LoadOptions {
        revision: s.revision.clone(),
        dtype: match s.dtype {
            WeightDtype::F32 => model::WeightDtype::F32,
            WeightDtype::F16 => model::WeightDtype::F16,
            WeightDtype::Bf16 => model::WeightDtype::Bf16,
            WeightDtype::Int8 => model::WeightDtype::Int8,
        },
        device: device()?,
        skinny_kernels: s.matmul == MatmulKernels::Auto,
    };
    let loaded = model::load(&s.model, &opts)?;
    let cfg = loaded.model.config().clone();
    let max_positions = cfg.max_position_embeddings;
    let mut limits = Limits {
        max_input_tokens: s
            .max_input_tokens
            .unwrap_or(max_positions)
            .min(max_positions),
        max_best_of: s.max_best_of,
        max_positions,
        vocab_size: cfg.vocab_size,
        exit_layers: cfg.exit_layers.clone(),
        num_layers: cfg.num_layers,
        default_mode: model::Mode::Original,
        request_timeout: s.request_timeout,
    };
    let spec = parse_mode_flag(&s.default_mode).map_err(StartupError::Config)?;
    // Resolve the default mode with the same rules as a request's `multi_exit`.
    let tokenizer = Arc::new(loaded.tokenizer);
    limits.default_mode = Validator::new(limits.clone(), Arc::clone(&tokenizer))
        .mode(&spec)
        .map_err(|e| StartupError::Config(format!("--default-mode: {e}")))?;
    let eos = cfg
        .eos_token_id
        .or_else(|| tokenizer.token_id("<|endoftext|>"));
    let tokenizer = Arc::try_unwrap(tokenizer)
        .map_err(|_| StartupError::Config("tokenizer still shared".into()))?;
    let mut engine_cfg = EngineConfig {
        batch: BatchConfig {
            max_batch_size: s.max_batch_size,
            max_prefill_tokens: s.max_prefill_tokens,
            eos_token_id: eos,
            panic_on_token: None,
        },
        max_queued_requests: s.max_queued_requests,
    };
    tune(&mut engine_cfg);
    let engine = Engine::start(loaded.model, tokenizer, limits, engine_cfg)?;
    let mut state = AppState::new(engine, s.served_model_name.clone());
    state.api_key = s.api_key.clone();
    state.max_body_bytes = s.max_body_bytes;
    state.cors_allow_origins = s.cors_allow_origins.clone();
    Ok(Arc::new(state))
}

#[cfg(feature = "cuda")]
fn device() -> Result<candle_core::Device, StartupError> {
    candle_core::Device::cuda_if_available(0).map_err(|e| StartupError::Model(e.into()))
}

#[cfg(not(feature = "cuda"))]
fn device() -> Result<candle_core::Device, StartupError> {
    Ok(candle_core::Device::Cpu)
}

/// Binds first (a taken port fails before the model loads), then loads and serves until
/// SIGINT/SIGTERM; requests in flight get `shutdown_grace` to finish.
pub async fn run(s: Settings) -> Result<(), StartupError> {
    let addr = format!("{}:{}", s.host, s.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| StartupError::Bind {
            addr: addr.clone(),
            source,
        })?;
    let local: SocketAddr = listener.local_addr()?;
    tracing::info!(model = %s.model, "loading model");
    let settings = s.clone();
    let state = tokio::task::spawn_blocking(move || build_state(&settings))
        .await
        .map_err(|e| StartupError::Config(format!("loader crashed: {e}")))??;
    let limits = state.engine.validator().limits();
    tracing::info!(
        %local,
        served_model_name = %state.served_model_name,
        exits = ?limits.exit_layers,
        "listening"
    );
    let app = http::router(state);
    let grace = s.shutdown_grace;
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown_signal());
    let mut serving = tokio::spawn(server.into_future());
    // The server stops accepting on the signal; this copy of it starts the grace period.
    tokio::select! {
        r = &mut serving => return joined(r),
        _ = shutdown_signal() => {}
    }
    tracing::info!(
        grace_s = grace.as_secs_f64(),
        "shutting down; letting requests in flight finish"
    );
    match tokio::time::timeout(grace, serving).await {
        Ok(r) => joined(r),
        Err(_) => {
            tracing::warn!("grace period over; exiting with requests still running");
            Ok(())
        }
    }
}

fn joined(r: Result<std::io::Result<()>, tokio::task::JoinError>) -> Result<(), StartupError> {
    r.map_err(std::io::Error::other)?.map_err(StartupError::Io)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
