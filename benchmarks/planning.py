"""Parse, expand and plan a generated 10,000-cell spec: seconds and peak memory, in fresh subprocesses.

`python -m benchmarks.planning [--repeats 3]`

Each measurement is a fresh interpreter (`--child`), so the peak resident set (VmHWM) belongs to this one
spec and not to whatever ran before; it includes the interpreter and the imports (pydantic, PyYAML), which is
what `python -m orchestrator.sweep --plan` costs a user. A separate child runs under tracemalloc for the peak of
Python allocations alone (tracemalloc slows allocation down, so that child is not timed).

The ratio measured in the same run: a 1,000-cell spec, interleaved with the 10,000-cell one. Its time ratio
should be ~10 (linear in cells); much more would mean a quadratic step somewhere in expand or plan (the
makespan simulation is the candidate). Pass/fail uses CPU seconds of the child (single-threaded Python: equal to
wall seconds on an idle machine), because wall time on a shared machine measures the other jobs as much as this
code; wall seconds are shown beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import Check, format_table, load_average, median, paired_ratio, print_checks

NAME = "planning"
GOAL_SECONDS = 2.0
GOAL_MB = 300.0

# 10 x 5 x 10 x 4 x 5 = 10,000 distinct cells (no axis collapses: strategy stays mixture, every value differs).
AXES_10K = {
    "clean_ratio": [round(i / 10, 1) for i in range(10)],
    "norm": ["bn", "mbn", "gn", "bn*", "mbn*"],
    "pgd_steps": list(range(1, 11)),
    "depth": [18, 34, 50, 101],
    "batch_size": [256, 512, 1024, 2048, 4096],
}


def spec_text(cells: int) -> str:
    """The paper-scale study (GPU cluster, ImageNet planning defaults) with a grid of `cells` cells."""
    axes = dict(AXES_10K)
    if cells == 1_000:
        axes["pgd_steps"] = [10]
    elif cells != 10_000:
        raise ValueError("cells must be 1000 or 10000")
    grid = "\n".join(f"  {axis}: {json.dumps(values)}" for axis, values in axes.items())
    return f"""name: plan{cells}
storage: ./runs
workload:
  data: {{url: s3://bucket/imagenet}}
  model: {{depth: 50, norm: bn}}
  attack: {{steps: 30}}
  recipe: {{epochs: 110, batch_size: 4096, per_worker_batch: 32}}
grid:
{grid}
resources: {{use_gpu: true, max_workers_per_cell: 128, cluster_gpus: 128, gpus_per_node: 8}}
"""


def _maxrss_mb() -> float:
    """Peak resident set of this process image, in MB (10^6 bytes, the unit of the goal).

    VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child spawned by a big parent (run_all has torch
    loaded, ~250 MB) would report the parent's size. VmHWM belongs to the address space exec created.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6  # kibibytes
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # kibibytes on Linux


def child(path: str, trace: bool) -> dict[str, Any]:
    """Runs in the subprocess: import, then parse + expand + plan, timing each phase."""
    started = time.perf_counter()
    from orchestrator.grid import expand
    from orchestrator.plan import plan_spec
    from orchestrator.spec import parse_spec

    imported = time.perf_counter()
    text = Path(path).read_text()
    rss_before = _maxrss_mb()
    if trace:
        import tracemalloc

        tracemalloc.start()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    spec = parse_spec(text, path)
    wall1, cpu1 = time.perf_counter(), time.process_time()
    cells = expand(spec)
    wall2, cpu2 = time.perf_counter(), time.process_time()
    plan = plan_spec(spec, cells)
    wall3, cpu3 = time.perf_counter(), time.process_time()
    out: dict[str, Any] = {
        "cells": len(plan.cells),
        "import_seconds": imported - started,
        "parse": [wall1 - wall0, cpu1 - cpu0],
        "expand": [wall2 - wall1, cpu2 - cpu1],
        "plan": [wall3 - wall2, cpu3 - cpu2],
        "wall": wall3 - wall0,
        "cpu": cpu3 - cpu0,
        "maxrss_mb": _maxrss_mb(),
        "maxrss_before_mb": rss_before,
    }
    if trace:
        import tracemalloc

        out["traced_peak_mb"] = tracemalloc.get_traced_memory()[1] / 1e6
    return out


def _spawn(path: Path, trace: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.planning", "--child", str(path)] + (["--trace"] if trace else [])
    root = Path(__file__).resolve().parent.parent
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=root, env=env)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def run(repeats: int = 3) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        paths = {n: Path(tmp) / f"plan{n}.yaml" for n in (1_000, 10_000)}
        for n, path in paths.items():
            path.write_text(spec_text(n))
        load_before = load_average()
        samples: dict[int, list[dict[str, Any]]] = {n: [] for n in paths}
        _spawn(paths[1_000])  # warm the page cache for the interpreter and site-packages
        for r in range(repeats):
            order = [1_000, 10_000] if r % 2 == 0 else [10_000, 1_000]
            for n in order:
                samples[n].append(_spawn(paths[n]))
        traced = _spawn(paths[10_000], trace=True)
        load_after = load_average()

    big, small = samples[10_000], samples[1_000]
    if any(s["cells"] != 10_000 for s in big) or any(s["cells"] != 1_000 for s in small):
        raise RuntimeError(f"expected 10,000 and 1,000 cells, got {big[0]['cells']} and {small[0]['cells']}")
    cpu = median([s["cpu"] for s in big])
    wall = median([s["wall"] for s in big])
    peak = max(s["maxrss_mb"] for s in big)
    baseline = median([s["maxrss_before_mb"] for s in big])
    scaling = paired_ratio([s["cpu"] for s in big], [s["cpu"] for s in small])
    phases = {phase: median([s[phase][1] for s in big]) for phase in ("parse", "expand", "plan")}
    checks = [
        Check(
            NAME,
            "10,000 cells: parse + expand + plan (CPU s)",
            f"{cpu:.2f} s (wall {wall:.2f} s)",
            f"< {GOAL_SECONDS:g} s",
            cpu < GOAL_SECONDS,
        ),
        Check(
            NAME,
            "10,000 cells: peak RSS of the process",
            f"{peak:.0f} MB ({peak - baseline:.0f} MB above imports; traced {traced['traced_peak_mb']:.0f} MB)",
            f"< {GOAL_MB:g} MB",
            peak < GOAL_MB,
        ),
        Check(NAME, "time(10,000 cells) / time(1,000 cells)", f"{scaling:.1f}", "~10 (linear)", None),
    ]
    return {
        "name": NAME,
        "setup": {"repeats": repeats, "load_average_before_after": [round(load_before, 2), round(load_after, 2)]},
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "phase_cpu_seconds": phases,
        "import_seconds": median([s["import_seconds"] for s in big]),
        "peak_rss_mb": peak,
        "rss_after_imports_mb": baseline,
        "traced_peak_mb": traced["traced_peak_mb"],
        "cpu_seconds_1000": median([s["cpu"] for s in small]),
        "scaling_10k_over_1k": scaling,
        "checks": checks,
    }


def print_result(result: dict[str, Any]) -> None:
    phases = result["phase_cpu_seconds"]
    print(
        format_table(
            ["cells", "parse", "expand", "plan", "total CPU s", "wall s", "peak RSS MB"],
            [
                ["1,000", "", "", "", f"{result['cpu_seconds_1000']:.2f}", "", ""],
                [
                    "10,000",
                    f"{phases['parse']:.2f}",
                    f"{phases['expand']:.2f}",
                    f"{phases['plan']:.2f}",
                    f"{result['cpu_seconds']:.2f}",
                    f"{result['wall_seconds']:.2f}",
                    f"{result['peak_rss_mb']:.0f}",
                ],
            ],
        )
    )
    print(f"imports (not counted): {result['import_seconds']:.2f} s")
    print_checks(NAME, result["checks"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = child(args.child, args.trace)
        print(json.dumps(result))
        return result
    result = run(args.repeats)
    print_result(result)
    return result


if __name__ == "__main__":
    main()
