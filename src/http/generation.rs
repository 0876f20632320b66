//! What `/v1/completions` and `/v1/chat/completions` share: the engine's events folded into
//! each choice ([`ChoiceAcc`], one [`Delta`] per event), the whole response or the SSE
//! stream, deadlines and shutdown. Each route only shapes its JSON ([`Format`]).

use std::convert::Infallible;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};

use super::error::ApiError;
use super::json::{self, JsonBody};
use super::shutdown::Shutdown;
use super::wire::{MultiExitOut, UsageOut};
use super::AppState;
use crate::engine::{
    EngineError, Event, EventReceiver, GenerateRequest, TokenLogprob, ValidRequest,
};

/// What every response of one request shares.
pub(super) struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub multi_exit: MultiExitOut,
    pub prompts: Vec<Vec<u32>>,
    pub n: usize,
    pub best_of: usize,
    pub logprobs: bool,
    pub return_token_ids: bool,
    /// Early exit: each choice reports the layer of each token.
    pub early_exit: bool,
    pub include_usage: bool,
    pub stream: bool,
    pub deadline: Instant,
    pub timeout_secs: f64,
    pub shutdown: Shutdown,
}

impl Meta {
    pub fn new(
        id: String,
        model: String,
        valid: &ValidRequest,
        (stream, include_usage, return_token_ids): (bool, bool, bool),
        timeout_secs: f64,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            id,
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
            timeout_secs,
            shutdown,
        }
    }
}

/// One token's logprob as both routes report it.
#[derive(Debug, Clone)]
pub(super) struct LogprobEntry {
    pub token: String,
    /// None: the first prompt token of an echo (nothing predicts it).
    pub logprob: Option<f32>,
    /// The best alternatives, best first (None with `logprob`).
    pub top: Option<Vec<(String, f32)>>,
    /// Characters of the choice's text before the token.
    pub offset: usize,
}

/// What one event adds to a choice.
#[derive(Debug, Default)]
pub(super) struct Delta {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub exit_layers: Vec<usize>,
    pub logprobs: Vec<LogprobEntry>,
    pub finish_reason: Option<&'static str>,
    /// The prompt's ids, with the choice's first delta (`return_token_ids`).
    pub prompt_token_ids: Option<Vec<u32>>,
    /// This is the choice's first delta.
    pub first: bool,
}

/// One candidate's output so far (kept whole unless streaming).
#[derive(Default)]
pub(super) struct ChoiceAcc {
    pub whole: Delta,
    /// Characters of text so far (OpenAI's `text_offset` counts characters).
    offset: usize,
    pub cumulative_logprob: f64,
    started: bool,
}

fn entry(lp: &TokenLogprob, offset: usize) -> LogprobEntry {
    LogprobEntry {
        token: lp.text.clone(),
        logprob: Some(lp.logprob),
        top: Some(lp.top.iter().map(|(_, t, l)| (t.clone(), *l)).collect()),
        offset,
    }
}

impl ChoiceAcc {
    /// Folds `event` in; returns what it added.
    pub fn apply(&mut self, event: &Event, meta: &Meta, prompt_ids: &[u32]) -> Delta {
        let mut d = Delta {
            first: !self.started,
            ..Delta::default()
        };
        match event {
            Event::Prompt {
                text: t, tokens, ..
            } => {
                d.text = t.clone();
                let mut offset = self.offset;
                for (_, tok_text, lp) in tokens {
                    d.logprobs.push(match lp {
                        Some(lp) => entry(lp, offset),
                        None => LogprobEntry {
                            token: tok_text.clone(),
                            logprob: None,
                            top: None,
                            offset,
                        },
                    });
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
                d.text = t.clone();
                d.token_ids.push(*id);
                d.exit_layers.extend(*exit_layer);
                if let Some(lp) = logprob {
                    d.logprobs.push(entry(lp, self.offset));
                }
            }
            Event::End {
                finish_reason,
                cumulative_logprob,
                ..
            } => {
                d.finish_reason = Some(finish_reason.as_str());
                self.whole.finish_reason = d.finish_reason;
                self.cumulative_logprob = *cumulative_logprob;
            }
            Event::Done { .. } | Event::Error(_) | Event::Inspection { .. } => {}
        }
        self.offset += d.text.chars().count();
        if meta.return_token_ids && !self.started {
            d.prompt_token_ids = Some(prompt_ids.to_vec());
        }
        self.started = true;
        // A stream sends each delta once: keeping them all would hold a whole completion
        // per choice for nothing.
        if !meta.stream {
            let w = &mut self.whole;
            if d.prompt_token_ids.is_some() {
                w.prompt_token_ids = d.prompt_token_ids.take();
            }
            w.text.push_str(&d.text);
            w.token_ids.extend(&d.token_ids);
            w.exit_layers.extend(&d.exit_layers);
            w.logprobs.extend(d.logprobs.iter().cloned());
        }
        d
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

/// The JSON shapes of one route.
pub(super) trait Format: Send + 'static {
    /// The whole response: `choices` as `(index, output)`, in order.
    fn response(
        &self,
        meta: &Meta,
        choices: Vec<(usize, Delta)>,
        usage: UsageOut,
    ) -> serde_json::Value;
    /// A stream chunk with one choice's delta.
    fn chunk(&self, meta: &Meta, index: usize, delta: Delta) -> serde_json::Value;
    /// The stream's last chunk, with the usage and no choices.
    fn usage_chunk(&self, meta: &Meta, usage: UsageOut) -> serde_json::Value;
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

/// A generation route's request body: its model id and its fields as the engine's request.
pub(super) trait GenerationRequest: serde::de::DeserializeOwned {
    fn model(&self) -> &str;
    fn return_token_ids(&self) -> bool;
    fn into_generate(self) -> Result<GenerateRequest, ApiError>;
}

/// A generation route: the body parsed under a validation slot, the model id's mode (an
/// unknown model is a 404 before any other refusal), validation, submission, and the answer
/// in `format` (`id_prefix`: `cmpl`, `chatcmpl`).
pub(super) async fn generate<R: GenerationRequest, F: Format>(
    app: &AppState,
    body: JsonBody,
    id_prefix: &str,
    format: F,
) -> Result<Response, ApiError> {
    let json::Parsed {
        req,
        slot,
        deadline,
    } = body.parse_in_slot::<R>(&app.engine).await?;
    let model = req.model().to_string();
    let return_token_ids = req.return_token_ids();
    let named_mode = app.models.resolve(&model)?;
    let mut gen = req.into_generate()?;
    gen.named_mode = named_mode;
    gen.named_speculative = app.models.speculative(&model);
    let (stream, include_usage) = (gen.stream, gen.include_usage);
    let valid = app.engine.validate(gen, deadline, &slot).await?;
    drop(slot);
    let meta = Meta::new(
        format!("{id_prefix}-{}", app.next_id()),
        model,
        &valid,
        (stream, include_usage, return_token_ids),
        app.engine
            .validator()
            .limits()
            .request_timeout
            .as_secs_f64(),
        app.shutdown.clone(),
    );
    let span = tracing::info_span!("completion", id = %meta.id, mode = meta.multi_exit.mode());
    let rx = app.engine.submit(valid, span)?;
    respond(rx, meta, format).await
}

/// The response to a submitted request: whole, or as server-sent events. A stream's status
/// waits for its first event, so that a request that ends before it generated anything
/// (turned away from a full queue for one of higher priority, timed out or shut down while
/// it waited, failed) gets its status, as a whole response does, not a 200 and an error event.
async fn respond<F: Format>(
    mut rx: EventReceiver,
    meta: Meta,
    format: F,
) -> Result<Response, ApiError> {
    if meta.stream {
        let first =
            match next_event(&mut rx, meta.deadline, meta.timeout_secs, &meta.shutdown).await {
                Some(Event::Error(e)) => return Err(e.into()),
                None => return Err(ApiError::Internal("engine dropped the request".into())),
                Some(first) => first,
            };
        Ok(Sse::new(sse_stream(first, rx, meta, format))
            .keep_alive(KeepAlive::default())
            .into_response())
    } else {
        Ok(Json(collect(rx, meta, format).await?).into_response())
    }
}

async fn collect<F: Format>(
    mut rx: EventReceiver,
    meta: Meta,
    format: F,
) -> Result<serde_json::Value, ApiError> {
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
    for p in 0..meta.prompts.len() {
        let mut group: Vec<ChoiceAcc> = accs.by_ref().take(meta.best_of).collect();
        if meta.best_of > meta.n {
            group.sort_by(|a, b| b.cumulative_logprob.total_cmp(&a.cumulative_logprob));
            group.truncate(meta.n);
        }
        for (k, acc) in group.into_iter().enumerate() {
            choices.push((p * meta.n + k, acc.whole));
        }
    }
    Ok(format.response(&meta, choices, usage.into()))
}

/// The events of a stream whose `first` was received already.
fn sse_stream<F: Format>(
    first: Event,
    rx: EventReceiver,
    meta: Meta,
    format: F,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    use futures_util::StreamExt;
    let total = meta.prompts.len() * meta.best_of;
    let accs: Vec<ChoiceAcc> = (0..total).map(|_| ChoiceAcc::default()).collect();
    let state = Some((Some(first), rx, meta, accs, format));
    let chunks = stream::unfold(state, |state| async move {
        let (first, mut rx, meta, mut accs, format) = state?;
        let event = match first {
            Some(first) => Some(first),
            None => next_event(&mut rx, meta.deadline, meta.timeout_secs, &meta.shutdown).await,
        };
        let data = |v: serde_json::Value| Ok(SseEvent::default().data(v.to_string()));
        let done = || Ok(SseEvent::default().data("[DONE]"));
        match event {
            Some(Event::Done { usage }) => {
                let mut out = Vec::new();
                if meta.include_usage {
                    out.push(data(format.usage_chunk(&meta, usage.into())));
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
                let delta = accs[c].apply(&ev, &meta, &meta.prompts[c / meta.best_of]);
                // Streaming requires best_of = n, so candidate numbers are choice indexes.
                let out = vec![data(format.chunk(&meta, c, delta))];
                Some((out, Some((None, rx, meta, accs, format))))
            }
        }
    });
    chunks.flat_map(stream::iter)
}
