"""Progress of a running sweep: one log line per event in the job's log, and gauges on the Ray dashboard.

The gauges go through `ray.util.metrics`, so the node's metrics agent exports them (with Ray's `ray_` prefix) to
the dashboard's metrics view and to any Prometheus that scrapes the cluster:
  sweep_cells{sweep, state}                 cells pending / running / finished / failed
  sweep_cell_epoch{sweep, cell_id}          last reported epoch
  sweep_cell_images_per_second{...}         training throughput of the cell's whole worker group
  sweep_cell_robust_accuracy{...}           adversarial accuracy: on training batches each epoch, then the
                                            final evaluation's strongest PGD
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback
from ray.util.metrics import Gauge

from orchestrator.grid import describe_axes

STATES = ("pending", "running", "finished", "failed")
# A paper-scale epoch takes ~30 min (52 h / 110 epochs); a cell silent for longer than that needs a look.
STALL_AFTER_S = 45 * 60.0
# Ray's metrics agent drops a gauge value that has not been set again for two export intervals (~20 s with the
# default 10 s interval), so a sweep would vanish from the dashboard during any quiet stretch: set every gauge
# again this often.
REPUBLISH_EVERY_S = 5.0


class SweepProgress(Callback):
    def __init__(
        self,
        sweep: str,
        total: int,
        already_finished: int,
        epochs: dict[str, int],
        stall_after_s: float = STALL_AFTER_S,
    ) -> None:
        self.stall_after_s = stall_after_s
        self._last_heard: dict[str, float] = {}  # cell id -> monotonic time of its last start or report
        self.sweep = sweep
        self.epochs = epochs
        self.counts = {
            "pending": total - already_finished,
            "running": 0,
            "finished": already_finished,
            "failed": 0,
        }
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

    def _move(self, source: str, target: str) -> None:
        self.counts[source] -= 1
        self.counts[target] += 1
        self._publish_counts()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._move("pending", "running")
        self._last_heard[trial.config["cell"]["cell_id"]] = time.monotonic()
        cell = trial.config["cell"]
        axes = describe_axes(cell["axes"])
        self._say(f"cell {cell['cell_id']} started: {axes}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        cell_id = trial.config["cell"]["cell_id"]
        self._last_heard[cell_id] = time.monotonic()
        tags = {"sweep": self.sweep, "cell_id": cell_id}
        epoch = result.get("epoch")
        parts = [f"cell {cell_id} epoch {epoch}/{self.epochs.get(cell_id, '?')}"]
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
        self._last_heard.pop(trial.config["cell"]["cell_id"], None)
        self._move("running", "finished")
        self._say(f"cell {trial.config['cell']['cell_id']} finished")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._last_heard.pop(trial.config["cell"]["cell_id"], None)
        self._move("running", "failed")
        self._say(f"cell {trial.config['cell']['cell_id']} FAILED (see error.json in its storage folder)")


def _strongest_eval(result: dict) -> tuple[str, float] | None:
    """(name, accuracy) of the main/adv branch under the most PGD steps evaluated, if the result has any."""
    best: tuple[int, str, float] | None = None
    for key, value in result.items():
        if not key.startswith("eval/") or "acc_pgd_" not in key or "/mbn_clean/" in key:
            continue
        steps = int(key.rsplit("_", 1)[-1])
        if best is None or steps > best[0]:
            best = (steps, key.removeprefix("eval/"), float(value))
    return None if best is None else (best[1], best[2])
