//! Vocabulary-sized loops (50k entries per token) dominate the CPU work outside matmuls, so
//! they use an `exp` that the compiler vectorizes (libm's `expf` is scalar): Cephes' expf,
//! i.e. e^x = 2^n e^r with a two-part ln 2 for an exact reduction and a degree-7 polynomial
//! for e^r, relative error about 1e-7.

const LOG2_E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding then subtracting 1.5 * 2^23 rounds an f32 to the nearest integer without a branch.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// e^x for x <= 0 (the only range the scoring code needs); x < -87 gives 0.
#[inline(always)]
pub fn exp_neg(x: f32) -> f32 {
    let xc = x.max(-87.0);
    let n = ((xc * LOG2_E) + ROUND_MAGIC) - ROUND_MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO; // |r| <= ln(2)/2
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        e_r * scale
    }
}

/// Whether the CPU has AVX-512 (checked once).
#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
}

/// Compiles a function twice, for AVX-512 (chosen at run time when the CPU has it) and for
/// the baseline target, so that its autovectorised loops use 16 lanes where they can.
macro_rules! multiversion {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn imp($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn wide($($arg: $ty),*) -> $ret {
                    imp($($arg),*)
                }
                if avx512() {
                    // SAFETY: the CPU has AVX-512 (checked above).
                    return unsafe { wide($($arg),*) };
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
    /// `xs[i] - c` into a new vector (log-softmax's last pass).
    pub fn sub(xs: &[f32], c: f32) -> Vec<f32> {
        xs.iter().map(|&x| x - c).collect()
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
    fn sums_and_max() {
        let xs: Vec<f32> = (0..1001).map(|i| -(i as f32) * 0.01).collect();
        let want: f64 = xs.iter().map(|&x| (x as f64).exp()).sum();
        assert!((sum_exp(&xs, 0.0) as f64 - want).abs() < 1e-4);
        assert_eq!(max(&xs), 0.0);
    }
}
