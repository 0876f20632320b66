//! Writes a multi-exit checkpoint (GPT-Neo or GPT-2) with seeded random weights in the real
//! format (`config.json` + float32 `model.safetensors`, no `lm_head.weight`, exit heads under
//! `name_to_lm_exit_head`, GPT-2's projections as `Conv1D` `(in, out)`), so the benchmark
//! needs no download.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    /// `EleutherAI/gpt-neo-125m` with exits at 2, 4, ..., 12 (1.43 GB in f32).
    #[value(name = "gpt_neo")]
    GptNeo,
    /// `gpt2-medium` with exits at 2, 4, ..., 24 (3.9 GB in f32).
    #[value(name = "gpt2")]
    Gpt2,
}

/// How a checkpoint departs from plain random weights, for the speculative benchmark: the
/// blocks from `quiet_from` (0-based) up add their residual outputs scaled by `upper_scale`,
/// so the hidden state there stays close to the top's, and every exit head is a copy of the
/// token embedding (the tied original head). `upper_scale` then sets how often an exit at or
/// above `quiet_from` predicts what the original head predicts: 0 always, larger less often.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agreement {
    pub quiet_from: usize,
    pub upper_scale: f32,
}

pub struct Shape {
    pub arch: Arch,
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub positions: usize,
    /// GPT-Neo's local attention window.
    pub window: usize,
    pub exits: Vec<usize>,
}

impl Shape {
    pub fn of(arch: Arch) -> Self {
        match arch {
            Arch::GptNeo => Self {
                arch,
                vocab: 50257,
                hidden: 768,
                layers: 12,
                heads: 12,
                positions: 2048,
                window: 256,
                exits: (1..=6).map(|i| 2 * i).collect(),
            },
            Arch::Gpt2 => Self {
                arch,
                vocab: 50257,
                hidden: 1024,
                layers: 24,
                heads: 16,
                positions: 1024,
                window: 0,
                exits: (1..=12).map(|i| 2 * i).collect(),
            },
        }
    }

    /// The exit nearest half depth (the contrast's lower layer, as in the reference bench).
    pub fn half_exit(&self) -> usize {
        *self
            .exits
            .iter()
            .min_by_key(|&&e| (2 * e).abs_diff(self.layers))
            .expect("exits")
    }

    /// (name, shape, init) of every stored tensor, in file order.
    fn tensors(&self, agreement: Option<Agreement>) -> Vec<(String, Vec<usize>, Init)> {
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
            // The projections that write into the residual stream.
            let residual = match agreement {
                Some(a) if i >= a.quiet_from => Init::Scaled(a.upper_scale),
                _ => Init::Normal,
            };
            let mut proj = |name: String, shape: Vec<usize>, bias: Option<usize>| {
                let init = if name.ends_with("out_proj") || name.ends_with("c_proj") {
                    residual
                } else {
                    Init::Normal
                };
                t.push((format!("{name}.weight"), shape, init));
                if let Some(b) = bias {
                    t.push((format!("{name}.bias"), vec![b], Init::Zero));
                }
            };
            match self.arch {
                // nn.Linear: (out, in)
                Arch::GptNeo => {
                    for qkv in ["q_proj", "k_proj", "v_proj"] {
                        proj(format!("{p}.attn.attention.{qkv}"), vec![h, h], None);
                    }
                    proj(format!("{p}.attn.attention.out_proj"), vec![h, h], Some(h));
                    proj(format!("{p}.mlp.c_fc"), vec![4 * h, h], Some(4 * h));
                    proj(format!("{p}.mlp.c_proj"), vec![h, 4 * h], Some(h));
                }
                // Conv1D: (in, out)
                Arch::Gpt2 => {
                    proj(format!("{p}.attn.c_attn"), vec![h, 3 * h], Some(3 * h));
                    proj(format!("{p}.attn.c_proj"), vec![h, h], Some(h));
                    proj(format!("{p}.mlp.c_fc"), vec![h, 4 * h], Some(4 * h));
                    proj(format!("{p}.mlp.c_proj"), vec![4 * h, h], Some(h));
                }
            }
        }
        t.push(("transformer.ln_f.weight".to_string(), vec![h], Init::One));
        t.push(("transformer.ln_f.bias".to_string(), vec![h], Init::Zero));
        for &l in &self.exits {
            t.push((
                format!("name_to_lm_exit_head.lm_head_{l}.weight"),
                vec![v, h],
                if agreement.is_some() {
                    Init::Embedding
                } else {
                    Init::Normal
                },
            ));
        }
        t
    }

    fn config_json(&self) -> String {
        let exits: Vec<_> = self.exits.iter().rev().collect();
        let common = serde_json::json!({
            "activation_function": "gelu_new",
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "initializer_range": 0.02,
            "layer_norm_epsilon": 1e-5,
            "lm_head_layer_indices": exits,
            "output_hidden_states": true,
            "torch_dtype": "float32",
            "use_cache": true,
            "vocab_size": self.vocab,
        });
        let own = match self.arch {
            Arch::GptNeo => serde_json::json!({
                "model_type": "gpt_neo",
                "architectures": ["MultiHeadGPTNeo"],
                "attention_types": [[["global", "local"], self.layers / 2]],
                "attention_dropout": 0.0,
                "embed_dropout": 0.0,
                "resid_dropout": 0.0,
                "hidden_size": self.hidden,
                "intermediate_size": null,
                "max_position_embeddings": self.positions,
                "num_heads": self.heads,
                "num_layers": self.layers,
                "window_size": self.window,
            }),
            Arch::Gpt2 => serde_json::json!({
                "model_type": "gpt2",
                "architectures": ["MultiHeadGPT2"],
                "attn_pdrop": 0.0,
                "embd_pdrop": 0.0,
                "resid_pdrop": 0.0,
                "n_embd": self.hidden,
                "n_head": self.heads,
                "n_inner": null,
                "n_layer": self.layers,
                "n_positions": self.positions,
                "scale_attn_weights": true,
                "scale_attn_by_inverse_layer_idx": false,
                "reorder_and_upcast_attn": false,
            }),
        };
        let mut all = common.as_object().cloned().expect("an object");
        all.extend(own.as_object().cloned().expect("an object"));
        serde_json::Value::Object(all).to_string()
    }
}

#[derive(Clone, Copy)]
enum Init {
    Normal,
    /// Normal, times this.
    Scaled(f32),
    /// The token embedding's values again (it is the first tensor drawn).
    Embedding,
    One,
    Zero,
}

const SEED: u64 = 0x005E_ED0F_E817;

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
    ensure_variant(dir, shape, tokenizer_from, None)
}

/// The variants of the checkpoint at `data` quieted from block `quiet_from` up by each of
/// `scales` (see [`Agreement`]), each written once (when the iterator reaches it) next to it
/// as `{data}-agree-{scale}` (plus `-from-{quiet_from}` when `name_quiet_from`).
pub fn agreement_variants<'a>(
    data: &'a Path,
    scales: &'a [f32],
    (shape, root): (&'a Shape, &'a Path),
    quiet_from: usize,
    name_quiet_from: bool,
) -> impl Iterator<Item = (f32, PathBuf)> + 'a {
    scales.iter().map(move |&upper_scale| {
        let from = if name_quiet_from {
            format!("-from-{quiet_from}")
        } else {
            String::new()
        };
        let dir = PathBuf::from(format!("{}-agree-{upper_scale}{from}", data.display()));
        eprintln!("variant {}", dir.display());
        let agreement = Agreement {
            quiet_from,
            upper_scale,
        };
        ensure_variant(
            &dir,
            shape,
            &root.join("tests/fixtures/tiny-gpt-neo-multiexit"),
            Some(agreement),
        )
        .expect("write the variant");
        (upper_scale, dir)
    })
}

/// As [`ensure`], with exits made to agree with the original head (see [`Agreement`]).
pub fn ensure_variant(
    dir: &Path,
    shape: &Shape,
    tokenizer_from: &Path,
    agreement: Option<Agreement>,
) -> std::io::Result<u64> {
    let tensors = shape.tensors(agreement);
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
    let mut rng = Rng(SEED);
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 22);
    for (_, s, init) in &tensors {
        let n: usize = s.iter().product();
        let mut replay = Rng(SEED);
        for _ in 0..n {
            let x = match init {
                Init::Normal => rng.normal(),
                Init::Scaled(f) => rng.normal() * f,
                Init::Embedding => replay.normal(),
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
