//! `y = x Wᵀ` for the few rows of a decode step (and the prompt rows of a prefill) on x86-64
//! CPUs with AVX-512 (`avx512.rs`), AVX2 + FMA (`avx2.rs`, the same layouts in 8 lanes) or
//! AMX (`amx.rs`).
//!
//! candle's gemm is tuned for large square-ish products: at 1 to 32 rows it leaves much of
//! the memory bandwidth (batch 1) or of the FMA throughput (batched) unused. Here `W` is packed
//! once, at load time, into panels of 16 output columns stored k-major (`[panel][k][16]`), so a
//! register tile of up to 8 rows x 48 columns accumulates with one broadcast of `x` and three
//! vector loads of `W` per k, and no horizontal reductions; `W` streams from memory once per
//! call whatever the number of rows. Float32 panels use FMA; bfloat16 panels hold pairs of
//! consecutive k (`[panel][k/2][16][2]`, k padded to whole AMX tile rows) for `vdpbf16ps`
//! (x rounded to bfloat16), which halves the bytes read at batch 1, or, where the CPU has
//! AMX, for `tdpbf16ps` tiles, which multiply 16 rows at once: 2-3x faster
//! than AVX-512 from 4 rows up (prefill, batched decode).
//!
//! Every output is accumulated in the same order whatever the number of rows, so a sequence
//! gets bit-identical results alone or in any batch.
//!
//! The files, after candle-core's per-ISA `cpu/` folder: `panels.rs` the layouts, operands and
//! task splitter every instruction set shares; `blocking.rs` the cache blocking the vector
//! kernels share; one file per instruction set (`avx2.rs`, `avx512.rs`, `amx.rs`), each
//! importing only those two (and the CPU probe); `isa.rs` the
//! choice among them and the dispatch; `weight.rs` the packed weight the model layer uses.
//! Elsewhere (another architecture, a CPU without AVX2) nothing packs, and the model layer
//! multiplies with candle's own matmul: that is the portable fallback.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod blocking;
mod isa;
mod panels;
#[cfg(test)]
mod tests;
mod weight;

#[cfg(target_arch = "x86_64")]
pub use amx::tdpbf16ps_loop;
pub use isa::{supported, supports_int8};
pub use isa::{Isa, Kind};
pub use panels::PANEL;
pub use weight::PackedWeight;
