"""onepass.Muon: the reference equals torch.optim.Muon; every backend this machine runs (the CPU
kernels of each instruction set, Triton under the interpreter) matches the reference over 7 steps
on matrices of odd shapes (wide, tall, 1x1, same-shape batches, a conv weight), with None grads
and a frozen param; the AdamW part equals torch.optim.AdamW with Moonlight's betas; checkpoints
load both ways with torch.optim.Muon; GradScaler unscales and skips; bad input is refused.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch

import onepass
import onepass.algorithms.muon as muon_module
from onepass.algorithms.muon import gram_segments, lr_ratio, newton_schulz, uses_gram

from helpers import all_backends, config_id

STEPS = 7
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

#: Matrices: wide, tall, square, 1x1, a same-shape pair (one batched Newton-Schulz), a conv
#: weight; then the AdamW part: a bias, a zero-size vector, and a frozen param last.
SHAPES: list[tuple[int, ...]] = [
    (17, 33),
    (40, 9),
    (16, 16),
    (1, 1),
    (8, 24),
    (8, 24),
    (6, 3, 3, 3),
    (33,),
    (0,),
    (5, 5),  # frozen
]


def _params(dtype: torch.dtype) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.randn(s, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]
    params[-1].requires_grad_(False)
    return params


def _grads(params: list[torch.Tensor]) -> list[list[torch.Tensor | None]]:
    """Per step: random grads; the second matrix of the pair has none on steps 2 and 4, the
    bias none on step 3 (a tensor without a grad is left as it is)."""
    torch.manual_seed(1)
    steps = []
    for step in range(STEPS):
        grads: list[torch.Tensor | None] = []
        for i, p in enumerate(params):
            skip = (i == 5 and step in (1, 3)) or (i == 7 and step == 2)
            if not p.requires_grad or skip:
                grads.append(None)
            else:
                grads.append(torch.randn(p.shape, dtype=torch.float64).to(p.dtype))
        steps.append(grads)
    return steps


def _run(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[list[Any]]) -> None:
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.25 * s))
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()
        schedule.step()


CONFIGS: list[dict[str, Any]] = [
    {},
    {"nesterov": False, "weight_decay": 0.0},
    {"adjust_lr_fn": "match_rms_adamw", "momentum": 0.9},
    {"ns_steps": 3, "ns_coefficients": (2.0, -1.5, 0.5), "adjust_lr_fn": "original"},
]


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_reference_equals_torch_muon(config: dict[str, Any]) -> None:
    """On 2-D params, with torch's bfloat16 Newton-Schulz (the standard iteration), the reference
    is torch.optim.Muon."""
    params = [p for p in _params(torch.float32) if p.dim() == 2 and p.requires_grad]
    twins = [p.detach().clone().requires_grad_() for p in params]
    grads = [g[: len(params)] for g in _grads(_params(torch.float32))]
    torch_like = {"ns_dtype": torch.bfloat16, "ns_method": "standard", "backend": "reference"}
    ours = onepass.Muon(params, lr=0.02, **torch_like, **config)
    theirs = torch.optim.Muon(twins, lr=0.02, **config)
    _run(ours, params, grads)
    _run(theirs, twins, grads)
    for i, (p, q) in enumerate(zip(params, twins, strict=True)):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m, i=i: f"param {i}: {m}")
        torch.testing.assert_close(
            ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"], rtol=0, atol=0
        )


def test_newton_schulz_batches_and_transposes() -> None:
    """A batch of tall matrices gives what each matrix gives alone (float64), and the result
    is near-orthogonal: its singular values lie in torch's (0.5, 1.5) band."""
    torch.manual_seed(2)
    batch = torch.randn(3, 20, 7, dtype=torch.float64)
    coefficients = (3.4445, -4.775, 2.0315)
    together = newton_schulz(batch, coefficients, 5, 1e-7, torch.float64, scale=2.0)
    for k in range(3):
        alone = newton_schulz(batch[k], coefficients, 5, 1e-7, torch.float64)
        torch.testing.assert_close(together[k], 2.0 * alone, rtol=1e-12, atol=1e-12)
    singular = torch.linalg.svdvals(together[0] / 2.0)
    assert bool((singular > 0.5).all() and (singular < 1.5).all()), singular


@pytest.mark.parametrize("shape", [(20, 70), (70, 20), (3, 16, 40), (18, 18), (2, 21, 25)], ids=str)
@pytest.mark.parametrize("steps", [2, 3, 5, 7])
@pytest.mark.parametrize("block_rows", [256, 6, 5], ids=lambda r: f"block_rows{r}")
def test_gram_newton_schulz_is_the_standard_iteration(
    shape: tuple[int, ...], steps: int, block_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gram Newton-Schulz is the same polynomial iteration: equal in float64, restarts and the
    folded scale included, on wide, tall and batched matrices; so are its symmetric products
    by blocks (3-4 blocks here, uneven ones included; none at 256 rows), which near-square
    matrices use in the standard iteration."""
    monkeypatch.setattr(muon_module, "SYMMETRIC_BLOCK_ROWS", block_rows)
    torch.manual_seed(3)
    x = torch.randn(*shape, dtype=torch.float64)
    square = shape[-1] == shape[-2] or max(shape[-2:]) < 1.5 * min(shape[-2:])
    assert uses_gram("gram", shape[-2], shape[-1], steps) != square
    args = ((3.4445, -4.775, 2.0315), steps, 1e-7, torch.float64, 1.7)
    standard = newton_schulz(x, *args, method="standard")
    gram = newton_schulz(x, *args, method="gram")
    torch.testing.assert_close(gram, standard, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [(), (3,)], ids=["matrix", "batch"])
@pytest.mark.parametrize("blocks", [0, 2, 3, 7])
def test_symmetric_product_multiplies_the_upper_blocks(batch: tuple[int, ...], blocks: int) -> None:
    """alpha * A @ B + beta * C for a symmetric result: the upper block triangle multiplied, the
    blocks below the diagonal blocks mirrored from it; it equals the full product."""
    torch.manual_seed(4)
    x = torch.randn(*batch, 23, 40, dtype=torch.float64)
    gram = x @ x.mT
    gram = (gram + gram.mT) / 2
    xxt = muon_module.symmetric_product(x, x.mT, blocks)
    torch.testing.assert_close(xxt, x @ x.mT, rtol=1e-13, atol=1e-13)
    poly = muon_module.symmetric_product(gram, gram, blocks, add=gram, beta=-4.7, alpha=2.0)
    torch.testing.assert_close(poly, 2.0 * gram @ gram - 4.7 * gram, rtol=1e-12, atol=1e-10)
    if blocks:  # below the first diagonal block: a mirror of the blocks above it
        rows = 23 // blocks
        assert torch.equal(xxt[..., rows:, :rows], xxt[..., :rows, rows:].mT)


def test_compiled_step_with_symmetric_blocks_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile(fullgraph=True) steps matrices that eager multiplies by blocks (wide,
    tall, near-square): compiled, the products are whole, equal up to rounding."""
    monkeypatch.setattr(muon_module, "SYMMETRIC_BLOCK_ROWS", 6)
    torch._dynamo.reset()
    torch.manual_seed(8)
    ours = [torch.randn(s, requires_grad=True) for s in [(20, 70), (70, 20), (24, 26)]]
    eager = [p.detach().clone().requires_grad_() for p in ours]
    opt = onepass.Muon(ours, lr=torch.tensor(0.02), ns_dtype=torch.float32)
    ref = onepass.Muon(eager, lr=torch.tensor(0.02), ns_dtype=torch.float32)

    @torch.compile(fullgraph=True)
    def compiled_step() -> None:
        opt.step()

    for _ in range(3):
        for p, q in zip(ours, eager, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        compiled_step()
        ref.step()
    for p, q in zip(ours, eager, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_newton_schulz_runs_on_an_input_that_requires_grad() -> None:
    """Blocks are written through out=, which autograd refuses where an input requires grad:
    such an input gets whole products (a step never does: it runs under no_grad)."""
    x = torch.randn(700, 900, requires_grad=True)  # 3 blocks
    args = ((3.4445, -4.775, 2.0315), 2, 1e-7, torch.float32)
    out = newton_schulz(x, *args, method="gram")
    with torch.no_grad():
        torch.testing.assert_close(out, newton_schulz(x, *args, method="gram"))


def test_cpu_batches_stay_under_the_mmap_threshold() -> None:
    """CPUs take as many same-shape matrices as 16 MiB holds in ns_dtype; GPUs take all."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert muon_module.ns_batch(cpu, 768, 3072, 12, 2) == 3
    assert muon_module.ns_batch(cpu, 768, 3072, 12, 4) == 1
    assert muon_module.ns_batch(cpu, 768, 768, 12, 2) == 12
    assert muon_module.ns_batch(cpu, 4096, 4096, 2, 2) == 1  # one matrix at least
    assert muon_module.ns_batch(cuda, 768, 3072, 12, 2) == 12


def test_symmetric_blocks_only_on_cpus_and_large_products() -> None:
    """Blocks of ~256 rows on CPUs, where a matmul is compute-bound; never on a GPU."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert muon_module.symmetric_blocks(cpu, 768) == 3
    assert muon_module.symmetric_blocks(cpu, 4096) == 16
    assert muon_module.symmetric_blocks(cpu, 300) == 0  # one block: the full product
    assert muon_module.symmetric_blocks(cpu, 512) == 0  # two blocks gain nothing
    assert muon_module.symmetric_blocks(cuda, 4096) == 0


def test_gram_is_used_only_where_it_is_cheaper() -> None:
    assert not uses_gram("gram", 768, 768, 5)  # square: the standard iteration is cheaper
    assert not uses_gram("gram", 768, 1100, 5)
    assert uses_gram("gram", 768, 2304, 5) and uses_gram("gram", 3072, 768, 5)
    assert not uses_gram("standard", 768, 3072, 5)
    assert gram_segments(5) == [3, 2] and gram_segments(7) == [3, 3, 1] and gram_segments(0) == []


@pytest.mark.parametrize("spectrum", ["gaussian", "decaying", "rank 16"])
@pytest.mark.parametrize("block_rows", [256, 32], ids=lambda r: f"block_rows{r}")
def test_gram_in_bf16_is_as_accurate_as_torchs_iteration(
    spectrum: str, block_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In bfloat16, Gram Newton-Schulz with its restart lands about as near the float64 iteration
    as torch's bf16 iteration does, with its symmetric products by blocks (3 here) or whole;
    without the restart, rounding in the Gram matrix grows (spurious negative eigenvalues) and
    it lands far further on a decaying spectrum."""
    monkeypatch.setattr(muon_module, "SYMMETRIC_BLOCK_ROWS", block_rows)
    torch.manual_seed(6)
    rows, cols = 96, 384
    u, _ = torch.linalg.qr(torch.randn(rows, rows, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, rows, dtype=torch.float64))
    singular = {
        "gaussian": torch.linalg.svdvals(torch.randn(rows, cols, dtype=torch.float64)),
        "decaying": torch.logspace(0, -6, rows, dtype=torch.float64),
        "rank 16": (torch.arange(rows) < 16).double(),
    }[spectrum]
    x = u @ torch.diag(singular) @ v.T
    args = ((3.4445, -4.775, 2.0315), 5, 1e-7)
    exact = newton_schulz(x, *args, torch.float64)

    def error(method: str) -> float:
        out = newton_schulz(x, *args, torch.bfloat16, method=method).double()
        return float((out - exact).norm() / exact.norm())

    # Flat spectra: up to ~1.3x torch's error (both about one bf16 ulp); decaying or low-rank
    # spectra, the common case for momentum: below torch's.
    bound = 1.3 if spectrum == "gaussian" else 1.0
    assert error("gram") <= bound * error("standard"), (error("gram"), error("standard"))
    if spectrum == "decaying":
        restart_every = muon_module.GRAM_RESTART_EVERY
        try:
            muon_module.GRAM_RESTART_EVERY = 5
            assert error("gram") > 2 * error("standard")
        finally:
            muon_module.GRAM_RESTART_EVERY = restart_every


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    # Batched vs per-matrix matmuls round differently; bfloat16 params also round the update
    # workspace (the native path stores lr'/lr * O in the param dtype before the final pass).
    return {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6)}.get(dtype, (2e-2, 2e-2))


def _check_backend(backend: str, dtype: torch.dtype, config: dict[str, Any]) -> None:
    """Newton-Schulz in float32 (float64 for float64 params) unless the config says otherwise:
    the default depends on the CPU (bf16 where it multiplies bf16 natively)."""
    params = _params(dtype)
    twins = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    grads = _grads(params)
    ns_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    kwargs = {"lr": 0.02, "weight_decay": 0.1, "ns_dtype": ns_dtype, **config}
    ours = onepass.Muon(params, backend=backend, **kwargs)
    reference = onepass.Muon(twins, backend="reference", **kwargs)
    _run(ours, params, grads)
    _run(reference, twins, grads)
    # the looser of the params' dtype's and the Newton-Schulz dtype's tolerances
    rtol, atol = map(max, zip(_tolerance(dtype), _tolerance(kwargs["ns_dtype"]), strict=True))
    for i, (p, q) in enumerate(zip(params, twins, strict=True)):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m, i=i: f"param {i}: {m}")
        assert set(ours.state.get(p, {})) == set(reference.state.get(q, {})), i
        for name, value in reference.state.get(q, {}).items():
            what = f"{name} {i}"
            torch.testing.assert_close(
                ours.state[p][name], value, rtol=rtol, atol=atol, msg=lambda m, w=what: f"{w}: {m}"
            )
    assert not params[-1].requires_grad and params[-1] not in ours.state


@pytest.mark.parametrize("backend", all_backends(), ids=lambda b: b.id)
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str
)
@pytest.mark.parametrize("config", CONFIGS[:3], ids=config_id)
def test_cpu_backends_match_the_reference(
    backend: Any, dtype: torch.dtype, config: dict[str, Any]
) -> None:
    if backend.capability is not None:
        onepass.set_cpu_capability(backend.capability)
    _check_backend(backend.name, dtype, config)


def test_16bit_params_are_written_once() -> None:
    """bf16 params of magnitude 2 to 4 (an ulp of 2^-6 or 2^-5, above each step's change): the
    kernels write p * (1 - lr*wd) - lr'*O once from fp32, and so does the reference; torch's
    two roundings (after the decay, after the update) drift from it by ulps within 7 steps
    (measured on an H200: 6 ulps)."""
    torch.manual_seed(2)
    shape = (17, 33)
    start = (torch.rand(shape, dtype=torch.float64) * 2 + 2) * torch.randn(shape).sign()
    grads = [[torch.randn(shape, dtype=torch.float64).to(torch.bfloat16)] for _ in range(7)]
    results = []
    for backend in ("cpu", "reference"):
        params = [start.to(torch.bfloat16).requires_grad_()]
        opt = onepass.Muon(
            params, lr=0.02, weight_decay=0.2, ns_dtype=torch.float32, backend=backend
        )
        _run(opt, params, grads)
        results.append(params[0].detach().double())
    ulp = 2.0 ** (torch.floor(torch.log2(start.abs())) - 7)
    assert ((results[0] - results[1]).abs() <= ulp).all()


@pytest.mark.parametrize("backend", all_backends(), ids=lambda b: b.id)
def test_bf16_newton_schulz_matches_the_reference(backend: Any) -> None:
    """torch.optim.Muon's bfloat16 Newton-Schulz: batched here, per matrix in the reference."""
    if backend.capability is not None:
        onepass.set_cpu_capability(backend.capability)
    _check_backend(backend.name, torch.float32, {"ns_dtype": torch.bfloat16})


@pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str
)
def test_triton_matches_the_reference(dtype: torch.dtype) -> None:
    _check_backend("triton", dtype, {"nesterov": True, "adjust_lr_fn": "match_rms_adamw"})


def test_groups_split_into_muon_and_adamw() -> None:
    """Matrices of a use_muon group run Muon; its vectors, and every param of a use_muon=False
    group, run AdamW with adamw_betas / adamw_eps, the group's lr and weight decay: the same
    steps as torch.optim.AdamW."""
    torch.manual_seed(3)
    matrix = torch.randn(6, 4, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    embedding = torch.randn(10, 4, requires_grad=True)
    opt = onepass.Muon(
        [{"params": [matrix, bias]}, {"params": [embedding], "use_muon": False, "lr": 0.01}],
        lr=0.02,
        weight_decay=0.1,
        adamw_betas=(0.8, 0.9),
        adamw_eps=1e-6,
    )
    assert [(g["use_muon"], len(g["params"])) for g in opt.param_groups] == [
        (True, 1),
        (False, 1),
        (False, 1),
    ]
    twins = [bias.detach().clone().requires_grad_(), embedding.detach().clone().requires_grad_()]
    adamw = torch.optim.AdamW(
        [{"params": [twins[0]]}, {"params": [twins[1]], "lr": 0.01}],
        lr=0.02,
        betas=(0.8, 0.9),
        eps=1e-6,
        weight_decay=0.1,
    )
    for _ in range(STEPS):
        for p, q in ((bias, twins[0]), (embedding, twins[1])):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        matrix.grad = torch.randn_like(matrix)
        opt.step()
        adamw.step()
    for p, q in zip((bias, embedding), twins, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(opt.state[matrix]) == {"momentum_buffer"}


def test_named_parameters_split_like_tensors() -> None:
    """model.named_parameters() gives (name, tensor) pairs: the matrices still run Muon (they
    had all gone to AdamW), each part keeps its params' names, and the matrices' steps and
    state_dict are torch.optim.Muon's given the same named matrices."""
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    twin = copy.deepcopy(model)
    ours = onepass.Muon(
        model.named_parameters(),
        lr=0.02,
        ns_dtype=torch.bfloat16,
        ns_method="standard",
        backend="reference",
    )
    matrices = [(n, p) for n, p in twin.named_parameters() if p.dim() == 2]
    vectors = [(n, p) for n, p in twin.named_parameters() if p.dim() != 2]
    theirs = torch.optim.Muon(matrices, lr=0.02)
    # Moonlight's AdamW for the rest: adamw_betas, adamw_eps, the group's lr and weight decay
    theirs_adamw = torch.optim.AdamW(vectors, lr=0.02, betas=(0.9, 0.95), weight_decay=0.1)
    assert [(g["use_muon"], g["param_names"]) for g in ours.param_groups] == [
        (True, ["0.weight", "2.weight"]),
        (False, ["0.bias", "2.bias"]),
    ]
    x = torch.randn(5, 8)
    for _ in range(3):
        for m in (model, twin):
            m.zero_grad()
            m(x).square().sum().backward()
        ours.step()
        theirs.step()
        theirs_adamw.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        slots = {"momentum_buffer"} if p.dim() == 2 else {"step", "exp_avg", "exp_avg_sq"}
        assert set(ours.state[p]) == slots
    assert ours.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "2.weight"]


def test_conv_weights_are_flattened() -> None:
    """A (out, in, kh, kw) weight steps as its (out, in*kh*kw) matrix, with that matrix's lr'."""
    torch.manual_seed(4)
    conv = torch.randn(8, 3, 3, 3, requires_grad=True)
    flat = conv.detach().reshape(8, 27).clone().requires_grad_()
    ours = onepass.Muon(
        [conv],
        lr=0.05,
        ns_dtype=torch.bfloat16,
        ns_method="standard",
        adjust_lr_fn="match_rms_adamw",
        backend="reference",
    )
    theirs = torch.optim.Muon([flat], lr=0.05, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        conv.grad = torch.randn_like(conv)
        flat.grad = conv.grad.reshape(8, 27).clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(conv.detach().reshape(8, 27), flat, rtol=1e-5, atol=1e-6)
    assert lr_ratio("match_rms_adamw", 8, 27) == pytest.approx(0.2 * 27**0.5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_checkpoints_load_both_ways_with_torch_muon(backend: str) -> None:
    if backend == "cpu" and not onepass.native_available():
        pytest.skip("onepass._C not built")
    torch.manual_seed(5)
    params = [torch.randn(12, 7, requires_grad=True), torch.randn(7, 12, requires_grad=True)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(4)]

    def steps(opt: torch.optim.Optimizer, ps: list[torch.Tensor], which: range) -> None:
        for k in which:
            for p, g in zip(ps, grads[k], strict=True):
                p.grad = g.clone()
            opt.step()

    # torch -> onepass: two torch steps, two onepass steps; against four torch steps
    whole = [p.detach().clone().requires_grad_() for p in params]
    torch_whole = torch.optim.Muon(whole, lr=0.02)
    steps(torch_whole, whole, range(4))
    mine = [p.detach().clone().requires_grad_() for p in params]
    first = torch.optim.Muon(mine, lr=0.02)
    steps(first, mine, range(2))
    second = onepass.Muon(
        mine, lr=1.0, ns_dtype=torch.bfloat16, ns_method="standard", backend=backend
    )
    second.load_state_dict(first.state_dict())
    assert second.param_groups[0]["use_muon"] and second.param_groups[0]["lr"] == 0.02
    assert second.param_groups[0]["ns_method"] == "standard"  # its own, not the default
    steps(second, mine, range(2, 4))
    # The native path's bfloat16 Newton-Schulz is batched and carries lr'/lr: bf16 rounding
    tol = {"rtol": 1e-5, "atol": 1e-6} if backend == "reference" else {"rtol": 2e-3, "atol": 5e-4}
    for p, q in zip(mine, whole, strict=True):
        torch.testing.assert_close(p, q, **tol)
    # onepass -> torch: the state is torch's (momentum_buffer only) and continues there
    back = torch.optim.Muon(mine, lr=1.0)
    back.load_state_dict(second.state_dict())
    for p in mine:
        assert set(back.state[p]) == {"momentum_buffer"}
        torch.testing.assert_close(
            back.state[p]["momentum_buffer"], second.state[p]["momentum_buffer"]
        )


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_grad_scaler_unscales_and_skips(backend: str) -> None:
    if backend == "cpu" and not onepass.native_available():
        pytest.skip("onepass._C not built")
    torch.manual_seed(6)
    params = [torch.randn(9, 5, requires_grad=True), torch.randn(5, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    scaled = onepass.Muon(params, lr=0.02, backend=backend)
    plain = onepass.Muon(twins, lr=0.02, backend=backend)
    for p, q in zip(params, twins, strict=True):
        q.grad = torch.randn_like(q)
        p.grad = q.grad * 1024.0
    scaled.grad_scale = torch.tensor(1024.0)
    scaled.found_inf = torch.tensor(0.0)
    scaled.step()
    plain.step()
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    before = [p.detach().clone() for p in params]
    state = {id(p): {k: v.clone() for k, v in scaled.state[p].items()} for p in params}
    scaled.found_inf = torch.tensor(1.0)
    scaled.step()
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)
        for k, v in scaled.state[p].items():
            assert torch.equal(v, state[id(p)][k]), k


def test_rejects_bad_hyperparameters() -> None:
    p = torch.zeros(3, 3, requires_grad=True)
    for kwargs, message in [
        ({"lr": -1.0}, "Learning rate should be >= 0"),
        ({"momentum": -0.1}, "momentum should be >= 0"),
        ({"weight_decay": -0.1}, "weight decay should be >= 0"),
        ({"adjust_lr_fn": "bogus"}, "Adjust learning rate function bogus is not supported"),
        ({"ns_steps": 100}, "Number of steps must be less than 100"),
        ({"ns_coefficients": (1.0, 2.0)}, "exactly 3 values"),
        ({"ns_dtype": torch.float16}, "ns_dtype"),
        ({"ns_method": "svd"}, "ns_method"),
        # named as such, even with no param for AdamW yet (a bias group may come later)
        ({"adamw_betas": (1.5, 0.9)}, "Invalid adamw_betas parameter at index 0"),
        ({"adamw_betas": (0.9, -1.0)}, "Invalid adamw_betas parameter at index 1"),
        ({"adamw_eps": -1.0}, "Invalid adamw_eps value"),
    ]:
        with pytest.raises(ValueError, match=message):
            onepass.Muon([p], **kwargs)
        with pytest.raises(ValueError, match=message):
            onepass.Muon([p, torch.zeros(3, requires_grad=True)], **kwargs)


def test_a_split_group_gets_its_own_tensor_lr() -> None:
    """A scheduler that updates each group's tensor lr in place must not update it twice."""
    lr = torch.tensor(0.02)
    opt = onepass.Muon(
        [torch.randn(4, 4, requires_grad=True), torch.randn(4, requires_grad=True)], lr=lr
    )
    muon_lr, adamw_lr = (group["lr"] for group in opt.param_groups)
    assert muon_lr is lr and adamw_lr is not lr and float(adamw_lr) == float(lr)


def test_add_param_group_and_flatten() -> None:
    """A group added later is split like the first; flatten=True steps the same as without."""
    torch.manual_seed(7)
    shapes = [(12, 5), (5,), (12, 5), (3, 3)]
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    twins = [p.detach().clone().requires_grad_() for p in params]
    kwargs = {"lr": 0.02, "ns_dtype": torch.float32}
    flat = onepass.Muon(params[:2], flatten=True, **kwargs)
    flat.add_param_group({"params": params[2:], "lr": 0.01})
    plain = onepass.Muon(twins[:2], **kwargs)
    plain.add_param_group({"params": twins[2:], "lr": 0.01})
    assert [(g["use_muon"], len(g["params"])) for g in flat.param_groups] == [
        (True, 1),
        (False, 1),
        (True, 2),
    ]
    for _ in range(4):
        for p, q in zip(params, twins, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        flat.step()
        plain.step()
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_use_muon_false_steps_matrices_with_adamw() -> None:
    matrix = torch.randn(6, 4, requires_grad=True)
    twin = matrix.detach().clone().requires_grad_()
    ours = onepass.Muon([{"params": [matrix], "use_muon": False}], lr=0.01, weight_decay=0.1)
    theirs = torch.optim.AdamW([twin], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(3):
        matrix.grad = torch.randn_like(matrix)
        twin.grad = matrix.grad.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(matrix, twin, rtol=1e-6, atol=1e-7)
    assert set(ours.state[matrix]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_refused_group_adds_neither_part(backend: str) -> None:
    """add_param_group splits a group into its Muon and AdamW parts: when the AdamW part is
    refused (a vector already in a group), the Muon part is not added either, and the call can
    be retried once fixed."""
    w, v = torch.zeros(8, 8, requires_grad=True), torch.zeros(8, requires_grad=True)
    opt = onepass.Muon([w, v], backend=backend)
    groups = len(opt.param_groups)
    matrix, vector = torch.zeros(4, 4, requires_grad=True), torch.zeros(4, requires_grad=True)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [matrix, v]})
    assert len(opt.param_groups) == groups
    opt.add_param_group({"params": [matrix, vector]})
    assert len(opt.param_groups) == groups + 2


@pytest.mark.parametrize("shape", [(0, 4, 4, 4), (3, 0)], ids=["conv-no-rows", "no-cols"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_matrices_without_elements(backend: str, shape: tuple[int, ...]) -> None:
    """A matrix or conv weight with no elements steps (nothing to update) beside a normal one,
    which moves as it would alone (it used to fail reshaping it, or dividing by its width)."""
    torch.manual_seed(0)
    p, empty = torch.randn(4, 3, requires_grad=True), torch.zeros(shape, requires_grad=True)
    alone = p.detach().clone().requires_grad_()
    p.grad, empty.grad = torch.randn(4, 3), torch.zeros(shape)
    alone.grad = p.grad.clone()
    kwargs = {"lr": 0.02, "backend": backend, "ns_dtype": torch.float32}
    onepass.Muon([p, empty], **kwargs).step()
    onepass.Muon([alone], **kwargs).step()
    torch.testing.assert_close(p, alone, rtol=0, atol=0)
