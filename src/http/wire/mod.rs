//! OpenAI wire types (serde) and their conversion to the engine's request: the completion
//! route's and the shared ones here, `chat.rs` (chat completions), `structured.rs`
//! (`response_format`, `structured_outputs`).

pub mod chat;
pub mod structured;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::engine::request::{LogprobsApi, ModeSpec, PromptInput, SpeculativeRequest};
use crate::engine::GenerateRequest;
use crate::model::Mode;

/// `prompt`: a string, a list of strings, a list of token ids, or a list of such lists.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<i64>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<i64>>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// A mode object as sent (`multi_exit`, an inspection's strategy): `mode` and the strategy's
/// fields, read by the strategy itself (`model::mode`), so that each strategy owns its
/// fields.
pub type MultiExitWire = serde_json::Map<String, serde_json::Value>;

/// A mode object named `object` as the engine validates it. `implied`: the strategy a
/// shorthand field stands for (an inspection's `contrast`), whose `mode` may be left out.
pub fn mode_object(
    object: &str,
    mut fields: MultiExitWire,
    implied: Option<&'static str>,
) -> Result<ModeSpec, super::ApiError> {
    let param = format!("{object}.mode");
    let one_of = Mode::LABELS.join(", ");
    let mode = match (fields.remove("mode"), implied) {
        (None | Some(serde_json::Value::Null), Some(implied)) => implied,
        (None | Some(serde_json::Value::Null), None) => {
            return Err(super::ApiError::bad(
                Some(&param),
                format!("`{param}` is required: one of {one_of}"),
            ))
        }
        (Some(v), implied) => {
            let known = v.as_str().and_then(Mode::known_label);
            match (known, implied) {
                (Some(m), None) => m,
                (Some(m), Some(i)) if m == i => m,
                (_, Some(i)) => {
                    return Err(super::ApiError::bad(
                        Some(&param),
                        format!("`{param}` must be {i:?} here (or left out), got {v}"),
                    ))
                }
                (None, None) => {
                    return Err(super::ApiError::bad(
                        Some(&param),
                        format!("`{param}` must be one of {one_of}, got {v}"),
                    ))
                }
            }
        }
    };
    Ok(ModeSpec { mode, fields })
}

/// Unknown fields are rejected (400 naming the field), as OpenAI does.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Option<Prompt>,
    pub suffix: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: Option<i64>,
    pub best_of: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<BTreeMap<String, f64>>,
    pub user: Option<String>,
    pub top_k: Option<i64>,
    pub repetition_penalty: Option<f64>,
    pub return_token_ids: Option<bool>,
    pub ignore_eos: Option<bool>,
    pub multi_exit: Option<MultiExitWire>,
    pub speculative: Option<SpeculativeField>,
    /// vLLM's admission order: lower first (default 0).
    pub priority: Option<i64>,
    /// vLLM's prefix-cache isolation: only requests with the same salt share cached prompts.
    pub cache_salt: Option<String>,
    pub response_format: Option<structured::ResponseFormat>,
    pub structured_outputs: Option<structured::StructuredOutputsWire>,
}

/// The `speculative` extension: self-speculative decoding from an exit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeculativeWire {
    pub draft_layer: Option<i64>,
    pub max_draft_tokens: Option<i64>,
    pub adaptive: Option<bool>,
}

/// `speculative` as sent: an object, `true` (the defaults) or `false` (no drafts, whatever
/// the server's default or the model id's preset).
#[derive(Debug)]
pub enum SpeculativeField {
    Off,
    On(SpeculativeWire),
}

impl<'de> Deserialize<'de> for SpeculativeField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Bool(false) => Ok(SpeculativeField::Off),
            serde_json::Value::Bool(true) => Ok(SpeculativeField::On(SpeculativeWire {
                draft_layer: None,
                max_draft_tokens: None,
                adaptive: None,
            })),
            // The object's own errors (an unknown field, a wrong type), as they are.
            other => SpeculativeWire::deserialize(other)
                .map(SpeculativeField::On)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// The `multi_exit` object as the engine's spec.
pub fn mode_spec(multi_exit: Option<MultiExitWire>) -> Result<Option<ModeSpec>, super::ApiError> {
    multi_exit
        .map(|m| mode_object("multi_exit", m, None))
        .transpose()
}

/// `speculative` as the engine reads it: (`false` sent, the object).
pub fn speculative_of(s: Option<SpeculativeField>) -> (bool, Option<SpeculativeRequest>) {
    match s {
        Some(SpeculativeField::Off) => (true, None),
        Some(SpeculativeField::On(s)) => (
            false,
            Some(SpeculativeRequest {
                draft_layer: s.draft_layer,
                max_draft_tokens: s.max_draft_tokens,
                adaptive: s.adaptive,
            }),
        ),
        None => (false, None),
    }
}

/// `stream` and `stream_options.include_usage`; the options only with `stream: true`.
pub fn streaming(
    stream: Option<bool>,
    options: Option<StreamOptions>,
) -> Result<(bool, bool), super::ApiError> {
    let stream = stream.unwrap_or(false);
    let include_usage = options.and_then(|o| o.include_usage).unwrap_or(false);
    if include_usage && !stream {
        return Err(super::ApiError::bad(
            Some("stream_options"),
            "`stream_options` is only allowed with `stream: true`",
        ));
    }
    Ok((stream, include_usage))
}

/// `stop` as a list.
pub fn stops(stop: Option<Stop>) -> Vec<String> {
    match stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    }
}

/// A response DTO as JSON (our DTOs always serialise; the fallback only keeps a stream going).
pub fn json_of<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot serialise a response");
        serde_json::Value::Null
    })
}

impl CompletionRequest {
    /// Maps the wire fields to the engine's request; range checks happen in the engine.
    pub fn into_generate(self) -> Result<GenerateRequest, super::ApiError> {
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(super::ApiError::bad(
                Some("suffix"),
                "`suffix` is not supported: this model has no fill-in-the-middle training",
            ));
        }
        let prompts = match self.prompt {
            None => return Err(super::ApiError::bad(Some("prompt"), "`prompt` is required")),
            Some(Prompt::Text(t)) => vec![PromptInput::Text(t)],
            Some(Prompt::Texts(ts)) => ts.into_iter().map(PromptInput::Text).collect(),
            Some(Prompt::Tokens(ids)) => vec![PromptInput::Tokens(ids)],
            Some(Prompt::TokenLists(ls)) => ls.into_iter().map(PromptInput::Tokens).collect(),
        };
        let (stream, include_usage) = streaming(self.stream, self.stream_options)?;
        let mode = mode_spec(self.multi_exit)?;
        let (no_speculation, speculative) = speculative_of(self.speculative);
        let constraint = structured::constraint_of(self.response_format, self.structured_outputs)?;
        Ok(GenerateRequest {
            prompts,
            mode,
            named_mode: None,
            max_tokens: self.max_tokens,
            max_tokens_fill: false,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            n: self.n,
            best_of: self.best_of,
            stream,
            include_usage,
            logprobs: self.logprobs,
            echo: self.echo.unwrap_or(false),
            stop: stops(self.stop),
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repetition_penalty: self.repetition_penalty,
            logit_bias: self.logit_bias.unwrap_or_default().into_iter().collect(),
            return_token_ids: self.return_token_ids.unwrap_or(false),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            no_speculation,
            speculative,
            named_speculative: None,
            priority: self.priority,
            cache_salt: self.cache_salt,
            logprobs_api: LogprobsApi::Completions,
            constraint,
        })
    }
}

/// The resolved mode, echoed in responses: `mode`, `name` (its flag form, as
/// `--mode-preset` takes it) and its strategy's parameters as resolved for this model.
#[derive(Debug, Serialize, Clone)]
#[serde(transparent)]
pub struct MultiExitOut(serde_json::Map<String, serde_json::Value>);

impl MultiExitOut {
    /// `multi_exit.mode`.
    pub fn mode(&self) -> &str {
        self.0.get("mode").and_then(|m| m.as_str()).unwrap_or("")
    }
}

impl From<&Mode> for MultiExitOut {
    fn from(m: &Mode) -> Self {
        let mut out = serde_json::Map::new();
        out.insert("mode".into(), m.label().into());
        out.insert("name".into(), m.to_string().into());
        out.extend(m.describe().into_iter().filter(|(k, _)| k != "mode"));
        MultiExitOut(out)
    }
}

#[derive(Debug, Serialize, Clone, Default)]
pub struct LogprobsOut {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Serialize, Clone)]
pub struct ChoiceOut {
    pub text: String,
    pub index: usize,
    pub logprobs: Option<LogprobsOut>,
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// Early exit: the layer each generated token left at (the top layer: the original head).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_layers: Option<Vec<usize>>,
}

#[derive(Debug, Serialize, Clone)]
pub struct UsageOut {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetailsOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speculative: Option<SpeculativeUsageOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early_exit: Option<EarlyExitUsageOut>,
}

/// `usage.prompt_tokens_details` (OpenAI's): prompt tokens served by the prefix cache.
#[derive(Debug, Serialize, Clone, Copy)]
pub struct PromptTokensDetailsOut {
    pub cached_tokens: usize,
}

/// `usage.early_exit`: generated tokens by the layer each left at (keys: layers, `original`).
#[derive(Debug, Serialize, Clone)]
pub struct EarlyExitUsageOut {
    pub tokens_by_layer: BTreeMap<String, usize>,
}

#[derive(Debug, Serialize, Clone, Copy)]
pub struct SpeculativeUsageOut {
    pub drafted: usize,
    pub accepted: usize,
}

impl From<crate::engine::Usage> for UsageOut {
    fn from(u: crate::engine::Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: PromptTokensDetailsOut {
                cached_tokens: u.cached_tokens,
            },
            speculative: u.speculative.map(|s| SpeculativeUsageOut {
                drafted: s.drafted,
                accepted: s.accepted,
            }),
            early_exit: u
                .early_exit
                .map(|tokens_by_layer| EarlyExitUsageOut { tokens_by_layer }),
        }
    }
}

#[derive(Debug, Serialize, Clone)]
pub struct CompletionOut {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChoiceOut>,
    /// Absent in stream chunks unless `include_usage` (then null until the last chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageOut>>,
    pub multi_exit: MultiExitOut,
}
