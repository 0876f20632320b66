//! Planning a step: what each running sequence feeds the forward (a prompt chunk under the
//! prefill budget, its next token, a draft or a verifying pass), as one [`RowPlan`] per row.
//! The budget arithmetic itself is the pure scheduler's (`engine/scheduler.rs`).

use super::fault::inject;
use super::{contained, Batcher, Phase};
use crate::engine::scheduler::{self, SeqView};
use crate::engine::sequence::Sequence;
use crate::engine::speculative::SpecInput;
use crate::model::cost::scored_position_cost;
use crate::model::mode::{DeviceChoice, EarlyExitParams, SledRule};
use crate::model::{Head, LogprobRead};

/// Positions an inspection of every position scores per step: its logits stay resident for
/// every head, so this bounds that memory (and leaves the prefill budget to others).
const INSPECT_CHUNK: usize = 32;

/// What a decoding sequence does in a step (a prompt chunk is `Next`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StepKind {
    /// Its next token, from its mode's heads at the last position.
    Next,
    /// A draft token, from the draft exit (self-speculative decoding).
    Draft,
    /// The verifying pass over a round's drafts: the mode's heads at every position.
    Verify,
}

/// One sequence's part in a step.
pub(super) struct RowPlan {
    /// Its index in `running`.
    pub index: usize,
    /// The tokens fed: a prompt chunk, the next token, a draft or the drafts to verify.
    pub tokens: Vec<u32>,
    /// Prompt tokens fed (0 for a decoding sequence).
    pub prompt_taken: usize,
    /// Positions a preempted sequence recomputed (its prompt and generated tokens again).
    pub resumed: usize,
    /// Attend query by query, as decode steps do: a verifying pass, and a preempted
    /// sequence's generated positions.
    pub per_query: bool,
    /// The heads evaluated (none for a prompt chunk that is neither last nor scored).
    pub heads: Vec<Head>,
    /// Blocks run.
    pub depth: usize,
    /// Heads at every position fed, not only the last.
    pub all_positions: bool,
    pub kind: StepKind,
    /// An early-exit mode's threshold for this token, decided in the forward (decode only:
    /// prompt positions run every block).
    pub early_exit: Option<EarlyExitParams>,
    /// Only the choice of its next token is read, made thus (`SeqStep::choice`), and with it
    /// its log-probabilities, the top this many (`SeqStep::choice_logprobs`).
    pub choice: Option<(DeviceChoice, Option<usize>)>,
    /// Its DoLa premature candidate may be chosen in the step (`SeqStep::select_premature`).
    pub select_premature: bool,
    /// Echo's scoring read as log-probabilities (`SeqStep::logprobs`): the targets of its
    /// first rows and what is read of them.
    pub logprobs: Option<(Vec<u32>, LogprobRead)>,
    /// Its scores may be computed in the step, thus (SLED's: `SeqStep::sled`).
    pub sled: Option<SledRule>,
}

/// The inputs of one step, in `running` order over the sequences that take part.
pub(super) struct StepPlan {
    pub rows: Vec<RowPlan>,
}

impl StepPlan {
    /// The members' indices into `running`.
    pub fn members(&self) -> Vec<usize> {
        self.rows.iter().map(|r| r.index).collect()
    }
}

impl Batcher {
    /// What each running sequence feeds this step: a prompt chunk under the prefill budget,
    /// or its one new token. A stream whose client has not read its events sits out.
    pub(super) fn plan(&mut self) -> StepPlan {
        let (hidden, vocab) = {
            let c = self.model.config();
            (c.hidden_size, c.vocab_size)
        };
        let views: Vec<SeqView> = self
            .running
            .iter()
            .map(|s| {
                let r = s.request.borrow();
                let inspect_all = r.req.inspect.as_ref().is_some_and(|i| i.all_positions);
                // a preempted sequence recomputing its cache takes prompt chunks too
                let resume_left = s.resume.as_ref().map(|r| r.left());
                SeqView {
                    prompt_left: resume_left.unwrap_or(s.prompt.len() - s.prefilled),
                    can_emit: r.can_emit(),
                    max_chunk: if inspect_all {
                        INSPECT_CHUNK
                    } else {
                        usize::MAX
                    },
                    // A position scored at every head (echo with logprobs, an inspection of
                    // every position) is charged its vocabulary work, so that such prompts
                    // cannot make one step long for every sequence in it.
                    cost_per_token: if r.req.scores_every_prompt_position() && resume_left.is_none()
                    {
                        scored_position_cost(hidden, vocab, r.depth, r.heads.len())
                    } else {
                        1
                    },
                    priority: r.req.priority,
                    turn: s.turn,
                }
            })
            .collect();
        let paused = views.iter().filter(|v| !v.can_emit).count();
        self.metrics.paused_sequences.set(paused as f64);
        let scheduler::Plan { slots, yielded } = scheduler::plan_step(self.cfg.budget.step, &views);
        self.metrics.priority_yields.increment(yielded as u64);
        let decoding = slots.iter().filter(|s| s.prompt_take == 0).count();
        let may_draft = decoding <= self.cfg.speculative_max_batch;
        let mut rows = Vec::with_capacity(slots.len());
        let fault = self.cfg.fault();
        for slot in slots {
            let s = &mut self.running[slot.index];
            let planned = contained(Phase::Plan, || {
                inject(fault, Phase::Plan, &s.prompt);
                if slot.prompt_take == 0 {
                    decode_row(s, slot.index, may_draft)
                } else if s.resume.is_some() {
                    resume_row(s, slot.index, slot.prompt_take)
                } else {
                    prompt_row(s, slot.index, slot.prompt_take)
                }
            });
            match planned {
                Ok(row) => rows.push(row),
                Err(message) => self.fail_members(&[slot.index], message),
            }
        }
        StepPlan { rows }
    }
}

/// A preempted sequence's next `take` positions to recompute: no heads (the token it feeds
/// next is already chosen).
fn resume_row(s: &Sequence, index: usize, take: usize) -> RowPlan {
    let resume = s.resume.as_ref().expect("resuming");
    // Each position as it was first computed: prompt positions as a prompt chunk, generated
    // ones query by query as decode steps (and verifying passes) computed them. A chunk
    // does not straddle the two.
    let in_prompt = resume.done < s.prompt.len();
    let take = if in_prompt {
        take.min(s.prompt.len() - resume.done)
    } else {
        take
    };
    RowPlan {
        index,
        tokens: resume.tokens[resume.done..resume.done + take].to_vec(),
        prompt_taken: 0,
        resumed: take,
        per_query: !in_prompt,
        heads: Vec::new(),
        depth: s.request.borrow().depth,
        all_positions: false,
        kind: StepKind::Next,
        early_exit: None,
        choice: None,
        select_premature: false,
        logprobs: None,
        sled: None,
    }
}

/// How the sequence's next token may be chosen where the logits are, when nothing else of
/// them is read: nothing that edits the scores (bias, penalties), a mode with a device choice
/// (its head's argmax or draw, or the contrast's), no followers to fork from these scores, no
/// grammar, no inspection, no speculation. Then a step on the device copies only the choice,
/// and, where the token's logprob is read (reported, or `best_of`'s ranking), the chosen
/// token's log-probability and the top `logprobs` asks for of the distribution it was chosen
/// from, read there too.
fn device_choice(s: &Sequence) -> Option<(DeviceChoice, Option<usize>)> {
    let r = s.request.borrow();
    let req = &r.req;
    let draw = s.sampler.unedited_draw()?;
    let reads_only_the_choice = s.forks.is_empty()
        && s.guide.is_none()
        && s.spec.is_none()
        && req.inspect.is_none()
        && req.max_tokens > 0;
    if !reads_only_the_choice {
        return None;
    }
    let choice = req
        .mode
        .at_token(s.generated, req.max_tokens)
        .device_choice()?
        .drawn(draw);
    let reads_logprob = req.logprobs.is_some() || req.best_of > req.n;
    Some((choice, reads_logprob.then(|| req.logprobs.unwrap_or(0))))
}

/// Whether the sequence's DoLa candidate may be chosen in the step: nothing but its scores
/// reads the candidates' rows (no inspection, which reports each position's choice from all
/// of them).
fn selects_premature(s: &Sequence) -> bool {
    let r = s.request.borrow();
    let req = &r.req;
    req.inspect.is_none()
        && req
            .mode
            .at_token(s.generated, req.max_tokens)
            .selects_premature()
}

/// How the sequence's scores may be computed in the step (SLED's): nothing but its scores
/// reads its heads' rows (no inspection, which reports every head); a bias, penalties or a
/// grammar then edit those scores on the host as they would the host's.
fn device_scores(s: &Sequence) -> Option<SledRule> {
    let r = s.request.borrow();
    let req = &r.req;
    if req.inspect.is_some() {
        return None;
    }
    req.mode
        .at_token(s.generated, req.max_tokens)
        .device_scores()
}

/// A prefilling sequence's next `take` prompt tokens.
fn prompt_row(s: &Sequence, index: usize, take: usize) -> RowPlan {
    let r = s.request.borrow();
    let all_positions = r.req.scores_every_prompt_position();
    let last_chunk = s.prefilled + take == s.prompt.len();
    RowPlan {
        index,
        tokens: s.prompt[s.prefilled..s.prefilled + take].to_vec(),
        prompt_taken: take,
        resumed: 0,
        per_query: false,
        // Heads at the last position once the prompt is in; at every prompt position for
        // echo with logprobs.
        heads: if last_chunk || all_positions {
            r.heads.clone()
        } else {
            Vec::new()
        },
        depth: r.depth,
        all_positions,
        kind: StepKind::Next,
        early_exit: None,
        choice: device_choice(s).filter(|_| last_chunk && !all_positions),
        select_premature: last_chunk && !all_positions && selects_premature(s),
        logprobs: prompt_logprobs(s, take),
        sled: device_scores(s).filter(|_| last_chunk || all_positions),
    }
}

/// What echo's scoring reads of a prompt chunk's rows, when that may be read as
/// log-probabilities where the logits are (`SeqStep::logprobs`): each row's next prompt
/// token (the rows that have one) and the top `logprobs` asks for, of the distribution its
/// device choice reads (the log-softmax of its one head, the contrast's log q, the log-softmax
/// of DoLa's logits). Only where nothing else reads the rows (no inspection).
fn prompt_logprobs(s: &Sequence, take: usize) -> Option<(Vec<u32>, LogprobRead)> {
    let r = s.request.borrow();
    let req = &r.req;
    if !req.echo || req.inspect.is_some() {
        return None;
    }
    let contrast = match req.mode.device_choice()? {
        DeviceChoice::HeadArgmax if req.mode.heads().len() == 1 => None,
        c @ (DeviceChoice::Contrast { .. } | DeviceChoice::Dola { .. }) => c.rule(),
        _ => return None,
    };
    let top = req.logprobs?;
    let end = (s.prefilled + take + 1).min(s.prompt.len());
    let targets = s.prompt[s.prefilled + 1..end].to_vec();
    Some((targets, LogprobRead { top, contrast }))
}

/// A decoding sequence's input for this step: its next token through its mode, or, when it
/// speculates, a draft step at the draft exit or the verifying pass over the round's drafts
/// (its cache rolled back to where the round began).
fn decode_row(s: &mut Sequence, index: usize, may_draft: bool) -> RowPlan {
    let next = s.next_input.expect("decoding sequences have a token");
    let (remaining, heads, depth, early_exit) = {
        let r = s.request.borrow();
        let mode = r.req.mode.at_token(s.generated, r.req.max_tokens);
        (
            r.req.max_tokens - s.generated,
            r.heads.clone(),
            r.depth,
            mode.early_exit(),
        )
    };
    let input = match s.spec.as_mut() {
        Some(spec) if may_draft || spec.in_round() => {
            spec.next_input(next, s.cache.len(), remaining)
        }
        _ => SpecInput::Plain,
    };
    let row = |tokens, heads, depth, all_positions, kind| RowPlan {
        index,
        tokens,
        prompt_taken: 0,
        resumed: 0,
        per_query: kind == StepKind::Verify,
        heads,
        depth,
        all_positions,
        kind,
        early_exit: None,
        choice: None,
        select_premature: false,
        logprobs: None,
        sled: None,
    };
    match input {
        SpecInput::Plain => RowPlan {
            early_exit,
            choice: device_choice(s),
            select_premature: selects_premature(s),
            sled: device_scores(s),
            ..row(vec![next], heads, depth, false, StepKind::Next)
        },
        SpecInput::Draft(token) => {
            let layer = s.spec.as_ref().map_or(depth, |sp| sp.spec.draft_layer);
            row(
                vec![token],
                vec![Head::Exit(layer)],
                layer,
                false,
                StepKind::Draft,
            )
        }
        SpecInput::Verify { tokens, base_len } => {
            s.cache.truncate(base_len);
            row(tokens, heads, depth, true, StepKind::Verify)
        }
    }
}
