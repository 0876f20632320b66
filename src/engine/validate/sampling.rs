//! The sampling fields: temperature, nucleus and top-k truncation, penalties, `logit_bias`,
//! and the number of candidates (`n`, `best_of`).

use super::{count_in, ValidationError, Validator};
use crate::engine::request::{GenerateRequest, SamplingParams};

/// `v` (else `default`) in `[lo, hi]`, or `(lo, hi]` with `lo_open`.
pub(super) fn in_range(
    param: &str,
    v: Option<f64>,
    default: f64,
    (lo, hi): (f64, f64),
    lo_open: bool,
) -> Result<f32, ValidationError> {
    let v = v.unwrap_or(default);
    let ok = v.is_finite() && (if lo_open { v > lo } else { v >= lo }) && v <= hi;
    if !ok {
        return Err(ValidationError::OutOfRange {
            param: param.into(),
            lo,
            hi,
            lo_open,
            got: v,
        });
    }
    Ok(v as f32)
}

impl Validator {
    /// Every sampling field but `logit_bias` (checked last, with [`Validator::logit_bias`]).
    pub(super) fn sampling(
        &self,
        req: &GenerateRequest,
    ) -> Result<SamplingParams, ValidationError> {
        let penalty = |param, v| in_range(param, v, 0.0, (-2.0, 2.0), false);
        let temperature = in_range("temperature", req.temperature, 1.0, (0.0, 2.0), false)?;
        let top_p = in_range("top_p", req.top_p, 1.0, (0.0, 1.0), true)?;
        let presence_penalty = penalty("presence_penalty", req.presence_penalty)?;
        let frequency_penalty = penalty("frequency_penalty", req.frequency_penalty)?;
        let repetition_penalty = in_range(
            "repetition_penalty",
            req.repetition_penalty,
            1.0,
            (0.0, 10.0),
            true,
        )?;
        let top_k = match req.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => return Err(ValidationError::TopK(k)),
        };
        Ok(SamplingParams {
            temperature,
            top_p,
            top_k,
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
            logit_bias: Vec::new(),
            seed: req.seed.map(|s| s as u64),
        })
    }

    /// `(n, best_of)`: `best_of` defaults to `n`, lies in `[n, --max-best-of]`, and is 1 for
    /// a stream.
    pub(super) fn copies(&self, req: &GenerateRequest) -> Result<(usize, usize), ValidationError> {
        let max = self.limits.max_best_of as i64;
        let n = count_in("n", req.n.unwrap_or(1), 1, max)?;
        let best_of = req.best_of.unwrap_or(n);
        if best_of < n || best_of > max {
            return Err(ValidationError::BestOf {
                n,
                max,
                got: best_of,
            });
        }
        if req.stream && req.best_of.is_some_and(|b| b > 1) {
            return Err(ValidationError::BestOfWithStream);
        }
        Ok((n as usize, best_of as usize))
    }

    /// `logit_bias`: at most `--max-logit-bias` entries, keys token ids, values in [-100, 100].
    pub(super) fn logit_bias(
        &self,
        entries: &[(String, f64)],
    ) -> Result<Vec<(u32, f32)>, ValidationError> {
        let l = &*self.limits;
        if entries.len() > l.max_logit_bias {
            return Err(ValidationError::TooManyLogitBiases {
                max: l.max_logit_bias,
                got: entries.len(),
            });
        }
        entries
            .iter()
            .map(|(key, bias)| {
                let id: u32 = key
                    .parse()
                    .ok()
                    .filter(|&id: &u32| (id as usize) < l.vocab_size)
                    .ok_or_else(|| ValidationError::LogitBiasKey {
                        vocab: l.vocab_size,
                        key: key.clone(),
                    })?;
                if !(bias.is_finite() && (-100.0..=100.0).contains(bias)) {
                    return Err(ValidationError::LogitBiasValue {
                        key: key.clone(),
                        bias: *bias,
                    });
                }
                Ok((id, *bias as f32))
            })
            .collect()
    }
}
