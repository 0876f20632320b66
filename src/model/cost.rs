//! What a token costs in weights: the one model of it that self-speculative decoding's policy
//! (`engine/speculative.rs`) and the benchmark's bounds (`bench/`) both use.

/// Multiply-adds of the weight matrices one token runs through: the first `layers` blocks
/// (attention's 4 h² and the MLP's 8 h² projections each) and `heads` vocabulary heads
/// (V x h each). Biases, norms and embedding rows are left out (under 0.5 % of the total for
/// the released shapes).
pub fn weight_macs(hidden: usize, vocab: usize, layers: usize, heads: usize) -> f64 {
    let h = hidden as f64;
    layers as f64 * 12.0 * h * h + heads as f64 * vocab as f64 * h
}
