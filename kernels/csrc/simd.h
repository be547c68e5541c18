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

/* `v` pinned to a register from here on. GCC otherwise folds a loaded vector into every FMA that uses it as a
 * memory operand, loading it again each time: the LoRA shrink's four A rows against four tokens issued 32 loads
 * for 16 FMAs instead of 8 (docs/serving.md, "Thirteenth round"). An empty asm changes no value: the same bits. */
#define IN_REGISTER(v) __asm__("" : "+v"(v))

/* The lane sums of four vectors: fold halves against each other so four sums share each add. */
static inline __attribute__((always_inline)) void sums4(vf a, vf b, vf c, vf d, float out[4]) {
#if LANES == 16
    const vf ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                  __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const vf cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                  __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    /* ab: a's 8 partials, then b's; cd likewise. Next: 4 partials each, as a, c, b, d. */
    const vf q = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
                 __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    const vf h = q + __builtin_shufflevector(q, q, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    const vf s = h + __builtin_shufflevector(h, h, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    out[0] = s[0];
    out[1] = s[8];
    out[2] = s[4];
    out[3] = s[12];
#else
    const vf ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
                  __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
    const vf cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 8, 9, 10, 11) +
                  __builtin_shufflevector(c, d, 4, 5, 6, 7, 12, 13, 14, 15);
    /* ab: a's 4 partials, then b's. */
    const vf q = __builtin_shufflevector(ab, cd, 0, 1, 8, 9, 4, 5, 12, 13) +
                 __builtin_shufflevector(ab, cd, 2, 3, 10, 11, 6, 7, 14, 15);
    /* q: a, c, b, d, two partials each. */
    const vf s = q + __builtin_shufflevector(q, q, 1, 0, 3, 2, 5, 4, 7, 6);
    out[0] = s[0];
    out[1] = s[4];
    out[2] = s[2];
    out[3] = s[6];
#endif
}

#endif
