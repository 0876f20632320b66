//! Turns the logits of every head at a prompt's positions into the inspection report: the
//! model's math (`model::inspect`) plus token texts and head names.

use rayon::prelude::*;

use super::request::{HeadReport, InspectSpec, PositionReport};
use crate::model::inspect::{head_stats, jensen_shannon};
use crate::model::mode::{contrast_log_q, log_softmax};
use crate::model::{Head, Logits, TextTokenizer};

/// Every head an inspection evaluates: the exits in ascending order, then the original.
pub fn inspected_heads(exits: &[usize]) -> Vec<Head> {
    let mut heads: Vec<Head> = exits.iter().map(|&l| Head::Exit(l)).collect();
    heads.push(Head::Original);
    heads
}

/// Reports for `rows` consecutive positions starting at prompt position `first`; `logits`
/// holds, per head of `heads`, one row of logits per position.
pub fn reports(
    heads: &[Head],
    logits: &[Logits],
    first: usize,
    rows: usize,
    prompt: &[u32],
    spec: &InspectSpec,
    tok: &TextTokenizer,
) -> Vec<PositionReport> {
    let index_of = |h: Head| heads.iter().position(|&x| x == h);
    let original = index_of(Head::Original).expect("inspections evaluate the original head");
    let contrast = spec.contrast.map(|c| {
        (
            c,
            index_of(c.upper.into()),
            index_of(Head::Exit(c.lower)),
            c.to_string(),
        )
    });
    let text = |id: u32| tok.decode(&[id]).unwrap_or_default();
    (0..rows)
        .into_par_iter()
        .map(|row| {
            let index = first + row;
            let next = prompt.get(index + 1).copied();
            let logps: Vec<Vec<f32>> = logits.iter().map(|h| log_softmax(h.row(row))).collect();
            let mut named: Vec<(String, &[f32])> = heads
                .iter()
                .zip(&logps)
                .map(|(&h, lp)| (h.to_string(), &lp[..]))
                .collect();
            let q;
            if let Some((c, Some(u), Some(l), name)) = &contrast {
                q = contrast_log_q(logits[*u].row(row), logits[*l].row(row), c);
                named.push((name.clone(), &q[..]));
            }
            let reference = &logps[original];
            PositionReport {
                index,
                token_id: prompt[index],
                next_token_id: next,
                heads: named
                    .into_iter()
                    .map(|(head, lp)| {
                        let s = head_stats(lp, spec.top_logprobs, next);
                        HeadReport {
                            head,
                            top: s.top.into_iter().map(|(id, l)| (id, text(id), l)).collect(),
                            entropy: s.entropy,
                            next_token_logprob: s.next_logprob,
                            jsd_to_original: jensen_shannon(lp, reference),
                        }
                    })
                    .collect(),
            }
        })
        .collect()
}
