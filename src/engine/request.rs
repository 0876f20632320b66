//! What the engine accepts (a validated request) and what it sends back (events).

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::stop::StopSet;
use super::structured::{Constraint, ConstraintRequest};
use crate::model::ChatPrompt;
use crate::model::{Head, Mode};

/// What a request asked for: the exit that drafts and the most tokens it drafts per round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpeculativeSpec {
    pub draft_layer: usize,
    pub max_draft_tokens: usize,
    /// Choose each round's length by what pays (else always `max_draft_tokens`: for
    /// measuring an exit's acceptance, or on models where no draft pays).
    pub adaptive: bool,
}

/// A request on its way to the batcher, with its own response channel and span.
pub struct Submission {
    pub req: ValidRequest,
    pub tx: EventSender,
    pub span: tracing::Span,
    pub arrived: Instant,
}

/// A prompt as sent by the client, before tokenization.
#[derive(Debug, Clone)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<i64>),
    /// A conversation, rendered by the chat template.
    Chat(ChatPrompt),
}

/// Which API asks for logprobs: completions' `logprobs` (0 to 5 alternatives) or chat's
/// `top_logprobs` (0 to 20).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogprobsApi {
    #[default]
    Completions,
    Chat,
}

/// The sampling-related fields of a request, unvalidated (as parsed from the wire).
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    pub prompts: Vec<PromptInput>,
    pub mode: Option<ModeSpec>,
    /// The mode named by the request's model id (`NAME:exit-6`); `mode`, when also given,
    /// must agree with it.
    pub named_mode: Option<Mode>,
    pub max_tokens: Option<i64>,
    /// Without `max_tokens`: as many as the context and the KV budget leave (chat's
    /// default), instead of [`DEFAULT_MAX_TOKENS`](super::validate::DEFAULT_MAX_TOKENS).
    pub max_tokens_fill: bool,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub n: Option<i64>,
    pub best_of: Option<i64>,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: Option<i64>,
    pub echo: bool,
    pub stop: Vec<String>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub logit_bias: Vec<(String, f64)>,
    pub return_token_ids: bool,
    pub ignore_eos: bool,
    /// The `speculative` object (None: the server's default, if any).
    pub speculative: Option<SpeculativeRequest>,
    /// `"speculative": false`: no drafts, whatever the server's default or a preset's.
    pub no_speculation: bool,
    /// The speculation a preset model id implies, validated with the preset: used when the
    /// request has no `speculative` object of its own.
    pub named_speculative: Option<SpeculativeSpec>,
    /// Admission order (vLLM's field): lower first; unvalidated.
    pub priority: Option<i64>,
    /// Prefix-cache isolation (vLLM's field); unvalidated.
    pub cache_salt: Option<String>,
    /// How `logprobs` was asked for (its field and bound).
    pub logprobs_api: LogprobsApi,
    /// Structured outputs: what the generated text must match; uncompiled.
    pub constraint: Option<ConstraintRequest>,
}

/// The `speculative` object, unvalidated.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpeculativeRequest {
    pub draft_layer: Option<i64>,
    pub max_draft_tokens: Option<i64>,
    pub adaptive: Option<bool>,
}

/// A mode object as sent (`multi_exit`, an inspection's strategy), unvalidated: its
/// strategy (`mode`, one of [`Mode::LABELS`]) and the other fields as they came.
#[derive(Debug, Clone, PartialEq)]
pub struct ModeSpec {
    pub mode: &'static str,
    pub fields: serde_json::Map<String, serde_json::Value>,
}

impl ModeSpec {
    /// The kind of mode asked for, as [`Mode::label`] names it.
    pub fn label(&self) -> &'static str {
        self.mode
    }
}

impl From<Mode> for ModeSpec {
    /// A mode parsed from text (a flag, a model id), to be validated as a request's would be.
    fn from(mode: Mode) -> Self {
        let mut fields = mode.to_request();
        fields.remove("mode");
        ModeSpec {
            mode: mode.label(),
            fields,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = disabled.
    pub top_k: usize,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1 = disabled.
    pub repetition_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
}

impl SamplingParams {
    /// Greedy, with no bias, penalties or truncation.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: vec![],
            seed: None,
        }
    }

    /// No bias, penalties or truncation: plain softmax sampling at `temperature`.
    #[cfg(test)]
    pub(crate) fn plain(temperature: f32, seed: u64) -> Self {
        Self {
            temperature,
            seed: Some(seed),
            ..Self::greedy()
        }
    }
}

/// An inspection (`POST /v1/inspect`), unvalidated.
#[derive(Debug, Clone, Default)]
pub struct InspectRequest {
    pub prompt: Option<PromptInput>,
    pub top_logprobs: Option<i64>,
    /// `last` (default) or `all`.
    pub positions: Option<String>,
    /// Strategies reported as heads of their own, each with the field it came in
    /// (`strategies[0]`, or the shorthands `contrast` and `dola`).
    pub strategies: Vec<(String, ModeSpec)>,
    /// The mode named by the model id: a strategy that combines heads is reported too,
    /// unless the request asks for another of its kind (a 400).
    pub named_mode: Option<Mode>,
}

/// What an inspection reports: every head at the last or at every prompt position.
#[derive(Debug, Clone, PartialEq)]
pub struct InspectSpec {
    pub top_logprobs: usize,
    pub all_positions: bool,
    /// Strategies reported as heads of their own (named by their flag form).
    pub strategies: Arc<[Mode]>,
}

impl InspectSpec {
    /// Every head the inspection evaluates: the exits in ascending order, the original, then
    /// any other head a strategy reads (the top head on raw block outputs, for DoLa or SLED
    /// with `premature: lm_head`).
    pub fn heads(&self, exits: &[usize]) -> Vec<Head> {
        let mut heads: Vec<Head> = exits.iter().map(|&l| Head::Exit(l)).collect();
        heads.push(Head::Original);
        for h in self.strategies.iter().flat_map(Mode::heads) {
            if !heads.contains(&h) {
                heads.push(h);
            }
        }
        heads
    }
}

/// One head at one position.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadReport {
    /// `exit:L`, `original`, `lm_head:L`, or a strategy's flag form (`contrast:U,L`, ...).
    pub head: String,
    /// `(id, text, logprob)`, best first.
    pub top: Vec<(u32, String, f32)>,
    pub entropy: f32,
    pub next_token_logprob: Option<f32>,
    pub jsd_to_original: f32,
    /// A strategy's head: the layer it chose at this position, under the name the report
    /// gives it (DoLa's `premature_layer`, early exit's `exit_layer`).
    pub chosen: Option<(&'static str, usize)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PositionReport {
    pub index: usize,
    pub token_id: u32,
    pub next_token_id: Option<u32>,
    pub heads: Vec<HeadReport>,
}

/// A request the engine can run: every field checked, prompts tokenized.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub prompts: Vec<Vec<u32>>,
    pub mode: Mode,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Choices returned per prompt.
    pub n: usize,
    /// Candidates generated per prompt (>= n); the n with the best total logprob are returned.
    pub best_of: usize,
    pub stop: Arc<StopSet>,
    /// Top alternatives reported per token (None = no logprobs).
    pub logprobs: Option<usize>,
    pub echo: bool,
    pub ignore_eos: bool,
    pub deadline: Instant,
    /// An inspection instead of a generation (one prompt, no tokens generated).
    pub inspect: Option<InspectSpec>,
    /// Self-speculative decoding (drafts from a low exit, verified by the mode).
    pub speculative: Option<SpeculativeSpec>,
    /// Admission order: lower first, arrival order among equals.
    pub priority: i32,
    /// Cached prompts are shared only among requests with the same salt (None is a salt).
    pub cache_salt: Option<Arc<str>>,
    /// Structured outputs: the compiled grammar each generated sequence follows.
    pub constraint: Option<Constraint>,
}

impl ValidRequest {
    pub fn prompt_tokens(&self) -> usize {
        self.prompts.iter().map(Vec::len).sum()
    }

    /// Whether its heads are evaluated at every prompt position, not only the last: echo
    /// with logprobs, or an inspection of all positions.
    pub fn scores_every_prompt_position(&self) -> bool {
        (self.echo && self.logprobs.is_some())
            || self.inspect.as_ref().is_some_and(|i| i.all_positions)
    }
}

/// One token's log-probability and its best alternatives, in the decoded distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    /// `(id, text, logprob)`, best first.
    pub top: Vec<(u32, String, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// Self-speculative decoding: tokens drafted and accepted (None: not used).
    pub speculative: Option<SpeculativeUsage>,
    /// Early exit: generated tokens by the layer each left at (`"original"`: none was
    /// confident), over every choice (None: not early exit).
    pub early_exit: Option<std::collections::BTreeMap<String, usize>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpeculativeUsage {
    pub drafted: usize,
    pub accepted: usize,
}

/// What the engine streams back for one request. `candidate` numbers the sequences of the
/// request: `prompt_index * best_of + k`.
#[derive(Debug, Clone)]
pub enum Event {
    /// Echo with logprobs: the prompt's tokens with their logprobs (the first has none).
    Prompt {
        candidate: usize,
        text: String,
        tokens: Vec<(u32, String, Option<TokenLogprob>)>,
    },
    Token {
        candidate: usize,
        id: u32,
        /// Text that became final with this token (may be empty: held back for UTF-8 or stop).
        text: String,
        logprob: Option<TokenLogprob>,
        /// Early exit: the layer whose head gave the token (the top layer: the original head).
        exit_layer: Option<usize>,
    },
    End {
        candidate: usize,
        finish_reason: FinishReason,
        /// Sum of the generated tokens' logprobs, for best_of (0 when it does not rank).
        cumulative_logprob: f64,
    },
    /// An inspection's result, before its `End`.
    Inspection {
        positions: Vec<PositionReport>,
    },
    Done {
        usage: Usage,
    },
    Error(super::EngineError),
}

/// Bounded: a client that stops reading fills its own channel, which pauses its sequences
/// (the batcher sends only while there is room), instead of growing the server's memory.
pub type EventSender = mpsc::Sender<Event>;
pub type EventReceiver = mpsc::Receiver<Event>;

/// The most events one step can send for a request with `sequences` unfinished sequences
/// that emit up to `tokens` tokens each (a prompt, the tokens and an end each, and the
/// request's done).
pub fn events_per_step(sequences: usize, tokens: usize) -> usize {
    (2 + tokens) * sequences + 1
}

impl ValidRequest {
    /// The most tokens one step can emit per sequence: a verified draft and one more.
    pub fn tokens_per_step(&self) -> usize {
        self.speculative.map_or(1, |s| s.max_draft_tokens + 1)
    }
}
