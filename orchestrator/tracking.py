"""Experiment tracking (the spec's `tracking` section), through Ray Tune's own logger callbacks.

Tune's stock loggers name a run after its trial and log the trial's config, which here is a `Cell` object that
neither MLflow nor TensorBoard can store, and they write into Tune's scratch folder, which the driver deletes at
exit. The two callbacks below keep Ray's machinery (the callback hooks and Ray's MLflow utility) and change only
what is logged and where:

- MLflow: one run per cell, named by the cell id, in the experiment `tracking.experiment` (default: the sweep's
  name); its parameters are the cell's resolved configuration (`config.<path>`, as in results.parquet), its tags
  the grid axes, the sweep and the driver's provenance; its metrics every numeric value each epoch reports (loss,
  training accuracies, LR, images per second) at step = epoch, and the final evaluation (`eval/<branch>/<metric>`).
  A cell that fails on its own ends its run FAILED.
- TensorBoard: event files under `<storage>/<name>/tensorboard/<cell_id>/`, written locally and copied into the
  sweep's storage (local or object storage) when the cell ends, so they outlive the cluster.

A resubmitted cell gets a new run (its epochs continue the step count); finished cells are not logged again.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import TYPE_CHECKING, Any

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.logger import LoggerCallback

from orchestrator.results import HISTORY_METRICS, flatten_config
from orchestrator.runner import CELL_FAILED
from orchestrator.spec import Spec
from orchestrator.storage import SweepStorage
from workloads import metrics as metric_names
from workloads.fs import with_retries

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

TENSORBOARD_DIR = "tensorboard"


def _cell_of(trial: Trial) -> Any:
    return trial.config["cell"]


def epoch_metrics(result: dict[str, Any]) -> tuple[int | None, dict[str, float]]:
    """(epoch, metrics) of one reported result: what the training loop reports each epoch (HISTORY_METRICS,
    train_seconds) and the final evaluation (eval/<branch>/<metric>); Tune's bookkeeping is left out."""
    metrics = {}
    for key, value in result.items():
        wanted = key in HISTORY_METRICS or key == "train_seconds" or metric_names.parse_eval_key(key) is not None
        if wanted and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            metrics[key] = float(value)
    epoch = result.get("epoch")
    return (int(epoch) if isinstance(epoch, int | float) else None), metrics


class CellMLflowCallback(MLflowLoggerCallback):
    """Ray's MLflow logger callback with runs named and described by cell (see the module's docstring)."""

    def __init__(self, tracking_uri: str, experiment: str, sweep: str, provenance: dict[str, Any]) -> None:
        super().__init__(tracking_uri=tracking_uri, experiment_name=experiment, save_artifact=False)
        self._sweep = sweep
        self._provenance = provenance
        self._failed: set[str] = set()

    def log_trial_start(self, trial: Trial) -> None:
        if trial in self._trial_runs:
            return
        cell = _cell_of(trial)
        tags = {"sweep": self._sweep, "cell_id": cell.cell_id} | {f"axis.{k}": str(v) for k, v in cell.axes.items()}
        tags |= {f"provenance.{k}": str(v) for k, v in self._provenance.items() if v is not None}
        run = self.mlflow_util.start_run(tags=tags, run_name=cell.cell_id)
        self._trial_runs[trial] = run.info.run_id
        self.mlflow_util.log_params(
            run_id=run.info.run_id, params_to_log=flatten_config(cell.config.model_dump(mode="json"))
        )

    def log_trial_result(self, iteration: int, trial: Trial, result: dict[str, Any]) -> None:
        if result.get(CELL_FAILED):
            self._failed.add(trial.trial_id)
            return
        epoch, metrics = epoch_metrics(result)
        if metrics:
            step = epoch if epoch is not None else iteration
            self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=metrics, step=step)

    def log_trial_end(self, trial: Trial, failed: bool = False) -> None:
        status = "FAILED" if failed or trial.trial_id in self._failed else "FINISHED"
        self.mlflow_util.end_run(run_id=self._trial_runs[trial], status=status)


class CellTensorBoardCallback(LoggerCallback):
    """TensorBoard event files per cell, copied into `<sweep>/tensorboard/<cell_id>/` when the cell ends."""

    def __init__(self, sweep_url: str) -> None:
        self._storage = SweepStorage(sweep_url)
        self._scratch = tempfile.mkdtemp(prefix="sweep-tensorboard-")
        self._writers: dict[str, Any] = {}

    def _writer(self, trial: Trial) -> Any:
        from tensorboardX import SummaryWriter

        cell_id = _cell_of(trial).cell_id
        if cell_id not in self._writers:
            self._writers[cell_id] = SummaryWriter(os.path.join(self._scratch, cell_id), flush_secs=30)
        return self._writers[cell_id]

    def log_trial_result(self, iteration: int, trial: Trial, result: dict[str, Any]) -> None:
        epoch, metrics = epoch_metrics(result)
        writer = self._writer(trial)
        for key, value in metrics.items():
            writer.add_scalar(key, value, global_step=epoch if epoch is not None else iteration)
        writer.flush()

    def log_trial_end(self, trial: Trial, failed: bool = False) -> None:
        cell_id = _cell_of(trial).cell_id
        writer = self._writers.pop(cell_id, None)
        if writer is None:
            return
        writer.close()
        local = os.path.join(self._scratch, cell_id)
        target = self._storage.path(TENSORBOARD_DIR, cell_id)

        def upload() -> None:
            fs = self._storage.fs
            for name in sorted(os.listdir(local)):
                fs.put_file(os.path.join(local, name), f"{target}/{name}")

        with_retries(upload, f"upload TensorBoard events of cell {cell_id}")


def tracking_callbacks(spec: Spec, sweep_url: str, provenance: dict[str, Any]) -> list[LoggerCallback]:
    """The callbacks the spec's `tracking` section asks for (none by default)."""
    callbacks: list[LoggerCallback] = []
    if spec.tracking.mlflow:
        experiment = spec.tracking.experiment or spec.name
        callbacks.append(CellMLflowCallback(spec.tracking.mlflow, experiment, spec.name, provenance))
    if spec.tracking.tensorboard:
        callbacks.append(CellTensorBoardCallback(sweep_url))
    return callbacks
