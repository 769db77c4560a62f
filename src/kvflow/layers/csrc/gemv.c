/* y[m, n] = sum_k x[m, k] * w[n, k] for a few rows m (decode batches). Memory-bound: each weight row
 * is read once from DRAM and used for every m; rows are split across the OpenMP threads. MKL's sgemm
 * reaches about 10 GB/s on this shape class here, a third of what the memory delivers. */
#include <stdint.h>

#define MAX_M 8

void gemv_f32(const float* restrict x, const float* restrict w, const float* restrict bias, float* restrict y,
              int M, int N, int K) {
    _Pragma("omp parallel for schedule(static)")
    for (int n = 0; n < N; n++) {
        const float* wr = w + (int64_t)n * K;
        float part[MAX_M][16];
        for (int m = 0; m < M; m++)
            for (int e = 0; e < 16; e++) part[m][e] = 0.f;
        int k = 0;
        for (; k + 16 <= K; k += 16)
            for (int m = 0; m < M; m++)
                for (int e = 0; e < 16; e++) part[m][e] += x[(int64_t)m * K + k + e] * wr[k + e];
        for (int m = 0; m < M; m++) {
            float s = 0.f;
            for (int kk = k; kk < K; kk++) s += x[(int64_t)m * K + kk] * wr[kk];
            for (int e = 0; e < 16; e++) s += part[m][e];
            y[(int64_t)m * N + n] = s + (bias ? bias[n] : 0.f);
        }
    }
}
