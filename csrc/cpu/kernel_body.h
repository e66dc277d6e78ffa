// Memory movement of the CPU kernels: walk a chunk with SIMD vectors (VecFor<S>, supplied by the
// vec_*.h header of the translation unit), convert to opmath, call the algorithm's math from
// onepass/math.h, convert back, store; finish the tail with the same math on scalars.
// Included once per instruction set by kernels_<isa>.cpp, after ONEPASS_CAPABILITY is defined.
#pragma once
#include <type_traits>

#include "cpu_kernels.h"
#include "onepass/streams.h"

namespace onepass {
inline namespace ONEPASS_CAPABILITY {

// Stores one vector as X: lane by lane when it rounds stochastically (an option, not the norm).
template <class X, class VT>
ONEPASS_INLINE void store_rounded(X* dst, VT x, const StoreRounding& r, uint32_t stream,
                                  int64_t i) {
  if constexpr (std::is_same_v<X, bf16_t>) {
    if (r.seed >= 0) {
      alignas(64) float lanes[VecFor<float>::kWidth];
      VecFor<float>::store(lanes, x);
      for (int k = 0; k < VecFor<float>::kWidth; ++k) {
        dst[k] = rounded_from_opmath<X>(lanes[k], r, stream, i + k);
      }
      return;
    }
  }
  VecFor<X>::store(dst, x);
}

// Applies fn(p, g, s) to every element: p the param, g the gradient, s[k] the k-th state slot,
// all in opmath registers (a vector in the main loop, a scalar in the tail). With master weights
// p is read from and written to the master, and the param gets it rounded to nearest.
// kParamWriteOnly: the "param" is an output only (Muon's update workspace): not read, fn sees 0.
template <class T, int kSlots, bool kParamWriteOnly = false, class Fn>
ONEPASS_INLINE void for_each_element(const Streams<T, kSlots>& io, int64_t n, const Fn& fn,
                                     const StoreRounding& rounding = {}) {
  using P = typename T::P;
  using G = typename T::G;
  using S = typename T::S;
  using M = typename T::MathParam;
  using O = typename T::O;
  using V = VecFor<M>;
  static_assert(std::is_same_v<typename V::type, typename VecFor<G>::type> &&
                    std::is_same_v<typename V::type, typename VecFor<S>::type>,
                "a layout's storage types must share one vector register type");
  P* __restrict param = io.param;
  float* __restrict master = io.master;
  const G* __restrict grad = io.grad;
  S* const* state = io.state;
  int64_t i = 0;
  // The vector loop, once per rounding mode: a store that rounds stochastically goes lane by
  // lane, and a per-vector test of the seed in the common loop kept its state registers on the
  // stack (AVX2 bf16 state: 3x the in-cache time of fp32 state).
  const auto vector_loop = [&]<bool kStochastic>() {
    for (; i + V::kWidth <= n; i += V::kWidth) {
      if ((i & (64 / sizeof(M) - 1)) == 0) {  // once per opmath cache line, 256 bytes ahead
        if constexpr (T::kMaster) __builtin_prefetch(master + i + 64, 1);
        __builtin_prefetch(param + i + 256 / sizeof(P), 1);
        __builtin_prefetch(grad + i + 256 / sizeof(G), 0);
        for (int k = 0; k < kSlots; ++k) __builtin_prefetch(state[k] + i + 256 / sizeof(S), 1);
      }
      typename V::type p;
      if constexpr (kParamWriteOnly) {
        p = typename V::type(O(0));
      } else if constexpr (T::kMaster) {
        p = VecFor<float>::load(master + i);
      } else {
        p = VecFor<P>::load(param + i);
      }
      const typename V::type g = VecFor<G>::load(grad + i);
      typename V::type s[kSlots > 0 ? kSlots : 1];
      for (int k = 0; k < kSlots; ++k) s[k] = VecFor<S>::load(state[k] + i);
      fn(p, g, s);
      if constexpr (T::kMaster) {
        VecFor<float>::store(master + i, p);
        VecFor<P>::store(param + i, p);
      } else if constexpr (kStochastic) {
        store_rounded(param + i, p, rounding, 0u, i);
      } else {
        VecFor<P>::store(param + i, p);
      }
      for (int k = 0; k < kSlots; ++k) {
        if constexpr (kStochastic) {
          store_rounded(state[k] + i, s[k], rounding, 1u + k, i);
        } else {
          VecFor<S>::store(state[k] + i, s[k]);
        }
      }
    }
  };
  if constexpr (V::kWidth > 1) {
    constexpr bool kRoundsBf16 = std::is_same_v<P, bf16_t> || std::is_same_v<S, bf16_t>;
    if (kRoundsBf16 && rounding.seed >= 0) {
      vector_loop.template operator()<true>();
    } else {
      vector_loop.template operator()<false>();
    }
  }
  for (; i < n; ++i) {
    O p;
    if constexpr (kParamWriteOnly) {
      p = O(0);
    } else if constexpr (T::kMaster) {
      p = master[i];
    } else {
      p = to_opmath(param[i]);
    }
    const O g = to_opmath(grad[i]);
    O s[kSlots > 0 ? kSlots : 1];
    for (int k = 0; k < kSlots; ++k) s[k] = to_opmath(state[k][i]);
    fn(p, g, s);
    if constexpr (T::kMaster) {
      master[i] = p;
      param[i] = from_opmath<P>(p);
    } else {
      param[i] = param_from_opmath<P>(p, rounding, i);
    }
    for (int k = 0; k < kSlots; ++k) {
      state[k][i] = rounded_from_opmath<S>(s[k], rounding, 1u + k, i);
    }
  }
}

// No SIMD pow: lane by lane with the scalar build's pow, for the vector types of the SIMD
// builds (FAdam with p != 0.5 only; p = 0.5 is a SIMD sqrt).
template <class T>
ONEPASS_INLINE typename VecFor<T>::type lanewise_pow(typename VecFor<T>::type a,
                                                      typename VecFor<T>::type b) {
  constexpr int kWidth = VecFor<T>::kWidth;
  T x[kWidth], y[kWidth];
  VecFor<T>::store(x, a);
  VecFor<T>::store(y, b);
  for (int i = 0; i < kWidth; ++i) x[i] = op_pow(x[i], y[i]);
  return VecFor<T>::load(x);
}
template <class Vec>
  requires(VecFor<float>::kWidth > 1 && std::is_same_v<Vec, typename VecFor<float>::type>)
ONEPASS_INLINE Vec op_pow(Vec a, Vec b) {
  return lanewise_pow<float>(a, b);
}
template <class Vec>
  requires(VecFor<double>::kWidth > 1 && std::is_same_v<Vec, typename VecFor<double>::type>)
ONEPASS_INLINE Vec op_pow(Vec a, Vec b) {
  return lanewise_pow<double>(a, b);
}

// A step's constants in both register kinds: the vector loop and the scalar tail.
template <template <class> class Consts, class S>
struct BothConsts {
  Consts<typename VecFor<S>::type> vec;
  Consts<opmath_t<S>> scalar;
  template <class T>
  ONEPASS_INLINE const Consts<T>& get() const {
    if constexpr (std::is_same_v<T, opmath_t<S>>) {
      return scalar;
    } else {
      return vec;
    }
  }
};

template <class T, bool kAmsgrad, bool kL2Decay>
void adam_chunks(const cpu::AdamLaunch& L, int64_t begin, int64_t end) {
  using M = typename T::MathParam;
  using O = typename T::O;
  using VT = typename VecFor<M>::type;
  double consts_step = -1.0;  // the step `consts` was made for: most tensors share one
  BothConsts<AdamConsts, M> consts{};
  void* const slots[3] = {L.exp_avg, L.exp_avg_sq, L.max_exp_avg_sq};
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& chunk = L.chunks[c];
    const Segment& seg = L.segments[chunk.segment];
    if (seg.step != consts_step) {
      consts = {AdamConsts<VT>::make(L.hyper, seg.step), AdamConsts<O>::make(L.hyper, seg.step)};
      consts_step = seg.step;
    }
    for_each_element<T, kAmsgrad ? 3 : 2>(
        chunk_streams<T, kAmsgrad ? 3 : 2>(seg, chunk, L.master, slots), chunk.end - chunk.begin,
        [&](auto& p, auto g, auto* s) {
          using R = std::remove_reference_t<decltype(p)>;
          if constexpr (kAmsgrad) {
            adam_update<true, kL2Decay>(p, g, s[0], s[1], s[2], consts.template get<R>());
          } else {
            R no_max = s[1];
            adam_update<false, kL2Decay>(p, g, s[0], s[1], no_max, consts.template get<R>());
          }
        },
        StoreRounding{seg.state_offset + chunk.begin, L.sr_seed});
  }
}

template <class T, bool kMomentum, bool kNesterov, bool kFirst, bool kL2Decay>
void sgd_chunk(const cpu::SgdLaunch& L, const Chunk& chunk,
               const BothConsts<SgdConsts, typename T::MathParam>& consts) {
  const Segment& seg = L.segments[chunk.segment];
  void* const slots[1] = {L.momentum_buffer};
  for_each_element<T, kMomentum ? 1 : 0>(
      chunk_streams<T, kMomentum ? 1 : 0>(seg, chunk, L.master, slots), chunk.end - chunk.begin,
      [&](auto& p, auto g, auto* s) {
        using R = std::remove_reference_t<decltype(p)>;
        sgd_update<kMomentum, kNesterov, kFirst, kL2Decay>(p, g, s[0], consts.template get<R>());
      },
      StoreRounding{seg.state_offset + chunk.begin, L.sr_seed});
}

template <class T, bool kL2Decay>
void sgd_chunks(const cpu::SgdLaunch& L, int64_t begin, int64_t end) {
  using M = typename T::MathParam;
  using VT = typename VecFor<M>::type;
  const BothConsts<SgdConsts, M> consts{SgdConsts<VT>::make(L.hyper),
                                        SgdConsts<typename T::O>::make(L.hyper)};
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& chunk = L.chunks[c];
    if (!L.momentum) {
      sgd_chunk<T, false, false, false, kL2Decay>(L, chunk, consts);
      continue;
    }
    // A tensor's first step with momentum starts its buffer from the gradient (torch.optim.SGD).
    const bool first = L.segments[chunk.segment].step == 1.0;
    if (L.nesterov) {
      first ? sgd_chunk<T, true, true, true, kL2Decay>(L, chunk, consts)
            : sgd_chunk<T, true, true, false, kL2Decay>(L, chunk, consts);
    } else {
      first ? sgd_chunk<T, true, false, true, kL2Decay>(L, chunk, consts)
            : sgd_chunk<T, true, false, false, kL2Decay>(L, chunk, consts);
    }
  }
}

template <class T, bool kL2Decay>
void lion_chunks(const cpu::LionLaunch& L, int64_t begin, int64_t end) {
  using M = typename T::MathParam;
  using VT = typename VecFor<M>::type;
  // No per-tensor scalars (no bias correction): one set of constants for the whole range.
  const BothConsts<LionConsts, M> consts{LionConsts<VT>::make(L.hyper),
                                         LionConsts<typename T::O>::make(L.hyper)};
  void* const slots[1] = {L.exp_avg};
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& chunk = L.chunks[c];
    const Segment& seg = L.segments[chunk.segment];
    for_each_element<T, 1>(
        chunk_streams<T, 1>(seg, chunk, L.master, slots), chunk.end - chunk.begin,
        [&](auto& p, auto g, auto* s) {
          using R = std::remove_reference_t<decltype(p)>;
          lion_update<kL2Decay>(p, g, s[0], consts.template get<R>());
        },
        StoreRounding{seg.state_offset + chunk.begin, L.sr_seed});
  }
}

template <class T>
void lion_typed(const cpu::LionLaunch& L, int64_t begin, int64_t end) {
  L.l2_decay ? lion_chunks<T, true>(L, begin, end) : lion_chunks<T, false>(L, begin, end);
}

template <class T, bool kNesterov>
void muon_momentum_chunks(const cpu::MuonLaunch& L, int64_t begin, int64_t end) {
  using M = typename T::MathParam;
  using VT = typename VecFor<M>::type;
  const BothConsts<MuonConsts, M> consts{MuonConsts<VT>::make(L.hyper),
                                         MuonConsts<typename T::O>::make(L.hyper)};
  void* const slots[1] = {L.momentum_buffer};
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& chunk = L.chunks[c];
    const Segment& seg = L.segments[chunk.segment];
    // The update workspace rides in the param's place: written, never read.
    for_each_element<T, 1, /*kParamWriteOnly=*/true>(
        chunk_streams<T, 1>(seg, chunk, nullptr, slots), chunk.end - chunk.begin,
        [&](auto& update, auto g, auto* s) {
          using R = std::remove_reference_t<decltype(update)>;
          muon_momentum<kNesterov>(update, g, s[0], consts.template get<R>());
        });
  }
}

template <class T>
void muon_momentum_typed(const cpu::MuonLaunch& L, int64_t begin, int64_t end) {
  L.nesterov ? muon_momentum_chunks<T, true>(L, begin, end)
             : muon_momentum_chunks<T, false>(L, begin, end);
}

// acc[0] + ... + acc[kLanes - 1] in a fixed tree order (kLanes a power of two).
template <int kLanes>
ONEPASS_INLINE double tree_sum(double* acc) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) acc[k] += acc[k + width];
  }
  return acc[0];
}

// Sum of squares of n gradient elements (G their storage), in double whatever the storage:
// kSumLanes independent accumulators, element i in lane i % kSumLanes and the tail past the last
// whole group in lane 0, combined by a fixed tree (every build gives the same bits: no
// reassociation). 16 lanes: the compiler keeps them in 4 AVX2 / 2 AVX-512 registers, enough
// independent add chains to read at memory speed (4 lanes were one dependent chain).
constexpr int kSumLanes = 16;

template <class G>
ONEPASS_INLINE double sum_of_squares(const G* g, int64_t n) {
  double acc[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
    for (int k = 0; k < kSumLanes; ++k) {
      const double x = static_cast<double>(to_opmath(g[i + k]));
      acc[k] += x * x;
    }
  }
  for (; i < n; ++i) {
    const double x = static_cast<double>(to_opmath(g[i]));
    acc[0] += x * x;
  }
  return tree_sum<kSumLanes>(acc);
}

// NovoGrad pass 1: each chunk's sum of squares.
template <class G>
void novograd_reduce_typed(const cpu::NovoGradLaunch& L, int64_t begin, int64_t end) {
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& chunk = L.chunks[c];
    const G* g = static_cast<const G*>(L.segments[chunk.segment].grad) + chunk.begin;
    L.partial_sums[c] = sum_of_squares(g, chunk.end - chunk.begin);
  }
}

// NovoGrad's update of one chunk, with its tensor's denominator sqrt(v) + eps.
template <class T>
ONEPASS_INLINE void novograd_chunk(const cpu::NovoGradLaunch& L, const Chunk& chunk,
                                   double denom) {
  using M = typename T::MathParam;
  using VT = typename VecFor<M>::type;
  const Segment& seg = L.segments[chunk.segment];
  void* const slots[1] = {L.exp_avg};
  const BothConsts<NovoGradConsts, M> consts{NovoGradConsts<VT>::make(L.hyper, denom),
                                             NovoGradConsts<typename T::O>::make(L.hyper, denom)};
  const Streams<T, 1> io = chunk_streams<T, 1>(seg, chunk, L.master, slots);
  const int64_t n = chunk.end - chunk.begin;
  auto step = [&]<bool kFirst>() {
    for_each_element<T, 1>(
        io, n,
        [&](auto& p, auto g, auto* s) {
          using R = std::remove_reference_t<decltype(p)>;
          novograd_update<kFirst>(p, g, s[0], consts.template get<R>());
        },
        StoreRounding{seg.state_offset + chunk.begin, L.sr_seed});
  };
  seg.step == 1.0 ? step.template operator()<true>() : step.template operator()<false>();
}

// NovoGrad pass 2: the elementwise update with each tensor's denominator.
template <class T>
void novograd_typed(const cpu::NovoGradLaunch& L, int64_t begin, int64_t end) {
  for (int64_t c = begin; c < end; ++c) {
    novograd_chunk<T>(L, L.chunks[c], L.denoms[L.chunks[c].segment]);
  }
}

// Both passes per chunk when every tensor is one chunk: the sum of squares (the same bits as
// pass 1: the tensor's sum is its one chunk's), the tensor's second moment, then the update
// while the grad is still in cache.
template <class T>
void novograd_fused_typed(const cpu::NovoGradLaunch& L, int64_t begin, int64_t end) {
  using V = std::conditional_t<std::is_same_v<typename T::P, double>, double, float>;
  V* const v = static_cast<V*>(L.exp_avg_sq);
  V* const v_max = static_cast<V*>(L.max_exp_avg_sq);
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& chunk = L.chunks[c];
    const Segment& seg = L.segments[chunk.segment];
    const double sum = sum_of_squares(static_cast<const typename T::G*>(seg.grad) + chunk.begin,
                                      chunk.end - chunk.begin);
    const double denom = novograd_second_moment<V>(sum, seg.step, L.hyper, L.amsgrad,
                                                   v[seg.index],
                                                   L.amsgrad ? v_max + seg.index : nullptr);
    novograd_chunk<T>(L, chunk, denom);
  }
}

// FAdam: the reductions sum in double, in a fixed order within each chunk. Each pass is a
// function of one chunk, so the fused path can run all three on a chunk back to back.

// Pass 1 of chunk c: its sum of raw g^2.
template <class G>
ONEPASS_INLINE void fadam_reduce_chunk(const cpu::FAdamLaunch& L, int64_t c) {
  const Chunk& chunk = L.chunks[c];
  const G* g = static_cast<const G*>(L.segments[chunk.segment].grad) + chunk.begin;
  L.partial_sums[2 * c] = sum_of_squares(g, chunk.end - chunk.begin);
  L.partial_sums[2 * c + 1] = 0.0;
}

template <class O>
FAdamConsts<O> fadam_consts(const cpu::FAdamLaunch& L, int64_t segment) {
  const cpu::FAdamSegment& k = L.scalars[segment];
  return FAdamConsts<O>::make(L.hyper, L.segments[segment].step, k.eps_t, k.gn_divisor,
                              k.wn_divisor);
}

// Pass 2 of chunk c: its sums of gn^2 and wn^2 with the tensor's new den (F read, not written).
// gn and wn in SIMD vectors, as the update computes them (the same bits as the scalar math); the
// squares summed in double into sum_of_squares' kSumLanes lanes, element i into lane i % kSumLanes
// and the tail past the last whole group into lane 0, so that every build sums in one order and
// gives the same bits. (One accumulator per vector lane had made this pass ~10x faster than one
// chain of dependent adds, but left each build its own order: the scalar build's one chain over a
// chunk strayed ~25 float64 ulps from the reference.)
template <class T>
ONEPASS_INLINE void fadam_norms_chunk(const cpu::FAdamLaunch& L, int64_t c) {
  using P = typename T::P;
  using G = typename T::G;
  using S = typename T::S;
  using O = typename T::O;
  using V = VecFor<typename T::MathParam>;
  static_assert(kSumLanes % V::kWidth == 0, "a vector's lanes are consecutive sum lanes");
  void* const slots[1] = {L.fim};
  const Chunk& chunk = L.chunks[c];
  const Segment& seg = L.segments[chunk.segment];
  const FAdamConsts<O> consts = fadam_consts<O>(L, chunk.segment);
  const Streams<T, 1> io = chunk_streams<T, 1>(seg, chunk, L.master, slots);
  const int64_t n = chunk.end - chunk.begin;
  const int64_t whole = n / kSumLanes * kSumLanes;  // elements summed lane by lane
  double gn_sq[kSumLanes] = {}, wn_sq[kSumLanes] = {};
  int64_t i = 0;
  if constexpr (V::kWidth > 1) {
    using VT = typename V::type;
    const FAdamConsts<VT> vconsts = fadam_consts<VT>(L, chunk.segment);
    alignas(64) O gn_lanes[V::kWidth], wn_lanes[V::kWidth];
    // A group of kSumLanes elements at a time, its vectors' lanes at fixed sum lanes (known at
    // compile time: the accumulators stay in registers; an index computed at run time had kept
    // them in memory, 1.6-2.5x slower).
    for (; i < whole; i += kSumLanes) {
      for (int v = 0; v < kSumLanes / V::kWidth; ++v) {
        const int64_t j = i + v * V::kWidth;
        VT p;
        if constexpr (T::kMaster) {
          p = VecFor<float>::load(io.master + j);
        } else {
          p = VecFor<P>::load(io.param + j);
        }
        VT gn, wn;
        fadam_norms<VT>(p, VecFor<G>::load(io.grad + j), VecFor<S>::load(io.state[0] + j),
                        vconsts, gn, wn);
        VecFor<O>::store(gn_lanes, gn);
        VecFor<O>::store(wn_lanes, wn);
        for (int k = 0; k < V::kWidth; ++k) {
          gn_sq[v * V::kWidth + k] += double(gn_lanes[k]) * double(gn_lanes[k]);
          wn_sq[v * V::kWidth + k] += double(wn_lanes[k]) * double(wn_lanes[k]);
        }
      }
    }
  }
  for (; i < whole; i += kSumLanes) {  // the scalar build: the same groups, an element a lane
    for (int k = 0; k < kSumLanes; ++k) {
      O gn, wn;
      const O p = T::kMaster ? O(io.master[i + k]) : to_opmath(io.param[i + k]);
      fadam_norms<O>(p, to_opmath(io.grad[i + k]), to_opmath(io.state[0][i + k]), consts, gn, wn);
      gn_sq[k] += double(gn) * double(gn);
      wn_sq[k] += double(wn) * double(wn);
    }
  }
  for (; i < n; ++i) {  // the tail past the last whole group: lane 0, as sum_of_squares
    O gn, wn;
    const O p = T::kMaster ? O(io.master[i]) : to_opmath(io.param[i]);
    fadam_norms<O>(p, to_opmath(io.grad[i]), to_opmath(io.state[0][i]), consts, gn, wn);
    gn_sq[0] += double(gn) * double(gn);
    wn_sq[0] += double(wn) * double(wn);
  }
  L.partial_sums[2 * c] = tree_sum<kSumLanes>(gn_sq);
  L.partial_sums[2 * c + 1] = tree_sum<kSumLanes>(wn_sq);
}

// Pass 3 of chunk c, vectorised (the update's math is elementwise; F^p is a SIMD sqrt for the
// paper's p=0.5): F, momentum and the param.
template <class T>
ONEPASS_INLINE void fadam_chunk(const cpu::FAdamLaunch& L, int64_t c) {
  using M = typename T::MathParam;
  using VT = typename VecFor<M>::type;
  void* const slots[2] = {L.fim, L.momentum};
  const Chunk& chunk = L.chunks[c];
  const Segment& seg = L.segments[chunk.segment];
  const BothConsts<FAdamConsts, M> consts{fadam_consts<VT>(L, chunk.segment),
                                          fadam_consts<typename T::O>(L, chunk.segment)};
  for_each_element<T, 2>(
      chunk_streams<T, 2>(seg, chunk, L.master, slots), chunk.end - chunk.begin,
      [&](auto& p, auto g, auto* s) {
        using R = std::remove_reference_t<decltype(p)>;
        fadam_update<R>(p, g, s[0], s[1], consts.template get<R>());
      },
      StoreRounding{seg.state_offset + chunk.begin, L.sr_seed});
}

template <class G>
void fadam_reduce_typed(const cpu::FAdamLaunch& L, int64_t begin, int64_t end) {
  for (int64_t c = begin; c < end; ++c) fadam_reduce_chunk<G>(L, c);
}

template <class T>
void fadam_norms_typed(const cpu::FAdamLaunch& L, int64_t begin, int64_t end) {
  for (int64_t c = begin; c < end; ++c) fadam_norms_chunk<T>(L, c);
}

template <class T>
void fadam_typed(const cpu::FAdamLaunch& L, int64_t begin, int64_t end) {
  for (int64_t c = begin; c < end; ++c) fadam_chunk<T>(L, c);
}

// All three passes per chunk when every tensor is one chunk, with the tensor's scalars between
// them as the glue computes them for the three-pass path (the same bits): the tensor's data stays
// in cache from the first read to the last write.
template <class T>
void fadam_fused_typed(const cpu::FAdamLaunch& L, int64_t begin, int64_t end) {
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& chunk = L.chunks[c];
    const int64_t numel = L.segments[chunk.segment].numel;
    cpu::FAdamSegment& k = L.scalars[chunk.segment];
    fadam_reduce_chunk<typename T::G>(L, c);
    k.eps_t = fadam_eps_t(L.partial_sums[2 * c], numel, L.hyper);
    fadam_norms_chunk<T>(L, c);
    k.gn_divisor = fadam_clip_divisor(L.partial_sums[2 * c], numel, L.hyper.clip);
    k.wn_divisor = fadam_clip_divisor(L.partial_sums[2 * c + 1], numel, L.hyper.clip);
    fadam_chunk<T>(L, c);
  }
}

template <class T>
void adam_typed(const cpu::AdamLaunch& L, int64_t begin, int64_t end) {
  if (L.amsgrad) {
    L.l2_decay ? adam_chunks<T, true, true>(L, begin, end)
               : adam_chunks<T, true, false>(L, begin, end);
  } else {
    L.l2_decay ? adam_chunks<T, false, true>(L, begin, end)
               : adam_chunks<T, false, false>(L, begin, end);
  }
}

template <class T>
void sgd_typed(const cpu::SgdLaunch& L, int64_t begin, int64_t end) {
  L.l2_decay ? sgd_chunks<T, true>(L, begin, end) : sgd_chunks<T, false>(L, begin, end);
}

// Calls fn.template operator()<X>() for the storage type X of `dtype` (the reductions, which
// read the gradient only).
template <class Fn>
ONEPASS_INLINE void dispatch_dtype(DType dtype, const Fn& fn) {
  switch (dtype) {
    case DType::kFloat32: fn.template operator()<float>(); break;
    case DType::kFloat64: fn.template operator()<double>(); break;
    case DType::kBFloat16: fn.template operator()<bf16_t>(); break;
    case DType::kFloat16: fn.template operator()<half_t>(); break;
  }
}

// The entry points: the glue has checked the layout is one the kernels are built for.
inline void adam_entry(const cpu::AdamLaunch& L, int64_t begin, int64_t end) {
  dispatch_layout(L.layout, [&]<class T>() { adam_typed<T>(L, begin, end); });
}

inline void sgd_entry(const cpu::SgdLaunch& L, int64_t begin, int64_t end) {
  dispatch_layout(L.layout, [&]<class T>() { sgd_typed<T>(L, begin, end); });
}

inline void lion_entry(const cpu::LionLaunch& L, int64_t begin, int64_t end) {
  dispatch_layout(L.layout, [&]<class T>() { lion_typed<T>(L, begin, end); });
}

inline void muon_momentum_entry(const cpu::MuonLaunch& L, int64_t begin, int64_t end) {
  dispatch_layout(L.layout, [&]<class T>() {
    if constexpr (!T::kMaster) muon_momentum_typed<T>(L, begin, end);  // no master there
  });
}

inline void novograd_reduce_entry(const cpu::NovoGradLaunch& L, int64_t begin, int64_t end) {
  dispatch_dtype(L.layout.grad, [&]<class G>() { novograd_reduce_typed<G>(L, begin, end); });
}

inline void novograd_entry(const cpu::NovoGradLaunch& L, int64_t begin, int64_t end) {
  dispatch_layout(L.layout, [&]<class T>() { novograd_typed<T>(L, begin, end); });
}

inline void novograd_fused_entry(const cpu::NovoGradLaunch& L, int64_t begin, int64_t end) {
  dispatch_layout(L.layout, [&]<class T>() { novograd_fused_typed<T>(L, begin, end); });
}

inline void fadam_reduce_entry(const cpu::FAdamLaunch& L, int64_t begin, int64_t end) {
  dispatch_dtype(L.layout.grad, [&]<class G>() { fadam_reduce_typed<G>(L, begin, end); });
}

inline void fadam_norms_entry(const cpu::FAdamLaunch& L, int64_t begin, int64_t end) {
  dispatch_layout(L.layout, [&]<class T>() { fadam_norms_typed<T>(L, begin, end); });
}

inline void fadam_entry(const cpu::FAdamLaunch& L, int64_t begin, int64_t end) {
  dispatch_layout(L.layout, [&]<class T>() { fadam_typed<T>(L, begin, end); });
}

inline void fadam_fused_entry(const cpu::FAdamLaunch& L, int64_t begin, int64_t end) {
  dispatch_layout(L.layout, [&]<class T>() { fadam_fused_typed<T>(L, begin, end); });
}

}  // namespace ONEPASS_CAPABILITY
}  // namespace onepass
