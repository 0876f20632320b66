//! One exit head: decoding from what an intermediate layer predicts, which runs only the
//! blocks up to it (early exit for the whole text).

use std::fmt;

use serde_json::{Map, Value};

use super::params::{Fields, Form, FormField, ModelShape, ParamError};
use super::{log_softmax, DeviceChoice, Head, Strategy};

/// The exit head trained on block `.0`'s output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit(pub usize);

impl Strategy for Exit {
    const NAME: &'static str = "exit";
    const TITLE: &'static str = "early exit";
    const FIELDS: &'static [&'static str] = &["layer"];
    const ID_WORD: &'static str = "exit";
    const ID_FORMS: &'static str = "`{b}:exit-L` (L an exit layer)";
    const FLAG_FORMS: &'static str = "exit:L";

    fn heads(&self) -> Vec<Head> {
        vec![Head::Exit(self.0)]
    }

    fn scores(&self, logits: &[&[f32]]) -> Vec<f32> {
        log_softmax(logits[0])
    }

    fn device_choice(&self) -> Option<DeviceChoice> {
        Some(DeviceChoice::HeadArgmax)
    }

    fn chosen_head(&self, _logits: &[&[f32]]) -> Option<usize> {
        Some(0)
    }

    fn write_flag(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exit:{}", self.0)
    }

    fn parse_flag(rest: Option<&str>) -> Option<Self> {
        rest?.trim().parse().ok().map(Exit)
    }

    fn id_suffix(&self) -> Option<String> {
        Some(format!("exit-{}", self.0))
    }

    fn from_id_suffix(suffix: &str) -> Option<Self> {
        suffix.strip_prefix("exit-")?.parse().ok().map(Exit)
    }

    fn to_request(&self) -> Map<String, Value> {
        Map::from_iter([("layer".into(), self.0.into())])
    }

    fn from_request(fields: &mut Fields, shape: &ModelShape) -> Result<Self, ParamError> {
        fields.exit_layer("layer", shape).map(Exit)
    }

    fn resolve(self, object: &str, shape: &ModelShape) -> Result<Self, ParamError> {
        super::params::exit_layer(&format!("{object}.layer"), self.0 as i64, shape).map(Exit)
    }

    fn listed(shape: &ModelShape) -> Vec<Self> {
        shape.exits.iter().map(|&l| Exit(l)).collect()
    }

    /// An exit at about half the depth to start from.
    fn form(shape: &ModelShape) -> Option<Form> {
        let half = half_exit(shape)?;
        Some(Form {
            mode: Self::NAME,
            title: Self::TITLE,
            single_head: true,
            parameters: vec![FormField::layers(
                "layer",
                "layer",
                &[],
                shape.exits.iter().copied(),
                half.into(),
            )],
        })
    }
}

/// The highest exit at or below half the depth (else the lowest): where the playground's
/// exit and contrast start.
pub fn half_exit(shape: &ModelShape) -> Option<usize> {
    shape
        .exits
        .iter()
        .copied()
        .filter(|&l| 2 * l <= shape.num_layers)
        .max()
        .or_else(|| shape.exits.first().copied())
}
