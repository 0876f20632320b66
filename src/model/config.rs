//! `config.json` of a GPT-Neo checkpoint, plus the multi-exit field `lm_head_layer_indices`.
//! Field names follow `transformers.GPTNeoConfig`.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::error::{ModelError, Result};

/// The activation named by `activation_function`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_new` / `gelu_pytorch_tanh` / `gelu_fast`: the tanh approximation (GPT-Neo's default).
    GeluTanh,
    /// `gelu`: the exact erf form.
    GeluErf,
    Relu,
    Silu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "gelu" => Self::GeluErf,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            _ => return None,
        })
    }
}

/// Whether a layer attends to all previous positions or only to the last `window_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    Global,
    Local,
}

#[derive(Debug, Clone)]
pub struct GptNeoConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub window_size: usize,
    pub layer_norm_epsilon: f64,
    pub activation: Activation,
    /// One entry per layer (HF's `attention_layers`, expanded from `attention_types`).
    pub attention_layers: Vec<AttentionKind>,
    /// 1-based layers with an exit head, sorted ascending; empty for a plain GPT-Neo.
    pub exit_layers: Vec<usize>,
    pub eos_token_id: Option<u32>,
}

/// The raw JSON, every field optional so that a missing one is reported by name.
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    num_layers: Option<usize>,
    num_heads: Option<usize>,
    intermediate_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    window_size: Option<usize>,
    layer_norm_epsilon: Option<f64>,
    activation_function: Option<String>,
    attention_types: Option<Value>,
    attention_layers: Option<Vec<String>>,
    lm_head_layer_indices: Option<Vec<usize>>,
    eos_token_id: Option<u32>,
}

impl GptNeoConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_json(&text, path)
    }

    /// Parses `text`; `path` only names the file in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let err = |field: &str, message: String| ModelError::Config {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| err("(json)", format!("invalid JSON: {e}")))?;
        let missing = |field: &str| err(field, "missing".to_string());

        match raw.model_type.as_deref() {
            Some("gpt_neo") => {}
            Some(other) => {
                return Err(err(
                    "model_type",
                    format!("unsupported model type `{other}` (this server runs `gpt_neo`)"),
                ))
            }
            None => return Err(missing("model_type")),
        }
        let vocab_size = raw.vocab_size.ok_or_else(|| missing("vocab_size"))?;
        let hidden_size = raw.hidden_size.ok_or_else(|| missing("hidden_size"))?;
        let num_layers = raw.num_layers.ok_or_else(|| missing("num_layers"))?;
        let num_heads = raw.num_heads.ok_or_else(|| missing("num_heads"))?;
        let max_position_embeddings = raw
            .max_position_embeddings
            .ok_or_else(|| missing("max_position_embeddings"))?;
        let window_size = raw.window_size.ok_or_else(|| missing("window_size"))?;
        for (field, value) in [
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("max_position_embeddings", max_position_embeddings),
            ("window_size", window_size),
        ] {
            if value == 0 {
                return Err(err(field, "must be positive".into()));
            }
        }
        if hidden_size % num_heads != 0 {
            return Err(err(
                "num_heads",
                format!("hidden_size {hidden_size} is not divisible by num_heads {num_heads}"),
            ));
        }
        let act_name = raw
            .activation_function
            .ok_or_else(|| missing("activation_function"))?;
        let activation = Activation::parse(&act_name)
            .ok_or_else(|| err("activation_function", format!("unsupported `{act_name}`")))?;

        let attention_layers = match (raw.attention_layers, raw.attention_types) {
            (Some(names), _) => names
                .iter()
                .map(|n| {
                    parse_kind(n)
                        .ok_or_else(|| err("attention_layers", format!("unknown kind `{n}`")))
                })
                .collect::<Result<Vec<_>>>()?,
            (None, Some(types)) => {
                expand_attention_types(&types).map_err(|m| err("attention_types", m))?
            }
            (None, None) => return Err(missing("attention_types")),
        };
        if attention_layers.len() != num_layers {
            return Err(err(
                "attention_layers",
                format!(
                    "describes {} layers but num_layers is {num_layers}",
                    attention_layers.len()
                ),
            ));
        }

        let mut exit_layers = raw.lm_head_layer_indices.unwrap_or_default();
        exit_layers.sort_unstable();
        exit_layers.dedup();
        if let Some(&bad) = exit_layers.iter().find(|&&l| l == 0 || l > num_layers) {
            return Err(err(
                "lm_head_layer_indices",
                format!("exit layer {bad} is outside 1..={num_layers}"),
            ));
        }

        Ok(Self {
            vocab_size,
            hidden_size,
            num_layers,
            num_heads,
            intermediate_size: raw.intermediate_size.unwrap_or(4 * hidden_size),
            max_position_embeddings,
            window_size,
            layer_norm_epsilon: raw.layer_norm_epsilon.unwrap_or(1e-5),
            activation,
            attention_layers,
            exit_layers,
            eos_token_id: raw.eos_token_id,
        })
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

fn parse_kind(name: &str) -> Option<AttentionKind> {
    match name {
        "global" => Some(AttentionKind::Global),
        "local" => Some(AttentionKind::Local),
        _ => None,
    }
}

/// `[[["global", "local"], 6]]` -> global, local repeated 6 times (HF's `expand_attention_types_params`).
fn expand_attention_types(types: &Value) -> std::result::Result<Vec<AttentionKind>, String> {
    let bad = || "expected a list of [[kinds...], repeat] pairs".to_string();
    let mut out = Vec::new();
    for item in types.as_array().ok_or_else(bad)? {
        let pair = item.as_array().filter(|p| p.len() == 2).ok_or_else(bad)?;
        let kinds = pair[0].as_array().ok_or_else(bad)?;
        let repeat = pair[1].as_u64().ok_or_else(bad)?;
        for _ in 0..repeat {
            for k in kinds {
                let name = k.as_str().ok_or_else(bad)?;
                out.push(parse_kind(name).ok_or_else(|| format!("unknown kind `{name}`"))?);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"model_type":"gpt_neo","vocab_size":10,"hidden_size":8,"num_layers":4,
        "num_heads":2,"max_position_embeddings":16,"window_size":3,"activation_function":"gelu_new",
        "attention_types":[[["global","local"],2]]"#;

    fn parse(extra: &str) -> Result<GptNeoConfig> {
        GptNeoConfig::from_json(&format!("{BASE}{extra}}}"), Path::new("config.json"))
    }

    #[test]
    fn expands_attention_types_and_sorts_exits() -> Result<()> {
        let c = parse(r#","lm_head_layer_indices":[4,2,1]"#)?;
        assert_eq!(c.exit_layers, vec![1, 2, 4]);
        assert_eq!(c.attention_layers[1], AttentionKind::Local);
        assert_eq!(c.intermediate_size, 32);
        Ok(())
    }

    #[test]
    fn plain_gpt_neo_has_no_exits() -> Result<()> {
        assert!(parse("")?.exit_layers.is_empty());
        Ok(())
    }

    #[test]
    fn errors_name_file_and_field() {
        let e = parse(r#","lm_head_layer_indices":[5]"#)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "config.json: field `lm_head_layer_indices`: exit layer 5 is outside 1..=4"
        );
        let e = GptNeoConfig::from_json(r#"{"model_type":"llama"}"#, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("c.json: field `model_type`: unsupported"),
            "{e}"
        );
        let e = GptNeoConfig::from_json(r#"{"model_type":"gpt_neo"}"#, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "c.json: field `vocab_size`: missing");
    }
}
