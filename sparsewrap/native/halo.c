/* HALO's penalty (sparsewrap/methods/penalty/halo_term.py) over one weight and its per-weight coefficients,
 * float32 on the CPU, one pass per direction (the eager reference is HaloTerm's eager path):
 *
 *   forward:  sums of |w| / lam^2 and of |lam| (double accumulators)
 *   backward: gw = a sign(w) / lam^2,  glam = -2 a |w| / lam^3 + c sign(lam)
 *   clamp:    lam = copysign(max(|lam|, floor), lam), written only where |lam| < floor
 *
 * sign(0) = 0, as torch.sign and the subgradient autograd gives |x| at 0. Built like hardconcrete.c (see
 * there): with -fopenmp the loops run on torch's OpenMP pool.
 */
#include <math.h>
#include <stdint.h>

#define HALO_PARALLEL_MIN 65536 /* elements below which one thread does it all */

void sw_halo_forward(const float *w, const float *lam, int64_t n, double *out) {
    double lasso = 0.0, total = 0.0;
#pragma omp parallel for simd schedule(static) reduction(+ : lasso, total) if (n > HALO_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        float l = lam[i];
        lasso += fabsf(w[i]) / (l * l);
        total += fabsf(l);
    }
    out[0] = lasso;
    out[1] = total;
}

void sw_halo_backward(const float *w, const float *lam, float *gw, float *glam, int64_t n, float a, float c) {
#pragma omp parallel for simd schedule(static) if (n > HALO_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        float x = w[i], l = lam[i];
        float r = 1.0f / l;
        float ar2 = a * r * r;
        float sx = (float)((x > 0.0f) - (x < 0.0f));
        float sl = (float)((l > 0.0f) - (l < 0.0f));
        gw[i] = sx * ar2;
        glam[i] = -2.0f * fabsf(x) * ar2 * r + c * sl;
    }
}

void sw_halo_clamp(float *lam, int64_t n, float floor) {
#pragma omp parallel for simd schedule(static) if (n > HALO_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        float l = lam[i];
        if (fabsf(l) < floor) {
            lam[i] = copysignf(floor, l);
        }
    }
}
