//! Preemption (vLLM's priority scheduling): a request of higher priority (a lower `priority`)
//! that does not fit takes the place of running requests of lower priority. A preempted
//! request gives back its caches and keeps everything else (its tokens, samplers, grammar
//! states, speculation statistics, its place in the queue); when its turn comes again, each
//! of its sequences recomputes its cache (what the prefix cache holds of its prompt is taken
//! from there; the rest of its prompt and its generated tokens go through the forward, under
//! the prefill budget, no heads) and decodes on. Prompt chunks compute
//! each position with the same numbers a decode step does (the kernels are row-count
//! invariant), so a preempted request's output is the one it would have had.
//!
//! Not preempted: a request in its prefill, with followers still to fork, inside a speculative
//! round, an inspection, or in early-exit mode (its skipped blocks hold keys and values
//! propagated from the exit, which a full recompute would not reproduce).

use std::rc::Rc;
use std::time::Instant;

use super::{end_if_abandoned, Batcher};
use crate::engine::scheduler::{self, Demand, QueueKey};
use crate::engine::sequence::{Resume, Sequence, SharedRequest};

/// A preempted request's sequences, waiting for their turn.
pub(super) struct Parked {
    key: QueueKey,
    seqs: Vec<Sequence>,
}

impl Parked {
    /// What its sequences reserve once back.
    fn demand(&self) -> Demand {
        Demand {
            sequences: self.seqs.len(),
            tokens: self.seqs.iter().map(|s| s.reserved).sum(),
        }
    }
}

/// Whether `s` can leave the batch and come back by recomputing its cache.
fn preemptible(s: &Sequence) -> bool {
    !s.in_prefill()
        && s.next_input.is_some()
        && s.forks.is_empty()
        && s.resume.is_none()
        && s.spec.as_ref().is_none_or(|sp| !sp.in_round())
        && s.generated == s.output.len()
        // its cache holds the prompt and every generated token but the one it feeds next
        && s.cache.len() + 1 == s.prompt.len() + s.generated
}

impl Batcher {
    /// Preempts running requests of a lower priority than `priority`, the lowest (then the
    /// latest due) first, until `need` fits beside the batch; none when even all of them would
    /// not make room.
    pub(super) fn preempt_for(&mut self, priority: i32, need: Demand) {
        let budget = self.cfg.budget;
        // the common case, every request of one priority, in one pass
        if !self
            .running
            .iter()
            .any(|s| s.request.borrow().req.priority > priority)
        {
            return;
        }
        // the candidates: whole requests, each with what it would free
        let mut candidates: Vec<(QueueKey, SharedRequest, Demand)> = Vec::new();
        for s in &self.running {
            if candidates.iter().any(|(_, r, _)| Rc::ptr_eq(r, &s.request)) {
                continue;
            }
            let r = s.request.borrow();
            if r.req.priority <= priority || r.req.inspect.is_some() {
                continue;
            }
            if r.req.mode.early_exit().is_some() {
                continue;
            }
            let mine: Vec<&Sequence> = self
                .running
                .iter()
                .filter(|o| Rc::ptr_eq(&o.request, &s.request) && o.is_live())
                .collect();
            if mine.len() != r.unfinished || !mine.iter().all(|o| preemptible(o)) {
                continue;
            }
            let freed = Demand {
                sequences: mine.len(),
                tokens: mine.iter().map(|o| o.reserved).sum(),
            };
            candidates.push((r.key, Rc::clone(&s.request), freed));
        }
        let fits = |reserved: Demand| scheduler::admit_in_order(&budget, reserved, &[need]) > 0;
        let minus = |a: Demand, b: Demand| Demand {
            sequences: a.sequences.saturating_sub(b.sequences),
            tokens: a.tokens.saturating_sub(b.tokens),
        };
        let all_freed = candidates
            .iter()
            .fold(Demand::default(), |d, (_, _, f)| d.plus(*f));
        let mut reserved = self.reserved();
        if candidates.is_empty() || !fits(minus(reserved, all_freed)) {
            return;
        }
        // the worst first: the highest priority number, then the latest due
        candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
        for (key, request, freed) in candidates {
            if fits(reserved) {
                break;
            }
            self.park(key, &request);
            reserved = minus(reserved, freed);
        }
        self.publish_load();
    }

    /// Takes `request`'s sequences out of the batch, their caches given back.
    fn park(&mut self, key: QueueKey, request: &SharedRequest) {
        let (mine, others): (Vec<Sequence>, Vec<Sequence>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|s| Rc::ptr_eq(&s.request, request));
        self.running = others;
        let seqs: Vec<Sequence> = mine
            .into_iter()
            .filter(|s| s.is_live())
            .map(|mut s| {
                let mut tokens = s.prompt.to_vec();
                tokens.extend(&s.output[..s.output.len() - 1]);
                s.resume = Some(Resume { tokens, done: 0 });
                s.cache = self.model.new_cache_for(0);
                s
            })
            .collect();
        self.metrics.preemptions.increment(1);
        let r = request.borrow();
        tracing::info!(
            parent: &r.span,
            priority = r.req.priority,
            sequences = seqs.len(),
            "preempted for a request of higher priority"
        );
        drop(r);
        self.parked.push(Parked { key, seqs });
    }

    /// The queue place of the parked request that goes first.
    pub(super) fn best_parked(&self) -> Option<QueueKey> {
        self.parked.iter().map(|p| p.key).min()
    }

    /// Brings back the parked request that goes first if it fits beside the batch (cached
    /// prompts making room as for an admission). True when it did.
    pub(super) fn resume_parked(&mut self) -> bool {
        let Some(i) = (0..self.parked.len()).min_by_key(|&i| self.parked[i].key) else {
            return false;
        };
        let need = self.parked[i].demand();
        let budget = self.cfg.budget;
        if scheduler::admit_in_order(&budget, self.reserved(), &[need]) == 0 {
            return false;
        }
        if scheduler::admit_in_order(&budget, self.reserved_with_cache(), &[need]) == 0 {
            self.evict_for(need.tokens);
        }
        let parked = self.parked.remove(i);
        for mut s in parked.seqs {
            s.cache = self.model.new_cache_for(s.reserved);
            self.resume_from_cache(&mut s);
            self.join(s);
        }
        self.publish_load();
        true
    }

    /// Ends the parked requests whose client left or whose deadline passed.
    pub(super) fn drop_abandoned_parked(&mut self) {
        let now = Instant::now();
        let metrics = &self.metrics;
        self.parked.retain_mut(|p| {
            p.seqs.retain(|s| {
                end_if_abandoned(metrics, &mut s.request.borrow_mut(), now);
                s.is_live()
            });
            !p.seqs.is_empty()
        });
        self.publish_load();
    }
}
