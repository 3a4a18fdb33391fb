"""Admission of cells onto the cluster: a Tune search algorithm that only starts a cell when its resources are free.

Why not let Ray queue the work: each cell's Train workers live in a gang-scheduled placement group that Tune cannot
see, and a worker group that cannot be placed fails after 60 s (DESIGN section 6). So the searcher keeps its own
budget of the cluster's GPUs and CPUs, suggests the next cell only when it fits, returns None (Tune asks again
later) when nothing fits, and gives the resources back when the trial completes, errored or not.

Policy: first fit, largest first. Pending cells are ordered by the resources they need (then their estimated cost),
and the first one that fits the free budget starts. Big cells start as soon as they can; small cells backfill
the gaps the big ones leave, which is what keeps a heterogeneous study close to its makespan lower bound.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ray.tune.search import Searcher

Demand = Mapping[str, float]


class ResourceBudgetSearcher(Searcher):
    """Tune calls a searcher from its single control loop, so the budget needs no lock (and Tune pickles it)."""

    def __init__(
        self,
        cells: Sequence[Mapping[str, Any]],
        demands: Sequence[Demand],
        budget: Demand,
        priority: Sequence[float] | None = None,
    ) -> None:
        super().__init__(metric=None, mode=None)
        if len(cells) != len(demands):
            raise ValueError("one demand per cell")
        costs = priority if priority is not None else [0.0] * len(cells)
        order = sorted(
            range(len(cells)), key=lambda i: (-demands[i].get("GPU", 0), -costs[i], -sum(demands[i].values()))
        )
        self._pending = [(dict(cells[i]), dict(demands[i])) for i in order]
        self._free = dict(budget)
        self._running: dict[str, dict[str, float]] = {}
        self.peak_use: dict[str, float] = dict.fromkeys(budget, 0.0)
        for cell, demand in self._pending:
            for resource, amount in demand.items():
                if amount > budget.get(resource, 0.0) + 1e-9:
                    raise ValueError(
                        f"cell {cell.get('cell_id')} needs {amount:g} {resource} but the cluster has "
                        f"{budget.get(resource, 0.0):g}"
                    )

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if not self._pending:
            return Searcher.FINISHED  # type: ignore[return-value]
        for index, (cell, demand) in enumerate(self._pending):
            if all(self._free.get(r, 0.0) + 1e-9 >= amount for r, amount in demand.items()):
                del self._pending[index]
                for resource, amount in demand.items():
                    self._free[resource] = self._free.get(resource, 0.0) - amount
                self._running[trial_id] = demand
                self._track_peak()
                return {"cell": cell}
        return None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        demand = self._running.pop(trial_id, None)
        if demand is None:
            return
        for resource, amount in demand.items():
            self._free[resource] = self._free.get(resource, 0.0) + amount

    def _track_peak(self) -> None:
        for resource in self.peak_use:
            used = sum(d.get(resource, 0.0) for d in self._running.values())
            self.peak_use[resource] = max(self.peak_use[resource], used)

    @property
    def pending(self) -> int:
        return len(self._pending)
