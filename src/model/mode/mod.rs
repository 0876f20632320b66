//! Decoding modes: which heads a sequence needs, and how their logits become what is
//! sampled from. Every mode is a strategy in a file of its own that implements [`Strategy`]
//! — its heads, its depth, its scores, its text forms, its request fields, the ids it lists
//! and its playground form — and is named once in `strategies!` below; the batcher, the
//! speculative path, echo scoring, inspections, model ids, presets, metrics and the
//! playground reach it through [`Mode`] alone.
//!
//! Adding a strategy: write `mode/NAME.rs` with a parameter type implementing [`Strategy`]
//! (see `sled.rs`), and add `Variant(NAME::Type)` to the list in `strategies!`.

pub mod params;

use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};

pub use crate::kernels::fastmath::log_softmax;
pub use crate::kernels::greedy::ContrastRule;
pub use crate::kernels::sample::Draw;
pub use crate::kernels::sled::SledRule;
pub use params::{Fields, Form, ModelShape, ParamError};

/// A vocabulary head evaluated on a block's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Head {
    /// The tied `lm_head` on `ln_f` of the top layer.
    Original,
    /// The exit head trained on `ln_f` of the output of block `layer` (1-based).
    Exit(usize),
    /// The original head on the raw output of block `layer` (no `ln_f`; 0 = the embeddings'
    /// output): how transformers' DoLa reads a premature layer.
    LmHeadAt(usize),
}

impl Head {
    /// The block whose output this head reads.
    pub fn layer(self, num_layers: usize) -> usize {
        match self {
            Head::Original => num_layers,
            Head::Exit(l) | Head::LmHeadAt(l) => l,
        }
    }
}

/// A choice a step can make where the logits are, so that only the chosen index travels to
/// the host (`kernels::greedy`, `kernels::sample`). Each equals the host's choice from the
/// strategy's scores save where the host's rounding of them ties two values (or, for a draw,
/// moves a boundary of the cumulative weight across its number).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeviceChoice {
    /// The first argmax of the one head whose log-softmax its scores are: its only head, or
    /// for a per-token exit the head the token leaves at (decided in the step).
    HeadArgmax,
    /// Autocontrastive decoding over its two heads (upper, lower): greedy, the first argmax
    /// of log p_u - log p_l inside the plausible set (p_u >= min(alpha max p_u, the k-th
    /// largest p_u), k the candidate floor); with a draw, the draw from the contrast's
    /// scores.
    Contrast {
        alpha: f32,
        minimum_candidates: usize,
        draw: Option<Draw>,
    },
    /// The draw (temperature, top-k, top-p, its number) from the log-softmax of the one head
    /// whose distribution its scores are, as `HeadArgmax` reads it.
    HeadSample(Draw),
    /// DoLa over its mature head and the premature candidate chosen in the step (its only
    /// one, or the one `SeqStep::select_premature` chooses): greedy, the first argmax of
    /// log p_mature - log p_premature inside the mature head's relative top; with a draw, the
    /// draw from DoLa's logits.
    Dola {
        relative_top: f32,
        draw: Option<Draw>,
    },
}

impl DeviceChoice {
    /// Whether a step can make it from a sequence's `heads` heads (in the order its scores
    /// read them), `premature_chosen` when the step chooses DoLa's candidate there.
    pub fn made_of(&self, heads: usize, premature_chosen: bool) -> bool {
        match self {
            DeviceChoice::HeadArgmax | DeviceChoice::HeadSample(_) => heads == 1,
            DeviceChoice::Contrast { .. } => heads == 2,
            DeviceChoice::Dola { .. } => heads == 2 || (heads > 2 && premature_chosen),
        }
    }

    /// The rule of a choice made of a contrast of two heads' rows (the first head's, and the
    /// second's or DoLa's chosen candidate's); None for one head's.
    pub fn rule(&self) -> Option<ContrastRule> {
        match *self {
            DeviceChoice::HeadArgmax | DeviceChoice::HeadSample(_) => None,
            DeviceChoice::Contrast {
                alpha,
                minimum_candidates,
                ..
            } => Some(ContrastRule::Autocontrast {
                ln_alpha: alpha.ln(),
                minimum_candidates,
            }),
            DeviceChoice::Dola { relative_top, .. } => Some(ContrastRule::Dola {
                ln_relative_top: relative_top.ln(),
            }),
        }
    }

    /// Its draw; None for a greedy choice.
    pub fn draw(&self) -> Option<Draw> {
        match *self {
            DeviceChoice::HeadArgmax => None,
            DeviceChoice::HeadSample(d) => Some(d),
            DeviceChoice::Contrast { draw, .. } | DeviceChoice::Dola { draw, .. } => draw,
        }
    }

    /// The choice of a sequence that draws with `draw` (greedy at temperature 0) from the
    /// scores this greedy choice reads.
    pub fn drawn(self, draw: Draw) -> Self {
        match self {
            _ if draw.temperature == 0.0 => self,
            DeviceChoice::HeadArgmax | DeviceChoice::HeadSample(_) => {
                DeviceChoice::HeadSample(draw)
            }
            DeviceChoice::Contrast {
                alpha,
                minimum_candidates,
                ..
            } => DeviceChoice::Contrast {
                alpha,
                minimum_candidates,
                draw: Some(draw),
            },
            DeviceChoice::Dola { relative_top, .. } => DeviceChoice::Dola {
                relative_top,
                draw: Some(draw),
            },
        }
    }

    /// Whether it is a draw (a sampled sequence's), not a greedy choice.
    pub fn is_draw(&self) -> bool {
        self.draw().is_some()
    }
}

/// A position's log-distribution under a strategy, as an inspection reports it, and the
/// layer the strategy chose there, under the name the report gives it (DoLa's
/// `premature_layer`, early exit's `exit_layer`).
pub struct Inspected {
    pub logprobs: Vec<f32>,
    pub chosen: Option<(&'static str, usize)>,
}

/// A decoding strategy: one file each, named once in `strategies!`.
pub trait Strategy: Copy + PartialEq + fmt::Debug + Sized {
    /// `multi_exit.mode`, the metrics label and the flag form's first word.
    const NAME: &'static str;
    /// The playground's name for it.
    const TITLE: &'static str;
    /// Its request fields besides `mode` (anything else is refused, naming the field).
    const FIELDS: &'static [&'static str];
    /// The first word of its model-id suffixes (`dola` in `NAME:dola-low`): such names
    /// cannot be presets.
    const ID_WORD: &'static str;
    /// Its model-id forms for a 404's message, `{b}` standing for the served name.
    const ID_FORMS: &'static str;
    /// Its flag forms, for the message refusing a flag that does not parse.
    const FLAG_FORMS: &'static str;

    /// (a) The heads it reads at a step, in the order [`Strategy::scores`] takes them.
    fn heads(&self) -> Vec<Head>;

    /// (b) The per-token exit rule, for a strategy that decides per token how deep a
    /// sequence runs (the forward stops at the first exit the rule accepts); None: every
    /// token runs to the deepest head.
    fn token_exit(&self) -> Option<early_exit::EarlyExitParams> {
        None
    }

    /// The strategy for the `t`-th generated token of at most `max_tokens` (a threshold that
    /// decays over the text).
    fn at_token(self, _t: usize, _max_tokens: usize) -> Self {
        self
    }

    /// (c) Its scores from one row of each head's logits (a head above the one a per-token
    /// exit stopped at is empty): the next-token log-distribution, or logits to which
    /// transformers' processors apply before their log-softmax (then
    /// [`Strategy::scores_are_logprobs`] is false).
    fn scores(&self, logits: &[&[f32]]) -> Vec<f32>;

    fn scores_are_logprobs(&self) -> bool {
        true
    }

    /// How a step may make the greedy choice from its scores where the logits are (for a
    /// sequence that reads nothing else of them); None where it needs the rows on the host.
    fn device_choice(&self) -> Option<DeviceChoice> {
        None
    }

    /// How a step may compute its scores where the logits are and hand over those alone
    /// (SLED's, `kernels::sled`, from its first head, the mature one, and the rest in order);
    /// None where they are made on the host from the rows.
    fn device_scores(&self) -> Option<SledRule> {
        None
    }

    /// Whether its scores read its first head (the mature one) and, of the rest, only the
    /// candidate whose distribution is farthest from it by DoLa's divergence
    /// (`kernels::greedy::dola_divergence`): a step may then choose that candidate where the
    /// logits are and hand over only its rows (the others left empty).
    fn selects_premature(&self) -> bool {
        false
    }

    /// The head whose distribution the scores are at this row, for a strategy that takes one
    /// head's distribution (it may choose per row); None for one that combines heads.
    fn chosen_head(&self, _logits: &[&[f32]]) -> Option<usize> {
        None
    }

    /// What an inspection reports at a position: the log-distribution, and any layer chosen.
    fn inspect(&self, logits: &[&[f32]]) -> Inspected {
        let scores = self.scores(logits);
        Inspected {
            logprobs: if self.scores_are_logprobs() {
                scores
            } else {
                log_softmax(&scores)
            },
            chosen: None,
        }
    }

    /// The flag form (`--default-mode`, `--mode-preset`, inspection head names), complete:
    /// `NAME` or `NAME:...`, the parameters that are not defaults included.
    fn write_flag(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result;

    /// The flag form after `NAME:` (None: `NAME` alone); None when it does not parse.
    fn parse_flag(rest: Option<&str>) -> Option<Self>;

    /// Its model-id suffix; None when its parameters are not the defaults an id implies.
    fn id_suffix(&self) -> Option<String>;

    /// The strategy an id suffix (starting with [`Strategy::ID_WORD`]) names; the caller
    /// keeps it only when [`Strategy::id_suffix`] prints the suffix back the same.
    fn from_id_suffix(suffix: &str) -> Option<Self>;

    /// The request fields that ask for it (what a client would send, `mode` left out).
    fn to_request(&self) -> Map<String, Value>;

    /// What the echo of a resolved strategy adds to [`Strategy::to_request`] (e.g. the layers
    /// "low" meant for this model).
    fn resolved(&self) -> Map<String, Value> {
        Map::new()
    }

    /// Reads its fields (types, ranges, defaults).
    fn from_request(fields: &mut Fields, shape: &ModelShape) -> Result<Self, ParamError>;

    /// Checks it against the model and fills in what depends on it (layer sets).
    fn resolve(self, _object: &str, _shape: &ModelShape) -> Result<Self, ParamError> {
        Ok(self)
    }

    /// The ids `/v1/models` lists for a model of this shape (unresolved; those that do not
    /// validate or have no id are dropped).
    fn listed(shape: &ModelShape) -> Vec<Self>;

    /// The playground's form for a model of this shape; None where the model cannot run it.
    fn form(shape: &ModelShape) -> Option<Form>;
}

/// Declares the strategies, once each: the [`Mode`] enum, its dispatch, the registry that
/// parses and lists them. Each entry is `Variant(module::Type)`; the module is the file.
macro_rules! strategies {
    ($($variant:ident($module:ident :: $ty:ident)),* $(,)?) => {
        $(pub mod $module;)*
        $(pub use $module::$ty;)*

        #[derive(Debug, Clone, Copy, PartialEq)]
        pub enum Mode {
            $($variant($ty),)*
        }

        $(impl From<$ty> for Mode {
            fn from(s: $ty) -> Self {
                Mode::$variant(s)
            }
        })*

        impl Mode {
            /// Every strategy's name, as `multi_exit.mode` names it and metrics label it.
            pub const LABELS: &'static [&'static str] = &[$(<$ty as Strategy>::NAME),*];

            /// The mode's kind: one of [`Mode::LABELS`].
            pub fn label(&self) -> &'static str {
                match self { $(Mode::$variant(_) => <$ty as Strategy>::NAME,)* }
            }

            /// The heads to evaluate, in the order [`Mode::scores`] expects their logits.
            pub fn heads(&self) -> Vec<Head> {
                match self { $(Mode::$variant(s) => s.heads(),)* }
            }

            /// The per-token exit rule the forward follows, if the mode decides per token.
            pub fn early_exit(&self) -> Option<early_exit::EarlyExitParams> {
                match self { $(Mode::$variant(s) => s.token_exit(),)* }
            }

            /// The mode for the `t`-th generated token of at most `max_tokens`.
            pub fn at_token(self, t: usize, max_tokens: usize) -> Mode {
                match self { $(Mode::$variant(s) => Mode::$variant(s.at_token(t, max_tokens)),)* }
            }

            /// The mode's scores from one row of each of [`Mode::heads`]' logits.
            pub fn scores(&self, logits: &[&[f32]]) -> Vec<f32> {
                match self { $(Mode::$variant(s) => s.scores(logits),)* }
            }

            /// See [`Strategy::device_choice`].
            pub fn device_choice(&self) -> Option<DeviceChoice> {
                match self { $(Mode::$variant(s) => s.device_choice(),)* }
            }

            /// See [`Strategy::device_scores`].
            pub fn device_scores(&self) -> Option<SledRule> {
                match self { $(Mode::$variant(s) => s.device_scores(),)* }
            }

            /// See [`Strategy::selects_premature`].
            pub fn selects_premature(&self) -> bool {
                match self { $(Mode::$variant(s) => s.selects_premature(),)* }
            }

            /// Whether [`Mode::scores`] are the log-distribution itself (else its logits).
            pub fn scores_are_logprobs(&self) -> bool {
                match self { $(Mode::$variant(s) => s.scores_are_logprobs(),)* }
            }

            /// What an inspection reports for this mode at a position.
            pub fn inspect(&self, logits: &[&[f32]]) -> Inspected {
                match self { $(Mode::$variant(s) => s.inspect(logits),)* }
            }

            fn chosen_index(&self, logits: &[&[f32]]) -> Option<usize> {
                match self { $(Mode::$variant(s) => s.chosen_head(logits),)* }
            }

            /// The model-id suffix naming this mode; None for parameters an id cannot carry.
            pub fn id_suffix(&self) -> Option<String> {
                match self { $(Mode::$variant(s) => s.id_suffix(),)* }
            }

            /// The request fields that ask for this mode, `mode` included.
            pub fn to_request(&self) -> Map<String, Value> {
                let (name, mut fields) = match self {
                    $(Mode::$variant(s) => (<$ty as Strategy>::NAME, s.to_request()),)*
                };
                fields.insert("mode".into(), name.into());
                fields
            }

            /// The echo of a resolved mode: its request fields plus what they resolved to.
            pub fn describe(&self) -> Map<String, Value> {
                let mut fields = self.to_request();
                let resolved = match self { $(Mode::$variant(s) => s.resolved(),)* };
                fields.extend(resolved);
                fields
            }

            /// Checks the mode against the model and resolves what depends on it.
            pub fn resolve(self, object: &str, shape: &ModelShape) -> Result<Mode, ParamError> {
                Ok(match self { $(Mode::$variant(s) => Mode::$variant(s.resolve(object, shape)?),)* })
            }

            /// The mode a request object names: `mode` one of [`Mode::LABELS`], `fields` the
            /// rest of the object named `object`; checked and resolved against the model.
            pub fn from_request(
                object: &str,
                mode: &str,
                fields: Map<String, Value>,
                shape: &ModelShape,
            ) -> Result<Mode, ParamError> {
                $(if mode == <$ty as Strategy>::NAME {
                    let mut f = Fields::new(object, mode, <$ty as Strategy>::FIELDS, fields)?;
                    let s = <$ty as Strategy>::from_request(&mut f, shape)?;
                    return Ok(Mode::$variant(s.resolve(object, shape)?));
                })*
                Err(unknown_mode(object, mode))
            }

            /// The name in [`Mode::LABELS`] equal to `mode`.
            pub fn known_label(mode: &str) -> Option<&'static str> {
                Self::LABELS.iter().copied().find(|&l| l == mode)
            }

            /// Every mode worth listing as a model id for a model of this shape (unresolved).
            pub fn listed(shape: &ModelShape) -> Vec<Mode> {
                let mut out = Vec::new();
                $(out.extend(<$ty as Strategy>::listed(shape).into_iter().map(Mode::$variant));)*
                out
            }

            /// The playground's forms, in the order the strategies are declared.
            pub fn forms(shape: &ModelShape) -> Vec<Form> {
                [$(<$ty as Strategy>::form(shape)),*].into_iter().flatten().collect()
            }

            /// Every flag form, for the message refusing one that does not parse.
            pub fn flag_forms() -> String {
                [$(<$ty as Strategy>::FLAG_FORMS),*].join(", ")
            }

            /// Every model-id form, for a 404's message (`{b}`: the served name).
            pub fn id_forms(base: &str) -> String {
                [$(<$ty as Strategy>::ID_FORMS),*].join(", ").replace("{b}", base)
            }

            /// The mode a model-id suffix names, in its canonical spelling only (`exit-6`,
            /// never `exit-06` or `exit-+6`: an id names one mode and a mode has one id).
            pub fn from_id_suffix(suffix: &str) -> Option<Mode> {
                let word = |w: &str| suffix == w || suffix.starts_with(&format!("{w}-"));
                // the longest word first: `early-exit-` is not `exit-`
                let mut found: Option<(usize, Mode)> = None;
                $(if word(<$ty as Strategy>::ID_WORD)
                    && found.is_none_or(|(len, _)| len < <$ty as Strategy>::ID_WORD.len())
                {
                    if let Some(s) = <$ty as Strategy>::from_id_suffix(suffix) {
                        found = Some((<$ty as Strategy>::ID_WORD.len(), Mode::$variant(s)));
                    }
                })*
                let mode = found?.1;
                (mode.id_suffix().as_deref() == Some(suffix)).then_some(mode)
            }

            /// Whether `name` reads as a built-in model-id suffix, valid or not (`exit-99`,
            /// `contrast-x`): such names cannot be presets.
            pub fn is_reserved_id_suffix(name: &str) -> bool {
                [$(<$ty as Strategy>::ID_WORD),*]
                    .iter()
                    .any(|w| name == *w || name.starts_with(&format!("{w}-")))
            }
        }

        impl fmt::Display for Mode {
            /// The flag form.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self { $(Mode::$variant(s) => s.write_flag(f),)* }
            }
        }

        impl FromStr for Mode {
            type Err = ModeSyntaxError;

            /// The flag form, as [`Mode`]'s `Display` prints it (parameters in any order).
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let (name, rest) = match s.split_once(':') {
                    Some((name, rest)) => (name, Some(rest)),
                    None => (s, None),
                };
                $(if name == <$ty as Strategy>::NAME {
                    if let Some(m) = <$ty as Strategy>::parse_flag(rest) {
                        return Ok(Mode::$variant(m));
                    }
                })*
                Err(ModeSyntaxError(s.to_string()))
            }
        }
    };
}

// The strategies, in the order they are listed (model ids, the playground's menu).
strategies! {
    Original(original::Original),
    Exit(exit::Exit),
    Contrast(contrast::ContrastParams),
    Dola(dola::DolaParams),
    Sled(sled::SledParams),
    EarlyExit(early_exit::EarlyExitParams),
}

pub use contrast::{contrast_log_q, Upper, DEFAULT_ALPHA, DEFAULT_MINIMUM_CANDIDATES};
pub use dola::{DolaLayers, Layers, Premature};

impl Mode {
    /// The original head.
    pub const ORIGINAL: Mode = Mode::Original(Original);

    /// Exit head `layer`.
    pub fn exit(layer: usize) -> Mode {
        Mode::Exit(Exit(layer))
    }

    /// The head whose distribution [`Mode::scores`] gives at `row` (early exit: the exit the
    /// token left at, or the original head); None for a mode that combines heads.
    pub fn chosen_head(&self, logits: &[super::Logits], row: usize) -> Option<Head> {
        let i = self.chosen_index(&rows_at(logits, row))?;
        self.heads().get(i).copied()
    }

    /// Blocks the sequence must run through: layers above are never computed for it.
    pub fn depth(&self, num_layers: usize) -> usize {
        self.heads()
            .iter()
            .map(|h| h.layer(num_layers))
            .max()
            .unwrap_or(num_layers)
    }

    /// [`Mode::scores`] at position `row` of a step's logits (one entry per head): the
    /// scores themselves where the step computed them (`SeqStep::sled`, on the first head).
    pub fn scores_at(&self, logits: &[super::Logits], row: usize) -> Vec<f32> {
        if let Some(scores) = logits.first().filter(|l| l.are_scores()) {
            return scores.row(row).to_vec();
        }
        self.scores(&rows_at(logits, row))
    }

    /// The log-distribution of `scores` (this mode's): themselves, or their log-softmax.
    pub fn logprobs<'s>(&self, scores: &'s [f32]) -> std::borrow::Cow<'s, [f32]> {
        if self.scores_are_logprobs() {
            std::borrow::Cow::Borrowed(scores)
        } else {
            std::borrow::Cow::Owned(log_softmax(scores))
        }
    }
}

impl fmt::Display for Head {
    /// `original`, `exit:L` or `lm_head:L`, as inspections name the heads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Head::Original => f.write_str("original"),
            Head::Exit(l) => write!(f, "exit:{l}"),
            Head::LmHeadAt(l) => write!(f, "lm_head:{l}"),
        }
    }
}

/// A mode's text that does not parse; the message names the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mode `{0}`: expected {forms}", forms = Mode::flag_forms())]
pub struct ModeSyntaxError(pub String);

fn unknown_mode(object: &str, mode: &str) -> ParamError {
    let param = format!("{object}.mode");
    ParamError::new(
        param.clone(),
        format!(
            "`{param}` must be one of {}, got {mode:?}",
            Mode::LABELS.join(", ")
        ),
    )
}

/// Each head's row `row`; empty for a head the step never reached (an early exit's heads above
/// the exit it left at).
fn rows_at(logits: &[super::Logits], row: usize) -> Vec<&[f32]> {
    logits
        .iter()
        .map(|h| if h.is_empty() { &[][..] } else { h.row(row) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth() {
        let m = Mode::Contrast(ContrastParams {
            upper: Upper::Exit(4),
            lower: 2,
            alpha: 0.1,
            minimum_candidates: 1,
        });
        assert_eq!(m.depth(12), 4);
        assert_eq!(Mode::ORIGINAL.depth(12), 12);
    }

    #[test]
    fn every_text_form_round_trips() {
        let contrast = |upper, lower, alpha, minimum_candidates| {
            Mode::Contrast(ContrastParams {
                upper,
                lower,
                alpha,
                minimum_candidates,
            })
        };
        for (mode, flag, suffix) in [
            (Mode::ORIGINAL, "original", Some("original")),
            (Mode::exit(6), "exit:6", Some("exit-6")),
            (
                contrast(Upper::Exit(12), 6, DEFAULT_ALPHA, 1),
                "contrast:12,6",
                Some("contrast-12-6"),
            ),
            (
                contrast(Upper::Original, 2, DEFAULT_ALPHA, 1),
                "contrast:original,2",
                Some("contrast-original-2"),
            ),
            (
                contrast(Upper::Exit(4), 1, 0.05, 3),
                "contrast:4,1,alpha=0.05,minimum_candidates=3",
                None,
            ),
            (Mode::Sled(SledParams::default()), "sled", Some("sled")),
            (
                Mode::EarlyExit(EarlyExitParams::new(0.9)),
                "early_exit:0.9",
                Some("early-exit-0.9"),
            ),
            (
                Mode::EarlyExit(EarlyExitParams {
                    decay: Some(4.0),
                    ..EarlyExitParams::new(0.8)
                }),
                "early_exit:0.8,decay=4",
                None,
            ),
            (
                Mode::Sled(SledParams {
                    premature: Premature::LmHead,
                    evolution_scale: 10,
                    ..SledParams::default()
                }),
                "sled:premature=lm_head,evolution_scale=10",
                None,
            ),
        ] {
            assert_eq!(mode.to_string(), flag);
            assert_eq!(flag.parse::<Mode>(), Ok(mode));
            assert_eq!(mode.id_suffix().as_deref(), suffix);
            if let Some(s) = suffix {
                assert_eq!(Mode::from_id_suffix(s), Some(mode));
                assert!(Mode::is_reserved_id_suffix(s));
            }
        }
        assert_eq!(
            "contrast:4, 1, minimum_candidates=2 ,alpha=0.5".parse::<Mode>(),
            Ok(contrast(Upper::Exit(4), 1, 0.5, 2))
        );
        assert_eq!(Head::Exit(2).to_string(), "exit:2");
        assert_eq!(Head::Original.to_string(), "original");
        assert_eq!(Mode::exit(2).label(), "exit");
    }

    #[test]
    fn malformed_text_is_refused() {
        for bad in [
            "",
            "exit",
            "exit:",
            "exit:-1",
            "contrast:4",
            "contrast:4,x",
            "contrast:4,1,beta=2",
            "Original",
            "sled:",
            "sled:beta=1",
        ] {
            let e = bad.parse::<Mode>().unwrap_err().to_string();
            assert!(
                e.starts_with(&format!(
                    "mode `{bad}`: expected original, exit:L, contrast:U,L"
                )),
                "{e}"
            );
        }
        // Model ids: only the canonical spelling of each mode.
        for bad in [
            "exit-01",
            "exit-+1",
            "exit- 1",
            "contrast-4",
            "contrast-04-1",
            "contrast-original",
            "exit:1",
            "sled-2",
            "sled:alpha=0",
            "early-exit-0.90",
            "early-exit-x",
        ] {
            assert_eq!(Mode::from_id_suffix(bad), None, "{bad}");
        }
    }
}
