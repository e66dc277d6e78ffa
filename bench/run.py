"""``python -m bench.run``: onepass vs torch.optim on the shape lists, one process, interleaved.

Writes <out>/latest.csv, latest.md and latest.png and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench import report
from bench.core import ALGORITHMS, Schedule, load_shape_list, run_group, shape_list_names

DEFAULT_SHAPES = ("gpt2-small", "one-big", "many-small")
LARGE_SHAPES = ("llama-3.2-1b",)  # ~20 GB of fp32 AdamW state per candidate: GPU default only
DEFAULT_ALGORITHMS = ("adamw", "sgd")
GPU_ALGORITHMS = ("sgdw",)  # the GPU targets name SGDW; on CPU it adds nothing SGD does not show
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument(
        "--shapes",
        nargs="+",
        metavar="NAME",
        choices=shape_list_names(),
        help=f"shape lists in bench/shapes: {', '.join(shape_list_names())} (default: "
        f"{', '.join(DEFAULT_SHAPES)}; on CUDA also {', '.join(LARGE_SHAPES)})",
    )
    parser.add_argument(
        "--algorithms",
        nargs="+",
        choices=list(ALGORITHMS),
        default=None,
        help=f"default: {', '.join(DEFAULT_ALGORITHMS)}; on CUDA also {', '.join(GPU_ALGORITHMS)}",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda[:N] (default: cuda where a GPU is present, else cpu)",
    )
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="float32", help="params, grads and state"
    )
    parser.add_argument(
        "--rounds", type=int, default=15, help="timed rounds, at most (default: 15)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="warm-up rounds, >= 1 (default: 2)")
    parser.add_argument(
        "--budget",
        type=float,
        default=15.0,
        help="seconds of timed rounds per shape list and algorithm: past 5 rounds, stop once "
        "spent (0: always run --rounds; default: 15)",
    )
    parser.add_argument(
        "--include-reference",
        action="store_true",
        help="also time onepass's pure-torch reference backend (slow)",
    )
    parser.add_argument(
        "--skip",
        nargs="+",
        default=[],
        metavar="CANDIDATE",
        help='candidates not to time, by name (e.g. "torch forloop": on a GPU it launches a '
        "kernel per tensor and op, minutes on many-small)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results",
        help="folder for latest.csv/.md/.png (default: bench/results)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 1:
        parser.error("--rounds and --warmup must be >= 1 (the first step allocates state)")
    return args


def log(line: str) -> None:
    print(line, flush=True)


def _write_tables(
    rows: list[report.Row], env: report.Env, command: str, load_start: float, out: Path
) -> str:
    """Writes out/latest.csv and latest.md; returns the Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    load = "n/a"
    if hasattr(os, "getloadavg"):  # other processes on the machine: read noisy numbers with it
        load = f"{load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    table = report.markdown(rows, env, command, load)
    report.write_csv(rows, out / "latest.csv")
    (out / "latest.md").write_text(table)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench: --device cuda but torch.cuda.is_available() is False")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # the events record on the current device's stream
    gpu = device.type == "cuda"
    shapes = args.shapes or [*DEFAULT_SHAPES, *(LARGE_SHAPES if gpu else ())]
    algorithms = args.algorithms or [*DEFAULT_ALGORITHMS, *(GPU_ALGORITHMS if gpu else ())]
    dtype = DTYPES[args.dtype]
    env = report.environment(device)
    command = shlex.join(["python", "-m", "bench.run", *(sys.argv[1:] if argv is None else argv)])
    log(
        f"bench: {env.device_name} ({env.device}), torch {env.torch_version}, onepass "
        f"{env.onepass_version} ({env.onepass_commit}), {env.cpu_capability}, "
        f"{env.threads} threads"
    )
    start = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    rows: list[report.Row] = []
    table = ""
    # Shape lists outer, algorithms inner; an algorithm with shape lists of its own (Muon: the
    # matrices it steps) runs on those after the others, unless --shapes names the lists.
    plan = [(name, a) for name in shapes for a in algorithms if ALGORITHMS[a].shapes is None]
    for a in algorithms:
        own, usual = ALGORITHMS[a].own_shapes(device), ALGORITHMS[a].shapes
        if own is None or usual is None:
            continue
        plan += [(name, a) for name in args.shapes or own]
        if not args.shapes and own != usual:
            log(
                f"{a}: on {', '.join(own)} instead of {', '.join(usual)}: this CPU has no "
                "native bf16 matmul, and the peer's matmuls run in bf16 (--shapes picks the lists)"
            )
    for name, algorithm in plan:
        group = run_group(
            load_shape_list(name),
            algorithm,
            device,
            dtype,
            Schedule(args.rounds, args.warmup, args.budget),
            args.include_reference,
            log,
            args.skip,
        )
        if group is None:
            continue
        for row in report.rows(group, env):
            rows.append(row)
            log(report.progress_line(row))
        # The tables so far after every group: a run stopped by a time limit leaves its results.
        table = _write_tables(rows, env, command, load_start, args.out)
    if not rows:
        log("bench: nothing ran")
        return 1
    report.plot(rows, env, args.out / "latest.png")
    log(f"\nbench: done in {time.perf_counter() - start:.0f} s; wrote {args.out}/latest.*\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
