/* Element access for the CPU kernels: fp32 (dtype 0) or bf16 (dtype 1, stored as uint16), fp32 arithmetic.
 * bf16 results round to nearest even, as torch rounds; NaN stays NaN (a quiet one). */
#ifndef LONGTAIL_BF16_H
#define LONGTAIL_BF16_H

#include <stdint.h>
#include <string.h>

static inline float load(const void *base, int64_t index, int dtype) {
    if (dtype == 0) return ((const float *)base)[index];
    uint32_t bits = (uint32_t)((const uint16_t *)base)[index] << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline uint16_t to_bf16_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* `value` as the model dtype holds it: unchanged in fp32, rounded to bf16 otherwise. */
static inline float round_to(float value, int dtype) {
    if (dtype == 0) return value;
    uint32_t bits = (uint32_t)to_bf16_bits(value) << 16;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline void store(void *base, int64_t index, float value, int dtype) {
    if (dtype == 0)
        ((float *)base)[index] = value;
    else
        ((uint16_t *)base)[index] = to_bf16_bits(value);
}

#endif
