// Torch-side helpers shared by the CPU ops (ops.cpp) and the CUDA ops (cuda/ops_cuda.cpp): argument
// checks and the host tensor table of one launch. Everything is checked before anything is
// written, so a refused call changes nothing.
#pragma once
#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <utility>
#include <vector>

#include "onepass/dtypes.h"
#include "onepass/table.h"

namespace onepass::glue {

using at::Tensor;
using OptionalTensorList = c10::List<std::optional<Tensor>>;

// The params and grads of an eager call, borrowed from their Python objects while the GIL is
// held: no refcounts. In torch 2.10+ a second C++ reference to a tensor that has a Python object
// increfs that object under the GIL, so owning copies of 4,000 params and grads cost ~0.3 ms a
// step. build_table has `borrow` fill a block of entries just before it reads them (the
// borrowing brings the tensors' metadata into cache, which the checks then find there). A CPU
// step long enough to matter to other Python threads (kReleaseGilElements) keeps the storages it
// will touch alive and calls `release_gil`: the kernels run without the GIL, on the table alone.
// Shorter steps, and CUDA ones (whose host work is short), keep the GIL and skip the refcounts.
struct EagerParams {
  std::vector<const Tensor*> tensors;
  std::function<void(int64_t, int64_t)> borrow;  // fills tensors[b:e] and the grads' entries
  std::function<void()> release_gil;
};
// ~5 ms of AdamW on 2 cores; numpy too keeps the GIL for short loops.
constexpr int64_t kReleaseGilElements = int64_t(1) << 24;
using EagerGrads = std::vector<const Tensor*>;  // null: no grad this step

// The two calling conventions every op implementation is instantiated for (its template
// argument): the dispatcher's lists, and an eager call's borrowed tensors.
struct Dispatched {
  using Params = at::TensorList;
  using Grads = OptionalTensorList;
};
struct Eager {
  using Params = EagerParams;
  using Grads = EagerGrads;
};

// Param i and grad i of either kind of call: the dispatcher's lists, or an eager call's. A
// dispatcher grad is a copy (the list holds IValues), so the caller keeps it while it reads.
inline int64_t param_count(at::TensorList params) { return static_cast<int64_t>(params.size()); }
inline int64_t param_count(const EagerParams& params) {
  return static_cast<int64_t>(params.tensors.size());
}
inline void borrow(at::TensorList, int64_t, int64_t) {}
inline void borrow(const EagerParams& params, int64_t begin, int64_t end) {
  params.borrow(begin, end);
}
inline const Tensor& param_at(at::TensorList params, int64_t i) { return params[i]; }
inline const Tensor& param_at(const EagerParams& params, int64_t i) {
  return *params.tensors[i];
}
inline std::optional<Tensor> grad_at(const OptionalTensorList& grads, int64_t i) {
  return grads[i];
}
inline const Tensor* grad_at(const EagerGrads& grads, int64_t i) { return grads[i]; }
inline const Tensor* present(const std::optional<Tensor>& g) {
  return g.has_value() && g->defined() ? &*g : nullptr;
}
inline const Tensor* present(const Tensor* g) { return g != nullptr && g->defined() ? g : nullptr; }

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
  std::vector<c10::Storage> storages;  // of borrowed params and grads, while the GIL is released
  std::vector<std::pair<Tensor, Tensor>> write_back;  // (param, contiguous temporary)
  at::ScalarType dtype = at::kFloat;       // the params'
  at::ScalarType grad_dtype = at::kFloat;  // the grads' (one for the launch; the params' if none)
  int64_t elements = 0;
  int64_t needed_state = 0;  // elements every flat state buffer must hold
};

// Checks a launch's tensors and builds its table. `device` is where every tensor must live;
// `host_steps` (CPU launches) fills Segment::step, GPU kernels read the device step instead.
template <class Params, class Grads>
Table build_table(const Params& params, const Grads& grads, const Tensor& step,
                  const Tensor& state_offsets, at::Device device, int64_t chunk_elements,
                  bool host_steps) {
  constexpr bool kBorrowed = std::is_same_v<Params, EagerParams>;
  const int64_t n = param_count(params);
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
  t.segments.reserve(n);
  t.stepped.reserve(n);
  const int64_t* offsets = state_offsets.data_ptr<int64_t>();
  const float* steps = host_steps ? step.data_ptr<float>() : nullptr;
  bool have_grad_dtype = false;  // the first grad sets the launch's grad dtype
  constexpr int64_t kBlock = 64;
  for (int64_t i = 0; i < n; ++i) {
    if (i % kBlock == 0) borrow(params, i, std::min(n, i + kBlock));
    if (i == 0) {
      t.dtype = param_at(params, 0).scalar_type();
      storage_dtype(t.dtype);
      t.grad_dtype = t.dtype;
    }
    // No Tensor copies here, of params or grads, unless a copy is needed: dropping a second
    // reference to a tensor that has a Python object takes the GIL (torch 2.10+).
    const auto& held = grad_at(grads, i);
    const Tensor* g = present(held);
    if (g == nullptr) continue;
    if (!have_grad_dtype) {
      t.grad_dtype = g->scalar_type();
      have_grad_dtype = true;
    }
    const Tensor& p = param_at(params, i);
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
    if (p.is_contiguous()) {
      s.param = p.data_ptr();
    } else {
      t.write_back.emplace_back(p, p.contiguous());
      s.param = t.write_back.back().second.data_ptr();
    }
    if (g->is_contiguous()) {
      s.grad = g->data_ptr();
    } else {
      t.keep_alive.push_back(g->contiguous());
      s.grad = t.keep_alive.back().data_ptr();
    }
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
  if constexpr (kBorrowed) {
    if (device.is_cpu() && t.elements >= kReleaseGilElements && params.release_gil) {
      t.storages.reserve(2 * t.segments.size());
      for (const Segment& s : t.segments) {
        t.storages.push_back(param_at(params, s.index).storage());
        t.storages.push_back(grad_at(grads, s.index)->storage());
      }
      params.release_gil();
    }
  }
  return t;
}

// The optional flat fp32 master weights every param-writing op takes last but one.
using OptTensor = std::optional<Tensor>;


// The ops' eager entry points, by device type. ops.cpp fills the CPU ones; ops_cuda.cpp (where
// built) the CUDA ones. Python calls them directly in eager mode: converting two 4,000-element
// lists to IValues for the dispatcher costs about a millisecond a step.
using AdamEager = void (*)(const EagerParams&, const EagerGrads&, Tensor, Tensor,
                           const std::optional<Tensor>&, Tensor, const Tensor&,
                           const std::optional<Tensor>&, const std::optional<Tensor>&,
                           const Tensor&, double, double, double, double, double, bool, bool,
                           bool, const OptTensor&, int64_t);
using SgdEager = void (*)(const EagerParams&, const EagerGrads&, const std::optional<Tensor>&, Tensor,
                          const Tensor&, const std::optional<Tensor>&,
                          const std::optional<Tensor>&, const Tensor&, double, double, double,
                          double, bool, bool, bool, const OptTensor&, int64_t);
using LionEager = void (*)(const EagerParams&, const EagerGrads&, Tensor, Tensor, const Tensor&,
                           const std::optional<Tensor>&, const std::optional<Tensor>&,
                           const Tensor&, double, double, double, double, bool, bool,
                           const OptTensor&, int64_t);
using MuonMomentumEager = void (*)(const EagerParams&, const EagerGrads&, Tensor, Tensor,
                                   const Tensor&, const std::optional<Tensor>&,
                                   const std::optional<Tensor>&, double, bool);
using NovoGradEager = void (*)(const EagerParams&, const EagerGrads&, Tensor, Tensor,
                               const std::optional<Tensor>&, Tensor, const Tensor&,
                               const std::optional<Tensor>&, const std::optional<Tensor>&,
                               const Tensor&, double, double, double, double, bool, bool, bool,
                               const OptTensor&, int64_t);
using FAdamEager = void (*)(const EagerParams&, const EagerGrads&, Tensor, Tensor, Tensor,
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
