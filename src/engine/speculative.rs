//! Self-speculative decoding: the trunk up to a low exit drafts a few tokens, one pass of the
//! request's own mode over the drafted positions verifies them, and the output is the one
//! decoding without drafts would give, token for token, greedy or sampled: a draft is drawn
//! with the random number of its position (`sampling.rs`) and stands when it is the token the
//! mode draws there with that same number. (Leviathan et al.'s rejection rule accepts more
//! drafts when sampling, but keeps only the distribution, not the text of a seeded request:
//! that text would then depend on whether the batch let the sequence draft.)
//!
//! A round, for a sequence whose last token `t0` is not yet in its cache:
//! 1. draft: `k` steps at the draft layer's depth feed `t0, d1, …, d(k-1)` and choose
//!    `d1 … dk` from the exit head (the cache's lower layers fill as they go);
//! 2. verify: the cache is rolled back to where the round began and `t0, d1 … dk` go through
//!    the mode's depth in one multi-token step, which gives the target distribution at each;
//! 3. accept `d(i+1)` against row `i` until the first rejection, which emits a corrected token
//!    instead; when all `k` pass, row `k` gives one more. The cache keeps `t0` and the
//!    accepted drafts.
//!
//! The draft length adapts to what pays. Each sequence keeps an estimate of the chance that a
//! draft stands (from the verdicts so far) and of what a draft step and each extra verified
//! position cost against a plain step: first from the weights each reads ([`draft_cost`]),
//! then from the wall time of its own steps whenever it decodes alone (its first decoding
//! step is a plain one, to time it), so the policy holds on any CPU and dtype (a bf16 verify
//! on AVX2 is compute-bound, on AMX it is not). Before each round it picks the length that
//! yields the most tokens per unit of work, starting with a one-token probe. When no
//! length beats plain decoding, it
//! decodes plainly for a while (a pause that doubles, up to [`MAX_PAUSE`] steps, while the
//! one-token probes after it keep failing), so a draft layer that rarely agrees costs a few
//! percent, not a slowdown.

use super::request::SpeculativeSpec;
use super::sampling::Sampler;
use crate::model::cost::weight_macs;

/// The largest `max_draft_tokens` a request may ask for.
pub const MAX_DRAFT_TOKENS: usize = 16;
/// The longest pause (plain steps) while drafting does not pay.
pub const MAX_PAUSE: usize = 128;
/// The first pause.
const FIRST_PAUSE: usize = 4;
/// The acceptance estimate before any verdict: optimistic, since the client asked.
const PRIOR_ACCEPTANCE: f64 = 0.8;
/// Weight of each verdict in the acceptance estimate (an exponential moving average).
const VERDICT_WEIGHT: f64 = 0.15;
/// What one extra verified position adds to a verifying pass, in full steps.
const VERIFY_ROW_COST: f64 = 0.06;
/// A step's fixed cost (scheduling, scoring, sampling), in weights read per step.
const STEP_OVERHEAD: f64 = 0.1;

/// What a draft step costs against a full step of the mode: the weights each reads (blocks
/// of `12 h²`, vocabulary heads of `V h`), a draft's weighed by `read_cost` (the time per
/// weight of the copies drafts read against the model's own: `MultiExitModel::draft_read_cost`),
/// plus a fixed per-step part.
pub fn draft_cost(
    hidden: usize,
    vocab: usize,
    draft_layer: usize,
    depth: usize,
    mode_heads: usize,
    read_cost: f64,
) -> f64 {
    let full = weight_macs(hidden, vocab, depth, mode_heads);
    let draft = read_cost * weight_macs(hidden, vocab, draft_layer, 1);
    (draft + STEP_OVERHEAD * full) / (full + STEP_OVERHEAD * full)
}

/// Expected tokens per unit of work of a round of `k` drafts, each standing with
/// probability `a`, a draft step costing `c` plain steps and each verified position past the
/// first `v`: the accepted drafts and the token after them, over k drafts and one verifying
/// pass of k + 1 positions.
fn efficiency(k: usize, a: f64, c: f64, v: f64) -> f64 {
    let tokens: f64 = (0..=k).map(|i| a.powi(i as i32)).sum();
    tokens / (k as f64 * c + 1.0 + k as f64 * v)
}

/// Weight of each timed step in the cost estimates.
const TIMING_WEIGHT: f64 = 0.2;

/// A step this sequence ran alone, timed (forward, scoring and emission).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Timed {
    Plain(f64),
    Draft(f64),
    /// A verifying pass over this many positions.
    Verify {
        positions: usize,
        seconds: f64,
    },
}

/// Moving averages of the sequence's own step times, in seconds.
#[derive(Debug, Clone, Default)]
struct StepTimes {
    plain: Option<f64>,
    draft: Option<f64>,
    /// A verified position past the first, in plain steps.
    verify_row: Option<f64>,
}

/// `estimate` moved towards `sample`; a sample over 3x the estimate (a stall: page cache,
/// another process) counts as 3x.
fn average(estimate: Option<f64>, sample: f64) -> Option<f64> {
    Some(match estimate {
        None => sample,
        Some(e) if e > 0.0 => e + TIMING_WEIGHT * (sample.min(3.0 * e) - e),
        Some(e) => e + TIMING_WEIGHT * (sample - e),
    })
}

/// What a speculative sequence feeds at its next decoding step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecInput {
    /// A plain step (drafting paused, or too few tokens left to draft).
    Plain,
    /// A draft step at the draft layer's depth, feeding this token.
    Draft(u32),
    /// The verifying step: these tokens (`t0` and the drafts), rolled back to `base_len`.
    Verify { tokens: Vec<u32>, base_len: usize },
}

/// The verdict on one verified position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The draft token stands.
    Accept(u32),
    /// The draft was rejected: this token replaces it and ends the round.
    Replace(u32),
}

/// A sequence's speculation state.
#[derive(Debug, Clone)]
pub struct Speculation {
    pub spec: SpeculativeSpec,
    /// A draft step's cost in full steps from the weights read ([`draft_cost`]), until timed.
    cost: f64,
    times: StepTimes,
    /// The estimated chance that a draft stands.
    acceptance: f64,
    /// Plain steps left before the next round.
    paused: usize,
    /// The next pause, should drafting still not pay.
    next_pause: usize,
    /// The next round is a one-token probe after a pause.
    probing: bool,
    /// The round in progress: the cache length and token it began with, its length, and the
    /// drafts.
    round: Option<Round>,
}

#[derive(Debug, Clone)]
struct Round {
    base_len: usize,
    t0: u32,
    len: usize,
    drafts: Vec<u32>,
}

impl Speculation {
    /// `cost`: a draft step against a full step of the mode ([`draft_cost`]).
    pub fn new(spec: SpeculativeSpec, cost: f64) -> Self {
        Self {
            spec,
            cost,
            times: StepTimes::default(),
            acceptance: PRIOR_ACCEPTANCE,
            // The first decoding step is plain, to time one.
            paused: usize::from(spec.adaptive),
            next_pause: FIRST_PAUSE,
            // The first round is a one-token probe: a draft layer that does not agree costs
            // one wasted draft before the first pause, not a long round.
            probing: true,
            round: None,
        }
    }

    /// The round length that yields the most tokens per unit of work, if any beats plain
    /// decoding.
    fn best_length(&self) -> Option<usize> {
        let (c, v) = (self.draft_cost(), self.verify_row_cost());
        (1..=self.spec.max_draft_tokens)
            .map(|k| (k, efficiency(k, self.acceptance, c, v)))
            .filter(|&(_, e)| e > 1.0)
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(k, _)| k)
    }

    /// The input of the next step, for a decoding sequence whose next token is `next`, whose
    /// cache holds `cache_len` positions and which may still generate `remaining` tokens.
    /// Drafts never go past what the sequence may still emit (so the verifying step stays
    /// within the positions it reserved).
    pub fn next_input(&mut self, next: u32, cache_len: usize, remaining: usize) -> SpecInput {
        if let Some(r) = &self.round {
            return if r.drafts.len() < r.len {
                SpecInput::Draft(*r.drafts.last().unwrap_or(&r.t0))
            } else {
                let mut tokens = Vec::with_capacity(r.len + 1);
                tokens.push(r.t0);
                tokens.extend(&r.drafts);
                SpecInput::Verify {
                    tokens,
                    base_len: r.base_len,
                }
            };
        }
        if self.paused > 0 {
            self.paused -= 1;
            return SpecInput::Plain;
        }
        let k = if !self.spec.adaptive {
            self.spec.max_draft_tokens
        } else if efficiency(
            self.spec.max_draft_tokens,
            1.0,
            self.draft_cost(),
            self.verify_row_cost(),
        ) <= 1.0
        {
            // Not even drafts that always stand would pay (the draft reads nearly what the
            // full pass reads): never draft.
            return SpecInput::Plain;
        } else if self.probing {
            1
        } else {
            match self.best_length() {
                Some(k) => k,
                None => {
                    // Even the prior does not pay: this step is the pause's first.
                    self.pause();
                    self.paused -= 1;
                    return SpecInput::Plain;
                }
            }
        };
        let len = k.min(remaining.saturating_sub(1));
        if len == 0 {
            return SpecInput::Plain;
        }
        self.round = Some(Round {
            base_len: cache_len,
            t0: next,
            len,
            drafts: Vec::with_capacity(len),
        });
        SpecInput::Draft(next)
    }

    /// Chooses the next draft token from the draft head's log-distribution `scores`, the way
    /// the sequence's sampler chooses the token at that position (greedy: its best token;
    /// else a draw with that position's random number).
    pub fn draft(&mut self, scores: &[f32], sampler: &Sampler) {
        let round = self.round.as_mut().expect("drafting inside a round");
        let token = sampler.choose_ahead(scores, round.drafts.len());
        round.drafts.push(token);
    }

    /// The drafts of the round being verified.
    pub fn drafts(&self) -> &[u32] {
        self.round.as_ref().map_or(&[], |r| &r.drafts)
    }

    /// The verdict on draft `i` given the target log-distribution `scores` at the position
    /// before it: it stands when it is the token the mode chooses there (greedy: its best
    /// token; sampling: its draw with the same random number the draft was drawn with), else
    /// that token replaces it. The text is then the one decoding without drafts gives, token
    /// for token. `sampler` must have observed the tokens accepted before (penalties and the
    /// position see them).
    pub fn verdict(&self, i: usize, scores: &[f32], sampler: &Sampler) -> Verdict {
        let round = self.round.as_ref().expect("verifying inside a round");
        let d = round.drafts[i];
        match sampler.choose(scores) {
            t if t == d => Verdict::Accept(d),
            t => Verdict::Replace(t),
        }
    }

    /// Ends the round after `accepted` of its drafts stood; returns the cache length to roll
    /// back to (`t0` and the accepted drafts).
    pub fn finish_round(&mut self, accepted: usize) -> usize {
        let round = self.round.take().expect("a round to finish");
        // The verdicts: `accepted` stood, then one fell (unless all stood).
        let fell = usize::from(accepted < round.len);
        for stood in std::iter::repeat_n(1.0, accepted).chain(std::iter::repeat_n(0.0, fell)) {
            self.acceptance += VERDICT_WEIGHT * (stood - self.acceptance);
        }
        if !self.spec.adaptive || self.best_length().is_some() {
            self.next_pause = FIRST_PAUSE;
            self.probing = false;
        } else {
            self.pause();
        }
        round.base_len + 1 + accepted
    }

    /// Plain steps for a while, then a one-token probe; the next pause is twice as long.
    fn pause(&mut self) {
        self.paused = self.next_pause;
        self.next_pause = (self.next_pause * 2).min(MAX_PAUSE);
        self.probing = true;
    }

    /// A draft step against a plain one: timed when both have been, else from the weights.
    fn draft_cost(&self) -> f64 {
        match (self.times.draft, self.times.plain) {
            (Some(d), Some(p)) if p > 0.0 => d / p,
            _ => self.cost,
        }
    }

    /// A verified position past the first, in plain steps: timed, else [`VERIFY_ROW_COST`].
    fn verify_row_cost(&self) -> f64 {
        self.times.verify_row.unwrap_or(VERIFY_ROW_COST)
    }

    /// What the policy believes now (for the debug log): the chance a draft stands, a draft
    /// step's cost and a verified position's, in plain steps.
    pub fn estimates(&self) -> (f64, f64, f64) {
        (self.acceptance, self.draft_cost(), self.verify_row_cost())
    }

    /// Takes the wall time of a step this sequence ran alone into the cost estimates.
    pub fn observe(&mut self, step: Timed) {
        let t = &mut self.times;
        match step {
            Timed::Plain(s) => t.plain = average(t.plain, s),
            Timed::Draft(s) => t.draft = average(t.draft, s),
            Timed::Verify { positions, seconds } => {
                if let (Some(p), true) = (t.plain, positions > 1) {
                    let row = ((seconds / p - 1.0) / (positions - 1) as f64).max(0.0);
                    t.verify_row = average(t.verify_row, row);
                }
            }
        }
    }

    /// Whether a round is in progress (its steps are drafts or the verify).
    pub fn in_round(&self) -> bool {
        self.round.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::request::SamplingParams;

    fn sampler(temperature: f32, seed: u64) -> Sampler {
        Sampler::new(SamplingParams::plain(temperature, seed), 0)
    }

    fn spec(k: usize, cost: f64) -> Speculation {
        Speculation::new(
            SpeculativeSpec {
                draft_layer: 2,
                max_draft_tokens: k,
                adaptive: true,
            },
            cost,
        )
    }

    /// Rounds of exactly `k` drafts (`adaptive: false`).
    fn fixed(k: usize) -> Speculation {
        Speculation::new(
            SpeculativeSpec {
                draft_layer: 2,
                max_draft_tokens: k,
                adaptive: false,
            },
            0.2,
        )
    }

    fn ln(p: &[f32]) -> Vec<f32> {
        p.iter().map(|x| x.ln()).collect()
    }

    #[test]
    fn a_round_drafts_then_verifies_and_rolls_back_to_the_accepted() {
        let mut s = fixed(3);
        let g = sampler(0.0, 1);
        assert_eq!(s.next_input(7, 10, 100), SpecInput::Draft(7));
        s.draft(&ln(&[0.1, 0.7, 0.2]), &g);
        assert_eq!(s.next_input(7, 11, 100), SpecInput::Draft(1));
        s.draft(&ln(&[0.6, 0.2, 0.2]), &g);
        assert_eq!(s.next_input(7, 12, 100), SpecInput::Draft(0));
        s.draft(&ln(&[0.1, 0.1, 0.8]), &g);
        assert_eq!(
            s.next_input(7, 13, 100),
            SpecInput::Verify {
                tokens: vec![7, 1, 0, 2],
                base_len: 10
            }
        );
        assert_eq!(s.drafts(), &[1, 0, 2]);
        // the target agrees on the first draft and not on the second
        assert_eq!(s.verdict(0, &ln(&[0.2, 0.5, 0.3]), &g), Verdict::Accept(1));
        assert_eq!(s.verdict(1, &ln(&[0.2, 0.5, 0.3]), &g), Verdict::Replace(1));
        assert_eq!(s.finish_round(1), 10 + 1 + 1);
        assert!(!s.in_round() && s.drafts().is_empty());
    }

    #[test]
    fn drafts_stop_short_of_the_last_token_allowed() {
        let mut s = fixed(8);
        assert_eq!(s.next_input(5, 3, 1), SpecInput::Plain);
        assert_eq!(s.next_input(5, 3, 3), SpecInput::Draft(5));
        let g = sampler(0.0, 1);
        s.draft(&ln(&[0.5, 0.5]), &g);
        s.draft(&ln(&[0.5, 0.5]), &g);
        assert!(
            matches!(s.next_input(5, 5, 3), SpecInput::Verify { ref tokens, .. } if tokens.len() == 3)
        );
    }

    /// Runs one round whose first `accepted` drafts stand; returns its length (0: a plain
    /// step instead).
    fn round(s: &mut Speculation, accepted: usize) -> usize {
        let g = sampler(0.0, 1);
        loop {
            match s.next_input(1, 0, 1000) {
                SpecInput::Draft(_) => s.draft(&ln(&[0.5, 0.5]), &g),
                SpecInput::Verify { .. } => break,
                SpecInput::Plain => return 0,
            }
        }
        let len = s.drafts().len();
        s.finish_round(accepted.min(len));
        len
    }

    #[test]
    fn the_length_follows_what_pays_and_failing_drafts_pause() {
        // Cheap drafts that always stand: the longest rounds allowed (after one plain step,
        // timed).
        let mut s = spec(6, 0.1);
        assert_eq!(round(&mut s, 99), 0);
        let lengths: Vec<usize> = (0..6).map(|_| round(&mut s, 99)).collect();
        assert!(lengths.windows(2).all(|w| w[0] <= w[1]), "{lengths:?}");
        assert_eq!(lengths[5], 6, "{lengths:?}");
        // A draft as dear as 0.54 of a step (GPT-Neo-125M, exit 4): a one-token probe first,
        // only short rounds pay even then, and after a run of rejections none does.
        let mut s = spec(6, 0.54);
        assert_eq!(round(&mut s, 99), 0);
        assert_eq!(round(&mut s, 99), 1);
        assert!(round(&mut s, 99) <= 2);
        let mut lengths = Vec::new();
        for _ in 0..40 {
            lengths.push(round(&mut s, 0));
        }
        // plain steps come: pauses of 4, 8, 16, ... with one-token probes between
        let first_plain = lengths.iter().position(|&l| l == 0).expect("a pause");
        let tail = &lengths[first_plain..];
        let runs: Vec<usize> = tail
            .split(|&l| l != 0)
            .map(|r| r.len())
            .filter(|&n| n > 0)
            .collect();
        assert!(runs.len() >= 3, "{lengths:?}");
        assert_eq!(&runs[..3], &[4, 8, 16], "{lengths:?}");
        assert!(tail.iter().all(|&l| l <= 1), "{lengths:?}");
    }

    #[test]
    fn the_cost_model_matches_the_shapes() {
        // GPT-Neo-125M: exit 4 against the original head reads about half the weights.
        let c = draft_cost(768, 50257, 4, 12, 1, 1.0);
        assert!((0.5..0.6).contains(&c), "{c}");
        // GPT-2 medium, exit 4 of 24: about a third.
        let c = draft_cost(1024, 50257, 4, 24, 1, 1.0);
        assert!((0.3..0.4).contains(&c), "{c}");
        let v = VERIFY_ROW_COST;
        assert!(efficiency(4, 1.0, 0.3, v) > efficiency(1, 1.0, 0.3, v));
        assert!(efficiency(1, 0.3, 0.54, v) < 1.0);
        // a draft as dear as the full pass never drafts, not even to probe
        let mut s = spec(8, 0.98);
        assert!((0..100).all(|_| round(&mut s, 99) == 0));
    }

    /// Up to 8 drafts costing `cost` by the weights, then timed: a plain step of 10 ms, a
    /// draft of `draft` s, a verifying pass of `(positions, seconds)`.
    fn timed(cost: f64, draft: f64, (positions, seconds): (usize, f64)) -> Speculation {
        let mut s = spec(8, cost);
        s.observe(Timed::Plain(0.010));
        s.observe(Timed::Draft(draft));
        s.observe(Timed::Verify { positions, seconds });
        s
    }

    #[test]
    fn timed_steps_override_the_weights_estimate() {
        // The weights say drafts are cheap; the clock says a draft takes 95 % of a plain step
        // and each verified position 20 % more: no round pays, the sequence decodes plainly.
        let mut s = timed(0.1, 0.0095, (3, 0.014));
        assert!((s.draft_cost() - 0.95).abs() < 1e-9);
        assert!((s.verify_row_cost() - 0.2).abs() < 1e-9);
        assert!((0..50).all(|_| round(&mut s, 99) == 0));
        // and the other way: a draft the weights call dear but the clock calls cheap
        let mut s = timed(0.9, 0.001, (5, 0.010));
        let lengths: Vec<usize> = (0..6).map(|_| round(&mut s, 99)).collect();
        assert_eq!(lengths.last(), Some(&8), "{lengths:?}");
        // a stall counts as three times the estimate, not more
        s.observe(Timed::Plain(10.0));
        assert!((s.times.plain.unwrap() - 0.014).abs() < 1e-9);
    }

    /// Sampled, a round emits the tokens plain sampling emits at the same positions, whatever
    /// the draft head proposes: drafts stand only where they are those tokens.
    #[test]
    fn sampled_rounds_emit_what_plain_sampling_emits() {
        let target = ln(&[0.4, 0.3, 0.2, 0.1]);
        let draft = ln(&[0.1, 0.2, 0.3, 0.4]);
        let mut plain = sampler(1.0, 9);
        let want: Vec<u32> = (0..40)
            .map(|_| {
                let t = plain.choose(&target);
                plain.observe(t);
                t
            })
            .collect();
        let (mut g, mut s) = (sampler(1.0, 9), fixed(3));
        let (mut got, mut drafted, mut accepted) = (Vec::new(), 0, 0);
        while got.len() < 40 {
            loop {
                match s.next_input(0, 0, 1000) {
                    SpecInput::Draft(_) => s.draft(&draft, &g),
                    SpecInput::Verify { .. } => break,
                    SpecInput::Plain => unreachable!("fixed rounds always draft"),
                }
            }
            let n = s.drafts().len();
            let mut stood = 0;
            for i in 0..n {
                let v = s.verdict(i, &target, &g);
                let t = match v {
                    Verdict::Accept(d) => d,
                    Verdict::Replace(t) => t,
                };
                got.push(t);
                g.observe(t);
                if v != Verdict::Accept(t) {
                    break;
                }
                stood += 1;
            }
            if stood == n {
                let t = g.choose(&target);
                got.push(t);
                g.observe(t);
            }
            drafted += n;
            accepted += stood;
            s.finish_round(stood);
        }
        got.truncate(40);
        assert_eq!(got, want);
        assert!(
            0 < accepted && accepted < drafted,
            "{accepted} of {drafted}"
        );
    }
}
