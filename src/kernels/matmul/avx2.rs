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
//! Cache blocking, for prompts and batches (`blocking.rs`, measured here first: on a Zen 3 VM,
//! alternating builds, a 512-token GPT-2 medium f32 prompt took 3.6-4.1 s against 3.7-5.2 s
//! before): x interleaved per register tile, k-slices of a panel in L1, row groups in L2, and
//! the next panel prefetched while several tiles share one. Results go straight into the
//! product's output (`OutBlock`), no per-task copy.
//!
//! Every output is accumulated in k order in one lane whatever the number of rows and the
//! blocking (a reloaded sum continues the same chain of FMAs, int8 sums stay int32 until the
//! last slice), so a sequence gets bit-identical results alone or in any batch.

use std::arch::x86_64::*;
use std::ops::Range;

use super::blocking::{for_each_tile, interleave, Blocking, Caches, Dst, Tile};
use super::panels::{Operands, PANEL};
use crate::kernels::cpu_features;

/// Rows of x per register tile, at most: 6 rows x 2 halves = 12 accumulators, plus two of W
/// and one broadcast, within the 16 ymm registers (f32 and int8); the bf16 tile also holds the
/// four widened halves of a pair, so it takes 5 rows (10 accumulators, the widening shared by
/// more FMAs than at 4 rows: 6-14 % faster at 512 rows on Zen 3; 6 rows spill, 15-25 % slower).
/// An FMA's latency (4-5 cycles) times the two FMA units needs at least 8 accumulators in
/// flight: 4 to 6 rows keep both units busy.
const MR_F32: usize = 6;
const MR_BF16: usize = 5;

/// Half of a 32 KiB L1 per k-slice of a panel, a quarter of a 512 KiB L2 per row group (Zen 3;
/// 1-2 MiB on Intel).
const CACHES: Caches = Caches {
    slice_bytes: 16 << 10,
    group_bytes: 128 << 10,
};

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

/// A tile's sums, `R` rows of one panel as two 8-lane halves, from where they wait.
#[inline(always)]
unsafe fn load<const R: usize>(dst: &Dst) -> [[__m256; 2]; R] {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for (r, halves) in acc.iter_mut().enumerate() {
        for (h, a) in halves.iter_mut().enumerate() {
            let (src, n) = (dst.at.add(r * dst.ld + h * 8), dst.lanes(h, 8));
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
unsafe fn store<const R: usize>(dst: &Dst, acc: &[[__m256; 2]; R]) {
    for (r, halves) in acc.iter().enumerate() {
        for (h, a) in halves.iter().enumerate() {
            let (at, n) = (dst.at.add(r * dst.ld + h * 8), dst.lanes(h, 8));
            if n == 8 {
                _mm256_storeu_ps(at, *a);
            } else if n > 0 {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
                std::ptr::copy_nonoverlapping(lanes.as_ptr(), at, n);
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
    let b = Blocking::of(m, k, (PANEL * 4, 4), MR_F32, CACHES);
    let (xp, wp) = (xt.as_ptr() as usize, w.as_ptr() as usize);
    for_each_tile(out, (m, n, MR_F32, 1), k, b, |t: Tile| {
        let x = (xp as *const f32).wrapping_add(t.r0 * k);
        let w = (wp as *const f32).wrapping_add(t.p * k * PANEL);
        let next = t
            .next
            .map(|q| (wp as *const f32).wrapping_add(q * k * PANEL));
        // SAFETY: the CPU has AVX2 + FMA (checked above); the tile reads rows r0..r0+rows
        // of x and panels p and `next` < panels of W, asserted in range above, and writes its
        // rows and the panel's columns of its task's output block.
        unsafe { dispatch!(t.rows, tile_f32, (x, w, t.slice, t.dst, next)) }
    });
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
        load::<R>(&dst)
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
    store(&dst, &acc);
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
    let b = Blocking::of(m, kp, (PANEL * 4, 8), MR_BF16, CACHES);
    let (xp, wp) = (xt.as_ptr() as usize, w.as_ptr() as usize);
    for_each_tile(out, (m, n, MR_BF16, 1), kp, b, |t: Tile| {
        let x = (xp as *const f32).wrapping_add(t.r0 * kp * 2);
        let w = (wp as *const u16).wrapping_add(t.p * kp * PANEL * 2);
        // SAFETY: as in `f32_product`.
        unsafe { dispatch!(t.rows, tile_bf16, (x, w, t.slice, t.dst)) }
    });
}

#[target_feature(enable = "avx2,fma")]
unsafe fn tile_bf16<const R: usize>(x: *const f32, w: *const u16, slice: Range<usize>, dst: Dst) {
    let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    let mut acc = if slice.start == 0 {
        [[_mm256_setzero_ps(); 2]; R]
    } else {
        load::<R>(&dst)
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
    store(&dst, &acc);
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
    let b = Blocking::of(m, kp, (PANEL * 2, 4), MR_F32, CACHES);
    let (xp, wp) = (xt.as_ptr() as usize, w.as_ptr() as usize);
    let scales = (x_scales.as_ptr() as usize, w_scales.as_ptr() as usize);
    for_each_tile(out, (m, n, MR_F32, 1), kp, b, |t: Tile| {
        let x = (xp as *const u32).wrapping_add(t.r0 * kp);
        let w = (wp as *const i8).wrapping_add(t.p * kp * PANEL * 2);
        let xs = (scales.0 as *const f32).wrapping_add(t.r0);
        let ws = (scales.1 as *const f32).wrapping_add(t.p * PANEL);
        let last = t.slice.end == kp;
        // SAFETY: as in `f32_product`; the scales cover the rows and panels (asserted).
        unsafe { dispatch!(t.rows, tile_int8, (x, w, (xs, ws), t.slice, last, t.dst)) }
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
        let bits = load::<R>(&dst);
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
    store(&dst, &acc);
}
