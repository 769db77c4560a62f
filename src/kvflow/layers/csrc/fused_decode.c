/* Whole steps of a quantized (int8 / int4) or bfloat16 Llama-family model in one call: every layer's
 * norms, matmuls, rotary, KV write and attention, for M tokens that each attend as one query row
 * (decodes; also the tokens of short prompt chunks and drafts, each with its own context length, and
 * draft-tree nodes, which see their ancestors only).
 *
 * Why: at batch 1 a decode step of a small model is mostly per-op overhead. Run layer by layer through
 * torch, SmolLM2-135M's int8 step is ~25 ms, of which the matmuls take ~12 and the rest is hundreds of
 * small torch calls and their Python; llama.cpp's whole Q8_0 token takes ~15 ms. Here a step is one
 * call from Python, and the matmuls read the quantized weights in place:
 *   int8 (W8A8, as layers/quantized_linear.py's "w8a8"): each input row becomes two int8 rows, x ~
 *     a1 q1 + a2 q2 (q1 = x / a1 rounded half to even, a1 = max|x| / 127; q2 the same of what q1
 *     left), multiplied by the int8 weights in int32 with the CPU's int8 dot products (AVX-512 VNNI,
 *     or AMX), then scaled by a1 or a2 and the weight's per-output-channel scale, and summed. VNNI
 *     multiplies unsigned by signed bytes, so activations are stored as x + 128 and the weight row
 *     sums correct the product: sum (x + 128) w - 128 sum w = sum x w.
 *   int4 (torch's CPU int4 pack, groups of 32 with scale and zero in bfloat16): activations are
 *     quantized to int8 per group of 32 and multiplied by the 4-bit weights in integers (below).
 *   bf16 (a bfloat16 model): activations rounded to bfloat16 and multiplied with the CPU's bf16 dot
 *     products (AVX-512 BF16).
 * The residual stream and every intermediate stay in float32 (the torch path rounds them to the
 * compute dtype). */
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"
#include "bf16.h"

#ifdef __AVX512F__
/* Touch `bytes` bytes at p, one cache line per 64: the dot loops below fetch the next quad of weight
 * rows (the memory right after the current one) this way while they work on the current one. Two
 * streams per thread otherwise leave the memory idle: this made the int8 matmuls ~20% faster and the
 * int4 ones 2x on a Xeon (Sapphire Rapids). */
static inline void prefetch_lines(const void* p, int bytes) {
    for (int b = 0; b < bytes; b += 64) _mm_prefetch((const char*)p + b, _MM_HINT_T0);
}
#endif

/* from fused_ops.c and paged_decode.c */
void add_rmsnorm_f32(const float* x, float* residual, const float* w, float* out, int rows, int H, float eps);
void silu_mul_f32(const float* gu, float* out, int rows, int I);
void rotary_f32(float* x, int rows, int stride, int H, int D, const float* cos, const float* sin);
#define DECODE_ARGS int B, int Hq, int Hk, int D, int BS, int max_blocks, float scale, const float* k_scale, \
    const float* v_scale, const int64_t* tree_start, const int64_t* tree_bits
void paged_decode_f32_f32(const float* q, const float* kc, const float* vc, const int64_t* tables,
                          const int64_t* ctx_lens, float* out, DECODE_ARGS);
void paged_decode_f32_bf16(const float* q, const uint16_t* kc, const uint16_t* vc, const int64_t* tables,
                           const int64_t* ctx_lens, float* out, DECODE_ARGS);
void paged_decode_f32_i8(const float* q, const int8_t* kc, const int8_t* vc, const int64_t* tables,
                         const int64_t* ctx_lens, float* out, DECODE_ARGS);
int paged_decode_amx_f32_bf16(const float* q, const uint16_t* kc, const uint16_t* vc, const int64_t* tables,
                              const int64_t* ctx_lens, float* out, DECODE_ARGS);

enum { LINEAR_INT8 = 0, LINEAR_INT4 = 1, LINEAR_BF16 = 2, LINEAR_INT8_A16 = 3 };

typedef struct {
    int kind;
    const void* q;           /* int8 [N, K] | int4: torch's pack, bytes [N / 64, K, 32] | bf16 [N, K] */
    const float* scale;      /* int8, int8_a16: [N] */
    const int32_t* qsum;     /* int8: [N], sum_k q[n, k] */
    const uint16_t* sz;      /* int4: bfloat16 [K / group, N, 2] (scale, zero) */
    const float* bias;       /* [N] or NULL */
    int N, K, group;
} QLinear;

typedef struct {
    const float* input_norm;  /* [H] float32 */
    const float* post_norm;   /* [H] */
    QLinear qkv, o, gate_up, down;
    void* k_cache;            /* [num_blocks, BS, Hk, D] in the cache dtype */
    void* v_cache;
    float* k_scale;           /* int8 caches: [num_blocks, BS, Hk] */
    float* v_scale;
} DecodeLayer;

enum { CACHE_F32 = 0, CACHE_BF16 = 1, CACHE_I8 = 2 };

typedef struct {
    int M, H, Hq, Hk, D, I, BS, max_blocks, cache_kind, num_layers;
    float eps, attn_scale;
    const int64_t* slots;     /* [M] flat cache slot of each token */
    const int64_t* tables;    /* [M, max_blocks] */
    const int64_t* ctx_lens;  /* [M], this token included */
    const int64_t* tree_start;  /* [M] or NULL: draft-tree nodes see, from this key on, only the keys */
    const int64_t* tree_bits;   /* [M]        whose bit is set (their ancestors and themselves) */
    const float* cos;         /* [M, D] */
    const float* sin;
    const float* final_norm;  /* [H] */
    float* x;                 /* in: embeddings [M, H]; out: the final normed hidden states */
} DecodeStep;

/* The matmuls below walk output rows four at a time (a quad; quads split across the OpenMP threads)
 * and multiply each quad by up to TILE input rows of x at once: a tile of 4 x R dot products, where
 * each weight load serves R input rows and each input load four weight rows. The quad is read from
 * memory by the first tile (which also prefetches the next quad) and from L1 by the others. Without
 * the tiles, a step's cost grew by about its one-row cost per row (weights widened or loaded again
 * per row); draft trees and batches are several rows. The body sees n0, rows (4, or fewer at the
 * end), m0 and R. */
#define TILE 4
#define FOR_TILES(N, M)                                                                      \
    _Pragma("omp parallel for schedule(static)")                                             \
    for (int n0 = 0; n0 < (N); n0 += 4)                                                      \
        for (int m0 = 0, rows = (N) - n0 < 4 ? (N) - n0 : 4, R; m0 < (M) && (R = (M) - m0 < TILE ? (M) - m0 : TILE); \
             m0 += TILE)

/* Calls FN(..., R, ...) with R a constant, so that FN's loops over the tile's rows unroll and its
 * accumulators stay in registers. */
#define WITH_CONST_R(R, CALL)                                                                \
    switch (R) { case 1: { enum { R_ = 1 }; CALL; } break; case 2: { enum { R_ = 2 }; CALL; } break; \
                 case 3: { enum { R_ = 3 }; CALL; } break; default: { enum { R_ = 4 }; CALL; } }
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* ---------------- W8A8 matmul ---------------- */
/* One int8 row of K values, stored as q + 128: q = v (1 / a) rounded half to even, a = max|v| / 127, where
 * v = x, or with prev_a > 0 what rounding x to prev_a's levels left: x - round(x (1 / prev_a)) prev_a.
 * (Multiplying by 1 / a, as torch's quantize_activations does: a division per value made this a third
 * of a 16-row int8 step.) */
#ifdef __AVX512F__
#define ROUND16(v) _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
ALWAYS_INLINE __m512 rest16(__m512 x, float prev_a, float prev_inv) {
    if (prev_a == 0.f) return x;
    const __m512 q = ROUND16(_mm512_mul_ps(x, _mm512_set1_ps(prev_inv)));
    return _mm512_sub_ps(x, _mm512_mul_ps(q, _mm512_set1_ps(prev_a)));
}
#endif
static inline float rest1(float x, float prev_a, float prev_inv) {
    return prev_a == 0.f ? x : x - nearbyintf(x * prev_inv) * prev_a;
}

static float quantize_row(const float* x, int K, float prev_a, uint8_t* u) {
    const float prev_inv = prev_a == 0.f ? 0.f : 1.f / prev_a;
    float mx = 0.f;
    int k = 0;
#ifdef __AVX512F__  /* the same products and round-half-to-even, 16 at a time */
    __m512 vmx = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16)
        vmx = _mm512_max_ps(vmx, _mm512_abs_ps(rest16(_mm512_loadu_ps(x + k), prev_a, prev_inv)));
    mx = _mm512_reduce_max_ps(vmx);
#endif
    for (; k < K; k++) mx = fmaxf(mx, fabsf(rest1(x[k], prev_a, prev_inv)));
    const float a = fmaxf(mx, 1e-12f) / 127.f, inv = 1.f / a;
    k = 0;
#ifdef __AVX512F__
    const __m512 vinv = _mm512_set1_ps(inv);
    for (; k + 16 <= K; k += 16) {
        const __m512 q = ROUND16(_mm512_mul_ps(rest16(_mm512_loadu_ps(x + k), prev_a, prev_inv), vinv));
        const __m512i b = _mm512_add_epi32(_mm512_cvtps_epi32(q), _mm512_set1_epi32(128));
        _mm_storeu_si128((__m128i*)(u + k), _mm512_cvtepi32_epi8(b));
    }
#endif
    for (; k < K; k++) u[k] = (uint8_t)((int)nearbyintf(rest1(x[k], prev_a, prev_inv) * inv) + 128);
    return a;
}

/* Each input row m as two int8 rows, 2m and 2m + 1: x ~ a1 q1 + a2 q2, q2 the rounding left by q1
 * (layers/quantized_linear.py says why). xu: 2M rows of K bytes; xa: their 2M scales. */
static void quantize_rows(const float* x, int M, int K, uint8_t* xu, float* xa) {
    #pragma omp parallel for schedule(static) if (M >= 8)
    for (int m = 0; m < M; m++) {
        const float* r = x + (int64_t)m * K;
        xa[2 * m] = quantize_row(r, K, 0.f, xu + (int64_t)2 * m * K);
        xa[2 * m + 1] = quantize_row(r, K, xa[2 * m], xu + (int64_t)(2 * m + 1) * K);
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
static inline int32_t dot_u8s8(const uint8_t* x, const int8_t* w, int K) {
    __m512i acc = _mm512_setzero_si512();
    int k = 0;
    for (; k + 64 <= K; k += 64)
        acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(x + k), _mm512_loadu_si512(w + k));
    if (k < K) {
        const __mmask64 tail = (__mmask64)-1 >> (64 - (K - k));
        acc = _mm512_dpbusd_epi32(acc, _mm512_maskz_loadu_epi8(tail, x + k), _mm512_maskz_loadu_epi8(tail, w + k));
    }
    return _mm512_reduce_add_epi32(acc);
}

/* d[r][c] = x[r] . w[c] for R input rows and four consecutive weight rows, K a multiple of 64. */
ALWAYS_INLINE void tile_u8s8(const uint8_t* x, const int8_t* w, int K, int R, int prefetch, int32_t (*d)[4]) {
    __m512i acc[TILE][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_si512();
    for (int k = 0; k < K; k += 64) {
        if (prefetch) prefetch_lines(w + 4 * K + 4 * k, 256);
        __m512i wv[4];
        for (int c = 0; c < 4; c++) wv[c] = _mm512_loadu_si512(w + c * K + k);
        for (int r = 0; r < R; r++) {
            const __m512i xv = _mm512_loadu_si512(x + r * K + k);
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], xv, wv[c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) d[r][c] = _mm512_reduce_add_epi32(acc[r][c]);
}
#define INT8_TILE_K 64
#else  /* no AVX-512 VNNI: plain loops (the kernel then usually loses to torch, and is not chosen) */
static inline int32_t dot_u8s8(const uint8_t* x, const int8_t* w, int K) {
    int32_t s = 0;
    for (int k = 0; k < K; k++) s += (int32_t)x[k] * (int32_t)w[k];
    return s;
}

ALWAYS_INLINE void tile_u8s8(const uint8_t* x, const int8_t* w, int K, int R, int prefetch, int32_t (*d)[4]) {
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) d[r][c] = dot_u8s8(x + r * K, w + c * K, K);
}
#define INT8_TILE_K 1
#endif

/* One output of the int8 matmul from the int32 sums of a token's two rows (d[0]: q1, d[1]: q2), in
 * the order torch's "w8a8" takes: (d1 a1 s + d2 a2 s) + bias. */
static inline float int8_output(const QLinear* L, int n, int32_t d1, int32_t d2, const float* a) {
    const int32_t off = 128 * L->qsum[n];
    const float s = L->scale[n];
    return ((float)(d1 - off) * a[0] * s + (float)(d2 - off) * a[1] * s) + (L->bias ? L->bias[n] : 0.f);
}

/* y [M, N] = dequant(quant(x) @ q.T) (+ bias); xu, xa: the 2M rows of x as quantize_rows leaves them
 * (a tile's rows are whole pairs: 2M is even and tiles start at multiples of 4). */
static void linear_int8(const QLinear* L, const uint8_t* xu, const float* xa, int M, float* y) {
    const int N = L->N, K = L->K;
    const int8_t* W = (const int8_t*)L->q;
    FOR_TILES(N, 2 * M) {
        const uint8_t* xr = xu + (int64_t)m0 * K;
        const int8_t* w = W + (int64_t)n0 * K;
        int32_t d[TILE][4];
        if (rows == 4 && K % INT8_TILE_K == 0) WITH_CONST_R(R, tile_u8s8(xr, w, K, R_, m0 == 0, d))
        else for (int r = 0; r < R; r++)
            for (int c = 0; c < rows; c++) d[r][c] = dot_u8s8(xr + r * K, w + c * K, K);
        for (int r = 0; r < R; r += 2)
            for (int c = 0, n = n0; c < rows; c++, n++)
                y[(int64_t)(m0 + r) / 2 * N + n] = int8_output(L, n, d[r][c], d[r + 1][c], xa + m0 + r);
    }
}

/* y [M, N] = x @ dequant(W).T (+ bias) for torch's int4 pack with groups of 32: byte (b, k, j) of
 * [N / 64, K, 32] holds q[64b + j, k] in its low nibble and q[64b + 32 + j, k] in its high one, so
 * the 64 bytes of k and k + 1 hold one column pair of 64 output rows. Activations are quantized to
 * int8 per group of 32 (scale d = max|x| / 127, as llama.cpp's Q8_1), so that
 *   sum_k ((q - 8) s + z) x = d (s (sum_k q xq - 8 sum_k xq) + z sum_k xq)
 * is integer arithmetic up to the group's end: one byte permutation puts q[j, k], q[j, k + 1] side by
 * side, and a multiply-add of unsigned by signed bytes (maddubs) gives q[j,k] xq[k] + q[j,k+1] xq[k+1]
 * for 32 rows at once (16-bit sums, widened to 32 bits every 16 k, before they could overflow).
 * Blocks of 64 rows go to the OpenMP threads. */
#define INT4_GROUP 32

static void quantize_groups(const float* x, int K, int8_t* xq, float* xd, float* xs) {
    for (int g = 0; g < K / INT4_GROUP; g++) {
        const float* r = x + g * INT4_GROUP;
        float mx = 0.f;
        for (int k = 0; k < INT4_GROUP; k++) mx = fmaxf(mx, fabsf(r[k]));
        const float d = fmaxf(mx, 1e-12f) / 127.f;
        int sum = 0;
        for (int k = 0; k < INT4_GROUP; k++) {
            const int q = (int)nearbyintf(r[k] / d);
            xq[g * INT4_GROUP + k] = (int8_t)q;
            sum += q;
        }
        xd[g] = d;
        xs[g] = (float)sum;
    }
}

#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
static void int4_block(const uint8_t* p, const uint16_t* sz, const int8_t* xq, const float* xd, const float* xs,
                       int K, int N, float* y) {
    static const int8_t pair_index[64] = {  /* byte 2j <- byte j (k), byte 2j + 1 <- byte 32 + j (k + 1) */
        0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39, 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45,
        14, 46, 15, 47, 16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58,
        27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
    const __m512i index = _mm512_loadu_si512(pair_index), low4 = _mm512_set1_epi8(0x0F);
    const __m512i high16 = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int g = 0; g < K / INT4_GROUP; g++) {
        __m512i dot[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
        for (int k0 = g * INT4_GROUP; k0 < (g + 1) * INT4_GROUP; k0 += 16) {
            __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();  /* rows 0-31, 32-63: int16 */
            for (int k = k0; k < k0 + 16; k += 2) {
                prefetch_lines(p + (int64_t)(k + 64) * 32, 64);
                const __m512i pairs = _mm512_permutexvar_epi8(index, _mm512_loadu_si512(p + (int64_t)k * 32));
                const __m512i xk = _mm512_set1_epi16(*(const int16_t*)(xq + k));
                lo = _mm512_add_epi16(lo, _mm512_maddubs_epi16(_mm512_and_si512(pairs, low4), xk));
                hi = _mm512_add_epi16(hi, _mm512_maddubs_epi16(_mm512_and_si512(_mm512_srli_epi16(pairs, 4), low4), xk));
            }
            dot[0] = _mm512_add_epi32(dot[0], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(lo)));
            dot[1] = _mm512_add_epi32(dot[1], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(lo, 1)));
            dot[2] = _mm512_add_epi32(dot[2], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(hi)));
            dot[3] = _mm512_add_epi32(dot[3], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(hi, 1)));
        }
        const __m512 d = _mm512_set1_ps(xd[g]), ds = _mm512_set1_ps(xd[g] * xs[g]);
        const __m512 ds8 = _mm512_set1_ps(8.f * xd[g] * xs[g]);
        for (int i = 0; i < 4; i++) {  /* (scale, zero) bf16 pairs of 16 rows: one 32-bit word per row */
            const __m512i sz16 = _mm512_loadu_si512(sz + ((int64_t)g * N + 16 * i) * 2);
            const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(sz16, 16));
            const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(sz16, high16));
            const __m512 qx = _mm512_fmsub_ps(_mm512_cvtepi32_ps(dot[i]), d, ds8);  /* d (sum q xq - 8 sum xq) */
            acc[i] = _mm512_fmadd_ps(scale, qx, _mm512_fmadd_ps(zero, ds, acc[i]));
        }
    }
    for (int i = 0; i < 4; i++) _mm512_storeu_ps(y + 16 * i, acc[i]);
}
#else
static void int4_block(const uint8_t* p, const uint16_t* sz, const int8_t* xq, const float* xd, const float* xs,
                       int K, int N, float* y) {
    for (int j = 0; j < 64; j++) y[j] = 0.f;
    for (int g = 0; g < K / INT4_GROUP; g++) {
        int32_t dot[64] = {0};
        for (int k = g * INT4_GROUP; k < (g + 1) * INT4_GROUP; k++)
            for (int j = 0; j < 32; j++) {
                const uint8_t byte = p[(int64_t)k * 32 + j];
                dot[j] += (byte & 15) * xq[k];
                dot[j + 32] += (byte >> 4) * xq[k];
            }
        for (int j = 0; j < 64; j++) {
            const uint16_t* pair = sz + ((int64_t)g * N + j) * 2;
            const float qx = xd[g] * ((float)dot[j] - 8.f * xs[g]);
            y[j] += bf16_to_f32(pair[0]) * qx + bf16_to_f32(pair[1]) * xd[g] * xs[g];
        }
    }
}
#endif

static void linear_int4(const QLinear* L, const float* x, int M, int8_t* xq, float* xa, float* y) {
    const int N = L->N, K = L->K, ng = K / INT4_GROUP;
    float *xd = xa, *xs = xa + (int64_t)M * ng;
    for (int m = 0; m < M; m++) quantize_groups(x + (int64_t)m * K, K, xq + (int64_t)m * K, xd + m * ng, xs + m * ng);
    #pragma omp parallel for schedule(static)
    for (int b = 0; b < N / 64; b++) {
        const uint8_t* p = (const uint8_t*)L->q + (int64_t)b * K * 32;
        for (int m = 0; m < M; m++) {
            float* yr = y + (int64_t)m * N + 64 * b;
            int4_block(p, L->sz + (int64_t)64 * b * 2, xq + (int64_t)m * K, xd + m * ng, xs + m * ng, K, N, yr);
            if (L->bias)
                for (int j = 0; j < 64; j++) yr[j] += L->bias[64 * b + j];
        }
    }
}

/* y [M, N] = x @ W.T (+ bias) for bfloat16 weights [N, K]: each input row is rounded to bfloat16 (as
 * the torch bf16 path's activations are) and multiplied with the CPU's bf16 dot products (AVX-512
 * BF16: pairs of bf16 products summed in float32). */
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
ALWAYS_INLINE void tile_bf16(const uint16_t* x, const uint16_t* w, int K, int R, int prefetch, float (*d)[4]) {
    __m512 acc[TILE][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 32) {
        if (prefetch) prefetch_lines(w + 4 * K + 4 * k, 256);
        __m512bh wv[4];
        for (int c = 0; c < 4; c++) wv[c] = (__m512bh)_mm512_loadu_si512(w + c * K + k);
        for (int r = 0; r < R; r++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * K + k);
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv[c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) d[r][c] = _mm512_reduce_add_ps(acc[r][c]);
}
#define BF16_TILE_K 32
#else
#define BF16_TILE_K 0  /* no tile: dot_bf16 below */
#endif

static inline float dot_bf16(const uint16_t* x, const uint16_t* w, int K) {
    float part[16] = {0};
    int k = 0;
    for (; k + 16 <= K; k += 16)
        for (int e = 0; e < 16; e++) part[e] += bf16_to_f32(x[k + e]) * bf16_to_f32(w[k + e]);
    float s = 0.f;
    for (; k < K; k++) s += bf16_to_f32(x[k]) * bf16_to_f32(w[k]);
    for (int e = 0; e < 16; e++) s += part[e];
    return s;
}

/* xb: the input rows rounded to bfloat16. */
static void linear_bf16(const QLinear* L, const uint16_t* xb, int M, float* y) {
    const int N = L->N, K = L->K;
    const uint16_t* W = (const uint16_t*)L->q;
    FOR_TILES(N, M) {
        const uint16_t* xr = xb + (int64_t)m0 * K;
        const uint16_t* w = W + (int64_t)n0 * K;
        float d[TILE][4];
#if BF16_TILE_K
        if (rows == 4 && K % BF16_TILE_K == 0) WITH_CONST_R(R, tile_bf16(xr, w, K, R_, m0 == 0, d))
        else
#endif
        for (int r = 0; r < R; r++)
            for (int c = 0; c < rows; c++) d[r][c] = dot_bf16(xr + r * K, w + c * K, K);
        for (int r = 0, m = m0; r < R; r++, m++)
            for (int c = 0, n = n0; c < rows; c++, n++) y[(int64_t)m * N + n] = d[r][c] + (L->bias ? L->bias[n] : 0.f);
    }
}

/* y [M, N] = x @ (q * scale).T for int8 weights with bfloat16 activations (W8A16: the LM head, whose
 * activations are not rounded to int8, see layers/quantized_linear.py; rounded to bfloat16 as the
 * torch path and the AMX tiles round them, so that a step's logits do not depend on its row count):
 * weights widened to float32 in registers, the rounded activations kept in float32 (xr, M x K). */
#ifdef __AVX512F__
ALWAYS_INLINE void tile_i8_f32(const float* x, const int8_t* w, int K, int R, int prefetch, float (*d)[4]) {
    __m512 acc[TILE][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 16) {
        if (prefetch) prefetch_lines(w + 4 * K + 4 * k, 64);
        __m512 wv[4];  /* widened once for the tile's R rows */
        for (int c = 0; c < 4; c++)
            wv[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + c * K + k))));
        for (int r = 0; r < R; r++) {
            const __m512 xv = _mm512_loadu_ps(x + r * K + k);
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_fmadd_ps(wv[c], xv, acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) d[r][c] = _mm512_reduce_add_ps(acc[r][c]);
}
#define I8_F32_TILE_K 16
#else
#define I8_F32_TILE_K 0
#endif

static void linear_int8_a16(const QLinear* L, const float* x, int M, float* xr_all, float* y) {
    const int N = L->N, K = L->K;
    const int8_t* W = (const int8_t*)L->q;
    for (int64_t i = 0; i < (int64_t)M * K; i++) xr_all[i] = round_bf16(x[i]);
    x = xr_all;
    FOR_TILES(N, M) {
        const float* xr = x + (int64_t)m0 * K;
        const int8_t* w = W + (int64_t)n0 * K;
        float d[TILE][4];
#if I8_F32_TILE_K
        if (rows == 4 && K % I8_F32_TILE_K == 0) WITH_CONST_R(R, tile_i8_f32(xr, w, K, R_, m0 == 0, d))
        else
#endif
        for (int r = 0; r < R; r++)
            for (int c = 0; c < rows; c++) {
                d[r][c] = 0.f;
                for (int k = 0; k < K; k++) d[r][c] += (float)w[c * K + k] * xr[r * K + k];
            }
        for (int r = 0, m = m0; r < R; r++, m++)
            for (int c = 0, n = n0; c < rows; c++, n++)
                y[(int64_t)m * N + n] = d[r][c] * L->scale[n] + (L->bias ? L->bias[n] : 0.f);
    }
}

/* ---------------- AMX tiles ----------------
 * On CPUs with AMX (Sapphire Rapids and later) a tile multiply does 16 x 16 x 32 bf16 (or x 64 int8)
 * products in one instruction, so a step of many rows (draft trees, batches, prompt chunks) costs about
 * what one row does: the weights' memory traffic. Weights are the A tiles as they lie ([N, K] rows,
 * 16 rows x 64 bytes); the step's activations are repacked once per matmul into B tiles: tile (t, c)
 * row p holds, for the 16 rows m of row tile t, the 4 bytes of x[m] at 64 c + 4 p (two bf16 or four
 * int8 values: the pairs and quads the tile multiply sums). Output tiles are C[n][m] for 32 weight rows
 * by 16 or 32 input rows. int8 multiplies signed weights by the unsigned x + 128, as the VNNI path
 * does: the int32 sums are the same. Used when Python turns it on (fused_use_amx: it is timed against
 * the plain kernels like every choice) and the kernel has the OS's permission for the tile data. */
#if HAVE_AMX
#include <sys/syscall.h>
#include <unistd.h>

static int amx_on = 0;

int amx_permitted(void) {
    static int permitted = -1;  /* Linux hands out the 8 KiB of tile state only on request */
    if (permitted < 0) permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return permitted;
}

int fused_use_amx(int on) {
    amx_on = on && amx_permitted();
    return amx_permitted();
}

/* x: M rows of `row_bytes` bytes -> B tiles [M / 16 rounded up][row_bytes / 64][16][16] uint32, zero padded. */
static void pack_b_tiles(const uint8_t* x, int M, int row_bytes, uint32_t* out) {
    const int chunks = row_bytes / 64, tiles = (M + 15) / 16;
    for (int t = 0; t < tiles; t++)
        for (int c = 0; c < chunks; c++) {
            uint32_t* tile = out + ((int64_t)t * chunks + c) * 256;
            for (int m = 0; m < 16; m++) {
                const int row = 16 * t + m;
                const uint32_t* src = (const uint32_t*)(x + (int64_t)row * row_bytes + 64 * c);
                for (int p = 0; p < 16; p++) tile[p * 16 + m] = row < M ? src[p] : 0;
            }
        }
}

/* C tiles for 32 weight rows at w (A rows `stride` bytes apart) by one or two row tiles of B at xt:
 * c[(j * 2 + h) * 256 + r * 16 + m] for weight row 16 h + r and input row 16 j + m. `next` (the next
 * 32 rows, or NULL) is prefetched as these are used: 32 strided streams are more than the hardware prefetcher follows
 * (a step's weights come from memory; without this the tiles ran at a third of their speed on
 * weights in cache). */
static void amx_block(int int8, const uint8_t* w, const uint8_t* next, int64_t stride, const uint8_t* xt, int chunks,
                      int two, void* c) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int k = 0; k < chunks; k++) {
        if (next)
            for (int r = 0; r < 32; r++) _mm_prefetch((const char*)next + r * stride + 64 * k, _MM_HINT_T0);
        _tile_loadd(4, w + 64 * k, stride);
        _tile_loadd(5, w + 16 * stride + 64 * k, stride);
        _tile_loadd(6, xt + 1024 * k, 64);
        if (int8) { _tile_dpbsud(0, 4, 6); _tile_dpbsud(1, 5, 6); }
        else { _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 5, 6); }
        if (two) {
            _tile_loadd(7, xt + 1024 * ((int64_t)chunks + k), 64);
            if (int8) { _tile_dpbsud(2, 4, 7); _tile_dpbsud(3, 5, 7); }
            else { _tile_dpbf16ps(2, 4, 7); _tile_dpbf16ps(3, 5, 7); }
        }
    }
    _tile_stored(0, c, 64); _tile_stored(1, (uint8_t*)c + 1024, 64);
    if (two) { _tile_stored(2, (uint8_t*)c + 2048, 64); _tile_stored(3, (uint8_t*)c + 3072, 64); }
}

/* int8 weight rows -> bfloat16 (exact: |q| <= 127), for the W8A16 LM head. */
static void widen_rows_bf16(const int8_t* q, int rows, int K, uint16_t* out) {
    for (int64_t i = 0; i < (int64_t)rows * K; i += 16) {
        const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + i))));
        _mm256_storeu_si256((__m256i*)(out + i), (__m256i)_mm512_cvtneps_pbh(f));
    }
}

/* One output tile, transposed (tr[i]: outputs n.. n + 15 of B row b0 + i), into y: float rows scaled
 * and biased; int8's pairs of rows (a token's two terms) summed in int8_output's order. */
ALWAYS_INLINE void tile_epilogue(const QLinear* L, const __m512 tr[16], int b0, int b_rows, const float* xa, int n,
                                 float* y) {
    const int64_t N = L->N;
    const __m512 s = L->kind != LINEAR_BF16 ? _mm512_loadu_ps(L->scale + n) : _mm512_set1_ps(1.f);
    const __m512 bias = L->bias ? _mm512_loadu_ps(L->bias + n) : _mm512_setzero_ps();
    if (L->kind != LINEAR_INT8) {
        for (int i = 0; i < 16 && b0 + i < b_rows; i++)
            _mm512_storeu_ps(y + (b0 + i) * N + n, _mm512_add_ps(_mm512_mul_ps(tr[i], s), bias));
        return;
    }
    const __m512i off = _mm512_slli_epi32(_mm512_loadu_si512(L->qsum + n), 7);  /* 128 sum_k q */
    for (int i = 0, b = b0; i < 8 && b < b_rows; i++, b += 2) {
        const __m512 d1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_castps_si512(tr[2 * i]), off));
        const __m512 d2 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_castps_si512(tr[2 * i + 1]), off));
        const __m512 v1 = _mm512_mul_ps(_mm512_mul_ps(d1, _mm512_set1_ps(xa[b])), s);
        const __m512 v2 = _mm512_mul_ps(_mm512_mul_ps(d2, _mm512_set1_ps(xa[b + 1])), s);
        _mm512_storeu_ps(y + (b / 2) * N + n, _mm512_add_ps(_mm512_add_ps(v1, v2), bias));
    }
}

/* y [M, N] from A (the weights, or for int8_a16 their bf16 widening) and x packed to B tiles (xt):
 * y = epilogue of the int32 (int8) or float sums. N a multiple of 32; K of 64 (int8) or 32. For int8
 * the B rows are the 2M rows of quantize_rows: a tile's 16 columns are 8 tokens' two rows. Each 16 x 16
 * output tile C[n][m] is transposed in registers, so that whole runs of 16 outputs of a row are stored. */
static void linear_amx(const QLinear* L, int M, const uint8_t* xt, const float* xa, float* y) {
    const int N = L->N, K = L->K, int8 = L->kind == LINEAR_INT8, widen = L->kind == LINEAR_INT8_A16;
    const int row_bytes = int8 ? K : 2 * K, chunks = row_bytes / 64, b_rows = int8 ? 2 * M : M;
    const int tiles = (b_rows + 15) / 16;
    #pragma omp parallel
    {
        tiles_configure();
        uint16_t* wide = widen ? (uint16_t*)aligned_alloc(64, (size_t)32 * K * 2) : NULL;
        float c[1024] __attribute__((aligned(64)));  /* int32 for int8 */
        #pragma omp for schedule(static)
        for (int n0 = 0; n0 < N; n0 += 32) {
            const uint8_t* w = (const uint8_t*)L->q + (int64_t)n0 * (widen ? K : row_bytes);
            if (widen) { widen_rows_bf16((const int8_t*)w, 32, K, wide); w = (const uint8_t*)wide; }
            for (int t = 0; t < tiles; t += 2) {
                const int two = t + 1 < tiles;
                const uint8_t* next = widen || n0 + 32 >= N || t > 0 ? NULL : w + 32 * (int64_t)row_bytes;
                amx_block(int8, w, next, row_bytes, xt + (int64_t)t * chunks * 1024, chunks, two, c);
                for (int j = 0; j < 1 + two; j++)
                    for (int h = 0; h < 2; h++) {
                        __m512 tr[16];
                        transpose16(c + (j * 2 + h) * 256, tr);
                        tile_epilogue(L, tr, 16 * (t + j), b_rows, xa, n0 + 16 * h, y);
                    }
            }
        }
        free(wide);
        _tile_release();
    }
}

static int amx_applies(const QLinear* L) {
    const int k_unit = L->kind == LINEAR_INT8 ? 64 : 32;
    return amx_on && L->kind != LINEAR_INT4 && L->N % 32 == 0 && L->K % k_unit == 0;
}
#else
int fused_use_amx(int on) { (void)on; return 0; }
static int amx_applies(const QLinear* L) { (void)L; return 0; }
#endif

/* xu / xa: scratch for the quantized activations: int8 bytes or bf16 (M x the largest K x 2 bytes) in xu,
 * then room for them packed as AMX tiles (the same, M rounded up to 16);
 * per-row scales (int8) or per-group scales and sums (int4: 2 x M x K / 32) in xa */
static void linear(const QLinear* L, const float* x, int M, uint8_t* xu, float* xa, float* y) {
    const int K = L->K, amx = amx_applies(L);
    /* the input rows in the form both the tiles and the plain kernels multiply */
    if (L->kind == LINEAR_INT8) quantize_rows(x, M, K, xu, xa);
    else if (L->kind == LINEAR_BF16 || (amx && L->kind == LINEAR_INT8_A16))
        for (int64_t i = 0; i < (int64_t)M * K; i++) ((uint16_t*)xu)[i] = f32_to_bf16(x[i]);
#if HAVE_AMX
    if (amx) {
        uint8_t* xt = xu + (((int64_t)M * K * 2 + 63) / 64) * 64;
        const int int8 = L->kind == LINEAR_INT8;  /* 2M int8 rows, or M bf16 ones */
        pack_b_tiles(xu, int8 ? 2 * M : M, int8 ? K : 2 * K, (uint32_t*)xt);
        linear_amx(L, M, xt, xa, y);
        return;
    }
#endif
    if (L->kind == LINEAR_INT8) linear_int8(L, xu, xa, M, y);
    else if (L->kind == LINEAR_INT4) linear_int4(L, x, M, (int8_t*)xu, xa, y);
    else if (L->kind == LINEAR_BF16) linear_bf16(L, (const uint16_t*)xu, M, y);
    else linear_int8_a16(L, x, M, xa, y);
}

/* Bytes of xu scratch for M rows of at most max_k inputs. */
static int64_t xu_bytes(int M, int max_k) {
    return (((int64_t)M * max_k * 2 + 63) / 64) * 64 + (int64_t)((M + 15) / 16) * 16 * max_k * 2;
}

/* One matmul of M rows on its own (the LM head after a fused step). */
int fused_linear(const QLinear* L, const float* x, int M, float* y) {
    const int k = L->K > 64 ? L->K : 64;
    uint8_t* xu = (uint8_t*)aligned_alloc(64, ((xu_bytes(M, k) + 63) / 64) * 64);
    float* xa = (float*)aligned_alloc(64, (((int64_t)M * k * 4 + 63) / 64) * 64);
    if (!xu || !xa) { free(xu); free(xa); return -1; }
    linear(L, x, M, xu, xa, y);
    free(xu); free(xa);
    return 0;
}

/* ---------------- KV write ---------------- */
static void write_kv(const DecodeStep* s, const DecodeLayer* layer, const float* qkv, int stride) {
    const int Hk = s->Hk, D = s->D, q_size = s->Hq * D, kv_size = Hk * D;
    for (int t = 0; t < s->M; t++) {
        const float* src[2] = {qkv + (int64_t)t * stride + q_size, qkv + (int64_t)t * stride + q_size + kv_size};
        void* dst[2] = {layer->k_cache, layer->v_cache};
        float* dst_scale[2] = {layer->k_scale, layer->v_scale};
        const int64_t base = s->slots[t] * Hk;  /* (slot, head 0) */
        for (int kv = 0; kv < 2; kv++) {
            for (int h = 0; h < Hk; h++) {
                const float* v = src[kv] + h * D;
                const int64_t row = (base + h) * D;
                if (s->cache_kind == CACHE_F32) {
                    memcpy((float*)dst[kv] + row, v, sizeof(float) * D);
                } else if (s->cache_kind == CACHE_BF16) {
                    uint16_t* o = (uint16_t*)dst[kv] + row;
                    for (int d = 0; d < D; d++) o[d] = f32_to_bf16(v[d]);
                } else {  /* int8, one scale per (token, head): as kv_quant.quantize */
                    float mx = 0.f;
                    for (int d = 0; d < D; d++) mx = fmaxf(mx, fabsf(v[d]));
                    const float sc = fmaxf(mx, 1e-8f) / 127.f;
                    int8_t* o = (int8_t*)dst[kv] + row;
                    for (int d = 0; d < D; d++) {
                        float q = nearbyintf(v[d] / sc);
                        o[d] = (int8_t)(q > 127.f ? 127.f : (q < -127.f ? -127.f : q));
                    }
                    dst_scale[kv][base + h] = sc;
                }
            }
        }
    }
}

static void attend(const DecodeStep* s, const DecodeLayer* layer, const float* q, float* out) {
    const int args[] = {s->M, s->Hq, s->Hk, s->D, s->BS, s->max_blocks};
#define ATTEND(FN, T) FN(q, (const T*)layer->k_cache, (const T*)layer->v_cache, s->tables, s->ctx_lens, out, \
    args[0], args[1], args[2], args[3], args[4], args[5], s->attn_scale, layer->k_scale, layer->v_scale, \
    s->tree_start, s->tree_bits)
#if HAVE_AMX
    if (amx_on && s->cache_kind == CACHE_BF16 && ATTEND(paged_decode_amx_f32_bf16, uint16_t)) return;
#endif
    if (s->cache_kind == CACHE_F32) ATTEND(paged_decode_f32_f32, float);
    else if (s->cache_kind == CACHE_BF16) ATTEND(paged_decode_f32_bf16, uint16_t);
    else ATTEND(paged_decode_f32_i8, int8_t);
#undef ATTEND
}

static int max4(int a, int b, int c, int d) {
    int m = a > b ? a : b;
    m = m > c ? m : c;
    return m > d ? m : d;
}

/* ---------------- the step ---------------- */
int fused_decode_step(const DecodeLayer* layers, const DecodeStep* s) {
    const int M = s->M, H = s->H, D = s->D, q_size = s->Hq * D;
    const int qkv_n = layers[0].qkv.N, gu_n = layers[0].gate_up.N;
    const int max_k = max4(H, q_size, s->I, 64);
    /* one allocation for the step's scratch: residual, normed, qkv, q, attention out, gate_up, act, quantized x */
    const int64_t floats = (int64_t)M * (2 * H + qkv_n + 2 * q_size + gu_n + s->I + max_k);  /* xa: M x max_k */
    float* buf = (float*)aligned_alloc(64, ((floats * 4 + xu_bytes(M, max_k) + 63) / 64) * 64);
    if (!buf) return -1;
    float* residual = buf;
    float* h = residual + (int64_t)M * H;
    float* qkv = h + (int64_t)M * H;
    float* q = qkv + (int64_t)M * qkv_n;
    float* attn = q + (int64_t)M * q_size;
    float* gu = attn + (int64_t)M * q_size;
    float* act = gu + (int64_t)M * gu_n;
    float* xa = act + (int64_t)M * s->I;
    uint8_t* xu = (uint8_t*)(xa + (int64_t)M * max_k);
    float* x = s->x;

    memcpy(residual, x, sizeof(float) * M * H);
    add_rmsnorm_f32(residual, NULL, layers[0].input_norm, h, M, H, s->eps);
    for (int i = 0; i < s->num_layers; i++) {
        const DecodeLayer* L = &layers[i];
        if (i > 0) add_rmsnorm_f32(x, residual, L->input_norm, h, M, H, s->eps);
        linear(&L->qkv, h, M, xu, xa, qkv);
        rotary_f32(qkv, M, qkv_n, s->Hq + s->Hk, D, s->cos, s->sin);
        write_kv(s, L, qkv, qkv_n);
        for (int t = 0; t < M; t++) memcpy(q + (int64_t)t * q_size, qkv + (int64_t)t * qkv_n, sizeof(float) * q_size);
        attend(s, L, q, attn);
        linear(&L->o, attn, M, xu, xa, h);
        add_rmsnorm_f32(h, residual, L->post_norm, h, M, H, s->eps);
        linear(&L->gate_up, h, M, xu, xa, gu);
        silu_mul_f32(gu, act, M, s->I);
        linear(&L->down, act, M, xu, xa, x);
    }
    add_rmsnorm_f32(x, residual, s->final_norm, x, M, H, s->eps);
    free(buf);
    return 0;
}
