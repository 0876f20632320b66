//! The packed panel products on AVX2 + FMA, for x86-64 CPUs without AVX-512 (AMD Zen 2/3,
//! older Intel): the same packed layouts as the AVX-512 kernels, each 16-column panel as two
//! 8-lane halves. Without them these CPUs fall back to candle's matmul, which at 1-16 rows
//! reaches about a third of the memory bandwidth in f32 and takes seconds per token in bf16
//! (no native bf16 there). Measured with `bench --arch gpt2` (README).
//!
//! - f32: one broadcast of x and two FMAs per k and row.
//! - bf16: each pair of k is widened from bfloat16 (a shift: bf16 is the top half of an f32)
//!   and multiplied as f32; x is the same bf16-rounded x the other bf16 kernels take.
//! - int8: `vpmaddwd` multiplies the int16 pairs of x by the sign-extended int8 pairs of W
//!   and adds each pair exactly in int32, the AVX-512 VNNI kernel's arithmetic, so the two
//!   give identical results.
//!
//! Every output is accumulated in k order in one lane whatever the number of rows, so a
//! sequence gets bit-identical results alone or in any batch.

use std::arch::x86_64::*;
use std::ops::Range;

use super::skinny_matmul::{Operands, PANEL};

/// Rows of x per register tile, at most: 6 rows x 2 halves = 12 accumulators, plus two of W
/// and one broadcast, within the 16 ymm registers (f32 and int8); the bf16 tile also holds the
/// widened pairs, so it takes 4 rows at most. An FMA's latency (4-5 cycles) times the two FMA
/// units needs at least 8 accumulators in flight: 4 to 6 rows keep both units busy.
const MR_F32: usize = 6;
const MR_BF16: usize = 4;

/// Stores the 8 lanes of `acc` at `dst`, the first `valid` of them only.
#[inline(always)]
unsafe fn store8(dst: *mut f32, valid: usize, acc: __m256) {
    if valid >= 8 {
        _mm256_storeu_ps(dst, acc);
    } else {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, valid);
    }
}

/// Stores a tile: rows `row..row+R` of `dst (m, cols)`, panel `panel` of the task.
#[inline(always)]
unsafe fn store_tile<const R: usize>(
    acc: &[[__m256; 2]; R],
    row: usize,
    panel: usize,
    cols: usize,
    dst: *mut f32,
) {
    for (r, halves) in acc.iter().enumerate() {
        for (h, a) in halves.iter().enumerate() {
            let col = panel * PANEL + h * 8;
            if col < cols {
                store8(dst.add((row + r) * cols + col), cols - col, *a);
            }
        }
    }
}

/// Calls `$tile::<R>` for each block of rows of each panel of the task: `m` rows split into
/// the fewest blocks of at most `$mr`, as even as can be (7 rows: 4 + 3, not 6 + 1, whose
/// one-row tile would wait on FMA latency as long as a full one). Which rows share a tile
/// changes no output: each accumulates in k order in its own lanes.
macro_rules! drive {
    ($m:expr, $mr:expr, $panels:expr, $tile:ident, ($($arg:expr),*)) => {
        let blocks = $m.div_ceil($mr);
        for p in $panels.clone() {
            let mut row = 0;
            for b in 0..blocks {
                let rows = ($m - row).div_ceil(blocks - b);
                match rows {
                    6 => $tile::<6>($($arg,)* row, p),
                    5 => $tile::<5>($($arg,)* row, p),
                    4 => $tile::<4>($($arg,)* row, p),
                    3 => $tile::<3>($($arg,)* row, p),
                    2 => $tile::<2>($($arg,)* row, p),
                    _ => $tile::<1>($($arg,)* row, p),
                }
                row += rows;
            }
        }
    };
}

/// `dst (m, cols) = x (m, k) · W[panels]ᵀ` from float32 panels `[panel][k][16]`.
///
/// # Safety
/// The CPU has AVX2 and FMA; the operands hold the extents `Operands::assert_extents` checks.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn f32_panels(
    ops: &Operands<f32, f32>,
    panels: Range<usize>,
    cols: usize,
    dst: &mut [f32],
) {
    let (m, k) = (ops.m, ops.k);
    let (x, w, d, p0) = (
        ops.x.as_ptr(),
        ops.w.as_ptr(),
        dst.as_mut_ptr(),
        panels.start,
    );
    drive!(m, MR_F32, panels, tile_f32, (x, k, w, p0, cols, d));
}

// A register tile needs the operands' raw pointers and extents; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile_f32<const R: usize>(
    x: *const f32,
    k: usize,
    w: *const f32,
    p0: usize,
    cols: usize,
    dst: *mut f32,
    row: usize,
    p: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let panel = w.add(p * k * PANEL);
    for kk in 0..k {
        let w0 = _mm256_loadu_ps(panel.add(kk * PANEL));
        let w1 = _mm256_loadu_ps(panel.add(kk * PANEL + 8));
        for (r, a) in acc.iter_mut().enumerate() {
            let xb = _mm256_set1_ps(*x.add((row + r) * k + kk));
            a[0] = _mm256_fmadd_ps(xb, w0, a[0]);
            a[1] = _mm256_fmadd_ps(xb, w1, a[1]);
        }
    }
    store_tile(&acc, row, p - p0, cols, dst);
}

/// As `f32_panels` from bfloat16 pair panels `[panel][kp][16][2]` and x as bfloat16 pairs
/// `(m, kp)` (element 2j in the low half).
///
/// # Safety
/// As `f32_panels`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn bf16_panels(
    ops: &Operands<u32, u16>,
    panels: Range<usize>,
    cols: usize,
    dst: &mut [f32],
) {
    let (m, kp) = (ops.m, ops.k);
    let (x, w, d, p0) = (
        ops.x.as_ptr(),
        ops.w.as_ptr(),
        dst.as_mut_ptr(),
        panels.start,
    );
    drive!(m, MR_BF16, panels, tile_bf16, (x, kp, w, p0, cols, d));
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile_bf16<const R: usize>(
    x: *const u32,
    kp: usize,
    w: *const u16,
    p0: usize,
    cols: usize,
    dst: *mut f32,
    row: usize,
    p: usize,
) {
    let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let panel = w.add(p * kp * PANEL * 2);
    for j in 0..kp {
        // 16 columns x (w[2j], w[2j+1]) as u32 pairs: the even k in the low half
        let at = panel.add(j * PANEL * 2) as *const __m256i;
        let pairs = [_mm256_loadu_si256(at), _mm256_loadu_si256(at.add(1))];
        let even = pairs.map(|v| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)));
        let odd = pairs.map(|v| _mm256_castsi256_ps(_mm256_and_si256(v, high)));
        for (r, a) in acc.iter_mut().enumerate() {
            let pair = *x.add((row + r) * kp + j);
            let xe = _mm256_set1_ps(f32::from_bits(pair << 16));
            let xo = _mm256_set1_ps(f32::from_bits(pair & 0xFFFF_0000));
            for h in 0..2 {
                a[h] = _mm256_fmadd_ps(xo, odd[h], _mm256_fmadd_ps(xe, even[h], a[h]));
            }
        }
    }
    store_tile(&acc, row, p - p0, cols, dst);
}

/// As `f32_panels` from int8 pair panels `[panel][kp][16][2]` and x as int16 pairs, scaled
/// by each row's `x_scales` and each column's `w_scales` at the end.
///
/// # Safety
/// The CPU has AVX2; the operands hold the extents `Operands::assert_extents` checks, and the
/// scales cover the rows and the panels' columns.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn int8_panels(
    ops: &Operands<u32, i8>,
    (x_scales, w_scales): (&[f32], &[f32]),
    panels: Range<usize>,
    cols: usize,
    dst: &mut [f32],
) {
    let (m, kp) = (ops.m, ops.k);
    let (x, w, d, p0) = (
        ops.x.as_ptr(),
        ops.w.as_ptr(),
        dst.as_mut_ptr(),
        panels.start,
    );
    let scales = (x_scales.as_ptr(), w_scales.as_ptr());
    drive!(
        m,
        MR_F32,
        panels,
        tile_int8,
        (x, kp, w, scales, p0, cols, d)
    );
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile_int8<const R: usize>(
    x: *const u32,
    kp: usize,
    w: *const i8,
    (x_scales, w_scales): (*const f32, *const f32),
    p0: usize,
    cols: usize,
    dst: *mut f32,
    row: usize,
    p: usize,
) {
    let mut sums = [[_mm256_setzero_si256(); 2]; R];
    let panel = w.add(p * kp * PANEL * 2);
    for j in 0..kp {
        // 32 bytes: 16 columns x (w[2j], w[2j+1]); each half widened to 8 columns of int16 pairs
        let at = panel.add(j * PANEL * 2) as *const __m128i;
        let wv = [
            _mm256_cvtepi8_epi16(_mm_loadu_si128(at)),
            _mm256_cvtepi8_epi16(_mm_loadu_si128(at.add(1))),
        ];
        for (r, s) in sums.iter_mut().enumerate() {
            let xb = _mm256_set1_epi32(*x.add((row + r) * kp + j) as i32);
            for h in 0..2 {
                s[h] = _mm256_add_epi32(s[h], _mm256_madd_epi16(xb, wv[h]));
            }
        }
    }
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for (r, (a, s)) in acc.iter_mut().zip(&sums).enumerate() {
        let xs = _mm256_set1_ps(*x_scales.add(row + r));
        for h in 0..2 {
            let ws = _mm256_loadu_ps(w_scales.add(p * PANEL + h * 8));
            a[h] = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s[h]), xs), ws);
        }
    }
    store_tile(&acc, row, p - p0, cols, dst);
}
