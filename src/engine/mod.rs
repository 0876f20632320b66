//! Between HTTP and the model: validation, the request queue, the batcher thread, sampling
//! and metrics. The async side only ever sees [`Engine`], a cheap `Clone` handle.
#![forbid(unsafe_code)]

pub mod batcher;
pub mod error;
pub mod inspection;
pub mod metrics;
pub mod prefix_cache;
pub mod queue;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod speculative;
pub mod stop;
pub mod structured;
pub mod validate;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

pub use batcher::{BatchConfig, Fault, Phase};
pub use error::EngineError;
pub use metrics::Metrics;
pub use request::{
    Event, EventReceiver, FinishReason, GenerateRequest, Submission, TokenLogprob, Usage,
    ValidRequest,
};
pub use validate::{Limits, ValidationError, Validator};

use crate::model::{ChatTemplate, MultiExitModel, TextTokenizer};
use queue::QueuePlaces;

/// The exit status when the engine thread fails beyond containment.
pub const ENGINE_FAILURE_EXIT_CODE: i32 = 70;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub batch: BatchConfig,
    pub max_queued_requests: usize,
    /// Requests parsed and tokenized at once (`--validation-workers`).
    pub validation_workers: usize,
    /// Events buffered per choice for a client that reads slowly (`--stream-buffer-events`).
    pub stream_buffer_events: usize,
    /// What renders `/v1/chat/completions` prompts (None: chat requests are refused).
    pub chat_template: Option<Arc<ChatTemplate>>,
    pub structured: structured::StructuredConfig,
    /// The compute pool's ops run our CUDA kernels on the CPU (`kernels::cuda_emulator`), for
    /// tests of the GPU's path end to end.
    #[cfg(feature = "cuda-emulator")]
    #[doc(hidden)]
    pub emulate_cuda: bool,
}

/// What `/tokenize` counts: a text, or a conversation as the chat template renders it.
pub enum TokenizeInput {
    Text(String),
    Chat(crate::model::ChatPrompt),
}

/// Leave to parse and validate one request: the CPU and memory that parsing and tokenizing
/// take are bounded by the number of these, whatever the number of connections.
pub struct ValidationSlot(#[allow(dead_code)] OwnedSemaphorePermit);

/// Handle to the engine: validates, enqueues, reports health and metrics.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Submission>,
    /// `--max-queued-requests` places, shared with the batcher.
    queue: Arc<QueuePlaces>,
    validator: Validator,
    validation: Arc<Semaphore>,
    stream_buffer_events: usize,
    eos_token_id: Option<u32>,
    metrics: Arc<Metrics>,
    model: Arc<MultiExitModel>,
    thread: Arc<std::thread::JoinHandle<()>>,
}

impl Engine {
    /// Spawns the model thread, which owns the forward passes; the async runtime never runs one.
    pub fn start(
        model: MultiExitModel,
        tokenizer: TextTokenizer,
        limits: Limits,
        cfg: EngineConfig,
    ) -> std::io::Result<Self> {
        let model = Arc::new(model);
        let tokenizer = Arc::new(tokenizer);
        let metrics = Arc::new(Metrics::default());
        let queue = Arc::new(QueuePlaces::new(cfg.max_queued_requests));
        let (tx, rx) = mpsc::channel(queue.capacity());
        let places = Arc::clone(&queue);
        let eos_token_id = cfg.batch.eos_token_id;
        let (validation, stream_buffer_events) = (
            Arc::new(Semaphore::new(cfg.validation_workers.max(1))),
            cfg.stream_buffer_events.max(1),
        );
        let (m, t, b) = (
            Arc::clone(&model),
            Arc::clone(&tokenizer),
            Arc::clone(&metrics),
        );
        // One compute pool for the kernels, attention and scoring, with the batcher running on
        // one of its threads so that it works alongside the others instead of waiting on them.
        let pool =
            rayon::ThreadPoolBuilder::new().thread_name(|i| format!("exitserve-compute-{i}"));
        #[cfg(feature = "cuda-emulator")]
        let pool = match cfg.emulate_cuda {
            true => pool.start_handler(|_| crate::kernels::cuda_emulator::emulate_this_thread()),
            false => pool,
        };
        let pool = pool.build().map_err(std::io::Error::other)?;
        // The batcher's state is single-threaded (Rc): it is built on the model thread.
        let thread = std::thread::Builder::new()
            .name("exitserve-model".into())
            .spawn(move || {
                let run = || {
                    pool.install(|| batcher::Batcher::new(m, t, (rx, places), cfg.batch, b).run())
                };
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).is_err() {
                    // Every phase is contained; reaching here means the engine's state is
                    // lost. Exit non-zero so that a supervisor restarts the server, rather
                    // than answer 503 forever.
                    tracing::error!("the engine thread failed; exiting");
                    std::process::exit(ENGINE_FAILURE_EXIT_CODE);
                }
            })?;
        let grammars = structured::Grammars::new(
            Arc::clone(&tokenizer),
            limits.vocab_size,
            eos_token_id,
            cfg.structured,
        )
        .inspect_err(|e| tracing::warn!(error = %e, "structured outputs are unavailable"))
        .ok();
        let validator = Validator::new(limits, tokenizer)
            .with_chat_template(cfg.chat_template.clone())
            .with_grammars(grammars.map(Arc::new));
        Ok(Self {
            tx,
            queue,
            validator,
            validation,
            stream_buffer_events,
            eos_token_id,
            metrics,
            model,
            thread: Arc::new(thread),
        })
    }

    pub fn validator(&self) -> &Validator {
        &self.validator
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn metrics_handle(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// True while the model thread runs.
    pub fn is_alive(&self) -> bool {
        !self.thread.is_finished() && !self.tx.is_closed()
    }

    /// Waits for a validation slot, up to `deadline`.
    pub async fn validation_slot(&self, deadline: Instant) -> Result<ValidationSlot, EngineError> {
        let acquire = Arc::clone(&self.validation).acquire_owned();
        match tokio::time::timeout_at(deadline.into(), acquire).await {
            Ok(Ok(permit)) => Ok(ValidationSlot(permit)),
            Ok(Err(_)) => Err(EngineError::Unavailable),
            Err(_) => Err(EngineError::Timeout {
                seconds: self.validator.limits().request_timeout.as_secs_f64(),
            }),
        }
    }

    /// Validates on a blocking thread (tokenization is CPU work), under a validation slot.
    pub async fn validate(
        &self,
        req: GenerateRequest,
        deadline: Instant,
        _slot: &ValidationSlot,
    ) -> Result<ValidRequest, EngineError> {
        // Counted under the mode it asked for (by its model id, else `multi_exit`).
        let label = match (&req.named_mode, &req.mode) {
            (Some(named), _) => named.label(),
            (None, None) => self.validator.limits().default_mode.label(),
            (None, Some(spec)) => spec.label(),
        };
        let valid = self
            .off_runtime(label, move |v| Ok(v.validate(req, deadline)?))
            .await?;
        if let Some(s) = valid.speculative {
            // The draft layer's int8 copies, here rather than on the model thread: the first
            // request that drafts from a layer waits for them, the running streams do not.
            let model = Arc::clone(&self.model);
            self.blocking("draft copies", move || {
                model.prepare_draft(s.draft_layer).map_err(|e| {
                    EngineError::Internal(format!("cannot make the draft copies: {e}"))
                })
            })
            .await?;
        }
        Ok(valid)
    }

    /// Validates an inspection on a blocking thread, under a validation slot.
    pub async fn validate_inspect(
        &self,
        req: request::InspectRequest,
        deadline: Instant,
        _slot: &ValidationSlot,
    ) -> Result<ValidRequest, EngineError> {
        self.off_runtime("inspect", move |v| Ok(v.validate_inspect(req, deadline)?))
            .await
    }

    /// Runs a validation on a blocking thread; a refusal is counted as `invalid` under `label`.
    async fn off_runtime(
        &self,
        label: &'static str,
        validate: impl FnOnce(&Validator) -> Result<ValidRequest, EngineError> + Send + 'static,
    ) -> Result<ValidRequest, EngineError> {
        let v = self.validator.clone();
        let res = self.blocking("validation", move || validate(&v)).await;
        if res.is_err() {
            self.metrics.request_finished("invalid", label);
        }
        res
    }

    /// Enqueues `req`; fails at once with `Overloaded` when the queue is full of requests of
    /// its priority or higher (one of a lower priority that waits is turned away for it).
    pub fn submit(
        &self,
        req: ValidRequest,
        span: tracing::Span,
    ) -> Result<EventReceiver, EngineError> {
        let sequences = req.prompts.len() * req.best_of;
        let (tx, rx) = mpsc::channel(
            self.stream_buffer_events * sequences
                + request::events_per_step(sequences, req.tokens_per_step()),
        );
        let label = req.mode.label();
        let sub = Submission {
            req,
            tx,
            span,
            arrived: Instant::now(),
        };
        if !self.queue.take(sub.req.priority) {
            self.metrics.rejections.increment(1);
            self.metrics.request_finished("rejected", label);
            return Err(EngineError::Overloaded {
                queued: self.queue.max(),
            });
        }
        self.metrics.queue_depth.increment(1.0);
        // The channel holds at most as many as there are places: it is never full here.
        if self.tx.try_send(sub).is_err() {
            self.metrics.queue_depth.decrement(1.0);
            self.queue.give_back();
            return Err(EngineError::Unavailable);
        }
        Ok(rx)
    }

    /// Tokenizes `text` off the async runtime, under a validation slot; with `strs`, also
    /// each token's text. A text that cannot fit the context is refused from its length
    /// alone, before any tokenizing.
    pub async fn tokenize(
        &self,
        input: TokenizeInput,
        strs: bool,
        _slot: &ValidationSlot,
    ) -> Result<(Vec<u32>, Option<Vec<String>>), EngineError> {
        let text = match input {
            TokenizeInput::Text(t) => t,
            TokenizeInput::Chat(chat) => {
                let v = self.validator.clone();
                self.blocking("chat template", move || Ok(v.render_chat(&chat)?))
                    .await?
            }
        };
        let limits = self.validator.limits();
        let max = limits.max_positions;
        let at_least = self.validator.tokens_at_least(&text);
        if at_least > max {
            return Err(ValidationError::TokenizeTooLong {
                tokens: at_least,
                bytes: Some(text.len()),
                max,
            }
            .into());
        }
        let tok = Arc::clone(self.validator.tokenizer());
        self.blocking("tokenizer", move || {
            let ids = tok
                .encode(&text)
                .map_err(|e| ValidationError::Untokenizable(e.to_string()))?;
            if ids.len() > max {
                return Err(ValidationError::TokenizeTooLong {
                    tokens: ids.len(),
                    bytes: None,
                    max,
                }
                .into());
            }
            let texts = strs.then(|| {
                ids.iter()
                    .map(|&id| tok.decode(&[id]).unwrap_or_default())
                    .collect()
            });
            Ok((ids, texts))
        })
        .await
    }

    /// The text of `ids` (at most the context length of them, each in the vocabulary), off
    /// the async runtime, under a validation slot.
    pub async fn detokenize(
        &self,
        ids: Vec<i64>,
        _slot: &ValidationSlot,
    ) -> Result<String, EngineError> {
        let limits = self.validator.limits();
        let (vocab, max) = (limits.vocab_size, limits.max_positions);
        if ids.len() > max {
            return Err(ValidationError::DetokenizeTooLong {
                got: ids.len(),
                max,
            }
            .into());
        }
        let ids = ids
            .iter()
            .map(|&id| {
                self.validator
                    .token_id(id)
                    .ok_or(ValidationError::TokenId { vocab, got: id })
            })
            .collect::<Result<Vec<u32>, _>>()?;
        let tok = Arc::clone(self.validator.tokenizer());
        self.blocking("tokenizer", move || {
            tok.decode(&ids)
                .map_err(|e| EngineError::Internal(format!("cannot decode: {e}")))
        })
        .await
    }

    /// Runs CPU work on a blocking thread; a panic there is an internal error naming `what`.
    async fn blocking<T: Send + 'static>(
        &self,
        what: &str,
        work: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, EngineError> {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| EngineError::Internal(format!("{what} task failed: {e}")))?
    }

    /// The end-of-text token's text, if the model has one.
    pub fn eos_token(&self) -> Option<String> {
        self.eos_token_id
            .and_then(|id| self.validator.tokenizer().decode(&[id]).ok())
    }

    /// Prometheus text of every engine metric.
    pub fn render_metrics(&self) -> String {
        self.metrics
            .render(self.model.stats.block_evals.load(Ordering::Relaxed))
    }
}
