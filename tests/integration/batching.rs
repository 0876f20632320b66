//! The batching engine through the real server: mixed-mode batches equal single runs,
//! disconnects free their slots, floods get 429 and the server recovers, early exits skip
//! the upper layers.

use crate::common;

use std::time::Duration;

use common::client::post;
use common::server::TestServer;
use common::{greedy_body, ids, reference, MODEL};
use exitserve::engine::request::{GenerateRequest, PromptInput};
use futures_util::StreamExt;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_54_cases_concurrently_equal_the_reference() {
    let server = TestServer::start(&["--max-batch-size", "32"]);
    let url = server.url("/v1/completions");
    let cases = reference().cases;
    let tasks: Vec<_> = cases
        .iter()
        .map(|c| {
            let (url, body) = (url.clone(), greedy_body(c));
            tokio::spawn(async move { post(&url, &body).await })
        })
        .collect();
    for (case, task) in cases.iter().zip(tasks) {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            ids(&body["choices"][0]["token_ids"]),
            case.greedy_ids,
            "{} {:?}",
            case.mode,
            case.prompt
        );
    }
    let metrics = server.state.engine.render_metrics();
    // the batches really were shared: far fewer forward passes than tokens generated
    let steps = server.metric("exitserve_model_steps_total");
    assert!(steps < 54.0 * 24.0 / 4.0, "{steps} steps\n{metrics}");
    server.wait_for_metric("exitserve_batch_size", 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_is_the_same_alone_and_among_30_others() {
    let server = TestServer::start(&[]);
    let url = server.url("/v1/completions");
    let probe = json!({"model": MODEL, "prompt": "Zürich café", "max_tokens": 20, "temperature": 0.9,
        "top_p": 0.95, "seed": 1234, "return_token_ids": true,
        "multi_exit": {"mode": "contrast", "upper": "original", "lower": 2}});
    let (_, alone) = post(&url, &probe).await;
    let cases = reference().cases;
    let mut tasks: Vec<_> = cases
        .iter()
        .take(30)
        .map(|c| {
            let (url, mut body) = (url.clone(), greedy_body(c));
            body["temperature"] = json!(1.0);
            tokio::spawn(async move { post(&url, &body).await })
        })
        .collect();
    let (u, p) = (url.clone(), probe.clone());
    tasks.insert(15, tokio::spawn(async move { post(&u, &p).await }));
    let results: Vec<_> = futures_util::future::join_all(tasks).await;
    let (status, crowded) = results[15].as_ref().unwrap();
    assert_eq!(*status, 200);
    assert_eq!(
        crowded["choices"][0]["token_ids"],
        alone["choices"][0]["token_ids"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_clients_free_their_slots() {
    let server = TestServer::start(&["--max-batch-size", "8"]);
    let url = server.url("/v1/completions");
    let client = reqwest::Client::new();
    let long = |stream: bool| {
        json!({"model": MODEL, "prompt": "tell me a long story", "max_tokens": 230,
        "ignore_eos": true, "stream": stream, "multi_exit": {"mode": "contrast", "upper": 4, "lower": 1}})
    };
    // streaming clients read one chunk and hang up
    for _ in 0..4 {
        let resp = client.post(&url).json(&long(true)).send().await.unwrap();
        let mut body = resp.bytes_stream();
        body.next().await.unwrap().unwrap();
        drop(body);
    }
    // non-streaming clients give up after a moment
    for _ in 0..4 {
        let r = client
            .post(&url)
            .json(&long(false))
            .timeout(Duration::from_millis(30))
            .send()
            .await;
        assert!(r.is_err());
    }
    server.wait_for_metric("exitserve_batch_size", 0.0).await;
    server
        .wait_for_metric("exitserve_cancellations_total", 8.0)
        .await;
    let generated = server.metric("exitserve_generated_tokens_total");
    assert!(
        generated < 8.0 * 230.0 / 2.0,
        "{generated} tokens generated for nobody"
    );
    // the freed slots serve new requests
    let (status, _) = post(
        &url,
        &json!({"model": MODEL, "prompt": "hi", "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_gets_429_then_the_server_recovers() {
    let server = TestServer::start(&["--max-batch-size", "2", "--max-queued-requests", "3"]);
    let url = server.url("/v1/completions");
    let case = reference().cases[2].clone();
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let (url, body, client) = (url.clone(), greedy_body(&case), client.clone());
            tokio::spawn(async move {
                let r = client.post(&url).json(&body).send().await.unwrap();
                let status = r.status().as_u16();
                let retry = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                (status, retry, r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    // health answers while flooded
    let health = client.get(server.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let mut ok = 0;
    let mut rejected = 0;
    for t in tasks {
        let (status, retry, body) = t.await.unwrap();
        match status {
            200 => {
                ok += 1;
                assert_eq!(ids(&body["choices"][0]["token_ids"]), case.greedy_ids);
            }
            429 => {
                rejected += 1;
                assert_eq!(retry.as_deref(), Some("1"));
                assert_eq!(body["error"]["type"], "rate_limit_error");
                assert_eq!(body["error"]["code"], "rate_limit_exceeded");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(ok >= 3 && rejected > 0, "ok {ok}, rejected {rejected}");
    assert_eq!(server.metric("exitserve_rejections_total"), rejected as f64);
    server.wait_for_metric("exitserve_queue_depth", 0.0).await;
    server.wait_for_metric("exitserve_batch_size", 0.0).await;
    // full recovery: a burst within the queue's capacity all succeeds
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let (url, body) = (url.clone(), greedy_body(&case));
            tokio::spawn(async move { post(&url, &body).await })
        })
        .collect();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(ids(&body["choices"][0]["token_ids"]), case.greedy_ids);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_mode_sequence_skips_the_layers_above_it() {
    let server = TestServer::start(&[]);
    let url = server.url("/v1/completions");
    let body = |mode: Value| {
        json!({"model": MODEL, "prompt": [[1, 2, 3]], "max_tokens": 5, "temperature": 0,
        "ignore_eos": true, "multi_exit": mode})
    };
    let layers = server.state.engine.validator().limits().num_layers as f64;
    let count = || server.metric("exitserve_block_evaluations_total");
    let before = count();
    post(&url, &body(json!({"mode": "exit", "layer": 1}))).await;
    // one prefill step and 4 decode steps, one block each
    assert_eq!(count() - before, 5.0);
    let before = count();
    post(
        &url,
        &body(json!({"mode": "contrast", "upper": 2, "lower": 1})),
    )
    .await;
    assert_eq!(count() - before, 10.0);
    let before = count();
    post(&url, &body(json!({"mode": "original"}))).await;
    assert_eq!(count() - before, 5.0 * layers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_ends_long_requests_with_a_clear_error() {
    let server = TestServer::start(&["--request-timeout", "0.05"]);
    let url = server.url("/v1/completions");
    let (status, body) = post(
        &url,
        &json!({"model": MODEL, "prompt": "x", "max_tokens": 250, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "request_timeout");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--request-timeout"));
    server.wait_for_metric("exitserve_batch_size", 0.0).await;
}

/// Waiting requests join the batch by `priority` (lower first), in arrival order among
/// equals: with the one batch slot held by a long request, requests sent with priorities 5,
/// -5 and 0, in that order, run -5, 0, 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_join_by_priority_then_arrival() {
    let server = TestServer::start(&["--max-batch-size", "1"]);
    let url = server.url("/v1/completions");
    let long = server.hold_the_one_slot().await;
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, priority) in [5, -5, 0].into_iter().enumerate() {
        let (url, order) = (url.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let (status, body) = post(
                &url,
                // long enough that the order they finish in cannot be a client's jitter
                &json!({"model": MODEL, "prompt": [12], "max_tokens": 64, "ignore_eos": true,
                    "priority": priority}),
            )
            .await;
            order.lock().unwrap().push(priority);
            (status, body)
        }));
        server
            .wait_for_metric("exitserve_queue_depth", (i + 1) as f64)
            .await;
    }
    drop(long);
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(*order.lock().unwrap(), vec![-5, 0, 5]);
}

/// Among equal priorities the queue admits the earliest due, a request's arrival plus
/// `--queue-slack-per-token-ms` per position it reserves: a short request sent just after a
/// long one, both waiting for the one batch slot, runs first; with no slack the long one
/// (first come) does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_requests_pass_long_ones_within_the_long_ones_slack() {
    for (slack, first) in [("10", "short"), ("0", "long")] {
        let server =
            TestServer::start(&["--max-batch-size", "1", "--queue-slack-per-token-ms", slack]);
        let url = server.url("/v1/completions");
        let holder = server.hold_the_one_slot().await;
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // the long one first: due 10 ms x 201 positions after it arrived; the short one
        // is due 10 ms x 5 after its own arrival, long before
        for (i, (name, max_tokens)) in [("long", 200), ("short", 4)].into_iter().enumerate() {
            let (url, order) = (url.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let (status, body) = post(
                    &url,
                    &json!({"model": MODEL, "prompt": [12], "max_tokens": max_tokens,
                        "ignore_eos": true}),
                )
                .await;
                order.lock().unwrap().push(name);
                (status, body)
            }));
            server
                .wait_for_metric("exitserve_queue_depth", (i + 1) as f64)
                .await;
        }
        drop(holder);
        for t in tasks {
            let (status, body) = t.await.unwrap();
            assert_eq!(status, 200, "{body}");
        }
        assert_eq!(order.lock().unwrap()[0], first, "slack {slack}");
    }
}

/// The queue's bound keeps priority: when every place is taken, a request of a higher priority
/// than one that waits gets in and the waiting request that would be served last leaves with
/// a 429 naming why; one of the same or a lower priority is refused (429) as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_turns_away_its_lowest_priority_for_a_higher_one() {
    let server = TestServer::start(&[
        "--max-batch-size",
        "1",
        "--max-queued-requests",
        "2",
        "--stream-buffer-events",
        "1",
    ]);
    let url = server.url("/v1/completions");
    let holder = server.hold_the_one_slot().await;

    let send = |priority: i64, tag: u32| {
        let url = url.clone();
        tokio::spawn(async move {
            let body = json!({"model": MODEL, "prompt": [12, tag], "max_tokens": 2,
                "priority": priority});
            (tag, post(&url, &body).await)
        })
    };
    let mut queued = Vec::new();
    for (i, tag) in [1, 2].into_iter().enumerate() {
        queued.push(send(5, tag));
        server
            .wait_for_metric("exitserve_queue_depth", (i + 1) as f64)
            .await;
    }
    // full of priority 5: another 5 is refused at once
    let (_, (status, body)) = send(5, 3).await.unwrap();
    assert_eq!(status, 429, "{body}");
    assert!(!body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("higher priority"));
    // a 0 gets in; the later of the two 5s leaves, then the other
    let mut zeros = Vec::new();
    for tag in [4, 5] {
        zeros.push(send(0, tag));
        let (gone, (status, body)) = queued.pop().unwrap().await.unwrap();
        assert_eq!((gone, status), (2 + 4 - tag, 429), "{body}");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("a request of a higher priority took this one's place"));
        server.wait_for_metric("exitserve_queue_depth", 2.0).await;
    }
    // full of 0s: a 0, and a 5, are refused
    for priority in [0, 5] {
        let (_, (status, body)) = send(priority, 6).await.unwrap();
        assert_eq!(status, 429, "{body}");
    }
    assert_eq!(server.metric("exitserve_rejections_total"), 5.0);
    // the holder leaves: the two 0s run
    drop(holder);
    for t in zeros {
        let (_, (status, body)) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    server.wait_for_metric("exitserve_queue_depth", 0.0).await;
    server.wait_for_metric("exitserve_batch_size", 0.0).await;
}

/// A waiting request whose client leaves gives back its queue place while it waits, not only
/// once its turn comes: here it waits behind one of higher priority, itself waiting for the
/// one batch slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_request_whose_client_left_leaves_the_queue() {
    let server = TestServer::start(&["--max-batch-size", "1"]);
    let url = server.url("/v1/completions");
    let send = |body: Value| {
        let url = url.clone();
        tokio::spawn(async move { post(&url, &body).await })
    };
    let long = server.hold_the_one_slot().await;
    let patient = send(json!({"model": MODEL, "prompt": [12], "max_tokens": 2, "priority": -10}));
    server.wait_for_metric("exitserve_queue_depth", 1.0).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let gone = impatient
        .post(&url)
        .json(&json!({"model": MODEL, "prompt": [13], "max_tokens": 2, "priority": 10}))
        .send()
        .await;
    assert!(gone.is_err(), "the client gave up first");
    server.wait_for_metric("exitserve_queue_depth", 1.0).await;
    assert_eq!(
        server.metric("exitserve_batch_size"),
        1.0,
        "the long request still runs"
    );
    drop(long);
    assert_eq!(patient.await.unwrap().0, 200);
}

/// A request of higher priority that finds the batch full preempts the running request of
/// the lowest priority (the latest due among equals); the preempted request recomputes its
/// cache when its turn comes again (its prompt's whole blocks from the prefix cache) and ends
/// exactly as it would have alone (tokens and
/// logprobs, greedy, seeded sampling with `n` = 2, speculative), on both architectures, in
/// f32, bf16 and int8; on the batched attention path, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempted_requests_end_as_they_would_have() {
    use common::ARCHS;
    for f in ARCHS {
        for flags in [
            ["--dtype", "f32"],
            ["--dtype", "bf16"],
            ["--dtype", "int8"],
            ["--attention", "batched"],
        ] {
            let dtype = flags.join(" ");
            // KV room for the prefix cache to keep the victims' prompt beside them
            let mut argv = vec!["--max-batch-size", "2", "--max-batch-total-tokens", "1024"];
            argv.extend(flags);
            let server = TestServer::start_model(&f.dir(), &argv);
            let url = server.url("/v1/completions");
            let body = |extra: Value| {
                // two whole blocks of the prefix cache: a resumed sequence takes them there
                let mut b = json!({"model": f.name, "prompt": (100..140).collect::<Vec<u32>>(),
                    "max_tokens": 80, "ignore_eos": true, "logprobs": 2,
                    "return_token_ids": true});
                b.as_object_mut()
                    .unwrap()
                    .extend(extra.as_object().unwrap().clone());
                b
            };
            let greedy = body(json!({"temperature": 0}));
            let (_, card) =
                common::client::get(&server.url(&format!("/v1/models/{}", f.name))).await;
            let lowest = card["exit_layers"][0].clone();
            let speculative = body(json!({"temperature": 0, "speculative": true,
                "multi_exit": {"mode": "original"}}));
            let sampled = body(json!({"temperature": 0.9, "top_p": 0.9, "seed": 3, "n": 2,
                "multi_exit": {"mode": "contrast", "upper": "original", "lower": lowest}}));
            let urgent = json!({"model": f.name, "prompt": [5, 6], "max_tokens": 4,
                "temperature": 0, "priority": -1});
            let choices = |v: &Value| -> Vec<(Value, Value)> {
                v["choices"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| (c["token_ids"].clone(), c["logprobs"].clone()))
                    .collect()
            };
            for victims in [vec![greedy, speculative], vec![sampled]] {
                let mut alone = Vec::new();
                for v in &victims {
                    let (status, out) = post(&url, v).await;
                    assert_eq!(status, 200, "{out}");
                    alone.push(choices(&out));
                }
                let generated = server.metric("exitserve_generated_tokens_total");
                let preempted = server.metric("exitserve_preemptions_total");
                let hits = server.metric("exitserve_prefix_cache_hit_tokens_total");
                let tasks: Vec<_> = victims
                    .iter()
                    .map(|v| {
                        let (url, v) = (url.clone(), v.clone());
                        tokio::spawn(async move { post(&url, &v).await })
                    })
                    .collect();
                // the batch is full and every victim is decoding
                for _ in 0..500 {
                    if server.metric("exitserve_generated_tokens_total") >= generated + 20.0 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let (status, out) = post(&url, &urgent).await;
                assert_eq!(status, 200, "{out}");
                let done_early = tasks.iter().filter(|t| t.is_finished()).count();
                assert!(
                    done_early < victims.len(),
                    "{} {dtype}: the urgent request waited for every victim",
                    f.name
                );
                assert!(
                    server.metric("exitserve_preemptions_total") > preempted,
                    "{} {dtype}: nothing was preempted",
                    f.name
                );
                for (t, want) in tasks.into_iter().zip(&alone) {
                    let (status, out) = t.await.unwrap();
                    assert_eq!(status, 200, "{out}");
                    let got = choices(&out);
                    if flags[0] == "--attention" {
                        // The batched path (a GPU's) attends a recomputed chunk as one padded
                        // product, within float rounding of the decode steps (as its
                        // verifying passes are): on this random model's near-ties a token may
                        // turn, so the request only has to end whole.
                        for ((ids, _), (want_ids, _)) in got.iter().zip(want) {
                            assert_eq!(
                                ids.as_array().unwrap().len(),
                                want_ids.as_array().unwrap().len(),
                                "{} {dtype}",
                                f.name
                            );
                        }
                        continue;
                    }
                    assert_eq!(
                        &got, want,
                        "{} {dtype}: a preempted request ended otherwise",
                        f.name
                    );
                }
                // each admission takes the 32 cached prompt positions; a resume takes them too
                let hit = server.metric("exitserve_prefix_cache_hit_tokens_total") - hits;
                assert!(
                    hit > 32.0 * victims.len() as f64,
                    "{} {dtype}: no resume took the cached prompt ({hit})",
                    f.name
                );
            }
            server.wait_for_metric("exitserve_batch_size", 0.0).await;
        }
    }
}

/// A preempted request whose client leaves while it waits for its turn ends there (counted
/// as cancelled) and never comes back into the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_request_whose_client_left_ends_while_it_waits() {
    let server = TestServer::start(&["--max-batch-size", "1", "--stream-buffer-events", "1"]);
    let url = server.url("/v1/completions");
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let victim = {
        let url = url.clone();
        tokio::spawn(async move {
            impatient
                .post(&url)
                .json(&json!({"model": MODEL, "prompt": [11], "max_tokens": 250,
                    "ignore_eos": true}))
                .send()
                .await
        })
    };
    server.wait_for_metric("exitserve_batch_size", 1.0).await;
    let cancelled = server.metric("exitserve_cancellations_total");
    // The urgent request: a stream nobody reads, so that it holds the one slot (paused)
    // for as long as this test needs, however fast the model decodes.
    let urgent = server
        .submit(GenerateRequest {
            prompts: vec![PromptInput::Tokens(vec![12])],
            max_tokens: Some(250),
            stream: true,
            ignore_eos: true,
            logprobs: Some(5),
            priority: Some(-1),
            ..Default::default()
        })
        .await;
    server
        .wait_for_metric("exitserve_preemptions_total", 1.0)
        .await;
    assert_eq!(server.metric("exitserve_requests_preempted"), 1.0);
    assert!(
        victim.await.unwrap().is_err(),
        "the client gave up while parked"
    );
    // ended while it waited: the urgent request still holds the one slot
    server
        .wait_for_metric("exitserve_cancellations_total", cancelled + 1.0)
        .await;
    assert_eq!(server.metric("exitserve_requests_preempted"), 0.0);
    assert_eq!(server.metric("exitserve_batch_size"), 1.0, "the urgent one");
    drop(urgent);
    server.wait_for_metric("exitserve_batch_size", 0.0).await;
    assert_eq!(
        server.metric("exitserve_cancellations_total"),
        cancelled + 2.0,
        "the victim once, then the urgent one whose reader left"
    );
    assert_eq!(server.metric("exitserve_requests_running"), 0.0);
}

/// Beside a sequence of a higher priority a step carries at most
/// `--max-sequences-beside-priority` of a lower one: the others sit it out, taking turns
/// (`exitserve_priority_yields_total`), and every request still ends exactly as it would have
/// alone (greedy, seeded sampling in contrast mode, speculative).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lower_priorities_take_turns_beside_a_higher_one() {
    let server = TestServer::start(&[
        "--max-batch-size",
        "4",
        "--max-sequences-beside-priority",
        "1",
    ]);
    let url = server.url("/v1/completions");
    let body = |prompt: u32, max_tokens: u32, extra: Value| {
        let mut b = json!({"model": MODEL, "prompt": [prompt, prompt + 1], "max_tokens": max_tokens,
            "ignore_eos": true, "logprobs": 2, "return_token_ids": true});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    let lower = [
        body(10, 200, json!({"temperature": 0})),
        body(
            20,
            200,
            json!({"temperature": 0.9, "seed": 7,
            "multi_exit": {"mode": "contrast", "upper": "original", "lower": 2}}),
        ),
        body(30, 200, json!({"temperature": 0, "speculative": true})),
    ];
    let urgent = body(40, 30, json!({"temperature": 0, "priority": -1}));
    let outcome = |v: &Value| {
        (
            v["choices"][0]["token_ids"].clone(),
            v["choices"][0]["logprobs"].clone(),
        )
    };
    let mut alone = Vec::new();
    for b in lower.iter().chain([&urgent]) {
        let (status, out) = post(&url, b).await;
        assert_eq!(status, 200, "{out}");
        alone.push(outcome(&out));
    }
    let generated = server.metric("exitserve_generated_tokens_total");
    let yields = server.metric("exitserve_priority_yields_total");
    let tasks: Vec<_> = lower
        .iter()
        .map(|b| {
            let (url, b) = (url.clone(), b.clone());
            tokio::spawn(async move { post(&url, &b).await })
        })
        .collect();
    server
        .wait_for_metric_at_least("exitserve_generated_tokens_total", generated + 6.0)
        .await;
    let (status, out) = post(&url, &urgent).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(outcome(&out), alone[3], "the urgent request");
    // Its 30 steps each carried one of the three others (none can finish in them: 200 tokens
    // each, 30 between them); the other two sat each out.
    let sat_out = server.metric("exitserve_priority_yields_total") - yields;
    assert!(sat_out >= 2.0 * 29.0, "{sat_out} yields");
    for (t, want) in tasks.into_iter().zip(&alone) {
        let (status, out) = t.await.unwrap();
        assert_eq!(status, 200, "{out}");
        assert_eq!(
            &outcome(&out),
            want,
            "a request that took turns ended otherwise"
        );
    }
}
