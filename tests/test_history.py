"""Per-epoch training history: the driver's cells/<id>/history.json, history.parquet, the report's training curves.

The unit tests drive the sweep's real Tune callback (`orchestrator.progress.SweepProgress`) with stand-in trials
and hand-made results shaped like what `workloads.train` reports each epoch; no Ray instance. The last test runs
one small sweep on a local Ray instance and checks the history against what Ray Train recorded itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.parquet as pq
import pytest

from orchestrator import report
from orchestrator.grid import Cell, expand
from orchestrator.progress import SweepProgress
from orchestrator.results import AXES, HISTORY_METRICS, epoch_row, merge_epochs, write_results
from orchestrator.storage import HISTORY_FILE, SweepStorage
from tests.test_report import DIGITS_WORKLOAD, make_spec, png_size, read_text, record, write_sweep

HISTORY_COLUMNS = ["cell_id", *AXES, "epoch", *HISTORY_METRICS]


def epoch_result(epoch: int, loss: float, *, adv: float | None = 0.5, clean: float | None = 0.6) -> dict[str, Any]:
    """One epoch's report as the training loop sends it, plus keys Tune adds on its way to the driver."""
    result: dict[str, Any] = {
        "epoch": epoch,
        "loss": loss,
        "lr": 0.1 / epoch,
        "images_per_sec": 100.0 + epoch,
        "epoch_seconds": 10.0 + epoch,
        "train_seconds": 10.0 * epoch,
        "start_epoch": 0,
        "training_iteration": epoch,
        "time_total_s": 12.0 * epoch,
    }
    if adv is not None:
        result["train_acc_adv"] = adv
    if clean is not None:
        result["train_acc_clean"] = clean
    return result


def trial(cell: Cell) -> Any:
    """What the callback reads of a Tune trial: its config's cell (what the searcher suggested)."""
    return SimpleNamespace(config={"cell": cell})


def progress_for(cells: list[Cell], storage: SweepStorage) -> SweepProgress:
    return SweepProgress("hist", storage.url, len(cells), 0, {c.cell_id: 3 for c in cells})


def report_epochs(progress: SweepProgress, cell: Cell, storage: SweepStorage, *results: dict[str, Any]) -> None:
    t = trial(cell)
    for result in results:
        progress.on_trial_result(0, [t], t, result)


def stored(storage: SweepStorage, cell: Cell) -> dict[str, Any]:
    return json.loads(Path(storage.cell_path(cell.cell_id, HISTORY_FILE)).read_text())


def losses(storage: SweepStorage, cell: Cell) -> list[tuple[int, float]]:
    return [(row["epoch"], row["loss"]) for row in stored(storage, cell)["epochs"]]


@pytest.fixture
def sweep(tmp_path: Path) -> dict[str, Any]:
    spec = make_spec(DIGITS_WORKLOAD, [{"clean_ratio": [0.0, 1.0], "seed": [0, 1, 2]}], name="hist")
    storage = SweepStorage(str(tmp_path / "hist"))
    Path(storage.path()).mkdir(parents=True)
    return {"spec": spec, "storage": storage, "cells": expand(spec)}


# ------------------------------------------------------------------------------------------------------------
# The driver's history.json


def test_every_epoch_is_stored_with_the_cells_axes(sweep: dict[str, Any]) -> None:
    storage, cell = sweep["storage"], sweep["cells"][0]
    progress = progress_for(sweep["cells"], sweep["storage"])
    report_epochs(progress, cell, storage, epoch_result(1, 2.0), epoch_result(2, 1.5, adv=None))
    assert progress.history.flush(timeout_s=30)
    history = stored(storage, cell)
    assert history["cell_id"] == cell.cell_id and history["axes"] == cell.axes
    assert history["epochs"] == [
        {
            "epoch": 1,
            "loss": 2.0,
            "train_acc_adv": 0.5,
            "train_acc_clean": 0.6,
            "lr": 0.1,
            "images_per_sec": 101.0,
            "epoch_seconds": 11.0,
        },
        {
            "epoch": 2,
            "loss": 1.5,
            "train_acc_adv": None,  # not measured that epoch: null, not a made-up 0
            "train_acc_clean": 0.6,
            "lr": 0.05,
            "images_per_sec": 102.0,
            "epoch_seconds": 12.0,
        },
    ]


def test_resumed_driver_keeps_stored_epochs_and_retrained_ones_overwrite(sweep: dict[str, Any]) -> None:
    storage, cell = sweep["storage"], sweep["cells"][0]
    first = progress_for(sweep["cells"], sweep["storage"])
    report_epochs(first, cell, storage, epoch_result(1, 2.0), epoch_result(2, 1.6), epoch_result(3, 1.4))
    first.on_experiment_end([])
    # The first driver dies; its last checkpoint was epoch 2, so the new driver's run trains epoch 3 again.
    second = progress_for(sweep["cells"], sweep["storage"])
    report_epochs(second, cell, storage, epoch_result(3, 1.3), epoch_result(4, 1.1))
    # A run resumed at its last epoch reports the evaluation only: it trained nothing and adds no row.
    report_epochs(second, cell, storage, {"epoch": 4, "train_seconds": 40.0, "eval/main/acc_clean": 0.9})
    second.on_experiment_end([])
    assert losses(storage, cell) == [(1, 2.0), (2, 1.6), (3, 1.3), (4, 1.1)]
    # A Train-level restart inside one driver (max_failures) reports an epoch again: replaced too.
    report_epochs(second, cell, storage, epoch_result(2, 1.55))
    assert second.history.flush(timeout_s=30)
    assert losses(storage, cell) == [(1, 2.0), (2, 1.55), (3, 1.3), (4, 1.1)]


def test_the_callback_survives_tunes_pickling_of_the_experiment_state(sweep: dict[str, Any]) -> None:
    from ray import cloudpickle

    storage, cell = sweep["storage"], sweep["cells"][0]
    progress = progress_for(sweep["cells"], sweep["storage"])
    report_epochs(progress, cell, storage, epoch_result(1, 2.0))
    copy = cloudpickle.loads(cloudpickle.dumps(progress))  # what tune.Tuner does with its callbacks
    # A copy is only ever used after the original is gone (Tune restoring its state), never beside it.
    assert progress.history.flush(timeout_s=30)
    report_epochs(copy, cell, storage, epoch_result(2, 1.5))
    assert copy.history.flush(timeout_s=30)
    assert losses(storage, cell) == [(1, 2.0), (2, 1.5)]


def test_merge_epochs_is_keyed_by_epoch_and_the_later_history_wins() -> None:
    old = [{"epoch": 2, "loss": 9.0}, {"epoch": 1, "loss": 8.0}]
    new = [{"epoch": 2, "loss": 1.0}, {"epoch": 3, "loss": 0.5}]
    assert merge_epochs(old, new) == [{"epoch": 1, "loss": 8.0}, {"epoch": 2, "loss": 1.0}, {"epoch": 3, "loss": 0.5}]
    assert merge_epochs(new, old)[1] == {"epoch": 2, "loss": 9.0}
    assert epoch_row({"epoch": 5, "train_seconds": 1.0}) is None


def test_a_failed_write_warns_and_the_next_epoch_sends_everything(
    sweep: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    storage, cell = sweep["storage"], sweep["cells"][0]
    real_write = SweepStorage.write_json
    failures = {"left": 1}

    def flaky_write(self: SweepStorage, path: str, value: Any) -> None:
        if path.endswith(HISTORY_FILE) and failures["left"]:
            failures["left"] -= 1
            raise PermissionError("storage said no")  # not transient: with_retries gives up at once
        real_write(self, path, value)

    monkeypatch.setattr(SweepStorage, "write_json", flaky_write)
    progress = progress_for(sweep["cells"], sweep["storage"])
    report_epochs(progress, cell, storage, epoch_result(1, 2.0))  # must not raise into Tune's loop
    assert progress.history.flush(timeout_s=30) is True  # the flush sent it again, successfully
    assert losses(storage, cell) == [(1, 2.0)]
    assert "history not written (PermissionError: storage said no)" in capsys.readouterr().err

    failures["left"] = 2  # epoch 2's write and the flush's second try
    report_epochs(progress, cell, storage, epoch_result(2, 1.5))
    assert progress.history.flush(timeout_s=30) is False
    assert losses(storage, cell) == [(1, 2.0)]
    report_epochs(progress, cell, storage, epoch_result(3, 1.2))
    assert progress.history.flush(timeout_s=30)
    assert losses(storage, cell) == [(1, 2.0), (2, 1.5), (3, 1.2)]


def test_an_unreadable_stored_history_is_never_overwritten_blindly(
    sweep: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    storage, cell = sweep["storage"], sweep["cells"][0]
    earlier = {"cell_id": cell.cell_id, "axes": cell.axes, "epochs": [epoch_row(epoch_result(1, 2.0))]}
    storage.write_json(storage.cell_path(cell.cell_id, HISTORY_FILE), earlier)
    real_read = SweepStorage.read_json
    outage = {"on": True}

    def read_during_outage(self: SweepStorage, path: str) -> Any:
        if outage["on"]:
            raise TimeoutError("storage unreachable")
        return real_read(self, path)

    monkeypatch.setattr(SweepStorage, "read_json", read_during_outage)
    progress = progress_for(sweep["cells"], sweep["storage"])
    report_epochs(progress, cell, storage, epoch_result(2, 1.5))
    assert progress.history.flush(timeout_s=30) is False
    assert losses(storage, cell) == [(1, 2.0)]  # epoch 1 of the earlier driver is still there
    assert "stored history not readable (TimeoutError" in capsys.readouterr().err
    outage["on"] = False
    report_epochs(progress, cell, storage, epoch_result(3, 1.2))
    assert progress.history.flush(timeout_s=30)
    assert losses(storage, cell) == [(1, 2.0), (2, 1.5), (3, 1.2)]


# ------------------------------------------------------------------------------------------------------------
# history.parquet


def write_history(storage: SweepStorage, cell: Cell, loss: list[float], acc: list[float]) -> None:
    epochs = [
        epoch_row(epoch_result(e, value, adv=a, clean=None if cell.axes["clean_ratio"] == 0.0 else a + 0.1))
        for e, (value, a) in enumerate(zip(loss, acc, strict=True), start=1)
    ]
    storage.write_json(
        storage.cell_path(cell.cell_id, HISTORY_FILE), {"cell_id": cell.cell_id, "axes": cell.axes, "epochs": epochs}
    )


def test_history_parquet_has_one_row_per_cell_and_epoch(
    sweep: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    storage, cells = sweep["storage"], sweep["cells"]
    for i, cell in enumerate(cells[:4]):
        write_history(storage, cell, [2.0 - 0.1 * i, 1.0 - 0.1 * i], [0.3, 0.4 + 0.01 * i])
    storage.write_bytes_atomic(storage.cell_path(cells[4].cell_id, HISTORY_FILE), b"{not json")
    records = [record(c, {"main": {"acc_clean": 0.5}}) for c in cells]
    write_results(storage, records[:5])  # cells[5] is not part of this results table

    results = pq.read_table(storage.path("results.parquet"))
    assert results.num_rows == 5  # an unreadable history costs nothing of the results
    assert "history.json unreadable" in capsys.readouterr().err
    table = pq.read_table(storage.path("history.parquet"))
    assert table.column_names == HISTORY_COLUMNS
    rows = table.to_pylist()
    assert [(r["cell_id"], r["epoch"]) for r in rows] == sorted((c.cell_id, e) for c in cells[:4] for e in (1, 2))
    by_cell = {c.cell_id: (i, c) for i, c in enumerate(cells[:4])}
    for row in rows:
        i, cell = by_cell[row["cell_id"]]
        assert {axis: row[axis] for axis in AXES} == cell.axes
        assert row["loss"] == pytest.approx((2.0 if row["epoch"] == 1 else 1.0) - 0.1 * i)
        if cell.axes["clean_ratio"] == 0.0:
            assert row["train_acc_clean"] is None  # no clean images in the batches at clean ratio 0
        else:
            assert row["train_acc_clean"] == pytest.approx(row["train_acc_adv"] + 0.1)
        assert row["lr"] == pytest.approx(0.1 / row["epoch"])


def test_history_parquet_of_a_sweep_without_history_is_empty_with_its_columns(sweep: dict[str, Any]) -> None:
    storage, cells = sweep["storage"], sweep["cells"]
    write_results(storage, [record(c, {"main": {"acc_clean": 0.5}}) for c in cells])
    table = pq.read_table(storage.path("history.parquet"))
    assert table.num_rows == 0 and table.column_names == HISTORY_COLUMNS


# ------------------------------------------------------------------------------------------------------------
# The report's training curves


def test_report_draws_training_curves_per_setting_with_seed_spread(sweep: dict[str, Any]) -> None:
    spec, storage, cells = sweep["spec"], sweep["storage"], sweep["cells"]
    # Loss per epoch: seeds of one setting spread by 0.1 around a mean that falls 2.0 -> 1.0 -> 0.5.
    for cell in cells:
        offset = 0.1 * (cell.axes["seed"] - 1)
        base = [2.0, 1.0, 0.5] if cell.axes["clean_ratio"] == 0.0 else [2.5, 1.5, 1.0]
        write_history(storage, cell, [v + offset for v in base], [0.2, 0.3, 0.4])
    write_sweep(storage.url, spec, [record(c, {"main": {"acc_clean": 0.5, "acc_pgd_5": 0.3}}) for c in cells])
    report.build_report(storage.url)
    markdown = read_text(storage, "report", "report.md")
    section = markdown.split("## Training curves", 1)[1].split("\n## ", 1)[0]
    assert "from 6 cell(s) (18 cell-epochs" in section
    assert "](training_curves.png)" in section
    width, height = png_size(Path(storage.path("report", "training_curves.png")).read_bytes())
    assert 600 <= width <= 2000 and 400 <= height <= 2000
    assert "training curves" not in markdown.split("## What this report lacks", 1)[-1]

    # The report's grouping: seeds pooled, settings apart; mean and sample std per epoch.
    data = report.load_sweep(storage.url)
    grouped = report.history_settings(data.history)
    assert len(grouped) == 2
    r0 = next(v for k, v in grouped.items() if k.clean_ratio == 0.0)
    loss = report.stat(r0[2]["loss"])
    assert loss is not None and loss.n == 3 and loss.mean == pytest.approx(1.0) and loss.std == pytest.approx(0.1)
    assert "train_acc_clean" not in r0[1]  # clean ratio 0: no clean accuracy to draw


def test_report_without_history_has_no_curves_and_says_why(sweep: dict[str, Any]) -> None:
    spec, storage, cells = sweep["spec"], sweep["storage"], sweep["cells"]
    write_sweep(storage.url, spec, [record(c, {"main": {"acc_clean": 0.5, "acc_pgd_5": 0.3}}) for c in cells])
    Path(storage.path("history.parquet")).unlink()  # a sweep from before history.parquet existed
    report.build_report(storage.url)
    markdown = read_text(storage, "report", "report.md")
    assert "## Training curves" not in markdown
    assert not Path(storage.path("report", "training_curves.png")).exists()
    assert "training curves: no per-epoch history in storage" in markdown.split("## What this report lacks", 1)[1]


def test_report_reads_running_cells_history_and_names_finished_cells_without_one(sweep: dict[str, Any]) -> None:
    spec, storage, cells = sweep["spec"], sweep["storage"], sweep["cells"]
    finished, running = cells[:3], cells[3]
    write_sweep(storage.url, spec, [record(c, {"main": {"acc_clean": 0.5}}) for c in finished])
    write_history(storage, finished[0], [2.0, 1.0], [0.2, 0.3])  # after history.parquet: found in cells/
    write_history(storage, running, [2.2], [0.1])  # no result yet: its epochs so far
    data = report.load_sweep(storage.url)
    assert sorted({(r["cell_id"], r["epoch"]) for r in data.history}) == sorted(
        [(finished[0].cell_id, 1), (finished[0].cell_id, 2), (running.cell_id, 1)]
    )
    markdown = report.render_report(data).markdown
    lacks = markdown.split("## What this report lacks", 1)[1]
    assert "training curves: 2 finished cell(s) have no per-epoch history" in lacks
    assert finished[1].cell_id in lacks and finished[0].cell_id not in lacks


def test_history_parquet_is_preferred_for_cells_it_settled(sweep: dict[str, Any]) -> None:
    spec, storage, cells = sweep["spec"], sweep["storage"], sweep["cells"]
    write_history(storage, cells[0], [2.0, 1.0], [0.2, 0.3])
    write_sweep(storage.url, spec, [record(c, {"main": {"acc_clean": 0.5}}) for c in cells])
    Path(storage.cell_path(cells[0].cell_id, HISTORY_FILE)).unlink()  # e.g. cell folders pruned after the sweep
    data = report.load_sweep(storage.url)
    assert [(r["epoch"], r["loss"]) for r in data.history] == [(1, 2.0), (2, 1.0)]
