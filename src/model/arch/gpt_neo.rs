//! GPT-Neo (`transformers/models/gpt_neo/modeling_gpt_neo.py`): `nn.Linear` projections
//! (`(out, in)`), q/k/v without bias, attention scores NOT scaled by 1/sqrt(head_dim), and
//! layers alternating global and local (a window of `window_size` positions) attention.

use candle_nn::VarBuilder;
use serde_json::Value;

use super::{Architecture, Projections};
use crate::model::config::{AttentionKind, Fields, ModelConfig};
use crate::model::error::Result;
use crate::model::weights::{Proj, WeightSpec};

pub(super) fn config(f: &Fields<'_>) -> Result<ModelConfig> {
    let hidden_size = f.count("hidden_size")?;
    let num_layers = f.count("num_layers")?;
    let window = f.count("window_size")?;
    let kind = |name: &str| match name {
        "global" => Some(AttentionKind::Global),
        "local" => Some(AttentionKind::Local { window }),
        _ => None,
    };
    let attention_layers = match (f.get("attention_layers"), f.get("attention_types")) {
        (Some(names), _) => {
            let bad = |m: String| f.err("attention_layers", m);
            names
                .as_array()
                .ok_or_else(|| bad(format!("expected a list of kinds, got {names}")))?
                .iter()
                .map(|n| {
                    n.as_str()
                        .and_then(kind)
                        .ok_or_else(|| bad(format!("unknown kind {n}")))
                })
                .collect::<Result<Vec<_>>>()?
        }
        (None, Some(types)) => {
            expand_attention_types(types, kind).map_err(|m| f.err("attention_types", m))?
        }
        (None, None) => return Err(f.err("attention_types", "missing".into())),
    };
    if attention_layers.len() != num_layers {
        return Err(f.err(
            "attention_layers",
            format!(
                "describes {} layers but num_layers is {num_layers}",
                attention_layers.len()
            ),
        ));
    }
    Ok(ModelConfig {
        architecture: Architecture::GptNeo,
        vocab_size: f.count("vocab_size")?,
        hidden_size,
        num_layers,
        num_heads: f.head_count("num_heads", hidden_size)?,
        intermediate_size: f.opt_count("intermediate_size")?.unwrap_or(4 * hidden_size),
        max_position_embeddings: f.count("max_position_embeddings")?,
        layer_norm_epsilon: f.f64_or("layer_norm_epsilon", 1e-5)?,
        activation: f.activation("activation_function")?,
        attention_layers,
        scale_attention: false,
        exit_layers: f.exit_layers(num_layers)?,
        eos_token_id: f.eos_token_id()?,
    })
}

/// `[[["global", "local"], 6]]` -> global, local repeated 6 times (HF's
/// `expand_attention_types_params`).
fn expand_attention_types(
    types: &Value,
    kind: impl Fn(&str) -> Option<AttentionKind>,
) -> std::result::Result<Vec<AttentionKind>, String> {
    let bad = || "expected a list of [[kinds...], repeat] pairs".to_string();
    let mut out = Vec::new();
    for item in types.as_array().ok_or_else(bad)? {
        let pair = item.as_array().filter(|p| p.len() == 2).ok_or_else(bad)?;
        let kinds = pair[0].as_array().ok_or_else(bad)?;
        let repeat = pair[1].as_u64().ok_or_else(bad)?;
        for _ in 0..repeat {
            for k in kinds {
                let name = k.as_str().ok_or_else(bad)?;
                out.push(kind(name).ok_or_else(|| format!("unknown kind `{name}`"))?);
            }
        }
    }
    Ok(out)
}

/// `attn.attention.{q,k,v}_proj` (no bias) stacked, `attn.attention.out_proj`,
/// `mlp.{c_fc,c_proj}`: all `nn.Linear`.
pub(super) fn projections(
    cfg: &ModelConfig,
    vb: &VarBuilder,
    spec: WeightSpec,
) -> candle_core::Result<Projections> {
    let (h, inner) = (cfg.hidden_size, cfg.intermediate_size);
    let attn = vb.pp("attn.attention");
    Ok(Projections {
        qkv: Proj::stacked_linear(h, h, &["q_proj", "k_proj", "v_proj"], &attn, spec)?,
        attn_out: Proj::linear(h, h, true, attn.pp("out_proj"), spec)?,
        mlp_in: Proj::linear(h, inner, true, vb.pp("mlp.c_fc"), spec)?,
        mlp_out: Proj::linear(inner, h, true, vb.pp("mlp.c_proj"), spec)?,
    })
}
