//! Drawing a token from a log-distribution: temperature, top-k, top-p and one uniform number
//! ([`Draw`]). The host's sampler (`engine::sampling`) draws with [`draw`] from the scores its
//! edits (bias, penalties, grammar) leave; a step draws where the logits are, for a sequence
//! that reads nothing else of them, from one head's log-softmax ([`sample_rows`]) or a
//! contrast's scores ([`contrast_sample_rows`]), so that one index travels instead of
//! vocabulary rows (16 sampled streams of a 50,257-token vocabulary: 64 bytes a step instead
//! of 3.2 MB, and no pass over the vocabulary on the host).
//!
//! What a draw picks, given the scores: the candidates are the finite scores, restricted to
//! the `top_k` best (best first, ties to the lower id) and then to the nucleus, the smallest
//! best-first set whose weight reaches `top_p` of theirs, each weighing
//! e^((score - max) / temperature); the pick is the candidate at `u` of their cumulative
//! weight in id order. `choices.cu` computes the same on a GPU (its sums in another order, so
//! a `u` within rounding of a boundary may fall on the neighbour); the Rust here is the CPU's
//! version and the oracle [`check`] holds those kernels to.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda_source::launch_op;
#[cfg(any(feature = "cuda-emulator", feature = "cuda"))]
use super::cuda_source::ChoiceKernel;
use super::fastmath::{self, exp_neg};
use super::greedy::{argmax, contiguous, ContrastRule};

/// One draw's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    /// > 0 (0 is greedy: the argmax).
    pub temperature: f32,
    /// 0: no restriction.
    pub top_k: usize,
    /// >= 1: no restriction.
    pub top_p: f32,
    /// The draw's uniform number, in [0, 1).
    pub u: f64,
}

impl Draw {
    /// Whether neither top-k nor top-p restricts a draw from `n` scores.
    fn unrestricted(&self, n: usize) -> bool {
        (self.top_k == 0 || self.top_k >= n) && self.top_p >= 1.0
    }

    /// The four numbers a row of [`sample_rows`]' parameters holds.
    fn params(&self) -> [f64; 4] {
        [
            self.temperature as f64,
            self.top_k.min(u32::MAX as usize) as f64,
            self.top_p as f64,
            self.u,
        ]
    }

    fn from_params(p: &[f64]) -> Self {
        Self {
            temperature: p[0] as f32,
            top_k: p[1] as usize,
            top_p: p[2] as f32,
            u: p[3],
        }
    }
}

/// The token `d` draws from `scores` (a log-distribution, or logits: only differences count).
pub fn draw(scores: &[f32], d: &Draw) -> u32 {
    if d.temperature == 0.0 {
        return argmax(scores);
    }
    if d.unrestricted(scores.len()) {
        if let Some(t) = pick_from_softmax(scores, d.temperature, d.u) {
            return t;
        }
    }
    candidates(scores, d).pick(d.u)
}

/// `logits` `(rows, vocab)` float32 and `params` `(rows, 4)` float64, each row's
/// `[temperature, top_k, top_p, u]` of a [`Draw`]: `(rows)` u32, each row's draw from its
/// logits' log-softmax (the host's scores of a head's distribution).
pub fn sample_rows(logits: &Tensor, params: &Tensor) -> Result<Tensor> {
    let (rows, _) = logits.dims2()?;
    if logits.dtype() != DType::F32 || params.dtype() != DType::F64 || params.dims() != [rows, 4] {
        candle_core::bail!("sample rows: (rows, vocab) float32 logits and (rows, 4) float64");
    }
    logits
        .contiguous()?
        .apply_op2_no_bwd(&params.contiguous()?, &SampleRows)
}

/// [`sample_rows`]' parameters for `draws`, on `device`.
pub fn draw_params(draws: &[Draw], device: &Device) -> Result<Tensor> {
    let flat: Vec<f64> = draws.iter().flat_map(|d| d.params()).collect();
    Tensor::new(flat, device)?.reshape((draws.len(), 4))
}

/// `upper` and `lower` `(rows, vocab)` float32 and `params` `(rows, 7)` float64, each row's
/// [`Draw`] then its contrast's rule (`greedy::ContrastRule::params`): `(rows)` u32, each
/// row's draw from the contrast's scores (`greedy::ContrastRule::scores`: autocontrast's log
/// q, DoLa's logits).
pub fn contrast_sample_rows(upper: &Tensor, lower: &Tensor, params: &Tensor) -> Result<Tensor> {
    let (rows, vocab) = upper.dims2()?;
    if upper.dtype() != DType::F32
        || lower.dtype() != DType::F32
        || params.dtype() != DType::F64
        || lower.dims() != [rows, vocab]
        || params.dims() != [rows, 7]
    {
        candle_core::bail!(
            "contrast sample rows: two (rows, vocab) float32 matrices and (rows, 7) float64"
        );
    }
    upper.contiguous()?.apply_op3_no_bwd(
        &lower.contiguous()?,
        &params.contiguous()?,
        &ContrastSampleRows,
    )
}

/// [`contrast_sample_rows`]' parameters for `(draw, rule)` pairs, on `device`.
pub fn contrast_draw_params(draws: &[(Draw, ContrastRule)], device: &Device) -> Result<Tensor> {
    let flat: Vec<f64> = draws
        .iter()
        .flat_map(|(d, rule)| {
            let [t, top_k, top_p, u] = d.params();
            let [a, k, kind] = rule.params().map(f64::from);
            [t, top_k, top_p, u, a, k, kind]
        })
        .collect();
    Tensor::new(flat, device)?.reshape((draws.len(), 7))
}

/// The draw [`contrast_sample_rows`] makes from one pair of rows.
pub fn draw_from_contrast(upper: &[f32], lower: &[f32], rule: ContrastRule, d: &Draw) -> u32 {
    draw(&rule.scores(upper, lower), d)
}

/// The draw [`sample_rows`] makes from one row of logits: [`draw`] from its log-softmax.
pub fn draw_from_logits(logits: &[f32], d: &Draw) -> u32 {
    draw(&fastmath::log_softmax(logits), d)
}

/// How far the device's draws fall from the CPU's on made-up rows of `vocab` logits, from
/// one head's rows ([`sample_rows`]) and from contrasts of two ([`contrast_sample_rows`]): for
/// each draw, the distance of its `u` from the CPU's cumulative interval of the token the
/// device picked (0 where it picked the CPU's token; infinite for a token outside the CPU's
/// candidates). Zero on the CPU, whose kernels are [`draw_from_logits`] and
/// [`draw_from_contrast`].
pub fn check(device: &Device, vocab: usize) -> Result<f32> {
    let mut rand = super::uniform(0xD1B5_4A32_D192_ED03);
    // (temperature, top_k, top_p): none, each and both restrictions, top_k 1, k past the
    // vocabulary
    let settings = [
        (1.0f32, 0usize, 1.0f32),
        (0.7, 0, 0.9),
        (1.3, 40, 1.0),
        (0.8, 50, 0.95),
        (1.0, 1, 1.0),
        (0.5, 0, 0.3),
        (2.0, 7, 0.5),
        (1.0, vocab + 5, 0.999),
    ];
    // Spread as trained heads' logits (a few tokens well ahead, a long flat tail), rounded
    // to a coarse grid so that ties fall on the top-k and nucleus boundaries.
    let rows: Vec<Vec<f32>> = (0..settings.len())
        .map(|r| {
            let spread = 4.0 + 2.0 * r as f32;
            (0..vocab)
                .map(|_| {
                    let v = rand();
                    (spread * v * v * v * 64.0).round() / 64.0
                })
                .collect()
        })
        .collect();
    let draws: Vec<Draw> = settings
        .iter()
        .map(|&(temperature, top_k, top_p)| Draw {
            temperature,
            top_k,
            top_p,
            u: rand() as f64,
        })
        .collect();
    // each row contrasted over the next, with these rules: autocontrast's (alpha, candidate
    // floor), DoLa's relative top
    let auto = |alpha: f32, k| ContrastRule::Autocontrast {
        ln_alpha: alpha.ln(),
        minimum_candidates: k,
    };
    let dola = |relative_top: f32| ContrastRule::Dola {
        ln_relative_top: relative_top.ln(),
    };
    let rules: Vec<ContrastRule> = [
        auto(0.1, 1),
        dola(0.1),
        auto(0.5, 1),
        auto(0.0, 1),
        dola(0.01),
        auto(0.1, 30),
        auto(1.0, 5),
    ]
    .into_iter()
    .cycle()
    .take(rows.len())
    .collect();
    let n = rows.len();
    let put = |m: &[Vec<f32>]| Tensor::new(m.concat(), device)?.reshape((n, vocab));
    let lower_rows: Vec<Vec<f32>> = (0..n).map(|r| rows[(r + 1) % n].clone()).collect();
    let (upper, lower) = (put(&rows)?, put(&lower_rows)?);
    let heads = sample_rows(&upper, &draw_params(&draws, device)?)?.to_vec1::<u32>()?;
    let contrast_params: Vec<(Draw, ContrastRule)> =
        draws.iter().copied().zip(rules.iter().copied()).collect();
    let contrasts = contrast_sample_rows(
        &upper,
        &lower,
        &contrast_draw_params(&contrast_params, device)?,
    )?
    .to_vec1::<u32>()?;
    let mut worst = 0f32;
    for r in 0..n {
        let (u, l, d) = (&rows[r], &lower_rows[r], &draws[r]);
        worst = worst
            .max(distance(&fastmath::log_softmax(u), d, heads[r]))
            .max(distance(&rules[r].scores(u, l), d, contrasts[r]));
    }
    Ok(worst)
}

/// How far `d.u` lies from the CPU's cumulative interval of `picked` among the candidates of
/// a draw from `scores`, as a share of their weight (infinite for a token not among them).
fn distance(scores: &[f32], d: &Draw, picked: u32) -> f32 {
    let c = candidates(scores, d);
    let total: f64 = c.weights.iter().sum();
    let Some(at) = c.ids.iter().position(|&i| i == picked) else {
        return f32::INFINITY;
    };
    let lo = c.weights[..at].iter().sum::<f64>() / total;
    let hi = lo + c.weights[at] / total;
    (lo - d.u).max(d.u - hi).max(0.0) as f32
}

/// Token ids and their unnormalised weights, in id order.
#[derive(Debug, Clone, PartialEq)]
struct Candidates {
    ids: Vec<u32>,
    weights: Vec<f64>,
}

impl Candidates {
    /// The token at `u` (in [0, 1)) of the cumulative weight, in id order.
    fn pick(&self, u: f64) -> u32 {
        pick_cumulative(u, &self.weights).map_or(self.ids[self.ids.len() - 1], |i| self.ids[i])
    }
}

/// The candidates of a draw from `scores`: the finite ones, restricted to the top-k and then
/// to the nucleus, weighing e^((score - max) / temperature). Both restrictions are partial
/// selections (expected O(vocab)) over the candidates' own values, never a sort of the whole
/// vocabulary. Nothing finite: the first maximum alone, as greedy.
fn candidates(scores: &[f32], d: &Draw) -> Candidates {
    let mut cands: Vec<Cand> = scores
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_finite())
        .map(|(i, &score)| Cand {
            score,
            weight: 0.0,
            id: i as u32,
        })
        .collect();
    if cands.is_empty() {
        return Candidates {
            ids: vec![argmax(scores)],
            weights: vec![1.0],
        };
    }
    let restricted = d.top_k > 0 && d.top_k < cands.len();
    if restricted {
        cands.select_nth_unstable_by(d.top_k - 1, Cand::better);
        cands.truncate(d.top_k);
    }
    // the best finite score is among the top-k: every weight is relative to it
    let max = cands
        .iter()
        .map(|c| c.score)
        .fold(f32::NEG_INFINITY, f32::max);
    for c in &mut cands {
        c.weight = exp_neg((c.score - max) / d.temperature);
    }
    if d.top_p < 1.0 {
        let total: f64 = cands.iter().map(|c| c.weight as f64).sum();
        let keep = nucleus(&mut cands, total * d.top_p as f64);
        cands.truncate(keep);
    }
    if restricted || d.top_p < 1.0 {
        into_id_order(&mut cands, scores.len()); // the selections reordered them
    }
    Candidates {
        ids: cands.iter().map(|c| c.id).collect(),
        weights: cands.iter().map(|c| c.weight as f64).collect(),
    }
}

/// A candidate token: its score, its weight, its id.
#[derive(Clone, Copy)]
struct Cand {
    score: f32,
    weight: f32,
    id: u32,
}

impl Cand {
    /// Best first; ties to the lower id, so the chosen sets are deterministic.
    fn better(a: &Cand, b: &Cand) -> std::cmp::Ordering {
        b.score.total_cmp(&a.score).then(a.id.cmp(&b.id))
    }
}

/// `cands` (of distinct ids below `n`) in id order: a sort when they are few, else a pass
/// over all `n` ids (a nucleus may hold most of the vocabulary).
fn into_id_order(cands: &mut Vec<Cand>, n: usize) {
    if cands.len() * 16 < n {
        cands.sort_unstable_by_key(|c| c.id);
        return;
    }
    let mut at: Vec<Option<Cand>> = vec![None; n];
    for &c in cands.iter() {
        at[c.id as usize] = Some(c);
    }
    cands.clear();
    cands.extend(at.into_iter().flatten());
}

/// Weights a block of the cumulative scan sums (in `LANES` interleaved partial sums).
const BLOCK: usize = 64;
const LANES: usize = 8;

/// The position at `u` (in [0, 1)) of the cumulative weight of `weights`, in their order;
/// none when rounding left it at or past the total. The one scan of every draw, so that both
/// ways of computing the weights pick alike. The sums go by blocks of `BLOCK`, each in
/// `LANES` partial sums, so that the whole-vocabulary total and the walk to the block that
/// holds `u` are vector work; only within that block is the scan one weight at a time.
fn pick_cumulative<W: Copy + Into<f64>>(u: f64, weights: &[W]) -> Option<usize> {
    let sums: Vec<f64> = weights
        .chunks(BLOCK)
        .map(|block| {
            let mut lanes = [0f64; LANES];
            for group in block.chunks(LANES) {
                for (l, &w) in lanes.iter_mut().zip(group) {
                    *l += w.into();
                }
            }
            lanes.iter().sum()
        })
        .collect();
    let mut r = u * sums.iter().sum::<f64>();
    for (b, &sum) in sums.iter().enumerate() {
        if r >= sum {
            r -= sum;
            continue;
        }
        let block = &weights[b * BLOCK..((b + 1) * BLOCK).min(weights.len())];
        for (i, &w) in block.iter().enumerate() {
            let w: f64 = w.into();
            if r < w {
                return Some(b * BLOCK + i);
            }
            r -= w;
        }
        // the block's lane sums rounded above its one-by-one scan: its last weighted entry
        return block
            .iter()
            .rposition(|&w| w.into() > 0.0)
            .map(|i| b * BLOCK + i);
    }
    None
}

/// What `candidates(scores, d).pick(u)` gives when neither top-k nor top-p restricts the
/// draw and every score is finite, bit for bit (the same weights, summed and scanned in the
/// same order), without its candidate list or its f64 weights: the whole vocabulary's weights
/// in one vectorised pass, the common case of every sampled step. None where a score is not
/// finite (masked tokens: the general path, whose candidates are the finite ones).
fn pick_from_softmax(scores: &[f32], temperature: f32, u: f64) -> Option<u32> {
    if scores.is_empty() || scores.iter().filter(|s| !s.is_finite()).count() > 0 {
        return None;
    }
    let max = fastmath::max(scores);
    let mut weights = vec![0f32; scores.len()];
    fastmath::temperature_weights(scores, max, temperature, &mut weights);
    let i = pick_cumulative(u, &weights).unwrap_or(scores.len() - 1);
    Some(i as u32)
}

/// Reorders `cands` so that its first `m` entries are the smallest best-first set whose
/// weight reaches `target`, and returns `m` (at least 1). Quickselect on the cumulative
/// weight: each round partitions around a middle element and keeps only the side that holds
/// the boundary, so the work is O(len) on average.
fn nucleus(cands: &mut [Cand], target: f64) -> usize {
    let weight = |c: &[Cand]| c.iter().map(|c| c.weight as f64).sum::<f64>();
    let (mut lo, mut hi, mut need) = (0, cands.len(), target);
    while hi - lo > 32 {
        let mid = lo + (hi - lo) / 2;
        cands[lo..hi].select_nth_unstable_by(mid - lo, Cand::better);
        let upper = weight(&cands[lo..=mid]);
        if upper >= need {
            hi = mid + 1;
        } else {
            need -= upper;
            lo = mid + 1;
        }
    }
    cands[lo..hi].sort_unstable_by(Cand::better);
    let mut acc = 0.0;
    for (k, c) in cands[lo..hi].iter().enumerate() {
        acc += c.weight as f64;
        if acc >= need {
            return lo + k + 1;
        }
    }
    hi.max(1)
}

struct SampleRows;

impl CustomOp2 for SampleRows {
    fn name(&self) -> &'static str {
        "sample rows"
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
        let (logits, params) = (contiguous::<f32>(s1, l1)?, contiguous::<f64>(s2, l2)?);
        let out: Vec<u32> = if vocab == 0 {
            vec![0; rows]
        } else {
            (logits.par_chunks(vocab), params.par_chunks(4))
                .into_par_iter()
                .map(|(row, p)| draw_from_logits(row, &Draw::from_params(p)))
                .collect()
        };
        Ok((CpuStorage::U32(out), Shape::from(rows)))
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
impl ChoiceKernel for SampleRows {
    fn kernel(&self) -> &'static str {
        "sample_rows"
    }

    fn output(&self) -> (DType, Option<usize>) {
        (DType::U32, None)
    }
}

struct ContrastSampleRows;

impl CustomOp3 for ContrastSampleRows {
    fn name(&self) -> &'static str {
        "contrast sample rows"
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
        let (upper, lower) = (contiguous::<f32>(s1, l1)?, contiguous::<f32>(s2, l2)?);
        let params = contiguous::<f64>(s3, l3)?;
        let out: Vec<u32> = if vocab == 0 {
            vec![0; rows]
        } else {
            (
                upper.par_chunks(vocab),
                lower.par_chunks(vocab),
                params.par_chunks(7),
            )
                .into_par_iter()
                .map(|(u, l, p)| {
                    let rule = ContrastRule::from_params(&[p[4] as f32, p[5] as f32, p[6] as f32]);
                    draw_from_contrast(u, l, rule, &Draw::from_params(p))
                })
                .collect()
        };
        Ok((CpuStorage::U32(out), Shape::from(rows)))
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
impl ChoiceKernel for ContrastSampleRows {
    fn kernel(&self) -> &'static str {
        "contrast_sample_rows"
    }

    fn output(&self) -> (DType, Option<usize>) {
        (DType::U32, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::greedy;

    fn plain(temperature: f32, u: f64) -> Draw {
        Draw {
            temperature,
            top_k: 0,
            top_p: 1.0,
            u,
        }
    }

    #[test]
    fn the_whole_vocabulary_draw_is_the_general_one_bit_for_bit() {
        // scores over a vocabulary-sized row; the draw at many points of [0, 1), the ends
        // included, at several temperatures
        let mut scores: Vec<f32> = (0..50_257u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) % 20_000) as f32 / -1000.0)
            .collect();
        scores[123] = 3.5;
        for temperature in [0.3f32, 0.7, 1.0, 1.9] {
            let c = candidates(&scores, &plain(temperature, 0.0));
            for k in 0..=400 {
                let u = (k as f64 / 400.0).min(1.0 - f64::EPSILON);
                assert_eq!(
                    pick_from_softmax(&scores, temperature, u),
                    Some(c.pick(u)),
                    "temperature {temperature}, u {u}"
                );
            }
        }
        // a masked (-inf) or NaN score: the general path's, whose candidates are the finite
        for bad in [f32::NEG_INFINITY, f32::NAN] {
            let mut masked = scores.clone();
            masked[17] = bad;
            assert_eq!(pick_from_softmax(&masked, 1.0, 0.5), None);
            let t = draw(&masked, &plain(1.0, 0.3));
            assert!(t != 17 && (t as usize) < masked.len());
        }
        // nothing finite: the first maximum, as greedy
        let none = [f32::NEG_INFINITY, f32::NAN];
        assert_eq!(draw(&none, &plain(1.0, 0.5)), argmax(&none));
    }

    #[test]
    fn the_cumulative_scan_walks_blocks_then_weights() {
        // 200 weights (four blocks, the last partial): every boundary lands where the running
        // sum says, zero weights are never picked, and rounding past the end gives none
        let mut w: Vec<f64> = (0..200).map(|i| (i % 7) as f64).collect();
        w[130] = 0.0;
        let total: f64 = w.iter().sum();
        let mut acc = 0.0;
        for (i, &x) in w.iter().enumerate() {
            if x > 0.0 {
                let mid = (acc + x / 2.0) / total;
                assert_eq!(pick_cumulative(mid, &w), Some(i), "weight {i}");
            }
            acc += x;
        }
        assert_eq!(pick_cumulative(0.0, &w), Some(1), "the first weighted one");
        assert_eq!(pick_cumulative(1.0, &w), None);
        assert_eq!(pick_cumulative(0.5, &[0f32; 10]), None);
        assert_eq!(pick_cumulative::<f64>(0.5, &[]), None);
    }

    #[test]
    fn nucleus_is_the_smallest_best_first_set_reaching_the_mass() {
        // weights 1..=200 in shuffled order, the heavier the better; the nucleus of the top
        // mass is a suffix of 1..=200
        let mut cands: Vec<Cand> = (0..200)
            .map(|i| {
                let id = (i * 73) % 200;
                Cand {
                    score: id as f32,
                    weight: (id + 1) as f32,
                    id,
                }
            })
            .collect();
        let total: f64 = (1..=200).map(f64::from).sum();
        for frac in [0.01, 0.3, 0.5, 0.9, 0.999, 1.0] {
            let target = total * frac;
            let m = nucleus(&mut cands, target);
            // by hand: take the heaviest until the mass reaches the target
            let (mut acc, mut want) = (0.0, 0);
            for w in (1..=200).rev() {
                acc += w as f64;
                want += 1;
                if acc >= target {
                    break;
                }
            }
            assert_eq!(m, want, "{frac}");
            let mut kept: Vec<u32> = cands[..m].iter().map(|c| c.id).collect();
            kept.sort_unstable();
            assert_eq!(kept, (200 - m as u32..200).collect::<Vec<_>>(), "{frac}");
        }
    }

    /// The candidates as the definition states them, by a full sort: best first (ties to the
    /// lower id), the first `top_k`, then the shortest prefix reaching `top_p` of their
    /// weight, in id order.
    fn candidates_by_sorting(scores: &[f32], d: &Draw) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..scores.len() as u32)
            .filter(|&i| scores[i as usize].is_finite())
            .collect();
        ids.sort_by(|&a, &b| {
            scores[b as usize]
                .total_cmp(&scores[a as usize])
                .then(a.cmp(&b))
        });
        if d.top_k > 0 {
            ids.truncate(d.top_k);
        }
        let max = scores[ids[0] as usize];
        let w = |i: u32| ((scores[i as usize] - max) as f64 / d.temperature as f64).exp();
        if d.top_p < 1.0 {
            let total: f64 = ids.iter().map(|&i| w(i)).sum();
            let mut acc = 0.0;
            let keep = ids
                .iter()
                .position(|&i| {
                    acc += w(i);
                    acc >= total * d.top_p as f64
                })
                .map_or(ids.len(), |k| k + 1);
            ids.truncate(keep);
        }
        ids.sort_unstable();
        ids
    }

    #[test]
    fn candidates_are_the_top_k_then_the_nucleus_in_id_order() {
        let mut rand = super::super::uniform(0x853C_49E6_748F_EA9B);
        // coarse values: many ties at every boundary
        let scores: Vec<f32> = (0..3000)
            .map(|_| (rand() * 40.0).round() / 4.0 - 10.0)
            .collect();
        for (top_k, top_p) in [
            (0, 0.9f32),
            (40, 1.0),
            (40, 0.5),
            (1, 1.0),
            (0, 0.01),
            (2999, 0.999),
        ] {
            let d = Draw {
                temperature: 0.8,
                top_k,
                top_p,
                u: 0.5,
            };
            let c = candidates(&scores, &d);
            assert_eq!(c.ids, candidates_by_sorting(&scores, &d), "{top_k} {top_p}");
            assert!(c.ids.windows(2).all(|w| w[0] < w[1]));
            // the pick walks them in id order: u just above the first's share takes the second
            let total: f64 = c.weights.iter().sum();
            if c.ids.len() > 1 {
                assert_eq!(c.pick(0.0), c.ids[0]);
                let after_first = (c.weights[0] / total) * (1.0 + 1e-9);
                assert_eq!(c.pick(after_first), c.ids[1], "{top_k} {top_p}");
            }
        }
    }

    #[test]
    fn a_step_draws_as_the_host_does_from_the_rows_log_softmax() -> Result<()> {
        let mut rand = super::super::uniform(0x9E37_79B9_7F4A_7C15);
        let (rows, vocab) = (6, 2001);
        let logits: Vec<Vec<f32>> = (0..rows)
            .map(|r| (0..vocab).map(|_| rand() * (2.0 + r as f32)).collect())
            .collect();
        let draws: Vec<Draw> = (0..rows)
            .map(|r| Draw {
                temperature: [1.0, 0.7, 1.5, 0.3, 1.0, 2.0][r],
                top_k: [0, 0, 50, 5, 1, 0][r],
                top_p: [1.0, 0.9, 1.0, 0.8, 1.0, 0.4][r],
                u: rand() as f64,
            })
            .collect();
        // a view: every row of a wider matrix but its first
        let padded = [vec![vec![0.5; vocab]], logits.clone()].concat();
        let t = Tensor::new(padded.concat(), &Device::Cpu)?
            .reshape((rows + 1, vocab))?
            .narrow(0, 1, rows)?;
        let got = sample_rows(&t, &draw_params(&draws, &Device::Cpu)?)?.to_vec1::<u32>()?;
        for r in 0..rows {
            let want = draw(&fastmath::log_softmax(&logits[r]), &draws[r]);
            assert_eq!(got[r], want, "row {r}");
        }
        assert_eq!(got[4], argmax(&logits[4]), "top_k 1 is greedy");
        // contrasts of each row over the next: the host's draw from the contrast's scores
        let lower = Tensor::cat(&[t.narrow(0, 1, rows - 1)?, t.narrow(0, 0, 1)?], 0)?;
        let rules = [
            ContrastRule::Autocontrast {
                ln_alpha: 0.1f32.ln(),
                minimum_candidates: 1,
            },
            ContrastRule::Autocontrast {
                ln_alpha: 0.5f32.ln(),
                minimum_candidates: 4,
            },
            ContrastRule::Dola {
                ln_relative_top: 0.05f32.ln(),
            },
        ];
        let params: Vec<(Draw, ContrastRule)> = draws
            .iter()
            .enumerate()
            .map(|(r, &d)| (d, rules[r % 3]))
            .collect();
        let got = contrast_sample_rows(&t, &lower, &contrast_draw_params(&params, &Device::Cpu)?)?
            .to_vec1::<u32>()?;
        for r in 0..rows {
            let l = &logits[(r + 1) % rows];
            let scores = match rules[r % 3] {
                ContrastRule::Autocontrast {
                    ln_alpha,
                    minimum_candidates,
                } => greedy::contrast_log_q(&logits[r], l, ln_alpha, minimum_candidates),
                ContrastRule::Dola { ln_relative_top } => {
                    greedy::dola_scores(&logits[r], l, ln_relative_top)
                }
            };
            let want = draw(&scores, &draws[r]);
            assert_eq!(got[r], want, "contrast row {r}");
        }
        // misshapen operands are refused
        let p = draw_params(&draws, &Device::Cpu)?;
        assert!(sample_rows(&t, &p.narrow(0, 0, 2)?).is_err());
        assert!(sample_rows(&t, &p.to_dtype(DType::F32)?).is_err());
        // the start-up check on the CPU: its kernel is these functions
        assert_eq!(check(&Device::Cpu, 1000)?, 0.0);
        Ok(())
    }
}
