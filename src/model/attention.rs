//! Causal self-attention over a packed batch, shared by the architectures: each sequence
//! attends to its own KV cache. What differs per architecture is a parameter: the scaling of
//! the scores (GPT-2 divides by sqrt(head_dim), GPT-Neo does not) and the reach of each layer
//! (GPT-Neo's local layers see a window).

use candle_core::{DType, Device, Module, Tensor};
use rayon::prelude::*;

use super::batched_attention as batched;
use super::config::AttentionKind;
use super::step::Segment;
use super::weights::Proj;
use crate::kernels::causal_attention::{causal_attention, CachedKv, Queries, Span};
use crate::kernels::fastmath;

/// Whether the step's caches are blocks of the paged pool (the batched path).
fn paged(segments: &[Segment<'_>]) -> bool {
    segments
        .first()
        .is_some_and(|s| s.cache.paged_blocks().is_some())
}

pub(super) struct SelfAttention {
    /// `q_proj`, `k_proj` and `v_proj` stacked into one `(3 hidden, hidden)` weight: one
    /// matmul (one pass over x, one parallel dispatch) instead of three.
    qkv: Proj,
    out_proj: Proj,
    kind: AttentionKind,
    num_heads: usize,
    head_dim: usize,
    /// Multiplies q (so the scores) by this; None: scores unscaled.
    scale: Option<f64>,
}

impl SelfAttention {
    /// `qkv`: the q, k and v projections stacked along the output, `(3 hidden, hidden)`.
    pub fn new(
        qkv: Proj,
        out_proj: Proj,
        kind: AttentionKind,
        num_heads: usize,
        head_dim: usize,
        scaled: bool,
    ) -> Self {
        Self {
            qkv,
            out_proj,
            kind,
            num_heads,
            head_dim,
            scale: scaled.then(|| 1.0 / (head_dim as f64).sqrt()),
        }
    }

    /// The same attention with int8 copies of its projections (a draft's copy).
    pub fn int8_copy(&self) -> candle_core::Result<Self> {
        Ok(Self {
            qkv: self.qkv.int8_copy()?,
            out_proj: self.out_proj.int8_copy()?,
            kind: self.kind,
            num_heads: self.num_heads,
            head_dim: self.head_dim,
            scale: self.scale,
        })
    }

    /// `x`: `(rows, hidden)` packed as described by `segments`.
    pub fn forward(
        &self,
        x: &Tensor,
        segments: &mut [Segment<'_>],
        layer: usize,
        plans: &mut batched::Plans,
    ) -> candle_core::Result<Tensor> {
        let qkv = self.qkv.forward(x)?; // (rows, 3 hidden)
        let out = self.attend(&qkv, segments, layer, plans)?;
        self.out_proj.forward(&out)
    }

    /// The attention of the q/k/v product `qkv` `(rows, 3 hidden)` float32 (bias added), before
    /// the output projection; the keys and values go into the segments' caches.
    pub fn attend(
        &self,
        qkv: &Tensor,
        segments: &mut [Segment<'_>],
        layer: usize,
        plans: &mut batched::Plans,
    ) -> candle_core::Result<Tensor> {
        let h = self.num_heads * self.head_dim;
        let q = qkv.narrow(1, 0, h)?;
        let k = qkv.narrow(1, h, h)?;
        let v = qkv.narrow(1, 2 * h, h)?;
        if paged(segments) {
            // The batched path scales q itself (the fused kernel as it loads a query).
            return batched::attend(self.geometry(), &q, &k, &v, segments, layer, plans);
        }
        // Scaling q scales every score: (q s) kᵀ = s (q kᵀ), one pass over the rows.
        let q = match self.scale {
            Some(s) => q.affine(s, 0.0)?,
            None => q,
        };
        // Sequences attend to their own caches independently: spread them over the cores.
        let mut outs = segments
            .par_iter_mut()
            .map(|seg| self.attend_one(&q, &k, &v, seg, layer))
            .collect::<candle_core::Result<Vec<_>>>()?;
        if outs.len() == 1 {
            Ok(outs.pop().expect("one"))
        } else {
            Tensor::cat(&outs, 0)
        }
    }

    /// Writes the keys and values of `x` `(rows, hidden)` into the segments' caches without
    /// attending (the query projection runs too: the three are one stacked weight).
    pub fn write_kv(
        &self,
        x: &Tensor,
        segments: &mut [Segment<'_>],
        layer: usize,
        plans: &mut batched::Plans,
    ) -> candle_core::Result<()> {
        self.store(&self.qkv.forward(x)?, segments, layer, plans)
    }

    /// Writes the keys and values of the q/k/v product `qkv` into the segments' caches.
    pub fn store(
        &self,
        qkv: &Tensor,
        segments: &mut [Segment<'_>],
        layer: usize,
        plans: &mut batched::Plans,
    ) -> candle_core::Result<()> {
        let h = self.num_heads * self.head_dim;
        let (k, v) = (qkv.narrow(1, h, h)?, qkv.narrow(1, 2 * h, h)?);
        if paged(segments) {
            return batched::write(&k, &v, segments, layer, plans);
        }
        for seg in segments.iter_mut() {
            self.cache_step(&k, &v, seg, layer)?;
        }
        Ok(())
    }

    /// The q/k/v projection (`(3 hidden, hidden)`).
    pub fn qkv(&self) -> &Proj {
        &self.qkv
    }

    pub fn out_proj(&self) -> &Proj {
        &self.out_proj
    }

    fn geometry(&self) -> batched::Geometry {
        batched::Geometry {
            heads: self.num_heads,
            head_dim: self.head_dim,
            scale: self.scale,
            window: match self.kind {
                AttentionKind::Global => None,
                AttentionKind::Local { window } => Some(window),
            },
        }
    }

    fn split_heads(&self, t: &Tensor, start: usize, len: usize) -> candle_core::Result<Tensor> {
        // (len, hidden) -> (len, heads, head_dim) -> (heads, len, head_dim)
        t.narrow(0, start, len)?
            .reshape((len, self.num_heads, self.head_dim))?
            .transpose(0, 1)?
            .contiguous()
    }

    /// Writes the step's keys and values `(rows, hidden)` into the segment's cache; returns
    /// the cached ones `(heads, positions, head_dim)`.
    fn cache_step(
        &self,
        k: &Tensor,
        v: &Tensor,
        seg: &mut Segment<'_>,
        layer: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (start, len) = (seg.start, seg.len);
        seg.cache.append(
            layer,
            &self.split_heads(k, start, len)?,
            &self.split_heads(v, start, len)?,
        )
    }

    /// The oldest key a step starting at position `offset` reads: a local layer's first query
    /// sees keys after `offset - window`, and older keys are masked for every query of the
    /// step, so they are not read at all.
    fn first_key(&self, offset: usize) -> usize {
        match self.kind {
            AttentionKind::Global => 0,
            AttentionKind::Local { window } => (offset + 1).saturating_sub(window),
        }
    }

    fn attend_one(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seg: &mut Segment<'_>,
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        if !(q.device().is_cpu() && q.dtype() == DType::F32) {
            candle_core::bail!("the CPU attention kernels need float32 queries on the CPU");
        }
        if seg.len == 1 || seg.per_query {
            self.attend_each_cpu(q, k, v, seg, layer)
        } else {
            self.attend_many_cpu(q, k, v, seg, layer)
        }
    }

    /// One sequence's queries on the CPU, each computed as a decode step computes its one
    /// query, on the raw rows and cache buffers: at one query the ~20 small tensor ops per
    /// layer of the tensor path cost more than the arithmetic. A verifying pass (the drafts
    /// and the token before them) comes this way too, so that every position gets the numbers
    /// a plain step would, to the bit (the fused kernel's products sum in another order, and
    /// bf16's rounding of the activations turns that last-bit difference into other tokens).
    /// Prompts keep the fused kernel, whatever their chunking.
    fn attend_each_cpu(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seg: &mut Segment<'_>,
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        let (start, len) = (seg.start, seg.len);
        let width = self.num_heads * self.head_dim;
        // (len, hidden) rows of this sequence
        let q = q
            .narrow(0, start, len)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let offset = seg.cache.len();
        let (keys, values) = self.cache_step(k, v, seg, layer)?;
        let mut out = vec![0f32; len * width];
        let mut scores = Vec::new();
        for (i, (qi, oi)) in q
            .chunks_exact(width)
            .zip(out.chunks_exact_mut(width))
            .enumerate()
        {
            self.attend_row(qi, (&keys, &values), offset + i, &mut scores, oi)?;
        }
        Tensor::from_vec(out, (len, width), &Device::Cpu)
    }

    /// Query row `q` (every head's) at position `p` attending the cached keys and values
    /// `(heads, capacity, head_dim)` it sees, into `out`: the decode step's arithmetic.
    fn attend_row(
        &self,
        q: &[f32],
        (keys, values): (&Tensor, &Tensor),
        p: usize,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        let hd = self.head_dim;
        let (total, first_key) = (p + 1, self.first_key(p));
        let (k_store, k_layout) = keys.storage_and_layout();
        let (v_store, v_layout) = values.storage_and_layout();
        // (heads, capacity, head_dim) buffers: a head's keys first_key..total are contiguous
        let span = |layout: &candle_core::Layout, h: usize| {
            let start = layout.start_offset() + h * layout.stride()[0] + first_key * hd;
            start..start + (total - first_key) * hd
        };
        scores.resize(total - first_key, 0.0);
        let heads_out = out.chunks_exact_mut(hd).zip(q.chunks_exact(hd)).enumerate();
        match (&*k_store, &*v_store) {
            (candle_core::Storage::Cpu(kc), candle_core::Storage::Cpu(vc)) => match keys.dtype() {
                DType::BF16 => {
                    let (kb, vb) = (kc.as_slice::<half::bf16>()?, vc.as_slice::<half::bf16>()?);
                    for (h, (oh, qh)) in heads_out {
                        let (keys, values) = (&kb[span(k_layout, h)], &vb[span(v_layout, h)]);
                        fastmath::attend_head_bf16(qh, keys, values, scores, oh);
                    }
                }
                _ => {
                    let (kb, vb) = (kc.as_slice::<f32>()?, vc.as_slice::<f32>()?);
                    for (h, (oh, qh)) in heads_out {
                        let (keys, values) = (&kb[span(k_layout, h)], &vb[span(v_layout, h)]);
                        fastmath::attend_head_f32(qh, keys, values, scores, oh);
                    }
                }
            },
            _ => candle_core::bail!("CPU attention on non-CPU caches"),
        }
        Ok(())
    }

    /// Several queries of one sequence on the CPU (a prompt, drafts being verified): the fused
    /// causal kernel on the cache buffers, without the tensor path's `(heads, len, klen)`
    /// scores, mask and probabilities.
    fn attend_many_cpu(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seg: &mut Segment<'_>,
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        let (start, len) = (seg.start, seg.len);
        let (heads, hd) = (self.num_heads, self.head_dim);
        let offset = seg.cache.len();
        let (keys, values) = self.cache_step(k, v, seg, layer)?;
        // q: rows of `heads * hd` floats, at the stride of the packed (q, k, v) rows when it
        // is a view of them
        let q = q.narrow(0, start, len)?;
        let q = match q.stride() {
            [_, 1] => q,
            _ => q.contiguous()?,
        };
        let (q_store, q_layout) = q.storage_and_layout();
        let (k_store, k_layout) = keys.storage_and_layout();
        let (v_store, v_layout) = values.storage_and_layout();
        let head_stride = k_layout.stride()[0];
        if v_layout.stride()[0] != head_stride || k_layout.stride()[1..] != [hd, 1] {
            candle_core::bail!("cache buffers of unexpected layout");
        }
        let span = Span {
            heads,
            head_dim: hd,
            offset,
            len,
            first_visible: |p| self.first_key(p),
        };
        let mut out = vec![0f32; len * heads * hd];
        match (&*q_store, &*k_store, &*v_store) {
            (
                candle_core::Storage::Cpu(qc),
                candle_core::Storage::Cpu(kc),
                candle_core::Storage::Cpu(vc),
            ) => {
                let queries = Queries {
                    data: &qc.as_slice::<f32>()?[q_layout.start_offset()..],
                    row_stride: q_layout.stride()[0],
                };
                let (k0, v0) = (k_layout.start_offset(), v_layout.start_offset());
                match keys.dtype() {
                    DType::BF16 => {
                        let kv = CachedKv {
                            keys: &kc.as_slice::<half::bf16>()?[k0..],
                            values: &vc.as_slice::<half::bf16>()?[v0..],
                            head_stride,
                        };
                        causal_attention(queries, kv, span, &mut out)
                    }
                    _ => {
                        let kv = CachedKv {
                            keys: &kc.as_slice::<f32>()?[k0..],
                            values: &vc.as_slice::<f32>()?[v0..],
                            head_stride,
                        };
                        causal_attention(queries, kv, span, &mut out)
                    }
                }
            }
            _ => candle_core::bail!("CPU attention on non-CPU tensors"),
        }
        Tensor::from_vec(out, (len, heads * hd), &Device::Cpu)
    }
}
