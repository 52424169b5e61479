/* HALO's penalty (sparsewrap/methods/penalty/halo_term.py) over one weight and its per-weight coefficients,
 * float32 on the CPU (the eager reference is HaloTerm's eager path):
 *
 *   forward:       lam clamped at the floor (see clamp), then the sums of |w| / lam^2 and of |lam| (double
 *                  accumulators) and the number of coefficients clamped
 *   forward_grad:  the same pass, also writing the gradients for an incoming gradient of 1,
 *                  gw = xi sign(w) / lam^2,  glam = -2 xi |w| / lam^3 + c sign(lam)
 *   backward:      gw = a sign(w) / lam^2,  glam = -2 a |w| / lam^3 + c sign(lam)
 *   clamp:         lam = copysign(max(|lam|, floor), lam), written only where |lam| < floor (NaN stays)
 *
 * sign(0) = 0, as torch.sign and the subgradient autograd gives |x| at 0. A floor <= 0 clamps nothing. Built
 * like hardconcrete.c (see there): with -fopenmp the loops run on torch's OpenMP pool.
 */
#include <math.h>
#include <stdint.h>

#define HALO_PARALLEL_MIN 65536 /* elements below which one thread does it all */

void sw_halo_forward(const float *w, float *lam, int64_t n, float floor, double *out) {
    double lasso = 0.0, total = 0.0, clamped = 0.0;
#pragma omp parallel for simd schedule(static) reduction(+ : lasso, total, clamped) if (n > HALO_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        float l = lam[i];
        if (fabsf(l) < floor) {
            l = copysignf(floor, l);
            lam[i] = l;
            clamped += 1.0;
        }
        lasso += fabsf(w[i]) / (l * l);
        total += fabsf(l);
    }
    out[0] = lasso;
    out[1] = total;
    out[2] = clamped;
}

void sw_halo_forward_grad(const float *w, float *lam, float *gw, float *glam, int64_t n, float xi, float c,
                          float floor, double *out) {
    double lasso = 0.0, total = 0.0, clamped = 0.0;
#pragma omp parallel for simd schedule(static) reduction(+ : lasso, total, clamped) if (n > HALO_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        float x = w[i], l = lam[i];
        if (fabsf(l) < floor) {
            l = copysignf(floor, l);
            lam[i] = l;
            clamped += 1.0;
        }
        float r = 1.0f / l;
        float r2 = r * r;
        float ax = fabsf(x);
        float sx = (float)((x > 0.0f) - (x < 0.0f));
        float sl = (float)((l > 0.0f) - (l < 0.0f));
        lasso += ax * r2;
        total += fabsf(l);
        gw[i] = xi * sx * r2;
        glam[i] = -2.0f * xi * ax * r2 * r + c * sl;
    }
    out[0] = lasso;
    out[1] = total;
    out[2] = clamped;
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
