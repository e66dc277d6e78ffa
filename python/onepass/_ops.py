"""The native operators (``torch.ops.onepass``): loading, fake (meta) kernels, availability."""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import torch

try:
    # registers torch.ops.onepass.*; eager entry points (a compiled module: no stub for mypy)
    from onepass import _C  # type: ignore[attr-defined]

    NATIVE_ERROR: str | None = None
except ImportError as error:  # a source checkout that was never built
    NATIVE_ERROR = (
        f"onepass._C could not be imported ({error}); run `pip install --no-build-isolation -e .`"
    )


def native_op(name: str) -> Any:
    """The native op ``name``: its eager entry point (no dispatcher: the per-element conversion
    of 4,000-tensor lists costs about a millisecond a step), or under torch.compile the
    torch.ops.onepass operator, which Dynamo traces with its fake."""
    if torch.compiler.is_compiling():
        return functools.partial(_traced_op, getattr(torch.ops.onepass, name).default)
    return getattr(_C, name)


def _traced_op(op: Any, params: list[torch.Tensor], grads: Any, *args: Any) -> None:
    """``op`` with the grads list the operator takes: the engine passes None where the eager
    entry point reads each param's .grad itself, and Dynamo may trace a launcher whose caller it
    left to run eagerly (a graph break while a group's buckets are built, at a first compiled
    step), which then still passes None."""
    op(params, [p.grad for p in params] if grads is None else grads, *args)


def native_available() -> bool:
    """True when the compiled operators (CPU kernels, and CUDA kernels where built) are loaded."""
    return NATIVE_ERROR is None


def cpu_capability() -> str:
    """The instruction set the CPU kernels run with: 'scalar', 'avx2' or 'avx512'."""
    return str(torch.ops.onepass.cpu_capability())


def cpu_capabilities() -> list[str]:
    """Every instruction set this CPU can run the kernels with, narrowest first."""
    return list(torch.ops.onepass.cpu_capabilities())


def total_norm(tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor | None:
    """The global norm of ``tensors`` by onepass's native CPU reduction (one parallel pass over
    all of them, float64 sums), or None where it does not apply (not the 2-norm, a tensor off
    the CPU or sparse, no native build): the caller then uses torch's."""
    if NATIVE_ERROR is not None or norm_type != 2.0 or not tensors:
        return None
    if any(t.device.type != "cpu" or t.layout != torch.strided for t in tensors):
        return None
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    total = sum(torch.ops.onepass.sum_of_squares(group) for group in by_dtype.values())
    assert isinstance(total, torch.Tensor)
    # float32 (float64 for float64 grads): a 16-bit norm would put its rounding in the clip
    out = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    return total.sqrt().to(out)


def grads_total_norm(params: list[torch.Tensor]) -> torch.Tensor | None:
    """The global 2-norm of the grads of ``params`` (those that have one) by the native CPU
    reduction, reading each ``p.grad`` natively (no Python list of them, no dispatcher call), or
    None where it does not apply (a grad off the CPU or not dense, no native build, under
    torch.compile): the caller then takes :func:`total_norm` of the grads or torch's."""
    if NATIVE_ERROR is not None or torch.compiler.is_compiling():
        return None
    result = _C.grads_sum_of_squares(params)
    if result is None:
        return None
    total, first_is_double = result
    return total.sqrt().to(torch.float64 if first_is_double else torch.float32)


def grads_are(
    params: list[torch.Tensor],
    impls: torch.Tensor,
    storage: int = 0,
    grad_storage: int = 0,
    grad_offsets: torch.Tensor | None = None,
) -> bool:
    """Whether every ``params[i].grad`` is the tensor whose TensorImpl address (``t._cdata``) is
    ``impls[i]``; for a ``storage`` address other than 0, every param's storage starts at
    ``storage``; for a ``grad_storage`` other than 0, every grad starts at element
    ``grad_offsets[i]`` of the storage at ``grad_storage`` (the same grad object may hold other
    memory: ``p.grad.data = x``, model.to(...)). Natively where built (4,000 params in ~0.1 ms
    instead of ~1.3 ms)."""
    if NATIVE_ERROR is None and not torch.compiler.is_compiling():
        return bool(_C.grads_are(params, impls, storage, grad_storage, grad_offsets))
    if storage and any(p.untyped_storage().data_ptr() != storage for p in params):
        return False
    grads = [p.grad for p in params]
    if not all(g is not None and g._cdata == i for g, i in zip(grads, impls.tolist(), strict=True)):
        return False
    if grad_storage and grad_offsets is not None:
        places = zip(grads, grad_offsets.tolist(), strict=True)
        return all(
            g is not None
            and g.untyped_storage().data_ptr() == grad_storage
            and g.storage_offset() == offset
            for g, offset in places
        )
    return True


def same_objects(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Whether ``a`` and ``b`` hold the same objects in the same order, by identity (a tensor's
    ``==`` is elementwise): natively for two lists (4,000 params in a few us, ~60 us in Python)."""
    if (
        NATIVE_ERROR is None
        and type(a) is list
        and type(b) is list
        and not torch.compiler.is_compiling()
    ):
        return bool(_C.same_objects(a, b))
    return len(a) == len(b) and all(map(operator.is_, a, b))


def grads_match(
    params: list[torch.Tensor], grads: list[torch.Tensor | None] | None, shapes: torch.Tensor
) -> bool:
    """Whether every ``params[i]`` with a grad (``grads[i]``, or for ``grads=None`` its own
    ``.grad``, read natively) still has ``params[0]``'s dtype and device and the shape packed in
    ``shapes`` (_engine.packed_shapes), and its grad is a strided tensor of the first grad's
    dtype, on that device and of that shape, both with memory to step. Native where built: the
    same check in Python costs ~1 us a param. False when not built, or for anything unusual:
    the caller then checks in Python, which names the culprit."""
    if NATIVE_ERROR is None and not torch.compiler.is_compiling():
        return bool(_C.grads_match(params, grads, shapes))
    return False


def launch_key(
    params: list[torch.Tensor], grads: list[torch.Tensor | None], key: torch.Tensor
) -> bool:
    """Writes the address of ``params[i]`` into ``key[2 * i]`` and of ``grads[i]`` (-1 for None)
    into ``key[2 * i + 1]``, natively. False when not built, or where a param with a grad or its
    grad is not contiguous or is a lazy negation (``key`` then partly written): the caller reads
    them in Python."""
    if NATIVE_ERROR is None and not torch.compiler.is_compiling():
        return bool(_C.launch_key(params, grads, key))
    return False


def set_cpu_capability(name: str) -> None:
    """Forces one build of the CPU kernels (tests use it to check every build on one machine)."""
    torch.ops.onepass.set_cpu_capability(name)


if NATIVE_ERROR is None:
    # The steps mutate their arguments in place and return nothing: the fakes only exist so that
    # torch.compile and opcheck can trace them.
    @torch.library.register_fake("onepass::adam_")
    def _adam_fake(*args: object, **kwargs: object) -> None:
        return None

    @torch.library.register_fake("onepass::sgd_")
    def _sgd_fake(*args: object, **kwargs: object) -> None:
        return None

    @torch.library.register_fake("onepass::lion_")
    def _lion_fake(*args: object, **kwargs: object) -> None:
        return None

    @torch.library.register_fake("onepass::sum_of_squares")
    def _sum_of_squares_fake(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.empty((), dtype=torch.float64, device=tensors[0].device)

    @torch.library.register_fake("onepass::muon_momentum_")
    def _muon_momentum_fake(*args: object, **kwargs: object) -> None:
        return None

    @torch.library.register_fake("onepass::novograd_")
    def _novograd_fake(*args: object, **kwargs: object) -> None:
        return None

    @torch.library.register_fake("onepass::fadam_")
    def _fadam_fake(*args: object, **kwargs: object) -> None:
        return None
