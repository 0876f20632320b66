//! Self-speculative decoding against acceptance: checkpoint variants whose exits agree with
//! the original head at controlled rates, plain decoding timed right before each speculative
//! run (a shared machine drifts; a pair measured together cancels most of it).

use std::path::Path;

use serde_json::{json, Value};

use crate::checkpoint::{self, Shape};
use crate::client;
use crate::report::machine;
use crate::servers::Server;
use crate::workloads::concurrently;
use crate::Args;

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
    let url = server.completions();
    let mut best: f64 = 0.0;
    let (mut drafted, mut accepted) = (0.0, 0.0);
    for _ in 0..2 {
        let timings = concurrently(streams, |_| {
            client::stream_completion(&url, &body).expect("request")
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
pub fn speculative_bench(
    args: &Args,
    shape: &Shape,
    root: &Path,
    bin: &Path,
    prompt: &[u32],
) -> Value {
    let data = args.data.as_ref().expect("set in main");
    let quiet_from = *args.spec_draft_layers.iter().min().expect("draft layers");
    let mut variants = Vec::new();
    let made = (shape, root);
    for (scale, dir) in
        checkpoint::agreement_variants(data, &args.spec_scales, made, quiet_from, false)
    {
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
