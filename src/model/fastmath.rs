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

pub fn max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = xs.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = l.max(x);
        }
    }
    rest.iter().fold(
        lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        |m, &x| m.max(x),
    )
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
    fn sums_and_max() {
        let xs: Vec<f32> = (0..1001).map(|i| -(i as f32) * 0.01).collect();
        let want: f64 = xs.iter().map(|&x| (x as f64).exp()).sum();
        assert!((sum_exp(&xs, 0.0) as f64 - want).abs() < 1e-4);
        assert_eq!(max(&xs), 0.0);
    }
}
