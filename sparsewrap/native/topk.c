/* DNW's top-k forward (sparsewrap/parametrizations/topk.py) over one float32 weight on the CPU, in two passes
 * once a band around the threshold is known (the eager reference is keep_largest):
 *
 *   band:  below = #{|w| < lo}, and the values |w| in [lo, hi) gathered (up to a capacity), in one read
 *   apply: out = w where |w| > threshold, else +0 (as w - w), and the count of |w| > threshold
 *
 * The caller finds the threshold among the gathered values (kthvalue on the band alone) and checks the count
 * against k: a tie at the threshold that the tie rule must break sends it to the exact rule. Built like
 * hardconcrete.c (see there): with -fopenmp the loops run on torch's OpenMP pool.
 */
#include <math.h>
#include <stdint.h>

#define TOPK_PARALLEL_MIN 65536 /* elements below which one thread does it all */

/* The range is split into `parts` contiguous parts (one per thread), part p gathering into its own slice of
 * band (cap / parts entries, plus one spare slot the branch-free store may write). result[0] = below,
 * result[1] = the number of values in the band, or -1 when a part had more than its slice holds (the band
 * is then not complete; below is still exact). band must hold cap + parts floats. */
void sw_topk_band(const float *w, int64_t n, float lo, float hi, float *band, int64_t cap, int64_t parts,
                  int64_t *result) {
    int64_t below = 0, overflow = 0;
    int64_t used[parts > 0 ? parts : 1];
#pragma omp parallel for schedule(static, 1) reduction(+ : below) reduction(| : overflow) if (n > TOPK_PARALLEL_MIN)
    for (int64_t p = 0; p < parts; p++) {
        const int64_t b = n * p / parts, e = n * (p + 1) / parts;
        const int64_t room = cap * (p + 1) / parts - cap * p / parts;
        float *dst = band + cap * p / parts + p; /* + p: the spare slots of the parts before */
        int64_t m = 0, nb = 0, total = 0;
        for (int64_t i = b; i < e; i++) {
            const float a = fabsf(w[i]);
            const int64_t in = (a >= lo) & (a < hi);
            nb += a < lo;
            dst[m] = a; /* branch-free: kept only when in the band (m <= room: the spare slot) */
            m += in & (m < room);
            total += in;
        }
        used[p] = total;
        below += nb;
        overflow |= total > room;
    }
    int64_t count = 0;
    if (!overflow) { /* compact the parts' slices to the front of band */
        for (int64_t p = 0; p < parts; p++) {
            const float *src = band + cap * p / parts + p;
            for (int64_t j = 0; j < used[p]; j++) band[count + j] = src[j];
            count += used[p];
        }
    }
    result[0] = below;
    result[1] = overflow ? -1 : count;
}

void sw_topk_apply(const float *w, float *out, int64_t n, float threshold, int64_t *kept) {
    int64_t k = 0;
#pragma omp parallel for simd schedule(static) reduction(+ : k) if (n > TOPK_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        const float x = w[i];
        const int keep = fabsf(x) > threshold;
        out[i] = keep ? x : 0.0f;
        k += keep;
    }
    *kept = k;
}
