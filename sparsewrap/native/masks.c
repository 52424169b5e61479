/* Hard-mask kernels for float32 tensors on the CPU, with the mask packed one bit per weight.
 *
 * The masked parametrization (sparsewrap/parametrizations/masked.py) multiplies every weight gradient by its
 * 0/1 mask in backward. With a float mask that pass reads 8 bytes and writes 4 per weight; with the mask
 * packed in bits it reads 1/8 byte of mask, and a masked vector store writes zeros into the pruned lanes
 * only (no multiply, and the kept lanes are neither read nor written by the core). A per-channel mask zeroes
 * whole rows with memset and reads no gradient at all. Bits are little-endian: entry i is bit i % 64 of word
 * i / 64. Built into the same library as hardconcrete.c, with its flags.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define MASK_PARALLEL_MIN 262144 /* weights below which one thread does it all */

/* 1 when sw_mask_zero has a vector path on this build (callers keep torch's mul_ otherwise: the scalar loop
 * below is correct but slower than it) */
int sw_mask_vectorized(void) {
#if defined(__AVX512F__) || defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

/* The tensor comes last in sw_mask_zero and sw_mask_zero_rows, so that a caller can bind a mask's arguments
 * once (functools.partial over the ctypes function) and call it with the tensor alone. */

/* x[i] = 0 wherever bit i of keep is clear; x[i] untouched where it is set */
void sw_mask_zero(const uint64_t *keep, int64_t n, float *x) {
    const int64_t words = n / 64;
#pragma omp parallel for schedule(static) if (n > MASK_PARALLEL_MIN)
    for (int64_t k = 0; k < words; k++) {
        const uint64_t b = keep[k];
        if (b == ~(uint64_t)0) continue; /* all 64 kept */
        float *p = x + 64 * k;
#if defined(__AVX512F__)
        const __m512 zero = _mm512_setzero_ps();
        _mm512_mask_storeu_ps(p, (__mmask16)~b, zero);
        _mm512_mask_storeu_ps(p + 16, (__mmask16)~(b >> 16), zero);
        _mm512_mask_storeu_ps(p + 32, (__mmask16)~(b >> 32), zero);
        _mm512_mask_storeu_ps(p + 48, (__mmask16)~(b >> 48), zero);
#elif defined(__AVX2__)
        /* lane j of byte q is to be zeroed when bit j of that byte is clear: compare (byte & 1 << j) with 0 */
        const __m256 zero = _mm256_setzero_ps();
        const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        for (int q = 0; q < 8; q++) {
            const __m256i byte = _mm256_set1_epi32((int)((b >> (8 * q)) & 0xff));
            const __m256i cleared = _mm256_cmpeq_epi32(_mm256_and_si256(byte, lane_bit), _mm256_setzero_si256());
            _mm256_maskstore_ps(p + 8 * q, cleared, zero);
        }
#else
        for (int j = 0; j < 64; j++)
            if (!((b >> j) & 1)) p[j] = 0.0f;
#endif
    }
    for (int64_t i = words * 64; i < n; i++)
        if (!((keep[i / 64] >> (i % 64)) & 1)) x[i] = 0.0f;
}

/* Per-row masks (one bit per output channel, the row = that channel's len contiguous weights): memset the
 * pruned rows, read nothing else. */
void sw_mask_zero_rows(const uint64_t *keep, int64_t rows, int64_t len, float *x) {
#pragma omp parallel for schedule(static) if (rows * len > MASK_PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++)
        if (!((keep[r / 64] >> (r % 64)) & 1)) memset(x + r * len, 0, (size_t)len * sizeof(float));
}

/* keep[i / 64] bit i % 64 = (mask[i] != 0); keep has (n + 63) / 64 words, the tail bits of the last are 0 */
void sw_mask_pack(const float *mask, uint64_t *keep, int64_t n) {
    const int64_t words = (n + 63) / 64;
#pragma omp parallel for schedule(static) if (n > MASK_PARALLEL_MIN)
    for (int64_t k = 0; k < words; k++) {
        const int64_t lo = 64 * k, hi = lo + 64 < n ? lo + 64 : n;
        uint64_t b = 0;
        for (int64_t i = lo; i < hi; i++) b |= (uint64_t)(mask[i] != 0.0f) << (i - lo);
        keep[k] = b;
    }
}
