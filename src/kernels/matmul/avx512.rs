//! The AVX-512 panel products: FMA for float32, `vdpbf16ps` for bfloat16 pairs, VNNI
//! `vpdpwssd` for int8 panels against x as int16 pairs. A register tile of up to 8 rows x 48
//! columns (3 panels) accumulates with one broadcast of x and three vector loads of W per k.

use std::arch::x86_64::*;
use std::ops::Range;

use super::panels::{run_dense, Operands, PANEL};
use crate::kernels::cpu_features;

/// `out (m, n) = x · Wᵀ` from float32 panels.
pub fn f32_product(ops: &Operands<f32, f32>, n: usize, out: &mut [f32]) {
    run_dense(out, ops.m, n, n.div_ceil(PANEL), |panels, cols, dst| {
        ops.assert_extents(ops.k * PANEL, &panels, cols, dst);
        assert!(
            cpu_features::get().avx512,
            "AVX-512 kernels on a CPU without AVX-512"
        );
        // SAFETY: the CPU has AVX-512 (checked above) and the extents are asserted above.
        unsafe { f32_panels_avx512(ops, panels, cols, dst) }
    })
}

/// `out (m, n) = x · Wᵀ` from int8 pair panels and x as int16 pairs, scaled by each row's
/// `x_scales` and each column's `w_scales`.
pub fn int8_product(
    ops: &Operands<u32, i8>,
    (x_scales, w_scales): (&[f32], &[f32]),
    n: usize,
    out: &mut [f32],
) {
    run_dense(out, ops.m, n, n.div_ceil(PANEL), |panels, cols, dst| {
        ops.assert_extents(ops.k * PANEL * 2, &panels, cols, dst);
        assert!(x_scales.len() >= ops.m && w_scales.len() >= panels.end * PANEL);
        assert!(
            cpu_features::get().avx512_vnni,
            "AVX-512 VNNI kernels on a CPU without them"
        );
        // SAFETY: the CPU has AVX-512 VNNI (checked above) and the extents are asserted above.
        unsafe { int8_panels_avx512(ops, x_scales, w_scales, panels, cols, dst) }
    })
}

/// `out (m, n) = x · Wᵀ` from bfloat16 pair panels and x as bfloat16 pairs (`vdpbf16ps`).
pub fn bf16_product(ops: &Operands<u32, u16>, n: usize, out: &mut [f32]) {
    run_dense(out, ops.m, n, n.div_ceil(PANEL), |panels, cols, dst| {
        ops.assert_extents(ops.k * PANEL * 2, &panels, cols, dst);
        assert!(
            cpu_features::get().avx512_bf16,
            "AVX-512 BF16 kernels on a CPU without them"
        );
        // SAFETY: the CPU has AVX-512 BF16 (checked above) and the extents are asserted above.
        unsafe { bf16_panels_avx512(ops, panels, cols, dst) }
    })
}

/// Rows of x per register tile and panels per tile (8 x 3 accumulators of 16 lanes).
const MR: usize = 8;
const NV: usize = 3;

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
