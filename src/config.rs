//! Configuration: command-line flags, each also an `EXITSERVE_…` variable, over an optional
//! TOML file (`--config`, same keys as the flags with `_`), over built-in defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::{Parser, ValueEnum};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatmulKernels {
    Auto,
    Candle,
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
#[derive(Debug, Default, Parser, Deserialize)]
#[command(name = "exitserve", version, about)]
#[serde(deny_unknown_fields)]
pub struct Args {
    /// TOML file with any of these settings (keys as the flags, with `_`); flags and
    /// environment variables override it.
    #[arg(long, env = "EXITSERVE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Hugging Face hub repo id or local checkpoint folder [default: IBM/gpt-neo-125m-multiexit]
    #[arg(long, env = "EXITSERVE_MODEL")]
    pub model: Option<String>,
    /// Hub revision: branch, tag, commit or e.g. `refs/pr/1` [default: main]
    #[arg(long, env = "EXITSERVE_REVISION")]
    pub revision: Option<String>,
    /// Model id clients send in `model` [default: last part of --model]
    #[arg(long, env = "EXITSERVE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Address to listen on [default: 127.0.0.1]
    #[arg(long, env = "EXITSERVE_HOST")]
    pub host: Option<String>,
    /// Port to listen on [default: 8080]
    #[arg(long, env = "EXITSERVE_PORT")]
    pub port: Option<u16>,
    /// Mode of requests without `multi_exit`: `original`, `exit:L`, `contrast:U,L` (U a layer
    /// or `original`) [default: original]
    #[arg(long, env = "EXITSERVE_DEFAULT_MODE")]
    pub default_mode: Option<String>,
    /// A named mode, served as model id `NAME:<preset>`: `PRESET=MODE` with MODE as in
    /// --default-mode, plus `,alpha=A` and `,minimum_candidates=K` for contrast and
    /// `,draft_layer=L[,max_draft_tokens=K]` for self-speculative decoding (e.g.
    /// `acd-strong=contrast:12,4,alpha=0.05`, `fast=original,draft_layer=4`); repeat for
    /// more (`;` between them in the variable)
    #[arg(long, env = "EXITSERVE_MODE_PRESET", value_delimiter = ';')]
    pub mode_preset: Option<Vec<String>>,
    /// Sequences decoded together in one batch [default: 32]
    #[arg(long, env = "EXITSERVE_MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,
    /// Prompt tokens prefilled per step across the batch; longer prompts are chunked [default: 512]
    #[arg(long, env = "EXITSERVE_MAX_PREFILL_TOKENS")]
    pub max_prefill_tokens: Option<usize>,
    /// KV-cache positions reserved across the batch (prompt + max_tokens of every sequence,
    /// each n/best_of copy counted) [default: half the memory available at start, over the
    /// model's KV bytes per position]
    #[arg(long, env = "EXITSERVE_MAX_BATCH_TOTAL_TOKENS")]
    pub max_batch_total_tokens: Option<usize>,
    /// Prompts x best_of of one request [default: 64]
    #[arg(long, env = "EXITSERVE_MAX_SEQUENCES_PER_REQUEST")]
    pub max_sequences_per_request: Option<usize>,
    /// Requests waiting for a batch slot before new ones get 429 [default: 256]
    #[arg(long, env = "EXITSERVE_MAX_QUEUED_REQUESTS")]
    pub max_queued_requests: Option<usize>,
    /// Longest prompt in tokens [default: the model's context length]
    #[arg(long, env = "EXITSERVE_MAX_INPUT_TOKENS")]
    pub max_input_tokens: Option<usize>,
    /// Largest `n` / `best_of` [default: 8]
    #[arg(long, env = "EXITSERVE_MAX_BEST_OF")]
    pub max_best_of: Option<usize>,
    /// Most `stop` sequences in one request [default: 16]
    #[arg(long, env = "EXITSERVE_MAX_STOP_SEQUENCES")]
    pub max_stop_sequences: Option<usize>,
    /// Longest `stop` sequence in characters [default: 256]
    #[arg(long, env = "EXITSERVE_MAX_STOP_LENGTH")]
    pub max_stop_length: Option<usize>,
    /// Most `logit_bias` entries in one request [default: 300]
    #[arg(long, env = "EXITSERVE_MAX_LOGIT_BIAS")]
    pub max_logit_bias: Option<usize>,
    /// Requests parsed and tokenized at once; the others wait with their raw bodies
    /// [default: the number of CPUs]
    #[arg(long, env = "EXITSERVE_VALIDATION_WORKERS")]
    pub validation_workers: Option<usize>,
    /// Events buffered per choice for a stream whose client reads slowly; past it the
    /// stream's sequences pause until the client reads [default: 64]
    #[arg(long, env = "EXITSERVE_STREAM_BUFFER_EVENTS")]
    pub stream_buffer_events: Option<usize>,
    /// Open client connections; at the cap idle ones are closed and new ones wait
    /// [default: 1024, at most the open-files limit less 64]
    #[arg(long, env = "EXITSERVE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Seconds a client has to send a whole request head once it starts one [default: 10]
    #[arg(long, env = "EXITSERVE_HEADER_READ_TIMEOUT")]
    pub header_read_timeout: Option<f64>,
    /// Seconds a client has to send a whole request body (408 past it) [default: 30]
    #[arg(long, env = "EXITSERVE_BODY_READ_TIMEOUT")]
    pub body_read_timeout: Option<f64>,
    /// Seconds an idle keep-alive connection stays open [default: 60]
    #[arg(long, env = "EXITSERVE_KEEP_ALIVE_TIMEOUT")]
    pub keep_alive_timeout: Option<f64>,
    /// Seconds a request may wait and run before it fails [default: 300]
    #[arg(long, env = "EXITSERVE_REQUEST_TIMEOUT")]
    pub request_timeout: Option<f64>,
    /// Require `Authorization: Bearer <key>` on every route but /health
    #[arg(long, env = "EXITSERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Origin allowed by CORS (repeat or comma-separate); none by default
    #[arg(long, env = "EXITSERVE_CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    pub cors_allow_origin: Option<Vec<String>>,
    /// Largest request body in bytes [default: 1048576]
    #[arg(long, env = "EXITSERVE_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Weight dtype: f32 (exact parity), or bf16/int8 (x86-64 with AVX2 or AVX-512) or f16 for speed
    /// [default: f32]
    #[arg(long, env = "EXITSERVE_DTYPE", value_parser = listed(WeightDtype::ALL))]
    pub dtype: Option<WeightDtype>,
    /// CPU matmul kernels: `auto` (the skinny AVX2/AVX-512/AMX kernels where available) or `candle`
    /// (candle's gemm everywhere) [default: auto]
    #[arg(long, env = "EXITSERVE_MATMUL", value_enum)]
    pub matmul: Option<MatmulKernels>,
    /// Log format [default: text]
    #[arg(long, env = "EXITSERVE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM; a second signal exits
    /// at once [default: 30]
    #[arg(long, env = "EXITSERVE_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<f64>,
    /// Self-speculative decoding for every request that does not ask for it: this exit layer
    /// drafts, the request's mode verifies (modes that decode at or below it are left alone)
    /// [default: off]
    #[arg(long, env = "EXITSERVE_SPECULATIVE_DRAFT_LAYER")]
    pub speculative_draft_layer: Option<usize>,
    /// Most tokens drafted per round, 1..=16 (the round adapts below it), for the default
    /// above and for requests whose `speculative` leaves it out [default: 4]
    #[arg(long, env = "EXITSERVE_SPECULATIVE_MAX_DRAFT_TOKENS")]
    pub speculative_max_draft_tokens: Option<usize>,
    /// Speculative sequences draft only while at most this many sequences decode; in a
    /// bigger batch they decode plainly (a batch already shares each weight read) [default: 1]
    #[arg(long, env = "EXITSERVE_SPECULATIVE_MAX_BATCH_SIZE")]
    pub speculative_max_batch_size: Option<usize>,
    /// What drafts read: int8 copies of the draft layers and exit head (made when a layer
    /// first drafts; output unchanged, drafts ~2.7x cheaper than f32), or the model's own
    /// weights. Int8 copies need f32/bf16 weights on the CPU kernels [default: int8]
    #[arg(long, env = "EXITSERVE_SPECULATIVE_DRAFT_WEIGHTS", value_parser = listed(DraftWeights::ALL))]
    pub speculative_draft_weights: Option<DraftWeights>,
}

/// Every setting resolved.
#[derive(Debug, Clone)]
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
    pub max_batch_total_tokens: Option<usize>,
    pub max_sequences_per_request: usize,
    pub max_queued_requests: usize,
    pub max_input_tokens: Option<usize>,
    pub max_best_of: usize,
    pub max_stop_sequences: usize,
    pub max_stop_length: usize,
    pub max_logit_bias: usize,
    pub validation_workers: usize,
    pub stream_buffer_events: usize,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub request_timeout: Duration,
    pub api_key: Option<String>,
    pub cors_allow_origins: Vec<String>,
    pub max_body_bytes: usize,
    pub dtype: WeightDtype,
    pub matmul: MatmulKernels,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
    pub speculative_draft_layer: Option<usize>,
    pub speculative_max_draft_tokens: usize,
    pub speculative_max_batch_size: usize,
    pub speculative_draft_weights: DraftWeights,
}

pub const DEFAULT_MODEL: &str = "IBM/gpt-neo-125m-multiexit";

impl Settings {
    /// Flags and environment over the `--config` file over defaults.
    pub fn load() -> Result<Self, String> {
        let args = Args::try_parse().map_err(|e| {
            // --help and --version are not errors: clap prints them and we exit 0.
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) {
                e.exit()
            }
            e.to_string().trim_end().to_string()
        })?;
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => Args::default(),
        };
        Self::resolve(args, file)
    }

    pub fn resolve(args: Args, file: Args) -> Result<Self, String> {
        macro_rules! pick {
            ($f:ident) => {
                args.$f.or(file.$f)
            };
        }
        let model = pick!(model).unwrap_or_else(|| DEFAULT_MODEL.to_string());
        let served_model_name = pick!(served_model_name).unwrap_or_else(|| {
            model
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or(&model)
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
        Ok(Self {
            revision: pick!(revision),
            served_model_name,
            host: pick!(host).unwrap_or_else(|| "127.0.0.1".into()),
            port: pick!(port).unwrap_or(8080),
            default_mode: pick!(default_mode).unwrap_or_else(|| "original".into()),
            mode_presets: pick!(mode_preset).unwrap_or_default(),
            max_batch_size: positive("max-batch-size", pick!(max_batch_size).unwrap_or(32))?,
            max_prefill_tokens: positive(
                "max-prefill-tokens",
                pick!(max_prefill_tokens).unwrap_or(512),
            )?,
            max_batch_total_tokens: pick!(max_batch_total_tokens)
                .map(|v| positive("max-batch-total-tokens", v))
                .transpose()?,
            max_sequences_per_request: positive(
                "max-sequences-per-request",
                pick!(max_sequences_per_request).unwrap_or(64),
            )?,
            max_queued_requests: positive(
                "max-queued-requests",
                pick!(max_queued_requests).unwrap_or(256),
            )?,
            max_input_tokens: pick!(max_input_tokens),
            max_best_of: positive("max-best-of", pick!(max_best_of).unwrap_or(8))?,
            max_stop_sequences: pick!(max_stop_sequences).unwrap_or(16),
            max_stop_length: positive("max-stop-length", pick!(max_stop_length).unwrap_or(256))?,
            max_logit_bias: pick!(max_logit_bias).unwrap_or(300),
            validation_workers: positive(
                "validation-workers",
                pick!(validation_workers)
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            )?,
            stream_buffer_events: positive(
                "stream-buffer-events",
                pick!(stream_buffer_events).unwrap_or(64),
            )?,
            max_connections: positive("max-connections", pick!(max_connections).unwrap_or(1024))?,
            header_read_timeout: secs(
                "header-read-timeout",
                pick!(header_read_timeout).unwrap_or(10.0),
            )?,
            body_read_timeout: secs(
                "body-read-timeout",
                pick!(body_read_timeout).unwrap_or(30.0),
            )?,
            keep_alive_timeout: secs(
                "keep-alive-timeout",
                pick!(keep_alive_timeout).unwrap_or(60.0),
            )?,
            request_timeout: secs("request-timeout", pick!(request_timeout).unwrap_or(300.0))?,
            api_key: pick!(api_key).filter(|k| !k.is_empty()),
            cors_allow_origins: pick!(cors_allow_origin).unwrap_or_default(),
            max_body_bytes: positive("max-body-bytes", pick!(max_body_bytes).unwrap_or(1 << 20))?,
            dtype: pick!(dtype).unwrap_or(WeightDtype::F32),
            matmul: pick!(matmul).unwrap_or(MatmulKernels::Auto),
            log_format: pick!(log_format).unwrap_or(LogFormat::Text),
            shutdown_grace: secs("shutdown-grace", pick!(shutdown_grace).unwrap_or(30.0))?,
            speculative_draft_layer: pick!(speculative_draft_layer),
            speculative_max_batch_size: pick!(speculative_max_batch_size).unwrap_or(1),
            speculative_draft_weights: pick!(speculative_draft_weights)
                .unwrap_or(DraftWeights::Int8),
            speculative_max_draft_tokens: {
                let k = pick!(speculative_max_draft_tokens).unwrap_or(4);
                if !(1..=crate::engine::speculative::MAX_DRAFT_TOKENS).contains(&k) {
                    return Err(format!(
                        "--speculative-max-draft-tokens must be in 1..={}, got {k}",
                        crate::engine::speculative::MAX_DRAFT_TOKENS
                    ));
                }
                k
            },
            model,
        })
    }
}

fn read_file(path: &Path) -> Result<Args, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_defaults_fill_the_rest() {
        let file: Args =
            toml::from_str("port = 9000\nmax_batch_size = 4\nmodel = \"a/b-c\"").unwrap();
        let args = Args::try_parse_from(["exitserve", "--port", "7000"]).unwrap();
        let s = Settings::resolve(args, file).unwrap();
        assert_eq!(s.port, 7000);
        assert_eq!(s.max_batch_size, 4);
        assert_eq!(s.served_model_name, "b-c");
        assert_eq!(s.host, "127.0.0.1");
    }

    #[test]
    fn shipped_default_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
        let file = read_file(&path).unwrap();
        Settings::resolve(Args::default(), file).unwrap();
    }

    #[test]
    fn unknown_keys_and_zero_limits_are_errors() {
        assert!(toml::from_str::<Args>("prot = 1").is_err());
        let args = Args::try_parse_from(["exitserve", "--max-batch-size", "0"]).unwrap();
        assert_eq!(
            Settings::resolve(args, Args::default()).unwrap_err(),
            "--max-batch-size must be positive"
        );
    }
}
