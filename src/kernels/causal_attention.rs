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

/// Rows and keys the products always run with (see the task's comments).
const MIN_ROWS: usize = 16;
const MIN_KEYS: usize = 64;

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
    /// A short block's queries and outputs, padded to MIN_ROWS.
    queries: Vec<f32>,
    out: Vec<f32>,
    /// Few keys and values, padded to MIN_KEYS.
    keys_padded: Vec<f32>,
    values_padded: Vec<f32>,
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
            // Fewer than MIN_KEYS keys (a chunk's first queries) run as MIN_KEYS, the extra
            // ones zero and masked: gemm takes other paths for few columns too.
            let nr = n.max(MIN_KEYS);
            let (keys, values) = if nr > n {
                for (pad, src) in [
                    (&mut scratch.keys_padded, keys),
                    (&mut scratch.values_padded, values),
                ] {
                    pad.clear();
                    pad.resize(nr * d, 0.0);
                    pad[..n * d].copy_from_slice(src);
                }
                (&scratch.keys_padded[..], &scratch.values_padded[..])
            } else {
                (keys, values)
            };
            let n = nr;
            // A block of fewer than MIN_ROWS queries (a prompt chunk's tail) is multiplied as
            // MIN_ROWS, its extra rows zero: gemm takes other paths for few rows, whose sums
            // round differently, and a query must get the same numbers wherever the chunk
            // around it was cut (prefill budgets, cached prefixes); in bfloat16 that last-bit
            // difference became other logprobs (up to 9e-3) between two runs of a load.
            let m = rows.len();
            let mr = m.max(MIN_ROWS);
            let (q_block, q_stride) = if mr > m {
                scratch.queries.clear();
                scratch.queries.resize(mr * d, 0.0);
                for (i, r) in rows.clone().enumerate() {
                    let at = r * q.row_stride + h * d;
                    scratch.queries[i * d..][..d].copy_from_slice(&q.data[at..at + d]);
                }
                (&scratch.queries[..], d)
            } else {
                (&q.data[rows.start * q.row_stride + h * d..], q.row_stride)
            };
            scratch.scores.resize(mr * n, 0.0);
            let scores = &mut scratch.scores[..mr * n];
            // SAFETY: every extent was asserted above: mr rows of q from `q_block` at
            // `q_stride` (d columns; the padded copy holds mr rows), n keys of d (read
            // transposed), mr x n scores.
            unsafe {
                product(
                    (mr, n, d),
                    (scores.as_mut_ptr(), n),
                    (q_block.as_ptr(), q_stride),
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
            scores[m * n..].fill(0.0);
            if mr > m {
                scratch.out.clear();
                scratch.out.resize(mr * d, 0.0);
                // SAFETY: mr x n weights, n values of d, into the mr x d scratch.
                unsafe {
                    product(
                        (mr, d, n),
                        (scratch.out.as_mut_ptr(), d),
                        (scores.as_ptr(), n),
                        (values.as_ptr(), 1, d),
                    )
                };
                for (i, r) in rows.clone().enumerate() {
                    // SAFETY: row r, columns of head h: inside `out` and this task's own.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            scratch.out[i * d..].as_ptr(),
                            out.at(r * width + h * d),
                            d,
                        )
                    };
                }
                return;
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

    #[test]
    fn a_query_gets_the_same_bits_wherever_its_chunk_was_cut() {
        // A prompt computed whole, or in two chunks cut anywhere (a prefill budget, a cached
        // prefix), gives each query the same numbers: the tails of 1-3 queries included,
        // which gemm would otherwise multiply on another path.
        let len = 150;
        // head sizes of the released models (64) and of the test fixtures (8)
        for (heads, d, window) in [
            (2, 64, None),
            (2, 64, Some(50)),
            (4, 8, None),
            (4, 8, Some(20)),
        ] {
            let shape = (heads, d, len, 0, len);
            let q = data(len * heads * d, 7);
            let keys = data(heads * len * d, 8);
            let values = data(heads * len * d, 9);
            let first = |p: usize| window.map_or(0, |w| (p + 1).saturating_sub(w));
            let whole = run((&q, heads * d), &keys, &values, shape, first);
            let width = heads * d;
            for cut in 1..len {
                let head = run(
                    (&q[..cut * width], width),
                    &keys,
                    &values,
                    (heads, d, len, 0, cut),
                    first,
                );
                let tail = run(
                    (&q[cut * width..], width),
                    &keys,
                    &values,
                    (heads, d, len, cut, len - cut),
                    first,
                );
                let same =
                    |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same(&whole[..cut * width], &head),
                    "cut {cut} window {window:?}: head"
                );
                assert!(
                    same(&whole[cut * width..], &tail),
                    "cut {cut} window {window:?}: tail"
                );
            }
        }
    }
}
