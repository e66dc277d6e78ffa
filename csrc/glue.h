// Torch-side helpers shared by the CPU ops (ops.cpp) and the CUDA ops (cuda/ops_cuda.cpp): argument
// checks and the host tensor table of one launch. Everything is checked before anything is
// written, so a refused call changes nothing.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <utility>
#include <vector>

#include "onepass/dtypes.h"
#include "onepass/table.h"

namespace onepass::glue {

using at::Tensor;
using OptionalTensorList = c10::List<std::optional<Tensor>>;

inline DType storage_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK(false, "onepass: unsupported dtype ", t, " (use float32/64, bfloat16, float16)");
  }
}

// The host tensor table of one launch: the tensors of a bucket that have a grad this step.
struct Table {
  std::vector<Segment> segments;  // non-empty tensors with a grad
  std::vector<Chunk> chunks;      // their elements cut into units of parallel work
  std::vector<int64_t> stepped;   // bucket index of every tensor with a grad (empty ones too)
  std::vector<Tensor> keep_alive;  // contiguous copies of non-contiguous grads
  std::vector<std::pair<Tensor, Tensor>> write_back;  // (param, contiguous temporary)
  at::ScalarType dtype = at::kFloat;       // the params'
  at::ScalarType grad_dtype = at::kFloat;  // the grads' (one for the launch; the params' if none)
  int64_t elements = 0;
  int64_t needed_state = 0;  // elements every flat state buffer must hold
};

// Checks a launch's tensors and builds its table. `device` is where every tensor must live;
// `host_steps` (CPU launches) fills Segment::step, GPU kernels read the device step instead.
template <class Grads>
Table build_table(at::TensorList params, const Grads& grads,
                         const Tensor& step, const Tensor& state_offsets, at::Device device,
                         int64_t chunk_elements, bool host_steps) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n, "onepass: ", n, " params but ",
              grads.size(), " grads");
  TORCH_CHECK(n > 0, "onepass: empty bucket");
  TORCH_CHECK(state_offsets.device().is_cpu() && state_offsets.scalar_type() == at::kLong &&
                  state_offsets.numel() == n && state_offsets.is_contiguous(),
              "onepass: state_offsets must be a contiguous int64 CPU tensor, one entry per param");
  TORCH_CHECK(step.device() == device && step.scalar_type() == at::kFloat && step.numel() == n &&
                  step.is_contiguous(),
              "onepass: step must be a contiguous float32 tensor on ", device,
              " with one entry per param");
  Table t;
  t.dtype = params[0].scalar_type();
  storage_dtype(t.dtype);
  t.grad_dtype = t.dtype;
  for (int64_t i = 0; i < n; ++i) {  // the first grad sets the launch's grad dtype
    const std::optional<Tensor> g = grads[i];
    if (g.has_value() && g->defined()) {
      t.grad_dtype = g->scalar_type();
      break;
    }
  }
  const int64_t* offsets = state_offsets.data_ptr<int64_t>();
  const float* steps = host_steps ? step.data_ptr<float>() : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    const std::optional<Tensor> g = grads[i];
    if (!g.has_value() || !g->defined()) continue;
    const Tensor& p = params[i];
    TORCH_CHECK(p.device() == device, "onepass: params[", i, "] is on ", p.device(),
                ", expected ", device);
    TORCH_CHECK(p.scalar_type() == t.dtype, "onepass: params[", i, "] has dtype ",
                p.scalar_type(), " but its bucket holds ", t.dtype);
    TORCH_CHECK(g->layout() == at::kStrided, "onepass: grads[", i,
                "] is sparse, which is not supported");
    TORCH_CHECK(g->device() == p.device(), "onepass: grads[", i, "] is on ", g->device(),
                " but its param is on ", p.device());
    TORCH_CHECK(g->scalar_type() == t.grad_dtype, "onepass: grads[", i, "] has dtype ",
                g->scalar_type(), " but the bucket's other grads have ", t.grad_dtype);
    TORCH_CHECK(g->sizes() == p.sizes(), "onepass: grads[", i, "] has shape ", g->sizes(),
                " but its param has ", p.sizes());
    t.stepped.push_back(i);
    const int64_t numel = p.numel();
    if (numel == 0) continue;  // zero-size tensors are legal; they only advance their step
    Segment s{};
    s.numel = numel;
    s.state_offset = offsets[i];
    s.index = i;
    s.step = steps != nullptr ? static_cast<double>(steps[i]) + 1.0 : 0.0;
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
    t.elements += numel;
    t.needed_state = std::max(t.needed_state, s.state_offset + numel);
  }
  for (int64_t k = 0; k < static_cast<int64_t>(t.segments.size()); ++k) {
    const int64_t numel = t.segments[k].numel;
    for (int64_t b = 0; b < numel; b += chunk_elements) {
      t.chunks.push_back(Chunk{k, b, std::min(numel, b + chunk_elements)});
    }
  }
  return t;
}

// The optional flat fp32 master weights every param-writing op takes last but one.
using OptTensor = std::optional<Tensor>;

// Grads as eager calls pass them (a Python list through pybind11), next to the dispatcher's
// c10::List: every op implementation is a template over the two.
using EagerGrads = std::vector<std::optional<Tensor>>;

// The ops' eager entry points, by device type. ops.cpp fills the CPU ones; ops_cuda.cpp (where
// built) the CUDA ones. Python calls them directly in eager mode: converting two 4,000-element
// lists to IValues for the dispatcher costs about a millisecond a step.
using AdamEager = void (*)(at::TensorList, const EagerGrads&, Tensor, Tensor,
                           const std::optional<Tensor>&, Tensor, const Tensor&,
                           const std::optional<Tensor>&, const std::optional<Tensor>&,
                           const Tensor&, double, double, double, double, double, bool, bool,
                           bool, const OptTensor&, int64_t);
using SgdEager = void (*)(at::TensorList, const EagerGrads&, const std::optional<Tensor>&, Tensor,
                          const Tensor&, const std::optional<Tensor>&,
                          const std::optional<Tensor>&, const Tensor&, double, double, double,
                          double, bool, bool, bool, const OptTensor&, int64_t);
using LionEager = void (*)(at::TensorList, const EagerGrads&, Tensor, Tensor, const Tensor&,
                           const std::optional<Tensor>&, const std::optional<Tensor>&,
                           const Tensor&, double, double, double, double, bool, bool,
                           const OptTensor&, int64_t);
using MuonMomentumEager = void (*)(at::TensorList, const EagerGrads&, Tensor, Tensor,
                                   const Tensor&, const std::optional<Tensor>&,
                                   const std::optional<Tensor>&, double, bool);
using NovoGradEager = void (*)(at::TensorList, const EagerGrads&, Tensor, Tensor,
                               const std::optional<Tensor>&, Tensor, const Tensor&,
                               const std::optional<Tensor>&, const std::optional<Tensor>&,
                               const Tensor&, double, double, double, double, bool, bool, bool,
                               const OptTensor&, int64_t);
using FAdamEager = void (*)(at::TensorList, const EagerGrads&, Tensor, Tensor, Tensor,
                            const Tensor&, const std::optional<Tensor>&,
                            const std::optional<Tensor>&, const Tensor&, double, double, double,
                            double, double, double, bool, const OptTensor&, int64_t);
struct EagerOps {
  AdamEager adam = nullptr;
  SgdEager sgd = nullptr;
  LionEager lion = nullptr;
  MuonMomentumEager muon_momentum = nullptr;
  NovoGradEager novograd = nullptr;
  FAdamEager fadam = nullptr;
};
inline EagerOps& eager_ops(c10::DeviceType device) {
  static EagerOps cpu, cuda;
  TORCH_CHECK(device == c10::DeviceType::CPU || device == c10::DeviceType::CUDA,
              "onepass: no kernels for ", device);
  return device == c10::DeviceType::CPU ? cpu : cuda;
}

// A flat state buffer: on the launch's device, in `dtype`, large enough.
inline void check_state(const Tensor& buf, const char* name, const Table& t, at::Device device,
                        at::ScalarType dtype) {
  TORCH_CHECK(buf.device() == device, "onepass: state '", name, "' must be on ", device);
  TORCH_CHECK(buf.scalar_type() == dtype, "onepass: state '", name, "' has dtype ",
              buf.scalar_type(), ", expected ", dtype, " (every state slot has one dtype)");
  TORCH_CHECK(buf.is_contiguous() && buf.numel() >= t.needed_state, "onepass: state '", name,
              "' must be a contiguous buffer of at least ", t.needed_state, " elements");
}

// The storage layout of a launch: the params' and grads' dtypes from the table, the state's
// from `state` (a slot buffer; absent, as for SGD without momentum: the params' dtype), and
// master weights when `master` is given (checked here: a float32 flat buffer for 16-bit params).
// Refuses a combination the kernels are not built for.
// `workspace`: the "params" are Muon's update workspace, which may be fp32 beside 16-bit grads
// (a layout no optimizer's params take).
inline Layout check_layout(const Table& t, const std::optional<Tensor>& state,
                           const std::optional<Tensor>& master, at::Device device,
                           bool workspace = false) {
  // Without state slots (SGD without momentum) the state dtype is moot: one that has kernels.
  const at::ScalarType state_dtype =
      state.has_value() ? state->scalar_type() : (master.has_value() ? at::kFloat : t.dtype);
  Layout layout{storage_dtype(t.dtype), storage_dtype(t.grad_dtype), storage_dtype(state_dtype),
                master.has_value()};
  if (master.has_value()) {
    TORCH_CHECK(t.dtype == at::kBFloat16 || t.dtype == at::kHalf,
                "onepass: master weights are for bfloat16/float16 params, not ", t.dtype);
    check_state(*master, "master_param", t, device, at::kFloat);
  }
  const bool narrower_grads = at::elementSize(t.grad_dtype) < at::elementSize(t.dtype);
  TORCH_CHECK(layout_supported(layout) && (workspace || !narrower_grads),
              "onepass: no kernels for ", t.dtype, " params with ",
              t.grad_dtype, " grads and ", state_dtype, " state",
              master.has_value() ? " and float32 master weights" : "",
              "; supported: one dtype throughout, float32 state, bfloat16 state for float32 or "
              "bfloat16 params, float32 grads for 16-bit params, float32 master weights for "
              "16-bit params (float64 only alone)");
  return layout;
}

// A per-tensor scalar state buffer (NovoGrad's second moment): one element per param of the
// bucket, float32 (float64 for float64 params), contiguous, on the launch's device.
inline void check_scalar_state(const Tensor& buf, const char* name, const Table& t, int64_t n,
                               at::Device device) {
  const at::ScalarType dtype = t.dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(buf.device() == device, "onepass: state '", name, "' must be on ", device);
  TORCH_CHECK(buf.scalar_type() == dtype, "onepass: state '", name, "' has dtype ",
              buf.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(buf.is_contiguous() && buf.numel() == n, "onepass: state '", name,
              "' must be a contiguous buffer of ", n, " elements (one per param)");
}

// The AMP scalars: a one-element float32 tensor on the launch's device, or absent.
inline void check_amp_scalar(const std::optional<Tensor>& x, const char* name, at::Device device) {
  if (!x.has_value()) return;
  TORCH_CHECK(x->numel() == 1 && x->scalar_type() == at::kFloat && x->device() == device,
              "onepass: ", name, " must be a one-element float32 tensor on ", device);
}

// Copies results back into non-contiguous params.
inline void write_back(Table& t) {
  for (auto& [param, tmp] : t.write_back) param.copy_(tmp);
}

}  // namespace onepass::glue
