"""The algorithm spec: everything a backend, the engine, the tests and the bench need to know."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

Group = Mapping[str, Any]
#: A bucket's grads as a launcher gets them: one a param (None: no grad), or None where the
#: native op reads each param's grad itself.
Grads = list[torch.Tensor | None] | None

#: Weight-decay modes shared by the whole family. "l2" adds wd*p to the gradient (torch Adam/SGD);
#: "decoupled" multiplies p by 1 - lr*wd before the update (Loshchilov & Hutter: AdamW, SGDW);
#: "independent" multiplies p by 1 - (lr/initial_lr)*wd, so decay follows the schedule's shape but
#: not the peak lr (Wortsman et al., "Small-scale proxies for large-scale Transformer training").
DECAY_MODES = ("l2", "decoupled", "independent")


#: Hyperparameters that are a number (a float or a one-element tensor), by the tuple length
#: they take (0: one number; None: a tuple whose length the algorithm checks, with torch's
#: message): check_group_values refuses anything else (PyYAML reads ``lr: 1e-3`` as a string).
#: Muon's adamw_* first: its AdamW groups carry them as betas / eps too, and the error names them.
NUMBER_KEYS: dict[str, int | None] = {
    "adamw_eps": 0,
    "adamw_betas": 2,
    "lr": 0,
    "eps": 0,
    "weight_decay": 0,
    "momentum": 0,
    "dampening": 0,
    "clip": 0,
    "p": 0,
    "ns_steps": 0,
    "betas": 2,
    "ns_coefficients": None,
}


def _is_number(x: Any) -> bool:
    if type(x) is float or type(x) is int:  # the common case first: this runs every step
        return True
    return isinstance(x, torch.Tensor | numbers.Real)


def _check_one_element(key: str, x: Any) -> None:
    if isinstance(x, torch.Tensor) and x.numel() != 1:  # torch.optim's words for the lr
        raise ValueError(f"Tensor {key} must be 1-element")


def _is_sequence(x: Any) -> bool:
    """A tuple or list, or what torch.optim indexes as one: an OmegaConf ListConfig (Hydra
    configs), a numpy array, a 1-D tensor. Not a string."""
    if type(x) is tuple or type(x) is list:
        return True
    if isinstance(x, str | bytes | Mapping):
        return False
    if isinstance(x, torch.Tensor):
        return x.dim() == 1
    return hasattr(x, "__len__") and hasattr(x, "__getitem__")


def check_group_values(group: Group, keys: Collection[str] | None = None) -> None:
    """TypeError naming the hyperparameter for one that is not a number (or a sequence of as
    many numbers as it takes; a tensor must hold one element), ValueError for an unknown decay
    mode. Only ``keys`` are checked (the optimizer's defaults; None: all): a key the optimizer
    does not read is the user's own, which torch.optim ignores (a ``"clip"`` or ``"p"`` of
    one's bookkeeping in an SGD group). The constructor and add_param_group run it, and every
    step on every group before anything is written: a value set in a group later would
    otherwise fail inside a launch (``float(None)``, unpacking 0.9) after the groups before it
    had stepped, or, for a misspelt decay mode, decay nothing. Where float() would take it (the
    string '1e-3'), torch.optim raises TypeError as it compares it."""
    for key, length in NUMBER_KEYS.items():
        if key not in group or (keys is not None and key not in keys):
            continue
        value = group[key]
        if length == 0:
            if not _is_number(value):
                raise TypeError(f"onepass: {key} must be a number, not {value!r}")
            _check_one_element(key, value)
            continue
        if not (_is_sequence(value) and all(map(_is_number, value))):
            raise TypeError(f"onepass: {key} must be a tuple of numbers, not {value!r}")
        if length is not None and len(value) != length:
            raise TypeError(f"onepass: {key} must be a tuple of {length} numbers, not {value!r}")
        for element in value:
            _check_one_element(key, element)
    if "decay" in group and (keys is None or "decay" in keys) and group["decay"] not in DECAY_MODES:
        raise ValueError(f"Invalid decay mode: {group['decay']!r}; one of {DECAY_MODES}")


def check_beta(group: Group, index: int, constructing: bool = False) -> None:
    """torch.optim's range for ``betas[index]``, [0, 1), checked at every step where the rule
    divides by 1 - beta (Adam's bias corrections, FAdam's b2t): a beta of 1 set after
    construction would fail part-way (the reference) or write non-finite params (the kernels).
    At a step, a tensor beta on the device (a capturable group's, checked where it is written)
    or under torch.compile is not read: that would sync with the device or break the graph."""
    beta = group["betas"][index]
    on_host = (
        constructing
        or not isinstance(beta, torch.Tensor)
        or (beta.device.type == "cpu" and not torch.compiler.is_compiling())
    )
    if on_host and not 0.0 <= scalar(beta) < 1.0:
        raise ValueError(f"Invalid beta parameter at index {index}: {beta}")


def scalar(value: float | torch.Tensor) -> float:
    """A hyperparameter as a Python float (lr and betas may be 0-d tensors, as in torch.optim)."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


#: Why a group with decay="independent" and weight decay cannot step from initial_lr = 0 (a
#: group built at lr = 0 for a hand-written warm-up).
ZERO_INITIAL_LR = (
    "decay='independent' scales the weight decay by lr / initial_lr, and initial_lr is 0 (the "
    "group was built at lr=0?): set group['initial_lr'] to the schedule's peak lr"
)


def decay_scale(group: Group) -> float:
    """decay_coefficient / weight_decay: 1 for decoupled decay, 1 / initial_lr for independent
    decay, 0 under L2 decay (which goes through the gradient). Groups without a decay mode
    (Muon's) decay decoupled."""
    mode = group.get("decay", "decoupled")
    if mode == "decoupled":
        return 1.0
    if mode == "independent":
        initial_lr = scalar(group["initial_lr"])
        if initial_lr == 0.0:
            raise ValueError(ZERO_INITIAL_LR)
        return 1.0 / initial_lr
    if mode != "l2":  # check_group_values refuses it first; never decay nothing silently
        raise ValueError(f"Invalid decay mode: {mode!r}; one of {DECAY_MODES}")
    return 0.0


def decay_coefficient(group: Group) -> float:
    """c in ``p *= 1 - lr * c`` (applied before the update): wd for decoupled decay,
    wd / initial_lr for independent decay, 0 under L2 decay (which goes through the gradient).

    The kernels take c and the lr separately, so an lr that lives in a tensor (torch.compile,
    CUDA graphs) reaches them without a host read."""
    weight_decay = scalar(group["weight_decay"])
    return 0.0 if weight_decay == 0.0 else weight_decay * decay_scale(group)


#: The key that marks a launch's view of a capturable group whose lr, betas, eps and weight decay
#: the kernels read from a device block (onepass._capturable): its host values may be stale.
DEVICE_BLOCK = "_onepass_device_block"


def l2_decays(group: Group, weight_decay: float) -> bool:
    """Whether a step adds the L2 term weight_decay * p to the gradient: under L2 decay, with a
    nonzero weight decay, or one that lives on the device (and may have changed there)."""
    return group["decay"] == "l2" and (weight_decay != 0.0 or DEVICE_BLOCK in group)


def state_itemsize(group: Group, itemsize: int) -> tuple[int, int]:
    """(bytes of one state element, bytes of one master element) for params of ``itemsize``
    bytes in ``group``: state in ``state_dtype`` (fp32 with master weights, else the params'
    dtype, when unset); fp32 masters for 16-bit params with master weights (0 otherwise)."""
    master = 4 if group.get("master_weights") and itemsize == 2 else 0
    state_dtype = group.get("state_dtype")
    if state_dtype is not None:
        return torch.empty(0, dtype=state_dtype).element_size(), master
    return (4 if master else itemsize), master


def elementwise_bytes(
    active_slots: Callable[[Group], tuple[str, ...]],
) -> Callable[[Group, int], int]:
    """The bytes model of an elementwise update: read param, grad and every slot; write param and
    every slot. With master weights the master is read and written and the param only written."""

    def bytes_per_element(group: Group, itemsize: int) -> int:
        slots = len(active_slots(group))
        state, master = state_itemsize(group, itemsize)
        param = itemsize if master else 2 * itemsize
        return param + itemsize + state * 2 * slots + master * 2

    return bytes_per_element


def reference_amp_scale(
    grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None
) -> float | None:
    """For the reference backend (host reads are fine there): the AMP scale the grads carry, or
    None when GradScaler found an inf/nan and the step must leave everything as it is."""
    if found_inf is not None and float(found_inf) != 0.0:
        return None
    return 1.0 if grad_scale is None else float(grad_scale)


#: One tensor's reference step: (index in the bucket, grad, its slot views, its step count after
#: this step, the AMP scale its grad carries).
TensorStep = Callable[[int, torch.Tensor, dict[str, torch.Tensor], int, float], None]


#: The slot of a 16-bit param's fp32 master copy (master_weights=True).
MASTER = "master_param"


def math_param(bucket: Any, i: int, slots: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor a reference step updates: the fp32 master when the bucket keeps master
    weights (``reference_steps`` then writes it, rounded, into the param), else the param."""
    master = slots.get(MASTER)
    return bucket.params[i] if master is None else master


def reference_steps(
    bucket: Any,
    grads: Grads,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    step_one: TensorStep,
) -> None:
    """The reference backend's loop, shared by every elementwise spec: skip the whole step when
    GradScaler found an inf/nan, else advance and step each tensor that has a grad (its master,
    with master weights, then copied into the param rounded to nearest)."""
    assert grads is not None  # listed by the engine: only a one-op native launch reads them
    scale = reference_amp_scale(grad_scale, found_inf)
    if scale is None:
        return  # params, state and steps stay as they are
    for i, g in enumerate(grads):
        if g is None:
            continue
        bucket.step[i] += 1
        slots = bucket.slot_views(i)
        step_one(i, g, slots, int(bucket.step[i]), scale)
        if MASTER in slots:
            bucket.params[i].copy_(slots[MASTER])


def triton_launcher(module: str) -> Launcher:
    """The "triton" launcher of a spec: ``onepass.triton_kernels.<module>.launch``, imported at
    the first launch (``import onepass`` must work without triton installed)."""

    def launch(*args: Any) -> None:
        import importlib

        importlib.import_module(f"onepass.triton_kernels.{module}").launch(*args)

    return launch


# -- stochastic rounding of bf16 params (stochastic_rounding=True) -------------------------------
#
# Every backend writes a bf16 param as: u = the float32 result's bits; if u is finite,
# (u + (hash32(seed, index) & 0xFFFF)) >> 16, else round to nearest. ``index`` is the element's
# position in its bucket's flat state (the tensor's state offset + its element index), ``seed``
# the group's ``sr_seed``, advanced after every step: the same draws on every backend, and the
# rounding goes up with probability equal to the discarded fraction (unbiased).

SR_HASH = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x7FEB352D, 0x846CA68B)
#: State slot k draws with seed + (1 + k) * SR_STREAM_STRIDE (mod 2^32; the param with seed): an
#: odd stride far from small multiples of 2^32, so no stream's seed meets another's in a later
#: step (seeds advance by 1 a step).
SR_STREAM_STRIDE = 0x9E3779B9
_MASK32 = 0xFFFFFFFF


def sr_seed(group: Group, bucket: Any) -> int:
    """The seed the kernels take for ``bucket``: -1 (round to nearest) unless the group rounds
    stochastically and the bucket stores bf16 that the kernels round: its params (without
    master weights, whose params are the masters rounded to nearest) or its state."""
    if not group.get("stochastic_rounding"):
        return -1
    bf16_params = bucket.dtype == torch.bfloat16 and MASTER not in bucket.buffers
    if bf16_params or bucket.state_dtype == torch.bfloat16:
        return int(group["sr_seed"])
    return -1


def sr_hash(index: torch.Tensor, seed: int) -> torch.Tensor:
    """hash32(seed, index) of math.h / common.py in int64 arithmetic masked to 32 bits."""
    m1, m2, m3, m4, m5 = SR_HASH
    lo, hi = index & _MASK32, (index >> 32) & _MASK32
    x = (lo * m1) & _MASK32
    x ^= (hi * m2) & _MASK32
    x ^= (seed * m3) & _MASK32
    x ^= x >> 16
    x = (x * m4) & _MASK32
    x ^= x >> 15
    x = (x * m5) & _MASK32
    x ^= x >> 16
    return x


def store_param(param: torch.Tensor, value: torch.Tensor, seed: int, index_base: int) -> None:
    """param <- value (its opmath result): round to nearest, or stochastically for a bf16 param
    when ``seed`` >= 0 (see above). The reference backend's param write."""
    if seed < 0 or param.dtype != torch.bfloat16:
        param.copy_(value)
        return
    v = value.detach().to(torch.float32).reshape(-1)
    index = index_base + torch.arange(v.numel(), dtype=torch.int64, device=v.device)
    bits = v.view(torch.int32).to(torch.int64) & _MASK32
    rounded = ((bits + (sr_hash(index, seed) & 0xFFFF)) >> 16) & 0xFFFF
    out = rounded.to(torch.int32).to(torch.int16).view(torch.bfloat16)  # the low 16 bits
    finite = torch.isfinite(v)
    out = torch.where(finite, out, v.to(torch.bfloat16))
    param.copy_(out.view(param.shape))


@dataclass(frozen=True)
class Rounding:
    """How a reference function writes its param and state: ``seed`` < 0 rounds to nearest;
    otherwise stochastically where the destination is bf16 (``index_base``: the tensor's state
    offset in its bucket). State slot k draws with seed + (1 + k) * SR_STREAM_STRIDE (mod 2^32),
    as the kernels do."""

    seed: int = -1
    index_base: int = 0

    def store(self, param: torch.Tensor, value: torch.Tensor) -> None:
        store_param(param, value, self.seed, self.index_base)

    def store_state(self, k: int, slot: torch.Tensor, value: torch.Tensor) -> None:
        """slot <- value for the k-th elementwise state slot in kernel order."""
        seed = (self.seed + (1 + k) * SR_STREAM_STRIDE) & _MASK32 if self.seed >= 0 else -1
        store_param(slot, value, seed, self.index_base)


NEAREST = Rounding()


def bucket_rounding(bucket: Any, group: Group, index: int) -> Rounding:
    """The reference backend's rounding of tensor ``index`` of ``bucket``."""
    seed = sr_seed(group, bucket)
    return NEAREST if seed < 0 else Rounding(seed, int(bucket.offsets[index]))


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math runs in float64 for float64 storage and in float32 for everything narrower."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scalar_slot_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a per-tensor scalar slot for params of ``dtype``: the opmath dtype, since a
    scalar costs nothing to keep precise and a bf16 layer norm would lose 3 digits per step."""
    return opmath_dtype(dtype)


#: A backend launcher steps one bucket (the engine's Bucket or FlatBucket): (bucket, grads, group,
#: grad_scale, found_inf) -> None.
Launcher = Callable[[Any, Grads, Group, torch.Tensor | None, torch.Tensor | None], None]


@dataclass(frozen=True)
class AlgorithmSpec:
    """One algorithm, defined once; every backend and the engine read it.

    Attributes:
        name: the algorithm's name.
        slots: every state slot in kernel order, named as torch.optim names them, so checkpoints
            interchange.
        active_slots: the slots a param group actually uses (``max_exp_avg_sq`` only with amsgrad,
            ``momentum_buffer`` only with momentum).
        step_in_state: whether ``optimizer.state[p]["step"]`` exists (Adam yes, SGD no; the engine
            counts steps per tensor either way, SGD needs it for the first momentum step).
        check_group: raises ValueError, with torch.optim's messages, for out-of-range values.
        check_arguments: the checks torch.optim's class makes on the constructor's arguments
            only, never on a param group; run after ``check_group`` on them, before any group
            is built.
        check_step: raises ValueError / TypeError for group values set after construction that
            a step could not take whole: values the native launch would fail on part-way
            (Muon's momentum pass writes before its later passes read the lr and the
            Newton-Schulz settings), or for which the rule is undefined (a division by zero).
            The engine runs it on every group before a step writes anything. Range checks
            beyond those run at construction only, as torch.optim's do.
        bytes_per_element: bytes one step reads and writes per param element (the bench's model),
            given the group and the storage element size.
        reduction: the reductions the update needs: "none", "per_tensor", "per_row" or "global".
        reference: the pure-torch oracle; runs in float64 on float64 tensors.
        launchers: the backends that implement it, by name.
        scalar_slots: the slots that hold one scalar per tensor (NovoGrad's layer-wise second
            moment) instead of one value per element; the engine keeps them in float32 (float64
            for float64 params) and shows them as 0-d tensors in ``optimizer.state[p]``.
        group_spec: for an optimizer that runs a different algorithm per param group (Muon's
            AdamW groups), the spec of a group; None: this spec for every group.
        native_grads: the "cpu" / "cuda" launchers hand the grads to one native op untouched,
            which checks every tensor before it writes: the engine may pass None for them and
            let the op read each param's .grad, and skips its own check of a single launch.
        device_hyper: with capturable=True, the group keys that live on the device, in the
            order of the op's hyperparameter block (csrc/include/onepass/device_hyper.h;
            "betas" is two values); ``decay_in_block``: the block ends with decay_scale.
        optional_slots: active slots that a loaded state entry may lack, which the step then
            starts as it does when a group switches them on mid-run: amsgrad's max_exp_avg_sq,
            SGD's momentum buffer (from the grad, as torch.optim.SGD), Muon's (from zero, as
            torch.optim.Muon). Any other active slot missing from a loaded entry is refused at
            ``load_state_dict``, where torch.optim would fail at the step (a KeyError) and
            onepass would otherwise start it from zeros under the entry's step count.
        check_param: raises ValueError, naming it (the second argument), for a param the
            algorithm cannot step (Muon's matrices: a 1-D param); run when a group's buckets are
            built, before anything is written.
    """

    name: str
    slots: tuple[str, ...]
    active_slots: Callable[[Group], tuple[str, ...]]
    step_in_state: bool
    check_group: Callable[[Group], None]
    bytes_per_element: Callable[[Group, int], int]
    reference: Callable[..., None]
    reduction: str = "none"
    launchers: dict[str, Launcher] = field(default_factory=dict)
    scalar_slots: tuple[str, ...] = ()
    group_spec: Callable[[Group], AlgorithmSpec] | None = None
    native_grads: bool = False
    device_hyper: tuple[str, ...] = ("lr",)
    decay_in_block: bool = False
    check_arguments: Callable[[Group], None] | None = None
    check_step: Callable[[Group], None] | None = None
    check_param: Callable[[torch.Tensor, str], None] | None = None
    optional_slots: tuple[str, ...] = ()

    def for_group(self, group: Group) -> AlgorithmSpec:
        """The spec that steps ``group``."""
        return self if self.group_spec is None else self.group_spec(group)
