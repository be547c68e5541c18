/* The CPU kernels' widest fp32 vector: 16 lanes with AVX-512, else 8 (GCC vector extensions; -march=native
 * picks the instructions), loaded from fp32 or from bf16 (dtype 1, as uint16). */
#ifndef LONGTAIL_SIMD_H
#define LONGTAIL_SIMD_H

#include <stdint.h>
#include <string.h>

#ifdef __AVX512F__
#define LANES 16
#else
#define LANES 8
#endif

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef uint16_t vh __attribute__((vector_size(LANES * 2)));
typedef uint32_t vu __attribute__((vector_size(LANES * 4)));

static inline __attribute__((always_inline)) vf loadv(const void *base, int64_t index, int dtype) {
    vf value;
    if (dtype == 0) {
        memcpy(&value, (const float *)base + index, sizeof value);
    } else {
        vh half;
        memcpy(&half, (const uint16_t *)base + index, sizeof half);
        const vu bits = __builtin_convertvector(half, vu) << 16;
        memcpy(&value, &bits, sizeof value);
    }
    return value;
}

static inline vf loadf(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void storef(float *p, vf v) { memcpy(p, &v, sizeof v); }

#endif
