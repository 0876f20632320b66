//! The real binary: start-up faults are one clear line and exit code 1; SIGTERM lets requests
//! in flight finish; prompts never reach the logs.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{fixture_dir, FIXTURE, FIXTURE_BIN};

const BIN: &str = env!("CARGO_BIN_EXE_exitserve");

/// A scratch copy of a fixture folder, to break.
fn scratch(name: &str, from: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("exitserve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture_dir(from)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    dir
}

/// Runs the binary to completion; returns (exit code, stderr).
fn run_to_exit(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn expect_startup_error(dir: &Path, needle: &str) {
    let (code, stderr) = run_to_exit(&["--model", dir.to_str().unwrap(), "--port", "0"]);
    assert_eq!(code, 1, "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("exitserve: "))
        .collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{stderr}");
    assert!(
        errors[0].contains(needle),
        "{:?} lacks {needle:?}",
        errors[0]
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn startup_faults_are_one_clear_line_and_exit_1() {
    let d = scratch("missing", FIXTURE);
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    std::fs::remove_file(d.join("vocab.json")).unwrap();
    expect_startup_error(&d, "no tokenizer");

    let d = scratch("truncated", FIXTURE);
    let st = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &st[..st.len() / 3]).unwrap();
    expect_startup_error(&d, "model.safetensors");

    let d = scratch("corrupt", FIXTURE_BIN);
    let mut bin = std::fs::read(d.join("pytorch_model.bin")).unwrap();
    let mid = bin.len() / 2;
    bin.truncate(mid);
    std::fs::write(d.join("pytorch_model.bin"), &bin).unwrap();
    expect_startup_error(&d, "pytorch_model.bin");

    let d = scratch("modeltype", FIXTURE);
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace("\"gpt_neo\"", "\"llama\""),
    )
    .unwrap();
    expect_startup_error(&d, "field `model_type`: unsupported model type `llama`");

    let d = scratch("exits", FIXTURE);
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    let cfg = cfg.replace(
        "\"lm_head_layer_indices\": [\n    1,",
        "\"lm_head_layer_indices\": [\n    9,",
    );
    std::fs::write(d.join("config.json"), cfg).unwrap();
    expect_startup_error(&d, "exit layer 9 is outside 1..=4");

    let d = scratch("missingtensor", FIXTURE);
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace(
            "\"lm_head_layer_indices\": [\n    1,",
            "\"lm_head_layer_indices\": [\n    3,",
        ),
    )
    .unwrap();
    expect_startup_error(&d, "name_to_lm_exit_head.lm_head_3.weight");

    let d = scratch("shape", FIXTURE);
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace(
            "\"max_position_embeddings\": 256",
            "\"max_position_embeddings\": 512",
        ),
    )
    .unwrap();
    expect_startup_error(&d, "transformer.wpe.weight");

    let (code, stderr) = run_to_exit(&["--model", "/nonexistent/folder", "--port", "0"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("/nonexistent/folder: no such model folder"),
        "{stderr}"
    );
    let (code, stderr) = run_to_exit(&[
        "--default-mode",
        "exit:3",
        "--model",
        fixture_dir(FIXTURE).to_str().unwrap(),
        "--port",
        "0",
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("available exits: [1, 2, 4]"), "{stderr}");
    // int8 exists only on our CPU kernels: asking for it without them is a startup error
    let (code, stderr) = run_to_exit(&[
        "--dtype",
        "int8",
        "--matmul",
        "candle",
        "--model",
        fixture_dir(FIXTURE).to_str().unwrap(),
        "--port",
        "0",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("int8 weights need the skinny CPU kernels"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let (code, stderr) = run_to_exit(&["--max-batch-size", "zero"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--max-batch-size"), "{stderr}");
}

#[test]
fn a_taken_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, stderr) = run_to_exit(&[
        "--model",
        fixture_dir(FIXTURE).to_str().unwrap(),
        "--port",
        &port,
    ]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(port: u16, extra: &[&str]) -> Child {
    let child = Command::new(BIN)
        .args([
            "--model",
            fixture_dir(FIXTURE).to_str().unwrap(),
            "--port",
            &port.to_string(),
        ])
        .args(extra)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // wait for health (the model loads after the port is bound)
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        loop {
            if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/health")).await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "server not healthy"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    child
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[test]
fn sigterm_lets_requests_in_flight_finish_and_logs_hold_no_prompts() {
    let port = free_port();
    let mut child = spawn(port, &[]);
    let secret = "my-secret-prompt-words";
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, body) = rt.block_on(async {
        let url = format!("http://127.0.0.1:{port}/v1/completions");
        let req = tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(url)
                .json(
                    &serde_json::json!({"model": "tiny-gpt-neo-multiexit", "prompt": secret,
                    "max_tokens": 240, "ignore_eos": true, "seed": 7,
                    "multi_exit": {"mode": "contrast", "upper": "original", "lower": 1}}),
                )
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        sigterm(&child);
        req.await.unwrap()
    });
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 240);
    let code = child.wait().unwrap();
    assert!(code.success(), "{code:?}");
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(logs.contains("completed"), "{logs}");
    assert!(
        !logs.contains(secret),
        "the prompt leaked into the logs:\n{logs}"
    );
    // Seeded, so the text is the same each run and long enough for the check to mean
    // something (an unseeded sample could be a few common characters found in any log).
    let generated = body["choices"][0]["text"].as_str().unwrap().trim();
    assert!(generated.chars().count() >= 20, "{generated:?}");
    assert!(
        !logs.contains(generated),
        "completion text leaked into the logs"
    );
}

#[test]
fn the_grace_period_bounds_shutdown() {
    let port = free_port();
    let mut child = spawn(
        port,
        &["--shutdown-grace", "0.2", "--request-timeout", "600"],
    );
    // a streaming client that never reads keeps its request in flight
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    use std::io::Write;
    let body = r#"{"model":"tiny-gpt-neo-multiexit","prompt":"x","max_tokens":250,"ignore_eos":true,"stream":true}"#;
    write!(s, "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    sigterm(&child);
    let code = child.wait().unwrap();
    assert!(code.success());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}
