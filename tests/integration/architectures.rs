//! Every feature on both architectures (GPT-Neo and GPT-2) through the real server: all 54
//! reference cases at once by model id (mixed-mode batching, presets), streaming, echo
//! scoring equal to the reference's `.scoring.json`, and `/v1/inspect`.

use crate::common;

use common::client::{get, post, post_stream};
use common::server::TestServer;
use common::{ids, Fixture, ARCHS};
use serde_json::{json, Value};

fn start(f: Fixture) -> TestServer {
    TestServer::start_model(
        &f.dir(),
        &[
            "--max-batch-size",
            "64",
            "--mode-preset",
            &format!("deep={}", f.modes().last().expect("modes")),
        ],
    )
}

/// `exit:2` -> `NAME:exit-2`, `contrast:6,2` -> `NAME:contrast-6-2`.
fn model_id(f: Fixture, mode: &str) -> String {
    format!("{}:{}", f.name, mode.replace([':', ','], "-"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_54_cases_at_once_by_model_id_equal_the_reference() {
    for f in ARCHS {
        let server = start(f);
        let url = server.url("/v1/completions");
        let cases = f.reference().cases;
        let tasks: Vec<_> = cases
            .iter()
            .map(|c| {
                let body = json!({"model": model_id(f, &c.mode), "prompt": c.prompt,
                    "max_tokens": c.greedy_ids.len(), "temperature": 0, "return_token_ids": true});
                let url = url.clone();
                tokio::spawn(async move { post(&url, &body).await })
            })
            .collect();
        for (case, task) in cases.iter().zip(tasks) {
            let (status, body) = task.await.unwrap();
            assert_eq!(status, 200, "{body}");
            assert_eq!(
                ids(&body["choices"][0]["token_ids"]),
                case.greedy_ids,
                "{} {} {:?}",
                f.name,
                case.mode,
                case.prompt
            );
            assert_eq!(body["choices"][0]["text"], json!(case.greedy_text));
        }
        // they really shared steps
        let steps = server.metric("exitserve_model_steps_total");
        assert!(steps < 54.0 * 24.0 / 4.0, "{} {steps} steps", f.name);

        // the models list holds every head's mode id and the preset
        let (status, list) = get(&server.url("/v1/models")).await;
        assert_eq!(status, 200);
        let listed: Vec<&str> = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        for mode in f.modes().iter().filter(|m| !m.starts_with("contrast")) {
            let id = model_id(f, mode);
            assert!(listed.contains(&id.as_str()), "{id} not in {listed:?}");
        }
        let preset = format!("{}:deep", f.name);
        assert!(listed.contains(&preset.as_str()), "{listed:?}");
        let last = f.modes().last().unwrap().clone();
        let case = cases.iter().find(|c| c.mode == last).unwrap();
        let (status, by_preset) = post(
            &url,
            &json!({"model": preset, "prompt": case.prompt, "max_tokens": case.greedy_ids.len(),
                "temperature": 0, "return_token_ids": true}),
        )
        .await;
        assert_eq!(status, 200, "{by_preset}");
        assert_eq!(ids(&by_preset["choices"][0]["token_ids"]), case.greedy_ids);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_carry_the_reference_tokens() {
    for f in ARCHS {
        let server = start(f);
        let url = server.url("/v1/completions");
        for case in f.reference().cases.iter().step_by(7) {
            let body = json!({"model": model_id(f, &case.mode), "prompt": case.prompt,
                "max_tokens": case.greedy_ids.len(), "temperature": 0, "stream": true,
                "return_token_ids": true});
            let (status, _, events) = post_stream(&url, &body).await;
            assert_eq!(status, 200);
            let streamed: Vec<u32> = events
                .iter()
                .filter_map(|e| e["choices"][0]["token_ids"].as_array())
                .flatten()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let text: String = events
                .iter()
                .filter_map(|e| e["choices"][0]["text"].as_str())
                .collect();
            assert_eq!(streamed, case.greedy_ids, "{} {}", f.name, case.mode);
            assert_eq!(text, case.greedy_text, "{} {}", f.name, case.mode);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_scores_equal_the_reference_in_every_mode() {
    for f in ARCHS {
        let server = start(f);
        let url = server.url("/v1/completions");
        let echo = f.scoring()["echo"].as_array().unwrap().clone();
        // every entry at once: the scoring requests batch with each other
        let tasks: Vec<_> = echo
            .iter()
            .map(|e| {
                let body = json!({"model": model_id(f, e["mode"].as_str().unwrap()),
                    "prompt": [e["prompt_ids"]], "echo": true, "logprobs": 1, "max_tokens": 0});
                let url = url.clone();
                tokio::spawn(async move { post(&url, &body).await })
            })
            .collect();
        let mut checked = 0;
        for (entry, task) in echo.iter().zip(tasks) {
            let (status, body) = task.await.unwrap();
            assert_eq!(status, 200, "{body}");
            let got = body["choices"][0]["logprobs"]["token_logprobs"]
                .as_array()
                .unwrap();
            let want = entry["token_logprobs"].as_array().unwrap();
            assert_eq!(got.len(), want.len());
            assert_eq!(got[0], Value::Null);
            for (g, w) in got.iter().zip(want).skip(1) {
                let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
                assert!(
                    (g - w).abs() < 1e-3,
                    "{} {}: {g} vs {w}",
                    f.name,
                    entry["mode"]
                );
                checked += 1;
            }
        }
        assert!(checked > 100, "{checked}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspection_of_the_last_position_equals_the_reference_top5() {
    for f in ARCHS {
        let server = start(f);
        let cases = f.reference().cases;
        let case = &cases[0];
        let (status, body) = post(
            &server.url("/v1/inspect"),
            &json!({"model": f.name, "prompt": case.prompt}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let heads = body["positions"][0]["heads"].as_array().unwrap();
        // every exit and the original
        assert_eq!(
            heads.len(),
            f.modes()
                .iter()
                .filter(|m| !m.starts_with("contrast"))
                .count()
        );
        for report in heads {
            let head = report["head"].as_str().unwrap();
            let want = cases
                .iter()
                .find(|c| c.mode == head && c.prompt == case.prompt)
                .unwrap();
            let top: Vec<u32> = report["top_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["token_id"].as_u64().unwrap() as u32)
                .collect();
            let want_top: Vec<u32> = want.top5[0].iter().map(|t| t.0).collect();
            assert_eq!(top, want_top, "{} {head}", f.name);
        }
    }
}
