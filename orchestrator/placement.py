"""Can a cell's worker group be placed on the cluster at all? Said at once, waited for, then given up on.

Ray Train gang-schedules a cell's workers in a placement group and, when it cannot be placed, retries every 60 s
for ever with nothing in the sweep's log to say why (DESIGN section 6). The trial checks first: a cell that fits
no live node is reported `UNSCHEDULABLE` (log line, `unschedulable.json` shown by orchestrator.status) and fails
after `resources.placement_timeout_s`, time for an autoscaler to add a node.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from orchestrator.grid import Cell
from orchestrator.storage import UNSCHEDULABLE_FILE, SweepStorage

PLACEMENT_POLL_S = 5.0


class UnschedulableError(RuntimeError):
    pass


def placement_problem(num_workers: int, bundle: dict[str, float], nodes: list[dict[str, float]]) -> str | None:
    """Why `num_workers` workers of `bundle` cannot be placed on nodes with these total resources, or None.

    Capacity, not availability: cells already running are the searcher's business (it admits a cell only when
    its resources are free). This catches what no waiting fixes unless the cluster grows: a bundle larger than
    any node, or a resource the cluster does not have. Ray Train itself would retry such a worker group every 60
    s for ever, with nothing in the sweep's log to say why (DESIGN section 6).
    """
    slots = sum(
        min(int(node.get(resource, 0.0) / amount + 1e-9) for resource, amount in bundle.items() if amount > 0)
        for node in nodes
    )
    if slots >= num_workers:
        return None
    wanted = ", ".join(f"{amount:g} {resource}" for resource, amount in sorted(bundle.items()))
    offered = "; ".join(
        ", ".join(f"{node.get(resource, 0.0):g} {resource}" for resource in sorted(bundle)) for node in nodes
    )
    return (
        f"needs {num_workers} worker(s) of {{{wanted}}} but the {len(nodes)} live node(s) "
        f"({offered or 'none'}) hold {slots}"
    )


def live_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(node.get("Resources") or {}) for node in ray.nodes() if node.get("Alive")]


def wait_until_placeable(
    cell: Cell,
    storage: SweepStorage,
    nodes: Callable[[], list[dict[str, float]]] = live_nodes,
    poll_s: float = PLACEMENT_POLL_S,
) -> None:
    """Return once the cell's worker group fits the live nodes; meanwhile say so in the log and in storage
    (`unschedulable.json`, shown by orchestrator.status); give up with UnschedulableError after the spec's
    `resources.placement_timeout_s`."""
    problem = placement_problem(cell.num_workers, cell.worker_bundle(), nodes())
    if problem is None:
        return
    marker = storage.cell_path(cell.cell_id, UNSCHEDULABLE_FILE)
    since = time.time()
    timeout = cell.placement_timeout_s
    storage.write_json(marker, {"cell_id": cell.cell_id, "since": since, "problem": problem})
    print(
        f"cell {cell.cell_id} UNSCHEDULABLE: {problem}; waiting up to {timeout:.0f} s for the cluster to grow",
        flush=True,
    )
    while problem is not None and time.time() - since < timeout:
        time.sleep(min(poll_s, max(0.0, since + timeout - time.time())))
        problem = placement_problem(cell.num_workers, cell.worker_bundle(), nodes())
    storage.remove(marker)
    if problem is not None:
        raise UnschedulableError(f"unschedulable: {problem} (waited {timeout:.0f} s)")
    print(f"cell {cell.cell_id} is placeable now", flush=True)
