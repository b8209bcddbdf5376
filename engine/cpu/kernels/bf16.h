/* bfloat16 <-> float conversions shared by the C files beside this header (vlbot kernels).
 *
 * Rounding is to nearest, ties to even, as torch's `.to(torch.bfloat16)` (values are finite).
 * The *_value helpers read and write element `at` of a float32 (`bf16` = 0) or bfloat16 (1)
 * array.
 */
#ifndef VLBOT_BF16_H
#define VLBOT_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t value) {
    uint32_t bits = (uint32_t)value << 16;
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

static inline uint16_t float_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* `value` rounded to bfloat16 precision when `bf16`, else unchanged. */
static inline float round_to(float value, int bf16) {
    return bf16 ? bf16_to_float(float_to_bf16(value)) : value;
}

static inline float load_value(const void *base, int64_t at, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)base)[at]) : ((const float *)base)[at];
}

static inline void store_value(void *base, int64_t at, float value, int bf16) {
    if (bf16) {
        ((uint16_t *)base)[at] = float_to_bf16(value);
    } else {
        ((float *)base)[at] = value;
    }
}

#endif
