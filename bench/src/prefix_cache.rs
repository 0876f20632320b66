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

/// The largest difference between two runs' logprobs of the same prompts.
fn max_difference(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    let mut max = 0f64;
    for (a, b) in a.iter().zip(b) {
        for (x, y) in a.iter().zip(b) {
            if x.is_finite() && y.is_finite() {
                max = max.max((x - y).abs());
            }
        }
    }
    max
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

/// The playground's Run: the three modes on one prompt at once (as the page sends them), or
/// one after another; each column's TTFT.
fn playground(server: &Server, shape: &Shape, prompt: &[u32], at_once: bool) -> Vec<f64> {
    let url = server.completions();
    let modes: Vec<_> = modes(shape).into_iter().filter(|m| !m.sampled).collect();
    let column = |i: usize| {
        let body = crate::workloads::body(prompt, 2, Some(&modes[i].json), false);
        client::stream_completion(&url, &body)
            .expect("column")
            .ttft_s()
    };
    if at_once {
        concurrently(modes.len(), column)
    } else {
        (0..modes.len()).map(column).collect()
    }
}

/// The better of two runs of the bench's loads, figure by figure (rates: the larger; times:
/// the smaller), so that alternating runs of two servers compare their best.
fn best_of(a: &Value, b: &Value) -> Value {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => Value::Object(
            x.iter()
                .map(|(k, v)| {
                    let w = match (v, y.get(k)) {
                        (Value::Number(p), Some(Value::Number(q))) => {
                            let (p, q) = (p.as_f64().unwrap_or(0.0), q.as_f64().unwrap_or(0.0));
                            let smaller = k.ends_with("_ms");
                            json!(if smaller == (p < q) { p } else { q })
                        }
                        (_, Some(other)) => best_of(v, other),
                        _ => v.clone(),
                    };
                    (k.clone(), w)
                })
                .collect(),
        ),
        _ => a.clone(),
    }
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
        let mut first_off = Vec::new();
        let mut columns = [[f64::INFINITY; 3]; 2];
        let mut sequential = [[f64::INFINITY; 3]; 2];
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
                for (col, t) in playground(server, shape, &prompt, true)
                    .into_iter()
                    .enumerate()
                {
                    columns[s][col] = columns[s][col].min(t);
                }
                let prompt = prompt_ids(512, 80_000 + (2 * round + s) as u64);
                for (col, t) in playground(server, shape, &prompt, false)
                    .into_iter()
                    .enumerate()
                {
                    sequential[s][col] = sequential[s][col].min(t);
                }
            }
            max_diff = max_diff.max(max_difference(&logprobs[0], &logprobs[1]));
            if round == 0 {
                first_off = logprobs.swap_remove(0);
            }
        }
        // The server's own noise floor: the first round's prompts again, without the cache.
        let again = multiple_choice(&off, &questions(0)).1;
        let noise = max_difference(&first_off, &again);
        let speedup = best[0] / best[1];
        eprintln!(
            "  multiple choice: {:.2} s off, {:.2} s on: {speedup:.2}x; max |logprob difference| on/off {max_diff:.2e} (off/off, the same prompts again: {noise:.2e}); cached tokens {}",
            best[0], best[1], cached[1]
        );
        let names: Vec<String> = modes(shape).into_iter().map(|m| m.name).collect();
        for (col, name) in names.iter().enumerate() {
            eprintln!(
                "  playground column {name}: TTFT {:.1} ms off, {:.1} ms on (at once); one after another {:.1} ms off, {:.1} ms on",
                columns[0][col] * 1e3,
                columns[1][col] * 1e3,
                sequential[0][col] * 1e3,
                sequential[1][col] * 1e3
            );
        }
        drop((on, off));
        // The bench's own loads (unique prompts: nothing to reuse, so what they show is the
        // cache's cost), the servers alternating twice, each time a fresh one (the loads'
        // prompts repeat from run to run): the better run of each counts.
        let mut loads = [Value::Null, Value::Null];
        for round in 0..2 {
            for (s, flags) in [&["--no-prefix-cache"][..], &[]].into_iter().enumerate() {
                eprintln!(
                    "  the bench's loads, cache {} (round {round}):",
                    ["off", "on"][s]
                );
                let server = Server::exitserve_with(bin, data, dtype, flags).expect("server");
                let server = &server;
                let mut run = bench.serve(server, dtype, original);
                run["scoring"] = bench.scoring(server, dtype, original);
                loads[s] = if round == 0 {
                    run
                } else {
                    best_of(&loads[s], &run)
                };
            }
        }
        let figures = |l: &Value| {
            let m = &original[0].name;
            format!(
                "decode {:.1} tok/s, TTFT {:.1} ms, 512-token prompt {:.1} ms, x16 {:.1} tok/s, scoring {:.1} prompt tok/s",
                l["single_stream"][m]["decode_tok_s"].as_f64().unwrap_or(f64::NAN),
                l["single_stream"][m]["ttft_ms"].as_f64().unwrap_or(f64::NAN),
                l["single_stream"][m]["ttft_512_ms"].as_f64().unwrap_or(f64::NAN),
                l["aggregate"][m]["16"]["tok_s"].as_f64().unwrap_or(f64::NAN),
                l["scoring"][m]["prompt_tok_s"].as_f64().unwrap_or(f64::NAN),
            )
        };
        eprintln!("  best of two, cache off: {}", figures(&loads[0]));
        eprintln!("  best of two, cache on:  {}", figures(&loads[1]));
        runs.push(json!({
            "dtype": dtype,
            "multiple_choice": {
                "contexts": CONTEXTS, "context_len": CONTEXT_LEN, "choices": CHOICES,
                "seconds_off": best[0], "seconds_on": best[1], "speedup": speedup,
                "cached_tokens_on": cached[1], "max_abs_logprob_difference": max_diff,
                "max_abs_logprob_difference_off_twice": noise,
            },
            "playground_ttft_ms": names.iter().enumerate().map(|(col, n)| {
                (n.clone(), json!({"at_once": {"off": columns[0][col] * 1e3, "on": columns[1][col] * 1e3},
                                   "one_after_another": {"off": sequential[0][col] * 1e3, "on": sequential[1][col] * 1e3}}))
            }).collect::<serde_json::Map<_, _>>(),
            "loads": {"off": loads[0], "on": loads[1]},
        }));
    }
    json!({"machine": crate::report::machine(), "arch": format!("{:?}", args.arch), "runs": runs})
}
