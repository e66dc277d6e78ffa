"""Stochastic rounding of bf16 params (``stochastic_rounding=True``): unbiased where round to
nearest is stuck, reproducible from the seed in the param group (and its state_dict), the same
draws on every backend, and nothing changes for other dtypes.
"""

from __future__ import annotations

import pytest
import torch

import onepass
from onepass.algorithms.base import store_param

from helpers import BACKEND_NAMES_AND_TRITON, CAPABILITIES, EVERY_OPTIMIZER

#: The backends compared with the reference backend.
NOT_REFERENCE = [name for name in BACKEND_NAMES_AND_TRITON if name != "reference"]

#: Muon's batched Newton-Schulz rounds differently from the reference's per-matrix one, so its
#: fp32 results, and then the rounding draws, are not bit-equal: it is left out here.
ELEMENTWISE = [name for name in EVERY_OPTIMIZER if name != "Muon"]


def test_store_param_is_unbiased_and_exact_on_representable_values() -> None:
    torch.manual_seed(0)
    exact = torch.randn(1000).to(torch.bfloat16)
    p = torch.empty_like(exact)
    store_param(p, exact.float(), seed=3, index_base=0)
    assert torch.equal(p, exact)  # nothing below the bf16 mantissa: nothing to round
    target = torch.full((200_000,), 1.0 + 0.3 * 2**-7)  # 0.3 of an ulp above 1.0
    p = torch.empty(200_000, dtype=torch.bfloat16)
    store_param(p, target, seed=3, index_base=0)
    assert set(p.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(float(p.float().mean()) - float(target[0])) < 2e-5


@pytest.mark.parametrize("backend", NOT_REFERENCE)
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_every_backend_draws_the_same_rounding(backend: str, name: str) -> None:
    """3 steps on bf16 params: each backend's params equal the reference backend's bit for bit
    (the same fp32 math, the same hash of (seed, element index))."""
    torch.manual_seed(1)
    init = [torch.randn(s) for s in [(64, 33), (5000,), (37,)]]
    grads = [[torch.randn_like(p) for p in init] for _ in range(3)]
    results = []
    for be in ("reference", backend):
        torch.manual_seed(5)  # the group's first seed comes from torch's generator
        params = [p.to(torch.bfloat16).requires_grad_() for p in init]
        opt = EVERY_OPTIMIZER[name](params, backend=be, stochastic_rounding=True)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.to(torch.bfloat16)
            opt.step()
        results.append([p.detach().clone() for p in params])
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        assert torch.equal(a, b), f"param {i}: {int((a != b).sum())} elements differ"


@pytest.mark.parametrize("backend", BACKEND_NAMES_AND_TRITON)
def test_updates_below_one_ulp_accumulate(backend: str) -> None:
    """SGD steps of a tenth of a bf16 ulp: round to nearest never moves the param; stochastic
    rounding moves it by the expected amount on average."""
    delta = 0.1 * 2**-7  # the ulp of bf16 at 1.0 is 2^-7
    steps = 60
    means = {}
    for sr in (False, True):
        p = torch.ones(8192, dtype=torch.bfloat16, requires_grad=True)
        opt = onepass.SGD([p], lr=1.0, backend=backend, stochastic_rounding=sr)
        for _ in range(steps):
            p.grad = torch.full_like(p, -delta)
            opt.step()
        means[sr] = float(p.detach().float().mean())
    assert means[False] == 1.0
    expected = 1.0 + steps * delta
    assert abs(means[True] - expected) < 0.05 * steps * delta, (means[True], expected)


def test_reproducible_and_resumable() -> None:
    """The seed is drawn from torch's generator at construction, advances every step and is a
    group key: the same manual_seed gives the same run, and a state_dict resumes it exactly."""
    init = torch.randn(3000)
    grads = [torch.randn(3000) for _ in range(6)]

    def run(seed: int, cut: int | None = None) -> torch.Tensor:
        torch.manual_seed(seed)
        p = init.to(torch.bfloat16).requires_grad_()
        opt = onepass.AdamW([p], lr=1e-2, stochastic_rounding=True)
        for k, g in enumerate(grads):
            if k == cut:  # save, rebuild, load: as a resumed job does
                saved = opt.state_dict()
                p = p.detach().clone().requires_grad_()
                opt = onepass.AdamW([p], lr=1e-2, stochastic_rounding=True)
                opt.load_state_dict(saved)
            p.grad = g.to(torch.bfloat16)
            opt.step()
        return p.detach()

    first = run(0)
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))
    assert torch.equal(first, run(0, cut=3))


@pytest.mark.parametrize("backend", BACKEND_NAMES_AND_TRITON)
def test_other_dtypes_round_to_nearest(backend: str) -> None:
    for dtype in (torch.float32, torch.float16):
        results = []
        for sr in (False, True):
            torch.manual_seed(2)
            p = torch.randn(777).to(dtype).requires_grad_()
            opt = onepass.AdamW([p], lr=1e-2, backend=backend, stochastic_rounding=sr)
            for _ in range(3):
                p.grad = torch.ones_like(p)
                opt.step()
            results.append(p.detach())
        assert torch.equal(*results), dtype


def test_refused_with_capturable() -> None:
    with pytest.raises(ValueError, match="stochastic_rounding"):
        onepass.AdamW(
            [torch.zeros(3, requires_grad=True)], capturable=True, stochastic_rounding=True
        )


def test_every_cpu_build_draws_the_same() -> None:
    """The SIMD builds round lane by lane with the scalar build's function: the same bits."""
    if len(CAPABILITIES) < 2:
        pytest.skip("one CPU build here")
    results = []
    for capability in CAPABILITIES:
        onepass.set_cpu_capability(capability)
        torch.manual_seed(3)
        p = torch.randn(4099).to(torch.bfloat16).requires_grad_()
        opt = onepass.Lion([p], lr=1e-3, backend="cpu", stochastic_rounding=True)
        p.grad = torch.randn(4099).to(torch.bfloat16)
        opt.step()
        results.append(p.detach())
    onepass.set_cpu_capability(CAPABILITIES[-1])
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_state_streams_never_reuse_a_later_steps_noise() -> None:
    """State slot k of step t must not draw the noise of slot k - 1 (or the param) at step t + 1:
    the streams' seeds are seed + (1 + k) * stride, not seed + 1 + k."""
    from onepass.algorithms.base import Rounding

    value = torch.full((4096,), 1.0 + 0.5 * 2**-7)  # half an ulp: each draw is a coin flip
    draws = {}
    for name, seed, slot in (("param t+1", 8, None), ("slot 0 t", 7, 0), ("slot 1 t", 7, 1)):
        out = torch.empty(4096, dtype=torch.bfloat16)
        rounding = Rounding(seed, 0)
        if slot is None:
            rounding.store(out, value)
        else:
            rounding.store_state(slot, out, value)
        draws[name] = out
    assert not torch.equal(draws["param t+1"], draws["slot 0 t"])
    assert not torch.equal(draws["slot 0 t"], draws["slot 1 t"])


@pytest.mark.parametrize("backend", BACKEND_NAMES_AND_TRITON)
def test_switched_on_through_the_group_key(backend: str) -> None:
    """group['stochastic_rounding'] = True after construction draws a seed at the next step
    (it used to fail there on the missing seed) and rounds from then on."""
    delta = 0.1 * 2**-7
    p = torch.ones(8192, dtype=torch.bfloat16, requires_grad=True)
    opt = onepass.SGD([p], lr=1.0, backend=backend)
    p.grad = torch.full_like(p, -delta)
    opt.step()
    assert torch.equal(p, torch.ones_like(p))  # nearest: a tenth of an ulp never moves it
    opt.param_groups[0]["stochastic_rounding"] = True
    for _ in range(20):
        opt.step()
    assert "sr_seed" in opt.param_groups[0]
    assert abs(float(p.detach().float().mean()) - (1.0 + 20 * delta)) < 0.05 * 20 * delta


def test_a_load_keeps_the_draws_of_the_users_load_hooks() -> None:
    """Loading into a rounding optimizer sets torch's generator back from the seeds unpickling
    the groups drew, not from what the user's load hooks drew (they had been replayed)."""
    p = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    opt = onepass.AdamW([p], stochastic_rounding=True)
    checkpoint = opt.state_dict()
    draws: list[float] = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: draws.append(torch.rand(()).item()))
    opt.register_load_state_dict_post_hook(lambda o: draws.append(torch.rand(()).item()))
    torch.manual_seed(0)
    expected = torch.rand(3).tolist()
    torch.manual_seed(0)
    opt.load_state_dict(checkpoint)
    draws.append(torch.rand(()).item())
    assert draws == pytest.approx(expected)
    assert opt.param_groups[0]["sr_seed"] == checkpoint["param_groups"][0]["sr_seed"]
