// C++ unit tests of the shared, framework-free code: dtype conversions (exhaustive over every
// 16-bit pattern), the per-element math against a long-double transcription of torch.optim, and
// every instruction-set build of the CPU kernels against the scalar build. Run by ctest.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "onepass/device_hyper.h"
#include "onepass/dtypes.h"
#include "onepass/math.h"

namespace {

int g_failures = 0;

#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond)) {                                         \
      ++g_failures;                                        \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                            \
      std::printf("\n");                                   \
    }                                                      \
  } while (0)

using namespace onepass;

bool close(double got, double want, double rtol, double atol) {
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

// bf16 <-> float: every pattern round-trips; float -> bf16 rounds to nearest even.
void test_bf16() {
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const float f = to_opmath(bf16_t{uint16_t(b)});
    const bf16_t back = from_opmath_bf16(f);
    if (std::isnan(f)) {
      CHECK(std::isnan(to_opmath(back)), "bf16 NaN pattern %04x", b);
    } else {
      CHECK(back.bits == b, "bf16 pattern %04x round-trips to %04x", b, back.bits);
    }
  }
  // Halfway cases: 1 + 2^-8 lies between 1 and 1 + 2^-7 and goes to the even one (1.0).
  CHECK(from_opmath_bf16(1.0f + 0x1p-8f).bits == 0x3f80, "tie to even (down)");
  CHECK(from_opmath_bf16(1.0f + 3 * 0x1p-8f).bits == 0x3f82, "tie to even (up)");
}

// Reference float -> half by exhaustive nearest search over the finite halves.
uint16_t half_nearest(float f, const std::vector<float>& halves) {
  if (std::isnan(f)) return 0x7e00;
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const double a = std::fabs(double(f));
  if (a >= 65520.0) return sign | 0x7c00;
  uint16_t best = 0;
  for (uint16_t h = 0; h < 0x7c00; ++h) {
    const double d = std::fabs(double(halves[h]) - a), bd = std::fabs(double(halves[best]) - a);
    if (d < bd || (d == bd && (h & 1) == 0 && (best & 1) == 1)) best = h;
  }
  return sign | best;
}

void test_half() {
  std::vector<float> halves(0x7c00);
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = to_opmath(half_t{uint16_t(h)});
    const uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    double want = exp == 0 ? std::ldexp(double(mant), -24)
                           : std::ldexp(1.0 + double(mant) / 1024.0, int(exp) - 15);
    if (h & 0x8000) want = -want;
    if (exp == 0x1f) {
      CHECK(mant ? std::isnan(f) : std::isinf(f), "half special %04x", h);
      continue;
    }
    CHECK(double(f) == want, "half %04x -> %g, want %g", h, double(f), want);
    CHECK(from_opmath_half(f).bits == h, "half %04x round-trips", h);
    if (h < 0x7c00) halves[h] = f;
  }
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> exponent(-27.0f, 17.0f);
  for (int i = 0; i < 4000; ++i) {
    const float f = std::exp2(exponent(rng)) * (i % 2 ? -1.0f : 1.0f);
    CHECK(from_opmath_half(f).bits == half_nearest(f, halves), "float %a -> half", double(f));
  }
}

// adam_update and sgd_update against torch.optim's formulas in long double, over several steps.
void test_math_vs_torch() {
  const AdamHyper h{1e-2, 0.9, 0.999, 1e-8, 0.1, 0.05, -1.0};  // maximize, decay 1 - lr*0.05
  double p = 0.7, m = 0, v = 0, vmax = 0;
  long double rp = 0.7L, rm = 0, rv = 0, rvmax = 0;
  const double grads[] = {0.3, -1.2, 0.01, 2.5, -0.4, 0.9, -0.05};
  for (int t = 1; t <= 7; ++t) {
    const auto c = AdamConsts<double>::make(h, t);
    adam_update<true, true>(p, grads[t - 1], m, v, vmax, c);
    long double g = -(long double)grads[t - 1];
    g += 0.1L * rp;
    rp *= 1.0L - 1e-2L * 0.05L;
    rm = rm + (1 - 0.9L) * (g - rm);
    rv = 0.999L * rv + (1 - 0.999L) * g * g;
    rvmax = std::max(rvmax, rv);
    const long double denom = std::sqrt(rvmax) / std::sqrt(1 - std::pow(0.999L, t)) + 1e-8L;
    rp -= 1e-2L / (1 - std::pow(0.9L, t)) * rm / denom;
    CHECK(close(p, double(rp), 1e-13, 1e-15), "adam step %d: %.17g vs %.17Lg", t, p, rp);
    CHECK(close(vmax, double(rvmax), 1e-13, 1e-18), "adam vmax step %d", t);
  }
  const SgdHyper s{0.1, 0.9, 0.0, 0.01, 0.0, 1.0};
  double q = -0.3, buf = 0;
  long double rq = -0.3L, rbuf = 0;
  for (int t = 1; t <= 7; ++t) {
    const auto c = SgdConsts<double>::make(s);
    if (t == 1) {
      sgd_update<true, true, true, true>(q, grads[t - 1], buf, c);
    } else {
      sgd_update<true, true, false, true>(q, grads[t - 1], buf, c);
    }
    const long double d = grads[t - 1] + 0.01L * rq;
    rbuf = t == 1 ? d : 0.9L * rbuf + d;
    rq -= 0.1L * (d + 0.9L * rbuf);
    CHECK(close(q, double(rq), 1e-13, 1e-15), "sgd step %d: %.17g vs %.17Lg", t, q, rq);
  }
}

// lion_update against the paper's rule in long double, over several steps: L2 decay + maximize
// in one run, decoupled decay in another, and sign(0) = 0 on an exactly zero direction.
void test_lion_vs_paper() {
  const double grads[] = {0.3, -1.2, 0.01, 2.5, -0.4, 0.9, -0.05};
  for (const bool l2 : {false, true}) {
    const LionHyper h{1e-2, 0.9, 0.99, l2 ? 0.1 : 0.0, l2 ? 0.0 : 0.5, l2 ? -1.0 : 1.0};
    double p = 0.7, m = 0.0;
    long double rp = 0.7L, rm = 0.0L;
    for (int t = 1; t <= 7; ++t) {
      const auto c = LionConsts<double>::make(h);
      l2 ? lion_update<true>(p, grads[t - 1], m, c) : lion_update<false>(p, grads[t - 1], m, c);
      long double g = l2 ? -(long double)grads[t - 1] : (long double)grads[t - 1];
      if (l2) g += 0.1L * rp;
      rp *= 1.0L - 1e-2L * (l2 ? 0.0L : 0.5L);
      const long double d = 0.9L * rm + (1 - 0.9L) * g;
      rp -= 1e-2L * ((d > 0) - (d < 0));
      rm = 0.99L * rm + (1 - 0.99L) * g;
      CHECK(close(p, double(rp), 1e-13, 1e-15), "lion l2=%d step %d: %.17g vs %.17Lg", l2, t, p,
            rp);
      CHECK(close(m, double(rm), 1e-13, 1e-18), "lion l2=%d exp_avg step %d", l2, t);
    }
  }
  // A zero direction leaves the param alone (no decay here): sign(0) = 0, not 1.
  const LionHyper z{0.5, 0.9, 0.99, 0.0, 0.0, 1.0};
  float pf = 2.0f, mf = 0.0f;
  lion_update<false>(pf, 0.0f, mf, LionConsts<float>::make(z));
  CHECK(pf == 2.0f && mf == 0.0f, "lion sign(0): p=%g m=%g", double(pf), double(mf));
  CHECK(op_sign(-3.0) == -1.0 && op_sign(0.25f) == 1.0f && op_sign(-0.0) == 0.0, "op_sign");
}

// novograd_second_moment + novograd_update against the rule in long double over 7 steps of a
// 3-element tensor: v = ||g||^2 at t = 1, then beta2-averaged; amsgrad's running max; m = u at
// t = 1, then beta1 * m + s * u; maximize (grad_scale -1) and decay inside the momentum.
void test_novograd_vs_rule() {
  const double grads[7][3] = {{0.3, -1.2, 0.01}, {2.5, -0.4, 0.9},  {-0.05, 0.2, 0.7},
                              {1.5, 1.1, -0.3},  {0.02, 0.03, -0.01}, {-2.0, 0.4, 0.4},
                              {0.6, -0.6, 0.1}};
  for (const bool averaging : {false, true}) {
    for (const bool amsgrad : {false, true}) {
      const NovoGradHyper h{1e-2, 0.95, 0.5, 1e-8, 0.1, -1.0, averaging};
      double p[3] = {0.7, -0.2, 1.3}, m[3] = {0, 0, 0}, v = 0.0, vmax = 0.0;
      long double rp[3] = {0.7L, -0.2L, 1.3L}, rm[3] = {0, 0, 0}, rv = 0.0L, rvmax = 0.0L;
      for (int t = 1; t <= 7; ++t) {
        double sum_sq = 0.0;
        for (double g : grads[t - 1]) sum_sq += g * g;
        const double denom = novograd_second_moment<double>(sum_sq, t, h, amsgrad, v, &vmax);
        const auto c = NovoGradConsts<double>::make(h, denom);
        for (int i = 0; i < 3; ++i) {
          t == 1 ? novograd_update<true>(p[i], grads[t - 1][i], m[i], c)
                 : novograd_update<false>(p[i], grads[t - 1][i], m[i], c);
        }
        long double n = 0.0L;
        for (double g : grads[t - 1]) n += (long double)g * g;
        rv = t == 1 ? n : 0.5L * rv + 0.5L * n;
        rvmax = rvmax > rv ? rvmax : rv;
        const long double rden = sqrtl(amsgrad ? rvmax : rv) + 1e-8L;
        for (int i = 0; i < 3; ++i) {
          const long double u = -(long double)grads[t - 1][i] / rden + 0.1L * rp[i];
          rm[i] = t == 1 ? u : 0.95L * rm[i] + (averaging ? 0.05L : 1.0L) * u;
          rp[i] -= 1e-2L * rm[i];
          CHECK(close(p[i], double(rp[i]), 1e-12, 1e-15), "novograd avg=%d ams=%d t=%d p[%d]",
                averaging, amsgrad, t, i);
          CHECK(close(m[i], double(rm[i]), 1e-12, 1e-15), "novograd m t=%d", t);
        }
        CHECK(close(v, double(rv), 1e-13, 0.0), "novograd v t=%d: %.17g vs %.17Lg", t, v, rv);
      }
    }
  }
}

// The fadam_* functions against the rule in long double over 7 steps of a 3-element tensor:
// b2t-averaged F (F = g^2 at t = 1), eps_t from RMS(g), both clips active (clip 0.5), p 0.5 and
// 0.25, maximize (grad_scale -1).
// capturable blocks (onepass/device_hyper.h): each field lands where the kernels read it, the
// decay coefficient is weight_decay * decay_scale, and what a block does not hold keeps the
// host's value.
void test_device_blocks() {
  const double adam_block[kAdamBlock] = {1e-3, 0.8, 0.99, 1e-6, 0.05, 4.0};
  AdamHyper adam{9, 9, 9, 9, 9, 9, -1.0};
  read_block(adam, adam_block);
  CHECK(adam.lr == 1e-3 && adam.beta1 == 0.8 && adam.beta2 == 0.99 && adam.eps == 1e-6 &&
            adam.weight_decay == 0.05 && adam.decay_coefficient == 0.05 * 4.0 &&
            adam.grad_scale == -1.0,
        "adam block");
  const double sgd_block[kSgdBlock] = {0.1, 0.02, 1.0};
  SgdHyper sgd{9, 0.9, 0.1, 9, 9, 1.0};
  read_block(sgd, sgd_block);
  CHECK(sgd.lr == 0.1 && sgd.momentum == 0.9 && sgd.dampening == 0.1 && sgd.weight_decay == 0.02 &&
            sgd.decay_coefficient == 0.02,
        "sgd block");
  const double lion_block[kLionBlock] = {1e-4, 0.9, 0.99, 0.1, 0.0};
  LionHyper lion{9, 9, 9, 9, 9, 1.0};
  read_block(lion, lion_block);
  CHECK(lion.lr == 1e-4 && lion.beta1 == 0.9 && lion.beta2 == 0.99 && lion.weight_decay == 0.1 &&
            lion.decay_coefficient == 0.0,
        "lion block");
  const double novograd_block[kNovoGradBlock] = {1e-2, 0.95, 0.98, 1e-8, 0.001};
  NovoGradHyper novograd{9, 9, 9, 9, 9, 1.0, true};
  read_block(novograd, novograd_block);
  CHECK(novograd.lr == 1e-2 && novograd.beta1 == 0.95 && novograd.beta2 == 0.98 &&
            novograd.eps == 1e-8 && novograd.weight_decay == 0.001 && novograd.grad_averaging,
        "novograd block");
  const double fadam_block[kFAdamBlock] = {1e-3, 0.9, 0.999, 1e-8, 0.1};
  FAdamHyper fadam{9, 9, 9, 9, 1.0, 0.5, 9, 1.0};
  read_block(fadam, fadam_block);
  CHECK(fadam.lr == 1e-3 && fadam.beta1 == 0.9 && fadam.beta2 == 0.999 && fadam.eps == 1e-8 &&
            fadam.clip == 1.0 && fadam.p == 0.5 && fadam.weight_decay == 0.1,
        "fadam block");
}

void test_fadam_vs_rule() {
  const double grads[7][3] = {{0.3, -1.2, 0.01}, {2.5, -0.4, 0.9},  {-0.05, 0.2, 0.7},
                              {1.5, 1.1, -0.3},  {0.02, 0.03, -0.01}, {-2.0, 0.4, 0.4},
                              {0.6, -0.6, 0.1}};
  for (const double power : {0.5, 0.25}) {
    const FAdamHyper h{1e-2, 0.9, 0.8, 1e-3, 0.5, power, 0.1, -1.0};
    double p[3] = {0.7, -0.2, 1.3}, f[3] = {0, 0, 0}, m[3] = {0, 0, 0};
    long double rp[3] = {0.7L, -0.2L, 1.3L}, rf[3] = {0, 0, 0}, rm[3] = {0, 0, 0};
    for (int t = 1; t <= 7; ++t) {
      const double* g = grads[t - 1];
      double sum_sq = 0.0;
      for (int i = 0; i < 3; ++i) sum_sq += g[i] * g[i];
      const double eps_t = fadam_eps_t(sum_sq, 3, h);
      auto c = FAdamConsts<double>::make(h, t, eps_t, 1.0, 1.0);
      double gn_sq = 0.0, wn_sq = 0.0;
      for (int i = 0; i < 3; ++i) {
        double gn, wn;
        fadam_norms<double>(p[i], g[i], f[i], c, gn, wn);
        gn_sq += gn * gn, wn_sq += wn * wn;
      }
      c = FAdamConsts<double>::make(h, t, eps_t, fadam_clip_divisor(gn_sq, 3, 0.5),
                                    fadam_clip_divisor(wn_sq, 3, 0.5));
      for (int i = 0; i < 3; ++i) fadam_update<double>(p[i], g[i], f[i], m[i], c);
      // The rule, in long double.
      const long double b2 = 0.8L;
      const long double b2t = b2 * (1 - powl(b2, t - 1)) / (1 - powl(b2, t));
      long double rg[3], den[3], gn[3], wn[3], g2 = 0, gn2 = 0, wn2 = 0;
      for (int i = 0; i < 3; ++i) rg[i] = -(long double)g[i], g2 += rg[i] * rg[i];
      const long double rms_g = sqrtl(g2 / 3);
      const long double reps = 1e-3L * (rms_g < 1 ? rms_g : 1);
      for (int i = 0; i < 3; ++i) {
        rf[i] = b2t * rf[i] + (1 - b2t) * rg[i] * rg[i];
        den[i] = powl(rf[i], (long double)power) + reps;
        gn[i] = rg[i] / den[i], wn[i] = rp[i] / den[i];
        gn2 += gn[i] * gn[i], wn2 += wn[i] * wn[i];
      }
      const long double gdiv = fmaxl(1, sqrtl(gn2 / 3) / 0.5L), wdiv = fmaxl(1, sqrtl(wn2 / 3) / 0.5L);
      if (t == 1) CHECK(gdiv > 1 && wdiv > 1, "fadam: the clips are not active at t=1");
      for (int i = 0; i < 3; ++i) {
        rm[i] = 0.9L * rm[i] + 0.1L * (gn[i] / gdiv);
        rp[i] -= 1e-2L * (rm[i] + 0.1L * (wn[i] / wdiv));
        CHECK(close(p[i], double(rp[i]), 1e-12, 1e-15), "fadam p=%g t=%d p[%d]: %.17g vs %.17Lg",
              power, t, i, p[i], rp[i]);
        CHECK(close(m[i], double(rm[i]), 1e-12, 1e-15), "fadam m t=%d", t);
        CHECK(close(f[i], double(rf[i]), 1e-12, 1e-15), "fadam F t=%d", t);
      }
    }
  }
}

// Every instruction-set build gives the scalar build's results bit for bit: the same IEEE
// operations per element (no FMA contraction), and the reductions summed in the same lanes.
template <class S>
void test_kernel_sets(DType dtype) {
  const int64_t sizes[] = {1, 7, 16, 33, 4097};
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  auto fill = [&](std::vector<S>& x, bool positive) {
    for (auto& e : x) e = from_opmath<S>(opmath_t<S>(positive ? std::fabs(normal(rng)) : normal(rng)));
  };
  for (int64_t n : sizes) {
    std::vector<S> p0(n), g(n), m0(n), v0(n), vm0(n);
    fill(p0, false), fill(g, false), fill(m0, false), fill(v0, true), fill(vm0, true);
    std::vector<std::vector<S>> results;
    double novograd_sum = 0.0;
    for (int64_t k = 0; k < cpu::capability_count(); ++k) {
      std::vector<S> p = p0, m = m0, v = v0, vm = vm0;
      Segment seg{p.data(), g.data(), 0, n, 0, 3.0};
      Chunk chunk{0, 0, n};
      cpu::AdamLaunch L{Layout{dtype, dtype, dtype, false}, nullptr, &seg, &chunk, m.data(), v.data(), vm.data(),
                        AdamHyper{1e-2, 0.9, 0.999, 1e-8, 0.1, 0.0, 1.0}, true, true};
      CHECK(cpu::set_capability(cpu::capability_name(k)), "set %s", cpu::capability_name(k));
      cpu::kernels().adam(L, 0, 1);
      std::vector<S> all = p;
      all.insert(all.end(), m.begin(), m.end());
      all.insert(all.end(), v.begin(), v.end());
      all.insert(all.end(), vm.begin(), vm.end());
      results.push_back(all);
      // Lion on the same data; every 5th gradient and momentum zero, so some directions are
      // exactly 0 and the SIMD sign must give 0 there as the scalar one does.
      std::vector<S> lp = p0, lm = m0, lg = g;
      for (size_t i = 0; i < lg.size(); i += 5) lg[i] = from_opmath<S>(0.0f), lm[i] = lg[i];
      Segment lseg{lp.data(), lg.data(), 0, n, 0, 3.0};
      cpu::LionLaunch LL{Layout{dtype, dtype, dtype, false}, nullptr, &lseg, &chunk, lm.data(),
                         LionHyper{1e-2, 0.9, 0.99, 0.0, 0.1, -1.0}, false};
      cpu::kernels().lion(LL, 0, 1);
      results.back().insert(results.back().end(), lp.begin(), lp.end());
      results.back().insert(results.back().end(), lm.begin(), lm.end());
      // NovoGrad: the reduce pass (the same bits in every build: a scalar double loop), then
      // the update with a first-step and a later-step segment.
      for (const double step : {1.0, 4.0}) {
        std::vector<S> np = p0, nm = m0;
        Segment nseg{np.data(), g.data(), 0, n, 0, step};
        double partial = -1.0, denom = 0.0;
        cpu::NovoGradLaunch NL{Layout{dtype, dtype, dtype, false}, nullptr, &nseg,  &chunk,
                               nm.data(), &partial, &denom,
                               NovoGradHyper{1e-2, 0.95, 0.98, 1e-8, 0.1, 1.0, true}};
        cpu::kernels().novograd_reduce(NL, 0, 1);
        if (k == 0) novograd_sum = partial;
        CHECK(partial == novograd_sum, "%s n=%ld: novograd sum %.17g vs scalar %.17g",
              cpu::capability_name(k), long(n), partial, novograd_sum);
        double v = 0.5;
        denom = novograd_second_moment<double>(partial, step, NL.hyper, false, v, nullptr);
        cpu::kernels().novograd(NL, 0, 1);
        results.back().insert(results.back().end(), np.begin(), np.end());
        results.back().insert(results.back().end(), nm.begin(), nm.end());
      }
      // FAdam: the three passes with the host scalars between, a first and a later step.
      for (const double step : {1.0, 4.0}) {
        std::vector<S> fp = p0, ff = v0, fm = m0;
        Segment fseg{fp.data(), g.data(), 0, n, 0, step};
        double partial[2] = {-1.0, -1.0};
        cpu::FAdamSegment scalars{0.0, 1.0, 1.0};
        cpu::FAdamLaunch FL{Layout{dtype, dtype, dtype, false}, nullptr, &fseg,    &chunk,
                            ff.data(), fm.data(), partial,
                            &scalars, FAdamHyper{1e-2, 0.9, 0.999, 1e-8, 0.5, 0.5, 0.1, 1.0}};
        cpu::kernels().fadam_reduce(FL, 0, 1);
        scalars.eps_t = fadam_eps_t(partial[0], n, FL.hyper);
        cpu::kernels().fadam_norms(FL, 0, 1);
        scalars.gn_divisor = fadam_clip_divisor(partial[0], n, 0.5);
        scalars.wn_divisor = fadam_clip_divisor(partial[1], n, 0.5);
        cpu::kernels().fadam(FL, 0, 1);
        results.back().insert(results.back().end(), fp.begin(), fp.end());
        results.back().insert(results.back().end(), ff.begin(), ff.end());
        results.back().insert(results.back().end(), fm.begin(), fm.end());
      }
    }
    for (size_t k = 1; k < results.size(); ++k) {
      for (size_t i = 0; i < results[0].size(); ++i) {
        const double a = to_opmath(results[0][i]), b = to_opmath(results[k][i]);
        CHECK(std::memcmp(&results[0][i], &results[k][i], sizeof(S)) == 0,
              "%s n=%ld element %zu: %.17g vs scalar %.17g", cpu::capability_name(int64_t(k)),
              long(n), i, b, a);
      }
    }
  }
}

}  // namespace

int main() {
  test_bf16();
  test_half();
  test_math_vs_torch();
  test_lion_vs_paper();
  test_novograd_vs_rule();
  test_fadam_vs_rule();
  test_device_blocks();
  test_kernel_sets<float>(DType::kFloat32);
  test_kernel_sets<double>(DType::kFloat64);
  test_kernel_sets<bf16_t>(DType::kBFloat16);
  test_kernel_sets<half_t>(DType::kFloat16);
  std::printf("%d passed, %d failed\n", g_failures == 0 ? 1 : 0, g_failures == 0 ? 0 : 1);
  if (g_failures) std::printf("%d checks failed\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
