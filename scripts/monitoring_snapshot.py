"""Regenerate docs/monitoring.md: the Ray dashboard and the sweep's Prometheus metrics while a sweep runs.

    .venv/bin/python scripts/monitoring_snapshot.py

It starts a Ray head of its own on 127.0.0.1 (scripts/local_ray.py: free ports, its own temp dir and auth token:
token authentication stays on, and the user's ~/.ray/auth_token is neither read nor written), submits the smoke
sweep (sweeps/smoke.yaml, storage in a temporary folder) with `ray job submit --no-wait --working-dir .`, and waits
until the job is RUNNING, a Train run is RUNNING, the job's log holds an epoch line and the metrics endpoint
exports every ray_sweep_* gauge. Then it screenshots the dashboard's views with headless Chromium (Debian's
`chromium`, driven over the DevTools protocol so that it can carry the dashboard's auth cookie and wait for each
page to render), scrapes the metrics endpoint, stops the job and its Ray instance (on errors too: only the
processes of this instance, never other Ray instances on the machine), and rewrites docs/monitoring.md and the
PNGs under docs/monitoring/. Takes about three minutes on 2 CPU cores. Needs Chromium: on Debian,
`apt-get install -y chromium`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image

# Run as `python scripts/monitoring_snapshot.py`, Python puts scripts/ on sys.path, not the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.local_ray import REPO, Cluster, ray_head, sweep_entrypoint

SPEC = "sweeps/smoke.yaml"
SWEEP = "smoke"
DOC = REPO / "docs" / "monitoring.md"
IMAGE_DIR = REPO / "docs" / "monitoring"
COMMAND = ".venv/bin/python scripts/monitoring_snapshot.py"
GAUGES = ("sweep_cells", "sweep_cell_epoch", "sweep_cell_images_per_second", "sweep_cell_robust_accuracy")
TOKEN_COOKIE = "ray-authentication-token"  # what the dashboard sets after its token dialog
POLL_S = 2.0
JOB_START_TIMEOUT_S = 240.0
SWEEP_TIMEOUT_S = 900.0
PAGE_TIMEOUT_S = 90.0
MAX_PNG_BYTES = 400_000
VIEWPORT = (1600, 1000)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[monitoring_snapshot +{time.monotonic() - STARTED:5.0f}s] {message}", flush=True)


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = POLL_S) -> Any:
    """Poll `check` until it returns something truthy (returned); TimeoutError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(interval)


@dataclass
class Running:
    """The sweep as the dashboard's APIs and the metrics endpoint showed it at one moment."""

    runs: list[dict[str, Any]]  # the Train runs API's runs
    log_text: str  # the job's log
    metrics_text: str  # the metrics endpoint's page


def submit_smoke(cluster: Cluster, storage: Path) -> str:
    submission_id = f"smoke-monitoring-{secrets.token_hex(3)}"
    cluster.job(
        "submit",
        "--no-wait",
        f"--submission-id={submission_id}",
        "--working-dir=.",
        "--",
        *sweep_entrypoint(SPEC, storage),
    )
    log(f"submitted {SPEC} as job {submission_id} (storage {storage})")
    return submission_id


def job_running(cluster: Cluster, submission_id: str) -> bool:
    job = cluster.get(f"/api/jobs/{submission_id}") or {}
    if job.get("status") in ("FAILED", "STOPPED", "SUCCEEDED"):
        raise RuntimeError(f"job {submission_id} ended early: {job.get('status')} {job.get('message')}")
    return job.get("status") == "RUNNING"


def train_runs_if_running(cluster: Cluster) -> list[dict[str, Any]] | None:
    runs: list[dict[str, Any]] = (cluster.get("/api/train/v2/runs/v1") or {}).get("train_runs") or []
    return runs if any(run.get("status") == "RUNNING" for run in runs) else None


def log_if_epoch(cluster: Cluster, submission_id: str) -> str | None:
    text: str = (cluster.get(f"/api/jobs/{submission_id}/logs") or {}).get("logs", "")
    return text if re.search(rf"^\[sweep {SWEEP} \+\s*\d+s\] cell \w+ epoch \d+/\d+", text, re.MULTILINE) else None


def metrics_if_every_gauge(cluster: Cluster) -> str | None:
    text = cluster.scrape()
    return text if all(re.search(rf"^ray_{name}\{{", text, re.MULTILINE) for name in GAUGES) else None


def wait_until_running(cluster: Cluster, submission_id: str) -> None:
    """Block until the job, a Train run, the job's log and every sweep gauge show a sweep in progress."""
    wait_for("the job to be RUNNING", lambda: job_running(cluster, submission_id), JOB_START_TIMEOUT_S)
    log("job RUNNING")
    wait_for("a Train run to be RUNNING", lambda: train_runs_if_running(cluster), SWEEP_TIMEOUT_S)
    log("a Train run RUNNING")
    wait_for("an epoch line in the job's log", lambda: log_if_epoch(cluster, submission_id), SWEEP_TIMEOUT_S)
    log("an epoch reported in the job's log")
    wait_for(
        "every ray_sweep_* gauge on the metrics endpoint", lambda: metrics_if_every_gauge(cluster), SWEEP_TIMEOUT_S
    )
    log("every ray_sweep_* gauge exported")


def capture(cluster: Cluster, submission_id: str) -> Running:
    """The Train runs, the job's log and the metrics, now (the sweep still running)."""
    if not job_running(cluster, submission_id):
        raise RuntimeError(f"job {submission_id} is no longer RUNNING")
    return Running(
        runs=wait_for("a running Train run", lambda: train_runs_if_running(cluster), 60),
        log_text=wait_for("the job's log", lambda: log_if_epoch(cluster, submission_id), 60),
        metrics_text=wait_for("the metrics", lambda: metrics_if_every_gauge(cluster), 60),
    )


# --- headless Chromium over the DevTools protocol ---------------------------------------------------------


@dataclass(frozen=True)
class View:
    """One dashboard page to photograph: `route` after '#'. Once the page's text holds every `ready` string, each
    `fill` (label, text) types text into the input field of that label and presses Enter; the picture is taken
    once the text holds every `expect` string and none of `absent`, and has stopped changing. `height` is the
    viewport's height in CSS pixels: how much of the page the picture shows."""

    name: str
    route: str
    expect: tuple[str, ...]
    ready: tuple[str, ...] = ()
    fill: tuple[tuple[str, str], ...] = ()
    height: int = VIEWPORT[1]
    absent: tuple[str, ...] = ("Loading...",)


# Finds the <input> of a Material-UI text field by its label (or placeholder) and focuses it.
FOCUS_INPUT_JS = """(label => {
  const byLabel = [...document.querySelectorAll('label')].find(l => l.textContent.trim() === label);
  const input = byLabel
    ? (document.getElementById(byLabel.htmlFor) || byLabel.parentElement.querySelector('input'))
    : document.querySelector(`input[placeholder="${label}"]`);
  if (!input) return false;
  input.focus({preventScroll: true});
  return true;
})"""


class Page:
    """One Chromium tab: CDP commands over aiohttp's websocket client."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:  # events arrive in between; skip them
            message = await self.ws.receive_json(timeout=PAGE_TIMEOUT_S)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    async def text(self) -> str:
        return str(await self.evaluate("document.body ? document.body.innerText : ''") or "")

    async def wait_text(self, what: str, expect: tuple[str, ...], absent: tuple[str, ...]) -> None:
        """Until the page's text holds every `expect` string and none of `absent`, unchanged over three polls
        (numbers aside: durations and timestamps tick on)."""
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        previous, stable = "", 0
        while stable < 2:
            await asyncio.sleep(1.0)
            text = await self.text()
            ready = all(s in text for s in expect) and not any(s in text for s in absent)
            settled = re.sub(r"\d+", "#", text)
            stable = stable + 1 if ready and settled == previous else 0
            previous = settled
            if time.monotonic() > deadline:
                missing = [s for s in expect if s not in text]
                shown = [s for s in absent if s in text]
                raise TimeoutError(f"{what}: missing {missing}, showing {shown} after {PAGE_TIMEOUT_S:.0f} s")

    async def type_into(self, label: str, text: str) -> None:
        if not await self.evaluate(f"{FOCUS_INPUT_JS}({json.dumps(label)})"):
            raise RuntimeError(f"no input field labelled {label!r}")
        await self.send("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            await self.send("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)

    async def show(self, url: str, view: View) -> bytes:
        """Navigate, fill in the view's fields, wait for its content; a PNG of the viewport."""
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=VIEWPORT[0],
            height=view.height,
            deviceScaleFactor=1,
            mobile=False,
        )
        await self.send("Page.navigate", url=url)
        if view.fill:
            await self.wait_text(f"view {view.name}", view.ready, view.absent)
            for label, text in view.fill:
                await self.type_into(label, text)
            await self.evaluate("window.scrollTo(0, 0)")
        await self.wait_text(f"view {view.name}", view.expect, view.absent)
        await self.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        shot = await self.send("Page.captureScreenshot", format="png")
        return base64.b64decode(shot["data"])


async def photograph(cluster: Cluster, views: list[View]) -> dict[str, bytes]:
    """PNG bytes per view name, from a headless Chromium that carries the dashboard's auth cookie."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise RuntimeError("chromium not found: apt-get install -y chromium")
    profile = Path(tempfile.mkdtemp(prefix="chromium-mon-"))
    browser = subprocess.Popen(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        wait_for("Chromium's DevTools port", lambda: port_file.is_file() and port_file.read_text().strip(), 60, 0.2)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            page_ws = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
            async with session.ws_connect(page_ws, max_msg_size=0) as ws:
                page = Page(ws)
                await page.send(
                    "Network.setCookie", name=TOKEN_COOKIE, value=cluster.token, url=cluster.dashboard, httpOnly=True
                )
                shots = {}
                for view in views:
                    log(f"screenshot {view.name} (#{view.route})")
                    shots[view.name] = await page.show(f"{cluster.dashboard}/#{view.route}", view)
                return shots
    finally:
        with suppress(ProcessLookupError):
            os.killpg(browser.pid, signal.SIGTERM)
        try:
            browser.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(browser.pid, signal.SIGKILL)
            browser.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


def save_png(data: bytes, path: Path) -> None:
    """Write a screenshot as a palette PNG (flat UI colours survive 256 colours) within MAX_PNG_BYTES."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    while True:
        buffer = io.BytesIO()
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= MAX_PNG_BYTES or image.width <= 800:
            break
        image = image.resize((image.width * 9 // 10, image.height * 9 // 10), Image.Resampling.LANCZOS)
    path.write_bytes(buffer.getvalue())
    log(f"wrote {path.relative_to(REPO)} ({image.width}x{image.height}, {buffer.tell() // 1024} KiB)")


# --- the document -----------------------------------------------------------------------------------------


RAY_LABELS = frozenset(
    {
        "Component",
        "NodeAddress",
        "SessionName",
        "Version",
        "WorkerId",
        "otel_scope_name",
        "otel_scope_schema_url",
        "otel_scope_version",
    }
)
SAMPLE = re.compile(r"(?P<name>[A-Za-z_:][\w:]*)\{(?P<labels>.*)\} (?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def sweep_samples(metrics_text: str) -> dict[str, list[str]]:
    """The sample lines of each ray_sweep_* gauge on a Prometheus text page, by metric name."""
    found: dict[str, list[str]] = {f"ray_{name}": [] for name in GAUGES}
    for line in metrics_text.splitlines():
        match = SAMPLE.match(line)
        if match and match["name"] in found:
            found[match["name"]].append(line)
    return found


def without_ray_labels(line: str) -> str:
    """A sample line with the labels every Ray metric carries (node, session, worker...) left out."""
    match = SAMPLE.match(line)
    if match is None:
        return line
    kept = ",".join(f'{key}="{value}"' for key, value in LABEL.findall(match["labels"]) if key not in RAY_LABELS)
    return f"{match['name']}{{{kept}}} {match['value']}"


def metrics_excerpt(metrics_text: str, per_cell_gauge: int = 2) -> tuple[str, str]:
    """(one sample line as exported, an excerpt of every gauge without Ray's own labels, with HELP and TYPE)."""
    samples = sweep_samples(metrics_text)
    lines: list[str] = []
    for name, found in samples.items():
        lines += [line for line in metrics_text.splitlines() if re.match(rf"# (HELP|TYPE) {name} ", line)]
        keep = sorted(found) if name == "ray_sweep_cells" else sorted(found)[:per_cell_gauge]
        lines += [without_ray_labels(line) for line in keep]
    first = samples["ray_sweep_cells"][0] if samples["ray_sweep_cells"] else ""
    return first, "\n".join(lines)


def progress_lines(log_text: str, limit: int = 8) -> list[str]:
    return [line for line in log_text.splitlines() if line.startswith(f"[sweep {SWEEP} ")][:limit]


def run_summary(run: dict[str, Any]) -> dict[str, Any]:
    """The fields of one Train run from the Train runs API that a reader needs."""
    worker_keys = ("world_rank", "actor_id", "node_ip", "pid", "status")
    attempts = [
        {
            "status": attempt.get("status"),
            "workers": [{key: worker.get(key) for key in worker_keys} for worker in attempt.get("workers") or []],
        }
        for attempt in run.get("attempts") or []
    ]
    keys = ("name", "status", "status_detail", "job_id", "controller_actor_id", "start_time_ns", "end_time_ns")
    return {**{key: run.get(key) for key in keys}, "attempts": attempts}


# (gauge, labels, what it holds, one PromQL query, what the query shows)
GAUGE_ROWS = (
    (
        "ray_sweep_cells",
        "`sweep`, `state`",
        "cells pending, running, finished and failed",
        "sum by (sweep, state) (ray_sweep_cells)",
        'the sweep\'s progress; alert on `ray_sweep_cells{state="failed"} > 0`',
    ),
    (
        "ray_sweep_cell_epoch",
        "`sweep`, `cell_id`",
        "the last epoch a cell reported",
        f'max by (cell_id) (ray_sweep_cell_epoch{{sweep="{SWEEP}"}})',
        "how far each cell is",
    ),
    (
        "ray_sweep_cell_images_per_second",
        "`sweep`, `cell_id`",
        "training images/s of the cell's whole worker group, at its last epoch",
        f'max by (cell_id) (ray_sweep_cell_images_per_second{{sweep="{SWEEP}"}})',
        "throughput per cell, to compare cells of the same shape",
    ),
    (
        "ray_sweep_cell_robust_accuracy",
        "`sweep`, `cell_id`",
        "adversarial accuracy: on the training batches each epoch, then the final evaluation's strongest PGD",
        f'sort(max by (cell_id) (ray_sweep_cell_robust_accuracy{{sweep="{SWEEP}"}}))',
        "the least robust cells first",
    ),
)


def gauge_table() -> str:
    rows = ["| gauge | labels | value | PromQL | shows |", "|---|---|---|---|---|"]
    rows += [
        f"| `{name}` | {labels} | {what} | `{query}` | {shows} |" for name, labels, what, query, shows in GAUGE_ROWS
    ]
    return "\n".join(rows)


DOC_TEMPLATE = """\
# Monitoring a sweep

<!-- Generated by
       {command}
     which runs the smoke sweep on a local Ray instance, captures the pictures and excerpts below while it runs,
     and rewrites this file and docs/monitoring/. Do not edit by hand: edit the script and run it again. -->

While a sweep runs, its state shows in three places: the **job's log** (one line per event), the **Ray dashboard**
(the job, each cell's Train run, the cluster), and the sweep's **Prometheus gauges**. Everything below was captured
from `{spec}` submitted as a Ray job to a local 2-CPU Ray instance, between {began:.0f} and {ended:.0f} s after
submission, with {running_cells} of its {cells} cells running:

```bash
ray start --head --num-cpus=2 --metrics-export-port=8080
ray job submit --no-wait --working-dir . -- python -m orchestrator.sweep {spec} --storage /tmp/sweeps
```

For a sweep on Kubernetes, the same views are one port-forward away: see [On Kubernetes](#on-kubernetes).

## The job's log

`ray job logs -f SUBMISSION_ID` follows the driver's output (as does the job's page on the dashboard, below, and
`kubectl logs -f job/sweep-NAME` on Kubernetes). Every event is one line: `[sweep NAME +SECONDS]`, the cell's id
(also the name of its Train run and of its folder in storage), the event, and the counts of finished, running,
pending and failed cells:

```
{progress}
```

- `cell ID started: AXES`: the scheduler admitted the cell (its grid values follow) because its workers' GPUs or
  CPUs are free.
- `cell ID epoch e/E, loss L, acc_adv A, acc_clean C, N img/s`: one line per epoch with the training loss, the
  accuracy on the epoch's adversarial and clean training batches (`acc_clean` only when the cell trains on clean
  images) and the throughput of the cell's whole worker group. The cell's last line adds
  `eval main/adv/acc_pgd_N V`, the final evaluation under its strongest PGD attack.
- `cell ID finished`: its `result.json` is in storage; a sweep started again skips it.
- `(run_cell pid=P) cell ID UNSCHEDULABLE: needs W worker(s) of {{C CPU, G GPU}} but the N live node(s) (...) hold K;
  waiting up to T s for the cluster to grow`: the cell's workers fit on none of the live nodes (a GPU count
  larger than any node, a resource the cluster lacks). Printed as soon as the cell is admitted; the cell
  shows as `unschedulable` in `orchestrator.status` and fails with that reason after
  `resources.placement_timeout_s` (default 900 s) unless nodes join.
- `cell ID has reported nothing for S s: stalled or unschedulable?`: a running cell has been silent for longer
  than a paper-scale epoch takes (45 minutes), said once per silent period. Its workers may be waiting for
  resources that never come, or hung: look at its Train run and at the cluster's resources (below).
- `cell ID FAILED (see error.json in its storage folder)`: the cell's Train run failed more often than
  `max_failures` allows. The sweep goes on with the other cells; at the end the driver prints
  `FAILED cell ID (AXES): ERROR` for each failed cell and exits with status 1.

`python -m orchestrator.status STORAGE_URL/NAME` prints the same state as a table, from storage alone.

## The Ray dashboard

`ray start --head` serves it on port 8265. Token authentication is on: the dashboard asks once for the token (the
contents of `~/.ray/auth_token`, or of the file `RAY_AUTH_TOKEN_PATH` names) and keeps it in a cookie.

### Jobs

![The Jobs view: the sweep's job, RUNNING]({jobs_png})

The sweep is one job: `RUNNING` until every cell has finished or failed, then `SUCCEEDED` (every cell finished) or
`FAILED` (the driver exited with status 1 because some cells failed, or 2 for an invalid spec). The entrypoint
names the spec and the storage. The **Log** link opens the driver's log.

### The job's page

![The job's page: status, Ray Core overview and the driver's log filtered on "sweep {sweep}"]({job_png})

Click the job's id. The top shows the job's status, entrypoint and duration. **Logs > DRIVER** is the job's log;
typing `sweep NAME` (here `sweep {sweep}`) into *Keyword* keeps only the sweep's progress lines. A job that stays
`RUNNING` with no new line for a long time is what the stall warning is about.

The **Ray Core Overview** bar counts the job's Ray tasks. Its red *Failed* part grows steadily while the sweep is
healthy: Ray Tune polls each running cell's result queue with `_QueueActor.get` calls that end with
`ray.util.queue.Empty` when nothing new has arrived, and Ray counts each as a failed task. A failing cell shows
instead as a `FAILED` line in the log, an `ERRORED` Train run and `ray_sweep_cells{{state="failed"}}`.

### Train runs

![The Actors view filtered on the class "Train": each running cell's TrainController and RayTrainWorkers]({actors_png})

Every cell is one Ray Train run, named by its cell id. Ray {ray_version}'s dashboard has no page of its own for
Train runs; they show in the **Actors** view. Type `Train` into *Class*: each running cell has one
`TrainController` and one `RayTrainWorker` per training worker (DDP rank), and the cluster one `TrainStateActor`
that keeps the runs' state. `ALIVE` workers are training. A worker that turns `DEAD` while its cell runs has failed;
Train restarts the cell's worker group from its last checkpoint, which counts against `max_failures`. The **Log**
link of a `RayTrainWorker` shows what that rank printed.

The runs' state is in the dashboard's Train API, `GET /api/train/v2/runs/v1` (send the token as
`Authorization: Bearer TOKEN`). One of its {runs} runs, shortened:

```json
{run}
```

`name` is the cell id; `controller_actor_id` and the workers' `actor_id` are the actors above. A run's `status` goes
`INITIALIZING`, `SCHEDULING` (waiting for its workers' resources), `RUNNING`, then `FINISHED`, `ERRORED` or
`ABORTED`; `RESTARTING` follows a worker failure. A run that stays `SCHEDULING` waits for GPUs or CPUs: on an
autoscaling cluster, for a node to be added.

### Cluster status

![The Overview: recent jobs, and the cluster status of the autoscaler]({overview_png})

The **Overview** shows the cluster's nodes (*Node Status*: active, pending, recently failed) and its resources
(*Resource Status*: CPUs and GPUs in use, and *Pending Demands*). Every running cell reserves its workers' CPUs
and GPUs in a placement group, so CPU or GPU use near the total is what a busy sweep looks like. Pending demands
that stay while no node is pending mean the cluster cannot grow to what a cell needs (on Kubernetes: the worker
group's `maxReplicas`, or GPU nodes that never arrive).

The **Metrics** view, and the charts on the Overview, need Prometheus and Grafana; without them they show how to
set them up, as here. The sweep's gauges do not depend on them: they are on every node's metrics port (next
section). On Kubernetes, see `RAY_PROMETHEUS_HOST` and `RAY_GRAFANA_HOST` in
[docs/kubernetes.md](kubernetes.md#monitoring).

## Prometheus metrics

The driver publishes four gauges through `ray.util.metrics` (`orchestrator/progress.py`). Ray exports them with
its `ray_` prefix on the metrics port of the node the driver runs on (`ray start --metrics-export-port`; 8080 on
Kubernetes, where the driver runs on the head), and the driver sets them again every few seconds so that they stay
present while nothing happens. Each sample carries Ray's own labels too, as in this one, scraped from
`http://127.0.0.1:PORT/metrics` while the sweep ran:

```
{full_line}
```

The sweep's gauges from the same scrape, without Ray's own labels (`Component`, `NodeAddress`, `SessionName`,
`Version`, `WorkerId` and `otel_scope_*`):

```
{metric_lines}
```

{table}

What to look for:

- `ray_sweep_cells{{state="running"}}` tells how many cells the cluster holds at once; fewer than expected means
  cells wait for resources (see *Cluster status*). `state="failed"` above zero means some cell has failed for good.
- A cell whose `ray_sweep_cell_epoch` stops growing while it is counted as running is stalled: the log says so
  too, after 45 minutes.
- Throughput that differs between cells of the same shape (same depth, batch size and PGD steps) points at a slow
  node or at workers of one cell spread over several nodes.
- A finished cell keeps its last values, so sums over cells do not give the cluster's current throughput. When
  the driver is gone, all of the sweep's series disappear.

## On Kubernetes

The same views for a sweep deployed as in [docs/kubernetes.md](kubernetes.md), here the RayJob `sweep-ablation`:

```bash
kubectl port-forward svc/sweep-ablation-head-svc 8265:8265 8080:8080   # the dashboard and the head's metrics
CLUSTER=$(kubectl get rayjob sweep-ablation -o jsonpath='{{.status.rayClusterName}}')
kubectl get secret "$CLUSTER" -o jsonpath='{{.data.auth_token}}' | base64 -d; echo   # the dashboard's token
curl -s localhost:8080/metrics | grep '^ray_sweep_'                         # the driver runs on the head
kubectl logs -f job/sweep-ablation                                          # the job's log
```

Open http://localhost:8265 and paste the token. For Prometheus, `deploy/monitoring` holds two PodMonitors
(`kubectl apply -n NAMESPACE -k deploy/monitoring`, with the Prometheus operator) that scrape the `metrics` port
of every sweep cluster's head and workers and copy the pod's `ray.io/cluster` label to `ray_io_cluster`, so every
query above also works per cluster, e.g. `sum by (ray_io_cluster, state) (ray_sweep_cells)`. Details, and how to
fill the dashboard's Metrics view from that Prometheus: [docs/kubernetes.md, Monitoring](kubernetes.md#monitoring).
"""


def write_doc(running: Running, seconds: tuple[float, float], images: dict[str, str]) -> None:
    """docs/monitoring.md from the captured state; `seconds`: when capturing began and ended, after submission."""
    import ray

    full_line, excerpt = metrics_excerpt(running.metrics_text)
    running_runs = [run for run in running.runs if run.get("status") == "RUNNING"]
    cells = re.search(rf"sweep {SWEEP}: (\d+) cells", running.log_text)
    lines = progress_lines(running.log_text, limit=10_000)
    counts = re.search(r"\((\d+) finished, (\d+) running, (\d+) pending, (\d+) failed\)$", lines[-1])
    text = DOC_TEMPLATE.format(
        command=COMMAND,
        spec=SPEC,
        sweep=SWEEP,
        began=seconds[0],
        ended=seconds[1],
        cells=cells.group(1) if cells else "?",
        running_cells=counts.group(2) if counts else "?",
        ray_version=ray.__version__,
        progress="\n".join(progress_lines(running.log_text)),
        runs=len(running.runs),
        run=json.dumps(run_summary(running_runs[0]), indent=2),
        full_line=full_line,
        metric_lines=excerpt,
        table=gauge_table(),
        **{f"{name}_png": path for name, path in images.items()},
    )
    DOC.write_text(text)
    log(f"wrote {DOC.relative_to(REPO)}")


def views(submission_id: str) -> list[View]:
    return [
        View("jobs", "/jobs", expect=(submission_id, "RUNNING"), height=620),
        View(
            "job",
            f"/jobs/{submission_id}",
            ready=("Keyword",),
            # Not "[sweep": the dashboard (2.60) drops the rest of a log token that starts with the keyword.
            fill=(("Keyword", f"sweep {SWEEP}"),),
            expect=("RUNNING", submission_id, " epoch 1/"),
            height=1200,
        ),
        View(
            "actors",
            "/actors",
            ready=("Class",),
            fill=(("Class", "Train"),),
            expect=("TrainController", "RayTrainWorker", "TrainStateActor", "ALIVE"),
            height=860,
        ),
        View("overview", "/overview", expect=("Recent jobs", submission_id, "Resource Status", "Total Usage")),
    ]


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # runs the `finally` blocks: the job and the Ray instance are stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    storage = Path(tempfile.mkdtemp(prefix="sweep-mon-storage-"))
    try:
        with ray_head(prefix="ray-mon-", markers=(str(storage),), log=log) as cluster:
            submitted = time.monotonic()
            submission_id = submit_smoke(cluster, storage)
            try:
                wait_until_running(cluster, submission_id)
                began = time.monotonic() - submitted
                shots = asyncio.run(photograph(cluster, views(submission_id)))
                running = capture(cluster, submission_id)
                seconds = (began, time.monotonic() - submitted)
            finally:
                with suppress(RuntimeError, subprocess.TimeoutExpired):
                    cluster.job("stop", submission_id, timeout=60)
                    log(f"stopped job {submission_id}")
        IMAGE_DIR.mkdir(parents=True, exist_ok=True)
        for stale in set(IMAGE_DIR.glob("*.png")) - {IMAGE_DIR / f"{name}.png" for name in shots}:
            stale.unlink()
        images = {}
        for name, data in shots.items():
            path = IMAGE_DIR / f"{name}.png"
            save_png(data, path)
            images[name] = path.relative_to(DOC.parent).as_posix()
        write_doc(running, seconds, images)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
