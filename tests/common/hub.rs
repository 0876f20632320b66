//! A stand-in for the Hugging Face hub on loopback, answering the two requests hf-hub makes
//! the way huggingface.co does: `GET /api/models/{repo}/revision/{rev}` (the file list, with
//! sizes under `?blobs=true`) and `GET /{repo}/resolve/{rev}/{file}` (ranges, `etag`,
//! `x-repo-commit`). Each revision serves the files of a local folder. A file can be set to
//! break: its body stops halfway and the connection drops.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

/// One revision of a repo: its commit hash and the folder whose files it holds.
struct Revision {
    commit: String,
    dir: PathBuf,
}

#[derive(Default)]
struct Hub {
    /// (repo id, revision) -> files
    revisions: HashMap<(String, String), Revision>,
    /// File names whose downloads break halfway.
    broken: Vec<String>,
    /// File names whose downloads end early but cleanly (a truncating proxy): a short file
    /// that the HTTP layer cannot tell from a whole one.
    truncated: Vec<String>,
}

pub struct HubBuilder {
    hub: Hub,
}

impl HubBuilder {
    pub fn new() -> Self {
        Self {
            hub: Hub::default(),
        }
    }

    /// Serves `dir`'s files as `repo` at `revision` (e.g. `main`, `refs/pr/1`).
    pub fn revision(mut self, repo: &str, revision: &str, dir: &Path) -> Self {
        let commit = format!("{:016x}", fnv(format!("{repo}@{revision}").as_bytes())).repeat(3)
            [..40]
            .to_string();
        self.hub.revisions.insert(
            (repo.to_string(), revision.to_string()),
            Revision {
                commit,
                dir: dir.to_path_buf(),
            },
        );
        self
    }

    /// Downloads of `file` send half their bytes, then the connection drops.
    pub fn break_file(mut self, file: &str) -> Self {
        self.hub.broken.push(file.to_string());
        self
    }

    /// Downloads of `file` (not its size probe) send half their bytes as if complete.
    pub fn truncate_file(mut self, file: &str) -> Self {
        self.hub.truncated.push(file.to_string());
        self
    }

    /// Starts it on 127.0.0.1 (a thread of its own); returns its base URL for `HF_ENDPOINT`.
    pub fn start(self) -> String {
        let hub = Arc::new(self.hub);
        let app = Router::new()
            .route("/api/models/{org}/{name}/revision/{*rev}", get(info))
            .route("/{org}/{name}/resolve/{*rest}", get(resolve))
            .with_state(hub);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        base
    }
}

/// FNV-1a: a stable stand-in for the hub's content hashes (etags, commits).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn files(dir: &Path) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().into_string().unwrap(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    out.sort();
    out
}

fn not_found(what: String) -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"error": what}))).into_response()
}

async fn info(
    State(hub): State<Arc<Hub>>,
    UrlPath((org, name, rev)): UrlPath<(String, String, String)>,
) -> Response {
    let repo = format!("{org}/{name}");
    let Some(r) = hub.revisions.get(&(repo.clone(), rev.clone())) else {
        return not_found(format!("{repo}@{rev}"));
    };
    let siblings: Vec<_> = files(&r.dir)
        .into_iter()
        .map(|(f, size)| json!({"rfilename": f, "size": size}))
        .collect();
    Json(json!({"id": repo, "modelId": repo, "sha": r.commit, "siblings": siblings}))
        .into_response()
}

async fn resolve(
    State(hub): State<Arc<Hub>>,
    UrlPath((org, name, rest)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let repo = format!("{org}/{name}");
    // `{rev}/{file}`; a revision with a slash comes percent-encoded (`refs%2Fpr%2F1`)
    let Some((rev, file)) = rest.rsplit_once('/') else {
        return not_found(rest);
    };
    let rev = rev.replace("%2F", "/");
    let Some(r) = hub.revisions.get(&(repo.clone(), rev.clone())) else {
        return not_found(format!("{repo}@{rev}"));
    };
    let Ok(bytes) = std::fs::read(r.dir.join(file)) else {
        return not_found(format!("{repo}@{rev}/{file}"));
    };
    let size = bytes.len();
    let start = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split('-').next())
        .and_then(|v| v.parse::<usize>().ok());
    let end = match headers.get("range").and_then(|v| v.to_str().ok()) {
        Some(v) if v.ends_with('-') => size,
        Some(v) => v
            .rsplit('-')
            .next()
            .and_then(|e| e.parse::<usize>().ok())
            .map_or(size, |e| (e + 1).min(size)),
        None => size,
    };
    let start = start.unwrap_or(0).min(size);
    let mut body = bytes[start..end].to_vec();
    if hub.truncated.iter().any(|t| t == file) && body.len() > 1 {
        body.truncate(body.len() / 2);
    }
    let mut res = Response::builder()
        .status(if start > 0 || end < size {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        })
        .header("etag", format!("\"{:016x}\"", fnv(&bytes)))
        .header("x-repo-commit", &r.commit)
        .header("accept-ranges", "bytes")
        .header("content-length", body.len())
        .header(
            "content-range",
            format!("bytes {start}-{}/{size}", end.saturating_sub(1)),
        );
    let breaks = hub.broken.iter().any(|b| b == file) && body.len() > 1;
    if breaks {
        // half the body, then an error: hyper drops the connection short of content-length
        let half = bytes::Bytes::from(body[..body.len() / 2].to_vec());
        let stream = futures_util::stream::iter([
            Ok(half),
            Err(std::io::Error::other("stand-in hub: connection dropped")),
        ]);
        res = res.header("x-stand-in", "breaks");
        return res.body(Body::from_stream(stream)).unwrap();
    }
    res.body(Body::from(body)).unwrap()
}
