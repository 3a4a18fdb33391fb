"""SIGKILL the sweep driver mid-sweep, run it again: the interrupted cells resume from their checkpoints.

The driver runs as `python -m orchestrator.sweep` in its own session (process group), with RAY_ADDRESS=local so
that it always starts its own Ray instance, never someone else's `ray start` cluster. Ray's GCS and raylet share
the driver's fate (PR_SET_PDEATHSIG) and its workers follow the raylet: the test checks that every process of the
killed driver's tree is gone before the re-run (and kills any straggler by pid, never by name).

What Ray Train V2 does on the re-run: `fit()` with the same run name (the cell id) and storage path finds the run's
`checkpoint_manager_snapshot.json` and hands the latest *registered* checkpoint to the workers. A checkpoint folder
uploaded but not yet registered when the driver died is not resumed from; that costs at most one interval.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.grid import expand
from orchestrator.spec import load_spec
from tests.conftest import tiny_spec, write_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4
CHECKPOINT_EVERY = 1
# Kill once a cell has this epoch's checkpoint registered: past the first, so that resuming from the *latest*
# checkpoint differs from resuming from any checkpoint.
KILL_AT_EPOCH = 2

SPEC = tiny_spec(
    "killed",
    {"clean_ratio": [0.0, 1.0]},
    workload={"recipe": {"epochs": EPOCHS}},
    checkpoint_every=CHECKPOINT_EVERY,
    keep_checkpoints=2,
)


def driver(spec: Path, storage: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, RAY_ADDRESS="local", OMP_NUM_THREADS="1")
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator.sweep", str(spec), "--storage", str(storage)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killpg reaches the driver and what it started
        )


def registered_epoch(cell_dir: Path) -> int:
    """Epoch of the latest checkpoint Ray Train has registered for the cell (0: none)."""
    try:
        snapshot = json.loads((cell_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or caught mid-write
        return 0
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int(latest.get("metrics", {}).get("epoch", 0))


def epochs_on_disk(cell_dir: Path) -> list[int]:
    """Epochs of the readable checkpoints in the cell's folder, registered or not."""
    epochs = []
    for state in cell_dir.glob("checkpoint_*/state.pt"):
        try:
            epochs.append(int(torch.load(state, map_location="cpu", weights_only=False)["epoch"]))
        except Exception:  # cut short by the kill: nothing anyone could resume from
            continue
    return sorted(epochs)


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = {int(k) for k in children.read_text().split()}
            except OSError:
                continue
            todo.extend(kids - found)
            found |= kids
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"


@pytest.mark.timeout(900)
def test_killed_driver_resumes_cells_from_their_checkpoints(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, SPEC)
    storage = tmp_path / "runs"
    cells_dir = storage / "killed" / "cells"
    cell_ids = [cell.cell_id for cell in expand(load_spec(spec))]

    first_log = tmp_path / "first.log"
    first = driver(spec, storage, first_log)
    try:
        # Wait until some cell has a registered checkpoint (epoch KILL_AT_EPOCH or later) but no result.
        deadline = time.monotonic() + 420
        interrupted: list[str] = []
        while not interrupted:
            assert first.poll() is None, f"the driver ended before it could be killed:\n{tail(first_log)}"
            assert time.monotonic() < deadline, f"no cell checkpointed within the deadline:\n{tail(first_log)}"
            interrupted = [
                c
                for c in cell_ids
                if registered_epoch(cells_dir / c) >= KILL_AT_EPOCH and not (cells_dir / c / "result.json").exists()
            ]
            time.sleep(0.5)
        tree = descendants(first.pid)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)  # reaped: the sweep's lease names a pid that is really gone
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=60)

    # The killed driver's Ray processes go with it; wait for them, then make sure (by pid) before the re-run.
    deadline = time.monotonic() + 60
    while any(alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.5)
    stragglers = [p for p in tree if alive(p)]
    for pid in stragglers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not stragglers, f"processes of the killed driver outlived it by 60 s: {stragglers}"

    finished_before = {c for c in cell_ids if (cells_dir / c / "result.json").exists()}
    registered = {c: registered_epoch(cells_dir / c) for c in cell_ids}
    on_disk = {c: epochs_on_disk(cells_dir / c) for c in cell_ids}
    assert set(interrupted) <= set(cell_ids) - finished_before

    second_log = tmp_path / "second.log"
    second = driver(spec, storage, second_log)
    try:
        code = second.wait(timeout=600)
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait(timeout=60)
    assert code == 0, tail(second_log)
    assert f"{len(finished_before)} already finished" in second_log.read_text(), tail(second_log)

    results = {c: json.loads((cells_dir / c / "result.json").read_text()) for c in cell_ids}
    summary = {c: (registered[c], on_disk[c], results[c]["resumed_from_epoch"]) for c in cell_ids}
    print(f"cell: (registered epoch at kill, checkpoint epochs on disk, resumed_from_epoch): {summary}")
    for c in cell_ids:
        assert results[c]["status"] == "finished" and results[c]["epochs"] == EPOCHS, results[c]
        if c in finished_before:
            continue
        resumed = results[c]["resumed_from_epoch"]
        # Exactly where Ray Train had got to: its latest registered checkpoint ...
        assert resumed >= registered[c], f"cell {c} restarted behind its registered checkpoint: {summary}"
        # ... so no cell retrains more than one checkpoint interval of what was on disk when the driver died.
        newest = max(on_disk[c], default=0)
        assert resumed >= newest - CHECKPOINT_EVERY, f"cell {c} retrained more than one interval: {summary}"
    for c in interrupted:
        assert results[c]["resumed_from_epoch"] >= KILL_AT_EPOCH, f"interrupted cell {c} went back: {summary}"

    rows = pq.read_table(storage / "killed" / "results.parquet").to_pylist()
    keys = [(r["cell_id"], r["branch"]) for r in rows]
    assert len(keys) == len(set(keys)), f"duplicate rows: {keys}"
    assert sorted(keys) == sorted((c, "main") for c in cell_ids)
    assert all(r["status"] == "finished" and r["epochs"] == EPOCHS for r in rows), rows
