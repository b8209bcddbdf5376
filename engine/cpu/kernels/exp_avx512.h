/* exp(y) for 16 floats with AVX-512F, shared by the C files beside this header (vlbot kernels).
 *
 * 2^n exp(r), n = round(y / ln 2), |r| <= ln 2 / 2, with a degree-7 Taylor polynomial (error
 * below float rounding) and 2^n applied by VSCALEFPS. y is clamped to [-100, 88] so that the
 * result stays a float: below -100 it is 0 to float precision in every use here, and exp(88) is
 * ~1.6e38.
 */
#ifndef VLBOT_EXP_AVX512_H
#define VLBOT_EXP_AVX512_H

#include <immintrin.h>

static inline __m512 exp_avx512(__m512 y) {
    y = _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-100.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), y); /* ln 2, high part */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);     /* ln 2, low part */
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

#endif
