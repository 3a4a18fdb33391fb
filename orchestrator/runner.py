"""One Tune trial = one grid cell = one Ray Train run of the workload, named by the cell id.

The trial itself is tiny (a fraction of a CPU); the real resources are the Train workers' placement group, which
the search algorithm has already reserved room for (see `orchestrator.scheduler`). Calling `fit()` again with the
same name and storage resumes the run from its last checkpoint, which is how an interrupted sweep picks up.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from typing import Any

from orchestrator import ray_compat
from orchestrator.attempts import CellAttempts, backoff_s, losses
from orchestrator.grid import Cell
from orchestrator.placement import UnschedulableError, wait_until_placeable
from orchestrator.records import CellError, CellResult
from orchestrator.redact import redact
from orchestrator.storage import ERROR_FILE, RESULT_FILE, SweepStorage
from workloads import metrics as eval_metrics

TRIAL_CPU = 0.01  # not 0: Tune rejects a trial with no resources (docs/design.md section 6)
# The last result of a trial whose cell failed for reasons of its own (orchestrator.progress counts it as failed).
CELL_FAILED = "cell_failed"


def lost_to_the_cluster(err: BaseException) -> bool:
    """Whether `err` says the infrastructure failed under the cell rather than the cell failing on its own: a
    process or node of the cluster died (a spot node gone or drained, a raylet killed, an OOM-killed actor), or
    storage stayed unreachable past `storage_outage_tolerance_s`. Such a cell is worth another trial; a diverged
    loss or a bad config is not.

    Ray raises these as ray.exceptions types, chained under whatever Train or Tune wraps them in; Train keeps each
    rank's own error in `WorkerGroupError.worker_failures` and the controller's in `ControllerError`.
    """
    from ray import exceptions
    from ray.train.v2.api.exceptions import PreemptionError

    from workloads.fs import is_transient

    lost = (
        exceptions.RayActorError,
        exceptions.NodeDiedError,
        exceptions.WorkerCrashedError,
        exceptions.ObjectLostError,
        PreemptionError,
    )
    return any(isinstance(inner, lost) or is_transient(inner) for inner in _causes(err))


def _causes(err: BaseException) -> list[BaseException]:
    """`err` and every error it wraps: its __cause__/__context__ chain and the failures Ray Train collects."""
    found: list[BaseException] = []
    todo: list[BaseException] = [err]
    seen: set[int] = set()
    while todo:
        inner = todo.pop()
        if id(inner) in seen:
            continue
        seen.add(id(inner))
        found.append(inner)
        todo += [e for e in (inner.__cause__, inner.__context__) if e is not None]
        todo += [e for e in (getattr(inner, "worker_failures", None) or {}).values() if isinstance(e, BaseException)]
        controller = getattr(inner, "controller_failure", None)
        if isinstance(controller, BaseException):
            todo.append(controller)
    return found


def resource_demand(cell: Cell) -> dict[str, float]:
    """What admitting `cell` takes from the cluster: its Train workers plus its (tiny) trial."""
    return {"CPU": cell.num_workers * cell.cpus_per_worker + TRIAL_CPU, "GPU": float(cell.gpus)}


def run_cell(config: dict[str, Any], sweep_url: str, provenance: dict[str, Any] | None = None) -> None:
    """Tune function trainable (`config["cell"]` is the `Cell`; `sweep_url` comes through `tune.with_parameters`):
    fit the cell's TorchTrainer and publish result.json (or error.json).

    A cell that fails on its own ends its trial normally with a `CELL_FAILED` result, so Tune does not run it
    again; only a cell lost to the cluster (`lost_to_the_cluster`) raises, and Tune retries its trial."""
    import ray.train
    import torch  # here, not at the top: the sweep's driver imports this module and never needs torch
    from ray import tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    cell: Cell = config["cell"]
    storage = SweepStorage(sweep_url)
    storage_path, filesystem = storage.ray_storage()
    # NCCL needs real GPUs; scheduling tests run with fake GPU resources on a CPU box, where gloo is the way.
    backend = "nccl" if cell.use_gpu and torch.cuda.is_available() else "gloo"
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"train": cell.config},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cell.num_workers, use_gpu=cell.use_gpu, resources_per_worker=cell.worker_bundle()
        ),
        run_config=ray.train.RunConfig(
            name=cell.cell_id,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cell.config.keep_checkpoints),
            # Static typing sees Train V1's classes; at run time these are V2's (docs/design.md section 6). A finite
            # controller failure limit keeps an unplaceable worker group from retrying forever.
            failure_config=ray.train.FailureConfig(  # type: ignore[call-arg]
                max_failures=cell.max_failures, controller_failure_limit=1
            ),
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]
            # Per-report INFO lines from every worker drown the sweep's own progress lines in the job log.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    attempts = CellAttempts(storage, cell.cell_id)
    earlier = attempts.begin()
    wait_s = backoff_s(earlier)
    if wait_s:
        print(
            f"cell {cell.cell_id}: lost {losses(earlier)} time(s) so far; waiting {wait_s:.0f} s before attempt "
            f"{len(earlier) + 1}",
            flush=True,
        )
        time.sleep(wait_s)
    started = time.time()
    try:
        wait_until_placeable(cell, storage)
        result = trainer.fit()
    except Exception as err:
        reason = redact(str(err) if isinstance(err, UnschedulableError) else _root_cause(err))
        lost = lost_to_the_cluster(err)
        attempts.end("lost" if lost else "failed", reason)
        retried = lost and losses(earlier) < cell.max_failures
        if lost and not retried:
            reason = f"lost to the cluster {losses(earlier) + 1} times, over max_failures {cell.max_failures}: {reason}"
        storage.write_json(
            storage.cell_path(cell.cell_id, ERROR_FILE), CellError(cell.cell_id, cell.axes, reason).to_json()
        )
        if retried:
            raise  # Tune retries the trial (tune.FailureConfig in orchestrator.sweep); it resumes from storage
        # The cell's own outcome (unschedulable, diverged, Train's worker restarts spent, lost too often):
        # recorded, not retried.
        tune.report({CELL_FAILED: reason})
        return
    attempts.end("finished")
    orphans = storage.prune_unregistered_checkpoints(cell.cell_id)
    if orphans:
        print(f"cell {cell.cell_id}: removed {len(orphans)} checkpoint folder(s) no attempt registered", flush=True)
    metrics = dict(result.metrics or {})
    record = finished_record(cell, metrics, started)
    # Which code and libraries produced these numbers (orchestrator.provenance); the device is the worker's own.
    record.provenance = dict(provenance or {}) | {"device": metrics.get("device")}
    storage.write_json(storage.cell_path(cell.cell_id, RESULT_FILE), record.to_json())
    storage.remove(storage.cell_path(cell.cell_id, ERROR_FILE))


def _train_worker(config: dict[str, Any]) -> None:
    """What every Train worker runs: the workload's loop, with the sweep's Ray log settings applied first."""
    from workloads.train import train_loop_per_worker

    ray_compat.quiet_train_worker()
    train_loop_per_worker(config)


def finished_record(cell: Cell, metrics: dict[str, Any], started: float) -> CellResult:
    """The cell's result.json from its Train run's last metrics (evaluation keys `eval/<branch>/<metric>`)."""
    branches: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parsed = eval_metrics.parse_eval_key(key)
        if parsed is not None:
            branch, name = parsed
            branches.setdefault(branch, {})[name] = float(value)
    train_seconds = float(metrics.get("train_seconds", 0.0))
    measured = bn_statistics_fields(metrics)
    return CellResult(
        cell_id=cell.cell_id,
        axes=cell.axes,
        epochs=int(metrics.get("epoch", 0)),
        train_seconds=train_seconds,
        gpu_hours=train_seconds * cell.gpus / 3600,
        branches=branches,
        resumed_from_epoch=int(metrics.get("start_epoch", 0)),
        started_at=started,
        finished_at=time.time(),
        forked_from=str(metrics["forked_from"]) if metrics.get("forked_from") else None,
        domain_gap=measured.get("domain_gap"),
        bn_statistics=measured.get("bn_statistics"),
    )


def bn_statistics_fields(metrics: dict[str, Any]) -> dict[str, Any]:
    """`domain_gap` and `bn_statistics` of a result record, from the last report's metrics of the same names
    (workloads.bn_statistics: a number and JSON text); {} for a cell without BN or from before they were measured.
    Unreadable figure data is dropped rather than failing a finished cell."""
    fields: dict[str, Any] = {}
    gap = metrics.get("domain_gap")
    if isinstance(gap, int | float) and math.isfinite(gap):
        fields["domain_gap"] = float(gap)
    text = metrics.get("bn_statistics")
    try:
        summary = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        summary = None
    if isinstance(summary, dict):
        fields["bn_statistics"] = summary
    return fields


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
