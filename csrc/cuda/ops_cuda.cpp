// CUDA implementations of the onepass operators: argument checks and the tensor table (glue.h),
// the table's device copy (uploaded only when an address changes), the current stream, and a call
// into the framework-free kernels of optimizers.cu. Built only where CUDA torch and nvcc exist.
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "cuda/cuda_kernels.h"
#include "glue.h"

namespace onepass {
namespace {

using at::Tensor;
using glue::OptionalTensorList;
using glue::Table;

// The device copy of a bucket's table, kept per bucket (keyed by its first state buffer) and
// re-uploaded only when the table's bytes change: a new grad address, a grad that became None.
// A step captured in a CUDA graph replays with the cached copy and never copies from the host.
//
// A copy that a captured step read is never freed: the graph reads it at every replay, for as
// long as the graph lives, and this cache cannot see when that ends. Such a copy changes when a
// later step sees other grads (the capture recipe's grads are allocated inside the capture, so a
// second capture, or an eager step after one, has other addresses): the old copy moves to
// `retained_` instead of back to the allocator, whose pool (the graph's own, or one a later
// capture shares) would hand it to the next allocation: ~80 bytes a tensor per capture, on the
// device and pinned (one uploaded inside a capture also keeps that capture's memory pool from
// being released with the graph). A copy read eagerly on another stream than the one it was
// uploaded on is recorded on that stream, so that the allocator does not reuse it before that
// stream's kernels have read it.
class DeviceTables {
 public:
  cuda::DeviceTable get(const void* key, const Table& t, at::Device device,
                        cudaStream_t stream) {
    const size_t seg_bytes = t.segments.size() * sizeof(Segment);
    const size_t chunk_bytes = t.chunks.size() * sizeof(Chunk);
    const size_t step_bytes = t.stepped.size() * sizeof(int64_t);
    std::vector<char> bytes(seg_bytes + chunk_bytes + step_bytes);
    if (seg_bytes) std::memcpy(bytes.data(), t.segments.data(), seg_bytes);
    if (chunk_bytes) std::memcpy(bytes.data() + seg_bytes, t.chunks.data(), chunk_bytes);
    if (step_bytes) std::memcpy(bytes.data() + seg_bytes + chunk_bytes, t.stepped.data(), step_bytes);
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    const bool capturing = capture != cudaStreamCaptureStatusNone;

    std::lock_guard<std::mutex> lock(mutex_);
    Entry& entry = entries_[key];
    if (entry.bytes != bytes || !entry.device.defined() || entry.device.device() != device) {
      if (entries_.size() > kMaxEntries) {  // buckets were rebuilt many times
        for (auto& [unused, old] : entries_) retire(old);
        entries_.clear();
      } else {
        retire(entry);
      }
      Entry& fresh = entries_[key];
      Tensor host = at::empty({static_cast<int64_t>(std::max<size_t>(bytes.size(), 1))},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
      if (!bytes.empty()) std::memcpy(host.data_ptr(), bytes.data(), bytes.size());
      // non_blocking from pinned memory. The entry keeps `host`: a copy made inside a capture
      // reads it again at every replay.
      fresh.device = host.to(device, /*non_blocking=*/true);
      fresh.host = std::move(host);
      fresh.bytes = std::move(bytes);
      fresh.upload_stream = stream;
      fresh.captured = capturing;
      return view(fresh, t);
    }
    entry.captured = entry.captured || capturing;
    if (!capturing && stream != entry.upload_stream &&
        std::find(entry.streams.begin(), entry.streams.end(), stream) == entry.streams.end()) {
      c10::cuda::CUDACachingAllocator::recordStream(
          entry.device.storage().data_ptr(),
          c10::cuda::getCurrentCUDAStream(device.index()));
      entry.streams.push_back(stream);
    }
    return view(entry, t);
  }

 private:
  struct Entry {
    std::vector<char> bytes;
    Tensor host;    // the pinned bytes `device` was copied from
    Tensor device;  // the table the kernels read
    cudaStream_t upload_stream = nullptr;
    std::vector<cudaStream_t> streams;  // the others it was recorded on
    bool captured = false;              // a captured step read it: never freed
  };
  static constexpr size_t kMaxEntries = 4096;

  // Drops an entry's copy, unless a captured graph may read it.
  void retire(Entry& entry) {
    if (entry.captured && entry.device.defined()) {
      retained_.push_back(std::move(entry.host));
      retained_.push_back(std::move(entry.device));
    }
    entry = Entry{};
  }

  static cuda::DeviceTable view(const Entry& e, const Table& t) {
    const char* base = static_cast<const char*>(e.device.data_ptr());
    const size_t seg_bytes = t.segments.size() * sizeof(Segment);
    const size_t chunk_bytes = t.chunks.size() * sizeof(Chunk);
    return cuda::DeviceTable{reinterpret_cast<const Segment*>(base),
                             reinterpret_cast<const Chunk*>(base + seg_bytes),
                             reinterpret_cast<const int64_t*>(base + seg_bytes + chunk_bytes),
                             static_cast<int64_t>(t.chunks.size()),
                             static_cast<int64_t>(t.stepped.size())};
  }

  std::mutex mutex_;
  std::unordered_map<const void*, Entry> entries_;
  std::vector<Tensor> retained_;  // tables (and their pinned sources) captured graphs may read
};

DeviceTables& device_tables() {
  static DeviceTables tables;
  return tables;
}

// The step's device-side scalars. lr: a CPU tensor is read here (no sync: host memory); a tensor
// on the params' device (capturable) is read by the kernel at each launch or graph replay: one
// element, or a contiguous float64 block of `block_fields` (the lr and the group's other
// hyperparameters, onepass/device_hyper.h).
cuda::StepState step_state(Tensor& step, const std::optional<Tensor>& grad_scale,
                           const std::optional<Tensor>& found_inf, const Tensor& lr,
                           at::Device device, double* host_lr, int64_t block_fields) {
  glue::check_amp_scalar(grad_scale, "grad_scale", device);
  glue::check_amp_scalar(found_inf, "found_inf", device);
  const bool block = lr.numel() == block_fields && lr.numel() > 1;
  TORCH_CHECK(!block || (lr.device() == device && lr.scalar_type() == at::kDouble &&
                         lr.dim() == 1 && lr.is_contiguous()),
              "onepass: a hyperparameter block must be a contiguous float64 vector on ", device);
  TORCH_CHECK(block || (lr.numel() == 1 && (lr.device().is_cpu() || lr.device() == device) &&
                        (lr.scalar_type() == at::kFloat || lr.scalar_type() == at::kDouble)),
              "onepass: lr must be a one-element float32/float64 tensor on the CPU or on ", device,
              ", or a float64 block of ", block_fields, " hyperparameters on ", device);
  cuda::StepState s{step.data_ptr<float>(),
                    grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr,
                    found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr, nullptr,
                    false};
  if (lr.device().is_cpu()) {
    *host_lr = glue::host_scalar(lr);
  } else {
    s.lr = lr.data_ptr();
    s.lr_is_double = lr.scalar_type() == at::kDouble;
    s.lr_block = block;
  }
  return s;
}

float* master_data(const std::optional<Tensor>& master) {
  return master.has_value() ? master->data_ptr<float>() : nullptr;
}

template <class Call>
void adam_cuda(const typename Call::Params& params,
               const typename Call::Grads& grads, Tensor exp_avg,
               Tensor exp_avg_sq, const std::optional<Tensor>& max_exp_avg_sq, Tensor step,
               const Tensor& state_offsets, const std::optional<Tensor>& grad_scale,
               const std::optional<Tensor>& found_inf, const Tensor& lr, double beta1,
               double beta2, double eps, double weight_decay, double decay_coefficient,
               bool amsgrad, bool maximize, bool l2_decay,
               const std::optional<Tensor>& master_param, int64_t sr_seed) {
  const at::Device device = exp_avg.device();
  TORCH_CHECK(device.is_cuda(), "onepass: the CUDA adam_ needs CUDA state buffers");
  const c10::cuda::CUDAGuard guard(device);
  Table t = glue::build_table(params, grads, step, state_offsets, device,
                              cuda::kChunkElements, /*host_steps=*/false);
  const Layout layout = glue::check_layout(t, exp_avg, master_param, device);
  glue::check_state(exp_avg, "exp_avg", t, device, exp_avg.scalar_type());
  glue::check_state(exp_avg_sq, "exp_avg_sq", t, device, exp_avg.scalar_type());
  TORCH_CHECK(!amsgrad || max_exp_avg_sq.has_value(), "onepass: amsgrad needs max_exp_avg_sq");
  if (amsgrad) {
    glue::check_state(*max_exp_avg_sq, "max_exp_avg_sq", t, device, exp_avg.scalar_type());
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  cuda::AdamLaunch launch{};
  launch.layout = layout;
  launch.master = master_data(master_param);
  launch.table = device_tables().get(exp_avg.data_ptr(), t, device, stream);
  double host_lr = 0.0;
  launch.steps = step_state(step, grad_scale, found_inf, lr, device, &host_lr, kAdamBlock);
  launch.exp_avg = exp_avg.data_ptr();
  launch.exp_avg_sq = exp_avg_sq.data_ptr();
  launch.max_exp_avg_sq = amsgrad ? max_exp_avg_sq->data_ptr() : nullptr;
  launch.sr_seed = sr_seed;
  launch.hyper = AdamHyper{host_lr, beta1, beta2, eps, weight_decay, decay_coefficient,
                           maximize ? -1.0 : 1.0};
  launch.amsgrad = amsgrad;
  launch.l2_decay = l2_decay;
  const cudaError_t err = cuda::launch_adam(launch, stream);
  TORCH_CHECK(err == cudaSuccess, "onepass: adam_ kernel launch failed: ", cudaGetErrorString(err));
  glue::write_back(t);
}

template <class Call>
void sgd_cuda(const typename Call::Params& params,
              const typename Call::Grads& grads,
              const std::optional<Tensor>& momentum_buffer, Tensor step,
              const Tensor& state_offsets, const std::optional<Tensor>& grad_scale,
              const std::optional<Tensor>& found_inf, const Tensor& lr, double momentum,
              double dampening, double weight_decay, double decay_coefficient, bool nesterov,
              bool maximize, bool l2_decay, const std::optional<Tensor>& master_param,
              int64_t sr_seed) {
  const at::Device device = step.device();
  TORCH_CHECK(device.is_cuda(), "onepass: the CUDA sgd_ needs a CUDA step tensor");
  const c10::cuda::CUDAGuard guard(device);
  Table t = glue::build_table(params, grads, step, state_offsets, device,
                              cuda::kChunkElements, /*host_steps=*/false);
  const bool has_momentum = momentum != 0.0;
  TORCH_CHECK(!has_momentum || momentum_buffer.has_value(),
              "onepass: momentum != 0 needs momentum_buffer");
  const std::optional<Tensor> state = has_momentum ? momentum_buffer : std::nullopt;
  const Layout layout = glue::check_layout(t, state, master_param, device);
  if (has_momentum) {
    glue::check_state(*momentum_buffer, "momentum_buffer", t, device,
                      momentum_buffer->scalar_type());
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  cuda::SgdLaunch launch{};
  launch.layout = layout;
  launch.master = master_data(master_param);
  // Without momentum there is no state buffer: the step tensor keys the bucket's table.
  const void* key = has_momentum ? momentum_buffer->data_ptr() : step.data_ptr();
  launch.table = device_tables().get(key, t, device, stream);
  double host_lr = 0.0;
  launch.steps = step_state(step, grad_scale, found_inf, lr, device, &host_lr, kSgdBlock);
  launch.momentum_buffer = has_momentum ? momentum_buffer->data_ptr() : nullptr;
  launch.sr_seed = sr_seed;
  launch.hyper = SgdHyper{host_lr, momentum, dampening, weight_decay, decay_coefficient,
                          maximize ? -1.0 : 1.0};
  launch.momentum = has_momentum;
  launch.nesterov = nesterov;
  launch.l2_decay = l2_decay;
  const cudaError_t err = cuda::launch_sgd(launch, stream);
  TORCH_CHECK(err == cudaSuccess, "onepass: sgd_ kernel launch failed: ", cudaGetErrorString(err));
  glue::write_back(t);
}

template <class Call>
void lion_cuda(const typename Call::Params& params,
               const typename Call::Grads& grads, Tensor exp_avg, Tensor step,
               const Tensor& state_offsets, const std::optional<Tensor>& grad_scale,
               const std::optional<Tensor>& found_inf, const Tensor& lr, double beta1,
               double beta2, double weight_decay, double decay_coefficient, bool maximize,
               bool l2_decay, const std::optional<Tensor>& master_param, int64_t sr_seed) {
  const at::Device device = exp_avg.device();
  TORCH_CHECK(device.is_cuda(), "onepass: the CUDA lion_ needs a CUDA state buffer");
  const c10::cuda::CUDAGuard guard(device);
  Table t = glue::build_table(params, grads, step, state_offsets, device,
                              cuda::kChunkElements, /*host_steps=*/false);
  const Layout layout = glue::check_layout(t, exp_avg, master_param, device);
  glue::check_state(exp_avg, "exp_avg", t, device, exp_avg.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  cuda::LionLaunch launch{};
  launch.layout = layout;
  launch.master = master_data(master_param);
  launch.table = device_tables().get(exp_avg.data_ptr(), t, device, stream);
  double host_lr = 0.0;
  launch.steps = step_state(step, grad_scale, found_inf, lr, device, &host_lr, kLionBlock);
  launch.exp_avg = exp_avg.data_ptr();
  launch.sr_seed = sr_seed;
  launch.hyper = LionHyper{host_lr, beta1, beta2, weight_decay, decay_coefficient,
                           maximize ? -1.0 : 1.0};
  launch.l2_decay = l2_decay;
  const cudaError_t err = cuda::launch_lion(launch, stream);
  TORCH_CHECK(err == cudaSuccess, "onepass: lion_ kernel launch failed: ", cudaGetErrorString(err));
  glue::write_back(t);
}

template <class Call>
void muon_momentum_cuda(const typename Call::Params& updates,
                        const typename Call::Grads& grads, Tensor momentum_buffer,
                        Tensor step, const Tensor& state_offsets,
                        const std::optional<Tensor>& grad_scale,
                        const std::optional<Tensor>& found_inf, double momentum,
                        bool nesterov) {
  const at::Device device = momentum_buffer.device();
  TORCH_CHECK(device.is_cuda(), "onepass: the CUDA muon_momentum_ needs a CUDA state buffer");
  const c10::cuda::CUDAGuard guard(device);
  Table t = glue::build_table(updates, grads, step, state_offsets, device,
                              cuda::kChunkElements, /*host_steps=*/false);
  const Layout layout =
      glue::check_layout(t, momentum_buffer, std::nullopt, device, /*workspace=*/true);
  glue::check_state(momentum_buffer, "momentum_buffer", t, device, momentum_buffer.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  cuda::MuonLaunch launch{};
  launch.layout = layout;
  launch.table = device_tables().get(momentum_buffer.data_ptr(), t, device, stream);
  glue::check_amp_scalar(grad_scale, "grad_scale", device);
  glue::check_amp_scalar(found_inf, "found_inf", device);
  launch.steps = cuda::StepState{step.data_ptr<float>(),
                                 grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr,
                                 found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr,
                                 /*lr=*/nullptr, false};  // the pass takes no lr
  launch.momentum_buffer = momentum_buffer.data_ptr();
  launch.hyper = MuonHyper{momentum, 1.0};
  launch.nesterov = nesterov;
  const cudaError_t err = cuda::launch_muon_momentum(launch, stream);
  TORCH_CHECK(err == cudaSuccess, "onepass: muon_momentum_ kernel launch failed: ",
              cudaGetErrorString(err));
  glue::write_back(t);
}

template <class Call>
void novograd_cuda(const typename Call::Params& params,
                   const typename Call::Grads& grads, Tensor exp_avg, Tensor exp_avg_sq,
                   const std::optional<Tensor>& max_exp_avg_sq, Tensor step,
                   const Tensor& state_offsets, const std::optional<Tensor>& grad_scale,
                   const std::optional<Tensor>& found_inf, const Tensor& lr, double beta1,
                   double beta2, double eps, double weight_decay, bool grad_averaging,
                   bool amsgrad, bool maximize, const std::optional<Tensor>& master_param,
                   int64_t sr_seed) {
  const at::Device device = exp_avg.device();
  TORCH_CHECK(device.is_cuda(), "onepass: the CUDA novograd_ needs CUDA state buffers");
  const c10::cuda::CUDAGuard guard(device);
  Table t = glue::build_table(params, grads, step, state_offsets, device,
                              cuda::kChunkElements, /*host_steps=*/false);
  const Layout layout = glue::check_layout(t, exp_avg, master_param, device);
  glue::check_state(exp_avg, "exp_avg", t, device, exp_avg.scalar_type());
  const int64_t n = glue::param_count(params);
  glue::check_scalar_state(exp_avg_sq, "exp_avg_sq", t, n, device);
  TORCH_CHECK(!amsgrad || max_exp_avg_sq.has_value(), "onepass: amsgrad needs max_exp_avg_sq");
  if (amsgrad) glue::check_scalar_state(*max_exp_avg_sq, "max_exp_avg_sq", t, n, device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  cuda::NovoGradLaunch launch{};
  launch.layout = layout;
  launch.master = master_data(master_param);
  launch.table = device_tables().get(exp_avg.data_ptr(), t, device, stream);
  double host_lr = 0.0;
  launch.steps = step_state(step, grad_scale, found_inf, lr, device, &host_lr, kNovoGradBlock);
  launch.exp_avg = exp_avg.data_ptr();
  launch.exp_avg_sq = exp_avg_sq.data_ptr();
  launch.max_exp_avg_sq = amsgrad ? max_exp_avg_sq->data_ptr() : nullptr;
  // Device scratch for the per-chunk partial sums and the per-segment denominators (the caching
  // allocator's, stream-ordered: freed when this call returns, reused only after the kernels).
  const int64_t num_chunks = static_cast<int64_t>(t.chunks.size());
  launch.num_segments = static_cast<int64_t>(t.segments.size());
  Tensor scratch = at::empty({std::max<int64_t>(num_chunks + launch.num_segments, 1)},
                             exp_avg.options().dtype(at::kDouble));
  launch.partial_sums = scratch.data_ptr<double>();
  launch.denoms = launch.partial_sums + num_chunks;
  launch.sr_seed = sr_seed;
  launch.hyper = NovoGradHyper{host_lr, beta1, beta2, eps, weight_decay, maximize ? -1.0 : 1.0,
                               grad_averaging};
  launch.amsgrad = amsgrad;
  const cudaError_t err = cuda::launch_novograd(launch, stream);
  TORCH_CHECK(err == cudaSuccess, "onepass: novograd_ kernel launch failed: ",
              cudaGetErrorString(err));
  glue::write_back(t);
}

template <class Call>
void fadam_cuda(const typename Call::Params& params,
                const typename Call::Grads& grads, Tensor fim, Tensor momentum,
                Tensor step, const Tensor& state_offsets, const std::optional<Tensor>& grad_scale,
                const std::optional<Tensor>& found_inf, const Tensor& lr, double beta1,
                double beta2, double eps, double clip, double p, double weight_decay,
                bool maximize, const std::optional<Tensor>& master_param, int64_t sr_seed) {
  const at::Device device = fim.device();
  TORCH_CHECK(device.is_cuda(), "onepass: the CUDA fadam_ needs CUDA state buffers");
  const c10::cuda::CUDAGuard guard(device);
  Table t = glue::build_table(params, grads, step, state_offsets, device,
                              cuda::kChunkElements, /*host_steps=*/false);
  const Layout layout = glue::check_layout(t, fim, master_param, device);
  glue::check_state(fim, "fim", t, device, fim.scalar_type());
  glue::check_state(momentum, "momentum", t, device, fim.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  cuda::FAdamLaunch launch{};
  launch.layout = layout;
  launch.master = master_data(master_param);
  launch.table = device_tables().get(fim.data_ptr(), t, device, stream);
  double host_lr = 0.0;
  launch.steps = step_state(step, grad_scale, found_inf, lr, device, &host_lr, kFAdamBlock);
  launch.fim = fim.data_ptr();
  launch.momentum = momentum.data_ptr();
  // Device scratch (the caching allocator's, stream-ordered): two partial sums per chunk, three
  // scalars per segment.
  const int64_t num_chunks = static_cast<int64_t>(t.chunks.size());
  launch.num_segments = static_cast<int64_t>(t.segments.size());
  Tensor scratch = at::empty({std::max<int64_t>(2 * num_chunks + 3 * launch.num_segments, 1)},
                             fim.options().dtype(at::kDouble));
  launch.partial_sums = scratch.data_ptr<double>();
  launch.eps_t = launch.partial_sums + 2 * num_chunks;
  launch.gn_divisor = launch.eps_t + launch.num_segments;
  launch.wn_divisor = launch.gn_divisor + launch.num_segments;
  launch.sr_seed = sr_seed;
  launch.hyper = FAdamHyper{host_lr, beta1, beta2, eps, clip, p, weight_decay,
                            maximize ? -1.0 : 1.0};
  const cudaError_t err = cuda::launch_fadam(launch, stream);
  TORCH_CHECK(err == cudaSuccess, "onepass: fadam_ kernel launch failed: ",
              cudaGetErrorString(err));
  glue::write_back(t);
}

}  // namespace
}  // namespace onepass

namespace {
const bool kCudaEagerRegistered = [] {
  onepass::glue::EagerOps& ops = onepass::glue::eager_ops(c10::DeviceType::CUDA);
  ops.adam = &onepass::adam_cuda<onepass::glue::Eager>;
  ops.sgd = &onepass::sgd_cuda<onepass::glue::Eager>;
  ops.lion = &onepass::lion_cuda<onepass::glue::Eager>;
  ops.muon_momentum = &onepass::muon_momentum_cuda<onepass::glue::Eager>;
  ops.novograd = &onepass::novograd_cuda<onepass::glue::Eager>;
  ops.fadam = &onepass::fadam_cuda<onepass::glue::Eager>;
  return true;
}();
}  // namespace

TORCH_LIBRARY_IMPL(onepass, CUDA, m) {
  m.impl("adam_", &onepass::adam_cuda<onepass::glue::Dispatched>);
  m.impl("sgd_", &onepass::sgd_cuda<onepass::glue::Dispatched>);
  m.impl("lion_", &onepass::lion_cuda<onepass::glue::Dispatched>);
  m.impl("muon_momentum_", &onepass::muon_momentum_cuda<onepass::glue::Dispatched>);
  m.impl("novograd_", &onepass::novograd_cuda<onepass::glue::Dispatched>);
  m.impl("fadam_", &onepass::fadam_cuda<onepass::glue::Dispatched>);
}
