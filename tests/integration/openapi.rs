//! `openapi.yaml` is checked against the real server, so the spec cannot drift: every
//! documented path answers, every real response validates against its documented schema,
//! and every documented request field is accepted while undocumented ones are refused.

use crate::common;

use common::client::{get, post, post_stream};
use common::server::TestServer;
use common::MODEL;
use serde_json::{json, Value};

fn spec() -> Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn resolve<'a>(root: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let path = r.trim_start_matches("#/");
            let target = path.split('/').fold(root, |v, k| &v[k]);
            resolve(root, target)
        }
        None => schema,
    }
}

/// Validates `v` against the subset of JSON Schema the spec uses; returns the first problem.
fn check(root: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let s = resolve(root, schema);
    if v.is_null() && s["nullable"] == json!(true) {
        return Ok(());
    }
    if let Some(all) = s.get("allOf").and_then(Value::as_array) {
        for sub in all {
            check(root, sub, v, at)?;
        }
    }
    if let Some(one) = s.get("oneOf").and_then(Value::as_array) {
        let matches = one
            .iter()
            .filter(|sub| check(root, sub, v, at).is_ok())
            .count();
        if matches != 1 {
            return Err(format!("{at}: {v} matches {matches} of oneOf"));
        }
    }
    if let Some(values) = s.get("enum").and_then(Value::as_array) {
        if !values.contains(v) {
            return Err(format!("{at}: {v} not in enum {values:?}"));
        }
    }
    let ty = s.get("type").and_then(Value::as_str);
    let ok = match ty {
        None => true,
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        Some(other) => return Err(format!("{at}: unknown type {other}")),
    };
    if !ok {
        return Err(format!("{at}: {v} is not {ty:?}"));
    }
    if let (Some(p), Some(text)) = (s.get("pattern").and_then(Value::as_str), v.as_str()) {
        let prefix = p.trim_start_matches('^');
        if !text.starts_with(prefix) {
            return Err(format!("{at}: {text:?} does not match {p}"));
        }
    }
    if let Some(obj) = v.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        for req in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !obj.contains_key(req.as_str().unwrap()) {
                return Err(format!(
                    "{at}: missing required `{}`",
                    req.as_str().unwrap()
                ));
            }
        }
        for (k, val) in obj {
            let sub_at = format!("{at}.{k}");
            match props.and_then(|p| p.get(k)) {
                Some(sub) => check(root, sub, val, &sub_at)?,
                None => match s.get("additionalProperties") {
                    Some(Value::Bool(false)) => return Err(format!("{sub_at}: not in the spec")),
                    Some(extra @ Value::Object(_)) => check(root, extra, val, &sub_at)?,
                    _ if props.is_some() => return Err(format!("{sub_at}: undocumented field")),
                    _ => {}
                },
            }
        }
    }
    if let (Some(items), Some(arr)) = (s.get("items"), v.as_array()) {
        for (i, item) in arr.iter().enumerate() {
            check(root, items, item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

fn response_schema<'a>(
    root: &'a Value,
    path: &str,
    method: &str,
    status: u16,
    ctype: &str,
) -> &'a Value {
    let op = &root["paths"][path][method];
    let resp = resolve(root, &op["responses"][status.to_string()]);
    assert!(
        !resp.is_null(),
        "{method} {path}: status {status} is not documented"
    );
    let schema = &resp["content"][ctype]["schema"];
    assert!(
        !schema.is_null(),
        "{method} {path} {status}: {ctype} is not documented"
    );
    schema
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_answers_as_documented() {
    let root = spec();
    let server = crate::chat::chat_server();
    let paths = root["paths"].as_object().unwrap();
    let mut documented: Vec<&str> = paths.keys().map(String::as_str).collect();
    documented.sort_unstable();
    assert_eq!(
        documented,
        vec![
            "/",
            "/detokenize",
            "/favicon.ico",
            "/favicon.svg",
            "/health",
            "/metrics",
            "/openapi.yaml",
            "/playground.css",
            "/playground.js",
            "/tokenize",
            "/tokenizer_info",
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/inspect",
            "/v1/models",
            "/v1/models/{model}"
        ]
    );
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            if method != "get" {
                continue;
            }
            let real = path.replace("{model}", MODEL);
            let resp = reqwest::get(server.url(&real)).await.unwrap();
            let status = resp.status().as_u16();
            assert_eq!(status, 200, "{path}");
            let ctype = resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .to_string();
            let schema = response_schema(&root, path, method, status, &ctype);
            let body = resp.text().await.unwrap();
            let value: Value = match ctype.as_str() {
                "application/json" => serde_json::from_str(&body).unwrap(),
                "application/yaml" => serde_yaml::from_str(&body).unwrap(),
                _ => json!(body),
            };
            check(&root, schema, &value, path).unwrap();
        }
    }
    // the tokenizer's POST routes
    for (path, body) in [
        (
            "/tokenize",
            json!({"prompt": "Hello world", "return_token_strs": true}),
        ),
        ("/detokenize", json!({"tokens": [15496, 995]})),
        (
            "/tokenize",
            json!({"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": true}),
        ),
        (
            "/v1/inspect",
            json!({"model": MODEL, "prompt": "Hello world", "positions": "all",
                "contrast": {"upper": 4, "lower": 1}}),
        ),
        (
            "/v1/inspect",
            json!({"model": MODEL, "prompt": "Hello world",
                "strategies": [{"mode": "dola", "layers": "low"}, {"mode": "early_exit", "threshold": 0.0}]}),
        ),
    ] {
        let (status, value) = post(&server.url(path), &body).await;
        assert_eq!(status, 200, "{path}");
        let schema = response_schema(&root, path, "post", status, "application/json");
        check(&root, schema, &value, path).unwrap();
    }
    // unknown model on the item route: documented 404
    let (status, body) = get(&server.url("/v1/models/nope")).await;
    check(
        &root,
        response_schema(
            &root,
            "/v1/models/{model}",
            "get",
            status,
            "application/json",
        ),
        &body,
        "404",
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_responses_chunks_and_errors_match_the_spec() {
    let root = spec();
    let server = TestServer::start(&[]);
    let url = server.url("/v1/completions");
    let req_schema = &root["components"]["schemas"]["CompletionRequest"];
    let requests = [
        json!({"model": MODEL, "prompt": "Hello there", "max_tokens": 5, "temperature": 0}),
        json!({"model": MODEL, "prompt": ["a", "b"], "max_tokens": 3, "n": 2, "logprobs": 2, "echo": true,
               "return_token_ids": true, "seed": 1, "multi_exit": {"mode": "exit", "layer": 2}}),
        json!({"model": MODEL, "prompt": [[1, 2, 3]], "max_tokens": 3, "best_of": 2, "stop": ["x"],
               "multi_exit": {"mode": "contrast", "upper": "original", "lower": 1, "alpha": 0.2, "minimum_candidates": 2}}),
    ];
    for req in &requests {
        check(&root, req_schema, req, "request").unwrap();
        let (status, body) = post(&url, req).await;
        assert_eq!(status, 200, "{body}");
        check(
            &root,
            response_schema(&root, "/v1/completions", "post", 200, "application/json"),
            &body,
            "completion",
        )
        .unwrap();
        let mut stream_req = req.clone();
        if stream_req.get("best_of").is_some() {
            continue;
        }
        stream_req["stream"] = json!(true);
        stream_req["stream_options"] = json!({"include_usage": true});
        check(&root, req_schema, &stream_req, "stream request").unwrap();
        let (status, _, events) = post_stream(&url, &stream_req).await;
        assert_eq!(status, 200);
        for e in &events[..events.len() - 1] {
            check(
                &root,
                response_schema(&root, "/v1/completions", "post", 200, "application/json"),
                e,
                "chunk",
            )
            .unwrap();
        }
    }
    let bad = [
        json!({"model": MODEL, "prompt": "x", "temperature": 3}),
        json!({"model": "other", "prompt": "x"}),
        json!({"model": MODEL, "prompt": "x", "bogus": 1}),
    ];
    for req in &bad {
        let (status, body) = post(&url, req).await;
        let schema = response_schema(&root, "/v1/completions", "post", status, "application/json");
        check(&root, schema, &body, "error").unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_request_fields_are_exactly_the_accepted_ones() {
    let root = spec();
    let server = TestServer::start(&[]);
    let url = server.url("/v1/completions");
    let props = root["components"]["schemas"]["CompletionRequest"]["properties"]
        .as_object()
        .unwrap();
    // a valid value for each documented optional field
    let samples = json!({
        "suffix": "", "max_tokens": 2, "temperature": 0.5, "top_p": 0.9, "top_k": 3, "n": 1,
        "best_of": 1, "stream": false, "stream_options": null, "logprobs": 1, "echo": false,
        "stop": "zz", "seed": 3, "presence_penalty": 0.1, "frequency_penalty": 0.1,
        "repetition_penalty": 1.1, "logit_bias": {"50": 1.0}, "user": "u",
        "return_token_ids": true, "ignore_eos": true, "multi_exit": {"mode": "original"},
        "speculative": {"draft_layer": 1, "max_draft_tokens": 2}, "priority": -1,
        "cache_salt": "tenant-1", "response_format": {"type": "json_object"},
        "structured_outputs": {"regex": "[a-z]+"}
    });
    for key in props.keys() {
        if key == "model" || key == "prompt" {
            continue;
        }
        let value = samples
            .get(key)
            .unwrap_or_else(|| panic!("add a sample for documented field `{key}`"));
        let req = json!({"model": MODEL, "prompt": "hi", "max_tokens": 2, key: value});
        let (status, body) = post(&url, &req).await;
        assert_eq!(status, 200, "documented field `{key}` refused: {body}");
    }
    for key in samples.as_object().unwrap().keys() {
        assert!(
            props.contains_key(key),
            "accepted field `{key}` is not documented"
        );
    }
    let (status, body) = post(
        &url,
        &json!({"model": MODEL, "prompt": "hi", "frobnicate": 1}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "frobnicate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_responses_chunks_and_errors_match_the_spec() {
    let root = spec();
    let server = crate::chat::chat_server();
    let url = server.url("/v1/chat/completions");
    let req_schema = &root["components"]["schemas"]["ChatCompletionRequest"];
    let path = "/v1/chat/completions";
    let messages = json!([{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]);
    let requests = [
        json!({"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0}),
        json!({"model": MODEL, "messages": messages, "max_completion_tokens": 3, "n": 2,
               "logprobs": true, "top_logprobs": 2, "return_token_ids": true, "seed": 1,
               "multi_exit": {"mode": "early_exit", "threshold": 0.5}}),
        json!({"model": MODEL, "messages": messages, "max_tokens": 20, "temperature": 0,
               "structured_outputs": {"choice": ["yes", "no"]}}),
    ];
    for req in &requests {
        check(&root, req_schema, req, "request").unwrap();
        let (status, body) = post(&url, req).await;
        assert_eq!(status, 200, "{body}");
        check(
            &root,
            response_schema(&root, path, "post", 200, "application/json"),
            &body,
            "chat",
        )
        .unwrap();
        let mut stream_req = req.clone();
        stream_req["stream"] = json!(true);
        stream_req["stream_options"] = json!({"include_usage": true});
        check(&root, req_schema, &stream_req, "stream request").unwrap();
        let (status, _, events) = post_stream(&url, &stream_req).await;
        assert_eq!(status, 200);
        for e in &events[..events.len() - 1] {
            check(
                &root,
                response_schema(&root, path, "post", 200, "application/json"),
                e,
                "chunk",
            )
            .unwrap();
        }
    }
    for req in [
        json!({"model": MODEL, "messages": []}),
        json!({"model": MODEL, "messages": messages, "tools": []}),
        json!({"model": "other", "messages": messages}),
    ] {
        let (status, body) = post(&url, &req).await;
        assert!(status == 400 || status == 404, "{body}");
        let schema = response_schema(&root, path, "post", status, "application/json");
        check(&root, schema, &body, "error").unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_chat_request_fields_are_exactly_the_accepted_ones() {
    let root = spec();
    let server = crate::chat::chat_server();
    let url = server.url("/v1/chat/completions");
    let props = root["components"]["schemas"]["ChatCompletionRequest"]["properties"]
        .as_object()
        .unwrap();
    let samples = json!({
        "max_tokens": 2, "max_completion_tokens": 2, "temperature": 0.5, "top_p": 0.9,
        "top_k": 3, "n": 1, "stream": false, "stream_options": null, "logprobs": true,
        "top_logprobs": 1, "stop": "zz", "seed": 3, "presence_penalty": 0.1,
        "frequency_penalty": 0.1, "repetition_penalty": 1.1, "logit_bias": {"50": 1.0},
        "user": "u", "response_format": {"type": "text"},
        "structured_outputs": {"json_object": true}, "tools": null, "tool_choice": null,
        "functions": null, "function_call": null, "parallel_tool_calls": null,
        "return_token_ids": true, "ignore_eos": true, "cache_salt": "t", "priority": 1,
        "multi_exit": {"mode": "exit", "layer": 1}, "speculative": false,
        "add_generation_prompt": false, "continue_final_message": false,
        "chat_template_kwargs": {"x": 1}
    });
    for key in props.keys() {
        if key == "model" || key == "messages" {
            continue;
        }
        let value = samples
            .get(key)
            .unwrap_or_else(|| panic!("add a sample for documented field `{key}`"));
        let mut req = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2, key: value});
        if key == "top_logprobs" {
            req["logprobs"] = json!(true);
        }
        let (status, body) = post(&url, &req).await;
        assert_eq!(status, 200, "documented field `{key}` refused: {body}");
    }
    for key in samples.as_object().unwrap().keys() {
        assert!(
            props.contains_key(key),
            "accepted field `{key}` is not documented"
        );
    }
    let (status, body) = post(
        &url,
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "frobnicate");
}
