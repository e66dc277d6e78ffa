"""FAdam in Triton: three launches per bucket, no host sync (table: see ``common``).

1. ``fadam_reduce_kernel``, one program per chunk: the chunk's sum of raw g^2 in float64 to a
   scratch slot; the last program of a tensor (the per-segment atomic counter, reset after use)
   sums its tensor's slots in chunk order (deterministic) and stores eps_t = eps * min(1, RMS(g))
   (eps for an all-zero grad).
2. ``fadam_norms_kernel``, one program per chunk: with the tensor's new den (F read, not written)
   the chunk's sums of gn^2 and wn^2; the tensor's last program stores the two clip divisors
   max(1, RMS / clip).
3. ``fadam_kernel``, one program per chunk: math.h's ``fadam_update`` (F, momentum, the param),
   then the step count advances (``advance_step``).

F^p: ``sqrt`` for p = 0.5 (as torch), else exp2(p * log2(F)) in float64 rounded to the opmath
dtype (Triton's libdevice pow does not run under the interpreter the tests use).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from onepass.algorithms import base
from onepass.algorithms.fadam import FAdamScalars
from onepass.triton_kernels import common
from onepass.triton_kernels.common import (
    advance_step,
    amp_tensor,
    chunk_sum_of_squares,
    f64_bits,
    load_param,
    load_segment,
    op_div,
    op_sqrt,
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
def _last_program(done_ptr, row, programs):
    """Whether this program is its tensor's last to finish (then the counter is reset)."""
    tl.debug_barrier()
    finished = tl.atomic_add(done_ptr + row, 1)
    last = finished == programs - 1
    if last:
        tl.store(done_ptr + row, 0)
        tl.debug_barrier()
    return last


@triton.jit
def _clip_divisor(ratio):
    """math.h fadam_clip_divisor: max(1, RMS / clip), NaN where the ratio is (tl.maximum's
    default would drop the NaN, and the other backends would make the tensor NaN)."""
    return tl.where((ratio != ratio) | (ratio > 1.0), ratio, 1.0)


@triton.jit
def fadam_den(fim, grad, beta2_t, one_minus_beta2_t, eps_t, power, SQRT_POWER: tl.constexpr):
    """math.h ``fadam_den``: (new F, F^p + eps_t) of opmath values."""
    new_fim = beta2_t * fim + one_minus_beta2_t * grad * grad
    if SQRT_POWER:
        fp = op_sqrt(new_fim)
    else:
        fp = tl.exp2(power * tl.log2(new_fim.to(tl.float64))).to(new_fim.dtype)
    return new_fim, fp + eps_t


@triton.jit
def _beta2_t(beta2, t):
    """b2 * (1 - b2^(t-1)) / (1 - b2^t) in float64; 0 at t = 1."""
    b2_t1 = tl.exp2((t - 1.0) * tl.log2(beta2))
    b2_t = b2_t1 * beta2
    return tl.where(t == 1.0, 0.0, beta2 * (1.0 - b2_t1) / (1.0 - b2_t))


@triton.jit(do_not_specialize=["eps_bits", "grad_sign_bits"])
def fadam_reduce_kernel(
    segments,
    chunks,
    done_ptr,
    partial_ptr,
    scalars_ptr,
    grad_type_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    eps_bits,
    grad_sign_bits,
    DTYPE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    row, start, _, grad_ptr, numel, _, _, programs = load_segment(
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
        tl.store(partial_ptr + 2 * pid, partial)
        if _last_program(done_ptr, row, programs):
            first_chunk = pid - start // CHUNK
            total = sum_partials(partial_ptr, first_chunk, programs, 2, BLOCK)
            grad_scale = _grad_scale(grad_scale_ptr, grad_sign_bits, HAS_GRAD_SCALE)
            rms = tl.sqrt(total * (grad_scale * grad_scale) / numel.to(tl.float64))
            # math.h fadam_eps_t: eps for an all-zero grad (F = 0 there would give 0 / 0)
            eps_scale = tl.where(rms > 0.0, tl.minimum(rms, 1.0), 1.0)
            tl.store(scalars_ptr + 3 * row, _f64(eps_bits) * eps_scale)


@triton.jit
def fadam_norms_chunk(param_ptr, master_ptr, grad_ptr, fim_ptr, start, numel, state_offset,
                      beta2_t, one_minus_beta2_t, eps_t, power, grad_scale,
                      OPMATH: tl.constexpr, SQRT_POWER: tl.constexpr, MASKED: tl.constexpr,
                      BLOCK: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
    """Pass 2 over elements [start, start + CHUNK) of one tensor, in tiles of BLOCK (masked if
    MASKED): the sums of gn^2 and wn^2 (float64) with the tensor's new den (F read, not
    written)."""
    gn_acc = tl.zeros([BLOCK], dtype=tl.float64)
    wn_acc = tl.zeros([BLOCK], dtype=tl.float64)
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
        g = tl.load(grad_ptr + offsets, mask=mask, other=other).to(OPMATH) * grad_scale
        f = tl.load(fim_ptr + state, mask=mask, other=other).to(OPMATH)
        _, den = fadam_den(f, g, beta2_t, one_minus_beta2_t, eps_t, power, SQRT_POWER)
        gn = op_div(g, den).to(tl.float64)
        wn = op_div(p, den).to(tl.float64)
        if MASKED:  # a lane past the end holds 0 / den, which the eps keeps finite, but 0 it is
            gn = tl.where(mask, gn, 0.0)
            wn = tl.where(mask, wn, 0.0)
        gn_acc += gn * gn
        wn_acc += wn * wn
    return tl.sum(gn_acc, axis=0), tl.sum(wn_acc, axis=0)


@triton.jit(do_not_specialize=["beta2_bits", "power_bits", "clip_bits", "grad_sign_bits"])
def fadam_norms_kernel(
    segments,
    chunks,
    fim_ptr,
    master_ptr,
    grad_type_ptr,
    step_ptr,
    done_ptr,
    partial_ptr,
    scalars_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    beta2_bits,
    power_bits,
    clip_bits,
    grad_sign_bits,
    DTYPE: tl.constexpr,
    OPMATH: tl.constexpr,
    SQRT_POWER: tl.constexpr,
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
        pid = tl.program_id(0).to(tl.int64)
        t = tl.load(step_ptr + step_index).to(tl.float64) + 1.0
        b2t = _beta2_t(_f64(beta2_bits), t)
        beta2_t = b2t.to(OPMATH)
        one_minus_beta2_t = (1.0 - b2t).to(OPMATH)
        eps_t = tl.load(scalars_ptr + 3 * row).to(OPMATH)
        power = _f64(power_bits)
        grad_scale = _grad_scale(grad_scale_ptr, grad_sign_bits, HAS_GRAD_SCALE).to(OPMATH)
        if start + CHUNK <= numel:  # a full chunk loads unmasked (vectors); the last one masked
            gn_sq, wn_sq = fadam_norms_chunk(
                param_ptr, master_ptr, grad_ptr, fim_ptr, start, numel, state_offset, beta2_t,
                one_minus_beta2_t, eps_t, power, grad_scale, OPMATH, SQRT_POWER, False, BLOCK,
                CHUNK,
            )  # fmt: skip
        else:
            gn_sq, wn_sq = fadam_norms_chunk(
                param_ptr, master_ptr, grad_ptr, fim_ptr, start, numel, state_offset, beta2_t,
                one_minus_beta2_t, eps_t, power, grad_scale, OPMATH, SQRT_POWER, True, BLOCK,
                CHUNK,
            )  # fmt: skip
        tl.store(partial_ptr + 2 * pid, gn_sq)
        tl.store(partial_ptr + 2 * pid + 1, wn_sq)
        if _last_program(done_ptr, row, programs):
            first_chunk = pid - start // CHUNK
            gn_sq = sum_partials(partial_ptr, first_chunk, programs, 2, BLOCK)
            wn_sq = sum_partials(partial_ptr + 1, first_chunk, programs, 2, BLOCK)
            n = numel.to(tl.float64)
            clip = _f64(clip_bits)
            tl.store(scalars_ptr + 3 * row + 1, _clip_divisor(tl.sqrt(gn_sq / n) / clip))
            tl.store(scalars_ptr + 3 * row + 2, _clip_divisor(tl.sqrt(wn_sq / n) / clip))


@triton.jit
def fadam_chunk(param_ptr, master_ptr, grad_ptr, fim_ptr, momentum_ptr, start, numel,
                state_offset, lr, beta1, one_minus_beta1, beta2_t, one_minus_beta2_t, eps_t,
                power, weight_decay, grad_scale, gn_divisor, wn_divisor, sr_seed,
                OPMATH: tl.constexpr, SQRT_POWER: tl.constexpr, SR: tl.constexpr,
                MASKED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
    """Pass 3 over elements [start, start + CHUNK) of one tensor, in tiles of BLOCK (masked if
    MASKED): math.h's fadam_update (F, momentum, the param)."""
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
        g = tl.load(grad_ptr + offsets, mask=mask, other=other).to(OPMATH) * grad_scale
        f = tl.load(fim_ptr + state, mask=mask, other=other).to(OPMATH)
        m = tl.load(momentum_ptr + state, mask=mask, other=other).to(OPMATH)
        f, den = fadam_den(f, g, beta2_t, one_minus_beta2_t, eps_t, power, SQRT_POWER)
        gn = op_div(op_div(g, den), gn_divisor)
        m = beta1 * m + one_minus_beta1 * gn
        wn = op_div(op_div(p, den), wn_divisor)
        p = p - lr * (m + weight_decay * wn)
        store_param(param_ptr, master_ptr, offsets, state, p, mask, sr_seed, SR)
        store_state(fim_ptr, state, f, mask, sr_seed, 0, SR)
        store_state(momentum_ptr, state, m, mask, sr_seed, 1, SR)


@triton.jit(
    do_not_specialize=[
        "lr_bits",
        "beta1_bits",
        "beta2_bits",
        "power_bits",
        "weight_decay_bits",
        "grad_sign_bits",
        "sr_seed",
    ]
)
def fadam_kernel(
    segments,
    chunks,
    fim_ptr,
    momentum_ptr,
    master_ptr,
    grad_type_ptr,
    step_ptr,
    done_ptr,
    scalars_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    lr_bits,
    beta1_bits,
    beta2_bits,
    power_bits,
    weight_decay_bits,
    grad_sign_bits,
    sr_seed,
    DTYPE: tl.constexpr,
    OPMATH: tl.constexpr,
    SQRT_POWER: tl.constexpr,
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
        b2t = _beta2_t(_f64(beta2_bits), t)
        beta2_t = b2t.to(OPMATH)
        one_minus_beta2_t = (1.0 - b2t).to(OPMATH)
        lr = _f64(lr_bits).to(OPMATH)
        beta1 = _f64(beta1_bits)
        one_minus_beta1 = (1.0 - beta1).to(OPMATH)
        beta1 = beta1.to(OPMATH)
        power = _f64(power_bits)
        weight_decay = _f64(weight_decay_bits).to(OPMATH)
        grad_scale = _grad_scale(grad_scale_ptr, grad_sign_bits, HAS_GRAD_SCALE).to(OPMATH)
        eps_t = tl.load(scalars_ptr + 3 * row).to(OPMATH)
        gn_divisor = tl.load(scalars_ptr + 3 * row + 1).to(OPMATH)
        wn_divisor = tl.load(scalars_ptr + 3 * row + 2).to(OPMATH)
        if start + CHUNK <= numel:  # a full chunk runs unmasked (vectors); the last one masked
            fadam_chunk(
                param_ptr, master_ptr, grad_ptr, fim_ptr, momentum_ptr, start, numel,
                state_offset, lr, beta1, one_minus_beta1, beta2_t, one_minus_beta2_t, eps_t,
                power, weight_decay, grad_scale, gn_divisor, wn_divisor, sr_seed, OPMATH,
                SQRT_POWER, SR, False, BLOCK, CHUNK,
            )  # fmt: skip
        else:
            fadam_chunk(
                param_ptr, master_ptr, grad_ptr, fim_ptr, momentum_ptr, start, numel,
                state_offset, lr, beta1, one_minus_beta1, beta2_t, one_minus_beta2_t, eps_t,
                power, weight_decay, grad_scale, gn_divisor, wn_divisor, sr_seed, OPMATH,
                SQRT_POWER, SR, True, BLOCK, CHUNK,
            )  # fmt: skip
        advance_step(step_ptr, done_ptr, row, step_index, programs, t)


def launch(
    bucket: Any,
    grads: list[torch.Tensor | None],
    group: Any,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> None:
    """The "triton" launcher of the FAdam spec: three kernel launches for the whole bucket."""
    s = FAdamScalars.from_group(group)
    prepared = prepare(bucket, grads)
    table = prepared.table
    if table is None:
        return
    storage, opmath = tl_dtypes(bucket.dtype)
    seed = base.sr_seed(group, bucket)  # -1: round params and state to nearest
    master = common.master(bucket)
    grad_type = prepared.grad_type
    scale = amp_tensor(grad_scale, bucket.device)
    inf = amp_tensor(found_inf, bucket.device)
    num_segments = table.segments.shape[0]
    scratch = torch.empty(
        2 * table.num_chunks + 3 * num_segments, dtype=torch.float64, device=bucket.device
    )
    partial, scalars = scratch[: 2 * table.num_chunks], scratch[2 * table.num_chunks :]
    grid = (table.num_chunks,)
    grad_sign = f64_bits(-1.0 if s.maximize else 1.0)
    scale_arg = bucket.step if scale is None else scale
    inf_arg = bucket.step if inf is None else inf
    amp = {
        "HAS_GRAD_SCALE": scale is not None,
        "HAS_FOUND_INF": inf is not None,
        "ALIGNED": table.aligned,
        "BLOCK": common.BLOCK,
        "CHUNK": common.CHUNK,
        **common.LAUNCH_OPTIONS,
    }
    fadam_reduce_kernel[grid](
        table.segments, table.chunks, table.done, partial, scalars, grad_type, scale_arg,
        inf_arg, f64_bits(s.eps), grad_sign, DTYPE=storage, **amp,
    )  # fmt: skip
    fadam_norms_kernel[grid](
        table.segments, table.chunks, bucket.buffers["fim"], master, grad_type, bucket.step,
        table.done, partial, scalars, scale_arg, inf_arg, f64_bits(s.beta2), f64_bits(s.p),
        f64_bits(s.clip), grad_sign, DTYPE=storage, OPMATH=opmath, SQRT_POWER=s.p == 0.5, **amp,
    )  # fmt: skip
    fadam_kernel[grid](
        table.segments, table.chunks, bucket.buffers["fim"], bucket.buffers["momentum"], master,
        grad_type, bucket.step, table.done, scalars, scale_arg, inf_arg, f64_bits(s.lr),
        f64_bits(s.beta1), f64_bits(s.beta2), f64_bits(s.p), f64_bits(s.weight_decay), grad_sign,
        seed, DTYPE=storage, OPMATH=opmath, SQRT_POWER=s.p == 0.5, SR=seed >= 0, **amp,
    )  # fmt: skip
    prepared.finish()
