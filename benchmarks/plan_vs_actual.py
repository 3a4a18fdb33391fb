"""How honest `--plan` is on CPU: the plan's makespan of a sweep against the wall time of running it.

`python -m benchmarks.plan_vs_actual [--specs sweeps/tiny.yaml sweeps/smoke.yaml ...]`

Each spec is planned (`orchestrator.plan.plan_spec`, as `--plan` prints it, on this machine's CPUs) and then run
exactly as a user runs it, `python -m orchestrator.sweep SPEC --storage TMP` in a fresh process with a fresh local
Ray, into an empty temporary storage, so that nothing is skipped. Ratio = actual wall time / planned makespan;
the goal is 0.7-1.3 (within +-30 %). The plan's inputs for these CPU sweeps (planning.relative_speed, the start-up
overheads cell_overhead_s and sweep_overhead_s) are in each spec; this benchmark is what they are checked against.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import Check, format_table, load_average, markdown_table, print_checks
from orchestrator.grid import expand
from orchestrator.plan import plan_spec
from orchestrator.spec import load_spec

NAME = "plan_vs_actual"
ROOT = Path(__file__).resolve().parent.parent
SPECS = ("sweeps/tiny.yaml", "sweeps/smoke.yaml", "sweeps/digits-strong-width.yaml")
GOAL_LOW, GOAL_HIGH = 0.7, 1.3
COMMAND_TIMEOUT = 3600


def measure(spec_path: str) -> dict[str, Any]:
    spec = load_spec(ROOT / spec_path)
    cells = expand(spec)
    planned = plan_spec(spec, cells).makespan_hours * 3600
    storage = Path(tempfile.mkdtemp(prefix="plan-vs-actual-"))
    try:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator.sweep", spec_path, "--storage", str(storage)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        actual = time.monotonic() - started
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec_path}: the sweep exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    log = Path(tempfile.gettempdir()) / f"{NAME}-{Path(spec_path).stem}.log"
    log.write_text(proc.stdout + proc.stderr)  # what a user would have read
    print(f"{spec_path}: {actual / 60:.1f} min (planned {planned / 60:.1f}); its output in {log}", flush=True)
    return {"spec": spec_path, "cells": len(cells), "planned_seconds": planned, "actual_seconds": actual}


def run(specs: tuple[str, ...] = SPECS) -> dict[str, Any]:
    load_before = load_average()
    rows = [measure(spec) for spec in specs]
    checks = []
    for row in rows:
        row["ratio"] = row["actual_seconds"] / row["planned_seconds"]
        checks.append(
            Check(
                NAME,
                f"{row['spec']}: actual / planned wall time",
                f"{row['ratio']:.2f} ({row['actual_seconds'] / 60:.1f} / {row['planned_seconds'] / 60:.1f} min)",
                f"{GOAL_LOW:g}-{GOAL_HIGH:g}",
                GOAL_LOW <= row["ratio"] <= GOAL_HIGH,
            )
        )
    return {"name": NAME, "rows": rows, "load_before": load_before, "load_after": load_average(), "checks": checks}


HEADERS = ["spec", "cells", "planned min", "actual min", "actual / planned"]


def _rows(result: dict[str, Any]) -> list[list[Any]]:
    return [
        [
            r["spec"],
            r["cells"],
            f"{r['planned_seconds'] / 60:.1f}",
            f"{r['actual_seconds'] / 60:.1f}",
            f"{r['ratio']:.2f}",
        ]
        for r in result["rows"]
    ]


def print_result(result: dict[str, Any]) -> None:
    print(format_table(HEADERS, _rows(result)))
    print(f"1-min load average before / after: {result['load_before']:.2f} / {result['load_after']:.2f}")
    print_checks(NAME, result["checks"])


def details_markdown(result: dict[str, Any]) -> str:
    return "\n\n".join(
        [
            "Each sweep planned as `--plan` plans it on this machine, then run as a user runs it "
            "(`python -m orchestrator.sweep SPEC --storage EMPTY_TMP`, a fresh local Ray each). Goal: actual / "
            f"planned within {GOAL_LOW:g}-{GOAL_HIGH:g}.",
            markdown_table(HEADERS, _rows(result)),
            f"1-min load average before / after: {result['load_before']:.2f} / {result['load_after']:.2f}.",
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("--specs", nargs="+", default=list(SPECS), help="sweep files to plan and run")
    args = parser.parse_args(argv)
    result = run(tuple(args.specs))
    print_result(result)
    return result


if __name__ == "__main__":
    main()
