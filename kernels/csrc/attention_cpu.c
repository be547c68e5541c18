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
 * Threads: work is shared among `threads` OpenMP threads (tokens for RoPE, (row, kv head) pairs for
 * decode attention); every output element is written by one thread, computed in the same order as
 * with one, so results do not depend on the thread count. Built with -fopenmp, the library links the
 * libgomp torch has already loaded (same soname): one thread pool for torch and for these kernels.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

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

/* out[r, h] = softmax(q[r, h] . K^T * scale) V over the first context_lens[r] positions of row r,
 * whose position p lives in slot block_tables[r, p / block_size] * block_size + p % block_size.
 * q rows are `q_stride` elements apart ([heads, head_dim] each), out rows `out_stride`. */
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
    const int64_t group = heads / kv_heads, kv_width = kv_heads * head_dim, pairs = rows * kv_heads;
    int failed = 0;
    /* Every (row, kv head) reads its own keys once for the whole query group; one pair is too
       little to fork for, a batch's worth is not. */
#pragma omp parallel num_threads(threads > 0 ? threads : 1) if (threads > 1 && pairs * longest >= 4096)
    {
        float *scores = malloc(sizeof(float) * (size_t)(group * longest));
        float *acc = malloc(sizeof(float) * (size_t)(group * head_dim));
        float *query = malloc(sizeof(float) * (size_t)(group * head_dim));
        float *key = malloc(sizeof(float) * (size_t)head_dim);
        const int ready = scores && acc && query && key;
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t pair = 0; pair < pairs; ++pair) {
            if (!ready) continue;
            const int64_t r = pair / kv_heads, g = pair % kv_heads;
            const int64_t length = context_lens[r];
            const int64_t *table = block_tables + r * table_stride;
            for (int64_t j = 0; j < group; ++j)
                for (int64_t i = 0; i < head_dim; ++i)
                    query[j * head_dim + i] = load(q, r * q_stride + (g * group + j) * head_dim + i, dtype);
            for (int64_t p = 0; p < length; ++p) {
                const int64_t slot = table[p / block_size] * block_size + p % block_size;
                const int64_t at = slot * kv_width + g * head_dim;
                const float *k;
                if (dtype == 0) {
                    k = (const float *)key_cache + at;
                } else {
                    for (int64_t i = 0; i < head_dim; ++i) key[i] = load(key_cache, at + i, 1);
                    k = key;
                }
                for (int64_t j = 0; j < group; ++j) {
                    const float *qj = query + j * head_dim;
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t i = 0; i < head_dim; ++i) dot += qj[i] * k[i];
                    scores[j * longest + p] = dot * scale;
                }
            }
            for (int64_t j = 0; j < group; ++j) {
                float *row = scores + j * longest;
                float peak = -INFINITY, total = 0.0f;
                for (int64_t p = 0; p < length; ++p) peak = row[p] > peak ? row[p] : peak;
                for (int64_t p = 0; p < length; ++p) {
                    row[p] = expf(row[p] - peak);
                    total += row[p];
                }
                const float inverse = 1.0f / total;
                for (int64_t p = 0; p < length; ++p) row[p] *= inverse;
            }
            memset(acc, 0, sizeof(float) * (size_t)(group * head_dim));
            for (int64_t p = 0; p < length; ++p) {
                const int64_t slot = table[p / block_size] * block_size + p % block_size;
                const int64_t at = slot * kv_width + g * head_dim;
                const float *v;
                if (dtype == 0) {
                    v = (const float *)value_cache + at;
                } else {
                    for (int64_t i = 0; i < head_dim; ++i) key[i] = load(value_cache, at + i, 1);
                    v = key;
                }
                for (int64_t j = 0; j < group; ++j) {
                    const float weight = scores[j * longest + p];
                    float *aj = acc + j * head_dim;
#pragma omp simd
                    for (int64_t i = 0; i < head_dim; ++i) aj[i] += weight * v[i];
                }
            }
            for (int64_t j = 0; j < group; ++j)
                for (int64_t i = 0; i < head_dim; ++i)
                    store(out, r * out_stride + (g * group + j) * head_dim + i, acc[j * head_dim + i], dtype);
        }
        free(scores), free(acc), free(query), free(key);
    }
    return failed ? -4 : 0;
}
