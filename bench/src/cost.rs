//! What one token costs a mode, to turn the bench's speeds into shares of the machine's
//! limits: the bytes a single-stream decode step must read (every weight matrix it uses once,
//! plus the KV cache it attends over) and the FLOPs of one token (2 per multiply-add of the
//! weight matrices, plus attention's QKᵀ and AV over the context).
//!
//! Biases, layer norms, embedding rows and the softmax are left out: under 0.5 % of either
//! figure for these shapes.

use crate::checkpoint::{Arch, Shape};

/// The weight matrices and heads a mode runs: the trunk's first `layers` blocks and `heads`
/// vocabulary heads (the original head or an exit: 1; a contrast: 2).
#[derive(Debug, Clone, Copy)]
pub struct ModeWork {
    pub layers: usize,
    pub heads: usize,
}

/// Bytes per weight as served (int8: one byte; its per-row scales are negligible; llama.cpp's
/// q8_0: 34 bytes per block of 32), and bytes per KV-cache element (float32 for f32 weights,
/// bfloat16 for bf16 and int8; llama.cpp's default cache is f16).
pub fn bytes_per_weight(dtype: &str) -> (f64, f64) {
    match dtype {
        "f32" => (4.0, 4.0),
        "int8" => (1.0, 2.0),
        "q8_0" => (34.0 / 32.0, 2.0),
        _ => (2.0, 2.0),
    }
}

/// Multiply-adds of the weight matrices per token (the model layer's cost model).
pub fn weight_macs(shape: &Shape, work: ModeWork) -> f64 {
    exitserve::model::cost::weight_macs(shape.hidden, shape.vocab, work.layers, work.heads)
}

/// Context positions a token attends to in block `layer` at position `ctx` (GPT-Neo's local
/// layers, every other one, see at most its window).
fn attended(shape: &Shape, layer: usize, ctx: f64) -> f64 {
    match shape.arch {
        Arch::GptNeo if layer % 2 == 1 => ctx.min(shape.window as f64),
        _ => ctx,
    }
}

/// Bytes a single-stream decode step reads at context length `ctx`.
pub fn bytes_per_token(shape: &Shape, work: ModeWork, dtype: &str, ctx: f64) -> f64 {
    let (weight, kv) = bytes_per_weight(dtype);
    let h = shape.hidden as f64;
    let cache: f64 = (0..work.layers)
        .map(|l| 2.0 * attended(shape, l, ctx) * h * kv)
        .sum();
    weight_macs(shape, work) * weight + cache
}

/// FLOPs of one token at context length `ctx`.
pub fn flops_per_token(shape: &Shape, work: ModeWork, ctx: f64) -> f64 {
    let h = shape.hidden as f64;
    let attention: f64 = (0..work.layers)
        .map(|l| 2.0 * 2.0 * attended(shape, l, ctx) * h)
        .sum();
    2.0 * weight_macs(shape, work) + attention
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_medium_original_head_is_its_published_size() {
        // GPT-2 medium: 355 M parameters, of which 302 M in the blocks' matrices and 51.5 M
        // in the tied vocabulary head; biases, norms and position embeddings make the rest.
        let shape = Shape::of(Arch::Gpt2);
        let macs = weight_macs(
            &shape,
            ModeWork {
                layers: 24,
                heads: 1,
            },
        );
        assert!((macs / 1e6 - 353.5).abs() < 1.0, "{macs}");
        let bytes = bytes_per_token(
            &shape,
            ModeWork {
                layers: 24,
                heads: 1,
            },
            "bf16",
            0.0,
        );
        assert_eq!(bytes, macs * 2.0);
    }

    #[test]
    fn gpt_neo_local_layers_attend_within_the_window() {
        let shape = Shape::of(Arch::GptNeo);
        let work = ModeWork {
            layers: 2,
            heads: 0,
        };
        let at = |ctx| flops_per_token(&shape, work, ctx);
        // layer 0 global, layer 1 local (window 256): 4 h per position each
        let h = shape.hidden as f64;
        assert_eq!(at(1000.0) - at(0.0), 4.0 * h * (1000.0 + 256.0));
    }
}
