//! After the forward: prompt bookkeeping (progress, echo logprobs, inspection reports) and the
//! scoring of every sequence that reached its next token (or draft, or verified drafts).

use rayon::prelude::*;

use super::fault::inject;
use super::plan::{StepKind, StepPlan};
use super::{contained, Batcher, Phase};
use crate::engine::inspection;
use crate::engine::request::{Event, FinishReason, InspectSpec};
use crate::engine::sampling::Sampler;
use crate::engine::sequence::{read_logprob, token_logprob, Sequence};
use crate::kernels::logprob::RowLogprobs;
use crate::model::{Logits, Mode, StepLogits, TextTokenizer};

/// What a step's forward did for one sequence.
enum Progress {
    /// Its prompt is not all in yet (or this step produced no logits for it).
    Prefilling,
    /// Its next token can be chosen.
    Ready(Ready),
    /// An inspection whose reports are complete.
    Inspected,
}

/// A sequence whose next token (or draft, or verified drafts) can be chosen: the logits of
/// the heads it asked for.
pub(super) struct Ready {
    pub index: usize,
    /// The mode scored: the request's, or the draft exit's.
    mode: Mode,
    logits: Vec<Logits>,
    pub kind: StepKind,
    /// Its first generated token (the prompt just finished).
    pub first_token: bool,
}

impl Ready {
    /// For an early-exit mode's next token: the head it left at.
    pub fn exit_head(&self) -> Option<crate::model::Head> {
        if self.kind != StepKind::Next || self.mode.early_exit().is_none() {
            return None;
        }
        // Where the step chose on the device, the one head handed over is the one left at.
        if let Some(k) = self.logits.iter().position(|l| l.choice().is_some()) {
            return self.mode.heads().get(k).copied();
        }
        self.mode
            .chosen_head(&self.logits, self.rows().checked_sub(1)?)
    }

    /// The next token, when the step computed only the greedy choice (`SeqStep::choice`).
    pub fn choice(&self) -> Option<u32> {
        self.logits.iter().find_map(Logits::choice)
    }

    /// Whether the step computed the strategy's scores where the logits were (`SeqStep::sled`).
    pub fn scores_in_step(&self) -> bool {
        self.logits.first().is_some_and(Logits::are_scores)
    }

    /// The chosen token's log-probabilities, where the step read them beside its choice
    /// (`SeqStep::choice_logprobs`).
    pub fn choice_read(&self) -> Option<&RowLogprobs> {
        let chosen = self.logits.iter().find(|l| l.choice().is_some())?;
        chosen.logprobs_at(0)
    }

    /// Positions with logits (a head may be left empty: one not reached, or an early exit
    /// the token went on from).
    fn rows(&self) -> usize {
        self.logits.iter().map(Logits::rows).max().unwrap_or(0)
    }

    /// The log-distributions to choose from: at the last position, or at every verified one
    /// (one empty row when only the choice came back).
    fn scores(&self) -> Vec<Vec<f32>> {
        if self.choice().is_some() {
            return vec![Vec::new()];
        }
        let rows = match self.kind {
            StepKind::Verify => 0..self.rows(),
            _ => {
                let n = self.rows();
                n.saturating_sub(1)..n
            }
        };
        rows.map(|row| self.mode.scores_at(&self.logits, row))
            .collect()
    }
}

/// Each ready sequence's log-distributions, or the message its failure left.
pub(super) type Scored = Vec<Result<ScoredRows, String>>;

/// A ready sequence's log-distributions ([`Ready::scores`]) and, where its next token needs
/// nothing but its own sampler (no grammar to constrain the scores first), that token, drawn
/// beside the scoring on the compute pool rather than one sequence after another on the
/// model thread.
#[derive(Default)]
pub(super) struct ScoredRows {
    pub rows: Vec<Vec<f32>>,
    pub drawn: Option<u32>,
}

impl Batcher {
    /// Prompt bookkeeping (progress, prompt logprobs, inspection reports), then the heads at
    /// each sequence's last position: the logits of its next token (none for a sequence
    /// still in its prefill). A finished inspection sends its reports and ends here.
    pub(super) fn take_prompt_progress(
        &mut self,
        plan: &StepPlan,
        outputs: StepLogits,
    ) -> Vec<Ready> {
        let mut ready = Vec::with_capacity(plan.rows.len());
        let mut inspected = Vec::new();
        let mut prefilled = Vec::new();
        for (row, logits) in plan.rows.iter().zip(outputs.into_per_seq()) {
            let (i, take, all_positions) = (row.index, row.prompt_taken, row.all_positions);
            let (metrics, tokenizer, fault) = (&self.metrics, &self.tokenizer, self.cfg.fault());
            let seq = &mut self.running[i];
            let progress = contained(Phase::Plan, || {
                if row.resumed > 0 {
                    let resume = seq.resume.as_mut().expect("a resuming sequence");
                    resume.done += row.resumed;
                    if resume.left() == 0 {
                        // its cache is whole again: it decodes on at the next step
                        seq.resume = None;
                    }
                    return Progress::Prefilling;
                }
                let start = seq.prefilled;
                if take > 0 {
                    metrics.prompt_tokens.increment(take as u64);
                    seq.prefilled += take;
                }
                let inspect = seq.request.borrow().req.inspect.clone();
                if let Some(spec) = inspect {
                    inject(fault, Phase::Score, &seq.prompt);
                    record_inspection(seq, &spec, start, take, all_positions, &logits, tokenizer);
                    return if seq.in_prefill() {
                        Progress::Prefilling
                    } else {
                        Progress::Inspected
                    };
                }
                if take > 0 && all_positions {
                    let (read, scored) =
                        record_prompt_logprobs(seq, start, take, &logits, tokenizer);
                    metrics.device_logprobs.increment(read as u64);
                    metrics.device_scores.increment(scored as u64);
                }
                if seq.in_prefill() || logits.iter().all(Logits::is_empty) {
                    return Progress::Prefilling;
                }
                let kind = row.kind;
                let mode = match (kind, &seq.spec) {
                    (StepKind::Draft, Some(spec)) => Mode::exit(spec.spec.draft_layer),
                    _ => {
                        let r = seq.request.borrow();
                        r.req.mode.at_token(seq.generated, r.req.max_tokens)
                    }
                };
                Progress::Ready(Ready {
                    index: i,
                    mode,
                    logits,
                    kind,
                    first_token: take > 0,
                })
            });
            if progress.is_ok() && take > 0 && !self.running[i].in_prefill() {
                prefilled.push(i);
            }
            match progress {
                Ok(Progress::Ready(r)) => ready.push(r),
                Ok(Progress::Inspected) => inspected.push(i),
                Ok(Progress::Prefilling) => {}
                Err(message) => self.fail_members(&[i], message),
            }
        }
        // Before an inspection ends and leaves: its prompt is as good as any.
        for i in prefilled {
            self.publish_prefix(i);
        }
        for i in inspected {
            let positions = std::mem::take(&mut self.running[i].inspection);
            self.running[i].send(Event::Inspection { positions });
            self.finish(i, FinishReason::Length);
        }
        ready
    }

    /// The vocabulary-sized scoring (log-softmax, contrast) of each ready sequence and the
    /// draw of each next token that needs nothing else ([`ScoredRows::drawn`]), spread over
    /// the cores; a panic fails only its own sequence's request.
    pub(super) fn score(&self, ready: &[Ready]) -> Scored {
        let fault = self.cfg.fault();
        let inputs: Vec<(&[u32], Option<&Sampler>)> = ready
            .iter()
            .map(|r| {
                let seq = &self.running[r.index];
                let draws_alone = r.kind == StepKind::Next
                    && r.choice().is_none()
                    && seq.guide.is_none()
                    && seq.request.borrow().req.max_tokens > 0;
                (&seq.prompt[..], draws_alone.then_some(&seq.sampler))
            })
            .collect();
        ready
            .par_iter()
            .zip(inputs)
            .map(|(r, (prompt, sampler))| {
                contained(Phase::Score, || {
                    inject(fault, Phase::Score, prompt);
                    let rows = r.scores();
                    let drawn = sampler.zip(rows.last()).map(|(s, scores)| s.choose(scores));
                    ScoredRows { rows, drawn }
                })
            })
            .collect()
    }
}

/// An inspection's reports for the positions this step scored: every position of the chunk
/// (`all_positions`), or the last prompt position once the prompt is in.
fn record_inspection(
    seq: &mut Sequence,
    spec: &InspectSpec,
    start: usize,
    take: usize,
    all_positions: bool,
    logits: &[Logits],
    tok: &TextTokenizer,
) {
    let (first, rows) = if all_positions {
        (start, take)
    } else if !seq.in_prefill() {
        (seq.prompt.len() - 1, 1)
    } else {
        return;
    };
    if rows == 0 {
        return;
    }
    let heads = seq.request.borrow().heads.clone();
    let reports = inspection::reports(&heads, logits, first, rows, &seq.prompt, spec, tok);
    seq.inspection.extend(reports);
}

/// Stores the logprob of each prompt token that follows a position of this chunk; returns how
/// many came as log-probabilities read where the logits are (`SeqStep::logprobs`), not rows,
/// and how many from the strategy's scores computed there (`SeqStep::sled`).
fn record_prompt_logprobs(
    seq: &mut Sequence,
    start: usize,
    take: usize,
    logits: &[Logits],
    tok: &TextTokenizer,
) -> (usize, usize) {
    let (mode, k) = {
        let r = seq.request.borrow();
        (r.req.mode, r.req.logprobs.unwrap_or(0))
    };
    let mut read_there = 0;
    let scored_there = logits.first().is_some_and(Logits::are_scores);
    let mut scored = 0;
    for row in 0..take {
        let next = start + row + 1;
        if next >= seq.prompt.len() {
            break;
        }
        let id = seq.prompt[next];
        let logprob = match logits.first().and_then(|l| l.logprobs_at(row)) {
            Some(read) => {
                read_there += 1;
                read_logprob(id, read, k, tok)
            }
            None => {
                scored += scored_there as usize;
                token_logprob(id, &mode.logprobs(&mode.scores_at(logits, row)), k, tok)
            }
        };
        seq.prompt_logprobs.push(logprob);
    }
    (read_there, scored)
}
