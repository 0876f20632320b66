//! Admission: requests come off the queue into the batch while the scheduler's budget allows,
//! in the queue's order (priority, then size-weighted arrival: `scheduler::due`); the next
//! request that does not fit yet waits at the head, so that it cannot be starved.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use super::fault::inject;
use super::{contained, end_if_abandoned, end_request, Batcher, Phase};
use crate::engine::error::EngineError;
use crate::engine::request::{SpeculativeUsage, Submission, Usage};
use crate::engine::sampling::Sampler;
use crate::engine::scheduler::{self, Demand, QueueKey};
use crate::engine::sequence::{RequestState, Sequence, SharedRequest};
use crate::engine::speculative::draft_cost;
use crate::engine::validate::ValidationError;

/// A request taken from the queue whose prompts have not all joined the batch yet.
pub(super) struct Pending {
    state: SharedRequest,
    /// `(prompt index, tokens)`, in order.
    prompts: VecDeque<(usize, Rc<Vec<u32>>)>,
    started: bool,
    /// Its place in the queue: priority, then due (size-weighted arrival), then arrival.
    key: QueueKey,
}

impl Batcher {
    /// Pulls requests into the batch while the budget allows; blocks only when idle. Returns
    /// false when the queue is closed and the batch is idle.
    pub(super) fn admit(&mut self) -> bool {
        let go_on = self.admit_while_room();
        let lowest = self.waiting.iter().map(|p| p.key.priority).max();
        let held = self.held.as_ref().filter(|p| !p.started);
        self.queue
            .set_lowest_waiting(lowest.max(held.map(|p| p.key.priority)));
        go_on
    }

    fn admit_while_room(&mut self) -> bool {
        loop {
            if !self.receive() {
                return false;
            }
            // A preempted request that goes before the held one (not started) passes it.
            let parked = self.best_parked();
            if let (Some(k), Some(p)) = (parked, self.held.as_ref()) {
                if !p.started && k < p.key {
                    let p = self.held.take().expect("checked");
                    self.waiting.push(p);
                }
            }
            if self.held.is_none() {
                // A request whose prompt another one's prefill is computing waits for it.
                let eligible: Vec<usize> = (0..self.waiting.len())
                    .filter(|&i| {
                        let p = &self.waiting[i];
                        let first = p.prompts.front().map_or(&[][..], |(_, t)| &t[..]);
                        !self.waits_for_prefix(&p.state.borrow(), first)
                    })
                    .collect();
                let order: Vec<QueueKey> = eligible.iter().map(|&i| self.waiting[i].key).collect();
                let next = scheduler::next_in_queue(&order);
                // A preempted request comes back when its turn comes, as a waiting one would.
                if let Some(k) = parked {
                    if next.is_none_or(|n| k < order[n]) {
                        if self.resume_parked() {
                            continue;
                        }
                        return true;
                    }
                }
                let Some(next) = next else {
                    return true;
                };
                self.held = Some(self.waiting.remove(eligible[next]));
            }
            match contained(Phase::Admit, || self.admit_held()) {
                Ok(true) => continue,
                Ok(false) => return true,
                Err(message) => {
                    tracing::error!(%message, "admission failed; failing its request");
                    if let Some(p) = self.held.take() {
                        self.dequeued();
                        let mut r = p.state.borrow_mut();
                        end_request(
                            &self.metrics,
                            &mut r,
                            "error",
                            Some(EngineError::Internal(message)),
                        );
                    }
                    self.sweep();
                }
            }
        }
    }

    /// Takes every submission queued into `waiting` (blocking while there is nothing at all
    /// to do). A held request that has not started goes back among them, so that one of
    /// higher priority that came since can pass it. False when the queue is closed and
    /// nothing is left.
    fn receive(&mut self) -> bool {
        if self.running.is_empty()
            && self.waiting.is_empty()
            && self.held.is_none()
            && self.parked.is_empty()
        {
            match self.rx.blocking_recv() {
                Some(sub) => self.enqueue(sub),
                None => return false,
            }
        }
        while let Ok(sub) = self.rx.try_recv() {
            self.enqueue(sub);
        }
        // Requests whose client left or whose deadline passed while they waited end now, and
        // give back their places (one of low priority may wait long).
        let now = Instant::now();
        let before = self.waiting.len();
        self.waiting.retain(|p| {
            let mut r = p.state.borrow_mut();
            end_if_abandoned(&self.metrics, &mut r, now);
            r.unfinished > 0
        });
        for _ in self.waiting.len()..before {
            self.dequeued();
        }
        self.drop_abandoned_parked();
        if self.held.as_ref().is_some_and(|p| !p.started) && !self.waiting.is_empty() {
            let p = self.held.take().expect("checked");
            self.waiting.push(p);
        }
        self.turn_away_over_the_bound();
        true
    }

    /// Requests of a higher priority may be let in over the queue's bound (`queue.rs`): the
    /// waiting requests that would be served last leave with a 429 until it holds again.
    fn turn_away_over_the_bound(&mut self) {
        let unstarted = usize::from(self.held.as_ref().is_some_and(|p| !p.started));
        while self.waiting.len() + unstarted > self.queue.max() {
            let Some(last) = (0..self.waiting.len()).max_by_key(|&i| self.waiting[i].key) else {
                break;
            };
            let p = self.waiting.remove(last);
            self.dequeued();
            self.metrics.rejections.increment(1);
            let mut r = p.state.borrow_mut();
            let queued = self.queue.max();
            end_request(
                &self.metrics,
                &mut r,
                "rejected",
                Some(EngineError::Displaced { queued }),
            );
        }
    }

    fn enqueue(&mut self, sub: Submission) {
        let p = self.pending(sub);
        self.waiting.push(p);
    }

    /// A request left the queue (admitted or ended): its place goes back.
    fn dequeued(&self) {
        self.metrics.queue_depth.decrement(1.0);
        self.queue.give_back();
    }

    fn pending(&mut self, sub: Submission) -> Pending {
        let Submission {
            req,
            tx,
            span,
            arrived,
        } = sub;
        let tokens = req
            .prompts
            .iter()
            .map(|p| demand(p.len(), req.max_tokens, req.best_of))
            .fold(Demand::default(), Demand::plus)
            .tokens;
        let key = QueueKey {
            priority: req.priority,
            due: scheduler::due(arrived, tokens, self.cfg.queue_slack_per_token),
            seq: self.received,
        };
        self.received += 1;
        let n_layers = self.model.config().num_layers;
        let (heads, depth) = if let Some(spec) = &req.inspect {
            (spec.heads(&self.model.config().exit_layers), n_layers)
        } else {
            (req.mode.heads(), req.mode.depth(n_layers))
        };
        let prompts = req
            .prompts
            .iter()
            .cloned()
            .map(Rc::new)
            .enumerate()
            .collect();
        let cfg = self.model.config();
        if let Some(s) = req.speculative {
            // Made at validation (`Engine::validate`), off this thread; a request submitted
            // without it gets them here, before any timed step.
            if let Err(e) = self.model.prepare_draft(s.draft_layer) {
                tracing::error!(error = %e, layer = s.draft_layer, "cannot make the draft copies");
            }
        }
        let draft_cost = req.speculative.map_or(1.0, |s| {
            draft_cost(
                cfg.hidden_size,
                cfg.vocab_size,
                s.draft_layer,
                depth,
                heads.len(),
                self.model.draft_read_cost(),
            )
        });
        let state = Rc::new(RefCell::new(RequestState {
            heads,
            depth,
            unfinished: req.prompts.len() * req.best_of,
            usage: Usage {
                prompt_tokens: req.prompt_tokens(),
                cached_tokens: 0,
                completion_tokens: 0,
                speculative: req.speculative.map(|_| SpeculativeUsage::default()),
                early_exit: req.mode.early_exit().map(|_| Default::default()),
            },
            mode_label: if req.inspect.is_some() {
                "inspect"
            } else {
                req.mode.label()
            },
            req,
            tx,
            arrived,
            admitted_at: None,
            first_token_at: None,
            span,
            draft_cost,
            key,
        }));
        Pending {
            state,
            prompts,
            started: false,
            key,
        }
    }

    /// Starts as many of the held request's prompts as fit. True when the request is fully
    /// admitted (or ended) and the next one may be looked at.
    fn admit_held(&mut self) -> bool {
        let Some(p) = self.held.as_mut() else {
            return true;
        };
        let state = Rc::clone(&p.state);
        let over = {
            let mut r = state.borrow_mut();
            end_if_abandoned(&self.metrics, &mut r, Instant::now());
            r.unfinished == 0
        };
        if over {
            self.held = None;
            self.dequeued();
            self.sweep();
            return true;
        }
        let (max_tokens, best_of) = {
            let r = state.borrow();
            (r.req.max_tokens, r.req.best_of)
        };
        let demands: Vec<Demand> = p
            .prompts
            .iter()
            .map(|(_, t)| demand(t.len(), max_tokens, best_of))
            .collect();
        // Requests of lower priority make room for it (preempted), then cached prompts do.
        let budget = self.cfg.budget;
        if let Some(&first) = demands.first() {
            if scheduler::admit_in_order(&budget, self.reserved(), &[first]) == 0 {
                let priority = state.borrow().req.priority;
                self.preempt_for(priority, first);
            }
        }
        let mut take = scheduler::admit_in_order(&budget, self.reserved_with_cache(), &demands);
        let without_cache = scheduler::admit_in_order(&budget, self.reserved(), &demands);
        if without_cache > take {
            let need = demands[..without_cache].iter().map(|d| d.tokens).sum();
            self.evict_for(need);
            take = without_cache;
        }
        if take == 0 && self.running.is_empty() {
            // Validation refuses what can never fit; this is a budget changed under us.
            self.held = None;
            self.dequeued();
            end_request(
                &self.metrics,
                &mut state.borrow_mut(),
                "invalid",
                Some(ValidationError::BudgetChanged.into()),
            );
            return true;
        }
        if self.held.is_none() {
            return true;
        }
        let mut admitted = 0;
        while admitted < take {
            let Some((index, prompt)) = self.held.as_ref().and_then(|p| p.prompts.front().cloned())
            else {
                break;
            };
            // A prompt sharing blocks with one just started (the choices of one question in
            // one request) waits for them.
            if self.waits_for_prefix(&state.borrow(), &prompt) {
                break;
            }
            let p = self.held.as_mut().expect("held");
            p.prompts.pop_front();
            if !p.started {
                p.started = true;
                let mut r = state.borrow_mut();
                r.admitted_at = Some(Instant::now());
                self.metrics.queue_wait.record(r.arrived.elapsed());
            }
            inject(self.cfg.fault(), Phase::Admit, &prompt);
            self.start_group(&state, index, prompt, max_tokens, best_of);
            admitted += 1;
        }
        let done = self.held.as_ref().is_none_or(|p| p.prompts.is_empty());
        // Only now: a panic above leaves the request held, to be failed by `admit`.
        if done {
            self.held = None;
            self.dequeued();
        }
        self.publish_load();
        done
    }

    /// One prompt of a request joins the batch: its first sequence, with its `best_of - 1`
    /// followers to fork once the prompt is in (they share its prefill).
    fn start_group(
        &mut self,
        state: &SharedRequest,
        index: usize,
        prompt: Rc<Vec<u32>>,
        max_tokens: usize,
        best_of: usize,
    ) {
        let first = index * best_of;
        let sampling = state.borrow().req.sampling.clone();
        let reserved = prompt.len() + max_tokens;
        let sampler = Sampler::new(sampling, first as u64).with_prompt(&prompt);
        let mut seq = Sequence::new(
            state.clone(),
            first,
            prompt,
            self.model.new_cache_for(reserved),
            sampler,
        );
        seq.reserved = reserved;
        seq.forks = (first + 1..first + best_of).collect();
        self.take_cached_prefix(&mut seq);
        self.join(seq);
    }
}

/// What one prompt of a request reserves once admitted (`Demand::of_prompt`); one whose
/// count overflows, more than any budget holds.
fn demand(prompt_len: usize, max_tokens: usize, best_of: usize) -> Demand {
    Demand::of_prompt(prompt_len, max_tokens, best_of).unwrap_or(Demand {
        sequences: usize::MAX,
        tokens: usize::MAX,
    })
}
