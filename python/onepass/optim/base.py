"""The drop-in ``torch.optim.Optimizer`` base: param groups, state_dict, GradScaler, engine."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, TypedDict

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks as _global_post_hooks
from torch.optim.optimizer import _global_optimizer_pre_hooks as _global_pre_hooks

from onepass import _ops
from onepass._capturable import host_floats
from onepass._engine import BACKENDS, Engine, resolve_backend
from onepass._state import TrackedState
from onepass.algorithms import ADAM, FADAM, LION, MUON, NOVOGRAD, SGD_SPEC
from onepass.algorithms.base import (
    AlgorithmSpec,
    check_group_values,
    scalar,
    scalar_slot_dtype,
)

#: Seeds of stochastic rounding (a param group's ``sr_seed``) are in [0, SR_SEED_MODULUS).
SR_SEED_MODULUS = 2**31 - 1
#: ``state_dtype`` values: None keeps the state in the params' dtype (float32 with master weights).
STATE_DTYPES = (None, torch.float32, torch.bfloat16)
#: Group keys that say how the optimizer runs and stores its state, not what it computes:
#: load_state_dict keeps the loading optimizer's own (a checkpoint of a capturable run on
#: backend="cuda" resumes on a CPU; one saved with flatten=True or master weights loads into a
#: run without; stochastic rounding, refused with capturable, stays the loader's choice too).
RUN_KEYS = (
    "backend",
    "capturable",
    "flatten",
    "stochastic_rounding",
    "master_weights",
    "state_dtype",
)


class Options(TypedDict, total=False):
    """The keyword options every onepass optimizer takes beyond its torch.optim twin's
    (README, API): how it runs and stores its state, never the algorithm's math."""

    backend: str
    flatten: bool
    max_grad_norm: float | None
    stochastic_rounding: bool
    master_weights: bool
    state_dtype: torch.dtype | None


#: Every algorithm's state slots: a loaded entry with one its optimizer's algorithm lacks is
#: another algorithm's checkpoint.
ALGORITHM_SLOTS = frozenset(
    slot for spec in (ADAM, FADAM, LION, MUON, NOVOGRAD, SGD_SPEC) for slot in spec.slots
)

#: The value of each option a constructor was not given.
OPTION_DEFAULTS: dict[str, Any] = {
    "backend": "auto",
    "flatten": False,
    "max_grad_norm": None,
    "stochastic_rounding": False,
    "master_weights": False,
    "state_dtype": None,
}


def _shape_of(value: Any) -> Any:
    """A loaded state value's shape, or its type where it is not a tensor (for error messages)."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)


def _empty_clip_record() -> dict[str, Any]:
    """What the optimizer records about clipping: the clip_grad_norm_ the next step applies
    ("pending": (max_norm, norm) or None) and the last clipped step's "grad_norm" and
    "step_skipped". A dict's items, not attributes: a compiled step's writes to the items
    reach the optimizer, where Dynamo drops an optimizer's attribute writes (torch 2.11, 2.13)."""
    return {"pending": None, "grad_norm": None, "step_skipped": None}


def _profiling() -> bool:
    """Whether a torch profiler runs (the flag torch's own fast paths read, and the C++ state);
    always under torch.compile, which traces the range as torch.optim's wrapper enters it."""
    return bool(
        torch.compiler.is_compiling()
        or getattr(torch.autograd.profiler, "_is_profiler_enabled", True)
        or torch._C._autograd._profiler_enabled()
    )


def _hooked_step(step: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``step(*args, **kwargs)`` (args[0] the optimizer) between the global and the optimizer's
    step pre and post hooks, as torch.optim runs them: each hook gets the optimizer, ``args``
    (the optimizer first) and ``kwargs``, and a pre hook may return new ``(args, kwargs)``."""
    optimizer = args[0]
    pre_hooks = (*_global_pre_hooks.values(), *optimizer._optimizer_step_pre_hooks.values())
    for pre_hook in pre_hooks:
        result = pre_hook(optimizer, args, kwargs)
        if result is not None:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(
                    f"{step} must return None or a tuple of (new_args, new_kwargs), but got "
                    f"{result}."
                )
            args, kwargs = result
    out = step(*args, **kwargs)
    # Where torch's Python tracer looks at the optimizer (it runs only under a profiler; without
    # hooks or a profiler the wrapper skips this function).
    optimizer._optimizer_step_code()
    post_hooks = (*optimizer._optimizer_step_post_hooks.values(), *_global_post_hooks.values())
    for post_hook in post_hooks:
        post_hook(optimizer, args, kwargs)
    return out


def _new_sr_seed() -> int:
    """A group's first seed, from torch's default generator: torch.manual_seed makes runs
    reproducible; the seed then lives in the group (and its state_dict)."""
    return int(torch.randint(0, SR_SEED_MODULUS, ()).item())


def _state_dict_as_saved(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """FusedOptimizer.state_dict's changes to torch's dict: no state for a param whose first
    step was skipped, entries as plain dicts, a capturable group's device-block views as the
    floats they hold."""
    assert isinstance(optimizer, FusedOptimizer)
    unstepped = optimizer._engine.unstepped()
    if unstepped:  # ids as torch numbers them: the params of every group, in order
        params = (p for group in optimizer.param_groups for p in group["params"])
        for index, p in enumerate(params):
            if id(p) in unstepped:
                state_dict["state"].pop(index, None)
    state_dict["state"] = {k: dict(v) for k, v in state_dict["state"].items()}
    for saved in state_dict["param_groups"]:
        # A capturable group's lr, betas, eps and weight decay are views of its device block
        # (onepass._capturable): saved as the floats they hold, as torch.optim saves them.
        for key, value in saved.items():
            saved[key] = host_floats(value)
    return state_dict


class FusedOptimizer(Optimizer):
    """A torch.optim.Optimizer whose step is one fused pass per bucket (see onepass._engine).

    Subclasses set ``spec`` and ``torch_keys`` (the group keys torch.optim's class has, with the
    defaults its ``__setstate__`` fills in, so state_dicts load both ways).
    """

    spec: ClassVar[AlgorithmSpec]
    torch_keys: ClassVar[Mapping[str, Any]] = {}
    #: Group keys some group's spec reads beyond the constructor's (Muon's AdamW groups read
    #: betas): type-checked at every step with the defaults' keys.
    spec_keys: ClassVar[frozenset[str]] = frozenset()
    #: Whether a step captured in a CUDA graph needs capturable=True in every group, as
    #: torch.optim's class refuses it otherwise (Adam, AdamW; SGD takes no capturable and is
    #: captured with its lr as it was, as onepass's others are).
    capture_needs_capturable: ClassVar[bool] = False
    # GradScaler hands us grad_scale / found_inf; the kernels unscale and skip on inf themselves.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        options: Mapping[str, Any] | None = None,
    ) -> None:
        unknown = sorted(set(options or ()) - OPTION_DEFAULTS.keys())
        if unknown:
            name = type(self).__name__
            raise TypeError(f"{name}.__init__() got an unexpected keyword argument {unknown[0]!r}")
        defaults = {**defaults, **OPTION_DEFAULTS, **(options or {})}
        # Optimizer-wide (the norm is global), so not a group key.
        max_grad_norm = defaults.pop("max_grad_norm", None)
        if max_grad_norm is not None and not float(max_grad_norm) > 0.0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm} (must be > 0)")
        self.max_grad_norm: float | None = None if max_grad_norm is None else float(max_grad_norm)
        self._clip = _empty_clip_record()
        self._capturable_asked: dict[int, tuple[dict[str, Any], bool]] = {}
        self._trace_record = {"since_eager": False}  # a dict: Dynamo keeps a trace's item writes
        if defaults.get("differentiable"):
            raise ValueError("onepass: differentiable=True is not supported (use torch.optim)")
        if defaults["backend"] not in BACKENDS:
            raise ValueError(f"Invalid backend: {defaults['backend']!r}; one of {BACKENDS}")
        if defaults["backend"] in ("triton", "cuda", "cpu"):
            # Fail now, not at the first step, when the backend does not exist in this build.
            device = torch.device("cpu" if defaults["backend"] == "cpu" else "cuda")
            resolve_backend(defaults["backend"], device)
        check_group_values(defaults)
        self.spec.check_group(defaults)
        if self.spec.check_arguments is not None:
            self.spec.check_arguments(defaults)
        self.checked_keys = frozenset(defaults) | self.spec_keys  # (add_param_group reads it)
        super().__init__(params, defaults)
        self._engine = Engine(self, self.spec)

    @staticmethod
    def profile_hook_step(func: Callable[..., Any]) -> Callable[..., Any]:
        """torch.optim.Optimizer's wrapper of ``step`` (it applies it where torch applies its
        own): the same step pre and post hooks, called with the same arguments, and the same
        ``Optimizer.step#<class>.step`` profiler range, entered only while a profiler runs.
        Entering it costs ~0.15 ms once a step has streamed its buffers through the caches, a
        quarter of a 4,000-tensor CPU step's host work. (An execution-trace observer without a
        profiler does not see the range.)"""

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if _profiling():
                name = f"Optimizer.step#{type(args[0]).__name__}.step"
                with torch.autograd.profiler.record_function(name):
                    return _hooked_step(func, args, kwargs)
            optimizer = args[0]
            if (
                _global_pre_hooks
                or _global_post_hooks
                or optimizer._optimizer_step_pre_hooks
                or optimizer._optimizer_step_post_hooks
            ):
                return _hooked_step(func, args, kwargs)
            # No hooks and no profiler: the step alone. Going through _hooked_step costs ~35 us
            # a step once a step has streamed its buffers through the caches (its code and the
            # hook dicts are then cold).
            return func(*args, **kwargs)

        return wrapper

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_group_values(group, self.checked_keys)
            self.spec.check_group(group)
            if group.get("stochastic_rounding") and group.get("capturable"):
                raise ValueError(
                    "onepass: stochastic_rounding=True cannot be capturable (a CUDA graph would "
                    "replay one step's random seed)"
                )
            if group.get("state_dtype") not in STATE_DTYPES:
                raise ValueError(
                    f"onepass: state_dtype={group['state_dtype']!r}; one of None, torch.float32, "
                    "torch.bfloat16"
                )
            seen: dict[int, int] = {}
            for j, p in enumerate(group["params"]):
                first = seen.setdefault(id(p), j)
                if first != j:
                    raise ValueError(
                        f"onepass: param_groups[{len(self.param_groups) - 1}]['params'] lists "
                        f"one param twice (at {first} and {j}); torch.optim steps it twice a "
                        "step over one state and warns that this will be an error: list each "
                        "param once"
                    )
                if p.is_complex():
                    raise ValueError(
                        f"onepass: param_groups[{len(self.param_groups) - 1}]['params'][{j}] is "
                        "complex, which onepass does not support; optimise "
                        "torch.view_as_real(p) instead"
                    )
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        if group["decay"] == "independent":
            group.setdefault("initial_lr", scalar(group["lr"]))
        if group.get("stochastic_rounding") and "sr_seed" not in group:
            group["sr_seed"] = _new_sr_seed()
        self._record_capturable(group)

    def _record_capturable(self, group: dict[str, Any]) -> None:
        """The group's capturable as the user has it now (settle_capturable's reference)."""
        self._capturable_asked[id(group)] = (group, bool(group.get("capturable")))

    def settle_capturable(self) -> None:
        """Run by every eager step before it plans: undoes Dynamo's ``capturable`` write. When a
        traced step reads ``param_groups``, Dynamo (``OptimizerVariable._set_capturable``, torch
        2.11-2.13) sets ``group["capturable"] = True`` in every group whose params are all on
        CUDA and have no state yet (a first step that is compiled). onepass's compiled steps
        do not need it, and an eager step that took it as the user's rebuilt the buckets
        capturable, after which compiled steps were refused. A group that was not capturable
        at the last eager step (or when added or loaded) and is now is set back where a step
        was compiled since (fullgraph) or where its params have no state yet (a step that
        breaks the graph runs this part eagerly, inside the compiled call); any other change
        is the user's and is kept. (A user's write of True into a group before its first step
        looks like Dynamo's: give capturable to the constructor or add_param_group.)"""
        traced = self._trace_record["since_eager"]
        asked: dict[int, tuple[dict[str, Any], bool]] = {}
        for group in self.param_groups:
            now = bool(group.get("capturable"))
            recorded = self._capturable_asked.get(id(group))
            before = recorded[1] if recorded is not None and recorded[0] is group else now
            dynamos = now and not before
            if dynamos and (traced or not any(p in self.state for p in group["params"])):
                group["capturable"] = now = False
            asked[id(group)] = (group, now)
        self._capturable_asked = asked  # the groups of now only: a removed one's id is reused
        self._trace_record["since_eager"] = False

    @property  # type: ignore[override]
    def state(self) -> TrackedState:
        """param -> its state (torch.optim's slot names; views into the engine's flat buffers).

        Writing to it (``state.clear()``, ``state[p] = ...``, ``state[p]["exp_avg"] = t``,
        ``optimizer.state = ...``) is honoured at the next step, which then starts from the new
        state exactly as torch.optim would.
        """
        return self._state

    @state.setter
    def state(self, value: Any) -> None:
        self._state = TrackedState(value)
        self._state.dirty = True

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict, its entries plain dicts (loadable with weights_only=True).
        onepass's changes to torch's dict are made in a post-hook that runs before the user's,
        which see the dict as it is returned and may return another, as torch.optim allows."""
        self.settle_capturable()  # a checkpoint saves what the user asked, not Dynamo's write
        fix = self.register_state_dict_post_hook(_state_dict_as_saved, prepend=True)
        try:
            return super().state_dict()
        finally:
            fix.remove()

    def __getstate__(self) -> dict[str, Any]:
        self.settle_capturable()  # a copy keeps what the user asked, not Dynamo's write
        state = super().__getstate__()
        unstepped = self._engine.unstepped()  # saved without state, as in state_dict()
        if unstepped:
            state["state"] = {p: v for p, v in state["state"].items() if id(p) not in unstepped}
        state["max_grad_norm"] = self.max_grad_norm  # torch's keeps only its own fields
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        tensors = state.pop("state", {})
        super().__setstate__(state)
        self.__dict__.setdefault("max_grad_norm", None)
        self._clip = _empty_clip_record()
        self._trace_record = {"since_eager": False}
        self.state = tensors
        for group in self.param_groups:
            for key, value in self.torch_keys.items():
                group.setdefault(key, value)
            group.setdefault("decay", self._decay_from_torch(group))
            group.setdefault("backend", self.defaults.get("backend", "auto"))
            group.setdefault("flatten", self.defaults.get("flatten", False))
            group.setdefault("stochastic_rounding", self.defaults.get("stochastic_rounding", False))
            group.setdefault("master_weights", self.defaults.get("master_weights", False))
            group.setdefault("state_dtype", self.defaults.get("state_dtype"))
            if group["stochastic_rounding"] and "sr_seed" not in group:
                group["sr_seed"] = _new_sr_seed()  # (not setdefault: it would draw anyway)
            if group["decay"] == "independent":
                group.setdefault("initial_lr", scalar(group["lr"]))
        self._capturable_asked = {}
        for group in self.param_groups:
            self._record_capturable(group)
        self.checked_keys = frozenset(self.defaults) | self.spec_keys
        # Buckets are rebuilt from self.state at the next step (after unpickling, deepcopy or a
        # state_dict load, the state tensors are no longer views of our buffers).
        self._engine = Engine(self, self.spec)

    def _decay_from_torch(self, group: Mapping[str, Any]) -> str:
        """Decay mode of a group saved by torch.optim (no ``decay`` key)."""
        return str(self.defaults.get("decay", "l2"))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's. With ``set_to_none=False`` the grads of ``flatten=True`` params are
        zeroed in place (one fill per bucket), so they stay views of the flat grad buffer and
        the step stays one pass; ``set_to_none=True`` drops them as torch does (a param that
        backward does not reach then has no grad and is not stepped)."""
        self._clip["pending"] = None  # it clipped the grads being zeroed (torch's rewrote them)
        views, buffers = self._engine.flat_grads()
        if not buffers or set_to_none:
            super().zero_grad(set_to_none)
            return
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad
                if grad is None or views.get(id(p)) is grad:
                    continue
                if grad.grad_fn is not None:
                    grad.detach_()
                else:
                    grad.requires_grad_(False)
                grad.zero_()
        for buffer in buffers:
            buffer.zero_()

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Performs one optimization step; ``closure`` re-evaluates the model, returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Grad mode off for the step, as torch.no_grad() would switch it: its context manager
        # runs ~10 Python calls in torch, ~50 us once a step has streamed its buffers through
        # the caches.
        grad_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            self._step_without_grad()
        finally:
            torch._C._set_grad_enabled(grad_enabled)
        return loss

    def _step_without_grad(self) -> None:
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # A refused step changes nothing, a pending clip_grad_norm_ and the last norm included:
        # the retried step is clipped. Nor a seed drawn for a group that switched stochastic
        # rounding on since (the draw advances torch's generator: it is set back).
        before = dict(self._clip)
        seeded = [
            g for g in self.param_groups if g.get("stochastic_rounding") and "sr_seed" not in g
        ]
        rng = torch.random.get_rng_state() if seeded else None
        for group in seeded:
            group["sr_seed"] = _new_sr_seed()
        try:
            clip = self._clip_for_this_step()
            if clip is not None:
                grad_scale, found_inf = self._fold_clip(*clip, grad_scale, found_inf)
            self._engine.step(grad_scale, found_inf)
        except Exception:
            self._clip.update(before)
            if rng is not None:
                for group in seeded:
                    del group["sr_seed"]
                torch.random.set_rng_state(rng)
            raise
        for group in self.param_groups:  # a new draw of the rounding noise for the next step
            if group.get("stochastic_rounding"):
                group["sr_seed"] = (int(group["sr_seed"]) + 1) % SR_SEED_MODULUS

    # -- whole-step fusion: GradScaler unscale + global-norm clipping + the step, one pass --------

    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
    ) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ over this optimizer's params, fused into the next step:
        returns the total norm of the grads as they are now (as torch's does), and the next
        ``step()`` multiplies every grad by ``min(1, max_norm / (norm + 1e-6))`` inside its
        update pass instead of rewriting the grads here. Under a GradScaler call it before
        ``scaler.step(opt)`` without ``scaler.unscale_(opt)``: the step divides the norm by the
        scale. The step reports in ``grad_norm`` / ``step_skipped`` as with ``max_grad_norm``."""
        norm = self._total_norm(norm_type, error_if_nonfinite)
        self._clip["pending"] = (float(max_norm), norm)
        return norm

    def clips_next_step(self) -> bool:
        """Whether the next step clips (max_grad_norm, or clip_grad_norm_ since the last step)."""
        return self._clip["pending"] is not None or self.max_grad_norm is not None

    def norm_for_next_step(self) -> torch.Tensor:
        """The total grad norm the next step clips with, computed now if it is not yet (once:
        onepass.GradScaler reads it for found_inf, the step then reuses it)."""
        if self._clip["pending"] is None:
            if self.max_grad_norm is None:
                raise RuntimeError("onepass: this optimizer does not clip (no max_grad_norm)")
            self._clip["pending"] = (self.max_grad_norm, self._total_norm(2.0, False))
        return self._clip["pending"][1]

    def _clip_for_this_step(self) -> tuple[float, torch.Tensor] | None:
        clip = self._clip["pending"]
        if clip is not None:
            self._clip["pending"] = None
            return clip
        if self.max_grad_norm is None:
            return None
        return self.max_grad_norm, self._total_norm(2.0, False)

    def _total_norm(self, norm_type: float, error_if_nonfinite: bool) -> torch.Tensor:
        # CPU grads, 2-norm: onepass's one-pass native reduction, which reads the grads itself
        # (torch's costs ~7 us a tensor on the CPU: 28 ms for 4,000 tensors). Elsewhere torch's
        # own (one multi-tensor launch per device and dtype on CUDA): the same total as
        # torch.nn.utils.clip_grad_norm_, to rounding.
        norm = None
        if norm_type == 2.0:
            buffers = self._engine.flat_grad_buffers()  # flatten=True: a few flat buffers
            if buffers:
                norm = _ops.total_norm(buffers, 2.0)
                if norm is None:  # off the CPU: torch's, still over the flat buffers
                    norm = torch.nn.utils.get_total_norm(buffers, 2.0, error_if_nonfinite)
            else:
                norm = _ops.grads_total_norm([p for g in self.param_groups for p in g["params"]])
        if norm is None:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if not grads:
                return torch.zeros(())
            norm = _ops.total_norm(grads, norm_type)
        if norm is None:
            try:
                return torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite)
            except (NotImplementedError, RuntimeError):
                self._check_dense_grads()  # the step refuses a sparse grad by name: so here
                raise
        if error_if_nonfinite and not bool(torch.isfinite(norm)):
            raise RuntimeError(
                f"The total norm of order {norm_type} for gradients from `parameters` is "
                "non-finite, so it cannot be clipped. To disable this error and scale the "
                "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`"
            )
        return norm

    def _check_dense_grads(self) -> None:
        for i, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.layout != torch.strided:
                    raise RuntimeError(
                        f"onepass: param_groups[{i}]['params'][{j}] has a sparse gradient, which "
                        "onepass does not support"
                    )

    def _fold_clip(
        self,
        max_norm: float,
        norm: torch.Tensor,
        grad_scale: torch.Tensor | None,
        found_inf: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The clip coefficient folded into the AMP scalars the kernels already read on the
        device: grads are multiplied by 1 / grad_scale, so grad_scale becomes scale / coef; a
        non-finite norm raises found_inf. No host sync, no pass writing the grads."""
        norm = norm.float()
        if grad_scale is not None:
            norm = norm / grad_scale.to(norm.device)  # the grads carry the loss scale
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        scale = coef.reciprocal() if grad_scale is None else grad_scale.to(norm.device) / coef
        skip = (~torch.isfinite(norm)).float()
        if found_inf is not None:
            skip = torch.maximum(skip, found_inf.to(norm.device).float())
        self._clip["grad_norm"] = norm
        self._clip["step_skipped"] = skip > 0
        return scale.reshape(()), skip.reshape(())

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """After a step with clipping: the global grad norm (unscaled; a device tensor, no
        sync)."""
        return self._clip["grad_norm"]

    @property
    def step_skipped(self) -> torch.Tensor | None:
        """After a step with clipping: whether it was skipped (a non-finite norm, or
        GradScaler's found_inf), as a device tensor."""
        return self._clip["step_skipped"]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state_dict of this class or of the torch.optim class it replaces.

        Everything is checked first; a refused state_dict leaves the optimizer untouched.
        The check runs as the last load_state_dict pre-hook, so it sees the state_dict as the
        user's pre-hooks left it (one that upgrades an old checkpoint), as torch loads it.
        """
        loaded: list[dict[str, Any]] = []
        rng: list[torch.Tensor] = []
        # How it runs and stores its state is this optimizer's choice, not the checkpoint's: a
        # checkpoint without master weights loads into a run with them and the reverse.
        self.settle_capturable()  # Dynamo's capturable write is not kept as the loader's own
        storage = [{key: g.get(key) for key in RUN_KEYS if key in g} for g in self.param_groups]
        seeds = [g.get("sr_seed") for g in self.param_groups]

        def check(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
            self._check_state_dict(state_dict)
            loaded.append(state_dict)
            rng.append(torch.random.get_rng_state())  # after the user's pre-hooks' draws

        def keep_own(optimizer: torch.optim.Optimizer) -> None:
            """Before the user's post-hooks: this optimizer's run options, and its rounding seed
            where the checkpoint has none (torch.optim's, or a run without stochastic
            rounding). Unpickling the groups drew seeds for them: the generator is set back
            and draws again only for a group that has no seed at all."""
            torch.random.set_rng_state(rng[0])
            saved_groups = loaded[0]["param_groups"]
            for group, kept, seed, saved in zip(
                self.param_groups, storage, seeds, saved_groups, strict=True
            ):
                group.update(kept)
                self._record_capturable(group)
                if "sr_seed" in saved:
                    continue
                group.pop("sr_seed", None)
                if group.get("stochastic_rounding"):
                    group["sr_seed"] = _new_sr_seed() if seed is None else seed

        pre = self.register_load_state_dict_pre_hook(check)
        post = self.register_load_state_dict_post_hook(keep_own, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()
        self._restore_saved_precision(loaded[0])
        self._engine.invalidate()

    def _slots_of(self, group: Mapping[str, Any]) -> set[str]:
        """The state slots a group's entries may hold: the optimizer's spec's, those of the spec
        stepping the group (a Muon group's AdamW: max_exp_avg_sq with amsgrad), master_param."""
        return {*self.spec.slots, *self.spec.for_group(group).slots, "master_param"}

    def _restore_saved_precision(self, state_dict: Mapping[str, Any]) -> None:
        """torch.optim's load casts every floating state tensor to its param's dtype, which
        would round an fp32 master copy or fp32 moments of bf16 params (and NovoGrad's scalar
        second moments) on every resume. The saved values are put back as saved, on the param's
        device; the next step copies them into buffers of the group's state dtype."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [(p, group) for group in self.param_groups for p in group["params"]]
        by_id = dict(zip(saved_ids, params, strict=True))
        for saved_id, entry in state_dict["state"].items():
            p, group = by_id[saved_id]
            if p not in self.state:
                continue
            slots = self._slots_of(group)
            for key, value in entry.items():
                if key == "step" or not isinstance(value, torch.Tensor):
                    continue
                if key not in slots:
                    continue  # the user's own: cast as torch.optim casts it
                if not value.is_floating_point() or value.dtype == p.dtype:
                    continue
                restored = value.detach().to(p.device).clone()
                if key in self.spec.scalar_slots:
                    restored = restored.to(scalar_slot_dtype(p.dtype)).reshape(())
                self.state[p][key] = restored

    def _check_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        groups, saved_groups = self.param_groups, state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or "state" not in state_dict:
            raise ValueError("onepass: a state_dict needs 'state' and 'param_groups'")
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"onepass: loaded state dict has {len(saved_groups)} parameter groups, "
                f"the optimizer has {len(groups)}"
            )
        params: dict[Any, tuple[str, torch.Tensor, dict[str, Any]]] = {}
        for g, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"onepass: loaded parameter group {g} has {len(saved['params'])} params, "
                    f"the optimizer's has {len(group['params'])}"
                )
            loaded = {**group, **saved}  # the group as the load leaves it (saved values win)
            for j, (p, saved_id) in enumerate(zip(group["params"], saved["params"], strict=True)):
                params[saved_id] = (f"param_groups[{g}]['params'][{j}]", p, loaded)
        # master_param: a checkpoint with master weights loads into a run without them (the
        # params already hold the masters rounded) and the reverse (masters from the params).
        for saved_id, entry in state_dict["state"].items():
            if saved_id not in params:
                raise ValueError(f"onepass: state_dict has state for unknown param id {saved_id}")
            name, p, group = params[saved_id]
            # The slots of the spec stepping this group (a Muon group's AdamW: max_exp_avg_sq
            # with amsgrad). Another algorithm's slot is a checkpoint of that algorithm (AdamW's
            # exp_avg_sq in a Lion run): refused. Any other key is the user's own (an EMA kept
            # in optimizer.state), loaded and kept as torch.optim keeps it.
            known = {*self._slots_of(group), "step"}
            foreign = ALGORITHM_SLOTS - known
            for key, value in entry.items():
                if key in foreign:
                    raise ValueError(
                        f"onepass: state_dict slot {key!r} of {name} is another algorithm's, not "
                        f"a slot of {self.spec.name} (expected {sorted(known)})"
                    )
                if key not in known:
                    continue
                if key == "step":
                    if not isinstance(value, numbers.Real) and not (
                        isinstance(value, torch.Tensor) and value.numel() == 1
                    ):
                        raise ValueError(
                            f"onepass: state_dict 'step' of {name} is {_shape_of(value)}, expected "
                            "a number or a one-element tensor"
                        )
                    # A step count the rules cannot start from (Adam's bias correction divides
                    # by 1 - beta^(step + 1)): refused here, not by a step failing part-way.
                    count = float(value)
                    if not (math.isfinite(count) and count >= 0):
                        raise ValueError(
                            f"onepass: state_dict 'step' of {name} is {count}, expected a finite "
                            "count >= 0"
                        )
                    continue
                if value is None:
                    continue
                if key in self.spec.scalar_slots:
                    if not isinstance(value, torch.Tensor) or value.numel() != 1:
                        raise ValueError(
                            f"onepass: state_dict slot {key!r} of {name} has shape "
                            f"{_shape_of(value)}, expected one value per tensor (0-d or 1 element)"
                        )
                    continue
                if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                    raise ValueError(
                        f"onepass: state_dict slot {key!r} of {name} has shape {_shape_of(value)}, "
                        f"the param has {tuple(p.shape)}"
                    )
                if value.layout != torch.strided:
                    raise ValueError(
                        f"onepass: state_dict slot {key!r} of {name} is a {value.layout} tensor; "
                        "onepass keeps state in dense (strided) tensors"
                    )
            if self.spec.step_in_state and any(k != "step" for k in entry) and "step" not in entry:
                raise ValueError(f"onepass: state_dict state of {name} has no 'step'")
            # A stepped param's entry holds every slot its group uses (torch.optim fails at the
            # step on one it lacks; onepass would start it from zeros under the saved step).
            spec = self.spec.for_group(group)
            if any(k != "master_param" for k in entry):
                missing = [
                    slot
                    for slot in spec.active_slots(group)
                    if entry.get(slot) is None and slot not in spec.optional_slots
                ]
                if missing:
                    raise ValueError(
                        f"onepass: state_dict state of {name} has no {missing[0]!r}, a slot its "
                        f"param group uses (it has {sorted(entry)})"
                    )
