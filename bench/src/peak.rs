//! The machine's instruction limits, for the bench's "share of the bound" figures: each loop
//! keeps its operands in registers and issues only the multiply-add the panel kernels use for
//! that dtype, with enough independent accumulators to hide the instruction's latency, so
//! what it measures is the issue rate of the cores, not a library's GEMM.
//!
//! - f32: FMA (`vfmadd231ps`), 512-bit where the CPU has AVX-512, else 256-bit.
//! - bf16: `vdpbf16ps` (AVX-512 BF16), or AMX `tdpbf16ps` tiles where the bf16 kernel uses
//!   them; on AVX2 there is no bf16 instruction: the kernel widens to f32 and uses FMA, so
//!   the bound is the f32 FMA rate.
//! - int8: `vpdpwssd` (AVX-512 VNNI), else AVX2 `vpmaddwd` + `vpaddd` (the int8 kernels'
//!   arithmetic: pairs of int16 x int8-widened products summed in int32).
//!
//! Operations count as in FLOPs: 2 per lane and FMA (a product and a sum), 4 per lane and
//! `vdpbf16ps` / `vpdpwssd` / `vpmaddwd` (two products, two sums), 2 per product of a tile.

use std::hint::black_box;

/// Operations per second of one instruction loop on one thread, and what it ran.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub ops_per_s: f64,
    pub instruction: &'static str,
}

/// A loop of one multiply-add instruction on the calling thread: `iters` iterations in,
/// operations done out.
type Loop = fn(u64) -> f64;

/// The instruction the panel kernels use for `kind` ("f32", "bf16", "int8") on this CPU, as
/// `matmul::Isa::available` chooses it, and its loop.
fn loop_for(kind: &str) -> Option<(&'static str, Loop)> {
    #[cfg(target_arch = "x86_64")]
    {
        use exitserve::kernels::matmul::{Isa, Kind};
        let kind = match kind {
            "f32" => Kind::F32,
            "bf16" => Kind::Bf16,
            "int8" => Kind::Int8,
            _ => return None,
        };
        let chosen: (&'static str, Loop) = match (kind, Isa::available(kind).next()?) {
            (_, Isa::Amx) => ("tdpbf16ps (AMX)", x86::bf16_amx),
            (Kind::F32, Isa::Avx512) => ("vfmadd231ps zmm", x86::f32_avx512),
            (Kind::Bf16, Isa::Avx512) => ("vdpbf16ps zmm", x86::bf16_avx512),
            (Kind::Int8, Isa::Avx512) => ("vpdpwssd zmm", x86::int8_vnni),
            // the AVX2 bf16 kernel widens to f32 and multiplies with 256-bit FMA
            (Kind::F32 | Kind::Bf16, Isa::Avx2) => ("vfmadd231ps ymm", x86::f32_avx2),
            (Kind::Int8, Isa::Avx2) => ("vpmaddwd+vpaddd ymm", x86::int8_avx2),
        };
        Some(chosen)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = kind;
        None
    }
}

/// The aggregate rate of `kind`'s multiply-add on `threads` threads at once (best of
/// `passes` runs of about `seconds` each), or None where the CPU has no kernel for it.
pub fn multiply_add_rate(kind: &str, threads: usize, seconds: f64, passes: usize) -> Option<Rate> {
    let (instruction, run) = loop_for(kind)?;
    // Size the loop on one thread, then run it on all of them together.
    let probe = 1u64 << 16;
    let t = std::time::Instant::now();
    black_box(run(probe));
    let per_iter = t.elapsed().as_secs_f64() / probe as f64;
    let iters = ((seconds / per_iter.max(1e-12)) as u64).max(probe);
    let mut best = 0f64;
    for _ in 0..passes {
        let t = std::time::Instant::now();
        let ops: f64 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|_| s.spawn(|| run(iters))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        best = best.max(ops / t.elapsed().as_secs_f64());
    }
    Some(Rate {
        ops_per_s: best,
        instruction,
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::hint::black_box;

    use exitserve::kernels::cpu_features;

    /// Independent accumulators per loop: more than latency x issue width (4-5 cycles x 2
    /// units) and within the 16 (AVX2) or 32 (AVX-512) vector registers with the operands.
    /// Each starts from a different value and every one reaches the result: chains the
    /// compiler could prove equal, or whose results go unused, it merges or deletes, and the
    /// loop then measures one chain's latency, credited as the issue rate of all of them
    /// (the first version of these loops did that: 1.5x to 2x the true rate).
    const ACC_YMM: usize = 12;
    const ACC_ZMM: usize = 16;

    pub fn f32_avx2(iters: u64) -> f64 {
        assert!(cpu_features::get().avx2_fma);
        // SAFETY: the CPU has AVX2 and FMA (asserted).
        let sum = unsafe { f32_avx2_loop(iters) };
        black_box(sum);
        (iters * ACC_YMM as u64 * 8 * 2) as f64
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn f32_avx2_loop(iters: u64) -> f32 {
        let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        let mut acc: [__m256; ACC_YMM] =
            std::array::from_fn(|i| _mm256_set1_ps(1.0 + i as f32 / 64.0));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(
            lanes.as_mut_ptr(),
            acc.iter()
                .fold(_mm256_setzero_ps(), |s, v| _mm256_add_ps(s, *v)),
        );
        lanes[0]
    }

    pub fn f32_avx512(iters: u64) -> f64 {
        assert!(cpu_features::get().avx512);
        // SAFETY: the CPU has AVX-512F (asserted).
        black_box(unsafe { f32_avx512_loop(iters) });
        (iters * ACC_ZMM as u64 * 16 * 2) as f64
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn f32_avx512_loop(iters: u64) -> f32 {
        let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut acc: [__m512; ACC_ZMM] =
            std::array::from_fn(|i| _mm512_set1_ps(1.0 + i as f32 / 64.0));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        _mm512_reduce_add_ps(
            acc.iter()
                .fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, *v)),
        )
    }

    pub fn bf16_avx512(iters: u64) -> f64 {
        let cpu = cpu_features::get();
        assert!(cpu.avx512_bf16);
        // SAFETY: the CPU has AVX-512 BF16 and BW (asserted).
        black_box(unsafe { bf16_avx512_loop(iters) });
        (iters * ACC_ZMM as u64 * 16 * 4) as f64
    }

    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    unsafe fn bf16_avx512_loop(iters: u64) -> f32 {
        // bf16 pairs of 1.0 (0x3F80) and 2^-20
        let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3F80_3F80));
        let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3580_3580));
        let mut acc: [__m512; ACC_ZMM] = std::array::from_fn(|i| _mm512_set1_ps(i as f32));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, a, b);
            }
        }
        _mm512_reduce_add_ps(
            acc.iter()
                .fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, *v)),
        )
    }

    pub fn int8_vnni(iters: u64) -> f64 {
        assert!(cpu_features::get().avx512_vnni);
        // SAFETY: the CPU has AVX-512 VNNI and BW (asserted).
        black_box(unsafe { int8_vnni_loop(iters) });
        (iters * ACC_ZMM as u64 * 16 * 4) as f64
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn int8_vnni_loop(iters: u64) -> i32 {
        let b = _mm512_set1_epi32(0x0001_0001);
        let mut acc: [__m512i; ACC_ZMM] = std::array::from_fn(|i| _mm512_set1_epi32(i as i32));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                // the products depend on the accumulator: no loop-invariant term to hoist
                *v = _mm512_dpwssd_epi32(*v, *v, b);
            }
        }
        _mm512_reduce_add_epi32(
            acc.iter()
                .fold(_mm512_setzero_si512(), |s, v| _mm512_add_epi32(s, *v)),
        )
    }

    pub fn int8_avx2(iters: u64) -> f64 {
        assert!(cpu_features::get().avx2_fma);
        // SAFETY: the CPU has AVX2 (asserted).
        black_box(unsafe { int8_avx2_loop(iters) });
        (iters * ACC_YMM as u64 * 8 * 4) as f64
    }

    #[target_feature(enable = "avx2")]
    unsafe fn int8_avx2_loop(iters: u64) -> i32 {
        let b = _mm256_set1_epi32(0x0001_0001);
        let mut acc: [__m256i; ACC_YMM] = std::array::from_fn(|i| _mm256_set1_epi32(i as i32));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                // the products depend on the accumulator: no loop-invariant term to hoist
                *v = _mm256_add_epi32(*v, _mm256_madd_epi16(*v, b));
            }
        }
        _mm256_extract_epi32::<0>(
            acc.iter()
                .fold(_mm256_setzero_si256(), |s, v| _mm256_add_epi32(s, *v)),
        )
    }

    /// `tdpbf16ps` on register-resident tiles (`amx::tdpbf16ps_loop`).
    pub fn bf16_amx(iters: u64) -> f64 {
        assert!(cpu_features::get().amx_bf16);
        // SAFETY: the CPU has AMX-BF16 and the process the tile permission (asserted).
        let products = unsafe { exitserve::kernels::matmul::tdpbf16ps_loop(iters) };
        (products * 2) as f64
    }
}

/// The machine's read bandwidth in bytes/s: every thread sums its share of a buffer of
/// `bytes` (far larger than the caches), best of `passes`.
pub fn read_bandwidth(bytes: usize, threads: usize, passes: usize) -> f64 {
    let words = bytes / 8;
    // Touch every page first (with distinct values, so no zero-page sharing).
    let buf: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads);
    let mut best = 0f64;
    for _ in 0..passes {
        let t = std::time::Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(chunk)
                .map(|part| s.spawn(move || sum_words(part)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .fold(0, u64::wrapping_add)
        });
        black_box(total);
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

/// Wrapping integer sums in 8 lanes: the compiler vectorises it to full-width loads.
fn sum_words(part: &[u64]) -> u64 {
    let mut lanes = [0u64; 8];
    let mut blocks = part.chunks_exact(8);
    for b in &mut blocks {
        for (l, v) in lanes.iter_mut().zip(b) {
            *l = l.wrapping_add(*v);
        }
    }
    let tail = blocks
        .remainder()
        .iter()
        .fold(0u64, |a, v| a.wrapping_add(*v));
    lanes.iter().fold(tail, |a, v| a.wrapping_add(*v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_word() {
        let v: Vec<u64> = (1..=1003).collect();
        assert_eq!(sum_words(&v), 1003 * 1004 / 2);
    }

    #[test]
    fn every_kernel_instruction_runs_and_counts() {
        // A short run of each loop this CPU has: it must execute (no illegal instruction)
        // and report a positive, finite rate.
        for kind in ["f32", "bf16", "int8"] {
            if let Some(rate) = multiply_add_rate(kind, 1, 0.01, 1) {
                assert!(
                    rate.ops_per_s.is_finite() && rate.ops_per_s > 0.0,
                    "{kind}: {rate:?}"
                );
            }
        }
        assert!(read_bandwidth(1 << 20, 2, 1) > 0.0);
    }
}
