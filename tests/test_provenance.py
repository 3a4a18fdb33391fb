"""Provenance: which workload code produced each finished cell, and what a resubmission does when it changed."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import workloads
from orchestrator import sweep
from orchestrator.grid import expand
from orchestrator.provenance import changed_code, driver_provenance, git_state, source_hash
from orchestrator.spec import load_spec
from orchestrator.storage import RESULT_FILE, SweepStorage
from tests.conftest import tiny_spec, write_spec

PACKAGE = Path(workloads.__file__).resolve().parent


def _edited_copy(tmp_path: Path) -> Path:
    """A copy of the workload package with one source file changed (a bug fix, say)."""
    copy = tmp_path / "workloads"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    attacks = copy / "attacks.py"
    attacks.write_text(attacks.read_text() + "\n# a changed line\n")
    return copy


def test_the_source_hash_follows_the_workload_code(tmp_path: Path) -> None:
    assert source_hash() == source_hash(PACKAGE)
    copy = tmp_path / "same"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert source_hash(copy) == source_hash()  # paths are relative: the location does not matter
    assert source_hash(_edited_copy(tmp_path)) != source_hash()


def test_driver_provenance_names_code_and_libraries() -> None:
    prov = driver_provenance()
    assert prov["source_hash"] == source_hash()
    assert prov["python"].count(".") == 2 and prov["torch"] and prov["ray"] and prov["host"]
    commit, dirty = git_state()
    assert prov["git_commit"] == commit and prov["git_dirty"] == dirty
    assert git_state(Path("/")) == (None, None)  # not a checkout (e.g. a job's working-dir copy)


def test_changed_code_lists_finished_cells_from_other_code() -> None:
    records = {
        "a": {"status": "finished", "provenance": {"source_hash": "new"}},
        "b": {"status": "finished", "provenance": {"source_hash": "old"}},
        "c": {"status": "failed", "provenance": {"source_hash": "old"}},
        "d": {"status": "finished"},  # from before provenance was recorded: nothing says which code
    }
    assert changed_code(records, "new") == ["b", "d"]


def _finish(storage: SweepStorage, cell_id: str, axes: dict, code: str) -> None:
    """A finished cell's record as orchestrator.runner writes it, from code whose hash is `code`."""
    storage.write_json(
        storage.cell_path(cell_id, RESULT_FILE),
        {
            "cell_id": cell_id,
            "axes": axes,
            "status": "finished",
            "epochs": 1,
            "branches": {"main": {"acc_clean": 0.9, "acc_pgd_1": 0.5}},
            "finished_at": time.time(),
            "provenance": {"source_hash": code, "device": "cpu"},
        },
    )


def test_a_resubmission_after_a_code_change_reports_the_changed_cells(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_path = write_spec(tmp_path, tiny_spec("prov", {"clean_ratio": [0.0, 1.0]}, storage=str(tmp_path / "runs")))
    spec = load_spec(spec_path)
    cells = expand(spec)
    storage = SweepStorage.for_sweep(spec.storage, spec.name)
    old_code = source_hash(_edited_copy(tmp_path))
    _finish(storage, cells[0].cell_id, cells[0].axes, old_code)
    _finish(storage, cells[1].cell_id, cells[1].axes, source_hash())

    assert sweep.main([str(spec_path)]) == sweep.EXIT_OK  # every cell finished: nothing runs, no Ray
    out = capsys.readouterr().out
    assert f"code: 1 finished cells came from other workload code (source hash {old_code}" in out, out
    assert cells[0].cell_id in out and cells[1].cell_id not in out.split("came from other")[1].split("\n")[0]
    assert "pass --rerun-changed" in out
    table = pq.read_table(tmp_path / "runs" / "prov" / "results.parquet").to_pylist()
    by_id = {row["cell_id"]: row for row in table}
    assert by_id[cells[0].cell_id]["source_hash"] == old_code
    assert by_id[cells[1].cell_id]["source_hash"] == source_hash()
    assert {row["sweep"] for row in table} == {"prov"}
    assert by_id[cells[0].cell_id]["config.attack.steps"] == cells[0].config.attack.steps


def test_setting_a_cell_aside_keeps_its_old_result_and_clears_the_rest(tmp_path: Path) -> None:
    storage = SweepStorage.for_sweep(str(tmp_path), "s")
    _finish(storage, "abc", {}, "old")
    checkpoint = Path(storage.cell_path("abc", "checkpoint_000001"))
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.pt").write_bytes(b"weights")
    storage.set_aside_cell("abc")
    assert not checkpoint.exists() and not Path(storage.cell_path("abc", RESULT_FILE)).exists()
    kept = list(Path(storage.cell_path("abc", "superseded")).glob("*.json"))
    assert len(kept) == 1 and '"old"' in kept[0].read_text()
    assert "abc" not in storage.cell_records()  # no longer finished: the next run trains it
