//! HTTP helpers: JSON posts and SSE parsing.

use serde_json::Value;

pub async fn post(url: &str, body: &Value) -> (u16, Value) {
    status_and_body(
        reqwest::Client::new()
            .post(url)
            .json(body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

pub async fn get(url: &str) -> (u16, Value) {
    status_and_body(reqwest::get(url).await.unwrap()).await
}

/// The status and the body as JSON (or as a JSON string when it is not JSON).
async fn status_and_body(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Posts a streaming request; returns the `data:` payloads in order (`[DONE]` as a string).
pub async fn post_stream(url: &str, body: &Value) -> (u16, String, Vec<Value>) {
    let resp = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = resp.text().await.unwrap();
    let events = text
        .split("\n\n")
        .filter_map(|block| {
            let data: Vec<&str> = block
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .map(|d| serde_json::from_str(&d).unwrap_or(Value::String(d)))
        .collect();
    (status, ctype, events)
}
