"""The sweep driver on a real local Ray instance: `orchestrator.sweep.main` end to end (docs/design.md 3, 4, 6).

One Ray instance for the module (2 CPUs, half a CPU per Train worker, finite failure limits), started after the
session's moto server so that every worker inherits the S3 endpoint and credentials from the raylet's
environment. The fault hook (`workloads.train.FAULT_ENV`) goes in through the job's runtime environment, aimed at
seed 1, a seed that only the fault test's sweep has. The node's Prometheus endpoint is enabled on a free port and
scraped while the module's main sweep runs.

Specs are the shape of `sweeps/tiny.yaml` (bundled digits, a 1/16-width ResNet-18, PGD-1), one epoch.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from orchestrator import sweep
from orchestrator.grid import expand
from orchestrator.provenance import source_hash
from orchestrator.spec import load_spec
from tests.conftest import tiny_spec, write_spec
from tests.mlflow_server import mlflow_server
from workloads.faults import FAULT_ENV

pytestmark = [pytest.mark.ray, pytest.mark.slow]

FAULT_SEED = 1  # only the fault test's sweep has a cell with this seed
EVAL_STEPS = [1, 2]
CONTRACT_COLUMNS = [
    "cell_id",
    "clean_ratio",
    "norm",
    "pgd_steps",
    "depth",
    "batch_size",
    "strategy",
    "seed",
    "branch",
    "acc_clean",
    *(f"acc_pgd_{n}" for n in EVAL_STEPS),
    "epochs",
    "train_seconds",
    "gpu_hours",
    "status",
]


def spec_dict(name: str, grid: dict[str, list[Any]], *, epochs: int = 1, max_failures: int = 1) -> dict[str, Any]:
    """The shared tiny spec (tests/conftest.py), one epoch, two eval attacks; `storage` is always overridden."""
    workload = {"recipe": {"epochs": epochs}, "eval": {"pgd_steps": EVAL_STEPS, "subset": 64, "batch_size": 64}}
    return tiny_spec(name, grid, workload=workload, max_failures=max_failures)


# A plain BN cell and an MBN cell (clean ratio 1: both branches train), the MBN one evaluated with each branch.
TINY = spec_dict("tiny", {"clean_ratio": [1.0], "norm": ["bn", "mbn"]})


def expected_rows(spec_path: Path) -> set[tuple[str, str]]:
    """(cell_id, branch) of every row results.parquet must have: MBN cells have two eval branches."""
    rows = set()
    for cell in expand(load_spec(spec_path)):
        branches = ["mbn_adv", "mbn_clean"] if cell.config.model.norm == "mbn" else ["main"]
        rows |= {(cell.cell_id, branch) for branch in branches}
    return rows


def result_rows(table: Any) -> list[dict[str, Any]]:
    return table.to_pylist()


def checkpoint_dirs(cells: Path) -> set[str]:
    return {str(p.relative_to(cells)) for p in cells.glob("*/checkpoint_*") if p.is_dir()}


# --- Prometheus scraping -----------------------------------------------------------------------------------

GAUGE_LINE = re.compile(r"^ray_sweep_cells\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class Sample:
    at: float  # time.monotonic()
    states: dict[str, float] | None  # state -> cells; None when the scrape itself failed


@dataclass
class GaugeScraper:
    """Scrapes `ray_sweep_cells{sweep=...}` from the node's metrics endpoint once a second in a thread."""

    port: int
    sweep: str
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def scrape(self) -> dict[str, float] | None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never ask a proxy for 127.0.0.1
        try:
            with opener.open(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return None
        states: dict[str, float] = {}
        for line in text.splitlines():
            match = GAUGE_LINE.match(line)
            if match:
                labels = dict(LABEL.findall(match["labels"]))
                if labels.get("sweep") == self.sweep:
                    states[labels["state"]] = float(match["value"])
        return states

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(Sample(time.monotonic(), self.scrape()))
            self._stop.wait(1.0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gauge-scraper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wait_for(self, condition: Callable[[dict[str, float]], bool], timeout: float) -> dict[str, float] | None:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for sample in self.samples[seen:]:
                seen += 1
                if sample.states and condition(sample.states):
                    return sample.states
            time.sleep(0.5)
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def ray_local(s3_server: str, metrics_port: int) -> Iterator[None]:
    """One local Ray instance for the module; the S3 environment is already in os.environ (s3_server)."""
    import ray

    # address="local": always a new instance, never someone else's `ray start` cluster found in /tmp/ray.
    # _metrics_export_port: the node's metrics agent serves Prometheus text there (no dashboard needed).
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        runtime_env={
            "env_vars": {FAULT_ENV: json.dumps({"seed": FAULT_SEED, "kind": "raise"}), "OMP_NUM_THREADS": "1"}
        },
    )
    try:
        yield
    finally:
        ray.shutdown()


@dataclass
class SweepRun:
    spec: Path
    storage: Path
    code: int
    started: float  # time.monotonic() around main()
    ended: float
    scraper: GaugeScraper

    @property
    def folder(self) -> Path:
        return self.storage / "tiny"


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A live MLflow tracking server (tests/mlflow_server.py) the module's main sweep reports to."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture(scope="module")
def tiny_sweep(
    ray_local: None, metrics_port: int, mlflow_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SweepRun]:
    """The module's main sweep (TINY to local storage), with the sweep's gauges scraped while it runs, tracked in
    MLflow and TensorBoard (switched on by command-line overrides, as a user would)."""
    root = tmp_path_factory.mktemp("tiny")
    spec = write_spec(root, TINY)
    scraper = GaugeScraper(metrics_port, "tiny")
    scraper.start()
    started = time.monotonic()
    tracking = [f"tracking.mlflow={mlflow_url}", "tracking.tensorboard=true"]
    code = sweep.main([str(spec), *tracking, "--storage", str(root / "runs")])
    run = SweepRun(spec, root / "runs", code, started, time.monotonic(), scraper)
    try:
        yield run
    finally:
        scraper.stop()


# --- tests -------------------------------------------------------------------------------------------------


def test_tiny_sweep_writes_the_storage_layout_and_results_table(tiny_sweep: SweepRun) -> None:
    assert tiny_sweep.code == sweep.EXIT_OK
    folder = tiny_sweep.folder
    assert load_spec(folder / "spec.yaml").name == "tiny"  # the resolved spec, valid as submitted
    cells = expand(load_spec(tiny_sweep.spec))
    assert {p.name for p in (folder / "cells").iterdir()} == {c.cell_id for c in cells}
    for cell in cells:
        cell_dir = folder / "cells" / cell.cell_id
        config = json.loads((cell_dir / "config.json").read_text())
        assert config["cell_id"] == cell.cell_id and config["axes"] == cell.axes
        result = json.loads((cell_dir / "result.json").read_text())
        assert result["status"] == "finished" and result["epochs"] == 1
        assert result["started_at"] <= result["finished_at"]
        assert not (cell_dir / "error.json").exists()
        checkpoints = [p for p in cell_dir.glob("checkpoint_*") if (p / "state.pt").is_file()]
        assert checkpoints, f"no Ray Train checkpoint with a state.pt in {cell_dir}"

    table = pq.read_table(folder / "results.parquet")
    missing = [c for c in CONTRACT_COLUMNS if c not in table.column_names]
    assert not missing, f"results.parquet lacks contract columns {missing}; has {table.column_names}"
    rows = result_rows(table)
    keys = [(r["cell_id"], r["branch"]) for r in rows]
    assert len(keys) == len(set(keys)), f"duplicate (cell, branch) rows: {keys}"
    assert set(keys) == expected_rows(tiny_sweep.spec)
    assert {r["branch"] for r in rows} == {"main", "mbn_adv", "mbn_clean"}
    by_cell = {c.cell_id: c for c in cells}
    for row in rows:
        cell = by_cell[row["cell_id"]]
        assert {axis: row[axis] for axis in cell.axes} == cell.axes
        assert row["status"] == "finished"
        assert row["epochs"] == 1
        assert row["train_seconds"] > 0 and row["gpu_hours"] == 0.0
        for column in ("acc_clean", *(f"acc_pgd_{n}" for n in EVAL_STEPS)):
            assert row[column] is not None and 0.0 <= row[column] <= 1.0, (column, row)


def test_each_cell_is_an_mlflow_run_with_config_epochs_and_evaluation(tiny_sweep: SweepRun, mlflow_url: str) -> None:
    from mlflow import MlflowClient

    assert tiny_sweep.code == sweep.EXIT_OK
    client = MlflowClient(mlflow_url)
    experiment = client.get_experiment_by_name("tiny")  # default experiment: the sweep's name
    assert experiment is not None
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    cells = expand(load_spec(tiny_sweep.spec))
    assert set(runs) == {cell.cell_id for cell in cells}
    for cell in cells:
        run = runs[cell.cell_id]
        assert run.info.status == "FINISHED"
        assert run.data.params["config.model.norm"] == cell.config.model.norm
        assert run.data.params["config.attack.steps"] == str(cell.config.attack.steps)
        assert run.data.tags["sweep"] == "tiny" and run.data.tags["provenance.source_hash"] == source_hash()
        losses = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in losses] == [1] and math.isfinite(losses[0].value)  # one per epoch
        branch = "mbn_adv" if cell.config.model.norm == "mbn" else "main"
        assert 0.0 <= run.data.metrics[f"eval/{branch}/acc_clean"] <= 1.0


def test_tensorboard_events_persist_in_the_sweeps_storage(tiny_sweep: SweepRun) -> None:
    for cell in expand(load_spec(tiny_sweep.spec)):
        events = list((tiny_sweep.folder / "tensorboard" / cell.cell_id).glob("events.out.tfevents.*"))
        assert events, f"no TensorBoard events for cell {cell.cell_id}"
        payload = b"".join(path.read_bytes() for path in events)
        assert b"loss" in payload and b"eval/" in payload  # the scalars' tags


def test_results_record_the_code_and_device_that_produced_them(tiny_sweep: SweepRun) -> None:
    for cell in expand(load_spec(tiny_sweep.spec)):
        result = json.loads((tiny_sweep.folder / "cells" / cell.cell_id / "result.json").read_text())
        assert result["provenance"]["source_hash"] == source_hash()
        assert result["provenance"]["device"].startswith("cpu")  # the Train worker's own device
    rows = pq.read_table(tiny_sweep.folder / "results.parquet").to_pylist()
    assert {r["source_hash"] for r in rows} == {source_hash()} and {r["sweep"] for r in rows} == {"tiny"}


def test_every_epoch_is_in_the_cells_history_and_the_history_table(tiny_sweep: SweepRun) -> None:
    """The driver's history.json per cell holds what Ray Train saw reported, and history.parquet gathers them."""
    folder = tiny_sweep.folder
    cells = expand(load_spec(tiny_sweep.spec))
    rows = pq.read_table(folder / "history.parquet").to_pylist()
    assert sorted((r["cell_id"], r["epoch"]) for r in rows) == sorted((c.cell_id, 1) for c in cells)
    for cell in cells:
        history = json.loads((folder / "cells" / cell.cell_id / "history.json").read_text())
        assert history["axes"] == cell.axes and [row["epoch"] for row in history["epochs"]] == [1]
        # Ray Train's own record of the reported metrics (one per kept checkpoint): the same numbers.
        snapshot = json.loads((folder / "cells" / cell.cell_id / "checkpoint_manager_snapshot.json").read_text())
        trained = {r["metrics"]["epoch"]: r["metrics"] for r in snapshot["checkpoint_results"]}
        assert history["epochs"][0]["loss"] == trained[1]["loss"]
        assert history["epochs"][0]["train_acc_adv"] == trained[1].get("train_acc_adv")
    assert (folder / "report" / "training_curves.png").is_file()


def test_progress_gauges_reach_the_nodes_prometheus_endpoint(tiny_sweep: SweepRun) -> None:
    scraper = tiny_sweep.scraper
    # The driver sets finished=2 as the last trial completes; the agent sees it at the next export (~10 s).
    final = scraper.wait_for(lambda states: states.get("finished") == 2.0, timeout=60)
    recent = [s.states for s in scraper.samples[-5:]]
    assert final is not None, f"ray_sweep_cells{{sweep='tiny',state='finished'}} 2 never scraped; last: {recent}"
    assert final.get("pending") == 0.0 and final.get("failed") == 0.0

    during = [s for s in scraper.samples if tiny_sweep.started <= s.at <= tiny_sweep.ended]
    first = next((i for i, s in enumerate(during) if s.states), None)
    assert first is not None, "the gauge never showed up while the sweep ran"
    assert any(s.states and s.states.get("running", 0) >= 1 for s in during), "never saw a running cell"
    # A gauge that is set only when a cell changes state ages out of the agent ~20 s later (2 export intervals):
    # during a long epoch the dashboard would lose the sweep. It must stay visible for the whole run.
    gaps = [round(s.at - tiny_sweep.started, 1) for s in during[first:] if s.states == {}]
    assert not gaps, f"ray_sweep_cells vanished from the endpoint mid-sweep at +{gaps} s"


def test_rerunning_a_finished_sweep_trains_nothing(tiny_sweep: SweepRun) -> None:
    assert tiny_sweep.code == sweep.EXIT_OK
    folder = tiny_sweep.folder
    checkpoints = checkpoint_dirs(folder / "cells")
    results = {p: p.read_bytes() for p in folder.glob("cells/*/result.json")}
    table = pq.read_table(folder / "results.parquet")

    started = time.monotonic()
    code = sweep.main([str(tiny_sweep.spec), "--storage", str(tiny_sweep.storage)])
    elapsed = time.monotonic() - started

    assert code == sweep.EXIT_OK
    assert elapsed < 20, f"re-running a finished sweep took {elapsed:.1f} s"
    assert checkpoint_dirs(folder / "cells") == checkpoints
    assert {p: p.read_bytes() for p in folder.glob("cells/*/result.json")} == results
    again = pq.read_table(folder / "results.parquet")
    assert again.equals(table), f"results changed:\n{table.to_pylist()}\n{again.to_pylist()}"


def test_sweep_to_s3_storage(ray_local: None, s3_bucket: str, tmp_path: Path) -> None:
    import boto3

    spec = write_spec(tmp_path, TINY)
    bucket = s3_bucket.removeprefix("s3://")
    assert sweep.main([str(spec), "--storage", f"{s3_bucket}/study"]) == sweep.EXIT_OK

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    keys = [
        obj["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="study/tiny/")
        for obj in page.get("Contents", [])
    ]

    def read(key: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()

    assert "study/tiny/spec.yaml" in keys
    table = pq.read_table(io.BytesIO(read("study/tiny/results.parquet")))
    rows = result_rows(table)
    assert {(r["cell_id"], r["branch"]) for r in rows} == expected_rows(spec)
    assert len(rows) == len(expected_rows(spec))
    assert all(r["status"] == "finished" for r in rows)
    for cell in expand(load_spec(spec)):
        prefix = f"study/tiny/cells/{cell.cell_id}/"
        result = json.loads(read(prefix + "result.json"))
        assert result["status"] == "finished" and result["cell_id"] == cell.cell_id
        states = [k for k in keys if k.startswith(prefix + "checkpoint_") and k.endswith("/state.pt")]
        assert states, f"no checkpoint under s3://{bucket}/{prefix}: {[k for k in keys if k.startswith(prefix)]}"
    # Nothing written to storage carries the credentials that were in the environment (docs/design.md section 4).
    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"].encode(), os.environ["AWS_ACCESS_KEY_ID"].encode()]
    for key in keys:
        if key.endswith((".json", ".yaml", ".lease", ".parquet")):
            body = read(key)
            assert not any(secret in body for secret in secrets), f"{key} contains a credential"


def test_a_failing_cell_is_reported_and_the_others_finish(
    ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # max_failures 1: Train restarts the worker group once (the injected error fires on every attempt), and Tune
    # would run a raising trial once more: the count of "started" lines below shows it does not.
    spec = write_spec(tmp_path, spec_dict("faulty", {"seed": [0, FAULT_SEED]}, max_failures=1))
    cells = {cell.axes["seed"]: cell for cell in expand(load_spec(spec))}
    bad, good = cells[FAULT_SEED].cell_id, cells[0].cell_id

    code = sweep.main([str(spec), "--storage", str(tmp_path / "runs")])
    out, err = capsys.readouterr()

    assert code == sweep.EXIT_FAILED
    # A cell failing on its own ends its trial normally: counted failed once, never run again by Tune (which
    # retries only trials lost with their node, up to max_failures times).
    assert out.count(f"cell {bad} started") == 1 and f"cell {bad} FAILED: " in out, out[-3000:]
    assert "lost its trial" not in out and "1 finished, 0 running, 0 pending, 1 failed" in out
    folder = tmp_path / "runs" / "faulty" / "cells"
    assert json.loads((folder / good / "result.json").read_text())["status"] == "finished"
    assert not (folder / bad / "result.json").exists()
    error = json.loads((folder / bad / "error.json").read_text())
    assert error["status"] == "failed" and "injected fault" in error["error"], error

    rows = {(r["cell_id"], r["branch"]): r for r in result_rows(pq.read_table(folder.parent / "results.parquet"))}
    assert set(rows) == {(good, "main"), (bad, "main")}
    assert rows[good, "main"]["status"] == "finished"
    failed = rows[bad, "main"]
    assert failed["status"] == "failed" and "injected fault" in failed["error"], failed
    assert failed["acc_clean"] is None

    listed = [line for line in err.splitlines() if line.startswith(f"FAILED cell {bad}")]
    assert listed and "injected fault" in listed[0], err[-3000:]
    assert f"FAILED cell {good}" not in err


def test_a_non_finite_loss_fails_the_cell_with_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The "nan" fault through the one training loop (a sweep's workers would need a second fault variable)."""
    from workloads import data
    from workloads.config import TrainConfig
    from workloads.sessions import LocalSession
    from workloads.train import run

    data.synthetic_to_parquet(str(tmp_path / "data"), 64, (1, 16, 16), 10, num_test=16)
    cfg = TrainConfig.model_validate(
        {
            "data": {"url": str(tmp_path / "data")},
            "model": {"depth": 18, "width": 0.0625, "stem": "small"},
            "attack": {"steps": 1},
            "recipe": {"epochs": 2, "batch_size": 16, "per_worker_batch": 16},
            "eval": {"pgd_steps": [1], "subset": 16, "batch_size": 16},
            "seed": 5,
        }
    )
    monkeypatch.setenv(FAULT_ENV, json.dumps({"seed": 5, "epoch": 2, "kind": "nan"}))
    session = LocalSession(tmp_path / "out")
    with pytest.raises(FloatingPointError, match="non-finite loss at epoch 2"):
        run(cfg, session)
    # Epoch 1 trained and was checkpointed; the poisoned epoch 2 left no checkpoint and no report behind.
    assert [m["epoch"] for m in session.history] == [1]
    assert math.isfinite(session.history[0]["loss"])
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint_*")) == ["checkpoint_000001"]
