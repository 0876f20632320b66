//! The decoding mode (`multi_exit`, or the one a model id names) and self-speculative
//! decoding (`speculative`), against the model's exits and depth.

use super::sampling::in_range;
use super::{count_in, ValidationError, Validator};
use crate::engine::request::{
    DolaLayersSpec, ModeSpec, SpeculativeRequest, SpeculativeSpec, UpperSpec,
};
use crate::engine::speculative::MAX_DRAFT_TOKENS;
use crate::model::mode::dola::DEFAULT_RELATIVE_TOP;
use crate::model::mode::early_exit::EarlyExitParams;
use crate::model::mode::sled::{
    SledParams, DEFAULT_ENTROPY_ALPHA, DEFAULT_EVOLUTION_LOWER_BOUND, DEFAULT_EVOLUTION_RATE,
    DEFAULT_EVOLUTION_SCALE,
};
use crate::model::mode::{
    DolaLayers, DolaParams, Layers, Premature, DEFAULT_ALPHA, DEFAULT_MINIMUM_CANDIDATES,
};
use crate::model::{ContrastParams, Mode, Upper};

impl Validator {
    /// The mode a request decodes with: its `multi_exit`, the one its model id names (the
    /// two must agree when both are given), else the server's default.
    pub(super) fn request_mode(
        &self,
        spec: Option<&ModeSpec>,
        named: Option<Mode>,
    ) -> Result<Mode, ValidationError> {
        Ok(match (spec, named) {
            (None, None) => self.limits.default_mode,
            (Some(spec), None) => self.mode(spec)?,
            (None, Some(named)) => named,
            (Some(spec), Some(named)) => {
                if self.mode(spec)? != named {
                    return Err(ValidationError::ModeConflict);
                }
                named
            }
        })
    }

    /// Resolves a `multi_exit` object against the model's exits.
    pub fn mode(&self, spec: &ModeSpec) -> Result<Mode, ValidationError> {
        self.mode_in("multi_exit", spec)
    }

    /// Resolves a mode object sent as the field `object` (`multi_exit`, or an inspection's
    /// `contrast`), whose name its errors carry.
    pub(super) fn mode_in(
        &self,
        object: &'static str,
        spec: &ModeSpec,
    ) -> Result<Mode, ValidationError> {
        let exits = &self.limits.exit_layers;
        let layer = |field: &'static str, v: Option<i64>| -> Result<usize, ValidationError> {
            let v = v.ok_or_else(|| ValidationError::LayerRequired {
                object,
                field,
                exits: exits.clone(),
            })?;
            usize::try_from(v)
                .ok()
                .filter(|l| exits.contains(l))
                .ok_or_else(|| ValidationError::NotAnExit {
                    object,
                    field,
                    got: v,
                    exits: exits.clone(),
                })
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
                    None => {
                        return Err(ValidationError::UpperRequired {
                            object,
                            exits: exits.clone(),
                        })
                    }
                    Some(UpperSpec::Original) => Upper::Original,
                    Some(UpperSpec::Layer(u)) => {
                        let upper = layer("upper", Some(*u))?;
                        if upper <= lower {
                            return Err(ValidationError::UpperNotAbove {
                                object,
                                upper,
                                lower,
                            });
                        }
                        Upper::Exit(upper)
                    }
                };
                let alpha = in_range(
                    &format!("{object}.alpha"),
                    *alpha,
                    DEFAULT_ALPHA as f64,
                    (0.0, 1.0),
                    true,
                )?;
                let k = count_in(
                    &format!("{object}.minimum_candidates"),
                    minimum_candidates.unwrap_or(DEFAULT_MINIMUM_CANDIDATES as i64),
                    1,
                    self.limits.vocab_size as i64,
                )?;
                Mode::Contrast(ContrastParams {
                    upper,
                    lower,
                    alpha,
                    minimum_candidates: k as usize,
                })
            }
            ModeSpec::Dola {
                layers,
                premature,
                relative_top,
            } => Mode::Dola(self.dola(object, layers.as_ref(), premature, *relative_top)?),
            ModeSpec::Sled {
                premature,
                evolution_rate,
                evolution_scale,
                evolution_lower_bound,
                alpha,
            } => {
                let l = &*self.limits;
                let field = |name: &str| format!("{object}.{name}");
                let p = SledParams {
                    premature: premature_in(object, premature)?,
                    evolution_rate: in_range(
                        &field("evolution_rate"),
                        *evolution_rate,
                        DEFAULT_EVOLUTION_RATE as f64,
                        (0.0, 100.0),
                        false,
                    )?,
                    evolution_scale: count_in(
                        &field("evolution_scale"),
                        evolution_scale.unwrap_or(DEFAULT_EVOLUTION_SCALE as i64),
                        1,
                        l.vocab_size as i64,
                    )? as usize,
                    evolution_lower_bound: in_range(
                        &field("evolution_lower_bound"),
                        *evolution_lower_bound,
                        DEFAULT_EVOLUTION_LOWER_BOUND as f64,
                        (-1e6, 0.0),
                        false,
                    )?,
                    alpha: in_range(
                        &field("alpha"),
                        *alpha,
                        DEFAULT_ENTROPY_ALPHA as f64,
                        (0.0, 100.0),
                        false,
                    )?,
                    candidates: Default::default(),
                }
                .resolve(l.num_layers, &l.exit_layers, l.tied_head);
                if p.candidates.is_empty() {
                    return Err(ValidationError::SledNoCandidates {
                        object,
                        premature: p.premature.name(),
                        exits: l.exit_layers.clone(),
                    });
                }
                Mode::Sled(p)
            }
            ModeSpec::EarlyExit {
                threshold,
                measure,
                decay,
            } => {
                let l = &*self.limits;
                let threshold = threshold.ok_or(ValidationError::ThresholdRequired { object })?;
                let threshold = in_range(
                    &format!("{object}.threshold"),
                    Some(threshold),
                    0.0,
                    (0.0, 1.0),
                    false,
                )?;
                if let Some(m) = measure.as_deref().filter(|&m| m != "softmax_margin") {
                    return Err(ValidationError::Measure {
                        object,
                        got: m.into(),
                    });
                }
                let decay = decay
                    .map(|d| {
                        in_range(
                            &format!("{object}.decay"),
                            Some(d),
                            0.0,
                            (0.0, 100.0),
                            false,
                        )
                    })
                    .transpose()?;
                let p = EarlyExitParams {
                    decay,
                    ..EarlyExitParams::new(threshold)
                }
                .resolve(l.num_layers, &l.exit_layers);
                if p.exits.is_empty() {
                    return Err(ValidationError::NoExitBelowTop {
                        object,
                        exits: l.exit_layers.clone(),
                    });
                }
                Mode::EarlyExit(p)
            }
        })
    }

    /// DoLa's parameters, its candidates resolved against the model ("high" when `layers` is
    /// left out).
    fn dola(
        &self,
        object: &'static str,
        layers: Option<&DolaLayersSpec>,
        premature: &Option<String>,
        relative_top: Option<f64>,
    ) -> Result<DolaParams, ValidationError> {
        let l = &*self.limits;
        let bad_layers = |got: String| ValidationError::DolaLayers { object, got };
        let layers = match layers {
            None => DolaLayers::High,
            Some(DolaLayersSpec::Named(n)) => match n.as_str() {
                "low" => DolaLayers::Low,
                "high" => DolaLayers::High,
                _ => return Err(bad_layers(format!("{n:?}"))),
            },
            Some(DolaLayersSpec::List(v)) => {
                if let Some(&bad) = v.iter().find(|&&x| x < 0) {
                    return Err(bad_layers(format!("a negative layer ({bad})")));
                }
                // Layers at or above the top are dropped (transformers' rule).
                let below: Vec<usize> = v
                    .iter()
                    .map(|&x| x as u64)
                    .filter(|&x| x < l.num_layers as u64)
                    .map(|x| x as usize)
                    .collect();
                DolaLayers::List(
                    Layers::from_list(below)
                        .ok_or_else(|| bad_layers("a layer past 127".into()))?,
                )
            }
        };
        let premature = premature_in(object, premature)?;
        let relative_top = in_range(
            &format!("{object}.relative_top"),
            relative_top,
            DEFAULT_RELATIVE_TOP as f64,
            (0.0, 1.0),
            true,
        )?;
        let p = DolaParams {
            premature,
            relative_top,
            ..DolaParams::new(layers)
        }
        .resolve(l.num_layers, l.tied_head);
        if p.candidates.is_empty() {
            return Err(ValidationError::DolaNoCandidates {
                object,
                num_layers: l.num_layers,
            });
        }
        if premature == Premature::Exits {
            if let Some(layer) = p.candidates.iter().find(|c| !l.exit_layers.contains(c)) {
                return Err(ValidationError::NotAnExit {
                    object,
                    field: "layers",
                    got: layer as i64,
                    exits: l.exit_layers.clone(),
                });
            }
        }
        Ok(p)
    }

    /// The request's `speculative` object checked against `mode`; without one, the server's
    /// default where the mode decodes above its draft layer.
    pub fn speculative(
        &self,
        req: Option<SpeculativeRequest>,
        mode: &Mode,
    ) -> Result<Option<SpeculativeSpec>, ValidationError> {
        let l = &*self.limits;
        let depth = mode.depth(l.num_layers);
        if mode.early_exit().is_some() {
            // each token already leaves at its own exit; drafts would be verified in full
            return match req {
                Some(_) => Err(ValidationError::SpeculativeEarlyExit),
                None => Ok(None),
            };
        }
        let Some(req) = req else {
            return Ok(l.speculative_default.filter(|s| s.draft_layer < depth));
        };
        let layer = match req.draft_layer {
            Some(layer) => layer,
            // The server's draft layer, else the highest exit at or below half the depth.
            None => l
                .speculative_default
                .map(|s| s.draft_layer)
                .filter(|&d| d < depth)
                .or_else(|| {
                    l.exit_layers
                        .iter()
                        .copied()
                        .filter(|&e| 2 * e <= depth)
                        .max()
                })
                .ok_or(ValidationError::DraftLayerNeeded { depth })? as i64,
        };
        if layer < 0 || !l.exit_layers.contains(&(layer as usize)) {
            return Err(ValidationError::DraftLayerNotAnExit {
                got: layer,
                exits: l.exit_layers.clone(),
            });
        }
        let layer = layer as usize;
        if layer >= depth {
            return Err(ValidationError::DraftLayerTooDeep { layer, depth });
        }
        let k = count_in(
            "speculative.max_draft_tokens",
            req.max_draft_tokens
                .unwrap_or(l.speculative_max_draft_tokens as i64),
            1,
            MAX_DRAFT_TOKENS as i64,
        )?;
        Ok(Some(SpeculativeSpec {
            draft_layer: layer,
            max_draft_tokens: k as usize,
            adaptive: req.adaptive.unwrap_or(true),
        }))
    }
}

/// A strategy's `premature` (`exits` when left out).
fn premature_in(
    object: &'static str,
    premature: &Option<String>,
) -> Result<Premature, ValidationError> {
    match premature.as_deref() {
        None | Some("exits") => Ok(Premature::Exits),
        Some("lm_head") => Ok(Premature::LmHead),
        Some(other) => Err(ValidationError::Premature {
            object,
            got: other.into(),
        }),
    }
}
