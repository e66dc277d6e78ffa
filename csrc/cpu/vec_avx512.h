// AVX-512F vectors: 16 floats or 8 doubles, with loads and stores for every storage type.
// Compiled only under `#pragma GCC target("avx512f,avx2,fma,f16c")` (kernels_avx512.cpp).
#pragma once
#include <immintrin.h>

#include "onepass/dtypes.h"

namespace onepass {
inline namespace ONEPASS_CAPABILITY {

struct Vec16f {
  __m512 v;
  Vec16f() = default;
  ONEPASS_INLINE Vec16f(__m512 x) : v(x) {}
  ONEPASS_INLINE Vec16f(float x) : v(_mm512_set1_ps(x)) {}
};
ONEPASS_INLINE Vec16f operator+(Vec16f a, Vec16f b) { return _mm512_add_ps(a.v, b.v); }
ONEPASS_INLINE Vec16f operator-(Vec16f a, Vec16f b) { return _mm512_sub_ps(a.v, b.v); }
ONEPASS_INLINE Vec16f operator*(Vec16f a, Vec16f b) { return _mm512_mul_ps(a.v, b.v); }
ONEPASS_INLINE Vec16f operator/(Vec16f a, Vec16f b) { return _mm512_div_ps(a.v, b.v); }
ONEPASS_INLINE Vec16f operator-(Vec16f a) { return _mm512_sub_ps(_mm512_setzero_ps(), a.v); }
ONEPASS_INLINE Vec16f op_sqrt(Vec16f a) { return _mm512_sqrt_ps(a.v); }
ONEPASS_INLINE Vec16f op_max(Vec16f a, Vec16f b) {
  const __m512 m = _mm512_max_ps(b.v, a.v);  // a NaN in `a` survives (second operand)
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(b.v, b.v, _CMP_UNORD_Q), m, b.v);
}

// (x > 0) - (x < 0) from the compare masks: +-0 and NaN give 0 (math.h). AVX-512F has no
// float and/or, so the masks select 1.0 into zero with mask moves.
ONEPASS_INLINE Vec16f op_sign(Vec16f a) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  const __m512 pos = _mm512_mask_mov_ps(zero, _mm512_cmp_ps_mask(a.v, zero, _CMP_GT_OQ), one);
  const __m512 neg = _mm512_mask_mov_ps(zero, _mm512_cmp_ps_mask(a.v, zero, _CMP_LT_OQ), one);
  return _mm512_sub_ps(pos, neg);
}

struct Vec8d {
  __m512d v;
  Vec8d() = default;
  ONEPASS_INLINE Vec8d(__m512d x) : v(x) {}
  ONEPASS_INLINE Vec8d(double x) : v(_mm512_set1_pd(x)) {}
};
ONEPASS_INLINE Vec8d operator+(Vec8d a, Vec8d b) { return _mm512_add_pd(a.v, b.v); }
ONEPASS_INLINE Vec8d operator-(Vec8d a, Vec8d b) { return _mm512_sub_pd(a.v, b.v); }
ONEPASS_INLINE Vec8d operator*(Vec8d a, Vec8d b) { return _mm512_mul_pd(a.v, b.v); }
ONEPASS_INLINE Vec8d operator/(Vec8d a, Vec8d b) { return _mm512_div_pd(a.v, b.v); }
ONEPASS_INLINE Vec8d operator-(Vec8d a) { return _mm512_sub_pd(_mm512_setzero_pd(), a.v); }
ONEPASS_INLINE Vec8d op_sqrt(Vec8d a) { return _mm512_sqrt_pd(a.v); }
ONEPASS_INLINE Vec8d op_max(Vec8d a, Vec8d b) {
  const __m512d m = _mm512_max_pd(b.v, a.v);
  return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(b.v, b.v, _CMP_UNORD_Q), m, b.v);
}

ONEPASS_INLINE Vec8d op_sign(Vec8d a) {
  const __m512d zero = _mm512_setzero_pd(), one = _mm512_set1_pd(1.0);
  const __m512d pos = _mm512_mask_mov_pd(zero, _mm512_cmp_pd_mask(a.v, zero, _CMP_GT_OQ), one);
  const __m512d neg = _mm512_mask_mov_pd(zero, _mm512_cmp_pd_mask(a.v, zero, _CMP_LT_OQ), one);
  return _mm512_sub_pd(pos, neg);
}

template <class S>
struct VecFor;

template <>
struct VecFor<float> {
  using type = Vec16f;
  static constexpr int kWidth = 16;
  static ONEPASS_INLINE type load(const float* p) { return _mm512_loadu_ps(p); }
  static ONEPASS_INLINE void store(float* p, type x) { _mm512_storeu_ps(p, x.v); }
};

template <>
struct VecFor<double> {
  using type = Vec8d;
  static constexpr int kWidth = 8;
  static ONEPASS_INLINE type load(const double* p) { return _mm512_loadu_pd(p); }
  static ONEPASS_INLINE void store(double* p, type x) { _mm512_storeu_pd(p, x.v); }
};

template <>
struct VecFor<bf16_t> {
  using type = Vec16f;
  static constexpr int kWidth = 16;
  static ONEPASS_INLINE type load(const bf16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static ONEPASS_INLINE void store(bf16_t* p, type x) {
    const __m512i bits = _mm512_castps_si512(x.v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x.v, x.v, _CMP_UNORD_Q), r,
                                _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
};

template <>
struct VecFor<half_t> {
  using type = Vec16f;
  static constexpr int kWidth = 16;
  static ONEPASS_INLINE type load(const half_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static ONEPASS_INLINE void store(half_t* p, type x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT));
  }
};

}  // namespace ONEPASS_CAPABILITY
}  // namespace onepass
