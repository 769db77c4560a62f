/* Paged attention for single-token queries (decodes), reading K/V straight from the block pool.
 * The torch fallback gathers every request's blocks into a padded copy first; this reads each key
 * and value once. One (request, kv head) pair per OpenMP task; the g = Hq / Hk query heads that
 * share a kv head are computed together, in two passes: every visible key's score and the max, then
 * the weights exp(score - max), summed in key order, against the values in key order. So a query's
 * result depends only on which keys it sees and their order, not on where hidden keys sit between
 * them: a draft-tree node (its ancestors scattered over the tree's slots) equals the same token
 * decoded after its path was accepted and moved to contiguous slots, in any precision.
 * Consecutive rows that read the same blocks (one request's verify chunk or draft tree in the C
 * step) are one task too: each key is read once for all of them, and each row masks the keys past
 * its own length, so its result is bit for bit what it would be alone (masked keys add exact zeros).
 *
 * The cache may be stored in another precision than the queries (kv_cache_dtype): float32,
 * bfloat16, float8 e4m3 (no scale) or int8 with one float32 scale per (token, kv head), kept in
 * k_scale / v_scale laid out as [num_blocks, block_size, Hk]. Each key or value row is converted
 * to float32 once, in registers (AVX-512, head sizes that are a multiple of 16) or in a row of
 * scratch; the cache is never copied. The C step's bfloat16 caches score with AMX tiles where the CPU
 * has them (paged_decode_amx_f32_bf16, at the end). */
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"
#include "bf16.h"
#include "exp512.h"

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

#define MAX_G 32
#define MAX_D 256
#define MAX_BS 64

/* Per task: `rows` query rows reading the same blocks (`table`), each with hn kv heads from h on and
 * their g query heads: query vector (r * hn + hh) * g + i in qf [.][D], already multiplied by the
 * softmax scale; the outputs out [.][D] (float32) in the same order. Row r sees keys [0, n_of[r]),
 * less the draft-tree keys it does not descend from (ts_of, tb_of). */
#define HEAD_ARGS const float (*qf)[MAX_D], const int64_t* table, int rows, const int64_t* n_of,            \
    const int64_t* ts_of, const uint64_t* tb_of, int h, int hn, int g, int Hk, int D, int BS,              \
    const float* k_scale, const float* v_scale, float (*out)[MAX_D]

/* Draft trees: a node sees every key before tree_start (the committed context) and, past it, only its
 * ancestors and itself (bit p - tree_start of tree_bits set). Rows that are not tree nodes pass
 * tree_start = n. The first key is always visible, so every query's max score is finite. */
static inline int hidden_key(int64_t p, int64_t n, int64_t tree_start, uint64_t tree_bits) {
    return p >= n || (p >= tree_start && (p - tree_start >= 64 || !((tree_bits >> (p - tree_start)) & 1)));
}

static int64_t longest(const int64_t* n_of, int rows) {
    int64_t n = 0;
    for (int r = 0; r < rows; r++) n = n_of[r] > n ? n_of[r] : n;
    return n;
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

/* Scalar path: any head size, any CPU. */
#define DEFINE_HEAD_SCALAR(NAME, CT, CLOAD)                                                              \
static void NAME(const CT* k_cache, const CT* v_cache, HEAD_ARGS) {                                      \
    float acc[MAX_G][MAX_D], m[MAX_G], l[MAX_G], kf[MAX_D], vf[MAX_D];                                   \
    const int gt = rows * g;  /* the scalar path takes one kv head per task (hn = 1) */                  \
    const int64_t n = longest(n_of, rows);                                                               \
    float* S = (float*)malloc(sizeof(float) * gt * n);                                                   \
    (void)hn;                                                                                            \
    if (!S) return;                                                                                      \
    for (int i = 0; i < gt; i++) {                                                                       \
        for (int d = 0; d < D; d++) acc[i][d] = 0.f;                                                     \
        m[i] = -INFINITY;                                                                                \
    }                                                                                                    \
    for (int64_t p = 0; p < n; p++) {  /* pass 1: scores, and each query's max */                        \
        const int64_t row = (table[p / BS] * BS + p % BS) * Hk + h;                                      \
        const CT* kp = k_cache + row * D;                                                                \
        for (int d = 0; d < D; d++) kf[d] = CLOAD(kp[d]);                                                \
        const float ks = k_scale ? k_scale[row] : 1.f;                                                   \
        for (int r = 0; r < rows; r++) {                                                                 \
            const int hidden = hidden_key(p, n_of[r], ts_of[r], tb_of[r]);                               \
            for (int i = r * g; i < (r + 1) * g; i++) {                                                  \
                const float sc = hidden ? -INFINITY : dot16(qf[i], kf, D) * ks;                          \
                S[i * n + p] = sc;                                                                       \
                m[i] = sc > m[i] ? sc : m[i];                                                            \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    for (int i = 0; i < gt; i++) {  /* weights, summed in key order */                                   \
        float sum = 0.f;                                                                                 \
        for (int64_t p = 0; p < n; p++) { S[i * n + p] = expf(S[i * n + p] - m[i]); sum += S[i * n + p]; } \
        l[i] = sum;                                                                                      \
    }                                                                                                    \
    for (int64_t p = 0; p < n; p++) {  /* pass 2: values */                                              \
        const int64_t row = (table[p / BS] * BS + p % BS) * Hk + h;                                      \
        const CT* vp = v_cache + row * D;                                                                \
        for (int d = 0; d < D; d++) vf[d] = CLOAD(vp[d]);                                                \
        const float vs = v_scale ? v_scale[row] : 1.f;                                                   \
        for (int i = 0; i < gt; i++) {                                                                   \
            const float w = S[i * n + p] * vs;                                                           \
            for (int d = 0; d < D; d++) acc[i][d] += w * vf[d];                                          \
        }                                                                                                \
    }                                                                                                    \
    for (int i = 0; i < gt; i++) {                                                                       \
        const float inv = 1.f / l[i];                                                                    \
        for (int d = 0; d < D; d++) out[i][d] = acc[i][d] * inv;                                         \
    }                                                                                                    \
    free(S);                                                                                             \
}

DEFINE_HEAD_SCALAR(head_f32_scalar, float, ID)
DEFINE_HEAD_SCALAR(head_bf16_scalar, uint16_t, bf16_to_f32)
DEFINE_HEAD_SCALAR(head_fp8_scalar, uint8_t, fp8_to_f32)
DEFINE_HEAD_SCALAR(head_i8_scalar, int8_t, i8_to_f32)

#ifdef __AVX512F__
/* The next block's rows are fetched while this block's are used: blocks lie anywhere in the pool, so
 * the hardware prefetcher cannot guess them, and a batch's keys and values come from memory. */
static inline void prefetch_row(const void* p, int bytes) {
    for (int b = 0; b < bytes; b += 64) _mm_prefetch((const char*)p + b, _MM_HINT_T0);
}

/* 16 cache elements at p, widened to float32. */
static inline __m512 load16_f32(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_fp8(const uint8_t* p) {
    return _mm512_i32gather_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)), fp8_table, 4);
}
static inline __m512 load16_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

/* AVX-512 path, D a multiple of 16: a key or value row is widened once into nd = D / 16 registers and
 * used for all g query heads; the softmax of a block of scores runs 16 lanes at a time. */
#define DEFINE_HEAD_AVX512(NAME, CT, LOAD16)                                                             \
static void NAME(const CT* k_cache, const CT* v_cache, HEAD_ARGS) {                                      \
    const int nd = D / 16, gh = g * hn, gt = rows * gh;                                                  \
    const int64_t n = longest(n_of, rows), stride = (n + 15) & ~(int64_t)15;                             \
    float* S = (float*)aligned_alloc(64, sizeof(float) * gt * stride);                                   \
    __m512 acc[MAX_G][MAX_D / 16], row[MAX_D / 16];                                                      \
    float m[MAX_G], l[MAX_G];                                                                            \
    int hidden[MAX_G];                                                                                   \
    if (!S) return;                                                                                      \
    for (int i = 0; i < gt; i++) {                                                                       \
        for (int c = 0; c < nd; c++) acc[i][c] = _mm512_setzero_ps();                                    \
        m[i] = -INFINITY;                                                                                \
    }                                                                                                    \
    for (int64_t start = 0; start < n; start += BS) {  /* pass 1: scores, and each query's max */        \
        const int64_t block = table[start / BS];                                                         \
        const int cnt = (int)((n - start) < BS ? (n - start) : BS);                                      \
        const int64_t next = start + BS < n ? table[start / BS + 1] : block;                             \
        for (int j = 0; j < cnt; j++) {                                                                  \
            prefetch_row(k_cache + ((next * BS + j) * Hk + h) * D, hn * D * (int)sizeof(CT));            \
            for (int r = 0; r < rows; r++) hidden[r] = hidden_key(start + j, n_of[r], ts_of[r], tb_of[r]); \
            for (int hh = 0; hh < hn; hh++) {                                                            \
                const int64_t kr = (block * BS + j) * Hk + h + hh;                                       \
                const CT* kp = k_cache + kr * D;                                                         \
                for (int c = 0; c < nd; c++) row[c] = LOAD16(kp + 16 * c);                               \
                const float ks = k_scale ? k_scale[kr] : 1.f;                                            \
                for (int r = 0; r < rows; r++) {                                                         \
                    for (int i = r * gh + hh * g; i < r * gh + (hh + 1) * g; i++) {                      \
                        __m512 dot = _mm512_mul_ps(_mm512_loadu_ps(qf[i]), row[0]);                      \
                        for (int c = 1; c < nd; c++)                                                     \
                            dot = _mm512_fmadd_ps(_mm512_loadu_ps(qf[i] + 16 * c), row[c], dot);         \
                        const float sc = hidden[r] ? -INFINITY : _mm512_reduce_add_ps(dot) * ks;         \
                        S[i * stride + start + j] = sc;                                                  \
                        m[i] = sc > m[i] ? sc : m[i];                                                    \
                    }                                                                                    \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    for (int i = 0; i < gt; i++) {  /* weights exp(s - max), 16 at a time; their sum in key order */     \
        float* si = S + i * stride;                                                                      \
        const __m512 vmx = _mm512_set1_ps(m[i]);                                                         \
        for (int64_t p = 0; p < n; p += 16) {                                                            \
            const __mmask16 k = n - p >= 16 ? 0xFFFF : (__mmask16)((1u << (n - p)) - 1);                 \
            _mm512_mask_storeu_ps(si + p, k, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, si + p), vmx))); \
        }                                                                                                \
        float sum = 0.f;                                                                                 \
        for (int64_t p = 0; p < n; p++) sum += si[p];                                                    \
        l[i] = sum;                                                                                      \
    }                                                                                                    \
    for (int64_t start = 0; start < n; start += BS) {  /* pass 2: values, in key order */                \
        const int64_t block = table[start / BS];                                                         \
        const int cnt = (int)((n - start) < BS ? (n - start) : BS);                                      \
        const int64_t next = start + BS < n ? table[start / BS + 1] : block;                             \
        for (int j = 0; j < cnt; j++) {                                                                  \
            prefetch_row(v_cache + ((next * BS + j) * Hk + h) * D, hn * D * (int)sizeof(CT));            \
            for (int hh = 0; hh < hn; hh++) {                                                            \
                const int64_t vr = (block * BS + j) * Hk + h + hh;                                       \
                const CT* vp = v_cache + vr * D;                                                         \
                for (int c = 0; c < nd; c++) row[c] = LOAD16(vp + 16 * c);                               \
                const float vs = v_scale ? v_scale[vr] : 1.f;                                            \
                for (int r = 0; r < rows; r++) {                                                         \
                    for (int i = r * gh + hh * g; i < r * gh + (hh + 1) * g; i++) {                      \
                        const __m512 w = _mm512_set1_ps(S[i * stride + start + j] * vs);                 \
                        for (int c = 0; c < nd; c++) acc[i][c] = _mm512_fmadd_ps(w, row[c], acc[i][c]);  \
                    }                                                                                    \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    for (int i = 0; i < gt; i++) {                                                                       \
        const __m512 inv = _mm512_set1_ps(1.f / l[i]);                                                   \
        for (int c = 0; c < nd; c++) _mm512_storeu_ps(out[i] + 16 * c, _mm512_mul_ps(acc[i][c], inv));   \
    }                                                                                                    \
    free(S);                                                                                             \
}

DEFINE_HEAD_AVX512(head_f32_avx512, float, load16_f32)
DEFINE_HEAD_AVX512(head_bf16_avx512, uint16_t, load16_bf16)
DEFINE_HEAD_AVX512(head_fp8_avx512, uint8_t, load16_fp8)
DEFINE_HEAD_AVX512(head_i8_avx512, int8_t, load16_i8)
#define VECTOR(D) (((D) & 15) == 0)
#define HEAD(CTNAME) (VECTOR(D) ? head_##CTNAME##_avx512 : head_##CTNAME##_scalar)
#else
#define VECTOR(D) 0
#define HEAD(CTNAME) head_##CTNAME##_scalar
#endif

/* Kv heads per task: all of a request's (a cache slot holds every head's key in one contiguous row, so
 * this reads each row once, in order) when there are requests enough to keep the threads busy; else
 * one, so that a single long request still spreads over the threads. */
static int heads_per_task(int B, int Hk, int g, int vector) {
#ifdef _OPENMP
    const int threads = omp_get_max_threads();
#else
    const int threads = 1;
#endif
    if (!vector || B < 2 * threads) return 1;
    int hn = Hk;
    while (hn > 1 && (hn * g > MAX_G || Hk % hn)) hn--;
    return hn;
}

/* Splits rows [0, B) into runs of consecutive rows that read the same blocks (their table rows agree
 * over every block the run reads), at most `cap` rows each; writes the runs' first rows and B to
 * first[], returns the number of runs. Different requests' rows almost always differ at the first
 * block compared; equal ones (samples that share a prompt) may share a pass too: it reads the same keys. */
static int group_rows(const int64_t* tables, const int64_t* ctx_lens, int B, int max_blocks, int BS, int cap,
                      int* first) {
    int runs = 0;
    for (int b = 0; b < B;) {
        const int b0 = b;
        int64_t n = ctx_lens[b];
        first[runs++] = b++;
        while (b < B && b - b0 < cap) {
            const int64_t n2 = ctx_lens[b] > n ? ctx_lens[b] : n;
            const int64_t blocks = (n2 + BS - 1) / BS;
            if (memcmp(tables + (int64_t)b0 * max_blocks, tables + (int64_t)b * max_blocks, sizeof(int64_t) * blocks))
                break;
            n = n2;
            b++;
        }
    }
    first[runs] = B;
    return runs;
}

/* One task (the row run `run`, kv heads h.. h + hn - 1) of a kernel below, whose locals these use
 * (q, out, ctx_lens, tree_start, tree_bits, first, Hq, D, g, gh, scale): its rows' lengths and
 * tree fields, its queries scaled into qf (row r's query head i at r * gh + i), and its outputs, o in
 * the same order, stored back. QT: the query / output element type. */
#define TASK_LOCALS                                                                                      \
    float qf[MAX_G][MAX_D] __attribute__((aligned(64))), o[MAX_G][MAX_D] __attribute__((aligned(64)));  \
    int64_t n_of[MAX_G], ts_of[MAX_G];                                                                   \
    uint64_t tb_of[MAX_G];                                                                               \
    const int b0 = first[run], rows = first[run + 1] - b0
#define LOAD_TASK(QT, QLOAD)                                                                             \
    for (int r = 0; r < rows; r++) {                                                                     \
        const int b = b0 + r;                                                                            \
        n_of[r] = ctx_lens[b];                                                                           \
        ts_of[r] = tree_start ? tree_start[b] : ctx_lens[b];                                             \
        tb_of[r] = tree_start ? (uint64_t)tree_bits[b] : 0;                                              \
        const QT* qp = q + ((int64_t)b * Hq + h * g) * D;                                                \
        for (int i = 0; i < gh; i++)                                                                     \
            for (int d = 0; d < D; d++) qf[r * gh + i][d] = QLOAD(qp[i * D + d]) * scale;                \
    }
#define STORE_TASK(QT, QSTORE)                                                                           \
    for (int r = 0; r < rows; r++) {                                                                     \
        QT* op = out + ((int64_t)(b0 + r) * Hq + h * g) * D;                                             \
        for (int i = 0; i < gh; i++)                                                                     \
            for (int d = 0; d < D; d++) op[i * D + d] = QSTORE(o[r * gh + i][d]);                        \
    }

/* QT: query/output element type; CT: cache element type. */
#define DEFINE_KERNEL(NAME, QT, QLOAD, QSTORE, CT, CTNAME)                                               \
void NAME(const QT* q, const CT* k_cache, const CT* v_cache, const int64_t* tables, const int64_t* ctx_lens, \
          QT* out, int B, int Hq, int Hk, int D, int BS, int max_blocks, float scale,                    \
          const float* k_scale, const float* v_scale, const int64_t* tree_start, const int64_t* tree_bits) { \
    const int g = Hq / Hk, hn = heads_per_task(B, Hk, g, VECTOR(D)), gh = g * hn;                        \
    int* first = (int*)malloc(sizeof(int) * (B + 1));                                                    \
    if (!first) return;                                                                                  \
    const int runs = group_rows(tables, ctx_lens, B, max_blocks, BS, MAX_G / gh, first);                 \
    _Pragma("omp parallel for collapse(2) schedule(dynamic, 1)")                                         \
    for (int run = 0; run < runs; run++) {                                                               \
        for (int h = 0; h < Hk; h += hn) {                                                               \
            TASK_LOCALS;                                                                                 \
            LOAD_TASK(QT, QLOAD);                                                                        \
            HEAD(CTNAME)(k_cache, v_cache, (const float (*)[MAX_D])qf, tables + (int64_t)b0 * max_blocks, \
                         rows, n_of, ts_of, tb_of, h, hn, g, Hk, D, BS, k_scale, v_scale, o);             \
            STORE_TASK(QT, QSTORE);                                                                      \
        }                                                                                                \
    }                                                                                                    \
    free(first);                                                                                         \
}

/* name: paged_decode_<query dtype>_<cache dtype> */
DEFINE_KERNEL(paged_decode_f32_f32, float, ID, ID, float, f32)
DEFINE_KERNEL(paged_decode_f32_bf16, float, ID, ID, uint16_t, bf16)
DEFINE_KERNEL(paged_decode_f32_fp8, float, ID, ID, uint8_t, fp8)
DEFINE_KERNEL(paged_decode_f32_i8, float, ID, ID, int8_t, i8)
DEFINE_KERNEL(paged_decode_bf16_f32, uint16_t, bf16_to_f32, f32_to_bf16, float, f32)
DEFINE_KERNEL(paged_decode_bf16_bf16, uint16_t, bf16_to_f32, f32_to_bf16, uint16_t, bf16)
DEFINE_KERNEL(paged_decode_bf16_fp8, uint16_t, bf16_to_f32, f32_to_bf16, uint8_t, fp8)
DEFINE_KERNEL(paged_decode_bf16_i8, uint16_t, bf16_to_f32, f32_to_bf16, int8_t, i8)

/* ---------------- AMX tiles (bfloat16 caches, in the C step) ----------------
 * A batch's scores cost the kernel above several times what loading its keys costs: a 16-lane dot
 * product and a horizontal sum per key and query head. With AMX, 16 keys' scores against up to 16
 * queries (a row run's query heads of one kv head) are one tile multiply per 32 values of the head:
 * the block's key rows are the A tile as they lie in the pool (16 slots, Hk x D apart), the queries,
 * rounded to bfloat16, the B tile (packed once per task). Each key's score is computed alike wherever
 * it sits. The max, the weights, their sum and the values' pass are the kernel above's, lane by lane in
 * key order: the weights are not rounded, and the tiles do not sum the values, because a tile adds its
 * 32 keys' products in an order of its own (a draft-tree node, whose ancestors sit among other slots,
 * then parted from the token decoded after acceptance; tested). Returns 0 where it does not apply
 * (head size not a multiple of 32, blocks not of 16k slots, more than 16 query heads per kv head, no
 * tiles): the caller runs the kernel above. */
#if HAVE_AMX
#define AMX_HEADS 8  /* kv heads per task at most (their packed queries are 8 KiB each at D = 256) */

/* The queries of one kv head as a B tile per 32 values: row kk, lane i = query i's values 2kk and
 * 2kk + 1 (of the chunk) rounded to bfloat16, as f32_to_bf16 rounds; lanes past nq are 0. */
static void pack_queries(const float (*qf)[MAX_D], const int* lane_row, int nq, int chunks, uint32_t (*qt)[256]) {
    for (int c = 0; c < chunks; c++) {
        uint32_t m[16][16] __attribute__((aligned(64)));  /* [query][value pair] */
        for (int i = 0; i < 16; i++) {
            __m256i half[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
            for (int e = 0; e < 2 && i < nq; e++) half[e] = f32_to_bf16_16(_mm512_loadu_ps(qf[lane_row[i]] + 32 * c + 16 * e));
            _mm512_store_si512(m[i], _mm512_inserti64x4(_mm512_castsi256_si512(half[0]), half[1], 1));
        }
        __m512 t[16];
        transpose16(m, t);
        for (int kk = 0; kk < 16; kk++) _mm512_store_ps((float*)qt[c] + 16 * kk, t[kk]);
    }
}

/* One task, as the kernel above's (HEAD_ARGS, but rows x g <= 16): for each of the hn kv heads, the
 * rows x g queries' scores as tiles, into S (hn x the keys rounded up to 16, 16 lanes each); then the
 * weights and the values' pass over whole cache rows (every head's values at once), as above. */
static void head_bf16_amx(const uint16_t* k_cache, const uint16_t* v_cache, HEAD_ARGS, float* S) {
    const int nq = rows * g, chunks = D / 32, nd = D / 16;
    const int64_t n = longest(n_of, rows), n16 = (n + 15) & ~(int64_t)15, ld = (int64_t)Hk * D * 2;
    int64_t seen = n;  /* every row sees every key before this one */
    for (int r = 0; r < rows; r++) {
        seen = n_of[r] < seen ? n_of[r] : seen;
        seen = ts_of[r] < seen ? ts_of[r] : seen;
    }
#define SLOT(p) ((table[(p) / BS] * BS + (p) % BS) * Hk + h)
    int lane_row[AMX_HEADS][16];  /* head hh's lane i (row i / g, query head i % g) -> its query vector */
    uint32_t qt[AMX_HEADS][MAX_D / 32][256] __attribute__((aligned(64)));
    for (int hh = 0; hh < hn; hh++) {
        for (int i = 0; i < nq; i++) lane_row[hh][i] = (i / g * hn + hh) * g + i % g;
        pack_queries(qf, lane_row[hh], nq, chunks, qt[hh]);
    }
    __m512 vmax[AMX_HEADS], vsum[AMX_HEADS];
    for (int hh = 0; hh < hn; hh++) vmax[hh] = _mm512_set1_ps(-INFINITY);
    for (int64_t p0 = 0; p0 < n; p0 += 16) {  /* pass 1: scores [head][key][lane], each lane's max */
        if (p0 + 16 < n)
            for (int j = 0; j < 16; j++) prefetch_row(k_cache + SLOT(p0 + 16 + j) * D, hn * D * 2);
        const uint16_t* kp = k_cache + SLOT(p0) * D;
        __mmask16 hide[16] = {0};  /* per key: the lanes of rows that do not see it */
        for (int j = p0 >= seen ? 0 : (int)(seen - p0); j < 16; j++)
            for (int r = 0; r < rows; r++)
                if (hidden_key(p0 + j, n_of[r], ts_of[r], tb_of[r])) hide[j] |= (__mmask16)(((1u << g) - 1) << (r * g));
        for (int hh = 0; hh < hn; hh++) {
            _tile_zero(0);
            for (int c = 0; c < chunks; c++) {
                _tile_loadd(4, kp + hh * D + 32 * c, ld);
                _tile_loadd(5, qt[hh][c], 64);
                _tile_dpbf16ps(0, 4, 5);
            }
            float* sp = S + (hh * n16 + p0) * 16;
            _tile_stored(0, sp, 64);
            for (int j = 0; j < 16; j++) {
                const __m512 v = _mm512_mask_mov_ps(_mm512_load_ps(sp + 16 * j), hide[j], _mm512_set1_ps(-INFINITY));
                _mm512_store_ps(sp + 16 * j, v);
                vmax[hh] = _mm512_max_ps(vmax[hh], v);
            }
        }
    }
    for (int hh = 0; hh < hn; hh++) {  /* weights, and their sum in key order */
        vsum[hh] = _mm512_setzero_ps();
        for (int64_t p = 0; p < n; p++) {
            float* sp = S + (hh * n16 + p) * 16;
            const __m512 w = exp512(_mm512_sub_ps(_mm512_load_ps(sp), vmax[hh]));
            _mm512_store_ps(sp, w);
            vsum[hh] = _mm512_add_ps(vsum[hh], w);
        }
    }
    __m512 acc[MAX_G][MAX_D / 16], row[MAX_D / 16];  /* by lane: head hh's lane i at hh * nq + i */
    for (int i = 0; i < hn * nq; i++)
        for (int c = 0; c < nd; c++) acc[i][c] = _mm512_setzero_ps();
    for (int64_t p = 0; p < n; p++) {  /* pass 2: values, in key order, as the kernel above */
        if (p + BS < n) prefetch_row(v_cache + SLOT(p + BS) * D, hn * D * 2);
        for (int hh = 0; hh < hn; hh++) {
            const uint16_t* vp = v_cache + (SLOT(p) + hh) * D;
            for (int c = 0; c < nd; c++) row[c] = load16_bf16(vp + 16 * c);
            const float* w = S + (hh * n16 + p) * 16;
            for (int i = 0; i < nq; i++) {
                const __m512 wi = _mm512_set1_ps(w[i]);
                for (int c = 0; c < nd; c++) acc[hh * nq + i][c] = _mm512_fmadd_ps(wi, row[c], acc[hh * nq + i][c]);
            }
        }
    }
#undef SLOT
    for (int hh = 0; hh < hn; hh++) {
        float l[16];
        _mm512_storeu_ps(l, vsum[hh]);
        for (int i = 0; i < nq; i++) {
            const __m512 inv = _mm512_set1_ps(1.f / l[i]);
            for (int c = 0; c < nd; c++)
                _mm512_storeu_ps(out[lane_row[hh][i]] + 16 * c, _mm512_mul_ps(acc[hh * nq + i][c], inv));
        }
    }
    (void)k_scale; (void)v_scale;
}
#endif

int paged_decode_amx_f32_bf16(const float* q, const uint16_t* k_cache, const uint16_t* v_cache, const int64_t* tables,
                              const int64_t* ctx_lens, float* out, int B, int Hq, int Hk, int D, int BS,
                              int max_blocks, float scale, const float* k_scale, const float* v_scale,
                              const int64_t* tree_start, const int64_t* tree_bits) {
    const int g = Hq / Hk;
    (void)k_scale; (void)v_scale;  /* bfloat16 caches have no scales */
#if HAVE_AMX
    if (D % 32 || D > MAX_D || BS % 16 || g > 16 || !amx_permitted()) return 0;
    int* first = (int*)malloc(sizeof(int) * (B + 1));
    if (!first) return 0;
    const int runs = group_rows(tables, ctx_lens, B, max_blocks, BS, 16 / g, first);
    int widest = 0, hn = heads_per_task(B, Hk, g, 1);  /* fewer where a run's lanes overflow the accumulators */
    for (int run = 0; run < runs; run++) widest = first[run + 1] - first[run] > widest ? first[run + 1] - first[run] : widest;
    while (hn > 1 && (hn > AMX_HEADS || widest * g * hn > MAX_G || Hk % hn)) hn--;
    const int gh = g * hn;
    const int64_t n16 = (longest(ctx_lens, B) + 15) & ~(int64_t)15;
    int failed = 0;
    #pragma omp parallel reduction(|:failed)
    {
        tiles_configure();
        float* S = (float*)aligned_alloc(64, (size_t)hn * n16 * 64);
        failed = !S;
        #pragma omp for collapse(2) schedule(dynamic, 1)
        for (int run = 0; run < runs; run++) {
            for (int h = 0; h < Hk; h += hn) {
                if (!S) continue;
                TASK_LOCALS;
                LOAD_TASK(float, ID);
                head_bf16_amx(k_cache, v_cache, (const float (*)[MAX_D])qf, tables + (int64_t)b0 * max_blocks, rows,
                              n_of, ts_of, tb_of, h, hn, g, Hk, D, BS, NULL, NULL, o, S);
                STORE_TASK(float, ID);
            }
        }
        free(S);
        _tile_release();
    }
    free(first);
    return !failed;
#else
    (void)g;
    return 0;  /* no tiles in this build */
#endif
}

int kvflow_kernel_limits(int* max_g, int* max_d, int* max_bs) {
    *max_g = MAX_G; *max_d = MAX_D; *max_bs = MAX_BS;
    return 1;
}
