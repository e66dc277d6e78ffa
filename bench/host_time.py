"""``python -m bench.host_time``: the host side of one optimizer step, in microseconds.

On a GPU a step over thousands of small tensors is bound by the host: the time to read the
tensor table and launch, not the kernel. This times ``step()`` itself (the call returns once the
kernels are queued) for onepass and torch.optim's fused AdamW on a shape list, interleaved, and
prints the median and the 10th / 90th percentiles of each. The device is synchronised every few
steps so that the launch queue never fills (a full queue would make the host wait on the GPU).

  python -m bench.host_time --device cuda --shapes many-small

Compare builds or settings by running it twice in one session (e.g. with and without
ONEPASS_PARALLEL_SCAN_CUDA=0, which turns the parallel table scan off for CUDA launches).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch

import onepass
from bench.core import attach_grads, load_shape_list, make_params, shape_list_names

SYNC_EVERY = 8


def _params(name: str, device: torch.device) -> list[torch.Tensor]:
    """The shape list's params with grads as views of one flat buffer, as the main bench has."""
    params = make_params(load_shape_list(name), device, torch.float32, like=None)
    with torch.no_grad():
        attach_grads(params, torch.randn(sum(p.numel() for p in params), device=device))
    return params


def _time_steps(step: Callable[[], object], steps: int, device: torch.device) -> list[float]:
    times = []
    for i in range(steps):
        if i % SYNC_EVERY == 0 and device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e6)
    return times


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.host_time", description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", default="many-small", choices=shape_list_names())
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    candidates: dict[str, torch.optim.Optimizer] = {
        "onepass AdamW": onepass.AdamW(_params(args.shapes, device), lr=1e-4),
        "torch AdamW fused": torch.optim.AdamW(_params(args.shapes, device), lr=1e-4, fused=True),
    }
    for opt in candidates.values():  # warm-up: state allocation, tables, compilation
        for _ in range(3):
            opt.step()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(5):  # interleaved rounds, so that drift hits both alike
        for name, opt in candidates.items():
            samples[name] += _time_steps(opt.step, args.steps // 5, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"host time of step(), {args.shapes} on {device}, threads {torch.get_num_threads()}")
    for name, times in samples.items():
        deciles = statistics.quantiles(times, n=10)
        print(
            f"  {name:18s} median {statistics.median(times):8.1f} us"
            f"  p10 {deciles[0]:8.1f}  p90 {deciles[-1]:8.1f}"
        )


if __name__ == "__main__":
    main()
