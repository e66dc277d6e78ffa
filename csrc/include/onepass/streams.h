// The streams of one chunk of a launch: what the memory movement of every backend walks.
// Framework-free; shared by the CPU kernels (csrc/cpu/kernel_body.h) and the CUDA ones
// (csrc/cuda/multi_tensor.cuh).
#pragma once
#include <cstdint>

#include "onepass/dtypes.h"
#include "onepass/table.h"

namespace onepass {
inline namespace ONEPASS_CAPABILITY {

// Each stream at the chunk's first element, in the layout's storage types (T is a LayoutTypes):
// the param (and its fp32 master with master weights), the gradient and the state slots.
template <class T, int kSlots>
struct Streams {
  typename T::P* param;
  float* master;  // null unless T::kMaster
  const typename T::G* grad;
  typename T::S* state[kSlots > 0 ? kSlots : 1];
};

// `master` is the launch's flat master buffer (ignored unless T::kMaster); slots[k] the flat
// buffer of state slot k. The master and the state are indexed by the segment's state offset.
template <class T, int kSlots>
ONEPASS_HD ONEPASS_INLINE Streams<T, kSlots> chunk_streams(const Segment& seg, const Chunk& chunk,
                                                           float* master, void* const* slots) {
  const int64_t at = seg.state_offset + chunk.begin;
  Streams<T, kSlots> io{static_cast<typename T::P*>(seg.param) + chunk.begin,
                        T::kMaster ? master + at : nullptr,
                        static_cast<const typename T::G*>(seg.grad) + chunk.begin,
                        {}};
  for (int k = 0; k < kSlots; ++k) io.state[k] = static_cast<typename T::S*>(slots[k]) + at;
  return io;
}

}  // namespace ONEPASS_CAPABILITY
}  // namespace onepass
