"""The benchmark's statistics (bench/report.py): a share of the roofline is paired by round."""

from __future__ import annotations

import statistics
import types
from typing import Any

import pytest
import torch

from bench.core import (
    ALGORITHMS,
    ROOFLINE_COPY,
    ROOFLINE_SCALE,
    BytesModel,
    Candidate,
    GroupResult,
    Schedule,
    ShapeList,
    _build_and_time,
    bytes_model,
    candidates,
    load_shape_list,
)
from bench.report import Env, rows


def test_share_of_the_roofline_is_paired_round_by_round() -> None:
    """% roofline is the median over rounds of the round's roofline time over the step's (the
    bandwidth drifts between rounds); the ratio of the two medians is kept beside it."""
    numel, arrays, bytes_per_element = 1_000_000, 3, 20
    model = BytesModel(
        bytes_per_element=bytes_per_element,
        torch_bytes_per_element=None,
        state_slots=1,
        arrays=arrays,
    )
    shapes = ShapeList("toy", "", numel=numel, tensors=1, shapes=((numel,),))
    scale = [1.0, 2.0, 1.5, 1.0, 2.0]  # ms per round of the in-place scale probe
    copy = [9.0] * 5  # slower than the scale in every round: the scale is the roofline
    step = [1.0, 1.2, 2.0, 1.9, 1.1]
    group = GroupResult(
        shapes=shapes,
        algorithm="sgd",
        dtype=torch.float32,
        model=model,
        times_ms={"onepass": step, ROOFLINE_COPY: copy, ROOFLINE_SCALE: scale},
        host_ms={"onepass": step},
        max_abs_diff={},
        grads_shared=True,
        warmup=1,
    )
    (row,) = rows(group, Env("cpu", "test", "0", "0", "0", "scalar", 1))
    # the scale reads and writes `arrays` float32 tensors; the step moves 20 bytes an element
    probe_bytes, step_bytes = 2 * arrays * 4 * numel, bytes_per_element * numel
    paired = [
        100.0 * (step_bytes / t) / (probe_bytes / s) for t, s in zip(step, scale, strict=True)
    ]
    of_medians = 100.0 * (step_bytes / 1.2) / (probe_bytes / 1.5)
    assert row.pct_roofline == pytest.approx(statistics.median(paired))
    assert row.pct_roofline_of_medians == pytest.approx(of_medians)
    assert abs(row.pct_roofline - row.pct_roofline_of_medians) > 10.0  # the two differ here


def test_skipped_candidates_are_not_timed() -> None:
    """--skip leaves the named candidates out (the GPU check skips torch's for-loop steps)."""

    def names(skip: tuple[str, ...]) -> list[str]:
        cpu = torch.device("cpu")
        found = candidates(ALGORITHMS["sgd"], cpu, torch.float32, False, print, skip)
        return [c.name for c in found]

    every = names(())
    assert "torch forloop" in every and "torch fused" in every
    assert names(("torch forloop",)) == [n for n in every if n != "torch forloop"]


def test_muon_runs_on_one_block_where_bf16_matmuls_are_emulated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch.optim.Muon's bf16 Newton-Schulz takes minutes a block on a CPU without bf16
    matmuls: there Muon's default list is one GPT-2 block's matrices, elsewhere all 48."""
    import bench.core

    muon = ALGORITHMS["muon"]
    block = load_shape_list("gpt2-small-block-matrices")
    every = load_shape_list("gpt2-small-matrices")
    assert block.shapes == every.shapes[:4] and every.shapes == block.shapes * 12
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(bench.core, "CPU_HAS_BF16_MATMUL", False)
    assert muon.own_shapes(cpu) == ("gpt2-small-block-matrices",)
    assert muon.own_shapes(cuda) == ("gpt2-small-matrices",)
    assert ALGORITHMS["adamw"].own_shapes(cpu) is None
    monkeypatch.setattr(bench.core, "CPU_HAS_BF16_MATMUL", True)
    assert muon.own_shapes(cpu) == ("gpt2-small-matrices",)


def test_bytes_model_counts_what_memory_moves() -> None:
    """NovoGrad's and FAdam's later passes re-read from cache where every tensor is one CPU
    chunk (not credited there); NovoGrad's scalar slot is no param-sized array; a torch class
    standing in for another algorithm is credited with its own traffic."""
    cpu = torch.device("cpu")
    small = ShapeList("small", "", 2 * 4096, 2, ((64, 64), (4096,)))
    big = ShapeList("big", "", 1 << 16, 1, ((1 << 16,),))
    expected = {"novograd": (24, 20, 20), "fadam": (44, 28, 28), "adamw": (28, 28, None)}
    for key, (on_big, on_small, torch_bytes) in expected.items():
        model_big = bytes_model(ALGORITHMS[key], cpu, torch.float32, big)
        model_small = bytes_model(ALGORITHMS[key], cpu, torch.float32, small)
        assert (model_big.bytes_per_element, model_small.bytes_per_element) == (
            on_big,
            on_small,
        ), key
        assert model_big.torch_bytes_per_element == torch_bytes, key
    assert bytes_model(ALGORITHMS["novograd"], cpu, torch.float32, big).arrays == 3


def test_a_candidate_that_writes_its_grads_gets_them_back() -> None:
    """With grads shared, a candidate that scales its grads after using them must not change
    what the others step: every call sees the same grads, so the params agree at the end."""

    def make(writes: bool) -> Any:
        def build(params: list[torch.Tensor]) -> Any:
            def step() -> None:
                for p in params:
                    p.sub_(p.grad)
                    if writes:
                        p.grad.mul_(2.0)

            return types.SimpleNamespace(step=step)

        return build

    shapes = ShapeList("toy", "", 10, 2, ((3, 2), (4,)))
    cands = [Candidate("torch fused", make(False)), Candidate("writer", make(True))]
    _, _, diffs = _build_and_time(
        shapes,
        cands,
        torch.device("cpu"),
        torch.float32,
        True,
        Schedule(rounds=3, warmup=1, budget_s=0.0),
        lambda _: None,
        3,
        "torch fused",
    )
    assert diffs == {"torch fused": 0.0, "writer": 0.0}
