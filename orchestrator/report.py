"""`python -m orchestrator.report STORAGE_URL/NAME`: the study's report, rebuilt from storage alone.

Reads `results.parquet` (plus any cell that finished after it was written, from `cells/*/result.json`) and
`spec.yaml`, and writes `report/report.md` with PNG figures beside it, in the sweep's storage (any fsspec URL).

What the report holds, as far as the grid supports it (a factor needs >= 2 values among otherwise-equal cells):

- the paper's findings, each judged by the comparison that tests it (reproduced, contradicted, inconclusive);
- one table per factor, laid out like the paper: clean ratio (Figure 1), training strategy (Figure 2), normalisation
  (Table 1: BN vs MBN_adv vs MBN_clean vs GN), BN* vs BN (Tables 2 and 5), PGD-N for training (Table 4), batch size
  (Table 6), depth (Figure 7), each followed by its comparisons (Δ with its 95 % confidence interval, p, the test,
  n, the minimum detectable effect of a non-significant result: `orchestrator.stats`); then every setting
  (Table 7) and every cell and branch (± the binomial error of the evaluation subset);
- training health (`orchestrator.health`): stuck seeds, loss still falling at an LR decay, an evaluation attack
  that cannot reach eps; a verdict resting on flagged cells says so;
- figures: accuracy vs PGD iterations (Figures 2 and 3), accuracy vs depth (Figure 7), clean vs robust accuracy,
  training curves per seed with the learning rate (`history.parquet`, plus `cells/*/history.json` of cells it does
  not cover yet);
- the two domains: the domain gap per setting, MBN_clean vs MBN_adv running statistics (Figure 5) and a BN
  network's batch vs running statistics (Figure 6), where the cells recorded them (`domain_gap`, `bn_statistics`);
- what is missing or failed (cells of spec.yaml's grid without a result), and what the grid lacks.

Where the workload is the paper's (Section 3: ImageNet-style data, ResNet stem for 224 px, width 1, 110 epochs,
targeted PGD with eps 16 and evaluation step 1), the paper's numbers (Table 7 and Table 1) are printed beside ours.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from orchestrator import health
from orchestrator.axes import AXES
from orchestrator.grid import expand
from orchestrator.paper import PAPER, PAPER_PGD, SettingKey, paper_differences
from orchestrator.report_figures import (
    CURVES_FIGURE,
    bn_statistics_section,
    figures_section,
    history_settings,
    training_curves_figure,
)
from orchestrator.report_tables import (
    FACTORS,
    MIN_SEEDS,
    Judged,
    TableContext,
    build_settings,
    cells_section,
    factor_groups,
    factor_section,
    findings_section,
    markdown_table,
    md,
    pgd_metrics,
    setting_key,
    setting_label,
    stat,
    table7_section,
)
from orchestrator.results import HISTORY_FILE, RESULTS_FILE, history_rows, read_histories, result_rows
from orchestrator.spec import Spec, SpecError, parse_spec
from orchestrator.storage import CONFIG_FILE, SweepStorage
from workloads import metrics as metric_names
from workloads.fs import open_fs

# Re-exported: the report's public names, wherever they live.
__all__ = ["PAPER", "PAPER_PGD", "SettingKey", "build_report", "history_settings", "main", "render_report", "stat"]

EXIT_OK, EXIT_INVALID = 0, 2
REPORT_DIR = "report"
REPORT_FILE = "report.md"


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
        f"({len(epochs)} cell-epochs, `{HISTORY_FILE}`): one colour per setting, each seed a thin line and their "
        "mean a thick one; the learning rate (dashed grey, log scale on the right) shows where it decays. A curve "
        "still falling at its last epoch has not converged; cells still running contribute the epochs they have "
        "trained so far."
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
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # cell id -> its config.json's `train`
    dataset: dict[str, Any] | None = None  # the dataset's meta.json (classes, split sizes), where readable

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
    configs = load_configs(storage, present) if has_cells else {}
    return SweepData(storage, spec, rows, missing, notes, history, configs, load_dataset_meta(storage, spec))


def load_configs(storage: SweepStorage, cell_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The resolved TrainConfig (`train` of cells/<id>/config.json) of each cell that has one."""
    configs = {}
    for cell_id in sorted(cell_ids):
        try:
            config = storage.read_json(storage.cell_path(cell_id, CONFIG_FILE))
        except ValueError:  # not JSON: the cell's results stand, its configuration is unknown
            continue
        if isinstance(config, dict) and isinstance(config.get("train"), dict):
            configs[cell_id] = config["train"]
    return configs


def load_dataset_meta(storage: SweepStorage, spec: Spec | None) -> dict[str, Any] | None:
    """meta.json of the sweep's dataset (workloads.data): the number of classes and the split sizes. A bundled
    dataset is converted into the sweep's storage (orchestrator.sweep), any other is read where the spec points;
    None when neither is readable (the report then says what it could not check)."""
    if spec is None:
        return None
    url = spec.workload.data.url
    try:
        if url.startswith("builtin://"):
            fs, path = storage.fs, storage.path("datasets", url.removeprefix("builtin://"), "meta.json")
        else:
            fs, root = open_fs(url)
            path = f"{root.rstrip('/')}/meta.json"
        meta = json.loads(fs.cat_file(path))
    except Exception:  # absent, unreachable or not ours: the checks that need it are listed as not done
        return None
    return meta if isinstance(meta, dict) else None


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
    defaults = setting_key(spec.default_axes(), "main") if spec else None
    # The spec's evaluation columns even before anything finished, plus any other N a result holds.
    wanted = [metric_names.pgd_metric(n) for n in spec.workload.eval.pgd_steps] if spec else []
    metrics = [metric_names.CLEAN, *metric_names.pgd_metrics({*wanted, *pgd_metrics(data.rows)})]
    settings = build_settings(data.rows, data.missing, metrics)
    differences = paper_differences(spec) if spec else ["no spec.yaml to compare the workload with"]
    use_paper = paper == "always" or (paper == "auto" and not differences)
    failed_rows = [r for r in data.rows if r.get("status") != "finished"]
    lacks: list[str] = []
    flags = health_flags(data, lacks)
    ctx = TableContext(
        metrics,
        use_paper,
        defaults,
        n_images=evaluation_images(data, lacks),
        health_note=lambda cells, metric: health.note(flags, cells, metric),
    )

    setting_list = list(settings.values())
    tables: list[str] = []
    judged: list[Judged] = []
    for factor in FACTORS:
        groups = factor_groups(factor, setting_list, defaults)
        if groups:
            tables += factor_section(factor, groups, ctx, judged)
        else:
            lacks.append(f"{factor.title}: no two cells differ only in {factor.what}")
    out = _summary_lines(data, failed_rows) + findings_section(judged)
    out += _reading_guide(paper, use_paper, differences) + tables
    out += health_section(data, flags) + provenance_section(data.rows)
    figures: dict[str, bytes] = {}
    out += figures_section(setting_list, metrics, use_paper, defaults, figures, lacks)
    out += training_curves_section(data, figures, lacks, defaults)
    out += bn_statistics_section(data.rows, defaults, figures, lacks)
    if len(metrics) == 1:
        lacks.append("robustness: no PGD-N accuracy is evaluated (workload.eval.pgd_steps is empty)")
    elif metric_names.pgd_metric(2000) not in metrics:
        strongest = metric_names.pgd_steps(metrics[-1])
        lacks.append(f"PGD-2000, the paper's robustness measure: the strongest evaluated is {strongest} steps")
    if not any(s.n >= MIN_SEEDS for s in setting_list):
        lacks.append("replicates: no setting has 2 or more finished seeds, so no difference can be tested")

    out += table7_section(settings, ctx)
    out += cells_section(data.rows, ctx)
    out += not_finished_section(failed_rows, data.missing)
    if lacks or data.notes:
        out += ["## What this report lacks", ""]
        out += [f"- {md(line)}" for line in lacks + data.notes]
        out += [""]
    return Report("\n".join(out).rstrip() + "\n", figures)


def evaluation_images(data: SweepData, lacks: list[str]) -> int | None:
    """Images each cell is evaluated on: the spec's (or, without one, the cells' common) eval.subset, capped by
    the evaluation split's size where the dataset's meta.json says it."""
    subsets = {int(c["eval"]["subset"]) for c in data.configs.values() if "subset" in (c.get("eval") or {})}
    subset = data.spec.workload.eval.subset if data.spec else (subsets.pop() if len(subsets) == 1 else None)
    if subset is None:
        lacks.append("binomial error of single cells: the evaluation subset's size is unknown (no spec.yaml)")
        return None
    split = data.spec.workload.data.eval_split if data.spec else "test"
    try:
        return min(subset, int(data.dataset["splits"][split]["num_images"])) if data.dataset else subset
    except (KeyError, TypeError, ValueError):
        return subset


def health_flags(data: SweepData, lacks: list[str]) -> list[health.Flag]:
    """Stuck seeds and loss still falling at an LR decay (from the history), evaluation attacks short of eps
    (from the cells' configs, else the spec's); what could not be checked goes into `lacks`."""
    flags = health.loss_falling_at_decays(data.history)
    classes = (data.dataset or {}).get("num_classes")
    if isinstance(classes, int) and classes > 0:
        flags += health.stuck_seeds(data.history, classes)
    elif data.history:
        lacks.append("stuck seeds: the number of classes is unknown (no readable meta.json of the dataset)")
    evals: dict[str | None, dict[str, Any]] = {cid: c["eval"] for cid, c in data.configs.items() if c.get("eval")}
    if data.spec is not None:
        evals[None] = data.spec.workload.eval.model_dump()
    if evals:
        flags += health.attack_short_of_eps(evals)
    else:
        lacks.append("evaluation attack reach: no spec.yaml or cell config.json says its eps and step size")
    return flags


def provenance_section(rows: list[dict[str, Any]]) -> list[str]:
    """Which code and device produced which rows (orchestrator.provenance): one line per distinct combination,
    so a table that mixes results of two code versions says so."""
    groups: dict[tuple[str, str, str, str], set[str]] = {}
    for row in rows:
        if row.get("status") != "finished":
            continue
        commit = row.get("git_commit")
        key = (
            str(row.get("source_hash") or "not recorded"),
            f"{commit[:12]}{' (dirty)' if row.get('git_dirty') else ''}" if commit else "-",
            str(row.get("torch") or "-"),
            str(row.get("device") or "-"),
        )
        groups.setdefault(key, set()).add(row["cell_id"])
    if not groups:
        return []
    out = ["", "## Code that produced these results", ""]
    if len({key[0] for key in groups}) > 1:
        out += ["These results come from more than one version of the workload code.", ""]
    out += ["| workload source hash | git commit | torch | device | cells |", "| --- | --- | --- | --- | --- |"]
    for (source, commit, torch, device), cells in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        out.append(f"| `{source}` | {commit} | {torch} | {device} | {len(cells)} |")
    return [*out, ""]


def health_section(data: SweepData, flags: list[health.Flag]) -> list[str]:
    # Training is one run whatever the evaluation branch: an MBN cell is named by its setting, not a branch.
    who = {str(r["cell_id"]): (setting_label(setting_key(r, "main")), r["seed"]) for r in [*data.history, *data.rows]}
    out = [
        "## Training health",
        "",
        "Checks that say whether a cell's numbers can be trusted before they are compared. **Stuck**: after the "
        f"first LR decay, accuracy on the adversarial (or clean) training images never reaches {health.STUCK_FACTOR:g}"
        " x chance. **Loss still falling at an LR decay**: over the "
        f"{health.LOSS_WINDOW} epochs before a decay the training loss falls by more than "
        f"{100 * health.LOSS_FALLING:g} % of its level per epoch (least-squares slope): the decay froze a model "
        "that had not converged, as the paper's long plateaus before each decay (epochs 35, 70, 95 of 110) do not. "
        "**Attack short of eps**: N x step size < eps, so PGD-N cannot cross the eps-box from its random start. "
        "A verdict that rests on flagged cells or attacks carries a ⚠ with the reason.",
        "",
    ]
    stuck = [f for f in flags if f.kind == "stuck"]
    falling = [f for f in flags if f.kind == "loss falling"]
    short = [f for f in flags if f.kind == "attack short of eps"]
    if not flags:
        return [*out, "No cell or attack is flagged.", ""]
    if not stuck and (data.dataset or {}).get("num_classes"):
        out += ["Stuck seeds: none.", ""]
    if stuck:
        body = [
            [
                f"`{f.cell_id}`",
                str(who.get(str(f.cell_id), ("?", "?"))[1]),
                md(who.get(str(f.cell_id), ("?",))[0]),
                f.detail,
            ]
            for f in stuck
        ]
        out += ["Stuck seeds:", "", *markdown_table(["cell", "seed", "setting", "why"], body), ""]
    if falling:
        groups: dict[tuple[str, int], list[health.Flag]] = {}
        for f in falling:
            groups.setdefault((who.get(str(f.cell_id), ("?",))[0], f.epoch or 0), []).append(f)
        cells_per_setting: dict[str, set[str]] = {}
        for cid, (label, _) in who.items():
            if any(r["cell_id"] == cid for r in data.history):
                cells_per_setting.setdefault(label, set()).add(cid)
        body = []
        for (label, epoch), group in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
            drops = sorted(100 * (f.value or 0.0) for f in group)
            median = (
                drops[len(drops) // 2] if len(drops) % 2 else (drops[len(drops) // 2 - 1] + drops[len(drops) // 2]) / 2
            )
            total = len(cells_per_setting.get(label, set())) or len(group)
            body.append([md(label), str(epoch), f"{len(group)} of {total}", f"{median:.0f} %"])
        header = ["setting", "LR decay at epoch", "cells flagged", "median loss drop per epoch before it"]
        out += ["Loss still falling when the learning rate decays:", "", *markdown_table(header, body), ""]
    if short:
        out += ["Evaluation attacks that cannot reach eps:", ""]
        out += [f"- {f.detail}" + (f" (cell `{f.cell_id}`)" if f.cell_id else "") for f in short] + [""]
    return out


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
            f"(eps {w.eval.eps:g}, step {w.eval.step_size:g}"
            + (f", worst of {w.eval.restarts} random starts" if w.eval.restarts > 1 else "")
            + (", one attack read at every N" if w.eval.trajectory else "")
            + ").",
            "",
        ]
    train_hours = sum(float(r.get("train_seconds") or 0.0) for r in _one_row_per_cell(data.rows)) / 3600
    gpu_hours = sum(float(r.get("gpu_hours") or 0.0) for r in _one_row_per_cell(data.rows))
    return out + [f"Training time of finished cells: {train_hours:.2f} h ({gpu_hours:.1f} GPU-hours).", ""]


def _reading_guide(paper: str, use_paper: bool, differences: list[str]) -> list[str]:
    """How differences are judged (the statistics of `orchestrator.stats`), and whether (and why not) the paper's
    numbers show."""
    out = [
        "## How differences are judged",
        "",
        "Accuracy in %, mean ± sample standard deviation over the n finished seeds of a setting (with one seed, "
        "± the binomial standard error of its evaluation subset instead). In a factor table each row is compared "
        "with the reference row `(ref)` of its group, which differs from it in that factor only (the spec's "
        "default value of the factor when present, else its first value); `*` marks BN* (running statistics in "
        "training for the last epochs, Section 4.3).",
        "",
        "- **Δ [95% CI]**: the difference of the means in points, with its 95 % confidence interval.",
        "- **Test**: Welch's t-test (unequal variances, unequal n) between independent seeds. Where two settings "
        "share seeds and a training prefix, the paired t-test on the per-seed differences: BN and BN* of one seed "
        "train identically until BN*'s last epochs, and MBN_adv and MBN_clean are one network evaluated through "
        "either set of BNs. Pairing removes the seed-to-seed noise both arms share, so a small consistent "
        "difference can be significant paired and not unpaired.",
        "- **p**: two-sided; a difference is significant at p < 0.05. No correction for the number of "
        "comparisons: among k comparisons with no true effect about 0.05 k are significant by chance.",
        "- **Verdict** against the paper's finding, where it states a direction (clean accuracy, and robustness "
        "under the strongest evaluated attack, as the paper judges robustness at PGD-2000 where its attacks "
        "converge): *reproduced* (significant, same sign), *contradicted* (significant, opposite sign), "
        "*inconclusive* (not significant). A non-significant result gives its minimum detectable effect: the "
        "difference the same test would detect with 80 % power at the observed standard deviations (noncentral "
        "t): smaller effects cannot be ruled out. *n too small*: fewer than 2 seeds (or pairs) on a side; "
        "*no variance*: every seed equal on both sides, so no t-test is defined.",
        "- **⚠**: the comparison rests on cells or an attack flagged under Training health.",
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
        body.append([f"`{row['cell_id']}`", "failed", md(where), md(error)])
    for cell in sorted(missing, key=lambda a: a["cell_id"]):
        body.append([f"`{cell['cell_id']}`", "missing", md(" ".join(f"{a}={cell[a]}" for a in AXES)), ""])
    return [
        "## Missing and failed cells",
        "",
        f"{len(missing)} missing (in spec.yaml's grid, no result yet), {len(_one_row_per_cell(failed_rows))} failed. "
        "`python -m orchestrator.status` shows which are running; re-submitting the sweep runs the rest.",
        "",
        *markdown_table(["cell", "state", "axes", "error"], body),
        "",
    ]


def write_report(storage: SweepStorage, report: Report, folder: str = REPORT_DIR) -> str:
    """The report's files under `<storage>/<folder>`; the report's URL."""
    where = f"{storage.url}/{folder}".rstrip("/")
    folder = storage.path(folder) if folder else storage.root
    for name, png in report.figures.items():
        storage.write_bytes_atomic(f"{folder}/{name}", png)
    storage.write_bytes_atomic(f"{folder}/{REPORT_FILE}", report.markdown.encode("utf-8"))
    if where != f"{storage.url}/{REPORT_DIR}":
        return f"{where}/{REPORT_FILE}"  # a folder of the user's choosing: never remove anything there
    fs = storage.fs
    for path in fs.ls(folder, detail=False):  # figures of an earlier report that this one no longer has
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".png") and name not in report.figures:
            fs.rm(path)
    return f"{where}/{REPORT_FILE}"


def build_report(sweep_url: str, paper: str = "auto", out: str | None = None) -> str:
    """Write `report/report.md` and its figures for the sweep at `sweep_url` (or into the folder `out`, for a
    sweep in storage one may only read); return the report's URL.

    `paper`: "auto" prints the paper's numbers only where the workload is the paper's setting, "always" or
    "never". Raises NoSweepError when nothing at `sweep_url` looks like a sweep.
    """
    if paper not in ("auto", "always", "never"):
        raise ValueError(f"paper must be auto, always or never, not {paper!r}")
    data = load_sweep(sweep_url)
    report = render_report(data, paper)
    if out is None:
        return write_report(data.storage, report)
    return write_report(sweep_storage(out), report, folder="")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", help="the sweep's folder: STORAGE_URL/NAME, e.g. ./runs/smoke or s3://b/p/smoke")
    parser.add_argument(
        "--paper",
        choices=("auto", "always", "never"),
        default="auto",
        help="print the paper's numbers beside ours: only for the paper's setting (auto), always, never",
    )
    parser.add_argument(
        "--out", help="write report.md and its figures into this folder (path or URL) instead of SWEEP/report/"
    )
    args = parser.parse_args(argv)
    try:
        url = build_report(args.sweep, args.paper, args.out)
    except NoSweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    print(url)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
