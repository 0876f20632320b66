//! A transformer block as both architectures have it: pre-norm attention and MLP with
//! residuals (`x + attn(ln_1(x))`, then `h + mlp(ln_2(h))`), built from the projections the
//! architecture reads out of its checkpoint. On the batched path (a GPU's) what follows each
//! product runs fused (`kernels::fused_epilogue`): 12 launches a block instead of 15, or 23
//! with 16-bit weights.

use candle_core::{DType, Module, Tensor};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};

use super::arch::Projections;
use super::attention::SelfAttention;
use super::batched_attention::Plans;
use super::config::{Activation, ModelConfig};
use super::step::Segment;
use super::weights::{Proj, WeightSpec};
use crate::kernels::fused_epilogue::{add_norm, Residual};

struct Mlp {
    c_fc: Proj,
    c_proj: Proj,
    activation: Activation,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.activation.apply(&self.c_fc.forward(x)?)?;
        self.c_proj.forward(&h)
    }
}

pub(super) struct Block {
    ln_1: LayerNorm,
    attn: SelfAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
    /// Biases, activation, residuals, norms and casts by `kernels::fused_epilogue`.
    fused: bool,
}

impl Block {
    /// Block `layer` from its checkpoint folder `vb` (`transformer.h.{layer}`); `fused`: what
    /// follows its products by the fused kernels.
    pub fn new(
        cfg: &ModelConfig,
        layer: usize,
        vb: VarBuilder,
        spec: WeightSpec,
        fused: bool,
    ) -> candle_core::Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_epsilon);
        let Projections {
            qkv,
            attn_out,
            mlp_in,
            mlp_out,
        } = cfg.architecture.projections(cfg, &vb, spec)?;
        Ok(Self {
            ln_1: layer_norm(h, eps, vb.pp("ln_1"))?,
            attn: SelfAttention::new(
                qkv,
                attn_out,
                cfg.attention_layers[layer],
                cfg.num_heads,
                cfg.head_dim(),
                cfg.scale_attention,
            ),
            ln_2: layer_norm(h, eps, vb.pp("ln_2"))?,
            mlp: Mlp {
                c_fc: mlp_in,
                c_proj: mlp_out,
                activation: cfg.activation,
            },
            fused,
        })
    }

    /// The block with int8 copies of its projections: what a draft reads (`DraftWeights`).
    pub fn int8_copy(&self) -> candle_core::Result<Self> {
        Ok(Self {
            ln_1: self.ln_1.clone(),
            attn: self.attn.int8_copy()?,
            ln_2: self.ln_2.clone(),
            mlp: Mlp {
                c_fc: self.mlp.c_fc.int8_copy()?,
                c_proj: self.mlp.c_proj.int8_copy()?,
                activation: self.mlp.activation,
            },
            fused: self.fused,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        segments: &mut [Segment<'_>],
        layer: usize,
        plans: &mut Plans,
    ) -> candle_core::Result<Tensor> {
        if self.fused {
            return self.forward_fused(x, segments, layer, plans);
        }
        let h = (x + self
            .attn
            .forward(&self.ln_1.forward(x)?, segments, layer, plans)?)?;
        &h + self.mlp.forward(&self.ln_2.forward(&h)?)?
    }

    /// [`Block::forward`] with the fused epilogues: each product reads its input in the dtype
    /// of its weight, made by the kernel before it, and the residual stream after the
    /// attention (`x + (o + b)`) is recomputed by the two kernels that read it rather than
    /// written out.
    fn forward_fused(
        &self,
        x: &Tensor,
        segments: &mut [Segment<'_>],
        layer: usize,
        plans: &mut Plans,
    ) -> candle_core::Result<Tensor> {
        let (out_proj, fc, proj) = (self.attn.out_proj(), &self.mlp.c_fc, &self.mlp.c_proj);
        let qkv = self.qkv_fused(x)?;
        let o = out_proj.product(&self.attn.attend(&qkv, segments, layer, plans)?)?;
        let normed = add_norm(&o, out_proj.bias(), Some(x), &self.ln_2, fc.input_dtype())?;
        let inner = fc.fused(&normed, Some(self.mlp.activation), None, proj.input_dtype())?;
        let residual = Residual {
            x,
            plus: Some((&o, out_proj.bias())),
        };
        proj.fused(&inner, None, Some(residual), DType::F32)
    }

    /// The q/k/v product of `ln_1(x)`, float32, by the fused kernels.
    fn qkv_fused(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let qkv = self.attn.qkv();
        let normed = add_norm(x, None, None, &self.ln_1, qkv.input_dtype())?;
        qkv.fused(&normed, None, None, DType::F32)
    }

    /// Only the keys and values this block would cache for `x` (CALM's state propagation:
    /// a position that left at a lower exit enters the blocks above with its hidden state).
    pub fn propagate_kv(
        &self,
        x: &Tensor,
        segments: &mut [Segment<'_>],
        layer: usize,
        plans: &mut Plans,
    ) -> candle_core::Result<()> {
        if self.fused {
            return self.attn.store(&self.qkv_fused(x)?, segments, layer, plans);
        }
        self.attn
            .write_kv(&self.ln_1.forward(x)?, segments, layer, plans)
    }
}
