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

#ifdef __AVX512F__
#define LANES 16
#define MR 12
#else
#define LANES 8
#define MR 6
#endif
#define NR (2 * LANES)
#ifndef KC
#define KC 768
#endif
#ifndef MC
#define MC (12 * MR)
#endif

typedef float vf __attribute__((vector_size(LANES * 4)));

static inline vf vload(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* One tile: `mr` rows (a constant at every call site, so the accumulators live in registers) by NR columns,
 * over k in [0, kc). `first`: the tile starts from bias (or zero), else from what `out` holds. `valid`: columns
 * of this panel that exist (the last panel of an N that is not a multiple of NR). */
static inline __attribute__((always_inline)) void tile(const int mr, const float *x, int64_t x_stride,
                                                       const float *panel, int64_t kc, float *out,
                                                       int64_t out_stride, int first, const float *bias,
                                                       int64_t valid) {
    vf c0[MR], c1[MR];
    for (int i = 0; i < mr; ++i) c0[i] = c1[i] = (vf){0};
    for (int64_t k = 0; k < kc; ++k) {
        const vf b0 = vload(panel + k * NR), b1 = vload(panel + k * NR + LANES);
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
                base0 = bias ? vload(bias) : (vf){0};
                base1 = bias ? vload(bias + LANES) : (vf){0};
            } else {
                base0 = vload(row);
                base1 = vload(row + LANES);
            }
            vstore(row, base0 + c0[i]);
            vstore(row + LANES, base1 + c1[i]);
        } else {
            float lanes[NR];
            vstore(lanes, c0[i]);
            vstore(lanes + LANES, c1[i]);
            for (int64_t j = 0; j < valid; ++j)
                row[j] = (first ? (bias ? bias[j] : 0.0f) : row[j]) + lanes[j];
        }
    }
}

#define TILE_CASE(n) \
    case n: tile(n, x, x_stride, panel, kc, out, out_stride, first, bias, valid); break;

static void tile_any(int mr, const float *x, int64_t x_stride, const float *panel, int64_t kc, float *out,
                     int64_t out_stride, int first, const float *bias, int64_t valid) {
    switch (mr) {
        TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5) TILE_CASE(6)
#if MR > 6
        TILE_CASE(7) TILE_CASE(8) TILE_CASE(9) TILE_CASE(10) TILE_CASE(11) TILE_CASE(12)
#endif
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

/* x [rows, k] (row stride x_stride, unit column stride), packed as above for n outputs, bias [n] or NULL,
 * out [rows, n] (row stride out_stride). Returns 0, or -1 on bad sizes. */
int longtail_gemm_packed(const float *x, int64_t x_stride, int64_t rows, int64_t k, const float *packed,
                         const float *bias, float *out, int64_t out_stride, int64_t n, int64_t threads) {
    if (rows < 1 || k < 1 || n < 1 || x_stride < k || out_stride < n) return -1;
    const int64_t panels = (n + NR - 1) / NR;
    const int team = threads > 1 && rows * n * k >= (1 << 16) ? (int)threads : 1;
#pragma omp parallel num_threads(team)
    {
        int64_t id = 0, count = 1;
#ifdef _OPENMP
        id = omp_get_thread_num();
        count = omp_get_num_threads();
#endif
        const int64_t begin = panels * id / count, end = panels * (id + 1) / count;
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
                        tile_any(mr, x + m * x_stride + k0, x_stride, panel, kc, out + m * out_stride + p * NR,
                                 out_stride, k0 == 0, tile_bias, valid);
                    }
                }
            }
        }
    }
    return 0;
}
