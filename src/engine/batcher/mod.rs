//! The model thread: continuous batching. New requests join between decode steps under the
//! scheduler's budget, their prefill chunked; finished, stopped and abandoned sequences leave
//! at once. Every sequence carries its own mode, so one step serves original, exit and
//! contrast requests together.
//!
//! A step, file by file: `admit.rs` takes requests from the queue into the batch, `plan.rs`
//! decides each member's input (one [`plan::RowPlan`] per row), the forward runs here,
//! `progress.rs` does the prompt bookkeeping and scores the sequences that reached a token,
//! `emit.rs` samples, forks `n`/`best_of` followers and finishes, `speculate.rs` handles a
//! self-speculative round's drafts and verdicts; `preempt.rs` makes room for a request of
//! higher priority, and brings the requests it took out back.
//!
//! Fault containment: each phase of a step (admission, planning, forward, scoring, sampling,
//! emission, forks) runs under `catch_unwind` at the finest grain it has, so a panic or an
//! error fails only the requests it touches; the forward, which runs the batch as one, fails
//! the step's members. The engine goes on.

mod admit;
mod emit;
mod fault;
mod plan;
mod preempt;
mod prefix;
mod progress;
mod speculate;

use std::cell::RefCell;
use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

pub use fault::{Fault, Phase};

use super::error::EngineError;
use super::metrics::Metrics;
use super::prefix_cache::PrefixCache;
use super::queue::QueuePlaces;
use super::request::{Event, Submission};
use super::scheduler::{Budget, Demand};
use super::sequence::{RequestState, Sequence};
use super::speculative::Timed;
use crate::model::{LogprobTargets, MultiExitModel, SeqStep, StepLogits, TextTokenizer};
use admit::Pending;
use fault::inject;
use plan::{StepKind, StepPlan};

#[derive(Debug, Clone)]
pub struct BatchConfig {
    pub budget: Budget,
    pub eos_token_id: Option<u32>,
    /// Speculative sequences start draft rounds only while at most this many sequences
    /// decode (`--speculative-max-batch-size`): a batch already shares each weight read, and
    /// drafts then add work, not speed.
    pub speculative_max_batch: usize,
    /// Queue order among equal priorities: a request is due this much later per KV position
    /// it reserves (`--queue-slack-per-token-ms`; zero: first come, first served).
    pub queue_slack_per_token: Duration,
    /// Prefix caching, and the positions its cache may hold (None: off).
    pub prefix_cache: Option<usize>,
    /// Fault injection for tests.
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fault: Option<Fault>,
}

impl BatchConfig {
    /// The fault to inject, if any (always none without the `fault-injection` feature).
    fn fault(&self) -> Option<Fault> {
        #[cfg(feature = "fault-injection")]
        return self.fault;
        #[cfg(not(feature = "fault-injection"))]
        None
    }
}

pub struct Batcher {
    model: Arc<MultiExitModel>,
    tokenizer: Arc<TextTokenizer>,
    rx: mpsc::Receiver<Submission>,
    cfg: BatchConfig,
    metrics: Arc<Metrics>,
    running: Vec<Sequence>,
    /// Requests received and not yet admitted, in arrival order (the next is chosen by
    /// priority: `admit.rs`).
    waiting: Vec<Pending>,
    /// The request being admitted, waiting for room in the budget.
    held: Option<Pending>,
    /// `--max-queued-requests` places, given back as requests are admitted.
    queue: Arc<QueuePlaces>,
    /// Requests received so far (their arrival order).
    received: u64,
    /// Prompts computed before (None: `--no-prefix-cache`).
    prefix: Option<PrefixCache>,
    /// Requests preempted for one of higher priority, waiting for their turn.
    parked: Vec<preempt::Parked>,
    /// Steps run so far (the sequences' turns).
    steps: u64,
}

/// The message of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `f`; a panic comes back as an error message naming `phase`.
fn contained<T>(phase: Phase, f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f))
        .map_err(|p| format!("{phase:?} phase panicked: {}", panic_message(&*p)))
}

/// Ends a request that has not finished: its sequences leave the batch at the next sweep.
fn end_request(
    metrics: &Metrics,
    r: &mut RequestState,
    status: &'static str,
    event: Option<EngineError>,
) {
    if r.unfinished == 0 {
        return;
    }
    r.unfinished = 0;
    metrics.request_finished(status, r.mode_label);
    if status == "cancelled" {
        metrics.cancellations.increment(1);
    }
    if let Some(e) = event {
        // A full channel: the client stopped reading; its own deadline reports the end.
        let _ = r.tx.try_send(Event::Error(e));
    }
}

/// Ends `r` if its client left (cancelled) or its deadline passed (timeout).
fn end_if_abandoned(metrics: &Metrics, r: &mut RequestState, now: Instant) {
    if r.unfinished == 0 {
        return;
    }
    if r.tx.is_closed() {
        end_request(metrics, r, "cancelled", None);
    } else if now >= r.req.deadline {
        let seconds = (r.req.deadline - r.arrived).as_secs_f64();
        end_request(
            metrics,
            r,
            "timeout",
            Some(EngineError::Timeout { seconds }),
        );
    }
}

impl Batcher {
    pub fn new(
        model: Arc<MultiExitModel>,
        tokenizer: Arc<TextTokenizer>,
        (rx, queue): (mpsc::Receiver<Submission>, Arc<QueuePlaces>),
        cfg: BatchConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.set_kv_tokens_limit(cfg.budget.max_tokens);
        Self {
            prefix: cfg.prefix_cache.map(PrefixCache::new),
            model,
            tokenizer,
            rx,
            cfg,
            metrics,
            running: Vec::new(),
            waiting: Vec::new(),
            held: None,
            queue,
            received: 0,
            parked: Vec::new(),
            steps: 0,
        }
    }

    /// Runs until every handle is dropped and the batch has drained.
    pub fn run(mut self) {
        loop {
            if !self.admit() {
                break;
            }
            if self.running.is_empty() {
                continue;
            }
            self.metrics.upkeep();
            if let Err(message) = contained(Phase::Step, || self.step()) {
                // Not one of the contained phases: the batch's own bookkeeping failed. Fail
                // everything running rather than trust it.
                let all: Vec<usize> = (0..self.running.len()).collect();
                self.fail_members(&all, message);
                self.sweep();
            }
        }
        tracing::info!("engine stopped");
    }

    /// Puts `seq` in the running batch, its turn now.
    fn join(&mut self, mut seq: Sequence) {
        seq.turn = self.steps;
        self.running.push(seq);
    }

    /// KV tokens and sequences reserved by the running batch (forks not yet made included).
    fn reserved(&self) -> Demand {
        self.running.iter().fold(Demand::default(), |d, s| {
            let copies = 1 + s.forks.len();
            Demand {
                sequences: d.sequences + copies,
                tokens: d.tokens + copies * s.reserved,
            }
        })
    }

    fn publish_load(&self) {
        let reserved = self.reserved();
        let requests: HashSet<*const RefCell<RequestState>> = self
            .running
            .iter()
            .map(|s| Rc::as_ptr(&s.request))
            .collect();
        self.metrics.requests_running.set(requests.len() as f64);
        self.metrics
            .requests_preempted
            .set(self.parked.len() as f64);
        self.metrics.batch_size.set(self.running.len() as f64);
        self.metrics
            .batch_size_peak
            .offer(reserved.sequences as i64);
        self.metrics.set_kv_tokens_reserved(reserved.tokens);
    }

    /// One model step for every running sequence: plan its input, run the forward, score
    /// the sequences that reached a next token, sample and emit.
    fn step(&mut self) {
        let t_start = Instant::now();
        self.drop_abandoned();
        if self.running.is_empty() {
            return;
        }
        let plan = self.plan();
        if plan.rows.is_empty() {
            // Every client is behind on reading: wait for one instead of spinning.
            std::thread::sleep(std::time::Duration::from_millis(2));
            return self.sweep();
        }
        self.steps += 1;
        for row in &plan.rows {
            self.running[row.index].turn = self.steps;
        }
        let t_prep = Instant::now();
        let outputs = match self.forward(&plan) {
            Ok(o) => o,
            Err(message) => {
                self.fail_members(&plan.members(), message);
                return self.sweep();
            }
        };
        let ready = self.take_prompt_progress(&plan, outputs);
        let t_forward = Instant::now();
        let scored = self.score(&ready);
        let t_scored = Instant::now();
        self.emit(ready, scored);
        self.time_speculation(&plan, t_prep.elapsed().as_secs_f64());
        self.sweep();
        tracing::debug!(
            batch = plan.rows.len(),
            prefill = plan.rows.iter().map(|r| r.prompt_taken).sum::<usize>(),
            scored = plan
                .rows
                .iter()
                .map(|r| r.heads.len() * if r.all_positions { r.tokens.len() } else { 1 })
                .sum::<usize>(),
            // each distinct head streams its vocabulary matrix once per step
            distinct_heads = plan
                .rows
                .iter()
                .flat_map(|r| r.heads.iter())
                .collect::<HashSet<_>>()
                .len(),
            prep_us = (t_prep - t_start).as_micros() as u64,
            forward_us = (t_forward - t_prep).as_micros() as u64,
            score_us = (t_scored - t_forward).as_micros() as u64,
            emit_us = t_scored.elapsed().as_micros() as u64,
            "step"
        );
    }

    /// Runs the planned forward; a model error or panic comes back as the message to fail
    /// the step's members with (the engine goes on).
    fn forward(&mut self, plan: &StepPlan) -> Result<StepLogits, String> {
        let model = Arc::clone(&self.model);
        let mut caches: Vec<&mut crate::model::KvCache> = Vec::with_capacity(plan.rows.len());
        let mut rows = plan.rows.iter().peekable();
        for (i, s) in self.running.iter_mut().enumerate() {
            if rows.peek().is_some_and(|r| r.index == i) {
                rows.next();
                caches.push(&mut s.cache);
            }
        }
        let mut steps: Vec<SeqStep> = caches
            .into_iter()
            .zip(&plan.rows)
            .map(|(cache, row)| SeqStep {
                tokens: &row.tokens,
                cache,
                depth: row.depth,
                heads: &row.heads,
                all_positions: row.all_positions,
                draft: row.kind == StepKind::Draft,
                verify: row.per_query,
                early_exit: row.early_exit,
                choice: row.choice.map(|c| c.0),
                choice_logprobs: row.choice.and_then(|c| c.1),
                select_premature: row.select_premature,
                sled: row.sled,
                logprobs: row.logprobs.as_ref().map(|(targets, read)| LogprobTargets {
                    targets,
                    read: *read,
                }),
            })
            .collect();
        let fault = self.cfg.fault();
        let result = contained(Phase::Forward, || {
            for row in &plan.rows {
                inject(fault, Phase::Forward, &row.tokens);
            }
            model.forward(&mut steps)
        });
        self.metrics.model_steps.increment(1);
        match result {
            Ok(Ok(outputs)) => Ok(outputs),
            Ok(Err(e)) => Err(format!("forward failed: {e}")),
            Err(message) => Err(message),
        }
    }

    /// A speculative sequence that decoded alone learns what its step cost (the policy's
    /// costs; see `speculative.rs`).
    fn time_speculation(&mut self, plan: &StepPlan, seconds: f64) {
        let [row] = &plan.rows[..] else {
            return;
        };
        if row.prompt_taken != 0 || row.resumed != 0 {
            return;
        }
        let positions = row.tokens.len();
        if let Some(spec) = self.running[row.index].spec.as_mut() {
            spec.observe(match row.kind {
                StepKind::Next => Timed::Plain(seconds),
                StepKind::Draft => Timed::Draft(seconds),
                StepKind::Verify => Timed::Verify { positions, seconds },
            });
        }
    }

    /// Removes the sequences that finished or whose request ended.
    fn sweep(&mut self) {
        self.running.retain(|s| s.is_live());
        self.publish_load();
    }

    /// Ends requests whose client left or whose deadline passed (freeing their slots).
    fn drop_abandoned(&mut self) {
        let now = Instant::now();
        for s in &self.running {
            end_if_abandoned(&self.metrics, &mut s.request.borrow_mut(), now);
        }
        self.sweep();
    }

    /// Fails the requests of the sequences at `members` (indices into `running`); they leave
    /// at the next sweep.
    fn fail_members(&mut self, members: &[usize], message: String) {
        tracing::error!(%message, "failing the requests of {} sequences", members.len());
        for &i in members {
            let mut r = self.running[i].request.borrow_mut();
            end_request(
                &self.metrics,
                &mut r,
                "error",
                Some(EngineError::Internal(message.clone())),
            );
        }
    }
}
