//! Self-speculative decoding through the real server: greedy output token for token equal to
//! the reference on both architectures, alone and batched with plain requests; seeded
//! sampling that follows the mode's exact distribution (chi-square against the distribution
//! the server reports for the same context); the server default; bad values refused.

use crate::common;

use std::collections::BTreeMap;

use clap::Parser;
use common::client::post;
use common::server::TestServer;
use common::{greedy_body_for, ids, Case, Fixture, ARCHS, MODEL};
use exitserve::config::{Args, Settings};
use exitserve::model::ModelConfig;
use exitserve::server::build_state_with;
use serde_json::{json, Value};

/// The fixture's configuration, through the server's own reader.
fn config(f: Fixture) -> ModelConfig {
    ModelConfig::from_file(&f.dir().join("config.json")).unwrap()
}

/// The layer the mode decodes from.
fn depth(f: Fixture, mode: &str) -> u32 {
    let top = config(f).num_layers as u32;
    match mode.split_once(':') {
        None => top,
        Some((_, layers)) => layers
            .split(',')
            .map(|l| {
                if l == "original" {
                    top
                } else {
                    l.parse().unwrap()
                }
            })
            .max()
            .unwrap(),
    }
}

/// The lowest exit: the draft layer these tests use.
fn lowest_exit(f: Fixture) -> u32 {
    config(f).exit_layers[0] as u32
}

/// The case's greedy request, drafting from the lowest exit (None: the mode decodes at it).
fn speculative_body(f: Fixture, case: &Case, k: u32) -> Option<Value> {
    let draft = lowest_exit(f);
    if draft >= depth(f, &case.mode) {
        return None;
    }
    let mut body = greedy_body_for(f.name, case);
    body["speculative"] = json!({"draft_layer": draft, "max_draft_tokens": k, "adaptive": false});
    Some(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_speculation_is_token_for_token_the_plain_decoding_alone_and_batched() {
    // Drafts reading int8 copies of the draft layers (the default) and the model's own.
    for (f, draft_weights) in ARCHS.into_iter().flat_map(|f| [(f, "int8"), (f, "model")]) {
        let server = TestServer::start_model(
            &f.dir(),
            &[
                "--max-batch-size",
                "128",
                "--speculative-max-batch-size",
                "128",
                "--speculative-draft-weights",
                draft_weights,
            ],
        );
        let url = server.url("/v1/completions");
        let cases = f.reference().cases;
        let mut checked = 0;
        // alone, with draft lengths of 1 and 4 in turn (every case drafts 4 at once below)
        for (i, case) in cases.iter().enumerate() {
            let k = [1, 4][i % 2];
            let Some(body) = speculative_body(f, case, k) else {
                continue;
            };
            let (status, out) = post(&url, &body).await;
            assert_eq!(status, 200, "{out}");
            assert_eq!(
                ids(&out["choices"][0]["token_ids"]),
                case.greedy_ids,
                "{} {draft_weights} {} k={k} {:?}",
                f.name,
                case.mode,
                case.prompt
            );
            let usage = &out["usage"]["speculative"];
            assert!(
                usage["accepted"].as_u64() <= usage["drafted"].as_u64(),
                "{usage}"
            );
            checked += 1;
        }
        assert!(checked >= 36, "{} {checked}", f.name);
        // batched: every case speculative and plain at once
        let tasks: Vec<_> = cases
            .iter()
            .flat_map(|c| [speculative_body(f, c, 4), Some(greedy_body_for(f.name, c))])
            .flatten()
            .map(|body| {
                let url = url.clone();
                tokio::spawn(async move { (post(&url, &body).await, body) })
            })
            .collect();
        for t in tasks {
            let ((status, out), body) = t.await.unwrap();
            assert_eq!(status, 200, "{out}");
            let case = cases
                .iter()
                .find(|c| {
                    common::multi_exit(&c.mode) == body["multi_exit"]
                        && json!(c.prompt) == body["prompt"]
                })
                .unwrap();
            assert_eq!(
                ids(&out["choices"][0]["token_ids"]),
                case.greedy_ids,
                "batched {} {draft_weights} {}",
                f.name,
                case.mode
            );
        }
        // Random exits never agree with the top of these tiny models: every draft is
        // rejected here (the test below makes them agree).
        assert!(server.metric("exitserve_speculative_drafted_tokens_total") > 0.0);
    }
}

/// Token ids every test below biases towards, so that the draft exit and the mode agree
/// often but not always (random exits alone never agree with the top): both verdicts, and
/// the rollback after a rejection, are exercised.
const FAVOURED: [u32; 3] = [464, 262, 290];

fn favoured_bias() -> Value {
    json!(FAVOURED
        .iter()
        .map(|t| (t.to_string(), json!(100)))
        .collect::<serde_json::Map<_, _>>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_speculation_with_accepted_drafts_equals_plain_decoding() {
    for f in ARCHS {
        let server = TestServer::start_model(
            &f.dir(),
            &[
                "--max-batch-size",
                "64",
                "--speculative-max-batch-size",
                "64",
            ],
        );
        let url = server.url("/v1/completions");
        let draft = lowest_exit(f);
        let mut tasks = Vec::new();
        for case in f
            .reference()
            .cases
            .iter()
            .filter(|c| depth(f, &c.mode) > draft)
        {
            for k in [2, 5] {
                let plain = json!({"model": f.name, "prompt": case.prompt, "max_tokens": 24,
                    "temperature": 0, "return_token_ids": true, "logit_bias": favoured_bias(),
                    "multi_exit": common::multi_exit(&case.mode), "logprobs": 2});
                let mut spec = plain.clone();
                spec["speculative"] =
                    json!({"draft_layer": draft, "max_draft_tokens": k, "adaptive": false});
                let url = url.clone();
                tasks.push(tokio::spawn(async move {
                    let (a, b) = tokio::join!(post(&url, &plain), post(&url, &spec));
                    (a, b, plain)
                }));
            }
        }
        let mut usage = (0.0, 0.0);
        for t in tasks {
            let ((s1, plain), (s2, spec), body) = t.await.unwrap();
            assert_eq!((s1, s2), (200, 200), "{plain} {spec}");
            let u = &spec["usage"]["speculative"];
            usage.0 += u["drafted"].as_f64().unwrap();
            usage.1 += u["accepted"].as_f64().unwrap();
            assert_eq!(
                spec["choices"][0]["token_ids"], plain["choices"][0]["token_ids"],
                "{body}"
            );
            assert_eq!(
                spec["choices"][0]["text"], plain["choices"][0]["text"],
                "{body}"
            );
            // The logprobs are the mode's, whichever step produced the token. A verifying
            // pass scores several positions in one matrix, a plain step one: the same values
            // to float rounding.
            let lp = |v: &Value| -> Vec<f64> {
                v["choices"][0]["logprobs"]["token_logprobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            };
            let (a, b) = (lp(&spec), lp(&plain));
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-4, "{x} vs {y}: {body}");
            }
        }
        let drafted = server.metric("exitserve_speculative_drafted_tokens_total");
        let accepted = server.metric("exitserve_speculative_accepted_tokens_total");
        assert!(
            accepted > 0.0 && accepted < drafted,
            "{}: {accepted}/{drafted}",
            f.name
        );
        // every round is in its request's usage, the last one included
        assert_eq!(usage, (drafted, accepted), "{}", f.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_default_speculates_where_the_mode_allows() {
    let server = TestServer::start(&[
        "--speculative-draft-layer",
        "1",
        "--speculative-max-draft-tokens",
        "3",
    ]);
    let url = server.url("/v1/completions");
    for case in common::reference()
        .cases
        .iter()
        .filter(|c| c.mode == "original" || c.mode == "exit:1")
    {
        let (status, out) = post(&url, &greedy_body_for(MODEL, case)).await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(
            ids(&out["choices"][0]["token_ids"]),
            case.greedy_ids,
            "{}",
            case.mode
        );
        // exit 1 decodes at the draft layer itself: no speculation, no usage entry
        assert_eq!(
            out["usage"]["speculative"].is_object(),
            case.mode == "original",
            "{}",
            case.mode
        );
    }
    // a request may still name its own draft length
    let case = &common::reference().cases[0];
    let mut body = greedy_body_for(MODEL, case);
    body["speculative"] = json!({"max_draft_tokens": 16});
    let (status, out) = post(&url, &body).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(ids(&out["choices"][0]["token_ids"]), case.greedy_ids);
    // or opt out: `false` whatever the server's default (`null` is the default)
    let reference = common::reference();
    let case = reference
        .cases
        .iter()
        .find(|c| c.mode == "original")
        .unwrap();
    let mut body = greedy_body_for(MODEL, case);
    body["speculative"] = json!(false);
    let drafted = server.metric("exitserve_speculative_drafted_tokens_total");
    let (status, out) = post(&url, &body).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(ids(&out["choices"][0]["token_ids"]), case.greedy_ids);
    assert!(out["usage"]["speculative"].is_null(), "{out}");
    assert_eq!(
        server.metric("exitserve_speculative_drafted_tokens_total"),
        drafted
    );
    body["speculative"] = json!(true);
    let (status, out) = post(&url, &body).await;
    assert_eq!(status, 200, "{out}");
    assert!(out["usage"]["speculative"].is_object(), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preset_can_decode_speculatively() {
    let server = TestServer::start(&[
        "--mode-preset",
        "fast=original,draft_layer=1,max_draft_tokens=3,adaptive=false",
        "--mode-preset",
        "acd-fast=contrast:4,2,alpha=0.2,draft_layer=1",
    ]);
    let url = server.url("/v1/completions");
    let (_, card) = common::client::get(&server.url(&format!("/v1/models/{MODEL}:fast"))).await;
    assert_eq!(
        card["speculative"],
        json!({"draft_layer": 1, "max_draft_tokens": 3, "adaptive": false})
    );
    let (_, card) = common::client::get(&server.url(&format!("/v1/models/{MODEL}:acd-fast"))).await;
    assert_eq!(
        card["speculative"],
        json!({"draft_layer": 1, "max_draft_tokens": 4, "adaptive": true})
    );
    assert_eq!(card["multi_exit"]["alpha"], json!(0.2));
    for case in common::reference()
        .cases
        .iter()
        .filter(|c| c.mode == "original")
    {
        let mut body = greedy_body_for(&format!("{MODEL}:fast"), case);
        body.as_object_mut().unwrap().remove("multi_exit");
        let (status, out) = post(&url, &body).await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(ids(&out["choices"][0]["token_ids"]), case.greedy_ids);
        assert!(
            out["usage"]["speculative"]["drafted"].as_u64().unwrap() > 0,
            "{out}"
        );
    }
    // a preset's speculation is checked at start-up like a request's
    let err = start_error(&["--mode-preset", "bad=exit:2,draft_layer=2"]);
    assert!(
        err.contains("--mode-preset `bad`: `speculative.draft_layer` (2) must lie below"),
        "{err}"
    );
}

/// Why the fixture server refuses to start with `flags`.
fn start_error(flags: &[&str]) -> String {
    let dir = common::fixture_dir(common::FIXTURE);
    let mut argv = vec!["exitserve", "--model", dir.to_str().unwrap()];
    argv.extend_from_slice(flags);
    let settings = Settings::resolve(Args::try_parse_from(argv).unwrap()).unwrap();
    let (_trigger, watch) = exitserve::http::shutdown::channel();
    build_state_with(&settings, watch, |_| {})
        .err()
        .expect("refused")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_speculative_values_are_refused_naming_the_field() {
    let server = TestServer::start(&[]);
    let url = server.url("/v1/completions");
    let cases = [
        (
            json!({"draft_layer": 3}),
            "original",
            "speculative.draft_layer",
            "must be one of the exit layers [1, 2, 4], got 3",
        ),
        (
            json!({"draft_layer": -1}),
            "original",
            "speculative.draft_layer",
            "got -1",
        ),
        (
            json!({"draft_layer": 2}),
            "exit:2",
            "speculative.draft_layer",
            "must lie below the layer this mode decodes from (2)",
        ),
        (
            json!({"draft_layer": 4}),
            "contrast:4,1",
            "speculative.draft_layer",
            "must lie below",
        ),
        (json!({}), "exit:1", "speculative.draft_layer", "is needed"),
        (
            json!({"draft_layer": 1, "max_draft_tokens": 0}),
            "original",
            "speculative.max_draft_tokens",
            "must be in [1, 16], got 0",
        ),
        (
            json!({"draft_layer": 1, "max_draft_tokens": 17}),
            "original",
            "speculative.max_draft_tokens",
            "got 17",
        ),
    ];
    for (spec, mode, param, message) in cases {
        let body = json!({"model": MODEL, "prompt": "hi", "max_tokens": 4,
            "multi_exit": common::multi_exit(mode), "speculative": spec});
        let (status, out) = post(&url, &body).await;
        assert_eq!(status, 400, "{spec} {out}");
        assert_eq!(out["error"]["param"], param, "{spec} {out}");
        let text = out["error"]["message"].as_str().unwrap();
        assert!(text.contains(message), "{spec}: {text}");
    }
    let (status, out) = post(
        &url,
        &json!({"model": MODEL, "prompt": "hi", "speculative": {"draft_layer": 1, "draft": 2}}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        out["error"]["message"].as_str().unwrap().contains("draft"),
        "{out}"
    );
    // the server's default is checked at start-up
    let err = start_error(&["--speculative-draft-layer", "3"]);
    assert!(
        err.contains("--speculative-draft-layer 3: not an exit layer"),
        "{err}"
    );
    let argv = ["exitserve", "--speculative-max-draft-tokens", "17"];
    let err = Settings::resolve(Args::try_parse_from(argv).unwrap()).unwrap_err();
    assert_eq!(
        err,
        "--speculative-max-draft-tokens must be in 1..=16, got 17"
    );
}

/// 4096 seeded samples of the second token (the first one that goes through a draft round:
/// drafted by exit 1, verified by the original head), restricted by `logit_bias` and
/// `top_k` to three tokens, grouped by the first token; each group against the exact
/// distribution of the original head over those three tokens in that context (their prompt
/// logprobs, from echo scoring without speculation). Fixed seeds: the verdict cannot flake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_speculative_sampling_follows_the_target_distribution() {
    let server = TestServer::start(&[
        "--max-best-of",
        "64",
        "--max-batch-size",
        "64",
        "--speculative-max-batch-size",
        "64",
    ]);
    let url = server.url("/v1/completions");
    let prompt: Vec<u32> = common::reference().cases[0].prompt_ids.clone();
    let mut pairs: BTreeMap<u32, BTreeMap<u32, u32>> = BTreeMap::new();
    for seed in 0..64 {
        let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 1.0,
            "top_k": 3, "logit_bias": favoured_bias(), "n": 64, "seed": seed,
            "return_token_ids": true,
            "speculative": {"draft_layer": 1, "max_draft_tokens": 2, "adaptive": false}});
        let (status, out) = post(&url, &body).await;
        assert_eq!(status, 200, "{out}");
        for choice in out["choices"].as_array().unwrap() {
            let t = ids(&choice["token_ids"]);
            *pairs.entry(t[0]).or_default().entry(t[1]).or_default() += 1;
        }
    }
    let drafted = server.metric("exitserve_speculative_drafted_tokens_total");
    let accepted = server.metric("exitserve_speculative_accepted_tokens_total");
    assert!(drafted >= 4096.0, "{drafted}");
    assert!(
        accepted > 0.0 && accepted < drafted,
        "both verdicts happen: {accepted}/{drafted}"
    );
    let (mut chi2, mut df) = (0.0, 0);
    for (first, seconds) in &pairs {
        assert!(FAVOURED.contains(first), "{first}");
        let n: u32 = seconds.values().sum();
        // log p of each favoured token after `prompt + first`, from the original head
        let mut logp = Vec::new();
        for t in FAVOURED {
            let mut context = prompt.clone();
            context.extend([*first, t]);
            let (status, out) = post(
                &url,
                &json!({"model": MODEL, "prompt": context, "max_tokens": 0, "echo": true, "logprobs": 0}),
            )
            .await;
            assert_eq!(status, 200, "{out}");
            let lps = out["choices"][0]["logprobs"]["token_logprobs"]
                .as_array()
                .unwrap();
            logp.push(lps.last().unwrap().as_f64().unwrap());
        }
        let z: f64 = logp.iter().map(|l| l.exp()).sum();
        for id in seconds.keys() {
            assert!(
                FAVOURED.contains(id),
                "after {first}: {id} outside the favoured tokens"
            );
        }
        for (t, l) in FAVOURED.iter().zip(&logp) {
            let observed = f64::from(*seconds.get(t).unwrap_or(&0));
            let expected = f64::from(n) * l.exp() / z;
            assert!(
                expected >= 5.0,
                "too few samples after {first}: {seconds:?}"
            );
            chi2 += (observed - expected).powi(2) / expected;
        }
        df += FAVOURED.len() - 1;
    }
    assert!(df >= 4, "{pairs:?}");
    // The 0.1 % critical value of chi-square, for 2 to 6 degrees of freedom.
    let critical = [13.82, 16.27, 18.47, 20.52, 22.46][df - 2];
    assert!(chi2 < critical, "chi2 {chi2:.2} with {df} df: {pairs:?}");
}

/// On the tiny fixtures a draft step that reads the model's own weights reads nearly what a
/// full step reads (the vocabulary head is most of the weights), so the adaptive policy never
/// finds a round worth drafting: the output is the plain one and nothing is drafted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adaptive_policy_declines_drafts_that_cannot_pay() {
    let server = TestServer::start(&["--speculative-draft-weights", "model"]);
    let url = server.url("/v1/completions");
    for case in common::reference()
        .cases
        .iter()
        .filter(|c| c.mode == "original")
    {
        let mut body = greedy_body_for(MODEL, case);
        body["speculative"] = json!({"draft_layer": 1, "max_draft_tokens": 8});
        let (status, out) = post(&url, &body).await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(ids(&out["choices"][0]["token_ids"]), case.greedy_ids);
        assert_eq!(
            out["usage"]["speculative"],
            json!({"drafted": 0, "accepted": 0})
        );
    }
    assert_eq!(
        server.metric("exitserve_speculative_drafted_tokens_total"),
        0.0
    );
}

/// In a batch bigger than `--speculative-max-batch-size` (default 1) speculative sequences
/// decode plainly: here two at once draft nothing, alone each drafts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drafting_waits_for_a_small_batch() {
    let server = TestServer::start(&[]);
    let url = server.url("/v1/completions");
    let case = common::reference()
        .cases
        .iter()
        .find(|c| c.mode == "original")
        .unwrap()
        .clone();
    let mut body = greedy_body_for(MODEL, &case);
    body["n"] = json!(2);
    body["speculative"] = json!({"draft_layer": 1, "adaptive": false});
    let (status, out) = post(&url, &body).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["usage"]["speculative"]["drafted"], 0, "{out}");
    for choice in out["choices"].as_array().unwrap() {
        assert_eq!(ids(&choice["token_ids"]), case.greedy_ids);
    }
    body["n"] = json!(1);
    let (_, out) = post(&url, &body).await;
    assert!(
        out["usage"]["speculative"]["drafted"].as_u64().unwrap() > 0,
        "{out}"
    );
}

/// A seeded request's text is a function of its seed: the random number behind each token is
/// its position's, so drafting (which switches off under load) and batching change nothing.
/// It used to: the same seeded request gave five texts in five tries beside other traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_request_gives_one_text_alone_batched_and_speculative() {
    let server = TestServer::start(&["--speculative-max-batch-size", "64"]);
    let url = server.url("/v1/completions");
    let prompt = common::reference().cases[0].prompt_ids.clone();
    let body = |speculative: Option<Value>| {
        let mut b = json!({"model": MODEL, "prompt": prompt, "max_tokens": 24,
            "temperature": 1.0, "seed": 1234, "n": 2, "ignore_eos": true,
            "return_token_ids": true});
        if let Some(s) = speculative {
            b["speculative"] = s;
        }
        b
    };
    let texts = |out: &Value| -> Vec<Vec<u32>> {
        out["choices"]
            .as_array()
            .unwrap_or_else(|| panic!("{out}"))
            .iter()
            .map(|c| ids(&c["token_ids"]))
            .collect()
    };
    let (status, plain) = post(&url, &body(None)).await;
    assert_eq!(status, 200, "{plain}");
    let want = texts(&plain);
    assert_ne!(want[0], want[1], "each choice draws its own numbers");
    let drafts = json!({"draft_layer": 1, "max_draft_tokens": 3, "adaptive": false});
    let (_, alone) = post(&url, &body(Some(drafts.clone()))).await;
    assert_eq!(texts(&alone), want, "with drafts, alone");
    let crowd: Vec<Value> = (0..6u32)
        .map(|i| {
            json!({"model": MODEL, "prompt": [11, 12, 13 + i], "max_tokens": 24,
                "temperature": 1.0})
        })
        .collect();
    let crowd: Vec<_> = crowd.iter().map(|b| post(&url, b)).collect();
    let with_drafts = body(Some(drafts));
    let without = body(None);
    let (a, b, _) = tokio::join!(
        post(&url, &with_drafts),
        post(&url, &without),
        futures_util::future::join_all(crowd)
    );
    assert_eq!(texts(&a.1), want, "with drafts, batched");
    assert_eq!(texts(&b.1), want, "plain, batched");
    assert!(server.metric("exitserve_speculative_drafted_tokens_total") > 0.0);
}

/// In every dtype, greedy speculation is token for token what the same server decodes without
/// drafts (not the reference: bf16 and int8 round), alone and with every case at once: the
/// verifying pass computes each position with the numbers a plain decode step would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_speculation_equals_plain_decoding_in_every_dtype() {
    for (f, dtype) in ARCHS
        .into_iter()
        .flat_map(|f| ["f32", "bf16", "int8"].map(|d| (f, d)))
    {
        if dtype == "int8" && !exitserve::kernels::matmul::supports_int8() {
            continue;
        }
        let server = TestServer::start_model(
            &f.dir(),
            &[
                "--dtype",
                dtype,
                "--max-batch-size",
                "128",
                "--speculative-max-batch-size",
                "128",
                // Every prompt in one chunk, batched or not (a cached prefix cuts the prompt
                // too: the prompt kernel gives a query the same bits wherever its chunk was
                // cut, but a step of many prompt chunks beside decoding rows has not been
                // shown to be the same to the bit yet).
                "--max-prefill-tokens",
                "4096",
            ],
        );
        let url = server.url("/v1/completions");
        let cases = f.reference().cases;
        let mut pairs = Vec::new();
        for (i, case) in cases.iter().enumerate() {
            let Some(mut fast) = speculative_body(f, case, 3) else {
                continue;
            };
            fast["logprobs"] = json!(1);
            let mut plain = fast.clone();
            plain.as_object_mut().unwrap().remove("speculative");
            let (status, want) = post(&url, &plain).await;
            assert_eq!(status, 200, "{want}");
            // the tokens and, to the bit, their logprobs: every other case alone, every case
            // at once below
            let want = tokens_and_logprobs(&want);
            if i % 2 == 0 {
                let (status, got) = post(&url, &fast).await;
                assert_eq!(status, 200, "{got}");
                let got = tokens_and_logprobs(&got);
                assert_eq!(got, want, "{} {dtype} {} alone", f.name, case.mode);
            }
            pairs.push((fast, want));
        }
        assert!(pairs.len() >= 30, "{} {}", f.name, pairs.len());
        let tasks: Vec<_> = pairs
            .iter()
            .map(|(body, _)| {
                let (url, body) = (url.clone(), body.clone());
                tokio::spawn(async move { post(&url, &body).await })
            })
            .collect();
        for (t, (body, want)) in tasks.into_iter().zip(&pairs) {
            let (status, out) = t.await.unwrap();
            assert_eq!(status, 200, "{out}");
            let got = tokens_and_logprobs(&out);
            assert_eq!(
                &got, want,
                "{} {dtype} batched {}",
                f.name, body["multi_exit"]
            );
        }
    }
}

/// The first choice's tokens and their logprobs, as compared to the bit.
fn tokens_and_logprobs(out: &Value) -> (Vec<u32>, Value) {
    (
        ids(&out["choices"][0]["token_ids"]),
        out["choices"][0]["logprobs"]["token_logprobs"].clone(),
    )
}
