//! Confidence-based early exit through the real server, on both architectures: its invariants
//! (threshold 1 is the original mode token for token, 0 the lowest exit, and a token's exit
//! layer never falls as the threshold rises), the same text alone, in one batch with other
//! modes and on the batched-attention path (the keys and values propagated above an exit are
//! written by both), `usage.early_exit` and its metric, and what it refuses.

use std::collections::BTreeMap;

use crate::common;

use common::client::{get, post};
use common::server::TestServer;
use common::{ids, Fixture, ARCHS};
use serde_json::{json, Value};

const PROMPTS: [&str; 3] = [
    "The capital of France is",
    "In 1969, the first person to walk on the moon was",
    "def fibonacci(n):",
];

/// Thresholds from "always the lowest exit" to "never an exit" (the tiny fixtures' random
/// heads are nearly flat: their margins are around 1e-4).
const GRID: [f64; 13] = [
    0.0, 1e-5, 3e-5, 1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 3e-3, 1e-2, 0.1, 0.5, 1.0,
];

fn body(f: Fixture, prompt: &str, max_tokens: usize, multi_exit: Value) -> Value {
    json!({"model": f.name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
           "ignore_eos": true, "return_token_ids": true, "multi_exit": multi_exit})
}

fn early(threshold: f64) -> Value {
    json!({"mode": "early_exit", "threshold": threshold})
}

async fn complete(url: &str, body: &Value) -> Value {
    let (status, out) = post(url, body).await;
    assert_eq!(status, 200, "{body} -> {out}");
    out
}

fn by_layer(out: &Value) -> BTreeMap<String, u64> {
    out["usage"]["early_exit"]["tokens_by_layer"]
        .as_object()
        .unwrap_or_else(|| panic!("no usage.early_exit in {out}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect()
}

/// The model's exits below the top and its number of layers, from `/v1/models`.
async fn exits(server: &TestServer) -> (Vec<u64>, u64) {
    let (_, models) = get(&server.url("/v1/models")).await;
    let card = &models["data"][0];
    let n = card["num_layers"].as_u64().unwrap();
    let exits = card["exit_layers"].as_array().unwrap();
    (
        exits
            .iter()
            .map(|e| e.as_u64().unwrap())
            .filter(|&e| e < n)
            .collect(),
        n,
    )
}

/// A threshold at which `prompt`'s first 16 tokens leave at more than one layer.
async fn mixed_threshold(url: &str, f: Fixture, prompt: &str) -> f64 {
    for t in GRID {
        let out = complete(url, &body(f, prompt, 16, early(t))).await;
        if by_layer(&out).len() >= 2 {
            return t;
        }
    }
    panic!("{}: no threshold mixes layers on {prompt:?}", f.name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_exit_invariants_batching_and_usage() {
    for f in ARCHS {
        let server = TestServer::start_model(&f.dir(), &["--max-batch-size", "64"]);
        let url = server.url("/v1/completions");
        let (exits, n) = exits(&server).await;
        let lowest = exits[0];
        for prompt in PROMPTS {
            let original = complete(&url, &body(f, prompt, 12, json!({"mode": "original"}))).await;
            let low = complete(
                &url,
                &body(f, prompt, 12, json!({"mode": "exit", "layer": lowest})),
            )
            .await;
            let evals = || server.metric("exitserve_block_evaluations_total");
            let before = evals();
            let never = complete(&url, &body(f, prompt, 12, early(1.0))).await;
            let full = evals() - before;
            assert_eq!(
                ids(&never["choices"][0]["token_ids"]),
                ids(&original["choices"][0]["token_ids"]),
                "{} {prompt:?}: threshold 1",
                f.name
            );
            assert_eq!(
                by_layer(&never),
                BTreeMap::from([("original".to_string(), 12)])
            );
            assert_eq!(never["choices"][0]["exit_layers"], json!(vec![n; 12]));
            let before = evals();
            let always = complete(&url, &body(f, prompt, 12, early(0.0))).await;
            // the blocks above the lowest exit never ran for the generated positions
            let skipped = full - (evals() - before);
            assert_eq!(skipped, (11 * (n - lowest)) as f64, "{} {prompt:?}", f.name);
            assert_eq!(
                ids(&always["choices"][0]["token_ids"]),
                ids(&low["choices"][0]["token_ids"]),
                "{} {prompt:?}: threshold 0",
                f.name
            );
            assert_eq!(
                by_layer(&always),
                BTreeMap::from([(lowest.to_string(), 12)])
            );
            assert_eq!(always["choices"][0]["exit_layers"], json!(vec![lowest; 12]));
            assert_eq!(
                always["multi_exit"],
                json!({"mode": "early_exit", "name": "early_exit:0", "threshold": 0.0, "measure": "softmax_margin", "layers": exits})
            );
            // the first token's layer never falls as the threshold rises
            let mut previous = 0;
            for t in GRID {
                let out = complete(&url, &body(f, prompt, 1, early(t))).await;
                let layers = by_layer(&out);
                assert_eq!(layers.values().sum::<u64>(), 1, "{out}");
                let layer = layers.keys().next().unwrap();
                let rank = layer.parse::<u64>().unwrap_or(n + 1);
                assert!(
                    rank >= previous,
                    "{} {prompt:?}: threshold {t} left at {layer}, below {previous}",
                    f.name
                );
                previous = rank;
            }
        }

        // A threshold that mixes layers: each prompt alone, then all of them at once with
        // other modes in the batch, then two choices at once (usage sums over both).
        let t = mixed_threshold(&url, f, PROMPTS[0]).await;
        let mut alone = Vec::new();
        for prompt in PROMPTS {
            alone.push(complete(&url, &body(f, prompt, 16, early(t))).await);
        }
        let mut bodies: Vec<Value> = PROMPTS.iter().map(|p| body(f, p, 16, early(t))).collect();
        for p in PROMPTS {
            bodies.push(body(f, p, 16, json!({"mode": "original"})));
            bodies.push(body(f, p, 16, json!({"mode": "exit", "layer": lowest})));
        }
        let tasks: Vec<_> = bodies
            .into_iter()
            .map(|b| {
                let url = url.clone();
                tokio::spawn(async move { complete(&url, &b).await })
            })
            .collect();
        let mut together = Vec::new();
        for task in tasks {
            together.push(task.await.unwrap());
        }
        // streamed: the same tokens and layers, chunk by chunk
        let mut stream = body(f, PROMPTS[0], 16, early(t));
        stream["stream"] = json!(true);
        let (status, _, events) = common::client::post_stream(&url, &stream).await;
        assert_eq!(status, 200);
        let streamed: Vec<Value> = events
            .iter()
            .filter_map(|e| e["choices"][0]["exit_layers"].as_array().cloned())
            .flatten()
            .collect();
        assert_eq!(json!(streamed), alone[0]["choices"][0]["exit_layers"]);
        let layers = alone[0]["choices"][0]["exit_layers"].as_array().unwrap();
        assert_eq!(layers.len(), 16);
        assert!(layers.iter().any(|l| l != &layers[0]), "{t} mixes layers");
        for (a, b) in alone.iter().zip(&together) {
            assert_eq!(
                a["choices"], b["choices"],
                "{}: alone vs batched at {t}",
                f.name
            );
            assert_eq!(by_layer(a), by_layer(b));
        }
        let mut two = body(f, PROMPTS[1], 10, early(t));
        two["n"] = json!(2);
        two["temperature"] = json!(0.8);
        two["seed"] = json!(3);
        let out = complete(&url, &two).await;
        assert_eq!(
            by_layer(&out).values().sum::<u64>(),
            out["usage"]["completion_tokens"].as_u64().unwrap(),
            "{out}"
        );
        let counted = server.metric_sum("exitserve_early_exit_tokens_total");
        assert!(counted > 0.0, "the metric counts the tokens: {counted}");

        // by model id
        let mut by_id = body(f, PROMPTS[0], 4, json!(null));
        by_id.as_object_mut().unwrap().remove("multi_exit");
        by_id["model"] = json!(format!("{}:early-exit-1", f.name));
        let out = complete(&url, &by_id).await;
        assert_eq!(
            by_layer(&out),
            BTreeMap::from([("original".to_string(), 4)])
        );
    }
}

/// The keys and values an exited position leaves for the blocks above are written by the CPU
/// attention kernels' caches and by the paged pool of the batched path alike, and the batched
/// path's exits decided on margins computed where the logits are (copying only the head left
/// at, or only its argmax) are the host's: the same text and the same exits, token for token,
/// alone and all at once, with and without logprobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_exit_is_the_same_on_the_batched_attention_path() {
    for f in ARCHS {
        let cpu = TestServer::start_model(&f.dir(), &[]);
        let batched = TestServer::start_model(&f.dir(), &["--attention", "batched"]);
        let (cpu_url, batched_url) = (cpu.url("/v1/completions"), batched.url("/v1/completions"));
        let t = mixed_threshold(&cpu_url, f, PROMPTS[0]).await;
        let mut bodies = Vec::new();
        for prompt in PROMPTS {
            let mut b = body(f, prompt, 16, early(t));
            bodies.push(b.clone());
            b["logprobs"] = json!(2);
            bodies.push(b);
        }
        let mut want = Vec::new();
        for b in &bodies {
            let x = complete(&cpu_url, b).await;
            let y = complete(&batched_url, b).await;
            let tokens = ids(&x["choices"][0]["token_ids"]);
            assert_eq!(tokens, ids(&y["choices"][0]["token_ids"]), "{} {b}", f.name);
            assert_eq!(by_layer(&x), by_layer(&y));
            want.push((tokens, by_layer(&x)));
        }
        let together =
            futures_util::future::join_all(bodies.iter().map(|b| complete(&batched_url, b))).await;
        for ((y, b), (tokens, layers)) in together.iter().zip(&bodies).zip(&want) {
            assert_eq!(
                &ids(&y["choices"][0]["token_ids"]),
                tokens,
                "{} {b}",
                f.name
            );
            assert_eq!(&by_layer(y), layers);
        }
    }
}
