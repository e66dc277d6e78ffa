"""The engine: buckets, flat state buffers, per-tensor tables and backend dispatch.

A bucket is (param group, device, param dtype): one native call per bucket per step, whatever the
number of tensors. Each bucket owns one flat buffer per state slot (in the group's state dtype;
with master weights, one more: the fp32 ``master_param`` of its 16-bit params) and one float32
step counter per tensor; ``optimizer.state[p][slot]`` is a view into the flat buffer (under
torch.optim's slot names, so state_dicts interchange). Buckets are built lazily at the first step
and rebuilt only when the set of params or slots changes (a frozen param gets a grad, amsgrad is
switched on, master_weights or state_dtype change, a state_dict is loaded, ``optimizer.state`` is
written from outside); rebuilding copies the existing state into the new buffers. The host tensor
table of a launch is rebuilt by the native op on every call (one pass over pointers it must read
anyway); the GPU backends keep a device copy and upload it only when an address changes.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from onepass import _ops
from onepass._capturable import DeviceHyper, host_floats, stream_is_capturing
from onepass.algorithms.base import (
    MASTER,
    ZERO_INITIAL_LR,
    check_group_values,
    scalar_slot_dtype,
)

if TYPE_CHECKING:
    from onepass.algorithms.base import AlgorithmSpec, Group
    from onepass.optim.base import FusedOptimizer

#: Elements each tensor's slice of a flat buffer is aligned to: 64 bytes for float32, so every
#: tensor starts on a cache line (and a 16-byte vector boundary for every dtype).
ALIGN_ELEMENTS = 16
BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@functools.cache
def triton_error() -> str | None:
    """Why Triton cannot be used (None when it can); imported only when a backend asks."""
    try:
        import triton  # noqa: F401
    except Exception as error:  # ImportError, or a broken install
        return f"triton could not be imported ({error}); pip install triton"
    return None


# Read once at import: torch.compile cannot trace the dispatcher query (it returns a bool).
_CUDA_KERNELS_BUILT = _ops.native_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "onepass::adam_", "CUDA"
)


def cuda_kernels_built() -> bool:
    """Whether onepass._C registered CUDA kernels (built with a CUDA torch and nvcc)."""
    return _CUDA_KERNELS_BUILT


#: Elementwise algorithms that Triton steps faster than the CUDA kernels when their params or
#: state are stored in 16 bits without fp32 master weights (bench/GPU_RESULTS.md, H200):
#: all-bf16 AdamW at 90-91% of copy in Triton, 61-71% in CUDA (runs 2, 4, 5); fp32 params with
#: bf16 state 85% against 81% (run 5). SGD and Lion share the CUDA kernels' 16-bit load/store
#: path. With fp32 masters CUDA is ahead (92% against 85%, run 5), and in fp32 the two are
#: within 2% on large tensors; NovoGrad and FAdam keep CUDA's reductions.
TRITON_FASTER_16BIT = ("adam", "sgd", "lion")
#: The mean tensor size (elements) below which a bucket's step is bound by the host, where
#: CUDA's launch (~0.1 us a tensor) beat Triton's (2-3 us): on 4,000 tensors of 2,560 the CUDA
#: backend was 29-47x torch fused where Triton was 2.1-3.5x (run 5, lowp). 2^19 is where a 16-bit
#: AdamW tensor's device time in Triton (~3.7 ps an element at 90% of copy) covers 2 us of host.
#: Since run 5 the Triton launcher reads grads and addresses natively (~0.15 us a tensor on the
#: CPU, from 1.3 us): the next GPU run is to measure where the two now cross.
TRITON_MIN_MEAN_NUMEL = 1 << 19


def auto_gpu_backend(
    algorithm: str,
    dtype: torch.dtype | None,
    capturable: bool,
    cuda: bool,
    triton: bool,
    *,
    state_dtype: torch.dtype | None = None,
    master: bool = False,
    mean_numel: float | None = None,
) -> str | None:
    """backend="auto" on a GPU: the faster GPU backend as measured (see TRITON_FASTER_16BIT) of
    those available (``cuda``, ``triton``) for a bucket of ``dtype`` params with ``state_dtype``
    state (None: the params' dtype), fp32 ``master`` weights or not, and tensors of
    ``mean_numel`` elements on average (None: large). CUDA when the step must be capturable
    (the Triton launcher reads the lr on the host). None when neither runs."""
    if cuda and triton and not capturable:
        narrow = dtype in LOW_PRECISION or state_dtype in LOW_PRECISION
        large = mean_numel is None or mean_numel >= TRITON_MIN_MEAN_NUMEL
        faster = narrow and not master and large and algorithm in TRITON_FASTER_16BIT
        return "triton" if faster else "cuda"
    if cuda:
        return "cuda"
    return "triton" if triton else None


def packed_shapes(shapes: list[torch.Size]) -> torch.Tensor:
    """Shapes as _ops.grads_match reads them: each one's number of dims, then its sizes."""
    return torch.tensor([x for shape in shapes for x in (len(shape), *shape)], dtype=torch.int64)


def _mean_numel(params: list[torch.Tensor]) -> float:
    return sum(p.numel() for p in params) / len(params)


def resolve_backend(
    requested: str,
    device: torch.device,
    algorithm: str = "",
    dtype: torch.dtype | None = None,
    capturable: bool = False,
    **layout: Any,
) -> str:
    """The backend that steps ``algorithm``'s ``dtype`` tensors on ``device``; raises if
    ``requested`` cannot. ``layout``: the bucket's state_dtype, master and mean_numel, for
    auto_gpu_backend."""
    if requested == "auto":
        if device.type == "cpu" and _ops.native_available():
            return "cpu"
        if device.type == "cuda":
            interpreted = os.environ.get("TRITON_INTERPRET") == "1"
            triton = not interpreted and triton_error() is None
            chosen = auto_gpu_backend(
                algorithm, dtype, capturable, cuda_kernels_built(), triton, **layout
            )
            if chosen is not None:
                return chosen
        _warn_reference_fallback(device)
        return "reference"
    if requested == "cpu":
        if not _ops.native_available():
            raise RuntimeError(f"onepass: backend='cpu' is not available: {_ops.NATIVE_ERROR}")
        if device.type != "cpu":
            raise RuntimeError(
                f"onepass: backend='cpu' cannot step tensors on {device}; use backend='auto'"
            )
    if requested == "triton":
        error = triton_error()
        if error is not None:
            raise RuntimeError(f"onepass: backend='triton' is not available: {error}")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "onepass: backend='triton' steps CPU tensors only under the Triton interpreter "
                "(set TRITON_INTERPRET=1 before the first step); on CPU use backend='cpu'"
            )
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"onepass: backend='triton' cannot step tensors on {device}")
    if requested == "cuda":
        if not cuda_kernels_built():
            raise RuntimeError(
                "onepass: backend='cuda' is not available: onepass._C was built without CUDA "
                "kernels (needs a CUDA torch and nvcc at build time); use backend='triton' or "
                "'auto'"
            )
        if device.type != "cuda":
            raise RuntimeError(f"onepass: backend='cuda' cannot step tensors on {device}")
    return requested


def _warn_reference_fallback(device: torch.device) -> None:
    """backend="auto" has no kernel for a CPU or CUDA bucket: the step is the reference's, ~10x
    slower, which a user should hear about (once per place: Python's default warning filter).
    Other devices (MPS, XPU) have only the reference, as README says: no warning."""
    if device.type not in ("cpu", "cuda") or torch.compiler.is_compiling():
        return
    if device.type == "cpu":
        why = f"onepass._C is not available ({_ops.NATIVE_ERROR})"
    else:
        triton = triton_error() or "TRITON_INTERPRET=1 keeps Triton off GPU tensors"
        why = f"onepass._C has no CUDA kernels, and {triton}"
    warnings.warn(
        f"onepass: backend='auto' steps {device} tensors with the pure-torch reference "
        f"(correct, much slower): {why}",
        RuntimeWarning,
        stacklevel=2,
    )


LOW_PRECISION = (torch.bfloat16, torch.float16)


def storage_dtypes(
    group: dict[str, Any], dtype: torch.dtype, name: str
) -> tuple[torch.dtype, bool]:
    """The state dtype of ``dtype`` params in ``group`` and whether they keep fp32 master weights.

    master_weights=True gives 16-bit params an fp32 master (other params need none) and, unless
    state_dtype says otherwise, fp32 state; state_dtype=None keeps the state in the params' dtype
    otherwise (torch.optim's choice). Raises for the combinations no kernel is built for.
    """
    master = bool(group.get("master_weights")) and dtype in LOW_PRECISION
    state_dtype = group.get("state_dtype") or (torch.float32 if master else dtype)
    allowed = {
        torch.float64: (torch.float64,),
        torch.float32: (torch.float32, torch.bfloat16),
        torch.bfloat16: (torch.bfloat16, torch.float32),
        torch.float16: (torch.float32,) if master else (torch.float16, torch.float32),
    }[dtype]
    if state_dtype not in allowed:
        raise RuntimeError(
            f"onepass: {name} ({dtype}{' with master weights' if master else ''}) cannot keep "
            f"{state_dtype} state; supported: {', '.join(map(str, allowed))}"
        )
    return state_dtype, master


def grad_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The grad dtypes a bucket of ``dtype`` params takes: its own, and float32 for 16-bit
    params (grads accumulated in fp32)."""
    return (dtype, torch.float32) if dtype in LOW_PRECISION else (dtype,)


class Bucket:
    """The tensors of one (group, device, dtype) and their flat state."""

    def __init__(
        self,
        params: list[torch.Tensor],
        names: list[str],
        slots: tuple[str, ...],
        backend: str,
        scalar_slots: tuple[str, ...] = (),
        per_tensor: bool = False,
        state_dtype: torch.dtype | None = None,
        master: bool = False,
    ) -> None:
        self.params = params
        # The update needs per-tensor reductions (NovoGrad's norm, FAdam's RMS values): never one
        # flat segment for the whole bucket.
        self.per_tensor = per_tensor or bool(scalar_slots)
        self.names = names  # "param_groups[g]['params'][i]", for error messages
        self.slots = (*slots, MASTER) if master else slots
        self.backend = backend
        self.device = params[0].device
        self.dtype = params[0].dtype
        self.state_dtype = self.dtype if state_dtype is None else state_dtype
        self.shapes = [p.shape for p in params]
        self.shape_table = packed_shapes(self.shapes)
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += -(-p.numel() // ALIGN_ELEMENTS) * ALIGN_ELEMENTS
        # The native ops' state_offsets: each param's offset, then the element count its state
        # holds, so that an op refuses a param resized since (p.data = another shape).
        self.state_table = torch.tensor([offsets, [p.numel() for p in params]], dtype=torch.int64)
        self.offsets = self.state_table[0]
        self._offsets = offsets
        self.total = total
        # Per-tensor scalar slots (one element per tensor, indexed like ``step``) live beside the
        # elementwise ones, on the params' device so a GPU reduce kernel can write them.
        self.scalar_slots = tuple(name for name in slots if name in scalar_slots)
        scalar_dtype = scalar_slot_dtype(self.dtype)
        self.buffers = {
            name: torch.zeros(len(params), dtype=scalar_dtype, device=self.device)
            if name in self.scalar_slots
            else torch.zeros(total, dtype=self.state_dtype, device=self.device)
            for name in slots
        }
        if master:
            # The masters start as the params; a loaded checkpoint's masters replace them.
            self.buffers[MASTER] = torch.zeros(total, dtype=torch.float32, device=self.device)
            for i, p in enumerate(params):
                self.slot_views(i)[MASTER].copy_(p.detach())
        # Per-tensor step counts (bias corrections are per tensor: a param whose grad was None
        # did not advance). On the host for the CPU backends; on the params' device for the GPU
        # backends, whose kernels read and advance them there (no host sync).
        step_device = self.device if backend in ("triton", "cuda") else torch.device("cpu")
        self.step = torch.zeros(len(params), dtype=torch.float32, device=step_device)
        # optimizer.state entries of the views that took over existing state (_adopt_state),
        # put there when the plan is committed (_GroupPlan.commit).
        self.adopted: list[tuple[torch.Tensor, dict[str, Any]]] = []
        # Backend-owned launch data (the Triton tensor table), rebuilt when addresses change.
        self.table_cache: dict[str, Any] = {}
        self._lr = torch.zeros((), dtype=torch.float64)
        # A numpy view of it: writing a float there takes no torch op (~20 us on a cold cache)
        self._lr_array = _numpy_view(self._lr)
        # Whether every tensor has taken the same number of steps (the flat path needs it).
        # Tracked on the host, so checking it never syncs with a GPU.
        self.uniform_steps = True
        self.exposed = [False] * len(params)  # does optimizer.state[p] point into this bucket?
        # How many are not yet: the step checks this count, not the list (reading 4,000 flags
        # costs ~18 us a step once a step has streamed its buffers through the caches).
        self.unexposed = len(params)
        self.flat_param: torch.Tensor | None = None
        self.flat_view: FlatBucket | None = None
        self.flat_grad: torch.Tensor | None = None
        self.flat_grad_storage = 0
        self.grad_views: list[torch.Tensor] = []

    def flatten(self) -> None:
        """Moves the params into one flat buffer and gives them flat gradients (``flatten=True``).

        ``p.data`` becomes a view of the bucket's param buffer and ``p.grad`` a view of its grad
        buffer, laid out like the state; autograd accumulates into those views, so while every
        grad is still its view the whole bucket is one segment: one contiguous pass, no
        per-tensor work at all.
        """
        total = self.total
        self.check_flatten()
        # The grads' dtype: the params' own, or the fp32 their grads already have (grad_dtype).
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_dtype = grads[0].dtype if grads else self.dtype
        self.flat_param = torch.zeros(total, dtype=self.dtype, device=self.device)
        self.flat_grad = torch.zeros(total, dtype=grad_dtype, device=self.device)
        for i, p in enumerate(self.params):
            start, n = self._offsets[i], p.numel()
            view = self.flat_param[start : start + n].view(p.shape)
            view.copy_(p.detach())
            p.data = view
            grad_view = self.flat_grad[start : start + n].view(p.shape)
            if p.grad is not None:
                grad_view.copy_(p.grad)
            p.grad = grad_view
            self.grad_views.append(grad_view)
        # The views' TensorImpl addresses, for the native identity check of flat_step (the
        # views are kept alive in grad_views, so no other tensor can take an address).
        self.grad_impls = torch.tensor([v._cdata for v in self.grad_views], dtype=torch.int64)
        # Where every param's storage starts while it is a view of the flat buffer (p.data = ...
        # since makes it a tensor of its own, which the flat pass would no longer update).
        self.flat_storage = self.flat_param.untyped_storage().data_ptr()
        self.flat_grad_storage = self.flat_grad.untyped_storage().data_ptr()
        self.flat_view = FlatBucket(self)

    def check_flatten(self) -> None:
        """The step's checks, before flatten() writes: copying a grad of a dtype the bucket
        refuses into the flat buffer would cast it, and p.data / p.grad would be rebound before
        the refusal."""
        _check_grads(self, [p.grad for p in self.params])
        for name, p in zip(self.names, self.params, strict=True):
            if torch._debug_has_internal_overlap(p) == 1:  # 1: yes (2: too hard to tell)
                raise RuntimeError(
                    f"onepass: {name} has elements that share memory (an expand()ed tensor?): "
                    "torch.optim refuses to update it in place, and flatten=True would copy "
                    "them apart"
                )

    def moved(self) -> bool:
        """Whether its params were cast or moved since it was built (model.to(...): one param
        tells, a single param cannot change alone under the table)."""
        first = self.params[0]
        return first.dtype != self.dtype or first.device != self.device

    def flat_step(self) -> FlatBucket | None:
        """The whole bucket as one segment, if it is flattened, every param and grad is still its
        view and every tensor has taken the same number of steps; else None (the per-tensor
        path)."""
        if self.flat_view is None or not self.uniform_steps or self.per_tensor:
            # Per-tensor reductions need per-tensor segments: one flat segment would reduce the
            # whole bucket into one norm.
            return None
        if torch.compiler.is_compiling():
            # The identity check reads addresses Dynamo cannot trace: a compiled step takes the
            # per-tensor path (the same results; the views are tensors like any other).
            return None
        if not self.views_intact(self.flat_storage):
            return None
        steps = self.flat_view._other_steps_array
        if steps is not None and (steps != self.flat_view._first_step_array).any():
            # A count written in place through optimizer.state[p]["step"] (one param's state
            # reset): per tensor from now on, as for a step some tensors missed. Host counts
            # only: a device count cannot be read without a sync (README, flatten).
            self.uniform_steps = False
            return None
        return self.flat_view

    def views_intact(self, param_storage: int = 0) -> bool:
        """Whether every param's grad is still its view of the flat grad buffer: the same object
        at the same place (``p.grad.data = x`` and model.to(...) keep the object, not its memory)
        and, for a ``param_storage`` other than 0, every param still a view of the flat param
        buffer starting there (no ``p.data = ...``)."""
        return self.flat_grad is not None and _ops.grads_are(
            self.params, self.grad_impls, param_storage, self.flat_grad_storage, self.offsets
        )

    def lr_tensor(self, lr: float | torch.Tensor) -> torch.Tensor:
        """The lr as the one-element tensor the native ops take: the group's own tensor (which
        torch.compile and CUDA graphs read at run time), or a float written into a cached CPU
        scalar."""
        if isinstance(lr, torch.Tensor):
            return lr
        if torch.compiler.is_compiling():
            # A new tensor, not the cached one: AOTAutograd can turn a float lr into a graph
            # input and retrace, and the retraced graph dropped a fill_ of the cached scalar
            # (torch 2.13), so every step after an lr change ran at the old lr.
            return torch.full((), lr, dtype=torch.float64)
        if isinstance(lr, float | int) and self._lr_array is not None:
            self._lr_array[()] = lr
        else:
            self._lr.fill_(lr)
        return self._lr

    def expose(self, state: Any, step_in_state: bool, grads: list[torch.Tensor | None]) -> None:
        """Creates ``optimizer.state[p]`` (views into the bucket) when p first has a grad."""
        for i, g in enumerate(grads):
            if g is None or self.exposed[i]:
                continue
            entry: dict[str, torch.Tensor] = {}
            if step_in_state:
                entry["step"] = self.step[i]
            entry.update(self.slot_views(i))
            if entry:  # torch.optim.SGD without momentum keeps no state at all
                state.put(self.params[i], entry)
            self.mark_exposed(i)

    def mark_exposed(self, i: int) -> None:
        if not self.exposed[i]:
            self.exposed[i] = True
            self.unexposed -= 1

    def slot_views(self, i: int) -> dict[str, torch.Tensor]:
        p, start = self.params[i], self._offsets[i]
        return {
            name: buf[i]
            if name in self.scalar_slots
            else buf[start : start + p.numel()].view(p.shape)
            for name, buf in self.buffers.items()
        }


def _numpy_view(x: torch.Tensor) -> Any:
    """A numpy array sharing a CPU tensor's memory; None for other devices, or without numpy."""
    if x.device.type != "cpu":
        return None
    try:
        return x.numpy()
    except RuntimeError:  # numpy is optional for torch
        return None


class FlatBucket:
    """A flattened bucket seen as one tensor: what a launcher needs, with a single segment."""

    def __init__(self, bucket: Bucket) -> None:
        assert bucket.flat_param is not None and bucket.flat_grad is not None
        self.bucket = bucket
        self.backend = bucket.backend
        self.params = [bucket.flat_param]
        self.grads: list[torch.Tensor | None] = [bucket.flat_grad]
        self.names = ["the flattened params of " + bucket.names[0]]
        self.shapes = [bucket.flat_param.shape]
        self.shape_table = packed_shapes(self.shapes)
        self.dtype, self.device = bucket.dtype, bucket.device
        self.state_dtype = bucket.state_dtype
        self.buffers = bucket.buffers
        self.step = bucket.step[:1]  # every tensor of the bucket has this step count
        self.table_cache = bucket.table_cache
        self.lr_tensor = bucket.lr_tensor
        self.state_table = torch.tensor([[0], [bucket.flat_param.numel()]], dtype=torch.int64)
        self.offsets = self.state_table[0]
        # views for finish(): one fill, not an indexing expression's three ops; numpy views of
        # host steps, whose fill takes no torch op (~30 us less a step on cold caches)
        self._first_step = bucket.step[0]
        self._other_steps = bucket.step[1:]
        self._first_step_array = _numpy_view(self._first_step)
        self._other_steps_array = _numpy_view(self._other_steps)

    def slot_views(self, i: int) -> dict[str, torch.Tensor]:
        return dict(self.buffers)

    def finish(self) -> None:
        """Every tensor advanced with the first (or none did: a skipped AMP step)."""
        if self._other_steps_array is not None and not torch.compiler.is_compiling():
            self._other_steps_array.fill(self._first_step_array)
        else:
            self._other_steps.fill_(self._first_step)


class Engine:
    """Steps the param groups of one optimizer with its spec's launchers."""

    def __init__(self, optimizer: FusedOptimizer, spec: AlgorithmSpec) -> None:
        self.optimizer = optimizer
        self.spec = spec
        self.plans: list[_GroupPlan] = []  # one a param group, built by the first step

    def flat_grads(self) -> tuple[dict[int, torch.Tensor], list[torch.Tensor]]:
        """The grad views of flattened params (by id) and their flat buffers, for buckets whose
        every grad is still its view. Not those of a bucket whose params were moved or cast
        (model.to(...)), or one of whose grads was replaced or given other memory
        (``p.grad.data = x``): zero_grad then zeroes each of its grads itself."""
        views: dict[int, torch.Tensor] = {}
        buffers: list[torch.Tensor] = []
        for plan in self.plans:
            for bucket in plan.buckets:
                if bucket.flat_grad is None or bucket.moved():
                    continue
                # (A trace cannot read the addresses: it takes the views as they were given.)
                if torch.compiler.is_compiling() or bucket.views_intact():
                    buffers.append(bucket.flat_grad)
                    pairs = zip(bucket.params, bucket.grad_views, strict=True)
                    views.update((id(p), v) for p, v in pairs)
        return views, buffers

    def flat_grad_buffers(self) -> list[torch.Tensor] | None:
        """The flat grad buffers holding every grad of the optimizer, when each group's plan is
        current and flattened and every grad is still its view of them (a param outside the
        buckets then has no grad: its plan would be stale); else None. A global grad norm over
        them reads a few buffers instead of thousands of tensors (the padding is zero)."""
        groups = self.optimizer.param_groups
        if self.optimizer.state.dirty or len(self.plans) != len(groups):
            return None
        buffers: list[torch.Tensor] = []
        for plan, group in zip(self.plans, groups, strict=True):
            slots = self.spec.for_group(group).active_slots(group)
            if plan.stale(group, slots):
                return None
            for bucket in plan.buckets:
                if bucket.flat_grad is None or not bucket.views_intact():
                    return None
                buffers.append(bucket.flat_grad)
        return buffers

    def invalidate(self) -> None:
        """Forget every bucket; the next step rebuilds them from ``optimizer.state``."""
        self.plans = []

    def unstepped(self) -> set[int]:
        """ids of the params whose state exists but which have not taken a step (their first
        step was skipped by a GradScaler: the state is exposed when the grad arrives, without
        a sync to learn whether the step ran), in groups whose algorithm keeps no step count in
        its state (SGD, Lion, Muon's matrices). Loaded back, their buffers would read as
        stepped (a momentum buffer means it has stepped: SGD would damp a zero buffer instead
        of starting it from the grad), so they are saved without state, as torch.optim's
        classes keep none for them. Reads the step counts (a device sync on a GPU)."""
        ids: set[int] = set()
        if self.optimizer.state.dirty:  # written since the last step: the counts are stale
            return ids
        for plan, group in zip(self.plans, self.optimizer.param_groups, strict=False):
            if self.spec.for_group(group).step_in_state:
                continue
            for bucket in plan.buckets:
                counts = bucket.step.tolist()
                ids.update(id(p) for p, n in zip(bucket.params, counts, strict=True) if n == 0)
        return ids

    # -- building ---------------------------------------------------------------------------

    def _plan(self, index: int, group: dict[str, Any]) -> _GroupPlan:
        """The group's plan: the current one, or a new one (which the caller stores)."""
        plan = self.plans[index] if index < len(self.plans) else None
        slots = self.spec.for_group(group).active_slots(group)
        if plan is None or plan.stale(group, slots):
            if stream_is_capturing():
                raise RuntimeError(
                    "onepass: the optimizer builds its buffers at a group's first step (and after "
                    "a state_dict load or a change of params); take one step outside the CUDA "
                    "graph capture first"
                )
            plan = _GroupPlan(self, index, group, slots)
        return plan

    # -- stepping -----------------------------------------------------------------------------

    def step(self, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
        if torch.compiler.is_compiling():
            self.optimizer._trace_record["since_eager"] = True
        else:
            self.optimizer.settle_capturable()
        state = self.optimizer.state
        if state.dirty:  # written from outside: rebuild the buckets from what it holds now
            self.invalidate()
            state.dirty = False
        groups = self.optimizer.param_groups
        compiling = torch.compiler.is_compiling()
        if not compiling and getattr(self.optimizer, "capture_needs_capturable", False):
            _check_capture(groups, type(self.optimizer).__name__)
        for index, param_group in enumerate(groups):  # values no launch could take whole
            check = self.spec.for_group(param_group).check_step
            try:
                check_group_values(param_group, self.optimizer.checked_keys)
                _check_independent_decay(param_group)
                # A capturable group's launches read its device block (tensors) instead.
                if compiling and not self.optimizer.defaults.get("capturable"):
                    _check_compiled_values(param_group, self.optimizer.defaults)
                if check is not None:
                    check(param_group)
            except (TypeError, ValueError) as error:
                # `!s`, not a plain {error}: Dynamo (torch 2.11) formats only a str of the
                # exception into a compiled step's message.
                message = str(error).removeprefix("onepass: ")
                raise type(error)(f"onepass: param_groups[{index}]: {message}") from None
        # Every group's plan first, stored only once all are built: a group that cannot be
        # (a refused state_dtype, say) leaves the others' buckets as they were.
        plans = [self._plan(index, group) for index, group in enumerate(groups)]
        if any(plan.pending() for plan in plans):
            # This step rewrites optimizer.state (state taken over by new buckets) or moves
            # params into flat buffers: every bucket's grads and lr are checked first, so that
            # a refusal in a later group leaves both as they were. A refused step keeps none of
            # the new plans: the retry builds them again from what then holds (the state as the
            # user may have written it since, the params that then have grads) and under the
            # checks of a first step (not inside a CUDA graph capture or torch.compile).
            for plan, param_group in zip(plans, groups, strict=True):
                launch_group = plan.launch_group(param_group)
                for planned in plan.buckets:
                    _check_grads(planned, _grads_of(planned))
                    _check_native_lr(launch_group, planned)
                for planned in plan.to_flatten:
                    planned.check_flatten()
        self.plans = plans
        for plan in plans:
            plan.commit(state)
        work: list[tuple[Group, Bucket | FlatBucket, list[torch.Tensor | None] | None]]
        work = []
        for plan, param_group in zip(plans, groups, strict=True):
            launch_group = plan.launch_group(param_group)
            for planned in plan.buckets:
                flat = planned.flat_step()
                grads = None if flat is None else flat.grads
                work.append((launch_group, planned if flat is None else flat, grads))
        # Everything is checked before anything is written: a refused step changes nothing. The
        # first launch, if it is one native op, checks its own arguments before it writes (and
        # we name the culprit if it refuses); every later one, and the reference / Triton
        # backends, are checked here first. A native op reads the grads itself (grads=None: no
        # Python list of every p.grad, which costs ~0.5 ms a step on 4,000 params) where it
        # checks them itself, or where the native check here (reading them too) has passed.
        native = all(bucket.backend in ("cpu", "cuda") for _, bucket, _ in work)
        for i, (group, bucket, grads) in enumerate(work):
            # Only an algorithm whose native launch is one op checks itself before writing
            # (Muon's momentum pass writes before its update pass reads the params).
            one_op = native and self.spec.for_group(group).native_grads
            if grads is None and one_op and not compiling and (i == 0 or _native_check(bucket)):
                continue
            if grads is None:
                grads = _grads_of(bucket)
                work[i] = (group, bucket, grads)
            if i > 0 or not one_op:
                _check_grads(bucket, grads)
        for group, bucket, _ in work[1:]:  # a native op checks its lr when its turn comes
            _check_native_lr(group, bucket)
        for group, bucket, grads in work:
            spec = self.spec.for_group(group)
            launch: Callable[..., None] = spec.launchers[bucket.backend]
            try:
                launch(
                    bucket,
                    grads,
                    group,
                    _on_device(grad_scale, bucket.device),
                    _on_device(found_inf, bucket.device),
                )
            except RuntimeError:
                if bucket.backend in ("cpu", "cuda"):  # raises with the param's name
                    named = _grads_of(bucket) if grads is None else grads
                    _check_grads(bucket, named)
                raise
            if isinstance(bucket, FlatBucket):
                bucket.finish()
                # Every grad was its view of the flat buffer (flat_step checked): read them again
                # only if some param's state is still to expose (a copy of the 4,000 views' list
                # touches every view, ~40 us a step on cold caches).
                bucket, grads = bucket.bucket, None
            elif bucket.flat_param is not None and not bucket.per_tensor:
                # (per-tensor algorithms never take the flat path: no need to track it)
                grads = _grads_of(bucket) if grads is None else grads
                if any(g is None for g in grads):
                    bucket.uniform_steps = False  # the tensors without a grad did not advance
            if bucket.unexposed:
                grads = _grads_of(bucket) if grads is None else grads
                bucket.expose(self.optimizer.state, spec.step_in_state, grads)


def _check_capture(groups: list[dict[str, Any]], name: str) -> None:
    """Refuses a step that a CUDA graph is capturing unless every group is capturable, as
    torch.optim's Adam and AdamW do: the launches of the others read their lr and betas on the
    host, so every replay would step with the values of the capture, whatever a scheduler sets
    later. (torch.optim.SGD has no capturable and is captured as it is: so are onepass's SGD and
    the classes torch.optim lacks.)"""
    uncapturable = [i for i, group in enumerate(groups) if not group.get("capturable")]
    if uncapturable and stream_is_capturing():
        raise RuntimeError(
            f"onepass: a CUDA graph is capturing {name}.step(), but "
            f"param_groups[{uncapturable[0]}] has capturable=False (torch.optim.{name} refuses "
            f"this too: replays would keep the lr and betas of the capture); construct it with "
            f"capturable=True (CUDA params, backend 'cuda')"
        )


def _check_independent_decay(group: Group) -> None:
    """decay="independent" scales the decay by lr / initial_lr: an initial_lr of 0 (a group
    built at lr = 0 for a warm-up) leaves it undefined unless there is no decay."""
    if group.get("decay") != "independent":
        return
    initial_lr, weight_decay = group.get("initial_lr"), group.get("weight_decay", 0.0)
    if (
        isinstance(initial_lr, float | int)
        and initial_lr == 0
        and not (isinstance(weight_decay, float | int) and weight_decay == 0)
    ):
        raise ValueError(ZERO_INITIAL_LR)


def _check_compiled_values(group: Group, defaults: dict[str, Any]) -> None:
    """A compiled step passes a group's hyperparameters to its ops as floats; only the lr
    reaches them as a tensor. A tensor elsewhere (betas, eps, weight_decay, ...) would be read
    with .item(), a value the trace cannot know: refused with its name, not a trace error."""
    keys = [key for key in defaults if key not in ("params", "lr")]
    if group.get("decay") == "independent":
        keys.append("initial_lr")
    for key in keys:
        value = group.get(key)
        values = value if isinstance(value, tuple | list) else (value,)
        if any(isinstance(v, torch.Tensor) for v in values):
            raise TypeError(
                f"{key!r} holds a tensor, which a compiled step cannot pass to its kernels (they "
                "take it as a float; under torch.compile only 'lr' may be a tensor): give it as "
                "a float"
            )


def _grads_of(bucket: Bucket | FlatBucket) -> list[torch.Tensor | None]:
    return [p.grad for p in bucket.params]


class _GroupPlan:
    """The buckets of one param group, and the params left out of them (frozen, no state)."""

    def __init__(
        self, engine: Engine, index: int, group: dict[str, Any], slots: tuple[str, ...]
    ) -> None:
        spec = engine.spec.for_group(group)
        self.params = list(group["params"])
        self.slots = slots
        self.backend_request = group["backend"]
        self.flatten = bool(group.get("flatten", False))
        self.storage = _storage_keys(group)
        # Dynamo shows every group of a compiled optimizer as capturable: only eager steps tell.
        compiling = torch.compiler.is_compiling()
        self.capturable = bool(group.get("capturable")) and not compiling
        self.hyper: DeviceHyper | None = None
        if not self.capturable and not compiling:  # switched off: block views become floats
            for key in spec.device_hyper:
                if key in group:
                    group[key] = host_floats(group[key])
        state = engine.optimizer.state
        keyed: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
        self.outside: list[torch.Tensor] = []
        flatten = self.flatten
        for j, p in enumerate(self.params):
            name = f"param_groups[{index}]['params'][{j}]"
            # Flattened buckets hold only params that have a grad (they keep one from then on);
            # a param that gets its first grad later rebuilds the plan.
            wanted = p.grad is not None if flatten else p.requires_grad or p.grad is not None
            if not (wanted or (p in state and not flatten)):
                self.outside.append(p)
                continue
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"onepass: {name} has dtype {p.dtype}; supported: float32/64, bfloat16, float16"
                )
            if spec.check_param is not None:
                spec.check_param(p, name)
            members = keyed.setdefault((p.device, p.dtype), ([], []))
            members[0].append(p)
            members[1].append(name)
        self.buckets: list[Bucket] = []
        self.to_flatten: list[Bucket] = []
        for (device, dtype), (params, names) in keyed.items():
            state_dtype, master = storage_dtypes(group, dtype, names[0])
            try:
                backend = resolve_backend(
                    group["backend"],
                    device,
                    spec.name,
                    dtype,
                    # Dynamo shows every group of a compiled optimizer as capturable: compiled
                    # steps get the CUDA kernels too (custom ops that read the lr on the device).
                    bool(group.get("capturable")),
                    state_dtype=state_dtype,
                    master=master,
                    mean_numel=_mean_numel(params) if device.type == "cuda" else None,
                )
            except RuntimeError as error:  # named: which param is on the device it refuses
                message = str(error).removeprefix("onepass: ")
                raise RuntimeError(f"onepass: {names[0]}: {message}") from None
            if backend not in spec.launchers:
                # An algorithm that some backend does not implement yet: "auto" falls back to
                # the reference (correct everywhere, just slower); an explicit request fails.
                if group["backend"] != "auto":
                    raise RuntimeError(
                        f"onepass: backend={backend!r} is not implemented for "
                        f"{spec.name}; use backend='auto' or 'reference'"
                    )
                backend = "reference"
            if group.get("capturable"):
                user_capturable = bool(engine.optimizer.defaults.get("capturable"))
                self._make_capturable(spec, group, names[0], device, backend, user_capturable)
            bucket = Bucket(
                params,
                names,
                slots,
                backend,
                spec.scalar_slots,
                per_tensor=spec.reduction == "per_tensor",
                state_dtype=state_dtype,
                master=master,
            )
            _adopt_state(engine, bucket, spec)
            if flatten:
                if compiling:  # before anything is written: the step changes nothing
                    raise RuntimeError(
                        f"onepass: param_groups[{index}] has flatten=True and builds its flat "
                        "buffer at this step (its first step, a param's first grad, a new state "
                        "slot such as amsgrad's, a state_dict load), which moves the params and "
                        "runs only eagerly: take this step outside torch.compile"
                    )
                self.to_flatten.append(bucket)  # at commit, once every group's grads passed
            self.buckets.append(bucket)

    def _make_capturable(
        self,
        spec: AlgorithmSpec,
        group: dict[str, Any],
        name: str,
        device: torch.device,
        backend: str,
        user_capturable: bool,
    ) -> None:
        """capturable=True: a step can be captured in a CUDA graph and replayed. Everything a
        step reads then lives on the device: steps and AMP scalars (always, on GPU backends), and
        the group's lr, betas, eps and weight decay, which move into a device block here
        (onepass._capturable), so that in-place updates (an LR scheduler's) reach replays.

        Dynamo shows every group of a compiled optimizer as capturable: a compiled step refuses
        only what the user asked for (the constructor's capturable=True), as an eager step
        does, on the CPU and on a GPU backend other than CUDA (an explicit "triton")."""
        traced_only = torch.compiler.is_compiling() and not user_capturable
        if traced_only and (device.type == "cpu" or backend != "cuda"):
            return
        if backend != "cuda":
            raise RuntimeError(
                f"onepass: capturable=True needs CUDA params on backend 'cuda'; {name} is on "
                f"{device} with backend {backend!r}"
            )
        if torch.compiler.is_compiling():  # compiled steps read the lr tensor (no block)
            lr = group["lr"]
            if not isinstance(lr, torch.Tensor) or lr.device != device:
                group["lr"] = torch.as_tensor(lr, dtype=torch.float64).to(device)
            return
        if self.hyper is not None:
            if self.hyper.block.device != device:
                raise RuntimeError(
                    f"onepass: a capturable group's params must share one device; {name} is on "
                    f"{device}, an earlier param on {self.hyper.block.device}"
                )
            return
        self.hyper = DeviceHyper(spec, group, device)

    def pending(self) -> bool:
        """Whether commit() has work left: state to point at the buckets, params to flatten."""
        return bool(self.to_flatten) or any(bucket.adopted for bucket in self.buckets)

    def commit(self, state: Any) -> None:
        """Points ``optimizer.state`` at the buckets' views of the state they took over, and
        moves the params of new ``flatten=True`` buckets into their flat buffers."""
        for bucket in self.buckets:
            for p, entry in bucket.adopted:
                state.put(p, entry)
            bucket.adopted.clear()
        for bucket in self.to_flatten:
            bucket.flatten()
        self.to_flatten.clear()

    def launch_group(self, group: dict[str, Any]) -> Group:
        """The group as this step's launchers read it (a capturable group's device block)."""
        return group if self.hyper is None else self.hyper.launch_group(group)

    def stale(self, group: dict[str, Any], slots: tuple[str, ...]) -> bool:
        return (
            slots != self.slots
            or group["backend"] != self.backend_request
            or bool(group.get("flatten", False)) != self.flatten
            or (
                not torch.compiler.is_compiling()
                and bool(group.get("capturable")) != self.capturable
            )
            or _storage_keys(group) != self.storage
            or any(b.moved() for b in self.buckets)  # model.to(dtype / device)
            # a param replaced in the list (same length included): the new one needs a bucket
            or not _ops.same_objects(group["params"], self.params)
            or any(p.grad is not None for p in self.outside)
        )


def _storage_keys(group: dict[str, Any]) -> tuple[Any, Any]:
    """How a group stores its state: a change rebuilds its buckets at the next step."""
    return bool(group.get("master_weights")), group.get("state_dtype")


def _on_device(value: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """An AMP scalar on the bucket's device. A clip's norm where no param has a grad is a CPU
    zero, which the CUDA ops would refuse. A copy to a GPU is queued; one to the CPU waits for
    the value (a CPU op reads it at once: non_blocking would hand it memory still being
    written)."""
    if value is None or value.device == device:
        return value
    return value.to(device, non_blocking=device.type != "cpu")


def _adopt_state(engine: Engine, bucket: Bucket, spec: AlgorithmSpec) -> None:
    """Copies existing ``optimizer.state`` (loaded, or from an older bucket) into the bucket."""
    state = engine.optimizer.state
    for i, p in enumerate(bucket.params):
        entry = state.get(p)
        if not entry:
            continue
        views = bucket.slot_views(i)
        for name, view in views.items():
            value = entry.get(name)
            if isinstance(value, torch.Tensor):
                view.copy_(value.reshape(view.shape))
        if "step" in entry:
            bucket.step[i] = float(entry["step"])
        else:
            # No step in this algorithm's state (SGD, Lion, Muon's matrices): a slot means it
            # has stepped (Engine.unstepped saves none for a param that has not).
            stepped = any(isinstance(entry.get(slot), torch.Tensor) for slot in spec.slots)
            bucket.step[i] = 1.0 if stepped else 0.0
        new_entry: dict[str, Any] = {}
        if spec.step_in_state:
            new_entry["step"] = bucket.step[i]
        new_entry.update(views)
        # What the bucket does not step stays, as torch.optim keeps it: a momentum buffer while
        # momentum is 0 (it resumes from it), max_exp_avg_sq while amsgrad is off, user keys.
        # Not an fp32 master once master weights are off: the param moves on without it.
        for key, value in entry.items():
            if key != MASTER:
                new_entry.setdefault(key, value)
        bucket.adopted.append((p, new_entry))  # into optimizer.state at commit()
        bucket.mark_exposed(i)
    if len(bucket.params) > 1:
        bucket.uniform_steps = bool((bucket.step == bucket.step[0]).all())


def _native_check(
    bucket: Bucket | FlatBucket, grads: list[torch.Tensor | None] | None = None
) -> bool:
    """The engine's grad check, natively: _ops.grads_match over ``grads`` (None: each param's
    own .grad), and the first grad's dtype one the bucket takes. False where it is not built or
    refuses: _check_grads's Python loop then names the culprit."""
    if not _ops.grads_match(bucket.params, grads, bucket.shape_table):
        return False
    present = (p.grad for p in bucket.params) if grads is None else iter(grads)
    first = next((g for g in present if g is not None), None)
    return first is None or first.dtype in grad_dtypes(bucket.dtype)


def _check_grads(bucket: Bucket | FlatBucket, grads: list[torch.Tensor | None]) -> None:
    if _native_check(bucket, grads):
        return
    dtype = next((g.dtype for g in grads if g is not None), bucket.dtype)  # one per launch
    device, shapes = bucket.device, bucket.shapes
    for i, g in enumerate(grads):
        if g is None:
            continue
        p = bucket.params[i]
        if p.dtype != bucket.dtype or p.device != device or p.shape != shapes[i]:
            # params[0] tells a model.to(...) (the bucket is rebuilt); one param alone cannot
            # change its storage under the bucket's table and state.
            raise RuntimeError(
                f"onepass: {bucket.names[i]} is now {p.dtype} of shape {tuple(p.shape)} on "
                f"{p.device}, but its bucket steps it as {bucket.dtype} of shape "
                f"{tuple(shapes[i])} on {device}; move or cast every param of the group "
                "together, or give it its own param group"
            )
        if (
            g.dtype != dtype
            or g.layout != torch.strided
            or g.shape != shapes[i]
            or (g.device != device)
        ):
            _explain_bad_grad(bucket, i, g, dtype)
    if dtype not in grad_dtypes(bucket.dtype):
        i, g = next((i, g) for i, g in enumerate(grads) if g is not None)
        _explain_bad_grad(bucket, i, g, dtype)
    if bucket.backend != "reference" and not torch.compiler.is_compiling():
        _check_native_data(bucket, grads)  # (a traced step has no data to check)


def _check_native_lr(group: Group, bucket: Bucket | FlatBucket) -> None:
    """The lr as the native ops take it (ops.cpp read_lr, ops_cuda.cpp step_state): one
    floating-point element, on the CPU (or, for CUDA, float32/float64 on the params' device).
    A capturable group's device block is the engine's own."""
    lr = group["lr"]
    if bucket.backend not in ("cpu", "cuda") or not isinstance(lr, torch.Tensor):
        return
    if bucket.backend == "cpu":
        ok = lr.numel() == 1 and lr.device.type == "cpu" and lr.is_floating_point()
    elif lr.numel() > 1:  # a capturable group's float64 block (launch_group)
        ok = lr.dim() == 1 and lr.dtype == torch.float64 and lr.device == bucket.device
    else:
        ok = (
            lr.numel() == 1
            and lr.dtype in (torch.float32, torch.float64)
            and lr.device in (torch.device("cpu"), bucket.device)
        )
    if not ok:
        raise RuntimeError(
            f"onepass: the lr of the param group of {bucket.names[0]} is a {lr.dtype} tensor of "
            f"shape {tuple(lr.shape)} on {lr.device}; backend {bucket.backend!r} takes a float "
            "or a one-element floating-point tensor on the CPU"
            + (f" or on {bucket.device}" if bucket.backend == "cuda" else "")
        )


def _check_native_data(bucket: Bucket | FlatBucket, grads: list[torch.Tensor | None]) -> None:
    """The kernels update memory: a tensor subclass without storage (a wrapper) has none, and a
    freed storage (resized to 0 bytes, as FSDP frees a param's) no longer holds the tensor."""
    for i, g in enumerate(grads):
        if g is None:
            continue
        for what, t in (("", bucket.params[i]), ("'s grad", g)):
            if t.numel() and not _has_memory(t):
                raise RuntimeError(
                    f"onepass: {bucket.names[i]}{what} is a {type(t).__name__} without storage "
                    f"(or with a freed one), which backend {bucket.backend!r} does not support"
                )


def _has_memory(t: torch.Tensor) -> bool:
    """glue::has_memory (csrc/glue.h) in Python: every element inside its storage's bytes."""
    if t.data_ptr() == 0:
        return False
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return (last + 1) * t.element_size() <= t.untyped_storage().nbytes()


def _explain_bad_grad(
    bucket: Bucket | FlatBucket, i: int, g: torch.Tensor, grad_dtype: torch.dtype
) -> None:
    name = bucket.names[i]
    if g.layout != torch.strided:
        raise RuntimeError(f"onepass: {name} has a sparse gradient, which onepass does not support")
    if g.device != bucket.device:
        raise RuntimeError(f"onepass: {name} is on {bucket.device} but its grad is on {g.device}")
    if g.dtype not in grad_dtypes(bucket.dtype):
        allowed = " or ".join(map(str, grad_dtypes(bucket.dtype)))
        raise RuntimeError(
            f"onepass: {name} has dtype {bucket.dtype} but its grad has {g.dtype} (takes {allowed})"
        )
    if g.dtype != grad_dtype:
        raise RuntimeError(
            f"onepass: {name}'s grad has dtype {g.dtype} but other grads of its bucket have "
            f"{grad_dtype} (one grad dtype per param group and param dtype)"
        )
    raise RuntimeError(
        f"onepass: {name} has shape {tuple(bucket.shapes[i])} but its grad has {tuple(g.shape)}"
    )
