//! One candidate completion inside the batch: its cache, sampler, detokenizer and stop state.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::request::{
    events_per_step, Event, EventSender, FinishReason, PositionReport, TokenLogprob, Usage,
    ValidRequest,
};
use super::sampling::Sampler;
use super::scheduler::QueueKey;
use super::speculative::Speculation;
use super::stop::StopMatcher;
use super::structured::Guide;
use crate::kernels::logprob::{top_ids, RowLogprobs};
use crate::model::{Head, IncrementalDecoder, KvCache, TextTokenizer};

/// State shared by the candidates of one request (model thread only).
pub struct RequestState {
    pub req: ValidRequest,
    pub tx: EventSender,
    pub heads: Vec<Head>,
    pub depth: usize,
    pub mode_label: &'static str,
    pub arrived: Instant,
    pub unfinished: usize,
    pub usage: Usage,
    /// When its first prompt joined the batch (the end of its queue wait).
    pub admitted_at: Option<Instant>,
    pub first_token_at: Option<Instant>,
    pub span: tracing::Span,
    /// A draft step's cost against a full step (self-speculative decoding).
    pub draft_cost: f64,
    /// Its place in the queue, which it keeps if preempted (`batcher/preempt.rs`).
    pub key: QueueKey,
}

impl RequestState {
    /// Whether its client has read enough for one more step's events: a stream nobody reads
    /// sits its steps out.
    pub fn can_emit(&self) -> bool {
        self.tx.capacity() >= events_per_step(self.unfinished, self.req.tokens_per_step())
    }
}

pub type SharedRequest = Rc<RefCell<RequestState>>;

pub struct Sequence {
    pub request: SharedRequest,
    pub candidate: usize,
    pub prompt: Rc<Vec<u32>>,
    /// Prompt tokens already in the cache.
    pub prefilled: usize,
    /// The token to feed at the next decode step.
    pub next_input: Option<u32>,
    pub generated: usize,
    /// KV positions reserved for it: its prompt plus `max_tokens`.
    pub reserved: usize,
    pub cache: KvCache,
    pub sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    /// Sum of its tokens' logprobs, kept where it is read: `best_of`'s ranking, or logprobs.
    pub cumulative_logprob: f64,
    /// Candidates to fork from this one once its prefill is done (best_of/n share one prefill).
    pub forks: Vec<usize>,
    /// Echo with logprobs: prompt-position scores collected during prefill.
    pub prompt_logprobs: Vec<TokenLogprob>,
    /// An inspection's reports, collected during prefill.
    pub inspection: Vec<PositionReport>,
    pub last_token_at: Option<Instant>,
    pub finished: bool,
    /// Self-speculative decoding state, when the request asked for it.
    pub spec: Option<Speculation>,
    /// Structured outputs: where the sequence stands in its grammar.
    pub guide: Option<Guide>,
    /// The tokens it generated, in order (a preempted sequence recomputes its cache from
    /// them).
    pub output: Vec<u32>,
    /// After a preemption: the positions its cache is being recomputed over.
    pub resume: Option<Resume>,
    /// The batcher's step at which it last took part or joined the batch (the planner's
    /// turns beside a higher priority).
    pub turn: u64,
}

/// A preempted sequence's way back: its prompt and every generated token but the one it
/// feeds next go through the forward again (prompt chunks under the prefill budget, no heads)
/// until its cache holds what it held, then it decodes on as if it had never left.
pub struct Resume {
    pub tokens: Vec<u32>,
    pub done: usize,
}

impl Resume {
    pub fn left(&self) -> usize {
        self.tokens.len() - self.done
    }
}

pub enum Outcome {
    Continue,
    Finished(FinishReason),
}

impl Sequence {
    pub fn new(
        request: SharedRequest,
        candidate: usize,
        prompt: Rc<Vec<u32>>,
        cache: KvCache,
        sampler: Sampler,
    ) -> Self {
        let stops = StopMatcher::new(request.borrow().req.stop.clone());
        let (spec, guide) = {
            let r = request.borrow();
            (
                r.req.speculative.map(|s| Speculation::new(s, r.draft_cost)),
                r.req.constraint.as_ref().map(|c| c.guide()),
            )
        };
        Self {
            request,
            candidate,
            prompt,
            prefilled: 0,
            next_input: None,
            generated: 0,
            reserved: 0,
            cache,
            sampler,
            decoder: IncrementalDecoder::default(),
            stops,
            cumulative_logprob: 0.0,
            forks: Vec::new(),
            prompt_logprobs: Vec::new(),
            inspection: Vec::new(),
            last_token_at: None,
            finished: false,
            spec,
            guide,
            output: Vec::new(),
            resume: None,
            turn: 0,
        }
    }

    pub fn in_prefill(&self) -> bool {
        self.prefilled < self.prompt.len()
    }

    /// Still running: not finished, and its request has not ended.
    pub fn is_live(&self) -> bool {
        !self.finished && self.request.borrow().unfinished > 0
    }

    pub fn send(&self, event: Event) {
        // Closed: the client left, and the batcher drops the sequence next step. Full cannot
        // happen: a sequence takes part in a step only while its channel has room for it.
        if let Err(mpsc::error::TrySendError::Full(_)) = self.request.borrow().tx.try_send(event) {
            tracing::warn!("event channel full; an event was dropped");
        }
    }

    /// Takes the token chosen from `scores`, sends its event and says whether to stop. A token
    /// chosen where the logits are comes with empty scores and, where its logprob is read,
    /// what the step read of its head's log-softmax there (`read`: the token's value and the
    /// best alternatives; the sampler edits nothing of such a token's scores).
    pub fn accept(
        &mut self,
        id: u32,
        (scores, read): (&[f32], Option<&RowLogprobs>),
        tok: &TextTokenizer,
        eos: Option<u32>,
        exit_layer: Option<usize>,
    ) -> Outcome {
        let (max_tokens, logprobs, ignore_eos, normalized, ranked) = {
            let r = self.request.borrow();
            // A grammar's mask leaves scores that no longer sum to one.
            let normalized = r.req.mode.scores_are_logprobs() && self.guide.is_none();
            (
                r.req.max_tokens,
                r.req.logprobs,
                r.req.ignore_eos,
                normalized,
                r.req.best_of > r.req.n,
            )
        };
        // The token's log-probability only where it is read (reported, or `best_of`'s
        // ranking): for scores that are not a log-distribution (a grammar's mask, the logit
        // bias, penalties) it costs a log-softmax over the vocabulary. Before the token joins
        // what the penalties see.
        let mut logprob = None;
        if logprobs.is_some() || ranked {
            let value = match read {
                Some(read) => {
                    logprob = logprobs.map(|k| read_logprob(id, read, k, tok));
                    read.target
                }
                None => {
                    let reported = self.sampler.reported(scores, normalized);
                    logprob = logprobs.map(|k| token_logprob(id, &reported, k, tok));
                    reported[id as usize]
                }
            };
            self.cumulative_logprob += value.max(MIN_LOGPROB) as f64;
        }
        self.generated += 1;
        self.output.push(id);
        self.sampler.observe(id);
        // Under a grammar, the end-of-text token is allowed only where the output is complete.
        let is_eos = Some(id) == eos && (!ignore_eos || self.guide.is_some());
        let complete = self.guide.as_mut().is_some_and(|g| g.advance(id));
        let mut text = String::new();
        let mut stopped = false;
        if !is_eos {
            let delta = self.decoder.push(tok, id).unwrap_or_default();
            (text, stopped) = self.stops.push(&delta);
        }
        let mut finish = if is_eos || stopped || complete {
            Some(FinishReason::Stop)
        } else if self.generated >= max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        if finish.is_some() && !stopped {
            // The end: bytes held back for UTF-8 and a stop prefix that never completed are
            // final text (a stop sequence may still complete within them).
            let rest = self.decoder.flush(tok).unwrap_or_default();
            let (emit, hit) = self.stops.push(&rest);
            text.push_str(&emit);
            if hit {
                finish = Some(FinishReason::Stop);
            } else {
                text.push_str(&self.stops.take_held());
            }
        }
        self.send(Event::Token {
            candidate: self.candidate,
            id,
            text,
            logprob,
            exit_layer,
        });
        self.next_input = Some(id);
        match finish {
            Some(reason) => Outcome::Finished(reason),
            None => Outcome::Continue,
        }
    }
}

/// What a token the distribution rules out (-inf: DoLa's filtered tokens, scored in a prompt)
/// is reported with, as vLLM does: JSON has no infinity, and a client summing loglikelihoods
/// gets a number that says "impossible".
pub const MIN_LOGPROB: f32 = -9999.0;

/// The chosen token's logprob and the `k` best alternatives in `scores` (a log-distribution;
/// tokens it rules out, at -inf, are no alternatives).
pub fn token_logprob(id: u32, scores: &[f32], k: usize, tok: &TextTokenizer) -> TokenLogprob {
    let read = RowLogprobs {
        target: scores[id as usize],
        top: top_ids(scores, k)
            .into_iter()
            .map(|i| (i, scores[i as usize]))
            .collect(),
    };
    read_logprob(id, &read, k, tok)
}

/// [`token_logprob`] from what was read of the log-distribution: its value at `id` (the
/// row's target) and its best, at least `k` of them (where the logits are:
/// `kernels::logprob`).
pub fn read_logprob(id: u32, read: &RowLogprobs, k: usize, tok: &TextTokenizer) -> TokenLogprob {
    let text = |id: u32| tok.decode(&[id]).unwrap_or_default();
    TokenLogprob {
        id,
        text: text(id),
        logprob: read.target.max(MIN_LOGPROB),
        top: read
            .top
            .iter()
            .take(k)
            .filter(|(_, lp)| lp.is_finite())
            .map(|&(i, lp)| (i, text(i), lp))
            .collect(),
    }
}
