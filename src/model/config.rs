//! `config.json`: the architecture-independent description of a multi-exit checkpoint that
//! the rest of the model reads, parsed by the architecture named in `model_type` (each reads
//! its own HF field names: `arch/gpt_neo.rs`, `arch/gpt2.rs`), plus the multi-exit field
//! `lm_head_layer_indices`.

use std::path::Path;

use serde_json::{Map, Value};

use super::arch::Architecture;
use super::error::{ModelError, Result};

/// The activation named by `activation_function` (`gelu_new`, `gelu_pytorch_tanh` and
/// `gelu_fast` are the tanh approximation, the default of both architectures; `gelu` the
/// exact erf form): the kernels' own enum, which the fused and the unfused block both apply.
pub use crate::kernels::fused_epilogue::Activation;

fn parse_activation(name: &str) -> Option<Activation> {
    Some(match name {
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
        "gelu" => Activation::GeluErf,
        "relu" => Activation::Relu,
        "silu" | "swish" => Activation::Silu,
        _ => return None,
    })
}

/// Which earlier positions a layer's queries see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    /// Every earlier position.
    Global,
    /// Only the last `window` positions (GPT-Neo's local layers): a key at distance
    /// >= window is masked.
    Local { window: usize },
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_epsilon: f64,
    pub activation: Activation,
    /// One entry per layer.
    pub attention_layers: Vec<AttentionKind>,
    /// Attention scores divided by sqrt(head_dim) (GPT-2); GPT-Neo leaves them unscaled.
    pub scale_attention: bool,
    /// 1-based layers with an exit head, sorted ascending; empty for a plain checkpoint.
    pub exit_layers: Vec<usize>,
    pub eos_token_id: Option<u32>,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_json(&text, path)
    }

    /// Parses `text`; `path` only names the file in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let map: Map<String, Value> = serde_json::from_str(text)
            .map_err(|e| Fields::error(path, "(json)", format!("invalid JSON: {e}")))?;
        let fields = Fields { map, path };
        let model_type = fields.str("model_type")?;
        let architecture = Architecture::from_model_type(model_type).ok_or_else(|| {
            fields.err(
                "model_type",
                format!(
                    "unsupported model type `{model_type}` (this server runs {})",
                    Architecture::supported()
                ),
            )
        })?;
        architecture.parse_config(&fields)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

/// `config.json` as a JSON object, read field by field so that every error names the file
/// and the field. Architectures read their own names through it.
pub struct Fields<'a> {
    map: Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn error(path: &Path, field: &str, message: String) -> ModelError {
        ModelError::Config {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        }
    }

    pub fn err(&self, field: &str, message: String) -> ModelError {
        Self::error(self.path, field, message)
    }

    /// `field` when present (a JSON null counts as absent, as in HF's configs).
    pub fn get(&self, field: &str) -> Option<&Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    pub fn str(&self, field: &str) -> Result<&str> {
        match self.get(field) {
            None => Err(self.err(field, "missing".into())),
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.err(field, format!("expected a string, got {v}"))),
        }
    }

    /// A positive integer, or None when absent.
    pub fn opt_count(&self, field: &str) -> Result<Option<usize>> {
        let Some(v) = self.get(field) else {
            return Ok(None);
        };
        match v.as_u64() {
            Some(0) => Err(self.err(field, "must be positive".into())),
            Some(n) => usize::try_from(n)
                .map(Some)
                .map_err(|_| self.err(field, format!("{n} is too large"))),
            None => Err(self.err(field, format!("expected a positive integer, got {v}"))),
        }
    }

    /// A required positive integer.
    pub fn count(&self, field: &str) -> Result<usize> {
        self.opt_count(field)?
            .ok_or_else(|| self.err(field, "missing".into()))
    }

    pub fn f64_or(&self, field: &str, default: f64) -> Result<f64> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(field, format!("expected a number, got {v}"))),
        }
    }

    pub fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(field, format!("expected true or false, got {v}"))),
        }
    }

    /// `heads` (read from `heads_field`) must divide `hidden`.
    pub fn head_count(&self, heads_field: &str, hidden: usize) -> Result<usize> {
        let heads = self.count(heads_field)?;
        if !hidden.is_multiple_of(heads) {
            return Err(self.err(
                heads_field,
                format!("hidden size {hidden} is not divisible by {heads} heads"),
            ));
        }
        Ok(heads)
    }

    pub fn activation(&self, field: &str) -> Result<Activation> {
        let name = self.str(field)?;
        parse_activation(name).ok_or_else(|| self.err(field, format!("unsupported `{name}`")))
    }

    /// `lm_head_layer_indices`, sorted and deduplicated, each within 1..=num_layers.
    pub fn exit_layers(&self, num_layers: usize) -> Result<Vec<usize>> {
        const FIELD: &str = "lm_head_layer_indices";
        let Some(v) = self.get(FIELD) else {
            return Ok(Vec::new());
        };
        let mut layers = v
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|l| l.as_u64().map(|l| l as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| self.err(FIELD, format!("expected a list of layers, got {v}")))?;
        layers.sort_unstable();
        layers.dedup();
        if let Some(&bad) = layers.iter().find(|&&l| l == 0 || l > num_layers) {
            return Err(self.err(
                FIELD,
                format!("exit layer {bad} is outside 1..={num_layers}"),
            ));
        }
        Ok(layers)
    }

    pub fn eos_token_id(&self) -> Result<Option<u32>> {
        match self.get("eos_token_id") {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .map(Some)
                .ok_or_else(|| self.err("eos_token_id", format!("expected a token id, got {v}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEO: &str = r#"{"model_type":"gpt_neo","vocab_size":10,"hidden_size":8,"num_layers":4,
        "num_heads":2,"max_position_embeddings":16,"window_size":3,"activation_function":"gelu_new",
        "attention_types":[[["global","local"],2]]"#;

    const GPT2: &str = r#"{"model_type":"gpt2","vocab_size":10,"n_embd":8,"n_layer":4,
        "n_head":2,"n_positions":16,"n_inner":null,"activation_function":"gelu_new",
        "scale_attn_weights":true,"lm_head_layer_indices":[2,4]"#;

    fn parse(base: &str, extra: &str) -> Result<ModelConfig> {
        ModelConfig::from_json(&format!("{base}{extra}}}"), Path::new("config.json"))
    }

    fn error(base: &str, extra: &str) -> String {
        parse(base, extra).unwrap_err().to_string()
    }

    #[test]
    fn gpt_neo_expands_attention_types_and_sorts_exits() -> Result<()> {
        let c = parse(NEO, r#","lm_head_layer_indices":[4,2,1]"#)?;
        assert_eq!(c.architecture, Architecture::GptNeo);
        assert_eq!(c.exit_layers, vec![1, 2, 4]);
        assert_eq!(c.attention_layers[0], AttentionKind::Global);
        assert_eq!(c.attention_layers[1], AttentionKind::Local { window: 3 });
        assert_eq!(c.intermediate_size, 32);
        assert!(!c.scale_attention);
        Ok(())
    }

    #[test]
    fn plain_gpt_neo_has_no_exits() -> Result<()> {
        assert!(parse(NEO, "")?.exit_layers.is_empty());
        Ok(())
    }

    #[test]
    fn gpt2_reads_its_own_names() -> Result<()> {
        let c = parse(GPT2, "")?;
        assert_eq!(c.architecture, Architecture::Gpt2);
        assert_eq!(
            (
                c.hidden_size,
                c.num_layers,
                c.num_heads,
                c.max_position_embeddings
            ),
            (8, 4, 2, 16)
        );
        // n_inner null: 4 x n_embd
        assert_eq!(c.intermediate_size, 32);
        assert_eq!(c.attention_layers, vec![AttentionKind::Global; 4]);
        assert!(c.scale_attention);
        assert_eq!(c.exit_layers, vec![2, 4]);
        assert_eq!(parse(GPT2, r#","n_inner":12"#)?.intermediate_size, 12);
        Ok(())
    }

    #[test]
    fn gpt2_refuses_attention_variants_it_does_not_compute() {
        assert_eq!(
            error(GPT2, r#","scale_attn_by_inverse_layer_idx":true"#),
            "config.json: field `scale_attn_by_inverse_layer_idx`: true is not supported (only false)"
        );
        assert_eq!(
            error(GPT2, r#","reorder_and_upcast_attn":true"#),
            "config.json: field `reorder_and_upcast_attn`: true is not supported (only false)"
        );
        assert_eq!(
            error(GPT2, r#","lm_head_layer_indices":[2,6]"#),
            "config.json: field `lm_head_layer_indices`: exit layer 6 is outside 1..=4"
        );
        assert_eq!(
            error(GPT2, r#","n_head":3"#),
            "config.json: field `n_head`: hidden size 8 is not divisible by 3 heads"
        );
    }

    #[test]
    fn errors_name_file_and_field() {
        assert_eq!(
            error(NEO, r#","lm_head_layer_indices":[5]"#),
            "config.json: field `lm_head_layer_indices`: exit layer 5 is outside 1..=4"
        );
        let e = ModelConfig::from_json(r#"{"model_type":"llama"}"#, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "c.json: field `model_type`: unsupported model type `llama` (this server runs \
             `gpt_neo` and `gpt2`)"
        );
        let e = ModelConfig::from_json(r#"{"model_type":"gpt_neo"}"#, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "c.json: field `hidden_size`: missing");
        let e = ModelConfig::from_json(r#"{"model_type":"gpt2"}"#, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "c.json: field `n_embd`: missing");
    }
}
