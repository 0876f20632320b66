//! The walk over a product's register tiles for the vector kernels (AVX2 and AVX-512), and
//! the cache blocking AVX2 uses on it: how a product of many rows is cut into register tiles,
//! k-slices and row groups, with x interleaved per tile. Each instruction set supplies its
//! register tile and how it stores its sums (`Dst` says where they go). AVX-512 walks its
//! tiles unblocked (`Blocking::none`): blocking measured slower there (`avx512.rs`).
//!
//! A register tile is `rows` rows of x by one unit of `width` panels (AVX2: one panel as two
//! 8-lane halves; AVX-512: three panels). On AVX2 x is copied once per product with each tile's rows
//! interleaved (`[k][rows]`: one sequential stream, where rows `k` floats apart, 3-16 KiB for
//! these models, share an L1 set with the panel); from more than one tile of rows on, k is cut
//! into slices whose panel part fits L1 and the rows into groups that fit L2, and a tile's sums
//! are stored into the output and reloaded between slices, so every output is still one chain
//! of multiply-adds in k order whatever the number of rows: a sequence gets bit-identical
//! results alone or in any batch.

use std::ops::Range;

use super::panels::{run, OutBlock, PANEL};

/// Cache sizes the blocking aims at, per instruction set's usual CPUs.
#[derive(Clone, Copy)]
pub(crate) struct Caches {
    /// Bytes of one unit's k-slice: about half of L1, the rest for the tile's rows of x.
    pub slice_bytes: usize,
    /// Bytes of x per row group: a quarter of L2.
    pub group_bytes: usize,
}

/// How a product is cut: k-slices of `kc` steps (a step: one k of f32, one pair of bf16 or
/// int8) and groups of at most `group` register tiles.
#[derive(Clone, Copy)]
pub(crate) struct Blocking {
    pub kc: usize,
    pub group: usize,
}

impl Blocking {
    /// No blocking: every tile runs all `steps` in one piece.
    pub fn none(steps: usize) -> Self {
        Self {
            kc: steps.max(1),
            group: usize::MAX,
        }
    }

    /// For `m` rows of `steps` steps, a unit of W taking `w_step_bytes` and a row of x
    /// `x_step_bytes` per step, in register tiles of up to `mr` rows. One tile's worth of rows
    /// is not blocked: each panel streams from memory once, in one piece, with nothing to reuse.
    pub fn of(
        m: usize,
        steps: usize,
        (w_step_bytes, x_step_bytes): (usize, usize),
        mr: usize,
        caches: Caches,
    ) -> Self {
        if m <= mr {
            return Self::none(steps);
        }
        let kc = (caches.slice_bytes / w_step_bytes).clamp(1, steps.max(1));
        let rows = (caches.group_bytes / (kc * x_step_bytes)).max(mr);
        Self {
            kc,
            group: rows / mr,
        }
    }
}

/// The register tiles of `m` rows: the fewest of at most `mr` rows, as even as can be (7
/// rows: 4 + 3, not 6 + 1, whose one-row tile would wait on FMA latency as long as a full
/// one), as (first row, rows). Which rows share a tile changes no output.
pub(crate) fn row_tiles(m: usize, mr: usize) -> Vec<(usize, usize)> {
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
pub(crate) fn interleave<T: Copy + Default>(
    x: &[T],
    m: usize,
    steps: usize,
    e: usize,
    mr: usize,
) -> Vec<T> {
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

/// One register tile's place in a task: rows `r0..r0 + rows` of x, panels `p..p + panels`
/// (absolute), the k-slice, where its sums go, and the task's next unit for the first of
/// several tiles that share this one (to prefetch while the others compute).
pub(crate) struct Tile {
    pub r0: usize,
    pub rows: usize,
    pub p: usize,
    pub panels: usize,
    pub slice: Range<usize>,
    pub dst: Dst,
    pub next: Option<usize>,
}

/// Runs a product of `m` rows by `n` columns in parallel tasks (`run`), walking each task's
/// tiles: for each k-slice, each group of row tiles, each unit of `width` panels, each tile
/// of the group (the unit's slice stays in L1 while the group's rows go by, the group's rows
/// in L2 while the units go by).
pub(crate) fn for_each_tile(
    out: &mut [f32],
    (m, n, mr, width): (usize, usize, usize, usize),
    steps: usize,
    b: Blocking,
    tile: impl Fn(Tile) + Sync,
) {
    let tiles = row_tiles(m, mr);
    let shared = tiles.len() > 1;
    run(out, (m, n), (n.div_ceil(PANEL), width), |task, block| {
        for s0 in (0..steps.max(1)).step_by(b.kc) {
            let slice = s0..(s0 + b.kc).min(steps);
            for group in tiles.chunks(b.group.max(1)) {
                for p in task.clone().step_by(width) {
                    let panels = (task.end - p).min(width);
                    let next = p + width;
                    for (i, &(r0, rows)) in group.iter().enumerate() {
                        tile(Tile {
                            r0,
                            rows,
                            p,
                            panels,
                            slice: slice.clone(),
                            dst: Dst::of(&block, r0, p - task.start),
                            next: (shared && i == 0 && next < task.end).then_some(next),
                        });
                    }
                }
            }
        }
    });
}

/// Where one tile's sums go: row 0, column 0 of the tile in the output, the row stride, and
/// how many of its columns exist (the last panel of a weight may be partial).
#[derive(Clone, Copy)]
pub(crate) struct Dst {
    pub at: *mut f32,
    pub ld: usize,
    pub valid: usize,
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

    /// The valid lanes of vector `h` of the tile, vectors `lanes` wide.
    pub fn lanes(&self, h: usize, lanes: usize) -> usize {
        self.valid.saturating_sub(h * lanes).min(lanes)
    }
}
