"""A cell's attempts in its storage folder (`orchestrator.attempts`): counted across drivers, each closed with its
outcome, and the backoff before a cell lost to the infrastructure runs again."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.attempts import BACKOFF_BASE_S, BACKOFF_CAP_S, CellAttempts, backoff_s, losses
from orchestrator.storage import SweepStorage


@pytest.fixture
def attempts(tmp_path: Path) -> CellAttempts:
    return CellAttempts(SweepStorage(str(tmp_path / "sweep")), "c0ffee")


def test_attempts_outlive_the_driver_that_wrote_them(attempts: CellAttempts, tmp_path: Path) -> None:
    assert attempts.begin() == []
    attempts.end("lost", "NodeDiedError: node gone")
    # A new driver (a new object over the same storage) sees the first attempt and records the second.
    again = CellAttempts(SweepStorage(str(tmp_path / "sweep")), "c0ffee")
    earlier = again.begin()
    assert [a["outcome"] for a in earlier] == ["lost"] and earlier[0]["reason"] == "NodeDiedError: node gone"
    # Its driver dies with it: the attempt is still "running" when the next one begins, which closes it.
    third = again.begin()
    assert [a["outcome"] for a in third] == ["lost", "interrupted"]
    again.end("finished")
    assert [(a["attempt"], a["outcome"]) for a in again.read()] == [(1, "lost"), (2, "interrupted"), (3, "finished")]
    assert all(a["ended_at"] >= a["started_at"] for a in again.read() if "ended_at" in a)


@pytest.mark.parametrize(
    ("outcomes", "wait"),
    [
        ([], 0.0),
        (["finished"], 0.0),
        (["interrupted", "interrupted"], 0.0),  # driver resubmissions resume at once
        (["lost"], BACKOFF_BASE_S),
        (["lost", "lost"], 2 * BACKOFF_BASE_S),
        (["lost", "interrupted", "lost"], 2 * BACKOFF_BASE_S),  # an interruption does not break the run of losses
        (["lost", "failed", "lost"], BACKOFF_BASE_S),
        (["lost"] * 20, BACKOFF_CAP_S),
    ],
)
def test_backoff_doubles_per_consecutive_loss_up_to_a_cap(outcomes: list[str], wait: float) -> None:
    assert backoff_s([{"outcome": o} for o in outcomes]) == wait


def test_only_losses_count_towards_the_limit() -> None:
    record = [{"outcome": o} for o in ("lost", "interrupted", "lost", "failed", "running")]
    assert losses(record) == 2


def test_an_unknown_outcome_is_refused(attempts: CellAttempts) -> None:
    attempts.begin()
    with pytest.raises(AssertionError):
        attempts.end("exploded")


def test_checkpoint_folders_ray_train_never_registered_are_pruned(tmp_path: Path) -> None:
    """An upload that finished after its driver, node or cluster died leaves a folder no snapshot names."""
    import json

    storage = SweepStorage(str(tmp_path / "sweep"))
    cell = Path(storage.cell_path("c0ffee"))
    for name in ("checkpoint_a", "checkpoint_b", "checkpoint_orphan"):
        (cell / name).mkdir(parents=True)
        (cell / name / "state.pt").write_bytes(b"x")
    (cell / "result.json").write_text("{}")
    assert storage.prune_unregistered_checkpoints("c0ffee") == []  # no snapshot yet: nothing is known, keep all
    snapshot = {
        "checkpoint_results": [{"checkpoint_dir_name": "checkpoint_a"}],
        "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_b"},
    }
    (cell / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    assert storage.prune_unregistered_checkpoints("c0ffee") == ["checkpoint_orphan"]
    assert sorted(p.name for p in cell.iterdir()) == [
        "checkpoint_a",
        "checkpoint_b",
        "checkpoint_manager_snapshot.json",
        "result.json",
    ]
