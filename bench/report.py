"""From per-round times to rows: statistics, the roofline, targets, CSV, Markdown and a plot."""

from __future__ import annotations

import csv
import platform
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

import onepass
from bench.core import ALGORITHMS, ROOFLINE_COPY, ROOFLINE_SCALE, GroupResult

#: The issues' bars for every native onepass backend, on every shape list: at least torch fused's
#: speed, and a share of the same-run roofline: on the CPU 85% of the faster probe (copy or
#: in-place scale, issue 2), on a GPU 92% of the copy (issue 3).
TARGET_SPEEDUP = 1.0
TARGET_PCT_ROOFLINE = {"cpu": 85.0, "cuda": 92.0}


def target_pct(device: str) -> float:
    return TARGET_PCT_ROOFLINE["cuda" if device.startswith("cuda") else "cpu"]


def roofline_name(device: str) -> str:
    return "copy" if device.startswith("cuda") else "the faster of copy and scale"


@dataclass(frozen=True)
class Env:
    device: str
    device_name: str
    torch_version: str
    onepass_version: str
    onepass_commit: str  # of this checkout; "+dirty" when python/, csrc/ or setup.py differ
    cpu_capability: str
    threads: int


def _commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "python", "csrc", "setup.py"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return ""
    return f"{head}+dirty" if head and dirty else head


def environment(device: torch.device) -> Env:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    capability = f"torch {torch.backends.cpu.get_cpu_capability()}"
    if onepass.native_available():
        capability = f"onepass {onepass.cpu_capability()}, {capability}"
    return Env(
        str(device),
        name,
        torch.__version__,
        onepass.__version__,
        _commit(),
        capability,
        torch.get_num_threads(),
    )


@dataclass(frozen=True)
class Row:
    device: str
    device_name: str
    torch_version: str
    onepass_version: str
    onepass_commit: str
    cpu_capability: str
    threads: int
    shapes: str
    algorithm: str
    candidate: str
    dtype: str
    numel: int
    tensors: int
    rounds: int
    warmup: int
    grads_shared: bool
    bytes_per_step: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    host_ms: float  # median host time of the call (on the CPU, the whole time)
    gbps: float
    copy_gbps: float
    scale_gbps: float
    roofline_gbps: float
    pct_roofline: float  # median over rounds of the round's roofline time / this one's
    pct_roofline_of_medians: float  # the roofline's median time / this one's median time
    baseline: str  # the candidate the speedups are relative to
    speedup_vs_fused: float | None  # median over rounds of the baseline's time / this one's
    speedup_p10: float | None
    speedup_p90: float | None
    max_abs_diff_vs_fused: float | None  # params after the run, a sanity check on the step


def _deciles(values: Sequence[float]) -> tuple[float, float, float]:
    """(p10, median, p90)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=10, method="inclusive")
    return q[0], statistics.median(values), q[8]


def rows(group: GroupResult, env: Env) -> list[Row]:
    times = group.times_ms
    tensor_bytes = group.shapes.numel * torch.empty(0, dtype=group.dtype).element_size()

    def bytes_per_step_of(name: str) -> int:
        """The spec's bytes, or a torch class's own where it runs another algorithm / state."""
        torch_bytes = group.model.torch_bytes_per_element
        if torch_bytes is not None and name.startswith("torch "):
            return group.shapes.numel * torch_bytes
        return group.shapes.numel * group.model.bytes_per_element

    def gbps(nbytes: int, ms: float) -> float:
        return nbytes / (ms * 1e-3) / 1e9

    # bytes read + written by each probe over its `arrays`-tensor working set (core.py)
    probe_bytes = group.model.arrays * tensor_bytes
    copy_gbps = gbps(2 * (probe_bytes // 2), statistics.median(times[ROOFLINE_COPY]))
    scale_gbps = gbps(2 * probe_bytes, statistics.median(times[ROOFLINE_SCALE]))
    roofline = copy_gbps if env.device.startswith("cuda") else max(copy_gbps, scale_gbps)

    def round_roofline(r: int) -> float:
        """The roofline of round r alone: the bandwidth drifts between rounds (on the CPU VM
        by up to 2x within minutes), so a share of it is taken round by round, like a speedup."""
        copy = gbps(2 * (probe_bytes // 2), times[ROOFLINE_COPY][r])
        scale = gbps(2 * probe_bytes, times[ROOFLINE_SCALE][r])
        return copy if env.device.startswith("cuda") else max(copy, scale)

    rooflines = [round_roofline(r) for r in range(len(times[ROOFLINE_COPY]))]
    # The algorithm's baseline; torch fused where that peer is not installed (a GPU machine
    # without network has no lion-pytorch / pytorch-optimizer)
    baseline_name = ALGORITHMS[group.algorithm].baseline
    if baseline_name not in times and "torch fused" in times:
        baseline_name = "torch fused"
    baseline = times.get(baseline_name)
    out = []
    for name, ts in times.items():
        if name in (ROOFLINE_COPY, ROOFLINE_SCALE):
            continue
        p10, median, p90 = _deciles(ts)
        bytes_per_step = bytes_per_step_of(name)
        speedup = s10 = s90 = None
        if baseline is not None:  # paired: the baseline's time over this one's, round by round
            s10, speedup, s90 = _deciles([b / t for b, t in zip(baseline, ts, strict=True)])
        out.append(
            Row(
                **asdict(env),
                shapes=group.shapes.name,
                algorithm=ALGORITHMS[group.algorithm].label,
                candidate=name,
                dtype=str(group.dtype).removeprefix("torch."),
                numel=group.shapes.numel,
                tensors=group.shapes.tensors,
                rounds=len(ts),
                warmup=group.warmup,
                grads_shared=group.grads_shared,
                bytes_per_step=bytes_per_step,
                median_ms=median,
                p10_ms=p10,
                p90_ms=p90,
                host_ms=statistics.median(group.host_ms[name]),
                gbps=gbps(bytes_per_step, median),
                copy_gbps=copy_gbps,
                scale_gbps=scale_gbps,
                roofline_gbps=roofline,
                pct_roofline=statistics.median(
                    100.0 * gbps(bytes_per_step, t) / roof
                    for t, roof in zip(ts, rooflines, strict=True)
                ),
                pct_roofline_of_medians=100.0 * gbps(bytes_per_step, median) / roofline,
                baseline=baseline_name,
                speedup_vs_fused=speedup,
                speedup_p10=s10,
                speedup_p90=s90,
                max_abs_diff_vs_fused=group.max_abs_diff.get(name),
            )
        )
    return out


def is_target(row: Row) -> bool:
    """Native onepass backends are held to the issue's bar (the reference backend is not)."""
    return row.candidate.startswith("onepass ") and row.candidate != "onepass reference"


def _x(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}x"


def _e(value: float | None) -> str:
    return "" if value is None else f"{value:.0e}"


def _met(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def progress_line(row: Row) -> str:
    return (
        f"  {row.candidate:18s} {row.median_ms:9.2f} ms [{row.p10_ms:.2f}, {row.p90_ms:.2f}]"
        f" host {row.host_ms:.2f} ms {row.gbps:7.1f} GB/s {row.pct_roofline:5.0f}% of "
        f"{row.roofline_gbps:.1f} GB/s"
        f"  {_x(row.speedup_vs_fused)} vs baseline  max|dp| {_e(row.max_abs_diff_vs_fused)}"
    )


def markdown(all_rows: Sequence[Row], env: Env, command: str, load: str) -> str:
    r0 = all_rows[0]
    lines = [
        f"# onepass bench: {env.device_name} ({env.device})",
        "",
        f"`{command}`: torch {env.torch_version}, onepass {env.onepass_version} "
        f"({env.onepass_commit or 'commit unknown'}), "
        f"{env.cpu_capability}, {env.threads} threads. Candidates interleaved round-robin "
        f"({'two steps' if env.device.startswith('cuda') else 'one step'} each per round) after "
        f"{r0.warmup} warm-up rounds; statistics over rounds. "
        f"Load average (1 min): {load}.",
        "",
        "ms/step: "
        + (
            "the larger of the GPU time (CUDA events, a sleep kernel queued ahead so that the "
            "host's work overlaps, as in training) and the host time of the call (host ms, "
            "timed in a call of its own on an idle GPU): the step's steady-state cost. "
            if env.device.startswith("cuda")
            else "wall clock. "
        )
        + "GB/s = the bytes the step must move (the spec's bytes model, `bytes_per_element` x "
        "numel, less the re-reads of NovoGrad's and FAdam's later passes where the CPU runs them "
        "tensor by tensor from cache; for a torch class standing in for another algorithm, or "
        "keeping fp32 moments, its own) / median time: a candidate with extra passes moves more "
        "than it is credited. Roofline = "
        f"{roofline_name(env.device)} (read + written) over as many param-sized "
        "arrays as the step touches (param, grad, state), "
        "timed in the same rounds (roofline GB/s from their median times); % roofline = median "
        "over rounds of the roofline's time / the candidate's time in the same round. "
        "vs baseline = median over rounds of the baseline's time / the candidate's time in the "
        "same round (> 1 is faster); the baseline is torch fused, for Lion lion-pytorch, for "
        "NovoGrad and FAdam pytorch-optimizer (kozistr), for Muon torch.optim.Muon. "
        "max abs dp: the largest difference of a param to that baseline's after the run (every "
        "candidate took the same steps from the same params and grads; a candidate that writes "
        "its grads, as pytorch-optimizer's NovoGrad does, gets them back untimed after each "
        "call).",
        "",
        "| shapes | algorithm | candidate | dtype | rounds | ms/step median [p10, p90] "
        "| host ms | GB/s | roofline GB/s | % roofline | vs baseline | max abs dp vs baseline |",
        "|---|---|---|---|--:|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in all_rows:
        lines.append(
            f"| {r.shapes} | {r.algorithm} | {r.candidate} | {r.dtype} | {r.rounds} "
            f"| {r.median_ms:.2f} "
            f"[{r.p10_ms:.2f}, {r.p90_ms:.2f}] | {r.host_ms:.2f} | {r.gbps:.1f} "
            f"| {r.roofline_gbps:.1f} "
            f"| {r.pct_roofline:.0f}% | {_x(r.speedup_vs_fused)} | {_e(r.max_abs_diff_vs_fused)} |"
        )
    lines += ["", *targets(all_rows)]
    return "\n".join(lines) + "\n"


def targets(all_rows: Sequence[Row]) -> list[str]:
    """The issue's targets, one line per native onepass row: met or not in this run.

    A speedup is met when even the p10 of the paired per-round ratios clears the bar, "met by
    the median" when only the median does (within this run's noise).
    """
    rows_ = [r for r in all_rows if is_target(r)]
    pct = target_pct(all_rows[0].device) if all_rows else TARGET_PCT_ROOFLINE["cpu"]
    head = f"## Targets: onepass >= {TARGET_SPEEDUP:.1f}x the baseline, >= {pct:.0f}% of roofline"
    if not rows_:
        return [head, "", "No native onepass backend runs on this device: nothing to check."]
    lines = [
        head,
        "",
        "| shapes | algorithm | candidate | baseline | vs baseline [paired p10, p90] "
        f"| >= {TARGET_SPEEDUP:.1f}x | % roofline | >= {pct:.0f}% |",
        "|---|---|---|---|--:|---|--:|---|",
    ]
    for r in rows_:
        if r.speedup_vs_fused is None or r.speedup_p10 is None:
            fast = "no torch baseline to compare with"
        elif r.speedup_p10 >= TARGET_SPEEDUP:
            fast = "met"
        elif r.speedup_vs_fused >= TARGET_SPEEDUP:
            fast = "met by the median, not by p10"
        else:
            fast = _met(False)
        lines.append(
            f"| {r.shapes} | {r.algorithm} | {r.candidate} | {r.baseline} "
            f"| {_x(r.speedup_vs_fused, 3)} "
            f"[{_x(r.speedup_p10, 3)}, {_x(r.speedup_p90, 3)}] | {fast} "
            f"| {r.pct_roofline:.1f}% | {_met(r.pct_roofline >= pct)} |"
        )
    return lines


def write_csv(all_rows: Sequence[Row], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in fields(Row)])
        writer.writeheader()
        for r in all_rows:
            writer.writerow(asdict(r))


def plot(all_rows: Sequence[Row], env: Env, path: Path) -> None:
    """Grouped bars, one column per algorithm: % of roofline (top), speedup vs fused (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    algorithms = list(dict.fromkeys(r.algorithm for r in all_rows))
    candidates = list(dict.fromkeys(r.candidate for r in all_rows))
    colors = {c: plt.get_cmap("tab10")(i) for i, c in enumerate(candidates)}
    fig, axes = plt.subplots(
        2, len(algorithms), figsize=(6 * len(algorithms), 8), squeeze=False, sharey="row"
    )
    for col, algorithm in enumerate(algorithms):
        mine = [r for r in all_rows if r.algorithm == algorithm]
        shape_names = list(dict.fromkeys(r.shapes for r in mine))
        width = 0.8 / len(candidates)
        for i, cand in enumerate(candidates):
            placed = [
                (x - 0.4 + (i + 0.5) * width, r)
                for x, shape in enumerate(shape_names)
                for r in mine
                if r.shapes == shape and r.candidate == cand
            ]
            pct = [(x, r.pct_roofline) for x, r in placed]
            speedup = [(x, r.speedup_vs_fused) for x, r in placed if r.speedup_vs_fused]
            panels = ((axes[0][col], pct, "{:.0f}"), (axes[1][col], speedup, "{:.2f}"))
            for ax, points, fmt in panels:
                if points:
                    xs, ys = zip(*points, strict=True)
                    bars = ax.bar(xs, ys, width, color=colors[cand])
                    ax.bar_label(bars, [fmt.format(y) for y in ys], fontsize=6, rotation=90)
        for row_i, ax in enumerate(axes[:, col]):
            ax.set_xticks(range(len(shape_names)), shape_names)
            ax.margins(y=0.12)
            if row_i == 0:
                ax.set_title(algorithm)
                ax.axhline(target_pct(env.device), color="k", ls="--", lw=0.8)
                ax.set_ylabel("% of same-run roofline")
            else:
                ax.set_yscale("log")
                ax.axhline(TARGET_SPEEDUP, color="k", ls="--", lw=0.8)
                ax.set_ylabel("speedup vs baseline (log)")
    handles = [Patch(color=colors[c], label=c) for c in candidates]
    fig.legend(handles=handles, loc="lower center", ncol=len(candidates), fontsize=8)
    dtypes = ", ".join(dict.fromkeys(r.dtype for r in all_rows))
    fig.suptitle(
        f"onepass vs torch.optim: {env.device_name} ({env.device}), {env.threads} threads, "
        f"{dtypes}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)
