//! The machine's limits, measured in the same run as the speeds they bound: read bandwidth
//! (the single-stream decode bound) and the multiply-add peak of the instruction each dtype's
//! kernels use (the batched bound), via `kernels::peak`.

use serde_json::{json, Value};

use crate::peak::{self, Rate};

pub struct Limits {
    pub threads: usize,
    /// Bytes/s of a streaming read of a buffer far larger than the caches, all threads.
    pub read_bytes_per_s: f64,
    pub f32: Option<Rate>,
    pub bf16: Option<Rate>,
    pub int8: Option<Rate>,
}

/// Bytes of the bandwidth probe's buffer: far beyond any last-level cache.
const READ_BUFFER: usize = 1 << 30;

impl Limits {
    pub fn measure() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let rate = |kind| peak::multiply_add_rate(kind, threads, 0.3, 5);
        Self {
            threads,
            read_bytes_per_s: peak::read_bandwidth(READ_BUFFER, threads, 5),
            f32: rate("f32"),
            bf16: rate("bf16"),
            int8: rate("int8"),
        }
    }

    /// The compute bound of weights served as `dtype`: exitserve's f32 / bf16 / int8, or
    /// llama.cpp's f32 / bf16 / q8_0 (int8 products).
    pub fn peak_for(&self, dtype: &str) -> Option<f64> {
        match dtype {
            "f32" => self.f32,
            "bf16" => self.bf16,
            "int8" | "q8_0" => self.int8,
            _ => None,
        }
        .map(|r| r.ops_per_s)
    }

    pub fn summary(&self) -> String {
        let g = |r: &Option<Rate>| {
            r.map_or("-".to_string(), |r| {
                format!("{:.0} G ({})", r.ops_per_s / 1e9, r.instruction)
            })
        };
        format!(
            "read {:.1} GB/s; multiply-add peak f32 {}, bf16 {}, int8 {} ops/s; {} threads",
            self.read_bytes_per_s / 1e9,
            g(&self.f32),
            g(&self.bf16),
            g(&self.int8),
            self.threads
        )
    }

    pub fn to_json(&self) -> Value {
        let r = |r: &Option<Rate>| {
            r.map(|r| json!({"ops_per_s": r.ops_per_s, "instruction": r.instruction}))
        };
        json!({
            "threads": self.threads,
            "read_bytes_per_s": self.read_bytes_per_s,
            "f32": r(&self.f32),
            "bf16": r(&self.bf16),
            "int8": r(&self.int8),
            "summary": self.summary(),
        })
    }
}
