//! `POST /v1/completions`: OpenAI's text completion shapes over the shared event path
//! (`generation.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;

use super::error::ApiError;
use super::generation::{self, Delta, Format, Meta};
use super::json::JsonBody;
use super::wire::{json_of, ChoiceOut, CompletionOut, CompletionRequest, LogprobsOut, UsageOut};
use super::AppState;

pub async fn create_completion(
    State(app): State<Arc<AppState>>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    generation::generate::<CompletionRequest, _>(&app, body, "cmpl", TextCompletion).await
}

impl generation::GenerationRequest for CompletionRequest {
    fn model(&self) -> &str {
        &self.model
    }

    fn return_token_ids(&self) -> bool {
        self.return_token_ids.unwrap_or(false)
    }

    fn into_generate(self) -> Result<crate::engine::GenerateRequest, ApiError> {
        CompletionRequest::into_generate(self)
    }
}

/// OpenAI's `text_completion` shapes.
struct TextCompletion;

impl TextCompletion {
    fn envelope(
        meta: &Meta,
        choices: Vec<ChoiceOut>,
        usage: Option<Option<UsageOut>>,
    ) -> CompletionOut {
        CompletionOut {
            id: meta.id.clone(),
            object: "text_completion",
            created: meta.created,
            model: meta.model.clone(),
            choices,
            usage,
            multi_exit: meta.multi_exit.clone(),
        }
    }

    fn choice(meta: &Meta, index: usize, d: Delta) -> ChoiceOut {
        let mut lp = LogprobsOut::default();
        for e in d.logprobs {
            // The chosen token is among its own alternatives, as OpenAI reports them.
            let top = e.top.map(|top| {
                let mut m: BTreeMap<String, f32> = top.into_iter().collect();
                if let Some(l) = e.logprob {
                    m.entry(e.token.clone()).or_insert(l);
                }
                m
            });
            lp.tokens.push(e.token);
            lp.token_logprobs.push(e.logprob);
            lp.top_logprobs.push(top);
            lp.text_offset.push(e.offset);
        }
        ChoiceOut {
            text: d.text,
            index,
            logprobs: meta.logprobs.then_some(lp),
            finish_reason: d.finish_reason,
            token_ids: meta.return_token_ids.then_some(d.token_ids),
            prompt_token_ids: d.prompt_token_ids,
            exit_layers: meta.early_exit.then_some(d.exit_layers),
        }
    }
}

impl Format for TextCompletion {
    fn response(
        &self,
        meta: &Meta,
        choices: Vec<(usize, Delta)>,
        usage: UsageOut,
    ) -> serde_json::Value {
        let choices = choices
            .into_iter()
            .map(|(i, d)| Self::choice(meta, i, d))
            .collect();
        json_of(&Self::envelope(meta, choices, Some(Some(usage))))
    }

    fn chunk(&self, meta: &Meta, index: usize, delta: Delta) -> serde_json::Value {
        let choice = Self::choice(meta, index, delta);
        json_of(&Self::envelope(
            meta,
            vec![choice],
            meta.include_usage.then_some(None),
        ))
    }

    fn usage_chunk(&self, meta: &Meta, usage: UsageOut) -> serde_json::Value {
        json_of(&Self::envelope(meta, vec![], Some(Some(usage))))
    }
}
