/* Multi-LoRA for short runs of tokens on a CPU: out[t] += scale_s * (x[t] A_s^T) B_s^T.
 *
 * Why C: a decode step on a CPU meets one small (rank x in) matrix pair per adapter per
 * projection per layer, a few tokens each. As torch calls that is ~13 us of dispatch per
 * matmul, about half of the LoRA time; here a whole layer's projection group is one call
 * that streams each adapter's rows once.
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
 * The per-pair math is lora_pair.h (shared with the fused GEMM + LoRA of gemm_fp32.c).
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
#include <string.h>

#include "lora_pair.h"

int longtail_lora_runs(const void *x, int64_t x_stride, int64_t in_dim, void *out, int64_t out_stride,
                       int64_t out_width, int64_t rows, const int64_t *runs, int64_t run_count, int64_t proj_count,
                       int64_t slot_count, const int64_t *out_cols, const int64_t *a_addr, const int64_t *b_addr,
                       const int64_t *ranks, const float *scales, int dtype, int64_t threads) {
    int64_t widest;
    const int bad = check_group(runs, run_count, slot_count, rows, out_cols, proj_count, out_width, &widest);
    if (bad) return bad;
    const int64_t pairs = run_count * proj_count;
    const int64_t padded = (in_dim + LANES - 1) / LANES * LANES;
    const int64_t padded_width = (widest + LANES - 1) / LANES * LANES;
    const int64_t team = threads > 1 && pairs > 1 ? threads : 1;
    /* Per thread: its tokens in fp32, zero-padded to whole vectors, and their LoRA rows; allocated before anything
     * is written. */
    const int64_t per_thread = TOKEN_TILE * (padded + padded_width) + 16;
    float *scratch = aligned_alloc(64, (size_t)(team * per_thread * (int64_t)sizeof(float) + 63) / 64 * 64);
    if (!scratch) return -4;
    memset(scratch, 0, (size_t)(team * per_thread) * sizeof(float));
    /* A pair is at least a rank x in_dim read: worth a fork once there are two of them. */
#pragma omp parallel for schedule(dynamic, 1) num_threads(team) if (team > 1)
    for (int64_t pair = 0; pair < pairs; ++pair) {
        const int64_t r = pair / proj_count, p = pair % proj_count;
        const int64_t slot = runs[3 * r], index = p * slot_count + slot, rank = ranks[index];
        if (rank <= 0) continue;
        float *xs = scratch + (int64_t)omp_get_thread_num() * per_thread;
        lora_pair(x, x_stride, in_dim, out, out_stride, 0, runs[3 * r + 1], runs[3 * r + 2],
               (const void *)(intptr_t)a_addr[index], (const void *)(intptr_t)b_addr[index], rank, scales[index],
               out_cols[2 * p], out_cols[2 * p + 1], xs, padded, xs + TOKEN_TILE * padded, padded_width, dtype);
    }
    free(scratch);
    return 0;
}
