//! Start-up: load the model, start the engine, build the router, serve until a signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{AttentionPath, MatmulKernels, Settings};
use crate::engine::request::{ModeSpec, SpeculativeRequest, SpeculativeSpec};
use crate::engine::scheduler::{Budget, StepBudget};
use crate::engine::structured::StructuredConfig;
use crate::engine::{BatchConfig, Engine, EngineConfig, Limits, Validator};
use crate::http::serve::{self, ConnectionLimits};
use crate::http::{self, shutdown, AppState, Shutdown};
use crate::model::{self, ChatTemplate, LoadOptions};

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

/// A `--mode-preset` value's mode and, when it carries `,draft_layer=L` and/or
/// `,max_draft_tokens=K`, its self-speculative decoding.
pub fn parse_preset(s: &str) -> Result<(ModeSpec, Option<SpeculativeRequest>), String> {
    let mut mode = Vec::new();
    let mut spec: Option<SpeculativeRequest> = None;
    for part in s.split(',') {
        let num = |v: &str| {
            v.trim()
                .parse::<i64>()
                .map_err(|_| format!("`{part}`: expected a whole number"))
        };
        match part.trim().split_once('=') {
            Some(("draft_layer", v)) => spec.get_or_insert_default().draft_layer = Some(num(v)?),
            Some(("max_draft_tokens", v)) => {
                spec.get_or_insert_default().max_draft_tokens = Some(num(v)?)
            }
            Some(("adaptive", v)) => {
                let v = v
                    .trim()
                    .parse::<bool>()
                    .map_err(|_| format!("`{part}`: expected true or false"))?;
                spec.get_or_insert_default().adaptive = Some(v)
            }
            _ => mode.push(part),
        }
    }
    let mode: model::Mode = mode.join(",").parse().map_err(|e| format!("{e}"))?;
    Ok((mode.into(), spec))
}

/// Loads the model and starts the engine; returns the app state for the router.
pub fn build_state(s: &Settings, shutdown: Shutdown) -> Result<Arc<AppState>, StartupError> {
    build_state_with(s, shutdown, |_| {})
}

/// The connection limits of `s` (before they are fitted to the open-files limit).
pub fn connection_limits(s: &Settings) -> ConnectionLimits {
    ConnectionLimits {
        max_connections: s.max_connections,
        header_read_timeout: s.header_read_timeout,
        keep_alive_timeout: s.keep_alive_timeout,
        write_stall_timeout: s.write_stall_timeout,
        max_connections_per_peer: s.max_connections_per_peer,
    }
}

/// As [`build_state`], with a last say on the engine configuration (tests use it for fault
/// injection).
pub fn build_state_with(
    s: &Settings,
    shutdown: Shutdown,
    tune: impl FnOnce(&mut EngineConfig),
) -> Result<Arc<AppState>, StartupError> {
    let device = device()?;
    let opts = LoadOptions {
        revision: s.revision.clone(),
        dtype: s.dtype,
        skinny_kernels: s.matmul == MatmulKernels::Auto,
        wide_products: match s.matmul {
            MatmulKernels::Auto => !device.is_cpu(),
            MatmulKernels::Candle => false,
            MatmulKernels::Wide => true,
        },
        device,
        batched_attention: s.attention == AttentionPath::Batched,
    };
    // Before the model loads: a bad origin fails start-up at once.
    let cors = (!s.cors_allow_origins.is_empty())
        .then(|| http::cors_origins(&s.cors_allow_origins))
        .transpose()
        .map_err(StartupError::Config)?;
    let mut loaded = model::load(&s.model, &opts)?;
    let copies = loaded.model.set_draft_weights(s.speculative_draft_weights);
    let exits = loaded.model.config().exit_layers.clone();
    if let Some(layer) = s.speculative_draft_layer {
        if !exits.contains(&layer) {
            return Err(StartupError::Config(format!(
                "--speculative-draft-layer {layer}: not an exit layer of this model ({exits:?})"
            )));
        }
        if copies {
            // The default draft layer's copies now, before the KV budget counts free memory.
            loaded.model.prepare_draft(layer)?;
        }
    }
    let cfg = loaded.model.config().clone();
    let max_positions = cfg.max_position_embeddings;
    let budget = Budget {
        max_sequences: s.max_batch_size,
        max_tokens: s.max_batch_total_tokens.unwrap_or_else(|| {
            default_kv_budget(
                kv_memory_bytes(loaded.model.device()),
                loaded.model.kv_bytes_per_token(),
                max_positions,
                s.max_batch_size,
            )
        }),
        step: StepBudget {
            prefill: s.max_prefill_tokens,
            prefill_beside_higher: s.max_prefill_tokens_beside_priority,
            sequences_beside_higher: s.max_sequences_beside_priority,
        },
    };
    loaded
        .model
        .limit_kv_pool(budget.max_tokens, budget.max_sequences);
    tracing::info!(
        max_batch_total_tokens = budget.max_tokens,
        kv_bytes_per_token = loaded.model.kv_bytes_per_token(),
        "KV-cache budget"
    );
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
        tied_head: loaded.model.has_tied_head(),
        default_mode: model::Mode::ORIGINAL,
        request_timeout: s.request_timeout,
        budget,
        max_sequences_per_request: s.max_sequences_per_request,
        max_stop_sequences: s.max_stop_sequences,
        max_stop_length: s.max_stop_length,
        max_logit_bias: s.max_logit_bias,
        max_inspect_positions: s.max_inspect_positions,
        max_token_bytes: loaded.tokenizer.max_token_bytes(),
        speculative_default: None,
        speculative_max_draft_tokens: s.speculative_max_draft_tokens,
    };
    limits.speculative_default = s.speculative_draft_layer.map(|layer| SpeculativeSpec {
        draft_layer: layer,
        max_draft_tokens: s.speculative_max_draft_tokens,
        adaptive: true,
    });
    let spec: ModeSpec = s
        .default_mode
        .parse::<model::Mode>()
        .map_err(|e| StartupError::Config(format!("--default-mode: {e}")))?
        .into();
    // Resolve the default mode with the same rules as a request's `multi_exit`.
    let tokenizer = Arc::new(loaded.tokenizer);
    limits.default_mode = Validator::new(limits.clone(), Arc::clone(&tokenizer))
        .mode(&spec)
        .map_err(|e| StartupError::Config(format!("--default-mode: {e}")))?;
    let eos = cfg
        .eos_token_id
        .or_else(|| tokenizer.token_id("<|endoftext|>"));
    let chat_template = ChatTemplate::find(
        s.chat_template.as_deref(),
        loaded.files.chat_template.as_deref(),
        loaded.files.tokenizer_config.as_deref(),
        &eos.and_then(|id| tokenizer.decode(&[id]).ok())
            .unwrap_or_default(),
    )?
    .map(Arc::new);
    match &chat_template {
        Some(t) => tracing::info!(origin = %t.origin, "chat template"),
        None => tracing::info!(
            "no chat template: /v1/chat/completions answers 400 (see --chat-template)"
        ),
    }
    let tokenizer = Arc::try_unwrap(tokenizer)
        .map_err(|_| StartupError::Config("tokenizer still shared".into()))?;
    let mut engine_cfg = EngineConfig {
        batch: BatchConfig {
            budget,
            eos_token_id: eos,
            #[cfg(feature = "fault-injection")]
            fault: None,
            speculative_max_batch: s.speculative_max_batch_size,
            queue_slack_per_token: s.queue_slack_per_token,
            prefix_cache: s
                .prefix_cache
                .map(|cap| cap.unwrap_or(budget.max_tokens).min(budget.max_tokens)),
        },
        max_queued_requests: s.max_queued_requests,
        validation_workers: s.validation_workers,
        stream_buffer_events: s.stream_buffer_events,
        chat_template,
        structured: StructuredConfig {
            max_grammar_bytes: s.max_grammar_bytes,
            cache_size: s.grammar_cache_size,
        },
        #[cfg(feature = "cuda-emulator")]
        emulate_cuda: false,
    };
    tune(&mut engine_cfg);
    let engine = Engine::start(loaded.model, tokenizer, limits, engine_cfg)?;
    let mut presets = Vec::with_capacity(s.mode_presets.len());
    for p in &s.mode_presets {
        let (name, mode) = p.split_once('=').ok_or_else(|| {
            StartupError::Config(format!("--mode-preset `{p}`: expected NAME=MODE"))
        })?;
        let (spec, speculative) = parse_preset(mode.trim())
            .map_err(|e| StartupError::Config(format!("--mode-preset `{name}`: {e}")))?;
        presets.push((name.trim().to_string(), spec, speculative));
    }
    let models = http::models::ModelIds::new(
        s.served_model_name.clone(),
        engine.validator().clone(),
        &presets,
    )
    .map_err(StartupError::Config)?;
    let mut state = AppState::new(engine, s.served_model_name.clone());
    state.models = models;
    state.api_key = s.api_key.clone();
    state.max_body_bytes = s.max_body_bytes;
    state.body_read_timeout = s.body_read_timeout;
    state.cors_allow_origins = cors;
    state.shutdown = shutdown;
    Ok(Arc::new(state))
}

/// Half of `available` (the memory free now, after the weights loaded), in KV positions;
/// never more than a full batch of full-context sequences needs.
fn default_kv_budget(
    available: Option<u64>,
    kv_bytes_per_token: usize,
    max_positions: usize,
    max_batch: usize,
) -> usize {
    let ceiling = max_positions.saturating_mul(max_batch);
    let Some(available) = available else {
        return ceiling;
    };
    let tokens = (available / 2 / kv_bytes_per_token.max(1) as u64) as usize;
    if tokens < max_positions {
        tracing::warn!(
            tokens,
            max_positions,
            "little memory: the KV budget holds less than one full-context sequence"
        );
    }
    tokens.clamp(1, ceiling.max(1))
}

/// The memory the KV cache would take: the GPU's free memory when the model runs on one
/// (its caches live there), else the host's.
fn kv_memory_bytes(device: &candle_core::Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        return match d.cuda_stream().context().mem_get_info() {
            Ok((free, _total)) => Some(free as u64),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the GPU's free memory");
                None
            }
        };
    }
    let _ = device;
    available_memory_bytes()
}

/// `MemAvailable`, or what the cgroup (v2) still allows when that is less.
fn available_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let mut available = kib * 1024;
    let read = |f: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{f}")).ok();
    if let (Some(max), Some(current)) = (read("memory.max"), read("memory.current")) {
        if let (Ok(max), Ok(current)) = (max.trim().parse::<u64>(), current.trim().parse::<u64>()) {
            available = available.min(max.saturating_sub(current));
        }
    }
    Some(available)
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
/// SIGINT/SIGTERM. Then: no new connections, idle ones close, requests in flight get
/// `shutdown_grace` to finish; at its end every open response ends with an error (a stream
/// with an error event and `[DONE]`). A second signal exits at once.
pub async fn run(s: Settings) -> Result<(), StartupError> {
    let nofile = serve::raise_open_files_limit();
    let max_connections = match nofile {
        Some(n) if (s.max_connections as u64).saturating_add(64) > n => {
            let capped = n.saturating_sub(64).max(1) as usize;
            tracing::warn!(
                requested = s.max_connections,
                capped,
                open_files_limit = n,
                "--max-connections lowered to fit the open-files limit"
            );
            capped
        }
        _ => s.max_connections,
    };
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
    let (trigger, shutdown) = shutdown::channel();
    let for_state = shutdown.clone();
    let state = tokio::task::spawn_blocking(move || build_state(&settings, for_state))
        .await
        .map_err(|e| StartupError::Config(format!("loader crashed: {e}")))??;
    let limits = state.engine.validator().limits();
    tracing::info!(
        %local,
        served_model_name = %state.served_model_name,
        exits = ?limits.exit_layers,
        max_connections,
        "listening"
    );
    let metrics = state.engine.metrics_handle();
    let app = http::router(state);
    let conn_limits = ConnectionLimits {
        max_connections,
        ..connection_limits(&s)
    };
    let mut serving = tokio::spawn(serve::serve(listener, app, conn_limits, metrics, shutdown));
    tokio::select! {
        r = &mut serving => return joined(r),
        _ = shutdown_signal() => {}
    }
    let grace = s.shutdown_grace;
    tracing::info!(
        grace_s = grace.as_secs_f64(),
        "shutting down; letting requests in flight finish (a second signal exits at once)"
    );
    trigger.drain();
    tokio::select! {
        r = &mut serving => return joined(r),
        _ = tokio::time::sleep(grace) => {}
        _ = shutdown_signal() => {
            tracing::warn!("second signal; exiting now");
            return Ok(());
        }
    }
    tracing::warn!("grace period over; ending the requests still running");
    trigger.cut();
    // The ended responses need a moment to reach their clients.
    tokio::select! {
        r = &mut serving => joined(r),
        _ = tokio::time::sleep(CUT_FLUSH) => Ok(()),
        _ = shutdown_signal() => Ok(()),
    }
}

/// How long the last words of cut responses get to be written.
const CUT_FLUSH: Duration = Duration::from_secs(2);

fn joined(r: Result<(), tokio::task::JoinError>) -> Result<(), StartupError> {
    r.map_err(|e| StartupError::Io(std::io::Error::other(e)))
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
