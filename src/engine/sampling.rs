//! Per-sequence token choice: logit bias, penalties, temperature, top-k, top-p, seeded RNG.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use super::request::SamplingParams;
use crate::kernels::fastmath::{self, exp_neg};

/// Chooses one sequence's tokens. The random number behind the token at position `t` of a
/// completion is a function of (seed, choice, `t`) alone, not of how many numbers were drawn
/// before: a seeded request gives the same text alone or batched, and with self-speculative
/// decoding or without (a draft is drawn with the number of its position, and stands when it
/// is the token the mode draws with that same number).
pub struct Sampler {
    params: SamplingParams,
    /// The request's seed (or a fresh one) mixed with the choice's index.
    seed: u64,
    /// Tokens generated so far: the position of the next one.
    position: u64,
    /// Occurrences of each generated token, for the presence and frequency penalties.
    counts: HashMap<u32, u32>,
    /// Every token of the prompt and of the text generated so far: what the repetition
    /// penalty pushes down (as transformers and vLLM do); empty when it is off.
    repeated: HashSet<u32>,
}

impl Sampler {
    /// `stream` separates the choices of one request: each draws its own numbers.
    pub fn new(params: SamplingParams, stream: u64) -> Self {
        let seed = match params.seed {
            Some(s) => s ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            None => fresh_seed(),
        };
        Self {
            params,
            seed,
            position: 0,
            counts: HashMap::new(),
            repeated: HashSet::new(),
        }
    }

    /// The prompt the sequence continues: its tokens count for the repetition penalty.
    pub fn with_prompt(mut self, prompt: &[u32]) -> Self {
        if self.params.repetition_penalty != 1.0 {
            self.repeated.extend(prompt);
        }
        self
    }

    /// Records a token the sequence produced; the next choice is the next position's.
    pub fn observe(&mut self, id: u32) {
        *self.counts.entry(id).or_default() += 1;
        if self.params.repetition_penalty != 1.0 {
            self.repeated.insert(id);
        }
        self.position += 1;
    }

    /// Picks the next token from `scores`, the mode's log-distribution.
    pub fn choose(&self, scores: &[f32]) -> u32 {
        self.choose_ahead(scores, 0)
    }

    /// The token this sampler would pick from `scores` `ahead` positions after the next one
    /// (a draft's, within a speculative round; penalties as they stand now).
    pub fn choose_ahead(&self, scores: &[f32], ahead: usize) -> u32 {
        let scores = self.edited(scores);
        if self.params.temperature == 0.0 {
            return argmax(&scores);
        }
        let u = self.uniform_at(self.position + ahead as u64);
        let p = &self.params;
        if (p.top_k == 0 || p.top_k >= scores.len()) && p.top_p >= 1.0 {
            if let Some(t) = pick_from_softmax(&scores, p.temperature, u) {
                return t;
            }
        }
        self.distribution_of_edited(&scores).pick(u)
    }

    /// What a token chosen from `scores` is reported with: the log-distribution it is drawn
    /// from before temperature, top-k and top-p, i.e. the mode's scores after the logit bias
    /// and the penalties, normalised (`scores` itself when nothing edits them and they are
    /// already the mode's log-distribution).
    pub fn reported<'s>(&self, scores: &'s [f32], scores_are_logprobs: bool) -> Cow<'s, [f32]> {
        match self.edited(scores) {
            Cow::Borrowed(s) if scores_are_logprobs => Cow::Borrowed(s),
            edited => Cow::Owned(crate::model::mode::log_softmax(&edited)),
        }
    }

    /// The uniform number in [0, 1) of position `t`: SplitMix64 of (seed, t), a counter-based
    /// generator (the numbers of a position never depend on the draws before it).
    fn uniform_at(&self, t: u64) -> f64 {
        let mut z = self
            .seed
            .wrapping_add(t.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Greedy decoding (temperature 0): every choice is the best edited score.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature == 0.0
    }

    /// Greedy decoding with nothing that edits the scores (logit bias, penalties): every
    /// choice is the argmax of the mode's scores as they come.
    pub fn is_plain_greedy(&self) -> bool {
        let p = &self.params;
        self.is_greedy()
            && p.logit_bias.is_empty()
            && p.repetition_penalty == 1.0
            && p.presence_penalty == 0.0
            && p.frequency_penalty == 0.0
    }

    /// `scores` with the logit bias and the penalties applied (borrowed when there are none).
    fn edited<'s>(&self, scores: &'s [f32]) -> Cow<'s, [f32]> {
        let p = &self.params;
        let needs_edit = !p.logit_bias.is_empty()
            || !self.repeated.is_empty()
            || (!self.counts.is_empty()
                && (p.presence_penalty != 0.0 || p.frequency_penalty != 0.0));
        if !needs_edit {
            return Cow::Borrowed(scores);
        }
        let mut s = scores.to_vec();
        // vLLM's order: the bias, then the penalties.
        for &(id, bias) in &p.logit_bias {
            s[id as usize] += bias;
        }
        // HF's repetition penalty: push the score away from likely.
        for &id in &self.repeated {
            let x = &mut s[id as usize];
            *x = if *x > 0.0 {
                *x / p.repetition_penalty
            } else {
                *x * p.repetition_penalty
            };
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&id, &count) in &self.counts {
                s[id as usize] -= p.frequency_penalty * count as f32 + p.presence_penalty;
            }
        }
        Cow::Owned(s)
    }

    /// The weights of `softmax(scores / temperature)`, restricted to the top-k and then to
    /// the nucleus. Both restrictions are partial selections (expected O(vocab)), never a
    /// sort of the whole vocabulary.
    fn distribution_of_edited(&self, scores: &[f32]) -> Dist {
        let p = &self.params;
        let mut cands: Vec<u32> = (0..scores.len() as u32)
            .filter(|&i| scores[i as usize].is_finite())
            .collect();
        if cands.is_empty() {
            return Dist {
                ids: vec![argmax(scores)],
                weights: vec![1.0],
            };
        }
        // Best first; ties to the lower id, so the chosen sets are deterministic.
        let better = |a: &u32, b: &u32| {
            scores[*b as usize]
                .total_cmp(&scores[*a as usize])
                .then(a.cmp(b))
        };
        if p.top_k > 0 && p.top_k < cands.len() {
            cands.select_nth_unstable_by(p.top_k - 1, better);
            cands.truncate(p.top_k);
        }
        let max = cands
            .iter()
            .map(|&i| scores[i as usize])
            .fold(f32::NEG_INFINITY, f32::max);
        let weight = |i: u32| exp_neg((scores[i as usize] - max) / p.temperature) as f64;
        if p.top_p < 1.0 {
            let total: f64 = cands.iter().map(|&i| weight(i)).sum();
            let keep = nucleus(&mut cands, total * p.top_p as f64, weight, better);
            cands.truncate(keep);
        }
        let weights: Vec<f64> = cands.iter().map(|&i| weight(i)).collect();
        Dist {
            ids: cands,
            weights,
        }
    }
}

/// A distribution over some token ids: their unnormalised weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Dist {
    pub ids: Vec<u32>,
    pub weights: Vec<f64>,
}

impl Dist {
    /// The token at `u` (in [0, 1)) of the distribution's cumulative weight, in its order.
    pub fn pick(&self, u: f64) -> u32 {
        pick_cumulative(u, &self.weights).map_or(self.ids[self.ids.len() - 1], |i| self.ids[i])
    }
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

/// What `distribution_of_edited(scores).pick(u)` gives when neither top-k nor top-p
/// restricts the draw and every score is finite, bit for bit (the same weights, summed and
/// scanned in the same order), without its candidate list or its f64 weights: the whole
/// vocabulary's weights in one vectorised pass, the common case of every sampled step.
/// None where a score is not finite (masked tokens: the general path, whose candidates are
/// the finite ones).
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
fn nucleus(
    cands: &mut [u32],
    target: f64,
    weight: impl Fn(u32) -> f64,
    better: impl Fn(&u32, &u32) -> std::cmp::Ordering + Copy,
) -> usize {
    let (mut lo, mut hi, mut need) = (0, cands.len(), target);
    while hi - lo > 32 {
        let mid = lo + (hi - lo) / 2;
        cands[lo..hi].select_nth_unstable_by(mid - lo, better);
        let upper: f64 = cands[lo..=mid].iter().map(|&i| weight(i)).sum();
        if upper >= need {
            hi = mid + 1;
        } else {
            need -= upper;
            lo = mid + 1;
        }
    }
    cands[lo..hi].sort_unstable_by(better);
    let mut acc = 0.0;
    for (k, &i) in cands[lo..hi].iter().enumerate() {
        acc += weight(i);
        if acc >= need {
            return lo + k + 1;
        }
    }
    hi.max(1)
}

/// Greedy decoding's choice: the first index of the maximum (as torch.argmax), the same as a
/// step computes on the device (`kernels::greedy`).
pub use crate::kernels::greedy::argmax;

fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0xD1B5_4A32_D192_ED03)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams::plain(temperature, 7)
    }

    #[test]
    fn argmax_is_the_first_largest_and_never_nan() {
        let mut v = vec![-1.0f32; 1000];
        v[700] = 3.0;
        v[900] = 3.0;
        v[5] = f32::NAN;
        assert_eq!(argmax(&v), 700, "ties to the first");
        v[0] = f32::NAN;
        assert_eq!(argmax(&v), 700, "a NaN is never the best");
        assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), 0);
        assert_eq!(argmax(&[f32::NAN; 3]), 0);
        assert_eq!(argmax(&[1.0, 2.0, 2.0]), 1);
    }

    #[test]
    fn greedy_takes_first_maximum() {
        let s = Sampler::new(params(0.0), 0);
        assert_eq!(s.choose(&[0.1, 0.5, 0.5, -1.0]), 1);
    }

    #[test]
    fn seeded_sampling_repeats_and_respects_top_k() {
        let scores = [-1.0f32, -1.1, -1.2, -5.0, -6.0];
        let run = || {
            let mut s = Sampler::new(
                SamplingParams {
                    top_k: 2,
                    ..params(1.0)
                },
                3,
            );
            (0..50)
                .map(|_| {
                    let t = s.choose(&scores);
                    s.observe(t);
                    t
                })
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        assert!(a.iter().all(|&t| t < 2));
        assert!(a.contains(&0) && a.contains(&1));
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
            let s = Sampler::new(params(temperature), 0);
            let dist = s.distribution_of_edited(&scores);
            for k in 0..=400 {
                let u = (k as f64 / 400.0).min(1.0 - f64::EPSILON);
                assert_eq!(
                    pick_from_softmax(&scores, temperature, u),
                    Some(dist.pick(u)),
                    "temperature {temperature}, u {u}"
                );
            }
        }
        // a masked (-inf) or NaN score: the general path's, whose candidates are the finite
        for bad in [f32::NEG_INFINITY, f32::NAN] {
            let mut masked = scores.clone();
            masked[17] = bad;
            assert_eq!(pick_from_softmax(&masked, 1.0, 0.5), None);
            let t = Sampler::new(params(1.0), 3).choose(&masked);
            assert!(t != 17 && (t as usize) < masked.len());
        }
        // nothing finite: the first maximum, as greedy
        let none = [f32::NEG_INFINITY, f32::NAN];
        assert_eq!(Sampler::new(params(1.0), 0).choose(&none), argmax(&none));
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
        // weights 1..=200 in shuffled order; the nucleus of the top mass is a suffix of 1..=200
        let mut ids: Vec<u32> = (0..200).map(|i| (i * 73) % 200).collect();
        let weight = |i: u32| (i + 1) as f64;
        let better = |a: &u32, b: &u32| b.cmp(a);
        let total: f64 = (1..=200).map(f64::from).sum();
        for frac in [0.01, 0.3, 0.5, 0.9, 0.999, 1.0] {
            let target = total * frac;
            let m = nucleus(&mut ids, target, weight, better);
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
            let mut kept: Vec<u32> = ids[..m].to_vec();
            kept.sort_unstable();
            assert_eq!(kept, (200 - m as u32..200).collect::<Vec<_>>(), "{frac}");
        }
    }

    #[test]
    fn top_p_samples_only_inside_the_nucleus() {
        // p(0) = 0.6, p(1) = 0.3, the rest share 0.1: top_p 0.85 keeps exactly {0, 1}
        let mut scores = vec![0.6f32.ln(), 0.3f32.ln()];
        scores.extend(std::iter::repeat_n((0.1f32 / 998.0).ln(), 998));
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 0.85,
                ..params(1.0)
            },
            1,
        );
        let picks: Vec<u32> = (0..300)
            .map(|_| {
                let t = s.choose(&scores);
                s.observe(t);
                t
            })
            .collect();
        assert!(picks.iter().all(|&t| t < 2), "{picks:?}");
        assert!(picks.contains(&0) && picks.contains(&1));
    }

    #[test]
    fn logit_bias_and_penalties_move_the_choice() {
        let s = Sampler::new(
            SamplingParams {
                logit_bias: vec![(2, 100.0)],
                ..params(0.0)
            },
            0,
        );
        assert_eq!(s.choose(&[0.0, -1.0, -2.0]), 2);
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: 2.0,
                ..params(0.0)
            },
            0,
        );
        s.observe(0);
        assert_eq!(s.choose(&[-1.0, -1.5, -4.0]), 1);
    }

    /// The repetition penalty pushes down the prompt's tokens as well as generated ones
    /// (transformers, vLLM); presence and frequency count generated tokens only (OpenAI).
    #[test]
    fn the_repetition_penalty_counts_the_prompt_and_openai_penalties_do_not() {
        let scores = [2.0f32, 1.8, -1.0];
        let repetition = SamplingParams {
            repetition_penalty: 1.5,
            ..params(0.0)
        };
        let s = Sampler::new(repetition.clone(), 0).with_prompt(&[0, 0, 2]);
        assert_eq!(s.choose(&scores), 1, "2.0 / 1.5 < 1.8");
        let reported = s.reported(&scores, false);
        assert!((reported[0] - reported[1]).abs() > 0.1 && reported[1] > reported[0]);
        let total: f32 = reported.iter().map(|x| x.exp()).sum();
        assert!(
            (total - 1.0).abs() < 1e-5,
            "reported as a distribution: {total}"
        );
        let presence = SamplingParams {
            presence_penalty: 2.0,
            ..params(0.0)
        };
        let mut s = Sampler::new(presence, 0).with_prompt(&[0]);
        assert_eq!(s.choose(&scores), 0, "the prompt does not count");
        s.observe(0);
        assert_eq!(s.choose(&scores), 1);
        // nothing to edit: reported as given
        let plain = Sampler::new(params(0.0), 0).with_prompt(&[0]);
        assert!(matches!(plain.reported(&scores, true), Cow::Borrowed(_)));
    }

    /// A position's token depends on (seed, choice, position) only: looking ahead gives
    /// what the later choice gives, whatever was drawn in between.
    #[test]
    fn a_position_draws_the_same_number_however_it_is_reached() {
        let scores = [-1.0f32, -1.1, -1.2, -1.3];
        let mut a = Sampler::new(params(1.0), 5);
        let ahead: Vec<u32> = (0..20).map(|k| a.choose_ahead(&scores, k)).collect();
        let mut plain = Vec::new();
        for _ in 0..20 {
            let t = a.choose(&scores);
            plain.push(t);
            a.observe(t);
        }
        assert_eq!(ahead, plain);
        assert!(plain.iter().any(|&t| t != plain[0]));
        // another choice of the same request draws other numbers
        let b = Sampler::new(params(1.0), 6);
        let other: Vec<u32> = (0..20).map(|k| b.choose_ahead(&scores, k)).collect();
        assert_ne!(other, plain);
    }
}
