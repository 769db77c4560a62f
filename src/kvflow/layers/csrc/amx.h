/* AMX tile helpers shared by the C step's matmuls (fused_decode.c) and the decode attention
 * (paged_decode.c). HAVE_AMX: the compiler targets a CPU with AMX tiles (Sapphire Rapids and later);
 * whether the OS lets this process use them is amx_permitted(). */
#ifndef KVFLOW_AMX_H
#define KVFLOW_AMX_H
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__) && defined(__AVX512BF16__)
#define HAVE_AMX 1
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

int amx_permitted(void);  /* asks the OS for the tile state once; 1 if granted (fused_decode.c) */

static inline void tiles_configure(void) {  /* per thread: eight tiles of 16 rows x 64 bytes */
    struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) { c.colsb[t] = 64; c.rows[t] = 16; }
    _tile_loadconfig(&c);
}

/* The 16 x 16 block of 32-bit values at src (rows 64 bytes apart) transposed into t: t[m] lane r = src[r][m]. */
static inline __attribute__((always_inline)) void transpose16(const void* src, __m512 t[16]) {
    __m512 r[16], u[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_load_ps((const float*)src + 16 * i);
    for (int i = 0; i < 16; i += 2) {
        u[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        u[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(u[i], u[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 1] = _mm512_shuffle_ps(u[i], u[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[i + 2] = _mm512_shuffle_ps(u[i + 1], u[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 3] = _mm512_shuffle_ps(u[i + 1], u[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; i++) {
            u[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
            u[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
        }
    for (int i = 0; i < 8; i++) {
        t[i] = _mm512_shuffle_f32x4(u[i], u[i + 8], 0x88);
        t[i + 8] = _mm512_shuffle_f32x4(u[i], u[i + 8], 0xdd);
    }
}

#else
#define HAVE_AMX 0
#endif
#endif
