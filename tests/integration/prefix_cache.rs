//! Prefix caching through the real server: what a cached prefix gives back (generated tokens,
//! echo logprobs with their alternatives) equals what computing it gives, on both
//! architectures, in every mode, with chunked prefill, speculation, the batched attention
//! path and bfloat16; reuse across requests, within one step and across modes; eviction under
//! a full budget; `cache_salt`; `usage.prompt_tokens_details.cached_tokens`.

use crate::common;

use common::client::{get, post};
use common::server::TestServer;
use common::{Fixture, ARCHS, NEO};
use serde_json::{json, Value};

/// A 50-token context (three whole cache blocks and a bit) and continuations of a few tokens:
/// the shape of a multiple-choice question.
fn context(seed: u32) -> Vec<u32> {
    (0..50).map(|i| 100 + (i * 37 + seed * 11) % 900).collect()
}

fn with(ctx: &[u32], tail: &[u32]) -> Vec<u32> {
    ctx.iter().chain(tail).copied().collect()
}

/// The modes compared, as `multi_exit` objects, for a model whose lowest exit is `low`.
fn modes(low: u64) -> Vec<Value> {
    vec![
        json!({"mode": "original"}),
        json!({"mode": "exit", "layer": low}),
        json!({"mode": "contrast", "upper": "original", "lower": low}),
        json!({"mode": "dola", "layers": "low", "premature": "lm_head"}),
        json!({"mode": "sled", "premature": "lm_head"}),
        json!({"mode": "early_exit", "threshold": 0.5}),
    ]
}

async fn lowest_exit(server: &TestServer) -> u64 {
    let (_, models) = get(&server.url("/v1/models")).await;
    models["data"][0]["exit_layers"][0].as_u64().unwrap()
}

async fn complete(server: &TestServer, body: &Value) -> Value {
    let (status, out) = post(&server.url("/v1/completions"), body).await;
    assert_eq!(status, 200, "{body} -> {out}");
    out
}

fn cached(out: &Value) -> u64 {
    out["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cached_tokens in {out}"))
}

/// Asserts two responses' choices agree: text, token ids, and every logprob (echoed prompt
/// and generated) with its alternatives within 1e-5.
fn assert_same(a: &Value, b: &Value, what: &str) {
    assert_close(a, b, what, 1e-5)
}

/// `assert_same` within `tol`.
fn assert_close(a: &Value, b: &Value, what: &str, tol: f64) {
    let (ca, cb) = (&a["choices"], &b["choices"]);
    assert_eq!(
        ca.as_array().unwrap().len(),
        cb.as_array().unwrap().len(),
        "{what}"
    );
    for (x, y) in ca.as_array().unwrap().iter().zip(cb.as_array().unwrap()) {
        assert_eq!(x["text"], y["text"], "{what}");
        assert_eq!(x["token_ids"], y["token_ids"], "{what}");
        let (lx, ly) = (&x["logprobs"], &y["logprobs"]);
        if lx.is_null() {
            assert!(ly.is_null(), "{what}");
            continue;
        }
        assert_eq!(lx["tokens"], ly["tokens"], "{what}");
        let close = |p: &Value, q: &Value| match (p.as_f64(), q.as_f64()) {
            (Some(p), Some(q)) => (p - q).abs() <= tol,
            _ => p == q,
        };
        let (tx, ty) = (
            lx["token_logprobs"].as_array().unwrap(),
            ly["token_logprobs"].as_array().unwrap(),
        );
        assert_eq!(tx.len(), ty.len(), "{what}");
        for (i, (p, q)) in tx.iter().zip(ty).enumerate() {
            assert!(close(p, q), "{what}: token_logprobs[{i}] {p} vs {q}");
        }
        for (i, (p, q)) in lx["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(ly["top_logprobs"].as_array().unwrap())
            .enumerate()
        {
            if p.is_null() {
                assert!(q.is_null(), "{what}: top_logprobs[{i}]");
                continue;
            }
            let (p, q) = (p.as_object().unwrap(), q.as_object().unwrap());
            assert_eq!(
                p.keys().collect::<Vec<_>>(),
                q.keys().collect::<Vec<_>>(),
                "{what}: top_logprobs[{i}]"
            );
            for (k, v) in p {
                assert!(close(v, &q[k]), "{what}: top_logprobs[{i}][{k:?}]");
            }
        }
    }
}

/// Scoring (echo, 2 alternatives, 1 token) and generation (8 greedy tokens) bodies.
fn scoring(f: Fixture, prompt: &[u32], multi_exit: &Value) -> Value {
    json!({"model": f.name, "prompt": prompt, "max_tokens": 1, "echo": true, "logprobs": 2,
           "temperature": 0, "return_token_ids": true, "multi_exit": multi_exit})
}

fn generation(f: Fixture, prompt: &[u32], multi_exit: &Value) -> Value {
    json!({"model": f.name, "prompt": prompt, "max_tokens": 8, "logprobs": 2, "temperature": 0,
           "ignore_eos": true, "return_token_ids": true, "multi_exit": multi_exit})
}

/// Every mode on one checkpoint: three questions' choices scored and generated with the cache
/// and without; the second and later choices of a question reuse its context.
async fn compare_every_mode(f: Fixture, flags: &[&str], tol: f64) {
    let flags_off: Vec<&str> = flags.iter().copied().chain(["--no-prefix-cache"]).collect();
    let on = TestServer::start_model(&f.dir(), flags);
    let off = TestServer::start_model(&f.dir(), &flags_off);
    let low = lowest_exit(&on).await;
    for (m, mode) in modes(low).iter().enumerate() {
        let ctx = context(m as u32);
        let what = |kind: &str, i: usize| format!("{} {flags:?} {mode} {kind} choice {i}", f.name);
        for (i, tail) in [[7u32, 8, 9], [7, 8, 10], [11, 12, 13]].iter().enumerate() {
            let body = scoring(f, &with(&ctx, tail), mode);
            let (a, b) = (complete(&on, &body).await, complete(&off, &body).await);
            assert_close(&a, &b, &what("scoring", i), tol);
            assert_eq!(cached(&b), 0, "no cache, nothing cached");
            if i > 0 {
                assert!(cached(&a) >= 47, "{}: {a}", what("scoring", i));
            }
            let body = generation(f, &with(&ctx, tail), mode);
            let (a, b) = (complete(&on, &body).await, complete(&off, &body).await);
            assert_close(&a, &b, &what("generation", i), tol);
            // scoring made the context's blocks; generation reuses them, not computed again
            assert!(cached(&a) >= 48, "{}: {a}", what("generation", i));
        }
    }
    assert_eq!(off.metric("exitserve_prefix_cache_hit_tokens_total"), 0.0);
    assert!(on.metric("exitserve_prefix_cache_hit_tokens_total") > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_prefixes_give_what_computing_them_gives_in_every_mode() {
    // The CPU's kernels give a row the same numbers whatever else the step computes.
    for f in ARCHS {
        compare_every_mode(f, &[], 1e-5).await;
    }
    // prefill in chunks that end inside the cached blocks and after them
    compare_every_mode(NEO, &["--max-prefill-tokens", "20"], 1e-5).await;
    compare_every_mode(NEO, &["--dtype", "bf16"], 1e-5).await;
    // The batched attention path (a GPU's) multiplies a step's queries as one matrix, whose
    // sums round by its shape: a prompt computed in one piece or after a cached prefix agrees
    // to its parity tolerance.
    compare_every_mode(NEO, &["--attention", "batched"], 1e-4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_within_one_step_across_modes_with_speculation_and_salts() {
    let f = NEO;
    let on = TestServer::start_model(&f.dir(), &[]);
    let off = TestServer::start_model(&f.dir(), &["--no-prefix-cache"]);
    let low = lowest_exit(&on).await;

    // The four choices of a question in one request: the first computes the context, the
    // others wait for its blocks (47 positions each: a scoring request recomputes the last).
    let ctx = context(40);
    let choices: Vec<Vec<u32>> = (0..4).map(|c| with(&ctx, &[20 + c, 30, 40])).collect();
    let body = json!({"model": f.name, "prompt": choices, "max_tokens": 1, "echo": true,
                      "logprobs": 1, "temperature": 0});
    let (a, b) = (complete(&on, &body).await, complete(&off, &body).await);
    assert_same(&a, &b, "four choices in one request");
    assert_eq!(cached(&a), 3 * 47, "{a}");

    // The same as four requests sent at once.
    let ctx = context(41);
    let bodies: Vec<Value> = (0..4)
        .map(|c| {
            json!({"model": f.name, "prompt": with(&ctx, &[20 + c, 30, 40]), "max_tokens": 1,
                   "echo": true, "logprobs": 1, "temperature": 0})
        })
        .collect();
    let outs = futures_util::future::join_all(bodies.iter().map(|b| complete(&on, b))).await;
    let hits: Vec<u64> = outs.iter().map(cached).collect();
    assert_eq!(hits.iter().filter(|&&h| h == 47).count(), 3, "{hits:?}");
    for (out, body) in outs.iter().zip(&bodies) {
        assert_same(out, &complete(&off, body).await, "four requests at once");
    }

    // n copies share one prefill (forks), and best_of with them.
    let body = json!({"model": f.name, "prompt": with(&ctx, &[1, 2]), "max_tokens": 3, "n": 3,
                      "temperature": 0.8, "seed": 5});
    assert_eq!(cached(&complete(&on, &body).await), 48);

    // Across modes: keys and values of a full-depth prompt serve an exit request; an exit's
    // (shallower) do not serve the original head, which computes the prompt and deepens
    // the blocks.
    let exit = json!({"mode": "exit", "layer": low});
    let original = json!({"mode": "original"});
    let ctx = context(42);
    let p = with(&ctx, &[5]);
    assert_eq!(
        cached(&complete(&on, &generation(f, &p, &original)).await),
        0
    );
    assert_eq!(cached(&complete(&on, &generation(f, &p, &exit)).await), 48);
    let ctx = context(43);
    let p = with(&ctx, &[5]);
    assert_eq!(cached(&complete(&on, &generation(f, &p, &exit)).await), 0);
    let out = complete(&on, &generation(f, &p, &original)).await;
    assert_eq!(
        cached(&out),
        0,
        "shallower blocks do not serve a deeper mode"
    );
    assert_same(
        &out,
        &complete(&off, &generation(f, &p, &original)).await,
        "deepened",
    );
    assert_eq!(
        cached(&complete(&on, &generation(f, &p, &original)).await),
        48
    );
    assert_eq!(cached(&complete(&on, &generation(f, &p, &exit)).await), 48);
    // Echo scores are kept per mode: a prompt scored in one mode is not scored for another.
    let ctx = context(44);
    let p = with(&ctx, &[5]);
    complete(&on, &scoring(f, &p, &original)).await;
    assert_eq!(cached(&complete(&on, &scoring(f, &p, &original)).await), 47);
    let out = complete(&on, &scoring(f, &p, &exit)).await;
    assert_eq!(cached(&out), 0, "another mode's scores are not reused");
    assert_same(
        &out,
        &complete(&off, &scoring(f, &p, &exit)).await,
        "exit scores",
    );

    // Speculation starts from a cached prefix like any request.
    let spec = json!({"model": f.name, "prompt": with(&ctx, &[6]), "max_tokens": 12,
                      "temperature": 0, "ignore_eos": true, "return_token_ids": true,
                      "speculative": {"draft_layer": low}});
    let (a, b) = (complete(&on, &spec).await, complete(&off, &spec).await);
    assert_eq!(cached(&a), 48);
    assert_same(&a, &b, "speculative");

    // cache_salt: only requests with the same salt share.
    let ctx = context(45);
    let salted = |salt: Option<&str>| {
        let mut b = generation(f, &with(&ctx, &[9]), &original);
        if let Some(s) = salt {
            b["cache_salt"] = json!(s);
        }
        b
    };
    assert_eq!(cached(&complete(&on, &salted(Some("tenant-a"))).await), 0);
    assert_eq!(cached(&complete(&on, &salted(Some("tenant-b"))).await), 0);
    assert_eq!(cached(&complete(&on, &salted(None)).await), 0);
    assert_eq!(cached(&complete(&on, &salted(Some("tenant-a"))).await), 48);
    assert_eq!(cached(&complete(&on, &salted(None)).await), 48);

    // The usage field is on every response: streamed (with include_usage) too.
    let stream = json!({"model": f.name, "prompt": with(&ctx, &[9]), "max_tokens": 2,
                        "stream": true, "stream_options": {"include_usage": true}});
    let (status, _, chunks) =
        common::client::post_stream(&on.url("/v1/completions"), &stream).await;
    assert_eq!(status, 200);
    let last = chunks.iter().rev().find(|c| !c["usage"].is_null()).unwrap();
    assert_eq!(cached(last), 48);
    let inspect = json!({"model": f.name, "prompt": with(&ctx, &[9]), "positions": "last"});
    let (status, _) = post(&on.url("/v1/inspect"), &inspect).await;
    assert_eq!(status, 200);
    let inspect_all = json!({"model": f.name, "prompt": with(&ctx, &[9]), "positions": "all"});
    let (status, a) = post(&on.url("/v1/inspect"), &inspect_all).await;
    assert_eq!(status, 200);
    let (_, b) = post(&off.url("/v1/inspect"), &inspect_all).await;
    assert_eq!(
        a["positions"], b["positions"],
        "inspection of every position"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_gives_way_and_its_cap_holds() {
    let f = NEO;
    // 400 KV positions: a prompt of 50 + 8 reserves 58; the cache fills the rest.
    let server = TestServer::start_model(
        &f.dir(),
        &["--max-batch-total-tokens", "400", "--max-batch-size", "8"],
    );
    for seed in 0..12 {
        let out = complete(
            &server,
            &generation(f, &context(100 + seed), &json!({"mode": "original"})),
        )
        .await;
        assert_eq!(out["choices"][0]["finish_reason"], "length");
        let held = server.metric("exitserve_prefix_cache_tokens");
        let reserved = server.metric("exitserve_kv_tokens_reserved");
        assert!(held + reserved <= 400.0, "{held} + {reserved}");
    }
    assert!(
        server.metric("exitserve_prefix_cache_tokens") >= 300.0,
        "the cache filled"
    );
    // A request that needs nearly the whole budget evicts the cache instead of waiting.
    let long: Vec<u32> = (0..200).map(|i| 50 + i).collect();
    let body = json!({"model": f.name, "prompt": long, "max_tokens": 50, "ignore_eos": true});
    let out = complete(&server, &body).await;
    assert_eq!(out["usage"]["completion_tokens"], 50);
    assert!(server.metric("exitserve_prefix_cache_tokens") <= 150.0);
    // Concurrent distinct prompts under pressure: all served.
    let bodies: Vec<Value> = (0..16)
        .map(|s| generation(f, &context(200 + s), &json!({"mode": "original"})))
        .collect();
    for out in futures_util::future::join_all(bodies.iter().map(|b| complete(&server, b))).await {
        assert_eq!(out["usage"]["completion_tokens"], 8);
    }
    server
        .wait_for_metric("exitserve_kv_tokens_reserved", 0.0)
        .await;

    // --prefix-cache-max-tokens caps it.
    let capped = TestServer::start_model(&f.dir(), &["--prefix-cache-max-tokens", "64"]);
    for seed in 0..4 {
        complete(
            &capped,
            &generation(f, &context(300 + seed), &json!({"mode": "original"})),
        )
        .await;
        assert!(capped.metric("exitserve_prefix_cache_tokens") <= 64.0);
    }
    // the latest prompt is the one kept
    let out = complete(
        &capped,
        &generation(f, &context(303), &json!({"mode": "original"})),
    )
    .await;
    assert_eq!(cached(&out), 48);
}
