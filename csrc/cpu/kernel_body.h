// Memory movement of the CPU kernels: walk a chunk with SIMD vectors (VecFor<S>, supplied by the
// vec_*.h header of the translation unit), convert to opmath, call the algorithm's math from
// onepass/math.h, convert back, store; finish the tail with the same math on scalars.
// Included once per instruction set by kernels_<isa>.cpp, after ONEPASS_CAPABILITY is defined.
#pragma once
#include <type_traits>

#include "cpu_kernels.h"

namespace onepass {
inline namespace ONEPASS_CAPABILITY {

// Applies fn(p, g, s) to every element: p the param, g the gradient, s[k] the k-th state slot,
// all in opmath registers (a vector in the main loop, a scalar in the tail). kParamWriteOnly:
// the "param" is an output only (Muon's update workspace): not read, fn sees 0.
template <class S, int kSlots, bool kParamWriteOnly = false, class Fn>
ONEPASS_INLINE void for_each_element(S* __restrict param, const S* __restrict grad,
                                     S* const* state, int64_t n, const Fn& fn,
                                     const ParamRounding& rounding = {}) {
  using V = VecFor<S>;
  constexpr int64_t kPrefetch = 256 / sizeof(S);  // 4 lines ahead: measured best here
  int64_t i = 0;
  if constexpr (V::kWidth > 1) {
    for (; i + V::kWidth <= n; i += V::kWidth) {
      if ((i & (64 / sizeof(S) - 1)) == 0) {  // once per cache line of each stream
        __builtin_prefetch(param + i + kPrefetch, 1);
        __builtin_prefetch(grad + i + kPrefetch, 0);
        for (int k = 0; k < kSlots; ++k) __builtin_prefetch(state[k] + i + kPrefetch, 1);
      }
      typename V::type p;
      if constexpr (kParamWriteOnly) {
        p = typename V::type(opmath_t<S>(0));
      } else {
        p = V::load(param + i);
      }
      const typename V::type g = V::load(grad + i);
      typename V::type s[kSlots > 0 ? kSlots : 1];
      for (int k = 0; k < kSlots; ++k) s[k] = V::load(state[k] + i);
      fn(p, g, s);
      if constexpr (std::is_same_v<S, bf16_t>) {
        if (rounding.seed >= 0) {  // stochastic rounding: lane by lane (an option, not the norm)
          alignas(64) float lanes[V::kWidth];
          VecFor<float>::store(lanes, p);
          for (int k = 0; k < V::kWidth; ++k) {
            param[i + k] = param_from_opmath<S>(lanes[k], rounding, i + k);
          }
        } else {
          V::store(param + i, p);
        }
      } else {
        V::store(param + i, p);
      }
      for (int k = 0; k < kSlots; ++k) V::store(state[k] + i, s[k]);
    }
  }
  for (; i < n; ++i) {
    opmath_t<S> p = kParamWriteOnly ? opmath_t<S>(0) : to_opmath(param[i]);
    const opmath_t<S> g = to_opmath(grad[i]);
    opmath_t<S> s[kSlots > 0 ? kSlots : 1];
    for (int k = 0; k < kSlots; ++k) s[k] = to_opmath(state[k][i]);
    fn(p, g, s);
    param[i] = param_from_opmath<S>(p, rounding, i);
    for (int k = 0; k < kSlots; ++k) state[k][i] = from_opmath<S>(s[k]);
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

template <class S, bool kAmsgrad, bool kL2Decay>
void adam_chunks(const cpu::AdamLaunch& L, int64_t begin, int64_t end) {
  using O = opmath_t<S>;
  using VT = typename VecFor<S>::type;
  double consts_step = -1.0;  // the step `consts` was made for: most tensors share one
  BothConsts<AdamConsts, S> consts{};
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& chunk = L.chunks[c];
    const Segment& seg = L.segments[chunk.segment];
    if (seg.step != consts_step) {
      consts = {AdamConsts<VT>::make(L.hyper, seg.step), AdamConsts<O>::make(L.hyper, seg.step)};
      consts_step = seg.step;
    }
    const int64_t at = seg.state_offset + chunk.begin;
    S* const state[3] = {static_cast<S*>(L.exp_avg) + at, static_cast<S*>(L.exp_avg_sq) + at,
                         kAmsgrad ? static_cast<S*>(L.max_exp_avg_sq) + at : nullptr};
    for_each_element<S, kAmsgrad ? 3 : 2>(
        static_cast<S*>(seg.param) + chunk.begin, static_cast<const S*>(seg.grad) + chunk.begin,
        state, chunk.end - chunk.begin, [&](auto& p, auto g, auto* s) {
          using T = std::remove_reference_t<decltype(p)>;
          if constexpr (kAmsgrad) {
            adam_update<true, kL2Decay>(p, g, s[0], s[1], s[2], consts.template get<T>());
          } else {
            T no_max = s[1];
            adam_update<false, kL2Decay>(p, g, s[0], s[1], no_max, consts.template get<T>());
          }
        },
        ParamRounding{at, L.sr_seed});
  }
}

template <class S, bool kMomentum, bool kNesterov, bool kFirst, bool kL2Decay>
void sgd_chunk(const cpu::SgdLaunch& L, const Chunk& chunk, const BothConsts<SgdConsts, S>& consts) {
  const Segment& seg = L.segments[chunk.segment];
  S* const state[1] = {kMomentum ? static_cast<S*>(L.momentum_buffer) + seg.state_offset +
                                       chunk.begin
                                 : nullptr};
  for_each_element<S, kMomentum ? 1 : 0>(
      static_cast<S*>(seg.param) + chunk.begin, static_cast<const S*>(seg.grad) + chunk.begin,
      state, chunk.end - chunk.begin, [&](auto& p, auto g, auto* s) {
        using T = std::remove_reference_t<decltype(p)>;
        sgd_update<kMomentum, kNesterov, kFirst, kL2Decay>(p, g, s[0], consts.template get<T>());
      },
      ParamRounding{seg.state_offset + chunk.begin, L.sr_seed});
}

template <class S, bool kL2Decay>
void sgd_chunks(const cpu::SgdLaunch& L, int64_t begin, int64_t end) {
  using O = opmath_t<S>;
  using VT = typename VecFor<S>::type;
  const BothConsts<SgdConsts, S> consts{SgdConsts<VT>::make(L.hyper), SgdConsts<O>::make(L.hyper)};
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& chunk = L.chunks[c];
    if (!L.momentum) {
      sgd_chunk<S, false, false, false, kL2Decay>(L, chunk, consts);
      continue;
    }
    // A tensor's first step with momentum starts its buffer from the gradient (torch.optim.SGD).
    const bool first = L.segments[chunk.segment].step == 1.0;
    if (L.nesterov) {
      first ? sgd_chunk<S, true, true, true, kL2Decay>(L, chunk, consts)
            : sgd_chunk<S, true, true, false, kL2Decay>(L, chunk, consts);
    } else {
      first ? sgd_chunk<S, true, false, true, kL2Decay>(L, chunk, consts)
            : sgd_chunk<S, true, false, false, kL2Decay>(L, chunk, consts);
    }
  }
}

template <class S, bool kL2Decay>
void lion_chunks(const cpu::LionLaunch& L, int64_t begin, int64_t end) {
  using O = opmath_t<S>;
  using VT = typename VecFor<S>::type;
  // No per-tensor scalars (no bias correction): one set of constants for the whole range.
  const BothConsts<LionConsts, S> consts{LionConsts<VT>::make(L.hyper),
                                         LionConsts<O>::make(L.hyper)};
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& chunk = L.chunks[c];
    const Segment& seg = L.segments[chunk.segment];
    S* const state[1] = {static_cast<S*>(L.exp_avg) + seg.state_offset + chunk.begin};
    for_each_element<S, 1>(
        static_cast<S*>(seg.param) + chunk.begin, static_cast<const S*>(seg.grad) + chunk.begin,
        state, chunk.end - chunk.begin, [&](auto& p, auto g, auto* s) {
          using T = std::remove_reference_t<decltype(p)>;
          lion_update<kL2Decay>(p, g, s[0], consts.template get<T>());
        },
        ParamRounding{seg.state_offset + chunk.begin, L.sr_seed});
  }
}

template <class S>
void lion_typed(const cpu::LionLaunch& L, int64_t begin, int64_t end) {
  L.l2_decay ? lion_chunks<S, true>(L, begin, end) : lion_chunks<S, false>(L, begin, end);
}

template <class S, bool kNesterov>
void muon_momentum_chunks(const cpu::MuonLaunch& L, int64_t begin, int64_t end) {
  using O = opmath_t<S>;
  using VT = typename VecFor<S>::type;
  const BothConsts<MuonConsts, S> consts{MuonConsts<VT>::make(L.hyper),
                                         MuonConsts<O>::make(L.hyper)};
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& chunk = L.chunks[c];
    const Segment& seg = L.segments[chunk.segment];
    S* const state[1] = {static_cast<S*>(L.momentum_buffer) + seg.state_offset + chunk.begin};
    // The update workspace rides in the param's place: written, never read.
    for_each_element<S, 1, /*kParamWriteOnly=*/true>(
        static_cast<S*>(seg.param) + chunk.begin, static_cast<const S*>(seg.grad) + chunk.begin,
        state, chunk.end - chunk.begin, [&](auto& update, auto g, auto* s) {
          using T = std::remove_reference_t<decltype(update)>;
          muon_momentum<kNesterov>(update, g, s[0], consts.template get<T>());
        });
  }
}

template <class S>
void muon_momentum_typed(const cpu::MuonLaunch& L, int64_t begin, int64_t end) {
  L.nesterov ? muon_momentum_chunks<S, true>(L, begin, end)
             : muon_momentum_chunks<S, false>(L, begin, end);
}

// Sum of squares of each chunk's gradient, in double whatever the storage: kLanes independent
// accumulators in a fixed order, combined by a fixed tree (every build gives the same bits: no
// reassociation). 16 lanes: the compiler keeps them in 4 AVX2 / 2 AVX-512 registers, enough
// independent add chains to read at memory speed (4 lanes were one dependent chain).
template <class S>
void novograd_reduce_typed(const cpu::NovoGradLaunch& L, int64_t begin, int64_t end) {
  constexpr int kLanes = 16;
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& chunk = L.chunks[c];
    const S* g = static_cast<const S*>(L.segments[chunk.segment].grad) + chunk.begin;
    const int64_t n = chunk.end - chunk.begin;
    double acc[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      for (int k = 0; k < kLanes; ++k) {
        const double x = static_cast<double>(to_opmath(g[i + k]));
        acc[k] += x * x;
      }
    }
    for (; i < n; ++i) {
      const double x = static_cast<double>(to_opmath(g[i]));
      acc[0] += x * x;
    }
    for (int width = kLanes / 2; width > 0; width /= 2) {
      for (int k = 0; k < width; ++k) acc[k] += acc[k + width];
    }
    L.partial_sums[c] = acc[0];
  }
}

template <class S>
void novograd_typed(const cpu::NovoGradLaunch& L, int64_t begin, int64_t end) {
  using O = opmath_t<S>;
  using VT = typename VecFor<S>::type;
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& chunk = L.chunks[c];
    const Segment& seg = L.segments[chunk.segment];
    const double denom = L.denoms[chunk.segment];
    const BothConsts<NovoGradConsts, S> consts{NovoGradConsts<VT>::make(L.hyper, denom),
                                               NovoGradConsts<O>::make(L.hyper, denom)};
    S* const state[1] = {static_cast<S*>(L.exp_avg) + seg.state_offset + chunk.begin};
    S* const param = static_cast<S*>(seg.param) + chunk.begin;
    const S* const grad = static_cast<const S*>(seg.grad) + chunk.begin;
    const int64_t n = chunk.end - chunk.begin;
    auto step = [&]<bool kFirst>() {
      for_each_element<S, 1>(
          param, grad, state, n,
          [&](auto& p, auto g, auto* s) {
            using T = std::remove_reference_t<decltype(p)>;
            novograd_update<kFirst>(p, g, s[0], consts.template get<T>());
          },
          ParamRounding{seg.state_offset + chunk.begin, L.sr_seed});
    };
    seg.step == 1.0 ? step.template operator()<true>() : step.template operator()<false>();
  }
}

// FAdam: plain element loops in opmath (F^p has no SIMD pow here; the compiler vectorizes what it
// can), one double accumulator per quantity per chunk, in element order.
template <class S>
void fadam_reduce_typed(const cpu::FAdamLaunch& L, int64_t begin, int64_t end) {
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& chunk = L.chunks[c];
    const S* g = static_cast<const S*>(L.segments[chunk.segment].grad) + chunk.begin;
    const int64_t n = chunk.end - chunk.begin;
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      for (int k = 0; k < 4; ++k) {
        const double x = static_cast<double>(to_opmath(g[i + k]));
        acc[k] += x * x;
      }
    }
    for (; i < n; ++i) {
      const double x = static_cast<double>(to_opmath(g[i]));
      acc[0] += x * x;
    }
    L.partial_sums[2 * c] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    L.partial_sums[2 * c + 1] = 0.0;
  }
}

template <class S>
FAdamConsts<opmath_t<S>> fadam_consts(const cpu::FAdamLaunch& L, int64_t segment) {
  const cpu::FAdamSegment& k = L.scalars[segment];
  return FAdamConsts<opmath_t<S>>::make(L.hyper, L.segments[segment].step, k.eps_t,
                                        k.gn_divisor, k.wn_divisor);
}

template <class S>
void fadam_norms_typed(const cpu::FAdamLaunch& L, int64_t begin, int64_t end) {
  using O = opmath_t<S>;
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& chunk = L.chunks[c];
    const Segment& seg = L.segments[chunk.segment];
    const FAdamConsts<O> consts = fadam_consts<S>(L, chunk.segment);
    const S* const param = static_cast<const S*>(seg.param) + chunk.begin;
    const S* const grad = static_cast<const S*>(seg.grad) + chunk.begin;
    const S* const fim = static_cast<const S*>(L.fim) + seg.state_offset + chunk.begin;
    const int64_t n = chunk.end - chunk.begin;
    double gn_sq = 0.0, wn_sq = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      O gn, wn;
      fadam_norms<O>(to_opmath(param[i]), to_opmath(grad[i]), to_opmath(fim[i]), consts, gn, wn);
      gn_sq += double(gn) * double(gn);
      wn_sq += double(wn) * double(wn);
    }
    L.partial_sums[2 * c] = gn_sq;
    L.partial_sums[2 * c + 1] = wn_sq;
  }
}

// Pass 3, vectorised (the update's math is elementwise; F^p is a SIMD sqrt for the paper's p=0.5).
template <class S>
void fadam_typed(const cpu::FAdamLaunch& L, int64_t begin, int64_t end) {
  using O = opmath_t<S>;
  using VT = typename VecFor<S>::type;
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& chunk = L.chunks[c];
    const Segment& seg = L.segments[chunk.segment];
    const cpu::FAdamSegment& k = L.scalars[chunk.segment];
    const BothConsts<FAdamConsts, S> consts{
        FAdamConsts<VT>::make(L.hyper, seg.step, k.eps_t, k.gn_divisor, k.wn_divisor),
        FAdamConsts<O>::make(L.hyper, seg.step, k.eps_t, k.gn_divisor, k.wn_divisor)};
    const int64_t at = seg.state_offset + chunk.begin;
    S* const state[2] = {static_cast<S*>(L.fim) + at, static_cast<S*>(L.momentum) + at};
    for_each_element<S, 2>(
        static_cast<S*>(seg.param) + chunk.begin, static_cast<const S*>(seg.grad) + chunk.begin,
        state, chunk.end - chunk.begin, [&](auto& p, auto g, auto* s) {
          using T = std::remove_reference_t<decltype(p)>;
          fadam_update<T>(p, g, s[0], s[1], consts.template get<T>());
        },
        ParamRounding{at, L.sr_seed});
  }
}

template <class S>
void adam_typed(const cpu::AdamLaunch& L, int64_t begin, int64_t end) {
  if (L.amsgrad) {
    L.l2_decay ? adam_chunks<S, true, true>(L, begin, end) : adam_chunks<S, true, false>(L, begin, end);
  } else {
    L.l2_decay ? adam_chunks<S, false, true>(L, begin, end)
               : adam_chunks<S, false, false>(L, begin, end);
  }
}

template <class S>
void sgd_typed(const cpu::SgdLaunch& L, int64_t begin, int64_t end) {
  L.l2_decay ? sgd_chunks<S, true>(L, begin, end) : sgd_chunks<S, false>(L, begin, end);
}

// Calls fn.template operator()<S>() for the storage type S of `dtype`.
template <class Fn>
ONEPASS_INLINE void dispatch_dtype(DType dtype, const Fn& fn) {
  switch (dtype) {
    case DType::kFloat32: fn.template operator()<float>(); break;
    case DType::kFloat64: fn.template operator()<double>(); break;
    case DType::kBFloat16: fn.template operator()<bf16_t>(); break;
    case DType::kFloat16: fn.template operator()<half_t>(); break;
  }
}

inline void adam_entry(const cpu::AdamLaunch& L, int64_t begin, int64_t end) {
  dispatch_dtype(L.dtype, [&]<class S>() { adam_typed<S>(L, begin, end); });
}
inline void sgd_entry(const cpu::SgdLaunch& L, int64_t begin, int64_t end) {
  dispatch_dtype(L.dtype, [&]<class S>() { sgd_typed<S>(L, begin, end); });
}

inline void lion_entry(const cpu::LionLaunch& L, int64_t begin, int64_t end) {
  dispatch_dtype(L.dtype, [&]<class S>() { lion_typed<S>(L, begin, end); });
}

inline void muon_momentum_entry(const cpu::MuonLaunch& L, int64_t begin, int64_t end) {
  dispatch_dtype(L.dtype, [&]<class S>() { muon_momentum_typed<S>(L, begin, end); });
}

inline void novograd_reduce_entry(const cpu::NovoGradLaunch& L, int64_t begin, int64_t end) {
  dispatch_dtype(L.dtype, [&]<class S>() { novograd_reduce_typed<S>(L, begin, end); });
}

inline void fadam_reduce_entry(const cpu::FAdamLaunch& L, int64_t begin, int64_t end) {
  dispatch_dtype(L.dtype, [&]<class S>() { fadam_reduce_typed<S>(L, begin, end); });
}

inline void fadam_norms_entry(const cpu::FAdamLaunch& L, int64_t begin, int64_t end) {
  dispatch_dtype(L.dtype, [&]<class S>() { fadam_norms_typed<S>(L, begin, end); });
}

inline void fadam_entry(const cpu::FAdamLaunch& L, int64_t begin, int64_t end) {
  dispatch_dtype(L.dtype, [&]<class S>() { fadam_typed<S>(L, begin, end); });
}

inline void novograd_entry(const cpu::NovoGradLaunch& L, int64_t begin, int64_t end) {
  dispatch_dtype(L.dtype, [&]<class S>() { novograd_typed<S>(L, begin, end); });
}

}  // namespace ONEPASS_CAPABILITY
}  // namespace onepass
