//! exitserve's benchmark, through the real HTTP server, on a random checkpoint shaped like
//! GPT-Neo-125M (`--arch gpt_neo`, the default) or GPT-2 medium (`--arch gpt2`).
//!
//!   cargo build --release --bins && target/release/bench [--arch gpt2] [--dtype f32,bf16,int8]
//!   target/release/bench --kernels      (vocabulary-head and block products, no server)
//!   target/release/bench --sampling     (one sampled draw: temperature, top-k, top-p)
//!   target/release/bench --attention    (one decode query's attention over the cache)
//!   target/release/bench --speculative  (self-speculative decoding against acceptance)
//!   target/release/bench --early-exit   (early exit: speed and agreement against threshold)
//!   target/release/bench --prefix-cache (prefix caching on and off: multiple-choice scoring,
//!                                        the playground's three modes, the loads above)
//!   target/release/bench --structured   (structured outputs: a JSON schema against free text)
//!   target/release/bench --limits       (this machine's bandwidth and peaks only)
//!   target/release/bench --arch gpt2 --peer-llama-server PATH   (llama.cpp too, built by
//!                                                    bench/peer/llama_cpp.sh)
//!
//! Writes the checkpoint once under --data, starts `exitserve` (next to this binary) per
//! dtype, measures single-stream decode speed and time to first token (the bench's prompt and a
//! 512-token one) per mode, aggregate throughput at 1/4/16 concurrent streams, the scoring
//! workload (512-token echo prompts), peak RSS; measures the machine's read bandwidth and
//! multiply-add peaks in the same run and gives each speed as a share of its bound; prints a
//! table and writes the results under `bench/results/`.
//!
//! The files: `servers.rs` (the processes), `client.rs` (HTTP), `workloads.rs` and
//! `speculative.rs` (what is timed), `reference.rs` (the Python reference), `kernels.rs`
//! (products without a server), `report.rs` (table and results file), `checkpoint.rs` (the
//! random checkpoints), `limits.rs` + `peak.rs` (the machine's bounds), `cost.rs` (each mode's
//! bytes and FLOPs per token).

mod checkpoint;
mod client;
mod cost;
mod early_exit;
mod kernels;
mod limits;
mod peak;
mod prefix_cache;
mod reference;
mod report;
mod servers;
mod speculative;
mod structured;
mod workloads;

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use serde_json::json;

use checkpoint::{Arch, Shape};
use servers::Server;
use workloads::{prompt_ids, Bench, BenchMode, ModeSet};

#[derive(Parser)]
#[command(about = "exitserve benchmark (real HTTP server, random weights of a released shape)")]
pub struct Args {
    /// The checkpoint's shape: GPT-Neo-125M or GPT-2 medium, with their released exits
    #[arg(long, value_enum, default_value = "gpt_neo")]
    pub arch: Arch,
    /// Where the random checkpoint is written (once) and cached
    /// [default: bench-data/{gpt-neo-125m,gpt2-medium}-multiexit-random]
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Weight dtypes to serve, comma-separated (f32, f16, bf16, int8)
    #[arg(long, default_value = "f32,bf16,int8", value_delimiter = ',')]
    pub dtype: Vec<String>,
    /// Prompt length in tokens
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// New tokens per request (greedy, or sampled in the sampled mode)
    #[arg(long, default_value_t = 64)]
    pub new: usize,
    /// Concurrency levels for aggregate throughput
    #[arg(long, default_value = "1,4,16", value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Python of the reference stack (bench/reference/setup_ref.sh) to time it in the same run
    #[arg(long)]
    pub reference_python: Option<PathBuf>,
    /// The reference benchmark script [default: bench/reference/ref_bench.py]
    #[arg(long)]
    pub reference_script: Option<PathBuf>,
    /// JSON results file [default: bench/results/DATE-MACHINE-SHAPE.json, `-speculative`
    /// added with --speculative; never an existing file]
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only time vocabulary-head matmul variants (no server)
    #[arg(long)]
    pub kernels: bool,
    /// Only time the sampled draw on one row of 50,257 logits (temperature, top-k, top-p; no
    /// server)
    #[arg(long)]
    pub sampling: bool,
    /// Only time one decode query's attention over 256 to 2048 cached positions (no server)
    #[arg(long)]
    pub attention: bool,
    /// Only measure this machine's limits (read bandwidth, multiply-add peaks) and print them
    #[arg(long)]
    pub limits: bool,
    /// Only time self-speculative decoding: speedup against acceptance rate, on variants of
    /// the checkpoint whose exits agree with the original head at controlled rates
    /// (written once under --data with an `-agree-S` suffix)
    #[arg(long)]
    pub speculative: bool,
    /// Only time confidence-based early exit: speed and agreement with the original head
    /// against the threshold, on the --spec-scales variants quieted from the lowest exit up
    /// (written once under --data with an `-agree-S-from-L` suffix); one stream
    #[arg(long)]
    pub early_exit: bool,
    /// Only time prefix caching: the multiple-choice scoring load (12 contexts of 400 token
    /// ids, 4 continuations each), the playground's three modes on a 512-token prompt and
    /// the bench's own loads, each with the cache and with --no-prefix-cache
    #[arg(long)]
    pub prefix_cache: bool,
    /// Only time structured outputs: greedy completions constrained by a 10-field JSON schema
    /// against free ones of the same length, 1 and 16 streams
    #[arg(long)]
    pub structured: bool,
    /// Early-exit thresholds timed
    #[arg(
        long,
        default_value = "0,0.001,0.01,0.05,0.1,0.2,0.5,1",
        value_delimiter = ','
    )]
    pub early_exit_thresholds: Vec<f64>,
    /// The variants' upper-block scales (0: the exits always agree; larger, less often)
    #[arg(long, default_value = "0,0.5,1,2", value_delimiter = ',')]
    pub spec_scales: Vec<f32>,
    /// Draft layers timed (the variants quiet the blocks above the lowest)
    #[arg(long, default_value = "4,6,8", value_delimiter = ',')]
    pub spec_draft_layers: Vec<usize>,
    /// `max_draft_tokens` values timed
    #[arg(long, default_value = "2,4,8", value_delimiter = ',')]
    pub spec_draft_tokens: Vec<usize>,
    /// Concurrent streams timed for speculation
    #[arg(long, default_value = "1,4", value_delimiter = ',')]
    pub spec_streams: Vec<usize>,
    /// What drafts read (`--speculative-draft-weights`), each timed
    #[arg(long, default_value = "int8,model", value_delimiter = ',')]
    pub spec_draft_weights: Vec<String>,
    /// The modes timed: one and two heads (original greedy and sampled, an exit, a contrast),
    /// the strategies over many layers (DoLa and SLED over the exits below the top), or all
    #[arg(long, value_enum, default_value = "heads")]
    pub modes: ModeSet,
    /// Scoring workload (lm-eval loglikelihood): this many prompts with `echo`, `logprobs: 1`,
    /// `max_tokens: 1`, 4 at a time (0: skip)
    #[arg(long, default_value_t = 16)]
    pub scoring_prompts: usize,
    /// Tokens per scoring prompt
    #[arg(long, default_value_t = 512)]
    pub scoring_len: usize,
    /// llama.cpp's llama-server (bench/peer/llama_cpp.sh builds it): time it on the same
    /// weights (the GPT-2 shape, exits stripped, as GGUF f32 / bf16 / q8_0) in the same run
    #[arg(long)]
    pub peer_llama_server: Option<PathBuf>,
    /// Where bench/peer/llama_cpp.sh wrote gpt2-medium-{f32,bf16,q8_0}.gguf
    #[arg(long, default_value = "bench-data/llama.cpp")]
    pub peer_gguf: PathBuf,
}

/// The repository the bench reads (fixtures, reference scripts) and writes results into:
/// `EXITSERVE_REPO`, else where this bench was built (a binary carried to another machine,
/// as the GPU check does, names the copy it runs in).
pub fn repo_root() -> PathBuf {
    std::env::var_os("EXITSERVE_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("bench/ is inside the repository")
                .to_path_buf()
        })
}

fn main() {
    let mut args = Args::parse();
    if args.kernels {
        let peaks = kernels::peaks();
        kernels::kernels();
        return kernels::block_products(&Shape::of(args.arch), args.scoring_len, &peaks);
    }
    if args.sampling {
        return kernels::sampling();
    }
    if args.attention {
        return kernels::attention();
    }
    if args.limits {
        let limits = limits::Limits::measure();
        println!(
            "{}",
            serde_json::to_string_pretty(&limits.to_json()).unwrap()
        );
        return;
    }
    // The repository: the fixtures' tokenizer goes into the random checkpoints.
    let root = &repo_root();
    let shape = Shape::of(args.arch);
    let name = match args.arch {
        Arch::GptNeo => "gpt-neo-125m",
        Arch::Gpt2 => "gpt2-medium",
    };
    let data = args
        .data
        .get_or_insert_with(|| format!("bench-data/{name}-multiexit-random").into())
        .clone();
    let out = args.out.clone().unwrap_or_else(|| {
        report::results_path(&if args.speculative {
            format!("{name}-speculative")
        } else if args.early_exit {
            format!("{name}-early-exit")
        } else if args.prefix_cache {
            format!("{name}-prefix-cache")
        } else if args.structured {
            format!("{name}-structured")
        } else {
            name.to_string()
        })
    });
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
    if args.early_exit {
        let report = early_exit::early_exit_bench(&args, &shape, root, &server_bin, &prompt);
        std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
        eprintln!("wrote {}", out.display());
        return;
    }
    if args.prefix_cache {
        let report = prefix_cache::prefix_cache_bench(&args, &shape, &data, &server_bin);
        std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
        eprintln!("wrote {}", out.display());
        return;
    }
    if args.structured {
        let report = structured::structured_bench(&args, &data, &server_bin);
        std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
        eprintln!("wrote {}", out.display());
        return;
    }
    if args.speculative {
        let report = speculative::speculative_bench(&args, &shape, root, &server_bin, &prompt);
        std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
        eprintln!("wrote {}", out.display());
        return;
    }
    if args.peer_llama_server.is_some() && args.arch != Arch::Gpt2 {
        eprintln!("--peer-llama-server needs --arch gpt2 (llama.cpp has no GPT-Neo)");
        std::process::exit(2);
    }
    let modes = args.modes.modes(&shape);
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
    let greedy = modes.iter().find(|m| !m.sampled).expect("a greedy mode");
    let original = [BenchMode {
        json: String::new(),
        name: greedy.name.clone(),
        work: greedy.work,
        sampled: false,
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
        // room in the batch for the most concurrent streams timed
        let batch = args.concurrency.iter().copied().max().unwrap_or(1).max(32);
        let flags = ["--max-batch-size", &batch.to_string()];
        let run = match Server::exitserve_with(&server_bin, &data, dtype, &flags) {
            Ok(server) => {
                let mut run = bench.serve(&server, dtype, &modes);
                if args.scoring_prompts > 0 {
                    run["scoring"] = bench.scoring(&server, dtype, &modes);
                }
                let rss = server.peak_rss_bytes().unwrap_or(0);
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
                run["peak_rss_bytes"] = json!(server.peak_rss_bytes().unwrap_or(0));
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
        .map(|py| reference::run_reference(py, &args));
    let reference_scoring = match (&args.reference_python, args.scoring_prompts) {
        (Some(py), n) if n > 0 => Some(reference::run_reference_scoring(py, &args)),
        _ => None,
    };
    let report = json!({
        "machine": report::machine(),
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
    report::print_table(&report, &modes);
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    eprintln!("wrote {}", out.display());
}
