//! Causal self-attention of many queries at once (a prompt, or drafts being verified) on the
//! CPU, straight from the KV cache buffers: per head and block of queries, the scores of the
//! keys the block can see (one gemm), a softmax in place per row over the keys that row may
//! see, then weights x values (a second gemm) written into the output's columns of the head.
//!
//! The tensor path it replaces builds `(heads, len, keys)` scores, adds a mask, takes a
//! softmax: three buffers of heads x len² floats per layer (48 MiB each at 512 tokens on
//! GPT-2 medium), each a fresh mapping the kernel zeroes page by page, and it multiplies out
//! the masked half too. Here the scores of one block live in a per-thread scratch row of a
//! few hundred KiB, and a block reads only keys some of its queries see (the causal triangle
//! up to the block's diagonal; on a local layer, the window). The products are the `gemm`
//! crate's (candle's own matmul), so only the softmax differs from the tensor path: it is the
//! decode step's (`fastmath::softmax_in_place`, with the vectorised `exp_neg`), so prompt and
//! decode attention weigh their keys the same way.

use rayon::prelude::*;

use super::fastmath::{self, KvElem};

/// Queries per task: scores of 64 rows x up to a context of keys fit L2, and the diagonal
/// block's masked corner (computed, then dropped) stays an eighth of a 512-token prompt's work.
const QUERY_BLOCK: usize = 64;

/// The queries: row `i`, head `h` at `data[i * row_stride + h * head_dim..][..head_dim]`
/// (scaled already where the model scales its scores).
pub struct Queries<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
}

/// One layer of a sequence's cache: head `h`, position `j` at
/// `keys[h * head_stride + j * head_dim..][..head_dim]` (values alike).
pub struct CachedKv<'a, T> {
    pub keys: &'a [T],
    pub values: &'a [T],
    pub head_stride: usize,
}

/// Who sees what: query `i` sits at position `offset + i` and sees the cached keys from
/// `first_visible(offset + i)` to its own position.
pub struct Span<F> {
    pub heads: usize,
    pub head_dim: usize,
    pub offset: usize,
    pub len: usize,
    pub first_visible: F,
}

#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    keys: Vec<f32>,
    values: Vec<f32>,
}

/// Writes the attention of every query and head into `out (len, heads * head_dim)`.
pub fn causal_attention<T, F>(q: Queries<'_>, kv: CachedKv<'_, T>, span: Span<F>, out: &mut [f32])
where
    T: KvElem + Sync,
    F: Fn(usize) -> usize + Sync,
{
    let Span {
        heads,
        head_dim: d,
        offset,
        len,
        ref first_visible,
    } = span;
    let width = heads * d;
    assert!(len > 0 && d > 0 && q.row_stride >= width);
    assert!(q.data.len() >= (len - 1) * q.row_stride + width);
    assert!(kv.head_stride >= (offset + len) * d);
    assert!(kv.keys.len() >= (heads - 1) * kv.head_stride + (offset + len) * d);
    assert!(kv.values.len() >= (heads - 1) * kv.head_stride + (offset + len) * d);
    assert!(out.len() >= len * width);
    let blocks = len.div_ceil(QUERY_BLOCK);
    let out = SharedRows(out.as_mut_ptr());
    (0..heads * blocks)
        .into_par_iter()
        .for_each_init(Scratch::default, |scratch, task| {
            let (h, b) = (task / blocks, task % blocks);
            let rows = b * QUERY_BLOCK..((b + 1) * QUERY_BLOCK).min(len);
            // Keys seen by some query of the block: from the first query's first visible key
            // (first_visible never decreases with the position) to the last query's position.
            let keys_from = first_visible(offset + rows.start);
            let keys_to = offset + rows.end;
            let n = keys_to - keys_from;
            let head = h * kv.head_stride + keys_from * d..h * kv.head_stride + keys_to * d;
            let keys = T::as_f32(&kv.keys[head.clone()], &mut scratch.keys);
            let values = T::as_f32(&kv.values[head], &mut scratch.values);
            let m = rows.len();
            scratch.scores.resize(m * n, 0.0);
            let scores = &mut scratch.scores[..m * n];
            let q_block = &q.data[rows.start * q.row_stride + h * d..];
            // SAFETY: every extent was asserted above: m rows of q from `q_block` at
            // `row_stride` (d columns), n keys of d (read transposed), m x n scores.
            unsafe {
                product(
                    (m, n, d),
                    (scores.as_mut_ptr(), n),
                    (q_block.as_ptr(), q.row_stride),
                    (keys.as_ptr(), d, 1),
                )
            };
            for (i, row) in rows.clone().zip(scores.chunks_exact_mut(n)) {
                let p = offset + i;
                let seen = first_visible(p) - keys_from..p + 1 - keys_from;
                row[..seen.start].fill(0.0);
                row[seen.end..].fill(0.0);
                fastmath::softmax_in_place(&mut row[seen]);
            }
            // SAFETY: m x n weights, n values of d; the output rows `rows`, columns of head h
            // (disjoint from every other task's), inside `out` (asserted above).
            unsafe {
                product(
                    (m, d, n),
                    (out.at(rows.start * width + h * d), width),
                    (scores.as_ptr(), n),
                    (values.as_ptr(), 1, d),
                )
            };
        });
}

/// `dst (m, n) = lhs (m, k) x rhs (k, n)` on one thread: `dst` and `lhs` rows at the given
/// strides (columns adjacent), `rhs` element (r, c) at `r * rhs_row + c * rhs_col`.
///
/// # Safety
/// The pointers cover those extents; `dst` overlaps neither operand.
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    (dst, dst_row): (*mut f32, usize),
    (lhs, lhs_row): (*const f32, usize),
    (rhs, rhs_col, rhs_row): (*const f32, usize, usize),
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row as isize,
            false,
            lhs,
            1,
            lhs_row as isize,
            rhs,
            rhs_col as isize,
            rhs_row as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

struct SharedRows(*mut f32);
// SAFETY: tasks write disjoint (rows, head) blocks of the output, which outlives them.
unsafe impl Sync for SharedRows {}

impl SharedRows {
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, one query at a time, in f64: scores over the visible keys, softmax,
    /// weighted sum of values.
    fn naive(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        (heads, d, cap, offset, len): Shape,
        first_visible: impl Fn(usize) -> usize,
    ) -> Vec<f32> {
        let mut out = vec![0f32; len * heads * d];
        for i in 0..len {
            let p = offset + i;
            for h in 0..heads {
                let qv = &q[i * heads * d + h * d..][..d];
                let seen = first_visible(p)..p + 1;
                let scores: Vec<f64> = seen
                    .clone()
                    .map(|j| {
                        let k = &keys[h * cap * d + j * d..][..d];
                        qv.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let total: f64 = e.iter().sum();
                for (j, w) in seen.zip(e) {
                    let v = &values[h * cap * d + j * d..][..d];
                    for (o, &x) in out[i * heads * d + h * d..][..d].iter_mut().zip(v) {
                        *o += (w / total * x as f64) as f32;
                    }
                }
            }
        }
        out
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 250.0 - 2.0
            })
            .collect()
    }

    /// (heads, head_dim, cache capacity, offset, len)
    type Shape = (usize, usize, usize, usize, usize);

    /// The kernel on queries `q` of rows `row_stride` apart.
    fn run<T: KvElem + Sync>(
        (q, row_stride): (&[f32], usize),
        keys: &[T],
        values: &[T],
        (heads, d, cap, offset, len): Shape,
        first_visible: impl Fn(usize) -> usize + Sync,
    ) -> Vec<f32> {
        let mut out = vec![f32::NAN; len * heads * d];
        let span = Span {
            heads,
            head_dim: d,
            offset,
            len,
            first_visible,
        };
        let kv = CachedKv {
            keys,
            values,
            head_stride: cap * d,
        };
        causal_attention(
            Queries {
                data: q,
                row_stride,
            },
            kv,
            span,
            &mut out,
        );
        out
    }

    fn worst(got: &[f32], want: &[f32]) -> f32 {
        got.iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    }

    #[test]
    fn matches_the_definition_causal_and_windowed_with_a_cached_prefix() {
        // (heads, head_dim, offset, len, window): blocks of 64 with a partial last one, a
        // prefix already cached (drafts after a prompt), a window shorter than the prompt
        for (heads, d, offset, len, window) in [
            (2, 8, 0, 1, None),
            (3, 16, 0, 150, None),
            (2, 64, 37, 70, None),
            (2, 8, 0, 200, Some(48)),
            (1, 8, 90, 5, Some(16)),
        ] {
            let shape = (heads, d, offset + len + 3, offset, len);
            let q = data(len * heads * d, 1);
            let keys = data(heads * shape.2 * d, 2);
            let values = data(heads * shape.2 * d, 3);
            let first = |p: usize| window.map_or(0, |w| (p + 1).saturating_sub(w));
            let want = naive(&q, &keys, &values, shape, first);
            let got = run((&q, heads * d), &keys, &values, shape, first);
            let err = worst(&got, &want);
            assert!(err < 1e-4, "{shape:?} window {window:?}: {err}");

            // a bfloat16 cache is read as the float32 of its values
            let round = |v: &[f32]| -> Vec<half::bf16> {
                v.iter().map(|&x| half::bf16::from_f32(x)).collect()
            };
            let (kb, vb) = (round(&keys), round(&values));
            let widen = |v: &[half::bf16]| -> Vec<f32> { v.iter().map(|x| x.to_f32()).collect() };
            let want = naive(&q, &widen(&kb), &widen(&vb), shape, first);
            let err = worst(&run((&q, heads * d), &kb, &vb, shape, first), &want);
            assert!(err < 1e-4, "bf16 {shape:?} window {window:?}: {err}");
        }
    }

    #[test]
    fn queries_may_be_a_strided_view() {
        // q as the first third of packed (q, k, v) rows, the way the model hands it over
        let (heads, d, len) = (2, 8, 70);
        let q_packed = data(len * 3 * heads * d, 4);
        let q: Vec<f32> = q_packed
            .chunks(3 * heads * d)
            .flat_map(|r| r[..heads * d].to_vec())
            .collect();
        let keys = data(heads * len * d, 5);
        let values = data(heads * len * d, 6);
        let shape = (heads, d, len, 0, len);
        let packed = run((&q_packed, 3 * heads * d), &keys, &values, shape, |_| 0);
        let dense = run((&q, heads * d), &keys, &values, shape, |_| 0);
        assert_eq!(packed, dense);
    }
}
