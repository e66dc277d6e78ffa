"""onepass.Muon: the reference equals torch.optim.Muon, and follows the rule written out in
float64 step by step in every dtype; every other backend this machine runs (the CPU kernels of
each instruction set, Triton under the interpreter) matches the reference over 7 steps on
matrices of odd shapes (wide, tall, 1x1, same-shape batches, a conv weight, one of several
engine chunks, transposed, strided, without elements), with None grads and a frozen param; the
AdamW part equals torch.optim.AdamW with Moonlight's betas; checkpoints load both ways with
torch.optim.Muon and continue on either side; GradScaler unscales and skips; bad input is
refused.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

import onepass
import onepass.algorithms.muon as muon_module
from onepass.algorithms.muon import gram_segments, lr_ratio, newton_schulz, uses_gram

from helpers import TRITON_INTERPRETED, all_backends, assert_within_ulps, config_id

STEPS = 7

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


#: The large matrix of the backend comparisons: 4099 x 17 = 69,683 elements, three of the CPU
#: engine's 2^15-element chunks and past its 2^16-element serial limit (the fused passes run on
#: the thread pool); tall, so Newton-Schulz transposes it. Triton's chunks have 4,096 elements:
#: 1027 x 5 is two of them, and keeps the interpreter's time down.
CPU_LARGE, TRITON_LARGE = (4099, 17), (1027, 5)


def _extra_matrices(dtype: torch.dtype, large: tuple[int, int]) -> list[torch.Tensor]:
    """A large matrix; a transposed one (non-contiguous, of the pair's shape: one batched
    Newton-Schulz with them), a row-strided one and one without elements."""
    transposed = torch.randn(24, 8, dtype=torch.float64).to(dtype).t()  # strides (1, 8)
    strided = torch.randn(22, 6, dtype=torch.float64).to(dtype)[::2]  # strides (12, 1)
    assert not transposed.is_contiguous() and not strided.is_contiguous()
    large_matrix = torch.randn(large, dtype=torch.float64).to(dtype)
    return [large_matrix, transposed, strided, torch.zeros(7, 0, dtype=dtype)]


def _params(dtype: torch.dtype, large: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """The SHAPES (the frozen param last); with ``large``, _extra_matrices before the frozen
    param."""
    torch.manual_seed(0)
    params = [torch.randn(s, dtype=torch.float64).to(dtype) for s in SHAPES]
    if large is not None:
        params[-1:-1] = _extra_matrices(dtype, large)
    for p in params[:-1]:
        p.requires_grad_()
    return params


def _grads(params: list[torch.Tensor]) -> list[list[torch.Tensor | None]]:
    """Per step: random grads; the second matrix of the pair has none on steps 2 and 4, the
    bias none on step 3 (a tensor without a grad is left as it is). A transposed param's grad
    is transposed too."""
    torch.manual_seed(1)
    steps = []
    for step in range(STEPS):
        grads: list[torch.Tensor | None] = []
        for i, p in enumerate(params):
            skip = (i == 5 and step in (1, 3)) or (i == 7 and step == 2)
            if not p.requires_grad or skip:
                grads.append(None)
            elif p.dim() == 2 and not p.is_contiguous() and p.stride(0) == 1:  # transposed
                grads.append(torch.randn(p.shape[::-1], dtype=torch.float64).to(p.dtype).t())
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


#: (rtol, atol) of a backend against the reference after 7 steps, for params kept in float64 or
#: float32, by (param dtype, ns_dtype): the two differ by rounding only (batched vs per-matrix
#: matmuls). With bfloat16 Newton-Schulz the products round to bf16 in another order (measured
#: worst: 1.1e-4).
FINAL_TOLERANCES: dict[tuple[torch.dtype, torch.dtype], tuple[float, float]] = {
    (torch.float64, torch.float64): (1e-10, 1e-12),
    (torch.float32, torch.float32): (2e-5, 2e-6),
    (torch.float32, torch.bfloat16): (0.0, 4e-4),
}

#: 16-bit params, compared step by step from the same stored values (the reference continues
#: from the backend's params and state): each step writes the param once from fp32 on both
#: sides, so within one ulp, plus this atol, and at most LOCKSTEP_FRACTION_OFF of the elements
#: may differ at all. The atol is for a 1-ulp difference of the 16-bit update workspace that
#: Newton-Schulz amplifies on the near-singular directions of a square matrix (measured worst:
#: 3.1e-4 bf16, 2.3e-5 fp16; a halved update is off by 8e-3). Dropping the weight decay in one
#: of them (2e-3 of the param a step: under an ulp) moves the rounding of over a third of the
#: elements (measured at most 1% otherwise).
LOCKSTEP_ATOL = {torch.bfloat16: 1e-3, torch.float16: 1e-4}
LOCKSTEP_FRACTION_OFF = 0.05


def _state_triples(
    opt: torch.optim.Optimizer,
    params: list[torch.Tensor],
    reference: torch.optim.Optimizer,
    twins: list[torch.Tensor],
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, backend's, reference's) for every param and every state tensor but 'step', which
    is checked here: equal."""
    triples = []
    for i, (p, q) in enumerate(zip(params, twins, strict=True)):
        triples.append((f"param {i} {tuple(p.shape)}", p.detach(), q.detach()))
        assert set(opt.state.get(p, {})) == set(reference.state.get(q, {})), i
        for name, value in reference.state.get(q, {}).items():
            if name == "step":
                assert float(opt.state[p][name]) == float(value), f"step of param {i}"
            else:
                triples.append((f"{name} {i}", opt.state[p][name], value))
    return triples


def _check_backend(backend: str, dtype: torch.dtype, config: dict[str, Any]) -> None:
    """Newton-Schulz in float32 (float64 for float64 params) unless the config says otherwise:
    the default depends on the CPU (bf16 where it multiplies bf16 natively). Params and every
    state tensor; 16-bit params step by step (LOCKSTEP_ATOL), the others after the 7 steps."""
    large = TRITON_LARGE if backend == "triton" else CPU_LARGE
    params = _params(dtype, large)
    twins = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    grads = _grads(params)
    ns_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    kwargs = {"lr": 0.02, "weight_decay": 0.1, "ns_dtype": ns_dtype, **config}
    ours = onepass.Muon(params, backend=backend, **kwargs)
    reference = onepass.Muon(twins, backend="reference", **kwargs)
    lockstep = dtype in LOCKSTEP_ATOL
    schedules = [
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.25 * s))
        for opt in (ours, reference)
    ]
    for step_grads in grads:
        for opt, ps in ((ours, params), (reference, twins)):
            for p, g in zip(ps, step_grads, strict=True):
                p.grad = None if g is None else g.clone()
            opt.step()
        for schedule in schedules:
            schedule.step()
        if not lockstep:
            continue
        triples = _state_triples(ours, params, reference, twins)
        actual, expected = (torch.cat([t[k].reshape(-1) for t in triples]) for k in (1, 2))
        assert_within_ulps(
            actual, expected, 1, LOCKSTEP_ATOL[dtype], "params and state", LOCKSTEP_FRACTION_OFF
        )
        with torch.no_grad():  # the reference continues from the backend's values
            for p, q in zip(params, twins, strict=True):
                q.copy_(p)
                for name, value in reference.state.get(q, {}).items():
                    value.copy_(ours.state[p][name])
    if not lockstep:
        rtol, atol = FINAL_TOLERANCES[dtype, kwargs["ns_dtype"]]
        for name, a, b in _state_triples(ours, params, reference, twins):
            torch.testing.assert_close(
                a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
            )
    assert not params[-1].requires_grad and params[-1] not in ours.state


#: The CPU kernels of each instruction set this machine runs (none without onepass._C).
CPU_BACKENDS = [b for b in all_backends() if b.name == "cpu"]


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=lambda b: b.id)
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str
)
@pytest.mark.parametrize("config", CONFIGS[:3], ids=config_id)
def test_cpu_backends_match_the_reference(
    backend: Any, dtype: torch.dtype, config: dict[str, Any]
) -> None:
    onepass.set_cpu_capability(backend.capability)
    _check_backend(backend.name, dtype, config)


def _straight_muon_step(
    p: torch.Tensor, state: dict[str, Any], g: torch.Tensor, lr: float, config: dict[str, Any]
) -> None:
    """One float64 step of one param, in place, written out from torch.optim.Muon's and
    torch.optim.AdamW's documented updates (no onepass code): Muon for matrices (a conv weight
    as its (out, in*kh*kw) matrix), AdamW with Moonlight's betas for the others."""
    wd = config["weight_decay"]
    if p.dim() < 2:
        b1, b2 = 0.9, 0.95
        t = state["step"] = state.get("step", 0) + 1
        m = state.setdefault("exp_avg", torch.zeros_like(p)).mul_(b1).add_((1 - b1) * g)
        v = state.setdefault("exp_avg_sq", torch.zeros_like(p)).mul_(b2).add_((1 - b2) * g * g)
        p.mul_(1 - lr * wd)
        p.sub_(lr / (1 - b1**t) * m / ((v / (1 - b2**t)).sqrt() + 1e-8))
        return
    mu = config.get("momentum", 0.95)
    buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
    buf.mul_(mu).add_((1 - mu) * g)
    u = (1 - mu) * g + mu * buf if config.get("nesterov", True) else buf
    x = u.reshape(p.shape[0], -1)
    rows, cols = x.shape
    x = x.T if rows > cols else x
    x = x / max(float(x.norm()), 1e-7)
    a, b, c = config.get("ns_coefficients", (3.4445, -4.775, 2.0315))
    for _ in range(config.get("ns_steps", 5)):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.T if rows > cols else x
    if config.get("adjust_lr_fn") == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, cols))
    else:
        ratio = math.sqrt(max(1.0, rows / cols))
    p.mul_(1 - lr * wd).sub_(lr * ratio * x.reshape(p.shape))


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str
)
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_reference_follows_a_float64_muon(dtype: torch.dtype, config: dict[str, Any]) -> None:
    """The reference backend, step by step from its own stored values, against the rule in
    float64 (_straight_muon_step): the backend comparisons above check the other backends
    against it. Float64: equal up to operation order; float32: up to float32 rounding of the
    param and of Newton-Schulz; 16-bit: within one ulp of the float64 result rounded to 16 bits
    (the param is written once from fp32) plus LOCKSTEP_ATOL (the momentum and the update are
    rounded to 16 bits), and few elements rounded otherwise: torch.optim.Muon's two roundings
    (after the decay, after the update), or a dropped decay, are off on many."""
    params = _params(dtype)
    grads = _grads(params)
    ns_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    kwargs = {"lr": 0.02, "weight_decay": 0.1, "ns_dtype": ns_dtype, **config}
    opt = onepass.Muon(params, backend="reference", **kwargs)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.25 * s))
    tolerance = {torch.float64: (1e-12, 1e-14), torch.float32: (1e-6, 1e-7)}
    for step, step_grads in enumerate(grads):
        expected = []
        for p, g in zip(params, step_grads, strict=True):
            if g is None:
                continue
            entry = opt.state.get(p, {})
            state = {k: v.to(torch.float64, copy=True) for k, v in entry.items() if k != "step"}
            if "step" in entry:
                state["step"] = int(entry["step"])
            p64 = p.detach().to(torch.float64, copy=True)  # (a float64 param's own copy)
            _straight_muon_step(p64, state, g.double(), 0.02 / (1 + 0.25 * step), kwargs)
            expected.append((p, p64, state))
        for p, g in zip(params, step_grads, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()
        schedule.step()
        actual, wanted = [], []
        for p, p64, state in expected:
            assert set(opt.state[p]) == set(state)
            for name, value in state.items():
                if name == "step":
                    assert float(opt.state[p]["step"]) == value
                else:
                    actual.append(opt.state[p][name].reshape(-1))
                    wanted.append(value.reshape(-1))
            actual.append(p.detach().reshape(-1))
            wanted.append(p64.reshape(-1))
        got, want = torch.cat(actual), torch.cat(wanted)
        if dtype in LOCKSTEP_ATOL:
            assert_within_ulps(
                got, want.to(dtype), 1, LOCKSTEP_ATOL[dtype], f"step {step}", LOCKSTEP_FRACTION_OFF
            )
        else:
            rtol, atol = tolerance[dtype]
            torch.testing.assert_close(got, want.to(dtype), rtol=rtol, atol=atol)


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


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=lambda b: b.id)
def test_bf16_newton_schulz_matches_the_reference(backend: Any) -> None:
    """torch.optim.Muon's bfloat16 Newton-Schulz: batched here, per matrix in the reference."""
    onepass.set_cpu_capability(backend.capability)
    _check_backend(backend.name, torch.float32, {"ns_dtype": torch.bfloat16})


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
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
    grads = [[torch.randn_like(p) for p in params] for _ in range(6)]

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
    # onepass -> torch: the state is torch's (momentum_buffer only) and continues there: two
    # torch steps from onepass's checkpoint (as on disk: no tensor shared with onepass's state,
    # on copies of the params), two more onepass steps; the same params and buffers
    twins = [p.detach().clone().requires_grad_() for p in mine]
    back = torch.optim.Muon(twins, lr=1.0)
    back.load_state_dict(copy.deepcopy(second.state_dict()))
    assert back.param_groups[0]["lr"] == 0.02
    for p, q in zip(mine, twins, strict=True):
        assert set(back.state[q]) == {"momentum_buffer"}
        assert back.state[q]["momentum_buffer"] is not second.state[p]["momentum_buffer"]
    steps(second, mine, range(4, 6))
    steps(back, twins, range(4, 6))
    for p, q in zip(mine, twins, strict=True):
        torch.testing.assert_close(q, p, **tol)
        buffers = back.state[q]["momentum_buffer"], second.state[p]["momentum_buffer"]
        torch.testing.assert_close(*buffers, **tol)


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


@pytest.mark.parametrize("native_bf16", [True, False], ids=["bf16-matmul-cpu", "other-cpu"])
def test_default_ns_dtype_follows_the_cpu(native_bf16: bool, monkeypatch: Any) -> None:
    """ns_dtype=None: float64 for float64 params, else bfloat16 on GPUs and on CPUs with native
    bf16 matmuls, float32 on other CPUs. Both CPU kinds are checked on whichever CPU this is
    (CI's AVX2 CPU has no native bf16 matmul; an AVX512-BF16 or AMX one has), and a default step
    equals one with the dtype given."""
    monkeypatch.setattr(muon_module, "CPU_HAS_BF16_MATMUL", native_bf16)
    cpu, expected = torch.device("cpu"), torch.bfloat16 if native_bf16 else torch.float32
    assert muon_module.default_ns_dtype(cpu) == expected
    assert muon_module.default_ns_dtype(torch.device("cuda")) == torch.bfloat16
    assert muon_module.resolve_ns_dtype(None, torch.float64, cpu) == torch.float64
    assert muon_module.resolve_ns_dtype(None, torch.float32, cpu) == expected
    assert muon_module.resolve_ns_dtype(torch.float16, torch.float32, cpu) == torch.float16

    def run(ns_dtype: torch.dtype | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        params = [torch.randn(24, 40).requires_grad_(), torch.randn(40, 9).requires_grad_()]
        optimizer = onepass.Muon(params, lr=2e-2, ns_dtype=ns_dtype, backend="cpu")
        for s in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(s))
            optimizer.step()
        return [p.detach() for p in params]

    default = run(None)
    assert all(torch.equal(a, b) for a, b in zip(default, run(expected), strict=True))
    other = torch.float32 if native_bf16 else torch.bfloat16
    assert not all(torch.equal(a, b) for a, b in zip(default, run(other), strict=True))
