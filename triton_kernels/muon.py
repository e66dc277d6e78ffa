"""Muon's momentum pass in Triton (math.h ``muon_momentum``): one launch per bucket reads the grad
and the momentum buffer and writes the buffer and the update that Newton-Schulz orthogonalises.

Per element (math.h, same order; torch.lerp's two formulas, chosen on the host weight)::

    g = g * grad_scale                       # times 1/amp_scale under a GradScaler
    buf = lerp(buf, g, 1 - momentum)
    update = lerp(g, buf, momentum) if nesterov else buf

The table's "param" of each tensor is its slice of the update workspace (see
``onepass.algorithms.muon``; the bucket view's dtype): the kernel writes it and reads nothing
from it. The momentum buffer has the bucket's state dtype and the grads their own (each pointer's
element type); every store rounds to nearest (the momentum pass never rounds stochastically and
has no master weights).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from onepass.triton_kernels import common
from onepass.triton_kernels.common import (
    advance_step,
    amp_tensor,
    f64_bits,
    load_segment,
    prepare,
    tl_dtypes,
    to_storage,
)


@triton.jit
def lerp(start, end, weight, one_minus_weight, FROM_START: tl.constexpr):
    """torch.lerp: start + w * (end - start) for |w| < 0.5, else end - (end - start) * (1 - w)."""
    if FROM_START:
        return start + weight * (end - start)
    else:
        return end - (end - start) * one_minus_weight


@triton.jit
def muon_chunk(
    update_ptr,
    grad_ptr,
    buf_ptr,
    start,
    numel,
    state_offset,
    grad_scale,
    to_grad_w,
    to_grad_rest,
    to_momentum_w,
    to_momentum_rest,
    OPMATH: tl.constexpr,
    NESTEROV: tl.constexpr,
    TO_GRAD_FROM_START: tl.constexpr,
    TO_MOMENTUM_FROM_START: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Elements [start, start + CHUNK) of one tensor, in tiles of BLOCK (masked if MASKED)."""
    for i in range(0, CHUNK, BLOCK):
        offsets = start + i + tl.arange(0, BLOCK)
        state = state_offset + offsets
        if MASKED:
            mask = offsets < numel
            other = 0.0
        else:
            mask = None
            other = None
        g = tl.load(grad_ptr + offsets, mask=mask, other=other).to(OPMATH) * grad_scale
        buf = tl.load(buf_ptr + state, mask=mask, other=other).to(OPMATH)
        buf = lerp(buf, g, to_grad_w, to_grad_rest, TO_GRAD_FROM_START)
        if NESTEROV:
            update = lerp(g, buf, to_momentum_w, to_momentum_rest, TO_MOMENTUM_FROM_START)
        else:
            update = buf
        tl.store(buf_ptr + state, to_storage(buf, buf_ptr.dtype.element_ty), mask=mask)
        tl.store(update_ptr + offsets, to_storage(update, update_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["to_grad_bits", "to_momentum_bits"])
def muon_momentum_kernel(
    segments,
    chunks,
    buf_ptr,
    grad_type_ptr,
    step_ptr,
    done_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    to_grad_bits,
    to_momentum_bits,
    DTYPE: tl.constexpr,
    OPMATH: tl.constexpr,
    NESTEROV: tl.constexpr,
    TO_GRAD_FROM_START: tl.constexpr,
    TO_MOMENTUM_FROM_START: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """One program: CHUNK elements of one tensor of the bucket (see ``common`` for the table)."""
    row, start, update_ptr, grad_ptr, numel, state_offset, step_index, programs = load_segment(
        segments, chunks, DTYPE, grad_type_ptr.dtype.element_ty, ALIGNED
    )
    run = True
    if HAS_FOUND_INF:
        run = tl.load(found_inf_ptr) == 0  # the GradScaler found an inf/nan: a no-op step
    if run:
        t = tl.load(step_ptr + step_index).to(tl.float64) + 1.0
        # math.h's Lerp::make: the weight rounded to opmath, 1 - weight in opmath
        to_grad_w = to_grad_bits.to(tl.int64).to(tl.float64, bitcast=True).to(OPMATH)
        to_momentum_w = to_momentum_bits.to(tl.int64).to(tl.float64, bitcast=True).to(OPMATH)
        to_grad_rest = 1.0 - to_grad_w
        to_momentum_rest = 1.0 - to_momentum_w
        grad_scale = tl.full((), 1.0, tl.float64)
        if HAS_GRAD_SCALE:
            grad_scale = grad_scale / tl.load(grad_scale_ptr).to(tl.float64)  # 1/amp_scale
        grad_scale = grad_scale.to(OPMATH)
        # A full chunk runs unmasked (vector accesses); a tensor's last, partial one masked.
        if start + CHUNK <= numel:
            muon_chunk(
                update_ptr, grad_ptr, buf_ptr, start, numel, state_offset, grad_scale,
                to_grad_w, to_grad_rest, to_momentum_w, to_momentum_rest,
                OPMATH, NESTEROV, TO_GRAD_FROM_START, TO_MOMENTUM_FROM_START,
                False, BLOCK, CHUNK,
            )  # fmt: skip
        else:
            muon_chunk(
                update_ptr, grad_ptr, buf_ptr, start, numel, state_offset, grad_scale,
                to_grad_w, to_grad_rest, to_momentum_w, to_momentum_rest,
                OPMATH, NESTEROV, TO_GRAD_FROM_START, TO_MOMENTUM_FROM_START,
                True, BLOCK, CHUNK,
            )  # fmt: skip
        advance_step(step_ptr, done_ptr, row, step_index, programs, t)


def launch(
    bucket: Any,
    grads: list[torch.Tensor | None],
    group: Any,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> None:
    """Muon's momentum pass for one bucket view (``bucket.params``: the update slices; its
    ``momentum_buffer`` buffer: the state), one launch."""
    momentum = float(group["momentum"])
    prepared = prepare(bucket, grads)
    table = prepared.table
    if table is None:
        return
    storage, opmath = tl_dtypes(bucket.dtype)
    scale = amp_tensor(grad_scale, bucket.device)
    inf = amp_tensor(found_inf, bucket.device)
    to_grad, to_momentum = 1.0 - momentum, momentum
    muon_momentum_kernel[(table.num_chunks,)](
        table.segments,
        table.chunks,
        bucket.buffers["momentum_buffer"],
        prepared.grad_type,
        bucket.step,
        table.done,
        bucket.step if scale is None else scale,
        bucket.step if inf is None else inf,
        f64_bits(to_grad),
        f64_bits(to_momentum),
        DTYPE=storage,
        OPMATH=opmath,
        NESTEROV=bool(group["nesterov"]),
        TO_GRAD_FROM_START=abs(to_grad) < 0.5,
        TO_MOMENTUM_FROM_START=abs(to_momentum) < 0.5,
        HAS_GRAD_SCALE=scale is not None,
        HAS_FOUND_INF=inf is not None,
        ALIGNED=table.aligned,
        BLOCK=common.BLOCK,
        CHUNK=common.CHUNK,
        **common.LAUNCH_OPTIONS,
    )
    prepared.finish()
