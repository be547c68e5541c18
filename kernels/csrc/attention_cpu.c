/* The CPU engine's attention around the paged KV cache: RoPE + cache write, and decode attention
 * that reads keys and values where they lie in the cache (no gather into a padded copy).
 *
 * Why C: per layer a decode step did ~20 small torch calls for RoPE and the cache write and
 * ~10 for attention (a gather of every context through the block tables, then SDPA reading
 * the copy again). Each call is a few microseconds of dispatch, and under OpenMP each small
 * call also waits for both threads; here each is one call that touches every byte once.
 *
 * Layout (serving/kv_cache.py): one layer's cache is [slots, kv_heads, head_dim], slot =
 * block * block_size + offset. Tensors are fp32 (dtype 0) or bf16 (dtype 1, as uint16);
 * arithmetic is fp32 either way, bf16 results round to nearest even.
 *
 * Built without FMA contraction (-ffp-contract=off): RoPE is then the same two products and
 * one sum per element as torch's `q * cos + rotate_half(q) * sin`.
 * Every function checks its indices before writing and returns a negative code if one is out of range.
 *
 * Threads: work is shared among `threads` OpenMP threads (tokens for RoPE, rows for decode
 * attention); every output element is written by one thread, computed in the same order as
 * with one, so results do not depend on the thread count. Built with -fopenmp, the library links the
 * libgomp torch has already loaded (same soname): one thread pool for torch and for these kernels.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "simd.h"

/* qkv: [tokens, (heads + 2 kv_heads) * head_dim] rows `qkv_stride` elements apart; q and k are
 * rotated in place, then k and v are copied to slot write_slots[t] of the caches.
 * cos/sin: [tokens, head_dim] fp32 (already the doubled half, as HF builds them). */
int longtail_rope_write(void *qkv, int64_t qkv_stride, int64_t tokens, int64_t heads, int64_t kv_heads,
                        int64_t head_dim, const float *cos_t, const float *sin_t, void *key_cache,
                        void *value_cache, int64_t cache_slots, const int64_t *write_slots, int dtype,
                        int64_t threads) {
    for (int64_t t = 0; t < tokens; ++t)
        if (write_slots[t] < 0 || write_slots[t] >= cache_slots) return -1;
    const int64_t half = head_dim / 2, kv_width = kv_heads * head_dim;
    if (head_dim > 1024 || head_dim % 2) return -2;
    /* A decode step's few tokens are cheaper on one thread than a fork; a prompt's are not. */
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (threads > 1 && tokens >= 16)
    for (int64_t t = 0; t < tokens; ++t) {
        float rotated[1024];
        const float *c = cos_t + t * head_dim, *s = sin_t + t * head_dim;
        const int64_t row = t * qkv_stride;
        for (int64_t h = 0; h < heads + kv_heads; ++h) {
            const int64_t base = row + h * head_dim;
            for (int64_t i = 0; i < half; ++i) {
                const float x1 = load(qkv, base + i, dtype), x2 = load(qkv, base + half + i, dtype);
                float a = x1 * c[i], b = -x2 * s[i];
                float lo = a + b;
                a = x2 * c[half + i];
                b = x1 * s[half + i];
                rotated[i] = lo;
                rotated[half + i] = a + b;
            }
            /* torch rounds each product and the sum to the model dtype; in fp32 that is exact here. */
            for (int64_t i = 0; i < head_dim; ++i) store(qkv, base + i, rotated[i], dtype);
        }
        const int64_t slot = write_slots[t], k_src = row + heads * head_dim, v_src = k_src + kv_width;
        const size_t item = dtype == 0 ? 4 : 2;
        memcpy((char *)key_cache + slot * kv_width * item, (char *)qkv + k_src * item, kv_width * item);
        memcpy((char *)value_cache + slot * kv_width * item, (char *)qkv + v_src * item, kv_width * item);
    }
    return 0;
}

/* e^x for x <= 0 (a softmax argument after the row's max is subtracted), a vector at a time:
 * e^x = 2^n * 2^f with n = round(x log2 e) (truncating t - 1/2, as t <= 0), |f| <= 1/2, 2^f by its Taylor series
 * to degree 7 (relative error below 1e-8, under fp32's rounding). glibc's scalar expf was a third of a batch-128
 * decode step; a scalar polynomial under `omp simd` did not vectorise (the bit casts) and was still half of the
 * register-held path's time with the cache in L2 (90 of 165 cycles per position). e^-87 is already 0 against
 * the row's max term (which is 1), so arguments below are clamped there. */
typedef int32_t vi __attribute__((vector_size(LANES * 4)));

static inline vf select_v(vi mask, vf yes, vf no) { return (vf)(((vi)yes & mask) | ((vi)no & ~mask)); }

static inline vf exp_nonpositive_v(vf x) {
    const vf floor_value = (vf){0} - 87.0f;
    x = select_v(x < floor_value, floor_value, x);
    const vf t = x * 1.44269504088896341f;
    const vi n = __builtin_convertvector(t - 0.5f, vi);
    const vf f = t - __builtin_convertvector(n, vf);
    vf p = (vf){0} + 1.52527338e-5f;
    p = p * f + 1.54035304e-4f;
    p = p * f + 1.33335581e-3f;
    p = p * f + 9.61812911e-3f;
    p = p * f + 5.55041087e-2f;
    p = p * f + 2.40226507e-1f;
    p = p * f + 6.93147181e-1f;
    p = p * f + 1.0f;
    return p * (vf)((n + 127) << 23);
}

/* row[0 .. length) = softmax(row), a vector at a time. */
static inline void softmax_row(float *row, int64_t length) {
    const int64_t whole = length - length % LANES;
    float peak = -INFINITY;
    if (whole) {
        vf top = loadf(row);
        for (int64_t i = LANES; i < whole; i += LANES) {
            const vf next = loadf(row + i);
            top = select_v(next > top, next, top);
        }
        for (int i = 0; i < LANES; ++i) peak = top[i] > peak ? top[i] : peak;
    }
    for (int64_t i = whole; i < length; ++i) peak = row[i] > peak ? row[i] : peak;
    vf sums = {0};
    for (int64_t i = 0; i < whole; i += LANES) {
        const vf e = exp_nonpositive_v(loadf(row + i) - peak);
        storef(row + i, e);
        sums += e;
    }
    if (whole < length) { /* the last partial vector, padded with the max (e^0, left out of the sum) */
        float tail[LANES];
        for (int i = 0; i < LANES; ++i) tail[i] = whole + i < length ? row[whole + i] : peak;
        const vf e = exp_nonpositive_v(loadf(tail) - peak);
        for (int64_t i = whole; i < length; ++i) row[i] = e[i - whole];
        for (int i = 0; i < length - whole; ++i) sums[i] += e[i];
    }
    float total = 0.0f;
    for (int i = 0; i < LANES; ++i) total += sums[i];
    const float inverse = 1.0f / total;
    for (int64_t i = 0; i < whole; i += LANES) storef(row + i, loadf(row + i) * inverse);
    for (int64_t i = whole; i < length; ++i) row[i] *= inverse;
}

/* Positions ahead that the first pass over a row's keys (and values) asks for: a cache block is a few pages
 * of the cache at a random place, and the hardware prefetchers stop at page ends. */
#define PREFETCH_AHEAD 8

/* A walk over a row's positions in order: a position's slot is its block's base plus an offset kept
 * alongside (no division per position). */
typedef struct {
    int64_t block, offset;
} cursor;

static inline int64_t next_slot(const int64_t *table, cursor *at, int64_t block_size) {
    const int64_t slot = table[at->block] * block_size + at->offset;
    if (++at->offset == block_size) at->offset = 0, ++at->block;
    return slot;
}

/* Prefetches the slot of `position` (the cursor's next) and moves on; nothing past the row's length. */
static inline void prefetch_slot(const void *cache, const int64_t *table, cursor *at, int64_t block_size,
                                 int64_t row_bytes, int64_t position, int64_t length) {
    if (position < length) {
        const char *row = (const char *)cache + next_slot(table, at, block_size) * row_bytes;
        for (int64_t line = 0; line < row_bytes; line += 64) __builtin_prefetch(row + line, 0, 3);
    }
}

/* One query head's partial dot product with the key at `at`: VECS vectors of lanes still to be summed. */
static inline __attribute__((always_inline, optimize("fp-contract=fast"))) vf
partial_dot(const vf *q, const void *key_cache, int64_t at, const int VECS, const int dtype) {
    vf sum = q[0] * loadv(key_cache, at, dtype);
    for (int v = 1; v < VECS; ++v) sum += q[v] * loadv(key_cache, at + v * LANES, dtype);
    return sum;
}

/* One row's attention for the `chunk` query heads h0 .. h0 + chunk that share KV head g, head_dim = VECS
 * vectors, with the heads' queries, partial dot products and value sums held in registers (chunk and VECS
 * are constants where this is inlined). The general loop (longtail_paged_decode) keeps one accumulator per
 * dot product and sums its lanes at once (a chain of dependent adds per head and position), and adds every
 * value row into memory: 11 GB/s from a 30 GB/s cache walk (2-core Xeon, 114 rows of ~77 positions). Here
 * four positions' dot products are summed together (sums4), and the value sums stay in registers until the
 * row is done. */
static inline __attribute__((always_inline, optimize("fp-contract=fast"))) void
row_chunk(void *out, int64_t out_index, const float *query, const void *key_cache, const void *value_cache,
          const int64_t *table, int64_t length, int64_t block_size, int64_t kv_width, int64_t g, int64_t h0,
          float *scores, int64_t longest, float scale, int first, const int chunk, const int VECS,
          const int dtype) {
    const int64_t head_dim = (int64_t)VECS * LANES, row_bytes = kv_width * (dtype == 0 ? 4 : 2);
    /* The first chunk of a row reads its keys and values from memory; later chunks find them in L2. */
    cursor ahead = {0, 0};
    if (first)
        for (int64_t i = 0; i < PREFETCH_AHEAD; ++i) prefetch_slot(key_cache, table, &ahead, block_size, row_bytes, i, length);
    vf q[4][8];
    for (int c = 0; c < chunk; ++c)
        for (int v = 0; v < VECS; ++v) q[c][v] = loadf(query + (h0 + c) * head_dim + v * LANES);
    int64_t p = 0;
    cursor walk = {0, 0};
    for (; p + 4 <= length; p += 4) {
        vf dots[4][4];
        for (int j = 0; j < 4; ++j) {
            if (first) {
                cursor same = ahead;
                prefetch_slot(key_cache, table, &ahead, block_size, row_bytes, p + j + PREFETCH_AHEAD, length);
                prefetch_slot(value_cache, table, &same, block_size, row_bytes, p + j + PREFETCH_AHEAD, length);
            }
            const int64_t at = next_slot(table, &walk, block_size) * kv_width + g * head_dim;
            for (int c = 0; c < chunk; ++c) dots[c][j] = partial_dot(q[c], key_cache, at, VECS, dtype);
        }
        for (int c = 0; c < chunk; ++c) {
            float four[4];
            sums4(dots[c][0], dots[c][1], dots[c][2], dots[c][3], four);
            for (int j = 0; j < 4; ++j) scores[(h0 + c) * longest + p + j] = four[j] * scale;
        }
    }
    for (; p < length; ++p) {
        const int64_t at = next_slot(table, &walk, block_size) * kv_width + g * head_dim;
        for (int c = 0; c < chunk; ++c) {
            const vf zero = {0};
            float four[4];
            sums4(partial_dot(q[c], key_cache, at, VECS, dtype), zero, zero, zero, four);
            scores[(h0 + c) * longest + p] = four[0] * scale;
        }
    }
    for (int c = 0; c < chunk; ++c) softmax_row(scores + (h0 + c) * longest, length);
    vf acc[4][8];
    for (int c = 0; c < chunk; ++c)
        for (int v = 0; v < VECS; ++v) acc[c][v] = (vf){0};
    walk = (cursor){0, 0};
    ahead = (cursor){0, 0};
    if (first)
        for (int64_t i = 0; i < PREFETCH_AHEAD; ++i) prefetch_slot(value_cache, table, &ahead, block_size, row_bytes, i, length);
    for (p = 0; p < length; ++p) {
        if (first) prefetch_slot(value_cache, table, &ahead, block_size, row_bytes, p + PREFETCH_AHEAD, length);
        const int64_t at = next_slot(table, &walk, block_size) * kv_width + g * head_dim;
        vf values[8];
        for (int v = 0; v < VECS; ++v) values[v] = loadv(value_cache, at + v * LANES, dtype);
        for (int c = 0; c < chunk; ++c) {
            const float weight = scores[(h0 + c) * longest + p];
            for (int v = 0; v < VECS; ++v) acc[c][v] += weight * values[v];
        }
    }
    for (int c = 0; c < chunk; ++c)
        for (int v = 0; v < VECS; ++v)
            for (int i = 0; i < LANES; ++i) store(out, out_index + (h0 + c) * head_dim + v * LANES + i, acc[c][v][i], dtype);
}

/* The register-held path for head_dim of 4 or 8 vectors; 0 when the shape needs the general loop. */
static __attribute__((optimize("fp-contract=fast"))) int
row_vectors(void *out, int64_t out_index, const float *query, const void *key_cache, const void *value_cache,
            const int64_t *table, int64_t length, int64_t block_size, int64_t heads, int64_t kv_heads,
            int64_t head_dim, float *scores, int64_t longest, float scale, int dtype) {
    if (head_dim != 4 * LANES && head_dim != 8 * LANES) return 0;
    const int64_t group = heads / kv_heads, kv_width = kv_heads * head_dim;
    for (int64_t g = 0; g < kv_heads; ++g)
        for (int64_t h0 = g * group; h0 < (g + 1) * group; h0 += 4) {
            const int64_t left = (g + 1) * group - h0;
            const int chunk = left < 4 ? (int)left : 4;
#define ROW_CHUNK(C, V, D) row_chunk(out, out_index, query, key_cache, value_cache, table, length, block_size, \
                                     kv_width, g, h0, scores, longest, scale, g == 0 && h0 == 0, C, V, D)
#define ROW_CHUNKS(V, D)                 \
    switch (chunk) {                     \
    case 1: ROW_CHUNK(1, V, D); break;   \
    case 2: ROW_CHUNK(2, V, D); break;   \
    case 3: ROW_CHUNK(3, V, D); break;   \
    default: ROW_CHUNK(4, V, D); break;  \
    }
            if (head_dim == 4 * LANES) {
                if (dtype == 0) { ROW_CHUNKS(4, 0) } else { ROW_CHUNKS(4, 1) }
            } else {
                if (dtype == 0) { ROW_CHUNKS(8, 0) } else { ROW_CHUNKS(8, 1) }
            }
#undef ROW_CHUNKS
#undef ROW_CHUNK
        }
    return 1;
}

/* out[r, h] = softmax(q[r, h] . K^T * scale) V over the first context_lens[r] positions of row r,
 * whose position p lives in slot block_tables[r, p / block_size] * block_size + p % block_size.
 * q rows are `q_stride` elements apart ([heads, head_dim] each), out rows `out_stride`. */
/* Contraction allowed here (the file is built without it for RoPE's sake): the dot products and the value
 * sums take one fused multiply-add per element instead of two rounded operations. */
__attribute__((optimize("fp-contract=fast")))
int longtail_paged_decode(void *out, int64_t out_stride, const void *q, int64_t q_stride, const void *key_cache,
                          const void *value_cache, int64_t cache_blocks, const int64_t *block_tables,
                          int64_t table_stride, const int64_t *context_lens, int64_t rows, int64_t heads,
                          int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale, int dtype,
                          int64_t threads) {
    if (kv_heads <= 0 || heads % kv_heads || head_dim > 1024) return -2;
    int64_t longest = 0;
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t length = context_lens[r];
        if (length <= 0 || length > table_stride * block_size) return -3;
        for (int64_t b = 0; b < (length + block_size - 1) / block_size; ++b) {
            const int64_t block = block_tables[r * table_stride + b];
            if (block < 0 || block >= cache_blocks) return -1;
        }
        if (length > longest) longest = length;
    }
    const int64_t group = heads / kv_heads, kv_width = kv_heads * head_dim;
    int failed = 0;
    /* A row at a time, every head at once: a position's keys (and then values) for all KV heads are one
       contiguous run of the cache, read once for every head of every query group. One row is too little
       to fork for, a batch's worth is not. */
#pragma omp parallel num_threads(threads > 0 ? threads : 1) if (threads > 1 && rows > 1 && rows * longest >= 1024)
    {
        float *scores = malloc(sizeof(float) * (size_t)(heads * longest));
        float *acc = malloc(sizeof(float) * (size_t)(heads * head_dim));
        float *query = malloc(sizeof(float) * (size_t)(heads * head_dim));
        float *staged = malloc(sizeof(float) * (size_t)kv_width);
        const int ready = scores && acc && query && staged;
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < rows; ++r) {
            if (!ready) continue;
            const int64_t length = context_lens[r];
            const int64_t *table = block_tables + r * table_stride;
            for (int64_t i = 0; i < heads * head_dim; ++i) query[i] = load(q, r * q_stride + i, dtype);
            if (row_vectors(out, r * out_stride, query, key_cache, value_cache, table, length, block_size, heads,
                            kv_heads, head_dim, scores, longest, scale, dtype))
                continue;
            cursor walk = {0, 0};
            for (int64_t p = 0; p < length; ++p) {
                const int64_t slot = next_slot(table, &walk, block_size);
                const float *k;
                if (dtype == 0) {
                    k = (const float *)key_cache + slot * kv_width;
                } else {
                    for (int64_t i = 0; i < kv_width; ++i) staged[i] = load(key_cache, slot * kv_width + i, 1);
                    k = staged;
                }
                for (int64_t h = 0; h < heads; ++h) {
                    const float *qh = query + h * head_dim, *kh = k + (h / group) * head_dim;
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t i = 0; i < head_dim; ++i) dot += qh[i] * kh[i];
                    scores[h * longest + p] = dot * scale;
                }
            }
            for (int64_t h = 0; h < heads; ++h) softmax_row(scores + h * longest, length);
            memset(acc, 0, sizeof(float) * (size_t)(heads * head_dim));
            walk = (cursor){0, 0};
            for (int64_t p = 0; p < length; ++p) {
                const int64_t slot = next_slot(table, &walk, block_size);
                const float *v;
                if (dtype == 0) {
                    v = (const float *)value_cache + slot * kv_width;
                } else {
                    for (int64_t i = 0; i < kv_width; ++i) staged[i] = load(value_cache, slot * kv_width + i, 1);
                    v = staged;
                }
                for (int64_t h = 0; h < heads; ++h) {
                    const float weight = scores[h * longest + p];
                    const float *vh = v + (h / group) * head_dim;
                    float *ah = acc + h * head_dim;
#pragma omp simd
                    for (int64_t i = 0; i < head_dim; ++i) ah[i] += weight * vh[i];
                }
            }
            for (int64_t i = 0; i < heads * head_dim; ++i) store(out, r * out_stride + i, acc[i], dtype);
        }
        free(scores), free(acc), free(query), free(staged);
    }
    return failed ? -4 : 0;
}
