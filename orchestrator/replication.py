"""Noise-adaptive replication: seeds only where the noise still hides the answer (the spec's `replication`).

    replication:
      seeds: [3, 8]              # every setting gets seeds 0..2 first, at most 8 in the end
      effect: 2.0                # the smallest difference that matters, in accuracy points
      budget_device_hours: 5000  # the sweep's planned GPU-hours (worker-hours on CPU) never exceed it
      metric: acc_pgd_200        # default: the strongest evaluated PGD-N
      decide: ["clean_ratio 0.0 vs 1.0", "norm mbn vs bn"]

A comparison "AXIS A vs B" pairs every two settings (grid cells without their seed) that differ only in AXIS,
A against B. Each pair is judged on `metric` with the report's statistics (orchestrator.stats: Welch's test, or
the paired t-test for BN vs BN* of the same seeds) and is

- decided when its 95 % confidence interval excludes 0 (a difference, with its sign), or lies inside
  (-effect, +effect) (no difference that matters);
- undecided when the interval still spans 0 and one of +-effect, or when a setting has fewer than 2 seeds.

After each round the sweep adds the next seed to every setting of an undecided pair that has fewer than the
maximum, in the order of the comparisons and then of the grid, as long as the planned cost of every cell so far
plus the new one stays within the budget; it stops when no pair is undecided, every such setting has the maximum,
or the budget is spent. Added cells are ordinary cells (seed is just their seed axis): same ids, same resume
(a resubmitted sweep recomputes the same decisions from the stored results and skips what finished), same report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from orchestrator.spec import AXES, Spec, SpecError

if TYPE_CHECKING:
    from orchestrator.grid import Cell
    from orchestrator.stats import Comparison as Statistics


@dataclass(frozen=True)
class Comparison:
    axis: str
    a: Any
    b: Any

    def __str__(self) -> str:
        return f"{self.axis} {self.a} vs {self.b}"


def _grid_values(spec: Spec) -> dict[str, list[Any]]:
    """Every value each axis takes in the grid (the default where an entry does not list the axis)."""
    defaults = spec.default_axes()
    values: dict[str, list[Any]] = {axis: [] for axis in AXES}
    entries: list[Any] = [*spec.grid_entries()] or [None]
    for entry in entries:
        listed = entry.axes() if entry is not None else {}
        for axis in AXES:
            for value in listed.get(axis, [defaults[axis]]):
                if value not in values[axis]:
                    values[axis].append(value)
    return values


def parse_comparison(text: str, spec: Spec) -> Comparison:
    """'AXIS A vs B', or 'A vs B' when exactly one axis has both values; SpecError naming what is wrong."""
    where = f"replication.decide: {text!r}"
    left, sep, right = text.partition(" vs ")
    words = left.split()
    if not sep or not right.strip() or len(words) not in (1, 2):
        raise SpecError(f"{where}: write 'AXIS A vs B', e.g. 'clean_ratio 0.0 vs 1.0' or 'norm mbn vs bn'")
    a, b = yaml.safe_load(words[-1]), yaml.safe_load(right.strip())
    values = _grid_values(spec)
    if len(words) == 2:
        axis = words[0]
        if axis not in AXES or axis == "seed":
            raise SpecError(f"{where}: {axis!r} is not a grid axis ({', '.join(a for a in AXES if a != 'seed')})")
    else:
        axes = [name for name in AXES if name != "seed" and a in values[name] and b in values[name]]
        if not axes:
            raise SpecError(f"{where}: no grid axis takes both {a!r} and {b!r}")
        if len(axes) > 1:
            raise SpecError(
                f"{where}: {' and '.join(axes)} both take these values; name the axis: '{axes[0]} {a} vs {b}'"
            )
        axis = axes[0]
    missing = [repr(v) for v in (a, b) if v not in values[axis]]
    if missing:
        raise SpecError(
            f"{where}: {' and '.join(missing)} not in the grid's {axis} values "
            f"({', '.join(str(v) for v in values[axis])})"
        )
    if a == b:
        raise SpecError(f"{where}: compares a setting with itself")
    return Comparison(axis, a, b)


def check(spec: Spec) -> list[str]:
    """The spec's replication section against its grid: problems as one-line messages (none when it is fine)."""
    rep = spec.replication
    if rep is None:
        return []
    problems = []
    if any("seed" in entry.axes() for entry in spec.grid_entries()):
        problems.append(
            "replication: the grid lists seeds too; leave `seed` out of the grid, replication.seeds sets them"
        )
    for text in rep.decide:
        try:
            parse_comparison(text, spec)
        except SpecError as err:
            problems.append(str(err))
    metric = rep.metric
    if metric is not None and metric != "acc_clean":
        steps = metric.removeprefix("acc_pgd_")
        if not steps.isdigit() or int(steps) not in spec.workload.eval.pgd_steps:
            evaluated = ", ".join(f"acc_pgd_{n}" for n in spec.workload.eval.pgd_steps)
            problems.append(f"replication.metric: {metric!r} is not acc_clean or one of {evaluated}")
    return problems


def metric_of(spec: Spec) -> str:
    rep = spec.replication
    if rep is not None and rep.metric:
        return rep.metric
    steps = spec.workload.eval.pgd_steps
    return f"acc_pgd_{max(steps)}" if steps else "acc_clean"


def setting_of(axes: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(axes[axis] for axis in AXES if axis != "seed")


def _with_seed(spec: Spec, cells: Sequence[Cell], seed: int) -> list[Cell]:
    from orchestrator.grid import resolve_cell

    return [resolve_cell(spec, {**cell.axes, "seed": seed}) for cell in cells]


def settings(spec: Spec) -> list[Cell]:
    """One cell per setting (the grid without seeds), at the workload's default seed, in grid order."""
    from orchestrator.grid import expand

    return expand(spec)


def _seeds_of_every_setting(spec: Spec, count: int) -> list[Cell]:
    base = settings(spec)
    return [cell for seed in range(count) for cell in _with_seed(spec, base, seed)]


def initial_cells(spec: Spec) -> list[Cell]:
    """Seeds 0..min-1 of every setting (the grid's cells when the spec has no replication section)."""
    rep = spec.replication
    return settings(spec) if rep is None else _seeds_of_every_setting(spec, rep.seeds[0])


def maximum_cells(spec: Spec) -> list[Cell]:
    """Every cell replication may add: each setting at the maximum number of seeds."""
    rep = spec.replication
    return settings(spec) if rep is None else _seeds_of_every_setting(spec, rep.seeds[1])


@dataclass(frozen=True)
class Judgement:
    comparison: Comparison
    a: tuple[Any, ...]  # the two settings
    b: tuple[Any, ...]
    statistics: Statistics
    effect: float

    @property
    def decided(self) -> bool:
        return is_decided(self.statistics, self.effect)


def is_decided(stats: Statistics, effect: float) -> bool:
    """The decision rule (see the module's docstring)."""
    if stats.test == "no variance":
        return True  # every seed identical: more seeds would repeat it
    if stats.ci_low is None or stats.ci_high is None:
        return False  # fewer than 2 seeds in a setting
    excludes_zero = stats.ci_low > 0 or stats.ci_high < 0
    inside_effect = -effect < stats.ci_low and stats.ci_high < effect
    return excludes_zero or inside_effect


def judge(spec: Spec, cells: Sequence[Cell], values: Mapping[str, float | None]) -> list[Judgement]:
    """Every pair of settings each comparison names, judged on the finished cells' `values` (cell id -> the
    metric in [0, 1]; None or missing: not finished)."""
    from orchestrator.stats import compare

    rep = spec.replication
    if rep is None:
        return []
    by_setting: dict[tuple[Any, ...], dict[int, float]] = {}
    axes_of: dict[tuple[Any, ...], dict[str, Any]] = {}
    for cell in cells:
        key = setting_of(cell.axes)
        axes_of[key] = cell.axes
        value = values.get(cell.cell_id)
        if value is not None:
            by_setting.setdefault(key, {})[cell.axes["seed"]] = 100.0 * value
    index = {axis: i for i, axis in enumerate(a for a in AXES if a != "seed")}
    judgements = []
    for text in rep.decide:
        comparison = parse_comparison(text, spec)
        position = index[comparison.axis]
        for key in axes_of:
            if key[position] != comparison.a:
                continue
            other = (*key[:position], comparison.b, *key[position + 1 :])
            if other not in axes_of:
                continue
            seeds_a, seeds_b = by_setting.get(key, {}), by_setting.get(other, {})
            paired = comparison.axis == "norm" and str(comparison.a).rstrip("*") == str(comparison.b).rstrip("*")
            if paired:
                shared = sorted(set(seeds_a) & set(seeds_b))
                statistics = compare([seeds_a[s] for s in shared], [seeds_b[s] for s in shared], paired=True)
            else:
                statistics = compare(list(seeds_a.values()), list(seeds_b.values()))
            judgements.append(Judgement(comparison, key, other, statistics, rep.effect))
    return judgements


def next_cells(
    spec: Spec,
    cells: Sequence[Cell],
    values: Mapping[str, float | None],
    cost: Mapping[str, float],
    judgements: Sequence[Judgement] | None = None,
) -> list[Cell]:
    """The next round: one more seed for each setting of an undecided pair, within the maximum and the budget.
    `cells` are all cells so far, `cost` the planned device-hours of any cell id (orchestrator.plan);
    `judgements`, where the caller has them already, are `judge(spec, cells, values)`."""
    rep = spec.replication
    if rep is None:
        return []
    seeds: dict[tuple[Any, ...], list[Cell]] = {}
    for cell in cells:
        seeds.setdefault(setting_of(cell.axes), []).append(cell)
    spent = sum(cost[cell.cell_id] for cell in cells)
    wanted: list[tuple[Any, ...]] = []
    for judgement in judge(spec, cells, values) if judgements is None else judgements:
        if judgement.decided:
            continue
        for key in (judgement.a, judgement.b):
            if key not in wanted and len(seeds[key]) < rep.seeds[1]:
                wanted.append(key)
    added: list[Cell] = []
    for key in wanted:
        template = seeds[key][0]
        (cell,) = _with_seed(spec, [template], max(c.axes["seed"] for c in seeds[key]) + 1)
        if rep.budget_device_hours is not None and spent + cost_of(spec, cell, cost) > rep.budget_device_hours:
            continue  # over budget: a cheaper setting later in the list may still fit
        spent += cost_of(spec, cell, cost)
        added.append(cell)
    return added


def cost_of(spec: Spec, cell: Cell, cost: Mapping[str, float]) -> float:
    """Planned device-hours of `cell` (from `cost`, else estimated as the plan does)."""
    if cell.cell_id in cost:
        return cost[cell.cell_id]
    from orchestrator.plan import plan_spec

    return plan_spec(spec, [cell]).cells[0].device_hours


def result_value(record: Mapping[str, Any], metric: str) -> float | None:
    """The metric of a finished cell's result.json: its main branch, or MBN's adversarial one (as the report)."""
    if record.get("status") != "finished":
        return None
    branches = record.get("branches") or {}
    branch = branches.get("main") or branches.get("mbn_adv") or {}
    value = branch.get(metric)
    return None if value is None else float(value)
