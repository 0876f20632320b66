//! The model thread: continuous batching. New requests join between decode steps under the
//! scheduler's budget, their prefill chunked; finished, stopped and abandoned sequences leave
//! at once. Every sequence carries its own mode, so one step serves original, exit and
//! contrast requests together.
//!
//! Fault containment: each phase of a step (admission, planning, forward, scoring, sampling,
//! emission, forks) runs under `catch_unwind` at the finest grain it has, so a panic or an
//! error fails only the requests it touches; the forward, which runs the batch as one, fails
//! the step's members. The engine goes on.

use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use tokio::sync::mpsc;

use super::error::EngineError;
use super::inspection;
use super::metrics::Metrics;
use super::request::{events_per_step, Event, FinishReason, SpeculativeUsage, Usage};
use super::sampling::Sampler;
use super::scheduler::{self, Budget, Demand, SeqView};
use super::sequence::{token_logprob, Outcome, RequestState, Sequence, SharedRequest};
use super::speculative::{draft_cost, SpecInput, Timed, Verdict};
use super::Submission;
use crate::model::{Head, Logits, Mode, MultiExitModel, SeqStep, StepLogits, TextTokenizer};

#[derive(Debug, Clone)]
pub struct BatchConfig {
    pub budget: Budget,
    pub eos_token_id: Option<u32>,
    /// Speculative sequences start draft rounds only while at most this many sequences
    /// decode (`--speculative-max-batch-size`): a batch already shares each weight read, and
    /// drafts then add work, not speed.
    pub speculative_max_batch: usize,
    /// Fault injection for tests.
    #[doc(hidden)]
    pub fault: Option<Fault>,
}

/// The phases of the batcher's work, as named by fault injection and in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The step's own bookkeeping, around the phases below.
    Step,
    Admit,
    Plan,
    Forward,
    Score,
    Sample,
    Emit,
    Fork,
}

/// Test hook: panic in `phase` while handling a sequence whose prompt holds `token`.
#[derive(Debug, Clone, Copy)]
pub struct Fault {
    pub phase: Phase,
    pub token: u32,
}

/// The inputs of one step, in `running` order over the sequences that take part.
#[derive(Default)]
struct StepPlan {
    /// Indices into `running`.
    members: Vec<usize>,
    tokens: Vec<Vec<u32>>,
    /// Prompt tokens fed (0 for a decoding sequence).
    prompt_taken: Vec<usize>,
    heads: Vec<Vec<Head>>,
    depths: Vec<usize>,
    all_positions: Vec<bool>,
    kinds: Vec<StepKind>,
}

/// What a decoding sequence does in a step (a prompt chunk is `Next`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepKind {
    /// Its next token, from its mode's heads at the last position.
    Next,
    /// A draft token, from the draft exit (self-speculative decoding).
    Draft,
    /// The verifying pass over a round's drafts: the mode's heads at every position.
    Verify,
}

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
struct Ready {
    index: usize,
    /// The mode scored: the request's, or the draft exit's.
    mode: Mode,
    logits: Vec<Logits>,
    kind: StepKind,
    /// Its first generated token (the prompt just finished).
    first_token: bool,
}

impl Ready {
    /// The log-distributions to choose from: at the last position, or at every verified one.
    fn scores(&self) -> Vec<Vec<f32>> {
        let rows = match self.kind {
            StepKind::Verify => 0..self.logits.first().map_or(0, Logits::rows),
            _ => {
                let n = self.logits.first().map_or(0, Logits::rows);
                n.saturating_sub(1)..n
            }
        };
        rows.map(|row| self.mode.scores_at(&self.logits, row))
            .collect()
    }
}

/// A request taken from the queue whose prompts have not all joined the batch yet.
struct Pending {
    state: SharedRequest,
    /// `(prompt index, tokens)`, in order.
    prompts: VecDeque<(usize, Rc<Vec<u32>>)>,
    started: bool,
}

pub struct Batcher {
    model: Arc<MultiExitModel>,
    tokenizer: Arc<TextTokenizer>,
    rx: mpsc::Receiver<Submission>,
    cfg: BatchConfig,
    metrics: Arc<Metrics>,
    running: Vec<Sequence>,
    /// The request at the head of the queue, waiting for room in the budget.
    held: Option<Pending>,
}

pub fn mode_label(mode: &Mode) -> &'static str {
    match mode {
        Mode::Original => "original",
        Mode::Exit(_) => "exit",
        Mode::Contrast(_) => "contrast",
    }
}

/// The message of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Positions an inspection of every position scores per step: its logits stay resident for
/// every head, so this bounds that memory (and leaves the prefill budget to others).
const INSPECT_CHUNK: usize = 32;

/// The test hook: panics when `fault` targets `phase` and `prompt` holds its token. A free
/// function so that it can be called while a sequence is borrowed.
fn inject(fault: Option<Fault>, phase: Phase, prompt: &[u32]) {
    if let Some(f) = fault {
        if f.phase == phase && prompt.contains(&f.token) {
            panic!("injected fault in {phase:?}");
        }
    }
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
        rx: mpsc::Receiver<Submission>,
        cfg: BatchConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.set_kv_tokens_limit(cfg.budget.max_tokens);
        Self {
            model,
            tokenizer,
            rx,
            cfg,
            metrics,
            running: Vec::new(),
            held: None,
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
        self.metrics.batch_size.set(self.running.len() as f64);
        self.metrics
            .batch_size_peak
            .offer(reserved.sequences as i64);
        self.metrics.set_kv_tokens_reserved(reserved.tokens);
    }

    /// Pulls requests into the batch while the budget allows; blocks only when idle. Returns
    /// false when the queue is closed and the batch is idle.
    fn admit(&mut self) -> bool {
        loop {
            if self.held.is_none() {
                let sub = if self.running.is_empty() {
                    match self.rx.blocking_recv() {
                        Some(s) => s,
                        None => return false,
                    }
                } else {
                    match self.rx.try_recv() {
                        Ok(s) => s,
                        Err(_) => return true,
                    }
                };
                self.held = Some(self.pending(sub));
            }
            match contained(Phase::Admit, || self.admit_held()) {
                Ok(true) => continue,
                Ok(false) => return true,
                Err(message) => {
                    tracing::error!(%message, "admission failed; failing its request");
                    if let Some(p) = self.held.take() {
                        self.metrics.queue_depth.decrement(1.0);
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

    fn pending(&self, sub: Submission) -> Pending {
        let Submission {
            req,
            tx,
            span,
            arrived,
        } = sub;
        let n_layers = self.model.config().num_layers;
        let (heads, depth) = if req.inspect.is_some() {
            let exits = &self.model.config().exit_layers;
            (inspection::inspected_heads(exits), n_layers)
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
            // The draft copies now, not inside a timed step.
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
                completion_tokens: 0,
                speculative: req.speculative.map(|_| SpeculativeUsage::default()),
            },
            mode_label: if req.inspect.is_some() {
                "inspect"
            } else {
                mode_label(&req.mode)
            },
            req,
            tx,
            arrived,
            first_token_at: None,
            span,
            draft_cost,
        }));
        Pending {
            state,
            prompts,
            started: false,
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
            self.metrics.queue_depth.decrement(1.0);
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
            .map(|(_, t)| {
                Demand::of_prompt(t.len(), max_tokens, best_of).unwrap_or(Demand {
                    sequences: usize::MAX,
                    tokens: usize::MAX,
                })
            })
            .collect();
        let take = scheduler::admit_in_order(&self.cfg.budget, self.reserved(), &demands);
        if take == 0 && self.running.is_empty() {
            // Validation refuses what can never fit; this is a budget changed under us.
            self.held = None;
            self.metrics.queue_depth.decrement(1.0);
            end_request(
                &self.metrics,
                &mut state.borrow_mut(),
                "invalid",
                Some(EngineError::invalid(
                    "max_tokens",
                    "this request cannot fit the server's batch budget",
                )),
            );
            return true;
        }
        let Some(p) = self.held.as_mut() else {
            return true;
        };
        if take > 0 && !p.started {
            p.started = true;
            self.metrics
                .queue_wait
                .record(state.borrow().arrived.elapsed());
        }
        let groups: Vec<(usize, Rc<Vec<u32>>)> = p.prompts.drain(..take).collect();
        let done = p.prompts.is_empty();
        for (index, prompt) in groups {
            inject(self.cfg.fault, Phase::Admit, &prompt);
            self.start_group(&state, index, prompt, max_tokens, best_of);
        }
        // Only now: a panic above leaves the request held, to be failed by `admit`.
        if done {
            self.held = None;
            self.metrics.queue_depth.decrement(1.0);
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
        let mut seq = Sequence::new(
            state.clone(),
            first,
            prompt,
            self.model.new_cache_for(reserved),
            Sampler::new(sampling, first as u64),
        );
        seq.reserved = reserved;
        seq.forks = (first + 1..first + best_of).collect();
        self.running.push(seq);
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
        if plan.members.is_empty() {
            // Every client is behind on reading: wait for one instead of spinning.
            std::thread::sleep(std::time::Duration::from_millis(2));
            return self.sweep();
        }
        let t_prep = Instant::now();
        let outputs = match self.forward(&plan) {
            Ok(o) => o,
            Err(message) => {
                self.fail_members(&plan.members, message);
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
            batch = plan.members.len(),
            prep_us = (t_prep - t_start).as_micros() as u64,
            forward_us = (t_forward - t_prep).as_micros() as u64,
            score_us = (t_scored - t_forward).as_micros() as u64,
            emit_us = t_scored.elapsed().as_micros() as u64,
            "step"
        );
    }

    /// A speculative sequence that decoded alone learns what its step cost (the policy's
    /// costs; see `speculative.rs`).
    fn time_speculation(&mut self, plan: &StepPlan, seconds: f64) {
        let ([i], [0], [kind]) = (&plan.members[..], &plan.prompt_taken[..], &plan.kinds[..])
        else {
            return;
        };
        let positions = plan.tokens[0].len();
        if let Some(spec) = self.running[*i].spec.as_mut() {
            spec.observe(match kind {
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

    /// What each running sequence feeds this step: a prompt chunk under the prefill budget,
    /// or its one new token. A stream whose client has not read its events sits out.
    fn plan(&mut self) -> StepPlan {
        let views: Vec<SeqView> = self
            .running
            .iter()
            .map(|s| {
                let r = s.request.borrow();
                let inspect_all = r.req.inspect.is_some_and(|i| i.all_positions);
                SeqView {
                    prompt_left: s.prompt.len() - s.prefilled,
                    can_emit: r.tx.capacity()
                        >= events_per_step(r.unfinished, r.req.tokens_per_step()),
                    max_chunk: if inspect_all {
                        INSPECT_CHUNK
                    } else {
                        usize::MAX
                    },
                }
            })
            .collect();
        let paused = views.iter().filter(|v| !v.can_emit).count();
        self.metrics.paused_sequences.set(paused as f64);
        let slots = scheduler::plan_step(self.cfg.budget.max_prefill_tokens, &views);
        let decoding = slots.iter().filter(|s| s.prompt_take == 0).count();
        let may_draft = decoding <= self.cfg.speculative_max_batch;
        let mut plan = StepPlan::default();
        let fault = self.cfg.fault;
        for slot in slots {
            let s = &mut self.running[slot.index];
            let planned = contained(Phase::Plan, || {
                inject(fault, Phase::Plan, &s.prompt);
                let r = s.request.borrow();
                // Scores at every prompt position: echo with logprobs, or an inspection of
                // all positions.
                let echo_logprobs = (r.req.echo && r.req.logprobs.is_some())
                    || r.req.inspect.is_some_and(|i| i.all_positions);
                let take = slot.prompt_take;
                if take == 0 {
                    let next = s.next_input.expect("decoding sequences have a token");
                    let remaining = r.req.max_tokens - s.generated;
                    let (heads, depth) = (r.heads.clone(), r.depth);
                    drop(r);
                    return decode_input(s, next, remaining, may_draft, (heads, depth));
                }
                let chunk = s.prompt[s.prefilled..s.prefilled + take].to_vec();
                let last_chunk = s.prefilled + take == s.prompt.len();
                // Heads at the last position once the prompt is in; at every prompt
                // position for echo with logprobs.
                let heads = if last_chunk || echo_logprobs {
                    r.heads.clone()
                } else {
                    Vec::new()
                };
                (chunk, heads, r.depth, echo_logprobs, StepKind::Next)
            });
            match planned {
                Ok((tokens, heads, depth, all_positions, kind)) => {
                    plan.members.push(slot.index);
                    plan.tokens.push(tokens);
                    plan.prompt_taken.push(slot.prompt_take);
                    plan.heads.push(heads);
                    plan.depths.push(depth);
                    plan.all_positions.push(all_positions);
                    plan.kinds.push(kind);
                }
                Err(message) => self.fail_members(&[slot.index], message),
            }
        }
        plan
    }

    /// Runs the planned forward; a model error or panic comes back as the message to fail
    /// the step's members with (the engine goes on).
    fn forward(&mut self, plan: &StepPlan) -> Result<StepLogits, String> {
        let model = Arc::clone(&self.model);
        let mut caches: Vec<&mut crate::model::KvCache> = Vec::with_capacity(plan.members.len());
        let mut members = plan.members.iter().peekable();
        for (i, s) in self.running.iter_mut().enumerate() {
            if members.peek() == Some(&&i) {
                members.next();
                caches.push(&mut s.cache);
            }
        }
        let mut steps: Vec<SeqStep> = caches
            .into_iter()
            .enumerate()
            .map(|(k, cache)| SeqStep {
                tokens: &plan.tokens[k],
                cache,
                depth: plan.depths[k],
                heads: &plan.heads[k],
                all_positions: plan.all_positions[k],
                draft: plan.kinds[k] == StepKind::Draft,
            })
            .collect();
        let fault = self.cfg.fault.filter(|f| f.phase == Phase::Forward);
        let result = contained(Phase::Forward, || {
            if let Some(f) = fault.filter(|f| plan.tokens.iter().any(|t| t.contains(&f.token))) {
                panic!("injected fault: token {}", f.token);
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

    /// Prompt bookkeeping (progress, prompt logprobs, inspection reports), then the heads at
    /// each sequence's last position: the logits of its next token (none for a sequence
    /// still in its prefill). A finished inspection sends its reports and ends here.
    fn take_prompt_progress(&mut self, plan: &StepPlan, outputs: StepLogits) -> Vec<Ready> {
        let mut ready = Vec::with_capacity(plan.members.len());
        let mut inspected = Vec::new();
        for ((k, &i), logits) in plan.members.iter().enumerate().zip(outputs.into_per_seq()) {
            let take = plan.prompt_taken[k];
            let all_positions = plan.all_positions[k];
            let (metrics, tokenizer, fault) = (&self.metrics, &self.tokenizer, self.cfg.fault);
            let seq = &mut self.running[i];
            let progress = contained(Phase::Plan, || {
                let start = seq.prefilled;
                if take > 0 {
                    metrics.prompt_tokens.increment(take as u64);
                    seq.prefilled += take;
                }
                let inspect = seq.request.borrow().req.inspect;
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
                    record_prompt_logprobs(seq, start, take, &logits, tokenizer);
                }
                if seq.in_prefill() || logits.first().is_none_or(Logits::is_empty) {
                    return Progress::Prefilling;
                }
                let kind = plan.kinds[k];
                let mode = match (kind, &seq.spec) {
                    (StepKind::Draft, Some(spec)) => Mode::Exit(spec.spec.draft_layer),
                    _ => seq.request.borrow().req.mode,
                };
                Progress::Ready(Ready {
                    index: i,
                    mode,
                    logits,
                    kind,
                    first_token: take > 0,
                })
            });
            match progress {
                Ok(Progress::Ready(r)) => ready.push(r),
                Ok(Progress::Inspected) => inspected.push(i),
                Ok(Progress::Prefilling) => {}
                Err(message) => self.fail_members(&[i], message),
            }
        }
        for i in inspected {
            let positions = std::mem::take(&mut self.running[i].inspection);
            self.running[i].send(Event::Inspection { positions });
            self.finish(i, FinishReason::Length);
        }
        ready
    }

    /// The vocabulary-sized scoring (log-softmax, contrast) of each ready sequence, spread
    /// over the cores; a panic fails only its own sequence's request.
    fn score(&self, ready: &[Ready]) -> Vec<Result<Vec<Vec<f32>>, String>> {
        let fault = self.cfg.fault;
        let prompts: Vec<&[u32]> = ready
            .iter()
            .map(|r| &self.running[r.index].prompt[..])
            .collect();
        ready
            .par_iter()
            .zip(prompts)
            .map(|(r, prompt)| {
                contained(Phase::Score, || {
                    inject(fault, Phase::Score, prompt);
                    r.scores()
                })
            })
            .collect()
    }

    /// Samples and emits each ready sequence's token; a sequence that just finished its
    /// prompt first forks its `n`/`best_of` followers, which share its prompt and scores.
    fn emit(&mut self, ready: Vec<Ready>, scored: Vec<Result<Vec<Vec<f32>>, String>>) {
        let mut forked = Vec::new();
        for (r, rows) in ready.into_iter().zip(scored) {
            let mut rows = match rows {
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
            let result = contained(Phase::Emit, || {
                let mut followers = Vec::new();
                if r.first_token {
                    followers = self.fork_followers(r.index, &scores)?;
                    self.send_prompt_event(r.index);
                }
                self.sample_and_emit(r.index, &scores);
                Ok::<_, String>(followers)
            });
            match result {
                Ok(Ok(followers)) => forked.extend(followers),
                Ok(Err(message)) | Err(message) => self.fail_members(&[r.index], message),
            }
        }
        for (seq, scores) in forked {
            if !seq.is_live() {
                continue;
            }
            self.running.push(seq);
            let idx = self.running.len() - 1;
            let result = contained(Phase::Emit, || {
                self.send_prompt_event(idx);
                self.sample_and_emit(idx, &scores);
            });
            if let Err(message) = result {
                self.fail_members(&[idx], message);
            }
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
            inject(self.cfg.fault, Phase::Fork, &leader.prompt);
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
                Sampler::new(sampling, candidate as u64),
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

    fn sample_and_emit(&mut self, i: usize, scores: &[f32]) {
        if self.running[i].request.borrow().req.max_tokens == 0 {
            // echo with max_tokens 0: the prompt was only scored.
            return self.finish(i, FinishReason::Length);
        }
        inject(self.cfg.fault, Phase::Sample, &self.running[i].prompt);
        let id = self.running[i].sampler.choose(scores);
        self.emit_token(i, id, scores);
    }

    /// A draft step's draft token, or a verifying step's verdicts: the drafts that stand
    /// and the token after them are emitted, and the cache keeps what was accepted.
    fn speculate(&mut self, i: usize, kind: StepKind, rows: Vec<Vec<f32>>) {
        inject(self.cfg.fault, Phase::Sample, &self.running[i].prompt);
        let seq = &mut self.running[i];
        let Some(spec) = seq.spec.as_mut() else {
            return;
        };
        if kind == StepKind::Draft {
            return spec.draft(&rows[0], &mut seq.sampler);
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
            let spec = seq.spec.as_ref().expect("checked above");
            let (id, stands) = if row < drafted {
                match spec.verdict(row, scores, &mut seq.sampler) {
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
            if self.emit_token(i, id, scores) || !stands {
                break;
            }
        }
        let seq = &mut self.running[i];
        let spec = seq.spec.as_mut().expect("checked above");
        let keep = spec.finish_round(accepted);
        seq.cache.truncate(keep);
    }

    /// Emits token `id` chosen from `scores`; returns whether the sequence finished.
    fn emit_token(&mut self, i: usize, id: u32, scores: &[f32]) -> bool {
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
        inject(self.cfg.fault, Phase::Emit, &seq.prompt);
        if let Outcome::Finished(reason) =
            seq.accept(id, scores, &self.tokenizer, self.cfg.eos_token_id)
        {
            self.finish(i, reason);
            return true;
        }
        false
    }

    fn finish(&mut self, i: usize, reason: FinishReason) {
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
                    "completed"
                );
            }
            // Last: once the client has its answer, a shutdown may end the process at once,
            // and the log line and metrics above must not be lost with it.
            let _ = r.tx.try_send(Event::Done { usage: r.usage });
        }
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

/// An inspection's reports for the positions this step scored: every position of the chunk
/// (`all_positions`), or the last prompt position once the prompt is in.
fn record_inspection(
    seq: &mut Sequence,
    spec: &super::request::InspectSpec,
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

/// Stores the logprob of each prompt token that follows a position of this chunk.
fn record_prompt_logprobs(
    seq: &mut Sequence,
    start: usize,
    take: usize,
    logits: &[Logits],
    tok: &TextTokenizer,
) {
    let (mode, k) = {
        let r = seq.request.borrow();
        (r.req.mode, r.req.logprobs.unwrap_or(0))
    };
    for row in 0..take {
        let next = start + row + 1;
        if next >= seq.prompt.len() {
            break;
        }
        let scores = mode.scores_at(logits, row);
        seq.prompt_logprobs
            .push(token_logprob(seq.prompt[next], &scores, k, tok));
    }
}

/// A decoding sequence's input for this step: its next token through its mode, or, when it
/// speculates, a draft step at the draft exit or the verifying pass over the round's drafts
/// (its cache rolled back to where the round began).
fn decode_input(
    s: &mut Sequence,
    next: u32,
    remaining: usize,
    may_draft: bool,
    (heads, depth): (Vec<Head>, usize),
) -> (Vec<u32>, Vec<Head>, usize, bool, StepKind) {
    let input = match s.spec.as_mut() {
        Some(spec) if may_draft || spec.in_round() => {
            spec.next_input(next, s.cache.len(), remaining)
        }
        _ => SpecInput::Plain,
    };
    match input {
        SpecInput::Plain => (vec![next], heads, depth, false, StepKind::Next),
        SpecInput::Draft(token) => {
            let layer = s.spec.as_ref().map_or(depth, |sp| sp.spec.draft_layer);
            (
                vec![token],
                vec![Head::Exit(layer)],
                layer,
                false,
                StepKind::Draft,
            )
        }
        SpecInput::Verify { tokens, base_len } => {
            s.cache.truncate(base_len);
            (tokens, heads, depth, true, StepKind::Verify)
        }
    }
}
