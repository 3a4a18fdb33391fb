"""The placement policy replayed on the paper's study and on random mixes: makespan / lower bound, new vs old policy.

`.venv/bin/python -m benchmarks.scheduler_sim [--seeds 5] [--draws 5] [--noise 0.3]`

No Ray and no GPUs: the policy (`orchestrator.packing`, the code the Tune searcher runs; docs/design.md section 6)
is replayed on a simulated clock. new = `widest-then-longest`: widest cell first (first fit) while every pending
cell is short next to the remaining work / GPUs, then longest estimated wall time first with EASY backfilling
(a cell that does not fit gets a reservation that others may not delay), estimates rescaled by what finished
cells took. old = `largest-first` (most GPUs first, then the longest, plain first fit), the policy before it.
lpt = `lpt-easy`, the second half of the new policy alone, to show what the first half adds. Every number is
deterministic (fixed seeds); nothing here is timed.

Instances
---------
- **Paper study, spec sizes**: `sweeps/paper-study.yaml` (49 cells: all of Table 7, Figure 7's depth study for
  adversarial and clean training, Table 3's ResNet-101 run) parsed and expanded by the orchestrator and costed by
  the planner (`orchestrator.plan.make_plan`: its estimated GPU-hours, wall hours and makespan simulation), on
  128 GPUs. The spec caps a cell at 32 GPUs (a quarter of the cluster; the rest of the global batch becomes
  gradient accumulation), so the paper's batch-4096 cells take 32 GPUs and the batch-512 cell 16.
- **Paper study, deadline sizes**: the same cells, each given the fewest GPUs (a power of two, at most what the
  spec gives it) that finish it within `--deadline` hours (default 240 h = 10 days), as someone sharing the
  cluster would ask for: the standard-training, PGD-5 and ResNet-101 cells take 2-8 GPUs, PGD-10 16, the rest 32
  (ResNet-200/338/638 and the batch-512 cell cannot meet the deadline and keep their size). This is the choice
  for the issue's "heterogeneous cells of 1 to 32 GPUs" (here 2-32); deadlines of 120 h and 480 h (cells of 4-32
  and 1-32 GPUs) are reported too, so the result does not hang on one choice.
- Both paper instances at 64 and 256 GPUs as well.
- **sweeps/ablation.yaml as written**: 36 cells, almost all taking the whole 128-GPU cluster (as the paper ran
  them). No two of those overlap, so no schedule gets near max(total / GPUs, longest cell); the table shows the
  exclusion bound (`packing.exclusion_bound`: cells that pairwise cannot share the cluster run one after another),
  which both policies meet exactly.
- **Random mixes**: n cells with GPUs drawn from {1, 2, 4, 8, 16, 32} (`pow2`) or 1..32 (`any`, which fragments
  the cluster) and wall times log-uniform in [1, 100] h; n = 50 and 200; 64, 128 and 256 GPUs; `--seeds`
  instances each.

Measures
--------
Lower bound = max(total GPU-hours / GPUs, longest cell); ratio = makespan / lower bound (1.00 is optimal, and the
goal on the paper's study at 128 GPUs is <= 1.10); utilisation = total GPU-hours / (GPUs x makespan).
Robustness: the policy plans with the estimates while cells run for estimate x U(1 - noise, 1 + noise)
(`--draws` draws), or for 2x that (a cost model off by a constant factor, which the calibration absorbs); the
bound is then that of the actual durations.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import Check, format_table, markdown_table, print_checks
from orchestrator.grid import Cell, expand
from orchestrator.packing import (
    LARGEST_FIRST,
    LPT_EASY,
    WIDEST_THEN_LONGEST,
    Policy,
    exclusion_bound,
    lower_bound,
    makespan,
    simulate,
)
from orchestrator.plan import Plan, make_plan
from orchestrator.spec import Spec, load_spec

NAME = "scheduler_sim"
GOAL_RATIO = 1.10
ROOT = Path(__file__).resolve().parent.parent
PAPER_SPEC = ROOT / "sweeps" / "paper-study.yaml"
ABLATION_SPEC = ROOT / "sweeps" / "ablation.yaml"
DEADLINE_HOURS = 240.0
OTHER_DEADLINES = (120.0, 480.0)
CLUSTERS = (64, 128, 256)
MIX_KINDS = ("pow2", "any")
MIX_SIZES = (50, 200)
MIX_WALL_HOURS = (1.0, 100.0)
POLICIES: dict[str, Policy] = {"new": WIDEST_THEN_LONGEST, "old": LARGEST_FIRST, "lpt": LPT_EASY}


@dataclasses.dataclass(frozen=True)
class Instance:
    """Cells as the policy sees them: slots (GPUs) and estimated wall hours, on `capacity` GPUs."""

    name: str
    sizes: str  # e.g. '16-32 GPUs'
    slots: tuple[int, ...]
    hours: tuple[float, ...]
    capacity: int


# --- instances --------------------------------------------------------------------------------------------


def paper_cells(path: Path = PAPER_SPEC) -> tuple[Spec, list[Cell]]:
    """The spec's cells exactly as `python -m orchestrator.sweep SPEC` would run them."""
    spec = load_spec(path)
    return spec, expand(spec)


def deadline_sized(cells: Sequence[Cell], spec: Spec, deadline_hours: float) -> list[Cell]:
    """Each cell with the fewest GPUs (a power of two, at most what the spec gives it) that finish it within
    `deadline_hours` by the planner's estimate. The cost does not depend on the worker count (perfect scaling),
    so only the gang size changes; gradient accumulation would absorb the rest of the global batch."""
    plan = make_plan(cells, 10**9, spec.resources.gpus_per_node, planning=spec.planning)
    sized = []
    for cell, estimate in zip(cells, plan.cells, strict=True):
        workers = 1
        while workers < cell.num_workers and estimate.device_hours / (workers * cell.gpus_per_worker) > deadline_hours:
            workers *= 2
        workers = min(workers, cell.num_workers)
        config = cell.config.model_copy(update={"num_workers": workers})
        sized.append(dataclasses.replace(cell, config=config))
    return sized


def _plan(cells: Sequence[Cell], spec: Spec, capacity: int, policy: Policy) -> Plan:
    return make_plan(cells, capacity, spec.resources.gpus_per_node, planning=spec.planning, policy=policy)


def _sizes(slots: Sequence[int]) -> str:
    return f"{min(slots)}-{max(slots)} GPUs" if min(slots) != max(slots) else f"{slots[0]} GPUs"


def from_plan(name: str, plan: Plan) -> Instance:
    slots = tuple(p.slots for p in plan.cells)
    return Instance(name, _sizes(slots), slots, tuple(p.wall_hours for p in plan.cells), plan.capacity)


def random_mix(kind: str, cells: int, capacity: int, seed: int) -> Instance:
    """`cells` cells of 1-32 GPUs (powers of two for 'pow2', any count for 'any'), log-uniform wall hours."""
    rng = random.Random(f"{kind}-{cells}-{seed}")
    if kind == "pow2":
        slots = tuple(2 ** rng.randint(0, 5) for _ in range(cells))
    elif kind == "any":
        slots = tuple(rng.randint(1, 32) for _ in range(cells))
    else:
        raise ValueError(f"unknown mix {kind!r}")
    lo, hi = (math.log(h) for h in MIX_WALL_HOURS)
    hours = tuple(math.exp(rng.uniform(lo, hi)) for _ in range(cells))
    return Instance(f"{kind}, {cells} cells, seed {seed}", _sizes(slots), slots, hours, capacity)


# --- measures ---------------------------------------------------------------------------------------------


def schedule(instance: Instance, policy: Policy, actual: Sequence[float] | None = None) -> dict[str, float]:
    """Makespan, lower bound, ratio and utilisation of `policy` on `instance` (run for `actual` hours)."""
    hours = list(actual) if actual is not None else list(instance.hours)
    starts = simulate([{"GPU": s} for s in instance.slots], instance.hours, {"GPU": instance.capacity}, policy, hours)
    span = makespan(starts, hours)
    bound = lower_bound(instance.slots, hours, instance.capacity)
    area = sum(s * h for s, h in zip(instance.slots, hours, strict=True))
    check_schedule(instance.slots, starts, hours, instance.capacity)
    return {
        "makespan": span,
        "lower_bound": bound,
        "ratio": span / bound,
        "utilisation": area / (instance.capacity * span),
    }


def check_schedule(slots: Sequence[int], starts: Sequence[float], hours: Sequence[float], capacity: int) -> None:
    """Raise if the GPUs in use ever exceed the capacity (ends before starts at equal times)."""
    events = sorted(
        [(s + h, 0, -g) for s, h, g in zip(starts, hours, slots, strict=True)]
        + [(s, 1, g) for s, g in zip(starts, slots, strict=True)]
    )
    used = 0
    for _, _, delta in events:
        used += delta
        if used > capacity:
            raise AssertionError(f"schedule uses {used} GPUs on {capacity}")


def perturbed(hours: Sequence[float], noise: float, bias: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [h * bias * rng.uniform(1 - noise, 1 + noise) for h in hours]


def evaluate(instance: Instance, noise: float, draws: int, seed: int) -> dict[str, Any]:
    """Both policies on `instance`: exact estimates, `draws` noisy runs, and `draws` runs with a 2x bias."""
    out: dict[str, Any] = {
        "instance": instance.name,
        "sizes": instance.sizes,
        "cells": len(instance.slots),
        "capacity": instance.capacity,
        "total_gpu_hours": sum(s * h for s, h in zip(instance.slots, instance.hours, strict=True)),
        "lower_bound": lower_bound(instance.slots, instance.hours, instance.capacity),
        "exclusion_bound": exclusion_bound(instance.slots, instance.hours, instance.capacity),
    }
    for label, policy in POLICIES.items():
        exact = schedule(instance, policy)
        noisy = [
            schedule(instance, policy, perturbed(instance.hours, noise, 1.0, seed + d))["ratio"] for d in range(draws)
        ]
        biased = [
            schedule(instance, policy, perturbed(instance.hours, noise, 2.0, seed + d))["ratio"] for d in range(draws)
        ]
        out[label] = {
            **exact,
            "noisy_mean": statistics.mean(noisy),
            "noisy_worst": max(noisy),
            "biased_mean": statistics.mean(biased),
            "biased_worst": max(biased),
        }
    return out


def paper_instances(deadline_hours: float) -> tuple[list[tuple[Instance, dict[str, float]]], dict[str, Any]]:
    """The paper's study in both sizings on every cluster size, through the planner; plus ablation.yaml."""
    spec, cells = paper_cells(PAPER_SPEC)
    sizings = {"spec sizes": cells}
    for hours in (deadline_hours, *OTHER_DEADLINES):
        sizings[f"deadline {hours:g} h"] = deadline_sized(cells, spec, hours)
    out: list[tuple[Instance, dict[str, float]]] = []
    for sizing, sized in sizings.items():
        for capacity in CLUSTERS if sizing in ("spec sizes", f"deadline {deadline_hours:g} h") else (128,):
            plans = {label: _plan(sized, spec, capacity, policy) for label, policy in POLICIES.items()}
            instance = from_plan(f"paper study, {sizing}", plans["new"])
            out.append((instance, {label: plan.makespan_hours for label, plan in plans.items()}))
    ablation_spec, ablation_cells = paper_cells(ABLATION_SPEC)
    plans = {label: _plan(ablation_cells, ablation_spec, 128, p) for label, p in POLICIES.items()}
    ablation = (
        from_plan("sweeps/ablation.yaml as written", plans["new"]),
        {label: plan.makespan_hours for label, plan in plans.items()},
    )
    return out, {"instance": ablation[0], "plan_makespans": ablation[1]}


# --- the benchmark ----------------------------------------------------------------------------------------


def run(seeds: int = 5, draws: int = 5, noise: float = 0.3, deadline_hours: float = DEADLINE_HOURS) -> dict[str, Any]:
    cpu0 = time.process_time()
    paper, ablation = paper_instances(deadline_hours)
    paper_rows = []
    for instance, plan_makespans in paper:
        row = evaluate(instance, noise, draws, seed=0)
        for label, span in plan_makespans.items():  # the planner's makespan is the same simulation
            if not math.isclose(span, row[label]["makespan"], rel_tol=1e-9):
                raise RuntimeError(f"{instance.name}: plan says {span}, simulation {row[label]['makespan']}")
        paper_rows.append(row)
    ablation_row = evaluate(ablation["instance"], noise, draws, seed=0)

    mix_rows = []
    for kind in MIX_KINDS:
        for cells in MIX_SIZES:
            for capacity in CLUSTERS:
                rows = [
                    evaluate(random_mix(kind, cells, capacity, s), noise, draws, seed=100 * s) for s in range(seeds)
                ]
                summary: dict[str, Any] = {"mix": kind, "cells": cells, "capacity": capacity, "instances": seeds}
                for label in POLICIES:
                    for measure in ("ratio", "noisy_mean", "biased_mean"):
                        values = [r[label][measure] for r in rows]
                        summary[f"{label}_{measure}_mean"] = statistics.mean(values)
                        summary[f"{label}_{measure}_worst"] = max(values)
                mix_rows.append(summary)

    result: dict[str, Any] = {
        "name": NAME,
        "setup": {
            "seeds": seeds,
            "draws": draws,
            "noise": noise,
            "deadline_hours": deadline_hours,
            "goal_ratio": GOAL_RATIO,
            "mix_wall_hours": list(MIX_WALL_HOURS),
        },
        "paper": paper_rows,
        "ablation": ablation_row,
        "mixes": mix_rows,
        "cpu_seconds": time.process_time() - cpu0,
    }
    result["checks"] = summary_checks(result)
    return result


def _paper_row(result: dict[str, Any], sizing: str, capacity: int) -> dict[str, Any]:
    name = f"paper study, {sizing}"
    return next(r for r in result["paper"] if r["instance"] == name and r["capacity"] == capacity)


def summary_checks(result: dict[str, Any]) -> list[Check]:
    """The Summary lines of docs/benchmarks.md."""
    goal = f"<= {GOAL_RATIO:.2f}"
    deadline = f"deadline {result['setup']['deadline_hours']:g} h"
    noise = result["setup"]["noise"]
    checks = []
    for sizing, label in (("spec sizes", "sweeps/paper-study.yaml"), (deadline, f"cells sized for a {deadline}")):
        row = _paper_row(result, sizing, 128)
        checks.append(
            Check(
                NAME,
                f"paper study ({label}, {row['sizes']}), 128 GPUs: makespan / lower bound",
                f"{row['new']['ratio']:.3f} (old policy {row['old']['ratio']:.3f})",
                goal,
                row["new"]["ratio"] <= GOAL_RATIO,
            )
        )
    worst_noisy = max(_paper_row(result, s, 128)["new"]["noisy_worst"] for s in ("spec sizes", deadline))
    old_noisy = max(_paper_row(result, s, 128)["old"]["noisy_worst"] for s in ("spec sizes", deadline))
    checks.append(
        Check(
            NAME,
            f"paper study, 128 GPUs, durations +-{noise:.0%} off the estimates: worst ratio (both sizings)",
            f"{worst_noisy:.3f} (old policy {old_noisy:.3f})",
            goal,
            worst_noisy <= GOAL_RATIO,
        )
    )
    worst_biased = max(_paper_row(result, s, 128)["new"]["biased_worst"] for s in ("spec sizes", deadline))
    old_biased = max(_paper_row(result, s, 128)["old"]["biased_worst"] for s in ("spec sizes", deadline))
    checks.append(
        Check(
            NAME,
            f"paper study, 128 GPUs, cells take 2x their estimate (+-{noise:.0%}): worst ratio",
            f"{worst_biased:.3f} (old policy {old_biased:.3f})",
            goal,
            worst_biased <= GOAL_RATIO,
        )
    )
    others = [
        r
        for r in result["paper"]
        if r["capacity"] != 128 and r["instance"] in ("paper study, spec sizes", f"paper study, {deadline}")
    ]
    worst_other = max(others, key=lambda r: r["new"]["ratio"])
    checks.append(
        Check(
            NAME,
            "paper study on 64 and 256 GPUs (both sizings): worst ratio",
            f"{worst_other['new']['ratio']:.3f} ({worst_other['instance'].split(', ')[1]}, {worst_other['capacity']} "
            f"GPUs; old policy {worst_other['old']['ratio']:.3f})",
            goal,
            worst_other["new"]["ratio"] <= GOAL_RATIO,
        )
    )
    mixes = result["mixes"]
    worse = [m for m in mixes if m["new_ratio_mean"] > m["old_ratio_mean"] + 0.01]
    new_mean = statistics.mean(m["new_ratio_mean"] for m in mixes)
    old_mean = statistics.mean(m["old_ratio_mean"] for m in mixes)
    checks.append(
        Check(
            NAME,
            f"random mixes of 1-32-GPU cells ({len(mixes)} mixes x {result['setup']['seeds']} seeds): "
            "mixes where the new policy's mean ratio is worse than the old one's by > 0.01",
            f"{len(worse)} (mean ratio {new_mean:.3f}, old policy {old_mean:.3f})",
            "0",
            not worse,
        )
    )
    worst_mix = max(mixes, key=lambda m: m["new_ratio_worst"])
    checks.append(
        Check(
            NAME,
            "random mixes: worst ratio of any instance",
            f"{worst_mix['new_ratio_worst']:.3f} ({worst_mix['mix']}, {worst_mix['cells']} cells, "
            f"{worst_mix['capacity']} GPUs; old policy's worst there {worst_mix['old_ratio_worst']:.3f})",
            "",
            None,
        )
    )
    ablation = result["ablation"]
    checks.append(
        Check(
            NAME,
            "sweeps/ablation.yaml as written (cells of 16-128 GPUs), 128 GPUs: makespan / lower bound",
            f"{ablation['new']['ratio']:.3f} (old {ablation['old']['ratio']:.3f}); makespan / exclusion bound "
            f"{ablation['new']['makespan'] / ablation['exclusion_bound']:.3f}",
            "",
            None,
        )
    )
    return checks


def _paper_table_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in [*result["paper"], result["ablation"]]:
        rows.append(
            [
                r["instance"].removeprefix("paper study, "),
                str(r["cells"]),
                r["sizes"],
                str(r["capacity"]),
                f"{r['total_gpu_hours']:,.0f}",
                f"{r['lower_bound']:,.0f}",
                f"{r['exclusion_bound']:,.0f}",
                f"{r['new']['makespan']:,.0f}",
                f"{r['new']['ratio']:.3f}",
                f"{r['new']['utilisation']:.1%}",
                f"{r['old']['makespan']:,.0f}",
                f"{r['old']['ratio']:.3f}",
                f"{r['lpt']['ratio']:.3f}",
                f"{r['new']['noisy_mean']:.3f} / {r['new']['noisy_worst']:.3f}",
                f"{r['old']['noisy_mean']:.3f} / {r['old']['noisy_worst']:.3f}",
                f"{r['new']['biased_worst']:.3f}",
            ]
        )
    return rows


PAPER_HEADERS = [
    "instance",
    "cells",
    "cell GPUs",
    "cluster GPUs",
    "GPU-h",
    "lower bound h",
    "exclusion bound h",
    "new makespan h",
    "new ratio",
    "new util.",
    "old makespan h",
    "old ratio",
    "lpt ratio",
    "new noisy mean / worst",
    "old noisy mean / worst",
    "new 2x worst",
]
MIX_HEADERS = [
    "mix",
    "cells",
    "cluster GPUs",
    "new ratio mean / worst",
    "old ratio mean / worst",
    "lpt ratio mean / worst",
    "new noisy mean",
    "old noisy mean",
    "new 2x mean",
]


def _mix_table_rows(result: dict[str, Any]) -> list[list[str]]:
    return [
        [
            m["mix"],
            str(m["cells"]),
            str(m["capacity"]),
            f"{m['new_ratio_mean']:.3f} / {m['new_ratio_worst']:.3f}",
            f"{m['old_ratio_mean']:.3f} / {m['old_ratio_worst']:.3f}",
            f"{m['lpt_ratio_mean']:.3f} / {m['lpt_ratio_worst']:.3f}",
            f"{m['new_noisy_mean_mean']:.3f}",
            f"{m['old_noisy_mean_mean']:.3f}",
            f"{m['new_biased_mean_mean']:.3f}",
        ]
        for m in result["mixes"]
    ]


def details_markdown(result: dict[str, Any]) -> str:
    """The benchmark's section of docs/benchmarks.md (for run_all's DETAILS)."""
    s = result["setup"]
    return "\n\n".join(
        [
            "The placement policy (`orchestrator.packing`, run by the Tune searcher and by the plan) replayed on a "
            "simulated clock. new = widest cell first (first fit) while every pending cell is shorter than half "
            "the remaining work / GPUs, then longest estimated wall time first with EASY backfilling (a cell that "
            "does not fit gets a reservation; others start only if they end by then or leave it what it needs); "
            "estimates rescaled by what finished cells took. old = most GPUs first, plain first fit. lpt = the "
            "second half of the new policy alone. Lower bound "
            "= max(total GPU-hours / GPUs, longest cell); exclusion bound = cells that pairwise cannot share the "
            "cluster, one after another; ratio = makespan / lower bound; util. = GPU-hours / (GPUs x makespan). "
            f"noisy: cells run for estimate x U({1 - s['noise']:g}, {1 + s['noise']:g}), {s['draws']} draws, and "
            "the ratio is to the bound of the actual durations; 2x: the same durations times 2 (a cost model off "
            "by a constant factor): the new policy's decisions at time 0 depend only on ratios of estimates, and "
            "from the first completion on it rescales them by what finished cells took, so it schedules exactly "
            "as with the noisy durations, stretched (the old one ignores time altogether). The paper study is "
            "`sweeps/paper-study.yaml` (parse, expand, `make_plan`); 'deadline T h' gives each cell the fewest "
            "GPUs (a power of two, at most the spec's) that finish it within T hours.",
            markdown_table(PAPER_HEADERS, _paper_table_rows(result)),
            f"Random mixes: GPUs from {{1, 2, 4, ..., 32}} (pow2) or 1..32 (any), wall hours log-uniform in "
            f"[{s['mix_wall_hours'][0]:g}, {s['mix_wall_hours'][1]:g}], {s['seeds']} seeds per row.",
            markdown_table(MIX_HEADERS, _mix_table_rows(result)),
            "sweeps/ablation.yaml gives almost every cell all 128 GPUs: no two of them overlap, so its makespan "
            "is bounded by the exclusion bound, not by total / GPUs, and both policies reach that bound. "
            f"Simulation time: {result['cpu_seconds']:.1f} CPU s.",
        ]
    )


def print_result(result: dict[str, Any]) -> None:
    print(format_table(PAPER_HEADERS, _paper_table_rows(result)))
    print()
    print(format_table(MIX_HEADERS, _mix_table_rows(result)))
    print(f"\nsimulation: {result['cpu_seconds']:.1f} CPU s")
    print_checks(NAME, result["checks"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="random instances per mix")
    parser.add_argument("--draws", type=int, default=5, help="noisy runs per instance")
    parser.add_argument("--noise", type=float, default=0.3, help="actual = estimate x U(1 - noise, 1 + noise)")
    parser.add_argument("--deadline", type=float, default=DEADLINE_HOURS, help="hours, for the deadline sizing")
    args = parser.parse_args(argv)
    result = run(args.seeds, args.draws, args.noise, args.deadline)
    print_result(result)
    return result


if __name__ == "__main__":
    main()
