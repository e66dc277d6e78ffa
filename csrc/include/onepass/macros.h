// Portability macros shared by the CPU and CUDA kernels. Framework-free: no torch headers.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ONEPASS_HD __host__ __device__
#else
#define ONEPASS_HD
#endif

#if defined(__GNUC__) || defined(__clang__)
#define ONEPASS_INLINE inline __attribute__((always_inline))
#else
#define ONEPASS_INLINE inline
#endif

// Every header under csrc/include lives in `onepass::ONEPASS_CAPABILITY`. The CPU kernels are
// compiled once per instruction set (scalar, avx2, avx512) and each translation unit defines its
// own capability, so the inline functions instantiated with different -m flags never share a
// linker symbol (otherwise the linker could pick an AVX-512 copy for the scalar path).
#ifndef ONEPASS_CAPABILITY
#define ONEPASS_CAPABILITY generic
#endif
