//! The server on the path a GPU takes (`--attention batched --matmul candle`: batched attention
//! over the paged cache, candle's matmul), on the CPU, through HTTP: every reference case at
//! once, plainly, with self-speculative decoding and with `n` = 2 (a forked cache), equal to
//! the reference; echo scoring equal to the CPU kernels' within float32 rounding.

use crate::common;

use common::client::post;
use common::server::TestServer;
use common::{greedy_body_for, ids, ARCHS};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_at_once_on_the_batched_path_equals_the_reference() {
    for f in ARCHS {
        let flags = [
            "--attention",
            "batched",
            "--matmul",
            "candle",
            "--max-batch-size",
            "256",
        ];
        let server = TestServer::start_model(&f.dir(), &flags);
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
                let label = format!("{} {} {:?} {}", f.name, case.mode, case.prompt, body);
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
