//! A transformer block as both architectures have it: pre-norm attention and MLP with
//! residuals (`x + attn(ln_1(x))`, then `h + mlp(ln_2(h))`), built from the projections the
//! architecture reads out of its checkpoint.

use candle_core::{DType, Module, Tensor};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};

use super::arch::Projections;
use super::attention::SelfAttention;
use super::batched_attention::Plans;
use super::config::{Activation, ModelConfig};
use super::step::Segment;
use super::weights::{Proj, WeightSpec};
use crate::kernels::fastmath;

struct Mlp {
    c_fc: Proj,
    c_proj: Proj,
    activation: Activation,
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

pub(super) struct Block {
    ln_1: LayerNorm,
    attn: SelfAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    /// Block `layer` from its checkpoint folder `vb` (`transformer.h.{layer}`).
    pub fn new(
        cfg: &ModelConfig,
        layer: usize,
        vb: VarBuilder,
        spec: WeightSpec,
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
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        segments: &mut [Segment<'_>],
        layer: usize,
        plans: &mut Plans,
    ) -> candle_core::Result<Tensor> {
        let h = (x + self
            .attn
            .forward(&self.ln_1.forward(x)?, segments, layer, plans)?)?;
        &h + self.mlp.forward(&self.ln_2.forward(&h)?)?
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
        self.attn
            .write_kv(&self.ln_1.forward(x)?, segments, layer, plans)
    }
}
