"""The report's tables: settings (a cell's axes without the seed) with their per-seed values, one table per factor
the grid varies, laid out like the paper's, each followed by its comparisons with the reference row; every
setting (Table 7); every cell and branch.

Every comparison goes through `orchestrator.stats.compare`: Welch's t-test between independent seeds, the paired
t-test where two settings share seeds and a training prefix (BN and BN* of one seed; the two MBN branches of one
network). Each is judged against the paper's finding for that pair (`orchestrator.paper.expected`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.paper import PAPER, SETTING_FIELDS, Finding, SettingKey, expected
from orchestrator.stats import Comparison, binomial_se, compare
from workloads import metrics as metric_names

MIN_SEEDS = 2

# ----------------------------------------------------------------------------------------------------------------
# Settings: the finished values of one setting over its seeds


@dataclass(frozen=True)
class Stat:
    n: int
    mean: float
    std: float | None  # sample standard deviation (ddof 1); None when n < 2


def stat(values: Sequence[float]) -> Stat | None:
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n >= MIN_SEEDS else None
    return Stat(n, mean, std)


@dataclass(frozen=True)
class Sample:
    seed: int
    cell_id: str
    value: float


@dataclass
class Setting:
    key: SettingKey
    samples: dict[str, list[Sample]] = field(default_factory=dict)  # metric -> one per finished cell
    cells: set[str] = field(default_factory=set)  # finished cells (one per seed, unless the spec changed)
    failed: int = 0
    missing: int = 0

    @property
    def n(self) -> int:
        return len(self.cells)

    def values(self, metric: str) -> list[float]:
        return [s.value for s in self.samples.get(metric, [])]

    def by_seed(self, metric: str) -> dict[int, float]:
        """Seed -> value; a seed with two cells (the spec changed under a running sweep) keeps neither, as neither
        pairs unambiguously."""
        seeds = [s.seed for s in self.samples.get(metric, [])]
        return {s.seed: s.value for s in self.samples.get(metric, []) if seeds.count(s.seed) == 1}

    def stat(self, metric: str) -> Stat | None:
        return stat(self.values(metric))

    def notes(self) -> str:
        parts = [f"{self.failed} failed"] if self.failed else []
        parts += [f"{self.missing} missing"] if self.missing else []
        return ", ".join(parts)


def _branches(norm: str, branch: str | None) -> list[str]:
    """A missing or failed MBN cell stands for both of its evaluation branches."""
    if branch and branch != "main":
        return [branch]
    return ["mbn_adv", "mbn_clean"] if norm.rstrip("*") == "mbn" else ["main"]


def setting_key(axes: dict[str, Any], branch: str) -> SettingKey:
    return SettingKey(
        depth=int(axes["depth"]),
        batch_size=int(axes["batch_size"]),
        pgd_steps=int(axes["pgd_steps"]),
        strategy=str(axes["strategy"]),
        clean_ratio=round(float(axes["clean_ratio"]), 6),
        norm=str(axes["norm"]),
        branch=branch,
    )


def pgd_metrics(rows: Iterable[dict[str, Any]]) -> list[str]:
    return metric_names.pgd_metrics(k for row in rows for k, v in row.items() if v is not None)


def build_settings(
    rows: list[dict[str, Any]], missing: list[dict[str, Any]], metrics: list[str]
) -> dict[SettingKey, Setting]:
    settings: dict[SettingKey, Setting] = {}

    def get(key: SettingKey) -> Setting:
        return settings.setdefault(key, Setting(key))

    for row in rows:
        if row.get("status") == "finished":
            setting = get(setting_key(row, row.get("branch") or "main"))
            setting.cells.add(str(row["cell_id"]))
            for metric in metrics:
                value = row.get(metric)
                if value is not None and not (isinstance(value, float) and math.isnan(value)):
                    sample = Sample(int(row["seed"]), str(row["cell_id"]), float(value))
                    setting.samples.setdefault(metric, []).append(sample)
        else:
            for branch in _branches(row["norm"], row.get("branch")):
                get(setting_key(row, branch)).failed += 1
    for axes in missing:
        for branch in _branches(axes["norm"], None):
            get(setting_key(axes, branch)).missing += 1
    return settings


# ----------------------------------------------------------------------------------------------------------------
# Labels in the paper's words


def _pct(ratio: float) -> str:
    return f"{100 * ratio:g}"


def setting_label(key: SettingKey) -> str:
    """The paper's name of a setting, e.g. 'MBN_adv, 100% adv + 100% clean, ALP*' (Table 7's 'setting')."""
    if key.strategy == "standard":
        base = "0% adv + 100% clean"
    else:
        base = f"100% adv + {_pct(key.clean_ratio)}% clean" + (", ALP" if key.strategy == "alp" else "")
    prefix = {"mbn_adv": "MBN_adv, ", "mbn_clean": "MBN_clean, "}.get(key.branch, "")
    if key.base_norm == "gn":
        prefix = "GN, "
    elif key.base_norm == "mbn" and not prefix:
        prefix = "MBN, "
    return prefix + base + ("*" if key.star else "")


def context_label(key: SettingKey, defaults: SettingKey | None) -> str:
    """'ResNet-338 · batch 512 · PGD-10 training': the parts of a setting beyond its paper label."""
    parts = []
    if defaults is None or key.depth != defaults.depth:
        parts.append(f"ResNet-{key.depth}")
    if defaults is None or key.batch_size != defaults.batch_size:
        parts.append(f"batch {key.batch_size}")
    if key.strategy != "standard" and (defaults is None or key.pgd_steps != defaults.pgd_steps):
        parts.append(f"PGD-{key.pgd_steps} training")
    return " · ".join(parts)


def full_label(key: SettingKey, defaults: SettingKey | None) -> str:
    context = context_label(key, defaults)
    return setting_label(key) + (f" ({context})" if context else "")


def metric_header(metric: str) -> str:
    return metric_names.metric_label(metric)


def md(text: str) -> str:
    """Text for a Markdown table cell: '*' (BN*) and '|' would otherwise be read as markup."""
    return text.replace("|", "\\|").replace("*", "\\*")


def _fmt(s: Stat | None, n_images: int | None = None) -> str:
    """Mean ± sample sd over seeds; for a single seed, ± the binomial error of its evaluation subset."""
    if s is None:
        return "—"
    text = f"{100 * s.mean:.1f}"
    if s.std is not None:
        return text + f" ± {100 * s.std:.1f}"
    return text + (f" (binomial ± {100 * binomial_se(s.mean, n_images):.1f})" if n_images else "")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Factor tables: one per factor the grid varies


Level = Any
Fixed = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Factor:
    title: str
    header: str  # first column's header
    what: str  # for the "grid lacks" note
    level: Callable[[SettingKey], Level | None]  # None: the setting takes no part in this table
    label: Callable[[SettingKey], str]
    varied: tuple[str, ...]  # SettingKey fields the level stands for; the rest are held fixed
    reference: Callable[[SettingKey], Level] | None = None  # the reference level, from the spec's defaults
    # Settings without a level of their own that join every group they match on these fields (standard training
    # in the strategy table: it has no clean ratio or PGD-N to hold fixed).
    join: Callable[[SettingKey], tuple[str, ...] | None] = lambda key: None


def _fixed(key: SettingKey, varied: Sequence[str]) -> Fixed:
    return tuple((name, getattr(key, name)) for name in SETTING_FIELDS if name not in varied)


def adversarial(key: SettingKey) -> bool:
    return key.strategy != "standard"


_NORM_ORDER = {("bn", "main"): 0, ("mbn", "mbn_adv"): 1, ("mbn", "mbn_clean"): 2, ("gn", "main"): 3}
_NORM_LABEL = {0: "BN", 1: "MBN_adv", 2: "MBN_clean", 3: "GN"}
_STRATEGY_ORDER = {"mixture": 0, "alp": 1, "standard": 2}


FACTORS: tuple[Factor, ...] = (
    Factor(
        title="Clean ratio (Figure 1)",
        header="clean images kept",
        what="clean_ratio",
        level=lambda k: k.clean_ratio if adversarial(k) else None,
        label=setting_label,
        varied=("clean_ratio",),
        reference=lambda d: d.clean_ratio,
    ),
    Factor(
        title="Training strategy (Figure 2: mixture, ALP, standard training)",
        header="strategy",
        what="strategy",
        level=lambda k: _STRATEGY_ORDER[k.strategy] if adversarial(k) else None,
        label=setting_label,
        varied=("strategy",),
        reference=lambda d: _STRATEGY_ORDER.get(d.strategy),
        join=lambda k: None if adversarial(k) else ("depth", "batch_size", "norm", "branch"),
    ),
    Factor(
        title="Normalisation (Table 1: BN vs MBN_adv vs MBN_clean; GN, Section 4.2)",
        header="normalisation",
        what="norm (bn / mbn / gn)",
        level=lambda k: None if k.star else _NORM_ORDER.get((k.norm, k.branch)),
        label=lambda k: _NORM_LABEL[_NORM_ORDER[(k.norm, k.branch)]],
        varied=("norm", "branch"),
        reference=lambda d: 0,
    ),
    Factor(
        title="Running statistics in training: BN* vs BN (Tables 2 and 5)",
        header="setting",
        what="norm with and without * (bn vs bn*, mbn vs mbn*)",
        level=lambda k: k.star if k.base_norm in ("bn", "mbn") else None,
        label=setting_label,
        varied=("norm",),
        reference=lambda d: False,
    ),
    Factor(
        title="PGD-N for training (Table 4)",
        header="training attack",
        what="pgd_steps",
        level=lambda k: k.pgd_steps if adversarial(k) else None,
        label=lambda k: f"PGD-{k.pgd_steps}",
        varied=("pgd_steps",),
        reference=lambda d: d.pgd_steps,
    ),
    Factor(
        title="Batch size (Table 6)",
        header="batch size",
        what="batch_size",
        level=lambda k: k.batch_size,
        label=lambda k: str(k.batch_size),
        varied=("batch_size",),
        reference=lambda d: d.batch_size,
    ),
    Factor(
        title="Depth (Figure 7)",
        header="network",
        what="depth",
        level=lambda k: k.depth,
        label=lambda k: f"ResNet-{k.depth}",
        varied=("depth",),
        reference=lambda d: d.depth,
    ),
)


@dataclass
class FactorGroup:
    fixed: Fixed
    levels: dict[Level, list[Setting]]  # level -> settings (one, or several joined ones)
    reference: Level

    def rows(self) -> list[tuple[Level, Setting]]:
        """The reference first (as in the paper's Tables 4 and 6), then the other levels in order."""
        order = sorted(self.levels, key=lambda level: (level != self.reference, _level_order(level)))
        return [(level, s) for level in order for s in self.levels[level]]


def _level_order(level: Level) -> tuple[int, Any]:
    return (0, level) if not isinstance(level, str) else (1, level)


def factor_groups(factor: Factor, settings: Iterable[Setting], defaults: SettingKey | None) -> list[FactorGroup]:
    """Groups of otherwise-equal settings in which the factor takes >= 2 levels."""
    settings = list(settings)
    grouped: dict[Fixed, dict[Level, list[Setting]]] = {}
    for setting in settings:
        level = factor.level(setting.key)
        if level is not None:
            grouped.setdefault(_fixed(setting.key, factor.varied), {}).setdefault(level, []).append(setting)
    # Joiners (e.g. standard training) enter each group they match, under a level of their own.
    for setting in settings:
        fields = factor.join(setting.key)
        if fields is None:
            continue
        for fixed, levels in grouped.items():
            values = dict(fixed)
            if all(values.get(f) == getattr(setting.key, f) for f in fields if f in values):
                levels.setdefault(f"~{setting_label(setting.key)}", []).append(setting)
    groups = []
    for fixed, levels in sorted(grouped.items(), key=lambda item: _group_order(item[0], defaults)):
        own = [level for level in levels if not (isinstance(level, str) and level.startswith("~"))]
        if len(own) < 2:  # joined settings only accompany a real comparison
            continue
        wanted = factor.reference(defaults) if factor.reference and defaults else None
        reference = wanted if wanted in levels else sorted(own, key=_level_order)[0]
        groups.append(FactorGroup(fixed, levels, reference))
    return groups


def _group_order(fixed: Fixed, defaults: SettingKey | None) -> tuple[Any, ...]:
    """Groups at the spec's defaults first, then by their values (all groups of a factor share their fields)."""
    away = sum(1 for name, value in fixed if defaults is not None and getattr(defaults, name, value) != value)
    return (away, tuple(value for _, value in fixed))


def _describe_fixed(fixed: Fixed) -> str:
    return " · ".join(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}" for name, value in fixed)


def _paper_row(key: SettingKey, metrics: list[str], enabled: bool) -> list[str] | None:
    values = PAPER.get(key) if enabled else None
    if not values or not any(m in values for m in metrics):
        return None
    return [f"{values[m]:.1f}" if m in values else "—" for m in metrics]


HealthNote = Callable[[Iterable[str], str], str]  # (cell ids, metric) -> a warning about flagged cells, or ""


def _no_note(cells: Iterable[str], metric: str) -> str:
    return ""


@dataclass(frozen=True)
class TableContext:
    metrics: list[str]  # acc_clean, then acc_pgd_<N> by N
    paper: bool  # print the paper's numbers beside ours
    defaults: SettingKey | None
    n_images: int | None = None  # evaluation images per cell, for a single cell's binomial error
    health_note: HealthNote = _no_note

    @property
    def robust(self) -> str | None:
        """The strongest evaluated attack: the paper judges robustness where its attacks have converged."""
        return self.metrics[-1] if len(self.metrics) > 1 else None


# ----------------------------------------------------------------------------------------------------------------
# Comparisons


def paired(a: SettingKey, b: SettingKey) -> bool:
    """Settings whose cells of one seed share their training up to a point, so seed-to-seed noise cancels in the
    per-seed difference: BN and BN* (MBN and MBN*) of one seed train identically until BN*'s last epochs
    (Section 4.3); the two MBN branches are one network, evaluated through either set of BNs (Section 4.2)."""
    changed = {name for name in SETTING_FIELDS if getattr(a, name) != getattr(b, name)}
    if changed == {"norm"}:
        return a.base_norm == b.base_norm
    return changed == {"branch"} and a.base_norm == "mbn"


def compare_settings(a: Setting, b: Setting, metric: str) -> Comparison:
    """a - b in percentage points: paired on their common seeds where `paired` (and >= 2 seeds are common),
    Welch's t-test on all their seeds otherwise."""
    if paired(a.key, b.key):
        mine, theirs = a.by_seed(metric), b.by_seed(metric)
        common = sorted(mine.keys() & theirs.keys())
        if len(common) >= MIN_SEEDS:
            return compare([100 * mine[s] for s in common], [100 * theirs[s] for s in common], paired=True)
    return compare([100 * v for v in a.values(metric)], [100 * v for v in b.values(metric)])


@dataclass(frozen=True)
class Judged:
    """One comparison the report makes: a setting against a reference on one accuracy, and its verdict."""

    label: str  # "MBN_adv vs BN (ref)"
    metric: str
    comparison: Comparison
    finding: Finding | None
    health: str  # a warning about flagged cells or attacks behind it, "" when none

    @property
    def verdict(self) -> str:
        text = self.comparison.verdict(self.finding.sign if self.finding else None)
        return text + (f" ⚠ {self.health}" if self.health else "")


def judge(label: str, a: Setting, b: Setting, metric: str, ctx: TableContext) -> Judged | None:
    """None when either side has no finished value of `metric`."""
    if not a.values(metric) or not b.values(metric):
        return None
    judged_metric = metric == "acc_clean" or metric == ctx.robust
    finding = expected(a.key, b.key, robust=metric != "acc_clean") if judged_metric else None
    health = ctx.health_note(a.cells | b.cells, metric)
    return Judged(label, metric, compare_settings(a, b, metric), finding, health)


def _fmt_points(value: float) -> str:
    return f"{value:+.1f}".replace("-0.0", "+0.0")


def _fmt_interval(c: Comparison) -> str:
    if c.ci_low is None or c.ci_high is None:
        return _fmt_points(c.delta)
    return f"{_fmt_points(c.delta)} [{_fmt_points(c.ci_low)}, {_fmt_points(c.ci_high)}]"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.2f}" if p >= 0.1 else f"{p:.3f}"


def _fmt_n(c: Comparison) -> str:
    return f"{c.n_a} pairs" if c.test == "paired t" else f"{c.n_a} vs {c.n_b}"


COMPARISON_HEADER = ["comparison", "accuracy", "n", "Δ [95% CI]", "p", "test", "the paper", "verdict"]


def comparison_row(j: Judged) -> list[str]:
    c = j.comparison
    test = {"welch": "Welch", "paired t": "paired t"}.get(c.test, "—")
    claim = j.finding.claim if j.finding else "—"
    return [
        md(j.label),
        metric_header(j.metric),
        _fmt_n(c),
        _fmt_interval(c),
        _fmt_p(c.p_value),
        test,
        claim,
        j.verdict,
    ]


def factor_section(factor: Factor, groups: list[FactorGroup], ctx: TableContext, judged: list[Judged]) -> list[str]:
    """The factor's tables (mean ± sd per level), each followed by its comparisons with the reference row; the
    comparisons are appended to `judged` too."""
    metrics = ctx.metrics
    lines = [f"## {factor.title}", ""]
    for group in groups:
        lines += [f"Fixed: {_describe_fixed(group.fixed)}", ""]
        reference_setting = group.levels[group.reference][0]
        reference_label = factor.label(reference_setting.key)
        any_notes = any(s.notes() for _, s in group.rows())
        header = [factor.header, "n", *(metric_header(m) for m in metrics)] + (["not finished"] if any_notes else [])
        body, comparisons = [], []
        for level, setting in group.rows():
            is_reference = level == group.reference and setting is reference_setting
            label = setting_label(setting.key) if str(level).startswith("~") else factor.label(setting.key)
            cells = [_fmt(setting.stat(m), ctx.n_images) for m in metrics]
            body.append([md(label + (" (ref)" if is_reference else "")), str(setting.n), *cells])
            body[-1] += [setting.notes()] if any_notes else []
            theirs = _paper_row(setting.key, metrics, ctx.paper)
            if theirs:
                body.append(["↳ paper", "", *theirs] + ([""] if any_notes else []))
            if not is_reference:
                pairs = [(f"{label} vs {reference_label} (ref)", setting, reference_setting)]
                comparisons += [j for m in metrics if (j := judge(*pairs[0], m, ctx))]
        comparisons += _branch_comparisons(group, ctx)
        lines += [*markdown_table(header, body), ""]
        if comparisons:
            lines += [*markdown_table(COMPARISON_HEADER, (comparison_row(j) for j in comparisons)), ""]
            judged += comparisons
    return lines


def _branch_comparisons(group: FactorGroup, ctx: TableContext) -> list[Judged]:
    """MBN_clean against MBN_adv of the same networks, where the group holds both branches (Table 1)."""
    branches = {s.key.branch: s for _, s in group.rows() if s.key.base_norm == "mbn"}
    if "mbn_adv" not in branches or "mbn_clean" not in branches:
        return []
    label = "MBN_clean vs MBN_adv (same networks)"
    judged = (judge(label, branches["mbn_clean"], branches["mbn_adv"], m, ctx) for m in ctx.metrics)
    return [j for j in judged if j]


def findings_section(judged: list[Judged]) -> list[str]:
    """Every comparison the paper states a finding for, in one place: what it says, what we measured."""
    with_finding = [j for j in judged if j.finding is not None]
    if not with_finding:
        return []
    header = ["the paper", "comparison", "accuracy", "n", "Δ [95% CI]", "p", "verdict"]
    body = [[j.finding.claim if j.finding else "", *comparison_row(j)[:5], j.verdict] for j in with_finding]
    return [
        "## The paper's findings, judged",
        "",
        "Each comparison for which the paper states a direction, from the tables below (clean accuracy, and "
        "robustness under the strongest evaluated attack). How a verdict is reached: see the next section.",
        "",
        *markdown_table(header, body),
        "",
    ]


# ----------------------------------------------------------------------------------------------------------------
# Table 7 and the per-cell table


def table7_order(key: SettingKey) -> tuple[Any, ...]:
    norm = {"bn": 0, "mbn": 1, "gn": 2}.get(key.base_norm, 3)
    return (
        key.depth,
        key.batch_size,
        -key.pgd_steps,
        key.strategy == "standard",
        norm,
        key.branch,
        key.strategy,
        -key.clean_ratio,
        key.star,
    )


def table7_section(settings: dict[SettingKey, Setting], ctx: TableContext) -> list[str]:
    metrics = ctx.metrics
    ordered = sorted(settings.values(), key=lambda s: table7_order(s.key))
    any_notes = any(s.notes() for s in ordered)
    header = ["network", "batch size", "PGD-N for training", "setting", "n", *(metric_header(m) for m in metrics)]
    header += ["not finished"] if any_notes else []
    body = []
    for s in ordered:
        k = s.key
        steps = "—" if k.strategy == "standard" else str(k.pgd_steps)
        row = [f"ResNet-{k.depth}", str(k.batch_size), steps, md(setting_label(k)), str(s.n)]
        body.append(row + [_fmt(s.stat(m), ctx.n_images) for m in metrics] + ([s.notes()] if any_notes else []))
        theirs = _paper_row(k, metrics, ctx.paper)
        if theirs:
            body.append(["", "", "", "↳ paper", "", *theirs] + ([""] if any_notes else []))
    return [
        "## Every setting (Table 7)",
        "",
        "Accuracy (%) as mean ± standard deviation over the n finished seeds; with one seed, ± the binomial "
        "standard error of its evaluation subset.",
        "",
        *markdown_table(header, body),
        "",
    ]


def cells_section(rows: list[dict[str, Any]], ctx: TableContext) -> list[str]:
    metrics = ctx.metrics
    header = ["cell", "seed", "setting", "network", "batch", "PGD-N", "branch", "status", "epochs", "train time"]
    header += [metric_header(m) for m in metrics]
    body = []
    for row in sorted(rows, key=lambda r: (table7_order(setting_key(r, r.get("branch") or "main")), r["seed"])):
        key = setting_key(row, row.get("branch") or "main")
        values = [_fmt_cell(row.get(m), ctx.n_images) for m in metrics]
        body.append(
            [
                f"`{row['cell_id']}`",
                str(row["seed"]),
                md(setting_label(key)),
                f"ResNet-{key.depth}",
                str(key.batch_size),
                "—" if key.strategy == "standard" else str(key.pgd_steps),
                row.get("branch") or "main",
                row.get("status") or "?",
                str(row.get("epochs") or 0),
                _duration(float(row.get("train_seconds") or 0.0)),
                *values,
            ]
        )
    text = (
        f"Accuracy (%) ± its binomial standard error on the {ctx.n_images} evaluation images (Agresti-Coull): "
        "the part of a cell's number that another sample of evaluation images would change."
        if ctx.n_images
        else "Accuracy (%); the evaluation subset's size is unknown (no spec.yaml), so no binomial error is given."
    )
    return ["## Every cell and branch", "", text, "", *markdown_table(header, body), ""]


def _fmt_cell(value: float | None, n_images: int | None) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f}" + (f" ± {100 * binomial_se(value, n_images):.1f}" if n_images else "")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
