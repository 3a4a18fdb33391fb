"""Admission of cells onto the cluster: a Tune search algorithm that only starts a cell when its resources are free.

Why not let Ray queue the work: each cell's Train workers live in a gang-scheduled placement group that Tune cannot
see, and a worker group that cannot be placed fails after 60 s (docs/design.md section 6). So the searcher keeps its own
budget of the cluster's GPUs and CPUs, suggests the next cell only when it fits, returns None (Tune asks again
later) when nothing fits, and gives the resources back when the trial completes, errored or not.

Policy: `orchestrator.packing` (the same code the plan's makespan simulation runs, so `--plan` predicts what this
searcher does): the widest cell that fits first while every pending cell is short next to the remaining work /
cluster size; then the longest (estimated wall time) first, a cell that does not fit getting a reservation at the
earliest time enough resources free up, which other cells may fill only if they end by then or leave it what it
needs (EASY backfilling): narrow cells fill the gaps without starving a wide one, and the long cells do not end
up alone at the end. Times are read from `clock` (seconds) and compared with the plan's estimates, which the policy
rescales by what finished cells actually took.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from ray.tune.search import Searcher

from orchestrator.packing import Packer

Demand = Mapping[str, float]
SECONDS_PER_HOUR = 3600.0


class Admissible(Protocol):
    """What the searcher reads of a cell (`orchestrator.grid.Cell`); the rest travels to the trial untouched."""

    @property
    def cell_id(self) -> str: ...

    @property
    def num_workers(self) -> int: ...


def wall_hours(cells: Sequence[Admissible], demands: Sequence[Demand], priority: Sequence[float]) -> list[float]:
    """Estimated wall hours per cell from its estimated device-hours (`priority`, what `plan` calls device_hours):
    spread over its GPUs, or over its workers for a CPU cell (as `plan.make_plan` does)."""
    out = []
    for cell, demand, hours in zip(cells, demands, priority, strict=True):
        slots = demand.get("GPU", 0.0) or float(cell.num_workers or 1)
        out.append(hours / slots)
    return out


class ResourceBudgetSearcher(Searcher):
    """Tune calls a searcher from its single control loop, so the budget needs no lock (and Tune pickles it).

    `priority` holds each cell's estimated device-hours (GPU-hours, or worker-hours for a CPU cell); without
    it every cell counts as equally long and the widest goes first. `clock` returns seconds (monotonic).
    `on_running_change` is called with the running cells whenever a cell starts or ends (the driver tells an
    autoscaler what to provide through it).
    """

    def __init__(
        self,
        cells: Sequence[Admissible],
        demands: Sequence[Demand],
        budget: Demand,
        priority: Sequence[float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_running_change: Callable[[list[Any]], None] | None = None,
    ) -> None:
        super().__init__(metric=None, mode=None)
        if len(cells) != len(demands):
            raise ValueError("one demand per cell")
        for cell, demand in zip(cells, demands, strict=True):
            for resource, amount in demand.items():
                if amount > budget.get(resource, 0.0) + 1e-9:
                    raise ValueError(
                        f"cell {cell.cell_id} needs {amount:g} {resource} but the cluster has "
                        f"{budget.get(resource, 0.0):g}"
                    )
        hours = wall_hours(cells, demands, priority if priority is not None else [0.0] * len(cells))
        self._cells = list(cells)
        self._packer = Packer(demands, hours, budget)
        self._clock = clock
        self._on_running_change = on_running_change
        self._running: dict[str, int] = {}  # trial id -> cell index
        self.started: list[int] = []  # cell indices in the order they were suggested
        self.peak_use: dict[str, float] = dict.fromkeys(budget, 0.0)

    def _now(self) -> float:
        return self._clock() / SECONDS_PER_HOUR

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if not self._packer.pending:
            return Searcher.FINISHED  # type: ignore[return-value]
        now = self._now()
        index = self._packer.select(now)
        if index is None:
            return None  # nothing may start now: Tune asks again later
        self._packer.start(index, now)
        self._running[trial_id] = index
        self.started.append(index)
        self._track_peak()
        self._running_changed()
        return {"cell": self._cells[index]}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        index = self._running.pop(trial_id, None)
        if index is None:
            return
        # A failed cell's run time says nothing about the cost model: keep it out of the calibration.
        self._packer.finish(index, self._now(), calibrate=not error)
        self._running_changed()

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: an interrupted sweep resumes from storage (finished cells' results, running cells'
        Train checkpoints), never from Tune's experiment state, which lives in a temporary folder."""

    def _running_changed(self) -> None:
        if self._on_running_change is not None:
            self._on_running_change([self._cells[i] for i in self._running.values()])

    def _track_peak(self) -> None:
        for resource in self.peak_use:
            used = self._packer.capacity.get(resource, 0.0) - self._packer.free.get(resource, 0.0)
            self.peak_use[resource] = max(self.peak_use[resource], used)

    @property
    def pending(self) -> int:
        return self._packer.pending
