//! GPT-Neo with exit heads, following `transformers/models/gpt_neo/modeling_gpt_neo.py`.
//!
//! The forward works on a *packed* batch: the new tokens of every sequence are concatenated
//! into one `(tokens, hidden)` matrix, so the dense layers run once for the whole batch while
//! attention runs per sequence against its own cache (no padding, so a sequence computes the
//! same values alone or in any batch). Sequences are ordered by depth, deepest first: the rows
//! still needed at a layer are a prefix, and a sequence decoding from exit L is dropped from the
//! matrix after block L.

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};
use rayon::prelude::*;

use super::config::{Activation, AttentionKind, GptNeoConfig};
use super::error::{ModelError, Result};
use super::fastmath;
use super::kv_cache::KvCache;
use super::mode::Head;
use super::skinny_matmul::{self, PackedWeight};

/// How the projection and vocabulary matrices are stored and multiplied. Norms, position
/// embeddings, biases and activations stay float32 in every case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    /// Exact parity with the reference.
    F32,
    F16,
    /// With a bfloat16 KV cache.
    Bf16,
    /// Symmetric int8 with one float32 scale per output row, multiplied by the skinny
    /// kernels (x86-64 with AVX-512 VNNI only) with activations rounded to int16; with a
    /// bfloat16 KV cache.
    Int8,
}

impl WeightDtype {
    /// The dtype the matrices are read into (int8 is quantized from float32 while packing).
    pub fn load_dtype(self) -> DType {
        match self {
            WeightDtype::F32 | WeightDtype::Int8 => DType::F32,
            WeightDtype::F16 => DType::F16,
            WeightDtype::Bf16 => DType::BF16,
        }
    }

    fn kv_dtype(self) -> DType {
        match self {
            WeightDtype::Bf16 | WeightDtype::Int8 => DType::BF16,
            WeightDtype::F32 | WeightDtype::F16 => DType::F32,
        }
    }
}

/// A matmul weight `(out, in)`: packed for the skinny AVX-512 kernels on CPUs that have them
/// (unless `--matmul candle`), else a plain tensor for candle's matmul (GPU, other CPUs).
enum Weight {
    Plain(Tensor),
    Packed(PackedWeight),
}

impl Weight {
    /// `w` as read (in `spec.dtype.load_dtype()`), packed or quantized as `spec` says.
    fn new(w: Tensor, spec: WeightSpec) -> candle_core::Result<Self> {
        let cpu_kernels = spec.skinny && w.device().is_cpu();
        if spec.dtype == WeightDtype::Int8 {
            if !(cpu_kernels && skinny_matmul::supports_int8()) {
                candle_core::bail!(
                    "int8 weights need the skinny CPU kernels: an x86-64 CPU with AVX-512 \
                     VNNI, and --matmul auto"
                );
            }
            Ok(Weight::Packed(PackedWeight::pack_int8(&w)?))
        } else if cpu_kernels && skinny_matmul::supported(w.dtype()) {
            Ok(Weight::Packed(PackedWeight::pack(&w)?))
        } else {
            Ok(Weight::Plain(w))
        }
    }

    /// `x Wᵀ` for float32 `x`; a reduced-precision plain weight gets `x` cast to its dtype and
    /// the result back as float32.
    fn xwt(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Weight::Packed(p) => p.xwt(x),
            Weight::Plain(w) if w.dtype() == x.dtype() => x.matmul(&w.t()?),
            Weight::Plain(w) => x.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(DType::F32),
        }
    }

    /// Rows `ids` as float32 (embedding lookup).
    fn rows(&self, ids: &[u32], device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Weight::Packed(p) => p.gather_rows(ids),
            Weight::Plain(w) => w
                .index_select(&Tensor::new(ids, device)?, 0)?
                .to_dtype(DType::F32),
        }
    }
}

/// How projection weights are stored and multiplied.
#[derive(Debug, Clone, Copy)]
struct WeightSpec {
    dtype: WeightDtype,
    skinny: bool,
}

/// A linear layer (`weight` is `(out, in)` as in PyTorch); the bias stays float32.
struct Proj {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Proj {
    fn new(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: VarBuilder,
        wdtype: WeightSpec,
    ) -> candle_core::Result<Self> {
        let weight = vb
            .to_dtype(wdtype.dtype.load_dtype())
            .get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self {
            weight: Weight::new(weight, wdtype)?,
            bias,
        })
    }
}

impl Proj {
    /// Bias-free projections `names` (each `(out, in)`) stacked along the output dimension.
    fn stacked(
        in_dim: usize,
        out_dim: usize,
        names: &[&str],
        vb: &VarBuilder,
        w: WeightSpec,
    ) -> candle_core::Result<Self> {
        let parts = names
            .iter()
            .map(|n| {
                vb.pp(*n)
                    .to_dtype(w.dtype.load_dtype())
                    .get((out_dim, in_dim), "weight")
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            weight: Weight::new(Tensor::cat(&parts, 0)?, w)?,
            bias: None,
        })
    }
}

impl Module for Proj {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.weight.xwt(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

struct SelfAttention {
    /// `q_proj`, `k_proj` and `v_proj` stacked into one `(3 hidden, hidden)` weight: one
    /// matmul (one pass over x, one parallel dispatch) instead of three.
    qkv: Proj,
    out_proj: Proj,
    kind: AttentionKind,
    num_heads: usize,
    head_dim: usize,
    window: usize,
}

impl SelfAttention {
    fn new(
        cfg: &GptNeoConfig,
        kind: AttentionKind,
        vb: VarBuilder,
        wdtype: WeightSpec,
    ) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            qkv: Proj::stacked(h, h, &["q_proj", "k_proj", "v_proj"], &vb, wdtype)?,
            out_proj: Proj::new(h, h, true, vb.pp("out_proj"), wdtype)?,
            kind,
            num_heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
            window: cfg.window_size,
        })
    }

    /// `x`: `(rows, hidden)` packed as described by `segments`.
    fn forward(
        &self,
        x: &Tensor,
        segments: &mut [Segment<'_>],
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        let h = self.num_heads * self.head_dim;
        let qkv = self.qkv.forward(x)?; // (rows, 3 hidden)
        let q = qkv.narrow(1, 0, h)?;
        let k = qkv.narrow(1, h, h)?;
        let v = qkv.narrow(1, 2 * h, h)?;
        // Sequences attend to their own caches independently: spread them over the cores.
        let mut outs = segments
            .par_iter_mut()
            .map(|seg| self.attend_one(&q, &k, &v, seg, layer))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let out = if outs.len() == 1 {
            outs.pop().expect("one")
        } else {
            Tensor::cat(&outs, 0)?
        };
        self.out_proj.forward(&out)
    }

    fn split_heads(&self, t: &Tensor, start: usize, len: usize) -> candle_core::Result<Tensor> {
        // (len, hidden) -> (len, heads, head_dim) -> (heads, len, head_dim)
        t.narrow(0, start, len)?
            .reshape((len, self.num_heads, self.head_dim))?
            .transpose(0, 1)?
            .contiguous()
    }

    /// The oldest key a step starting at position `offset` reads: a local layer's first query
    /// sees keys after `offset - window`, and older keys are masked for every query of the
    /// step, so they are not read at all.
    fn first_key(&self, offset: usize) -> usize {
        match self.kind {
            AttentionKind::Global => 0,
            AttentionKind::Local => (offset + 1).saturating_sub(self.window),
        }
    }

    fn attend_one(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seg: &mut Segment<'_>,
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        let (start, len) = (seg.start, seg.len);
        if len == 1 && q.device().is_cpu() && q.dtype() == DType::F32 {
            return self.attend_one_token_cpu(q, k, v, seg, layer);
        }
        let offset = seg.cache.len();
        let q = self.split_heads(q, start, len)?;
        let (keys, values) = seg.cache.append(
            layer,
            &self.split_heads(k, start, len)?,
            &self.split_heads(v, start, len)?,
        )?;
        let total = offset + len;
        let first_key = self.first_key(offset);
        // (heads, klen, head_dim), as float32
        let keys = keys
            .narrow(1, first_key, total - first_key)?
            .to_dtype(DType::F32)?;
        let values = values
            .narrow(1, first_key, total - first_key)?
            .to_dtype(DType::F32)?;
        // GPT-Neo does not scale scores by 1/sqrt(head_dim).
        let mut scores = q.matmul(&keys.t()?)?; // (heads, len, klen)
        if len > 1 {
            let mask = self.mask(offset, len, first_key, total, q.device())?;
            scores = scores.broadcast_add(&mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        // (heads, len, head_dim) -> (len, heads, head_dim) -> (len, hidden)
        probs
            .matmul(&values)?
            .transpose(0, 1)?
            .reshape((len, self.num_heads * self.head_dim))
    }

    /// The decode step of one sequence on the CPU: the same computation as the tensor path,
    /// done on the raw rows and cache buffers, because at one query the ~20 small tensor ops
    /// per layer cost more than the arithmetic.
    fn attend_one_token_cpu(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seg: &mut Segment<'_>,
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        let (heads, hd) = (self.num_heads, self.head_dim);
        let row = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
            // (1, hidden) of this sequence -> (heads, 1, head_dim): the same memory order
            t.narrow(0, seg.start, 1)?.flatten_all()?.to_vec1::<f32>()
        };
        let q = row(q)?;
        let offset = seg.cache.len();
        let (keys, values) = seg.cache.append(
            layer,
            &Tensor::from_vec(row(k)?, (heads, 1, hd), &Device::Cpu)?,
            &Tensor::from_vec(row(v)?, (heads, 1, hd), &Device::Cpu)?,
        )?;
        let total = offset + 1;
        let first_key = self.first_key(offset);
        let (k_store, k_layout) = keys.storage_and_layout();
        let (v_store, v_layout) = values.storage_and_layout();
        // (heads, capacity, head_dim) buffers: a head's keys first_key..total are contiguous
        let span = |layout: &candle_core::Layout, h: usize| {
            let start = layout.start_offset() + h * layout.stride()[0] + first_key * hd;
            start..start + (total - first_key) * hd
        };
        let mut out = vec![0f32; heads * hd];
        let mut scores = vec![0f32; total - first_key];
        let heads_out = out.chunks_exact_mut(hd).zip(q.chunks_exact(hd)).enumerate();
        match (&*k_store, &*v_store) {
            (candle_core::Storage::Cpu(kc), candle_core::Storage::Cpu(vc)) => match keys.dtype() {
                DType::BF16 => {
                    let (kb, vb) = (kc.as_slice::<half::bf16>()?, vc.as_slice::<half::bf16>()?);
                    for (h, (oh, qh)) in heads_out {
                        let (keys, values) = (&kb[span(k_layout, h)], &vb[span(v_layout, h)]);
                        fastmath::attend_head_bf16(qh, keys, values, &mut scores, oh);
                    }
                }
                _ => {
                    let (kb, vb) = (kc.as_slice::<f32>()?, vc.as_slice::<f32>()?);
                    for (h, (oh, qh)) in heads_out {
                        let (keys, values) = (&kb[span(k_layout, h)], &vb[span(v_layout, h)]);
                        fastmath::attend_head_f32(qh, keys, values, &mut scores, oh);
                    }
                }
            },
            _ => candle_core::bail!("CPU attention on non-CPU caches"),
        }
        Tensor::from_vec(out, (1, heads * hd), &Device::Cpu)
    }

    /// `(len, klen)`: 0 where query `offset+i` may see key `first_key+j`, -inf elsewhere
    /// (causal, and within the window on local layers).
    fn mask(
        &self,
        offset: usize,
        len: usize,
        first_key: usize,
        total: usize,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let klen = total - first_key;
        let mut m = vec![0f32; len * klen];
        for i in 0..len {
            let p = offset + i;
            for j in 0..klen {
                let key = first_key + j;
                let visible =
                    key <= p && (self.kind == AttentionKind::Global || p - key < self.window);
                if !visible {
                    m[i * klen + j] = f32::NEG_INFINITY;
                }
            }
        }
        Tensor::from_vec(m, (len, klen), device)
    }
}

struct Mlp {
    c_fc: Proj,
    c_proj: Proj,
    activation: Activation,
}

impl Mlp {
    fn new(cfg: &GptNeoConfig, vb: VarBuilder, wdtype: WeightSpec) -> candle_core::Result<Self> {
        Ok(Self {
            c_fc: Proj::new(
                cfg.hidden_size,
                cfg.intermediate_size,
                true,
                vb.pp("c_fc"),
                wdtype,
            )?,
            c_proj: Proj::new(
                cfg.intermediate_size,
                cfg.hidden_size,
                true,
                vb.pp("c_proj"),
                wdtype,
            )?,
            activation: cfg.activation,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.c_fc.forward(x)?;
        let h = match self.activation {
            Activation::GeluTanh if h.device().is_cpu() && h.dtype() == DType::F32 => {
                h.apply_op1_no_bwd(&fastmath::GeluTanh)?
            }
            Activation::GeluTanh => h.gelu()?,
            Activation::GeluErf => h.gelu_erf()?,
            Activation::Relu => h.relu()?,
            Activation::Silu => h.silu()?,
        };
        self.c_proj.forward(&h)
    }
}

struct Block {
    ln_1: LayerNorm,
    attn: SelfAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn new(
        cfg: &GptNeoConfig,
        layer: usize,
        vb: VarBuilder,
        wdtype: WeightSpec,
    ) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let eps = cfg.layer_norm_epsilon;
        Ok(Self {
            ln_1: layer_norm(h, eps, vb.pp("ln_1"))?,
            attn: SelfAttention::new(
                cfg,
                cfg.attention_layers[layer],
                vb.pp("attn.attention"),
                wdtype,
            )?,
            ln_2: layer_norm(h, eps, vb.pp("ln_2"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"), wdtype)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        segments: &mut [Segment<'_>],
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        let h = (x + self.attn.forward(&self.ln_1.forward(x)?, segments, layer)?)?;
        &h + self.mlp.forward(&self.ln_2.forward(&h)?)?
    }
}

/// One sequence's part of a forward step.
pub struct SeqStep<'a> {
    /// New tokens: a prompt chunk, or the one token sampled last step.
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    /// Blocks to run (the mode's depth); the cache of layers above stays empty.
    pub depth: usize,
    /// Heads wanted at the last new position; empty in the middle of a chunked prefill.
    pub heads: &'a [Head],
    /// Evaluate the heads at every new position, not just the last (prompt logprobs).
    pub all_positions: bool,
}

/// A sequence's rows in the packed matrix.
struct Segment<'s> {
    start: usize,
    len: usize,
    cache: &'s mut KvCache,
}

/// The packed layout of a step, in depth order.
struct Packed<'p> {
    starts: &'p [usize],
    lens: &'p [usize],
    heads: &'p [Vec<Head>],
    all_positions: &'p [bool],
    order: &'p [usize],
}

/// Counters used by tests and metrics to check the work skipped by early exits.
#[derive(Debug, Default)]
pub struct ForwardStats {
    /// Block evaluations, counted once per sequence per block.
    pub block_evals: AtomicU64,
}

pub struct MultiExitGptNeo {
    cfg: GptNeoConfig,
    /// `(vocab, hidden)`: the token embedding, and the original head when tied.
    wte: Weight,
    wpe: Tensor, // (positions, hidden)
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// `lm_head.weight` when the checkpoint has one; None = tied to `wte` (as on the hub).
    lm_head: Option<Weight>, // (vocab, hidden)
    /// `(layer, weight (vocab, hidden))`, ascending by layer.
    exit_heads: Vec<(usize, Weight)>,
    device: Device,
    /// bfloat16 caches for bfloat16 and int8 weights (half the memory per token, and the
    /// values are no less exact than the weights that made them); float32 otherwise.
    kv_dtype: DType,
    pub stats: ForwardStats,
}

/// Maps candle's loading errors (missing tensor, shape mismatch) to one naming the tensor.
fn named<T>(name: &str, r: candle_core::Result<T>) -> Result<T> {
    r.map_err(|e| ModelError::Tensor {
        name: name.to_string(),
        message: e.to_string().lines().next().unwrap_or_default().to_string(),
    })
}

impl MultiExitGptNeo {
    /// Builds the model from a float32 `VarBuilder` rooted at the checkpoint's top level;
    /// projection and vocabulary weights are kept in `wdtype`, multiplied by the skinny CPU
    /// kernels when `skinny` (and the CPU has them).
    pub fn new(
        cfg: GptNeoConfig,
        vb: VarBuilder,
        wdtype: WeightDtype,
        skinny: bool,
    ) -> Result<Self> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let t = vb.pp("transformer");
        let vw = vb.to_dtype(wdtype.load_dtype());
        let spec = WeightSpec {
            dtype: wdtype,
            skinny,
        };
        // One copy of wte serves as the embedding and as the tied original head.
        let wte = named(
            "transformer.wte.weight",
            vw.get((v, h), "transformer.wte.weight"),
        )?;
        let device = wte.device().clone();
        let wte = named("transformer.wte.weight", Weight::new(wte, spec))?;
        // The vocabulary-sized matrices load first, while little else is resident: each
        // passes through a transient copy (read, pack) that then counts the least.
        let weight = |name: &str| -> Result<Weight> {
            let w = named(name, vw.get((v, h), name))?;
            named(name, Weight::new(w, spec))
        };
        let lm_head = if vb.contains_tensor("lm_head.weight") {
            Some(weight("lm_head.weight")?)
        } else {
            None
        };
        let exit_heads = cfg
            .exit_layers
            .iter()
            .map(|&l| {
                Ok((
                    l,
                    weight(&format!("name_to_lm_exit_head.lm_head_{l}.weight"))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let wpe = named(
            "transformer.wpe.weight",
            t.get((cfg.max_position_embeddings, h), "wpe.weight"),
        )?;
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let name = format!("transformer.h.{i}");
                named(&name, Block::new(&cfg, i, t.pp(format!("h.{i}")), spec))
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = named(
            "transformer.ln_f",
            layer_norm(h, cfg.layer_norm_epsilon, t.pp("ln_f")),
        )?;
        Ok(Self {
            device,
            kv_dtype: wdtype.kv_dtype(),
            cfg,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            exit_heads,
            stats: ForwardStats::default(),
        })
    }

    pub fn config(&self) -> &GptNeoConfig {
        &self.cfg
    }

    pub fn new_cache(&self) -> KvCache {
        self.new_cache_for(self.cfg.max_position_embeddings)
    }

    /// A cache that never grows past `positions` (what the sequence reserved), so that the
    /// engine's KV-token budget bounds the memory actually allocated.
    pub fn new_cache_for(&self, positions: usize) -> KvCache {
        KvCache::new(
            self.cfg.num_layers,
            positions.min(self.cfg.max_position_embeddings),
            self.kv_dtype,
        )
    }

    /// Bytes one cached position takes in every layer (keys and values).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.cfg.num_layers * self.cfg.hidden_size * self.kv_dtype.size_in_bytes()
    }

    fn head_weight(&self, head: Head) -> Result<&Weight> {
        match head {
            Head::Original => Ok(self.lm_head.as_ref().unwrap_or(&self.wte)),
            Head::Exit(layer) => self
                .exit_heads
                .iter()
                .find(|(l, _)| *l == layer)
                .map(|(_, w)| w)
                .ok_or_else(|| ModelError::NotAnExit {
                    layer,
                    available: self.cfg.exit_layers.clone(),
                }),
        }
    }

    /// Runs one step for a batch of sequences, appending to their caches. Returns, per
    /// sequence and per head of `SeqStep::heads` (in that order), the logits (`vocab` floats)
    /// at its last new position, or at every new position with `all_positions`.
    pub fn forward(&self, steps: &mut [SeqStep<'_>]) -> Result<Vec<Vec<Vec<Vec<f32>>>>> {
        for s in steps.iter() {
            self.check_step(s)?;
        }
        // Deepest first, so the rows still needed at each layer are a prefix.
        let mut order: Vec<usize> = (0..steps.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(steps[i].depth));

        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut starts = Vec::with_capacity(order.len());
        for &i in &order {
            let s = &steps[i];
            starts.push(ids.len());
            let offset = s.cache.len() as u32;
            ids.extend_from_slice(s.tokens);
            positions.extend((0..s.tokens.len() as u32).map(|p| offset + p));
        }
        let total_rows = ids.len();
        let mut outputs: Vec<Vec<Vec<Vec<f32>>>> = steps
            .iter()
            .map(|s| vec![Vec::new(); s.heads.len()])
            .collect();
        if total_rows == 0 {
            return Ok(outputs);
        }
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        // (rows, hidden)
        let tokens = self.wte.rows(&ids, &self.device)?;
        let mut x = (tokens + self.wpe.index_select(&positions, 0)?)?;

        let max_depth = order.first().map_or(0, |&i| steps[i].depth);
        let depths: Vec<usize> = order.iter().map(|&i| steps[i].depth).collect();
        let lens: Vec<usize> = order.iter().map(|&i| steps[i].tokens.len()).collect();
        let heads: Vec<Vec<Head>> = order.iter().map(|&i| steps[i].heads.to_vec()).collect();
        let all_positions: Vec<bool> = order.iter().map(|&i| steps[i].all_positions).collect();
        {
            // Segments borrow the caches in packed order.
            let mut by_index: Vec<Option<&mut KvCache>> =
                steps.iter_mut().map(|s| Some(&mut *s.cache)).collect();
            let mut segments: Vec<Segment<'_>> = order
                .iter()
                .enumerate()
                .map(|(slot, &i)| Segment {
                    start: starts[slot],
                    len: lens[slot],
                    cache: by_index[i].take().expect("each index once"),
                })
                .collect();
            for layer in 0..max_depth {
                let active = depths.iter().take_while(|&&d| d > layer).count();
                let rows = starts.get(active).copied().unwrap_or(total_rows);
                if rows < x.dim(0)? {
                    x = x.narrow(0, 0, rows)?;
                }
                x = self.blocks[layer].forward(&x, &mut segments[..active], layer)?;
                self.stats
                    .block_evals
                    .fetch_add(active as u64, Ordering::Relaxed);
                let packed = Packed {
                    starts: &starts,
                    lens: &lens,
                    heads: &heads[..active],
                    all_positions: &all_positions,
                    order: &order,
                };
                self.eval_heads(layer + 1, &x, &packed, &mut outputs)?;
            }
            for seg in segments.iter_mut() {
                seg.cache.advance(seg.len);
            }
        }
        Ok(outputs)
    }

    fn check_step(&self, s: &SeqStep<'_>) -> Result<()> {
        let n = self.cfg.num_layers;
        let bad = |m: String| ModelError::Tensor {
            name: "(step)".into(),
            message: m,
        };
        if s.depth == 0 || s.depth > n {
            return Err(bad(format!("depth {} outside 1..={n}", s.depth)));
        }
        if let Some(h) = s.heads.iter().find(|h| h.layer(n) > s.depth) {
            return Err(bad(format!("head {h:?} lies above depth {}", s.depth)));
        }
        let end = s.cache.len() + s.tokens.len();
        if end > self.cfg.max_position_embeddings {
            return Err(bad(format!(
                "{end} positions exceed max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        if let Some(&t) = s
            .tokens
            .iter()
            .find(|&&t| t as usize >= self.cfg.vocab_size)
        {
            return Err(bad(format!(
                "token id {t} >= vocab size {}",
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// Evaluates, after block `layer`, every head reading that layer, batched over the
    /// sequences that want it, on their last rows only (or all rows with `all_positions`).
    fn eval_heads(
        &self,
        layer: usize,
        x: &Tensor,
        p: &Packed<'_>,
        outputs: &mut [Vec<Vec<Vec<f32>>>],
    ) -> Result<()> {
        let n_layers = self.cfg.num_layers;
        let mut wanted: Vec<Head> = Vec::new();
        for hs in p.heads {
            for &h in hs {
                if h.layer(n_layers) == layer && !wanted.contains(&h) {
                    wanted.push(h);
                }
            }
        }
        for head in wanted {
            // (slot in packed order, index into that sequence's head list, rows wanted)
            let mut users: Vec<(usize, usize, usize)> = Vec::new();
            let mut rows: Vec<u32> = Vec::new();
            for (slot, hs) in p.heads.iter().enumerate() {
                for (k, _) in hs.iter().enumerate().filter(|(_, &h)| h == head) {
                    let end = p.starts[slot] + p.lens[slot];
                    let first = if p.all_positions[slot] {
                        p.starts[slot]
                    } else {
                        end - 1
                    };
                    rows.extend(first as u32..end as u32);
                    users.push((slot, k, end - first));
                }
            }
            let rows_t = Tensor::new(rows.as_slice(), &self.device)?;
            // (rows, hidden) -> (rows, vocab)
            let hidden = self.ln_f.forward(&x.index_select(&rows_t, 0)?)?;
            let logits = self.head_weight(head)?.xwt(&hidden)?.to_vec2::<f32>()?;
            let mut logits = logits.into_iter();
            for (slot, k, count) in users {
                outputs[p.order[slot]][k] = logits.by_ref().take(count).collect();
            }
        }
        Ok(())
    }

    /// Raw logits of every head at the last position of `tokens` (fresh cache): used to
    /// check the loaded weights against reference checksums.
    pub fn all_head_logits(&self, tokens: &[u32]) -> Result<Vec<(Head, Vec<f32>)>> {
        let mut cache = self.new_cache();
        let mut heads: Vec<Head> = self
            .cfg
            .exit_layers
            .iter()
            .map(|&l| Head::Exit(l))
            .collect();
        heads.push(Head::Original);
        let mut step = [SeqStep {
            tokens,
            cache: &mut cache,
            depth: self.cfg.num_layers,
            heads: &heads,
            all_positions: false,
        }];
        let out = self
            .forward(&mut step)?
            .into_iter()
            .next()
            .unwrap_or_default();
        Ok(heads
            .into_iter()
            .zip(out)
            .map(|(h, mut rows)| (h, rows.pop().unwrap_or_default()))
            .collect())
    }
}
