/* Paged attention for single-token queries (decodes), reading K/V straight from the block pool.
 * The torch fallback gathers every request's blocks into a padded copy first; this reads each key
 * and value once. One (request, kv head) pair per OpenMP task; the g = Hq / Hk query heads that
 * share a kv head are computed together, one block of keys at a time, with a running softmax.
 *
 * The cache may be stored in another precision than the queries (kv_cache_dtype): float32,
 * bfloat16, float8 e4m3 (no scale) or int8 with one float32 scale per (token, kv head), kept in
 * k_scale / v_scale laid out as [num_blocks, block_size, Hk]. Each key or value row is converted
 * to float32 once, in registers-sized scratch; the cache is never copied. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* float8 e4m3fn -> float32 through a 256-entry table (1 KiB, stays in L1). */
static float fp8_table[256];

__attribute__((constructor)) static void fill_fp8_table(void) {
    for (int x = 0; x < 256; x++) {
        const int sign = x >> 7, exp = (x >> 3) & 15, man = x & 7;
        float v;
        if (exp == 15 && man == 7) v = NAN;                       /* e4m3fn has no infinities */
        else if (exp == 0) v = ldexpf((float)man / 8.f, -6);      /* subnormal */
        else v = ldexpf(1.f + (float)man / 8.f, exp - 7);
        fp8_table[x] = sign ? -v : v;
    }
}

static inline float fp8_to_f32(uint8_t x) { return fp8_table[x]; }
static inline float i8_to_f32(int8_t x) { return (float)x; }

/* 16 independent partial sums, so the compiler vectorises without reassociating (no -ffast-math). */
static inline float dot16(const float* restrict a, const float* restrict b, int n) {
    float part[16] = {0};
    int d = 0;
    for (; d + 16 <= n; d += 16)
        for (int e = 0; e < 16; e++) part[e] += a[d + e] * b[d + e];
    float sum = 0.f;
    for (; d < n; d++) sum += a[d] * b[d];
    for (int e = 0; e < 16; e++) sum += part[e];
    return sum;
}

#define MAX_G 32
#define MAX_D 256
#define MAX_BS 64

/* QT: query/output element type; CT: cache element type. */
#define DEFINE_KERNEL(NAME, QT, QLOAD, QSTORE, CT, CLOAD)                                                \
void NAME(const QT* q, const CT* k_cache, const CT* v_cache, const int64_t* tables, const int64_t* ctx_lens, \
          QT* out, int B, int Hq, int Hk, int D, int BS, int max_blocks, float scale,                   \
          const float* k_scale, const float* v_scale) {                                                  \
    const int g = Hq / Hk;                                                                               \
    _Pragma("omp parallel for collapse(2) schedule(dynamic, 1)")                                         \
    for (int b = 0; b < B; b++) {                                                                        \
        for (int h = 0; h < Hk; h++) {                                                                   \
            float qf[MAX_G][MAX_D], acc[MAX_G][MAX_D], m[MAX_G], l[MAX_G], s[MAX_G][MAX_BS];             \
            float kf[MAX_D], vf[MAX_D];                                                                  \
            for (int i = 0; i < g; i++) {                                                                \
                const QT* qp = q + ((int64_t)b * Hq + h * g + i) * D;                                    \
                for (int d = 0; d < D; d++) { qf[i][d] = QLOAD(qp[d]) * scale; acc[i][d] = 0.f; }       \
                m[i] = -INFINITY; l[i] = 0.f;                                                            \
            }                                                                                            \
            const int64_t n = ctx_lens[b];                                                               \
            for (int64_t start = 0; start < n; start += BS) {                                            \
                const int64_t block = tables[(int64_t)b * max_blocks + start / BS];                      \
                const int cnt = (int)((n - start) < BS ? (n - start) : BS);                              \
                for (int j = 0; j < cnt; j++) {                                                          \
                    const int64_t row = (block * BS + j) * Hk + h;                                       \
                    const CT* kp = k_cache + row * D;                                                    \
                    for (int d = 0; d < D; d++) kf[d] = CLOAD(kp[d]);                                    \
                    const float ks = k_scale ? k_scale[row] : 1.f;                                       \
                    for (int i = 0; i < g; i++) s[i][j] = dot16(qf[i], kf, D) * ks;                      \
                }                                                                                        \
                for (int i = 0; i < g; i++) {                                                            \
                    float mx = m[i];                                                                     \
                    for (int j = 0; j < cnt; j++) mx = s[i][j] > mx ? s[i][j] : mx;                      \
                    const float corr = expf(m[i] - mx);                                                  \
                    l[i] *= corr;                                                                        \
                    for (int d = 0; d < D; d++) acc[i][d] *= corr;                                       \
                    for (int j = 0; j < cnt; j++) { s[i][j] = expf(s[i][j] - mx); l[i] += s[i][j]; }     \
                    m[i] = mx;                                                                           \
                }                                                                                        \
                for (int j = 0; j < cnt; j++) {                                                          \
                    const int64_t row = (block * BS + j) * Hk + h;                                       \
                    const CT* vp = v_cache + row * D;                                                    \
                    for (int d = 0; d < D; d++) vf[d] = CLOAD(vp[d]);                                    \
                    const float vs = v_scale ? v_scale[row] : 1.f;                                       \
                    for (int i = 0; i < g; i++) {                                                        \
                        const float p = s[i][j] * vs;                                                    \
                        for (int d = 0; d < D; d++) acc[i][d] += p * vf[d];                              \
                    }                                                                                    \
                }                                                                                        \
            }                                                                                            \
            for (int i = 0; i < g; i++) {                                                                \
                QT* op = out + ((int64_t)b * Hq + h * g + i) * D;                                        \
                const float inv = 1.f / l[i];                                                            \
                for (int d = 0; d < D; d++) op[d] = QSTORE(acc[i][d] * inv);                             \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
}

/* name: paged_decode_<query dtype>_<cache dtype> */
DEFINE_KERNEL(paged_decode_f32_f32, float, ID, ID, float, ID)
DEFINE_KERNEL(paged_decode_f32_bf16, float, ID, ID, uint16_t, bf16_to_f32)
DEFINE_KERNEL(paged_decode_f32_fp8, float, ID, ID, uint8_t, fp8_to_f32)
DEFINE_KERNEL(paged_decode_f32_i8, float, ID, ID, int8_t, i8_to_f32)
DEFINE_KERNEL(paged_decode_bf16_f32, uint16_t, bf16_to_f32, f32_to_bf16, float, ID)
DEFINE_KERNEL(paged_decode_bf16_bf16, uint16_t, bf16_to_f32, f32_to_bf16, uint16_t, bf16_to_f32)
DEFINE_KERNEL(paged_decode_bf16_fp8, uint16_t, bf16_to_f32, f32_to_bf16, uint8_t, fp8_to_f32)
DEFINE_KERNEL(paged_decode_bf16_i8, uint16_t, bf16_to_f32, f32_to_bf16, int8_t, i8_to_f32)

int kvflow_kernel_limits(int* max_g, int* max_d, int* max_bs) {
    *max_g = MAX_G; *max_d = MAX_D; *max_bs = MAX_BS;
    return 1;
}
