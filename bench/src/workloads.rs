//! What the bench measures on a running server: single-stream decode and time to first token
//! per mode, aggregate throughput at several stream counts, and the scoring workload
//! (lm-eval's loglikelihood requests); each figure also as a share of the machine's bound.

use std::time::Instant;

use serde_json::{json, Value};

use crate::checkpoint::Shape;
use crate::client;
use crate::cost::{self, ModeWork};
use crate::limits::Limits;
use crate::servers::Server;
use crate::Args;

/// A mode timed: its name, its `multi_exit` JSON, the work a token takes in it, and how it
/// chooses (greedy, or [`SAMPLED`]).
pub struct BenchMode {
    pub name: String,
    pub json: String,
    pub work: ModeWork,
    pub sampled: bool,
}

/// A sampled mode's request fields, as an OpenAI client commonly sends them (seeded, so that
/// every run draws alike).
pub const SAMPLED: &str = r#""temperature":0.8,"top_p":0.95,"seed":7"#;

/// The modes timed: the original head (greedy, and sampled), the exit at half depth, and the
/// top exit contrasted with it (12/6 on GPT-Neo-125M, 24/12 on GPT-2 medium).
pub fn modes(shape: &Shape) -> Vec<BenchMode> {
    let (top, half) = (shape.layers, shape.half_exit());
    let mode = |name: String, json: String, layers, heads| BenchMode {
        name,
        json,
        work: ModeWork { layers, heads },
        sampled: false,
    };
    vec![
        mode("original".into(), r#"{"mode":"original"}"#.into(), top, 1),
        BenchMode {
            sampled: true,
            ..mode(
                "original sampled".into(),
                r#"{"mode":"original"}"#.into(),
                top,
                1,
            )
        },
        mode(
            format!("exit {half}"),
            format!(r#"{{"mode":"exit","layer":{half}}}"#),
            half,
            1,
        ),
        mode(
            format!("contrast {top}/{half}"),
            format!(r#"{{"mode":"contrast","upper":{top},"lower":{half}}}"#),
            top,
            2,
        ),
    ]
}

/// Which modes a run times (`--modes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeSet {
    /// [`modes`]: one head and two (original greedy and sampled, an exit, a contrast).
    Heads,
    /// [`strategy_modes`]: the strategies over many layers (DoLa, SLED).
    Strategies,
    /// Both.
    All,
}

impl ModeSet {
    pub fn modes(self, shape: &Shape) -> Vec<BenchMode> {
        match self {
            ModeSet::Heads => modes(shape),
            ModeSet::Strategies => strategy_modes(shape),
            ModeSet::All => modes(shape)
                .into_iter()
                .chain(strategy_modes(shape))
                .collect(),
        }
    }
}

/// The strategies over many layers, greedy: DoLa and SLED over every exit below the top (5 on
/// GPT-Neo-125M, 11 on GPT-2 medium), each token reading that many heads besides the top's.
pub fn strategy_modes(shape: &Shape) -> Vec<BenchMode> {
    let below: Vec<usize> = shape
        .exits
        .iter()
        .copied()
        .filter(|&e| e < shape.layers)
        .collect();
    let work = ModeWork {
        layers: shape.layers,
        heads: 1 + below.len(),
    };
    vec![
        BenchMode {
            name: format!("dola {}", below.len()),
            json: format!(
                r#"{{"mode":"dola","layers":{}}}"#,
                serde_json::to_string(&below).unwrap()
            ),
            work,
            sampled: false,
        },
        BenchMode {
            name: format!("sled {}", below.len()),
            json: r#"{"mode":"sled"}"#.into(),
            work,
            sampled: false,
        },
    ]
}

/// `n` deterministic token ids in 1000..40000 (like the reference benchmark's prompts); each
/// `seed` a different prompt, so no server can answer from a cached prefix.
pub fn prompt_ids(n: usize, seed: u64) -> Vec<u32> {
    let mut x = 0x9E37_79B9u64 ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            1000 + ((x >> 33) % 39000) as u32
        })
        .collect()
}

/// A streamed completion of `new` tokens (EOS ignored), greedy or [`SAMPLED`]; `mode` is
/// the `multi_exit` object, None for a plain OpenAI request (the peer's).
pub fn body(prompt: &[u32], new: usize, mode: Option<&str>, sampled: bool) -> String {
    let multi_exit = mode.map_or(String::new(), |m| format!(r#","multi_exit":{m}"#));
    let choice = if sampled {
        SAMPLED
    } else {
        r#""temperature":0"#
    };
    format!(
        r#"{{"model":"bench","prompt":{},"max_tokens":{new},{choice},"ignore_eos":true,"stream":true{multi_exit}}}"#,
        serde_json::to_string(prompt).unwrap()
    )
}

/// What every measurement of one bench run shares.
pub struct Bench<'a> {
    pub args: &'a Args,
    pub shape: &'a Shape,
    pub limits: &'a Limits,
}

/// Runs `f(i)` for `i` in `0..n` on `n` threads at once; their results in order.
pub fn concurrently<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = (0..n).map(|i| s.spawn(move || f(i))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

impl Bench<'_> {
    /// Single-stream decode and TTFT (the bench's prompt and a 512-token one) per mode, and
    /// aggregate throughput at each concurrency; each figure also as a share of its bound.
    /// `dtype` names the weights (exitserve's f32/bf16/int8, llama.cpp's f32/bf16/q8_0); a
    /// mode whose JSON is empty is sent without `multi_exit` (the peer's).
    pub fn serve(&self, server: &Server, dtype: &str, modes: &[BenchMode]) -> Value {
        let (args, url) = (self.args, server.completions());
        fn json_of(m: &BenchMode) -> Option<&str> {
            (!m.json.is_empty()).then_some(m.json.as_str())
        }
        let run = |prompt: &[u32], new: usize, m: &BenchMode| {
            client::stream_completion(&url, &body(prompt, new, json_of(m), m.sampled))
                .expect("request")
        };
        for m in modes {
            run(&prompt_ids(args.prompt_len, 1), 4, m); // warm-up
        }
        // Best of ROUNDS on an idle server, the modes interleaved round by round, so that a
        // slow spell of a shared machine does not fall on one mode only; a new prompt each
        // time (no prefix cache can help).
        const ROUNDS: usize = 5;
        let mut seed = 100;
        let mut next_prompt = |len| {
            seed += 1;
            prompt_ids(len, seed)
        };
        let mut decode = vec![0f64; modes.len()];
        let mut ttft = vec![f64::INFINITY; modes.len()];
        let mut ttft_long = vec![f64::INFINITY; modes.len()];
        for round in 0..ROUNDS {
            for (i, m) in modes.iter().enumerate() {
                let t = run(&next_prompt(args.prompt_len), args.new, m);
                decode[i] = decode[i].max(t.decode_tps());
                ttft[i] = ttft[i].min(t.ttft_s());
                if round < 3 {
                    let t = run(&next_prompt(512), 2, m);
                    ttft_long[i] = ttft_long[i].min(t.ttft_s());
                }
            }
        }
        let ctx = (args.prompt_len + args.new / 2) as f64;
        let bandwidth = self.limits.read_bytes_per_s;
        let compute = self.limits.peak_for(dtype);
        let mut single = serde_json::Map::new();
        let mut aggregate = serde_json::Map::new();
        for (i, m) in modes.iter().enumerate() {
            let bytes = cost::bytes_per_token(self.shape, m.work, dtype, ctx);
            let flops = cost::flops_per_token(self.shape, m.work, ctx);
            let pct_bw = 100.0 * decode[i] * bytes / bandwidth;
            eprintln!(
                "  {:>15}: {:7.1} tok/s decode ({pct_bw:.0} % of the bandwidth bound), TTFT {:.1} ms, 512-token prompt {:.1} ms",
                m.name,
                decode[i],
                ttft[i] * 1e3,
                ttft_long[i] * 1e3
            );
            single.insert(
                m.name.clone(),
                json!({"decode_tok_s": decode[i], "ttft_ms": ttft[i] * 1e3,
                    "ttft_512_ms": ttft_long[i] * 1e3, "bytes_per_token": bytes,
                    "pct_bandwidth_bound": pct_bw}),
            );
            let mut levels = serde_json::Map::new();
            for &c in &args.concurrency {
                let prompts: Vec<Vec<u32>> = (0..c).map(|_| next_prompt(args.prompt_len)).collect();
                let start = Instant::now();
                concurrently(c, |j| run(&prompts[j], args.new, m));
                let tps = (c * args.new) as f64 / start.elapsed().as_secs_f64();
                let pct = compute.map(|peak| 100.0 * tps * flops / peak);
                eprintln!(
                    "  {:>15} x{c:<2}: {tps:7.1} tok/s aggregate ({} of the compute bound)",
                    m.name,
                    pct.map_or("-".into(), |p| format!("{p:.1} %"))
                );
                levels.insert(
                    c.to_string(),
                    json!({"tok_s": tps, "flops_per_token": flops, "pct_compute_bound": pct}),
                );
            }
            aggregate.insert(m.name.clone(), Value::Object(levels));
        }
        json!({"dtype": dtype, "single_stream": single, "aggregate": aggregate})
    }

    /// The lm-eval loglikelihood workload: `scoring_prompts` requests of `scoring_len`
    /// token ids with `echo`, `logprobs: 1`, `max_tokens: 1`, 4 at a time, per mode: prompt
    /// tokens scored per second, and as a share of the compute bound.
    pub fn scoring(&self, server: &Server, dtype: &str, modes: &[BenchMode]) -> Value {
        let (n, len) = (self.args.scoring_prompts, self.args.scoring_len);
        let prompts = scoring_prompts(n, len);
        let mut out = serde_json::Map::new();
        // scoring reads logprobs only: a sampled mode scores as its greedy twin
        for m in modes.iter().filter(|m| !m.sampled) {
            let body = |p: &[u32]| {
                format!(
                    r#"{{"model":"bench","prompt":{},"max_tokens":1,"echo":true,"logprobs":1,"temperature":0,"stream":true,"multi_exit":{}}}"#,
                    serde_json::to_string(p).unwrap(),
                    m.json
                )
            };
            let url = server.completions();
            client::stream_completion(&url, &body(&prompts[0])).expect("warm-up");
            let start = Instant::now();
            concurrently(4, |j| {
                for p in prompts.iter().skip(j).step_by(4) {
                    client::stream_completion(&url, &body(p)).expect("scoring");
                }
            });
            let tps = (n * len) as f64 / start.elapsed().as_secs_f64();
            let flops = cost::flops_per_token(self.shape, m.work, len as f64 / 2.0);
            let pct = self.limits.peak_for(dtype).map(|p| 100.0 * tps * flops / p);
            eprintln!(
                "  {:>15} scoring: {tps:7.1} prompt tok/s ({} of the compute bound)",
                m.name,
                pct.map_or("-".into(), |p| format!("{p:.1} %"))
            );
            out.insert(
                m.name.clone(),
                json!({"prompt_tok_s": tps, "pct_compute_bound": pct}),
            );
        }
        Value::Object(out)
    }
}

/// The scoring workload's prompts (the same for exitserve and the reference).
pub fn scoring_prompts(n: usize, len: usize) -> Vec<Vec<u32>> {
    (0..n).map(|i| prompt_ids(len, 10_000 + i as u64)).collect()
}
