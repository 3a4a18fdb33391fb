"""results.parquet: one row per (cell, eval branch), rebuilt from the cells' records in storage.

Columns (DESIGN section 4): cell_id, the grid axes, branch, acc_clean, acc_pgd_<N> for each evaluated N, epochs,
train_seconds, gpu_hours, status; plus `error` (the failure's one-line reason, empty when finished).
A failed cell gets one `main` row with null accuracies, so a reader sees it instead of silently missing it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.storage import SweepStorage

AXES = ("clean_ratio", "norm", "pgd_steps", "depth", "batch_size", "strategy", "seed")
RESULTS_FILE = "results.parquet"


def result_rows(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for record in records:
        base = {"cell_id": record["cell_id"]} | {axis: record["axes"].get(axis) for axis in AXES}
        common = {
            "epochs": int(record.get("epochs", 0)),
            "train_seconds": float(record.get("train_seconds", 0.0)),
            "gpu_hours": float(record.get("gpu_hours", 0.0)),
            "status": record["status"],
            "error": record.get("error", ""),
        }
        branches = record.get("branches") or {"main": {}}
        for branch, accuracies in sorted(branches.items()):
            rows.append(base | {"branch": branch} | dict(accuracies) | common)
    return rows


def _pgd_key(column: str) -> int:
    return int(column.removeprefix("acc_pgd_"))


def results_table(records: Iterable[Mapping[str, Any]]) -> pa.Table:
    rows = result_rows(records)
    pgd_columns = sorted({k for row in rows for k in row if k.startswith("acc_pgd_")}, key=_pgd_key)
    columns = ["cell_id", *AXES, "branch", "acc_clean", *pgd_columns, "epochs", "train_seconds", "gpu_hours"]
    columns += ["status", "error"]
    types = {
        "clean_ratio": pa.float64(),
        "pgd_steps": pa.int64(),
        "depth": pa.int64(),
        "batch_size": pa.int64(),
        "seed": pa.int64(),
        "epochs": pa.int64(),
        "train_seconds": pa.float64(),
        "gpu_hours": pa.float64(),
        "acc_clean": pa.float64(),
    } | dict.fromkeys(pgd_columns, pa.float64())
    rows.sort(key=lambda r: (r["cell_id"], r["branch"]))
    arrays = {}
    for column in columns:
        values = [_clean(row.get(column)) for row in rows]
        arrays[column] = pa.array(values, type=types.get(column, pa.string()))
    return pa.table(arrays)


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def write_results(storage: SweepStorage, records: Iterable[Mapping[str, Any]]) -> pa.Table:
    table = results_table(records)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes_atomic(storage.path(RESULTS_FILE), buffer.getvalue())
    return table


def read_results(storage: SweepStorage) -> pa.Table:
    with storage.fs.open(storage.path(RESULTS_FILE), "rb") as f:
        return pq.read_table(io.BytesIO(f.read()))
