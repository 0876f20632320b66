//! Benchmark through the real HTTP server on a random checkpoint shaped like GPT-Neo-125M
//! (`--arch gpt_neo`, the default) or GPT-2 medium (`--arch gpt2`).
//!
//!   cargo run --release --bin bench -- [--arch gpt2] [--dtype f32,bf16,int8] [--reference-python PY]
//!   cargo run --release --bin bench -- --kernels     (vocabulary-head matmul variants)
//!   cargo run --release --bin bench -- --speculative (self-speculative decoding vs acceptance)
//!   cargo run --release --bin bench -- --limits      (this machine's bandwidth and peaks only)
//!   cargo run --release --bin bench -- --arch gpt2 --peer-llama-server PATH   (llama.cpp too,
//!                                                    built by bench/peer/llama_cpp.sh)
//!
//! Writes the checkpoint once under --data, starts `exitserve` (next to this binary) per
//! dtype, measures single-stream decode speed and time to first token (the bench's prompt and a
//! 512-token one) per mode, aggregate throughput at 1/4/16 concurrent streams, the scoring
//! workload (512-token echo prompts), peak RSS; measures the machine's read bandwidth and
//! multiply-add peaks in the same run and gives each speed as a share of its bound; prints a
//! table and writes JSON.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use exitserve::bench::checkpoint::{Arch, Shape};
use exitserve::bench::cost::{self, ModeWork};
use exitserve::bench::{checkpoint, client, limits, peak_rss_bytes};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "exitserve benchmark (real HTTP server, random weights of a released shape)")]
struct Args {
    /// The checkpoint's shape: GPT-Neo-125M or GPT-2 medium, with their released exits
    #[arg(long, value_enum, default_value = "gpt_neo")]
    arch: Arch,
    /// Where the random checkpoint is written (once) and cached
    /// [default: bench-data/{gpt-neo-125m,gpt2-medium}-multiexit-random]
    #[arg(long)]
    data: Option<PathBuf>,
    /// Weight dtypes to serve, comma-separated (f32, f16, bf16, int8)
    #[arg(long, default_value = "f32,bf16,int8", value_delimiter = ',')]
    dtype: Vec<String>,
    /// Prompt length in tokens
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// New tokens per request (greedy)
    #[arg(long, default_value_t = 64)]
    new: usize,
    /// Concurrency levels for aggregate throughput
    #[arg(long, default_value = "1,4,16", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Python of the reference stack (shared/bench/setup_ref.sh) to time it in the same run
    #[arg(long)]
    reference_python: Option<PathBuf>,
    /// The reference benchmark script
    #[arg(long, default_value = "../shared/bench/ref_bench.py")]
    reference_script: PathBuf,
    /// JSON results file [default: bench-results.json, bench-results-gpt2.json for gpt2,
    /// bench-results-speculative.json with --speculative]
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only time vocabulary-head matmul variants (no server)
    #[arg(long)]
    kernels: bool,
    /// Only measure this machine's limits (read bandwidth, multiply-add peaks) and print them
    #[arg(long)]
    limits: bool,
    /// Only time self-speculative decoding: speedup against acceptance rate, on variants of
    /// the checkpoint whose exits agree with the original head at controlled rates
    /// (written once under --data with an `-agree-S` suffix); results in
    /// bench-results-speculative.json
    #[arg(long)]
    speculative: bool,
    /// The variants' upper-block scales (0: the exits always agree; larger, less often)
    #[arg(long, default_value = "0,0.5,1,2", value_delimiter = ',')]
    spec_scales: Vec<f32>,
    /// Draft layers timed (the variants quiet the blocks above the lowest)
    #[arg(long, default_value = "4,6,8", value_delimiter = ',')]
    spec_draft_layers: Vec<usize>,
    /// `max_draft_tokens` values timed
    #[arg(long, default_value = "2,4,8", value_delimiter = ',')]
    spec_draft_tokens: Vec<usize>,
    /// Concurrent streams timed for speculation
    #[arg(long, default_value = "1,4", value_delimiter = ',')]
    spec_streams: Vec<usize>,
    /// What drafts read (`--speculative-draft-weights`), each timed
    #[arg(long, default_value = "int8,model", value_delimiter = ',')]
    spec_draft_weights: Vec<String>,
    /// Scoring workload (lm-eval loglikelihood): this many prompts with `echo`, `logprobs: 1`,
    /// `max_tokens: 1`, 4 at a time (0: skip)
    #[arg(long, default_value_t = 16)]
    scoring_prompts: usize,
    /// Tokens per scoring prompt
    #[arg(long, default_value_t = 512)]
    scoring_len: usize,
    /// llama.cpp's llama-server (bench/peer/llama_cpp.sh builds it): time it on the same
    /// weights (the GPT-2 shape, exits stripped, as GGUF f32 / bf16 / q8_0) in the same run
    #[arg(long)]
    peer_llama_server: Option<PathBuf>,
    /// Where bench/peer/llama_cpp.sh wrote gpt2-medium-{f32,bf16,q8_0}.gguf
    #[arg(long, default_value = "bench-data/llama.cpp")]
    peer_gguf: PathBuf,
}

/// A mode timed: its name, its `multi_exit` JSON and the work a token takes in it.
struct BenchMode {
    name: String,
    json: String,
    work: ModeWork,
}

/// The modes timed: the original head, the exit at half depth, and the top exit contrasted
/// with it (12/6 on GPT-Neo-125M, 24/12 on GPT-2 medium).
fn modes(shape: &Shape) -> Vec<BenchMode> {
    let (top, half) = (shape.layers, shape.half_exit());
    let mode = |name: String, json: String, layers, heads| BenchMode {
        name,
        json,
        work: ModeWork { layers, heads },
    };
    vec![
        mode("original".into(), r#"{"mode":"original"}"#.into(), top, 1),
        mode(
            format!("exit {half}"),
            format!(r#"{{"mode":"exit","layer":{half}}}"#),
            half,
            1,
        ),
        mode(
            format!("contrast {top}/{half}"),
            format!(r#"{{"mode":"contrast","upper":{top},"lower":{half}}}"#),
            top,
            2,
        ),
    ]
}

fn main() {
    let mut args = Args::parse();
    if args.kernels {
        kernels();
        return block_products(&Shape::of(args.arch), args.scoring_len);
    }
    if args.limits {
        let limits = limits::Limits::measure();
        println!(
            "{}",
            serde_json::to_string_pretty(&limits.to_json()).unwrap()
        );
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shape = Shape::of(args.arch);
    let (data, out) = match args.arch {
        Arch::GptNeo => ("gpt-neo-125m", "bench-results.json"),
        Arch::Gpt2 => ("gpt2-medium", "bench-results-gpt2.json"),
    };
    let data = args
        .data
        .get_or_insert_with(|| format!("bench-data/{data}-multiexit-random").into())
        .clone();
    if !args.speculative {
        args.out.get_or_insert_with(|| out.into());
    }
    eprintln!("checkpoint: {}", data.display());
    let t = Instant::now();
    let f32_bytes = checkpoint::ensure(
        &data,
        &shape,
        &root.join("tests/fixtures/tiny-gpt-neo-multiexit"),
    )
    .expect("write the benchmark checkpoint");
    eprintln!(
        "  ready in {:.1} s ({:.2} GB of float32 weights)",
        t.elapsed().as_secs_f64(),
        f32_bytes as f64 / 1e9
    );
    let server_bin = std::env::current_exe().unwrap().with_file_name("exitserve");
    let prompt = prompt_ids(args.prompt_len, 0);
    if args.speculative {
        let report = speculative_bench(&args, &shape, root, &server_bin, &prompt);
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| "bench-results-speculative.json".into());
        std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
        eprintln!("wrote {}", out.display());
        return;
    }
    if args.peer_llama_server.is_some() && args.arch != Arch::Gpt2 {
        eprintln!("--peer-llama-server needs --arch gpt2 (llama.cpp has no GPT-Neo)");
        std::process::exit(2);
    }
    let modes = modes(&shape);
    eprintln!("machine limits ...");
    let limits = limits::Limits::measure();
    eprintln!("  {}", limits.summary());
    let bench = Bench {
        args: &args,
        shape: &shape,
        limits: &limits,
    };

    // The peer serves the original head, as a plain OpenAI request; each of its runs follows
    // exitserve's run at the matching precision, minutes apart rather than a whole run apart,
    // because a shared machine's speed drifts.
    let original = [BenchMode {
        json: String::new(),
        name: modes[0].name.clone(),
        work: modes[0].work,
    }];
    let mut runs = Vec::new();
    let mut peer_runs = Vec::new();
    for dtype in &args.dtype {
        let weight_bytes = match dtype.as_str() {
            "f32" => f32_bytes,
            "int8" => f32_bytes / 4,
            _ => f32_bytes / 2,
        };
        eprintln!("exitserve {dtype}:");
        let run = match Server::exitserve(&server_bin, &data, dtype) {
            Ok(server) => {
                let mut run = bench.serve(&server, dtype, &modes);
                if args.scoring_prompts > 0 {
                    run["scoring"] = bench.scoring(&server, dtype, &modes);
                }
                let rss = peak_rss_bytes(server.child.id()).unwrap_or(0);
                run["peak_rss_bytes"] = json!(rss);
                run["weight_bytes"] = json!(weight_bytes);
                run["rss_over_weights"] = json!(rss as f64 / weight_bytes as f64);
                run
            }
            Err(why) => {
                eprintln!("  {why}: not measured");
                json!({"dtype": dtype, "not_measured": why})
            }
        };
        runs.push(run);
        let Some(bin) = &args.peer_llama_server else {
            continue;
        };
        // the GGUF precisions bench/peer/llama_cpp.sh writes
        let quant = match dtype.as_str() {
            "int8" => "q8_0",
            "f32" | "bf16" => dtype,
            _ => continue,
        };
        let gguf = args.peer_gguf.join(format!("gpt2-medium-{quant}.gguf"));
        eprintln!("llama-server {quant} ({}):", gguf.display());
        match Server::llama_server(bin, &gguf) {
            Ok(server) => {
                let mut run = bench.serve(&server, quant, &original);
                run["compared_with"] = json!(dtype);
                run["peak_rss_bytes"] = json!(peak_rss_bytes(server.child.id()).unwrap_or(0));
                peer_runs.push(run);
            }
            Err(why) => {
                eprintln!("  {why}: not measured");
                peer_runs.push(json!({"dtype": quant, "not_measured": why}));
            }
        }
    }
    let peer = args
        .peer_llama_server
        .as_ref()
        .map(|bin| json!({"server": "llama.cpp llama-server", "binary": bin, "runs": peer_runs}));
    let reference = args
        .reference_python
        .as_ref()
        .map(|py| run_reference(py, &args));
    let reference_scoring = match (&args.reference_python, args.scoring_prompts) {
        (Some(py), n) if n > 0 => Some(run_reference_scoring(py, &args)),
        _ => None,
    };
    let report = json!({
        "machine": machine(),
        "limits": limits.to_json(),
        "arch": format!("{:?}", args.arch),
        "layers": shape.layers,
        "hidden": shape.hidden,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new,
        "runs": runs,
        "peer": peer,
        "reference": reference,
        "reference_scoring": reference_scoring,
    });
    print_table(&report, &modes);
    let out = args.out.as_ref().expect("set above");
    std::fs::write(out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    eprintln!("wrote {}", out.display());
}

/// `n` deterministic token ids in 1000..40000 (like the reference benchmark's prompts); each
/// `seed` a different prompt, so no server can answer from a cached prefix.
fn prompt_ids(n: usize, seed: u64) -> Vec<u32> {
    let mut x = 0x9E37_79B9u64 ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            1000 + ((x >> 33) % 39000) as u32
        })
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    /// exitserve on `model` (e.g. int8 on a CPU without the kernels exits at start).
    fn exitserve(bin: &Path, model: &Path, dtype: &str) -> Result<Self, String> {
        Self::exitserve_with(bin, model, dtype, &[])
    }

    /// exitserve with `flags` besides the bench's own.
    fn exitserve_with(
        bin: &Path,
        model: &Path,
        dtype: &str,
        flags: &[&str],
    ) -> Result<Self, String> {
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.args(["--model", model.to_str().unwrap(), "--dtype", dtype])
            .args(["--port", &port.to_string()])
            .args(["--max-batch-size", "32", "--served-model-name", "bench"])
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
    fn llama_server(bin: &Path, gguf: &Path) -> Result<Self, String> {
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
        let addr = format!("127.0.0.1:{port}");
        let start = Instant::now();
        while client::get_status(&addr, "/health").ok() != Some(200) {
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
        Ok(Self { child, addr })
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

/// A streamed greedy completion of `new` tokens (EOS ignored); `mode` is the `multi_exit`
/// object, None for a plain OpenAI request (the peer's).
fn body(prompt: &[u32], new: usize, mode: Option<&str>) -> String {
    let multi_exit = mode.map_or(String::new(), |m| format!(r#","multi_exit":{m}"#));
    format!(
        r#"{{"model":"bench","prompt":{},"max_tokens":{new},"temperature":0,"ignore_eos":true,"stream":true{multi_exit}}}"#,
        serde_json::to_string(prompt).unwrap()
    )
}

/// What every measurement of one bench run shares.
struct Bench<'a> {
    args: &'a Args,
    shape: &'a Shape,
    limits: &'a limits::Limits,
}

/// Runs `f(i)` for `i` in `0..n` on `n` threads at once; their results in order.
fn concurrently<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = (0..n).map(|i| s.spawn(move || f(i))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

impl Bench<'_> {
    /// Single-stream decode and TTFT (the bench's prompt and a 512-token one) per mode, and
    /// aggregate throughput at each concurrency; each figure also as a share of its bound.
    /// `dtype` names the weights (exitserve's f32/bf16/int8, llama.cpp's f32/bf16/q8_0); a
    /// mode whose JSON is empty is sent without `multi_exit` (the peer's).
    fn serve(&self, server: &Server, dtype: &str, modes: &[BenchMode]) -> Value {
        let (args, path) = (self.args, "/v1/completions");
        fn json_of(m: &BenchMode) -> Option<&str> {
            (!m.json.is_empty()).then_some(m.json.as_str())
        }
        let run = |prompt: &[u32], new: usize, m: &BenchMode| {
            client::stream_completion(&server.addr, path, &body(prompt, new, json_of(m)))
                .expect("request")
        };
        for m in modes {
            run(&prompt_ids(args.prompt_len, 1), 4, m); // warm-up
        }
        // Best of ROUNDS on an idle server, the modes interleaved round by round, so that a
        // slow spell of a shared machine does not fall on one mode only; a new prompt each
        // time (no prefix cache can help).
        const ROUNDS: usize = 5;
        let mut seed = 100;
        let mut next_prompt = |len| {
            seed += 1;
            prompt_ids(len, seed)
        };
        let mut decode = vec![0f64; modes.len()];
        let mut ttft = vec![f64::INFINITY; modes.len()];
        let mut ttft_long = vec![f64::INFINITY; modes.len()];
        for round in 0..ROUNDS {
            for (i, m) in modes.iter().enumerate() {
                let t = run(&next_prompt(args.prompt_len), args.new, m);
                decode[i] = decode[i].max(t.decode_tps());
                ttft[i] = ttft[i].min(t.ttft_s());
                if round < 3 {
                    let t = run(&next_prompt(512), 2, m);
                    ttft_long[i] = ttft_long[i].min(t.ttft_s());
                }
            }
        }
        let ctx = (args.prompt_len + args.new / 2) as f64;
        let bandwidth = self.limits.read_bytes_per_s;
        let compute = self.limits.peak_for(dtype);
        let mut single = serde_json::Map::new();
        let mut aggregate = serde_json::Map::new();
        for (i, m) in modes.iter().enumerate() {
            let bytes = cost::bytes_per_token(self.shape, m.work, dtype, ctx);
            let flops = cost::flops_per_token(self.shape, m.work, ctx);
            let pct_bw = 100.0 * decode[i] * bytes / bandwidth;
            eprintln!(
                "  {:>15}: {:7.1} tok/s decode ({pct_bw:.0} % of the bandwidth bound), TTFT {:.1} ms, 512-token prompt {:.1} ms",
                m.name,
                decode[i],
                ttft[i] * 1e3,
                ttft_long[i] * 1e3
            );
            single.insert(
                m.name.clone(),
                json!({"decode_tok_s": decode[i], "ttft_ms": ttft[i] * 1e3,
                    "ttft_512_ms": ttft_long[i] * 1e3, "bytes_per_token": bytes,
                    "pct_bandwidth_bound": pct_bw}),
            );
            let mut levels = serde_json::Map::new();
            for &c in &args.concurrency {
                let prompts: Vec<Vec<u32>> = (0..c).map(|_| next_prompt(args.prompt_len)).collect();
                let start = Instant::now();
                concurrently(c, |j| run(&prompts[j], args.new, m));
                let tps = (c * args.new) as f64 / start.elapsed().as_secs_f64();
                let pct = compute.map(|peak| 100.0 * tps * flops / peak);
                eprintln!(
                    "  {:>15} x{c:<2}: {tps:7.1} tok/s aggregate ({} of the compute bound)",
                    m.name,
                    pct.map_or("-".into(), |p| format!("{p:.1} %"))
                );
                levels.insert(
                    c.to_string(),
                    json!({"tok_s": tps, "flops_per_token": flops, "pct_compute_bound": pct}),
                );
            }
            aggregate.insert(m.name.clone(), Value::Object(levels));
        }
        json!({"dtype": dtype, "single_stream": single, "aggregate": aggregate})
    }

    /// The lm-eval loglikelihood workload: `scoring_prompts` requests of `scoring_len`
    /// token ids with `echo`, `logprobs: 1`, `max_tokens: 1`, 4 at a time, per mode: prompt
    /// tokens scored per second, and as a share of the compute bound.
    fn scoring(&self, server: &Server, dtype: &str, modes: &[BenchMode]) -> Value {
        let (n, len) = (self.args.scoring_prompts, self.args.scoring_len);
        let prompts = scoring_prompts(n, len);
        let mut out = serde_json::Map::new();
        for m in modes {
            let body = |p: &[u32]| {
                format!(
                    r#"{{"model":"bench","prompt":{},"max_tokens":1,"echo":true,"logprobs":1,"temperature":0,"stream":true,"multi_exit":{}}}"#,
                    serde_json::to_string(p).unwrap(),
                    m.json
                )
            };
            let path = "/v1/completions";
            client::stream_completion(&server.addr, path, &body(&prompts[0])).expect("warm-up");
            let start = Instant::now();
            concurrently(4, |j| {
                for p in prompts.iter().skip(j).step_by(4) {
                    client::stream_completion(&server.addr, path, &body(p)).expect("scoring");
                }
            });
            let tps = (n * len) as f64 / start.elapsed().as_secs_f64();
            let flops = cost::flops_per_token(self.shape, m.work, len as f64 / 2.0);
            let pct = self.limits.peak_for(dtype).map(|p| 100.0 * tps * flops / p);
            eprintln!(
                "  {:>15} scoring: {tps:7.1} prompt tok/s ({} of the compute bound)",
                m.name,
                pct.map_or("-".into(), |p| format!("{p:.1} %"))
            );
            out.insert(
                m.name.clone(),
                json!({"prompt_tok_s": tps, "pct_compute_bound": pct}),
            );
        }
        Value::Object(out)
    }
}

/// The scoring workload's prompts (the same for exitserve and the reference).
fn scoring_prompts(n: usize, len: usize) -> Vec<Vec<u32>> {
    (0..n).map(|i| prompt_ids(len, 10_000 + i as u64)).collect()
}

/// The reference's prompt tokens/s on the scoring workload (bench/ref_scoring.py), original
/// head and the contrast, in float32.
fn run_reference_scoring(python: &Path, args: &Args) -> Value {
    let file = std::env::temp_dir().join(format!("exitserve-scoring-{}.json", std::process::id()));
    let prompts = scoring_prompts(args.scoring_prompts, args.scoring_len);
    std::fs::write(&file, serde_json::to_string(&prompts).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/ref_scoring.py");
    let mut out = serde_json::Map::new();
    for mode in ["original", "contrast"] {
        eprintln!("reference scoring {mode} ...");
        let mut cmd = Command::new(python);
        cmd.arg(&script)
            .arg(args.data.as_ref().expect("set in main"))
            .args(["--prompts", file.to_str().unwrap(), "--mode", mode]);
        if let Some(v) = reference_json(cmd) {
            out.insert(mode.into(), v);
        }
    }
    let _ = std::fs::remove_file(&file);
    Value::Object(out)
}

fn run_reference(python: &Path, args: &Args) -> Value {
    let mut out = serde_json::Map::new();
    for (key, mode, batch) in [
        ("contrast_b1", "contrast", 1),
        ("contrast_b8", "contrast", 8),
        ("original_b1", "original", 1),
    ] {
        eprintln!("reference {key} ...");
        let mut cmd = Command::new(python);
        cmd.arg(&args.reference_script)
            .arg(args.data.as_ref().expect("set in main"))
            .args([
                "--batch",
                &batch.to_string(),
                "--new",
                &args.new.to_string(),
            ])
            .args(["--prompt-len", &args.prompt_len.to_string(), "--mode", mode]);
        if let Some(v) = reference_json(cmd) {
            out.insert(key.into(), v);
        }
    }
    Value::Object(out)
}

/// Runs a reference script on 2 threads and returns the JSON line it prints last (printed
/// here too), or None, with its stderr printed, when it printed none.
fn reference_json(mut cmd: Command) -> Option<Value> {
    let res = cmd
        .env("OMP_NUM_THREADS", "2")
        .output()
        .expect("run the reference");
    let parsed = String::from_utf8_lossy(&res.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok());
    match &parsed {
        Some(v) => eprintln!("  {v}"),
        None => eprintln!("  failed: {}", String::from_utf8_lossy(&res.stderr)),
    }
    parsed
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let threads = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {threads} threads")
}

fn print_table(r: &Value, modes: &[BenchMode]) {
    println!(
        "\nexitserve benchmark on {} (prompt {} tokens, {} new, greedy)\nlimits: {}",
        r["machine"].as_str().unwrap_or(""),
        r["prompt_len"],
        r["new_tokens"],
        r["limits"]["summary"].as_str().unwrap_or("")
    );
    println!(
        "{:<13} {:<15} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "server dtype",
        "mode",
        "decode",
        "% bw",
        "TTFT ms",
        "TTFT512",
        "x1",
        "x4",
        "x16",
        "% flops"
    );
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.1}"));
    let f0 = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.0}"));
    let mut rows: Vec<(String, &Value)> = r["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| ("exitserve".to_string(), run))
        .collect();
    if let Some(peer) = r["peer"]["runs"].as_array() {
        rows.extend(peer.iter().map(|run| ("llama.cpp".to_string(), run)));
    }
    for (server, run) in rows {
        let dtype = run["dtype"].as_str().unwrap_or("");
        let label = format!("{server} {dtype}");
        if let Some(why) = run["not_measured"].as_str() {
            println!("{label:<13} not measured: {why}");
            continue;
        }
        for m in modes {
            let s = &run["single_stream"][&m.name];
            if s.is_null() {
                continue;
            }
            let a = &run["aggregate"][&m.name];
            println!(
                "{label:<13} {:<15} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7}",
                m.name,
                f(&s["decode_tok_s"]),
                f0(&s["pct_bandwidth_bound"]),
                f(&s["ttft_ms"]),
                f(&s["ttft_512_ms"]),
                f(&a["1"]["tok_s"]),
                f(&a["4"]["tok_s"]),
                f(&a["16"]["tok_s"]),
                f(&a["16"]["pct_compute_bound"])
            );
            let sc = &run["scoring"][&m.name];
            if !sc.is_null() {
                println!(
                    "{label:<13} {:<15} scoring {} prompt tok/s ({} % of the compute bound)",
                    m.name,
                    f(&sc["prompt_tok_s"]),
                    f(&sc["pct_compute_bound"])
                );
            }
        }
        if let Some(rss) = run["peak_rss_bytes"].as_f64() {
            println!("{label:<13} peak RSS {:.2} GB", rss / 1e9);
        }
    }
    if let Some(refs) = r["reference"].as_object() {
        for (k, v) in refs {
            println!(
                "reference {k}: {:.2} tok/s",
                v["tokens_per_s"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    if let Some(refs) = r["reference_scoring"].as_object() {
        for (k, v) in refs {
            println!(
                "reference scoring {k}: {:.1} prompt tok/s",
                v["prompt_tok_s"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
}

/// Times one vocabulary head (50257 x 768) at batch 1 to 64 in the layouts and dtypes the
/// model can use, to choose kernels per batch size.
fn kernels() {
    use candle_core::{DType, Device, Tensor};
    use exitserve::kernels::matmul;
    let dev = Device::Cpu;
    println!("rayon threads: {}", rayon::current_num_threads());
    let (v, h) = (50257usize, 768usize);
    let w = Tensor::randn(0f32, 0.02, (v, h), &dev).unwrap();
    let time = |f: &dyn Fn() -> Tensor| {
        f();
        let t = Instant::now();
        let n = 10;
        for _ in 0..n {
            f();
        }
        t.elapsed().as_secs_f64() * 1e3 / n as f64
    };
    for dt in [DType::F32, DType::BF16] {
        let wd = w.to_dtype(dt).unwrap();
        let packed = matmul::PackedWeight::pack(&wd).ok();
        // 1 and 16: decode; 5 and 9: speculative verification of 4 and 8 drafts; 64: prefill
        for b in [1usize, 2, 4, 5, 9, 16, 64] {
            let x = Tensor::randn(0f32, 1.0, (b, h), &dev).unwrap();
            // candle has no fast bf16 matmul on CPUs without AVX-512 BF16: f32 only
            let candle = if dt == DType::F32 {
                format!("{:7.2} ms", time(&|| x.matmul(&wd.t().unwrap()).unwrap()))
            } else {
                "      -   ".to_string()
            };
            let skinny = packed.as_ref().map_or("      -   ".to_string(), |p| {
                format!("{:7.2} ms", time(&|| p.xwt(&x).unwrap()))
            });
            println!("{dt:?} batch {b:>2}: candle x·Wᵀ {candle}   skinny {skinny}");
        }
    }
    if matmul::supports_int8() {
        let packed = matmul::PackedWeight::pack_int8(&w).unwrap();
        for b in [1usize, 2, 4, 5, 9, 16, 64] {
            let x = Tensor::randn(0f32, 1.0, (b, h), &dev).unwrap();
            let ms = time(&|| packed.xwt(&x).unwrap());
            println!("int8 batch {b:>2}: skinny {ms:7.2} ms (per-row scales, x rounded to int16)");
        }
    }
}

/// Times the products of one block (attention in and out, MLP up and down) of `shape` at
/// decode (1 and 16 rows) and prefill (`prompt` rows) sizes, per dtype, as GFLOPS and as a
/// share of this machine's multiply-add peak for that dtype (measured here, all threads).
fn block_products(shape: &Shape, prompt: usize) {
    use candle_core::{DType, Device, Tensor};
    use exitserve::kernels::{matmul::PackedWeight, peak};
    let dev = Device::Cpu;
    let threads = rayon::current_num_threads();
    let h = shape.hidden;
    let products = [
        ("qkv", 3 * h, h),
        ("attn out", h, h),
        ("mlp up", 4 * h, h),
        ("mlp down", h, 4 * h),
    ];
    for kind in ["f32", "bf16", "int8"] {
        let Some(rate) = peak::multiply_add_rate(kind, threads, 0.3, 3) else {
            println!("{kind}: no kernel on this CPU");
            continue;
        };
        println!(
            "{kind}: peak {:.0} GFLOPS ({}, {threads} threads)",
            rate.ops_per_s / 1e9,
            rate.instruction
        );
        for (name, n, k) in products {
            let w = Tensor::randn(0f32, 0.02, (n, k), &dev).unwrap();
            let packed = match kind {
                "f32" => PackedWeight::pack(&w),
                "bf16" => PackedWeight::pack(&w.to_dtype(DType::BF16).unwrap()),
                _ => PackedWeight::pack_int8(&w),
            }
            .unwrap();
            let mut line = format!("  {name:>8} {n:>5}x{k:<5}");
            for m in [1usize, 16, prompt] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                // the fastest of the runs: this machine's other tenants only ever slow it
                let (mut s, mut runs, t) = (f64::MAX, 0u32, Instant::now());
                while runs < 5 || t.elapsed() < Duration::from_millis(400) {
                    let one = Instant::now();
                    packed.xwt(&x).unwrap();
                    s = s.min(one.elapsed().as_secs_f64());
                    runs += 1;
                }
                let gflops = 2.0 * (m * n * k) as f64 / s / 1e9;
                let share = 100.0 * gflops * 1e9 / rate.ops_per_s;
                line += &format!(
                    "   m={m:<4} {:7.2} ms {gflops:6.1} GFLOPS {share:4.1} %",
                    s * 1e3
                );
            }
            println!("{line}");
        }
    }
}

/// Greedy decoding of the original head, plain or drafting from `draft = (layer, k,
/// adaptive)`: the aggregate tok/s of `streams` concurrent requests (best of two rounds),
/// and the share of drafted tokens accepted.
fn speculative_run(
    server: &Server,
    prompt: &[u32],
    new: usize,
    draft: Option<(usize, usize, bool)>,
    streams: usize,
) -> (f64, f64) {
    let speculative = draft.map_or(String::new(), |(l, k, adaptive)| {
        format!(
            r#","speculative":{{"draft_layer":{l},"max_draft_tokens":{k},"adaptive":{adaptive}}}"#
        )
    });
    let body = format!(
        r#"{{"model":"bench","prompt":{},"max_tokens":{new},"temperature":0,"ignore_eos":true,"stream":true,"stream_options":{{"include_usage":true}}{speculative}}}"#,
        serde_json::to_string(prompt).unwrap()
    );
    let path = "/v1/completions";
    let mut best: f64 = 0.0;
    let (mut drafted, mut accepted) = (0.0, 0.0);
    for _ in 0..2 {
        let timings = concurrently(streams, |_| {
            client::stream_completion(&server.addr, path, &body).expect("request")
        });
        // Decode rate after the first token (the prefill's), over all streams.
        let first = timings
            .iter()
            .filter_map(|t| t.events.first())
            .min()
            .copied();
        let last = timings
            .iter()
            .filter_map(|t| t.events.last())
            .max()
            .copied();
        if let (Some(a), Some(b)) = (first, last) {
            best = best.max((streams * (new - 1)) as f64 / (b - a).as_secs_f64());
        }
        for t in &timings {
            let usage: Value = serde_json::from_str(&t.last_data).unwrap_or_default();
            drafted += usage["usage"]["speculative"]["drafted"]
                .as_f64()
                .unwrap_or(0.0);
            accepted += usage["usage"]["speculative"]["accepted"]
                .as_f64()
                .unwrap_or(0.0);
        }
    }
    let rate = if drafted > 0.0 {
        accepted / drafted
    } else {
        0.0
    };
    (best, rate)
}

/// Self-speculative decoding on checkpoint variants whose exits agree with the original
/// head at controlled rates: per variant and dtype, plain decoding and every draft layer x
/// `max_draft_tokens`, at each stream count.
fn speculative_bench(args: &Args, shape: &Shape, root: &Path, bin: &Path, prompt: &[u32]) -> Value {
    let data = args.data.as_ref().expect("set in main");
    let quiet_from = *args.spec_draft_layers.iter().min().expect("draft layers");
    let mut variants = Vec::new();
    for &scale in &args.spec_scales {
        let dir = PathBuf::from(format!("{}-agree-{scale}", data.display()));
        eprintln!("variant {}", dir.display());
        checkpoint::ensure_variant(
            &dir,
            shape,
            &root.join("tests/fixtures/tiny-gpt-neo-multiexit"),
            Some(checkpoint::Agreement {
                quiet_from,
                upper_scale: scale,
            }),
        )
        .expect("write the variant");
        let runs = args.dtype.iter().flat_map(|d| {
            args.spec_draft_weights
                .iter()
                .map(move |w| (d.as_str(), w.as_str()))
        });
        for (dtype, draft_weights) in runs {
            // Drafting at every stream count timed (the server's default drafts alone only).
            let flags = [
                "--speculative-draft-weights",
                draft_weights,
                "--speculative-max-batch-size",
                "64",
            ];
            let server = match Server::exitserve_with(bin, &dir, dtype, &flags) {
                Ok(s) => s,
                Err(why) => {
                    eprintln!("  {why}: not measured");
                    continue;
                }
            };
            // Warm-up, which also makes each draft layer's copies.
            for &layer in &args.spec_draft_layers {
                speculative_run(&server, prompt, 8, Some((layer, 2, false)), 1);
            }
            let mut rows = Vec::new();
            for &streams in &args.spec_streams {
                let longest = *args.spec_draft_tokens.iter().max().expect("draft tokens");
                for &layer in &args.spec_draft_layers {
                    // Fixed lengths (the raw curve), then the adaptive policy up to the longest.
                    let fixed = args.spec_draft_tokens.iter().map(|&k| (k, false));
                    for (k, adaptive) in fixed.chain([(longest, true)]) {
                        // Plain decoding right before each run: on a shared machine the
                        // speed drifts, and a pair measured together cancels most of it.
                        let (plain, _) = speculative_run(&server, prompt, args.new, None, streams);
                        let draft = Some((layer, k, adaptive));
                        let (tps, rate) =
                            speculative_run(&server, prompt, args.new, draft, streams);
                        let how = if adaptive { "adaptive up to" } else { "k" };
                        eprintln!(
                            "  {dtype} x{streams} draft {layer} ({draft_weights}) {how} {k}: {tps:.1} tok/s against {plain:.1} plain ({:.2}x), acceptance {:.0} %",
                            tps / plain,
                            rate * 100.0
                        );
                        rows.push(json!({"streams": streams, "draft_layer": layer,
                            "max_draft_tokens": k, "adaptive": adaptive, "tok_s": tps,
                            "plain_tok_s": plain, "speedup": tps / plain, "acceptance": rate}));
                    }
                }
            }
            variants.push(json!({"upper_scale": scale, "dtype": dtype,
                "draft_weights": draft_weights, "runs": rows}));
        }
    }
    json!({
        "machine": machine(),
        "arch": format!("{:?}", args.arch),
        "layers": shape.layers,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new,
        "quiet_from": quiet_from,
        "variants": variants,
    })
}
