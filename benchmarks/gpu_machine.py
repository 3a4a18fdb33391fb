"""The GPU benchmarks in one run, for the time a GPU machine is at hand.

`python -m benchmarks.gpu_machine OUT`

In order, each written to `OUT/NAME.json` as soon as it is measured, so a run cut short keeps what it finished,
and its docs/benchmarks.md section printed:

1. `gpu_feed`: the input pipeline on this machine's CPUs against the GPU's demand for ResNet-50 PGD-10;
2. `gpu_throughput`: ResNet-50 and -152, PGD-10, batches 32 and 64 (the paper's per-GPU batch), fp32 and bf16;
3. `gpu_throughput_compiled`: ResNet-50 PGD-10 batch 64 with `torch.compile` (its compilation takes minutes).

`scripts/gpu_checks.sh OUT` runs the CUDA tests first, then this.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import gpu_feed, gpu_throughput
from benchmarks._common import Check

STAGES: dict[str, tuple[Callable[[], dict[str, Any]], Callable[[dict[str, Any]], str]]] = {
    "gpu_feed": (gpu_feed.run, gpu_feed.details_markdown),
    "gpu_throughput": (
        lambda: gpu_throughput.run((50, 152), (10,), (32, 64), ("fp32", "bf16")),
        gpu_throughput.details_markdown,
    ),
    "gpu_throughput_compiled": (
        lambda: gpu_throughput.run((50,), (10,), (64,), ("bf16+compile",)),
        gpu_throughput.details_markdown,
    ),
}


def _plain(value: Any) -> Any:
    return value.as_dict() if isinstance(value, Check) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_machine", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for NAME.json")
    parser.add_argument("--only", nargs="+", choices=list(STAGES), help="run only these")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (measure, details) in STAGES.items():
        if args.only and name not in args.only:
            continue
        print(f"\n### {name}", flush=True)
        started = time.perf_counter()
        result = measure()
        result["seconds"] = time.perf_counter() - started
        (args.out / f"{name}.json").write_text(json.dumps(result, default=_plain, indent=1))
        print(details(result), flush=True)
        print(f"{name}: {result['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
