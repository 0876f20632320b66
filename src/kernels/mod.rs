//! Every `unsafe` line of the project lives here: the hand-written SIMD and AMX kernels, the
//! CPU feature probe that guards them, the allocator tuning (`allocator.rs`), and the launch of
//! the one CUDA kernel of our own (`paged_attention.rs`, which checks every index it reads).
//!
//! Each public entry is safe to call on any CPU: the packed matmul is only reachable through
//! `PackedWeight::pack*`, which refuse a CPU without the instructions; the vectorised loops
//! check the CPU themselves and fall back to portable code; the kernels assert the extents of
//! the operands they read and write. `model`, `engine` and `http` forbid `unsafe` outright.

pub mod allocator;
pub mod causal_attention;
pub mod cpu_features;
pub mod fastmath;
pub mod matmul;
pub mod paged_attention;
