"""flatten=True: params and grads moved into flat per-bucket buffers, one segment per step."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

import onepass
from onepass import _ops

from helpers import assert_verbose_allclose


def _model() -> torch.nn.Module:
    # odd sizes, a frozen layer and a param that never gets a grad
    layers = [torch.nn.Linear(13, 31), torch.nn.Linear(31, 7), torch.nn.Linear(7, 5)]
    model = torch.nn.Sequential(*layers)
    model[1].requires_grad_(False)
    model.unused = torch.nn.Parameter(torch.randn(3))
    return model


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    dtype = next(model.parameters()).dtype
    x = torch.randn(9, 13, generator=torch.Generator().manual_seed(5), dtype=dtype)
    for _ in range(steps):
        opt.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize(
    ("make", "make_torch"),
    [
        (
            lambda ps: onepass.AdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True, flatten=True),
            lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),
        ),
        (
            lambda ps: onepass.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, flatten=True),
            lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
        ),
        (  # no torch.optim Lion: the peer is the reference backend, per tensor
            lambda ps: onepass.Lion(ps, lr=1e-2, weight_decay=0.1, flatten=True),
            lambda ps: onepass.Lion(ps, lr=1e-2, weight_decay=0.1, backend="reference"),
        ),
    ],
    ids=["adamw", "sgd", "lion"],
)
def test_flatten_matches_torch_with_zeroed_grads(
    make: Callable[..., torch.optim.Optimizer], make_torch: Callable[..., torch.optim.Optimizer]
) -> None:
    """flatten steps like torch.optim after zero_grad(set_to_none=False) (grads are zeros, not
    None), the frozen layer never moves, and the fast one-segment path is the one taken."""
    model = _model().double()
    twin = copy.deepcopy(model)
    frozen = model[1].weight.detach().clone()
    opt, ref = make(model.parameters()), make_torch(twin.parameters())
    _train(model, opt, 7)
    _train(twin, ref, 7)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert_verbose_allclose(p, q, 1e-12, 1e-14, name)
        for slot, value in ref.state[q].items():
            assert_verbose_allclose(opt.state[p][slot], value, 1e-12, 1e-14, f"{name}.{slot}")
    assert torch.equal(model[1].weight, frozen)
    bucket = opt._engine.plans[0].buckets[0]
    assert bucket.flat_param is not None
    assert bucket.flat_step() is not None, "the one-segment path was not taken"
    assert all(p is not model.unused for p in bucket.params), "a param without grads was flattened"
    i = next(i for i, p in enumerate(bucket.params) if p is model[0].weight)
    start = int(bucket.offsets[i])
    assert model[0].weight.data_ptr() == bucket.flat_param[start:].data_ptr()


def _replace_grads(model: torch.nn.Module) -> None:
    """New tensors for every grad (as zero_grad(set_to_none=True) and a backward give)."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad = p.grad.clone()


def _replace_a_param(model: torch.nn.Module) -> None:
    """A fresh tensor for the first weight (p.data = ..., as a checkpoint loader might): p
    is no longer a view of the flat buffer, which the one flat pass once silently stopped
    updating."""
    model[0].weight.data = model[0].weight.data.clone()


def _rebind_grad_data(model: torch.nn.Module) -> None:
    """Each grad object kept, its memory replaced (``p.grad.data = ...``): the flat pass had
    read the stale flat buffer, and zero_grad zeroed only that."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad.data = p.grad.data.clone()


def _cast_round_trip(model: torch.nn.Module) -> None:
    """model.double().float(): Module._apply gives every param and grad new memory in place of
    the old (``.data =``), keeping the grad objects."""
    model.double().float()


@pytest.mark.parametrize(
    "replace",
    [_replace_grads, _replace_a_param, _rebind_grad_data, _cast_round_trip],
    ids=["grads", "param", "grad-data", "cast-round-trip"],
)
def test_flatten_falls_back_when_views_are_replaced(
    replace: Callable[[torch.nn.Module], None],
) -> None:
    """Grads or params that are no longer the flat views: the per-tensor path takes over and
    the result is still torch's."""
    model = _model()
    twin = copy.deepcopy(model)
    opt = onepass.AdamW(model.parameters(), lr=1e-2, flatten=True)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    x = torch.randn(9, 13)
    for step in range(7):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad(set_to_none=False)
            if step == 3:
                replace(m)
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert_verbose_allclose(p, q, 1.3e-6, 1e-5)


def test_flatten_state_dict_loads_into_torch() -> None:
    model = _model()
    twin = copy.deepcopy(model)
    opt = onepass.AdamW(model.parameters(), lr=1e-2, flatten=True)
    _train(model, opt, 3)
    twin.load_state_dict(model.state_dict())
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(model, opt, 4)
    _train(twin, ref, 4)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert_verbose_allclose(p, q, 1.3e-6, 1e-5)


@pytest.mark.parametrize("count", [3, 1500], ids=["3-params", "1500-params"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_grads_are_tells_views_from_replaced_grads(native: bool, count: int, monkeypatch) -> None:
    """The identity check of the flat path (native where built, Python otherwise): every grad
    is its view; a replaced or a missing grad is not. 1,500 params are read a block of 64 at a
    time on all of torch's threads: the changed param is in the last block of the last part."""
    if not native:
        monkeypatch.setattr(_ops, "NATIVE_ERROR", "forced off")
    elif _ops.NATIVE_ERROR is not None:
        pytest.skip("onepass._C is not built")
    sizes = [(3, 5, 7)[i % 3] for i in range(count)]
    params = [torch.zeros(n, requires_grad=True) for n in sizes]
    views = [torch.zeros(n) for n in sizes]
    for p, v in zip(params, views, strict=True):
        p.grad = v
    impls = torch.tensor([v._cdata for v in views], dtype=torch.int64)
    assert _ops.grads_are(params, impls)
    # the last block of the last part, and a middle block of the first
    for changed in sorted({count - 2, min(70, count - 1)}):
        params[changed].grad = views[changed].clone()
        assert not _ops.grads_are(params, impls)
        params[changed].grad = None
        assert not _ops.grads_are(params, impls)
        params[changed].grad = views[changed]
        assert _ops.grads_are(params, impls)
    changed = count - 2
    flat = torch.zeros(sum(sizes))
    start = 0
    for p, n in zip(params, sizes, strict=True):
        p.data = flat[start : start + n]
        start += n
    storage = flat.untyped_storage().data_ptr()
    assert _ops.grads_are(params, impls, storage)
    params[changed].data = params[changed].data.clone()  # no longer a view of the flat buffer
    assert _ops.grads_are(params, impls) and not _ops.grads_are(params, impls, storage)
    # A Parameter subclass (only the GIL holder may check it) sends the list to the serial check.
    params[1] = _TaggedParameter(params[1].detach())
    params[1].grad = views[1]
    assert _ops.grads_are(params, impls)
    params[1].grad = views[1].clone()
    assert not _ops.grads_are(params, impls)


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_grads_are_tells_a_view_from_the_same_grad_given_other_memory(
    native: bool, monkeypatch
) -> None:
    """With the flat grad buffer's address and each view's offset, the check also refuses a
    grad that is still the view object but holds other memory (``p.grad.data = ...``)."""
    if not native:
        monkeypatch.setattr(_ops, "NATIVE_ERROR", "forced off")
    elif _ops.NATIVE_ERROR is not None:
        pytest.skip("onepass._C is not built")
    sizes = [(3, 5, 7)[i % 3] for i in range(200)]
    flat = torch.zeros(sum(sizes))
    offsets = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], dtype=torch.int64)
    params = [torch.zeros(n, requires_grad=True) for n in sizes]
    for p, start, n in zip(params, offsets.tolist(), sizes, strict=True):
        p.grad = flat[start : start + n]
    impls = torch.tensor([p.grad._cdata for p in params], dtype=torch.int64)
    storage = flat.untyped_storage().data_ptr()
    assert _ops.grads_are(params, impls, 0, storage, offsets)
    params[150].grad.data = params[150].grad.data.clone()
    assert _ops.grads_are(params, impls)  # the same object: only the memory tells
    assert not _ops.grads_are(params, impls, 0, storage, offsets)
    params[150].grad.data = flat[offsets[151] : offsets[151] + sizes[150]]  # another place
    assert not _ops.grads_are(params, impls, 0, storage, offsets)
    params[150].grad.data = flat[offsets[150] : offsets[150] + sizes[150]]
    assert _ops.grads_are(params, impls, 0, storage, offsets)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_step_count_written_in_place_is_honoured(backend: str) -> None:
    """One param's Adam state reset in place through optimizer.state (as a pruning method
    re-initialising it might): the flat pass had stepped every tensor with the first tensor's
    count, undoing the reset or spreading it to all."""
    model = _model().double()
    twin = copy.deepcopy(model)
    opt = onepass.AdamW(model.parameters(), lr=1e-2, flatten=True, backend=backend)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    _train(model, opt, 3)
    _train(twin, ref, 3)
    for name in ("0.weight", "2.weight"):  # the first tensor of the bucket, then another
        for o, m in ((opt, model), (ref, twin)):
            p = dict(m.named_parameters())[name]
            assert set(o.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
            for value in o.state[p].values():
                value.zero_()
        _train(model, opt, 3)
        _train(twin, ref, 3)
        for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            assert_verbose_allclose(p, q, 1e-12, 1e-14, name)
            if ref.state.get(q):
                assert float(opt.state[p]["step"]) == float(ref.state[q]["step"]), name


def test_flatten_switched_on_between_steps_takes_effect_at_the_next_step() -> None:
    model = _model()
    opt = onepass.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 2)
    opt.param_groups[0]["flatten"] = True
    _train(model, opt, 1)
    bucket = opt._engine.plans[0].buckets[0]
    assert bucket.flat_param is not None and bucket.flat_step() is not None


class _TaggedParameter(torch.nn.Parameter):
    """A Parameter subclass: not exactly a Tensor or a Parameter."""


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_zero_grad_to_none_skips_params_backward_did_not_reach(backend: str) -> None:
    """zero_grad() (set_to_none=True) drops the flat grads as torch does: a branch that
    backward reaches on some steps only is stepped on those only, like torch.optim.AdamW."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(5, 4), "b": torch.nn.Linear(5, 4)})
    model = model.double()
    twin = copy.deepcopy(model)
    opt = onepass.AdamW(model.parameters(), lr=1e-2, backend=backend, flatten=True)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    x = torch.randn(3, 5, dtype=torch.float64)
    for step in range(6):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            loss = m["a"](x).square().sum()
            if step < 2:  # "b" only on the first two steps
                loss = loss + m["b"](x).square().sum()
            loss.backward()
            o.step()
        assert (model["b"].weight.grad is None) == (twin["b"].weight.grad is None)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert_verbose_allclose(p, q, 1e-12, 1e-14, name)
        assert float(opt.state[p]["step"]) == float(ref.state[q]["step"]), name


def test_zero_grad_after_a_cast_zeroes_the_grads() -> None:
    """model.to(dtype) keeps each p.grad object and swaps its memory: zero_grad(False) after it
    zeroes them (they are no longer views of the flat buffer), so the next step sees one
    backward's grad, not two."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = onepass.SGD(model.parameters(), lr=0.1, backend="cpu", flatten=True)
    x = torch.randn(2, 4)
    opt.zero_grad(set_to_none=False)
    model(x).sum().backward()
    opt.step()
    model.to(torch.float64)
    opt.zero_grad(set_to_none=False)
    assert model.bias.grad is not None and not model.bias.grad.any()
    before = model.bias.detach().clone()
    model(x.double()).sum().backward()  # d(sum)/d(bias) = 2 per element
    opt.step()
    torch.testing.assert_close(model.bias.detach(), before - 0.1 * 2.0)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_grad_the_bucket_refuses_is_refused_before_flattening(backend: str) -> None:
    """A float64 grad on a bf16 param is refused at the first step, as without flatten: not
    cast into the flat bf16 grad buffer, and the params are not moved."""
    params = [torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16)) for _ in range(2)]
    params[1].grad_dtype = None  # torch 2.10+: let the param take a grad of another dtype
    opt = onepass.SGD(params, lr=0.5, backend=backend, flatten=True)
    params[0].grad = torch.ones(4, dtype=torch.bfloat16)
    try:
        params[1].grad = torch.full((4,), 1 / 3, dtype=torch.float64)
    except RuntimeError:
        pytest.skip("this torch refuses a grad of another dtype outright")
    pointers = [p.data_ptr() for p in params]
    with pytest.raises(RuntimeError, match=r"params'\]\[1\]"):
        opt.step()
    assert [p.data_ptr() for p in params] == pointers
    assert all(torch.equal(p, torch.ones(4, dtype=torch.bfloat16)) for p in params)
    assert params[1].grad.dtype == torch.float64


# Sizes for the per-tensor steps of flattened buckets: empty tensors (first, inside, last), odd
# sizes, one longer than a chunk of parallel work (ops.cpp kChunkElements), so a tensor spans
# several chunks.
_SEGMENT_SHAPES = [(0,), (1,), (7,), (33, 5), (0, 4), (4097,), (70001,), (3, 0)]


def _flat_and_plain(
    make: Callable[..., torch.optim.Optimizer], dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.optim.Optimizer, torch.optim.Optimizer]:
    """Params of _SEGMENT_SHAPES and their twins, and make(...) of each, flattened and not."""
    gen = torch.Generator().manual_seed(11)
    params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in _SEGMENT_SHAPES]
    twins = [p.detach().clone().requires_grad_() for p in params]
    return params, twins, make(params, flatten=True), make(twins, flatten=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    "make",
    [
        lambda ps, **kw: onepass.NovoGrad(ps, lr=1e-2, weight_decay=0.1, amsgrad=True, **kw),
        lambda ps, **kw: onepass.NovoGrad(ps, lr=1e-2, grad_averaging=True, **kw),
        lambda ps, **kw: onepass.FAdam(ps, lr=1e-2, clip=0.5, **kw),
    ],
    ids=["novograd-amsgrad", "novograd-averaging", "fadam"],
)
def test_per_tensor_algorithms_step_flattened_params_tensor_by_tensor(
    make: Callable[..., torch.optim.Optimizer], dtype: torch.dtype
) -> None:
    """A flattened NovoGrad / FAdam bucket never takes the one-segment path (its reductions are
    per tensor): bit for bit the steps of separate params, params and every state tensor, over
    7 steps, with empty tensors among them."""
    params, twins, flat, plain = _flat_and_plain(make, dtype)
    gen = torch.Generator().manual_seed(12)
    for step in range(7):
        for p, q in zip(params, twins, strict=True):
            g = torch.randn(p.shape, generator=gen, dtype=dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)  # (a view of the flat grad buffer from the first step on)
            q.grad = g.clone()
        if step > 0:
            bucket = flat._engine.plans[0].buckets[0]
            assert bucket.flat_param is not None and bucket.flat_step() is None
        flat.step()
        plain.step()
    for i, (p, q) in enumerate(zip(params, twins, strict=True)):
        assert torch.equal(p, q), f"params[{i}]"
        assert flat.state[p].keys() == plain.state[q].keys()
        for slot, value in plain.state[q].items():
            assert torch.equal(flat.state[p][slot], value), f"params[{i}] {slot}"


def test_uneven_steps_keep_flattened_params_off_the_one_segment_path() -> None:
    """A checkpoint whose params took different numbers of steps, loaded into a flattened
    AdamW: one segment would give every tensor one bias correction, so the bucket steps tensor
    by tensor, each with its own step, as torch.optim.AdamW does."""
    gen = torch.Generator().manual_seed(13)
    twins = [torch.randn(s, generator=gen, dtype=torch.float64) for s in _SEGMENT_SHAPES]
    twins = [q.requires_grad_() for q in twins]
    ref = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1)
    for step in range(3):  # the first params skip steps: their step counts fall behind
        for i, q in enumerate(twins):
            q.grad = torch.randn(q.shape, generator=gen, dtype=q.dtype) if i >= step else None
        ref.step()
    params = [q.detach().clone().requires_grad_() for q in twins]
    opt = onepass.AdamW(params, lr=1e-2, weight_decay=0.1, flatten=True)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    for step in range(7):
        for p, q in zip(params, twins, strict=True):
            g = torch.randn(q.shape, generator=gen, dtype=q.dtype)
            q.grad = g.clone()
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)
        if step > 0:
            bucket = opt._engine.plans[0].buckets[0]
            assert not bucket.uniform_steps
            assert bucket.flat_param is not None and bucket.flat_step() is None
        opt.step()
        ref.step()
    for i, (p, q) in enumerate(zip(params, twins, strict=True)):
        assert_verbose_allclose(p, q, 1e-12, 1e-14, f"params[{i}]")
        for slot, value in ref.state[q].items():
            assert_verbose_allclose(opt.state[p][slot], value, 1e-12, 1e-14, f"{i}.{slot}")


def test_flattened_per_tensor_step_skips_on_found_inf() -> None:
    """GradScaler's found_inf on a flattened NovoGrad: the flat params, every state buffer and
    the steps stay as they were."""
    params, _, opt, _ = _flat_and_plain(
        lambda ps, **kw: onepass.NovoGrad(ps, lr=1e-2, **kw), torch.float32
    )
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    bucket = opt._engine.plans[0].buckets[0]
    assert bucket.flat_param is not None
    before = copy.deepcopy((bucket.flat_param, bucket.buffers, bucket.step))
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    opt.step()
    after = (bucket.flat_param, bucket.buffers, bucket.step)
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    for name, buf in after[1].items():
        assert torch.equal(buf, before[1][name]), name


def test_param_with_overlapping_elements_refused() -> None:
    """A leaf param whose elements share memory (stride 0, from expand()): torch.optim and the
    per-tensor path refuse to update it in place; flatten=True had copied its elements apart
    into the flat buffer, decoupling it from its base."""
    base = torch.randn(1, 5)
    p = base.expand(6, 5).requires_grad_()
    p.grad = torch.randn(6, 5)
    optimizer = onepass.SGD([p], lr=0.1, flatten=True)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\] has elements"):
        optimizer.step()
    assert p.stride() == (0, 1) and p.data_ptr() == base.data_ptr()
