//! The OpenAI-style API on a real server (127.0.0.1, random port) with the fixture model.

use crate::common;

use common::client::{get, post, post_stream};
use common::server::TestServer;
use common::{greedy_body, ids, reference, MODEL};
use serde_json::{json, Value};

/// The `multi_exit` object for a fixture mode string.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_matches_the_reference_over_http() {
    let server = TestServer::start(&[]);
    let url = server.url("/v1/completions");
    for case in reference()
        .cases
        .iter()
        .filter(|c| c.prompt.len() < 30 || c.mode.starts_with("contrast"))
    {
        let (status, body) = post(&url, &greedy_body(case)).await;
        assert_eq!(status, 200, "{body}");
        let choice = &body["choices"][0];
        assert_eq!(
            ids(&choice["token_ids"]),
            case.greedy_ids,
            "{} {:?}",
            case.mode,
            case.prompt
        );
        assert_eq!(ids(&choice["prompt_token_ids"]), case.prompt_ids);
        assert_eq!(choice["text"], json!(case.greedy_text));
        assert_eq!(choice["finish_reason"], "length");
        assert_eq!(body["object"], "text_completion");
        assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
        assert_eq!(body["model"], MODEL);
        assert_eq!(
            body["multi_exit"]["mode"],
            case.mode.split(':').next().unwrap()
        );
        let usage = &body["usage"];
        assert_eq!(usage["prompt_tokens"], case.prompt_ids.len());
        assert_eq!(usage["completion_tokens"], 24);
        assert_eq!(usage["total_tokens"], case.prompt_ids.len() + 24);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_chunks_concatenate_to_the_non_stream_text() {
    let server = TestServer::start(&[]);
    let url = server.url("/v1/completions");
    let r = reference();
    for case in r.cases.iter().step_by(7) {
        let mut body = greedy_body(case);
        let (_, whole) = post(&url, &body).await;
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let (status, ctype, events) = post_stream(&url, &body).await;
        assert_eq!(status, 200);
        assert!(ctype.starts_with("text/event-stream"), "{ctype}");
        assert_eq!(events.last().unwrap(), &json!("[DONE]"));
        let usage_chunk = &events[events.len() - 2];
        assert_eq!(usage_chunk["choices"], json!([]));
        // the same usage, but for the prompt the first request left in the prefix cache
        let mut usage = usage_chunk["usage"].clone();
        assert!(usage["prompt_tokens_details"]["cached_tokens"].is_u64());
        usage["prompt_tokens_details"] = whole["usage"]["prompt_tokens_details"].clone();
        assert_eq!(usage, whole["usage"]);
        let chunks = &events[..events.len() - 2];
        let text: String = chunks
            .iter()
            .map(|c| c["choices"][0]["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
        let streamed_ids: Vec<u32> = chunks
            .iter()
            .flat_map(|c| ids(&c["choices"][0]["token_ids"]))
            .collect();
        assert_eq!(streamed_ids, case.greedy_ids);
        // finish_reason is null until the last chunk of the choice
        for c in &chunks[..chunks.len() - 1] {
            assert_eq!(c["choices"][0]["finish_reason"], Value::Null);
            assert_eq!(c["usage"], Value::Null);
        }
        assert_eq!(
            chunks.last().unwrap()["choices"][0]["finish_reason"],
            "length"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_are_those_of_the_decoded_distribution() {
    let server = TestServer::start(&[]);
    let url = server.url("/v1/completions");
    for case in reference().cases.iter().step_by(5) {
        let mut body = greedy_body(case);
        body["logprobs"] = json!(5);
        body["max_tokens"] = json!(4);
        let (status, resp) = post(&url, &body).await;
        assert_eq!(status, 200, "{resp}");
        let lp = &resp["choices"][0]["logprobs"];
        for step in 0..4 {
            let (id, want) = case.top5[step][0];
            assert_eq!(resp["choices"][0]["token_ids"][step], id);
            let got = lp["token_logprobs"][step].as_f64().unwrap() as f32;
            assert!((got - want).abs() < 1e-3, "{}: {got} vs {want}", case.mode);
            let top = lp["top_logprobs"][step].as_object().unwrap();
            assert!(top.len() >= 4 && top.len() <= 6, "{top:?}");
            for v in top.values() {
                assert!(v.as_f64().unwrap() as f32 <= got + 1e-6);
            }
        }
        let offsets: Vec<u64> = lp["text_offset"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(offsets[0], 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_prepends_the_prompt_with_its_logprobs() {
    let server = TestServer::start(&[]);
    let url = server.url("/v1/completions");
    let case = &reference().cases[1];
    let mut body = greedy_body(case);
    body["echo"] = json!(true);
    body["logprobs"] = json!(1);
    body["max_tokens"] = json!(3);
    let (status, resp) = post(&url, &body).await;
    assert_eq!(status, 200, "{resp}");
    let choice = &resp["choices"][0];
    let text = choice["text"].as_str().unwrap();
    assert!(text.starts_with(&case.prompt), "{text}");
    let lp = &choice["logprobs"];
    let n_prompt = case.prompt_ids.len();
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n_prompt + 3);
    assert_eq!(lp["token_logprobs"][0], Value::Null);
    assert!(lp["token_logprobs"][1].as_f64().unwrap() < 0.0);
    // the first generated token sits right after the prompt text
    assert_eq!(lp["text_offset"][n_prompt], case.prompt.chars().count());
    // echo with max_tokens 0 scores the prompt only
    body["max_tokens"] = json!(0);
    let (status, resp) = post(&url, &body).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["choices"][0]["text"], json!(case.prompt));
    assert_eq!(resp["usage"]["completion_tokens"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_best_of_and_seed_behave_like_openai() {
    let server = TestServer::start(&[]);
    let url = server.url("/v1/completions");
    let base = json!({
        "model": MODEL, "prompt": ["The capital of France is", "def fibonacci(n):"],
        "max_tokens": 6, "temperature": 1.0, "seed": 42, "logprobs": 0, "return_token_ids": true,
        "multi_exit": {"mode": "contrast", "upper": 4, "lower": 2},
    });
    let mut body = base.clone();
    body["n"] = json!(3);
    let (status, three) = post(&url, &body).await;
    assert_eq!(status, 200, "{three}");
    let choices = three["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 6);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
    }
    // the same seed gives the same completions
    let (_, again) = post(&url, &body).await;
    assert_eq!(again["choices"], three["choices"]);
    // best_of 3, n 1: per prompt, the candidate with the best total logprob among the same three
    let mut body = base.clone();
    body["best_of"] = json!(3);
    let (status, best) = post(&url, &body).await;
    assert_eq!(status, 200, "{best}");
    let total = |c: &Value| -> f64 {
        c["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .sum()
    };
    for p in 0..2 {
        let group = &choices[p * 3..p * 3 + 3];
        let winner = group
            .iter()
            .max_by(|a, b| total(a).total_cmp(&total(b)))
            .unwrap();
        let got = &best["choices"][p];
        assert_eq!(got["index"], p);
        assert_eq!(got["token_ids"], winner["token_ids"]);
    }
    assert_eq!(best["usage"]["completion_tokens"], 36);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sequences_cut_the_text() {
    let server = TestServer::start(&[]);
    let url = server.url("/v1/completions");
    let case = &reference().cases[0];
    // a stop string from the middle of the known greedy text
    let full = &case.greedy_text;
    let stop: String = full.chars().skip(10).take(4).collect();
    let cut = full.find(&stop).unwrap();
    let mut body = greedy_body(case);
    body["stop"] = json!([stop, "never-there"]);
    for stream in [false, true] {
        body["stream"] = json!(stream);
        let (text, finish) = if stream {
            let (_, _, events) = post_stream(&url, &body).await;
            let chunks = &events[..events.len() - 1];
            let text: String = chunks
                .iter()
                .map(|c| c["choices"][0]["text"].as_str().unwrap())
                .collect();
            (
                text,
                chunks.last().unwrap()["choices"][0]["finish_reason"].clone(),
            )
        } else {
            let (_, resp) = post(&url, &body).await;
            (
                resp["choices"][0]["text"].as_str().unwrap().to_string(),
                resp["choices"][0]["finish_reason"].clone(),
            )
        };
        assert_eq!(text, full[..cut], "stream={stream}");
        assert_eq!(finish, "stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_prompts_and_batched_prompts() {
    let server = TestServer::start(&[]);
    let url = server.url("/v1/completions");
    let r = reference();
    let (a, b) = (&r.cases[0], &r.cases[3]);
    let body = json!({"model": MODEL, "prompt": [a.prompt_ids, b.prompt_ids], "max_tokens": 24,
        "temperature": 0, "return_token_ids": true});
    let (status, resp) = post(&url, &body).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(ids(&resp["choices"][0]["token_ids"]), a.greedy_ids);
    assert_eq!(ids(&resp["choices"][1]["token_ids"]), b.greedy_ids);
    assert_eq!(
        resp["usage"]["prompt_tokens"],
        a.prompt_ids.len() + b.prompt_ids.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_mode_is_configurable_and_echoed() {
    let server = TestServer::start(&["--default-mode", "contrast:4,1"]);
    let case = reference()
        .cases
        .into_iter()
        .find(|c| c.mode == "contrast:4,1")
        .unwrap();
    let mut body = greedy_body(&case);
    body.as_object_mut().unwrap().remove("multi_exit");
    let (status, resp) = post(&server.url("/v1/completions"), &body).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(ids(&resp["choices"][0]["token_ids"]), case.greedy_ids);
    assert_eq!(
        resp["multi_exit"],
        json!({"mode": "contrast", "name": "contrast:4,1", "upper": 4, "lower": 1, "alpha": 0.1, "minimum_candidates": 1})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_metrics_and_errors() {
    let server = TestServer::start(&[]);
    let (status, models) = get(&server.url("/v1/models")).await;
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["exit_layers"], json!([1, 2, 4]));
    assert_eq!(
        models["data"][0]["modes"],
        json!(["original", "exit", "contrast", "dola", "sled", "early_exit"])
    );
    let (status, health) = get(&server.url("/health")).await;
    assert_eq!((status, health), (200, json!({"status": "ok"})));
    let (status, metrics) = get(&server.url("/metrics")).await;
    assert_eq!(status, 200);
    assert!(metrics
        .as_str()
        .unwrap()
        .contains("exitserve_queue_depth 0"));

    let url = server.url("/v1/completions");
    let (status, e) = post(&url, &json!({"model": "gpt-4", "prompt": "x"})).await;
    assert_eq!(status, 404);
    assert_eq!(e["error"]["code"], "model_not_found");
    let (status, e) = post(
        &url,
        &json!({"model": MODEL, "prompt": "x", "multi_exit": {"mode": "exit", "layer": 3}}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(e["error"]["param"], "multi_exit.layer");
    assert_eq!(
        e["error"]["message"],
        "`multi_exit.layer` = 3 is not an exit layer of this model; available exits: [1, 2, 4]"
    );
    let (status, e) = post(&url, &json!({"model": MODEL, "prompt": "x", "suffix": "y"})).await;
    assert_eq!(
        (status, e["error"]["param"].clone()),
        (400, json!("suffix"))
    );
    let (status, e) = post(
        &url,
        &json!({"model": MODEL, "prompt": "x", "max_tokens": 300}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(e["error"]["code"], "context_length_exceeded");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("256") && msg.contains("300"), "{msg}");
    let (status, e) = get(&server.url("/v2/nothing")).await;
    assert_eq!(
        (status, e["error"]["code"].clone()),
        (404, json!("not_found"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guards_every_route_but_health_and_the_playground_assets() {
    let server = TestServer::start(&["--api-key", "sekret"]);
    let client = reqwest::Client::new();
    for path in ["/v1/models", "/metrics", "/openapi.yaml"] {
        let r = client.get(server.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_api_key");
        let r = client
            .get(server.url(path))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let r = client
            .get(server.url(path))
            .bearer_auth("sekret")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    assert_eq!(
        client
            .get(server.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = client
        .post(server.url("/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": "hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The page and its assets carry no data: a browser loads them before a key is typed.
    for (path, ctype, needle) in [
        ("/", "text/html; charset=utf-8", "<textarea id=\"prompt\""),
        (
            "/playground.js",
            "text/javascript; charset=utf-8",
            "/v1/completions",
        ),
        ("/playground.css", "text/css; charset=utf-8", ".completion"),
        ("/favicon.svg", "image/svg+xml", "<svg"),
        ("/favicon.ico", "image/svg+xml", "<svg"),
    ] {
        let r = client.get(server.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], ctype);
        assert!(r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("connect-src 'self'"));
        assert!(r.text().await.unwrap().contains(needle), "{path}");
    }
    // Only those: any other path still needs the key.
    for path in ["/index.html", "/playground.json", "//"] {
        let r = client.get(server.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
}
