"""Where a training run reports to and checkpoints to: Ray Train (one per worker), or a local folder.

The training loop (workloads.train) talks to a `Session` only: `latest_state()` once at the start, `report()` once
per epoch on every rank. A run resumes from the newest checkpoint that reads back, so a crash during a checkpoint
write costs one checkpoint interval, not the run.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

from workloads.config import fork_point_file
from workloads.fs import open_fs, process_exists, with_retries, write_atomic

STATE_FILE = "state.pt"
# Rank 0's local checkpoint folders: PREFIX + the worker's process id + "-" + a random suffix (see RaySession).
CHECKPOINT_SCRATCH_PREFIX = "sweep-checkpoint-"


class Session:
    """Where a run reports to and checkpoints to: Ray Train, or a local folder for the single-process entry."""

    rank = 0
    world_size = 1

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def latest_state(self) -> dict[str, Any] | None:
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        """Called by every rank (Ray's report is a barrier); `state` is saved as a checkpoint when given."""
        raise NotImplementedError


class LocalSession(Session):
    """Single process, checkpoints as `<out>/checkpoint_<epoch>/state.pt`, metrics appended to metrics.jsonl."""

    def __init__(self, out_dir: Path, use_gpu: bool = False) -> None:
        self.out_dir = out_dir
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.history: list[dict[str, Any]] = []

    @property
    def device(self) -> torch.device:
        return self._device

    def latest_state(self) -> dict[str, Any] | None:
        saved = sorted(self.out_dir.glob("checkpoint_*/" + STATE_FILE), key=lambda p: int(p.parent.name[11:]))
        return _first_readable((str(p.parent), partial(load_state, p)) for p in reversed(saved))

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        self.history.append(metrics)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if state is not None:
            folder = self.out_dir / f"checkpoint_{state['epoch']:06d}"
            folder.mkdir(exist_ok=True)
            tmp = folder / (STATE_FILE + ".tmp")
            torch.save(state, tmp)
            tmp.replace(folder / STATE_FILE)  # publish atomically: a crash leaves the old or the new state


class RaySession(Session):
    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        # Fake GPUs (scheduling tests, docs/design.md section 6) get GPU ids but no CUDA: train on the CPU there.
        self._device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
        for folder in remove_orphaned_checkpoint_folders():
            print(f"removed {folder}, a checkpoint folder left by a worker that died before uploading it")

    @property
    def device(self) -> torch.device:
        return self._device

    def latest_state(self) -> dict[str, Any] | None:
        latest = self._train.get_checkpoint()
        if latest is None:
            return None
        return _first_readable((c.path, partial(self._load, c)) for c in self._newest_first(latest))

    def _newest_first(self, latest: Any) -> list[Any]:
        """The latest checkpoint, then its older siblings in the run folder (names sort by creation time)."""
        import pyarrow.fs

        parent = latest.path.rstrip("/").rsplit("/", 1)[0]
        try:
            infos = with_retries(
                lambda: latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent)), f"list {parent}"
            )
        except OSError:
            return [latest]
        older = sorted(
            (
                i.path
                for i in infos
                if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_")
            ),
            reverse=True,
        )
        return [latest] + [
            self._train.Checkpoint(path, filesystem=latest.filesystem) for path in older if path != latest.path
        ]

    @staticmethod
    def _load(checkpoint: Any) -> dict[str, Any]:
        # A store that is down is retried here, so that only a checkpoint that really is unreadable (truncated,
        # corrupt) sends `_first_readable` on to an older one.
        def download() -> dict[str, Any]:
            with checkpoint.as_directory() as folder:
                return load_state(Path(folder) / STATE_FILE)

        return with_retries(download, f"read checkpoint {checkpoint.path}")

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        if state is None or self.rank != 0:
            self._train.report(metrics)
            return
        # Training waits only for the local write of the state; the upload runs in Ray Train's upload thread
        # (ASYNC), in report order, and the worker waits for pending uploads before it finishes. A worker lost
        # mid-upload loses that checkpoint only: the previous one is complete in storage (each object is one
        # PUT, or a multipart upload that becomes visible only when completed).
        folder = tempfile.mkdtemp(prefix=f"{CHECKPOINT_SCRATCH_PREFIX}{os.getpid()}-")
        torch.save(state, Path(folder) / STATE_FILE)
        self._train.report(
            metrics,
            checkpoint=self._train.Checkpoint.from_directory(folder),
            checkpoint_upload_mode=self._train.CheckpointUploadMode.ASYNC,
            delete_local_checkpoint_after_upload=True,
            checkpoint_upload_fn=self._upload,
        )

    def _upload(self, checkpoint: Any, name: str) -> Any:
        """Ray Train's checkpoint_upload_fn: `upload_checkpoint` to this run's storage, read from the Train
        context."""
        storage = self._train.get_context().get_storage()
        destination = storage.build_checkpoint_path_from_name(name)
        upload_checkpoint(checkpoint.path, checkpoint.filesystem, destination, storage.storage_filesystem, name)
        return self._train.Checkpoint(destination, filesystem=storage.storage_filesystem)


def upload_checkpoint(source: str, source_filesystem: Any, destination: str, target: Any, name: str) -> None:
    """Copy a checkpoint folder to storage, riding out a storage outage of up to `fs.retry_deadline()` (Ray
    Train's own upload gives up after 3 quick attempts). Re-copying after a partial failure is safe: the
    destination is new and each file is overwritten whole."""
    import pyarrow.fs

    def copy() -> None:
        target.create_dir(destination)
        pyarrow.fs.copy_files(source, destination, source_filesystem=source_filesystem, destination_filesystem=target)

    with_retries(copy, f"upload checkpoint {name}")


def remove_orphaned_checkpoint_folders(root: str | None = None) -> list[Path]:
    """Delete the local checkpoint folders of workers that died before their upload finished; return them.

    Ray Train deletes rank 0's local checkpoint folder after uploading it, but a worker killed in between (a
    SIGKILL, the OOM killer, a fault test) leaves it in the node's temp directory: a whole training state each
    time (~200 MB for ResNet-50), on a node whose workers may be lost and restarted many times in a long sweep.
    Every new worker removes the folders of processes that no longer exist on its machine; a live worker's
    folder (its upload may still be pending) is left alone.
    """
    removed: list[Path] = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{CHECKPOINT_SCRATCH_PREFIX}*"):
        pid = folder.name.removeprefix(CHECKPOINT_SCRATCH_PREFIX).split("-", 1)[0]
        if not folder.is_dir() or not pid.isdigit() or process_exists(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def save_fork_point(folder: str, state: dict[str, Any]) -> str:
    """Save a training state as a fork point in storage folder `folder` (any storage URL): `epoch_<k>.pt`, then its
    marker `epoch_<k>.json`, so that a marker means a complete state. Apart from the Ray Train checkpoints, which
    `keep_checkpoints` rotates away. Rides out storage outages like a checkpoint upload. Returns the state's URL."""
    epoch = int(state["epoch"])
    buffer = io.BytesIO()
    torch.save(state, buffer)
    target = fork_point_file(folder, epoch)
    _write_to_storage(target, buffer.getvalue())
    marker = {"epoch": epoch, "saved_at": time.time()}
    _write_to_storage(fork_point_file(folder, epoch, ".json"), json.dumps(marker).encode())
    return target


def load_fork_point(url: str) -> dict[str, Any]:
    """The training state a fork point holds (`save_fork_point`), read from storage."""

    def read() -> bytes:
        fs, path = open_fs(url)
        with fs.open(path, "rb") as f:
            return bytes(f.read())

    payload = with_retries(read, f"read fork point {url}")
    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "epoch" not in state:
        raise ValueError(f"{url} is not a training state")
    return state


def _write_to_storage(url: str, payload: bytes) -> None:
    def write() -> None:
        fs, path = open_fs(url)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        write_atomic(fs, path, payload)

    with_retries(write, f"write {url}")


def load_state(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "epoch" not in state:
        raise ValueError(f"{path} is not a training state")
    return state


def _first_readable(candidates: Iterator[tuple[str, Callable[[], dict[str, Any]]]]) -> dict[str, Any] | None:
    """Load the newest checkpoint that reads back; a truncated or corrupt one is skipped with a warning, so a
    crash during a checkpoint write costs one checkpoint interval, not the run."""
    for where, load in candidates:
        try:
            return load()
        except Exception as err:
            print(f"warning: checkpoint {where} is unreadable ({type(err).__name__}: {err}); trying an older one")
    return None
