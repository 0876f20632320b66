//! `--prefix-cache`: prefix caching on and off (`--no-prefix-cache`) in the same run, the two
//! servers' runs alternating: the multiple-choice scoring load (contexts of 400 token ids, 4
//! continuations of 3-11 tokens each, `echo` + `logprobs: 1` + `max_tokens: 1`, a context's 4
//! choices sent together), the playground's three modes on one 512-token prompt (sent at once,
//! as the page does), and the bench's own loads (single stream, 16 streams, unique-prompt
//! scoring) to show that nothing gets slower.

use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use crate::checkpoint::Shape;
use crate::client;
use crate::limits::Limits;
use crate::servers::Server;
use crate::workloads::{concurrently, modes, prompt_ids, Bench};
use crate::Args;

const CONTEXTS: usize = 12;
const CONTEXT_LEN: usize = 400;
const CHOICES: usize = 4;
/// Alternating rounds per server; the best round counts.
const ROUNDS: usize = 2;

/// The multiple-choice prompts: per context its 4 choices (context + continuation).
fn questions(round: usize) -> Vec<Vec<Vec<u32>>> {
    (0..CONTEXTS)
        .map(|c| {
            let seed = (1_000 * round + c) as u64;
            let ctx = prompt_ids(CONTEXT_LEN, 50_000 + seed);
            (0..CHOICES)
                .map(|k| {
                    let len = 3 + (c * CHOICES + k) % 9; // 3..=11
                    let tail = prompt_ids(len, 60_000 + seed * 8 + k as u64);
                    ctx.iter().chain(&tail).copied().collect()
                })
                .collect()
        })
        .collect()
}

/// The load once: seconds, every prompt's echoed logprobs, and the cached tokens reported.
fn multiple_choice(server: &Server, qs: &[Vec<Vec<u32>>]) -> (f64, Vec<Vec<f64>>, u64) {
    let url = server.completions();
    let start = Instant::now();
    let mut logprobs = Vec::new();
    let mut cached = 0;
    for choices in qs {
        let outs = concurrently(CHOICES, |k| {
            let body = json!({"model": "bench", "prompt": choices[k], "max_tokens": 1,
                              "echo": true, "logprobs": 1, "temperature": 0});
            client::post_json(&url, &body).expect("scoring")
        });
        for out in outs {
            cached += out["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0);
            let lp = out["choices"][0]["logprobs"]["token_logprobs"]
                .as_array()
                .expect("logprobs")
                .iter()
                .map(|v| v.as_f64().unwrap_or(f64::NAN))
                .collect();
            logprobs.push(lp);
        }
    }
    (start.elapsed().as_secs_f64(), logprobs, cached)
}

/// The playground's Run: the three modes on one prompt at once; each column's TTFT.
fn playground(server: &Server, shape: &Shape, prompt: &[u32]) -> Vec<f64> {
    let url = server.completions();
    let modes = modes(shape);
    concurrently(modes.len(), |i| {
        let body = crate::workloads::body(prompt, 2, Some(&modes[i].json));
        client::stream_completion(&url, &body)
            .expect("column")
            .ttft_s()
    })
}

pub fn prefix_cache_bench(args: &Args, shape: &Shape, data: &Path, bin: &Path) -> Value {
    let limits = Limits::measure();
    eprintln!("  {}", limits.summary());
    let bench = Bench {
        args,
        shape,
        limits: &limits,
    };
    let original = &modes(shape)[..1];
    let mut runs = Vec::new();
    for dtype in &args.dtype {
        eprintln!("exitserve {dtype}, prefix cache on and off:");
        let on = Server::exitserve_with(bin, data, dtype, &[]).expect("server");
        let off = Server::exitserve_with(bin, data, dtype, &["--no-prefix-cache"]).expect("server");
        let mut best = [f64::INFINITY; 2];
        let mut cached = [0u64; 2];
        let mut max_diff = 0f64;
        let mut columns = [[f64::INFINITY; 3]; 2];
        for round in 0..ROUNDS {
            let qs = questions(round);
            let mut logprobs = Vec::new();
            for (s, server) in [&off, &on].into_iter().enumerate() {
                let (secs, lp, c) = multiple_choice(server, &qs);
                eprintln!(
                    "  round {round} {}: multiple choice {secs:.2} s, cached tokens {c}",
                    ["off", "on"][s]
                );
                best[s] = best[s].min(secs);
                cached[s] = c;
                logprobs.push(lp);
                let prompt = prompt_ids(512, 70_000 + (2 * round + s) as u64);
                for (col, t) in playground(server, shape, &prompt).into_iter().enumerate() {
                    columns[s][col] = columns[s][col].min(t);
                }
            }
            for (a, b) in logprobs[0].iter().zip(&logprobs[1]) {
                for (x, y) in a.iter().zip(b) {
                    if x.is_finite() && y.is_finite() {
                        max_diff = max_diff.max((x - y).abs());
                    }
                }
            }
        }
        let speedup = best[0] / best[1];
        eprintln!(
            "  multiple choice: {:.2} s off, {:.2} s on: {speedup:.2}x; max |logprob difference| {max_diff:.2e}; cached tokens {}",
            best[0], best[1], cached[1]
        );
        let names: Vec<String> = modes(shape).into_iter().map(|m| m.name).collect();
        for (col, name) in names.iter().enumerate() {
            eprintln!(
                "  playground column {name}: TTFT {:.1} ms off, {:.1} ms on",
                columns[0][col] * 1e3,
                columns[1][col] * 1e3
            );
        }
        let mut loads = Vec::new();
        for (s, server) in [&off, &on].into_iter().enumerate() {
            eprintln!("  the bench's loads, cache {}:", ["off", "on"][s]);
            let mut run = bench.serve(server, dtype, original);
            run["scoring"] = bench.scoring(server, dtype, original);
            loads.push(run);
        }
        runs.push(json!({
            "dtype": dtype,
            "multiple_choice": {
                "contexts": CONTEXTS, "context_len": CONTEXT_LEN, "choices": CHOICES,
                "seconds_off": best[0], "seconds_on": best[1], "speedup": speedup,
                "cached_tokens_on": cached[1], "max_abs_logprob_difference": max_diff,
            },
            "playground_ttft_ms": names.iter().enumerate().map(|(col, n)| {
                (n.clone(), json!({"off": columns[0][col] * 1e3, "on": columns[1][col] * 1e3}))
            }).collect::<serde_json::Map<_, _>>(),
            "loads": {"off": loads[0], "on": loads[1]},
        }));
    }
    json!({"machine": crate::report::machine(), "arch": format!("{:?}", args.arch), "runs": runs})
}
