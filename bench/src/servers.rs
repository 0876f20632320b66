//! The servers under test, each a real process on a free port: exitserve (next to this
//! binary) and llama.cpp's `llama-server`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client;

pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    /// exitserve on `model` with `flags` besides the bench's own (e.g. int8 on a CPU without
    /// the kernels exits at start).
    pub fn exitserve_with(
        bin: &Path,
        model: &Path,
        dtype: &str,
        flags: &[&str],
    ) -> Result<Self, String> {
        let port = free_port();
        let mut cmd = Command::new(bin);
        if !flags.contains(&"--max-batch-size") {
            cmd.args(["--max-batch-size", "32"]);
        }
        cmd.args(["--model", model.to_str().unwrap(), "--dtype", dtype])
            .args(["--port", &port.to_string()])
            .args(["--served-model-name", "bench"])
            .args(flags)
            .env("RUST_LOG", "warn");
        Self::start(
            cmd,
            port,
            &format!("exitserve --dtype {dtype} {}", flags.join(" ")),
        )
    }

    /// llama.cpp's server on `gguf`, set up as a user serving many clients would: 16
    /// parallel slots (continuous batching is its default), the bench's context per slot,
    /// as many threads as exitserve uses (every core).
    pub fn llama_server(bin: &Path, gguf: &Path) -> Result<Self, String> {
        if !gguf.exists() {
            return Err(format!(
                "no {} (run bench/peer/llama_cpp.sh)",
                gguf.display()
            ));
        }
        let port = free_port();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut cmd = Command::new(bin);
        cmd.args(["-m", gguf.to_str().unwrap(), "--port", &port.to_string()])
            .args(["--parallel", "16", "--ctx-size", &(16 * 1024).to_string()])
            .args(["--threads", &threads.to_string()])
            .args(["--threads-batch", &threads.to_string()])
            .stderr(Stdio::null());
        Self::start(cmd, port, "llama-server")
    }

    /// Starts `cmd` listening on `port` and waits until its /health answers 200, or says
    /// why it exited.
    fn start(mut cmd: Command, port: u16, what: &str) -> Result<Self, String> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("start {what}: {e} (build it with --release first)"))?;
        let base = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        while client::get_status(&format!("{base}/health")) != Some(200) {
            if let Some(status) = child.try_wait().expect("wait") {
                return Err(format!("{what} exited at start ({status})"));
            }
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "{what} did not become healthy"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("  server up in {:.1} s", start.elapsed().as_secs_f64());
        Ok(Self { child, base })
    }

    /// The completions endpoint.
    pub fn completions(&self) -> String {
        format!("{}/v1/completions", self.base)
    }

    /// Peak resident set (VmHWM) of the server process, in bytes (Linux).
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}
