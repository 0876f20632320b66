//! Each row's log-probabilities as a request reads them, computed where the logits are: the
//! log-distribution at one token (echo's scoring: the prompt's next token; a token chosen in
//! the step: that token) and its `top` largest values (OpenAI's `logprobs`), so that a scored
//! position costs the host 1 + 2·top floats instead of a vocabulary row (a contrast's: two)
//! and its log-softmax (a 512-token prompt of GPT-2's 50,257 tokens with `logprobs` 5: 22 KB
//! instead of 103 MB). The distribution is one head's log-softmax ([`logprob_rows`]) or a
//! contrast's over two heads ([`contrast_logprob_rows`]: autocontrast's log q, DoLa's
//! normalised logits).
//!
//! `choices.cu`'s `logprob_rows` and `contrast_logprob_rows` compute them on a GPU; the Rust
//! here is the CPU's version (the host's own `fastmath::log_softmax`,
//! `greedy::ContrastRule::log_distribution` and [`top_ids`], to the bit) and the oracle that
//! [`check`] holds the kernels to at start-up.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda_source::launch_op;
#[cfg(any(feature = "cuda-emulator", feature = "cuda"))]
use super::cuda_source::ChoiceKernel;
use super::fastmath;
use super::greedy::{self, contiguous, ContrastRule};

/// The most values a row's top may hold (OpenAI's chat API asks for at most 20).
pub const MAX_TOP: usize = 64;

/// One row's log-softmax as a request reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct RowLogprobs {
    /// At the row's target (NaN without one).
    pub target: f32,
    /// `(id, log-probability)` of the best, best first, as [`top_ids`] orders them (ties to
    /// the lower id; NaN above every number, -inf below).
    pub top: Vec<(u32, f32)>,
}

/// `logits` `(rows, vocab)` float32 and `targets` `(rows)` u32 (an id past the vocabulary:
/// none): `(rows, 1 + 2 top)` float32, each row's log-softmax at its target, then its `top`
/// largest values, then their ids (as floats, exact below 2^24; -1 past the vocabulary's
/// end). [`read_rows`] reads it back.
pub fn logprob_rows(logits: &Tensor, targets: &Tensor, top: usize) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if logits.dtype() != DType::F32
        || targets.dtype() != DType::U32
        || targets.dims() != [rows]
        || top > MAX_TOP
        || vocab == 0
        || vocab >= 1 << 24
    {
        candle_core::bail!(
            "logprob rows: a (rows, vocab) float32 matrix (0 < vocab < 2^24), (rows) u32 \
             targets, top <= {MAX_TOP}"
        );
    }
    logits
        .contiguous()?
        .apply_op2_no_bwd(&targets.contiguous()?, &LogprobRows { top })
}

/// `upper` and `lower` `(rows, vocab)` float32 and `params` `(rows, 4)` float32 (each row's
/// contrast rule, `greedy::ContrastRule::params`, and target, any value outside [0, vocab)
/// none: [`contrast_params`]): [`logprob_rows`]' output for each pair of rows' contrast
/// (`greedy::ContrastRule::log_distribution`: autocontrast's log q, the log-softmax of
/// DoLa's logits).
pub fn contrast_logprob_rows(
    upper: &Tensor,
    lower: &Tensor,
    params: &Tensor,
    top: usize,
) -> Result<Tensor> {
    let (rows, vocab) = upper.dims2()?;
    if upper.dtype() != DType::F32
        || lower.dtype() != DType::F32
        || params.dtype() != DType::F32
        || lower.dims() != [rows, vocab]
        || params.dims() != [rows, 4]
        || top > MAX_TOP
        || vocab == 0
        || vocab >= 1 << 24
    {
        candle_core::bail!(
            "contrast logprob rows: two (rows, vocab) float32 matrices (0 < vocab < 2^24), \
             (rows, 4) rules and targets, top <= {MAX_TOP}"
        );
    }
    upper.contiguous()?.apply_op3_no_bwd(
        &lower.contiguous()?,
        &params.contiguous()?,
        &ContrastLogprobRows { top },
    )
}

/// [`contrast_logprob_rows`]' params: each row's rule (`greedy::contrast_rules`) beside its
/// target from `targets` `(rows)` u32, where the rows are
/// (the choices made there, or ids the host knows; an id past the row: none, as floats exact
/// below 2^24).
pub fn contrast_params(rules: &[ContrastRule], targets: &Tensor) -> Result<Tensor> {
    let rules = greedy::contrast_rules(rules, targets.device())?;
    Tensor::cat(&[rules, targets.to_dtype(DType::F32)?.unsqueeze(1)?], 1)
}

/// The rows of [`logprob_rows`]' output, copied to the host as `flat`.
pub fn read_rows(flat: &[f32], top: usize) -> Vec<RowLogprobs> {
    flat.chunks_exact(1 + 2 * top)
        .map(|r| {
            let (values, ids) = r[1..].split_at(top);
            RowLogprobs {
                target: r[0],
                top: ids
                    .iter()
                    .zip(values)
                    .take_while(|(&id, _)| id >= 0.0)
                    .map(|(&id, &v)| (id as u32, v))
                    .collect(),
            }
        })
        .collect()
}

/// One row's [`RowLogprobs`] from its logits, as the host reads a copied row: its
/// `fastmath::log_softmax`, and [`top_ids`] of that.
pub fn row_logprobs(logits: &[f32], target: u32, top: usize) -> RowLogprobs {
    read(&fastmath::log_softmax(logits), target, top)
}

/// A pair of rows' [`RowLogprobs`] of their contrast, as the host reads copied rows: their
/// `greedy::ContrastRule::log_distribution`, and [`top_ids`] of that.
pub fn contrast_row_logprobs(
    upper: &[f32],
    lower: &[f32],
    rule: ContrastRule,
    target: u32,
    top: usize,
) -> RowLogprobs {
    read(&rule.log_distribution(upper, lower), target, top)
}

/// What is read of a log-distribution `lp`: its value at `target` and its `top` best.
fn read(lp: &[f32], target: u32, top: usize) -> RowLogprobs {
    RowLogprobs {
        target: lp.get(target as usize).copied().unwrap_or(f32::NAN),
        top: top_ids(lp, top)
            .into_iter()
            .map(|i| (i, lp[i as usize]))
            .collect(),
    }
}

/// `out` (1 + 2 top floats) holding `read`, as the kernels write a row.
fn write_row(read: RowLogprobs, top: usize, out: &mut [f32]) {
    out[0] = read.target;
    // past the vocabulary's end: NaN, id -1
    let (values, ids) = out[1..].split_at_mut(top);
    values.fill(f32::NAN);
    ids.fill(-1.0);
    for (k, (id, v)) in read.top.into_iter().enumerate() {
        (ids[k], values[k]) = (id as f32, v);
    }
}

/// The ids of the `k` best of `scores`, best first, ties to the lower id (by `total_cmp`).
/// One pass that keeps the best `k` seen so far in order: after the first few hundred
/// entries nearly every one loses its single comparison with the k-th, so a top-5 of a
/// 50,257-entry vocabulary costs a pass, not a selection over a list of all its ids. A
/// large `k` takes the selection.
pub fn top_ids(scores: &[f32], k: usize) -> Vec<u32> {
    let better = |a: &u32, b: &u32| {
        scores[*b as usize]
            .total_cmp(&scores[*a as usize])
            .then(a.cmp(b))
    };
    let k = k.min(scores.len());
    if k == 0 {
        return Vec::new();
    }
    if k > 64 {
        let mut ids: Vec<u32> = (0..scores.len() as u32).collect();
        ids.select_nth_unstable_by(k - 1, better);
        ids.truncate(k);
        ids.sort_by(better);
        return ids;
    }
    let mut best: Vec<u32> = Vec::with_capacity(k + 1);
    for (i, &s) in scores.iter().enumerate() {
        // a later id that only ties the k-th does not pass it
        if best.len() == k && s.total_cmp(&scores[best[k - 1] as usize]).is_le() {
            continue;
        }
        let i = i as u32;
        let at = best.partition_point(|b| better(b, &i).is_lt());
        best.insert(at, i);
        best.truncate(k);
    }
    best
}

/// How far the device's [`logprob_rows`] and [`contrast_logprob_rows`] are from the CPU's on
/// rows of `vocab` logits (spread as trained heads' are, with runs of tied values and -inf;
/// contrasts with plausible sets of one token, some, most and all, and candidate floors): the
/// largest difference of a value, and where the two tops name different ids, how far the
/// device's falls short under the CPU's distribution (infinite where their lengths differ, or
/// one gives a number where the other gives NaN). What a start-up check holds the kernels of
/// `device` to; zero on the CPU, whose kernels are [`row_logprobs`] and
/// [`contrast_row_logprobs`].
pub fn check(device: &Device, vocab: usize) -> Result<f32> {
    const ROWS: usize = 5;
    const TOP: usize = 20;
    let mut rand = super::uniform(0x2545_F491_4F6C_DD1Du64);
    let rows: Vec<Vec<f32>> = (0..ROWS)
        .map(|r| {
            let spread = 4.0 + 3.0 * r as f32;
            (0..vocab)
                .map(|i| {
                    let v = rand();
                    let x = spread * v * v * v;
                    match r {
                        // ties: values on a grid of eighths
                        1 | 3 => (x * 8.0).round() / 8.0,
                        2 if i % 7 == 0 => f32::NEG_INFINITY,
                        _ => x,
                    }
                })
                .collect()
        })
        .collect();
    let targets: Vec<u32> = (0..ROWS as u32)
        .map(|r| match r {
            0 => u32::MAX,               // none
            2 => 0,                      // -inf
            _ => (vocab as u32 - 1) / r, // somewhere in the row
        })
        .collect();
    let logits = Tensor::new(rows.concat(), device)?.reshape((ROWS, vocab))?;
    let targets_t = Tensor::new(targets.as_slice(), device)?;
    let got = logprob_rows(&logits, &targets_t, TOP)?;
    let got = read_rows(&got.flatten_all()?.to_vec1::<f32>()?, TOP);
    let mut worst = 0f32;
    // each against the CPU's read of the same distribution (`row_logprobs`,
    // `contrast_row_logprobs`), the distribution computed once
    for ((row, &target), got) in rows.iter().zip(&targets).zip(&got) {
        let lp = fastmath::log_softmax(row);
        worst = worst.max(shortfall(got, &read(&lp, target, TOP), &lp));
    }
    // contrasts: row r over row r + 1, autocontrast's (alpha, floor) and DoLa's relative
    // top, from one token's set to all
    let auto = |alpha: f32, k| ContrastRule::Autocontrast {
        ln_alpha: alpha.ln(),
        minimum_candidates: k,
    };
    let dola = |relative_top: f32| ContrastRule::Dola {
        ln_relative_top: relative_top.ln(),
    };
    let lower = logits.roll(-1, 0)?;
    for rules in [
        [
            auto(0.5, 1),
            auto(0.1, 1),
            auto(0.01, 40),
            auto(0.0, 1),
            auto(0.1, 3),
        ],
        [dola(0.5), dola(0.1), dola(0.01), dola(1.0), dola(1e-30)],
    ] {
        let params = contrast_params(&rules, &targets_t)?;
        let got = contrast_logprob_rows(&logits, &lower, &params, TOP)?;
        let got = read_rows(&got.flatten_all()?.to_vec1::<f32>()?, TOP);
        for (r, ((rule, &target), got)) in rules.iter().zip(&targets).zip(&got).enumerate() {
            let q = rule.log_distribution(&rows[r], &rows[(r + 1) % ROWS]);
            worst = worst.max(shortfall(got, &read(&q, target, TOP), &q));
        }
    }
    Ok(worst)
}

/// How far `got` is from `want`, both read of the log-distribution `lp` ([`check`]).
fn shortfall(got: &RowLogprobs, want: &RowLogprobs, lp: &[f32]) -> f32 {
    let apart = |a: f32, b: f32| match (a.is_nan(), b.is_nan()) {
        (true, true) => 0.0,
        (false, false) if a == b => 0.0, // -inf alike
        (false, false) => (a - b).abs(),
        _ => f32::INFINITY,
    };
    if got.top.len() != want.top.len() {
        return f32::INFINITY;
    }
    let mut worst = apart(got.target, want.target);
    for (&(gi, gv), &(wi, wv)) in got.top.iter().zip(&want.top) {
        worst = worst
            .max(apart(gv, wv))
            .max(apart(lp[gi as usize], lp[wi as usize]));
    }
    worst
}

struct LogprobRows {
    top: usize,
}

impl CustomOp2 for LogprobRows {
    fn name(&self) -> &'static str {
        "logprob rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        #[cfg(feature = "cuda-emulator")]
        if let Some(out) = super::cuda_emulator::instead(self, &[(s1, l1), (s2, l2)])? {
            return Ok(out);
        }
        let (rows, vocab) = l1.shape().dims2()?;
        let width = 1 + 2 * self.top;
        let (logits, targets) = (contiguous::<f32>(s1, l1)?, contiguous::<u32>(s2, l2)?);
        let mut out = vec![0f32; rows * width];
        out.par_chunks_mut(width)
            .zip(logits.par_chunks(vocab))
            .zip(targets)
            .for_each(|((o, row), &t)| write_row(row_logprobs(row, t, self.top), self.top, o));
        Ok((CpuStorage::F32(out), Shape::from((rows, width))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        launch_op(self, &[(s1, l1), (s2, l2)])
    }
}

#[cfg(any(feature = "cuda-emulator", feature = "cuda"))]
impl ChoiceKernel for LogprobRows {
    fn kernel(&self) -> &'static str {
        "logprob_rows"
    }

    fn output(&self) -> (DType, Option<usize>) {
        (DType::F32, Some(1 + 2 * self.top))
    }
}

struct ContrastLogprobRows {
    top: usize,
}

impl CustomOp3 for ContrastLogprobRows {
    fn name(&self) -> &'static str {
        "contrast logprob rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        #[cfg(feature = "cuda-emulator")]
        if let Some(out) = super::cuda_emulator::instead(self, &[(s1, l1), (s2, l2), (s3, l3)])? {
            return Ok(out);
        }
        let (rows, vocab) = l1.shape().dims2()?;
        let width = 1 + 2 * self.top;
        let (upper, lower, params) = (
            contiguous::<f32>(s1, l1)?,
            contiguous::<f32>(s2, l2)?,
            contiguous::<f32>(s3, l3)?,
        );
        let mut out = vec![0f32; rows * width];
        out.par_chunks_mut(width)
            .zip(upper.par_chunks(vocab))
            .zip(lower.par_chunks(vocab))
            .zip(params.par_chunks(4))
            .for_each(|(((o, u), l), p)| {
                // anything outside the row: no target
                let target = if (0.0..vocab as f32).contains(&p[3]) {
                    p[3] as u32
                } else {
                    u32::MAX
                };
                let rule = ContrastRule::from_params(&p[..3]);
                let read = contrast_row_logprobs(u, l, rule, target, self.top);
                write_row(read, self.top, o);
            });
        Ok((CpuStorage::F32(out), Shape::from((rows, width))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        launch_op(self, &[(s1, l1), (s2, l2), (s3, l3)])
    }
}

#[cfg(any(feature = "cuda-emulator", feature = "cuda"))]
impl ChoiceKernel for ContrastLogprobRows {
    fn kernel(&self) -> &'static str {
        "contrast_logprob_rows"
    }

    fn output(&self) -> (DType, Option<usize>) {
        (DType::F32, Some(1 + 2 * self.top))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_row_is_the_hosts_log_softmax_at_its_target_and_its_top() -> Result<()> {
        let mut rand = crate::kernels::uniform(0x9E37_79B9_7F4A_7C15u64);
        let vocab = 300;
        // spread rows, rows of ties, -inf, a NaN (which makes the whole row NaN)
        let rows: Vec<Vec<f32>> = (0..6)
            .map(|r| {
                (0..vocab)
                    .map(|i| {
                        let x = 8.0 * rand();
                        match r {
                            1 => (x * 2.0).round() / 2.0,
                            2 if i % 3 == 0 => f32::NEG_INFINITY,
                            3 => 1.0, // every value tied
                            4 if i == 17 => f32::NAN,
                            _ => x,
                        }
                    })
                    .collect()
            })
            .collect();
        let targets = [5u32, 0, 3, 299, 17, 300]; // 300: none
        let t = Tensor::new(rows.concat(), &Device::Cpu)?.reshape((6, vocab))?;
        for top in [0, 1, 5, 20] {
            let out = logprob_rows(&t, &Tensor::new(&targets, &Device::Cpu)?, top)?;
            assert_eq!(out.dims(), [6, 1 + 2 * top]);
            let got = read_rows(&out.flatten_all()?.to_vec1::<f32>()?, top);
            for (r, g) in got.iter().enumerate() {
                let lp = fastmath::log_softmax(&rows[r]);
                let want = lp.get(targets[r] as usize).copied().unwrap_or(f32::NAN);
                assert!(g.target.to_bits() == want.to_bits(), "row {r}: {g:?}");
                let ids: Vec<u32> = g.top.iter().map(|e| e.0).collect();
                assert_eq!(ids, top_ids(&lp, top), "row {r}, top {top}");
                for &(id, v) in &g.top {
                    assert_eq!(v.to_bits(), lp[id as usize].to_bits());
                }
                assert!(same(g, &row_logprobs(&rows[r], targets[r], top)), "row {r}");
            }
        }
        // every value tied: the lowest ids, in order
        let tied = row_logprobs(&rows[3], 0, 4);
        assert_eq!(
            tied.top.iter().map(|e| e.0).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        // a top past the vocabulary's end
        let small = Tensor::new(&[[0f32, 1.0, 2.0]], &Device::Cpu)?;
        let out = logprob_rows(&small, &Tensor::new(&[1u32], &Device::Cpu)?, 5)?;
        let got = read_rows(&out.flatten_all()?.to_vec1::<f32>()?, 5);
        assert_eq!(
            got[0].top.iter().map(|e| e.0).collect::<Vec<_>>(),
            [2, 1, 0]
        );
        // a view of some rows
        let view = logprob_rows(
            &t.narrow(0, 1, 2)?,
            &Tensor::new(&[7u32, 8], &Device::Cpu)?,
            3,
        )?;
        let got = read_rows(&view.flatten_all()?.to_vec1::<f32>()?, 3);
        assert_eq!(got[0], row_logprobs(&rows[1], 7, 3));
        assert_eq!(got[1], row_logprobs(&rows[2], 8, 3));
        Ok(())
    }

    /// Equal to the bit (NaN alike).
    fn same(a: &RowLogprobs, b: &RowLogprobs) -> bool {
        let bits = |r: &RowLogprobs| {
            let top: Vec<(u32, u32)> = r.top.iter().map(|&(i, v)| (i, v.to_bits())).collect();
            (r.target.to_bits(), top)
        };
        bits(a) == bits(b)
    }

    #[test]
    fn each_pair_of_rows_is_the_hosts_contrast_at_its_target_and_its_top() -> Result<()> {
        let dev = Device::Cpu;
        let mut rand = crate::kernels::uniform(0xD1B5_4A32_D192_ED03u64);
        let vocab = 257;
        let mut row = |spread: f32| -> Vec<f32> {
            (0..vocab)
                .map(|_| {
                    let v = rand();
                    spread * v * v * v
                })
                .collect()
        };
        let upper: Vec<Vec<f32>> = (0..5).map(|r| row(5.0 + 3.0 * r as f32)).collect();
        let lower: Vec<Vec<f32>> = (0..5).map(|_| row(6.0)).collect();
        let auto = |alpha: f32, k| ContrastRule::Autocontrast {
            ln_alpha: alpha.ln(),
            minimum_candidates: k,
        };
        // one token plausible, some, every one (alpha 0), a candidate floor of 9; DoLa's
        // logits normalised
        let params = [
            (auto(0.9, 1), 7u32),
            (auto(0.1, 1), 256),
            (auto(0.0, 1), 0),
            (auto(0.5, 9), u32::MAX), // none
            (
                ContrastRule::Dola {
                    ln_relative_top: 0.1f32.ln(),
                },
                3,
            ),
        ];
        let params_of = |p: &[(ContrastRule, u32)]| -> Result<Tensor> {
            let rules: Vec<ContrastRule> = p.iter().map(|e| e.0).collect();
            let targets: Vec<u32> = p.iter().map(|e| e.1).collect();
            contrast_params(&rules, &Tensor::new(targets, &dev)?)
        };
        let put = |m: &[Vec<f32>]| Tensor::new(m.concat(), &dev)?.reshape((5, vocab));
        let (u, l) = (put(&upper)?, put(&lower)?);
        for top in [0, 1, 5, 20] {
            let out = contrast_logprob_rows(&u, &l, &params_of(&params)?, top)?;
            let got = read_rows(&out.flatten_all()?.to_vec1::<f32>()?, top);
            for (r, &(rule, target)) in params.iter().enumerate() {
                let q = match rule {
                    ContrastRule::Autocontrast {
                        ln_alpha,
                        minimum_candidates,
                    } => greedy::contrast_log_q(&upper[r], &lower[r], ln_alpha, minimum_candidates),
                    ContrastRule::Dola { ln_relative_top } => fastmath::log_softmax(
                        &greedy::dola_scores(&upper[r], &lower[r], ln_relative_top),
                    ),
                };
                let want = q.get(target as usize).copied().unwrap_or(f32::NAN);
                assert_eq!(got[r].target.to_bits(), want.to_bits(), "row {r}");
                let ids: Vec<u32> = got[r].top.iter().map(|e| e.0).collect();
                assert_eq!(ids, top_ids(&q, top), "row {r}, top {top}");
                let want = contrast_row_logprobs(&upper[r], &lower[r], rule, target, top);
                assert!(same(&got[r], &want), "row {r}");
            }
        }
        // a view of the last two pairs
        let two = contrast_logprob_rows(
            &u.narrow(0, 3, 2)?,
            &l.narrow(0, 3, 2)?,
            &params_of(&params[3..])?,
            3,
        )?;
        let got = read_rows(&two.flatten_all()?.to_vec1::<f32>()?, 3);
        for (k, &(rule, target)) in params[3..].iter().enumerate() {
            let want = contrast_row_logprobs(&upper[3 + k], &lower[3 + k], rule, target, 3);
            assert!(same(&got[k], &want));
        }
        let p = params_of(&params)?;
        assert!(contrast_logprob_rows(&u, &l.narrow(0, 0, 3)?, &p, 3).is_err());
        assert!(contrast_logprob_rows(&u, &l, &p.narrow(1, 0, 3)?, 3).is_err());
        assert!(contrast_logprob_rows(&u, &l, &p, MAX_TOP + 1).is_err());
        Ok(())
    }

    #[test]
    fn a_smaller_top_is_a_prefix_of_a_larger_one() {
        // what lets one copy serve requests asking for different numbers of alternatives
        let mut rand = crate::kernels::uniform(7);
        let row: Vec<f32> = (0..1000).map(|_| (rand() * 16.0).round()).collect();
        let all = top_ids(&row, MAX_TOP);
        for k in 0..=MAX_TOP {
            assert_eq!(top_ids(&row, k), all[..k]);
        }
    }

    #[test]
    fn misshapen_operands_are_refused_and_the_cpu_checks_itself_exact() -> Result<()> {
        let dev = Device::Cpu;
        let t = Tensor::zeros((2, 4), DType::F32, &dev)?;
        let targets = Tensor::new(&[0u32, 1], &dev)?;
        assert!(logprob_rows(&t, &targets, 2).is_ok());
        assert!(logprob_rows(&t, &Tensor::new(&[0u32], &dev)?, 2).is_err());
        assert!(logprob_rows(&t, &targets.to_dtype(DType::F32)?, 2).is_err());
        assert!(logprob_rows(&t.to_dtype(DType::BF16)?, &targets, 2).is_err());
        assert!(logprob_rows(&t, &targets, MAX_TOP + 1).is_err());
        assert!(logprob_rows(&Tensor::zeros((2, 0), DType::F32, &dev)?, &targets, 2).is_err());
        assert_eq!(check(&dev, 5000)?, 0.0);
        Ok(())
    }

    #[test]
    fn top_ids_are_the_selections_best_first_ties_to_the_lower_id() {
        // what a full selection and sort give, on rows with many ties, -inf and NaN
        let by_selection = |scores: &[f32], k: usize| {
            let mut ids: Vec<u32> = (0..scores.len() as u32).collect();
            ids.sort_by(|a, b| {
                scores[*b as usize]
                    .total_cmp(&scores[*a as usize])
                    .then(a.cmp(b))
            });
            ids.truncate(k);
            ids
        };
        let mut state = 12345u64;
        for n in [1usize, 7, 300, 5000] {
            let scores: Vec<f32> = (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    match state >> 60 {
                        0 => f32::NEG_INFINITY,
                        1 if n > 7 => f32::NAN,
                        _ => ((state >> 33) % 50) as f32 / 7.0, // many ties
                    }
                })
                .collect();
            for k in [0, 1, 5, 20, 64, 65, 200] {
                assert_eq!(
                    top_ids(&scores, k),
                    by_selection(&scores, k),
                    "n {n}, k {k}"
                );
            }
        }
        // ascending scores: every entry enters the kept list
        let up: Vec<f32> = (0..100).map(|i| i as f32).collect();
        assert_eq!(top_ids(&up, 3), vec![99, 98, 97]);
    }
}
