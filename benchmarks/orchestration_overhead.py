"""What the orchestrator adds to a cell: `python -m orchestrator.sweep` on a 1-cell spec against the same cell
through the single-process entry, `python -m workloads.train CELL.json --out DIR`.

`python -m benchmarks.orchestration_overhead [--repeats 2] [--cells 2] [--workload-from sweeps/tiny.yaml]`

Both are whole commands in fresh processes, timed on the wall clock: the sweep starts a fresh local Ray (its
own temp dir, so it neither joins nor disturbs another Ray on the machine), Tune, a Train worker group, trains,
evaluates, writes results and shuts Ray down; the single-process run imports torch, trains and evaluates. The
cell is `--workload-from`'s workload (default sweeps/tiny.yaml: the two-epoch digits cell) as a 1-cell grid
(seed [0]), 1 CPU per worker. CELL.json is the `train` section of the sweep's own `cells/<id>/config.json`, with
`builtin://digits` resolved to the dataset the sweep materialised under its storage (`datasets/digits`).

Fairness: the dataset is converted once, up front, and copied into every sweep's storage, so no run pays the
conversion (a sweep pays it once, not per cell). Both commands get OMP_NUM_THREADS=1, which is what Ray gives a
1-CPU worker anyway (`ray._private.utils.set_omp_num_threads_if_unset`); a single-process run at the default 2
threads was 11x slower on this shared 2-core machine (OpenMP threads spinning for descheduled peers). Sweep and
single runs alternate, the order flipping every round; overhead and ratio are medians of per-pair values.

Overhead = T(sweep, 1 cell) - T(single), wall seconds. Beside it, the CPU seconds of each command's whole process
tree (sampled from /proc, see `TreeCpu`), split by process name: what Ray, Tune and Train spend, independent of
how busy the machine is, and the sweep's timeline from its output lines (Ray up, cell started, first epoch, cell
finished, exit). The training loop is the same function (`workloads.train.run`) in both; per-epoch extras
under Ray (report, checkpoint persist) are inside the measured overhead for this cell's epochs only. The in-loop
time ratio (`train_seconds` of the sweep's result.json over the single run's metrics.jsonl) is printed as a
sanity check, but a couple of few-second epochs on a loaded machine make it noisy.

T(sweep, 1 cell) - T(single) is the once-per-sweep start-up (Ray, its dashboard, Tune) plus one cell's own
overhead (its Tune trial, Ray Train controller and worker group, each a new process). With N cells in one sweep,
the overhead of one more cell grows with a study, and carries the goal (< 10 s, < 5 % of a 5-min cell). It is
read off the N-cell sweep's timeline: cells run one after another, so the sweep finishes one cell per cycle, and
cycle - T(single) is what a cell adds (median over the N - 1 cycles). (T(N) - T(1)) / (N - 1) - T(single) is printed
beside it, but it also carries the difference between two runs' Ray start-ups. The amortised per-cell overhead
(T(sweep, N cells) - N x T(single)) / N is printed as well.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks._common import Check, format_table, load_average, median, paired_ratio, print_checks

NAME = "orchestration_overhead"
ROOT = Path(__file__).resolve().parent.parent
GOAL_OVERHEAD_SECONDS = 10.0
GOAL_LONG_CELL_FRACTION = 0.05
LONG_CELL_SECONDS = 300.0
SWEEP_NAME = "bench"
COMMAND_TIMEOUT = 900
# orchestrator.progress's line for a finished cell: "[sweep NAME +  27s] cell <id> finished  (1 finished, ...)".
CELL_FINISHED = re.compile(r"\bcell [0-9a-f]+ finished\b")


def spec_text(workload_from: Path, storage: Path, seeds: list[int]) -> str:
    source = yaml.safe_load(workload_from.read_text())
    spec = {
        "name": SWEEP_NAME,
        "storage": str(storage),
        "workload": source["workload"],
        "grid": {"seed": seeds},
        "resources": {"use_gpu": False, "cpus_per_worker": 1, "max_workers_per_cell": 1},
        "planning": source.get("planning", {}),
        "checkpoint_every": 1,
        "max_failures": 0,
    }
    return yaml.safe_dump(spec, sort_keys=False)


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join another Ray instance
    ray_tmp = tmp / "t"
    ray_tmp.mkdir(exist_ok=True)
    env.update(
        {
            # Ray keeps its session (and looks for running clusters) under $TMPDIR/ray; a private one keeps this
            # benchmark's Ray separate from any other on the machine. Short path: Ray's socket paths must fit.
            "TMPDIR": str(ray_tmp),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
    )
    return env


class TreeCpu:
    """CPU seconds of a process tree, sampled from /proc while it runs (Linux).

    wait4's rusage would miss most of a sweep: Ray's workers are the raylet's children, and when the raylet is
    killed at shutdown they are re-parented and reaped elsewhere. So a thread samples every process that is in
    the command's session or descends from it, and keeps each one's last utime + stime; a process that lives
    less than one sampling interval can be missed (Ray's are long-lived). Unlike wall seconds these hardly move
    with other jobs' load: they are the orchestrator's own work, next to the wall clock a user waits for.
    """

    INTERVAL = 0.25

    def __init__(self, root: int) -> None:
        self.root = root
        self.cpu: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK")
        self._thread = threading.Thread(target=self._loop, name="tree-cpu", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.INTERVAL)

    def sample(self) -> None:
        stats: dict[int, tuple[str, int, int, float]] = {}  # pid -> (name, ppid, session, cpu seconds)
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    raw = f.read()
            except OSError:
                continue  # exited meanwhile
            # "pid (comm) state ppid pgrp session ... utime stime ...": comm may hold spaces and parentheses.
            name, rest = raw[raw.index("(") + 1 : raw.rindex(")")], raw[raw.rindex(")") + 2 :].split()
            stats[int(entry)] = (name, int(rest[1]), int(rest[3]), (int(rest[11]) + int(rest[12])) / self._tick)
        mine = {pid for pid, (_, _, session, _) in stats.items() if session == self.root}
        mine.add(self.root)
        grew = True
        while grew:  # descendants that started a session of their own
            more = {pid for pid, (_, ppid, _, _) in stats.items() if ppid in mine} - mine
            mine |= more
            grew = bool(more)
        for pid in mine & stats.keys():
            name, _, _, seconds = stats[pid]
            self.cpu[pid] = (name, max(seconds, self.cpu.get(pid, (name, 0.0))[1]))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def total(self) -> float:
        return sum(seconds for _, seconds in self.cpu.values())

    def by_name(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, seconds in self.cpu.values():
            out[name] = out.get(name, 0.0) + seconds
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _timed(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, TreeCpu, list[tuple[float, str]]]:
    """Wall seconds of `cmd`, its tree's CPU seconds, and each output line with the second it appeared at."""
    started = time.perf_counter()
    lines: list[tuple[float, str]] = []
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        tree = TreeCpu(proc.pid)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                lines.append((time.perf_counter() - started, line.rstrip("\n")))
                out.write(line)
                if time.perf_counter() - started > COMMAND_TIMEOUT:
                    raise TimeoutError(f"{' '.join(cmd)} ran past {COMMAND_TIMEOUT} s; log: {log}")
            proc.wait()
        finally:
            tree.stop()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # our own session: the command and the Ray it started
                proc.wait()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "\n".join(text for _, text in lines[-20:])
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}; log {log}:\n{tail}")
    return seconds, tree, lines


def _first(lines: list[tuple[float, str]], needle: str) -> float | None:
    return next((t for t, text in lines if needle in text), None)


def _run_sweep(tmp: Path, tag: str, seeds: list[int], workload_from: Path, digits: Path) -> dict[str, Any]:
    storage = tmp / f"store-{tag}"
    dataset = storage / SWEEP_NAME / "datasets" / "digits"
    shutil.copytree(digits, dataset)
    spec = tmp / f"spec-{tag}.yaml"
    spec.write_text(spec_text(workload_from, storage, seeds))
    seconds, tree, lines = _timed(
        [sys.executable, "-m", "orchestrator.sweep", str(spec)], _env(tmp), tmp / f"sweep-{tag}.log"
    )
    cells = sorted((storage / SWEEP_NAME / "cells").glob("*/result.json"))
    if len(cells) != len(seeds):
        raise RuntimeError(f"sweep {tag}: {len(cells)} of {len(seeds)} cells finished; log {tmp / f'sweep-{tag}.log'}")
    results = [json.loads(p.read_text()) for p in cells]
    return {
        "seconds": seconds,
        "cpu_seconds": tree.total(),
        "cpu_by_process": tree.by_name(),
        "storage": storage,
        "dataset": dataset,
        "cell_dirs": [p.parent for p in cells],
        "train_seconds": [r["train_seconds"] for r in results],
        "phases": {
            "ray_up": _first(lines, "cluster:"),
            "cell_started": _first(lines, " started: "),
            "first_epoch_reported": _first(lines, " epoch 1/"),
            "last_cell_finished": max(
                (t for t, text in lines if text.startswith("[sweep") and CELL_FINISHED.search(text)), default=None
            ),
            "results_written": _first(lines, "results:"),
            "exit": seconds,
        },
        "finished_at": sorted(t for t, text in lines if text.startswith("[sweep") and CELL_FINISHED.search(text)),
    }


def _run_single(tmp: Path, tag: str, cell_dir: Path, dataset: Path) -> dict[str, Any]:
    train = json.loads((cell_dir / "config.json").read_text())["train"]
    train["data"]["url"] = str(dataset)
    config = tmp / f"cell-{tag}.json"
    config.write_text(json.dumps(train))
    out = tmp / f"single-{tag}"
    seconds, tree, _ = _timed(
        [sys.executable, "-m", "workloads.train", str(config), "--out", str(out)], _env(tmp), tmp / f"single-{tag}.log"
    )
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": seconds, "cpu_seconds": tree.total(), "train_seconds": history[-1]["train_seconds"]}


def run(
    repeats: int = 2, cells: int = 3, workload_from: str = "sweeps/tiny.yaml", keep: bool = False
) -> dict[str, Any]:
    from workloads.data import digits_to_parquet

    source = (ROOT / workload_from) if not Path(workload_from).is_absolute() else Path(workload_from)
    # Short /tmp path on purpose: Ray's unix sockets live under it and their paths are limited to ~107 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="ob", dir="/tmp"))
    try:
        digits = tmp / "digits"
        digits_to_parquet(str(digits))
        load_before = load_average()
        sweeps: list[dict[str, Any]] = []
        singles: list[dict[str, Any]] = []
        for r in range(repeats):
            # Round 0 must start with a sweep (the single run reads the config.json the sweep writes); later
            # rounds flip the order, so neither side always runs second.
            if r % 2 == 0:
                sweeps.append(_run_sweep(tmp, f"1-{r}", [0], source, digits))
                singles.append(_run_single(tmp, str(r), sweeps[0]["cell_dirs"][0], sweeps[0]["dataset"]))
            else:
                singles.append(_run_single(tmp, str(r), sweeps[0]["cell_dirs"][0], sweeps[0]["dataset"]))
                sweeps.append(_run_sweep(tmp, f"1-{r}", [0], source, digits))
        multi = _run_sweep(tmp, f"{cells}", list(range(cells)), source, digits) if cells > 1 else None
        load_after = load_average()
    finally:
        if keep:
            print(f"kept logs and storage in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    t_sweep = median([s["seconds"] for s in sweeps])
    t_single = median([s["seconds"] for s in singles])
    # Paired per round (a sweep and the single run next to it share the machine's load of that minute).
    overhead = median([s["seconds"] - x["seconds"] for s, x in zip(sweeps, singles, strict=True)])
    ratio = paired_ratio([s["seconds"] for s in sweeps], [x["seconds"] for x in singles])
    cpu_overhead = median([s["cpu_seconds"] - x["cpu_seconds"] for s, x in zip(sweeps, singles, strict=True)])
    loop_ratio = paired_ratio([s["train_seconds"][0] for s in sweeps], [x["train_seconds"] for x in singles])
    phases = {
        key: median([s["phases"][key] for s in sweeps if s["phases"][key] is not None])
        for key in sweeps[0]["phases"]
        if any(s["phases"][key] is not None for s in sweeps)
    }
    result: dict[str, Any] = {
        "name": NAME,
        "setup": {
            "workload_from": workload_from,
            "repeats": repeats,
            "omp_num_threads": 1,
            "load_average_before_after": [round(load_before, 2), round(load_after, 2)],
        },
        "sweep_seconds": [s["seconds"] for s in sweeps],
        "single_seconds": [s["seconds"] for s in singles],
        "sweep_cpu_seconds": [s["cpu_seconds"] for s in sweeps],
        "single_cpu_seconds": [s["cpu_seconds"] for s in singles],
        "sweep_median_seconds": t_sweep,
        "single_median_seconds": t_single,
        "overhead_seconds": overhead,
        "overhead_cpu_seconds": cpu_overhead,
        "ratio": ratio,
        "in_loop_train_ratio": loop_ratio,
        "sweep_phases_seconds": phases,
        "sweep_cpu_by_process": {k: round(v, 2) for k, v in sweeps[-1]["cpu_by_process"].items()},
    }
    # A 1-cell sweep pays the once-per-sweep start-up (Ray and its dashboard, Tune) and one cell's own overhead
    # (its trial, Train controller and worker group); what grows with a study of dozens of cells is the latter, the
    # overhead of one more cell, which carries the goal.
    checks = [
        Check(
            NAME,
            "1-cell sweep - single process: start-up + one cell (wall, median of pairs)",
            f"{overhead:.1f} s ({t_sweep:.1f} s vs {t_single:.1f} s, ratio {ratio:.2f})",
            "",
            None,
        ),
        Check(
            NAME,
            "1-cell sweep - single process: start-up + one cell (CPU s of the process trees)",
            f"{cpu_overhead:.1f} s",
            "",
            None,
        ),
    ]
    if multi is not None:
        amortised = (multi["seconds"] - cells * t_single) / cells
        whole_runs = (multi["seconds"] - t_sweep) / (cells - 1) - t_single
        # Cells run one after another, so from the first cell's end on the sweep finishes one cell per cycle: a
        # cycle less a single run is what one more cell adds, read off one run's timeline. Differences of whole
        # runs carry Ray's start-up too, which moved between 5.5 and 9.7 s from one run to the next here.
        finished = multi["finished_at"]
        cycle = median([b - a for a, b in itertools.pairwise(finished)]) if len(finished) == cells else float("nan")
        marginal = cycle - t_single
        # The same marginal in CPU seconds: one N-cell sweep is a single sample, and its wall time also depends on
        # how much of one cell's teardown overlaps the next cell's start-up; CPU seconds do not.
        cpu_single = median([x["cpu_seconds"] for x in singles])
        cpu_sweep = median([s["cpu_seconds"] for s in sweeps])
        marginal_cpu = (multi["cpu_seconds"] - cpu_sweep) / (cells - 1) - cpu_single
        long_fraction = marginal / LONG_CELL_SECONDS
        result |= {
            "cells": cells,
            "multi_sweep_seconds": multi["seconds"],
            "multi_sweep_cpu_seconds": multi["cpu_seconds"],
            "amortised_overhead_per_cell": amortised,
            "cycle_seconds": cycle,
            "marginal_overhead_per_cell": marginal,
            "marginal_overhead_whole_runs": whole_runs,
            "marginal_overhead_per_cell_cpu": marginal_cpu,
            "long_cell_fraction": long_fraction,
        }
        checks += [
            Check(
                NAME,
                f"overhead of one more cell: cell-to-cell cycle of a {cells}-cell sweep - T(single)",
                f"{marginal:.1f} s ({cycle:.1f} s - {t_single:.1f} s)",
                f"< {GOAL_OVERHEAD_SECONDS:g} s",
                marginal < GOAL_OVERHEAD_SECONDS,
            ),
            Check(
                NAME,
                f"the same from whole runs: (T({cells} cells) - T(1 cell)) / {cells - 1} - T(single) (wall / CPU s)",
                f"{whole_runs:.1f} s / {marginal_cpu:.1f} CPU s ({multi['seconds']:.1f} s for {cells} cells)",
                "",
                None,
            ),
            Check(
                NAME,
                "overhead of one more cell / a 5-min cell",
                f"{100 * long_fraction:.1f} %",
                f"< {100 * GOAL_LONG_CELL_FRACTION:g} %",
                long_fraction < GOAL_LONG_CELL_FRACTION,
            ),
            Check(
                NAME,
                f"{cells}-cell sweep: overhead per cell, amortised (T({cells}) - {cells} x T(single)) / {cells}",
                f"{amortised:.1f} s",
                "",
                None,
            ),
        ]
    result["checks"] = checks
    return result


def print_result(result: dict[str, Any]) -> None:
    rows = [
        ["sweep, 1 cell", *(f"{s:.1f}" for s in result["sweep_seconds"]), f"{result['sweep_median_seconds']:.1f}"],
        ["single process", *(f"{s:.1f}" for s in result["single_seconds"]), f"{result['single_median_seconds']:.1f}"],
    ]
    print(format_table(["command", *(f"run {i}" for i in range(len(result["sweep_seconds"]))), "median s"], rows))
    sweep_cpu = ", ".join(f"{s:.1f}" for s in result["sweep_cpu_seconds"])
    single_cpu = ", ".join(f"{s:.1f}" for s in result["single_cpu_seconds"])
    print(f"CPU s of the process tree: sweep {sweep_cpu}; single {single_cpu}")
    top = list(result["sweep_cpu_by_process"].items())[:12]
    print("sweep CPU s by process (last run): " + ", ".join(f"{name} {sec:.1f}" for name, sec in top))
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in result["sweep_phases_seconds"].items())
    print(f"sweep timeline (median, from launch): {phases}")
    print(f"in-loop train_seconds, Ray / single: {result['in_loop_train_ratio']:.2f} (noisy under load)")
    print_checks(NAME, result["checks"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="sweep/single pairs (each sweep starts Ray afresh)")
    parser.add_argument("--cells", type=int, default=3, help="also time one sweep of this many cells (<2: skip)")
    parser.add_argument("--workload-from", default="sweeps/tiny.yaml", help="spec whose workload section is the cell")
    parser.add_argument("--keep", action="store_true", help="keep the logs, specs and storage (printed path)")
    args = parser.parse_args(argv)
    result = run(args.repeats, args.cells, args.workload_from, args.keep)
    print_result(result)
    return result


if __name__ == "__main__":
    main()
