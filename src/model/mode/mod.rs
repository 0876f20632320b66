//! Decoding modes: which heads a sequence needs, and how their logits become the
//! log-distribution that is sampled from (autocontrastive decoding, Gera et al. 2023; DoLa in
//! `dola.rs`).

pub mod dola;

use std::fmt;
use std::str::FromStr;

use crate::kernels::fastmath;
pub use dola::{DolaLayers, DolaParams, Layers, Premature};

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

/// Upper side of a contrast: an exit layer or the original head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upper {
    Original,
    Exit(usize),
}

impl From<Upper> for Head {
    fn from(u: Upper) -> Self {
        match u {
            Upper::Original => Head::Original,
            Upper::Exit(l) => Head::Exit(l),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContrastParams {
    pub upper: Upper,
    pub lower: usize,
    /// Plausibility threshold relative to the upper head's top probability.
    pub alpha: f32,
    /// Tokens always kept in the plausible set (the k most likely of the upper head).
    pub minimum_candidates: usize,
}

pub const DEFAULT_ALPHA: f32 = 0.1;
pub const DEFAULT_MINIMUM_CANDIDATES: usize = 1;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Original,
    Exit(usize),
    Contrast(ContrastParams),
    Dola(DolaParams),
}

impl Mode {
    /// Every kind of mode, as `multi_exit.mode` names it and metrics label it.
    pub const LABELS: [&'static str; 4] = ["original", "exit", "contrast", "dola"];

    /// The mode's kind: one of [`Mode::LABELS`].
    pub fn label(&self) -> &'static str {
        Self::LABELS[match self {
            Mode::Original => 0,
            Mode::Exit(_) => 1,
            Mode::Contrast(_) => 2,
            Mode::Dola(_) => 3,
        }]
    }

    /// The heads to evaluate, in the order [`Mode::scores`] expects their logits.
    pub fn heads(&self) -> Vec<Head> {
        match *self {
            Mode::Original => vec![Head::Original],
            Mode::Exit(l) => vec![Head::Exit(l)],
            Mode::Contrast(c) => vec![c.upper.into(), Head::Exit(c.lower)],
            Mode::Dola(d) => std::iter::once(Head::Original)
                .chain(d.candidates.iter().map(|l| match d.premature {
                    Premature::Exits => Head::Exit(l),
                    Premature::LmHead => Head::LmHeadAt(l),
                }))
                .collect(),
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
        let heads: Vec<&[f32]> = logits.iter().map(|h| h.row(row)).collect();
        self.scores(&heads)
    }

    /// The mode's scores from the logits of [`Mode::heads`]: the next-token log-distribution
    /// (log-softmax for a single head, log q for contrast), or for DoLa its contrast logits,
    /// unnormalised, because transformers' processors (the repetition penalty) edit those.
    /// [`Mode::logprobs`] turns either into the log-distribution.
    pub fn scores(&self, logits: &[&[f32]]) -> Vec<f32> {
        match self {
            Mode::Original | Mode::Exit(_) => log_softmax(logits[0]),
            Mode::Contrast(c) => contrast_log_q(logits[0], logits[1], c),
            Mode::Dola(d) => dola::dola_logits(logits[0], &logits[1..], d.relative_top).0,
        }
    }

    /// Whether [`Mode::scores`] are the log-distribution itself (else its logits).
    pub fn scores_are_logprobs(&self) -> bool {
        !matches!(self, Mode::Dola(_))
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

impl fmt::Display for Upper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Upper::Original => f.write_str("original"),
            Upper::Exit(l) => write!(f, "{l}"),
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

impl fmt::Display for ContrastParams {
    /// `contrast:U,L`: the pair of heads contrasted, as inspections name the contrast.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "contrast:{},{}", self.upper, self.lower)
    }
}

impl ContrastParams {
    /// Whether alpha and the candidate floor are the defaults.
    fn has_default_params(&self) -> bool {
        self.alpha == DEFAULT_ALPHA && self.minimum_candidates == DEFAULT_MINIMUM_CANDIDATES
    }
}

impl fmt::Display for Mode {
    /// The flag form: `original`, `exit:L`, `contrast:U,L` plus the parameters that are not
    /// the defaults.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Original => f.write_str("original"),
            Mode::Exit(l) => write!(f, "exit:{l}"),
            Mode::Contrast(c) => {
                write!(f, "{c}")?;
                if c.alpha != DEFAULT_ALPHA {
                    write!(f, ",alpha={}", c.alpha)?;
                }
                if c.minimum_candidates != DEFAULT_MINIMUM_CANDIDATES {
                    write!(f, ",minimum_candidates={}", c.minimum_candidates)?;
                }
                Ok(())
            }
            Mode::Dola(d) => write!(f, "{d}"),
        }
    }
}

/// A mode's text that does not parse; the message names the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "mode `{0}`: expected original, exit:L, contrast:U,L[,alpha=A][,minimum_candidates=K] or \
     dola:LAYERS[,premature=exits|lm_head][,relative_top=R] (LAYERS: low, high or L-L-...)"
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
        if let Some(rest) = s.strip_prefix("dola:") {
            return dola::parse_flag(rest).map(Mode::Dola).ok_or_else(bad);
        }
        let mut parts = s.strip_prefix("contrast:").ok_or_else(bad)?.split(',');
        let (u, l) = (parts.next().ok_or_else(bad)?, parts.next().ok_or_else(bad)?);
        let mut c = ContrastParams {
            upper: parse_upper(u.trim()).ok_or_else(bad)?,
            lower: l.trim().parse().map_err(|_| bad())?,
            alpha: DEFAULT_ALPHA,
            minimum_candidates: DEFAULT_MINIMUM_CANDIDATES,
        };
        for p in parts {
            match p.trim().split_once('=') {
                Some(("alpha", v)) => c.alpha = v.trim().parse().map_err(|_| bad())?,
                Some(("minimum_candidates", v)) => {
                    c.minimum_candidates = v.trim().parse().map_err(|_| bad())?
                }
                _ => return Err(bad()),
            }
        }
        Ok(Mode::Contrast(c))
    }
}

fn parse_upper(s: &str) -> Option<Upper> {
    match s {
        "original" => Some(Upper::Original),
        _ => s.parse().ok().map(Upper::Exit),
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
            Mode::Contrast(c) if c.has_default_params() => {
                Some(format!("contrast-{}-{}", c.upper, c.lower))
            }
            Mode::Contrast(_) => None,
            Mode::Dola(d) => dola::id_suffix(d),
        }
    }

    /// The mode a model-id suffix names, in its canonical spelling only (`exit-6`, never
    /// `exit-06` or `exit-+6`: an id names one mode and a mode has one id).
    pub fn from_id_suffix(suffix: &str) -> Option<Mode> {
        let mode = if suffix == "original" {
            Mode::Original
        } else if let Some(l) = suffix.strip_prefix("exit-") {
            Mode::Exit(l.parse().ok()?)
        } else if suffix.starts_with("dola-") {
            Mode::Dola(dola::from_id_suffix(suffix)?)
        } else {
            let (u, l) = suffix.strip_prefix("contrast-")?.split_once('-')?;
            Mode::Contrast(ContrastParams {
                upper: parse_upper(u)?,
                lower: l.parse().ok()?,
                alpha: DEFAULT_ALPHA,
                minimum_candidates: DEFAULT_MINIMUM_CANDIDATES,
            })
        };
        (mode.id_suffix().as_deref() == Some(suffix)).then_some(mode)
    }

    /// Whether `name` reads as a built-in model-id suffix, valid or not (`exit-99`,
    /// `contrast-x`): such names cannot be presets.
    pub fn is_reserved_id_suffix(name: &str) -> bool {
        name == "original"
            || ["exit-", "contrast-", "dola-"]
                .iter()
                .any(|p| name.starts_with(p))
    }
}

/// (max, log Σ e^x) of `xs`: the shift and the normaliser of a log-softmax.
fn log_sum_exp(xs: &[f32]) -> (f32, f32) {
    let max = fastmath::max(xs);
    (max, max + fastmath::sum_exp(xs, max).ln())
}

pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    fastmath::sub(logits, log_sum_exp(logits).1)
}

/// Autocontrastive log q (REFERENCE.md): the plausible set H keeps the tokens with
/// p_u >= min(alpha * max p_u, k-th largest p_u); inside H, q is the softmax of
/// log p_u - log p_l rescaled to H's upper mass; outside H, q = p_u. Log-probs come from
/// log-softmax, so q stays finite where the reference's log(softmax) gives NaN.
pub fn contrast_log_q(upper: &[f32], lower: &[f32], c: &ContrastParams) -> Vec<f32> {
    let (max_u, lse_u) = log_sum_exp(upper);
    let mut q = fastmath::sub(upper, lse_u);
    let (_, lse_l) = log_sum_exp(lower);
    // Compared in log space: p_u >= t  <=>  log p_u >= log t (exp is monotonic). Rounding
    // keeps the order of x - lse, so the largest log p_u is max_u - lse_u, to the bit.
    let max_lp = max_u - lse_u;
    let k = c.minimum_candidates.clamp(1, q.len());
    let kth_lp = if k == 1 {
        max_lp
    } else {
        let mut sorted = q.clone();
        let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        *kth
    };
    let set = fastmath::PlausibleSet {
        threshold: (c.alpha.ln() + max_lp).min(kth_lp),
        lse_lower: lse_l,
    };
    // Three vectorised passes over the vocabulary, the set as a mask: the largest
    // log p_u - log p_l in the set, then both normalisers, then q in place.
    let diff_max = set.max_diff(&q, lower);
    let (diff_sum, mass_sum) = set.sums(&q, lower, diff_max, max_lp);
    let offset = diff_max + diff_sum.ln();
    let log_mass = max_lp + mass_sum.ln();
    set.write_q(&mut q, lower, offset, log_mass);
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contrast_is_a_normalised_distribution_and_finite() {
        // lower head gives token 2 probability ~0: the reference would produce NaN there.
        let upper = vec![2.0, 1.5, 1.9, -3.0];
        let lower = vec![1.0, 0.0, -200.0, 0.0];
        let c = ContrastParams {
            upper: Upper::Original,
            lower: 1,
            alpha: 0.1,
            minimum_candidates: 1,
        };
        let q = contrast_log_q(&upper, &lower, &c);
        assert!(q.iter().all(|x| x.is_finite()));
        let total: f32 = q.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        // token 3 is below alpha * max p_u: it keeps the upper probability.
        let lp_u = log_softmax(&upper);
        assert!((q[3] - lp_u[3]).abs() < 1e-6);
        // token 2 wins: the lower head finds it implausible.
        let best = (0..4).max_by(|&a, &b| q[a].total_cmp(&q[b])).unwrap();
        assert_eq!(best, 2);
    }

    /// The contrast as REFERENCE.md states it, step by step (what `contrast_log_q` fuses).
    fn contrast_plain(upper: &[f32], lower: &[f32], c: &ContrastParams) -> Vec<f64> {
        let lsm = |x: &[f32]| {
            let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            x.iter().map(|&v| v as f64 - lse).collect::<Vec<f64>>()
        };
        let (lp_u, lp_l) = (lsm(upper), lsm(lower));
        let mut sorted = lp_u.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let k = c.minimum_candidates.clamp(1, lp_u.len());
        let t = ((c.alpha as f64).ln() + sorted[0]).min(sorted[k - 1]);
        let set: Vec<usize> = (0..lp_u.len()).filter(|&i| lp_u[i] >= t).collect();
        let lse = |v: Vec<f64>| {
            let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
        };
        let offset = lse(set.iter().map(|&i| lp_u[i] - lp_l[i]).collect());
        let log_mass = lse(set.iter().map(|&i| lp_u[i]).collect());
        let mut q = lp_u.clone();
        for &i in &set {
            q[i] = lp_u[i] - lp_l[i] - offset + log_mass;
        }
        q
    }

    #[test]
    fn fused_contrast_matches_the_stepwise_formula() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32
        };
        for (n, spread, alpha, k) in [
            (1000, 8.0, 0.1, 1),
            (50257, 1.0, 0.1, 1), // flat: half the vocabulary plausible
            (777, 30.0, 0.5, 5),  // peaked, a wider candidate floor
            (64, 4.0, 0.0, 1),    // alpha 0: every token plausible
        ] {
            let upper: Vec<f32> = (0..n).map(|_| rand() * spread).collect();
            let lower: Vec<f32> = (0..n).map(|_| rand() * spread).collect();
            let c = ContrastParams {
                upper: Upper::Original,
                lower: 1,
                alpha,
                minimum_candidates: k,
            };
            let got = contrast_log_q(&upper, &lower, &c);
            let want = contrast_plain(&upper, &lower, &c);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((*g as f64 - w).abs() < 1e-4, "n {n} token {i}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn minimum_candidates_widens_the_set() {
        let upper = vec![10.0, 0.0, -1.0];
        let lower = vec![10.0, -5.0, 0.0];
        let narrow = ContrastParams {
            upper: Upper::Exit(2),
            lower: 1,
            alpha: 0.1,
            minimum_candidates: 1,
        };
        // with one candidate only token 0 is plausible and keeps its own probability.
        let q = contrast_log_q(&upper, &lower, &narrow);
        assert!((q[0] - log_softmax(&upper)[0]).abs() < 1e-6);
        let wide = ContrastParams {
            minimum_candidates: 2,
            ..narrow
        };
        let q = contrast_log_q(&upper, &lower, &wide);
        assert!(q[1] > q[0]);
    }

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
        ] {
            assert_eq!(Mode::from_id_suffix(bad), None, "{bad}");
        }
    }
}
