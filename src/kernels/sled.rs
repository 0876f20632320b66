//! SLED's scores (self logits evolution decoding, Zhang et al., NeurIPS 2024; the strategy is
//! `model::mode::sled`), here as arithmetic on rows, computed where the logits are: per row
//! the candidates (the mature head's `evolution_scale` most probable tokens) and their evolved
//! logits, every other token getting the lower bound. On a GPU one launch over a step's SLED
//! rows, so that a SLED sequence costs the host 2·k floats instead of a vocabulary row per
//! premature layer (GPT-2 medium over its 11 exits below the top: 12 rows of 50,257 floats, 2.4
//! MB, a step) and the host its softmax and three float64 passes per layer.
//!
//! `choices.cu`'s `sled_rows` computes it on a GPU; [`sled_candidates`] is the host's SLED
//! (what `model::mode::sled` scores with), the CPU's kernel and the oracle that [`check`] holds
//! the GPU's to at start-up.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda_source::launch_op;
#[cfg(any(feature = "cuda-emulator", feature = "cuda"))]
use super::cuda_source::ChoiceKernel;
use super::fastmath;
use super::greedy::contiguous;

/// The most candidates a step computes SLED's scores for (the kernel's shared memory holds a
/// value per layer and candidate); a request asking for more is scored on the host.
pub const MAX_CANDIDATES: usize = 32;
/// The most premature layers, likewise.
pub const MAX_LAYERS: usize = 64;

/// SLED's parameters, as its scores read them (`model::mode::sled::SledParams`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SledRule {
    /// How many of the mature head's most probable tokens are candidates.
    pub evolution_scale: usize,
    /// The step size toward the latent distribution.
    pub evolution_rate: f32,
    /// The logit every other token gets.
    pub lower_bound: f32,
    /// The weight of a candidate's entropy across the premature layers.
    pub alpha: f32,
}

impl SledRule {
    /// Whether a step can compute it where the logits are, over `layers` premature layers.
    pub fn fits(&self, layers: usize) -> bool {
        (1..=MAX_CANDIDATES).contains(&self.evolution_scale) && (1..=MAX_LAYERS).contains(&layers)
    }

    /// The full row of scores from its candidates' (`vocab` tokens).
    pub fn scores(&self, candidates: &[(u32, f32)], vocab: usize) -> Vec<f32> {
        let mut out = vec![self.lower_bound; vocab];
        for &(id, value) in candidates {
            out[id as usize] = value;
        }
        out
    }
}

/// SLED's next-token logits from the mature head's logits and each premature layer's (the
/// authors' `_sled_select_contrast`, batch size 1): every token the lower bound but the
/// candidates ([`sled_candidates`]).
pub fn sled_scores(mature: &[f32], premature: &[&[f32]], rule: &SledRule) -> Vec<f32> {
    rule.scores(&sled_candidates(mature, premature, rule), mature.len())
}

/// SLED's candidates, the mature head's `evolution_scale` most probable tokens (most probable
/// first, ties to the lower id, as torch.topk), and their evolved logits.
///
/// For each premature layer, the cosine between the divergence of its logits from the mature
/// ones and each candidate's "gradient" (its softmax minus the candidate's one-hot) says how
/// strongly that layer points at the candidate; the squared positive cosines, normalised per
/// layer and weighted by each layer's share, make a latent distribution `δ`. The mature logits
/// move one step against the gradient of the KL toward it, `f - rate · (softmax(f) - δ)`, then
/// each candidate loses `alpha` times the entropy of its logits across the premature layers.
pub fn sled_candidates(mature: &[f32], premature: &[&[f32]], rule: &SledRule) -> Vec<(u32, f32)> {
    let vocab = mature.len();
    let k = rule.evolution_scale.clamp(1, vocab.max(1));
    let p_mature = softmax(mature);
    // the candidates: the mature head's top k, most probable first (torch.topk)
    let mut top: Vec<usize> = (0..vocab).collect();
    let by_prob = |a: &usize, b: &usize| p_mature[*b].total_cmp(&p_mature[*a]).then(a.cmp(b));
    if k < vocab {
        top.select_nth_unstable_by(k - 1, by_prob);
        top.truncate(k);
    }
    top.sort_by(by_prob);

    // per layer: the squared positive cosines (weights over the candidates) and their sum
    // (the layer's share)
    let mut shares = Vec::with_capacity(premature.len());
    let mut per_layer = Vec::with_capacity(premature.len());
    for logits in premature {
        let p_layer = softmax(logits);
        // divergence d = logits - mature; gradient g_j = p_layer - onehot(top_j):
        // g·d = p·d - d_j, |g|² = |p|² - 2 p_j + 1
        let (mut pd, mut pp, mut dd) = (0.0f64, 0.0f64, 0.0f64);
        for ((&l, &m), &q) in logits.iter().zip(mature).zip(&p_layer) {
            let (d, q) = (l as f64 - m as f64, q as f64);
            pd += q * d;
            pp += q * q;
            dd += d * d;
        }
        let cos2: Vec<f64> = top
            .iter()
            .map(|&j| {
                let d_j = logits[j] as f64 - mature[j] as f64;
                let q_j = p_layer[j] as f64;
                let g_norm = (pp - 2.0 * q_j + 1.0).max(0.0).sqrt();
                // torch's cosine_similarity: x·y / max(|x| |y|, 1e-8)
                let cos = (pd - d_j) / (g_norm * dd.sqrt()).max(1e-8);
                let c = cos.max(0.0);
                c * c
            })
            .collect();
        shares.push(cos2.iter().sum::<f64>());
        per_layer.push(cos2);
    }
    // δ: each layer's weights normalised, weighted by its share of the total
    let total: f64 = shares.iter().sum();
    let mut weights = vec![0.0f64; k];
    for (&sum, cos2) in shares.iter().zip(&per_layer) {
        let share = if total != 0.0 { sum / total } else { sum };
        for (acc, &c) in weights.iter_mut().zip(cos2) {
            *acc += share * if sum != 0.0 { c / sum } else { c };
        }
    }

    let rate = rule.evolution_rate as f64;
    top.iter()
        .zip(&weights)
        .map(|(&j, &w)| {
            // one step: f - rate · (softmax(f) + proxy), the proxy gradient being -δ
            let evolved = mature[j] as f64 - rate * (p_mature[j] as f64 - w);
            let entropy = layer_entropy(premature.iter().map(|l| l[j]));
            (j as u32, (evolved - rule.alpha as f64 * entropy) as f32)
        })
        .collect()
}

/// The entropy of the softmax across layers of one token's logits, as torch's `Categorical`
/// computes it (probabilities clamped to [eps, 1 - eps] inside the log).
fn layer_entropy(logits: impl Iterator<Item = f32> + Clone) -> f64 {
    let max = logits.clone().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.clone().map(|x| (x as f64 - max).exp()).sum();
    let eps = f32::EPSILON as f64;
    -logits
        .map(|x| {
            let p = (x as f64 - max).exp() / z;
            p * p.clamp(eps, 1.0 - eps).ln()
        })
        .sum::<f64>()
}

/// The softmax as the host computes it: e^(x - log-sum-exp), in float32.
fn softmax(xs: &[f32]) -> Vec<f32> {
    let (_, lse) = fastmath::log_sum_exp(xs);
    xs.iter().map(|&x| (x - lse).exp()).collect()
}

/// `mature` `(rows, vocab)` and `premature` `(n, vocab)` float32, and each row's
/// [`SledParams`] (its rule, and where its premature layers' rows lie in `premature`):
/// `(rows, 2 width)` float32, each row's candidates' ids (as floats, exact below 2^24; -1 past
/// its `evolution_scale`), then their evolved logits (NaN past it), `width` the largest
/// `evolution_scale`. [`read_rows`] reads it back.
pub fn sled_rows(mature: &Tensor, premature: &Tensor, params: &[SledParams]) -> Result<Tensor> {
    let (rows, vocab) = mature.dims2()?;
    let (n, premature_vocab) = premature.dims2()?;
    let fits = |p: &SledParams| {
        (1..=vocab).contains(&p.rule.evolution_scale)
            && p.rule.fits(p.layers)
            && p.first + p.layers <= n
    };
    let bad = mature.dtype() != DType::F32
        || premature.dtype() != DType::F32
        || premature_vocab != vocab
        || params.len() != rows
        || vocab == 0
        || vocab >= 1 << 24
        || !params.iter().all(fits);
    if bad {
        candle_core::bail!(
            "sled rows: (rows, vocab) and (n, vocab) float32 matrices (0 < vocab < 2^24), a \
             rule per row with at most {MAX_CANDIDATES} candidates and {MAX_LAYERS} layers \
             inside them"
        );
    }
    let flat: Vec<f32> = params
        .iter()
        .flat_map(|p| {
            let r = p.rule;
            [
                r.evolution_scale as f32,
                r.evolution_rate,
                r.lower_bound,
                r.alpha,
                p.first as f32,
                p.layers as f32,
            ]
        })
        .collect();
    let params_t = Tensor::new(flat, mature.device())?.reshape((rows, 6))?;
    mature.contiguous()?.apply_op3_no_bwd(
        &premature.contiguous()?,
        &params_t,
        &SledRows {
            width: width(params),
        },
    )
}

/// The width of [`sled_rows`]' output for `params`: their largest `evolution_scale`.
pub fn width(params: &[SledParams]) -> usize {
    params
        .iter()
        .map(|p| p.rule.evolution_scale)
        .max()
        .unwrap_or(1)
}

/// One row's [`sled_rows`] params.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SledParams {
    pub rule: SledRule,
    /// Its first premature layer's row in `premature`; the others follow it, in order.
    pub first: usize,
    pub layers: usize,
}

/// The rows of [`sled_rows`]' output, copied to the host as `flat`: each row's candidates.
pub fn read_rows(flat: &[f32], width: usize) -> Vec<Vec<(u32, f32)>> {
    flat.chunks_exact(2 * width)
        .map(|r| {
            let (ids, values) = r.split_at(width);
            ids.iter()
                .zip(values)
                .take_while(|(&id, _)| id >= 0.0)
                .map(|(&id, &v)| (id as u32, v))
                .collect()
        })
        .collect()
}

/// How far the device's [`sled_rows`] are from the CPU's on made-up rows of `vocab` logits
/// (spread as trained heads' are; candidate counts of one, the default five and the most; two
/// to twelve layers; with and without the entropy term): where the candidates are the same
/// ids, the largest difference of their values; infinite where they are not. What a start-up
/// check holds the kernel of `device` to; zero on the CPU, whose kernel is
/// [`sled_candidates`].
pub fn check(device: &Device, vocab: usize) -> Result<f32> {
    let mut rand = super::uniform(0x5851_F42D_4C95_7F2Du64);
    let mut row = |spread: f32| -> Vec<f32> {
        (0..vocab)
            .map(|_| {
                let v = rand();
                spread * v * v * v
            })
            .collect()
    };
    let rule = |evolution_scale: usize, alpha: f32| SledRule {
        evolution_scale: evolution_scale.min(vocab),
        evolution_rate: 0.3,
        lower_bound: -10.0,
        alpha,
    };
    // (rule, layers)
    let rows = [
        (rule(5, 0.5), 4),
        (rule(1, 0.5), 2),
        (rule(MAX_CANDIDATES, 0.0), 12),
        (rule(5, 2.0), 3),
    ];
    let mature: Vec<Vec<f32>> = (0..rows.len()).map(|r| row(6.0 + 3.0 * r as f32)).collect();
    let mut premature: Vec<Vec<f32>> = Vec::new();
    let mut params = Vec::new();
    for &(rule, layers) in &rows {
        params.push(SledParams {
            rule,
            first: premature.len(),
            layers,
        });
        premature.extend((0..layers).map(|l| row(4.0 + l as f32)));
    }
    let put = |m: &[Vec<f32>]| Tensor::new(m.concat(), device)?.reshape((m.len(), vocab));
    let got = sled_rows(&put(&mature)?, &put(&premature)?, &params)?;
    let got = read_rows(&got.flatten_all()?.to_vec1::<f32>()?, width(&params));
    let mut worst = 0f32;
    for ((m, p), got) in mature.iter().zip(&params).zip(&got) {
        let layers: Vec<&[f32]> = premature[p.first..p.first + p.layers]
            .iter()
            .map(Vec::as_slice)
            .collect();
        let want = sled_candidates(m, &layers, &p.rule);
        if want.len() != got.len() || want.iter().zip(got).any(|(w, g)| w.0 != g.0) {
            return Ok(f32::INFINITY);
        }
        for (w, g) in want.iter().zip(got) {
            worst = worst.max((w.1 - g.1).abs());
        }
    }
    Ok(worst)
}

struct SledRows {
    width: usize,
}

impl CustomOp3 for SledRows {
    fn name(&self) -> &'static str {
        "sled rows"
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
        let width = self.width;
        let (mature, premature, params) = (
            contiguous::<f32>(s1, l1)?,
            contiguous::<f32>(s2, l2)?,
            contiguous::<f32>(s3, l3)?,
        );
        let mut out = vec![0f32; rows * 2 * width];
        out.par_chunks_mut(2 * width)
            .zip(mature.par_chunks(vocab))
            .zip(params.par_chunks(6))
            .for_each(|((o, m), p)| {
                let rule = SledRule {
                    evolution_scale: p[0] as usize,
                    evolution_rate: p[1],
                    lower_bound: p[2],
                    alpha: p[3],
                };
                let (first, layers) = (p[4] as usize, p[5] as usize);
                let layers: Vec<&[f32]> = (first..first + layers)
                    .map(|l| &premature[l * vocab..(l + 1) * vocab])
                    .collect();
                let (ids, values) = o.split_at_mut(width);
                ids.fill(-1.0);
                values.fill(f32::NAN);
                for (c, (id, v)) in sled_candidates(m, &layers, &rule).into_iter().enumerate() {
                    (ids[c], values[c]) = (id as f32, v);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((rows, 2 * width))))
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
impl ChoiceKernel for SledRows {
    fn kernel(&self) -> &'static str {
        "sled_rows"
    }

    fn output(&self) -> (DType, Option<usize>) {
        (DType::F32, Some(2 * self.width))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_row_is_the_hosts_sled_over_its_own_layers() -> Result<()> {
        let dev = Device::Cpu;
        let mut rand = crate::kernels::uniform(0x1405_7B7E_F767_814Fu64);
        let vocab = 301;
        let mut row = |spread: f32| (0..vocab).map(|_| rand() * spread).collect::<Vec<f32>>();
        let rule = SledRule {
            evolution_scale: 5,
            evolution_rate: 0.3,
            lower_bound: -10.0,
            alpha: 0.5,
        };
        // three rows of 2, 1 and 3 layers, in a view of a wider premature matrix
        let mature: Vec<Vec<f32>> = (0..3).map(|r| row(3.0 + r as f32)).collect();
        let premature: Vec<Vec<f32>> = (0..7).map(|l| row(2.0 + l as f32)).collect();
        let params = [
            SledParams {
                rule,
                first: 1,
                layers: 2,
            },
            SledParams {
                rule: SledRule {
                    evolution_scale: 1,
                    ..rule
                },
                first: 3,
                layers: 1,
            },
            SledParams {
                rule: SledRule {
                    evolution_scale: 8,
                    alpha: 0.0,
                    ..rule
                },
                first: 4,
                layers: 3,
            },
        ];
        let put = |m: &[Vec<f32>]| Tensor::new(m.concat(), &dev)?.reshape((m.len(), vocab));
        let all = put(&premature)?;
        let got = sled_rows(&put(&mature)?, &all, &params)?;
        assert_eq!(width(&params), 8);
        let got = read_rows(&got.flatten_all()?.to_vec1::<f32>()?, 8);
        for (r, p) in params.iter().enumerate() {
            let layers: Vec<&[f32]> = premature[p.first..p.first + p.layers]
                .iter()
                .map(Vec::as_slice)
                .collect();
            let want = sled_candidates(&mature[r], &layers, &p.rule);
            assert_eq!(got[r], want, "row {r}");
            assert_eq!(got[r].len(), p.rule.evolution_scale);
            // the full row: the candidates' values, the lower bound elsewhere
            let full = sled_scores(&mature[r], &layers, &p.rule);
            assert_eq!(p.rule.scores(&got[r], vocab), full);
            let top = fastmath::log_softmax(&mature[r]);
            let best = crate::kernels::greedy::argmax(&top);
            assert_eq!(got[r][0].0, best, "the most probable first");
        }
        // misshapen operands and rows reaching past them are refused
        let m = put(&mature)?;
        assert!(sled_rows(&m, &all.narrow(0, 0, 6)?, &params).is_err());
        assert!(sled_rows(&m.narrow(0, 0, 2)?, &all, &params).is_err());
        let mut wide = params;
        wide[0].rule.evolution_scale = MAX_CANDIDATES + 1;
        assert!(sled_rows(&m, &all, &wide).is_err());
        assert!(sled_rows(&m.to_dtype(DType::BF16)?, &all, &params).is_err());
        // the start-up check on the CPU: its kernel is these functions
        assert_eq!(check(&dev, 500)?, 0.0);
        Ok(())
    }

    #[test]
    fn what_fits_a_step() {
        let rule = SledRule {
            evolution_scale: 5,
            evolution_rate: 0.3,
            lower_bound: -10.0,
            alpha: 0.5,
        };
        assert!(rule.fits(11) && rule.fits(MAX_LAYERS));
        assert!(!rule.fits(0) && !rule.fits(MAX_LAYERS + 1));
        let wide = SledRule {
            evolution_scale: MAX_CANDIDATES + 1,
            ..rule
        };
        assert!(!wide.fits(3));
    }
}
