//! `/v1/chat/completions` wire types: the request (OpenAI's fields and the same extensions
//! as completions) and the `chat.completion` / `chat.completion.chunk` shapes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::structured::{self, ResponseFormat, StructuredOutputsWire};
use super::{
    mode_spec, speculative_of, stops, streaming, MultiExitOut, MultiExitWire, SpeculativeField,
    Stop, StreamOptions, UsageOut,
};
use crate::engine::request::{LogprobsApi, PromptInput};
use crate::engine::GenerateRequest;
use crate::http::ApiError;
use crate::model::{ChatMessage, ChatPrompt};

/// One message as sent: `content` a string or a list of text parts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageWire {
    pub role: String,
    pub content: Option<serde_json::Value>,
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Option<Vec<MessageWire>>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<BTreeMap<String, f64>>,
    pub user: Option<String>,
    pub response_format: Option<ResponseFormat>,
    pub structured_outputs: Option<StructuredOutputsWire>,
    /// Function calling is not offered: these are refused by name, not as unknown fields.
    pub tools: Option<serde_json::Value>,
    pub tool_choice: Option<serde_json::Value>,
    pub functions: Option<serde_json::Value>,
    pub function_call: Option<serde_json::Value>,
    pub parallel_tool_calls: Option<serde_json::Value>,
    pub top_k: Option<i64>,
    pub repetition_penalty: Option<f64>,
    pub return_token_ids: Option<bool>,
    pub ignore_eos: Option<bool>,
    pub multi_exit: Option<MultiExitWire>,
    pub speculative: Option<SpeculativeField>,
    pub priority: Option<i64>,
    pub cache_salt: Option<String>,
    /// vLLM's: end the prompt with the template's opening of an assistant turn (default true).
    pub add_generation_prompt: Option<bool>,
    /// vLLM's: continue the last (assistant) message instead of starting a new one.
    pub continue_final_message: Option<bool>,
    /// vLLM's: more variables for the chat template.
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad(Some(param), message)
}

/// A message's text: a string, or the text of its parts joined by newlines (vLLM's way).
fn content_text(
    i: usize,
    role: &str,
    content: Option<serde_json::Value>,
) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match content {
        Some(serde_json::Value::String(s)) => Ok(s),
        // An assistant turn may come without content (OpenAI allows it beside tool calls).
        None | Some(serde_json::Value::Null) if role == "assistant" => Ok(String::new()),
        None | Some(serde_json::Value::Null) => Err(bad(&param, format!("`{param}` is required"))),
        Some(serde_json::Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (k, part) in parts.iter().enumerate() {
                match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("text"), Some(t)) if part.as_object().is_some_and(|o| o.len() == 2) => {
                        texts.push(t)
                    }
                    (Some(kind), _) if kind != "text" => {
                        return Err(bad(
                            &format!("{param}[{k}].type"),
                            format!("`{param}[{k}].type` \"{kind}\" is not supported: this model reads text only"),
                        ))
                    }
                    _ => {
                        return Err(bad(
                            &format!("{param}[{k}]"),
                            format!("`{param}[{k}]` must be {{\"type\": \"text\", \"text\": \"...\"}}"),
                        ))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        Some(other) => Err(bad(
            &param,
            format!("`{param}` must be a string or a list of text parts, got {other}"),
        )),
    }
}

fn messages(list: Option<Vec<MessageWire>>) -> Result<Vec<ChatMessage>, ApiError> {
    let list = list.ok_or_else(|| bad("messages", "`messages` is required"))?;
    if list.is_empty() {
        return Err(bad("messages", "`messages` must not be empty"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "user" | "assistant" => m.role.clone(),
            // OpenAI's newer name for the system role; templates know "system".
            "developer" => "system".to_string(),
            "tool" | "function" => {
                return Err(bad(
                    &format!("messages[{i}].role"),
                    format!("`messages[{i}].role` \"{}\": tool and function messages are not supported (this server offers no function calling)", m.role),
                ))
            }
            other => {
                return Err(bad(
                    &format!("messages[{i}].role"),
                    format!("`messages[{i}].role` must be \"system\", \"developer\", \"user\" or \"assistant\", got {other:?}"),
                ))
            }
        };
        out.push(ChatMessage {
            content: content_text(i, &role, m.content)?,
            role,
            name: m.name,
        });
    }
    Ok(out)
}

/// A conversation to render, from the fields chat requests and `/tokenize` share.
pub fn chat_prompt(
    list: Option<Vec<MessageWire>>,
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
    kwargs: Option<serde_json::Map<String, serde_json::Value>>,
) -> Result<ChatPrompt, ApiError> {
    let messages = messages(list)?;
    let continue_final = continue_final_message.unwrap_or(false);
    if continue_final && messages.last().is_some_and(|m| m.role != "assistant") {
        return Err(bad(
            "continue_final_message",
            "`continue_final_message` needs an assistant message last",
        ));
    }
    Ok(ChatPrompt {
        messages,
        add_generation_prompt: add_generation_prompt.unwrap_or(true),
        continue_final_message: continue_final,
        kwargs: kwargs.unwrap_or_default(),
    })
}

impl ChatCompletionRequest {
    /// Maps the wire fields to the engine's request; range checks happen in the engine.
    pub fn into_generate(self) -> Result<GenerateRequest, ApiError> {
        for (field, v) in [
            ("tools", &self.tools),
            ("tool_choice", &self.tool_choice),
            ("functions", &self.functions),
            ("function_call", &self.function_call),
            ("parallel_tool_calls", &self.parallel_tool_calls),
        ] {
            if v.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(bad(
                    field,
                    format!("`{field}` is not supported: this server offers no function calling"),
                ));
            }
        }
        let chat = chat_prompt(
            self.messages,
            self.add_generation_prompt,
            self.continue_final_message,
            self.chat_template_kwargs,
        )?;
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(a), Some(b)) if a != b => {
                return Err(bad(
                    "max_completion_tokens",
                    "`max_completion_tokens` and `max_tokens` differ: send one",
                ))
            }
            (a, b) => a.or(b),
        };
        let (stream, include_usage) = streaming(self.stream, self.stream_options)?;
        let logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (false, Some(_)) => {
                return Err(bad("top_logprobs", "`top_logprobs` needs `logprobs: true`"))
            }
            (false, None) => None,
            (true, top) => Some(top.unwrap_or(0)),
        };
        let (no_speculation, speculative) = speculative_of(self.speculative);
        Ok(GenerateRequest {
            prompts: vec![PromptInput::Chat(chat)],
            mode: mode_spec(self.multi_exit)?,
            named_mode: None,
            max_tokens,
            max_tokens_fill: true,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            n: self.n,
            best_of: None,
            stream,
            include_usage,
            logprobs,
            echo: false,
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
            logprobs_api: LogprobsApi::Chat,
            constraint: structured::constraint_of(self.response_format, self.structured_outputs)?,
        })
    }
}

/// The assistant's message (a whole response).
#[derive(Debug, Serialize)]
pub struct ChatMessageOut {
    pub role: &'static str,
    pub content: String,
}

/// What a stream chunk adds to the message: the role once, first; then content.
#[derive(Debug, Serialize, Default)]
pub struct ChatDeltaOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TopLogprobOut {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Serialize)]
pub struct ChatTokenLogprobOut {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprobOut>,
}

#[derive(Debug, Serialize, Default)]
pub struct ChatLogprobsOut {
    pub content: Vec<ChatTokenLogprobOut>,
}

#[derive(Debug, Serialize)]
pub struct ChatChoiceOut {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<ChatMessageOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<ChatDeltaOut>,
    pub logprobs: Option<ChatLogprobsOut>,
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_layers: Option<Vec<usize>>,
}

#[derive(Debug, Serialize)]
pub struct ChatCompletionOut {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoiceOut>,
    /// Absent in stream chunks unless `include_usage` (then null until the last chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageOut>>,
    pub multi_exit: MultiExitOut,
}
