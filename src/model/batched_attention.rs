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
//!
//! What those ops read besides the activations (the pool rows written and gathered, the masks,
//! the output's order) is the same at every layer of a step: a [`Plan`] builds it once per set
//! of segments and the forward pass keeps it ([`Plans`]), so a layer builds nothing on the
//! host and uploads nothing (on a GPU each upload is a copy queued among the launches).
//!
//! Fused (`kernels::paged_attention`), when it equals this file's tensor ops at start-up
//! ([`check_fused_attention`]): the rows attended query by query — decode rows and the
//! positions of a verifying pass — attend in one operation (one launch per layer on a GPU,
//! reading keys and values where they lie), and the step's keys and values go into the pool
//! straight from the q/k/v projection (one launch each, no contiguous copies). The tensor ops
//! remain its oracle and the path of prompt chunks.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::kv_cache::KvCache;
use super::kv_pool::{row_index, row_of, KvPool};
use super::step::Segment;
use crate::kernels::paged_attention::{self, attend_queries, store_rows, QueryKeys};

#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub heads: usize,
    pub head_dim: usize,
    /// What q is multiplied by (so every score); None: scores unscaled.
    pub scale: Option<f64>,
    /// Keys a query sees on a local layer (itself included); None: all earlier ones.
    pub window: Option<usize>,
}

fn visible(window: Option<usize>, query: usize, key: usize) -> bool {
    key <= query && window.is_none_or(|w| query - key < w)
}

/// One member of a group: where its rows start in the packed matrix, how many queries it
/// brings, the position of its first query, and its cache's blocks (by address, which is what
/// tells two plans apart: a pass's block tables do not move while it runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Member {
    start: usize,
    len: usize,
    offset: usize,
    blocks: usize,
    /// Attended query by query (`Segment::per_query`).
    per_query: bool,
}

impl Member {
    /// Whether its rows are attended query by query: a decode row, or a verifying pass.
    fn by_query(&self) -> bool {
        self.len == 1 || self.per_query
    }
}

/// The plans of one forward pass, a few sets of segments at most (the rows still running
/// change only where sequences leave at their depth or exit early).
pub(super) struct Plans {
    plans: Vec<Plan>,
    /// `kernels::paged_attention` writes the keys and values and attends the rows attended
    /// query by query.
    fused: bool,
}

/// Plans kept at once: a pass meets a new set of segments at each depth some sequence stops
/// at; older ones are not met again.
const KEPT_PLANS: usize = 4;

impl Plans {
    pub fn new(fused: bool) -> Self {
        Self {
            plans: Vec::new(),
            fused,
        }
    }

    /// The plan for `segments`' layout, built on first use; None for no segments.
    fn plan(
        &mut self,
        segments: &[Segment<'_>],
        width: usize,
        device: &Device,
    ) -> candle_core::Result<Option<&mut Plan>> {
        if segments.is_empty() {
            return Ok(None);
        }
        let mut members = Vec::with_capacity(segments.len());
        let mut pool: Option<&Arc<KvPool>> = None;
        for s in segments {
            let Some(p) = s.cache.paged_blocks() else {
                candle_core::bail!("batched attention over a cache that is not paged");
            };
            match pool {
                None => pool = Some(&p.pool),
                Some(first) if !Arc::ptr_eq(first, &p.pool) => {
                    candle_core::bail!("one step's caches in two pools")
                }
                Some(_) => {}
            }
            members.push(Member {
                start: s.start,
                len: s.len,
                offset: s.cache.len(),
                blocks: p.blocks.as_ptr() as usize,
                per_query: s.per_query,
            });
        }
        let pool = Arc::clone(pool.expect("at least one segment"));
        let found = match self.plans.iter().position(|p| p.members == members) {
            Some(i) => i,
            None => {
                if self.plans.len() == KEPT_PLANS {
                    self.plans.remove(0);
                }
                let tables = tables(segments);
                let plan = Plan::new(pool, members, &tables, width, device, self.fused)?;
                self.plans.push(plan);
                self.plans.len() - 1
            }
        };
        Ok(Some(&mut self.plans[found]))
    }
}

/// Each segment's block table.
fn tables<'s>(segments: &'s [Segment<'_>]) -> Vec<&'s [u32]> {
    segments
        .iter()
        .map(|s| s.cache.paged_blocks().map_or(&[][..], |p| &p.blocks[..]))
        .collect()
}

/// A step's attention layout, the same at every layer.
struct Plan {
    members: Vec<Member>,
    pool: Arc<KvPool>,
    rows: usize,
    /// Where each step row's keys and values go: the pool rows `(rows)` for
    /// `kernels::paged_attention::store_rows` when fused, else `scatter_set`'s index `(rows,
    /// width)`.
    written: Tensor,
    /// The gathers, made when a layer first attends (a pass that only writes, for the
    /// blocks an early-exited position skipped, needs none).
    groups: Option<Groups>,
    fused: bool,
}

struct Groups {
    groups: Vec<Kind>,
    /// Packed row -> its row of the groups' concatenated output, when that order differs.
    inverse: Option<Tensor>,
}

impl Plan {
    fn new(
        pool: Arc<KvPool>,
        members: Vec<Member>,
        tables: &[&[u32]],
        width: usize,
        device: &Device,
        fused: bool,
    ) -> candle_core::Result<Self> {
        let rows = members.iter().map(|m| m.len).sum::<usize>();
        let written: Vec<u32> = members
            .iter()
            .zip(tables)
            .flat_map(|(m, t)| (m.offset..m.offset + m.len).map(|p| row_of(t, p)))
            .collect();
        Ok(Self {
            written: if fused {
                Tensor::new(written.as_slice(), device)?
            } else {
                row_index(&written, width, device)?
            },
            members,
            pool,
            rows,
            groups: None,
            fused,
        })
    }

    /// The groups of the plan's members (`segments`, which it was made for), made on first
    /// use.
    fn groups(
        &mut self,
        segments: &[Segment<'_>],
        device: &Device,
    ) -> candle_core::Result<&mut Groups> {
        if self.groups.is_none() {
            let tables = tables(segments);
            self.groups = Some(Groups::new(&self.members, &tables, device, self.fused)?);
        }
        Ok(self.groups.as_mut().expect("made above"))
    }

    /// The step's keys and values `(rows, hidden)` into the pool, at each position's row.
    fn scatter(
        &self,
        (pool_k, pool_v): (&Tensor, &Tensor),
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<()> {
        let (k, v) = (k.narrow(0, 0, self.rows)?, v.narrow(0, 0, self.rows)?);
        if self.fused {
            store_rows(pool_k, &k, &self.written)?;
            return store_rows(pool_v, &v, &self.written);
        }
        let kv_dtype = self.pool.dtype();
        pool_k.scatter_set(&self.written, &k.to_dtype(kv_dtype)?.contiguous()?, 0)?;
        pool_v.scatter_set(&self.written, &v.to_dtype(kv_dtype)?.contiguous()?, 0)
    }
}

/// A group of rows and how it attends.
enum Kind {
    /// Tensor ops over gathered, padded, masked keys.
    Ops(Group),
    /// `kernels::paged_attention`: `tables` `(members, keys)` u32, `queries` `(rows, 3)` u32.
    Queries { tables: Tensor, queries: Tensor },
}

impl Groups {
    fn new(
        members: &[Member],
        tables: &[&[u32]],
        device: &Device,
        fused: bool,
    ) -> candle_core::Result<Self> {
        // Fused: rows attended query by query together; each prompt chunk alone. Else (and
        // past the kernel's keys): decode rows together, each longer segment alone.
        let fused = fused && fits_the_kernel(members);
        let together = |m: &Member| {
            if fused {
                m.by_query()
            } else {
                m.len == 1
            }
        };
        let (first, alone): (Vec<usize>, Vec<usize>) =
            (0..members.len()).partition(|&i| together(&members[i]));
        let grouped = std::iter::once(first)
            .filter(|d| !d.is_empty())
            .chain(alone.into_iter().map(|i| vec![i]));
        let mut groups = Vec::new();
        let mut order = Vec::new(); // packed row of each output row
        for g in grouped {
            let parts: Vec<(Member, &[u32])> = g.iter().map(|&i| (members[i], tables[i])).collect();
            order.extend(parts.iter().flat_map(|(m, _)| m.start..m.start + m.len));
            groups.push(if fused && parts[0].0.by_query() {
                query_group(&parts, device)?
            } else {
                Kind::Ops(Group::new(&parts, device)?)
            });
        }
        let inverse = if order.iter().enumerate().all(|(i, &r)| i == r) {
            None
        } else {
            // Back to packed order: output row i holds packed row order[i].
            let mut inverse = vec![0u32; order.len()];
            for (i, &r) in order.iter().enumerate() {
                inverse[r] = i as u32;
            }
            Some(Tensor::new(inverse.as_slice(), device)?)
        };
        Ok(Self { groups, inverse })
    }
}

/// Whether every member's keys fit `kernels::paged_attention`.
fn fits_the_kernel(members: &[Member]) -> bool {
    members
        .iter()
        .all(|m| m.offset + m.len <= paged_attention::MAX_KEYS)
}

/// The kernel's view of rows attended query by query: each member's block table as pool
/// rows per position, and per row its q row, table and end of keys.
fn query_group(parts: &[(Member, &[u32])], device: &Device) -> candle_core::Result<Kind> {
    let keys = parts
        .iter()
        .map(|(m, _)| m.offset + m.len)
        .max()
        .unwrap_or(0);
    let mut tables = vec![0u32; parts.len() * keys];
    let mut queries = Vec::new();
    for (i, (m, blocks)) in parts.iter().enumerate() {
        let total = m.offset + m.len;
        for (p, row) in tables[i * keys..][..total].iter_mut().enumerate() {
            *row = row_of(blocks, p);
        }
        for j in 0..m.len {
            queries.extend([(m.start + j) as u32, i as u32, (m.offset + j + 1) as u32]);
        }
    }
    let rows = queries.len() / 3;
    Ok(Kind::Queries {
        tables: Tensor::from_vec(tables, (parts.len(), keys), device)?,
        queries: Tensor::from_vec(queries, (rows, 3), device)?,
    })
}

/// One group's gathers: `b` members, each padded to `queries` queries and `keys` keys.
struct Group {
    /// Each member's query count and first position.
    members: Vec<(usize, usize)>,
    queries: usize,
    keys: usize,
    /// `(b queries)` packed rows of q; padding repeats the member's first query.
    q_index: Tensor,
    /// `(b keys)` pool rows; padding repeats the member's first key.
    k_index: Tensor,
    /// The step's rows among the padded ones, when some member brings fewer than `queries`.
    kept: Option<Tensor>,
    /// The additive mask `(b, 1, queries, keys)` per window, made when a layer of that
    /// window first asks; None: nothing to hide.
    masks: Vec<(Option<usize>, Option<Tensor>)>,
}

impl Group {
    fn new(parts: &[(Member, &[u32])], device: &Device) -> candle_core::Result<Self> {
        let b = parts.len();
        let queries = parts.iter().map(|(m, _)| m.len).max().unwrap_or(0);
        let keys = parts
            .iter()
            .map(|(m, _)| m.offset + m.len)
            .max()
            .unwrap_or(0);
        // Padding reads a row that exists (the member's first query, its first key) and is
        // masked out or dropped.
        let mut q_rows = Vec::with_capacity(b * queries);
        let mut k_rows = Vec::with_capacity(b * keys);
        for (m, blocks) in parts {
            q_rows.extend((0..queries).map(|j| (m.start + j.min(m.len - 1)) as u32));
            let total = m.offset + m.len;
            k_rows.extend((0..keys).map(|j| row_of(blocks, j.min(total - 1))));
        }
        let kept = if parts.iter().all(|(m, _)| m.len == queries) {
            None
        } else {
            let kept: Vec<u32> = parts
                .iter()
                .enumerate()
                .flat_map(|(i, (m, _))| (0..m.len).map(move |j| (i * queries + j) as u32))
                .collect();
            Some(Tensor::new(kept.as_slice(), device)?)
        };
        Ok(Self {
            members: parts.iter().map(|(m, _)| (m.len, m.offset)).collect(),
            queries,
            keys,
            q_index: Tensor::new(q_rows.as_slice(), device)?,
            k_index: Tensor::new(k_rows.as_slice(), device)?,
            kept,
            masks: Vec::with_capacity(2),
        })
    }

    /// The mask of a layer seeing `window` (made once per window).
    fn mask(
        &mut self,
        window: Option<usize>,
        device: &Device,
    ) -> candle_core::Result<Option<Tensor>> {
        if let Some((_, m)) = self.masks.iter().find(|(w, _)| *w == window) {
            return Ok(m.clone());
        }
        let (b, queries, keys) = (self.members.len(), self.queries, self.keys);
        let mut mask = vec![0f32; b * queries * keys];
        let mut masked = false;
        for (i, &(len, offset)) in self.members.iter().enumerate() {
            let total = offset + len;
            for j in 0..queries {
                let row = &mut mask[(i * queries + j) * keys..][..keys];
                // A padding query sees the keys of the member's last query (not none, so
                // its softmax stays finite); its output is dropped.
                let query = offset + j.min(len - 1);
                for (key, x) in row.iter_mut().enumerate() {
                    if key >= total || !visible(window, query, key) {
                        *x = f32::NEG_INFINITY;
                        masked = true;
                    }
                }
            }
        }
        let mask = masked
            .then(|| Tensor::from_vec(mask, (b, 1, queries, keys), device))
            .transpose()?;
        self.masks.push((window, mask.clone()));
        Ok(mask)
    }

    /// The group's attention: `(sum of its members' lens, hidden)`, members in order.
    fn attend(
        &mut self,
        g: Geometry,
        q: &Tensor,
        pool_k: &Tensor,
        pool_v: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, heads, hd) = (self.members.len(), g.heads, g.head_dim);
        let (queries, keys) = (self.queries, self.keys);
        let split = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            // (b n, hidden) -> (b, heads, n, head_dim)
            t.reshape((b, n, heads, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = split(q.index_select(&self.q_index, 0)?, queries)?;
        let gather = |pool: &Tensor| -> candle_core::Result<Tensor> {
            split(
                pool.index_select(&self.k_index, 0)?.to_dtype(DType::F32)?,
                keys,
            )
        };
        let (k, v) = (gather(pool_k)?, gather(pool_v)?);
        let mut scores = q.matmul(&k.t()?)?; // (b, heads, queries, keys)
        if let Some(mask) = self.mask(g.window, q.device())? {
            scores = scores.broadcast_add(&mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        // (b, heads, queries, head_dim) -> (b, queries, heads, head_dim) -> (b queries, hidden)
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b * queries, heads * hd))?;
        match &self.kept {
            Some(kept) => out.index_select(kept, 0),
            None => Ok(out),
        }
    }
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
    plans: &mut Plans,
) -> candle_core::Result<Tensor> {
    let device = q.device();
    let width = g.heads * g.head_dim;
    let Some(plan) = plans.plan(segments, k.dim(1)?, device)? else {
        return Tensor::zeros((0, width), q.dtype(), device);
    };
    let (pool_k, pool_v) = plan.pool.layer(layer)?;
    plan.scatter((&pool_k, &pool_v), k, v)?;
    let Groups { groups, inverse } = plan.groups(segments, device)?;
    // The tensor ops' q: scaled and contiguous (their gathers read whole rows), made once if
    // some group needs it; the fused kernel reads the projection's view and scales as it loads.
    let q_ops = if groups.iter().any(|group| matches!(group, Kind::Ops(_))) {
        Some(match g.scale {
            Some(s) => q.affine(s, 0.0)?,
            None => q.contiguous()?,
        })
    } else {
        None
    };
    let mut outs = Vec::with_capacity(groups.len());
    for group in groups.iter_mut() {
        outs.push(match group {
            Kind::Ops(group) => {
                let q = q_ops.as_ref().expect("made for the tensor ops' groups");
                group.attend(g, q, &pool_k, &pool_v)?
            }
            Kind::Queries { tables, queries } => {
                let keys = QueryKeys {
                    tables,
                    queries,
                    heads: g.heads,
                    window: g.window,
                    scale: g.scale.unwrap_or(1.0) as f32,
                };
                attend_queries(q, &pool_k, &pool_v, &keys)?
            }
        });
    }
    let out = if outs.len() == 1 {
        outs.pop().expect("one")
    } else {
        Tensor::cat(&outs, 0)?
    };
    match inverse {
        Some(inverse) => out.index_select(inverse, 0),
        None => Ok(out),
    }
}

/// Writes `k`, `v` `(rows, hidden)` into the segments' caches without attending (the blocks
/// an early-exited position skipped).
pub(super) fn write(
    k: &Tensor,
    v: &Tensor,
    segments: &mut [Segment<'_>],
    layer: usize,
    plans: &mut Plans,
) -> candle_core::Result<()> {
    let Some(plan) = plans.plan(segments, k.dim(1)?, k.device())? else {
        return Ok(());
    };
    let (pool_k, pool_v) = plan.pool.layer(layer)?;
    plan.scatter((&pool_k, &pool_v), k, v)
}

/// How far the fused path (`kernels::paged_attention`: its writes and its attention) lies from
/// this file's tensor ops (the largest absolute difference of their outputs), on a small pool
/// on `device` holding `kv_dtype`: decode rows of caches of several lengths and a verifying
/// pass, on a global layer and a local one. The model fuses only where this is within
/// [`FUSED_TOLERANCE`] (a GPU whose kernels could not compile or compute otherwise keeps the
/// tensor ops).
pub(super) fn check_fused_attention(device: &Device, kv_dtype: DType) -> candle_core::Result<f32> {
    let (heads, head_dim) = (4, 64);
    let width = heads * head_dim;
    let pool = KvPool::new(1, width, kv_dtype, device.clone());
    let lens = [37, 5, 20];
    let mut caches: Vec<KvCache> = lens
        .iter()
        .map(|_| KvCache::paged(pool.clone(), 64))
        .collect();
    // Values spread like activations, from a fixed sequence (no generator needed).
    let values = |rows: usize, salt: usize| -> candle_core::Result<Tensor> {
        let v: Vec<f32> = (0..rows * width)
            .map(|i| ((i * 7919 + salt * 104_729) % 2003) as f32 / 1001.0 - 1.0)
            .collect();
        Tensor::from_vec(v, (rows, width), device)
    };
    for (i, (cache, &len)) in caches.iter_mut().zip(&lens).enumerate() {
        cache.reserve(len + 3)?;
        let kv = values(len, i)?;
        let mut seg = [Segment {
            start: 0,
            len,
            cache,
            per_query: false,
        }];
        write(&kv, &(&kv * 0.5)?, &mut seg, 0, &mut Plans::new(false))?;
        cache.advance(len);
    }
    // A step: two decode rows and a verifying pass of three positions, q a view of a wider
    // matrix (as of the q/k/v projection), scaled.
    let q = Tensor::cat(&[values(5, 10)?, values(5, 13)?], 1)?.narrow(1, 0, width)?;
    let (k, v) = (values(5, 11)?, values(5, 12)?);
    let mut worst = 0f32;
    for window in [None, Some(8)] {
        let g = Geometry {
            heads,
            head_dim,
            scale: Some(0.125),
            window,
        };
        let mut outs = Vec::new();
        // Fused first: its writes of the step's keys and values must be what it then reads
        // (the tensor ops' run after it writes them again, the same).
        for fused in [true, false] {
            let [a, b, c] = &mut caches[..] else {
                unreachable!("three caches")
            };
            let mut segments = [(a, 0, 1, false), (b, 1, 1, false), (c, 2, 3, true)].map(
                |(cache, start, len, per_query)| Segment {
                    start,
                    len,
                    cache,
                    per_query,
                },
            );
            outs.push(attend(
                g,
                &q,
                &k,
                &v,
                &mut segments,
                0,
                &mut Plans::new(fused),
            )?);
        }
        let diff = (&outs[0] - &outs[1])?.abs()?.flatten_all()?.max(0)?;
        worst = worst.max(diff.to_scalar::<f32>()?);
    }
    Ok(worst)
}

/// How far the fused path may lie from the tensor ops (float32 sums in another order).
pub(super) const FUSED_TOLERANCE: f32 = 1e-4;

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    #[cfg(feature = "cuda-emulator")]
    use crate::kernels::cuda_emulator::{emulating, launched};
    use crate::model::kv_cache::KvCache;

    #[cfg(feature = "cuda-emulator")]
    #[test]
    fn the_cuda_attention_kernels_pass_the_start_up_check_a_gpu_must_pass(
    ) -> candle_core::Result<()> {
        // `paged_attention.cu` run on the CPU (kernels/cuda_emulator.rs) against the tensor ops
        for (kv, suffix) in [(DType::F32, "f32"), (DType::BF16, "bf16")] {
            launched();
            let difference = emulating(|| check_fused_attention(&Device::Cpu, kv))?;
            assert!(difference <= FUSED_TOLERANCE, "{kv:?}: {difference}");
            let want: std::collections::BTreeSet<String> = [
                format!("paged_attention_{suffix}"),
                format!("store_rows_{suffix}"),
            ]
            .into();
            assert_eq!(launched(), want);
        }
        Ok(())
    }

    fn segment(cache: &mut KvCache, start: usize, len: usize) -> Segment<'_> {
        Segment {
            start,
            len,
            cache,
            per_query: false,
        }
    }

    #[test]
    fn a_plan_serves_every_layer_of_its_segments_and_only_theirs() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let g = Geometry {
            heads: 2,
            head_dim: 2,
            scale: None,
            window: None,
        };
        let pool = KvPool::new(2, 4, DType::F32, dev.clone());
        let (mut a, mut b) = (KvCache::paged(pool.clone(), 64), KvCache::paged(pool, 64));
        for c in [&mut a, &mut b] {
            c.reserve(3)?;
            c.advance(2); // both hold 2 positions: same offsets, other blocks
        }
        let x = Tensor::arange(0f32, 8., &dev)?.reshape((2, 4))?;
        let mut plans = Plans::new(false);
        // a write alone makes no gathers
        write(
            &x,
            &x,
            &mut [segment(&mut a, 0, 1), segment(&mut b, 1, 1)],
            0,
            &mut plans,
        )?;
        assert_eq!(plans.plans.len(), 1);
        assert!(plans.plans[0].groups.is_none());
        // every layer of the same segments: the one plan, its gathers made once
        let mut outs = Vec::new();
        for layer in 0..2 {
            let mut segs = [segment(&mut a, 0, 1), segment(&mut b, 1, 1)];
            outs.push(attend(g, &x, &x, &x, &mut segs, layer, &mut plans)?);
        }
        assert_eq!(plans.plans.len(), 1);
        assert!(plans.plans[0].groups.is_some());
        // the same rows, lens and offsets of other caches: another plan, the rows swapped
        let mut segs = [segment(&mut b, 0, 1), segment(&mut a, 1, 1)];
        let swapped = attend(g, &x, &x, &x, &mut segs, 0, &mut plans)?;
        assert_eq!(plans.plans.len(), 2);
        // what a fresh plan computes, layer by layer
        for (layer, out) in outs.iter().enumerate() {
            let mut segs = [segment(&mut a, 0, 1), segment(&mut b, 1, 1)];
            let fresh = attend(g, &x, &x, &x, &mut segs, layer, &mut Plans::new(false))?;
            assert_eq!(out.to_vec2::<f32>()?, fresh.to_vec2::<f32>()?);
        }
        assert_eq!(swapped.dims(), &[2, 4]);
        // plans kept stay bounded
        for start in 0..2 * KEPT_PLANS {
            let mut segs = [segment(&mut a, start, 1)];
            write(
                &x.narrow(0, 0, 1)?,
                &x.narrow(0, 0, 1)?,
                &mut segs,
                0,
                &mut plans,
            )?;
        }
        assert_eq!(plans.plans.len(), KEPT_PLANS);
        Ok(())
    }

    #[test]
    fn the_fused_equals_the_tensor_ops() -> candle_core::Result<()> {
        for dtype in [DType::F32, DType::BF16] {
            let diff = check_fused_attention(&Device::Cpu, dtype)?;
            assert!(diff <= 1e-5, "{dtype:?}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn caches_past_the_kernels_keys_take_the_tensor_ops() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let g = Geometry {
            heads: 1,
            head_dim: 2,
            scale: None,
            window: None,
        };
        let pool = KvPool::new(1, 2, DType::F32, dev.clone());
        let mut long = KvCache::paged(pool, paged_attention::MAX_KEYS + 8);
        long.reserve(paged_attention::MAX_KEYS + 1)?;
        long.advance(paged_attention::MAX_KEYS);
        let x = Tensor::ones((1, 2), DType::F32, &dev)?;
        let mut segs = [segment(&mut long, 0, 1)];
        let out = attend(g, &x, &x, &x, &mut segs, 0, &mut Plans::new(true))?;
        assert_eq!(out.dims(), &[1, 2]);
        Ok(())
    }
}
