// AVX-512F build of the CPU kernels, chosen at run time (dispatch.cpp) on CPUs that have
// it. The target pragma comes after every system header, so only our code gets these instructions.
#define ONEPASS_CAPABILITY cap_avx512
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#pragma GCC target("avx512f,avx2,fma,f16c")
// GCC 12 reports its own _mm512 "undefined" placeholders as maybe-uninitialized; they are not.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "vec_avx512.h"
#include "kernel_body.h"

namespace onepass::cpu::avx512 {
const KernelSet kKernels{"avx512", &onepass::cap_avx512::adam_entry, &onepass::cap_avx512::sgd_entry,
                           &onepass::cap_avx512::lion_entry,
                           &onepass::cap_avx512::muon_momentum_entry,
                           &onepass::cap_avx512::novograd_reduce_entry,
                           &onepass::cap_avx512::novograd_entry,
                           &onepass::cap_avx512::novograd_fused_entry,
                           &onepass::cap_avx512::fadam_reduce_entry,
                           &onepass::cap_avx512::fadam_norms_entry,
                           &onepass::cap_avx512::fadam_entry,
                           &onepass::cap_avx512::fadam_fused_entry};
}
#else
#include "cpu_kernels.h"
namespace onepass::cpu::avx512 {
const KernelSet kKernels{"avx512", nullptr, nullptr, nullptr, nullptr, nullptr,
                           nullptr, nullptr, nullptr};  // not an x86-64 build
}
#endif
