//! The fixtures' legacy `pytorch_model.bin` files, rebuilt byte for byte from their recipes
//! (`tests/fixtures/pth_recipe.py` says why and how they were made): the tensor bytes come from
//! the same fixture's `model.safetensors`, the rest from `pytorch_model.bin.literal`, and the
//! result must have the SHA-256 of the file the reference implementation wrote.

use std::path::Path;
use std::sync::Mutex;

use serde::Deserialize;
use sha2::{Digest, Sha256};

const FILE: &str = "pytorch_model.bin";

#[derive(Deserialize)]
struct Recipe {
    sha256: String,
    size: usize,
    /// Relative to the .bin's folder.
    safetensors: String,
    /// `[source, offset, length]`, source `literal` or `safetensors`.
    parts: Vec<(String, usize, usize)>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Makes `dir/pytorch_model.bin` from its recipe unless it is there with the right size.
/// Tests of one process rebuild one at a time; another process sees either no file or a
/// whole one (written aside, then renamed).
pub fn ensure(dir: &Path) {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let read = |name: &str| {
        std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{}/{name}: {e}", dir.display()))
    };
    let recipe: Recipe = serde_json::from_slice(&read(&format!("{FILE}.recipe.json"))).unwrap();
    let target = dir.join(FILE);
    if std::fs::metadata(&target).is_ok_and(|m| m.len() as usize == recipe.size) {
        return;
    }
    let literal = read(&format!("{FILE}.literal"));
    let tensors = read(&recipe.safetensors);
    let mut out = Vec::with_capacity(recipe.size);
    for (source, offset, len) in &recipe.parts {
        let from = match source.as_str() {
            "literal" => &literal,
            "safetensors" => &tensors,
            other => panic!("recipe source {other}"),
        };
        out.extend_from_slice(&from[*offset..offset + len]);
    }
    assert_eq!(
        hex(&Sha256::digest(&out)),
        recipe.sha256,
        "{}: rebuilt bytes differ from the reference's file",
        target.display()
    );
    let aside = dir.join(format!("{FILE}.{}.partial", std::process::id()));
    std::fs::write(&aside, &out).unwrap();
    std::fs::rename(&aside, &target).unwrap();
}
