//! A self-speculative round inside the batch: a draft step keeps its draft; the verifying
//! step emits the drafts that stand and the token after them, and the cache keeps what was
//! accepted. The policy (when to draft, how many) is `engine/speculative.rs`.

use super::fault::inject;
use super::plan::StepKind;
use super::{Batcher, Phase};
use crate::engine::request::FinishReason;
use crate::engine::sequence::Sequence;
use crate::engine::speculative::Verdict;

impl Batcher {
    /// A draft step's draft token, or a verifying step's verdicts: the drafts that stand
    /// and the token after them are emitted, and the cache keeps what was accepted.
    pub(super) fn speculate(&mut self, i: usize, kind: StepKind, rows: Vec<Vec<f32>>) {
        inject(self.cfg.fault(), Phase::Sample, &self.running[i].prompt);
        let seq = &mut self.running[i];
        let Some(spec) = seq.spec.as_mut() else {
            return;
        };
        if kind == StepKind::Draft {
            // Under a grammar, drafts are chosen inside it (and consumed ahead, to be rolled
            // back before the verification).
            let Some(guide) = seq.guide.as_mut() else {
                return spec.draft(&rows[0], &seq.sampler);
            };
            spec.draft(&guide.draft_scores(&rows[0]), &seq.sampler);
            if let Some(&d) = spec.drafts().last() {
                guide.draft(d);
            }
            return;
        }
        if let Some(guide) = seq.guide.as_mut() {
            guide.end_drafts();
        }
        let drafted = spec.drafts().len();
        // The usage counts go in before the tokens: the last token may end the request,
        // and its usage is sent with it.
        let count = |seq: &Sequence, drafted: usize, accepted: usize| {
            if let Some(u) = seq.request.borrow_mut().usage.speculative.as_mut() {
                u.drafted += drafted;
                u.accepted += accepted;
            }
        };
        count(seq, drafted, 0);
        self.metrics.speculative_drafted.increment(drafted as u64);
        let mut accepted = 0;
        for (row, scores) in rows.iter().enumerate() {
            let seq = &mut self.running[i];
            // Each position is verified against the grammar where the accepted tokens left it.
            let masked;
            let scores = match seq.guide.as_mut() {
                None => scores,
                Some(guide) => match guide.masked(scores) {
                    Some(m) => {
                        masked = m;
                        &masked
                    }
                    None => {
                        self.finish(i, FinishReason::Stop);
                        break;
                    }
                },
            };
            let spec = seq.spec.as_ref().expect("checked above");
            let (id, stands) = if row < drafted {
                match spec.verdict(row, scores, &seq.sampler) {
                    Verdict::Accept(d) => (d, true),
                    Verdict::Replace(t) => (t, false),
                }
            } else {
                (seq.sampler.choose(scores), false)
            };
            if stands {
                accepted += 1;
                count(seq, 0, 1);
                self.metrics.speculative_accepted.increment(1);
            }
            if self.emit_token(i, id, (scores, None), None) || !stands {
                break;
            }
        }
        let seq = &mut self.running[i];
        let spec = seq.spec.as_mut().expect("checked above");
        let keep = spec.finish_round(accepted);
        seq.cache.truncate(keep);
    }
}
