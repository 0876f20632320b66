//! The real binary: start-up faults are one clear line and exit code 1; SIGTERM lets requests
//! in flight finish; prompts never reach the logs.

use crate::common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{fixture_dir, free_port, FIXTURE, FIXTURE_BIN};

const BIN: &str = env!("CARGO_BIN_EXE_exitserve");

/// A scratch copy of a fixture folder, to break.
fn scratch(name: &str, from: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("exitserve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture_dir(from);
    if src.join("pytorch_model.bin.recipe.json").exists() {
        common::pth::ensure(&src);
    }
    for entry in std::fs::read_dir(src).unwrap() {
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

    // a NaN in a weight matrix: refused at start-up, naming the tensor
    let d = scratch("nan", FIXTURE);
    let path = d.join("model.safetensors");
    let mut st = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&st[8..8 + header_len]).unwrap();
    let name = "transformer.h.1.mlp.c_fc.weight";
    assert_eq!(header[name]["dtype"], "F16");
    let at = 8 + header_len + header[name]["data_offsets"][0].as_u64().unwrap() as usize + 2 * 5;
    st[at..at + 2].copy_from_slice(&0x7E00u16.to_le_bytes()); // a float16 NaN
    std::fs::write(&path, st).unwrap();
    expect_startup_error(
        &d,
        &format!("tensor `{name}` holds a non-finite value (NaN) at flat index 5"),
    );

    let (code, stderr) = run_to_exit(&[
        "--model",
        fixture_dir(FIXTURE).to_str().unwrap(),
        "--cors-allow-origin",
        "https://app.example/",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("--cors-allow-origin `https://app.example/`"),
        "{stderr}"
    );

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

/// Rewrites the JSON header of `dir`'s model.safetensors with `edit` (which must keep its
/// length, so the data offsets stay valid).
fn edit_safetensors_header(dir: &Path, edit: impl Fn(&str) -> String) {
    let path = dir.join("model.safetensors");
    let mut st = std::fs::read(&path).unwrap();
    let len = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(st[8..8 + len].to_vec()).unwrap();
    let edited = edit(&header);
    assert_ne!(edited, header, "the edit applies");
    assert_eq!(edited.len(), len);
    st[8..8 + len].copy_from_slice(edited.as_bytes());
    std::fs::write(&path, st).unwrap();
}

#[test]
fn gpt2_startup_faults_are_one_clear_line_and_exit_1() {
    let gpt2 = common::GPT2.name;
    let edit_config = |d: &Path, from: &str, to: &str| {
        let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
        assert!(cfg.contains(from), "{from}");
        std::fs::write(d.join("config.json"), cfg.replace(from, to)).unwrap();
    };

    // a Conv1D weight stored the nn.Linear way round, (out, in) instead of (in, out)
    let d = scratch("gpt2-conv1d", gpt2);
    edit_safetensors_header(&d, |h| {
        let key = "\"transformer.h.0.attn.c_attn.weight\":{\"dtype\":\"F16\",\"shape\":[32,96]";
        assert!(h.contains(key), "{h}");
        h.replace(key, &key.replace("[32,96]", "[96,32]"))
    });
    expect_startup_error(&d, "transformer.h.0.attn.c_attn.weight");

    let d = scratch("gpt2-no-c-attn", gpt2);
    edit_safetensors_header(&d, |h| {
        h.replace(
            "transformer.h.3.attn.c_attn.weight",
            "transformer.h.3.attn.c_attX.weight",
        )
    });
    expect_startup_error(&d, "transformer.h.3.attn.c_attn.weight");

    let d = scratch("gpt2-exit", gpt2);
    edit_config(&d, "    6\n  ],", "    8\n  ],");
    expect_startup_error(
        &d,
        "field `lm_head_layer_indices`: exit layer 8 is outside 1..=6",
    );

    let d = scratch("gpt2-scale", gpt2);
    edit_config(
        &d,
        "\"scale_attn_by_inverse_layer_idx\": false",
        "\"scale_attn_by_inverse_layer_idx\": true",
    );
    expect_startup_error(
        &d,
        "field `scale_attn_by_inverse_layer_idx`: true is not supported",
    );

    let d = scratch("gpt2-upcast", gpt2);
    edit_config(
        &d,
        "\"reorder_and_upcast_attn\": false",
        "\"reorder_and_upcast_attn\": true",
    );
    expect_startup_error(&d, "field `reorder_and_upcast_attn`: true is not supported");
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

fn spawn(port: u16, extra: &[&str]) -> Child {
    spawn_model(&fixture_dir(FIXTURE), port, extra, Stdio::piped())
}

/// Starts the binary on `model` and waits until it is healthy.
fn spawn_model(model: &Path, port: u16, extra: &[&str], stderr: Stdio) -> Child {
    let child = Command::new(BIN)
        .args([
            "--model",
            model.to_str().unwrap(),
            "--port",
            &port.to_string(),
        ])
        .args(extra)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
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
        // query strings may carry secrets: debug logs name the path only
        let r = reqwest::get(format!(
            "http://127.0.0.1:{port}/v1/models?api_key=query-secret-123"
        ))
        .await
        .unwrap();
        assert_eq!(r.status(), 200);
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
    assert!(logs.contains("/v1/models"), "debug logs name the path");
    assert!(
        !logs.contains("query-secret-123"),
        "a query string leaked:\n{logs}"
    );
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

/// A random GPT-Neo checkpoint big enough that a long completion takes seconds on two cores
/// (hidden 128, a 50257-token vocabulary, 2048 positions), written once per build folder.
fn slow_model() -> PathBuf {
    use crate::checkpoint::{ensure, Arch, Shape};
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("slow-gpt-neo-multiexit");
    let shape = Shape {
        arch: Arch::GptNeo,
        vocab: 50257,
        hidden: 128,
        layers: 4,
        heads: 4,
        positions: 2048,
        window: 256,
        exits: vec![2, 4],
    };
    ensure(&dir, &shape, &fixture_dir(FIXTURE)).unwrap();
    dir
}

fn post_raw(port: u16, body: &str) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).unwrap();
    s
}

/// Reads from `s` until `needle` has arrived (or the connection ends); returns all read.
fn read_until(s: &mut std::net::TcpStream, needle: &str) -> String {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    while !String::from_utf8_lossy(&got).contains(needle) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

const LONG_STREAM: &str = r#"{"model":"slow-gpt-neo-multiexit","prompt":"x","max_tokens":2000,"n":4,"ignore_eos":true,"stream":true}"#;

#[test]
fn grace_expiry_ends_open_streams_with_an_error_event_and_done() {
    let model = slow_model();
    let port = free_port();
    let mut child = spawn_model(&model, port, &["--shutdown-grace", "0.5"], Stdio::null());
    let mut s = post_raw(port, LONG_STREAM);
    let first = read_until(&mut s, "\"text\"");
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    sigterm(&child);
    let rest = read_until(&mut s, "[DONE]");
    let events: Vec<&str> = rest
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    let n = events.len();
    assert!(n >= 2, "{rest}");
    assert_eq!(events[n - 1], "[DONE]");
    let last: serde_json::Value = serde_json::from_str(events[n - 2]).unwrap();
    assert_eq!(last["error"]["code"], "shutting_down", "{last}");
    assert!(
        !rest.contains("\"finish_reason\":\"length\""),
        "the stream was to be cut, not finished"
    );
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_second_signal_exits_at_once() {
    let model = slow_model();
    let port = free_port();
    let mut child = spawn_model(&model, port, &["--shutdown-grace", "120"], Stdio::null());
    let mut s = post_raw(port, LONG_STREAM);
    read_until(&mut s, "\"text\"");
    sigterm(&child);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first signal waits for the stream"
    );
    let t = Instant::now();
    sigterm(&child);
    let code = child.wait().unwrap();
    assert!(code.success(), "{code:?}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
}

#[test]
fn a_half_sent_request_does_not_hold_shutdown() {
    use std::io::Write;
    let port = free_port();
    let mut child = spawn(port, &["--shutdown-grace", "120"]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{{\"model\":").unwrap();
    // and a head that never ends
    let mut h = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(h, "GET /health HTTP/1.1\r\nhost: x\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    sigterm(&child);
    let resp = read_until(&mut s, "}}");
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(resp.contains("shutting_down"), "{resp}");
    assert!(child.wait().unwrap().success());
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
}

#[test]
fn logs_that_cannot_be_written_never_stop_the_server() {
    // every log line fails with ENOSPC
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let port = free_port();
    let mut child = spawn_model(&fixture_dir(FIXTURE), port, &[], Stdio::from(full));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let url = format!("http://127.0.0.1:{port}/v1/completions");
        for stream in [false, true, false] {
            let r = reqwest::Client::new()
                .post(&url)
                .json(
                    &serde_json::json!({"model": "tiny-gpt-neo-multiexit", "prompt": "hello",
                    "max_tokens": 8, "stream": stream, "n": 2}),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let text = r.text().await.unwrap();
            assert!(!text.contains("\"error\""), "{text}");
        }
        // an error path logs too
        let r = reqwest::Client::new()
            .post(&url)
            .json(&serde_json::json!({"model": "nope", "prompt": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let r = reqwest::get(format!("http://127.0.0.1:{port}/health"))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    });
    sigterm(&child);
    assert!(child.wait().unwrap().success());
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn concurrent_megabyte_prompts_leave_memory_bounded() {
    let port = free_port();
    let mut child = spawn(port, &["--max-body-bytes", "2000000"]);
    let before = peak_rss_kib(child.id());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let url = format!("http://127.0.0.1:{port}/v1/completions");
        let text = "many words of a prompt ".repeat(1 << 16); // 1.5 MB
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let (url, text) = (url.clone(), text.clone());
                tokio::spawn(async move {
                    reqwest::Client::new()
                        .post(&url)
                        .json(
                            &serde_json::json!({"model": "tiny-gpt-neo-multiexit", "prompt": text}),
                        )
                        .send()
                        .await
                        .unwrap()
                        .status()
                        .as_u16()
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), 400);
        }
    });
    let growth_mib = (peak_rss_kib(child.id()) - before) / 1024;
    // 32 bodies of 1.5 MB are ~50 MB; tokenizing them all at once took gigabytes
    assert!(growth_mib < 400, "peak RSS grew by {growth_mib} MiB");
    sigterm(&child);
    assert!(child.wait().unwrap().success());
}
