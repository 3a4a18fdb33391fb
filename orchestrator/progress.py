"""Progress of a running sweep: one log line per event in the job's log, and gauges on the Ray dashboard.

The gauges go through `ray.util.metrics`, so the node's metrics agent exports them (with Ray's `ray_` prefix) to
the dashboard's metrics view and to any Prometheus that scrapes the cluster:
  sweep_cells{sweep, state}                 cells pending / running / finished / failed
  sweep_cell_epoch{sweep, cell_id}          last reported epoch
  sweep_cell_images_per_second{...}         training throughput of the cell's whole worker group
  sweep_cell_robust_accuracy{...}           adversarial accuracy: on training batches each epoch, then the
                                            final evaluation's strongest PGD

Every epoch's training metrics also go to storage, as `cells/<cell_id>/history.json` (orchestrator.results has
the format), for the report's training curves: a sweep at the paper's scale (110 epochs, Section 3) is judged by
whether each cell converged, which the final evaluation alone does not show.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from ray.tune import Callback
from ray.util.metrics import Gauge

from orchestrator.grid import Cell
from orchestrator.redact import redact
from orchestrator.results import epoch_row, merge_epochs
from orchestrator.runner import CELL_FAILED
from orchestrator.storage import HISTORY_FILE, SweepStorage
from workloads import metrics

STATES = ("pending", "running", "finished", "failed")
# A paper-scale epoch takes ~30 min (52 h / 110 epochs); a cell silent for longer than that needs a look.
STALL_AFTER_S = 45 * 60.0
# Ray's metrics agent drops a gauge value that has not been set again for two export intervals (~20 s with the
# default 10 s interval), so a sweep would vanish from the dashboard during any quiet stretch: set every gauge
# again this often.
REPUBLISH_EVERY_S = 5.0
# How long the end of the sweep waits for the last history writes, so that history.parquet sees every epoch; a
# storage outage longer than this costs at most the epochs still unwritten, never the sweep's results.
HISTORY_FLUSH_S = 60.0


class HistoryWriter:
    """Keeps every cell's per-epoch rows and writes them to `cells/<cell_id>/history.json`, off Tune's event loop.

    Each write sends the cell's whole history (rows keyed by epoch, so an epoch trained again after a resume
    replaces its earlier row), merged once with what storage already holds: a sweep resumed by a new driver keeps
    the epochs the previous one wrote. The driver's lease makes it the only writer. Writes run in one background
    thread because a storage outage is retried for minutes (workloads.fs.with_retries) and must not stall the
    scheduling of cells; a write that still fails is a warning, and the cell's next epoch sends everything again.
    """

    def __init__(self, sweep_url: str) -> None:
        self._storage = SweepStorage(sweep_url)
        self._changed = threading.Condition()
        self._rows: dict[str, dict[int, dict[str, Any]]] = {}  # cell id -> epoch -> row
        self._axes: dict[str, dict[str, Any]] = {}  # cell id -> grid axes
        self._merged: set[str] = set()  # cells whose stored history has been read and merged in
        self._queued: dict[str, None] = {}  # cells with rows not yet written, in arrival order
        self._unsent: set[str] = set()  # cells whose last write failed: sent again with the next epoch or a flush
        self._busy = False
        self._thread: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; a copy starts empty but for where it writes (the
        # lock and the thread cannot travel, and storage holds the rows already written).
        return {"sweep_url": self._storage.url}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["sweep_url"])  # type: ignore[misc]

    def add(self, cell_id: str, axes: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        row = epoch_row(result)
        if row is None:
            return
        with self._changed:
            self._axes[cell_id] = dict(axes)
            self._rows.setdefault(cell_id, {})[row["epoch"]] = row
            self._queued[cell_id] = None
            self._unsent.discard(cell_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sweep-history", daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def flush(self, timeout_s: float = HISTORY_FLUSH_S) -> bool:
        """Let queued writes finish, send failed ones once more; True when every row reached storage."""
        deadline = time.monotonic() + timeout_s

        def idle() -> bool:
            return not self._queued and not self._busy

        with self._changed:
            self._changed.wait_for(idle, timeout=timeout_s)
            for cell_id in sorted(self._unsent):
                self._queued[cell_id] = None
            self._unsent.clear()
            self._changed.notify_all()
            self._changed.wait_for(idle, timeout=max(0.0, deadline - time.monotonic()))
            return idle() and not self._unsent

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._queued))
                cell_id = next(iter(self._queued))
                del self._queued[cell_id]
                self._busy = True
            try:
                sent = self._send(cell_id)
            except Exception as err:  # whatever goes wrong, the thread lives on for the other cells
                print(f"warning: cell {cell_id}: history not written ({type(err).__name__})", file=sys.stderr)
                sent = False
            with self._changed:
                self._busy = False
                if not sent and cell_id not in self._queued:
                    self._unsent.add(cell_id)
                self._changed.notify_all()

    def _send(self, cell_id: str) -> bool:
        storage, axes = self._storage, self._axes[cell_id]
        path = storage.cell_path(cell_id, HISTORY_FILE)
        if cell_id not in self._merged:
            try:
                stored = storage.read_json(path) or {}
            except ValueError:  # not JSON: nothing of it can be kept; this driver's rows replace it
                stored = {}
            except Exception as err:
                # Writing now could replace epochs an earlier driver stored: wait for storage to answer.
                _warn(cell_id, "stored history not readable", err)
                return False
            with self._changed:
                mine = self._rows[cell_id].values()
                self._rows[cell_id] = {r["epoch"]: r for r in merge_epochs(stored.get("epochs") or [], mine)}
                self._merged.add(cell_id)
        with self._changed:
            epochs = [dict(row) for _, row in sorted(self._rows[cell_id].items())]
        try:
            storage.write_json(path, {"cell_id": cell_id, "axes": axes, "epochs": epochs})
        except Exception as err:
            _warn(cell_id, "history not written", err)
            return False
        return True


def _warn(cell_id: str, what: str, err: Exception) -> None:
    print(f"warning: cell {cell_id}: {what} ({type(err).__name__}: {redact(str(err))})", file=sys.stderr, flush=True)


class SweepProgress(Callback):
    def __init__(
        self,
        sweep: str,
        sweep_url: str,
        total: int,
        already_finished: int,
        epochs: dict[str, int],
        stall_after_s: float = STALL_AFTER_S,
    ) -> None:
        self.stall_after_s = stall_after_s
        self.history = HistoryWriter(sweep_url)  # each cell's history.json in this sweep's folder
        self._last_heard: dict[str, float] = {}  # cell id -> monotonic time of its last start or report
        self._attempt_start: dict[str, int] = {}  # cell id -> start_epoch of its current attempt, once reported
        self.sweep = sweep
        self.epochs = epochs
        self.counts = {
            "pending": total - already_finished,
            "running": 0,
            "finished": already_finished,
            "failed": 0,
        }
        self._state: dict[str, str] = {}  # cell id -> its state, once Tune has started its trial
        self.started = time.monotonic()
        self._latest: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[Gauge, float, dict[str, str]]] = {}
        self._published = self.started
        self._cells = Gauge("sweep_cells", "Cells of the sweep by state", tag_keys=("sweep", "state"))
        self._epoch = Gauge("sweep_cell_epoch", "Last reported epoch of a cell", tag_keys=("sweep", "cell_id"))
        self._speed = Gauge(
            "sweep_cell_images_per_second", "Training images/s of a cell", tag_keys=("sweep", "cell_id")
        )
        self._robust = Gauge(
            "sweep_cell_robust_accuracy",
            "Latest adversarial accuracy of a cell",
            tag_keys=("sweep", "cell_id"),
        )
        self._publish_counts()

    def _set(self, gauge: Gauge, value: float, tags: dict[str, str]) -> None:
        gauge.set(value, tags=tags)
        self._latest[(gauge.info["name"], tuple(sorted(tags.items())))] = (gauge, value, tags)

    def _publish_counts(self) -> None:
        for state in STATES:
            self._set(self._cells, self.counts[state], {"sweep": self.sweep, "state": state})

    def _say(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        c = self.counts
        summary = f"{c['finished']} finished, {c['running']} running, {c['pending']} pending, {c['failed']} failed"
        print(f"[sweep {self.sweep} +{elapsed:6.0f}s] {text}  ({summary})", file=sys.stdout, flush=True)

    def _move(self, cell_id: str, target: str) -> None:
        """Put a cell in `target`, whatever Tune's sequence of calls: a retried trial starts twice, and a cell
        counts once."""
        source = self._state.get(cell_id, "pending")
        if source == target:
            return
        self._state[cell_id] = target
        self.counts[source] -= 1
        self.counts[target] += 1
        self._publish_counts()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        cell: Cell = trial.config["cell"]
        self._move(cell.cell_id, "running")
        self._last_heard[cell.cell_id] = time.monotonic()
        self._attempt_start.pop(cell.cell_id, None)
        self._say(f"cell {cell.cell_id} started: {cell.describe()}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Tune runs the trial again (orchestrator.sweep's tune.FailureConfig): its node or controller was lost."""
        cell_id = trial.config["cell"].cell_id
        self._last_heard.pop(cell_id, None)
        self._attempt_start.pop(cell_id, None)
        self._move(cell_id, "pending")
        attempt = trial.run_metadata.num_failures
        self._say(
            f"cell {cell_id} lost its trial (a node or process died); retrying from its checkpoint ({attempt} lost)"
        )

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        cell: Cell = trial.config["cell"]
        cell_id = cell.cell_id
        if CELL_FAILED in result:
            return  # said by on_trial_complete
        self._last_heard[cell_id] = time.monotonic()
        self.history.add(cell_id, cell.axes, result)
        tags = {"sweep": self.sweep, "cell_id": cell_id}
        epoch = result.get("epoch")
        parts = [f"cell {cell_id} epoch {epoch}/{self.epochs.get(cell_id, '?')}"]
        # The first report of an attempt that resumed says from where: what an interruption cost is then in the log.
        start = result.get("start_epoch")
        if start is not None and self._attempt_start.get(cell_id) != start:
            self._attempt_start[cell_id] = start
            if start:
                parts.append(f"resumed from epoch {start}")
        if epoch is not None:
            self._set(self._epoch, float(epoch), tags)
        if "loss" in result:
            parts.append(f"loss {result['loss']:.3f}")
        for key in ("train_acc_adv", "train_acc_clean"):
            if key in result:
                parts.append(f"{key.removeprefix('train_')} {result[key]:.3f}")
        if "images_per_sec" in result:
            parts.append(f"{result['images_per_sec']:.0f} img/s")
            self._set(self._speed, float(result["images_per_sec"]), tags)
        robust = _strongest_eval(result)
        if robust is not None:
            name, value = robust
            parts.append(f"eval {name} {value:.3f}")
            self._set(self._robust, value, tags)
        elif "train_acc_adv" in result:
            self._set(self._robust, float(result["train_acc_adv"]), tags)
        self._say(", ".join(parts))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        """A running cell silent for too long is said so in the log, once per silent period, instead of looking
        like progress: its workers may be unplaceable or hung (Ray Train's own start-up timeout fails a worker
        group that cannot be placed after 60 s; this catches the rest)."""
        now = time.monotonic()
        if now - self._published >= REPUBLISH_EVERY_S:
            self._published = now
            for gauge, value, tags in self._latest.values():
                gauge.set(value, tags=tags)
        for cell_id, heard in list(self._last_heard.items()):
            if now - heard > self.stall_after_s:
                self._say(f"cell {cell_id} has reported nothing for {now - heard:.0f} s: stalled or unschedulable?")
                self._last_heard[cell_id] = now

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        cell_id = trial.config["cell"].cell_id
        self._last_heard.pop(cell_id, None)
        if CELL_FAILED in (trial.last_result or {}):
            self._move(cell_id, "failed")
            self._say(f"cell {cell_id} FAILED: {trial.last_result[CELL_FAILED]}")
            return
        self._move(cell_id, "finished")
        self._say(f"cell {cell_id} finished")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        cell_id = trial.config["cell"].cell_id
        self._last_heard.pop(cell_id, None)
        self._move(cell_id, "failed")
        self._say(f"cell {cell_id} FAILED (see error.json in its storage folder)")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """The sweep aggregates history.parquet next: let the last epochs reach storage first (bounded)."""
        if not self.history.flush():
            self._say(
                f"some cells' last epochs are not in their history.json yet (storage slow for {HISTORY_FLUSH_S:.0f} s)"
            )


def _strongest_eval(result: dict) -> tuple[str, float] | None:
    """(name, accuracy) of the main/adv branch under the most PGD steps evaluated, if the result has any."""
    best: tuple[int, str, float] | None = None
    for key, value in result.items():
        parsed = metrics.parse_eval_key(key)
        steps = None if parsed is None or parsed[0] == "mbn_clean" else metrics.pgd_steps(parsed[1])
        if parsed is not None and steps is not None and (best is None or steps > best[0]):
            best = (steps, f"{parsed[0]}/{parsed[1]}", float(value))
    return None if best is None else (best[1], best[2])
