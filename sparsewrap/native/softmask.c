/* Fused soft-mask kernels of Continuous Sparsification (Savarese et al. 2020) for float32 tensors on the CPU.
 *
 * Loaded with ctypes by sparsewrap/native/__init__.py (built as hardconcrete.c is, see there for the flags and
 * OpenMP). The math is the eager path of sparsewrap/parametrizations/soft_mask.py, one pass per direction:
 *
 *   m = sigmoid(beta s),   out = w c m,   total = sum(m) (double accumulation),   positive = #(s > 0)
 *   dL/dw = g c m,   dL/ds = beta m (1 - m) (g w c + dL/dtotal)
 *
 * The sigmoid's argument is clamped to [-80, 80] (no infinities under -ffast-math): beyond it m is 1 or below
 * 2e-35, and m (1 - m) under 2e-35. The slope m (1 - m) is computed without cancellation (sm_slope): where
 * sigmoid(beta s) rounds to 1 in float32 (beta s above about 17) it is e^(-beta s) here, 0 in the eager path.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#include "gate_common.h"

#define SM_BLOCK 4096
#define SM_PARALLEL_MIN 65536 /* elements below which one thread does it all */
#define SM_CLAMP 80.0f

static inline float sm_sigmoid(float x) {
    return 1.0f / (1.0f + sw_exp(-fminf(fmaxf(x, -SM_CLAMP), SM_CLAMP)));
}

/* sigmoid(x) into *m and its slope sigmoid(x) (1 - sigmoid(x)) as e / (1 + e)^2, e = exp(-x): no cancellation in
 * 1 - m where m nears 1 (the reciprocal is approximate under -ffast-math, so 1 - m would be its error there). */
static inline float sm_slope(float x, float *m) {
    const float e = sw_exp(-fminf(fmaxf(x, -SM_CLAMP), SM_CLAMP)), r = 1.0f / (1.0f + e);
    *m = r;
    return (e * r) * r;
}


/* out = w c sigmoid(beta s) over [0, n); *total = sum sigmoid(beta s), *positive = #(s > 0). */
void sw_sm_forward(const float *w, const float *s, float *out, int64_t n, float c, float beta, double *total,
                   int64_t *positive) {
    double sum = 0.0;
    int64_t pos = 0;
#pragma omp parallel for schedule(static) reduction(+ : sum, pos) if (n > SM_PARALLEL_MIN)
    for (int64_t b = 0; b < n; b += SM_BLOCK) {
        const int64_t e = b + SM_BLOCK < n ? b + SM_BLOCK : n;
        float acc = 0.0f;
        int32_t count = 0;
#pragma omp simd reduction(+ : acc, count)
        for (int64_t i = b; i < e; i++) {
            const float si = s[i], m = sm_sigmoid(beta * si);
            out[i] = w[i] * (c * m);
            acc += m;
            count += si > 0.0f ? 1 : 0;
        }
        sum += acc;
        pos += count;
    }
    *total = sum;
    *positive = pos;
}

/* dL/dw into gw (may alias g; NULL: not wanted) and dL/ds into gs (NULL: not wanted). g NULL: no gradient
 * reached the masked weight, only the sum's (gtotal). */
void sw_sm_backward(const float *g, const float *w, const float *s, float *gw, float *gs, int64_t n, float c,
                    float beta, float gtotal) {
#pragma omp parallel for schedule(static) if (n > SM_PARALLEL_MIN)
    for (int64_t b = 0; b < n; b += SM_BLOCK) {
        const int64_t e = b + SM_BLOCK < n ? b + SM_BLOCK : n;
        float gb[SM_BLOCK] __attribute__((aligned(64)));
        if (g == 0) {
#pragma omp simd
            for (int64_t i = b; i < e; i++) {
                float m;
                gb[i - b] = beta * sm_slope(beta * s[i], &m) * gtotal;
            }
        } else if (gs == 0) {
#pragma omp simd
            for (int64_t i = b; i < e; i++) gw[i] = g[i] * (c * sm_sigmoid(beta * s[i]));
            continue;
        } else if (gw == 0) {
#pragma omp simd
            for (int64_t i = b; i < e; i++) {
                float m;
                gb[i - b] = beta * sm_slope(beta * s[i], &m) * (g[i] * w[i] * c + gtotal);
            }
        } else {
#pragma omp simd
            for (int64_t i = b; i < e; i++) {
                float m;
                const float slope = sm_slope(beta * s[i], &m), gi = g[i];
                gb[i - b] = beta * slope * (gi * w[i] * c + gtotal);
                gw[i] = gi * (c * m);
            }
        }
        sw_stream_out(gs + b, gb, e - b);
        sw_store_fence();
    }
}
