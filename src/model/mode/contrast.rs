//! Autocontrastive decoding (Gera et al., ACL 2023): an upper head (an exit or the original)
//! contrasted with a lower exit inside the upper head's plausible set. Its parameters, text
//! forms and arithmetic.

use std::fmt;

use serde_json::{Map, Value};

use super::params::{self, Fields, Form, FormField, ModelShape, ParamError};
use super::{DeviceChoice, Head, Strategy};
use crate::kernels::greedy;

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

impl fmt::Display for Upper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Upper::Original => f.write_str("original"),
            Upper::Exit(l) => write!(f, "{l}"),
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

    /// `upper` over `lower` with the default alpha and candidate floor.
    pub fn new(upper: Upper, lower: usize) -> Self {
        Self {
            upper,
            lower,
            alpha: DEFAULT_ALPHA,
            minimum_candidates: DEFAULT_MINIMUM_CANDIDATES,
        }
    }
}

fn parse_upper(s: &str) -> Option<Upper> {
    match s {
        "original" => Some(Upper::Original),
        _ => s.parse().ok().map(Upper::Exit),
    }
}

impl Strategy for ContrastParams {
    const NAME: &'static str = "contrast";
    const TITLE: &'static str = "contrast";
    const FIELDS: &'static [&'static str] = &["upper", "lower", "alpha", "minimum_candidates"];
    const ID_WORD: &'static str = "contrast";
    const ID_FORMS: &'static str =
        "`{b}:contrast-U-L` (U a higher exit or `original`, L a lower exit)";
    const FLAG_FORMS: &'static str = "contrast:U,L[,alpha=A][,minimum_candidates=K]";

    fn heads(&self) -> Vec<Head> {
        vec![self.upper.into(), Head::Exit(self.lower)]
    }

    fn scores(&self, logits: &[&[f32]]) -> Vec<f32> {
        contrast_log_q(logits[0], logits[1], self)
    }

    /// The best difference inside the plausible set (greedy), or the draw from these scores.
    fn device_choice(&self) -> Option<DeviceChoice> {
        Some(DeviceChoice::Contrast {
            alpha: self.alpha,
            minimum_candidates: self.minimum_candidates,
            draw: None,
        })
    }

    /// `contrast:U,L` plus the parameters that are not the defaults.
    fn write_flag(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")?;
        if self.alpha != DEFAULT_ALPHA {
            write!(f, ",alpha={}", self.alpha)?;
        }
        if self.minimum_candidates != DEFAULT_MINIMUM_CANDIDATES {
            write!(f, ",minimum_candidates={}", self.minimum_candidates)?;
        }
        Ok(())
    }

    /// `U,L[,alpha=A][,minimum_candidates=K]`, parameters in any order.
    fn parse_flag(rest: Option<&str>) -> Option<Self> {
        let mut parts = rest?.split(',');
        let (u, l) = (parts.next()?, parts.next()?);
        let mut c = Self::new(parse_upper(u.trim())?, l.trim().parse().ok()?);
        for p in parts {
            match p.trim().split_once('=') {
                Some(("alpha", v)) => c.alpha = v.trim().parse().ok()?,
                Some(("minimum_candidates", v)) => c.minimum_candidates = v.trim().parse().ok()?,
                _ => return None,
            }
        }
        Some(c)
    }

    /// `contrast-U-L`, for default parameters only.
    fn id_suffix(&self) -> Option<String> {
        self.has_default_params()
            .then(|| format!("contrast-{}-{}", self.upper, self.lower))
    }

    fn from_id_suffix(suffix: &str) -> Option<Self> {
        let (u, l) = suffix.strip_prefix("contrast-")?.split_once('-')?;
        Some(Self::new(parse_upper(u)?, l.parse().ok()?))
    }

    fn to_request(&self) -> Map<String, Value> {
        Map::from_iter([
            (
                "upper".into(),
                match self.upper {
                    Upper::Original => "original".into(),
                    Upper::Exit(l) => l.into(),
                },
            ),
            ("lower".into(), self.lower.into()),
            ("alpha".into(), params::number(self.alpha)),
            ("minimum_candidates".into(), self.minimum_candidates.into()),
        ])
    }

    fn from_request(f: &mut Fields, shape: &ModelShape) -> Result<Self, ParamError> {
        let lower = f.exit_layer("lower", shape)?;
        let param = f.param("upper");
        let upper = match f.value("upper") {
            None => {
                return Err(ParamError::new(
                    param.clone(),
                    format!(
                        "`{param}` is required: an exit layer {:?} or \"original\"",
                        shape.exits
                    ),
                ))
            }
            Some(Value::String(s)) if s == "original" => Upper::Original,
            Some(v) => match v.as_i64() {
                Some(u) => Upper::Exit(params::exit_layer(&param, u, shape)?),
                None => {
                    return Err(ParamError::new(
                        param.clone(),
                        format!("`{param}` must be an exit layer or \"original\", got {v}"),
                    ))
                }
            },
        };
        Ok(Self {
            upper,
            lower,
            alpha: f.number_in("alpha", DEFAULT_ALPHA as f64, (0.0, 1.0), true)?,
            minimum_candidates: f.count_in(
                "minimum_candidates",
                DEFAULT_MINIMUM_CANDIDATES as i64,
                (1, shape.vocab_size as i64),
            )?,
        })
    }

    /// Both heads exits (the upper above the lower), the parameters in range.
    fn resolve(self, object: &str, shape: &ModelShape) -> Result<Self, ParamError> {
        let param = |name: &str| format!("{object}.{name}");
        params::exit_layer(&param("lower"), self.lower as i64, shape)?;
        if let Upper::Exit(u) = self.upper {
            params::exit_layer(&param("upper"), u as i64, shape)?;
            if u <= self.lower {
                return Err(ParamError::new(
                    param("upper"),
                    format!(
                        "`{}` ({u}) must be above `{}` ({})",
                        param("upper"),
                        param("lower"),
                        self.lower
                    ),
                ));
            }
        }
        params::in_range(&param("alpha"), self.alpha as f64, (0.0, 1.0), true)?;
        params::count_in(
            &param("minimum_candidates"),
            self.minimum_candidates as i64,
            (1, shape.vocab_size as i64),
        )?;
        Ok(self)
    }

    /// The top exit over each exit below it, and the original head over each exit below the
    /// top block.
    fn listed(shape: &ModelShape) -> Vec<Self> {
        let mut out = Vec::new();
        if let Some(top) = shape.exits.iter().copied().max() {
            out.extend(
                shape
                    .exits
                    .iter()
                    .filter(|&&l| l < top)
                    .map(|&l| Self::new(Upper::Exit(top), l)),
            );
        }
        out.extend(
            shape
                .exits_below_top()
                .map(|l| Self::new(Upper::Original, l)),
        );
        out
    }

    /// The top exit (or the original head) over an exit at about half the depth.
    fn form(shape: &ModelShape) -> Option<Form> {
        let half = super::exit::half_exit(shape)?;
        let top = *shape.exits.last()?;
        let upper: Value = if top == shape.num_layers && top > half {
            top.into()
        } else {
            "original".into()
        };
        let exits = shape.exits.iter().copied();
        Some(Form {
            mode: Self::NAME,
            title: Self::TITLE,
            single_head: false,
            parameters: vec![
                FormField::layers(
                    "upper",
                    "upper",
                    &[("original".into(), "original".into())],
                    exits.clone(),
                    upper,
                ),
                FormField::layers("lower", "lower", &[], exits, half.into()),
                FormField::number("alpha", "alpha", (0.0, 1.0, 0.05), DEFAULT_ALPHA),
            ],
        })
    }
}

/// Autocontrastive log q (REFERENCE.md): the plausible set H keeps the tokens with
/// p_u >= min(alpha * max p_u, k-th largest p_u); inside H, q is the softmax of
/// log p_u - log p_l rescaled to H's upper mass; outside H, q = p_u. Log-probs come from
/// log-softmax, so q stays finite where the reference's log(softmax) gives NaN.
pub fn contrast_log_q(upper: &[f32], lower: &[f32], c: &ContrastParams) -> Vec<f32> {
    greedy::contrast_log_q(upper, lower, c.alpha.ln(), c.minimum_candidates)
}

#[cfg(test)]
mod tests {
    use super::super::log_softmax;
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

    /// Two rows of `n` made-up logits in [0, spread), and the contrast of the original head
    /// over exit 1 with `alpha` and candidate floor `k`.
    fn made_up(
        rand: &mut impl FnMut() -> f32,
        n: usize,
        spread: f32,
        alpha: f32,
        k: usize,
    ) -> (Vec<f32>, Vec<f32>, ContrastParams) {
        let upper = (0..n).map(|_| rand() * spread).collect();
        let lower = (0..n).map(|_| rand() * spread).collect();
        let c = ContrastParams {
            upper: Upper::Original,
            lower: 1,
            alpha,
            minimum_candidates: k,
        };
        (upper, lower, c)
    }

    #[test]
    fn fused_contrast_matches_the_stepwise_formula() {
        let mut rand = crate::kernels::uniform(0x2545_F491_4F6C_DD1Du64);
        for (n, spread, alpha, k) in [
            (1000, 8.0, 0.1, 1),
            (50257, 1.0, 0.1, 1), // flat: half the vocabulary plausible
            (777, 30.0, 0.5, 5),  // peaked, a wider candidate floor
            (64, 4.0, 0.0, 1),    // alpha 0: every token plausible
        ] {
            let (upper, lower, c) = made_up(&mut rand, n, spread, alpha, k);
            let got = contrast_log_q(&upper, &lower, &c);
            let want = contrast_plain(&upper, &lower, &c);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((*g as f64 - w).abs() < 1e-4, "n {n} token {i}: {g} vs {w}");
            }
        }
    }

    /// What a step computes on the device for a greedy contrast (`kernels::greedy`) is the
    /// first argmax of these scores.
    #[test]
    fn the_device_choice_is_the_argmax_of_the_scores() {
        let mut rand = crate::kernels::uniform(0x9E37_79B9_7F4A_7C15u64);
        for (n, spread, alpha, k) in [
            (50257, 12.0, 0.1, 1),
            (1000, 2.0, 0.1, 1),
            (777, 30.0, 0.5, 5),
            (64, 4.0, 0.0, 1),
            (333, 6.0, 1.0, 1),
            (333, 6.0, 1.0, 20),
        ] {
            for _ in 0..4 {
                let (upper, lower, c) = made_up(&mut rand, n, spread, alpha, k);
                assert_eq!(
                    c.device_choice(),
                    Some(DeviceChoice::Contrast {
                        alpha,
                        minimum_candidates: k,
                        draw: None
                    })
                );
                let scores = contrast_log_q(&upper, &lower, &c);
                assert_eq!(
                    crate::kernels::greedy::argmax(&scores),
                    crate::kernels::greedy::contrast_choice(&upper, &lower, alpha.ln(), k),
                    "n {n} alpha {alpha} floor {k}"
                );
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
}
