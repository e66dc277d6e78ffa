// AVX2 + FMA + F16C vectors: 8 floats or 4 doubles, with loads and stores for every storage type.
// Compiled only under `#pragma GCC target("avx2,fma,f16c")` (kernels_avx2.cpp).
#pragma once
#include <immintrin.h>

#include "onepass/dtypes.h"

namespace onepass {
inline namespace ONEPASS_CAPABILITY {

struct Vec8f {
  __m256 v;
  Vec8f() = default;
  ONEPASS_INLINE Vec8f(__m256 x) : v(x) {}
  ONEPASS_INLINE Vec8f(float x) : v(_mm256_set1_ps(x)) {}
};
ONEPASS_INLINE Vec8f operator+(Vec8f a, Vec8f b) { return _mm256_add_ps(a.v, b.v); }
ONEPASS_INLINE Vec8f operator-(Vec8f a, Vec8f b) { return _mm256_sub_ps(a.v, b.v); }
ONEPASS_INLINE Vec8f operator*(Vec8f a, Vec8f b) { return _mm256_mul_ps(a.v, b.v); }
ONEPASS_INLINE Vec8f operator/(Vec8f a, Vec8f b) { return _mm256_div_ps(a.v, b.v); }
ONEPASS_INLINE Vec8f operator-(Vec8f a) { return _mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f)); }
ONEPASS_INLINE Vec8f op_sqrt(Vec8f a) { return _mm256_sqrt_ps(a.v); }
ONEPASS_INLINE Vec8f op_max(Vec8f a, Vec8f b) {
  // max_ps returns its second operand when either is NaN; pass `a` second so a NaN in a survives,
  // and blend in a NaN from b: NaN-propagating like torch.maximum.
  const __m256 m = _mm256_max_ps(b.v, a.v);
  return _mm256_blendv_ps(m, b.v, _mm256_cmp_ps(b.v, b.v, _CMP_UNORD_Q));
}

// (x > 0) - (x < 0): 1.0 and -1.0 from the compare masks, so +-0 and NaN give 0 (math.h).
ONEPASS_INLINE Vec8f op_sign(Vec8f a) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  const __m256 pos = _mm256_and_ps(_mm256_cmp_ps(a.v, zero, _CMP_GT_OQ), one);
  const __m256 neg = _mm256_and_ps(_mm256_cmp_ps(a.v, zero, _CMP_LT_OQ), one);
  return _mm256_sub_ps(pos, neg);
}

struct Vec4d {
  __m256d v;
  Vec4d() = default;
  ONEPASS_INLINE Vec4d(__m256d x) : v(x) {}
  ONEPASS_INLINE Vec4d(double x) : v(_mm256_set1_pd(x)) {}
};
ONEPASS_INLINE Vec4d operator+(Vec4d a, Vec4d b) { return _mm256_add_pd(a.v, b.v); }
ONEPASS_INLINE Vec4d operator-(Vec4d a, Vec4d b) { return _mm256_sub_pd(a.v, b.v); }
ONEPASS_INLINE Vec4d operator*(Vec4d a, Vec4d b) { return _mm256_mul_pd(a.v, b.v); }
ONEPASS_INLINE Vec4d operator/(Vec4d a, Vec4d b) { return _mm256_div_pd(a.v, b.v); }
ONEPASS_INLINE Vec4d operator-(Vec4d a) { return _mm256_xor_pd(a.v, _mm256_set1_pd(-0.0)); }
ONEPASS_INLINE Vec4d op_sqrt(Vec4d a) { return _mm256_sqrt_pd(a.v); }
ONEPASS_INLINE Vec4d op_max(Vec4d a, Vec4d b) {
  const __m256d m = _mm256_max_pd(b.v, a.v);
  return _mm256_blendv_pd(m, b.v, _mm256_cmp_pd(b.v, b.v, _CMP_UNORD_Q));
}

ONEPASS_INLINE Vec4d op_sign(Vec4d a) {
  const __m256d zero = _mm256_setzero_pd(), one = _mm256_set1_pd(1.0);
  const __m256d pos = _mm256_and_pd(_mm256_cmp_pd(a.v, zero, _CMP_GT_OQ), one);
  const __m256d neg = _mm256_and_pd(_mm256_cmp_pd(a.v, zero, _CMP_LT_OQ), one);
  return _mm256_sub_pd(pos, neg);
}

template <class S>
struct VecFor;

template <>
struct VecFor<float> {
  using type = Vec8f;
  static constexpr int kWidth = 8;
  static ONEPASS_INLINE type load(const float* p) { return _mm256_loadu_ps(p); }
  static ONEPASS_INLINE void store(float* p, type x) { _mm256_storeu_ps(p, x.v); }
};

template <>
struct VecFor<double> {
  using type = Vec4d;
  static constexpr int kWidth = 4;
  static ONEPASS_INLINE type load(const double* p) { return _mm256_loadu_pd(p); }
  static ONEPASS_INLINE void store(double* p, type x) { _mm256_storeu_pd(p, x.v); }
};

template <>
struct VecFor<bf16_t> {
  using type = Vec8f;
  static constexpr int kWidth = 8;
  static ONEPASS_INLINE type load(const bf16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static ONEPASS_INLINE void store(bf16_t* p, type x) {
    // Round to nearest even on the integer pattern, NaN to the canonical quiet NaN (as dtypes.h).
    const __m256i bits = _mm256_castps_si256(x.v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256 nan = _mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
    const __m128i packed =
        _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
};

template <>
struct VecFor<half_t> {
  using type = Vec8f;
  static constexpr int kWidth = 8;
  static ONEPASS_INLINE type load(const half_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static ONEPASS_INLINE void store(half_t* p, type x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT));
  }
};

}  // namespace ONEPASS_CAPABILITY
}  // namespace onepass
