"""Noise-adaptive replication: seeds only where the noise still hides the answer (the spec's `replication`).

    replication:
      seeds: [3, 8]              # every setting gets seeds 0..2 first, at most 8 in the end
      effect: 2.0                # the smallest difference that matters, in accuracy points
      budget_device_hours: 5000  # the sweep's planned GPU-hours (worker-hours on CPU) never exceed it
      metric: acc_pgd_200        # default: the strongest evaluated PGD-N
      decide: ["clean_ratio 0.0 vs 1.0", "norm mbn vs bn"]

A comparison "AXIS A vs B" pairs every two settings (grid cells without their seed) that differ only in AXIS,
A against B. Each pair is judged on `metric` with the report's statistics (orchestrator.stats): the paired t-test
on the per-seed differences where the two settings share seeds and a training prefix (BN* vs BN), Welch's test
otherwise. A look at a pair uses the same number n of seeds of both settings (the first n of each), and is

- decided when its confidence interval excludes 0 (a difference, with its sign), or lies inside
  (-effect, +effect) (no difference that matters), or every seed's difference is the same (no variance);
- undecided when the interval still spans 0 and one of +-effect, or when n is below the minimum.

Optional stopping: a pair is looked at again after every round, and stopping at the first look whose 95 %
interval decides would make wrong decisions more often than 5 % of the time. Each look's interval is therefore
at level 1 - 0.05 / K, K = max - min + 1 the most looks a pair can have (n = min .. max; Bonferroni): for seeds
[2, 5] a 98.75 % interval. Whenever the pair stops, the chance that any of its looks missed the true difference,
and so that a decision is wrong, is at most 5 % (per comparison, as the report's own tests).

Futility: from 3 seeds on, an undecided pair whose conditional power (the chance of being decided at the
maximum number of seeds if the true difference and spread are the current estimates) is below 20 % gets no more
seeds. This can only leave a pair undecided, never decide one, so it costs no error rate, only the occasional
decision that more seeds would have reached.

After each round the sweep adds the next seed to the setting with fewer seeds (both when equal) of every pair
that is undecided, not futile and below the maximum, in the order of the comparisons and then of the grid, as long
as the planned cost of every cell so far plus the new one stays within the budget; settings whose pairs are all
decided or futile get none. It stops when no pair wants seeds or the budget is spent. Added cells are ordinary
cells (seed is just their seed axis): same ids, same resume (a resubmitted sweep recomputes the same decisions
from the stored results and skips what finished), same report (which judges every seed at 95 %, as a fixed
design).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from orchestrator.axes import AXES
from orchestrator.spec import Spec, SpecError
from workloads import metrics

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
    if metric is not None and metric != metrics.CLEAN and metrics.pgd_steps(metric) not in spec.workload.eval.pgd_steps:
        evaluated = ", ".join(metrics.pgd_metric(n) for n in spec.workload.eval.pgd_steps)
        problems.append(f"replication.metric: {metric!r} is not {metrics.CLEAN} or one of {evaluated}")
    return problems


def metric_of(spec: Spec) -> str:
    rep = spec.replication
    if rep is not None and rep.metric:
        return rep.metric
    steps = spec.workload.eval.pgd_steps
    return metrics.pgd_metric(max(steps)) if steps else metrics.CLEAN


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


# Conditional power below which a comparison is given up as futile (Lan, Simon & Halperin 1982; 10-20 % is the
# usual range for a futility boundary, the upper end saves more seeds and still stops only hopeless comparisons).
FUTILE_BELOW = 0.20
# The spread of a setting is estimated from its seeds: with 2 seeds (1 degree of freedom) it is too rough to
# predict anything from, so futility is judged from 3 seeds on.
FUTILITY_FROM = 3


def look_alpha(spec: Spec) -> float:
    """The two-sided error rate of each look's confidence interval: 0.05 split evenly (Bonferroni) over the most
    looks a comparison can have, one per number of seeds from the minimum to the maximum. Whichever look a
    comparison stops at, the chance that any of its intervals missed the true difference is at most 0.05, the
    guard against the optional stopping of looking again after every round."""
    from orchestrator.stats import ALPHA

    rep = spec.replication
    if rep is None:
        return ALPHA
    return ALPHA / (rep.seeds[1] - rep.seeds[0] + 1)


@dataclass(frozen=True)
class Judgement:
    comparison: Comparison
    a: tuple[Any, ...]  # the two settings
    b: tuple[Any, ...]
    statistics: Statistics
    effect: float
    seeds: int  # the look: the number of seeds of each setting the statistics are on
    minimum: int  # replication.seeds
    maximum: int

    @property
    def decided(self) -> bool:
        return self.seeds >= self.minimum and is_decided(self.statistics, self.effect)

    @property
    def futile(self) -> bool:
        """Undecided, and unlikely to be decided even at the maximum number of seeds (conditional power below
        FUTILE_BELOW): more seeds would probably be spent for no answer."""
        if self.decided or not FUTILITY_FROM <= self.seeds < self.maximum:
            return False
        power = conditional_power(self.statistics, self.effect, self.maximum)
        return power is not None and power < FUTILE_BELOW

    @property
    def wants_seeds(self) -> bool:
        return not self.decided and not self.futile and self.seeds < self.maximum


def is_decided(stats: Statistics, effect: float) -> bool:
    """The decision rule (see the module's docstring) on one look's statistics."""
    if stats.test == "no variance":
        return True  # every seed identical: more seeds would repeat it
    if stats.ci_low is None or stats.ci_high is None:
        return False  # fewer than 2 seeds in a setting
    excludes_zero = stats.ci_low > 0 or stats.ci_high < 0
    inside_effect = -effect < stats.ci_low and stats.ci_high < effect
    return excludes_zero or inside_effect


def conditional_power(stats: Statistics, effect: float, maximum: int) -> float | None:
    """The chance that the comparison is decided at `maximum` seeds per setting if the true difference and the
    per-seed spread are what the `stats` of the current look (n seeds per setting, balanced) estimate: the
    difference at the maximum is then normal around the current one with variance v (max - n) / max^2 (v: the
    variance of one seed's difference, se^2 n), and its interval is +-t se_max at the same level, on the
    degrees of freedom the same spread gives at the maximum. None without a test."""
    from scipy import stats as scipy_stats

    if stats.se is None or stats.df is None or stats.se == 0.0:
        return None
    n = stats.n_a
    per_seed = stats.se**2 * n
    df = maximum - 1.0 if stats.test == "paired t" else stats.df * (maximum - 1) / (n - 1)
    half = float(scipy_stats.t.ppf(1 - stats.alpha / 2, df)) * (per_seed / maximum) ** 0.5
    if 2 * half <= effect:
        return 1.0  # an interval this narrow excludes 0 or fits inside +-effect wherever it lies
    spread = (per_seed * (maximum - n)) ** 0.5 / maximum
    final = scipy_stats.norm(stats.delta, spread)
    excludes_zero = float(final.sf(half) + final.cdf(-half))
    # The two ways to be decided are disjoint now: |difference| > half, or < effect - half (< half).
    inside_effect = float(final.cdf(effect - half) - final.cdf(half - effect)) if half < effect else 0.0
    return excludes_zero + inside_effect


def is_paired(comparison: Comparison) -> bool:
    """BN* is BN trained with running statistics in its last epochs (the paper's section 4.3, Table 2): BN* and BN
    of one seed train identically until then, so their difference is taken per seed."""
    return comparison.axis == "norm" and str(comparison.a).rstrip("*") == str(comparison.b).rstrip("*")


def judge(
    spec: Spec, cells: Sequence[Cell], values: Mapping[str, float | None], alpha: float | None = None
) -> list[Judgement]:
    """Every pair of settings each comparison names, judged on the finished cells' `values` (cell id -> the
    metric in [0, 1]; None or missing: not finished) at `alpha` (default: the per-look level, look_alpha).

    A pair is judged on the same number n of seeds of both settings, the first n finished of each (the paired test:
    the first n seeds both finished), n as many as the setting with fewer has: every look is then one of the
    looks at n = minimum .. maximum that look_alpha splits the error rate over, however many seeds another
    comparison has given one of the two settings."""
    from orchestrator.stats import compare

    rep = spec.replication
    if rep is None:
        return []
    level = look_alpha(spec) if alpha is None else alpha
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
            if is_paired(comparison):
                shared = sorted(set(seeds_a) & set(seeds_b))
                statistics = compare(
                    [seeds_a[s] for s in shared], [seeds_b[s] for s in shared], paired=True, alpha=level
                )
            else:
                n = min(len(seeds_a), len(seeds_b))
                first_a, first_b = sorted(seeds_a)[:n], sorted(seeds_b)[:n]
                statistics = compare([seeds_a[s] for s in first_a], [seeds_b[s] for s in first_b], alpha=level)
            judgements.append(
                Judgement(comparison, key, other, statistics, rep.effect, statistics.n_a, rep.seeds[0], rep.seeds[1])
            )
    return judgements


def next_cells(
    spec: Spec,
    cells: Sequence[Cell],
    values: Mapping[str, float | None],
    cost: Mapping[str, float],
    judgements: Sequence[Judgement] | None = None,
) -> list[Cell]:
    """The next round: one more seed for the setting (or both) with fewer seeds of each pair that wants seeds
    (undecided, not futile, below the maximum), within the maximum and the budget. `cells` are all cells so far,
    `cost` the planned device-hours of any cell id (orchestrator.plan); `judgements`, where the caller has them
    already, are `judge(spec, cells, values)`."""
    rep = spec.replication
    if rep is None:
        return []
    seeds: dict[tuple[Any, ...], list[Cell]] = {}
    for cell in cells:
        seeds.setdefault(setting_of(cell.axes), []).append(cell)
    spent = sum(cost[cell.cell_id] for cell in cells)
    wanted: list[tuple[Any, ...]] = []
    for judgement in judge(spec, cells, values) if judgements is None else judgements:
        if not judgement.wants_seeds:
            continue
        # The pair's next look needs a seed more of each setting it has the fewer of; a seed more of the other
        # would not change the look.
        fewer = min(len(seeds[judgement.a]), len(seeds[judgement.b]))
        for key in (judgement.a, judgement.b):
            if key not in wanted and len(seeds[key]) == fewer < rep.seeds[1]:
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
