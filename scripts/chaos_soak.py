"""The chaos soak (tests/chaos.py): one sweep undisturbed, then under seeded incidents, with the same results.

    .venv/bin/python scripts/chaos_soak.py [--repeat N] [--seed S] [--short]

The full soak is 6 cells (3 of one worker, 3 of two DDP workers across nodes, 5 epochs each) under three driver
resubmissions as other hosts, three worker nodes SIGKILLed mid-epoch, S3 unreachable for 5 minutes and the whole
cluster replaced; `--short` (tests/test_chaos_soak.py, skipped in the suite for now) is 4 cells of 4 epochs under one of
each kind with a 130 s outage. Each of the N runs draws its schedule from seed S + run. Everything runs on 127.0.0.1: a
local multi-node Ray cluster, moto behind an outage proxy. The results go to benchmarks/results/chaos_soak.json
and the "Chaos soak" section of docs/reliability.md; the exit status is 1 when any run had a problem.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.chaos import FULL, SHORT, run_soak  # noqa: E402 - the repository root first

RESULTS = ROOT / "benchmarks" / "results" / "chaos_soak.json"
DOC = ROOT / "docs" / "reliability.md"
HEADING = "## The chaos soak"
COMMAND = ".venv/bin/python scripts/chaos_soak.py"


@dataclass(frozen=True)
class Shape:
    epochs: int
    seeds: tuple[int, ...]  # x batch sizes 32 and 64: one cell of one worker and one of two per seed
    storage_outage_s: float


FULL_SHAPE = Shape(epochs=5, seeds=(1, 2, 3), storage_outage_s=300.0)
SHORT_SHAPE = Shape(epochs=4, seeds=(1, 2), storage_outage_s=130.0)


def soak(workdir: Path, *, short: bool, seed: int, repeat: int) -> dict[str, Any]:
    shape = SHORT_SHAPE if short else FULL_SHAPE
    report = run_soak(
        workdir,
        seed=seed,
        counts=SHORT if short else FULL,
        epochs=shape.epochs,
        seeds=list(shape.seeds),
        storage_outage_s=shape.storage_outage_s,
        repeat=repeat,
    )
    summary = report.summary()
    summary["form"] = "short" if short else "full"
    summary["epochs"] = shape.epochs
    return summary


def section(data: dict[str, Any]) -> str:
    """The "Chaos soak" section of docs/reliability.md from a soak's summary."""
    reference = data["reference"]["seconds"]
    lines = [
        HEADING,
        "",
        f"`{COMMAND} --repeat {len(data['runs'])} --seed {data['seed']}"
        f"{' --short' if data['form'] == 'short' else ''}` on {data['when']} (commit {data['commit']}): "
        f"{data['cells']} cells of {data['epochs']} epochs (half of them 2-worker DDP cells spread over nodes) on a",
        "local multi-node cluster (tests/multinode.py: a head and 1-CPU worker nodes, each its own raylet), S3 a moto",
        "server behind an outage proxy, all on 127.0.0.1. The sweep ran once undisturbed, then once per row below",
        "under a schedule of incidents drawn from the seed (tests/chaos.py says what each incident does and when it",
        "fires). A run passes when every cell finishes, results.parquet equals the undisturbed run's (evaluation",
        "accuracies equal, per-epoch losses within 1e-5 relative), no epoch is reported twice, no checkpoint folder is",
        "left that Ray Train never registered, and no incident makes a cell train again an epoch it had checkpointed.",
        "",
        "| run | incidents | drivers | wall time / undisturbed | epochs lost (all incidents) | result |",
        "|---|---|---|---|---|---|",
    ]
    for run in data["runs"]:
        kinds: dict[str, int] = {}
        for incident in run["incidents"]:
            kinds[incident["kind"]] = kinds.get(incident["kind"], 0) + 1
        lost = sum(i["epochs_lost"] for i in run["incidents"])
        lines.append(
            f"| {run['run']} | {', '.join(f'{n} {k}' for k, n in kinds.items())} | {run['drivers']} | "
            f"{run['seconds'] / reference:.2f} ({run['seconds']:.0f} s vs {reference:.0f} s) | {lost:.2f} | "
            f"{'PASS' if run['passed'] else 'FAIL'} |"
        )
    lines += [
        "",
        "Each incident, in the order it fired (epochs lost: for each cell that resumed after it, the checkpointed",
        "epochs it trained again, always 0 when it passes, plus the fraction of the epoch in progress):",
        "",
        "| run | incident | after epochs | at s | lasted s | cells resumed | epochs lost | what happened |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in data["runs"]:
        for incident in run["incidents"]:
            lines.append(
                f"| {run['run']} | {incident['kind']} | {incident['after_epochs']} | {incident['fired_at_s']} | "
                f"{incident['lasted_s']} | {incident['cells_resumed']} | {incident['epochs_lost']:.2f} | "
                f"{incident['note']} |"
            )
    if data["problems"]:
        lines += ["", "Problems:", "", *(f"- {p}" for p in data["problems"])]
    return "\n".join(lines) + "\n"


def saved_section() -> str:
    """The section for the saved results, or nothing when the soak has not been run."""
    return section(json.loads(RESULTS.read_text())) if RESULTS.exists() else ""


def write_section(text: str) -> None:
    """Put the section into docs/reliability.md, in place of the one there or before "What makes these pass"."""
    document = DOC.read_text()
    if HEADING in document:
        start = document.index(HEADING)
        end = document.find("\n## ", start + len(HEADING))
        document = document[:start] + text + (document[end + 1 :] if end >= 0 else "")
    else:
        anchor = document.find("## What makes these pass")
        anchor = anchor if anchor >= 0 else len(document)
        document = document[:anchor] + text + "\n" + document[anchor:]
    DOC.write_text(document)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/chaos_soak.py", description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=2, help="runs under incidents (default 2)")
    parser.add_argument("--seed", type=int, default=1, help="the first run's schedule seed (default 1)")
    parser.add_argument("--short", action="store_true", help="the short form CI runs")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    with tempfile.TemporaryDirectory(prefix="chaos-soak-") as workdir:
        data = soak(Path(workdir), short=args.short, seed=args.seed, repeat=args.repeat)
    data["when"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    data["commit"] = commit.stdout.strip() or "unknown"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    write_section(section(data))
    print(section(data))
    return 1 if data["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
