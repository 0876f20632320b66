//! Why a request is refused: one variant per rule, each knowing the field it names
//! ([`ValidationError::param`]) and rendering its own message (which names the limit).
//! The HTTP layer turns every one into a 400 (`http::error`).

/// `[lo, hi]`, or `(lo, hi]` when `lo_open`.
fn interval(lo: f64, hi: f64, lo_open: bool) -> String {
    format!("{}{lo}, {hi}]", if lo_open { "(" } else { "[" })
}

/// A request field whose value breaks a rule.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("`{param}` must be in {}, got {got}", interval(*lo, *hi, *lo_open))]
    OutOfRange {
        param: String,
        lo: f64,
        hi: f64,
        lo_open: bool,
        got: f64,
    },
    #[error("`{param}` must be in [{lo}, {hi}], got {got}")]
    CountOutOfRange {
        param: String,
        lo: i64,
        hi: i64,
        got: i64,
    },
    #[error("`top_k` must be -1, 0 (disabled) or positive, got {0}")]
    TopK(i64),
    #[error("`best_of` must be in [n = {n}, {max}], got {got}")]
    BestOf { n: i64, max: i64, got: i64 },
    #[error("`best_of` > 1 cannot be used with `stream`")]
    BestOfWithStream,
    #[error("`multi_exit` asks for another mode than the one named by `model`; send one of them")]
    ModeConflict,
    #[error("`stop` takes at most {max} sequences (--max-stop-sequences), got {got}")]
    TooManyStops { max: usize, got: usize },
    #[error("`stop` sequences must not be empty")]
    EmptyStop,
    #[error(
        "each `stop` sequence may have at most {max} characters (--max-stop-length), got {got}"
    )]
    StopTooLong { max: usize, got: usize },
    #[error("`logit_bias` takes at most {max} entries (--max-logit-bias), got {got}")]
    TooManyLogitBiases { max: usize, got: usize },
    #[error("`logit_bias` keys must be token ids in [0, {vocab}), got {key:?}")]
    LogitBiasKey { vocab: usize, key: String },
    #[error("`logit_bias` values must be in [-100, 100], got {bias} for {key}")]
    LogitBiasValue { key: String, bias: f64 },
    #[error("`max_tokens` must be at least {min}, got {got}")]
    MaxTokensTooSmall { min: i64, got: i64 },
    #[error("this model's maximum context length is {max_positions} tokens; `max_tokens` is {max_tokens}, which leaves no room for a prompt")]
    MaxTokensFillContext {
        max_positions: usize,
        max_tokens: i64,
    },
    #[error("this model's maximum context length is {max_positions} tokens; the prompt has {prompt} tokens and `max_tokens` is {max_tokens} ({} in all)", prompt + max_tokens)]
    ContextExceeded {
        max_positions: usize,
        prompt: usize,
        max_tokens: usize,
    },
    #[error("this request asks for {prompts} prompts x `best_of` {best_of} = {} sequences, more than --max-sequences-per-request {max}", prompts.saturating_mul(*best_of))]
    TooManySequences {
        prompts: usize,
        best_of: usize,
        max: usize,
    },
    #[error("`{0}` is too large")]
    TooLarge(&'static str),
    #[error("each prompt runs as {need} sequences (`{param}`), more than the batch holds (--max-batch-size {limit})")]
    BatchSequences {
        param: &'static str,
        need: usize,
        limit: usize,
    },
    #[error("a prompt of {prompt} tokens with `max_tokens` {max_tokens} x {copies} sequences needs {need} KV-cache tokens, more than the server's budget (--max-batch-total-tokens {limit})")]
    BatchTokens {
        param: &'static str,
        prompt: usize,
        max_tokens: usize,
        copies: usize,
        need: usize,
        limit: usize,
    },
    /// A request that fit at validation but not the budget it met (changed since).
    #[error("this request cannot fit the server's batch budget")]
    BudgetChanged,
    #[error("`cache_salt` must have 1 to {max} characters, got {got}")]
    CacheSalt { got: usize, max: usize },
    #[error("`prompt` is required")]
    PromptRequired,
    #[error("`prompt` must not be an empty list")]
    EmptyPromptList,
    #[error("`prompt` must not be empty")]
    EmptyPrompt,
    /// `bytes`: the count is a lower bound from the text's length, before tokenizing.
    #[error("`prompt` has {} tokens, more than --max-input-tokens {max}", match bytes {
        Some(b) => format!("at least {tokens} ({b} bytes)"),
        None => tokens.to_string(),
    })]
    PromptTooLong {
        tokens: usize,
        bytes: Option<usize>,
        max: usize,
    },
    /// `/tokenize`: the context length bounds what is worth counting.
    #[error("`prompt` has {} tokens, more than this model's context length ({max})", match bytes {
        Some(b) => format!("at least {tokens} ({b} bytes)"),
        None => tokens.to_string(),
    })]
    TokenizeTooLong {
        tokens: usize,
        bytes: Option<usize>,
        max: usize,
    },
    /// `/detokenize`: no sequence of this model is longer than its context.
    #[error("`tokens` has {got} ids, more than this model's context length ({max})")]
    DetokenizeTooLong { got: usize, max: usize },
    #[error("cannot tokenize `prompt`: {0}")]
    Untokenizable(String),
    #[error("token ids in `prompt` must be in [0, {vocab}), got {got}")]
    PromptTokenId { vocab: usize, got: i64 },
    #[error("`tokens` must be token ids in [0, {vocab}), got {got}")]
    TokenId { vocab: usize, got: i64 },
    #[error("`positions` must be \"last\" or \"all\", got {0:?}")]
    Positions(String),
    #[error("`positions`: \"all\" inspects every prompt position, at most {max} (--max-inspect-positions); the prompt has {got}: send a shorter prompt or \"last\"")]
    TooManyInspectedPositions { got: usize, max: usize },
    #[error("`{object}` asks for another {kind} than the one named by `model`; send one of them")]
    InspectConflict { object: String, kind: &'static str },
    #[error("`{object}.mode`: the original and exit heads are always reported; name a strategy that combines heads")]
    InspectHead { object: String },
    #[error("`strategies` takes at most {max} strategies, got {got}")]
    TooManyInspectedStrategies { got: usize, max: usize },
    /// A mode object's field, refused by its strategy (the message names the field).
    #[error(transparent)]
    Param(#[from] crate::model::mode::ParamError),
    #[error("`speculative` does not combine with early exit: each token already leaves at the first confident exit")]
    SpeculativeEarlyExit,
    #[error("this model has no chat template: start the server with --chat-template FILE (config/chat-template-base.jinja is a plain one for base models), or send a prompt to /v1/completions")]
    NoChatTemplate,
    #[error("`messages`: {0}")]
    ChatTemplate(crate::model::chat_template::RenderError),
    #[error("`messages` render to a prompt of at least {tokens} tokens, more than --max-input-tokens {max}")]
    MessagesTooLong { tokens: usize, max: usize },
    #[error("`messages` render to an empty prompt")]
    EmptyChatPrompt,
    #[error("`{param}`: {message}")]
    Grammar { param: String, message: String },
    #[error("`{param}` has {got} bytes, more than --max-grammar-bytes {max}")]
    GrammarTooLarge {
        param: String,
        got: usize,
        max: usize,
    },
    #[error("`speculative.draft_layer` is needed: no exit lies at or below half of this mode's depth ({depth})")]
    DraftLayerNeeded { depth: usize },
    #[error("`speculative.draft_layer` must be one of the exit layers {exits:?}, got {got}")]
    DraftLayerNotAnExit { got: i64, exits: Vec<usize> },
    #[error("`speculative.draft_layer` ({layer}) must lie below the layer this mode decodes from ({depth}): the draft is verified by the mode's own distribution")]
    DraftLayerTooDeep { layer: usize, depth: usize },
}

impl ValidationError {
    /// The request field the error names (OpenAI's `param`).
    pub fn param(&self) -> String {
        use ValidationError::*;
        match self {
            OutOfRange { param, .. } | CountOutOfRange { param, .. } => param.clone(),
            TopK(_) => "top_k".into(),
            BestOf { .. } | BestOfWithStream => "best_of".into(),
            ModeConflict => "multi_exit".into(),
            TooManyStops { .. } | EmptyStop | StopTooLong { .. } => "stop".into(),
            TooManyLogitBiases { .. } | LogitBiasKey { .. } | LogitBiasValue { .. } => {
                "logit_bias".into()
            }
            MaxTokensTooSmall { .. }
            | MaxTokensFillContext { .. }
            | ContextExceeded { .. }
            | BudgetChanged => "max_tokens".into(),
            TooManySequences { prompts, max, .. } => {
                if prompts > max { "prompt" } else { "best_of" }.into()
            }
            TooLarge(param) | BatchSequences { param, .. } | BatchTokens { param, .. } => {
                (*param).into()
            }
            PromptRequired
            | EmptyPromptList
            | EmptyPrompt
            | PromptTooLong { .. }
            | Untokenizable(_)
            | TokenizeTooLong { .. }
            | PromptTokenId { .. } => "prompt".into(),
            TokenId { .. } | DetokenizeTooLong { .. } => "tokens".into(),
            Positions(_) | TooManyInspectedPositions { .. } => "positions".into(),
            InspectConflict { object, .. } => object.clone(),
            InspectHead { object } => format!("{object}.mode"),
            TooManyInspectedStrategies { .. } => "strategies".into(),
            Param(p) => p.param.clone(),
            SpeculativeEarlyExit => "speculative".into(),
            CacheSalt { .. } => "cache_salt".into(),
            NoChatTemplate | ChatTemplate(_) | MessagesTooLong { .. } | EmptyChatPrompt => {
                "messages".into()
            }
            Grammar { param, .. } | GrammarTooLarge { param, .. } => param.clone(),
            DraftLayerNeeded { .. } | DraftLayerNotAnExit { .. } | DraftLayerTooDeep { .. } => {
                "speculative.draft_layer".into()
            }
        }
    }

    /// OpenAI's `code`, where it has one for the rule.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            ValidationError::MaxTokensFillContext { .. }
            | ValidationError::ContextExceeded { .. } => Some("context_length_exceeded"),
            _ => None,
        }
    }
}
