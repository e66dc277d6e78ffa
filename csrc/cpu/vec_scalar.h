// The "vector" of the portable build: one opmath scalar. Used where no SIMD build runs.
#pragma once
#include "onepass/dtypes.h"

namespace onepass {
inline namespace ONEPASS_CAPABILITY {

template <class S>
struct VecFor {
  using type = opmath_t<S>;
  static constexpr int kWidth = 1;
  static ONEPASS_INLINE type load(const S* p) { return to_opmath(*p); }
  static ONEPASS_INLINE void store(S* p, type v) { *p = from_opmath<S>(v); }
};

}  // namespace ONEPASS_CAPABILITY
}  // namespace onepass
