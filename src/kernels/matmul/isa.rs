//! Which instruction set runs a product: the CPU's choices per kind of panel, fastest first,
//! and the dispatch to each instruction set's file.

use super::panels::Operands;
#[cfg(target_arch = "x86_64")]
use super::{amx, avx2, avx512};
use crate::kernels::cpu_features;
use candle_core::DType;

/// What the panels hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    F32,
    Bf16,
    Int8,
}

/// The instruction set a panel product runs on; one of `Isa::available(kind)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX2 + FMA, 8 lanes (`avx2.rs`).
    Avx2,
    /// AVX-512: FMA for f32, `vdpbf16ps` for bf16, VNNI `vpdpwssd` for int8.
    Avx512,
    /// AMX `tdpbf16ps` tiles (bf16 only).
    Amx,
}

impl Isa {
    /// The instruction sets this CPU has for `kind`, fastest first (no allocation: it runs
    /// on every product).
    pub fn available(kind: Kind) -> impl Iterator<Item = Isa> {
        let cpu = cpu_features::get();
        let avx512 = match kind {
            Kind::F32 => cpu.avx512,
            Kind::Bf16 => cpu.avx512_bf16,
            Kind::Int8 => cpu.avx512_vnni,
        };
        [
            (Isa::Amx, kind == Kind::Bf16 && cpu.amx_bf16),
            (Isa::Avx512, avx512),
            (Isa::Avx2, cpu.avx2_fma),
        ]
        .into_iter()
        .filter(|c| c.1)
        .map(|c| c.0)
    }

    pub fn best(kind: Kind) -> Option<Isa> {
        Self::available(kind).next()
    }

    /// Rows x and the output must hold for a product of `m` rows: AMX multiplies whole blocks
    /// of 16 rows beyond 16 (the caller pads x with zero rows and drops the extra outputs).
    pub(crate) fn padded_rows(self, m: usize) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => amx::padded_rows(m),
            _ => m,
        }
    }
}

/// Whether this CPU runs the kernels for weights of `dtype`.
pub fn supported(dtype: DType) -> bool {
    match dtype {
        DType::F32 => Isa::best(Kind::F32).is_some(),
        DType::BF16 => Isa::best(Kind::Bf16).is_some(),
        _ => false,
    }
}

/// Whether this CPU runs the int8 kernel (AVX-512 VNNI or AVX2).
pub fn supports_int8() -> bool {
    Isa::best(Kind::Int8).is_some()
}

/// `out (m, n) = x · Wᵀ` from float32 panels, on `isa`.
pub(crate) fn f32_product(ops: &Operands<f32, f32>, isa: Isa, n: usize, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::f32_product(ops, n, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::f32_product(ops, n, out),
        _ => unreachable!("no {isa:?} kernel for float32 panels"),
    }
}

/// `out (m, n) = x · Wᵀ` from int8 panels and x as int16 pairs, on `isa`.
pub(crate) fn int8_product(
    ops: &Operands<u32, i8>,
    isa: Isa,
    scales: (&[f32], &[f32]),
    n: usize,
    out: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::int8_product(ops, scales, n, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::int8_product(ops, scales, n, out),
        _ => unreachable!("no {isa:?} kernel for int8 panels"),
    }
}

/// `out (m, n) = x · Wᵀ` from bfloat16 pair panels and x as bfloat16 pairs, on `isa`.
pub(crate) fn bf16_product(ops: &Operands<u32, u16>, isa: Isa, n: usize, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::bf16_product(ops, n, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::bf16_product(ops, n, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Amx => amx::bf16_product(ops, n, out),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("no {isa:?} kernel for bfloat16 panels"),
    }
}
