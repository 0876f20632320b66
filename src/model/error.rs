//! Errors of loading and running a multi-exit checkpoint.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file of the checkpoint is missing or unreadable.
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    /// `config.json` lacks a field, or a field has a value this server cannot run.
    #[error("{path}: field `{field}`: {message}")]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },
    /// A weight is absent from the checkpoint or has the wrong shape.
    #[error("tensor `{name}`: {message}")]
    Tensor { name: String, message: String },
    /// The tokenizer could not be built or could not encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A mode names a layer that has no exit head.
    #[error("layer {layer} is not an exit of this model; available exits: {available:?}")]
    NotAnExit { layer: usize, available: Vec<usize> },
    /// The chat template does not compile, or `--chat-template` names nothing.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// Downloading from the Hugging Face hub failed.
    #[error("hub: {0}")]
    Hub(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;
