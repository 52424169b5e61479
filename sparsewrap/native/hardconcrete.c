/* Fused hard-concrete L0 gate kernels (Louizos et al. 2018) for float32 tensors on the CPU.
 *
 * Loaded with ctypes by sparsewrap/native/__init__.py, which compiles this file on first use; every function
 * works on the index range [lo, hi). Built with -fopenmp when the process runs torch's libgomp, the loops run
 * on that same OpenMP runtime (one thread pool, torch.set_num_threads applies); otherwise on one thread.
 * The math is the reference of sparsewrap/parametrizations/gated.py, written as one pass per direction:
 *
 *   u = eps + (1 - 2 eps) U(0, 1)        (counter-based: a hash of (key, index), so any range is reproducible)
 *   z = clamp(sigmoid((log(u / (1 - u)) + log_alpha) / beta) (zeta - gamma) + gamma, 0, 1)
 *   out = w z,   count = sum(sigmoid(log_alpha + shift))
 *   dL/dw = g z,  dL/dlog_alpha = g w (z - gamma)(zeta - z) / ((zeta - gamma) beta) [0 < z < 1]
 *                                 + dL/dcount p (1 - p),  p = sigmoid(log_alpha + shift)
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>

#include "gate_common.h"
#endif

#define GAMMA (-0.1f)
#define ZETA (1.1f)
#define STRETCH (ZETA - GAMMA)
#define EPS (1e-6f)
#define BLOCK 4096 /* a power of two */
#define PARALLEL_MIN 65536 /* elements below which one thread does it all */


static inline uint32_t mix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

/* The uniform of index i = (high << 32) + low, with khi = k1 ^ high: one murmur3 finalizer over a keyed
 * odd-multiplier sequence, a bijection of the index for given keys (both keys are fresh 32-bit draws every
 * forward). The loops pass the high word once per block, so that their vector lanes hold 32-bit integers. */
static inline float uniform_hash(uint32_t k0, uint32_t khi, uint32_t low) {
    uint32_t h = mix32((low ^ k0) * 0x9e3779b1u + khi);
    float u = ((float)(h >> 8) + 0.5f) * (1.0f / 16777216.0f); /* 24 bits, strictly inside (0, 1) */
    return EPS + (1.0f - 2.0f * EPS) * u;
}

static inline float uniform_at(uint32_t k0, uint32_t k1, int64_t i) {
    return uniform_hash(k0, k1 ^ (uint32_t)((uint64_t)i >> 32), (uint32_t)i);
}

/* the uniforms alone (tests check the gates against the reference formula with them) */
void sw_hc_uniform(float *u, int64_t lo, int64_t hi, uint32_t k0, uint32_t k1) {
#pragma omp parallel for simd schedule(static) if (hi - lo > PARALLEL_MIN)
    for (int64_t i = lo; i < hi; i++) u[i] = uniform_at(k0, k1, i);
}

/* The gate for uniform u and log_alpha la, and exp(-la) (shared with the count term).
 * exp(-(logit(u) + la) / beta) = q^(1/beta) with q = (1 - u) / u * exp(-la): one exp per weight; for
 * beta = 2/3 the power is q sqrt(q). The count term is sigmoid(la + shift) = 1 / (1 + exp(-la) exp(-shift)). */
static inline float gate_of(float u, float la, float inv_beta, int three_halves, float *en_out) {
    float en = sw_exp(-fminf(fmaxf(la, -40.0f), 40.0f)); /* no infinities: built with -ffast-math */
    float q = (1.0f - u) / u * en;
    float t = three_halves ? q * sqrtf(q) : powf(q, inv_beta);
    *en_out = en;
    return fminf(fmaxf(STRETCH / (1.0f + t) + GAMMA, 0.0f), 1.0f);
}

/* One forward element: clamps la[i] to [-bound, bound] first when CLAMP (writing the clamped value back only
 * where it changes: the projection of log_alpha after the previous optimizer step, done here instead of in
 * a separate pass), then the gate, the gated weight and the count term. */
#define FORWARD_BODY(THREE_HALVES, CLAMP)                                                                        \
    for (int32_t j = 0; j < n; j++) {                                                                            \
        float l = lab[j];                                                                                        \
        if (CLAMP) {                                                                                             \
            float lc = fminf(fmaxf(l, -bound), bound);                                                           \
            if (lc != l) lab[j] = lc;                                                                            \
            l = lc;                                                                                              \
        }                                                                                                        \
        float en, zz = gate_of(uniform_hash(k0, khi, low + (uint32_t)j), l, inv_beta, THREE_HALVES, &en);        \
        zp[j] = zz;                                                                                              \
        op[j] = wp[j] * zz;                                                                                      \
        acc += 1.0f / (1.0f + en * c);                                                                           \
    }

/* out = w z for a fresh sample z, stored in z for the backward (cheaper than recomputing it there); returns
 * sum(sigmoid(la + shift)) over the range in *count. bound > 0: clamp la in place first (see above). */
void sw_hc_forward(const float *w, float *la, float *out, float *z, int64_t lo, int64_t hi, uint32_t k0,
                   uint32_t k1, float inv_beta, float shift, int three_halves, float bound, double *count) {
    double total = 0.0;
    const float c = expf(-shift);
    /* blocks at multiples of BLOCK (a power of two), so that none crosses a multiple of 2^32 */
#pragma omp parallel for schedule(static) reduction(+ : total) if (hi - lo > PARALLEL_MIN)
    for (int64_t k = lo / BLOCK; k < (hi + BLOCK - 1) / BLOCK; k++) {
        const int64_t b = k * BLOCK > lo ? k * BLOCK : lo, e = (k + 1) * BLOCK < hi ? (k + 1) * BLOCK : hi;
        const int32_t n = (int32_t)(e - b);
        const uint32_t low = (uint32_t)b, khi = k1 ^ (uint32_t)((uint64_t)b >> 32);
        const float *wp = w + b;
        float *lab = la + b, *op = out + b, *zp = z + b;
        float acc = 0.0f;
        /* four copies of the loop, so that both branches are resolved outside it */
        if (three_halves && bound > 0.0f) {
#pragma omp simd reduction(+ : acc)
            FORWARD_BODY(1, 1)
        } else if (three_halves) {
#pragma omp simd reduction(+ : acc)
            FORWARD_BODY(1, 0)
        } else if (bound > 0.0f) {
#pragma omp simd reduction(+ : acc)
            FORWARD_BODY(0, 1)
        } else {
#pragma omp simd reduction(+ : acc)
            FORWARD_BODY(0, 0)
        }
        total += acc;
    }
    *count = total;
}

/* the sample alone (tests compare it with the reference formula) */
void sw_hc_sample(const float *la, float *z, int64_t lo, int64_t hi, uint32_t k0, uint32_t k1, float inv_beta,
                  int three_halves) {
#pragma omp parallel for simd schedule(static) if (hi - lo > PARALLEL_MIN)
    for (int64_t i = lo; i < hi; i++) {
        float en;
        z[i] = gate_of(uniform_at(k0, k1, i), la[i], inv_beta, three_halves, &en);
    }
}

static inline float count_slope(float la, float c) { /* p (1 - p) with p = sigmoid(la + shift), c = exp(-shift) */
    float p = 1.0f / (1.0f + sw_exp(-fminf(fmaxf(la, -40.0f), 40.0f)) * c);
    return p * (1.0f - p);
}

/* dL/dw into gw (may alias g; NULL: not wanted) and dL/dlog_alpha into gla, from the stored sample z.
 * g may be NULL (no gradient reached the gated weight): only the count term. gla is computed a block at a
 * time in L1 and streamed out (sw_stream_out, gate_common.h): it is next read by the optimizer, long after. */
void sw_hc_backward(const float *g, const float *w, const float *z, const float *la, float *gw, float *gla,
                    int64_t lo, int64_t hi, float inv_beta, float shift, float gcount) {
    const float c = expf(-shift), inv_stretch_beta = inv_beta / STRETCH;
#pragma omp parallel for schedule(static) if (hi - lo > PARALLEL_MIN)
    for (int64_t b = lo; b < hi; b += BLOCK) {
        const int64_t e = b + BLOCK < hi ? b + BLOCK : hi;
        float gb[BLOCK] __attribute__((aligned(64)));
        if (g == 0) {
#pragma omp simd
            for (int64_t i = b; i < e; i++) gb[i - b] = gcount * count_slope(la[i], c);
        } else if (gw == 0) {
#pragma omp simd
            for (int64_t i = b; i < e; i++) {
                float zz = z[i], inside = (zz > 0.0f && zz < 1.0f) ? 1.0f : 0.0f;
                gb[i - b] = inside * g[i] * w[i] * (zz - GAMMA) * (ZETA - zz) * inv_stretch_beta +
                            gcount * count_slope(la[i], c);
            }
        } else {
#pragma omp simd
            for (int64_t i = b; i < e; i++) {
                float zz = z[i], gi = g[i], inside = (zz > 0.0f && zz < 1.0f) ? 1.0f : 0.0f;
                gb[i - b] = inside * gi * w[i] * (zz - GAMMA) * (ZETA - zz) * inv_stretch_beta +
                            gcount * count_slope(la[i], c);
                gw[i] = gi * zz;
            }
        }
        sw_stream_out(gla + b, gb, e - b);
        sw_store_fence();
    }
}
