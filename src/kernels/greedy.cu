// Each row's greedy choice on the device (`greedy.rs`): the first position of the row's
// maximum, NaN never winning (0 when no element is a number), as the host's `argmax` chooses.
// One block per row; the host then copies one index per row instead of the vocabulary.

#define THREADS 256

extern "C" __global__ void __launch_bounds__(THREADS)
argmax_rows(const float* __restrict__ logits, unsigned int* __restrict__ out,
            unsigned int vocab) {
    __shared__ float best[THREADS / 32];
    __shared__ unsigned int first[THREADS / 32];
    const float* row = logits + (size_t)blockIdx.x * vocab;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    float m = -__int_as_float(0x7f800000);
    for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) m = fmaxf(m, row[i]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0) best[warp] = m;
    __syncthreads();
    m = best[0];
    for (int w = 1; w < THREADS / 32; ++w) m = fmaxf(m, best[w]);

    unsigned int at = 0xffffffffu;
    for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) {
        if (row[i] == m) {
            at = i;
            break;  // a thread's positions ascend: its first is its least
        }
    }
    for (int o = 16; o > 0; o >>= 1) at = min(at, __shfl_xor_sync(0xffffffffu, at, o));
    if (lane == 0) first[warp] = at;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < THREADS / 32; ++w) at = min(at, first[w]);
        out[blockIdx.x] = at == 0xffffffffu ? 0u : at;
    }
}
