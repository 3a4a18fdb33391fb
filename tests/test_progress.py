"""The sweep's cell counts through Tune's callbacks (`orchestrator.progress.SweepProgress`) when a trial is retried
or a cell fails on its own, and which errors make a trial worth retrying (`orchestrator.runner`).

The callbacks are driven with stand-in trials that carry what the callback reads of Tune's `Trial` (its config's
cell, its failure count, its last result), in the order Tune 2.60's controller calls them
(`TuneController._process_trial_failure`: `on_trial_recover` then, once restarted, `on_trial_start`); no Ray
instance. The retry itself, on a cluster that loses a node, is tests/test_multinode_ray.py's.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ray import exceptions
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from orchestrator.grid import Cell, expand
from orchestrator.progress import SweepProgress
from orchestrator.runner import CELL_FAILED, lost_to_the_cluster
from orchestrator.spec import parse_spec
from orchestrator.storage import SweepStorage


def cells() -> list[Cell]:
    spec = parse_spec("name: p\nworkload: {data: {url: builtin://digits}}\ngrid: {seed: [0, 1, 2]}\n")
    return expand(spec)


def trial(cell: Cell, failures: int = 0, last_result: dict[str, Any] | None = None) -> Any:
    return SimpleNamespace(
        config={"cell": cell}, run_metadata=SimpleNamespace(num_failures=failures), last_result=last_result or {}
    )


@pytest.fixture
def progress(tmp_path: Path) -> SweepProgress:
    storage = SweepStorage(str(tmp_path / "p"))
    return SweepProgress("p", storage.url, total=3, already_finished=0, epochs={c.cell_id: 2 for c in cells()})


def test_a_retried_trial_counts_once(progress: SweepProgress, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, _ = cells()
    progress.on_trial_start(0, [], trial(a))
    progress.on_trial_start(0, [], trial(b))
    assert progress.counts == {"pending": 1, "running": 2, "finished": 0, "failed": 0}
    progress.on_trial_recover(0, [], trial(a, failures=1))  # its node died: back to pending until it restarts
    assert progress.counts == {"pending": 2, "running": 1, "finished": 0, "failed": 0}
    progress.on_trial_start(0, [], trial(a, failures=1))
    progress.on_trial_start(0, [], trial(a, failures=1))  # a repeated call moves nothing
    assert progress.counts == {"pending": 1, "running": 2, "finished": 0, "failed": 0}
    progress.on_trial_complete(0, [], trial(a, failures=1))
    progress.on_trial_complete(0, [], trial(b, last_result={CELL_FAILED: "UnschedulableError: too big"}))
    assert progress.counts == {"pending": 1, "running": 0, "finished": 1, "failed": 1}
    out = capsys.readouterr().out
    assert f"cell {a.cell_id} lost its trial" in out and "(1 lost)" in out
    assert f"cell {b.cell_id} FAILED: UnschedulableError: too big" in out
    assert all(value >= 0 for value in progress.counts.values())


def test_a_failed_cells_last_result_is_no_epoch_line(
    progress: SweepProgress, capsys: pytest.CaptureFixture[str]
) -> None:
    a = cells()[0]
    progress.on_trial_start(0, [], trial(a))
    capsys.readouterr()
    progress.on_trial_result(0, [], trial(a), {CELL_FAILED: "FloatingPointError: loss is nan"})
    assert capsys.readouterr().out == ""


def test_an_attempt_that_resumed_says_from_which_epoch_once(
    progress: SweepProgress, capsys: pytest.CaptureFixture[str]
) -> None:
    a = cells()[0]
    progress.on_trial_start(0, [], trial(a))
    progress.on_trial_result(0, [], trial(a), {"epoch": 1, "start_epoch": 0})
    progress.on_trial_result(0, [], trial(a), {"epoch": 2, "start_epoch": 0})
    first = capsys.readouterr().out
    assert f"cell {a.cell_id} epoch 2/2" in first and "resumed" not in first
    # Train restarted the worker group within the trial, from epoch 2's checkpoint.
    progress.on_trial_result(0, [], trial(a), {"epoch": 3, "start_epoch": 2})
    progress.on_trial_result(0, [], trial(a), {"epoch": 4, "start_epoch": 2})
    # The trial was lost and retried: its next attempt resumes from epoch 4, which is said again.
    progress.on_trial_recover(0, [], trial(a, failures=1))
    progress.on_trial_start(0, [], trial(a, failures=1))
    progress.on_trial_result(0, [], trial(a, failures=1), {"epoch": 5, "start_epoch": 4})
    lines = [line for line in capsys.readouterr().out.splitlines() if " epoch " in line]
    assert [("resumed from epoch" in line) for line in lines] == [True, False, True], lines
    assert "epoch 3/2, resumed from epoch 2" in lines[0] and "epoch 5/2, resumed from epoch 4" in lines[2]


def test_trial_exhausting_its_retries_is_failed(progress: SweepProgress) -> None:
    a = cells()[0]
    progress.on_trial_start(0, [], trial(a))
    progress.on_trial_recover(0, [], trial(a, failures=1))
    progress.on_trial_error(0, [], trial(a, failures=2))  # Tune gave up while it was pending a restart
    assert progress.counts == {"pending": 2, "running": 0, "finished": 0, "failed": 1}


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as err:
            raise outer from err
    except BaseException as err:
        return err


@pytest.mark.parametrize(
    ("error", "lost"),
    [
        (exceptions.ActorDiedError(), True),  # the Train controller died with its node
        (exceptions.NodeDiedError("node gone"), True),
        (exceptions.WorkerCrashedError(), True),
        (_chained(RuntimeError("Training failed"), exceptions.ActorDiedError()), True),
        (RuntimeError("Training failed: FloatingPointError: loss is nan"), False),
        # Storage unreachable past the outage tolerance: the infrastructure's fault, not the cell's.
        (_chained(RuntimeError("Training failed"), ConnectionRefusedError()), True),
        (WorkerGroupError("worker 1 failed", {1: ConnectionResetError()}), True),
        (WorkerGroupError("worker 0 failed", {0: FloatingPointError("loss is nan")}), False),
        (ControllerError(exceptions.NodeDiedError("node gone")), True),
        (FileNotFoundError("no such checkpoint"), False),
        (ValueError("bad config"), False),
    ],
)
def test_which_errors_make_a_trial_worth_retrying(error: BaseException, lost: bool) -> None:
    assert lost_to_the_cluster(error) is lost
