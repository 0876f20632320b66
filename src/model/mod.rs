//! The multi-exit model in candle: configuration, checkpoint files, weights, the forward with
//! KV caches, exit heads and the contrast math. No async runtime and no HTTP in here, and no
//! `unsafe`: the hand-written kernels are in `crate::kernels`.
//!
//! - `arch/`: what differs per architecture (GPT-Neo, GPT-2): config names, weight layout.
//! - `multi_exit.rs` (the model), `block.rs`, `attention.rs` (the CPU kernels' path),
//!   `batched_attention.rs` (every other device's, over the paged `kv_pool.rs`), `weights.rs`
//!   (dtypes, packed projections), `step.rs` (a step's packed batch and its logits),
//!   `head_copies.rs` (the heads' products on their way to the host), `kv_cache.rs` (a
//!   sequence's cache, in either store): shared.
//! - `source.rs`, `safetensors_file.rs`, `finite_weights.rs`, `loader.rs`: checkpoint files.
//! - `mode/` (heads and modes; `contrast.rs`, `dola.rs`), `inspect.rs`, `tokenizer.rs`,
//!   `chat_template.rs` (a conversation's prompt text).

#![forbid(unsafe_code)]

pub mod arch;
mod attention;
mod batched_attention;
mod block;
pub mod chat_template;
pub mod config;
pub mod cost;
pub mod error;
pub mod finite_weights;
mod head_copies;
pub mod inspect;
pub mod kv_cache;
mod kv_pool;
pub mod loader;
pub mod mode;
pub mod multi_exit;
pub mod safetensors_file;
pub mod source;
pub mod step;
pub mod tokenizer;
pub mod weights;

pub use arch::Architecture;
pub use chat_template::{ChatMessage, ChatPrompt, ChatTemplate};
pub use config::ModelConfig;
pub use error::{ModelError, Result};
pub use kv_cache::{KvCache, KvRun};
pub use loader::{load, LoadOptions, LoadedModel};
pub use mode::{ContrastParams, DeviceChoice, Head, Mode, Upper};
pub use multi_exit::MultiExitModel;
pub use step::{Logits, LogprobRead, LogprobTargets, SeqStep, StepLogits};
pub use tokenizer::{IncrementalDecoder, TextTokenizer};
pub use weights::{DraftWeights, WeightDtype};
