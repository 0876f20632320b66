//! GPT-2 (`transformers/models/gpt2/modeling_gpt2.py`): every projection is a `Conv1D`
//! (weight stored `(in, out)`, with bias), q/k/v are one fused `attn.c_attn`, attention
//! scores are divided by sqrt(head_dim) (`scale_attn_weights`), and every layer attends
//! globally.

use candle_nn::VarBuilder;

use super::{Architecture, Projections};
use crate::model::config::{AttentionKind, Fields, ModelConfig};
use crate::model::error::Result;
use crate::model::weights::{Proj, WeightSpec};

pub(super) fn config(f: &Fields<'_>) -> Result<ModelConfig> {
    // Variants of the attention these checkpoints do not use: refused rather than computed
    // differently from the reference.
    for field in ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"] {
        if f.bool_or(field, false)? {
            return Err(f.err(field, "true is not supported (only false)".into()));
        }
    }
    let hidden_size = f.count("n_embd")?;
    let num_layers = f.count("n_layer")?;
    Ok(ModelConfig {
        architecture: Architecture::Gpt2,
        vocab_size: f.count("vocab_size")?,
        hidden_size,
        num_layers,
        num_heads: f.head_count("n_head", hidden_size)?,
        // `n_inner: null` means 4 x n_embd.
        intermediate_size: f.opt_count("n_inner")?.unwrap_or(4 * hidden_size),
        max_position_embeddings: f.count("n_positions")?,
        layer_norm_epsilon: f.f64_or("layer_norm_epsilon", 1e-5)?,
        activation: f.activation("activation_function")?,
        attention_layers: vec![AttentionKind::Global; num_layers],
        scale_attention: f.bool_or("scale_attn_weights", true)?,
        exit_layers: f.exit_layers(num_layers)?,
        eos_token_id: f.eos_token_id()?,
    })
}

/// `attn.c_attn` (q, k, v fused along the output), `attn.c_proj`, `mlp.{c_fc,c_proj}`: all
/// `Conv1D`. The `attn.bias` / `attn.masked_bias` mask buffers of older files are not read.
pub(super) fn projections(
    cfg: &ModelConfig,
    vb: &VarBuilder,
    spec: WeightSpec,
) -> candle_core::Result<Projections> {
    let (h, inner) = (cfg.hidden_size, cfg.intermediate_size);
    Ok(Projections {
        qkv: Proj::conv1d(h, 3 * h, vb.pp("attn.c_attn"), spec)?,
        attn_out: Proj::conv1d(h, h, vb.pp("attn.c_proj"), spec)?,
        mlp_in: Proj::conv1d(h, inner, vb.pp("mlp.c_fc"), spec)?,
        mlp_out: Proj::conv1d(inner, h, vb.pp("mlp.c_proj"), spec)?,
    })
}
