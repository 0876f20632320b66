//! Kernel timings without a server: one vocabulary head in every layout and dtype the model
//! can use, one block's products against this machine's multiply-add peak, one sampled
//! draw, and one decode query's attention.

use std::time::{Duration, Instant};

use crate::checkpoint::Shape;
use crate::peak;

/// Times one vocabulary head (50257 x 768) at batch 1 to 64 in the layouts and dtypes the
/// model can use, to choose kernels per batch size.
pub fn kernels() {
    use candle_core::{DType, Device, Tensor};
    use exitserve::kernels::matmul;
    let dev = Device::Cpu;
    println!("rayon threads: {}", rayon::current_num_threads());
    let (v, h) = (50257usize, 768usize);
    let w = Tensor::randn(0f32, 0.02, (v, h), &dev).unwrap();
    let time = |f: &dyn Fn() -> Tensor| {
        f();
        let t = Instant::now();
        let n = 10;
        for _ in 0..n {
            f();
        }
        t.elapsed().as_secs_f64() * 1e3 / n as f64
    };
    for dt in [DType::F32, DType::BF16] {
        let wd = w.to_dtype(dt).unwrap();
        let packed = matmul::PackedWeight::pack(&wd).ok();
        // 1 and 16: decode; 5 and 9: speculative verification of 4 and 8 drafts; 64: prefill
        for b in [1usize, 2, 4, 5, 9, 16, 64] {
            let x = Tensor::randn(0f32, 1.0, (b, h), &dev).unwrap();
            // candle has no fast bf16 matmul on CPUs without AVX-512 BF16: f32 only
            let candle = if dt == DType::F32 {
                format!("{:7.2} ms", time(&|| x.matmul(&wd.t().unwrap()).unwrap()))
            } else {
                "      -   ".to_string()
            };
            let skinny = packed.as_ref().map_or("      -   ".to_string(), |p| {
                format!("{:7.2} ms", time(&|| p.xwt(&x).unwrap()))
            });
            println!("{dt:?} batch {b:>2}: candle x·Wᵀ {candle}   skinny {skinny}");
        }
    }
    if matmul::supports_int8() {
        let packed = matmul::PackedWeight::pack_int8(&w).unwrap();
        for b in [1usize, 2, 4, 5, 9, 16, 64] {
            let x = Tensor::randn(0f32, 1.0, (b, h), &dev).unwrap();
            let ms = time(&|| packed.xwt(&x).unwrap());
            println!("int8 batch {b:>2}: skinny {ms:7.2} ms (per-row scales, x rounded to int16)");
        }
    }
}

/// Times one draw of a sampled step (`sample::draw_from_logits`: the log-softmax of a row of
/// 50,257 logits, then temperature, top-k, top-p and the pick) on one thread, as a stream's
/// step or the host's sampler runs it: on logits spread as a trained head's (normal, sd 3:
/// a nucleus of hundreds to thousands of tokens) and as a random checkpoint's (sd 0.3: the
/// bench's own servers, whose nucleus is most of the vocabulary). Best and median of 200 draws.
pub fn sampling() {
    use exitserve::kernels::sample::{draw_from_logits, Draw};
    let vocab = 50257usize;
    let mut rand = exitserve::kernels::uniform(0x2545_F491_4F6C_DD1D);
    // normal deviates by Box-Muller
    let mut normal = move || {
        let (a, b) = (rand().max(1e-7), rand());
        (-2.0 * a.ln()).sqrt() * (std::f32::consts::TAU * b).cos()
    };
    let z: Vec<f32> = (0..vocab).map(|_| normal()).collect();
    let settings = [
        ("temperature 1", 1.0f32, 0usize, 1.0f32),
        ("top_p 0.95 (t 0.8)", 0.8, 0, 0.95),
        ("top_k 50", 1.0, 50, 1.0),
        ("top_k 40 + top_p 0.9", 0.7, 40, 0.9),
    ];
    for (spread, sd) in [
        ("trained-like, sd 3", 3.0f32),
        ("random checkpoint, sd 0.3", 0.3),
    ] {
        let logits: Vec<f32> = z.iter().map(|&x| x * sd).collect();
        for (name, temperature, top_k, top_p) in settings {
            let mut i = 0;
            let (best, median) = best_and_median(200, || {
                let d = Draw {
                    temperature,
                    top_k,
                    top_p,
                    u: (i as f64 + 0.5) / 200.0,
                };
                i += 1;
                std::hint::black_box(draw_from_logits(std::hint::black_box(&logits), &d));
            });
            println!("draw, {spread:<26} {name:<22} best {best:6.1} us   median {median:6.1} us");
        }
    }
}

/// Times one decode query's attention on one thread (`fastmath::attend_head_*`, 12 heads of
/// 64: a GPT-Neo-125M layer) over 256, 1024 and 2048 cached positions, bf16 and f32 caches,
/// each head's keys and values contiguous as the cache holds them. Best and median of 200.
pub fn attention() {
    use exitserve::kernels::fastmath::{attend_head_bf16, attend_head_f32};
    let (heads, d) = (12usize, 64usize);
    let mut rand = exitserve::kernels::uniform(0x9E37_79B9_7F4A_7C15);
    let q: Vec<f32> = (0..heads * d).map(|_| rand() - 0.5).collect();
    for positions in [256usize, 1024, 2048] {
        let keys: Vec<f32> = (0..heads * positions * d).map(|_| rand() - 0.5).collect();
        let values: Vec<f32> = (0..heads * positions * d).map(|_| rand() - 0.5).collect();
        let (kb, vb): (Vec<half::bf16>, Vec<half::bf16>) = (
            keys.iter().map(|&x| half::bf16::from_f32(x)).collect(),
            values.iter().map(|&x| half::bf16::from_f32(x)).collect(),
        );
        let (mut scores, mut out) = (vec![0f32; positions], vec![0f32; heads * d]);
        let span = |h: usize| h * positions * d..(h + 1) * positions * d;
        let bf16 = best_and_median(200, || {
            for (h, o) in out.chunks_exact_mut(d).enumerate() {
                attend_head_bf16(&q[h * d..][..d], &kb[span(h)], &vb[span(h)], &mut scores, o);
            }
        });
        let f32 = best_and_median(200, || {
            for (h, o) in out.chunks_exact_mut(d).enumerate() {
                attend_head_f32(
                    &q[h * d..][..d],
                    &keys[span(h)],
                    &values[span(h)],
                    &mut scores,
                    o,
                );
            }
        });
        for (dtype, (best, median)) in [("bf16", bf16), ("f32", f32)] {
            println!(
                "attention, one query, 12 heads x 64, {positions:>4} positions, {dtype:<4} cache: best {best:7.1} us   median {median:7.1} us"
            );
        }
    }
}

/// The best and the median time of `runs` calls of `f`, in µs.
fn best_and_median(runs: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[0], times[runs / 2])
}

/// The multiply-add peak of each dtype's kernel instruction on all threads, or None where
/// the CPU has no kernel for it. Measure it before any product runs: rayon's workers go on
/// spinning and yielding for a while after a parallel product, and the peak loop's threads
/// then share the cores with them (2 cores of an AMD Zen 4: f32 read 160-177 GFLOPS there,
/// 230-234 alone, below what the kernels themselves reached).
pub fn peaks() -> Vec<(&'static str, Option<peak::Rate>)> {
    let threads = rayon::current_num_threads();
    ["f32", "bf16", "int8"]
        .into_iter()
        .map(|kind| (kind, peak::multiply_add_rate(kind, threads, 0.3, 3)))
        .collect()
}

/// Times the products of one block (attention in and out, MLP up and down) of `shape` at
/// decode (1 and 16 rows) and prefill (`prompt` rows) sizes, per dtype, as GFLOPS and as a
/// share of this machine's multiply-add `peaks` for that dtype (all threads).
pub fn block_products(shape: &Shape, prompt: usize, peaks: &[(&str, Option<peak::Rate>)]) {
    use candle_core::{DType, Device, Tensor};
    use exitserve::kernels::matmul::PackedWeight;
    let dev = Device::Cpu;
    let threads = rayon::current_num_threads();
    let h = shape.hidden;
    let products = [
        ("qkv", 3 * h, h),
        ("attn out", h, h),
        ("mlp up", 4 * h, h),
        ("mlp down", h, 4 * h),
    ];
    for &(kind, rate) in peaks {
        let Some(rate) = rate else {
            println!("{kind}: no kernel on this CPU");
            continue;
        };
        println!(
            "{kind}: peak {:.0} GFLOPS ({}, {threads} threads)",
            rate.ops_per_s / 1e9,
            rate.instruction
        );
        for (name, n, k) in products {
            let w = Tensor::randn(0f32, 0.02, (n, k), &dev).unwrap();
            let packed = match kind {
                "f32" => PackedWeight::pack(&w),
                "bf16" => PackedWeight::pack(&w.to_dtype(DType::BF16).unwrap()),
                _ => PackedWeight::pack_int8(&w),
            }
            .unwrap();
            let mut line = format!("  {name:>8} {n:>5}x{k:<5}");
            for m in [1usize, 16, prompt] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                // the fastest of the runs: this machine's other tenants only ever slow it
                let (mut s, mut runs, t) = (f64::MAX, 0u32, Instant::now());
                while runs < 5 || t.elapsed() < Duration::from_millis(400) {
                    let one = Instant::now();
                    packed.xwt(&x).unwrap();
                    s = s.min(one.elapsed().as_secs_f64());
                    runs += 1;
                }
                let gflops = 2.0 * (m * n * k) as f64 / s / 1e9;
                let share = 100.0 * gflops * 1e9 / rate.ops_per_s;
                line += &format!(
                    "   m={m:<4} {:8.3} ms {gflops:6.1} GFLOPS {share:4.1} %",
                    s * 1e3
                );
            }
            println!("{line}");
        }
    }
}
