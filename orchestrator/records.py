"""The records a sweep keeps for each cell in storage, one class each: what is written, and what a reader may rely
on. Writers build these; readers parse with `from_json`, which accepts every record an earlier version wrote (an
optional field missing) and ignores keys it does not know.

- `cells/<id>/result.json`: `CellResult`, written last, when the cell finished (its presence means finished).
- `cells/<id>/error.json`: `CellError`, the one-line reason a cell failed (removed when it later finishes).
- `cells/<id>/unschedulable.json`: `Unschedulable`, while its workers fit no live node (orchestrator.placement).

Each cell's attempts (`attempts.json`) are orchestrator.attempts'; its per-epoch history (`history.json`)
orchestrator.results' (`epoch_row`, `merge_epochs`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


def _axes(record: Mapping[str, Any]) -> dict[str, Any]:
    axes = record.get("axes")
    return dict(axes) if isinstance(axes, Mapping) else {}


@dataclass
class CellResult:
    cell_id: str
    axes: dict[str, Any]
    epochs: int
    train_seconds: float
    gpu_hours: float
    branches: dict[str, dict[str, float]]  # eval branch (main, mbn_adv, mbn_clean) -> metric -> value
    resumed_from_epoch: int = 0
    started_at: float = 0.0
    finished_at: float = 0.0
    provenance: dict[str, Any] = field(default_factory=dict)
    forked_from: str | None = None  # the BN twin a BN* cell started from (orchestrator.grid.fork_twins)
    domain_gap: float | None = None  # workloads.bn_statistics
    bn_statistics: dict[str, Any] | None = None
    status: str = "finished"

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        for optional in ("forked_from", "domain_gap", "bn_statistics"):
            if record[optional] is None:
                del record[optional]
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> CellResult:
        branches = record.get("branches") or {}
        return cls(
            cell_id=str(record["cell_id"]),
            axes=_axes(record),
            epochs=int(record.get("epochs") or 0),
            train_seconds=float(record.get("train_seconds") or 0.0),
            gpu_hours=float(record.get("gpu_hours") or 0.0),
            branches={
                str(b): {str(k): float(v) for k, v in (m or {}).items() if isinstance(v, int | float)}
                for b, m in branches.items()
            },
            resumed_from_epoch=int(record.get("resumed_from_epoch") or 0),
            started_at=float(record.get("started_at") or 0.0),
            finished_at=float(record.get("finished_at") or 0.0),
            provenance=dict(record.get("provenance") or {}),
            forked_from=record.get("forked_from") or None,
            domain_gap=record.get("domain_gap"),
            bn_statistics=record.get("bn_statistics"),
        )


@dataclass
class CellError:
    cell_id: str
    axes: dict[str, Any]
    error: str  # one line, redacted
    failed_at: float = field(default_factory=time.time)
    status: str = "failed"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> CellError:
        return cls(
            cell_id=str(record.get("cell_id", "")),
            axes=_axes(record),
            error=str(record.get("error") or ""),
            failed_at=float(record.get("failed_at") or 0.0),
        )


@dataclass
class Unschedulable:
    cell_id: str
    since: float
    problem: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Unschedulable:
        return cls(str(record.get("cell_id", "")), float(record.get("since") or 0.0), str(record.get("problem") or ""))
