//! The model ids this server answers to. `NAME` is the served model in the server's default
//! mode; `NAME:original`, `NAME:exit-L`, `NAME:contrast-U-L` (`U` a layer or `original`) and
//! `NAME:dola-low`, `NAME:dola-high`, `NAME:dola-L-L-...` pick a mode, as do the operator's presets (`NAME:<preset>`). A client that can only set
//! `model` (lm-eval, LangChain, any plain OpenAI client) can so choose any mode.

use crate::engine::request::{ModeSpec, SpeculativeRequest, SpeculativeSpec};
use crate::engine::Validator;
use crate::model::mode::{DolaLayers, DolaParams, Layers};
use crate::model::{Mode, Upper};

use super::error::ApiError;

pub struct ModelIds {
    pub base: String,
    validator: Validator,
    /// The operator's presets, resolved at start-up.
    presets: Vec<Preset>,
}

/// A named mode, with the self-speculative decoding it implies (if any).
struct Preset {
    name: String,
    mode: Mode,
    speculative: Option<SpeculativeSpec>,
}

impl ModelIds {
    /// `presets`: `(name, mode, speculative)`; a name must be lowercase letters, digits, `-`
    /// or `_`, and must not read as a built-in suffix.
    pub fn new(
        base: String,
        validator: Validator,
        presets: &[(String, ModeSpec, Option<SpeculativeRequest>)],
    ) -> Result<Self, String> {
        let mut resolved: Vec<Preset> = Vec::with_capacity(presets.len());
        for (name, spec, speculative) in presets {
            let ok_chars = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
            if !ok_chars || Mode::is_reserved_id_suffix(name) {
                return Err(format!(
                    "--mode-preset `{name}`: a preset name is lowercase letters, digits, `-` and `_`, and not a built-in mode (original, exit-L, contrast-U-L, dola-..., sled, early-exit-...)"
                ));
            }
            if resolved.iter().any(|p| p.name == *name) {
                return Err(format!("--mode-preset `{name}` is given twice"));
            }
            let mode = validator
                .mode(spec)
                .map_err(|e| format!("--mode-preset `{name}`: {e}"))?;
            let speculative = match speculative {
                None => None,
                Some(req) => validator
                    .speculative(Some(*req), &mode)
                    .map_err(|e| format!("--mode-preset `{name}`: {e}"))?,
            };
            resolved.push(Preset {
                name: name.clone(),
                mode,
                speculative,
            });
        }
        Ok(Self {
            base,
            validator,
            presets: resolved,
        })
    }

    /// The mode an id names: None for the bare name (the request's `multi_exit`, else the
    /// server's default). Unknown ids are 404 with the forms this server accepts.
    pub fn resolve(&self, id: &str) -> Result<Option<Mode>, ApiError> {
        if id == self.base {
            return Ok(None);
        }
        let not_found = || ApiError::ModelNotFound {
            requested: id.to_string(),
            served: self.forms(),
        };
        let suffix = id
            .strip_prefix(self.base.as_str())
            .and_then(|r| r.strip_prefix(':'))
            .ok_or_else(not_found)?;
        if let Some(p) = self.presets.iter().find(|p| p.name == suffix) {
            return Ok(Some(p.mode));
        }
        let mode = Mode::from_id_suffix(suffix).ok_or_else(not_found)?;
        self.validator
            .mode(&mode.into())
            .map(Some)
            .map_err(|_| not_found())
    }

    /// Every id worth listing, with its mode (None: the default mode of the bare name).
    pub fn listed(&self) -> Vec<(String, Option<Mode>)> {
        let limits = self.validator.limits();
        let exits = &limits.exit_layers;
        let top = exits.iter().copied().max();
        let mut modes = vec![Mode::Original];
        modes.extend(exits.iter().map(|&l| Mode::Exit(l)));
        let contrast = |upper, lower| {
            Mode::Contrast(crate::model::ContrastParams {
                upper,
                lower,
                alpha: crate::model::mode::DEFAULT_ALPHA,
                minimum_candidates: crate::model::mode::DEFAULT_MINIMUM_CANDIDATES,
            })
        };
        if let Some(top) = top {
            modes.extend(
                exits
                    .iter()
                    .filter(|&&l| l < top)
                    .map(|&l| contrast(Upper::Exit(top), l)),
            );
        }
        modes.extend(
            exits
                .iter()
                .filter(|&&l| l < limits.num_layers)
                .map(|&l| contrast(Upper::Original, l)),
        );
        // DoLa: the lower and upper halves, and every exit below the top, where they are exits
        let below_top: Vec<usize> = exits
            .iter()
            .copied()
            .filter(|&l| l < limits.num_layers)
            .collect();
        let mut dola = vec![DolaLayers::Low, DolaLayers::High];
        if let Some(set) = Layers::from_list(below_top).filter(|s| !s.is_empty()) {
            dola.push(DolaLayers::List(set));
        }
        modes.extend(dola.into_iter().filter_map(|layers| {
            let asked = Mode::Dola(DolaParams::new(layers));
            self.validator.mode(&asked.into()).ok()
        }));
        // SLED over the exits below the top, with the authors' parameters; early exit at 0.9
        let early = Mode::EarlyExit(crate::model::mode::EarlyExitParams::new(0.9));
        for m in [Mode::Sled(Default::default()), early] {
            modes.extend(self.validator.mode(&m.into()).ok());
        }
        let mut out = vec![(self.base.clone(), None)];
        for m in modes {
            if let Some(s) = m.id_suffix() {
                out.push((format!("{}:{s}", self.base), Some(m)));
            }
        }
        out.extend(
            self.presets
                .iter()
                .map(|p| (format!("{}:{}", self.base, p.name), Some(p.mode))),
        );
        out
    }

    /// The self-speculative decoding a preset id implies (None for every other id).
    pub fn speculative(&self, id: &str) -> Option<SpeculativeSpec> {
        let suffix = id.strip_prefix(self.base.as_str())?.strip_prefix(':')?;
        self.presets
            .iter()
            .find(|p| p.name == suffix)
            .and_then(|p| p.speculative)
    }

    /// The accepted forms, for a 404's message.
    fn forms(&self) -> String {
        let exits = &self.validator.limits().exit_layers;
        let b = &self.base;
        let mut s = format!(
            "`{b}`, `{b}:original`, `{b}:exit-L`, `{b}:contrast-U-L` (L an exit layer {exits:?}, U a higher exit or `original`) or `{b}:dola-low`, `{b}:dola-high`, `{b}:dola-L-L` (DoLa over those exits), `{b}:sled` (SLED over the exits below the top), `{b}:early-exit-T` (T the confidence threshold, e.g. 0.9)"
        );
        if !self.presets.is_empty() {
            let names: Vec<String> = self
                .presets
                .iter()
                .map(|p| format!("`{b}:{}`", p.name))
                .collect();
            s.push_str(&format!(", or a preset: {}", names.join(", ")));
        }
        s
    }
}
