//! Configuration: command-line flags, each also an `EXITSERVE_…` variable, over an optional
//! TOML file (`--config`, same keys as the flags with `_`), over built-in defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::ffi::OsString;

use clap::builder::TypedValueParser;
use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// How the matrix products run (`--matmul`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MatmulKernels {
    /// The skinny CPU kernels where the CPU has them; on a GPU, bf16/f16 products with float32
    /// results.
    Auto,
    /// Candle's matmul everywhere, its results in the weights' dtype.
    Candle,
    /// bf16/f16 products with float32 results, as a GPU runs them (slower on the CPU: there to
    /// check the GPU's arithmetic where no GPU is).
    Wide,
}

/// Which attention path runs on the CPU (every other device takes the batched one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttentionPath {
    /// The CPU's fused kernels over per-sequence caches.
    Auto,
    /// A GPU's path: the whole batch in tensor ops over a paged cache (slower on the CPU;
    /// there to check the GPU's arithmetic where no GPU is).
    Batched,
}

pub use crate::model::{DraftWeights, WeightDtype};

/// A parser for one of the model's named choices (`--dtype`, `--speculative-draft-weights`):
/// the model's own names, one list for the CLI and the model.
fn listed<T: Copy + Send + Sync + 'static, const N: usize>(
    all: [(&'static str, T); N],
) -> impl TypedValueParser<Value = T> {
    clap::builder::PossibleValuesParser::new(all.map(|(name, _)| name)).map(move |name| {
        all.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .expect("a listed name")
    })
}

/// OpenAI-compatible server for multi-exit language models: early exit and autocontrastive
/// decoding, chosen per request.
#[derive(Debug, Parser)]
#[command(name = "exitserve", version, about)]
pub struct Args {
    /// TOML file with any of these settings (keys as the flags, with `_`); flags and
    /// environment variables override it.
    #[arg(long, env = "EXITSERVE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Hugging Face hub repo id or local checkpoint folder
    #[arg(long, env = "EXITSERVE_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Hub revision: branch, tag, commit or e.g. `refs/pr/1` [default: main]
    #[arg(long, env = "EXITSERVE_REVISION")]
    pub revision: Option<String>,
    /// Model id clients send in `model` [default: last part of --model]
    #[arg(long, env = "EXITSERVE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Address to listen on
    #[arg(long, env = "EXITSERVE_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on
    #[arg(long, env = "EXITSERVE_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Mode of requests without `multi_exit`: `original`, `exit:L`, `contrast:U,L` (U a layer
    /// or `original`), `dola:LAYERS` (`low`, `high` or `L-L-...`), `sled`,
    /// `early_exit:THRESHOLD[,decay=T]`
    #[arg(long, env = "EXITSERVE_DEFAULT_MODE", default_value = "original")]
    pub default_mode: String,
    /// A named mode, served as model id `NAME:<preset>`: `PRESET=MODE` with MODE as in
    /// --default-mode, plus `,alpha=A` and `,minimum_candidates=K` for contrast,
    /// `,premature=lm_head` and `,relative_top=R` for DoLa, `sled:KEY=V,...` (premature,
    /// evolution_rate, evolution_scale, evolution_lower_bound, alpha) for SLED, and
    /// `,draft_layer=L[,max_draft_tokens=K]` for self-speculative decoding (e.g.
    /// `acd-strong=contrast:12,4,alpha=0.05`, `fast=original,draft_layer=4`); repeat for
    /// more (`;` between them in the variable)
    #[arg(long, env = "EXITSERVE_MODE_PRESET", value_delimiter = ';')]
    pub mode_preset: Option<Vec<String>>,
    /// Sequences decoded together in one batch
    #[arg(long, env = "EXITSERVE_MAX_BATCH_SIZE", default_value_t = 32)]
    pub max_batch_size: usize,
    /// Prompt tokens prefilled per step across the batch; longer prompts are chunked
    #[arg(long, env = "EXITSERVE_MAX_PREFILL_TOKENS", default_value_t = 512)]
    pub max_prefill_tokens: usize,
    /// Prompt tokens per step of requests of a lower `priority` than another sequence in that
    /// step (each is a token's work added to the higher-priority sequence's step)
    #[arg(
        long,
        env = "EXITSERVE_MAX_PREFILL_TOKENS_BESIDE_PRIORITY",
        default_value_t = 16
    )]
    pub max_prefill_tokens_beside_priority: usize,
    /// Sequences of requests of a lower `priority` than another sequence in a step that take
    /// part in it (each row adds to the step's time on a CPU); the others sit it out, taking
    /// turns
    #[arg(
        long,
        env = "EXITSERVE_MAX_SEQUENCES_BESIDE_PRIORITY",
        default_value_t = 2
    )]
    pub max_sequences_beside_priority: usize,
    /// KV-cache positions reserved across the batch (prompt + max_tokens of every sequence,
    /// each n/best_of copy counted) [default: half the memory available at start (the GPU's
    /// on a GPU), over the model's KV bytes per position]
    #[arg(long, env = "EXITSERVE_MAX_BATCH_TOTAL_TOKENS")]
    pub max_batch_total_tokens: Option<usize>,
    /// Turn off prefix caching (prompts starting with tokens computed before reuse their keys
    /// and values; see the README's "Prefix caching")
    #[arg(
        long,
        env = "EXITSERVE_NO_PREFIX_CACHE",
        num_args = 0..=1,
        default_value_t = false,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub no_prefix_cache: bool,
    /// Prompt positions the prefix cache may hold; they count against
    /// --max-batch-total-tokens, and admission evicts them before a request waits
    /// [default: the whole KV budget]
    #[arg(long, env = "EXITSERVE_PREFIX_CACHE_MAX_TOKENS")]
    pub prefix_cache_max_tokens: Option<usize>,
    /// Prompts x best_of of one request
    #[arg(
        long,
        env = "EXITSERVE_MAX_SEQUENCES_PER_REQUEST",
        default_value_t = 64
    )]
    pub max_sequences_per_request: usize,
    /// Queue order among requests of equal `priority`: each is due this many milliseconds
    /// after its arrival per KV position it reserves (prompt + max_tokens, every copy), and
    /// the earliest due is admitted first: short requests pass long ones that arrived at
    /// about the same time, a long one waits at most its own slack longer. 0: first come,
    /// first served
    #[arg(
        long,
        env = "EXITSERVE_QUEUE_SLACK_PER_TOKEN_MS",
        default_value_t = 1.0
    )]
    pub queue_slack_per_token_ms: f64,
    /// Requests waiting for a batch slot before new ones get 429
    #[arg(long, env = "EXITSERVE_MAX_QUEUED_REQUESTS", default_value_t = 256)]
    pub max_queued_requests: usize,
    /// Longest prompt in tokens [default: the model's context length]
    #[arg(long, env = "EXITSERVE_MAX_INPUT_TOKENS")]
    pub max_input_tokens: Option<usize>,
    /// Largest `n` / `best_of`
    #[arg(long, env = "EXITSERVE_MAX_BEST_OF", default_value_t = 8)]
    pub max_best_of: usize,
    /// Most `stop` sequences in one request
    #[arg(long, env = "EXITSERVE_MAX_STOP_SEQUENCES", default_value_t = 16)]
    pub max_stop_sequences: usize,
    /// Longest `stop` sequence in characters
    #[arg(long, env = "EXITSERVE_MAX_STOP_LENGTH", default_value_t = 256)]
    pub max_stop_length: usize,
    /// Most `logit_bias` entries in one request
    #[arg(long, env = "EXITSERVE_MAX_LOGIT_BIAS", default_value_t = 300)]
    pub max_logit_bias: usize,
    /// Chat template for `/v1/chat/completions`: a Jinja file, or the template's text
    /// [default: the checkpoint's own, if any]
    #[arg(long, env = "EXITSERVE_CHAT_TEMPLATE")]
    pub chat_template: Option<String>,
    /// Longest structured-output schema, regex, grammar or choice list, in bytes
    #[arg(long, env = "EXITSERVE_MAX_GRAMMAR_BYTES", default_value_t = 65536)]
    pub max_grammar_bytes: usize,
    /// Compiled structured-output grammars kept for reuse (0: none)
    #[arg(long, env = "EXITSERVE_GRAMMAR_CACHE_SIZE", default_value_t = 64)]
    pub grammar_cache_size: usize,
    /// Prompt positions one `/v1/inspect` request with `"positions": "all"` may inspect (each
    /// evaluates every head; the step's prefill budget charges it so)
    #[arg(long, env = "EXITSERVE_MAX_INSPECT_POSITIONS", default_value_t = 256)]
    pub max_inspect_positions: usize,
    /// Requests parsed and tokenized at once; the others wait with their raw bodies
    /// [default: the number of CPUs]
    #[arg(long, env = "EXITSERVE_VALIDATION_WORKERS")]
    pub validation_workers: Option<usize>,
    /// Events buffered per choice for a stream whose client reads slowly; past it the
    /// stream's sequences pause until the client reads
    #[arg(long, env = "EXITSERVE_STREAM_BUFFER_EVENTS", default_value_t = 64)]
    pub stream_buffer_events: usize,
    /// Open client connections; at the cap idle ones are closed and new ones wait (at most
    /// the open-files limit less 64)
    #[arg(long, env = "EXITSERVE_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Open connections one client address may hold; more are closed at once (behind a proxy
    /// or gateway its address is every client's: raise this to --max-connections there)
    #[arg(
        long,
        env = "EXITSERVE_MAX_CONNECTIONS_PER_PEER",
        default_value_t = 256
    )]
    pub max_connections_per_peer: usize,
    /// Seconds a client has to send a whole request head once it starts one
    #[arg(long, env = "EXITSERVE_HEADER_READ_TIMEOUT", default_value_t = 10.0)]
    pub header_read_timeout: f64,
    /// Seconds a client has to send a whole request body (408 past it)
    #[arg(long, env = "EXITSERVE_BODY_READ_TIMEOUT", default_value_t = 30.0)]
    pub body_read_timeout: f64,
    /// Seconds an idle keep-alive connection stays open
    #[arg(long, env = "EXITSERVE_KEEP_ALIVE_TIMEOUT", default_value_t = 60.0)]
    pub keep_alive_timeout: f64,
    /// Seconds a response's output may wait on a client that reads none of it before the
    /// connection is closed (a slow reader that keeps reading gets its response whole)
    #[arg(long, env = "EXITSERVE_WRITE_STALL_TIMEOUT", default_value_t = 30.0)]
    pub write_stall_timeout: f64,
    /// Seconds a request may wait and run before it fails
    #[arg(long, env = "EXITSERVE_REQUEST_TIMEOUT", default_value_t = 300.0)]
    pub request_timeout: f64,
    /// Require `Authorization: Bearer <key>` on every route but /health
    #[arg(long, env = "EXITSERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Origin allowed by CORS (repeat or comma-separate); none by default
    #[arg(long, env = "EXITSERVE_CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    pub cors_allow_origin: Option<Vec<String>>,
    /// Largest request body in bytes
    #[arg(long, env = "EXITSERVE_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Weight dtype: f32 (exact parity), or bf16/int8 (x86-64 with AVX2 or AVX-512) or f16 for speed
    #[arg(long, env = "EXITSERVE_DTYPE", value_parser = listed(WeightDtype::ALL), default_value = "f32")]
    pub dtype: WeightDtype,
    /// Matrix products: `auto` (the skinny AVX2/AVX-512/AMX kernels where available; on a GPU, bf16
    /// and f16 products with float32 results), `candle` (candle's matmul everywhere, its results
    /// in the weights' dtype) or `wide` (bf16/f16 products with float32 results, as on a GPU;
    /// slower on the CPU, for checking it)
    #[arg(long, env = "EXITSERVE_MATMUL", value_enum, default_value = "auto")]
    pub matmul: MatmulKernels,
    /// Attention on the CPU: `auto` (the fused CPU kernels) or `batched` (the GPU's path: the
    /// whole batch in tensor ops over a paged cache; slower here, for checking it)
    #[arg(long, env = "EXITSERVE_ATTENTION", value_enum, default_value = "auto")]
    pub attention: AttentionPath,
    /// Log format
    #[arg(long, env = "EXITSERVE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM; a second signal exits
    /// at once
    #[arg(long, env = "EXITSERVE_SHUTDOWN_GRACE", default_value_t = 30.0)]
    pub shutdown_grace: f64,
    /// Self-speculative decoding for every request that does not ask for it: this exit layer
    /// drafts, the request's mode verifies (modes that decode at or below it are left alone)
    /// [default: off]
    #[arg(long, env = "EXITSERVE_SPECULATIVE_DRAFT_LAYER")]
    pub speculative_draft_layer: Option<usize>,
    /// Most tokens drafted per round, 1..=16 (the round adapts below it), for the default
    /// above and for requests whose `speculative` leaves it out
    #[arg(
        long,
        env = "EXITSERVE_SPECULATIVE_MAX_DRAFT_TOKENS",
        default_value_t = 4
    )]
    pub speculative_max_draft_tokens: usize,
    /// Speculative sequences draft only while at most this many sequences decode; in a
    /// bigger batch they decode plainly (a batch already shares each weight read)
    #[arg(
        long,
        env = "EXITSERVE_SPECULATIVE_MAX_BATCH_SIZE",
        default_value_t = 1
    )]
    pub speculative_max_batch_size: usize,
    /// What drafts read: int8 copies of the draft layers and exit head (made when a layer
    /// first drafts; output unchanged, drafts ~2.7x cheaper than f32), or the model's own
    /// weights. Int8 copies need f32/bf16 weights on the CPU kernels
    #[arg(long, env = "EXITSERVE_SPECULATIVE_DRAFT_WEIGHTS", value_parser = listed(DraftWeights::ALL), default_value = "int8")]
    pub speculative_draft_weights: DraftWeights,
}

/// Why the settings cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A flag, a variable or a file's setting that does not parse (`--help` and `--version`
    /// come this way too).
    #[error("{}", .0.to_string().trim_end())]
    Flags(#[from] clap::Error),
    /// A value out of its range, or a file that cannot be read.
    #[error("{0}")]
    Invalid(String),
}

impl From<String> for ConfigError {
    fn from(s: String) -> Self {
        ConfigError::Invalid(s)
    }
}

/// Every setting resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub model: String,
    pub revision: Option<String>,
    pub served_model_name: String,
    pub host: String,
    pub port: u16,
    pub default_mode: String,
    pub mode_presets: Vec<String>,
    pub max_batch_size: usize,
    pub max_prefill_tokens: usize,
    pub max_prefill_tokens_beside_priority: usize,
    pub max_sequences_beside_priority: usize,
    pub max_batch_total_tokens: Option<usize>,
    /// None: prefix caching off; Some(None): capped by the KV budget alone.
    pub prefix_cache: Option<Option<usize>>,
    pub max_sequences_per_request: usize,
    pub queue_slack_per_token: Duration,
    pub max_queued_requests: usize,
    pub max_input_tokens: Option<usize>,
    pub max_best_of: usize,
    pub max_stop_sequences: usize,
    pub max_stop_length: usize,
    pub max_logit_bias: usize,
    pub chat_template: Option<String>,
    pub max_grammar_bytes: usize,
    pub grammar_cache_size: usize,
    pub max_inspect_positions: usize,
    pub validation_workers: usize,
    pub stream_buffer_events: usize,
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub write_stall_timeout: Duration,
    pub request_timeout: Duration,
    pub api_key: Option<String>,
    pub cors_allow_origins: Vec<String>,
    pub max_body_bytes: usize,
    pub dtype: WeightDtype,
    pub matmul: MatmulKernels,
    pub attention: AttentionPath,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
    pub speculative_draft_layer: Option<usize>,
    pub speculative_max_draft_tokens: usize,
    pub speculative_max_batch_size: usize,
    pub speculative_draft_weights: DraftWeights,
}

pub const DEFAULT_MODEL: &str = "IBM/gpt-neo-125m-multiexit";

impl Settings {
    /// Flags and environment over the `--config` file over defaults; `--help` and `--version`
    /// print and exit.
    pub fn load() -> Result<Self, String> {
        Self::parse_from(std::env::args_os()).map_err(|e| match e {
            ConfigError::Flags(e)
                if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) =>
            {
                e.exit()
            }
            e => e.to_string(),
        })
    }

    /// As [`Settings::load`], from `argv` (its first item the program's name).
    pub fn parse_from<I, T>(argv: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
        let cmd = Args::command();
        let matches = cmd.clone().try_get_matches_from(&argv)?;
        if let Some(path) = matches.get_one::<PathBuf>("config") {
            // The file's settings, where neither a flag nor a variable gave one, as if they
            // were flags: one parser, one set of defaults and one set of error messages.
            for (id, values) in file_settings(path)? {
                let Some(arg) = cmd.get_arguments().find(|a| *a.get_id() == id) else {
                    return Err(ConfigError::Invalid(format!(
                        "{}: unknown setting `{id}`",
                        path.display()
                    )));
                };
                let from_default = matches!(
                    matches.value_source(&id),
                    None | Some(ValueSource::DefaultValue)
                );
                if from_default {
                    let long = arg.get_long().expect("settings are long flags");
                    argv.extend(values.into_iter().map(|v| format!("--{long}={v}").into()));
                }
            }
        }
        let args = Args::from_arg_matches(&cmd.try_get_matches_from(&argv)?)?;
        Ok(Self::resolve(args)?)
    }

    /// Checks the parsed flags and fills the defaults that depend on other settings or on
    /// the machine.
    pub fn resolve(a: Args) -> Result<Self, String> {
        let served_model_name = a.served_model_name.unwrap_or_else(|| {
            a.model
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or(&a.model)
                .to_string()
        });
        let positive = |name: &str, v: usize| {
            if v == 0 {
                Err(format!("--{name} must be positive"))
            } else {
                Ok(v)
            }
        };
        let secs = |name: &str, v: f64| {
            Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| format!("--{name} must be a positive number of seconds, got {v}"))
        };
        let max_draft = crate::engine::speculative::MAX_DRAFT_TOKENS;
        if !(1..=max_draft).contains(&a.speculative_max_draft_tokens) {
            return Err(format!(
                "--speculative-max-draft-tokens must be in 1..={max_draft}, got {}",
                a.speculative_max_draft_tokens
            ));
        }
        Ok(Self {
            revision: a.revision,
            served_model_name,
            host: a.host,
            port: a.port,
            default_mode: a.default_mode,
            mode_presets: a.mode_preset.unwrap_or_default(),
            max_batch_size: positive("max-batch-size", a.max_batch_size)?,
            max_prefill_tokens: positive("max-prefill-tokens", a.max_prefill_tokens)?,
            max_prefill_tokens_beside_priority: positive(
                "max-prefill-tokens-beside-priority",
                a.max_prefill_tokens_beside_priority,
            )?,
            max_sequences_beside_priority: positive(
                "max-sequences-beside-priority",
                a.max_sequences_beside_priority,
            )?,
            max_batch_total_tokens: a
                .max_batch_total_tokens
                .map(|v| positive("max-batch-total-tokens", v))
                .transpose()?,
            prefix_cache: (!a.no_prefix_cache).then_some(a.prefix_cache_max_tokens),
            max_sequences_per_request: positive(
                "max-sequences-per-request",
                a.max_sequences_per_request,
            )?,
            queue_slack_per_token: Duration::try_from_secs_f64(a.queue_slack_per_token_ms / 1e3)
                .map_err(|_| {
                    format!(
                        "--queue-slack-per-token-ms must be a number of milliseconds >= 0, got {}",
                        a.queue_slack_per_token_ms
                    )
                })?,
            max_queued_requests: positive("max-queued-requests", a.max_queued_requests)?,
            max_input_tokens: a.max_input_tokens,
            max_best_of: positive("max-best-of", a.max_best_of)?,
            max_stop_sequences: a.max_stop_sequences,
            max_stop_length: positive("max-stop-length", a.max_stop_length)?,
            max_logit_bias: a.max_logit_bias,
            chat_template: a.chat_template,
            max_grammar_bytes: positive("max-grammar-bytes", a.max_grammar_bytes)?,
            grammar_cache_size: a.grammar_cache_size,
            max_inspect_positions: positive("max-inspect-positions", a.max_inspect_positions)?,
            validation_workers: positive(
                "validation-workers",
                a.validation_workers
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            )?,
            stream_buffer_events: positive("stream-buffer-events", a.stream_buffer_events)?,
            max_connections: positive("max-connections", a.max_connections)?,
            max_connections_per_peer: positive(
                "max-connections-per-peer",
                a.max_connections_per_peer,
            )?,
            header_read_timeout: secs("header-read-timeout", a.header_read_timeout)?,
            body_read_timeout: secs("body-read-timeout", a.body_read_timeout)?,
            keep_alive_timeout: secs("keep-alive-timeout", a.keep_alive_timeout)?,
            write_stall_timeout: secs("write-stall-timeout", a.write_stall_timeout)?,
            request_timeout: secs("request-timeout", a.request_timeout)?,
            api_key: a.api_key.filter(|k| !k.is_empty()),
            cors_allow_origins: a.cors_allow_origin.unwrap_or_default(),
            max_body_bytes: positive("max-body-bytes", a.max_body_bytes)?,
            dtype: a.dtype,
            matmul: a.matmul,
            attention: a.attention,
            log_format: a.log_format,
            shutdown_grace: secs("shutdown-grace", a.shutdown_grace)?,
            speculative_draft_layer: a.speculative_draft_layer,
            speculative_max_batch_size: a.speculative_max_batch_size,
            speculative_draft_weights: a.speculative_draft_weights,
            speculative_max_draft_tokens: a.speculative_max_draft_tokens,
            model: a.model,
        })
    }
}

/// The settings of a TOML file as `(setting, values)`: each key a flag's name with `_`, each
/// value as it would be typed after the flag (an array: the flag repeated).
fn file_settings(path: &Path) -> Result<Vec<(String, Vec<String>)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
    let scalar = |key: &str, v: &toml::Value| match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        _ => Err(format!(
            "{}: `{key}` must be a string, a number or a list of them",
            path.display()
        )),
    };
    table
        .iter()
        .map(|(key, v)| {
            let values = match v {
                toml::Value::Array(items) => items.iter().map(|i| scalar(key, i)).collect(),
                other => scalar(key, other).map(|s| vec![s]),
            }?;
            Ok((key.clone(), values))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TOML file in the temporary folder, removed when dropped.
    struct TempToml(PathBuf);

    fn file(text: &str) -> TempToml {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("exitserve-config-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        TempToml(path)
    }

    impl Drop for TempToml {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn settings(argv: &[&str]) -> Result<Settings, String> {
        Settings::parse_from(std::iter::once("exitserve").chain(argv.iter().copied()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn flags_override_file_and_defaults_fill_the_rest() {
        let f = file("port = 9000\nmax_batch_size = 4\nmodel = \"a/b-c\"");
        let s = settings(&["--config", f.0.to_str().unwrap(), "--port", "7000"]).unwrap();
        assert_eq!(s.port, 7000);
        assert_eq!(s.max_batch_size, 4);
        assert_eq!(s.served_model_name, "b-c");
        assert_eq!(s.host, "127.0.0.1");
    }

    /// The defaults live in the flag definitions only; the shipped file states each of them,
    /// and states them as they are.
    #[test]
    fn shipped_default_config_states_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
        let from_file = settings(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(from_file, settings(&[]).unwrap());
        let keys: Vec<String> = file_settings(&path)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        for arg in Args::command().get_arguments() {
            if !arg.get_default_values().is_empty() {
                let id = arg.get_id().to_string();
                assert!(
                    keys.contains(&id),
                    "config/default.toml does not state `{id}`"
                );
            }
        }
    }

    #[test]
    fn unknown_keys_and_zero_limits_are_errors() {
        let f = file("prot = 1");
        let e = settings(&["--config", f.0.to_str().unwrap()]).unwrap_err();
        assert!(e.ends_with("unknown setting `prot`"), "{e}");
        let args = Args::try_parse_from(["exitserve", "--max-batch-size", "0"]).unwrap();
        assert_eq!(
            Settings::resolve(args).unwrap_err(),
            "--max-batch-size must be positive"
        );
    }

    #[test]
    fn a_flag_or_variable_beats_the_file_and_a_file_value_is_checked_as_a_flag_is() {
        let f = file("max_batch_size = 4\nmode_preset = [\"a=exit:2\", \"b=original\"]");
        let s = settings(&["--config", f.0.to_str().unwrap(), "--max-batch-size", "5"]).unwrap();
        assert_eq!(s.max_batch_size, 5);
        assert_eq!(s.mode_presets, vec!["a=exit:2", "b=original"]);
        let f = file("port = \"many\"");
        let e = settings(&["--config", f.0.to_str().unwrap()]).unwrap_err();
        assert!(e.contains("--port"), "{e}");
    }
}
