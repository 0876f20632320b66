//! The server on the path a GPU takes (`--attention batched --matmul candle`: batched attention
//! over the paged cache, candle's matmul), on the CPU, through HTTP: every reference case at
//! once, plainly, with self-speculative decoding and with `n` = 2 (a forked cache), equal to
//! the reference; echo scoring equal to the CPU kernels' within float32 rounding. And the same
//! with the GPU's own CUDA kernels run on the CPU in place of the CPU kernels
//! (`kernels::cuda_emulator`).

use crate::common;

use common::client::post;
use common::server::TestServer;
use common::{greedy_body_for, ids, ARCHS};
use serde_json::{json, Value};

/// The path a GPU takes, with room for every case at once.
const GPU_PATH: [&str; 6] = [
    "--attention",
    "batched",
    "--matmul",
    "candle",
    "--max-batch-size",
    "256",
];

/// Also with the GPU's own kernels run on the CPU (`kernels::cuda_emulator`): its attention
/// over forked caches and verifying passes, its epilogues and its choices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_at_once_on_the_batched_path_equals_the_reference() {
    for (f, emulate) in ARCHS.iter().flat_map(|f| [(f, false), (f, true)]) {
        let dir = f.dir();
        let argv = [&["--model", dir.to_str().unwrap()][..], &GPU_PATH].concat();
        let server = TestServer::start_with(&argv, |c| c.emulate_cuda = emulate);
        let url = server.url("/v1/completions");
        let cases = f.reference().cases;
        let draft = exitserve::model::ModelConfig::from_file(&f.dir().join("config.json"))
            .unwrap()
            .exit_layers[0];
        let variants = |case: &common::Case| -> Vec<Value> {
            let plain = greedy_body_for(f.name, case);
            let mut two = plain.clone();
            two["n"] = json!(2);
            let mut speculative = plain.clone();
            speculative["speculative"] = json!({"draft_layer": draft, "max_draft_tokens": 3});
            let top = case.mode == "original" || case.mode.contains("original");
            let above_draft = top
                || case
                    .mode
                    .split([':', ','])
                    .any(|l| l.parse::<usize>().is_ok_and(|l| l > draft));
            let mut out = vec![plain, two];
            if above_draft {
                out.push(speculative);
            }
            out
        };
        let tasks: Vec<_> = cases
            .iter()
            .flat_map(|case| variants(case).into_iter().map(move |b| (case, b)))
            .map(|(case, body)| {
                let url = url.clone();
                let want = case.greedy_ids.clone();
                let label = format!(
                    "{} {} {:?} {} (emulated: {emulate})",
                    f.name, case.mode, case.prompt, body
                );
                tokio::spawn(async move { (post(&url, &body).await, want, label) })
            })
            .collect();
        let mut checked = 0;
        for t in tasks {
            let ((status, out), want, label) = t.await.unwrap();
            assert_eq!(status, 200, "{label}: {out}");
            for choice in out["choices"].as_array().unwrap() {
                assert_eq!(ids(&choice["token_ids"]), want, "{label}");
                checked += 1;
            }
        }
        assert!(checked >= 3 * cases.len(), "{checked}");

        // Echo scoring: the prompt's logprobs as the CPU kernels compute them.
        let kernels = TestServer::start_model(&f.dir(), &[]);
        let body = json!({
            "model": f.name, "prompt": cases[0].prompt.repeat(3), "echo": true,
            "logprobs": 1, "max_tokens": 1, "temperature": 0,
        });
        let (_, want) = post(&kernels.url("/v1/completions"), &body).await;
        let (status, got) = post(&url, &body).await;
        assert_eq!(status, 200, "{got}");
        let lps = |v: &Value| -> Vec<f64> {
            v["choices"][0]["logprobs"]["token_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|x| x.as_f64())
                .collect()
        };
        let (want, got) = (lps(&want), lps(&got));
        assert!(want.len() > 10);
        assert_eq!(want.len(), got.len());
        for (w, g) in want.iter().zip(&got) {
            assert!((w - g).abs() < 1e-4, "{} echo: {w} vs {g}", f.name);
        }
    }
}

/// Seeded sampling on the batched path: a sequence that reads nothing but its tokens gets
/// each drawn in the step from its head's row or its contrast's rows (`kernels::sample`);
/// one that asks for logprobs too gets the token's logprob and top alternatives read there
/// beside it (`kernels::logprob`: its head's log-softmax, the contrast's log q, DoLa's
/// normalised logits); one whose scores are edited (a logit bias, here of 0) gets its rows
/// copied and draws on the host. All draw the same tokens, all at once and alone, in
/// `original`, `exit`, `early_exit`, `contrast` (a candidate floor of one and of three) and
/// `dola` (one candidate, and three of which the step chooses one), greedy and with and
/// without top-k and top-p, and the logprobs read in the step equal the host's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draws_made_in_the_step_are_the_host_draws() {
    for f in ARCHS {
        let flags = ["--attention", "batched", "--matmul", "candle"];
        let server = TestServer::start_model(&f.dir(), &flags);
        let url = server.url("/v1/completions");
        let exits = exitserve::model::ModelConfig::from_file(&f.dir().join("config.json"))
            .unwrap()
            .exit_layers;
        let (low, high) = (exits[0], exits[exits.len() - 1]);
        let modes = [
            json!({"mode": "original"}),
            json!({"mode": "exit", "layer": low}),
            json!({"mode": "early_exit", "threshold": 0.2}),
            json!({"mode": "contrast", "upper": "original", "lower": low}),
            json!({"mode": "contrast", "upper": high, "lower": low, "alpha": 0.2,
                   "minimum_candidates": 3}),
            // one candidate, and three of which the step chooses one
            json!({"mode": "dola", "layers": [low], "relative_top": 0.05}),
            json!({"mode": "dola", "layers": [1, 2, 3], "premature": "lm_head"}),
        ];
        // (temperature, top_k, top_p); greedy first
        let sampling = [
            (0.0, 0, 1.0),
            (1.0, 0, 1.0),
            (0.8, 5, 1.0),
            (1.3, 0, 0.8),
            (0.7, 20, 0.9),
        ];
        const TOKENS: usize = 10;
        let mut bodies = Vec::new();
        for (m, mode) in modes.iter().enumerate() {
            let prompt = [
                "The",
                "A model",
                "Once upon",
                "In the",
                "It was",
                "We",
                "So far",
            ][m];
            for (k, &(temperature, top_k, top_p)) in sampling.iter().enumerate() {
                bodies.push(json!({
                    "model": f.name, "prompt": prompt,
                    "max_tokens": TOKENS, "ignore_eos": true, "return_token_ids": true,
                    "temperature": temperature, "top_k": top_k, "top_p": top_p,
                    "seed": 100 + k, "multi_exit": mode,
                }));
            }
        }
        let with = |b: &Value, logprobs: bool, bias: bool| {
            let mut b = b.clone();
            if logprobs {
                b["logprobs"] = json!(3);
            }
            if bias {
                b["logit_bias"] = json!({"0": 0});
            }
            b
        };
        let metric = |name: &str| server.metric(name);
        let before = (
            metric("exitserve_device_choices_total"),
            metric("exitserve_device_logprobs_total"),
        );
        // every body four times at once: drawn in the step without and with logprobs, and on
        // the host without and with them
        let variants = [(false, false), (true, false), (false, true), (true, true)];
        let every: Vec<Value> = bodies
            .iter()
            .flat_map(|b| variants.map(|(l, e)| with(b, l, e)))
            .collect();
        let at_once: Vec<Value> = responses_at_once(&url, &every)
            .await
            .into_iter()
            .map(|out| out["choices"][0].clone())
            .collect();
        // every token but early exit's first (its prompt runs every block and hands over
        // every exit's rows, from which the host decides), without logprobs and with them
        let (choices, logprobs) = (
            metric("exitserve_device_choices_total") - before.0,
            metric("exitserve_device_logprobs_total") - before.1,
        );
        let unread = bodies.len() * TOKENS - sampling.len();
        let read = unread;
        assert_eq!(choices, (unread + read) as f64, "tokens chosen in the step");
        assert_eq!(
            logprobs, read as f64,
            "tokens whose logprobs were read there"
        );
        let mut differs_from_greedy = 0;
        for (b, four) in bodies.iter().zip(at_once.chunks(4)) {
            let tokens: Vec<Vec<u32>> = four.iter().map(|c| ids(&c["token_ids"])).collect();
            assert_eq!(tokens[0].len(), TOKENS);
            for (v, t) in variants.iter().zip(&tokens) {
                assert_eq!(
                    t, &tokens[0],
                    "{} {b} {v:?}: in the step vs on the host",
                    f.name
                );
            }
            // the logprobs read in the step (or from its rows, for a contrast) against the
            // host's from the edited scores' log-softmax
            let (step, host) = (&four[1]["logprobs"], &four[3]["logprobs"]);
            let values = |l: &Value| -> Vec<f64> {
                l["token_logprobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            };
            for (x, y) in values(step).iter().zip(values(host)) {
                assert!((x - y).abs() < 1e-4, "{} {b}: {x} vs {y}", f.name);
            }
            assert_eq!(values(step).len(), TOKENS);
            assert_tops_close(step, host, &format!("{} {b}", f.name), 1e-4);
            let pair = &tokens;
            // alone: the same tokens
            let (status, alone) = post(&url, b).await;
            assert_eq!(status, 200, "{alone}");
            assert_eq!(ids(&alone["choices"][0]["token_ids"]), pair[0], "{b} alone");
            if b["temperature"] != json!(0.0) {
                let mut greedy = b.clone();
                greedy["temperature"] = json!(0);
                let (_, g) = post(&url, &greedy).await;
                differs_from_greedy += (ids(&g["choices"][0]["token_ids"]) != pair[0]) as usize;
            }
        }
        assert!(
            differs_from_greedy > bodies.len() / 2,
            "{differs_from_greedy}"
        );
    }
}

/// Echo's scoring on the batched path: the prompt positions are read where the logits are
/// (`kernels::logprob`: the next prompt token's logprob and the top alternatives alone, of the
/// head's log-softmax in `original` and `exit`, of the contrast's log q in `contrast`). Every
/// entry of the reference's scoring, all at once, in prompt chunks of 4 tokens and whole: the
/// logprobs equal the reference's, the alternatives and the tokens generated after the prompt
/// equal the CPU kernels' path, and `exitserve_device_logprobs_total` counts every position
/// read there (and each entry's second generated token, chosen and read in the step; the
/// first comes from the last prompt row) and nothing on the CPU's own path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_scoring_read_where_the_logits_are_equals_the_reference() {
    for f in ARCHS {
        let echo = f.scoring()["echo"].as_array().unwrap().clone();
        let positions: f64 = echo
            .iter()
            .map(|e| e["prompt_ids"].as_array().unwrap().len() as f64)
            .sum();
        for budget in ["4", "4096"] {
            let batched = TestServer::start_model(
                &f.dir(),
                &[
                    "--attention",
                    "batched",
                    "--matmul",
                    "candle",
                    "--max-prefill-tokens",
                    budget,
                ],
            );
            let kernels = TestServer::start_model(&f.dir(), &["--max-prefill-tokens", budget]);
            let bodies: Vec<Value> = echo
                .iter()
                .map(|e| {
                    let mode = e["mode"].as_str().unwrap().replace([':', ','], "-");
                    json!({"model": format!("{}:{mode}", f.name),
                        "prompt": [e["prompt_ids"]], "echo": true, "logprobs": 5,
                        "max_tokens": 2, "temperature": 0})
                })
                .collect();
            let (got, want) = (
                logprobs_at_once(&batched, &bodies).await,
                logprobs_at_once(&kernels, &bodies).await,
            );
            for ((entry, g), k) in echo.iter().zip(&got).zip(&want) {
                let label = format!("{} {} budget {budget}", f.name, entry["mode"]);
                let reference = entry["token_logprobs"].as_array().unwrap();
                let lps = g["token_logprobs"].as_array().unwrap();
                // the prompt's, then the two generated
                assert_eq!(lps.len(), reference.len() + 2, "{label}");
                for (x, w) in lps.iter().zip(reference).skip(1) {
                    let (x, w) = (x.as_f64().unwrap(), w.as_f64().unwrap());
                    assert!((x - w).abs() < 1e-3, "{label}: {x} vs {w}");
                }
                assert_eq!(g["tokens"], k["tokens"], "{label}");
                assert_tops_close(g, k, &label, 1e-4);
            }
            assert_eq!(
                batched.metric("exitserve_device_logprobs_total"),
                positions,
                "{} budget {budget}",
                f.name
            );
            assert_eq!(kernels.metric("exitserve_device_logprobs_total"), 0.0);
        }
    }
}

/// Echo's scoring in DoLa on the batched path: each prompt position is read where the logits
/// are as the log-softmax of DoLa's logits over the mature head and the candidate chosen there
/// at that position (`kernels::greedy::divergence_rows`, `contrast_logprob_rows`), equal to
/// the CPU's own path, which copies every candidate's rows. Every DoLa reference case (one
/// candidate and several, `exits` and `lm_head`), its prompt and greedy text echoed with
/// `logprobs` 5, all at once, in prompt chunks of 4 tokens and whole; a narrow relative top
/// (impossible prompt tokens); `exitserve_device_logprobs_total` counts every position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dola_echo_scoring_read_where_the_logits_are_is_the_hosts() {
    for f in ARCHS {
        let path = common::fixture_dir(&format!("{}.dola.json", f.name));
        let reference: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let cases = reference["cases"].as_array().unwrap();
        let bodies: Vec<Value> = cases
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut prompt = ids(&c["prompt_ids"]);
                prompt.extend(ids(&c["greedy_ids"]));
                let relative_top = if i % 4 == 0 { 0.9 } else { 0.1 };
                json!({"model": f.name, "prompt": prompt, "echo": true, "logprobs": 5,
                    "max_tokens": 0, "multi_exit": {"mode": "dola", "layers": c["layers"],
                    "premature": c["premature"], "relative_top": relative_top}})
            })
            .collect();
        let positions: f64 = bodies
            .iter()
            .map(|b| (b["prompt"].as_array().unwrap().len() - 1) as f64)
            .sum();
        let host = TestServer::start_model(&f.dir(), &[]);
        for budget in ["4", "4096"] {
            let flags = ["--attention", "batched", "--max-prefill-tokens", budget];
            let batched = TestServer::start_model(&f.dir(), &flags);
            let (got, want) = (
                logprobs_at_once(&batched, &bodies).await,
                logprobs_at_once(&host, &bodies).await,
            );
            let mut impossible = 0;
            for ((body, g), w) in bodies.iter().zip(&got).zip(&want) {
                let label = format!("{} {} budget {budget}", f.name, body["multi_exit"]);
                let (lg, lw) = (
                    g["token_logprobs"].as_array().unwrap(),
                    w["token_logprobs"].as_array().unwrap(),
                );
                assert_eq!(lg.len(), lw.len(), "{label}");
                for (x, y) in lg.iter().zip(lw).skip(1) {
                    let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                    assert!((x - y).abs() < 1e-4, "{label}: {x} vs {y}");
                    impossible += (x == -9999.0) as usize;
                }
                assert_tops_close(g, w, &label, 1e-4);
            }
            assert!(
                impossible > 0,
                "a narrow relative top makes some tokens impossible"
            );
            assert_eq!(
                batched.metric("exitserve_device_logprobs_total"),
                positions,
                "{} budget {budget}",
                f.name
            );
        }
        assert_eq!(host.metric("exitserve_device_logprobs_total"), 0.0);
    }
}

/// Each of `bodies` posted to `url`, all at once: the responses (each a 200).
async fn responses_at_once(url: &str, bodies: &[Value]) -> Vec<Value> {
    let tasks: Vec<_> = bodies
        .iter()
        .map(|body| {
            let (url, body) = (url.to_string(), body.clone());
            tokio::spawn(async move { post(&url, &body).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        out.push(body);
    }
    out
}

/// Each of `bodies` completed by `server`, all at once: its first choice's `logprobs`.
async fn logprobs_at_once(server: &TestServer, bodies: &[Value]) -> Vec<Value> {
    let url = server.url("/v1/completions");
    let out = responses_at_once(&url, bodies).await;
    out.iter()
        .map(|body| body["choices"][0]["logprobs"].clone())
        .collect()
}

/// Two responses' `logprobs` name the same alternatives at each position (none alike: an
/// echoed prompt's first token), their values within `tolerance`.
fn assert_tops_close(a: &Value, b: &Value, label: &str, tolerance: f64) {
    let (a, b) = (
        a["top_logprobs"].as_array().unwrap(),
        b["top_logprobs"].as_array().unwrap(),
    );
    assert_eq!(a.len(), b.len(), "{label}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x.is_null() {
            assert!(y.is_null(), "{label}: top_logprobs[{i}]");
            continue;
        }
        let (x, y) = (x.as_object().unwrap(), y.as_object().unwrap());
        assert_eq!(
            x.keys().collect::<Vec<_>>(),
            y.keys().collect::<Vec<_>>(),
            "{label}: top_logprobs[{i}]"
        );
        for (key, v) in x {
            let (v, w) = (v.as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!((v - w).abs() < tolerance, "{label} {key:?}: {v} vs {w}");
        }
    }
}

/// The GPU's own kernels on a server's batched path: `paged_attention.cu`, `fused_epilogue.cu`
/// and `choices.cu` run on the CPU (`kernels::cuda_emulator`, in place of the CPU kernels) for
/// every step. Every reference case at once, greedy with logprobs, equals the reference; a third
/// of them (each prompt and mode) seeded and sampled (from a few candidates), in DoLa (the step choosing among its candidates) and in
/// SLED, and an echoed prompt's scoring, equal what the CPU's kernels give on the same path
/// (tokens alike, logprobs within 1e-3, all but a few within 2e-5; within 2e-2 in a contrast
/// or DoLa, whose plausible set may hold a token at its edge on one side and not the other:
/// the last bits of the sums' order decide, and its normaliser moves every logprob of the step
/// by up to a few 1e-3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gpu_kernels_run_on_the_cpu_serve_as_the_cpu_kernels_do() {
    use exitserve::kernels::cuda_emulator;
    for f in ARCHS {
        let dir = f.dir();
        let argv = [&["--model", dir.to_str().unwrap()][..], &GPU_PATH].concat();
        let emulated = TestServer::start_with(&argv, |c| c.emulate_cuda = true);
        let kernels = TestServer::start_with(&argv, |_| {});
        let cases = f.reference().cases;
        let bodies: Vec<Value> = cases
            .iter()
            .map(|case| {
                let mut body = greedy_body_for(f.name, case);
                body["logprobs"] = json!(2);
                body
            })
            .collect();
        let launches = cuda_emulator::launches();
        let out = responses_at_once(&emulated.url("/v1/completions"), &bodies).await;
        for (case, out) in cases.iter().zip(&out) {
            let label = format!("{} {} {:?}", f.name, case.mode, case.prompt);
            assert_eq!(
                ids(&out["choices"][0]["token_ids"]),
                case.greedy_ids,
                "{label}"
            );
        }
        assert!(emulated.metric("exitserve_device_choices_total") > 0.0);
        assert!(emulated.metric("exitserve_device_logprobs_total") > 0.0);
        assert!(
            cuda_emulator::launches() > launches,
            "the emulated kernels ran"
        );

        let exits = exitserve::model::ModelConfig::from_file(&dir.join("config.json"))
            .unwrap()
            .exit_layers;
        let (below_top, prompt) = (&exits[..exits.len() - 1], cases[0].prompt.clone());
        // every third case: each prompt and mode, in a third of the time
        let mut bodies: Vec<Value> = bodies.into_iter().step_by(3).collect();
        for (i, body) in bodies.iter_mut().enumerate() {
            // a handful of candidates: the tiny models' rows are nearly flat, where the sums'
            // order alone (the GPU's, the CPU's) moves a draw over tens of thousands of tokens
            body["temperature"] = json!(0.9);
            body["top_k"] = json!(8);
            body["top_p"] = json!(0.9);
            body["seed"] = json!(i);
        }
        let strategy = |multi_exit: Value, temperature: f64| {
            json!({"model": f.name, "prompt": prompt, "max_tokens": 6, "logprobs": 2,
                   "temperature": temperature, "top_k": 8, "seed": 5, "return_token_ids": true,
                   "multi_exit": multi_exit})
        };
        for t in [0.0, 1.0] {
            bodies.push(strategy(json!({"mode": "dola", "layers": below_top}), t));
            bodies.push(strategy(json!({"mode": "sled", "evolution_scale": 5}), t));
        }
        bodies.push(
            json!({"model": f.name, "prompt": prompt.repeat(3), "echo": true,
                           "logprobs": 2, "max_tokens": 0}),
        );
        let got = logprobs_at_once(&emulated, &bodies).await;
        let want = logprobs_at_once(&kernels, &bodies).await;
        for ((g, w), body) in got.iter().zip(&want).zip(&bodies) {
            let label = format!("{} {body}", f.name);
            assert_eq!(g["tokens"], w["tokens"], "{label}");
            let tolerance = match body["multi_exit"]["mode"].as_str() {
                Some("contrast" | "dola") => 2e-2,
                _ => 1e-3,
            };
            let lps = |v: &Value| -> Vec<Option<f64>> {
                let lps = v["token_logprobs"].as_array().unwrap();
                lps.iter().map(|x| x.as_f64()).collect()
            };
            for (a, b) in lps(g).into_iter().zip(lps(w)) {
                match (a, b) {
                    (Some(a), Some(b)) => {
                        assert!((a - b).abs() < tolerance, "{label}: {a} vs {b}")
                    }
                    (a, b) => assert_eq!(a, b, "{label}"),
                }
            }
            assert_tops_close(g, w, &label, tolerance);
        }
    }
}

/// bfloat16 weights multiplied with float32 results (`--matmul wide`: the products a GPU runs)
/// agree with the float32 reference as often as the CPU's bfloat16 kernels do, every case at
/// once on the batched path. Candle's matmul rounds each product, the logits among them, to
/// bfloat16: on GPT-2's fixture that agreed on 23 of 54 cases where these agree on 45.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_products_with_float32_results_agree_as_the_cpu_kernels_do() {
    let f = common::GPT2;
    let cases = f.reference().cases;
    let bodies: Vec<Value> = cases.iter().map(|c| greedy_body_for(f.name, c)).collect();
    let agreeing = |out: Vec<Value>| {
        out.iter()
            .zip(&cases)
            .filter(|(out, case)| ids(&out["choices"][0]["token_ids"]) == case.greedy_ids)
            .count()
    };
    let bf16 = ["--dtype", "bf16"];
    let wide_flags = [
        "--attention",
        "batched",
        "--matmul",
        "wide",
        "--max-batch-size",
        "256",
    ];
    let wide = TestServer::start_model(&f.dir(), &[&bf16[..], &wide_flags].concat());
    let wide = agreeing(responses_at_once(&wide.url("/v1/completions"), &bodies).await);
    let kernels = TestServer::start_model(&f.dir(), &bf16);
    let kernels = agreeing(responses_at_once(&kernels.url("/v1/completions"), &bodies).await);
    // the two round differently (x to bfloat16 here, not there): a case or two either way
    assert!(
        wide + 2 >= kernels,
        "{wide} cases agree with float32 products, {kernels} with the CPU's kernels"
    );
}
