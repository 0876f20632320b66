//! Shared by the integration tests: fixture paths and the reference outputs.
#![allow(dead_code)]

pub mod client;
pub mod hub;
pub mod pth;
pub mod server;

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{json, Value};

/// A port nothing listens on (for a server to bind, or as a dead endpoint), below the
/// kernel's ephemeral range (32768 and up on Linux): the ports handed out for `bind(0)` (other
/// tests' servers, in this same process) and for outgoing connections never collide with it
/// between this check and the server's own bind. Each process walks its own stretch.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(97) % SPAN;
    loop {
        let port = (FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub const FIXTURE: &str = "tiny-gpt-neo-multiexit";
pub const FIXTURE_BIN: &str = "tiny-gpt-neo-multiexit-bin";

/// A tiny checkpoint of one architecture in both formats, with the reference's outputs.
#[derive(Debug, Clone, Copy)]
pub struct Fixture {
    /// safetensors + tokenizer.json; also the served model id.
    pub name: &'static str,
    /// The same weights as a legacy `pytorch_model.bin`, with vocab.json + merges.txt only.
    pub bin: &'static str,
}

pub const NEO: Fixture = Fixture {
    name: FIXTURE,
    bin: FIXTURE_BIN,
};

pub const GPT2: Fixture = Fixture {
    name: "tiny-gpt2-multiexit",
    bin: "tiny-gpt2-multiexit-bin",
};

/// Every architecture served.
pub const ARCHS: [Fixture; 2] = [NEO, GPT2];

impl Fixture {
    pub fn dir(&self) -> PathBuf {
        fixture_dir(self.name)
    }

    /// The legacy-format folder, its `pytorch_model.bin` rebuilt if missing (`pth.rs`).
    pub fn bin_dir(&self) -> PathBuf {
        let dir = fixture_dir(self.bin);
        pth::ensure(&dir);
        dir
    }

    pub fn reference(&self) -> Reference {
        read_json(&format!("{}.reference.json", self.name))
    }

    /// Per-mode echo logprobs and loglikelihoods computed by the reference.
    pub fn scoring(&self) -> Value {
        read_json(&format!("{}.scoring.json", self.name))
    }

    /// The fixture's modes, in the reference's order of first appearance.
    pub fn modes(&self) -> Vec<String> {
        let mut modes: Vec<String> = Vec::new();
        for c in self.reference().cases {
            if !modes.contains(&c.mode) {
                modes.push(c.mode);
            }
        }
        modes
    }
}

fn read_json<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let path = fixture_dir(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

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

/// The GPT-Neo fixture's reference outputs.
pub fn reference() -> Reference {
    NEO.reference()
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
    greedy_body_for(MODEL, case)
}

/// `greedy_body` for the model served as `model`.
pub fn greedy_body_for(model: &str, case: &Case) -> Value {
    json!({
        "model": model,
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

/// Raw logits of every head (the exits, then the original) at the last position of `tokens`,
/// from a fresh cache: to check loaded weights against the reference's checksums.
pub fn all_head_logits(
    model: &exitserve::model::MultiExitModel,
    tokens: &[u32],
) -> exitserve::model::Result<Vec<(exitserve::model::Head, Vec<f32>)>> {
    use exitserve::model::{Head, SeqStep};
    let mut cache = model.new_cache();
    let cfg = model.config();
    let mut heads: Vec<Head> = cfg.exit_layers.iter().map(|&l| Head::Exit(l)).collect();
    heads.push(Head::Original);
    let mut step = [SeqStep {
        tokens,
        cache: &mut cache,
        depth: cfg.num_layers,
        heads: &heads,
        all_positions: false,
        draft: false,
        verify: false,
        early_exit: None,
        choice: None,
        select_premature: false,
        sled: None,
        logprobs: None,
        choice_logprobs: None,
    }];
    let out = model.forward(&mut step)?.into_per_seq().remove(0);
    Ok(heads
        .into_iter()
        .zip(out)
        .map(|(h, logits)| (h, logits.into_last()))
        .collect())
}
