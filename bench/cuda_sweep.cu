// Times the CUDA kernels alone (no torch, no Python, no host work between launches) against a
// device-to-device copy of as many bytes, to choose the launch constants of csrc/cuda: build it
// with other ONEPASS_CUDA_* macros (cuda_kernels.h, multi_tensor.cuh) and compare. bench/gpu_check.sh
// builds and runs several variants.
//
//   nvcc -O3 -std=c++20 --fmad=false -arch=sm_90 -Icsrc/include -Icsrc [-DONEPASS_CUDA_ILP=4 ...] \
//     bench/cuda_sweep.cu csrc/cuda/optimizers.cu -o cuda_sweep && ./cuda_sweep [NUMEL...]
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/multi_tensor.cuh"  // the launch constants, whichever macros set them

using namespace onepass;
using namespace onepass::cuda;

#define CHECK(call)                                                                        \
  do {                                                                                     \
    const cudaError_t err_ = (call);                                                       \
    if (err_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call,                    \
                   cudaGetErrorString(err_));                                              \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

namespace {

constexpr int kWarmup = 3;
constexpr int kIters = 20;

// n elements of T on the device, all `value` (for bf16, uint16_t bit patterns).
template <class T>
T* device_filled(int64_t n, T value) {
  T* p = nullptr;
  CHECK(cudaMalloc(&p, n * sizeof(T)));
  std::vector<T> host(1 << 20, value);
  for (int64_t at = 0; at < n; at += int64_t(host.size())) {
    const int64_t count = n - at < int64_t(host.size()) ? n - at : int64_t(host.size());
    CHECK(cudaMemcpy(p + at, host.data(), count * sizeof(T), cudaMemcpyHostToDevice));
  }
  return p;
}

// Milliseconds per call of fn, by CUDA events around kIters back-to-back calls.
template <class Fn>
float time_ms(const Fn& fn) {
  for (int i = 0; i < kWarmup; ++i) fn();
  cudaEvent_t start, end;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&end));
  CHECK(cudaEventRecord(start));
  for (int i = 0; i < kIters; ++i) fn();
  CHECK(cudaEventRecord(end));
  CHECK(cudaEventSynchronize(end));
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, start, end));
  CHECK(cudaEventDestroy(start));
  CHECK(cudaEventDestroy(end));
  return ms / kIters;
}

// The device table of one tensor of n elements (one segment) cut into chunks of `chunk`
// elements; freed by free_table.
DeviceTable make_table(void* param, const void* grad, int64_t n, int64_t chunk) {
  const Segment segment{param, grad, 0, n, 0, 1.0};
  std::vector<Chunk> chunks;
  for (int64_t begin = 0; begin < n; begin += chunk) {
    chunks.push_back({0, begin, begin + chunk < n ? begin + chunk : n});
  }
  Segment* d_segments = nullptr;
  Chunk* d_chunks = nullptr;
  int64_t* d_stepped = nullptr;
  const int64_t stepped = 0;
  CHECK(cudaMalloc(&d_segments, sizeof(Segment)));
  CHECK(cudaMalloc(&d_chunks, chunks.size() * sizeof(Chunk)));
  CHECK(cudaMalloc(&d_stepped, sizeof(int64_t)));
  CHECK(cudaMemcpy(d_segments, &segment, sizeof(Segment), cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(d_chunks, chunks.data(), chunks.size() * sizeof(Chunk), cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(d_stepped, &stepped, sizeof(int64_t), cudaMemcpyHostToDevice));
  return DeviceTable{d_segments, d_chunks, d_stepped, int64_t(chunks.size()), 1};
}

void free_table(const DeviceTable& t) {
  CHECK(cudaFree(const_cast<Segment*>(t.segments)));
  CHECK(cudaFree(const_cast<Chunk*>(t.chunks)));
  CHECK(cudaFree(const_cast<int64_t*>(t.stepped)));
}

const AdamHyper kAdamW{1e-4, 0.9, 0.999, 1e-8, 0.01, 0.01, 1.0};

void run(int64_t n) {
  float* param = device_filled<float>(n, 0.5f);
  float* grad = device_filled<float>(n, 0.01f);
  float* m = device_filled<float>(n, 0.0f);
  float* v = device_filled<float>(n, 0.0f);
  float* copy_from = device_filled<float>(2 * n, 1.0f);
  float* copy_to = device_filled<float>(2 * n, 0.0f);
  float* step = device_filled<float>(1, 0.0f);
  const StepState steps{step, nullptr, nullptr, nullptr, false};
  const DeviceTable table = make_table(param, grad, n, kChunkElements);

  AdamLaunch adam{};
  adam.layout = Layout{DType::kFloat32, DType::kFloat32, DType::kFloat32, false};
  adam.table = table;
  adam.steps = steps;
  adam.exp_avg = m;
  adam.exp_avg_sq = v;
  adam.hyper = kAdamW;
  SgdLaunch sgd{};
  sgd.layout = Layout{DType::kFloat32, DType::kFloat32, DType::kFloat32, false};
  sgd.table = table;
  sgd.steps = steps;
  sgd.momentum_buffer = m;
  sgd.hyper = SgdHyper{1e-4, 0.9, 0.0, 0.01, 0.01, 1.0};  // SGDW: decoupled decay
  sgd.momentum = true;

  const double gb = double(n) * sizeof(float) / 1e9;
  const float copy_ms = time_ms([&] {
    CHECK(cudaMemcpyAsync(copy_to, copy_from, 2 * n * sizeof(float), cudaMemcpyDeviceToDevice));
  });
  const double copy_gbps = 4 * gb / (copy_ms * 1e-3);  // 2n floats read and 2n written
  const float adam_ms = time_ms([&] { CHECK(launch_adam(adam, nullptr)); });
  const float sgd_ms = time_ms([&] { CHECK(launch_sgd(sgd, nullptr)); });
  const double adam_gbps = 7 * gb / (adam_ms * 1e-3);  // p, m, v read and written; g read
  const double sgd_gbps = 5 * gb / (sgd_ms * 1e-3);    // p, buf read and written; g read
  std::printf(
      "ilp=%d threads=%d chunk=2^%d streaming=%d blocks=%d numel=%lld | copy %.1f GB/s | "
      "AdamW %.3f ms %.1f GB/s %.1f%% | SGDW %.3f ms %.1f GB/s %.1f%%\n",
      ONEPASS_CUDA_ILP, ONEPASS_CUDA_THREADS, ONEPASS_CUDA_CHUNK_LOG2, ONEPASS_CUDA_STREAMING,
      ONEPASS_CUDA_MIN_BLOCKS, static_cast<long long>(n), copy_gbps, adam_ms, adam_gbps,
      100 * adam_gbps / copy_gbps, sgd_ms, sgd_gbps, 100 * sgd_gbps / copy_gbps);
  free_table(table);

  // bf16 AdamW (params, grads and both moments in bf16) over the same element count, with the
  // table cut into chunks of 1, 2 and 4 times kChunkElements: the chunk is cut on the host, so
  // one binary compares the sizes (a 2-byte chunk of 2^14 elements moves half the bytes).
  uint16_t* bparam = device_filled<uint16_t>(n, 0x3F00);  // 0.5
  uint16_t* bgrad = device_filled<uint16_t>(n, 0x3C24);   // ~0.01
  uint16_t* bm = device_filled<uint16_t>(n, 0);
  uint16_t* bv = device_filled<uint16_t>(n, 0);
  for (const int64_t times : {1, 2, 4}) {
    AdamLaunch bf16{};
    bf16.layout = Layout{DType::kBFloat16, DType::kBFloat16, DType::kBFloat16, false};
    bf16.table = make_table(bparam, bgrad, n, times * kChunkElements);
    bf16.steps = steps;
    bf16.exp_avg = bm;
    bf16.exp_avg_sq = bv;
    bf16.hyper = kAdamW;
    const float ms = time_ms([&] { CHECK(launch_adam(bf16, nullptr)); });
    const double gbps = 7 * (gb / 2) / (ms * 1e-3);
    std::printf(
        "ilp=%d threads=%d chunk=2^%d*%lld streaming=%d blocks=%d numel=%lld | AdamW bf16 "
        "%.3f ms %.1f GB/s %.1f%% of copy\n",
        ONEPASS_CUDA_ILP, ONEPASS_CUDA_THREADS, ONEPASS_CUDA_CHUNK_LOG2,
        static_cast<long long>(times), ONEPASS_CUDA_STREAMING, ONEPASS_CUDA_MIN_BLOCKS,
        static_cast<long long>(n), ms, gbps, 100 * gbps / copy_gbps);
    free_table(bf16.table);
  }
  for (void* p : {static_cast<void*>(param), static_cast<void*>(grad), static_cast<void*>(m),
                  static_cast<void*>(v), static_cast<void*>(copy_from), static_cast<void*>(copy_to),
                  static_cast<void*>(step), static_cast<void*>(bparam), static_cast<void*>(bgrad),
                  static_cast<void*>(bm), static_cast<void*>(bv)}) {
    CHECK(cudaFree(p));
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    run(int64_t(1) << 26);  // one-big
    run(int64_t(1) << 28);
  }
  for (int i = 1; i < argc; ++i) run(std::atoll(argv[i]));
  return 0;
}
