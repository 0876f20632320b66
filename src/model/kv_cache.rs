//! Per-sequence key/value cache. Two stores: on the CPU's own attention kernels, one buffer
//! per layer written in place (`(heads, capacity, head_dim)`, what the kernels read); on the
//! batched attention path, whole blocks of the model's shared pool (`kv_pool.rs`).

use std::sync::Arc;

use candle_core::{DType, Result, Tensor};

use super::kv_pool::{self, KvPool};

/// Keys and values of one layer: `(heads, capacity, head_dim)` buffers, the first `len` rows valid.
#[derive(Debug, Default)]
struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

/// The cache of one sequence.
pub struct KvCache {
    store: Store,
    /// Positions cached (the same in every layer the sequence uses).
    len: usize,
    /// Upper bound on positions (the model's `max_position_embeddings`).
    max_len: usize,
}

enum Store {
    /// Own buffers. Only the layers the sequence runs through are filled: a sequence decoding
    /// from exit L never touches the layers above L.
    Buffers {
        layers: Vec<LayerKv>,
        /// Element type of the buffers: float32, or bfloat16 to halve the cache of a model
        /// served in bfloat16 (keys and values are rounded when written, read back as float32).
        dtype: DType,
    },
    Paged(PagedBlocks),
}

/// Blocks of a pool, given back when the cache goes.
pub(super) struct PagedBlocks {
    pub pool: Arc<KvPool>,
    /// Block `i` holds positions `i·BLOCK ..`, in every layer.
    pub blocks: Vec<u32>,
}

impl Drop for PagedBlocks {
    fn drop(&mut self) {
        self.pool.release(&self.blocks);
    }
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let store = match &self.store {
            Store::Buffers { dtype, .. } => format!("buffers of {dtype:?}"),
            Store::Paged(p) => format!("{} pool blocks", p.blocks.len()),
        };
        f.debug_struct("KvCache")
            .field("len", &self.len)
            .field("max_len", &self.max_len)
            .field("store", &store)
            .finish()
    }
}

/// Keys and values of a run of positions copied out of a cache (a block of the engine's prefix
/// cache): per layer from the first, in the layout of the store they came from (`(heads, len,
/// head_dim)` from buffers, `(len, hidden)` rows from the pool). A copy: the cache they came
/// from goes on writing in place.
#[derive(Debug, Clone)]
pub struct KvRun {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    /// Which axis holds the positions (1 for buffers, 0 for pool rows).
    axis: usize,
}

impl KvRun {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Layers held (from the first).
    pub fn depth(&self) -> usize {
        self.layers.len()
    }
}

/// An owned copy of a view (`contiguous` alone would share a view that already is).
fn owned(view: &Tensor) -> Result<Tensor> {
    if view.is_contiguous() {
        let fresh = Tensor::zeros(view.shape(), view.dtype(), view.device())?;
        fresh.slice_set(view, 0, 0)?;
        Ok(fresh)
    } else {
        view.contiguous()
    }
}

/// Initial capacity, and the unit capacities are rounded to.
const MIN_CAPACITY: usize = 64;

/// The capacity for `end` positions: 1.5x growth (amortised copies, less slack than
/// doubling), in whole units of `MIN_CAPACITY / 2`, never beyond `max_len`.
fn grown_capacity(capacity: usize, end: usize, max_len: usize) -> usize {
    (capacity + capacity / 2)
        .max(end)
        .max(MIN_CAPACITY)
        .next_multiple_of(MIN_CAPACITY / 2)
        .min(max_len)
        .max(end)
}

impl KvCache {
    /// A cache with buffers of its own, for the CPU's attention kernels.
    pub fn new(num_layers: usize, max_len: usize, dtype: DType) -> Self {
        Self {
            store: Store::Buffers {
                layers: (0..num_layers).map(|_| LayerKv::default()).collect(),
                dtype,
            },
            len: 0,
            max_len,
        }
    }

    /// A cache in blocks of `pool` (the batched attention path).
    pub(super) fn paged(pool: Arc<KvPool>, max_len: usize) -> Self {
        Self {
            store: Store::Paged(PagedBlocks {
                pool,
                blocks: Vec::new(),
            }),
            len: 0,
            max_len,
        }
    }

    /// The pool blocks, for a paged cache.
    pub(super) fn paged_blocks(&self) -> Option<&PagedBlocks> {
        match &self.store {
            Store::Paged(p) => Some(p),
            Store::Buffers { .. } => None,
        }
    }

    /// Makes room for positions up to `end` before a step writes them (a paged cache takes
    /// its blocks now, so that no layer of the step allocates; buffers grow as written).
    pub(super) fn reserve(&mut self, end: usize) -> Result<()> {
        if let Store::Paged(p) = &mut self.store {
            let need = end.div_ceil(kv_pool::BLOCK);
            if need > p.blocks.len() {
                let more = p.pool.allocate(need - p.blocks.len())?;
                p.blocks.extend(more);
            }
        }
        Ok(())
    }

    /// Positions already cached: the absolute position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `k`, `v` `(heads, n, head_dim)` for `layer` at positions `len..len+n` and returns
    /// the cached keys and values `(heads, len+n, head_dim)` (views of the buffers).
    /// Buffers only: the batched path writes the pool (`attention.rs`).
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        let end = self.len + n;
        let max_len = self.max_len;
        let Store::Buffers { layers, dtype } = &mut self.store else {
            candle_core::bail!("append on a paged cache");
        };
        let dtype = *dtype;
        let slot = &mut layers[layer];
        let keys = grow_and_write(&mut slot.k, &k.to_dtype(dtype)?, self.len, end, max_len)?;
        let values = grow_and_write(&mut slot.v, &v.to_dtype(dtype)?, self.len, end, max_len)?;
        Ok((keys, values))
    }

    /// Marks `n` new positions as cached once every layer of the step has appended.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Forgets the positions from `len` on (drafts that were rejected); the next appends
    /// overwrite their rows.
    pub fn truncate(&mut self, len: usize) {
        debug_assert!(len <= self.len, "truncate to {len} > {}", self.len);
        self.len = self.len.min(len);
    }

    /// The axis of a run's tensors that holds positions in this store's layout.
    fn position_axis(&self) -> usize {
        match self.store {
            Store::Buffers { .. } => 1,
            Store::Paged(_) => 0,
        }
    }

    /// A copy of positions `start..start+len` of the first `depth` layers (all cached).
    pub fn export(&self, start: usize, len: usize, depth: usize) -> Result<KvRun> {
        if start + len > self.len {
            candle_core::bail!("export of {start}+{len} from a cache of {}", self.len);
        }
        let layers = match &self.store {
            Store::Buffers { layers, .. } => layers[..depth]
                .iter()
                .map(|l| match (&l.k, &l.v) {
                    (Some(k), Some(v)) => Ok((
                        owned(&k.narrow(1, start, len)?)?,
                        owned(&v.narrow(1, start, len)?)?,
                    )),
                    _ => candle_core::bail!("export of a layer the sequence did not run"),
                })
                .collect::<Result<Vec<_>>>()?,
            Store::Paged(p) => {
                let rows: Vec<u32> = (start..start + len)
                    .map(|i| kv_pool::row_of(&p.blocks, i))
                    .collect();
                (0..depth)
                    .map(|l| p.pool.read_rows(l, &rows))
                    .collect::<Result<Vec<_>>>()?
            }
        };
        Ok(KvRun {
            layers,
            len,
            axis: self.position_axis(),
        })
    }

    /// Appends the first `len` positions of `runs` (in order; the last may be used in part)
    /// to the first `depth` layers, as if a step had computed them: the prefix cache's hit.
    pub fn import(&mut self, runs: &[&KvRun], len: usize, depth: usize) -> Result<()> {
        let held: usize = runs.iter().map(|r| r.len).sum();
        if len > held || runs.iter().any(|r| r.depth() < depth) {
            candle_core::bail!("import of {len} positions at depth {depth} from shorter runs");
        }
        let axis = self.position_axis();
        if runs.iter().any(|r| r.axis != axis) {
            candle_core::bail!("import of runs from another kind of cache");
        }
        // Each layer's keys (0) or values (1) over the runs, cut at `len`.
        let joined = |layer: usize, which: usize| -> Result<Tensor> {
            let mut parts = Vec::with_capacity(runs.len());
            let mut left = len;
            for r in runs {
                if left == 0 {
                    break;
                }
                let (k, v) = &r.layers[layer];
                let t = if which == 0 { k } else { v };
                let n = left.min(r.len);
                parts.push(t.narrow(axis, 0, n)?);
                left -= n;
            }
            Tensor::cat(&parts, axis)
        };
        let start = self.len;
        self.reserve(start + len)?;
        match &mut self.store {
            Store::Buffers { .. } => {
                for layer in 0..depth {
                    let (k, v) = (joined(layer, 0)?, joined(layer, 1)?);
                    self.append(layer, &k, &v)?;
                }
            }
            Store::Paged(p) => {
                let rows: Vec<u32> = (start..start + len)
                    .map(|i| kv_pool::row_of(&p.blocks, i))
                    .collect();
                for layer in 0..depth {
                    p.pool
                        .write_rows(layer, &rows, &joined(layer, 0)?, &joined(layer, 1)?)?;
                }
            }
        }
        self.advance(len);
        Ok(())
    }

    /// A deep copy (caches are written in place, so copies must not share storage).
    pub fn fork(&self) -> Result<Self> {
        let copy = |t: &Option<Tensor>| t.as_ref().map(|t| t.copy()).transpose();
        let store = match &self.store {
            Store::Buffers { layers, dtype } => Store::Buffers {
                layers: layers
                    .iter()
                    .map(|l| {
                        Ok(LayerKv {
                            k: copy(&l.k)?,
                            v: copy(&l.v)?,
                        })
                    })
                    .collect::<Result<_>>()?,
                dtype: *dtype,
            },
            Store::Paged(p) => {
                let blocks = p.pool.allocate(p.blocks.len())?;
                let copy = PagedBlocks {
                    pool: p.pool.clone(),
                    blocks,
                };
                let rows = |b: &[u32]| -> Vec<u32> {
                    (0..self.len).map(|i| kv_pool::row_of(b, i)).collect()
                };
                p.pool.copy_rows(&rows(&p.blocks), &rows(&copy.blocks))?;
                Store::Paged(copy)
            }
        };
        Ok(Self {
            store,
            len: self.len,
            max_len: self.max_len,
        })
    }
}

fn grow_and_write(
    buf: &mut Option<Tensor>,
    src: &Tensor,
    start: usize,
    end: usize,
    max_len: usize,
) -> Result<Tensor> {
    let capacity = buf.as_ref().map_or(0, |b| b.dims()[1]);
    if end > capacity {
        let new_cap = grown_capacity(capacity, end, max_len);
        let (heads, _, head_dim) = src.dims3()?;
        // (heads, new_cap, head_dim)
        let fresh = Tensor::zeros((heads, new_cap, head_dim), src.dtype(), src.device())?;
        if let Some(old) = buf.as_ref() {
            fresh.slice_set(&old.narrow(1, 0, start)?.contiguous()?, 1, 0)?;
        }
        *buf = Some(fresh);
    }
    let b = buf.as_ref().expect("allocated above");
    b.slice_set(&src.contiguous()?, 1, start)?;
    b.narrow(1, 0, end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn capacity_grows_by_half_in_whole_units_up_to_the_limit() {
        assert_eq!(grown_capacity(0, 5, 2048), 64);
        assert_eq!(grown_capacity(0, 100, 2048), 128);
        assert_eq!(grown_capacity(64, 65, 2048), 96);
        assert_eq!(grown_capacity(96, 97, 2048), 160);
        assert_eq!(grown_capacity(1920, 1921, 2048), 2048);
        assert_eq!(grown_capacity(0, 3000, 2048), 3000); // never below what is written
    }

    #[test]
    fn appends_keep_earlier_positions_through_growth_in_either_dtype() -> Result<()> {
        for dtype in [DType::F32, DType::BF16] {
            let mut cache = KvCache::new(1, 1024, dtype);
            let mut written = Vec::new();
            for step in 0..5 {
                let n = 40; // crosses 64, 96 and 160
                let k = Tensor::arange((step * n) as f32, ((step + 1) * n) as f32, &Device::Cpu)?
                    .reshape((1, n, 1))?;
                written.extend((step * n..(step + 1) * n).map(|x| x as f32));
                let (keys, values) = cache.append(0, &k, &k)?;
                cache.advance(n);
                assert_eq!(keys.dtype(), dtype);
                let got = keys.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                assert_eq!(got, written, "{dtype:?}"); // small integers are exact in bf16
                assert_eq!(values.dims(), &[1, (step + 1) * n, 1]);
            }
        }
        Ok(())
    }

    #[test]
    fn paged_caches_take_whole_blocks_fork_by_copy_and_give_them_back() -> Result<()> {
        let pool = KvPool::new(1, 2, DType::F32, Device::Cpu);
        let mut a = KvCache::paged(pool.clone(), 100);
        a.reserve(kv_pool::BLOCK + 1)?;
        assert_eq!(a.paged_blocks().unwrap().blocks.len(), 2);
        let (k, _) = pool.layer(0)?;
        let row = kv_pool::row_of(&a.paged_blocks().unwrap().blocks, 3);
        let src = Tensor::new(&[[7f32, 8.]], &Device::Cpu)?;
        k.scatter_set(&kv_pool::row_index(&[row], 2, &Device::Cpu)?, &src, 0)?;
        a.advance(4);
        let b = a.fork()?;
        let (k, _) = pool.layer(0)?;
        let copied = kv_pool::row_of(&b.paged_blocks().unwrap().blocks, 3);
        assert_ne!(copied, row);
        assert_eq!(k.get(copied as usize)?.to_vec1::<f32>()?, [7., 8.]);
        let (total, free) = pool.usage();
        drop((a, b));
        assert_eq!(pool.usage(), (total, free + 4));
        Ok(())
    }

    #[test]
    fn exported_runs_import_into_a_fresh_cache_of_either_store() -> Result<()> {
        let dev = Device::Cpu;
        // layer l, position p, element e holds 100 l + p + e / 10 (exact in f32)
        let rows = |layer: usize, from: usize, n: usize| -> Result<Tensor> {
            let v: Vec<f32> = (from..from + n)
                .flat_map(|p| (0..2).map(move |e| (100 * layer + p) as f32 + e as f32 / 10.))
                .collect();
            Tensor::from_vec(v, (n, 2), &dev)
        };
        let pool = KvPool::new(2, 2, DType::F32, dev.clone());
        for paged in [false, true] {
            let fresh = || {
                if paged {
                    KvCache::paged(pool.clone(), 100)
                } else {
                    KvCache::new(2, 100, DType::F32)
                }
            };
            let mut source = fresh();
            source.reserve(40)?;
            for layer in 0..2 {
                let (k, v) = (rows(layer, 0, 40)?, rows(layer, 0, 40)?.affine(2., 0.)?);
                match source.paged_blocks() {
                    Some(p) => {
                        let at: Vec<u32> = (0..40).map(|i| kv_pool::row_of(&p.blocks, i)).collect();
                        pool.write_rows(layer, &at, &k, &v)?;
                    }
                    None => {
                        // buffers hold (heads = 1, positions, 2)
                        source.append(layer, &k.unsqueeze(0)?, &v.unsqueeze(0)?)?;
                    }
                }
            }
            source.advance(40);
            let runs = [source.export(0, 16, 2)?, source.export(16, 16, 1)?];
            let mut target = fresh();
            target.import(&[&runs[0], &runs[1]], 20, 1)?;
            assert_eq!(target.len(), 20);
            let got = target.export(0, 20, 1)?;
            let (k, v) = &got.layers[0];
            let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            assert_eq!(flat(k)?, flat(&rows(0, 0, 20)?)?, "paged: {paged}");
            assert_eq!(flat(v)?, flat(&rows(0, 0, 20)?.affine(2., 0.)?)?);
            assert!(
                target.import(&[&runs[1]], 4, 2).is_err(),
                "a run too shallow"
            );
        }
        Ok(())
    }
}
