/* STR's soft threshold (sparsewrap/parametrizations/threshold.py) over one float32 weight on the CPU, one pass
 * per direction; the eager reference is _Shrink's softshrink path:
 *
 *   forward:  out = softshrink(w, t): w - t where w > t, w + t where w < -t, else +0 (as the clamp form
 *             w - clamp(w, -t, t) writes; torch's softshrink gives -0 for some negative w, the same value),
 *             and the count of |w| > t (the entries kept)
 *   backward: gw = g where out != 0, else 0; dot = <g, sign(out)> accumulated in double (for dL/ds)
 *
 * out != 0 exactly where |w| > t: w - t is not zero when w != t (gradual underflow; the library leaves the
 * process's floating-point mode alone, see sparsewrap/native/__init__.py). Built like hardconcrete.c (see there): with
 * -fopenmp the loops run on torch's OpenMP pool.
 */
#include <math.h>
#include <stdint.h>

#define SHRINK_PARALLEL_MIN 65536 /* elements below which one thread does it all */

void sw_shrink_forward(const float *w, float *out, int64_t n, float t, int64_t *kept) {
    int64_t k = 0;
#pragma omp parallel for simd schedule(static) reduction(+ : k) if (n > SHRINK_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        const float x = w[i];
        const int keep = fabsf(x) > t;
        out[i] = keep ? x - copysignf(t, x) : 0.0f;
        k += keep;
    }
    *kept = k;
}

/* gw may alias g */
void sw_shrink_backward(const float *g, const float *out, float *gw, int64_t n, double *dot) {
    double acc = 0.0;
#pragma omp parallel for simd schedule(static) reduction(+ : acc) if (n > SHRINK_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        const float s = out[i], gi = g[i];
        const float sign = (float)((s > 0.0f) - (s < 0.0f));
        gw[i] = s != 0.0f ? gi : 0.0f;
        acc += (double)(gi * sign);
    }
    *dot = acc;
}
