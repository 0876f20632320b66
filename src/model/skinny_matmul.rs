//! `y = x Wᵀ` for the few rows of a decode step (and the prompt rows of a prefill) on x86-64
//! CPUs with AVX-512.
//!
//! candle's gemm is tuned for large square-ish products: at 1 to 32 rows it leaves much of
//! the memory bandwidth (batch 1) or of the FMA throughput (batched) unused. Here `W` is packed
//! once, at load time, into panels of 16 output columns stored k-major (`[panel][k][16]`), so a
//! register tile of up to 8 rows x 48 columns accumulates with one broadcast of `x` and three
//! vector loads of `W` per k, and no horizontal reductions; `W` streams from memory once per
//! call whatever the number of rows. Float32 panels use FMA; bfloat16 panels hold pairs of
//! consecutive k (`[panel][k/2][16][2]`, k padded to whole AMX tile rows) for `vdpbf16ps`
//! (x rounded to bfloat16), which halves the bytes read at batch 1, or, where the CPU has
//! AMX (`super::amx`), for `tdpbf16ps` tiles, which multiply 16 rows at once: 2-3x faster
//! than AVX-512 from 4 rows up (prefill, batched decode).
//!
//! Every output is accumulated in the same order whatever the number of rows, so a sequence
//! gets bit-identical results alone or in any batch.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_features;

/// Output columns per panel (one 512-bit vector of f32).
pub const PANEL: usize = 16;

/// Whether this CPU runs the kernels for weights of `dtype`.
pub fn supported(dtype: DType) -> bool {
    let cpu = cpu_features::get();
    match dtype {
        DType::F32 => cpu.avx512,
        DType::BF16 => cpu.amx_bf16 || cpu.avx512_bf16,
        _ => false,
    }
}

/// bfloat16 panels hold `k` as pairs, padded to whole AMX tiles (16 pairs = 64 bytes a row);
/// the zero padding adds nothing to the dot products.
const PAIRS_BLOCK: usize = 16;

fn bf16_pairs(k: usize) -> usize {
    k.div_ceil(2).next_multiple_of(PAIRS_BLOCK)
}

/// One product's operands: `m` rows of x, each `k` elements long (float32, or bfloat16 pairs
/// with `k` the padded pair count), and W's packed panels.
pub(crate) struct Operands<'a, X, W> {
    pub x: &'a [X],
    pub m: usize,
    pub k: usize,
    pub w: &'a [W],
}

/// A weight `(n, k)` repacked into panels; the tensor holds the packed elements.
#[derive(Debug, Clone)]
pub struct PackedWeight {
    packed: Tensor,
    n: usize,
    k: usize,
}

impl PackedWeight {
    /// Packs `w` `(n, k)` (float32 or bfloat16, on the CPU).
    pub fn pack(w: &Tensor) -> candle_core::Result<Self> {
        let (n, k) = w.dims2()?;
        let panels = n.div_ceil(PANEL);
        let w = w.contiguous()?;
        let packed = match w.dtype() {
            DType::F32 => {
                let (storage, layout) = w.storage_and_layout();
                let candle_core::Storage::Cpu(cpu) = &*storage else {
                    candle_core::bail!("packing needs CPU weights");
                };
                let src =
                    &cpu.as_slice::<f32>()?[layout.start_offset()..layout.start_offset() + n * k];
                let mut dst = vec![0f32; panels * k * PANEL];
                for (row, chunk) in src.chunks_exact(k).enumerate() {
                    let (p, lane) = (row / PANEL, row % PANEL);
                    for (kk, &v) in chunk.iter().enumerate() {
                        dst[(p * k + kk) * PANEL + lane] = v;
                    }
                }
                Tensor::from_vec(dst, panels * k * PANEL, &candle_core::Device::Cpu)?
            }
            DType::BF16 => {
                let (storage, layout) = w.storage_and_layout();
                let candle_core::Storage::Cpu(cpu) = &*storage else {
                    candle_core::bail!("packing needs CPU weights");
                };
                let src = &cpu.as_slice::<half::bf16>()?
                    [layout.start_offset()..layout.start_offset() + n * k];
                let kp = bf16_pairs(k);
                let mut dst = vec![half::bf16::ZERO; panels * kp * PANEL * 2];
                for (row, chunk) in src.chunks_exact(k).enumerate() {
                    let (p, lane) = (row / PANEL, row % PANEL);
                    for (kk, &v) in chunk.iter().enumerate() {
                        dst[((p * kp + kk / 2) * PANEL + lane) * 2 + kk % 2] = v;
                    }
                }
                Tensor::from_vec(dst, panels * kp * PANEL * 2, &candle_core::Device::Cpu)?
            }
            other => candle_core::bail!("cannot pack {other:?} weights"),
        };
        Ok(Self { packed, n, k })
    }

    /// Rows `ids` of the original `(n, k)` matrix, as float32 `(ids, k)` (the embedding lookup
    /// when the tied `wte` is stored packed for the original head).
    pub fn gather_rows(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let k = self.k;
        let mut out = Vec::with_capacity(ids.len() * k);
        let storage = self.packed.storage_and_layout();
        let (candle_core::Storage::Cpu(cpu), layout) = (&*storage.0, storage.1) else {
            candle_core::bail!("packed weights live on the CPU");
        };
        let start = layout.start_offset();
        for &id in ids {
            let id = id as usize;
            if id >= self.n {
                candle_core::bail!("row {id} out of range {}", self.n);
            }
            let (p, lane) = (id / PANEL, id % PANEL);
            match cpu {
                CpuStorage::F32(w) => {
                    out.extend((0..k).map(|kk| w[start + (p * k + kk) * PANEL + lane]))
                }
                CpuStorage::BF16(w) => {
                    let kp = bf16_pairs(k);
                    out.extend((0..k).map(|kk| {
                        w[start + ((p * kp + kk / 2) * PANEL + lane) * 2 + kk % 2].to_f32()
                    }))
                }
                _ => candle_core::bail!("packed weights are f32 or bf16"),
            }
        }
        Tensor::from_vec(out, (ids.len(), k), &candle_core::Device::Cpu)
    }

    /// `x (m, k)` float32 -> `(m, n)` float32.
    pub fn xwt(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.xwt_on(x, cpu_features::get().amx_bf16)
    }

    /// `xwt` with bfloat16 weights multiplied on AMX tiles or not (one choice per process:
    /// the two give slightly different bits).
    fn xwt_on(&self, x: &Tensor, amx: bool) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op2_no_bwd(
            &self.packed,
            &XwtOp {
                n: self.n,
                k: self.k,
                amx,
            },
        )
    }
}

struct XwtOp {
    n: usize,
    k: usize,
    amx: bool,
}

/// Panels per parallel task: enough work to amortise scheduling, enough tasks to balance.
const PANELS_PER_TASK: usize = 12;

impl CustomOp2 for XwtOp {
    fn name(&self) -> &'static str {
        "packed-xwt"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let n = self.n;
        if k != self.k {
            candle_core::bail!("packed-xwt: x has {k} columns, W has {}", self.k);
        }
        let (Some((x0, x1)), Some((w0, w1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("packed-xwt: operands must be contiguous");
        };
        let x = &s1.as_slice::<f32>()?[x0..x1];
        let panels = n.div_ceil(PANEL);
        let mut out = vec![0f32; m * n];
        match s2 {
            CpuStorage::F32(w) => {
                let ops = Operands {
                    x,
                    m,
                    k,
                    w: &w[w0..w1],
                };
                run(&mut out, m, n, panels, |p, cols, dst| {
                    kernels::f32_panels(&ops, p, cols, dst)
                });
            }
            CpuStorage::BF16(w) => {
                let amx = self.amx;
                // AMX multiplies blocks of up to 16 rows: more rows are padded to whole blocks.
                let rows = if amx && m > 16 {
                    m.next_multiple_of(16)
                } else {
                    m
                };
                let xb = kernels::to_bf16_pairs(x, m, k, rows, bf16_pairs(k));
                // SAFETY: half::bf16 is a transparent u16.
                let w: &[u16] = unsafe {
                    std::slice::from_raw_parts(w[w0..w1].as_ptr() as *const u16, w1 - w0)
                };
                let ops = Operands {
                    x: &xb,
                    m,
                    k: bf16_pairs(k),
                    w,
                };
                run(&mut out, m, n, panels, |p, cols, dst| {
                    kernels::bf16_panels(&ops, amx, p, cols, dst)
                });
            }
            _ => candle_core::bail!("packed-xwt: weights must be f32 or bf16"),
        }
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// Splits the panels into tasks; a task fills a `(m, cols)` block that is then copied into
/// its columns of `out (m, n)`.
fn run(
    out: &mut [f32],
    m: usize,
    n: usize,
    panels: usize,
    task: impl Fn(std::ops::Range<usize>, usize, &mut [f32]) + Sync,
) {
    let tasks = panels.div_ceil(PANELS_PER_TASK);
    let blocks: Vec<(usize, usize, Vec<f32>)> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let p = t * PANELS_PER_TASK..((t + 1) * PANELS_PER_TASK).min(panels);
            let col0 = p.start * PANEL;
            let cols = (p.end * PANEL).min(n) - col0;
            let mut dst = vec![0f32; m * cols];
            task(p, cols, &mut dst);
            (col0, cols, dst)
        })
        .collect();
    for (col0, cols, dst) in blocks {
        for i in 0..m {
            out[i * n + col0..i * n + col0 + cols].copy_from_slice(&dst[i * cols..(i + 1) * cols]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod kernels {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Operands, PANEL};

    /// Rows of x per register tile and panels per tile (8 x 3 accumulators of 16 lanes).
    const MR: usize = 8;
    const NV: usize = 3;

    /// x `(m, k)` as bfloat16 pairs `(rows, kp)` of u32 (element 2j in the low half), zero
    /// beyond `m` rows and `k` columns.
    pub fn to_bf16_pairs(x: &[f32], m: usize, k: usize, rows: usize, kp: usize) -> Vec<u32> {
        let round = |v: f32| {
            let b = v.to_bits();
            (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
        };
        let mut out = vec![0u32; rows * kp];
        for i in 0..m {
            for j in 0..k.div_ceil(2) {
                let lo = round(x[i * k + 2 * j]);
                let hi = if 2 * j + 1 < k {
                    round(x[i * k + 2 * j + 1])
                } else {
                    0
                };
                out[i * kp + j] = lo as u32 | ((hi as u32) << 16);
            }
        }
        out
    }

    /// `dst (m, cols) = x (m, k) · W[panels]ᵀ` from float32 panels.
    pub fn f32_panels(
        ops: &Operands<f32, f32>,
        panels: Range<usize>,
        cols: usize,
        dst: &mut [f32],
    ) {
        // SAFETY: `supported(F32)` checked avx512f before weights were packed for this path.
        unsafe { f32_panels_avx512(ops, panels, cols, dst) }
    }

    /// As `f32_panels` with bfloat16 pairs of x and panels of W, on AMX tiles or not.
    pub fn bf16_panels(
        ops: &Operands<u32, u16>,
        amx: bool,
        panels: Range<usize>,
        cols: usize,
        dst: &mut [f32],
    ) {
        if amx {
            // SAFETY: the caller asks for AMX only when `cpu_features` found AMX-BF16 and got
            // the tile permission; the kernel asserts the extents it reads and writes.
            unsafe { crate::model::amx::bf16_panels_amx(ops, panels, cols, dst) }
        } else {
            // SAFETY: `supported(BF16)` checked avx512f/bf16/bw before weights were packed.
            unsafe { bf16_panels_avx512(ops, panels, cols, dst) }
        }
    }

    /// Stores `acc` to `dst[row][col..col+16]`, masked to the valid columns.
    #[inline(always)]
    unsafe fn store(dst: *mut f32, valid: usize, acc: __m512) {
        if valid >= PANEL {
            _mm512_storeu_ps(dst, acc);
        } else {
            _mm512_mask_storeu_ps(dst, ((1u32 << valid) - 1) as __mmask16, acc);
        }
    }

    macro_rules! dispatch {
        ($tile:ident, $mr:expr, $nv:expr, ($($arg:expr),*)) => {
            match ($mr, $nv) {
                (8, 3) => $tile::<8, 3>($($arg),*), (8, 2) => $tile::<8, 2>($($arg),*), (8, 1) => $tile::<8, 1>($($arg),*),
                (7, 3) => $tile::<7, 3>($($arg),*), (7, 2) => $tile::<7, 2>($($arg),*), (7, 1) => $tile::<7, 1>($($arg),*),
                (6, 3) => $tile::<6, 3>($($arg),*), (6, 2) => $tile::<6, 2>($($arg),*), (6, 1) => $tile::<6, 1>($($arg),*),
                (5, 3) => $tile::<5, 3>($($arg),*), (5, 2) => $tile::<5, 2>($($arg),*), (5, 1) => $tile::<5, 1>($($arg),*),
                (4, 3) => $tile::<4, 3>($($arg),*), (4, 2) => $tile::<4, 2>($($arg),*), (4, 1) => $tile::<4, 1>($($arg),*),
                (3, 3) => $tile::<3, 3>($($arg),*), (3, 2) => $tile::<3, 2>($($arg),*), (3, 1) => $tile::<3, 1>($($arg),*),
                (2, 3) => $tile::<2, 3>($($arg),*), (2, 2) => $tile::<2, 2>($($arg),*), (2, 1) => $tile::<2, 1>($($arg),*),
                (1, 3) => $tile::<1, 3>($($arg),*), (1, 2) => $tile::<1, 2>($($arg),*), _ => $tile::<1, 1>($($arg),*),
            }
        };
    }

    /// Walks the register tiles of a task: up to `NV` panels at a time, each against all rows
    /// of x in blocks of `MR` (the panels stay in L2 while the rows go by).
    #[inline(always)]
    fn drive(m: usize, panels: &Range<usize>, mut tile: impl FnMut(usize, usize, usize, usize)) {
        let mut p = panels.start;
        while p < panels.end {
            let nv = (panels.end - p).min(NV);
            let mut row = 0;
            while row < m {
                let mr = (m - row).min(MR);
                tile(mr, nv, row, p);
                row += mr;
            }
            p += nv;
        }
    }

    /// One register tile: rows `row..row+R` of x by panels `p..p+V`.
    // A register tile needs the operands' raw pointers and extents; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tile_f32<const R: usize, const V: usize>(
        x: *const f32,
        k: usize,
        w: *const f32,
        row: usize,
        p: usize,
        p0: usize,
        cols: usize,
        dst: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let panel = |v: usize| w.add((p + v) * k * PANEL);
        for kk in 0..k {
            let mut wv = [_mm512_setzero_ps(); V];
            for (v, slot) in wv.iter_mut().enumerate() {
                *slot = _mm512_loadu_ps(panel(v).add(kk * PANEL));
            }
            for (r, accs) in acc.iter_mut().enumerate() {
                let xb = _mm512_set1_ps(*x.add((row + r) * k + kk));
                for (v, a) in accs.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(xb, wv[v], *a);
                }
            }
        }
        for (r, accs) in acc.iter().enumerate() {
            for (v, a) in accs.iter().enumerate() {
                let col = (p + v - p0) * PANEL;
                if col < cols {
                    store(dst.add((row + r) * cols + col), cols - col, *a);
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn f32_panels_avx512(
        ops: &Operands<f32, f32>,
        panels: Range<usize>,
        cols: usize,
        dst: &mut [f32],
    ) {
        let (m, k) = (ops.m, ops.k);
        let (xp, wp, dp) = (ops.x.as_ptr(), ops.w.as_ptr(), dst.as_mut_ptr());
        drive(m, &panels, |mr, nv, row, p| {
            dispatch!(
                tile_f32,
                mr,
                nv,
                (xp, k, wp, row, p, panels.start, cols, dp)
            )
        });
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tile_bf16<const R: usize, const V: usize>(
        x: *const u32,
        kp: usize,
        w: *const u16,
        row: usize,
        p: usize,
        p0: usize,
        cols: usize,
        dst: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let panel = |v: usize| w.add((p + v) * kp * PANEL * 2);
        for j in 0..kp {
            let mut wv: [__m512bh; V] =
                [std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()); V];
            for (v, slot) in wv.iter_mut().enumerate() {
                *slot = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    panel(v).add(j * PANEL * 2) as *const __m512i,
                ));
            }
            for (r, accs) in acc.iter_mut().enumerate() {
                let pair = *x.add((row + r) * kp + j) as i32;
                let xb = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair));
                for (v, a) in accs.iter_mut().enumerate() {
                    *a = _mm512_dpbf16_ps(*a, xb, wv[v]);
                }
            }
        }
        for (r, accs) in acc.iter().enumerate() {
            for (v, a) in accs.iter().enumerate() {
                let col = (p + v - p0) * PANEL;
                if col < cols {
                    store(dst.add((row + r) * cols + col), cols - col, *a);
                }
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    unsafe fn bf16_panels_avx512(
        ops: &Operands<u32, u16>,
        panels: Range<usize>,
        cols: usize,
        dst: &mut [f32],
    ) {
        let (m, kp) = (ops.m, ops.k);
        let (xp, wp, dp) = (ops.x.as_ptr(), ops.w.as_ptr(), dst.as_mut_ptr());
        drive(m, &panels, |mr, nv, row, p| {
            dispatch!(
                tile_bf16,
                mr,
                nv,
                (xp, kp, wp, row, p, panels.start, cols, dp)
            )
        });
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernels {
    use super::Operands;
    use std::ops::Range;

    pub fn to_bf16_pairs(_: &[f32], _: usize, _: usize, _: usize, _: usize) -> Vec<u32> {
        unreachable!("supported() is false off x86-64")
    }
    pub fn f32_panels(_: &Operands<f32, f32>, _: Range<usize>, _: usize, _: &mut [f32]) {
        unreachable!("supported() is false off x86-64")
    }
    pub fn bf16_panels(_: &Operands<u32, u16>, _: bool, _: Range<usize>, _: usize, _: &mut [f32]) {
        unreachable!("supported() is false off x86-64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn packed_kernels_match_a_plain_matmul_for_every_tile_shape() -> candle_core::Result<()> {
        let cpu = cpu_features::get();
        let kernels = [
            (DType::F32, cpu.avx512, false),
            (DType::BF16, cpu.avx512_bf16, false),
            (DType::BF16, cpu.amx_bf16, true),
        ];
        for (dtype, _, amx) in kernels.into_iter().filter(|k| k.1) {
            // odd sizes exercise the partial panels, row tiles and blocks, and the k padding
            for (m, n, k) in [
                (1, 37, 19),
                (3, 50, 64),
                (9, 100, 33),
                (17, 16, 8),
                (35, 90, 70),
            ] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
                let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?.to_dtype(dtype)?;
                let want = x
                    .to_dtype(dtype)?
                    .to_dtype(DType::F32)?
                    .matmul(&w.to_dtype(DType::F32)?.t()?)?;
                let packed = PackedWeight::pack(&w)?;
                let got = packed.xwt_on(&x, amx)?;
                let diff = (want - &got)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-3, "{dtype:?} amx {amx} {m}x{n}x{k}: {diff}");
                // a row alone gives the same bits as within the batch
                let alone = packed.xwt_on(&x.narrow(0, m - 1, 1)?, amx)?;
                let in_batch = got.narrow(0, m - 1, 1)?;
                assert_eq!(alone.to_vec2::<f32>()?, in_batch.to_vec2::<f32>()?);
            }
        }
        Ok(())
    }
}
