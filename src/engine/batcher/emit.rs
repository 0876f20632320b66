//! Choosing and sending tokens: sampling, the `n`/`best_of` followers forked from a prompt's
//! leader, the echoed prompt, and the end of a sequence and of its request.

use std::collections::HashMap;
use std::time::Instant;

use super::fault::inject;
use super::plan::StepKind;
use super::progress::{Ready, Scored, ScoredRows};
use super::{contained, Batcher, Phase};
use crate::engine::request::{Event, FinishReason};
use crate::engine::sampling::Sampler;
use crate::engine::sequence::{Outcome, Sequence, SharedRequest};
use crate::engine::structured::{Constrained, Guide};
use crate::kernels::logprob::RowLogprobs;
use crate::model::Head;

impl Batcher {
    /// Samples and emits each ready sequence's token; a sequence that just finished its
    /// prompt first forks its `n`/`best_of` followers, which share its prompt and scores.
    pub(super) fn emit(&mut self, ready: Vec<Ready>, scored: Scored) {
        self.prepare_masks(&ready, &scored);
        let mut forked = Vec::new();
        for (r, scored) in ready.into_iter().zip(scored) {
            let ScoredRows { mut rows, drawn } = match scored {
                Ok(s) => s,
                Err(message) => {
                    self.fail_members(&[r.index], message);
                    continue;
                }
            };
            if !self.running[r.index].is_live() {
                continue;
            }
            if r.kind != StepKind::Next {
                if let Err(message) =
                    contained(Phase::Emit, || self.speculate(r.index, r.kind, rows))
                {
                    self.fail_members(&[r.index], message);
                }
                continue;
            }
            let scores = rows.pop().unwrap_or_default();
            if r.scores_in_step() {
                self.metrics.device_scores.increment(1);
            }
            let (head, choice, read) = (r.exit_head(), r.choice(), r.choice_read());
            let result = contained(Phase::Emit, || {
                let mut followers = Vec::new();
                if r.first_token {
                    followers = self
                        .fork_followers(r.index, &scores)?
                        .into_iter()
                        .map(|(seq, scores)| (seq, scores, head))
                        .collect();
                    self.send_prompt_event(r.index);
                }
                self.sample_and_emit(r.index, &scores, head, (choice, read, drawn));
                Ok::<_, String>(followers)
            });
            match result {
                Ok(Ok(followers)) => forked.extend(followers),
                Ok(Err(message)) | Err(message) => self.fail_members(&[r.index], message),
            }
        }
        for (seq, scores, head) in forked {
            if !seq.is_live() {
                continue;
            }
            self.join(seq);
            let idx = self.running.len() - 1;
            let result = contained(Phase::Emit, || {
                self.send_prompt_event(idx);
                self.sample_and_emit(idx, &scores, head, (None, None, None));
            });
            if let Err(message) = result {
                self.fail_members(&[idx], message);
            }
        }
    }

    /// Structured outputs: the token masks of this step's constrained sequences, computed
    /// at once on the compute pool (each is llguidance's work on one grammar; one after
    /// another they would add up on the model thread), before sampling takes them in order.
    fn prepare_masks(&mut self, ready: &[Ready], scored: &Scored) {
        use rayon::prelude::*;
        let mut next: HashMap<usize, &[f32]> = HashMap::new();
        for (r, rows) in ready.iter().zip(scored) {
            if let (StepKind::Next, Ok(scored)) = (r.kind, rows) {
                if let Some(last) = scored.rows.last() {
                    next.insert(r.index, last);
                }
            }
        }
        let mut jobs: Vec<(&mut Guide, &[f32], Option<u32>)> = Vec::new();
        for (i, seq) in self.running.iter_mut().enumerate() {
            if let Some(guide) = seq.guide.as_mut() {
                // Never a mask of an earlier step's scores.
                guide.forget_prepared();
                if let Some(&scores) = next.get(&i) {
                    let hint = greedy_hint(&seq.request, &seq.sampler, scores);
                    jobs.push((guide, scores, hint));
                }
            }
        }
        if jobs.len() > 1 {
            jobs.par_iter_mut()
                .for_each(|(guide, scores, hint)| guide.prepare(scores, *hint));
        }
    }

    /// The leader's followers, each with its own copy of the prompt's cache. A failed copy
    /// fails the request (its followers could never run).
    fn fork_followers(
        &mut self,
        i: usize,
        scores: &[f32],
    ) -> Result<Vec<(Sequence, Vec<f32>)>, String> {
        let forks = std::mem::take(&mut self.running[i].forks);
        let mut out = Vec::with_capacity(forks.len());
        for candidate in forks {
            let leader = &self.running[i];
            inject(self.cfg.fault(), Phase::Fork, &leader.prompt);
            let cache = leader
                .cache
                .fork()
                .map_err(|e| format!("forking the cache of a `best_of` candidate failed: {e}"))?;
            let sampling = leader.request.borrow().req.sampling.clone();
            let mut seq = Sequence::new(
                leader.request.clone(),
                candidate,
                leader.prompt.clone(),
                cache,
                Sampler::new(sampling, candidate as u64).with_prompt(&leader.prompt),
            );
            seq.prefilled = leader.prefilled;
            seq.reserved = leader.reserved;
            seq.prompt_logprobs = leader.prompt_logprobs.clone();
            out.push((seq, scores.to_vec()));
        }
        Ok(out)
    }

    fn send_prompt_event(&self, i: usize) {
        let seq = &self.running[i];
        let echo = seq.request.borrow().req.echo;
        if !echo {
            return;
        }
        let mut tokens = Vec::with_capacity(seq.prompt.len());
        for (p, &id) in seq.prompt.iter().enumerate() {
            let text = self.tokenizer.decode(&[id]).unwrap_or_default();
            let lp = p
                .checked_sub(1)
                .and_then(|q| seq.prompt_logprobs.get(q).cloned());
            tokens.push((id, text, lp));
        }
        seq.send(Event::Prompt {
            candidate: seq.candidate,
            text: self.tokenizer.decode(&seq.prompt).unwrap_or_default(),
            tokens,
        });
    }

    /// Chooses sequence `i`'s token from `scores` and emits it. `head`: for an early-exit
    /// mode, the head the token left at; `choice`: the token chosen on the device
    /// (`Ready::choice`, `scores` then empty), with `read`, its log-probabilities read there
    /// (`Ready::choice_read`); `drawn`: the token its sampler drew already
    /// (`ScoredRows::drawn`).
    fn sample_and_emit(
        &mut self,
        i: usize,
        scores: &[f32],
        head: Option<Head>,
        (choice, read, drawn): (Option<u32>, Option<&RowLogprobs>, Option<u32>),
    ) {
        if self.running[i].request.borrow().req.max_tokens == 0 {
            // echo with max_tokens 0: the prompt was only scored.
            return self.finish(i, FinishReason::Length);
        }
        inject(self.cfg.fault(), Phase::Sample, &self.running[i].prompt);
        let masked;
        let seq = &mut self.running[i];
        let (scores, chosen) = match seq.guide.as_mut() {
            None => (scores, None),
            Some(guide) => {
                match guide.constrain(scores, || greedy_hint(&seq.request, &seq.sampler, scores)) {
                    Constrained::Allowed(id) => (scores, Some(id)),
                    Constrained::Masked(m) => {
                        masked = m;
                        (&masked[..], None)
                    }
                    // The grammar allows nothing more: the output ends here.
                    Constrained::DeadEnd => return self.finish(i, FinishReason::Stop),
                }
            }
        };
        let (id, read) = match (chosen, choice) {
            (Some(id), _) => (id, None),
            (None, Some(id)) => {
                self.metrics.device_choices.increment(1);
                if read.is_some() {
                    self.metrics.device_logprobs.increment(1);
                }
                (id, read)
            }
            (None, None) => (
                drawn.unwrap_or_else(|| self.running[i].sampler.choose(scores)),
                None,
            ),
        };
        let exit_layer = head.map(|h| h.layer(self.model.config().num_layers));
        if let Some(head) = head {
            let layer = match head {
                Head::Exit(l) => l.to_string(),
                _ => "original".to_string(),
            };
            self.metrics.early_exit_token(&layer);
            let mut r = self.running[i].request.borrow_mut();
            *r.usage
                .early_exit
                .get_or_insert_default()
                .entry(layer)
                .or_default() += 1;
        }
        self.emit_token(i, id, (scores, read), exit_layer);
    }

    /// Emits token `id` chosen from `scores` (or where the logits are, its log-probabilities
    /// `read` there: see `Sequence::accept`) at `exit_layer` for early exit; returns whether
    /// the sequence finished.
    pub(super) fn emit_token(
        &mut self,
        i: usize,
        id: u32,
        (scores, read): (&[f32], Option<&RowLogprobs>),
        exit_layer: Option<usize>,
    ) -> bool {
        let now = Instant::now();
        let seq = &mut self.running[i];
        {
            let mut r = seq.request.borrow_mut();
            r.usage.completion_tokens += 1;
            if r.first_token_at.is_none() {
                r.first_token_at = Some(now);
                self.metrics.time_to_first_token.record(now - r.arrived);
            }
        }
        if let Some(prev) = seq.last_token_at {
            self.metrics.inter_token_latency.record(now - prev);
        }
        seq.last_token_at = Some(now);
        self.metrics.generated_tokens.increment(1);
        inject(self.cfg.fault(), Phase::Emit, &seq.prompt);
        let outcome = seq.accept(
            id,
            (scores, read),
            &self.tokenizer,
            self.cfg.eos_token_id,
            exit_layer,
        );
        if let Some(guide) = seq.guide.as_mut() {
            self.metrics
                .grammar_step
                .record(guide.take_spent().as_secs_f64());
        }
        if let Outcome::Finished(reason) = outcome {
            self.finish(i, reason);
            return true;
        }
        false
    }

    pub(super) fn finish(&mut self, i: usize, reason: FinishReason) {
        let seq = &mut self.running[i];
        seq.finished = true;
        if let Some(spec) = &seq.spec {
            let (acceptance, draft_cost, verify_row_cost) = spec.estimates();
            let _e = seq.request.borrow().span.clone().entered();
            tracing::debug!(
                acceptance,
                draft_cost,
                verify_row_cost,
                "speculation estimates"
            );
        }
        seq.send(Event::End {
            candidate: seq.candidate,
            finish_reason: reason,
            cumulative_logprob: seq.cumulative_logprob,
        });
        let mut r = seq.request.borrow_mut();
        r.unfinished -= 1;
        if r.unfinished == 0 {
            self.metrics.e2e_latency.record(r.arrived.elapsed());
            self.metrics.request_finished("ok", r.mode_label);
            {
                let _e = r.span.enter();
                tracing::info!(
                    prompt_tokens = r.usage.prompt_tokens,
                    completion_tokens = r.usage.completion_tokens,
                    drafted = r.usage.speculative.map(|u| u.drafted),
                    accepted = r.usage.speculative.map(|u| u.accepted),
                    ms = r.arrived.elapsed().as_millis() as u64,
                    queued_ms = since(r.arrived, r.admitted_at),
                    first_token_ms = since(r.arrived, r.first_token_at),
                    "completed"
                );
            }
            // Last: once the client has its answer, a shutdown may end the process at once,
            // and the log line and metrics above must not be lost with it.
            let usage = std::mem::take(&mut r.usage);
            let _ = r.tx.try_send(Event::Done { usage });
        }
    }
}

/// For a constrained sequence (its request and sampler) whose next token is greedy and whose distribution nobody reads
/// (no logprobs, no `best_of` ranking): the token greedy decoding picks from `scores` without
/// the mask, for the grammar to check (see [`Guide::constrain`]).
fn greedy_hint(request: &SharedRequest, sampler: &Sampler, scores: &[f32]) -> Option<u32> {
    let r = request.borrow();
    let unread = r.req.logprobs.is_none() && r.req.best_of == r.req.n;
    (sampler.is_greedy() && unread).then(|| sampler.choose(scores))
}

/// Milliseconds from `from` to `to`, when `to` happened.
fn since(from: Instant, to: Option<Instant>) -> Option<u64> {
    to.map(|t| t.duration_since(from).as_millis() as u64)
}
