//! The report: the machine's name, the printed table, and the results file, written under
//! `bench/results/DATE-MACHINE-SHAPE[-WHAT].json` and never overwritten.

use std::path::PathBuf;

use serde_json::Value;

use crate::workloads::BenchMode;

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let threads = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {threads} threads")
}

pub fn print_table(r: &Value, modes: &[BenchMode]) {
    println!(
        "\nexitserve benchmark on {} (prompt {} tokens, {} new, greedy but where sampled)\nlimits: {}",
        r["machine"].as_str().unwrap_or(""),
        r["prompt_len"],
        r["new_tokens"],
        r["limits"]["summary"].as_str().unwrap_or("")
    );
    println!(
        "{:<13} {:<15} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "server dtype",
        "mode",
        "decode",
        "% bw",
        "TTFT ms",
        "TTFT512",
        "x1",
        "x4",
        "x16",
        "% flops"
    );
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.1}"));
    let f0 = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.0}"));
    let mut rows: Vec<(String, &Value)> = r["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| ("exitserve".to_string(), run))
        .collect();
    if let Some(peer) = r["peer"]["runs"].as_array() {
        rows.extend(peer.iter().map(|run| ("llama.cpp".to_string(), run)));
    }
    for (server, run) in rows {
        let dtype = run["dtype"].as_str().unwrap_or("");
        let label = format!("{server} {dtype}");
        if let Some(why) = run["not_measured"].as_str() {
            println!("{label:<13} not measured: {why}");
            continue;
        }
        for m in modes {
            let s = &run["single_stream"][&m.name];
            if s.is_null() {
                continue;
            }
            let a = &run["aggregate"][&m.name];
            println!(
                "{label:<13} {:<15} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7}",
                m.name,
                f(&s["decode_tok_s"]),
                f0(&s["pct_bandwidth_bound"]),
                f(&s["ttft_ms"]),
                f(&s["ttft_512_ms"]),
                f(&a["1"]["tok_s"]),
                f(&a["4"]["tok_s"]),
                f(&a["16"]["tok_s"]),
                f(&a["16"]["pct_compute_bound"])
            );
            let sc = &run["scoring"][&m.name];
            if !sc.is_null() {
                println!(
                    "{label:<13} {:<15} scoring {} prompt tok/s ({} % of the compute bound)",
                    m.name,
                    f(&sc["prompt_tok_s"]),
                    f(&sc["pct_compute_bound"])
                );
            }
        }
        if let Some(rss) = run["peak_rss_bytes"].as_f64() {
            println!("{label:<13} peak RSS {:.2} GB", rss / 1e9);
        }
    }
    if let Some(refs) = r["reference"].as_object() {
        for (k, v) in refs {
            println!(
                "reference {k}: {:.2} tok/s",
                v["tokens_per_s"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    if let Some(refs) = r["reference_scoring"].as_object() {
        for (k, v) in refs {
            println!(
                "reference scoring {k}: {:.1} prompt tok/s",
                v["prompt_tok_s"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
}

/// `results/DATE-MACHINE-NAME.json` beside this crate (DATE in UTC, MACHINE the CPU's name and
/// thread count); a name already taken gets `-2`, `-3`, ... : results are never overwritten.
pub fn results_path(name: &str) -> PathBuf {
    let dir = crate::repo_root().join("bench/results");
    let stem = format!("{}-{}-{name}", today(), slug(&machine()));
    (1..)
        .map(|i| match i {
            1 => dir.join(format!("{stem}.json")),
            i => dir.join(format!("{stem}-{i}.json")),
        })
        .find(|p| !p.exists())
        .expect("a free name")
}

/// Lowercase letters and digits, runs of anything else as one `-` (`AMD EPYC 7B13, 2 threads`
/// -> `amd-epyc-7b13-2-threads`).
fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// Today's date in UTC, `YYYY-MM-DD` (the civil date of the Unix day, Howard Hinnant's
/// algorithm).
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    civil_date((secs / 86_400) as i64)
}

fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_names() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(20_426), "2025-12-04");
        assert_eq!(civil_date(11_016), "2000-02-29");
        assert_eq!(slug("AMD EPYC 7B13, 2 threads"), "amd-epyc-7b13-2-threads");
    }
}
