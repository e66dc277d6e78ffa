// CUDA kernels of Adam/AdamW, SGD/SGDW, Lion, Muon's momentum, NovoGrad and FAdam: the
// tensor-table walk of multi_tensor.cuh around the per-element math of onepass/math.h. The
// elementwise kernels are templates over the storage layout (LayoutTypes, onepass/dtypes.h),
// dispatched on the host with dispatch_layout; the reductions that read only the gradients over
// the gradient's storage type. Includes only CUDA and csrc/include headers (no torch), so `nvcc -c`
// compile-checks it on a machine with no GPU.
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

template <class T, bool kAmsgrad, bool kL2Decay>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>) adam_kernel(AdamLaunch L) {
  using O = typename T::O;
  if (skip_step(L.steps)) return;
  const Chunk chunk = L.table.chunks[blockIdx.x];
  const Segment seg = L.table.segments[chunk.segment];
  __shared__ AdamConsts<O> shared_consts;
  if (threadIdx.x == 0) {
    const AdamHyper h = step_hyper(L.hyper, L.steps);
    shared_consts = AdamConsts<O>::make(h, double(L.steps.step[seg.index]) + 1.0);
  }
  __syncthreads();
  const AdamConsts<O> c = shared_consts;
  constexpr int kSlots = kAmsgrad ? 3 : 2;
  void* const slots[3] = {L.exp_avg, L.exp_avg_sq, L.max_exp_avg_sq};
  for_each_element<T, kSlots>(
      chunk_streams<T, kSlots>(seg, chunk, L.master, slots), chunk.end - chunk.begin,
      [&](O& p, O g, O* s) {
        if constexpr (kAmsgrad) {
          adam_update<true, kL2Decay>(p, g, s[0], s[1], s[2], c);
        } else {
          O no_max = s[1];
          adam_update<false, kL2Decay>(p, g, s[0], s[1], no_max, c);
        }
      },
      StoreRounding{seg.state_offset + chunk.begin, L.sr_seed});
}

template <class T, bool kMomentum, bool kNesterov, bool kFirst, bool kL2Decay>
__device__ __forceinline__ void sgd_chunk(const SgdLaunch& L, const Chunk& chunk,
                                          const Segment& seg,
                                          const SgdConsts<typename T::O>& c) {
  using O = typename T::O;
  constexpr int kSlots = kMomentum ? 1 : 0;
  void* const slots[1] = {L.momentum_buffer};
  for_each_element<T, kSlots>(
      chunk_streams<T, kSlots>(seg, chunk, L.master, slots), chunk.end - chunk.begin,
      [&](O& p, O g, O* s) { sgd_update<kMomentum, kNesterov, kFirst, kL2Decay>(p, g, s[0], c); },
      StoreRounding{seg.state_offset + chunk.begin, L.sr_seed});
}

template <class T, bool kL2Decay>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>) sgd_kernel(SgdLaunch L) {
  using O = typename T::O;
  if (skip_step(L.steps)) return;
  const Chunk chunk = L.table.chunks[blockIdx.x];
  const Segment seg = L.table.segments[chunk.segment];
  const SgdHyper h = step_hyper(L.hyper, L.steps);
  const SgdConsts<O> c = SgdConsts<O>::make(h);
  if (!L.momentum) {
    sgd_chunk<T, false, false, false, kL2Decay>(L, chunk, seg, c);
    return;
  }
  // A tensor's first step with momentum starts its buffer from the gradient (torch.optim.SGD).
  const bool first = L.steps.step[seg.index] == 0.0f;
  if (L.nesterov) {
    first ? sgd_chunk<T, true, true, true, kL2Decay>(L, chunk, seg, c)
          : sgd_chunk<T, true, true, false, kL2Decay>(L, chunk, seg, c);
  } else {
    first ? sgd_chunk<T, true, false, true, kL2Decay>(L, chunk, seg, c)
          : sgd_chunk<T, true, false, false, kL2Decay>(L, chunk, seg, c);
  }
}

template <class T, bool kL2Decay>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>) lion_kernel(LionLaunch L) {
  using O = typename T::O;
  if (skip_step(L.steps)) return;
  const Chunk chunk = L.table.chunks[blockIdx.x];
  const Segment seg = L.table.segments[chunk.segment];
  const LionHyper h = step_hyper(L.hyper, L.steps);
  const LionConsts<O> c = LionConsts<O>::make(h);  // no per-tensor scalars: no shared memory
  void* const slots[1] = {L.exp_avg};
  for_each_element<T, 1>(chunk_streams<T, 1>(seg, chunk, L.master, slots),
                         chunk.end - chunk.begin,
                         [&](O& p, O g, O* s) { lion_update<kL2Decay>(p, g, s[0], c); },
                         StoreRounding{seg.state_offset + chunk.begin, L.sr_seed});
}

template <class T, bool kNesterov>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>) muon_momentum_kernel(MuonLaunch L) {
  using O = typename T::O;
  if (skip_step(L.steps)) return;
  const Chunk chunk = L.table.chunks[blockIdx.x];
  const Segment seg = L.table.segments[chunk.segment];
  const MuonHyper h = step_hyper(L.hyper, L.steps);
  const MuonConsts<O> c = MuonConsts<O>::make(h);
  void* const slots[1] = {L.momentum_buffer};
  // The update workspace rides in the param's place (see MuonLaunch): written, never read.
  for_each_element<T, 1, /*kParamWriteOnly=*/true>(
      chunk_streams<T, 1>(seg, chunk, nullptr, slots), chunk.end - chunk.begin,
      [&](O& u, O g, O* s) { muon_momentum<kNesterov>(u, g, s[0], c); });
}

// Reduces two doubles over the block in a fixed tree order; thread 0 holds the sums.
__device__ __forceinline__ void block_sum2(double& a, double& b) {
  __shared__ double pa[kThreads], pb[kThreads];
  pa[threadIdx.x] = a;
  pb[threadIdx.x] = b;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (int(threadIdx.x) < width) {
      pa[threadIdx.x] += pa[threadIdx.x + width];
      pb[threadIdx.x] += pb[threadIdx.x + width];
    }
    __syncthreads();
  }
  a = pa[0];
  b = pb[0];
}

// The first chunk of segment k (chunks are sorted by segment).
__device__ __forceinline__ int64_t first_chunk(const DeviceTable& table, int64_t k) {
  int64_t lo = 0, hi = table.num_chunks;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (table.chunks[mid].segment < k) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// The per-tensor passes give each tensor one warp (kWarp lanes of a block): a warp-uniform
// index, so whole warps leave together and every lane reaches the shuffles.
constexpr int kWarp = 32;

__device__ __forceinline__ int64_t warp_index() {
  return (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
}

// Blocks of kThreads threads for one warp per item.
inline unsigned warp_blocks(int64_t items) {
  return unsigned((items * kWarp + kThreads - 1) / kThreads);
}

// The sums of segment k's chunk partials (`stride` doubles a chunk: `a` sums the first, `b` the
// second when stride is 2) by one warp: a lane-strided share each, then a fixed shuffle tree;
// lane 0 holds the sums. One thread summing a tensor's partials alone took a millisecond on a
// tensor of 2^26 elements (4,096 partials, GPU run 5); a block a tensor would idle most of its
// threads on many small tensors.
__device__ __forceinline__ void warp_segment_sums(const DeviceTable& table,
                                                  const double* partials, int stride, int64_t k,
                                                  double& a, double& b) {
  const int lane = int(threadIdx.x % kWarp);
  const int64_t end = first_chunk(table, k + 1);
  a = 0.0;
  b = 0.0;
  for (int64_t c = first_chunk(table, k) + lane; c < end; c += kWarp) {
    a += partials[stride * c];
    if (stride > 1) b += partials[stride * c + 1];
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    a += __shfl_down_sync(0xffffffffu, a, offset);
    b += __shfl_down_sync(0xffffffffu, b, offset);
  }
}

// NovoGrad pass 1: the chunk's sum of squares in double, reduced in a fixed tree order. Reads the
// gradients only: a template over their storage type G.
template <class G>
__global__ void __launch_bounds__(kThreads) novograd_reduce_kernel(NovoGradLaunch L) {
  if (skip_step(L.steps)) return;
  const Chunk chunk = L.table.chunks[blockIdx.x];
  const G* grad = static_cast<const G*>(L.table.segments[chunk.segment].grad) + chunk.begin;
  const int64_t n = chunk.end - chunk.begin;
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double x = double(to_opmath(grad[i]));
    acc += x * x;
  }
  __shared__ double partial[kThreads];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (int(threadIdx.x) < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) L.partial_sums[blockIdx.x] = partial[0];
}

// NovoGrad pass 2: one warp per tensor with a grad (zero-size ones too: their v decays).
// Segments are sorted by bucket index and chunks by segment (glue::build_table), so both are
// found by binary search in the device table: no extra upload.
template <class V>
__global__ void __launch_bounds__(kThreads) novograd_scalar_kernel(NovoGradLaunch L) {
  if (skip_step(L.steps)) return;
  const int64_t i = warp_index();
  if (i >= L.table.num_stepped) return;  // the whole warp
  const int64_t b = L.table.stepped[i];
  int64_t lo = 0, hi = L.num_segments;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (L.table.segments[mid].index < b) lo = mid + 1; else hi = mid;
  }
  const bool has_segment = lo < L.num_segments && L.table.segments[lo].index == b;
  double sum = 0.0, unused = 0.0;
  if (has_segment) warp_segment_sums(L.table, L.partial_sums, 1, lo, sum, unused);
  if (threadIdx.x % kWarp != 0) return;
  const NovoGradHyper h = step_hyper(L.hyper, L.steps);
  V* v = static_cast<V*>(L.exp_avg_sq);
  V* v_max = L.amsgrad ? static_cast<V*>(L.max_exp_avg_sq) + b : nullptr;
  const double denom = novograd_second_moment<V>(sum, double(L.steps.step[b]) + 1.0, h,
                                                 L.amsgrad, v[b], v_max);
  if (has_segment) L.denoms[lo] = denom;
}

// NovoGrad pass 3: the elementwise update with the tensor's denominator.
template <class T, bool kFirst>
__device__ __forceinline__ void novograd_chunk(const NovoGradLaunch& L, const Chunk& chunk,
                                               const Segment& seg,
                                               const NovoGradConsts<typename T::O>& c) {
  using O = typename T::O;
  void* const slots[1] = {L.exp_avg};
  for_each_element<T, 1>(chunk_streams<T, 1>(seg, chunk, L.master, slots),
                         chunk.end - chunk.begin,
                         [&](O& p, O g, O* s) { novograd_update<kFirst>(p, g, s[0], c); },
                         StoreRounding{seg.state_offset + chunk.begin, L.sr_seed});
}

template <class T>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>) novograd_kernel(NovoGradLaunch L) {
  using O = typename T::O;
  if (skip_step(L.steps)) return;
  const Chunk chunk = L.table.chunks[blockIdx.x];
  const Segment seg = L.table.segments[chunk.segment];
  const NovoGradHyper h = step_hyper(L.hyper, L.steps);
  const NovoGradConsts<O> c = NovoGradConsts<O>::make(h, L.denoms[chunk.segment]);
  // The step counts advance after this kernel: 0 here is the tensor's first step.
  L.steps.step[seg.index] == 0.0f ? novograd_chunk<T, true>(L, chunk, seg, c)
                                  : novograd_chunk<T, false>(L, chunk, seg, c);
}

__device__ __forceinline__ FAdamHyper fadam_hyper(const FAdamLaunch& L) {
  const FAdamHyper h = step_hyper(L.hyper, L.steps);
  return h;
}

// Pass 1: the chunk's sum of raw g^2 (the gradients only: a template over their storage type G).
template <class G>
__global__ void __launch_bounds__(kThreads) fadam_reduce_kernel(FAdamLaunch L) {
  if (skip_step(L.steps)) return;
  const Chunk chunk = L.table.chunks[blockIdx.x];
  const G* grad = static_cast<const G*>(L.table.segments[chunk.segment].grad) + chunk.begin;
  const int64_t n = chunk.end - chunk.begin;
  double acc = 0.0, unused = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double x = double(to_opmath(grad[i]));
    acc += x * x;
  }
  block_sum2(acc, unused);
  if (threadIdx.x == 0) {
    // The second sum is pass 2's; pass 1 -> 2 reads both (one pair a chunk), so write it too.
    L.partial_sums[2 * blockIdx.x] = acc;
    L.partial_sums[2 * blockIdx.x + 1] = 0.0;
  }
}

// Pass 1 -> 2 (kClip false): eps_t per segment; pass 2 -> 3 (kClip true): the clip divisors.
// One warp per segment.
template <bool kClip>
__global__ void __launch_bounds__(kThreads) fadam_scalar_kernel(FAdamLaunch L) {
  if (skip_step(L.steps)) return;
  const int64_t k = warp_index();
  if (k >= L.num_segments) return;  // the whole warp
  double a, b;
  warp_segment_sums(L.table, L.partial_sums, 2, k, a, b);
  if (threadIdx.x % kWarp != 0) return;
  const int64_t numel = L.table.segments[k].numel;
  if constexpr (kClip) {
    L.gn_divisor[k] = fadam_clip_divisor(a, numel, L.hyper.clip);
    L.wn_divisor[k] = fadam_clip_divisor(b, numel, L.hyper.clip);
  } else {
    L.eps_t[k] = fadam_eps_t(a, numel, fadam_hyper(L));
    L.gn_divisor[k] = 1.0;
    L.wn_divisor[k] = 1.0;
  }
}

template <class O>
__device__ __forceinline__ FAdamConsts<O> fadam_consts(const FAdamLaunch& L, int64_t k) {
  const Segment& seg = L.table.segments[k];
  // The step counts advance after the last kernel: t is the stored count + 1.
  return FAdamConsts<O>::make(fadam_hyper(L), double(L.steps.step[seg.index]) + 1.0, L.eps_t[k],
                              L.gn_divisor[k], L.wn_divisor[k]);
}

// Pass 2: the chunk's sums of gn^2 and wn^2 with the tensor's new den. With master weights the
// weights are the master's (what the update reads), not the rounded param.
template <class T>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>) fadam_norms_kernel(FAdamLaunch L) {
  using O = typename T::O;
  if (skip_step(L.steps)) return;
  const Chunk chunk = L.table.chunks[blockIdx.x];
  const Segment seg = L.table.segments[chunk.segment];
  const FAdamConsts<O> c = fadam_consts<O>(L, chunk.segment);
  void* const slots[1] = {L.fim};
  const Streams<T, 1> io = chunk_streams<T, 1>(seg, chunk, L.master, slots);
  const int64_t n = chunk.end - chunk.begin;
  double gn_sq = 0.0, wn_sq = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    O p;
    if constexpr (T::kMaster) {
      p = io.master[i];
    } else {
      p = to_opmath(io.param[i]);
    }
    O gn, wn;
    fadam_norms<O>(p, to_opmath(io.grad[i]), to_opmath(io.state[0][i]), c, gn, wn);
    gn_sq += double(gn) * double(gn);
    wn_sq += double(wn) * double(wn);
  }
  block_sum2(gn_sq, wn_sq);
  if (threadIdx.x == 0) {
    L.partial_sums[2 * blockIdx.x] = gn_sq;
    L.partial_sums[2 * blockIdx.x + 1] = wn_sq;
  }
}

// Pass 3: F, momentum and the param.
template <class T>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>) fadam_kernel(FAdamLaunch L) {
  using O = typename T::O;
  if (skip_step(L.steps)) return;
  const Chunk chunk = L.table.chunks[blockIdx.x];
  const Segment seg = L.table.segments[chunk.segment];
  const FAdamConsts<O> c = fadam_consts<O>(L, chunk.segment);
  void* const slots[2] = {L.fim, L.momentum};
  for_each_element<T, 2>(chunk_streams<T, 2>(seg, chunk, L.master, slots),
                         chunk.end - chunk.begin,
                         [&](O& p, O g, O* s) { fadam_update<O>(p, g, s[0], s[1], c); },
                         StoreRounding{seg.state_offset + chunk.begin, L.sr_seed});
}

// Calls fn.template operator()<X>() for the storage type X of `dtype` (the reductions, which
// read the gradients only).
template <class Fn>
void dispatch_dtype(DType dtype, const Fn& fn) {
  switch (dtype) {
    case DType::kFloat32: fn.template operator()<float>(); break;
    case DType::kFloat64: fn.template operator()<double>(); break;
    case DType::kBFloat16: fn.template operator()<bf16_t>(); break;
    case DType::kFloat16: fn.template operator()<half_t>(); break;
  }
}

// Whether the kernels are built for `layout` (the glue refuses the others: glue::check_layout).
bool built_for(const Layout& layout) {
  return dispatch_layout(layout, [&]<class T>() {});
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

// A launch with a layout the kernels are not built for launches nothing and returns
// cudaErrorInvalidValue (the glue refuses it first: glue::check_layout).
cudaError_t launch_adam(const AdamLaunch& L, cudaStream_t stream) {
  if (!built_for(L.layout)) return cudaErrorInvalidValue;
  if (L.table.num_chunks > 0) {
    const dim3 grid(static_cast<unsigned>(L.table.num_chunks));
    dispatch_layout(L.layout, [&]<class T>() {
      if (L.amsgrad) {
        L.l2_decay ? adam_kernel<T, true, true><<<grid, kThreads, 0, stream>>>(L)
                   : adam_kernel<T, true, false><<<grid, kThreads, 0, stream>>>(L);
      } else {
        L.l2_decay ? adam_kernel<T, false, true><<<grid, kThreads, 0, stream>>>(L)
                   : adam_kernel<T, false, false><<<grid, kThreads, 0, stream>>>(L);
      }
    });
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return finish(L.table, L.steps, stream);
}

cudaError_t launch_sgd(const SgdLaunch& L, cudaStream_t stream) {
  if (!built_for(L.layout)) return cudaErrorInvalidValue;
  if (L.table.num_chunks > 0) {
    const dim3 grid(static_cast<unsigned>(L.table.num_chunks));
    dispatch_layout(L.layout, [&]<class T>() {
      L.l2_decay ? sgd_kernel<T, true><<<grid, kThreads, 0, stream>>>(L)
                 : sgd_kernel<T, false><<<grid, kThreads, 0, stream>>>(L);
    });
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return finish(L.table, L.steps, stream);
}

cudaError_t launch_lion(const LionLaunch& L, cudaStream_t stream) {
  if (!built_for(L.layout)) return cudaErrorInvalidValue;
  if (L.table.num_chunks > 0) {
    const dim3 grid(static_cast<unsigned>(L.table.num_chunks));
    dispatch_layout(L.layout, [&]<class T>() {
      L.l2_decay ? lion_kernel<T, true><<<grid, kThreads, 0, stream>>>(L)
                 : lion_kernel<T, false><<<grid, kThreads, 0, stream>>>(L);
    });
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return finish(L.table, L.steps, stream);
}

cudaError_t launch_muon_momentum(const MuonLaunch& L, cudaStream_t stream) {
  // The update workspace has no master weights.
  if (L.layout.master || !built_for(L.layout)) return cudaErrorInvalidValue;
  if (L.table.num_chunks > 0) {
    const dim3 grid(static_cast<unsigned>(L.table.num_chunks));
    dispatch_layout(L.layout, [&]<class T>() {
      if constexpr (!T::kMaster) {
        L.nesterov ? muon_momentum_kernel<T, true><<<grid, kThreads, 0, stream>>>(L)
                   : muon_momentum_kernel<T, false><<<grid, kThreads, 0, stream>>>(L);
      }
    });
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return finish(L.table, L.steps, stream);
}

cudaError_t launch_novograd(const NovoGradLaunch& L, cudaStream_t stream) {
  if (!built_for(L.layout)) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(L.table.num_chunks));
  if (L.table.num_chunks > 0) {
    dispatch_dtype(L.layout.grad, [&]<class G>() {
      novograd_reduce_kernel<G><<<grid, kThreads, 0, stream>>>(L);
    });
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (L.table.num_stepped > 0) {
    const dim3 tensors(warp_blocks(L.table.num_stepped));
    // The per-tensor second moment: float, double for float64 params (glue::check_scalar_state).
    L.layout.param == DType::kFloat64
        ? novograd_scalar_kernel<double><<<tensors, kThreads, 0, stream>>>(L)
        : novograd_scalar_kernel<float><<<tensors, kThreads, 0, stream>>>(L);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (L.table.num_chunks > 0) {
    dispatch_layout(L.layout, [&]<class T>() {
      novograd_kernel<T><<<grid, kThreads, 0, stream>>>(L);
    });
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return finish(L.table, L.steps, stream);
}

cudaError_t launch_fadam(const FAdamLaunch& L, cudaStream_t stream) {
  if (!built_for(L.layout)) return cudaErrorInvalidValue;
  if (L.table.num_chunks > 0) {
    const dim3 grid(static_cast<unsigned>(L.table.num_chunks));
    const dim3 segments(warp_blocks(L.num_segments));
    cudaError_t err = cudaSuccess;
    dispatch_dtype(L.layout.grad, [&]<class G>() {
      fadam_reduce_kernel<G><<<grid, kThreads, 0, stream>>>(L);
    });
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    fadam_scalar_kernel<false><<<segments, kThreads, 0, stream>>>(L);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    dispatch_layout(L.layout, [&]<class T>() {
      fadam_norms_kernel<T><<<grid, kThreads, 0, stream>>>(L);
    });
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    fadam_scalar_kernel<true><<<segments, kThreads, 0, stream>>>(L);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    dispatch_layout(L.layout, [&]<class T>() {
      fadam_kernel<T><<<grid, kThreads, 0, stream>>>(L);
    });
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return finish(L.table, L.steps, stream);
}

}  // namespace onepass::cuda
