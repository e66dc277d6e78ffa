"""What every onepass Triton kernel shares: the tensor table, scalar passing and opmath helpers.

The tensor table
----------------
One launch steps a whole bucket, whatever the number of tensors. The launch's tensors are described
by one int64 tensor in device memory, built on the host and cached on the bucket (rebuilt only when
a param or grad address changes, or the set of params whose grad is None does):

* ``segments``: ``[n, SEGMENT_FIELDS]``, one row per tensor that has a grad this step:
  param address, grad address, numel, element offset of the tensor in the flat state buffers, index
  of its step counter in the bucket's ``step`` tensor, and the number of programs (chunks) it spans.
* ``chunks``: ``[num_chunks, 2]``, one row per program: (segment row, first element). A tensor of
  ``numel`` elements gets ``max(1, ceil(numel / CHUNK))`` programs (a zero-size tensor gets one
  that only advances its step).

Addresses are int64 in the table and become typed pointers in the kernel
(``tl.load(...).to(tl.pointer_type(DTYPE))``), which works both compiled and under
``TRITON_INTERPRET=1`` (where they are host addresses of CPU tensors, used in place). All element
indexing is 64-bit, tails are masked. There is no per-launch tensor limit: the table is an ordinary
tensor, and the grid has one program per chunk.

Step counters
-------------
Each program reads its tensor's float32 step count ``s`` and computes its per-tensor scalars from
``t = s + 1`` (the count after this step, as math.h's ``AdamConsts::make``). The last of a tensor's
programs to finish (an atomic per-segment counter, reset by that program) stores ``t``: so the step
advances on the device, once per tensor, in the same launch, and only for tensors with a grad. When
``found_inf != 0`` (read in the kernel: no host sync) no program writes anything.

Storage dtypes
--------------
Every stream of a launch has its own storage dtype (the engine's layouts: ``bucket.dtype`` for the
params, ``bucket.state_dtype`` for the elementwise state slots, the grads' dtype, one per launch,
and float32 for the master weights); the math runs in the opmath dtype of the params (float64
only when everything is float64). The kernels take each dtype from a pointer's element type: the
state slots' and the master's from their buffers, the grads' from ``grad_type_ptr`` (a small
tensor of the grads' dtype, never read: the table's grad addresses are untyped int64s). The
master buffer is ``None`` without master weights (a compile-time specialisation): with it the
math reads and writes the master (indexed like the state) and the param gets the result rounded
to nearest (:func:`load_param`, :func:`store_param`). State slot k stores through
:func:`store_state`: rounded to nearest, or stochastically for bf16 state under stochastic
rounding, with the stream seed ``seed + (1 + k) * 0x9E3779B9`` (mod 2^32) and the element's
state index.

Scalars
-------
Hyperparameters are runtime arguments (never ``tl.constexpr``: a schedule does not recompile). A
Python float would reach the kernel as float32, so each is passed as the int64 bit pattern of its
float64 value (:func:`f64_bits`) and decoded in the kernel with
``bits.to(tl.int64).to(tl.float64, bitcast=True)`` (the widening: a pattern that fits 32 bits, as
0.0's does, arrives as int32); the per-tensor constants are computed in float64 and rounded once
to the opmath type, as math.h does on the host. ``found_inf`` and ``grad_scale`` are read in the
kernel (no host sync).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

from onepass import _ops
from onepass._capturable import stream_is_capturing
from onepass.algorithms import base

#: Were the kernels created by the interpreter? (TRITON_INTERPRET is read when @triton.jit runs.)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

#: Elements one program handles (a table row per CHUNK), in CHUNK / BLOCK tiles of BLOCK elements.
#: The interpreter's cost is per operation, not per element: there, one tile per program.
CHUNK = 4096
BLOCK = CHUNK if INTERPRETED else 1024
NUM_WARPS = 4
#: Launch options of every kernel. No fused multiply-add contraction: each product and sum is
#: rounded as the reference and the other backends round it (a contraction can move a result
#: that cancels to ~0 across zero, Lion's sign, or a low-precision store across a rounding
#: boundary); the steps are memory-bound, so the FMAs would not make them faster.
LAUNCH_OPTIONS = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}
#: int64 fields of a segment row: param, grad, numel, state offset, step index, programs.
SEGMENT_FIELDS = 6

_TL_DTYPES: dict[torch.dtype, Any] = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


def tl_dtypes(dtype: torch.dtype) -> tuple[Any, Any]:
    """(storage, opmath) Triton dtypes of a torch storage dtype: float64 math for float64 storage,
    float32 math for everything narrower."""
    storage = _TL_DTYPES[dtype]
    return storage, (tl.float64 if dtype == torch.float64 else tl.float32)


def f64_bits(value: float) -> int:
    """The int64 bit pattern of ``value`` as a float64 (see the module docstring)."""
    return int(struct.unpack("<q", struct.pack("<d", float(value)))[0])


# ------------------------------------------------------------------------------------------------
# Device helpers
# ------------------------------------------------------------------------------------------------


@triton.jit
def op_sqrt(x):
    """Correctly rounded square root (Triton's plain fp32 sqrt is approximate on NVIDIA GPUs)."""
    if x.dtype == tl.float64:  # noqa: SIM108 (a compile-time branch, as in math.h)
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def op_div(a, b):
    """Correctly rounded division (Triton's plain fp32 ``/`` is approximate on NVIDIA GPUs)."""
    if a.dtype == tl.float64:  # noqa: SIM108
        r = a / b
    else:
        r = tl.div_rn(a, b)
    return r


@triton.jit
def op_max(a, b):
    """``max(a, b)`` propagating NaN like torch.maximum (math.h's op_max: NaN in a or b wins)."""
    return tl.where((a != a) | (a > b), a, b)


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    """Rounds an opmath value to the storage dtype, to nearest even.

    float32 -> bfloat16 rounds by hand: the interpreter truncates that conversion, and the same
    code must run (and be tested) in both modes; compiled, it costs a few integer ops per element
    of a memory-bound kernel.
    """
    if DTYPE == tl.bfloat16:  # noqa: SIM300 (DTYPE is a constexpr argument)
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        quiet_nan = (bits >> 16) | 0x40
        r = tl.where(x != x, quiet_nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        r = x.to(DTYPE)
    return r


@triton.jit
def sr_hash(index, seed):
    """hash32(seed, index) of math.h / the reference's ``sr_hash``: a uint32 per element of the
    int64 ``index`` (a state index, so the same element gets the same bits in every backend).

    Every operand is uint32, so products wrap and shifts are logical, compiled and interpreted.
    """
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    hi = ((index >> 32) & 0xFFFFFFFF).to(tl.uint32)
    x = lo * tl.full((), 0x9E3779B1, tl.uint32)
    x ^= hi * tl.full((), 0x85EBCA77, tl.uint32)
    x ^= seed.to(tl.uint32) * tl.full((), 0xC2B2AE3D, tl.uint32)
    x ^= x >> 16
    x = x * tl.full((), 0x7FEB352D, tl.uint32)
    x ^= x >> 15
    x = x * tl.full((), 0x846CA68B, tl.uint32)
    x ^= x >> 16
    return x


@triton.jit
def param_to_storage(x, DTYPE: tl.constexpr, index, seed, SR: tl.constexpr):
    """Rounds an opmath param value to the storage dtype: :func:`to_storage` (to nearest), or
    with ``SR`` and a bf16 ``DTYPE`` (the launcher sets SR when the group's seed is >= 0, only
    possible for bf16) stochastically; ``index`` is the element's state index.

    Stochastic rounding adds 16 random bits (:func:`sr_hash` of ``index`` and ``seed``) below the
    bf16 mantissa and truncates, so the stored value is unbiased: small updates a bf16 param
    would round away still move it on average. A carry into the exponent is intended (it rounds
    up to the next binade). inf and nan round to nearest, as the reference's ``store_param``:
    the add would turn an inf into a nan.
    """
    r = to_storage(x, DTYPE)
    # Nested, not ``and``: the dtype test must stay a compile-time branch, so a wider dtype
    # never compiles the bf16 bit manipulation, even where SR arrives as a runtime value.
    if DTYPE == tl.bfloat16:  # noqa: SIM102, SIM300 (DTYPE is a constexpr argument)
        if SR:
            bits = x.to(tl.uint32, bitcast=True)
            noise = sr_hash(index, seed) & 0xFFFF
            rounded = ((bits + noise) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            finite = (bits & 0x7F800000) != 0x7F800000
            r = tl.where(finite, rounded, r)
    return r


@triton.jit
def state_to_storage(x, DTYPE: tl.constexpr, index, seed, K: tl.constexpr, SR: tl.constexpr):
    """Rounds an opmath value of state slot ``K`` (kernel order) to the slot's storage dtype: to
    nearest, or with ``SR`` and a bf16 ``DTYPE`` stochastically, drawing from the stream seed
    ``seed + (1 + K) * 0x9E3779B9`` (mod 2^32: the param draws from ``seed``), as the
    reference's ``Rounding.store_state`` and dtypes.h's ``rounded_from_opmath``."""
    if DTYPE == tl.bfloat16:  # noqa: SIM300 (a compile-time branch)
        # uint32 arithmetic: the stream seed wraps mod 2^32 whatever the seed's integer type.
        offset: tl.constexpr = ((1 + K) * 0x9E3779B9) % 4294967296
        stream = seed.to(tl.int64).to(tl.uint32) + tl.full((), offset, tl.uint32)
    else:
        stream = seed
    return param_to_storage(x, DTYPE, index, stream, SR)


@triton.jit
def store_state(ptr, index, x, mask, seed, K: tl.constexpr, SR: tl.constexpr):
    """State slot ``K``: ``ptr[index] = x`` rounded to the slot's dtype (``ptr``'s element type)
    by :func:`state_to_storage`."""
    tl.store(ptr + index, state_to_storage(x, ptr.dtype.element_ty, index, seed, K, SR), mask=mask)


@triton.jit
def load_param(param_ptr, master_ptr, offsets, index, mask, other, OPMATH: tl.constexpr):
    """The param value the math starts from, in OPMATH: the fp32 master at the state ``index``
    with master weights (``master_ptr`` not None), else the param at ``offsets``."""
    if master_ptr is not None:
        p = tl.load(master_ptr + index, mask=mask, other=other).to(OPMATH)
    else:
        p = tl.load(param_ptr + offsets, mask=mask, other=other).to(OPMATH)
    return p


@triton.jit
def store_param(param_ptr, master_ptr, offsets, index, p, mask, seed, SR: tl.constexpr):
    """Writes the math's param result ``p``: with master weights, into the master and, rounded to
    nearest (never stochastically), into the param; else into the param by
    :func:`param_to_storage` (stochastic for bf16 under ``SR``). ``index``: the state index."""
    if master_ptr is not None:
        tl.store(master_ptr + index, p.to(master_ptr.dtype.element_ty), mask=mask)
        tl.store(param_ptr + offsets, to_storage(p, param_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(
            param_ptr + offsets,
            param_to_storage(p, param_ptr.dtype.element_ty, index, seed, SR),
            mask=mask,
        )


@triton.jit
def load_segment(segments, chunks, DTYPE: tl.constexpr, GRAD: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's chunk: (segment row, first element, param pointer, grad pointer, numel,
    state offset, step index, number of programs of the segment). ``DTYPE`` and ``GRAD`` are the
    element types of the param and grad pointers.

    The alignment hints let full tiles use 16-byte vector accesses: chunks start at multiples of
    CHUNK, state offsets are multiples of 16 elements (the engine's ALIGN_ELEMENTS), and with
    ``ALIGNED`` (checked on the host) every param and grad address is a multiple of 16 bytes.
    """
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(chunks + 2 * pid)
    start = tl.multiple_of(tl.load(chunks + 2 * pid + 1), 16)
    segment = segments + row * 6  # SEGMENT_FIELDS
    param = tl.load(segment).to(tl.pointer_type(DTYPE))
    grad = tl.load(segment + 1).to(tl.pointer_type(GRAD))
    if ALIGNED:  # byte alignment of the pointers (on the cast itself: the hint is not propagated)
        param = tl.multiple_of(param, 16)
        grad = tl.multiple_of(grad, 16)
    numel = tl.load(segment + 2)
    state_offset = tl.multiple_of(tl.load(segment + 3), 16)
    step_index = tl.load(segment + 4)
    programs = tl.load(segment + 5)
    return row, start, param, grad, numel, state_offset, step_index, programs


@triton.jit
def chunk_sum_of_squares(grad_ptr, start, numel, MASKED: tl.constexpr, BLOCK: tl.constexpr,
                         CHUNK: tl.constexpr):  # fmt: skip
    """The sum of g^2 over elements [start, start + CHUNK) of one tensor's grad, in float64, in
    tiles of BLOCK (masked if MASKED: a tensor's last, partial chunk; full ones load vectors)."""
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(0, CHUNK, BLOCK):
        offsets = start + i + tl.arange(0, BLOCK)
        if MASKED:
            g = tl.load(grad_ptr + offsets, mask=offsets < numel, other=0.0)
        else:
            g = tl.load(grad_ptr + offsets)
        g = g.to(tl.float64)
        acc += g * g
    return tl.sum(acc, axis=0)


@triton.jit
def advance_step(step, done, row, step_index, programs, t):
    """Stores the tensor's new step count ``t`` once every program of it has read the old one.

    ``done`` counts the finished programs of each segment; the last one resets it and stores.
    The barrier orders every thread's read of the step before this program's atomic.
    """
    tl.debug_barrier()
    finished = tl.atomic_add(done + row, 1)
    if finished == programs - 1:
        tl.store(done + row, 0)
        tl.store(step + step_index, t.to(tl.float32))


@triton.jit
def sum_partials(partial_ptr, first, count, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
    """The sum of ``partial_ptr[STRIDE * (first + k)]`` for k < count: a tensor's per-program
    partial sums, read by its last program (volatile: other programs wrote them), BLOCK at a
    time. One at a time, a 2^26-element tensor's 4,096 partials took a millisecond.

    A while loop, not ``range(0, count, BLOCK)``: triton 3.6's interpreter (the GPU machine's
    triton) cannot take a loaded value as a range bound."""
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    k = count * 0  # count's integer type (i64 from the table), not a Python int
    while k < count:
        index = k + tl.arange(0, BLOCK)
        at = partial_ptr + STRIDE * (first + index)
        acc += tl.load(at, mask=index < count, other=0.0, volatile=True)
        k += BLOCK
    return tl.sum(acc, axis=0)


# ------------------------------------------------------------------------------------------------
# Host side: the table and its cache
# ------------------------------------------------------------------------------------------------


@dataclass
class Table:
    """One bucket's tensor table on the device (see the module docstring)."""

    key: torch.Tensor  # int64 [2n]: each param's address and its grad's (-1: none)
    segments: torch.Tensor  # int64 [n, SEGMENT_FIELDS]
    chunks: torch.Tensor  # int64 [num_chunks, 2]
    done: torch.Tensor  # int32 [n], zero between launches
    num_chunks: int
    aligned: bool  # every param and grad address is a multiple of 16 bytes
    #: The pinned bytes the device table was copied from (a copy made inside a CUDA graph
    #: capture reads them again at every replay).
    upload: torch.Tensor | None = None
    captured: bool = False  # a step captured in a CUDA graph read it: never freed
    #: The CUDA streams (ids) it is known to be used on: the one it was built on, then those
    #: recorded.
    streams: set[int] = field(default_factory=set)


@dataclass
class Prepared:
    """A launch's table and the non-contiguous params to write back after it."""

    table: Table | None  # None: no tensor has a grad
    write_back: list[tuple[torch.Tensor, torch.Tensor]]
    #: A tensor of the launch's grad dtype, never read: the kernels' ``grad_type_ptr``.
    grad_type: torch.Tensor | None = None

    def finish(self) -> None:
        for param, tmp in self.write_back:
            param.copy_(tmp)


def check_device(device: torch.device) -> None:
    """Raises unless the kernels can step tensors on ``device`` in this process."""
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "onepass: backend='triton' steps CPU tensors only under the Triton interpreter, and "
            "the kernels were created without it: set TRITON_INTERPRET=1 before onepass's Triton "
            "kernels are first used"
        )
    if device.type != "cpu" and INTERPRETED:
        raise RuntimeError(
            f"onepass: the Triton kernels run in the interpreter (TRITON_INTERPRET=1), which "
            f"cannot step tensors on {device}; unset TRITON_INTERPRET"
        )


def prepare(bucket: Any, grads: list[torch.Tensor | None]) -> Prepared:
    """The bucket's table for these grads: the cached one while every address is unchanged.

    A non-contiguous (or lazily negated) param or grad is copied into a contiguous staging
    buffer kept with the table (so its address, and the table, stay the same from step to
    step); params are copied back by :meth:`Prepared.finish`.
    """
    check_device(bucket.device)
    grads = list(grads)
    cache: dict[str, Any] = bucket.table_cache
    key = cache.get("key")
    if key is None or key.numel() != 2 * len(grads):
        key = cache["key"] = torch.empty(2 * len(grads), dtype=torch.int64)
    # Natively where built: every address, and whether anything needs staging (~1.5 us a param
    # in Python, below).
    write_back: list[tuple[torch.Tensor, torch.Tensor]]
    if _ops.launch_key(bucket.params, grads, key):
        params, write_back = bucket.params, []
    else:
        params, write_back = _stage(bucket, grads, key)
    table = cache.get("triton")
    if table is None or not torch.equal(table.key, key):
        if table is not None and table.captured:
            # A captured graph reads this table at every replay, for as long as the graph lives
            # (unseen here): freed, its memory would go to the next allocation (of the graph's
            # pool, or of a later capture sharing it, where the capture built it; kept, it
            # keeps that pool from being released). Grads allocated inside each capture give
            # each its own table (~70 bytes a tensor).
            cache.setdefault("retained", []).append(table)
        table = _build(key.clone(), bucket, params, grads)
        cache["triton"] = table
    capturing = _capturing(bucket.device)
    table.captured = table.captured or capturing
    if bucket.device.type == "cuda" and not capturing:
        _record_stream(table, torch.cuda.current_stream(bucket.device))
    grad_dtype = next((g.dtype for g in grads if g is not None), bucket.dtype)  # one per launch
    types: dict[torch.dtype, torch.Tensor] = cache.setdefault("grad_type", {})
    grad_type = types.get(grad_dtype)
    if grad_type is None:
        grad_type = types[grad_dtype] = torch.zeros(16, dtype=grad_dtype, device=bucket.device)
    return Prepared(table if table.num_chunks else None, write_back, grad_type)


def _capturing(device: torch.device) -> bool:
    """Whether this launch is being captured in a CUDA graph."""
    return device.type == "cuda" and stream_is_capturing()


def _record_stream(table: Table, stream: torch.cuda.Stream) -> None:
    """Marks the table's memory as used on ``stream`` where it was not built on it, so that,
    once dropped, it is not handed out again before that stream's kernels have read it."""
    if stream.cuda_stream not in table.streams:
        table.segments.record_stream(stream)  # (chunks share its storage)
        table.done.record_stream(stream)
        table.streams.add(stream.cuda_stream)


def _stage(
    bucket: Any, grads: list[torch.Tensor | None], key: torch.Tensor
) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The launch's params, with every param or grad of a stepped tensor that is not plain
    memory (non-contiguous, or a lazy negation) replaced (in ``grads`` too) by its contiguous
    staging buffer; the params to copy back; the
    addresses written into ``key``."""
    staging: dict[tuple[str, int], torch.Tensor] = bucket.table_cache.setdefault("staging", {})
    params: list[torch.Tensor] = []
    write_back: list[tuple[torch.Tensor, torch.Tensor]] = []
    addresses: list[int] = []
    for i, (p, g) in enumerate(zip(bucket.params, grads, strict=True)):
        if g is not None:
            if not _plain(p):
                tmp = _staged(staging, ("param", i), p)
                write_back.append((p, tmp))
                p = tmp
            if not _plain(g):
                g = _staged(staging, ("grad", i), g)
        params.append(p)
        grads[i] = g
        addresses.append(p.data_ptr())
        addresses.append(-1 if g is None else g.data_ptr())
    key.copy_(torch.tensor(addresses, dtype=torch.int64))
    return params, write_back


def master(bucket: Any) -> torch.Tensor | None:
    """The bucket's flat fp32 master weights (indexed like the state), or None without them: the
    kernels' ``master_ptr``."""
    return bucket.buffers.get(base.MASTER)


def _plain(t: torch.Tensor) -> bool:
    """Whether the kernels may use t's memory as it is: contiguous, no lazy negation."""
    return t.is_contiguous() and not t.is_neg() and not t.is_conj()


def _staged(
    staging: dict[tuple[str, int], torch.Tensor], key: tuple[str, int], t: torch.Tensor
) -> torch.Tensor:
    """t copied into the staging buffer kept under key (made anew when t's shape or dtype
    changed)."""
    buffer = staging.get(key)
    if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype:
        buffer = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        staging[key] = buffer
    return buffer.copy_(t)


def _build(
    key: torch.Tensor,
    bucket: Any,
    params: list[torch.Tensor],
    grads: list[torch.Tensor | None],
) -> Table:
    offsets = bucket.offsets.tolist()
    # load_segment's alignment hint (the engine aligns every tensor's state to 16 elements).
    assert all(offset % 16 == 0 for offset in offsets), "state offsets must be 16-aligned"
    rows: list[list[int]] = []
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if g is None:
            continue
        numel = p.numel()
        programs = max(1, -(-numel // CHUNK))
        rows.append([p.data_ptr(), g.data_ptr(), numel, int(offsets[i]), i, programs])
    segments = torch.tensor(rows, dtype=torch.int64).reshape(-1, SEGMENT_FIELDS)
    per_row = segments[:, 5]  # each row's programs
    num_chunks = int(per_row.sum())
    row_of_chunk = torch.repeat_interleave(torch.arange(len(rows)), per_row)
    first_chunk = torch.cumsum(per_row, 0) - per_row
    start = (torch.arange(num_chunks) - first_chunk[row_of_chunk]) * CHUNK
    chunks = torch.stack([row_of_chunk, start], dim=1)
    host = torch.cat([segments.reshape(-1), chunks.reshape(-1)])
    if bucket.device.type == "cuda":
        # From pinned memory, asynchronously: a pageable copy would sync the host with the GPU
        # (grads reallocated by backward change the table every step).
        host = host.pin_memory()
    device = host.to(bucket.device, non_blocking=True)
    n = segments.numel()
    return Table(
        key=key,
        segments=device[:n].view(-1, SEGMENT_FIELDS),
        chunks=device[n:].view(-1, 2),
        done=torch.zeros(len(rows), dtype=torch.int32, device=bucket.device),
        num_chunks=num_chunks,
        aligned=all(r[0] % 16 == 0 and r[1] % 16 == 0 for r in rows),
        upload=host,
        streams=(
            {torch.cuda.current_stream(bucket.device).cuda_stream}
            if bucket.device.type == "cuda"
            else set()
        ),
    )


def amp_tensor(value: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A GradScaler tensor (grad_scale / found_inf) on the bucket's device, without a sync."""
    if value is None or value.device == device:
        return value
    return value.to(device, non_blocking=True)
