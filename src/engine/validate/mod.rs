//! Turns a [`GenerateRequest`] into a [`ValidRequest`], once. Each concern has its file:
//! `sampling.rs` (temperature, penalties, `logit_bias`, `n`/`best_of`, `logprobs`),
//! `mode.rs` (`multi_exit` and `speculative`), `prompt.rs` (prompts, stops, the batch budget);
//! every refusal is a [`ValidationError`] naming its field and limit (`error.rs`).

mod error;
mod mode;
mod prompt;
mod sampling;
#[cfg(test)]
mod tests;

pub use error::ValidationError;

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::request::{
    GenerateRequest, InspectRequest, InspectSpec, LogprobsApi, SamplingParams, SpeculativeSpec,
    ValidRequest,
};
use super::scheduler::Budget;
use super::stop::StopSet;
use super::structured::{Constraint, ConstraintRequest, Grammars};
use crate::model::mode::ModelShape;
use crate::model::{ChatTemplate, Mode, TextTokenizer};

/// Limits a request is checked against (from the configuration and the model).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_input_tokens: usize,
    /// Upper bound of `n` and `best_of`.
    pub max_best_of: usize,
    pub max_positions: usize,
    pub vocab_size: usize,
    pub exit_layers: Vec<usize>,
    pub num_layers: usize,
    /// The original head is the token embedding (DoLa's "low" then skips layer 0, as
    /// transformers does).
    pub tied_head: bool,
    pub default_mode: Mode,
    /// How long a request may take, from its first byte to its last (`--request-timeout`).
    pub request_timeout: Duration,
    /// What the running batch may hold: a prompt that could never fit is refused here.
    pub budget: Budget,
    /// Prompts x `best_of` of one request (`--max-sequences-per-request`).
    pub max_sequences_per_request: usize,
    pub max_stop_sequences: usize,
    /// Longest stop sequence, in characters.
    pub max_stop_length: usize,
    /// Entries of `logit_bias` (each is applied at every token).
    pub max_logit_bias: usize,
    /// Prompt positions an inspection of every position may have (`--max-inspect-positions`).
    pub max_inspect_positions: usize,
    /// Bytes of the longest vocabulary token: a text of more than `max_input_tokens` times
    /// this many bytes cannot fit and is refused without tokenizing it.
    pub max_token_bytes: usize,
    /// Self-speculative decoding for requests that do not ask (`--speculative-draft-layer`),
    /// where their mode decodes above the draft layer.
    pub speculative_default: Option<SpeculativeSpec>,
    /// `max_draft_tokens` when a request's `speculative` object leaves it out.
    pub speculative_max_draft_tokens: usize,
}

impl Limits {
    /// The model's shape, as strategies check their parameters against it.
    pub fn shape(&self) -> ModelShape<'_> {
        ModelShape {
            num_layers: self.num_layers,
            exits: &self.exit_layers,
            tied_head: self.tied_head,
            vocab_size: self.vocab_size,
        }
    }
}

pub const MAX_LOGPROBS: i64 = 5;
/// Strategies one inspection may report besides the heads (each is a head's work again at
/// every position).
pub const MAX_INSPECT_STRATEGIES: usize = 8;
/// Chat's `top_logprobs` bound (OpenAI's).
pub const MAX_CHAT_TOP_LOGPROBS: i64 = 20;
/// Top tokens an inspection reports per head and position.
pub const MAX_INSPECT_TOP_LOGPROBS: i64 = 20;
pub const DEFAULT_MAX_TOKENS: i64 = 16;
/// `priority` lies in `[-MAX_PRIORITY, MAX_PRIORITY]`.
pub const MAX_PRIORITY: i64 = 1000;
/// Characters a `cache_salt` may have.
pub const MAX_CACHE_SALT_LEN: usize = 256;

#[derive(Clone)]
pub struct Validator {
    limits: Arc<Limits>,
    tokenizer: Arc<TextTokenizer>,
    /// Renders chat prompts; None: the model has no chat template.
    chat_template: Option<Arc<ChatTemplate>>,
    /// Compiles structured-output constraints; None: the tokenizer cannot be masked.
    grammars: Option<Arc<Grammars>>,
}

/// A count that must lie in `[lo, hi]`.
fn count_in(param: &str, got: i64, lo: i64, hi: i64) -> Result<i64, ValidationError> {
    if (lo..=hi).contains(&got) {
        Ok(got)
    } else {
        Err(ValidationError::CountOutOfRange {
            param: param.into(),
            lo,
            hi,
            got,
        })
    }
}

impl Validator {
    pub fn new(limits: Limits, tokenizer: Arc<TextTokenizer>) -> Self {
        Self {
            limits: Arc::new(limits),
            tokenizer,
            chat_template: None,
            grammars: None,
        }
    }

    pub fn with_chat_template(mut self, template: Option<Arc<ChatTemplate>>) -> Self {
        self.chat_template = template;
        self
    }

    pub fn with_grammars(mut self, grammars: Option<Arc<Grammars>>) -> Self {
        self.grammars = grammars;
        self
    }

    /// The chat template's text, if there is one (`/tokenizer_info` reports it).
    pub fn chat_template_source(&self) -> Option<&str> {
        self.chat_template.as_deref().map(ChatTemplate::source)
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn tokenizer(&self) -> &Arc<TextTokenizer> {
        &self.tokenizer
    }

    /// Checks `req` and tokenizes its prompts (CPU work: call off the async runtime for big
    /// prompts). Cheap checks come first, so an oversized request costs no tokenization.
    pub fn validate(
        &self,
        req: GenerateRequest,
        deadline: Instant,
    ) -> Result<ValidRequest, ValidationError> {
        let l = &*self.limits;
        let mode = self.request_mode(req.mode.as_ref(), req.named_mode)?;
        let priority = count_in(
            "priority",
            req.priority.unwrap_or(0),
            -MAX_PRIORITY,
            MAX_PRIORITY,
        )? as i32;
        let mut sampling = self.sampling(&req)?;
        let (n, best_of) = self.copies(&req)?;
        let (logprobs_param, max_logprobs) = match req.logprobs_api {
            LogprobsApi::Completions => ("logprobs", MAX_LOGPROBS),
            LogprobsApi::Chat => ("top_logprobs", MAX_CHAT_TOP_LOGPROBS),
        };
        let logprobs = req
            .logprobs
            .map(|k| count_in(logprobs_param, k, 0, max_logprobs))
            .transpose()?
            .map(|k| k as usize);
        self.stops(&req.stop)?;
        sampling.logit_bias = self.logit_bias(&req.logit_bias)?;
        let max_tokens = self.max_tokens(&req)?;
        let speculative = match (req.speculative, req.named_speculative) {
            _ if req.no_speculation => None,
            (None, Some(named)) => Some(named),
            (asked, _) => self.speculative(asked, &mode)?,
        };
        if req.prompts.len().saturating_mul(best_of) > l.max_sequences_per_request {
            return Err(ValidationError::TooManySequences {
                prompts: req.prompts.len(),
                best_of,
                max: l.max_sequences_per_request,
            });
        }
        let constraint = req
            .constraint
            .as_ref()
            .map(|c| self.constraint(c))
            .transpose()?;
        let prompts = self.prompts(&req.prompts)?;
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let max_tokens = match req.max_tokens {
            None if req.max_tokens_fill => self.fill(longest, best_of),
            _ => max_tokens,
        };
        if longest + max_tokens > l.max_positions {
            return Err(ValidationError::ContextExceeded {
                max_positions: l.max_positions,
                prompt: longest,
                max_tokens,
            });
        }
        let copies_param = if req.best_of.is_some() {
            "best_of"
        } else {
            "n"
        };
        for p in &prompts {
            self.fits_alone(p.len(), max_tokens, best_of, copies_param, "max_tokens")?;
        }
        Ok(ValidRequest {
            prompts,
            mode,
            max_tokens,
            sampling,
            n,
            best_of,
            stop: Arc::new(StopSet::new(&req.stop)),
            logprobs,
            echo: req.echo,
            ignore_eos: req.ignore_eos,
            deadline,
            inspect: None,
            speculative,
            priority,
            cache_salt: self.cache_salt(req.cache_salt)?,
            constraint,
        })
    }

    /// Chat's default `max_tokens`: what the context and the KV budget leave after the
    /// prompt (at least 1, so that a prompt with no room left gets the context error).
    fn fill(&self, prompt: usize, copies: usize) -> usize {
        let l = &*self.limits;
        let context = l.max_positions.saturating_sub(prompt);
        let budget = (l.budget.max_tokens / copies.max(1)).saturating_sub(prompt);
        context.min(budget).max(1)
    }

    /// Compiles a structured-output constraint (or finds it compiled).
    fn constraint(&self, c: &ConstraintRequest) -> Result<Constraint, ValidationError> {
        match &self.grammars {
            Some(g) => g.compile(c),
            None => Err(ValidationError::Grammar {
                param: c.param.clone(),
                message: "structured outputs are unavailable: this model's tokenizer gives no token bytes to mask".into(),
            }),
        }
    }

    /// `cache_salt`: a non-empty string of at most [`MAX_CACHE_SALT_LEN`] characters.
    fn cache_salt(&self, salt: Option<String>) -> Result<Option<Arc<str>>, ValidationError> {
        let Some(salt) = salt else {
            return Ok(None);
        };
        let got = salt.chars().count();
        if got == 0 || got > MAX_CACHE_SALT_LEN {
            return Err(ValidationError::CacheSalt {
                got,
                max: MAX_CACHE_SALT_LEN,
            });
        }
        Ok(Some(salt.into()))
    }

    /// `max_tokens` (default [`DEFAULT_MAX_TOKENS`]): at least 1 (0 with `echo`), and short
    /// of the context, checked before any sum so that a huge value cannot wrap around.
    fn max_tokens(&self, req: &GenerateRequest) -> Result<usize, ValidationError> {
        let max_tokens = req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        let min = if req.echo { 0 } else { 1 };
        if max_tokens < min {
            return Err(ValidationError::MaxTokensTooSmall {
                min,
                got: max_tokens,
            });
        }
        let max_positions = self.limits.max_positions;
        if max_tokens >= max_positions as i64 {
            return Err(ValidationError::MaxTokensFillContext {
                max_positions,
                max_tokens,
            });
        }
        Ok(max_tokens as usize)
    }

    /// Checks an inspection and tokenizes its prompt: one prompt, prefilled once, every head
    /// evaluated; the same prompt and budget limits as a completion.
    pub fn validate_inspect(
        &self,
        req: InspectRequest,
        deadline: Instant,
    ) -> Result<ValidRequest, ValidationError> {
        let top = count_in(
            "top_logprobs",
            req.top_logprobs.unwrap_or(5),
            0,
            MAX_INSPECT_TOP_LOGPROBS,
        )?;
        let all_positions = match req.positions.as_deref() {
            None | Some("last") => false,
            Some("all") => true,
            Some(other) => return Err(ValidationError::Positions(other.into())),
        };
        let strategies = self.inspected_strategies(&req)?;
        let prompt = req.prompt.ok_or(ValidationError::PromptRequired)?;
        let prompt = self.prompts(&[prompt])?.remove(0);
        let max = self.limits.max_inspect_positions;
        if all_positions && prompt.len() > max {
            return Err(ValidationError::TooManyInspectedPositions {
                got: prompt.len(),
                max,
            });
        }
        self.fits_alone(prompt.len(), 0, 1, "n", "prompt")?;
        Ok(ValidRequest {
            prompts: vec![prompt],
            mode: Mode::ORIGINAL,
            max_tokens: 0,
            sampling: SamplingParams::greedy(),
            n: 1,
            best_of: 1,
            stop: Arc::new(StopSet::default()),
            logprobs: None,
            echo: false,
            ignore_eos: false,
            deadline,
            inspect: Some(InspectSpec {
                top_logprobs: top as usize,
                all_positions,
                strategies: strategies.into(),
            }),
            speculative: None,
            priority: 0,
            cache_salt: None,
            constraint: None,
        })
    }

    /// The strategies an inspection reports besides the heads: those it asks for, and the
    /// one its model id names (which must agree with any it asks for of the same kind).
    fn inspected_strategies(&self, req: &InspectRequest) -> Result<Vec<Mode>, ValidationError> {
        if req.strategies.len() > MAX_INSPECT_STRATEGIES {
            return Err(ValidationError::TooManyInspectedStrategies {
                got: req.strategies.len(),
                max: MAX_INSPECT_STRATEGIES,
            });
        }
        let mut out: Vec<Mode> = Vec::new();
        for (object, spec) in &req.strategies {
            let mode = self.mode_in(object, spec)?;
            if matches!(mode, Mode::Original(_) | Mode::Exit(_)) {
                return Err(ValidationError::InspectHead {
                    object: object.clone(),
                });
            }
            if let Some(named) = req.named_mode {
                if named.label() == mode.label() && named != mode {
                    return Err(ValidationError::InspectConflict {
                        object: object.clone(),
                        kind: mode.label(),
                    });
                }
            }
            if !out.contains(&mode) {
                out.push(mode);
            }
        }
        if let Some(named) = req.named_mode {
            let combines = !matches!(named, Mode::Original(_) | Mode::Exit(_));
            if combines && !out.contains(&named) {
                out.push(named);
            }
        }
        Ok(out)
    }
}
