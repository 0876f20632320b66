//! The hub path end to end, for both architectures, against a stand-in hub on loopback
//! (`HF_ENDPOINT`): the real binary downloads a repo into a temporary `HF_HOME` (the legacy
//! `.bin` + vocab/merges of `main`, or the safetensors of `refs/pr/1`, as the released
//! checkpoints have them), serves it with the reference's outputs, starts again from the
//! cache alone with `HF_HUB_OFFLINE=1`, and an interrupted download ends in one error line and
//! leaves no corrupt cache entry.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::hub::HubBuilder;
use common::{free_port, greedy_body_for, ids, Fixture, ARCHS};

const BIN: &str = env!("CARGO_BIN_EXE_exitserve");

fn temp_home(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("exitserve-hub-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The binary on `repo`, with `env`; `Ok(child)` once healthy, `Err((code, stderr))` if it
/// exits first.
fn start(
    repo: &str,
    extra: &[&str],
    env: &[(&str, &str)],
    port: u16,
) -> Result<Child, (i32, String)> {
    let mut child = Command::new(BIN)
        .args(["--model", repo, "--port", &port.to_string()])
        .args(extra)
        .env_remove("HF_HUB_OFFLINE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            return Err((status.code().unwrap_or(-1), err));
        }
        if http_get(port, "/health").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
            return Ok(child);
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn http_get(port: u16, path: &str) -> Option<String> {
    http(
        port,
        &format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    )
}

fn http(port: u16, request: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The served model reproduces the fixture's first few reference cases (all its modes).
fn check_serves_reference(port: u16, f: Fixture, served: &str) {
    let cases = f.reference().cases;
    for case in cases.iter().step_by(6).take(9) {
        let body = greedy_body_for(served, case).to_string();
        let res = http(
            port,
            &format!(
                "POST /v1/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
                 content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
        .expect("a response");
        let (head, json) = res.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{res}");
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(
            ids(&v["choices"][0]["token_ids"]),
            case.greedy_ids,
            "{} {}",
            f.name,
            case.mode
        );
    }
}

fn stop(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Every file of a cached snapshot of `repo` in `home`.
fn cached_files(home: &Path, repo: &str) -> Vec<String> {
    let snapshots = home
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")))
        .join("snapshots");
    let mut out = Vec::new();
    for snap in std::fs::read_dir(snapshots).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(snap.path()).unwrap().flatten() {
            out.push(f.file_name().into_string().unwrap());
        }
    }
    out.sort();
    out
}

#[test]
fn both_checkpoint_layouts_download_serve_and_restart_offline() {
    for f in ARCHS {
        let repo = format!("ibm-standin/{}", f.name);
        let endpoint = HubBuilder::new()
            .revision(&repo, "main", &f.bin_dir())
            .revision(&repo, "refs/pr/1", &f.dir())
            .start();
        for (revision, weights) in [
            ("main", "pytorch_model.bin"),
            ("refs/pr/1", "model.safetensors"),
        ] {
            let home = temp_home(&format!("{}-{}", f.name, revision.replace('/', "-")));
            let home_s = home.to_str().unwrap();
            let served = ["--served-model-name", "m", "--revision", revision];
            let port = free_port();
            let child = start(
                &repo,
                &served,
                &[("HF_ENDPOINT", &endpoint), ("HF_HOME", home_s)],
                port,
            )
            .unwrap_or_else(|(code, err)| panic!("{repo}@{revision}: exit {code}\n{err}"));
            check_serves_reference(port, f, "m");
            stop(child);
            let cached = cached_files(&home, &repo);
            assert!(cached.contains(&weights.to_string()), "{cached:?}");
            assert!(cached.contains(&"config.json".to_string()), "{cached:?}");

            // the cache alone: a dead endpoint proves nothing is fetched
            let port = free_port();
            let dead = format!("http://127.0.0.1:{}", free_port());
            let child = start(
                &repo,
                &served,
                &[
                    ("HF_ENDPOINT", &dead),
                    ("HF_HOME", home_s),
                    ("HF_HUB_OFFLINE", "1"),
                ],
                port,
            );
            let child = match child {
                Ok(c) => c,
                Err((code, err)) => panic!("offline {repo}@{revision}: exit {code}\n{err}"),
            };
            check_serves_reference(port, f, "m");
            stop(child);
            std::fs::remove_dir_all(&home).ok();
        }
    }
}

#[test]
fn an_interrupted_download_is_one_error_line_and_leaves_no_corrupt_entry() {
    // a dropped connection (hf-hub's reader sees it), and a short body that looks complete
    // (only the size the hub lists catches it)
    let cases = ARCHS.iter().flat_map(|f| {
        [
            (
                *f,
                "dropped",
                "response body closed before all bytes were read",
            ),
            (*f, "short", "`pytorch_model.bin` arrived with"),
        ]
    });
    for (f, how, message) in cases {
        let repo = format!("ibm-standin/{}-{how}", f.name);
        let hub = HubBuilder::new().revision(&repo, "main", &f.bin_dir());
        let endpoint = match how {
            "dropped" => hub.break_file("pytorch_model.bin"),
            _ => hub.truncate_file("pytorch_model.bin"),
        }
        .start();
        let home = temp_home(&format!("{}-{how}", f.name));
        let home_s = home.to_str().unwrap();
        let env = [("HF_ENDPOINT", endpoint.as_str()), ("HF_HOME", home_s)];
        let (code, stderr) = start(&repo, &[], &env, free_port())
            .map(stop)
            .expect_err("the download breaks");
        assert_eq!(code, 1, "{stderr}");
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("exitserve: "))
            .collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        eprintln!("{}", errors[0]);
        assert!(
            errors[0].contains(&format!("{repo}@main: ")) && errors[0].contains(message),
            "{}",
            errors[0]
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        // no cache entry for the weights: an offline start says so instead of loading half
        assert!(
            !cached_files(&home, &repo).contains(&"pytorch_model.bin".to_string()),
            "{:?}",
            cached_files(&home, &repo)
        );
        let offline = [("HF_HOME", home_s), ("HF_HUB_OFFLINE", "1")];
        let (code, stderr) = start(&repo, &[], &offline, free_port())
            .map(stop)
            .expect_err("nothing usable is cached");
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains("no weights"), "{stderr}");
        std::fs::remove_dir_all(&home).ok();
    }
}
