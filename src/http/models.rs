//! The model ids this server answers to. `NAME` is the served model in the server's default
//! mode; `NAME:SUFFIX` picks a mode, each strategy spelling its own suffixes
//! (`NAME:exit-L`, `NAME:contrast-U-L`, `NAME:dola-low`, `NAME:early-exit-0.9`, ...), as do the
//! operator's presets (`NAME:<preset>`). A client that can only set `model` (lm-eval,
//! LangChain, any plain OpenAI client) can so choose any mode.

use crate::engine::request::{ModeSpec, SpeculativeRequest, SpeculativeSpec};
use crate::engine::Validator;
use crate::model::Mode;

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
                    "--mode-preset `{name}`: a preset name is lowercase letters, digits, `-` and `_`, and not a built-in mode's id ({})",
                    Mode::id_forms("NAME")
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
            .check_mode(mode)
            .map(Some)
            .map_err(|_| not_found())
    }

    /// Every id worth listing, with its mode (None: the default mode of the bare name):
    /// what each strategy lists for this model, where it validates and has an id.
    pub fn listed(&self) -> Vec<(String, Option<Mode>)> {
        let limits = self.validator.limits();
        let mut out = vec![(self.base.clone(), None)];
        for asked in Mode::listed(&limits.shape()) {
            let Ok(m) = self.validator.check_mode(asked) else {
                continue;
            };
            if let Some(s) = m.id_suffix() {
                let id = format!("{}:{s}", self.base);
                if !out.iter().any(|(listed, _)| *listed == id) {
                    out.push((id, Some(m)));
                }
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
        let mut s = format!("{} (exits: {exits:?})", Mode::id_forms(b));
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
