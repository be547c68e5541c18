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
#include "vec8.h"

/* One bf16 row on eight-lane vectors: the scalar conversions made the kernel slower than torch's ops from
 * 32 rows up. Same roundings as the scalar code; the squares are summed in eight lanes. */
static void row_bf16(uint16_t *residual, const uint16_t *delta, const uint16_t *weight, uint16_t *out,
                     int64_t hidden, float eps) {
    const int64_t whole = hidden / 8 * 8;
    f8 lanes = {0};
    float squares = 0.0f;
    for (int64_t i = 0; i < whole; i += 8) {
        f8 value = load8(residual, i, 1);
        if (delta) {
            value = rounded8(value + load8(delta, i, 1));
            store8_bf16(residual + i, value);
        }
        lanes += value * value;
    }
    for (int64_t i = whole; i < hidden; ++i) {
        float value = load(residual, i, 1);
        if (delta) {
            value = round_to(value + load(delta, i, 1), 1);
            store(residual, i, value, 1);
        }
        squares += value * value;
    }
    squares += lanes_sum(lanes);
    const float inverse = 1.0f / sqrtf(squares / (float)hidden + eps);
    for (int64_t i = 0; i < whole; i += 8)
        store8_bf16(out + i, rounded8(load8(weight, i, 1) * rounded8(load8(residual, i, 1) * inverse)));
    for (int64_t i = whole; i < hidden; ++i)
        store(out, i, load(weight, i, 1) * round_to(load(residual, i, 1) * inverse, 1), 1);
}

/* For each row r: when `delta` is given, residual[r] += delta[r] (in place); then
 * out[r] = weight * round(residual[r] * rsqrt(mean(residual[r]^2) + eps)). */
int longtail_add_rms_norm(void *residual, int64_t residual_stride, const void *delta, int64_t delta_stride,
                          const void *weight, void *out, int64_t out_stride, int64_t rows, int64_t hidden, float eps,
                          int dtype, int64_t threads) {
    if (rows < 0 || hidden <= 0) return -1;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (threads > 1 && rows * hidden >= 32768)
    for (int64_t r = 0; r < rows; ++r) {
        if (dtype == 1) {
            row_bf16((uint16_t *)residual + r * residual_stride, delta ? (const uint16_t *)delta + r * delta_stride : 0,
                     (const uint16_t *)weight, (uint16_t *)out + r * out_stride, hidden, eps);
            continue;
        }
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
