"""`orchestrator.placement`'s check: which worker groups fit which nodes, and the wait before a cell
is declared unschedulable. Node lists are plain data here (the Ray path is tested in test_faults_ray.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from orchestrator import placement
from orchestrator.grid import Cell
from orchestrator.placement import UnschedulableError, placement_problem, wait_until_placeable
from orchestrator.storage import UNSCHEDULABLE_FILE, SweepStorage
from workloads.config import DataConfig, TrainConfig

GPU_NODE = {"CPU": 16.0, "GPU": 8.0, "memory": 1e11}
CPU_NODE = {"CPU": 2.0, "memory": 1e10}


@pytest.mark.parametrize(
    ("workers", "bundle", "nodes", "fits"),
    [
        (8, {"CPU": 1, "GPU": 1}, [GPU_NODE], True),
        (9, {"CPU": 1, "GPU": 1}, [GPU_NODE], False),  # one GPU short
        (16, {"CPU": 1, "GPU": 1}, [GPU_NODE, GPU_NODE], True),  # a group may span nodes
        (2, {"CPU": 1, "GPU": 1}, [CPU_NODE, CPU_NODE], False),  # no GPU anywhere
        (1, {"CPU": 4, "GPU": 1}, [{"CPU": 3.0, "GPU": 8.0}], False),  # GPUs, but too few CPUs beside them
        (4, {"CPU": 0.5}, [CPU_NODE], True),  # fractional CPUs
        (5, {"CPU": 0.5}, [CPU_NODE], False),
        (3, {"CPU": 1.5}, [CPU_NODE, CPU_NODE, CPU_NODE], True),  # one per node, 0.5 left on each
        (1, {"CPU": 1}, [], False),
    ],
)
def test_placement_problem(workers: int, bundle: dict[str, float], nodes: list[dict[str, float]], fits: bool) -> None:
    problem = placement_problem(workers, bundle, nodes)
    assert (problem is None) == fits, problem
    if problem is not None:
        assert problem.startswith(f"needs {workers} worker(s) of {{")
        assert f"the {len(nodes)} live node(s)" in problem


def _cell(timeout: float) -> Cell:
    """Two workers of {1 CPU, 1 GPU}."""
    return Cell(
        cell_id="abc123def456",
        axes={},
        config=TrainConfig(data=DataConfig(url="unused"), num_workers=2, use_gpu=True),
        gpus_per_worker=1,
        cpus_per_worker=1.0,
        max_failures=0,
        placement_timeout_s=timeout,
    )


def test_waits_while_the_cluster_grows_then_goes_ahead(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    storage = SweepStorage.for_sweep(str(tmp_path), "s")
    marker = Path(storage.cell_path("abc123def456", UNSCHEDULABLE_FILE))
    answers = [[CPU_NODE], [CPU_NODE], [CPU_NODE, GPU_NODE]]  # an autoscaler adds a GPU node on the third look
    seen_marker = []

    def nodes() -> list[dict[str, float]]:
        seen_marker.append(marker.exists())
        return answers.pop(0)

    wait_until_placeable(_cell(timeout=60), storage, nodes=nodes, poll_s=0.01)

    assert answers == []
    assert seen_marker == [False, True, True]  # written as soon as the problem was seen, kept while waiting
    assert not marker.exists()
    out = capsys.readouterr().out
    assert "cell abc123def456 UNSCHEDULABLE: needs 2 worker(s) of {1 CPU, 1 GPU}" in out
    assert "is placeable now" in out


def test_gives_up_after_the_placement_timeout(tmp_path: Path) -> None:
    storage = SweepStorage.for_sweep(str(tmp_path), "s")
    looks = []

    def nodes() -> list[dict[str, float]]:
        looks.append(1)
        return [CPU_NODE]

    with pytest.raises(UnschedulableError, match=r"^unschedulable: needs 2 worker\(s\).*\(waited 0 s\)$"):
        wait_until_placeable(_cell(timeout=0.2), storage, nodes=nodes, poll_s=0.05)
    assert len(looks) >= 2  # it looked again before giving up
    assert not Path(storage.cell_path("abc123def456", UNSCHEDULABLE_FILE)).exists()


def test_a_cell_the_autoscaler_can_serve_waits_past_the_placement_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A preempted node's replacement may take longer than placement_timeout_s: while the autoscaler's node types
    can hold the group, the cell waits (and says so again now and then) instead of failing."""
    monkeypatch.setattr(placement, "AUTOSCALER_WAIT_LOG_S", 0.1)
    storage = SweepStorage.for_sweep(str(tmp_path), "s")
    gpu_node_up_at = time.monotonic() + 0.6  # well past the cell's 0.1 s placement timeout

    def nodes() -> list[dict[str, float]]:
        return [CPU_NODE, GPU_NODE] if time.monotonic() > gpu_node_up_at else [CPU_NODE]

    wait_until_placeable(
        _cell(timeout=0.1), storage, nodes=nodes, poll_s=0.02, node_types=lambda: [("gpu", GPU_NODE, 4)]
    )
    out = capsys.readouterr().out
    assert "cell abc123def456 waiting for the autoscaler: needs 2 worker(s)" in out
    assert "still waiting for the autoscaler" in out and "is placeable now" in out
    assert not Path(storage.cell_path("abc123def456", UNSCHEDULABLE_FILE)).exists()


def test_a_placeable_cell_writes_nothing(tmp_path: Path) -> None:
    storage = SweepStorage.for_sweep(str(tmp_path), "s")
    wait_until_placeable(_cell(timeout=60), storage, nodes=lambda: [GPU_NODE], poll_s=0.01)
    assert not Path(storage.path()).exists()


def test_the_driver_keeps_releasing_dead_controllers_groups_while_cells_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A trial retried at once after its node was lost asks for a worker group before the GCS knows the old
    controller is dead: the release must happen again later, while the cells run, and stop with them."""
    calls: list[int] = []
    enough = threading.Event()

    def release() -> list[str]:
        calls.append(len(calls))
        if len(calls) >= 4:
            enough.set()
        if len(calls) in (2, 3):
            raise ConnectionError("GCS unreachable")
        return []

    monkeypatch.setattr(placement, "release_dead_controllers_resources", release)
    with placement.releasing_dead_controllers_resources(interval_s=0.01):
        assert enough.wait(timeout=30), calls
    # The thread has been joined: no call after the block; two failures, reported once, did not stop it.
    assert not any(t.name == "dead-controller-groups" for t in threading.enumerate())
    assert len(calls) >= 4
    assert capsys.readouterr().out.count("GCS unreachable") == 1
