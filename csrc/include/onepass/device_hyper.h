// capturable=True: a param group's hyperparameters on the device. The kernels then take the lr
// argument as one float64 device block, [lr, then the fields below], and read it at every launch
// or CUDA-graph replay, so that an in-place change of a group's lr, betas, eps or weight_decay
// reaches a captured step. python/onepass/_capturable.py lays the blocks out (the group's values
// are 0-d views into them); tests check that both sides count the same fields.
//
// Structural hyperparameters stay on the host, read when the step is captured: those that pick
// a code path (SGD's momentum and nesterov, FAdam's p and clip, amsgrad, maximize, the decay mode).
// decay_scale turns the weight decay into decay_coefficient (p *= 1 - lr * decay_coefficient):
// 1 for decoupled decay, 1 / initial_lr for independent decay, 0 under L2 decay.
// Framework-free.
#pragma once

#include "onepass/macros.h"
#include "onepass/math.h"

namespace onepass {
inline namespace ONEPASS_CAPABILITY {

constexpr int kAdamBlock = 6;      // lr, beta1, beta2, eps, weight_decay, decay_scale
constexpr int kSgdBlock = 3;       // lr, weight_decay, decay_scale
constexpr int kLionBlock = 5;      // lr, beta1, beta2, weight_decay, decay_scale
constexpr int kNovoGradBlock = 5;  // lr, beta1, beta2, eps, weight_decay
constexpr int kFAdamBlock = 5;     // lr, beta1, beta2, eps, weight_decay

// Each read_block sets the hyperparameters a block holds, lr included; the others keep the
// host's values.

// Adam, NovoGrad and FAdam blocks start alike: lr, beta1, beta2, eps, weight_decay.
template <class Hyper>
ONEPASS_HD ONEPASS_INLINE void read_lr_betas_eps_decay(Hyper& h, const double* b) {
  h.lr = b[0];
  h.beta1 = b[1];
  h.beta2 = b[2];
  h.eps = b[3];
  h.weight_decay = b[4];
}

ONEPASS_HD ONEPASS_INLINE void read_block(AdamHyper& h, const double* b) {
  read_lr_betas_eps_decay(h, b);  // the weight decay is read by the L2 path only
  h.decay_coefficient = b[4] * b[5];
}

ONEPASS_HD ONEPASS_INLINE void read_block(NovoGradHyper& h, const double* b) {
  read_lr_betas_eps_decay(h, b);
}

ONEPASS_HD ONEPASS_INLINE void read_block(FAdamHyper& h, const double* b) {
  read_lr_betas_eps_decay(h, b);
}

ONEPASS_HD ONEPASS_INLINE void read_block(SgdHyper& h, const double* b) {
  h.lr = b[0];
  h.weight_decay = b[1];
  h.decay_coefficient = b[1] * b[2];
}

ONEPASS_HD ONEPASS_INLINE void read_block(LionHyper& h, const double* b) {
  h.lr = b[0];
  h.beta1 = b[1];
  h.beta2 = b[2];
  h.weight_decay = b[3];
  h.decay_coefficient = b[3] * b[4];
}

}  // namespace ONEPASS_CAPABILITY
}  // namespace onepass
