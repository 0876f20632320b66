// Greedy choices on the device (`greedy.rs`), one block per row, so that the host copies one
// index per sequence instead of its heads' vocabulary rows:
// - `argmax_rows`: the first position of a row's maximum, NaN never winning (0 when no
//   element is a number), as the host's `argmax` chooses;
// - `contrast_rows`: autocontrastive greedy, the first position of the largest
//   log p_u - log p_l among the tokens with log p_u >= ln(alpha) + max log p_u, each term
//   written in the host's order of operations (`greedy::contrast_choice`).

#define THREADS 256
#define NONE 0xffffffffu

// The block's maximum of `v` (every thread gets it); `scratch` holds THREADS / 32 floats.
__device__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();  // `scratch` may still be read from a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = scratch[0];
    for (int w = 1; w < THREADS / 32; ++w) v = fmaxf(v, scratch[w]);
    return v;
}

// The block's sum of `v` (every thread gets it, summed in the same order).
template <typename T>
__device__ T block_sum(T v, T* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = scratch[0];
    for (int w = 1; w < THREADS / 32; ++w) v += scratch[w];
    return v;
}

// The first position among the block's candidates (`best`, `at`: each thread's largest and
// its first position, NONE for none) of the largest value; thread 0 gets it.
__device__ unsigned int block_first_best(float best, unsigned int at, float* values,
                                         unsigned int* positions) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        const float b = __shfl_xor_sync(0xffffffffu, best, o);
        const unsigned int a = __shfl_xor_sync(0xffffffffu, at, o);
        if (a != NONE && (at == NONE || b > best || (b == best && a < at))) {
            best = b;
            at = a;
        }
    }
    __syncthreads();
    if (lane == 0) {
        values[warp] = best;
        positions[warp] = at;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < THREADS / 32; ++w) {
            const float b = values[w];
            const unsigned int a = positions[w];
            if (a != NONE && (at == NONE || b > best || (b == best && a < at))) {
                best = b;
                at = a;
            }
        }
    }
    return at;
}

// The maxima and log-sum-exps of two rows `x` and `y` (every thread gets them), as the host's
// `log_sum_exp` finds them up to the order of the sum.
struct PairNorms {
    float max_x, lse_x, max_y, lse_y;
};

__device__ PairNorms pair_norms(const float* x, const float* y, unsigned int vocab,
                                float* scratch) {
    const float inf = __int_as_float(0x7f800000);
    float mx = -inf, my = -inf;
    for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) {
        mx = fmaxf(mx, x[i]);
        my = fmaxf(my, y[i]);
    }
    mx = block_max(mx, scratch);
    my = block_max(my, scratch);
    float sx = 0.f, sy = 0.f;
    for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) {
        sx += expf(x[i] - mx);
        sy += expf(y[i] - my);
    }
    PairNorms n;
    n.max_x = mx;
    n.lse_x = mx + logf(block_sum(sx, scratch));
    n.max_y = my;
    n.lse_y = my + logf(block_sum(sy, scratch));
    return n;
}

extern "C" __global__ void __launch_bounds__(THREADS)
argmax_rows(const float* __restrict__ logits, unsigned int* __restrict__ out,
            unsigned int vocab) {
    __shared__ float values[THREADS / 32];
    __shared__ unsigned int positions[THREADS / 32];
    const float* row = logits + (size_t)blockIdx.x * vocab;

    float m = -__int_as_float(0x7f800000);
    for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) m = fmaxf(m, row[i]);
    m = block_max(m, values);

    unsigned int at = NONE;
    for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) {
        if (row[i] == m) {
            at = i;
            break;  // a thread's positions ascend: its first is its least
        }
    }
    at = block_first_best(m, at, values, positions);
    if (threadIdx.x == 0) out[blockIdx.x] = at == NONE ? 0u : at;
}

// Row r's choice from `upper` and `lower` rows r, `ln_alpha[r]` its plausibility threshold
// below the upper head's top log-probability (-inf: every token plausible).
extern "C" __global__ void __launch_bounds__(THREADS)
contrast_rows(const float* __restrict__ upper, const float* __restrict__ lower,
              const float* __restrict__ ln_alpha, unsigned int* __restrict__ out,
              unsigned int vocab) {
    __shared__ float values[THREADS / 32];
    __shared__ unsigned int positions[THREADS / 32];
    const float* u = upper + (size_t)blockIdx.x * vocab;
    const float* l = lower + (size_t)blockIdx.x * vocab;
    const PairNorms n = pair_norms(u, l, vocab, values);
    const float lse_u = n.lse_x, lse_l = n.lse_y;
    const float t = ln_alpha[blockIdx.x] + (n.max_x - lse_u);

    float best = -__int_as_float(0x7f800000);
    unsigned int at = NONE;
    for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) {
        const float lp = u[i] - lse_u;
        if (lp >= t) {
            const float d = lp - (l[i] - lse_l);
            if (d > best || (at == NONE && d == best)) {  // NaN never wins
                best = d;
                at = i;
            }
        }
    }
    at = block_first_best(best, at, values, positions);
    if (threadIdx.x == 0) out[blockIdx.x] = at == NONE ? 0u : at;
}

// Row r's softmax margin, top-1 minus top-2 probability (early exit's confidence): the second
// is the largest value but one occurrence of the first (a tie at the top: margin 0), NaN
// skipped, as the host's `softmax_margin` finds them.
extern "C" __global__ void __launch_bounds__(THREADS)
margin_rows(const float* __restrict__ logits, float* __restrict__ out, unsigned int vocab) {
    __shared__ float values[THREADS / 32];
    const float* row = logits + (size_t)blockIdx.x * vocab;
    const float inf = __int_as_float(0x7f800000);

    float first = -inf;
    for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) first = fmaxf(first, row[i]);
    first = block_max(first, values);
    float second = -inf, tops = 0.f, z = 0.f;
    for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) {
        const float x = row[i];
        if (x == first) tops += 1.f;
        else second = fmaxf(second, x);
        z += expf(x - first);
    }
    second = block_max(second, values);
    tops = block_sum(tops, values);
    z = block_sum(z, values);
    if (tops > 1.f) second = first;
    if (threadIdx.x == 0) out[blockIdx.x] = (1.f - expf(second - first)) / z;
}

// Row r's divergence between the softmaxes of `mature` and `premature` rows r, as
// transformers' DoLa computes it: with a, b the rows' log-softmax (float32) and m their
// probabilities' average, the sum of m (2 ln m - a - b) over the tokens with m > 0, in double
// precision, as the host's `dola_divergence`.
extern "C" __global__ void __launch_bounds__(THREADS)
divergence_rows(const float* __restrict__ mature, const float* __restrict__ premature,
                double* __restrict__ out, unsigned int vocab) {
    __shared__ float values[THREADS / 32];
    __shared__ double sums[THREADS / 32];
    const float* x = mature + (size_t)blockIdx.x * vocab;
    const float* y = premature + (size_t)blockIdx.x * vocab;
    const PairNorms n = pair_norms(x, y, vocab, values);
    const float lse_x = n.lse_x, lse_y = n.lse_y;
    double d = 0.0;
    for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) {
        const double a = (double)(x[i] - lse_x), b = (double)(y[i] - lse_y);
        const double m = 0.5 * (exp(a) + exp(b));
        if (m > 0.0) d += m * (2.0 * log(m) - a - b);
    }
    d = block_sum(d, sums);
    if (threadIdx.x == 0) out[blockIdx.x] = d;
}
