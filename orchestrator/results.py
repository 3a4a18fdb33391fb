"""results.parquet: one row per (cell, eval branch), rebuilt from the cells' records in storage; history.parquet:
one row per (cell, training epoch), rebuilt from the cells' history.json.

results.parquet columns (README "Storage layout"): cell_id, the grid axes, branch, acc_clean, acc_pgd_<N> for each
evaluated N, epochs, train_seconds, gpu_hours, where measured `domain_gap` and `bn_statistics` (per cell, on each of
its rows: workloads.bn_statistics; JSON text), status; plus `error` (the failure's one-line reason, empty when
finished). A failed cell gets one `main` row with null accuracies, so a reader sees it instead of silently missing it.
Then `sweep` (the sweep's name), the provenance of each finished cell (orchestrator.provenance.PROVENANCE_KEYS: code
hash, git commit, library versions, host, device) and the cell's whole resolved configuration flattened into
`config.<path>` columns (e.g. `config.attack.eps`, `config.model.width`; lists as JSON text), so results of several
sweeps can be combined and told apart by any field (orchestrator.api.load_results).

history.parquet columns: cell_id, the grid axes, epoch, then HISTORY_METRICS (null where an epoch did not measure
one: no clean images at clean ratio 0, no adversarial ones in standard training).
"""

from __future__ import annotations

import io
import json
import math
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.axes import AXES, AXIS_TABLE
from orchestrator.provenance import PROVENANCE_KEYS
from orchestrator.records import CellError, CellResult
from orchestrator.redact import redact
from orchestrator.storage import HISTORY_FILE as CELL_HISTORY_FILE
from orchestrator.storage import SweepStorage
from workloads import metrics

RESULTS_FILE = "results.parquet"
HISTORY_FILE = "history.parquet"
# What the training loop reports every epoch (workloads/train.py) that says whether a cell converges.
# Optional per-cell columns (`cell_bn_statistics`); a reader of an older results.parquet finds neither.
BN_STATISTICS_COLUMNS = ("domain_gap", "bn_statistics")
HISTORY_METRICS = ("loss", "train_acc_adv", "train_acc_clean", "lr", "images_per_sec", "epoch_seconds")
_AXIS_TYPES = {axis.name: pa.type_for_alias(axis.column_type) for axis in AXIS_TABLE}


def flatten_config(config: Mapping[str, Any], prefix: str = "config") -> dict[str, Any]:
    """`{"attack": {"eps": 16}}` -> `{"config.attack.eps": 16}`; lists become JSON text (one Parquet type)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            flat |= flatten_config(value, name)
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(list(value))
        else:
            flat[name] = value
    return flat


def result_rows(
    records: Iterable[Mapping[str, Any]], sweep: str | None = None, configs: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for record in records:
        finished = record.get("status", "finished") == "finished"
        result = CellResult.from_json(record) if finished else None
        failure = None if result is not None else CellError.from_json(record)
        axes = result.axes if result is not None else failure.axes if failure is not None else {}
        cell_id = str(record["cell_id"])
        base = {"cell_id": cell_id} | {axis: axes.get(axis) for axis in AXES}
        extra: dict[str, Any] = {"sweep": sweep}
        provenance = result.provenance if result is not None else {}
        extra |= {key: provenance.get(key) for key in PROVENANCE_KEYS}
        config = (configs or {}).get(cell_id)
        if config is not None:
            extra |= flatten_config(config.model_dump(mode="json") if hasattr(config, "model_dump") else config)
        common = {
            "epochs": result.epochs if result is not None else 0,
            "train_seconds": result.train_seconds if result is not None else 0.0,
            "gpu_hours": result.gpu_hours if result is not None else 0.0,
            "status": "finished" if result is not None else "failed",
            "error": failure.error if failure is not None else "",
        }
        common |= cell_bn_statistics(record)
        branches = (result.branches if result is not None else {}) or {"main": {}}
        for branch, accuracies in sorted(branches.items()):
            rows.append(base | {"branch": branch} | dict(accuracies) | common | extra)
    return rows


def cell_bn_statistics(record: Mapping[str, Any]) -> dict[str, Any]:
    """The optional per-cell columns of BN statistics (workloads.bn_statistics): `domain_gap`, and `bn_statistics`
    (the figures' data as JSON text, so results.parquet alone can draw Figures 5 and 6); {} when the record has
    none (GN cells, records from before they were measured)."""
    fields: dict[str, Any] = {}
    if isinstance(record.get("domain_gap"), int | float):
        fields["domain_gap"] = float(record["domain_gap"])
    if isinstance(record.get("bn_statistics"), Mapping):
        fields["bn_statistics"] = json.dumps(record["bn_statistics"], separators=(",", ":"))
    return fields


def results_table(
    records: Iterable[Mapping[str, Any]], sweep: str | None = None, configs: Mapping[str, Any] | None = None
) -> pa.Table:
    rows = result_rows(records, sweep, configs)
    pgd_columns = metrics.pgd_metrics({k for row in rows for k in row})
    columns = ["cell_id", *AXES, "branch", "acc_clean", *pgd_columns, "epochs", "train_seconds", "gpu_hours"]
    # Only when some cell measured them: a table of cells without BN statistics keeps its earlier columns.
    columns += [c for c in BN_STATISTICS_COLUMNS if any(row.get(c) is not None for row in rows)]
    columns += ["status", "error", "sweep", *PROVENANCE_KEYS]
    columns += sorted({k for row in rows for k in row if k.startswith("config.")})
    types = (
        _AXIS_TYPES
        | {
            "epochs": pa.int64(),
            "train_seconds": pa.float64(),
            "gpu_hours": pa.float64(),
            "acc_clean": pa.float64(),
            "domain_gap": pa.float64(),
        }
        | dict.fromkeys(pgd_columns, pa.float64())
    )
    rows.sort(key=lambda r: (r["cell_id"], r["branch"]))
    arrays = {}
    types |= {"git_dirty": pa.bool_()}
    for column in columns:
        values = [_clean(row.get(column)) for row in rows]
        if column.startswith("config."):
            arrays[column] = pa.array(values)  # each config field has one type across cells; pyarrow infers it
        else:
            arrays[column] = pa.array(values, type=types.get(column, pa.string()))
    return pa.table(arrays)


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def _write_table(storage: SweepStorage, name: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes_atomic(storage.path(name), buffer.getvalue())


def write_results(
    storage: SweepStorage,
    records: Iterable[Mapping[str, Any]],
    sweep: str | None = None,
    configs: Mapping[str, Any] | None = None,
) -> pa.Table:
    """results.parquet from the records, then history.parquet from the same cells' history.json.

    The history is a by-product: a cell whose history cannot be read is left out with a warning, and a failure to
    write history.parquet is a warning too, never a reason to lose results.parquet.
    """
    records = list(records)
    table = results_table(records, sweep, configs)
    _write_table(storage, RESULTS_FILE, table)
    try:
        _write_table(storage, HISTORY_FILE, history_table(read_histories(storage, [r["cell_id"] for r in records])))
    except Exception as err:
        print(f"warning: {HISTORY_FILE} not written ({type(err).__name__}: {redact(str(err))})", file=sys.stderr)
    return table


def read_results(storage: SweepStorage) -> pa.Table:
    with storage.fs.open(storage.path(RESULTS_FILE), "rb") as f:
        return pq.read_table(io.BytesIO(f.read()))


# ----------------------------------------------------------------------------------------------------------------
# Per-epoch history: cells/<cell_id>/history.json is {"cell_id", "axes", "epochs": [row, ...]}, one row per epoch,
# sorted by epoch; a row is {"epoch": int} plus HISTORY_METRICS (null when not measured).


def epoch_row(result: Mapping[str, Any]) -> dict[str, Any] | None:
    """The history row of one reported result; None for a report that trained nothing (the evaluation-only
    report of a run resumed at its last epoch has no loss)."""
    if result.get("epoch") is None or result.get("loss") is None:
        return None
    row: dict[str, Any] = {"epoch": int(result["epoch"])}
    for metric in HISTORY_METRICS:
        value = result.get(metric)
        row[metric] = None if value is None else float(value)
    return row


def merge_epochs(*histories: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per epoch, sorted; where several histories hold an epoch, the later argument's row wins: an epoch
    trained again after a resume replaces the interrupted attempt's row instead of adding a second one."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for rows in histories:
        for row in rows:
            by_epoch[int(row["epoch"])] = dict(row)
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def read_histories(storage: SweepStorage, cell_ids: Iterable[str]) -> list[dict[str, Any]]:
    """The history.json of each of these cells that has one. An unreadable one is skipped with a warning."""
    histories = []
    for cell_id in sorted(set(cell_ids)):
        try:
            history = storage.read_json(storage.cell_path(cell_id, CELL_HISTORY_FILE))
        except ValueError as err:  # not JSON: written by something else; the cell's results are unaffected
            print(f"warning: cell {cell_id}: {CELL_HISTORY_FILE} unreadable ({err}); left out", file=sys.stderr)
            continue
        if history and history.get("epochs"):
            histories.append(history)
    return histories


def history_rows(histories: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for history in histories:
        base = {"cell_id": history["cell_id"]} | {axis: (history.get("axes") or {}).get(axis) for axis in AXES}
        rows += [base | {"epoch": row["epoch"]} | {m: row.get(m) for m in HISTORY_METRICS} for row in history["epochs"]]
    rows.sort(key=lambda r: (r["cell_id"], r["epoch"]))
    return rows


def history_table(histories: Iterable[Mapping[str, Any]]) -> pa.Table:
    rows = history_rows(histories)
    types = _AXIS_TYPES | {"epoch": pa.int64()} | dict.fromkeys(HISTORY_METRICS, pa.float64())
    columns = ["cell_id", *AXES, "epoch", *HISTORY_METRICS]
    arrays = {}
    for column in columns:
        arrays[column] = pa.array([_clean(r.get(column)) for r in rows], type=types.get(column, pa.string()))
    return pa.table(arrays)
