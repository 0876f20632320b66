//! Each finding of the resource-bounds review, reproduced at small scale on the tiny fixture
//! with low limits: the attack gets its 4xx, stays inside its budget, or fails alone, and the
//! server goes on serving everyone else.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::client::{get, post};
use common::server::TestServer;
use common::{reference, MODEL};
use exitserve::engine::request::{GenerateRequest, PromptInput};
use exitserve::engine::{Event, Fault, Phase};
use futures_util::StreamExt;
use serde_json::{json, Value};

const POISON: u32 = 666;

/// Reads until the server closes the connection; true when it did (EOF or reset) within
/// `limit`, false when the socket was still open then.
fn closed_by_server(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

fn connect(server: &TestServer) -> TcpStream {
    TcpStream::connect(server.base.trim_start_matches("http://")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_that_can_never_fit_gets_a_400_with_both_numbers() {
    let server = TestServer::start(&["--max-batch-size", "4", "--max-batch-total-tokens", "200"]);
    let url = server.url("/v1/completions");
    // 8 copies x (20 + 10) positions = 240 > 200
    let (status, body) = post(
        &url,
        &json!({"model": MODEL, "prompt": vec![11; 20], "max_tokens": 10, "n": 4, "best_of": 8}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "best_of", "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("8 sequences") && msg.contains("4"), "{msg}");
    let (status, body) = post(
        &url,
        &json!({"model": MODEL, "prompt": vec![11; 20], "max_tokens": 40, "n": 4}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "max_tokens", "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("240") && msg.contains("200"), "{msg}");
    // one that fits runs
    let (status, body) = post(
        &url,
        &json!({"model": MODEL, "prompt": vec![11; 20], "max_tokens": 30, "n": 4}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"].as_array().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_copy_counts_at_admission_so_the_batch_never_overshoots() {
    // 6 requests of n = 4 against a batch of 8 sequences, and of 2 x 80 KV positions each
    // against a budget of 400
    let server = TestServer::start(&["--max-batch-size", "8", "--max-batch-total-tokens", "400"]);
    let url = server.url("/v1/completions");
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let body = if i % 2 == 0 {
                    json!({"model": MODEL, "prompt": vec![11; 10], "max_tokens": 30, "n": 4,
                        "temperature": 0.8, "ignore_eos": true})
                } else {
                    json!({"model": MODEL, "prompt": vec![11; 10], "max_tokens": 70, "n": 2,
                        "temperature": 0.8, "ignore_eos": true})
                };
                post(&url, &body).await
            })
        })
        .collect();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    assert!(server.metric("exitserve_batch_size_peak") <= 8.0);
    assert!(server.metric("exitserve_kv_tokens_reserved_peak") <= 400.0);
    assert!(
        server.metric("exitserve_kv_tokens_reserved_peak") >= 160.0,
        "requests did run"
    );
    server
        .wait_for_metric("exitserve_kv_tokens_reserved", 0.0)
        .await;
    server.wait_for_metric("exitserve_batch_size", 0.0).await;
    server.wait_for_metric("exitserve_queue_depth", 0.0).await;
    // a batch of one still serves n = 1, and refuses n = 2 at once
    let one = TestServer::start(&["--max-batch-size", "1"]);
    let url = one.url("/v1/completions");
    let (status, body) = post(&url, &json!({"model": MODEL, "prompt": "hi", "n": 2})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "n");
    let (status, _) = post(&url, &json!({"model": MODEL, "prompt": "hi"})).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_fan_out_and_huge_texts_are_refused_before_any_tokenizing() {
    let server = TestServer::start(&["--max-body-bytes", "4000000"]);
    let url = server.url("/v1/completions");
    // 200,000 one-token prompts with best_of 8: the fan-out limit, before tokenizing
    let prompts = vec![vec![11u32]; 200_000];
    let (status, body) = post(
        &url,
        &json!({"model": MODEL, "prompt": prompts, "best_of": 8}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "prompt");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--max-sequences-per-request 64"));
    // 16 concurrent 1 MB texts: refused from their byte length, never tokenized
    let text = "lorem ipsum ".repeat(1 << 17);
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (url, text) = (url.clone(), text.clone());
            tokio::spawn(async move { post(&url, &json!({"model": MODEL, "prompt": text})).await })
        })
        .collect();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 400, "{body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains("at least") && msg.contains("bytes"), "{msg}");
    }
    let (status, _) = post(&url, &json!({"model": MODEL, "prompt": "still here"})).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_in_any_phase_fails_only_the_requests_it_touches() {
    let case = reference().cases[0].clone();
    for phase in [
        Phase::Admit,
        Phase::Plan,
        Phase::Score,
        Phase::Sample,
        Phase::Emit,
        Phase::Fork,
    ] {
        let server = TestServer::start_with(&[], |cfg| {
            cfg.batch.fault = Some(Fault {
                phase,
                token: POISON,
            })
        });
        let url = server.url("/v1/completions");
        // a victim streams while the poisoned request joins its batch
        let victim_body = json!({"model": MODEL, "prompt": "a victim", "max_tokens": 200,
            "ignore_eos": true, "temperature": 0, "stream": true});
        let resp = reqwest::Client::new()
            .post(&url)
            .json(&victim_body)
            .send()
            .await
            .unwrap();
        let mut victim = resp.bytes_stream();
        let mut text = String::from_utf8(victim.next().await.unwrap().unwrap().to_vec()).unwrap();
        let (status, body) = post(
            &url,
            &json!({"model": MODEL, "prompt": [11, POISON, 12], "max_tokens": 4, "n": 2,
                "temperature": 0.7}),
        )
        .await;
        assert_eq!(status, 500, "{phase:?}: {body}");
        assert_eq!(body["error"]["message"], "internal server error");
        while let Some(chunk) = victim.next().await {
            text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        }
        assert!(
            !text.contains("\"error\""),
            "{phase:?}: the victim failed: {text}"
        );
        assert!(text.trim_end().ends_with("data: [DONE]"), "{phase:?}");
        assert_eq!(
            text.matches("\"finish_reason\":\"length\"").count(),
            1,
            "{phase:?}"
        );
        // the engine goes on, with exact outputs
        assert_eq!(get(&server.url("/health")).await.0, 200);
        let (status, body) = post(
            &url,
            &json!({"model": MODEL, "prompt": case.prompt, "max_tokens": 24, "temperature": 0,
                "return_token_ids": true}),
        )
        .await;
        assert_eq!(status, 200, "{phase:?}");
        assert_eq!(body["choices"][0]["token_ids"], json!(case.greedy_ids));
        server.wait_for_metric("exitserve_batch_size", 0.0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_nobody_reads_pauses_without_losing_events_or_memory() {
    let server = TestServer::start(&["--stream-buffer-events", "2"]);
    let mut rx = server
        .submit(GenerateRequest {
            prompts: vec![PromptInput::Tokens(vec![11, 12, 13])],
            max_tokens: Some(100),
            n: Some(2),
            logprobs: Some(5),
            stream: true,
            ignore_eos: true,
            temperature: Some(0.9),
            ..Default::default()
        })
        .await;
    // nobody reads: both sequences pause once the channel is full
    server
        .wait_for_metric("exitserve_paused_sequences", 2.0)
        .await;
    // everyone else is served meanwhile
    let (status, body) = post(
        &server.url("/v1/completions"),
        &json!({"model": MODEL, "prompt": "next in line", "max_tokens": 8}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(server.metric("exitserve_paused_sequences"), 2.0);
    // the reader comes back: every event is there, in order
    let (mut tokens, mut ends, mut done) = ([0usize; 2], 0, false);
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token {
                candidate, logprob, ..
            } => {
                assert_eq!(logprob.unwrap().top.len(), 5);
                tokens[candidate] += 1;
            }
            Event::End { .. } => ends += 1,
            Event::Done { usage } => {
                assert_eq!(usage.completion_tokens, 200);
                done = true;
            }
            Event::Error(e) => panic!("{e}"),
            Event::Prompt { .. } => {}
            Event::Inspection { .. } => panic!("not an inspection"),
        }
    }
    assert_eq!((tokens, ends, done), ([100, 100], 2, true));
    server
        .wait_for_metric("exitserve_paused_sequences", 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_long_stops_are_matched_cheaply_and_exactly() {
    let server = TestServer::start(&[]);
    let url = server.url("/v1/completions");
    let case = reference().cases[0].clone();
    let (_, plain) = post(
        &url,
        &json!({"model": MODEL, "prompt": case.prompt, "max_tokens": 24, "temperature": 0}),
    )
    .await;
    let text = plain["choices"][0]["text"].as_str().unwrap().to_string();
    // a real stop in the middle of the greedy text, among 15 long ones that never match
    let cut = text.char_indices().nth(text.chars().count() / 2).unwrap().0;
    let stop: String = text[cut..].chars().take(2).collect();
    let mut stops: Vec<String> = (0..15)
        .map(|i| {
            format!("{i}{}", "never ".repeat(40))
                .chars()
                .take(256)
                .collect()
        })
        .collect();
    stops.push(stop.clone());
    let (status, body) = post(
        &url,
        &json!({"model": MODEL, "prompt": case.prompt, "max_tokens": 24, "temperature": 0,
            "stop": stops}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let got = body["choices"][0]["text"].as_str().unwrap();
    assert_eq!(got, &text[..text.find(&stop).unwrap()]);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_headed_connections_are_closed() {
    let idle = TestServer::start(&["--keep-alive-timeout", "0.5", "--header-read-timeout", "60"]);
    let mut s = connect(&idle);
    assert!(closed_by_server(&mut s, Duration::from_secs(20)), "idle");
    // a keep-alive connection is idle again after its response
    let mut s = connect(&idle);
    write!(s, "GET /health HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    assert!(
        closed_by_server(&mut s, Duration::from_secs(20)),
        "after a response"
    );
    assert!(idle.metric("exitserve_connections_timed_out_total") >= 2.0);

    let slow = TestServer::start(&["--keep-alive-timeout", "60", "--header-read-timeout", "0.5"]);
    // slowloris: a head that never ends
    let mut s = connect(&slow);
    write!(s, "POST /v1/completions HTTP/1.1\r\nhost: x\r\n").unwrap();
    assert!(
        closed_by_server(&mut s, Duration::from_secs(20)),
        "slow head"
    );
    // an idle connection is not a slow head: it stays (for its keep-alive time)
    let mut s = connect(&slow);
    assert!(
        !closed_by_server(&mut s, Duration::from_secs(2)),
        "idle closed early"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_too_slowly_gets_408() {
    let server = TestServer::start(&["--body-read-timeout", "0.5"]);
    let mut s = connect(&server);
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"model\":"
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    let resp = String::from_utf8_lossy(&buf[..n]);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("--body-read-timeout"), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_at_the_connection_cap_give_way_to_real_clients() {
    let server = TestServer::start(&["--max-connections", "3", "--keep-alive-timeout", "600"]);
    let mut idle: Vec<TcpStream> = (0..3).map(|_| connect(&server)).collect();
    server
        .wait_for_metric("exitserve_open_connections", 3.0)
        .await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let r = client.get(server.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let closed = idle
        .iter_mut()
        .map(|s| closed_by_server(s, Duration::from_millis(500)))
        .filter(|&c| c)
        .count();
    assert!(closed >= 1, "no idle connection gave way");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_expiry_ends_a_waiting_stream_with_503() {
    // a request nobody reads holds the only batch slot, so the stream below waits in the queue;
    // it has sent nothing yet, so its end is a status, as a whole response's is
    let server = TestServer::start(&["--max-batch-size", "1", "--stream-buffer-events", "1"]);
    let _held = server.hold_the_one_slot().await;
    let url = server.url("/v1/completions");
    let stream = tokio::spawn(async move {
        post(
            &url,
            &json!({"model": MODEL, "prompt": "waiting", "max_tokens": 5, "stream": true}),
        )
        .await
    });
    server.wait_for_metric("exitserve_queue_depth", 1.0).await;
    server.cut();
    let (status, body) = stream.await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "shutting_down", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_is_case_insensitive_and_the_key_is_not() {
    let server = TestServer::start(&["--api-key", "Sekret"]);
    let client = reqwest::Client::new();
    for (header, want) in [
        ("Bearer Sekret", 200),
        ("bearer Sekret", 200),
        ("BEARER  Sekret ", 200),
        ("Bearer sekret", 401),
        ("Basic Sekret", 401),
        ("Sekret", 401),
    ] {
        let r = client
            .get(server.url("/v1/models"))
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "{header:?}");
    }
}

#[test]
fn bad_cors_origins_fail_at_startup_and_a_wildcard_is_allowed() {
    use clap::Parser;
    use exitserve::config::{Args, Settings};
    let model = common::fixture_dir(common::FIXTURE);
    for (origin, ok) in [
        ("https://app.example", true),
        ("http://localhost:3000", true),
        ("*", true),
        ("https://app.example/", false),
        ("app.example", false),
        ("ftp://app.example", false),
        ("https://bad host", false),
    ] {
        let argv = [
            "exitserve",
            "--model",
            model.to_str().unwrap(),
            "--cors-allow-origin",
            origin,
        ];
        let s = Settings::resolve(Args::try_parse_from(argv).unwrap()).unwrap();
        let r = exitserve::server::build_state(&s, exitserve::http::Shutdown::never());
        match (r, ok) {
            (Ok(_), true) => {}
            (Err(e), false) => {
                let e = e.to_string();
                assert!(
                    e.contains("--cors-allow-origin") && e.contains(origin),
                    "{e}"
                );
            }
            (Ok(_), false) => panic!("{origin:?} accepted"),
            (Err(e), true) => panic!("{origin:?} refused: {e}"),
        }
    }
}

/// `/detokenize` and `/tokenize` are bounded by the context length (before any work where the
/// length alone tells), and `/v1/inspect` of every position by `--max-inspect-positions`:
/// 174,000 ids once made a 22 MB response each, and one inspection of 2,047 positions ran for
/// 39 s beside everyone's completions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_routes_and_inspections_are_bounded() {
    let server = TestServer::start(&["--max-inspect-positions", "8"]);
    let detokenize = server.url("/detokenize");
    let (status, body) = post(&detokenize, &json!({"tokens": vec![15496; 257]})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "tokens");
    assert_eq!(
        body["error"]["message"],
        "`tokens` has 257 ids, more than this model's context length (256)"
    );
    let (status, body) = post(&detokenize, &json!({"tokens": vec![15496; 256]})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["prompt"], json!("Hello".repeat(256)));

    let tokenize = server.url("/tokenize");
    let (status, body) = post(&tokenize, &json!({"prompt": "a".repeat(600_000)})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "prompt");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("`prompt` has at least ")
            && message
                .ends_with("(600000 bytes) tokens, more than this model's context length (256)"),
        "{message}"
    );
    let (status, body) = post(&tokenize, &json!({"prompt": " a".repeat(257)})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"]["message"],
        "`prompt` has 257 tokens, more than this model's context length (256)"
    );
    let (status, body) = post(&tokenize, &json!({"prompt": " a".repeat(256)})).await;
    assert_eq!((status, body["count"].clone()), (200, json!(256)));

    let inspect = server.url("/v1/inspect");
    let prompt: Vec<u32> = (1..=9).collect();
    let (status, body) = post(
        &inspect,
        &json!({"model": MODEL, "prompt": prompt, "positions": "all"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "positions");
    let (status, body) = post(
        &inspect,
        &json!({"model": MODEL, "prompt": &prompt[..8], "positions": "all"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["positions"].as_array().unwrap().len(), 8);
    // the last position of the long prompt is one position
    let (status, _) = post(&inspect, &json!({"model": MODEL, "prompt": prompt})).await;
    assert_eq!(status, 200);
    let (status, card) = get(&server.url(&format!("/v1/models/{MODEL}"))).await;
    assert_eq!(
        (status, card["max_inspect_positions"].clone()),
        (200, json!(8))
    );
}

/// A body declared larger than `--max-body-bytes` is refused at once, from its
/// `Content-Length`: no `100 Continue` to a client that asks for one, and no wait for bytes
/// that would only be dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_content_length_gets_413_before_the_body() {
    let server = TestServer::start(&[]);
    for expect in ["Expect: 100-continue\r\n", ""] {
        let mut s = connect(&server);
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10485760\r\n{expect}\r\n"
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("payload_too_large") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 413"), "{expect:?}: {text}");
        assert!(!text.contains("100 Continue"), "{expect:?}: {text}");
    }
    assert_eq!(get(&server.url("/health")).await.0, 200);
}

/// Opens a connection whose receive buffer is small, so that a large response waits in the
/// server rather than in the kernel, and sends `POST path` with `body`.
async fn small_window_post(server: &TestServer, path: &str, body: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = server.base.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    s
}

/// A large response reaches a client that reads it slowly, whole: the request counts as in
/// flight until the last byte is written (the keep-alive timeout once cut a 22 MB body read at
/// 300 KB/s after 16.75 MB; on loopback the kernel's own buffers, up to 4 MB, may hide that,
/// so `http::serve`'s unit test checks the bookkeeping itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_gets_its_response_whole() {
    use tokio::io::AsyncReadExt;
    let server = TestServer::start(&[
        "--keep-alive-timeout",
        "1",
        "--max-inspect-positions",
        "256",
    ]);
    // every position of a 255-token prompt, 20 alternatives per head: over a megabyte
    let prompt: Vec<u32> = (100..355).collect();
    let body = json!({"model": MODEL, "prompt": prompt, "positions": "all", "top_logprobs": 20})
        .to_string();
    let mut s = small_window_post(&server, "/v1/inspect", &body).await;
    let (mut got, mut buf) = (Vec::new(), vec![0u8; 32 << 10]);
    let mut first = None;
    loop {
        let n = s.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        got.extend_from_slice(&buf[..n]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = String::from_utf8(got).unwrap();
    let (head, json_body) = text.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(json_body.len() > 1 << 20, "{}", json_body.len());
    let v: Value = serde_json::from_str(json_body).expect("the whole body");
    assert_eq!(v["positions"].as_array().unwrap().len(), 255);
    let reading = first.unwrap().elapsed();
    assert!(
        reading > Duration::from_secs(1),
        "read slowly enough to outlast the keep-alive timeout: {reading:?}"
    );
    assert_eq!(get(&server.url("/health")).await.0, 200);
}

/// One peer cannot hold every connection slot: past `--max-connections-per-peer` its new
/// connections are closed at once (it once held all 1,024 with half-sent heads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_holds_at_most_its_share_of_connections() {
    let server = TestServer::start(&["--max-connections-per-peer", "2"]);
    let mut held: Vec<TcpStream> = (0..2).map(|_| connect(&server)).collect();
    for s in &mut held {
        s.write_all(b"POST /v1/completions HTTP/1.1\r\n").unwrap(); // a head, half sent
    }
    server
        .wait_for_metric("exitserve_open_connections", 2.0)
        .await;
    let mut third = connect(&server);
    assert!(
        closed_by_server(&mut third, Duration::from_secs(5)),
        "a third connection from the same peer stayed open"
    );
    assert_eq!(server.metric("exitserve_connections_refused_total"), 1.0);
    held.pop();
    server
        .wait_for_metric("exitserve_open_connections", 1.0)
        .await;
    assert_eq!(get(&server.url("/health")).await.0, 200);
}
