/* The CPU engine's residual add + RMSNorm in one pass.
 *
 * Why C: per layer the torch code made ~16 small calls (RMSNorm's cast, pow, mean, add, rsqrt, mul,
 * cast and scale, twice; the residual adds). Each is a few microseconds of dispatch and,
 * under OpenMP, a fork and a barrier over a [tokens, hidden] tensor that one core streams in less
 * time than the barrier takes. Here each add + norm is one call that reads and writes every element once.
 *
 * Rounding follows the torch code it replaces (HF's LlamaRMSNorm): the residual add rounds to the
 * model dtype; the norm runs in fp32, its result is rounded to the model dtype, then scaled by the
 * weight and rounded again. Tensors are fp32 (dtype 0) or bf16 (dtype 1, as uint16).
 *
 * Threads: rows are shared among `threads` OpenMP threads once a call has enough elements; each row
 * is computed the same way whatever the thread count. Built with -fopenmp, the library links the
 * libgomp torch has loaded (one thread pool).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* For each row r: when `delta` is given, residual[r] += delta[r] (in place); then
 * out[r] = weight * round(residual[r] * rsqrt(mean(residual[r]^2) + eps)). */
int longtail_add_rms_norm(void *residual, int64_t residual_stride, const void *delta, int64_t delta_stride,
                          const void *weight, void *out, int64_t out_stride, int64_t rows, int64_t hidden, float eps,
                          int dtype, int64_t threads) {
    if (rows < 0 || hidden <= 0) return -1;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (threads > 1 && rows * hidden >= 32768)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t at = r * residual_stride;
        float squares = 0.0f;
        if (delta) {
            const int64_t from = r * delta_stride;
            for (int64_t i = 0; i < hidden; ++i) {
                const float sum = round_to(load(residual, at + i, dtype) + load(delta, from + i, dtype), dtype);
                store(residual, at + i, sum, dtype);
                squares += sum * sum;
            }
        } else {
#pragma omp simd reduction(+ : squares)
            for (int64_t i = 0; i < hidden; ++i) {
                const float value = load(residual, at + i, dtype);
                squares += value * value;
            }
        }
        const float inverse = 1.0f / sqrtf(squares / (float)hidden + eps);
        const int64_t to = r * out_stride;
        for (int64_t i = 0; i < hidden; ++i) {
            const float normed = round_to(load(residual, at + i, dtype) * inverse, dtype);
            store(out, to + i, load(weight, i, dtype) * normed, dtype);
        }
    }
    return 0;
}
