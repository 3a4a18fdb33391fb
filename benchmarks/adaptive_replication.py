"""Noise-adaptive replication replayed on committed digits studies: the same verdicts with fewer cells?

`python -m benchmarks.adaptive_replication`

The weak-gap and strong-gap digits studies (docs/results/digits-weak-gap, -strong-gap; sweeps/*.yaml) trained
five seeds of three settings: BN at 0 % and at 100 % clean, and BN* at 0 % clean. For each study and each metric
(clean accuracy, PGD-200 accuracy) the replay gives the rule of orchestrator.replication the spec section

    replication: {seeds: [2, 5], effect: 5, metric: M, decide: ["clean_ratio 0.0 vs 1.0", "norm bn* vs bn"]}

and answers its requests from the study's own results: a cell the rule asks for is "trained" by reading that
seed's stored result, so the rule sees exactly what it would have seen had it run the study. Fixed replication is
all five seeds, judged once at 95 % as a fixed design is; the rule judges each look at its Bonferroni level
(98.75 % for up to 4 looks, orchestrator.replication.look_alpha), so a verdict that fixed 5 seeds reach only
narrowly at 95 % it cannot reach at all: the price of looking more than once. The table also shows fixed 5 seeds
at the rule's level, which separates that price from what stopping early loses. Verdict of a pair, the answer to
the rule's question: "|a - b| < 5" (the CI lies inside +-5 points, whether or not it excludes 0), else "a > b" /
"a < b" (the CI excludes 0), else "undecided" (also when the rule gave it up as futile). CPU-hours are the stored
training seconds of the cells each uses. The goal: the same verdicts as fixed 5 seeds with at most 60 % of its
cells.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from benchmarks._common import Check, format_table, markdown_table, print_checks
from orchestrator import replication
from orchestrator.grid import Cell
from orchestrator.plan import plan_spec
from orchestrator.spec import Spec, parse_spec
from orchestrator.stats import ALPHA

NAME = "adaptive_replication"
ROOT = Path(__file__).resolve().parent.parent
STUDIES = ("digits-weak-gap", "digits-strong-gap")
METRICS = ("acc_clean", "acc_pgd_200")
DECIDE = ["clean_ratio 0.0 vs 1.0", "norm bn* vs bn"]
EFFECT = 5.0
SEEDS = (2, 5)
GOAL_CELL_SHARE = 0.60


def replay_spec(study: str, metric: str) -> Spec:
    """The study's sweep file, its grid narrowed to the 5-seed settings and without seeds, plus replication."""
    document = yaml.safe_load((ROOT / "sweeps" / f"{study}.yaml").read_text())
    document["grid"] = [{"clean_ratio": [0.0, 1.0]}, {"norm": ["bn*"], "clean_ratio": [0.0]}]
    document["replication"] = {"seeds": list(SEEDS), "effect": EFFECT, "metric": metric, "decide": DECIDE}
    return parse_spec(yaml.safe_dump(document), f"{study} (replay)")


def verdict(judgement: replication.Judgement) -> str:
    """The answer to the question the rule asks: a difference that may matter, with its sign; none that matters;
    or no answer yet. A CI inside +-effect answers "none that matters" even where it also excludes 0; without a
    CI (every seed's difference the same) the difference itself answers."""
    stats = judgement.statistics
    if not judgement.decided:
        return "undecided"
    low, high = stats.ci_low, stats.ci_high
    if low is None or high is None:
        low = high = stats.delta
    if low > -EFFECT and high < EFFECT:
        return f"|a - b| < {EFFECT:g}"
    return "a > b" if low > 0 else "a < b"


def replay(study: str, metric: str) -> dict[str, Any]:
    spec = replay_spec(study, metric)
    rows = pq.read_table(ROOT / "docs" / "results" / study / "results.parquet").to_pylist()
    stored = {r["cell_id"]: r for r in rows if r["branch"] == "main" and r["status"] == "finished"}
    everything = replication.maximum_cells(spec)
    missing = [c.cell_id for c in everything if c.cell_id not in stored]
    if missing:
        raise RuntimeError(f"{study}: cells {missing} of the replay are not in the committed results (ids changed?)")
    values = {c.cell_id: float(stored[c.cell_id][metric]) for c in everything}
    cost = {p.cell_id: p.device_hours for p in plan_spec(spec, everything).cells}

    cells: list[Cell] = replication.initial_cells(spec)
    rounds = 1
    while True:
        more = replication.next_cells(spec, cells, values, cost)
        if not more:
            break
        cells += more
        rounds += 1
    fixed = {
        (str(j.comparison), j.a, j.b): verdict(j) for j in replication.judge(spec, everything, values, alpha=ALPHA)
    }
    fixed_at_level = {(str(j.comparison), j.a, j.b): verdict(j) for j in replication.judge(spec, everything, values)}
    adaptive = {(str(j.comparison), j.a, j.b): verdict(j) for j in replication.judge(spec, cells, values)}
    hours = {c.cell_id: float(stored[c.cell_id]["train_seconds"]) / 3600 for c in everything}
    return {
        "study": study,
        "metric": metric,
        "rounds": rounds,
        "fixed_cells": len(everything),
        "adaptive_cells": len(cells),
        "fixed_cpu_hours": sum(hours.values()),
        "adaptive_cpu_hours": sum(hours[c.cell_id] for c in cells),
        "level": 1 - replication.look_alpha(spec),
        "pairs": [
            {
                "comparison": key[0],
                "fixed": fixed[key],
                "fixed_at_level": fixed_at_level[key],
                "adaptive": adaptive[key],
            }
            for key in sorted(fixed)
        ],
    }


def run() -> dict[str, Any]:
    replays = [replay(study, metric) for study in STUDIES for metric in METRICS]
    fixed_cells = sum(r["fixed_cells"] for r in replays)
    adaptive_cells = sum(r["adaptive_cells"] for r in replays)
    pairs = [p for r in replays for p in r["pairs"]]
    same = sum(p["fixed"] == p["adaptive"] for p in pairs)
    same_at_level = sum(p["fixed_at_level"] == p["adaptive"] for p in pairs)
    level = f"{100 * replays[0]['level']:g} %"
    share = adaptive_cells / fixed_cells
    checks = [
        Check(NAME, "verdicts equal to fixed 5 seeds", f"{same} of {len(pairs)}", "all", same == len(pairs)),
        Check(
            NAME,
            f"verdicts equal to fixed 5 seeds judged at the rule's {level} CI",
            f"{same_at_level} of {len(pairs)}",
            "all",
            same_at_level == len(pairs),
        ),
        Check(
            NAME,
            "cells, adaptive / fixed 5 seeds",
            f"{share:.2f} ({adaptive_cells} / {fixed_cells})",
            f"<= {GOAL_CELL_SHARE:.2f}",
            share <= GOAL_CELL_SHARE,
        ),
    ]
    return {"name": NAME, "replays": replays, "checks": checks}


def _rows(result: dict[str, Any]) -> list[list[Any]]:
    return [
        [
            r["study"],
            r["metric"],
            p["comparison"],
            p["fixed"],
            p["fixed_at_level"],
            p["adaptive"],
            f"{r['adaptive_cells']} / {r['fixed_cells']}",
            f"{r['adaptive_cpu_hours']:.2f} / {r['fixed_cpu_hours']:.2f}",
        ]
        for r in result["replays"]
        for p in r["pairs"]
    ]


HEADERS = [
    "study",
    "metric",
    "comparison",
    "fixed 5 seeds (95 % CI)",
    "fixed 5 seeds (rule's CI)",
    "adaptive",
    "cells (adaptive / fixed)",
    "CPU-h",
]


def print_result(result: dict[str, Any]) -> None:
    print(format_table(HEADERS, _rows(result)))
    print_checks(NAME, result["checks"])


def details_markdown(result: dict[str, Any]) -> str:
    return "\n\n".join(
        [
            f"The rule of `orchestrator.replication` (seeds [{SEEDS[0]}, {SEEDS[1]}], effect {EFFECT:g} points, "
            f"decide {', '.join(DECIDE)}) replayed on the committed weak-gap and strong-gap digits studies, each "
            "request answered from the study's stored result of that seed; fixed replication is all five seeds. "
            f"The rule judges each look at a {100 * result['replays'][0]['level']:g} % CI (0.05 split over its "
            "up to 4 looks, the guard against optional stopping) and gives up comparisons with conditional power "
            "below 20 % (futility); fixed 5 seeds are judged once, at 95 % and at the rule's level. A verdict "
            "fixed 5 seeds reach only at 95 % is lost to the guard, not to stopping early. "
            "CPU-hours: stored training seconds of the cells used.",
            markdown_table(HEADERS, _rows(result)),
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0]).parse_args(argv)
    result = run()
    print_result(result)
    return result


if __name__ == "__main__":
    main()
