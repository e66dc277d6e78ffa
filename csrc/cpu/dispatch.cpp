// Run-time choice of the CPU kernel build: never a binary that faults on an older CPU.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu_kernels.h"

namespace onepass::cpu {
namespace {

const KernelSet* const kAll[] = {&scalar::kKernels, &avx2::kKernels, &avx512::kKernels};

bool cpu_runs(const KernelSet& k) {
  if (k.adam == nullptr) return false;
  if (std::strcmp(k.name, "scalar") == 0) return true;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (std::strcmp(k.name, "avx2") == 0) return avx2;
  if (std::strcmp(k.name, "avx512") == 0) return avx2 && __builtin_cpu_supports("avx512f");
#endif
  return false;
}

const KernelSet* find(const char* name) {
  for (const KernelSet* k : kAll) {
    if (std::strcmp(k->name, name) == 0 && cpu_runs(*k)) return k;
  }
  return nullptr;
}

const KernelSet* widest() {
  const KernelSet* best = &scalar::kKernels;
  for (const KernelSet* k : kAll) {
    if (cpu_runs(*k)) best = k;
  }
  return best;
}

std::atomic<const KernelSet*> g_active{nullptr};

}  // namespace

const KernelSet& kernels() {
  const KernelSet* k = g_active.load(std::memory_order_acquire);
  if (k == nullptr) {
    const char* forced = std::getenv("ONEPASS_CPU_CAPABILITY");
    if (forced != nullptr && *forced != '\0') {
      // A setting this CPU cannot honour is an error, not a silent choice of another build:
      // every CPU step refuses until it is fixed (set_cpu_capability refuses the same names).
      k = find(forced);
      if (k == nullptr) {
        std::string runs;
        for (const KernelSet* each : kAll) {
          if (cpu_runs(*each)) runs += std::string(runs.empty() ? "" : ", ") + each->name;
        }
        throw std::runtime_error(std::string("onepass: ONEPASS_CPU_CAPABILITY='") + forced +
                                 "' names no CPU kernel build this CPU runs (it runs: " + runs +
                                 "); unset it for the widest");
      }
    } else {
      k = widest();
    }
    g_active.store(k, std::memory_order_release);
  }
  return *k;
}

int64_t capability_count() {
  int64_t n = 0;
  for (const KernelSet* k : kAll) n += cpu_runs(*k) ? 1 : 0;
  return n;
}

const char* capability_name(int64_t i) {
  for (const KernelSet* k : kAll) {
    if (cpu_runs(*k) && i-- == 0) return k->name;
  }
  return nullptr;
}

bool set_capability(const char* name) {
  const KernelSet* k = find(name);
  if (k == nullptr) return false;
  g_active.store(k, std::memory_order_release);
  return true;
}

}  // namespace onepass::cpu
