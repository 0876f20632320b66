//! Prometheus metrics, rendered by hand in the text exposition format (no extra dependency).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A cumulative histogram with fixed bucket bounds in seconds.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if s <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

pub struct Metrics {
    /// (status, mode) -> finished requests.
    requests: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    pub queue_depth: AtomicI64,
    pub batch_size: AtomicI64,
    /// The most sequences ever reserved at once (forks not yet made included).
    pub batch_size_peak: AtomicI64,
    pub kv_tokens_reserved: AtomicI64,
    /// The most KV positions ever reserved at once.
    pub kv_tokens_reserved_peak: AtomicI64,
    pub kv_tokens_limit: AtomicI64,
    pub paused_sequences: AtomicI64,
    /// Open client connections (set by the listener).
    pub open_connections: AtomicI64,
    /// Connections closed by the server for idleness or a slow request head.
    pub connections_timed_out: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub cancellations: AtomicU64,
    pub rejections: AtomicU64,
    pub model_steps: AtomicU64,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_latency: Histogram,
    pub queue_wait: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::new(BTreeMap::new()),
            queue_depth: AtomicI64::new(0),
            batch_size: AtomicI64::new(0),
            batch_size_peak: AtomicI64::new(0),
            kv_tokens_reserved: AtomicI64::new(0),
            kv_tokens_reserved_peak: AtomicI64::new(0),
            kv_tokens_limit: AtomicI64::new(0),
            paused_sequences: AtomicI64::new(0),
            open_connections: AtomicI64::new(0),
            connections_timed_out: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            cancellations: AtomicU64::new(0),
            rejections: AtomicU64::new(0),
            model_steps: AtomicU64::new(0),
            time_to_first_token: Histogram::new(LATENCY_BUCKETS),
            inter_token_latency: Histogram::new(LATENCY_BUCKETS),
            e2e_latency: Histogram::new(LATENCY_BUCKETS),
            queue_wait: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

impl Metrics {
    pub fn request_finished(&self, status: &'static str, mode: &'static str) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((status, mode)).or_default() += 1;
    }

    pub fn render(&self, block_evals: u64) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP exitserve_requests_total Finished requests by status and decoding mode.\n# TYPE exitserve_requests_total counter"
        );
        for ((status, mode), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "exitserve_requests_total{{status=\"{status}\",mode=\"{mode}\"}} {n}"
            );
        }
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, v: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        gauge(
            &mut out,
            "exitserve_queue_depth",
            "Requests waiting for a batch slot.",
            "gauge",
            self.queue_depth.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "exitserve_batch_size",
            "Sequences in the running batch.",
            "gauge",
            self.batch_size.load(Ordering::Relaxed).to_string(),
        );
        let iload = |a: &AtomicI64| a.load(Ordering::Relaxed).to_string();
        for (name, help, v) in [
            ("exitserve_batch_size_peak", "Most sequences reserved in the batch at once since start (every n/best_of copy counted).", &self.batch_size_peak),
            ("exitserve_kv_tokens_reserved", "KV-cache positions reserved by the running batch (prompt + max_tokens per sequence).", &self.kv_tokens_reserved),
            ("exitserve_kv_tokens_reserved_peak", "Most KV-cache positions reserved at once since start.", &self.kv_tokens_reserved_peak),
            ("exitserve_kv_tokens_limit", "The KV-cache position budget (--max-batch-total-tokens).", &self.kv_tokens_limit),
            ("exitserve_paused_sequences", "Sequences sitting out because their client has not read its stream.", &self.paused_sequences),
            ("exitserve_open_connections", "Open client connections.", &self.open_connections),
        ] {
            gauge(&mut out, name, help, "gauge", iload(v));
        }
        gauge(
            &mut out,
            "exitserve_connections_timed_out_total",
            "Connections closed for idleness or a request head that came too slowly.",
            "counter",
            load(&self.connections_timed_out),
        );
        gauge(
            &mut out,
            "exitserve_prompt_tokens_total",
            "Prompt tokens prefilled.",
            "counter",
            load(&self.prompt_tokens),
        );
        gauge(
            &mut out,
            "exitserve_generated_tokens_total",
            "Tokens generated.",
            "counter",
            load(&self.generated_tokens),
        );
        gauge(
            &mut out,
            "exitserve_cancellations_total",
            "Requests dropped because the client went away.",
            "counter",
            load(&self.cancellations),
        );
        gauge(
            &mut out,
            "exitserve_rejections_total",
            "Requests refused with 429 (queue full).",
            "counter",
            load(&self.rejections),
        );
        gauge(
            &mut out,
            "exitserve_model_steps_total",
            "Batched forward passes.",
            "counter",
            load(&self.model_steps),
        );
        gauge(&mut out, "exitserve_block_evaluations_total", "Transformer block evaluations, one per sequence per block (early exits skip the blocks above them).", "counter", block_evals.to_string());
        self.time_to_first_token.render(
            &mut out,
            "exitserve_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
        );
        self.inter_token_latency.render(
            &mut out,
            "exitserve_inter_token_latency_seconds",
            "Time between consecutive tokens of a sequence.",
        );
        self.e2e_latency.render(
            &mut out,
            "exitserve_request_duration_seconds",
            "Time from arrival to the last token.",
        );
        self.queue_wait.render(
            &mut out,
            "exitserve_queue_wait_seconds",
            "Time from arrival to admission into the batch.",
        );
        out
    }
}
