"""onepass.FAdam against an independent, straightforward transcription of the rule (Hwang, 2024,
Algorithm 1), written out here element by element in float64 over 7 steps on every backend this
machine runs; plus a param whose first step comes late, the hyperparameter checks, a state_dict
round trip and AMP.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from test_numerics import check_against_reference

import onepass

from helpers import FADAM_INFO as INFO
from helpers import (
    all_backends,
    assert_small_tensors_step_alike_beside_a_large_one,
    config_id,
    make_grads,
    make_params,
    needs_native,
    skip_unless_implemented,
)

STEPS = 7


def _rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else 0.0


def _straight_fadam(
    params: list[torch.Tensor],
    grads_per_step: list[list[torch.Tensor | None]],
    lr: float,
    config: dict[str, Any],
) -> tuple[list[list[float]], list[dict[str, Any] | None]]:
    """FAdam step by step, tensor by tensor, on Python float lists (flattened tensors)."""
    b1, b2 = config.get("betas", (0.9, 0.999))
    eps = config.get("eps", 1e-8)
    clip = config.get("clip", 1.0)
    power = config.get("p", 0.5)
    wd = config.get("weight_decay", 0.1)
    ws = [p.detach().reshape(-1).tolist() for p in params]
    states: list[dict[str, Any] | None] = [None] * len(ws)
    for grads in grads_per_step:
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            g = grad.reshape(-1).tolist()
            if config.get("maximize", False):
                g = [-x for x in g]
            state = states[i]
            if state is None:
                state = states[i] = {"step": 0, "F": [0.0] * len(g), "m": [0.0] * len(g)}
            t = state["step"] + 1
            b2t = b2 * (1 - b2 ** (t - 1)) / (1 - b2**t)
            fim = [b2t * f + (1 - b2t) * x * x for f, x in zip(state["F"], g, strict=True)]
            rms_g = _rms(g)
            eps_t = eps * (min(1.0, rms_g) if rms_g > 0 else 1.0)  # all zeros: eps, no 0 / 0
            den = [f**power + eps_t for f in fim]
            gn = [x / d for x, d in zip(g, den, strict=True)]
            gn_div = max(1.0, _rms(gn) / clip)
            gn = [x / gn_div for x in gn]
            m = [b1 * a + (1 - b1) * x for a, x in zip(state["m"], gn, strict=True)]
            wn = [w / d for w, d in zip(ws[i], den, strict=True)]
            wn_div = max(1.0, _rms(wn) / clip)
            wn = [x / wn_div for x in wn]
            ws[i] = [w - lr * (a + wd * x) for w, a, x in zip(ws[i], m, wn, strict=True)]
            state.update(step=t, F=fim, m=m)
    return ws, states


CONFIGS: list[dict[str, Any]] = [
    {},
    {"weight_decay": 0.0},
    {"clip": 0.5},
    {"p": 0.25},
    {"maximize": True},
    {"betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.3, "clip": 0.05, "p": 1.0},
]


@pytest.mark.parametrize("backend", all_backends(), ids=lambda b: b.id)
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_matches_the_rule_in_float64(backend: Any, config: dict[str, Any]) -> None:
    skip_unless_implemented(INFO, backend.name)
    if backend.capability is not None:
        onepass.set_cpu_capability(backend.capability)
    torch.manual_seed(0)
    params = make_params(torch.float64, sizes=(0, 1, 7, 257))
    grads_per_step = [make_grads(params, step) for step in range(1, STEPS + 1)]
    late = 2  # no grad on steps 1 and 2: its t = 1 is the optimizer's third step
    assert grads_per_step[0][late] is None and grads_per_step[2][late] is not None
    lr = 3e-2
    expected_params, expected_states = _straight_fadam(params, grads_per_step, lr, config)
    optimizer = onepass.FAdam(params, lr=lr, backend=backend.name, **config)
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.clone()
        optimizer.step()
    tight = {"rtol": 1e-12, "atol": 1e-14}

    def as_tensor(values: list[float], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64).reshape(like.shape)

    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach(), as_tensor(expected_params[i], p), **tight)
        expected = expected_states[i]
        if expected is None:
            assert p not in optimizer.state or not optimizer.state[p]
            continue
        state = optimizer.state[p]
        assert set(state) == {"step", "fim", "momentum"}
        assert float(state["step"]) == expected["step"]
        torch.testing.assert_close(state["fim"], as_tensor(expected["F"], p), **tight)
        torch.testing.assert_close(state["momentum"], as_tensor(expected["m"], p), **tight)
    assert float(optimizer.state[params[late]]["step"]) == expected_states[late]["step"] < STEPS


@pytest.mark.parametrize("backend", all_backends(), ids=lambda b: b.id)
def test_an_all_zero_grad_steps_with_eps(backend: Any) -> None:
    """An all-zero grad (an unused param after zero_grad(set_to_none=False)) takes eps_t = eps:
    the rule's eps * RMS(g) = 0 would give den = 0 where F = 0, and 0 / 0 a NaN tensor. Zeros on
    a tensor's first step (F = 0 everywhere) and later, where some of F is still 0."""
    skip_unless_implemented(INFO, backend.name)
    if backend.capability is not None:
        onepass.set_cpu_capability(backend.capability)
    torch.manual_seed(0)
    params = [torch.randn(n, dtype=torch.float64).requires_grad_() for n in (7, 257)]
    partly = torch.randn(257, dtype=torch.float64)
    partly[::3] = 0.0  # these elements' F stays 0 until a later nonzero grad
    grads_per_step: list[list[torch.Tensor | None]] = [
        [torch.zeros(7, dtype=torch.float64), partly],
        [torch.randn(7, dtype=torch.float64), torch.zeros(257, dtype=torch.float64)],
        [torch.zeros(7, dtype=torch.float64), torch.randn(257, dtype=torch.float64)],
    ]
    lr = 3e-2
    expected, _ = _straight_fadam(params, grads_per_step, lr, {})
    optimizer = onepass.FAdam(params, lr=lr, backend=backend.name)
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    for i, p in enumerate(params):
        assert torch.isfinite(p).all() and torch.isfinite(optimizer.state[p]["momentum"]).all()
        want = torch.tensor(expected[i], dtype=torch.float64)
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", all_backends(), ids=lambda b: b.id)
def test_a_nan_grad_element_makes_its_tensor_nan(backend: Any) -> None:
    """With no GradScaler to skip the step, a NaN grad element makes RMS(gn) NaN; the clip
    divisor max(1, NaN) is NaN on every backend (as torch.clamp's), so the tensor's whole param
    and momentum go NaN, not only that element. The step's other tensor is unaffected."""
    skip_unless_implemented(INFO, backend.name)
    if backend.capability is not None:
        onepass.set_cpu_capability(backend.capability)
    torch.manual_seed(0)
    params = [torch.randn(n).requires_grad_() for n in (8, 33)]
    optimizer = onepass.FAdam(params, lr=1e-3, backend=backend.name)
    for p in params:
        p.grad = torch.randn_like(p)
    params[0].grad[3] = float("nan")
    optimizer.step()
    assert params[0].isnan().all() and optimizer.state[params[0]]["momentum"].isnan().all()
    assert torch.isfinite(params[1]).all()


@pytest.mark.parametrize("backend", all_backends(), ids=lambda b: b.id)
def test_clipping_is_active_in_the_tests(backend: Any) -> None:
    """The configs above do clip, so test_matches_the_rule_in_float64 checks both clips: the
    normalised gradient in every config, and the normalised weight in every config where it
    counts (weight decay > 0). Read back from onepass.FAdam's steps on that test's params and
    grads: gn = (m_t - b1 m_(t-1)) / (1 - b1) and wn = ((w_(t-1) - w_t) / lr - m_t) / wd, whose
    RMS is exactly ``clip`` after a step that clipped it, and never above it."""
    skip_unless_implemented(INFO, backend.name)
    if backend.capability is not None:
        onepass.set_cpu_capability(backend.capability)
    lr = 3e-2
    for config in CONFIGS:
        torch.manual_seed(0)
        params = make_params(torch.float64, sizes=(0, 1, 7, 257))
        grads_per_step = [make_grads(params, step) for step in range(1, STEPS + 1)]
        optimizer = onepass.FAdam(params, lr=lr, backend=backend.name, **config)
        b1, clip = config.get("betas", (0.9, 0.999))[0], config.get("clip", 1.0)
        wd = config.get("weight_decay", 0.1)
        clipped = {"gn": 0, "wn": 0}
        for grads in grads_per_step:
            before = [p.detach().clone() for p in params]
            momenta = [optimizer.state[p]["momentum"].clone() if p in optimizer.state else None
                       for p in params]  # fmt: skip
            for p, g in zip(params, grads, strict=True):
                p.grad = None if g is None else g.clone()
            optimizer.step()
            for p, g, w, m in zip(params, grads, before, momenta, strict=True):
                if g is None or p.numel() == 0:
                    continue
                m_t = optimizer.state[p]["momentum"]
                normalised = {"gn": (m_t - (0.0 if m is None else b1 * m)) / (1 - b1)}
                if wd > 0:
                    normalised["wn"] = ((w - p.detach()) / lr - m_t) / wd
                for name, value in normalised.items():
                    rms = float(value.square().mean().sqrt())
                    assert rms <= clip * (1 + 1e-9), (config, name, rms)
                    clipped[name] += math.isclose(rms, clip, rel_tol=1e-9)
        assert clipped["gn"] > 0, config
        assert (clipped["wn"] > 0) == (wd > 0), config


@pytest.mark.parametrize("backend", all_backends(), ids=lambda b: b.id)
def test_grad_none_on_the_first_step(backend: Any) -> None:
    """A param without a grad on step 1 gets no state and stays as it is; its own t = 1 comes
    with its first grad (b2t = 0: F = g^2), as for a fresh optimizer."""
    skip_unless_implemented(INFO, backend.name)
    if backend.capability is not None:
        onepass.set_cpu_capability(backend.capability)
    torch.manual_seed(2)
    a = torch.randn(9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b_before = b.detach().clone()
    optimizer = onepass.FAdam([a, b], lr=1e-2, backend=backend.name)
    a.grad = torch.randn_like(a)
    optimizer.step()
    assert torch.equal(b, b_before) and (b not in optimizer.state or not optimizer.state[b])
    grad = torch.randn_like(b)
    twin = b.detach().clone().requires_grad_()
    fresh = onepass.FAdam([twin], lr=1e-2, backend=backend.name)
    b.grad, twin.grad = grad.clone(), grad.clone()
    optimizer.step()
    fresh.step()
    assert float(optimizer.state[b]["step"]) == 1
    torch.testing.assert_close(optimizer.state[b]["fim"], grad * grad, rtol=1e-15, atol=0.0)
    torch.testing.assert_close(b, twin, rtol=1e-15, atol=0.0)


def test_rejects_bad_hyperparameters() -> None:
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="learning rate"):
        onepass.FAdam([p], lr=-1.0)
    with pytest.raises(ValueError, match="epsilon"):
        onepass.FAdam([p], eps=-1.0)
    with pytest.raises(ValueError, match="beta parameter at index 0"):
        onepass.FAdam([p], betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        onepass.FAdam([p], betas=(0.9, -0.1))
    for clip in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="clip value"):
            onepass.FAdam([p], clip=clip)
    for power in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="p value"):
            onepass.FAdam([p], p=power)
    with pytest.raises(ValueError, match="weight_decay"):
        onepass.FAdam([p], weight_decay=-0.1)
    onepass.FAdam([p], p=1.0, clip=1e-3, eps=0.0, weight_decay=0.0)  # the edges are fine


@pytest.mark.parametrize("backend", all_backends(), ids=lambda b: b.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_resume_matches_an_uninterrupted_run(backend: Any, dtype: torch.dtype) -> None:
    """Save after 2 steps (a param whose first step is still to come), load into a fresh
    optimizer over copies of the params, 5 more steps: bitwise the 7 uninterrupted steps."""
    skip_unless_implemented(INFO, backend.name)
    if backend.capability is not None:
        onepass.set_cpu_capability(backend.capability)
    params = make_params(dtype)
    grads_per_step = [make_grads(params, step) for step in range(1, STEPS + 1)]
    config = {"lr": 1e-2, "weight_decay": 0.1, "clip": 0.5, "backend": backend.name}

    def run(ps: list[torch.Tensor], opt: onepass.FAdam, steps: range) -> None:
        for step in steps:
            for p, g in zip(ps, grads_per_step[step], strict=True):
                p.grad = None if g is None else g.clone()
            opt.step()

    whole = onepass.FAdam(params, **config)
    resumed_params = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    first = onepass.FAdam(resumed_params, **config)
    run(params, whole, range(STEPS))
    run(resumed_params, first, range(2))
    saved = copy.deepcopy(first.state_dict())
    second = onepass.FAdam(resumed_params, lr=1.0, backend=backend.name)
    second.load_state_dict(saved)
    assert second.param_groups[0]["clip"] == 0.5
    run(resumed_params, second, range(2, STEPS))
    for p, q in zip(params, resumed_params, strict=True):
        assert torch.equal(p, q)
        if p in whole.state:
            assert set(whole.state[p]) == set(second.state[q]) == {"step", "fim", "momentum"}
            for name, value in whole.state[p].items():
                assert value.dtype == second.state[q][name].dtype
                assert torch.equal(value, second.state[q][name]), name


@pytest.mark.parametrize("backend", all_backends(), ids=lambda b: b.id)
def test_amp_scale_and_found_inf(backend: Any) -> None:
    """grad_scale unscales the grads (the RMS values too); found_inf skips params, state, steps."""
    skip_unless_implemented(INFO, backend.name)
    if backend.capability is not None:
        onepass.set_cpu_capability(backend.capability)
    params = [torch.randn(37, requires_grad=True), torch.randn(3, 4, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    scaled = onepass.FAdam(params, lr=1e-2, backend=backend.name)
    plain = onepass.FAdam(twins, lr=1e-2, backend=backend.name)
    for step in range(3):
        grads = [torch.randn_like(p) * 1e-3 for p in params]  # small: eps_t depends on RMS(g)
        for p, q, g in zip(params, twins, grads, strict=True):
            p.grad, q.grad = g * 1024.0, g.clone()
        scaled.grad_scale = torch.tensor(1024.0)
        scaled.found_inf = torch.tensor(1.0 if step == 1 else 0.0)
        if step != 1:
            plain.step()
        scaled.step()
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert float(scaled.state[p]["step"]) == float(plain.state[q]["step"]) == 2.0
        torch.testing.assert_close(scaled.state[p]["fim"], plain.state[q]["fim"])
        torch.testing.assert_close(scaled.state[p]["momentum"], plain.state[q]["momentum"])


def test_flatten_steps_per_tensor() -> None:
    """flatten=True keeps the params in one buffer but the RMS values stay per tensor."""
    params = [torch.randn(33, requires_grad=True), torch.randn(5, 7, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    flat = onepass.FAdam(params, lr=1e-2, flatten=True)
    plain = onepass.FAdam(twins, lr=1e-2, backend="reference")
    for _ in range(3):
        for p, q in zip(params, twins, strict=True):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        flat.step()
        plain.step()
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert set(flat.state[p]) == set(plain.state[q]) == {"step", "fim", "momentum"}
        assert float(flat.state[p]["step"]) == float(plain.state[q]["step"]) == 3.0
        torch.testing.assert_close(flat.state[p]["fim"], plain.state[q]["fim"])
        torch.testing.assert_close(flat.state[p]["momentum"], plain.state[q]["momentum"])


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multi_chunk_tensors_match_and_do_not_depend_on_threads(dtype: torch.dtype) -> None:
    """Tensors of several 2^15-element chunks (each pass's partial sums are combined per tensor):
    against the reference, and bitwise the same on 1 thread and on every thread."""
    sizes = (3 * (1 << 15) + 5, 70_000, 7)
    params = [torch.randn(n).to(dtype).requires_grad_() for n in sizes]
    check_against_reference(INFO, {"lr": 1e-2, "clip": 0.5}, "cpu", dtype, params)
    results = []
    threads = torch.get_num_threads()
    for count in (1, max(2, threads)):
        torch.set_num_threads(count)
        try:
            torch.manual_seed(5)
            ps = [torch.randn(n).to(dtype).requires_grad_() for n in sizes]
            optimizer = onepass.FAdam(ps, lr=1e-2, backend="cpu")
            for _ in range(3):
                for p in ps:
                    p.grad = torch.randn_like(p)
                optimizer.step()
            results.append([*ps, *(optimizer.state[p]["fim"] for p in ps)])
        finally:
            torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@needs_native
def test_cpu_one_chunk_tensors_fuse_the_three_passes_bit_for_bit() -> None:
    """When every tensor is one chunk the CPU op runs FAdam's two reductions and its update chunk
    by chunk; with one large tensor beside them it runs three passes over the bucket. The small
    tensors come out the same to the bit either way."""
    assert_small_tensors_step_alike_beside_a_large_one(
        lambda ps: onepass.FAdam(ps, lr=1e-2, clip=0.5, backend="cpu")
    )
