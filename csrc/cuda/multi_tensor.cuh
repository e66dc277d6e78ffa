// Memory movement of the CUDA kernels: one thread block per chunk of the tensor table; vector
// loads and stores (16 bytes; 8 for the narrower streams of a mixed layout) when every pointer of
// the chunk is aligned, a scalar path when not; kIlp vectors in flight per thread; 64-bit
// indexing throughout. The math comes from
// onepass/math.h through a functor, exactly as on the CPU.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_kernels.h"
#include "onepass/streams.h"

namespace onepass::cuda {

#ifndef ONEPASS_CUDA_ILP
#define ONEPASS_CUDA_ILP 2
#endif
// Streaming cache hints (ld/st .cs, evict first) on the vector path: every byte is touched once.
#ifndef ONEPASS_CUDA_STREAMING
#define ONEPASS_CUDA_STREAMING 0
#endif

constexpr int kIlp = ONEPASS_CUDA_ILP;  // vectors per thread per iteration, all loaded first

// Thread blocks per SM that kernels with fp32 math leave registers for (the second argument of
// __launch_bounds__). 1 lets a 16-bit layout's unpacked values take up to 128 registers a
// thread, which ptxas uses (106 for all-bf16 AdamW at ILP 2): one 512-thread block per SM, half
// the loads in flight of fp32's two. 2 caps them at 64, with some spilling; bench/cuda_sweep.cu
// measures both. Float64 math always gets 1.
#ifndef ONEPASS_CUDA_MIN_BLOCKS
#define ONEPASS_CUDA_MIN_BLOCKS 1
#endif
template <class T>
constexpr int kMinBlocks = std::is_same_v<typename T::O, float> ? ONEPASS_CUDA_MIN_BLOCKS : 1;

// kN elements of X moved by one load or store: 16 bytes (the default), or 8 for the narrower
// streams of a mixed layout (see for_each_element).
template <class X, int kN = int(16 / sizeof(X))>
struct alignas(sizeof(X) * kN) Pack {
  static constexpr int kSize = kN;
  X v[kN];
};

template <int kBytes>
__device__ __forceinline__ bool aligned(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & uintptr_t(kBytes - 1)) == 0;
}

#if ONEPASS_CUDA_STREAMING
// The register type of one streaming load or store of kBytes.
template <int kBytes>
struct RawOf;
template <>
struct RawOf<16> {
  using type = int4;
};
template <>
struct RawOf<8> {
  using type = int2;
};
template <>
struct RawOf<4> {
  using type = int;
};
#endif

template <class X, int kN>
__device__ __forceinline__ Pack<X, kN> load_pack(const X* base, int64_t i) {
#if ONEPASS_CUDA_STREAMING
  using Raw = typename RawOf<int(sizeof(Pack<X, kN>))>::type;
  const Raw raw = __ldcs(reinterpret_cast<const Raw*>(base) + i);
  Pack<X, kN> out;
  memcpy(&out, &raw, sizeof(out));
  return out;
#else
  return reinterpret_cast<const Pack<X, kN>*>(base)[i];
#endif
}

template <class X, int kN>
__device__ __forceinline__ void store_pack(X* base, int64_t i, const Pack<X, kN>& value) {
#if ONEPASS_CUDA_STREAMING
  using Raw = typename RawOf<int(sizeof(Pack<X, kN>))>::type;
  Raw raw;
  memcpy(&raw, &value, sizeof(raw));
  __stcs(reinterpret_cast<Raw*>(base) + i, raw);
#else
  reinterpret_cast<Pack<X, kN>*>(base)[i] = value;
#endif
}

// Elements per vector step of a layout: as many as its widest stream moves in 16 bytes, every
// stream moving that count (a narrower one in a smaller pack: 8 bytes of bf16 beside 16 of fp32).
// One dtype throughout without master weights (P == G == S): 16-byte packs on every stream. The
// state type counts even for a launch without state slots (its packs are declared, never used):
// the glue gives such a launch the params' dtype (float32 with master weights), never a wider one.
__host__ __device__ constexpr size_t wider(size_t a, size_t b) { return a > b ? a : b; }

template <class T>
struct VectorElements {
  static constexpr size_t kWidest =
      wider(wider(sizeof(typename T::P), sizeof(typename T::G)),
            wider(sizeof(typename T::S), T::kMaster ? sizeof(float) : size_t(0)));
  static constexpr int value = int(16 / kWidest);
  static_assert(value >= 1 && 16 % kWidest == 0);
};

// Applies fn(p, g, s) to every element of one chunk: p the param, g the gradient, s[k] the k-th
// state slot, in opmath registers. With master weights p is read from and written to the
// master, and the param gets it rounded to nearest; without, the param store rounds as
// `rounding` says (stochastic for bf16 with a seed). Every state slot k stores with stream 1 + k.
// The index of an element for stochastic rounding is its index in the chunk (rounding's
// index_base is the chunk's state offset). kParamWriteOnly: the "param" is an output only
// (Muon's update workspace): not loaded, fn sees 0.
// Vector path when every stream is aligned to its pack: V elements per step (VectorElements),
// kIlp steps in flight per thread; a scalar path when not, and for the tail.
template <class T, int kSlots, bool kParamWriteOnly = false, class Fn>
__device__ __forceinline__ void for_each_element(const Streams<T, kSlots>& io, int64_t n,
                                                 const Fn& fn,
                                                 const StoreRounding& rounding = {}) {
  using P = typename T::P;
  using G = typename T::G;
  using S = typename T::S;
  using O = typename T::O;
  static_assert(!(T::kMaster && kParamWriteOnly), "a write-only param has no master weights");
  static_assert(std::is_same_v<O, opmath_t<typename T::MathParam>>,
                "the math runs in the master's (or the param's) opmath type");
  constexpr int kSlotsArr = kSlots > 0 ? kSlots : 1;
  constexpr int V = VectorElements<T>::value;
  P* __restrict__ param = io.param;
  float* __restrict__ master = io.master;
  const G* __restrict__ grad = io.grad;
  S* const* state = io.state;
  bool vector = aligned<sizeof(Pack<P, V>)>(param) && aligned<sizeof(Pack<G, V>)>(grad);
  if constexpr (T::kMaster) vector = vector && aligned<sizeof(Pack<float, V>)>(master);
#pragma unroll
  for (int k = 0; k < kSlots; ++k) vector = vector && aligned<sizeof(Pack<S, V>)>(state[k]);
  int64_t done = 0;
  if (vector) {
    const int64_t packs = n / V;
    const int64_t stride = int64_t(blockDim.x) * kIlp;
    for (int64_t base = threadIdx.x; base < packs; base += stride) {
      Pack<P, V> p[kIlp];
      Pack<float, V> m[kIlp];  // master weights only
      Pack<G, V> g[kIlp];
      Pack<S, V> s[kIlp][kSlotsArr];
#pragma unroll
      for (int u = 0; u < kIlp; ++u) {
        const int64_t i = base + int64_t(u) * blockDim.x;
        if (i < packs) {
          if constexpr (T::kMaster) {
            m[u] = load_pack<float, V>(master, i);  // the param is written only
          } else if constexpr (!kParamWriteOnly) {
            p[u] = load_pack<P, V>(param, i);
          }
          g[u] = load_pack<G, V>(grad, i);
#pragma unroll
          for (int k = 0; k < kSlots; ++k) s[u][k] = load_pack<S, V>(state[k], i);
        }
      }
#pragma unroll
      for (int u = 0; u < kIlp; ++u) {
        const int64_t i = base + int64_t(u) * blockDim.x;
        if (i >= packs) continue;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          O po;
          if constexpr (kParamWriteOnly) {
            po = O(0);
          } else if constexpr (T::kMaster) {
            po = m[u].v[e];
          } else {
            po = to_opmath(p[u].v[e]);
          }
          O so[kSlotsArr];
#pragma unroll
          for (int k = 0; k < kSlots; ++k) so[k] = to_opmath(s[u][k].v[e]);
          fn(po, to_opmath(g[u].v[e]), so);
          const int64_t at = i * V + e;
          if constexpr (T::kMaster) {
            m[u].v[e] = po;
            p[u].v[e] = from_opmath<P>(po);  // to nearest, never stochastic
          } else {
            p[u].v[e] = param_from_opmath<P>(po, rounding, at);
          }
#pragma unroll
          for (int k = 0; k < kSlots; ++k) {
            s[u][k].v[e] = rounded_from_opmath<S>(so[k], rounding, 1u + k, at);
          }
        }
        if constexpr (T::kMaster) store_pack<float, V>(master, i, m[u]);
        store_pack<P, V>(param, i, p[u]);
#pragma unroll
        for (int k = 0; k < kSlots; ++k) store_pack<S, V>(state[k], i, s[u][k]);
      }
    }
    done = packs * V;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) {
    O po;
    if constexpr (kParamWriteOnly) {
      po = O(0);
    } else if constexpr (T::kMaster) {
      po = master[i];
    } else {
      po = to_opmath(param[i]);
    }
    O so[kSlotsArr];
#pragma unroll
    for (int k = 0; k < kSlots; ++k) so[k] = to_opmath(state[k][i]);
    fn(po, to_opmath(grad[i]), so);
    if constexpr (T::kMaster) {
      master[i] = po;
      param[i] = from_opmath<P>(po);  // to nearest, never stochastic
    } else {
      param[i] = param_from_opmath<P>(po, rounding, i);
    }
#pragma unroll
    for (int k = 0; k < kSlots; ++k) state[k][i] = rounded_from_opmath<S>(so[k], rounding, 1u + k, i);
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

// A launch's hyperparameters as this step uses them: the device lr, or the device block of lr and
// the group's other hyperparameters, when the step is capturable (hyperparameter sets without an
// lr: Muon's momentum), and the device AMP scale folded in.
template <class Hyper>
__device__ __forceinline__ Hyper step_hyper(Hyper h, const StepState& s) {
  if constexpr (requires { h.lr; }) {
    if (s.lr_block) {
      read_block(h, static_cast<const double*>(s.lr));
    } else {
      h.lr = step_lr(h.lr, s);
    }
  }
  h.grad_scale = grad_multiplier(h.grad_scale, s);
  return h;
}

// Advances the step of every tensor that had a grad, after the update kernel read them.
__global__ void advance_steps(StepState s, const int64_t* stepped, int64_t n);

}  // namespace onepass::cuda
