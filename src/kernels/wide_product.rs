//! `x Wᵀ` for bfloat16 (or float16) `x` and `W` with a float32 result: the products of a
//! reduced-precision model on a GPU. Candle's matmul writes its result in its inputs' dtype, so
//! a bfloat16 model's every product, its logits among them, was rounded to 8 bits of mantissa:
//! near-ties at the top of a head's row flip, and greedy agreement with the float32 reference
//! fell well under that of the CPU's bfloat16 path (whose kernels read bfloat16 weights and
//! write float32). Here cuBLAS accumulates in float32, as candle's call does, and writes float32
//! (`cublasGemmEx` with a float32 C), at no extra launch: the cast that followed a head's
//! product goes.
//!
//! On the CPU the same product runs row by row in float32 over the widened inputs: the oracle
//! that [`check`] holds a device to at start-up (`model/multi_exit.rs`, which keeps candle's
//! matmul where it differs).

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// `x` `(rows, k)` and `w` `(n, k)`, both bfloat16 or both float16: `x wᵀ` `(rows, n)` float32,
/// summed in float32.
pub fn product(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (_, k) = x.dims2()?;
    let (_, wk) = w.dims2()?;
    if k != wk || x.dtype() != w.dtype() || !matches!(x.dtype(), DType::BF16 | DType::F16) {
        candle_core::bail!(
            "wide product: (rows, k) and (n, k) of one reduced-precision dtype, given {:?} {:?} \
             and {:?} {:?}",
            x.dims(),
            x.dtype(),
            w.dims(),
            w.dtype()
        );
    }
    x.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &WideProduct)
}

/// How far [`product`] on `device` lies from the CPU's, relative to the size of the result
/// (the largest |difference| / max(1, |value|)), on made-up `dtype` operands of a few rows and
/// odd widths. Zero on the CPU.
pub fn check(device: &Device, dtype: DType) -> Result<f32> {
    let (rows, k, n) = (7, 260, 45);
    let mut rand = super::uniform(0x9E37_79B9_7F4A_7C15);
    let mut values = |len: usize| -> Vec<f32> { (0..len).map(|_| 2.0 * rand() - 1.0).collect() };
    let x = Tensor::new(values(rows * k), &Device::Cpu)?
        .reshape((rows, k))?
        .to_dtype(dtype)?;
    let w = Tensor::new(values(n * k), &Device::Cpu)?
        .reshape((n, k))?
        .to_dtype(dtype)?;
    let want = product(&x, &w)?.flatten_all()?.to_vec1::<f32>()?;
    let got = product(&x.to_device(device)?, &w.to_device(device)?)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(got
        .iter()
        .zip(&want)
        .map(|(g, w)| {
            if g.is_nan() != w.is_nan() {
                f32::INFINITY
            } else {
                (g - w).abs() / w.abs().max(1.0)
            }
        })
        .fold(0.0, f32::max))
}

struct WideProduct;

/// `(rows, k, n)` of the operands' layouts, each contiguous.
fn dims(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize)> {
    let ((rows, k), (n, _)) = (l1.shape().dims2()?, l2.shape().dims2()?);
    if !l1.is_contiguous() || !l2.is_contiguous() {
        candle_core::bail!("wide product: contiguous operands");
    }
    Ok((rows, k, n))
}

/// `len` elements of a contiguous operand from `at`, as float32, into `out`.
fn widen_into(s: &CpuStorage, at: usize, len: usize, out: &mut Vec<f32>) -> Result<()> {
    out.clear();
    match s {
        CpuStorage::BF16(v) => out.extend(v[at..at + len].iter().map(|x| bf16::to_f32(*x))),
        CpuStorage::F16(v) => out.extend(v[at..at + len].iter().map(|x| f16::to_f32(*x))),
        _ => candle_core::bail!("wide product: bfloat16 or float16 operands"),
    }
    Ok(())
}

/// Σ a[i] b[i] in float32, in eight lanes (which the compiler vectorises).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

impl CustomOp2 for WideProduct {
    fn name(&self) -> &'static str {
        "wide-product"
    }

    /// Each of `w`'s rows widened once, against every row of `x`: the columns of the result
    /// in parallel, then laid out by rows.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, k, n) = dims(l1, l2)?;
        let mut x = Vec::new();
        widen_into(s1, l1.start_offset(), rows * k, &mut x)?;
        let w_at = l2.start_offset();
        let mut columns = vec![0f32; n * rows];
        if rows > 0 && k > 0 {
            columns.par_chunks_mut(rows).enumerate().try_for_each_init(
                Vec::new,
                |w, (j, column)| -> Result<()> {
                    widen_into(s2, w_at + j * k, k, w)?;
                    for (y, x) in column.iter_mut().zip(x.chunks(k)) {
                        *y = dot(x, w);
                    }
                    Ok(())
                },
            )?;
        }
        let mut out = vec![0f32; rows * n];
        for (j, column) in columns.chunks(rows.max(1)).enumerate() {
            for (r, &y) in column.iter().enumerate() {
                out[r * n + j] = y;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, k, n) = dims(l1, l2)?;
        let out = cuda::product(s1, l1, s2, l2, (rows, k, n))?;
        Ok((out, Shape::from((rows, n))))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::ffi::c_void;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr,
    };
    use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Result};
    use half::{bf16, f16};

    pub(super) fn product(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        (rows, k, n): (usize, usize, usize),
    ) -> Result<CudaStorage> {
        let dev = s1.device();
        let (x, w) = ((rows * k, l1.start_offset()), (n * k, l2.start_offset()));
        // each operand's elements of dtype T, cut to its length
        fn cut<T: CudaDType>(
            s: &CudaStorage,
            (len, at): (usize, usize),
        ) -> Result<CudaView<'_, T>> {
            Ok(s.as_cuda_slice::<T>()?.slice(at..at + len))
        }
        let out = match s1.dtype() {
            DType::BF16 => {
                let ty = sys::cudaDataType_t::CUDA_R_16BF;
                gemm(dev, cut::<bf16>(s1, x)?, cut(s2, w)?, ty, (rows, k, n))?
            }
            DType::F16 => {
                let ty = sys::cudaDataType_t::CUDA_R_16F;
                gemm(dev, cut::<f16>(s1, x)?, cut(s2, w)?, ty, (rows, k, n))?
            }
            d => candle_core::bail!("wide product: a {d:?} operand"),
        };
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    /// Row-major `y = x wᵀ` is column-major `yᵀ = w xᵀ`: cuBLAS's A is `w` read transposed
    /// (stored `k` by `n` column-major), its B `x` as stored (`k` by `rows`), its C `y`
    /// (`n` by `rows`).
    fn gemm<T: DeviceRepr>(
        dev: &CudaDevice,
        x: CudaView<'_, T>,
        w: CudaView<'_, T>,
        dtype: sys::cudaDataType_t,
        (rows, k, n): (usize, usize, usize),
    ) -> Result<CudaSlice<f32>> {
        if rows == 0 || n == 0 || k == 0 {
            return dev.alloc_zeros::<f32>(rows * n);
        }
        let int = |v: usize| {
            i32::try_from(v).map_err(|_| candle_core::Error::Msg("wide product: too large".into()))
        };
        let (m_, n_, k_) = (int(n)?, int(rows)?, int(k)?);
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: the product writes every element (beta 0).
        let mut y = unsafe { dev.alloc::<f32>(rows * n)? };
        {
            let blas = dev.cublas_handle();
            let stream = dev.cuda_stream();
            let (w_ptr, _w) = w.device_ptr(&stream);
            let (x_ptr, _x) = x.device_ptr(&stream);
            let (y_ptr, _y) = y.device_ptr_mut(&stream);
            // SAFETY: the three buffers hold n * k, rows * k and rows * n elements of the types
            // named (the views were cut to those lengths), the leading dimensions are the rows'
            // lengths of contiguous operands, and alpha and beta are float32 as a float32
            // compute type reads them.
            unsafe {
                gemm_ex(
                    *blas.handle(),
                    sys::cublasOperation_t::CUBLAS_OP_T,
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    m_,
                    n_,
                    k_,
                    (&alpha as *const f32).cast::<c_void>(),
                    w_ptr as *const c_void,
                    dtype,
                    k_,
                    x_ptr as *const c_void,
                    dtype,
                    k_,
                    (&beta as *const f32).cast::<c_void>(),
                    y_ptr as *mut c_void,
                    sys::cudaDataType_t::CUDA_R_32F,
                    m_,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .w()?;
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_product_is_the_float32_product_of_the_widened_operands() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::BF16, DType::F16] {
            let x =
                Tensor::new(&[[1.5f32, -2.0, 0.25], [3.0, 0.5, -1.0]], &dev)?.to_dtype(dtype)?;
            let w = Tensor::new(&[[0.5f32, 1.0, 2.0], [-1.0, 0.0, 4.0]], &dev)?.to_dtype(dtype)?;
            let y = product(&x, &w)?;
            assert_eq!(y.dtype(), DType::F32);
            assert_eq!(y.to_vec2::<f32>()?, [[-0.75, -0.5], [0.0, -7.0]]);
            // a sum no bfloat16 holds: 1 + 2^-10 (bfloat16 rounds it to 1)
            let x = Tensor::new(&[[1.0f32, 1.0]], &dev)?.to_dtype(dtype)?;
            let w = Tensor::new(&[[1.0f32, 1.0 / 1024.0]], &dev)?.to_dtype(dtype)?;
            assert_eq!(product(&x, &w)?.to_vec2::<f32>()?, [[1.0 + 1.0 / 1024.0]]);
            // a transposed view is made contiguous first
            let wt = w.t()?.contiguous()?.t()?;
            assert_eq!(product(&x, &wt)?.to_vec2::<f32>()?, [[1.0 + 1.0 / 1024.0]]);
        }
        assert!(product(
            &Tensor::zeros((1, 2), DType::F32, &dev)?,
            &Tensor::zeros((1, 2), DType::F32, &dev)?
        )
        .is_err());
        assert_eq!(check(&dev, DType::BF16)?, 0.0);
        // widths past the eight lanes, against float64 sums
        let (rows, k, n) = (3, 37, 5);
        let v = |len: usize, s: f32| -> Vec<f32> {
            (0..len)
                .map(|i| ((i as f32 * s).sin() * 4.0).round() / 4.0)
                .collect()
        };
        let (xv, wv) = (v(rows * k, 0.7), v(n * k, 1.3));
        let x = Tensor::from_slice(&xv, (rows, k), &dev)?.to_dtype(DType::BF16)?;
        let w = Tensor::from_slice(&wv, (n, k), &dev)?.to_dtype(DType::BF16)?;
        let got = product(&x, &w)?.to_vec2::<f32>()?;
        for r in 0..rows {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|i| xv[r * k + i] as f64 * wv[j * k + i] as f64)
                    .sum();
                assert_eq!(got[r][j] as f64, want, "({r}, {j})");
            }
        }
        Ok(())
    }
}
