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

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda_source::launch_op;
#[cfg(any(feature = "cuda-emulator", feature = "cuda"))]
use super::cuda_source::ChoiceKernel;
use super::fastmath;
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
    SCRATCH.with_borrow_mut(|scratch| draw_in(scores, d, &mut scratch.weights, &mut scratch.bins))
}

/// [`draw`] with the buffers it writes.
fn draw_in(scores: &[f32], d: &Draw, weights: &mut Vec<f32>, bins: &mut Vec<u16>) -> u32 {
    if d.temperature == 0.0 || !kept_weights(scores, d, weights, bins) {
        return argmax(scores);
    }
    // rounding past the total: the last weighted candidate (the best score weighs 1, so
    // there is one)
    pick_cumulative(d.u, weights)
        .or_else(|| weights.iter().rposition(|&w| w > 0.0))
        .unwrap_or(0) as u32
}

/// A thread's vocabulary-sized buffers for its draws (10 bytes a token: 0.5 MB for 50,257),
/// kept from one draw to the next: allocated afresh, their pages were faulted in again at
/// every draw.
#[derive(Default)]
struct Scratch {
    log_softmax: Vec<f32>,
    weights: Vec<f32>,
    bins: Vec<u16>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
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
    SCRATCH.with_borrow_mut(|scratch| {
        let Scratch {
            log_softmax,
            weights,
            bins,
        } = scratch;
        log_softmax.resize(logits.len(), 0.0);
        fastmath::sub_into(logits, fastmath::log_sum_exp(logits).1, log_softmax);
        draw_in(log_softmax, d, weights, bins)
    })
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

/// Token ids and their unnormalised weights, in id order: the candidates of a draw whose
/// weight is not 0 (an underflowed weight is never picked).
#[derive(Debug, Clone, PartialEq)]
struct Candidates {
    ids: Vec<u32>,
    weights: Vec<f64>,
}

/// The candidates of a draw from `scores`, as [`draw`] weighs them (the device check's
/// oracle, and the tests').
fn candidates(scores: &[f32], d: &Draw) -> Candidates {
    let mut weights = Vec::new();
    if !kept_weights(scores, d, &mut weights, &mut Vec::new()) {
        return Candidates {
            ids: vec![argmax(scores)],
            weights: vec![1.0],
        };
    }
    let (ids, weights) = (0..scores.len() as u32)
        .zip(weights)
        .filter(|&(_, w)| w > 0.0)
        .map(|(i, w)| (i, w as f64))
        .unzip();
    Candidates { ids, weights }
}

/// Writes `weights[i]`: the weight of token i in a draw from `scores`, e^((score - max) /
/// temperature) for a candidate, 0 for any other; false (nothing written) where no score is
/// finite. The candidates are the finite scores, cut to the top-k and then to the nucleus.
/// Both cuts keep a best-first prefix, the second of the first's, so that the candidates are
/// what the last cut keeps; each is found by a selection over the scores ([`row_cut`],
/// expected O(vocab)), never a sort of the vocabulary.
fn kept_weights(scores: &[f32], d: &Draw, weights: &mut Vec<f32>, bins: &mut Vec<u16>) -> bool {
    let (lowest, max, finite) = fastmath::finite_range(scores);
    if finite == 0 {
        return false;
    }
    weights.resize(scores.len(), 0.0);
    fastmath::temperature_weights(scores, max, d.temperature, weights); // 0 where not finite
    let range = (lowest, max, finite);
    let cut = if d.top_k > 0 && d.top_k < finite {
        let top_k = row_cut(scores, None, range, |_| d.top_k as f64, bins);
        if d.top_p < 1.0 {
            // the nucleus of the top-k: those left weighing something (a weight of 0 moves
            // no running sum and is never picked)
            fastmath::keep_cut(scores, top_k.key, top_k.last, weights);
            let members: Vec<Member> = (weights.iter().enumerate())
                .filter(|&(_, &w)| w > 0.0)
                .map(|(i, &w)| Member::new(scores, i as u32, w as f64))
                .collect();
            let total: f64 = members.iter().map(|m| m.measure).sum();
            // rounding short of the target keeps the top-k whole
            cut_reaching(members, total * d.top_p as f64).or(top_k)
        } else {
            top_k
        }
    } else if d.top_p < 1.0 {
        row_cut(
            scores,
            Some(weights),
            range,
            |total| total * d.top_p as f64,
            bins,
        )
    } else {
        Cut::ALL
    };
    if cut != Cut::ALL {
        fastmath::keep_cut(scores, cut.key, cut.last, weights);
    }
    true
}

/// A cut of the best-first order (score descending, ties to the lower id), as `choices.cu`'s:
/// it keeps a finite score whose [`fastmath::order_key`] is above `key`, or equal to it at an
/// id up to `last`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cut {
    key: u32,
    last: u32,
}

impl Cut {
    /// Keeps every finite score (their keys are all above 0).
    const ALL: Cut = Cut { key: 0, last: 0 };

    /// The cut whose last kept token is `m`.
    fn at(m: &Member) -> Cut {
        Cut {
            key: fastmath::order_key(m.score),
            last: m.id,
        }
    }

    /// This cut, or `other` where this one is [`Cut::ALL`].
    fn or(self, other: Cut) -> Cut {
        if self == Cut::ALL {
            other
        } else {
            self
        }
    }
}

/// A token a cut chooses among: its score, its id, and what it counts for (1 for top-k, its
/// weight for the nucleus).
#[derive(Debug, Clone, Copy)]
struct Member {
    score: f32,
    id: u32,
    measure: f64,
}

impl Member {
    fn new(scores: &[f32], id: u32, measure: f64) -> Self {
        Member {
            score: scores[id as usize],
            id,
            measure,
        }
    }

    /// Best first; ties to the lower id, so the chosen sets are deterministic.
    fn better(a: &Member, b: &Member) -> std::cmp::Ordering {
        b.score.total_cmp(&a.score).then(a.id.cmp(&b.id))
    }
}

/// How many bins a selection round spreads its members' scores over.
const BINS: usize = 2048;
/// At most this many members are sorted rather than binned.
const SORT_AT_MOST: usize = 64;

/// The cut that keeps the shortest best-first prefix of the finite `scores` (`range`: their
/// lowest, highest and count) whose measure reaches `target(total)`: each one's weight
/// (`weights`) or 1 (None); [`Cut::ALL`] where rounding leaves them all short of it. The
/// first round of [`cut_reaching`]'s selection, over the whole row in vectorised passes: the
/// scores' bins into `bins`, each bin's measure summed, the bin where the running sum
/// reaches the target; only its members go on.
fn row_cut(
    scores: &[f32],
    weights: Option<&[f32]>,
    (lowest, highest, finite): (f32, f32, usize),
    target: impl FnOnce(f64) -> f64,
    bins: &mut Vec<u16>,
) -> Cut {
    let member = |i: u32| {
        let measure = weights.map_or(1.0, |w| w[i as usize] as f64);
        Member::new(scores, i, measure)
    };
    let Some(scale) = bin_scale(lowest, highest) else {
        let members: Vec<Member> = (0..scores.len() as u32)
            .filter(|&i| scores[i as usize].is_finite())
            .map(member)
            .collect();
        let total = members.iter().map(|m| m.measure).sum();
        return cut_by_sorting(members, target(total));
    };
    bins.resize(scores.len(), 0);
    fastmath::score_bins(scores, highest, scale, BINS as u32, bins);
    let mut sums = [0f64; BINS];
    match weights {
        // a non-finite score weighs 0: it adds nothing to whichever bin it fell in
        Some(w) => {
            for (&b, &w) in bins.iter().zip(w) {
                sums[b as usize] += w as f64;
            }
        }
        None => {
            for (&b, &s) in bins.iter().zip(scores) {
                sums[b as usize] += s.is_finite() as u32 as f64;
            }
        }
    }
    let target = target(sums.iter().sum());
    let Some((b, before)) = boundary_bin(&sums, target) else {
        return Cut::ALL;
    };
    let inside: Vec<Member> = (bins.iter().enumerate())
        .filter(|&(i, &x)| x == b as u16 && scores[i].is_finite())
        .map(|(i, _)| member(i as u32))
        .collect();
    next_round(inside, finite, target - before)
}

/// The scale of [`BINS`] bins spanning `lowest..=highest`; none where they hold one score, or
/// span past f32's range (no bins to spread them over: the caller sorts).
fn bin_scale(lowest: f32, highest: f32) -> Option<f32> {
    let scale = (BINS - 1) as f32 / (highest - lowest);
    (scale.is_finite() && scale > 0.0).then_some(scale)
}

/// The round after one that kept `inside` of `count` members: another round, or a sort where
/// that one kept more than half of them (scores bunched in a long tail).
fn next_round(inside: Vec<Member>, count: usize, target: f64) -> Cut {
    if inside.len() * 2 > count {
        return cut_by_sorting(inside, target);
    }
    cut_reaching(inside, target)
}

/// The first bin where the running sum of `sums` reaches `target`, and the sum before it.
fn boundary_bin(sums: &[f64], target: f64) -> Option<(usize, f64)> {
    let mut before = 0.0;
    for (b, &sum) in sums.iter().enumerate() {
        if before + sum >= target {
            return Some((b, before));
        }
        before += sum;
    }
    None
}

/// The cut that keeps the shortest best-first prefix of `members` (finite scores, in id order)
/// whose measure reaches `target`; [`Cut::ALL`] where rounding leaves them all short of it.
/// A selection in rounds: the members' scores go into [`BINS`] bins of equal width, best
/// first (a monotone map: a better score never falls in a later bin, equal scores share one);
/// the bin where the running sum of their measure reaches the target holds the cut, and only
/// its members go on. At least two bins are occupied, so every round leaves fewer members; a
/// round that leaves more than half of them (scores bunched in a long tail) sorts them
/// instead, so the worst case is a sort.
fn cut_reaching(members: Vec<Member>, target: f64) -> Cut {
    let (lowest, highest) = members
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), m| {
            (lo.min(m.score), hi.max(m.score))
        });
    let scale = match bin_scale(lowest, highest) {
        Some(scale) if members.len() > SORT_AT_MOST => scale,
        _ => return cut_by_sorting(members, target),
    };
    let bin = |s: f32| fastmath::score_bin(s, highest, scale, BINS as u32) as usize;
    let mut sums = [0f64; BINS];
    for m in &members {
        sums[bin(m.score)] += m.measure;
    }
    let Some((b, before)) = boundary_bin(&sums, target) else {
        return Cut::ALL;
    };
    let count = members.len();
    let inside: Vec<Member> = members.into_iter().filter(|m| bin(m.score) == b).collect();
    next_round(inside, count, target - before)
}

/// [`cut_reaching`] by sorting `members`: the first, best first, where the running measure
/// reaches `target`; the last where rounding never does.
fn cut_by_sorting(mut members: Vec<Member>, target: f64) -> Cut {
    members.sort_unstable_by(Member::better);
    let mut acc = 0.0;
    for m in &members {
        acc += m.measure;
        if acc >= target {
            return Cut::at(m);
        }
    }
    members.last().map_or(Cut::ALL, Cut::at)
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

    /// Scores over a vocabulary-sized row: normal deviates of standard deviation `sd`, spread
    /// as a trained head's (3) or a random checkpoint's (0.3).
    fn vocabulary_row(seed: u64, sd: f32) -> Vec<f32> {
        let mut rand = super::super::uniform(seed);
        (0..50_257)
            .map(|_| {
                let (a, b) = (rand().max(1e-7), rand());
                sd * (-2.0 * a.ln()).sqrt() * (std::f32::consts::TAU * b).cos()
            })
            .collect()
    }

    #[test]
    fn a_draw_picks_the_candidate_whose_share_holds_u_in_id_order() {
        for (seed, sd) in [(3u64, 3.0f32), (5, 0.3)] {
            let mut scores = vocabulary_row(seed, sd);
            scores[17] = f32::NEG_INFINITY; // masked
            scores[40_000] = f32::NAN;
            for (temperature, top_k, top_p) in [
                (1.0f32, 0, 1.0f32),
                (0.8, 0, 0.95),
                (1.3, 50, 1.0),
                (0.7, 40, 0.9),
            ] {
                let d = |u| Draw {
                    temperature,
                    top_k,
                    top_p,
                    u,
                };
                let c = candidates(&scores, &d(0.0));
                assert!(!c.ids.contains(&17) && !c.ids.contains(&40_000));
                let total: f64 = c.weights.iter().sum();
                // the middle of the shares of the cumulative weight of 40 candidates or so
                let (mut before, every) = (0.0, c.ids.len().div_ceil(40));
                for (k, (&id, &w)) in c.ids.iter().zip(&c.weights).enumerate() {
                    if k % every == 0 || k + 1 == c.ids.len() {
                        let u = (before + w / 2.0) / total;
                        assert_eq!(draw(&scores, &d(u)), id, "{temperature} {top_k} {top_p}");
                    }
                    before += w;
                }
                assert_eq!(draw(&scores, &d(0.0)), c.ids[0]);
                let last = draw(&scores, &d(1.0 - f64::EPSILON));
                assert_eq!(last, c.ids[c.ids.len() - 1]);
            }
        }
        // nothing finite: the first maximum, as greedy
        let none = [f32::NEG_INFINITY, f32::NAN];
        let plain = Draw {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            u: 0.5,
        };
        assert_eq!(draw(&none, &plain), argmax(&none));
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
    fn a_cut_keeps_the_shortest_best_first_prefix_reaching_the_target() {
        // weights 1..=200 in shuffled id order, the heavier the better: the cut reaching a
        // share of the mass keeps the heaviest until it is reached
        let members: Vec<Member> = (0..200u32)
            .map(|id| {
                let w = (id * 73) % 200 + 1;
                Member {
                    score: w as f32,
                    id,
                    measure: w as f64,
                }
            })
            .collect();
        let total: f64 = (1..=200).map(f64::from).sum();
        for frac in [0.01, 0.3, 0.5, 0.9, 0.999, 1.0] {
            let target = total * frac;
            let (mut acc, mut lightest) = (0.0, 200);
            while acc < target {
                acc += lightest as f64;
                lightest -= 1;
            }
            let want = members
                .iter()
                .find(|m| m.measure == (lightest + 1) as f64)
                .unwrap();
            assert_eq!(
                cut_reaching(members.clone(), target),
                Cut::at(want),
                "{frac}"
            );
        }
        assert_eq!(
            cut_reaching(members.clone(), total * 2.0),
            Cut::ALL,
            "never reached"
        );

        // selections in rounds equal a sort: scores bunched (ties in every bin), spread, in a
        // geometric tail (each round peels few), with counts and with weights
        let mut rand = super::super::uniform(0x2545_F491_4F6C_DD1D);
        let shapes: [&dyn Fn(f32) -> f32; 4] = [
            &|v| (v * 30.0).round(),
            &|v| v * 1000.0 - 500.0,
            &|v| -(2f32.powf(v * 100.0)),
            &|v| if v < 0.99 { 0.0 } else { v },
        ];
        for shape in shapes {
            let scores: Vec<f32> = (0..5000).map(|_| shape(rand())).collect();
            for weighted in [false, true] {
                let members: Vec<Member> = (0..5000u32)
                    .map(|id| Member {
                        score: scores[id as usize],
                        id,
                        measure: if weighted { rand() as f64 } else { 1.0 },
                    })
                    .collect();
                let total: f64 = members.iter().map(|m| m.measure).sum();
                for target in [1.0, total * 0.3, total * 0.95, total - 0.5] {
                    assert_eq!(
                        cut_reaching(members.clone(), target),
                        cut_by_sorting(members.clone(), target),
                        "weighted {weighted}, target {target}"
                    );
                }
            }
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
        let w = |i: u32| fastmath::exp_neg((scores[i as usize] - max) / d.temperature) as f64;
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
        ids.retain(|&i| w(i) > 0.0); // never drawn
        ids.sort_unstable();
        ids
    }

    #[test]
    fn candidates_are_the_top_k_then_the_nucleus_in_id_order() {
        let mut rand = super::super::uniform(0x853C_49E6_748F_EA9B);
        // coarse values: many ties at every boundary
        let coarse: Vec<f32> = (0..3000)
            .map(|_| (rand() * 40.0).round() / 4.0 - 10.0)
            .collect();
        // vocabulary rows, one with a far outlier (the bins of the first round span it) and
        // masked tokens
        let mut outlier = vocabulary_row(7, 3.0);
        outlier[5] = -1e30;
        outlier[6] = f32::NEG_INFINITY;
        let rows = [
            coarse,
            vocabulary_row(3, 3.0),
            vocabulary_row(5, 0.3),
            outlier,
        ];
        for scores in &rows {
            let finite = scores.iter().filter(|s| s.is_finite()).count();
            for (top_k, top_p) in [
                (0, 0.9f32),
                (40, 1.0),
                (40, 0.5),
                (1, 1.0),
                (0, 0.01),
                (finite - 1, 0.999),
                (finite / 2, 1.0),
            ] {
                let d = Draw {
                    temperature: 0.8,
                    top_k,
                    top_p,
                    u: 0.5,
                };
                let c = candidates(scores, &d);
                let n = scores.len();
                assert_eq!(
                    c.ids,
                    candidates_by_sorting(scores, &d),
                    "{n}: {top_k} {top_p}"
                );
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
