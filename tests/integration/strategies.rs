//! Decoding strategies across layers, through the real server, against the references in
//! `tests/fixtures/*.dola.json` (transformers 4.46.3's DoLa for `premature: lm_head`, its
//! `_dola_select_contrast` over the exit heads for `exits`) and `tests/fixtures/*.sled.json`
//! (the SLED authors' `_sled_select_contrast`, made by `tests/fixtures/sled_reference.py`):
//! greedy ids and first-step top-5 logprobs, each case alone and all cases in one batch, on
//! both architectures.

use crate::common;

use common::client::post;
use common::server::TestServer;
use common::{ids, Fixture, ARCHS};
use exitserve::model::source;
use exitserve::model::TextTokenizer;
use serde_json::{json, Value};

fn reference(f: Fixture, strategy: &str) -> Value {
    let path = common::fixture_dir(&format!("{}.{strategy}.json", f.name));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn dola_reference(f: Fixture) -> Value {
    reference(f, "dola")
}

/// The request a SLED reference case describes (its parameters, the premature heads).
fn sled_body(f: Fixture, case: &Value) -> Value {
    let mut body = dola_body(f, case);
    let mut multi_exit = case["params"].clone();
    multi_exit["mode"] = json!("sled");
    multi_exit["premature"] = case["premature"].clone();
    body["multi_exit"] = multi_exit;
    body
}

/// The request the reference case describes.
fn dola_body(f: Fixture, case: &Value) -> Value {
    json!({
        "model": f.name,
        "prompt": case["prompt_ids"],
        "max_tokens": case["greedy_ids"].as_array().unwrap().len(),
        "temperature": 0,
        "ignore_eos": true,
        "logprobs": 5,
        "return_token_ids": true,
        "repetition_penalty": case["repetition_penalty"],
        "multi_exit": {"mode": "dola", "layers": case["layers"], "premature": case["premature"]},
    })
}

fn check(f: Fixture, tok: &TextTokenizer, case: &Value, out: &Value) {
    let label = format!(
        "{} {:?} {} {} rp {}",
        f.name, case["prompt"], case["premature"], case["layers"], case["repetition_penalty"]
    );
    let choice = &out["choices"][0];
    assert_eq!(
        ids(&choice["token_ids"]),
        ids(&case["greedy_ids"]),
        "{label}: {out}"
    );
    let top = &choice["logprobs"]["top_logprobs"][0];
    for pair in case["top5"].as_array().unwrap() {
        let id = pair[0].as_u64().unwrap() as u32;
        let want = pair[1].as_f64().unwrap();
        let text = tok.decode(&[id]).unwrap();
        let got = top[&text]
            .as_f64()
            .unwrap_or_else(|| panic!("{label}: {text:?} not in the top 5 {top}"));
        assert!(
            (got - want).abs() < 1e-3,
            "{label} {text:?}: {got} vs {want}"
        );
    }
}

fn tokenizer(f: Fixture) -> TextTokenizer {
    let files = source::resolve(f.dir().to_str().unwrap(), None).unwrap();
    TextTokenizer::from_files(&files.tokenizer).unwrap()
}

/// Each `(case, body)` alone, then all of them at once (one batch), each checked against its
/// reference case.
async fn check_alone_and_batched(
    url: &str,
    f: Fixture,
    tok: &TextTokenizer,
    all: &[(Value, Value)],
) {
    for (case, body) in all {
        let (status, out) = post(url, body).await;
        assert_eq!(status, 200, "{out}");
        check(f, tok, case, &out);
    }
    let tasks: Vec<_> = all
        .iter()
        .map(|(_, body)| {
            let (url, body) = (url.to_string(), body.clone());
            tokio::spawn(async move { post(&url, &body).await })
        })
        .collect();
    for ((case, _), t) in all.iter().zip(tasks) {
        let (status, out) = t.await.unwrap();
        assert_eq!(status, 200, "{out}");
        check(f, tok, case, &out);
    }
}

/// `body` (a reference case's request) decoded self-speculatively from exit `draft`: the
/// reference's greedy ids (the verify uses the strategy's distribution); and, without a
/// repetition penalty, echo scoring of prompt + generated text gives the generated positions
/// the logprobs they were generated with.
async fn check_speculative_and_echo(url: &str, f: Fixture, case: &Value, body: &Value, draft: u64) {
    let mut speculative = body.clone();
    speculative["speculative"] =
        json!({"draft_layer": draft, "max_draft_tokens": 3, "adaptive": false});
    let (status, out) = post(url, &speculative).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        ids(&out["choices"][0]["token_ids"]),
        ids(&case["greedy_ids"]),
        "speculative {} {case}",
        f.name
    );
    if case["repetition_penalty"] != json!(1.0) {
        return;
    }
    let generated = out["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .clone();
    let mut full = ids(&case["prompt_ids"]);
    full.extend(ids(&case["greedy_ids"]));
    let mut echo = body.clone();
    echo["prompt"] = json!(full);
    echo["echo"] = json!(true);
    echo["max_tokens"] = json!(0);
    let (status, scored) = post(url, &echo).await;
    assert_eq!(status, 200, "{scored}");
    let lps = scored["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap();
    for (e, g) in lps[lps.len() - generated.len()..].iter().zip(&generated) {
        let (e, g) = (e.as_f64().unwrap(), g.as_f64().unwrap());
        assert!((e - g).abs() < 1e-4, "{} echo {e} vs generated {g}", f.name);
    }
}

/// The token ids `body` streams.
async fn streamed_ids(url: &str, body: &Value) -> Vec<u32> {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let (status, _, events) = common::client::post_stream(url, &body).await;
    assert_eq!(status, 200);
    events
        .iter()
        .filter_map(|e| e["choices"][0]["token_ids"].as_array().cloned())
        .flatten()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// On the CPU's own path, and on the batched path, where each step chooses DoLa's premature
/// candidate where the logits are (`kernels::greedy::divergence_rows`) and hands over only
/// its rows and the mature head's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dola_equals_the_reference_alone_and_in_one_batch() {
    for f in ARCHS {
        let reference = dola_reference(f);
        let cases = reference["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 20);
        let all: Vec<(Value, Value)> = cases.iter().map(|c| (c.clone(), dola_body(f, c))).collect();
        for path in [&[][..], &["--attention", "batched"]] {
            let server =
                TestServer::start_model(&f.dir(), &[&["--max-batch-size", "64"], path].concat());
            check_alone_and_batched(&server.url("/v1/completions"), f, &tokenizer(f), &all).await;
        }
    }
}

/// What else DoLa goes through, on both architectures: self-speculative decoding (the verify
/// uses DoLa's distribution: the greedy text is the plain one), echo scoring (each position's
/// logprob is DoLa's, the same as when that token was generated), streaming, and seeded
/// sampling with `n` = 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dola_with_speculation_echo_streaming_and_sampling() {
    for f in ARCHS {
        let reference = dola_reference(f);
        let draft = reference["exits"][0].as_u64().unwrap();
        let server = TestServer::start_model(&f.dir(), &[]);
        let url = server.url("/v1/completions");
        for case in reference["cases"].as_array().unwrap() {
            check_speculative_and_echo(&url, f, case, &dola_body(f, case), draft).await;
        }
        // a narrow plausible set: prompt tokens outside it are impossible, -9999 (not null)
        let case = &reference["cases"][0];
        let mut echo = dola_body(f, case);
        echo["prompt"] = json!(ids(&case["prompt_ids"]).repeat(3));
        echo["echo"] = json!(true);
        echo["max_tokens"] = json!(0);
        echo["multi_exit"]["relative_top"] = json!(0.9);
        let (status, scored) = post(&url, &echo).await;
        assert_eq!(status, 200, "{scored}");
        let lps = scored["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap();
        assert!(
            lps[1..]
                .iter()
                .all(|x| x.as_f64().is_some_and(|x| x >= -9999.0)),
            "{scored}"
        );
        assert!(lps.iter().any(|x| x.as_f64() == Some(-9999.0)), "{scored}");
        assert_eq!(
            streamed_ids(&url, &dola_body(f, case)).await,
            ids(&case["greedy_ids"]),
            "{} streamed",
            f.name
        );
        let mut body = dola_body(f, case);
        body["temperature"] = json!(1.0);
        body["seed"] = json!(7);
        body["n"] = json!(2);
        let (status, a) = post(&url, &body).await;
        let (_, b) = post(&url, &body).await;
        assert_eq!(status, 200, "{a}");
        assert_eq!(a["choices"], b["choices"], "seeded sampling repeats");
    }
}

/// `/v1/inspect` with a DoLa head: at the last prompt position its best token is the
/// reference's first greedy token and the premature layer it chose is the reference's first
/// choice (`premature_layers`, `exits` cases); every position reports its choice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspection_reports_dola_and_the_layer_each_position_chose() {
    for f in ARCHS {
        let reference = dola_reference(f);
        let server = TestServer::start_model(&f.dir(), &[]);
        let url = server.url("/v1/inspect");
        let mut checked = 0;
        for case in reference["cases"].as_array().unwrap() {
            if case["repetition_penalty"] != json!(1.0) {
                continue;
            }
            let body = json!({"model": f.name, "prompt": case["prompt_ids"], "positions": "all",
                "top_logprobs": 1,
                "dola": {"layers": case["layers"], "premature": case["premature"]}});
            let (status, out) = post(&url, &body).await;
            assert_eq!(status, 200, "{out}");
            let positions = out["positions"].as_array().unwrap();
            assert_eq!(
                positions.len(),
                case["prompt_ids"].as_array().unwrap().len()
            );
            let dola_head = |p: &Value| -> Value {
                p["heads"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|h| h["head"].as_str().unwrap().starts_with("dola:"))
                    .cloned()
                    .unwrap_or_else(|| panic!("no DoLa head in {p}"))
            };
            for p in positions {
                assert!(dola_head(p)["premature_layer"].is_u64(), "{p}");
            }
            let last = dola_head(positions.last().unwrap());
            assert_eq!(
                last["top_logprobs"][0]["token_id"], case["greedy_ids"][0],
                "{} {case}",
                f.name
            );
            if case["premature"] == "exits" {
                assert_eq!(
                    last["premature_layer"], case["premature_layers"][0],
                    "{case}"
                );
            }
            checked += 1;
        }
        assert_eq!(checked, 12, "{}", f.name);
        // named by the model id
        let body = json!({"model": format!("{}:dola-low", f.name), "prompt": "Hello there"});
        let (status, out) = post(&url, &body).await;
        assert_eq!(status, 200, "{out}");
        let heads = &out["positions"][0]["heads"];
        assert!(
            heads
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h["head"] == "dola:low"),
            "{heads}"
        );
        // a bad DoLa object names its field
        let body = json!({"model": f.name, "prompt": "x", "dola": {"layers": "middle"}});
        let (status, out) = post(&url, &body).await;
        assert_eq!(status, 400, "{out}");
        assert_eq!(out["error"]["param"], "dola.layers");
    }
}

/// Any strategy is a head of `/v1/inspect` (`strategies`): named by its flag form (the
/// `name` a completion echoes), its distribution at the last prompt position equal to the
/// first-token logprobs of a completion in that mode, with the layer it chose where it
/// chooses one; the model card's forms ask for modes that validate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_is_an_inspection_head_equal_to_its_completion() {
    for f in ARCHS {
        let server = TestServer::start_model(&f.dir(), &[]);
        let (status, card) =
            common::client::get(&server.url(&format!("/v1/models/{}", f.name))).await;
        assert_eq!(status, 200, "{card}");
        let exits: Vec<u64> = card["exit_layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_u64().unwrap())
            .collect();
        let lowest = exits[0];
        // every form's defaults, plus early exit that always and never leaves
        let mut strategies: Vec<Value> = card["strategies"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|form| form["single_head"] == false)
            .map(|form| {
                let mut m = json!({"mode": form["mode"]});
                for p in form["parameters"].as_array().unwrap() {
                    m[p["name"].as_str().unwrap()] = p["default"].clone();
                }
                m
            })
            .collect();
        assert_eq!(strategies.len(), 4, "{card}");
        strategies.push(json!({"mode": "early_exit", "threshold": 0.0}));
        strategies.push(json!({"mode": "early_exit", "threshold": 1.0}));
        strategies.push(json!({"mode": "dola", "layers": [0, 1], "premature": "lm_head"}));
        let prompt = "The quick brown fox";
        let body = json!({"model": f.name, "prompt": prompt, "top_logprobs": 5,
            "strategies": strategies});
        let (status, out) = post(&server.url("/v1/inspect"), &body).await;
        assert_eq!(status, 200, "{out}");
        let heads = out["positions"][0]["heads"].as_array().unwrap().clone();
        for m in &strategies {
            let completion = json!({"model": f.name, "prompt": prompt, "max_tokens": 1,
                "temperature": 0, "logprobs": 5, "multi_exit": m});
            let (status, c) = post(&server.url("/v1/completions"), &completion).await;
            assert_eq!(status, 200, "{c}");
            let name = c["multi_exit"]["name"].as_str().unwrap();
            let head = heads
                .iter()
                .find(|h| h["head"] == name)
                .unwrap_or_else(|| panic!("{}: no head {name} in {heads:?}", f.name));
            let want = &c["choices"][0]["logprobs"]["top_logprobs"][0];
            let top = head["top_logprobs"].as_array().unwrap();
            assert!(!top.is_empty(), "{name}");
            assert_eq!(
                top[0]["token"], c["choices"][0]["logprobs"]["tokens"][0],
                "{} {name}: the head's best token is the greedy one",
                f.name
            );
            for t in top {
                let got = t["logprob"].as_f64().unwrap();
                let w = want[t["token"].as_str().unwrap()]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{name}: {t} not in the completion's top {want}"));
                assert!((got - w).abs() < 1e-4, "{} {name}: {t} vs {w}", f.name);
            }
            match name {
                "early_exit:0" => assert_eq!(head["exit_layer"], json!(lowest), "{head}"),
                "early_exit:1" => assert!(head.get("exit_layer").is_none(), "{head}"),
                n if n.starts_with("dola:") => assert!(head["premature_layer"].is_u64(), "{head}"),
                _ => {}
            }
        }
        // the top head on raw block outputs is evaluated for DoLa's lm_head candidates
        assert!(heads.iter().any(|h| h["head"] == "lm_head:1"), "{heads:?}");
        // a strategy named by the model id is a head too
        let body = json!({"model": format!("{}:early-exit-0.9", f.name), "prompt": prompt});
        let (status, out) = post(&server.url("/v1/inspect"), &body).await;
        assert_eq!(status, 200, "{out}");
        let names: Vec<&Value> = out["positions"][0]["heads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| &h["head"])
            .collect();
        assert_eq!(
            names.last().unwrap().as_str(),
            Some("early_exit:0.9"),
            "{names:?}"
        );
    }
}

/// SLED against the authors' code: every case alone, then all SLED and DoLa cases of the
/// fixture in one batch; then what else it goes through (self-speculative decoding verifies with
/// SLED's distribution, echo scores each position as generated, streaming, the model id); then
/// every case alone and at once on the batched path, its scores computed in the step, and its
/// speculation and echo scoring there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_equals_the_authors_code_alone_batched_and_speculative() {
    for f in ARCHS {
        let sled = reference(f, "sled");
        let cases = sled["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 20);
        let tok = tokenizer(f);
        let server = TestServer::start_model(&f.dir(), &["--max-batch-size", "64"]);
        let url = server.url("/v1/completions");
        let sled_cases: Vec<(Value, Value)> =
            cases.iter().map(|c| (c.clone(), sled_body(f, c))).collect();
        let dola = dola_reference(f);
        let dola_cases = dola["cases"].as_array().unwrap();
        let mut all = sled_cases.clone();
        all.extend(dola_cases.iter().map(|c| (c.clone(), dola_body(f, c))));
        check_alone_and_batched(&url, f, &tok, &all).await;

        let draft = sled["exits"][0].as_u64().unwrap();
        for (case, body) in &sled_cases {
            check_speculative_and_echo(&url, f, case, body, draft).await;
        }
        // streamed, and by model id (the authors' defaults over the exits)
        let (case, body) = sled_cases
            .iter()
            .find(|(c, _)| {
                c["premature"] == "exits"
                    && c["repetition_penalty"] == json!(1.0)
                    && c["params"]["alpha"] == json!(0.5)
            })
            .unwrap();
        assert_eq!(
            streamed_ids(&url, body).await,
            ids(&case["greedy_ids"]),
            "{} streamed",
            f.name
        );
        let mut by_id = body.clone();
        by_id["model"] = json!(format!("{}:sled", f.name));
        by_id.as_object_mut().unwrap().remove("multi_exit");
        let (status, out) = post(&url, &by_id).await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(out["multi_exit"]["mode"], "sled", "{out}");
        check(f, &tok, case, &out);
        assert_eq!(server.metric("exitserve_device_scores_total"), 0.0);

        // On the batched path each step computes SLED's candidates and their logits where the
        // logits are (`kernels::sled`) and hands over those alone: every generated token's,
        // a repetition penalty then applied on the host as to the host's scores.
        let batched = TestServer::start_model(
            &f.dir(),
            &["--max-batch-size", "64", "--attention", "batched"],
        );
        check_alone_and_batched(&batched.url("/v1/completions"), f, &tok, &sled_cases).await;
        let tokens: usize = cases
            .iter()
            .map(|c| c["greedy_ids"].as_array().unwrap().len())
            .sum();
        let scored = batched.metric("exitserve_device_scores_total");
        assert_eq!(
            scored,
            (2 * tokens) as f64,
            "{}: every token's scores computed in the step, alone and at once",
            f.name
        );
        // echo's scoring too: each prompt position's logprob from the scores computed there
        // (the speculative pass's verifying positions are the host's), equal to the
        // generated token's
        let url = batched.url("/v1/completions");
        let mut echoed = 0;
        for (case, body) in &sled_cases {
            check_speculative_and_echo(&url, f, case, body, draft).await;
            if case["repetition_penalty"] == json!(1.0) {
                let n = ids(&case["prompt_ids"]).len() + ids(&case["greedy_ids"]).len();
                echoed += n - 1;
            }
        }
        assert!(echoed > 0);
        assert!(
            batched.metric("exitserve_device_scores_total") - scored >= echoed as f64,
            "{}: echo's positions scored in the step",
            f.name
        );
    }
}
