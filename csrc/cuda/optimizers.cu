// CUDA kernels of Adam/AdamW, SGD/SGDW and Lion: the tensor-table walk of multi_tensor.cuh around the
// per-element math of onepass/math.h. Includes only CUDA and csrc/include headers (no torch), so
// `nvcc -c` compile-checks it on a machine with no GPU.
#include "multi_tensor.cuh"

namespace onepass::cuda {

__global__ void advance_steps(StepState s, const int64_t* stepped, int64_t n) {
  if (skip_step(s)) return;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    s.step[stepped[i]] += 1.0f;
  }
}

namespace {

template <class S, bool kAmsgrad, bool kL2Decay>
__global__ void __launch_bounds__(kThreads) adam_kernel(AdamLaunch L) {
  using O = opmath_t<S>;
  if (skip_step(L.steps)) return;
  const Chunk chunk = L.table.chunks[blockIdx.x];
  const Segment seg = L.table.segments[chunk.segment];
  __shared__ AdamConsts<O> shared_consts;
  if (threadIdx.x == 0) {
    AdamHyper h = L.hyper;
    h.lr = step_lr(h.lr, L.steps);
    h.grad_scale = grad_multiplier(h.grad_scale, L.steps);
    shared_consts = AdamConsts<O>::make(h, double(L.steps.step[seg.index]) + 1.0);
  }
  __syncthreads();
  const AdamConsts<O> c = shared_consts;
  const int64_t at = seg.state_offset + chunk.begin;
  S* const state[3] = {static_cast<S*>(L.exp_avg) + at, static_cast<S*>(L.exp_avg_sq) + at,
                       kAmsgrad ? static_cast<S*>(L.max_exp_avg_sq) + at : nullptr};
  for_each_element<S, kAmsgrad ? 3 : 2>(
      static_cast<S*>(seg.param) + chunk.begin, static_cast<const S*>(seg.grad) + chunk.begin,
      state, chunk.end - chunk.begin, [&](O& p, O g, O* s) {
        if constexpr (kAmsgrad) {
          adam_update<true, kL2Decay>(p, g, s[0], s[1], s[2], c);
        } else {
          O no_max = s[1];
          adam_update<false, kL2Decay>(p, g, s[0], s[1], no_max, c);
        }
      });
}

template <class S, bool kMomentum, bool kNesterov, bool kFirst, bool kL2Decay>
__device__ __forceinline__ void sgd_chunk(const SgdLaunch& L, const Chunk& chunk,
                                          const Segment& seg, const SgdConsts<opmath_t<S>>& c) {
  using O = opmath_t<S>;
  S* const state[1] = {kMomentum ? static_cast<S*>(L.momentum_buffer) + seg.state_offset +
                                       chunk.begin
                                 : nullptr};
  for_each_element<S, kMomentum ? 1 : 0>(
      static_cast<S*>(seg.param) + chunk.begin, static_cast<const S*>(seg.grad) + chunk.begin,
      state, chunk.end - chunk.begin,
      [&](O& p, O g, O* s) { sgd_update<kMomentum, kNesterov, kFirst, kL2Decay>(p, g, s[0], c); });
}

template <class S, bool kL2Decay>
__global__ void __launch_bounds__(kThreads) sgd_kernel(SgdLaunch L) {
  using O = opmath_t<S>;
  if (skip_step(L.steps)) return;
  const Chunk chunk = L.table.chunks[blockIdx.x];
  const Segment seg = L.table.segments[chunk.segment];
  SgdHyper h = L.hyper;
  h.lr = step_lr(h.lr, L.steps);
  h.grad_scale = grad_multiplier(h.grad_scale, L.steps);
  const SgdConsts<O> c = SgdConsts<O>::make(h);
  if (!L.momentum) {
    sgd_chunk<S, false, false, false, kL2Decay>(L, chunk, seg, c);
    return;
  }
  // A tensor's first step with momentum starts its buffer from the gradient (torch.optim.SGD).
  const bool first = L.steps.step[seg.index] == 0.0f;
  if (L.nesterov) {
    first ? sgd_chunk<S, true, true, true, kL2Decay>(L, chunk, seg, c)
          : sgd_chunk<S, true, true, false, kL2Decay>(L, chunk, seg, c);
  } else {
    first ? sgd_chunk<S, true, false, true, kL2Decay>(L, chunk, seg, c)
          : sgd_chunk<S, true, false, false, kL2Decay>(L, chunk, seg, c);
  }
}

template <class S, bool kL2Decay>
__global__ void __launch_bounds__(kThreads) lion_kernel(LionLaunch L) {
  using O = opmath_t<S>;
  if (skip_step(L.steps)) return;
  const Chunk chunk = L.table.chunks[blockIdx.x];
  const Segment seg = L.table.segments[chunk.segment];
  LionHyper h = L.hyper;
  h.lr = step_lr(h.lr, L.steps);
  h.grad_scale = grad_multiplier(h.grad_scale, L.steps);
  const LionConsts<O> c = LionConsts<O>::make(h);  // no per-tensor scalars: no shared memory
  S* const state[1] = {static_cast<S*>(L.exp_avg) + seg.state_offset + chunk.begin};
  for_each_element<S, 1>(static_cast<S*>(seg.param) + chunk.begin,
                         static_cast<const S*>(seg.grad) + chunk.begin, state,
                         chunk.end - chunk.begin,
                         [&](O& p, O g, O* s) { lion_update<kL2Decay>(p, g, s[0], c); });
}

template <class Fn>
void dispatch_dtype(DType dtype, const Fn& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kFloat64: fn(double{}); break;
    case DType::kBFloat16: fn(bf16_t{}); break;
    case DType::kFloat16: fn(half_t{}); break;
  }
}

cudaError_t finish(const DeviceTable& table, const StepState& steps, cudaStream_t stream) {
  if (table.num_stepped > 0) {
    const int blocks = int((table.num_stepped + kThreads - 1) / kThreads);
    advance_steps<<<blocks < 1024 ? blocks : 1024, kThreads, 0, stream>>>(steps, table.stepped,
                                                                          table.num_stepped);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_adam(const AdamLaunch& L, cudaStream_t stream) {
  if (L.table.num_chunks > 0) {
    const dim3 grid(static_cast<unsigned>(L.table.num_chunks));
    dispatch_dtype(L.dtype, [&](auto tag) {
      using S = decltype(tag);
      if (L.amsgrad) {
        L.l2_decay ? adam_kernel<S, true, true><<<grid, kThreads, 0, stream>>>(L)
                   : adam_kernel<S, true, false><<<grid, kThreads, 0, stream>>>(L);
      } else {
        L.l2_decay ? adam_kernel<S, false, true><<<grid, kThreads, 0, stream>>>(L)
                   : adam_kernel<S, false, false><<<grid, kThreads, 0, stream>>>(L);
      }
    });
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return finish(L.table, L.steps, stream);
}

cudaError_t launch_sgd(const SgdLaunch& L, cudaStream_t stream) {
  if (L.table.num_chunks > 0) {
    const dim3 grid(static_cast<unsigned>(L.table.num_chunks));
    dispatch_dtype(L.dtype, [&](auto tag) {
      using S = decltype(tag);
      L.l2_decay ? sgd_kernel<S, true><<<grid, kThreads, 0, stream>>>(L)
                 : sgd_kernel<S, false><<<grid, kThreads, 0, stream>>>(L);
    });
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return finish(L.table, L.steps, stream);
}

cudaError_t launch_lion(const LionLaunch& L, cudaStream_t stream) {
  if (L.table.num_chunks > 0) {
    const dim3 grid(static_cast<unsigned>(L.table.num_chunks));
    dispatch_dtype(L.dtype, [&](auto tag) {
      using S = decltype(tag);
      L.l2_decay ? lion_kernel<S, true><<<grid, kThreads, 0, stream>>>(L)
                 : lion_kernel<S, false><<<grid, kThreads, 0, stream>>>(L);
    });
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return finish(L.table, L.steps, stream);
}

}  // namespace onepass::cuda
