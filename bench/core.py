"""Shape lists, candidates, memory planning and the interleaved timing loop."""

from __future__ import annotations

import gc
import importlib
import json
import math
import time
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch

import onepass
from onepass.algorithms.base import state_itemsize
from onepass.algorithms.muon import CPU_HAS_BF16_MATMUL

SHAPES_DIR = Path(__file__).parent / "shapes"

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]

#: The torch.optim implementations every onepass backend is compared with.
TORCH_MODES: Mapping[str, Mapping[str, bool]] = {
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "forloop": {"foreach": False},
}
#: The candidate that speedups are relative to.
BASELINE = "torch fused"
#: Left out, in this order, when a group does not fit in memory with every candidate.
# Left out, in this order, when a group does not fit (llama on an 80 GB GPU): the peers nobody
# picks for speed, then the flatten variants (the per-tensor path is the headline number).
DROP_WHEN_SHORT = (
    "torch forloop",
    "onepass reference",
    "torch foreach",
    "onepass triton flatten",
    "onepass cuda flatten",
)
ROOFLINE_COPY = "copy"
ROOFLINE_SCALE = "scale"


@dataclass(frozen=True)
class ShapeList:
    name: str
    description: str
    numel: int
    tensors: int
    shapes: tuple[tuple[int, ...], ...]


def shape_list_names() -> list[str]:
    return sorted(path.stem for path in SHAPES_DIR.glob("*.json"))


def load_shape_list(name: str) -> ShapeList:
    data = json.loads((SHAPES_DIR / f"{name}.json").read_text())
    shapes = tuple(tuple(int(d) for d in s) for s in data["shapes"])
    numel = sum(torch.Size(s).numel() for s in shapes)
    if numel != data["numel"] or len(shapes) != data["tensors"]:
        raise ValueError(f"{name}.json: numel/tensors do not match its shapes")
    return ShapeList(data["name"], data["description"], numel, len(shapes), shapes)


Stepper = Callable[[torch.optim.Optimizer, list[torch.Tensor]], Callable[[], object]]

#: The clip of the full-step rows: big enough that gradient noise of unit variance clips.
MAX_GRAD_NORM = 1.0


def _amp_scaler(
    params: list[torch.Tensor], cls: type[torch.amp.GradScaler] = torch.amp.GradScaler
) -> torch.amp.GradScaler:
    """A GradScaler held at scale 1 (growth never due): unscale_ then divides by 1 in every
    timed round, the same work, and the grads stay as they are."""
    device = params[0].device.type
    return cls(device, init_scale=1.0, growth_interval=1 << 30)


def fused_full_step(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> Callable[[], None]:
    """onepass: onepass.GradScaler's step of an opt with max_grad_norm: the norm's read of the
    grads (found_inf comes from it), then unscale, clip and step in one pass."""
    scaler = _amp_scaler(params, onepass.GradScaler)
    one = torch.ones((), device=params[0].device)

    def step() -> None:
        scaler.scale(one)
        scaler.step(opt)
        scaler.update()

    return step


def composed_full_step(
    opt: torch.optim.Optimizer, params: list[torch.Tensor]
) -> Callable[[], None]:
    """What users write today: scaler.unscale_, clip_grad_norm_(foreach), scaler.step."""
    scaler = _amp_scaler(params)
    one = torch.ones((), device=params[0].device)

    def step() -> None:
        scaler.scale(one)
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM, foreach=True)
        scaler.step(opt)
        scaler.update()

    return step


class Steppable(Protocol):
    """What the bench times: an optimizer, or a composition of torch calls around one."""

    def step(self) -> object: ...


class MasterWeightsComposition:
    """What users write today for bf16 params with fp32 master weights (torch's fused AdamW
    needs one dtype for params, grads and state): copy the bf16 grads into the fp32 masters'
    grads, step the masters with torch.optim, copy the masters back into the bf16 params.
    The copies are foreach copies, one launch per list."""

    def __init__(
        self, params: list[torch.Tensor], torch_cls: Callable[..., Any], **hyper: Any
    ) -> None:
        self.params = params
        self.masters = [p.detach().float().requires_grad_() for p in params]
        self.optimizer = torch_cls(self.masters, **hyper)

    @torch.no_grad()
    def step(self) -> None:
        stepped: list[tuple[torch.Tensor, torch.Tensor]] = []
        master_grads: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for p, m in zip(self.params, self.masters, strict=True):
            if p.grad is None:
                m.grad = None  # torch.optim skips the master, as the param has no grad
                continue
            if m.grad is None:
                m.grad = torch.empty_like(m)
            stepped.append((p, m))
            master_grads.append(m.grad)
            grads.append(p.grad)
        torch._foreach_copy_(master_grads, grads)
        self.optimizer.step()
        torch._foreach_copy_([p for p, _ in stepped], [m for _, m in stepped])


@dataclass(frozen=True)
class Algorithm:
    """One algorithm as both libraries spell it, with the hyperparameters of the bench."""

    label: str
    onepass_cls: Callable[..., onepass.FusedOptimizer]
    torch_cls: Callable[..., Steppable]
    hyper: Mapping[str, Any] = field(default_factory=dict)
    #: torch's implementations to time (a class without fused / foreach: {"plain": {}})
    torch_modes: Mapping[str, Mapping[str, bool]] = field(default_factory=lambda: TORCH_MODES)
    #: the candidate speedups are relative to
    baseline: str = "torch fused"
    #: the shape lists it runs on by default (None: the run's)
    shapes: tuple[str, ...] | None = None
    #: its default shape lists on a CPU without native bf16 matmuls, where a peer's bf16
    #: matmuls are emulated (None: ``shapes``)
    shapes_without_bf16_matmul: tuple[str, ...] | None = None
    #: whether to time flatten=True too (pointless where the step is per tensor anyway)
    flatten_variant: bool = True
    #: more onepass candidates per backend: (name suffix, extra hyperparameters)
    variants: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    #: the implementations a user would pick instead: (candidate name, "module:Class", its
    #: hyperparameters), imported when timed (installed by `make install`; skipped if absent)
    peers: tuple[tuple[str, str, Mapping[str, Any]], ...] = ()
    #: what one timed call does with each optimizer (None: ``optimizer.step``): (onepass's,
    #: torch's), each given the optimizer and its params
    steppers: tuple[Stepper, Stepper] | None = None
    #: bytes per element beyond the update pass's (the reads of a gradient norm, say)
    extra_bytes_per_element: int = 0
    #: where torch's class stands in for another algorithm (NovoGrad, FAdam) or keeps other
    #: state (fp32 moments): the param-sized arrays its step reads + writes, in the params'
    #: dtype; its GB/s and share of the roofline count these, not the spec's bytes
    torch_arrays_moved: int | None = None
    #: param-sized arrays a later pass reads again (NovoGrad's grad; FAdam's grad twice, param
    #: and F): counted by the spec's bytes model, but read from cache where the CPU kernels run
    #: a tensor's passes back to back (every tensor one chunk, CPU_CHUNK_ELEMENTS)
    rereads_in_cache: int = 0
    #: the params' dtype of this row whatever the run's --dtype (master weights: bfloat16)
    dtype: torch.dtype | None = None

    def own_shapes(self, device: torch.device) -> tuple[str, ...] | None:
        """The shape lists it runs on unless --shapes names others (None: the run's)."""
        if device.type == "cpu" and not CPU_HAS_BF16_MATMUL and self.shapes_without_bf16_matmul:
            return self.shapes_without_bf16_matmul
        return self.shapes


# lr is small so that thousands of steps on fixed random grads stay finite.
ALGORITHMS: Mapping[str, Algorithm] = {
    "adamw": Algorithm("AdamW", onepass.AdamW, torch.optim.AdamW, {"lr": 1e-4}),
    "sgd": Algorithm(
        "SGD momentum=0.9", onepass.SGD, torch.optim.SGD, {"lr": 1e-4, "momentum": 0.9}
    ),
    # SGDW has no torch.optim twin: its peer is SGD with the same momentum and (L2) decay, the
    # same memory traffic; the params differ by design (max abs dp is not a check here).
    "sgdw": Algorithm(
        "SGDW momentum=0.9 wd=0.01",
        onepass.SGDW,
        torch.optim.SGD,
        {"lr": 1e-4, "momentum": 0.9, "weight_decay": 1e-2},
    ),
    # Lion has no torch.optim twin either: its peer is SGD with momentum (fixed here, Lion takes
    # no such argument), the same traffic: param, grad and one state slot read; param and the
    # slot written. The params differ by design (max abs dp is not a check here).
    "lion": Algorithm(
        "Lion wd=0.1 (peer: lion-pytorch)",
        onepass.Lion,
        partial(torch.optim.SGD, momentum=0.9),
        {"lr": 1e-4, "weight_decay": 0.1},
        baseline="lion-pytorch",
        peers=(
            (
                "lion-pytorch",
                "lion_pytorch:Lion",
                {"lr": 1e-4, "weight_decay": 0.1, "decoupled_weight_decay": False},
            ),
        ),
    ),
    # NovoGrad's peer is also SGD with momentum: the same elementwise traffic plus NovoGrad's
    # second read of the grad (its per-tensor norm pass), which the spec's bytes model counts.
    "novograd": Algorithm(
        "NovoGrad wd=0.1 (peer: pytorch-optimizer)",
        onepass.NovoGrad,
        partial(torch.optim.SGD, momentum=0.9),
        {"lr": 1e-4, "weight_decay": 0.1},
        baseline="pytorch-optimizer",
        peers=(
            ("pytorch-optimizer", "pytorch_optimizer:NovoGrad", {"lr": 1e-4, "weight_decay": 0.1}),
        ),
        torch_arrays_moved=5,  # SGD with momentum: p, g, buf read; p, buf written
        rereads_in_cache=1,  # the grad, by the update pass
    ),
    # FAdam keeps Adam's two param-sized slots; its peer is torch Adam (FAdam has no torch
    # class). It reads the grad three times and param / F twice (three passes: the bytes model).
    "fadam": Algorithm(
        "FAdam wd=0.1 (peer: pytorch-optimizer)",
        onepass.FAdam,
        torch.optim.Adam,
        {"lr": 1e-4, "weight_decay": 0.1},
        baseline="pytorch-optimizer",
        peers=(
            ("pytorch-optimizer", "pytorch_optimizer:FAdam", {"lr": 1e-4, "weight_decay": 0.1}),
        ),
        torch_arrays_moved=7,  # Adam: p, g, m, v read; p, m, v written
        rereads_in_cache=4,  # the grad by passes 2 and 3, param and F by pass 3
    ),
    # The full step of AMP training: GradScaler unscale + global-norm clip + AdamW.
    "adamw-clip": Algorithm(
        f"AdamW + GradScaler + clip {MAX_GRAD_NORM}",
        partial(onepass.AdamW, max_grad_norm=MAX_GRAD_NORM),
        torch.optim.AdamW,
        {"lr": 1e-4},
        steppers=(fused_full_step, composed_full_step),
        extra_bytes_per_element=4,  # the norm's read of the grads
    ),
    # bf16 params with fp32 master weights and fp32 state, against the composition users
    # write today around torch's fused AdamW (MasterWeightsComposition).
    "adamw-master": Algorithm(
        "AdamW bf16 params + fp32 master",
        partial(onepass.AdamW, master_weights=True),
        partial(MasterWeightsComposition, torch_cls=torch.optim.AdamW),
        {"lr": 1e-4},
        torch_modes={"fused": {"fused": True}, "foreach": {"foreach": True}},
        dtype=torch.bfloat16,
    ),
    # fp32 params with bf16 moments (half the state bytes); torch keeps fp32 state.
    "adamw-bf16-state": Algorithm(
        "AdamW fp32 params + bf16 state",
        partial(onepass.AdamW, state_dtype=torch.bfloat16),
        torch.optim.AdamW,
        {"lr": 1e-4},
        dtype=torch.float32,
        torch_arrays_moved=7,  # its moments stay fp32
    ),
    # Muon's peer is torch.optim.Muon (no fused / foreach variants) on the matrices it steps.
    "muon": Algorithm(
        "Muon (peer: torch.optim.Muon)",
        onepass.Muon,
        torch.optim.Muon,
        {"lr": 2e-2, "weight_decay": 0.1},
        torch_modes={"muon": {}},
        baseline="torch muon",
        shapes=("gpt2-small-matrices",),
        # torch.optim.Muon's Newton-Schulz runs in bf16, ~1 GFLOP/s where the CPU has no bf16
        # matmul (AVX2: 100x slower than fp32): ~70 s a step for one block's matrices, ~15 min
        # for all 48. onepass defaults to fp32 there (default_ns_dtype).
        shapes_without_bf16_matmul=("gpt2-small-block-matrices",),
        flatten_variant=False,
        # torch's own iteration (onepass's default is Gram Newton-Schulz): like for like
        variants=(("standard-ns", {"ns_method": "standard"}),),
    ),
}


@dataclass(frozen=True)
class Candidate:
    name: str
    make: OptimizerFactory


def _why_not(make: OptimizerFactory, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when this optimizer steps a small tensor of this device and dtype, else why not."""
    p = torch.zeros(8, 8, device=device, dtype=dtype, requires_grad=True)  # Muon needs a matrix
    p.grad = torch.ones_like(p)
    try:
        make([p]).step()
    except Exception as error:  # a backend that is not built here, or broken: skip it, say why
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def candidates(
    algorithm: Algorithm,
    device: torch.device,
    dtype: torch.dtype,
    include_reference: bool,
    log: Callable[[str], None],
    skip: Sequence[str] = (),
) -> list[Candidate]:
    """Every onepass backend that runs here (reference only when asked), then torch.optim's,
    but those named in ``skip``."""
    gpu = device.type == "cuda"  # the Triton interpreter on CPU is no benchmark
    backends = [
        b
        for b in onepass.BACKENDS
        if b not in ("auto", "reference") and (b in ("triton", "cuda")) == gpu
    ]
    if include_reference:
        backends.append("reference")
    named: list[tuple[str, Callable[[list[torch.Tensor]], Any]]] = []
    for b in backends:
        named.append((f"onepass {b}", partial(algorithm.onepass_cls, **algorithm.hyper, backend=b)))
        if b != "reference" and algorithm.flatten_variant:  # flatten=True: one flat segment
            flat = partial(algorithm.onepass_cls, **algorithm.hyper, backend=b, flatten=True)
            named.append((f"onepass {b} flatten", flat))
        for suffix, extra in algorithm.variants:
            variant = partial(algorithm.onepass_cls, **algorithm.hyper, **extra, backend=b)
            named.append((f"onepass {b} {suffix}", variant))
    for name, target, hyper in algorithm.peers:
        module, _, cls_name = target.partition(":")
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except ImportError as error:
            log(f"  {name}: not timed, {error} (make install installs it)")
            continue
        named.append((name, partial(cls, **hyper)))
    named += [
        (f"torch {mode}", partial(algorithm.torch_cls, **algorithm.hyper, **flags))
        for mode, flags in algorithm.torch_modes.items()
    ]
    if algorithm.steppers is not None:  # time the algorithm's stepper, not optimizer.step
        named = [
            (name, _stepping(make, algorithm.steppers[0 if name.startswith("onepass") else 1]))
            for name, make in named
        ]
    found = []
    for name, make in named:
        if name in skip:
            continue
        why = _why_not(make, device, dtype)
        if why is None:
            found.append(Candidate(name, make))
        else:
            log(f"  {name}: not timed, {why}")
    return found


def _stepping(make: Callable[[list[torch.Tensor]], Any], stepper: Stepper) -> OptimizerFactory:
    """A factory whose product's ``step`` is ``stepper`` around the optimizer ``make`` builds."""

    def build(params: list[torch.Tensor]) -> Any:
        return types.SimpleNamespace(step=stepper(make(params), params))

    return build


#: Elements per unit of work of the CPU kernels (csrc/ops.cpp kChunkElements): where every tensor
#: fits one, NovoGrad's and FAdam's passes run tensor by tensor, the later ones from cache.
CPU_CHUNK_ELEMENTS = 1 << 15


@dataclass(frozen=True)
class BytesModel:
    bytes_per_element: int  # read + written per param element per step (the spec's model)
    #: what torch's class moves where it differs (Algorithm.torch_arrays_moved), else None
    torch_bytes_per_element: int | None
    state_slots: int
    #: param-sized arrays (in the params' dtype) as large as what a step touches: param, grad,
    #: state slots and masters, in their own dtypes. The roofline probes sweep a working set this
    #: large, so they meet the same caches as the step does.
    arrays: int


def bytes_model(
    algorithm: Algorithm, device: torch.device, dtype: torch.dtype, shapes: ShapeList
) -> BytesModel:
    """The bytes a step of ``algorithm`` must move per element over ``shapes``: the spec's
    model, less the re-reads that come from cache on the CPU when every tensor is one chunk."""
    probe = torch.zeros(1, 1, device=device, dtype=dtype, requires_grad=True)
    opt = algorithm.onepass_cls([probe], **algorithm.hyper, backend="reference")
    group = opt.param_groups[0]
    itemsize = probe.element_size()
    # param-sized slots (NovoGrad's second moment is one scalar per tensor)
    slots = len([s for s in opt.spec.active_slots(group) if s not in opt.spec.scalar_slots])
    state, master = state_itemsize(group, itemsize)
    touched = 2 * itemsize + slots * state + master
    moved = opt.spec.bytes_per_element(group, itemsize) + algorithm.extra_bytes_per_element
    largest = max((math.prod(s) for s in shapes.shapes), default=0)
    if device.type == "cpu" and largest <= CPU_CHUNK_ELEMENTS:
        moved -= algorithm.rereads_in_cache * itemsize
    torch_moved = algorithm.torch_arrays_moved
    return BytesModel(
        moved,
        None if torch_moved is None else torch_moved * itemsize,
        slots,
        -(-touched // itemsize),
    )


def available_bytes(device: torch.device) -> int | None:
    """Free memory on the device (MemAvailable on a Linux host); None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def plan_memory(
    n_candidates: int, tensor_bytes: int, state_slots: int, available: int | None
) -> tuple[bool, int] | None:
    """(share grads?, bytes needed), or None when the group cannot fit even with shared grads.

    Each candidate owns its params and state (``state_slots`` param-sized arrays: the slots, and
    masters, in param-sized units); grads are per candidate when that fits, else one set is
    shared (a candidate that writes them gets them back after each call). Headroom: the
    roofline scratch buffer (param, grad and state: 2 + state_slots arrays), the pristine grads
    and one param-sized temporary (torch's foreach and for-loop steps allocate them).
    """
    own = n_candidates * (1 + state_slots) * tensor_bytes + (4 + state_slots) * tensor_bytes
    for share, grads in ((False, n_candidates), (True, 1)):
        need = own + grads * tensor_bytes
        if available is None or need <= 0.9 * available:
            return share, need
    return None


#: What the sleep kernel adds to 1.5x the host time of a call (Timer).
SLEEP_MARGIN_MS = 0.5


class Timer:
    """Times one call: ``(ms, host_ms)``.

    On the CPU both are the wall-clock time of the call. On CUDA the callable runs twice. First
    on an idle GPU, for ``host_ms``, the host's time in the call. Then behind a sleep kernel
    1.5x that long, which keeps the GPU busy while the host enqueues the step, as in training,
    where the host runs ahead of the GPU; CUDA events then time the kernels alone. ``ms`` is the
    larger of the two: the step's cost in steady state, where neither side can take less (many
    small tensors make the host the bound).

    The host is timed in a call of its own because a callable that launches more kernels than
    the launch queue holds (a for-loop optimizer, torch.optim.Muon) blocks behind the sleep: its
    host time would then include the sleep, and a sleep sized from it would grow every round.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"no timer for device {device}")
        self._cycles_per_ms = self._calibrate() if device.type == "cuda" else 0.0

    def _calibrate(self) -> float:
        cycles = 10_000_000
        for _ in range(2):  # the first call may include the kernel's load
            ms = self._events(lambda: torch.cuda._sleep(cycles))
        return cycles / max(ms, 1e-3)

    @staticmethod
    def _events(fn: Callable[[], object]) -> float:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))

    @staticmethod
    def _wall_ms(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def __call__(
        self, fn: Callable[[], object], reset: Callable[[], object] | None = None
    ) -> tuple[float, float]:
        """(time, host time) of ``fn``; on a GPU ``fn`` runs twice (the host's time, then the
        device's): ``reset``, where given, runs untimed between the calls (a candidate that
        writes its grads gets them back, so that the timed call steps the same grads)."""
        if self.device.type == "cpu":
            ms = self._wall_ms(fn)
            return ms, ms
        torch.cuda.synchronize(self.device)
        host_ms = self._wall_ms(fn)
        if reset is not None:
            reset()
        torch.cuda.synchronize(self.device)
        # The margin covers creating and recording the start event and the launch: a probe
        # whose host time is ~20 us got 0.05 ms, and the GPU's idle wait after the sleep for
        # the launch was timed as part of it (run 5's many-small rooflines: ~3x too slow).
        torch.cuda._sleep(int((1.5 * host_ms + SLEEP_MARGIN_MS) * self._cycles_per_ms))
        device_ms = self._events(fn)
        return max(device_ms, host_ms), host_ms


@dataclass
class GroupResult:
    """Per-round times of every task in one (shape list, algorithm) group."""

    shapes: ShapeList
    algorithm: str
    dtype: torch.dtype
    model: BytesModel
    times_ms: dict[str, list[float]]  # candidates, then the two roofline probes
    host_ms: dict[str, list[float]]  # the host's time in each call (Timer)
    max_abs_diff: dict[str, float]  # each candidate's params vs torch fused's after the run
    grads_shared: bool
    warmup: int


@dataclass(frozen=True)
class Schedule:
    """Warm-up rounds, then up to ``rounds`` timed rounds; past ``min_rounds``, timing stops
    after the first round that ends more than ``budget_s`` seconds in (0: no budget)."""

    rounds: int
    warmup: int
    budget_s: float
    min_rounds: int = 5


def interleave(
    tasks: Mapping[str, Callable[[], object]],
    schedule: Schedule,
    timer: Timer,
    log: Callable[[str], None],
    after: Mapping[str, Callable[[], object]] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Times one call of every task per round, the order rotating by one each round: per task
    the times and the host times (Timer). ``after[name]``, where given, runs untimed after each
    call of task ``name``.

    Warm-up rounds are timed but dropped. The garbage collector is off while timing.
    """
    after = after or {}
    names = list(tasks)
    times: dict[str, list[float]] = {name: [] for name in names}
    host: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc_enabled = gc.isenabled()
    gc.disable()
    start, elapsed, timed = time.perf_counter(), 0.0, 0
    try:
        for r in range(schedule.warmup + schedule.rounds):
            if r == schedule.warmup:
                start = time.perf_counter()
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                ms, host_ms = timer(tasks[name], after.get(name))
                if name in after:
                    after[name]()
                if r >= schedule.warmup:
                    times[name].append(ms)
                    host[name].append(host_ms)
            timed = r + 1 - schedule.warmup
            elapsed = time.perf_counter() - start
            if r == schedule.warmup - 1:
                log(f"  warm-up: {elapsed / schedule.warmup:.1f} s/round")
            elif 0 < schedule.budget_s < elapsed and timed >= schedule.min_rounds:
                break
    finally:
        if gc_enabled:
            gc.enable()
    log(f"  timed {timed} rounds in {elapsed:.1f} s")
    return times, host


def make_params(
    shapes: ShapeList, device: torch.device, dtype: torch.dtype, like: list[torch.Tensor] | None
) -> list[torch.Tensor]:
    """Leaf params of the shape list, each allocated on its own as a model's are: N(0, 0.02), or
    copies of ``like`` (so that every candidate steps the same values)."""
    params = []
    for i, shape in enumerate(shapes.shapes):
        p = torch.empty(shape, device=device, dtype=dtype)
        if like is None:
            p.normal_(0.0, 0.02)
        else:
            p.copy_(like[i])
        params.append(p.requires_grad_())
    return params


def attach_grads(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Grads as views into one flat buffer (as DDP's gradient buckets lay them out)."""
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()


def _scaling(scratch: torch.Tensor) -> Callable[[], None]:
    """The in-place scale probe: by 0.5 and 2 in turn (halving every call made the values
    subnormal after ~100 calls, and subnormals are slow)."""
    factor = [0.5]

    def scale() -> None:
        scratch.mul_(factor[0])
        factor[0] = 1.0 / factor[0]

    return scale


@torch.no_grad()
def _build_and_time(
    shapes: ShapeList,
    cands: list[Candidate],
    device: torch.device,
    dtype: torch.dtype,
    share_grads: bool,
    schedule: Schedule,
    log: Callable[[str], None],
    arrays: int,
    baseline: str,
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, float]]:
    """Gives every candidate its own params, grads (unless shared) and state, then times them
    and the roofline probes interleaved; all of it is freed when this returns.

    Returns the per-round times and host times, and each candidate's largest param difference
    to torch fused.
    """
    t0 = time.perf_counter()
    first_params: list[torch.Tensor] | None = None
    grads_flat: torch.Tensor | None = None
    tasks: dict[str, Callable[[], object]] = {}
    params_of: dict[str, list[torch.Tensor]] = {}
    grads_of: dict[str, torch.Tensor] = {}
    for cand in cands:
        params = make_params(shapes, device, dtype, first_params)
        if first_params is None:
            first_params = params
        if grads_flat is None:
            grads_flat = torch.empty(shapes.numel, device=device, dtype=dtype).normal_()
            flat = grads_flat
        else:
            flat = grads_flat if share_grads else grads_flat.clone()
        attach_grads(params, flat)
        tasks[cand.name] = cand.make(params).step
        params_of[cand.name] = params
        grads_of[cand.name] = flat
    assert grads_flat is not None
    # A candidate that writes its grads (pytorch-optimizer's NovoGrad divides them in place;
    # the composed AMP step unscales them) would step other grads from its second step on,
    # and with shared grads change everyone's. Each takes one untimed step; one that changed
    # its grads gets them back, untimed, after every call.
    pristine = grads_flat.clone()
    restore: dict[str, Callable[[], object]] = {}
    for name, step in tasks.items():
        step()
        if not torch.equal(grads_of[name], pristine):
            restore[name] = partial(grads_of[name].copy_, pristine)
            restore[name]()
            log(f"  {name} writes its grads: they are put back after each call")
    if not restore:
        del pristine
    # The roofline probes sweep a working set as large as the step's (`arrays` param-sized
    # arrays: a param-sized buffer alone can sit in the last-level cache where the step's four
    # arrays do not), and run with optimizer steps between them (the order only rotates).
    # In float32 (float64 for float64) of the same bytes: torch's bf16/fp16 scale converts every
    # element to float and back, which on a CPU is slower than the memory it moves.
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    nbytes = arrays * shapes.numel * torch.empty(0, dtype=dtype).element_size()
    scratch = torch.empty(nbytes // wide.itemsize, device=device, dtype=wide).normal_()
    half = scratch.numel() // 2
    steps = list(tasks.items())
    middle = (len(steps) + 1) // 2
    tasks = dict(
        [
            (ROOFLINE_COPY, partial(scratch[half : 2 * half].copy_, scratch[:half])),
            *steps[:middle],
            (ROOFLINE_SCALE, _scaling(scratch)),
            *steps[middle:],
        ]
    )
    log(f"  setup {time.perf_counter() - t0:.1f} s")
    times, host = interleave(tasks, schedule, Timer(device), log, restore)
    del tasks, steps, scratch, restore  # room for the comparison's temporaries
    # Every candidate took the same steps from the same params and grads: they should agree.
    diffs = {}
    if baseline in params_of:
        for name, params in params_of.items():
            diffs[name] = max(
                float((p - q).abs_().max())
                for p, q in zip(params, params_of[baseline], strict=True)
            )
    return times, host, diffs


def run_group(
    shapes: ShapeList,
    algorithm_key: str,
    device: torch.device,
    dtype: torch.dtype,
    schedule: Schedule,
    include_reference: bool,
    log: Callable[[str], None],
    skip: Sequence[str] = (),
) -> GroupResult | None:
    """Times every candidate of one (shape list, algorithm) but those named in ``skip``; None
    when it cannot run here."""
    algorithm = ALGORITHMS[algorithm_key]
    dtype = algorithm.dtype or dtype
    model = bytes_model(algorithm, device, dtype, shapes)
    tensor_bytes = shapes.numel * torch.empty(0, dtype=dtype).element_size()
    header = (
        f"[{shapes.name} / {algorithm.label} / {str(dtype).removeprefix('torch.')}] "
        f"{shapes.numel:,} elements in {shapes.tensors} tensors, "
        f"{model.bytes_per_element} B/element = {shapes.numel * model.bytes_per_element / 1e9:.2f}"
        " GB/step"
    )
    log(header)
    cands = candidates(algorithm, device, dtype, include_reference, log, skip)
    log(f"  candidates: {', '.join(c.name for c in cands)}")
    if not cands:
        log("  skipped: no candidate runs here")
        return None
    available = available_bytes(device)
    plan = plan_memory(len(cands), tensor_bytes, model.arrays - 2, available)
    for name in DROP_WHEN_SHORT:  # too big (llama on an 80 GB GPU): keep onepass vs torch fused
        if plan is not None:
            break
        if any(c.name == name for c in cands):
            cands = [c for c in cands if c.name != name]
            log(f"  {name}: not timed, too little memory for every candidate")
            plan = plan_memory(len(cands), tensor_bytes, model.arrays - 2, available)
    if plan is None:
        least = len(cands) * (model.arrays - 1) * tensor_bytes + 3 * tensor_bytes
        log(f"  skipped: needs ~{least / 1e9:.0f} GB, {(available or 0) / 1e9:.1f} GB free")
        return None
    share_grads, need = plan
    log(f"  ~{need / 1e9:.1f} GB{', grads shared' if share_grads else ''}")
    times, host, diffs = _build_and_time(
        shapes, cands, device, dtype, share_grads, schedule, log, model.arrays, algorithm.baseline
    )
    gc.collect()  # onepass optimizers hold reference cycles (optimizer <-> engine)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return GroupResult(
        shapes, algorithm_key, dtype, model, times, host, diffs, share_grads, schedule.warmup
    )
