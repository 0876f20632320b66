//! `--structured`: what a structured-output constraint costs. The same server decodes greedy
//! completions of unique prompts, 1 and 16 at a time, constrained by a JSON schema of ten
//! fields (`response_format: json_schema`) and free (the same number of tokens, EOS ignored);
//! rounds alternate, the better round of each counts. The difference is the token mask's
//! work per token (llguidance on the model thread) and the masked sampling.

use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use crate::client;
use crate::servers::Server;
use crate::workloads::{concurrently, prompt_ids};
use crate::Args;

/// Alternating rounds; the best of each counts.
const ROUNDS: usize = 3;
/// Generous: the schema's longest output is about 140 tokens.
const MAX_TOKENS: usize = 256;

/// Ten fields, every one bounded, so that a random model's output ends.
pub fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
            "active": {"type": "boolean"},
            "score": {"type": "integer", "minimum": 0, "maximum": 10},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
            "city": {"enum": ["Paris", "Rome", "Oslo", "Lima", "Pune"]},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "id": {"type": "integer", "minimum": 0, "maximum": 99999},
            "note": {"type": "string", "maxLength": 16},
        },
        "required": ["name", "age", "email", "active", "score", "tags", "city", "zip", "id", "note"],
        "additionalProperties": false,
    })
}

/// `streams` requests at once, constrained, or free with each request's token count given;
/// (each request's generated tokens, seconds, outputs that parsed).
fn run(
    server: &Server,
    streams: usize,
    round: usize,
    free_tokens: Option<&[usize]>,
) -> (Vec<usize>, f64, usize) {
    let url = server.completions();
    let start = Instant::now();
    let outs = concurrently(streams, |i| {
        let prompt = prompt_ids(32, (10_000 * round + 100 * streams + i) as u64);
        let mut body = json!({"model": "bench", "prompt": prompt, "temperature": 0});
        match free_tokens {
            None => {
                body["max_tokens"] = json!(MAX_TOKENS);
                body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "record", "schema": schema()}});
            }
            Some(n) => {
                body["max_tokens"] = json!(n[i].max(1));
                body["ignore_eos"] = json!(true);
            }
        }
        client::post_json(&url, &body).expect("completion")
    });
    let secs = start.elapsed().as_secs_f64();
    let tokens = outs
        .iter()
        .map(|o| o["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize)
        .collect();
    let parsed = outs
        .iter()
        .filter(|o| {
            let text = o["choices"][0]["text"].as_str().unwrap_or("");
            serde_json::from_str::<Value>(text)
                .is_ok_and(|v| v.as_object().is_some_and(|m| m.len() == 10))
        })
        .count();
    (tokens, secs, parsed)
}

/// The server's grammar work so far: (seconds, tokens), from its `/metrics`.
fn grammar_work(server: &Server) -> (f64, f64) {
    let text = client::get_text(&format!("{}/metrics", server.base)).unwrap_or_default();
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("exitserve_grammar_step_seconds_sum"),
        value("exitserve_grammar_step_seconds_count"),
    )
}

pub fn structured_bench(args: &Args, data: &Path, bin: &Path) -> Value {
    let mut runs = Vec::new();
    for dtype in &args.dtype {
        eprintln!("exitserve {dtype}, constrained and free:");
        let server = Server::exitserve_with(bin, data, dtype, &[]).expect("server");
        // One warm-up of each (the grammar's first compile; the kernels' first calls).
        run(&server, 1, 99, None);
        run(&server, 1, 99, Some(&[32]));
        let mut figures = serde_json::Map::new();
        for streams in [1, 16] {
            let (mut best_on, mut best_off) = (0f64, 0f64);
            let mut parsed = 0;
            let mut tokens_per = 0;
            let mut grammar_us = Vec::new();
            for round in 0..ROUNDS {
                // The free run generates exactly what each constrained request did, so that both
                // have the same batch over time.
                let before = grammar_work(&server);
                let (each, secs, ok) = run(&server, streams, round, None);
                let after = grammar_work(&server);
                let per_token_us = (after.0 - before.0) / (after.1 - before.1).max(1.0) * 1e6;
                grammar_us.push(per_token_us);
                let (free, free_secs, _) = run(&server, streams, round, Some(&each));
                let tokens: usize = each.iter().sum();
                let free: usize = free.iter().sum();
                let per = tokens.div_ceil(streams);
                let (on, off) = (tokens as f64 / secs, free as f64 / free_secs);
                eprintln!(
                    "  {streams} stream(s), round {round}: constrained {on:.1} tok/s ({tokens} tokens, {ok}/{streams} parse, grammar {per_token_us:.0} us/token), free {off:.1} tok/s"
                );
                best_on = best_on.max(on);
                best_off = best_off.max(off);
                parsed += ok;
                tokens_per = per;
            }
            let slower = 1.0 - best_on / best_off;
            grammar_us.sort_by(f64::total_cmp);
            let grammar = grammar_us[grammar_us.len() / 2];
            eprintln!(
                "  {streams} stream(s): constrained {best_on:.1} tok/s, free {best_off:.1} tok/s: {:.1} % slower; grammar work {grammar:.0} us per token (CPU time; a step's masks run in parallel)",
                slower * 100.0,
            );
            figures.insert(
                streams.to_string(),
                json!({"constrained_tok_s": best_on, "free_tok_s": best_off, "slower": slower,
                       "grammar_us_per_token": grammar,
                       "tokens_per_request": tokens_per, "parsed": parsed, "requests": streams * ROUNDS}),
            );
        }
        runs.push(json!({"dtype": dtype, "streams": figures}));
    }
    json!({"machine": crate::report::machine(), "arch": format!("{:?}", args.arch),
           "schema": schema(), "runs": runs})
}
