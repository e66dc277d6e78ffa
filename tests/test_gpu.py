"""GPU backends ("cuda": csrc/cuda, "triton": triton_kernels) on a CUDA device.

Skipped where there is no GPU; bench/gpu_check.sh runs this file on the GPU machine. The Triton
kernels are also checked on the CPU under the interpreter (tests/test_triton.py); this file adds
what only a GPU shows: compiled kernels, > 2^31-element tensors, CUDA graphs, no host syncs.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from test_mixed import LAYOUTS, check_layout
from test_numerics import check_against_reference

import onepass
from onepass._engine import TRITON_MIN_MEAN_NUMEL, cuda_kernels_built, triton_error

from helpers import (
    ADAMW_INFO,
    DTYPES,
    EVERY_OPTIMIZER,
    LION_INFO,
    OPTIMIZERS,
    SGD_INFO,
    SGDW_INFO,
    Config,
    OptimizerInfo,
    assert_verbose_allclose,
    config_id,
    dtype_id,
    skip_unless_implemented,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU (and compiled Triton, not the interpreter)",
)

GPU_BACKENDS = [
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not cuda_kernels_built(), reason="onepass._C was built without CUDA kernels"
        ),
    ),
    pytest.param(
        "triton", marks=pytest.mark.skipif(triton_error() is not None, reason="no triton")
    ),
]


def _cuda_params(dtype: torch.dtype) -> list[torch.Tensor]:
    """Odd sizes, a transposed (non-contiguous) matrix, a frozen param, and a zero-size tensor
    at the end of the list (a bug once suppressed the last launch in PyTorch)."""
    sizes = (1, 7, 4097, (1 << 17) + 3)  # the last: many chunks on both backends
    params = [torch.randn(n, device="cuda").to(dtype).requires_grad_() for n in sizes]
    params.append(torch.randn(9, 5, device="cuda").to(dtype).t().requires_grad_())
    params.append(torch.randn(6, device="cuda").to(dtype))  # frozen
    params.append(torch.randn(0, device="cuda").to(dtype).requires_grad_())
    return params


def _cases() -> list[object]:
    return [
        pytest.param(info, config, id=f"{info.name}-{config_id(config)}")
        for info in OPTIMIZERS
        for config in info.configs
    ]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("info", "config"), _cases())
def test_gpu_matches_reference(
    info: OptimizerInfo, config: Config, dtype: torch.dtype, backend: str
) -> None:
    """7 steps against the float64 reference on params, every state tensor and every step, with
    None grads on some steps and an LR schedule, as tests/test_numerics.py does on the CPU."""
    params = _cuda_params(dtype)
    optimizer = check_against_reference(info, config, backend, dtype, params)
    assert params[-2] not in optimizer.state  # frozen
    if info.family == "adam":  # the zero-size tensor at the end of the list still steps
        assert float(optimizer.state[params[-1]]["step"]) == 7


def test_many_cuda_tensors_scanned_in_parallel() -> None:
    """A CUDA launch over 1,024+ tensors reads their metadata on all of torch's threads
    (glue::scan_in_parallel; ONEPASS_PARALLEL_SCAN_CUDA=0 turns it off) and matches the
    reference, None grads included."""
    if not cuda_kernels_built():
        pytest.skip("onepass._C was built without CUDA kernels")
    sizes = [(7 * i) % 61 + 1 for i in range(1500)]
    params = [torch.randn(n, device="cuda").requires_grad_() for n in sizes]
    before = onepass._C.parallel_scans()
    check_against_reference(ADAMW_INFO, {"lr": 1e-2}, "cuda", torch.float32, params)
    if torch.get_num_threads() > 1 and os.environ.get("ONEPASS_PARALLEL_SCAN_CUDA") != "0":
        assert onepass._C.parallel_scans() - before == 7


@pytest.mark.parametrize(("info", "config"), _cases())
def test_cuda_and_triton_agree(info: OptimizerInfo, config: Config) -> None:
    if not cuda_kernels_built() or triton_error() is not None:
        pytest.skip("needs both GPU backends")
    skip_unless_implemented(info, "cuda")
    skip_unless_implemented(info, "triton")
    results = []
    for backend in ("cuda", "triton"):
        torch.manual_seed(3)
        params = _cuda_params(torch.float32)
        optimizer = info.onepass_cls(params, **config, backend=backend)
        for _ in range(7):
            for p in params:
                if p.requires_grad:
                    p.grad = torch.randn_like(p)
            optimizer.step()
        results.append([p.detach().clone() for p in params])
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        assert_verbose_allclose(a, b, 1e-5, 1e-6, f"param {i}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_more_than_2_31_elements(backend: str) -> None:
    """One bf16 tensor of 2^31 + 1001 elements (64-bit indexing), AdamW, checked against the
    reference at sampled indices: the update is elementwise, so samples step on their own."""
    free, _ = torch.cuda.mem_get_info()
    n = (1 << 31) + 1001
    if free < 6 * n * 2 + (2 << 30):
        pytest.skip(f"needs ~{6 * n * 2 >> 30} GiB of GPU memory")
    param = torch.randn(n, device="cuda", dtype=torch.bfloat16).requires_grad_()
    param.grad = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    picks = torch.cat(
        [
            torch.arange(0, 64, device="cuda"),
            torch.randint(0, n, (4096,), device="cuda"),
            torch.arange((1 << 31) - 64, n, device="cuda"),  # across 2^31 and the tail
        ]
    )
    # lr 0.1: a step moves a param by ~0.1, ~13 bf16 ulps at 1, so a step missed past 2^31 fails
    optimizer = onepass.AdamW([param], lr=0.1, weight_decay=0.1, backend=backend)
    p_ref = param.detach()[picks].clone()
    g = param.grad[picks].clone()
    m_ref, v_ref = torch.zeros_like(p_ref), torch.zeros_like(p_ref)
    scalars = onepass.algorithms.AdamScalars.from_group(optimizer.param_groups[0])
    for step in range(1, 3):
        optimizer.step()
        onepass.algorithms.adam_reference(p_ref, g, m_ref, v_ref, None, step, scalars)
    state = optimizer.state[param]
    # Tolerances of a few bf16 ulps, each well under what one step changes (exp_avg_sq is
    # ~2e-3 g^2 after two steps: an absolute 1e-2 would accept anything).
    for name, got, want, atol in (
        ("param", param.detach()[picks], p_ref, 2e-2),
        ("exp_avg", state["exp_avg"][picks], m_ref, 2e-3),
        ("exp_avg_sq", state["exp_avg_sq"][picks], v_ref, 5e-5),
    ):
        assert_verbose_allclose(got, want, 3e-2, atol, name)
    assert float(state["step"]) == 2


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("info", [ADAMW_INFO, SGD_INFO, SGDW_INFO, LION_INFO], ids=lambda i: i.name)
def test_found_inf_skips_everything(info: OptimizerInfo, backend: str) -> None:
    params = _cuda_params(torch.float32)
    kwargs = {"lr": 0.1, "momentum": 0.9} if info.family == "sgd" else {"lr": 0.1}
    optimizer = info.onepass_cls(params, backend=backend, **kwargs)
    for p in params:
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    optimizer.step()
    before = [p.detach().clone() for p in params]
    state_before = {k: {n: v.clone() for n, v in s.items()} for k, s in optimizer.state.items()}
    optimizer.grad_scale = torch.tensor(1024.0, device="cuda")
    optimizer.found_inf = torch.tensor(1.0, device="cuda")
    optimizer.step()
    torch.cuda.synchronize()
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)
    for k, s in optimizer.state.items():
        for n, v in s.items():
            assert torch.equal(v, state_before[k][n]), n


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "SGD", "NovoGrad"])
def test_clipping_a_step_without_grads(backend: str, name: str) -> None:
    """max_grad_norm when no param has a grad: the norm is a CPU zero, which the engine moves
    to the bucket's device (the CUDA ops had refused the step's AMP scalars); nothing changes,
    as torch.optim steps nothing."""
    params = _cuda_params(torch.float32)
    optimizer = EVERY_OPTIMIZER[name](params, max_grad_norm=1.0, backend=backend)
    for p in params:
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad()
    before = [p.detach().clone() for p in params]
    optimizer.step()
    torch.cuda.synchronize()
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("lr", [0.0, 1e-30])
def test_zero_and_tiny_lr_give_no_nan(backend: str, lr: float) -> None:
    params = _cuda_params(torch.float32)
    optimizer = onepass.AdamW(params, lr=lr, weight_decay=0.1, backend=backend)
    for _ in range(3):
        for p in params:
            if p.requires_grad:
                p.grad = torch.randn_like(p)
        optimizer.step()
    assert all(bool(torch.isfinite(p).all()) for p in params)


def _change_hyperparameters(group: dict, twin: dict, step: int) -> None:
    """New values for a capturable group, in place on its device views (as a scheduler changes
    them), and the same values for its eager twin's floats."""
    lr = 1e-2 * 0.5 ** (step + 1)
    group["lr"].fill_(lr)
    twin["lr"] = lr
    for key in ("weight_decay", "eps"):
        if isinstance(group.get(key), torch.Tensor):
            value = float(twin[key]) * 1.5 + (0.01 if key == "weight_decay" else 0.0)
            group[key].fill_(value)
            twin[key] = value
    if "betas" in group:
        beta1 = 0.85 - 0.02 * step
        group["betas"][0].fill_(beta1)
        twin["betas"] = (beta1, twin["betas"][1])


def _captured_step(
    name: str, backend: str, capturable: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor], Any, Any, torch.cuda.CUDAGraph]:
    """Three CUDA params with grads (odd sizes, a matrix, many chunks), an optimizer of each
    (``name``) over them and over their eager twins, one step of each (the graphed one on a
    side stream: buckets, state and the device table exist before the capture), and the
    graphed one's next step captured: (params, twins, graphed, eager, graph)."""
    torch.manual_seed(0)
    shapes = [(7,), (33, 65), (1 << 16,)]
    params = [torch.randn(s, device="cuda").requires_grad_() for s in shapes]
    twins = [p.detach().clone().requires_grad_() for p in params]
    for p, q in zip(params, twins, strict=True):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    graphed = EVERY_OPTIMIZER[name](params, capturable=capturable, backend=backend)
    eager = EVERY_OPTIMIZER[name](twins, backend=backend)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graphed.step()
    torch.cuda.current_stream().wait_stream(stream)
    eager.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    return params, twins, graphed, eager, graph


@pytest.mark.parametrize("name", list(EVERY_OPTIMIZER))
def test_capturable_cuda_graph_replays_with_changing_hyperparameters(name: str) -> None:
    """capturable=True: a step captured in a CUDA graph, replayed while the lr, beta1, eps and
    weight decay change in place on the device (as schedulers change them), gives the eager
    result; the per-tensor reductions (NovoGrad, FAdam) and Newton-Schulz (Muon) are captured
    too. The state_dict holds floats."""
    if not cuda_kernels_built():
        pytest.skip("needs the cuda backend")
    params, twins, graphed, eager, graph = _captured_step(name, "cuda", capturable=True)
    for group in graphed.param_groups:
        assert isinstance(group["lr"], torch.Tensor) and group["lr"].is_cuda
        assert isinstance(group["weight_decay"], torch.Tensor)
    for step in range(5):
        for group, twin in zip(graphed.param_groups, eager.param_groups, strict=True):
            _change_hyperparameters(group, twin, step)
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for p, q in zip(params, twins, strict=True):
        assert_verbose_allclose(p, q, 1e-6, 1e-7)
    for saved in graphed.state_dict()["param_groups"]:
        assert isinstance(saved["lr"], float) and isinstance(saved["weight_decay"], float)


@pytest.mark.parametrize(
    ("backend", "name"),
    [("cuda", "AdamW"), ("cuda", "NovoGrad"), ("triton", "SGD"), ("triton", "NovoGrad")],
)
def test_a_captured_table_outlives_an_eager_step_with_other_grads(backend: str, name: str) -> None:
    """A graph captured while the grads are those of the warm-up reads the tensor table uploaded
    then, at every replay. An eager step with other grads puts a new table in the cache; the
    graph's must not be freed (it was: the next allocations took its memory, and replays stepped
    whatever those wrote there). Adam / AdamW need capturable=True (CUDA backend); the others
    are captured as they are (Triton here), as torch.optim.SGD is."""
    if backend == "cuda" and not cuda_kernels_built():
        pytest.skip("needs the cuda backend")
    if backend == "triton" and triton_error() is not None:
        pytest.skip("needs triton")
    params, twins, graphed, eager, graph = _captured_step(name, backend, backend == "cuda")
    grads = [p.grad for p in params]  # the graph's: kept alive here
    other = [torch.randn_like(p) for p in params]
    for p, q, o in zip(params, twins, other, strict=True):
        p.grad, q.grad = o, o.clone()
    graphed.step()  # eager, with other grads: another table in the cache
    eager.step()
    # The next allocations, filled with -1: a freed table's memory would be among them.
    filler = [
        torch.full((n,), -1, dtype=torch.int64, device="cuda")
        for n in (8, 16, 32, 64, 128, 256)
        for _ in range(16)
    ]
    for q, g in zip(twins, grads, strict=True):
        q.grad = g.clone()
    for _ in range(3):
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for p, q in zip(params, twins, strict=True):
        assert_verbose_allclose(p, q, 1e-6, 1e-7)
    assert all(bool((f == -1).all()) for f in filler)  # the replays wrote nothing there


@pytest.mark.parametrize("name", ["AdamW", "NovoGrad"])
def test_whole_step_graphs_sharing_a_pool_replay_like_eager(name: str) -> None:
    """torch's whole-network capture recipe: grads set to None before each capture, so that
    backward allocates them inside it and each capture's step sees grads at new addresses (a
    new tensor table, uploaded inside the capture: each replay copies it in again). Two graphs
    (two batch shapes) share one memory pool, and each replays, in turn, after the other was
    captured. Matches an eager twin step for step. (That the recipe works; the test above is
    the one that failed on a table freed under a graph.)"""
    if not cuda_kernels_built():
        pytest.skip("needs the cuda backend (capturable)")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 5))
    model.cuda()
    twin = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 5))
    twin.cuda().load_state_dict(model.state_dict())
    graphed = EVERY_OPTIMIZER[name](list(model.parameters()), capturable=True, backend="cuda")
    eager = EVERY_OPTIMIZER[name](list(twin.parameters()), backend="cuda")
    batches = [torch.randn(8, 32, device="cuda"), torch.randn(3, 32, device="cuda")]

    def loss(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return net(x).square().mean()

    def eager_step(x: torch.Tensor) -> None:
        eager.zero_grad(set_to_none=True)
        loss(twin, x).backward()
        eager.step()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: buckets and state exist before any capture
        for x in batches:
            graphed.zero_grad(set_to_none=True)
            loss(model, x).backward()
            graphed.step()
    torch.cuda.current_stream().wait_stream(stream)
    for x in batches:
        eager_step(x)
    graphs = [torch.cuda.CUDAGraph() for _ in batches]
    for graph, x in zip(graphs, batches, strict=True):
        graphed.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph, pool=graphs[0].pool() if graph is not graphs[0] else None):
            loss(model, x).backward()
            graphed.step()
    for _ in range(3):
        for graph, x in zip(graphs, batches, strict=True):
            graph.replay()
            eager_step(x)
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert_verbose_allclose(p, q, 1e-5, 1e-6)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(
    ("name", "max_grad_norm"),
    [("AdamW", None)]
    + [(name, 1.0) for name in ("AdamW", "SGD", "Lion", "NovoGrad", "FAdam", "Muon")],
    ids=lambda value: {None: "unscale", 1.0: "unscale-clip"}.get(value, value),
)
def test_grad_scaler_step_makes_no_host_sync(
    backend: str, name: str, max_grad_norm: float | None
) -> None:
    """GradScaler's unscale and skip, and with max_grad_norm the global norm and the clip, all
    stay on the device; so do NovoGrad's and FAdam's per-tensor reductions and Muon's
    Newton-Schulz. Each step's grads are kept, so that the next step's are at new addresses:
    the tensor table is uploaded anew, without a sync."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    model.cuda()
    optimizer = EVERY_OPTIMIZER[name](
        list(model.parameters()), backend=backend, max_grad_norm=max_grad_norm
    )
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(16, 64, device="cuda")
    before = [p.detach().clone() for p in model.parameters()]
    held = []
    for step in range(3):
        held.append([p.grad for p in model.parameters()])  # new addresses for the next grads
        optimizer.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        if step > 0:  # the first step builds buckets and state (allocation, not a sync)
            torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(optimizer)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.update()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    state = optimizer.state[next(model.parameters())]
    if "step" in state:
        assert float(state["step"]) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("numel", [5, TRITON_MIN_MEAN_NUMEL], ids=["small", "large"])
@pytest.mark.parametrize("master_weights", [False, True], ids=["no-master", "master"])
def test_auto_picks_the_measured_gpu_backend(
    dtype: torch.dtype, numel: int, master_weights: bool
) -> None:
    """The bucket's layout and mean tensor size reach the choice (bench/GPU_RESULTS.md)."""
    param = torch.randn(numel, device="cuda", dtype=dtype, requires_grad=True)
    param.grad = torch.randn_like(param)
    optimizer = onepass.AdamW([param], master_weights=master_weights)
    optimizer.step()
    master = master_weights and dtype == torch.bfloat16
    want = onepass._engine.auto_gpu_backend(
        "adam",
        dtype,
        False,
        cuda_kernels_built(),
        triton_error() is None,
        state_dtype=torch.float32 if master else dtype,
        master=master,
        mean_numel=numel,
    )
    assert optimizer._engine.plans[0].buckets[0].backend == want
    if cuda_kernels_built() and triton_error() is None:
        large_16_bit = dtype == torch.bfloat16 and numel >= TRITON_MIN_MEAN_NUMEL
        assert want == ("triton" if large_16_bit and not master else "cuda")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_muon_matches_the_reference(backend: str, dtype: torch.dtype) -> None:
    """Muon's three stages on the GPU (fused momentum pass, batched Newton-Schulz, fused decay
    and update; the AdamW part for the vector) against the reference over 7 steps, with a
    same-shape pair, a tall matrix and a conv weight; float32 Newton-Schulz for a tight check."""
    torch.manual_seed(0)
    shapes = [(17, 33), (40, 9), (8, 24), (8, 24), (6, 3, 3, 3), (33,)]
    params = [torch.randn(s, device="cuda").to(dtype).requires_grad_() for s in shapes]
    twins = [p.detach().clone().requires_grad_() for p in params]
    kwargs = {"lr": 0.02, "weight_decay": 0.1, "ns_dtype": torch.float32}
    ours = onepass.Muon(params, backend=backend, **kwargs)
    reference = onepass.Muon(twins, backend="reference", **kwargs)
    for _ in range(7):
        for p, q in zip(params, twins, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        reference.step()
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
    for i, (p, q) in enumerate(zip(params, twins, strict=True)):
        assert_verbose_allclose(p.detach().cpu(), q.detach().cpu(), rtol, atol, f"param {i}")
        for name, value in reference.state[q].items():
            mine = ours.state[p][name].cpu()
            assert_verbose_allclose(mine, value.cpu(), rtol, atol, f"{name} {i}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_stochastic_rounding_draws_as_the_reference(backend: str) -> None:
    """bf16 params with stochastic_rounding=True: the GPU kernels round with the reference's
    hash of (seed, element index), so the params match the reference backend bit for bit."""
    torch.manual_seed(1)
    init = [torch.randn(s, device="cuda") for s in [(64, 33), (70_001,), (37,)]]
    grads = [[torch.randn_like(p) for p in init] for _ in range(3)]
    results = []
    for be in ("reference", backend):
        torch.manual_seed(5)
        params = [p.to(torch.bfloat16).requires_grad_() for p in init]
        opt = onepass.AdamW(params, lr=1e-2, weight_decay=0.1, backend=be, stochastic_rounding=True)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.to(torch.bfloat16)
            opt.step()
        results.append([p.detach().cpu() for p in params])
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        differ = int((a != b).sum())
        assert differ <= a.numel() // 10_000, f"param {i}: {differ} elements differ"


#: Every layout for AdamW, two for the others (each new layout is a Triton compile; the CPU
#: tests run the whole matrix on every build).
GPU_LAYOUT_CASES = [("AdamW", layout) for layout in LAYOUTS] + [
    (name, layout)
    for name in EVERY_OPTIMIZER
    if name != "AdamW"
    for layout in ("bf16-fp32grad-master", "fp32-bf16state-sr")
]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(("name", "layout"), GPU_LAYOUT_CASES)
def test_every_layout_matches_reference(backend: str, name: str, layout: str) -> None:
    """Master weights, fp32 grads of 16-bit params, bf16 / fp32 state, stochastic rounding of
    bf16 state: the GPU kernels against the reference backend on the CPU (tests/test_mixed.py)."""
    check_layout(name, layout, backend, torch.device("cuda"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "SGD", "NovoGrad"])
def test_flattened_steps_match_per_tensor_steps(backend: str, name: str) -> None:
    """flatten=True on a GPU: the flat pass (its step count on the device), a step GradScaler
    skips, a clip over the flat grad buffers and zero_grad(set_to_none=False) of the flat
    buffers, against the same optimizer per tensor, bitwise apart from the clip's norm (a sum
    in another order: to rounding)."""
    torch.manual_seed(0)
    make = EVERY_OPTIMIZER[name]
    runs = []
    for flatten in (False, True):
        params = [
            torch.randn(*shape, device="cuda").requires_grad_()
            for shape in ((13, 31), (31,), (7, 5), (4097,), (0,))
        ]
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        optimizer = make(params, backend=backend, flatten=flatten, max_grad_norm=1.0)
        for step in range(6):
            optimizer.zero_grad(set_to_none=False)
            for i, p in enumerate(params):
                g = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
                if p.grad is None:
                    p.grad = g.cuda()
                else:
                    p.grad.copy_(g)
            if step == 3:  # skipped, as a GradScaler skips an inf step
                optimizer.grad_scale = torch.ones((), device="cuda")
                optimizer.found_inf = torch.ones((), device="cuda")
            optimizer.step()
            if step == 3:
                del optimizer.grad_scale, optimizer.found_inf
        torch.cuda.synchronize()
        runs.append((params, optimizer))
    (plain, by_tensor), (flat, flattened) = runs
    assert flattened._engine.plans[0].buckets[0].flat_param is not None
    for i, (p, q) in enumerate(zip(plain, flat, strict=True)):
        assert_verbose_allclose(q.detach(), p.detach(), 1e-5, 1e-6, f"param {i}")
        for slot, value in by_tensor.state.get(p, {}).items():
            got = flattened.state[q][slot]
            assert_verbose_allclose(got.float(), value.float(), 1e-5, 1e-6, f"{slot} {i}")
