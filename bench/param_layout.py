"""``python -m bench.param_layout``: one CPU optimizer over three layouts of the same params.

The same params and grads stepped three ways in one process, alternating, with a 256 MB read
before each call (a step meets cold caches, as after a backward pass):

- ``separate``: each param allocated on its own, as a model's are (bench.core.make_params);
- ``views``: each param a view of one buffer (the same tensors, one allocation);
- ``flatten``: ``flatten=True`` (onepass's own flat param and grad buffers).

Each is also timed as a step that GradScaler skips (``found_inf`` set: the table scan and the
checks, no kernel), and a copy of the step's size is timed as the round's bandwidth. Prints the
medians of one process: run it a few times, since this VM's bandwidth moves between phases,
and the layouts differ only in the fast ones (bench/NOTES.md).

  python -m bench.param_layout --shapes many-small --rounds 30
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

import onepass
from bench.core import ShapeList, attach_grads, load_shape_list, make_params, shape_list_names

FLUSH_ELEMENTS = 64 * 2**20  # a 256 MB float32 buffer, read before each call


def _params(shapes: ShapeList, views: bool) -> list[torch.Tensor]:
    """The shape list's params, separately allocated or as views of one buffer; grads as views
    of one flat buffer (as the main bench has them)."""
    if views:
        buffer = torch.empty(shapes.numel).normal_(0.0, 0.02)
        params, offset = [], 0
        for shape in shapes.shapes:
            n = math.prod(shape)
            params.append(buffer[offset : offset + n].view(shape).requires_grad_())
            offset += n
    else:
        params = make_params(shapes, torch.device("cpu"), torch.float32, None)
    with torch.no_grad():
        attach_grads(params, torch.randn(shapes.numel))
    return params


def _skipped(opt: onepass.SGD) -> Callable[[], None]:
    """A step GradScaler skips: the native op builds and checks its table, then returns."""
    found_inf = torch.ones(())

    def step() -> None:
        opt.found_inf = found_inf  # type: ignore[attr-defined]
        opt.step()
        del opt.found_inf  # type: ignore[attr-defined]

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="many-small", choices=shape_list_names())
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    shapes = load_shape_list(args.shapes)
    numel = shapes.numel
    tasks: dict[str, Callable[[], object]] = {}
    for name, views, flatten in (
        ("separate", False, False),
        ("views", True, False),
        ("flatten", False, True),
    ):
        params = _params(shapes, views)
        opt = onepass.SGD(params, lr=1e-3, momentum=0.9, backend="cpu", flatten=flatten)
        opt.step()  # state allocated, flat buffers built
        tasks[name] = opt.step
        tasks[f"{name} skipped"] = _skipped(opt)
    # A copy over the bytes an SGD step with momentum moves (param, grad, state: 4 arrays).
    scratch = torch.empty(4 * numel).normal_()
    half = scratch.numel() // 2
    tasks["copy"] = lambda: scratch[half : 2 * half].copy_(scratch[:half])
    flush = torch.empty(FLUSH_ELEMENTS)
    times: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(args.rounds):
        for name, task in tasks.items():
            flush.sum()
            start = time.perf_counter()
            task()
            times[name].append(time.perf_counter() - start)
    copy_ms = 1e3 * statistics.median(times["copy"])
    print(f"copy {16 * numel / copy_ms / 1e6:.1f} GB/s (read + written)", end="")
    for name, ts in times.items():
        print(f" | {name} {1e3 * statistics.median(ts):.2f} ms", end="")
    print()


if __name__ == "__main__":
    main()
