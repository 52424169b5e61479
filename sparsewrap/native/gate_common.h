/* What the per-weight gate kernels share (hardconcrete.c, softmask.c): an inlined exp and streaming stores. */
#ifndef SPARSEWRAP_GATE_COMMON_H
#define SPARSEWRAP_GATE_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

/* exp(x) for |x| <= 87 (the callers clamp), inlined so that the loops stay free of calls: glibc's vector
 * expf is a function call per vector, around which the loop must spill its live registers (the forward
 * kernel on ResNet-18's 11 M gates was 19 % slower with it at one thread, 24 % at two). x = n ln2 + r with
 * |r| <= ln2 / 2 (Cody-Waite: ln2 split in a high part exact in float and a low part), exp(r) by its Taylor
 * polynomial of degree 7 (truncation error below 7e-9 relative), times 2^n built in the exponent field.
 * Largest error over [-40, 40] on a grid of 8e7 points: 7.8e-8 relative (glibc's expf: 6.0e-8). */
static inline float sw_exp(float x) {
    const float n = rintf(x * 1.44269504088896341f);
    float r = fmaf(n, -0.693145751953125f, x);
    r = fmaf(n, -1.42860682030941723e-06f, r);
    float p = 1.0f / 5040.0f;
    p = fmaf(p, r, 1.0f / 720.0f);
    p = fmaf(p, r, 1.0f / 120.0f);
    p = fmaf(p, r, 1.0f / 24.0f);
    p = fmaf(p, r, 1.0f / 6.0f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* dst[0, n) = src[0, n) with non-temporal stores where the CPU has them, for an output read only much later
 * (the gate gradient, read next by the optimizer): writing it then neither reads its old contents into the
 * caches first nor evicts what the next layers need (measured in docs/benchmarks.md). The sample is written
 * as computed: streaming it made the forward slower. src is a block
 * computed in L1. The caller issues the store fence (sw_store_fence) before other threads may read dst. */
static inline void sw_stream_out(float *restrict dst, const float *restrict src, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i < n && ((uintptr_t)(dst + i) & 63); i++) dst[i] = src[i];
    for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#elif defined(__AVX__)
    for (; i < n && ((uintptr_t)(dst + i) & 31); i++) dst[i] = src[i];
    for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#endif
    for (; i < n; i++) dst[i] = src[i];
}

static inline void sw_store_fence(void) {
#if defined(__AVX512F__) || defined(__AVX__)
    _mm_sfence();
#endif
}

#endif
