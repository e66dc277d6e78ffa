// Memory movement of the CUDA kernels: one thread block per chunk of the tensor table; 16-byte
// vector loads and stores when every pointer of the chunk is aligned, a scalar path when not;
// kIlp vectors in flight per thread; 64-bit indexing throughout. The math comes from
// onepass/math.h through a functor, exactly as on the CPU.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "cuda_kernels.h"

namespace onepass::cuda {

#ifndef ONEPASS_CUDA_ILP
#define ONEPASS_CUDA_ILP 2
#endif
// Streaming cache hints (ld/st .cs, evict first) on the vector path: every byte is touched once.
#ifndef ONEPASS_CUDA_STREAMING
#define ONEPASS_CUDA_STREAMING 0
#endif

constexpr int kIlp = ONEPASS_CUDA_ILP;  // vectors per thread per iteration, all loaded first

template <class S>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(S);
  S v[kSize];
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

template <class S>
__device__ __forceinline__ Pack<S> load_pack(const S* base, int64_t i) {
#if ONEPASS_CUDA_STREAMING
  const int4 raw = __ldcs(reinterpret_cast<const int4*>(base) + i);
  Pack<S> out;
  memcpy(&out, &raw, sizeof(out));
  return out;
#else
  return reinterpret_cast<const Pack<S>*>(base)[i];
#endif
}

template <class S>
__device__ __forceinline__ void store_pack(S* base, int64_t i, const Pack<S>& value) {
#if ONEPASS_CUDA_STREAMING
  int4 raw;
  memcpy(&raw, &value, sizeof(raw));
  __stcs(reinterpret_cast<int4*>(base) + i, raw);
#else
  reinterpret_cast<Pack<S>*>(base)[i] = value;
#endif
}

// Applies fn(p, g, s) to every element of one chunk: p the param, g the gradient, s[k] the k-th
// state slot, in opmath registers. kParamWriteOnly: the "param" is an output only (Muon's update
// workspace): not loaded, fn sees 0.
template <class S, int kSlots, bool kParamWriteOnly = false, class Fn>
__device__ __forceinline__ void for_each_element(S* __restrict__ param,
                                                 const S* __restrict__ grad, S* const* state,
                                                 int64_t n, const Fn& fn,
                                                 const ParamRounding& rounding = {}) {
  using O = opmath_t<S>;
  constexpr int kSlotsArr = kSlots > 0 ? kSlots : 1;
  constexpr int V = Pack<S>::kSize;
  bool vector = aligned16(param) && aligned16(grad);
#pragma unroll
  for (int k = 0; k < kSlots; ++k) vector = vector && aligned16(state[k]);
  int64_t done = 0;
  if (vector) {
    const int64_t packs = n / V;
    const int64_t stride = int64_t(blockDim.x) * kIlp;
    for (int64_t base = threadIdx.x; base < packs; base += stride) {
      Pack<S> p[kIlp], g[kIlp], s[kIlp][kSlotsArr];
#pragma unroll
      for (int u = 0; u < kIlp; ++u) {
        const int64_t i = base + int64_t(u) * blockDim.x;
        if (i < packs) {
          if constexpr (!kParamWriteOnly) p[u] = load_pack(param, i);
          g[u] = load_pack(grad, i);
#pragma unroll
          for (int k = 0; k < kSlots; ++k) s[u][k] = load_pack(state[k], i);
        }
      }
#pragma unroll
      for (int u = 0; u < kIlp; ++u) {
        const int64_t i = base + int64_t(u) * blockDim.x;
        if (i >= packs) continue;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          O po = kParamWriteOnly ? O(0) : to_opmath(p[u].v[e]);
          O so[kSlotsArr];
#pragma unroll
          for (int k = 0; k < kSlots; ++k) so[k] = to_opmath(s[u][k].v[e]);
          fn(po, to_opmath(g[u].v[e]), so);
          p[u].v[e] = param_from_opmath<S>(po, rounding, i * V + e);
#pragma unroll
          for (int k = 0; k < kSlots; ++k) s[u][k].v[e] = from_opmath<S>(so[k]);
        }
        store_pack(param, i, p[u]);
#pragma unroll
        for (int k = 0; k < kSlots; ++k) store_pack(state[k], i, s[u][k]);
      }
    }
    done = packs * V;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) {
    O po = kParamWriteOnly ? O(0) : to_opmath(param[i]);
    O so[kSlotsArr];
#pragma unroll
    for (int k = 0; k < kSlots; ++k) so[k] = to_opmath(state[k][i]);
    fn(po, to_opmath(grad[i]), so);
    param[i] = param_from_opmath<S>(po, rounding, i);
#pragma unroll
    for (int k = 0; k < kSlots; ++k) state[k][i] = from_opmath<S>(so[k]);
  }
}

__device__ __forceinline__ bool skip_step(const StepState& s) {
  return s.found_inf != nullptr && *s.found_inf != 0.0f;
}

// The gradient multiplier of this step: maximize sign and AMP unscale, read on the device.
__device__ __forceinline__ double grad_multiplier(double base, const StepState& s) {
  return s.grad_scale != nullptr ? base / double(*s.grad_scale) : base;
}

// The lr of this step: the device value when the step is capturable, else the host's.
__device__ __forceinline__ double step_lr(double host_lr, const StepState& s) {
  if (s.lr == nullptr) return host_lr;
  return s.lr_is_double ? *static_cast<const double*>(s.lr) : double(*static_cast<const float*>(s.lr));
}

// Advances the step of every tensor that had a grad, after the update kernel read them.
__global__ void advance_steps(StepState s, const int64_t* stepped, int64_t n);

}  // namespace onepass::cuda
