//! Per-sequence key/value cache, one preallocated buffer per layer written in place.

use candle_core::{Result, Tensor};

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
}

/// Initial capacity; grows by doubling up to `max_len` (copying once per doubling).
const MIN_CAPACITY: usize = 64;

impl KvCache {
    pub fn new(num_layers: usize, max_len: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| LayerKv::default()).collect(),
            len: 0,
            max_len,
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
        let max_len = self.max_len;
        let slot = &mut self.layers[layer];
        let keys = grow_and_write(&mut slot.k, k, self.len, end, max_len)?;
        let values = grow_and_write(&mut slot.v, v, self.len, end, max_len)?;
        Ok((keys, values))
    }

    /// Marks `n` new positions as cached once every layer of the step has appended.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
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
        let new_cap = end
            .max(capacity * 2)
            .max(MIN_CAPACITY)
            .min(max_len)
            .max(end);
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
