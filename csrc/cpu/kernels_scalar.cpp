// Portable build of the CPU kernels: one scalar per step, whatever the compiler vectorises on its
// own for the baseline instruction set. Runs on every CPU.
#define ONEPASS_CAPABILITY cap_scalar
#include "vec_scalar.h"
#include "kernel_body.h"

namespace onepass::cpu::scalar {
const KernelSet kKernels{"scalar", &onepass::cap_scalar::adam_entry, &onepass::cap_scalar::sgd_entry,
                           &onepass::cap_scalar::lion_entry,
                           &onepass::cap_scalar::muon_momentum_entry,
                           &onepass::cap_scalar::novograd_reduce_entry,
                           &onepass::cap_scalar::novograd_entry,
                           &onepass::cap_scalar::novograd_fused_entry,
                           &onepass::cap_scalar::fadam_reduce_entry,
                           &onepass::cap_scalar::fadam_norms_entry,
                           &onepass::cap_scalar::fadam_entry,
                           &onepass::cap_scalar::fadam_fused_entry};
}
