//! Support for the `bench` binary: a random checkpoint of a released shape, a minimal HTTP
//! client for streaming completions, and process memory readings. Not used by the server.

pub mod checkpoint;
pub mod client;
pub mod cost;
pub mod limits;

/// Peak resident set (VmHWM) of a process, in bytes (Linux).
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
