"""Shared helpers: interleaved timing, medians of paired ratios, machine description, result rows, tables.

Every benchmark runs on shared machines (here: 2 cores, other jobs running), so absolute times move by whole
factors from minute to minute. What stays meaningful is a ratio between a baseline and a candidate measured in
the same run, interleaved (baseline, candidate, baseline, ...), so a burst of outside load hits both; and the
median over repeats, so one unlucky repeat does not decide the result.

Compute benchmarks time CPU seconds of this process (`time.process_time`) with one torch thread, next to wall
seconds. With one thread CPU time is the work done, whether or not the scheduler gave the core away meanwhile;
with several OpenMP threads on oversubscribed cores, threads spin at barriers waiting for descheduled peers and
both wall and CPU time explode (a 2-thread run of the tiny cell took 112 s against 9.8 s with one thread here).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_THREADS = 1


@dataclass
class Check:
    """One line of docs/benchmarks.md: a measured value next to its goal."""

    benchmark: str
    metric: str
    value: str
    goal: str
    passed: bool | None  # None: informational, no goal

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Timings:
    """Per-repeat samples of one case (index i of every case belongs to the same interleaved round)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def set_torch_threads(threads: int) -> int:
    import torch

    torch.set_num_threads(threads)
    return torch.get_num_threads()


def interleave(
    cases: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    on_result: Callable[[str, Any], None] | None = None,
) -> dict[str, Timings]:
    """Time every case `repeats` times, one round at a time, rotating which case goes first in each round.

    Rotation keeps a case from always running right after the same neighbour (caches, allocator state, a load
    burst that happens to line up with the round). `warmup` untimed rounds pay one-off costs (oneDNN
    primitive creation, allocator growth) before anything counts. `on_result` sees each timed case's return
    value, outside the timed region.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    out = {name: Timings() for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            wall0, cpu0 = time.perf_counter(), time.process_time()
            result = cases[name]()
            cpu1, wall1 = time.process_time(), time.perf_counter()
            out[name].wall.append(wall1 - wall0)
            out[name].cpu.append(cpu1 - cpu0)
            if on_result is not None:
                on_result(name, result)
    return out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of numerator[i] / denominator[i]: each ratio compares samples taken side by side."""
    return median([n / d for n, d in zip(numerator, denominator, strict=True)])


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(torch_threads: int | None = None) -> dict[str, Any]:
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch_threads if torch_threads is not None else torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1min": round(load_average(), 2),
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_checks(title: str, checks: Sequence[Check]) -> None:
    print(f"\n== {title} ==")
    print(
        format_table(
            ["metric", "value", "goal", "result"],
            [[c.metric, c.value, c.goal, verdict(c.passed)] for c in checks],
        )
    )


def verdict(passed: bool | None) -> str:
    return "info" if passed is None else "PASS" if passed else "FAIL"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def checkout_commit() -> str | None:
    """The checkout's commit, with "+changes" when tracked files differ from it; None where there is no checkout
    (a copied working tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    if head.returncode != 0 or not commit:
        return None
    return commit + ("+changes" if dirty.returncode == 1 else "")


def save_result(path: Path, result: dict[str, Any]) -> None:
    """A benchmark's result as JSON (its checks as plain mappings, anything else not JSON as text)."""

    def plain(value: Any) -> Any:
        return value.as_dict() if isinstance(value, Check) else str(value)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, default=plain, indent=1))


def load_result(path: Path) -> dict[str, Any]:
    """What :func:`save_result` wrote, its checks as :class:`Check` again."""
    saved = json.loads(path.read_text())
    return saved | {"checks": [Check(**c) for c in saved.get("checks", [])]}
