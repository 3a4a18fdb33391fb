"""One Tune trial = one grid cell = one Ray Train run of the workload, named by the cell id.

The trial itself is tiny (a fraction of a CPU); the real resources are the Train workers' placement group, which
the search algorithm has already reserved room for (see `orchestrator.scheduler`). Calling `fit()` again with the
same name and storage resumes the run from its last checkpoint, which is how an interrupted sweep picks up.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any

from orchestrator.redact import redact
from orchestrator.storage import ERROR_FILE, RESULT_FILE, UNSCHEDULABLE_FILE, SweepStorage

TRIAL_CPU = 0.01  # not 0: Tune rejects a trial with no resources (DESIGN section 6)
PLACEMENT_POLL_S = 5.0


class UnschedulableError(RuntimeError):
    pass


def cell_payload(
    cell_id: str,
    axes: dict[str, Any],
    train_config: dict[str, Any],
    *,
    sweep_url: str,
    num_workers: int,
    use_gpu: bool,
    gpus_per_worker: float,
    cpus_per_worker: float,
    max_failures: int,
    keep_checkpoints: int,
    placement_timeout_s: float,
) -> dict[str, Any]:
    """Everything a trial needs, as plain JSON-able data (it travels through Tune's config)."""
    return {
        "cell_id": cell_id,
        "axes": axes,
        "train": train_config,
        "sweep_url": sweep_url,
        "num_workers": num_workers,
        "use_gpu": use_gpu,
        "gpus_per_worker": gpus_per_worker,
        "cpus_per_worker": cpus_per_worker,
        "max_failures": max_failures,
        "keep_checkpoints": keep_checkpoints,
        "placement_timeout_s": placement_timeout_s,
    }


def resource_demand(payload: dict[str, Any]) -> dict[str, float]:
    gpus = payload["num_workers"] * payload["gpus_per_worker"] if payload["use_gpu"] else 0.0
    return {"CPU": payload["num_workers"] * payload["cpus_per_worker"] + TRIAL_CPU, "GPU": gpus}


def run_cell(config: dict[str, Any]) -> None:
    """Tune function trainable: fit the cell's TorchTrainer and publish result.json (or error.json)."""
    import ray.train
    import torch  # here, not at the top: the sweep's driver imports this module and never needs torch
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from workloads.train import train_loop_per_worker

    cell = config["cell"]
    storage = SweepStorage(cell["sweep_url"])
    storage_path, filesystem = storage.ray_storage()
    resources = worker_bundle(cell)
    # NCCL needs real GPUs; scheduling tests run with fake GPU resources on a CPU box, where gloo is the way.
    backend = "nccl" if cell["use_gpu"] and torch.cuda.is_available() else "gloo"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cell["train"],
        torch_config=TorchConfig(backend=backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cell["num_workers"], use_gpu=cell["use_gpu"], resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cell["cell_id"],
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cell["keep_checkpoints"]),
            # Static typing sees Train V1's classes; at run time these are V2's (DESIGN section 6). A finite
            # controller failure limit keeps an unplaceable worker group from retrying forever.
            failure_config=ray.train.FailureConfig(  # type: ignore[call-arg]
                max_failures=cell["max_failures"], controller_failure_limit=1
            ),
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]
            # Per-report INFO lines from every worker drown the sweep's own progress lines in the job log.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    started = time.time()
    try:
        wait_until_placeable(cell, storage)
        result = trainer.fit()
    except Exception as err:
        storage.write_json(
            storage.cell_path(cell["cell_id"], ERROR_FILE),
            {
                "cell_id": cell["cell_id"],
                "axes": cell["axes"],
                "status": "failed",
                "error": redact(str(err) if isinstance(err, UnschedulableError) else _root_cause(err)),
                "failed_at": time.time(),
            },
        )
        raise
    metrics = dict(result.metrics or {})
    storage.write_json(storage.cell_path(cell["cell_id"], RESULT_FILE), finished_record(cell, metrics, started))
    storage.remove(storage.cell_path(cell["cell_id"], ERROR_FILE))


def worker_bundle(cell: dict[str, Any]) -> dict[str, float]:
    bundle = {"CPU": float(cell["cpus_per_worker"])}
    if cell["use_gpu"]:
        bundle["GPU"] = float(cell["gpus_per_worker"])
    return bundle


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
    cell: dict[str, Any],
    storage: SweepStorage,
    nodes: Callable[[], list[dict[str, float]]] = live_nodes,
    poll_s: float = PLACEMENT_POLL_S,
) -> None:
    """Return once the cell's worker group fits the live nodes; meanwhile say so in the log and in storage
    (`unschedulable.json`, shown by orchestrator.status); give up with UnschedulableError after the spec's
    `resources.placement_timeout_s`."""
    problem = placement_problem(cell["num_workers"], worker_bundle(cell), nodes())
    if problem is None:
        return
    marker = storage.cell_path(cell["cell_id"], UNSCHEDULABLE_FILE)
    since = time.time()
    timeout = float(cell["placement_timeout_s"])
    storage.write_json(marker, {"cell_id": cell["cell_id"], "since": since, "problem": problem})
    print(
        f"cell {cell['cell_id']} UNSCHEDULABLE: {problem}; waiting up to {timeout:.0f} s for the cluster to grow",
        flush=True,
    )
    while problem is not None and time.time() - since < timeout:
        time.sleep(min(poll_s, max(0.0, since + timeout - time.time())))
        problem = placement_problem(cell["num_workers"], worker_bundle(cell), nodes())
    storage.remove(marker)
    if problem is not None:
        raise UnschedulableError(f"unschedulable: {problem} (waited {timeout:.0f} s)")
    print(f"cell {cell['cell_id']} is placeable now", flush=True)


def finished_record(cell: dict[str, Any], metrics: dict[str, Any], started: float) -> dict[str, Any]:
    branches: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith("eval/"):
            _, branch, name = key.split("/", 2)
            branches.setdefault(branch, {})[name] = float(value)
    gpus = cell["num_workers"] * cell["gpus_per_worker"] if cell["use_gpu"] else 0
    train_seconds = float(metrics.get("train_seconds", 0.0))
    return {
        "cell_id": cell["cell_id"],
        "axes": cell["axes"],
        "status": "finished",
        "epochs": int(metrics.get("epoch", 0)),
        "train_seconds": train_seconds,
        "gpu_hours": train_seconds * gpus / 3600,
        "branches": branches,
        "resumed_from_epoch": int(metrics.get("start_epoch", 0)),
        "started_at": started,
        "finished_at": time.time(),
    }


def _root_cause(err: BaseException) -> str:
    """The innermost error's one-line summary: Ray wraps worker errors several levels deep."""
    inner: BaseException = err
    while inner.__cause__ is not None:
        inner = inner.__cause__
    text = "".join(traceback.format_exception_only(type(inner), inner)).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    for line in reversed(lines):  # the worker's own exception is usually the last "XError: ..." line
        if "Error" in line.split(":", 1)[0] or "Exception" in line.split(":", 1)[0]:
            return line.strip()[:2000]
    return (lines[-1] if lines else repr(inner))[:2000]
