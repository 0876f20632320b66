//! Where a checkpoint's files come from: a local folder or the Hugging Face hub. Both paths
//! list the files present and hand the list to [`FilePlan::choose`], so the choice of weight and
//! tokenizer files is one piece of logic, unit-tested on local folders.

use std::path::{Path, PathBuf};

use super::error::{ModelError, Result};

pub const CONFIG_FILE: &str = "config.json";
const SAFETENSORS: &str = "model.safetensors";
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
const PTH: &str = "pytorch_model.bin";
const TOKENIZER_JSON: &str = "tokenizer.json";
const VOCAB: &str = "vocab.json";
const MERGES: &str = "merges.txt";
/// Optional: the chat template (`chat_template`) and the special tokens' texts it may use.
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
/// Optional: a chat template of its own file (newer transformers save it so).
pub const CHAT_TEMPLATE: &str = "chat_template.jinja";

/// The weight files to read, in the preferred format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightFiles {
    /// One or more safetensors files (several when sharded).
    Safetensors(Vec<PathBuf>),
    /// A legacy PyTorch zip pickle.
    Pth(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerFiles {
    Json(PathBuf),
    /// GPT-2 byte-level BPE from `vocab.json` + `merges.txt`.
    VocabMerges {
        vocab: PathBuf,
        merges: PathBuf,
    },
}

/// Every file needed to serve a checkpoint, resolved to local paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    pub config: PathBuf,
    pub weights: WeightFiles,
    pub tokenizer: TokenizerFiles,
    /// `tokenizer_config.json`, when the checkpoint has one.
    pub tokenizer_config: Option<PathBuf>,
    /// `chat_template.jinja`, when the checkpoint has one.
    pub chat_template: Option<PathBuf>,
}

/// Which repo-relative files to fetch, before they are resolved to paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePlan {
    /// `Some(index)` when the weights are sharded safetensors: the shards are read from the index.
    pub safetensors_index: Option<String>,
    pub weights: Vec<String>,
    pub pth: bool,
    pub tokenizer: Vec<String>,
    /// The optional chat files present ([`TOKENIZER_CONFIG`], [`CHAT_TEMPLATE`]).
    pub chat: Vec<String>,
}

impl FilePlan {
    /// Prefers safetensors (single, then sharded) over `pytorch_model.bin`, and `tokenizer.json`
    /// over `vocab.json` + `merges.txt`. `origin` names the folder or repo in errors.
    pub fn choose(available: &[String], origin: &str) -> Result<Self> {
        let has = |f: &str| available.iter().any(|a| a == f);
        let missing = |what: &str| ModelError::File {
            path: PathBuf::from(origin),
            message: format!("no {what} found (files: {})", available.join(", ")),
        };
        if !has(CONFIG_FILE) {
            return Err(missing(CONFIG_FILE));
        }
        let (safetensors_index, weights, pth) = if has(SAFETENSORS) {
            (None, vec![SAFETENSORS.to_string()], false)
        } else if has(SAFETENSORS_INDEX) {
            (Some(SAFETENSORS_INDEX.to_string()), vec![], false)
        } else if has(PTH) {
            (None, vec![PTH.to_string()], true)
        } else {
            return Err(missing(&format!(
                "weights ({SAFETENSORS}, {SAFETENSORS_INDEX} or {PTH})"
            )));
        };
        let tokenizer = if has(TOKENIZER_JSON) {
            vec![TOKENIZER_JSON.to_string()]
        } else if has(VOCAB) && has(MERGES) {
            vec![VOCAB.to_string(), MERGES.to_string()]
        } else {
            return Err(missing(&format!(
                "tokenizer ({TOKENIZER_JSON} or {VOCAB} + {MERGES})"
            )));
        };
        let chat = [TOKENIZER_CONFIG, CHAT_TEMPLATE]
            .into_iter()
            .filter(|f| has(f))
            .map(str::to_string)
            .collect();
        Ok(Self {
            safetensors_index,
            weights,
            pth,
            tokenizer,
            chat,
        })
    }

    /// Resolves the plan with `fetch` (a local join, or a hub download returning the cached path).
    fn resolve(&self, mut fetch: impl FnMut(&str) -> Result<PathBuf>) -> Result<ModelFiles> {
        let config = fetch(CONFIG_FILE)?;
        let weights = if let Some(index) = &self.safetensors_index {
            let index_path = fetch(index)?;
            let shards = shard_names(&index_path)?;
            WeightFiles::Safetensors(shards.iter().map(|s| fetch(s)).collect::<Result<_>>()?)
        } else if self.pth {
            WeightFiles::Pth(fetch(&self.weights[0])?)
        } else {
            WeightFiles::Safetensors(vec![fetch(&self.weights[0])?])
        };
        let tokenizer = match self.tokenizer.as_slice() {
            [json] => TokenizerFiles::Json(fetch(json)?),
            [vocab, merges] => TokenizerFiles::VocabMerges {
                vocab: fetch(vocab)?,
                merges: fetch(merges)?,
            },
            _ => unreachable!("FilePlan::choose picks one or two tokenizer files"),
        };
        let mut optional = |name: &str| -> Result<Option<PathBuf>> {
            match self.chat.iter().any(|c| c == name) {
                true => fetch(name).map(Some),
                false => Ok(None),
            }
        };
        Ok(ModelFiles {
            config,
            weights,
            tokenizer,
            tokenizer_config: optional(TOKENIZER_CONFIG)?,
            chat_template: optional(CHAT_TEMPLATE)?,
        })
    }
}

/// The distinct shard file names of a `model.safetensors.index.json`, in order.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    let file_err = |message: String| ModelError::File {
        path: index.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(index).map_err(|e| file_err(e.to_string()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| file_err(format!("invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| file_err("missing `weight_map`".into()))?;
    let mut names: Vec<String> = Vec::new();
    for v in map.values() {
        let name = v
            .as_str()
            .ok_or_else(|| file_err("`weight_map` values must be file names".into()))?;
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Resolves `model` (a local folder, or else a hub repo id) to local files.
pub fn resolve(model: &str, revision: Option<&str>) -> Result<ModelFiles> {
    let path = Path::new(model);
    if path.is_dir() {
        return resolve_local(path);
    }
    if looks_like_path(model) {
        return Err(ModelError::File {
            path: path.to_path_buf(),
            message: "no such model folder".into(),
        });
    }
    resolve_hub(model, revision.unwrap_or("main"))
}

fn looks_like_path(model: &str) -> bool {
    model.starts_with('.') || model.starts_with('/') || model.split('/').count() > 2
}

pub fn resolve_local(dir: &Path) -> Result<ModelFiles> {
    let entries = std::fs::read_dir(dir).map_err(|e| ModelError::File {
        path: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    let plan = FilePlan::choose(&names, &dir.display().to_string())?;
    plan.resolve(|name| {
        let p = dir.join(name);
        if p.is_file() {
            Ok(p)
        } else {
            Err(ModelError::File {
                path: p,
                message: "missing".into(),
            })
        }
    })
}

/// Downloads (or finds in the HF cache, honouring `HF_HOME`) the files of `repo_id` at
/// `revision`. With `HF_HUB_OFFLINE=1` only the cache is used.
fn resolve_hub(repo_id: &str, revision: &str) -> Result<ModelFiles> {
    use hf_hub::{api::sync::ApiBuilder, Cache, Repo, RepoType};
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let origin = format!("{repo_id}@{revision}");
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    if offline {
        let cache = Cache::from_env().repo(repo);
        let candidates = [
            CONFIG_FILE,
            SAFETENSORS,
            SAFETENSORS_INDEX,
            PTH,
            TOKENIZER_JSON,
            VOCAB,
            MERGES,
            TOKENIZER_CONFIG,
            CHAT_TEMPLATE,
        ];
        let present: Vec<String> = candidates
            .iter()
            .filter(|f| cache.get(f).is_some())
            .map(|f| f.to_string())
            .collect();
        let plan = FilePlan::choose(&present, &format!("{origin} (HF cache, offline)"))?;
        return plan.resolve(|name| {
            cache.get(name).ok_or_else(|| {
                ModelError::Hub(format!(
                    "{origin}: `{name}` is not in the HF cache and HF_HUB_OFFLINE=1"
                ))
            })
        });
    }
    let api = ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| ModelError::Hub(e.to_string()))?;
    let api_repo = api.repo(repo);
    // `blobs=true` makes the hub list each file's size, to check every download against.
    let info: serde_json::Value = api_repo
        .info_request()
        .query("blobs", "true")
        .call()
        .map_err(|e| ModelError::Hub(format!("{origin}: {e}")))?
        .into_json()
        .map_err(|e| ModelError::Hub(format!("{origin}: repo info: {e}")))?;
    let siblings = info["siblings"].as_array().cloned().unwrap_or_default();
    let names: Vec<String> = siblings
        .iter()
        .filter_map(|s| s["rfilename"].as_str().map(str::to_string))
        .collect();
    let size_of = |name: &str| {
        siblings
            .iter()
            .find(|s| s["rfilename"] == name)
            .and_then(|s| s["size"].as_u64())
    };
    let plan = FilePlan::choose(&names, &origin)?;
    plan.resolve(|name| {
        let path = api_repo
            .get(name)
            .map_err(|e| ModelError::Hub(format!("{origin}: downloading `{name}`: {e}")))?;
        match size_of(name) {
            Some(size) => {
                verified(path, size).map_err(|m| ModelError::Hub(format!("{origin}: `{name}` {m}")))
            }
            None => Ok(path),
        }
    })
}

/// `path` (a cache entry) if it holds `size` bytes; else the entry (pointer and blob) is
/// removed, so that no later start, online or offline, reads a truncated file.
fn verified(path: PathBuf, size: u64) -> std::result::Result<PathBuf, String> {
    let got = std::fs::metadata(&path).map_err(|e| e.to_string())?.len();
    if got == size {
        return Ok(path);
    }
    if let Ok(blob) = std::fs::canonicalize(&path) {
        let _ = std::fs::remove_file(blob);
    }
    let _ = std::fs::remove_file(&path);
    Err(format!(
        "arrived with {got} of its {size} bytes; removed from the cache, start again to download it"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn prefers_safetensors_then_index_then_pth() -> Result<()> {
        let all = names(&[
            CONFIG_FILE,
            PTH,
            SAFETENSORS,
            SAFETENSORS_INDEX,
            VOCAB,
            MERGES,
        ]);
        assert_eq!(FilePlan::choose(&all, "x")?.weights, vec![SAFETENSORS]);
        let sharded = names(&[CONFIG_FILE, PTH, SAFETENSORS_INDEX, TOKENIZER_JSON]);
        let plan = FilePlan::choose(&sharded, "x")?;
        assert_eq!(plan.safetensors_index.as_deref(), Some(SAFETENSORS_INDEX));
        assert_eq!(plan.tokenizer, vec![TOKENIZER_JSON]);
        let legacy = names(&[CONFIG_FILE, PTH, VOCAB, MERGES]);
        let plan = FilePlan::choose(&legacy, "x")?;
        assert!(plan.pth);
        assert_eq!(plan.tokenizer, vec![VOCAB, MERGES]);
        Ok(())
    }

    #[test]
    fn missing_files_are_named() {
        let e = FilePlan::choose(&names(&[CONFIG_FILE, VOCAB]), "repo").unwrap_err();
        assert!(e.to_string().contains("no weights"), "{e}");
        let e = FilePlan::choose(&names(&[CONFIG_FILE, PTH, VOCAB]), "repo").unwrap_err();
        assert!(e.to_string().contains("no tokenizer"), "{e}");
    }

    #[test]
    fn local_fixture_folders_resolve() -> Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let st = resolve_local(&root.join("tiny-gpt-neo-multiexit"))?;
        assert!(matches!(st.weights, WeightFiles::Safetensors(ref v) if v.len() == 1));
        assert!(matches!(st.tokenizer, TokenizerFiles::Json(_)));
        // the legacy layout (the fixture's .bin is rebuilt by the integration tests; the file
        // plan only looks at names)
        let dir = std::env::temp_dir().join(format!("exitserve-legacy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in [CONFIG_FILE, PTH, VOCAB, MERGES] {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        let bin = resolve(dir.to_str().unwrap(), None)?;
        std::fs::remove_dir_all(&dir).ok();
        assert!(matches!(bin.weights, WeightFiles::Pth(_)));
        assert!(matches!(bin.tokenizer, TokenizerFiles::VocabMerges { .. }));
        Ok(())
    }

    #[test]
    fn sharded_index_lists_distinct_shards() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("exitserve-shards-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(SAFETENSORS_INDEX),
            r#"{"weight_map":{"a":"model-00002-of-00002.safetensors","b":"model-00001-of-00002.safetensors","c":"model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let shards = shard_names(&dir.join(SAFETENSORS_INDEX))?;
        assert_eq!(
            shards,
            vec![
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
