//! The paged key/value store of the batched attention path (every device but the CPU's own
//! kernels): per layer one keys and one values matrix of `(blocks × BLOCK, hidden)` rows, shared
//! by every sequence of the model. A sequence owns whole blocks (its `KvCache` lists them), so
//! the keys of any set of sequences are one `index_select` away and a step's new keys and
//! values are written with one scatter per layer, however many sequences the step holds.
//!
//! Blocks are handed out from a free list; when it runs dry the matrices grow (doubling), which
//! copies them once. Nothing shrinks: the engine's KV budget bounds what sequences reserve, so
//! the pool stays within the budget plus a block of slack per sequence.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Result, Tensor};

/// Positions per block: small enough that a short sequence wastes little, large enough that
/// block tables stay short.
pub const BLOCK: usize = 16;

/// Blocks the pool starts with.
const FIRST_BLOCKS: usize = 64;

pub struct KvPool {
    layers: usize,
    width: usize,
    dtype: DType,
    device: Device,
    inner: Mutex<Inner>,
}

/// How far doubling may take the pool: beyond it, the pool grows only by what is asked.
struct Growth {
    soft_limit_blocks: Option<usize>,
}

struct Inner {
    /// Per layer `(blocks × BLOCK, width)`; empty until the first allocation.
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    blocks: usize,
    free: Vec<u32>,
    growth: Growth,
}

impl KvPool {
    /// A pool for `layers` layers of `width` (= hidden) floats per position, stored as `dtype`.
    pub fn new(layers: usize, width: usize, dtype: DType, device: Device) -> Arc<Self> {
        Arc::new(Self {
            layers,
            width,
            dtype,
            device,
            inner: Mutex::new(Inner {
                keys: Vec::new(),
                values: Vec::new(),
                blocks: 0,
                free: Vec::new(),
                growth: Growth {
                    soft_limit_blocks: None,
                },
            }),
        })
    }

    /// Doubling stops at `positions` (the engine's KV budget, in positions, plus a partly
    /// filled block per sequence): the pool never holds much more than the budget lets
    /// sequences reserve, however the doubling falls.
    pub fn limit_growth(&self, positions: usize, sequences: usize) {
        self.lock().growth.soft_limit_blocks = Some(positions.div_ceil(BLOCK) + sequences);
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind: keep using it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `n` free blocks, growing the pool if it has fewer.
    pub fn allocate(&self, n: usize) -> Result<Vec<u32>> {
        let mut inner = self.lock();
        if inner.free.len() < n {
            let want = inner.blocks + n - inner.free.len();
            let doubled = (2 * inner.blocks).max(FIRST_BLOCKS);
            let doubled = match inner.growth.soft_limit_blocks {
                Some(limit) => doubled.min(limit),
                None => doubled,
            };
            self.grow(&mut inner, want.max(doubled))?;
        }
        let at = inner.free.len() - n;
        Ok(inner.free.split_off(at))
    }

    fn grow(&self, inner: &mut Inner, blocks: usize) -> Result<()> {
        let rows = blocks * BLOCK;
        let grown = |old: Option<&Tensor>| -> Result<Tensor> {
            let fresh = Tensor::zeros((rows, self.width), self.dtype, &self.device)?;
            if let Some(old) = old {
                fresh.slice_set(old, 0, 0)?;
            }
            Ok(fresh)
        };
        let keys = (0..self.layers)
            .map(|l| grown(inner.keys.get(l)))
            .collect::<Result<Vec<_>>>()?;
        let values = (0..self.layers)
            .map(|l| grown(inner.values.get(l)))
            .collect::<Result<Vec<_>>>()?;
        // Highest first, so that allocations pop the lowest blocks.
        inner
            .free
            .extend((inner.blocks as u32..blocks as u32).rev());
        (inner.keys, inner.values, inner.blocks) = (keys, values, blocks);
        Ok(())
    }

    pub fn release(&self, blocks: &[u32]) {
        self.lock().free.extend_from_slice(blocks);
    }

    /// Layer `layer`'s keys and values matrices (handles to the pool's storage: writes
    /// through them land in the pool).
    pub fn layer(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        let inner = self.lock();
        match (inner.keys.get(layer), inner.values.get(layer)) {
            (Some(k), Some(v)) => Ok((k.clone(), v.clone())),
            _ => candle_core::bail!("the KV pool holds no blocks yet"),
        }
    }

    /// Copies rows `from` onto rows `to` in every layer (a fork's copy of a cache).
    pub fn copy_rows(&self, from: &[u32], to: &[u32]) -> Result<()> {
        if from.is_empty() {
            return Ok(());
        }
        let from = Tensor::new(from, &self.device)?;
        let to = row_index(to, self.width, &self.device)?;
        let inner = self.lock();
        for m in inner.keys.iter().chain(&inner.values) {
            m.scatter_set(&to, &m.index_select(&from, 0)?, 0)?;
        }
        Ok(())
    }

    /// Copies of layer `layer`'s keys and values at `rows`: `(rows, width)` each.
    pub fn read_rows(&self, layer: usize, rows: &[u32]) -> Result<(Tensor, Tensor)> {
        let (k, v) = self.layer(layer)?;
        let index = Tensor::new(rows, &self.device)?;
        Ok((k.index_select(&index, 0)?, v.index_select(&index, 0)?))
    }

    /// Writes `k`, `v` `(rows, width)` at layer `layer`'s `rows`.
    pub fn write_rows(&self, layer: usize, rows: &[u32], k: &Tensor, v: &Tensor) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let (pool_k, pool_v) = self.layer(layer)?;
        let index = row_index(rows, self.width, &self.device)?;
        pool_k.scatter_set(&index, &k.to_dtype(self.dtype)?.contiguous()?, 0)?;
        pool_v.scatter_set(&index, &v.to_dtype(self.dtype)?.contiguous()?, 0)
    }

    /// Blocks in the pool and blocks free (tests, metrics).
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.blocks, inner.free.len())
    }
}

/// The row of position `p` of a cache whose blocks are `blocks`.
pub fn row_of(blocks: &[u32], p: usize) -> u32 {
    blocks[p / BLOCK] * BLOCK as u32 + (p % BLOCK) as u32
}

/// A scatter index writing source row i to pool row `rows[i]`: `(rows, width)`, each row's
/// number repeated across its columns (what `scatter_set` along dim 0 reads).
pub fn row_index(rows: &[u32], width: usize, device: &Device) -> Result<Tensor> {
    Tensor::new(rows, device)?
        .reshape((rows.len(), 1))?
        .broadcast_as((rows.len(), width))?
        .contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_reused_and_the_pool_grows_keeping_what_it_holds() -> Result<()> {
        let pool = KvPool::new(2, 3, DType::F32, Device::Cpu);
        let a = pool.allocate(2)?;
        assert_eq!(a.len(), 2);
        assert_eq!(pool.usage(), (FIRST_BLOCKS, FIRST_BLOCKS - 2));
        // write a row of layer 1's values, then grow past the first blocks
        let (_, v) = pool.layer(1)?;
        let row = row_of(&a, 5);
        v.scatter_set(
            &row_index(&[row], 3, &Device::Cpu)?,
            &Tensor::new(&[[1f32, 2., 3.]], &Device::Cpu)?,
            0,
        )?;
        let b = pool.allocate(FIRST_BLOCKS)?;
        assert!(b.iter().all(|x| !a.contains(x)));
        assert_eq!(pool.usage(), (2 * FIRST_BLOCKS, FIRST_BLOCKS - 2));
        let (_, v) = pool.layer(1)?;
        assert_eq!(v.get(row as usize)?.to_vec1::<f32>()?, [1., 2., 3.]);
        // a copy lands in every layer; released blocks come back
        pool.copy_rows(&[row], &[row_of(&b, 0)])?;
        let (_, v) = pool.layer(1)?;
        assert_eq!(
            v.get(row_of(&b, 0) as usize)?.to_vec1::<f32>()?,
            [1., 2., 3.]
        );
        pool.release(&a);
        pool.release(&b);
        assert_eq!(pool.usage(), (2 * FIRST_BLOCKS, 2 * FIRST_BLOCKS));
        Ok(())
    }

    #[test]
    fn doubling_stops_at_the_budget_but_a_need_is_always_met() -> Result<()> {
        let pool = KvPool::new(1, 2, DType::F32, Device::Cpu);
        pool.limit_growth(FIRST_BLOCKS * BLOCK + 1, 9); // 65 + 9 blocks
        let _a = pool.allocate(FIRST_BLOCKS)?;
        let _b = pool.allocate(1)?;
        assert_eq!(
            pool.usage().0,
            FIRST_BLOCKS + 10,
            "not doubled past the budget"
        );
        let _c = pool.allocate(20)?;
        assert_eq!(
            pool.usage().0,
            FIRST_BLOCKS + 1 + 20,
            "what is asked, past it"
        );
        Ok(())
    }
}
