// AVX2 + FMA + F16C build of the CPU kernels, chosen at run time (dispatch.cpp) on CPUs that have
// it. The target pragma comes after every system header, so only our code gets these instructions.
#define ONEPASS_CAPABILITY cap_avx2
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#pragma GCC target("avx2,fma,f16c")
#include "vec_avx2.h"
#include "kernel_body.h"

namespace onepass::cpu::avx2 {
const KernelSet kKernels{"avx2", &onepass::cap_avx2::adam_entry, &onepass::cap_avx2::sgd_entry,
                           &onepass::cap_avx2::lion_entry,
                           &onepass::cap_avx2::muon_momentum_entry,
                           &onepass::cap_avx2::novograd_reduce_entry,
                           &onepass::cap_avx2::novograd_entry,
                           &onepass::cap_avx2::novograd_fused_entry,
                           &onepass::cap_avx2::fadam_reduce_entry,
                           &onepass::cap_avx2::fadam_norms_entry,
                           &onepass::cap_avx2::fadam_entry,
                           &onepass::cap_avx2::fadam_fused_entry};
}
#else
#include "cpu_kernels.h"
namespace onepass::cpu::avx2 {
const KernelSet kKernels{"avx2", nullptr, nullptr, nullptr, nullptr, nullptr,
                           nullptr, nullptr, nullptr};  // not an x86-64 build
}
#endif
