//! Turns a [`GenerateRequest`] into a [`ValidRequest`], once. Every message names the field
//! and the limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::EngineError;
use super::request::{
    GenerateRequest, InspectRequest, InspectSpec, ModeSpec, PromptInput, SamplingParams,
    SpeculativeRequest, SpeculativeSpec, UpperSpec, ValidRequest,
};
use super::scheduler::{self, Budget, Demand, Refusal};
use super::speculative::MAX_DRAFT_TOKENS;
use super::stop::StopSet;
use crate::model::mode::{DEFAULT_ALPHA, DEFAULT_MINIMUM_CANDIDATES};
use crate::model::{ContrastParams, Mode, TextTokenizer, Upper};

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
    /// Bytes of the longest vocabulary token: a text of more than `max_input_tokens` times
    /// this many bytes cannot fit and is refused without tokenizing it.
    pub max_token_bytes: usize,
    /// Self-speculative decoding for requests that do not ask (`--speculative-draft-layer`),
    /// where their mode decodes above the draft layer.
    pub speculative_default: Option<SpeculativeSpec>,
    /// `max_draft_tokens` when a request's `speculative` object leaves it out.
    pub speculative_max_draft_tokens: usize,
}

pub const MAX_LOGPROBS: i64 = 5;
/// Top tokens an inspection reports per head and position.
pub const MAX_INSPECT_TOP_LOGPROBS: i64 = 20;
pub const DEFAULT_MAX_TOKENS: i64 = 16;

#[derive(Clone)]
pub struct Validator {
    limits: Arc<Limits>,
    tokenizer: Arc<TextTokenizer>,
}

fn invalid(param: &str, message: impl Into<String>) -> EngineError {
    EngineError::invalid(param, message)
}

/// The same error with its parameter path moved from `from` to `to` (a contrast given as
/// `contrast` rather than `multi_exit`).
fn rename_param(e: EngineError, from: &str, to: &str) -> EngineError {
    match e {
        EngineError::InvalidRequest { param, message } => EngineError::InvalidRequest {
            param: param.map(|p| p.replacen(from, to, 1)),
            message: message.replace(&format!("`{from}."), &format!("`{to}.")),
        },
        other => other,
    }
}

fn range_f(
    param: &str,
    v: Option<f64>,
    default: f64,
    lo: f64,
    hi: f64,
    lo_open: bool,
) -> Result<f32, EngineError> {
    let v = v.unwrap_or(default);
    let ok = v.is_finite() && (if lo_open { v > lo } else { v >= lo }) && v <= hi;
    if !ok {
        let open = if lo_open { "(" } else { "[" };
        return Err(invalid(
            param,
            format!("`{param}` must be in {open}{lo}, {hi}], got {v}"),
        ));
    }
    Ok(v as f32)
}

impl Validator {
    pub fn new(limits: Limits, tokenizer: Arc<TextTokenizer>) -> Self {
        Self {
            limits: Arc::new(limits),
            tokenizer,
        }
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
    ) -> Result<ValidRequest, EngineError> {
        let l = &*self.limits;
        let mode = match (&req.mode, req.named_mode) {
            (None, None) => l.default_mode,
            (Some(spec), None) => self.mode(spec)?,
            (None, Some(named)) => named,
            (Some(spec), Some(named)) => {
                if self.mode(spec)? != named {
                    return Err(invalid(
                        "multi_exit",
                        "`multi_exit` asks for another mode than the one named by `model`; send one of them",
                    ));
                }
                named
            }
        };
        let temperature = range_f("temperature", req.temperature, 1.0, 0.0, 2.0, false)?;
        let top_p = range_f("top_p", req.top_p, 1.0, 0.0, 1.0, true)?;
        let presence_penalty = range_f(
            "presence_penalty",
            req.presence_penalty,
            0.0,
            -2.0,
            2.0,
            false,
        )?;
        let frequency_penalty = range_f(
            "frequency_penalty",
            req.frequency_penalty,
            0.0,
            -2.0,
            2.0,
            false,
        )?;
        let repetition_penalty = range_f(
            "repetition_penalty",
            req.repetition_penalty,
            1.0,
            0.0,
            10.0,
            true,
        )?;
        let top_k = match req.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(invalid(
                    "top_k",
                    format!("`top_k` must be -1, 0 (disabled) or positive, got {k}"),
                ))
            }
        };
        let max_n = l.max_best_of as i64;
        let n = req.n.unwrap_or(1);
        if !(1..=max_n).contains(&n) {
            return Err(invalid(
                "n",
                format!("`n` must be in [1, {max_n}], got {n}"),
            ));
        }
        let best_of = req.best_of.unwrap_or(n);
        if best_of < n || best_of > max_n {
            return Err(invalid(
                "best_of",
                format!("`best_of` must be in [n = {n}, {max_n}], got {best_of}"),
            ));
        }
        if req.stream && req.best_of.is_some_and(|b| b > 1) {
            return Err(invalid(
                "best_of",
                "`best_of` > 1 cannot be used with `stream`",
            ));
        }
        let logprobs = match req.logprobs {
            None => None,
            Some(k) if (0..=MAX_LOGPROBS).contains(&k) => Some(k as usize),
            Some(k) => {
                return Err(invalid(
                    "logprobs",
                    format!("`logprobs` must be in [0, {MAX_LOGPROBS}], got {k}"),
                ))
            }
        };
        self.stops(&req.stop)?;
        if req.logit_bias.len() > l.max_logit_bias {
            return Err(invalid(
                "logit_bias",
                format!(
                    "`logit_bias` takes at most {} entries (--max-logit-bias), got {}",
                    l.max_logit_bias,
                    req.logit_bias.len()
                ),
            ));
        }
        let mut logit_bias = Vec::with_capacity(req.logit_bias.len());
        for (key, bias) in &req.logit_bias {
            let id: u32 = key
                .parse()
                .ok()
                .filter(|&id: &u32| (id as usize) < l.vocab_size)
                .ok_or_else(|| {
                    invalid(
                        "logit_bias",
                        format!(
                            "`logit_bias` keys must be token ids in [0, {}), got {key:?}",
                            l.vocab_size
                        ),
                    )
                })?;
            if !(bias.is_finite() && (-100.0..=100.0).contains(bias)) {
                return Err(invalid(
                    "logit_bias",
                    format!("`logit_bias` values must be in [-100, 100], got {bias} for {key}"),
                ));
            }
            logit_bias.push((id, *bias as f32));
        }

        let max_tokens = req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        let min_tokens = if req.echo { 0 } else { 1 };
        if max_tokens < min_tokens {
            return Err(invalid(
                "max_tokens",
                format!("`max_tokens` must be at least {min_tokens}, got {max_tokens}"),
            ));
        }
        // Before any sum: a huge `max_tokens` must not wrap around.
        if max_tokens >= l.max_positions as i64 {
            return Err(EngineError::ContextLength {
                message: format!(
                    "this model's maximum context length is {} tokens; `max_tokens` is {max_tokens}, which leaves no room for a prompt",
                    l.max_positions
                ),
            });
        }
        let max_tokens = max_tokens as usize;
        let speculative = self.speculative(req.speculative, &mode)?;
        let fan_out = req.prompts.len().saturating_mul(best_of as usize);
        if fan_out > l.max_sequences_per_request {
            return Err(invalid(
                if req.prompts.len() > l.max_sequences_per_request { "prompt" } else { "best_of" },
                format!(
                    "this request asks for {} prompts x `best_of` {best_of} = {fan_out} sequences, more than --max-sequences-per-request {}",
                    req.prompts.len(),
                    l.max_sequences_per_request
                ),
            ));
        }
        let prompts = self.prompts(&req.prompts)?;
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if longest + max_tokens > l.max_positions {
            return Err(EngineError::ContextLength {
                message: format!(
                    "this model's maximum context length is {} tokens; the prompt has {longest} tokens and `max_tokens` is {max_tokens} ({} in all)",
                    l.max_positions,
                    longest + max_tokens
                ),
            });
        }
        let copies_param = if req.best_of.is_some() {
            "best_of"
        } else {
            "n"
        };
        for p in &prompts {
            self.fits_alone(
                p.len(),
                max_tokens,
                best_of as usize,
                copies_param,
                "max_tokens",
            )?;
        }
        Ok(ValidRequest {
            prompts,
            mode,
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k,
                presence_penalty,
                frequency_penalty,
                repetition_penalty,
                logit_bias,
                seed: req.seed.map(|s| s as u64),
            },
            n: n as usize,
            best_of: best_of as usize,
            stop: Arc::new(StopSet::new(&req.stop)),
            logprobs,
            echo: req.echo,
            ignore_eos: req.ignore_eos,
            deadline,
            inspect: None,
            speculative,
        })
    }

    /// Checks an inspection and tokenizes its prompt: one prompt, prefilled once, every head
    /// evaluated; the same prompt and budget limits as a completion.
    pub fn validate_inspect(
        &self,
        req: InspectRequest,
        deadline: Instant,
    ) -> Result<ValidRequest, EngineError> {
        let top = req.top_logprobs.unwrap_or(5);
        if !(0..=MAX_INSPECT_TOP_LOGPROBS).contains(&top) {
            return Err(invalid(
                "top_logprobs",
                format!("`top_logprobs` must be in [0, {MAX_INSPECT_TOP_LOGPROBS}], got {top}"),
            ));
        }
        let all_positions = match req.positions.as_deref() {
            None | Some("last") => false,
            Some("all") => true,
            Some(other) => {
                return Err(invalid(
                    "positions",
                    format!("`positions` must be \"last\" or \"all\", got {other:?}"),
                ))
            }
        };
        let contrast = match (&req.contrast, req.named_mode) {
            (Some(spec), _) => match self
                .mode(spec)
                .map_err(|e| rename_param(e, "multi_exit", "contrast"))?
            {
                Mode::Contrast(c) => Some(c),
                _ => return Err(invalid("contrast", "`contrast` must be a contrast mode")),
            },
            (None, Some(Mode::Contrast(c))) => Some(c),
            (None, _) => None,
        };
        let prompt = req
            .prompt
            .ok_or_else(|| invalid("prompt", "`prompt` is required"))?;
        let prompt = self.prompts(&[prompt])?.remove(0);
        self.fits_alone(prompt.len(), 0, 1, "n", "prompt")?;
        Ok(ValidRequest {
            prompts: vec![prompt],
            mode: Mode::Original,
            max_tokens: 0,
            sampling: SamplingParams {
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
                presence_penalty: 0.0,
                frequency_penalty: 0.0,
                repetition_penalty: 1.0,
                logit_bias: Vec::new(),
                seed: None,
            },
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
                contrast,
            }),
            speculative: None,
        })
    }

    /// The request's `speculative` object checked against `mode`; without one, the server's
    /// default where the mode decodes above its draft layer.
    pub fn speculative(
        &self,
        req: Option<SpeculativeRequest>,
        mode: &Mode,
    ) -> Result<Option<SpeculativeSpec>, EngineError> {
        let l = &*self.limits;
        let depth = mode.depth(l.num_layers);
        let Some(req) = req else {
            return Ok(l.speculative_default.filter(|s| s.draft_layer < depth));
        };
        let param = "speculative.draft_layer";
        let layer = match req.draft_layer {
            Some(layer) => layer,
            // The server's draft layer, else the highest exit at or below half the depth.
            None => l
                .speculative_default
                .map(|s| s.draft_layer)
                .filter(|&d| d < depth)
                .or_else(|| l.exit_layers.iter().copied().filter(|&e| 2 * e <= depth).max())
                .ok_or_else(|| {
                    invalid(
                        param,
                        format!("`{param}` is needed: no exit lies at or below half of this mode's depth ({depth})"),
                    )
                })? as i64,
        };
        if layer < 0 || !l.exit_layers.contains(&(layer as usize)) {
            return Err(invalid(
                param,
                format!(
                    "`{param}` must be one of the exit layers {:?}, got {layer}",
                    l.exit_layers
                ),
            ));
        }
        if layer as usize >= depth {
            return Err(invalid(
                param,
                format!(
                    "`{param}` ({layer}) must lie below the layer this mode decodes from ({depth}): the draft is verified by the mode's own distribution"
                ),
            ));
        }
        let k = req
            .max_draft_tokens
            .unwrap_or(l.speculative_max_draft_tokens as i64);
        if !(1..=MAX_DRAFT_TOKENS as i64).contains(&k) {
            return Err(invalid(
                "speculative.max_draft_tokens",
                format!(
                    "`speculative.max_draft_tokens` must be in [1, {MAX_DRAFT_TOKENS}], got {k}"
                ),
            ));
        }
        Ok(Some(SpeculativeSpec {
            draft_layer: layer as usize,
            max_draft_tokens: k as usize,
            adaptive: req.adaptive.unwrap_or(true),
        }))
    }

    /// Refuses a prompt whose `copies` sequences of `prompt_len + max_tokens` positions could
    /// never fit the batch budget, naming `copies_param` or `tokens_param` and both numbers.
    fn fits_alone(
        &self,
        prompt_len: usize,
        max_tokens: usize,
        copies: usize,
        copies_param: &str,
        tokens_param: &str,
    ) -> Result<(), EngineError> {
        let demand = Demand::of_prompt(prompt_len, max_tokens, copies)
            .ok_or_else(|| invalid(tokens_param, format!("`{tokens_param}` is too large")))?;
        match scheduler::fits_alone(&self.limits.budget, demand) {
            Ok(()) => Ok(()),
            Err(Refusal::Sequences { need, limit }) => Err(invalid(
                copies_param,
                format!("each prompt runs as {need} sequences (`{copies_param}`), more than the batch holds (--max-batch-size {limit})"),
            )),
            Err(Refusal::Tokens { need, limit }) => Err(invalid(
                tokens_param,
                format!("a prompt of {prompt_len} tokens with `max_tokens` {max_tokens} x {copies} sequences needs {need} KV-cache tokens, more than the server's budget (--max-batch-total-tokens {limit})"),
            )),
        }
    }

    fn stops(&self, stops: &[String]) -> Result<(), EngineError> {
        let l = &*self.limits;
        if stops.len() > l.max_stop_sequences {
            return Err(invalid(
                "stop",
                format!(
                    "`stop` takes at most {} sequences (--max-stop-sequences), got {}",
                    l.max_stop_sequences,
                    stops.len()
                ),
            ));
        }
        for s in stops {
            if s.is_empty() {
                return Err(invalid("stop", "`stop` sequences must not be empty"));
            }
            // A cheap bound first: characters never outnumber bytes.
            if s.len() > l.max_stop_length && s.chars().count() > l.max_stop_length {
                return Err(invalid(
                    "stop",
                    format!(
                        "each `stop` sequence may have at most {} characters (--max-stop-length), got {}",
                        l.max_stop_length,
                        s.chars().count()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn prompts(&self, inputs: &[PromptInput]) -> Result<Vec<Vec<u32>>, EngineError> {
        let l = &*self.limits;
        if inputs.is_empty() {
            return Err(invalid("prompt", "`prompt` must not be an empty list"));
        }
        let too_long = |n: String| {
            invalid(
                "prompt",
                format!(
                    "`prompt` has {n} tokens, more than --max-input-tokens {}",
                    l.max_input_tokens
                ),
            )
        };
        let mut out = Vec::with_capacity(inputs.len());
        for p in inputs {
            let ids = match p {
                PromptInput::Text(text) => {
                    // Every token covers at most `max_token_bytes` bytes.
                    let at_least = text.len().div_ceil(l.max_token_bytes.max(1));
                    if at_least > l.max_input_tokens {
                        return Err(too_long(format!(
                            "at least {at_least} ({} bytes)",
                            text.len()
                        )));
                    }
                    self.tokenizer
                        .encode(text)
                        .map_err(|e| invalid("prompt", format!("cannot tokenize `prompt`: {e}")))?
                }
                PromptInput::Tokens(ids) if ids.len() > l.max_input_tokens => {
                    return Err(too_long(ids.len().to_string()))
                }
                PromptInput::Tokens(ids) => ids
                    .iter()
                    .map(|&id| {
                        u32::try_from(id)
                            .ok()
                            .filter(|&id| (id as usize) < l.vocab_size)
                            .ok_or_else(|| {
                                invalid(
                                    "prompt",
                                    format!(
                                        "token ids in `prompt` must be in [0, {}), got {id}",
                                        l.vocab_size
                                    ),
                                )
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            };
            if ids.is_empty() {
                return Err(invalid("prompt", "`prompt` must not be empty"));
            }
            if ids.len() > l.max_input_tokens {
                return Err(too_long(ids.len().to_string()));
            }
            out.push(ids);
        }
        Ok(out)
    }

    /// Resolves a `multi_exit` object against the model's exits.
    pub fn mode(&self, spec: &ModeSpec) -> Result<Mode, EngineError> {
        let exits = &self.limits.exit_layers;
        let layer = |field: &str, v: Option<i64>| -> Result<usize, EngineError> {
            let param = format!("multi_exit.{field}");
            let v = v.ok_or_else(|| {
                invalid(
                    &param,
                    format!("`{param}` is required; available exits: {exits:?}"),
                )
            })?;
            usize::try_from(v)
                .ok()
                .filter(|l| exits.contains(l))
                .ok_or_else(|| invalid(&param, format!("`{param}` = {v} is not an exit layer of this model; available exits: {exits:?}")))
        };
        Ok(match spec {
            ModeSpec::Original => Mode::Original,
            ModeSpec::Exit { layer: l } => Mode::Exit(layer("layer", *l)?),
            ModeSpec::Contrast {
                upper,
                lower,
                alpha,
                minimum_candidates,
            } => {
                let lower = layer("lower", *lower)?;
                let upper = match upper {
                    None => return Err(invalid("multi_exit.upper", format!("`multi_exit.upper` is required: an exit layer {exits:?} or \"original\""))),
                    Some(UpperSpec::Original) => Upper::Original,
                    Some(UpperSpec::Layer(u)) => {
                        let u = layer("upper", Some(*u))?;
                        if u <= lower {
                            return Err(invalid("multi_exit.upper", format!("`multi_exit.upper` ({u}) must be above `multi_exit.lower` ({lower})")));
                        }
                        Upper::Exit(u)
                    }
                };
                let alpha = range_f(
                    "multi_exit.alpha",
                    *alpha,
                    DEFAULT_ALPHA as f64,
                    0.0,
                    1.0,
                    true,
                )?;
                let k = minimum_candidates.unwrap_or(DEFAULT_MINIMUM_CANDIDATES as i64);
                if k < 1 || k as usize > self.limits.vocab_size {
                    return Err(invalid(
                        "multi_exit.minimum_candidates",
                        format!(
                            "`multi_exit.minimum_candidates` must be in [1, {}], got {k}",
                            self.limits.vocab_size
                        ),
                    ));
                }
                Mode::Contrast(ContrastParams {
                    upper,
                    lower,
                    alpha,
                    minimum_candidates: k as usize,
                })
            }
        })
    }
}
