"""NovoGrad in Triton: two launches per bucket, no host sync (table: see ``common``).

1. ``novograd_reduce_kernel``, one program per chunk: the chunk's sum of g^2 in float64 goes to a
   scratch slot; the last program of a tensor (the per-segment atomic counter of
   ``common.advance_step``) sums its tensor's slots in chunk order (deterministic), then does the
   per-tensor scalar step of math.h's ``novograd_second_moment``: v (and its running max with
   amsgrad) in float64, stored rounded to the scalar slots' dtype, and the denominator
   ``sqrt(v) + eps`` of the stored value into a second scratch slot per tensor.
2. ``novograd_kernel``, one program per chunk: math.h's ``novograd_update`` with the tensor's
   denominator, then the step count advances (``advance_step``).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from onepass.algorithms import base
from onepass.algorithms.novograd import NovoGradScalars
from onepass.triton_kernels import common
from onepass.triton_kernels.common import (
    advance_step,
    amp_tensor,
    chunk_sum_of_squares,
    f64_bits,
    load_param,
    load_segment,
    op_div,
    op_max,
    prepare,
    store_param,
    store_state,
    sum_partials,
    tl_dtypes,
)


@triton.jit
def _f64(bits):
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _grad_scale(grad_scale_ptr, grad_sign_bits, HAS_GRAD_SCALE: tl.constexpr):
    """-1 for maximize, times 1/amp_scale under a GradScaler (float64)."""
    grad_scale = _f64(grad_sign_bits)
    if HAS_GRAD_SCALE:
        grad_scale = grad_scale / tl.load(grad_scale_ptr).to(tl.float64)
    return grad_scale


@triton.jit
def novograd_update(param, grad, exp_avg, first, lr, beta1, update_scale, weight_decay, denom,
                    grad_scale):  # fmt: skip
    """One NovoGrad step of opmath values (math.h ``novograd_update``); returns (p, m). ``first``:
    the tensor's first step, m = u (the old exp_avg is not used)."""
    grad = grad * grad_scale
    u = op_div(grad, denom) + weight_decay * param
    exp_avg = tl.where(first, u, beta1 * exp_avg + update_scale * u)
    param = param - lr * exp_avg
    return param, exp_avg


@triton.jit(do_not_specialize=["beta2_bits", "eps_bits", "grad_sign_bits"])
def novograd_reduce_kernel(
    segments,
    chunks,
    exp_avg_sq_ptr,
    max_exp_avg_sq_ptr,
    step_ptr,
    done_ptr,
    partial_ptr,
    denom_ptr,
    grad_type_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    beta2_bits,
    eps_bits,
    grad_sign_bits,
    DTYPE: tl.constexpr,
    SCALAR: tl.constexpr,
    AMSGRAD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    row, start, _, grad_ptr, numel, _, step_index, programs = load_segment(
        segments, chunks, DTYPE, grad_type_ptr.dtype.element_ty, ALIGNED
    )
    run = True
    if HAS_FOUND_INF:
        run = tl.load(found_inf_ptr) == 0  # the GradScaler found an inf/nan: a no-op step
    if run:
        pid = tl.program_id(0).to(tl.int64)
        if start + CHUNK <= numel:  # a full chunk loads unmasked (vectors); the last one masked
            partial = chunk_sum_of_squares(grad_ptr, start, numel, False, BLOCK, CHUNK)
        else:
            partial = chunk_sum_of_squares(grad_ptr, start, numel, True, BLOCK, CHUNK)
        tl.store(partial_ptr + pid, partial)
        # The last program of the tensor (acq_rel atomic: every program's partial is visible).
        tl.debug_barrier()
        finished = tl.atomic_add(done_ptr + row, 1)
        if finished == programs - 1:
            tl.store(done_ptr + row, 0)
            # The branch is uniform across the program: the barrier orders every thread's reads
            # after the acquiring atomic; volatile loads bypass a stale L1.
            tl.debug_barrier()
            first_chunk = pid - start // CHUNK
            total = sum_partials(partial_ptr, first_chunk, programs, 1, BLOCK)
            grad_scale = _grad_scale(grad_scale_ptr, grad_sign_bits, HAS_GRAD_SCALE)
            n = total * (grad_scale * grad_scale)
            beta2 = _f64(beta2_bits)
            t = tl.load(step_ptr + step_index).to(tl.float64) + 1.0
            old = tl.load(exp_avg_sq_ptr + step_index).to(tl.float64)
            v = tl.where(t == 1.0, n, beta2 * old + (1.0 - beta2) * n).to(SCALAR)
            tl.store(exp_avg_sq_ptr + step_index, v)
            used = v
            if AMSGRAD:
                used = op_max(tl.load(max_exp_avg_sq_ptr + step_index), v)
                tl.store(max_exp_avg_sq_ptr + step_index, used)
            tl.store(denom_ptr + row, tl.sqrt(used.to(tl.float64)) + _f64(eps_bits))


@triton.jit
def novograd_chunk(param_ptr, master_ptr, grad_ptr, exp_avg_ptr, start, numel, state_offset,
                   first, lr, beta1, update_scale, weight_decay, denom, grad_scale, sr_seed,
                   OPMATH: tl.constexpr, SR: tl.constexpr, MASKED: tl.constexpr,
                   BLOCK: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
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
        p, m = novograd_update(
            p, g, m, first, lr, beta1, update_scale, weight_decay, denom, grad_scale
        )
        store_param(param_ptr, master_ptr, offsets, state, p, mask, sr_seed, SR)
        store_state(exp_avg_ptr, state, m, mask, sr_seed, 0, SR)


@triton.jit(
    do_not_specialize=[
        "lr_bits",
        "beta1_bits",
        "update_scale_bits",
        "weight_decay_bits",
        "grad_sign_bits",
        "sr_seed",
    ]
)
def novograd_kernel(
    segments,
    chunks,
    exp_avg_ptr,
    master_ptr,
    grad_type_ptr,
    step_ptr,
    done_ptr,
    denom_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    lr_bits,
    beta1_bits,
    update_scale_bits,
    weight_decay_bits,
    grad_sign_bits,
    sr_seed,
    DTYPE: tl.constexpr,
    OPMATH: tl.constexpr,
    SR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    row, start, param_ptr, grad_ptr, numel, state_offset, step_index, programs = load_segment(
        segments, chunks, DTYPE, grad_type_ptr.dtype.element_ty, ALIGNED
    )
    run = True
    if HAS_FOUND_INF:
        run = tl.load(found_inf_ptr) == 0
    if run:
        t = tl.load(step_ptr + step_index).to(tl.float64) + 1.0
        first = t == 1.0
        lr = _f64(lr_bits).to(OPMATH)
        beta1 = _f64(beta1_bits).to(OPMATH)
        update_scale = _f64(update_scale_bits).to(OPMATH)
        weight_decay = _f64(weight_decay_bits).to(OPMATH)
        grad_scale = _grad_scale(grad_scale_ptr, grad_sign_bits, HAS_GRAD_SCALE).to(OPMATH)
        denom = tl.load(denom_ptr + row).to(OPMATH)
        # A full chunk runs unmasked (vector accesses); a tensor's last, partial one masked.
        if start + CHUNK <= numel:
            novograd_chunk(param_ptr, master_ptr, grad_ptr, exp_avg_ptr, start, numel,
                           state_offset, first, lr, beta1, update_scale, weight_decay, denom,
                           grad_scale, sr_seed, OPMATH, SR, False, BLOCK, CHUNK)  # fmt: skip
        else:
            novograd_chunk(param_ptr, master_ptr, grad_ptr, exp_avg_ptr, start, numel,
                           state_offset, first, lr, beta1, update_scale, weight_decay, denom,
                           grad_scale, sr_seed, OPMATH, SR, True, BLOCK, CHUNK)  # fmt: skip
        advance_step(step_ptr, done_ptr, row, step_index, programs, t)


def launch(
    bucket: Any,
    grads: list[torch.Tensor | None],
    group: Any,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> None:
    """The "triton" launcher of the NovoGrad spec: two kernel launches for the whole bucket."""
    s = NovoGradScalars.from_group(group)
    prepared = prepare(bucket, grads)
    table = prepared.table
    if table is None:
        return
    storage, opmath = tl_dtypes(bucket.dtype)
    seed = base.sr_seed(group, bucket)  # -1: round params and state to nearest
    scalar_dtype = tl.float64 if bucket.dtype == torch.float64 else tl.float32
    scale = amp_tensor(grad_scale, bucket.device)
    inf = amp_tensor(found_inf, bucket.device)
    num_segments = table.segments.shape[0]
    scratch = torch.empty(
        table.num_chunks + num_segments, dtype=torch.float64, device=bucket.device
    )
    partial, denoms = scratch[: table.num_chunks], scratch[table.num_chunks :]
    exp_avg_sq = bucket.buffers["exp_avg_sq"]
    max_exp_avg_sq = bucket.buffers.get("max_exp_avg_sq", exp_avg_sq)
    grid = (table.num_chunks,)
    grad_sign = f64_bits(-1.0 if s.maximize else 1.0)
    amp = {
        "HAS_GRAD_SCALE": scale is not None,
        "HAS_FOUND_INF": inf is not None,
        "ALIGNED": table.aligned,
        "BLOCK": common.BLOCK,
        "CHUNK": common.CHUNK,
        **common.LAUNCH_OPTIONS,
    }
    novograd_reduce_kernel[grid](
        table.segments,
        table.chunks,
        exp_avg_sq,
        max_exp_avg_sq,
        bucket.step,
        table.done,
        partial,
        denoms,
        prepared.grad_type,
        bucket.step if scale is None else scale,
        bucket.step if inf is None else inf,
        f64_bits(s.beta2),
        f64_bits(s.eps),
        grad_sign,
        DTYPE=storage,
        SCALAR=scalar_dtype,
        AMSGRAD=s.amsgrad,
        **amp,
    )
    novograd_kernel[grid](
        table.segments,
        table.chunks,
        bucket.buffers["exp_avg"],
        common.master(bucket),
        prepared.grad_type,
        bucket.step,
        table.done,
        denoms,
        bucket.step if scale is None else scale,
        bucket.step if inf is None else inf,
        f64_bits(s.lr),
        f64_bits(s.beta1),
        f64_bits(s.update_scale),
        f64_bits(s.weight_decay),
        grad_sign,
        seed,
        DTYPE=storage,
        OPMATH=opmath,
        SR=seed >= 0,
        **amp,
    )
    prepared.finish()
