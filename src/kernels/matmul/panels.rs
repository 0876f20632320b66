//! What every instruction set's panel product shares: the packed layouts (float32 panels
//! `[panel][k][16]`, bfloat16 and int8 pair panels `[panel][k/2][16][2]`), x's conversion to
//! pairs, the operands with their extent checks, and the task splitter that runs a product's
//! panels in parallel, each task writing its own columns of the output.

use rayon::prelude::*;

use crate::kernels::fastmath;

/// Output columns per panel (one 512-bit vector of f32).
pub const PANEL: usize = 16;

/// bfloat16 panels hold `k` as pairs, padded to whole AMX tiles (16 pairs = 64 bytes a row);
/// the zero padding adds nothing to the dot products.
pub(crate) const PAIRS_BLOCK: usize = 16;

pub(crate) fn bf16_pairs(k: usize) -> usize {
    k.div_ceil(2).next_multiple_of(PAIRS_BLOCK)
}

/// Where element `kk` of row `lane` of panel `p` lies in pair panels `[panel][kp][16][2]`
/// (bfloat16 and int8).
pub(crate) fn pair_slot(p: usize, kp: usize, lane: usize, kk: usize) -> usize {
    ((p * kp + kk / 2) * PANEL + lane) * 2 + kk % 2
}

/// The scale of symmetric quantization of `row` to `levels` either side of zero (1 for an
/// all-zero row).
pub(crate) fn symmetric_scale(row: &[f32], levels: f32) -> f32 {
    let peak = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    if peak > 0.0 {
        peak / levels
    } else {
        1.0
    }
}

/// `row` as pairs of 16-bit codes `q(v)` in u32s, element 2j in the low half (a missing last
/// element is 0); `out` has room for `ceil(row.len() / 2)` pairs.
pub(crate) fn pair_row(row: &[f32], out: &mut [u32], q: impl Fn(f32) -> u16) {
    // whole pairs in a loop without branches (it vectorizes), then the odd last element
    let pairs = row.chunks_exact(2);
    let last = pairs.remainder().first().copied();
    for (o, pair) in out.iter_mut().zip(pairs) {
        *o = q(pair[0]) as u32 | (q(pair[1]) as u32) << 16;
    }
    if let Some(v) = last {
        out[row.len() / 2] = q(v) as u32;
    }
}

/// Elements of x from which `to_bf16_pairs` rounds rows on every core: a prompt's x (512 x
/// 3072 for an MLP's down product) took 4-6 % of a bf16 prefill on one core while the others
/// waited; a decode step's few rows are not worth a dispatch.
const PAIRS_IN_PARALLEL: usize = 1 << 16;

/// x `(m, k)` as bfloat16 pairs `(rows, kp)` (rounded to nearest even), zero beyond `m`
/// rows and `k` columns.
pub(crate) fn to_bf16_pairs(x: &[f32], m: usize, k: usize, rows: usize, kp: usize) -> Vec<u32> {
    let round = |v: f32| {
        let b = v.to_bits();
        (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
    };
    let mut out = vec![0u32; rows * kp];
    let pair = |(row, dst): (&[f32], &mut [u32])| pair_row(row, dst, round);
    if m * k >= PAIRS_IN_PARALLEL {
        x.par_chunks_exact(k)
            .take(m)
            .zip(out.par_chunks_exact_mut(kp))
            .for_each(pair);
    } else {
        x.chunks_exact(k)
            .take(m)
            .zip(out.chunks_exact_mut(kp))
            .for_each(pair);
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

/// The largest |x| level for int8 panels over `k` inputs: every exact product sum stays
/// inside int32 (each of the `ceil(k/2)` `vpdpwssd` steps adds at most 2 · 127 · level), and
/// within int16. 32767 up to k = 516; GPT-Neo-125M's widest input (3072) gets 5504, i.e. x
/// rounded to 1/11000 of its row's largest value.
pub(crate) fn x_levels(k: usize) -> i32 {
    let per_step = 2 * 127 * k.div_ceil(2).max(1) as i64;
    (i32::MAX as i64 / per_step).clamp(1, 32767) as i32
}

/// x `(m, k)` quantized per row (scale = max |x| / `x_levels(k)`) as int16 pairs
/// `(m, ceil(k/2))` of u32 with element 2j in the low half; returns the pairs and the row
/// scales.
pub(crate) fn int16_pairs(x: &[f32], m: usize, k: usize) -> (Vec<u32>, Vec<f32>) {
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
        // pairs of int16 in u32s, element 2j in the low half: the row's int16s as they lie in
        // memory (little-endian), the odd row's last high half left zero
        let halves: &mut [i16] = bytemuck::cast_slice_mut(dst);
        fastmath::quantize_i16(row, *scale, &mut halves[..row.len()]);
    }
    (pairs, scales)
}

/// Panels per parallel task, at most: enough work to amortise scheduling.
const PANELS_PER_TASK: usize = 12;
/// Tasks per thread, at least, where the panels allow: a weight of 64 panels (1024 outputs)
/// in tasks of 12 left one of two threads a third idle at the end (measured: `bench
/// --kernels`, 52 % of peak against 72 % for the wider products).
const TASKS_PER_THREAD: usize = 8;

/// One task's share of a product's output: columns `col0..col0 + cols` of `out (m, ld)`.
/// Only `run` makes them, one per task over disjoint columns, so tasks fill theirs in
/// parallel without copies.
pub(crate) struct OutBlock {
    ptr: *mut f32,
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

/// Splits the panels into tasks run in parallel, each a whole number of the kernel's units of
/// `unit` panels (its register tile's width) where the weight allows; each task fills its
/// columns of `out (m, n)` through its `OutBlock`.
pub(crate) fn run(
    out: &mut [f32],
    (m, n): (usize, usize),
    (panels, unit): (usize, usize),
    task: impl Fn(std::ops::Range<usize>, OutBlock) + Sync,
) {
    assert!(out.len() >= m * n && n <= panels * PANEL);
    // a task of 3 panels in units of 2 would run every other tile at half width
    let per_task = (panels / (TASKS_PER_THREAD * rayon::current_num_threads()))
        .clamp(1, PANELS_PER_TASK)
        .next_multiple_of(unit);
    let tasks = panels.div_ceil(per_task);
    let base = SharedOut(out.as_mut_ptr());
    (0..tasks).into_par_iter().for_each(|t| {
        let p = t * per_task..((t + 1) * per_task).min(panels);
        let col0 = p.start * PANEL;
        let cols = (p.end * PANEL).min(n) - col0;
        let block = OutBlock {
            ptr: base.at(col0),
            ld: n,
            cols,
        };
        task(p, block)
    });
}
