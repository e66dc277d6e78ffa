// The per-element math of every algorithm, written once and shared by the CPU kernels (scalar and
// SIMD: T is float, double or a SIMD vector of them) and the CUDA kernels (T is float or double).
// Framework-free. Memory movement (loads, stores, dtype conversion, chunking) lives elsewhere;
// these functions only see opmath values in registers.
//
// A T must provide + - * / and unary -, construction from its scalar, and the free functions
// op_sqrt(T), op_max(T, T) and op_sign(T) found by argument-dependent lookup (or the overloads below).
#pragma once
#include <cmath>

#include "onepass/macros.h"

namespace onepass {

// Hyperparameters of one step of one param group, in double, as the host holds them. Plain data,
// outside the capability namespace (see macros.h).
struct AdamHyper {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;       // used by L2 decay (added to the gradient)
  double decay_coefficient;  // p *= 1 - lr * decay_coefficient before the update: wd (decoupled),
                             // wd / initial_lr (independent), 0 (L2 or no decay). Linear in lr, so
                             // a device-side lr (capturable) needs no host work.
  double grad_scale;         // g *= grad_scale: -1 for maximize, times 1/amp_scale under AMP
};

struct LionHyper {
  double lr;
  double beta1;              // interpolation of the update direction
  double beta2;              // momentum decay
  double weight_decay;       // L2 decay
  double decay_coefficient;  // as AdamHyper: p *= 1 - lr * decay_coefficient
  double grad_scale;         // -1 for maximize, times 1/amp_scale under a GradScaler
};

// Muon's momentum pass (the work before Newton-Schulz), torch.optim.Muon's lerps:
// buf = lerp(buf, g, 1 - momentum); update = lerp(g, buf, momentum) with nesterov, else buf.
struct MuonHyper {
  double momentum;
  double grad_scale;  // times 1/amp_scale under a GradScaler
};

struct NovoGradHyper {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;    // inside the momentum: u = g / denom + weight_decay * p (the paper's)
  double grad_scale;      // -1 for maximize, times 1/amp_scale under a GradScaler
  bool grad_averaging;    // m = beta1 * m + (1 - beta1) * u instead of beta1 * m + u
};

struct SgdHyper {
  double lr;
  double momentum;
  double dampening;
  double weight_decay;       // L2 decay
  double decay_coefficient;  // as AdamHyper: p *= 1 - lr * decay_coefficient
  double grad_scale;         // -1 for maximize, times 1/amp_scale under a GradScaler
};

inline namespace ONEPASS_CAPABILITY {

ONEPASS_HD ONEPASS_INLINE float op_sqrt(float x) { return sqrtf(x); }
ONEPASS_HD ONEPASS_INLINE double op_sqrt(double x) { return sqrt(x); }
// NaN-propagating like torch.maximum (fmax would drop a NaN).
ONEPASS_HD ONEPASS_INLINE float op_max(float a, float b) { return (a != a || a > b) ? a : b; }
ONEPASS_HD ONEPASS_INLINE double op_max(double a, double b) { return (a != a || a > b) ? a : b; }
// (x > 0) - (x < 0), as torch.sign: sign(+-0) = 0 (Lion leaves such an element alone), and a
// NaN gives 0 here, in every SIMD build and in torch.sign (both comparisons are false; torch
// 2.11 and 2.13 on the CPU): a NaN direction leaves the param as it is and poisons exp_avg.
ONEPASS_HD ONEPASS_INLINE float op_sign(float x) { return float(x > 0.0f) - float(x < 0.0f); }
ONEPASS_HD ONEPASS_INLINE double op_sign(double x) { return double(x > 0.0) - double(x < 0.0); }

// ---------------------------------------------------------------------------------------------
// Adam / AdamW (torch.optim.Adam semantics, decoupled or L2 or independent decay)
// ---------------------------------------------------------------------------------------------

// The scalars of one step of one tensor: bias corrections depend on that tensor's step count
// (torch keeps one per parameter, and a parameter whose grad was None did not advance).
template <class T>
struct AdamConsts {
  T beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor, grad_scale;
  T step_size;                 // lr / (1 - beta1^t)
  T inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^t)

  // `step` is the count after this step (t >= 1). Computed in double, then rounded once to T.
  ONEPASS_HD static AdamConsts make(const AdamHyper& h, double step) {
    const double bias_correction1 = 1.0 - pow(h.beta1, step);
    const double bias_correction2 = 1.0 - pow(h.beta2, step);
    AdamConsts c;
    c.beta1 = T(h.beta1);
    c.one_minus_beta1 = T(1.0 - h.beta1);
    c.beta2 = T(h.beta2);
    c.one_minus_beta2 = T(1.0 - h.beta2);
    c.eps = T(h.eps);
    c.weight_decay = T(h.weight_decay);
    c.decay_factor = T(1.0 - h.lr * h.decay_coefficient);
    c.grad_scale = T(h.grad_scale);
    c.step_size = T(h.lr / bias_correction1);
    c.inv_bias_correction2_sqrt = T(1.0 / sqrt(bias_correction2));
    return c;
  }
};

template <bool kAmsgrad, bool kL2Decay, class T>
ONEPASS_HD ONEPASS_INLINE void adam_update(T& param, T grad, T& exp_avg, T& exp_avg_sq,
                                           T& max_exp_avg_sq, const AdamConsts<T>& c) {
  grad = grad * c.grad_scale;                              // maximize and AMP unscale
  if constexpr (kL2Decay) grad = grad + c.weight_decay * param;  // Adam: decay through the moments
  param = param * c.decay_factor;                           // AdamW: decay beside them
  exp_avg = exp_avg + c.one_minus_beta1 * (grad - exp_avg);  // torch's lerp(m, g, 1 - beta1)
  exp_avg_sq = c.beta2 * exp_avg_sq + c.one_minus_beta2 * (grad * grad);
  T second_moment = exp_avg_sq;
  if constexpr (kAmsgrad) {
    max_exp_avg_sq = op_max(max_exp_avg_sq, exp_avg_sq);
    second_moment = max_exp_avg_sq;
  }
  const T denom = op_sqrt(second_moment) * c.inv_bias_correction2_sqrt + c.eps;
  param = param - c.step_size * exp_avg / denom;
}

// ---------------------------------------------------------------------------------------------
// SGD / SGDW (torch.optim.SGD semantics; SGDW = decoupled decay, Loshchilov & Hutter)
// ---------------------------------------------------------------------------------------------

template <class T>
struct SgdConsts {
  T lr, momentum, one_minus_dampening, weight_decay, decay_factor, grad_scale;

  ONEPASS_HD static SgdConsts make(const SgdHyper& h) {
    SgdConsts c;
    c.lr = T(h.lr);
    c.momentum = T(h.momentum);
    c.one_minus_dampening = T(1.0 - h.dampening);
    c.weight_decay = T(h.weight_decay);
    c.decay_factor = T(1.0 - h.lr * h.decay_coefficient);
    c.grad_scale = T(h.grad_scale);
    return c;
  }
};

// kFirst: this tensor's momentum buffer is new, and torch starts it as a copy of the gradient.
template <bool kMomentum, bool kNesterov, bool kFirst, bool kL2Decay, class T>
ONEPASS_HD ONEPASS_INLINE void sgd_update(T& param, T grad, T& momentum_buffer,
                                          const SgdConsts<T>& c) {
  grad = grad * c.grad_scale;
  if constexpr (kL2Decay) grad = grad + c.weight_decay * param;
  param = param * c.decay_factor;
  if constexpr (kMomentum) {
    if constexpr (kFirst) {
      momentum_buffer = grad;
    } else {
      momentum_buffer = c.momentum * momentum_buffer + c.one_minus_dampening * grad;
    }
    if constexpr (kNesterov) {
      grad = grad + c.momentum * momentum_buffer;
    } else {
      grad = momentum_buffer;
    }
  }
  param = param - c.lr * grad;
}

// ---------------------------------------------------------------------------------------------
// Lion (Chen et al., 2023): sign of an interpolated momentum; decoupled decay by default
// ---------------------------------------------------------------------------------------------

template <class T>
struct LionConsts {
  T lr, beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay, decay_factor, grad_scale;

  ONEPASS_HD static LionConsts make(const LionHyper& h) {
    LionConsts c;
    c.lr = T(h.lr);
    c.beta1 = T(h.beta1);
    c.one_minus_beta1 = T(1.0 - h.beta1);
    c.beta2 = T(h.beta2);
    c.one_minus_beta2 = T(1.0 - h.beta2);
    c.weight_decay = T(h.weight_decay);
    c.decay_factor = T(1.0 - h.lr * h.decay_coefficient);
    c.grad_scale = T(h.grad_scale);
    return c;
  }
};

template <bool kL2Decay, class T>
ONEPASS_HD ONEPASS_INLINE void lion_update(T& param, T grad, T& exp_avg, const LionConsts<T>& c) {
  grad = grad * c.grad_scale;  // maximize and AMP unscale
  if constexpr (kL2Decay) grad = grad + c.weight_decay * param;
  param = param * c.decay_factor;
  // The direction reads the old momentum; the momentum is updated after it (the paper's order).
  const T direction = c.beta1 * exp_avg + c.one_minus_beta1 * grad;
  param = param - c.lr * op_sign(direction);
  exp_avg = c.beta2 * exp_avg + c.one_minus_beta2 * grad;
}

// ---------------------------------------------------------------------------------------------
// Muon (Jordan et al., 2024; Liu et al., 2025): the momentum pass before Newton-Schulz
// ---------------------------------------------------------------------------------------------

// torch.lerp's two formulas: from the start for |weight| < 0.5, from the end otherwise (each is
// exact at its own end); the choice depends on the host weight only, so it is made once.
template <class T>
struct Lerp {
  T weight, one_minus_weight;
  bool from_start;

  ONEPASS_HD static Lerp make(double w) {
    Lerp l;
    l.weight = T(w);
    // torch casts the weight to opmath first, then subtracts in opmath
    l.one_minus_weight = T(1) - T(w);
    l.from_start = w < 0.5 && w > -0.5;
    return l;
  }
  ONEPASS_HD ONEPASS_INLINE T operator()(T start, T end) const {
    return from_start ? start + weight * (end - start) : end - (end - start) * one_minus_weight;
  }
};

template <class T>
struct MuonConsts {
  Lerp<T> to_grad;       // buf.lerp_(g, 1 - momentum)
  Lerp<T> to_momentum;   // g.lerp(buf, momentum), Nesterov's look-ahead
  T grad_scale;

  ONEPASS_HD static MuonConsts make(const MuonHyper& h) {
    MuonConsts c;
    c.to_grad = Lerp<T>::make(1.0 - h.momentum);
    c.to_momentum = Lerp<T>::make(h.momentum);
    c.grad_scale = T(h.grad_scale);
    return c;
  }
};

template <bool kNesterov, class T>
ONEPASS_HD ONEPASS_INLINE void muon_momentum(T& update, T grad, T& buf, const MuonConsts<T>& c) {
  grad = grad * c.grad_scale;  // AMP unscale
  buf = c.to_grad(buf, grad);
  update = kNesterov ? c.to_momentum(grad, buf) : buf;
}

// ---------------------------------------------------------------------------------------------
// NovoGrad (Ginsburg et al., 2019): one second moment per tensor, no bias correction
// ---------------------------------------------------------------------------------------------

// The per-tensor scalar step, once per tensor with a grad (on the host for the CPU kernels), in
// double: sum_sq is sum(g^2) of the raw grad. Updates the stored second moment (and its running
// max with amsgrad; NaN-propagating as torch.maximum) and returns the denominator
// sqrt(v) + eps, v the STORED value (rounded to V), so a resumed run continues bitwise. V is the
// scalar slots' storage: float for 16/32-bit params, double for float64.
template <class V>
ONEPASS_HD ONEPASS_INLINE double novograd_second_moment(double sum_sq, double step,
                                                       const NovoGradHyper& h, bool amsgrad,
                                                       V& exp_avg_sq, V* max_exp_avg_sq) {
  const double n = sum_sq * (h.grad_scale * h.grad_scale);  // the unscaled grad's norm^2
  // t == 1 is the tensor's own first step: v starts at ||g||^2 (no bias correction needed).
  const double v = step == 1.0 ? n : h.beta2 * double(exp_avg_sq) + (1.0 - h.beta2) * n;
  exp_avg_sq = V(v);
  V used = exp_avg_sq;
  if (amsgrad) {
    *max_exp_avg_sq = op_max(*max_exp_avg_sq, exp_avg_sq);
    used = *max_exp_avg_sq;
  }
  return op_sqrt(double(used)) + h.eps;
}

template <class T>
struct NovoGradConsts {
  T lr, beta1, update_scale, weight_decay, denom, grad_scale;

  // `denom` is the tensor's sqrt(v) + eps (novograd_second_moment), rounded to the opmath type.
  ONEPASS_HD static NovoGradConsts make(const NovoGradHyper& h, double denom) {
    NovoGradConsts c;
    c.lr = T(h.lr);
    c.beta1 = T(h.beta1);
    c.update_scale = T(h.grad_averaging ? 1.0 - h.beta1 : 1.0);
    c.weight_decay = T(h.weight_decay);
    c.denom = T(denom);
    c.grad_scale = T(h.grad_scale);
    return c;
  }
};

// kFirst: the tensor's first step, m = u (the old exp_avg is not read: the paper's m_1).
template <bool kFirst, class T>
ONEPASS_HD ONEPASS_INLINE void novograd_update(T& param, T grad, T& exp_avg,
                                               const NovoGradConsts<T>& c) {
  grad = grad * c.grad_scale;  // maximize and AMP unscale
  const T u = grad / c.denom + c.weight_decay * param;
  if constexpr (kFirst) {
    exp_avg = u;
  } else {
    exp_avg = c.beta1 * exp_avg + c.update_scale * u;
  }
  param = param - c.lr * exp_avg;
}

// ---------------------------------------------------------------------------------------------
// FAdam (Hwang, 2024, Alg. 1): per-tensor RMS reductions between three passes
// ---------------------------------------------------------------------------------------------

struct FAdamHyper {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double clip;
  double p;             // den = F^p + eps_t
  double weight_decay;  // p -= lr * (m + weight_decay * wn)
  double grad_scale;    // -1 for maximize, times 1/amp_scale under a GradScaler
};

// b2 * (1 - b2^(t-1)) / (1 - b2^t): the decay of F at the tensor's step t (0 at t = 1).
ONEPASS_HD ONEPASS_INLINE double fadam_beta2_t(double beta2, double step) {
  return beta2 * (1.0 - pow(beta2, step - 1.0)) / (1.0 - pow(beta2, step));
}

// max(1, RMS / clip) from a tensor's sum of squares (an empty tensor: 1, nothing to scale).
ONEPASS_HD ONEPASS_INLINE double fadam_clip_divisor(double sum_sq, int64_t numel, double clip) {
  const double rms = numel > 0 ? sqrt(sum_sq / double(numel)) : 0.0;
  return op_max(1.0, rms / clip);
}

// eps * min(1, RMS(g)), from the raw grad's sum of squares and the grad scale; eps where the
// grad is all zeros (the rule's 0 would make den = 0 where F = 0, and 0 / 0 a NaN tensor).
ONEPASS_HD ONEPASS_INLINE double fadam_eps_t(double raw_sum_sq, int64_t numel,
                                             const FAdamHyper& h) {
  const double sum_sq = raw_sum_sq * (h.grad_scale * h.grad_scale);
  const double rms = numel > 0 ? sqrt(sum_sq / double(numel)) : 0.0;
  return h.eps * (rms > 0.0 && rms < 1.0 ? rms : 1.0);
}

ONEPASS_HD ONEPASS_INLINE float op_pow(float x, float y) { return powf(x, y); }
ONEPASS_HD ONEPASS_INLINE double op_pow(double x, double y) { return pow(x, y); }

template <class T>
struct FAdamConsts {
  T lr, beta1, one_minus_beta1, beta2_t, one_minus_beta2_t, eps_t, power, weight_decay,
      grad_scale, gn_divisor, wn_divisor;
  bool sqrt_power;  // p == 0.5: F^p is sqrt(F) (as torch's pow does for 0.5)

  // Per tensor: its step t, eps_t and (for the last pass) the two clip divisors.
  ONEPASS_HD static FAdamConsts make(const FAdamHyper& h, double step, double eps_t,
                                     double gn_divisor, double wn_divisor) {
    FAdamConsts c;
    const double b2t = fadam_beta2_t(h.beta2, step);
    c.lr = T(h.lr);
    c.beta1 = T(h.beta1);
    c.one_minus_beta1 = T(1.0 - h.beta1);
    c.beta2_t = T(b2t);
    c.one_minus_beta2_t = T(1.0 - b2t);
    c.eps_t = T(eps_t);
    c.power = T(h.p);
    c.weight_decay = T(h.weight_decay);
    c.grad_scale = T(h.grad_scale);
    c.gn_divisor = T(gn_divisor);
    c.wn_divisor = T(wn_divisor);
    c.sqrt_power = h.p == 0.5;
    return c;
  }
};

// The new F and den = F^p + eps_t of one element (grad already unscaled and signed).
template <class T>
ONEPASS_HD ONEPASS_INLINE T fadam_den(T fim, T grad, const FAdamConsts<T>& c, T& new_fim) {
  new_fim = c.beta2_t * fim + c.one_minus_beta2_t * grad * grad;
  const T fp = c.sqrt_power ? op_sqrt(new_fim) : op_pow(new_fim, c.power);
  return fp + c.eps_t;
}

// Pass 2 of one element: gn = g / den and wn = param / den, for their per-tensor sums of squares.
template <class T>
ONEPASS_HD ONEPASS_INLINE void fadam_norms(T param, T grad, T fim, const FAdamConsts<T>& c,
                                           T& gn, T& wn) {
  grad = grad * c.grad_scale;  // maximize and AMP unscale
  T new_fim;
  const T den = fadam_den(fim, grad, c, new_fim);
  gn = grad / den;
  wn = param / den;
}

// Pass 3 of one element: F, the clipped natural gradient's momentum and the param.
template <class T>
ONEPASS_HD ONEPASS_INLINE void fadam_update(T& param, T grad, T& fim, T& momentum,
                                            const FAdamConsts<T>& c) {
  grad = grad * c.grad_scale;
  T new_fim;
  const T den = fadam_den(fim, grad, c, new_fim);
  fim = new_fim;
  const T gn = grad / den / c.gn_divisor;
  momentum = c.beta1 * momentum + c.one_minus_beta1 * gn;
  const T wn = param / den / c.wn_divisor;
  param = param - c.lr * (momentum + c.weight_decay * wn);
}


}  // namespace ONEPASS_CAPABILITY
}  // namespace onepass
