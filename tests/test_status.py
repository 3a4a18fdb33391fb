"""`orchestrator.status` on hand-built storage trees shaped like what the driver and Ray Train V2 write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import status
from orchestrator.grid import Cell, expand
from orchestrator.spec import Spec, parse_spec
from orchestrator.storage import SweepStorage

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 5
T0 = 1_800_000_000.0  # the tree's clock: every file gets an explicit modification time


def make_spec() -> Spec:
    text = yaml.safe_dump(
        {
            "name": "st",
            "workload": {
                "data": {"url": "builtin://digits"},
                "model": {"depth": 18, "width": 0.125, "stem": "small"},
                "attack": {"steps": 2},
                "recipe": {"epochs": EPOCHS, "batch_size": 64, "per_worker_batch": 32},
                "eval": {"pgd_steps": [5, 10], "subset": 200},
            },
            "grid": {"seed": [0, 1, 2, 3, 4], "norm": ["bn"]},
            "resources": {"use_gpu": False, "max_workers_per_cell": 1},
            "checkpoint_every": 1,
        },
        sort_keys=False,
    )
    return parse_spec(text, "test.yaml")


def snapshot(epochs: list[int], seconds_per_epoch: float) -> dict[str, Any]:
    """checkpoint_manager_snapshot.json as Ray Train V2 writes it (trimmed to the fields it always has)."""
    results = [
        {
            "version": 0,
            "checkpoint_dir_name": f"checkpoint_2027-01-15_08-00-{e:02d}.000000",
            "metrics": {
                "epoch": e,
                "loss": 2.0,
                "epoch_seconds": seconds_per_epoch,
                "train_seconds": seconds_per_epoch * e,
                "train_acc_adv": 0.2 + 0.01 * e,
                "train_acc_clean": 0.3 + 0.01 * e,
            },
        }
        for e in epochs
    ]
    return {
        "ray_version": "2.60.0",
        "checkpoint_results": results,
        "latest_checkpoint_result": results[-1] if results else None,
        "current_report_index": len(epochs),
    }


class Tree:
    """Writes a sweep's files with chosen modification times."""

    def __init__(self, storage: SweepStorage) -> None:
        self.storage = storage

    def write(self, cell: Cell, name: str, payload: Any, mtime: float) -> None:
        path = self.storage.cell_path(cell.cell_id, name)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(payload if isinstance(payload, str) else json.dumps(payload))
        os.utime(path, (mtime, mtime))

    def config(self, cell: Cell) -> None:
        self.write(cell, "config.json", {"cell_id": cell.cell_id, "axes": cell.axes}, T0)

    def checkpoints(self, cell: Cell, epochs: list[int], seconds: float, mtime: float) -> None:
        self.write(cell, ".validate_storage_marker", "", T0 + 1)
        for e in epochs:
            self.write(cell, f"checkpoint_2027-01-15_08-00-{e:02d}.000000/state.pt", "weights", mtime)
        self.write(cell, "checkpoint_manager_snapshot.json", snapshot(epochs, seconds), mtime)


@pytest.fixture
def sweep(tmp_path: Path) -> dict[str, Any]:
    """Five cells: finished, running (epoch 3 of 5, 10 s/epoch), failed, pending, and failed-then-retrying."""
    spec = make_spec()
    storage = SweepStorage.for_sweep(str(tmp_path), spec.name)
    Path(storage.path()).mkdir(parents=True)
    Path(storage.path("spec.yaml")).write_text(spec.dump_yaml())
    tree = Tree(storage)
    finished, running, failed, pending, retrying = expand(spec)
    for cell in (finished, running, failed, pending, retrying):
        tree.config(cell)
    tree.checkpoints(finished, [4, 5], 8.0, T0 + 50)
    result = {
        "cell_id": finished.cell_id,
        "axes": finished.axes,
        "status": "finished",
        "epochs": EPOCHS,
        "train_seconds": 40.0,
        "branches": {"main": {"acc_clean": 0.415, "acc_pgd_5": 0.37, "acc_pgd_10": 0.28}},
    }
    tree.write(finished, "result.json", result, T0 + 60)
    tree.checkpoints(running, [2, 3], 10.0, T0 + 100)
    tree.checkpoints(failed, [1], 10.0, T0 + 20)
    error = {
        "cell_id": failed.cell_id,
        "status": "failed",
        "error": "RuntimeError: CUDA out of memory",
        "failed_at": T0 + 30,
    }
    tree.write(failed, "error.json", error, T0 + 30)
    tree.write(retrying, "error.json", {"status": "failed", "error": "old", "failed_at": T0 + 30}, T0 + 30)
    tree.checkpoints(retrying, [1], 10.0, T0 + 90)  # a new attempt wrote after the failure
    return {
        "storage": storage,
        "cells": {
            "finished": finished,
            "running": running,
            "failed": failed,
            "pending": pending,
            "retrying": retrying,
        },
    }


def by_id(url: str, now: float) -> dict[str, status.CellStatus]:
    _, name, statuses, notes = status.cell_statuses(url, now)
    assert name == "st" and notes == []
    return {s.cell_id: s for s in statuses}


def test_states_epochs_and_accuracies(sweep: dict[str, Any]) -> None:
    cells = sweep["cells"]
    got = by_id(sweep["storage"].url, now=T0 + 104)
    assert {name: got[c.cell_id].state for name, c in cells.items()} == {
        "finished": "finished",
        "running": "running",
        "failed": "failed",
        "pending": "pending",
        "retrying": "running",
    }
    assert {name: got[c.cell_id].epoch for name, c in cells.items()} == {
        "finished": 5,
        "running": 3,
        "failed": 1,
        "pending": None,
        "retrying": 1,
    }
    assert all(s.epochs == EPOCHS for s in got.values())
    done = got[cells["finished"].cell_id]
    assert (done.acc_clean, done.acc_robust, done.robust_metric) == (0.415, 0.28, "acc_pgd_10")
    running = got[cells["running"].cell_id]
    assert running.acc_robust == pytest.approx(0.23) and running.robust_metric == "train_acc_adv"
    assert running.acc_clean == pytest.approx(0.33)
    assert got[cells["failed"].cell_id].error == "RuntimeError: CUDA out of memory"
    assert got[cells["retrying"].cell_id].error == "old"  # kept for the record while the retry runs


def test_time_left_from_epoch_timing(sweep: dict[str, Any]) -> None:
    running_id = sweep["cells"]["running"].cell_id
    # 2 epochs left x 10 s per epoch, 4 s of which have passed since the last checkpoint was written.
    got = by_id(sweep["storage"].url, now=T0 + 104)[running_id]
    assert got.seconds_per_epoch == pytest.approx(10.0)
    assert got.eta_seconds == pytest.approx(16.0)
    assert got.updated == pytest.approx(T0 + 100) and not got.stalled
    later = by_id(sweep["storage"].url, now=T0 + 100 + 2 * status.STALL_SECONDS)[running_id]
    assert later.eta_seconds == 0.0 and later.stalled


def test_cli_prints_the_cell_table(sweep: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert status.main([sweep["storage"].url]) == 0
    out = capsys.readouterr().out
    assert "st (" in out and "5 cells: 1 finished, 2 running, 1 pending, 1 failed" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line[:12] in _ids(sweep)}
    cells = sweep["cells"]
    assert lines[cells["finished"].cell_id][1:5] == ["finished", "5/5", "41.5", "28.0"]
    assert lines[cells["running"].cell_id][1:5] == ["running", "3/5", "~33.0", "~23.0"]
    assert lines[cells["pending"].cell_id][1:3] == ["pending", "0/5"]
    assert "CUDA out of memory" in " ".join(lines[cells["failed"].cell_id])
    assert status.main([sweep["storage"].url, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sorted(c["state"] for c in data["cells"]) == ["failed", "finished", "pending", "running", "running"]


def _ids(sweep: dict[str, Any]) -> set[str]:
    return {c.cell_id for c in sweep["cells"].values()}


def test_without_spec_yaml_cells_come_from_their_folders(sweep: dict[str, Any]) -> None:
    storage = sweep["storage"]
    Path(storage.path("spec.yaml")).unlink()
    _, name, statuses, notes = status.cell_statuses(storage.url, T0 + 104)
    got = {s.cell_id: s for s in statuses}
    assert name == "st" and len(got) == 5
    running = got[sweep["cells"]["running"].cell_id]
    assert running.state == "running" and running.axes["seed"] == 1 and running.epochs is None
    assert got[sweep["cells"]["finished"].cell_id].state == "finished"


def test_status_on_s3(s3_bucket: str) -> None:
    spec = make_spec()
    storage = SweepStorage(f"{s3_bucket}/sweeps/st")
    storage.write_bytes_atomic(storage.path("spec.yaml"), spec.dump_yaml().encode())
    first, second, *_ = expand(spec)
    storage.write_json(storage.cell_path(first.cell_id, "checkpoint_manager_snapshot.json"), snapshot([1, 2], 3.0))
    storage.write_bytes_atomic(storage.cell_path(first.cell_id, "checkpoint_x", "state.pt"), b"w")
    storage.write_json(storage.cell_path(second.cell_id, "config.json"), {"cell_id": second.cell_id})
    got = by_id(storage.url, now=time.time())
    assert (got[first.cell_id].state, got[first.cell_id].epoch) == ("running", 2)
    assert got[first.cell_id].updated is not None and abs(got[first.cell_id].updated - time.time()) < 600
    assert got[second.cell_id].state == "pending"


def test_no_sweep_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert status.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no sweep at") and err.count("\n") == 1
    assert status.main(["nosuchscheme://bucket/sweep"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read") and err.count("\n") == 1
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.status", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1


def test_a_cell_waiting_for_an_unplaceable_worker_group_shows_as_unschedulable(sweep: dict[str, Any]) -> None:
    storage, pending = sweep["storage"], sweep["cells"]["pending"]
    problem = "needs 1 worker(s) of {0.5 CPU, 1 GPU} but the 1 live node(s) (2 CPU, 0 GPU) hold 0"
    Tree(storage).write(pending, "unschedulable.json", {"since": T0 + 100, "problem": problem}, T0 + 100)

    cells = by_id(storage.url, T0 + 200)
    assert cells[pending.cell_id].state == "unschedulable"
    assert cells[pending.cell_id].error == problem
    assert cells[sweep["cells"]["running"].cell_id].state == "running"  # only the marked cell changes

    _, name, statuses, notes = status.cell_statuses(storage.url, T0 + 200)
    text = status.format_status(name, storage.url, statuses, notes, T0 + 200)
    assert "1 unschedulable" in text.splitlines()[0]
    row = next(line for line in text.splitlines() if line.startswith(pending.cell_id))
    assert row.split()[1] == "unschedulable" and "needs 1 worker(s)" in row


def test_history_written_after_a_failure_does_not_make_the_cell_look_running(sweep: dict[str, Any]) -> None:
    # The driver writes history.json from the run's reports, so the last one can land just after error.json.
    storage, failed = sweep["storage"], sweep["cells"]["failed"]
    Tree(storage).write(failed, "history.json", {"cell_id": failed.cell_id, "epochs": []}, T0 + 31)
    cells = by_id(storage.url, now=T0 + 104)
    assert cells[failed.cell_id].state == "failed"
    assert cells[sweep["cells"]["retrying"].cell_id].state == "running"  # a Train write after the error still counts
