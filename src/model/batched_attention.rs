//! Attention for every sequence of a step in a fixed number of tensor ops per layer, however
//! many sequences the step holds: the path of every device but the CPU's own kernels (a GPU
//! launches a kernel per op, so a loop over sequences costs launches that grow with the batch),
//! and on the CPU the oracle that checks it (`--attention batched`).
//!
//! Caches are blocks of the model's pool (`kv_pool.rs`). Per layer: one scatter writes the
//! step's keys and values into the pool; per group of sequences one gather reads the keys and
//! values each sees, padded to the group's longest, and a mask hides the padding, the future
//! and (on local layers) what lies beyond the window. Decode rows (one query each) make one
//! group; each multi-query segment (a prompt chunk, drafts being verified) is a group of its
//! own, so no decode row pays for a prompt's padding.

use candle_core::{DType, Tensor};

use super::kv_pool::{row_index, row_of};
use super::step::Segment;

#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub heads: usize,
    pub head_dim: usize,
    /// Keys a query sees on a local layer (itself included); None: all earlier ones.
    pub window: Option<usize>,
}

impl Geometry {
    fn visible(&self, query: usize, key: usize) -> bool {
        key <= query && self.window.is_none_or(|w| query - key < w)
    }
}

/// One group's layout: for each member, where its rows start in the packed matrix, how many
/// queries it brings, the position of its first query, and its cache's blocks.
struct Member<'b> {
    start: usize,
    len: usize,
    offset: usize,
    blocks: &'b [u32],
}

/// `q`, `k`, `v`: the step's `(rows, hidden)` projections (q already scaled), rows packed as
/// `segments` say; writes k and v into the caches' pool and returns the attention output
/// `(rows, hidden)` in packed order.
pub(super) fn attend(
    g: Geometry,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &mut [Segment<'_>],
    layer: usize,
) -> candle_core::Result<Tensor> {
    let device = q.device();
    let width = g.heads * g.head_dim;
    let rows = segments.iter().map(|s| s.len).sum::<usize>();
    let Some((pool, members)) = layout(segments)? else {
        return Tensor::zeros((0, width), q.dtype(), device);
    };
    let (pool_k, pool_v) = pool.layer(layer)?;
    // Gathers read contiguous rows (q is a view of the packed q/k/v projection when unscaled).
    let q = &q.contiguous()?;
    scatter(&pool, (&pool_k, &pool_v), k, v, &members)?;

    // Decode rows together, each longer segment alone.
    let (decode, longer): (Vec<&Member>, Vec<&Member>) = members.iter().partition(|m| m.len == 1);
    let groups = std::iter::once(decode)
        .filter(|d| !d.is_empty())
        .chain(longer.into_iter().map(|m| vec![m]));
    let mut outs = Vec::new();
    let mut order = Vec::with_capacity(rows); // packed row of each output row, in output order
    for group in groups {
        outs.push(attend_group(g, q, &pool_k, &pool_v, &group)?);
        order.extend(group.iter().flat_map(|m| m.start..m.start + m.len));
    }
    let out = if outs.len() == 1 {
        outs.pop().expect("one")
    } else {
        Tensor::cat(&outs, 0)?
    };
    if order.iter().enumerate().all(|(i, &r)| i == r) {
        return Ok(out);
    }
    // Back to packed order: output row i holds packed row order[i].
    let mut inverse = vec![0u32; rows];
    for (i, &r) in order.iter().enumerate() {
        inverse[r] = i as u32;
    }
    out.index_select(&Tensor::new(inverse.as_slice(), device)?, 0)
}

/// The segments' members and their shared pool; None for no segments.
fn layout<'b>(
    segments: &'b [Segment<'_>],
) -> candle_core::Result<Option<(std::sync::Arc<super::kv_pool::KvPool>, Vec<Member<'b>>)>> {
    let mut members = Vec::with_capacity(segments.len());
    let mut pool = None;
    for s in segments {
        let Some(p) = s.cache.paged_blocks() else {
            candle_core::bail!("batched attention over a cache that is not paged");
        };
        match &pool {
            None => pool = Some(p.pool.clone()),
            Some(first) if !std::sync::Arc::ptr_eq(first, &p.pool) => {
                candle_core::bail!("one step's caches in two pools")
            }
            Some(_) => {}
        }
        members.push(Member {
            start: s.start,
            len: s.len,
            offset: s.cache.len(),
            blocks: &p.blocks,
        });
    }
    Ok(pool.map(|p| (p, members)))
}

/// The step's keys and values `(rows, hidden)` into the pool, at each position's row.
fn scatter(
    pool: &super::kv_pool::KvPool,
    (pool_k, pool_v): (&Tensor, &Tensor),
    k: &Tensor,
    v: &Tensor,
    members: &[Member<'_>],
) -> candle_core::Result<()> {
    let rows = members.iter().map(|m| m.len).sum::<usize>();
    let written: Vec<u32> = members
        .iter()
        .flat_map(|m| (m.offset..m.offset + m.len).map(|p| row_of(m.blocks, p)))
        .collect();
    let index = row_index(&written, k.dim(1)?, k.device())?;
    let kv_dtype = pool.dtype();
    let rows_k = k.narrow(0, 0, rows)?.to_dtype(kv_dtype)?.contiguous()?;
    let rows_v = v.narrow(0, 0, rows)?.to_dtype(kv_dtype)?.contiguous()?;
    pool_k.scatter_set(&index, &rows_k, 0)?;
    pool_v.scatter_set(&index, &rows_v, 0)
}

/// Writes `k`, `v` `(rows, hidden)` into the segments' caches without attending (the blocks
/// an early-exited position skipped).
pub(super) fn write(
    k: &Tensor,
    v: &Tensor,
    segments: &mut [Segment<'_>],
    layer: usize,
) -> candle_core::Result<()> {
    let Some((pool, members)) = layout(segments)? else {
        return Ok(());
    };
    let (pool_k, pool_v) = pool.layer(layer)?;
    scatter(&pool, (&pool_k, &pool_v), k, v, &members)
}

/// One group's attention: `(sum of its members' lens, hidden)`, members in order.
fn attend_group(
    g: Geometry,
    q: &Tensor,
    pool_k: &Tensor,
    pool_v: &Tensor,
    group: &[&Member],
) -> candle_core::Result<Tensor> {
    let device = q.device();
    let (b, heads, hd) = (group.len(), g.heads, g.head_dim);
    let queries = group.iter().map(|m| m.len).max().unwrap_or(0);
    let keys = group.iter().map(|m| m.offset + m.len).max().unwrap_or(0);
    // Padding reads a row that exists (the member's first query, its first key) and is
    // masked out or dropped.
    let mut q_rows = Vec::with_capacity(b * queries);
    let mut k_rows = Vec::with_capacity(b * keys);
    let mut mask = vec![0f32; b * queries * keys];
    let mut masked = false;
    for (i, m) in group.iter().enumerate() {
        q_rows.extend((0..queries).map(|j| (m.start + j.min(m.len - 1)) as u32));
        let total = m.offset + m.len;
        k_rows.extend((0..keys).map(|j| row_of(m.blocks, j.min(total - 1))));
        for j in 0..queries {
            let row = &mut mask[(i * queries + j) * keys..][..keys];
            for (key, x) in row.iter_mut().enumerate() {
                // A padding query sees the keys of the member's last query (not none, so
                // its softmax stays finite); its output is dropped.
                let query = m.offset + j.min(m.len - 1);
                if key >= total || !g.visible(query, key) {
                    *x = f32::NEG_INFINITY;
                    masked = true;
                }
            }
        }
    }
    let split = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
        // (b n, hidden) -> (b, heads, n, head_dim)
        t.reshape((b, n, heads, hd))?.transpose(1, 2)?.contiguous()
    };
    let q = split(
        q.index_select(&Tensor::new(q_rows.as_slice(), device)?, 0)?,
        queries,
    )?;
    let k_index = Tensor::new(k_rows.as_slice(), device)?;
    let gather = |pool: &Tensor| -> candle_core::Result<Tensor> {
        split(pool.index_select(&k_index, 0)?.to_dtype(DType::F32)?, keys)
    };
    let (k, v) = (gather(pool_k)?, gather(pool_v)?);
    let mut scores = q.matmul(&k.t()?)?; // (b, heads, queries, keys)
    if masked {
        let mask = Tensor::from_vec(mask, (b, 1, queries, keys), device)?;
        scores = scores.broadcast_add(&mask)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    // (b, heads, queries, head_dim) -> (b, queries, heads, head_dim) -> (b queries, hidden)
    let out = probs
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((b * queries, heads * hd))?;
    if group.iter().all(|m| m.len == queries) {
        return Ok(out);
    }
    let kept: Vec<u32> = group
        .iter()
        .enumerate()
        .flat_map(|(i, m)| (0..m.len).map(move |j| (i * queries + j) as u32))
        .collect();
    out.index_select(&Tensor::new(kept.as_slice(), device)?, 0)
}
