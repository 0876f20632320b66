//! Decoding modes: which heads a sequence needs, and how their logits become the
//! log-distribution that is sampled from (autocontrastive decoding, Gera et al. 2023).

use super::error::{ModelError, Result};
use super::fastmath;

/// A vocabulary head evaluated on `ln_f` of a block's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Head {
    /// The tied `lm_head` on the top layer.
    Original,
    /// The exit head trained on the output of block `layer` (1-based).
    Exit(usize),
}

impl Head {
    /// The block whose output this head reads.
    pub fn layer(self, num_layers: usize) -> usize {
        match self {
            Head::Original => num_layers,
            Head::Exit(l) => l,
        }
    }
}

/// Upper side of a contrast: an exit layer or the original head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upper {
    Original,
    Exit(usize),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContrastParams {
    pub upper: Upper,
    pub lower: usize,
    /// Plausibility threshold relative to the upper head's top probability.
    pub alpha: f32,
    /// Tokens always kept in the plausible set (the k most likely of the upper head).
    pub minimum_candidates: usize,
}

pub const DEFAULT_ALPHA: f32 = 0.1;
pub const DEFAULT_MINIMUM_CANDIDATES: usize = 1;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Original,
    Exit(usize),
    Contrast(ContrastParams),
}

impl Mode {
    /// The heads to evaluate, in the order [`Mode::scores`] expects their logits.
    pub fn heads(&self) -> Vec<Head> {
        match *self {
            Mode::Original => vec![Head::Original],
            Mode::Exit(l) => vec![Head::Exit(l)],
            Mode::Contrast(c) => {
                let upper = match c.upper {
                    Upper::Original => Head::Original,
                    Upper::Exit(l) => Head::Exit(l),
                };
                vec![upper, Head::Exit(c.lower)]
            }
        }
    }

    /// Blocks the sequence must run through: layers above are never computed for it.
    pub fn depth(&self, num_layers: usize) -> usize {
        self.heads()
            .iter()
            .map(|h| h.layer(num_layers))
            .max()
            .unwrap_or(num_layers)
    }

    /// Checks every layer against the model's exits.
    pub fn validate(&self, exits: &[usize]) -> Result<()> {
        for head in self.heads() {
            if let Head::Exit(layer) = head {
                if !exits.contains(&layer) {
                    return Err(ModelError::NotAnExit {
                        layer,
                        available: exits.to_vec(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The next-token log-distribution from the logits of [`Mode::heads`]: log-softmax for a
    /// single head, log q for contrast.
    pub fn scores(&self, logits: &[Vec<f32>]) -> Vec<f32> {
        match self {
            Mode::Original | Mode::Exit(_) => log_softmax(&logits[0]),
            Mode::Contrast(c) => contrast_log_q(&logits[0], &logits[1], c),
        }
    }
}

pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = fastmath::max(logits);
    let lse = max + fastmath::sum_exp(logits, max).ln();
    fastmath::sub(logits, lse)
}

/// Autocontrastive log q (REFERENCE.md): the plausible set H keeps the tokens with
/// p_u >= min(alpha * max p_u, k-th largest p_u); inside H, q is the softmax of
/// log p_u - log p_l rescaled to H's upper mass; outside H, q = p_u. Log-probs come from
/// log-softmax, so q stays finite where the reference's log(softmax) gives NaN.
pub fn contrast_log_q(upper: &[f32], lower: &[f32], c: &ContrastParams) -> Vec<f32> {
    let lp_u = log_softmax(upper);
    let lp_l = log_softmax(lower);
    // Compared in log space: p_u >= t  <=>  log p_u >= log t (exp is monotonic).
    let max_lp = fastmath::max(&lp_u);
    let k = c.minimum_candidates.clamp(1, lp_u.len());
    let kth_lp = if k == 1 {
        max_lp
    } else {
        let mut sorted = lp_u.clone();
        let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        *kth
    };
    let log_threshold = (c.alpha.ln() + max_lp).min(kth_lp);
    let in_set: Vec<usize> = (0..lp_u.len())
        .filter(|&i| lp_u[i] >= log_threshold)
        .collect();

    let diffs: Vec<f32> = in_set.iter().map(|&i| lp_u[i] - lp_l[i]).collect();
    let diff_max = fastmath::max(&diffs);
    let offset = diff_max + fastmath::sum_exp(&diffs, diff_max).ln();
    let set_lp: Vec<f32> = in_set.iter().map(|&i| lp_u[i]).collect();
    let log_mass = max_lp + fastmath::sum_exp(&set_lp, max_lp).ln();
    let mut q = lp_u;
    for (&i, d) in in_set.iter().zip(diffs) {
        q[i] = d - offset + log_mass;
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contrast_is_a_normalised_distribution_and_finite() {
        // lower head gives token 2 probability ~0: the reference would produce NaN there.
        let upper = vec![2.0, 1.5, 1.9, -3.0];
        let lower = vec![1.0, 0.0, -200.0, 0.0];
        let c = ContrastParams {
            upper: Upper::Original,
            lower: 1,
            alpha: 0.1,
            minimum_candidates: 1,
        };
        let q = contrast_log_q(&upper, &lower, &c);
        assert!(q.iter().all(|x| x.is_finite()));
        let total: f32 = q.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        // token 3 is below alpha * max p_u: it keeps the upper probability.
        let lp_u = log_softmax(&upper);
        assert!((q[3] - lp_u[3]).abs() < 1e-6);
        // token 2 wins: the lower head finds it implausible.
        let best = (0..4).max_by(|&a, &b| q[a].total_cmp(&q[b])).unwrap();
        assert_eq!(best, 2);
    }

    #[test]
    fn minimum_candidates_widens_the_set() {
        let upper = vec![10.0, 0.0, -1.0];
        let lower = vec![10.0, -5.0, 0.0];
        let narrow = ContrastParams {
            upper: Upper::Exit(2),
            lower: 1,
            alpha: 0.1,
            minimum_candidates: 1,
        };
        // with one candidate only token 0 is plausible and keeps its own probability.
        let q = contrast_log_q(&upper, &lower, &narrow);
        assert!((q[0] - log_softmax(&upper)[0]).abs() < 1e-6);
        let wide = ContrastParams {
            minimum_candidates: 2,
            ..narrow
        };
        let q = contrast_log_q(&upper, &lower, &wide);
        assert!(q[1] > q[0]);
    }

    #[test]
    fn depth_and_validation() {
        let m = Mode::Contrast(ContrastParams {
            upper: Upper::Exit(4),
            lower: 2,
            alpha: 0.1,
            minimum_candidates: 1,
        });
        assert_eq!(m.depth(12), 4);
        assert_eq!(Mode::Original.depth(12), 12);
        assert!(m.validate(&[2, 4]).is_ok());
        let e = Mode::Exit(3).validate(&[2, 4]).unwrap_err().to_string();
        assert_eq!(
            e,
            "layer 3 is not an exit of this model; available exits: [2, 4]"
        );
    }
}
