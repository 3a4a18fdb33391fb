"""The names a cell's evaluation travels under, from the worker's report to results.parquet and the report.

A worker reports its final evaluation as `eval/<branch>/<metric>` (branch `main`, or `mbn_adv` / `mbn_clean` for
an MBN model, Table 1); the metric is `acc_clean` or `acc_pgd_<N>` for targeted PGD-N (Section 3). These helpers
are the only place that builds or parses those strings, so a reader never depends on a convention it restates.
"""

from __future__ import annotations

from collections.abc import Iterable

CLEAN = "acc_clean"
PGD_PREFIX = "acc_pgd_"
EVAL_PREFIX = "eval/"


def pgd_metric(steps: int) -> str:
    """`acc_pgd_<steps>`: accuracy under targeted PGD with `steps` iterations."""
    return f"{PGD_PREFIX}{steps}"


def pgd_steps(metric: str) -> int | None:
    """N of an `acc_pgd_<N>` metric; None for any other name."""
    if not metric.startswith(PGD_PREFIX):
        return None
    tail = metric.removeprefix(PGD_PREFIX)
    return int(tail) if tail.isdigit() else None


def pgd_metrics(names: Iterable[str]) -> list[str]:
    """The PGD metrics among `names`, weakest attack first."""
    found = {name for name in names if pgd_steps(name) is not None}
    return sorted(found, key=lambda name: pgd_steps(name) or 0)


def strongest_pgd(names: Iterable[str]) -> str | None:
    """The PGD metric with the most steps among `names`, or None."""
    ordered = pgd_metrics(names)
    return ordered[-1] if ordered else None


def metric_label(metric: str) -> str:
    """ "clean" or "PGD-<N>", for tables and figures."""
    steps = pgd_steps(metric)
    return "clean" if metric == CLEAN else f"PGD-{steps}" if steps is not None else metric


def eval_key(branch: str, metric: str) -> str:
    return f"{EVAL_PREFIX}{branch}/{metric}"


def parse_eval_key(key: str) -> tuple[str, str] | None:
    """(branch, metric) of an `eval/<branch>/<metric>` key; None for any other key."""
    if not key.startswith(EVAL_PREFIX):
        return None
    branch, _, metric = key.removeprefix(EVAL_PREFIX).partition("/")
    return (branch, metric) if branch and metric else None
