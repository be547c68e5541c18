/* out[m, n] = x[m, :] . W[n, :] (+ bias[n]) in fp32 for any number of rows: the CPU engine's batched matmuls.
 *
 * Why C: at 32-128 rows (a decode step of a full batch) and in prefill, a linear layer is arithmetic-bound,
 * and torch's fp32 paths left a fifth of these cores' FMA rate unused: MKL's plain sgemm and oneDNN's packed
 * inner product reached 120-180 GFLOP/s on the 2-core AVX-512 EPYC where vLLM's oneDNN matmul reached
 * 165-207 (docs/serving.md, "Fifth round"). This is the usual register-blocked GEMM: the weight is packed once
 * at load into panels of NR output columns, k-major (`longtail_gemm_pack` / kernels.gemm_cpu.pack), so the
 * inner loop loads NR consecutive weights, broadcasts one x value per row, and keeps an MR x NR tile of
 * outputs in registers for the whole k loop (AVX-512: 12 rows x 32 columns in 24 zmm accumulators; AVX2:
 * 6 x 16 in 12 ymm).
 *
 * Blocking: k in chunks of KC (768: a panel's chunk, 96 KB, stays in L2 while every row tile of the block passes;
 * 384 ran 5-8 % slower on the AVX-512 EPYC, 576-1536 alike),
 * rows in blocks of MC (the block's x chunk stays in L2 while the thread's panels pass), panels shared among
 * torch's OpenMP threads in contiguous ranges (each thread writes its own columns: no barrier between
 * k chunks). Summation in fp32, in k order per output: the result differs from a BLAS's in rounding order only.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "lora_pair.h"

#if LANES == 16
#define MR 12
#else
#define MR 6
#endif
#define NR (2 * LANES)
#ifndef KC
#define KC 768
#endif
/* The fused LoRA's prefetch: at most one cache line per PF_STRIDE k steps of a tile. One per step slowed the tiles
 * (the prefetches held the line fill buffers the panels' loads need): 114-row decode step, 38 adapters, 2-core
 * Xeon: base 99-107 ms; LoRA after the GEMM +38; fused with a line per 1, 2, 3, 4, 6 k steps +31, +22, +19,
 * +28, +32. PREFETCH=0 builds it without (a test checks the results are the same bits). */
#ifndef PF_STRIDE
#define PF_STRIDE 2
#endif
#ifndef PREFETCH
#define PREFETCH 1
#endif
#ifndef MC
#define MC (12 * MR)
#endif

/* One tile: `mr` rows (a constant at every call site, so the accumulators live in registers) by NR columns,
 * over k in [0, kc). `first`: the tile starts from bias (or zero), else from what `out` holds. `valid`: columns
 * of this panel that exist (the last panel of an N that is not a multiple of NR). */
static inline __attribute__((always_inline)) void tile(const int mr, const float *x, int64_t x_stride,
                                                       const float *panel, int64_t panel_stride, int64_t kc,
                                                       float *out, int64_t out_stride, int first,
                                                       const float *bias, int64_t valid, const char *prefetch,
                                                       int64_t lines) {
    vf c0[MR], c1[MR];
    for (int i = 0; i < mr; ++i) c0[i] = c1[i] = (vf){0};
    /* `lines` (<= kc / PF_STRIDE) cache lines from `prefetch` on their way to L2, one per PF_STRIDE k steps: the
     * LoRA factors the thread reads after these tiles, fetched while the FMAs leave the memory bus idle. One k loop
     * with the prefetch behind a branch: a loop over lines around PF_STRIDE k steps left gcc short of registers
     * with AVX2's 16 (12 accumulators, 2 panel vectors, a broadcast), and it read the panel from memory in every
     * FMA: a 6-row tile with a line per 2 k steps took 1.67 us against 1.10 without lines (2-core AVX2 EPYC,
     * docs/serving.md "Eleventh round"); this loop takes 1.10-1.16. */
    for (int64_t k = 0; k < kc; ++k) {
        if (k % PF_STRIDE == 0 && k / PF_STRIDE < lines) __builtin_prefetch(prefetch + k / PF_STRIDE * 64, 0, 2);
        const vf b0 = loadf(panel + k * panel_stride), b1 = loadf(panel + k * panel_stride + LANES);
        for (int i = 0; i < mr; ++i) {
            const float a = x[i * x_stride + k];
            c0[i] += a * b0;
            c1[i] += a * b1;
        }
    }
    for (int i = 0; i < mr; ++i) {
        float *row = out + i * out_stride;
        if (valid == NR) {
            vf base0, base1;
            if (first) {
                base0 = bias ? loadf(bias) : (vf){0};
                base1 = bias ? loadf(bias + LANES) : (vf){0};
            } else {
                base0 = loadf(row);
                base1 = loadf(row + LANES);
            }
            storef(row, base0 + c0[i]);
            storef(row + LANES, base1 + c1[i]);
        } else {
            float lanes[NR];
            storef(lanes, c0[i]);
            storef(lanes + LANES, c1[i]);
            for (int64_t j = 0; j < valid; ++j)
                row[j] = (first ? (bias ? bias[j] : 0.0f) : row[j]) + lanes[j];
        }
    }
}

/* A switch's cases for every row count of a tile, 1 to MR: each calls tile() with its count as a constant. */
#if MR > 6
#define EVERY_ROW_COUNT(CASE) CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) CASE(9) CASE(10) \
                              CASE(11) CASE(12)
#else
#define EVERY_ROW_COUNT(CASE) CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6)
#endif

#define TILE_CASE(n) \
    case n: tile(n, x, x_stride, panel, NR, kc, out, out_stride, first, bias, valid, prefetch, lines); break;

static void tile_any(int mr, const float *x, int64_t x_stride, const float *panel, int64_t kc, float *out,
                     int64_t out_stride, int first, const float *bias, int64_t valid, const char *prefetch,
                     int64_t lines) {
    switch (mr) {
        EVERY_ROW_COUNT(TILE_CASE)
        default: break;
    }
}

#define STRIDED_CASE(n) \
    case n: tile(n, x, x_stride, panel, panel_stride, kc, out, out_stride, 0, NULL, NR, NULL, 0); break;

/* A tile added to what `out` holds, over a panel whose k steps lie `panel_stride` floats apart (a plain row-major
 * [k, width] matrix read NR columns at a time), with no prefetch: the long runs' expand. A function of its own so
 * the packed layout's tiles keep NR as a constant stride. */
static void tile_strided(int mr, const float *x, int64_t x_stride, const float *panel, int64_t panel_stride,
                         int64_t kc, float *out, int64_t out_stride) {
    switch (mr) {
        EVERY_ROW_COUNT(STRIDED_CASE)
        default: break;
    }
}

/* Output columns per panel of the packed layout on this build. */
int64_t longtail_gemm_panel_width(void) { return NR; }

/* packed[p, k, j] = weight[p * NR + j, k], zero where p * NR + j >= n: ceil(n / NR) * k * NR floats. */
void longtail_gemm_pack(const float *weight, int64_t n, int64_t k, float *packed) {
    const int64_t panels = (n + NR - 1) / NR;
    for (int64_t p = 0; p < panels; ++p)
        for (int64_t kk = 0; kk < k; ++kk)
            for (int64_t j = 0; j < NR; ++j) {
                const int64_t row = p * NR + j;
                packed[(p * k + kk) * NR + j] = row < n ? weight[row * k + kk] : 0.0f;
            }
}

/* ---- The base matmul with the LoRA of a decode step fused in ----
 *
 * Why: in a decode step the LoRA of a projection group is a stream over every active adapter's factors (691 MB
 * a step for the 38 adapters of the bench trace), read at DRAM speed once the base matmul is done, while during
 * that matmul the cores are busy with FMAs and the memory bus is nearly idle. Here each thread interleaves the
 * two: while it computes its tiles of the base output it prefetches into L2, a line per PF_STRIDE k steps, the factors of
 * its next LoRA pairs (spread evenly over its tiles), and runs each pair once its factors are fetched. The pairs
 * write their LoRA terms to a scratch; after a barrier they are added to the finished base output, so each
 * output is base + LoRA as the unfused kernels (and torch's reference) compute it. */

/* One thread's LoRA work: its pairs (indices into the run x projection table) and where their factors lie. */
typedef struct {
    const int64_t *list;
    int64_t count;
    const int64_t *runs, *out_cols, *a_addr, *b_addr, *ranks;
    int64_t proj_count, slot_count, in_dim;
} lora_plan;

/* A pair's factors are prefetched and applied in units of UNIT_RANK rank rows (their A rows, then their B rows),
 * each unit as soon as its lines are issued: a whole pair (up to 540 KB for a rank-64 gate projection) fetched
 * ahead of its use had lost lines from L2 to the tiles' own traffic by the time it ran. On the bench trace the
 * pairs read 8-15 bytes a TSC cycle whole and 13-21 in units, where a pair just prefetched and timed alone reads
 * ~40; the fused GEMMs took 0.5-1 % less time (2-core Xeon, docs/serving.md "Tenth round"). A multiple of 4, so the
 * shrink's groups of four A rows and the expand's order over B's rows are those of a whole pair: the same bits. */
#ifndef UNIT_RANK
#define UNIT_RANK 16
#endif
/* Runs up to this many tokens are applied unit by unit (the thread's scratch holds their rows between units); longer
 * ones take the GEMM's tiles (LONG_TOKENS, below) or, where those cannot, run whole once all their units are
 * fetched. */
#define UNIT_TOKENS (2 * TOKEN_TILE)

/* The thread's prefetch position: line `at` of the A (half 0) or B (half 1) rows of unit `unit` of its pair
 * `pair` (an index into its plan's list). */
typedef struct {
    const char *at, *end;
    int64_t pair, unit, half;
} factor_cursor;

/* Where a pair (run * proj_count + projection, as the call's pair lists hold them) lies: its run, projection and
 * table entry. */
static inline void place(const int64_t *runs, int64_t proj_count, int64_t slot_count, int64_t pair, int64_t *r,
                         int64_t *p, int64_t *index) {
    *r = pair / proj_count;
    *p = pair % proj_count;
    *index = *p * slot_count + runs[3 * *r];
}

static inline void pair_place(const lora_plan *plan, int64_t pair, int64_t *r, int64_t *p, int64_t *index) {
    place(plan->runs, plan->proj_count, plan->slot_count, pair, r, p, index);
}

static inline int64_t unit_count(const lora_plan *plan, int64_t i) {
    int64_t r, p, index;
    pair_place(plan, plan->list[i], &r, &p, &index);
    return (plan->ranks[index] + UNIT_RANK - 1) / UNIT_RANK;
}

static void span_bounds(const lora_plan *plan, factor_cursor *c) {
    int64_t r, p, index;
    pair_place(plan, plan->list[c->pair], &r, &p, &index);
    const int64_t width = c->half ? plan->out_cols[2 * p + 1] : plan->in_dim, first_row = c->unit * UNIT_RANK;
    const int64_t rows = plan->ranks[index] - first_row < UNIT_RANK ? plan->ranks[index] - first_row : UNIT_RANK;
    const char *first = (const char *)(intptr_t)(c->half ? plan->b_addr[index] : plan->a_addr[index]) +
                        first_row * width * (int64_t)sizeof(float);
    c->at = (const char *)((uintptr_t)first & ~(uintptr_t)63);
    c->end = first + rows * width * (int64_t)sizeof(float);
}

/* Cache lines of all the plan's factors, as the cursor will walk them. */
static int64_t plan_lines(const lora_plan *plan) {
    int64_t lines = 0;
    for (int64_t i = 0; i < plan->count; ++i)
        for (int64_t unit = 0, units = unit_count(plan, i); unit < units; ++unit)
            for (int64_t half = 0; half < 2; ++half) {
                factor_cursor c = {.pair = i, .unit = unit, .half = half};
                span_bounds(plan, &c);
                lines += (c.end - c.at + 63) / 64;
            }
    return lines;
}

/* Up to `want` lines from the cursor, all in one span: their first address in *from, their count returned. */
static int64_t take_lines(const lora_plan *plan, factor_cursor *c, int64_t want, const char **from) {
    if (c->pair >= plan->count || want <= 0) return 0;
    const int64_t left = (c->end - c->at + 63) / 64, lines = want < left ? want : left;
    *from = c->at;
    c->at += lines * 64;
    if (c->at >= c->end) {
        if (++c->half == 2) {
            c->half = 0;
            if (++c->unit == unit_count(plan, c->pair)) {
                c->unit = 0;
                ++c->pair;
            }
        }
        if (c->pair < plan->count) span_bounds(plan, c);
    }
    return lines;
}

/* Whether the cursor has issued every line of unit `unit` of pair i (both halves). */
static inline int unit_fetched(const factor_cursor *c, int64_t i, int64_t unit) {
    return c->pair > i || (c->pair == i && c->unit > unit);
}

/* This thread's number in the OpenMP team and the team's size (0 of 1 without OpenMP). */
static inline void team_place(int64_t *id, int64_t *size) {
    *id = 0;
    *size = 1;
#ifdef _OPENMP
    *id = omp_get_thread_num();
    *size = omp_get_num_threads();
#endif
}

/* One fused thread's state between its tiles: its pairs' prefetch, which of them it has claimed, and the pair it
 * is applying unit by unit. */
typedef struct {
    const float *x;
    int64_t x_stride, k, n;
    float *delta, *xs, *lora;
    int64_t padded, padded_width;
    const int64_t *list;   /* every pair of the call */
    const int64_t *run_row; /* run r's first row in delta */
    const float *scales;
    lora_plan plan;        /* this thread's own pairs, list[first .. last) */
    factor_cursor cursor;
    int64_t rate, owed, first, last;
    int64_t *next;         /* this thread's next unclaimed pair (other threads may claim it too) */
    int64_t current, unit, units, whole; /* the pair being applied (-1: none), its next unit, its units; whole: too
                                          * many tokens for the scratch, run whole once fetched */
} fused_thread;

/* Pair g of the whole list, claimed by the calling thread: its LoRA term into the delta scratch. */
static void run_pair(const fused_thread *f, int64_t g) {
    const lora_plan *plan = &f->plan;
    int64_t r, p, index;
    pair_place(plan, f->list[g], &r, &p, &index);
    lora_pair(f->x, f->x_stride, f->k, f->delta + f->run_row[r] * f->n, f->n, 1, plan->runs[3 * r + 1],
              plan->runs[3 * r + 2],
              (const void *)(intptr_t)plan->a_addr[index], (const void *)(intptr_t)plan->b_addr[index],
              plan->ranks[index], f->scales[index], plan->out_cols[2 * p], plan->out_cols[2 * p + 1], f->xs,
              f->padded, f->lora, f->padded_width, 0);
}

/* Pair g, just claimed: its tokens' rows into the scratch (x as lora_pair reads it, the LoRA term zeroed). */
static void start_pair(fused_thread *f, int64_t g) {
    const lora_plan *plan = &f->plan;
    int64_t r, p, index;
    pair_place(plan, f->list[g], &r, &p, &index);
    const int64_t begin = plan->runs[3 * r + 1], tokens = plan->runs[3 * r + 2] - begin;
    f->current = g;
    f->unit = 0;
    f->units = unit_count(plan, g - f->first);
    f->whole = tokens > UNIT_TOKENS;
    if (f->whole) return;
    for (int64_t t = 0; t < tokens; ++t) {
        memcpy(f->xs + t * f->padded, f->x + (begin + t) * f->x_stride, (size_t)f->k * sizeof(float));
        memset(f->lora + t * f->padded_width, 0, (size_t)plan->out_cols[2 * p + 1] * sizeof(float));
    }
}

/* The current pair's next unit: its rank rows through the shrink and the expand, for each tile of its tokens, as
 * lora_pair's rank loop does them; after the last, the LoRA term goes to the run's rows of delta. */
static void run_unit(fused_thread *f) {
    const lora_plan *plan = &f->plan;
    int64_t r, p, index;
    pair_place(plan, f->list[f->current], &r, &p, &index);
    const int64_t begin = plan->runs[3 * r + 1], tokens = plan->runs[3 * r + 2] - begin;
    const int64_t width = plan->out_cols[2 * p + 1], j0 = f->unit * UNIT_RANK;
    const int64_t count = plan->ranks[index] - j0 < UNIT_RANK ? plan->ranks[index] - j0 : UNIT_RANK;
    const void *a = (const void *)(intptr_t)plan->a_addr[index], *b = (const void *)(intptr_t)plan->b_addr[index];
    float shrunk[TOKEN_TILE][RANK_TILE];
    for (int64_t t0 = 0; t0 < tokens; t0 += TOKEN_TILE) {
        const int64_t tile_tokens = tokens - t0 < TOKEN_TILE ? tokens - t0 : TOKEN_TILE;
        shrink(f->xs + t0 * f->padded, f->padded, tile_tokens, a, f->k, j0, count, f->scales[index], 0, shrunk);
        expand(f->lora + t0 * f->padded_width, f->padded_width, tile_tokens, b, width, j0, count, 0, shrunk);
    }
    if (++f->unit < f->units) return;
    for (int64_t t = 0; t < tokens; ++t)
        memcpy(f->delta + (f->run_row[r] + t) * f->n + plan->out_cols[2 * p], f->lora + t * f->padded_width,
               (size_t)width * sizeof(float));
    f->current = -1;
}

/* Between tiles: apply what the prefetch has fetched, unit by unit, claiming the thread's next pair when its first
 * unit is in (`drain`: after the tiles, finish the current pair whatever is fetched). */
static void advance_pairs(fused_thread *f, int drain) {
    for (;;) {
        if (f->current < 0) {
            if (drain) return;
            int64_t g = __atomic_load_n(f->next, __ATOMIC_RELAXED);
            if (g >= f->last || !unit_fetched(&f->cursor, g - f->first, 0)) return;
            if ((g = __atomic_fetch_add(f->next, 1, __ATOMIC_RELAXED)) >= f->last) return;
            start_pair(f, g);
        }
        const int64_t i = f->current - f->first;
        if (f->whole) {
            if (!drain && !unit_fetched(&f->cursor, i, f->units - 1)) return;
            run_pair(f, f->current);
            f->current = -1;
            continue;
        }
        if (!drain && !unit_fetched(&f->cursor, i, f->unit)) return;
        run_unit(f);
    }
}

/* A thread's share of the matmul: panels [begin, end), every row tile over every k chunk. With `fused` (NULL at
 * the plain call site, so its code drops out there) each tile also prefetches that thread's next factor lines,
 * and after it the thread applies what has been fetched of its pairs (advance_pairs). */
static inline __attribute__((always_inline)) void walk_tiles(const float *x, int64_t x_stride, int64_t rows,
                                                             int64_t k, const float *packed, const float *bias,
                                                             float *out, int64_t out_stride, int64_t n,
                                                             int64_t begin, int64_t end, fused_thread *fused) {
    for (int64_t k0 = 0; k0 < k; k0 += KC) {
        const int64_t kc = k - k0 < KC ? k - k0 : KC;
        for (int64_t m0 = 0; m0 < rows; m0 += MC) {
            const int64_t mc = rows - m0 < MC ? rows - m0 : MC;
            for (int64_t p = begin; p < end; ++p) {
                const float *panel = packed + (p * k + k0) * NR;
                const int64_t valid = n - p * NR < NR ? n - p * NR : NR;
                const float *tile_bias = bias ? bias + p * NR : NULL;
                for (int64_t m = m0; m < m0 + mc; m += MR) {
                    const int mr = (int)(m0 + mc - m < MR ? m0 + mc - m : MR);
                    const char *from = NULL;
                    int64_t lines = 0;
                    if (fused) {
                        const int64_t cap = kc / PF_STRIDE, want = fused->rate + fused->owed < cap
                                                                       ? fused->rate + fused->owed : cap;
                        lines = take_lines(&fused->plan, &fused->cursor, want, &from);
                        fused->owed = want - lines;
                    }
                    tile_any(mr, x + m * x_stride + k0, x_stride, panel, kc, out + m * out_stride + p * NR,
                             out_stride, k0 == 0, tile_bias, valid, from, lines);
                    if (fused) advance_pairs(fused, 0);
                }
            }
        }
    }
}

/* x [rows, k] (row stride x_stride, unit column stride), packed as above for n outputs, bias [n] or NULL,
 * out [rows, n] (row stride out_stride). Returns 0, or -1 on bad sizes. */
int longtail_gemm_packed(const float *x, int64_t x_stride, int64_t rows, int64_t k, const float *packed,
                         const float *bias, float *out, int64_t out_stride, int64_t n, int64_t threads) {
    if (rows < 1 || k < 1 || n < 1 || x_stride < k || out_stride < n) return -1;
    const int64_t panels = (n + NR - 1) / NR;
    const int team = threads > 1 && rows * n * k >= (1 << 16) ? (int)threads : 1;
#pragma omp parallel num_threads(team)
    {
        int64_t id, count;
        team_place(&id, &count);
        walk_tiles(x, x_stride, rows, k, packed, bias, out, out_stride, n, panels * id / count,
                   panels * (id + 1) / count, NULL);
    }
    return 0;
}

/* Long runs (more than LONG_TOKENS tokens: a prompt, or a popular adapter's rows in a decode step) meet each factor
 * element many times, so their pairs are arithmetic, not a stream. The shrink of each runs first (into `shrunk`,
 * shared by the threads, LONG_BLOCK tokens a work item), and the expand is more tiles of this GEMM, over the rank
 * as k with lora_B as the panel (B is [rank, width] row-major: NR columns of a row are one k step of a panel whose
 * stride is the width). A tile sums from zero over the rank in order and adds to the finished base output, which
 * is what lora_pair's expand and its final add do: the same bits, at the GEMM's rate. Before, runs over 16 tokens
 * went to torch's two matmuls per pair (docs/serving.md, "Twelfth round"). Needs every projection's columns on
 * panel boundaries and ranks up to RANK_TILE; otherwise long runs go through lora_pair whole. LONG_TILES=0 builds
 * it without (a test checks the bits are the same). */
#ifndef LONG_TILES
#define LONG_TILES 1
#endif
#ifndef LONG_TOKENS
#define LONG_TOKENS TOKEN_TILE
#endif
#ifndef LONG_BLOCK
#define LONG_BLOCK 32
#endif

typedef struct {
    const int64_t *list;   /* long pairs: run * proj_count + projection */
    const int64_t *offset; /* each pair's first float in shrunk ([tokens, RANK_TILE] row-major) */
    const int64_t *items;  /* shrink work items (LONG_BLOCK tokens each) before each pair (count + 1 entries) */
    int64_t count;
    float *shrunk;
} long_pairs;

/* Shrink work item `item` (LONG_BLOCK tokens of one long pair, every rank row): the scaled dot products into
 * lp->shrunk, a row of RANK_TILE floats per token. A block's x rows and the pair's A rows stay in L2 while shrink
 * takes four A rows at a time against all the block's tokens. */
static void long_shrink(const long_pairs *lp, int64_t item, const float *x, int64_t x_stride, int64_t k,
                        const int64_t *runs, int64_t proj_count, int64_t slot_count, const int64_t *a_addr,
                        const int64_t *ranks, const float *scales) {
    int64_t i = 0;
    while (lp->items[i + 1] <= item) ++i;
    int64_t r, p, index;
    place(runs, proj_count, slot_count, lp->list[i], &r, &p, &index);
    const int64_t t0 = (item - lp->items[i]) * LONG_BLOCK, begin = runs[3 * r + 1];
    const int64_t tokens = runs[3 * r + 2] - begin - t0 < LONG_BLOCK ? runs[3 * r + 2] - begin - t0 : LONG_BLOCK;
    /* x's rows are fp32 with unit column stride: shrink reads them in place, whole vectors then the tail. */
    shrink(x + (begin + t0) * x_stride, x_stride, tokens, (const void *)(intptr_t)a_addr[index], k, 0, ranks[index],
           scales[index], 0, (float (*)[RANK_TILE])(lp->shrunk + lp->offset[i] + t0 * RANK_TILE));
}

/* The expand of every long pair over the calling thread's panels [begin, end), after their base output is done. */
static void long_expand(const long_pairs *lp, int64_t begin, int64_t end, float *out, int64_t out_stride,
                        const int64_t *runs, int64_t proj_count, int64_t slot_count, const int64_t *out_cols,
                        const int64_t *b_addr, const int64_t *ranks) {
    for (int64_t i = 0; i < lp->count; ++i) {
        int64_t r, p, index;
        place(runs, proj_count, slot_count, lp->list[i], &r, &p, &index);
        const int64_t rank = ranks[index], col0 = out_cols[2 * p], width = out_cols[2 * p + 1];  /* rank <= RANK_TILE */
        const int64_t first = col0 / NR > begin ? col0 / NR : begin;
        const int64_t last = (col0 + width) / NR < end ? (col0 + width) / NR : end;
        const float *b = (const float *)(intptr_t)b_addr[index], *shrunk = lp->shrunk + lp->offset[i];
        for (int64_t q = first; q < last; ++q)
            for (int64_t m = runs[3 * r + 1]; m < runs[3 * r + 2]; m += MR) {
                const int mr = (int)(runs[3 * r + 2] - m < MR ? runs[3 * r + 2] - m : MR);
                tile_strided(mr, shrunk + (m - runs[3 * r + 1]) * RANK_TILE, RANK_TILE, b + (q * NR - col0), width,
                             rank, out + m * out_stride + q * NR, out_stride);
            }
    }
}

/* As longtail_gemm_packed, then out[t, cols_p] += scale * (x[t] A^T) B^T for every run (slot, begin, end) and
 * projection p of the group (the table of kernels/csrc/lora_runs.c, fp32 factors; x is the LoRA's input too).
 * Returns 0; -1..-3 as check_group (lora_pair.h), -4 no memory, -5 bad sizes; nothing is written unless it
 * returns 0. */
int longtail_gemm_packed_lora(const float *x, int64_t x_stride, int64_t rows, int64_t k, const float *packed,
                              const float *bias, float *out, int64_t out_stride, int64_t n, int64_t threads,
                              const int64_t *runs, int64_t run_count, int64_t proj_count, int64_t slot_count,
                              const int64_t *out_cols, const int64_t *a_addr, const int64_t *b_addr,
                              const int64_t *ranks, const float *scales) {
    if (rows < 1 || k < 1 || n < 1 || x_stride < k || out_stride < n || run_count < 0 || proj_count < 1) return -5;
    int64_t widest;
    const int bad = check_group(runs, run_count, slot_count, rows, out_cols, proj_count, n, &widest);
    if (bad) return bad;
    int tiled = LONG_TILES;
    for (int64_t p = 0; p < proj_count; ++p)
        if (out_cols[2 * p] % NR || out_cols[2 * p + 1] % NR) tiled = 0;
    for (int64_t r = 0; r < run_count && tiled; ++r)  /* a long run's shrunk rows hold RANK_TILE ranks */
        for (int64_t p = 0; p < proj_count; ++p)
            if (ranks[p * slot_count + runs[3 * r]] > RANK_TILE) tiled = 0;
    const int64_t panels = (n + NR - 1) / NR;
    const int team = threads > 1 && rows * n * k >= (1 << 16) ? (int)threads : 1;
    const int64_t padded = (k + LANES - 1) / LANES * LANES, padded_width = (widest + LANES - 1) / LANES * LANES;
    const int64_t per_thread = UNIT_TOKENS * (padded + padded_width) + 16;
    /* Pairs with work, and the factor bytes before each: threads take contiguous shares of equal bytes. Long pairs
     * apart, with where their shrunk rows go and their shrink's work items. */
    const int64_t slots = run_count * proj_count;
    int64_t *list = malloc((size_t)(5 * slots + 2 * run_count + 2) * sizeof(int64_t));
    /* The LoRA terms: n columns for each row a short run covers (not every row: a prompt chunk beside them has
     * none, and a long run's expand goes straight to out). */
    int64_t *run_row = list ? list + 2 * slots : NULL, covered = 0, shrunk_floats = 0;
    int64_t *const long_list = list ? run_row + run_count : NULL, *const long_offset = list ? long_list + slots : NULL;
    int64_t *const long_items = list ? long_offset + slots : NULL;
    long_pairs lp = {.list = long_list, .offset = long_offset, .items = long_items, .count = 0};
    int64_t count = 0, total = 0;
    int64_t *before = list ? list + slots : NULL;
    if (list) long_items[0] = 0;
    for (int64_t r = 0; list && r < run_count; ++r) {
        const int64_t tokens = runs[3 * r + 2] - runs[3 * r + 1];
        const int long_run = tiled && tokens > LONG_TOKENS;
        run_row[r] = covered;
        if (!long_run) covered += tokens;
        for (int64_t p = 0; p < proj_count; ++p) {
            const int64_t index = p * slot_count + runs[3 * r];
            if (ranks[index] <= 0 || !tokens) continue;
            if (long_run) {
                long_list[lp.count] = r * proj_count + p;
                long_offset[lp.count] = shrunk_floats;
                long_items[lp.count + 1] = long_items[lp.count] + (tokens + LONG_BLOCK - 1) / LONG_BLOCK;
                ++lp.count;
                shrunk_floats += tokens * RANK_TILE;
                continue;
            }
            before[count] = total;
            list[count++] = r * proj_count + p;
            total += ranks[index] * (k + out_cols[2 * p + 1]);
        }
    }
    float *delta = malloc((size_t)((covered ? covered : 1) * n) * sizeof(float));
    lp.shrunk = malloc((size_t)(shrunk_floats ? shrunk_floats : 1) * sizeof(float));
    float *scratch = aligned_alloc(64, (size_t)(team * per_thread * (int64_t)sizeof(float) + 63) / 64 * 64);
    /* Per thread: its first and last pair, and the next one not yet claimed (a cache line each); then the long
     * pairs' next shrink item. */
    int64_t *claims = calloc((size_t)team * 8 * 3 + 8, sizeof(int64_t));
    if (!list || !delta || !lp.shrunk || !scratch || !claims) {
        free(list);
        free(delta);
        free(lp.shrunk);
        free(scratch);
        free(claims);
        return -4;
    }
    int64_t *const next_item = claims + team * 8 * 3;
    const int64_t items = lp.count ? long_items[lp.count] : 0;
#pragma omp parallel num_threads(team)
    {
        int64_t id, size;
        team_place(&id, &size);
        const int64_t begin = panels * id / size, end = panels * (id + 1) / size;
        int64_t first = 0, last = 0;
        while (first < count && before[first] * size < total * id) ++first;
        last = first;
        while (last < count && before[last] * size < total * (id + 1)) ++last;
        int64_t *const next = claims + id * 8, *const ends = claims + 8 * team;
        *next = first;
        ends[id * 8] = last;
        for (int64_t item; (item = __atomic_fetch_add(next_item, 1, __ATOMIC_RELAXED)) < items;)
            long_shrink(&lp, item, x, x_stride, k, runs, proj_count, slot_count, a_addr, ranks, scales);
#pragma omp barrier
        fused_thread state = {.x = x, .x_stride = x_stride, .k = k, .n = n, .delta = delta,
                              .xs = scratch + id * per_thread, .padded = padded, .padded_width = padded_width,
                              .list = list, .run_row = run_row, .scales = scales, .first = first, .last = last,
                              .next = next, .plan = {list + first, last - first, runs, out_cols, a_addr, b_addr,
                                                     ranks, proj_count, slot_count, k}};
        state.lora = state.xs + UNIT_TOKENS * padded;
        state.current = -1;
        const int64_t lines_total = plan_lines(&state.plan);
        const int64_t tiles = ((k + KC - 1) / KC) * ((rows + MR - 1) / MR) * (end - begin);
        state.rate = tiles && PREFETCH ? (lines_total + tiles - 1) / tiles : 0;
        if (state.plan.count) span_bounds(&state.plan, &state.cursor);
        walk_tiles(x, x_stride, rows, k, packed, bias, out, out_stride, n, begin, end, &state);
        advance_pairs(&state, 1);
        /* The thread's own columns are final: the long runs' expand adds to them (their rows are no short run's). */
        long_expand(&lp, begin, end, out, out_stride, runs, proj_count, slot_count, out_cols, b_addr, ranks);
        /* Its tiles done: the rest of its pairs, then whatever the other threads have not started. Every pair is
         * claimed once (an atomic counter per thread) and computed the same by any thread: the same bits. */
        for (int64_t turn = 0; turn < size; ++turn) {
            const int64_t owner = (id + turn) % size, end_of = ends[owner * 8];
            for (int64_t g; (g = __atomic_fetch_add(claims + owner * 8, 1, __ATOMIC_RELAXED)) < end_of;)
                run_pair(&state, g);
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t q = 0; q < count; ++q) {
            const int64_t r = list[q] / proj_count, p = list[q] % proj_count;
            const int64_t col0 = out_cols[2 * p], width = out_cols[2 * p + 1];
            for (int64_t t = runs[3 * r + 1]; t < runs[3 * r + 2]; ++t) {
                float *target = out + t * out_stride + col0;
                const float *term = delta + (run_row[r] + t - runs[3 * r + 1]) * n + col0;
                for (int64_t c = 0; c < width; ++c) target[c] += term[c];
            }
        }
    }
    free(list);
    free(delta);
    free(lp.shrunk);
    free(scratch);
    free(claims);
    return 0;
}
