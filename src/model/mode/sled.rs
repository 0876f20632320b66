//! SLED, self logits evolution decoding (Zhang et al., NeurIPS 2024), as the authors' published
//! `_sled_select_contrast` computes it (their `custom_generate` release for transformers): one
//! evolution step (`op_T = 1`) plus that release's entropy term `alpha`.
//!
//! Per token: the top `evolution_scale` tokens of the mature (original) head are the
//! candidates. For each premature layer, the cosine between the divergence of its logits from
//! the mature ones and each candidate's "gradient" (its softmax minus the candidate's one-hot)
//! says how strongly that layer points at the candidate; the squared positive cosines,
//! normalised per layer and weighted by each layer's share, make a latent distribution `δ`.
//! The final logits move one step against the gradient of the KL toward it:
//! `f - evolution_rate · (softmax(f) - δ)`, then each candidate loses `alpha` times the entropy
//! of its logits across the premature layers. Tokens outside the candidates get
//! `evolution_lower_bound`. With `alpha` = 0 this is the paper's single-step algorithm.
//!
//! The premature layers are every exit below the top (`premature: exits`, the default: what a
//! multi-exit model trained its exits for) or every block from `start` to N-1 read by the
//! original head without the final norm (`premature: lm_head`, as the authors' code reads a
//! plain checkpoint; `start` as DoLa's rule: 2 when the head is tied and N > 2).

use std::fmt;

use serde_json::{Map, Value};

use super::dola::{Layers, Premature};
use super::params::{self, Fields, Form, FormField, ModelShape, ParamError};
use super::{Head, Strategy};
use crate::kernels::sled::{self, SledRule};

pub const DEFAULT_EVOLUTION_RATE: f32 = 0.3;
pub const DEFAULT_EVOLUTION_SCALE: usize = 5;
pub const DEFAULT_EVOLUTION_LOWER_BOUND: f32 = -10.0;
pub const DEFAULT_ENTROPY_ALPHA: f32 = 0.5;

/// The defaults are those of the authors' `_sled_select_contrast`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SledParams {
    pub premature: Premature,
    /// The step size toward the latent distribution.
    pub evolution_rate: f32,
    /// How many of the mature head's top tokens are candidates (top-k).
    pub evolution_scale: usize,
    /// The logit every other token gets.
    pub evolution_lower_bound: f32,
    /// The weight of the entropy of a candidate's logits across the premature layers.
    pub alpha: f32,
    /// The premature layers, resolved against the model (`SledParams::resolve`); empty until.
    pub candidates: Layers,
}

impl Default for SledParams {
    fn default() -> Self {
        Self {
            premature: Premature::Exits,
            evolution_rate: DEFAULT_EVOLUTION_RATE,
            evolution_scale: DEFAULT_EVOLUTION_SCALE,
            evolution_lower_bound: DEFAULT_EVOLUTION_LOWER_BOUND,
            alpha: DEFAULT_ENTROPY_ALPHA,
            candidates: Layers::default(),
        }
    }
}

impl SledParams {
    /// The premature layers of a model of `num_layers` blocks with exits `exits`, `tied` when
    /// its original head is the token embedding.
    pub fn with_candidates(mut self, num_layers: usize, exits: &[usize], tied: bool) -> Self {
        let n = num_layers;
        self.candidates = match self.premature {
            Premature::Exits => Layers::from_list(exits.iter().copied().filter(|&e| e < n)),
            Premature::LmHead => Layers::from_list(super::dola::first_premature_layer(n, tied)..n),
        }
        .unwrap_or_default();
        self
    }

    /// What its scores read of it (`kernels::sled`).
    pub fn rule(&self) -> SledRule {
        SledRule {
            evolution_scale: self.evolution_scale,
            evolution_rate: self.evolution_rate,
            lower_bound: self.evolution_lower_bound,
            alpha: self.alpha,
        }
    }

    fn has_default_params(&self) -> bool {
        let d = Self::default();
        (
            self.premature,
            self.evolution_rate,
            self.evolution_scale,
            self.evolution_lower_bound,
            self.alpha,
        ) == (
            d.premature,
            d.evolution_rate,
            d.evolution_scale,
            d.evolution_lower_bound,
            d.alpha,
        )
    }
}

impl fmt::Display for SledParams {
    /// The flag form: `sled`, plus `:key=value,...` for the parameters that are not defaults.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = Self::default();
        let mut parts = Vec::new();
        if self.premature != d.premature {
            parts.push(format!("premature={}", self.premature.name()));
        }
        if self.evolution_rate != d.evolution_rate {
            parts.push(format!("evolution_rate={}", self.evolution_rate));
        }
        if self.evolution_scale != d.evolution_scale {
            parts.push(format!("evolution_scale={}", self.evolution_scale));
        }
        if self.evolution_lower_bound != d.evolution_lower_bound {
            parts.push(format!(
                "evolution_lower_bound={}",
                self.evolution_lower_bound
            ));
        }
        if self.alpha != d.alpha {
            parts.push(format!("alpha={}", self.alpha));
        }
        f.write_str("sled")?;
        if !parts.is_empty() {
            write!(f, ":{}", parts.join(","))?;
        }
        Ok(())
    }
}

impl Strategy for SledParams {
    const NAME: &'static str = "sled";
    const TITLE: &'static str = "SLED";
    const FIELDS: &'static [&'static str] = &[
        "premature",
        "evolution_rate",
        "evolution_scale",
        "evolution_lower_bound",
        "alpha",
    ];
    const ID_WORD: &'static str = "sled";
    const ID_FORMS: &'static str = "`{b}:sled` (SLED over the exits below the top)";
    const FLAG_FORMS: &'static str = "sled[:premature=exits|lm_head,evolution_rate=R,evolution_scale=K,evolution_lower_bound=B,alpha=A]";

    /// The mature head, then each premature layer's.
    fn heads(&self) -> Vec<Head> {
        std::iter::once(Head::Original)
            .chain(self.candidates.iter().map(|l| self.premature.head(l)))
            .collect()
    }

    /// Unnormalised: transformers' repetition penalty edits SLED's logits.
    fn scores(&self, logits: &[&[f32]]) -> Vec<f32> {
        sled::sled_scores(logits[0], &logits[1..], &self.rule())
    }

    fn scores_are_logprobs(&self) -> bool {
        false
    }

    /// The candidates and their logits, where the logits are.
    fn device_scores(&self) -> Option<SledRule> {
        Some(self.rule())
    }

    fn write_flag(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }

    /// `key=value` pairs, any order; `sled` alone has no colon.
    fn parse_flag(rest: Option<&str>) -> Option<Self> {
        let mut p = SledParams::default();
        let Some(rest) = rest else {
            return Some(p);
        };
        for part in rest.split(',') {
            let (key, v) = part.trim().split_once('=')?;
            let v = v.trim();
            match key.trim() {
                "premature" => p.premature = Premature::named(v)?,
                "evolution_rate" => p.evolution_rate = v.parse().ok()?,
                "evolution_scale" => p.evolution_scale = v.parse().ok()?,
                "evolution_lower_bound" => p.evolution_lower_bound = v.parse().ok()?,
                "alpha" => p.alpha = v.parse().ok()?,
                _ => return None,
            }
        }
        Some(p)
    }

    /// `sled`, for default parameters only.
    fn id_suffix(&self) -> Option<String> {
        self.has_default_params().then(|| "sled".to_string())
    }

    fn from_id_suffix(suffix: &str) -> Option<Self> {
        (suffix == "sled").then(SledParams::default)
    }

    fn to_request(&self) -> Map<String, Value> {
        Map::from_iter([
            ("premature".into(), self.premature.name().into()),
            ("evolution_rate".into(), params::number(self.evolution_rate)),
            ("evolution_scale".into(), self.evolution_scale.into()),
            (
                "evolution_lower_bound".into(),
                params::number(self.evolution_lower_bound),
            ),
            ("alpha".into(), params::number(self.alpha)),
        ])
    }

    /// The premature layers (SLED's `layers` is never sent).
    fn resolved(&self) -> Map<String, Value> {
        Map::from_iter([("layers".into(), self.candidates.into())])
    }

    fn from_request(f: &mut Fields, shape: &ModelShape) -> Result<Self, ParamError> {
        Ok(SledParams {
            premature: f.choice("premature", &Premature::NAMES, Premature::Exits)?,
            evolution_rate: f.number_in(
                "evolution_rate",
                DEFAULT_EVOLUTION_RATE as f64,
                RATE_RANGE,
                false,
            )?,
            evolution_scale: f.count_in(
                "evolution_scale",
                DEFAULT_EVOLUTION_SCALE as i64,
                (1, shape.vocab_size as i64),
            )?,
            evolution_lower_bound: f.number_in(
                "evolution_lower_bound",
                DEFAULT_EVOLUTION_LOWER_BOUND as f64,
                LOWER_BOUND_RANGE,
                false,
            )?,
            alpha: f.number_in("alpha", DEFAULT_ENTROPY_ALPHA as f64, ALPHA_RANGE, false)?,
            candidates: Layers::default(),
        })
    }

    /// The parameters in range, and at least one premature layer.
    fn resolve(self, object: &str, shape: &ModelShape) -> Result<Self, ParamError> {
        let param = |name: &str| format!("{object}.{name}");
        params::in_range(
            &param("evolution_rate"),
            self.evolution_rate as f64,
            RATE_RANGE,
            false,
        )?;
        params::count_in(
            &param("evolution_scale"),
            self.evolution_scale as i64,
            (1, shape.vocab_size as i64),
        )?;
        params::in_range(
            &param("evolution_lower_bound"),
            self.evolution_lower_bound as f64,
            LOWER_BOUND_RANGE,
            false,
        )?;
        params::in_range(&param("alpha"), self.alpha as f64, ALPHA_RANGE, false)?;
        let p = self.with_candidates(shape.num_layers, shape.exits, shape.tied_head);
        if p.candidates.is_empty() {
            let param = param("premature");
            return Err(ParamError::new(
                param.clone(),
                format!(
                    "`{param}` = \"{}\" leaves SLED no premature layer below the top (exits: {:?}); \"lm_head\" reads every block's output",
                    p.premature.name(),
                    shape.exits
                ),
            ));
        }
        Ok(p)
    }

    /// Over the exits below the top, with the authors' parameters.
    fn listed(_shape: &ModelShape) -> Vec<Self> {
        vec![SledParams::default()]
    }

    fn form(shape: &ModelShape) -> Option<Form> {
        let mut heads: Vec<(Value, String)> = vec![];
        if shape.exits_below_top().next().is_some() {
            heads.push(("exits".into(), "trained exits".into()));
        }
        heads.push(("lm_head".into(), "top head on every block".into()));
        let default = heads[0].0.clone();
        Some(Form {
            mode: Self::NAME,
            title: Self::TITLE,
            single_head: false,
            parameters: vec![FormField::choice("premature", "premature", heads, default)],
        })
    }
}

const RATE_RANGE: (f64, f64) = (0.0, 100.0);
const LOWER_BOUND_RANGE: (f64, f64) = (-1e6, 0.0);
const ALPHA_RANGE: (f64, f64) = (0.0, 100.0);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn premature_layers_by_model() {
        let layers = |premature, n, exits: &[usize], tied| {
            SledParams {
                premature,
                ..SledParams::default()
            }
            .with_candidates(n, exits, tied)
            .candidates
            .iter()
            .collect::<Vec<_>>()
        };
        assert_eq!(
            layers(Premature::Exits, 12, &[2, 4, 6, 8, 10, 12], true),
            [2, 4, 6, 8, 10]
        );
        assert_eq!(layers(Premature::Exits, 4, &[1, 2, 4], true), [1, 2]);
        assert_eq!(layers(Premature::LmHead, 6, &[2, 4, 6], true), [2, 3, 4, 5]);
        assert_eq!(layers(Premature::LmHead, 3, &[], false), [0, 1, 2]);
        assert_eq!(layers(Premature::Exits, 4, &[4], true), Vec::<usize>::new());
    }

    #[test]
    fn text_forms_round_trip() {
        for (flag, suffix) in [
            ("sled", Some("sled")),
            ("sled:premature=lm_head", None),
            (
                "sled:evolution_rate=2,evolution_scale=10,evolution_lower_bound=-100,alpha=0",
                None,
            ),
        ] {
            let Ok(super::super::Mode::Sled(p)) = flag.parse() else {
                panic!("{flag}")
            };
            assert_eq!(p.to_string(), flag);
            assert_eq!(p.id_suffix().as_deref(), suffix);
        }
        assert_eq!(SledParams::parse_flag(Some("beta=1")), None);
        assert_eq!(SledParams::parse_flag(Some("evolution_scale=x")), None);
        assert_eq!(SledParams::parse_flag(Some("alpha")), None);
    }

    #[test]
    fn follows_the_trend_from_the_premature_layers_to_the_mature_one() {
        let mature = [3.0f32, 2.9, 0.0, -1.0];
        // an early layer believed in token 1; the top layer moved toward token 0: the latent
        // distribution extrapolates that move, so token 0 gains on token 1
        let early = [0.0f32, 3.0, 0.0, 0.0];
        let p = SledParams {
            evolution_scale: 2,
            alpha: 0.0,
            evolution_rate: 1.0,
            ..SledParams::default()
        };
        let out = sled::sled_scores(&mature, &[&early], &p.rule());
        assert_eq!(out[2], p.evolution_lower_bound);
        assert_eq!(out[3], p.evolution_lower_bound);
        assert!(out[0] - out[1] > mature[0] - mature[1], "{out:?}");
        // no evolution: the mature logits on the candidates, less the entropy term
        let still = SledParams {
            evolution_rate: 0.0,
            ..p
        };
        let out = sled::sled_scores(&mature, &[&early, &early], &still.rule());
        assert_eq!(&out[..2], &mature[..2]);
        // two identical layers: each candidate's entropy across them is ln 2
        let entropic = SledParams {
            alpha: 1.0,
            ..still
        };
        let out = sled::sled_scores(&mature, &[&early, &early], &entropic.rule());
        assert!((out[0] - (3.0 - 2f32.ln())).abs() < 1e-6, "{out:?}");
    }
}
