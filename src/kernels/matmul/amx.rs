//! The bfloat16 panel product on AMX tiles (Sapphire Rapids and later), for the skinny
//! matmul's packed weights. One `tdpbf16ps` multiplies a block of up to 16 rows of x by 32 k
//! of one 16-column panel, which is exactly a 1 KiB run of the packed `[panel][k/2][16][2]`
//! layout: the weights load as they lie. Stable Rust has no AMX intrinsics, so the tile
//! instructions are inline assembly on fixed tile registers:
//!   tmm0-3 accumulators (rows x 16 f32 each, four panels), tmm4 x, tmm5-7 weights.
//!
//! Tuned on a 2-core Emerald Rapids VM (48 KiB L1, 2 MiB L2), against the kernel before, in
//! one process alternating the two: accumulators are stored straight into the output (no
//! per-task buffer and copy), tasks are whole groups of four panels (a task of 3 panels ran
//! one panel at a time), and from 17 rows on k is cut into slices whose four panels stay in
//! L1 while every 16-row block goes by. GPT-Neo-125M's block products and vocabulary head:
//! 1.04-1.37x at 16 and 512 rows (the 768 x 768 and 768 x 3072 products most), 1.05-1.17x
//! for the head at 4-64 rows, equal at 1 row.

use std::arch::asm;
use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
use std::ops::Range;

use super::panels::{run, Operands, OutBlock, PANEL};
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

/// Rows of x the AMX kernel multiplies for `m` rows: one block of `m` up to 16, whole
/// blocks of 16 beyond (x and the output padded with rows the caller drops).
pub fn padded_rows(m: usize) -> usize {
    if m > TILE_ROWS {
        m.next_multiple_of(TILE_ROWS)
    } else {
        m
    }
}

/// Tile steps (16 k-pairs, 1 KiB of a panel) per k-slice when several row blocks share the
/// panels: a group's slice (4 panels x 8 KiB) stays in the 48 KiB L1 while every row block
/// goes by, so each weight tile is loaded from L2 once per slice, not once per row block.
const SLICE_STEPS: usize = 8;

/// Tile steps ahead that a single row block (up to 16 rows: decode) prefetches the weights
/// into L2. The hardware prefetcher alone kept ~9 GB/s of a 16-stream bf16 step's weights
/// in flight (the `tdpbf16ps` waiting on `tileloadd`: 55 % of the server's time); 16
/// contrast streams on GPT-Neo-125M, alternating server runs: 305 tok/s (289-317) without,
/// 349 (331-392) at 2 steps, 324-348 at 3 and 4, 266-303 at 8.
const PREFETCH_STEPS: usize = 2;

/// `out (rows, n) = x · Wᵀ` from bfloat16 pair panels and x as bfloat16 pairs `(rows, kp)`,
/// on AMX tiles, with `rows = padded_rows(ops.m)` (x and `out` hold that many rows; the
/// caller keeps the first `m`).
pub fn bf16_product(ops: &Operands<u32, u16>, n: usize, out: &mut [f32]) {
    let rows = padded_rows(ops.m);
    let panels = n.div_ceil(PANEL);
    let padded = Operands {
        x: ops.x,
        m: rows,
        k: ops.k,
        w: ops.w,
    };
    padded.assert_extents(ops.k * PANEL * 2, &(0..panels), n, out);
    assert!(
        ops.k.is_multiple_of(TILE_PAIRS),
        "k-pairs come in whole tiles"
    );
    assert!(
        cpu_features::get().amx_bf16,
        "AMX kernels on a CPU (or a process) without AMX-BF16"
    );
    run(out, (rows, n), (panels, GROUP), |task, block| {
        // SAFETY: the CPU has AMX-BF16 and the process the tile permission (`amx_bf16` means
        // both); x holds `rows` rows of kp pairs and W the task's panels (asserted above), and
        // the block is `rows` rows of the task's columns of `out`.
        unsafe { bf16_panels_amx(&padded, task, &block) }
    })
}

/// Where a panel's accumulator tile of one row block goes: straight into the output (rows
/// `ld` apart), or, for the weight's last panel when it is partial, into a 16-column
/// scratch tile copied out at the end.
#[derive(Clone, Copy)]
struct Acc {
    at: *mut f32,
    stride: usize,
}

/// `block (m, cols) = x · W[panels]ᵀ` with x as bfloat16 pairs `(m, kp)`, `m` at most 16 or a
/// multiple of 16. Each output is the same chain of `tdpbf16ps` over the k tiles in order
/// whatever `m` and the slicing (sums wait in memory as exact f32 between slices), so a row
/// gets the same bits alone or in a batch.
///
/// # Safety
/// The CPU has AMX-BF16 and the process has the tile permission (`cpu_features`); x, W and
/// the block are as `bf16_product` asserts.
unsafe fn bf16_panels_amx(ops: &Operands<u32, u16>, panels: Range<usize>, block: &OutBlock) {
    let (x, m, kp, w) = (ops.x, ops.m, ops.k, ops.w);
    let rows = m.min(TILE_ROWS);
    let blocks = m.div_ceil(rows);
    let steps = kp / TILE_PAIRS;
    let kc = if blocks > 1 {
        SLICE_STEPS
    } else {
        steps.max(1)
    };
    // one row block streams the weights once, from memory: ask for them ahead
    let ahead = if blocks > 1 { 0 } else { PREFETCH_STEPS };
    let (cols, ld) = (block.cols(), block.ld());
    // the weight's last panel may be partial: its sums go to scratch, one tile per row block
    let partial = cols % PANEL != 0;
    let mut scratch = vec![0f32; if partial { blocks * TILE_F32 } else { 0 }];
    let scratch_at = scratch.as_mut_ptr();
    let last = panels.len() - 1;
    let acc_of = |v: usize, b: usize| -> Acc {
        if partial && v == last {
            Acc {
                at: scratch_at.add(b * TILE_F32),
                stride: PANEL,
            }
        } else {
            Acc {
                at: block.as_mut_ptr().add(b * rows * ld + v * PANEL),
                stride: ld,
            }
        }
    };
    let config = TileConfig::new(rows);
    asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly));
    let x_stride = kp * 4;
    let mut p = 0;
    while p < panels.len() {
        let nv = (panels.len() - p).min(GROUP);
        let panel = |v: usize| w.as_ptr().add((panels.start + p + v) * kp * PANEL * 2);
        for s0 in (0..steps).step_by(kc) {
            let slice = s0..(s0 + kc).min(steps);
            for b in 0..blocks {
                let xr = x.as_ptr().add(b * rows * kp);
                if nv == GROUP {
                    let a = [0, 1, 2, 3].map(|v| acc_of(p + v, b));
                    let w = ([0, 1, 2, 3].map(panel), ahead);
                    group4(xr, x_stride, w, &a, slice.clone());
                } else {
                    for v in 0..nv {
                        group1(xr, x_stride, panel(v), acc_of(p + v, b), slice.clone());
                    }
                }
            }
        }
        p += nv;
    }
    // Give the tile state back, so context switches stop saving it.
    asm!("tilerelease", options(nostack, nomem));
    if partial {
        let valid = cols - last * PANEL;
        for b in 0..blocks {
            for i in 0..rows {
                let src = &scratch[b * TILE_F32 + i * PANEL..][..valid];
                let dst = block.as_mut_ptr().add((b * rows + i) * ld + last * PANEL);
                std::ptr::copy_nonoverlapping(src.as_ptr(), dst, valid);
            }
        }
    }
}

/// Four panels' accumulators over one k-slice of one row block: loaded from `acc` (zeroed on
/// the first slice), four `tdpbf16ps` per tile step, stored back; with `ahead`, the weight
/// tiles that many steps on are prefetched into L2.
#[inline(always)]
unsafe fn group4(
    x: *const u32,
    x_stride: usize,
    (w, ahead): ([*const u16; GROUP], usize),
    acc: &[Acc; GROUP],
    slice: Range<usize>,
) {
    if slice.start == 0 {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
    } else {
        asm!(
            "tileloadd tmm0, [{a0} + {s0}*1]",
            "tileloadd tmm1, [{a1} + {s1}*1]",
            "tileloadd tmm2, [{a2} + {s2}*1]",
            "tileloadd tmm3, [{a3} + {s3}*1]",
            a0 = in(reg) acc[0].at,
            a1 = in(reg) acc[1].at,
            a2 = in(reg) acc[2].at,
            a3 = in(reg) acc[3].at,
            s0 = in(reg) acc[0].stride * 4,
            s1 = in(reg) acc[1].stride * 4,
            s2 = in(reg) acc[2].stride * 4,
            s3 = in(reg) acc[3].stride * 4,
            options(nostack, readonly)
        );
    }
    let tile = TILE_PAIRS * PANEL * 2;
    for j in slice {
        if ahead > 0 {
            for panel in w {
                let at = panel.wrapping_add((j + ahead) * tile);
                for line in 0..TILE_PAIRS {
                    // 64 bytes a line; past the weight's end a prefetch does nothing
                    _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(line * 32) as *const i8);
                }
            }
        }
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
            x = in(reg) x.add(j * TILE_PAIRS),
            xs = in(reg) x_stride,
            w0 = in(reg) w[0].add(j * tile),
            w1 = in(reg) w[1].add(j * tile),
            w2 = in(reg) w[2].add(j * tile),
            w3 = in(reg) w[3].add(j * tile),
            ws = in(reg) 64usize,
            options(nostack, readonly)
        );
    }
    asm!(
        "tilestored [{a0} + {s0}*1], tmm0",
        "tilestored [{a1} + {s1}*1], tmm1",
        "tilestored [{a2} + {s2}*1], tmm2",
        "tilestored [{a3} + {s3}*1], tmm3",
        a0 = in(reg) acc[0].at,
        a1 = in(reg) acc[1].at,
        a2 = in(reg) acc[2].at,
        a3 = in(reg) acc[3].at,
        s0 = in(reg) acc[0].stride * 4,
        s1 = in(reg) acc[1].stride * 4,
        s2 = in(reg) acc[2].stride * 4,
        s3 = in(reg) acc[3].stride * 4,
        options(nostack)
    );
}

/// One panel's accumulator over one k-slice of one row block (a task's last panels).
#[inline(always)]
unsafe fn group1(x: *const u32, x_stride: usize, w: *const u16, acc: Acc, slice: Range<usize>) {
    if slice.start == 0 {
        asm!("tilezero tmm0", options(nostack, nomem));
    } else {
        asm!(
            "tileloadd tmm0, [{a} + {s}*1]",
            a = in(reg) acc.at,
            s = in(reg) acc.stride * 4,
            options(nostack, readonly)
        );
    }
    for j in slice {
        asm!(
            "tileloadd tmm4, [{x} + {xs}*1]",
            "tileloadd tmm5, [{w} + {ws}*1]",
            "tdpbf16ps tmm0, tmm4, tmm5",
            x = in(reg) x.add(j * TILE_PAIRS),
            xs = in(reg) x_stride,
            w = in(reg) w.add(j * TILE_PAIRS * PANEL * 2),
            ws = in(reg) 64usize,
            options(nostack, readonly)
        );
    }
    asm!(
        "tilestored [{a} + {s}*1], tmm0",
        a = in(reg) acc.at,
        s = in(reg) acc.stride * 4,
        options(nostack)
    );
}
