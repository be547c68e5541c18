/* Multi-LoRA for short runs of tokens on a CPU: out[t] += scale_s * (x[t] A_s^T) B_s^T.
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
 * x, out and the factors are fp32 (dtype 0) or bf16 (dtype 1, as uint16), arithmetic in fp32.
 * bf16 rounds where torch's two bf16 matmuls round: the shrunk values, then the updated output.
 *
 * Returns 0, or a negative code when a run or a column range is out of bounds (-1..-3), or -4
 * when scratch memory cannot be had; everything is checked before anything is written.
 *
 * Each pair reads its factors once per TOKEN_TILE tokens: the shrink as four A rows against two
 * tokens (eight accumulators), the expand as sixteen output columns of four tokens held in
 * registers while the B rows pass, so out is read and written once per rank tile, not once per
 * B row.
 *
 * Threads: the (run, projection) pairs are shared among `threads` OpenMP threads. Each pair
 * writes its own rows and columns of `out`, so no two threads touch one element, and each
 * element is computed in the same order as with one thread: the result does not depend on
 * the thread count. The library links the libgomp torch has loaded (same soname), so these
 * threads are torch's own pool, not a second one competing for the cores.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "vec8.h"

#define TOKEN_TILE 8
#define RANK_TILE 64

/* shrunk[t][j] = round(x_t . A_j) * scale for the tile's tokens and rank rows j0 .. j0 + count. */
static inline __attribute__((always_inline)) void shrink(const float *xs, int64_t padded, int64_t tokens,
                                                         const void *a, int64_t in_dim, int64_t j0, int64_t count,
                                                         float scale, int dtype, float shrunk[][RANK_TILE]) {
    const int64_t whole = in_dim / 8 * 8;
    for (int64_t j = 0; j < count; j += 4) {
        const int64_t rows = count - j < 4 ? count - j : 4;
        const int64_t base[4] = {(j0 + j) * in_dim, (j0 + j + (rows > 1)) * in_dim, (j0 + j + 2 * (rows > 2)) * in_dim,
                                 (j0 + j + 3 * (rows > 3)) * in_dim};  /* a short block repeats its first row */
        for (int64_t t = 0; t < tokens; t += 2) {
            const int pair = t + 1 < tokens;
            const float *x0 = xs + t * padded, *x1 = xs + (t + pair) * padded;
            f8 sums[4][2];
            dots(a, base, x0, x1, whole, dtype, sums);
            for (int64_t r = 0; r < rows; ++r) {
                for (int u = 0; u <= pair; ++u) {
                    const float *xu = u ? x1 : x0;
                    float sum = lanes_sum(sums[r][u]);
                    for (int64_t k = whole; k < in_dim; ++k) sum += load(a, base[r] + k, dtype) * xu[k];
                    shrunk[t + u][j + r] = round_to(sum, dtype) * scale;
                }
            }
        }
    }
}

/* out[t, col0 + c] += sum_j shrunk[t][j] * B[j0 + j][c] for the tile's tokens, all `width` columns. */
static inline __attribute__((always_inline)) void expand(void *out, int64_t out_stride, int64_t first_token,
                                                         int64_t tokens, int64_t col0, const void *b, int64_t width,
                                                         int64_t j0, int64_t count, int dtype,
                                                         float shrunk[][RANK_TILE]) {
    const int64_t whole = width / 16 * 16;
    for (int64_t t0 = 0; t0 < tokens; t0 += 4) {
        const int64_t group = tokens - t0 < 4 ? tokens - t0 : 4;
        const int64_t t1 = t0 + (group > 1), t2 = t0 + 2 * (group > 2), t3 = t0 + 3 * (group > 3);
        for (int64_t c = 0; c < whole; c += 16) {
            f8 a00 = {0}, a01 = {0}, a10 = {0}, a11 = {0}, a20 = {0}, a21 = {0}, a30 = {0}, a31 = {0};
            for (int64_t j = 0; j < count; ++j) {
                const int64_t row = (j0 + j) * width + c;
                const f8 b0 = load8(b, row, dtype), b1 = load8(b, row + 8, dtype);
                const float s0 = shrunk[t0][j], s1 = shrunk[t1][j], s2 = shrunk[t2][j], s3 = shrunk[t3][j];
                a00 += s0 * b0; a01 += s0 * b1;
                a10 += s1 * b0; a11 += s1 * b1;
                a20 += s2 * b0; a21 += s2 * b1;
                a30 += s3 * b0; a31 += s3 * b1;
            }
            const f8 sums[4][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
            for (int64_t u = 0; u < group; ++u) {
                const int64_t at = (first_token + t0 + u) * out_stride + col0 + c;
                for (int k = 0; k < 16; ++k)
                    store(out, at + k, load(out, at + k, dtype) + sums[u][k / 8][k % 8], dtype);
            }
        }
        for (int64_t c = whole; c < width; ++c) {
            for (int64_t u = 0; u < group; ++u) {
                float sum = 0.0f;
                for (int64_t j = 0; j < count; ++j) sum += shrunk[t0 + u][j] * load(b, (j0 + j) * width + c, dtype);
                const int64_t at = (first_token + t0 + u) * out_stride + col0 + c;
                store(out, at, load(out, at, dtype) + sum, dtype);
            }
        }
    }
}

static void pair_f(const void *x, int64_t x_stride, int64_t in_dim, void *out, int64_t out_stride, int64_t begin,
                   int64_t end, const void *a, const void *b, int64_t rank, float scale, int64_t col0, int64_t width,
                   float *xs, int64_t padded, int dtype) {
    float shrunk[TOKEN_TILE][RANK_TILE];
    for (int64_t t0 = begin; t0 < end; t0 += TOKEN_TILE) {
        const int64_t tokens = end - t0 < TOKEN_TILE ? end - t0 : TOKEN_TILE;
        for (int64_t t = 0; t < tokens; ++t)
            for (int64_t k = 0; k < in_dim; ++k) xs[t * padded + k] = load(x, (t0 + t) * x_stride + k, dtype);
        /* The rank is split in tiles: each B row only needs its own A row's dot products. */
        for (int64_t j0 = 0; j0 < rank; j0 += RANK_TILE) {
            const int64_t count = rank - j0 < RANK_TILE ? rank - j0 : RANK_TILE;
            if (dtype == 0) {
                shrink(xs, padded, tokens, a, in_dim, j0, count, scale, 0, shrunk);
                expand(out, out_stride, t0, tokens, col0, b, width, j0, count, 0, shrunk);
            } else {
                shrink(xs, padded, tokens, a, in_dim, j0, count, scale, 1, shrunk);
                expand(out, out_stride, t0, tokens, col0, b, width, j0, count, 1, shrunk);
            }
        }
    }
}

int longtail_lora_runs(const void *x, int64_t x_stride, int64_t in_dim, void *out, int64_t out_stride,
                       int64_t out_width, int64_t rows, const int64_t *runs, int64_t run_count, int64_t proj_count,
                       int64_t slot_count, const int64_t *out_cols, const int64_t *a_addr, const int64_t *b_addr,
                       const int64_t *ranks, const float *scales, int dtype, int64_t threads) {
    for (int64_t p = 0; p < proj_count; ++p) {
        if (out_cols[2 * p] < 0 || out_cols[2 * p + 1] < 0 || out_cols[2 * p] + out_cols[2 * p + 1] > out_width)
            return -2;
    }
    for (int64_t r = 0; r < run_count; ++r) {
        if (runs[3 * r] < 0 || runs[3 * r] >= slot_count) return -1;
        if (runs[3 * r + 1] < 0 || runs[3 * r + 2] > rows || runs[3 * r + 1] > runs[3 * r + 2]) return -3;
    }
    const int64_t pairs = run_count * proj_count;
    const int64_t padded = (in_dim + 7) / 8 * 8;
    const int64_t team = threads > 1 && pairs > 1 ? threads : 1;
    /* Each thread's tokens in fp32, zero-padded to whole vectors; allocated before anything is written. */
    const int64_t per_thread = (TOKEN_TILE * padded + 15) / 16 * 16;
    float *scratch = aligned_alloc(64, (size_t)(team * per_thread * (int64_t)sizeof(float)));
    if (!scratch) return -4;
    for (int64_t k = 0; k < team * per_thread; ++k) scratch[k] = 0.0f;
    /* A pair is at least a rank x in_dim read: worth a fork once there are two of them. */
#pragma omp parallel for schedule(dynamic, 1) num_threads(team) if (team > 1)
    for (int64_t pair = 0; pair < pairs; ++pair) {
        const int64_t r = pair / proj_count, p = pair % proj_count;
        const int64_t slot = runs[3 * r], index = p * slot_count + slot, rank = ranks[index];
        if (rank <= 0) continue;
        float *xs = scratch + (int64_t)omp_get_thread_num() * per_thread;
        pair_f(x, x_stride, in_dim, out, out_stride, runs[3 * r + 1], runs[3 * r + 2],
               (const void *)(intptr_t)a_addr[index], (const void *)(intptr_t)b_addr[index], rank, scales[index],
               out_cols[2 * p], out_cols[2 * p + 1], xs, padded, dtype);
    }
    free(scratch);
    return 0;
}
