"""Bad input (issue item 5): torch.optim's ValueErrors, word for word, for out-of-range
hyperparameters; clear errors naming the parameter for what torch.optim does not check; and every
refused call changes nothing (params, state and steps bitwise, in every group and bucket)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._pytree import tree_map

import onepass
from onepass._engine import packed_shapes

from helpers import (
    BACKEND_NAMES,
    TRITON_INTERPRETED,
    assert_unchanged,
    make_grads,
    needs_native,
    set_grads,
    snapshot,
)

# ------------------------------------------------------------------------------------------------
# Hyperparameters: the same ValueError as torch.optim
# ------------------------------------------------------------------------------------------------

BAD_ADAM = [
    {"lr": -1e-3},
    {"lr": float("nan")},
    {"lr": torch.tensor([1e-3, 1e-3])},
    {"lr": torch.tensor(-1e-3)},
    {"eps": -1e-8},
    {"betas": (-0.1, 0.999)},
    {"betas": (1.0, 0.999)},
    {"betas": (0.9, 1.0)},
    {"betas": (0.9, -0.5)},
    {"betas": (torch.tensor(1.5), torch.tensor(0.999))},
    {"weight_decay": -0.1},
]
BAD_SGD = [
    {"lr": -0.1},
    {"lr": torch.tensor([0.1, 0.1])},
    {"momentum": -0.5},
    {"weight_decay": -1.0},
    {"nesterov": True},
    {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
    {"nesterov": True, "momentum": -0.5},  # the range check comes first
]
Table = tuple[tuple[type[onepass.FusedOptimizer], type[torch.optim.Optimizer], list[Any]], ...]
_TABLE: Table = (
    (onepass.Adam, torch.optim.Adam, BAD_ADAM),
    (onepass.AdamW, torch.optim.AdamW, BAD_ADAM),
    (onepass.SGD, torch.optim.SGD, BAD_SGD),
)
HYPER_CASES = [
    pytest.param(ours, theirs, kwargs, id=f"{ours.__name__}-{'-'.join(kwargs)}-{i}")
    for ours, theirs, cases in _TABLE
    for i, kwargs in enumerate(cases)
]


def _torch_message(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> str:
    with pytest.raises(ValueError) as error:
        cls([torch.zeros(3, requires_grad=True)], **kwargs)
    return str(error.value)


@pytest.mark.parametrize(("ours", "theirs", "kwargs"), HYPER_CASES)
def test_hyperparameter_errors_match_torch(
    ours: type[onepass.FusedOptimizer],
    theirs: type[torch.optim.Optimizer],
    kwargs: dict[str, Any],
) -> None:
    message = _torch_message(theirs, kwargs)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ours([torch.zeros(3, requires_grad=True)], **kwargs)


@pytest.mark.parametrize(
    "params",
    [
        pytest.param(lambda p: [], id="no-params"),
        pytest.param(lambda p: [{"params": [p], "lr": -1.0}], id="bad-group"),
        pytest.param(lambda p: [{"params": [p]}, {"params": [p]}], id="param-in-two-groups"),
    ],
)
def test_nesterov_is_checked_before_the_groups_as_in_torch(params: Callable[..., Any]) -> None:
    """torch.optim.SGD checks nesterov's needs before it builds any group: its error, not the
    groups', is the one raised."""
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError) as error:
        torch.optim.SGD(params(p), momentum=0.0, nesterov=True)
    message = str(error.value)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        onepass.SGD(params(p), momentum=0.0, nesterov=True)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        pytest.param(onepass.AdamW, {"lr": -1e-3}, id="AdamW-lr"),
        pytest.param(onepass.Adam, {"betas": (0.9, 1.5)}, id="Adam-betas"),
        pytest.param(onepass.SGD, {"momentum": -1.0}, id="SGD-momentum"),
    ],
)
def test_add_param_group_refuses_bad_hyperparameters(
    cls: type[onepass.FusedOptimizer], kwargs: dict[str, Any]
) -> None:
    """Out-of-range values: stricter than torch.optim, which only checks the constructor's
    defaults. (Not nesterov's needs: a group may turn momentum off under nesterov=True, as in
    torch; tests/test_fuzz_torch_optim.py.)"""
    extra: dict[str, Any] = {"momentum": 0.9} if cls is onepass.SGD else {}
    optimizer, _ = _stepped(cls, **extra)
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=r"^Invalid"):
        optimizer.add_param_group({"params": [torch.randn(3, requires_grad=True)], **kwargs})
    assert len(optimizer.param_groups) == 2
    assert_unchanged(optimizer, before)


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        pytest.param(onepass.AdamW, {"lr": "1e-3"}, "lr", id="AdamW-lr"),
        pytest.param(onepass.Adam, {"betas": ("0.9", 0.999)}, "betas", id="Adam-betas"),
        pytest.param(onepass.SGD, {"momentum": None}, "momentum", id="SGD-momentum"),
        pytest.param(onepass.Lion, {"weight_decay": "0.1"}, "weight_decay", id="Lion-wd"),
        pytest.param(onepass.Muon, {"adamw_eps": "1e-8"}, "adamw_eps", id="Muon-adamw_eps"),
    ],
)
def test_a_hyperparameter_that_is_not_a_number_is_refused(
    cls: type[onepass.FusedOptimizer], kwargs: dict[str, Any], name: str
) -> None:
    """A string hyperparameter (PyYAML reads ``lr: 1e-3`` as one) is a TypeError naming it, in
    the constructor and in a later group (torch.optim raises TypeError comparing it), never a
    failure halfway through a step."""
    p = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(TypeError, match=rf"^onepass: {name} must be"):
        cls([p], **kwargs)
    optimizer, _ = _stepped(cls)
    before = snapshot(optimizer)
    groups = len(optimizer.param_groups)
    with pytest.raises(TypeError, match=rf"^onepass: {name} must be"):
        optimizer.add_param_group({"params": [torch.randn(3, requires_grad=True)], **kwargs})
    assert len(optimizer.param_groups) == groups
    assert_unchanged(optimizer, before)


def test_a_param_listed_twice_in_a_group_is_refused() -> None:
    """torch.optim steps a param listed twice in one group twice a step over one state, and
    warns that this will be an error; onepass's buckets would give it two states: refused."""
    p = torch.randn(3, requires_grad=True)
    twice = r"lists one param twice \(at 0 and 2\)"
    with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match=twice):
        onepass.AdamW([p, torch.randn(2, requires_grad=True), p])
    optimizer, _ = _stepped()
    before = snapshot(optimizer)
    with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match="twice"):
        optimizer.add_param_group({"params": [p, p]})
    assert len(optimizer.param_groups) == 2
    assert_unchanged(optimizer, before)


@pytest.mark.parametrize("cls", [onepass.AdamW, onepass.Adam, onepass.SGD, onepass.SGDW])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_backends_refused_here(cls: type[onepass.FusedOptimizer], backend: str) -> None:
    """Where a GPU backend cannot step these CPU params (not built, not implemented, no Triton,
    no interpreter; CUDA kernels built on a machine without a GPU: CPU tensors), it says so when
    the optimizer is built or at the latest at the first step."""
    if backend == "triton" and TRITON_INTERPRETED:
        pytest.skip("Triton's interpreter runs CPU tensors here")
    if backend == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    param = torch.zeros(3, requires_grad=True)
    match = f"backend='{backend}'.*(not implemented|not available|interpreter|tensors on cpu)"
    with pytest.raises(RuntimeError, match=match):
        optimizer = cls([param], backend=backend)
        param.grad = torch.ones(3)
        optimizer.step()
    assert torch.count_nonzero(param) == 0


def test_unknown_backend_and_decay() -> None:
    with pytest.raises(ValueError, match="Invalid backend: 'tpu'"):
        onepass.AdamW([torch.zeros(3, requires_grad=True)], backend="tpu")
    with pytest.raises(ValueError, match="Invalid decay mode: 'l1'"):
        onepass.AdamW([torch.zeros(3, requires_grad=True)], decay="l1")


def test_differentiable_is_refused() -> None:
    with pytest.raises(ValueError, match="differentiable=True"):
        onepass.AdamW([torch.zeros(3, requires_grad=True)], differentiable=True)


def test_capturable_needs_cuda_params() -> None:
    """capturable=True is a CUDA-graph property: CPU params are refused at the first step, and
    the refused step changes nothing."""
    param = torch.randn(3, requires_grad=True)
    param.grad = torch.randn(3)
    before = param.detach().clone()
    optimizer = onepass.AdamW([param], capturable=True)
    with pytest.raises(RuntimeError, match=r"capturable=True needs CUDA params.*params'\]\[0\]"):
        optimizer.step()
    assert torch.equal(param, before) and not optimizer.state


# ------------------------------------------------------------------------------------------------
# Refused steps change nothing
# ------------------------------------------------------------------------------------------------


def _stepped(
    cls: type[onepass.FusedOptimizer] = onepass.AdamW,
    backend: str = "auto",
    **kwargs: Any,
) -> tuple[onepass.FusedOptimizer, list[torch.Tensor]]:
    """An optimizer with state: two groups, float32 and bfloat16 params (several buckets), two
    steps taken."""
    params = [
        torch.randn(17).requires_grad_(),
        torch.randn(4, 5).to(torch.bfloat16).requires_grad_(),
        torch.randn(9).requires_grad_(),
        torch.randn(33).to(torch.bfloat16).requires_grad_(),
    ]
    optimizer = cls(
        [{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], backend=backend, **kwargs
    )
    for s in range(1, 3):
        set_grads(params, make_grads(params, s, none_pattern=False))
        optimizer.step()
    return optimizer, params


def _refused(
    optimizer: torch.optim.Optimizer,
    action: Callable[[], Any],
    error: type[Exception] | tuple[type[Exception], ...],
    match: str,
) -> None:
    before = snapshot(optimizer)
    with pytest.raises(error, match=match):
        action()
    assert_unchanged(optimizer, before)


def _name(group: int, index: int) -> str:
    return re.escape(f"param_groups[{group}]['params'][{index}]")


def _add_then_step_refused(
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    bad: torch.Tensor,
    grad: Callable[[torch.Tensor], None],
    error: type[Exception] | tuple[type[Exception], ...],
    match: str,
) -> None:
    """Adds ``bad`` as group 2 (refusing it there is fine too), gives every param a grad and
    steps: refused, changing nothing."""
    before = snapshot(optimizer)
    try:
        optimizer.add_param_group({"params": [bad]})
    except error as refused:
        assert re.search(match, str(refused)), str(refused)
        assert_unchanged(optimizer, before)
        return
    set_grads(params, make_grads(params, 3, none_pattern=False))
    grad(bad)
    _refused(optimizer, optimizer.step, error, match)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_sparse_grad_refused(backend: str) -> None:
    """In a group of its own (its own bucket, beside others)."""
    optimizer, params = _stepped(backend=backend)
    embedding = torch.nn.Embedding(10, 3, sparse=True)

    def sparse_grad(p: torch.Tensor) -> None:
        embedding(torch.tensor([1, 4])).sum().backward()

    _add_then_step_refused(
        optimizer, params, embedding.weight, sparse_grad, RuntimeError, f"{_name(2, 0)}.*sparse"
    )
    # and the step after the refusal (sparse grad gone) works on everything, as if never refused
    embedding.weight.grad = None
    optimizer.step()
    assert float(optimizer.state[params[0]]["step"]) == 3.0


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_sparse_grad_refused_in_a_single_bucket(backend: str) -> None:
    """The same, when the whole step is one bucket (one native launch checks its own args)."""
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    params = [torch.randn(17).requires_grad_(), embedding.weight]
    optimizer = onepass.AdamW(params, backend=backend)
    for s in range(1, 3):
        set_grads(params, make_grads(params, s, none_pattern=False))
        optimizer.step()

    def action() -> None:
        set_grads(params, make_grads(params, 3, none_pattern=False))
        embedding.weight.grad = None
        embedding(torch.tensor([1, 4])).sum().backward()
        optimizer.step()

    _refused(optimizer, action, RuntimeError, f"{_name(0, 1)}.*sparse")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int32])
def test_unsupported_dtype_refused(backend: str, dtype: torch.dtype) -> None:
    """float8 can require grad; an int param cannot, so it is given a grad directly."""
    optimizer, params = _stepped(backend=backend)
    bad = torch.zeros(5, dtype=dtype)
    if dtype.is_floating_point:
        bad.requires_grad_()

    def give_grad(p: torch.Tensor) -> None:
        p.grad = torch.zeros(5, dtype=dtype)

    _add_then_step_refused(
        optimizer, params, bad, give_grad, (TypeError, ValueError), f"{_name(2, 0)}.*{dtype}"
    )


def test_complex_param_refused() -> None:
    real = torch.randn(3, requires_grad=True)
    complex_param = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match=f"{_name(0, 1)} is complex"):
        onepass.AdamW([real, complex_param])
    optimizer, _ = _stepped()
    _refused(
        optimizer,
        lambda: optimizer.add_param_group({"params": [complex_param]}),
        ValueError,
        f"{_name(2, 0)} is complex",
    )
    assert len(optimizer.param_groups) == 2


#: params[4:] of the "large-bucket" layout, 1,500 small tensors placed around params[:4]: a
#: native step over this many tensors scans them on all threads (glue::kParallelScanTensors).
FILLERS = 1500


def _stepped_layout(layout: str, backend: str) -> tuple[onepass.FusedOptimizer, list[torch.Tensor]]:
    if layout == "many-buckets":
        return _stepped(backend=backend)
    params = [torch.randn(17).requires_grad_(), torch.randn(4, 5).requires_grad_()]
    params += [torch.randn(9).requires_grad_(), torch.randn(33).requires_grad_()]
    group = params
    if layout == "large-bucket":
        fillers = [torch.randn(i % 7 + 1).requires_grad_() for i in range(FILLERS)]
        group = fillers[: FILLERS - 100] + params + fillers[FILLERS - 100 :]
        params = params + fillers
    optimizer = onepass.AdamW(group, backend=backend)
    for s in range(1, 3):
        set_grads(params, make_grads(params, s, none_pattern=False))
        optimizer.step()
    return optimizer, params


#: (group, index) of params[2] and params[3] in each layout
VICTIMS = {
    "many-buckets": ((1, 0), (1, 1)),
    "one-bucket": ((0, 2), (0, 3)),
    "large-bucket": ((0, FILLERS - 98), (0, FILLERS - 97)),
}


@pytest.mark.parametrize("layout", list(VICTIMS))
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_grad_dtype_mismatch_refused(backend: str, layout: str) -> None:
    optimizer, params = _stepped_layout(layout, backend)
    params[2].grad_dtype = None  # torch's own switch for a grad of another dtype

    def action() -> None:
        set_grads(params, make_grads(params, 3, none_pattern=False))
        params[2].grad = torch.randn(9, dtype=torch.float64)
        optimizer.step()

    name = _name(*VICTIMS[layout][0])
    _refused(optimizer, action, RuntimeError, f"{name}.*float32.*float64")


@pytest.mark.parametrize("layout", list(VICTIMS))
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_grad_shape_mismatch_refused(backend: str, layout: str) -> None:
    optimizer, params = _stepped_layout(layout, backend)

    def action() -> None:
        set_grads(params, make_grads(params, 3, none_pattern=False))
        grad = params[3].grad
        assert grad is not None
        grad.data = torch.randn(32).to(grad.dtype)  # .data skips the grad setter's check
        optimizer.step()

    name = _name(*VICTIMS[layout][1])
    _refused(optimizer, action, RuntimeError, rf"{name}.*shape \(33,\).*\(32,\)")


@pytest.mark.parametrize("layout", ["one-bucket", "large-bucket"])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_param_cast_alone_refused(backend: str, layout: str) -> None:
    """One param cast after the first step (not the bucket's first: that rebuilds the bucket)
    cannot be stepped in its old bucket's table and state: refused by name, natively checked
    lists of 64+ params included."""
    optimizer, params = _stepped_layout(layout, backend)
    set_grads(params, make_grads(params, 3, none_pattern=False))
    params[2].data = params[2].data.double()
    params[2].grad = torch.randn(9, dtype=torch.float64)
    name = _name(*VICTIMS[layout][0])
    _refused(optimizer, optimizer.step, RuntimeError, f"{name} is now torch.float64")


class _WrapperGrad(torch.Tensor):
    """A __torch_dispatch__ wrapper without storage whose sizes come from Python: reading them
    takes the GIL, so the parallel table scan must leave it to the GIL holder."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> _WrapperGrad:
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls,
            inner.shape,
            dtype=inner.dtype,
            device=inner.device,
            dispatch_sizes_strides_policy="sizes",
        )

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        def unwrap(t: Any) -> Any:
            return t.inner if isinstance(t, _WrapperGrad) else t

        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))


@pytest.mark.parametrize("layout", list(VICTIMS))
def test_grad_without_storage_refused(layout: str) -> None:
    """The native step refuses it by name (it has no memory to update; it once crashed the
    kernel), and over 1,024+ tensors the parallel scan hands it to the serial one (reading its
    sizes on a worker thread once deadlocked on the GIL). With several buckets it is refused
    before the first one is stepped (it once was only when its own bucket's turn came)."""
    if "cpu" not in BACKEND_NAMES:
        pytest.skip("no native CPU build")
    optimizer, params = _stepped_layout(layout, "cpu")

    def action() -> None:
        set_grads(params, make_grads(params, 3, none_pattern=False))
        params[3].grad = _WrapperGrad(torch.randn(33).to(params[3].dtype))
        optimizer.step()

    name = _name(*VICTIMS[layout][1])
    _refused(optimizer, action, RuntimeError, f"{name}'s grad is a _WrapperGrad without storage")


@needs_native
def test_native_grad_check_accepts_only_what_python_would() -> None:
    """_ops.grads_match, the engine's native grad check: every reason to refuse
    falls back to the Python check (which names the param); None grads are skipped."""
    from onepass import _ops

    params = [torch.randn(3, 4), torch.randn(5), torch.randn(0)]
    shapes = packed_shapes([p.shape for p in params])

    def grads(**replace: Any) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = [torch.randn_like(p) for p in params]
        out[1] = None
        for index, grad in replace.items():
            out[int(index[1:])] = grad
        return out

    assert _ops.grads_match(params, grads(), shapes)
    assert _ops.grads_match(params, grads(g1=torch.randn(5)), shapes)
    refused = {
        "dtype": grads(g2=torch.randn(0, dtype=torch.float64)),
        "shape": grads(g0=torch.randn(4, 3)),
        "sparse": grads(g0=torch.randn(3, 4).to_sparse()),
        "device": grads(g0=torch.randn(3, 4, device="meta")),
        "not a tensor": grads(g1=5),
    }
    for why, case in refused.items():
        assert not _ops.grads_match(params, case, shapes), why
    reshaped = packed_shapes([torch.Size([4, 3]), torch.Size([5]), torch.Size([0])])
    assert not _ops.grads_match(params, grads(), reshaped), "param reshaped"
    freed = torch.randn(3, 4)
    freed.untyped_storage().resize_(0)
    assert not _ops.grads_match(params, grads(g0=freed), shapes), "freed storage"
    own = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    own[0].grad = torch.randn(3, 4)
    own_shapes = packed_shapes([p.shape for p in own])
    assert _ops.grads_match(own, None, own_shapes), "each param's own grad"
    own[1].grad_dtype = None  # torch's own switch for a grad of another dtype
    own[1].grad = torch.randn(5, dtype=torch.float64)
    assert not _ops.grads_match(own, None, own_shapes), "own grads of two dtypes"
    cast = [params[0], params[1].double(), params[2]]
    assert not _ops.grads_match(cast, grads(g1=torch.randn(5)), shapes), "param dtype"
    assert _ops.grads_match(cast, grads(), shapes), "a param without a grad is not stepped"
    assert not _ops.grads_match(params, grads()[:2], shapes), "lengths differ"


@needs_native
def test_native_launch_key_reads_addresses() -> None:
    """_ops.launch_key, the Triton launcher's address key: each param's address and its grad's
    (-1 for None), or False where a stepped param or grad is not contiguous (staged in Python)."""
    from onepass import _ops

    params = [torch.randn(3, 4), torch.randn(4, 3).t(), torch.randn(2)]
    grads: list[torch.Tensor | None] = [torch.randn(3, 4), None, torch.randn(2)]
    key = torch.empty(6, dtype=torch.int64)
    assert _ops.launch_key(params, grads, key)  # params[1] has no grad: not staged
    want = [params[0].data_ptr(), grads[0].data_ptr(), params[1].data_ptr(), -1]
    assert key.tolist() == [*want, params[2].data_ptr(), grads[2].data_ptr()]
    assert not _ops.launch_key(params, [*grads[:1], torch.randn(3, 4), grads[2]], key)
    assert not _ops.launch_key(params, [torch.randn(4, 3).t(), None, grads[2]], key)


@needs_native
@pytest.mark.parametrize("layout", list(VICTIMS))
def test_freed_grad_storage_refused(layout: str) -> None:
    """A grad whose storage was freed (resized to 0 bytes, as FSDP frees a param's) is refused
    by name before any bucket is stepped; a view at an offset into it (a non-null data pointer)
    once made the kernel read freed memory."""
    optimizer, params = _stepped_layout(layout, "cpu")

    def action() -> None:
        set_grads(params, make_grads(params, 3, none_pattern=False))
        grad = torch.randn(40).to(params[3].dtype)[7:]
        grad.untyped_storage().resize_(0)
        params[3].grad = grad
        optimizer.step()

    name = _name(*VICTIMS[layout][1])
    _refused(optimizer, action, RuntimeError, f"{name}'s grad is a Tensor without storage")


def test_negated_view_grad_steps_as_its_value() -> None:
    """A grad with torch's lazy negation (torch._neg_view: its memory holds -g) is stepped as g,
    on every backend (the kernels read memory: they get a resolved copy)."""
    results = {}
    for backend in BACKEND_NAMES:
        p = torch.ones(9, requires_grad=True)
        p.grad = torch._neg_view(-torch.arange(9.0))
        onepass.SGD([p], lr=0.1, backend=backend).step()
        results[backend] = p.detach()
    for backend, value in results.items():
        torch.testing.assert_close(value, 1 - 0.1 * torch.arange(9.0), msg=backend)


def _muon_stepped(matrices: int) -> tuple[onepass.Muon, list[torch.Tensor]]:
    torch.manual_seed(0)
    mats = [torch.randn(4, 6, requires_grad=True) for _ in range(matrices)]
    bias = torch.randn(5, requires_grad=True)
    optimizer = onepass.Muon(
        [{"params": [bias], "use_muon": False}, {"params": mats}], ns_dtype=torch.float32
    )
    for _ in range(2):
        for p in [bias, *mats]:
            p.grad = torch.randn_like(p)
        optimizer.step()
    return optimizer, [bias, *mats]


@pytest.mark.parametrize("matrices", [3, 70])
def test_muon_refuses_a_reshaped_matrix_before_stepping(matrices: int) -> None:
    """Muon keeps a matrix's shape in its workspace: one reshaped since its first step (the same
    numel) is refused by name before the AdamW group or the momentum pass is stepped, natively
    checked lists of 64+ params included."""
    optimizer, params = _muon_stepped(matrices)

    def action() -> None:
        for p in params:
            p.grad = torch.randn_like(p)
        params[3].data = params[3].data.reshape(6, 4)
        params[3].grad = torch.randn(6, 4)
        optimizer.step()

    before = snapshot(optimizer)
    with pytest.raises(RuntimeError, match=rf"{_name(1, 2)} is now .* shape \(6, 4\)"):
        action()
    params[3].data = params[3].data.reshape(4, 6)
    assert_unchanged(optimizer, before)


@needs_native
def test_muon_refuses_a_freed_matrix_before_its_momentum_pass() -> None:
    """One Muon bucket: the momentum pass writes before the update pass reads the params, so
    the engine checks them first (a freed param storage once changed momentum_buffer)."""
    optimizer, params = _muon_stepped(3)
    for p in params:
        p.grad = torch.randn_like(p)
    params[0].grad = None  # the AdamW group takes no step: Muon's matrices alone, one bucket
    buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in params[1:]]
    params[3].untyped_storage().resize_(0)  # (the snapshot helpers would read it)
    with pytest.raises(RuntimeError, match=f"{_name(1, 2)} is a Tensor without storage"):
        optimizer.step()
    for p, before in zip(params[1:], buffers, strict=True):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], before)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_bad_lr_of_a_later_group_refused_before_stepping(backend: str) -> None:
    """An lr the native ops cannot read (an integer tensor) in the second group: refused before
    the first group's launch, which once had stepped."""
    optimizer, params = _stepped(backend=backend)
    set_grads(params, make_grads(params, 3, none_pattern=False))
    optimizer.param_groups[1]["lr"] = torch.tensor(0)
    if backend == "reference":  # torch ops read any lr: nothing to refuse
        optimizer.step()
        return
    _refused(optimizer, optimizer.step, RuntimeError, "lr of the param group of .* torch.int64")


def test_refused_state_dtype_of_a_later_group_changes_no_other_group() -> None:
    """Every group's buckets are built before any is stored: a state_dtype one group cannot
    keep leaves the others' state in its old dtype (it once had converted them, losing bits)."""
    a = torch.randn(17, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    optimizer = onepass.AdamW([{"params": [a]}, {"params": [b]}])
    for _ in range(2):
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        optimizer.step()
    for group in optimizer.param_groups:
        group["state_dtype"] = torch.bfloat16  # fine for float32, not for float64
    _refused(optimizer, optimizer.step, RuntimeError, "cannot keep torch.bfloat16 state")
    assert optimizer.state[a]["exp_avg"].dtype == torch.float32


def test_negative_view_lr_is_read_as_its_value() -> None:
    """A one-element lr is read from memory unless its value is not what the memory holds (a
    negative view here; also conjugate views, zero tensors, subclasses)."""
    lr = torch._neg_view(torch.tensor(-0.1, dtype=torch.float64))
    assert float(lr) == pytest.approx(0.1)
    results = []
    for value in (lr, 0.1):
        p = torch.ones(5, requires_grad=True)
        p.grad = torch.ones(5)
        onepass.SGD([p], lr=value).step()
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1]) and float(results[0][0]) == pytest.approx(0.9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_grad_device_mismatch_refused() -> None:
    optimizer, params = _stepped(backend="reference")

    def action() -> None:
        set_grads(params, make_grads(params, 3, none_pattern=False))
        grad = params[2].grad
        assert grad is not None
        grad.data = grad.data.cuda()
        optimizer.step()

    _refused(optimizer, action, RuntimeError, f"{_name(1, 0)}.*cuda")


# ------------------------------------------------------------------------------------------------
# Refused state_dicts change nothing
# ------------------------------------------------------------------------------------------------


def _corrupt(kind: str, sd: dict[str, Any]) -> tuple[dict[str, Any], str]:
    sd = copy.deepcopy(sd)
    if kind == "slot-shape":
        sd["state"][3]["exp_avg"] = torch.zeros(32)
        return sd, rf"'exp_avg' of {_name(1, 1)} has shape \(32,\)"
    if kind == "slot-shape-same-numel":
        sd["state"][1]["exp_avg_sq"] = torch.zeros(5, 4)
        return sd, rf"'exp_avg_sq' of {_name(0, 1)} has shape \(5, 4\)"
    if kind == "unknown-slot":
        sd["state"][0]["momentum_buffer"] = torch.zeros(17)
        return sd, f"'momentum_buffer' of {_name(0, 0)} is another algorithm's, not a slot of adam"
    if kind == "missing-step":
        del sd["state"][2]["step"]
        return sd, f"state of {_name(1, 0)} has no 'step'"
    if kind == "missing-slot":
        del sd["state"][2]["exp_avg_sq"]
        return sd, f"state of {_name(1, 0)} has no 'exp_avg_sq', a slot its param group uses"
    if kind == "step-shape":
        sd["state"][1]["step"] = torch.tensor([2.0, 2.0])
        return sd, rf"'step' of {_name(0, 1)} is \(2,\), expected a number"
    if kind == "groups":
        sd["param_groups"] = sd["param_groups"][:1]
        return sd, "1 parameter groups, the optimizer has 2"
    if kind == "params":
        sd["param_groups"][1]["params"] = sd["param_groups"][1]["params"][:1]
        return sd, "group 1 has 1 params, the optimizer's has 2"
    if kind == "unknown-param":
        sd["state"][99] = sd["state"][0]
        return sd, "unknown param id 99"
    if kind == "sparse-slot":
        sd["state"][2]["exp_avg"] = sd["state"][2]["exp_avg"].to_sparse()
        return sd, f"slot 'exp_avg' of {_name(1, 0)} is a torch.sparse_coo tensor"
    if kind in ("negative-step", "nan-step"):
        sd["state"][1]["step"] = torch.tensor(-1.0 if kind == "negative-step" else float("nan"))
        return sd, f"'step' of {_name(0, 1)} is (-1.0|nan), expected a finite count >= 0"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "slot-shape",
        "slot-shape-same-numel",
        "unknown-slot",
        "missing-step",
        "missing-slot",
        "step-shape",
        "groups",
        "params",
        "unknown-param",
        "sparse-slot",
        "negative-step",
        "nan-step",
    ],
)
def test_bad_state_dict_refused(kind: str) -> None:
    optimizer, params = _stepped()
    good = optimizer.state_dict()
    bad, match = _corrupt(kind, good)
    # torch.optim.AdamW agrees these are broken where it checks at all; onepass always does
    _refused(optimizer, lambda: optimizer.load_state_dict(bad), ValueError, match)
    # still steps from its own state
    set_grads(params, make_grads(params, 3, none_pattern=False))
    optimizer.step()
    assert float(optimizer.state[params[0]]["step"]) == 3.0


@pytest.mark.parametrize(
    ("cls", "slot"),
    [(onepass.NovoGrad, "exp_avg"), (onepass.FAdam, "fim"), (onepass.Adam, "exp_avg")],
)
def test_state_dict_missing_a_slot_refused(cls: type[onepass.FusedOptimizer], slot: str) -> None:
    """A stepped param's entry without a slot its group uses: torch.optim's classes (and the
    peers') fail at the step; onepass refuses the load rather than start it from zeros under
    the saved step count."""
    optimizer, _ = _stepped(cls)
    bad = copy.deepcopy(optimizer.state_dict())
    del bad["state"][3][slot]
    _refused(optimizer, lambda: optimizer.load_state_dict(bad), ValueError, f"{_name(1, 1)} has no")


@pytest.mark.parametrize("cls", [onepass.SGD, onepass.Muon])
def test_state_dict_missing_momentum_buffer_starts_fresh(cls: type[onepass.FusedOptimizer]) -> None:
    """SGD's and Muon's momentum buffer may be missing, as torch.optim.SGD (from the grad) and
    torch.optim.Muon (from zero) start one: the same result as torch's class."""
    torch.manual_seed(0)
    params = [torch.randn(shape, requires_grad=True) for shape in [(6, 5), (4, 7)]]
    twins = [p.detach().clone().requires_grad_() for p in params]
    if cls is onepass.SGD:
        optimizer = onepass.SGD(params, lr=0.01, momentum=0.9)
        peer: torch.optim.Optimizer = torch.optim.SGD(twins, lr=0.01, momentum=0.9)
    else:  # the settings under which onepass's reference gives torch.optim.Muon's bits
        optimizer = onepass.Muon(
            params, lr=0.01, ns_dtype=torch.bfloat16, ns_method="standard", backend="reference"
        )
        peer = torch.optim.Muon(twins, lr=0.01)
    for step in range(1, 5):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twins, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        if step == 3:  # reload both without the first param's buffer
            for opt in (optimizer, peer):
                sd = copy.deepcopy(opt.state_dict())
                del sd["state"][0]["momentum_buffer"]
                opt.load_state_dict(sd)
        optimizer.step()
        peer.step()
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Values set after construction that no launch could take whole: refused before any write
# ------------------------------------------------------------------------------------------------


def _stepped_muon(backend: str) -> tuple[onepass.FusedOptimizer, list[torch.Tensor]]:
    """A Muon optimizer over three matrices, two steps taken."""
    params = [torch.randn(shape, requires_grad=True) for shape in [(6, 5), (4, 7), (6, 5)]]
    optimizer = onepass.Muon(params, lr=0.02, ns_dtype=torch.float32, backend=backend)
    for s in range(1, 3):
        set_grads(params, make_grads(params, s, none_pattern=False))
        optimizer.step()
    return optimizer, params


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize(
    ("key", "value", "error", "match"),
    [
        ("lr", torch.tensor(0), ValueError, "floating-point tensor, not torch.int64"),
        ("lr", torch.tensor([0.02, 0.02]), ValueError, "Tensor lr must be 1-element"),
        ("lr", "0.02", TypeError, "lr must be a number"),
        ("lr", None, TypeError, "lr must be a number"),
        ("ns_dtype", torch.int32, ValueError, "ns_dtype must be"),
        ("ns_steps", -1, ValueError, "ns_steps must be >= 0"),
        ("ns_coefficients", (3.4, -4.7), ValueError, "exactly 3 values"),
    ],
)
def test_muon_group_value_set_later_refused_before_the_momentum_pass(
    backend: str, key: str, value: Any, error: type[Exception], match: str
) -> None:
    """Muon's native launch writes the momentum buffers before its later passes read the lr and
    the Newton-Schulz settings: each is checked before anything is written."""
    optimizer, params = _stepped_muon(backend)
    optimizer.param_groups[0][key] = value
    set_grads(params, make_grads(params, 3, none_pattern=False))
    _refused(optimizer, optimizer.step, error, rf"param_groups\[0\]: .*{match}")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize(
    ("key", "value", "match"),
    [("betas", (0.9, 1.0), "Invalid beta parameter at index 1"), ("clip", 0.0, "Invalid clip")],
)
def test_fadam_group_value_set_later_refused(
    backend: str, key: str, value: Any, match: str
) -> None:
    """beta2 = 1 and clip = 0 divide by zero in FAdam's rule: refused at the step as at
    construction (the reference had failed part-way, the kernels written non-finite params)."""
    optimizer, params = _stepped(onepass.FAdam, backend=backend)
    optimizer.param_groups[1][key] = value
    set_grads(params, make_grads(params, 3, none_pattern=False))
    _refused(optimizer, optimizer.step, ValueError, rf"param_groups\[1\]: {match}")


@pytest.mark.parametrize("cls", [onepass.AdamW, onepass.SGD, onepass.Lion])
def test_independent_decay_from_a_zero_initial_lr(cls: type[onepass.FusedOptimizer]) -> None:
    """decay="independent" scales the decay by lr / initial_lr, and a group built at lr = 0 (a
    warm-up written by hand) has initial_lr 0: with weight decay that is refused at the step,
    naming the group, before anything is written (it raised ZeroDivisionError part-way); with
    weight_decay = 0 there is no decay to scale, and the group steps."""
    params = [torch.randn(7, requires_grad=True), torch.randn(5, requires_grad=True)]
    optimizer = cls(
        [{"params": params[:1], "weight_decay": 0.0}, {"params": params[1:]}],
        lr=0.0,
        weight_decay=0.1,
        decay="independent",
    )
    for group in optimizer.param_groups:
        group["lr"] = 1e-2  # the warm-up raises the lr
    set_grads(params, make_grads(params, 1, none_pattern=False))
    _refused(optimizer, optimizer.step, ValueError, r"param_groups\[1\]: .*initial_lr is 0")
    optimizer.param_groups[1]["initial_lr"] = 1e-2
    before = params[0].detach().clone()
    optimizer.step()
    assert not torch.equal(params[0], before) and torch.isfinite(params[0]).all()


@needs_native
@pytest.mark.parametrize("cls", [onepass.AdamW, onepass.SGD, onepass.NovoGrad])
@pytest.mark.parametrize(
    ("index", "new_shape"), [(0, (4,)), (1, (1001,)), (1, (3,))], ids=["0-to-4", "grow", "shrink"]
)
@pytest.mark.parametrize("count", [3, 1200], ids=["serial-scan", "parallel-scan"])
def test_param_resized_through_data_refused(
    cls: type[onepass.FusedOptimizer], index: int, new_shape: tuple[int, ...], count: int
) -> None:
    """A param with state whose .data is replaced by a tensor of another size: its state was
    laid out for the old size, so the native op refuses it by name, as torch.optim refuses the
    size mismatch, and changes nothing. It had stepped stale state, and a zero-size param given
    4 elements wrote into the next param's state (the native table checked only that the
    buffers held offset + numel)."""
    sizes = [0, 1000] + [7] * (count - 2)
    params = [torch.randn(n, requires_grad=True) for n in sizes]
    kwargs = {"momentum": 0.9} if cls is onepass.SGD else {}
    optimizer = cls(params, lr=1e-2, backend="cpu", **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    params[index].data = torch.randn(new_shape)
    for p in params:
        p.grad = torch.randn_like(p)
    _refused(optimizer, optimizer.step, RuntimeError, _name(0, index))


# ------------------------------------------------------------------------------------------------
# A refusal in a later group or bucket: nothing written in the earlier ones
# ------------------------------------------------------------------------------------------------

LATER_GROUP_VALUES = [
    (onepass.AdamW, "betas", 0.9),
    (onepass.AdamW, "betas", (0.9,)),
    (onepass.AdamW, "eps", None),
    (onepass.AdamW, "lr", None),
    (onepass.AdamW, "weight_decay", "0.01"),
    (onepass.SGD, "momentum", None),
    (onepass.SGD, "dampening", "0"),
    (onepass.Lion, "betas", (0.9, None)),
    (onepass.NovoGrad, "eps", "1e-8"),
    (onepass.FAdam, "p", None),
    (onepass.AdamW, "eps", torch.tensor([1e-8, 1e-8])),
    (onepass.SGD, "weight_decay", torch.tensor([])),
]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize(
    ("cls", "key", "value"),
    LATER_GROUP_VALUES,
    ids=[f"{c.__name__}-{k}-{v!r}" for c, k, v in LATER_GROUP_VALUES],
)
def test_a_value_no_launch_can_take_in_a_later_group_is_refused_first(
    backend: str, cls: type[onepass.FusedOptimizer], key: str, value: Any
) -> None:
    """A value set in param_groups[1] that its launch could not convert (None, a string, a
    tuple of the wrong length) is refused, by name, before group 0 steps (group 0 had stepped
    and its launch then failed); once set right, the step is the step of a twin that never saw
    the bad one."""
    kwargs = {"momentum": 0.9} if cls is onepass.SGD else {}
    torch.manual_seed(0)
    optimizer, params = _stepped(cls, backend=backend, **kwargs)
    torch.manual_seed(0)
    twin, twin_params = _stepped(cls, backend=backend, **kwargs)
    good = optimizer.param_groups[1][key]
    optimizer.param_groups[1][key] = value
    grads = make_grads(params, 3, none_pattern=False)
    set_grads(params, grads)
    match = rf"param_groups\[1\]: (Tensor )?{key} must be"
    _refused(optimizer, optimizer.step, (TypeError, ValueError), match)
    optimizer.param_groups[1][key] = good
    optimizer.step()
    set_grads(twin_params, grads)
    twin.step()
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [onepass.AdamW, onepass.Adam, onepass.SGD, onepass.Lion])
def test_an_unknown_decay_mode_is_refused_wherever_it_comes_from(
    cls: type[onepass.FusedOptimizer],
) -> None:
    """A misspelt decay mode decayed nothing when it came through add_param_group or a group
    written later (only the constructor refused it)."""
    optimizer, params = _stepped(cls)
    extra = {"params": [torch.ones(3, requires_grad=True)], "decay": "decoupledd"}
    _refused(optimizer, lambda: optimizer.add_param_group(extra), ValueError, "Invalid decay")
    assert len(optimizer.param_groups) == 2
    optimizer.param_groups[1]["decay"] = "decoupledd"
    set_grads(params, make_grads(params, 3, none_pattern=False))
    _refused(optimizer, optimizer.step, ValueError, r"param_groups\[1\]: Invalid decay mode")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("betas", [(1.0, 0.999), (0.9, 1.0)])
def test_adam_beta_of_one_set_later_refused(backend: str, betas: tuple[float, float]) -> None:
    """Adam's bias corrections divide by 1 - beta^t: a beta of 1 set after construction is
    refused at the step as at construction (the reference had failed part-way, the kernels
    written infinite params)."""
    optimizer, params = _stepped(onepass.AdamW, backend=backend)
    optimizer.param_groups[1]["betas"] = betas
    set_grads(params, make_grads(params, 3, none_pattern=False))
    _refused(optimizer, optimizer.step, ValueError, r"param_groups\[1\]: Invalid beta parameter")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_refused_step_keeps_the_state_a_load_brought(backend: str) -> None:
    """The step after a load moves the loaded state into the buckets; refused (a sparse grad in
    the second group), it left optimizer.state as the buckets hold it: here a checkpoint's fp32
    moments and master weights, which a run without master weights keeps until it steps, had
    become bf16 and lost the masters. Nothing changes now, and the retried step continues as a
    twin that never saw the refusal."""
    torch.manual_seed(0)
    a = torch.randn(5).bfloat16().requires_grad_()
    b = torch.randn(4).bfloat16().requires_grad_()
    source = onepass.AdamW([{"params": [a]}, {"params": [b]}], master_weights=True)
    for _ in range(2):
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        source.step()
    checkpoint = copy.deepcopy(source.state_dict())
    optimizers = []
    for _ in range(2):
        optimizer = onepass.AdamW([{"params": [a]}, {"params": [b]}], backend=backend)
        optimizer.load_state_dict(copy.deepcopy(checkpoint))
        optimizers.append(optimizer)
    refusing, twin = optimizers
    assert refusing.state[a]["exp_avg"].dtype == torch.float32
    a.grad, b.grad = torch.randn_like(a), torch.randn(4).bfloat16().to_sparse()
    _refused(refusing, refusing.step, RuntimeError, f"{_name(1, 0)} has a sparse gradient")
    assert refusing.state[a]["exp_avg"].dtype == torch.float32
    assert "master_param" in refusing.state_dict()["state"][0]
    b.grad = torch.randn_like(b)
    start = a.detach().clone(), b.detach().clone()
    refusing.step()
    after = a.detach().clone(), b.detach().clone()
    with torch.no_grad():
        a.copy_(start[0])
        b.copy_(start[1])
    twin.step()
    assert torch.equal(a, after[0]) and torch.equal(b, after[1])
    assert torch.equal(refusing.state[a]["exp_avg"], twin.state[a]["exp_avg"])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_refused_first_flattened_step_leaves_the_params_where_they_are(backend: str) -> None:
    """flatten=True moves a group's params into its flat buffer at its first step; a refusal in
    a later group came after the earlier groups had moved theirs (p.data and p.grad rebound)."""
    a = torch.randn(6, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    optimizer = onepass.AdamW([{"params": [a]}, {"params": [b]}], flatten=True, backend=backend)
    grad = torch.randn_like(a)
    a.grad, b.grad = grad, torch.randn(5).to_sparse()
    storage = a.data_ptr()
    _refused(optimizer, optimizer.step, RuntimeError, f"{_name(1, 0)} has a sparse gradient")
    assert a.data_ptr() == storage and a.grad is grad


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_retry_after_a_refused_first_step_sees_the_grads_and_state_it_then_has(
    backend: str,
) -> None:
    """A refused step keeps none of the buckets it built: the retry builds them from what then
    holds. Kept, they had flattened and stepped a param whose grad was gone by the retry (as a
    zero grad: decay, a step count, state) and brought back the loaded moments over an
    in-place write made between the two calls."""
    a, b, c = (torch.ones(n, requires_grad=True) for n in (4, 3, 2))
    optimizer = onepass.AdamW(
        [{"params": [a, b], "flatten": True}, {"params": [c]}], weight_decay=0.5, backend=backend
    )
    a.grad, b.grad, c.grad = torch.ones(4), torch.ones(3), torch.ones(2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        optimizer.step()
    b.grad, c.grad = None, torch.ones(2)
    optimizer.step()
    assert torch.equal(b, torch.ones(3)) and b not in optimizer.state and b.grad is None

    source = onepass.AdamW([torch.ones(4, requires_grad=True)], backend=backend)
    source.param_groups[0]["params"][0].grad = torch.ones(4)
    source.step()
    p, q = torch.ones(4, requires_grad=True), torch.ones(2, requires_grad=True)
    loaded = onepass.AdamW([{"params": [p]}, {"params": [q]}], backend=backend)
    checkpoint = source.state_dict()
    checkpoint["param_groups"].append({**checkpoint["param_groups"][0], "params": [1]})
    loaded.load_state_dict(checkpoint)
    p.grad, q.grad = torch.ones(4), torch.ones(2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        loaded.step()
    loaded.state[p]["exp_avg"].zero_()  # the user's write, between the refusal and the retry
    q.grad = torch.ones(2)
    loaded.step()
    assert torch.allclose(loaded.state[p]["exp_avg"], torch.full((4,), 0.1))


def test_a_refused_step_draws_no_rounding_seed() -> None:
    """A group that switched stochastic rounding on since its last step gets its seed at the
    next step; a refused one neither keeps the seed nor advances torch's generator, so the
    retried step rounds as a twin's that never saw the refusal."""
    steps = []
    for refuse in (True, False):
        torch.manual_seed(0)
        optimizer, params = _stepped(onepass.AdamW, backend="cpu")
        optimizer.param_groups[0]["stochastic_rounding"] = True
        set_grads(params, make_grads(params, 3, none_pattern=False))
        if refuse:
            good, params[3].grad = params[3].grad, params[3].grad.to_sparse()
            rng = torch.random.get_rng_state()
            _refused(optimizer, optimizer.step, RuntimeError, "has a sparse gradient")
            assert torch.equal(torch.random.get_rng_state(), rng)
            params[3].grad = good
        optimizer.step()
        steps.append((optimizer.param_groups[0]["sr_seed"], [p.detach().clone() for p in params]))
    assert steps[0][0] == steps[1][0]
    assert all(torch.equal(p, q) for p, q in zip(steps[0][1], steps[1][1], strict=True))


def test_a_sparse_grad_under_max_grad_norm_is_refused_by_name() -> None:
    """The clip's norm runs before the step's checks: a sparse grad got torch's norm error,
    naming no param."""
    optimizer, params = _stepped(onepass.AdamW, backend="cpu", max_grad_norm=1.0)
    set_grads(params, make_grads(params, 3, none_pattern=False))
    params[2].grad = params[2].grad.to_sparse()
    _refused(optimizer, optimizer.step, RuntimeError, f"{_name(1, 0)} has a sparse gradient")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("shape", [(5,), ()])
def test_muon_refuses_a_non_matrix_in_a_muon_group(backend: str, shape: tuple[int, ...]) -> None:
    """A vector appended to a Muon group's params (the constructor routes it to the AdamW part,
    a later append does not): refused by name as torch.optim.Muon refuses it, where it had been
    orthogonalised as a column (or, 0-d, failed part-way)."""
    optimizer, params = _stepped_muon(backend)
    extra = torch.randn(shape, requires_grad=True)
    optimizer.param_groups[0]["params"].append(extra)
    set_grads(params, make_grads(params, 3, none_pattern=False))
    extra.grad = torch.randn_like(extra)
    index = len(optimizer.param_groups[0]["params"]) - 1
    _refused(optimizer, optimizer.step, ValueError, f"{_name(0, index)} has {len(shape)} dims")


def test_a_device_the_backend_cannot_step_is_refused_by_name() -> None:
    optimizer, params = _stepped(onepass.AdamW, backend="cpu")
    before = snapshot(optimizer)
    meta = torch.zeros(3, device="meta", requires_grad=True)
    optimizer.add_param_group({"params": [meta]})
    set_grads(params, make_grads(params, 3, none_pattern=False))
    meta.grad = torch.zeros(3, device="meta")
    with pytest.raises(RuntimeError, match=f"{_name(2, 0)}: backend='cpu' cannot step"):
        optimizer.step()
    del optimizer.param_groups[2]
    assert_unchanged(optimizer, before)


def test_adam_refuses_a_decay_mode_its_decoupled_weight_decay_contradicts() -> None:
    """Both names of the choice given at construction, disagreeing: refused (decay had silently
    won, rewriting the user's decoupled_weight_decay=True)."""
    with pytest.raises(ValueError, match="decoupled_weight_decay=True but decay='l2'"):
        onepass.Adam([torch.zeros(3, requires_grad=True)], decoupled_weight_decay=True, decay="l2")
    group = onepass.Adam([torch.zeros(3, requires_grad=True)], decay="decoupled").param_groups[0]
    assert group["decoupled_weight_decay"] is True


# ------------------------------------------------------------------------------------------------
# The same refusals for every algorithm (the cases above run AdamW)
# ------------------------------------------------------------------------------------------------

FAMILY = [
    pytest.param(onepass.Adam, {"weight_decay": 0.1}, id="Adam"),
    pytest.param(onepass.SGD, {"momentum": 0.9}, id="SGD"),
    pytest.param(onepass.SGDW, {"momentum": 0.9, "weight_decay": 0.1}, id="SGDW"),
    pytest.param(onepass.Lion, {"weight_decay": 0.1}, id="Lion"),
    pytest.param(onepass.NovoGrad, {"weight_decay": 0.1, "amsgrad": True}, id="NovoGrad"),
    pytest.param(onepass.FAdam, {}, id="FAdam"),
]


TRITON_HERE = pytest.param(
    "triton",
    marks=pytest.mark.skipif(not TRITON_INTERPRETED, reason="Triton runs CPU tensors interpreted"),
)


@pytest.mark.parametrize("backend", [*BACKEND_NAMES, TRITON_HERE])
@pytest.mark.parametrize("bad", ["sparse", "float8", "int32", "complex"])
@pytest.mark.parametrize(("cls", "kwargs"), FAMILY)
def test_every_algorithm_refuses_bad_params_and_grads(
    cls: type[onepass.FusedOptimizer], kwargs: dict[str, Any], bad: str, backend: str
) -> None:
    """A sparse grad, a dtype no kernel takes and a complex param, added as group 2 of a stepped
    optimizer (two groups, fp32 and bf16 buckets): refused by name at add_param_group or at the
    step, changing nothing; the step after it (the culprit gone) steps every other param."""
    optimizer, params = _stepped(cls, backend, **kwargs)
    if bad == "sparse":
        embedding = torch.nn.Embedding(10, 3, sparse=True)
        culprit = embedding.weight

        def give_grad(p: torch.Tensor) -> None:
            embedding(torch.tensor([1, 4])).sum().backward()

        error: Any = RuntimeError
        match = f"{_name(2, 0)}.*sparse"
    elif bad == "complex":
        culprit = torch.randn(3, dtype=torch.complex64, requires_grad=True)

        def give_grad(p: torch.Tensor) -> None:
            p.grad = torch.ones_like(p)

        error, match = ValueError, f"{_name(2, 0)} is complex"
    else:
        dtype = torch.float8_e4m3fn if bad == "float8" else torch.int32
        culprit = torch.zeros(5, dtype=dtype)
        if dtype.is_floating_point:
            culprit.requires_grad_()

        def give_grad(p: torch.Tensor) -> None:
            p.grad = torch.zeros(5, dtype=dtype)

        error, match = (TypeError, ValueError), f"{_name(2, 0)}.*{dtype}"
    _add_then_step_refused(optimizer, params, culprit, give_grad, error, match)
    if len(optimizer.param_groups) == 3:
        optimizer.param_groups.pop()
    culprit.grad = None
    _steps_every_fp32_param(optimizer, params)


def _steps_every_fp32_param(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """One more step moves every fp32 param (Lion's default lr, 1e-4, is below a bf16 ulp)."""
    before = [p.detach().clone() for p in params]
    set_grads(params, make_grads(params, 3, none_pattern=False))
    optimizer.step()
    moved = [not torch.equal(p, b) for p, b in zip(params, before, strict=True)]
    assert all(m for m, p in zip(moved, params, strict=True) if p.dtype == torch.float32)


def _corrupt_any(kind: str, sd: dict[str, Any], slots: list[str]) -> tuple[dict[str, Any], str]:
    """``_corrupt`` for any algorithm: ``slots`` are the per-element slots of entry 3."""
    sd = copy.deepcopy(sd)
    slot = slots[0]
    if kind == "slot-shape":
        sd["state"][3][slot] = torch.zeros(32)
        return sd, rf"'{slot}' of {_name(1, 1)} has shape \(32,\)"
    if kind == "foreign-slot":
        foreign = "momentum_buffer" if "momentum_buffer" not in slots else "exp_avg_sq"
        sd["state"][0][foreign] = torch.zeros(17)
        return sd, f"'{foreign}' of {_name(0, 0)} is another algorithm's"
    if kind == "missing-slot":
        del sd["state"][3][slot]
        return sd, f"state of {_name(1, 1)} has no '{slot}'"
    if kind == "sparse-slot":
        sd["state"][2][slot] = sd["state"][2][slot].to_sparse()
        return sd, f"slot '{slot}' of {_name(1, 0)} is a torch.sparse_coo tensor"
    return _corrupt(kind, sd)


@pytest.mark.parametrize(
    "kind",
    ["slot-shape", "foreign-slot", "missing-slot", "sparse-slot", "groups", "params"],
)
@pytest.mark.parametrize("backend", [*BACKEND_NAMES, TRITON_HERE])
@pytest.mark.parametrize(("cls", "kwargs"), FAMILY)
def test_every_algorithm_refuses_a_bad_state_dict(
    cls: type[onepass.FusedOptimizer], kwargs: dict[str, Any], kind: str, backend: str
) -> None:
    optimizer, params = _stepped(cls, backend, **kwargs)
    good = optimizer.state_dict()
    slots = [k for k, v in good["state"][3].items() if k != "step" and v.dim() > 0]
    assert slots, good["state"][3]
    bad, match = _corrupt_any(kind, good, slots)
    if kind == "missing-slot" and cls in (onepass.SGD, onepass.SGDW, onepass.Lion):
        # No step count in their state: an entry without the buffer is a param that has not
        # stepped (SGD's buffer may be missing, as torch.optim's: it starts afresh). Loaded.
        optimizer.load_state_dict(bad)
        _steps_every_fp32_param(optimizer, params)
        return
    _refused(optimizer, lambda: optimizer.load_state_dict(bad), ValueError, match)
    _steps_every_fp32_param(optimizer, params)  # still steps from its own state


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_muon_adamw_group_betas_set_later_refused_before_stepping(backend: str) -> None:
    """Muon's AdamW groups read ``betas``, which Muon's constructor does not take (it takes
    ``adamw_betas``): a bad value set there later is refused before the Muon group steps
    (only the constructor's keys had been checked, and the matrix had stepped)."""
    matrix, vector = torch.randn(6, 4, requires_grad=True), torch.randn(5, requires_grad=True)
    optimizer = onepass.Muon([matrix, vector], backend=backend, ns_dtype=torch.float32)
    matrix.grad, vector.grad = torch.randn(6, 4), torch.randn(5)
    optimizer.step()
    adamw = next(i for i, g in enumerate(optimizer.param_groups) if not g["use_muon"])
    optimizer.param_groups[adamw]["betas"] = (0.9, 0.95, 0.99)
    _refused(optimizer, optimizer.step, TypeError, r"betas must be a tuple of 2 numbers")
