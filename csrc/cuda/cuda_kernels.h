// Entry points of the CUDA kernels, framework-free: plain pointers, sizes and a stream. The torch
// glue (ops_cuda.cpp) checks arguments, builds the tensor table and uploads it to the device.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "onepass/device_hyper.h"
#include "onepass/dtypes.h"
#include "onepass/math.h"
#include "onepass/table.h"

namespace onepass::cuda {

// The launch shape. Macros so that bench/cuda_sweep.cu can time other values without editing
// this file; the defaults are the ones it measured fastest (bench/GPU_RESULTS.md).
#ifndef ONEPASS_CUDA_CHUNK_LOG2
#define ONEPASS_CUDA_CHUNK_LOG2 14
#endif
#ifndef ONEPASS_CUDA_THREADS
#define ONEPASS_CUDA_THREADS 512
#endif

// Elements per thread block: big enough to amortise the block's set-up, small enough that a
// bucket of one large tensor still fills every SM several times over.
constexpr int64_t kChunkElements = int64_t(1) << ONEPASS_CUDA_CHUNK_LOG2;
constexpr int kThreads = ONEPASS_CUDA_THREADS;

// The device-resident tensor table of one launch (see onepass/table.h).
struct DeviceTable {
  const Segment* segments;
  const Chunk* chunks;
  const int64_t* stepped;  // bucket index of every tensor with a grad this step
  int64_t num_chunks;
  int64_t num_stepped;
};

// Per-tensor step counts, the AMP scalars and (capturable) the lr or the group's whole block of
// hyperparameters live on the device: a step makes no host sync, and a step captured in a CUDA
// graph reads the values current at each replay.
struct StepState {
  float* step;              // one per tensor of the bucket; bias corrections read step + 1
  const float* grad_scale;  // nullable: g /= *grad_scale
  const float* found_inf;   // nullable: nonzero means write nothing, advance nothing
  const void* lr;           // nullable: the lr on the device (else the hyper's host value)
  bool lr_is_double;        // the device lr is a double (else a float)
  bool lr_block = false;    // lr points at a float64 block (onepass/device_hyper.h)
};

// Every launch: `layout` the storage types (onepass/dtypes.h); `master` the flat fp32 master
// weights (indexed like the state) when layout.master, else null.
struct AdamLaunch {
  Layout layout;
  float* master = nullptr;
  DeviceTable table;
  StepState steps;
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
  DeviceTable table;
  StepState steps;
  void* momentum_buffer;
  SgdHyper hyper;
  bool momentum;
  bool nesterov;
  bool l2_decay;
  int64_t sr_seed = -1;  // >= 0: stochastic rounding of bf16 stores (StoreRounding)
};

struct LionLaunch {
  Layout layout;
  float* master = nullptr;
  DeviceTable table;
  StepState steps;
  void* exp_avg;
  LionHyper hyper;
  bool l2_decay;
  int64_t sr_seed = -1;  // >= 0: stochastic rounding of bf16 stores (StoreRounding)
};

// Muon's momentum pass: each segment's "param" is its slice of the update workspace (written).
struct MuonLaunch {
  Layout layout;  // param: the update workspace; never master weights
  DeviceTable table;
  StepState steps;
  void* momentum_buffer;
  MuonHyper hyper;
  bool nesterov;
};

// NovoGrad: three kernels on one stream, no host sync. (1) one block per chunk writes the chunk's
// sum of g^2 (double) to partial_sums; (2) one thread per tensor with a grad sums its chunks in
// order (deterministic), updates its scalar second moment and writes its denominator to
// denoms; (3) one block per chunk updates the elements with its tensor's denominator.
struct NovoGradLaunch {
  Layout layout;
  float* master = nullptr;
  DeviceTable table;
  StepState steps;
  void* exp_avg;
  void* exp_avg_sq;      // one per tensor: float (double for float64 params)
  void* max_exp_avg_sq;  // only with amsgrad
  double* partial_sums;  // device scratch: one per chunk
  double* denoms;        // device scratch: one per segment
  int64_t num_segments;
  NovoGradHyper hyper;
  bool amsgrad;
  int64_t sr_seed = -1;  // >= 0: stochastic rounding of bf16 stores (StoreRounding)
};

// FAdam: five kernels on one stream, no host sync. (1) one block per chunk writes the chunk's sum
// of g^2; (2) one thread per segment sums its chunks in order and writes eps_t; (3) one block per
// chunk writes its sums of gn^2 and wn^2 (F read, not written); (4) one thread per segment writes
// the two clip divisors; (5) one block per chunk updates F, momentum and the param.
struct FAdamLaunch {
  Layout layout;
  float* master = nullptr;
  DeviceTable table;
  StepState steps;
  void* fim;
  void* momentum;
  double* partial_sums;  // device scratch: two per chunk
  double* eps_t;         // device scratch: one per segment
  double* gn_divisor;    // one per segment
  double* wn_divisor;    // one per segment
  int64_t num_segments;
  FAdamHyper hyper;
  int64_t sr_seed = -1;  // >= 0: stochastic rounding of bf16 stores (StoreRounding)
};

cudaError_t launch_adam(const AdamLaunch& launch, cudaStream_t stream);
cudaError_t launch_sgd(const SgdLaunch& launch, cudaStream_t stream);
cudaError_t launch_lion(const LionLaunch& launch, cudaStream_t stream);
cudaError_t launch_muon_momentum(const MuonLaunch& launch, cudaStream_t stream);
cudaError_t launch_novograd(const NovoGradLaunch& launch, cudaStream_t stream);
cudaError_t launch_fadam(const FAdamLaunch& launch, cudaStream_t stream);

}  // namespace onepass::cuda
