// What follows a projection's matrix product (`fused_epilogue.rs`): the bias, the activation,
// the residual sum, the next layer norm and the conversion to the dtype the next product reads,
// in one launch where candle runs one kernel for each.
//
// Compiled at start-up by NVRTC with no headers: 16-bit floats are read and written as their
// bits (bfloat16 widened and rounded by hand, float16 through PTX's cvt), and each operand's
// dtype is an argument (0 float32, 1 bfloat16, 2 float16), the same for a whole launch, so one
// kernel serves every pair of dtypes.

#define THREADS 256

__device__ __forceinline__ float load(const void* p, int dtype, size_t i) {
    if (dtype == 0) return ((const float*)p)[i];
    const unsigned short b = ((const unsigned short*)p)[i];
    if (dtype == 1) return __uint_as_float(((unsigned int)b) << 16);
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
    return f;
#else  // the tests' CPU emulation (`cuda_emulator.hpp`)
    return emu::half_to_float(b);
#endif
}

// Rounds to nearest even, as candle converts (a NaN stays a quiet NaN).
__device__ __forceinline__ void store(void* p, int dtype, size_t i, float f) {
    if (dtype == 0) {
        ((float*)p)[i] = f;
    } else if (dtype == 1) {
        unsigned int u = __float_as_uint(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            u = (u >> 16) | 0x40u;
        } else {
            u = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        }
        ((unsigned short*)p)[i] = (unsigned short)u;
    } else {
#ifdef __CUDA_ARCH__
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
        ((unsigned short*)p)[i] = h;
#else  // the tests' CPU emulation (`cuda_emulator.hpp`)
        ((unsigned short*)p)[i] = emu::float_to_half(f);
#endif
    }
}

// The activations of `Activation` (`fused_epilogue.rs`), as candle's unary kernels compute them.
__device__ __forceinline__ float activate(float x, int act) {
    switch (act) {
        case 1: return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
        case 2: return 0.5f * x * (1.f + erff(x * 0.7071067811865476f));
        case 3: return fmaxf(x, 0.f);
        case 4: return x / (1.f + expf(-x));
        default: return x;
    }
}

// out = act(y + bias) + residual, residual = (ry + rbias) + rx; every operand but y and out may
// be null (rbias and rx only with ry... or rx alone). y and ry (rows, cols) in dtype y_t, bias
// and rbias (cols) and rx (rows, cols) float32, out (rows, cols) in out_t; all contiguous.
extern "C" __global__ void __launch_bounds__(THREADS)
fused_epilogue(const void* y, int y_t, const float* bias, int act, const void* ry,
               const float* rbias, const float* rx, void* out, int out_t, unsigned int rows,
               unsigned int cols) {
    const size_t n = (size_t)rows * cols;
    for (size_t i = (size_t)blockIdx.x * THREADS + threadIdx.x; i < n;
         i += (size_t)gridDim.x * THREADS) {
        const unsigned int c = (unsigned int)(i % cols);
        float v = load(y, y_t, i);
        if (bias) v += bias[c];
        v = activate(v, act);
        if (ry) {
            float r = load(ry, y_t, i);
            if (rbias) r += rbias[c];
            if (rx) r += rx[i];
            v += r;
        } else if (rx) {
            v += rx[i];
        }
        store(out, out_t, i, v);
    }
}

// The block's sum of `v`; `red` holds THREADS / 32 floats.
__device__ float block_sum(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();  // an earlier reduction may still read `red`
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    v = red[0];
    for (int i = 1; i < THREADS / 32; ++i) v += red[i];
    return v;
}

// out = LayerNorm(h) (weight w, bias b), h = (y + bias) + x, one block per row: the mean and
// variance in one pass (E[h^2] - E[h]^2, as candle's layer_norm), h recomputed from its terms
// when read again (never written). bias, x and b may be null.
extern "C" __global__ void __launch_bounds__(THREADS)
fused_add_norm(const void* y, int y_t, const float* bias, const float* x, const float* w,
               const float* b, float eps, void* out, int out_t, unsigned int cols) {
    __shared__ float red[THREADS / 32];
    const size_t row = (size_t)blockIdx.x * cols;
    float sum = 0.f, sum2 = 0.f;
    for (unsigned int c = threadIdx.x; c < cols; c += THREADS) {
        float h = load(y, y_t, row + c);
        if (bias) h += bias[c];
        if (x) h += x[row + c];
        sum += h;
        sum2 += h * h;
    }
    sum = block_sum(sum, red);
    sum2 = block_sum(sum2, red);
    const float mean = sum / cols;
    const float inv_std = 1.f / sqrtf(sum2 / cols - mean * mean + eps);
    for (unsigned int c = threadIdx.x; c < cols; c += THREADS) {
        float h = load(y, y_t, row + c);
        if (bias) h += bias[c];
        if (x) h += x[row + c];
        float v = (h - mean) * inv_std * w[c];
        if (b) v += b[c];
        store(out, out_t, row + c, v);
    }
}
