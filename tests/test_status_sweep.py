"""`status` about the sweep as a whole: the driver's state from its lease, the whole sweep's time left, and
folders that hold only results.parquet (a copied or published study)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from orchestrator import status
from orchestrator.grid import expand
from orchestrator.lease import LEASE_FILE
from orchestrator.plan import plan_spec
from orchestrator.spec import parse_spec
from orchestrator.status import CellStatus, sweep_eta, sweep_state
from orchestrator.storage import SweepStorage
from tests.conftest import tiny_spec

COMMITTED = Path(__file__).resolve().parents[1] / "docs" / "results" / "digits-weak-gap"


def _cells(tmp_path: Path):  # type: ignore[no-untyped-def]
    spec = parse_spec(yaml.safe_dump(tiny_spec("s", {"clean_ratio": [0.0, 1.0]}, storage=str(tmp_path))))
    return spec, expand(spec)


def _lease(storage: SweepStorage, expires_in: float) -> None:
    storage.write_json(
        storage.path(LEASE_FILE), {"owner": "x", "host": "node-1", "pid": 1, "expires_at": time.time() + expires_in}
    )


def test_driver_state_follows_the_lease(tmp_path: Path) -> None:
    storage = SweepStorage.for_sweep(str(tmp_path), "s")
    running = [CellStatus("a", {}, "running", epoch=1, epochs=2), CellStatus("b", {}, "pending")]
    now = time.time()
    _lease(storage, 40)
    assert sweep_state(storage, running, now).driver == "running"
    _lease(storage, -120)
    state = sweep_state(storage, running, now)
    assert state.driver == "interrupted" and "stopped renewing its lease 2m ago" in state.detail
    storage.remove(storage.path(LEASE_FILE))
    assert sweep_state(storage, running, now).driver == "interrupted"
    assert "not started" in sweep_state(storage, [CellStatus("b", {}, "pending")], now).detail
    done = [CellStatus("a", {}, "finished"), CellStatus("b", {}, "failed")]
    state = sweep_state(storage, done, now)
    assert state.driver == "finished" and "1 cells failed" in state.detail


def test_the_whole_sweeps_time_left_scales_with_measured_epochs(tmp_path: Path) -> None:
    spec, cells = _cells(tmp_path)
    planned_epoch = plan_spec(spec, cells).cells[0].wall_hours * 3600 / cells[0].config.recipe.epochs

    def eta(speed: float, epoch_done: int) -> float | None:
        statuses = [
            CellStatus(cells[0].cell_id, {}, "running", epoch=epoch_done, epochs=2, seconds_per_epoch=speed),
            CellStatus(cells[1].cell_id, {}, "pending"),
        ]
        return sweep_eta(spec, cells, statuses)

    slow, fast = eta(4 * planned_epoch, 1), eta(2 * planned_epoch, 1)
    assert slow is not None and fast is not None and slow == pytest.approx(2 * fast)
    later = eta(2 * planned_epoch, 2)
    assert later is not None and later < fast
    assert sweep_eta(spec, cells, [CellStatus(c.cell_id, {}, "pending") for c in cells]) is None  # nothing measured
    assert sweep_eta(spec, cells, [CellStatus(c.cell_id, {}, "finished") for c in cells]) == 0.0


def test_status_reads_a_folder_holding_only_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "digits-weak-gap"
    shutil.copytree(COMMITTED, copy)
    before = {p.name: p.stat().st_mtime_ns for p in copy.iterdir()}
    assert status.main([str(copy), "--json"]) == status.EXIT_OK
    assert {p.name: p.stat().st_mtime_ns for p in copy.iterdir()} == before  # read only: nothing written
    document = json.loads(capsys.readouterr().out)
    assert document["sweep"] == "digits-weak-gap" and len(document["cells"]) == 21
    assert {c["state"] for c in document["cells"]} == {"finished"}
    assert document["driver"]["driver"] == "finished"
    assert status.main([str(tmp_path / "nothing")]) == status.EXIT_INVALID


def test_watch_stops_once_no_driver_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    storage = SweepStorage.for_sweep(str(tmp_path), "s")
    spec, _ = _cells(tmp_path)
    storage.write_bytes_atomic(storage.path("spec.yaml"), spec.dump_yaml().encode())
    started = time.monotonic()
    assert status.main([storage.url, "--watch", "1"]) == status.EXIT_OK  # no lease: prints once and returns
    assert time.monotonic() - started < 30
    assert "driver: interrupted (not started" in capsys.readouterr().out
