// Torch-side helpers shared by the CPU ops (ops.cpp) and the CUDA ops (cuda/ops_cuda.cpp): argument
// checks and the host tensor table of one launch. Everything is checked before anything is
// written, so a refused call changes nothing.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/COW.h>

#include <atomic>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string_view>
#include <thread>
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
  // borrow(b, e, concurrently) fills tensors[b:e] and the grads' entries. With `concurrently`
  // it may run on any thread while the GIL holder waits for it: it then only reads Python
  // objects, and returns false where it cannot (an item that is not exactly a Tensor or a
  // Parameter: a subclass's isinstance may run Python).
  std::function<bool(int64_t, int64_t, bool)> borrow;
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
  params.borrow(begin, end, /*concurrently=*/false);
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


// The value of a one-element floating-point CPU tensor, read from memory: Tensor::item goes
// through the dispatcher (~20 us a call once a step has flushed the caches).
inline double host_scalar(const Tensor& x) {
  TORCH_CHECK(x.numel() == 1 && x.device().is_cpu(), "onepass: expected a one-element CPU tensor");
  // Only a plain tensor's memory holds its value: not a negative or conjugate view, a zero
  // tensor, or a subclass.
  if (x.is_neg() || x.is_conj() || x._is_zerotensor() || !x.has_storage() ||
      x.unsafeGetTensorImpl()->is_python_dispatch()) {
    return x.item<double>();
  }
  switch (x.scalar_type()) {
    case at::kFloat: return *x.const_data_ptr<float>();
    case at::kDouble: return *x.const_data_ptr<double>();
    case at::kBFloat16: return static_cast<float>(*x.const_data_ptr<at::BFloat16>());
    case at::kHalf: return static_cast<float>(*x.const_data_ptr<at::Half>());
    default: return x.item<double>();
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

// Whether every element of t lies in memory its storage holds. A storage freed by resizing it to
// 0 bytes (as FSDP frees a param's) still gives a view at an offset a non-null data pointer;
// a Python subclass without storage (a wrapper) has none. Zero-size tensors need none.
inline bool has_memory(const Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (impl->numel() == 0) return true;
  if (!impl->has_storage()) return false;
  const c10::Storage& storage = impl->unsafe_storage();
  if (storage.data() == nullptr) return false;
  int64_t last = impl->storage_offset();
  const auto sizes = impl->sizes();
  const auto strides = impl->strides();
  for (size_t d = 0; d < sizes.size(); ++d) last += (sizes[d] - 1) * strides[d];
  return (last + 1) * static_cast<int64_t>(impl->itemsize()) <=
         static_cast<int64_t>(storage.nbytes());
}

// Whether the kernels may read and write t's memory as it is: contiguous, and no lazy negation
// or conjugation (torch._neg_view: the memory holds -t).
inline bool plain_memory(const Tensor& t) {
  return t.is_contiguous() && !t.is_neg() && !t.is_conj();
}

// Whether a param and its grad pass every check of build_table and need no contiguous copy: the
// common case, which the parallel scan handles alone (anything else goes to the serial scan,
// which explains a refusal).
inline bool usable_as_is(const Tensor& p, const Tensor& g, at::ScalarType dtype,
                         at::ScalarType grad_dtype, at::Device device) {
  return p.device() == device && p.scalar_type() == dtype && g.layout() == at::kStrided &&
         g.device() == device && g.scalar_type() == grad_dtype && g.sizes() == p.sizes() &&
         plain_memory(p) && plain_memory(g) && has_memory(p) && has_memory(g);
}

// Tensors are borrowed and checked a block at a time (EagerParams::borrow).
constexpr int64_t kTableBlock = 64;
// An eager CPU call with at least this many tensors is scanned by all of torch's threads: after a
// step has streamed its buffers through the caches, every tensor's metadata is a chain of cache
// and TLB misses (~0.25 us a tensor on one core), which each core resolves on its own.
constexpr int64_t kParallelScanTensors = 1024;

// How many parts a scan of n list items takes on torch's threads: 0 where it stays on the calling
// thread (one thread, a short list, or already inside a parallel region).
inline int64_t scan_parts(int64_t n) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || n < kParallelScanTensors || at::in_parallel_region()) return 0;
  return std::min(threads, (n + kTableBlock - 1) / kTableBlock);
}

// Runs fn(k, begin, end, on_caller_thread) for the k-th of `parts` ranges of [0, n), on torch's
// threads. Ranges are whole blocks of kTableBlock items, so that borrowing stays in blocks;
// `on_caller_thread` says whether fn runs on the thread that called (the GIL holder's).
template <class Fn>
void for_each_part(int64_t n, int64_t parts, const Fn& fn) {
  const int64_t blocks = (n + kTableBlock - 1) / kTableBlock;
  const std::thread::id caller = std::this_thread::get_id();
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
    const bool on_caller_thread = std::this_thread::get_id() == caller;
    for (int64_t k = first; k < last; ++k) {
      fn(k, blocks * k / parts * kTableBlock, std::min(n, blocks * (k + 1) / parts * kTableBlock),
         on_caller_thread);
    }
  });
}

// Whether GPU launches scan in parallel too: yes, unless ONEPASS_PARALLEL_SCAN_CUDA=0 (an A/B
// switch for bench/host_time.py). On an H200 machine (16 threads) it cut the host time of a
// 4,000-tensor AdamW step from 429 to 292 us (median; bench/GPU_RESULTS.md, run 4).
inline bool parallel_scan_on_gpu() {
  static const bool on = [] {
    const char* value = std::getenv("ONEPASS_PARALLEL_SCAN_CUDA");
    return value == nullptr || std::string_view(value) != "0";
  }();
  return on;
}

// How many tables (and clip norms) the parallel scans have read (tests: _C.parallel_scans).
inline std::atomic<int64_t>& parallel_scans() {
  static std::atomic<int64_t> count{0};
  return count;
}

// The table's entries for the tensors of a contiguous range of a bucket, as the parallel scan
// finds them (params' data pointers still unset); `usable` is false once it meets a tensor the
// serial scan must handle. Own cache lines: each thread updates its part per tensor.
struct alignas(64) TablePart {
  std::vector<Segment> segments;
  // Per segment, where a param's data pointer is still to be read on the GIL holder's thread
  // (Segment::param null): its storage and its byte offset in it. {nullptr, 0} where it is set.
  std::vector<std::pair<c10::StorageImpl*, int64_t>> param_storages;
  std::vector<int64_t> stepped;
  std::optional<at::ScalarType> grad_dtype;  // the range's first grad's
  int64_t elements = 0;
  int64_t needed_state = 0;
  bool usable = true;
};

inline Segment segment_of(int64_t i, int64_t numel, const int64_t* offsets, const float* steps,
                          void* param, const void* grad) {
  Segment s{};
  s.param = param;
  s.grad = grad;
  s.numel = numel;
  s.state_offset = offsets[i];
  s.index = i;
  s.step = steps != nullptr ? static_cast<double>(steps[i]) + 1.0 : 0.0;
  return s;
}

// Whether a storage materialises its data on first mutable access (torch >= 2.12 has
// materialisers; a template, so that the requires-expression is checked only where it is used).
template <class Storage>
bool has_materializer(const Storage& storage) {
  if constexpr (requires { storage.has_materializer(); }) {
    return storage.has_materializer();
  } else {
    return false;
  }
}

// Whether a tensor's storage hands out its mutable data pointer without materialising anything
// (not copy-on-write, no materialiser where torch has them): at::parallel_for refuses that.
inline bool plain_storage(const Tensor& t) {
  const c10::StorageImpl* storage =
      t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl();
  if (storage == nullptr || c10::impl::cow::is_cow_data_ptr(storage->data_ptr())) return false;
  return !has_materializer(*storage);
}

// The parallel scan of params[begin:end] (an eager call's borrowed tensors), off the GIL
// holder's thread: it only reads, and gives up (part.usable = false) on anything but the common
// case. Never on a worker:
// - a Python-dispatch tensor subclass, whose sizes or device may call into Python (which needs
//   the GIL, held by the waiting caller: a deadlock);
// - a param's mutable data pointer, whose access may materialise a copy-on-write storage or
//   warn: the calling thread (`on_caller_thread`, which holds the GIL) reads those of its own
//   part whose storage needs no materialising here, the rest after the parallel region.
template <class Grads>
void scan_part(const EagerParams& params, const Grads& grads, int64_t begin, int64_t end,
               at::ScalarType dtype, at::Device device, const int64_t* offsets,
               const int64_t* numels, const float* steps, bool on_caller_thread,
               TablePart& part) {
  try {
    for (int64_t b = begin; b < end; b += kTableBlock) {
      const int64_t e = std::min(end, b + kTableBlock);
      if (!params.borrow(b, e, /*concurrently=*/true)) {
        part.usable = false;
        return;
      }
      for (int64_t i = b; i < e; ++i) {
        const Tensor* g = present(grad_at(grads, i));
        if (g == nullptr) continue;
        const Tensor& p = param_at(params, i);
        if (p.unsafeGetTensorImpl()->is_python_dispatch() ||
            g->unsafeGetTensorImpl()->is_python_dispatch()) {
          part.usable = false;
          return;
        }
        if (!part.grad_dtype.has_value()) part.grad_dtype = g->scalar_type();
        if (!usable_as_is(p, *g, dtype, *part.grad_dtype, device)) {
          part.usable = false;
          return;
        }
        const int64_t numel = p.numel();
        if (numel != numels[i]) {  // resized since its state was laid out: explained serially
          part.usable = false;
          return;
        }
        part.stepped.push_back(i);
        if (numel == 0) continue;
        const void* grad = g->const_data_ptr();
        if (grad == nullptr) {
          part.usable = false;
          return;
        }
        // Null: read after the parallel region (materialising a storage is refused inside one),
        // from the storage and offset found here.
        void* param = on_caller_thread && plain_storage(p) ? p.data_ptr() : nullptr;
        part.segments.push_back(segment_of(i, numel, offsets, steps, param, grad));
        if (param == nullptr) {
          const c10::TensorImpl* impl = p.unsafeGetTensorImpl();
          part.param_storages.emplace_back(impl->unsafe_storage().unsafeGetStorageImpl(),
                                           impl->storage_offset() * impl->itemsize());
        } else {
          part.param_storages.emplace_back(nullptr, 0);
        }
        part.elements += numel;
        part.needed_state = std::max(part.needed_state, offsets[i] + numel);
      }
    }
  } catch (...) {  // the serial scan meets it again and explains it
    part.usable = false;
  }
}

// Scans an eager call's tensors on all of torch's threads into `t` (see kParallelScanTensors).
// False, with `t` untouched, where some tensor needs the serial scan: a refusal, a copy, a
// Tensor subclass, grads of more than one dtype, a tensor without data.
template <class Grads>
bool scan_in_parallel(const EagerParams& params, const Grads& grads, const int64_t* offsets,
                      const int64_t* numels, const float* steps, at::Device device, Table& t) {
  const int64_t n = param_count(params);
  const int64_t nparts = scan_parts(n);
  if (nparts == 0 || !params.borrow || (!device.is_cpu() && !parallel_scan_on_gpu())) {
    return false;
  }
  // Param 0 sets the bucket's dtype, as in the serial scan.
  if (!params.borrow(0, 1, /*concurrently=*/false)) return false;
  const at::ScalarType dtype = param_at(params, 0).scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kBFloat16 &&
      dtype != at::kHalf) {
    return false;
  }
  std::vector<TablePart> parts(nparts);
  for_each_part(n, nparts, [&](int64_t k, int64_t begin, int64_t end, bool on_caller_thread) {
    scan_part(params, grads, begin, end, dtype, device, offsets, numels, steps,
              on_caller_thread, parts[k]);
  });
  std::optional<at::ScalarType> grad_dtype;
  size_t segments = 0, stepped = 0;
  for (const TablePart& part : parts) {
    if (!part.usable) return false;
    if (part.grad_dtype.has_value()) {
      if (grad_dtype.has_value() && *grad_dtype != *part.grad_dtype) return false;
      grad_dtype = part.grad_dtype;
    }
    segments += part.segments.size();
    stepped += part.stepped.size();
  }
  Table scanned;
  scanned.dtype = dtype;
  scanned.grad_dtype = grad_dtype.value_or(dtype);
  scanned.segments.reserve(segments);
  scanned.stepped.reserve(stepped);
  std::vector<std::pair<c10::StorageImpl*, int64_t>> param_storages;
  param_storages.reserve(segments);
  for (const TablePart& part : parts) {
    scanned.segments.insert(scanned.segments.end(), part.segments.begin(), part.segments.end());
    scanned.stepped.insert(scanned.stepped.end(), part.stepped.begin(), part.stepped.end());
    param_storages.insert(param_storages.end(), part.param_storages.begin(),
                          part.param_storages.end());
    scanned.elements += part.elements;
    scanned.needed_state = std::max(scanned.needed_state, part.needed_state);
  }
  // The data pointers of the params other threads scanned, here on the GIL holder's thread, as
  // Tensor::data_ptr() gives them (the storage's mutable pointer, with its checks and any
  // materialising, plus the offset): only the storage's first 64 bytes are read (the pointer
  // and the check flags; one or two lines at malloc's 16-byte alignment), prefetched ahead.
  constexpr size_t kAhead = 16;
  const size_t count = scanned.segments.size();
  for (size_t k = 0; k < count; ++k) {
    if (k + kAhead < count && param_storages[k + kAhead].first != nullptr) {
      const char* ahead = reinterpret_cast<const char*>(param_storages[k + kAhead].first);
      __builtin_prefetch(ahead);
      __builtin_prefetch(ahead + 63);
    }
    const auto [storage, byte_offset] = param_storages[k];
    if (storage == nullptr) continue;  // read by this thread during the scan
    char* data = static_cast<char*>(storage->mutable_data());
    if (data == nullptr) return false;
    scanned.segments[k].param = data + byte_offset;
  }
  t = std::move(scanned);
  parallel_scans().fetch_add(1, std::memory_order_relaxed);
  return true;
}

// The serial scan: every check, with a message naming the tensor that fails it, and contiguous
// copies of non-contiguous params (written back after the step) and grads.
template <class Params, class Grads>
void scan_serially(const Params& params, const Grads& grads, const int64_t* offsets,
                   const int64_t* numels, const float* steps, at::Device device, Table& t) {
  const int64_t n = param_count(params);
  bool have_grad_dtype = false;  // the first grad sets the launch's grad dtype
  for (int64_t i = 0; i < n; ++i) {
    if (i % kTableBlock == 0) borrow(params, i, std::min(n, i + kTableBlock));
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
    if (!usable_as_is(p, *g, t.dtype, t.grad_dtype, device)) {
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
    }
    const int64_t numel = p.numel();
    // Its state was laid out for numels[i] elements: a param resized since (p.data = a tensor
    // of another size) would step stale state, or write into the next param's.
    TORCH_CHECK(numel == numels[i], "onepass: params[", i, "] has ", numel,
                " elements, but its optimizer state was built for ", numels[i],
                " (was its .data replaced by a tensor of another shape?)");
    t.stepped.push_back(i);
    if (numel == 0) continue;  // zero-size tensors are legal; they only advance their step
    // A Tensor subclass without storage (a wrapper), or a freed storage, has no data to update;
    // checked before anything reads it.
    TORCH_CHECK(has_memory(p), "onepass: params[", i, "] has no data (a tensor subclass "
                "without storage, or a freed storage?), which is not supported");
    TORCH_CHECK(has_memory(*g), "onepass: grads[", i, "] has no data (a tensor subclass "
                "without storage, or a freed storage?), which is not supported");
    void* param;
    if (plain_memory(p)) {
      param = p.data_ptr();
    } else {  // stepped in a plain copy, written back after the launch
      t.write_back.emplace_back(p, p.resolve_conj().resolve_neg().contiguous());
      param = t.write_back.back().second.data_ptr();
    }
    const void* grad;
    if (plain_memory(*g)) {
      grad = g->data_ptr();
    } else {
      t.keep_alive.push_back(g->resolve_conj().resolve_neg().contiguous());
      grad = t.keep_alive.back().data_ptr();
    }
    t.segments.push_back(segment_of(i, numel, offsets, steps, param, grad));
    t.elements += numel;
    t.needed_state = std::max(t.needed_state, offsets[i] + numel);
  }
}

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
                  state_offsets.numel() == 2 * n && state_offsets.is_contiguous(),
              "onepass: state_offsets must be a contiguous int64 CPU tensor of two rows: each "
              "param's offset into the state buffers, then the element count they hold for it");
  TORCH_CHECK(step.device() == device && step.scalar_type() == at::kFloat && step.numel() == n &&
                  step.is_contiguous(),
              "onepass: step must be a contiguous float32 tensor on ", device,
              " with one entry per param");
  const int64_t* offsets = state_offsets.data_ptr<int64_t>();
  const int64_t* numels = offsets + n;  // the second row
  const float* steps = host_steps ? step.data_ptr<float>() : nullptr;
  Table t;
  bool scanned = false;
  if constexpr (kBorrowed) {
    scanned = scan_in_parallel(params, grads, offsets, numels, steps, device, t);
  }
  if (!scanned) {
    t.segments.reserve(n);
    t.stepped.reserve(n);
    scan_serially(params, grads, offsets, numels, steps, device, t);
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
