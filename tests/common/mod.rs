//! Shared by the integration tests: fixture paths and the reference outputs.
#![allow(dead_code)]

pub mod client;
pub mod server;

use std::path::PathBuf;

use serde::Deserialize;

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
