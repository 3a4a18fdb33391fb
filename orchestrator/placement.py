"""Can a cell's worker group be placed on the cluster at all? Said at once, waited for, then given up on.

Ray Train gang-schedules a cell's workers in a placement group and, when it cannot be placed, retries every 60 s
for ever with nothing in the sweep's log to say why (docs/design.md section 6). The trial checks first: a cell that fits
no live node is reported `UNSCHEDULABLE` (log line, `unschedulable.json` shown by orchestrator.status) and fails
after `resources.placement_timeout_s`, time for the cluster to grow.

On a cluster with an autoscaler that reports its node types (KubeRay's; `ray start --autoscaling-config`), a cell
that fits no live node but fits what the autoscaler can add is not unschedulable: the trial says it waits for the
autoscaler (whose request the driver has made, see `orchestrator.sweep.request_capacity`) for as long as the
autoscaler can add the room, however long that takes (a preempted node's replacement), and goes ahead once the node
is up. A cell that even the autoscaler's largest cluster cannot hold fails at once, naming the node types.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator

from orchestrator import ray_compat
from orchestrator.grid import Cell
from orchestrator.records import Unschedulable
from orchestrator.storage import UNSCHEDULABLE_FILE, SweepStorage

PLACEMENT_POLL_S = 5.0
AUTOSCALER_WAIT_LOG_S = 600.0
# An autoscaling cluster (KubeRay) starts smaller than it can grow: its maximum is the budget, and cells wait for
# the autoscaler instead of being refused. Set by the deployment (`deploy render` writes them on the head), e.g.
# SWEEP_AUTOSCALER_MAX_GPUS=128; the driver reads them (orchestrator.sweep).
AUTOSCALER_MAX_ENV = {
    "CPU": "SWEEP_AUTOSCALER_MAX_CPUS",
    "GPU": "SWEEP_AUTOSCALER_MAX_GPUS",
}  # how often a cell waiting for the autoscaler says so again
# (name, resources of one node, most nodes of the type, -1 for no limit): what an autoscaler may add.
NodeType = tuple[str, dict[str, float], int]


class UnschedulableError(RuntimeError):
    pass


def placement_problem(num_workers: int, bundle: dict[str, float], nodes: list[dict[str, float]]) -> str | None:
    """Why `num_workers` workers of `bundle` cannot be placed on nodes with these total resources, or None.

    Capacity, not availability: cells already running are the searcher's business (it admits a cell only when
    its resources are free). This catches what no waiting fixes unless the cluster grows: a bundle larger than
    any node, or a resource the cluster does not have. Ray Train itself would retry such a worker group every 60
    s for ever, with nothing in the sweep's log to say why (docs/design.md section 6).
    """
    slots = sum(_slots(bundle, node) for node in nodes)
    if slots >= num_workers:
        return None
    wanted = _describe(bundle)
    offered = "; ".join(
        ", ".join(f"{node.get(resource, 0.0):g} {resource}" for resource in sorted(bundle)) for node in nodes
    )
    return (
        f"needs {num_workers} worker(s) of {{{wanted}}} but the {len(nodes)} live node(s) "
        f"({offered or 'none'}) hold {slots}"
    )


def _slots(bundle: dict[str, float], node: dict[str, float]) -> int:
    """How many bundles fit one node of these total resources."""
    return min(int(node.get(resource, 0.0) / amount + 1e-9) for resource, amount in bundle.items() if amount > 0)


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {resource}" for resource, amount in sorted(resources.items()))


def beyond_autoscaler(
    num_workers: int, bundle: dict[str, float], nodes: list[dict[str, float]], node_types: list[NodeType]
) -> str | None:
    """Why `num_workers` workers of `bundle` fit neither the live nodes nor anything the autoscaler's node types
    can add, or None when the autoscaler can make room. Live nodes that the autoscaler started count twice (as
    live and as room to grow), so the answer errs towards waiting, never towards failing a cell it could serve."""
    live = sum(_slots(bundle, node) for node in nodes)
    growth = 0
    for _, resources, most in node_types:
        per_node = _slots(bundle, resources)
        if per_node and most < 0:
            return None  # a type without a node limit that holds the bundle: any number of workers fits
        growth += per_node * max(most, 0)
    if live + growth >= num_workers:
        return None
    types = "; ".join(f"{name} {{{_describe(resources)}}} x at most {most}" for name, resources, most in node_types)
    return (
        f"needs {num_workers} worker(s) of {{{_describe(bundle)}}} but the autoscaler's largest cluster holds "
        f"{live + growth}: the live node(s) hold {live} and its node types ({types or 'none'}) add at most {growth}"
    )


def autoscaler_node_types() -> list[NodeType] | None:
    """The connected cluster's autoscaler node types, None without an autoscaler (or without Ray)."""
    import ray

    return ray_compat.autoscaler_node_types() if ray.is_initialized() else None


def live_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(node.get("Resources") or {}) for node in ray.nodes() if node.get("Alive")]


def release_dead_controllers_resources() -> None:
    """Free what worker groups of lost Train controllers still hold (ray_compat says why they do), so that they
    neither keep this cell from being placed nor make the check below see a full cluster."""
    import ray

    if not ray.is_initialized():
        return
    for group in ray_compat.remove_placement_groups_of_dead_train_controllers():
        print(f"removed placement group {group}, left by a Train controller lost with its node", flush=True)


@contextlib.contextmanager
def releasing_dead_controllers_resources(interval_s: float = PLACEMENT_POLL_S) -> Iterator[None]:
    """Run :func:`release_dead_controllers_resources` every ``interval_s`` in the driver while the block runs.

    Once at a trial's start is not enough: Tune retries a trial lost with its node at once, but the GCS calls the
    node's Train controller dead only after it has missed the node's health checks (tens of seconds), so the
    retried worker group would wait for the dead one's resources until Train's start timeout (600 s here, see
    ray_compat.driver_environment). Found by tests/test_multinode_ray.py (losing the node of a trial).
    """
    stop = threading.Event()

    def keep_releasing() -> None:
        warned = False
        while not stop.wait(interval_s):
            try:
                release_dead_controllers_resources()
            except Exception as err:  # the GCS briefly unreachable: try again next time, say so once
                if not warned:
                    print(f"warning: could not check for dead Train controllers' placement groups: {err}", flush=True)
                    warned = True

    thread = threading.Thread(target=keep_releasing, name="dead-controller-groups", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval_s + 30)


def wait_until_placeable(
    cell: Cell,
    storage: SweepStorage,
    nodes: Callable[[], list[dict[str, float]]] = live_nodes,
    poll_s: float = PLACEMENT_POLL_S,
    node_types: Callable[[], list[NodeType] | None] = autoscaler_node_types,
) -> None:
    """Return once the cell's worker group fits the live nodes; meanwhile say so in the log and in storage
    (`unschedulable.json`, shown by orchestrator.status). Without an autoscaler, give up with UnschedulableError
    after the spec's `resources.placement_timeout_s`; with one whose node types can hold the group, wait while
    they can; with one whose node types never can, give up at once."""
    release_dead_controllers_resources()
    bundle = cell.worker_bundle()
    problem = placement_problem(cell.num_workers, bundle, nodes())
    if problem is None:
        return
    types = node_types()
    if types is not None:
        beyond = beyond_autoscaler(cell.num_workers, bundle, nodes(), types)
        if beyond is not None:
            raise UnschedulableError(f"unschedulable: {beyond}")
    marker = storage.cell_path(cell.cell_id, UNSCHEDULABLE_FILE)
    since = time.time()
    storage.write_json(marker, Unschedulable(cell.cell_id, since, problem).to_json())
    if types is not None:
        # The autoscaler can add the room (a preempted node's replacement, a node pool scaling up): the cell waits
        # as long as that holds, however long the cloud takes; the searcher meanwhile admits the pending cells that
        # fit the rest of the autoscaler's budget. Giving up after placement_timeout_s here would fail a cell of a
        # months-long study over one slow replacement node.
        timeout = math.inf
        print(
            f"cell {cell.cell_id} waiting for the autoscaler: {problem}; its node types can add the room "
            f"(waiting while they can; said again every {AUTOSCALER_WAIT_LOG_S / 60:.0f} minutes)",
            flush=True,
        )
    else:
        timeout = cell.placement_timeout_s
        print(
            f"cell {cell.cell_id} UNSCHEDULABLE: {problem}; waiting up to {timeout:.0f} s for the cluster to grow",
            flush=True,
        )
    said = since
    while problem is not None and time.time() - since < timeout:
        time.sleep(min(poll_s, max(0.0, since + timeout - time.time())))
        problem = placement_problem(cell.num_workers, bundle, nodes())
        if problem is not None and types is not None and time.time() - said >= AUTOSCALER_WAIT_LOG_S:
            said = time.time()
            print(f"cell {cell.cell_id} still waiting for the autoscaler ({said - since:.0f} s): {problem}", flush=True)
    storage.remove(marker)
    if problem is not None:
        raise UnschedulableError(f"unschedulable: {problem} (waited {timeout:.0f} s)")
    print(f"cell {cell.cell_id} is placeable now", flush=True)
