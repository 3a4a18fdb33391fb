"""The Grafana dashboard under deploy/monitoring: every query names a metric a sweep cluster exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from orchestrator.deploy.layout import (
    GRAFANA_DASHBOARD,
    PROJECT_ROOT,
)
from orchestrator.deploy.rules import (
    Doc,
)

# ------------------------------------------------------------------------------------------------------------
# The Grafana dashboard


_PROMQL_WORDS = frozenset(
    {
        *("sum", "avg", "min", "max", "count", "count_values", "topk", "bottomk", "quantile", "stddev", "stdvar"),
        *("by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool"),
        *("rate", "irate", "increase", "delta", "deriv", "abs", "ceil", "floor", "round", "clamp_min", "clamp_max"),
        *("vector", "scalar", "time", "absent", "sort", "sort_desc", "histogram_quantile"),
        *("max_over_time", "min_over_time", "avg_over_time", "last_over_time"),
        *("label_values", "label_replace", "label_join"),
    }
)


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers outside label matchers, groupings, strings,
    durations and function names. Grafana variables ($sweep) count as none."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set(re.findall(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)", text))
    return {name for name in names if name not in _PROMQL_WORDS and not re.fullmatch(r"[0-9eE]+", name)}


def exported_metrics() -> dict[str, set[str]]:
    """Metric names a sweep cluster exports, by source: the sweep's gauges (declared in orchestrator.progress and,
    for storage outages, workloads.fs; exported with Ray's `ray_` prefix) and those Ray's own Grafana dashboards
    chart."""
    sweep: set[str] = set()
    for module in ("orchestrator/progress.py", "workloads/fs.py"):
        source = (PROJECT_ROOT / module).read_text(encoding="utf-8")
        sweep |= {f"ray_{name}" for name in re.findall(r'Gauge\(\s*"([a-z_]+)"', source)}
    from ray.dashboard.modules.metrics.dashboards import default_dashboard_panels

    config = default_dashboard_panels.default_dashboard_config
    ray_own: set[str] = set()
    for panel in [*config.panels, *(panel for row in config.rows for panel in row.panels)]:
        for target in panel.targets:
            # Ray's expressions are format strings with a {global_filters} field.
            ray_own |= promql_metrics(target.expr.format(global_filters='ray_io_cluster=~".*"'))
    return {"sweep": sweep, "ray": ray_own}


def dashboard_queries(dashboard: Doc) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of a Grafana dashboard."""
    queries: list[tuple[str, str]] = []
    for panel in dashboard.get("panels") or []:
        for target in panel.get("targets") or []:
            queries.append((f"panel {panel.get('title')!r}", str(target.get("expr", ""))))
    for variable in (dashboard.get("templating") or {}).get("list") or []:
        if variable.get("type") == "query":
            query = variable.get("query")
            text = query.get("query", "") if isinstance(query, dict) else str(query or "")
            inner = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", text)
            queries.append((f"variable {variable.get('name')!r}", inner.group(1) if inner else text))
    return queries


def check_grafana_dashboard(path: Path = GRAFANA_DASHBOARD, exported: dict[str, set[str]] | None = None) -> list[str]:
    """The dashboard parses as JSON, has panels, every panel has a query, and every query names only metrics the
    product exports (`exported_metrics`); it charts each of the sweep's gauges."""
    where = path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path
    try:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{where}: not a readable JSON file ({type(exc).__name__})"]
    if not isinstance(dashboard, dict) or not dashboard.get("panels"):
        return [f"{where}: no panels"]
    exported = exported if exported is not None else exported_metrics()
    known = set().union(*exported.values())
    problems: list[str] = []
    used: set[str] = set()
    for panel in dashboard["panels"]:
        if panel.get("type") != "row" and not panel.get("targets"):
            problems.append(f"{where}: panel {panel.get('title')!r} has no query")
    for label, expr in dashboard_queries(dashboard):
        names = promql_metrics(expr)
        if not names:
            problems.append(f"{where}: {label} names no metric: {expr!r}")
        used |= names
        for name in sorted(names - known):
            problems.append(f"{where}: {label} queries {name}, which nothing in a sweep cluster exports")
    for name in sorted(exported.get("sweep", set()) - used):
        problems.append(f"{where}: charts no {name}")
    return problems
