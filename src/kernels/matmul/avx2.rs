//! The packed panel products on AVX2 + FMA, for x86-64 CPUs without AVX-512 (AMD Zen 2/3,
//! older Intel): the same packed layouts of W as the AVX-512 kernels, each 16-column panel as
//! two 8-lane halves. Without them these CPUs fall back to candle's matmul, which at 1-16 rows
//! reaches about a third of the memory bandwidth in f32 and takes seconds per token in bf16
//! (no native bf16 there). Measured with `bench --arch gpt2` and `bench --kernels` (README).
//!
//! - f32: one broadcast of x and two FMAs per k and row.
//! - bf16: each pair of k is widened from bfloat16 (a shift: bf16 is the top half of an f32)
//!   and multiplied as f32 by x rounded to bfloat16 (the x the other bf16 kernels take),
//!   widened once per product rather than per tile.
//! - int8: `vpmaddwd` multiplies the int16 pairs of x by the sign-extended int8 pairs of W
//!   and adds each pair exactly in int32, the AVX-512 VNNI kernel's arithmetic, so the two
//!   give identical results.
//!
//! Cache blocking, for prompts and batches (measured on a Zen 3 VM, alternating builds: a
//! 512-token GPT-2 medium f32 prompt 3.6-4.1 s against 3.7-5.2 s before): x is copied once per
//! product with each register tile's rows interleaved (`[k][rows]`: one sequential stream,
//! where rows `k` floats apart, 4 KiB or 16 KiB for these models, share one L1 set with the
//! panel); from `BLOCKED_ROWS` rows on (more than one tile), k is cut into slices whose panel
//! part fits L1 and the rows into groups that fit L2, and a tile's sums are stored and
//! reloaded between slices.
//! Results go straight into the product's output (`OutBlock`), no per-task copy.
//!
//! Every output is accumulated in k order in one lane whatever the number of rows and the
//! blocking (a reloaded sum continues the same chain of FMAs, int8 sums stay int32 until the
//! last slice), so a sequence gets bit-identical results alone or in any batch.

use std::arch::x86_64::*;
use std::ops::Range;

use super::panels::{run, Operands, OutBlock, PANEL};
use crate::kernels::cpu_features;

/// Rows of x per register tile, at most: 6 rows x 2 halves = 12 accumulators, plus two of W
/// and one broadcast, within the 16 ymm registers (f32 and int8); the bf16 tile also holds the
/// four widened halves of a pair, so it takes 5 rows (10 accumulators, the widening shared by
/// more FMAs than at 4 rows: 6-14 % faster at 512 rows on Zen 3; 6 rows spill, 15-25 % slower).
/// An FMA's latency (4-5 cycles) times the two FMA units needs at least 8 accumulators in
/// flight: 4 to 6 rows keep both units busy.
const MR_F32: usize = 6;
const MR_BF16: usize = 5;

/// From this many rows (more than one register tile: prompts, batched decode, verification)
/// the product is cache-blocked; below it (one tile) each panel streams from memory once, in
/// one piece, with nothing to reuse.
const BLOCKED_ROWS: usize = 7;
/// Bytes of one panel's k-slice: half of a 32 KiB L1, the rest for the tile's rows of x.
const SLICE_BYTES: usize = 16 << 10;
/// Bytes of x per row group: a quarter of a 512 KiB L2 (Zen 3; 1-2 MiB on Intel).
const GROUP_BYTES: usize = 128 << 10;

/// How a product is cut: k-slices of `kc` steps (a step: one k of f32, one pair of bf16 or
/// int8) and groups of at most `group` register tiles.
#[derive(Clone, Copy)]
struct Blocking {
    kc: usize,
    group: usize,
}

impl Blocking {
    fn of(m: usize, steps: usize, w_step_bytes: usize, x_step_bytes: usize, mr: usize) -> Self {
        if m < BLOCKED_ROWS {
            return Self {
                kc: steps.max(1),
                group: usize::MAX,
            };
        }
        let kc = (SLICE_BYTES / w_step_bytes).clamp(1, steps.max(1));
        let rows = (GROUP_BYTES / (kc * x_step_bytes)).max(mr);
        Self {
            kc,
            group: rows / mr,
        }
    }
}

/// The register tiles of `m` rows: the fewest of at most `mr` rows, as even as can be (7
/// rows: 4 + 3, not 6 + 1, whose one-row tile would wait on FMA latency as long as a full
/// one), as (first row, rows). Which rows share a tile changes no output.
fn row_tiles(m: usize, mr: usize) -> Vec<(usize, usize)> {
    let tiles = m.div_ceil(mr);
    let mut row = 0;
    (0..tiles)
        .map(|t| {
            let rows = (m - row).div_ceil(tiles - t);
            row += rows;
            (row - rows, rows)
        })
        .collect()
}

/// x `(m, steps * e)` with each tile's rows interleaved: the tile at row `r0` of `rows`
/// holds `[step][row][e]` from `r0 * steps * e` on.
fn interleave<T: Copy + Default>(x: &[T], m: usize, steps: usize, e: usize, mr: usize) -> Vec<T> {
    let width = steps * e;
    let mut out = vec![T::default(); m * width];
    for (r0, rows) in row_tiles(m, mr) {
        let tile = &mut out[r0 * width..(r0 + rows) * width];
        for r in 0..rows {
            let src = &x[(r0 + r) * width..(r0 + r + 1) * width];
            for (s, vals) in src.chunks_exact(e).enumerate() {
                tile[(s * rows + r) * e..][..e].copy_from_slice(vals);
            }
        }
    }
    out
}

/// Walks a task's tiles: for each k-slice, each group of row tiles, each panel, each tile of
/// the group (the panel's slice stays in L1 while the group's rows go by, the group's rows in
/// L2 while the panels go by); calls `tile(r0, rows, panel, slice, first)`, `first` for the
/// group's first tile on this panel and slice.
fn drive(
    tiles: &[(usize, usize)],
    steps: usize,
    b: Blocking,
    panels: &Range<usize>,
    mut tile: impl FnMut(usize, usize, usize, Range<usize>, bool),
) {
    for s0 in (0..steps.max(1)).step_by(b.kc) {
        let slice = s0..(s0 + b.kc).min(steps);
        for group in tiles.chunks(b.group.max(1)) {
            for p in panels.clone() {
                for (i, &(r0, rows)) in group.iter().enumerate() {
                    tile(r0, rows, p, slice.clone(), i == 0);
                }
            }
        }
    }
}

/// Runs a product of `m` rows by `n` columns in parallel tasks (`run`), walking each task's
/// tiles (`drive`): `tile(r0, rows, panel, k-slice, where its sums go, next)`, `next` the
/// task's next panel for the first of several tiles that share this one (see `tile_f32`).
fn for_each_tile(
    out: &mut [f32],
    (m, n, mr): (usize, usize, usize),
    steps: usize,
    b: Blocking,
    tile: impl Fn(usize, usize, usize, Range<usize>, Dst, Option<usize>) + Sync,
) {
    let tiles = row_tiles(m, mr);
    let shared = tiles.len() > 1;
    run(out, m, n, n.div_ceil(PANEL), |task, block| {
        drive(&tiles, steps, b, &task, |r0, rows, p, slice, first| {
            let next = (shared && first && p + 1 < task.end).then_some(p + 1);
            tile(
                r0,
                rows,
                p,
                slice,
                Dst::of(&block, r0, p - task.start),
                next,
            )
        });
    });
}

/// Calls `$tile::<R>(args)` with the tile's row count as a const generic.
macro_rules! dispatch {
    ($rows:expr, $tile:ident, ($($arg:expr),*)) => {
        match $rows {
            6 => $tile::<6>($($arg),*),
            5 => $tile::<5>($($arg),*),
            4 => $tile::<4>($($arg),*),
            3 => $tile::<3>($($arg),*),
            2 => $tile::<2>($($arg),*),
            _ => $tile::<1>($($arg),*),
        }
    };
}

/// Where one tile's sums go: row 0, column 0 of the tile in the output, the row stride, and
/// how many of the panel's 16 columns exist (the last panel of a weight may be partial).
#[derive(Clone, Copy)]
struct Dst {
    at: *mut f32,
    ld: usize,
    valid: usize,
}

impl Dst {
    fn of(out: &OutBlock, r0: usize, panel_in_task: usize) -> Self {
        let col = panel_in_task * PANEL;
        Self {
            // SAFETY (of later writes): r0 < m and col < cols, inside the block
            at: out.as_mut_ptr().wrapping_add(r0 * out.ld() + col),
            ld: out.ld(),
            valid: out.cols() - col,
        }
    }

    /// The valid lanes of half `h` (0 or 1) of the panel.
    fn lanes(&self, h: usize) -> usize {
        self.valid.saturating_sub(h * 8).min(8)
    }

    #[inline(always)]
    unsafe fn load<const R: usize>(&self) -> [[__m256; 2]; R] {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (r, halves) in acc.iter_mut().enumerate() {
            for (h, a) in halves.iter_mut().enumerate() {
                let (src, n) = (self.at.add(r * self.ld + h * 8), self.lanes(h));
                if n == 8 {
                    *a = _mm256_loadu_ps(src);
                } else if n > 0 {
                    let mut lanes = [0f32; 8];
                    std::ptr::copy_nonoverlapping(src, lanes.as_mut_ptr(), n);
                    *a = _mm256_loadu_ps(lanes.as_ptr());
                }
            }
        }
        acc
    }

    #[inline(always)]
    unsafe fn store<const R: usize>(&self, acc: &[[__m256; 2]; R]) {
        for (r, halves) in acc.iter().enumerate() {
            for (h, a) in halves.iter().enumerate() {
                let (dst, n) = (self.at.add(r * self.ld + h * 8), self.lanes(h));
                if n == 8 {
                    _mm256_storeu_ps(dst, *a);
                } else if n > 0 {
                    let mut lanes = [0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
                    std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, n);
                }
            }
        }
    }
}

fn check_cpu() {
    assert!(
        cpu_features::get().avx2_fma,
        "AVX2 kernels on a CPU without AVX2 + FMA"
    );
}

/// `out (m, n) = x (m, k) · Wᵀ` from float32 panels `[panel][k][16]`.
pub fn f32_product(ops: &Operands<f32, f32>, n: usize, out: &mut [f32]) {
    check_cpu();
    let (x, m, k, w) = (ops.x, ops.m, ops.k, ops.w);
    ops.assert_extents(k * PANEL, &(0..n.div_ceil(PANEL)), n, out);
    let xt = interleave(x, m, k, 1, MR_F32);
    let b = Blocking::of(m, k, PANEL * 4, 4, MR_F32);
    let (xp, wp) = (xt.as_ptr() as usize, w.as_ptr() as usize);
    for_each_tile(
        out,
        (m, n, MR_F32),
        k,
        b,
        |r0, rows, p, slice, dst, next| {
            let x = (xp as *const f32).wrapping_add(r0 * k);
            let w = (wp as *const f32).wrapping_add(p * k * PANEL);
            let next = next.map(|q| (wp as *const f32).wrapping_add(q * k * PANEL));
            // SAFETY: the CPU has AVX2 + FMA (checked above); the tile reads rows r0..r0+rows
            // of x and panels p and `next` < panels of W, asserted in range above, and writes its
            // rows and the panel's columns of its task's output block.
            unsafe { dispatch!(rows, tile_f32, (x, w, slice, dst, next)) }
        },
    );
}

/// With `next`, the tile also prefetches that panel's part of the slice, one line per k: when
/// several tiles share a panel, only the first waits on memory, and without this the memory
/// idled while the others computed (batched decode, 16 rows of GPT-2 medium f32: a step's
/// forward took 220 ms at the median, 195 ms with it; the weights alone need ~70 ms).
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_f32<const R: usize>(
    x: *const f32,
    w: *const f32,
    slice: Range<usize>,
    dst: Dst,
    next: Option<*const f32>,
) {
    let mut acc = if slice.start == 0 {
        [[_mm256_setzero_ps(); 2]; R]
    } else {
        dst.load::<R>()
    };
    for kk in slice {
        if let Some(next) = next {
            _mm_prefetch::<_MM_HINT_T0>(next.add(kk * PANEL) as *const i8);
        }
        let w0 = _mm256_loadu_ps(w.add(kk * PANEL));
        let w1 = _mm256_loadu_ps(w.add(kk * PANEL + 8));
        for (r, a) in acc.iter_mut().enumerate() {
            let xb = _mm256_broadcast_ss(&*x.add(kk * R + r));
            a[0] = _mm256_fmadd_ps(xb, w0, a[0]);
            a[1] = _mm256_fmadd_ps(xb, w1, a[1]);
        }
    }
    dst.store(&acc);
}

/// `out (m, n) = x · Wᵀ` from bfloat16 pair panels `[panel][kp][16][2]`, with `xb` x rounded
/// to bfloat16 as pairs `(m, kp)` (element 2j in the low half, zero past k).
pub fn bf16_product(ops: &Operands<u32, u16>, n: usize, out: &mut [f32]) {
    check_cpu();
    let (xb, m, kp, w) = (ops.x, ops.m, ops.k, ops.w);
    ops.assert_extents(kp * PANEL * 2, &(0..n.div_ceil(PANEL)), n, out);
    // widened once here, not per tile and panel: a broadcast from memory costs no shuffle
    let widened: Vec<f32> = xb[..m * kp]
        .iter()
        .flat_map(|&pair| {
            [
                f32::from_bits(pair << 16),
                f32::from_bits(pair & 0xFFFF_0000),
            ]
        })
        .collect();
    let xt = interleave(&widened, m, kp, 2, MR_BF16);
    let b = Blocking::of(m, kp, PANEL * 4, 8, MR_BF16);
    let (xp, wp) = (xt.as_ptr() as usize, w.as_ptr() as usize);
    for_each_tile(out, (m, n, MR_BF16), kp, b, |r0, rows, p, slice, dst, _| {
        let x = (xp as *const f32).wrapping_add(r0 * kp * 2);
        let w = (wp as *const u16).wrapping_add(p * kp * PANEL * 2);
        // SAFETY: as in `f32_product`.
        unsafe { dispatch!(rows, tile_bf16, (x, w, slice, dst)) }
    });
}

#[target_feature(enable = "avx2,fma")]
unsafe fn tile_bf16<const R: usize>(x: *const f32, w: *const u16, slice: Range<usize>, dst: Dst) {
    let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    let mut acc = if slice.start == 0 {
        [[_mm256_setzero_ps(); 2]; R]
    } else {
        dst.load::<R>()
    };
    for j in slice {
        // 16 columns x (w[2j], w[2j+1]) as u32 pairs: the even k in the low half
        let at = w.add(j * PANEL * 2) as *const __m256i;
        let pairs = [_mm256_loadu_si256(at), _mm256_loadu_si256(at.add(1))];
        let even = pairs.map(|v| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)));
        let odd = pairs.map(|v| _mm256_castsi256_ps(_mm256_and_si256(v, high)));
        for (r, a) in acc.iter_mut().enumerate() {
            let xe = _mm256_broadcast_ss(&*x.add((j * R + r) * 2));
            let xo = _mm256_broadcast_ss(&*x.add((j * R + r) * 2 + 1));
            for h in 0..2 {
                a[h] = _mm256_fmadd_ps(xo, odd[h], _mm256_fmadd_ps(xe, even[h], a[h]));
            }
        }
    }
    dst.store(&acc);
}

/// `out (m, n) = x · Wᵀ` from int8 pair panels `[panel][kp][16][2]` and `xq` x as int16
/// pairs `(m, kp)`, scaled by each row's `x_scales` and each column's `w_scales` at the end.
pub fn int8_product(
    ops: &Operands<u32, i8>,
    (x_scales, w_scales): (&[f32], &[f32]),
    n: usize,
    out: &mut [f32],
) {
    check_cpu();
    let (xq, m, kp, w) = (ops.x, ops.m, ops.k, ops.w);
    let panels = n.div_ceil(PANEL);
    ops.assert_extents(kp * PANEL * 2, &(0..panels), n, out);
    assert!(x_scales.len() >= m && w_scales.len() >= panels * PANEL);
    let xt = interleave(xq, m, kp, 1, MR_F32);
    let b = Blocking::of(m, kp, PANEL * 2, 4, MR_F32);
    let (xp, wp) = (xt.as_ptr() as usize, w.as_ptr() as usize);
    let scales = (x_scales.as_ptr() as usize, w_scales.as_ptr() as usize);
    for_each_tile(out, (m, n, MR_F32), kp, b, |r0, rows, p, slice, dst, _| {
        let x = (xp as *const u32).wrapping_add(r0 * kp);
        let w = (wp as *const i8).wrapping_add(p * kp * PANEL * 2);
        let xs = (scales.0 as *const f32).wrapping_add(r0);
        let ws = (scales.1 as *const f32).wrapping_add(p * PANEL);
        let last = slice.end == kp;
        // SAFETY: as in `f32_product`; the scales cover the rows and panels (asserted).
        unsafe { dispatch!(rows, tile_int8, (x, w, (xs, ws), slice, last, dst)) }
    });
}

/// Between k-slices a tile's int32 sums wait in the output as raw bits; the last slice
/// scales them to floats.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_int8<const R: usize>(
    x: *const u32,
    w: *const i8,
    (x_scales, w_scales): (*const f32, *const f32),
    slice: Range<usize>,
    last: bool,
    dst: Dst,
) {
    let mut sums = [[_mm256_setzero_si256(); 2]; R];
    if slice.start > 0 {
        let bits = dst.load::<R>();
        for (s, b) in sums.iter_mut().zip(&bits) {
            *s = b.map(|v| _mm256_castps_si256(v));
        }
    }
    for j in slice {
        // 32 bytes: 16 columns x (w[2j], w[2j+1]); each half widened to 8 columns of int16 pairs
        let at = w.add(j * PANEL * 2) as *const __m128i;
        let wv = [
            _mm256_cvtepi8_epi16(_mm_loadu_si128(at)),
            _mm256_cvtepi8_epi16(_mm_loadu_si128(at.add(1))),
        ];
        for (r, s) in sums.iter_mut().enumerate() {
            let xb = _mm256_set1_epi32(*x.add(j * R + r) as i32);
            for h in 0..2 {
                s[h] = _mm256_add_epi32(s[h], _mm256_madd_epi16(xb, wv[h]));
            }
        }
    }
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for (r, (a, s)) in acc.iter_mut().zip(&sums).enumerate() {
        if !last {
            *a = s.map(|v| _mm256_castsi256_ps(v));
            continue;
        }
        let xs = _mm256_set1_ps(*x_scales.add(r));
        for h in 0..2 {
            // lanes past the weight's columns read scales of its zero padding: stored nowhere
            let ws = _mm256_loadu_ps(w_scales.add(h * 8));
            a[h] = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s[h]), xs), ws);
        }
    }
    dst.store(&acc);
}
