// Attention of single queries over the paged key/value pool (`paged_attention.rs`): one
// thread block per (query, head), however many sequences a step holds. A block loads its
// query, scores the keys its query sees into shared memory, takes their softmax and sums the
// values. Each (query, head) is computed the same way whatever else the launch holds, so a
// query's output does not depend on the batch.
//
// Compiled at start-up by NVRTC with no headers (bf16 is read as its 16 bits, widened by
// hand), so nothing but the driver's NVRTC library is needed.

#define THREADS 128

__device__ __forceinline__ float kv_load(const float* p) { return *p; }

__device__ __forceinline__ float kv_load(const unsigned short* p) {
    return __uint_as_float(((unsigned int)*p) << 16);
}

// The block's maximum or sum of `v`; `red` holds THREADS / 32 floats.
__device__ float block_reduce(float v, float* red, bool is_max) {
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, w) : v + w;
    }
    __syncthreads();  // an earlier reduction may still read `red`
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    v = red[0];
    for (int i = 1; i < THREADS / 32; ++i) v = is_max ? fmaxf(v, red[i]) : v + red[i];
    return v;
}

// q: (rows, heads * head_dim) float32, rows q_stride apart, multiplied by `scale` as it is
// read. pool_k, pool_v: (pool rows, heads *
// head_dim). tables: (tables, keys): the pool row of each key position. queries: (n, 3): the
// query's row of q, its table, and the end of its keys (its own position + 1). window: keys a
// query sees (itself included), 0 for all. out: (n, heads * head_dim). Every index is checked
// against its extent (q_rows, n_tables, keys, pool_rows): a bad one gives NaN, never a read
// outside the operands.
template <typename KV>
__device__ void attend(const float* __restrict__ q, const KV* __restrict__ pool_k,
                       const KV* __restrict__ pool_v, const unsigned int* __restrict__ tables,
                       const unsigned int* __restrict__ queries, float* __restrict__ out,
                       int heads, int head_dim, int keys, int window, int q_stride,
                       float scale, unsigned int q_rows, unsigned int n_tables,
                       unsigned int pool_rows) {
    extern __shared__ float shared[];
    float* qs = shared;             // head_dim
    float* scores = qs + head_dim;  // keys
    float* red = scores + keys;     // THREADS / 32
    const int query = blockIdx.x / heads, head = blockIdx.x % heads;
    const size_t width = (size_t)heads * head_dim, col = (size_t)head * head_dim;
    const unsigned int* spec = queries + 3 * query;
    const unsigned int row = spec[0], end = spec[2];
    const unsigned int first = (window > 0 && end > (unsigned int)window) ? end - window : 0;
    if (row >= q_rows || spec[1] >= n_tables || end > (unsigned int)keys || end == 0) {
        for (int d = threadIdx.x; d < head_dim; d += THREADS)
            out[(size_t)query * width + col + d] = __int_as_float(0x7fc00000);
        return;
    }
    const unsigned int* table = tables + (size_t)spec[1] * keys;

    for (int d = threadIdx.x; d < head_dim; d += THREADS) {
        qs[d] = q[(size_t)row * q_stride + col + d] * scale;
    }
    __syncthreads();
    float local = -__int_as_float(0x7f800000);
    for (unsigned int j = first + threadIdx.x; j < end; j += THREADS) {
        float s = __int_as_float(0x7fc00000);
        if (table[j] < pool_rows) {
            const KV* k = pool_k + table[j] * width + col;
            s = 0.f;
            for (int d = 0; d < head_dim; ++d) s += qs[d] * kv_load(k + d);
        }
        scores[j] = s;
        local = fmaxf(local, s);
    }
    const float m = block_reduce(local, red, true);
    float sum = 0.f;
    for (unsigned int j = first + threadIdx.x; j < end; j += THREADS) {
        const float e = expf(scores[j] - m);
        scores[j] = e;
        sum += e;
    }
    sum = block_reduce(sum, red, false);  // its barriers also publish `scores`
    for (int d = threadIdx.x; d < head_dim; d += THREADS) {
        float acc = 0.f;
        for (unsigned int j = first; j < end; ++j) {
            const unsigned int r = table[j] < pool_rows ? table[j] : 0;
            acc += scores[j] * kv_load(pool_v + r * width + col + d);
        }
        out[(size_t)query * width + col + d] = acc / sum;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
paged_attention_f32(const float* q, const float* pool_k, const float* pool_v,
                    const unsigned int* tables, const unsigned int* queries, float* out,
                    int heads, int head_dim, int keys, int window, int q_stride, float scale,
                    unsigned int q_rows, unsigned int n_tables, unsigned int pool_rows) {
    attend<float>(q, pool_k, pool_v, tables, queries, out, heads, head_dim, keys, window,
                  q_stride, scale, q_rows, n_tables, pool_rows);
}

extern "C" __global__ void __launch_bounds__(THREADS)
paged_attention_bf16(const float* q, const unsigned short* pool_k, const unsigned short* pool_v,
                     const unsigned int* tables, const unsigned int* queries, float* out,
                     int heads, int head_dim, int keys, int window, int q_stride,
                     float scale, unsigned int q_rows, unsigned int n_tables,
                     unsigned int pool_rows) {
    attend<unsigned short>(q, pool_k, pool_v, tables, queries, out, heads, head_dim, keys,
                           window, q_stride, scale, q_rows, n_tables, pool_rows);
}

// float32 -> bfloat16 bits, rounding to nearest even (NaN stays a quiet NaN), as candle's
// conversion rounds.
__device__ __forceinline__ unsigned short to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

__device__ __forceinline__ void kv_store(float* p, float f) { *p = f; }
__device__ __forceinline__ void kv_store(unsigned short* p, float f) { *p = to_bf16(f); }

// Writes row i of src (rows of `width` floats, `src_stride` apart: a view of the q/k/v
// projection) to pool row rows[i]: a step's keys or values into the cache, in one launch
// and without a contiguous copy. A row index outside the pool writes nothing.
template <typename KV>
__device__ void store(const float* __restrict__ src, const unsigned int* __restrict__ rows,
                      KV* __restrict__ pool, int width, int src_stride, unsigned int pool_rows) {
    const unsigned int i = blockIdx.x, r = rows[i];
    if (r >= pool_rows) return;
    for (int c = threadIdx.x; c < width; c += THREADS) {
        kv_store(pool + (size_t)r * width + c, src[(size_t)i * src_stride + c]);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
store_rows_f32(const float* src, const unsigned int* rows, float* pool, int width,
               int src_stride, unsigned int pool_rows) {
    store<float>(src, rows, pool, width, src_stride, pool_rows);
}

extern "C" __global__ void __launch_bounds__(THREADS)
store_rows_bf16(const float* src, const unsigned int* rows, unsigned short* pool, int width,
                int src_stride, unsigned int pool_rows) {
    store<unsigned short>(src, rows, pool, width, src_stride, pool_rows);
}
