//! The AVX-512 panel products: FMA for float32, `vdpbf16ps` for bfloat16 pairs, VNNI
//! `vpdpwssd` for int8 panels against x as int16 pairs. A register tile of up to 8 rows x 48
//! columns (three panels, 24 accumulators) takes one broadcast of x per row and three vector
//! loads of W per k step; the sums go straight into the product's output, and while several
//! row tiles share a unit of panels the first prefetches the next unit into L2.
//!
//! Not cache-blocked, unlike AVX2: on a Xeon with 48 KiB L1 and 2 MiB L2 (Emerald Rapids, in
//! one process alternating with this layout) the AVX2 blocking (x interleaved per tile,
//! k-slices in L1, row groups in L2) made 16- and 512-row products 5-40 % slower in f32 and
//! int8, in tiles of 8 x 3 and 12 x 2 alike: the unit's panels stay in L2 while the row tiles
//! go by, and that L2 feeds the FMAs.
//!
//! Every output is accumulated in k order in one lane whatever the number of rows, so a
//! sequence gets bit-identical results alone or in any batch.

use std::arch::x86_64::*;

use super::blocking::{for_each_tile, Blocking, Dst, Tile};
use super::panels::{Operands, PANEL};
use crate::kernels::cpu_features;

/// Rows of x per register tile, at most, and panels per tile: 8 x 3 = 24 accumulators of the
/// 32 zmm registers, three of W, the broadcasts folded into the multiply-adds.
const MR: usize = 8;
const WIDTH: usize = 3;

fn check(has: bool, what: &str) {
    assert!(has, "AVX-512 {what} kernels on a CPU without them");
}

/// `out (m, n) = x · Wᵀ` from float32 panels `[panel][k][16]`.
pub fn f32_product(ops: &Operands<f32, f32>, n: usize, out: &mut [f32]) {
    check(cpu_features::get().avx512, "F");
    let (x, m, k, w) = (ops.x, ops.m, ops.k, ops.w);
    ops.assert_extents(k * PANEL, &(0..n.div_ceil(PANEL)), n, out);
    let b = Blocking::none(k);
    let (xp, wp) = (x.as_ptr() as usize, w.as_ptr() as usize);
    for_each_tile(out, (m, n, MR, WIDTH), k, b, |t: Tile| {
        let x = (xp as *const f32).wrapping_add(t.r0 * k);
        let w = (wp as *const f32).wrapping_add(t.p * k * PANEL);
        let next = t
            .next
            .map(|q| (wp as *const f32).wrapping_add(q * k * PANEL));
        let panel = k * PANEL;
        // SAFETY: the CPU has AVX-512F (checked above); the tile reads rows r0..r0+rows of x
        // and its panels (and `next`'s) of W, asserted in range above, and writes its rows and
        // panels' columns of its task's output block.
        unsafe {
            dispatch!(
                t.rows,
                t.panels,
                tile_f32,
                ((x, k), (w, panel), t.slice, t.dst, next)
            )
        }
    });
}

/// `out (m, n) = x · Wᵀ` from bfloat16 pair panels `[panel][kp][16][2]` and x as bfloat16
/// pairs `(m, kp)` (`vdpbf16ps`).
pub fn bf16_product(ops: &Operands<u32, u16>, n: usize, out: &mut [f32]) {
    check(cpu_features::get().avx512_bf16, "BF16");
    let (xb, m, kp, w) = (ops.x, ops.m, ops.k, ops.w);
    ops.assert_extents(kp * PANEL * 2, &(0..n.div_ceil(PANEL)), n, out);
    let b = Blocking::none(kp);
    let (xp, wp) = (xb.as_ptr() as usize, w.as_ptr() as usize);
    for_each_tile(out, (m, n, MR, WIDTH), kp, b, |t: Tile| {
        let x = (xp as *const u32).wrapping_add(t.r0 * kp);
        let w = (wp as *const u16).wrapping_add(t.p * kp * PANEL * 2);
        let next = t
            .next
            .map(|q| (wp as *const u16).wrapping_add(q * kp * PANEL * 2));
        let panel = kp * PANEL * 2;
        // SAFETY: as in `f32_product`, with AVX-512 BF16.
        unsafe {
            dispatch!(
                t.rows,
                t.panels,
                tile_bf16,
                ((x, kp), (w, panel), t.slice, t.dst, next)
            )
        }
    });
}

/// `out (m, n) = x · Wᵀ` from int8 pair panels `[panel][kp][16][2]` and x as int16 pairs
/// `(m, kp)`, scaled by each row's `x_scales` and each column's `w_scales` at the end.
pub fn int8_product(
    ops: &Operands<u32, i8>,
    (x_scales, w_scales): (&[f32], &[f32]),
    n: usize,
    out: &mut [f32],
) {
    check(cpu_features::get().avx512_vnni, "VNNI");
    let (xq, m, kp, w) = (ops.x, ops.m, ops.k, ops.w);
    let panels = n.div_ceil(PANEL);
    ops.assert_extents(kp * PANEL * 2, &(0..panels), n, out);
    assert!(x_scales.len() >= m && w_scales.len() >= panels * PANEL);
    let b = Blocking::none(kp);
    let (xp, wp) = (xq.as_ptr() as usize, w.as_ptr() as usize);
    let scales = (x_scales.as_ptr() as usize, w_scales.as_ptr() as usize);
    for_each_tile(out, (m, n, MR, WIDTH), kp, b, |t: Tile| {
        let x = (xp as *const u32).wrapping_add(t.r0 * kp);
        let w = (wp as *const i8).wrapping_add(t.p * kp * PANEL * 2);
        let next = t
            .next
            .map(|q| (wp as *const i8).wrapping_add(q * kp * PANEL * 2));
        let xs = (scales.0 as *const f32).wrapping_add(t.r0);
        let ws = (scales.1 as *const f32).wrapping_add(t.p * PANEL);
        let panel = kp * PANEL * 2;
        // SAFETY: as in `f32_product`, with AVX-512 VNNI; the scales cover the rows and
        // panels (asserted).
        unsafe {
            dispatch!(
                t.rows,
                t.panels,
                tile_int8,
                ((x, kp), (w, panel), (xs, ws), t.slice, t.dst, next)
            )
        }
    });
}

/// Calls `$tile::<R, V>(args)` with the tile's rows and panels as const generics.
macro_rules! dispatch {
    ($rows:expr, $panels:expr, $tile:ident, $args:tt) => {
        match $panels {
            3 => dispatch!(@rows $rows, 3, $tile, $args),
            2 => dispatch!(@rows $rows, 2, $tile, $args),
            _ => dispatch!(@rows $rows, 1, $tile, $args),
        }
    };
    (@rows $rows:expr, $v:literal, $tile:ident, ($($arg:expr),*)) => {
        match $rows {
            8 => $tile::<8, $v>($($arg),*),
            7 => $tile::<7, $v>($($arg),*),
            6 => $tile::<6, $v>($($arg),*),
            5 => $tile::<5, $v>($($arg),*),
            4 => $tile::<4, $v>($($arg),*),
            3 => $tile::<3, $v>($($arg),*),
            2 => $tile::<2, $v>($($arg),*),
            _ => $tile::<1, $v>($($arg),*),
        }
    };
}
use dispatch;

/// The mask of a vector's valid lanes.
#[inline(always)]
fn mask(lanes: usize) -> __mmask16 {
    ((1u32 << lanes) - 1) as __mmask16
}

#[inline(always)]
unsafe fn store<const R: usize, const V: usize>(dst: &Dst, acc: &[[__m512; V]; R]) {
    for (r, accs) in acc.iter().enumerate() {
        for (v, a) in accs.iter().enumerate() {
            let (at, n) = (dst.at.add(r * dst.ld + v * PANEL), dst.lanes(v, PANEL));
            if n == PANEL {
                _mm512_storeu_ps(at, *a);
            } else if n > 0 {
                _mm512_mask_storeu_ps(at, mask(n), *a);
            }
        }
    }
}

/// Prefetches one line of each of the next unit's `V` panels at `offset` elements in.
#[inline(always)]
unsafe fn prefetch<T, const V: usize>(next: Option<*const T>, panel: usize, offset: usize) {
    if let Some(next) = next {
        for v in 0..V {
            _mm_prefetch::<_MM_HINT_T1>(next.add(v * panel + offset) as *const i8);
        }
    }
}

/// One register tile of float32: x rows `ldx` apart, `V` panels `panel` floats apart. With
/// `next`, it prefetches that unit's part of the k range into L2 (into L1 it evicted the
/// panels the other tiles were about to read: 5-7 % slower at 16 rows).
#[target_feature(enable = "avx512f")]
unsafe fn tile_f32<const R: usize, const V: usize>(
    (x, ldx): (*const f32, usize),
    (w, panel): (*const f32, usize),
    slice: std::ops::Range<usize>,
    dst: Dst,
    next: Option<*const f32>,
) {
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    for kk in slice {
        prefetch::<f32, V>(next, panel, kk * PANEL);
        let mut wv = [_mm512_setzero_ps(); V];
        for (v, slot) in wv.iter_mut().enumerate() {
            *slot = _mm512_loadu_ps(w.add(v * panel + kk * PANEL));
        }
        for (r, accs) in acc.iter_mut().enumerate() {
            let xb = _mm512_set1_ps(*x.add(r * ldx + kk));
            for (v, a) in accs.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(xb, wv[v], *a);
            }
        }
    }
    store(&dst, &acc);
}

/// One register tile of bfloat16 pairs (`vdpbf16ps`): x pairs rows `ldx` apart.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
unsafe fn tile_bf16<const R: usize, const V: usize>(
    (x, ldx): (*const u32, usize),
    (w, panel): (*const u16, usize),
    slice: std::ops::Range<usize>,
    dst: Dst,
    next: Option<*const u16>,
) {
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    for j in slice {
        prefetch::<u16, V>(next, panel, j * PANEL * 2);
        let mut wv = [_mm512_castsi512_ps(_mm512_setzero_si512()); V];
        for (v, slot) in wv.iter_mut().enumerate() {
            *slot = _mm512_loadu_ps(w.add(v * panel + j * PANEL * 2) as *const f32);
        }
        for (r, accs) in acc.iter_mut().enumerate() {
            let xb = _mm512_castsi512_ps(_mm512_set1_epi32(*x.add(r * ldx + j) as i32));
            for (v, a) in accs.iter_mut().enumerate() {
                *a = _mm512_dpbf16_ps(
                    *a,
                    std::mem::transmute::<__m512, __m512bh>(xb),
                    std::mem::transmute::<__m512, __m512bh>(wv[v]),
                );
            }
        }
    }
    store(&dst, &acc);
}

/// Tiles with fewer accumulators than this wait on `vpdpwssd`'s latency rather than its issue
/// rate, and take the intrinsic (see `dpwssd`).
const LATENCY_BOUND_CHAINS: usize = 8;

/// `acc + Σ pairs of x · w` as one `vpdpwssd`, in inline assembly: LLVM's machine combiner
/// splits `_mm512_dpwssd_epi32` into `vpmaddwd` + `vpaddd` on CPUs it does not know to have a
/// fast `vpdpwssd` (every CPU, for a build without `target-cpu`), which shortens a chain's
/// latency but doubles the instructions of a tile whose many chains hide that latency anyway:
/// the 8 x 3 tile compiled to 42 `vpmaddwd` and 6 `vpdpwssd` and ran its products at 55-80 %
/// of the `vpdpwssd` peak. One instruction per step: 1.19-1.28x at 16 and 512 rows on AMD
/// Zen 4 (`bench --kernels --arch gpt2`, alternating builds; docs/benchmarks.md). Tiles of
/// few chains (one row) keep the split, which shortens their latency-bound chains. The
/// arithmetic is the same either way: exact int16 products summed in int32, wrapping.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dpwssd(mut acc: __m512i, x: __m512i, w: __m512i) -> __m512i {
    // SAFETY: register operands only, on a CPU with AVX-512 VNNI (the callers check).
    std::arch::asm!(
        "vpdpwssd {acc}, {x}, {w}",
        acc = inout(zmm_reg) acc,
        x = in(zmm_reg) x,
        w = in(zmm_reg) w,
        options(pure, nomem, nostack, preserves_flags),
    );
    acc
}

/// One register tile of int8 pairs against x as int16 pairs (`vpdpwssd`: two exact products
/// per lane, summed exactly in int32; `x_levels` keeps the sums in range), scaled per row and
/// column at the end.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_int8<const R: usize, const V: usize>(
    (x, ldx): (*const u32, usize),
    (w, panel): (*const i8, usize),
    (x_scales, w_scales): (*const f32, *const f32),
    slice: std::ops::Range<usize>,
    dst: Dst,
    next: Option<*const i8>,
) {
    let mut sums = [[_mm512_setzero_si512(); V]; R];
    for j in slice {
        prefetch::<i8, V>(next, panel, j * PANEL * 2);
        let mut wv = [_mm512_setzero_si512(); V];
        for (v, slot) in wv.iter_mut().enumerate() {
            let bytes = _mm256_loadu_si256(w.add(v * panel + j * PANEL * 2) as *const __m256i);
            *slot = _mm512_cvtepi8_epi16(bytes);
        }
        for (r, rs) in sums.iter_mut().enumerate() {
            let xb = _mm512_set1_epi32(*x.add(r * ldx + j) as i32);
            for (v, s) in rs.iter_mut().enumerate() {
                *s = if R * V >= LATENCY_BOUND_CHAINS {
                    dpwssd(*s, xb, wv[v])
                } else {
                    _mm512_dpwssd_epi32(*s, xb, wv[v])
                };
            }
        }
    }
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    for (r, (accs, rs)) in acc.iter_mut().zip(&sums).enumerate() {
        let xs = _mm512_set1_ps(*x_scales.add(r));
        for (v, (a, s)) in accs.iter_mut().zip(rs).enumerate() {
            // lanes past the weight's columns read scales of its zero padding: stored nowhere
            let ws = _mm512_loadu_ps(w_scales.add(v * PANEL));
            *a = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(*s), xs), ws);
        }
    }
    store(&dst, &acc);
}
