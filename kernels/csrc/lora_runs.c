/* Multi-LoRA for short runs of tokens on a CPU: out[t] += scale_s * (x[t] A_s^T) B_s^T, fp32.
 *
 * Why C: a decode step on a CPU meets one small (rank x in) matrix pair per adapter per
 * projection per layer, a few tokens each. As torch calls that is ~13 us of dispatch per
 * matmul, about half of the LoRA time; here a whole layer's projection group is one call
 * that streams each adapter's rows once, so the cost is the memory read.
 *
 * Layout (as serving/lora_slots.py keeps it): adapter slot s of projection p has its PEFT
 * lora_A rows at a_addr[p][s] ([rank, in], row-major) and lora_B transposed at b_addr[p][s]
 * ([rank, width], row-major); rank 0 means the slot does not target p. Projection p writes
 * output columns out_cols[p][0] .. out_cols[p][0] + out_cols[p][1].
 * runs: (slot, begin, end) triples; tokens begin..end-1 all use that slot.
 *
 * Returns 0, or a negative code when a run or a column range is out of bounds; everything is
 * checked before anything is written.
 *
 * Threads: the (run, projection) pairs are shared among `threads` OpenMP threads. Each pair
 * writes its own rows and columns of `out`, so no two threads touch one element, and each
 * element is computed in the same order as with one thread: the result does not depend on
 * the thread count. The library links the libgomp torch has loaded (same soname), so these
 * threads are torch's own pool, not a second one competing for the cores.
 */
#include <stdint.h>

#define TOKEN_TILE 8
#define RANK_TILE 64

static float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < n; ++k) acc += a[k] * b[k];
    return acc;
}

static void axpy(float *restrict y, const float *restrict x, float alpha, int64_t n) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) y[k] += alpha * x[k];
}

int longtail_lora_runs_f32(const float *x, int64_t x_stride, int64_t in_dim, float *out, int64_t out_stride,
                           int64_t out_width, int64_t rows, const int64_t *runs, int64_t run_count,
                           int64_t proj_count, int64_t slot_count, const int64_t *out_cols, const int64_t *a_addr,
                           const int64_t *b_addr, const int64_t *ranks, const float *scales, int64_t threads) {
    for (int64_t p = 0; p < proj_count; ++p) {
        if (out_cols[2 * p] < 0 || out_cols[2 * p + 1] < 0 || out_cols[2 * p] + out_cols[2 * p + 1] > out_width)
            return -2;
    }
    for (int64_t r = 0; r < run_count; ++r) {
        if (runs[3 * r] < 0 || runs[3 * r] >= slot_count) return -1;
        if (runs[3 * r + 1] < 0 || runs[3 * r + 2] > rows || runs[3 * r + 1] > runs[3 * r + 2]) return -3;
    }
    const int64_t pairs = run_count * proj_count;
    /* A pair is at least a rank x in_dim read: worth a fork once there are two of them. */
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads > 0 ? threads : 1) if (threads > 1 && pairs > 1)
    for (int64_t pair = 0; pair < pairs; ++pair) {
        const int64_t r = pair / proj_count, p = pair % proj_count;
        const int64_t slot = runs[3 * r], begin = runs[3 * r + 1], end = runs[3 * r + 2];
        const int64_t index = p * slot_count + slot, rank = ranks[index];
        if (rank <= 0) continue;
        float shrunk[TOKEN_TILE][RANK_TILE];
        const float *a = (const float *)(intptr_t)a_addr[index];
        const float *b = (const float *)(intptr_t)b_addr[index];
        const float scale = scales[index];
        const int64_t first_col = out_cols[2 * p], width = out_cols[2 * p + 1];
        for (int64_t t0 = begin; t0 < end; t0 += TOKEN_TILE) {
            const int64_t tokens = end - t0 < TOKEN_TILE ? end - t0 : TOKEN_TILE;
            /* The rank is split in tiles: each B row only needs its own A row's dot products. */
            for (int64_t j0 = 0; j0 < rank; j0 += RANK_TILE) {
                const int64_t width_j = rank - j0 < RANK_TILE ? rank - j0 : RANK_TILE;
                for (int64_t j = 0; j < width_j; ++j) {
                    const float *a_row = a + (j0 + j) * in_dim;
                    for (int64_t t = 0; t < tokens; ++t)
                        shrunk[t][j] = scale * dot(x + (t0 + t) * x_stride, a_row, in_dim);
                }
                for (int64_t j = 0; j < width_j; ++j) {
                    const float *b_row = b + (j0 + j) * width;
                    for (int64_t t = 0; t < tokens; ++t)
                        axpy(out + (t0 + t) * out_stride + first_col, b_row, shrunk[t][j], width);
                }
            }
        }
    }
    return 0;
}
