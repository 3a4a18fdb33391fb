"""Admission of cells onto GPUs: the ResourceBudgetSearcher alone, then a sweep on 8 fake GPUs (docs/design.md 6).

The fake GPUs are `ray.init(num_gpus=8)` on a CPU box: Ray Train places one worker per "GPU" and the workload,
finding no CUDA, trains on the CPU (gloo). Cells need 2, 4 and 8 GPUs; Ray Train would make a worker group that
cannot be placed wait and then fail, so the searcher must start a cell only when its GPUs are free. The check is
on what actually ran: each cell's result.json says when its trial started and finished fitting.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from ray.tune.search import Searcher

from orchestrator import sweep
from orchestrator.grid import expand
from orchestrator.scheduler import ResourceBudgetSearcher
from orchestrator.spec import load_spec

pytestmark = pytest.mark.ray

FAKE_GPUS = 8


@dataclass(frozen=True)
class Admitted:
    """What the searcher reads of a cell (orchestrator.scheduler.Admissible), and the GPUs the test checks."""

    cell_id: str
    gpus: float
    num_workers: int = 1


# --- the searcher on its own: no Ray instance ---------------------------------------------------------------


def make_searcher(
    gpus: list[float], budget_gpus: float, cpus: float = 0.01, priority: list[float] | None = None
) -> ResourceBudgetSearcher:
    cells = [Admitted(f"c{i}", g) for i, g in enumerate(gpus)]
    demands = [{"CPU": cpus, "GPU": g} for g in gpus]
    return ResourceBudgetSearcher(cells, demands, {"CPU": 2.0, "GPU": budget_gpus}, priority=priority)


def drain(searcher: ResourceBudgetSearcher, budget_gpus: float) -> list[float]:
    """Run the searcher like Tune does: ask until it waits, complete the oldest trial, repeat until FINISHED.

    Returns the GPUs of the cells in the order they were suggested; asserts the budget is never exceeded.
    """
    running: dict[str, float] = {}
    order: list[float] = []
    for step in range(100):
        suggestion = searcher.suggest(f"t{step}")
        if suggestion is Searcher.FINISHED:
            assert not searcher.pending
            break
        if suggestion is None:
            assert running, "the searcher waits although nothing runs: a cell can never start"
            oldest = next(iter(running))
            del running[oldest]
            searcher.on_trial_complete(oldest)
            continue
        gpus = suggestion["cell"].gpus
        running[f"t{step}"] = gpus
        order.append(gpus)
        assert sum(running.values()) <= budget_gpus, f"oversubscribed: {running}"
    else:
        pytest.fail("the searcher never finished")
    return order


def test_searcher_starts_largest_first_and_never_oversubscribes() -> None:
    searcher = make_searcher([1, 2, 4, 1, 2, 1, 1], budget_gpus=4)
    order = drain(searcher, budget_gpus=4)
    assert order == [4, 2, 2, 1, 1, 1, 1]
    assert searcher.peak_use["GPU"] == 4


def test_searcher_waits_when_nothing_fits_and_gets_resources_back() -> None:
    searcher = make_searcher([4, 4, 1], budget_gpus=4)
    first = searcher.suggest("a")
    assert first is not None and first["cell"].gpus == 4
    assert searcher.suggest("b") is None  # neither the other 4-GPU cell nor the 1-GPU cell fits beside it
    searcher.on_trial_complete("a", error=True)  # an errored trial gives its GPUs back too
    searcher.on_trial_complete("a")  # a repeated completion must not give them back twice
    second = searcher.suggest("b")
    assert second is not None and second["cell"].gpus == 4
    assert searcher.suggest("c") is None
    searcher.on_trial_complete("b")
    third = searcher.suggest("c")
    assert third is not None and third["cell"].gpus == 1
    # Nothing pending: finished, even while "c" still runs.
    assert searcher.suggest("d") is Searcher.FINISHED


def test_searcher_breaks_ties_by_cost_and_budgets_cpus_too() -> None:
    searcher = make_searcher([2, 2], budget_gpus=8, priority=[1.0, 5.0])
    first = searcher.suggest("a")
    assert first is not None and first["cell"].cell_id == "c1"  # the costlier of two equal cells first

    cpu_bound = make_searcher([0, 0, 0], budget_gpus=0, cpus=1.5)  # 2 CPUs hold one 1.5-CPU cell at a time
    assert cpu_bound.suggest("a") is not None
    assert cpu_bound.suggest("b") is None
    cpu_bound.on_trial_complete("a")
    assert cpu_bound.suggest("b") is not None


def test_searcher_reports_the_running_cells_whenever_they_change() -> None:
    """What the driver forwards to the autoscaler (sweep.request_capacity): exactly the cells running now."""
    seen: list[list[str]] = []
    cells = [Admitted(f"c{i}", g) for i, g in enumerate([4, 4, 1])]
    searcher = ResourceBudgetSearcher(
        cells,
        [{"CPU": 0.01, "GPU": c.gpus} for c in cells],
        {"CPU": 2.0, "GPU": 5.0},
        on_running_change=lambda running: seen.append(sorted(c.cell_id for c in running)),
    )
    a, b = searcher.suggest("a"), searcher.suggest("b")
    assert a is not None and b is not None and searcher.suggest("c") is None  # 4 + 1 GPUs in use
    searcher.on_trial_complete("a")
    c = searcher.suggest("c")
    assert c is not None
    searcher.on_trial_complete("b")
    searcher.on_trial_complete("c")
    first, second = a["cell"].cell_id, b["cell"].cell_id
    assert seen == [
        [first],
        sorted([first, second]),
        [second],
        sorted([second, c["cell"].cell_id]),
        [c["cell"].cell_id],
        [],
    ]


def test_searcher_rejects_a_cell_larger_than_the_cluster() -> None:
    with pytest.raises(ValueError, match="needs 16 GPU but the cluster has 8"):
        make_searcher([2, 16], budget_gpus=8)


# --- a sweep on fake GPUs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_fake_gpus() -> Iterator[None]:
    import ray

    # address="local": always a new instance, never someone else's `ray start` cluster found in /tmp/ray.
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=FAKE_GPUS,
        include_dashboard=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    try:
        yield
    finally:
        ray.shutdown()


def gpu_spec(data_url: str) -> dict[str, Any]:
    return {
        "name": "gpus",
        "storage": "./runs",
        "workload": {
            "data": {"url": data_url},
            "model": {"depth": 18, "norm": "bn", "width": 0.0625, "stem": "small"},
            "attack": {"steps": 1},
            "recipe": {"epochs": 1, "batch_size": 16, "per_worker_batch": 8},
            "eval": {"pgd_steps": [1], "subset": 16, "batch_size": 16},
        },
        # 16, 32, 64 images / 8 per worker: cells of 2, 4 and 8 workers, one GPU each.
        "grid": {"batch_size": [16, 32, 64]},
        "resources": {
            "use_gpu": True,
            "gpus_per_worker": 1,
            "cpus_per_worker": 0.1,
            "max_workers_per_cell": FAKE_GPUS,
            "cluster_gpus": FAKE_GPUS,
        },
        "planning": {"train_images": 128, "image_size": 16, "relative_speed": 0.01},
        "checkpoint_every": 1,
        "max_failures": 0,
    }


def peak_concurrent(intervals: list[tuple[float, float, float]]) -> float:
    """Largest sum of amounts over overlapping [start, end) intervals (an end before a start at equal times)."""
    events = sorted([(start, 1, amount) for start, _, amount in intervals] + [(end, 0, -a) for _, end, a in intervals])
    peak = used = 0.0
    for _, _, delta in events:
        used += delta
        peak = max(peak, used)
    return peak


def test_peak_concurrency_helper() -> None:
    assert peak_concurrent([(0, 10, 8), (10, 20, 4), (12, 30, 2)]) == 8
    assert peak_concurrent([(0, 10, 8), (9, 20, 2)]) == 10


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cells_never_hold_more_gpus_than_the_cluster_has(ray_fake_gpus: None, tmp_path: Path) -> None:
    from workloads.data import synthetic_to_parquet

    # A small synthetic set: 128 train images of 16x16 keep one epoch of 8 DDP workers on 2 cores short.
    synthetic_to_parquet(str(tmp_path / "data"), 128, (1, 16, 16), 10, num_test=32)
    spec = tmp_path / "gpus.yaml"
    spec.write_text(yaml.safe_dump(gpu_spec(str(tmp_path / "data")), sort_keys=False))
    cells = expand(load_spec(spec))
    assert sorted(c.gpus for c in cells) == [2, 4, 8]

    assert sweep.main([str(spec), "--storage", str(tmp_path / "runs")]) == sweep.EXIT_OK

    folder = tmp_path / "runs" / "gpus"
    intervals = []
    for cell in cells:
        result = json.loads((folder / "cells" / cell.cell_id / "result.json").read_text())
        assert result["status"] == "finished", result
        assert result["gpu_hours"] > 0  # the fake GPUs are accounted like real ones
        intervals.append((result["started_at"], result["finished_at"], float(cell.gpus)))
    peak = peak_concurrent(intervals)
    assert peak <= FAKE_GPUS, f"cells held {peak:g} GPUs at once on a cluster of {FAKE_GPUS}: {intervals}"
    # The three cells do equal work, so the 2-GPU cell runs longest; it would set the makespan if started late,
    # and orchestrator.packing starts such a cell first (the wide ones fill in beside it).
    first = min(intervals)
    assert first[2] == 2, f"the longest cell (equal work, fewest GPUs) should start first: {sorted(intervals)}"
    rows = pq.read_table(folder / "results.parquet").to_pylist()
    assert sorted(r["batch_size"] for r in rows) == [16, 32, 64]
    assert all(r["status"] == "finished" for r in rows)
