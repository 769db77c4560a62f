/* Paged attention for single-token queries (decodes), reading K/V straight from the block pool.
 * The torch fallback gathers every request's blocks into a padded copy first; this reads each key
 * and value once. One (request, kv head) pair per OpenMP task; the g = Hq / Hk query heads that
 * share a kv head are computed together, one block of keys at a time, with a running softmax. */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

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

#define DEFINE_KERNEL(NAME, T, LOAD, STORE)                                                              \
void NAME(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables, const int64_t* ctx_lens, \
          T* out, int B, int Hq, int Hk, int D, int BS, int max_blocks, float scale) {                    \
    const int g = Hq / Hk;                                                                               \
    _Pragma("omp parallel for collapse(2) schedule(dynamic, 1)")                                         \
    for (int b = 0; b < B; b++) {                                                                        \
        for (int h = 0; h < Hk; h++) {                                                                   \
            float qf[MAX_G][MAX_D], acc[MAX_G][MAX_D], m[MAX_G], l[MAX_G], s[MAX_G][MAX_BS];             \
            for (int i = 0; i < g; i++) {                                                                \
                const T* qp = q + ((int64_t)b * Hq + h * g + i) * D;                                     \
                for (int d = 0; d < D; d++) { qf[i][d] = LOAD(qp[d]) * scale; acc[i][d] = 0.f; }        \
                m[i] = -INFINITY; l[i] = 0.f;                                                            \
            }                                                                                            \
            const int64_t n = ctx_lens[b];                                                               \
            for (int64_t start = 0; start < n; start += BS) {                                            \
                const int64_t block = tables[(int64_t)b * max_blocks + start / BS];                      \
                const int cnt = (int)((n - start) < BS ? (n - start) : BS);                              \
                for (int j = 0; j < cnt; j++) {                                                          \
                    const T* kp = k_cache + ((block * BS + j) * Hk + h) * D;                             \
                    float kf[MAX_D];                                                                     \
                    for (int d = 0; d < D; d++) kf[d] = LOAD(kp[d]);                                     \
                    for (int i = 0; i < g; i++) s[i][j] = dot16(qf[i], kf, D);                           \
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
                    const T* vp = v_cache + ((block * BS + j) * Hk + h) * D;                             \
                    for (int i = 0; i < g; i++) {                                                        \
                        const float p = s[i][j];                                                         \
                        for (int d = 0; d < D; d++) acc[i][d] += p * LOAD(vp[d]);                        \
                    }                                                                                    \
                }                                                                                        \
            }                                                                                            \
            for (int i = 0; i < g; i++) {                                                                \
                T* op = out + ((int64_t)b * Hq + h * g + i) * D;                                         \
                const float inv = 1.f / l[i];                                                            \
                for (int d = 0; d < D; d++) op[d] = STORE(acc[i][d] * inv);                              \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
}

#define ID(x) (x)
DEFINE_KERNEL(paged_decode_f32, float, ID, ID)
DEFINE_KERNEL(paged_decode_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

int kvflow_kernel_limits(int* max_g, int* max_d, int* max_bs) {
    *max_g = MAX_G; *max_d = MAX_D; *max_bs = MAX_BS;
    return 1;
}
