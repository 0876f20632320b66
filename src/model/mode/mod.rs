//! Decoding modes: which heads a sequence needs, and how their logits become what is
//! sampled from. The original head and one exit are here; each strategy that combines heads
//! has a file: `contrast.rs` (autocontrastive decoding, Gera et al. 2023), `dola.rs` (DoLa),
//! `sled.rs` (SLED), `early_exit.rs` (confidence-based early exit, CALM).

pub mod contrast;
pub mod dola;
pub mod early_exit;
pub mod sled;

use std::fmt;
use std::str::FromStr;

use crate::kernels::fastmath;
pub use contrast::{
    contrast_log_q, ContrastParams, Upper, DEFAULT_ALPHA, DEFAULT_MINIMUM_CANDIDATES,
};
pub use dola::{DolaLayers, DolaParams, Layers, Premature};
pub use early_exit::EarlyExitParams;
pub use sled::SledParams;

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

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Original,
    Exit(usize),
    Contrast(ContrastParams),
    Dola(DolaParams),
    Sled(SledParams),
    EarlyExit(EarlyExitParams),
}

impl Mode {
    /// Every kind of mode, as `multi_exit.mode` names it and metrics label it.
    pub const LABELS: [&'static str; 6] =
        ["original", "exit", "contrast", "dola", "sled", "early_exit"];

    /// The mode's kind: one of [`Mode::LABELS`].
    pub fn label(&self) -> &'static str {
        Self::LABELS[match self {
            Mode::Original => 0,
            Mode::Exit(_) => 1,
            Mode::Contrast(_) => 2,
            Mode::Dola(_) => 3,
            Mode::Sled(_) => 4,
            Mode::EarlyExit(_) => 5,
        }]
    }

    /// The heads to evaluate, in the order [`Mode::scores`] expects their logits.
    pub fn heads(&self) -> Vec<Head> {
        match *self {
            Mode::Original => vec![Head::Original],
            Mode::Exit(l) => vec![Head::Exit(l)],
            Mode::Contrast(c) => vec![c.upper.into(), Head::Exit(c.lower)],
            // the mature head, then each premature layer's
            Mode::Dola(DolaParams {
                premature,
                candidates,
                ..
            })
            | Mode::Sled(SledParams {
                premature,
                candidates,
                ..
            }) => std::iter::once(Head::Original)
                .chain(candidates.iter().map(|l| premature.head(l)))
                .collect(),
            // exits ascending, then the original head: `EarlyExitParams::chosen`'s order
            Mode::EarlyExit(e) => e
                .exits
                .iter()
                .map(Head::Exit)
                .chain(std::iter::once(Head::Original))
                .collect(),
        }
    }

    /// The mode for the `t`-th generated token of at most `max_tokens`: itself, or for early
    /// exit with a decaying threshold, that token's threshold.
    pub fn at_token(self, t: usize, max_tokens: usize) -> Mode {
        match self {
            Mode::EarlyExit(e) => Mode::EarlyExit(e.at_token(t, max_tokens)),
            other => other,
        }
    }

    /// The threshold the forward decides early exits with, for an early-exit mode.
    pub fn early_exit(&self) -> Option<EarlyExitParams> {
        match *self {
            Mode::EarlyExit(e) => Some(e),
            _ => None,
        }
    }

    /// The head whose distribution [`Mode::scores`] gives at `row` (early exit: the exit the
    /// token left at, or the original head); None for a mode that combines heads.
    pub fn chosen_head(&self, logits: &[super::Logits], row: usize) -> Option<Head> {
        let heads = self.heads();
        match self {
            Mode::Original | Mode::Exit(_) => heads.first().copied(),
            Mode::EarlyExit(e) => heads.get(e.chosen(&rows_at(logits, row))).copied(),
            _ => None,
        }
    }

    /// Blocks the sequence must run through: layers above are never computed for it.
    pub fn depth(&self, num_layers: usize) -> usize {
        self.heads()
            .iter()
            .map(|h| h.layer(num_layers))
            .max()
            .unwrap_or(num_layers)
    }

    /// [`Mode::scores`] at position `row` of a step's logits (one entry per head).
    pub fn scores_at(&self, logits: &[super::Logits], row: usize) -> Vec<f32> {
        self.scores(&rows_at(logits, row))
    }

    /// The mode's scores from the logits of [`Mode::heads`]: the next-token log-distribution
    /// (log-softmax for a single head, log q for contrast), or for DoLa and SLED their
    /// logits, unnormalised, because transformers' processors (the repetition penalty) edit
    /// those.
    /// [`Mode::logprobs`] turns either into the log-distribution.
    pub fn scores(&self, logits: &[&[f32]]) -> Vec<f32> {
        match self {
            Mode::Original | Mode::Exit(_) => log_softmax(logits[0]),
            Mode::Contrast(c) => contrast_log_q(logits[0], logits[1], c),
            Mode::Dola(d) => dola::dola_logits(logits[0], &logits[1..], d.relative_top).0,
            Mode::Sled(p) => sled::sled_logits(logits[0], &logits[1..], p),
            Mode::EarlyExit(e) => log_softmax(logits[e.chosen(logits)]),
        }
    }

    /// Whether [`Mode::scores`] are the log-distribution itself (else its logits).
    pub fn scores_are_logprobs(&self) -> bool {
        !matches!(self, Mode::Dola(_) | Mode::Sled(_))
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

// The text forms of a mode, each with one printer and one parser here:
// - the flag form (`--default-mode`, `--mode-preset`): `original`, `exit:L`,
//   `contrast:U,L[,alpha=A][,minimum_candidates=K]` (`U` a layer or `original`);
// - the model-id suffix (`NAME:exit-L`, `NAME:contrast-U-L`), for default contrast parameters;
// - the metrics label ([`Mode::label`]) and the inspection's head names (`exit:L`,
//   `contrast:U,L`).
// Parsing checks the syntax only; whether a layer is an exit is the validator's question.

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

impl fmt::Display for Mode {
    /// The flag form: `original`, `exit:L`, `contrast:U,L` plus the parameters that are not
    /// the defaults.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Original => f.write_str("original"),
            Mode::Exit(l) => write!(f, "exit:{l}"),
            Mode::Contrast(c) => contrast::write_flag(c, f),
            Mode::Dola(d) => write!(f, "{d}"),
            Mode::Sled(p) => write!(f, "{p}"),
            Mode::EarlyExit(e) => write!(f, "{e}"),
        }
    }
}

/// A mode's text that does not parse; the message names the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "mode `{0}`: expected original, exit:L, contrast:U,L[,alpha=A][,minimum_candidates=K] or \
     dola:LAYERS[,premature=exits|lm_head][,relative_top=R] (LAYERS: low, high or L-L-...) or \
     sled[:premature=exits|lm_head,evolution_rate=R,evolution_scale=K,evolution_lower_bound=B,alpha=A] \
     or early_exit:THRESHOLD[,decay=T]"
)]
pub struct ModeSyntaxError(pub String);

impl FromStr for Mode {
    type Err = ModeSyntaxError;

    /// The flag form, as [`Mode`]'s `Display` prints it (parameters in any order).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ModeSyntaxError(s.to_string());
        if s == "original" {
            return Ok(Mode::Original);
        }
        if let Some(l) = s.strip_prefix("exit:") {
            return Ok(Mode::Exit(l.trim().parse().map_err(|_| bad())?));
        }
        if s == "sled" {
            return Ok(Mode::Sled(SledParams::default()));
        }
        if let Some(rest) = s.strip_prefix("sled:") {
            return sled::parse_flag(rest).map(Mode::Sled).ok_or_else(bad);
        }
        if let Some(rest) = s.strip_prefix("early_exit:") {
            return early_exit::parse_flag(rest)
                .map(Mode::EarlyExit)
                .ok_or_else(bad);
        }
        if let Some(rest) = s.strip_prefix("dola:") {
            return dola::parse_flag(rest).map(Mode::Dola).ok_or_else(bad);
        }
        let rest = s.strip_prefix("contrast:").ok_or_else(bad)?;
        contrast::parse_flag(rest)
            .map(Mode::Contrast)
            .ok_or_else(bad)
    }
}

impl Mode {
    /// The model-id suffix naming this mode (`original`, `exit-L`, `contrast-U-L`,
    /// `dola-low`, `dola-L-L`); None for a mode with other than the default parameters, which
    /// has no id of its own.
    pub fn id_suffix(&self) -> Option<String> {
        match self {
            Mode::Original => Some("original".into()),
            Mode::Exit(l) => Some(format!("exit-{l}")),
            Mode::Contrast(c) => contrast::id_suffix(c),
            Mode::Dola(d) => dola::id_suffix(d),
            Mode::Sled(p) => sled::id_suffix(p),
            Mode::EarlyExit(e) => early_exit::id_suffix(e),
        }
    }

    /// The mode a model-id suffix names, in its canonical spelling only (`exit-6`, never
    /// `exit-06` or `exit-+6`: an id names one mode and a mode has one id).
    pub fn from_id_suffix(suffix: &str) -> Option<Mode> {
        let mode = if suffix == "original" {
            Mode::Original
        } else if let Some(l) = suffix.strip_prefix("exit-") {
            Mode::Exit(l.parse().ok()?)
        } else if suffix.starts_with("early-exit-") {
            Mode::EarlyExit(early_exit::from_id_suffix(suffix)?)
        } else if suffix == "sled" {
            Mode::Sled(SledParams::default())
        } else if suffix.starts_with("dola-") {
            Mode::Dola(dola::from_id_suffix(suffix)?)
        } else {
            Mode::Contrast(contrast::from_id_suffix(suffix)?)
        };
        (mode.id_suffix().as_deref() == Some(suffix)).then_some(mode)
    }

    /// Whether `name` reads as a built-in model-id suffix, valid or not (`exit-99`,
    /// `contrast-x`): such names cannot be presets.
    pub fn is_reserved_id_suffix(name: &str) -> bool {
        name == "original"
            || name == "sled"
            || ["exit-", "contrast-", "dola-", "sled-", "early-exit-"]
                .iter()
                .any(|p| name.starts_with(p))
    }
}

/// Each head's row `row`; empty for a head the step never reached (an early exit's heads above
/// the exit it left at).
fn rows_at(logits: &[super::Logits], row: usize) -> Vec<&[f32]> {
    logits
        .iter()
        .map(|h| if h.is_empty() { &[][..] } else { h.row(row) })
        .collect()
}

/// (max, log Σ e^x) of `xs`: the shift and the normaliser of a log-softmax.
pub(super) fn log_sum_exp(xs: &[f32]) -> (f32, f32) {
    let max = fastmath::max(xs);
    (max, max + fastmath::sum_exp(xs, max).ln())
}

pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    fastmath::sub(logits, log_sum_exp(logits).1)
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
        assert_eq!(Mode::Original.depth(12), 12);
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
            (Mode::Original, "original", Some("original")),
            (Mode::Exit(6), "exit:6", Some("exit-6")),
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
        assert_eq!(Mode::Exit(2).label(), "exit");
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
