//! Per-sequence key/value cache, one preallocated buffer per layer written in place.

use candle_core::{DType, Result, Tensor};

/// Keys and values of one layer: `(heads, capacity, head_dim)` buffers, the first `len` rows valid.
#[derive(Debug, Default)]
struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

/// The cache of one sequence. Only the layers the sequence runs through are filled: a sequence
/// decoding from exit L never touches the layers above L.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    /// Positions cached (the same in every layer the sequence uses).
    len: usize,
    /// Upper bound on positions (the model's `max_position_embeddings`).
    max_len: usize,
    /// Element type of the buffers: float32, or bfloat16 to halve the cache of a model served
    /// in bfloat16 (keys and values are rounded when written, read back as float32).
    dtype: DType,
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
    pub fn new(num_layers: usize, max_len: usize, dtype: DType) -> Self {
        Self {
            layers: (0..num_layers).map(|_| LayerKv::default()).collect(),
            len: 0,
            max_len,
            dtype,
        }
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
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        let end = self.len + n;
        let (max_len, dtype) = (self.max_len, self.dtype);
        let slot = &mut self.layers[layer];
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

    /// A deep copy (the buffers are written in place, so clones must not share storage).
    pub fn fork(&self) -> Result<Self> {
        let copy = |t: &Option<Tensor>| t.as_ref().map(|t| t.copy()).transpose();
        Ok(Self {
            layers: self
                .layers
                .iter()
                .map(|l| {
                    Ok(LayerKv {
                        k: copy(&l.k)?,
                        v: copy(&l.v)?,
                    })
                })
                .collect::<Result<_>>()?,
            len: self.len,
            max_len: self.max_len,
            dtype: self.dtype,
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
}
