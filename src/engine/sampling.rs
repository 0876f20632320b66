//! Per-sequence token choice: logit bias, penalties and the seeded numbers; the draw itself
//! (temperature, top-k, top-p) is `kernels::sample`'s, the one a step makes where the logits
//! are.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use super::request::SamplingParams;
use crate::kernels::sample::{self, Draw};

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
        sample::draw(&self.edited(scores), &self.draw_at(ahead))
    }

    /// The next token's draw where nothing edits the scores (no bias, no penalty that
    /// applies yet): what a step may then draw where the logits are, from the mode's
    /// scores as they come. None where the scores are edited first.
    pub fn unedited_draw(&self) -> Option<Draw> {
        (!self.edits()).then(|| self.draw_at(0))
    }

    /// The draw of the position `ahead` after the next one.
    fn draw_at(&self, ahead: usize) -> Draw {
        let p = &self.params;
        Draw {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            u: self.uniform_at(self.position + ahead as u64),
        }
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

    /// Whether anything edits the scores now: a logit bias, or a penalty with tokens to
    /// push down.
    fn edits(&self) -> bool {
        let p = &self.params;
        !p.logit_bias.is_empty()
            || !self.repeated.is_empty()
            || (!self.counts.is_empty()
                && (p.presence_penalty != 0.0 || p.frequency_penalty != 0.0))
    }

    /// `scores` with the logit bias and the penalties applied (borrowed when there are none).
    fn edited<'s>(&self, scores: &'s [f32]) -> Cow<'s, [f32]> {
        if !self.edits() {
            return Cow::Borrowed(scores);
        }
        let p = &self.params;
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
