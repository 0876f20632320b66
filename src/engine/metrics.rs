//! Prometheus metrics through the ecosystem's crates: `metrics` handles, recorded into this
//! engine's own `metrics-exporter-prometheus` recorder and rendered by it.
//!
//! The recorder is per engine, not the process-wide global one, so that several engines in one
//! process (the tests run many) never mix their counts. Every metric is registered once here
//! and kept as a handle; recording is then a relaxed atomic operation, as before.
//!
//! The load gauges read by load-aware routers (the Gateway API Inference Extension's endpoint
//! picker, llm-d) are `exitserve_queue_depth` (waiting requests), `exitserve_requests_running`
//! and `exitserve_kv_cache_usage_ratio` (0..1); the README's "Deploying" maps them.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// A structured output's work per token: tens of microseconds usually, llguidance's limits
/// stop it at tens of milliseconds.
const GRAMMAR_BUCKETS: &[f64] = &[
    0.000_01, 0.000_03, 0.000_1, 0.000_3, 0.001, 0.003, 0.01, 0.03, 0.1,
];

/// How often histogram samples are folded into their buckets: until then the exporter keeps
/// every raw sample, which on a server nobody scrapes would grow without bound.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The names every engine exports, with their type: the Kubernetes manifests' metric
/// references are checked against this list (tests/deploy.rs).
pub const EXPORTED: &[(&str, &str)] = &[
    ("exitserve_requests_total", "counter"),
    ("exitserve_early_exit_tokens_total", "counter"),
    ("exitserve_queue_depth", "gauge"),
    ("exitserve_requests_running", "gauge"),
    ("exitserve_requests_preempted", "gauge"),
    ("exitserve_batch_size", "gauge"),
    ("exitserve_batch_size_peak", "gauge"),
    ("exitserve_kv_tokens_reserved", "gauge"),
    ("exitserve_kv_tokens_reserved_peak", "gauge"),
    ("exitserve_kv_tokens_limit", "gauge"),
    ("exitserve_kv_cache_usage_ratio", "gauge"),
    ("exitserve_paused_sequences", "gauge"),
    ("exitserve_open_connections", "gauge"),
    ("exitserve_connections_timed_out_total", "counter"),
    ("exitserve_connections_refused_total", "counter"),
    ("exitserve_prompt_tokens_total", "counter"),
    ("exitserve_prefix_cache_hit_tokens_total", "counter"),
    ("exitserve_prefix_cache_miss_tokens_total", "counter"),
    ("exitserve_prefix_cache_tokens", "gauge"),
    ("exitserve_generated_tokens_total", "counter"),
    ("exitserve_cancellations_total", "counter"),
    ("exitserve_preemptions_total", "counter"),
    ("exitserve_priority_yields_total", "counter"),
    ("exitserve_rejections_total", "counter"),
    ("exitserve_model_steps_total", "counter"),
    ("exitserve_block_evaluations_total", "counter"),
    ("exitserve_device_choices_total", "counter"),
    ("exitserve_device_logprobs_total", "counter"),
    ("exitserve_device_scores_total", "counter"),
    ("exitserve_speculative_drafted_tokens_total", "counter"),
    ("exitserve_speculative_accepted_tokens_total", "counter"),
    ("exitserve_time_to_first_token_seconds", "histogram"),
    ("exitserve_inter_token_latency_seconds", "histogram"),
    ("exitserve_request_duration_seconds", "histogram"),
    ("exitserve_queue_wait_seconds", "histogram"),
    ("exitserve_grammar_step_seconds", "histogram"),
];

/// A gauge that only ever rises to the largest value offered.
pub struct Peak {
    max: AtomicI64,
    gauge: Gauge,
}

impl Peak {
    pub fn offer(&self, v: i64) {
        let before = self.max.fetch_max(v, Ordering::Relaxed);
        if v > before {
            self.gauge.set(v as f64);
        }
    }
}

/// Registers metrics with help text in one recorder.
struct Registry<'a>(&'a PrometheusRecorder);

const METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

impl Registry<'_> {
    fn counter(&self, name: &'static str, help: &'static str) -> Counter {
        self.describe(name, help, |r, k, h| r.describe_counter(k, None, h));
        self.0
            .register_counter(&Key::from_static_name(name), &METADATA)
    }

    fn gauge(&self, name: &'static str, help: &'static str) -> Gauge {
        self.describe(name, help, |r, k, h| r.describe_gauge(k, None, h));
        let g = self
            .0
            .register_gauge(&Key::from_static_name(name), &METADATA);
        // Registered at 0, so the exposition lists it before its first change.
        g.set(0.0);
        g
    }

    fn peak(&self, name: &'static str, help: &'static str) -> Peak {
        Peak {
            max: AtomicI64::new(0),
            gauge: self.gauge(name, help),
        }
    }

    fn histogram(&self, name: &'static str, help: &'static str) -> Histogram {
        self.describe(name, help, |r, k, h| r.describe_histogram(k, None, h));
        self.0
            .register_histogram(&Key::from_static_name(name), &METADATA)
    }

    fn describe(
        &self,
        name: &'static str,
        help: &'static str,
        f: impl Fn(&PrometheusRecorder, KeyName, SharedString),
    ) {
        debug_assert!(
            EXPORTED.iter().any(|(n, _)| *n == name),
            "{name} not listed"
        );
        f(
            self.0,
            KeyName::from_const_str(name),
            SharedString::const_str(help),
        );
    }
}

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    last_upkeep: std::sync::Mutex<Instant>,
    /// Requests waiting for a batch slot.
    pub queue_depth: Gauge,
    pub requests_running: Gauge,
    pub requests_preempted: Gauge,
    pub batch_size: Gauge,
    /// The most sequences ever reserved at once (forks not yet made included).
    pub batch_size_peak: Peak,
    pub kv_tokens_reserved: Gauge,
    /// The most KV positions ever reserved at once.
    pub kv_tokens_reserved_peak: Peak,
    kv_tokens_limit: Gauge,
    kv_limit: AtomicI64,
    kv_cache_usage: Gauge,
    pub paused_sequences: Gauge,
    /// Open client connections (set by the listener).
    pub open_connections: Gauge,
    /// Connections closed by the server for idleness or a slow request head.
    pub connections_timed_out: Counter,
    /// Connections closed at once: their peer held `--max-connections-per-peer` already.
    pub connections_refused: Counter,
    pub prompt_tokens: Counter,
    /// Prompt positions taken from the prefix cache, and those of prompts that looked it up
    /// and computed them.
    pub prefix_cache_hits: Counter,
    pub prefix_cache_misses: Counter,
    pub prefix_cache_tokens: Gauge,
    pub generated_tokens: Counter,
    pub cancellations: Counter,
    pub preemptions: Counter,
    /// Steps that sequences sat out beside one of a higher priority, one per sequence and step.
    pub priority_yields: Counter,
    pub rejections: Counter,
    pub model_steps: Counter,
    block_evaluations: Counter,
    pub device_choices: Counter,
    pub device_logprobs: Counter,
    pub device_scores: Counter,
    pub speculative_drafted: Counter,
    pub speculative_accepted: Counter,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_latency: Histogram,
    pub queue_wait: Histogram,
    /// A constrained sequence's grammar work for one token (its mask, then its advance).
    pub grammar_step: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .expect("the bucket list is not empty")
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full("exitserve_grammar_step_seconds".into()),
                GRAMMAR_BUCKETS,
            )
            .expect("the bucket list is not empty")
            .build_recorder();
        let r = Registry(&recorder);
        r.describe(
            "exitserve_requests_total",
            "Finished requests by status and decoding mode.",
            |r, k, h| r.describe_counter(k, None, h),
        );
        r.describe(
            "exitserve_early_exit_tokens_total",
            "Tokens generated in early-exit mode, by the layer each left at (or `original`).",
            |r, k, h| r.describe_counter(k, None, h),
        );
        Self {
            handle: recorder.handle(),
            last_upkeep: std::sync::Mutex::new(Instant::now()),
            queue_depth: r.gauge("exitserve_queue_depth", "Requests waiting for a batch slot."),
            requests_running: r.gauge(
                "exitserve_requests_running",
                "Requests with a sequence in the running batch (completions and inspections).",
            ),
            requests_preempted: r.gauge(
                "exitserve_requests_preempted",
                "Requests preempted for one of higher priority, waiting to come back.",
            ),
            batch_size: r.gauge("exitserve_batch_size", "Sequences in the running batch."),
            batch_size_peak: r.peak(
                "exitserve_batch_size_peak",
                "Most sequences reserved in the batch at once since start (every n/best_of copy counted).",
            ),
            kv_tokens_reserved: r.gauge(
                "exitserve_kv_tokens_reserved",
                "KV-cache positions reserved by the running batch (prompt + max_tokens per sequence).",
            ),
            kv_tokens_reserved_peak: r.peak(
                "exitserve_kv_tokens_reserved_peak",
                "Most KV-cache positions reserved at once since start.",
            ),
            kv_tokens_limit: r.gauge(
                "exitserve_kv_tokens_limit",
                "The KV-cache position budget (--max-batch-total-tokens).",
            ),
            kv_limit: AtomicI64::new(0),
            kv_cache_usage: r.gauge(
                "exitserve_kv_cache_usage_ratio",
                "KV-cache positions reserved over the budget, 0..1.",
            ),
            paused_sequences: r.gauge(
                "exitserve_paused_sequences",
                "Sequences sitting out because their client has not read its stream.",
            ),
            open_connections: r.gauge("exitserve_open_connections", "Open client connections."),
            connections_timed_out: r.counter(
                "exitserve_connections_timed_out_total",
                "Connections closed for idleness or a request head that came too slowly.",
            ),
            connections_refused: r.counter(
                "exitserve_connections_refused_total",
                "Connections closed at once: their client address held --max-connections-per-peer.",
            ),
            prompt_tokens: r.counter("exitserve_prompt_tokens_total", "Prompt tokens prefilled."),
            prefix_cache_hits: r.counter(
                "exitserve_prefix_cache_hit_tokens_total",
                "Prompt tokens whose keys and values came from the prefix cache.",
            ),
            prefix_cache_misses: r.counter(
                "exitserve_prefix_cache_miss_tokens_total",
                "Prompt tokens computed (not found in the prefix cache, or the cache is off).",
            ),
            prefix_cache_tokens: r.gauge(
                "exitserve_prefix_cache_tokens",
                "Positions held by the prefix cache (they count against --max-batch-total-tokens).",
            ),
            generated_tokens: r.counter("exitserve_generated_tokens_total", "Tokens generated."),
            cancellations: r.counter(
                "exitserve_cancellations_total",
                "Requests dropped because the client went away.",
            ),
            preemptions: r.counter(
                "exitserve_preemptions_total",
                "Running requests preempted for a request of higher priority (they recompute their caches and go on).",
            ),
            priority_yields: r.counter(
                "exitserve_priority_yields_total",
                "Steps sat out by sequences of a lower priority than another in the step, one per sequence and step (--max-sequences-beside-priority).",
            ),
            rejections: r.counter(
                "exitserve_rejections_total",
                "Requests refused with 429 (queue full).",
            ),
            model_steps: r.counter("exitserve_model_steps_total", "Batched forward passes."),
            block_evaluations: r.counter(
                "exitserve_block_evaluations_total",
                "Transformer block evaluations, one per sequence per block (early exits skip the blocks above them).",
            ),
            device_choices: r.counter(
                "exitserve_device_choices_total",
                "Tokens chosen where the logits are (greedy, contrast or drawn in the step), one index copied instead of vocabulary rows.",
            ),
            device_logprobs: r.counter(
                "exitserve_device_logprobs_total",
                "Positions whose logprob and top alternatives were read where the logits are (echo's prompt positions, tokens chosen there whose logprobs are reported or ranked), a few floats copied instead of a vocabulary row.",
            ),
            device_scores: r.counter(
                "exitserve_device_scores_total",
                "Tokens and echoed prompt positions whose strategy's scores were computed where the logits are (SLED's candidates and their logits), a few floats copied instead of every premature layer's vocabulary row.",
            ),
            speculative_drafted: r.counter(
                "exitserve_speculative_drafted_tokens_total",
                "Tokens drafted from a low exit by self-speculative decoding.",
            ),
            speculative_accepted: r.counter(
                "exitserve_speculative_accepted_tokens_total",
                "Drafted tokens the verifying pass accepted.",
            ),
            time_to_first_token: r.histogram(
                "exitserve_time_to_first_token_seconds",
                "Time from arrival to the first generated token.",
            ),
            inter_token_latency: r.histogram(
                "exitserve_inter_token_latency_seconds",
                "Time between consecutive tokens of a sequence.",
            ),
            e2e_latency: r.histogram(
                "exitserve_request_duration_seconds",
                "Time from arrival to the last token.",
            ),
            queue_wait: r.histogram(
                "exitserve_queue_wait_seconds",
                "Time from arrival to admission into the batch.",
            ),
            grammar_step: r.histogram(
                "exitserve_grammar_step_seconds",
                "Structured outputs: the grammar's work for one token of a sequence (its token mask and its advance), on the model thread.",
            ),
            recorder,
        }
    }
}

impl Metrics {
    pub fn request_finished(&self, status: &'static str, mode: &'static str) {
        let key = Key::from_parts(
            "exitserve_requests_total",
            vec![Label::new("status", status), Label::new("mode", mode)],
        );
        self.recorder.register_counter(&key, &METADATA).increment(1);
    }

    /// One token of an early-exit mode that left at `layer` (`original`: no exit was confident).
    pub fn early_exit_token(&self, layer: &str) {
        let key = Key::from_parts(
            "exitserve_early_exit_tokens_total",
            vec![Label::new("layer", layer.to_string())],
        );
        self.recorder.register_counter(&key, &METADATA).increment(1);
    }

    pub fn set_kv_tokens_limit(&self, limit: usize) {
        self.kv_limit.store(limit as i64, Ordering::Relaxed);
        self.kv_tokens_limit.set(limit as f64);
    }

    /// The reserved KV positions, and their share of the budget.
    pub fn set_kv_tokens_reserved(&self, reserved: usize) {
        self.kv_tokens_reserved.set(reserved as f64);
        self.kv_tokens_reserved_peak.offer(reserved as i64);
        let limit = self.kv_limit.load(Ordering::Relaxed);
        let ratio = if limit > 0 {
            (reserved as f64 / limit as f64).min(1.0)
        } else {
            0.0
        };
        self.kv_cache_usage.set(ratio);
    }

    /// Folds histogram samples into buckets when [`UPKEEP_EVERY`] has passed; the batcher
    /// (the only thread that records histograms) calls it once a step.
    pub fn upkeep(&self) {
        let mut last = self.last_upkeep.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= UPKEEP_EVERY {
            *last = Instant::now();
            drop(last);
            self.handle.run_upkeep();
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, block_evals: u64) -> String {
        self.block_evaluations.absolute(block_evals);
        self.handle.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, line_start: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(line_start))
            .map(|v| v.trim().to_string())
    }

    #[test]
    fn every_listed_metric_is_exported_with_its_type_before_any_traffic() {
        let m = Metrics::default();
        // the labelled families appear with their first sample
        m.request_finished("ok", "original");
        m.early_exit_token("2");
        let text = m.render(0);
        for (name, kind) in EXPORTED {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} {kind}\n{text}"
            );
            assert!(text.contains(&format!("# HELP {name} ")), "{name}\n{text}");
        }
    }

    #[test]
    fn values_and_labels_render() {
        let m = Metrics::default();
        m.set_kv_tokens_limit(200);
        m.set_kv_tokens_reserved(50);
        m.set_kv_tokens_reserved(20);
        m.queue_depth.increment(3.0);
        m.queue_depth.decrement(1.0);
        m.request_finished("error", "contrast");
        m.request_finished("error", "contrast");
        m.time_to_first_token.record(Duration::from_millis(30));
        let text = m.render(7);
        assert_eq!(
            value(&text, "exitserve_kv_cache_usage_ratio ").as_deref(),
            Some("0.1")
        );
        assert_eq!(
            value(&text, "exitserve_kv_tokens_reserved_peak ").as_deref(),
            Some("50")
        );
        assert_eq!(value(&text, "exitserve_queue_depth ").as_deref(), Some("2"));
        assert_eq!(
            value(&text, "exitserve_block_evaluations_total ").as_deref(),
            Some("7")
        );
        assert_eq!(
            value(
                &text,
                "exitserve_requests_total{status=\"error\",mode=\"contrast\"} "
            )
            .as_deref(),
            Some("2")
        );
        assert_eq!(
            value(
                &text,
                "exitserve_time_to_first_token_seconds_bucket{le=\"0.05\"} "
            )
            .as_deref(),
            Some("1")
        );
        assert_eq!(
            value(
                &text,
                "exitserve_time_to_first_token_seconds_bucket{le=\"0.025\"} "
            )
            .as_deref(),
            Some("0")
        );
    }
}
