//! The reference implementation (autocontrastive-gen on transformers, `reference/`) timed in
//! the same run: generation at batch 1 and 8, and the scoring workload.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::workloads::scoring_prompts;
use crate::Args;

/// The reference's prompt tokens/s on the scoring workload (reference/ref_scoring.py), original
/// head and the contrast, in float32.
pub fn run_reference_scoring(python: &Path, args: &Args) -> Value {
    let file = std::env::temp_dir().join(format!("exitserve-scoring-{}.json", std::process::id()));
    let prompts = scoring_prompts(args.scoring_prompts, args.scoring_len);
    std::fs::write(&file, serde_json::to_string(&prompts).unwrap()).unwrap();
    let script = crate::repo_root().join("bench/reference/ref_scoring.py");
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

/// The reference's greedy tok/s (reference/ref_bench.py): contrast at batch 1 and 8, the
/// original head at batch 1.
pub fn run_reference(python: &Path, args: &Args) -> Value {
    let mut out = serde_json::Map::new();
    for (key, mode, batch) in [
        ("contrast_b1", "contrast", 1),
        ("contrast_b8", "contrast", 8),
        ("original_b1", "original", 1),
    ] {
        eprintln!("reference {key} ...");
        let mut cmd = Command::new(python);
        let default_script = crate::repo_root().join("bench/reference/ref_bench.py");
        cmd.arg(args.reference_script.as_ref().unwrap_or(&default_script))
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
