//! The multi-exit GPT-Neo in candle: configuration, checkpoint files, weights, forward with
//! KV caches, exit heads and the contrast math. No async runtime and no HTTP in here.

#[cfg(target_arch = "x86_64")]
mod amx;
pub mod config;
pub mod cpu_features;
pub mod error;
pub mod fastmath;
pub mod finite_weights;
pub mod gpt_neo;
pub mod inspect;
pub mod kv_cache;
pub mod loader;
pub mod mode;
pub mod safetensors_file;
pub mod skinny_matmul;
pub mod source;
pub mod tokenizer;

pub use config::GptNeoConfig;
pub use error::{ModelError, Result};
pub use gpt_neo::{MultiExitGptNeo, SeqStep, WeightDtype};
pub use kv_cache::KvCache;
pub use loader::{load, LoadOptions, LoadedModel};
pub use mode::{ContrastParams, Head, Mode, Upper};
pub use tokenizer::{IncrementalDecoder, TextTokenizer};
