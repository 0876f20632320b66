//! Per-sequence token choice: logit bias, penalties, temperature, top-k, top-p, seeded RNG.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::request::SamplingParams;
use crate::model::fastmath::exp_neg;

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Occurrences of each generated token, for presence/frequency/repetition penalties.
    counts: HashMap<u32, u32>,
}

impl Sampler {
    /// `stream` separates the choices of one request: each gets its own reproducible RNG.
    pub fn new(params: SamplingParams, stream: u64) -> Self {
        let seed = match params.seed {
            Some(s) => s ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            None => fresh_seed(),
        };
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            counts: HashMap::new(),
        }
    }

    /// Records a token the sequence produced (penalties apply to generated tokens).
    pub fn observe(&mut self, id: u32) {
        *self.counts.entry(id).or_default() += 1;
    }

    /// Picks the next token from `scores`, the mode's log-distribution.
    pub fn choose(&mut self, scores: &[f32]) -> u32 {
        let p = &self.params;
        let needs_edit = !p.logit_bias.is_empty()
            || (!self.counts.is_empty()
                && (p.presence_penalty != 0.0
                    || p.frequency_penalty != 0.0
                    || p.repetition_penalty != 1.0));
        let edited;
        let scores = if needs_edit {
            let mut s = scores.to_vec();
            for &(id, bias) in &p.logit_bias {
                s[id as usize] += bias;
            }
            for (&id, &count) in &self.counts {
                let x = &mut s[id as usize];
                // HF's repetition penalty: push the score away from likely.
                if p.repetition_penalty != 1.0 {
                    *x = if *x > 0.0 {
                        *x / p.repetition_penalty
                    } else {
                        *x * p.repetition_penalty
                    };
                }
                *x -= p.frequency_penalty * count as f32 + p.presence_penalty;
            }
            edited = s;
            &edited[..]
        } else {
            scores
        };
        if p.temperature == 0.0 {
            return argmax(scores);
        }
        self.sample(scores)
    }

    fn sample(&mut self, scores: &[f32]) -> u32 {
        let p = &self.params;
        let mut cands: Vec<(u32, f32)> = scores
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_finite())
            .map(|(i, &s)| (i as u32, s / p.temperature))
            .collect();
        if cands.is_empty() {
            return argmax(scores);
        }
        let by_score = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cands.len() {
            cands.select_nth_unstable_by(p.top_k - 1, by_score);
            cands.truncate(p.top_k);
        }
        // Sorting (the costly part over a whole vocabulary) is only needed for top-p.
        if p.top_p < 1.0 || p.top_k > 0 {
            cands.sort_unstable_by(by_score);
        }
        let max = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        let mut weights: Vec<f64> = cands.iter().map(|c| exp_neg(c.1 - max) as f64).collect();
        if p.top_p < 1.0 {
            let total: f64 = weights.iter().sum();
            let mut acc = 0.0;
            let mut keep = weights.len();
            for (i, w) in weights.iter().enumerate() {
                acc += w / total;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            weights.truncate(keep);
        }
        let total: f64 = weights.iter().sum();
        let mut r = self.rng.random::<f64>() * total;
        for (i, w) in weights.iter().enumerate() {
            if r < *w {
                return cands[i].0;
            }
            r -= w;
        }
        cands[weights.len() - 1].0
    }
}

/// First index of the maximum (as torch.argmax): greedy decoding.
pub fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in scores.iter().enumerate() {
        if x > scores[best] {
            best = i;
        }
    }
    best as u32
}

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
        SamplingParams {
            temperature,
            top_p: 1.0,
            top_k: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: vec![],
            seed: Some(7),
        }
    }

    #[test]
    fn greedy_takes_first_maximum() {
        let mut s = Sampler::new(params(0.0), 0);
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
            (0..50).map(|_| s.choose(&scores)).collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        assert!(a.iter().all(|&t| t < 2));
        assert!(a.contains(&0) && a.contains(&1));
    }

    #[test]
    fn logit_bias_and_penalties_move_the_choice() {
        let mut s = Sampler::new(
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
}
