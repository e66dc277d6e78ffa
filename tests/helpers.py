"""Shared test helpers: the optimizer table, comparisons, snapshots, the reference runner.

The reference runner (:class:`ReferenceRun`) mirrors an optimizer with direct calls to
``onepass.algorithms.adam_reference`` / ``sgd_reference`` / ``lion_reference`` on its own copies
of every param and state tensor, one tensor at a time, with its own per-tensor step counts and its
own view of the hyperparameters (decay mode and initial lr come from the test's config, not from
the optimizer).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import onepass
from onepass._engine import triton_error
from onepass.algorithms import (
    AdamScalars,
    FAdamScalars,
    LionScalars,
    NovoGradScalars,
    SgdScalars,
    adam_reference,
    fadam_reference,
    lion_reference,
    novograd_reference,
    sgd_reference,
)
from onepass.algorithms.base import scalar_slot_dtype

# ------------------------------------------------------------------------------------------------
# Tolerances (DESIGN.md, numerics)
# ------------------------------------------------------------------------------------------------

#: (rtol, atol) by the dtype the optimizer stores.
#: float64: the kernels and the reference both compute in float64; they differ only in operation
#:   order (the kernel multiplies by 1/sqrt(bc2), may contract to FMA), ~1e-16 per step.
#: float32: DESIGN.md's budget after 7 steps against the float64 reference.
#: bfloat16 / float16: DESIGN.md's 5e-3, for comparisons of two runs in the storage dtype that may
#:   drift apart (capability vs capability). Against the reference, low precision is checked in
#:   lockstep with :func:`assert_within_ulps` instead (see test_numerics.py).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-14),
    torch.float32: (1.3e-6, 1e-5),
    torch.bfloat16: (5e-3, 5e-3),
    torch.float16: (5e-3, 5e-3),
}

#: Lockstep checks of low precision: at most this fraction of the elements may differ at all
#: (measured over the whole numerics matrix: 4.6e-5 overall, 0.3% in the worst comparison).
MAX_FRACTION_OFF = 0.02

#: Storage dtypes that are checked in lockstep (one step at a time from the kernel's own values).
LOW_PRECISION = (torch.bfloat16, torch.float16)

#: Tight float64 tolerance for comparisons with torch.optim (same math, same dtype).
TIGHT = (1e-12, 1e-14)

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference oracle runs in when checking a backend that stores ``dtype``."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float64


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------------


def assert_verbose_allclose(
    actual: torch.Tensor,
    expected: torch.Tensor,
    rtol: float,
    atol: float,
    name: str = "tensor",
) -> None:
    """|actual - expected| <= atol + rtol * |expected| everywhere (NaN only matches NaN).

    On failure the message says how many elements differ, the worst one (index, both values,
    the difference) and the first few.
    """
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    a = actual.detach().to(torch.float64).reshape(-1)
    e = expected.detach().to(torch.float64).reshape(-1)
    both_nan = a.isnan() & e.isnan()
    diff = (a - e).abs()
    bad = ~((diff <= atol + rtol * e.abs()) | both_nan | (a == e))
    if not bool(bad.any()):
        return
    excess = torch.where(bad, (diff - atol - rtol * e.abs()).nan_to_num(float("inf")), -1.0)
    worst = int(excess.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), actual.shape)) or ()
    firsts = bad.nonzero().reshape(-1)[:5].tolist()
    lines = [
        f"{name}: {int(bad.sum())} of {a.numel()} elements differ (rtol={rtol}, atol={atol})",
        f"  worst at index {index}: actual={a[worst].item()!r} expected={e[worst].item()!r} "
        f"|diff|={diff[worst].item():.3e}",
        "  first mismatches (flat index: actual vs expected): "
        + ", ".join(f"{i}: {a[i].item():.8g} vs {e[i].item():.8g}" for i in firsts),
    ]
    raise AssertionError("\n".join(lines))


def storage_ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each of ``values`` (float64), subnormals included."""
    info = torch.finfo(dtype)
    magnitude = values.detach().to(torch.float64).abs().clamp_min(info.tiny)
    _, exponent = torch.frexp(magnitude)  # magnitude = m * 2^exponent, 0.5 <= m < 1
    return torch.ldexp(torch.full_like(magnitude, info.eps / 2), exponent)


def assert_within_ulps(
    actual: torch.Tensor,
    expected: torch.Tensor,
    ulps: float = 1.0,
    atol: float = 1e-6,
    name: str = "tensor",
    max_fraction_off: float = MAX_FRACTION_OFF,
) -> None:
    """|actual - expected| <= ulps * ulp(expected) + atol, ulp in ``expected``'s storage dtype,
    and (over 1,000 elements or more) at most ``max_fraction_off`` of the elements not equal.

    For one step of a low-precision kernel against the reference run from the same stored values:
    both compute in fp32 and differ only by fp32 operation order, which moves the rounded result
    by at most one storage ulp, and rarely; ``atol`` only absorbs results that cancel to near
    zero. The fraction bound catches a wrong rounding mode (truncation instead of round to
    nearest even is also within one ulp, but on about half the elements).
    """
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    e = expected.detach().to(torch.float64).reshape(-1)
    a = actual.detach().to(torch.float64).reshape(-1)
    allowed = ulps * storage_ulp(e, expected.dtype) + atol
    diff = (a - e).abs()
    bad = ~((diff <= allowed) | (a == e) | (a.isnan() & e.isnan()))
    if not bool(bad.any()):
        off = int(((a != e) & ~(a.isnan() & e.isnan())).sum())  # NaN where expected: equal
        assert a.numel() < 1000 or off <= max_fraction_off * a.numel(), (
            f"{name}: {off} of {a.numel()} elements are not equal (each within {ulps} ulp): more "
            f"than {max_fraction_off:.0%}; a rounding mode that is not round-to-nearest-even?"
        )
        return
    in_ulps = (diff / storage_ulp(e, expected.dtype)).nan_to_num(float("inf"))
    worst = int(torch.where(bad, in_ulps, -1.0).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), actual.shape))
    raise AssertionError(
        f"{name}: {int(bad.sum())} of {a.numel()} elements differ by more than {ulps} "
        f"{expected.dtype} ulp (+{atol}); worst at {index}: actual={a[worst].item()!r} "
        f"expected={e[worst].item()!r} ({in_ulps[worst].item():.1f} ulp)"
    )


def assert_all_close(
    triples: Sequence[tuple[str, torch.Tensor, torch.Tensor]],
    rtol: float,
    atol: float,
    ulps: float | None = None,
) -> None:
    """(name, actual, expected) triples, all checked at once (one comparison per dtype, so 1,000
    tensors stay fast); on a failure the first failing tensor is reported in full."""

    def one(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
        if ulps is None:
            assert_verbose_allclose(actual, expected, rtol, atol, name)
        else:
            assert_within_ulps(actual, expected, ulps, atol, name)

    by_dtype: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for k, (name, actual, expected) in enumerate(triples):
        assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
        by_dtype.setdefault((actual.dtype, expected.dtype), []).append(k)
    for members in by_dtype.values():
        try:
            one(
                "all",
                torch.cat([triples[k][1].detach().reshape(-1) for k in members]),
                torch.cat([triples[k][2].detach().reshape(-1) for k in members]),
            )
        except AssertionError:
            for k in members:
                one(*triples[k])
            raise


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaNs included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(
        a.detach().contiguous().reshape(-1).view(torch.uint8),
        b.detach().contiguous().reshape(-1).view(torch.uint8),
    )


# ------------------------------------------------------------------------------------------------
# Snapshots: "a refused call changes nothing"
# ------------------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    params: list[torch.Tensor]
    state: dict[int, dict[str, Any]]
    groups: list[dict[str, Any]]


def all_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def snapshot(optimizer: torch.optim.Optimizer) -> Snapshot:
    params = all_params(optimizer)
    state: dict[int, dict[str, Any]] = {}
    for i, p in enumerate(params):
        if p in optimizer.state:
            state[i] = {
                k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                for k, v in optimizer.state[p].items()
            }
    return Snapshot([p.detach().clone() for p in params], state, _group_values(optimizer))


def _group_values(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Every group's values but its params, tensors cloned (a tensor lr or betas, a capturable
    group's device block views: an in-place write to them must show)."""

    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, tuple | list):
            return type(value)(copy(v) for v in value)
        return value

    return [{k: copy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and bitwise_equal(a, b)
    if isinstance(a, tuple | list):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
        )
    return bool(a == b) or (a != a and b != b)  # NaN equals NaN here


def assert_unchanged(optimizer: torch.optim.Optimizer, before: Snapshot) -> None:
    """Params, every state tensor (step included) and the hyperparameters, bitwise as before."""
    params = all_params(optimizer)
    assert len(params) == len(before.params)
    for i, (p, old) in enumerate(zip(params, before.params, strict=True)):
        assert bitwise_equal(p, old), f"param {i} changed"
    now = {i: optimizer.state[p] for i, p in enumerate(params) if p in optimizer.state}
    assert set(now) == set(before.state), f"state entries {sorted(now)} != {sorted(before.state)}"
    for i, entry in now.items():
        assert set(entry) == set(before.state[i]), f"state keys of param {i} changed"
        for key, value in entry.items():
            old_value = before.state[i][key]
            if isinstance(value, torch.Tensor):
                assert bitwise_equal(value, old_value), f"state[{i}][{key!r}] changed"
            else:
                assert value == old_value, f"state[{i}][{key!r}] changed"
    groups = _group_values(optimizer)
    assert len(groups) == len(before.groups), "param groups added or removed"
    for i, (group, old_group) in enumerate(zip(groups, before.groups, strict=True)):
        assert group.keys() == old_group.keys(), f"keys of group {i} changed"
        for key, value in group.items():
            assert _same_value(value, old_group[key]), f"param_groups[{i}][{key!r}] changed"


# ------------------------------------------------------------------------------------------------
# The optimizer table
# ------------------------------------------------------------------------------------------------

Config = dict[str, Any]


@dataclass(frozen=True)
class OptimizerInfo:
    """One onepass optimizer, the torch.optim class it replaces (if any) and its test configs."""

    name: str
    onepass_cls: type[onepass.FusedOptimizer]
    torch_cls: type[torch.optim.Optimizer] | None
    configs: tuple[Config, ...]
    family: str  # "adam", "sgd", "lion", "novograd" or "fadam"
    default_decay: str
    default_weight_decay: float = 0.0

    def decay(self, config: Config) -> str:
        if "decay" in config:
            return str(config["decay"])
        if config.get("decoupled_weight_decay"):
            return "decoupled"
        return self.default_decay

    def torch_configs(self) -> list[Config]:
        """The configs torch.optim can run (no onepass-only ``decay`` mode)."""
        return [c for c in self.configs if "decay" not in c]

    def slots(self, config: Config) -> tuple[str, ...]:
        if self.family == "adam":
            base = ("step", "exp_avg", "exp_avg_sq")
            return (*base, "max_exp_avg_sq") if config.get("amsgrad") else base
        if self.family == "lion":
            return ("exp_avg",)  # no "step": lion-pytorch keeps none
        if self.family == "fadam":
            return ("step", "fim", "momentum")
        if self.family == "novograd":
            base = ("step", "exp_avg", "exp_avg_sq")
            return (*base, "max_exp_avg_sq") if config.get("amsgrad") else base
        return ("momentum_buffer",) if config.get("momentum", 0.0) != 0 else ()


ADAM_INFO = OptimizerInfo(
    name="Adam",
    onepass_cls=onepass.Adam,
    torch_cls=torch.optim.Adam,
    configs=(
        {"lr": 1e-2},
        {"lr": 1e-2, "weight_decay": 0.1},
        {"lr": 1e-2, "amsgrad": True},
        {"lr": 1e-2, "maximize": True, "weight_decay": 0.1, "amsgrad": True},
        {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "maximize": True},
        {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True},
        {"lr": 1e-2, "weight_decay": 0.1, "decay": "independent"},
        {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True, "decay": "independent"},
    ),
    family="adam",
    default_decay="l2",
)

ADAMW_INFO = OptimizerInfo(
    name="AdamW",
    onepass_cls=onepass.AdamW,
    torch_cls=torch.optim.AdamW,
    configs=(
        {"lr": 1e-2},
        {"lr": 1e-2, "weight_decay": 0.0},
        {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True},
        {"lr": 1e-2, "weight_decay": 0.1, "maximize": True},
        {"lr": 1e-2, "weight_decay": 0.1, "maximize": True, "amsgrad": True},
        {"lr": 1e-2, "weight_decay": 0.2, "decay": "independent", "maximize": True},
    ),
    family="adam",
    default_decay="decoupled",
    default_weight_decay=1e-2,
)

SGD_INFO = OptimizerInfo(
    name="SGD",
    onepass_cls=onepass.SGD,
    torch_cls=torch.optim.SGD,
    configs=(
        {"lr": 0.1},
        {"lr": 0.1, "weight_decay": 0.1, "maximize": True},
        {"lr": 0.1, "momentum": 0.9},
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.5},
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1, "maximize": True},
        {"lr": 0.1, "momentum": 0.9, "nesterov": True},
        {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "maximize": True},
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1, "decay": "independent"},
    ),
    family="sgd",
    default_decay="l2",
)

SGDW_INFO = OptimizerInfo(
    name="SGDW",
    onepass_cls=onepass.SGDW,
    torch_cls=None,
    configs=(
        {"lr": 0.1, "weight_decay": 0.1},
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.1},
        {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "maximize": True},
    ),
    family="sgd",
    default_decay="decoupled",
)

LION_INFO = OptimizerInfo(
    name="Lion",
    onepass_cls=onepass.Lion,
    torch_cls=None,
    configs=(
        {"lr": 1e-2},
        {"lr": 1e-2, "weight_decay": 0.1},
        {"lr": 1e-2, "maximize": True},
        {"lr": 1e-2, "betas": (0.95, 0.98)},
        {"lr": 1e-2, "weight_decay": 0.5, "decay": "independent"},
        {"lr": 1e-2, "weight_decay": 0.1, "decay": "l2", "maximize": True},
    ),
    family="lion",
    default_decay="decoupled",
)

NOVOGRAD_INFO = OptimizerInfo(
    name="NovoGrad",
    onepass_cls=onepass.NovoGrad,
    torch_cls=None,
    configs=(
        {"lr": 1e-2},
        {"lr": 1e-2, "weight_decay": 0.1},
        {"lr": 1e-2, "grad_averaging": True},
        {"lr": 1e-2, "amsgrad": True},
        {"lr": 1e-2, "maximize": True},
    ),
    family="novograd",
    default_decay="l2",
)

FADAM_INFO = OptimizerInfo(
    name="FAdam",
    onepass_cls=onepass.FAdam,
    torch_cls=None,
    configs=(
        {"lr": 1e-2},
        {"lr": 1e-2, "weight_decay": 0.0},
        {"lr": 1e-2, "clip": 0.5},
        {"lr": 1e-2, "p": 0.25},
        {"lr": 1e-2, "maximize": True},
    ),
    family="fadam",
    default_decay="l2",
    default_weight_decay=0.1,
)

OPTIMIZERS: tuple[OptimizerInfo, ...] = (
    ADAM_INFO,
    ADAMW_INFO,
    SGD_INFO,
    SGDW_INFO,
    LION_INFO,
    NOVOGRAD_INFO,
    FADAM_INFO,
)


def skip_unless_implemented(info: OptimizerInfo, backend: str) -> None:
    """Skips a test of a backend the algorithm does not implement (yet)."""
    if backend not in info.onepass_cls.spec.launchers:
        pytest.skip(f"{info.name} has no {backend!r} backend")


def config_id(config: Config) -> str:
    parts = []
    for key, value in config.items():
        if key == "lr":
            continue
        if value is True:
            parts.append(key)
        elif isinstance(value, tuple):
            parts.append(f"{key}={','.join(str(v) for v in value)}")
        else:
            parts.append(f"{key}={value}")
    return "-".join(parts) or "default"


def optimizer_cases(torch_only: bool = False) -> list[Any]:
    """pytest params (info, config) over the whole table."""
    cases = []
    for info in OPTIMIZERS:
        if torch_only and info.torch_cls is None:
            continue
        configs = info.torch_configs() if torch_only else list(info.configs)
        for config in configs:
            cases.append(
                pytest.param(info, config, id=f"{info.name}-{config_id(config)}"),
            )
    return cases


# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """A backend to test: "reference", or "cpu" with one CPU capability."""

    name: str
    capability: str | None = None

    @property
    def id(self) -> str:
        return self.name if self.capability is None else f"{self.name}-{self.capability}"


#: The CPU capabilities this machine runs, narrowest first (none if onepass._C is not built).
CAPABILITIES: list[str] = onepass.cpu_capabilities() if onepass.native_available() else []
#: Whether the Triton backend runs here on CPU tensors: its interpreter is on (conftest.py sets
#: TRITON_INTERPRET=1 where there is no CUDA device) and triton imports (not a test dependency:
#: without it the Triton cases skip instead of failing).
TRITON_INTERPRETED: bool = os.environ.get("TRITON_INTERPRET") == "1" and triton_error() is None
#: The backends every drop-in test runs on.
BACKEND_NAMES: list[str] = (["cpu"] if CAPABILITIES else []) + ["reference"]
#: The same, and "triton" where it runs here (TRITON_INTERPRETED).
BACKEND_NAMES_AND_TRITON: list[str] = BACKEND_NAMES + (["triton"] if TRITON_INTERPRETED else [])
#: For tests of the native CPU kernels themselves.
needs_native = pytest.mark.skipif(not CAPABILITIES, reason="onepass._C is not built")


def all_backends() -> list[Backend]:
    """ "cpu" once per capability this CPU runs, and "reference"."""
    return [Backend("cpu", cap) for cap in CAPABILITIES] + [Backend("reference")]


# ------------------------------------------------------------------------------------------------
# Params and grads
# ------------------------------------------------------------------------------------------------


def make_params(dtype: torch.dtype, sizes: Sequence[int] = (0, 1, 7, 4097)) -> list[torch.Tensor]:
    """Random leaf params: the given 1-D sizes, a matrix, a transposed (non-contiguous) view, a
    strided slice (non-contiguous) and, last, a frozen param (requires_grad=False)."""
    params = [torch.randn(n, dtype=torch.float32).to(dtype).requires_grad_() for n in sizes]
    params.append(torch.randn(3, 5).to(dtype).requires_grad_())
    transposed = torch.randn(9, 5).to(dtype).t()  # shape (5, 9), strides (1, 5)
    params.append(transposed.requires_grad_())
    strided = torch.randn(40).to(dtype)[::3]  # 14 elements, stride 3
    params.append(strided.requires_grad_())
    params.append(torch.randn(6).to(dtype))  # frozen
    assert not params[-2].is_contiguous() and not params[-3].is_contiguous()
    return params


def grad_is_none(index: int, step: int) -> bool:
    """Some params have no grad on some steps: every third param on even steps, and params 2, 7,
    12, ... on their first two steps (so they start later than the others)."""
    return (index % 3 == 1 and step % 2 == 0) or (index % 5 == 2 and step < 3)


def make_grads(
    params: Sequence[torch.Tensor], step: int, none_pattern: bool = True
) -> list[torch.Tensor | None]:
    """Random grads (never zero) for the params that require grad, None per :func:`grad_is_none`.
    The grad of a non-contiguous 2-D param is itself non-contiguous."""
    grads: list[torch.Tensor | None] = []
    for i, p in enumerate(params):
        if not p.requires_grad or (none_pattern and grad_is_none(i, step)):
            grads.append(None)
            continue
        if p.dim() == 2 and not p.is_contiguous():
            g = torch.randn(p.shape[1], p.shape[0]).to(p.device, p.dtype).t()
        else:
            g = torch.randn(p.shape).to(p.device, p.dtype)
        grads.append(g)
    return grads


def set_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.clone()


# ------------------------------------------------------------------------------------------------
# The reference run
# ------------------------------------------------------------------------------------------------


def _lr(group: dict[str, Any]) -> float:
    lr = group["lr"]
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)


@dataclass
class RefTensor:
    param: torch.Tensor
    slots: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0


class ReferenceRun:
    """Steps copies of an optimizer's params with the reference functions, tensor by tensor.

    ``dtype`` is the dtype the copies are kept in (float64 for the oracle, or the storage dtype to
    follow the kernels' rounding path). Hyperparameters: ``config`` gives everything but the lr,
    which is read from the optimizer's group at each step (so LR schedulers apply); decay mode and
    initial lr come from the config.
    """

    def __init__(
        self,
        info: OptimizerInfo,
        config: Config,
        params: Sequence[torch.Tensor],
        dtype: torch.dtype,
    ) -> None:
        self.info = info
        self.config = config
        self.decay = info.decay(config)
        self.initial_lr = float(config["lr"])
        # On the CPU whatever the params' device: one oracle for every backend.
        self.tensors = [RefTensor(p.detach().to("cpu", dtype).clone()) for p in params]

    def _adam_scalars(self, lr: float, config: Config) -> AdamScalars:
        beta1, beta2 = config.get("betas", (0.9, 0.999))
        wd = float(config.get("weight_decay", self.info.default_weight_decay))
        return AdamScalars(
            lr=lr,
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(config.get("eps", 1e-8)),
            weight_decay=wd if self.decay == "l2" else 0.0,
            decay_coefficient=self._decay_coefficient(wd),
            l2_decay=self.decay == "l2" and wd != 0.0,
            amsgrad=bool(config.get("amsgrad", False)),
            maximize=bool(config.get("maximize", False)),
        )

    def _decay_coefficient(self, wd: float) -> float:
        """c in p *= 1 - lr * c, from the test's own config."""
        if self.decay == "decoupled":
            return wd
        if self.decay == "independent":
            return wd / self.initial_lr
        return 0.0

    def _sgd_scalars(self, lr: float, config: Config) -> SgdScalars:
        wd = float(config.get("weight_decay", 0.0))
        return SgdScalars(
            lr=lr,
            momentum=float(config.get("momentum", 0.0)),
            dampening=float(config.get("dampening", 0.0)),
            weight_decay=wd if self.decay == "l2" else 0.0,
            decay_coefficient=self._decay_coefficient(wd),
            l2_decay=self.decay == "l2" and wd != 0.0,
            nesterov=bool(config.get("nesterov", False)),
            maximize=bool(config.get("maximize", False)),
        )

    def _lion_scalars(self, lr: float, config: Config) -> LionScalars:
        beta1, beta2 = config.get("betas", (0.9, 0.99))
        wd = float(config.get("weight_decay", 0.0))
        return LionScalars(
            lr=lr,
            beta1=float(beta1),
            beta2=float(beta2),
            weight_decay=wd if self.decay == "l2" else 0.0,
            decay_coefficient=self._decay_coefficient(wd),
            l2_decay=self.decay == "l2" and wd != 0.0,
            maximize=bool(config.get("maximize", False)),
        )

    def _novograd_scalars(self, lr: float, config: Config) -> NovoGradScalars:
        beta1, beta2 = config.get("betas", (0.95, 0.98))
        return NovoGradScalars(
            lr=lr,
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(config.get("eps", 1e-8)),
            weight_decay=float(config.get("weight_decay", 0.0)),
            grad_averaging=bool(config.get("grad_averaging", False)),
            amsgrad=bool(config.get("amsgrad", False)),
            maximize=bool(config.get("maximize", False)),
        )

    def _fadam_scalars(self, lr: float, config: Config) -> FAdamScalars:
        beta1, beta2 = config.get("betas", (0.9, 0.999))
        return FAdamScalars(
            lr=lr,
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(config.get("eps", 1e-8)),
            clip=float(config.get("clip", 1.0)),
            p=float(config.get("p", 0.5)),
            weight_decay=float(config.get("weight_decay", self.info.default_weight_decay)),
            maximize=bool(config.get("maximize", False)),
        )

    def step(self, grads: Sequence[torch.Tensor | None], lr: float) -> None:
        for t, g in zip(self.tensors, grads, strict=True):
            if g is None:
                continue
            g = g.to("cpu", t.param.dtype)
            t.step += 1
            if self.info.family == "adam":
                s = self._adam_scalars(lr, self.config)
                if not t.slots:
                    names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if s.amsgrad else [])
                    t.slots = {n: torch.zeros_like(t.param) for n in names}
                adam_reference(
                    t.param,
                    g,
                    t.slots["exp_avg"],
                    t.slots["exp_avg_sq"],
                    t.slots.get("max_exp_avg_sq"),
                    t.step,
                    s,
                )
            elif self.info.family == "novograd":
                ns = self._novograd_scalars(lr, self.config)
                if not t.slots:
                    scalar_dtype = scalar_slot_dtype(t.param.dtype)
                    t.slots = {"exp_avg": torch.zeros_like(t.param)}
                    for name in ("exp_avg_sq", "max_exp_avg_sq")[: 1 + ns.amsgrad]:
                        t.slots[name] = torch.zeros((), dtype=scalar_dtype)
                novograd_reference(
                    t.param,
                    g,
                    t.slots["exp_avg"],
                    t.slots["exp_avg_sq"],
                    t.slots.get("max_exp_avg_sq"),
                    t.step,
                    ns,
                )
            elif self.info.family == "fadam":
                fs = self._fadam_scalars(lr, self.config)
                if not t.slots:
                    t.slots = {n: torch.zeros_like(t.param) for n in ("fim", "momentum")}
                fadam_reference(t.param, g, t.slots["fim"], t.slots["momentum"], t.step, fs)
            elif self.info.family == "lion":
                ls = self._lion_scalars(lr, self.config)
                if not t.slots:
                    t.slots = {"exp_avg": torch.zeros_like(t.param)}
                lion_reference(t.param, g, t.slots["exp_avg"], ls)
            else:
                s = self._sgd_scalars(lr, self.config)
                first = False
                if s.momentum != 0 and not t.slots:
                    t.slots = {"momentum_buffer": torch.zeros_like(t.param)}
                    first = True
                sgd_reference(t.param, g, t.slots.get("momentum_buffer"), first, s)

    def check(
        self,
        optimizer: torch.optim.Optimizer,
        params: Sequence[torch.Tensor],
        rtol: float,
        atol: float,
        ulps: float | None = None,
    ) -> None:
        """Params, every state tensor and 'step' of ``optimizer`` against this run.

        With ``ulps``, values are compared in storage ulps (:func:`assert_within_ulps`, for the
        lockstep check of low-precision storage) instead of rtol/atol.
        """

        triples: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        slots = self.info.slots(self.config)
        for i, (p, t) in enumerate(zip(params, self.tensors, strict=True)):
            triples.append((f"param {i} {tuple(p.shape)}", p.detach().cpu(), t.param))
            if t.step == 0:
                assert p not in optimizer.state or not optimizer.state[p], (
                    f"param {i} never had a grad but has state {list(optimizer.state[p])}"
                )
                continue
            entry = optimizer.state[p] if slots else optimizer.state.get(p, {})
            assert set(entry) == set(slots), f"state keys of param {i}: {sorted(entry)}"
            for name in slots:
                value = entry[name]
                if name == "step":
                    assert float(value) == t.step, f"param {i}: step {float(value)} != {t.step}"
                    continue
                scalar_slot = name in self.info.onepass_cls.spec.scalar_slots
                expected_dtype = scalar_slot_dtype(p.dtype) if scalar_slot else p.dtype
                assert value.dtype == expected_dtype, f"state[{i}][{name!r}] has {value.dtype}"
                triples.append((f"state[{i}][{name!r}]", value.detach().cpu(), t.slots[name]))
        assert_all_close(triples, rtol, atol, ulps)

    def sync(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> None:
        """Continue from the optimizer's own values (lockstep checking of low precision)."""
        for p, t in zip(params, self.tensors, strict=True):
            t.param.copy_(p.detach())
            for name, value in t.slots.items():
                value.copy_(optimizer.state[p][name])


#: Every optimizer class, each with a config whose step reads the grad in every way it can
#: (momentum, amsgrad, per-tensor norms, sign, Newton-Schulz): for the tests of options every
#: class takes (clipping, stochastic rounding, capture). Extra keyword arguments pass through.
EVERY_OPTIMIZER: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "AdamW": lambda ps, **kw: onepass.AdamW(ps, lr=1e-2, weight_decay=0.1, **kw),
    "Adam": lambda ps, **kw: onepass.Adam(ps, lr=1e-2, weight_decay=0.1, amsgrad=True, **kw),
    "SGD": lambda ps, **kw: onepass.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, **kw),
    "SGDW": lambda ps, **kw: onepass.SGDW(ps, lr=0.1, momentum=0.9, weight_decay=0.1, **kw),
    "Lion": lambda ps, **kw: onepass.Lion(ps, lr=1e-2, weight_decay=0.1, **kw),
    "NovoGrad": lambda ps, **kw: onepass.NovoGrad(ps, lr=1e-2, weight_decay=0.1, **kw),
    "FAdam": lambda ps, **kw: onepass.FAdam(ps, lr=1e-2, **kw),
    "Muon": lambda ps, **kw: onepass.Muon(ps, lr=2e-2, ns_dtype=torch.float32, **kw),
}


def assert_small_tensors_step_alike_beside_a_large_one(
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
) -> None:
    """Steps tensors that each fit one 2^15-element chunk alone, then beside a tensor of several
    chunks, 4 steps with a None grad on one: the small tensors' params and state must be equal
    to the bit. The CPU ops run per-tensor reductions chunk by chunk in the first case (NovoGrad,
    FAdam) and as passes over the whole bucket in the second."""
    torch.manual_seed(0)
    small = [torch.randn(n) for n in (0, 1, 7, 4097, 300)]
    big = torch.randn(3 * 2**15 + 5)
    results = []
    for extra in ([], [big]):
        params = [p.clone().requires_grad_() for p in [*small, *extra]]
        opt = make(params)
        gen, gen_big = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
        for step in range(4):
            for i, p in enumerate(params):
                skip = i == 2 and step == 1  # a tensor without a grad on one step
                source = gen if i < len(small) else gen_big
                p.grad = None if skip else torch.randn(p.shape, generator=source)
            opt.step()
        results.append((params[: len(small)], opt))
    (a, oa), (b, ob) = results
    for i, (p, q) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(p, q), f"param {i}"
        for key, value in oa.state[p].items():
            assert torch.equal(value, ob.state[q][key]), f"{key} of param {i}"
