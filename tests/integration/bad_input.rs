//! Every bad request gets a precise 4xx in the OpenAI error shape, and the server stays healthy.

use crate::common;

use common::server::TestServer;
use common::MODEL;
use serde_json::{json, Value};

/// A request body: JSON merged over a valid base, or raw bytes.
enum Body {
    Merge(Value),
    Raw(&'static str, Vec<u8>),
}

fn merged(extra: Value) -> Body {
    Body::Merge(extra)
}

fn raw(content_type: &'static str, bytes: &[u8]) -> Body {
    Body::Raw(content_type, bytes.to_vec())
}

fn without(key: &str) -> Body {
    let mut base = json!({"model": MODEL, "prompt": "hello", "max_tokens": 2});
    base.as_object_mut().unwrap().remove(key);
    Body::Raw("application/json", serde_json::to_vec(&base).unwrap())
}

fn contrast(extra: Value) -> Value {
    let mut m = json!({"mode": "contrast", "upper": 4, "lower": 2});
    for (k, v) in extra.as_object().unwrap() {
        m[k] = v.clone();
    }
    json!({"multi_exit": m})
}

/// (name, body, status, error type, param)
fn cases() -> Vec<(&'static str, Body, u16, &'static str, Option<&'static str>)> {
    const INV: &str = "invalid_request_error";
    let long_prompt: Vec<u32> = vec![11; 300];
    vec![
        (
            "malformed json",
            raw("application/json", b"{\"model\": "),
            400,
            INV,
            None,
        ),
        (
            "truncated json",
            raw("application/json", b"{\"model\": \"m\", \"prompt\": \"x\""),
            400,
            INV,
            None,
        ),
        (
            "not an object",
            raw("application/json", b"[1, 2]"),
            400,
            INV,
            None,
        ),
        ("empty body", raw("application/json", b""), 400, INV, None),
        ("text/plain", raw("text/plain", b"{}"), 415, INV, None),
        (
            "form content type",
            raw("application/x-www-form-urlencoded", b"a=b"),
            415,
            INV,
            None,
        ),
        (
            "invalid utf-8",
            raw(
                "application/json",
                b"{\"model\": \"m\", \"prompt\": \"\xff\xfe\"}",
            ),
            400,
            INV,
            None,
        ),
        ("missing model", without("model"), 400, INV, Some("model")),
        (
            "missing prompt",
            without("prompt"),
            400,
            INV,
            Some("prompt"),
        ),
        (
            "model not a string",
            merged(json!({"model": 7})),
            400,
            INV,
            Some("model"),
        ),
        (
            "unknown field",
            merged(json!({"frequency": 1})),
            400,
            INV,
            Some("frequency"),
        ),
        (
            "max_tokens string",
            merged(json!({"max_tokens": "10"})),
            400,
            INV,
            Some("max_tokens"),
        ),
        (
            "max_tokens negative",
            merged(json!({"max_tokens": -1})),
            400,
            INV,
            Some("max_tokens"),
        ),
        (
            "max_tokens zero",
            merged(json!({"max_tokens": 0})),
            400,
            INV,
            Some("max_tokens"),
        ),
        (
            "max_tokens float",
            merged(json!({"max_tokens": 1.5})),
            400,
            INV,
            Some("max_tokens"),
        ),
        (
            "max_tokens huge",
            merged(json!({"max_tokens": 1_000_000_000_000i64})),
            400,
            INV,
            Some("max_tokens"),
        ),
        (
            "temperature negative",
            merged(json!({"temperature": -0.1})),
            400,
            INV,
            Some("temperature"),
        ),
        (
            "temperature above 2",
            merged(json!({"temperature": 2.5})),
            400,
            INV,
            Some("temperature"),
        ),
        (
            "temperature string",
            merged(json!({"temperature": "hot"})),
            400,
            INV,
            Some("temperature"),
        ),
        (
            "top_p zero",
            merged(json!({"top_p": 0})),
            400,
            INV,
            Some("top_p"),
        ),
        (
            "top_p above 1",
            merged(json!({"top_p": 1.5})),
            400,
            INV,
            Some("top_p"),
        ),
        (
            "top_k below -1",
            merged(json!({"top_k": -2})),
            400,
            INV,
            Some("top_k"),
        ),
        ("n zero", merged(json!({"n": 0})), 400, INV, Some("n")),
        (
            "n too large",
            merged(json!({"n": 100})),
            400,
            INV,
            Some("n"),
        ),
        (
            "best_of below n",
            merged(json!({"n": 3, "best_of": 2})),
            400,
            INV,
            Some("best_of"),
        ),
        (
            "best_of too large",
            merged(json!({"best_of": 100})),
            400,
            INV,
            Some("best_of"),
        ),
        (
            "stream with best_of",
            merged(json!({"stream": true, "best_of": 2, "n": 1})),
            400,
            INV,
            Some("best_of"),
        ),
        (
            "stream_options without stream",
            merged(json!({"stream_options": {"include_usage": true}})),
            400,
            INV,
            Some("stream_options"),
        ),
        (
            "logprobs above 5",
            merged(json!({"logprobs": 6})),
            400,
            INV,
            Some("logprobs"),
        ),
        (
            "logprobs negative",
            merged(json!({"logprobs": -1})),
            400,
            INV,
            Some("logprobs"),
        ),
        (
            "seventeen stop sequences",
            merged(json!({"stop": (0..17).map(|i| format!("s{i}")).collect::<Vec<_>>()})),
            400,
            INV,
            Some("stop"),
        ),
        (
            "stop longer than --max-stop-length",
            merged(json!({"stop": ["x".repeat(257)]})),
            400,
            INV,
            Some("stop"),
        ),
        (
            "logit_bias with more entries than --max-logit-bias",
            merged(
                json!({"logit_bias": (0..301).map(|i| (i.to_string(), json!(1))).collect::<serde_json::Map<_, _>>()}),
            ),
            400,
            INV,
            Some("logit_bias"),
        ),
        (
            "max_tokens that would wrap an i64 sum",
            merged(json!({"max_tokens": i64::MAX, "ignore_eos": true})),
            400,
            INV,
            Some("max_tokens"),
        ),
        (
            "a model id naming an exit the model lacks",
            merged(json!({"model": format!("{MODEL}:exit-3")})),
            404,
            INV,
            Some("model"),
        ),
        (
            "a multi_exit disagreeing with the mode of the model id",
            merged(json!({"model": format!("{MODEL}:exit-1"), "multi_exit": {"mode": "original"}})),
            400,
            INV,
            Some("multi_exit"),
        ),
        (
            "more prompts than --max-sequences-per-request",
            merged(json!({"prompt": vec![vec![11]; 65]})),
            400,
            INV,
            Some("prompt"),
        ),
        (
            "prompts x best_of over --max-sequences-per-request",
            merged(json!({"prompt": vec![vec![11]; 9], "best_of": 8})),
            400,
            INV,
            Some("best_of"),
        ),
        (
            "empty stop",
            merged(json!({"stop": [""]})),
            400,
            INV,
            Some("stop"),
        ),
        (
            "stop not a string",
            merged(json!({"stop": 5})),
            400,
            INV,
            Some("stop"),
        ),
        (
            "empty prompt",
            merged(json!({"prompt": ""})),
            400,
            INV,
            Some("prompt"),
        ),
        (
            "empty prompt list",
            merged(json!({"prompt": []})),
            400,
            INV,
            Some("prompt"),
        ),
        (
            "empty token list",
            merged(json!({"prompt": [[]]})),
            400,
            INV,
            Some("prompt"),
        ),
        (
            "token id >= vocab",
            merged(json!({"prompt": [50257]})),
            400,
            INV,
            Some("prompt"),
        ),
        (
            "negative token id",
            merged(json!({"prompt": [1, -3]})),
            400,
            INV,
            Some("prompt"),
        ),
        (
            "prompt object",
            merged(json!({"prompt": {"text": "x"}})),
            400,
            INV,
            Some("prompt"),
        ),
        (
            "prompt mixed list",
            merged(json!({"prompt": ["a", 1]})),
            400,
            INV,
            Some("prompt"),
        ),
        (
            "prompt over the context",
            merged(json!({"prompt": long_prompt})),
            400,
            INV,
            Some("prompt"),
        ),
        (
            "prompt + max_tokens over the context",
            merged(json!({"max_tokens": 256})),
            400,
            INV,
            Some("max_tokens"),
        ),
        (
            "presence_penalty above 2",
            merged(json!({"presence_penalty": 3})),
            400,
            INV,
            Some("presence_penalty"),
        ),
        (
            "frequency_penalty below -2",
            merged(json!({"frequency_penalty": -3})),
            400,
            INV,
            Some("frequency_penalty"),
        ),
        (
            "repetition_penalty zero",
            merged(json!({"repetition_penalty": 0})),
            400,
            INV,
            Some("repetition_penalty"),
        ),
        (
            "logit_bias bad key",
            merged(json!({"logit_bias": {"abc": 1}})),
            400,
            INV,
            Some("logit_bias"),
        ),
        (
            "logit_bias key >= vocab",
            merged(json!({"logit_bias": {"99999": 1}})),
            400,
            INV,
            Some("logit_bias"),
        ),
        (
            "logit_bias value too large",
            merged(json!({"logit_bias": {"5": 200}})),
            400,
            INV,
            Some("logit_bias"),
        ),
        (
            "seed string",
            merged(json!({"seed": "42"})),
            400,
            INV,
            Some("seed"),
        ),
        (
            "echo not a bool",
            merged(json!({"echo": "yes"})),
            400,
            INV,
            Some("echo"),
        ),
        (
            "suffix",
            merged(json!({"suffix": "end"})),
            400,
            INV,
            Some("suffix"),
        ),
        (
            "unknown model",
            merged(json!({"model": "gpt-3.5-turbo-instruct"})),
            404,
            INV,
            Some("model"),
        ),
        (
            "multi_exit unknown mode",
            merged(json!({"multi_exit": {"mode": "sideways"}})),
            400,
            INV,
            Some("multi_exit.mode"),
        ),
        (
            "multi_exit not an object",
            merged(json!({"multi_exit": "exit"})),
            400,
            INV,
            Some("multi_exit"),
        ),
        (
            "multi_exit missing mode",
            merged(json!({"multi_exit": {"layer": 2}})),
            400,
            INV,
            Some("multi_exit.mode"),
        ),
        (
            "exit missing layer",
            merged(json!({"multi_exit": {"mode": "exit"}})),
            400,
            INV,
            Some("multi_exit.layer"),
        ),
        (
            "exit layer not an exit",
            merged(json!({"multi_exit": {"mode": "exit", "layer": 3}})),
            400,
            INV,
            Some("multi_exit.layer"),
        ),
        (
            "exit layer zero",
            merged(json!({"multi_exit": {"mode": "exit", "layer": 0}})),
            400,
            INV,
            Some("multi_exit.layer"),
        ),
        (
            "exit layer negative",
            merged(json!({"multi_exit": {"mode": "exit", "layer": -4}})),
            400,
            INV,
            Some("multi_exit.layer"),
        ),
        (
            "exit unknown key",
            merged(json!({"multi_exit": {"mode": "exit", "layer": 2, "depth": 1}})),
            400,
            INV,
            Some("multi_exit.depth"),
        ),
        (
            "contrast missing lower",
            merged(json!({"multi_exit": {"mode": "contrast", "upper": 4}})),
            400,
            INV,
            Some("multi_exit.lower"),
        ),
        (
            "contrast missing upper",
            merged(json!({"multi_exit": {"mode": "contrast", "lower": 1}})),
            400,
            INV,
            Some("multi_exit.upper"),
        ),
        (
            "contrast upper below lower",
            merged(contrast(json!({"upper": 1, "lower": 2}))),
            400,
            INV,
            Some("multi_exit.upper"),
        ),
        (
            "contrast upper equals lower",
            merged(contrast(json!({"upper": 2, "lower": 2}))),
            400,
            INV,
            Some("multi_exit.upper"),
        ),
        (
            "contrast upper unknown name",
            merged(contrast(json!({"upper": "top"}))),
            400,
            INV,
            Some("multi_exit.upper"),
        ),
        (
            "contrast lower not an exit",
            merged(contrast(json!({"lower": 3}))),
            400,
            INV,
            Some("multi_exit.lower"),
        ),
        (
            "contrast alpha zero",
            merged(contrast(json!({"alpha": 0}))),
            400,
            INV,
            Some("multi_exit.alpha"),
        ),
        (
            "contrast alpha above 1",
            merged(contrast(json!({"alpha": 1.5}))),
            400,
            INV,
            Some("multi_exit.alpha"),
        ),
        (
            "priority out of range",
            merged(json!({"priority": 1001})),
            400,
            INV,
            Some("priority"),
        ),
        (
            "cache_salt not a string",
            merged(json!({"cache_salt": 5})),
            400,
            INV,
            Some("cache_salt"),
        ),
        (
            "cache_salt empty",
            merged(json!({"cache_salt": ""})),
            400,
            INV,
            Some("cache_salt"),
        ),
        (
            "cache_salt too long",
            merged(json!({"cache_salt": "s".repeat(257)})),
            400,
            INV,
            Some("cache_salt"),
        ),
        (
            "priority not a number",
            merged(json!({"priority": "high"})),
            400,
            INV,
            Some("priority"),
        ),
        (
            "dola unknown key",
            merged(json!({"multi_exit": {"mode": "dola", "layers": [1], "alpha": 0.1}})),
            400,
            INV,
            Some("multi_exit.alpha"),
        ),
        (
            "dola layers unknown name",
            merged(json!({"multi_exit": {"mode": "dola", "layers": "middle"}})),
            400,
            INV,
            Some("multi_exit.layers"),
        ),
        (
            "dola layers empty",
            merged(json!({"multi_exit": {"mode": "dola", "layers": []}})),
            400,
            INV,
            Some("multi_exit.layers"),
        ),
        (
            "dola layers all at or above the top",
            merged(json!({"multi_exit": {"mode": "dola", "layers": [4, 9]}})),
            400,
            INV,
            Some("multi_exit.layers"),
        ),
        (
            "dola layer negative",
            merged(json!({"multi_exit": {"mode": "dola", "layers": [-1, 2]}})),
            400,
            INV,
            Some("multi_exit.layers"),
        ),
        (
            "dola layers not a list of numbers",
            merged(json!({"multi_exit": {"mode": "dola", "layers": ["two"]}})),
            400,
            INV,
            Some("multi_exit.layers"),
        ),
        (
            "dola layer not an exit",
            merged(json!({"multi_exit": {"mode": "dola", "layers": [1, 3]}})),
            400,
            INV,
            Some("multi_exit.layers"),
        ),
        (
            "dola embeddings as an exit",
            merged(json!({"multi_exit": {"mode": "dola", "layers": [0]}})),
            400,
            INV,
            Some("multi_exit.layers"),
        ),
        (
            "dola premature unknown",
            merged(json!({"multi_exit": {"mode": "dola", "layers": [1], "premature": "hidden"}})),
            400,
            INV,
            Some("multi_exit.premature"),
        ),
        (
            "dola relative_top zero",
            merged(json!({"multi_exit": {"mode": "dola", "layers": [1], "relative_top": 0}})),
            400,
            INV,
            Some("multi_exit.relative_top"),
        ),
        (
            "dola relative_top above 1",
            merged(json!({"multi_exit": {"mode": "dola", "layers": [1], "relative_top": 1.5}})),
            400,
            INV,
            Some("multi_exit.relative_top"),
        ),
        (
            "sled unknown key",
            merged(json!({"multi_exit": {"mode": "sled", "layers": [1]}})),
            400,
            INV,
            Some("multi_exit.layers"),
        ),
        (
            "sled premature unknown",
            merged(json!({"multi_exit": {"mode": "sled", "premature": "hidden"}})),
            400,
            INV,
            Some("multi_exit.premature"),
        ),
        (
            "sled evolution_rate negative",
            merged(json!({"multi_exit": {"mode": "sled", "evolution_rate": -0.1}})),
            400,
            INV,
            Some("multi_exit.evolution_rate"),
        ),
        (
            "sled evolution_scale zero",
            merged(json!({"multi_exit": {"mode": "sled", "evolution_scale": 0}})),
            400,
            INV,
            Some("multi_exit.evolution_scale"),
        ),
        (
            "sled evolution_scale past the vocabulary",
            merged(json!({"multi_exit": {"mode": "sled", "evolution_scale": 50258}})),
            400,
            INV,
            Some("multi_exit.evolution_scale"),
        ),
        (
            "sled evolution_scale not an integer",
            merged(json!({"multi_exit": {"mode": "sled", "evolution_scale": 2.5}})),
            400,
            INV,
            Some("multi_exit.evolution_scale"),
        ),
        (
            "sled evolution_lower_bound positive",
            merged(json!({"multi_exit": {"mode": "sled", "evolution_lower_bound": 5}})),
            400,
            INV,
            Some("multi_exit.evolution_lower_bound"),
        ),
        (
            "sled alpha negative",
            merged(json!({"multi_exit": {"mode": "sled", "alpha": -1}})),
            400,
            INV,
            Some("multi_exit.alpha"),
        ),
        (
            "early_exit threshold missing",
            merged(json!({"multi_exit": {"mode": "early_exit"}})),
            400,
            INV,
            Some("multi_exit.threshold"),
        ),
        (
            "early_exit threshold above 1",
            merged(json!({"multi_exit": {"mode": "early_exit", "threshold": 1.5}})),
            400,
            INV,
            Some("multi_exit.threshold"),
        ),
        (
            "early_exit threshold negative",
            merged(json!({"multi_exit": {"mode": "early_exit", "threshold": -0.1}})),
            400,
            INV,
            Some("multi_exit.threshold"),
        ),
        (
            "early_exit measure unknown",
            merged(
                json!({"multi_exit": {"mode": "early_exit", "threshold": 0.9, "measure": "entropy"}}),
            ),
            400,
            INV,
            Some("multi_exit.measure"),
        ),
        (
            "early_exit decay negative",
            merged(json!({"multi_exit": {"mode": "early_exit", "threshold": 0.9, "decay": -1}})),
            400,
            INV,
            Some("multi_exit.decay"),
        ),
        (
            "early_exit unknown key",
            merged(json!({"multi_exit": {"mode": "early_exit", "threshold": 0.9, "layers": [1]}})),
            400,
            INV,
            Some("multi_exit.layers"),
        ),
        (
            "early_exit with speculative",
            merged(
                json!({"multi_exit": {"mode": "early_exit", "threshold": 0.9},
                          "speculative": {"draft_layer": 1}}),
            ),
            400,
            INV,
            Some("speculative"),
        ),
        (
            "response_format unknown type",
            merged(json!({"response_format": {"type": "yaml"}})),
            400,
            INV,
            Some("response_format.type"),
        ),
        (
            "json_schema without name",
            merged(
                json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}),
            ),
            400,
            INV,
            Some("response_format.json_schema.name"),
        ),
        (
            "json_schema not a schema",
            merged(
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": [1]}}}),
            ),
            400,
            INV,
            Some("response_format.json_schema.schema"),
        ),
        (
            "structured_outputs empty",
            merged(json!({"structured_outputs": {}})),
            400,
            INV,
            Some("structured_outputs"),
        ),
        (
            "structured_outputs two constraints",
            merged(json!({"structured_outputs": {"regex": "a", "choice": ["b"]}})),
            400,
            INV,
            Some("structured_outputs"),
        ),
        (
            "structured_outputs and response_format",
            merged(
                json!({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}),
            ),
            400,
            INV,
            Some("structured_outputs"),
        ),
        (
            "structured_outputs unknown key",
            merged(json!({"structured_outputs": {"xml": "a"}})),
            400,
            INV,
            Some("structured_outputs.xml"),
        ),
        (
            "structured_outputs bad regex",
            merged(json!({"structured_outputs": {"regex": "a{2,1}"}})),
            400,
            INV,
            Some("structured_outputs.regex"),
        ),
        (
            "structured_outputs bad grammar",
            merged(json!({"structured_outputs": {"grammar": "start: \"a\" ) ("}})),
            400,
            INV,
            Some("structured_outputs.grammar"),
        ),
        (
            "structured_outputs empty choice list",
            merged(json!({"structured_outputs": {"choice": []}})),
            400,
            INV,
            Some("structured_outputs.choice"),
        ),
        (
            "structured_outputs json not JSON",
            merged(json!({"structured_outputs": {"json": "{not json"}})),
            400,
            INV,
            Some("structured_outputs.json"),
        ),
        (
            "contrast minimum_candidates zero",
            merged(contrast(json!({"minimum_candidates": 0}))),
            400,
            INV,
            Some("multi_exit.minimum_candidates"),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_matrix() {
    let server = TestServer::start(&[]);
    let url = server.url("/v1/completions");
    let client = reqwest::Client::new();
    let all = cases();
    assert!(all.len() >= 40);
    for (name, body, status, kind, param) in all {
        let req = client.post(&url);
        let req = match body {
            Body::Merge(extra) => {
                let mut b = json!({"model": MODEL, "prompt": "hello", "max_tokens": 2});
                for (k, v) in extra.as_object().unwrap() {
                    b[k] = v.clone();
                }
                req.json(&b)
            }
            Body::Raw(ctype, bytes) => req.header("content-type", ctype).body(bytes),
        };
        let resp = req.send().await.unwrap();
        let got_status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{name}: not JSON: {text}"));
        assert_eq!(got_status, status, "{name}: {v}");
        let e = &v["error"];
        assert_eq!(e["type"], kind, "{name}: {v}");
        assert_eq!(e["param"], json!(param), "{name}: {v}");
        let message = e["message"].as_str().unwrap();
        assert!(!message.is_empty(), "{name}");
        if let Some(p) = param {
            let field = p.rsplit('.').next().unwrap();
            assert!(
                message.contains(field),
                "{name}: message does not name `{field}`: {message}"
            );
        }
        let health = client.get(server.url("/health")).send().await.unwrap();
        assert_eq!(health.status(), 200, "unhealthy after {name}");
    }
    // nothing above reached the engine
    assert_eq!(server.metric("exitserve_model_steps_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_mb_body_gets_413() {
    let server = TestServer::start(&[]);
    let big = format!(
        "{{\"model\": \"{MODEL}\", \"prompt\": \"{}\"}}",
        "a".repeat(10 << 20)
    );
    let resp = reqwest::Client::new()
        .post(server.url("/v1/completions"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "payload_too_large");
    assert!(v["error"]["message"].as_str().unwrap().contains("1048576"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_and_routes_get_json_errors() {
    let server = TestServer::start(&[]);
    let client = reqwest::Client::new();
    let r = client
        .get(server.url("/v1/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let r = client
        .post(server.url("/v1/embeddings"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/embeddings"));
}
