// Entry points of the CPU kernels, framework-free. The torch glue (csrc/ops.cpp) builds a launch,
// splits the work into chunks and runs chunk ranges on torch's thread pool.
#pragma once
#include <cstdint>

#include "onepass/dtypes.h"
#include "onepass/math.h"
#include "onepass/table.h"

namespace onepass::cpu {

// Every launch: `layout` the storage types (onepass/dtypes.h); `master` the flat fp32 master
// weights (indexed like the state) when layout.master, else null.
struct AdamLaunch {
  Layout layout;
  float* master = nullptr;
  const Segment* segments;
  const Chunk* chunks;
  void* exp_avg;         // flat state buffers, layout.state, indexed by Segment::state_offset
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // only read with amsgrad
  AdamHyper hyper;
  bool amsgrad;
  bool l2_decay;
  int64_t sr_seed = -1;  // >= 0: stochastic rounding of bf16 stores (StoreRounding)
};

struct SgdLaunch {
  Layout layout;
  float* master = nullptr;
  const Segment* segments;
  const Chunk* chunks;
  void* momentum_buffer;  // only with momentum != 0
  SgdHyper hyper;
  bool momentum;
  bool nesterov;
  bool l2_decay;
  int64_t sr_seed = -1;  // >= 0: stochastic rounding of bf16 stores (StoreRounding)
};

struct LionLaunch {
  Layout layout;
  float* master = nullptr;
  const Segment* segments;
  const Chunk* chunks;
  void* exp_avg;
  LionHyper hyper;
  bool l2_decay;
  int64_t sr_seed = -1;  // >= 0: stochastic rounding of bf16 stores (StoreRounding)
};

// Muon's momentum pass: the table's "param" of each segment is the tensor's slice of the update
// workspace (written, not read), its grad the gradient; momentum_buffer is the state slot.
struct MuonLaunch {
  Layout layout;  // param: the update workspace
  const Segment* segments;
  const Chunk* chunks;
  void* momentum_buffer;
  MuonHyper hyper;
  bool nesterov;
};

// NovoGrad runs two passes over the same table: novograd_reduce writes one partial sum of
// squares per chunk (summed per tensor in chunk order by the glue, so the result does not depend
// on the thread split), then novograd updates each chunk with its tensor's denominator.
struct NovoGradLaunch {
  Layout layout;
  float* master = nullptr;
  const Segment* segments;
  const Chunk* chunks;
  void* exp_avg;
  double* partial_sums;  // one per chunk: sum of g^2 in double (reduce pass output)
  const double* denoms;  // one per segment: sqrt(v) + eps (update pass input)
  NovoGradHyper hyper;
  int64_t sr_seed = -1;  // >= 0: stochastic rounding of bf16 stores (StoreRounding)
  // novograd_fused only: the per-tensor second moments (float, double for double params),
  // indexed by Segment::index, and whether amsgrad keeps their running max.
  void* exp_avg_sq = nullptr;
  void* max_exp_avg_sq = nullptr;
  bool amsgrad = false;
};

// FAdam runs three passes over the same table: fadam_reduce writes each chunk's sum of raw g^2;
// fadam_norms (F read only) each chunk's sums of gn^2 and wn^2 with the tensor's new den; fadam
// recomputes F and den, writes F, momentum and the param. Partial sums are combined per tensor in
// chunk order by the glue (deterministic whatever the thread split).
struct FAdamSegment {
  double eps_t;       // eps * min(1, RMS(g))
  double gn_divisor;  // max(1, RMS(gn) / clip), for the last pass
  double wn_divisor;  // max(1, RMS(wn) / clip)
};

struct FAdamLaunch {
  Layout layout;
  float* master = nullptr;
  const Segment* segments;
  const Chunk* chunks;
  void* fim;
  void* momentum;
  double* partial_sums;          // 2 per chunk: [sum g^2, unused] (reduce) / [gn^2, wn^2] (norms)
  FAdamSegment* scalars;         // one per segment (written by fadam_fused)
  FAdamHyper hyper;
  int64_t sr_seed = -1;  // >= 0: stochastic rounding of bf16 stores (StoreRounding)
};

// One instruction-set build of the kernels. Each processes chunks [begin, end) of its launch.
struct KernelSet {
  const char* name;
  void (*adam)(const AdamLaunch&, int64_t begin, int64_t end);
  void (*sgd)(const SgdLaunch&, int64_t begin, int64_t end);
  void (*lion)(const LionLaunch&, int64_t begin, int64_t end);
  void (*muon_momentum)(const MuonLaunch&, int64_t begin, int64_t end);
  void (*novograd_reduce)(const NovoGradLaunch&, int64_t begin, int64_t end);
  void (*novograd)(const NovoGradLaunch&, int64_t begin, int64_t end);
  // Both passes chunk by chunk, for launches where every tensor is one chunk: the tensor's
  // grad is still in cache when the update reads it again (many small tensors).
  void (*novograd_fused)(const NovoGradLaunch&, int64_t begin, int64_t end);
  void (*fadam_reduce)(const FAdamLaunch&, int64_t begin, int64_t end);
  void (*fadam_norms)(const FAdamLaunch&, int64_t begin, int64_t end);
  void (*fadam)(const FAdamLaunch&, int64_t begin, int64_t end);
  void (*fadam_fused)(const FAdamLaunch&, int64_t begin, int64_t end);  // every tensor one chunk
};

// Chosen once at first use: the widest set this CPU runs, or ONEPASS_CPU_CAPABILITY
// (scalar | avx2 | avx512); std::runtime_error where that names none the CPU supports.
const KernelSet& kernels();
// Names of the sets this CPU can run, narrowest first.
int64_t capability_count();
const char* capability_name(int64_t i);
// Switches the active set; returns false (and changes nothing) if this CPU cannot run it.
bool set_capability(const char* name);

namespace scalar {
extern const KernelSet kKernels;
}
namespace avx2 {
extern const KernelSet kKernels;
}
namespace avx512 {
extern const KernelSet kKernels;
}

}  // namespace onepass::cpu
