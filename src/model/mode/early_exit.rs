//! Confidence-based early exit (Schuster et al., CALM, NeurIPS 2022): per token, the sequence
//! runs block by block, and at each exit below the top (lowest first) it takes that exit's
//! token when the exit is confident enough — its softmax margin (top-1 minus top-2
//! probability) reaches the threshold λ_t — else goes on, up to the original head.
//!
//! A position that left at block L still needs keys and values in the blocks above for the
//! tokens after it: they are computed from its hidden state at L (CALM's state propagation:
//! only those blocks' key and value projections run; the model does it in the step). Prompt
//! positions run every block; the first generated token still takes the first confident exit
//! at the last prompt position.
//!
//! λ_t is λ, or with CALM's decay τ, `clamp(0.9 λ + 0.1 λ e^(-τ t / T), 0, 1)` for the t-th
//! generated token of at most T. λ = 1 never exits (a margin can round to 1 in float32: no
//! exit is taken at 1 whatever the margin); λ = 0 always takes the lowest exit.

use std::fmt;

use serde_json::{Map, Value};

use super::dola::Layers;
use super::params::{self, Fields, Form, FormField, ModelShape, ParamError};
use super::{log_softmax, DeviceChoice, Head, Inspected, Strategy};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EarlyExitParams {
    /// λ, in [0, 1].
    pub threshold: f32,
    /// CALM's decay τ of the threshold over the generated tokens; None: a constant λ.
    pub decay: Option<f32>,
    /// The exits below the top, resolved against the model (`EarlyExitParams::resolve`).
    pub exits: Layers,
}

impl EarlyExitParams {
    pub fn new(threshold: f32) -> Self {
        Self {
            threshold,
            decay: None,
            exits: Layers::default(),
        }
    }

    /// The exits that may end a token: every exit below the top of `num_layers` blocks.
    pub fn with_exits(mut self, num_layers: usize, exits: &[usize]) -> Self {
        self.exits = Layers::from_list(exits.iter().copied().filter(|&e| e < num_layers))
            .unwrap_or_default();
        self
    }

    /// λ_t for the `t`-th generated token of at most `max_tokens`, as a constant threshold.
    pub fn decayed(self, t: usize, max_tokens: usize) -> Self {
        let Some(tau) = self.decay else {
            return self;
        };
        let l = self.threshold as f64;
        let decayed =
            0.9 * l + 0.1 * l * (-(tau as f64) * t as f64 / max_tokens.max(1) as f64).exp();
        Self {
            threshold: decayed.clamp(0.0, 1.0) as f32,
            decay: None,
            ..self
        }
    }

    /// Whether an exit with these logits is confident enough to end the token.
    pub fn confident(&self, logits: &[f32]) -> bool {
        self.confident_at(softmax_margin(logits))
    }

    /// Whether an exit whose softmax margin is `margin` is confident enough to end the token.
    pub fn confident_at(&self, margin: f32) -> bool {
        self.threshold < 1.0 && margin >= self.threshold
    }

    /// Which of a token's heads (exits ascending, then the original) gives its distribution:
    /// the first confident exit, else the last handed over. A head left empty was never
    /// reached, or (where the step decided the exit on the device) was one the token went on
    /// from: such a step hands over only the head it left at.
    pub fn chosen(&self, heads: &[&[f32]]) -> usize {
        let last = heads.iter().rposition(|h| !h.is_empty()).unwrap_or(0);
        heads[..last]
            .iter()
            .position(|h| !h.is_empty() && self.confident(h))
            .unwrap_or(last)
    }
}

pub use crate::kernels::greedy::softmax_margin;

impl fmt::Display for EarlyExitParams {
    /// The flag form: `early_exit:λ[,decay=τ]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "early_exit:{}", self.threshold)?;
        if let Some(tau) = self.decay {
            write!(f, ",decay={tau}")?;
        }
        Ok(())
    }
}

const DECAY_RANGE: (f64, f64) = (0.0, 100.0);

impl Strategy for EarlyExitParams {
    const NAME: &'static str = "early_exit";
    const TITLE: &'static str = "early exit per token";
    const FIELDS: &'static [&'static str] = &["threshold", "measure", "decay"];
    const ID_WORD: &'static str = "early-exit";
    const ID_FORMS: &'static str = "`{b}:early-exit-T` (T the confidence threshold, e.g. 0.9)";
    const FLAG_FORMS: &'static str = "early_exit:THRESHOLD[,decay=T]";

    /// Exits ascending, then the original head: [`EarlyExitParams::chosen`]'s order.
    fn heads(&self) -> Vec<Head> {
        self.exits
            .iter()
            .map(Head::Exit)
            .chain(std::iter::once(Head::Original))
            .collect()
    }

    fn token_exit(&self) -> Option<EarlyExitParams> {
        Some(*self)
    }

    fn at_token(self, t: usize, max_tokens: usize) -> Self {
        self.decayed(t, max_tokens)
    }

    fn scores(&self, logits: &[&[f32]]) -> Vec<f32> {
        log_softmax(logits[self.chosen(logits)])
    }

    fn chosen_head(&self, logits: &[&[f32]]) -> Option<usize> {
        Some(self.chosen(logits))
    }

    /// The argmax of the head the token leaves at (a step deciding the exit hands over only
    /// that head).
    fn device_choice(&self) -> Option<DeviceChoice> {
        Some(DeviceChoice::HeadArgmax)
    }

    /// With the exit the position would leave at (none when it runs to the original head).
    fn inspect(&self, logits: &[&[f32]]) -> Inspected {
        let chosen = self.chosen(logits);
        Inspected {
            logprobs: log_softmax(logits[chosen]),
            chosen: self.exits.iter().nth(chosen).map(|l| ("exit_layer", l)),
        }
    }

    fn write_flag(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }

    /// `λ[,decay=τ]`.
    fn parse_flag(rest: Option<&str>) -> Option<Self> {
        let mut parts = rest?.split(',');
        let mut p = EarlyExitParams::new(parts.next()?.trim().parse().ok()?);
        for part in parts {
            match part.trim().split_once('=') {
                Some(("decay", v)) => p.decay = Some(v.trim().parse().ok()?),
                _ => return None,
            }
        }
        Some(p)
    }

    /// `early-exit-λ` (no decay).
    fn id_suffix(&self) -> Option<String> {
        self.decay
            .is_none()
            .then(|| format!("early-exit-{}", self.threshold))
    }

    fn from_id_suffix(suffix: &str) -> Option<Self> {
        let l: f32 = suffix.strip_prefix("early-exit-")?.parse().ok()?;
        Some(EarlyExitParams::new(l))
    }

    fn to_request(&self) -> Map<String, Value> {
        let mut m = Map::from_iter([
            ("threshold".into(), params::number(self.threshold)),
            ("measure".into(), "softmax_margin".into()),
        ]);
        if let Some(d) = self.decay {
            m.insert("decay".into(), params::number(d));
        }
        m
    }

    /// The exits a token may leave at.
    fn resolved(&self) -> Map<String, Value> {
        Map::from_iter([("layers".into(), self.exits.into())])
    }

    fn from_request(f: &mut Fields, _shape: &ModelShape) -> Result<Self, ParamError> {
        let param = f.param("threshold");
        let threshold = f.number("threshold")?.ok_or_else(|| {
            ParamError::new(
                param.clone(),
                format!("`{param}` is required: the softmax margin in [0, 1] at which a token leaves at an exit (1: never)"),
            )
        })?;
        let threshold = params::in_range(&param, threshold, (0.0, 1.0), false)?;
        f.choice("measure", &[("softmax_margin", ())], ())?;
        let decay = match f.number("decay")? {
            Some(d) => Some(params::in_range(&f.param("decay"), d, DECAY_RANGE, false)?),
            None => None,
        };
        Ok(EarlyExitParams {
            decay,
            ..EarlyExitParams::new(threshold)
        })
    }

    /// The threshold in range, and an exit below the top to leave at.
    fn resolve(self, object: &str, shape: &ModelShape) -> Result<Self, ParamError> {
        params::in_range(
            &format!("{object}.threshold"),
            self.threshold as f64,
            (0.0, 1.0),
            false,
        )?;
        if let Some(d) = self.decay {
            params::in_range(&format!("{object}.decay"), d as f64, DECAY_RANGE, false)?;
        }
        let p = self.with_exits(shape.num_layers, shape.exits);
        if p.exits.is_empty() {
            let param = format!("{object}.mode");
            return Err(ParamError::new(
                param.clone(),
                format!(
                    "`{param}`: early exit needs an exit below the top; this model's exits: {:?}",
                    shape.exits
                ),
            ));
        }
        Ok(p)
    }

    fn listed(_shape: &ModelShape) -> Vec<Self> {
        vec![EarlyExitParams::new(0.9)]
    }

    fn form(shape: &ModelShape) -> Option<Form> {
        shape.exits_below_top().next()?;
        Some(Form {
            mode: Self::NAME,
            title: Self::TITLE,
            single_head: false,
            parameters: vec![FormField::number(
                "threshold",
                "threshold",
                (0.0, 1.0, 0.05),
                0.9,
            )],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margin_and_choice() {
        let sure = [10.0f32, 0.0, 0.0];
        let torn = [1.0f32, 1.0, 0.0];
        assert!(softmax_margin(&sure) > 0.99);
        assert!(softmax_margin(&torn).abs() < 1e-6);
        let p = EarlyExitParams::new(0.5);
        assert_eq!(p.chosen(&[&torn, &sure, &torn]), 1);
        assert_eq!(p.chosen(&[&torn, &torn, &torn]), 2, "the original head");
        assert_eq!(p.chosen(&[&torn, &sure, &[]]), 1, "left at the second");
        // a step that decided on the device hands over only the head the token left at,
        // whatever its margin on the host
        assert_eq!(p.chosen(&[&[], &torn, &[]]), 1);
        assert_eq!(p.chosen(&[&[], &[], &torn]), 2);
        assert_eq!(EarlyExitParams::new(0.0).chosen(&[&torn, &sure, &sure]), 0);
        // λ = 1 never exits, even on a margin that rounds to 1
        let certain = [200.0f32, 0.0, 0.0];
        assert_eq!(softmax_margin(&certain), 1.0);
        assert_eq!(EarlyExitParams::new(1.0).chosen(&[&certain, &certain]), 1);
    }

    #[test]
    fn decay_lowers_the_threshold_over_the_text() {
        let p = EarlyExitParams {
            decay: Some(4.0),
            ..EarlyExitParams::new(0.8)
        };
        let at = |t| p.decayed(t, 16).threshold;
        assert!((at(0) - 0.8).abs() < 1e-6);
        assert!(at(8) < at(0) && at(16) < at(8));
        assert!(at(16) >= 0.72, "0.9 λ at least");
        assert_eq!(EarlyExitParams::new(0.8).decayed(9, 16).threshold, 0.8);
    }

    #[test]
    fn text_forms() {
        let p = EarlyExitParams::parse_flag(Some("0.9,decay=2")).unwrap();
        assert_eq!((p.threshold, p.decay), (0.9, Some(2.0)));
        assert_eq!(p.to_string(), "early_exit:0.9,decay=2");
        assert_eq!(p.id_suffix(), None);
        let p = EarlyExitParams::new(0.9);
        assert_eq!(p.id_suffix().as_deref(), Some("early-exit-0.9"));
        assert_eq!(EarlyExitParams::from_id_suffix("early-exit-0.9"), Some(p));
        assert_eq!(EarlyExitParams::parse_flag(Some("x")), None);
        assert_eq!(EarlyExitParams::parse_flag(Some("0.5,tau=1")), None);
    }
}
