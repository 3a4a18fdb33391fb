"""The GPU benchmarks in one run, for the time a GPU machine is at hand.

`python -m benchmarks.gpu_machine OUT [--only NAME ...]`

In order, each result written to `OUT/NAME.json` as soon as it is measured (a run cut short keeps what it
finished) and its docs/benchmarks.md section printed:

1. `gpu_feed`: the input pipeline on this machine's CPUs against the GPU's demand for ResNet-50 PGD-10;
2. `gpu_throughput`: ResNet-50 and -152, PGD-10, batches 32 (the paper's per-GPU batch) and 64, fp32 and bf16;
   then ResNet-50 batch 64 with `torch.compile`, whose compilation takes minutes, added to the same result.

Copy `OUT/*.json` into `benchmarks/gpu_results/`: on a machine without a GPU, `benchmarks.run_all` renders these
two sections from there, saying on which GPU and when they were measured. `scripts/gpu_checks.sh OUT` runs the
CUDA tests first, then this.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import gpu_feed, gpu_throughput
from benchmarks._common import checkout_commit, save_result

Save = Callable[[dict[str, Any]], None]


def _throughput(save: Save) -> dict[str, Any]:
    result = gpu_throughput.run((50, 152), (10,), (32, 64), ("fp32", "bf16"))
    if "skipped" in result:
        return result
    save(result)  # the eager rows, kept if compilation outlasts the machine
    compiled = gpu_throughput.run((50,), (10,), (64,), ("bf16+compile",))
    result["rows"] += compiled["rows"]
    result["checks"] += compiled["checks"]
    return result


STAGES: dict[str, tuple[Callable[[Save], dict[str, Any]], Callable[[dict[str, Any]], str]]] = {
    "gpu_feed": (lambda _: gpu_feed.run(), gpu_feed.details_markdown),
    "gpu_throughput": (_throughput, gpu_throughput.details_markdown),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_machine", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for NAME.json")
    parser.add_argument("--only", nargs="+", choices=list(STAGES), help="run only these")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    commit = checkout_commit()
    for name, (measure, details) in STAGES.items():
        if args.only and name not in args.only:
            continue
        print(f"\n### {name}", flush=True)
        started = time.perf_counter()
        measured_at = f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"

        def save(
            result: dict[str, Any], name: str = name, started: float = started, measured_at: str = measured_at
        ) -> None:
            result |= {"seconds": time.perf_counter() - started, "measured_at": measured_at, "commit": commit}
            save_result(args.out / f"{name}.json", result)

        result = measure(save)
        save(result)
        print(details(result), flush=True)
        print(f"{name}: {result['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
