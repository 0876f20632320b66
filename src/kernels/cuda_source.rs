//! The CUDA C of our own kernels (`*.cu` beside their Rust), compiled to PTX at start-up by
//! NVRTC (through cudarc, which candle already links): a GPU machine needs no toolkit, and the
//! driver compiles the PTX for whatever GPU it has. `.ci/nvrtc-check.py` compiles every source
//! here with the real NVRTC in CI, so one that NVRTC rejects cannot land.
//!
//! The choice kernels' launch ([`ChoiceKernel`], [`launch_op`]) is also what the tests'
//! emulator (`cuda_emulator.rs`) follows, so that it runs them as the GPU does.

#[cfg(feature = "cuda")]
use std::sync::OnceLock;

#[cfg(feature = "cuda")]
use candle_core::{
    backend::BackendStorage,
    cuda_backend::cudarc::driver::{
        CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
    },
    cuda_backend::cudarc::nvrtc,
    cuda_backend::{CudaDType, WrapErr},
    CudaStorage, Layout, Result,
};
use candle_core::{DType, Shape};

/// `source`'s PTX, compiled the first time (`cell` keeps it, or the error, for the process).
#[cfg(feature = "cuda")]
pub(super) fn ptx(
    cell: &'static OnceLock<std::result::Result<String, String>>,
    file: &str,
    source: &str,
) -> Result<&'static str> {
    cell.get_or_init(|| {
        nvrtc::compile_ptx(source)
            .map(|p| p.to_src())
            .map_err(|e| format!("NVRTC could not compile {file}: {e:?}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}

/// `choices.cu`: the per-row choices a step makes where the logits are (`greedy.rs`,
/// `sample.rs`, `logprob.rs`, `sled.rs`).
#[cfg(feature = "cuda")]
const CHOICES: &str = include_str!("choices.cu");
/// Must match `THREADS` in `choices.cu`.
pub(super) const CHOICE_THREADS: u32 = 256;

/// An op of a `choices.cu` kernel: one block of [`CHOICE_THREADS`] per row of its first
/// operand, `(rows, vocab)`; the kernel takes `(operands..., out, vocab)`, and `(...,
/// width)` where it writes `width` values per row (whatever the width, 1 included: a logprob
/// read with a top of 0). Its operands are float32, float64 or u32, in the op's order.
pub(super) trait ChoiceKernel {
    /// The kernel's name in `choices.cu`.
    fn kernel(&self) -> &'static str;
    /// The dtype it writes, and how many values per row if it takes a width (else one).
    fn output(&self) -> (DType, Option<usize>);

    /// Its output's shape for `rows` rows: `(rows)`, or `(rows, width)`.
    fn shape(&self, rows: usize) -> Shape {
        match self.output().1 {
            Some(w) => Shape::from((rows, w)),
            None => Shape::from(rows),
        }
    }
}

/// `op`'s kernel over `inputs` (the op's operands, in its order): its output, `(rows)` or
/// `(rows, width)`.
#[cfg(feature = "cuda")]
pub(super) fn launch_op(
    op: &impl ChoiceKernel,
    inputs: &[(&CudaStorage, &Layout)],
) -> Result<(CudaStorage, Shape)> {
    let (rows, vocab) = inputs[0].1.shape().dims2()?;
    let at: Vec<(&CudaStorage, usize)> =
        inputs.iter().map(|&(s, l)| (s, l.start_offset())).collect();
    let (dtype, width) = op.output();
    let kernel = op.kernel();
    let shape = op.shape(rows);
    let out = match dtype {
        DType::U32 => launch::<u32>(kernel, &at, rows, vocab, width)?,
        DType::F32 => launch::<f32>(kernel, &at, rows, vocab, width)?,
        DType::F64 => launch::<f64>(kernel, &at, rows, vocab, width)?,
        d => candle_core::bail!("{kernel}: a {d:?} output"),
    };
    Ok((out, shape))
}

/// `kernel` (one block per row) over `inputs`, each an operand and where its layout starts,
/// its output a `T` per row, or `width` per row (the kernel then takes the width).
#[cfg(feature = "cuda")]
fn launch<T: DeviceRepr + ValidAsZeroBits + CudaDType>(
    kernel: &str,
    inputs: &[(&CudaStorage, usize)],
    rows: usize,
    vocab: usize,
    width_arg: Option<usize>,
) -> Result<CudaStorage> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let width = width_arg.unwrap_or(1);
    let dev = inputs[0].0.device().clone();
    if rows == 0 || vocab == 0 {
        return Ok(CudaStorage::wrap_cuda_slice(
            dev.alloc_zeros::<T>(rows * width)?,
            dev,
        ));
    }
    // SAFETY: the kernel writes every element (`width` per row) before anything reads it.
    let mut out = unsafe { dev.alloc::<T>(rows * width)? };
    let func = dev.get_or_load_custom_func(
        kernel,
        "exitserve_choices",
        ptx(&PTX, "choices.cu", CHOICES)?,
    )?;
    enum View<'a> {
        F32(CudaView<'a, f32>),
        F64(CudaView<'a, f64>),
        U32(CudaView<'a, u32>),
    }
    let views = inputs
        .iter()
        .map(|&(s, offset)| match s.dtype() {
            DType::F32 => Ok(View::F32(s.as_cuda_slice::<f32>()?.slice(offset..))),
            DType::F64 => Ok(View::F64(s.as_cuda_slice::<f64>()?.slice(offset..))),
            DType::U32 => Ok(View::U32(s.as_cuda_slice::<u32>()?.slice(offset..))),
            d => candle_core::bail!("{kernel}: a {d:?} operand"),
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab = vocab as u32;
    let mut b = func.builder();
    for v in &views {
        match v {
            View::F32(v) => b.arg(v),
            View::F64(v) => b.arg(v),
            View::U32(v) => b.arg(v),
        };
    }
    let width_arg = width_arg.map(|w| w as u32);
    b.arg(&mut out).arg(&vocab);
    if let Some(w) = &width_arg {
        b.arg(w);
    }
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (CHOICE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the kernel's signature (the callers name the kernel with
    // its operands, in order, of the dtypes it reads); it reads `rows` rows of `vocab`
    // elements of each matrix and `rows` sets of a per-row parameter, which their layouts
    // hold (checked by the public functions), and writes `width` `T`s per row.
    unsafe { b.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}
