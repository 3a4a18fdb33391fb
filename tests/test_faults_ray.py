"""The fault matrix (issue "Reliability"): real faults in real Ray workers, storage behind a real S3 protocol.

One local Ray instance for the module (2 CPUs, half a CPU per Train worker). All S3 traffic of the module, the
driver's and every worker's, goes through `OutageProxy` in front of the session's moto server, so a test can
stop "the S3 server" mid-checkpoint. Faults are injected through `workloads.train.FAULT_ENV` in the job's
runtime environment, each aimed at a seed that only its own test's sweep uses; one-shot faults fire once per
module (their `once_file`), so the retry that follows succeeds.

Rows covered elsewhere: driver SIGKILL + resubmit (test_sweep_kill.py), two drivers (test_lease.py), bad input
(test_cli.py, test_spec.py, test_spec_fuzz.py).
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.parquet as pq
import pytest
import torch

from orchestrator import sweep
from orchestrator.grid import expand
from orchestrator.spec import load_spec
from orchestrator.status import cell_statuses
from tests.conftest import S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, tiny_spec, write_spec
from tests.outage_proxy import OutageProxy
from workloads.faults import FAULT_ENV

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.fault]

SIGKILL_SEED, NAN_SEED, CORRUPT_SEED, OUTAGE_SEED = 21, 22, 23, 24
SIGKILL_EPOCH = 3  # the SIGKILL lands halfway through this epoch, on rank 1 of 2
CORRUPT_FAILS_AT = 3  # the first run of the corrupt-checkpoint sweep dies in this epoch, after two checkpoints
OUTAGE_S = 20.0
OUTPUTS: list[str] = []  # everything the module's sweeps printed, grepped for credentials by the last test
RUN_DIRS: list[Path] = []  # the tests' own folders (specs, local storage), grepped too


def spec_dict(name: str, seeds: list[int], *, epochs: int, max_failures: int, **extra: Any) -> dict[str, Any]:
    """The shared tiny spec (tests/conftest.py), `seeds` replicates, checkpoints kept for the faults to hit."""
    workload = {"recipe": {"epochs": epochs}, **extra.pop("workload", {})}
    return tiny_spec(name, {"seed": seeds}, workload=workload, keep_checkpoints=4, max_failures=max_failures, **extra)


def cell_ids_by_seed(spec_path: Path) -> dict[int, str]:
    return {cell.axes["seed"]: cell.cell_id for cell in expand(load_spec(spec_path))}


def epoch_lines(output: str, cell_id: str) -> list[int]:
    """Epochs in the driver's progress lines for a cell, in the order they were reported."""
    return [int(e) for e in re.findall(rf"cell {cell_id} epoch (\d+)/", output)]


def registered(cell_dir: Path) -> tuple[int, str]:
    """(epoch, folder name) of the latest checkpoint Ray Train has registered for the cell."""
    snapshot = json.loads((cell_dir / "checkpoint_manager_snapshot.json").read_text())
    latest = snapshot["latest_checkpoint_result"]
    return int(latest["metrics"]["epoch"]), str(latest["checkpoint_dir_name"])


def keep(capfd: pytest.CaptureFixture[str]) -> Any:
    captured = capfd.readouterr()
    OUTPUTS.extend([captured.out, captured.err])
    return captured


@pytest.fixture(autouse=True)
def _remember_run_dir(tmp_path: Path) -> None:
    RUN_DIRS.append(tmp_path)


# --- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def once_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def proxy(s3_server: str) -> Iterator[OutageProxy]:
    """The module's S3 endpoint: moto behind the outage proxy, in the environment Ray's workers inherit."""
    upstream = urlparse(s3_server)
    assert upstream.hostname and upstream.port
    relay = OutageProxy((upstream.hostname, upstream.port), outage_s=OUTAGE_S).start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", relay.endpoint)
        try:
            yield relay
        finally:
            relay.close()


@pytest.fixture(scope="module")
def ray_faults(proxy: OutageProxy, once_files: Path) -> Iterator[None]:
    import ray

    faults = [
        {
            "seed": SIGKILL_SEED,
            "epoch": SIGKILL_EPOCH,
            "kind": "sigkill",
            "rank": 1,
            "once_file": str(once_files / "sigkill"),
        },
        {"seed": NAN_SEED, "epoch": 1, "kind": "nan"},
        {"seed": CORRUPT_SEED, "epoch": CORRUPT_FAILS_AT, "kind": "raise", "once_file": str(once_files / "raise")},
    ]
    # address="local": a new instance, never someone else's `ray start` cluster.
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {FAULT_ENV: json.dumps(faults), "OMP_NUM_THREADS": "1"}},
    )
    try:
        yield
    finally:
        ray.shutdown()


# --- the matrix --------------------------------------------------------------------------------------------


def test_sigkill_of_one_train_worker_mid_epoch_resumes_from_the_last_checkpoint(
    ray_faults: None, once_files: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    epochs = SIGKILL_EPOCH + 1
    spec = write_spec(
        tmp_path,
        spec_dict("sigkill", [SIGKILL_SEED], epochs=epochs, max_failures=2, resources={"max_workers_per_cell": 2}),
    )
    (cell,) = cell_ids_by_seed(spec).values()
    assert expand(load_spec(spec))[0].num_workers == 2  # DDP over two workers: one of them is killed

    code = sweep.main([str(spec), "--storage", str(tmp_path / "runs")])
    out = keep(capfd).out

    assert (once_files / "sigkill").exists(), "the SIGKILL never fired"
    assert code == sweep.EXIT_OK, out[-3000:]
    result = json.loads((tmp_path / "runs" / "sigkill" / "cells" / cell / "result.json").read_text())
    assert result["status"] == "finished" and result["epochs"] == epochs
    # Killed during epoch 3: the restarted group resumed from a checkpoint of epoch 1 or 2 (the newest one Ray
    # Train had registered), not from scratch.
    resumed = result["resumed_from_epoch"]
    assert 1 <= resumed < SIGKILL_EPOCH, result
    # Metrics continue: every epoch is reported, the ones before the resume point exactly once.
    seen = epoch_lines(out, cell)
    assert set(seen) == set(range(1, epochs + 1)), seen
    assert all(seen.count(e) == 1 for e in range(1, resumed + 1)), seen
    assert seen[-1] == epochs
    assert result["train_seconds"] > 0 and result["branches"]["main"]["acc_clean"] > 0.1


def test_non_finite_loss_fails_that_cell_and_the_others_finish(
    ray_faults: None, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path, spec_dict("nan", [0, NAN_SEED], epochs=1, max_failures=0))
    cells = cell_ids_by_seed(spec)

    code = sweep.main([str(spec), "--storage", str(tmp_path / "runs")])
    err = keep(capfd).err

    assert code == sweep.EXIT_FAILED
    folder = tmp_path / "runs" / "nan"
    error = json.loads((folder / "cells" / cells[NAN_SEED] / "error.json").read_text())
    assert "non-finite loss" in error["error"], error
    assert json.loads((folder / "cells" / cells[0] / "result.json").read_text())["status"] == "finished"
    rows = {r["cell_id"]: r for r in pq.read_table(folder / "results.parquet").to_pylist()}
    assert rows[cells[0]]["status"] == "finished" and rows[cells[NAN_SEED]]["status"] == "failed"
    listed = [line for line in err.splitlines() if line.startswith(f"FAILED cell {cells[NAN_SEED]}")]
    assert listed and "non-finite loss" in listed[0], err[-3000:]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(
    ray_faults: None, once_files: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    epochs = CORRUPT_FAILS_AT + 1
    spec = write_spec(tmp_path, spec_dict("corrupt", [CORRUPT_SEED], epochs=epochs, max_failures=0))
    (cell,) = cell_ids_by_seed(spec).values()
    storage = str(tmp_path / "runs")
    cell_dir = tmp_path / "runs" / "corrupt" / "cells" / cell

    # First run: dies in epoch 3 (max_failures 0), leaving the checkpoints of epochs 1 and 2.
    assert sweep.main([str(spec), "--storage", storage]) == sweep.EXIT_FAILED
    assert (once_files / "raise").exists()
    latest_epoch, latest_dir = registered(cell_dir)
    assert latest_epoch == CORRUPT_FAILS_AT - 1, (latest_epoch, latest_dir)
    state = cell_dir / latest_dir / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a torn write
    keep(capfd)

    assert sweep.main([str(spec), "--storage", storage]) == sweep.EXIT_OK
    out = keep(capfd).out

    result = json.loads((cell_dir / "result.json").read_text())
    assert result["status"] == "finished" and result["epochs"] == epochs
    assert result["resumed_from_epoch"] == latest_epoch - 1, result  # the previous checkpoint, not scratch
    assert re.search(rf"warning: checkpoint \S*{latest_dir} is unreadable", out), out[-3000:]


def test_s3_outage_mid_checkpoint_is_retried_and_loses_nothing(
    ray_faults: None,
    proxy: OutageProxy,
    s3_server: str,
    s3_bucket: str,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    import boto3

    epochs = 3
    spec = write_spec(tmp_path, spec_dict("outage", [OUTAGE_SEED], epochs=epochs, max_failures=0))
    (cell,) = cell_ids_by_seed(spec).values()
    bucket = s3_bucket.removeprefix("s3://")
    # Down for OUTAGE_S seconds from the moment the second checkpoint's state.pt starts to upload.
    proxy.arm(rb"/cells/" + cell.encode() + rb"/checkpoint_[^/]*/state\.pt$", nth=2)

    code = sweep.main([str(spec), "--storage", f"{s3_bucket}/study"])
    out = keep(capfd).out

    assert len(proxy.outages) == 1, "the outage never started: no second checkpoint upload was seen"
    outage = proxy.outages[0]
    assert outage.ended is not None and outage.ended - outage.started >= OUTAGE_S
    assert code == sweep.EXIT_OK
    retried = proxy.requests_after(outage.ended, outage.key)
    assert {"PUT", "POST"} & set(retried), f"{outage.key} was not uploaded again after the outage: {retried}"
    assert re.search(r"storage: unreachable for \d+ s \(upload checkpoint checkpoint_\S+: OSError", out), out[-3000:]

    client = boto3.client("s3", endpoint_url=s3_server)  # straight to moto, around the proxy
    prefix = f"study/outage/cells/{cell}/"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    states = sorted(k for k in keys if k.endswith("/state.pt"))
    assert f"/{bucket}/{states[1]}" == outage.key  # the interrupted checkpoint is there, whole
    loaded = [
        torch.load(io.BytesIO(client.get_object(Bucket=bucket, Key=k)["Body"].read()), weights_only=False)
        for k in states
    ]
    assert [s["epoch"] for s in loaded] == list(range(1, epochs + 1))
    result = json.loads(client.get_object(Bucket=bucket, Key=prefix + "result.json")["Body"].read())
    assert result["status"] == "finished" and result["epochs"] == epochs and result["resumed_from_epoch"] == 0


def test_impossible_resource_request_is_reported_unschedulable_not_left_pending(
    ray_faults: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # The driver is told an autoscaler can bring a GPU (so the spec is admitted), but no GPU node ever comes.
    monkeypatch.setenv("SWEEP_AUTOSCALER_MAX_GPUS", "1")
    timeout = 15.0
    resources = {
        "use_gpu": True,
        "gpus_per_worker": 1,
        "cluster_gpus": 1,
        "gpus_per_node": 1,
        "placement_timeout_s": timeout,
    }
    spec = write_spec(tmp_path, spec_dict("unplaceable", [0], epochs=1, max_failures=1, resources=resources))
    (cell,) = cell_ids_by_seed(spec).values()

    started = time.monotonic()
    code = sweep.main([str(spec), "--storage", str(tmp_path / "runs")])
    elapsed = time.monotonic() - started
    captured = keep(capfd)

    assert code == sweep.EXIT_FAILED
    assert elapsed < 60, f"took {elapsed:.0f} s to give up on an unplaceable cell"
    assert re.search(rf"cell {cell} UNSCHEDULABLE: needs 1 worker\(s\) of \{{0.5 CPU, 1 GPU\}}", captured.out), (
        captured.out[-3000:]
    )
    error = json.loads((tmp_path / "runs" / "unplaceable" / "cells" / cell / "error.json").read_text())
    assert error["error"].startswith("unschedulable: needs 1 worker(s)"), error
    _, _, statuses, _ = cell_statuses(str(tmp_path / "runs" / "unplaceable"))
    assert [(s.state, s.error.split(":")[0]) for s in statuses] == [("failed", "unschedulable")]
    assert not (tmp_path / "runs" / "unplaceable" / "cells" / cell / "unschedulable.json").exists()


def test_nothing_the_runs_wrote_or_printed_holds_the_test_credentials(
    ray_faults: None,
    s3_bucket: str,
    s3_server: str,
    once_files: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Every byte this module's sweeps printed or stored, locally or in S3, and every file in the Ray session's log
    folder (driver, raylet, GCS, Train controller and worker logs). It runs a sweep of its own first, to S3, with a
    cell that fails (the error path writes error.json and prints the error), so it holds whatever order or
    selection of tests ran before it; run last, as it is in the module, it also covers the matrix above."""
    import boto3
    import ray

    spec = write_spec(tmp_path, spec_dict("leak", [0, NAN_SEED], epochs=1, max_failures=0))
    assert sweep.main([str(spec), "--storage", f"{s3_bucket}/leak"]) == sweep.EXIT_FAILED
    own = keep(capfd)
    assert "non-finite loss" in own.err and "results: s3://" in own.out  # the sweep really printed its paths

    secrets = [S3_ACCESS_KEY_ID.encode(), S3_SECRET_ACCESS_KEY.encode()]
    printed = "\n".join(OUTPUTS).encode()
    leaks = [f"printed output at {printed.find(s)}" for s in secrets if s in printed]

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    # This module's folders only: other modules' folders hold copies of the test suite itself (test_e2e_job
    # packs the repository), whose conftest.py names the test credentials.
    local = [p for folder in [*RUN_DIRS, once_files] for p in folder.rglob("*") if p.is_file()]
    logs = [p for p in (session / "logs").rglob("*") if p.is_file()]
    assert len(logs) > 10 and any(p.name.startswith("worker-") for p in logs), logs
    for path in local + logs:
        body = path.read_bytes()
        leaks += [str(path) for s in secrets if s in body]

    client = boto3.client("s3", endpoint_url=s3_server)
    stored = 0
    for bucket in client.list_buckets()["Buckets"]:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
            for obj in page.get("Contents", []):
                body = client.get_object(Bucket=bucket["Name"], Key=obj["Key"])["Body"].read()
                stored += 1
                leaks += [f"s3://{bucket['Name']}/{obj['Key']}" for s in secrets if s in body]
    assert stored > 10 and len(local) > 10
    assert not leaks, leaks
