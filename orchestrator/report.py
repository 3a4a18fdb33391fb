"""`python -m orchestrator.report STORAGE_URL/NAME`: the study's report, rebuilt from storage alone (DESIGN 3.8, 4).

Reads `results.parquet` (plus any cell that finished after it was written, from `cells/*/result.json`) and
`spec.yaml`, and writes `report/report.md` with PNG figures beside it, in the sweep's storage (any fsspec URL).

What the report holds, as far as the grid supports it (a factor needs >= 2 values among otherwise-equal cells):

- one table per factor, laid out like the paper: clean ratio (Figure 1), training strategy (Figure 2), normalisation
  (Table 1: BN vs MBN_adv vs MBN_clean vs GN), BN* vs BN (Tables 2 and 5), PGD-N for training (Table 4), batch size
  (Table 6), depth (Figure 7); then every setting (Table 7) and every cell and branch;
- figures: accuracy vs PGD iterations (Figures 2 and 3), accuracy vs depth (Figure 7), clean vs robust accuracy;
- training curves: loss and training accuracy (adversarial and clean batches) per epoch, per setting, from
  `history.parquet` (plus `cells/*/history.json` of cells it does not cover yet), to see whether cells converged;
- what is missing or failed (cells of spec.yaml's grid without a result), and what the grid lacks.

Replicates (seeds) become mean ± sample standard deviation and n. NOISE RULE: a difference between a row and its
table's reference row is flagged with † only when both have n >= 2 finished seeds and |Δ mean| > 2 x the pooled
standard deviation, s_p = sqrt(((n_a - 1) s_a² + (n_b - 1) s_b²) / (n_a + n_b - 2)): larger than what
seed-to-seed noise alone typically gives. With n < 2 on either side nothing is flagged, whatever the size.

Where the workload is the paper's (Section 3: ImageNet-style data, ResNet stem for 224 px, width 1, 110 epochs,
targeted PGD with eps 16 and evaluation step 1), the paper's numbers (Table 7 and Table 1) are printed beside ours.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from orchestrator.grid import expand
from orchestrator.results import (
    AXES,
    HISTORY_FILE,
    HISTORY_METRICS,
    RESULTS_FILE,
    history_rows,
    read_histories,
    result_rows,
)
from orchestrator.spec import Spec, SpecError, parse_spec
from orchestrator.storage import SweepStorage

EXIT_OK, EXIT_INVALID = 0, 2
REPORT_DIR = "report"
REPORT_FILE = "report.md"
FLAG = "†"
NOISE_FACTOR = 2.0  # |Δ mean| > NOISE_FACTOR x pooled std, both sides n >= MIN_SEEDS
MIN_SEEDS = 2
PAPER_PGD = (10, 20, 100, 500, 2000)  # the PGD-N columns of the paper's Table 7

# ----------------------------------------------------------------------------------------------------------------
# The paper's numbers (accuracy in %), only those printed in the text of Xie & Yuille (ICLR 2020).
# tests/test_report.py parses Table 7 and Table 1 out of the paper's text and holds every entry to its own row.


@dataclass(frozen=True, order=True)
class SettingKey:
    """One setting of the study: a cell's axes without the seed, plus the evaluation branch."""

    depth: int
    batch_size: int
    pgd_steps: int
    strategy: str
    clean_ratio: float
    norm: str
    branch: str

    @property
    def base_norm(self) -> str:
        return self.norm.rstrip("*")

    @property
    def star(self) -> bool:
        return self.norm.endswith("*")

    def replace(self, **changes: Any) -> SettingKey:
        return SettingKey(**({name: getattr(self, name) for name in SETTING_FIELDS} | changes))


SETTING_FIELDS = ("depth", "batch_size", "pgd_steps", "strategy", "clean_ratio", "norm", "branch")


def _paper_rows() -> dict[SettingKey, dict[str, float]]:
    rows: dict[SettingKey, dict[str, float]] = {}
    columns = ("acc_clean", *(f"acc_pgd_{n}" for n in PAPER_PGD))

    def add(depth: int, batch: int, steps: int, norm: str, branch: str, strategy: str, ratio: float, *v: float) -> None:
        rows[SettingKey(depth, batch, steps, strategy, ratio, norm, branch)] = dict(zip(columns, v, strict=False))

    # Table 7 (Appendix C), ResNet-152, batch 4096, PGD-30 for training: clean, PGD-10, 20, 100, 500, 2000.
    # Figure 1 (clean ratio), Figure 2 (strategies), Tables 1, 2 and Section 4.2 (GN 39.5 / 39.0) agree with it.
    table7 = {
        30: [
            ("bn", "main", "alp", 1.0, 73.5, 48.8, 46.3, 34.1, 27.3, 23.0),
            ("bn", "main", "mixture", 1.0, 78.0, 56.2, 53.0, 35.6, 26.6, 20.9),
            ("bn", "main", "mixture", 0.8, 77.4, 56.8, 54.6, 39.6, 28.7, 20.3),
            ("bn", "main", "mixture", 0.6, 75.5, 54.6, 52.1, 40.3, 23.5, 15.3),
            ("bn", "main", "mixture", 0.4, 73.9, 54.1, 51.5, 40.2, 33.6, 29.1),
            ("bn", "main", "mixture", 0.2, 68.0, 54.6, 51.5, 40.6, 34.6, 32.1),
            ("bn", "main", "mixture", 0.0, 62.3, 52.5, 50.0, 41.7, 39.6, 39.2),
            ("bn*", "main", "mixture", 0.0, 62.1, 52.4, 50.3, 43.9, 42.6, 42.2),
            ("mbn", "mbn_adv", "mixture", 1.0, 64.4, 51.8, 49.1, 40.9, 38.8, 38.3),
            ("mbn*", "mbn_adv", "mixture", 1.0, 64.2, 52.5, 50.0, 42.1, 40.5, 39.9),
            ("mbn", "mbn_adv", "alp", 1.0, 65.9, 47.3, 45.0, 38.3, 35.9, 35.3),
            ("mbn*", "mbn_adv", "alp", 1.0, 64.3, 49.0, 47.2, 40.4, 38.6, 38.1),
            ("gn", "main", "mixture", 1.0, 67.5, 52.1, 49.3, 41.9, 39.5, 39.0),
        ],
        # Table 7, PGD-20/10/5 for training (Table 4's deltas and Table 5's rows are differences of these).
        20: [
            ("bn", "main", "alp", 1.0, 72.7, 50.1, 47.6, 33.4, 25.2, 19.2),
            ("bn", "main", "mixture", 1.0, 78.4, 55.9, 52.5, 31.7, 20.0, 13.6),
            ("bn", "main", "mixture", 0.0, 62.5, 54.1, 51.1, 41.8, 39.0, 38.2),
            ("bn*", "main", "mixture", 0.0, 65.4, 53.9, 51.0, 42.7, 40.8, 40.0),
            ("mbn", "mbn_adv", "mixture", 1.0, 67.9, 52.8, 49.9, 39.3, 35.5, 34.1),
            ("mbn*", "mbn_adv", "mixture", 1.0, 67.2, 52.7, 49.9, 40.2, 37.2, 36.5),
            ("mbn", "mbn_adv", "alp", 1.0, 68.1, 48.8, 46.7, 39.5, 36.7, 35.8),
            ("mbn*", "mbn_adv", "alp", 1.0, 67.4, 50.0, 47.7, 40.3, 37.4, 37.1),
        ],
        10: [
            ("bn", "main", "alp", 1.0, 74.9, 47.3, 47.1, 22.4, 7.3, 3.3),
            ("bn", "main", "mixture", 1.0, 78.4, 56.6, 55.1, 28.8, 7.1, 3.2),
            ("bn", "main", "mixture", 0.0, 66.0, 53.6, 50.9, 41.1, 38.0, 36.8),
            ("bn*", "main", "mixture", 0.0, 65.9, 53.5, 50.7, 42.3, 39.9, 39.2),
            ("mbn", "mbn_adv", "mixture", 1.0, 68.7, 53.5, 49.9, 38.7, 34.3, 32.8),
            ("mbn*", "mbn_adv", "mixture", 1.0, 67.8, 52.6, 49.8, 40.0, 36.9, 36.1),
            ("mbn", "mbn_adv", "alp", 1.0, 68.7, 49.0, 46.8, 38.9, 35.4, 33.9),
            ("mbn*", "mbn_adv", "alp", 1.0, 67.7, 50.0, 47.7, 40.2, 37.4, 36.7),
        ],
        5: [
            ("bn", "main", "alp", 1.0, 75.0, 49.6, 37.6, 5.7, 0.8, 0.3),
            ("bn", "main", "mixture", 1.0, 78.6, 41.5, 17.6, 0.2, 0.0, 0.0),
            ("bn", "main", "mixture", 0.0, 67.0, 54.0, 50.5, 40.7, 37.5, 35.9),
            ("bn*", "main", "mixture", 0.0, 66.9, 53.6, 50.4, 41.5, 38.8, 37.8),
            ("mbn", "mbn_adv", "mixture", 1.0, 69.3, 53.0, 49.8, 38.0, 33.3, 31.2),
            ("mbn*", "mbn_adv", "mixture", 1.0, 68.9, 53.1, 49.8, 39.8, 35.9, 34.2),
            ("mbn", "mbn_adv", "alp", 1.0, 69.2, 49.6, 46.8, 38.9, 34.9, 32.9),
            ("mbn*", "mbn_adv", "alp", 1.0, 69.2, 50.4, 48.3, 40.3, 37.0, 35.4),
        ],
    }
    for steps, entries in table7.items():
        for norm, branch, strategy, ratio, *values in entries:
            add(152, 4096, steps, norm, branch, strategy, ratio, *values)
    # Table 7, batch size rows (Table 6): ResNet-152, PGD-30, 100% adv + 0% clean* (BN*, Appendix B.3). The text
    # prints "8196" in Table 7 where Table 6 and Appendix B.3 say 8192 (same numbers: 41.9 = 42.2 - 0.3).
    for batch, accuracies in {
        512: (62.6, 52.4, 50.4, 43.8, 42.4, 42.0),
        1024: (63.1, 53.3, 51.0, 44.6, 43.5, 43.1),
        2048: (62.7, 53.3, 50.7, 45.0, 43.7, 43.3),
        8192: (61.8, 52.1, 49.8, 43.4, 42.3, 41.9),
    }.items():
        add(152, batch, 30, "bn*", "main", "mixture", 0.0, *accuracies)
    # Table 7, depth rows (Figure 7): batch 4096, PGD-30, 100% adv + 0% clean* (Section 5 applies BN*; 44.6 - 42.2
    # is the "2.4%" of Section 5). Depth 518 is in the paper's table; this project's depth table has no 518.
    for depth, accuracies in {
        200: (63.5, 53.8, 51.4, 45.1, 43.9, 43.8),
        338: (65.4, 55.5, 53.2, 46.6, 45.1, 44.6),
        518: (66.7, 56.7, 54.4, 48.1, 46.4, 46.2),
        638: (67.2, 57.2, 54.8, 48.7, 47.1, 46.7),
    }.items():
        add(depth, 4096, 30, "bn*", "main", "mixture", 0.0, *accuracies)
    # Table 1 (clean image accuracy): 0% adv + 100% clean (standard training) 78.9 (also Section 4.4);
    # MBN_clean, 100% adv + 100% clean: +0.4; MBN_clean, 100% adv + 100% clean, ALP: -0.5.
    add(152, 4096, 0, "bn", "main", "standard", 1.0, 78.9)
    add(152, 4096, 30, "mbn", "mbn_clean", "mixture", 1.0, round(78.9 + 0.4, 1))
    add(152, 4096, 30, "mbn", "mbn_clean", "alp", 1.0, round(78.9 - 0.5, 1))
    return rows


PAPER: dict[SettingKey, dict[str, float]] = _paper_rows()


def paper_differences(spec: Spec) -> list[str]:
    """Why this workload is not the paper's ImageNet setting (Section 3); [] when its numbers are comparable."""
    w = spec.workload
    why = []
    if w.data.url.startswith("builtin://"):
        why.append(f"data {w.data.url} (the paper trains on ImageNet)")
    if w.model.stem != "imagenet":
        why.append(f"model.stem {w.model.stem} (paper: the ImageNet stem, 224 px)")
    if w.model.width != 1.0:
        why.append(f"model.width {w.model.width:g} (paper: 1)")
    if w.recipe.epochs != 110:
        why.append(f"{w.recipe.epochs} epochs (paper: 110)")
    if w.attack.eps != 16 or w.eval.eps != 16:
        why.append(f"eps {w.attack.eps:g}/{w.eval.eps:g} for training/evaluation (paper: 16)")
    if w.eval.step_size != 1 or not w.eval.targeted:
        why.append("evaluation attack is not targeted PGD with step 1 (paper: targeted, step 1)")
    if w.model.bn_star_epochs not in (0, 10):
        why.append(f"BN* for the last {w.model.bn_star_epochs} epochs (paper: 10)")
    return why


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


def pooled_std(a: Stat, b: Stat) -> float | None:
    if a.std is None or b.std is None:
        return None
    return math.sqrt(((a.n - 1) * a.std**2 + (b.n - 1) * b.std**2) / (a.n + b.n - 2))


def exceeds_noise(a: Stat, b: Stat) -> bool:
    """The noise rule: both n >= 2 and |mean_a - mean_b| > 2 x pooled standard deviation."""
    pooled = pooled_std(a, b)
    return pooled is not None and abs(a.mean - b.mean) > NOISE_FACTOR * pooled


@dataclass
class Setting:
    key: SettingKey
    values: dict[str, list[float]] = field(default_factory=dict)
    cells: set[str] = field(default_factory=set)  # finished cells (one per seed, unless the spec changed)
    failed: int = 0
    missing: int = 0

    @property
    def n(self) -> int:
        return len(self.cells)

    def stat(self, metric: str) -> Stat | None:
        return stat(self.values.get(metric, []))

    def notes(self) -> str:
        parts = [f"{self.failed} failed"] if self.failed else []
        parts += [f"{self.missing} missing"] if self.missing else []
        return ", ".join(parts)


def _branches(norm: str, branch: str | None) -> list[str]:
    """A missing or failed MBN cell stands for both of its evaluation branches."""
    if branch and branch != "main":
        return [branch]
    return ["mbn_adv", "mbn_clean"] if norm.rstrip("*") == "mbn" else ["main"]


def _key(axes: dict[str, Any], branch: str) -> SettingKey:
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
    names = {k for row in rows for k, v in row.items() if k.startswith("acc_pgd_") and v is not None}
    return sorted(names, key=lambda c: int(c.removeprefix("acc_pgd_")))


def build_settings(
    rows: list[dict[str, Any]], missing: list[dict[str, Any]], metrics: list[str]
) -> dict[SettingKey, Setting]:
    settings: dict[SettingKey, Setting] = {}

    def get(key: SettingKey) -> Setting:
        return settings.setdefault(key, Setting(key))

    for row in rows:
        if row.get("status") == "finished":
            setting = get(_key(row, row.get("branch") or "main"))
            setting.cells.add(str(row["cell_id"]))
            for metric in metrics:
                value = row.get(metric)
                if value is not None and not (isinstance(value, float) and math.isnan(value)):
                    setting.values.setdefault(metric, []).append(float(value))
        else:
            for branch in _branches(row["norm"], row.get("branch")):
                get(_key(row, branch)).failed += 1
    for axes in missing:
        for branch in _branches(axes["norm"], None):
            get(_key(axes, branch)).missing += 1
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


def _metric_header(metric: str) -> str:
    return "clean" if metric == "acc_clean" else f"PGD-{metric.removeprefix('acc_pgd_')}"


def _md(text: str) -> str:
    """Text for a Markdown table cell: '*' (BN*) and '|' would otherwise be read as markup."""
    return text.replace("|", "\\|").replace("*", "\\*")


def _fmt(s: Stat | None) -> str:
    if s is None:
        return "—"
    text = f"{100 * s.mean:.1f}"
    return text + (f" ± {100 * s.std:.1f}" if s.std is not None else "")


def _fmt_delta(s: Stat | None, ref: Stat | None) -> str:
    text = _fmt(s)
    if s is None or ref is None:
        return text
    flag = f" {FLAG}" if exceeds_noise(s, ref) else ""
    return f"{text} (Δ {100 * (s.mean - ref.mean):+.1f}{flag})"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
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


def _adversarial(key: SettingKey) -> bool:
    return key.strategy != "standard"


_NORM_ORDER = {("bn", "main"): 0, ("mbn", "mbn_adv"): 1, ("mbn", "mbn_clean"): 2, ("gn", "main"): 3}
_NORM_LABEL = {0: "BN", 1: "MBN_adv", 2: "MBN_clean", 3: "GN"}
_STRATEGY_ORDER = {"mixture": 0, "alp": 1, "standard": 2}


FACTORS: tuple[Factor, ...] = (
    Factor(
        title="Clean ratio (Figure 1)",
        header="clean images kept",
        what="clean_ratio",
        level=lambda k: k.clean_ratio if _adversarial(k) else None,
        label=setting_label,
        varied=("clean_ratio",),
        reference=lambda d: d.clean_ratio,
    ),
    Factor(
        title="Training strategy (Figure 2: mixture, ALP, standard training)",
        header="strategy",
        what="strategy",
        level=lambda k: _STRATEGY_ORDER[k.strategy] if _adversarial(k) else None,
        label=setting_label,
        varied=("strategy",),
        reference=lambda d: _STRATEGY_ORDER.get(d.strategy),
        join=lambda k: None if _adversarial(k) else ("depth", "batch_size", "norm", "branch"),
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
        level=lambda k: k.pgd_steps if _adversarial(k) else None,
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


def factor_section(
    factor: Factor, groups: list[FactorGroup], metrics: list[str], paper: bool, defaults: SettingKey | None
) -> list[str]:
    lines = [f"## {factor.title}", ""]
    for group in groups:
        lines += [f"Fixed: {_describe_fixed(group.fixed)}", ""]
        reference_setting = group.levels[group.reference][0]
        any_notes = any(s.notes() for _, s in group.rows())
        header = [factor.header, "n", *(_metric_header(m) for m in metrics)] + (["not finished"] if any_notes else [])
        body = []
        for level, setting in group.rows():
            is_reference = level == group.reference and setting is reference_setting
            label = setting_label(setting.key) if str(level).startswith("~") else factor.label(setting.key)
            label += " (ref)" if is_reference else ""
            cells = []
            for metric in metrics:
                mine = setting.stat(metric)
                cells.append(_fmt(mine) if is_reference else _fmt_delta(mine, reference_setting.stat(metric)))
            body.append([_md(label), str(setting.n), *cells] + ([setting.notes()] if any_notes else []))
            theirs = _paper_row(setting.key, metrics, paper)
            if theirs:
                body.append(["↳ paper", "", *theirs] + ([""] if any_notes else []))
        lines += [*_table(header, body), ""]
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Table 7 and the per-cell table


def _table7_order(key: SettingKey) -> tuple[Any, ...]:
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


def table7_section(settings: dict[SettingKey, Setting], metrics: list[str], paper: bool) -> list[str]:
    ordered = sorted(settings.values(), key=lambda s: _table7_order(s.key))
    any_notes = any(s.notes() for s in ordered)
    header = ["network", "batch size", "PGD-N for training", "setting", "n", *(_metric_header(m) for m in metrics)]
    header += ["not finished"] if any_notes else []
    body = []
    for s in ordered:
        k = s.key
        steps = "—" if k.strategy == "standard" else str(k.pgd_steps)
        row = [f"ResNet-{k.depth}", str(k.batch_size), steps, _md(setting_label(k)), str(s.n)]
        body.append(row + [_fmt(s.stat(m)) for m in metrics] + ([s.notes()] if any_notes else []))
        theirs = _paper_row(k, metrics, paper)
        if theirs:
            body.append(["", "", "", "↳ paper", "", *theirs] + ([""] if any_notes else []))
    return [
        "## Every setting (Table 7)",
        "",
        "Accuracy (%) as mean ± standard deviation over the n finished seeds.",
        "",
        *_table(header, body),
        "",
    ]


def cells_section(rows: list[dict[str, Any]], metrics: list[str]) -> list[str]:
    header = ["cell", "seed", "setting", "network", "batch", "PGD-N", "branch", "status", "epochs", "train time"]
    header += [_metric_header(m) for m in metrics]
    body = []
    for row in sorted(rows, key=lambda r: (_table7_order(_key(r, r.get("branch") or "main")), r["seed"])):
        key = _key(row, row.get("branch") or "main")
        values = [f"{100 * row[m]:.1f}" if row.get(m) is not None else "—" for m in metrics]
        body.append(
            [
                f"`{row['cell_id']}`",
                str(row["seed"]),
                _md(setting_label(key)),
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
    return ["## Every cell and branch", "", *_table(header, body), ""]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ----------------------------------------------------------------------------------------------------------------
# Figures (matplotlib's Agg canvas, no pyplot state: safe in any thread of the driver)

_MARKERS = "osD^vPX*<>hp"


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained", dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _styles(n: int) -> list[tuple[Any, str]]:
    """(colour, marker) pairs, all distinct: tab10's colours, the marker changing with every colour cycle too."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [(cmap(i % 10), _MARKERS[(i + i // 10) % len(_MARKERS)]) for i in range(n)]


def _title(ax: Any, text: str, width: int = 80) -> None:
    """Over the axes, which span the figure's width (the legend goes below), so 80 characters a line fit."""
    ax.set_title("\n".join(textwrap.wrap(text, width)), fontsize=10)


def _proxy(label: str, **style: Any) -> Any:
    """A legend entry for a style (e.g. 'dashed: the paper') rather than for one plotted series."""
    from matplotlib.lines import Line2D

    return Line2D([], [], label=label, **({"color": "0.35"} | style))


def _legend(fig: Any, handles: list[Any]) -> None:
    """Below the axes, outside them (constrained layout makes room): no entry covers a curve or the title."""
    if handles:
        ncols = 1 if len(handles) <= 3 else 2
        fig.legend(handles=handles, loc="outside lower center", fontsize=8, ncols=ncols, frameon=False)


def _legend_height(entries: int) -> float:
    """Inches to add to a figure for a legend of `entries` below the axes."""
    return 0.3 + 0.19 * math.ceil(entries / (1 if entries <= 3 else 2))


def _main_context(settings: list[Setting], defaults: SettingKey | None) -> tuple[int, int, int] | None:
    """(depth, batch size, PGD-N) of the figures' curves: the spec's defaults, else the best populated one."""
    finished = [s for s in settings if s.n]
    if not finished:
        return None
    counts: dict[tuple[int, int, int], int] = {}
    for s in finished:
        if _adversarial(s.key):
            context = (s.key.depth, s.key.batch_size, s.key.pgd_steps)
            counts[context] = counts.get(context, 0) + 1
    if defaults and (defaults.depth, defaults.batch_size, defaults.pgd_steps) in counts:
        return defaults.depth, defaults.batch_size, defaults.pgd_steps
    if not counts:
        s = finished[0]
        return s.key.depth, s.key.batch_size, s.key.pgd_steps
    return max(counts, key=lambda c: (counts[c], -c[0], -c[1], c[2]))


def _in_context(key: SettingKey, context: tuple[int, int, int]) -> bool:
    depth, batch, steps = context
    return key.depth == depth and key.batch_size == batch and (key.pgd_steps == steps or not _adversarial(key))


def _context_text(context: tuple[int, int, int]) -> str:
    depth, batch, steps = context
    return f"ResNet-{depth}, batch {batch}, PGD-{steps} for training"


def pgd_curve_figure(
    settings: list[Setting], metrics: list[str], title: str, paper: bool, context: tuple[int, int, int]
) -> bytes | None:
    """Figures 2 and 3: accuracy against the number of PGD iterations (log x), one curve per setting."""
    pgd = [m for m in metrics if m != "acc_clean"]
    curves = sorted((s for s in settings if s.n and any(s.stat(m) for m in pgd)), key=lambda s: _table7_order(s.key))
    if not curves or not pgd:
        return None
    fig = _figure(8.5, 4.2 + _legend_height(len(curves) + 1))
    ax = fig.add_subplot()
    steps = [int(m.removeprefix("acc_pgd_")) for m in pgd]
    handles = []
    paper_plotted = False
    for (colour, marker), s in zip(_styles(len(curves)), curves, strict=True):
        points = [(n, st) for n, m in zip(steps, pgd, strict=True) if (st := s.stat(m)) is not None]
        handles.append(
            ax.errorbar(
                [n for n, _ in points],
                [100 * st.mean for _, st in points],
                yerr=[100 * (st.std or 0.0) for _, st in points],
                color=colour,
                marker=marker,
                capsize=3,
                label=setting_label(s.key),
            )
        )
        theirs = PAPER.get(s.key, {}) if paper else {}
        px = [n for n in PAPER_PGD if f"acc_pgd_{n}" in theirs]
        if px:
            py = [theirs[f"acc_pgd_{n}"] for n in px]
            ax.plot(px, py, color=colour, linestyle="--", marker=marker, mfc="none", alpha=0.7)
            paper_plotted = True
    if paper_plotted:
        handles.append(_proxy("dashed, hollow: the paper", linestyle="--", marker="o", mfc="none"))
    ax.set_xscale("log")
    ticks = sorted(set(steps) | (set(PAPER_PGD) if paper_plotted else set()))
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("PGD attack iterations (targeted, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    _title(ax, f"{title} — {_context_text(context)}")
    _legend(fig, handles)
    return _png(fig)


def depth_figure(settings: list[Setting], metrics: list[str], paper: bool, defaults: SettingKey | None) -> bytes | None:
    """Figure 7: robust (strongest PGD-N, solid) and clean (dotted) accuracy against depth, per setting."""
    robust = metrics[-1] if len(metrics) > 1 else None
    series: dict[SettingKey, list[Setting]] = {}
    for s in settings:
        if s.n:
            series.setdefault(s.key.replace(depth=0), []).append(s)
    lines = {k: sorted(v, key=lambda s: s.key.depth) for k, v in series.items() if len(v) >= 2}
    if not lines:
        return None
    fig = _figure(8.5, 4.2 + _legend_height(len(lines) + 3))
    ax = fig.add_subplot()
    depths: set[int] = set()
    handles = []
    paper_plotted = False
    robust_name = _metric_header(robust) if robust else ""
    ordered = sorted(lines.items(), key=lambda item: _table7_order(item[0]))
    for (colour, marker), (key, points) in zip(_styles(len(lines)), ordered, strict=True):
        label = full_label(key.replace(depth=defaults.depth if defaults else 0), defaults)
        handles.append(_proxy(label, color=colour, marker=marker))
        for metric, style in ((robust, "-"), ("acc_clean", ":")):
            if metric is None:
                continue
            have = [(s.key.depth, st) for s in points if (st := s.stat(metric)) is not None]
            if have:
                depths.update(d for d, _ in have)
                ax.errorbar(
                    [d for d, _ in have],
                    [100 * st.mean for _, st in have],
                    yerr=[100 * (st.std or 0.0) for _, st in have],
                    color=colour,
                    linestyle=style,
                    marker=marker,
                    capsize=3,
                )
            theirs = _paper_by_depth(key, metric) if paper else []
            if len(theirs) >= 2:
                ax.plot(
                    [d for d, _ in theirs],
                    [value for _, value in theirs],
                    color=colour,
                    linestyle="--",
                    marker=marker,
                    mfc="none",
                    alpha=0.7,
                )
                depths.update(d for d, _ in theirs)
                paper_plotted = True
    if robust:
        handles.append(_proxy(f"solid: {robust_name}", linestyle="-"))
    handles.append(_proxy("dotted: clean", linestyle=":"))
    if paper_plotted:
        handles.append(_proxy("dashed, hollow: the paper", linestyle="--", marker="o", mfc="none"))
    ax.set_xscale("log")
    ticks = sorted(depths)
    ax.set_xticks(ticks, [str(d) for d in ticks])
    ax.minorticks_off()
    ax.set_xlabel("ResNet depth (layers, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    what = f"{robust_name} and clean" if robust else "clean"
    _title(ax, f"Figure 7: {what} accuracy vs depth")
    _legend(fig, handles)
    return _png(fig)


def _paper_by_depth(series: SettingKey, metric: str) -> list[tuple[int, float]]:
    """The paper's (depth, accuracy) points of a depth series (its key has depth 0)."""
    return sorted((k.depth, v[metric]) for k, v in PAPER.items() if k.replace(depth=0) == series and metric in v)


def tradeoff_figure(
    settings: list[Setting], metrics: list[str], paper: bool, context: tuple[int, int, int]
) -> bytes | None:
    """Clean accuracy against robust accuracy (strongest PGD-N), one point per setting of the main context."""
    if len(metrics) < 2:
        return None
    robust = metrics[-1]
    chosen = sorted((s for s in settings if _in_context(s.key, context)), key=lambda s: _table7_order(s.key))
    points = [(s, c, r) for s in chosen if s.n and (c := s.stat("acc_clean")) and (r := s.stat(robust))]
    if not points:
        return None
    fig = _figure(8.5, 4.6 + _legend_height(len(points) + 1))
    ax = fig.add_subplot()
    handles = []
    paper_plotted = False
    for (colour, marker), (s, clean, strong) in zip(_styles(len(points)), points, strict=True):
        ax.errorbar(
            100 * strong.mean,
            100 * clean.mean,
            xerr=100 * (strong.std or 0.0),
            yerr=100 * (clean.std or 0.0),
            color=colour,
            marker=marker,
            markersize=7,
            capsize=3,
            linestyle="none",
        )
        handles.append(_proxy(setting_label(s.key), color=colour, marker=marker, linestyle="none"))
        theirs = PAPER.get(s.key, {}) if paper else {}
        if robust in theirs and "acc_clean" in theirs:
            ax.plot(theirs[robust], theirs["acc_clean"], color=colour, marker=marker, mfc="none", markersize=9)
            ax.plot(
                [100 * strong.mean, theirs[robust]],
                [100 * clean.mean, theirs["acc_clean"]],
                color=colour,
                linewidth=0.6,
                alpha=0.5,
            )
            paper_plotted = True
    if paper_plotted:
        handles.append(_proxy("hollow: the paper (thin line to ours)", marker="o", mfc="none", linestyle="none"))
    ax.set_xlabel(f"robust accuracy (%), {_metric_header(robust)}")
    ax.set_ylabel("clean accuracy (%)")
    ax.grid(True, alpha=0.3)
    _title(ax, f"Clean vs robust accuracy (Section 4.4 trade-off) — {_context_text(context)}; ± one std over seeds")
    _legend(fig, handles)
    return _png(fig)


CURVES_FIGURE = "training_curves.png"


def history_settings(history: list[dict[str, Any]]) -> dict[SettingKey, dict[int, dict[str, list[float]]]]:
    """Per setting (the report's grouping of cells that differ only in seed; branch 'main', as training is one
    run whatever the evaluation branch): epoch -> metric -> one value per cell that trained that epoch."""
    grouped: dict[SettingKey, dict[int, dict[str, list[float]]]] = {}
    for row in history:
        epochs = grouped.setdefault(_key(row, "main"), {})
        for metric in HISTORY_METRICS:
            value = row.get(metric)
            if value is not None and math.isfinite(value):
                epochs.setdefault(int(row["epoch"]), {}).setdefault(metric, []).append(float(value))
    return grouped


def training_curves_figure(history: list[dict[str, Any]], defaults: SettingKey | None) -> bytes | None:
    """Loss (top) and training accuracy (bottom: adversarial batches solid, clean dotted) against the epoch, one
    colour per setting: mean over its seeds, shaded ± one standard deviation."""
    grouped = history_settings(history)
    if not grouped:
        return None
    ordered = sorted(grouped.items(), key=lambda item: _table7_order(item[0]))
    fig = _figure(8.5, 6.6 + _legend_height(len(ordered) + 2))
    loss_ax, acc_ax = fig.subplots(2, 1, sharex=True)
    handles = []
    for (colour, marker), (key, epochs) in zip(_styles(len(ordered)), ordered, strict=True):
        cells = len({r["cell_id"] for r in history if _key(r, "main") == key})
        handles.append(_proxy(f"{full_label(key, defaults)} (n={cells})", color=colour, marker=marker))
        for ax, metric, style in (
            (loss_ax, "loss", "-"),
            (acc_ax, "train_acc_adv", "-"),
            (acc_ax, "train_acc_clean", ":"),
        ):
            points = [(e, st) for e in sorted(epochs) if (st := stat(epochs[e].get(metric, []))) is not None]
            if not points:
                continue
            scale = 1.0 if metric == "loss" else 100.0
            x = [e for e, _ in points]
            mean = [scale * st.mean for _, st in points]
            spread = [scale * (st.std or 0.0) for _, st in points]
            ax.plot(x, mean, color=colour, linestyle=style, marker=marker, markersize=4, markevery=max(1, len(x) // 12))
            if any(spread):
                low = [m - d for m, d in zip(mean, spread, strict=True)]
                high = [m + d for m, d in zip(mean, spread, strict=True)]
                ax.fill_between(x, low, high, color=colour, alpha=0.15, linewidth=0)
    handles.append(_proxy("accuracy: solid on adversarial, dotted on clean training images", linestyle="-"))
    handles.append(_proxy("shaded: ± one std over seeds", linewidth=6, alpha=0.25))
    loss_ax.set_ylabel("training loss")
    acc_ax.set_ylabel("training accuracy (%)")
    acc_ax.set_xlabel("epoch")
    acc_ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in (loss_ax, acc_ax):
        ax.grid(True, alpha=0.3)
    _title(loss_ax, "Training curves: loss and accuracy on the training batches, mean over seeds")
    _legend(fig, handles)
    return _png(fig)


def training_curves_section(
    data: SweepData, figures: dict[str, bytes], lacks: list[str], defaults: SettingKey | None
) -> list[str]:
    """The training-curve figure and what it covers; a note in `lacks` when storage has no per-epoch history."""
    finished = {r["cell_id"] for r in data.rows if r.get("status") == "finished"}
    with_history = {r["cell_id"] for r in data.history}
    without = sorted(finished - with_history)
    png = training_curves_figure(data.history, defaults)
    if png is None:
        lacks.append(
            f"training curves: no per-epoch history in storage ({HISTORY_FILE}, cells/*/history.json); "
            "sweeps run before it was recorded have none"
        )
        return []
    figures[CURVES_FIGURE] = png
    epochs = {(r["cell_id"], r["epoch"]) for r in data.history}
    text = (
        f"Loss and accuracy on the training batches per epoch, from {len(with_history)} cell(s) "
        f"({len(epochs)} cell-epochs, `{HISTORY_FILE}`): one colour per setting, the mean over its seeds with "
        "± one standard deviation shaded. A curve still falling at its last epoch has not converged; cells still "
        "running contribute the epochs they have trained so far."
    )
    if without:
        lacks.append(
            f"training curves: {len(without)} finished cell(s) have no per-epoch history: {', '.join(without)}"
        )
    return ["## Training curves", "", text, "", f"![Training curves]({CURVES_FIGURE})", ""]


# ----------------------------------------------------------------------------------------------------------------
# Loading what storage holds


@dataclass
class SweepData:
    storage: SweepStorage
    spec: Spec | None
    rows: list[dict[str, Any]]  # one per (cell, branch), as in results.parquet
    missing: list[dict[str, Any]]  # axes (and cell_id) of wanted cells with no row
    notes: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)  # one per (cell, epoch), as in history.parquet

    @property
    def name(self) -> str:
        return self.spec.name if self.spec else self.storage.url.rstrip("/").rsplit("/", 1)[-1]


class NoSweepError(Exception):
    pass


def sweep_storage(url: str) -> SweepStorage:
    url = url.rstrip("/")
    if "://" not in url:
        url = os.path.abspath(url)
    return SweepStorage(url)


def load_sweep(url: str) -> SweepData:
    """results.parquet, newer cell records and spec.yaml of the sweep at `url`. Raises NoSweepError."""
    storage = sweep_storage(url)
    try:
        fs = storage.fs
        has_results = fs.exists(storage.path(RESULTS_FILE))
        has_spec = fs.exists(storage.path("spec.yaml"))
        has_cells = fs.exists(storage.path("cells"))
    except Exception as err:  # an unknown protocol, an unreachable endpoint, a bucket we may not list
        raise NoSweepError(f"cannot read {storage.url}: {type(err).__name__}: {err}") from None
    if not (has_results or has_spec or has_cells):
        raise NoSweepError(f"no sweep at {storage.url} (no spec.yaml, results.parquet or cells/)")
    notes: list[str] = []
    spec = None
    if has_spec:
        with fs.open(storage.path("spec.yaml"), "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        try:
            spec = parse_spec(text, "spec.yaml")
        except SpecError as err:
            notes.append(f"spec.yaml could not be read ({str(err).splitlines()[0]}): missing cells are not listed")
    else:
        notes.append("no spec.yaml in storage: cells that never started cannot be listed")
    wanted: dict[str, dict[str, Any]] = {}
    if spec is not None:
        try:
            wanted = {cell.cell_id: cell.axes for cell in expand(spec)}
        except SpecError as err:
            notes.append(f"spec.yaml's grid could not be expanded ({str(err).splitlines()[0]})")
    rows: list[dict[str, Any]] = []
    if has_results:
        with fs.open(storage.path(RESULTS_FILE), "rb") as f:
            rows = pq.read_table(io.BytesIO(f.read())).to_pylist()
    # Cells that finished (or failed) after results.parquet was written: the sweep is still running, or its
    # driver died before aggregating. Their result.json is the ground truth.
    finished = {r["cell_id"] for r in rows if r.get("status") == "finished"}
    known = {r["cell_id"] for r in rows}
    newer = {
        cid: record
        for cid, record in (storage.cell_records().items() if has_cells else [])
        if (not wanted or cid in wanted)
        and cid not in finished
        and (record.get("status") == "finished" or cid not in known)
    }
    if newer:
        rows = [r for r in rows if r["cell_id"] not in newer] + result_rows(newer.values())
        notes.append(f"{len(newer)} cell record(s) newer than results.parquet were read from cells/*/")
    if not has_results and not newer:
        notes.append("no results.parquet and no finished cell yet")
    present = {r["cell_id"] for r in rows}
    missing = [{"cell_id": cid, **axes} for cid, axes in wanted.items() if cid not in present]
    history = load_history(storage, rows, (present | wanted.keys()) if has_cells else set(), newer.keys())
    return SweepData(storage, spec, rows, missing, notes, history)


def load_history(
    storage: SweepStorage, rows: list[dict[str, Any]], cell_ids: Iterable[str], newer: Iterable[str]
) -> list[dict[str, Any]]:
    """Per-epoch rows of these cells: history.parquet for the cells it settled (finished when it was written),
    each other cell's own history.json (running, failed or finished since). An older sweep has neither: []."""
    fs = storage.fs
    settled: list[dict[str, Any]] = []
    if fs.exists(storage.path(HISTORY_FILE)):
        with fs.open(storage.path(HISTORY_FILE), "rb") as f:
            settled = pq.read_table(io.BytesIO(f.read())).to_pylist()
        finished = {r["cell_id"] for r in rows if r.get("status") == "finished"} - set(newer)
        settled = [r for r in settled if r["cell_id"] in finished]
    have = {r["cell_id"] for r in settled}
    return settled + history_rows(read_histories(storage, set(cell_ids) - have))


# ----------------------------------------------------------------------------------------------------------------
# The report


@dataclass
class Report:
    markdown: str
    figures: dict[str, bytes]


def render_report(data: SweepData, paper: str = "auto") -> Report:
    spec = data.spec
    defaults = _key(spec.default_axes(), "main") if spec else None
    # The spec's evaluation columns even before anything finished, plus any other N a result holds.
    wanted = [f"acc_pgd_{n}" for n in spec.workload.eval.pgd_steps] if spec else []
    metrics = ["acc_clean", *sorted(set(wanted) | set(pgd_metrics(data.rows)), key=lambda m: int(m[8:]))]
    settings = build_settings(data.rows, data.missing, metrics)
    differences = paper_differences(spec) if spec else ["no spec.yaml to compare the workload with"]
    use_paper = paper == "always" or (paper == "auto" and not differences)
    failed_rows = [r for r in data.rows if r.get("status") != "finished"]

    out = _summary_lines(data, failed_rows) + _reading_guide(paper, use_paper, differences)
    setting_list = list(settings.values())
    lacks = []
    for factor in FACTORS:
        groups = factor_groups(factor, setting_list, defaults)
        if groups:
            out += factor_section(factor, groups, metrics, use_paper, defaults)
        else:
            lacks.append(f"{factor.title}: no two cells differ only in {factor.what}")
    figures: dict[str, bytes] = {}
    out += figures_section(setting_list, metrics, use_paper, defaults, figures, lacks)
    out += training_curves_section(data, figures, lacks, defaults)
    if len(metrics) == 1:
        lacks.append("robustness: no PGD-N accuracy is evaluated (workload.eval.pgd_steps is empty)")
    elif "acc_pgd_2000" not in metrics:
        lacks.append(f"PGD-2000, the paper's robustness measure: the strongest evaluated is {metrics[-1][8:]} steps")
    if not any(s.n >= MIN_SEEDS for s in setting_list):
        lacks.append("replicates: no setting has 2 or more finished seeds, so no difference can be flagged")

    out += table7_section(settings, metrics, use_paper)
    out += cells_section(data.rows, metrics)
    out += not_finished_section(failed_rows, data.missing)
    if lacks or data.notes:
        out += ["## What this report lacks", ""]
        out += [f"- {_md(line)}" for line in lacks + data.notes]
        out += [""]
    return Report("\n".join(out).rstrip() + "\n", figures)


def _summary_lines(data: SweepData, failed_rows: list[dict[str, Any]]) -> list[str]:
    """Title, cell counts, storage, the workload in one sentence and the training time spent."""
    cell_ids = {r["cell_id"] for r in data.rows}
    finished_ids = {r["cell_id"] for r in data.rows if r.get("status") == "finished"}
    failed_ids = {r["cell_id"] for r in failed_rows}
    out = [f"# Sweep `{data.name}`: results", ""]
    total = len(cell_ids) + len(data.missing)
    summary = f"{total} cells: {len(finished_ids)} finished, {len(failed_ids)} failed, {len(data.missing)} missing"
    out += [f"{summary} (missing: no result yet — pending, running or interrupted).", ""]
    out += [f"Storage: `{data.storage.url}` · generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", ""]
    if data.spec is not None:
        w = data.spec.workload
        out += [
            f"Workload: data `{w.data.url}`, ResNet-{w.model.depth} ({w.model.stem} stem, width {w.model.width:g}), "
            f"{w.recipe.epochs} epochs, batch {w.recipe.batch_size}, training PGD-{w.attack.steps} "
            f"(eps {w.attack.eps:g}), evaluation on {w.eval.subset} images with "
            f"{'targeted' if w.eval.targeted else 'untargeted'} PGD-{{{', '.join(map(str, w.eval.pgd_steps))}}} "
            f"(eps {w.eval.eps:g}, step {w.eval.step_size:g}).",
            "",
        ]
    train_hours = sum(float(r.get("train_seconds") or 0.0) for r in _one_row_per_cell(data.rows)) / 3600
    gpu_hours = sum(float(r.get("gpu_hours") or 0.0) for r in _one_row_per_cell(data.rows))
    return out + [f"Training time of finished cells: {train_hours:.2f} h ({gpu_hours:.1f} GPU-hours).", ""]


def _reading_guide(paper: str, use_paper: bool, differences: list[str]) -> list[str]:
    """How to read the tables: the statistics, the noise rule, and whether (and why not) the paper's numbers show."""
    out = [
        "## How to read the tables",
        "",
        "Accuracy in %, mean ± sample standard deviation over the n finished seeds of a setting (no ± with n = 1). "
        "In a factor table each row is compared with the reference row `(ref)` of its group, which differs from it "
        "in that factor only: `(Δ +1.8)` is the difference of the means. "
        f"**Noise rule:** {FLAG} marks a difference larger than the seed-to-seed noise: both rows have n ≥ 2 and "
        "|Δ| > 2 × pooled standard deviation, pooled = √(((n₁−1)s₁² + (n₂−1)s₂²)/(n₁+n₂−2)). "
        "A difference with n < 2 on either side is never flagged. `*` marks BN* (running statistics used in "
        "training for the last epochs, Section 4.3). The reference of a group is the spec's default value of "
        "the factor when present, else its first value.",
        "",
    ]
    if use_paper:
        return out + [
            "`↳ paper` rows give the paper's number for the same setting (Xie & Yuille 2020, Table 7; clean "
            "accuracies of standard training and MBN_clean from Table 1).",
            "",
        ]
    if paper == "never":
        return out + ["The paper's numbers are not shown (`--paper never`).", ""]
    not_shown = "The paper's numbers are not shown: this workload is not the paper's setting — "
    return out + [not_shown + "; ".join(differences) + ". (`--paper always` prints them anyway.)", ""]


def figures_section(
    setting_list: list[Setting],
    metrics: list[str],
    use_paper: bool,
    defaults: SettingKey | None,
    figures: dict[str, bytes],
    lacks: list[str],
) -> list[str]:
    """The PGD curves (Figures 2 and 3), accuracy vs depth (Figure 7) and the clean/robust trade-off: the PNGs go
    into `figures`, what could not be drawn into `lacks`; returns the section's lines."""
    context = _main_context(setting_list, defaults)
    figure_lines: list[str] = []
    if context is not None:
        main = [s for s in setting_list if _in_context(s.key, context) and s.key.base_norm != "mbn"]
        mbn = [s for s in setting_list if _in_context(s.key, context) and s.key.base_norm == "mbn"]
        for name, chosen, title in (
            ("accuracy_vs_pgd.png", main, "Figure 2: accuracy vs PGD iterations, BN and GN"),
            ("accuracy_vs_pgd_mbn.png", mbn, "Figure 3: accuracy vs PGD iterations, MBN branches"),
        ):
            png = pgd_curve_figure(chosen, metrics, title, use_paper, context)
            if png:
                figures[name] = png
                figure_lines += [f"![{title}]({name})", ""]
    png = depth_figure(setting_list, metrics, use_paper, defaults)
    if png:
        figures["accuracy_vs_depth.png"] = png
        figure_lines += ["![Figure 7: accuracy vs depth](accuracy_vs_depth.png)", ""]
    else:
        lacks.append("accuracy vs depth figure (Figure 7): no setting has finished cells at two depths")
    png = tradeoff_figure(setting_list, metrics, use_paper, context) if context else None
    if png:
        figures["clean_vs_robust.png"] = png
        figure_lines += ["![Clean vs robust accuracy](clean_vs_robust.png)", ""]
    if not figure_lines:
        return []
    if not context:
        return ["## Figures", "", *figure_lines]
    return [
        "## Figures",
        "",
        f"The PGD curves and the trade-off plot show the settings at {_context_text(context)} "
        "(and standard training); the other settings are in the tables. Error bars: ± one standard deviation "
        "over seeds.",
        "",
        *figure_lines,
    ]


def _one_row_per_cell(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for row in rows:
        seen.setdefault(row["cell_id"], row)
    return list(seen.values())


def not_finished_section(failed_rows: list[dict[str, Any]], missing: list[dict[str, Any]]) -> list[str]:
    if not failed_rows and not missing:
        return ["## Missing and failed cells", "", "None: every cell of the grid finished.", ""]
    body = []
    for row in _one_row_per_cell(failed_rows):
        where = " ".join(f"{a}={row[a]}" for a in AXES)
        error = " ".join(str(row.get("error") or "unknown error").split())[:200]
        body.append([f"`{row['cell_id']}`", "failed", _md(where), _md(error)])
    for cell in sorted(missing, key=lambda a: a["cell_id"]):
        body.append([f"`{cell['cell_id']}`", "missing", _md(" ".join(f"{a}={cell[a]}" for a in AXES)), ""])
    return [
        "## Missing and failed cells",
        "",
        f"{len(missing)} missing (in spec.yaml's grid, no result yet), {len(_one_row_per_cell(failed_rows))} failed. "
        "`python -m orchestrator.status` shows which are running; re-submitting the sweep runs the rest.",
        "",
        *_table(["cell", "state", "axes", "error"], body),
        "",
    ]


def write_report(storage: SweepStorage, report: Report) -> str:
    folder = storage.path(REPORT_DIR)
    for name, png in report.figures.items():
        storage.write_bytes_atomic(f"{folder}/{name}", png)
    storage.write_bytes_atomic(f"{folder}/{REPORT_FILE}", report.markdown.encode("utf-8"))
    fs = storage.fs
    for path in fs.ls(folder, detail=False):  # figures of an earlier report that this one no longer has
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".png") and name not in report.figures:
            fs.rm(path)
    return f"{storage.url}/{REPORT_DIR}/{REPORT_FILE}"


def build_report(sweep_url: str, paper: str = "auto") -> str:
    """Write `report/report.md` and its figures for the sweep at `sweep_url`; return the report's URL.

    `paper`: "auto" prints the paper's numbers only where the workload is the paper's setting, "always" or
    "never". Raises NoSweepError when nothing at `sweep_url` looks like a sweep.
    """
    if paper not in ("auto", "always", "never"):
        raise ValueError(f"paper must be auto, always or never, not {paper!r}")
    data = load_sweep(sweep_url)
    return write_report(data.storage, render_report(data, paper))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", help="the sweep's folder: STORAGE_URL/NAME, e.g. ./runs/smoke or s3://b/p/smoke")
    parser.add_argument(
        "--paper",
        choices=("auto", "always", "never"),
        default="auto",
        help="print the paper's numbers beside ours: only for the paper's setting (auto), always, never",
    )
    args = parser.parse_args(argv)
    try:
        url = build_report(args.sweep, args.paper)
    except NoSweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    print(url)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
