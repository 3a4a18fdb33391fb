"""Run the fault matrix and rewrite docs/reliability.md with what passed.

    .venv/bin/python scripts/reliability_report.py [--repeat N] [--rows TEXT]

Each row of the matrix names the tests that exercise it (real Ray, a moto S3 server on 127.0.0.1, real faults);
the whole set runs N times, each run in a fresh pytest process, and the document records per row how many test
runs passed. `--rows TEXT` (repeatable) runs only the rows whose fault or tests name TEXT (case-insensitive); the
other rows keep the counts the document already holds. The spec parser's property-based tests run once more with
Hypothesis' statistics on, and the document records how many generated examples went through the parser with no
traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.chaos_soak import saved_section  # noqa: E402 - the repository root first

DOC = ROOT / "docs" / "reliability.md"
COMMAND = ".venv/bin/python scripts/reliability_report.py"
FAULTS = "tests/test_faults_ray.py"
NODES = "tests/test_multinode_ray.py"
AUTOSCALING = "tests/test_autoscaling_ray.py"


@dataclass(frozen=True)
class Row:
    fault: str
    expected: str
    tests: tuple[str, ...]  # pytest node ids (a file stands for all of its tests)


MATRIX = (
    Row(
        "SIGKILL one Train worker mid-epoch",
        "cell resumes from its last checkpoint, finishes; metrics continue",
        (f"{FAULTS}::test_sigkill_of_one_train_worker_mid_epoch_resumes_from_the_last_checkpoint",),
    ),
    Row(
        "SIGKILL the driver, resubmit",
        "finished cells skipped, running cells resume, no duplicate rows",
        ("tests/test_sweep_kill.py",),
    ),
    Row(
        "S3 server stopped for 20 s mid-checkpoint",
        "retried; no lost or corrupt checkpoint; sweep finishes",
        (f"{FAULTS}::test_s3_outage_mid_checkpoint_is_retried_and_loses_nothing",),
    ),
    Row(
        "corrupt the latest checkpoint file",
        "falls back to the previous one, warns, finishes",
        (f"{FAULTS}::test_corrupt_latest_checkpoint_falls_back_to_the_previous_one",),
    ),
    Row(
        "two drivers on one sweep",
        "second refuses with a clear message; no interference",
        ("tests/test_lease.py",),
    ),
    Row(
        "NaN loss injected",
        'that cell fails with reason "non-finite loss"; others finish; exit 1',
        (f"{FAULTS}::test_non_finite_loss_fails_that_cell_and_the_others_finish",),
    ),
    Row(
        "impossible resource request at run time",
        "reported as unschedulable within a minute, not a silent hang",
        (
            f"{FAULTS}::test_impossible_resource_request_is_reported_unschedulable_not_left_pending",
            "tests/test_placement.py",
        ),
    ),
    Row(
        "SIGKILL the node of Train rank 1 mid-epoch (its raylet and every process on it, its disk deleted)",
        "worker group restarts on the nodes left, resumes from the last checkpoint; earlier epochs reported once",
        (f"{NODES}::test_losing_the_node_of_rank_1_mid_epoch_resumes_on_the_nodes_left",),
    ),
    Row(
        "SIGKILL the node of a cell's Tune trial and Train controller mid-epoch",
        "trial restarts on another node, resumes from the last checkpoint; sweep exits 0",
        (f"{NODES}::test_losing_the_node_of_the_trial_and_its_train_controller_resumes_the_cell",),
    ),
    Row(
        "a cell's DDP workers on different nodes, S3 the only shared storage; the whole cluster lost mid-sweep",
        "ranks on distinct nodes, no node opens another's files; on a new cluster (new head, same S3) finished "
        "cells are skipped, the interrupted one resumes; the model equals the same cell trained on one node",
        (f"{NODES}::test_cells_span_nodes_and_a_new_cluster_finishes_the_sweep_as_one_node_would",),
    ),
    Row(
        "GPU cell on an autoscaling cluster with no GPU node (fake multi-node provider)",
        "cell waits for the autoscaler, a GPU node is launched, the cell runs there, the idle node is removed",
        (f"{AUTOSCALING}::test_a_gpu_cell_gets_a_node_from_the_autoscaler_and_the_idle_node_goes_away",),
    ),
    Row(
        "cell larger than the autoscaler can ever offer",
        "refused before any trial (more than the autoscaler's total, on the fake provider); fails at once naming "
        "the node types when no node type holds one worker (the trial's check, given node types as data)",
        (
            f"{AUTOSCALING}::test_a_cell_needing_more_gpus_than_the_autoscaler_ever_has_is_refused_before_any_trial",
            f"{AUTOSCALING}::test_a_cell_the_autoscaler_can_serve_waits_and_one_it_cannot_fails_at_once",
            f"{AUTOSCALING}::test_beyond_autoscaler",
        ),
    ),
    Row(
        "every bad-input case",
        "exit 2, message names the field, no traceback",
        ("tests/test_cli.py", "tests/test_spec.py", "tests/test_spec_fuzz.py"),
    ),
    Row(
        "test credentials in any output",
        "absent from every log line, error, stored file and S3 object of the fault runs, and Ray's session logs",
        (f"{FAULTS}::test_nothing_the_runs_wrote_or_printed_holds_the_test_credentials", "tests/test_redact.py"),
    ),
    Row(
        "chaos soak, short form: a driver resubmitted as another host, a node SIGKILLed mid-epoch, S3 cut for "
        "130 s, the whole cluster replaced, in a seeded order",
        "results equal the undisturbed run's; no epoch reported twice; no orphaned checkpoint; no checkpointed "
        'epoch trained again (the full soak: "The chaos soak" below)',
        ("tests/test_chaos_soak.py",),
    ),
)


MECHANISMS = """## What makes these pass

- **Crash-consistent storage.** `result.json`, `error.json`, `spec.yaml` and `results.parquet` are written whole
  and then published (a rename on a filesystem, a single PUT on S3). A checkpoint is saved locally, then uploaded
  by the worker's upload thread; Ray Train registers it only once the upload has completed. On resume the newest
  checkpoint that loads is used; an unreadable one is skipped with `warning: checkpoint ... is unreadable`.
- **Retries with limits.** Storage calls (the driver's, the data reader's, the checkpoint upload and download)
  retry connection errors, timeouts, throttling and 5xx with exponential backoff and jitter for up to
  `storage_outage_tolerance_s` (default an hour), so training waits out an outage; the log says so at once
  (`storage: unreachable for N s (...); retrying for up to M s more`) and then once a minute, and the dashboard's
  "Storage unreachable" panel charts it (`sweep_storage_unreachable_seconds`). Past the tolerance the cell is
  queued again like a cell whose node was lost, and the sweep goes on. A lost worker restarts the cell's worker
  group from its last checkpoint up to `max_failures` times.
  A non-finite loss fails the cell with `non-finite loss`.
- **One driver per sweep.** A lease in storage with a heartbeat; a second driver refuses a holder that renews it
  and names it, waits out one that stopped renewing (a dead driver), and `--takeover` lets a new driver in at once.
- **Stuck detection.** A cell whose workers fit on no live node is logged as `UNSCHEDULABLE` as soon as it is
  admitted and shown as `unschedulable` by `orchestrator.status`; the autoscaler (when the deployment sets
  `SWEEP_AUTOSCALER_MAX_*`) is asked for the room; the cell fails after `resources.placement_timeout_s`. On a
  cluster whose autoscaler reports its node types, a cell they can hold waits for the autoscaler instead, with no
  time limit (a preempted node's replacement may be slow; said in the log every 10 minutes), while the pending
  cells that fit the rest of the autoscaler's budget start meanwhile; one they can never hold fails at once with
  the node types named. A running cell silent
  for 45 minutes is said so in the log.
- **Nodes come and go.** Nothing a cell needs lives on a node's disk: data, checkpoints and results are in the
  sweep's storage, and a restarted worker group reads its checkpoint from there. A lost node takes its workers
  with it and Ray Train restarts the worker group on the nodes left, up to `max_failures` times. A Train
  controller lost with its node leaves its worker placement group reserved on a cluster without a dashboard
  (Ray Train's own cleaner needs the State API, ray-project/ray#58515): before a cell's workers are placed, the
  trial removes placement groups whose Train controller is dead (`orchestrator/ray_compat.py`). A lost *trial*
  (its node gone, and the cell's Train controller with it) is run again by Tune and resumes from the cell's
  checkpoints in storage, after a backoff (15 s doubling per consecutive loss, at most 10 minutes); the cell's
  attempts are counted in storage (`cells/<id>/attempts.json`), so `max_failures` losses bound it across every
  driver and cluster. A cell that fails on its own (unschedulable, a non-finite loss, its worker restarts spent)
  ends its trial with the failure recorded and is never run again.
- **Secrets.** Credentials come from the environment or the pod's Secret only; the spec rejects inline
  credentials; stored and printed errors are redacted; Ray Tune's habit of copying `AWS_*` variables into trial
  runtime environments (which Ray's runtime-env agent logs) is switched off.
"""


def _pytest(args: list[str], junit: Path) -> tuple[int, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr


def _outcomes(junit: Path) -> dict[str, bool]:
    """'path::name' (parameters stripped) -> passed, from a JUnit XML report; several cases of one name all
    have to pass."""
    passed: dict[str, bool] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/") + ".py"
        name = re.sub(r"\[.*\]$", "", case.get("name", ""))
        ok = not any(child.tag in ("failure", "error", "skipped") for child in case)
        key = f"{module}::{name}"
        passed[key] = passed.get(key, True) and ok
    return passed


def _row_of(test: str, row: Row) -> bool:
    return any(test == t or (("::" not in t) and test.startswith(t + "::")) for t in row.tests)


def run_matrix(repeat: int, rows: tuple[Row, ...] = MATRIX) -> tuple[dict[str, Counter[str]], list[float]]:
    # Whole files, in file order: the credentials check is the last test of the fault module and reads what the
    # tests before it printed and stored.
    tests = list(dict.fromkeys(t.split("::")[0] for row in rows for t in row.tests))
    tally: dict[str, Counter[str]] = {row.fault: Counter() for row in rows}
    seconds = []
    for attempt in range(1, repeat + 1):
        with tempfile.TemporaryDirectory() as tmp:
            junit = Path(tmp) / "junit.xml"
            started = time.monotonic()
            code, output = _pytest(tests, junit)
            seconds.append(time.monotonic() - started)
            summary = output.strip().splitlines()[-1] if output.strip() else "(no output)"
            print(f"run {attempt}/{repeat}: exit {code}, {summary} ({seconds[-1]:.0f} s)", flush=True)
            if code != 0:  # what failed and why, without the captured logs
                print("\n".join(line for line in output.splitlines() if line.startswith(("E ", "FAILED", "ERROR"))))
            if not junit.exists():
                raise SystemExit(f"pytest wrote no report:\n{output[-3000:]}")
            for test, ok in _outcomes(junit).items():
                for row in rows:
                    if _row_of(test, row):
                        tally[row.fault]["passed" if ok else "failed"] += 1
    return tally, seconds


def hypothesis_examples() -> tuple[int, int, str]:
    """(examples run without a failure, property tests, pytest's summary line) for the spec fuzzing."""
    with tempfile.TemporaryDirectory() as tmp:
        code, output = _pytest(["tests/test_spec_fuzz.py", "--hypothesis-show-statistics"], Path(tmp) / "j.xml")
    # Hypothesis' statistics: "- 300 passing, 0 failing, and 33 invalid test cases" per property test.
    stats = re.findall(r"(\d+) passing, (\d+) failing", output)
    counts = [int(passing) for passing, _ in stats]
    failing = sum(int(failed) for _, failed in stats)
    summary = output.strip().splitlines()[-1]
    if code != 0 or failing:
        raise SystemExit(f"the spec fuzzing failed:\n{output[-3000:]}")
    return sum(counts), len(counts), summary


def previous_counts(document: str) -> dict[str, Counter[str]]:
    """Each row's passed/failed test runs as a document written by `render` records them (fault -> counts)."""
    counts: dict[str, Counter[str]] = {}
    for fault, passed, total in re.findall(r"^\| (.+?) \| .*\| (\d+)/(\d+) \| (?:PASS|FAIL) \|$", document, re.M):
        counts[fault] = Counter(passed=int(passed), failed=int(total) - int(passed))
    return counts


def render(tally: dict[str, Counter[str]], seconds: list[float], repeat: int, examples: tuple[int, int, str]) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    for row in MATRIX:
        counts = tally.get(row.fault, Counter())
        total = counts["passed"] + counts["failed"]
        tests = "<br>".join(f"`{t}`" for t in row.tests)
        verdict = "PASS" if total and not counts["failed"] else "FAIL"
        rows.append(f"| {row.fault} | {row.expected} | {tests} | {counts['passed']}/{total} | {verdict} |")
    total_examples, properties, summary = examples
    minutes = ", ".join(f"{s / 60:.1f}" for s in seconds)
    return "\n".join(
        [
            "# Reliability",
            "",
            f"Generated by `{COMMAND} --repeat {repeat}` on {now}; do not edit by hand, run the command again.",
            "",
            "## The fault matrix",
            "",
            f"The tests of the rows run last ran {repeat} time(s), each run a fresh pytest process (minutes per run:",
            f"{minutes}); rows left out of a run (`--rows`) keep their counts from the run before. They run against",
            "real Ray (one local instance, or several raylets on this machine as the nodes of one cluster, or an",
            "autoscaling cluster of Ray's fake multi-node provider) and a moto S3 server on 127.0.0.1; the faults are",
            "real (a SIGKILL of a live process or of every process of a node, a closed port, a truncated file),",
            "injected through `SWEEP_INJECT_FAULT` or done by the test itself. *passed* counts test runs: a row with",
            "three tests run twice has six (a parametrized test counts once, and passes only if all its cases do).",
            "",
            "| fault | expected | tests | passed | result |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "## Input hardening",
            "",
            f"The spec parser's {properties} property-based tests (`tests/test_spec_fuzz.py`, Hypothesis) fed it "
            f"{total_examples:,} generated",
            "documents and dictionaries in one run (arbitrary text, arbitrary YAML values, a valid spec with one value",
            "replaced or a key added anywhere): every one ended in a valid spec or a `SpecError` with a message, never",
            f"a traceback or a hang (pytest: {summary}).",
            "",
            saved_section(),
            MECHANISMS,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/reliability_report.py", description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs of the whole matrix (default 1)")
    parser.add_argument("--no-write", action="store_true", help="print the document instead of writing it")
    parser.add_argument(
        "--rows",
        action="append",
        default=[],
        help="run only the rows whose fault or test names contain this text (repeatable); keep the others' counts",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    selected = tuple(
        row
        for row in MATRIX
        if not args.rows or any(text.lower() in " ".join([row.fault, *row.tests]).lower() for text in args.rows)
    )
    if not selected:
        parser.error(f"--rows {args.rows} matches no row")
    carried = previous_counts(DOC.read_text()) if len(selected) < len(MATRIX) and DOC.exists() else {}
    tally, seconds = run_matrix(args.repeat, selected)
    tally = {**{row.fault: carried.get(row.fault, Counter()) for row in MATRIX}, **tally}
    examples = hypothesis_examples()
    text = render(tally, seconds, args.repeat, examples)
    if args.no_write:
        print(text)
    else:
        DOC.write_text(text)
        print(f"wrote {DOC.relative_to(ROOT)}")
    failed = [fault for fault, counts in tally.items() if counts["failed"] or not counts["passed"]]
    for fault in failed:
        print(f"FAILED row: {fault}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
