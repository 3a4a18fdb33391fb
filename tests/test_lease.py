"""One driver per sweep (orchestrator.lease): refuse a live holder, take over a dead or expired one."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator.lease import LEASE_FILE, DriverLease, LeaseHeldError
from orchestrator.storage import SweepStorage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def storage(tmp_path: Path) -> SweepStorage:
    return SweepStorage.for_sweep(str(tmp_path), "study")


def test_second_driver_refuses_while_the_first_holds_the_lease(storage: SweepStorage) -> None:
    first = DriverLease(storage, ttl_s=1.5)  # renews every 0.5 s: the second driver sees it renewed at once
    first.acquire()
    try:
        with pytest.raises(LeaseHeldError, match="another driver is running this sweep"):
            DriverLease(storage).acquire()
    finally:
        first.release()
    second = DriverLease(storage)
    second.acquire()  # released: free to take
    second.release()
    assert storage.read_json(storage.path(LEASE_FILE)) is None


def test_a_killed_driver_on_this_host_is_taken_over_at_once(storage: SweepStorage) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {"owner": "someone", "host": os.uname().nodename, "pid": dead.pid, "expires_at": time.time() + 600}
    storage.write_json(storage.path(LEASE_FILE), record)
    lease = DriverLease(storage)
    lease.acquire()
    assert storage.read_json(storage.path(LEASE_FILE))["owner"] == lease.owner
    lease.release()


def test_a_renewing_holder_on_another_host_is_refused_and_needs_takeover(storage: SweepStorage) -> None:
    stop = threading.Event()

    def remote_driver() -> None:  # a live driver elsewhere: renews its lease every 0.3 s, each valid 10 s
        while not stop.is_set():
            record = {"owner": "remote", "host": "some-other-node", "pid": 1, "expires_at": time.time() + 10.0}
            storage.write_json(storage.path(LEASE_FILE), record | {"ttl_s": 10.0})
            stop.wait(0.3)

    renewer = threading.Thread(target=remote_driver)
    renewer.start()
    try:
        while storage.read_json(storage.path(LEASE_FILE)) is None:  # the remote driver holds the lease first
            time.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(LeaseHeldError, match="renews its lease.*--takeover"):
            DriverLease(storage, poll_s=0.1).acquire()
        assert time.monotonic() - started < 10  # refused at the first renewal seen, not after the lease's 10 s
    finally:
        stop.set()
        renewer.join()
    forced = DriverLease(storage)
    forced.acquire(takeover=True)
    forced.release()


def test_a_silent_holder_is_waited_out_not_refused(storage: SweepStorage) -> None:
    """A resubmitted driver (another pod after a head restart) meets the dead driver's lease, still unexpired:
    it waits until the lease expires, saying why and for how long, then runs."""
    ttl = 3.0
    record = {"owner": "dead", "host": "old-head-pod", "pid": 4242, "expires_at": time.time() + ttl, "ttl_s": ttl}
    storage.write_json(storage.path(LEASE_FILE), record)
    said: list[str] = []
    lease = DriverLease(storage, poll_s=0.1)
    lease.acquire(log=said.append)
    try:
        assert time.time() >= record["expires_at"]
        assert storage.read_json(storage.path(LEASE_FILE))["owner"] == lease.owner
        assert any("has not renewed its lease" in line and "waiting" in line for line in said), said
    finally:
        lease.release()
    expired = DriverLease(storage)
    storage.write_json(storage.path(LEASE_FILE), record | {"expires_at": time.time() - 1})
    expired.acquire()  # an expired lease is taken at once
    expired.release()


def test_heartbeat_renews_and_notices_a_takeover(storage: SweepStorage) -> None:
    lease = DriverLease(storage, ttl_s=0.6)
    lease.acquire()
    first_expiry = storage.read_json(storage.path(LEASE_FILE))["expires_at"]
    deadline = time.time() + 10
    while storage.read_json(storage.path(LEASE_FILE))["expires_at"] <= first_expiry:
        assert time.time() < deadline, "lease was never renewed"
        time.sleep(0.05)
    thief = DriverLease(storage)
    thief.acquire(takeover=True)
    assert lease.lost.wait(10), "the first driver never noticed it lost the lease"
    lease.release()  # must not delete the thief's lease
    assert storage.read_json(storage.path(LEASE_FILE))["owner"] == thief.owner
    thief.release()


def test_cli_refuses_a_second_driver_with_exit_2(tmp_path: Path) -> None:
    spec = (ROOT / "sweeps" / "tiny.yaml").read_text()
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(spec)
    storage = SweepStorage.for_sweep(str(tmp_path / "runs"), "tiny")
    holder = DriverLease(storage, ttl_s=3.0)  # renews every second, so the second driver sees it alive
    holder.acquire()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "orchestrator.sweep", str(spec_file), "--storage", str(tmp_path / "runs")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        holder.release()
    assert run.returncode == 2, run.stderr
    assert "another driver is running this sweep" in run.stderr
    assert "Traceback" not in run.stderr
    assert "Started a local Ray instance" not in run.stdout + run.stderr  # refused before touching Ray
    assert not (tmp_path / "runs" / "tiny" / "cells").exists()
    assert storage.cell_records() == {}
