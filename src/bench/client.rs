//! A minimal HTTP/1.1 client for the benchmark: one streaming completion per connection,
//! timing each server-sent event as it arrives.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

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

fn io_err(m: String) -> std::io::Error {
    std::io::Error::other(m)
}

/// POSTs `body` to `path` and reads the SSE stream to its end.
pub fn stream_completion(addr: &str, path: &str, body: &str) -> std::io::Result<StreamTiming> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let sent = Instant::now();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if !line.contains(" 200 ") {
        let mut rest = String::new();
        let _ = r.read_to_string(&mut rest);
        return Err(io_err(format!("{} {rest}", line.trim())));
    }
    let mut chunked = false;
    loop {
        line.clear();
        r.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if line
            .to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
        {
            chunked = true;
        }
    }
    let mut events = Vec::new();
    let mut pending = String::new();
    let mut last_data = String::new();
    let mut on_bytes = |bytes: &[u8], events: &mut Vec<Instant>| {
        pending.push_str(&String::from_utf8_lossy(bytes));
        while let Some(end) = pending.find("\n\n") {
            let block: String = pending.drain(..end + 2).collect();
            if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) {
                if data.contains("\"error\"") {
                    return Err(io_err(data.to_string()));
                }
                if data != "[DONE]" {
                    events.push(Instant::now());
                    last_data = data.to_string();
                }
            }
        }
        Ok(())
    };
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim(), 16)
                .map_err(|e| io_err(format!("chunk size: {e}")))?;
            if size == 0 {
                break;
            }
            let mut chunk = vec![0u8; size];
            r.read_exact(&mut chunk)?;
            on_bytes(&chunk, &mut events)?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else {
        let mut rest = Vec::new();
        r.read_to_end(&mut rest)?;
        on_bytes(&rest, &mut events)?;
    }
    Ok(StreamTiming {
        sent,
        events,
        last_data,
    })
}

/// GET returning the status code (used for /health).
pub fn get_status(addr: &str, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io_err(format!("bad status line {line:?}")))
}
