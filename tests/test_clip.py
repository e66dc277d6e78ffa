"""Whole-step fusion: ``max_grad_norm=`` and ``onepass.clip_grad_norm_`` fold GradScaler's unscale
and the global-norm clip into the step's own pass. The results equal the composition users write
today (``scaler.unscale_`` + ``torch.nn.utils.clip_grad_norm_`` + step) on every optimizer and
every backend this machine runs; a non-finite norm skips the step; the grads are not rewritten.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import onepass

from helpers import BACKEND_NAMES, BACKEND_NAMES_AND_TRITON, EVERY_OPTIMIZER

STEPS = 5
MAX_NORM = 2.0


def _params() -> list[torch.Tensor]:
    torch.manual_seed(0)
    shapes = [(37,), (9, 5), (4097,), (6, 6)]
    return [torch.randn(s, dtype=torch.float64).float().requires_grad_() for s in shapes]


def _grads(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    """Norms around MAX_NORM: some steps clip, some do not."""
    torch.manual_seed(100 + step)
    scale = 0.005 if step % 2 else 0.05
    return [torch.randn(p.shape) * scale for p in params]


@pytest.mark.parametrize("backend", BACKEND_NAMES_AND_TRITON)
@pytest.mark.parametrize("name", list(EVERY_OPTIMIZER))
def test_max_grad_norm_equals_clip_then_step(name: str, backend: str) -> None:
    make = EVERY_OPTIMIZER[name]
    ours = _params()
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    fused = make(ours, backend=backend, max_grad_norm=MAX_NORM)
    plain = make(theirs, backend=backend)
    for step in range(STEPS):
        grads = _grads(ours, step)
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        norm = torch.nn.utils.clip_grad_norm_(theirs, MAX_NORM)
        plain.step()
        assert fused.grad_norm is not None and fused.step_skipped is not None
        torch.testing.assert_close(fused.grad_norm, norm, rtol=1e-6, atol=0)
        assert not bool(fused.step_skipped)
        for p, g in zip(ours, grads, strict=True):
            assert torch.equal(p.grad, g), "the fused step rewrote a grad"
    for i, (p, q) in enumerate(zip(ours, theirs, strict=True)):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6, msg=lambda m, i=i: f"{i}: {m}")


@pytest.mark.parametrize("backend", BACKEND_NAMES_AND_TRITON)
@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, onepass.GradScaler])
def test_grad_scaler_unscale_clip_and_skip_equal_the_torch_composition(
    backend: str, scaler_cls: type[torch.amp.GradScaler]
) -> None:
    """scaler.step(onepass.AdamW(max_grad_norm=...)) against scaler.unscale_ + clip_grad_norm_ +
    scaler.step(torch.optim.AdamW), through a step with an inf grad (skipped by both, the scale
    backs off the same way), with torch's GradScaler and with onepass's (found_inf from the
    norm: no inf check of its own)."""
    ours = _params()
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    fused = onepass.AdamW(ours, lr=1e-2, weight_decay=0.1, backend=backend, max_grad_norm=MAX_NORM)
    reference = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    our_scaler = scaler_cls("cpu", init_scale=1024.0, growth_interval=2)
    their_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    for step in range(STEPS):
        grads = _grads(ours, step)
        if step == 2:
            grads[1][0, 0] = float("inf")
        # scaler.scale(loss).backward() leaves the grads multiplied by the scale
        our_scale = float(our_scaler.scale(torch.tensor(1.0)))
        their_scale = float(their_scaler.scale(torch.tensor(1.0)))
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = g * our_scale, g * their_scale
        our_scaler.step(fused)
        our_scaler.update()
        their_scaler.unscale_(reference)
        torch.nn.utils.clip_grad_norm_(theirs, MAX_NORM)
        their_scaler.step(reference)
        their_scaler.update()
        assert bool(fused.step_skipped) == (step == 2)
        assert our_scaler.get_scale() == their_scaler.get_scale(), step
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKEND_NAMES_AND_TRITON)
def test_a_non_finite_norm_skips_the_step(backend: str) -> None:
    params = _params()
    opt = onepass.SGD(params, lr=0.1, momentum=0.9, backend=backend, max_grad_norm=1.0)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    params[0].grad[3] = float("nan")
    opt.step()
    assert bool(opt.step_skipped) and not bool(torch.isfinite(opt.grad_norm))
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)
        for k, v in opt.state[p].items():
            assert torch.equal(v, state[id(p)][k]), k


@pytest.mark.parametrize("backend", BACKEND_NAMES_AND_TRITON)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clip_grad_norm_defers_the_scaling_to_the_step(backend: str, norm_type: float) -> None:
    """onepass.clip_grad_norm_(opt, ...) returns torch's norm and leaves the grads alone; the next
    step applies the clip (once: the step after it does not)."""
    ours = _params()
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    fused = onepass.Lion(ours, lr=1e-2, backend=backend)
    plain = onepass.Lion(theirs, lr=1e-2, backend=backend)
    fused_adam = onepass.AdamW([torch.zeros(3, requires_grad=True)])
    assert fused_adam.max_grad_norm is None
    for step in range(3):
        grads = _grads(ours, step)
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        if step < 2:
            norm = onepass.clip_grad_norm_(fused, 0.1, norm_type)
            expected = torch.nn.utils.clip_grad_norm_(theirs, 0.1, norm_type)
            torch.testing.assert_close(norm, expected)
            assert all(torch.equal(p.grad, g) for p, g in zip(ours, grads, strict=True))
        fused.step()
        plain.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_max_grad_norm_must_be_positive() -> None:
    p = torch.zeros(3, requires_grad=True)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="max_grad_norm"):
            onepass.AdamW([p], max_grad_norm=bad)


def test_max_grad_norm_is_not_a_group_key(tmp_path: Any) -> None:
    """Optimizer-wide (the norm is global): not in param_groups, so state_dicts stay torch's."""
    p = torch.zeros(3, requires_grad=True)
    opt = onepass.AdamW([p], max_grad_norm=1.0)
    assert "max_grad_norm" not in opt.param_groups[0]
    torch.optim.AdamW([p]).load_state_dict(opt.state_dict())


def test_onepass_grad_scaler_skips_its_own_inf_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a clipping onepass optimizer the grads are read for the norm only: torch's inf check
    (which rewrites every grad) never runs; without clipping it does, as in torch."""
    calls: list[int] = []
    original = torch._amp_foreach_non_finite_check_and_unscale_

    def counting(*args: Any) -> None:
        calls.append(1)
        original(*args)

    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", counting)
    params = _params()
    for clip, expected in ((MAX_NORM, 0), (None, 1)):
        calls.clear()
        opt = onepass.AdamW(params, lr=1e-2, max_grad_norm=clip)
        scaler = onepass.GradScaler("cpu")
        scaler.scale(torch.tensor(1.0))
        for p in params:
            p.grad = torch.randn_like(p)
        scaler.step(opt)
        scaler.update()
        assert len(calls) == expected, clip


def test_max_grad_norm_survives_pickling_and_state_dict_loads() -> None:
    import copy
    import pickle

    p = torch.zeros(3, requires_grad=True)
    opt = onepass.AdamW([p], max_grad_norm=0.5)
    assert copy.deepcopy(opt).max_grad_norm == 0.5
    assert pickle.loads(pickle.dumps(opt)).max_grad_norm == 0.5
    opt.load_state_dict(torch.optim.AdamW([p]).state_dict())
    assert opt.max_grad_norm == 0.5


@pytest.mark.skipif(not onepass.native_available(), reason="onepass._C not built")
def test_native_total_norm_equals_torch() -> None:
    """The CPU reduction behind the clip: every float dtype, mixed in one list, non-contiguous
    and zero-size tensors, chunks that split a tensor; opcheck on the op."""
    from onepass import _ops

    torch.manual_seed(9)
    tensors = [
        torch.randn(70_001),
        torch.randn(9, 5).t(),
        torch.randn(0),
        torch.randn(333).to(torch.bfloat16),
        torch.randn(17).to(torch.float16),
    ]
    expected = torch.linalg.vector_norm(torch.cat([t.double().reshape(-1) for t in tensors]))
    norm = _ops.total_norm(tensors, 2.0)
    assert norm is not None and norm.dtype == torch.float32
    torch.testing.assert_close(norm.double(), expected, rtol=1e-6, atol=0)
    assert _ops.total_norm(tensors, 1.0) is None  # other orders: torch's
    doubles = [torch.randn(1000, dtype=torch.float64) for _ in range(3)]
    norm = _ops.total_norm(doubles, 2.0)
    assert norm is not None and norm.dtype == torch.float64
    torch.testing.assert_close(norm, torch.linalg.vector_norm(torch.cat(doubles)))
    torch.library.opcheck(
        torch.ops.onepass.sum_of_squares.default, ([torch.randn(5), torch.randn(3)],)
    )
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.onepass.sum_of_squares([torch.randn(3), torch.randn(3).double()])


@pytest.mark.skipif(not onepass.native_available(), reason="onepass._C not built")
def test_native_grads_norm_reads_the_grads_itself() -> None:
    """The clip's norm of an optimizer's grads, read natively from the params: params without a
    grad are left out, dtypes mix, non-contiguous and zero-size grads count; a grad the native
    reduction does not take (sparse; on CUDA, every grad) is left to torch's norm."""
    from onepass import _ops

    torch.manual_seed(10)
    params = [
        torch.randn(70_001, requires_grad=True),
        torch.randn(5, 9, requires_grad=True),
        torch.randn(0, requires_grad=True),
        torch.randn(333, requires_grad=True),
        torch.randn(17, dtype=torch.bfloat16, requires_grad=True),
        torch.randn(1000, requires_grad=True),  # no grad
    ]
    for p in params[:5]:
        p.grad = torch.randn(tuple(reversed(p.shape))).t() if p.dim() == 2 else torch.randn_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    expected = torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads]))
    norm = _ops.grads_total_norm(params)
    assert norm is not None and norm.dtype == torch.float32
    torch.testing.assert_close(norm.double(), expected, rtol=1e-6, atol=0)
    opt = onepass.AdamW(params, max_grad_norm=1.0, backend="reference")
    torch.testing.assert_close(opt.norm_for_next_step(), norm, rtol=0, atol=0)

    params[3].grad = params[3].grad.to_sparse()  # not the native reduction's (nor torch's)
    assert _ops.grads_total_norm(params) is None
    assert _ops.total_norm([p.grad for p in params if p.grad is not None], 2.0) is None


class _TaggedParameter(torch.nn.Parameter):
    """A Parameter subclass: only the GIL holder may check its type (isinstance)."""


@pytest.mark.skipif(not onepass.native_available(), reason="onepass._C not built")
def test_native_grads_norm_of_many_params_is_read_by_all_threads() -> None:
    """1,500 params (glue::kParallelScanTensors and over): the norm is the same bits whether the
    grads are read by one thread or all of them, with mixed dtypes, None grads, a non-contiguous
    grad, and a Parameter subclass (serial scan); a sparse grad late in the list still hands
    the norm to torch."""
    from onepass import _ops

    torch.manual_seed(11)
    params = [torch.randn(i % 13 + 1, requires_grad=True) for i in range(1500)]
    for i, p in enumerate(params):
        if i % 7 != 3:
            p.grad = torch.randn_like(p)
    params[1200].grad = torch.randn(2 * params[1200].numel())[::2]
    assert not params[1200].grad.is_contiguous()
    params[901] = torch.randn(5, dtype=torch.bfloat16, requires_grad=True)
    params[901].grad = torch.randn(5, dtype=torch.bfloat16)
    grads = [p.grad for p in params if p.grad is not None]
    expected = torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads]))
    threads = torch.get_num_threads()
    try:
        norms = []
        for count in (1, max(threads, 2)):
            torch.set_num_threads(count)
            before = onepass._C.parallel_scans()
            norms.append(_ops.grads_total_norm(params))
            assert onepass._C.parallel_scans() - before == (count > 1)
        tagged = list(params)
        tagged[5] = _TaggedParameter(params[5].detach())
        tagged[5].grad = params[5].grad
        norms.append(_ops.grads_total_norm(tagged))
    finally:
        torch.set_num_threads(threads)
    assert all(norm is not None for norm in norms)
    torch.testing.assert_close(norms[0].double(), expected, rtol=1e-6, atol=0)
    assert torch.equal(norms[0], norms[1]) and torch.equal(norms[0], norms[2])
    params[1400].grad = params[1400].grad.to_sparse()
    assert _ops.grads_total_norm(params) is None


@pytest.mark.skipif(not onepass.native_available(), reason="onepass._C not built")
def test_flattened_norm_reads_the_flat_buffers_while_every_grad_is_its_view() -> None:
    """flatten=True: the clip norm is taken over the flat grad buffers while every grad is still
    its view of them, and over the grads themselves once one is not (a new tensor, None)."""
    torch.manual_seed(11)
    params = [torch.randn(s, requires_grad=True) for s in [(37,), (9, 5), (4097,), (6, 6)]]
    frozen = torch.randn(3, requires_grad=False)
    for p in params:
        p.grad = torch.randn_like(p)
    opt = onepass.AdamW([*params, frozen], max_grad_norm=1.0, flatten=True, backend="cpu")
    opt.step()
    assert opt._engine.flat_grad_buffers() is not None

    def torch_norm() -> torch.Tensor:
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])

    for p in params:
        p.grad.copy_(torch.randn_like(p))
    torch.testing.assert_close(opt.norm_for_next_step(), torch_norm(), rtol=1e-6, atol=0)
    opt.step()
    params[1].grad = torch.randn_like(params[1])  # no longer its view
    assert opt._engine.flat_grad_buffers() is None
    torch.testing.assert_close(opt.norm_for_next_step(), torch_norm(), rtol=1e-6, atol=0)
    opt.step()
    params[2].grad = None
    torch.testing.assert_close(opt.norm_for_next_step(), torch_norm(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKEND_NAMES_AND_TRITON)
def test_a_refused_step_keeps_the_pending_clip(backend: str) -> None:
    """clip_grad_norm_, then a step refused (a sparse grad): nothing changed, the clip is still
    pending, and the step retried with a good grad is clipped."""
    ours = _params()
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    fused = onepass.AdamW(ours, lr=1e-2, backend=backend)
    plain = onepass.AdamW(theirs, lr=1e-2, backend=backend)
    grads = [100.0 * g for g in _grads(ours, 0)]
    for p, q, g in zip(ours, theirs, grads, strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    onepass.clip_grad_norm_(fused, 1.0)
    torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    good, ours[0].grad = ours[0].grad, ours[0].grad.to_sparse()
    norm_before = fused.grad_norm
    with pytest.raises((RuntimeError, ValueError), match="sparse"):
        fused.step()
    assert fused.grad_norm is norm_before
    ours[0].grad = good
    fused.step()
    plain.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_zero_grad_drops_a_pending_clip(backend: str) -> None:
    """clip_grad_norm_, then no step (a loop that skips it), zero_grad() and a new backward: the
    next step does not clip, as torch's clip_grad_norm_ clipped only the grads zero_grad then
    dropped (the stale coefficient had scaled the new grads)."""
    results = []
    for clip_first in (True, False):
        p = torch.ones(5, dtype=torch.float64, requires_grad=True)
        opt = onepass.SGD([p], lr=0.1, backend=backend)
        if clip_first:
            p.grad = torch.full_like(p, 10.0)
            opt.clip_grad_norm_(1.0)
        for set_to_none in (True, False):
            opt.zero_grad(set_to_none=set_to_none)
            p.grad = torch.full_like(p, 3.0)
            opt.step()
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1])
