//! Structured outputs through the real server, on both architectures and in every mode: a
//! JSON schema's output parses and validates, regexes, choices and Lark grammars hold, the
//! constraint changes nothing about speculation's or batching's exactness, and a grammar
//! that can go no further ends with `stop`.

use crate::common;

use common::client::post;
use common::server::TestServer;
use common::{ARCHS, MODEL};
use serde_json::{json, Value};

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no", "maybe"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 99},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        },
        "required": ["answer", "count", "tags"],
        "additionalProperties": false,
    })
}

/// The output validates against [`schema`].
fn check_schema(text: &str, what: &str) {
    let v: Value = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("{what}: {text:?} does not parse: {e}"));
    let o = v.as_object().unwrap_or_else(|| panic!("{what}: {text}"));
    assert_eq!(o.len(), 3, "{what}: {text}");
    assert!(
        ["yes", "no", "maybe"].contains(&o["answer"].as_str().unwrap()),
        "{what}: {text}"
    );
    assert!(
        (0..=99).contains(&o["count"].as_i64().unwrap()),
        "{what}: {text}"
    );
    let tags = o["tags"].as_array().unwrap();
    assert!(
        tags.len() <= 3 && tags.iter().all(|t| t == "a" || t == "b"),
        "{what}: {text}"
    );
}

/// Every mode, as `multi_exit` objects, for a model whose lowest exit is 1 or 2.
fn modes(low: u64) -> Vec<Value> {
    vec![
        json!({"mode": "original"}),
        json!({"mode": "exit", "layer": low}),
        json!({"mode": "contrast", "upper": "original", "lower": low}),
        // DoLa's relative-top filter rules out all but the likeliest tokens: at its default
        // (0.1) none of them may fit the grammar, and the output stops there (the test
        // below); a looser filter leaves the grammar room.
        json!({"mode": "dola", "layers": "low", "premature": "lm_head", "relative_top": 1e-5}),
        json!({"mode": "sled", "premature": "lm_head"}),
        json!({"mode": "early_exit", "threshold": 0.5}),
    ]
}

async fn complete(server: &TestServer, body: &Value) -> Value {
    let (status, out) = post(&server.url("/v1/completions"), body).await;
    assert_eq!(status, 200, "{body} -> {out}");
    out
}

fn text(out: &Value, i: usize) -> &str {
    out["choices"][i]["text"].as_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_schema_holds_in_every_mode_on_both_architectures() {
    for fixture in ARCHS {
        let server = TestServer::start_model(&fixture.dir(), &[]);
        let (_, models) = common::client::get(&server.url("/v1/models")).await;
        let low = models["data"][0]["exit_layers"][0].as_u64().unwrap();
        for mode in modes(low) {
            for (temperature, seed) in [(0.0, 0), (1.0, 7)] {
                let body = json!({"model": fixture.name, "prompt": "The answer:", "max_tokens": 80,
                    "temperature": temperature, "seed": seed, "n": 2, "multi_exit": mode,
                    "logprobs": 2,
                    "response_format": {"type": "json_schema",
                        "json_schema": {"name": "answer", "schema": schema(), "strict": true}}});
                let out = complete(&server, &body).await;
                for i in 0..2 {
                    let what = format!("{} {mode} t={temperature}", fixture.name);
                    assert_eq!(out["choices"][i]["finish_reason"], "stop", "{what}: {out}");
                    check_schema(text(&out, i), &what);
                    // Reported logprobs are of the masked distribution: every alternative
                    // is a token the grammar allowed, and they sum to at most 1.
                    let lps = &out["choices"][i]["logprobs"]["top_logprobs"];
                    for top in lps.as_array().unwrap() {
                        let mass: f64 = top
                            .as_object()
                            .unwrap()
                            .values()
                            .map(|l| l.as_f64().unwrap().exp())
                            .sum();
                        assert!(mass <= 1.0 + 1e-4, "{what}: {top}");
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regexes_choices_and_grammars_hold() {
    let server = TestServer::start(&[]);
    for seed in 0..4 {
        let base = json!({"model": MODEL, "prompt": "Go:", "max_tokens": 40, "temperature": 1.0,
            "seed": seed});
        let mut body = base.clone();
        body["structured_outputs"] = json!({"regex": "[0-9]{3}-[a-z]{2,4}"});
        let out = complete(&server, &body).await;
        let t = text(&out, 0);
        let (digits, letters) = t.split_once('-').unwrap_or_else(|| panic!("{t:?}"));
        assert!(
            digits.len() == 3 && digits.bytes().all(|b| b.is_ascii_digit()),
            "{t:?}"
        );
        assert!((2..=4).contains(&letters.len()), "{t:?}");
        assert!(letters.bytes().all(|b| b.is_ascii_lowercase()), "{t:?}");

        let choices = ["red", "green \"light\"", "blue\\sky"];
        body = base.clone();
        body["structured_outputs"] = json!({"choice": choices});
        let out = complete(&server, &body).await;
        assert!(choices.contains(&text(&out, 0)), "{out}");
        assert_eq!(out["choices"][0]["finish_reason"], "stop");

        body = base.clone();
        body["structured_outputs"] = json!({"grammar":
            "start: \"(\" expr \")\"\nexpr: num | num \"+\" num\nnum: /[1-9][0-9]?/"});
        let out = complete(&server, &body).await;
        let t = text(&out, 0);
        let inner = t
            .strip_prefix('(')
            .and_then(|t| t.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{t:?}"));
        for n in inner.split('+') {
            assert!(
                (1..=2).contains(&n.len())
                    && n.bytes().all(|b| b.is_ascii_digit())
                    && !n.starts_with('0'),
                "{t:?}"
            );
        }

        body = base.clone();
        body["response_format"] = json!({"type": "json_object"});
        body["max_tokens"] = json!(120);
        let out = complete(&server, &body).await;
        if out["choices"][0]["finish_reason"] == "stop" {
            let v: Value = serde_json::from_str(text(&out, 0)).unwrap();
            assert!(v.is_object(), "{out}");
        } else {
            assert!(text(&out, 0).starts_with('{'), "{out}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculation_and_batching_give_the_constrained_output_of_one_plain_request() {
    let server = TestServer::start(&[]);
    let constrained = |extra: Value| {
        let mut b = json!({"model": MODEL, "prompt": "JSON:", "max_tokens": 60, "temperature": 0,
            "return_token_ids": true,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema()}}});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let alone = complete(&server, &constrained(json!({}))).await;
    check_schema(text(&alone, 0), "alone");
    for spec in [
        json!({"draft_layer": 1, "max_draft_tokens": 3, "adaptive": false}),
        json!({"draft_layer": 2, "max_draft_tokens": 5}),
    ] {
        let out = complete(&server, &constrained(json!({"speculative": spec}))).await;
        assert_eq!(
            out["choices"][0]["token_ids"], alone["choices"][0]["token_ids"],
            "{spec}"
        );
        assert!(out["usage"]["speculative"]["drafted"].as_u64().unwrap() > 0);
    }
    // Sampled with a seed, too: the same tokens with and without drafts.
    let sampled = constrained(json!({"temperature": 0.8, "seed": 11}));
    let plain = complete(&server, &sampled).await;
    let mut drafted = sampled.clone();
    drafted["speculative"] = json!({"draft_layer": 1, "max_draft_tokens": 4});
    let out = complete(&server, &drafted).await;
    assert_eq!(
        out["choices"][0]["token_ids"],
        plain["choices"][0]["token_ids"]
    );
    // Constrained and free requests in one batch: each as it is alone.
    let free = json!({"model": MODEL, "prompt": "JSON:", "max_tokens": 20, "temperature": 0,
        "return_token_ids": true});
    let free_alone = complete(&server, &free).await;
    let url = server.url("/v1/completions");
    let bodies = [
        constrained(json!({})),
        free.clone(),
        constrained(json!({})),
        free,
    ];
    let outs = futures_util::future::join_all(bodies.iter().map(|b| post(&url, b))).await;
    for (i, (status, out)) in outs.iter().enumerate() {
        assert_eq!(*status, 200);
        let want = if i % 2 == 0 { &alone } else { &free_alone };
        assert_eq!(
            out["choices"][0]["token_ids"], want["choices"][0]["token_ids"],
            "{i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grammar_that_can_go_no_further_stops() {
    let server = TestServer::start(&[]);
    // DoLa's filter rules out all but the few most likely tokens: none of them is allowed by
    // the grammar at some point, or the choice completes; either way the output stops there.
    for seed in 0..3 {
        let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 30, "temperature": 1.0,
            "seed": seed,
            "multi_exit": {"mode": "dola", "layers": "low", "premature": "lm_head", "relative_top": 0.9},
            "structured_outputs": {"choice": ["zebra crossing", "quantum flux"]}});
        let out = complete(&server, &body).await;
        assert_eq!(out["choices"][0]["finish_reason"], "stop", "{out}");
        let t = text(&out, 0);
        assert!(
            "zebra crossing".starts_with(t) || "quantum flux".starts_with(t),
            "{t:?}"
        );
    }
    // Stop sequences and max_tokens still end a constrained output.
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 3, "temperature": 0,
        "structured_outputs": {"regex": "[a-z]{20}"}});
    let out = complete(&server, &body).await;
    assert_eq!(out["choices"][0]["finish_reason"], "length");
    assert_eq!(out["usage"]["completion_tokens"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grammar_size_is_bounded_by_its_setting() {
    let server = TestServer::start(&["--max-grammar-bytes", "100"]);
    let (status, err) = post(
        &server.url("/v1/completions"),
        &json!({"model": MODEL, "prompt": "x", "structured_outputs": {"regex": "a".repeat(101)}}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["param"], "structured_outputs.regex");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--max-grammar-bytes 100"));
    let (status, _) = post(
        &server.url("/v1/completions"),
        &json!({"model": MODEL, "prompt": "x", "max_tokens": 2, "structured_outputs": {"regex": "a".repeat(100)}}),
    )
    .await;
    assert_eq!(status, 200);
}
