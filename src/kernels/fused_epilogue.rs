//! What follows a projection's matrix product, fused: the bias, the activation, the residual
//! sum, the next layer norm, and the conversion to the dtype the next product reads. Candle
//! runs each as a kernel of its own (with a bfloat16 weight, a cast before and after every
//! product too): a GPT-2 block is 15 launches in float32 and 23 in bfloat16, where these make
//! it 12 and 13. A decode step on a GPU is launch-bound, so that is most of its time.
//!
//! Two operations: [`epilogue`] (`act(y + bias) + residual`, element-wise) and [`add_norm`]
//! (`LayerNorm((y + bias) + x)`, row-wise). The residual stream `h = x + (o + b)` after the
//! attention is never written out: the norm after it and the MLP's epilogue each recompute it
//! from its terms (the same float32 additions, so the same bits), which saves a launch.
//!
//! On a GPU they are `fused_epilogue.cu` (compiled at start-up by NVRTC); on the CPU the same
//! arithmetic runs in Rust, bit for bit what the unfused candle ops give there (candle's
//! one-pass layer norm, `fastmath::gelu_tanh`), so the batched path's parity tests cover the
//! model's use of them. [`check`] compares them with candle's own ops on the device at
//! start-up (`model/multi_exit.rs`), and the model keeps the candle ops where they differ.

use candle_core::op::UnaryOpT;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Result, Shape, Tensor};
use candle_nn::LayerNorm;
use half::{bf16, f16};
use rayon::prelude::*;

use super::fastmath;

/// An activation applied after the bias, as candle's unary ops define it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_new`: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    GeluTanh = 1,
    GeluErf = 2,
    Relu = 3,
    Silu = 4,
}

impl Activation {
    /// The activation as candle ops (`fastmath`'s `gelu_new` for float32 on the CPU): what
    /// the unfused block runs, and the oracle of the fused kernels.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::GeluTanh if x.device().is_cpu() && x.dtype() == DType::F32 => {
                x.apply_op1_no_bwd(&fastmath::GeluTanh)
            }
            Activation::GeluTanh => x.gelu(),
            Activation::GeluErf => x.gelu_erf(),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
        }
    }

    /// The CPU version on a row, in place.
    fn apply_row(self, row: &mut [f32], scratch: &mut Vec<f32>) {
        use candle_core::op::{GeluErf, Relu, Silu};
        match self {
            Activation::GeluTanh => {
                scratch.clear();
                scratch.extend_from_slice(row);
                fastmath::gelu_tanh(scratch, row);
            }
            Activation::GeluErf => row.iter_mut().for_each(|v| *v = GeluErf::f32(*v)),
            Activation::Relu => row.iter_mut().for_each(|v| *v = Relu::f32(*v)),
            Activation::Silu => row.iter_mut().for_each(|v| *v = Silu::f32(*v)),
        }
    }
}

/// What a projection's output is added to: `x` (float32), plus `y + bias` when given (`y` in
/// the dtype of the product it comes with): the residual stream recomputed from its terms.
#[derive(Clone, Copy)]
pub struct Residual<'a> {
    pub x: &'a Tensor,
    pub plus: Option<(&'a Tensor, Option<&'a Tensor>)>,
}

/// `act(y + bias) + residual`, in float32, written as `out`: `y` `(rows, cols)` float32,
/// bfloat16 or float16 (a product), `bias` `(cols)` float32.
pub fn epilogue(
    y: &Tensor,
    bias: Option<&Tensor>,
    act: Option<Activation>,
    residual: Option<Residual<'_>>,
    out: DType,
) -> Result<Tensor> {
    if bias.is_none() && act.is_none() && residual.is_none() {
        return y.to_dtype(out);
    }
    let plus = residual.and_then(|r| r.plus);
    let op = Fused {
        kind: Kind::Epilogue {
            act,
            ry: held(plus.map(|(y, _)| y))?,
            rbias: held(plus.and_then(|(_, b)| b))?,
        },
        bias: held(bias)?,
        x: held(residual.map(|r| r.x))?,
        out,
    };
    y.contiguous()?.apply_op1_no_bwd(&op)
}

/// `norm((y + bias) + x)` written as `out`: the output projection's bias and residual and the
/// layer norm after them in one pass (with neither, `norm(y)` and a cast).
pub fn add_norm(
    y: &Tensor,
    bias: Option<&Tensor>,
    x: Option<&Tensor>,
    norm: &LayerNorm,
    out: DType,
) -> Result<Tensor> {
    if !norm.remove_mean() {
        candle_core::bail!("add_norm: a layer norm (not an RMS norm)");
    }
    let op = Fused {
        kind: Kind::Norm {
            weight: norm.weight().contiguous()?,
            beta: held(norm.bias())?,
            eps: norm.eps() as f32,
        },
        bias: held(bias)?,
        x: held(x)?,
        out,
    };
    y.contiguous()?.apply_op1_no_bwd(&op)
}

/// An operand the op holds, contiguous (the kernels read it so).
fn held(t: Option<&Tensor>) -> Result<Option<Tensor>> {
    t.map(Tensor::contiguous).transpose()
}

/// The unfused candle ops [`epilogue`] stands for: the oracle of [`check`].
pub fn epilogue_by_ops(
    y: &Tensor,
    bias: Option<&Tensor>,
    act: Option<Activation>,
    residual: Option<Residual<'_>>,
    out: DType,
) -> Result<Tensor> {
    let mut v = y.to_dtype(DType::F32)?;
    if let Some(b) = bias {
        v = v.broadcast_add(b)?;
    }
    if let Some(a) = act {
        v = a.apply(&v)?;
    }
    if let Some(r) = residual {
        let h = match r.plus {
            Some((ry, rb)) => {
                let mut t = ry.to_dtype(DType::F32)?;
                if let Some(b) = rb {
                    t = t.broadcast_add(b)?;
                }
                (r.x + t)?
            }
            None => r.x.clone(),
        };
        v = (h + v)?;
    }
    v.to_dtype(out)
}

/// The unfused candle ops [`add_norm`] stands for.
pub fn add_norm_by_ops(
    y: &Tensor,
    bias: Option<&Tensor>,
    x: Option<&Tensor>,
    norm: &LayerNorm,
    out: DType,
) -> Result<Tensor> {
    let mut h = y.to_dtype(DType::F32)?;
    if let Some(b) = bias {
        h = h.broadcast_add(b)?;
    }
    if let Some(x) = x {
        h = (x + h)?;
    }
    norm.forward(&h)?.to_dtype(out)
}

/// The largest difference between the fused operations and candle's ops on `device`, each
/// relative to the largest magnitude it produced, over the cases a block of `hidden` and
/// `inner` columns with `act` runs for products in `product` whose next product reads `next`:
/// what the model checks at start-up.
pub fn check(
    device: &Device,
    hidden: usize,
    inner: usize,
    act: Activation,
    (product, next): (DType, DType),
) -> Result<f32> {
    let rows = 5;
    // Deterministic, varied values of every sign and a spread of magnitudes.
    let values = |n: usize, seed: f32, scale: f64| -> Result<Tensor> {
        Tensor::arange(0f32, n as f32, &Device::Cpu)?
            .affine(0.618_034, seed as f64)?
            .sin()?
            .affine(scale, 0.0)?
            .to_device(device)
    };
    let y = values(rows * hidden, 0.3, 3.0)?.reshape((rows, hidden))?;
    let yp = y.to_dtype(product)?;
    let big = values(rows * inner, 1.1, 4.0)?
        .reshape((rows, inner))?
        .to_dtype(product)?;
    let o = values(rows * hidden, 2.7, 2.0)?
        .reshape((rows, hidden))?
        .to_dtype(product)?;
    let x = values(rows * hidden, 0.9, 30.0)?.reshape((rows, hidden))?;
    let (b, b2) = (values(hidden, 0.5, 0.5)?, values(hidden, 1.7, 0.5)?);
    let b_inner = values(inner, 2.1, 0.5)?;
    let norm = LayerNorm::new(
        values(hidden, 0.2, 1.0)?.affine(1.0, 1.0)?,
        b2.clone(),
        1e-5,
    );
    let mut worst = 0f32;
    let mut compare = |got: Tensor, want: Tensor| -> Result<()> {
        let (got, want) = (got.to_dtype(DType::F32)?, want.to_dtype(DType::F32)?);
        let scale = want
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?
            .max(f32::MIN_POSITIVE);
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        worst = worst.max(if diff.is_nan() {
            f32::INFINITY
        } else {
            diff / scale
        });
        Ok(())
    };
    let res = Residual {
        x: &x,
        plus: Some((&o, Some(&b))),
    };
    // the q/k/v bias; the MLP's first product (bias, activation, to the next weight's dtype);
    // its second (bias and the residual stream); the norms before attention and after it
    for (y, bias, act, residual, out) in [
        (&yp, Some(&b), None, None, DType::F32),
        (&big, Some(&b_inner), Some(act), None, next),
        (&yp, Some(&b2), None, Some(res), DType::F32),
    ] {
        compare(
            epilogue(y, bias, act, residual, out)?,
            epilogue_by_ops(y, bias, act, residual, out)?,
        )?;
    }
    for (y, bias, x) in [(&y, None, None), (&o, Some(&b), Some(&x))] {
        compare(
            add_norm(y, bias, x, &norm, next)?,
            add_norm_by_ops(y, bias, x, &norm, next)?,
        )?;
    }
    Ok(worst)
}

struct Fused {
    kind: Kind,
    bias: Option<Tensor>,
    x: Option<Tensor>,
    out: DType,
}

enum Kind {
    Epilogue {
        act: Option<Activation>,
        ry: Option<Tensor>,
        rbias: Option<Tensor>,
    },
    Norm {
        weight: Tensor,
        beta: Option<Tensor>,
        eps: f32,
    },
}

/// The dtypes the operations read and write.
fn float_code(d: DType) -> Result<i32> {
    match d {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F16 => Ok(2),
        d => candle_core::bail!("fused epilogue: a {d:?} operand (float32, bfloat16, float16)"),
    }
}

impl Fused {
    /// `(rows, cols)` once every operand has the shape and dtype the kernels read.
    fn check(&self, y: &Layout, y_dtype: DType) -> Result<(usize, usize)> {
        let (rows, cols) = y.shape().dims2()?;
        float_code(y_dtype)?;
        float_code(self.out)?;
        let vector =
            |t: Option<&Tensor>| t.is_none_or(|t| t.dims() == [cols] && t.dtype() == DType::F32);
        let matrix = |t: &Option<Tensor>, dtype: DType| {
            t.as_ref()
                .is_none_or(|t| t.dims() == [rows, cols] && t.dtype() == dtype)
        };
        let ok = vector(self.bias.as_ref())
            && matrix(&self.x, DType::F32)
            && match &self.kind {
                Kind::Epilogue { ry, rbias, .. } => {
                    matrix(ry, y_dtype)
                        && vector(rbias.as_ref())
                        && (ry.is_some() || rbias.is_none())
                }
                Kind::Norm { weight, beta, .. } => {
                    vector(Some(weight)) && vector(beta.as_ref()) && cols > 0
                }
            };
        if !ok || !y.is_contiguous() {
            candle_core::bail!("fused epilogue: operands of other shapes or dtypes than y's");
        }
        Ok((rows, cols))
    }
}

/// A held operand's elements on the CPU, widened to float32.
fn cpu_f32(t: &Option<Tensor>) -> Result<Option<Vec<f32>>> {
    t.as_ref()
        .map(|t| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
        .transpose()
}

/// A matrix of any float dtype, widened to float32.
fn widen(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused epilogue: a strided operand".into()))?;
    Ok(match s {
        CpuStorage::F32(v) => v[a..b].to_vec(),
        CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        _ => candle_core::bail!("fused epilogue: a float operand"),
    })
}

fn narrow(v: Vec<f32>, out: DType) -> Result<CpuStorage> {
    Ok(match out {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.into_par_iter().map(bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(v.into_par_iter().map(f16::from_f32).collect()),
        d => candle_core::bail!("fused epilogue: a {d:?} output"),
    })
}

impl CustomOp1 for Fused {
    fn name(&self) -> &'static str {
        "fused-epilogue"
    }

    fn cpu_fwd(&self, y: &CpuStorage, yl: &Layout) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (_rows, cols) = self.check(yl, y.dtype())?;
        #[cfg(feature = "cuda-emulator")]
        if let Some(out) = emulated::launch(self, y, yl, (_rows, cols))? {
            return Ok((out, yl.shape().clone()));
        }
        let mut v = widen(y, yl)?;
        let (bias, x) = (cpu_f32(&self.bias)?, cpu_f32(&self.x)?);
        // `y + bias` first, as a broadcast add gives it
        let add_bias = |row: &mut [f32]| {
            if let Some(b) = &bias {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        };
        match &self.kind {
            Kind::Epilogue { act, ry, rbias } => {
                let (ry, rbias) = (cpu_f32(ry)?, cpu_f32(rbias)?);
                v.par_chunks_mut(cols)
                    .enumerate()
                    .for_each_init(Vec::new, |scratch, (r, row)| {
                        add_bias(row);
                        if let Some(a) = act {
                            a.apply_row(row, scratch);
                        }
                        // + ((ry + rbias) + x), as the unfused residual stream sums it
                        let at = r * cols;
                        for (c, v) in row.iter_mut().enumerate() {
                            let h = match (&ry, &x) {
                                (Some(ry), x) => {
                                    let mut h = ry[at + c];
                                    if let Some(rb) = &rbias {
                                        h += rb[c];
                                    }
                                    x.as_ref().map_or(h, |x| x[at + c] + h)
                                }
                                (None, Some(x)) => x[at + c],
                                (None, None) => break,
                            };
                            *v += h; // h + v: addition commutes, bit for bit
                        }
                    });
            }
            Kind::Norm { weight, beta, eps } => {
                let weight = weight.to_vec1::<f32>()?;
                let beta = cpu_f32(beta)?;
                v.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
                    add_bias(row);
                    if let Some(x) = &x {
                        let xr = &x[r * cols..(r + 1) * cols];
                        row.iter_mut().zip(xr).for_each(|(v, x)| *v += x);
                    }
                    // candle's layer_norm: one pass for the mean and the variance
                    let (mut sum, mut sum2) = (0f32, 0f32);
                    for &h in row.iter() {
                        sum += h;
                        sum2 += h * h;
                    }
                    let mean = sum / cols as f32;
                    let inv_std = (sum2 / cols as f32 - mean * mean + eps).sqrt().recip();
                    for (c, h) in row.iter_mut().enumerate() {
                        let d = (*h - mean) * inv_std * weight[c];
                        *h = match &beta {
                            Some(b) => d + b[c],
                            None => d,
                        };
                    }
                });
            }
        }
        Ok((narrow(v, self.out)?, yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let dims = self.check(yl, y.dtype())?;
        Ok((cuda::launch(self, y, yl, dims)?, yl.shape().clone()))
    }
}

/// Threads of a block of `fused_epilogue.cu`'s kernels (must match its `THREADS`).
#[cfg(any(feature = "cuda-emulator", feature = "cuda"))]
const THREADS: u32 = 256;

/// The kernel of `kind` and its blocks for `(rows, cols)`: the epilogue strides over every
/// element (at most 65,536 blocks), the norm takes a block per row.
#[cfg(any(feature = "cuda-emulator", feature = "cuda"))]
fn blocks(kind: &Kind, rows: u32, cols: u32) -> (&'static str, u32) {
    match kind {
        Kind::Epilogue { .. } => {
            let n = rows as u64 * cols as u64;
            (
                "fused_epilogue",
                n.div_ceil(THREADS as u64).min(1 << 16) as u32,
            )
        }
        Kind::Norm { .. } => ("fused_add_norm", rows),
    }
}

/// Tests: the CUDA kernels run on the CPU (`cuda_emulator.rs`) in place of the CPU code, their
/// arguments as `cuda::launch` passes them.
#[cfg(feature = "cuda-emulator")]
mod emulated {
    use candle_core::{CpuStorage, Layout, Result, Tensor};

    use super::super::cuda_emulator::{self as emu, Arg, Grid, Operand};
    use super::{blocks, float_code, Fused, Kind, THREADS};

    fn of_tensor(t: &Tensor) -> Result<Operand> {
        let (s, l) = t.storage_and_layout();
        match &*s {
            candle_core::Storage::Cpu(c) => Operand::of(c, l),
            _ => candle_core::bail!("fused epilogue: operands on another device than y"),
        }
    }

    pub(super) fn launch(
        op: &Fused,
        y: &CpuStorage,
        yl: &Layout,
        (rows, cols): (usize, usize),
    ) -> Result<Option<CpuStorage>> {
        if !emu::active() {
            return Ok(None);
        }
        use candle_core::backend::BackendStorage;
        let n = rows * cols;
        let mut operands = vec![
            Operand::of(y, yl)?,
            Operand::filled(op.out, n, f64::NAN, 0)?,
        ];
        if n > 0 {
            // An optional operand: its argument (null where absent), the operand appended.
            let mut optional = |t: Option<&Tensor>, void: bool| -> Result<Arg> {
                Ok(match t {
                    None if void => Arg::NullVoid,
                    None => Arg::NullF32,
                    Some(t) => {
                        operands.push(of_tensor(t)?);
                        let i = operands.len() - 1;
                        if void {
                            Arg::Void(i, 0)
                        } else {
                            Arg::At(i, 0)
                        }
                    }
                })
            };
            let (y_t, out_t) = (float_code(y.dtype())?, float_code(op.out)?);
            let bias = optional(op.bias.as_ref(), false)?;
            let mut args = vec![Arg::Void(0, 0), Arg::I32(y_t), bias];
            match &op.kind {
                Kind::Epilogue { act, ry, rbias } => {
                    args.push(Arg::I32(act.map_or(0, |a| a as i32)));
                    args.push(optional(ry.as_ref(), true)?);
                    args.push(optional(rbias.as_ref(), false)?);
                    args.push(optional(op.x.as_ref(), false)?);
                    args.extend([Arg::Void(1, 0), Arg::I32(out_t)]);
                    args.extend([Arg::U32(rows as u32), Arg::U32(cols as u32)]);
                }
                Kind::Norm { weight, beta, eps } => {
                    args.push(optional(op.x.as_ref(), false)?);
                    args.push(optional(Some(weight), false)?);
                    args.push(optional(beta.as_ref(), false)?);
                    args.push(Arg::F32(*eps));
                    args.extend([Arg::Void(1, 0), Arg::I32(out_t), Arg::U32(cols as u32)]);
                }
            }
            let (name, blocks) = blocks(&op.kind, rows as u32, cols as u32);
            let grid = Grid {
                blocks: [blocks, 1, 1],
                threads: [THREADS, 1, 1],
                shared_bytes: 0,
            };
            emu::launch(name, grid, &mut operands, &args)?;
        }
        Ok(Some(operands.swap_remove(1).into_storage(op.out)?))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::OnceLock;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Result, Storage, StorageRef, Tensor};
    use half::{bf16, f16};

    use super::{blocks, float_code, Fused, Kind, THREADS};

    const SOURCE: &str = include_str!("fused_epilogue.cu");

    fn ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        super::super::cuda_source::ptx(&PTX, "fused_epilogue.cu", SOURCE)
    }

    /// An operand as the kernels take it: a device pointer of its dtype, or null.
    enum View<'a> {
        F32(CudaView<'a, f32>),
        Bf16(CudaView<'a, bf16>),
        F16(CudaView<'a, f16>),
        Null(u64),
    }

    impl<'a> View<'a> {
        fn of_storage(s: &'a CudaStorage, offset: usize) -> Result<Self> {
            Ok(match s.dtype() {
                DType::F32 => View::F32(s.as_cuda_slice::<f32>()?.slice(offset..)),
                DType::BF16 => View::Bf16(s.as_cuda_slice::<bf16>()?.slice(offset..)),
                DType::F16 => View::F16(s.as_cuda_slice::<f16>()?.slice(offset..)),
                d => candle_core::bail!("fused epilogue: a {d:?} operand"),
            })
        }

        fn of(held: &'a Option<(StorageRef<'_>, usize)>) -> Result<Self> {
            match held {
                None => Ok(View::Null(0)),
                Some((s, offset)) => match &**s {
                    Storage::Cuda(c) => Self::of_storage(c, *offset),
                    _ => candle_core::bail!("fused epilogue: operands on another device than y"),
                },
            }
        }

        fn push<'b>(&'b self, b: &mut LaunchArgs<'b>) {
            match self {
                View::F32(v) => b.arg(v),
                View::Bf16(v) => b.arg(v),
                View::F16(v) => b.arg(v),
                View::Null(z) => b.arg(z),
            };
        }
    }

    /// A held operand's storage and where its elements start.
    fn hold(t: Option<&Tensor>) -> Option<(StorageRef<'_>, usize)> {
        t.map(|t| {
            let (s, l) = t.storage_and_layout();
            (s, l.start_offset())
        })
    }

    /// The output, allocated in its dtype.
    enum Out {
        F32(CudaSlice<f32>),
        Bf16(CudaSlice<bf16>),
        F16(CudaSlice<f16>),
    }

    impl Out {
        fn new(dev: &CudaDevice, dtype: DType, n: usize) -> Result<Self> {
            // SAFETY: the kernels write every element before anything reads it.
            unsafe {
                Ok(match dtype {
                    DType::F32 => Out::F32(dev.alloc::<f32>(n)?),
                    DType::BF16 => Out::Bf16(dev.alloc::<bf16>(n)?),
                    DType::F16 => Out::F16(dev.alloc::<f16>(n)?),
                    d => candle_core::bail!("fused epilogue: a {d:?} output"),
                })
            }
        }

        fn push<'a>(&'a mut self, b: &mut LaunchArgs<'a>) {
            match self {
                Out::F32(s) => b.arg(s),
                Out::Bf16(s) => b.arg(s),
                Out::F16(s) => b.arg(s),
            };
        }

        fn into_storage(self, dev: CudaDevice) -> CudaStorage {
            match self {
                Out::F32(s) => CudaStorage::wrap_cuda_slice(s, dev),
                Out::Bf16(s) => CudaStorage::wrap_cuda_slice(s, dev),
                Out::F16(s) => CudaStorage::wrap_cuda_slice(s, dev),
            }
        }
    }

    pub(super) fn launch(
        op: &Fused,
        y: &CudaStorage,
        yl: &Layout,
        (rows, cols): (usize, usize),
    ) -> Result<CudaStorage> {
        let dev = y.device().clone();
        let n = rows * cols;
        let mut out = Out::new(&dev, op.out, n)?;
        if n == 0 {
            return Ok(out.into_storage(dev));
        }
        let (y_t, out_t) = (float_code(y.dtype())?, float_code(op.out)?);
        let (rows, cols) = (rows as u32, cols as u32);
        let held_bias = hold(op.bias.as_ref());
        let held_x = hold(op.x.as_ref());
        let (act, held_a, held_b, eps) = match &op.kind {
            Kind::Epilogue { act, ry, rbias } => (
                act.map_or(0, |a| a as i32),
                hold(ry.as_ref()),
                hold(rbias.as_ref()),
                0f32,
            ),
            Kind::Norm { weight, beta, eps } => (0, hold(Some(weight)), hold(beta.as_ref()), *eps),
        };
        let y = View::of_storage(y, yl.start_offset())?;
        let (bias, x) = (View::of(&held_bias)?, View::of(&held_x)?);
        let (a, b_) = (View::of(&held_a)?, View::of(&held_b)?);
        let (name, blocks) = blocks(&op.kind, rows, cols);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let func = dev.get_or_load_custom_func(name, "exitserve_fused_epilogue", ptx()?)?;
        {
            let mut b = func.builder();
            y.push(&mut b);
            b.arg(&y_t);
            bias.push(&mut b);
            match op.kind {
                Kind::Epilogue { .. } => {
                    // (act, ry, rbias, rx, out, out_t, rows, cols)
                    b.arg(&act);
                    a.push(&mut b);
                    b_.push(&mut b);
                    x.push(&mut b);
                    out.push(&mut b);
                    b.arg(&out_t).arg(&rows).arg(&cols);
                }
                Kind::Norm { .. } => {
                    // (x, w, b, eps, out, out_t, cols)
                    x.push(&mut b);
                    a.push(&mut b);
                    b_.push(&mut b);
                    b.arg(&eps);
                    out.push(&mut b);
                    b.arg(&out_t).arg(&cols);
                }
            }
            // SAFETY: the arguments match the kernel's signature (`fused_epilogue.cu`), and
            // `Fused::check` gave every operand the shape the kernel reads.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(out.into_storage(dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn fused_ops_give_the_bits_of_candles_ops_on_the_cpu() -> Result<()> {
        for (hidden, inner, act) in [(8, 32, Activation::GeluTanh), (6, 24, Activation::Silu)] {
            for dtypes in [
                (DType::F32, DType::F32),
                (DType::BF16, DType::BF16),
                (DType::F16, DType::F16),
                (DType::F32, DType::BF16),
            ] {
                let worst = check(&Device::Cpu, hidden, inner, act, dtypes)?;
                assert_eq!(worst, 0.0, "{hidden} {act:?} {dtypes:?}");
            }
        }
        for act in [Activation::GeluErf, Activation::Relu] {
            let f32s = (DType::F32, DType::F32);
            assert_eq!(check(&Device::Cpu, 4, 16, act, f32s)?, 0.0, "{act:?}");
        }
        Ok(())
    }

    #[test]
    fn each_term_is_where_it_belongs() -> Result<()> {
        let y = tensor(&[1.0, -2.0, 3.0, 4.0], (2, 2));
        let b = Tensor::new(&[10f32, 20.0], &Device::Cpu)?;
        let x = tensor(&[100.0, 200.0, 300.0, 400.0], (2, 2));
        let o = tensor(&[0.5, 0.25, 0.125, 2.0], (2, 2));
        let rb = Tensor::new(&[1000f32, 2000.0], &Device::Cpu)?;
        let res = Residual {
            x: &x,
            plus: Some((&o, Some(&rb))),
        };
        let got = epilogue(&y, Some(&b), Some(Activation::Relu), Some(res), DType::F32)?;
        // relu(y + b) + ((o + rb) + x)
        assert_eq!(
            got.to_vec2::<f32>()?,
            [[1111.5, 2218.25], [1313.125, 2426.0]]
        );
        let plain = Residual { x: &x, plus: None };
        let got = epilogue(&y, None, None, Some(plain), DType::F32)?;
        assert_eq!(got.to_vec2::<f32>()?, [[101.0, 198.0], [303.0, 404.0]]);
        // nothing to add: a cast
        assert_eq!(
            epilogue(&y, None, None, None, DType::BF16)?.dtype(),
            DType::BF16
        );
        // a row of equal values normalises to the norm's bias
        let norm = LayerNorm::new(Tensor::new(&[2f32, 3.0], &Device::Cpu)?, rb.clone(), 1e-5);
        let flat = tensor(&[7.0, 7.0, -1.0, 1.0], (2, 2));
        let got = add_norm(&flat, None, None, &norm, DType::F32)?.to_vec2::<f32>()?;
        assert_eq!(got[0], [1000.0, 2000.0]);
        assert!((got[1][0] - 998.0).abs() < 1e-3 && (got[1][1] - 2003.0).abs() < 1e-3);
        // operands of another shape are refused
        let wrong = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu)?;
        assert!(epilogue(&y, Some(&wrong), None, None, DType::F32).is_err());
        assert!(add_norm(&y, None, Some(&wrong), &norm, DType::F32).is_err());
        Ok(())
    }
}
