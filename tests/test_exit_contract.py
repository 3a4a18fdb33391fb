"""The driver's exit status and retry contract (README "Exit status and retries"): what a retry cannot change
exits 2 and stops the driver's own Ray job (so KubeRay does not recreate the cluster to fail again); cells that
failed on their own exit 1 and stop it too; storage that stayed unreachable exits 3 and leaves the job to be
retried. The Ray job API is replaced by a recorder here (there is no Ray job to stop in a unit test)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator import ray_job, sweep
from orchestrator.grid import expand
from orchestrator.lease import LEASE_FILE
from orchestrator.spec import load_spec
from orchestrator.storage import ERROR_FILE, SweepStorage
from tests.conftest import tiny_spec, write_spec


@pytest.fixture
def stopped(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(ray_job, "stop_this_ray_job", lambda why="": calls.append(why) or True)
    return calls


def test_a_sweep_another_live_driver_runs_exits_2_and_stops_the_job(tmp_path: Path, stopped: list[str]) -> None:
    spec_path = write_spec(tmp_path, tiny_spec("held", {"seed": [0]}, storage=str(tmp_path / "runs")))
    storage = SweepStorage.for_sweep(str(tmp_path / "runs"), "held")
    stop = threading.Event()

    def live_driver() -> None:  # renews its lease every 0.5 s from another host (each renewal valid 10 s)
        while not stop.is_set():
            lease = {"owner": "x", "host": "other-node", "pid": 7, "expires_at": time.time() + 10, "ttl_s": 10}
            storage.write_json(storage.path(LEASE_FILE), lease)
            stop.wait(0.5)

    holder = threading.Thread(target=live_driver)
    holder.start()
    try:
        while storage.read_json(storage.path(LEASE_FILE)) is None:  # the live driver holds the lease first
            time.sleep(0.05)
        assert sweep.main([str(spec_path)]) == sweep.EXIT_INVALID
    finally:
        stop.set()
        holder.join()
    assert stopped == ["a sweep another live driver runs"]


def test_unreachable_storage_exits_3_and_leaves_the_job_to_be_retried(
    tmp_path: Path, stopped: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for variable, value in {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",  # nothing listens: connection refused, as in an outage
        "AWS_ACCESS_KEY_ID": "outage-test",
        "AWS_SECRET_ACCESS_KEY": "outage-test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    spec = tiny_spec("gone", {"seed": [0]}, storage="s3://bucket/sweeps", storage_outage_tolerance_s=2)
    spec_path = write_spec(tmp_path, spec)
    assert sweep.main([str(spec_path)]) == sweep.EXIT_RETRY
    err = capsys.readouterr().err
    assert "stayed unreachable" in err and "submitting again resumes" in err and "Traceback" not in err
    assert stopped == []


def test_cells_that_failed_on_their_own_exit_1_and_stop_the_job(
    tmp_path: Path, stopped: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # How a cell fails is the fault matrix's business (tests/test_faults_ray.py); here the cells' trials are
    # replaced by one that records a failure of the cell's own, and only the driver's reaction is checked.
    def failing_cells(spec: Any, storage: SweepStorage, todo: list[Any], *args: Any, **kwargs: Any) -> None:
        for cell in todo:
            record = {"cell_id": cell.cell_id, "axes": cell.axes, "status": "failed", "error": "loss is NaN"}
            storage.write_json(storage.cell_path(cell.cell_id, ERROR_FILE), record)

    monkeypatch.setattr(sweep, "_run_cells", failing_cells)
    spec_path = write_spec(tmp_path, tiny_spec("nan", {"seed": [0]}, storage=str(tmp_path / "runs")))
    assert len(expand(load_spec(spec_path))) == 1
    assert sweep.main([str(spec_path)]) == sweep.EXIT_FAILED
    assert stopped == ["a sweep whose cells failed on their own"]


def test_an_outage_is_ridden_out_and_said_once_a_minute_not_every_retry(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import workloads.fs

    monkeypatch.setattr(workloads.fs, "RETRY_LOG_INTERVAL_S", 0.5)  # "a minute", compressed
    monkeypatch.setattr(workloads.fs.random, "uniform", lambda low, high: 0.05)  # short, fixed backoff sleeps
    monkeypatch.setenv(workloads.fs.OUTAGE_TOLERANCE_ENV, "30")
    attempts: list[float] = []
    outage_ends = time.monotonic() + 1.6

    def read() -> str:
        attempts.append(time.monotonic())
        if time.monotonic() < outage_ends:
            raise ConnectionError("store down")
        return "data"

    assert workloads.fs.with_retries(read, "read x") == "data"
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if line.startswith("storage: unreachable")]
    assert len(attempts) > 10 and 2 <= len(said) <= 5, (len(attempts), said)
    assert "storage: reachable again after" in out
    monkeypatch.setenv(workloads.fs.OUTAGE_TOLERANCE_ENV, "0.3")  # beyond the tolerance the error propagates
    with pytest.raises(ConnectionError):
        workloads.fs.with_retries(lambda: (_ for _ in ()).throw(ConnectionError("down")), "read y")


def test_an_outage_sets_the_storage_gauge_while_it_lasts_and_zero_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dashboard's "Storage unreachable" panel charts this gauge. Ray's metrics agent is not started here: a
    stand-in gauge records what `with_retries` sets, in a process that says Ray is initialized."""
    import sys
    from types import SimpleNamespace

    import workloads.fs

    values: list[float] = []
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: True))
    monkeypatch.setattr(workloads.fs, "_gauge", [SimpleNamespace(set=values.append)])
    monkeypatch.setattr(workloads.fs.random, "uniform", lambda low, high: 0.05)
    monkeypatch.setenv(workloads.fs.OUTAGE_TOLERANCE_ENV, "30")
    outage_ends = time.monotonic() + 0.5

    def read() -> str:
        if time.monotonic() < outage_ends:
            raise ConnectionError("store down")
        return "data"

    assert workloads.fs.with_retries(read, "read x") == "data"
    assert len(values) >= 3 and values[-1] == 0.0, values
    rising = values[:-1]
    assert rising == sorted(rising) and 0.3 <= rising[-1] < 5, values
    values.clear()
    assert workloads.fs.with_retries(lambda: "data", "read y") == "data"
    assert values == []  # no outage, no gauge traffic
