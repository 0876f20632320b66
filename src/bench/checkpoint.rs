//! Writes a multi-exit GPT-Neo checkpoint with seeded random weights in the real format
//! (`config.json` + float32 `model.safetensors`, no `lm_head.weight`, exit heads under
//! `name_to_lm_exit_head`), so the benchmark needs no download.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The shape of `EleutherAI/gpt-neo-125m` with exits at 2, 4, ..., 12.
pub struct Shape {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub positions: usize,
    pub window: usize,
    pub exits: Vec<usize>,
}

impl Shape {
    pub fn gpt_neo_125m() -> Self {
        Self {
            vocab: 50257,
            hidden: 768,
            layers: 12,
            heads: 12,
            positions: 2048,
            window: 256,
            exits: vec![2, 4, 6, 8, 10, 12],
        }
    }

    /// (name, shape, init) of every stored tensor, in file order.
    fn tensors(&self) -> Vec<(String, Vec<usize>, Init)> {
        let (h, v) = (self.hidden, self.vocab);
        let mut t = vec![
            (
                "transformer.wte.weight".to_string(),
                vec![v, h],
                Init::Normal,
            ),
            (
                "transformer.wpe.weight".to_string(),
                vec![self.positions, h],
                Init::Normal,
            ),
        ];
        for i in 0..self.layers {
            let p = format!("transformer.h.{i}");
            for ln in ["ln_1", "ln_2"] {
                t.push((format!("{p}.{ln}.weight"), vec![h], Init::One));
                t.push((format!("{p}.{ln}.bias"), vec![h], Init::Zero));
            }
            for proj in ["q_proj", "k_proj", "v_proj"] {
                t.push((
                    format!("{p}.attn.attention.{proj}.weight"),
                    vec![h, h],
                    Init::Normal,
                ));
            }
            t.push((
                format!("{p}.attn.attention.out_proj.weight"),
                vec![h, h],
                Init::Normal,
            ));
            t.push((
                format!("{p}.attn.attention.out_proj.bias"),
                vec![h],
                Init::Zero,
            ));
            t.push((format!("{p}.mlp.c_fc.weight"), vec![4 * h, h], Init::Normal));
            t.push((format!("{p}.mlp.c_fc.bias"), vec![4 * h], Init::Zero));
            t.push((
                format!("{p}.mlp.c_proj.weight"),
                vec![h, 4 * h],
                Init::Normal,
            ));
            t.push((format!("{p}.mlp.c_proj.bias"), vec![h], Init::Zero));
        }
        t.push(("transformer.ln_f.weight".to_string(), vec![h], Init::One));
        t.push(("transformer.ln_f.bias".to_string(), vec![h], Init::Zero));
        for &l in &self.exits {
            t.push((
                format!("name_to_lm_exit_head.lm_head_{l}.weight"),
                vec![v, h],
                Init::Normal,
            ));
        }
        t
    }

    fn config_json(&self) -> String {
        serde_json::json!({
            "model_type": "gpt_neo",
            "architectures": ["MultiHeadGPTNeo"],
            "activation_function": "gelu_new",
            "attention_types": [[["global", "local"], self.layers / 2]],
            "attention_dropout": 0.0,
            "embed_dropout": 0.0,
            "resid_dropout": 0.0,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": null,
            "layer_norm_epsilon": 1e-5,
            "lm_head_layer_indices": self.exits.iter().rev().collect::<Vec<_>>(),
            "max_position_embeddings": self.positions,
            "num_heads": self.heads,
            "num_layers": self.layers,
            "output_hidden_states": true,
            "torch_dtype": "float32",
            "use_cache": true,
            "vocab_size": self.vocab,
            "window_size": self.window,
        })
        .to_string()
    }
}

#[derive(Clone, Copy)]
enum Init {
    Normal,
    One,
    Zero,
}

/// xorshift64*: fast, seeded, good enough for random weights.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Approximately N(0, 0.02²): a sum of four uniforms, rescaled.
    fn normal(&mut self) -> f32 {
        let s = self.next_f32() + self.next_f32() + self.next_f32() + self.next_f32() - 2.0;
        s * 0.02 * (3.0f32).sqrt()
    }
}

/// Writes the checkpoint into `dir` unless it is already complete; returns its weight bytes.
/// Tokenizer files are copied from `tokenizer_from`.
pub fn ensure(dir: &Path, shape: &Shape, tokenizer_from: &Path) -> std::io::Result<u64> {
    let tensors = shape.tensors();
    let data_bytes: u64 = tensors
        .iter()
        .map(|(_, s, _)| s.iter().product::<usize>() as u64 * 4)
        .sum();
    let weights = dir.join("model.safetensors");
    let done = dir.join(".complete");
    if done.exists() {
        return Ok(data_bytes);
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), shape.config_json())?;
    for f in [
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let src: PathBuf = tokenizer_from.join(f);
        if src.exists() {
            std::fs::copy(&src, dir.join(f))?;
        }
    }
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0u64;
    for (name, s, _) in &tensors {
        let bytes = s.iter().product::<usize>() as u64 * 4;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": s, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut head = serde_json::Value::Object(header).to_string().into_bytes();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let tmp = dir.join("model.safetensors.partial");
    let mut out = BufWriter::with_capacity(1 << 22, std::fs::File::create(&tmp)?);
    out.write_all(&(head.len() as u64).to_le_bytes())?;
    out.write_all(&head)?;
    let mut rng = Rng(0x005E_ED0F_E817);
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 22);
    for (_, s, init) in &tensors {
        let n: usize = s.iter().product();
        for _ in 0..n {
            let x = match init {
                Init::Normal => rng.normal(),
                Init::One => 1.0,
                Init::Zero => 0.0,
            };
            buf.extend_from_slice(&x.to_le_bytes());
            if buf.len() >= 1 << 22 {
                out.write_all(&buf)?;
                buf.clear();
            }
        }
    }
    out.write_all(&buf)?;
    out.flush()?;
    drop(out);
    std::fs::rename(&tmp, &weights)?;
    std::fs::write(&done, b"")?;
    Ok(data_bytes)
}
