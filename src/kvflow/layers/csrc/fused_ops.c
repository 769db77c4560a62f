/* The non-matmul work of a decoder layer, one pass each instead of a chain of torch ops:
 *   add_rmsnorm: residual += x (in place), out = rmsnorm(residual) * w     (or out = rmsnorm(x) * w)
 *   silu_mul:    out = silu(gate) * up, reading [gate | up] rows of the fused gate_up matmul
 *   rotary:      rotate-half rotary embedding of q and k heads in place, inside the qkv rows
 * Each is written once and instantiated for float32 and bfloat16 (uint16 storage): T is the element
 * type, LOAD/STORE convert to and from float32 (STORE rounds every stored value: the residual sum,
 * the output) and ROUND rounds the intermediates Hugging Face's bf16 Llama rounds (the normalised
 * value, the SiLU); math runs in float32.
 * Rows go to OpenMP threads only when there are enough of them to pay for waking the threads. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "exp512.h"

#define PAR_ROWS 16 /* below this many rows, one thread */

/* exp(x) to ~2 ulp with plain arithmetic, so the loops vectorise (libm's expf does not without
 * -ffast-math): 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p a degree-6 Taylor polynomial. */
static inline float exp_vec(float x) {
    x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
    const float n = floorf(x * 1.44269504f + 0.5f);
    const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
    float p = 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const int32_t e = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &e, 4);
    return p * s;
}

static inline float silu(float g) { return g / (1.f + exp_vec(-g)); }

/* ---------------- add + RMSNorm ---------------- */
#define DEFINE_ADD_RMSNORM(NAME, T, LOAD, STORE, ROUND)                                           \
void NAME(const T* x, T* residual, const T* w, T* out, int rows, int H, float eps) {              \
    _Pragma("omp parallel for schedule(static) if(rows >= PAR_ROWS)")                             \
    for (int t = 0; t < rows; t++) {                                                              \
        const T* xr = x + (int64_t)t * H;                                                         \
        const T* src = xr;                                                                        \
        if (residual) {                                                                           \
            T* rr = residual + (int64_t)t * H;                                                    \
            for (int i = 0; i < H; i++) rr[i] = STORE(LOAD(rr[i]) + LOAD(xr[i]));                \
            src = rr;                                                                             \
        }                                                                                         \
        float part[16] = {0};                                                                     \
        int i = 0;                                                                                \
        for (; i + 16 <= H; i += 16)                                                              \
            for (int e = 0; e < 16; e++) { const float v = LOAD(src[i + e]); part[e] += v * v; }  \
        float ss = 0.f;                                                                           \
        for (; i < H; i++) ss += LOAD(src[i]) * LOAD(src[i]);                                     \
        for (int e = 0; e < 16; e++) ss += part[e];                                               \
        const float inv = 1.f / sqrtf(ss / (float)H + eps);                                       \
        T* o = out + (int64_t)t * H;                                                              \
        for (int j = 0; j < H; j++) o[j] = STORE(LOAD(w[j]) * ROUND(LOAD(src[j]) * inv));         \
    }                                                                                             \
}

/* ---------------- SiLU(gate) * up ----------------
 * 16 lanes at a time where there is AVX-512 (LOAD16 widens to float32, STORE16 rounds and stores,
 * ROUND16 rounds as ROUND does), then one at a time: the same values either way. */
#ifdef __AVX512F__
#define SILU_MUL_16(LOAD16, STORE16, ROUND16)                                                     \
    for (; i + 16 <= I; i += 16) {                                                                \
        const __m512 gv = LOAD16(g + i);                                                          \
        const __m512 e = exp512(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv), _mm512_set1_ps(88.f))); \
        const __m512 s = ROUND16(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e)));      \
        STORE16(o + i, _mm512_mul_ps(s, LOAD16(u + i)));                                          \
    }
static inline void store16_bf16(uint16_t* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, f32_to_bf16_16(v)); }
#else
#define SILU_MUL_16(LOAD16, STORE16, ROUND16)
#endif
#define DEFINE_SILU_MUL(NAME, T, LOAD, STORE, ROUND, LOAD16, STORE16, ROUND16)                    \
void NAME(const T* gu, T* out, int rows, int I) {                                                 \
    _Pragma("omp parallel for schedule(static) if(rows >= PAR_ROWS)")                             \
    for (int t = 0; t < rows; t++) {                                                              \
        const T* g = gu + (int64_t)t * 2 * I;                                                     \
        const T* u = g + I;                                                                       \
        T* o = out + (int64_t)t * I;                                                              \
        int i = 0;                                                                                \
        SILU_MUL_16(LOAD16, STORE16, ROUND16)                                                     \
        for (; i < I; i++) o[i] = STORE(ROUND(silu(LOAD(g[i]))) * LOAD(u[i]));                   \
    }                                                                                             \
}

/* ---------------- rotary (rotate-half layout) ----------------
 * x: `rows` rows of `stride` elements; heads [0, H) of D values each start at the row's start.
 * cos/sin: float32 [rows, D] (the position's table row; both halves equal). */
#define DEFINE_ROTARY(NAME, T, LOAD, STORE)                                                       \
void NAME(T* x, int rows, int stride, int H, int D, const float* cos, const float* sin) {         \
    const int half = D / 2;                                                                       \
    _Pragma("omp parallel for schedule(static) if(rows >= PAR_ROWS)")                             \
    for (int t = 0; t < rows; t++) {                                                              \
        const float* c = cos + (int64_t)t * D;                                                    \
        const float* s = sin + (int64_t)t * D;                                                    \
        for (int h = 0; h < H; h++) {                                                             \
            T* p = x + (int64_t)t * stride + h * D;                                               \
            for (int i = 0; i < half; i++) {                                                      \
                const float a = LOAD(p[i]), b = LOAD(p[i + half]);                                \
                p[i] = STORE(a * c[i] - b * s[i]);                                                \
                p[i + half] = STORE(b * c[i + half] + a * s[i + half]);                           \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
}

DEFINE_ADD_RMSNORM(add_rmsnorm_f32, float, ID, ID, ID)
DEFINE_ADD_RMSNORM(add_rmsnorm_bf16, uint16_t, bf16_to_f32, f32_to_bf16, round_bf16)
#define ID16(v) (v)
DEFINE_SILU_MUL(silu_mul_f32, float, ID, ID, ID, _mm512_loadu_ps, _mm512_storeu_ps, ID16)
DEFINE_SILU_MUL(silu_mul_bf16, uint16_t, bf16_to_f32, f32_to_bf16, round_bf16, load16_bf16, store16_bf16, round16_bf16)
DEFINE_ROTARY(rotary_f32, float, ID, ID)
DEFINE_ROTARY(rotary_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

/* ---------------- the sampler's row statistics ----------------
 * Per row of float32 logits [rows, V]: its log-sum-exp and the index of its first maximum, what
 * torch's logsumexp and max(dim) give: a greedy step needs only the chosen token's log-probability
 * (logit - lse), not a [rows, V] log_softmax. Returns 1 when a row holds NaN (the caller then takes
 * torch's path, which has rules for it), else 0. */
static int row_stats(const float* r, int V, float* lse, int64_t* argmax) {
    float mx = -INFINITY;
    int k = 0, bad = 0;
#ifdef __AVX512F__
    __m512 vmx = _mm512_set1_ps(-INFINITY);
    for (; k + 16 <= V; k += 16) {
        const __m512 v = _mm512_loadu_ps(r + k);
        bad |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0;
        vmx = _mm512_max_ps(vmx, v);
    }
    mx = _mm512_reduce_max_ps(vmx);
#endif
    for (; k < V; k++) { bad |= r[k] != r[k]; mx = r[k] > mx ? r[k] : mx; }
    if (bad) return 1;
    int at = 0;  /* the first index holding the maximum (all -inf: index 0, as torch) */
    while (at < V && r[at] != mx) at++;
    *argmax = at < V ? at : 0;
    if (mx == -INFINITY) { *lse = -INFINITY; return 0; }
    float sum = 0.f;
    k = 0;
#ifdef __AVX512F__
    __m512 vsum = _mm512_setzero_ps();
    const __m512 vm = _mm512_set1_ps(mx);
    for (; k + 16 <= V; k += 16) vsum = _mm512_add_ps(vsum, exp512(_mm512_sub_ps(_mm512_loadu_ps(r + k), vm)));
    sum = _mm512_reduce_add_ps(vsum);
#endif
    for (; k < V; k++) sum += exp_vec(r[k] - mx);
    *lse = mx + logf(sum);
    return 0;
}

int lse_argmax_f32(const float* x, int rows, int V, float* lse, int64_t* argmax) {
    int nan = 0;
    #pragma omp parallel for schedule(static) if(rows >= 4) reduction(|:nan)
    for (int t = 0; t < rows; t++) nan |= row_stats(x + (int64_t)t * V, V, lse + t, argmax + t);
    return nan;
}

/* ---------------- the k largest of each row ----------------
 * Token Recycling refreshes its table with the top k (<= 32) next tokens after every input row of a
 * step. One pass per row keeps the k best seen so far, sorted; a 16-value block is compared with the
 * k-th best at once, and after the first few hundred values almost none passes, so the row costs
 * about one read (torch's topk partitions the row: 80 us for 49152 values here, against ~15).
 * idx gets each row's indices, largest first. Returns 1 when a row has fewer than k values above
 * -inf (NaN never enters): the caller then takes torch's path. */
static int row_topk(const float* r, int V, int k, int64_t* idx) {
    float best[32];
    int64_t at[32];
    int n = 0;
    float thr = -INFINITY;  /* the k-th best so far, once k are held */
#define TOPK_OFFER(x, i) do {                                          \
        float x_ = (x);                                                \
        if (x_ > thr || (n < k && x_ > -INFINITY)) {                   \
            int p = n < k ? n++ : k - 1;                               \
            while (p > 0 && best[p - 1] < x_) { best[p] = best[p - 1]; at[p] = at[p - 1]; p--; } \
            best[p] = x_; at[p] = (i);                                 \
            if (n == k) thr = best[k - 1];                             \
        }                                                              \
    } while (0)
    int j = 0;
#ifdef __AVX512F__
    for (; j + 16 <= V; j += 16) {
        const __m512 v = _mm512_loadu_ps(r + j);
        __mmask16 m = n < k ? (__mmask16)0xFFFF : _mm512_cmp_ps_mask(v, _mm512_set1_ps(thr), _CMP_GT_OQ);
        while (m) {
            const int b = __builtin_ctz(m);
            TOPK_OFFER(r[j + b], j + b);
            m &= m - 1;
        }
    }
#endif
    for (; j < V; j++) TOPK_OFFER(r[j], j);
#undef TOPK_OFFER
    if (n < k) return 1;
    for (int i = 0; i < k; i++) idx[i] = at[i];
    return 0;
}

int topk_f32(const float* x, int rows, int V, int k, int64_t* idx) {
    if (k < 1 || k > 32) return 1;
    int bad = 0;
    #pragma omp parallel for schedule(static) if(rows >= 4) reduction(|:bad)
    for (int t = 0; t < rows; t++) bad |= row_topk(x + (int64_t)t * V, V, k, idx + (int64_t)t * k);
    return bad;
}
