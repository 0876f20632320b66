//! The bfloat16 panel product on AMX tiles (Sapphire Rapids and later), for the skinny
//! matmul's packed weights. One `tdpbf16ps` multiplies a block of up to 16 rows of x by 32 k
//! of one 16-column panel, which is exactly a 1 KiB run of the packed `[panel][k/2][16][2]`
//! layout: the weights load as they lie. Stable Rust has no AMX intrinsics, so the tile
//! instructions are inline assembly on fixed tile registers:
//!   tmm0-3 accumulators (rows x 16 f32 each, four panels), tmm4 x, tmm5-7 weights.

use std::arch::asm;
use std::ops::Range;

use super::panels::{run_dense, Operands, PANEL};
use crate::kernels::cpu_features;

/// Panels per pass: one accumulator tile each.
const GROUP: usize = 4;
/// Rows of x per tile, and k-pairs per tile row (64 bytes).
const TILE_ROWS: usize = 16;
const TILE_PAIRS: usize = 16;
/// Floats of one accumulator tile.
const TILE_F32: usize = TILE_ROWS * PANEL;

/// The `ldtilecfg` operand (palette 1): bytes per row and rows of each tile register.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// Accumulators and x hold `rows` rows; weight tiles always 16 k-pairs.
    fn new(rows: usize) -> Self {
        let mut c = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            c.bytes_per_row[t] = 64;
            c.rows[t] = if t < 5 { rows as u8 } else { TILE_PAIRS as u8 };
        }
        c
    }
}

/// Multiply-adds of `iters` rounds of four `tdpbf16ps` on register-resident tiles (zeros):
/// the instruction's issue rate, for the bench's compute bound (`super::peak`).
///
/// # Safety
/// The CPU has AMX-BF16 and the process has the tile permission (`cpu_features`).
pub unsafe fn tdpbf16ps_loop(iters: u64) -> u64 {
    let config = TileConfig::new(TILE_ROWS);
    asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly));
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "tilezero tmm4",
        "tilezero tmm5",
        "tilezero tmm6",
        "tilezero tmm7",
        options(nostack, nomem)
    );
    for _ in 0..iters {
        // four independent accumulators, as in the panel product
        asm!(
            "tdpbf16ps tmm0, tmm4, tmm5",
            "tdpbf16ps tmm1, tmm4, tmm6",
            "tdpbf16ps tmm2, tmm4, tmm7",
            "tdpbf16ps tmm3, tmm5, tmm6",
            options(nostack, nomem)
        );
    }
    asm!("tilerelease", options(nostack, nomem));
    iters * 4 * (TILE_ROWS * PANEL * TILE_PAIRS * 2) as u64
}

/// `out (m, n) = x · Wᵀ` from bfloat16 pair panels and x as bfloat16 pairs, on AMX tiles.
pub fn bf16_product(ops: &Operands<u32, u16>, n: usize, out: &mut [f32]) {
    run_dense(out, ops.m, n, n.div_ceil(PANEL), |panels, cols, dst| {
        ops.assert_extents(ops.k * PANEL * 2, &panels, cols, dst);
        assert!(
            cpu_features::get().amx_bf16,
            "AMX kernels on a CPU (or a process) without AMX-BF16"
        );
        // SAFETY: the CPU has AMX-BF16 and the process the tile permission (`amx_bf16` means
        // both); the extents are asserted above (and again by the kernel).
        unsafe { bf16_panels_amx(ops, panels, cols, dst) }
    })
}

/// `dst (m, cols) = x · W[panels]ᵀ` with x as bfloat16 pairs `(rows, kp)` (`ops.k` = kp, a
/// multiple of 16), where `rows` is `m` up to 16 and `m` rounded up to a multiple of 16
/// beyond (zero rows). Each output is accumulated in the same order whatever `m`, so a row gets
/// the same bits alone or in a batch.
///
/// # Safety
/// The CPU has AMX-BF16 and the process has the tile permission (`cpu_features`).
unsafe fn bf16_panels_amx(
    ops: &Operands<u32, u16>,
    panels: Range<usize>,
    cols: usize,
    dst: &mut [f32],
) {
    let (x, m, kp, w) = (ops.x, ops.m, ops.k, ops.w);
    let block = m.min(TILE_ROWS);
    assert!(kp.is_multiple_of(TILE_PAIRS), "k-pairs come in whole tiles");
    assert!(
        x.len() >= m.div_ceil(block) * block * kp,
        "x rows padded to whole blocks"
    );
    assert!(
        w.len() >= panels.end * kp * PANEL * 2,
        "panels within the weight"
    );
    assert!(dst.len() >= m * cols && cols <= (panels.end - panels.start) * PANEL);
    let config = TileConfig::new(block);
    let mut acc = [0f32; GROUP * TILE_F32];
    let (x_stride, w_stride) = (kp * 4, 64usize);
    asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly));
    let mut p = panels.start;
    while p < panels.end {
        let nv = (panels.end - p).min(GROUP);
        let panel = |v: usize| w.as_ptr().add((p + v) * kp * PANEL * 2);
        // The group's panels stay in L2 while the row blocks go by.
        for row in (0..m).step_by(block) {
            let xr = x.as_ptr().add(row * kp);
            if nv == GROUP {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                for j in (0..kp).step_by(TILE_PAIRS) {
                    asm!(
                        "tileloadd tmm4, [{x} + {xs}*1]",
                        "tileloadd tmm5, [{w0} + {ws}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm5",
                        "tileloadd tmm6, [{w1} + {ws}*1]",
                        "tdpbf16ps tmm1, tmm4, tmm6",
                        "tileloadd tmm7, [{w2} + {ws}*1]",
                        "tdpbf16ps tmm2, tmm4, tmm7",
                        "tileloadd tmm5, [{w3} + {ws}*1]",
                        "tdpbf16ps tmm3, tmm4, tmm5",
                        x = in(reg) xr.add(j),
                        xs = in(reg) x_stride,
                        w0 = in(reg) panel(0).add(j * PANEL * 2),
                        w1 = in(reg) panel(1).add(j * PANEL * 2),
                        w2 = in(reg) panel(2).add(j * PANEL * 2),
                        w3 = in(reg) panel(3).add(j * PANEL * 2),
                        ws = in(reg) w_stride,
                        options(nostack, readonly)
                    );
                }
                let a = acc.as_mut_ptr();
                asm!(
                    "tilestored [{a0} + {s}*1], tmm0",
                    "tilestored [{a1} + {s}*1], tmm1",
                    "tilestored [{a2} + {s}*1], tmm2",
                    "tilestored [{a3} + {s}*1], tmm3",
                    a0 = in(reg) a,
                    a1 = in(reg) a.add(TILE_F32),
                    a2 = in(reg) a.add(2 * TILE_F32),
                    a3 = in(reg) a.add(3 * TILE_F32),
                    s = in(reg) PANEL * 4,
                    options(nostack)
                );
            } else {
                // The last panels of a task, one at a time.
                for v in 0..nv {
                    asm!("tilezero tmm0", options(nostack, nomem));
                    for j in (0..kp).step_by(TILE_PAIRS) {
                        asm!(
                            "tileloadd tmm4, [{x} + {xs}*1]",
                            "tileloadd tmm5, [{w} + {ws}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm5",
                            x = in(reg) xr.add(j),
                            xs = in(reg) x_stride,
                            w = in(reg) panel(v).add(j * PANEL * 2),
                            ws = in(reg) w_stride,
                            options(nostack, readonly)
                        );
                    }
                    asm!(
                        "tilestored [{a} + {s}*1], tmm0",
                        a = in(reg) acc.as_mut_ptr().add(v * TILE_F32),
                        s = in(reg) PANEL * 4,
                        options(nostack)
                    );
                }
            }
            for v in 0..nv {
                let col = (p + v - panels.start) * PANEL;
                let valid = cols.saturating_sub(col).min(PANEL);
                for i in 0..block.min(m - row) {
                    dst[(row + i) * cols + col..][..valid]
                        .copy_from_slice(&acc[v * TILE_F32 + i * PANEL..][..valid]);
                }
            }
        }
        p += nv;
    }
    // Give the tile state back, so context switches stop saving it.
    asm!("tilerelease", options(nostack, nomem));
}
