//! What one head predicts at one position, as the inspection endpoint reports it: the top
//! tokens of its log-distribution, its entropy, the logprob of a given next token, and the
//! Jensen-Shannon divergence to another head's distribution ("logit lens" with trained
//! exits).

use crate::kernels::logprob::top_ids;

/// Statistics of one log-distribution (`logp`, normalised: Σ e^logp = 1).
#[derive(Debug, Clone, PartialEq)]
pub struct HeadStats {
    /// `(token id, logprob)`, best first (ties to the lower id).
    pub top: Vec<(u32, f32)>,
    /// In nats.
    pub entropy: f32,
    pub next_logprob: Option<f32>,
}

/// The top `k`, the entropy and the logprob of `next` in `logp`.
pub fn head_stats(logp: &[f32], k: usize, next: Option<u32>) -> HeadStats {
    let ids = top_ids(logp, k);
    let entropy = -logp
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| (l as f64).exp() * l as f64)
        .sum::<f64>();
    HeadStats {
        top: ids.into_iter().map(|i| (i, logp[i as usize])).collect(),
        entropy: entropy.max(0.0) as f32,
        next_logprob: next.map(|t| logp[t as usize]),
    }
}

/// Jensen-Shannon divergence (nats) between two log-distributions: the mean of the KL of
/// each to their average, 0 for equal ones, at most ln 2.
pub fn jensen_shannon(logp: &[f32], logq: &[f32]) -> f32 {
    let mut js = 0.0f64;
    for (&a, &b) in logp.iter().zip(logq) {
        let (p, q) = ((a as f64).exp(), (b as f64).exp());
        let m = 0.5 * (p + q);
        if m <= 0.0 {
            continue;
        }
        let lm = m.ln();
        if p > 0.0 {
            js += 0.5 * p * (a as f64 - lm);
        }
        if q > 0.0 {
            js += 0.5 * q * (b as f64 - lm);
        }
    }
    js.clamp(0.0, std::f64::consts::LN_2) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ln(ps: &[f32]) -> Vec<f32> {
        ps.iter().map(|p| p.ln()).collect()
    }

    #[test]
    fn top_entropy_and_next_of_a_known_distribution() {
        let lp = ln(&[0.1, 0.5, 0.2, 0.2]);
        let s = head_stats(&lp, 3, Some(0));
        let ids: Vec<u32> = s.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 2, 3], "ties go to the lower id");
        let h: f32 = [0.1f32, 0.5, 0.2, 0.2].iter().map(|p| -p * p.ln()).sum();
        assert!((s.entropy - h).abs() < 1e-6);
        assert_eq!(s.next_logprob, Some(0.1f32.ln()));
        assert!(head_stats(&lp, 0, None).top.is_empty());
    }

    #[test]
    fn jensen_shannon_is_zero_for_equal_and_ln2_for_disjoint() {
        let p = ln(&[0.25, 0.25, 0.5, 0.0]);
        assert!(jensen_shannon(&p, &p).abs() < 1e-7);
        let a = ln(&[1.0, 0.0]);
        let b = ln(&[0.0, 1.0]);
        assert!((jensen_shannon(&a, &b) - std::f32::consts::LN_2).abs() < 1e-6);
        // symmetric, by hand for [0.9, 0.1] vs [0.5, 0.5]
        let (x, y) = (ln(&[0.9, 0.1]), ln(&[0.5, 0.5]));
        let m = [0.7f64, 0.3];
        let kl = |p: [f64; 2]| p[0] * (p[0] / m[0]).ln() + p[1] * (p[1] / m[1]).ln();
        let want = 0.5 * kl([0.9, 0.1]) + 0.5 * kl([0.5, 0.5]);
        assert!((jensen_shannon(&x, &y) as f64 - want).abs() < 1e-6);
        assert_eq!(jensen_shannon(&x, &y), jensen_shannon(&y, &x));
    }
}
