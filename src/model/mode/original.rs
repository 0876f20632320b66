//! The original head: the model as it was trained to finish, the default mode.

use std::fmt;

use serde_json::{Map, Value};

use super::params::{Fields, Form, ModelShape, ParamError};
use super::{log_softmax, DeviceChoice, Head, Strategy};

/// The tied `lm_head` on the top block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Original;

impl Strategy for Original {
    const NAME: &'static str = "original";
    const TITLE: &'static str = "original";
    const FIELDS: &'static [&'static str] = &[];
    const ID_WORD: &'static str = "original";
    const ID_FORMS: &'static str = "`{b}`, `{b}:original`";
    const FLAG_FORMS: &'static str = "original";

    fn heads(&self) -> Vec<Head> {
        vec![Head::Original]
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
        f.write_str("original")
    }

    fn parse_flag(rest: Option<&str>) -> Option<Self> {
        rest.is_none().then_some(Original)
    }

    fn id_suffix(&self) -> Option<String> {
        Some("original".into())
    }

    fn from_id_suffix(suffix: &str) -> Option<Self> {
        (suffix == "original").then_some(Original)
    }

    fn to_request(&self) -> Map<String, Value> {
        Map::new()
    }

    fn from_request(_fields: &mut Fields, _shape: &ModelShape) -> Result<Self, ParamError> {
        Ok(Original)
    }

    fn listed(_shape: &ModelShape) -> Vec<Self> {
        vec![Original]
    }

    fn form(_shape: &ModelShape) -> Option<Form> {
        Some(Form {
            mode: Self::NAME,
            title: Self::TITLE,
            single_head: true,
            parameters: vec![],
        })
    }
}
