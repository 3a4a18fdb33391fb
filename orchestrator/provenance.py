"""What code and which libraries produced a cell's results, recorded beside them.

A cell's id hashes its resolved configuration only, so resubmitting a sweep after a change to the training code
would silently skip its finished cells and mix results of two code versions in one table. Every cell's
`config.json` and `result.json` (and so `results.parquet`) therefore carry:

- `source_hash`: a hash of the workload's source (`workloads/**/*.py`), the code that decides what a cell trains
  and how it is evaluated; it is what a resubmission compares (orchestrator.sweep lists the finished cells whose
  hash differs; `--rerun-changed` trains them again). The orchestrator's own code is left out on purpose: a change
  to the report or the scheduler does not change a cell's numbers;
- `git_commit` and `git_dirty` where the project is a git checkout (a `ray job submit --working-dir` copy is not:
  both are then null and the source hash alone says which code ran), and the package `version`;
- the versions of Python, torch and Ray, and the host that ran the driver; the device that trained the cell is
  added by the workload itself (`device` in the final metrics).
"""

from __future__ import annotations

import hashlib
import platform
import socket
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import workloads
from orchestrator import __version__

PROVENANCE_KEYS = (
    "source_hash",
    "git_commit",
    "git_dirty",
    "version",
    "python",
    "torch",
    "ray",
    "host",
    "device",
)


def source_hash(package_dir: Path | None = None) -> str:
    """sha256 (first 16 hex digits) over the workload package's Python files: their paths and contents."""
    root = package_dir or Path(workloads.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _git(repo: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_state(repo: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout holding the project, or (None, None) outside a git checkout."""
    repo = repo or Path(workloads.__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        return None, None
    commit = _git(repo, "rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status) if status is not None else None)


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@cache
def driver_provenance() -> dict[str, Any]:
    """This driver's code and library versions (computed once per process)."""
    commit, dirty = git_state()
    return {
        "source_hash": source_hash(),
        "git_commit": commit,
        "git_dirty": dirty,
        "version": __version__,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "ray": _version("ray"),
        "host": socket.gethostname(),
    }


def changed_code(records: dict[str, dict[str, Any]], current_hash: str) -> list[str]:
    """Ids of the finished cells whose results came from workload code other than `current_hash`. A record from
    before provenance was recorded counts as changed: nothing says which code produced it."""
    return sorted(
        cell_id
        for cell_id, record in records.items()
        if record.get("status") == "finished" and (record.get("provenance") or {}).get("source_hash") != current_hash
    )
