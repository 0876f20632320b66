//! `POST /v1/completions`: one event -> DTO path shared by the JSON body and the SSE stream.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};

use super::error::ApiError;
use super::json::{JsonBody, Parsed};
use super::shutdown::Shutdown;
use super::wire::{
    ChoiceOut, CompletionOut, CompletionRequest, LogprobsOut, MultiExitOut, UsageOut,
};
use super::AppState;
use crate::engine::{EngineError, Event, EventReceiver, TokenLogprob};

/// What every response of one request shares.
struct Meta {
    id: String,
    created: u64,
    model: String,
    multi_exit: MultiExitOut,
    prompts: Vec<Vec<u32>>,
    n: usize,
    best_of: usize,
    logprobs: bool,
    return_token_ids: bool,
    /// Early exit: each choice reports the layer of each token.
    early_exit: bool,
    include_usage: bool,
    stream: bool,
    deadline: Instant,
    timeout_secs: f64,
    shutdown: Shutdown,
}

impl Meta {
    fn envelope(&self, choices: Vec<ChoiceOut>, usage: Option<Option<UsageOut>>) -> CompletionOut {
        CompletionOut {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            multi_exit: self.multi_exit.clone(),
        }
    }
}

/// One candidate's accumulated output; `apply` also returns the delta of each event.
#[derive(Default)]
struct ChoiceAcc {
    text: String,
    token_ids: Vec<u32>,
    exit_layers: Vec<usize>,
    logprobs: LogprobsOut,
    /// Characters of text so far (OpenAI's `text_offset` counts characters).
    offset: usize,
    finish_reason: Option<&'static str>,
    cumulative_logprob: f64,
    sent_prompt_ids: bool,
}

fn top_map(lp: &TokenLogprob) -> BTreeMap<String, f32> {
    let mut m: BTreeMap<String, f32> = lp.top.iter().map(|(_, t, l)| (t.clone(), *l)).collect();
    m.entry(lp.text.clone()).or_insert(lp.logprob);
    m
}

impl ChoiceAcc {
    /// Folds `event` in; returns the delta as a choice (`index` is set by the caller).
    fn apply(&mut self, event: &Event, meta: &Meta, prompt_ids: &[u32]) -> ChoiceOut {
        let mut delta = LogprobsOut::default();
        let mut text = String::new();
        let mut ids = Vec::new();
        let mut layers = Vec::new();
        match event {
            Event::Prompt {
                text: t, tokens, ..
            } => {
                text = t.clone();
                let mut offset = self.offset;
                for (_, tok_text, lp) in tokens {
                    delta.tokens.push(tok_text.clone());
                    delta.token_logprobs.push(lp.as_ref().map(|l| l.logprob));
                    delta.top_logprobs.push(lp.as_ref().map(top_map));
                    delta.text_offset.push(offset);
                    offset += tok_text.chars().count();
                }
            }
            Event::Token {
                id,
                text: t,
                logprob,
                exit_layer,
                ..
            } => {
                text = t.clone();
                ids.push(*id);
                layers.extend(*exit_layer);
                if let Some(lp) = logprob {
                    delta.tokens.push(lp.text.clone());
                    delta.token_logprobs.push(Some(lp.logprob));
                    delta.top_logprobs.push(Some(top_map(lp)));
                    delta.text_offset.push(self.offset);
                }
            }
            Event::End {
                finish_reason,
                cumulative_logprob,
                ..
            } => {
                self.finish_reason = Some(finish_reason.as_str());
                self.cumulative_logprob = *cumulative_logprob;
            }
            Event::Done { .. } | Event::Error(_) | Event::Inspection { .. } => {}
        }
        self.offset += text.chars().count();
        // A stream sends each delta once: keeping them all would hold a whole completion
        // per choice for nothing.
        if !meta.stream {
            self.text.push_str(&text);
            self.token_ids.extend(&ids);
            self.exit_layers.extend(&layers);
            self.logprobs.tokens.extend(delta.tokens.iter().cloned());
            self.logprobs.token_logprobs.extend(&delta.token_logprobs);
            self.logprobs
                .top_logprobs
                .extend(delta.top_logprobs.iter().cloned());
            self.logprobs.text_offset.extend(&delta.text_offset);
        }
        let prompt_token_ids =
            (meta.return_token_ids && !self.sent_prompt_ids).then(|| prompt_ids.to_vec());
        self.sent_prompt_ids = true;
        ChoiceOut {
            text,
            index: 0,
            logprobs: meta.logprobs.then_some(delta),
            finish_reason: match event {
                Event::End { .. } => self.finish_reason,
                _ => None,
            },
            token_ids: meta.return_token_ids.then_some(ids),
            prompt_token_ids,
            exit_layers: meta.early_exit.then_some(layers),
        }
    }

    fn into_choice(self, index: usize, meta: &Meta, prompt_ids: &[u32]) -> ChoiceOut {
        ChoiceOut {
            text: self.text,
            index,
            logprobs: meta.logprobs.then_some(self.logprobs),
            finish_reason: self.finish_reason,
            token_ids: meta.return_token_ids.then_some(self.token_ids),
            prompt_token_ids: meta.return_token_ids.then(|| prompt_ids.to_vec()),
            exit_layers: meta.early_exit.then_some(self.exit_layers),
        }
    }
}

fn candidate_of(event: &Event) -> Option<usize> {
    match event {
        Event::Prompt { candidate, .. }
        | Event::Token { candidate, .. }
        | Event::End { candidate, .. } => Some(*candidate),
        Event::Done { .. } | Event::Error(_) | Event::Inspection { .. } => None,
    }
}

/// The next event; a timeout error once the request's deadline passes (also while it still
/// waits in the queue); a shutdown error when the server's grace period ends.
/// `timeout_secs` is what the timeout error reports (`--request-timeout`).
pub(super) async fn next_event(
    rx: &mut EventReceiver,
    deadline: Instant,
    timeout_secs: f64,
    shutdown: &Shutdown,
) -> Option<Event> {
    tokio::select! {
        r = tokio::time::timeout_at(deadline.into(), rx.recv()) => match r {
            Ok(ev) => ev,
            Err(_) => Some(Event::Error(EngineError::Timeout {
                seconds: timeout_secs,
            })),
        },
        _ = shutdown.cut() => Some(Event::Error(EngineError::ShuttingDown)),
    }
}

pub async fn create_completion(
    State(app): State<Arc<AppState>>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let limits = app.engine.validator().limits();
    let Parsed {
        req,
        slot,
        deadline,
    } = body.parse_in_slot::<CompletionRequest>(&app.engine).await?;
    let named_mode = app.models.resolve(&req.model)?;
    let model = req.model.clone();
    let return_token_ids = req.return_token_ids.unwrap_or(false);
    let mut gen = req.into_generate()?;
    gen.named_mode = named_mode;
    gen.named_speculative = app.models.speculative(&model);
    let (stream, include_usage) = (gen.stream, gen.include_usage);
    let valid = app.engine.validate(gen, deadline, &slot).await?;
    drop(slot);
    let meta = Meta {
        id: format!("cmpl-{}", app.next_id()),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model,
        multi_exit: MultiExitOut::from(&valid.mode),
        prompts: valid.prompts.clone(),
        n: valid.n,
        best_of: valid.best_of,
        logprobs: valid.logprobs.is_some(),
        return_token_ids,
        early_exit: valid.mode.early_exit().is_some(),
        include_usage,
        stream,
        deadline: valid.deadline,
        timeout_secs: limits.request_timeout.as_secs_f64(),
        shutdown: app.shutdown.clone(),
    };
    let span = tracing::info_span!("completion", id = %meta.id, mode = meta.multi_exit.mode);
    let rx = app.engine.submit(valid, span)?;
    if stream {
        Ok(Sse::new(sse_stream(rx, meta))
            .keep_alive(KeepAlive::default())
            .into_response())
    } else {
        Ok(Json(collect(rx, meta).await?).into_response())
    }
}

async fn collect(mut rx: EventReceiver, meta: Meta) -> Result<CompletionOut, ApiError> {
    let total = meta.prompts.len() * meta.best_of;
    let mut accs: Vec<ChoiceAcc> = (0..total).map(|_| ChoiceAcc::default()).collect();
    let usage = loop {
        let Some(event) =
            next_event(&mut rx, meta.deadline, meta.timeout_secs, &meta.shutdown).await
        else {
            return Err(ApiError::Internal("engine dropped the request".into()));
        };
        match event {
            Event::Done { usage } => break usage,
            Event::Error(e) => return Err(e.into()),
            ev => {
                if let Some(c) = candidate_of(&ev) {
                    let prompt = &meta.prompts[c / meta.best_of];
                    accs[c].apply(&ev, &meta, prompt);
                }
            }
        }
    };
    // Per prompt: the n candidates with the best total logprob (all of them when best_of = n).
    let mut choices = Vec::with_capacity(meta.prompts.len() * meta.n);
    let mut accs = accs.into_iter();
    for (p, prompt) in meta.prompts.iter().enumerate() {
        let mut group: Vec<ChoiceAcc> = accs.by_ref().take(meta.best_of).collect();
        if meta.best_of > meta.n {
            group.sort_by(|a, b| b.cumulative_logprob.total_cmp(&a.cumulative_logprob));
            group.truncate(meta.n);
        }
        for (k, acc) in group.into_iter().enumerate() {
            choices.push(acc.into_choice(p * meta.n + k, &meta, prompt));
        }
    }
    Ok(meta.envelope(choices, Some(Some(usage.into()))))
}

fn sse_stream(rx: EventReceiver, meta: Meta) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    use futures_util::StreamExt;
    let total = meta.prompts.len() * meta.best_of;
    let accs: Vec<ChoiceAcc> = (0..total).map(|_| ChoiceAcc::default()).collect();
    let state = Some((rx, meta, accs));
    let chunks = stream::unfold(state, |state| async move {
        let (mut rx, meta, mut accs) = state?;
        let event = next_event(&mut rx, meta.deadline, meta.timeout_secs, &meta.shutdown).await;
        let data = |v: serde_json::Value| Ok(SseEvent::default().data(v.to_string()));
        let done = || Ok(SseEvent::default().data("[DONE]"));
        // A chunk that cannot be serialised ends the stream with an error event, never
        // with `data: null`.
        let chunk_data = |chunk: &CompletionOut| match serde_json::to_value(chunk) {
            Ok(v) => vec![data(v)],
            Err(e) => {
                let err = ApiError::Internal(format!("cannot serialise a chunk: {e}"));
                tracing::error!(error = ?err, "stream failed");
                vec![data(err.body()), done()]
            }
        };
        match event {
            Some(Event::Done { usage }) => {
                let mut out = Vec::new();
                if meta.include_usage {
                    let chunk = meta.envelope(vec![], Some(Some(usage.into())));
                    out = chunk_data(&chunk);
                    if out.len() > 1 {
                        return Some((out, None));
                    }
                }
                out.push(done());
                Some((out, None))
            }
            Some(Event::Error(e)) => {
                let err = ApiError::from(e);
                if err.status().is_server_error() {
                    tracing::error!(error = ?err, "stream failed");
                }
                Some((vec![data(err.body()), done()], None))
            }
            None => {
                let err = ApiError::Internal("engine dropped the request".into());
                Some((vec![data(err.body()), done()], None))
            }
            Some(ev) => {
                let c = candidate_of(&ev).unwrap_or(0);
                let prompt = meta.prompts[c / meta.best_of].clone();
                let mut choice = accs[c].apply(&ev, &meta, &prompt);
                // Streaming requires best_of = n, so candidate numbers are choice indexes.
                choice.index = c;
                let chunk = meta.envelope(vec![choice], meta.include_usage.then_some(None));
                let out = chunk_data(&chunk);
                let next = (out.len() == 1).then_some((rx, meta, accs));
                Some((out, next))
            }
        }
    });
    chunks.flat_map(stream::iter)
}
