//! Confidence-based early exit against its threshold: on checkpoint variants whose exits agree
//! with the original head at controlled rates (`checkpoint::Agreement` from the lowest exit
//! up), one stream of greedy early-exit decoding per threshold, timed right after plain
//! original decoding (a shared machine drifts; a pair measured together cancels most of it),
//! with the share of its tokens the original head agrees with given the same text (the output
//! echoed and scored in original mode) and the layers the tokens left at.

use std::path::Path;

use serde_json::{json, Value};

use crate::checkpoint::{self, Shape};
use crate::client;
use crate::report::machine;
use crate::servers::Server;
use crate::Args;

/// Decode tok/s of one greedy stream of `new` tokens in `multi_exit` (best of two).
fn decode_rate(server: &Server, prompt: &[u32], new: usize, multi_exit: &Value) -> f64 {
    let body = json!({"model": "bench", "prompt": prompt, "max_tokens": new, "temperature": 0,
        "ignore_eos": true, "stream": true, "multi_exit": multi_exit})
    .to_string();
    (0..2)
        .map(|_| {
            client::stream_completion(&server.completions(), &body)
                .expect("request")
                .decode_tps()
        })
        .fold(0.0, f64::max)
}

/// The greedy early-exit text's token ids and its `usage.early_exit.tokens_by_layer`.
fn early_exit_text(
    server: &Server,
    prompt: &[u32],
    new: usize,
    threshold: f64,
) -> (Vec<u64>, Value) {
    let body = json!({"model": "bench", "prompt": prompt, "max_tokens": new, "temperature": 0,
        "ignore_eos": true, "return_token_ids": true,
        "multi_exit": {"mode": "early_exit", "threshold": threshold}});
    let out = client::post_json(&server.completions(), &body).expect("request");
    let ids = out["choices"][0]["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    (ids, out["usage"]["early_exit"]["tokens_by_layer"].clone())
}

/// The share of `generated` (after `prompt`) that the original head's greedy choice given the
/// same text equals: the text echoed in original mode, its top-1 at each position.
fn agreement(server: &Server, prompt: &[u32], generated: &[u64]) -> f64 {
    let mut text: Vec<u64> = prompt.iter().map(|&t| t as u64).collect();
    text.extend(generated);
    let body = json!({"model": "bench", "prompt": text, "max_tokens": 0, "echo": true,
        "logprobs": 1, "multi_exit": {"mode": "original"}});
    let out = client::post_json(&server.completions(), &body).expect("echo");
    let lp = &out["choices"][0]["logprobs"];
    let (tokens, tops) = (
        lp["tokens"].as_array().expect("tokens"),
        lp["top_logprobs"].as_array().expect("tops"),
    );
    let from = prompt.len();
    let agree = (from..tokens.len())
        .filter(|&i| {
            let best = tops[i].as_object().and_then(|m| {
                m.iter()
                    .max_by(|a, b| a.1.as_f64().partial_cmp(&b.1.as_f64()).unwrap())
                    .map(|(t, _)| t.clone())
            });
            best.as_deref() == tokens[i].as_str()
        })
        .count();
    agree as f64 / generated.len().max(1) as f64
}

/// Per variant and dtype: plain decoding and early exit at each threshold, one stream.
pub fn early_exit_bench(
    args: &Args,
    shape: &Shape,
    root: &Path,
    bin: &Path,
    prompt: &[u32],
) -> Value {
    let data = args.data.as_ref().expect("set in main");
    let quiet_from = shape.exits[0];
    let mut variants = Vec::new();
    let made = (shape, root);
    for (scale, dir) in
        checkpoint::agreement_variants(data, &args.spec_scales, made, quiet_from, true)
    {
        for dtype in &args.dtype {
            let server = match Server::exitserve_with(bin, &dir, dtype, &[]) {
                Ok(s) => s,
                Err(why) => {
                    eprintln!("  {why}: not measured");
                    continue;
                }
            };
            decode_rate(&server, prompt, 8, &json!({"mode": "original"})); // warm-up
            let mut rows = Vec::new();
            for &threshold in &args.early_exit_thresholds {
                let plain = decode_rate(&server, prompt, args.new, &json!({"mode": "original"}));
                let early = json!({"mode": "early_exit", "threshold": threshold});
                let tps = decode_rate(&server, prompt, args.new, &early);
                let (ids, layers) = early_exit_text(&server, prompt, args.new, threshold);
                let agree = agreement(&server, prompt, &ids);
                eprintln!(
                    "  {dtype} threshold {threshold}: {tps:.1} tok/s against {plain:.1} plain ({:.2}x), agreement {:.0} %, left at {layers}",
                    tps / plain,
                    agree * 100.0
                );
                rows.push(
                    json!({"threshold": threshold, "tok_s": tps, "plain_tok_s": plain,
                    "speedup": tps / plain, "agreement": agree, "tokens_by_layer": layers}),
                );
            }
            variants.push(json!({"upper_scale": scale, "dtype": dtype, "runs": rows}));
        }
    }
    json!({
        "machine": machine(),
        "arch": format!("{:?}", args.arch),
        "layers": shape.layers,
        "exits": shape.exits,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new,
        "quiet_from": quiet_from,
        "variants": variants,
    })
}
