//! Attention of single queries over the paged key/value pool (`model/kv_pool.rs`), every
//! query of a step in one operation: decode rows and the positions of a verifying pass, each
//! with its own keys, window and batch-independent arithmetic.
//!
//! On a GPU it is one kernel launch per layer (`paged_attention.cu`, compiled at start-up by
//! NVRTC), where the tensor-op version in `model/batched_attention.rs` costs a dozen launches
//! and copies every key and value it reads. On the CPU the same arithmetic runs in Rust: the
//! batched path's tests run it there, and that tensor-op version is the oracle both are
//! checked against (`batched_attention::check_fused_attention`, at start-up on every device).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

/// Keys a query may see: its scores live in the GPU block's shared memory (48 KiB with the
/// query). Longer caches take the tensor ops (every released GPT-2 and GPT-Neo shape sees at
/// most 2048).
pub const MAX_KEYS: usize = 8192;

/// The queries of one launch: `tables` `(t, keys)` u32 gives the pool row of each key
/// position of each cache; `queries` `(n, 3)` u32 gives each query's row of q, its table and
/// the end of its keys (its position + 1); `window` the keys a query sees (itself included),
/// None for all earlier ones; `scale` what q is multiplied by as it is read (so every score).
pub struct QueryKeys<'a> {
    pub tables: &'a Tensor,
    pub queries: &'a Tensor,
    pub heads: usize,
    pub window: Option<usize>,
    pub scale: f32,
}

/// `q` `(rows, heads * head_dim)` float32 (rows may lie apart, as in a view of the q/k/v
/// projection; columns contiguous) against `pool_k`, `pool_v` `(pool rows, heads * head_dim)`
/// (float32 or bfloat16): `(n, heads * head_dim)` float32, row i the attention of query i.
pub fn attend_queries(
    q: &Tensor,
    pool_k: &Tensor,
    pool_v: &Tensor,
    keys: &QueryKeys<'_>,
) -> Result<Tensor> {
    let op = PagedAttention {
        tables: keys.tables.contiguous()?,
        queries: keys.queries.contiguous()?,
        heads: keys.heads,
        window: keys.window.unwrap_or(0),
        scale: keys.scale,
    };
    if keys.queries.dim(0)? == 0 {
        // no queries: nothing to launch (a GPU refuses an empty grid)
        return Tensor::zeros((0, q.dim(1)?), DType::F32, q.device());
    }
    q.apply_op3_no_bwd(pool_k, pool_v, &op)
}

struct PagedAttention {
    tables: Tensor,
    queries: Tensor,
    heads: usize,
    /// 0: no window.
    window: usize,
    scale: f32,
}

impl PagedAttention {
    fn check(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<(usize, usize, usize)> {
        let (_, width) = q.shape().dims2()?;
        let (n, three) = self.queries.dims2()?;
        let (_, keys) = self.tables.dims2()?;
        if three != 3 || self.tables.dtype() != DType::U32 || self.queries.dtype() != DType::U32 {
            candle_core::bail!("paged attention: tables and queries must be u32, queries (n, 3)");
        }
        if keys > MAX_KEYS {
            candle_core::bail!("paged attention: {keys} keys, past {MAX_KEYS}");
        }
        if self.heads == 0 || !width.is_multiple_of(self.heads) {
            candle_core::bail!("paged attention: width {width} over {} heads", self.heads);
        }
        if !k.is_contiguous() || !v.is_contiguous() || q.stride()[1] != 1 {
            candle_core::bail!("paged attention: contiguous pools and rows of q");
        }
        if k.shape().dims2()?.1 != width || v.shape() != k.shape() {
            candle_core::bail!("paged attention: pool of another width than q");
        }
        Ok((n, width, keys))
    }
}

/// The first key a query whose keys end at `end` sees.
fn first_key(end: usize, window: usize) -> usize {
    if window > 0 {
        end.saturating_sub(window)
    } else {
        0
    }
}

/// A pool element read as float32.
trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// What the CPU version reads besides the operands (checked by `cpu_fwd`).
struct Indices<'a> {
    tables: &'a [u32],
    queries: &'a [u32],
    width: usize,
    head_dim: usize,
    keys: usize,
    window: usize,
    q_stride: usize,
    scale: f32,
}

/// The kernel's arithmetic on the CPU, query by query over the cores: per head the scores in
/// key order, their softmax, and each output column summed over the keys in key order.
fn attend_cpu<T: Widen>(q: &[f32], k: &[T], v: &[T], ix: &Indices<'_>, out: &mut [f32]) {
    let (width, hd) = (ix.width, ix.head_dim);
    out.par_chunks_mut(width).enumerate().for_each(|(i, out)| {
        let spec = &ix.queries[3 * i..3 * i + 3];
        let (row, end) = (spec[0] as usize, spec[2] as usize);
        let table = &ix.tables[spec[1] as usize * ix.keys..][..ix.keys];
        let first = first_key(end, ix.window);
        let seen = &table[first..end];
        let mut scores = vec![0f32; seen.len()];
        let mut acc = vec![0f32; hd];
        let mut qh = vec![0f32; hd];
        for (h, out) in out.chunks_exact_mut(hd).enumerate() {
            for (s, &x) in qh.iter_mut().zip(&q[row * ix.q_stride + h * hd..][..hd]) {
                *s = x * ix.scale;
            }
            let mut m = f32::NEG_INFINITY;
            for (s, &r) in scores.iter_mut().zip(seen) {
                let kr = &k[r as usize * width + h * hd..][..hd];
                *s = qh.iter().zip(kr).map(|(a, b)| a * b.widen()).sum();
                m = m.max(*s);
            }
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - m).exp();
                sum += *s;
            }
            acc.fill(0.0);
            for (s, &r) in scores.iter().zip(seen) {
                let vr = &v[r as usize * width + h * hd..][..hd];
                for (a, x) in acc.iter_mut().zip(vr) {
                    *a += s * x.widen();
                }
            }
            for (o, a) in out.iter_mut().zip(&acc) {
                *o = a / sum;
            }
        }
    })
}

impl CustomOp3 for PagedAttention {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, width, keys) = self.check(ql, kl, vl)?;
        #[cfg(feature = "cuda-emulator")]
        if let Some(out) = emulated::attend(self, (q, ql), (k, kl), (v, vl), (n, width, keys))? {
            return Ok(out);
        }
        let q = &q.as_slice::<f32>()?[ql.start_offset()..];
        let tables = self.tables.flatten_all()?.to_vec1::<u32>()?;
        let queries = self.queries.flatten_all()?.to_vec1::<u32>()?;
        // Every index within its operand (the CUDA kernel gives NaN for what this refuses).
        let (q_rows, pool_rows) = (ql.shape().dims2()?.0, kl.shape().dims2()?.0);
        let n_tables = self.tables.dims2()?.0;
        let bad_query = queries.chunks_exact(3).any(|s| {
            s[0] as usize >= q_rows
                || s[1] as usize >= n_tables
                || s[2] == 0
                || s[2] as usize > keys
        });
        if bad_query || tables.iter().any(|&r| r as usize >= pool_rows) {
            candle_core::bail!("paged attention: an index outside its operand");
        }
        let mut out = vec![0f32; n * width];
        let ix = Indices {
            tables: &tables,
            queries: &queries,
            width,
            head_dim: width / self.heads,
            keys,
            window: self.window,
            q_stride: ql.stride()[0],
            scale: self.scale,
        };
        match (k, v) {
            (CpuStorage::F32(k), CpuStorage::F32(v)) => {
                let (k, v) = (&k[kl.start_offset()..], &v[vl.start_offset()..]);
                attend_cpu(q, k, v, &ix, &mut out);
            }
            (CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                let (k, v) = (&k[kl.start_offset()..], &v[vl.start_offset()..]);
                attend_cpu(q, k, v, &ix, &mut out);
            }
            _ => candle_core::bail!("paged attention: a float32 or bfloat16 pool"),
        }
        Ok((CpuStorage::F32(out), Shape::from((n, width))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, width, keys) = self.check(ql, kl, vl)?;
        cuda::launch(self, (q, ql), (k, kl), (v, vl), (n, width, keys))
    }
}

/// Writes row i of `src` `(n, width)` float32 (rows may lie apart, as in a view of the q/k/v
/// projection; columns contiguous) to row `rows[i]` of `pool` `(pool rows, width)` (float32,
/// or bfloat16 rounded to nearest even as candle rounds): a step's keys or values into the
/// cache, one launch on a GPU and no contiguous copy. Rows outside the pool are refused (on a
/// GPU, not written).
pub fn store_rows(pool: &Tensor, src: &Tensor, rows: &Tensor) -> Result<()> {
    if rows.dtype() != DType::U32 || rows.rank() != 1 || rows.dim(0)? != src.dim(0)? {
        candle_core::bail!("store rows: one u32 row index per source row");
    }
    if src.dtype() != DType::F32 {
        candle_core::bail!("store rows: a float32 source");
    }
    pool.inplace_op2(
        src,
        &StoreRows {
            rows: rows.contiguous()?,
        },
    )
}

struct StoreRows {
    rows: Tensor,
}

impl StoreRows {
    /// `(n, width, src row stride)`, once the layouts are what the kernels read.
    fn check(&self, pool: &Layout, src: &Layout) -> Result<(usize, usize, usize)> {
        let (_, width) = pool.shape().dims2()?;
        let (n, src_width) = src.shape().dims2()?;
        if !pool.is_contiguous() || src_width != width || src.stride()[1] != 1 {
            candle_core::bail!("store rows: a contiguous pool and rows of its width");
        }
        Ok((n, width, src.stride()[0]))
    }
}

impl candle_core::InplaceOp2 for StoreRows {
    fn name(&self) -> &'static str {
        "store-rows"
    }

    fn cpu_fwd(
        &self,
        pool: &mut CpuStorage,
        pl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let (n, width, stride) = self.check(pl, sl)?;
        #[cfg(feature = "cuda-emulator")]
        if emulated::store(self, (pool, pl), (src, sl), (n, width, stride))? {
            return Ok(());
        }
        let rows = self.rows.to_vec1::<u32>()?;
        let src = &src.as_slice::<f32>()?[sl.start_offset()..];
        let pool_rows = pl.shape().dims2()?.0;
        if rows.iter().any(|&r| r as usize >= pool_rows) {
            candle_core::bail!("store rows: a row outside the pool");
        }
        let at = pl.start_offset();
        for (i, &r) in rows.iter().enumerate().take(n) {
            let from = &src[i * stride..][..width];
            let to = at + r as usize * width;
            match pool {
                CpuStorage::F32(p) => p[to..to + width].copy_from_slice(from),
                CpuStorage::BF16(p) => {
                    for (d, &x) in p[to..to + width].iter_mut().zip(from) {
                        *d = bf16::from_f32(x);
                    }
                }
                _ => candle_core::bail!("store rows: a float32 or bfloat16 pool"),
            }
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        pool: &mut candle_core::CudaStorage,
        pl: &Layout,
        src: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        let dims = self.check(pl, sl)?;
        cuda::store(&self.rows, (pool, pl), (src, sl), dims)
    }
}

/// Threads of a block of `paged_attention.cu`'s kernels (must match its `THREADS`).
#[cfg(any(feature = "cuda-emulator", feature = "cuda"))]
const THREADS: u32 = 128;

/// The attention kernel's blocks (one per query and head) and bytes of shared memory (the
/// query, its scores, a reduction's scratch) for `n` queries of `keys` keys, or why it cannot
/// run them.
#[cfg(any(feature = "cuda-emulator", feature = "cuda"))]
fn attention_launch(n: usize, heads: usize, head_dim: usize, keys: usize) -> Result<(u32, u32)> {
    let shared = (head_dim + keys + THREADS as usize / 32) * std::mem::size_of::<f32>();
    if shared > 48 << 10 {
        candle_core::bail!("paged attention: {keys} keys exceed the kernel's shared memory");
    }
    Ok(((n * heads) as u32, shared as u32))
}

/// Tests: the CUDA kernels run on the CPU (`cuda_emulator.rs`) in place of the CPU code, their
/// arguments as `cuda::launch` and `cuda::store` pass them.
#[cfg(feature = "cuda-emulator")]
mod emulated {
    use candle_core::{CpuStorage, Layout, Result, Shape};
    use half::bf16;

    use super::super::cuda_emulator::{self as emu, Arg, Grid, Operand};
    use super::{attention_launch, PagedAttention, StoreRows, THREADS};

    pub(super) fn attend(
        op: &PagedAttention,
        (q, ql): (&CpuStorage, &Layout),
        (k, kl): (&CpuStorage, &Layout),
        (v, vl): (&CpuStorage, &Layout),
        (n, width, keys): (usize, usize, usize),
    ) -> Result<Option<(CpuStorage, Shape)>> {
        if !emu::active() {
            return Ok(None);
        }
        let (heads, head_dim) = (op.heads, width / op.heads);
        let (blocks, shared_bytes) = attention_launch(n, heads, head_dim, keys)?;
        let name = match k {
            CpuStorage::F32(_) => "paged_attention_f32",
            _ => "paged_attention_bf16",
        };
        let mut operands = vec![
            Operand::from_start(q, ql.start_offset())?,
            Operand::from_start(k, kl.start_offset())?,
            Operand::from_start(v, vl.start_offset())?,
            Operand::U32(op.tables.flatten_all()?.to_vec1::<u32>()?),
            Operand::U32(op.queries.flatten_all()?.to_vec1::<u32>()?),
            Operand::F32(vec![f32::NAN; n * width]),
        ];
        let mut args: Vec<Arg> = (0..6).map(|i| Arg::At(i, 0)).collect();
        args.extend([heads, head_dim, keys, op.window, ql.stride()[0]].map(|i| Arg::I32(i as i32)));
        args.push(Arg::F32(op.scale));
        args.extend(
            [
                ql.shape().dims2()?.0,
                op.tables.dims2()?.0,
                kl.shape().dims2()?.0,
            ]
            .map(|e| Arg::U32(e as u32)),
        );
        let grid = Grid {
            blocks: [blocks, 1, 1],
            threads: [THREADS, 1, 1],
            shared_bytes,
        };
        emu::launch(name, grid, &mut operands, &args)?;
        let Some(Operand::F32(out)) = operands.pop() else {
            unreachable!("the output operand")
        };
        Ok(Some((CpuStorage::F32(out), Shape::from((n, width)))))
    }

    pub(super) fn store(
        op: &StoreRows,
        (pool, pl): (&mut CpuStorage, &Layout),
        (src, sl): (&CpuStorage, &Layout),
        (n, width, stride): (usize, usize, usize),
    ) -> Result<bool> {
        if !emu::active() {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
        let at = pl.start_offset();
        let name = match pool {
            CpuStorage::F32(_) => "store_rows_f32",
            _ => "store_rows_bf16",
        };
        let mut operands = vec![
            Operand::from_start(src, sl.start_offset())?,
            Operand::U32(op.rows.to_vec1::<u32>()?),
            Operand::from_start(pool, at)?,
        ];
        let args = [
            Arg::At(0, 0),
            Arg::At(1, 0),
            Arg::At(2, 0),
            Arg::I32(width as i32),
            Arg::I32(stride as i32),
            Arg::U32(pl.shape().dims2()?.0 as u32),
        ];
        let grid = Grid {
            blocks: [n as u32, 1, 1],
            threads: [THREADS, 1, 1],
            shared_bytes: 0,
        };
        emu::launch(name, grid, &mut operands, &args)?;
        match (pool, operands.pop()) {
            (CpuStorage::F32(p), Some(Operand::F32(d))) => p[at..].copy_from_slice(&d),
            (CpuStorage::BF16(p), Some(Operand::U16(d))) => {
                for (x, b) in p[at..].iter_mut().zip(d) {
                    *x = bf16::from_bits(b);
                }
            }
            _ => candle_core::bail!("store rows: a float32 or bfloat16 pool"),
        }
        Ok(true)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::OnceLock;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{
        CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, StorageRef, Tensor,
    };
    use half::bf16;

    use super::{PagedAttention, THREADS};

    const SOURCE: &str = include_str!("paged_attention.cu");

    /// The kernels' PTX, compiled once (for the GPU the driver JIT-compiles it to).
    fn ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        super::super::cuda_source::ptx(&PTX, "paged_attention.cu", SOURCE)
    }

    /// A u32 tensor's storage and where its elements start (the op's own index tensors);
    /// `cuda_u32` views it on the device.
    fn u32_storage(t: &Tensor) -> (StorageRef<'_>, usize) {
        let (storage, layout) = t.storage_and_layout();
        (storage, layout.start_offset())
    }

    fn cuda_u32<'s>(s: &'s StorageRef<'_>, offset: usize) -> Result<CudaView<'s, u32>> {
        match &**s {
            Storage::Cuda(c) => Ok(c.as_cuda_slice::<u32>()?.slice(offset..)),
            _ => candle_core::bail!("paged attention: index tensors on another device than q"),
        }
    }

    pub(super) fn launch(
        op: &PagedAttention,
        (q, ql): (&CudaStorage, &Layout),
        k: (&CudaStorage, &Layout),
        v: (&CudaStorage, &Layout),
        (n, width, keys): (usize, usize, usize),
    ) -> Result<(CudaStorage, Shape)> {
        let dev = q.device();
        let (heads, head_dim) = (op.heads, width / op.heads);
        let (blocks, shared) = super::attention_launch(n, heads, head_dim, keys)?;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: shared,
        };
        let (tables, t_at) = u32_storage(&op.tables);
        let (queries, q_at) = u32_storage(&op.queries);
        let args = Args {
            q: q.as_cuda_slice::<f32>()?.slice(ql.start_offset()..),
            tables: cuda_u32(&tables, t_at)?,
            queries: cuda_u32(&queries, q_at)?,
            ints: [
                heads as i32,
                head_dim as i32,
                keys as i32,
                op.window as i32,
                ql.stride()[0] as i32,
            ],
            scale: op.scale,
            extents: [
                ql.shape().dims2()?.0 as u32,
                op.tables.dims2()?.0 as u32,
                k.1.shape().dims2()?.0 as u32,
            ],
            cfg,
            len: n * width,
        };
        let out = match k.0.dtype() {
            DType::F32 => run::<f32>(dev, "paged_attention_f32", &args, k, v)?,
            DType::BF16 => run::<bf16>(dev, "paged_attention_bf16", &args, k, v)?,
            d => candle_core::bail!("paged attention: a {d:?} pool"),
        };
        Ok((out, Shape::from((n, width))))
    }

    struct Args<'a> {
        q: CudaView<'a, f32>,
        tables: CudaView<'a, u32>,
        queries: CudaView<'a, u32>,
        /// heads, head_dim, keys, window, q's row stride
        ints: [i32; 5],
        scale: f32,
        /// q rows, tables, pool rows: what the kernel checks every index against
        extents: [u32; 3],
        cfg: LaunchConfig,
        len: usize,
    }

    fn run<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        a: &Args<'_>,
        (k, kl): (&CudaStorage, &Layout),
        (v, vl): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let func = dev.get_or_load_custom_func(name, "exitserve_paged_attention", ptx()?)?;
        let pool_k = k.as_cuda_slice::<T>()?.slice(kl.start_offset()..);
        let pool_v = v.as_cuda_slice::<T>()?.slice(vl.start_offset()..);
        // SAFETY: the kernel writes every element before anything reads it.
        let out = unsafe { dev.alloc::<f32>(a.len)? };
        {
            let mut b = func.builder();
            b.arg(&a.q).arg(&pool_k).arg(&pool_v);
            b.arg(&a.tables).arg(&a.queries).arg(&out);
            for i in &a.ints {
                b.arg(i);
            }
            b.arg(&a.scale);
            for e in &a.extents {
                b.arg(e);
            }
            // SAFETY: the arguments match the kernel's signature, and the kernel checks every
            // index against the extents it is given.
            unsafe { b.launch(a.cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    pub(super) fn store(
        rows: &Tensor,
        (pool, pl): (&mut CudaStorage, &Layout),
        (src, sl): (&CudaStorage, &Layout),
        (n, width, stride): (usize, usize, usize),
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let dev = pool.device().clone();
        let (rows_storage, rows_at) = u32_storage(rows);
        let rows = cuda_u32(&rows_storage, rows_at)?;
        let src = src.as_cuda_slice::<f32>()?.slice(sl.start_offset()..);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let ints = [width as i32, stride as i32];
        let pool_rows = pl.shape().dims2()?.0 as u32;
        let at = pl.start_offset();
        macro_rules! launch {
            ($t:ty, $name:literal) => {{
                let func =
                    dev.get_or_load_custom_func($name, "exitserve_paged_attention", ptx()?)?;
                let mut dst = pool.as_cuda_slice_mut::<$t>()?.slice_mut(at..);
                let mut b = func.builder();
                b.arg(&src).arg(&rows).arg(&mut dst);
                b.arg(&ints[0]).arg(&ints[1]).arg(&pool_rows);
                // SAFETY: the arguments match the kernel's signature; it writes only rows
                // within `pool_rows` and reads `n` rows of `src`, which `check` bounded.
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match pool.dtype() {
            DType::F32 => launch!(f32, "store_rows_f32"),
            DType::BF16 => launch!(bf16, "store_rows_bf16"),
            d => candle_core::bail!("store rows: a {d:?} pool"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn stored_rows_are_what_a_scatter_of_the_converted_rows_writes() -> Result<()> {
        let dev = Device::Cpu;
        // a view of every other 4 columns of a (3, 8) matrix: rows 8 apart
        let full = Tensor::arange(0f32, 24., &dev)?.affine(1.37, -9.1)?.exp()?;
        let src = full.reshape((3, 8))?.narrow(1, 4, 4)?;
        let rows = Tensor::new(&[5u32, 0, 2], &dev)?;
        for dtype in [candle_core::DType::F32, candle_core::DType::BF16] {
            let pool = Tensor::zeros((6, 4), dtype, &dev)?;
            store_rows(&pool, &src, &rows)?;
            let want = Tensor::zeros((6, 4), dtype, &dev)?;
            let index = rows.reshape((3, 1))?.broadcast_as((3, 4))?.contiguous()?;
            want.scatter_set(&index, &src.to_dtype(dtype)?.contiguous()?, 0)?;
            let bits = |t: &Tensor| t.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>();
            assert_eq!(bits(&pool)?, bits(&want)?, "{dtype:?}");
        }
        let pool = Tensor::zeros((2, 4), candle_core::DType::F32, &dev)?;
        assert!(store_rows(&pool, &src, &rows).is_err(), "row 5 of 2");
        Ok(())
    }

    #[test]
    fn a_table_row_outside_the_pool_is_refused() -> Result<()> {
        let dev = Device::Cpu;
        let pool = Tensor::zeros((4, 4), candle_core::DType::F32, &dev)?;
        let keys = QueryKeys {
            tables: &Tensor::new(&[[0u32, 4]], &dev)?,
            queries: &Tensor::new(&[[0u32, 0, 1]], &dev)?,
            heads: 1,
            window: None,
            scale: 1.0,
        };
        assert!(attend_queries(&pool, &pool, &pool, &keys).is_err());
        Ok(())
    }

    #[test]
    fn a_query_gets_the_same_bits_alone_and_among_others() -> Result<()> {
        let dev = Device::Cpu;
        let (heads, width) = (2, 8);
        let pool = Tensor::arange(0f32, 96., &dev)?
            .affine(0.37, -5.0)?
            .sin()?
            .reshape((12, width))?;
        let q = Tensor::arange(0f32, 24., &dev)?
            .cos()?
            .reshape((3, width))?;
        // two caches: rows 0..6 and rows 6..12, in reverse order
        let tables = Tensor::new(&[[0u32, 1, 2, 3, 4, 5], [11, 10, 9, 8, 7, 6]], &dev)?;
        let run = |queries: &[[u32; 3]], window| -> Result<Vec<Vec<f32>>> {
            let flat: Vec<u32> = queries.concat();
            let queries = Tensor::from_vec(flat, (queries.len(), 3), &dev)?;
            let keys = QueryKeys {
                tables: &tables,
                queries: &queries,
                heads,
                window,
                scale: 1.0,
            };
            attend_queries(&q, &pool, &pool, &keys)?.to_vec2::<f32>()
        };
        for window in [None, Some(2)] {
            let alone = run(&[[1, 1, 5]], window)?;
            let among = run(&[[0, 0, 6], [1, 1, 5], [2, 0, 1]], window)?;
            assert_eq!(alone[0], among[1], "window {window:?}");
        }
        // no queries, no rows
        assert!(run(&[], None)?.is_empty());
        // one key: its value itself
        let one = run(&[[2, 0, 1]], None)?;
        assert_eq!(one[0], pool.get(0)?.to_vec1::<f32>()?);
        // a window of 2 sees the last two keys: not what all keys give
        assert_ne!(run(&[[0, 1, 6]], Some(2))?, run(&[[0, 1, 6]], None)?);
        // q read through a view with rows apart and scaled as read: what a scaled copy gives
        let wide = Tensor::cat(&[&q, &q.affine(3.0, 1.0)?], 1)?; // (3, 16)
        let queries = Tensor::new(&[[0u32, 0, 6], [2, 1, 4]], &dev)?;
        let keys = |scale| QueryKeys {
            tables: &tables,
            queries: &queries,
            heads,
            window: Some(3),
            scale,
        };
        let viewed = attend_queries(&wide.narrow(1, 0, width)?, &pool, &pool, &keys(0.3))?;
        let scaled = attend_queries(&q.affine(0.3, 0.0)?, &pool, &pool, &keys(1.0))?;
        assert_eq!(viewed.to_vec2::<f32>()?, scaled.to_vec2::<f32>()?);
        // indices outside their operands are refused: q row, table, end of keys
        for bad in [[3, 0, 1], [0, 2, 1], [0, 0, 7], [0, 0, 0]] {
            assert!(run(&[bad], None).is_err(), "{bad:?}");
        }
        Ok(())
    }
}
