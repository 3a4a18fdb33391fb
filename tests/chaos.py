"""The chaos soak: one sweep run twice on a local multi-node cluster, once undisturbed and once under a seeded
schedule of incidents, and the second must end exactly as the first did.

Months of a long study are compressed into minutes: what happens to a sweep over three months (drivers resubmitted
by KubeRay after a head restart, spot nodes reclaimed mid-epoch, an object store unreachable for minutes, the whole
cluster replaced) happens here within one run, each incident at a point drawn from a seed.

The cluster is `tests/multinode.LocalCluster`: a head with no CPUs and 1-CPU worker nodes, each its own raylet, so
a 2-worker DDP cell spans two nodes. Storage is a moto S3 server reached by every process of the cluster through
`tests/outage_proxy.OutageProxy`, which can refuse connections for as long as an incident says; the soak itself
reads the bucket directly, so it keeps watching while the sweep cannot.

The incidents (`Incident.kind`):
- `driver`: the sweep's driver SIGKILLed and at once resubmitted as another host (its own UTS namespace), while
  the dead driver's lease is still live: the new driver must wait the lease out, then resume.
- `node`: a worker node that holds one of a cell's Train workers SIGKILLed with everything on it, its disk deleted,
  mid-epoch; a replacement node joins (a node pool replacing a reclaimed spot node).
- `storage`: S3 unreachable for `storage_outage_s` (longer than the 120 s a storage call once gave up after).
- `cluster`: every process of the cluster and the driver SIGKILLed; a new cluster (new head, new nodes) starts on
  the same storage and the sweep is resubmitted to it.

An incident fires once the sweep has registered `after_epochs` epochs in storage (all cells together), at least
one of them after the previous incident ended, and then a drawn fraction of an epoch after the latest one, so it
lands mid-epoch whatever the speed of the machine, and each incident meets a sweep that is training again.

What the run must show (`SoakRun.problems`): the last driver exits 0 with every cell finished; results.parquet
equals the undisturbed run's (evaluation accuracies equal, per-epoch losses within 1e-5 relative); no epoch is
reported twice; no checkpoint folder is left that Ray Train did not register; and no incident makes a cell train
again an epoch it had already checkpointed (each resume starts from the newest checkpoint registered before the
incident), so an incident costs at most the epoch in progress, i.e. `checkpoint_every` (1) epochs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from tests.multinode import LocalCluster
from tests.outage_proxy import OutageProxy

KINDS = ("driver", "node", "storage", "cluster")
# The full soak: three driver resubmissions, three lost nodes, one storage outage of five minutes, one new cluster.
FULL = {"driver": 3, "node": 3, "storage": 1, "cluster": 1}
# The short form CI runs: one of each.
SHORT = {"driver": 1, "node": 1, "storage": 1, "cluster": 1}
WORKER_NODES = 4  # 1 CPU each: a 2-worker cell takes two, its trial sits on a third
LOSS_RTOL = 1e-5
MAX_EPOCH_S = 60.0  # an epoch of these cells takes seconds; longer gaps are waits, not training
EPOCH_LINE = re.compile(r"cell ([0-9a-f]+) epoch (\d+)/\d+")
RESUMED = re.compile(r"cell ([0-9a-f]+) epoch \d+/\d+, resumed from epoch (\d+)")


def soak_spec(epochs: int, seeds: list[int]) -> dict[str, Any]:
    """Cells of one and of two DDP workers (batch 32 and 64 at 32 per worker), a checkpoint every epoch."""
    return {
        "name": "soak",
        "storage": "./runs",
        "workload": {
            "data": {"url": "builtin://digits"},
            "model": {"depth": 18, "norm": "bn", "width": 0.125, "stem": "small"},
            "attack": {"steps": 1},
            "recipe": {"epochs": epochs, "batch_size": 32, "per_worker_batch": 32, "base_lr": 0.4},
            "eval": {"pgd_steps": [1], "subset": 64, "batch_size": 32},
        },
        "grid": {"seed": seeds, "batch_size": [32, 64]},
        "resources": {"use_gpu": False, "cpus_per_worker": 1.0, "max_workers_per_cell": 2},
        "planning": {"train_images": 1438, "image_size": 32, "relative_speed": 0.01},
        "checkpoint_every": 1,
        "keep_checkpoints": 2,
        # Tune's retries of a trial lost with its node, per driver; enough for every node incident to hit one cell.
        "max_failures": 6,
    }


@dataclass
class Incident:
    kind: str
    after_epochs: int  # fires once the sweep has registered this many epochs, all cells together
    delay: float  # ... and then this fraction of an epoch later
    fired_at: float | None = None  # seconds since the run began
    ended_at: float | None = None
    registered: dict[str, int] = field(default_factory=dict)  # unfinished cells' newest registered epoch at firing
    partial: dict[str, float] = field(default_factory=dict)  # ... and the fraction of an epoch trained since
    resumed: dict[str, int] = field(default_factory=dict)  # cells that resumed after it: from which epoch
    note: str = ""

    def epochs_lost(self) -> float:
        """Epochs trained again because of this incident: the checkpointed epochs a cell trained again (from its
        resume line) plus the part of the epoch in progress. A driver or cluster incident ends every running
        cell's attempt, so every unfinished cell counts; a lost node ends the attempts of the cells that resumed
        after it (a cell it caught before its first checkpoint restarts with no resume line: not counted)."""
        hit = (
            self.partial if self.kind in ("driver", "cluster") else {c: self.partial.get(c, 0.0) for c in self.resumed}
        )
        if self.kind == "storage":
            hit = {}  # training waits the outage out; its cost is wall time, not epochs
        again = sum(max(0, self.registered.get(cell, 0) - start) for cell, start in self.resumed.items())
        return again + sum(hit.values())

    def retrained_checkpointed(self) -> dict[str, int]:
        return {c: self.registered[c] - s for c, s in self.resumed.items() if self.registered.get(c, 0) > s}


def schedule(seed: int, counts: dict[str, int], total_epochs: int) -> list[Incident]:
    """The incidents of `counts`, in a drawn order, at points of the sweep's progress spread over its run: the n
    incidents split most of it into n + 1 equal stretches, and each fires at a drawn point of its own stretch's
    middle third, so that every incident meets a sweep that is training and none is left for after its end."""
    rng = random.Random(seed)
    kinds = [kind for kind in KINDS for _ in range(counts.get(kind, 0))]
    rng.shuffle(kinds)
    # Over the first 80 % of the epochs: the last incident still finds cells with epochs left to train.
    stretch = 0.8 * total_epochs / (len(kinds) + 1)
    points = [max(1, round(stretch * (n + 1) + rng.uniform(-stretch / 3, stretch / 3))) for n in range(len(kinds))]
    return [Incident(kind, point, round(rng.uniform(0.3, 0.7), 2)) for kind, point in zip(kinds, points, strict=True)]


@dataclass
class Bucket:
    """The soak's bucket, read straight from moto (not through the proxy)."""

    client: Any
    name: str

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def read(self, key: str) -> bytes | None:
        try:
            return bytes(self.client.get_object(Bucket=self.name, Key=key)["Body"].read())
        except self.client.exceptions.NoSuchKey:
            return None

    def json(self, key: str) -> Any:
        body = self.read(key)
        return json.loads(body) if body is not None else None

    def table(self, key: str) -> list[dict[str, Any]]:
        body = self.read(key)
        return pq.read_table(io.BytesIO(body)).to_pylist() if body is not None else []


@dataclass
class LogWatcher:
    """The drivers' logs, line by line, each line stamped with when the soak first saw it."""

    lines: list[tuple[float, str]] = field(default_factory=list)
    _offsets: dict[Path, int] = field(default_factory=dict)

    def poll(self, logs: list[Path], now: float) -> None:
        for log in logs:
            if not log.exists():
                continue
            with open(log, "rb") as handle:
                handle.seek(self._offsets.get(log, 0))
                chunk = handle.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self._offsets[log] = self._offsets.get(log, 0) + len(complete)
            self.lines += [(now, line) for line in complete.decode(errors="replace").splitlines()]


@dataclass
class SoakRun:
    name: str
    seconds: float
    exit_code: int | None
    drivers: int
    incidents: list[Incident]
    cells: list[str]
    results: list[dict[str, Any]]
    history: list[dict[str, Any]]
    reported: dict[tuple[str, int], int]  # (cell, epoch) -> how many progress lines reported it
    orphans: list[str]
    unfinished: list[str]
    log_tail: str

    def problems(self, reference: SoakRun | None = None) -> list[str]:
        found = []
        if self.exit_code != 0:
            found.append(f"{self.name}: the last driver exited {self.exit_code}")
        if self.unfinished:
            found.append(f"{self.name}: cells not finished: {self.unfinished}")
        twice = {f"{c} epoch {e}": n for (c, e), n in self.reported.items() if n > 1}
        if twice:
            found.append(f"{self.name}: epochs reported more than once: {twice}")
        if self.orphans:
            found.append(f"{self.name}: checkpoint folders Ray Train never registered: {self.orphans}")
        for incident in self.incidents:
            if incident.fired_at is None:
                found.append(f"{self.name}: incident {incident.kind} at {incident.after_epochs} epochs never fired")
            again = incident.retrained_checkpointed()
            if again:
                found.append(f"{self.name}: {incident.kind} incident made cells retrain checkpointed epochs: {again}")
        if reference is not None:
            found += compare(reference, self)
        return found

    def summary(self) -> dict[str, Any]:
        return {
            "run": self.name,
            "seconds": round(self.seconds, 1),
            "exit_code": self.exit_code,
            "drivers": self.drivers,
            "incidents": [
                {
                    "kind": i.kind,
                    "after_epochs": i.after_epochs,
                    "fired_at_s": None if i.fired_at is None else round(i.fired_at, 1),
                    "lasted_s": None if i.ended_at is None or i.fired_at is None else round(i.ended_at - i.fired_at, 1),
                    "cells_resumed": len(i.resumed),
                    "epochs_lost": round(i.epochs_lost(), 2),
                    "note": i.note,
                }
                for i in self.incidents
            ],
        }


def compare(reference: SoakRun, disturbed: SoakRun) -> list[str]:
    """Evaluation accuracies equal; per-epoch losses within LOSS_RTOL."""
    found = []

    def accuracies(run: SoakRun) -> dict[tuple[str, str], dict[str, float]]:
        return {
            (row["cell_id"], row["branch"]): {k: v for k, v in row.items() if k.startswith("acc_")}
            for row in run.results
        }

    want, got = accuracies(reference), accuracies(disturbed)
    if set(want) != set(got):
        found.append(f"results rows differ: {sorted(set(want) ^ set(got))}")
    for key in sorted(set(want) & set(got)):
        if want[key] != got[key]:
            found.append(f"{key}: accuracies {got[key]} under incidents, {want[key]} undisturbed")
    losses = {(r["cell_id"], r["epoch"]): r["loss"] for r in reference.history}
    seen = {(r["cell_id"], r["epoch"]): r["loss"] for r in disturbed.history}
    if set(losses) != set(seen):
        found.append(f"history rows differ: {sorted(set(losses) ^ set(seen))}")
    for key in sorted(set(losses) & set(seen)):
        a, b = losses[key], seen[key]
        if a is None or b is None or abs(a - b) > LOSS_RTOL * abs(a):
            found.append(f"{key}: loss {b} under incidents, {a} undisturbed")
    return found


@dataclass
class Soak:
    """Runs the soak's sweep on fresh local clusters against one bucket; `proxy` fronts the moto server."""

    workdir: Path
    bucket: Bucket
    proxy: OutageProxy
    spec: Path
    storage_outage_s: float
    timeout_s: float = 3600.0
    poll_s: float = 0.5

    def sweep_prefix(self, run: str) -> str:
        return f"{run}/soak"

    def run(self, name: str, incidents: list[Incident]) -> SoakRun:
        """One whole sweep under `incidents` (none: the undisturbed run), on a new cluster, into `<bucket>/<name>`."""
        storage = f"s3://{self.bucket.name}/{name}"
        prefix = self.sweep_prefix(name)
        logs: list[Path] = []
        watcher = LogWatcher()
        started = time.monotonic()
        cluster = self._new_cluster()
        hosts = iter(f"soak-driver-{n}" for n in range(1, 100))

        def start_driver(cluster: LocalCluster) -> subprocess.Popen[bytes]:
            log = self.workdir / f"{name}-driver-{len(logs) + 1}.log"
            logs.append(log)
            # Every resubmission comes from another host, as KubeRay's does from a new head pod.
            return cluster.driver([str(self.spec), "--storage", storage], log, host=next(hosts))

        driver = start_driver(cluster)
        pending = sorted(incidents, key=lambda i: i.after_epochs)
        registered: dict[str, int] = {}
        registered_at: dict[str, float] = {}
        epoch_s = 10.0  # until the first two registrations of a cell say how long an epoch takes here
        quiet_until = 0.0  # when the last incident ended
        replacement = 0
        try:
            while True:
                now = time.monotonic() - started
                if now > self.timeout_s:
                    raise TimeoutError(f"{name}: not finished after {self.timeout_s:.0f} s")
                watcher.poll(logs, now)
                progress = self._registered(prefix)
                for cell, epoch in progress.items():
                    if epoch > registered.get(cell, 0):
                        # An epoch's length from two consecutive epochs of one cell, never across an incident
                        # (a storage outage or a lease wait in between is not an epoch).
                        if registered_at.get(cell, -1.0) > quiet_until and epoch == registered.get(cell, 0) + 1:
                            epoch_s = 0.8 * epoch_s + 0.2 * min(now - registered_at[cell], MAX_EPOCH_S)
                        registered[cell], registered_at[cell] = epoch, now
                code = driver.poll()
                if code is not None:
                    break
                due = pending[0] if pending else None
                if due is not None and sum(registered.values()) >= due.after_epochs:
                    # Mid-epoch, and never on the heels of the previous incident: an epoch registered after it
                    # ended says the sweep is training again.
                    since = max(registered_at.values(), default=-1.0)
                    trained = since > quiet_until
                    if trained and now - since >= due.delay * epoch_s and self._ready(due, cluster):
                        pending.pop(0)
                        due.fired_at = now
                        finished = self._finished(prefix)
                        for cell, epoch in registered.items():
                            if cell not in finished:
                                due.registered[cell] = epoch
                                due.partial[cell] = min(1.0, (now - registered_at[cell]) / epoch_s)
                        driver, cluster, replacement = self._fire(due, driver, cluster, start_driver, replacement)
                        due.ended_at = quiet_until = time.monotonic() - started
                time.sleep(self.poll_s)
            watcher.poll(logs, time.monotonic() - started)
            seconds = time.monotonic() - started
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
            cluster.destroy()
        attribute_resumes(incidents, watcher.lines)
        cells = sorted(self._cells(prefix))
        finished = self._finished(prefix)
        reported: dict[tuple[str, int], int] = {}
        for _, line in watcher.lines:
            match = EPOCH_LINE.search(line)
            if match:
                key = (match[1], int(match[2]))
                reported[key] = reported.get(key, 0) + 1
        return SoakRun(
            name=name,
            seconds=seconds,
            exit_code=code,
            drivers=len(logs),
            incidents=incidents,
            cells=cells,
            results=self.bucket.table(f"{prefix}/results.parquet"),
            history=self.bucket.table(f"{prefix}/history.parquet"),
            reported=reported,
            orphans=self._orphans(prefix, cells),
            unfinished=[c for c in cells if c not in finished],
            log_tail="\n".join(line for _, line in watcher.lines[-60:] if '" 200 -' not in line),
        )

    def _new_cluster(self) -> LocalCluster:
        cluster = LocalCluster.create()
        for n in range(1, WORKER_NODES + 1):
            cluster.add(f"w{n}", num_cpus=1)
        return cluster

    def _ready(self, incident: Incident, cluster: LocalCluster) -> bool:
        """A node incident waits until some node holds a Train worker; the others can fire at any time."""
        return incident.kind != "node" or bool(_nodes_training(cluster))

    def _fire(
        self,
        incident: Incident,
        driver: subprocess.Popen[bytes],
        cluster: LocalCluster,
        start_driver: Any,
        replacement: int,
    ) -> tuple[subprocess.Popen[bytes], LocalCluster, int]:
        if incident.kind == "driver":
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
            incident.note = "driver SIGKILLed; resubmitted as another host within the lease's TTL"
            driver = start_driver(cluster)
        elif incident.kind == "node":
            victim = sorted(_nodes_training(cluster))[0]
            killed = cluster.kill(victim)
            replacement += 1
            cluster.add(f"r{replacement}", num_cpus=1)
            incident.note = (
                f"node {victim} SIGKILLed ({len(killed)} processes), disk deleted; node r{replacement} joined"
            )
        elif incident.kind == "storage":
            outage = self.proxy.cut(self.storage_outage_s)
            while outage.ended is None:
                time.sleep(self.poll_s)
            incident.note = f"S3 unreachable for {outage.ended - outage.started:.0f} s"
        elif incident.kind == "cluster":
            cluster.destroy()  # the driver too: it runs "on the head"
            driver.wait()
            cluster = self._new_cluster()
            incident.note = "every process of the cluster and the driver SIGKILLed; a new cluster on the same storage"
            driver = start_driver(cluster)
        return driver, cluster, replacement

    def _cell_keys(self, prefix: str) -> list[tuple[str, str]]:
        """(cell id, the rest of the key) for every object under the sweep's cells/ folder."""
        base = f"{prefix}/cells/"
        found = []
        for key in self.bucket.keys(base):
            cell, _, rest = key[len(base) :].partition("/")
            if rest:
                found.append((cell, rest))
        return found

    def _cells(self, prefix: str) -> set[str]:
        return {cell for cell, _ in self._cell_keys(prefix)}

    def _finished(self, prefix: str) -> set[str]:
        return {cell for cell, rest in self._cell_keys(prefix) if rest == "result.json"}

    def _registered(self, prefix: str) -> dict[str, int]:
        """Each cell's newest epoch Ray Train has registered a checkpoint of (its last epoch once finished)."""
        found: dict[str, int] = {}
        for cell, rest in self._cell_keys(prefix):
            key = f"{prefix}/cells/{cell}/{rest}"
            if rest == "checkpoint_manager_snapshot.json":
                snapshot = self.bucket.json(key) or {}
                metrics = (snapshot.get("latest_checkpoint_result") or {}).get("metrics") or {}
                found[cell] = max(found.get(cell, 0), int(metrics.get("epoch", 0)))
            elif rest == "result.json":
                found[cell] = max(found.get(cell, 0), int((self.bucket.json(key) or {}).get("epochs", 0)))
        return found

    def _orphans(self, prefix: str, cells: list[str]) -> list[str]:
        orphans = []
        for cell in cells:
            base = f"{prefix}/cells/{cell}/"
            folders = {
                key[len(base) :].split("/")[0]
                for key in self.bucket.keys(base + "checkpoint_")
                if key.count("/") > base.count("/")
            }
            snapshot = self.bucket.json(base + "checkpoint_manager_snapshot.json") or {}
            kept = {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results") or []}
            orphans += [f"{cell}/{folder}" for folder in sorted(folders - kept)]
        return orphans


def attribute_resumes(incidents: list[Incident], lines: list[tuple[float, str]]) -> None:
    """Give each incident the resumes its cells logged after it fired and before the next one did."""
    fired = sorted((i for i in incidents if i.fired_at is not None), key=lambda i: i.fired_at or 0)
    for n, incident in enumerate(fired):
        until = fired[n + 1].fired_at if n + 1 < len(fired) else float("inf")
        for at, line in lines:
            match = RESUMED.search(line)
            if match and (incident.fired_at or 0) < at <= (until or 0) and match[1] not in incident.resumed:
                incident.resumed[match[1]] = int(match[2])


def _nodes_training(cluster: LocalCluster) -> list[str]:
    """Worker nodes with a live Ray Train worker process (its process title names the actor class)."""
    found = []
    for name in cluster.nodes:
        if name == "head":
            continue
        for pid in cluster.processes(name):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "RayTrainWorker" in title:
                found.append(name)
                break
    return found


def write_spec(folder: Path, epochs: int, seeds: list[int]) -> Path:
    path = folder / "soak.yaml"
    path.write_text(yaml.safe_dump(soak_spec(epochs, seeds), sort_keys=False))
    return path


@dataclass
class SoakReport:
    seed: int
    counts: dict[str, int]
    storage_outage_s: float
    reference: SoakRun
    runs: list[SoakRun]

    def problems(self) -> list[str]:
        found = self.reference.problems()
        for run in self.runs:
            found += run.problems(self.reference)
        return found

    def summary(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "incidents": self.counts,
            "storage_outage_s": self.storage_outage_s,
            "cells": len(self.reference.cells),
            "reference": self.reference.summary(),
            "runs": [run.summary() | {"passed": not run.problems(self.reference)} for run in self.runs],
            "problems": self.problems(),
        }


def run_soak(
    workdir: Path,
    *,
    seed: int,
    counts: dict[str, int],
    epochs: int,
    seeds: list[int],
    storage_outage_s: float,
    repeat: int = 1,
) -> SoakReport:
    """A moto server behind an outage proxy, the undisturbed run, then `repeat` runs under the incidents of
    `counts` (each run's schedule drawn from `seed + run`). Everything runs on 127.0.0.1."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's line per request would bury the soak's own
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = OutageProxy((host, port)).start()
    saved = dict(os.environ)
    try:
        # The cluster's processes inherit this environment: they reach S3 only through the proxy.
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
            os.environ.pop(var, None)
        os.environ |= {
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_ENDPOINT_URL": proxy.endpoint,
            "AWS_ACCESS_KEY_ID": "soak-access-key",
            "AWS_SECRET_ACCESS_KEY": "soak-secret-key",
            "AWS_DEFAULT_REGION": "us-east-1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        client = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
        client.create_bucket(Bucket="soak")
        spec = write_spec(workdir, epochs, seeds)
        soak = Soak(workdir, Bucket(client, "soak"), proxy, spec, storage_outage_s)
        total = epochs * len(seeds) * 2
        reference = soak.run("undisturbed", [])
        runs = []
        for n in range(repeat):
            incidents = schedule(seed + n, counts, total)
            runs.append(soak.run(f"incidents-{n + 1}", incidents))
        return SoakReport(seed, counts, storage_outage_s, reference, runs)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        proxy.close()
        server.stop()
