//! vLLM's tokenizer routes at the server root, as lm-eval's `tokenizer_backend=remote` and
//! other clients call them: `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`.
//! Tokenizing is CPU work on a body of up to `--max-body-bytes`: it takes a validation slot,
//! runs off the async runtime, and is bounded by the context length (a longer text or id list
//! is refused before any work).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::error::ApiError;
use super::json::{JsonBody, Parsed};
use super::wire::chat::{chat_prompt, MessageWire};
use super::AppState;
use crate::engine::TokenizeInput;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    /// A text, or (vLLM's other shape) `messages` as the chat template renders them.
    pub prompt: Option<String>,
    pub messages: Option<Vec<MessageWire>>,
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    /// GPT-2's tokenizer adds no special tokens either way; accepted for compatibility.
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
    /// Also return each token's text.
    #[serde(default)]
    pub return_token_strs: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_strs: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<i64>,
}

/// A `model` field, when present, must name this server's model (any of its mode ids).
fn check_model(app: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        None => Ok(()),
        Some(m) => app.models.resolve(m).map(|_| ()),
    }
}

pub async fn tokenize(
    State(app): State<Arc<AppState>>,
    body: JsonBody,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let limits = app.engine.validator().limits();
    let Parsed { req, slot, .. } = body.parse_in_slot::<TokenizeRequest>(&app.engine).await?;
    check_model(&app, req.model.as_deref())?;
    let strs = req.return_token_strs.unwrap_or(false);
    let input = match (req.prompt, req.messages) {
        (Some(p), None) => TokenizeInput::Text(p),
        (None, Some(m)) => TokenizeInput::Chat(chat_prompt(
            Some(m),
            req.add_generation_prompt,
            req.continue_final_message,
            req.chat_template_kwargs,
        )?),
        _ => {
            return Err(ApiError::bad(
                Some("prompt"),
                "send `prompt` (a text) or `messages` (a conversation), one of them",
            ))
        }
    };
    let (tokens, token_strs) = app.engine.tokenize(input, strs, &slot).await?;
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: limits.max_positions,
        tokens,
        token_strs,
    }))
}

pub async fn detokenize(
    State(app): State<Arc<AppState>>,
    body: JsonBody,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Parsed { req, slot, .. } = body.parse_in_slot::<DetokenizeRequest>(&app.engine).await?;
    check_model(&app, req.model.as_deref())?;
    let prompt = app.engine.detokenize(req.tokens, &slot).await?;
    Ok(Json(json!({ "prompt": prompt })))
}

/// What a client needs to rebuild prompts: the special tokens and the context length.
pub async fn tokenizer_info(State(app): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let limits = app.engine.validator().limits();
    let eos = app.engine.eos_token();
    Json(json!({
        "tokenizer_class": "GPT2TokenizerFast",
        "eos_token": eos,
        "bos_token": eos,
        "unk_token": eos,
        "pad_token": null,
        "model_max_length": limits.max_positions,
        "vocab_size": limits.vocab_size,
        "add_bos_token": false,
        "chat_template": app.engine.validator().chat_template_source(),
    }))
}
