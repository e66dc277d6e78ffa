"""SGD / SGDW in Triton: math.h's ``sgd_update`` as one ``@triton.jit`` helper, and the
multi-tensor kernel that steps a whole bucket in one launch (table: see ``common``).

Per element (math.h, same order)::

    d = g * grad_scale               # -1 for maximize, times 1/amp_scale under a GradScaler
    d = d + weight_decay * p         # L2 decay (SGD) only
    p = p * decay_factor             # SGDW / independent decay (1 otherwise)
    buf = d                          # momentum: on the tensor's first step (step count 1)
    buf = momentum * buf + (1 - dampening) * d     # on later steps
    d = d + momentum * buf if nesterov else buf
    p = p - lr * d
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from onepass.algorithms import base
from onepass.algorithms.sgd import SgdScalars
from onepass.triton_kernels import common
from onepass.triton_kernels.common import (
    advance_step,
    amp_tensor,
    f64_bits,
    load_param,
    load_segment,
    prepare,
    store_param,
    store_state,
    tl_dtypes,
)


@triton.jit
def sgd_update(
    param,
    grad,
    momentum_buffer,
    first,
    lr,
    momentum,
    one_minus_dampening,
    weight_decay,
    decay_factor,
    grad_scale,
    MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    L2_DECAY: tl.constexpr,
):
    """One SGD step of opmath values (math.h ``sgd_update``; ``first`` is its kFirst, here a
    runtime per-tensor flag); returns (p, buf)."""
    grad = grad * grad_scale
    if L2_DECAY:
        grad = grad + weight_decay * param
    param = param * decay_factor
    if MOMENTUM:
        momentum_buffer = tl.where(
            first, grad, momentum * momentum_buffer + one_minus_dampening * grad
        )
        if NESTEROV:  # noqa: SIM108
            grad = grad + momentum * momentum_buffer
        else:
            grad = momentum_buffer
    param = param - lr * grad
    return param, momentum_buffer


@triton.jit
def sgd_consts(
    grad_scale_ptr,
    lr_bits,
    momentum_bits,
    dampening_bits,
    weight_decay_bits,
    decay_factor_bits,
    grad_sign_bits,
    OPMATH: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
):
    """The scalars of one step (math.h's ``SgdConsts::make``): float64 from the hyperparameters'
    bit patterns, rounded once to OPMATH. Returns (lr, momentum, 1 - dampening, weight_decay,
    decay_factor, grad_scale)."""
    lr = lr_bits.to(tl.int64).to(tl.float64, bitcast=True)
    momentum = momentum_bits.to(tl.int64).to(tl.float64, bitcast=True)
    dampening = dampening_bits.to(tl.int64).to(tl.float64, bitcast=True)
    weight_decay = weight_decay_bits.to(tl.int64).to(tl.float64, bitcast=True)
    decay_factor = decay_factor_bits.to(tl.int64).to(tl.float64, bitcast=True)
    grad_scale = grad_sign_bits.to(tl.int64).to(tl.float64, bitcast=True)  # -1 for maximize
    if HAS_GRAD_SCALE:
        grad_scale = grad_scale / tl.load(grad_scale_ptr).to(tl.float64)  # times 1/amp_scale
    return (
        lr.to(OPMATH),
        momentum.to(OPMATH),
        (1.0 - dampening).to(OPMATH),
        weight_decay.to(OPMATH),
        decay_factor.to(OPMATH),
        grad_scale.to(OPMATH),
    )


@triton.jit
def sgd_chunk(
    param_ptr,
    master_ptr,
    grad_ptr,
    momentum_buffer_ptr,
    start,
    numel,
    state_offset,
    first,
    lr,
    momentum,
    one_minus_dampening,
    weight_decay,
    decay_factor,
    grad_scale,
    sr_seed,
    OPMATH: tl.constexpr,
    MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    L2_DECAY: tl.constexpr,
    SR: tl.constexpr,
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
        p = load_param(param_ptr, master_ptr, offsets, state, mask, other, OPMATH)
        g = tl.load(grad_ptr + offsets, mask=mask, other=other).to(OPMATH)
        buf = g
        if MOMENTUM:
            buf = tl.load(momentum_buffer_ptr + state, mask=mask, other=other).to(OPMATH)
        p, buf = sgd_update(
            p,
            g,
            buf,
            first,
            lr,
            momentum,
            one_minus_dampening,
            weight_decay,
            decay_factor,
            grad_scale,
            MOMENTUM,
            NESTEROV,
            L2_DECAY,
        )
        store_param(param_ptr, master_ptr, offsets, state, p, mask, sr_seed, SR)
        if MOMENTUM:
            store_state(momentum_buffer_ptr, state, buf, mask, sr_seed, 0, SR)


@triton.jit(
    do_not_specialize=[
        "lr_bits",
        "momentum_bits",
        "dampening_bits",
        "weight_decay_bits",
        "decay_factor_bits",
        "grad_sign_bits",
        "sr_seed",
    ]
)
def sgd_kernel(
    segments,
    chunks,
    momentum_buffer_ptr,
    master_ptr,
    grad_type_ptr,
    step_ptr,
    done_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    lr_bits,
    momentum_bits,
    dampening_bits,
    weight_decay_bits,
    decay_factor_bits,
    grad_sign_bits,
    sr_seed,
    DTYPE: tl.constexpr,
    OPMATH: tl.constexpr,
    MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    L2_DECAY: tl.constexpr,
    SR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """One program: CHUNK elements of one tensor of the bucket (see ``common`` for the table)."""
    row, start, param_ptr, grad_ptr, numel, state_offset, step_index, programs = load_segment(
        segments, chunks, DTYPE, grad_type_ptr.dtype.element_ty, ALIGNED
    )
    run = True
    if HAS_FOUND_INF:
        run = tl.load(found_inf_ptr) == 0  # the GradScaler found an inf/nan: a no-op step
    if run:
        t = tl.load(step_ptr + step_index).to(tl.float64) + 1.0
        first = t == 1.0  # the tensor's first step: its momentum buffer starts as the gradient
        lr, momentum, one_minus_dampening, weight_decay, decay_factor, grad_scale = sgd_consts(
            grad_scale_ptr,
            lr_bits,
            momentum_bits,
            dampening_bits,
            weight_decay_bits,
            decay_factor_bits,
            grad_sign_bits,
            OPMATH,
            HAS_GRAD_SCALE,
        )
        # A full chunk runs unmasked (vector accesses); a tensor's last, partial one masked.
        if start + CHUNK <= numel:
            sgd_chunk(
                param_ptr,
                master_ptr,
                grad_ptr,
                momentum_buffer_ptr,
                start,
                numel,
                state_offset,
                first,
                lr,
                momentum,
                one_minus_dampening,
                weight_decay,
                decay_factor,
                grad_scale,
                sr_seed,
                OPMATH,
                MOMENTUM,
                NESTEROV,
                L2_DECAY,
                SR,
                False,
                BLOCK,
                CHUNK,
            )
        else:
            sgd_chunk(
                param_ptr,
                master_ptr,
                grad_ptr,
                momentum_buffer_ptr,
                start,
                numel,
                state_offset,
                first,
                lr,
                momentum,
                one_minus_dampening,
                weight_decay,
                decay_factor,
                grad_scale,
                sr_seed,
                OPMATH,
                MOMENTUM,
                NESTEROV,
                L2_DECAY,
                SR,
                True,
                BLOCK,
                CHUNK,
            )
        advance_step(step_ptr, done_ptr, row, step_index, programs, t)


def launch(
    bucket: Any,
    grads: list[torch.Tensor | None],
    group: Any,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> None:
    """The "triton" launcher of the SGD spec: one kernel launch for the whole bucket."""
    s = SgdScalars.from_group(group)
    prepared = prepare(bucket, grads)
    table = prepared.table
    if table is None:
        return
    storage, opmath = tl_dtypes(bucket.dtype)
    seed = base.sr_seed(group, bucket)  # -1: round params and state to nearest
    has_momentum = s.momentum != 0.0
    momentum_buffer = bucket.buffers.get("momentum_buffer") if has_momentum else None
    scale = amp_tensor(grad_scale, bucket.device)
    inf = amp_tensor(found_inf, bucket.device)
    sgd_kernel[(table.num_chunks,)](
        table.segments,
        table.chunks,
        table.segments if momentum_buffer is None else momentum_buffer,
        common.master(bucket),
        prepared.grad_type,
        bucket.step,
        table.done,
        bucket.step if scale is None else scale,
        bucket.step if inf is None else inf,
        f64_bits(s.lr),
        f64_bits(s.momentum),
        f64_bits(s.dampening),
        f64_bits(s.weight_decay),
        f64_bits(s.decay_factor),
        f64_bits(-1.0 if s.maximize else 1.0),
        seed,
        DTYPE=storage,
        OPMATH=opmath,
        MOMENTUM=has_momentum,
        NESTEROV=s.nesterov,
        L2_DECAY=s.l2_decay,
        SR=seed >= 0,
        HAS_GRAD_SCALE=scale is not None,
        HAS_FOUND_INF=inf is not None,
        ALIGNED=table.aligned,
        BLOCK=common.BLOCK,
        CHUNK=common.CHUNK,
        **common.LAUNCH_OPTIONS,
    )
    prepared.finish()
