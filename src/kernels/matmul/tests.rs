//! Every instruction set this CPU has, against a plain matmul and against itself row by row.

use candle_core::{DType, Device, Tensor};

use super::isa::{supports_int8, Isa, Kind};
use super::panels::{int16_pairs, x_levels};
use super::PackedWeight;

#[test]
fn packed_kernels_match_a_plain_matmul_for_every_tile_shape() -> candle_core::Result<()> {
    let kernels = [(DType::F32, Kind::F32), (DType::BF16, Kind::Bf16)]
        .into_iter()
        .flat_map(|(d, k)| Isa::available(k).map(move |isa| (d, isa)));
    for (dtype, isa) in kernels {
        // odd sizes exercise the partial panels, row tiles and blocks, and the k padding
        for (m, n, k) in [
            (1, 37, 19),
            (2, 20, 16),
            (3, 50, 64),
            (5, 33, 40),
            (6, 48, 24),
            (7, 17, 9),
            (9, 100, 33),
            (13, 64, 31),
            (17, 16, 8),
            (35, 90, 70),
            // long rows; from 7 rows on (more than one register tile), cache-blocked
            // on AVX2: several k-slices, and several row groups
            (40, 20, 3000),
            (150, 40, 700),
            // AMX: several 16-row blocks over k-slices of whole 4-panel groups, and a partial
            // last panel and row block
            (40, 70, 600),
            (33, 100, 1100),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?.to_dtype(dtype)?;
            let want = x
                .to_dtype(dtype)?
                .to_dtype(DType::F32)?
                .matmul(&w.to_dtype(DType::F32)?.t()?)?;
            let packed = PackedWeight::pack(&w)?;
            let got = packed.xwt_on(&x, isa)?;
            let diff = (want - &got)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-3, "{dtype:?} {isa:?} {m}x{n}x{k}: {diff}");
            // a row alone gives the same bits as within the batch
            for row in [0, m / 2, m - 1] {
                let alone = packed.xwt_on(&x.narrow(0, row, 1)?, isa)?;
                let in_batch = got.narrow(0, row, 1)?;
                assert_eq!(alone.to_vec2::<f32>()?, in_batch.to_vec2::<f32>()?);
            }
        }
    }
    Ok(())
}

#[test]
fn int8_sums_stay_within_int32() {
    assert_eq!(x_levels(516), 32767);
    assert_eq!(x_levels(3072), 5504);
    for k in [1usize, 2, 517, 768, 3072, 10240, 1 << 20] {
        let worst = 2 * 127 * k.div_ceil(2) as i64 * x_levels(k) as i64;
        assert!(worst <= i32::MAX as i64 && x_levels(k) >= 1, "k = {k}");
    }
}

#[test]
fn int8_panels_multiply_the_dequantized_weights() -> candle_core::Result<()> {
    if !supports_int8() {
        return Ok(());
    }
    // k = 600 and 3000 get fewer x levels than 32767 (int32 range)
    for (m, n, k) in [
        (1, 37, 19),
        (5, 24, 40),
        (7, 40, 21),
        (9, 100, 33),
        (17, 16, 8),
        (6, 50, 600),
        (3, 20, 3000),
        // cache-blocked (AVX2): k-slices with int32 sums carried between them
        (40, 30, 3000),
        (150, 40, 700),
    ] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let packed = PackedWeight::pack_int8(&w)?;
        let ids: Vec<u32> = (0..n as u32).collect();
        let dequantized = packed.gather_rows(&ids)?;
        // within half a step (peak/254) of the original weights
        let err = (&dequantized - &w)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let peak = w.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            err <= peak / 254.0 * 1.001,
            "{m}x{n}x{k}: quantization error {err}"
        );
        // the kernel sees x rounded to int16 per row: the same product, summed exactly
        let (pairs, scales) = int16_pairs(&x.flatten_all()?.to_vec1::<f32>()?, m, k);
        let kp = k.div_ceil(2);
        let xq: Vec<f32> = (0..m * k)
            .map(|i| {
                let (row, col) = (i / k, i % k);
                let half = pairs[row * kp + col / 2] >> (16 * (col % 2));
                half as u16 as i16 as f32 * scales[row]
            })
            .collect();
        let want = Tensor::from_vec(xq, (m, k), &Device::Cpu)?.matmul(&dequantized.t()?)?;
        // `want` is summed in f32: its own rounding grows with the sums (k = 3000: ~1e-4)
        let tolerance = 1e-4 + 1e-6 * want.abs()?.max_all()?.to_scalar::<f32>()?;
        let mut results = Vec::new();
        for isa in Isa::available(Kind::Int8) {
            let got = packed.xwt_on(&x, isa)?;
            let diff = (&want - &got)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < tolerance, "{isa:?} {m}x{n}x{k}: {diff}");
            // and the rounding of x costs little against the size of the sums
            let exact = x.matmul(&dequantized.t()?)?;
            let close = (&exact - &got)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let size = exact.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                close < 1e-3 * size,
                "{isa:?} {m}x{n}x{k}: x rounding {close} of {size}"
            );
            let alone = packed.xwt_on(&x.narrow(0, m - 1, 1)?, isa)?;
            assert_eq!(
                alone.to_vec2::<f32>()?,
                got.narrow(0, m - 1, 1)?.to_vec2::<f32>()?
            );
            results.push(got.to_vec2::<f32>()?);
        }
        // exact integer sums: every instruction set gives the same bits
        assert!(results.windows(2).all(|w| w[0] == w[1]));
    }
    Ok(())
}
