//! Benchmark through the real HTTP server on a random checkpoint shaped like GPT-Neo-125M
//! (`--arch gpt_neo`, the default) or GPT-2 medium (`--arch gpt2`).
//!
//!   cargo run --release --bin bench -- [--arch gpt2] [--dtype f32,bf16,int8] [--reference-python PY]
//!   cargo run --release --bin bench -- --kernels     (vocabulary-head matmul variants)
//!   cargo run --release --bin bench -- --speculative (self-speculative decoding vs acceptance)
//!
//! Writes the checkpoint once under --data, starts `exitserve` (next to this binary) per
//! dtype, measures single-stream decode speed and time to first token per mode, aggregate
//! throughput at 1/4/16 concurrent streams, peak RSS; prints a table and writes JSON.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use exitserve::bench::checkpoint::{Arch, Shape};
use exitserve::bench::{checkpoint, client, peak_rss_bytes};
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
}

/// (name, `multi_exit` JSON) of the modes timed: the original head, the exit at half depth,
/// and the top exit contrasted with it (12/6 on GPT-Neo-125M, 24/12 on GPT-2 medium).
fn modes(shape: &Shape) -> Vec<(String, String)> {
    let (top, half) = (shape.layers, shape.half_exit());
    vec![
        ("original".into(), r#"{"mode":"original"}"#.into()),
        (
            format!("exit {half}"),
            format!(r#"{{"mode":"exit","layer":{half}}}"#),
        ),
        (
            format!("contrast {top}/{half}"),
            format!(r#"{{"mode":"contrast","upper":{top},"lower":{half}}}"#),
        ),
    ]
}

fn main() {
    let mut args = Args::parse();
    if args.kernels {
        return kernels();
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
    let prompt = prompt_ids(args.prompt_len);
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
    let modes = modes(&shape);

    let mut runs = Vec::new();
    for dtype in &args.dtype {
        let weight_bytes = match dtype.as_str() {
            "f32" => f32_bytes,
            "int8" => f32_bytes / 4,
            _ => f32_bytes / 2,
        };
        runs.push(run_server_bench(
            &server_bin,
            &args,
            (dtype, &modes),
            &prompt,
            weight_bytes,
        ));
    }
    let reference = args
        .reference_python
        .as_ref()
        .map(|py| run_reference(py, &args));
    let report = json!({
        "machine": machine(),
        "arch": format!("{:?}", args.arch),
        "layers": shape.layers,
        "hidden": shape.hidden,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new,
        "runs": runs,
        "reference": reference,
    });
    print_table(&report, &modes);
    let out = args.out.as_ref().expect("set above");
    std::fs::write(out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    eprintln!("wrote {}", out.display());
}

fn prompt_ids(n: usize) -> Vec<u32> {
    // deterministic ids in 1000..40000 (like the reference benchmark's prompts)
    let mut x = 0x9E37_79B9u64;
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
    /// The server on `model` once healthy, or why it exited (e.g. int8 on a CPU without
    /// AVX-512 VNNI: a start-up error, printed on stderr).
    fn start(bin: &Path, model: &Path, dtype: &str) -> Result<Self, String> {
        let port = free_port();
        let mut child = Command::new(bin)
            .args([
                "--model",
                model.to_str().unwrap(),
                "--port",
                &port.to_string(),
                "--dtype",
                dtype,
            ])
            .args(["--max-batch-size", "32", "--served-model-name", "bench"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start exitserve (build it with --release first)");
        let addr = format!("127.0.0.1:{port}");
        let start = Instant::now();
        while client::get_status(&addr, "/health").ok() != Some(200) {
            if let Some(status) = child.try_wait().expect("wait") {
                return Err(format!(
                    "exitserve --dtype {dtype} exited at start ({status})"
                ));
            }
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "server did not become healthy"
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

fn body(prompt: &[u32], new: usize, mode: &str) -> String {
    format!(
        r#"{{"model":"bench","prompt":{},"max_tokens":{new},"temperature":0,"ignore_eos":true,"stream":true,"multi_exit":{mode}}}"#,
        serde_json::to_string(prompt).unwrap()
    )
}

fn run_server_bench(
    bin: &Path,
    args: &Args,
    (dtype, modes): (&str, &[(String, String)]),
    prompt: &[u32],
    weight_bytes: u64,
) -> Value {
    eprintln!("dtype {dtype}:");
    let server = match Server::start(bin, args.data.as_ref().expect("set in main"), dtype) {
        Ok(s) => s,
        Err(why) => {
            eprintln!("  {why}: not measured");
            return json!({"dtype": dtype, "not_measured": why});
        }
    };
    let path = "/v1/completions";
    // warm-up: every mode once
    for (_, mode) in modes {
        client::stream_completion(&server.addr, path, &body(prompt, 4, mode)).expect("warm-up");
    }
    // Best of ROUNDS single-stream runs on an idle server, the modes interleaved round by
    // round, so that a slow spell of a shared machine does not fall on one mode only.
    const ROUNDS: usize = 5;
    let mut runs: Vec<Vec<client::StreamTiming>> = modes.iter().map(|_| Vec::new()).collect();
    for _ in 0..ROUNDS {
        for ((_, mode), timings) in modes.iter().zip(runs.iter_mut()) {
            let t = client::stream_completion(&server.addr, path, &body(prompt, args.new, mode))
                .expect("request");
            timings.push(t);
        }
    }
    let mut single = serde_json::Map::new();
    for ((name, _), timings) in modes.iter().zip(&runs) {
        let tps = timings.iter().map(|r| r.decode_tps()).fold(0.0, f64::max);
        let ttft = timings
            .iter()
            .map(|r| r.ttft_s())
            .fold(f64::INFINITY, f64::min);
        eprintln!(
            "  {name:>14}: {tps:7.1} tok/s decode, TTFT {:.1} ms",
            ttft * 1e3
        );
        single.insert(
            name.clone(),
            json!({"decode_tok_s": tps, "ttft_ms": ttft * 1e3}),
        );
    }
    let mut aggregate = serde_json::Map::new();
    for (name, mode) in modes {
        let mut levels = serde_json::Map::new();
        for &c in &args.concurrency {
            let start = Instant::now();
            let b = body(prompt, args.new, mode);
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..c)
                    .map(|_| {
                        s.spawn(|| {
                            client::stream_completion(&server.addr, path, &b).expect("request")
                        })
                    })
                    .collect();
                for h in handles {
                    h.join().unwrap();
                }
            });
            let tps = (c * args.new) as f64 / start.elapsed().as_secs_f64();
            eprintln!("  {name:>14} x{c:<2}: {tps:7.1} tok/s aggregate");
            levels.insert(c.to_string(), json!(tps));
        }
        aggregate.insert(name.clone(), Value::Object(levels));
    }
    let rss = peak_rss_bytes(server.child.id()).unwrap_or(0);
    json!({
        "dtype": dtype,
        "single_stream": single,
        "aggregate_tok_s": aggregate,
        "peak_rss_bytes": rss,
        "weight_bytes": weight_bytes,
        "rss_over_weights": rss as f64 / weight_bytes as f64,
    })
}

fn run_reference(python: &Path, args: &Args) -> Value {
    let mut out = serde_json::Map::new();
    for (key, mode, batch) in [
        ("contrast_b1", "contrast", 1),
        ("contrast_b8", "contrast", 8),
        ("original_b1", "original", 1),
    ] {
        eprintln!("reference {key} ...");
        let res = Command::new(python)
            .arg(&args.reference_script)
            .arg(args.data.as_ref().expect("set in main"))
            .args([
                "--batch",
                &batch.to_string(),
                "--new",
                &args.new.to_string(),
            ])
            .args(["--prompt-len", &args.prompt_len.to_string(), "--mode", mode])
            .env("OMP_NUM_THREADS", "2")
            .output()
            .expect("run the reference");
        let text = String::from_utf8_lossy(&res.stdout);
        let parsed = text
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<Value>(l).ok());
        match parsed {
            Some(v) => {
                eprintln!("  {v}");
                out.insert(key.into(), v);
            }
            None => eprintln!("  failed: {}", String::from_utf8_lossy(&res.stderr)),
        }
    }
    Value::Object(out)
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

fn print_table(r: &Value, modes: &[(String, String)]) {
    println!(
        "\nexitserve benchmark on {} (prompt {} tokens, {} new, greedy)",
        r["machine"].as_str().unwrap_or(""),
        r["prompt_len"],
        r["new_tokens"]
    );
    println!(
        "{:<8} {:<15} {:>12} {:>10} {:>10} {:>10} {:>10}",
        "dtype", "mode", "decode tok/s", "TTFT ms", "x1 tok/s", "x4 tok/s", "x16 tok/s"
    );
    for run in r["runs"].as_array().unwrap() {
        if let Some(why) = run["not_measured"].as_str() {
            println!("{:<8} not measured: {why}", run["dtype"].as_str().unwrap());
            continue;
        }
        for (name, _) in modes {
            let s = &run["single_stream"][name];
            let a = &run["aggregate_tok_s"][name];
            let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.1}"));
            println!(
                "{:<8} {:<15} {:>12} {:>10} {:>10} {:>10} {:>10}",
                run["dtype"].as_str().unwrap(),
                name,
                f(&s["decode_tok_s"]),
                f(&s["ttft_ms"]),
                f(&a["1"]),
                f(&a["4"]),
                f(&a["16"])
            );
        }
        println!(
            "{:<8} peak RSS {:.2} GB = {:.2} x weights ({:.2} GB)",
            run["dtype"].as_str().unwrap(),
            run["peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1e9,
            run["rss_over_weights"].as_f64().unwrap_or(0.0),
            run["weight_bytes"].as_f64().unwrap_or(0.0) / 1e9
        );
    }
    if let Some(refs) = r["reference"].as_object() {
        for (k, v) in refs {
            println!(
                "reference {k}: {:.2} tok/s",
                v["tokens_per_s"]
                    .as_f64()
                    .or_else(|| v["tok_s"].as_f64())
                    .unwrap_or(f64::NAN)
            );
        }
    }
}

/// Times one vocabulary head (50257 x 768) at batch 1 to 64 in the layouts and dtypes the
/// model can use, to choose kernels per batch size.
fn kernels() {
    use candle_core::{DType, Device, Tensor};
    use exitserve::kernels::skinny_matmul;
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
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let wd = w.to_dtype(dt).unwrap();
        for b in [1usize, 4, 16, 64] {
            let x = Tensor::randn(0f32, 1.0, (b, h), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let xw = time(&|| x.matmul(&wd.t().unwrap()).unwrap());
            let wx = time(&|| wd.matmul(&x.t().unwrap()).unwrap());
            let skinny = if skinny_matmul::supported(dt) {
                let xf = x.to_dtype(DType::F32).unwrap();
                let packed = skinny_matmul::PackedWeight::pack(&wd).unwrap();
                format!("{:7.2} ms", time(&|| packed.xwt(&xf).unwrap()))
            } else {
                "      -   ".to_string()
            };
            println!("{dt:?} batch {b:>2}: candle x·Wᵀ {xw:7.2} ms   candle W·xᵀ {wx:7.2} ms   skinny {skinny}");
        }
    }
    if skinny_matmul::supports_int8() {
        let packed = skinny_matmul::PackedWeight::pack_int8(&w).unwrap();
        for b in [1usize, 4, 16, 64] {
            let x = Tensor::randn(0f32, 1.0, (b, h), &dev).unwrap();
            let ms = time(&|| packed.xwt(&x).unwrap());
            println!("int8 batch {b:>2}: skinny {ms:7.2} ms (per-row scales, x rounded to int16)");
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
        let timings: Vec<client::StreamTiming> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..streams)
                .map(|_| s.spawn(|| client::stream_completion(&server.addr, path, &body)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().expect("request"))
                .collect()
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
        for dtype in &args.dtype {
            let server = match Server::start(bin, &dir, dtype) {
                Ok(s) => s,
                Err(why) => {
                    eprintln!("  {why}: not measured");
                    continue;
                }
            };
            speculative_run(&server, prompt, 8, Some((quiet_from, 2, false)), 1); // warm-up
            let mut rows = Vec::new();
            for &streams in &args.spec_streams {
                let (plain, _) = speculative_run(&server, prompt, args.new, None, streams);
                eprintln!("  {dtype} x{streams} plain: {plain:.1} tok/s");
                let longest = *args.spec_draft_tokens.iter().max().expect("draft tokens");
                for &layer in &args.spec_draft_layers {
                    // Fixed lengths (the raw curve), then the adaptive policy up to the longest.
                    let fixed = args.spec_draft_tokens.iter().map(|&k| (k, false));
                    for (k, adaptive) in fixed.chain([(longest, true)]) {
                        let draft = Some((layer, k, adaptive));
                        let (tps, rate) =
                            speculative_run(&server, prompt, args.new, draft, streams);
                        let how = if adaptive { "adaptive up to" } else { "k" };
                        eprintln!(
                            "  {dtype} x{streams} draft {layer} {how} {k}: {tps:.1} tok/s ({:.2}x), acceptance {:.0} %",
                            tps / plain,
                            rate * 100.0
                        );
                        rows.push(json!({"streams": streams, "draft_layer": layer,
                            "max_draft_tokens": k, "adaptive": adaptive, "tok_s": tps,
                            "plain_tok_s": plain, "speedup": tps / plain, "acceptance": rate}));
                    }
                }
            }
            variants.push(json!({"upper_scale": scale, "dtype": dtype, "runs": rows}));
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
