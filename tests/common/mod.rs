//! Shared by the integration tests: fixture paths and the reference outputs.
#![allow(dead_code)]

pub mod client;
pub mod server;

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{json, Value};

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub const FIXTURE: &str = "tiny-gpt-neo-multiexit";
pub const FIXTURE_BIN: &str = "tiny-gpt-neo-multiexit-bin";

#[derive(Deserialize, Debug, Clone)]
pub struct Case {
    pub mode: String,
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub greedy_text: String,
    pub top5: Vec<Vec<(u32, f32)>>,
    pub min_gap: f32,
}

#[derive(Deserialize, Debug)]
pub struct Checksum {
    pub sum: f64,
    pub max: f32,
    pub argmax: u32,
}

#[derive(Deserialize, Debug)]
pub struct Checksums {
    pub prompt: String,
    pub last_position: std::collections::BTreeMap<String, Checksum>,
}

#[derive(Deserialize, Debug)]
pub struct Reference {
    pub cases: Vec<Case>,
    pub logit_checksums: Checksums,
}

pub fn reference() -> Reference {
    let path = fixture_dir("tiny-gpt-neo-multiexit.reference.json");
    let text = std::fs::read_to_string(&path).expect("reference fixture");
    serde_json::from_str(&text).expect("reference JSON")
}

/// The served id of the fixture model.
pub const MODEL: &str = "tiny-gpt-neo-multiexit";

/// The `multi_exit` object for a fixture mode string (`original`, `exit:L`, `contrast:U,L`).
pub fn multi_exit(mode: &str) -> Value {
    if mode == "original" {
        return json!({"mode": "original"});
    }
    if let Some(l) = mode.strip_prefix("exit:") {
        return json!({"mode": "exit", "layer": l.parse::<u32>().unwrap()});
    }
    let (u, l) = mode
        .strip_prefix("contrast:")
        .unwrap()
        .split_once(',')
        .unwrap();
    let upper = if u == "original" {
        json!("original")
    } else {
        json!(u.parse::<u32>().unwrap())
    };
    json!({"mode": "contrast", "upper": upper, "lower": l.parse::<u32>().unwrap()})
}

/// A greedy request reproducing a fixture case, with token ids in the response.
pub fn greedy_body(case: &Case) -> Value {
    json!({
        "model": MODEL,
        "prompt": case.prompt,
        "max_tokens": case.greedy_ids.len(),
        "temperature": 0,
        "return_token_ids": true,
        "multi_exit": multi_exit(&case.mode),
    })
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}
