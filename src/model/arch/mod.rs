//! What differs per architecture, and only that: the `config.json` names, and how a block's
//! four projections are stored in the checkpoint. Everything else (embeddings, blocks,
//! attention, exits, caches) is shared. A new architecture is a file here, a variant of
//! [`Architecture`] and an arm in each of its two matches.

mod gpt2;
mod gpt_neo;

use candle_nn::VarBuilder;

use super::config::{Fields, ModelConfig};
use super::error::Result;
use super::weights::{Proj, WeightSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `transformers/models/gpt_neo/modeling_gpt_neo.py` (`IBM/gpt-neo-125m-multiexit`).
    GptNeo,
    /// `transformers/models/gpt2/modeling_gpt2.py` (`IBM/gpt2-medium-multiexit`).
    Gpt2,
}

/// A block's projections, each as `y = x Wᵀ + b` with `W` `(out, in)`.
pub struct Projections {
    /// q, k and v stacked along the output: `(3 hidden, hidden)`.
    pub qkv: Proj,
    pub attn_out: Proj,
    pub mlp_in: Proj,
    pub mlp_out: Proj,
}

impl Architecture {
    const ALL: [(&'static str, Architecture); 2] = [
        ("gpt_neo", Architecture::GptNeo),
        ("gpt2", Architecture::Gpt2),
    ];

    /// The architecture of a `config.json` `model_type`.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .find(|(name, _)| *name == model_type)
            .map(|(_, a)| *a)
    }

    /// The `model_type`s served, for messages.
    pub fn supported() -> String {
        Self::ALL
            .iter()
            .map(|(name, _)| format!("`{name}`"))
            .collect::<Vec<_>>()
            .join(" and ")
    }

    pub(super) fn parse_config(self, fields: &Fields<'_>) -> Result<ModelConfig> {
        match self {
            Architecture::GptNeo => gpt_neo::config(fields),
            Architecture::Gpt2 => gpt2::config(fields),
        }
    }

    /// The projections of one block, read from its folder `vb` (`transformer.h.N`).
    pub(super) fn projections(
        self,
        cfg: &ModelConfig,
        vb: &VarBuilder,
        spec: WeightSpec,
    ) -> candle_core::Result<Projections> {
        match self {
            Architecture::GptNeo => gpt_neo::projections(cfg, vb, spec),
            Architecture::Gpt2 => gpt2::projections(cfg, vb, spec),
        }
    }
}
