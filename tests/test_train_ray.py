"""The real Ray Train path: a TorchTrainer runs `workloads.train.train_loop_per_worker` on two DDP workers (gloo).

One local Ray instance per module, 2 CPUs, half a CPU per worker and finite failure limits (docs/design.md section 6: on
a 2-CPU machine whole-CPU workers deadlock and, by default, the controller retries forever).

What Ray Train V2 (2.60) does when `fit()` is called again with the same `RunConfig(name, storage_path)`, read
from `ray/train/v2/_internal/execution/checkpoint/checkpoint_manager.py` and `controller/controller.py`: the new
controller's CheckpointManager finds the run's snapshot (`checkpoint_manager_snapshot.json`) in the run folder,
restores its list of reported checkpoints and hands the latest one to every worker (`ray.train.get_checkpoint()`).
Nothing marks a run "finished": a finished run is started again, and the workload itself must notice there is
nothing left to train. `Result.metrics` is the metrics dict attached to the latest *checkpoint*, not the last
report, so reports without a checkpoint (the re-evaluation below) never reach `Result.metrics`; the callback in
this module records every report to see them.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import ray.cloudpickle
import ray.train
import torch
from ray.train.torch import TorchTrainer

from workloads.config import TrainConfig
from workloads.faults import FAULT_ENV
from workloads.sessions import STATE_FILE
from workloads.train import train_loop_per_worker

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]

# Only cells with this seed see the injected fault (workloads.faults.mid_epoch), and only once.
FAULT_SEED = 7
FAULT_EPOCH = 2


class RecordReports(ray.train.UserCallback):
    """Appends every report (each worker's metrics, whether it carried a checkpoint) to a JSON-lines file.

    It runs inside the controller actor, so it writes to a file the test reads afterwards.
    """

    def __init__(self, path: str, attempt: str) -> None:
        self.path = path
        self.attempt = attempt

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"attempt": self.attempt, "metrics": metrics, "checkpoint": checkpoint is not None}))
            f.write("\n")


@pytest.fixture(scope="module")
def fault_flag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fault") / "fired"


@pytest.fixture(scope="module")
def ray_local(fault_flag: Path) -> Iterator[None]:
    """A new local Ray instance (address="local": never someone else's cluster from /tmp/ray).

    Its processes get a state-API address that refuses connections. Ray Train's PlacementGroupCleaner asks the
    state API every second whether the run's controller is alive and removes the run's placement group (its
    workers die: "Destroying worker since its placement group was removed") when the answer is empty. On this
    busy shared machine that happened to live runs: an overloaded state API, or discovery of another user's
    cluster, answers "no such actor". Refused connections raise ServerUnavailable, which the cleaner logs and
    ignores; ray.shutdown() removes everything at the end anyway.
    """
    refuse = socket.socket()
    refuse.bind(("127.0.0.1", 0))  # bound but never listening: connections are refused, no one else can listen
    fault = {"seed": FAULT_SEED, "epoch": FAULT_EPOCH, "kind": "raise", "once_file": str(fault_flag)}
    env = {
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{refuse.getsockname()[1]}",
        FAULT_ENV: json.dumps(fault),
        "OMP_NUM_THREADS": "1",
        # Workers import `workloads` from the repository wherever pytest was started from.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    # The callback class lives in this test module, which Ray's processes need not be able to import.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    try:
        yield
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        refuse.close()


def tiny_cell(url: str, seed: int) -> TrainConfig:
    """Digits, ResNet-18 at width 1/16, MBN with clean ratio 0 (its clean branch is unused: DDP must be told),
    PGD-1 training, two workers x 16 images x 2 accumulated micro-batches = batch 64."""
    return TrainConfig.model_validate(
        {
            "data": {"url": url, "shuffle_buffer": 256},
            "model": {"depth": 18, "norm": "mbn", "width": 1 / 16, "stem": "small"},
            "attack": {"steps": 1},
            "training": {"strategy": "mixture", "clean_ratio": 0.0},
            # The recipe its thresholds were measured with: the pipeline's 5-epoch warm-up would span this whole
            # 2-epoch run (see sweeps/smoke.yaml on why short digits runs keep it).
            "recipe": {
                "epochs": 2,
                "batch_size": 64,
                "per_worker_batch": 16,
                "base_lr": 0.8,
                "nesterov": False,
                "label_smoothing": 0.0,
                "weight_decay_on": "all",
                "warmup_epochs": 0,
            },
            "eval": {"pgd_steps": [2], "subset": 64, "batch_size": 32},
            "seed": seed,
            "num_workers": 2,
            "checkpoint_every": 1,
        }
    )


def trainer(cfg: TrainConfig, storage: Path, log: Path, attempt: str) -> TorchTrainer:
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg},
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(
            name="digits-cell",
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=0, controller_failure_limit=1),  # type: ignore[call-arg]
            callbacks=[RecordReports(str(log), attempt)],  # type: ignore[list-item]
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def reports(log: Path, attempt: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    return [line for line in lines if line["attempt"] == attempt]


def saved_epoch(checkpoint: ray.train.Checkpoint) -> int:
    with checkpoint.as_directory() as folder:
        return int(torch.load(Path(folder) / STATE_FILE, weights_only=False)["epoch"])


def test_crash_then_fit_again_resumes_and_a_finished_run_only_re_evaluates(
    ray_local: None, digits_url: str, fault_flag: Path, tmp_path: Path
) -> None:
    cfg = tiny_cell(digits_url, FAULT_SEED)
    storage, log = tmp_path / "storage", tmp_path / "reports.jsonl"

    # 1. Epoch 1 is reported with a checkpoint, then a worker raises as epoch 2 starts; no retries allowed.
    with pytest.raises(ray.train.TrainingFailedError, match=f"injected fault at epoch {FAULT_EPOCH}"):
        trainer(cfg, storage, log, "crash").fit()
    assert fault_flag.exists()
    first = reports(log, "crash")
    assert [[m["epoch"] for m in r["metrics"]] for r in first] == [[1, 1]]  # both ranks, one report
    assert first[0]["checkpoint"]

    # 2. The same name and storage: resumes from epoch 1's checkpoint and trains only epoch 2.
    result = trainer(cfg, storage, log, "resume").fit()
    second = reports(log, "resume")
    assert [[m["epoch"] for m in r["metrics"]] for r in second] == [[2, 2]]
    rank0, rank1 = second[0]["metrics"]
    assert rank0["start_epoch"] == 1 and rank0["train_seconds"] > rank0["epoch_seconds"]  # epoch 1's time kept
    assert {k: v for k, v in rank0.items() if k.startswith("eval/")} == {
        k: v for k, v in rank1.items() if k.startswith("eval/")
    }  # evaluation counts are all-reduced
    assert result.error is None and result.checkpoint is not None
    assert saved_epoch(result.checkpoint) == 2
    assert [m["epoch"] for _, m in result.best_checkpoints or []] == [1, 2]  # epoch 1 was not trained again
    metrics = result.metrics
    assert metrics is not None and metrics["epoch"] == 2 and metrics["start_epoch"] == 1
    for branch in ("mbn_adv", "mbn_clean"):  # Table 1: MBN is evaluated with either branch
        assert 0.0 <= metrics[f"eval/{branch}/acc_clean"] <= 1.0 and 0.0 <= metrics[f"eval/{branch}/acc_pgd_2"] <= 1.0
    assert metrics["eval/mbn_adv/acc_clean"] > 0.3  # it learned something (chance is 0.1)

    # 3. Fit a finished run again: workers get epoch 2's checkpoint, train nothing and only re-evaluate, with
    # the same numbers (the checkpoint round-trips the model, its BN statistics included, exactly).
    again = trainer(cfg, storage, log, "again").fit()
    third = reports(log, "again")
    assert len(third) == 1 and not third[0]["checkpoint"]
    rerun = third[0]["metrics"][0]
    assert "loss" not in rerun and rerun["epoch"] == 2 and rerun["start_epoch"] == 2
    assert {k: v for k, v in rerun.items() if k.startswith("eval/")} == {
        k: v for k, v in rank0.items() if k.startswith("eval/")
    }
    assert again.checkpoint is not None and again.checkpoint.path == result.checkpoint.path
    assert [m["epoch"] for _, m in again.best_checkpoints or []] == [1, 2]
