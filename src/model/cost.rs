//! What a token costs in weights: the one model of it that self-speculative decoding's policy
//! (`engine/speculative.rs`), the prefill budget's charge for scored positions
//! (`engine/batcher/plan.rs`) and the benchmark's bounds (`bench/`) use.

/// Multiply-adds of the weight matrices one token runs through: the first `layers` blocks
/// (attention's 4 h² and the MLP's 8 h² projections each) and `heads` vocabulary heads
/// (V x h each). Biases, norms and embedding rows are left out (under 0.5 % of the total for
/// the released shapes).
pub fn weight_macs(hidden: usize, vocab: usize, layers: usize, heads: usize) -> f64 {
    let h = hidden as f64;
    layers as f64 * 12.0 * h * h + heads as f64 * vocab as f64 * h
}

/// Vocabulary-wide passes of one head evaluation besides its product, in multiply-add
/// equivalents per entry: the log-softmax's max, exp-sum and subtraction, top-k selection, an
/// inspection's entropy and divergence; exp and selection cost several each. On the tiny
/// fixture (h = 32), where these passes outweigh the product, one inspected position took
/// ~0.7 ms per head against ~0.1 ms for a plain prompt token.
const VOCAB_PASSES: f64 = 32.0;

/// What one prompt position costs of the prefill budget (counted in prompt tokens through
/// `layers` blocks) when `heads` vocabulary heads are evaluated at it: echo with logprobs, an
/// inspection of every position. 1 for a plain position; on GPT-Neo-125M's shape ~1.5 per
/// head, on the tiny fixture's ~65.
pub fn scored_position_cost(hidden: usize, vocab: usize, layers: usize, heads: usize) -> usize {
    let h = hidden as f64;
    let trunk = (layers.max(1) as f64 * 12.0 * h * h).max(1.0);
    let head = vocab as f64 * (h + VOCAB_PASSES);
    1 + (heads as f64 * head / trunk).ceil() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scored_position_costs_its_heads_against_the_trunk() {
        assert_eq!(scored_position_cost(768, 50257, 12, 0), 1);
        // GPT-Neo-125M: a head is ~0.47 of a token through 12 blocks
        assert_eq!(scored_position_cost(768, 50257, 12, 1), 2);
        assert_eq!(scored_position_cost(768, 50257, 12, 7), 5);
        // the tiny fixture: the vocabulary dominates
        assert_eq!(scored_position_cost(32, 50257, 4, 1), 1 + 66);
        // no blocks at all still divides by something
        assert!(scored_position_cost(32, 50257, 0, 1) > 1);
    }
}
