//! Structured outputs: a request's JSON schema, regex, choice list or Lark grammar becomes a
//! token mask at every step, computed by `llguidance` and applied to the mode's final scores
//! (after contrast, DoLa or SLED; before the logit bias, penalties and sampling), so every mode
//! is constrained alike.
//!
//! The vocabulary reaches llguidance as each token's bytes, read from our own tokenizer
//! (`llguidance::token_bytes_from_tokenizer_json`): the `toktrie_hf_tokenizers` bridge pins
//! another major version of `tokenizers`, a second copy of it in the build for one function.
//!
//! Bounds: a grammar's text is at most `--max-grammar-bytes`; compiling it and each token's
//! mask run under llguidance's work limits ([`ParserLimits`]: lexer fuel and Earley items,
//! tens of milliseconds at most), so a hostile grammar fails or stops instead of stalling the
//! batch; compiled grammars are kept by content (`--grammar-cache-size`).

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory, TokenParser};

use super::validate::ValidationError;
use crate::model::TextTokenizer;

/// What a request constrains its output to, as sent (unvalidated).
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintSpec {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against a schema.
    JsonSchema(serde_json::Value),
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar as llguidance reads it (also its EBNF-like extensions).
    Grammar(String),
}

/// A constraint and the request field it came from (what a refusal names).
#[derive(Debug, Clone, PartialEq)]
pub struct ConstraintRequest {
    pub spec: ConstraintSpec,
    pub param: String,
}

/// Structured-output settings.
#[derive(Debug, Clone, Copy)]
pub struct StructuredConfig {
    /// Longest schema, regex, grammar or choice list, in bytes (`--max-grammar-bytes`).
    pub max_grammar_bytes: usize,
    /// Compiled grammars kept by content (`--grammar-cache-size`; 0: none kept).
    pub cache_size: usize,
}

impl Default for StructuredConfig {
    fn default() -> Self {
        Self {
            max_grammar_bytes: 65_536,
            cache_size: 64,
        }
    }
}

/// The vocabulary as llguidance sees it: each token's bytes, and our tokenizer for text it
/// must tokenize itself.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<TextTokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie
            .tokenize_with_greedy_fallback(s, |s| self.tokenizer.encode(s).unwrap_or_default())
    }
}

/// Compiles constraints (one per server; shared by the validation threads).
pub struct Grammars {
    factory: ParserFactory,
    cfg: StructuredConfig,
    cache: Mutex<GrammarCache>,
}

#[derive(Default)]
struct GrammarCache {
    parsers: HashMap<String, TokenParser>,
    /// Keys, oldest first.
    order: VecDeque<String>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").field("cfg", &self.cfg).finish()
    }
}

impl Grammars {
    /// The vocabulary of `tokenizer` padded to `vocab_size` (the logits' width), `eos` the
    /// token that ends a complete output. Fails for a tokenizer that is not byte-level BPE
    /// or byte-fallback (each token's bytes must be known).
    pub fn new(
        tokenizer: Arc<TextTokenizer>,
        vocab_size: usize,
        eos: Option<u32>,
        cfg: StructuredConfig,
    ) -> Result<Self, String> {
        let json = tokenizer.to_json().map_err(|e| e.to_string())?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| format!("the token bytes: {e}"))?;
        if words.len() > vocab_size {
            return Err(format!(
                "the tokenizer has {} tokens, the model's vocabulary {vocab_size}",
                words.len()
            ));
        }
        // Ids the model scores but the tokenizer lacks: special, never allowed by a grammar.
        while words.len() < vocab_size {
            let mut name = format!(".<[{}]>", words.len()).into_bytes();
            name[0] = TokTrie::SPECIAL_TOKEN_MARKER;
            words.push(name);
        }
        // Without an end-of-text token, one past the scores (never sampled): a complete output
        // then ends because the grammar allows nothing more.
        let eos = match eos {
            Some(id) => id,
            None => {
                let mut name = b".<eos>".to_vec();
                name[0] = TokTrie::SPECIAL_TOKEN_MARKER;
                words.push(name);
                vocab_size as u32
            }
        };
        let info = TokRxInfo::new(words.len() as u32, eos);
        let env: TokEnv = Arc::new(Vocabulary {
            trie: TokTrie::from(&info, &words),
            tokenizer,
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits {
            verbose_errors: false,
            ..ParserLimits::default()
        };
        Ok(Self {
            factory,
            cfg,
            cache: Mutex::new(GrammarCache::default()),
        })
    }

    /// Compiles `req` (or finds it compiled): a refusal names the field and says why.
    pub fn compile(&self, req: &ConstraintRequest) -> Result<Constraint, ValidationError> {
        let refuse = |message: String| ValidationError::Grammar {
            param: req.param.clone(),
            message,
        };
        let (key, grammar) = self.grammar(req)?;
        if let Some(p) = self.cache.lock().expect("not poisoned").parsers.get(&key) {
            return Ok(Constraint(p.clone()));
        }
        // llguidance reports bad input as errors; a panic inside it is contained here too.
        let compiled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.factory.create_parser(grammar)
        }))
        .map_err(|_| refuse("the grammar could not be compiled".into()))?
        .map_err(|e| refuse(brief(&e.to_string())))?;
        let mut matcher = Matcher::new(Ok(compiled.clone()));
        if matcher.is_error() || matcher.compute_mask().is_err() {
            let why = matcher.get_error().unwrap_or_default();
            return Err(refuse(brief(&why)));
        }
        if self.cfg.cache_size > 0 {
            let mut cache = self.cache.lock().expect("not poisoned");
            if cache.parsers.len() >= self.cfg.cache_size {
                if let Some(old) = cache.order.pop_front() {
                    cache.parsers.remove(&old);
                }
            }
            cache.order.push_back(key.clone());
            cache.parsers.insert(key, compiled.clone());
        }
        Ok(Constraint(compiled))
    }

    /// The grammar of `req` and its cache key, after the size bound.
    fn grammar(
        &self,
        req: &ConstraintRequest,
    ) -> Result<(String, TopLevelGrammar), ValidationError> {
        let (kind, text) = match &req.spec {
            ConstraintSpec::JsonObject => ("json_object", String::new()),
            ConstraintSpec::JsonSchema(s) => ("json_schema", s.to_string()),
            ConstraintSpec::Regex(r) => ("regex", r.clone()),
            ConstraintSpec::Choice(c) => ("choice", serde_json::to_string(c).unwrap_or_default()),
            ConstraintSpec::Grammar(g) => ("grammar", g.clone()),
        };
        if text.len() > self.cfg.max_grammar_bytes {
            return Err(ValidationError::GrammarTooLarge {
                param: req.param.clone(),
                got: text.len(),
                max: self.cfg.max_grammar_bytes,
            });
        }
        let refuse = |message: &str| ValidationError::Grammar {
            param: req.param.clone(),
            message: message.into(),
        };
        let grammar = match &req.spec {
            ConstraintSpec::JsonObject => json_grammar(serde_json::json!({"type": "object"})),
            ConstraintSpec::JsonSchema(s) if !s.is_object() && !s.is_boolean() => {
                return Err(refuse("a JSON schema is an object (or true/false)"))
            }
            ConstraintSpec::JsonSchema(s) => json_grammar(s.clone()),
            ConstraintSpec::Regex(r) if r.is_empty() => return Err(refuse("the regex is empty")),
            ConstraintSpec::Regex(r) => TopLevelGrammar::from_regex(r),
            ConstraintSpec::Choice(c) if c.is_empty() => {
                return Err(refuse("the list of choices is empty"))
            }
            ConstraintSpec::Choice(c) if c.iter().any(String::is_empty) => {
                return Err(refuse("a choice is an empty string"))
            }
            // Lark string literals take JSON's escapes.
            ConstraintSpec::Choice(c) => TopLevelGrammar::from_lark(format!(
                "start: {}",
                c.iter()
                    .map(|s| serde_json::to_string(s).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join(" | ")
            )),
            ConstraintSpec::Grammar(g) if g.trim().is_empty() => {
                return Err(refuse("the grammar is empty"))
            }
            ConstraintSpec::Grammar(g) => TopLevelGrammar::from_lark(g.clone()),
        };
        Ok((format!("{kind}\0{text}"), grammar))
    }
}

/// JSON as Python's `json.dumps` writes it (`", "`, `": "`, no other whitespace) unless the
/// schema says otherwise in llguidance's `x-guidance`: flexible whitespace lets a model pad
/// its output with spaces and newlines until `max_tokens`.
fn json_grammar(mut schema: serde_json::Value) -> TopLevelGrammar {
    if let Some(obj) = schema.as_object_mut() {
        if !obj.contains_key("x-guidance") {
            let opts = JsonCompileOptions {
                item_separator: ", ".into(),
                key_separator: ": ".into(),
                whitespace_flexible: false,
                ..JsonCompileOptions::default()
            };
            opts.apply_to(&mut schema);
        }
    }
    TopLevelGrammar::from_json_schema(schema)
}

/// llguidance's message on one line (its regex errors draw a caret under the pattern), cut
/// to a readable length.
fn brief(s: &str) -> String {
    let one: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    match one.char_indices().nth(300) {
        Some((at, _)) => format!("{}...", &one[..at]),
        None => one,
    }
}

/// A compiled constraint: each sequence of the request gets its own [`Guide`] from it.
#[derive(Clone)]
pub struct Constraint(TokenParser);

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Constraint {
    pub fn guide(&self) -> Guide {
        Guide {
            matcher: Matcher::new(Ok(self.0.clone())),
            drafted: 0,
            off_track: false,
            spent: Duration::ZERO,
            prepared: None,
        }
    }
}

/// One sequence's place in its grammar.
pub struct Guide {
    matcher: Matcher,
    /// Draft tokens consumed ahead of their verification (rolled back before it).
    drafted: usize,
    /// A draft of this round left the grammar (or met its end): later drafts go unmasked.
    off_track: bool,
    /// Time spent in the grammar since [`Guide::take_spent`] last read it.
    spent: Duration,
    /// The next token's constraint, computed ahead ([`Guide::prepare`]).
    prepared: Option<Constrained>,
}

/// What the grammar makes of a step's scores.
#[derive(Debug, PartialEq)]
pub enum Constrained {
    /// The greedy choice made without the mask, which the grammar allows: the masked scores'
    /// greedy choice too (masking only removes tokens), found without computing the mask.
    Allowed(u32),
    /// The scores with every token the grammar rules out at -inf.
    Masked(Vec<f32>),
    /// The grammar allows no token the scores leave possible (or it failed): the output ends.
    DeadEnd,
}

impl Guide {
    /// `scores` with every token the grammar rules out here at -inf; None when it allows
    /// none (a dead end, or a grammar that failed: the sequence stops).
    pub fn masked(&mut self, scores: &[f32]) -> Option<Vec<f32>> {
        let start = Instant::now();
        let out = self.mask(scores);
        self.spent += start.elapsed();
        out
    }

    /// The next token's constraint. `greedy` gives the token greedy decoding picks from the
    /// unmasked scores, when nothing needs the masked distribution itself (no logprobs, no
    /// `best_of` ranking): if the grammar allows it (a check of one token, where a mask
    /// visits the whole vocabulary), it stands. It is called only when no constraint was
    /// prepared (its argmax is a pass over the vocabulary too).
    pub fn constrain(
        &mut self,
        scores: &[f32],
        greedy: impl FnOnce() -> Option<u32>,
    ) -> Constrained {
        if let Some(done) = self.prepared.take() {
            return done;
        }
        let start = Instant::now();
        let allowed = greedy().filter(|&t| {
            scores.get(t as usize).is_some_and(|s| s.is_finite())
                && !self.matcher.is_stopped()
                && self.matcher.validate_tokens(&[t]).ok() == Some(1)
        });
        let out = match allowed {
            Some(t) => Constrained::Allowed(t),
            None => self
                .mask(scores)
                .map_or(Constrained::DeadEnd, Constrained::Masked),
        };
        self.spent += start.elapsed();
        out
    }

    fn mask(&mut self, scores: &[f32]) -> Option<Vec<f32>> {
        if self.matcher.is_stopped() {
            return None;
        }
        let mask = self.matcher.compute_mask().ok()?;
        // Only the allowed tokens are visited (a grammar allows few of the vocabulary).
        let mut out = vec![f32::NEG_INFINITY; scores.len()];
        let mut any = false;
        mask.iter_set_entries(|i| {
            if let Some(&s) = scores.get(i) {
                out[i] = s;
                any |= s.is_finite();
            }
        });
        any.then_some(out)
    }

    /// Computes [`Guide::constrain`] ahead, for its next call (the batcher computes a step's
    /// constraints in parallel, then samples in order). The arguments must be that call's;
    /// [`Guide::forget_prepared`] drops one that will not be used.
    pub fn prepare(&mut self, scores: &[f32], greedy: Option<u32>) {
        self.prepared = None;
        let c = self.constrain(scores, || greedy);
        self.prepared = Some(c);
    }

    pub fn forget_prepared(&mut self) {
        self.prepared = None;
    }

    /// Takes the chosen token; true when the grammar is complete and allows nothing more
    /// (or cannot go on), so that the output ends here.
    pub fn advance(&mut self, id: u32) -> bool {
        let start = Instant::now();
        let done = self.matcher.consume_token(id).is_err() || self.matcher.is_stopped();
        self.spent += start.elapsed();
        done
    }

    /// The grammar's time since the last call (for the per-token metric).
    pub fn take_spent(&mut self) -> Duration {
        std::mem::take(&mut self.spent)
    }

    /// The scores a draft is chosen from: masked while the drafts stay inside the grammar;
    /// after a dead end, the draft's own (the verification rejects what the grammar does not
    /// allow).
    pub fn draft_scores<'s>(&mut self, scores: &'s [f32]) -> Cow<'s, [f32]> {
        if !self.off_track {
            if let Some(m) = self.masked(scores) {
                return Cow::Owned(m);
            }
            self.off_track = true;
        }
        Cow::Borrowed(scores)
    }

    /// Takes a draft chosen from [`Guide::draft_scores`] ahead of its verification.
    pub fn draft(&mut self, id: u32) {
        if self.off_track {
            return;
        }
        // Checked first: a refused token would leave the matcher in its error state.
        if self.matcher.validate_tokens(&[id]).ok() == Some(1)
            && self.matcher.consume_token(id).is_ok()
        {
            self.drafted += 1;
        } else {
            self.off_track = true;
        }
    }

    /// Back to where the drafts started: the verification advances one token at a time.
    pub fn end_drafts(&mut self) {
        if self.drafted > 0 {
            let _ = self.matcher.rollback(self.drafted);
        }
        self.drafted = 0;
        self.off_track = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::source::TokenizerFiles;

    const VOCAB: usize = 50257;
    const EOS: u32 = 50256;

    fn tokenizer() -> Arc<TextTokenizer> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-gpt2-multiexit/tokenizer.json");
        Arc::new(TextTokenizer::from_files(&TokenizerFiles::Json(path)).unwrap())
    }

    fn grammars(cfg: StructuredConfig) -> Grammars {
        Grammars::new(tokenizer(), VOCAB, Some(EOS), cfg).unwrap()
    }

    fn req(spec: ConstraintSpec) -> ConstraintRequest {
        ConstraintRequest {
            spec,
            param: "structured_outputs.x".into(),
        }
    }

    /// Greedy decoding of `scores` (a fixed preference order over the vocabulary) under
    /// `guide`: the text, and whether the grammar completed (`false`: max_tokens).
    fn decode(
        guide: &mut Guide,
        tok: &TextTokenizer,
        prefer: &[f32],
        max: usize,
    ) -> (String, bool) {
        let mut ids = Vec::new();
        for _ in 0..max {
            let Some(m) = guide.masked(prefer) else {
                return (tok.decode(&ids).unwrap(), true);
            };
            let id = crate::engine::sampling::argmax(&m);
            if id == EOS {
                return (tok.decode(&ids).unwrap(), true);
            }
            ids.push(id);
            if guide.advance(id) {
                return (tok.decode(&ids).unwrap(), true);
            }
        }
        (tok.decode(&ids).unwrap(), false)
    }

    /// Scores that prefer low token ids (GPT-2's ids start with punctuation and digits).
    fn prefer_low() -> Vec<f32> {
        (0..VOCAB).map(|i| -(i as f32) / VOCAB as f32).collect()
    }

    #[test]
    fn a_regex_admits_only_its_language_and_ends_when_complete() {
        let g = grammars(StructuredConfig::default());
        let c = g
            .compile(&req(ConstraintSpec::Regex("[0-9]{3}-[a-z]{2}".into())))
            .unwrap();
        let tok = tokenizer();
        let (text, complete) = decode(&mut c.guide(), &tok, &prefer_low(), 20);
        assert!(complete, "{text}");
        let b = text.as_bytes();
        assert_eq!(b.len(), 6, "{text}");
        assert!(
            b[..3].iter().all(u8::is_ascii_digit) && b[3] == b'-',
            "{text}"
        );
        assert!(b[4..].iter().all(u8::is_ascii_lowercase), "{text}");
    }

    #[test]
    fn choices_with_quotes_and_json_schemas_compile_and_constrain() {
        let g = grammars(StructuredConfig::default());
        let tok = tokenizer();
        let choices = vec!["say \"hi\"".to_string(), "b\\c".to_string()];
        let c = g
            .compile(&req(ConstraintSpec::Choice(choices.clone())))
            .unwrap();
        let (text, complete) = decode(&mut c.guide(), &tok, &prefer_low(), 20);
        assert!(complete && choices.contains(&text), "{text:?}");
        let schema = serde_json::json!({"type": "object",
            "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"enum": ["x", "y"]}},
            "required": ["a", "b"], "additionalProperties": false});
        let c = g.compile(&req(ConstraintSpec::JsonSchema(schema))).unwrap();
        let (text, complete) = decode(&mut c.guide(), &tok, &prefer_low(), 40);
        assert!(complete, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            v["a"].as_i64().is_some_and(|a| (0..=9).contains(&a)),
            "{text}"
        );
        assert!(v["b"] == "x" || v["b"] == "y", "{text}");
        // Python's separators, no other whitespace.
        assert!(text.starts_with("{\"a\": "), "{text}");
    }

    #[test]
    fn bad_grammars_are_refused_naming_the_field() {
        let g = grammars(StructuredConfig {
            max_grammar_bytes: 64,
            cache_size: 4,
        });
        for spec in [
            ConstraintSpec::Regex("[a-".into()),
            ConstraintSpec::Regex(String::new()),
            ConstraintSpec::Grammar("start: undefined_rule".into()),
            ConstraintSpec::Choice(vec![]),
            ConstraintSpec::Choice(vec!["".into()]),
            ConstraintSpec::JsonSchema(serde_json::json!({"type": "bogus"})),
            ConstraintSpec::JsonSchema(serde_json::json!(3)),
        ] {
            match g.compile(&req(spec.clone())) {
                Err(ValidationError::Grammar { param, message }) => {
                    assert_eq!(param, "structured_outputs.x");
                    assert!(!message.is_empty() && !message.contains('\n'), "{message}");
                }
                other => panic!("{spec:?}: {other:?}"),
            }
        }
        let long = ConstraintSpec::Regex("a".repeat(65));
        assert!(matches!(
            g.compile(&req(long)),
            Err(ValidationError::GrammarTooLarge {
                got: 65,
                max: 64,
                ..
            })
        ));
    }

    #[test]
    fn compiled_grammars_are_kept_by_content_up_to_the_cache_size() {
        let g = grammars(StructuredConfig {
            max_grammar_bytes: 1000,
            cache_size: 2,
        });
        for r in ["a+", "b+", "a+", "c+"] {
            g.compile(&req(ConstraintSpec::Regex(r.into()))).unwrap();
        }
        let cache = g.cache.lock().unwrap();
        assert_eq!(cache.parsers.len(), 2);
        assert!(cache.parsers.contains_key("regex\0c+"));
    }

    #[test]
    fn drafts_run_ahead_inside_the_grammar_and_roll_back() {
        let g = grammars(StructuredConfig::default());
        let c = g
            .compile(&req(ConstraintSpec::Regex("[0-9]{4}".into())))
            .unwrap();
        let tok = tokenizer();
        let prefer = prefer_low();
        let mut guide = c.guide();
        let first = guide.masked(&prefer).unwrap();
        for _ in 0..2 {
            let s = guide.draft_scores(&prefer).into_owned();
            let d = crate::engine::sampling::argmax(&s);
            assert!(tok
                .decode(&[d])
                .unwrap()
                .bytes()
                .all(|b| b.is_ascii_digit()));
            guide.draft(d);
        }
        guide.end_drafts();
        // Back at the start: the same mask as before the drafts.
        assert_eq!(guide.masked(&prefer).unwrap(), first);
    }

    #[test]
    fn the_greedy_check_picks_what_the_mask_would() {
        let g = grammars(StructuredConfig::default());
        let c = g
            .compile(&req(ConstraintSpec::Regex("[a-z ]{1,30}".into())))
            .unwrap();
        let tok = tokenizer();
        // Scores whose best token is sometimes allowed, sometimes not.
        let (mut fast, mut slow) = (c.guide(), c.guide());
        let (mut allowed, mut masked) = (0, 0);
        for step in 0..12u32 {
            let mut scores: Vec<f32> = (0..VOCAB as u32)
                .map(|i| ((i.wrapping_mul(2654435761) ^ step.wrapping_mul(40503)) % 1000) as f32)
                .collect();
            if step % 2 == 0 {
                scores[tok.token_id("a").unwrap() as usize] = 2000.0;
            }
            let best = crate::engine::sampling::argmax(&scores);
            let a = match fast.constrain(&scores, || Some(best)) {
                Constrained::Allowed(t) => {
                    allowed += 1;
                    t
                }
                Constrained::Masked(m) => {
                    masked += 1;
                    crate::engine::sampling::argmax(&m)
                }
                Constrained::DeadEnd => break,
            };
            let b = crate::engine::sampling::argmax(&slow.masked(&scores).unwrap());
            assert_eq!(a, b, "step {step}: {:?}", tok.decode(&[a, b]));
            if fast.advance(a) | slow.advance(b) {
                break;
            }
        }
        assert!(
            masked > 0 && allowed > 0,
            "{masked} masked, {allowed} allowed"
        );
    }

    #[test]
    fn without_an_end_of_text_token_a_complete_output_stops_by_itself() {
        let g = Grammars::new(tokenizer(), VOCAB, None, StructuredConfig::default()).unwrap();
        let c = g
            .compile(&req(ConstraintSpec::Choice(vec!["yes".into()])))
            .unwrap();
        let (text, complete) = decode(&mut c.guide(), &tokenizer(), &prefer_low(), 10);
        assert_eq!((text.as_str(), complete), ("yes", true));
    }
}
