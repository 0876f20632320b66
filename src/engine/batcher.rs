//! The model thread: continuous batching. New requests join between decode steps, their
//! prefill chunked under a token budget; finished, stopped and abandoned sequences leave at
//! once. Every sequence carries its own mode, so one step serves original, exit and contrast
//! requests together.

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use tokio::sync::mpsc;

use super::error::EngineError;
use super::metrics::Metrics;
use super::request::{Event, FinishReason, Usage};
use super::sampling::Sampler;
use super::sequence::{token_logprob, Outcome, RequestState, Sequence, SharedRequest};
use super::Submission;
use crate::model::{Head, Mode, MultiExitGptNeo, SeqStep, TextTokenizer};

#[derive(Debug, Clone)]
pub struct BatchConfig {
    pub max_batch_size: usize,
    /// Prompt tokens prefilled per step, across sequences (a long prompt is chunked).
    pub max_prefill_tokens: usize,
    pub eos_token_id: Option<u32>,
    /// Fault injection for tests: a step that feeds this token id panics inside the forward.
    #[doc(hidden)]
    pub panic_on_token: Option<u32>,
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
}

/// A sequence whose next token can be chosen: the logits of its mode's heads.
struct Ready {
    index: usize,
    mode: Mode,
    logits: Vec<Vec<f32>>,
    /// Its first generated token (the prompt just finished).
    first_token: bool,
}

pub struct Batcher {
    model: Arc<MultiExitGptNeo>,
    tokenizer: Arc<TextTokenizer>,
    rx: mpsc::Receiver<Submission>,
    cfg: BatchConfig,
    metrics: Arc<Metrics>,
    running: Vec<Sequence>,
    /// A request taken from the queue that did not fit yet.
    held: Option<Submission>,
}

pub fn mode_label(mode: &Mode) -> &'static str {
    match mode {
        Mode::Original => "original",
        Mode::Exit(_) => "exit",
        Mode::Contrast(_) => "contrast",
    }
}

impl Batcher {
    pub fn new(
        model: Arc<MultiExitGptNeo>,
        tokenizer: Arc<TextTokenizer>,
        rx: mpsc::Receiver<Submission>,
        cfg: BatchConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
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
            self.step();
        }
        tracing::info!("engine stopped");
    }

    /// Pulls requests into the batch; blocks only when idle. Returns false when closed and idle.
    fn admit(&mut self) -> bool {
        loop {
            let sub = match self.held.take() {
                Some(s) => s,
                None if self.running.is_empty() => match self.rx.blocking_recv() {
                    Some(s) => s,
                    None => return false,
                },
                None => match self.rx.try_recv() {
                    Ok(s) => s,
                    Err(_) => return true,
                },
            };
            let slots = sub.req.prompts.len() * sub.req.best_of;
            let prefill_pending: usize = self
                .running
                .iter()
                .map(|s| s.prompt.len() - s.prefilled)
                .sum();
            let fits = self.running.len() + slots <= self.cfg.max_batch_size
                && prefill_pending < self.cfg.max_prefill_tokens;
            if !fits && !self.running.is_empty() {
                self.held = Some(sub);
                return true;
            }
            self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            self.start(sub);
        }
    }

    fn start(&mut self, sub: Submission) {
        let Submission {
            req,
            tx,
            span,
            arrived,
        } = sub;
        let mode_label = mode_label(&req.mode);
        if tx.is_closed() {
            self.metrics.cancellations.fetch_add(1, Ordering::Relaxed);
            self.metrics.request_finished("cancelled", mode_label);
            return;
        }
        if Instant::now() >= req.deadline {
            self.metrics.request_finished("timeout", mode_label);
            let _ = tx.send(Event::Error(EngineError::Timeout {
                seconds: (req.deadline - arrived).as_secs_f64(),
            }));
            return;
        }
        self.metrics.queue_wait.observe(arrived.elapsed());
        let n_layers = self.model.config().num_layers;
        let best_of = req.best_of;
        let prompts = req.prompts.clone();
        let state: SharedRequest = Rc::new(RefCell::new(RequestState {
            heads: req.mode.heads(),
            depth: req.mode.depth(n_layers),
            unfinished: prompts.len() * best_of,
            usage: Usage {
                prompt_tokens: req.prompt_tokens(),
                completion_tokens: 0,
            },
            req,
            tx,
            mode_label,
            arrived,
            first_token_at: None,
            span,
        }));
        for (p, prompt) in prompts.into_iter().enumerate() {
            let first = p * best_of;
            let sampling = state.borrow().req.sampling.clone();
            let mut seq = Sequence::new(
                state.clone(),
                first,
                Rc::new(prompt),
                self.model.new_cache(),
                Sampler::new(sampling, first as u64),
            );
            seq.forks = (first + 1..first + best_of).collect();
            self.running.push(seq);
        }
        self.metrics
            .batch_size
            .store(self.running.len() as i64, Ordering::Relaxed);
    }

    /// One model step for every running sequence: plan its input, run the forward, score
    /// the sequences that reached a next token, sample and emit.
    fn step(&mut self) {
        let t_start = Instant::now();
        self.drop_abandoned();
        self.metrics
            .batch_size
            .store(self.running.len() as i64, Ordering::Relaxed);
        if self.running.is_empty() {
            return;
        }
        let plan = self.plan();
        let t_prep = Instant::now();
        let outputs = match self.forward(&plan) {
            Ok(o) => o,
            Err(message) => return self.fail_batch(&plan.members, message),
        };
        let ready = self.take_prompt_progress(&plan, outputs);
        let t_forward = Instant::now();
        // The vocabulary-sized scoring (log-softmax, contrast) of the sequences is independent:
        // spread it over the cores.
        let scored: Vec<Vec<f32>> = ready.par_iter().map(|r| r.mode.scores(&r.logits)).collect();
        let t_scored = Instant::now();
        self.emit(ready, scored);
        tracing::debug!(
            batch = plan.members.len(),
            prep_us = (t_prep - t_start).as_micros() as u64,
            forward_us = (t_forward - t_prep).as_micros() as u64,
            score_us = (t_scored - t_forward).as_micros() as u64,
            emit_us = t_scored.elapsed().as_micros() as u64,
            "step"
        );
        self.metrics
            .batch_size
            .store(self.running.len() as i64, Ordering::Relaxed);
    }

    /// What each running sequence feeds this step: a prompt chunk under the prefill budget,
    /// or its one new token.
    fn plan(&self) -> StepPlan {
        let mut budget = self.cfg.max_prefill_tokens;
        let mut plan = StepPlan::default();
        for (i, s) in self.running.iter().enumerate() {
            let r = s.request.borrow();
            let echo_logprobs = r.req.echo && r.req.logprobs.is_some();
            let (tokens, take, last_chunk) = if s.in_prefill() {
                let take = (s.prompt.len() - s.prefilled).min(budget);
                if take == 0 {
                    continue; // the budget is spent: this prompt waits a step
                }
                budget -= take;
                let chunk = s.prompt[s.prefilled..s.prefilled + take].to_vec();
                (chunk, take, s.prefilled + take == s.prompt.len())
            } else {
                let next = s.next_input.expect("decoding sequences have a token");
                (vec![next], 0, true)
            };
            plan.members.push(i);
            plan.tokens.push(tokens);
            plan.prompt_taken.push(take);
            // Heads at the last position once the prompt is in; at every prompt position for
            // echo with logprobs.
            plan.heads.push(if last_chunk || echo_logprobs {
                r.heads.clone()
            } else {
                Vec::new()
            });
            plan.depths.push(r.depth);
            plan.all_positions.push(take > 0 && echo_logprobs);
        }
        plan
    }

    /// Runs the planned forward; a model error or panic comes back as the message to fail
    /// the batch with (the engine goes on).
    fn forward(&mut self, plan: &StepPlan) -> Result<Vec<Vec<Vec<Vec<f32>>>>, String> {
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
            })
            .collect();
        let poison = self.cfg.panic_on_token;
        let result = catch_unwind(AssertUnwindSafe(|| {
            if let Some(t) = poison.filter(|t| plan.tokens.iter().any(|s| s.contains(t))) {
                panic!("injected fault: token {t}");
            }
            model.forward(&mut steps)
        }));
        self.metrics.model_steps.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(Ok(outputs)) => Ok(outputs),
            Ok(Err(e)) => Err(format!("forward failed: {e}")),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(format!("model thread panicked: {msg}"))
            }
        }
    }

    /// Prompt bookkeeping (progress, prompt logprobs), then the heads at each sequence's last
    /// position: the logits of its next token (none for a sequence still in its prefill).
    fn take_prompt_progress(
        &mut self,
        plan: &StepPlan,
        mut outputs: Vec<Vec<Vec<Vec<f32>>>>,
    ) -> Vec<Ready> {
        let mut ready = Vec::with_capacity(plan.members.len());
        for (k, &i) in plan.members.iter().enumerate() {
            let take = plan.prompt_taken[k];
            let logits = std::mem::take(&mut outputs[k]);
            if take > 0 {
                let seq = &mut self.running[i];
                self.metrics
                    .prompt_tokens
                    .fetch_add(take as u64, Ordering::Relaxed);
                let start = seq.prefilled;
                seq.prefilled += take;
                if plan.all_positions[k] {
                    record_prompt_logprobs(seq, start, take, &logits, &self.tokenizer);
                }
                if seq.in_prefill() {
                    continue;
                }
            }
            if logits.is_empty() || logits[0].is_empty() {
                continue;
            }
            ready.push(Ready {
                index: i,
                mode: self.running[i].request.borrow().req.mode,
                logits: logits
                    .into_iter()
                    .map(|mut rows| rows.pop().unwrap_or_default())
                    .collect(),
                first_token: take > 0,
            });
        }
        ready
    }

    /// Samples and emits each ready sequence's token; a sequence that just finished its
    /// prompt first forks its `n`/`best_of` followers, which share its prompt and scores.
    fn emit(&mut self, ready: Vec<Ready>, scored: Vec<Vec<f32>>) {
        let mut forked = Vec::new();
        for (r, scores) in ready.into_iter().zip(scored) {
            if r.first_token {
                forked.extend(self.fork_followers(r.index, &scores));
                self.send_prompt_event(r.index);
            }
            self.sample_and_emit(r.index, &scores);
        }
        for (seq, scores) in forked {
            self.running.push(seq);
            let idx = self.running.len() - 1;
            self.send_prompt_event(idx);
            self.sample_and_emit(idx, &scores);
        }
        self.running.retain(|s| !s.finished);
    }

    fn fork_followers(&mut self, i: usize, scores: &[f32]) -> Vec<(Sequence, Vec<f32>)> {
        let forks = std::mem::take(&mut self.running[i].forks);
        let mut out = Vec::with_capacity(forks.len());
        for candidate in forks {
            let leader = &self.running[i];
            let cache = match leader.cache.fork() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "forking a cache failed");
                    continue;
                }
            };
            let sampling = leader.request.borrow().req.sampling.clone();
            let mut seq = Sequence::new(
                leader.request.clone(),
                candidate,
                leader.prompt.clone(),
                cache,
                Sampler::new(sampling, candidate as u64),
            );
            seq.prefilled = leader.prefilled;
            seq.prompt_logprobs = leader.prompt_logprobs.clone();
            out.push((seq, scores.to_vec()));
        }
        out
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
        let now = Instant::now();
        let seq = &mut self.running[i];
        let id = seq.sampler.choose(scores);
        {
            let mut r = seq.request.borrow_mut();
            r.usage.completion_tokens += 1;
            if r.first_token_at.is_none() {
                r.first_token_at = Some(now);
                self.metrics.time_to_first_token.observe(now - r.arrived);
            }
        }
        if let Some(prev) = seq.last_token_at {
            self.metrics.inter_token_latency.observe(now - prev);
        }
        seq.last_token_at = Some(now);
        self.metrics
            .generated_tokens
            .fetch_add(1, Ordering::Relaxed);
        if let Outcome::Finished(reason) =
            seq.accept(id, scores, &self.tokenizer, self.cfg.eos_token_id)
        {
            self.finish(i, reason);
        }
    }

    fn finish(&mut self, i: usize, reason: FinishReason) {
        let seq = &mut self.running[i];
        seq.finished = true;
        seq.send(Event::End {
            candidate: seq.candidate,
            finish_reason: reason,
            cumulative_logprob: seq.cumulative_logprob,
        });
        let mut r = seq.request.borrow_mut();
        r.unfinished -= 1;
        if r.unfinished == 0 {
            self.metrics.e2e_latency.observe(r.arrived.elapsed());
            self.metrics.request_finished("ok", r.mode_label);
            {
                let _e = r.span.enter();
                tracing::info!(
                    prompt_tokens = r.usage.prompt_tokens,
                    completion_tokens = r.usage.completion_tokens,
                    ms = r.arrived.elapsed().as_millis() as u64,
                    "completed"
                );
            }
            // Last: once the client has its answer, a shutdown may end the process at once,
            // and the log line and metrics above must not be lost with it.
            let _ = r.tx.send(Event::Done { usage: r.usage });
        }
    }

    /// Drops sequences whose client left or whose deadline passed (freeing their slots).
    fn drop_abandoned(&mut self) {
        let now = Instant::now();
        let metrics = &self.metrics;
        self.running.retain(|s| {
            let mut r = s.request.borrow_mut();
            if now >= r.req.deadline {
                if r.unfinished > 0 {
                    r.unfinished = 0;
                    metrics.request_finished("timeout", r.mode_label);
                    let _ = r.tx.send(Event::Error(EngineError::Timeout {
                        seconds: (r.req.deadline - r.arrived).as_secs_f64(),
                    }));
                }
                return false;
            }
            if r.tx.is_closed() {
                if r.unfinished > 0 {
                    r.unfinished = 0;
                    metrics.cancellations.fetch_add(1, Ordering::Relaxed);
                    metrics.request_finished("cancelled", r.mode_label);
                }
                return false;
            }
            r.unfinished > 0
        });
    }

    /// A failed step fails only the requests in it; the engine goes on.
    fn fail_batch(&mut self, members: &[usize], message: String) {
        tracing::error!(%message, "model step failed; failing its requests");
        for &i in members {
            let mut r = self.running[i].request.borrow_mut();
            if r.unfinished > 0 {
                r.unfinished = 0;
                self.metrics.request_finished("error", r.mode_label);
                let _ =
                    r.tx.send(Event::Error(EngineError::Internal(message.clone())));
            }
        }
        self.running.retain(|s| s.request.borrow().unfinished > 0);
        self.metrics
            .batch_size
            .store(self.running.len() as i64, Ordering::Relaxed);
    }
}

/// Stores the logprob of each prompt token that follows a position of this chunk.
fn record_prompt_logprobs(
    seq: &mut Sequence,
    start: usize,
    take: usize,
    logits: &[Vec<Vec<f32>>],
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
        let heads: Vec<Vec<f32>> = logits.iter().map(|h| h[row].clone()).collect();
        let scores = mode.scores(&heads);
        seq.prompt_logprobs
            .push(token_logprob(seq.prompt[next], &scores, k, tok));
    }
}
