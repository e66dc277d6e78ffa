"""The engine of the seeded differential fuzzes (tests/test_fuzz_torch_optim.py,
tests/test_fuzz_family.py): two runs of an optimizer, each in its own library or onepass
backend, under the same random sequence of user operations, compared as they go.

A case builds two identical sets of params (odd shapes, a zero-size one, a non-contiguous one, a
frozen one that never gets a grad), one optimizer per side with the same random hyperparameters
(sometimes two param groups), and applies ``N_OPS`` random operations to both: grads (some None)
and steps, steps on the grads already there, zero_grad, hyperparameter changes between steps, an
LR scheduler, add_param_group, and state_dict round trips (same library or backend) and
cross-loads (each side continues in the other library or backend from its own state_dict).
Params are compared after every operation; state and the state_dicts after every state_dict
operation and at the end. A failure names the case and lists the operations so far. CPU-backend
cases cycle through the SIMD builds this CPU runs, by seed.

A test file subclasses :class:`Fuzz` with what is its own: the libraries of the two sides and how
to build each (:meth:`Fuzz.pair`, :meth:`Fuzz.build`), the hyperparameters it draws and changes,
the group keys both sides share, the shapes, the tolerances (and a growing allowance, where one
side's rounding legitimately adds up over steps), and the random streams; then runs a case with
:func:`run_fuzz`.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import pytest
import torch

import onepass

F32, F64 = torch.float32, torch.float64
N_OPS = 25

#: Relative weights of the operations :func:`run_fuzz` draws.
OPS = {
    "step": 10.0,
    "step_kept": 1.5,
    "zero_grad": 2.0,
    "set_hparam": 3.0,
    "scheduler": 2.0,
    "add_group": 1.0,
    "cross_load": 2.0,
    "round_trip": 1.0,
}

#: The initial shape made a non-contiguous leaf (a transposed storage).
STRIDED = (4, 3)

#: A scheduler op may come before an optimizer's first step (before any step, or just after a
#: reload built fresh optimizers); torch warns, and the fuzz means to run that order.
ignore_scheduler_order = pytest.mark.filterwarnings(
    "ignore:Detected call of `lr_scheduler.step\\(\\)`"
)


# ------------------------------------------------------------------------------------------------
# Random draws
# ------------------------------------------------------------------------------------------------


def new_param(
    shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, strided: bool = False
) -> torch.Tensor:
    if strided and len(shape) == 2:  # a non-contiguous leaf (a transposed storage)
        base = torch.randn(shape[::-1], generator=gen, dtype=F64).to(dtype)
        return base.t().requires_grad_()
    return torch.randn(shape, generator=gen, dtype=F64).to(dtype).requires_grad_()


def twin(p: torch.Tensor) -> torch.Tensor:
    """An independent leaf with the same values, strides and requires_grad."""
    q = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype)
    q.copy_(p.detach())
    return q.requires_grad_(p.requires_grad)


def draw_grad(p: torch.Tensor, rng: random.Random, gen: torch.Generator) -> torch.Tensor:
    r = rng.random()
    if r < 0.08:
        return torch.zeros_like(p)
    scale = 10 ** rng.uniform(-3, 1)
    g = (torch.randn(p.shape, generator=gen, dtype=F64) * scale).to(p.dtype)
    if r > 0.85 and p.dim() == 2:  # a grad laid out differently from its param
        g = g.t().contiguous().t()
    return g


def largest(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


# ------------------------------------------------------------------------------------------------
# The two runs
# ------------------------------------------------------------------------------------------------


@dataclass
class Side:
    """One run: its own params and the optimizer stepping them."""

    name: str
    params: list[torch.Tensor]
    lib: str
    opt: torch.optim.Optimizer
    sched: Any = None


@dataclass
class Fuzz:
    """One case. The hooks below (pair .. slack_rate) are what a test file provides or changes."""

    kind: str
    seed: int
    backend: str  # onepass's backend against a peer library; "cpu" for cpu-vs-reference kinds
    dtype: torch.dtype
    flatten: bool
    rng: random.Random = field(init=False)
    gen: torch.Generator = field(init=False)
    sides: tuple[Side, Side] = field(init=False)
    groups: list[list[int]] = field(init=False)  # param indices of each group, the same on both
    frozen: int = field(init=False)
    ctor: dict[str, Any] = field(init=False)  # both libraries' constructor arguments
    log: list[str] = field(default_factory=list)
    sched_factory: Callable[[torch.optim.Optimizer], Any] | None = None
    slack: list[float] = field(default_factory=list)  # per param: the growing allowance

    # -- hooks ----------------------------------------------------------------------------------

    #: Seeds the torch generator (params, grads): this plus the case's seed.
    GEN_SEED = 0

    def rng_key(self) -> str:
        """Seeds the operations' random stream."""
        return f"{self.kind}/{self.seed}/{self.backend}/{self.dtype}/{self.flatten}"

    def pair(self) -> tuple[str, str]:
        """Side A starts in the first library (or backend), side B in the second; a cross-load
        swaps."""
        raise NotImplementedError

    def build(self, lib: str, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """A fresh optimizer of ``lib`` (a library, or a onepass backend) over ``groups``, with
        the constructor arguments ``self.ctor``."""
        raise NotImplementedError

    def draw_hparams(self) -> dict[str, Any]:
        """A full set of hyperparameters for a constructor or a param group (floats, no
        tensors)."""
        raise NotImplementedError

    def draw_ctor(self) -> dict[str, Any]:
        """The constructor's arguments."""
        return self.draw_hparams()

    def initial_shapes(self) -> list[tuple[int, ...]]:
        """The params' shapes at construction (shuffled; ``STRIDED`` is made non-contiguous)."""
        raise NotImplementedError

    def new_shape(self) -> tuple[int, ...]:
        """The shape of add_param_group's param."""
        raise NotImplementedError

    def shared_keys(self) -> Sequence[str]:
        """Group keys both sides keep with the same meaning (compared in the state_dicts)."""
        raise NotImplementedError

    def mutable_keys(self, group: dict[str, Any]) -> Sequence[str]:
        """The keys op_set_hparam may change in ``group``."""
        raise NotImplementedError

    def draw_value(self, key: str, group: dict[str, Any]) -> Any:
        """A new value of ``group[key]``: lr scaled, a flag flipped, anything else drawn
        afresh."""
        if key == "lr":
            return float(group["lr"]) * self.rng.choice([0.1, 0.5, 2.0, 3.0])
        if isinstance(group[key], bool):
            return not group[key]
        return self.draw_hparams()[key]

    def draw_overrides(self, hp: dict[str, Any]) -> dict[str, Any]:
        """Some keys of ``hp`` only, for add_param_group: the group takes the rest from the
        optimizer's defaults."""
        return {k: v for k, v in hp.items() if self.rng.random() < 0.5}

    def valid_group(self, overrides: dict[str, Any]) -> None:
        """Makes a group's own keys (over ``self.ctor``) valid for both sides, in place."""

    def one_cycle_max_lr(self) -> float:
        """OneCycleLR's max_lr, when that is the scheduler drawn."""
        return 0.05

    def tolerance(self) -> tuple[float, float]:
        """(rtol, atol) of every comparison (params, state, state_dict entries)."""
        raise NotImplementedError

    def slack_rate(self) -> float:
        """Where nonzero, each param's atol grows at every step by this times the largest
        element of that step's update, on either side (see :meth:`steps_with_slack`)."""
        return 0.0

    # -- construction ---------------------------------------------------------------------------

    def __post_init__(self) -> None:
        """Draws the params, the constructor's arguments and the groups; builds both sides."""
        self.rng = rng = random.Random(self.rng_key())
        self.gen = torch.Generator().manual_seed(self.GEN_SEED + self.seed)
        shapes = self.initial_shapes()
        rng.shuffle(shapes)
        params = [new_param(s, self.gen, self.dtype, strided=(s == STRIDED)) for s in shapes]
        self.frozen = rng.randrange(len(params))
        params[self.frozen].requires_grad_(False)
        self.ctor = ctor = self.draw_ctor()
        order = list(range(len(params)))
        if rng.random() < 0.5:  # two groups, the second with its own hyperparameters
            cut = rng.randrange(1, len(params))
            self.groups = [order[:cut], order[cut:]]
            second = self.draw_hparams()
            extra = [{k: second[k] for k in second if rng.random() < 0.6}]
        else:
            self.groups, extra = [order], []
        self.slack = [0.0] * len(params)
        own: list[dict[str, Any]] = [{}, *(dict(e) for e in extra)]
        for overrides in own[1:]:
            self.valid_group(overrides)
        # The first optimizers take the second group's hyperparameters as group keys.
        twins = [twin(p) for p in params]
        lib_a, lib_b = self.pair()
        self.sides = (
            Side("A", params, lib_a, self.build(lib_a, self.param_groups(params, own))),
            Side("B", twins, lib_b, self.build(lib_b, self.param_groups(twins, own))),
        )
        self.log.append(f"ctor {ctor}; groups {self.groups} {extra}; frozen {self.frozen}")

    def param_groups(
        self, params: list[torch.Tensor], own: list[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        """The run's groups over ``params`` (one side's), with each group's ``own`` keys."""
        own = own or [{}] * len(self.groups)
        return [{"params": [params[i] for i in idx], **own[k]} for k, idx in enumerate(self.groups)]

    def fail(self, what: str, error: AssertionError) -> NoReturn:
        roles = ", ".join(f"{s.name}={s.lib}" for s in self.sides)
        ops = "\n  ".join(self.log)
        raise AssertionError(
            f"{self.kind} backend={self.backend} dtype={self.dtype} flatten={self.flatten} "
            f"seed={self.seed} ({roles}): {what}\n{error}\nops:\n  {ops}"
        ) from error

    # -- comparisons ----------------------------------------------------------------------------

    def check_params(self, what: str) -> None:
        a, b = self.sides
        rtol, atol = self.tolerance()
        for i, (pa, pb) in enumerate(zip(a.params, b.params, strict=True)):
            try:
                torch.testing.assert_close(
                    pa.detach(), pb.detach(), rtol=rtol, atol=atol + self.slack[i]
                )
            except AssertionError as e:
                self.fail(f"param {i} after {what} (slack {self.slack[i]:.3g})", e)

    def check_state(self, what: str) -> None:
        a, b = self.sides
        for i, (pa, pb) in enumerate(zip(a.params, b.params, strict=True)):
            sa, sb = a.opt.state.get(pa, {}), b.opt.state.get(pb, {})
            self.compare_entry(f"state of param {i} after {what}", sa, sb)

    def compare_entry(self, what: str, sa: Any, sb: Any) -> None:
        rtol, atol = self.tolerance()
        try:
            assert sorted(sa) == sorted(sb), f"slots {sorted(sa)} != {sorted(sb)}"
            for key in sa:
                va, vb = sa[key], sb[key]
                if key == "step":
                    assert va.dtype == vb.dtype, f"step dtype {va.dtype} != {vb.dtype}"
                    assert float(va) == float(vb), f"step {float(va)} != {float(vb)}"
                    continue
                torch.testing.assert_close(va, vb, rtol=rtol, atol=atol, msg=lambda m, k=key: k + m)
        except AssertionError as e:
            self.fail(what, e)

    def check_state_dicts(self, sda: dict[str, Any], sdb: dict[str, Any], what: str) -> None:
        try:
            assert len(sda["param_groups"]) == len(sdb["param_groups"])
            for ga, gb in zip(sda["param_groups"], sdb["param_groups"], strict=True):
                assert ga["params"] == gb["params"], f"param ids {ga['params']} != {gb['params']}"
                for key in self.shared_keys():
                    assert (key in ga) == (key in gb), f"group key {key!r} in one only"
                    if key in ga:
                        va, vb = ga[key], gb[key]
                        assert va == vb, f"group {key}: {va!r} != {vb!r}"
            assert sorted(sda["state"]) == sorted(sdb["state"]), (
                f"state ids {sorted(sda['state'])} != {sorted(sdb['state'])}"
            )
        except AssertionError as e:
            self.fail(f"state_dict after {what}", e)
        for k in sda["state"]:
            self.compare_entry(f"state_dict entry {k} at {what}", sda["state"][k], sdb["state"][k])

    # -- operations -----------------------------------------------------------------------------

    def op_step(self, new_grads: bool) -> None:
        a, b = self.sides
        if new_grads:
            # Per param, as backward and users leave it: not reached (grad as it was), grad
            # set to None, a new grad tensor, or a grad accumulated into the one there.
            drawn = []
            for i, (pa, pb) in enumerate(zip(a.params, b.params, strict=True)):
                r = self.rng.random()
                if i == self.frozen or r < 0.2:
                    drawn.append(".")
                elif r < 0.3:
                    drawn.append("-")
                    pa.grad = pb.grad = None
                else:
                    g = draw_grad(pa, self.rng, self.gen)
                    if r < 0.65 or pa.grad is None:
                        drawn.append("g")
                        pa.grad, pb.grad = g, twin(g)
                    else:
                        drawn.append("+")
                        pa.grad.add_(g)
                        pb.grad.add_(g)
            self.log.append(f"grads {''.join(drawn)}; step")
        else:
            self.log.append("step (grads kept)")
        rate = self.slack_rate()
        if rate:
            self.steps_with_slack(rate)
        else:
            a.opt.step()
            b.opt.step()
        self.check_params(self.log[-1])

    def steps_with_slack(self, rate: float) -> None:
        """Both steps; each param's slack grows by ``rate`` times the largest element of its
        update, p_new - p_old*(1 - lr*wd) (the decoupled decay taken out), on either side."""
        a, b = self.sides
        before = [p.detach().clone() for p in (*a.params, *b.params)]
        decay = [1.0] * len(a.params)
        for k, idx in enumerate(self.groups):
            group = a.opt.param_groups[k]
            for i in idx:
                decay[i] = 1 - float(group["lr"]) * float(group["weight_decay"])
        a.opt.step()
        b.opt.step()
        for i, factor in enumerate(decay):
            pa, pb = a.params[i].detach(), b.params[i].detach()
            ua = largest(pa - before[i] * factor)
            ub = largest(pb - before[len(a.params) + i] * factor)
            self.slack[i] += rate * max(ua, ub)

    def op_zero_grad(self) -> None:
        set_to_none = self.rng.random() < 0.5
        self.log.append(f"zero_grad(set_to_none={set_to_none})")
        for s in self.sides:
            s.opt.zero_grad(set_to_none=set_to_none)

    def op_set_hparam(self) -> None:
        g = self.rng.randrange(len(self.groups))
        group = self.sides[0].opt.param_groups[g]
        key = self.rng.choice(self.mutable_keys(group))
        value = self.draw_value(key, group)
        self.log.append(f"param_groups[{g}][{key!r}] = {value!r}")
        for s in self.sides:
            s.opt.param_groups[g][key] = value

    def make_sched_factory(self) -> Callable[[torch.optim.Optimizer], Any]:
        sched = torch.optim.lr_scheduler
        kinds = ["StepLR", "LambdaLR", "ExponentialLR", "CosineAnnealingLR", "OneCycleLR"]
        which = self.rng.choice(kinds)
        step_size, gamma = self.rng.randint(1, 3), self.rng.uniform(0.5, 0.95)
        max_lr = self.one_cycle_max_lr()
        self.log.append(f"scheduler {which} (step_size={step_size}, gamma={gamma!r})")
        if which == "StepLR":
            return lambda opt: sched.StepLR(opt, step_size=step_size, gamma=gamma)
        if which == "LambdaLR":
            return lambda opt: sched.LambdaLR(opt, lambda epoch: 1.0 / (1.0 + 0.3 * epoch))
        if which == "ExponentialLR":
            return lambda opt: sched.ExponentialLR(opt, gamma=gamma)
        if which == "CosineAnnealingLR":
            return lambda opt: sched.CosineAnnealingLR(opt, T_max=6, eta_min=1e-4)
        # Also cycles beta1 (Adam, Lion, NovoGrad, FAdam) or momentum (SGD, from 0 too; Muon) at
        # every step, and sets every group's initial_lr (Lion's "independent" decay reads it).
        return lambda opt: sched.OneCycleLR(opt, max_lr=max_lr, total_steps=4 * N_OPS)

    def op_scheduler(self) -> None:
        if self.sched_factory is None:
            self.sched_factory = self.make_sched_factory()
        for s in self.sides:
            if s.sched is None:
                s.sched = self.sched_factory(s.opt)
            s.sched.step()
        self.log.append("scheduler.step()")
        lrs = [[g["lr"] for g in s.opt.param_groups] for s in self.sides]
        assert lrs[0] == lrs[1], lrs

    def op_add_group(self) -> None:
        shape = self.new_shape()
        overrides = self.draw_overrides(self.draw_hparams())
        self.valid_group(overrides)
        pa = new_param(shape, self.gen, self.dtype)
        pb = twin(pa)
        index = len(self.sides[0].params)
        self.groups.append([index])
        self.slack.append(0.0)
        self.log.append(f"add_param_group(shape={shape}, {overrides})")
        for s, p in zip(self.sides, (pa, pb), strict=True):
            s.params.append(p)
            s.opt.add_param_group({"params": [p], **overrides})
            # A scheduler knows the groups it was made for (LambdaLR refuses a state_dict of
            # fewer): the user makes a new one, at the next scheduler operation.
            s.sched = None

    def reload(self, cross: bool) -> None:
        """Both sides' state_dicts, compared, then each loaded into a fresh optimizer of the
        other library or backend (cross) or of its own, over the same params; the run
        continues there."""
        a, b = self.sides
        sds = [s.opt.state_dict() for s in self.sides]
        via_bytes = self.rng.random() < 0.5
        self.log.append(f"{'cross-load' if cross else 'round trip'} (via torch.save={via_bytes})")
        self.check_state_dicts(sds[0], sds[1], self.log[-1])
        if via_bytes:  # a checkpoint on disk: independent tensors, loaded weights_only
            for k, sd in enumerate(sds):
                buf = io.BytesIO()
                torch.save(sd, buf)
                buf.seek(0)
                sds[k] = torch.load(buf, weights_only=True)
        first, second = self.pair()
        for s, sd in zip(self.sides, sds, strict=True):
            lib = s.lib
            if cross:
                lib = second if lib == first else first
            sched_sd = None if s.sched is None else s.sched.state_dict()
            s.lib, s.opt = lib, self.build(lib, self.param_groups(s.params))
            s.opt.load_state_dict(sd)
            if sched_sd is not None:
                assert self.sched_factory is not None
                s.sched = self.sched_factory(s.opt)
                s.sched.load_state_dict(sched_sd)
        self.check_state(self.log[-1])
        self.check_state_dicts(a.opt.state_dict(), b.opt.state_dict(), f"{self.log[-1]}, reloaded")
        self.check_params(self.log[-1])


def cpu_build(seed: int) -> str:
    """The SIMD build a CPU-backend case runs: the builds this CPU runs, in turn by seed (they
    give the same bits: test_numerics.py::test_capabilities_agree). Case ids name it, so that a
    failure says which build ran: the same seed picks another build on a CPU with other builds."""
    builds = onepass.cpu_capabilities() if onepass.native_available() else ["unbuilt"]
    return builds[seed % len(builds)]


def case_backend(backend: str, seed: int) -> str:
    """A case's backend as its id names it: "cpu-<build>" for the CPU backend."""
    return f"cpu-{cpu_build(seed)}" if backend == "cpu" else backend


def run_fuzz(
    cls: type[Fuzz], kind: str, seed: int, backend: str, dtype: torch.dtype, flatten: bool
) -> None:
    """One case: ``N_OPS`` random operations, a last step, the final comparisons."""
    if backend == "cpu":  # the build its id names (the autouse fixture restores the old one)
        onepass.set_cpu_capability(cpu_build(seed))
    fuzz = cls(kind, seed, backend, dtype, flatten)
    names, weights = list(OPS), list(OPS.values())
    added = 0
    for _ in range(N_OPS):
        op = fuzz.rng.choices(names, weights)[0]
        if op == "add_group" and added >= 2:
            op = "step"
        if op == "step":
            fuzz.op_step(new_grads=True)
        elif op == "step_kept":
            fuzz.op_step(new_grads=False)
        elif op == "zero_grad":
            fuzz.op_zero_grad()
        elif op == "set_hparam":
            fuzz.op_set_hparam()
        elif op == "scheduler":
            fuzz.op_scheduler()
        elif op == "add_group":
            added += 1
            fuzz.op_add_group()
        else:
            fuzz.reload(cross=op == "cross_load")
        fuzz.check_params(fuzz.log[-1])
    fuzz.op_step(new_grads=True)
    fuzz.check_state("the end")
    a, b = fuzz.sides
    fuzz.check_state_dicts(a.opt.state_dict(), b.opt.state_dict(), "the end")
    assert all(math.isfinite(float(p.detach().double().sum())) for p in a.params)
