//! Turns the logits of every head at a prompt's positions into the inspection report: the
//! model's math (`model::inspect`) plus token texts and head names.

use rayon::prelude::*;

use super::request::{HeadReport, InspectSpec, PositionReport};
use super::sequence::MIN_LOGPROB;
use crate::model::inspect::{head_stats, jensen_shannon};
use crate::model::mode::dola::dola_logits;
use crate::model::mode::{contrast_log_q, log_softmax};
use crate::model::{Head, Logits, TextTokenizer};

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
    // DoLa: its candidates' heads, in order
    let dola = spec.dola.map(|d| {
        let candidates: Vec<(usize, usize)> = d
            .candidates
            .iter()
            .filter_map(|l| index_of(d.premature.head(l)).map(|i| (l, i)))
            .collect();
        (d, candidates)
    });
    let text = |id: u32| tok.decode(&[id]).unwrap_or_default();
    (0..rows)
        .into_par_iter()
        .map(|row| {
            let index = first + row;
            let next = prompt.get(index + 1).copied();
            let logps: Vec<Vec<f32>> = logits.iter().map(|h| log_softmax(h.row(row))).collect();
            let mut named: Vec<(String, &[f32], Option<usize>)> = heads
                .iter()
                .zip(&logps)
                .map(|(&h, lp)| (h.to_string(), &lp[..], None))
                .collect();
            let q;
            if let Some((c, Some(u), Some(l), name)) = &contrast {
                q = contrast_log_q(logits[*u].row(row), logits[*l].row(row), c);
                named.push((name.clone(), &q[..], None));
            }
            let dola_lp;
            if let Some((d, candidates)) = dola.as_ref().filter(|(_, c)| !c.is_empty()) {
                let rows: Vec<&[f32]> = candidates
                    .iter()
                    .map(|&(_, i)| logits[i].row(row))
                    .collect();
                let (d_logits, chosen) =
                    dola_logits(logits[original].row(row), &rows, d.relative_top);
                dola_lp = log_softmax(&d_logits);
                named.push((d.to_string(), &dola_lp[..], Some(candidates[chosen].0)));
            }
            let reference = &logps[original];
            PositionReport {
                index,
                token_id: prompt[index],
                next_token_id: next,
                heads: named
                    .into_iter()
                    .map(|(head, lp, premature_layer)| {
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
                            premature_layer,
                        }
                    })
                    .collect(),
            }
        })
        .collect()
}
