//! How matmul weights are stored and multiplied, and the projection layers built on them.
//! Architectures differ in how a checkpoint stores a projection (`nn.Linear` `(out, in)` or
//! GPT-2's `Conv1D` `(in, out)`), not in how it is multiplied: both become a [`Proj`].

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::kernels::fused_epilogue::{self, Activation, Residual};
use crate::kernels::matmul::{self, PackedWeight};
use crate::kernels::wide_product;

/// How the projection and vocabulary matrices are stored and multiplied. Norms, position
/// embeddings, biases and activations stay float32 in every case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    /// Exact parity with the reference.
    F32,
    F16,
    /// With a bfloat16 KV cache.
    Bf16,
    /// Symmetric int8 with one float32 scale per output row, multiplied by the skinny
    /// kernels (x86-64 with AVX2 or AVX-512 VNNI only) with activations rounded to int16;
    /// with a bfloat16 KV cache.
    Int8,
}

impl WeightDtype {
    /// Every dtype, by the name `--dtype` takes.
    pub const ALL: [(&'static str, WeightDtype); 4] = [
        ("f32", WeightDtype::F32),
        ("f16", WeightDtype::F16),
        ("bf16", WeightDtype::Bf16),
        ("int8", WeightDtype::Int8),
    ];

    /// The dtype the matrices are read into (int8 is quantized from float32 while packing).
    pub fn load_dtype(self) -> DType {
        match self {
            WeightDtype::F32 | WeightDtype::Int8 => DType::F32,
            WeightDtype::F16 => DType::F16,
            WeightDtype::Bf16 => DType::BF16,
        }
    }

    /// bfloat16 caches for bfloat16 and int8 weights (half the memory per token, and the
    /// values are no less exact than the weights that made them); float32 otherwise.
    pub fn kv_dtype(self) -> DType {
        match self {
            WeightDtype::Bf16 | WeightDtype::Int8 => DType::BF16,
            WeightDtype::F32 | WeightDtype::F16 => DType::F32,
        }
    }

    /// Single-stream decoding time per weight against float32, as measured with the
    /// README's bench (GPT-2 medium shape: bf16 0.59 and int8 0.37 on AVX2; 0.54 and 0.36 on
    /// AVX-512): what weighs a draft's int8 copies in the speculative cost model. float16
    /// runs on candle's matmul, taken as no faster than float32.
    pub fn decode_cost(self) -> f64 {
        match self {
            WeightDtype::F32 | WeightDtype::F16 => 1.0,
            WeightDtype::Bf16 => 0.57,
            WeightDtype::Int8 => 0.37,
        }
    }

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, d)| *d == self)
            .map(|(n, _)| *n)
            .expect("every dtype is listed")
    }
}

/// The value named `name` (any case) in a `(name, value)` list.
fn by_name<T: Copy>(all: &[(&str, T)], name: &str) -> Option<T> {
    all.iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| *v)
}

impl FromStr for WeightDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        by_name(&Self::ALL, s)
            .ok_or_else(|| format!("unknown dtype `{s}` (f32, f16, bf16 or int8)"))
    }
}

impl fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the drafts of self-speculative decoding read. A draft only proposes tokens (the
/// verifying pass recomputes every position with the model's own weights and overwrites the
/// draft's cache entries), so a cheaper copy of the draft layers keeps the output exact and
/// only moves the acceptance rate a little.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DraftWeights {
    /// Int8 copies of the blocks below the draft layer and of its exit head, made the first
    /// time a draft needs them (a quarter of their float32 size): where the weights are
    /// packed for the CPU kernels in f32 or bf16; else the model's own weights.
    Int8,
    /// The model's own weights.
    Model,
}

impl DraftWeights {
    pub const ALL: [(&'static str, DraftWeights); 2] =
        [("int8", DraftWeights::Int8), ("model", DraftWeights::Model)];
}

impl FromStr for DraftWeights {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        by_name(&Self::ALL, s).ok_or_else(|| format!("unknown draft weights `{s}` (int8 or model)"))
    }
}

/// How projection weights are stored and multiplied.
#[derive(Debug, Clone, Copy)]
pub struct WeightSpec {
    pub dtype: WeightDtype,
    /// Use the skinny CPU kernels where the CPU has them (else candle's matmul).
    pub skinny: bool,
    /// Multiply a bfloat16 or float16 weight the skinny kernels do not take with a float32
    /// result (`kernels::wide_product`: a GPU's products, or `--matmul wide`).
    pub wide: bool,
}

/// A matmul weight `(out, in)`: packed for the skinny AVX2/AVX-512 kernels on CPUs that have them
/// (unless `--matmul candle`), a reduced-precision one for the product with a float32 result
/// where `WeightSpec::wide` asks (a GPU), else a plain tensor for candle's matmul.
#[derive(Clone)]
pub enum Weight {
    Plain(Tensor),
    Packed(PackedWeight),
    /// bfloat16 or float16, multiplied by `kernels::wide_product`.
    Wide(Tensor),
}

impl Weight {
    /// `w` as read (in `spec.dtype.load_dtype()`), packed or quantized as `spec` says.
    pub fn new(w: Tensor, spec: WeightSpec) -> candle_core::Result<Self> {
        let cpu_kernels = spec.skinny && w.device().is_cpu();
        if spec.dtype == WeightDtype::Int8 {
            if !(cpu_kernels && matmul::supports_int8()) {
                candle_core::bail!(
                    "int8 weights need the skinny CPU kernels: an x86-64 CPU with AVX2 or \
                     AVX-512 VNNI, and --matmul auto"
                );
            }
            Ok(Weight::Packed(PackedWeight::pack_int8(&w)?))
        } else if cpu_kernels && matmul::supported(w.dtype()) {
            Ok(Weight::Packed(PackedWeight::pack(&w)?))
        } else if spec.wide && matches!(w.dtype(), DType::BF16 | DType::F16) {
            Ok(Weight::Wide(w.contiguous()?))
        } else {
            Ok(Weight::Plain(w))
        }
    }

    /// `x Wᵀ` for float32 `x`; a reduced-precision weight gets `x` cast to its dtype (and a
    /// plain one's result back to float32).
    pub fn xwt(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.product(x)?.to_dtype(DType::F32)
    }

    /// The dtype [`Weight::product`] reads `x` in: float32 for the packed kernels, the
    /// weight's own for the others.
    pub fn input_dtype(&self) -> DType {
        match self {
            Weight::Packed(_) => DType::F32,
            Weight::Plain(w) | Weight::Wide(w) => w.dtype(),
        }
    }

    /// The dtype [`Weight::product`] returns: float32 but for candle's matmul of a
    /// reduced-precision weight (its own).
    pub fn output_dtype(&self) -> DType {
        match self {
            Weight::Packed(_) | Weight::Wide(_) => DType::F32,
            Weight::Plain(w) => w.dtype(),
        }
    }

    /// `x Wᵀ` in [`Weight::output_dtype`], `x` cast to [`Weight::input_dtype`] first if it is
    /// not: what a fused epilogue takes, with no cast of its own.
    pub fn product(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Weight::Packed(p) => p.xwt(x),
            Weight::Wide(w) => wide_product::product(&x.to_dtype(w.dtype())?, w),
            Weight::Plain(w) => x.to_dtype(w.dtype())?.matmul(&w.t()?),
        }
    }

    /// An int8 copy (see [`DraftWeights`]), for packed float weights; None for plain weights
    /// (no int8 kernel runs them) and int8 weights (their own copy).
    pub fn int8_copy(&self) -> candle_core::Result<Option<Weight>> {
        match self {
            Weight::Packed(p) if !p.is_int8() => Ok(Some(Weight::Packed(p.to_int8()?))),
            _ => Ok(None),
        }
    }

    /// Rows `ids` as float32 (embedding lookup).
    pub fn rows(&self, ids: &[u32], device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Weight::Packed(p) => p.gather_rows(ids),
            Weight::Plain(w) | Weight::Wide(w) => w
                .index_select(&Tensor::new(ids, device)?, 0)?
                .to_dtype(DType::F32),
        }
    }
}

/// A projection `y = x Wᵀ (+ b)`; the bias stays float32.
#[derive(Clone)]
pub struct Proj {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Proj {
    /// An `nn.Linear`: `weight` stored `(out, in)`.
    pub fn linear(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: VarBuilder,
        spec: WeightSpec,
    ) -> candle_core::Result<Self> {
        let weight = vb
            .to_dtype(spec.dtype.load_dtype())
            .get((out_dim, in_dim), "weight")?;
        Self::with_bias(weight, bias, out_dim, &vb, spec)
    }

    /// GPT-2's `Conv1D`: `weight` stored `(in, out)`, transposed once here
    /// (`transformers/pytorch_utils.py`).
    pub fn conv1d(
        in_dim: usize,
        out_dim: usize,
        vb: VarBuilder,
        spec: WeightSpec,
    ) -> candle_core::Result<Self> {
        let weight = vb
            .to_dtype(spec.dtype.load_dtype())
            .get((in_dim, out_dim), "weight")?
            .t()?
            .contiguous()?; // (out, in)
        Self::with_bias(weight, true, out_dim, &vb, spec)
    }

    /// Bias-free `nn.Linear` projections `names` (each `(out, in)`) stacked along the output
    /// dimension: one matmul (one pass over x, one parallel dispatch) instead of several.
    pub fn stacked_linear(
        in_dim: usize,
        out_dim: usize,
        names: &[&str],
        vb: &VarBuilder,
        spec: WeightSpec,
    ) -> candle_core::Result<Self> {
        let parts = names
            .iter()
            .map(|n| {
                vb.pp(*n)
                    .to_dtype(spec.dtype.load_dtype())
                    .get((out_dim, in_dim), "weight")
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            weight: Weight::new(Tensor::cat(&parts, 0)?, spec)?,
            bias: None,
        })
    }

    /// The projection with an int8 copy of its weight where [`Weight::int8_copy`] makes one
    /// (else the same weight, shared).
    pub fn int8_copy(&self) -> candle_core::Result<Self> {
        Ok(Self {
            weight: self
                .weight
                .int8_copy()?
                .unwrap_or_else(|| self.weight.clone()),
            bias: self.bias.clone(),
        })
    }

    fn with_bias(
        weight: Tensor,
        bias: bool,
        out_dim: usize,
        vb: &VarBuilder,
        spec: WeightSpec,
    ) -> candle_core::Result<Self> {
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self {
            weight: Weight::new(weight, spec)?,
            bias,
        })
    }
}

impl Proj {
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// See [`Weight::input_dtype`].
    pub fn input_dtype(&self) -> DType {
        self.weight.input_dtype()
    }

    /// `x Wᵀ` without the bias, in [`Weight::output_dtype`].
    pub fn product(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.weight.product(x)
    }

    /// `act(x Wᵀ + b) + residual` as `out`: the product, then one fused kernel for the rest
    /// (`kernels::fused_epilogue`).
    pub fn fused(
        &self,
        x: &Tensor,
        act: Option<Activation>,
        residual: Option<Residual<'_>>,
        out: DType,
    ) -> candle_core::Result<Tensor> {
        fused_epilogue::epilogue(&self.product(x)?, self.bias(), act, residual, out)
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
