"""The report's figures (matplotlib's Agg canvas, no pyplot state: safe in any thread of the driver): accuracy
against PGD iterations (Figures 2 and 3), against depth (Figure 7), clean against robust accuracy, the training
curves per seed with the learning rate, and the BN statistics of the two domains (Figures 5 and 6) with the
domain gap per setting.
"""

from __future__ import annotations

import io
import json
import math
import textwrap
from typing import Any

from orchestrator.paper import PAPER, PAPER_PGD, SettingKey
from orchestrator.report_tables import (
    Setting,
    adversarial,
    full_label,
    markdown_table,
    md,
    metric_header,
    setting_key,
    setting_label,
    stat,
    table7_order,
)
from orchestrator.results import HISTORY_METRICS
from workloads import metrics as metric_names

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
        if adversarial(s.key):
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
    return key.depth == depth and key.batch_size == batch and (key.pgd_steps == steps or not adversarial(key))


def _context_text(context: tuple[int, int, int]) -> str:
    depth, batch, steps = context
    return f"ResNet-{depth}, batch {batch}, PGD-{steps} for training"


def pgd_curve_figure(
    settings: list[Setting], metrics: list[str], title: str, paper: bool, context: tuple[int, int, int]
) -> bytes | None:
    """Figures 2 and 3: accuracy against the number of PGD iterations (log x), one curve per setting."""
    pgd = [m for m in metrics if m != "acc_clean"]
    curves = sorted((s for s in settings if s.n and any(s.stat(m) for m in pgd)), key=lambda s: table7_order(s.key))
    if not curves or not pgd:
        return None
    fig = _figure(8.5, 4.2 + _legend_height(len(curves) + 1))
    ax = fig.add_subplot()
    steps = [metric_names.pgd_steps(m) or 0 for m in pgd]
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
        px = [n for n in PAPER_PGD if metric_names.pgd_metric(n) in theirs]
        if px:
            py = [theirs[metric_names.pgd_metric(n)] for n in px]
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
    robust_name = metric_header(robust) if robust else ""
    ordered = sorted(lines.items(), key=lambda item: table7_order(item[0]))
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
    chosen = sorted((s for s in settings if _in_context(s.key, context)), key=lambda s: table7_order(s.key))
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
    ax.set_xlabel(f"robust accuracy (%), {metric_header(robust)}")
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
        epochs = grouped.setdefault(setting_key(row, "main"), {})
        for metric in HISTORY_METRICS:
            value = row.get(metric)
            if value is not None and math.isfinite(value):
                epochs.setdefault(int(row["epoch"]), {}).setdefault(metric, []).append(float(value))
    return grouped


def training_curves_figure(history: list[dict[str, Any]], defaults: SettingKey | None) -> bytes | None:
    """Loss (top, with the learning rate on a log-scaled right axis) and training accuracy (bottom: adversarial
    batches solid, clean dotted) against the epoch, one colour per setting: every seed thin, their mean thick."""
    grouped = history_settings(history)
    if not grouped:
        return None
    per_cell: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(history, key=lambda r: (r["cell_id"], r["epoch"])):
        per_cell.setdefault(row["cell_id"], []).append(row)
    ordered = sorted(grouped.items(), key=lambda item: table7_order(item[0]))
    fig = _figure(8.5, 6.6 + _legend_height(len(ordered) + 3))
    loss_ax, acc_ax = fig.subplots(2, 1, sharex=True)
    lr_ax = loss_ax.twinx()
    handles = []
    schedules: set[tuple[tuple[int, float], ...]] = set()
    panels = ((loss_ax, "loss", "-"), (acc_ax, "train_acc_adv", "-"), (acc_ax, "train_acc_clean", ":"))
    for (colour, marker), (key, epochs) in zip(_styles(len(ordered)), ordered, strict=True):
        cells = [rows for rows in per_cell.values() if setting_key(rows[0], "main") == key]
        handles.append(_proxy(f"{full_label(key, defaults)} (n={len(cells)})", color=colour, marker=marker))
        for ax, metric, style in panels:
            scale = 1.0 if metric == "loss" else 100.0
            for rows in cells:  # one thin line per seed: a stuck or lagging seed stands apart from the rest
                seed = [(r["epoch"], scale * r[metric]) for r in rows if _finite(r.get(metric))]
                if seed:
                    ax.plot(*zip(*seed, strict=True), color=colour, linestyle=style, linewidth=0.7, alpha=0.5)
            points = [(e, st) for e in sorted(epochs) if (st := stat(epochs[e].get(metric, []))) is not None]
            if points:
                mean = [scale * st.mean for _, st in points]
                x = [e for e, _ in points]
                ax.plot(x, mean, color=colour, linestyle=style, linewidth=1.8, marker=marker, markersize=4)
        for rows in cells:
            schedules.add(tuple((r["epoch"], r["lr"]) for r in rows if _finite(r.get("lr")) and r["lr"] > 0))
    schedules.discard(())
    for schedule in schedules:  # cells of one recipe share a schedule: one line each
        lr_ax.step(*zip(*schedule, strict=True), where="mid", color="0.45", linestyle="--", linewidth=1.0)
    if schedules:
        lr_ax.set_yscale("log")
        lr_ax.set_ylabel("learning rate (log)")
        handles.append(_proxy("dashed grey: learning rate (right axis)", linestyle="--", color="0.45"))
    handles.append(_proxy("accuracy: solid on adversarial, dotted on clean training images", linestyle="-"))
    handles.append(_proxy("thin: one seed; thick: mean over seeds", linewidth=0.7))
    loss_ax.set_ylabel("training loss")
    acc_ax.set_ylabel("training accuracy (%)")
    acc_ax.set_xlabel("epoch")
    acc_ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in (loss_ax, acc_ax):
        ax.grid(True, alpha=0.3)
    _title(loss_ax, "Training curves: loss and accuracy on the training batches, per seed and their mean")
    _legend(fig, handles)
    return _png(fig)


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)


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


# ----------------------------------------------------------------------------------------------------------------
# Two domains (Section 4.2, Figure 5), batch vs running statistics (Section 4.3, Figure 6), the domain gap: from each
# cell's `bn_statistics` and `domain_gap` (workloads.bn_statistics), where the cells recorded them.

MBN_FIGURE = "mbn_running_statistics.png"
BN_FIGURE = "bn_batch_statistics.png"


def cells_with_bn_statistics(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(row, figure data) of every finished cell that recorded BN statistics, one row per cell."""
    found: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for row in rows:
        text = row.get("bn_statistics")
        if row.get("status") != "finished" or not isinstance(text, str) or row["cell_id"] in found:
            continue
        try:
            summary = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(summary, dict) and summary.get("channels"):
            found[row["cell_id"]] = (row, summary)
    return [found[cell_id] for cell_id in sorted(found)]


def _off_defaults(row: dict[str, Any], defaults: SettingKey | None) -> bool:
    """Whether a cell lies outside the spec's default depth, batch size and training PGD-N."""
    if defaults is None:
        return False
    key = setting_key(row, "main")
    return (key.depth, key.batch_size, key.pgd_steps) != (defaults.depth, defaults.batch_size, defaults.pgd_steps)


def figure5_cell(
    cells: list[tuple[dict[str, Any], dict[str, Any]]], defaults: SettingKey | None
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The MBN cell Figure 5 shows: both branches trained (a gap was measured), preferably the paper's MBN setting
    (100% adv + 100% clean, no BN*) at the spec's defaults, then the lowest seed."""
    mbn = [
        (r, s) for r, s in cells if {"adv", "clean"} <= set(s.get("running") or {}) and s.get("domain_gap") is not None
    ]
    if not mbn:
        return None
    return min(
        mbn,
        key=lambda c: (
            _off_defaults(c[0], defaults),
            str(c[0]["norm"]).endswith("*"),
            abs(float(c[0]["clean_ratio"]) - 1.0),
            c[0]["seed"],
            c[0]["cell_id"],
        ),
    )


def figure6_cell(
    cells: list[tuple[dict[str, Any], dict[str, Any]]], defaults: SettingKey | None
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The BN cell Figure 6 shows: adversarially trained with the fewest clean images (the paper: 0%, where BN's
    running statistics come from adversarial images alone), no BN*, at the spec's defaults, then the lowest seed."""
    bn = [(r, s) for r, s in cells if s.get("batch") and "main" in (s.get("running") or {})]
    if not bn:
        return None
    return min(
        bn,
        key=lambda c: (
            c[0]["strategy"] == "standard",
            float(c[0]["clean_ratio"]),
            str(c[0]["norm"]).endswith("*"),
            _off_defaults(c[0], defaults),
            c[0]["seed"],
            c[0]["cell_id"],
        ),
    )


def _statistics_figure(
    summary: dict[str, Any], series: list[tuple[str, dict[str, list[float]], Any, str, str]], title: str
) -> bytes:
    """Mean (top) and variance (bottom) on the sampled channels, one line per (label, values, colour, marker,
    linestyle); the x axis names the channels."""
    channels = [int(c) for c in summary["channels"]]
    x = list(range(len(channels)))
    fig = _figure(8.5, 6.0 + _legend_height(len(series)))
    mean_ax, var_ax = fig.subplots(2, 1, sharex=True)
    handles = []
    for label, values, colour, marker, style in series:
        mean_ax.plot(x, values["mean"], color=colour, marker=marker, linestyle=style, markersize=5)
        var_ax.plot(x, values["var"], color=colour, marker=marker, linestyle=style, markersize=5)
        handles.append(_proxy(label, color=colour, marker=marker, linestyle=style))
    mean_ax.set_ylabel("mean")
    var_ax.set_ylabel("variance")
    var_ax.set_xticks(x, [str(c) for c in channels], fontsize=7)
    var_ax.set_xlabel(f"channel of {summary['layer']} (sampled)")
    for ax in (mean_ax, var_ax):
        ax.grid(True, alpha=0.3)
    _title(mean_ax, title)
    _legend(fig, handles)
    return _png(fig)


def mbn_statistics_figure(row: dict[str, Any], summary: dict[str, Any], defaults: SettingKey | None) -> bytes:
    """Figure 5: running mean and variance of MBN_clean and MBN_adv on the sampled channels of one res3 layer."""
    running = summary["running"]
    label = full_label(setting_key(row, "main"), defaults)
    return _statistics_figure(
        summary,
        [
            ("MBN_clean running statistics", running["clean"], "tab:blue", "o", "-"),
            ("MBN_adv running statistics", running["adv"], "tab:red", "s", "-"),
        ],
        f"Figure 5: running statistics of MBN_clean and MBN_adv — {label}, seed {row['seed']}",
    )


def bn_statistics_figure(row: dict[str, Any], summary: dict[str, Any], defaults: SettingKey | None) -> bytes:
    """Figure 6: batch mean and variance over clean and over adversarial images against the running statistics."""
    batch, running = summary["batch"], summary["running"]["main"]
    label = full_label(setting_key(row, "main"), defaults)
    images = summary.get("images")
    per = f" ({images} images each)" if images else ""
    return _statistics_figure(
        summary,
        [
            (f"batch statistics, clean images{per}", batch["clean"], "tab:blue", "o", "-"),
            (f"batch statistics, adversarial images{per}", batch["adv"], "tab:red", "s", "-"),
            ("running statistics", running, "0.2", "D", "--"),
        ],
        f"Figure 6: batch vs running statistics of BN — {label}, seed {row['seed']}",
    )


def _gap_text(values: list[float]) -> str:
    s = stat(values)
    if s is None:
        return "—"
    return f"{s.mean:.3g}" + (f" ± {s.std:.2g}" if s.std is not None else "")


def bn_statistics_section(
    rows: list[dict[str, Any]], defaults: SettingKey | None, figures: dict[str, bytes], lacks: list[str]
) -> list[str]:
    """The domain gap per setting, Figure 5 and Figure 6, from whatever the cells recorded; the PNGs go into
    `figures`, what could not be shown into `lacks`. [] when no cell recorded BN statistics."""
    cells = cells_with_bn_statistics(rows)
    if not cells:
        lacks.append(
            "BN statistics (Figures 5 and 6, the domain gap): no finished cell recorded them (GN only, or cells "
            "trained before they were measured)"
        )
        return []
    out = [
        "## Two domains: BN statistics (Figures 5 and 6)",
        "",
        "Section 4.2 argues that clean and adversarial images come from two domains that one BN cannot normalise "
        "together; Section 4.3 that a BN network's batch statistics need not match its running statistics. Each "
        "cell measured after training, on its first evaluation batch: for MBN the running statistics of MBN_clean "
        "and MBN_adv; for BN the statistics of each BN layer's input over clean images and over the same images "
        "attacked by the cell's training attack (eval mode). **Domain gap**: per channel the Bhattacharyya "
        "distance between the two Gaussians (clean, adversarial) these statistics describe, 0 where they agree "
        "and growing with a shift of the mean or a ratio of the variances; averaged over channels, then over all "
        "BN layers. MBN gaps (running statistics) and BN gaps (one batch each) measure different statistics: "
        "compare them within a normalisation.",
        "",
    ]
    gaps: dict[SettingKey, list[float]] = {}
    for row, _summary in cells:
        gap = row.get("domain_gap")
        if isinstance(gap, int | float) and math.isfinite(gap):
            gaps.setdefault(setting_key(row, "main"), []).append(float(gap))
    if gaps:
        body = [
            [
                md(full_label(key, defaults)),
                "MBN branches" if key.base_norm == "mbn" else "clean vs adversarial batch",
                str(len(v)),
                _gap_text(v),
            ]
            for key, v in sorted(gaps.items(), key=lambda item: table7_order(item[0]))
        ]
        out += ["Domain gap, mean ± standard deviation over seeds:", ""]
        out += [*markdown_table(["setting", "statistics compared", "n", "domain gap"], body), ""]
    for name, pick, draw, what in (
        (MBN_FIGURE, figure5_cell, mbn_statistics_figure, "Figure 5 (MBN running statistics)"),
        (BN_FIGURE, figure6_cell, bn_statistics_figure, "Figure 6 (BN batch vs running statistics)"),
    ):
        chosen = pick(cells, defaults)
        if chosen is None:
            needs = (
                "an MBN cell with both branches trained" if name == MBN_FIGURE else "an adversarially trained BN cell"
            )
            lacks.append(f"{what}: no finished cell recorded the statistics of {needs}")
            continue
        row, summary = chosen
        figures[name] = draw(row, summary, defaults)
        layer, shown = summary["layer"], len(summary["channels"])
        out += [
            f"{what}: cell `{row['cell_id']}`, layer `{layer}` (res3: the first BN of the last block of the third "
            f"stage), {shown} sampled channels.",
            "",
            f"![{what}]({name})",
            "",
        ]
    return out
