//! What evaluation harnesses and plain OpenAI clients need: modes chosen by model id (with
//! operator presets), and vLLM's tokenizer routes, as lm-eval's `remote` backend calls them.

use crate::common;

use common::client::{get, post};
use common::server::TestServer;
use common::{reference, MODEL};
use serde_json::{json, Value};

/// The model-id suffix of a fixture mode string (`exit:2` -> `exit-2`, `contrast:4,1` ->
/// `contrast-4-1`).
fn suffix(mode: &str) -> String {
    mode.replace([':', ','], "-")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_mode_can_be_chosen_by_model_id_alone() {
    let server = TestServer::start(&[]);
    let url = server.url("/v1/completions");
    for case in reference().cases {
        let id = format!("{MODEL}:{}", suffix(&case.mode));
        let (status, body) = post(
            &url,
            &json!({"model": id, "prompt": case.prompt, "max_tokens": case.greedy_ids.len(),
                "temperature": 0, "return_token_ids": true}),
        )
        .await;
        assert_eq!(status, 200, "{id}: {body}");
        assert_eq!(body["model"], json!(id), "the response names the id sent");
        assert_eq!(
            body["choices"][0]["token_ids"],
            json!(case.greedy_ids),
            "{id}"
        );
        // the same mode in `multi_exit` too is fine
        let (status, _) = post(
            &url,
            &json!({"model": id, "prompt": case.prompt, "max_tokens": 1,
                "multi_exit": common::multi_exit(&case.mode)}),
        )
        .await;
        assert_eq!(status, 200, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_ids_are_listed_resolved_and_refused_clearly() {
    let server = TestServer::start(&["--mode-preset", "acd-strong=contrast:4,1,alpha=0.05"]);
    let (status, list) = get(&server.url("/v1/models")).await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    let want: Vec<String> = [
        "",
        ":original",
        ":exit-1",
        ":exit-2",
        ":exit-4",
        ":contrast-4-1",
        ":contrast-4-2",
        ":contrast-original-1",
        ":contrast-original-2",
        ":dola-low",
        ":dola-high",
        ":dola-1-2",
        ":sled",
        ":early-exit-0.9",
        ":acd-strong",
    ]
    .iter()
    .map(|s| format!("{MODEL}{s}"))
    .collect();
    assert_eq!(ids, want);
    let preset = &list["data"][14]["multi_exit"];
    assert_eq!(
        preset,
        &json!({"mode": "contrast", "name": "contrast:4,1,alpha=0.05", "upper": 4, "lower": 1, "alpha": 0.05, "minimum_candidates": 1})
    );
    // any valid id answers, listed or not
    let (status, card) = get(&server.url(&format!("/v1/models/{MODEL}:contrast-original-4"))).await;
    assert_eq!(status, 200, "{card}");
    assert_eq!(card["multi_exit"]["upper"], "original");
    // DoLa's ids name their layers as asked; the card says what they resolved to
    let (status, card) = get(&server.url(&format!("/v1/models/{MODEL}:dola-high"))).await;
    assert_eq!(status, 200, "{card}");
    assert_eq!(
        card["multi_exit"],
        json!({"mode": "dola", "name": "dola:high", "layers": [2], "premature": "exits", "relative_top": 0.1})
    );
    for bad in [
        format!("{MODEL}:dola-3"),
        format!("{MODEL}:dola-2-1"),
        format!("{MODEL}:dola-middle"),
        format!("{MODEL}:exit-3"),
        format!("{MODEL}:contrast-1-4"),
        format!("{MODEL}:contrast-4"),
        format!("{MODEL}:fast"),
        format!("{MODEL}-other"),
        "gpt-4".to_string(),
    ] {
        let (status, body) = get(&server.url(&format!("/v1/models/{bad}"))).await;
        assert_eq!(status, 404, "{bad}");
        assert_eq!(body["error"]["code"], "model_not_found");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(":exit-L") && msg.contains(":acd-strong"),
            "{msg}"
        );
        let (status, body) = post(
            &server.url("/v1/completions"),
            &json!({"model": bad, "prompt": "x"}),
        )
        .await;
        assert_eq!(status, 404, "{bad}: {body}");
        assert_eq!(body["error"]["param"], "model");
    }
    // a model id and a different multi_exit disagree
    let (status, body) = post(
        &server.url("/v1/completions"),
        &json!({"model": format!("{MODEL}:exit-2"), "prompt": "x",
            "multi_exit": {"mode": "exit", "layer": 1}}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "multi_exit");
    // the preset decodes as its mode does
    let body = |model: String, me: Option<Value>| {
        let mut b = json!({"model": model, "prompt": "The layers", "max_tokens": 8,
            "temperature": 0, "return_token_ids": true});
        if let Some(me) = me {
            b["multi_exit"] = me;
        }
        b
    };
    let url = server.url("/v1/completions");
    let (_, by_preset) = post(&url, &body(format!("{MODEL}:acd-strong"), None)).await;
    let (_, by_body) = post(
        &url,
        &body(
            MODEL.to_string(),
            Some(json!({"mode": "contrast", "upper": 4, "lower": 1, "alpha": 0.05})),
        ),
    )
    .await;
    assert_eq!(
        by_preset["choices"][0]["token_ids"],
        by_body["choices"][0]["token_ids"]
    );
    assert_eq!(by_preset["multi_exit"]["alpha"], json!(0.05));
}

#[test]
fn bad_presets_fail_at_startup() {
    use clap::Parser;
    use exitserve::config::{Args, Settings};
    let model = common::fixture_dir(common::FIXTURE);
    for (preset, needle) in [
        ("exit-2=exit:2", "not a built-in mode"),
        ("Fast=exit:2", "lowercase"),
        ("x=exit:3", "not an exit layer"),
        ("x=contrast:4,1,beta=2", "expected original"),
        ("noequals", "expected NAME=MODE"),
    ] {
        let argv = [
            "exitserve",
            "--model",
            model.to_str().unwrap(),
            "--mode-preset",
            preset,
        ];
        let s = Settings::resolve(Args::try_parse_from(argv).unwrap()).unwrap();
        let e = exitserve::server::build_state(&s, exitserve::http::Shutdown::never())
            .err()
            .unwrap_or_else(|| panic!("{preset} accepted"))
            .to_string();
        assert!(
            e.contains("--mode-preset") && e.contains(needle),
            "{preset}: {e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenizer_routes_speak_vllms_shapes() {
    let server = TestServer::start(&[]);
    let case = reference().cases[0].clone();
    let (status, t) = post(
        &server.url("/tokenize"),
        &json!({"prompt": case.prompt, "add_special_tokens": false, "return_token_strs": true}),
    )
    .await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["tokens"], json!(case.prompt_ids));
    assert_eq!(t["count"], json!(case.prompt_ids.len()));
    assert_eq!(t["max_model_len"], 256);
    let strs: String = t["token_strs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(strs, case.prompt);
    let (status, d) = post(
        &server.url("/detokenize"),
        &json!({"model": MODEL, "tokens": case.prompt_ids}),
    )
    .await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["prompt"], json!(case.prompt));
    let (status, info) = get(&server.url("/tokenizer_info")).await;
    assert_eq!(status, 200);
    assert_eq!(info["eos_token"], "<|endoftext|>");
    assert_eq!(info["model_max_length"], 256);
    // bad input names the field
    for (path, body, want, param) in [
        (
            "/detokenize",
            json!({"tokens": [1, 99999999]}),
            400,
            Some("tokens"),
        ),
        ("/detokenize", json!({"tokens": [-1]}), 400, Some("tokens")),
        ("/detokenize", json!({"tokens": "abc"}), 400, Some("tokens")),
        ("/detokenize", json!({}), 400, Some("tokens")),
        ("/tokenize", json!({}), 400, Some("prompt")),
        ("/tokenize", json!({"prompt": 5}), 400, Some("prompt")),
        (
            "/tokenize",
            json!({"prompt": "x", "bogus": 1}),
            400,
            Some("bogus"),
        ),
        (
            "/tokenize",
            json!({"prompt": "x", "model": "other"}),
            404,
            Some("model"),
        ),
        (
            "/tokenize",
            json!({"prompt": "x", "add_special_tokens": "yes"}),
            400,
            Some("add_special_tokens"),
        ),
    ] {
        let (status, body) = post(&server.url(path), &body).await;
        assert_eq!(status, want, "{path} {body}");
        assert_eq!(body["error"]["param"], json!(param), "{path} {body}");
    }
    // the API key rule of /v1/* applies
    let keyed = TestServer::start(&["--api-key", "k"]);
    assert_eq!(get(&keyed.url("/tokenizer_info")).await.0, 401);
    assert_eq!(
        post(&keyed.url("/tokenize"), &json!({"prompt": "x"}))
            .await
            .0,
        401
    );
}
