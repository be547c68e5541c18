/* One (run, projection) pair of the CPU multi-LoRA: out[t] += scale * (x[t] A^T) B^T for a run of tokens that share
 * an adapter, shared by lora_runs.c (a projection group's LoRA alone) and gemm_fp32.c (the LoRA fused into the
 * base matmul). A is PEFT's lora_A ([rank, in], row-major), B is lora_B transposed ([rank, width], row-major);
 * fp32 (dtype 0) or bf16 (dtype 1, as uint16), arithmetic in fp32; bf16 rounds where torch's two bf16 matmuls
 * round: the shrunk values, then the updated output.
 *
 * A decode step holds runs of 1-4 tokens, so each factor element meets few tokens: a pair is a stream over the
 * factors, and the loops are shaped so that the stream is sequential and every load feeds as many FMAs as
 * there are tokens:
 * - shrink: four A rows at a time, each read front to back, against up to SHRINK_TOKENS tokens (16 or 8
 *   accumulators), folded to scalars four at a time;
 * - expand: four B rows at a time, each read front to back, into an fp32 scratch row per token that stays in
 *   L1, added to `out` once at the end (so out is read and written once per pair, and the LoRA term is summed
 *   apart from the base output, as torch's reference does).
 * The earlier shape walked B down its columns (one cache line per row per step), which the hardware
 * prefetchers do not follow: 43 ms of a 114-row, 38-adapter decode step, 35 ms with the factors in cache;
 * this one takes 33 and 29 (2-core Intel Xeon).
 */
#ifndef LONGTAIL_LORA_PAIR_H
#define LONGTAIL_LORA_PAIR_H

#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "simd.h"

#define TOKEN_TILE 8   /* tokens per pass over B; the shrink takes them SHRINK_TOKENS at a time */
#define RANK_TILE 64
/* Tokens per pass of the shrink over four A rows: 4 x 4 accumulators, four A vectors and a token's x need 21
 * registers, which AVX-512 has (32) and AVX2 does not (16: gcc spilled, and a pair of 4 tokens with its factors
 * in cache took 6.95 us against 4.72 in two passes of 2 tokens, 2-core AVX2 EPYC, docs/serving.md "Eleventh
 * round"). Each (row, token) sum runs over k in the same order either way: the same bits. */
#if LANES == 16
#define SHRINK_TOKENS 4
#else
#define SHRINK_TOKENS 2
#endif



/* shrunk[u][j + r] = round(x_u . A_{j0 + j + r}) * scale for `tokens` (1-4) tokens and four A rows from j. */
static inline __attribute__((always_inline)) void shrink4(const int tokens, const float *xs, int64_t padded,
                                                          const void *a, int64_t in_dim, const int64_t base[4],
                                                          int64_t rows, int64_t j, float scale, int dtype,
                                                          float shrunk[][RANK_TILE]) {
    const int64_t whole = in_dim / LANES * LANES;
    vf acc[4][4];
    for (int r = 0; r < 4; ++r)
        for (int u = 0; u < tokens; ++u) acc[r][u] = (vf){0};
    for (int64_t k = 0; k < whole; k += LANES) {
        vf w0 = loadv(a, base[0] + k, dtype), w1 = loadv(a, base[1] + k, dtype);
        vf w2 = loadv(a, base[2] + k, dtype), w3 = loadv(a, base[3] + k, dtype);
        IN_REGISTER(w0);
        IN_REGISTER(w1);
        IN_REGISTER(w2);
        IN_REGISTER(w3);
        for (int u = 0; u < tokens; ++u) {
            vf v = loadf(xs + u * padded + k);
            IN_REGISTER(v);
            acc[0][u] += w0 * v;
            acc[1][u] += w1 * v;
            acc[2][u] += w2 * v;
            acc[3][u] += w3 * v;
        }
    }
    for (int u = 0; u < tokens; ++u) {
        float sums[4];
        sums4(acc[0][u], acc[1][u], acc[2][u], acc[3][u], sums);
        const float *xu = xs + u * padded;
        for (int64_t r = 0; r < rows; ++r) {
            float sum = sums[r];
            for (int64_t k = whole; k < in_dim; ++k) sum += load(a, base[r] + k, dtype) * xu[k];
            shrunk[u][j + r] = round_to(sum, dtype) * scale;
        }
    }
}

/* shrunk[t][j] for the tile's tokens and rank rows j0 .. j0 + count. */
static inline __attribute__((always_inline)) void shrink(const float *xs, int64_t padded, int64_t tokens,
                                                         const void *a, int64_t in_dim, int64_t j0, int64_t count,
                                                         float scale, int dtype, float shrunk[][RANK_TILE]) {
    for (int64_t j = 0; j < count; j += 4) {
        const int64_t rows = count - j < 4 ? count - j : 4;
        const int64_t base[4] = {(j0 + j) * in_dim, (j0 + j + (rows > 1)) * in_dim, (j0 + j + 2 * (rows > 2)) * in_dim,
                                 (j0 + j + 3 * (rows > 3)) * in_dim};  /* a short block repeats its first row */
        for (int64_t t = 0; t < tokens; t += SHRINK_TOKENS) {
            const float *x = xs + t * padded;
            float (*s)[RANK_TILE] = shrunk + t;
            switch (tokens - t < SHRINK_TOKENS ? tokens - t : SHRINK_TOKENS) {
                case 1: shrink4(1, x, padded, a, in_dim, base, rows, j, scale, dtype, s); break;
                case 2: shrink4(2, x, padded, a, in_dim, base, rows, j, scale, dtype, s); break;
                case 3: shrink4(3, x, padded, a, in_dim, base, rows, j, scale, dtype, s); break;
                default: shrink4(4, x, padded, a, in_dim, base, rows, j, scale, dtype, s); break;
            }
        }
    }
}

/* lora[u][c] += sum_j shrunk[u][j] * B[j0 + j][c] over all `width` columns, B rows four at a time. */
static inline __attribute__((always_inline)) void expand_t(const int tokens, float *lora, int64_t padded_width,
                                                           const void *b, int64_t width, int64_t j0, int64_t count,
                                                           int dtype, float shrunk[][RANK_TILE]) {
    const int64_t whole = width / LANES * LANES;
    int64_t j = 0;
    for (; j + 4 <= count; j += 4) {
        const int64_t r0 = (j0 + j) * width, r1 = r0 + width, r2 = r1 + width, r3 = r2 + width;
        float s[TOKEN_TILE][4];
        for (int u = 0; u < tokens; ++u)
            for (int r = 0; r < 4; ++r) s[u][r] = shrunk[u][j + r];
        for (int64_t c = 0; c < whole; c += LANES) {
            const vf b0 = loadv(b, r0 + c, dtype), b1 = loadv(b, r1 + c, dtype);
            const vf b2 = loadv(b, r2 + c, dtype), b3 = loadv(b, r3 + c, dtype);
            for (int u = 0; u < tokens; ++u) {
                float *row = lora + u * padded_width + c;
                storef(row, loadf(row) + s[u][0] * b0 + s[u][1] * b1 + s[u][2] * b2 + s[u][3] * b3);
            }
        }
        for (int64_t c = whole; c < width; ++c)
            for (int u = 0; u < tokens; ++u)
                lora[u * padded_width + c] += s[u][0] * load(b, r0 + c, dtype) + s[u][1] * load(b, r1 + c, dtype) +
                                              s[u][2] * load(b, r2 + c, dtype) + s[u][3] * load(b, r3 + c, dtype);
    }
    for (; j < count; ++j) {
        const int64_t r0 = (j0 + j) * width;
        for (int64_t c = 0; c < whole; c += LANES) {
            const vf b0 = loadv(b, r0 + c, dtype);
            for (int u = 0; u < tokens; ++u) {
                float *row = lora + u * padded_width + c;
                storef(row, loadf(row) + shrunk[u][j] * b0);
            }
        }
        for (int64_t c = whole; c < width; ++c)
            for (int u = 0; u < tokens; ++u) lora[u * padded_width + c] += shrunk[u][j] * load(b, r0 + c, dtype);
    }
}

static inline __attribute__((always_inline)) void expand(float *lora, int64_t padded_width, int64_t tokens,
                                                         const void *b, int64_t width, int64_t j0, int64_t count,
                                                         int dtype, float shrunk[][RANK_TILE]) {
    switch (tokens) {
        case 1: expand_t(1, lora, padded_width, b, width, j0, count, dtype, shrunk); break;
        case 2: expand_t(2, lora, padded_width, b, width, j0, count, dtype, shrunk); break;
        case 3: expand_t(3, lora, padded_width, b, width, j0, count, dtype, shrunk); break;
        case 4: expand_t(4, lora, padded_width, b, width, j0, count, dtype, shrunk); break;
        case 5: expand_t(5, lora, padded_width, b, width, j0, count, dtype, shrunk); break;
        case 6: expand_t(6, lora, padded_width, b, width, j0, count, dtype, shrunk); break;
        case 7: expand_t(7, lora, padded_width, b, width, j0, count, dtype, shrunk); break;
        default: expand_t(8, lora, padded_width, b, width, j0, count, dtype, shrunk); break;
    }
}

/* A projection group and its runs, checked before anything is written: 0, or -1 when a run names a slot outside
 * the table, -2 when a projection's columns fall outside out_width, -3 when a run's tokens fall outside the rows.
 * *widest: the widest projection (the scratch rows' width). */
static int check_group(const int64_t *runs, int64_t run_count, int64_t slot_count, int64_t rows,
                       const int64_t *out_cols, int64_t proj_count, int64_t out_width, int64_t *widest) {
    *widest = 0;
    for (int64_t p = 0; p < proj_count; ++p) {
        if (out_cols[2 * p] < 0 || out_cols[2 * p + 1] < 0 || out_cols[2 * p] + out_cols[2 * p + 1] > out_width)
            return -2;
        if (out_cols[2 * p + 1] > *widest) *widest = out_cols[2 * p + 1];
    }
    for (int64_t r = 0; r < run_count; ++r) {
        if (runs[3 * r] < 0 || runs[3 * r] >= slot_count) return -1;
        if (runs[3 * r + 1] < 0 || runs[3 * r + 2] > rows || runs[3 * r + 1] > runs[3 * r + 2]) return -3;
    }
    return 0;
}

/* One (run, projection) pair: tokens begin..end-1 through one adapter's A and B. The LoRA term is added to out's
 * rows begin..end-1, columns col0.. (`store_only` 0), or, fp32 only, stored into out's rows 0..end-begin-1 in place
 * of what they hold (`store_only` 1: the run's own rows of a scratch the caller adds later). `xs` and `lora`: the
 * thread's scratch, TOKEN_TILE rows of `padded` and `padded_width`. */
static void lora_pair(const void *x, int64_t x_stride, int64_t in_dim, void *out, int64_t out_stride, int store_only,
                      int64_t begin, int64_t end, const void *a, const void *b, int64_t rank, float scale, int64_t col0,
                      int64_t width, float *xs, int64_t padded, float *lora, int64_t padded_width, int dtype) {
    float shrunk[TOKEN_TILE][RANK_TILE];
    for (int64_t t0 = begin; t0 < end; t0 += TOKEN_TILE) {
        const int64_t tokens = end - t0 < TOKEN_TILE ? end - t0 : TOKEN_TILE;
        for (int64_t t = 0; t < tokens; ++t) {
            for (int64_t k = 0; k < in_dim; ++k) xs[t * padded + k] = load(x, (t0 + t) * x_stride + k, dtype);
            memset(lora + t * padded_width, 0, (size_t)width * sizeof(float));
        }
        /* The rank is split in tiles: each B row only needs its own A row's dot products. */
        for (int64_t j0 = 0; j0 < rank; j0 += RANK_TILE) {
            const int64_t count = rank - j0 < RANK_TILE ? rank - j0 : RANK_TILE;
            if (dtype == 0) {
                shrink(xs, padded, tokens, a, in_dim, j0, count, scale, 0, shrunk);
                expand(lora, padded_width, tokens, b, width, j0, count, 0, shrunk);
            } else {
                shrink(xs, padded, tokens, a, in_dim, j0, count, scale, 1, shrunk);
                expand(lora, padded_width, tokens, b, width, j0, count, 1, shrunk);
            }
        }
        for (int64_t t = 0; t < tokens; ++t) {
            const int64_t at = (store_only ? t0 + t - begin : t0 + t) * out_stride + col0;
            const float *row = lora + t * padded_width;
            if (store_only) {
                memcpy((float *)out + at, row, (size_t)width * sizeof(float));
            } else if (dtype == 0) {
                float *target = (float *)out + at;
                for (int64_t c = 0; c < width; ++c) target[c] += row[c];
            } else {
                for (int64_t c = 0; c < width; ++c) store(out, at + c, load(out, at + c, 1) + row[c], 1);
            }
        }
    }
}

#endif
