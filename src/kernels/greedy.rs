//! Each row's greedy choice, where the logits are: on a GPU one launch over a step's head
//! logits, so that a greedy sequence's next token costs the host one index instead of a copy
//! of the vocabulary (16 streams of a 50,257-token vocabulary: 64 bytes instead of 3.2 MB a
//! step, and no log-softmax on the host). The choice is the host's `argmax`: the first
//! position of the row's maximum, NaN never winning (`greedy.cu`; on the CPU the same in Rust).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fastmath;

/// `logits` `(rows, vocab)` float32: `(rows)` u32, each row's first position of its maximum
/// (0 when no element is a number).
pub fn argmax_rows(logits: &Tensor) -> Result<Tensor> {
    if logits.dtype() != DType::F32 || logits.rank() != 2 {
        candle_core::bail!("argmax rows: a (rows, vocab) float32 matrix");
    }
    logits.contiguous()?.apply_op1_no_bwd(&ArgmaxRows)
}

/// The choice in one row (first index of the maximum, as torch.argmax), as the CUDA kernel
/// and the host's sampler make it.
pub fn argmax(row: &[f32]) -> u32 {
    // The vectorised maximum, then its first position: a greedy step's pass over the
    // vocabulary without a dependent compare per element.
    let best = fastmath::max(row);
    row.iter().position(|&x| x == best).unwrap_or(0) as u32
}

struct ArgmaxRows;

impl CustomOp1 for ArgmaxRows {
    fn name(&self) -> &'static str {
        "argmax-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = l.shape().dims2()?;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("argmax rows: a contiguous matrix");
        };
        let logits = &s.as_slice::<f32>()?[a..b];
        let out: Vec<u32> = if vocab == 0 {
            vec![0; rows]
        } else {
            logits.par_chunks(vocab).map(argmax).collect()
        };
        Ok((CpuStorage::U32(out), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, vocab) = l.shape().dims2()?;
        Ok((
            cuda::launch(s, l.start_offset(), rows, vocab)?,
            Shape::from(rows),
        ))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::OnceLock;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, Result};

    const SOURCE: &str = include_str!("greedy.cu");
    /// Must match `THREADS` in the source.
    const THREADS: u32 = 256;

    fn ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        super::super::cuda_source::ptx(&PTX, "greedy.cu", SOURCE)
    }

    pub(super) fn launch(
        s: &CudaStorage,
        offset: usize,
        rows: usize,
        vocab: usize,
    ) -> Result<CudaStorage> {
        let dev = s.device().clone();
        if rows == 0 || vocab == 0 {
            let zeros = dev.alloc_zeros::<u32>(rows)?;
            return Ok(CudaStorage::wrap_cuda_slice(zeros, dev));
        }
        let logits = s.as_cuda_slice::<f32>()?.slice(offset..);
        // SAFETY: the kernel writes every element (one per row) before anything reads it.
        let mut out = unsafe { dev.alloc::<u32>(rows)? };
        let func = dev.get_or_load_custom_func("argmax_rows", "exitserve_greedy", ptx()?)?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let vocab = vocab as u32;
        {
            let mut b = func.builder();
            b.arg(&logits).arg(&mut out).arg(&vocab);
            // SAFETY: the arguments match the kernel's signature; it reads `rows` rows of
            // `vocab` floats from `logits`, which the layout holds.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn each_row_chooses_its_first_maximum_and_nan_never_wins() -> Result<()> {
        let nan = f32::NAN;
        let rows = [
            [0.5, 2.0, -1.0, 2.0],  // a tie: the first
            [nan, -3.0, nan, -2.0], // NaN never wins
            [nan, nan, nan, nan],   // nothing is a number: 0
            [-1.0, -1.0, -0.5, f32::NEG_INFINITY],
        ];
        let t = Tensor::new(&rows, &Device::Cpu)?;
        assert_eq!(argmax_rows(&t)?.to_vec1::<u32>()?, [1, 3, 0, 2]);
        for row in &rows {
            assert_eq!(
                argmax(row),
                argmax_rows(&Tensor::new(&[*row], &Device::Cpu)?)?.to_vec1::<u32>()?[0]
            );
        }
        // a view of every other row
        let wide = Tensor::arange(0f32, 4096., &Device::Cpu)?
            .sin()?
            .reshape((4, 1024))?;
        let picked = argmax_rows(&wide.narrow(0, 1, 2)?)?.to_vec1::<u32>()?;
        let want: Vec<u32> = wide.to_vec2::<f32>()?[1..3]
            .iter()
            .map(|r| argmax(r))
            .collect();
        assert_eq!(picked, want);
        Ok(())
    }
}
