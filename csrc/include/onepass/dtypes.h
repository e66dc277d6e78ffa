// Storage types and their conversions to the math ("opmath") type. Framework-free.
//
// fp16 and bf16 are stored as raw 16-bit patterns; math always runs in float for them and in
// double for double (DESIGN.md, numerics). Conversions round to nearest even, like torch.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "onepass/macros.h"

#if defined(__CUDACC__)
// On the device the conversions are single hardware instructions (cvt.rn, IEEE round to nearest
// even, subnormals kept): the same values as the portable code below, for a fraction of the
// instructions (a bf16 step does 4x the conversions per byte of an fp32 one). NaN payloads may
// differ (a NaN is a NaN).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace onepass {

// Plain data (no code) lives outside the capability namespace so every translation unit agrees on it.
struct bf16_t {
  uint16_t bits;
};
struct half_t {
  uint16_t bits;
};

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// The storage types of one launch. `param` is the model's param, `grad` its gradient, `state`
// every elementwise state slot. With `master` (master weights), an fp32 copy of each param rides
// beside the state: the math reads and writes the master, and the param gets the result rounded
// to its own dtype. Math runs in float (double for double) whatever the storage.
struct Layout {
  DType param = DType::kFloat32;
  DType grad = DType::kFloat32;
  DType state = DType::kFloat32;
  bool master = false;
};

// How a kernel rounds what it stores: with seed >= 0 (stochastic_rounding=True), bf16 params
// (without master weights: a master's param is the master rounded to nearest) and bf16 state
// slots round stochastically; everything else to nearest. Element i of a chunk has the index
// index_base + i in its bucket (the tensor's state offset + its element index).
struct StoreRounding {
  int64_t index_base = 0;
  int64_t seed = -1;
};

template <class S>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};
template <class S>
using opmath_t = typename OpMath<S>::type;

template <class S>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() { return DType::kFloat32; }
template <>
constexpr DType dtype_of<double>() { return DType::kFloat64; }
template <>
constexpr DType dtype_of<bf16_t>() { return DType::kBFloat16; }
template <>
constexpr DType dtype_of<half_t>() { return DType::kFloat16; }

// A layout as types: the kernels are templates over it.
template <class P_, class G_, class S_, bool kMaster_>
struct LayoutTypes {
  using P = P_;  // the param's storage
  using G = G_;  // the gradient's
  using S = S_;  // every state slot's
  static constexpr bool kMaster = kMaster_;
  using MathParam = std::conditional_t<kMaster_, float, P_>;  // what the math reads and writes
  using O = opmath_t<P_>;
};

// Every layout the kernels are built for (param, grad, state, master): one dtype throughout
// (torch.optim's case), fp32 or bf16 state for narrower or wider params (state_dtype), fp32
// grads for 16-bit params, and fp32 master weights for 16-bit params. float64 only alone.
// fp32 "params" with 16-bit grads: Muon's fp32 update workspace under master weights.
#define ONEPASS_FOR_EACH_LAYOUT(X)   \
  X(double, double, double, false)   \
  X(float, float, float, false)      \
  X(float, float, bf16_t, false)     \
  X(float, bf16_t, float, false)     \
  X(float, bf16_t, bf16_t, false)    \
  X(float, half_t, float, false)     \
  X(bf16_t, bf16_t, bf16_t, false)   \
  X(bf16_t, bf16_t, float, false)    \
  X(bf16_t, float, bf16_t, false)    \
  X(bf16_t, float, float, false)     \
  X(bf16_t, bf16_t, float, true)     \
  X(bf16_t, bf16_t, bf16_t, true)    \
  X(bf16_t, float, float, true)      \
  X(bf16_t, float, bf16_t, true)     \
  X(half_t, half_t, half_t, false)   \
  X(half_t, half_t, float, false)    \
  X(half_t, float, half_t, false)    \
  X(half_t, float, float, false)     \
  X(half_t, half_t, float, true)     \
  X(half_t, float, float, true)

inline bool operator==(const Layout& a, const Layout& b) {
  return a.param == b.param && a.grad == b.grad && a.state == b.state && a.master == b.master;
}

// Calls fn.template operator()<LayoutTypes<...>>() for `layout`; returns false (and calls
// nothing) when the kernels are not built for it.
template <class Fn>
inline bool dispatch_layout(const Layout& layout, const Fn& fn) {
#define ONEPASS_LAYOUT_CASE(P, G, S, M)                                                 \
  if (layout == Layout{dtype_of<P>(), dtype_of<G>(), dtype_of<S>(), M}) {              \
    fn.template operator()<LayoutTypes<P, G, S, M>>();                                  \
    return true;                                                                        \
  }
  ONEPASS_FOR_EACH_LAYOUT(ONEPASS_LAYOUT_CASE)
#undef ONEPASS_LAYOUT_CASE
  return false;
}

inline bool layout_supported(const Layout& layout) {
  return dispatch_layout(layout, [&]<class T>() {});
}

inline namespace ONEPASS_CAPABILITY {

ONEPASS_HD ONEPASS_INLINE uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}
ONEPASS_HD ONEPASS_INLINE float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

ONEPASS_HD ONEPASS_INLINE float to_opmath(bf16_t x) { return bits_float(uint32_t(x.bits) << 16); }

ONEPASS_HD ONEPASS_INLINE bf16_t from_opmath_bf16(float f) {
#ifdef __CUDA_ARCH__
  return bf16_t{__bfloat16_as_ushort(__float2bfloat16_rn(f))};
#else
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{0x7fc0};  // NaN stays a quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                             // round to nearest even
  return bf16_t{uint16_t(u >> 16)};
#endif
}

ONEPASS_HD ONEPASS_INLINE float to_opmath(half_t x) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(x.bits));
#else
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1fu;
  uint32_t mant = x.bits & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_float(sign);
  // subnormal half: renormalise
  int e = -1;
  do {
    ++e;
    mant <<= 1;
  } while ((mant & 0x400u) == 0);
  return bits_float(sign | uint32_t(112 - e) << 23 | ((mant & 0x3ffu) << 13));
#endif
}

ONEPASS_HD ONEPASS_INLINE half_t from_opmath_half(float f) {
#ifdef __CUDA_ARCH__
  return half_t{__half_as_ushort(__float2half_rn(f))};
#else
  const uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return half_t{uint16_t(sign | 0x7e00u)};  // NaN
  if (a >= 0x477ff000u) return half_t{uint16_t(sign | 0x7c00u)};  // rounds to inf
  if (a < 0x38800000u) {                                           // half subnormal or zero
    // Adding 0.5 (2^-1) aligns the mantissa so the float adder rounds to nearest even for us.
    const float r = bits_float(a) + 0.5f;
    return half_t{uint16_t(sign | uint16_t(float_bits(r) - 0x3f000000u))};
  }
  uint32_t v = a + 0xc8000fffu + ((a >> 13) & 1u);  // rebias exponent, round to nearest even
  return half_t{uint16_t(sign | uint16_t(v >> 13))};
#endif
}

ONEPASS_HD ONEPASS_INLINE float to_opmath(float x) { return x; }
ONEPASS_HD ONEPASS_INLINE double to_opmath(double x) { return x; }

template <class S>
ONEPASS_HD ONEPASS_INLINE S from_opmath(opmath_t<S> x);
template <>
ONEPASS_HD ONEPASS_INLINE float from_opmath<float>(float x) {
  return x;
}
template <>
ONEPASS_HD ONEPASS_INLINE double from_opmath<double>(double x) {
  return x;
}
template <>
ONEPASS_HD ONEPASS_INLINE bf16_t from_opmath<bf16_t>(float x) {
  return from_opmath_bf16(x);
}
template <>
ONEPASS_HD ONEPASS_INLINE half_t from_opmath<half_t>(float x) {
  return from_opmath_half(x);
}

// Stochastic rounding to bf16: 16 random bits from a counter-based hash of (seed, element index)
// are added below the bf16 mantissa, then the low half is dropped, so the value rounds up with
// probability equal to the discarded fraction (unbiased). The same hash on every backend
// (python/onepass/algorithms/base.py is its reference); inf and NaN round to nearest.
ONEPASS_HD ONEPASS_INLINE uint32_t sr_hash(uint64_t index, uint32_t seed) {
  uint32_t x = uint32_t(index) * 0x9E3779B1u;
  x ^= uint32_t(index >> 32) * 0x85EBCA77u;
  x ^= seed * 0xC2B2AE3Du;
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

ONEPASS_HD ONEPASS_INLINE bf16_t from_opmath_bf16_stochastic(float f, uint64_t index,
                                                              uint32_t seed) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7f800000u) == 0x7f800000u) return from_opmath_bf16(f);  // inf, NaN
  return bf16_t{uint16_t((u + (sr_hash(index, seed) & 0xffffu)) >> 16)};
}

// Seeds of the streams of one step are r.seed + stream * kSrStreamStride (mod 2^32): stream 0
// the param, 1 + k state slot k. The stride is odd and far from small multiples of 2^32, so a
// stream's seed never meets another stream's in a later step (the seed advances by 1 a step).
constexpr uint32_t kSrStreamStride = 0x9E3779B9u;

// A rounded store: stochastic for bf16 when r.seed >= 0, else to nearest (every other case).
template <class S>
ONEPASS_HD ONEPASS_INLINE S rounded_from_opmath(opmath_t<S> x, const StoreRounding& r,
                                                uint32_t stream, int64_t i) {
  if constexpr (std::is_same_v<S, bf16_t>) {
    if (r.seed >= 0) {
      const uint32_t seed = uint32_t(r.seed) + stream * kSrStreamStride;
      return from_opmath_bf16_stochastic(x, uint64_t(r.index_base + i), seed);
    }
  }
  return from_opmath<S>(x);
}

// The param store (stream 0).
template <class S>
ONEPASS_HD ONEPASS_INLINE S param_from_opmath(opmath_t<S> x, const StoreRounding& r, int64_t i) {
  return rounded_from_opmath<S>(x, r, 0u, i);
}

}  // namespace ONEPASS_CAPABILITY
}  // namespace onepass
