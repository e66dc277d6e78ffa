// The multi-tensor table: what a kernel launch knows about the tensors of one bucket.
// Framework-free; the torch glue fills it from tensor lists.
#pragma once
#include <cstdint>

#include "onepass/macros.h"

namespace onepass {

// One tensor of a bucket that has a gradient this step. All sizes and offsets are 64-bit.
struct Segment {
  void* param;           // contiguous param storage (the glue makes a temporary if it is not)
  const void* grad;      // contiguous gradient, same dtype as the param
  int64_t state_offset;  // element offset of this tensor in every flat state buffer
  int64_t numel;
  int64_t index;         // position of the tensor in the bucket (indexes per-tensor state: step)
  double step;           // this tensor's step count after this step (t >= 1)
};

// A contiguous range of one segment's elements: the unit of parallel work.
struct Chunk {
  int64_t segment;
  int64_t begin;
  int64_t end;
};

}  // namespace onepass
