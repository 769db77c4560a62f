/* A/B of decode attention builds over a bfloat16 cache, in one process, alternating call by call:
 * 30 layers of B requests at context C, every request in its own shuffled blocks (SmolLM2-135M's
 * shape: 9 query heads, 3 kv heads of 64). Each LIB is a kernel library (.so) and, after a colon, the
 * function to time (default paged_decode_f32_bf16; e.g. paged_decode_amx_f32_bf16 for the AMX one).
 *   cc -O2 scripts/ab_paged_decode.c -o /tmp/ab_paged_decode -ldl -fopenmp
 *   OMP_NUM_THREADS=2 /tmp/ab_paged_decode B C OLD.so NEW.so:paged_decode_amx_f32_bf16
 * BS=n sets the block size; SEQ=1 lays the blocks out in order; THP=1 asks for huge pages for the pool.
 * Prints each build's median and best ms over 21 alternating calls of all 30 layers. */
#include <dlfcn.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

typedef void (*attend_fn)(const float*, const uint16_t*, const uint16_t*, const int64_t*, const int64_t*, float*,
                          int, int, int, int, int, int, float, const float*, const float*, const int64_t*,
                          const int64_t*);

static int by_value(const void* a, const void* b) {
    const double x = *(const double*)a, y = *(const double*)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char** argv) {
    if (argc < 4) { fprintf(stderr, "usage: %s B CONTEXT LIB[:FUNCTION] ...\n", argv[0]); return 2; }
    enum { LAYERS = 30, ROUNDS = 21, MAX_LIBS = 8, Hq = 9, Hk = 3, D = 64 };
    const int B = atoi(argv[1]), ctx = atoi(argv[2]), libs = argc - 3 < MAX_LIBS ? argc - 3 : MAX_LIBS;
    const int BS = getenv("BS") ? atoi(getenv("BS")) : 16, nb = (ctx + BS - 1) / BS;
    attend_fn fn[MAX_LIBS];
    for (int v = 0; v < libs; v++) {
        char path[4096];
        snprintf(path, sizeof path, "%s", argv[3 + v]);
        char* colon = strchr(path, ':');
        const char* name = colon ? (*colon = 0, colon + 1) : "paged_decode_f32_bf16";
        void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        fn[v] = lib ? (attend_fn)dlsym(lib, name) : NULL;
        if (!fn[v]) { fprintf(stderr, "%s: %s\n", argv[3 + v], lib ? "no such function" : dlerror()); return 1; }
    }
    const size_t blocks = (size_t)B * nb * LAYERS, huge = 2u << 20;
    const size_t bytes = (blocks * BS * Hk * D * 2 + huge - 1) / huge * huge;
    uint16_t* kc = aligned_alloc(huge, bytes);
    uint16_t* vc = aligned_alloc(huge, bytes);
    int64_t* tables = malloc(sizeof(int64_t) * blocks);
    int64_t* ctx_lens = malloc(sizeof(int64_t) * B);
    float* q = malloc(sizeof(float) * B * Hq * D);
    float* out = malloc(sizeof(float) * B * Hq * D);
    if (!kc || !vc || !tables || !ctx_lens || !q || !out) { fprintf(stderr, "out of memory\n"); return 1; }
    if (getenv("THP")) { madvise(kc, bytes, MADV_HUGEPAGE); madvise(vc, bytes, MADV_HUGEPAGE); }
    for (size_t i = 0; i < bytes / 2; i++) { kc[i] = 0x3c00 + (i * 7919 % 512); vc[i] = 0x3c00 + (i * 104729 % 512); }
    srand(1);
    for (size_t i = 0; i < blocks; i++) tables[i] = (int64_t)i;
    if (!getenv("SEQ"))
        for (size_t i = blocks - 1; i > 0; i--) {
            const size_t j = (size_t)rand() % (i + 1);
            const int64_t t = tables[i]; tables[i] = tables[j]; tables[j] = t;
        }
    for (int b = 0; b < B; b++) ctx_lens[b] = ctx - b % 7;
    for (int i = 0; i < B * Hq * D; i++) q[i] = (float)(i % 17) * 0.01f;
    double ms[MAX_LIBS][ROUNDS];
    for (int r = 0; r < ROUNDS; r++)
        for (int v = 0; v < libs; v++) {
            const double start = omp_get_wtime();
            for (int l = 0; l < LAYERS; l++)
                fn[v](q, kc, vc, tables + (size_t)l * B * nb, ctx_lens, out, B, Hq, Hk, D, BS, nb, 0.125f, NULL, NULL,
                      NULL, NULL);
            ms[v][r] = (omp_get_wtime() - start) * 1e3;
        }
    for (int v = 0; v < libs; v++) {
        qsort(ms[v], ROUNDS, sizeof(double), by_value);
        printf("%-40s median %.2f ms (best %.2f)\n", argv[3 + v], ms[v][ROUNDS / 2], ms[v][0]);
    }
    return 0;
}
