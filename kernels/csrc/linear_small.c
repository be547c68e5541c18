/* out[m, n] = x[m, :] . W[n, :] (+ bias[n]) for a few rows m: the CPU engine's decode matmuls.
 *
 * Why C: with one to a few rows a linear layer is a matrix-vector product, bound by reading W once.
 * torch's fp32 path (MKL sgemm, or oneDNN's packed one) reached 11 GB/s on the 2-core AMD EPYC of this
 * project's CI, where a plain read streams at ~30 GB/s: at batch 1 the decode step spent 44 of its
 * 50 ms in matmuls (docs/serving.md). Here every weight row is read once, from memory straight into
 * the dot products of all the rows of x at once, and the rows of W are shared among torch's OpenMP
 * threads in contiguous blocks (each thread streams its own part of the matrix).
 *
 * Weights and activations are fp32 (dtype 0) or bf16 (dtype 1, as uint16; half the bytes to read);
 * products accumulate in fp32 in eight lanes per row of x, summed at the end of the row, so the result
 * differs from a BLAS's in summation order only (relative error ~1e-6 in fp32). bf16 outputs round to
 * nearest even once, as torch rounds its bf16 matmul's fp32 accumulator.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "vec8.h"

#define MAX_ROWS 32

/* x [rows, hidden] (row stride x_stride), weight [out_features, hidden] contiguous, bias [out_features] or
 * NULL, out [rows, out_features] (row stride out_stride). rows <= MAX_ROWS. Returns 0, or -1 on bad sizes,
 * -2 when scratch memory cannot be had. */
int longtail_linear_small(const void *x, int64_t x_stride, int64_t rows, int64_t hidden, const void *weight,
                          const void *bias, void *out, int64_t out_stride, int64_t out_features, int dtype,
                          int64_t threads) {
    if (rows < 1 || rows > MAX_ROWS || hidden < 1 || out_features < 1) return -1;
    /* x in fp32, padded to a multiple of 8 with zeros: the inner loop is whole vectors only. */
    const int64_t padded = (hidden + 7) / 8 * 8;
    float *xs = aligned_alloc(64, (size_t)(rows * padded * (int64_t)sizeof(float) + 63) / 64 * 64);
    if (!xs) return -2;
    for (int64_t m = 0; m < rows; ++m) {
        for (int64_t k = 0; k < hidden; ++k) xs[m * padded + k] = load(x, m * x_stride + k, dtype);
        for (int64_t k = hidden; k < padded; ++k) xs[m * padded + k] = 0.0f;
    }
    const int64_t whole = hidden / 8 * 8;
    const int64_t blocks = (out_features + 3) / 4;
    const int many = threads > 1 && out_features * hidden >= 65536;
    /* Four weight rows at a time (one accumulator per dot product would wait on its own latency); the four
     * rows stay in L1 while the next pair of x rows passes over them. */
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (many)
    for (int64_t block = 0; block < blocks; ++block) {
        const int64_t n0 = block * 4;
        const int64_t count = out_features - n0 < 4 ? out_features - n0 : 4;
        const int64_t base[4] = {n0 * hidden, (n0 + (count > 1)) * hidden, (n0 + 2 * (count > 2)) * hidden,
                                 (n0 + 3 * (count > 3)) * hidden};  /* a short last block repeats row n0 */
        for (int64_t m0 = 0; m0 < rows; m0 += 2) {
            const int pair = m0 + 1 < rows;
            const float *x0 = xs + m0 * padded, *x1 = xs + (m0 + pair) * padded;
            f8 sums[4][2];
            if (dtype == 0) dots(weight, base, x0, x1, whole, 0, sums);
            else dots(weight, base, x0, x1, whole, 1, sums);
            for (int64_t r = 0; r < count; ++r) {
                const int64_t n = n0 + r;
                const float b = bias ? load(bias, n, dtype) : 0.0f;
                for (int j = 0; j <= pair; ++j) {
                    const float *xj = j ? x1 : x0;
                    float sum = lanes_sum(sums[r][j]);
                    for (int64_t k = whole; k < hidden; ++k) sum += load(weight, base[r] + k, dtype) * xj[k];
                    const float value = sum + b;
                    const int64_t at = (m0 + j) * out_stride + n;
                    if (dtype == 0) ((float *)out)[at] = value;
                    else ((uint16_t *)out)[at] = to_bf16_bits(value);
                }
            }
        }
    }
    free(xs);
    return 0;
}
