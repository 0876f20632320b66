//! The CPU loops outside matmuls: vocabulary-sized ones (50k entries per token), gelu, and
//! single-query attention. They use an `exp` that the compiler vectorizes (libm's `expf` is
//! scalar): Cephes' expf, i.e. e^x = 2^n e^r with a two-part ln 2 for an exact reduction and
//! a degree-7 polynomial for e^r, relative error about 1e-7. Sums run in 16 lanes, so that
//! they vectorize (a sequential float sum cannot be reordered by the compiler).

const LOG2_E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding then subtracting 1.5 * 2^23 rounds an f32 to the nearest integer without a branch.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// e^x for x <= 0 (the only range the scoring code needs); x < -87 gives 0.
#[inline(always)]
pub fn exp_neg(x: f32) -> f32 {
    let xc = x.max(-87.0);
    let t = (xc * LOG2_E) + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    // n as an integer, read from t's mantissa (t = 1.5 * 2^23 + n): integer ops only, where
    // a float-to-int `as` cast (saturating) kept these loops from vectorising.
    let ni = t.to_bits() as i32 - ROUND_MAGIC.to_bits() as i32;
    let r = xc - n * LN2_HI - n * LN2_LO; // |r| <= ln(2)/2
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        e_r * scale
    }
}

#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    super::cpu_features::get().avx512
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    super::cpu_features::get().avx2_fma
}

/// Compiles a function three times, for AVX-512, for AVX2 (chosen at run time when the CPU
/// has them) and for the baseline target, so that its autovectorised loops use 16 or 8 lanes
/// where they can. Rust never contracts a * b + c into an FMA by itself, and the sums run in
/// explicit lanes, so the three give the same bits.
macro_rules! multiversion {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn imp($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn wide($($arg: $ty),*) -> $ret {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn mid($($arg: $ty),*) -> $ret {
                    imp($($arg),*)
                }
                if avx512() {
                    // SAFETY: the CPU has AVX-512 (checked above).
                    return unsafe { wide($($arg),*) };
                }
                if avx2() {
                    // SAFETY: the CPU has AVX2 (checked above).
                    return unsafe { mid($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

multiversion! {
    /// Σ e^(x - shift) over `xs` (shift >= max keeps every term <= 1), accumulated in lanes.
    pub fn sum_exp(xs: &[f32], shift: f32) -> f32 {
        let mut lanes = [0f32; 16];
        let chunks = xs.chunks_exact(16);
        let rest = chunks.remainder();
        for c in chunks {
            for (l, &x) in lanes.iter_mut().zip(c) {
                *l += exp_neg(x - shift);
            }
        }
        let mut total: f32 = lanes.iter().sum();
        for &x in rest {
            total += exp_neg(x - shift);
        }
        total
    }
}

/// `(max, log Σ e^x)` of `xs`: the log-softmax's normaliser, shifted by the maximum.
pub fn log_sum_exp(xs: &[f32]) -> (f32, f32) {
    let max = max(xs);
    (max, max + sum_exp(xs, max).ln())
}

/// The log-softmax of `logits`.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    sub(logits, log_sum_exp(logits).1)
}

multiversion! {
    /// The largest element (-inf for an empty slice).
    pub fn max(xs: &[f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; 16];
        let chunks = xs.chunks_exact(16);
        let rest = chunks.remainder();
        for c in chunks {
            for (l, &x) in lanes.iter_mut().zip(c) {
                *l = l.max(x);
            }
        }
        rest.iter().fold(lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max), |m, &x| m.max(x))
    }
}

multiversion! {
    /// `out[i]` = e^((scores[i] - max) / temperature), the unnormalised weight sampling gives
    /// token i (`max` the largest finite score); 0 for a non-finite score, which is never
    /// drawn.
    pub fn temperature_weights(scores: &[f32], max: f32, temperature: f32, out: &mut [f32]) -> () {
        for (w, &s) in out.iter_mut().zip(scores) {
            let e = exp_neg((s - max) / temperature);
            *w = if s.is_finite() { e } else { 0.0 };
        }
    }
}

multiversion! {
    /// `xs` replaced by softmax(xs), the weights attention gives its keys (one query's, and
    /// each row of a prompt's): e^(x - max) over their sum.
    pub fn softmax_in_place(xs: &mut [f32]) -> () {
        let m = max(xs);
        let mut lanes = [0f32; 16];
        let mut chunks = xs.chunks_exact_mut(16);
        for c in &mut chunks {
            for (l, x) in lanes.iter_mut().zip(c) {
                *x = exp_neg(*x - m);
                *l += *x;
            }
        }
        let mut total = sum16(lanes);
        for x in chunks.into_remainder() {
            *x = exp_neg(*x - m);
            total += *x;
        }
        let inv = 1.0 / total;
        for x in xs.iter_mut() {
            *x *= inv;
        }
    }
}

multiversion! {
    /// `xs[i] / scale` rounded half away from zero and saturated to int16 (NaN: 0), exactly
    /// as `f32::round` and `as` define it: x's quantization for the int8 kernels. Baseline
    /// x86-64 calls libm's `roundf` per element (7.6 % of a 16-stream int8 step, `perf`); with
    /// SSE4.1 and up the compiler rounds in vector lanes.
    pub fn quantize_i16(xs: &[f32], scale: f32, out: &mut [i16]) -> () {
        for (o, &x) in out.iter_mut().zip(xs) {
            *o = (x / scale).round() as i16;
        }
    }
}

multiversion! {
    /// `xs[i] - c` into a new vector (log-softmax's last pass).
    pub fn sub(xs: &[f32], c: f32) -> Vec<f32> {
        xs.iter().map(|&x| x - c).collect()
    }
}

multiversion! {
    /// `out[i]` = `xs[i] - c` (log-softmax's last pass, into a buffer the caller keeps).
    pub fn sub_into(xs: &[f32], c: f32, out: &mut [f32]) -> () {
        for (o, &x) in out.iter_mut().zip(xs) {
            *o = x - c;
        }
    }
}

multiversion! {
    /// The smallest and the largest finite element of `xs` and how many are finite ((inf,
    /// -inf, 0) where none is).
    pub fn finite_range(xs: &[f32]) -> (f32, f32, usize) {
        let mut lo = [f32::INFINITY; 16];
        let mut hi = [f32::NEG_INFINITY; 16];
        let mut count = [0u32; 16];
        let chunks = xs.chunks_exact(16);
        let rest = chunks.remainder();
        for c in chunks {
            for l in 0..16 {
                let x = c[l];
                // a non-finite x counts as neither bound
                let finite = (x.to_bits() & 0x7fff_ffff) < 0x7f80_0000;
                lo[l] = lo[l].min(if finite { x } else { f32::INFINITY });
                hi[l] = hi[l].max(if finite { x } else { f32::NEG_INFINITY });
                count[l] += finite as u32;
            }
        }
        let mut out = (f32::INFINITY, f32::NEG_INFINITY, 0usize);
        for l in 0..16 {
            out = (out.0.min(lo[l]), out.1.max(hi[l]), out.2 + count[l] as usize);
        }
        for &x in rest.iter().filter(|x| x.is_finite()) {
            out = (out.0.min(x), out.1.max(x), out.2 + 1);
        }
        out
    }
}

/// A key whose unsigned order is the total order of the floats (`f32::total_cmp`).
#[inline(always)]
pub fn order_key(f: f32) -> u32 {
    let b = f.to_bits();
    // negative: all bits flipped (more negative, smaller); positive: the sign bit set
    b ^ (((b as i32) >> 31) as u32 | 0x8000_0000)
}

/// The bin of `score` among `bins` bins of width 1 / `scale` counted down from `highest` (a
/// finite score at most `highest`), rounded to the nearest and clamped to the last bin. A
/// monotone map (a better score never lands in a later bin); a non-finite score lands in some
/// bin, which the caller ignores.
#[inline(always)]
pub fn score_bin(score: f32, highest: f32, scale: f32, bins: u32) -> u16 {
    let t = (highest - score) * scale + ROUND_MAGIC;
    let b = (t.to_bits() as i32 - ROUND_MAGIC.to_bits() as i32) as u32;
    b.min(bins - 1) as u16
}

multiversion! {
    /// `out[i]` = [`score_bin`] of `scores[i]`, over a whole row.
    pub fn score_bins(scores: &[f32], highest: f32, scale: f32, bins: u32, out: &mut [u16]) -> () {
        for (o, &s) in out.iter_mut().zip(scores) {
            *o = score_bin(s, highest, scale, bins);
        }
    }
}

multiversion! {
    /// Zeroes `weights[i]` for every score the cut `(key, last)` leaves out: kept are the
    /// scores whose [`order_key`] is above `key`, or equal to it at an index up to `last`.
    pub fn keep_cut(scores: &[f32], key: u32, last: u32, weights: &mut [f32]) -> () {
        for (i, (w, &s)) in weights.iter_mut().zip(scores).enumerate() {
            let k = order_key(s);
            let kept = k > key || (k == key && i as u32 <= last);
            *w = if kept { *w } else { 0.0 };
        }
    }
}

multiversion! {
    /// GPT-Neo's `gelu_new`, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), with tanh from
    /// `exp_neg`: tanh(u) = sign(u) (1 - e^(-2|u|)) / (1 + e^(-2|u|)).
    pub fn gelu_tanh(xs: &[f32], out: &mut [f32]) -> () {
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        for (o, &x) in out.iter_mut().zip(xs) {
            let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
            let t = exp_neg(-2.0 * u.abs());
            let th = ((1.0 - t) / (1.0 + t)).copysign(u);
            *o = 0.5 * x * (1.0 + th);
        }
    }
}

/// The plausible set of a contrast step as a mask over the vocabulary: token i is in it when
/// log p_u(i) >= `threshold`; log p_l(i) = lower(i) - `lse_lower`. The passes below work on
/// the whole vocabulary with the mask as a select (vectorised, no index list).
#[derive(Debug, Clone, Copy)]
pub struct PlausibleSet {
    pub threshold: f32,
    pub lse_lower: f32,
}

impl PlausibleSet {
    /// max over the set of log p_u - log p_l (-inf for an empty set).
    pub fn max_diff(&self, lp_u: &[f32], lower: &[f32]) -> f32 {
        contrast_max_diff(lp_u, lower, self.threshold, self.lse_lower)
    }

    /// Over the set: (Σ e^(log p_u - log p_l - diff_max), Σ e^(log p_u - max_lp)).
    pub fn sums(&self, lp_u: &[f32], lower: &[f32], diff_max: f32, max_lp: f32) -> (f32, f32) {
        contrast_sums(
            lp_u,
            lower,
            self.threshold,
            self.lse_lower,
            diff_max,
            max_lp,
        )
    }

    /// q in place of log p_u: log p_u - log p_l - offset + log_mass in the set, log p_u
    /// outside.
    pub fn write_q(&self, lp_u: &mut [f32], lower: &[f32], offset: f32, log_mass: f32) {
        contrast_write_q(
            lp_u,
            lower,
            self.threshold,
            self.lse_lower,
            offset,
            log_mass,
        )
    }
}

multiversion! {
    fn contrast_max_diff(lp_u: &[f32], lower: &[f32], t: f32, lse_l: f32) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; 16];
        let (u, l) = (lp_u.chunks_exact(16), lower.chunks_exact(16));
        let tail = u.remainder().iter().zip(l.remainder()).fold(f32::NEG_INFINITY, |m, (&u, &l)| {
            if u >= t { m.max(u - (l - lse_l)) } else { m }
        });
        for (uc, lc) in u.zip(l) {
            for ((m, &u), &l) in lanes.iter_mut().zip(uc).zip(lc) {
                // select, then max: the form that vectorises
                let d = if u >= t { u - (l - lse_l) } else { f32::NEG_INFINITY };
                *m = m.max(d);
            }
        }
        lanes.iter().fold(tail, |a, &b| a.max(b))
    }
}

multiversion! {
    fn contrast_sums(lp_u: &[f32], lower: &[f32], t: f32, lse_l: f32, diff_max: f32, max_lp: f32) -> (f32, f32) {
        // min(0) keeps exp_neg in its domain for tokens outside the set (their terms are
        // dropped by the select).
        let term = |u: f32, l: f32| {
            let d = exp_neg((u - (l - lse_l) - diff_max).min(0.0));
            let m = exp_neg((u - max_lp).min(0.0));
            if u >= t { (d, m) } else { (0.0, 0.0) }
        };
        let (mut ds, mut ms) = ([0f32; 16], [0f32; 16]);
        let (u, l) = (lp_u.chunks_exact(16), lower.chunks_exact(16));
        let (mut d_tail, mut m_tail) = (0f32, 0f32);
        for (&u, &l) in u.remainder().iter().zip(l.remainder()) {
            let (d, m) = term(u, l);
            d_tail += d;
            m_tail += m;
        }
        for (uc, lc) in u.zip(l) {
            for (((dl, ml), &u), &l) in ds.iter_mut().zip(ms.iter_mut()).zip(uc).zip(lc) {
                let (d, m) = term(u, l);
                *dl += d;
                *ml += m;
            }
        }
        (ds.iter().sum::<f32>() + d_tail, ms.iter().sum::<f32>() + m_tail)
    }
}

multiversion! {
    fn contrast_write_q(lp_u: &mut [f32], lower: &[f32], t: f32, lse_l: f32, offset: f32, log_mass: f32) -> () {
        for (u, &l) in lp_u.iter_mut().zip(lower) {
            let q = (*u - (l - lse_l)) - offset + log_mass;
            *u = if *u >= t { q } else { *u };
        }
    }
}

/// An element of a KV cache buffer.
pub trait KvElem: Copy {
    fn to_f32(self) -> f32;

    /// The elements as float32: `src` itself where it is float32, else widened into `scratch`.
    fn as_f32<'a>(src: &'a [Self], scratch: &'a mut Vec<f32>) -> &'a [f32] {
        scratch.clear();
        scratch.extend(src.iter().map(|&x| x.to_f32()));
        scratch
    }
}

impl KvElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    fn as_f32<'a>(src: &'a [f32], _: &'a mut Vec<f32>) -> &'a [f32] {
        src
    }
}

impl KvElem for half::bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // a bfloat16 is the top half of a float32: widening is a shift (vectorizes, unlike
        // a call per element)
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// The sum of 16 lanes as a tree (vector adds of halves), not 15 dependent scalar adds. Each
/// level written out: as a loop over the halves `[8, 4, 2, 1]` the compiler neither unrolled
/// nor vectorised it, and a decode step's attention spent a fifth of its time in it, storing
/// the lanes to the stack one by one (`perf annotate`, AMD Zen 4).
#[inline(always)]
fn sum16(mut v: [f32; 16]) -> f32 {
    for i in 0..8 {
        v[i] += v[i + 8];
    }
    for i in 0..4 {
        v[i] += v[i + 4];
    }
    for i in 0..2 {
        v[i] += v[i + 2];
    }
    v[0] + v[1]
}

/// `q · key` in 16 lanes, chunk after chunk, summed as [`sum16`]'s tree, then the remainder's
/// products (past the last whole chunk) added in order. With the length a multiple of 16
/// known at compile time (`D`), the loops run lane-major (each lane's chunks in the same
/// order, so the same sums): the compiler then makes one vector per chunk, where the
/// chunk-major loops had it build the lanes from 2-wide pieces (a decode step's scores 2.1x
/// slower on AVX-512).
#[inline(always)]
fn dot<T: KvElem, const D: usize>(q: &[f32], key: &[T]) -> f32 {
    if D > 0 && D.is_multiple_of(16) {
        let (q, key) = (&q[..D], &key[..D]);
        let mut lanes = [0f32; 16];
        for (l, lane) in lanes.iter_mut().enumerate() {
            for c in 0..D / 16 {
                *lane += q[c * 16 + l] * key[c * 16 + l].to_f32();
            }
        }
        return sum16(lanes) + 0.0; // the empty remainder's sum, as below
    }
    let mut lanes = [0f32; 16];
    let (qc, kc) = (q.chunks_exact(16), key.chunks_exact(16));
    let tail: f32 = qc
        .remainder()
        .iter()
        .zip(kc.remainder())
        .map(|(&a, &b)| a * b.to_f32())
        .sum();
    for (qs, ks) in qc.zip(kc) {
        for ((l, &a), &b) in lanes.iter_mut().zip(qs).zip(ks) {
            *l += a * b.to_f32();
        }
    }
    sum16(lanes) + tail
}

/// One head of one query: `out = softmax(q·keysᵀ) · values`, `keys` and `values` being
/// `scores.len()` rows of `q.len()`. Unscaled: a model that scales its scores (GPT-2) passes q
/// scaled. `D` is the head size when known at compile time (0: `q.len()`), so the common
/// sizes get fully unrolled 16-lane loops.
#[inline(always)]
fn attend_head<T: KvElem, const D: usize>(
    q: &[f32],
    keys: &[T],
    values: &[T],
    scores: &mut [f32],
    out: &mut [f32],
) {
    let d = if D == 0 { q.len() } else { D };
    let (q, out) = (&q[..d], &mut out[..d]);
    for (s, key) in scores.iter_mut().zip(keys.chunks_exact(d)) {
        *s = dot::<T, D>(q, key);
    }
    softmax_in_place(scores);
    out.fill(0.0);
    for (&w, value) in scores.iter().zip(values.chunks_exact(d)) {
        for (o, &v) in out.iter_mut().zip(value) {
            *o += w * v.to_f32();
        }
    }
}

/// `attend_head` with the head size fixed for 64 and 128 (GPT-Neo 125M and GPT-2 medium: 64).
#[inline(always)]
fn attend_head_sized<T: KvElem>(
    q: &[f32],
    keys: &[T],
    values: &[T],
    scores: &mut [f32],
    out: &mut [f32],
) {
    match q.len() {
        64 => attend_head::<T, 64>(q, keys, values, scores, out),
        128 => attend_head::<T, 128>(q, keys, values, scores, out),
        _ => attend_head::<T, 0>(q, keys, values, scores, out),
    }
}

multiversion! {
    /// Single-query attention of one head on a float32 cache (see `attend_head`).
    pub fn attend_head_f32(q: &[f32], keys: &[f32], values: &[f32], scores: &mut [f32], out: &mut [f32]) -> () {
        attend_head_sized(q, keys, values, scores, out)
    }
}

multiversion! {
    /// Single-query attention of one head on a bfloat16 cache (see `attend_head`).
    pub fn attend_head_bf16(q: &[f32], keys: &[half::bf16], values: &[half::bf16], scores: &mut [f32], out: &mut [f32]) -> () {
        attend_head_sized(q, keys, values, scores, out)
    }
}

/// `gelu_new` as a candle op on CPU float32 tensors, in parallel chunks.
pub struct GeluTanh;

impl candle_core::CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("gelu-tanh: input must be contiguous");
        };
        let xs = &s.as_slice::<f32>()?[a..b];
        let mut out = vec![0f32; xs.len()];
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK))
            .for_each(|(o, x)| gelu_tanh(x, o));
        Ok((candle_core::CpuStorage::F32(out), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_neg_matches_libm() {
        let mut x = 0.0f32;
        while x > -90.0 {
            let (got, want) = (exp_neg(x), x.exp());
            let tol = 2.5e-7 * want + 1e-37;
            assert!((got - want).abs() <= tol, "x={x}: {got} vs {want}");
            x -= 0.0137;
        }
        assert_eq!(exp_neg(-1000.0), 0.0);
        assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_neg(0.0), 1.0);
    }

    #[test]
    fn gelu_matches_the_exact_formula() {
        let xs: Vec<f32> = (-600..600).map(|i| i as f32 * 0.01).collect();
        let mut out = vec![0f32; xs.len()];
        gelu_tanh(&xs, &mut out);
        for (&x, &g) in xs.iter().zip(&out) {
            let want = 0.5
                * x as f64
                * (1.0
                    + ((2.0 / std::f64::consts::PI).sqrt()
                        * (x as f64 + 0.044715 * (x as f64).powi(3)))
                    .tanh());
            assert!((g as f64 - want).abs() < 1e-6, "x={x}: {g} vs {want}");
        }
    }

    #[test]
    fn single_query_attention_matches_the_formula() {
        // 20: not a multiple of the 16 lanes; 64 and 128: the unrolled sizes
        for (d, n) in [(20, 7), (64, 33), (128, 5)] {
            let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
            let keys: Vec<f32> = (0..n * d).map(|i| (i as f32 * 0.11).cos()).collect();
            let values: Vec<f32> = (0..n * d).map(|i| (i as f32 * 0.05).sin()).collect();
            let logits: Vec<f64> = (0..n)
                .map(|j| (0..d).map(|i| q[i] as f64 * keys[j * d + i] as f64).sum())
                .collect();
            let top = logits.iter().cloned().fold(f64::MIN, f64::max);
            let total: f64 = logits.iter().map(|l| (l - top).exp()).sum();
            let want: Vec<f64> = (0..d)
                .map(|i| {
                    (0..n)
                        .map(|j| (logits[j] - top).exp() / total * values[j * d + i] as f64)
                        .sum()
                })
                .collect();
            let (mut scores, mut out) = (vec![0f32; n], vec![0f32; d]);
            attend_head_f32(&q, &keys, &values, &mut scores, &mut out);
            for (g, w) in out.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
            }
            // bfloat16 caches widen exactly: the same inputs rounded to bf16 give the f32 result
            let (kb, vb): (Vec<half::bf16>, Vec<half::bf16>) = (
                keys.iter().map(|&x| half::bf16::from_f32(x)).collect(),
                values.iter().map(|&x| half::bf16::from_f32(x)).collect(),
            );
            let widen = |v: &[half::bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
            let mut out_f32 = vec![0f32; d];
            attend_head_f32(&q, &widen(&kb), &widen(&vb), &mut scores, &mut out_f32);
            attend_head_bf16(&q, &kb, &vb, &mut scores, &mut out);
            assert_eq!(out, out_f32);
        }
    }

    #[test]
    fn quantize_i16_rounds_and_saturates_as_the_scalar_cast() {
        let mut xs = vec![
            0.5f32,
            -0.5,
            1.5,
            -1.5,
            2.5,
            0.499_999_97,
            -0.499_999_97,
            32767.4,
            32767.5,
            -32768.4,
            -32768.5,
            1e9,
            -1e9,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            1e-40,
        ];
        // every lane position of the vector loop and its tail, over a wide range
        let mut state = 0x2545_f491u32;
        for _ in 0..1000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            xs.push((state as f32 / u32::MAX as f32 - 0.5) * 80000.0);
        }
        for scale in [1.0f32, 0.5, 3.7, 1e-3] {
            let mut got = vec![0i16; xs.len()];
            quantize_i16(&xs, scale, &mut got);
            for (&x, &g) in xs.iter().zip(&got) {
                assert_eq!(g, (x / scale).round() as i16, "{x} / {scale}");
            }
        }
    }

    #[test]
    fn sums_and_max() {
        let xs: Vec<f32> = (0..1001).map(|i| -(i as f32) * 0.01).collect();
        let want: f64 = xs.iter().map(|&x| (x as f64).exp()).sum();
        assert!((sum_exp(&xs, 0.0) as f64 - want).abs() < 1e-4);
        assert_eq!(max(&xs), 0.0);
    }
}
