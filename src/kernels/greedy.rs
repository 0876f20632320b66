//! Each row's greedy choice, where the logits are: on a GPU one launch over a step's head
//! logits, so that a greedy sequence's next token costs the host one index instead of a copy
//! of the vocabulary (16 streams of a 50,257-token vocabulary: 64 bytes instead of 3.2 MB a
//! step, and no log-softmax on the host; a contrast stream copies two rows otherwise).
//! - [`argmax_rows`]: the host's `argmax`, the first position of the row's maximum, NaN never
//!   winning.
//! - [`contrast_rows`]: the greedy choice of a contrast of two heads ([`ContrastRule`]:
//!   autocontrastive decoding, Gera et al., or DoLa over its mature head and chosen
//!   premature layer), the first position of the largest log p_u - log p_l inside the
//!   plausible set {log p_u >= ln(alpha) + max log p_u} (a candidate floor of one): the
//!   argmax of the contrast's scores, which are a monotone function of that difference inside
//!   the set and below the set's best outside it, save where their rounding ties two
//!   differences.
//! - [`margin_rows`]: each row's softmax margin, the confidence by which early exit decides
//!   whether a token leaves at an exit, so that a step copies one float per row to decide
//!   (and then only the rows of the head each token leaves at).
//! - [`divergence_rows`]: DoLa's divergence between the mature head's distribution and a
//!   premature candidate's, so that a step chooses the candidate where the logits are and
//!   copies two rows per sequence (mature, chosen) instead of one per candidate.
//!
//! `choices.cu` computes each on a GPU; the Rust here is the CPU's version and the oracle that
//! [`check`] holds the kernels to at start-up.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda_source::launch_op;
#[cfg(any(feature = "cuda-emulator", feature = "cuda"))]
use super::cuda_source::ChoiceKernel;
use super::fastmath;

/// `logits` `(rows, vocab)` float32: `(rows)` u32, each row's first position of its maximum
/// (0 when no element is a number).
pub fn argmax_rows(logits: &Tensor) -> Result<Tensor> {
    PerRow::Argmax.apply(logits)
}

/// The choice in one row (first index of the maximum, as torch.argmax), as the CUDA kernel
/// and the host's sampler make it.
pub fn argmax(row: &[f32]) -> u32 {
    // The vectorised maximum, then its first position: a greedy step's pass over the
    // vocabulary without a dependent compare per element.
    let best = fastmath::max(row);
    row.iter().position(|&x| x == best).unwrap_or(0) as u32
}

/// `logits` `(rows, vocab)` float32: `(rows)` float32, each row's [`softmax_margin`].
pub fn margin_rows(logits: &Tensor) -> Result<Tensor> {
    PerRow::Margin.apply(logits)
}

/// Top-1 minus top-2 probability of the softmax of `logits` (the second the largest value but
/// one occurrence of the first: a tie at the top gives 0), as the CUDA kernel finds it.
pub fn softmax_margin(logits: &[f32]) -> f32 {
    let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in logits {
        if x > first {
            second = first;
            first = x;
        } else if x > second {
            second = x;
        }
    }
    let z = fastmath::sum_exp(logits, first);
    (1.0 - (second - first).exp()) / z
}

/// `mature` and `premature` `(rows, vocab)` float32 logits: `(rows)` float64, each pair of
/// rows' [`dola_divergence`].
pub fn divergence_rows(mature: &Tensor, premature: &Tensor) -> Result<Tensor> {
    if mature.dtype() != DType::F32
        || premature.dtype() != DType::F32
        || mature.rank() != 2
        || premature.dims() != mature.dims()
    {
        candle_core::bail!("divergence rows: two (rows, vocab) float32 matrices");
    }
    mature
        .contiguous()?
        .apply_op2_no_bwd(&premature.contiguous()?, &DivergenceRows)
}

/// The divergence between two rows of logits' softmaxes by which DoLa chooses its premature
/// layer, as transformers computes it up to a constant factor: KL(M || P_mature) +
/// KL(M || P_premature), M their average, summed in float64 over the float32 log-softmaxes
/// (`F.kl_div(input, target)` is target · (log target - input)).
pub fn dola_divergence(mature: &[f32], premature: &[f32]) -> f64 {
    divergence_of_log_probs(
        &fastmath::log_softmax(mature),
        &fastmath::log_softmax(premature),
    )
}

/// [`dola_divergence`] from the two log-softmaxes.
pub fn divergence_of_log_probs(mature: &[f32], premature: &[f32]) -> f64 {
    let mut d = 0.0f64;
    for (&a, &b) in mature.iter().zip(premature) {
        let (a, b) = (a as f64, b as f64);
        let m = 0.5 * (a.exp() + b.exp());
        if m > 0.0 {
            d += m * (2.0 * m.ln() - a - b);
        }
    }
    d
}

/// How a contrast of two heads' rows (upper, lower) makes one distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ContrastRule {
    /// Autocontrastive decoding ([`contrast_log_q`]) with ln(alpha) (-inf making every token
    /// plausible) and a candidate floor.
    Autocontrast {
        ln_alpha: f32,
        minimum_candidates: usize,
    },
    /// DoLa ([`dola_scores`]) over its mature head (upper) and the premature layer it chose
    /// (lower), with ln(relative_top).
    Dola { ln_relative_top: f32 },
}

impl ContrastRule {
    /// The scores a strategy chooses from: the contrast's log q, DoLa's logits.
    pub fn scores(self, upper: &[f32], lower: &[f32]) -> Vec<f32> {
        match self {
            ContrastRule::Autocontrast {
                ln_alpha,
                minimum_candidates,
            } => contrast_log_q(upper, lower, ln_alpha, minimum_candidates),
            ContrastRule::Dola { ln_relative_top } => dola_scores(upper, lower, ln_relative_top),
        }
    }

    /// The log-distribution a request reads: the contrast's log q, the log-softmax of DoLa's
    /// logits (as the host normalises them).
    pub fn log_distribution(self, upper: &[f32], lower: &[f32]) -> Vec<f32> {
        match self {
            ContrastRule::Autocontrast { .. } => self.scores(upper, lower),
            ContrastRule::Dola { .. } => fastmath::log_softmax(&self.scores(upper, lower)),
        }
    }

    /// The kernels' form, three floats: ln(alpha), candidate floor (exact below 2^24), kind
    /// (0 autocontrast, 1 DoLa). DoLa's set is autocontrast's with a floor of one, so that its
    /// greedy choice is [`contrast_choice`]'s.
    pub fn params(self) -> [f32; 3] {
        match self {
            ContrastRule::Autocontrast {
                ln_alpha,
                minimum_candidates,
            } => [ln_alpha, minimum_candidates.min(1 << 24) as f32, 0.0],
            ContrastRule::Dola { ln_relative_top } => [ln_relative_top, 1.0, 1.0],
        }
    }

    /// The rule [`ContrastRule::params`] wrote.
    pub fn from_params(p: &[f32]) -> Self {
        if p[2] == 0.0 {
            ContrastRule::Autocontrast {
                ln_alpha: p[0],
                minimum_candidates: p[1] as usize,
            }
        } else {
            ContrastRule::Dola {
                ln_relative_top: p[0],
            }
        }
    }
}

/// `upper` and `lower` `(rows, vocab)` float32, `rules` `(rows, 3)` float32 (each row's
/// [`ContrastRule::params`]: [`contrast_rules`]): `(rows)` u32, each row's contrast choice
/// ([`contrast_choice`]).
pub fn contrast_rows(upper: &Tensor, lower: &Tensor, rules: &Tensor) -> Result<Tensor> {
    let (rows, vocab) = upper.dims2()?;
    if upper.dtype() != DType::F32
        || lower.dtype() != DType::F32
        || rules.dtype() != DType::F32
        || lower.dims() != [rows, vocab]
        || rules.dims() != [rows, 3]
    {
        candle_core::bail!("contrast rows: two (rows, vocab) float32 matrices and (rows, 3) rules");
    }
    upper
        .contiguous()?
        .apply_op3_no_bwd(&lower.contiguous()?, &rules.contiguous()?, &ContrastRows)
}

/// [`contrast_rows`]' rules, on `device`.
pub fn contrast_rules(rules: &[ContrastRule], device: &Device) -> Result<Tensor> {
    let flat: Vec<f32> = rules.iter().flat_map(|r| r.params()).collect();
    Tensor::new(flat, device)?.reshape((rules.len(), 3))
}

/// The contrast's greedy choice in one pair of rows: the first position of the largest
/// `(u - lse_u) - (l - lse_l)` inside the plausible set ([`ContrastTerms`]; 0 when none is a
/// number), each term as [`contrast_log_q`] computes it, whose argmax it is.
pub fn contrast_choice(
    upper: &[f32],
    lower: &[f32],
    ln_alpha: f32,
    minimum_candidates: usize,
) -> u32 {
    let terms = ContrastTerms::new(upper, lower, ln_alpha, minimum_candidates);
    // the vectorised maximum, then its first position
    let best = terms.set.max_diff(&terms.lp_upper, lower);
    (0..upper.len())
        .position(|i| terms.difference(i) == Some(best))
        .unwrap_or(0) as u32
}

/// Autocontrastive decoding's next-token log-distribution (Gera et al.): inside the upper
/// head's plausible set ([`ContrastTerms`]) the renormalised softmax of
/// log p_u - log p_l, scaled to the set's upper mass; outside it log p_u.
pub fn contrast_log_q(
    upper: &[f32],
    lower: &[f32],
    ln_alpha: f32,
    minimum_candidates: usize,
) -> Vec<f32> {
    let ContrastTerms {
        mut lp_upper,
        set,
        max_lp,
        ..
    } = ContrastTerms::new(upper, lower, ln_alpha, minimum_candidates);
    // Three vectorised passes over the vocabulary, the set as a mask: the largest
    // log p_u - log p_l in the set, then both normalisers, then q in place.
    let diff_max = set.max_diff(&lp_upper, lower);
    let (diff_sum, mass_sum) = set.sums(&lp_upper, lower, diff_max, max_lp);
    let offset = diff_max + diff_sum.ln();
    let log_mass = max_lp + mass_sum.ln();
    set.write_q(&mut lp_upper, lower, offset, log_mass);
    lp_upper
}

/// DoLa's next-token logits from its mature head's row and its chosen premature layer's
/// (transformers' `_dola_select_contrast` and `_relative_top_filter`): log p_mature -
/// log p_premature where the mature head finds the token plausible (log p_mature >=
/// ln(relative_top) + max log p_mature: autocontrast's set with a floor of one), -inf
/// elsewhere. Unnormalised, as transformers' logits processors see them.
pub fn dola_scores(mature: &[f32], premature: &[f32], ln_relative_top: f32) -> Vec<f32> {
    let terms = ContrastTerms::new(mature, premature, ln_relative_top, 1);
    (0..mature.len())
        .map(|i| {
            let m = terms.lp_upper[i];
            // NaN stays NaN (a NaN is never below the threshold)
            if m < terms.set.threshold {
                f32::NEG_INFINITY
            } else {
                m - (premature[i] - terms.set.lse_lower)
            }
        })
        .collect()
}

/// A contrast's terms in one pair of rows: log p_u, and the plausible set, the tokens with
/// log p_u at least min(ln(alpha) + max log p_u, the k-th largest log p_u) for a candidate
/// floor of k.
struct ContrastTerms<'a> {
    lp_upper: Vec<f32>,
    lower: &'a [f32],
    set: fastmath::PlausibleSet,
    /// The largest log p_u.
    max_lp: f32,
}

impl<'a> ContrastTerms<'a> {
    fn new(upper: &[f32], lower: &'a [f32], ln_alpha: f32, minimum_candidates: usize) -> Self {
        let (max_u, lse_u) = fastmath::log_sum_exp(upper);
        let (_, lse_l) = fastmath::log_sum_exp(lower);
        let lp_upper = fastmath::sub(upper, lse_u);
        // Compared in log space: p_u >= t  <=>  log p_u >= log t (exp is monotonic). Rounding
        // keeps the order of x - lse, so the largest log p_u is max_u - lse_u, to the bit.
        let max_lp = max_u - lse_u;
        let k = minimum_candidates.clamp(1, lp_upper.len().max(1));
        // NaN is no candidate: the floor counts numbers, and where fewer than k are, all of
        // them are plausible
        let kth_lp = if k == 1 {
            max_lp
        } else {
            let mut numbers: Vec<f32> = lp_upper.iter().copied().filter(|x| !x.is_nan()).collect();
            if numbers.len() < k {
                f32::NEG_INFINITY
            } else {
                *numbers
                    .select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a))
                    .1
            }
        };
        Self {
            lp_upper,
            lower,
            set: fastmath::PlausibleSet {
                threshold: (ln_alpha + max_lp).min(kth_lp),
                lse_lower: lse_l,
            },
            max_lp,
        }
    }

    /// Token `i`'s `log p_u - log p_l`, None outside the plausible set.
    fn difference(&self, i: usize) -> Option<f32> {
        let u = self.lp_upper[i];
        (u >= self.set.threshold).then(|| u - (self.lower[i] - self.set.lse_lower))
    }
}

/// How far the device's choices fall short of the CPU's on rows of `vocab` logits, under the
/// CPU's own scores (0 where they choose the same; infinite for a contrast choice outside
/// the plausible set), and how far its margins and divergences are from the CPU's: what a
/// start-up check holds the kernels of `device` to. Zero on the CPU, whose kernels are these
/// functions.
pub fn check(device: &Device, vocab: usize) -> Result<f32> {
    const ROWS: usize = 6;
    let mut rand = super::uniform(0x9E37_79B9_7F4A_7C15u64);
    // Spread as trained heads' logits (a few tokens well ahead, a long flat tail), rows
    // whose plausible sets hold one token, some, most (alpha 0: all).
    let mut row = |spread: f32| -> Vec<f32> {
        (0..vocab)
            .map(|_| {
                let v = rand();
                spread * v * v * v
            })
            .collect()
    };
    let upper: Vec<Vec<f32>> = (0..ROWS).map(|r| row(4.0 + 4.0 * r as f32)).collect();
    let lower: Vec<Vec<f32>> = (0..ROWS).map(|r| row(6.0 + 2.0 * r as f32)).collect();
    // (ln alpha, candidate floor): floors of one and wider ones
    let auto = |alpha: f32, k| ContrastRule::Autocontrast {
        ln_alpha: alpha.ln(),
        minimum_candidates: k,
    };
    let rules = [
        auto(0.1, 1),
        ContrastRule::Dola {
            ln_relative_top: 0.5f32.ln(),
        },
        auto(0.01, 40),
        auto(0.0, 1),
        auto(0.1, 3),
        auto(1.0, 7),
    ];
    let put = |rows: &[Vec<f32>]| Tensor::new(rows.concat(), device)?.reshape((ROWS, vocab));
    let (upper_t, lower_t) = (put(&upper)?, put(&lower)?);
    let argmaxes = argmax_rows(&upper_t)?.to_vec1::<u32>()?;
    let margins = margin_rows(&upper_t)?.to_vec1::<f32>()?;
    let divergences = divergence_rows(&upper_t, &lower_t)?.to_vec1::<f64>()?;
    let contrasts =
        contrast_rows(&upper_t, &lower_t, &contrast_rules(&rules, device)?)?.to_vec1::<u32>()?;
    let mut worst = 0f32;
    for r in 0..ROWS {
        let (u, l) = (&upper[r], &lower[r]);
        let shortfall = u[argmax(u) as usize] - u[argmaxes[r] as usize];
        // DoLa's set: a floor of one
        let [ln_alpha, k, _] = rules[r].params();
        let k = k as usize;
        let terms = ContrastTerms::new(u, l, ln_alpha, k);
        let score = |i: u32| terms.difference(i as usize).unwrap_or(f32::NEG_INFINITY);
        let contrast = score(contrast_choice(u, l, ln_alpha, k)) - score(contrasts[r]);
        let margin = (softmax_margin(u) - margins[r]).abs();
        // relative: the divergence's size grows with the vocabulary's spread
        let want = dola_divergence(u, l);
        let divergence = ((want - divergences[r]).abs() / want.abs().max(1.0)) as f32;
        worst = worst
            .max(shortfall)
            .max(contrast)
            .max(margin)
            .max(divergence);
    }
    Ok(worst)
}

/// Each row of a float32 matrix reduced to one value where the matrix is.
#[derive(Clone, Copy)]
enum PerRow {
    /// [`argmax`], u32.
    Argmax,
    /// [`softmax_margin`], float32.
    Margin,
}

impl PerRow {
    fn apply(self, logits: &Tensor) -> Result<Tensor> {
        if logits.dtype() != DType::F32 || logits.rank() != 2 {
            candle_core::bail!("{}: a (rows, vocab) float32 matrix", self.name());
        }
        logits.contiguous()?.apply_op1_no_bwd(&self)
    }
}

impl CustomOp1 for PerRow {
    fn name(&self) -> &'static str {
        match self {
            PerRow::Argmax => "argmax rows",
            PerRow::Margin => "margin rows",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        #[cfg(feature = "cuda-emulator")]
        if let Some(out) = super::cuda_emulator::instead(self, &[(s, l)])? {
            return Ok(out);
        }
        let (rows, vocab) = l.shape().dims2()?;
        let chunks = contiguous::<f32>(s, l)?.par_chunks(vocab.max(1));
        let out = match (self, vocab) {
            (PerRow::Argmax, 0) => CpuStorage::U32(vec![0; rows]),
            (PerRow::Argmax, _) => CpuStorage::U32(chunks.map(argmax).collect()),
            (PerRow::Margin, 0) => CpuStorage::F32(vec![f32::NAN; rows]),
            (PerRow::Margin, _) => CpuStorage::F32(chunks.map(softmax_margin).collect()),
        };
        Ok((out, Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        launch_op(self, &[(s, l)])
    }
}

#[cfg(any(feature = "cuda-emulator", feature = "cuda"))]
impl ChoiceKernel for PerRow {
    fn kernel(&self) -> &'static str {
        match self {
            PerRow::Argmax => "argmax_rows",
            PerRow::Margin => "margin_rows",
        }
    }

    fn output(&self) -> (DType, Option<usize>) {
        match self {
            PerRow::Argmax => (DType::U32, None),
            PerRow::Margin => (DType::F32, None),
        }
    }
}

struct DivergenceRows;

impl CustomOp2 for DivergenceRows {
    fn name(&self) -> &'static str {
        "divergence rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        #[cfg(feature = "cuda-emulator")]
        if let Some(out) = super::cuda_emulator::instead(self, &[(s1, l1), (s2, l2)])? {
            return Ok(out);
        }
        let (rows, vocab) = l1.shape().dims2()?;
        let (mature, premature) = (contiguous::<f32>(s1, l1)?, contiguous::<f32>(s2, l2)?);
        let out: Vec<f64> = if vocab == 0 {
            vec![0.0; rows]
        } else {
            (mature.par_chunks(vocab), premature.par_chunks(vocab))
                .into_par_iter()
                .map(|(m, p)| dola_divergence(m, p))
                .collect()
        };
        Ok((CpuStorage::F64(out), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        launch_op(self, &[(s1, l1), (s2, l2)])
    }
}

#[cfg(any(feature = "cuda-emulator", feature = "cuda"))]
impl ChoiceKernel for DivergenceRows {
    fn kernel(&self) -> &'static str {
        "divergence_rows"
    }

    fn output(&self) -> (DType, Option<usize>) {
        (DType::F64, None)
    }
}

/// An operand's elements (of the choice kernels here and in `sample.rs`), which its layout
/// must hold contiguously.
pub(super) fn contiguous<'s, T: candle_core::WithDType>(
    s: &'s CpuStorage,
    l: &Layout,
) -> Result<&'s [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("choice kernels: contiguous operands");
    };
    Ok(&s.as_slice::<T>()?[a..b])
}

struct ContrastRows;

impl CustomOp3 for ContrastRows {
    fn name(&self) -> &'static str {
        "contrast-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        #[cfg(feature = "cuda-emulator")]
        if let Some(out) = super::cuda_emulator::instead(self, &[(s1, l1), (s2, l2), (s3, l3)])? {
            return Ok(out);
        }
        let (rows, vocab) = l1.shape().dims2()?;
        let (upper, lower, rules) = (
            contiguous::<f32>(s1, l1)?,
            contiguous::<f32>(s2, l2)?,
            contiguous::<f32>(s3, l3)?,
        );
        let out: Vec<u32> = if vocab == 0 {
            vec![0; rows]
        } else {
            (
                upper.par_chunks(vocab),
                lower.par_chunks(vocab),
                rules.par_chunks(3),
            )
                .into_par_iter()
                .map(|(u, l, r)| contrast_choice(u, l, r[0], r[1] as usize))
                .collect()
        };
        Ok((CpuStorage::U32(out), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        launch_op(self, &[(s1, l1), (s2, l2), (s3, l3)])
    }
}

#[cfg(any(feature = "cuda-emulator", feature = "cuda"))]
impl ChoiceKernel for ContrastRows {
    fn kernel(&self) -> &'static str {
        "contrast_rows"
    }

    fn output(&self) -> (DType, Option<usize>) {
        (DType::U32, None)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn each_row_chooses_its_first_maximum_and_nan_never_wins() -> Result<()> {
        let nan = f32::NAN;
        let rows = [
            [0.5, 2.0, -1.0, 2.0],  // a tie: the first
            [nan, -3.0, nan, -2.0], // NaN never wins
            [nan, nan, nan, nan],   // nothing is a number: 0
            [-1.0, -1.0, -0.5, f32::NEG_INFINITY],
        ];
        let t = Tensor::new(&rows, &Device::Cpu)?;
        assert_eq!(argmax_rows(&t)?.to_vec1::<u32>()?, [1, 3, 0, 2]);
        for row in &rows {
            assert_eq!(
                argmax(row),
                argmax_rows(&Tensor::new(&[*row], &Device::Cpu)?)?.to_vec1::<u32>()?[0]
            );
        }
        // a view of every other row
        let wide = Tensor::arange(0f32, 4096., &Device::Cpu)?
            .sin()?
            .reshape((4, 1024))?;
        let picked = argmax_rows(&wide.narrow(0, 1, 2)?)?.to_vec1::<u32>()?;
        let want: Vec<u32> = wide.to_vec2::<f32>()?[1..3]
            .iter()
            .map(|r| argmax(r))
            .collect();
        assert_eq!(picked, want);
        Ok(())
    }

    #[test]
    fn margins_are_top_one_minus_top_two_probability() -> Result<()> {
        let rows = [
            [2.0f32, 0.0, 0.0, 0.0],
            [1.0, 3.0, 3.0, 0.0], // a tie at the top: 0
            [0.0, 0.0, 0.0, 0.0],
            [50.0, -50.0, 0.0, 1.0],
        ];
        let t = Tensor::new(&rows, &Device::Cpu)?;
        let got = margin_rows(&t)?.to_vec1::<f32>()?;
        let e2 = 2f32.exp();
        let want = [(e2 - 1.0) / (e2 + 3.0), 0.0, 0.0, 1.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        // a view of every other row
        let wide = Tensor::arange(0f32, 4096., &Device::Cpu)?
            .sin()?
            .reshape((4, 1024))?;
        let picked = margin_rows(&wide.narrow(0, 1, 2)?)?.to_vec1::<f32>()?;
        let want: Vec<f32> = wide.to_vec2::<f32>()?[1..3]
            .iter()
            .map(|r| softmax_margin(r))
            .collect();
        assert_eq!(picked, want);
        assert!(margin_rows(&wide.to_dtype(DType::BF16)?).is_err());
        Ok(())
    }

    #[test]
    fn divergences_are_transformers_dola_divergence_of_the_softmaxes() -> Result<()> {
        let mut rand = crate::kernels::uniform(0x5DEE_CE66_D1CE_4E5Bu64);
        let (rows, vocab) = (4, 777);
        let mut row = |spread: f32| (0..vocab).map(|_| rand() * spread).collect::<Vec<_>>();
        let mature: Vec<Vec<f32>> = (0..rows).map(|r| row(1.0 + 4.0 * r as f32)).collect();
        let mut premature: Vec<Vec<f32>> = (0..rows).map(|_| row(6.0)).collect();
        premature[0] = mature[0].clone(); // the same distribution: 0
        let put = |m: &[Vec<f32>]| Tensor::new(m.concat(), &Device::Cpu)?.reshape((rows, vocab));
        let got = divergence_rows(&put(&mature)?, &put(&premature)?)?.to_vec1::<f64>()?;
        let softmax = |x: &[f32]| {
            let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
            x.iter()
                .map(|&v| (v as f64 - m).exp() / z)
                .collect::<Vec<f64>>()
        };
        for r in 0..rows {
            let (p, q) = (softmax(&mature[r]), softmax(&premature[r]));
            // KL(M || P) + KL(M || Q), M their average
            let want: f64 = p
                .iter()
                .zip(&q)
                .map(|(&a, &b)| {
                    let m = 0.5 * (a + b);
                    m * ((m / a).ln() + (m / b).ln())
                })
                .sum();
            assert!(
                (got[r] - want).abs() < 1e-6,
                "row {r}: {} vs {want}",
                got[r]
            );
            assert_eq!(got[r], dola_divergence(&mature[r], &premature[r]));
        }
        assert!(
            got[0].abs() < 1e-6 && got[1..].iter().all(|&d| d > 1e-3),
            "{got:?}"
        );
        let m = put(&mature)?;
        assert!(divergence_rows(&m, &m.narrow(0, 0, 2)?).is_err());
        Ok(())
    }

    /// The contrast as its definition states it, in float64: the first best of
    /// log p_u - log p_l over the plausible set.
    fn contrast_plain(upper: &[f32], lower: &[f32], alpha: f64, k: usize) -> u32 {
        let lsm = |x: &[f32]| {
            let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            x.iter().map(|&v| v as f64 - lse).collect::<Vec<f64>>()
        };
        let (lp_u, lp_l) = (lsm(upper), lsm(lower));
        let mut sorted = lp_u.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        // the floor: the k most likely are always plausible
        let t = (alpha.ln() + sorted[0]).min(sorted[k - 1]);
        let mut best = (f64::NEG_INFINITY, 0);
        for i in 0..upper.len() {
            let d = lp_u[i] - lp_l[i];
            if lp_u[i] >= t - 1e-12 && d > best.0 {
                best = (d, i as u32);
            }
        }
        best.1
    }

    #[test]
    fn contrast_choices_are_the_best_difference_inside_the_plausible_set() -> Result<()> {
        // token 0 leads the upper head; token 2 is plausible and the lower head finds it
        // least likely; token 3 the lower head finds least likely of all, but it is not
        // plausible (below alpha times the top probability).
        let upper = [3.0f32, 1.0, 2.0, -2.0];
        let lower = [3.0f32, 1.0, -4.0, -9.0];
        assert_eq!(contrast_choice(&upper, &lower, 0.1f32.ln(), 1), 2);
        // alpha 0: every token plausible; alpha 1: only the top.
        assert_eq!(contrast_choice(&upper, &lower, f32::NEG_INFINITY, 1), 3);
        assert_eq!(contrast_choice(&upper, &lower, 0.0, 1), 0);
        // the same difference twice: the first
        assert_eq!(contrast_choice(&[1.0, 1.0], &[0.0, 0.0], 0.5f32.ln(), 1), 0);
        // nothing a number: 0
        assert_eq!(
            contrast_choice(&[f32::NAN; 2], &[f32::NAN; 2], 0.1f32.ln(), 1),
            0
        );

        let mut rand = crate::kernels::uniform(0x2545_F491_4F6C_DD1Du64);
        let (rows, vocab) = (5, 3001);
        let alphas = [0.1f32, 0.5, 0.01, 0.0, 1.0];
        let floors = [1, 4, 1, 1, 10];
        let mut row = |spread: f32| (0..vocab).map(|_| rand() * spread).collect::<Vec<_>>();
        let upper: Vec<Vec<f32>> = (0..rows).map(|r| row(2.0 + 3.0 * r as f32)).collect();
        let lower: Vec<Vec<f32>> = (0..rows).map(|_| row(5.0)).collect();
        let ln_alpha: Vec<f32> = alphas.iter().map(|a| a.ln()).collect();
        // a view: every row of a wider matrix but its first
        let put = |m: &[Vec<f32>]| -> Result<Tensor> {
            let padded = [vec![vec![0.5; vocab]], m.to_vec()].concat();
            Tensor::new(padded.concat(), &Device::Cpu)?
                .reshape((rows + 1, vocab))?
                .narrow(0, 1, rows)
        };
        let rules: Vec<ContrastRule> = ln_alpha
            .iter()
            .zip(floors)
            .map(
                |(&ln_alpha, minimum_candidates)| ContrastRule::Autocontrast {
                    ln_alpha,
                    minimum_candidates,
                },
            )
            .collect();
        let got = contrast_rows(
            &put(&upper)?,
            &put(&lower)?,
            &contrast_rules(&rules, &Device::Cpu)?,
        )?
        .to_vec1::<u32>()?;
        for r in 0..rows {
            let want = contrast_plain(&upper[r], &lower[r], alphas[r] as f64, floors[r]);
            assert_eq!(
                got[r], want,
                "row {r} alpha {} floor {}",
                alphas[r], floors[r]
            );
            let (u, l) = (&upper[r], &lower[r]);
            assert_eq!(got[r], contrast_choice(u, l, ln_alpha[r], floors[r]));
            // the argmax of the contrast's scores
            assert_eq!(
                got[r],
                argmax(&contrast_log_q(u, l, ln_alpha[r], floors[r]))
            );
        }
        // alpha 1 and a floor of 10: the best difference among the 10 most likely
        assert_ne!(got[4], argmax(&upper[4]), "the floor widened the set");
        // misshapen operands are refused
        let m = put(&upper)?;
        let one = contrast_rules(
            &[ContrastRule::Dola {
                ln_relative_top: 0.0,
            }],
            &Device::Cpu,
        )?;
        assert!(contrast_rows(&m, &m.narrow(0, 0, 2)?, &one).is_err());
        assert!(contrast_rows(&m, &m, &one).is_err());
        // the start-up check on the CPU: its kernels are these functions
        assert_eq!(check(&Device::Cpu, 1000)?, 0.0);
        Ok(())
    }

    /// DoLa's logits as transformers' `_relative_top_filter` and `_dola_select_contrast`
    /// state them (float32, step by step); its greedy choice is the contrast kernel's with
    /// its rule, and its rule survives the kernels' form.
    #[test]
    fn dola_scores_are_the_relative_top_filtered_difference() -> Result<()> {
        let mut rand = crate::kernels::uniform(0x9FB2_1C65_1E98_DF25u64);
        let vocab = 2001;
        let mut row = |spread: f32| (0..vocab).map(|_| rand() * spread).collect::<Vec<_>>();
        for (spread, relative_top) in [(3.0f32, 0.1f32), (12.0, 0.1), (20.0, 0.5), (8.0, 1.0)] {
            let (mature, premature) = (row(spread), row(6.0));
            let (lp_m, lp_p) = (
                fastmath::log_softmax(&mature),
                fastmath::log_softmax(&premature),
            );
            let max = lp_m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let threshold = max + relative_top.ln();
            let want: Vec<f32> = lp_m
                .iter()
                .zip(&lp_p)
                .map(|(&m, &p)| {
                    if m < threshold {
                        f32::NEG_INFINITY
                    } else {
                        m - p
                    }
                })
                .collect();
            let rule = ContrastRule::Dola {
                ln_relative_top: relative_top.ln(),
            };
            assert_eq!(dola_scores(&mature, &premature, relative_top.ln()), want);
            assert_eq!(rule.scores(&mature, &premature), want);
            assert_eq!(
                rule.log_distribution(&mature, &premature),
                fastmath::log_softmax(&want)
            );
            assert_eq!(ContrastRule::from_params(&rule.params()), rule);
            let put = |r: &[f32]| Tensor::new(r, &Device::Cpu)?.reshape((1, vocab));
            let got = contrast_rows(
                &put(&mature)?,
                &put(&premature)?,
                &contrast_rules(&[rule], &Device::Cpu)?,
            )?
            .to_vec1::<u32>()?;
            assert_eq!(got[0], argmax(&want), "relative_top {relative_top}");
        }
        let auto = ContrastRule::Autocontrast {
            ln_alpha: 0.2f32.ln(),
            minimum_candidates: 7,
        };
        assert_eq!(ContrastRule::from_params(&auto.params()), auto);
        Ok(())
    }
}
