//! The bench's HTTP client (reqwest's blocking one): a streamed completion, timing each
//! server-sent event as it arrives, and a health probe.

use std::io::{BufRead, BufReader};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reqwest::blocking::Client;

/// Arrival times of the `data:` events of one streamed completion (the `[DONE]` excluded).
pub struct StreamTiming {
    pub sent: Instant,
    pub events: Vec<Instant>,
    /// The last event's JSON (the usage, with `stream_options.include_usage`).
    pub last_data: String,
}

impl StreamTiming {
    pub fn ttft_s(&self) -> f64 {
        self.events
            .first()
            .map_or(f64::NAN, |t| (*t - self.sent).as_secs_f64())
    }

    /// Tokens per second after the first token.
    pub fn decode_tps(&self) -> f64 {
        match (self.events.first(), self.events.last()) {
            (Some(a), Some(b)) if self.events.len() > 1 => {
                (self.events.len() - 1) as f64 / (*b - *a).as_secs_f64()
            }
            _ => f64::NAN,
        }
    }
}

/// One client for the whole run: its connections are reused, as a real client's would be.
fn client() -> &'static Client {
    static CLIENT: OnceLock<Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        Client::builder()
            .timeout(None::<Duration>)
            .tcp_nodelay(true)
            .build()
            .expect("an HTTP client")
    })
}

/// POSTs `body` (JSON) to `url` and reads the SSE stream to its end; an error event or a
/// status other than 200 is an error.
pub fn stream_completion(url: &str, body: &str) -> Result<StreamTiming, String> {
    let sent = Instant::now();
    let resp = post_ok(url, body)?;
    let mut events = Vec::new();
    let mut last_data = String::new();
    for line in BufReader::new(resp).lines() {
        let line = line.map_err(|e| e.to_string())?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        // an event whose object is an error (not a token whose text is "error")
        if data.contains("\"error\"")
            && serde_json::from_str::<serde_json::Value>(data)
                .is_ok_and(|v| v.get("error").is_some())
        {
            return Err(data.to_string());
        }
        if data != "[DONE]" {
            events.push(Instant::now());
            last_data = data.to_string();
        }
    }
    Ok(StreamTiming {
        sent,
        events,
        last_data,
    })
}

/// POSTs `body` to `url` and returns the JSON answer; a status other than 200 is an error.
pub fn post_json(url: &str, body: &serde_json::Value) -> Result<serde_json::Value, String> {
    let text = post_ok(url, &body.to_string())?
        .text()
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| e.to_string())
}

/// POSTs JSON `body` to `url`; a status other than 200 is an error with the answer's text.
fn post_ok(url: &str, body: &str) -> Result<reqwest::blocking::Response, String> {
    let resp = client()
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    if status != reqwest::StatusCode::OK {
        return Err(format!("{status} {}", resp.text().unwrap_or_default()));
    }
    Ok(resp)
}

/// The status of a GET of `url` (the health probe), or None when nothing answers.
pub fn get_status(url: &str) -> Option<u16> {
    client().get(url).send().ok().map(|r| r.status().as_u16())
}

/// The body of a GET of `url` (e.g. `/metrics`).
pub fn get_text(url: &str) -> Result<String, String> {
    client()
        .get(url)
        .send()
        .and_then(|r| r.text())
        .map_err(|e| e.to_string())
}
