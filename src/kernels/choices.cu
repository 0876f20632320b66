// The choices a step makes where the logits are (`greedy.rs`, `sample.rs`, `logprob.rs`,
// `sled.rs`), one
// block per row, so that the host copies one index (or a few numbers) per sequence instead of
// its heads' vocabulary rows:
// - `argmax_rows`: the first position of a row's maximum, NaN never winning (0 when no
//   element is a number), as the host's `argmax` chooses;
// - `contrast_rows`: a contrast's greedy choice (autocontrast's, or DoLa's over its mature
//   head and chosen candidate: a floor of one), the first position of the largest
//   log p_u - log p_l inside the plausible set (log p_u >= min(ln(alpha) + max log p_u, the
//   k-th largest log p_u)), each term written in the host's order of operations
//   (`greedy::contrast_choice`);
// - `margin_rows`, `divergence_rows`: early exit's confidence, DoLa's divergence;
// - `sample_rows`, `contrast_sample_rows`: a draw (temperature, top-k, top-p, its uniform
//   number) from a row's log-softmax or a contrast's scores (autocontrast's log q, DoLa's
//   logits), as the host's `sample::draw`;
// - `logprob_rows`, `contrast_logprob_rows`: a row's log-softmax (a contrast's log q, the
//   log-softmax of DoLa's logits) at one token and its largest values (`logprob.rs`), what
//   echo's scoring reads of a prompt position and a request's `logprobs` of a token chosen
//   here.
// - `sled_rows`: SLED's candidates and their evolved logits (`sled.rs`), what a SLED sequence
//   reads of its heads' rows.
// A contrast's rule is three floats (`greedy::ContrastRule::params`): ln(alpha) (DoLa's
// ln(relative_top)), the candidate floor, the kind (0 autocontrast, 1 DoLa).

#define THREADS 256
#define NONE 0xffffffffu

// e^x for x <= 0 in a normaliser's sum, as the host's `fastmath::exp_neg`: 0 below -87, and
// NaN (a NaN logit, or inf - inf at an infinite maximum) taken as -87, so that a NaN logit
// adds nothing to speak of and a row's log-sum-exp stays what the host's is.
__device__ __forceinline__ float exp_neg(float x) { return x < -87.f ? 0.f : expf(fmaxf(x, -87.f)); }

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
        sx += exp_neg(x[i] - mx);
        sy += exp_neg(y[i] - my);
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

// A float's bits as an unsigned key in the float's order (-0 below +0, as Rust's total_cmp).
__device__ __forceinline__ unsigned int order_key(float f) {
    const unsigned int b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The float whose `order_key` is `key`.
__device__ __forceinline__ float key_float(unsigned int key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// The k-th largest of x[i] - shift over the row, NaN left out (-inf where fewer than k numbers
// are): bisection over the keys for the largest key at or above which k values lie (key 0,
// a NaN's, where none does). Every thread gets it.
__device__ float kth_largest(const float* x, float shift, unsigned int vocab, unsigned int k,
                             double* sums) {
    unsigned int lo = 0u, hi = 0xffffffffu;
    while (lo < hi) {
        const unsigned int mid = lo + (hi - lo) / 2u + 1u;
        double count = 0.0;
        for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) {
            const float v = x[i] - shift;
            if (!isnan(v) && order_key(v) >= mid) count += 1.0;
        }
        if (block_sum(count, sums) >= (double)k) lo = mid;
        else hi = mid - 1u;
    }
    return lo == 0u ? -__int_as_float(0x7f800000) : key_float(lo);
}

// A contrast's plausibility threshold on log p_u: min(ln(alpha) + max log p_u, the k-th
// largest log p_u) for a candidate floor k, as the host's `ContrastTerms`.
__device__ float contrast_threshold(const float* u, float max_u, float lse_u, float ln_alpha,
                                    float floor, unsigned int vocab, double* sums) {
    const float max_lp = max_u - lse_u;
    const unsigned int k = (unsigned int)fminf(fmaxf(floor, 1.f), (float)vocab);
    const float kth = k > 1u ? kth_largest(u, lse_u, vocab, k, sums) : max_lp;
    return fminf(ln_alpha + max_lp, kth);
}

// Row r's choice from `upper` and `lower` rows r with `rules` row r: ln(alpha) (-inf: every
// token plausible), the candidate floor, the kind (DoLa's set is autocontrast's with a floor of
// one, and its logits a monotone function of the same difference inside it).
extern "C" __global__ void __launch_bounds__(THREADS)
contrast_rows(const float* __restrict__ upper, const float* __restrict__ lower,
              const float* __restrict__ rules, unsigned int* __restrict__ out,
              unsigned int vocab) {
    __shared__ float values[THREADS / 32];
    __shared__ unsigned int positions[THREADS / 32];
    __shared__ double sums[THREADS / 32];
    const float* u = upper + (size_t)blockIdx.x * vocab;
    const float* l = lower + (size_t)blockIdx.x * vocab;
    const PairNorms n = pair_norms(u, l, vocab, values);
    const float lse_u = n.lse_x, lse_l = n.lse_y;
    const float t = contrast_threshold(u, n.max_x, lse_u, rules[3 * blockIdx.x],
                                       rules[3 * blockIdx.x + 1], vocab, sums);

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
        z += exp_neg(x - first);
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


// The scores a draw reads of one head's row: its log-softmax.
struct HeadScores {
    const float* x;
    float lse;
    __device__ float operator()(unsigned int i) const { return x[i] - lse; }
};

// The scores a draw reads of a contrast's pair of rows, as the host's `contrast_log_q`:
// inside the plausible set log p_u - log p_l - offset + log_mass, outside it log p_u.
struct ContrastScores {
    const float* u;
    const float* l;
    float lse_u, lse_l, threshold, offset, log_mass;
    __device__ float operator()(unsigned int i) const {
        const float lp = u[i] - lse_u;
        return lp >= threshold ? (lp - (l[i] - lse_l)) - offset + log_mass : lp;
    }
};

// DoLa's logits of its mature (`m`) and chosen premature (`p`) rows, as the host's
// `dola_scores`: log p_m - log p_p inside the relative top, -inf outside (a NaN stays NaN);
// less `offset`: 0 for a draw, which reads the logits as they are (x - 0 is x), their
// log-sum-exp for a read of their log-softmax.
struct DolaScores {
    const float* m;
    const float* p;
    float lse_m, lse_p, threshold, offset;
    __device__ float operator()(unsigned int i) const {
        const float lp = m[i] - lse_m;
        if (lp < threshold) return -__int_as_float(0x7f800000);
        return (lp - (p[i] - lse_p)) - offset;
    }
};

// What a draw reads of each token: its score, whether it is a candidate, its weight
// e^((score - top) / temperature). The top-k and top-p cuts: a token is kept with a key
// above the cut's key, or equal to it at an id up to the cut's last id (ties go to the lower
// ids); key 0 (below every finite score) and last 0 keep everything.
template <typename S>
struct DrawRow {
    S score;
    float top, temperature;
    unsigned int k_key, k_last, p_key, p_last;

    __device__ bool in_top_k(float s, unsigned int i) const {
        const unsigned int k = order_key(s);
        return isfinite(s) && (k > k_key || (k == k_key && i <= k_last));
    }
    __device__ bool kept(float s, unsigned int i) const {
        const unsigned int k = order_key(s);
        return in_top_k(s, i) && (k > p_key || (k == p_key && i <= p_last));
    }
    __device__ float weight(float s) const { return expf((s - top) / temperature); }
};

// The block's sum over the top-k candidates so far with a key >= `key`: their count (`mass`
// false) or weight. Every thread gets it.
template <typename S>
__device__ double mass_from(const DrawRow<S>& r, unsigned int vocab, unsigned int key,
                            bool mass, double* sums) {
    double v = 0.0;
    for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) {
        const float s = r.score(i);
        if (r.in_top_k(s, i) && order_key(s) >= key) v += mass ? (double)r.weight(s) : 1.0;
    }
    return block_sum(v, sums);
}

// The largest key whose candidates at or above it reach `target` (a count or a weight):
// bisection over the 32-bit keys, each step one pass over the row.
template <typename S>
__device__ unsigned int cut_key(const DrawRow<S>& r, unsigned int vocab, double target,
                                bool mass, double* sums) {
    unsigned int lo = 0u, hi = 0xffffffffu;
    while (lo < hi) {
        const unsigned int mid = lo + (hi - lo) / 2u + 1u;
        if (mass_from(r, vocab, mid, mass, sums) >= target) lo = mid;
        else hi = mid - 1u;
    }
    return lo;
}

// The id of the last tie (a candidate with key `key`) the cut keeps: ties are taken in id
// order until the candidates above the key (`above`) and the ties taken reach `target`.
// Thread t sums ids [t * seg, (t + 1) * seg); thread 0 walks the segment sums to the one
// where the target is reached, and that segment's ties. Every thread gets the id (the last
// tie when rounding never reaches the target).
template <typename S>
__device__ unsigned int last_tie(const DrawRow<S>& r, unsigned int vocab, unsigned int key,
                                 double above, double target, bool mass, double* seg_sums,
                                 unsigned int* result) {
    const unsigned int seg = (vocab + THREADS - 1) / THREADS;
    const unsigned int begin = min(threadIdx.x * seg, vocab), end = min(begin + seg, vocab);
    double v = 0.0;
    for (unsigned int i = begin; i < end; ++i) {
        const float s = r.score(i);
        if (r.in_top_k(s, i) && order_key(s) == key) v += mass ? (double)r.weight(s) : 1.0;
    }
    seg_sums[threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        double acc = above;
        unsigned int at = THREADS;  // the segment where the target is reached
        unsigned int last_seg = 0;  // the last segment with ties
        for (unsigned int t = 0; t < THREADS; ++t) {
            if (seg_sums[t] == 0.0) continue;
            last_seg = t;
            if (acc + seg_sums[t] >= target) {
                at = t;
                break;
            }
            acc += seg_sums[t];
        }
        const unsigned int t = at < THREADS ? at : last_seg;
        const unsigned int b = min(t * seg, vocab), e = min(b + seg, vocab);
        unsigned int last = 0u;
        for (unsigned int i = b; i < e; ++i) {
            const float s = r.score(i);
            if (r.in_top_k(s, i) && order_key(s) == key) {
                last = i;
                acc += mass ? (double)r.weight(s) : 1.0;
                if (at < THREADS && acc >= target) break;
            }
        }
        *result = last;
    }
    __syncthreads();
    const unsigned int last = *result;
    __syncthreads();
    return last;
}

// The draw from `score` over a row of `vocab` tokens with `p`: temperature, top_k (0: none),
// top_p (>= 1: none), u in [0, 1), as the host's `sample::draw`: the candidates are the
// finite scores, the top_k best (ties to the lower ids), then the smallest best-first set of
// those reaching top_p of their weight; the pick is the candidate at u of their cumulative
// weight in id order (thread segments summed, then walked by thread 0). Nothing finite: the
// first maximum. Thread 0 writes it to `out`.
template <typename S>
__device__ void draw_row(S score, const double* p, unsigned int vocab, unsigned int* out) {
    __shared__ float values[THREADS / 32];
    __shared__ unsigned int positions[THREADS / 32];
    __shared__ double sums[THREADS / 32];
    __shared__ double seg_sums[THREADS];
    __shared__ unsigned int result;
    const float inf = __int_as_float(0x7f800000);
    DrawRow<S> r;
    r.score = score;
    r.temperature = (float)p[0];
    const double top_k = p[1], top_p = p[2], u = p[3];

    // the best finite score, and how many there are
    float top = -inf;
    double finite = 0.0;
    for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) {
        const float s = score(i);
        if (isfinite(s)) {
            top = fmaxf(top, s);
            finite += 1.0;
        }
    }
    r.top = block_max(top, values);
    finite = block_sum(finite, sums);
    if (finite == 0.0) {
        // the first maximum of the scores, as greedy (0 when none is a number)
        float best = -inf;
        for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) best = fmaxf(best, score(i));
        best = block_max(best, values);
        unsigned int at = NONE;
        for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) {
            if (score(i) == best) {
                at = i;
                break;
            }
        }
        at = block_first_best(best, at, values, positions);
        if (threadIdx.x == 0) *out = at == NONE ? 0u : at;
        return;
    }

    // every finite score a candidate until a cut says otherwise
    r.k_key = r.k_last = r.p_key = r.p_last = 0u;
    if (top_k > 0.0 && top_k < finite) {
        const unsigned int key = cut_key(r, vocab, top_k, false, sums);
        const double above = key == 0xffffffffu ? 0.0 : mass_from(r, vocab, key + 1u, false, sums);
        r.k_last = last_tie(r, vocab, key, above, top_k, false, seg_sums, &result);
        r.k_key = key;
    }
    if (top_p < 1.0) {
        const double target = mass_from(r, vocab, 0u, true, sums) * top_p;
        const unsigned int key = cut_key(r, vocab, target, true, sums);
        const double above = key == 0xffffffffu ? 0.0 : mass_from(r, vocab, key + 1u, true, sums);
        r.p_last = last_tie(r, vocab, key, above, target, true, seg_sums, &result);
        r.p_key = key;
    }

    // the pick: the candidate at u of the kept weight, in id order
    const unsigned int seg = (vocab + THREADS - 1) / THREADS;
    const unsigned int begin = min(threadIdx.x * seg, vocab), end = min(begin + seg, vocab);
    double v = 0.0;
    for (unsigned int i = begin; i < end; ++i) {
        const float s = score(i);
        if (r.kept(s, i)) v += (double)r.weight(s);
    }
    seg_sums[threadIdx.x] = v;
    const double total = block_sum(v, sums);  // synchronises: every segment's sum is written
    if (threadIdx.x == 0) {
        // as the host's cumulative scan: whole segments while u lies past them, then the one
        // it lies in, weight by weight
        double rest = u * total;
        unsigned int at = THREADS, last_seg = THREADS;
        for (unsigned int t = 0; t < THREADS; ++t) {
            if (seg_sums[t] == 0.0) continue;
            last_seg = t;
            if (rest < seg_sums[t]) {
                at = t;
                break;
            }
            rest -= seg_sums[t];
        }
        // rounding past the total: the last kept token
        const unsigned int t = at < THREADS ? at : last_seg;
        unsigned int pick = 0u;
        if (t < THREADS) {
            const unsigned int b = min(t * seg, vocab), e = min(b + seg, vocab);
            for (unsigned int i = b; i < e; ++i) {
                const float s = score(i);
                if (!r.kept(s, i)) continue;
                const double w = (double)r.weight(s);
                if (w <= 0.0) continue;
                pick = i;  // the segment's sums rounded above its scan: its last weighted one
                if (at < THREADS && rest < w) break;
                rest -= w;
            }
        }
        *out = pick;
    }
}

// The log-sum-exp of `f` over a row (every thread gets it), as the host's `log_sum_exp` finds
// it (up to the order of the sum): its maximum, then the sum of e^(f(i) - max).
template <typename F>
__device__ float block_log_sum_exp(const F& f, unsigned int vocab, float* scratch) {
    float m = -__int_as_float(0x7f800000);
    for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) m = fmaxf(m, f(i));
    m = block_max(m, scratch);
    float z = 0.f;
    for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) z += exp_neg(f(i) - m);
    return m + logf(block_sum(z, scratch));
}

// A row's log-softmax: its normaliser.
__device__ HeadScores head_scores(const float* x, unsigned int vocab, float* scratch) {
    HeadScores score;
    score.x = x;
    score.lse = 0.f;  // the row itself: x - 0 is x
    score.lse = block_log_sum_exp(score, vocab, scratch);
    return score;
}

// A contrast's scores of a pair of rows with ln(alpha) and the candidate floor: the norms,
// the plausibility threshold, the set's largest log p_u - log p_l and both normalisers, as
// the host's `contrast_log_q` finds them.
__device__ ContrastScores contrast_scores(const float* u, const float* l, float ln_alpha,
                                          float floor, unsigned int vocab, float* scratch,
                                          double* sums) {
    ContrastScores q;
    q.u = u;
    q.l = l;
    const PairNorms n = pair_norms(u, l, vocab, scratch);
    q.lse_u = n.lse_x;
    q.lse_l = n.lse_y;
    const float max_lp = n.max_x - n.lse_x;
    q.threshold = contrast_threshold(u, n.max_x, q.lse_u, ln_alpha, floor, vocab, sums);
    const float inf = __int_as_float(0x7f800000);
    float diff_max = -inf;
    for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) {
        const float lp = u[i] - q.lse_u;
        if (lp >= q.threshold) diff_max = fmaxf(diff_max, lp - (l[i] - q.lse_l));
    }
    diff_max = block_max(diff_max, scratch);
    // fminf(NaN, 0) is 0, as the host's `contrast_sums`: the term of a lower head's -inf inside
    // the set (inf - inf) counts as the maximum it is
    float diff_sum = 0.f, mass_sum = 0.f;
    for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) {
        const float lp = u[i] - q.lse_u;
        if (lp >= q.threshold) {
            diff_sum += exp_neg(fminf(lp - (l[i] - q.lse_l) - diff_max, 0.f));
            mass_sum += exp_neg(fminf(lp - max_lp, 0.f));
        }
    }
    q.offset = diff_max + logf(block_sum(diff_sum, scratch));
    q.log_mass = max_lp + logf(block_sum(mass_sum, scratch));
    return q;
}

// DoLa's logits of a pair of rows with ln(relative_top): the norms and the relative top's
// threshold (autocontrast's with a floor of one), as the host's `dola_scores` finds them;
// `normalise`: less their log-sum-exp, as the host's `log_softmax` of them.
__device__ DolaScores dola_scores(const float* m, const float* p, float ln_relative_top,
                                  bool normalise, unsigned int vocab, float* scratch,
                                  double* sums) {
    DolaScores q;
    q.m = m;
    q.p = p;
    q.offset = 0.f;
    const PairNorms n = pair_norms(m, p, vocab, scratch);
    q.lse_m = n.lse_x;
    q.lse_p = n.lse_y;
    q.threshold = contrast_threshold(m, n.max_x, q.lse_m, ln_relative_top, 1.f, vocab, sums);
    // the logits themselves while the offset is 0
    if (normalise) q.offset = block_log_sum_exp(q, vocab, scratch);
    return q;
}

// Row r's draw from the log-softmax of `logits` row r with `params` row r: temperature,
// top_k, top_p, u (`draw_row`).
extern "C" __global__ void __launch_bounds__(THREADS)
sample_rows(const float* __restrict__ logits, const double* __restrict__ params,
            unsigned int* __restrict__ out, unsigned int vocab) {
    __shared__ float scratch[THREADS / 32];
    const HeadScores score = head_scores(logits + (size_t)blockIdx.x * vocab, vocab, scratch);
    draw_row(score, params + (size_t)blockIdx.x * 4, vocab, out + blockIdx.x);
}

// Row r's draw from the contrast's scores of `upper` and `lower` rows r with `params` row r:
// temperature, top_k, top_p, u (`draw_row`), then its rule (autocontrast's log q, or DoLa's
// logits).
extern "C" __global__ void __launch_bounds__(THREADS)
contrast_sample_rows(const float* __restrict__ upper, const float* __restrict__ lower,
                     const double* __restrict__ params, unsigned int* __restrict__ out,
                     unsigned int vocab) {
    __shared__ float scratch[THREADS / 32];
    __shared__ double sums[THREADS / 32];
    const double* p = params + (size_t)blockIdx.x * 7;
    const float* u = upper + (size_t)blockIdx.x * vocab;
    const float* l = lower + (size_t)blockIdx.x * vocab;
    if (p[6] != 0.0) {
        draw_row(dola_scores(u, l, (float)p[4], false, vocab, scratch, sums), p, vocab,
                 out + blockIdx.x);
    } else {
        draw_row(contrast_scores(u, l, (float)p[4], (float)p[5], vocab, scratch, sums), p, vocab,
                 out + blockIdx.x);
    }
}

// The block's largest of `v` (every thread gets it); `scratch` holds THREADS / 32 of them.
__device__ unsigned long long block_max_key(unsigned long long v, unsigned long long* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = scratch[0];
    for (int w = 1; w < THREADS / 32; ++w) v = scratch[w] > v ? scratch[w] : v;
    return v;
}

// The key of the next place of a row's best `score` values, best first: the largest (order key
// of the value, complement of the id) of the row (`first`) or below the last place's key
// (`below`); ties go to the lower id, and a 64-bit key is never 0 (an id below 2^24), so 0
// means none left. A pass over the row per place; every thread gets it.
template <typename S>
__device__ unsigned long long next_best(const S& score, bool first, unsigned long long below,
                                        unsigned int vocab, unsigned long long* keys) {
    unsigned long long best = 0ull;
    for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) {
        const unsigned long long k =
            ((unsigned long long)order_key(score(i)) << 32) | (0xffffffffu - i);
        if ((first || k < below) && k > best) best = k;
    }
    return block_max_key(best, keys);
}

// What a request reads of a row's log-distribution `score` (`logprob.rs`): at `target` (NaN
// for an id past the row), then its `top` largest values best first, then their ids as
// floats (NaN and -1 past the row's end), in the host's order: `total_cmp` of the values (NaN
// above every number), ties to the lower id. Each value is the host's expression
// (`HeadScores`, `ContrastScores`), so a difference in a normaliser's last bits moves every
// value alike. The top takes a pass per place (`next_best`). Thread 0 writes `o`.
template <typename S>
__device__ void read_logprobs(const S& score, unsigned int target, float* o, unsigned int vocab,
                              unsigned int top, unsigned long long* keys) {
    const float nan = __int_as_float(0x7fc00000);
    if (threadIdx.x == 0) o[0] = target < vocab ? score(target) : nan;
    unsigned long long below = 0ull;
    for (unsigned int place = 0; place < top; ++place) {
        const unsigned long long best = next_best(score, place == 0u, below, vocab, keys);
        if (threadIdx.x == 0) {
            o[1 + place] = best ? key_float((unsigned int)(best >> 32)) : nan;
            o[1 + top + place] = best ? (float)(0xffffffffu - (unsigned int)best) : -1.f;
        }
        below = best;
    }
}

// Row r's log-softmax as a request reads it, at `targets[r]`; (width - 1) / 2 of its best.
extern "C" __global__ void __launch_bounds__(THREADS)
logprob_rows(const float* __restrict__ logits, const unsigned int* __restrict__ targets,
             float* __restrict__ out, unsigned int vocab, unsigned int width) {
    __shared__ float scratch[THREADS / 32];
    __shared__ unsigned long long keys[THREADS / 32];
    const HeadScores score = head_scores(logits + (size_t)blockIdx.x * vocab, vocab, scratch);
    read_logprobs(score, targets[blockIdx.x], out + (size_t)blockIdx.x * width, vocab,
                  (width - 1u) / 2u, keys);
}

// The contrast's log-distribution of `upper` and `lower` rows r as a request reads it (its log
// q, or the log-softmax of DoLa's logits), with `params` row r: its rule, the target (outside
// [0, vocab): none); (width - 1) / 2 of its best.
extern "C" __global__ void __launch_bounds__(THREADS)
contrast_logprob_rows(const float* __restrict__ upper, const float* __restrict__ lower,
                      const float* __restrict__ params, float* __restrict__ out,
                      unsigned int vocab, unsigned int width) {
    __shared__ float scratch[THREADS / 32];
    __shared__ double sums[THREADS / 32];
    __shared__ unsigned long long keys[THREADS / 32];
    const float* p = params + (size_t)blockIdx.x * 4;
    const float* u = upper + (size_t)blockIdx.x * vocab;
    const float* l = lower + (size_t)blockIdx.x * vocab;
    const unsigned int target =
        p[3] >= 0.f && p[3] < (float)vocab ? (unsigned int)p[3] : 0xffffffffu;
    float* o = out + (size_t)blockIdx.x * width;
    const unsigned int top = (width - 1u) / 2u;
    if (p[2] != 0.f) {
        read_logprobs(dola_scores(u, l, p[0], true, vocab, scratch, sums), target, o, vocab, top,
                      keys);
    } else {
        read_logprobs(contrast_scores(u, l, p[0], p[1], vocab, scratch, sums), target, o, vocab,
                      top, keys);
    }
}

// A row's softmax, e^(x - lse), as the host's `softmax` writes it.
struct SoftmaxOf {
    HeadScores log;
    __device__ float operator()(unsigned int i) const { return expf(log(i)); }
};

#define SLED_CANDIDATES 32
#define SLED_LAYERS 64

// Row r's SLED candidates and their evolved logits (`sled.rs`, the host's `sled_candidates`),
// with `params` row r: evolution_scale k (1..=32), evolution_rate, lower bound (the host's),
// alpha, the row in `premature` of its first premature layer and how many (1..=64) follow in
// order. `out` row r: the k ids (as floats; -1 past k), then their logits (NaN past k), width
// 2 · the launch's largest k. The candidates are the mature head's k most probable tokens,
// best first, ties to the lower id (`next_best`, a pass per place);
// each layer's softmax and its three float64 sums (p·d, p·p, d·d, d the layer's logits less
// the mature ones) take a block's passes over the row; thread 0 then makes the cosines, the
// latent distribution, each candidate's entropy across the layers and its evolved logit in the
// host's order of operations.
extern "C" __global__ void __launch_bounds__(THREADS)
sled_rows(const float* __restrict__ mature, const float* __restrict__ premature,
          const float* __restrict__ params, float* __restrict__ out, unsigned int vocab,
          unsigned int width) {
    __shared__ float scratch[THREADS / 32];
    __shared__ double sums[THREADS / 32];
    __shared__ unsigned long long keys[THREADS / 32];
    __shared__ unsigned int ids[SLED_CANDIDATES];
    __shared__ float p_top[SLED_CANDIDATES];
    __shared__ double cos2[SLED_LAYERS * SLED_CANDIDATES];
    __shared__ float at[SLED_LAYERS * SLED_CANDIDATES];  // each layer's logits at the candidates
    __shared__ double shares[SLED_LAYERS];
    const float* p = params + (size_t)blockIdx.x * 6;
    const unsigned int k = (unsigned int)p[0];
    const double rate = (double)p[1], alpha = (double)p[3];
    const unsigned int first = (unsigned int)p[4], layers = (unsigned int)p[5];
    const float* m = mature + (size_t)blockIdx.x * vocab;

    // the candidates: the mature head's softmax e^(x - lse), its k best
    SoftmaxOf p_m;
    p_m.log = head_scores(m, vocab, scratch);
    unsigned long long below = 0ull;
    for (unsigned int place = 0; place < k; ++place) {
        const unsigned long long best = next_best(p_m, place == 0u, below, vocab, keys);
        if (threadIdx.x == 0) {
            ids[place] = 0xffffffffu - (unsigned int)best;
            p_top[place] = key_float((unsigned int)(best >> 32));
        }
        below = best;
    }
    __syncthreads();

    for (unsigned int l = 0; l < layers; ++l) {
        const float* y = premature + (size_t)(first + l) * vocab;
        const float lse_y = head_scores(y, vocab, scratch).lse;
        double pd = 0.0, pp = 0.0, dd = 0.0;
        for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) {
            const double d = (double)y[i] - (double)m[i], q = (double)expf(y[i] - lse_y);
            pd += q * d;
            pp += q * q;
            dd += d * d;
        }
        pd = block_sum(pd, sums);
        pp = block_sum(pp, sums);
        dd = block_sum(dd, sums);
        if (threadIdx.x == 0) {
            double sum = 0.0;
            for (unsigned int c = 0; c < k; ++c) {
                const unsigned int j = ids[c];
                const double d_j = (double)y[j] - (double)m[j];
                const double q_j = (double)expf(y[j] - lse_y);
                const double g_norm = sqrt(fmax(pp - 2.0 * q_j + 1.0, 0.0));
                // torch's cosine_similarity: x·y / max(|x| |y|, 1e-8)
                const double cos = (pd - d_j) / fmax(g_norm * sqrt(dd), 1e-8);
                const double v = fmax(cos, 0.0);
                cos2[l * SLED_CANDIDATES + c] = v * v;
                at[l * SLED_CANDIDATES + c] = y[j];
                sum += v * v;
            }
            shares[l] = sum;
        }
    }

    if (threadIdx.x == 0) {
        float* o = out + (size_t)blockIdx.x * width;
        const unsigned int half = width / 2u;
        double total = 0.0;
        for (unsigned int l = 0; l < layers; ++l) total += shares[l];
        const double eps = 1.1920928955078125e-7;  // float32 epsilon, 2^-23
        for (unsigned int c = 0; c < half; ++c) {
            if (c >= k) {
                o[c] = -1.f;
                o[half + c] = __int_as_float(0x7fc00000);
                continue;
            }
            // δ at this candidate: each layer's weight normalised, weighted by its share
            double w = 0.0;
            float top = -__int_as_float(0x7f800000);
            for (unsigned int l = 0; l < layers; ++l) {
                const double sum = shares[l];
                const double share = total != 0.0 ? sum / total : sum;
                const double x = cos2[l * SLED_CANDIDATES + c];
                w += share * (sum != 0.0 ? x / sum : x);
                top = fmaxf(top, at[l * SLED_CANDIDATES + c]);
            }
            // the entropy of the softmax across layers of its logits (torch's Categorical)
            double z = 0.0;
            for (unsigned int l = 0; l < layers; ++l)
                z += exp((double)at[l * SLED_CANDIDATES + c] - (double)top);
            double entropy = 0.0;
            for (unsigned int l = 0; l < layers; ++l) {
                const double q = exp((double)at[l * SLED_CANDIDATES + c] - (double)top) / z;
                entropy += q * log(fmin(fmax(q, eps), 1.0 - eps));
            }
            entropy = -entropy;
            const unsigned int j = ids[c];
            const double evolved = (double)m[j] - rate * ((double)p_top[c] - w);
            o[c] = (float)j;
            o[half + c] = (float)(evolved - alpha * entropy);
        }
    }
}
