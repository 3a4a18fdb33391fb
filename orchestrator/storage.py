"""The sweep's storage layout on any fsspec URL (docs/design.md section 4):

    <storage>/<name>/spec.yaml                      the spec as submitted (no secrets by construction)
    <storage>/<name>/cells/<cell_id>/config.json    the resolved TrainConfig and grid axes
    <storage>/<name>/cells/<cell_id>/checkpoint_*   Ray Train checkpoints (the Train run is named by the cell id)
    <storage>/<name>/cells/<cell_id>/result.json    written last and atomically: its presence means "finished"
    <storage>/<name>/cells/<cell_id>/error.json     the last failure, removed when the cell finishes
    <storage>/<name>/cells/<cell_id>/unschedulable.json  present while the cell's workers fit on no live node
    <storage>/<name>/cells/<cell_id>/history.json   per-epoch training metrics, rewritten by the driver every epoch
    <storage>/<name>/results.parquet, history.parquet, report/

A cell's state is derived from storage alone, so any driver (or `orchestrator.report`) can rebuild the picture.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import fsspec
import pyarrow.fs

from workloads.fs import S3Settings, open_fs, with_retries, write_atomic

# Where a relative local storage path resolves when the driver runs as a Ray job (docs: README "On a cluster").
STORAGE_ROOT_ENV = "SWEEP_STORAGE_ROOT"
DEFAULT_JOB_STORAGE_ROOT = "~/adversarial-sweep"

RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
UNSCHEDULABLE_FILE = "unschedulable.json"  # present while the cell's workers fit on no live node
CONFIG_FILE = "config.json"
TRAIN_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered
HISTORY_FILE = "history.json"  # the cell's per-epoch training metrics (orchestrator.progress writes it)


def ray_temp_dir_around(cwd: str) -> str | None:
    """Ray's temporary folder, when `cwd` is a job's unpacked working directory
    (`<temp dir>/session_*/runtime_resources/working_dir_files/_ray_pkg_*`), else None."""
    if "/runtime_resources/" not in cwd or "/session_" not in cwd:
        return None
    return cwd.split("/session_", 1)[0]


def resolve_storage_url(url: str, cwd: str | None = None, environ: dict[str, str] | None = None) -> tuple[str, str]:
    """The storage URL a driver should use for `url`, and a note saying why it differs ("" when it does not).

    `ray job submit --working-dir .` runs the driver inside a copy of the project that Ray unpacks into its
    temporary folder: a relative path like the specs' `./runs` would put the results there, out of the user's
    sight, lost to Ray's cleanup, and different after every cluster restart (so nothing would resume). Inside a
    job, a relative path therefore resolves under $SWEEP_STORAGE_ROOT (default ~/adversarial-sweep on the node
    running the driver), and an absolute path inside Ray's temporary folder is refused (ValueError).
    """
    cwd = cwd or os.getcwd()
    environ = dict(os.environ) if environ is None else environ
    if "://" in url and not url.startswith("file://"):
        return url, ""  # object storage: unaffected
    path = url.removeprefix("file://")
    ray_temp = ray_temp_dir_around(cwd)
    if ray_temp is None:
        return url, ""
    if not os.path.isabs(path):
        root = environ.get(STORAGE_ROOT_ENV, "").strip() or os.path.expanduser(DEFAULT_JOB_STORAGE_ROOT)
        if not os.path.isabs(root):
            raise ValueError(f"${STORAGE_ROOT_ENV} must be an absolute path, not {root!r}")
        resolved = os.path.normpath(os.path.join(root, path))
        return resolved, (
            f"the relative storage path {url!r} resolves under {root} (${STORAGE_ROOT_ENV}) because this driver "
            "runs in a Ray job's temporary working directory"
        )
    if os.path.normpath(path).startswith(ray_temp.rstrip("/") + "/"):
        raise ValueError(
            f"storage {url!r} lies in Ray's temporary folder {ray_temp}, which does not outlive the cluster; "
            "pass --storage with a lasting path or an s3:// URL"
        )
    return url, ""


@dataclass(frozen=True)
class SweepStorage:
    """The folder of one sweep: `<storage url>/<sweep name>`."""

    url: str

    @classmethod
    def for_sweep(cls, storage_url: str, name: str) -> SweepStorage:
        base = storage_url.rstrip("/")
        if "://" not in base:
            base = os.path.abspath(base)  # Ray workers change directory: resolve relative paths in the driver
        return cls(f"{base}/{name}")

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return open_fs(self.url)[0]

    @property
    def root(self) -> str:
        return open_fs(self.url)[1]

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def cell_path(self, cell_id: str, *parts: str) -> str:
        return self.path("cells", cell_id, *parts)

    def write_bytes_atomic(self, path: str, payload: bytes) -> None:
        """Write, then publish: readers see the old object or the new one, never a torn file."""

        def write() -> None:
            fs = self.fs
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            write_atomic(fs, path, payload)

        with_retries(write, f"write {path}")

    def write_json(self, path: str, value: Any) -> None:
        self.write_bytes_atomic(path, json.dumps(value, indent=2, sort_keys=True).encode())

    def read_json(self, path: str) -> Any | None:
        def read() -> Any | None:
            try:
                with self.fs.open(path, "rb") as f:
                    return json.loads(f.read())
            except FileNotFoundError:
                return None

        return with_retries(read, f"read {path}")

    def remove(self, path: str) -> None:
        def remove() -> None:
            fs = self.fs
            if fs.exists(path):
                fs.rm(path)

        with_retries(remove, f"remove {path}")

    def set_aside_cell(self, cell_id: str) -> None:
        """Empty a finished cell's folder so that it trains from scratch, keeping its old result.json as
        `superseded/<finished_at>.json` (Ray Train would otherwise resume from the old final checkpoint)."""
        record = self.read_json(self.cell_path(cell_id, RESULT_FILE))
        if record is not None:
            self.write_json(self.cell_path(cell_id, "superseded", f"{int(record.get('finished_at', 0))}.json"), record)

        def clear() -> None:
            fs = self.fs
            folder = self.cell_path(cell_id)
            for entry in fs.ls(folder, detail=False) if fs.exists(folder) else []:
                if entry.rstrip("/").rsplit("/", 1)[-1] != "superseded":
                    fs.rm(entry, recursive=True)

        with_retries(clear, f"clear cell {cell_id}")

    def prune_unregistered_checkpoints(self, cell_id: str) -> list[str]:
        """Remove the cell's `checkpoint_*` folders that Ray Train's checkpoint manager never registered; returns
        their names. A worker whose node, driver or cluster died after its upload finished but before Ray Train
        recorded it leaves such a folder behind: nothing will ever read it, and on a long study they add up. Only
        for a cell whose run has ended (its folder is no longer written to)."""
        snapshot = self.read_json(self.cell_path(cell_id, TRAIN_SNAPSHOT_FILE)) or {}
        kept = {r.get("checkpoint_dir_name") for r in snapshot.get("checkpoint_results") or []}
        latest = snapshot.get("latest_checkpoint_result") or {}
        kept.add(latest.get("checkpoint_dir_name"))

        def prune() -> list[str]:
            fs = self.fs
            folder = self.cell_path(cell_id)
            removed = []
            for entry in fs.ls(folder, detail=True) if fs.exists(folder) else []:
                name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
                if entry.get("type") == "directory" and name.startswith("checkpoint_") and name not in kept:
                    fs.rm(entry["name"], recursive=True)
                    removed.append(name)
            return removed

        return with_retries(prune, f"prune checkpoints of cell {cell_id}") if snapshot else []

    def cell_records(self) -> dict[str, dict[str, Any]]:
        """result.json (finished) or error.json (failed) of every cell that has one, keyed by cell id."""
        fs = self.fs
        records: dict[str, dict[str, Any]] = {}
        cells = self.path("cells")
        if not fs.exists(cells):
            return records
        for folder in fs.ls(cells, detail=False):
            cell_id = folder.rstrip("/").rsplit("/", 1)[-1]
            record = self.read_json(self.cell_path(cell_id, RESULT_FILE)) or self.read_json(
                self.cell_path(cell_id, ERROR_FILE)
            )
            if record is not None:
                records[cell_id] = record
        return records

    def ray_storage(self) -> tuple[str, pyarrow.fs.FileSystem | None]:
        """`storage_path` and `storage_filesystem` for Ray Train runs of this sweep's cells.

        Ray Train puts run `<name>` under `<storage_path>/<name>`, so with the cell id as name the checkpoints land
        in `cells/<cell_id>/`. pyarrow ignores AWS_ENDPOINT_URL (docs/design.md section 6): pass it explicitly, with no
        `s3://` prefix on the path when a filesystem is given. Credentials stay in the environment; the endpoint
        and region come from `workloads.fs.S3Settings`, as for every other storage access.
        """
        parsed = urlparse(self.url)
        if parsed.scheme in ("s3", "s3a"):
            settings = S3Settings.from_environment()  # the same settings open_fs gives s3fs
            options: dict[str, Any] = {}
            if settings.endpoint_url:
                endpoint_url = urlparse(settings.endpoint_url)
                options["endpoint_override"] = endpoint_url.netloc
                options["scheme"] = endpoint_url.scheme or "https"
            if settings.region:
                options["region"] = settings.region
            return f"{parsed.netloc}{parsed.path}/cells", pyarrow.fs.S3FileSystem(**options)
        if parsed.scheme not in ("", "file", "local"):
            raise ValueError(f"storage {self.url!r}: Ray Train cannot write checkpoints there (s3:// or a path)")
        return self.path("cells"), None
