/* Eight-lane fp32 vectors for the CPU kernels, loaded from fp32 (dtype 0) or bf16 (dtype 1, as uint16).
 * GCC vector extensions: -march=native picks the instructions, so one source serves AVX2 and AVX-512. */
#ifndef LONGTAIL_VEC8_H
#define LONGTAIL_VEC8_H

#include <stdint.h>
#include <string.h>

typedef float f8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) f8 load8(const void *base, int64_t index, int dtype) {
    f8 value;
    if (dtype == 0) {
        memcpy(&value, (const float *)base + index, sizeof value);
    } else {
        u16x8 half;
        memcpy(&half, (const uint16_t *)base + index, sizeof half);
        u32x8 bits = __builtin_convertvector(half, u32x8) << 16;
        memcpy(&value, &bits, sizeof value);
    }
    return value;
}

/* Each lane rounded to bf16 (nearest even, as torch rounds a bf16 result; NaN stays a quiet NaN), kept as fp32. */
static inline f8 rounded8(f8 v) {
    u32x8 bits;
    memcpy(&bits, &v, sizeof bits);
    const u32x8 nan = (u32x8)((bits & 0x7fffffffu) > 0x7f800000u);
    const u32x8 even = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    bits = (nan & ((bits | 0x400000u) & 0xffff0000u)) | (~nan & even);
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* Eight lanes already rounded to bf16 (`rounded8`), stored as bf16. */
static inline void store8_bf16(uint16_t *target, f8 rounded) {
    u32x8 bits;
    memcpy(&bits, &rounded, sizeof bits);
    const u16x8 half = __builtin_convertvector(bits >> 16, u16x8);
    memcpy(target, &half, sizeof half);
}

static inline float lanes_sum(f8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* Four weight rows (at `base`) against two fp32 rows of x: eight independent accumulators keep both FMA
 * pipes busy. Called with a constant dtype, so each dtype gets its own loop with no test inside. */
static inline __attribute__((always_inline)) void dots(const void *weight, const int64_t base[4], const float *x0,
                                                       const float *x1, int64_t whole, int dtype, f8 sums[4][2]) {
    f8 a00 = {0}, a01 = {0}, a10 = {0}, a11 = {0}, a20 = {0}, a21 = {0}, a30 = {0}, a31 = {0};
    for (int64_t k = 0; k < whole; k += 8) {
        f8 v0, v1;
        memcpy(&v0, x0 + k, sizeof v0);
        memcpy(&v1, x1 + k, sizeof v1);
        const f8 w0 = load8(weight, base[0] + k, dtype), w1 = load8(weight, base[1] + k, dtype);
        const f8 w2 = load8(weight, base[2] + k, dtype), w3 = load8(weight, base[3] + k, dtype);
        a00 += w0 * v0; a01 += w0 * v1;
        a10 += w1 * v0; a11 += w1 * v1;
        a20 += w2 * v0; a21 += w2 * v1;
        a30 += w3 * v0; a31 += w3 * v1;
    }
    sums[0][0] = a00; sums[0][1] = a01; sums[1][0] = a10; sums[1][1] = a11;
    sums[2][0] = a20; sums[2][1] = a21; sums[3][0] = a30; sums[3][1] = a31;
}

#endif
