//! The decoding mode (`multi_exit`, or the one a model id names) and self-speculative
//! decoding (`speculative`), against the model's exits and depth.

use super::{count_in, ValidationError, Validator};
use crate::engine::request::{ModeSpec, SpeculativeRequest, SpeculativeSpec};
use crate::engine::speculative::MAX_DRAFT_TOKENS;
use crate::model::Mode;

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

    /// Resolves a `multi_exit` object against the model.
    pub fn mode(&self, spec: &ModeSpec) -> Result<Mode, ValidationError> {
        self.mode_in("multi_exit", spec)
    }

    /// Resolves a mode object sent as the field `object` (`multi_exit`, or one of an
    /// inspection's strategies), whose name its errors carry.
    pub(super) fn mode_in(&self, object: &str, spec: &ModeSpec) -> Result<Mode, ValidationError> {
        Ok(Mode::from_request(
            object,
            spec.mode,
            spec.fields.clone(),
            &self.limits.shape(),
        )?)
    }

    /// Checks a mode parsed from text (a model id, a preset, the default mode) as a
    /// `multi_exit` object asking for it would be.
    pub fn check_mode(&self, mode: Mode) -> Result<Mode, ValidationError> {
        self.mode(&mode.into())
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
