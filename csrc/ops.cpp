// The torch side of onepass: operator schemas (TORCH_LIBRARY) and their CPU implementations.
// All torch work happens here: argument checks, contiguity, the tensor table and the thread pool.
// The kernels under csrc/cpu see plain pointers (csrc/cpu/cpu_kernels.h). CUDA implementations
// register themselves from a separate file, built only where CUDA is available.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <pybind11/stl.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <iterator>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "glue.h"
#include "onepass/device_hyper.h"

namespace onepass {
namespace {

using at::Tensor;
using glue::OptionalTensorList;
using glue::Table;

// Elements per unit of parallel work: a few hundred KiB per array, so a chunk's lines stay in L2.
constexpr int64_t kChunkElements = int64_t(1) << 15;
// Below this many elements a step runs on the calling thread: waking the pool costs more.
constexpr int64_t kSerialElements = int64_t(1) << 16;

// The AMP flags, read on the host (CPU tensors): whether to skip, and the gradient multiplier.
struct Amp {
  bool skip = false;
  double grad_scale = 1.0;
};

// lr as a one-element CPU tensor (a float lr arrives as one too): a tensor lr is what lets
// torch.compile change it without recompiling.
double read_lr(const Tensor& lr) {
  TORCH_CHECK(lr.numel() == 1 && lr.device().is_cpu() && at::isFloatingType(lr.scalar_type()),
              "onepass: lr must be a one-element floating-point CPU tensor for CPU params");
  return glue::host_scalar(lr);
}

Amp read_amp(const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf,
             bool maximize) {
  glue::check_amp_scalar(grad_scale, "grad_scale", at::kCPU);
  glue::check_amp_scalar(found_inf, "found_inf", at::kCPU);
  Amp amp;
  if (found_inf.has_value()) amp.skip = glue::host_scalar(*found_inf) != 0.0;
  if (grad_scale.has_value()) amp.grad_scale = 1.0 / glue::host_scalar(*grad_scale);
  if (maximize) amp.grad_scale = -amp.grad_scale;
  return amp;
}

// Runs fn(begin, end) over the table's chunks, split across torch's threads by element count.
template <class Fn>
void run_chunks(const Table& t, const Fn& fn) {
  const int64_t nchunks = static_cast<int64_t>(t.chunks.size());
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), nchunks);
  if (t.elements < kSerialElements || threads <= 1) {
    fn(0, nchunks);
    return;
  }
  std::vector<int64_t> bounds(threads + 1, nchunks);
  bounds[0] = 0;
  int64_t seen = 0, next = 1;
  for (int64_t c = 0; c < nchunks && next < threads; ++c) {
    seen += t.chunks[c].end - t.chunks[c].begin;
    if (seen * threads >= t.elements * next) bounds[next++] = c + 1;
  }
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) fn(bounds[w], bounds[w + 1]);
  });
}

// Writes back non-contiguous params and advances the step of every tensor that had a grad.
void finish(Table& t, Tensor& step) {
  glue::write_back(t);
  float* steps = step.data_ptr<float>();
  for (const int64_t i : t.stepped) steps[i] += 1.0f;
}

float* master_data(const std::optional<Tensor>& master) {
  return master.has_value() ? master->data_ptr<float>() : nullptr;
}

template <class Call>
void adam_cpu(const typename Call::Params& params,
              const typename Call::Grads& grads, Tensor exp_avg,
              Tensor exp_avg_sq, const std::optional<Tensor>& max_exp_avg_sq, Tensor step,
              const Tensor& state_offsets, const std::optional<Tensor>& grad_scale,
              const std::optional<Tensor>& found_inf, const Tensor& lr, double beta1,
              double beta2, double eps, double weight_decay, double decay_coefficient,
              bool amsgrad, bool maximize, bool l2_decay,
              const std::optional<Tensor>& master_param, int64_t sr_seed) {
  Table t = glue::build_table(params, grads, step, state_offsets, at::kCPU, kChunkElements,
                              /*host_steps=*/true);
  const double lr_value = read_lr(lr);
  const Layout layout = glue::check_layout(t, exp_avg, master_param, at::kCPU);
  glue::check_state(exp_avg, "exp_avg", t, at::kCPU, exp_avg.scalar_type());
  glue::check_state(exp_avg_sq, "exp_avg_sq", t, at::kCPU, exp_avg.scalar_type());
  TORCH_CHECK(!amsgrad || max_exp_avg_sq.has_value(), "onepass: amsgrad needs max_exp_avg_sq");
  if (amsgrad) {
    glue::check_state(*max_exp_avg_sq, "max_exp_avg_sq", t, at::kCPU, exp_avg.scalar_type());
  }
  const Amp amp = read_amp(grad_scale, found_inf, maximize);
  if (amp.skip) return;  // GradScaler found an inf/nan: params, state and steps stay as they are

  cpu::AdamLaunch launch{};
  launch.layout = layout;
  launch.master = master_data(master_param);
  launch.segments = t.segments.data();
  launch.chunks = t.chunks.data();
  launch.exp_avg = exp_avg.data_ptr();
  launch.exp_avg_sq = exp_avg_sq.data_ptr();
  launch.max_exp_avg_sq = amsgrad ? max_exp_avg_sq->data_ptr() : nullptr;
  launch.sr_seed = sr_seed;
  launch.hyper = AdamHyper{lr_value, beta1, beta2, eps, weight_decay, decay_coefficient,
                           amp.grad_scale};
  launch.amsgrad = amsgrad;
  launch.l2_decay = l2_decay;
  const auto kernel = cpu::kernels().adam;
  run_chunks(t, [&](int64_t b, int64_t e) { kernel(launch, b, e); });
  finish(t, step);
}

template <class Call>
void sgd_cpu(const typename Call::Params& params,
             const typename Call::Grads& grads,
             const std::optional<Tensor>& momentum_buffer, Tensor step,
             const Tensor& state_offsets, const std::optional<Tensor>& grad_scale,
             const std::optional<Tensor>& found_inf, const Tensor& lr, double momentum,
             double dampening, double weight_decay, double decay_coefficient, bool nesterov,
             bool maximize, bool l2_decay, const std::optional<Tensor>& master_param,
             int64_t sr_seed) {
  Table t = glue::build_table(params, grads, step, state_offsets, at::kCPU, kChunkElements,
                              /*host_steps=*/true);
  const double lr_value = read_lr(lr);
  const bool has_momentum = momentum != 0.0;
  TORCH_CHECK(!has_momentum || momentum_buffer.has_value(),
              "onepass: momentum != 0 needs momentum_buffer");
  const std::optional<Tensor> state = has_momentum ? momentum_buffer : std::nullopt;
  const Layout layout = glue::check_layout(t, state, master_param, at::kCPU);
  if (has_momentum) {
    glue::check_state(*momentum_buffer, "momentum_buffer", t, at::kCPU,
                      momentum_buffer->scalar_type());
  }
  const Amp amp = read_amp(grad_scale, found_inf, maximize);
  if (amp.skip) return;
  cpu::SgdLaunch launch{};
  launch.layout = layout;
  launch.master = master_data(master_param);
  launch.segments = t.segments.data();
  launch.chunks = t.chunks.data();
  launch.momentum_buffer = has_momentum ? momentum_buffer->data_ptr() : nullptr;
  launch.sr_seed = sr_seed;
  launch.hyper = SgdHyper{lr_value, momentum, dampening, weight_decay, decay_coefficient,
                          amp.grad_scale};
  launch.momentum = has_momentum;
  launch.nesterov = nesterov;
  launch.l2_decay = l2_decay;
  const auto kernel = cpu::kernels().sgd;
  run_chunks(t, [&](int64_t b, int64_t e) { kernel(launch, b, e); });
  finish(t, step);
}

template <class Call>
void lion_cpu(const typename Call::Params& params,
              const typename Call::Grads& grads, Tensor exp_avg, Tensor step,
              const Tensor& state_offsets, const std::optional<Tensor>& grad_scale,
              const std::optional<Tensor>& found_inf, const Tensor& lr, double beta1,
              double beta2, double weight_decay, double decay_coefficient, bool maximize,
              bool l2_decay, const std::optional<Tensor>& master_param, int64_t sr_seed) {
  Table t = glue::build_table(params, grads, step, state_offsets, at::kCPU, kChunkElements,
                              /*host_steps=*/true);
  const double lr_value = read_lr(lr);
  const Layout layout = glue::check_layout(t, exp_avg, master_param, at::kCPU);
  glue::check_state(exp_avg, "exp_avg", t, at::kCPU, exp_avg.scalar_type());
  const Amp amp = read_amp(grad_scale, found_inf, maximize);
  if (amp.skip) return;  // GradScaler found an inf/nan: params, state and steps stay as they are
  cpu::LionLaunch launch{};
  launch.layout = layout;
  launch.master = master_data(master_param);
  launch.segments = t.segments.data();
  launch.chunks = t.chunks.data();
  launch.exp_avg = exp_avg.data_ptr();
  launch.sr_seed = sr_seed;
  launch.hyper = LionHyper{lr_value, beta1, beta2, weight_decay, decay_coefficient,
                           amp.grad_scale};
  launch.l2_decay = l2_decay;
  const auto kernel = cpu::kernels().lion;
  run_chunks(t, [&](int64_t b, int64_t e) { kernel(launch, b, e); });
  finish(t, step);
}

// Muon's momentum pass: `updates` are the tensors' slices of the update workspace (written).
template <class Call>
void muon_momentum_cpu(const typename Call::Params& updates,
                       const typename Call::Grads& grads, Tensor momentum_buffer,
                       Tensor step, const Tensor& state_offsets,
                       const std::optional<Tensor>& grad_scale,
                       const std::optional<Tensor>& found_inf, double momentum, bool nesterov) {
  Table t = glue::build_table(updates, grads, step, state_offsets, at::kCPU, kChunkElements,
                              /*host_steps=*/true);
  const Layout layout =
      glue::check_layout(t, momentum_buffer, std::nullopt, at::kCPU, /*workspace=*/true);
  glue::check_state(momentum_buffer, "momentum_buffer", t, at::kCPU,
                    momentum_buffer.scalar_type());
  const Amp amp = read_amp(grad_scale, found_inf, /*maximize=*/false);
  if (amp.skip) return;  // GradScaler found an inf/nan: the state and steps stay as they are
  cpu::MuonLaunch launch{};
  launch.layout = layout;
  launch.segments = t.segments.data();
  launch.chunks = t.chunks.data();
  launch.momentum_buffer = momentum_buffer.data_ptr();
  launch.hyper = MuonHyper{momentum, amp.grad_scale};
  launch.nesterov = nesterov;
  const auto kernel = cpu::kernels().muon_momentum;
  run_chunks(t, [&](int64_t b, int64_t e) { kernel(launch, b, e); });
  finish(t, step);
}

// The sum of squares of every element of `tensors` (one float dtype), in float64: the global
// gradient norm of the fused clip, one parallel pass over all tensors (torch's per-tensor norms
// cost ~7 us a tensor here). Chunk sums by NovoGrad's reduce kernel, combined in chunk order:
// the same bits whatever the thread split. `release_gil` (the eager entry's, where given) runs
// once the pointers are read if the pass is long (glue::kReleaseGilElements); the storages then
// stay alive until the sum is done.
double sum_of_squares(const std::vector<const Tensor*>& tensors,
                      const std::function<void()>& release_gil = {}) {
  Table t;
  TORCH_CHECK(!tensors.empty(), "onepass: sum_of_squares of no tensors");
  t.dtype = tensors[0]->scalar_type();
  for (int64_t i = 0; i < static_cast<int64_t>(tensors.size()); ++i) {
    const Tensor& x = *tensors[i];
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == t.dtype,
                "onepass: sum_of_squares takes CPU tensors of one dtype; tensor ", i, " is ",
                x.scalar_type(), " on ", x.device());
    TORCH_CHECK(x.layout() == at::kStrided && !x.is_complex(),
                "onepass: sum_of_squares takes dense real tensors (tensor ", i, ")");
    if (x.numel() == 0) continue;
    const void* data = nullptr;
    if (x.is_contiguous()) {
      data = x.data_ptr();
    } else {
      t.keep_alive.push_back(x.contiguous());
      data = t.keep_alive.back().data_ptr();
    }
    const int64_t segment = static_cast<int64_t>(t.segments.size());
    t.segments.push_back(Segment{nullptr, data, 0, x.numel(), i, 0.0});
    for (int64_t begin = 0; begin < x.numel(); begin += kChunkElements) {
      t.chunks.push_back(Chunk{segment, begin, std::min(begin + kChunkElements, x.numel())});
    }
    t.elements += x.numel();
  }
  if (release_gil && t.elements >= glue::kReleaseGilElements) {
    for (const Tensor* x : tensors) t.storages.push_back(x->storage());
    release_gil();
  }
  double total = 0.0;
  if (!t.chunks.empty()) {
    std::vector<double> partial_sums(t.chunks.size(), 0.0);
    cpu::NovoGradLaunch launch{};
    launch.layout.grad = glue::storage_dtype(t.dtype);  // the reduce kernel reads "grads" only
    launch.segments = t.segments.data();
    launch.chunks = t.chunks.data();
    launch.partial_sums = partial_sums.data();
    const auto reduce = cpu::kernels().novograd_reduce;
    run_chunks(t, [&](int64_t b, int64_t e) { reduce(launch, b, e); });
    for (const double s : partial_sums) total += s;
  }
  return total;
}

Tensor sum_of_squares_cpu(at::TensorList tensors) {
  std::vector<const Tensor*> refs;
  refs.reserve(tensors.size());
  for (const Tensor& x : tensors) refs.push_back(&x);
  return at::scalar_tensor(sum_of_squares(refs), at::TensorOptions().dtype(at::kDouble));
}

template <class Call>
void novograd_cpu(const typename Call::Params& params,
                  const typename Call::Grads& grads, Tensor exp_avg, Tensor exp_avg_sq,
                  const std::optional<Tensor>& max_exp_avg_sq, Tensor step,
                  const Tensor& state_offsets, const std::optional<Tensor>& grad_scale,
                  const std::optional<Tensor>& found_inf, const Tensor& lr, double beta1,
                  double beta2, double eps, double weight_decay, bool grad_averaging,
                  bool amsgrad, bool maximize, const std::optional<Tensor>& master_param,
                  int64_t sr_seed) {
  Table t = glue::build_table(params, grads, step, state_offsets, at::kCPU, kChunkElements,
                              /*host_steps=*/true);
  const double lr_value = read_lr(lr);
  const Layout layout = glue::check_layout(t, exp_avg, master_param, at::kCPU);
  glue::check_state(exp_avg, "exp_avg", t, at::kCPU, exp_avg.scalar_type());
  const int64_t n = glue::param_count(params);
  glue::check_scalar_state(exp_avg_sq, "exp_avg_sq", t, n, at::kCPU);
  TORCH_CHECK(!amsgrad || max_exp_avg_sq.has_value(), "onepass: amsgrad needs max_exp_avg_sq");
  if (amsgrad) glue::check_scalar_state(*max_exp_avg_sq, "max_exp_avg_sq", t, n, at::kCPU);
  const Amp amp = read_amp(grad_scale, found_inf, maximize);
  if (amp.skip) return;  // GradScaler found an inf/nan: params, state and steps stay as they are

  std::vector<double> partial_sums(t.chunks.size(), 0.0);
  std::vector<double> denoms(t.segments.size(), 0.0);
  cpu::NovoGradLaunch launch{};
  launch.layout = layout;
  launch.master = master_data(master_param);
  launch.segments = t.segments.data();
  launch.chunks = t.chunks.data();
  launch.exp_avg = exp_avg.data_ptr();
  launch.partial_sums = partial_sums.data();
  launch.denoms = denoms.data();
  launch.sr_seed = sr_seed;
  launch.hyper = NovoGradHyper{lr_value, beta1, beta2, eps, weight_decay, amp.grad_scale,
                               grad_averaging};
  // Every tensor one chunk (many small tensors): both passes chunk by chunk, the second while
  // the grad is still in cache. The same bits as the two passes below.
  const bool fused = t.chunks.size() == t.segments.size();
  std::vector<double> sums(t.segments.size(), 0.0);
  if (fused) {
    launch.exp_avg_sq = exp_avg_sq.data_ptr();
    launch.max_exp_avg_sq = amsgrad ? max_exp_avg_sq->data_ptr() : nullptr;
    launch.amsgrad = amsgrad;
    const auto kernel = cpu::kernels().novograd_fused;
    run_chunks(t, [&](int64_t b, int64_t e) { kernel(launch, b, e); });
  } else {
    // Pass 1: per-chunk sums of squares, in parallel; per tensor in chunk order (deterministic
    // whatever the thread split).
    const auto reduce = cpu::kernels().novograd_reduce;
    run_chunks(t, [&](int64_t b, int64_t e) { reduce(launch, b, e); });
    for (size_t c = 0; c < t.chunks.size(); ++c) sums[t.chunks[c].segment] += partial_sums[c];
  }
  std::vector<int64_t> segment_of(n, -1);
  for (size_t k = 0; k < t.segments.size(); ++k) segment_of[t.segments[k].index] = int64_t(k);
  // The scalar step of every tensor with a grad, zero-size ones included (their v decays);
  // the fused kernel has stepped the others.
  const float* steps = step.data_ptr<float>();
  const auto scalar_step = [&]<class V>() {
    V* v = exp_avg_sq.data_ptr<V>();
    V* v_max = amsgrad ? max_exp_avg_sq->data_ptr<V>() : nullptr;
    for (const int64_t i : t.stepped) {
      const int64_t k = segment_of[i];
      if (fused && k >= 0) continue;
      const double denom = novograd_second_moment<V>(
          k >= 0 ? sums[k] : 0.0, double(steps[i]) + 1.0, launch.hyper, amsgrad, v[i],
          amsgrad ? v_max + i : nullptr);
      if (k >= 0) denoms[k] = denom;
    }
  };
  if (t.dtype == at::kDouble) {
    scalar_step.template operator()<double>();
  } else {
    scalar_step.template operator()<float>();
  }
  if (!fused) {  // Pass 2: the elementwise update.
    const auto kernel = cpu::kernels().novograd;
    run_chunks(t, [&](int64_t b, int64_t e) { kernel(launch, b, e); });
  }
  finish(t, step);
}

template <class Call>
void fadam_cpu(const typename Call::Params& params,
               const typename Call::Grads& grads, Tensor fim, Tensor momentum, Tensor step,
               const Tensor& state_offsets, const std::optional<Tensor>& grad_scale,
               const std::optional<Tensor>& found_inf, const Tensor& lr, double beta1,
               double beta2, double eps, double clip, double p, double weight_decay,
               bool maximize, const std::optional<Tensor>& master_param, int64_t sr_seed) {
  Table t = glue::build_table(params, grads, step, state_offsets, at::kCPU, kChunkElements,
                              /*host_steps=*/true);
  const double lr_value = read_lr(lr);
  const Layout layout = glue::check_layout(t, fim, master_param, at::kCPU);
  glue::check_state(fim, "fim", t, at::kCPU, fim.scalar_type());
  glue::check_state(momentum, "momentum", t, at::kCPU, fim.scalar_type());
  const Amp amp = read_amp(grad_scale, found_inf, maximize);
  if (amp.skip) return;  // GradScaler found an inf/nan: params, state and steps stay as they are

  const size_t n_segments = t.segments.size();
  std::vector<double> partial_sums(2 * t.chunks.size(), 0.0);
  std::vector<cpu::FAdamSegment> scalars(n_segments, cpu::FAdamSegment{0.0, 1.0, 1.0});
  cpu::FAdamLaunch launch{};
  launch.layout = layout;
  launch.master = master_data(master_param);
  launch.segments = t.segments.data();
  launch.chunks = t.chunks.data();
  launch.fim = fim.data_ptr();
  launch.momentum = momentum.data_ptr();
  launch.partial_sums = partial_sums.data();
  launch.scalars = scalars.data();
  launch.sr_seed = sr_seed;
  launch.hyper = FAdamHyper{lr_value, beta1, beta2, eps, clip, p, weight_decay, amp.grad_scale};
  // Per tensor, in chunk order: deterministic whatever the thread split.
  const auto combine = [&](std::vector<double>& first, std::vector<double>& second) {
    first.assign(n_segments, 0.0);
    second.assign(n_segments, 0.0);
    for (size_t c = 0; c < t.chunks.size(); ++c) {
      first[t.chunks[c].segment] += partial_sums[2 * c];
      second[t.chunks[c].segment] += partial_sums[2 * c + 1];
    }
  };
  if (t.chunks.size() == t.segments.size()) {
    // Every tensor one chunk (many small tensors): the three passes chunk by chunk, the same
    // bits, each tensor's data in cache from the first read to the last write.
    const auto fused = cpu::kernels().fadam_fused;
    run_chunks(t, [&](int64_t b, int64_t e) { fused(launch, b, e); });
    finish(t, step);
    return;
  }
  std::vector<double> sums_a, sums_b;
  // Pass 1: sums of g^2, then eps_t per tensor.
  const auto reduce = cpu::kernels().fadam_reduce;
  run_chunks(t, [&](int64_t b, int64_t e) { reduce(launch, b, e); });
  combine(sums_a, sums_b);
  for (size_t k = 0; k < n_segments; ++k) {
    scalars[k].eps_t = fadam_eps_t(sums_a[k], t.segments[k].numel, launch.hyper);
  }
  // Pass 2: sums of gn^2 and wn^2 with the new den (F not written yet), then the clip divisors.
  const auto norms = cpu::kernels().fadam_norms;
  run_chunks(t, [&](int64_t b, int64_t e) { norms(launch, b, e); });
  combine(sums_a, sums_b);
  for (size_t k = 0; k < n_segments; ++k) {
    scalars[k].gn_divisor = fadam_clip_divisor(sums_a[k], t.segments[k].numel, clip);
    scalars[k].wn_divisor = fadam_clip_divisor(sums_b[k], t.segments[k].numel, clip);
  }
  // Pass 3: F, momentum and the param.
  const auto kernel = cpu::kernels().fadam;
  run_chunks(t, [&](int64_t b, int64_t e) { kernel(launch, b, e); });
  finish(t, step);
}

std::string cpu_capability() { return cpu::kernels().name; }

std::vector<std::string> cpu_capabilities() {
  std::vector<std::string> names;
  for (int64_t i = 0; i < cpu::capability_count(); ++i) names.emplace_back(cpu::capability_name(i));
  return names;
}

void set_cpu_capability(const std::string& name) {
  TORCH_CHECK(cpu::set_capability(name.c_str()), "onepass: this CPU cannot run the '", name,
              "' kernels; available: ", c10::Join(", ", cpu_capabilities()));
}

}  // namespace
}  // namespace onepass

TORCH_LIBRARY(onepass, m) {
  m.def(
      "adam_(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!)? max_exp_avg_sq, Tensor(e!) step, Tensor state_offsets, Tensor? grad_scale, "
      "Tensor? found_inf, Tensor lr, float beta1, float beta2, float eps, float weight_decay, "
      "float decay_coefficient, bool amsgrad, bool maximize, bool l2_decay, "
      "Tensor(f!)? master_param, int sr_seed) -> ()");
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)? momentum_buffer, Tensor(e!) step, "
      "Tensor state_offsets, Tensor? grad_scale, Tensor? found_inf, Tensor lr, float momentum, "
      "float dampening, float weight_decay, float decay_coefficient, bool nesterov, "
      "bool maximize, bool l2_decay, Tensor(f!)? master_param, int sr_seed) -> ()");
  m.def(
      "lion_(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!) exp_avg, Tensor(e!) step, "
      "Tensor state_offsets, Tensor? grad_scale, Tensor? found_inf, Tensor lr, float beta1, "
      "float beta2, float weight_decay, float decay_coefficient, bool maximize, "
      "bool l2_decay, Tensor(f!)? master_param, int sr_seed) -> ()");
  m.def(
      "muon_momentum_(Tensor(a!)[] updates, Tensor?[] grads, Tensor(b!) momentum_buffer, "
      "Tensor(e!) step, Tensor state_offsets, Tensor? grad_scale, Tensor? found_inf, "
      "float momentum, bool nesterov) -> ()");
  m.def(
      "novograd_(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!) exp_avg, "
      "Tensor(c!) exp_avg_sq, Tensor(d!)? max_exp_avg_sq, Tensor(e!) step, Tensor state_offsets, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor lr, float beta1, float beta2, float eps, "
      "float weight_decay, bool grad_averaging, bool amsgrad, bool maximize, "
      "Tensor(f!)? master_param, int sr_seed) -> ()");
  m.def(
      "fadam_(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!) fim, Tensor(c!) momentum, "
      "Tensor(d!) step, Tensor state_offsets, Tensor? grad_scale, Tensor? found_inf, Tensor lr, "
      "float beta1, float beta2, float eps, float clip, float p, float weight_decay, "
      "bool maximize, Tensor(f!)? master_param, int sr_seed) -> ()");
  m.def("sum_of_squares(Tensor[] tensors) -> Tensor");
  m.def("cpu_capability() -> str", &onepass::cpu_capability);
  m.def("cpu_capabilities() -> str[]", &onepass::cpu_capabilities);
  m.def("set_cpu_capability(str name) -> ()", &onepass::set_cpu_capability);
}

TORCH_LIBRARY_IMPL(onepass, CPU, m) {
  m.impl("adam_", &onepass::adam_cpu<onepass::glue::Dispatched>);
  m.impl("sgd_", &onepass::sgd_cpu<onepass::glue::Dispatched>);
  m.impl("lion_", &onepass::lion_cpu<onepass::glue::Dispatched>);
  m.impl("muon_momentum_", &onepass::muon_momentum_cpu<onepass::glue::Dispatched>);
  m.impl("novograd_", &onepass::novograd_cpu<onepass::glue::Dispatched>);
  m.impl("fadam_", &onepass::fadam_cpu<onepass::glue::Dispatched>);
  m.impl("sum_of_squares", &onepass::sum_of_squares_cpu);
}

// Eager entry points for Python (see glue::EagerOps): the same implementations as the operators,
// called without the dispatcher's per-element list conversion. `import onepass._C` also loads
// the library, which registers the operators above.
namespace {

const bool kCpuEagerRegistered = [] {
  onepass::glue::EagerOps& ops = onepass::glue::eager_ops(c10::DeviceType::CPU);
  ops.adam = &onepass::adam_cpu<onepass::glue::Eager>;
  ops.sgd = &onepass::sgd_cpu<onepass::glue::Eager>;
  ops.lion = &onepass::lion_cpu<onepass::glue::Eager>;
  ops.muon_momentum = &onepass::muon_momentum_cpu<onepass::glue::Eager>;
  ops.novograd = &onepass::novograd_cpu<onepass::glue::Eager>;
  ops.fadam = &onepass::fadam_cpu<onepass::glue::Eager>;
  return true;
}();

template <class Fn>
Fn eager_kernel(Fn onepass::glue::EagerOps::*member, const at::Tensor& on) {
  const Fn fn = onepass::glue::eager_ops(on.device().type()).*member;
  TORCH_CHECK(fn != nullptr, "onepass: no kernels for ", on.device(), " in this build");
  return fn;
}

// Prefetches the cache lines of one object.
template <class T>
void prefetch_object(const T* x) {
  for (size_t b = 0; b < sizeof(T); b += 64) {
    __builtin_prefetch(reinterpret_cast<const char*>(x) + b);
  }
}

// Prefetches the line of a tensor's StorageImpl that build_table reads (the data pointer) and
// writes (the refcount).
void prefetch_storage(const at::Tensor& t) {
  if (t.defined()) {
    __builtin_prefetch(t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl(), 1);
  }
}

// A param's .grad, read from its TensorImpl: Tensor::grad() first asks autograd whether the
// tensor is a leaf (a virtual call and another cache miss, for a warning about non-leaves).
const at::Tensor& grad_of(const at::Tensor& param) {
  return param.unsafeGetTensorImpl()->grad();
}

// Unpacks the tensors of the Python objects items[begin:end] into out[0:end-begin], and brings
// their TensorImpls into cache, with their autograd meta (where .grad lives) if `with_grads`.
// Reading a param's .grad chases pointers: the Python object, its TensorImpl, the autograd meta,
// the grad's TensorImpl, and then the storages, each a cache miss once a step has streamed its
// buffers through the caches. Here and in EagerCall::borrow each level's loads are issued for a
// whole block before the next level needs them, so the misses overlap instead of queueing
// (~0.3 ms a step on 4,000 params; the rest is mostly page walks, which prefetching does not
// hide). `exact_only` (off the GIL holder's thread): false, with `out` partly filled, at the first
// item that is not exactly a Tensor or a Parameter, whose isinstance check may run Python.
bool unpack_params(PyObject* const* items, int64_t begin, int64_t end, const at::Tensor** out,
                   bool with_grads, bool exact_only = false) {
  for (int64_t i = begin; i < end; ++i) __builtin_prefetch(items[i]);
  for (int64_t i = begin; i < end; ++i) {
    if (exact_only) {
      if (!THPVariable_CheckExact(items[i])) return false;
    } else {
      TORCH_CHECK(THPVariable_Check(items[i]), "onepass: params[", i, "] is not a tensor");
    }
    out[i - begin] = &THPVariable_Unpack(items[i]);
    prefetch_object(out[i - begin]->unsafeGetTensorImpl());
  }
  if (!with_grads) return true;
  for (int64_t i = begin; i < end; ++i) {
    const auto* meta = out[i - begin]->unsafeGetTensorImpl()->autograd_meta();
    if (meta != nullptr) __builtin_prefetch(meta);
  }
  return true;
}

// The tensors of an eager call (glue::EagerParams): `params` the Python list of params, `grads`
// the list Python passed (converted into `owned`) or None, for each param's own .grad, read here
// (a Python list of 4,000 p.grad costs ~0.5 ms a step).
class EagerCall {
 public:
  EagerCall(const pybind11::list& params, const pybind11::object& grads)
      : list_(params.ptr()), own_grads_(grads.is_none()) {
    const Py_ssize_t n = PyList_GET_SIZE(list_);
    params_.tensors.resize(n);
    grads_.resize(n);
    if (!own_grads_) {
      owned_ = grads.cast<std::vector<std::optional<at::Tensor>>>();
      TORCH_CHECK(static_cast<Py_ssize_t>(owned_.size()) == n, "onepass: ", n, " params but ",
                  owned_.size(), " grads");
    }
    params_.borrow = [this](int64_t begin, int64_t end, bool concurrently) {
      return borrow(begin, end, concurrently);
    };
  }
  EagerCall(const EagerCall&) = delete;
  EagerCall& operator=(const EagerCall&) = delete;

  // Runs fn(params, grads), letting go of the GIL once a long CPU step has built its table.
  template <class Fn>
  void run(const Fn& fn) {
    // Declared after the tensors it guards: they drop once the GIL is back (the table's own
    // temporaries drop inside fn, without it).
    std::optional<pybind11::gil_scoped_release> no_gil;
    params_.release_gil = [&no_gil] { no_gil.emplace(); };
    fn(params_, grads_);
  }

 private:
  // Entries [begin, end), each pointer level prefetched for the whole block (unpack_params).
  // `concurrently`: see glue::EagerParams::borrow.
  bool borrow(int64_t begin, int64_t end, bool concurrently) {
    // The list is read afresh for each block: between blocks the checks may run Python (a
    // dispatch mode behind .contiguous()), which may let another thread change the list.
    TORCH_CHECK(PyList_GET_SIZE(list_) == static_cast<Py_ssize_t>(params_.tensors.size()),
                "onepass: the params list changed during the step");
    PyObject* const* items = reinterpret_cast<PyListObject*>(list_)->ob_item;
    const at::Tensor** params = params_.tensors.data();
    if (!unpack_params(items, begin, end, params + begin, /*with_grads=*/own_grads_,
                       /*exact_only=*/concurrently)) {
      return false;
    }
    for (int64_t i = begin; i < end; ++i) prefetch_storage(*params[i]);
    for (int64_t i = begin; i < end; ++i) {
      if (own_grads_) {
        grads_[i] = &grad_of(*params[i]);
      } else {
        grads_[i] = owned_[i].has_value() ? &*owned_[i] : nullptr;
      }
      if (grads_[i] != nullptr) prefetch_object(grads_[i]->unsafeGetTensorImpl());
    }
    for (int64_t i = begin; i < end; ++i) {
      if (grads_[i] != nullptr) prefetch_storage(*grads_[i]);
    }
    return true;
  }

  PyObject* list_;  // the caller's list, alive for the call
  bool own_grads_;
  std::vector<std::optional<at::Tensor>> owned_;
  onepass::glue::EagerParams params_;
  onepass::glue::EagerGrads grads_;
};

// The sum of squares of the grads of `params` (a Python list; params without a grad are left
// out) in float64, and whether the first grad is float64 (the norm's dtype then); None where a
// grad is not a dense CPU float tensor (the caller then takes torch's norm). The grads are read
// here, borrowed, a block at a time (unpack_params): no Python list of 4,000 p.grad, and no
// dispatcher conversion of one (~1 ms each).
pybind11::object grads_sum_of_squares(const pybind11::list& params) {
  const int64_t n = PyList_GET_SIZE(params.ptr());
  PyObject* const* items = reinterpret_cast<PyListObject*>(params.ptr())->ob_item;
  constexpr int64_t kBlock = onepass::glue::kTableBlock;
  const at::ScalarType kDtypes[] = {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf};
  constexpr size_t kKinds = std::size(kDtypes);
  // The grads of params[begin:end] by dtype. kUnsupported: a grad the native norm does not read
  // (the caller takes torch's norm). kSerial (`exact_only`, off the GIL holder's thread): an item
  // only the GIL holder may read (as in glue::scan_part), or a failed read.
  enum Found { kGrads, kUnsupported, kSerial };
  struct alignas(64) Part {
    std::vector<const at::Tensor*> by_dtype[kKinds];
    std::optional<bool> first_is_double;
    Found found = kGrads;
  };
  const auto scan = [&](int64_t begin, int64_t end, bool exact_only, Part& part) {
    const at::Tensor* block[kBlock];
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t e = std::min(end, b + kBlock);
      if (!unpack_params(items, b, e, block, /*with_grads=*/true, exact_only)) {
        part.found = kSerial;
        return;
      }
      for (int64_t i = b; i < e; ++i) {
        const at::Tensor& grad = grad_of(*block[i - b]);
        if (!grad.defined()) continue;
        // A Python subclass (its metadata may come from Python, its data from nowhere) is left
        // to torch's norm; checked first, before anything that might call into Python.
        if (grad.unsafeGetTensorImpl()->is_python_dispatch()) {
          part.found = kUnsupported;
          return;
        }
        const auto* slot = std::find(std::begin(kDtypes), std::end(kDtypes), grad.scalar_type());
        if (!grad.device().is_cpu() || grad.layout() != at::kStrided ||
            slot == std::end(kDtypes)) {
          part.found = kUnsupported;
          return;
        }
        if (!part.first_is_double.has_value()) {
          part.first_is_double = grad.scalar_type() == at::kDouble;
        }
        part.by_dtype[slot - std::begin(kDtypes)].push_back(&grad);
      }
    }
  };
  // As the tables of the steps (glue::scan_in_parallel): a long list is read by all of torch's
  // threads, and anything unusual is left to the serial scan.
  std::vector<Part> parts(onepass::glue::scan_parts(n));
  if (!parts.empty()) {
    const int64_t count = static_cast<int64_t>(parts.size());
    onepass::glue::for_each_part(n, count, [&](int64_t k, int64_t begin, int64_t end, bool) {
      try {
        scan(begin, end, /*exact_only=*/true, parts[k]);
      } catch (...) {
        parts[k].found = kSerial;
      }
    });
    if (std::any_of(parts.begin(), parts.end(), [](const Part& p) { return p.found == kSerial; })) {
      parts.clear();
    }
  }
  const bool in_parallel = !parts.empty();
  if (!in_parallel) {
    parts.resize(1);
    scan(0, n, /*exact_only=*/false, parts[0]);
  }
  std::vector<const at::Tensor*> by_dtype[kKinds];
  std::optional<bool> first_is_double;
  for (const Part& part : parts) {
    if (part.found == kUnsupported) return pybind11::none();
    if (!first_is_double.has_value()) first_is_double = part.first_is_double;
    for (size_t k = 0; k < kKinds; ++k) {
      by_dtype[k].insert(by_dtype[k].end(), part.by_dtype[k].begin(), part.by_dtype[k].end());
    }
  }
  if (in_parallel) onepass::glue::parallel_scans().fetch_add(1, std::memory_order_relaxed);
  double total = 0.0;
  {
    // A long pass lets go of the GIL once the last dtype's table holds the pointers (earlier
    // dtypes keep it: the later ones still read borrowed grads).
    std::optional<pybind11::gil_scoped_release> no_gil;
    const std::function<void()> release_gil = [&no_gil] { no_gil.emplace(); };
    const auto last = std::find_if(std::rbegin(by_dtype), std::rend(by_dtype),
                                   [](const auto& group) { return !group.empty(); });
    for (auto& group : by_dtype) {
      if (group.empty()) continue;
      total += onepass::sum_of_squares(
          group, &group == &*last ? release_gil : std::function<void()>());
    }
  }
  return pybind11::make_tuple(at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble)),
                              first_is_double.value_or(false));
}

// The tensors of a Python list of Tensors and Nones (nullptr for None); false at an item that is
// neither, or where the lists' lengths differ.
bool unpack_optional(PyObject* list, int64_t n, std::vector<const at::Tensor*>& out) {
  if (!PyList_Check(list) || PyList_GET_SIZE(list) != n) return false;
  out.resize(n);
  PyObject* const* items = reinterpret_cast<PyListObject*>(list)->ob_item;
  for (int64_t i = 0; i < n; ++i) {
    if (items[i] == Py_None) {
      out[i] = nullptr;
    } else if (THPVariable_Check(items[i])) {
      out[i] = &THPVariable_Unpack(items[i]);
    } else {
      return false;
    }
  }
  return true;
}

// The engine's grad check (python/onepass/_engine.py, _check_grads) for the launches that do not
// check natively (Triton, the reference, several buckets), over `grads` or, for None, each
// param's own .grad: whether every param with a grad still has params[0]'s dtype and device (the
// bucket's: a change of params[0] rebuilds the bucket) and the shape it had when the bucket was
// built (`shapes`: each param's number of dims, then its sizes), and its grad is a strided tensor
// of the first grad's dtype, on that device and of that shape. False also for anything unusual;
// Python then checks again and names the culprit. In Python the check costs ~1 us a param (4 ms
// a step on 4,000 params).
bool grads_match(const pybind11::list& params, const pybind11::object& grads,
                 const at::Tensor& shapes) {
  const int64_t n = PyList_GET_SIZE(params.ptr());
  TORCH_CHECK(shapes.device().is_cpu() && shapes.scalar_type() == at::kLong &&
                  shapes.is_contiguous(),
              "onepass: grads_match needs the params' shapes as int64 on the CPU");
  std::vector<const at::Tensor*> ps, gs;
  if (n == 0 || !unpack_optional(params.ptr(), n, ps) || ps[0] == nullptr) return false;
  if (grads.is_none()) {  // each param's own .grad
    gs.resize(n);
    for (int64_t i = 0; i < n; ++i) gs[i] = ps[i] != nullptr ? &grad_of(*ps[i]) : nullptr;
  } else if (!unpack_optional(grads.ptr(), n, gs)) {
    return false;
  }
  const at::Device device = ps[0]->device();
  const at::ScalarType param_dtype = ps[0]->scalar_type();
  const int64_t* shape = shapes.data_ptr<int64_t>();
  const int64_t* const shapes_end = shape + shapes.numel();
  std::optional<at::ScalarType> grad_dtype;
  for (int64_t i = 0; i < n; ++i) {
    if (shape >= shapes_end || shape + 1 + *shape > shapes_end) return false;
    const c10::IntArrayRef built(shape + 1, static_cast<size_t>(*shape));
    shape += 1 + *shape;
    const at::Tensor* g = gs[i];
    if (g == nullptr || !g->defined()) continue;
    const at::Tensor* p = ps[i];
    if (p == nullptr) return false;
    // A Python subclass (its sizes may come from Python, its data from nowhere) or a tensor
    // without memory (glue::has_memory) goes to the Python check, which refuses it by name.
    if (p->unsafeGetTensorImpl()->is_python_dispatch() ||
        g->unsafeGetTensorImpl()->is_python_dispatch() || !onepass::glue::has_memory(*p) ||
        !onepass::glue::has_memory(*g)) {
      return false;
    }
    if (!grad_dtype) grad_dtype = g->scalar_type();
    if (p->scalar_type() != param_dtype || p->device() != device || p->sizes() != built ||
        g->scalar_type() != *grad_dtype || g->layout() != at::kStrided || g->device() != device ||
        g->sizes() != built) {
      return false;
    }
  }
  return true;
}

// The address key of a Triton launch (triton_kernels/common.py, prepare): key[2i] the address of
// params[i], key[2i + 1] that of grads[i] (-1 for None). False, with `key` partly written, where
// a param with a grad or its grad is not plain memory (glue::plain_memory: the launcher stages
// it in Python). Reading the addresses in Python costs ~1.5 us a param.
bool launch_key(const pybind11::list& params, const pybind11::list& grads, const at::Tensor& key) {
  const int64_t n = PyList_GET_SIZE(params.ptr());
  TORCH_CHECK(key.device().is_cpu() && key.scalar_type() == at::kLong && key.numel() == 2 * n &&
                  key.is_contiguous(),
              "onepass: launch_key needs two int64 CPU entries per param");
  std::vector<const at::Tensor*> ps, gs;
  TORCH_CHECK(unpack_optional(params.ptr(), n, ps) && unpack_optional(grads.ptr(), n, gs),
              "onepass: launch_key takes a list of params and a list of grads (or None)");
  int64_t* out = key.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(ps[i] != nullptr, "onepass: params[", i, "] is None");
    const at::Tensor* g = gs[i] != nullptr && gs[i]->defined() ? gs[i] : nullptr;
    if (g != nullptr &&
        (!onepass::glue::plain_memory(*ps[i]) || !onepass::glue::plain_memory(*g))) {
      return false;
    }
    out[2 * i] = reinterpret_cast<int64_t>(ps[i]->data_ptr());
    out[2 * i + 1] = g != nullptr ? reinterpret_cast<int64_t>(g->data_ptr()) : -1;
  }
  return true;
}

// Whether params[i].grad is the tensor whose TensorImpl address is impls[i], for every i: the
// check of flatten=True that every grad is still its view of the flat grad buffer. The object
// alone does not tell: `p.grad.data = x` and model.to(...) (which rebinds each grad's .data)
// keep it and swap its memory, so with a `grad_storage` address other than 0 each grad must
// also start at element grad_offsets[i] of that storage. In Python it costs ~0.3 us a param
// (1.3 ms for 4,000 params after a step has flushed the caches); here a block of params is read
// a pointer level at a time, each level's loads issued for the whole block before the next
// needs them (as unpack_params, but only the lines this check reads), and a long list is read
// by all of torch's threads (as glue::scan_in_parallel reads a table's).
bool grads_are(const pybind11::list& params, const at::Tensor& impls, int64_t storage,
               int64_t grad_storage, const std::optional<at::Tensor>& grad_offsets) {
  const int64_t n = PyList_GET_SIZE(params.ptr());
  TORCH_CHECK(impls.device().is_cpu() && impls.scalar_type() == at::kLong &&
                  impls.numel() == n && impls.is_contiguous(),
              "onepass: grads_are needs one int64 CPU entry per param");
  TORCH_CHECK(grad_storage == 0 ||
                  (grad_offsets.has_value() && grad_offsets->device().is_cpu() &&
                   grad_offsets->scalar_type() == at::kLong && grad_offsets->numel() == n &&
                   grad_offsets->is_contiguous()),
              "onepass: grads_are needs one int64 CPU grad offset per param");
  PyObject* const* items = reinterpret_cast<PyListObject*>(params.ptr())->ob_item;
  const int64_t* want = impls.data_ptr<int64_t>();
  const int64_t* offsets = grad_storage != 0 ? grad_offsets->data_ptr<int64_t>() : nullptr;
  // Items [begin, end): 1 where every grad is as expected, 0 where one is not, -1 where an item
  // is not exactly a Tensor or a Parameter and `exact_only` (off the GIL holder's thread).
  const auto check = [&](int64_t begin, int64_t end, bool exact_only) -> int {
    constexpr int64_t kBlock = onepass::glue::kTableBlock;
    const c10::TensorImpl* block[kBlock];
    bool same = true;
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t e = std::min(end, b + kBlock);
      for (int64_t i = b; i < e; ++i) __builtin_prefetch(items[i]);
      for (int64_t i = b; i < e; ++i) {
        PyObject* obj = items[i];
        if (exact_only ? !THPVariable_CheckExact(obj) : !THPVariable_Check(obj)) {
          return exact_only ? -1 : 0;
        }
        block[i - b] = THPVariable_Unpack(obj).unsafeGetTensorImpl();
        __builtin_prefetch(block[i - b]);  // the line with the storage and autograd meta
      }
      // The autograd meta (where .grad lives). Not the storages: while the check passes they
      // are all the flat buffer's one storage, in cache after the first.
      for (int64_t i = b; i < e; ++i) {
        const auto* meta = block[i - b]->autograd_meta();
        if (meta != nullptr) __builtin_prefetch(meta);
      }
      const c10::TensorImpl* grads[kBlock];
      for (int64_t i = b; i < e; ++i) {
        const c10::TensorImpl* impl = block[i - b];
        const at::Tensor& grad = impl->grad();
        grads[i - b] = grad.defined() ? grad.unsafeGetTensorImpl() : nullptr;
        if (grad_storage != 0 && grads[i - b] != nullptr) __builtin_prefetch(grads[i - b]);
      }
      for (int64_t i = b; i < e; ++i) {
        const c10::TensorImpl* impl = block[i - b];
        const c10::TensorImpl* grad = grads[i - b];
        // No early exit: a branch per param would serialise the misses the loop overlaps.
        same &= grad != nullptr && reinterpret_cast<int64_t>(grad) == want[i];
        if (storage != 0) {  // the param is still a view of the flat buffer (no p.data = ...)
          same &= impl->has_storage() &&
                  reinterpret_cast<int64_t>(impl->unsafe_storage().data()) == storage;
        }
        // The grad is still its view of the flat grad buffer, not the same object holding
        // other memory (its StorageImpl is the flat buffer's one, in cache after the first).
        if (grad_storage != 0 && grad != nullptr) {
          same &= grad->has_storage() &&
                  reinterpret_cast<int64_t>(grad->unsafe_storage().data()) == grad_storage &&
                  grad->storage_offset() == offsets[i];
        }
      }
    }
    return same ? 1 : 0;
  };
  const int64_t parts = onepass::glue::scan_parts(n);
  if (parts == 0) return check(0, n, false) == 1;
  std::vector<int> found(parts, 1);
  onepass::glue::for_each_part(n, parts, [&](int64_t k, int64_t begin, int64_t end, bool) {
    found[k] = check(begin, end, true);
  });
  if (std::find(found.begin(), found.end(), -1) != found.end()) return check(0, n, false) == 1;
  return std::find(found.begin(), found.end(), 0) == found.end();
}

// Whether two lists hold the same objects in the same order, by identity (a param's __eq__ is
// elementwise): the engine's test that a group's params are still the ones it planned for.
bool same_objects(const pybind11::list& a, const pybind11::list& b) {
  const Py_ssize_t n = PyList_GET_SIZE(a.ptr());
  if (PyList_GET_SIZE(b.ptr()) != n) return false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (PyList_GET_ITEM(a.ptr(), i) != PyList_GET_ITEM(b.ptr(), i)) return false;
  }
  return true;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  namespace py = pybind11;
  using Opt = std::optional<at::Tensor>;
  m.doc() = "onepass native operators (torch.ops.onepass) and their eager entry points";
  m.def("grads_sum_of_squares", &grads_sum_of_squares,
        "the sum of squares of the params' grads, and whether the first is float64; or None");
  m.def(
      "parallel_scans", [] { return onepass::glue::parallel_scans().load(); },
      "how many eager steps and grad norms have read their tensors on all of torch's threads");
  m.def("grads_are", &grads_are,
        "whether every params[i].grad is the TensorImpl at impls[i] (and, for a storage "
        "address other than 0, every param's storage starts there; for a grad_storage other "
        "than 0, every grad starts at element grad_offsets[i] of that storage)",
        pybind11::arg("params"), pybind11::arg("impls"), pybind11::arg("storage") = 0,
        pybind11::arg("grad_storage") = 0, pybind11::arg("grad_offsets") = std::nullopt);
  m.def("same_objects", &same_objects,
        "whether two lists hold the same objects in the same order (identity)");
  m.def("grads_match", &grads_match,
        "whether every present grad can be stepped as it is (else check in Python)");
  m.def("launch_key", &launch_key,
        "the params' and grads' addresses into key; false where one needs staging");
  m.def(
      "device_block_fields",
      [] {
        using namespace onepass;
        return std::map<std::string, int>{{"adam", kAdamBlock},
                                          {"sgd", kSgdBlock},
                                          {"lion", kLionBlock},
                                          {"novograd", kNovoGradBlock},
                                          {"fadam", kFAdamBlock}};
      },
      "how many float64 values a capturable step's hyperparameter block holds, per op "
      "(onepass/device_hyper.h)");
  m.def(
      "adam_",
      [](const py::list& params, const py::object& grads, at::Tensor exp_avg,
         at::Tensor exp_avg_sq, const Opt& max_exp_avg_sq, at::Tensor step,
         const at::Tensor& state_offsets, const Opt& grad_scale, const Opt& found_inf,
         const at::Tensor& lr, double beta1, double beta2, double eps, double weight_decay,
         double decay_coefficient, bool amsgrad, bool maximize, bool l2_decay,
         const Opt& master_param, int64_t sr_seed) {
        const auto fn = eager_kernel(&onepass::glue::EagerOps::adam, exp_avg);
        EagerCall(params, grads).run([&](const auto& tensors, const auto& grad_list) {
          fn(tensors, grad_list, exp_avg, exp_avg_sq, max_exp_avg_sq, step, state_offsets,
             grad_scale, found_inf, lr, beta1, beta2, eps, weight_decay, decay_coefficient, amsgrad,
             maximize, l2_decay, master_param, sr_seed);
        });
      },
      "torch.ops.onepass.adam_ without the dispatcher (eager calls only)");
  m.def(
      "sgd_",
      [](const py::list& params, const py::object& grads, const Opt& momentum_buffer,
         at::Tensor step, const at::Tensor& state_offsets, const Opt& grad_scale,
         const Opt& found_inf, const at::Tensor& lr, double momentum, double dampening,
         double weight_decay, double decay_coefficient, bool nesterov, bool maximize,
         bool l2_decay, const Opt& master_param, int64_t sr_seed) {
        const auto fn = eager_kernel(&onepass::glue::EagerOps::sgd, step);
        EagerCall(params, grads).run([&](const auto& tensors, const auto& grad_list) {
          fn(tensors, grad_list, momentum_buffer, step, state_offsets, grad_scale, found_inf, lr,
             momentum, dampening, weight_decay, decay_coefficient, nesterov, maximize, l2_decay,
             master_param, sr_seed);
        });
      },
      "torch.ops.onepass.sgd_ without the dispatcher (eager calls only)");
  m.def(
      "lion_",
      [](const py::list& params, const py::object& grads, at::Tensor exp_avg,
         at::Tensor step, const at::Tensor& state_offsets, const Opt& grad_scale,
         const Opt& found_inf, const at::Tensor& lr, double beta1, double beta2,
         double weight_decay, double decay_coefficient, bool maximize, bool l2_decay,
         const Opt& master_param, int64_t sr_seed) {
        const auto fn = eager_kernel(&onepass::glue::EagerOps::lion, exp_avg);
        EagerCall(params, grads).run([&](const auto& tensors, const auto& grad_list) {
          fn(tensors, grad_list, exp_avg, step, state_offsets, grad_scale, found_inf, lr, beta1,
             beta2, weight_decay, decay_coefficient, maximize, l2_decay, master_param, sr_seed);
        });
      },
      "torch.ops.onepass.lion_ without the dispatcher (eager calls only)");
  m.def(
      "muon_momentum_",
      [](const py::list& updates, const py::object& grads,
         at::Tensor momentum_buffer, at::Tensor step, const at::Tensor& state_offsets,
         const Opt& grad_scale, const Opt& found_inf, double momentum, bool nesterov) {
        const auto fn = eager_kernel(&onepass::glue::EagerOps::muon_momentum, momentum_buffer);
        EagerCall(updates, grads).run([&](const auto& tensors, const auto& grad_list) {
          fn(tensors, grad_list, momentum_buffer, step, state_offsets, grad_scale, found_inf,
             momentum, nesterov);
        });
      },
      "torch.ops.onepass.muon_momentum_ without the dispatcher (eager calls only)");
  m.def(
      "novograd_",
      [](const py::list& params, const py::object& grads, at::Tensor exp_avg,
         at::Tensor exp_avg_sq, const Opt& max_exp_avg_sq, at::Tensor step,
         const at::Tensor& state_offsets, const Opt& grad_scale, const Opt& found_inf,
         const at::Tensor& lr, double beta1, double beta2, double eps, double weight_decay,
         bool grad_averaging, bool amsgrad, bool maximize, const Opt& master_param,
         int64_t sr_seed) {
        const auto fn = eager_kernel(&onepass::glue::EagerOps::novograd, exp_avg);
        EagerCall(params, grads).run([&](const auto& tensors, const auto& grad_list) {
          fn(tensors, grad_list, exp_avg, exp_avg_sq, max_exp_avg_sq, step, state_offsets,
             grad_scale, found_inf, lr, beta1, beta2, eps, weight_decay, grad_averaging, amsgrad,
             maximize, master_param, sr_seed);
        });
      },
      "torch.ops.onepass.novograd_ without the dispatcher (eager calls only)");
  m.def(
      "fadam_",
      [](const py::list& params, const py::object& grads, at::Tensor fim,
         at::Tensor momentum, at::Tensor step, const at::Tensor& state_offsets,
         const Opt& grad_scale, const Opt& found_inf, const at::Tensor& lr, double beta1,
         double beta2, double eps, double clip, double p, double weight_decay, bool maximize,
         const Opt& master_param, int64_t sr_seed) {
        const auto fn = eager_kernel(&onepass::glue::EagerOps::fadam, fim);
        EagerCall(params, grads).run([&](const auto& tensors, const auto& grad_list) {
          fn(tensors, grad_list, fim, momentum, step, state_offsets, grad_scale, found_inf, lr,
             beta1, beta2, eps, clip, p, weight_decay, maximize, master_param, sr_seed);
        });
      },
      "torch.ops.onepass.fadam_ without the dispatcher (eager calls only)");
}
