"""torch.compile(fullgraph=True) of a function that calls opt.step(): no graph break, the same
results as eager, and no recompilation when a tensor lr changes (grads updated in place, as after
zero_grad(set_to_none=False): Dynamo guards on the identity of replaced grads).

The lr changes as an LR scheduler changes a tensor lr: in place (``group["lr"].fill_(...)``). An
LRScheduler object itself is not attached: it wraps ``opt.step`` in a function Dynamo refuses to
trace, for torch.optim's optimizers as for ours.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import pytest
import torch
import torch._dynamo.testing

import onepass
import onepass._capturable
from onepass._engine import cuda_kernels_built

from helpers import assert_verbose_allclose

pytestmark = pytest.mark.skipif(not onepass.native_available(), reason="onepass._C not built")

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available() or not cuda_kernels_built(),
            reason="needs a GPU and onepass._C built with CUDA kernels",
        ),
    ),
]


@pytest.mark.parametrize(
    "make",
    [
        lambda ps, lr: onepass.AdamW(ps, lr=lr, weight_decay=0.1, amsgrad=True),
        lambda ps, lr: onepass.Adam(ps, lr=lr, weight_decay=0.1, decay="independent"),
        lambda ps, lr: onepass.SGD(ps, lr=lr, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda ps, lr: onepass.Lion(ps, lr=lr, weight_decay=0.1, maximize=True),
        lambda ps, lr: onepass.NovoGrad(ps, lr=lr, weight_decay=0.1, amsgrad=True),
        lambda ps, lr: onepass.FAdam(ps, lr=lr, clip=0.5, p=0.25),
        lambda ps, lr: onepass.Muon(ps, lr=lr, ns_dtype=torch.float32),
    ],
    ids=["AdamW", "Adam-independent", "SGD", "Lion", "NovoGrad", "FAdam", "Muon"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_step_matches_eager_without_recompiling(make, device: str) -> None:
    """On CUDA the lr tensor lives on the GPU (as torch.optim's fused steps want it there)."""
    torch._dynamo.reset()
    shapes = [(5, 3), (7,), (1,), (0,), (33,)]
    ours = [torch.randn(s, device=device).requires_grad_() for s in shapes]
    eager = [p.detach().clone().requires_grad_() for p in ours]
    opt = make(ours, torch.tensor(0.01, device=device))
    ref = make(eager, torch.tensor(0.01, device=device))
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(fullgraph=True, backend=counter)
    def compiled_step() -> None:
        opt.step()

    for step in range(7):
        for p, q in zip(ours, eager, strict=True):
            g = torch.randn_like(p)
            if p.grad is None:
                p.grad, q.grad = g.clone(), g.clone()
            else:  # as backward after zero_grad(set_to_none=False): the same grad tensors
                p.grad.copy_(g)
                q.grad.copy_(g)
        compiled_step()
        ref.step()
        for o in (opt, ref):
            for group in o.param_groups:  # Muon has an AdamW group too, with its own lr
                group["lr"].mul_(0.7)
        # The first call compiles; the second sees state that now exists; lr changes after that
        # (every step) must not compile again.
        assert counter.frame_count <= 2, f"recompiled at step {step}"
    assert float(opt.param_groups[0]["lr"]) < 0.01 * 0.7**6 * 1.01
    for i, (p, q) in enumerate(zip(ours, eager, strict=True)):
        assert_verbose_allclose(p, q, 1e-6, 1e-7, f"param {i}")
        for name, value in ref.state[q].items():
            assert_verbose_allclose(opt.state[p][name], value, 1e-6, 1e-7, f"{name} {i}")


def test_eager_and_compiled_steps_share_the_buckets() -> None:
    """Dynamo shows every group as capturable while it traces a step: eager steps between
    compiled ones must still find the same buckets (a rebuild copies all the state)."""
    torch._dynamo.reset()
    params = [torch.randn(5, 3).requires_grad_(), torch.randn(7).requires_grad_()]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = onepass.AdamW(params, lr=torch.tensor(0.01))

    @torch.compile(fullgraph=True)
    def compiled_step() -> None:
        opt.step()

    opt.step()
    plan = opt._engine.plans[0]
    for _ in range(2):
        compiled_step()
        opt.step()
    assert opt._engine.plans[0] is plan


def _give_grads(ours: list[torch.Tensor], theirs: list[torch.Tensor], gen: torch.Generator) -> None:
    """The same new grads for both lists: ours written in place once they exist (as after
    zero_grad(set_to_none=False), so that Dynamo's guards on the grads hold), theirs replaced."""
    for p, q in zip(ours, theirs, strict=True):
        g = torch.randn(p.shape, generator=gen)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        q.grad = g


@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph-breaks", "fullgraph"])
@pytest.mark.parametrize("flatten", [False, True], ids=["per-tensor", "flatten"])
def test_compiled_and_eager_steps_from_the_first(flatten: bool, fullgraph: bool) -> None:
    """Compiled and eager steps from the optimizer's first step on, as torch.optim's.

    Without fullgraph, a first compiled step breaks the graph where the buckets are built:
    Dynamo runs the engine's step eagerly and still traces its launcher, which must get a grads
    list (the eager entry point reads .grad itself; the operator takes the list). With
    flatten=True the first step moves the params into the flat buffer, which only runs eagerly:
    under fullgraph that step is eager. Compiled steps of a flattened bucket take the per-tensor
    path (the flat path's identity check reads addresses Dynamo cannot trace)."""
    first_compiled = not (flatten and fullgraph)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(s, generator=gen).requires_grad_() for s in ((5, 3), (7,), (33,))]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = onepass.AdamW(ours, lr=torch.tensor(0.01), flatten=flatten)
    expected = torch.optim.AdamW(theirs, lr=torch.tensor(0.01))

    @torch.compile(fullgraph=fullgraph)
    def compiled_step() -> None:
        opt.step()

    compiled_steps = (0, 2, 3) if first_compiled else (2, 3)
    for step in range(5):
        _give_grads(ours, theirs, gen)
        compiled_step() if step in compiled_steps else opt.step()
        expected.step()
    for p, q in zip(ours, theirs, strict=True):
        assert_verbose_allclose(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        assert float(opt.state[p]["step"]) == float(expected.state[q]["step"]) == 5.0


def test_compiled_step_asks_no_cuda_capture_query(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step asks whether the CUDA stream is capturing a graph, but not while Dynamo traces it:
    Dynamo cannot trace the query (GPU run 5 found every compiled CUDA step broken by it). Here
    onepass sees a GPU whose query fails, so a trace that reached it would break the graph."""

    def query() -> bool:
        raise RuntimeError("the capture query was reached")

    gpu = types.SimpleNamespace(is_available=lambda: True, is_current_stream_capturing=query)
    seen_by_onepass = types.SimpleNamespace(**{**vars(torch), "cuda": gpu})
    monkeypatch.setattr(onepass._capturable, "torch", seen_by_onepass)
    params = [torch.randn(5, 3).requires_grad_(), torch.randn(7).requires_grad_()]
    for p in params:
        p.grad = torch.randn_like(p)
    for cls in (onepass.AdamW, onepass.SGD, onepass.NovoGrad, onepass.FAdam, onepass.Muon):
        torch._dynamo.reset()
        opt = cls(params, lr=torch.tensor(0.01))
        counter = torch._dynamo.testing.CompileCounter()

        @torch.compile(fullgraph=True, backend=counter)
        def compiled_step() -> None:
            opt.step()  # noqa: B023 (called only in this iteration)

        compiled_step()
        compiled_step()
        assert counter.frame_count >= 1, cls.__name__
    with pytest.raises(RuntimeError, match="capture query"):  # eager steps do ask it
        onepass.AdamW(params, lr=0.01).step()


@pytest.mark.parametrize(
    "cls", [onepass.SGD, onepass.AdamW, onepass.FAdam], ids=lambda c: c.__name__
)
def test_compiled_step_follows_a_float_lr(cls: type) -> None:
    """A float lr that a scheduler reassigns between compiled steps: each step uses the new
    value (it may recompile; a tensor lr does not). Under AOTAutograd the float becomes a graph
    input and the graph is traced again, and that second trace dropped a ``fill_`` of a cached
    lr scalar: every step after the first change ran at the old lr (torch 2.13, aot_eager and
    inductor)."""
    torch._dynamo.reset()
    ours = [torch.zeros(4, requires_grad=True)]
    eager = [torch.zeros(4, requires_grad=True)]
    opt, ref = cls(ours, lr=1.0), cls(eager, lr=1.0)
    compiled_step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    for lr in (1.0, 0.5, 0.25, 0.125):
        ours[0].grad = torch.full((4,), 0.5)
        eager[0].grad = torch.full((4,), 0.5)
        opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = lr
        compiled_step()
        ref.step()
        assert_verbose_allclose(ours[0].detach(), eager[0].detach(), 1e-6, 1e-7, f"lr {lr}")


def _params_and_state(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for group in opt.param_groups for p in group["params"]]
    return tensors + [v.clone() for entry in opt.state.values() for v in entry.values()]


def _refused_compiled(opt: torch.optim.Optimizer, match: str) -> None:
    """A fullgraph compiled step is refused with onepass's message (Dynamo reports it as an
    observed exception, our error in its text) and changes nothing."""
    before = _params_and_state(opt)
    with pytest.raises(Exception, match=match):
        torch.compile(opt.step, fullgraph=True, backend="eager")()
    after = _params_and_state(opt)
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda ps: onepass.AdamW(ps, betas=(torch.tensor(0.9), 0.999)), "betas"),
        (lambda ps: onepass.Adam(ps, eps=torch.tensor(1e-8)), "eps"),
        (lambda ps: onepass.SGD(ps, momentum=0.9, weight_decay=torch.tensor(0.1)), "weight_decay"),
        (lambda ps: onepass.Lion(ps, betas=(0.9, torch.tensor(0.99))), "betas"),
    ],
    ids=["AdamW-betas", "Adam-eps", "SGD-weight_decay", "Lion-betas"],
)
def test_tensor_hyperparameter_other_than_lr_refused_when_compiled(make, key: str) -> None:
    """The ops take every hyperparameter but the lr as a float: a tensor beta, eps or weight
    decay cannot reach them from a trace (it failed deep in the trace: a SymFloat where the op
    takes a float, or a guard on a data-dependent value). Refused by name under fullgraph;
    without fullgraph Dynamo falls back to an eager step, which reads it and matches eager."""
    torch._dynamo.reset()
    ours = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    eager = [p.detach().clone().requires_grad_() for p in ours]
    opt, ref = make(ours), make(eager)
    for step in range(2):
        for p, q in zip(ours, eager, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        if step == 0:
            _refused_compiled(opt, rf"{key}\W* holds a tensor")
        torch.compile(opt.step, backend="eager")()
        ref.step()
    for p, q in zip(ours, eager, strict=True):
        assert_verbose_allclose(p.detach(), q.detach(), 1e-6, 1e-7)


@pytest.mark.parametrize("change", ["first grad", "amsgrad", "load_state_dict"])
def test_flat_buffer_rebuild_refused_when_compiled(change: str) -> None:
    """With flatten=True a step that must rebuild the flat buffer (it moves the params, which
    only runs eagerly) is refused under fullgraph with what to do, not a trace error on a
    storage's data_ptr; the eager step after it builds the buffer."""
    torch._dynamo.reset()
    a, b = torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)
    a.grad = torch.randn(5, 3)
    opt = onepass.AdamW([a, b], lr=torch.tensor(0.01), flatten=True)
    opt.step()  # eager: builds the flat buffer
    torch.compile(opt.step, fullgraph=True, backend="eager")()
    if change == "first grad":
        b.grad = torch.randn(7)
    elif change == "amsgrad":
        opt.param_groups[0]["amsgrad"] = True
    else:
        opt.load_state_dict(opt.state_dict())
    _refused_compiled(opt, "flatten=True and builds its flat buffer at this step")
    opt.step()
    torch.compile(opt.step, fullgraph=True, backend="eager")()


def test_capturable_cpu_params_refused_when_compiled() -> None:
    """capturable=True with CPU params is refused by an eager step; a compiled step had taken
    it (Dynamo shows every group as capturable, so the CPU case was let through), stepped, and
    left the refusal to the next eager step."""
    torch._dynamo.reset()
    p = torch.randn(5, requires_grad=True)
    p.grad = torch.randn(5)
    opt = onepass.AdamW([p], lr=torch.tensor(0.01), capturable=True)
    _refused_compiled(opt, "capturable=True needs CUDA params")


def test_muon_flattened_with_grads_that_come_and_go_compiles_with_static_shapes() -> None:
    """The README's workaround: Muon with flatten=True, compiled without fullgraph, with grads
    that are None on some steps. Dynamo then recompiles the launcher with dynamic shapes, and
    AOTAutograd's check of the flat buffer's overlapping views fails on them (torch 2.13:
    "Cannot call numel() on tensor with symbolic sizes"); with automatic dynamic shapes off the
    steps compile and match eager ones."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    shapes = [((5, 3), torch.bfloat16), ((4, 6), torch.float32), ((7,), torch.bfloat16)]
    shapes += [((6, 4), torch.float32), ((3, 3), torch.float32)]
    ours = [torch.randn(s, generator=gen).to(d).requires_grad_() for s, d in shapes]
    eager = [p.detach().clone().requires_grad_() for p in ours]
    make = functools.partial(onepass.Muon, lr=torch.tensor(0.01), ns_dtype=torch.float32)
    opt, ref = make(ours, flatten=True), make(eager, flatten=True)
    compiled_step = torch.compile(opt.step, backend="aot_eager")
    pattern = [(1, 1, 1, 1, 0), (0, 1, 0, 1, 1), (1, 0, 1, 0, 1), (1, 1, 1, 1, 0), (1, 1, 1, 1, 1)]
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        for i, mask in enumerate(pattern):
            for p, q, has_grad in zip(ours, eager, mask, strict=True):
                g = torch.randn(p.shape, generator=gen).to(p.dtype) if has_grad else None
                p.grad, q.grad = g, None if g is None else g.clone()
            (opt.step if i == 0 else compiled_step)()
            ref.step()
    for p, q in zip(ours, eager, strict=True):
        assert_verbose_allclose(p.detach().float(), q.detach().float(), 1e-5, 1e-6)


def test_compiled_step_consumes_a_pending_clip_and_reports_the_norm() -> None:
    """A compiled step applies the clip clip_grad_norm_ left pending, and the next step does
    not apply it again; it reports grad_norm as an eager step does. Dynamo drops the writes of
    a compiled step to the optimizer's attributes: the pending clip had stayed and clipped the
    next step with a stale norm, and grad_norm stayed None."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        p = torch.ones(5, dtype=torch.float64, requires_grad=True)
        opt = onepass.SGD([p], lr=0.1, backend="cpu")
        p.grad = torch.full_like(p, 10.0)
        opt.step()
        step = torch.compile(opt.step, fullgraph=True, backend="eager") if compiled else opt.step
        norm = opt.clip_grad_norm_(1.0)
        step()
        assert opt.grad_norm is not None and torch.equal(opt.grad_norm, norm.float())
        p.grad = torch.full_like(p, 3.0)
        step()
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1])


def test_compiled_train_step_with_flat_grads_zeroed_in_place() -> None:
    """flatten=True, and a compiled function that steps and zeroes the grads in place (what the
    README tells compiled flat runs to do): no graph break (zero_grad's check of the views
    reads addresses a trace cannot, so a trace takes the views as they were given)."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        params = [torch.randn(n, requires_grad=True) for n in (7, 3, 11)]
        opt = onepass.AdamW(params, lr=1e-2, flatten=True, backend="cpu")
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # builds the flat buffers, eagerly

        def train_step(opt: torch.optim.Optimizer = opt) -> None:
            opt.step()
            opt.zero_grad(set_to_none=False)

        step = train_step
        if compiled:
            step = torch.compile(train_step, fullgraph=True, backend="eager")
        for _ in range(3):
            for p in params:
                p.grad.add_(torch.randn_like(p))
            step()
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def _dynamo_flips_capturable_as_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamo's write that CUDA params get (torch 2.11 and 2.13,
    ``torch._dynamo.variables.optimizer.OptimizerVariable._set_capturable``): when a traced
    step reads ``param_groups``, a group whose params are all on CUDA and have no state yet gets
    ``group["capturable"] = True`` in the real dict. Here every param counts as on CUDA."""
    from torch._dynamo.variables.optimizer import OptimizerVariable

    original = OptimizerVariable._set_capturable

    def flip(self: Any, tx: Any) -> None:
        for group in self.value.param_groups:
            if "capturable" in group and all(p not in self.value.state for p in group["params"]):
                group["capturable"] = True
        original(self, tx)

    monkeypatch.setattr(OptimizerVariable, "_set_capturable", flip)


@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph-breaks", "fullgraph"])
def test_a_first_compiled_step_leaves_the_group_as_the_user_made_it(
    monkeypatch: pytest.MonkeyPatch, fullgraph: bool
) -> None:
    """Compiled, eager, compiled again from the first step, with Dynamo's capturable write
    that a CUDA run gets: onepass undoes it at the next eager step (the user did not ask for
    capturable). The eager step had taken it as the user's and rebuilt the buckets capturable,
    after which every compiled step was refused (on the CPU, the eager step itself was)."""
    _dynamo_flips_capturable_as_on_cuda(monkeypatch)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(s, generator=gen).requires_grad_() for s in ((5, 3), (7,))]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = onepass.AdamW(ours, lr=torch.tensor(0.01))
    expected = torch.optim.AdamW(theirs, lr=torch.tensor(0.01))

    @torch.compile(fullgraph=fullgraph)
    def compiled_step() -> None:
        opt.step()

    for step in range(5):
        _give_grads(ours, theirs, gen)
        compiled_step() if step in (0, 2, 3) else opt.step()
        expected.step()
        if step in (1, 4):  # after an eager step
            assert opt.param_groups[0]["capturable"] is False
    for p, q in zip(ours, theirs, strict=True):
        assert_verbose_allclose(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_capturable_set_by_the_user_between_eager_steps_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only a write made while a step was compiled is undone: the user's own, between eager
    steps, is taken (here on CPU params, which capturable=True refuses, by name)."""
    params = [torch.randn(5).requires_grad_()]
    params[0].grad = torch.randn(5)
    opt = onepass.AdamW(params)
    opt.step()
    opt.param_groups[0]["capturable"] = True
    with pytest.raises(RuntimeError, match="capturable=True needs CUDA params"):
        opt.step()
    assert opt.param_groups[0]["capturable"] is True


@pytest.mark.parametrize("then", ["load_state_dict", "deepcopy", "pickle"])
def test_dynamos_capturable_write_is_not_saved_or_copied(
    monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    """After a compiled first step (Dynamo's capturable write, reproduced as above), a
    state_dict, a load of it and a copy keep what the user asked (capturable=False): the load
    and the copy had taken Dynamo's True as the user's, and the next eager step built capturable
    buckets (refused on the CPU; on CUDA every later compiled step was)."""
    import copy
    import pickle

    _dynamo_flips_capturable_as_on_cuda(monkeypatch)
    torch._dynamo.reset()
    p = torch.randn(4, requires_grad=True)
    p.grad = torch.randn(4)
    opt = onepass.AdamW([p], lr=torch.tensor(0.01))
    torch.compile(opt.step, fullgraph=True)()
    if then == "load_state_dict":
        saved = opt.state_dict()
        assert saved["param_groups"][0]["capturable"] is False
        opt.load_state_dict(saved)
    elif then == "deepcopy":
        opt = copy.deepcopy(opt)
        p = opt.param_groups[0]["params"][0]
    else:
        opt = pickle.loads(pickle.dumps(opt))
        p = opt.param_groups[0]["params"][0]
    p.grad = torch.randn(4)
    opt.step()
    assert opt.param_groups[0]["capturable"] is False
    assert float(opt.state[p]["step"]) == 2.0
