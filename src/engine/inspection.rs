//! Turns the logits of every head at a prompt's positions into the inspection report: the
//! model's math (`model::inspect`, each strategy's own `inspect`) plus token texts and head
//! names.

use rayon::prelude::*;

use super::request::{HeadReport, InspectSpec, PositionReport};
use super::sequence::MIN_LOGPROB;
use crate::model::inspect::{head_stats, jensen_shannon};
use crate::model::mode::log_softmax;
use crate::model::{Head, Logits, Mode, TextTokenizer};

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
    // each strategy with the indices of its heads (the inspection evaluates all of them)
    let strategies: Vec<(&Mode, String, Vec<usize>)> = spec
        .strategies
        .iter()
        .filter_map(|m| {
            let idx = m.heads().into_iter().map(index_of).collect::<Option<_>>()?;
            Some((m, m.to_string(), idx))
        })
        .collect();
    let text = |id: u32| tok.decode(&[id]).unwrap_or_default();
    (0..rows)
        .into_par_iter()
        .map(|row| {
            let index = first + row;
            let next = prompt.get(index + 1).copied();
            let logps: Vec<Vec<f32>> = logits.iter().map(|h| log_softmax(h.row(row))).collect();
            let inspected: Vec<_> = strategies
                .iter()
                .map(|(m, name, idx)| {
                    let rows: Vec<&[f32]> = idx.iter().map(|&i| logits[i].row(row)).collect();
                    (name, m.inspect(&rows))
                })
                .collect();
            let named = heads
                .iter()
                .zip(&logps)
                .map(|(&h, lp)| (h.to_string(), &lp[..], None))
                .chain(
                    inspected
                        .iter()
                        .map(|(name, i)| ((*name).clone(), &i.logprobs[..], i.chosen)),
                );
            let reference = &logps[original];
            PositionReport {
                index,
                token_id: prompt[index],
                next_token_id: next,
                heads: named
                    .map(|(head, lp, chosen)| {
                        let s = head_stats(lp, spec.top_logprobs, next);
                        // DoLa rules tokens out (-inf): no alternatives, -9999 when asked
                        HeadReport {
                            head,
                            top: s
                                .top
                                .into_iter()
                                .filter(|(_, l)| l.is_finite())
                                .map(|(id, l)| (id, text(id), l))
                                .collect(),
                            entropy: s.entropy,
                            next_token_logprob: s.next_logprob.map(|l| l.max(MIN_LOGPROB)),
                            jsd_to_original: jensen_shannon(lp, reference),
                            chosen,
                        }
                    })
                    .collect(),
            }
        })
        .collect()
}
