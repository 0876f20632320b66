//! Every `unsafe` line of the project lives here: the hand-written SIMD and AMX kernels, the
//! CPU feature probe that guards them, the allocator tuning (`allocator.rs`), and the launches of
//! our own CUDA kernels (`paged_attention.rs`, which checks every index it reads,
//! `fused_epilogue.rs`, `greedy.rs`, `sample.rs`, `logprob.rs` and `sled.rs` through
//! `cuda_source.rs`, whose operands are checked against the shapes the kernels read), the call
//! of cuBLAS's mixed-precision product (`wide_product.rs`), and the tests' CUDA emulator
//! (`cuda_emulator.rs`: its library loaded, its operands fenced by inaccessible pages).
//!
//! Each public entry is safe to call on any CPU: the packed matmul is only reachable through
//! `PackedWeight::pack*`, which refuse a CPU without the instructions; the vectorised loops
//! check the CPU themselves and fall back to portable code; the kernels assert the extents of
//! the operands they read and write. `model`, `engine` and `http` forbid `unsafe` outright.

pub mod allocator;
pub mod causal_attention;
pub mod cpu_features;
#[cfg(feature = "cuda-emulator")]
pub mod cuda_emulator;
#[cfg(any(feature = "cuda-emulator", feature = "cuda"))]
mod cuda_source;
pub mod fastmath;
pub mod fused_epilogue;
pub mod greedy;
pub mod logprob;
pub mod matmul;
pub mod paged_attention;
pub mod sample;
pub mod sled;
pub mod threads;
pub mod wide_product;

/// A deterministic stream of uniform numbers in [0, 1) from `seed` (xorshift64): made-up
/// logits for the start-up checks that compare a device's kernels with the CPU's, and for
/// tests.
pub fn uniform(seed: u64) -> impl FnMut() -> f32 {
    let mut x = seed.max(1);
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 40) as f32 / (1u64 << 24) as f32
    }
}
