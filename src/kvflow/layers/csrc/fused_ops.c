/* The non-matmul work of a decoder layer, one pass each instead of a chain of torch ops:
 *   add_rmsnorm: residual += x (in place), out = rmsnorm(residual) * w     (or out = rmsnorm(x) * w)
 *   silu_mul:    out = silu(gate) * up, reading [gate | up] rows of the fused gate_up matmul
 *   rotary:      rotate-half rotary embedding of q and k heads in place, inside the qkv rows
 * Float32 and bfloat16 (uint16 storage) versions; bfloat16 math runs in float32 and rounds where
 * Hugging Face's bf16 Llama rounds (the residual sum, the normalised value, the weight product).
 * Rows go to OpenMP threads only when there are enough of them to pay for waking the threads. */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf(float f) {  /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline float round_bf(float f) { return bf(to_bf(f)); }

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
void add_rmsnorm_f32(const float* x, float* residual, const float* w, float* out, int T, int H, float eps) {
    _Pragma("omp parallel for schedule(static) if(T >= PAR_ROWS)")
    for (int t = 0; t < T; t++) {
        const float* xr = x + (int64_t)t * H;
        float* src = residual ? residual + (int64_t)t * H : (float*)xr;
        float part[16] = {0};
        if (residual)
            for (int i = 0; i < H; i++) src[i] += xr[i];
        int i = 0;
        for (; i + 16 <= H; i += 16)
            for (int e = 0; e < 16; e++) part[e] += src[i + e] * src[i + e];
        float ss = 0.f;
        for (; i < H; i++) ss += src[i] * src[i];
        for (int e = 0; e < 16; e++) ss += part[e];
        const float inv = 1.f / sqrtf(ss / (float)H + eps);
        float* o = out + (int64_t)t * H;
        for (int j = 0; j < H; j++) o[j] = w[j] * (src[j] * inv);
    }
}

void add_rmsnorm_bf16(const uint16_t* x, uint16_t* residual, const uint16_t* w, uint16_t* out, int T, int H,
                      float eps) {
    _Pragma("omp parallel for schedule(static) if(T >= PAR_ROWS)")
    for (int t = 0; t < T; t++) {
        const uint16_t* xr = x + (int64_t)t * H;
        const uint16_t* src = xr;
        if (residual) {
            uint16_t* rr = residual + (int64_t)t * H;
            for (int i = 0; i < H; i++) rr[i] = to_bf(bf(rr[i]) + bf(xr[i]));
            src = rr;
        }
        float part[16] = {0};
        int i = 0;
        for (; i + 16 <= H; i += 16)
            for (int e = 0; e < 16; e++) { const float v = bf(src[i + e]); part[e] += v * v; }
        float ss = 0.f;
        for (; i < H; i++) ss += bf(src[i]) * bf(src[i]);
        for (int e = 0; e < 16; e++) ss += part[e];
        const float inv = 1.f / sqrtf(ss / (float)H + eps);
        uint16_t* o = out + (int64_t)t * H;
        for (int j = 0; j < H; j++) o[j] = to_bf(bf(w[j]) * round_bf(bf(src[j]) * inv));
    }
}

/* ---------------- SiLU(gate) * up ---------------- */
void silu_mul_f32(const float* gu, float* out, int T, int I) {
    _Pragma("omp parallel for schedule(static) if(T >= PAR_ROWS)")
    for (int t = 0; t < T; t++) {
        const float* g = gu + (int64_t)t * 2 * I;
        const float* u = g + I;
        float* o = out + (int64_t)t * I;
        for (int i = 0; i < I; i++) o[i] = silu(g[i]) * u[i];
    }
}

void silu_mul_bf16(const uint16_t* gu, uint16_t* out, int T, int I) {
    _Pragma("omp parallel for schedule(static) if(T >= PAR_ROWS)")
    for (int t = 0; t < T; t++) {
        const uint16_t* g = gu + (int64_t)t * 2 * I;
        const uint16_t* u = g + I;
        uint16_t* o = out + (int64_t)t * I;
        for (int i = 0; i < I; i++) o[i] = to_bf(round_bf(silu(bf(g[i]))) * bf(u[i]));
    }
}

/* ---------------- rotary (rotate-half layout) ----------------
 * x: T rows of `stride` elements; heads [0, H) of D values each start at the row's start.
 * cos/sin: float32 [T, D] (the position's table row; both halves equal). */
void rotary_f32(float* x, int T, int stride, int H, int D, const float* cos, const float* sin) {
    const int half = D / 2;
    _Pragma("omp parallel for schedule(static) if(T >= PAR_ROWS)")
    for (int t = 0; t < T; t++) {
        const float* c = cos + (int64_t)t * D;
        const float* s = sin + (int64_t)t * D;
        for (int h = 0; h < H; h++) {
            float* p = x + (int64_t)t * stride + h * D;
            for (int i = 0; i < half; i++) {
                const float a = p[i], b = p[i + half];
                p[i] = a * c[i] - b * s[i];
                p[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

void rotary_bf16(uint16_t* x, int T, int stride, int H, int D, const float* cos, const float* sin) {
    const int half = D / 2;
    _Pragma("omp parallel for schedule(static) if(T >= PAR_ROWS)")
    for (int t = 0; t < T; t++) {
        const float* c = cos + (int64_t)t * D;
        const float* s = sin + (int64_t)t * D;
        for (int h = 0; h < H; h++) {
            uint16_t* p = x + (int64_t)t * stride + h * D;
            for (int i = 0; i < half; i++) {
                const float a = bf(p[i]), b = bf(p[i + half]);
                p[i] = to_bf(a * c[i] - b * s[i]);
                p[i + half] = to_bf(b * c[i + half] + a * s[i + half]);
            }
        }
    }
}
