//! `y = x Wᵀ` for the few rows a decode step has, on x86-64 CPUs with AVX-512.
//!
//! candle's gemm is tuned for large matrices: at 1 to 32 rows it leaves half the memory
//! bandwidth (batch 1) or half the FMA throughput (batch 16) unused. Here each output is one
//! dot product of a row of `x` with a row of `W` (PyTorch's `(out, in)` layout, read in place),
//! computed 4x4 outputs at a time in registers, with the rows of `W` split over the cores.
//! Float32 weights use FMA; bfloat16 weights use `vdpbf16ps` (x rounded to bfloat16), which
//! halves the bytes read at batch 1 and doubles the arithmetic rate when batched.
//!
//! Every output is accumulated in the same order whatever the number of rows, so a sequence
//! gets bit-identical results alone or in any batch.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Whether this CPU runs the kernels (checked once).
pub fn supported(dtype: DType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX512: OnceLock<(bool, bool)> = OnceLock::new();
        let (f32_ok, bf16_ok) = *AVX512.get_or_init(|| {
            let f = std::arch::is_x86_feature_detected!("avx512f");
            (f, f && std::arch::is_x86_feature_detected!("avx512bf16") && std::arch::is_x86_feature_detected!("avx512bw"))
        });
        match dtype {
            DType::F32 => f32_ok,
            DType::BF16 => bf16_ok,
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = dtype;
        false
    }
}

/// `x (m, k)` float32 times `w (n, k)`ᵀ float32 or bfloat16 -> `(m, n)` float32.
pub fn xwt(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.apply_op2_no_bwd(w, &XwtOp)
}

struct XwtOp;

/// Rows of `W` per parallel task: large enough to amortise scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 128;

impl CustomOp2 for XwtOp {
    fn name(&self) -> &'static str {
        "skinny-xwt"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("skinny-xwt: x is {m}x{k} but W is {n}x{k2}");
        }
        let (Some((x0, x1)), Some((w0, w1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("skinny-xwt: operands must be contiguous");
        };
        let x = &s1.as_slice::<f32>()?[x0..x1];
        let mut out = vec![0f32; m * n];
        match s2 {
            CpuStorage::F32(w) => run(&mut out, m, n, |rows, dst| kernels::f32_rows(x, m, k, &w[w0..w1], rows, dst)),
            CpuStorage::BF16(w) => {
                let xb = kernels::to_bf16(x);
                // SAFETY: half::bf16 is a transparent u16.
                let wb: &[u16] = unsafe { std::slice::from_raw_parts(w[w0..w1].as_ptr() as *const u16, w1 - w0) };
                run(&mut out, m, n, |rows, dst| kernels::bf16_rows(&xb, m, k, wb, rows, dst))
            }
            _ => candle_core::bail!("skinny-xwt: weights must be f32 or bf16"),
        }
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// Splits the `n` rows of W into tasks; each task fills its columns of `out` (m, n).
fn run(out: &mut [f32], m: usize, n: usize, task: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync) {
    let tasks = n.div_ceil(ROWS_PER_TASK);
    // Each task computes a (m, rows) block into its own buffer, then it is copied into place.
    let blocks: Vec<(std::ops::Range<usize>, Vec<f32>)> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let rows = t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(n);
            let mut dst = vec![0f32; m * rows.len()];
            task(rows.clone(), &mut dst);
            (rows, dst)
        })
        .collect();
    for (rows, dst) in blocks {
        let w = rows.len();
        for i in 0..m {
            out[i * n + rows.start..i * n + rows.end].copy_from_slice(&dst[i * w..(i + 1) * w]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod kernels {
    use std::arch::x86_64::*;

    /// Rounds float32 to bfloat16 (nearest even), as `vcvtneps2bf16` does.
    pub fn to_bf16(x: &[f32]) -> Vec<u16> {
        x.iter()
            .map(|v| {
                let b = v.to_bits();
                let round = 0x7FFF + ((b >> 16) & 1);
                (b.wrapping_add(round) >> 16) as u16
            })
            .collect()
    }

    /// `dst (m, rows) = x (m, k) · W[rows]ᵀ`, W float32 `(n, k)`.
    pub fn f32_rows(x: &[f32], m: usize, k: usize, w: &[f32], rows: std::ops::Range<usize>, dst: &mut [f32]) {
        // SAFETY: `supported(F32)` checked avx512f before this op was chosen.
        unsafe { f32_rows_avx512(x, m, k, w, rows, dst) }
    }

    /// As `f32_rows` with bfloat16 `x` and W.
    pub fn bf16_rows(x: &[u16], m: usize, k: usize, w: &[u16], rows: std::ops::Range<usize>, dst: &mut [f32]) {
        // SAFETY: `supported(BF16)` checked avx512f/bf16/bw before this op was chosen.
        unsafe { bf16_rows_avx512(x, m, k, w, rows, dst) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn f32_rows_avx512(x: &[f32], m: usize, k: usize, w: &[f32], rows: std::ops::Range<usize>, dst: &mut [f32]) {
        let full = k / 16 * 16;
        let tail: __mmask16 = ((1u32 << (k - full)) - 1) as __mmask16;
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        // MR rows of x (from x_row) by NR rows of W (from w_row) -> dst[x_row.., col..]
        #[inline(always)]
        unsafe fn tile<const MR: usize, const NR: usize>(
            xp: *const f32, wp: *const f32, k: usize, full: usize, tail: __mmask16,
            x_row: usize, w_row: usize, col: usize, width: usize, dst: &mut [f32],
        ) {
            let mut acc = [[_mm512_setzero_ps(); NR]; MR];
            let mut kk = 0;
            while kk < full {
                let mut wv = [_mm512_setzero_ps(); NR];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(wp.add((w_row + j) * k + kk));
                }
                for (a, row) in acc.iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(xp.add((x_row + a) * k + kk));
                    for (j, c) in row.iter_mut().enumerate() {
                        *c = _mm512_fmadd_ps(xv, wv[j], *c);
                    }
                }
                kk += 16;
            }
            if full < k {
                let mut wv = [_mm512_setzero_ps(); NR];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(tail, wp.add((w_row + j) * k + full));
                }
                for (a, row) in acc.iter_mut().enumerate() {
                    let xv = _mm512_maskz_loadu_ps(tail, xp.add((x_row + a) * k + full));
                    for (j, c) in row.iter_mut().enumerate() {
                        *c = _mm512_fmadd_ps(xv, wv[j], *c);
                    }
                }
            }
            for (a, row) in acc.iter().enumerate() {
                for (j, c) in row.iter().enumerate() {
                    dst[(x_row + a) * width + col + j] = _mm512_reduce_add_ps(*c);
                }
            }
        }
        let width = rows.len();
        let mut r = 0;
        while r < width {
            let nr = (width - r).min(4);
            let mut i = 0;
            while i < m {
                let mr = (m - i).min(4);
                let w_row = rows.start + r;
                match (mr, nr) {
                    (4, 4) => tile::<4, 4>(xp, wp, k, full, tail, i, w_row, r, width, dst),
                    (_, 4) => {
                        for a in 0..mr {
                            tile::<1, 4>(xp, wp, k, full, tail, i + a, w_row, r, width, dst)
                        }
                    }
                    (4, _) => {
                        for c in 0..nr {
                            tile::<4, 1>(xp, wp, k, full, tail, i, w_row + c, r + c, width, dst)
                        }
                    }
                    _ => {
                        for a in 0..mr {
                            for c in 0..nr {
                                tile::<1, 1>(xp, wp, k, full, tail, i + a, w_row + c, r + c, width, dst)
                            }
                        }
                    }
                }
                i += mr;
            }
            r += nr;
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    unsafe fn bf16_rows_avx512(x: &[u16], m: usize, k: usize, w: &[u16], rows: std::ops::Range<usize>, dst: &mut [f32]) {
        let full = k / 32 * 32;
        let tail: __mmask32 = if k - full == 0 { 0 } else { ((1u64 << (k - full)) - 1) as __mmask32 };
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        #[inline(always)]
        unsafe fn load(p: *const u16) -> __m512bh {
            std::mem::transmute(_mm512_loadu_si512(p as *const __m512i))
        }
        #[inline(always)]
        unsafe fn load_tail(mask: __mmask32, p: *const u16) -> __m512bh {
            std::mem::transmute(_mm512_maskz_loadu_epi16(mask, p as *const i16))
        }
        #[inline(always)]
        unsafe fn tile<const MR: usize, const NR: usize>(
            xp: *const u16, wp: *const u16, k: usize, full: usize, tail: __mmask32,
            x_row: usize, w_row: usize, col: usize, width: usize, dst: &mut [f32],
        ) {
            let mut acc = [[_mm512_setzero_ps(); NR]; MR];
            let mut kk = 0;
            while kk < full {
                let mut wv: [__m512bh; NR] = [std::mem::transmute(_mm512_setzero_si512()); NR];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = load(wp.add((w_row + j) * k + kk));
                }
                for (a, row) in acc.iter_mut().enumerate() {
                    let xv = load(xp.add((x_row + a) * k + kk));
                    for (j, c) in row.iter_mut().enumerate() {
                        *c = _mm512_dpbf16_ps(*c, xv, wv[j]);
                    }
                }
                kk += 32;
            }
            if full < k {
                let mut wv: [__m512bh; NR] = [std::mem::transmute(_mm512_setzero_si512()); NR];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = load_tail(tail, wp.add((w_row + j) * k + full));
                }
                for (a, row) in acc.iter_mut().enumerate() {
                    let xv = load_tail(tail, xp.add((x_row + a) * k + full));
                    for (j, c) in row.iter_mut().enumerate() {
                        *c = _mm512_dpbf16_ps(*c, xv, wv[j]);
                    }
                }
            }
            for (a, row) in acc.iter().enumerate() {
                for (j, c) in row.iter().enumerate() {
                    dst[(x_row + a) * width + col + j] = _mm512_reduce_add_ps(*c);
                }
            }
        }
        let width = rows.len();
        let mut r = 0;
        while r < width {
            let nr = (width - r).min(4);
            let mut i = 0;
            while i < m {
                let mr = (m - i).min(4);
                let w_row = rows.start + r;
                match (mr, nr) {
                    (4, 4) => tile::<4, 4>(xp, wp, k, full, tail, i, w_row, r, width, dst),
                    (_, 4) => {
                        for a in 0..mr {
                            tile::<1, 4>(xp, wp, k, full, tail, i + a, w_row, r, width, dst)
                        }
                    }
                    (4, _) => {
                        for c in 0..nr {
                            tile::<4, 1>(xp, wp, k, full, tail, i, w_row + c, r + c, width, dst)
                        }
                    }
                    _ => {
                        for a in 0..mr {
                            for c in 0..nr {
                                tile::<1, 1>(xp, wp, k, full, tail, i + a, w_row + c, r + c, width, dst)
                            }
                        }
                    }
                }
                i += mr;
            }
            r += nr;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernels {
    pub fn to_bf16(_: &[f32]) -> Vec<u16> {
        unreachable!("supported() is false off x86-64")
    }
    pub fn f32_rows(_: &[f32], _: usize, _: usize, _: &[f32], _: std::ops::Range<usize>, _: &mut [f32]) {
        unreachable!("supported() is false off x86-64")
    }
    pub fn bf16_rows(_: &[u16], _: usize, _: usize, _: &[u16], _: std::ops::Range<usize>, _: &mut [f32]) {
        unreachable!("supported() is false off x86-64")
    }
}
