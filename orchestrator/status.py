"""`python -m orchestrator.status STORAGE_URL/NAME [--json] [--watch [S]]`: where a sweep and each of its cells
stand, from storage alone.

Works while the sweep runs and after its cluster is gone: nothing but the sweep's folder is read (a read-only
bucket, or a copied folder holding only results.parquet, will do).

The driver's state comes from its lease (`driver.lease`, orchestrator.lease):
  running      a driver holds the lease and renews it;
  interrupted  the lease expired (the driver or its node died), or the sweep has unfinished cells and no
               driver: submitting the sweep again resumes it;
  finished     no driver, and every cell finished or failed (a resubmission retries the failed ones).
The whole sweep's time left is the plan's makespan over the cells not yet finished (orchestrator.plan), rescaled
by the ratio of measured to planned seconds per epoch of the cells that have trained.

A cell's state (docs/design.md section 4's layout):
  finished  cells/<id>/result.json exists;
  failed    cells/<id>/error.json exists and nothing was written to the cell's folder after it;
  running   the Train run left a trace (a checkpoint, Ray Train's checkpoint_manager_snapshot.json or its
            .validate_storage_marker) but no result yet. After the cluster is gone this also means
            "interrupted": re-submitting the sweep resumes it; `updated` tells how long it has been quiet;
  unschedulable  cells/<id>/unschedulable.json exists: the cell's workers fit on none of the live nodes; the
            sweep waits for the cluster to grow, then fails the cell (resources.placement_timeout_s);
  pending   nothing but (maybe) config.json.

The latest epoch and the training accuracies come from Ray Train V2's checkpoint_manager_snapshot.json, which
records the metrics reported with every kept checkpoint (`epoch`, `epoch_seconds`, `train_seconds`,
`train_acc_adv`, `train_acc_clean`); checkpoint folders are named by time (checkpoint_<date>_<time>), not by
epoch. Time left = training epochs still to run x seconds per epoch so far, minus the time since the last
checkpoint (evaluation not included).

Exit status: 0; 2 when nothing at the URL looks like a sweep (no spec.yaml and no cells/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from orchestrator.axes import AXES
from orchestrator.grid import Cell, expand
from orchestrator.lease import LEASE_FILE, lease_ttl
from orchestrator.records import CellError, CellResult, Unschedulable
from orchestrator.results import RESULTS_FILE
from orchestrator.spec import Spec, SpecError, parse_spec
from orchestrator.storage import CONFIG_FILE, ERROR_FILE, HISTORY_FILE, RESULT_FILE, UNSCHEDULABLE_FILE, SweepStorage
from workloads import metrics as metric_names

EXIT_OK, EXIT_INVALID = 0, 2
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
STARTED_MARKER = ".validate_storage_marker"  # Ray Train writes it when the run starts
STATES = ("pending", "unschedulable", "running", "finished", "failed")
# A running cell that has written nothing for this long (and for 3 checkpoint intervals) is shown as stalled.
STALL_SECONDS = 30 * 60


@dataclass
class CellStatus:
    cell_id: str
    axes: dict[str, Any]
    state: str
    epoch: int | None = None  # latest finished epoch (at the latest checkpoint while running)
    epochs: int | None = None  # epochs the cell trains for
    acc_clean: float | None = None
    acc_robust: float | None = None
    robust_metric: str = ""  # "acc_pgd_<N>" (final evaluation) or "train_acc_adv" (training batches)
    seconds_per_epoch: float | None = None
    eta_seconds: float | None = None
    updated: float | None = None  # POSIX time of the cell's last write
    stalled: bool = False
    error: str = ""
    files: dict[str, float | None] = field(default_factory=dict, repr=False)  # name under the cell -> mtime


@dataclass
class SweepState:
    """The sweep as a whole: its driver (from the lease) and the time left."""

    driver: str  # "running", "interrupted", "finished"
    detail: str
    eta_seconds: float | None = None


class NoSweepError(Exception):
    pass


def sweep_storage(url: str) -> SweepStorage:
    url = url.rstrip("/")
    return SweepStorage(url if "://" in url else os.path.abspath(url))


def _mtime(info: dict[str, Any]) -> float | None:
    """Modification time of an fsspec `info`/`find(detail=True)` entry: local 'mtime', S3 'LastModified'."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified"):
        value = info.get(key)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def _strongest(accuracies: dict[str, Any]) -> tuple[str, float] | None:
    pgd = [
        (metric_names.pgd_steps(k) or 0, k)
        for k, v in accuracies.items()
        if metric_names.pgd_steps(k) is not None and v is not None
    ]
    if not pgd:
        return None
    _, key = max(pgd)
    return key, float(accuracies[key])


def cell_statuses(url: str, now: float | None = None) -> tuple[SweepStorage, str, list[CellStatus], list[str]]:
    """(storage, sweep name, one status per cell, notes). Raises NoSweepError."""
    now = time.time() if now is None else now
    storage = sweep_storage(url)
    try:
        fs = storage.fs
        has_spec = fs.exists(storage.path("spec.yaml"))
        cells_root = storage.path("cells")
        has_cells = fs.exists(cells_root)
    except Exception as err:  # unknown protocol, unreachable endpoint, no permission
        raise NoSweepError(f"cannot read {storage.url}: {type(err).__name__}: {err}") from None
    if not (has_spec or has_cells):
        if fs.exists(storage.path(RESULTS_FILE)):
            return storage, *_from_results_table(storage)
        raise NoSweepError(f"no sweep at {storage.url} (no spec.yaml, no cells/ and no {RESULTS_FILE})")
    notes: list[str] = []
    name = storage.url.rstrip("/").rsplit("/", 1)[-1]
    wanted: dict[str, tuple[dict[str, Any], int, int]] = {}  # id -> axes, epochs, checkpoint_every
    if has_spec:
        with fs.open(storage.path("spec.yaml"), "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        try:
            spec = parse_spec(text, "spec.yaml")
            name = spec.name
            wanted = {c.cell_id: (c.axes, c.config.recipe.epochs, c.config.checkpoint_every) for c in expand(spec)}
        except SpecError as err:
            notes.append(f"spec.yaml could not be read ({str(err).splitlines()[0]}): listing cell folders only")

    # One listing of the whole cells/ tree (a single paginated LIST on S3), grouped by cell.
    files: dict[str, dict[str, float | None]] = {}
    if has_cells:
        root = cells_root.rstrip("/") + "/"
        for path, info in fs.find(cells_root, detail=True).items():
            relative = path.split(root, 1)[-1] if root in path else path
            if "/" not in relative:
                continue
            cell_id, rest = relative.split("/", 1)
            files.setdefault(cell_id, {})[rest] = _mtime(info)
    if wanted:
        extra = sorted(set(files) - set(wanted))
        if extra:
            notes.append(f"{len(extra)} cell folder(s) in storage are not in spec.yaml's grid (an earlier spec)")
        ids = list(wanted)
    else:
        ids = sorted(files)

    statuses = []
    for cell_id in ids:
        cell_files = files.get(cell_id, {})
        axes, epochs, every = wanted.get(cell_id, ({}, None, None))
        status = _cell_status(storage, cell_id, cell_files, axes, epochs, every, now)
        statuses.append(status)
    return storage, name, statuses, notes


def _from_results_table(storage: SweepStorage) -> tuple[str, list[CellStatus], list[str]]:
    """Statuses from results.parquet alone (a copied or published sweep without its cells/ folder)."""
    from orchestrator.results import read_results

    rows = read_results(storage).to_pylist()
    name = next((r["sweep"] for r in rows if r.get("sweep")), storage.url.rstrip("/").rsplit("/", 1)[-1])
    statuses: dict[str, CellStatus] = {}
    for row in sorted(rows, key=lambda r: (r["cell_id"], r["branch"] != "main", r["branch"] != "mbn_adv")):
        if row["cell_id"] in statuses:
            continue  # the main branch (or MBN's adversarial one) stands for the cell, as in the live table
        status = CellStatus(row["cell_id"], {a: row.get(a) for a in AXES}, row["status"], epochs=row.get("epochs"))
        status.epoch = row.get("epochs")
        status.error = row.get("error") or ""
        status.acc_clean = row.get("acc_clean")
        strongest = _strongest({k: v for k, v in row.items() if metric_names.pgd_steps(k) is not None})
        if strongest:
            status.robust_metric, status.acc_robust = strongest
        statuses[row["cell_id"]] = status
    return name, list(statuses.values()), [f"read from {RESULTS_FILE} alone (no cells/ folder here)"]


def sweep_state(storage: SweepStorage, statuses: list[CellStatus], now: float) -> SweepState:
    """The driver's state from its lease, and the whole sweep's time left (see the module's docstring)."""
    try:
        lease = storage.read_json(storage.path(LEASE_FILE))
    except Exception:  # unreadable lease: say nothing about the driver rather than guess
        lease = None
    unfinished = [s for s in statuses if s.state not in ("finished", "failed")]
    if lease and float(lease.get("expires_at", 0)) >= now:
        renewed = now - (float(lease["expires_at"]) - lease_ttl(lease))
        return SweepState(
            "running",
            f"driver on host {lease.get('host')} (pid {lease.get('pid')}), lease renewed "
            f"{_duration(max(0.0, renewed))} ago",
        )
    if lease:
        gone = now - float(lease.get("expires_at", now))
        return SweepState(
            "interrupted",
            f"the driver (host {lease.get('host')}) stopped renewing its lease {_duration(gone)} ago: submit the "
            "sweep again to resume",
        )
    if unfinished:
        started = any(s.state in ("running", "unschedulable") or s.epoch for s in unfinished)
        what = "interrupted" if started or len(unfinished) < len(statuses) else "not started"
        return SweepState("interrupted", f"{what}, no driver: submit the sweep again to resume")
    failed = sum(s.state == "failed" for s in statuses)
    detail = "every cell finished" if not failed else f"{failed} cells failed; a resubmission retries them"
    return SweepState("finished", detail, eta_seconds=0.0)


def sweep_eta(spec: Spec, cells: list[Cell], statuses: list[CellStatus]) -> float | None:
    """Seconds until every cell has finished: the plan's makespan over the unfinished cells, each counted for
    the share of its epochs still to train, rescaled by measured / planned seconds per epoch (the median over the
    cells that have trained). None when no cell has a measured epoch time yet (the plan alone would be a guess)."""
    from orchestrator.plan import plan_spec

    by_id = {s.cell_id: s for s in statuses}
    plan = plan_spec(spec, cells)
    ratios, remaining_share = [], []
    for cell, planned in zip(cells, plan.cells, strict=True):
        status = by_id.get(cell.cell_id)
        epochs = cell.config.recipe.epochs
        planned_epoch = planned.wall_hours * 3600 / epochs if epochs else 0.0
        if status and status.seconds_per_epoch and planned_epoch > 0:
            ratios.append(status.seconds_per_epoch / planned_epoch)
        if status is None or status.state not in ("finished", "failed"):
            done = (status.epoch or 0) if status else 0
            remaining_share.append((cell, max(0.0, 1 - done / epochs) if epochs else 1.0))
    if not remaining_share:
        return 0.0
    if not ratios:
        return None
    ratios.sort()
    scale = ratios[len(ratios) // 2]
    rest = plan_spec(spec, [cell for cell, _ in remaining_share])
    # The makespan of the remaining cells whole, shrunk by the share of their work still to do.
    whole = sum(p.wall_hours for p in rest.cells) or 1.0
    left = sum(p.wall_hours * share for p, (_, share) in zip(rest.cells, remaining_share, strict=True))
    return rest.makespan_hours * 3600 * scale * left / whole


def _cell_status(
    storage: SweepStorage,
    cell_id: str,
    files: dict[str, float | None],
    axes: dict[str, Any],
    epochs: int | None,
    checkpoint_every: int | None,
    now: float,
) -> CellStatus:
    status = CellStatus(cell_id, dict(axes), "pending", epochs=epochs, files=files)
    if not axes or epochs is None:  # no spec: the cell's own config.json says what it is
        config = storage.read_json(storage.cell_path(cell_id, CONFIG_FILE)) if CONFIG_FILE in files else None
        if config:
            status.axes = status.axes or dict(config.get("axes") or {})
            train = config.get("train") or {}
            status.epochs = status.epochs or (train.get("recipe") or {}).get("epochs")
            checkpoint_every = checkpoint_every or train.get("checkpoint_every")
    times = [t for t in files.values() if t is not None]
    status.updated = max(times) if times else None

    if RESULT_FILE in files:
        record = storage.read_json(storage.cell_path(cell_id, RESULT_FILE)) or {}
        if record.get("status", "finished") == "finished" and "cell_id" in record:
            result = CellResult.from_json(record)
            status.state = "finished"
            status.epoch = result.epochs or status.epochs
            status.axes = status.axes or result.axes
            accuracies: dict[str, Any] = result.branches.get("main") or result.branches.get("mbn_adv") or {}
            status.acc_clean = accuracies.get("acc_clean")
            strongest = _strongest(accuracies)
            if strongest:
                status.robust_metric, status.acc_robust = strongest
            if result.epochs and result.train_seconds:
                status.seconds_per_epoch = result.train_seconds / result.epochs
            status.eta_seconds = 0.0
            return status

    if UNSCHEDULABLE_FILE in files:
        marker = Unschedulable.from_json(storage.read_json(storage.cell_path(cell_id, UNSCHEDULABLE_FILE)) or {})
        status.state = "unschedulable"
        status.error = marker.problem or "its workers fit on no live node"
        return status
    # Anything the Train run wrote (checkpoints, snapshot, start marker): not the driver's files. history.json
    # follows the run's reports and can land just after a failing attempt's error.json.
    driver_files = (CONFIG_FILE, ERROR_FILE, HISTORY_FILE)
    activity = [t for name, t in files.items() if name not in driver_files and t is not None]
    started = any(name not in driver_files for name in files)
    if ERROR_FILE in files:
        error = CellError.from_json(storage.read_json(storage.cell_path(cell_id, ERROR_FILE)) or {})
        failed_at = error.failed_at or files[ERROR_FILE] or 0.0
        status.error = " ".join((error.error or "unknown error").split())
        status.axes = status.axes or error.axes
        if not any(t > failed_at for t in activity):  # no newer attempt: still failed
            status.state = "failed"
            _read_progress(storage, status)
            return status
    if started:
        status.state = "running"
        _read_progress(storage, status)
        if status.eta_seconds is not None and status.updated is not None:
            status.eta_seconds = max(0.0, status.eta_seconds - max(0.0, now - status.updated))
        if status.updated is not None:
            interval = (status.seconds_per_epoch or 0.0) * (checkpoint_every or 1)
            status.stalled = now - status.updated > max(STALL_SECONDS, 3 * interval)
    return status


def _read_progress(storage: SweepStorage, status: CellStatus) -> None:
    """Latest epoch, epoch time and training accuracies from Ray Train's checkpoint manager snapshot."""
    if SNAPSHOT_FILE not in status.files:
        return
    snapshot = storage.read_json(storage.cell_path(status.cell_id, SNAPSHOT_FILE)) or {}
    results = [r.get("metrics") or {} for r in snapshot.get("checkpoint_results") or []]
    latest = (snapshot.get("latest_checkpoint_result") or {}).get("metrics") or {}
    results = [m for m in [*results, latest] if isinstance(m.get("epoch"), int | float)]
    if not results:
        return
    newest = max(results, key=lambda m: m["epoch"])
    status.epoch = int(newest["epoch"])
    if newest.get("train_seconds") and status.epoch:
        status.seconds_per_epoch = float(newest["train_seconds"]) / status.epoch
    elif newest.get("epoch_seconds"):
        status.seconds_per_epoch = float(newest["epoch_seconds"])
    status.acc_clean = newest.get("train_acc_clean")
    if newest.get("train_acc_adv") is not None:
        status.robust_metric, status.acc_robust = "train_acc_adv", float(newest["train_acc_adv"])
    if status.epochs is not None and status.seconds_per_epoch is not None:
        status.eta_seconds = max(0, status.epochs - status.epoch) * status.seconds_per_epoch


# ----------------------------------------------------------------------------------------------------------------
# Printing


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _accuracy(value: float | None, training: bool) -> str:
    if value is None:
        return "-"
    return f"{'~' if training else ''}{100 * value:.1f}"


def format_status(
    name: str, url: str, statuses: list[CellStatus], notes: list[str], now: float, state: SweepState | None = None
) -> str:
    counts = {state: sum(s.state == state for s in statuses) for state in STATES}
    lines = [
        f"sweep {name} ({url}): {len(statuses)} cells: "
        + ", ".join(
            f"{counts[state]} {state}"
            for state in ("finished", "running", "pending", "unschedulable", "failed")
            if counts[state] or state != "unschedulable"
        )
    ]
    varied = [a for a in AXES if len({repr(s.axes.get(a)) for s in statuses}) > 1] or [
        a for a in AXES if any(a in s.axes for s in statuses)
    ]
    if state is not None:
        line = f"driver: {state.driver} ({state.detail})"
        if state.driver == "running":
            line += f"; the whole sweep needs about {_duration(state.eta_seconds)} more" if state.eta_seconds else ""
        lines.append(line)
    robust_names = metric_names.pgd_metrics(s.robust_metric for s in statuses)
    robust_header = "PGD-" + "/".join(str(metric_names.pgd_steps(n)) for n in robust_names) if robust_names else "adv"
    header = ["cell", "state", "epoch", "clean", robust_header, "time left", "updated", "axes"]
    rows = []
    for s in statuses:
        training = s.state != "finished"
        epoch = f"{s.epoch if s.epoch is not None else '-'}/{s.epochs if s.epochs is not None else '?'}"
        if s.state in ("pending", "unschedulable"):
            epoch, left = f"0/{s.epochs if s.epochs is not None else '?'}", "-"
        elif s.state == "running":
            done = s.epoch is not None and s.epochs is not None and s.epoch >= s.epochs
            left = "evaluating" if done else _duration(s.eta_seconds)
        else:
            left = "-"
        updated = f"{_duration(now - s.updated)} ago" if s.updated is not None else "-"
        updated += " (stalled?)" if s.stalled else ""
        axes = " ".join(f"{a}={s.axes[a]}" for a in varied if a in s.axes)
        if s.error:
            axes += f"  error: {s.error[:100]}"
        rows.append(
            [
                s.cell_id,
                s.state,
                epoch,
                _accuracy(s.acc_clean, training),
                _accuracy(s.acc_robust, training),
                left,
                updated,
                axes,
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    running = [s.eta_seconds for s in statuses if s.state == "running" and s.eta_seconds is not None]
    if running and max(running) > 0:
        lines.append(f"running cells need about {_duration(max(running))} more training (the longest of them)")
    legend = (
        "accuracies in %: finished cells from the final evaluation (clean, strongest PGD-N; MBN: the adv branch); "
        "~ marks accuracy on training batches (clean / adversarial) at the latest checkpoint. time left: training "
        "epochs left x seconds per epoch so far, evaluation not included."
    )
    lines += textwrap.wrap(legend, 118)
    lines += [f"note: {note}" for note in notes]
    return "\n".join(lines)


def _spec_of(storage: SweepStorage) -> Spec | None:
    try:
        with storage.fs.open(storage.path("spec.yaml"), "rb") as f:
            return parse_spec(f.read().decode("utf-8", errors="replace"), "spec.yaml")
    except (OSError, SpecError):
        return None


def snapshot(url: str, now: float) -> tuple[SweepStorage, str, list[CellStatus], list[str], SweepState]:
    """Everything `status` prints: the cells and the sweep as a whole. Raises NoSweepError."""
    storage, name, statuses, notes = cell_statuses(url, now)
    state = sweep_state(storage, statuses, now)
    if state.driver == "running":
        spec = _spec_of(storage)
        if spec is not None:
            try:
                state.eta_seconds = sweep_eta(spec, expand(spec), statuses)
            except Exception as err:  # a plan that no longer fits the spec's cluster: no estimate, say why
                notes.append(f"no estimate of the time left ({type(err).__name__}: {str(err).splitlines()[0]})")
    return storage, name, statuses, notes, state


def _render(url: str, as_json: bool) -> tuple[str, SweepState]:
    now = time.time()
    storage, name, statuses, notes, state = snapshot(url, now)
    if as_json:
        cells = [{k: v for k, v in asdict(s).items() if k != "files"} for s in statuses]
        document = {"sweep": name, "url": storage.url, "driver": asdict(state), "cells": cells, "notes": notes}
        return json.dumps(document, indent=2), state
    return format_status(name, storage.url, statuses, notes, now, state), state


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.status", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", help="the sweep's folder: STORAGE_URL/NAME, e.g. ./runs/smoke or s3://b/p/smoke")
    parser.add_argument("--json", action="store_true", help="print the cells as JSON")
    parser.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=30.0,
        metavar="SECONDS",
        help="print again every SECONDS (default 30) until the driver is no longer running",
    )
    args = parser.parse_args(argv)
    while True:
        try:
            text, state = _render(args.sweep, args.json)
        except NoSweepError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_INVALID
        try:
            print(text, flush=True)
        except BrokenPipeError:  # `... | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
        if args.watch is None or state.driver != "running":
            return EXIT_OK
        try:
            time.sleep(max(1.0, args.watch))  # a refresh interval for a person watching, not a wait on a condition
        except KeyboardInterrupt:
            return EXIT_OK
        print()


if __name__ == "__main__":
    raise SystemExit(main())
