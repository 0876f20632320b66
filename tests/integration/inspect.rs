//! `POST /v1/inspect`: every head's prediction at the prompt's positions, equal to the
//! reference implementation's scores for each mode.

use crate::common;

use std::collections::BTreeMap;

use common::client::post;
use common::server::TestServer;
use common::{reference, MODEL};
use serde_json::{json, Value};

fn scoring() -> Value {
    let path = common::fixture_dir("tiny-gpt-neo-multiexit.scoring.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `"contrast:U,L"` -> the `contrast` object.
fn contrast_of(mode: &str) -> Value {
    let me = common::multi_exit(mode);
    json!({"upper": me["upper"], "lower": me["lower"]})
}

/// The heads of a position by name.
fn heads(position: &Value) -> BTreeMap<String, Value> {
    position["heads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["head"].as_str().unwrap().to_string(), h.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_position_of_every_head_equals_the_reference_top5() {
    let server = TestServer::start(&[]);
    let url = server.url("/v1/inspect");
    let cases = reference().cases;
    let contrasts: Vec<String> = {
        let mut m: Vec<String> = cases
            .iter()
            .filter(|c| c.mode.starts_with("contrast:"))
            .map(|c| c.mode.clone())
            .collect();
        m.dedup();
        m
    };
    let mut checked = 0;
    for contrast in &contrasts {
        for case in cases.iter().filter(|c| &c.mode == contrast) {
            let (status, body) = post(
                &url,
                &json!({"model": MODEL, "prompt": case.prompt, "contrast": contrast_of(contrast)}),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["object"], "inspection");
            assert_eq!(body["prompt_token_ids"], json!(case.prompt_ids));
            let positions = body["positions"].as_array().unwrap();
            assert_eq!(positions.len(), 1);
            let last = &positions[0];
            assert_eq!(last["index"], json!(case.prompt_ids.len() - 1));
            assert_eq!(last["next_token_id"], Value::Null);
            let by_head = heads(last);
            assert_eq!(
                by_head.keys().cloned().collect::<Vec<_>>(),
                vec![
                    "contrast:".to_string() + &contrast[9..],
                    "exit:1".into(),
                    "exit:2".into(),
                    "exit:4".into(),
                    "original".into()
                ]
                .into_iter()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
            );
            for (head, report) in &by_head {
                let want = cases
                    .iter()
                    .find(|c| &c.mode == head && c.prompt == case.prompt)
                    .unwrap_or_else(|| panic!("no reference case {head}"));
                let top = report["top_logprobs"].as_array().unwrap();
                assert_eq!(top.len(), 5);
                for (got, (id, lp)) in top.iter().zip(&want.top5[0]) {
                    assert_eq!(got["token_id"], json!(id), "{head} {:?}", case.prompt);
                    let got_lp = got["logprob"].as_f64().unwrap() as f32;
                    assert!((got_lp - lp).abs() < 1e-3, "{head}: {got_lp} vs {lp}");
                }
                let jsd = report["jsd_to_original"].as_f64().unwrap();
                assert!((0.0..=std::f64::consts::LN_2 + 1e-6).contains(&jsd));
                if head == "original" {
                    assert_eq!(jsd, 0.0);
                }
                assert!(report["entropy"].as_f64().unwrap() > 0.0);
                checked += 1;
            }
        }
    }
    assert!(checked >= 30, "{checked}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_position_gives_the_reference_echo_logprobs_of_each_mode() {
    // Several positions per step and chunked prefill: a small prefill budget.
    let server = TestServer::start(&["--max-prefill-tokens", "8"]);
    let url = server.url("/v1/inspect");
    let echo = scoring()["echo"].as_array().unwrap().clone();
    let mut checked = 0;
    for entry in &echo {
        let mode = entry["mode"].as_str().unwrap();
        let mut body = json!({"model": MODEL, "prompt": entry["prompt"], "positions": "all",
            "top_logprobs": 0});
        if mode.starts_with("contrast:") {
            body["contrast"] = contrast_of(mode);
        }
        let (status, got) = post(&url, &body).await;
        assert_eq!(status, 200, "{got}");
        let ids = &entry["prompt_ids"];
        assert_eq!(got["prompt_token_ids"], *ids);
        let positions = got["positions"].as_array().unwrap();
        assert_eq!(positions.len(), ids.as_array().unwrap().len());
        let want = entry["token_logprobs"].as_array().unwrap();
        for (i, p) in positions.iter().enumerate() {
            assert_eq!(p["index"], json!(i));
            assert_eq!(p["token_id"], ids[i]);
            let report = &heads(p)[mode];
            assert!(report["top_logprobs"].as_array().unwrap().is_empty());
            match want.get(i + 1) {
                Some(w) => {
                    assert_eq!(p["next_token_id"], ids[i + 1]);
                    let got_lp = report["next_token_logprob"].as_f64().unwrap();
                    let w = w.as_f64().unwrap();
                    assert!(
                        (got_lp - w).abs() < 1e-3,
                        "{mode} position {i}: {got_lp} vs {w}"
                    );
                    checked += 1;
                }
                None => assert_eq!(report["next_token_logprob"], Value::Null),
            }
        }
    }
    assert!(checked > 100, "{checked}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contrast_model_id_is_inspected_and_bad_input_names_the_field() {
    let server = TestServer::start(&["--max-input-tokens", "64"]);
    let url = server.url("/v1/inspect");
    let (status, body) = post(
        &url,
        &json!({"model": format!("{MODEL}:contrast-4-2"), "prompt": [11, 12, 13], "top_logprobs": 20}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], json!(format!("{MODEL}:contrast-4-2")));
    let h = heads(&body["positions"][0]);
    assert!(h.contains_key("contrast:4,2"), "{h:?}");
    assert_eq!(h["exit:1"]["top_logprobs"].as_array().unwrap().len(), 20);
    for (req, status, param) in [
        (
            json!({"model": MODEL, "prompt": "x", "top_logprobs": 21}),
            400,
            "top_logprobs",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "top_logprobs": -1}),
            400,
            "top_logprobs",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "positions": "some"}),
            400,
            "positions",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "contrast": {"upper": 4, "lower": 3}}),
            400,
            "contrast.lower",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "contrast": {"upper": 1, "lower": 2}}),
            400,
            "contrast.upper",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "contrast": {"upper": "top", "lower": 2}}),
            400,
            "contrast.upper",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "contrast": {"lower": 2, "beta": 1}}),
            400,
            "contrast.beta",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "strategies": [{"mode": "sled", "evolution_scale": 0}]}),
            400,
            "strategies[0].evolution_scale",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "strategies": [{"mode": "dola"}, {"layer": 2}]}),
            400,
            "strategies[1].mode",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "strategies": [{"mode": "exit", "layer": 2}]}),
            400,
            "strategies[0].mode",
        ),
        (
            json!({"model": MODEL, "prompt": "x",
                "strategies": vec![json!({"mode": "contrast", "upper": 4, "lower": 1}); 9]}),
            400,
            "strategies",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "dola": {"mode": "sled"}}),
            400,
            "dola.mode",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "strategies": "sled"}),
            400,
            "strategies",
        ),
        (json!({"model": MODEL}), 400, "prompt"),
        (json!({"model": MODEL, "prompt": ""}), 400, "prompt"),
        (json!({"model": MODEL, "prompt": [99999999]}), 400, "prompt"),
        (
            json!({"model": MODEL, "prompt": vec![11; 65]}),
            400,
            "prompt",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "echo": true}),
            400,
            "echo",
        ),
        (json!({"prompt": "x"}), 400, "model"),
        (json!({"model": "other", "prompt": "x"}), 404, "model"),
    ] {
        let (got, body) = post(&url, &req).await;
        assert_eq!(got, status, "{req}: {body}");
        assert_eq!(body["error"]["param"], json!(param), "{req}: {body}");
    }
}
