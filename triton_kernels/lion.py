"""Lion in Triton: math.h's ``lion_update`` as one ``@triton.jit`` helper, and the multi-tensor
kernel that steps a whole bucket in one launch (table: see ``common``).

Per element (math.h, same order)::

    g = g * grad_scale               # -1 for maximize, times 1/amp_scale under a GradScaler
    g = g + weight_decay * p         # L2 decay only
    p = p * decay_factor             # decoupled / independent decay (1 otherwise)
    c = beta1 * m + (1 - beta1) * g
    p = p - lr * sign(c)             # sign(0) = 0 (and sign(NaN) = 0, as math.h's op_sign)
    m = beta2 * m + (1 - beta2) * g
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from onepass.algorithms import base
from onepass.algorithms.lion import LionScalars
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
def lion_update(
    param,
    grad,
    exp_avg,
    lr,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    weight_decay,
    decay_factor,
    grad_scale,
    L2_DECAY: tl.constexpr,
):
    """One Lion step of opmath values (math.h ``lion_update``); returns (p, m)."""
    grad = grad * grad_scale
    if L2_DECAY:
        grad = grad + weight_decay * param
    param = param * decay_factor
    direction = beta1 * exp_avg + one_minus_beta1 * grad
    # (c > 0) - (c < 0), as math.h's op_sign: exactly 0 for +-0 (and NaN).
    sign = (direction > 0).to(param.dtype) - (direction < 0).to(param.dtype)
    param = param - lr * sign
    exp_avg = beta2 * exp_avg + one_minus_beta2 * grad
    return param, exp_avg


@triton.jit
def lion_consts(
    grad_scale_ptr,
    lr_bits,
    beta1_bits,
    beta2_bits,
    weight_decay_bits,
    decay_factor_bits,
    grad_sign_bits,
    OPMATH: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
):
    """The scalars of one step (math.h's ``LionConsts::make``): float64 from the hyperparameters'
    bit patterns, rounded once to OPMATH. Returns (lr, beta1, 1 - beta1, beta2, 1 - beta2,
    weight_decay, decay_factor, grad_scale)."""
    lr = lr_bits.to(tl.int64).to(tl.float64, bitcast=True)
    beta1 = beta1_bits.to(tl.int64).to(tl.float64, bitcast=True)
    beta2 = beta2_bits.to(tl.int64).to(tl.float64, bitcast=True)
    weight_decay = weight_decay_bits.to(tl.int64).to(tl.float64, bitcast=True)
    decay_factor = decay_factor_bits.to(tl.int64).to(tl.float64, bitcast=True)
    grad_scale = grad_sign_bits.to(tl.int64).to(tl.float64, bitcast=True)  # -1 for maximize
    if HAS_GRAD_SCALE:
        grad_scale = grad_scale / tl.load(grad_scale_ptr).to(tl.float64)  # times 1/amp_scale
    return (
        lr.to(OPMATH),
        beta1.to(OPMATH),
        (1.0 - beta1).to(OPMATH),
        beta2.to(OPMATH),
        (1.0 - beta2).to(OPMATH),
        weight_decay.to(OPMATH),
        decay_factor.to(OPMATH),
        grad_scale.to(OPMATH),
    )


@triton.jit
def lion_chunk(
    param_ptr,
    master_ptr,
    grad_ptr,
    exp_avg_ptr,
    start,
    numel,
    state_offset,
    lr,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    weight_decay,
    decay_factor,
    grad_scale,
    sr_seed,
    OPMATH: tl.constexpr,
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
        m = tl.load(exp_avg_ptr + state, mask=mask, other=other).to(OPMATH)
        p, m = lion_update(
            p,
            g,
            m,
            lr,
            beta1,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            weight_decay,
            decay_factor,
            grad_scale,
            L2_DECAY,
        )
        store_param(param_ptr, master_ptr, offsets, state, p, mask, sr_seed, SR)
        store_state(exp_avg_ptr, state, m, mask, sr_seed, 0, SR)


@triton.jit(
    do_not_specialize=[
        "lr_bits",
        "beta1_bits",
        "beta2_bits",
        "weight_decay_bits",
        "decay_factor_bits",
        "grad_sign_bits",
        "sr_seed",
    ]
)
def lion_kernel(
    segments,
    chunks,
    exp_avg_ptr,
    master_ptr,
    grad_type_ptr,
    step_ptr,
    done_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    lr_bits,
    beta1_bits,
    beta2_bits,
    weight_decay_bits,
    decay_factor_bits,
    grad_sign_bits,
    sr_seed,
    DTYPE: tl.constexpr,
    OPMATH: tl.constexpr,
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
        # The engine's per-tensor count; Lion's math never reads it.
        t = tl.load(step_ptr + step_index).to(tl.float64) + 1.0
        (
            lr,
            beta1,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            weight_decay,
            decay_factor,
            grad_scale,
        ) = lion_consts(
            grad_scale_ptr,
            lr_bits,
            beta1_bits,
            beta2_bits,
            weight_decay_bits,
            decay_factor_bits,
            grad_sign_bits,
            OPMATH,
            HAS_GRAD_SCALE,
        )
        # A full chunk runs unmasked (vector accesses); a tensor's last, partial one masked.
        if start + CHUNK <= numel:
            lion_chunk(
                param_ptr,
                master_ptr,
                grad_ptr,
                exp_avg_ptr,
                start,
                numel,
                state_offset,
                lr,
                beta1,
                one_minus_beta1,
                beta2,
                one_minus_beta2,
                weight_decay,
                decay_factor,
                grad_scale,
                sr_seed,
                OPMATH,
                L2_DECAY,
                SR,
                False,
                BLOCK,
                CHUNK,
            )
        else:
            lion_chunk(
                param_ptr,
                master_ptr,
                grad_ptr,
                exp_avg_ptr,
                start,
                numel,
                state_offset,
                lr,
                beta1,
                one_minus_beta1,
                beta2,
                one_minus_beta2,
                weight_decay,
                decay_factor,
                grad_scale,
                sr_seed,
                OPMATH,
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
    """The "triton" launcher of the Lion spec: one kernel launch for the whole bucket."""
    s = LionScalars.from_group(group)
    prepared = prepare(bucket, grads)
    table = prepared.table
    if table is None:
        return
    storage, opmath = tl_dtypes(bucket.dtype)
    seed = base.sr_seed(group, bucket)  # -1: round params and state to nearest
    scale = amp_tensor(grad_scale, bucket.device)
    inf = amp_tensor(found_inf, bucket.device)
    lion_kernel[(table.num_chunks,)](
        table.segments,
        table.chunks,
        bucket.buffers["exp_avg"],
        common.master(bucket),
        prepared.grad_type,
        bucket.step,
        table.done,
        bucket.step if scale is None else scale,
        bucket.step if inf is None else inf,
        f64_bits(s.lr),
        f64_bits(s.beta1),
        f64_bits(s.beta2),
        f64_bits(s.weight_decay),
        f64_bits(s.decay_factor),
        f64_bits(-1.0 if s.maximize else 1.0),
        seed,
        DTYPE=storage,
        OPMATH=opmath,
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
