//! Faults and overload: a panicking model step, disconnects in bulk, floods of streams, CORS.

use crate::common;

use common::client::{get, post, post_stream};
use common::server::TestServer;
use common::{multi_exit, reference, MODEL};
use exitserve::engine::{Fault, Phase};
use futures_util::StreamExt;
use serde_json::{json, Value};

const POISON: u32 = 666;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_model_fails_only_its_batch_and_the_engine_goes_on() {
    let server = TestServer::start_with(&[], |cfg| {
        cfg.batch.fault = Some(Fault {
            phase: Phase::Forward,
            token: POISON,
        })
    });
    let url = server.url("/v1/completions");
    let case = reference().cases[0].clone();
    let good = json!({"model": MODEL, "prompt": case.prompt, "max_tokens": 24, "temperature": 0,
        "return_token_ids": true});
    let (status, body) = post(
        &url,
        &json!({"model": MODEL, "prompt": [1, POISON, 3], "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["type"], "server_error");
    assert_eq!(
        body["error"]["message"], "internal server error",
        "no internals leak to the client"
    );
    // streaming: a request that fails before its first event gets the status too
    let (status, body) = post(
        &url,
        &json!({"model": MODEL, "prompt": [POISON], "max_tokens": 4, "stream": true}),
    )
    .await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["type"], "server_error");
    // the engine goes on: health, and correct tokens for the next requests
    assert_eq!(get(&server.url("/health")).await.0, 200);
    let (status, body) = post(&url, &good).await;
    assert_eq!(status, 200);
    assert_eq!(body["choices"][0]["token_ids"], json!(case.greedy_ids));
    let metrics = server.state.engine.render_metrics();
    assert!(
        metrics.contains("exitserve_requests_total{status=\"error\",mode=\"original\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_disconnects_mid_stream_leave_no_stuck_slots() {
    let server = TestServer::start(&["--max-batch-size", "16", "--max-queued-requests", "64"]);
    let url = server.url("/v1/completions");
    let client = reqwest::Client::new();
    let body = json!({"model": MODEL, "prompt": "a long, long tale", "max_tokens": 240, "ignore_eos": true,
        "stream": true, "temperature": 0.8, "multi_exit": {"mode": "exit", "layer": 2}});
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                let resp = client.post(&url).json(&body).send().await.unwrap();
                let mut stream = resp.bytes_stream();
                for _ in 0..(1 + i % 4) {
                    stream.next().await;
                }
                // abrupt: drop the connection mid-stream
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    server.wait_for_metric("exitserve_batch_size", 0.0).await;
    server.wait_for_metric("exitserve_queue_depth", 0.0).await;
    server
        .wait_for_metric("exitserve_cancellations_total", 32.0)
        .await;
    // every slot is usable again: a full batch of greedy requests returns the fixture ids
    let case = reference().cases[4].clone();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let url = url.clone();
            let b = json!({"model": MODEL, "prompt": case.prompt, "max_tokens": 24, "temperature": 0,
                "return_token_ids": true});
            tokio::spawn(async move { post(&url, &b).await })
        })
        .collect();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body["choices"][0]["token_ids"], json!(case.greedy_ids));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_at_several_times_capacity_has_no_5xx_and_recovers() {
    // capacity: 4 running + 4 queued; offer 48 requests, streaming and not, in mixed modes
    let server = TestServer::start(&["--max-batch-size", "4", "--max-queued-requests", "4"]);
    let url = server.url("/v1/completions");
    let cases = reference().cases;
    let tasks: Vec<_> = (0..48)
        .map(|i| {
            let case = cases[(i * 7) % cases.len()].clone();
            let url = url.clone();
            tokio::spawn(async move {
                let mode = multi_exit(&case.mode);
                let body = json!({"model": MODEL, "prompt": case.prompt, "max_tokens": 24, "temperature": 0,
                    "return_token_ids": true, "multi_exit": mode, "stream": i % 2 == 0});
                if i % 2 == 0 {
                    let (status, _, events) = post_stream(&url, &body).await;
                    let ids: Vec<Value> = events
                        .iter()
                        .filter(|e| e.get("choices").is_some_and(|c| !c.as_array().unwrap().is_empty()))
                        .flat_map(|e| e["choices"][0]["token_ids"].as_array().cloned().unwrap_or_default())
                        .collect();
                    let status = if status == 200 && events.iter().any(|e| e.get("error").is_some()) { 500 } else { status };
                    (status, json!(ids), case.greedy_ids)
                } else {
                    let (status, b) = post(&url, &body).await;
                    (status, b["choices"][0]["token_ids"].clone(), case.greedy_ids)
                }
            })
        })
        .collect();
    let (mut ok, mut rejected) = (0, 0);
    for t in tasks {
        let (status, ids, want) = t.await.unwrap();
        match status {
            200 => {
                ok += 1;
                assert_eq!(ids, json!(want));
            }
            429 => rejected += 1,
            other => panic!("status {other}"),
        }
    }
    assert!(ok >= 4 && rejected > 0, "ok {ok} rejected {rejected}");
    server.wait_for_metric("exitserve_batch_size", 0.0).await;
    server.wait_for_metric("exitserve_queue_depth", 0.0).await;
    let (status, _) = post(
        &url,
        &json!({"model": MODEL, "prompt": "recovered?", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_only_for_configured_origins() {
    let server = TestServer::start(&["--cors-allow-origin", "https://app.example"]);
    let client = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        client
            .request(reqwest::Method::OPTIONS, server.url("/v1/completions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,authorization",
            )
            .send()
    };
    let ok = preflight("https://app.example").await.unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let other = preflight("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    // without the flag: no CORS headers at all
    let plain = TestServer::start(&[]);
    let r = client
        .get(plain.url("/v1/models"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
}
