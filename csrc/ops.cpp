// The torch side of onepass: operator schemas (TORCH_LIBRARY) and their CPU implementations.
// All torch work happens here: argument checks, contiguity, the tensor table and the thread pool.
// The kernels under csrc/cpu see plain pointers (csrc/cpu/cpu_kernels.h). CUDA implementations
// register themselves from a separate file, built only where CUDA is available.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "cpu/cpu_kernels.h"

namespace onepass {
namespace {

using at::Tensor;
using OptionalTensorList = c10::List<std::optional<Tensor>>;

DType storage_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "onepass: unsupported dtype ", t, " (use float32/64, bfloat16, float16)");
  }
}

// Elements per unit of parallel work: a few hundred KiB per array, so a chunk's lines stay in L2.
constexpr int64_t kChunkElements = int64_t(1) << 15;
// Below this many elements a step runs on the calling thread: waking the pool costs more.
constexpr int64_t kSerialElements = int64_t(1) << 16;

// The tensor table of one launch, built from the bucket's lists. Params with no grad this step
// are skipped. Everything is checked before anything is written, so a refused call changes nothing.
struct Table {
  std::vector<Segment> segments;
  std::vector<Chunk> chunks;
  std::vector<Tensor> keep_alive;  // contiguous copies of non-contiguous grads / params
  std::vector<std::pair<Tensor, Tensor>> write_back;  // (param, contiguous temporary)
  at::ScalarType dtype;
  int64_t elements = 0;
  bool skip = false;  // found_inf was set: no param, state or step changes
  double grad_scale = 1.0;
};

void check_state(const Tensor& buf, const char* name, at::ScalarType dtype, int64_t needed) {
  TORCH_CHECK(buf.device().is_cpu(), "onepass: state '", name, "' must be on the CPU");
  TORCH_CHECK(buf.scalar_type() == dtype, "onepass: state '", name, "' has dtype ",
              buf.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(buf.is_contiguous() && buf.numel() >= needed, "onepass: state '", name,
              "' must be a contiguous buffer of at least ", needed, " elements");
}

Table build_table(at::TensorList params, const OptionalTensorList& grads, const Tensor& step,
                  const Tensor& state_offsets, const std::optional<Tensor>& grad_scale,
                  const std::optional<Tensor>& found_inf, bool maximize) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n, "onepass: ", n, " params but ",
              grads.size(), " grads");
  TORCH_CHECK(n > 0, "onepass: empty bucket");
  TORCH_CHECK(state_offsets.device().is_cpu() && state_offsets.scalar_type() == at::kLong &&
                  state_offsets.numel() == n && state_offsets.is_contiguous(),
              "onepass: state_offsets must be a contiguous int64 CPU tensor with one entry per param");
  TORCH_CHECK(step.device().is_cpu() && step.scalar_type() == at::kFloat && step.numel() == n &&
                  step.is_contiguous(),
              "onepass: step must be a contiguous float32 CPU tensor with one entry per param");
  Table t;
  t.dtype = params[0].scalar_type();
  storage_dtype(t.dtype);
  if (found_inf.has_value()) {
    TORCH_CHECK(found_inf->numel() == 1, "onepass: found_inf must have one element");
    t.skip = found_inf->item<double>() != 0.0;
  }
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->numel() == 1, "onepass: grad_scale must have one element");
    t.grad_scale = 1.0 / grad_scale->item<double>();
  }
  if (maximize) t.grad_scale = -t.grad_scale;

  const int64_t* offsets = state_offsets.data_ptr<int64_t>();
  const float* steps = step.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const std::optional<Tensor> g = grads[i];
    if (!g.has_value() || !g->defined()) continue;
    const Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu(), "onepass: params[", i, "] is on ", p.device(),
                "; the cpu backend steps CPU tensors");
    TORCH_CHECK(p.scalar_type() == t.dtype, "onepass: params[", i, "] has dtype ", p.scalar_type(),
                " but its bucket holds ", t.dtype);
    TORCH_CHECK(g->layout() == at::kStrided, "onepass: grads[", i, "] is sparse, which is not supported");
    TORCH_CHECK(g->device() == p.device(), "onepass: grads[", i, "] is on ", g->device(),
                " but its param is on ", p.device());
    TORCH_CHECK(g->scalar_type() == t.dtype, "onepass: grads[", i, "] has dtype ",
                g->scalar_type(), " but its param has ", t.dtype);
    TORCH_CHECK(g->sizes() == p.sizes(), "onepass: grads[", i, "] has shape ", g->sizes(),
                " but its param has ", p.sizes());
    Segment s{};
    s.numel = p.numel();
    s.state_offset = offsets[i];
    s.index = i;
    s.step = static_cast<double>(steps[i]) + 1.0;
    if (s.numel == 0) continue;  // zero-size tensors are legal; they only advance their step
    Tensor pc = p;
    if (!p.is_contiguous()) {
      pc = p.contiguous();
      t.write_back.emplace_back(p, pc);
    }
    Tensor gc = g->contiguous();
    s.param = pc.data_ptr();
    s.grad = gc.data_ptr();
    t.keep_alive.push_back(std::move(gc));
    t.segments.push_back(s);
    t.elements += s.numel;
  }
  for (int64_t k = 0; k < static_cast<int64_t>(t.segments.size()); ++k) {
    const int64_t numel = t.segments[k].numel;
    for (int64_t b = 0; b < numel; b += kChunkElements) {
      t.chunks.push_back(Chunk{k, b, std::min(numel, b + kChunkElements)});
    }
  }
  return t;
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
void finish(Table& t, at::TensorList params, const OptionalTensorList& grads, Tensor& step) {
  for (auto& [param, tmp] : t.write_back) param.copy_(tmp);
  float* steps = step.data_ptr<float>();
  for (int64_t i = 0; i < static_cast<int64_t>(params.size()); ++i) {
    const std::optional<Tensor> g = grads[i];
    if (g.has_value() && g->defined()) steps[i] += 1.0f;
  }
}

void adam_cpu(at::TensorList params, const OptionalTensorList& grads, Tensor exp_avg,
              Tensor exp_avg_sq, const std::optional<Tensor>& max_exp_avg_sq, Tensor step,
              const Tensor& state_offsets, const std::optional<Tensor>& grad_scale,
              const std::optional<Tensor>& found_inf, double lr, double beta1, double beta2,
              double eps, double weight_decay, double decay_factor, bool amsgrad, bool maximize,
              bool l2_decay) {
  Table t = build_table(params, grads, step, state_offsets, grad_scale, found_inf, maximize);
  if (t.skip) return;
  int64_t needed = 0;
  for (const Segment& s : t.segments) needed = std::max(needed, s.state_offset + s.numel);
  check_state(exp_avg, "exp_avg", t.dtype, needed);
  check_state(exp_avg_sq, "exp_avg_sq", t.dtype, needed);
  TORCH_CHECK(!amsgrad || max_exp_avg_sq.has_value(), "onepass: amsgrad needs max_exp_avg_sq");
  if (amsgrad) check_state(*max_exp_avg_sq, "max_exp_avg_sq", t.dtype, needed);

  cpu::AdamLaunch launch{};
  launch.dtype = storage_dtype(t.dtype);
  launch.segments = t.segments.data();
  launch.chunks = t.chunks.data();
  launch.exp_avg = exp_avg.data_ptr();
  launch.exp_avg_sq = exp_avg_sq.data_ptr();
  launch.max_exp_avg_sq = amsgrad ? max_exp_avg_sq->data_ptr() : nullptr;
  launch.hyper = AdamHyper{lr, beta1, beta2, eps, weight_decay, decay_factor, t.grad_scale};
  launch.amsgrad = amsgrad;
  launch.l2_decay = l2_decay;
  const auto kernel = cpu::kernels().adam;
  run_chunks(t, [&](int64_t b, int64_t e) { kernel(launch, b, e); });
  finish(t, params, grads, step);
}

void sgd_cpu(at::TensorList params, const OptionalTensorList& grads,
             const std::optional<Tensor>& momentum_buffer, Tensor step,
             const Tensor& state_offsets, const std::optional<Tensor>& grad_scale,
             const std::optional<Tensor>& found_inf, double lr, double momentum, double dampening,
             double weight_decay, double decay_factor, bool nesterov, bool maximize,
             bool l2_decay) {
  Table t = build_table(params, grads, step, state_offsets, grad_scale, found_inf, maximize);
  if (t.skip) return;
  const bool has_momentum = momentum != 0.0;
  if (has_momentum) {
    TORCH_CHECK(momentum_buffer.has_value(), "onepass: momentum != 0 needs momentum_buffer");
    int64_t needed = 0;
    for (const Segment& s : t.segments) needed = std::max(needed, s.state_offset + s.numel);
    check_state(*momentum_buffer, "momentum_buffer", t.dtype, needed);
  }
  cpu::SgdLaunch launch{};
  launch.dtype = storage_dtype(t.dtype);
  launch.segments = t.segments.data();
  launch.chunks = t.chunks.data();
  launch.momentum_buffer = has_momentum ? momentum_buffer->data_ptr() : nullptr;
  launch.hyper = SgdHyper{lr, momentum, dampening, weight_decay, decay_factor, t.grad_scale};
  launch.momentum = has_momentum;
  launch.nesterov = nesterov;
  launch.l2_decay = l2_decay;
  const auto kernel = cpu::kernels().sgd;
  run_chunks(t, [&](int64_t b, int64_t e) { kernel(launch, b, e); });
  finish(t, params, grads, step);
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
      "Tensor? found_inf, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "float decay_factor, bool amsgrad, bool maximize, bool l2_decay) -> ()");
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)? momentum_buffer, Tensor(e!) step, "
      "Tensor state_offsets, Tensor? grad_scale, Tensor? found_inf, float lr, float momentum, "
      "float dampening, float weight_decay, float decay_factor, bool nesterov, bool maximize, "
      "bool l2_decay) -> ()");
  m.def("cpu_capability() -> str", &onepass::cpu_capability);
  m.def("cpu_capabilities() -> str[]", &onepass::cpu_capabilities);
  m.def("set_cpu_capability(str name) -> ()", &onepass::set_cpu_capability);
}

TORCH_LIBRARY_IMPL(onepass, CPU, m) {
  m.impl("adam_", &onepass::adam_cpu);
  m.impl("sgd_", &onepass::sgd_cpu);
}

// `import onepass._C` loads this library, which registers the operators above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "onepass native operators", -1,
                               nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
