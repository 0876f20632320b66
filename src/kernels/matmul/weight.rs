//! The packed weight, the front the model layer uses: packing at load time, the lookups that
//! read it back, and `x Wᵀ` as a candle op over the packed panels.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::isa::{self, supported, supports_int8, Isa, Kind};
use super::panels::{
    bf16_pairs, int16_pairs, pair_slot, symmetric_scale, to_bf16_pairs, Operands, PANEL,
};

/// A weight `(n, k)` repacked into panels; the tensor holds the packed elements.
#[derive(Debug, Clone)]
pub struct PackedWeight {
    packed: Tensor,
    n: usize,
    k: usize,
    /// Int8 panels: each output column's scale (`panels * 16`, zero past `n`).
    scales: Option<Vec<f32>>,
}

impl PackedWeight {
    /// Packs `w` `(n, k)` (float32 or bfloat16, on the CPU); refuses a dtype this CPU has
    /// no kernel for, so that a packed weight is proof the kernel may run.
    pub fn pack(w: &Tensor) -> candle_core::Result<Self> {
        if !supported(w.dtype()) {
            candle_core::bail!("this CPU has no packed kernel for {:?} weights", w.dtype());
        }
        let (n, k) = w.dims2()?;
        let panels = n.div_ceil(PANEL);
        let w = w.contiguous()?;
        let packed = match w.dtype() {
            DType::F32 => {
                let (storage, layout) = w.storage_and_layout();
                let candle_core::Storage::Cpu(cpu) = &*storage else {
                    candle_core::bail!("packing needs CPU weights");
                };
                let src =
                    &cpu.as_slice::<f32>()?[layout.start_offset()..layout.start_offset() + n * k];
                let mut dst = vec![0f32; panels * k * PANEL];
                for (row, chunk) in src.chunks_exact(k).enumerate() {
                    let (p, lane) = (row / PANEL, row % PANEL);
                    for (kk, &v) in chunk.iter().enumerate() {
                        dst[(p * k + kk) * PANEL + lane] = v;
                    }
                }
                Tensor::from_vec(dst, panels * k * PANEL, &candle_core::Device::Cpu)?
            }
            DType::BF16 => {
                let (storage, layout) = w.storage_and_layout();
                let candle_core::Storage::Cpu(cpu) = &*storage else {
                    candle_core::bail!("packing needs CPU weights");
                };
                let src = &cpu.as_slice::<half::bf16>()?
                    [layout.start_offset()..layout.start_offset() + n * k];
                let kp = bf16_pairs(k);
                let mut dst = vec![half::bf16::ZERO; panels * kp * PANEL * 2];
                for (row, chunk) in src.chunks_exact(k).enumerate() {
                    let (p, lane) = (row / PANEL, row % PANEL);
                    for (kk, &v) in chunk.iter().enumerate() {
                        dst[pair_slot(p, kp, lane, kk)] = v;
                    }
                }
                Tensor::from_vec(dst, panels * kp * PANEL * 2, &candle_core::Device::Cpu)?
            }
            other => candle_core::bail!("cannot pack {other:?} weights"),
        };
        Ok(Self {
            packed,
            n,
            k,
            scales: None,
        })
    }

    /// Quantizes float32 `w` `(n, k)` to int8 with one scale per output row (symmetric:
    /// w ≈ scale · q, q in -127..=127), in pair panels `[panel][k/2][16][2]`. The kernel
    /// multiplies q exactly by x quantized per row to int16 (AVX-512 VNNI `vpdpwssd`), so
    /// the result is x · (scale q)ᵀ up to x's 16-bit rounding.
    pub fn pack_int8(w: &Tensor) -> candle_core::Result<Self> {
        if !supports_int8() {
            candle_core::bail!("int8 weights need AVX2 or AVX-512 VNNI, which this CPU lacks");
        }
        let (n, k) = w.dims2()?;
        let panels = n.div_ceil(PANEL);
        let w = w.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("packing needs CPU weights");
        };
        let src = &cpu.as_slice::<f32>()?[layout.start_offset()..layout.start_offset() + n * k];
        let kp = k.div_ceil(2);
        let mut dst = vec![0u8; panels * kp * PANEL * 2];
        let mut scales = vec![0f32; panels * PANEL];
        for (row, chunk) in src.chunks_exact(k).enumerate() {
            let (p, lane) = (row / PANEL, row % PANEL);
            let scale = symmetric_scale(chunk, 127.0);
            scales[row] = scale;
            for (kk, &v) in chunk.iter().enumerate() {
                let q = (v / scale).round().clamp(-127.0, 127.0) as i8;
                dst[pair_slot(p, kp, lane, kk)] = q as u8;
            }
        }
        Ok(Self {
            packed: Tensor::from_vec(dst, panels * kp * PANEL * 2, &candle_core::Device::Cpu)?,
            n,
            k,
            scales: Some(scales),
        })
    }

    /// Rows `ids` of the original `(n, k)` matrix, as float32 `(ids, k)` (the embedding lookup
    /// when the tied `wte` is stored packed for the original head).
    pub fn gather_rows(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let k = self.k;
        let mut out = Vec::with_capacity(ids.len() * k);
        let storage = self.packed.storage_and_layout();
        let (candle_core::Storage::Cpu(cpu), layout) = (&*storage.0, storage.1) else {
            candle_core::bail!("packed weights live on the CPU");
        };
        let start = layout.start_offset();
        for &id in ids {
            let id = id as usize;
            if id >= self.n {
                candle_core::bail!("row {id} out of range {}", self.n);
            }
            let (p, lane) = (id / PANEL, id % PANEL);
            match cpu {
                CpuStorage::F32(w) => {
                    out.extend((0..k).map(|kk| w[start + (p * k + kk) * PANEL + lane]))
                }
                CpuStorage::BF16(w) => {
                    let kp = bf16_pairs(k);
                    out.extend((0..k).map(|kk| w[start + pair_slot(p, kp, lane, kk)].to_f32()))
                }
                CpuStorage::U8(w) => {
                    let (kp, scale) = (k.div_ceil(2), self.scales.as_ref().map_or(1.0, |s| s[id]));
                    out.extend(
                        (0..k).map(|kk| w[start + pair_slot(p, kp, lane, kk)] as i8 as f32 * scale),
                    )
                }
                _ => candle_core::bail!("packed weights are f32, bf16 or int8"),
            }
        }
        Tensor::from_vec(out, (ids.len(), k), &candle_core::Device::Cpu)
    }

    /// Whether the panels are int8 (multiplied by the int8 kernels).
    pub fn is_int8(&self) -> bool {
        self.kind() == Kind::Int8
    }

    /// The same weight quantized to int8 (per-row scales, as [`Self::pack_int8`]): the cheap
    /// copy a draft reads in self-speculative decoding. An int8 weight is its own copy.
    pub fn to_int8(&self) -> candle_core::Result<Self> {
        if self.is_int8() {
            return Ok(self.clone());
        }
        let ids: Vec<u32> = (0..self.n as u32).collect();
        Self::pack_int8(&self.gather_rows(&ids)?)
    }

    fn kind(&self) -> Kind {
        match (self.packed.dtype(), &self.scales) {
            (DType::BF16, _) => Kind::Bf16,
            (_, Some(_)) => Kind::Int8,
            _ => Kind::F32,
        }
    }

    /// `x (m, k)` float32 -> `(m, n)` float32, on the fastest instruction set this CPU has
    /// for the weights (one choice per process: they may differ in the last bits).
    pub fn xwt(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let isa = Isa::best(self.kind()).expect("packing checked the CPU");
        self.xwt_on(x, isa)
    }

    /// `xwt` on `isa`, one of `Isa::available(self.kind())`.
    pub(super) fn xwt_on(&self, x: &Tensor, isa: Isa) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op2_no_bwd(
            &self.packed,
            &XwtOp {
                n: self.n,
                k: self.k,
                isa,
                scales: self.scales.as_deref(),
            },
        )
    }
}

struct XwtOp<'a> {
    n: usize,
    k: usize,
    isa: Isa,
    scales: Option<&'a [f32]>,
}

impl CustomOp2 for XwtOp<'_> {
    fn name(&self) -> &'static str {
        "packed-xwt"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let n = self.n;
        if k != self.k {
            candle_core::bail!("packed-xwt: x has {k} columns, W has {}", self.k);
        }
        let (Some((x0, x1)), Some((w0, w1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("packed-xwt: operands must be contiguous");
        };
        let x = &s1.as_slice::<f32>()?[x0..x1];
        // the output has the rows the kernel writes; the padding is dropped at the end
        let rows = self.isa.padded_rows(m);
        let mut out = vec![0f32; rows * n];
        match s2 {
            CpuStorage::F32(w) => {
                let ops = Operands {
                    x,
                    m,
                    k,
                    w: &w[w0..w1],
                };
                isa::f32_product(&ops, self.isa, n, &mut out);
            }
            CpuStorage::U8(w) => {
                let Some(w_scales) = self.scales else {
                    candle_core::bail!("packed-xwt: int8 weights without scales");
                };
                let (xq, x_scales) = int16_pairs(x, m, k);
                // SAFETY: i8 and u8 have the same size and alignment; the bytes are i8 bits.
                let w: &[i8] =
                    unsafe { std::slice::from_raw_parts(w[w0..w1].as_ptr() as *const i8, w1 - w0) };
                let ops = Operands {
                    x: &xq,
                    m,
                    k: k.div_ceil(2),
                    w,
                };
                isa::int8_product(&ops, self.isa, (&x_scales, w_scales), n, &mut out);
            }
            CpuStorage::BF16(w) => {
                let xb = to_bf16_pairs(x, m, k, rows, bf16_pairs(k));
                // SAFETY: half::bf16 is a transparent u16.
                let w: &[u16] = unsafe {
                    std::slice::from_raw_parts(w[w0..w1].as_ptr() as *const u16, w1 - w0)
                };
                let ops = Operands {
                    x: &xb,
                    m,
                    k: bf16_pairs(k),
                    w,
                };
                isa::bf16_product(&ops, self.isa, n, &mut out);
            }
            _ => candle_core::bail!("packed-xwt: weights must be f32, bf16 or int8"),
        }
        out.truncate(m * n);
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}
