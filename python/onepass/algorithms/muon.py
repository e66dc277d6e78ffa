"""Muon (Jordan et al., 2024; Liu et al., 2025, "Muon is scalable for LLM training"): spec,
pure-torch reference and the three-stage native step.

For each matrix with a gradient (torch.optim.Muon's step; a conv weight is flattened to
``(out, in * kh * kw)``)::

    buf = lerp(buf, g, 1 - momentum)              # momentum_buffer
    u = lerp(g, buf, momentum) if nesterov else buf
    X = u / max(||u||_F, eps) in ns_dtype, transposed if rows > cols
    ns_steps times: A = X X^T;  B = b A + c A A;  X = a X + B X
                    (ns_method="gram": the same on A, see newton_schulz)
    p = p * (1 - lr * wd)                         # the unadjusted lr
    p = p - lr' * X (transposed back)             # lr' = lr * ratio(A, B), adjust_lr_fn

The native step (backends cpu, triton, cuda) is three stages per bucket: one fused multi-tensor
pass for the momentum (kernel ``muon_momentum``: reads g and buf, writes buf and u into an update
workspace laid out by matrix shape); Newton-Schulz on torch matmuls, the same-shape matrices of the
bucket in batched matmul chains (one per shape on GPUs; on CPUs batches of at most
CPU_NS_BATCH_BYTES), with the cast to ``ns_dtype`` folded into the normalisation
and lr' / lr folded into the last iteration; and one fused pass for decay and update (the SGD
kernel without momentum, decoupled decay, the orthogonalised update as its gradient).

Params that are not matrices, and groups with ``use_muon=False``, are stepped by AdamW (the ADAM
spec) in the same optimizer: see :class:`onepass.Muon`.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from onepass._ops import native_op
from onepass.algorithms.adam import ADAM
from onepass.algorithms.base import (
    MASTER,
    NEAREST,
    AlgorithmSpec,
    Grads,
    Group,
    Launcher,
    Rounding,
    bucket_rounding,
    math_param,
    opmath_dtype,
    reference_amp_scale,
    scalar,
    triton_launcher,
)
from onepass.algorithms.sgd import SGD_SPEC

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def _cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX), where oneDNN's
    bf16 matmul beats float32 (1.7x on an AVX512-BF16 EPYC); elsewhere it converts and is slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


#: Read once at import (torch.compile cannot trace the CPU feature queries).
CPU_HAS_BF16_MATMUL = _cpu_has_bf16_matmul()


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """The default Newton-Schulz dtype: bfloat16 (torch.optim.Muon's) on GPUs and on CPUs with
    native bf16 matmuls; float32 on other CPUs, where bf16 matmuls are emulated and slower."""
    if device.type == "cpu" and not CPU_HAS_BF16_MATMUL:
        return torch.float32
    return torch.bfloat16


def resolve_ns_dtype(
    ns_dtype: torch.dtype | None, param_dtype: torch.dtype, device: torch.device
) -> torch.dtype:
    """The Newton-Schulz dtype: the group's, or by default float64 for float64 params (the
    oracle's precision) and default_ns_dtype otherwise."""
    if ns_dtype is not None:
        return ns_dtype
    return torch.float64 if param_dtype == torch.float64 else default_ns_dtype(device)


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """The 2-D view Newton-Schulz works on: a conv weight (out, in, kh, kw) -> (out, in*kh*kw)."""
    # the width spelled out: reshape cannot infer -1 for a weight with no elements
    return t if t.dim() == 2 else t.reshape(t.shape[0], math.prod(t.shape[1:]))


def lr_ratio(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """lr' / lr for a (rows, cols) matrix: torch.optim.Muon's ``_adjust_lr`` (1 for a matrix
    with no elements: nothing to scale, where rows / cols would divide by zero)."""
    if rows == 0 or cols == 0:
        return 1.0
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


@dataclass(frozen=True)
class MuonScalars:
    """The runtime scalars of one step of one param group."""

    lr: float
    weight_decay: float
    momentum: float
    nesterov: bool
    ns_coefficients: tuple[float, float, float]
    eps: float
    ns_steps: int
    adjust_lr_fn: str | None
    ns_dtype: torch.dtype | None  # None: default_ns_dtype of the params' device
    ns_method: str  # NS_METHODS

    @classmethod
    def from_group(cls, group: Group, lr: float | None = None) -> MuonScalars:
        a, b, c = group["ns_coefficients"]
        return cls(
            lr=scalar(group["lr"]) if lr is None else lr,
            weight_decay=scalar(group["weight_decay"]),
            momentum=scalar(group["momentum"]),
            nesterov=bool(group["nesterov"]),
            ns_coefficients=(float(a), float(b), float(c)),
            eps=float(group["eps"]),
            ns_steps=int(group["ns_steps"]),
            adjust_lr_fn=group["adjust_lr_fn"],
            ns_dtype=group.get("ns_dtype"),
            ns_method=group.get("ns_method", "standard"),
        )


NS_METHODS = ("gram", "standard")

#: Gram iterations between restarts (see gram_segments).
GRAM_RESTART_EVERY = 3


def gram_segments(steps: int) -> list[int]:
    """The iterations of each restart segment of Gram Newton-Schulz: ``steps`` cut into runs of
    GRAM_RESTART_EVERY. In bf16 the Gram matrix drifts from X X^T (rounding gives it spurious
    negative eigenvalues, which the polynomial then grows); a restart recomputes X and its Gram
    matrix. With torch's coefficients on 768 x 3072 matrices in bf16 (relative error to the
    float64 iteration; torch's bf16 iteration in brackets): restarting after 3 of the 5
    iterations gave 0.011 (0.010) on a Gaussian matrix, 0.011-0.063 (0.011-0.078) on decaying
    spectra and 0.14 (0.21) at rank 64; after 2, 0.019 where torch gives 0.011; no restart was
    up to 100x worse on decaying spectra."""
    return [min(GRAM_RESTART_EVERY, steps - k) for k in range(0, steps, GRAM_RESTART_EVERY)]


def _matmuls(rows: int, cols: int, steps: int, method: str) -> int:
    """Multiply-adds of Newton-Schulz on one (rows, cols) matrix."""
    m, n = min(rows, cols), max(rows, cols)
    if method == "standard":  # per iteration X X^T, A A, B X
        return steps * (2 * m * m * n + m**3)
    total = 0
    for length in gram_segments(steps):  # per segment X X^T and Q X, then per iteration:
        total += 2 * m * m * n  # R R, P Q (not the first), R P and P (R P) (not the last)
        total += sum(m**3 * (1 + (k > 0) + 2 * (k < length - 1)) for k in range(length))
    return total


def uses_gram(method: str, rows: int, cols: int, steps: int) -> bool:
    """Whether ``method`` runs Gram Newton-Schulz on a (rows, cols) matrix: "gram" does where it
    takes fewer multiply-adds than the standard iteration (aspect ratio above ~1.5 for 5 steps;
    square matrices keep the standard one)."""
    return method == "gram" and _matmuls(rows, cols, steps, "gram") < _matmuls(
        rows, cols, steps, "standard"
    )


#: Rows per block of symmetric_product: ~256 keeps each block a matmul the CPU runs near its
#: peak while skipping most of the lower triangle (3 blocks of a 768 x 768 product multiply
#: 6 of its 9 blocks).
SYMMETRIC_BLOCK_ROWS = 256


def symmetric_blocks(device: torch.device, size: int) -> int:
    """Row blocks for symmetric_product on a (size, size) result: on CPUs, where matmuls are
    compute-bound, ``size / SYMMETRIC_BLOCK_ROWS`` rounded, from 3 blocks (size ~640): two
    save a quarter of the multiply-adds, which the smaller matmuls, the mirror and a call per
    matrix gave back (bf16 Newton-Schulz of 64 400 x 400 matrices 0.91x, 32 of 512 x 512
    1.00x; 8 of 1024 x 1024, 4 blocks, 1.16x; 4 of 2048 x 2048 1.26x). 0 on GPUs, where a
    768 x 768 batched product is launch-bound and splitting it would only add launches, and
    inside torch.compile, which cannot trace matmuls into the blocks' views (non-contiguous
    ``out=``): a compiled CPU step multiplies whole products."""
    if device.type != "cpu" or torch.compiler.is_compiling():
        return 0
    blocks = round(size / SYMMETRIC_BLOCK_ROWS)
    return blocks if blocks >= 3 else 0


def _matmul_ops(t: torch.Tensor) -> tuple[Any, Any]:
    """(mm, addmm) for one matrix or a batch of them (bmm, baddbmm)."""
    return (torch.bmm, torch.baddbmm) if t.dim() == 3 else (torch.mm, torch.addmm)


def _as_batch(t: torch.Tensor) -> torch.Tensor:
    """A matrix as a batch of one (a view); a batch as it is."""
    return t if t.dim() == 3 else t[None]


def symmetric_product(
    left: torch.Tensor,
    right: torch.Tensor,
    blocks: int,
    add: torch.Tensor | None = None,
    beta: float = 0.0,
    alpha: float = 1.0,
) -> torch.Tensor:
    """``alpha * left @ right + beta * add`` for a product known to be symmetric (X X^T, and
    the m x m products of Gram Newton-Schulz: polynomials in one Gram matrix commute), on one
    (m, m) matrix or a batch: with ``blocks`` row blocks only the blocks on and above the
    diagonal are multiplied ((blocks + 1) / (2 * blocks) of the multiply-adds) and the blocks
    below them mirrored. ``blocks`` 0 runs the full matmul.

    Each block is one torch.mm per matrix of the batch, written in place: a batched matmul on
    these sliced operands copies them first (bf16 on CPU)."""
    if blocks == 0:
        mm, addmm = _matmul_ops(left)
        if add is None:
            return mm(left, right)
        return addmm(add, left, right, beta=beta, alpha=alpha)
    size = left.shape[-2]
    out = left.new_empty(*left.shape[:-1], size)
    bounds = [size * i // blocks for i in range(blocks + 1)]
    lefts, rights, outs = _as_batch(left), _as_batch(right), _as_batch(out)
    adds = None if add is None else _as_batch(add)
    for k in range(lefts.shape[0]):
        for start, stop in itertools.pairwise(bounds):
            block = outs[k, start:stop, start:]
            if adds is None:
                torch.mm(lefts[k, start:stop], rights[k, :, start:], out=block)
            else:
                torch.addmm(adds[k, start:stop, start:], lefts[k, start:stop],
                            rights[k, :, start:], beta=beta, alpha=alpha, out=block)  # fmt: skip
    for start, stop in itertools.pairwise(bounds[:-1]):  # the lower blocks of each column
        outs[:, stop:, start:stop] = outs[:, start:stop, stop:].mT
    return out


def newton_schulz(
    x: torch.Tensor,
    coefficients: tuple[float, float, float],
    steps: int,
    eps: float,
    dtype: torch.dtype,
    scale: float = 1.0,
    method: str = "standard",
) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of torch.optim.Muon on one matrix (rows, cols) or a
    batch (n, rows, cols) of same-shape matrices; returns ``scale`` times the result in ``dtype``
    (``scale`` folded into the last iteration). Wide matrices are iterated as they are, tall ones
    transposed (X X^T is then the smaller Gram matrix); the result has ``x``'s shape.

    ``method="gram"``: Gram Newton-Schulz (Dao et al., 2026) where uses_gram says it is cheaper,
    the same polynomial iteration rewritten on the m x m Gram matrix. Each iteration is
    X' = P X with P = a I + b R + c R^2 and R = X X^T, a polynomial in R, so R' = P R P and the
    iterations compose into one m x m product Q applied to X at the end: m^3 matmuls instead of
    m^2 n ones. Restarted per gram_segments. On CPUs its symmetric products (and X X^T and
    A A of the standard iteration on near-square matrices) multiply only their upper block
    triangle (symmetric_product). Equal to the standard iteration up to rounding.
    ``method="standard"`` is torch.optim.Muon's iteration, operation for operation."""
    a, b, c = coefficients
    tall = x.shape[-2] > x.shape[-1]
    # A copy in dtype, whatever x's dtype: the normalisation below works in place.
    ortho = x.to(dtype, copy=True)
    if tall:
        ortho = ortho.mT
    norm = torch.linalg.vector_norm(ortho, dim=(-2, -1), keepdim=True)
    ortho = ortho.div_(norm.clamp_(min=eps))
    mm, addmm = _matmul_ops(ortho)
    # Blocks are written through out=, which autograd refuses where an input requires grad:
    # whole products then (never in a step, which runs under no_grad).
    differentiable = torch.is_grad_enabled() and x.requires_grad
    blocks = 0
    if method == "gram" and not differentiable:
        blocks = symmetric_blocks(x.device, ortho.shape[-2])

    def apply(left: torch.Tensor, beta: float, alpha: float, last: bool) -> torch.Tensor:
        """beta X + alpha left X. The last one of a tall matrix under "gram" comes out in the
        matrix's own layout, (X^T left^T)^T, which spares the caller a transposed copy (on the
        CPU a tenth of a 3072 x 768 matrix's Newton-Schulz)."""
        if last and tall and method == "gram":
            return addmm(ortho.mT, ortho.mT, left.mT, beta=beta, alpha=alpha).mT
        if beta == 0.0 and alpha == 1.0:
            return mm(left, ortho)
        return addmm(ortho, left, ortho, beta=beta, alpha=alpha)

    if uses_gram(method, ortho.shape[-2], ortho.shape[-1], steps):
        opmath = opmath_dtype(dtype)
        segments = gram_segments(steps)
        for index, length in enumerate(segments):
            gram = symmetric_product(ortho, ortho.mT, blocks)
            product = gram  # Q, set by the first iteration
            for k in range(length):
                # P = a I + b R + c R^2. In 16 bits its diagonal is summed in opmath and
                # rounded once ((R^2)_ii = ||R_i||^2): rounding b R_ii + c (R^2)_ii and then
                # adding a doubled the error of bf16 Gram Newton-Schulz on flat spectra.
                poly = symmetric_product(gram, gram, blocks, add=gram, beta=b, alpha=c)
                diagonal = poly.diagonal(dim1=-2, dim2=-1)
                if dtype == opmath:
                    diagonal.add_(a)
                else:
                    row_norms = torch.linalg.vector_norm(gram, dim=-1, dtype=opmath)
                    diag = gram.diagonal(dim1=-2, dim2=-1).to(opmath).mul_(b).add_(a)
                    diagonal.copy_(diag.add_(row_norms.square_(), alpha=c))
                product = poly if k == 0 else symmetric_product(poly, product, blocks)
                if k < length - 1:  # R' = P R P
                    gram = symmetric_product(poly, symmetric_product(gram, poly, blocks), blocks)
            last = index == len(segments) - 1
            ortho = apply(product, 0.0, scale if last else 1.0, last)  # scale: one rounding
        return ortho.mT if tall else ortho
    for i in range(steps):
        gram = symmetric_product(ortho, ortho.mT, blocks)
        gram_update = symmetric_product(gram, gram, blocks, add=gram, beta=b, alpha=c)
        last = i == steps - 1
        ortho = apply(gram_update, a * scale if last else a, scale if last else 1.0, last)
    if steps == 0 and scale != 1.0:
        ortho = ortho * scale
    return ortho.mT if tall else ortho


@torch.no_grad()
def muon_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor,
    s: MuonScalars,
    grad_scale: float = 1.0,
    rounding: Rounding = NEAREST,
) -> None:
    """One Muon step of one tensor, in place: torch.optim.Muon's ``_single_tensor_muon`` for a
    2-D param (a conv weight flattened), with ``ns_dtype`` for its bfloat16. ``grad_scale`` is the
    AMP loss scale the gradient still carries.

    With mixed storage (a state dtype other than the param's, fp32 grads of 16-bit params, or
    ``param`` an fp32 master) the step is the kernels' instead of torch's: the momentum in
    opmath, stored once; the update rounded to ``param``'s dtype (the kernels' workspace)
    before Newton-Schulz. A 16-bit param is written once, from opmath, as the fused decay and
    update pass writes it: torch.optim.Muon rounds after the decay and again after the update,
    which loses the decay where it is under half a unit in the last place (lr*wd < 2^-9 in bf16)
    and drifts from the float64 step by up to an ulp a step."""
    g = grad if grad_scale == 1.0 else grad / grad_scale
    if momentum_buffer.dtype == g.dtype == param.dtype:  # torch.optim.Muon: the storage dtype
        momentum_buffer.lerp_(g, 1 - s.momentum)
        update = g.lerp(momentum_buffer, s.momentum) if s.nesterov else momentum_buffer
        mixed = False
    else:
        opmath = opmath_dtype(param.dtype)
        buf = momentum_buffer.to(opmath).lerp_(g.to(opmath), 1 - s.momentum)
        momentum_buffer.copy_(buf)
        update = (g.to(opmath).lerp(buf, s.momentum) if s.nesterov else buf).to(param.dtype)
        mixed = True
    dtype = resolve_ns_dtype(s.ns_dtype, param.dtype, param.device)
    matrix = as_matrix(update)
    ortho = newton_schulz(matrix, s.ns_coefficients, s.ns_steps, s.eps, dtype, method=s.ns_method)
    ratio = lr_ratio(s.adjust_lr_fn, *matrix.shape)
    if mixed or param.dtype in (torch.bfloat16, torch.float16):  # one rounding
        p = param.to(opmath_dtype(param.dtype)).mul_(1 - s.lr * s.weight_decay)
        rounding.store(param, p.add_(ortho.reshape(param.shape), alpha=-s.lr * ratio))
        return
    param.mul_(1 - s.lr * s.weight_decay)
    param.add_(ortho.reshape(param.shape), alpha=-s.lr * ratio)


def _check_group(group: Group) -> None:
    """torch.optim.Muon's checks and messages (Muon groups only; AdamW groups: ADAM's)."""
    _check_step(group)
    lr = group["lr"]
    if not scalar(lr) >= 0.0:
        raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
    if not scalar(group["momentum"]) >= 0.0:
        raise ValueError(f"momentum should be >= 0 but is: {group['momentum']}")
    if not scalar(group["weight_decay"]) >= 0.0:
        raise ValueError(f"weight decay should be >= 0 but is: {group['weight_decay']}")


def _check_step(group: Group) -> None:
    """What the passes after the momentum pass read, checked before it writes the buffers: the
    lr (the update pass's) and the Newton-Schulz settings."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr.is_floating_point():
            raise ValueError(f"lr must be a float or a floating-point tensor, not {lr.dtype}")
    elif not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a number, not {lr!r}")
    if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
        raise ValueError(f"Adjust learning rate function {group['adjust_lr_fn']} is not supported")
    if int(group["ns_steps"]) < 0:
        raise ValueError(f"ns_steps must be >= 0, not {group['ns_steps']}")
    if int(group["ns_steps"]) >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(group["ns_coefficients"]) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    ns_dtype = group.get("ns_dtype")
    if ns_dtype is not None and ns_dtype not in (torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"ns_dtype must be bfloat16, float32, float64 or None, not {ns_dtype}")
    if group.get("ns_method", "standard") not in NS_METHODS:
        raise ValueError(f"ns_method must be 'gram' or 'standard', not {group['ns_method']!r}")


def _check_matrix(param: torch.Tensor, name: str) -> None:
    """A param that reaches a Muon group's buckets although it is no matrix: appended to
    ``group["params"]``, or its group switched to ``use_muon=True`` after the split."""
    if param.dim() < 2:
        raise ValueError(
            f"onepass: {name} has {param.dim()} dims, but its param group has use_muon=True, "
            "which orthogonalises matrices (2-D, or conv weights of more dims): give it to a "
            "group with use_muon=False (torch.optim.Muon: 'Muon only supports 2D parameters')"
        )


def _active_slots(group: Group) -> tuple[str, ...]:
    return ("momentum_buffer",)


def _bytes_per_element(group: Group, itemsize: int) -> int:
    """The two fused passes: g, buf read, buf and the update written; then p and the update
    read, p written. Newton-Schulz's matmuls are compute, not counted here."""
    return itemsize * (4 + 3)


def _reference_launch(
    bucket: Any,
    grads: Grads,
    group: Group,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> None:
    assert grads is not None  # listed by the engine: only a one-op native launch reads them
    scale = reference_amp_scale(grad_scale, found_inf)
    if scale is None:
        return
    s = MuonScalars.from_group(group)
    for i, g in enumerate(grads):
        if g is None:
            continue
        bucket.step[i] += 1
        slots = bucket.slot_views(i)
        muon_reference(
            math_param(bucket, i, slots),
            g,
            slots["momentum_buffer"],
            s,
            scale,
            bucket_rounding(bucket, group, i),
        )
        if MASTER in slots:
            bucket.params[i].copy_(slots[MASTER])


class _BucketView:
    """What a launcher reads of a bucket, with other params, steps or buffers: the momentum
    pass steps the update workspace in the params' place; the final pass keeps its own step
    counts (the bucket's count Muon's steps once). Its own table cache (the tables differ)."""

    def __init__(
        self,
        bucket: Any,
        params: Sequence[torch.Tensor],
        step: torch.Tensor,
        buffers: dict[str, torch.Tensor],
    ) -> None:
        self.params = list(params)
        self.step = step
        self.buffers = buffers
        self.offsets = bucket.offsets
        self.state_table = bucket.state_table
        self.device = bucket.device
        self.dtype = self.params[0].dtype if self.params else bucket.dtype
        self.state_dtype = bucket.state_dtype
        self.table_cache: dict[str, Any] = {}
        self._bucket = bucket

    def lr_tensor(self, lr: float | torch.Tensor) -> torch.Tensor:
        return self._bucket.lr_tensor(lr)


@dataclass
class _ShapeGroup:
    indices: list[int]  # bucket positions of these matrices
    stack: torch.Tensor  # (n, rows, cols) view of the update workspace
    rows: int
    cols: int


class _Workspace:
    """Per bucket: the update buffer (matrices of one shape contiguous, so that a shape's
    batches of Newton-Schulz are slices of it), the views the two passes take, and the bucket
    views."""

    def __init__(self, bucket: Any) -> None:
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(bucket.params):
            rows, cols = as_matrix(p).shape
            by_shape.setdefault((rows, cols), []).append(i)
        total = sum(p.numel() for p in bucket.params)
        # The update in the params' dtype (torch.optim.Muon's), in fp32 under master weights.
        dtype = torch.float32 if MASTER in bucket.buffers else bucket.dtype
        self.buffer = torch.zeros(total, dtype=dtype, device=bucket.device)
        self.views: list[torch.Tensor] = [torch.empty(0)] * len(bucket.params)
        self.groups: list[_ShapeGroup] = []
        offset = 0
        for (rows, cols), indices in by_shape.items():
            n = len(indices) * rows * cols
            stack = self.buffer[offset : offset + n].view(len(indices), rows, cols)
            for k, i in enumerate(indices):
                self.views[i] = stack[k].view(bucket.params[i].shape)
            self.groups.append(_ShapeGroup(indices, stack, rows, cols))
            offset += n
        self.momentum_pass = _BucketView(
            bucket, self.views, bucket.step, {"momentum_buffer": bucket.buffers["momentum_buffer"]}
        )
        # The final pass writes the params (and their masters, with master weights).
        masters = {MASTER: bucket.buffers[MASTER]} if MASTER in bucket.buffers else {}
        self.update_pass = _BucketView(
            bucket, bucket.params, torch.zeros_like(bucket.step), masters
        )


#: Bytes of the matrices one batched Newton-Schulz takes on the CPU, in ns_dtype: 16 MiB keeps
#: each matmul's result and operands under glibc's largest mmap threshold (32 MiB), so the
#: buffers are recycled from the heap; a whole batch of twelve 768 x 3072 matrices was
#: allocated by mmap and page-faulted anew at every product, 9% slower (gpt2-small's matrices).
CPU_NS_BATCH_BYTES = 16 << 20


def ns_batch(device: torch.device, rows: int, cols: int, count: int, itemsize: int) -> int:
    """How many same-shape matrices one batched Newton-Schulz takes: all on GPUs (fewer,
    larger launches), as many as CPU_NS_BATCH_BYTES holds in ``itemsize``-byte elements on CPUs
    (at least one)."""
    if device.type != "cpu":
        return max(count, 1)
    return max(1, min(count, CPU_NS_BATCH_BYTES // max(rows * cols * itemsize, 1)))


def _orthogonalize(work: _Workspace, grads: list[torch.Tensor | None], s: MuonScalars) -> None:
    """Newton-Schulz of every matrix with a grad, batched per shape (ns_batch), written back
    into the update workspace (in the params' dtype), lr'/lr folded in."""
    dtype = resolve_ns_dtype(s.ns_dtype, work.buffer.dtype, work.buffer.device)
    for group in work.groups:
        stepped = [k for k, i in enumerate(group.indices) if grads[i] is not None]
        if not stepped:
            continue
        ratio = lr_ratio(s.adjust_lr_fn, group.rows, group.cols)
        args = (s.ns_coefficients, s.ns_steps, s.eps, dtype, ratio, s.ns_method)
        every = len(stepped) == len(group.indices)
        batch = ns_batch(group.stack.device, group.rows, group.cols, len(stepped), dtype.itemsize)
        for start in range(0, len(stepped), batch):
            if every:
                part = group.stack[start : start + batch]
                part.copy_(newton_schulz(part, *args))
                continue
            # some matrices have no grad this step: orthogonalise only the others
            index = torch.tensor(stepped[start : start + batch])
            if group.stack.device.type == "cuda":  # pinned, asynchronous: no host sync
                index = index.pin_memory()
            index = index.to(group.stack.device, non_blocking=True)
            ortho = newton_schulz(group.stack.index_select(0, index), *args)
            group.stack.index_copy_(0, index, ortho.to(group.stack.dtype))


def _native_step(momentum_launcher: Any, final_launcher: Any) -> Launcher:
    def launch(
        bucket: Any,
        grads: Grads,
        group: Group,
        grad_scale: torch.Tensor | None,
        found_inf: torch.Tensor | None,
    ) -> None:
        assert grads is not None  # listed by the engine: only a one-op native launch reads them
        work = bucket.table_cache.get("muon")
        if work is None:
            work = bucket.table_cache["muon"] = _Workspace(bucket)
        s = MuonScalars.from_group(group, lr=0.0)
        # 1. momentum and Nesterov look-ahead: one pass, the update into the workspace
        momentum_launcher(work.momentum_pass, grads, group, grad_scale, found_inf)
        # 2. Newton-Schulz (no host sync: after an inf the workspace is stale, step 3 skips)
        _orthogonalize(work, grads, s)
        # 3. p = p * (1 - lr*wd) - lr * (ratio * O): SGD without momentum, decoupled decay
        final_group = {
            "lr": group["lr"],
            "momentum": 0.0,
            "dampening": 0.0,
            "weight_decay": group["weight_decay"],
            "nesterov": False,
            "maximize": False,
            "decay": "decoupled",
            "stochastic_rounding": group.get("stochastic_rounding", False),
            "sr_seed": group.get("sr_seed", 0),
        }
        updates = [None if g is None else work.views[i] for i, g in enumerate(grads)]
        final_launcher(work.update_pass, updates, final_group, None, found_inf)

    return launch


def _native_momentum(
    bucket: Any,
    grads: Grads,
    group: Group,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> None:
    native_op("muon_momentum_")(
        bucket.params,
        grads,
        bucket.buffers["momentum_buffer"],
        bucket.step,
        bucket.state_table,
        grad_scale,
        found_inf,
        scalar(group["momentum"]),
        bool(group["nesterov"]),
    )


_native = _native_step(_native_momentum, SGD_SPEC.launchers["cpu"])

#: The matrices of a Muon group.
MUON_MATRICES: AlgorithmSpec = AlgorithmSpec(
    name="muon",
    # the final pass is an SGD launch: its block, decay decoupled
    device_hyper=("lr", "weight_decay"),
    decay_in_block=True,
    slots=("momentum_buffer",),
    active_slots=_active_slots,
    step_in_state=False,  # torch.optim.Muon keeps none
    check_group=_check_group,
    check_step=_check_step,
    check_param=_check_matrix,
    optional_slots=("momentum_buffer",),
    bytes_per_element=_bytes_per_element,
    reference=muon_reference,
    # Newton-Schulz works per matrix: never one flat segment (flatten=True keeps the buffers).
    reduction="per_tensor",
    launchers={
        "reference": _reference_launch,
        "cpu": _native,
        "cuda": _native,
        "triton": _native_step(triton_launcher("muon"), SGD_SPEC.launchers["triton"]),
    },
)


def _group_spec(group: Group) -> AlgorithmSpec:
    return MUON_MATRICES if group["use_muon"] else ADAM


def _check_adamw_keys(group: Group) -> None:
    """adamw_betas and adamw_eps, named as such (an AdamW group checks them again as betas and
    eps), in every group: an optimizer of matrices only takes a bias group later."""
    betas, eps = group.get("adamw_betas", (0.9, 0.95)), group.get("adamw_eps", 1e-8)
    if len(betas) != 2:
        raise ValueError(f"adamw_betas must be a pair, not {betas}")
    for i, beta in enumerate(betas):
        if not 0.0 <= scalar(beta) < 1.0:
            raise ValueError(f"Invalid adamw_betas parameter at index {i}: {beta}")
    if not scalar(eps) >= 0.0:
        raise ValueError(f"Invalid adamw_eps value: {eps}")


def _check_any_group(group: Group) -> None:
    _check_adamw_keys(group)
    _group_spec(group).check_group(group)


#: onepass.Muon: Muon for the matrices of ``use_muon`` groups, AdamW (the ADAM spec, with the
#: group's ``betas`` / ``eps`` set from ``adamw_betas`` / ``adamw_eps``) for every other param.
MUON: AlgorithmSpec = AlgorithmSpec(
    name="muon",
    slots=("momentum_buffer", "exp_avg", "exp_avg_sq"),
    active_slots=lambda group: _group_spec(group).active_slots(group),
    step_in_state=False,
    check_group=_check_any_group,
    bytes_per_element=lambda group, itemsize: _group_spec(group).bytes_per_element(group, itemsize),
    reference=muon_reference,
    launchers=dict(MUON_MATRICES.launchers),
    group_spec=_group_spec,
)

__all__ = [
    "MUON",
    "MUON_MATRICES",
    "NS_METHODS",
    "MuonScalars",
    "as_matrix",
    "default_ns_dtype",
    "gram_segments",
    "lr_ratio",
    "muon_reference",
    "newton_schulz",
    "opmath_dtype",
    "uses_gram",
]
