//! `POST /v1/chat/completions`: the conversation is rendered by the chat template (in the
//! engine's validation), then runs as a completion; OpenAI's `chat.completion` shapes over
//! the shared event path (`generation.rs`).

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;

use super::error::ApiError;
use super::generation::{self, Delta, Format, Meta};
use super::json::JsonBody;
use super::wire::chat::{
    ChatChoiceOut, ChatCompletionOut, ChatCompletionRequest, ChatDeltaOut, ChatLogprobsOut,
    ChatMessageOut, ChatTokenLogprobOut, TopLogprobOut,
};
use super::wire::{json_of, UsageOut};
use super::AppState;

pub async fn create_chat_completion(
    State(app): State<Arc<AppState>>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    generation::generate::<ChatCompletionRequest, _>(&app, body, "chatcmpl", ChatCompletion).await
}

impl generation::GenerationRequest for ChatCompletionRequest {
    fn model(&self) -> &str {
        &self.model
    }

    fn return_token_ids(&self) -> bool {
        self.return_token_ids.unwrap_or(false)
    }

    fn into_generate(self) -> Result<crate::engine::GenerateRequest, ApiError> {
        ChatCompletionRequest::into_generate(self)
    }
}

/// OpenAI's `chat.completion` and `chat.completion.chunk` shapes.
struct ChatCompletion;

impl ChatCompletion {
    fn envelope(
        meta: &Meta,
        object: &'static str,
        choices: Vec<ChatChoiceOut>,
        usage: Option<Option<UsageOut>>,
    ) -> ChatCompletionOut {
        ChatCompletionOut {
            id: meta.id.clone(),
            object,
            created: meta.created,
            model: meta.model.clone(),
            choices,
            usage,
            multi_exit: meta.multi_exit.clone(),
        }
    }

    /// The logprobs of `d`'s tokens (`bytes`: the UTF-8 of each token's text).
    fn logprobs(meta: &Meta, d: &mut Delta) -> Option<ChatLogprobsOut> {
        if !meta.logprobs {
            return None;
        }
        let content = std::mem::take(&mut d.logprobs)
            .into_iter()
            .map(|e| ChatTokenLogprobOut {
                bytes: e.token.as_bytes().to_vec(),
                logprob: e.logprob.unwrap_or(crate::engine::sequence::MIN_LOGPROB),
                top_logprobs: e
                    .top
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(token, logprob)| TopLogprobOut {
                        bytes: token.as_bytes().to_vec(),
                        token,
                        logprob,
                    })
                    .collect(),
                token: e.token,
            })
            .collect();
        Some(ChatLogprobsOut { content })
    }

    fn choice(meta: &Meta, index: usize, mut d: Delta, whole: bool) -> ChatChoiceOut {
        let logprobs = Self::logprobs(meta, &mut d);
        let (message, delta) = if whole {
            let message = ChatMessageOut {
                role: "assistant",
                content: std::mem::take(&mut d.text),
            };
            (Some(message), None)
        } else {
            // OpenAI's stream: the role (with empty content) first, then content only, and
            // the last chunk of a choice with its finish reason and no content.
            let delta = ChatDeltaOut {
                role: d.first.then_some("assistant"),
                content: (d.first || !d.text.is_empty()).then(|| std::mem::take(&mut d.text)),
            };
            (None, Some(delta))
        };
        ChatChoiceOut {
            index,
            message,
            delta,
            logprobs,
            finish_reason: d.finish_reason,
            token_ids: meta.return_token_ids.then_some(d.token_ids),
            prompt_token_ids: d.prompt_token_ids,
            exit_layers: meta.early_exit.then_some(d.exit_layers),
        }
    }
}

impl Format for ChatCompletion {
    fn response(
        &self,
        meta: &Meta,
        choices: Vec<(usize, Delta)>,
        usage: UsageOut,
    ) -> serde_json::Value {
        let choices = choices
            .into_iter()
            .map(|(i, d)| Self::choice(meta, i, d, true))
            .collect();
        json_of(&Self::envelope(
            meta,
            "chat.completion",
            choices,
            Some(Some(usage)),
        ))
    }

    fn chunk(&self, meta: &Meta, index: usize, delta: Delta) -> serde_json::Value {
        let choice = Self::choice(meta, index, delta, false);
        json_of(&Self::envelope(
            meta,
            "chat.completion.chunk",
            vec![choice],
            meta.include_usage.then_some(None),
        ))
    }

    fn usage_chunk(&self, meta: &Meta, usage: UsageOut) -> serde_json::Value {
        json_of(&Self::envelope(
            meta,
            "chat.completion.chunk",
            vec![],
            Some(Some(usage)),
        ))
    }
}
