//! `y = x Wᵀ` for the few rows of a decode step (and the prompt rows of a prefill) on x86-64
//! CPUs with AVX-512 (here) or AVX2 + FMA (`super::avx2`, the same layouts in 8 lanes).
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

/// What the panels hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    F32,
    Bf16,
    Int8,
}

/// The instruction set a panel product runs on; one of `Isa::available(kind)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX2 + FMA, 8 lanes (`super::avx2`).
    Avx2,
    /// AVX-512: FMA for f32, `vdpbf16ps` for bf16, VNNI `vpdpwssd` for int8.
    Avx512,
    /// AMX `tdpbf16ps` tiles (bf16 only).
    Amx,
}

impl Isa {
    /// The instruction sets this CPU has for `kind`, fastest first (no allocation: it runs
    /// on every product).
    pub fn available(kind: Kind) -> impl Iterator<Item = Isa> {
        let cpu = cpu_features::get();
        let avx512 = match kind {
            Kind::F32 => cpu.avx512,
            Kind::Bf16 => cpu.avx512_bf16,
            Kind::Int8 => cpu.avx512_vnni,
        };
        [
            (Isa::Amx, kind == Kind::Bf16 && cpu.amx_bf16),
            (Isa::Avx512, avx512),
            (Isa::Avx2, cpu.avx2_fma),
        ]
        .into_iter()
        .filter(|c| c.1)
        .map(|c| c.0)
    }

    fn best(kind: Kind) -> Option<Isa> {
        Self::available(kind).next()
    }
}

/// Whether this CPU runs the kernels for weights of `dtype`.
pub fn supported(dtype: DType) -> bool {
    match dtype {
        DType::F32 => Isa::best(Kind::F32).is_some(),
        DType::BF16 => Isa::best(Kind::Bf16).is_some(),
        _ => false,
    }
}

/// Whether this CPU runs the int8 kernel (AVX-512 VNNI or AVX2).
pub fn supports_int8() -> bool {
    Isa::best(Kind::Int8).is_some()
}

/// bfloat16 panels hold `k` as pairs, padded to whole AMX tiles (16 pairs = 64 bytes a row);
/// the zero padding adds nothing to the dot products.
const PAIRS_BLOCK: usize = 16;

fn bf16_pairs(k: usize) -> usize {
    k.div_ceil(2).next_multiple_of(PAIRS_BLOCK)
}

/// Where element `kk` of row `lane` of panel `p` lies in pair panels `[panel][kp][16][2]`
/// (bfloat16 and int8).
fn pair_slot(p: usize, kp: usize, lane: usize, kk: usize) -> usize {
    ((p * kp + kk / 2) * PANEL + lane) * 2 + kk % 2
}

/// The scale of symmetric quantization of `row` to `levels` either side of zero (1 for an
/// all-zero row).
fn symmetric_scale(row: &[f32], levels: f32) -> f32 {
    let peak = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    if peak > 0.0 {
        peak / levels
    } else {
        1.0
    }
}

/// `row` as pairs of 16-bit codes `q(v)` in u32s, element 2j in the low half (a missing last
/// element is 0); `out` has room for `ceil(row.len() / 2)` pairs.
fn pair_row(row: &[f32], out: &mut [u32], q: impl Fn(f32) -> u16) {
    for (o, pair) in out.iter_mut().zip(row.chunks(2)) {
        *o = q(pair[0]) as u32 | pair.get(1).map_or(0, |&v| (q(v) as u32) << 16);
    }
}

/// x `(m, k)` as bfloat16 pairs `(rows, kp)` (rounded to nearest even), zero beyond `m`
/// rows and `k` columns.
fn to_bf16_pairs(x: &[f32], m: usize, k: usize, rows: usize, kp: usize) -> Vec<u32> {
    let round = |v: f32| {
        let b = v.to_bits();
        (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
    };
    let mut out = vec![0u32; rows * kp];
    for (row, dst) in x.chunks_exact(k).take(m).zip(out.chunks_exact_mut(kp)) {
        pair_row(row, dst, round);
    }
    out
}

/// One product's operands: `m` rows of x, each `k` elements long (float32, or bfloat16 pairs
/// with `k` the padded pair count), and W's packed panels.
pub(crate) struct Operands<'a, X, W> {
    pub x: &'a [X],
    pub m: usize,
    pub k: usize,
    pub w: &'a [W],
}

impl<X, W> Operands<'_, X, W> {
    /// Panics unless x holds `m` rows of `k`, W holds `panels` (each `w_per_panel` elements)
    /// and `dst` a `(m, cols)` block of those panels' columns: the kernels index by pointer.
    pub fn assert_extents(
        &self,
        w_per_panel: usize,
        panels: &std::ops::Range<usize>,
        cols: usize,
        dst: &[f32],
    ) {
        assert!(self.x.len() >= self.m * self.k, "x shorter than m x k");
        assert!(
            self.w.len() >= panels.end * w_per_panel,
            "W shorter than its panels"
        );
        assert!(
            cols <= panels.len() * PANEL && dst.len() >= self.m * cols,
            "dst smaller than m x cols"
        );
    }
}

/// A weight `(n, k)` repacked into panels; the tensor holds the packed elements.
#[derive(Debug, Clone)]
pub struct PackedWeight {
    packed: Tensor,
    n: usize,
    k: usize,
    /// Int8 panels: each output column's scale (`panels * 16`, zero past `n`).
    scales: Option<Vec<f32>>,
}

impl PackedWeight {
    /// Packs `w` `(n, k)` (float32 or bfloat16, on the CPU); refuses a dtype this CPU has
    /// no kernel for, so that a packed weight is proof the kernel may run.
    pub fn pack(w: &Tensor) -> candle_core::Result<Self> {
        if !supported(w.dtype()) {
            candle_core::bail!("this CPU has no packed kernel for {:?} weights", w.dtype());
        }
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
                        dst[pair_slot(p, kp, lane, kk)] = v;
                    }
                }
                Tensor::from_vec(dst, panels * kp * PANEL * 2, &candle_core::Device::Cpu)?
            }
            other => candle_core::bail!("cannot pack {other:?} weights"),
        };
        Ok(Self {
            packed,
            n,
            k,
            scales: None,
        })
    }

    /// Quantizes float32 `w` `(n, k)` to int8 with one scale per output row (symmetric:
    /// w ≈ scale · q, q in -127..=127), in pair panels `[panel][k/2][16][2]`. The kernel
    /// multiplies q exactly by x quantized per row to int16 (AVX-512 VNNI `vpdpwssd`), so
    /// the result is x · (scale q)ᵀ up to x's 16-bit rounding.
    pub fn pack_int8(w: &Tensor) -> candle_core::Result<Self> {
        if !supports_int8() {
            candle_core::bail!("int8 weights need AVX2 or AVX-512 VNNI, which this CPU lacks");
        }
        let (n, k) = w.dims2()?;
        let panels = n.div_ceil(PANEL);
        let w = w.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("packing needs CPU weights");
        };
        let src = &cpu.as_slice::<f32>()?[layout.start_offset()..layout.start_offset() + n * k];
        let kp = k.div_ceil(2);
        let mut dst = vec![0u8; panels * kp * PANEL * 2];
        let mut scales = vec![0f32; panels * PANEL];
        for (row, chunk) in src.chunks_exact(k).enumerate() {
            let (p, lane) = (row / PANEL, row % PANEL);
            let scale = symmetric_scale(chunk, 127.0);
            scales[row] = scale;
            for (kk, &v) in chunk.iter().enumerate() {
                let q = (v / scale).round().clamp(-127.0, 127.0) as i8;
                dst[pair_slot(p, kp, lane, kk)] = q as u8;
            }
        }
        Ok(Self {
            packed: Tensor::from_vec(dst, panels * kp * PANEL * 2, &candle_core::Device::Cpu)?,
            n,
            k,
            scales: Some(scales),
        })
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
                    out.extend((0..k).map(|kk| w[start + pair_slot(p, kp, lane, kk)].to_f32()))
                }
                CpuStorage::U8(w) => {
                    let (kp, scale) = (k.div_ceil(2), self.scales.as_ref().map_or(1.0, |s| s[id]));
                    out.extend(
                        (0..k).map(|kk| w[start + pair_slot(p, kp, lane, kk)] as i8 as f32 * scale),
                    )
                }
                _ => candle_core::bail!("packed weights are f32, bf16 or int8"),
            }
        }
        Tensor::from_vec(out, (ids.len(), k), &candle_core::Device::Cpu)
    }

    /// Whether the panels are int8 (multiplied by the int8 kernels).
    pub fn is_int8(&self) -> bool {
        self.kind() == Kind::Int8
    }

    /// The same weight quantized to int8 (per-row scales, as [`Self::pack_int8`]): the cheap
    /// copy a draft reads in self-speculative decoding. An int8 weight is its own copy.
    pub fn to_int8(&self) -> candle_core::Result<Self> {
        if self.is_int8() {
            return Ok(self.clone());
        }
        let ids: Vec<u32> = (0..self.n as u32).collect();
        Self::pack_int8(&self.gather_rows(&ids)?)
    }

    fn kind(&self) -> Kind {
        match (self.packed.dtype(), &self.scales) {
            (DType::BF16, _) => Kind::Bf16,
            (_, Some(_)) => Kind::Int8,
            _ => Kind::F32,
        }
    }

    /// `x (m, k)` float32 -> `(m, n)` float32, on the fastest instruction set this CPU has
    /// for the weights (one choice per process: they may differ in the last bits).
    pub fn xwt(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let isa = Isa::best(self.kind()).expect("packing checked the CPU");
        self.xwt_on(x, isa)
    }

    /// `xwt` on `isa`, one of `Isa::available(self.kind())`.
    fn xwt_on(&self, x: &Tensor, isa: Isa) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op2_no_bwd(
            &self.packed,
            &XwtOp {
                n: self.n,
                k: self.k,
                isa,
                scales: self.scales.as_deref(),
            },
        )
    }
}

struct XwtOp<'a> {
    n: usize,
    k: usize,
    isa: Isa,
    scales: Option<&'a [f32]>,
}

/// Panels per parallel task, at most: enough work to amortise scheduling.
const PANELS_PER_TASK: usize = 12;
/// Tasks per thread, at least, where the panels allow: a weight of 64 panels (1024 outputs)
/// in tasks of 12 left one of two threads a third idle at the end (measured: `bench
/// --kernels`, 52 % of peak against 72 % for the wider products).
const TASKS_PER_THREAD: usize = 8;

impl CustomOp2 for XwtOp<'_> {
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
        let mut out = vec![0f32; m * n];
        match s2 {
            CpuStorage::F32(w) => {
                let ops = Operands {
                    x,
                    m,
                    k,
                    w: &w[w0..w1],
                };
                kernels::f32_product(&ops, self.isa, n, &mut out);
            }
            CpuStorage::U8(w) => {
                let Some(w_scales) = self.scales else {
                    candle_core::bail!("packed-xwt: int8 weights without scales");
                };
                let (xq, x_scales) = int16_pairs(x, m, k);
                // SAFETY: i8 and u8 have the same size and alignment; the bytes are i8 bits.
                let w: &[i8] =
                    unsafe { std::slice::from_raw_parts(w[w0..w1].as_ptr() as *const i8, w1 - w0) };
                let ops = Operands {
                    x: &xq,
                    m,
                    k: k.div_ceil(2),
                    w,
                };
                kernels::int8_product(&ops, self.isa, (&x_scales, w_scales), n, &mut out);
            }
            CpuStorage::BF16(w) => {
                let isa = self.isa;
                // AMX multiplies blocks of up to 16 rows: more rows are padded to whole blocks.
                let rows = if isa == Isa::Amx && m > 16 {
                    m.next_multiple_of(16)
                } else {
                    m
                };
                let xb = to_bf16_pairs(x, m, k, rows, bf16_pairs(k));
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
                kernels::bf16_product(&ops, isa, n, &mut out);
            }
            _ => candle_core::bail!("packed-xwt: weights must be f32, bf16 or int8"),
        }
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// The largest |x| level for int8 panels over `k` inputs: every exact product sum stays
/// inside int32 (each of the `ceil(k/2)` `vpdpwssd` steps adds at most 2 · 127 · level), and
/// within int16. 32767 up to k = 516; GPT-Neo-125M's widest input (3072) gets 5504, i.e. x
/// rounded to 1/11000 of its row's largest value.
fn x_levels(k: usize) -> i32 {
    let per_step = 2 * 127 * k.div_ceil(2).max(1) as i64;
    (i32::MAX as i64 / per_step).clamp(1, 32767) as i32
}

/// x `(m, k)` quantized per row (scale = max |x| / `x_levels(k)`) as int16 pairs
/// `(m, ceil(k/2))` of u32 with element 2j in the low half; returns the pairs and the row
/// scales.
fn int16_pairs(x: &[f32], m: usize, k: usize) -> (Vec<u32>, Vec<f32>) {
    let kp = k.div_ceil(2);
    let levels = x_levels(k) as f32;
    let mut pairs = vec![0u32; m * kp];
    let mut scales = vec![0f32; m];
    for ((row, dst), scale) in x
        .chunks_exact(k)
        .take(m)
        .zip(pairs.chunks_exact_mut(kp))
        .zip(scales.iter_mut())
    {
        *scale = symmetric_scale(row, levels);
        let s = *scale;
        pair_row(row, dst, |v| (v / s).round() as i16 as u16);
    }
    (pairs, scales)
}

/// One task's share of a product's output: columns `col0..col0 + cols` of `out (m, ld)`.
/// Only `run` makes them, one per task over disjoint columns, so tasks fill theirs in
/// parallel without copies.
pub(crate) struct OutBlock {
    ptr: *mut f32,
    m: usize,
    ld: usize,
    cols: usize,
}

impl OutBlock {
    /// Row 0, column 0 of the block; rows are `ld()` apart, `m` of them, `cols()` wide.
    pub fn as_mut_ptr(&self) -> *mut f32 {
        self.ptr
    }

    pub fn ld(&self) -> usize {
        self.ld
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Fills the block from a dense `(m, cols)` one (kernels that write their own block).
    fn copy_from(&mut self, dense: &[f32]) {
        assert!(dense.len() >= self.m * self.cols);
        for (i, row) in dense.chunks_exact(self.cols).take(self.m).enumerate() {
            // SAFETY: `run` made the block inside `out`: row i < m, `cols` columns from col0
            unsafe {
                std::ptr::copy_nonoverlapping(row.as_ptr(), self.ptr.add(i * self.ld), self.cols)
            };
        }
    }
}

/// A pointer the tasks of one `run` share; each writes only its own columns through it.
struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint columns (see `run`), and `run` outlives them all.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Splits the panels into tasks run in parallel; each task fills its columns of `out (m, n)`
/// through its `OutBlock`.
pub(crate) fn run(
    out: &mut [f32],
    m: usize,
    n: usize,
    panels: usize,
    task: impl Fn(std::ops::Range<usize>, OutBlock) + Sync,
) {
    assert!(out.len() >= m * n && n <= panels * PANEL);
    let per_task =
        (panels / (TASKS_PER_THREAD * rayon::current_num_threads())).clamp(1, PANELS_PER_TASK);
    let tasks = panels.div_ceil(per_task);
    let base = SharedOut(out.as_mut_ptr());
    (0..tasks).into_par_iter().for_each(|t| {
        let p = t * per_task..((t + 1) * per_task).min(panels);
        let col0 = p.start * PANEL;
        let cols = (p.end * PANEL).min(n) - col0;
        let block = OutBlock {
            ptr: base.at(col0),
            m,
            ld: n,
            cols,
        };
        task(p, block)
    });
}

/// Runs a kernel that fills a dense `(m, cols)` block of its own, then copies it into place.
fn run_dense(
    out: &mut [f32],
    m: usize,
    n: usize,
    panels: usize,
    kernel: impl Fn(std::ops::Range<usize>, usize, &mut [f32]) + Sync,
) {
    run(out, m, n, panels, |p, mut block| {
        let mut dense = vec![0f32; m * block.cols()];
        kernel(p, block.cols(), &mut dense);
        block.copy_from(&dense);
    });
}

#[cfg(target_arch = "x86_64")]
mod kernels {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{run_dense, Isa, Kind, Operands, PANEL};
    use crate::kernels::avx2;

    /// `out (m, n) = x · Wᵀ` from float32 panels, on `isa`.
    pub fn f32_product(ops: &Operands<f32, f32>, isa: Isa, n: usize, out: &mut [f32]) {
        match isa {
            Isa::Avx2 => avx2::f32_product(ops, n, out),
            _ => run_dense(out, ops.m, n, n.div_ceil(PANEL), |p, cols, dst| {
                f32_panels(ops, isa, p, cols, dst)
            }),
        }
    }

    /// `out (m, n) = x · Wᵀ` from int8 panels and x as int16 pairs, on `isa`.
    pub fn int8_product(
        ops: &Operands<u32, i8>,
        isa: Isa,
        scales: (&[f32], &[f32]),
        n: usize,
        out: &mut [f32],
    ) {
        match isa {
            Isa::Avx2 => avx2::int8_product(ops, scales, n, out),
            _ => run_dense(out, ops.m, n, n.div_ceil(PANEL), |p, cols, dst| {
                int8_panels(ops, isa, scales, p, cols, dst)
            }),
        }
    }

    /// `out (m, n) = x · Wᵀ` from bfloat16 pair panels and x as bfloat16 pairs, on `isa`.
    pub fn bf16_product(ops: &Operands<u32, u16>, isa: Isa, n: usize, out: &mut [f32]) {
        match isa {
            Isa::Avx2 => avx2::bf16_product(ops, n, out),
            _ => run_dense(out, ops.m, n, n.div_ceil(PANEL), |p, cols, dst| {
                bf16_panels(ops, isa, p, cols, dst)
            }),
        }
    }

    /// Panics unless the CPU has `isa` for `kind`: the kernels below are only sound there.
    fn check(isa: Isa, kind: Kind) {
        assert!(
            Isa::available(kind).any(|i| i == isa),
            "{isa:?} kernels for {kind:?} on a CPU without them"
        );
    }

    /// Rows of x per register tile and panels per tile (8 x 3 accumulators of 16 lanes).
    const MR: usize = 8;
    const NV: usize = 3;

    /// `dst (m, cols) = x (m, k) · W[panels]ᵀ` from float32 panels (AVX-512).
    fn f32_panels(
        ops: &Operands<f32, f32>,
        isa: Isa,
        panels: Range<usize>,
        cols: usize,
        dst: &mut [f32],
    ) {
        ops.assert_extents(ops.k * PANEL, &panels, cols, dst);
        check(isa, Kind::F32);
        // SAFETY: the CPU has `isa` (checked above) and the extents are asserted above.
        unsafe {
            match isa {
                Isa::Avx512 => f32_panels_avx512(ops, panels, cols, dst),
                _ => unreachable!("AVX2 products go through avx2::f32_product"),
            }
        }
    }

    /// As `f32_panels` from int8 pair panels and x as int16 pairs, then scaled by each
    /// row's `x_scales` and each column's `w_scales`.
    fn int8_panels(
        ops: &Operands<u32, i8>,
        isa: Isa,
        scales: (&[f32], &[f32]),
        panels: Range<usize>,
        cols: usize,
        dst: &mut [f32],
    ) {
        let (x_scales, w_scales) = scales;
        ops.assert_extents(ops.k * PANEL * 2, &panels, cols, dst);
        assert!(x_scales.len() >= ops.m && w_scales.len() >= panels.end * PANEL);
        check(isa, Kind::Int8);
        // SAFETY: the CPU has `isa` (checked above) and the extents are asserted above.
        unsafe {
            match isa {
                Isa::Avx512 => int8_panels_avx512(ops, x_scales, w_scales, panels, cols, dst),
                _ => unreachable!("AVX2 products go through avx2::int8_product"),
            }
        }
    }

    /// As `f32_panels` with bfloat16 pairs of x and panels of W, on AMX tiles or not.
    fn bf16_panels(
        ops: &Operands<u32, u16>,
        isa: Isa,
        panels: Range<usize>,
        cols: usize,
        dst: &mut [f32],
    ) {
        ops.assert_extents(ops.k * PANEL * 2, &panels, cols, dst);
        check(isa, Kind::Bf16);
        // SAFETY: the CPU has `isa` (checked above: AMX also means the tile permission was
        // granted); the extents are asserted above (and again by the AMX kernel).
        unsafe {
            match isa {
                Isa::Amx => crate::kernels::amx::bf16_panels_amx(ops, panels, cols, dst),
                Isa::Avx512 => bf16_panels_avx512(ops, panels, cols, dst),
                Isa::Avx2 => unreachable!("AVX2 products go through avx2::bf16_product"),
            }
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

    /// Stores a register tile: rows `row..` of `dst (m, cols)`, from panel `panel` of the task.
    #[inline(always)]
    unsafe fn store_tile<const R: usize, const V: usize>(
        acc: &[[__m512; V]; R],
        row: usize,
        panel: usize,
        cols: usize,
        dst: *mut f32,
    ) {
        for (r, accs) in acc.iter().enumerate() {
            for (v, a) in accs.iter().enumerate() {
                let col = (panel + v) * PANEL;
                if col < cols {
                    store(dst.add((row + r) * cols + col), cols - col, *a);
                }
            }
        }
    }

    /// Calls `$tile::<R, V>` with the tile shape as const generics.
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
        store_tile(&acc, row, p - p0, cols, dst);
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

    /// As `tile_f32` for int8 pair panels `[panel][kp][16][2]` and x as int16 pairs, with
    /// `vpdpwssd` (two exact products per lane, summed exactly in int32: `x_levels` keeps
    /// the sums in range); scaled per row and column at the end.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tile_int8<const R: usize, const V: usize>(
        x: *const u32,
        kp: usize,
        w: *const i8,
        (x_scales, w_scales): (*const f32, *const f32),
        row: usize,
        p: usize,
        p0: usize,
        cols: usize,
        dst: *mut f32,
    ) {
        let mut sums = [[_mm512_setzero_si512(); V]; R];
        let panel = |v: usize| w.add((p + v) * kp * PANEL * 2);
        for j in 0..kp {
            let mut wv = [_mm512_setzero_si512(); V];
            for (v, slot) in wv.iter_mut().enumerate() {
                let bytes = _mm256_loadu_si256(panel(v).add(j * PANEL * 2) as *const __m256i);
                *slot = _mm512_cvtepi8_epi16(bytes);
            }
            for (r, rs) in sums.iter_mut().enumerate() {
                let xb = _mm512_set1_epi32(*x.add((row + r) * kp + j) as i32);
                for (v, s) in rs.iter_mut().enumerate() {
                    *s = _mm512_dpwssd_epi32(*s, xb, wv[v]);
                }
            }
        }
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        for (r, (accs, rs)) in acc.iter_mut().zip(&sums).enumerate() {
            let xs = _mm512_set1_ps(*x_scales.add(row + r));
            for (v, (a, s)) in accs.iter_mut().zip(rs).enumerate() {
                let ws = _mm512_loadu_ps(w_scales.add((p + v) * PANEL));
                *a = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(*s), xs), ws);
            }
        }
        store_tile(&acc, row, p - p0, cols, dst);
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn int8_panels_avx512(
        ops: &Operands<u32, i8>,
        x_scales: &[f32],
        w_scales: &[f32],
        panels: Range<usize>,
        cols: usize,
        dst: &mut [f32],
    ) {
        let (m, kp) = (ops.m, ops.k);
        let (xp, wp, dp) = (ops.x.as_ptr(), ops.w.as_ptr(), dst.as_mut_ptr());
        let scales = (x_scales.as_ptr(), w_scales.as_ptr());
        drive(m, &panels, |mr, nv, row, p| {
            dispatch!(
                tile_int8,
                mr,
                nv,
                (xp, kp, wp, scales, row, p, panels.start, cols, dp)
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
        store_tile(&acc, row, p - p0, cols, dst);
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
    use super::{Isa, Operands};

    pub fn f32_product(_: &Operands<f32, f32>, _: Isa, _: usize, _: &mut [f32]) {
        unreachable!("supported() is false off x86-64")
    }
    pub fn int8_product(
        _: &Operands<u32, i8>,
        _: Isa,
        _: (&[f32], &[f32]),
        _: usize,
        _: &mut [f32],
    ) {
        unreachable!("supports_int8() is false off x86-64")
    }
    pub fn bf16_product(_: &Operands<u32, u16>, _: Isa, _: usize, _: &mut [f32]) {
        unreachable!("supported() is false off x86-64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn packed_kernels_match_a_plain_matmul_for_every_tile_shape() -> candle_core::Result<()> {
        let kernels = [(DType::F32, Kind::F32), (DType::BF16, Kind::Bf16)]
            .into_iter()
            .flat_map(|(d, k)| Isa::available(k).map(move |isa| (d, isa)));
        for (dtype, isa) in kernels {
            // odd sizes exercise the partial panels, row tiles and blocks, and the k padding
            for (m, n, k) in [
                (1, 37, 19),
                (2, 20, 16),
                (3, 50, 64),
                (5, 33, 40),
                (6, 48, 24),
                (7, 17, 9),
                (9, 100, 33),
                (13, 64, 31),
                (17, 16, 8),
                (35, 90, 70),
                // long rows; from 7 rows on (more than one register tile), cache-blocked
                // on AVX2: several k-slices, and several row groups
                (40, 20, 3000),
                (150, 40, 700),
            ] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
                let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?.to_dtype(dtype)?;
                let want = x
                    .to_dtype(dtype)?
                    .to_dtype(DType::F32)?
                    .matmul(&w.to_dtype(DType::F32)?.t()?)?;
                let packed = PackedWeight::pack(&w)?;
                let got = packed.xwt_on(&x, isa)?;
                let diff = (want - &got)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-3, "{dtype:?} {isa:?} {m}x{n}x{k}: {diff}");
                // a row alone gives the same bits as within the batch
                for row in [0, m / 2, m - 1] {
                    let alone = packed.xwt_on(&x.narrow(0, row, 1)?, isa)?;
                    let in_batch = got.narrow(0, row, 1)?;
                    assert_eq!(alone.to_vec2::<f32>()?, in_batch.to_vec2::<f32>()?);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn int8_sums_stay_within_int32() {
        assert_eq!(x_levels(516), 32767);
        assert_eq!(x_levels(3072), 5504);
        for k in [1usize, 2, 517, 768, 3072, 10240, 1 << 20] {
            let worst = 2 * 127 * k.div_ceil(2) as i64 * x_levels(k) as i64;
            assert!(worst <= i32::MAX as i64 && x_levels(k) >= 1, "k = {k}");
        }
    }

    #[test]
    fn int8_panels_multiply_the_dequantized_weights() -> candle_core::Result<()> {
        if !supports_int8() {
            return Ok(());
        }
        // k = 600 and 3000 get fewer x levels than 32767 (int32 range)
        for (m, n, k) in [
            (1, 37, 19),
            (5, 24, 40),
            (7, 40, 21),
            (9, 100, 33),
            (17, 16, 8),
            (6, 50, 600),
            (3, 20, 3000),
            // cache-blocked (AVX2): k-slices with int32 sums carried between them
            (40, 30, 3000),
            (150, 40, 700),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
            let packed = PackedWeight::pack_int8(&w)?;
            let ids: Vec<u32> = (0..n as u32).collect();
            let dequantized = packed.gather_rows(&ids)?;
            // within half a step (peak/254) of the original weights
            let err = (&dequantized - &w)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let peak = w.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                err <= peak / 254.0 * 1.001,
                "{m}x{n}x{k}: quantization error {err}"
            );
            // the kernel sees x rounded to int16 per row: the same product, summed exactly
            let (pairs, scales) = int16_pairs(&x.flatten_all()?.to_vec1::<f32>()?, m, k);
            let kp = k.div_ceil(2);
            let xq: Vec<f32> = (0..m * k)
                .map(|i| {
                    let (row, col) = (i / k, i % k);
                    let half = pairs[row * kp + col / 2] >> (16 * (col % 2));
                    half as u16 as i16 as f32 * scales[row]
                })
                .collect();
            let want = Tensor::from_vec(xq, (m, k), &Device::Cpu)?.matmul(&dequantized.t()?)?;
            // `want` is summed in f32: its own rounding grows with the sums (k = 3000: ~1e-4)
            let tolerance = 1e-4 + 1e-6 * want.abs()?.max_all()?.to_scalar::<f32>()?;
            let mut results = Vec::new();
            for isa in Isa::available(Kind::Int8) {
                let got = packed.xwt_on(&x, isa)?;
                let diff = (&want - &got)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < tolerance, "{isa:?} {m}x{n}x{k}: {diff}");
                // and the rounding of x costs little against the size of the sums
                let exact = x.matmul(&dequantized.t()?)?;
                let close = (&exact - &got)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let size = exact.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    close < 1e-3 * size,
                    "{isa:?} {m}x{n}x{k}: x rounding {close} of {size}"
                );
                let alone = packed.xwt_on(&x.narrow(0, m - 1, 1)?, isa)?;
                assert_eq!(
                    alone.to_vec2::<f32>()?,
                    got.narrow(0, m - 1, 1)?.to_vec2::<f32>()?
                );
                results.push(got.to_vec2::<f32>()?);
            }
            // exact integer sums: every instruction set gives the same bits
            assert!(results.windows(2).all(|w| w[0] == w[1]));
        }
        Ok(())
    }
}
