"""Adam / AdamW in Triton: math.h's ``adam_update`` as one ``@triton.jit`` helper, and the
multi-tensor kernel that steps a whole bucket in one launch (table: see ``common``).

Per element, with t the tensor's step count after this step (math.h, same order)::

    g = g * grad_scale               # -1 for maximize, times 1/amp_scale under a GradScaler
    g = g + weight_decay * p         # L2 decay (Adam) only
    p = p * decay_factor             # AdamW / independent decay (1 otherwise)
    m = m + (1 - beta1) * (g - m)    # torch's lerp
    v = beta2 * v + (1 - beta2) * (g * g)
    vmax = max(vmax, v)              # amsgrad; the second moment is then vmax
    p = p - (lr / (1 - beta1^t)) * m / (sqrt(v) * (1 / sqrt(1 - beta2^t)) + eps)
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from onepass.algorithms import base
from onepass.algorithms.adam import AdamScalars
from onepass.triton_kernels import common
from onepass.triton_kernels.common import (
    advance_step,
    amp_tensor,
    f64_bits,
    load_param,
    load_segment,
    op_div,
    op_max,
    op_sqrt,
    prepare,
    store_param,
    store_state,
    tl_dtypes,
)


@triton.jit
def adam_update(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    decay_factor,
    grad_scale,
    step_size,
    inv_bias_correction2_sqrt,
    AMSGRAD: tl.constexpr,
    L2_DECAY: tl.constexpr,
):
    """One Adam step of opmath values (math.h ``adam_update``); returns (p, m, v, vmax)."""
    grad = grad * grad_scale
    if L2_DECAY:
        grad = grad + weight_decay * param
    param = param * decay_factor
    exp_avg = exp_avg + one_minus_beta1 * (grad - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * (grad * grad)
    second_moment = exp_avg_sq
    if AMSGRAD:
        max_exp_avg_sq = op_max(max_exp_avg_sq, exp_avg_sq)
        second_moment = max_exp_avg_sq
    denom = op_sqrt(second_moment) * inv_bias_correction2_sqrt + eps
    param = param - op_div(step_size * exp_avg, denom)
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq


@triton.jit
def adam_consts(
    t,
    grad_scale_ptr,
    lr_bits,
    beta1_bits,
    beta2_bits,
    eps_bits,
    weight_decay_bits,
    decay_factor_bits,
    grad_sign_bits,
    OPMATH: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
):
    """The scalars of one step of one tensor (math.h's ``AdamConsts::make``): float64 from the
    hyperparameters' bit patterns and the tensor's step count ``t`` (after this step), rounded
    once to OPMATH. Returns (beta1, 1 - beta1, beta2, 1 - beta2, eps, weight_decay,
    decay_factor, grad_scale, lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t))."""
    lr = lr_bits.to(tl.int64).to(tl.float64, bitcast=True)
    beta1 = beta1_bits.to(tl.int64).to(tl.float64, bitcast=True)
    beta2 = beta2_bits.to(tl.int64).to(tl.float64, bitcast=True)
    eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True)
    weight_decay = weight_decay_bits.to(tl.int64).to(tl.float64, bitcast=True)
    decay_factor = decay_factor_bits.to(tl.int64).to(tl.float64, bitcast=True)
    grad_scale = grad_sign_bits.to(tl.int64).to(tl.float64, bitcast=True)  # -1 for maximize
    if HAS_GRAD_SCALE:
        grad_scale = grad_scale / tl.load(grad_scale_ptr).to(tl.float64)  # times 1/amp_scale
    # beta1^t and beta2^t by square and multiply (t is integral; no pow in portable Triton).
    power1 = tl.cast(1.0, tl.float64)
    power2 = tl.cast(1.0, tl.float64)
    base1 = beta1
    base2 = beta2
    n = t.to(tl.int64)
    while n > 0:
        odd = (n & 1) == 1
        power1 = tl.where(odd, power1 * base1, power1)
        power2 = tl.where(odd, power2 * base2, power2)
        base1 = base1 * base1
        base2 = base2 * base2
        n = n >> 1
    bias_correction1 = 1.0 - power1
    bias_correction2 = 1.0 - power2
    return (
        beta1.to(OPMATH),
        (1.0 - beta1).to(OPMATH),
        beta2.to(OPMATH),
        (1.0 - beta2).to(OPMATH),
        eps.to(OPMATH),
        weight_decay.to(OPMATH),
        decay_factor.to(OPMATH),
        grad_scale.to(OPMATH),
        (lr / bias_correction1).to(OPMATH),
        (1.0 / tl.sqrt(bias_correction2)).to(OPMATH),
    )


@triton.jit
def adam_chunk(
    param_ptr,
    master_ptr,
    grad_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    max_exp_avg_sq_ptr,
    start,
    numel,
    state_offset,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    decay_factor,
    grad_scale,
    step_size,
    inv_bias_correction2_sqrt,
    sr_seed,
    OPMATH: tl.constexpr,
    AMSGRAD: tl.constexpr,
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
        v = tl.load(exp_avg_sq_ptr + state, mask=mask, other=other).to(OPMATH)
        vmax = v
        if AMSGRAD:
            vmax = tl.load(max_exp_avg_sq_ptr + state, mask=mask, other=other).to(OPMATH)
        p, m, v, vmax = adam_update(
            p,
            g,
            m,
            v,
            vmax,
            beta1,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            eps,
            weight_decay,
            decay_factor,
            grad_scale,
            step_size,
            inv_bias_correction2_sqrt,
            AMSGRAD,
            L2_DECAY,
        )
        store_param(param_ptr, master_ptr, offsets, state, p, mask, sr_seed, SR)
        store_state(exp_avg_ptr, state, m, mask, sr_seed, 0, SR)
        store_state(exp_avg_sq_ptr, state, v, mask, sr_seed, 1, SR)
        if AMSGRAD:
            store_state(max_exp_avg_sq_ptr, state, vmax, mask, sr_seed, 2, SR)


@triton.jit(
    do_not_specialize=[
        "lr_bits",
        "beta1_bits",
        "beta2_bits",
        "eps_bits",
        "weight_decay_bits",
        "decay_factor_bits",
        "grad_sign_bits",
        "sr_seed",
    ]
)
def adam_kernel(
    segments,
    chunks,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    max_exp_avg_sq_ptr,
    master_ptr,
    grad_type_ptr,
    step_ptr,
    done_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    lr_bits,
    beta1_bits,
    beta2_bits,
    eps_bits,
    weight_decay_bits,
    decay_factor_bits,
    grad_sign_bits,
    sr_seed,
    DTYPE: tl.constexpr,
    OPMATH: tl.constexpr,
    AMSGRAD: tl.constexpr,
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
        (
            beta1,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            eps,
            weight_decay,
            decay_factor,
            grad_scale,
            step_size,
            inv_bias_correction2_sqrt,
        ) = adam_consts(
            t,
            grad_scale_ptr,
            lr_bits,
            beta1_bits,
            beta2_bits,
            eps_bits,
            weight_decay_bits,
            decay_factor_bits,
            grad_sign_bits,
            OPMATH,
            HAS_GRAD_SCALE,
        )
        # A full chunk runs unmasked (vector accesses); a tensor's last, partial one masked.
        if start + CHUNK <= numel:
            adam_chunk(
                param_ptr,
                master_ptr,
                grad_ptr,
                exp_avg_ptr,
                exp_avg_sq_ptr,
                max_exp_avg_sq_ptr,
                start,
                numel,
                state_offset,
                beta1,
                one_minus_beta1,
                beta2,
                one_minus_beta2,
                eps,
                weight_decay,
                decay_factor,
                grad_scale,
                step_size,
                inv_bias_correction2_sqrt,
                sr_seed,
                OPMATH,
                AMSGRAD,
                L2_DECAY,
                SR,
                False,
                BLOCK,
                CHUNK,
            )
        else:
            adam_chunk(
                param_ptr,
                master_ptr,
                grad_ptr,
                exp_avg_ptr,
                exp_avg_sq_ptr,
                max_exp_avg_sq_ptr,
                start,
                numel,
                state_offset,
                beta1,
                one_minus_beta1,
                beta2,
                one_minus_beta2,
                eps,
                weight_decay,
                decay_factor,
                grad_scale,
                step_size,
                inv_bias_correction2_sqrt,
                sr_seed,
                OPMATH,
                AMSGRAD,
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
    """The "triton" launcher of the Adam spec: one kernel launch for the whole bucket."""
    s = AdamScalars.from_group(group)
    prepared = prepare(bucket, grads)
    table = prepared.table
    if table is None:
        return
    storage, opmath = tl_dtypes(bucket.dtype)
    seed = base.sr_seed(group, bucket)  # -1: round params and state to nearest
    exp_avg = bucket.buffers["exp_avg"]
    exp_avg_sq = bucket.buffers["exp_avg_sq"]
    max_exp_avg_sq = bucket.buffers.get("max_exp_avg_sq") if s.amsgrad else None
    scale = amp_tensor(grad_scale, bucket.device)
    inf = amp_tensor(found_inf, bucket.device)
    adam_kernel[(table.num_chunks,)](
        table.segments,
        table.chunks,
        exp_avg,
        exp_avg_sq,
        exp_avg_sq if max_exp_avg_sq is None else max_exp_avg_sq,
        common.master(bucket),
        prepared.grad_type,
        bucket.step,
        table.done,
        bucket.step if scale is None else scale,
        bucket.step if inf is None else inf,
        f64_bits(s.lr),
        f64_bits(s.beta1),
        f64_bits(s.beta2),
        f64_bits(s.eps),
        f64_bits(s.weight_decay),
        f64_bits(s.decay_factor),
        f64_bits(-1.0 if s.maximize else 1.0),
        seed,
        DTYPE=storage,
        OPMATH=opmath,
        AMSGRAD=s.amsgrad,
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
