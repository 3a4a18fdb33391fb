"""Many machines for real (issue 15), on one: a head and 1-CPU worker nodes, each its own raylet with its own temp
folders (tests/multinode.py), S3 (the session's moto server) the only storage they share, and nodes lost the way
spot nodes are: SIGKILL of the raylet and everything on it, its disk gone with it.

How cells reach nodes here, through the product's own resources only: every worker node declares 1 CPU and a
cell's workers ask for 1 CPU each (`resources.cpus_per_worker`), so one Train worker fills a node; the head
declares none (as a KubeRay head does), so no worker runs there, and a cell's Tune trial (0.01 CPU) with its
Train controller (pinned to the trial's node) can only sit on a node with no worker. A 2-worker cell therefore
always spans two nodes, and its trial sits on a third. Which rank and which actor ended up where is read from
Ray itself: Ray Train's state actor records every worker's rank, node id and pid, the GCS every actor's node.

Every Python process of the cluster runs with an audit hook (tests/multinode.py) that records any file it opens
in another node's folders; each test ends by asserting that there were none.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
import yaml
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

from orchestrator.grid import expand
from orchestrator.spec import load_spec
from tests.multinode import LocalCluster, actor_node, dump, running_attempt, train_attempts, wait_for
from workloads.faults import FAULT_ENV

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.fault]

T = TypeVar("T")
WORKER_NODES = ("w1", "w2", "w3")
RUN_TIMEOUT_S = 600.0  # a node lost, a worker group restarted, on 2 shared cores: minutes, not seconds


def spec_dict(name: str, seeds: list[int], *, epochs: int) -> dict[str, Any]:
    """Two DDP workers per cell (global batch 64 = 2 x 32), one per node; a checkpoint every epoch."""
    return {
        "name": name,
        "storage": "./runs",
        "workload": {
            "data": {"url": "builtin://digits"},  # converted into the sweep's S3 storage by the driver
            "model": {"depth": 18, "norm": "bn", "width": 0.125, "stem": "small"},
            "attack": {"steps": 1},
            "recipe": {"epochs": epochs, "batch_size": 64, "per_worker_batch": 32, "base_lr": 0.4},
            "eval": {"pgd_steps": [1], "subset": 32, "batch_size": 32},
        },
        "grid": {"seed": seeds},
        "resources": {"use_gpu": False, "cpus_per_worker": 1.0, "max_workers_per_cell": 2},
        "planning": {"train_images": 1438, "image_size": 32, "relative_speed": 0.01},
        "checkpoint_every": 1,
        "keep_checkpoints": 4,
        "max_failures": 2,
    }


def write_spec(folder: Path, spec: dict[str, Any]) -> Path:
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cell_ids(spec: Path) -> dict[int, str]:
    cells = expand(load_spec(spec))
    assert all(cell.num_workers == 2 for cell in cells)
    return {cell.axes["seed"]: cell.cell_id for cell in cells}


def epoch_lines(log: str, cell_id: str) -> list[int]:
    """Epochs in the driver's progress lines for a cell, in the order they were reported."""
    return [int(e) for e in re.findall(rf"cell {cell_id} epoch (\d+)/", log)]


@dataclass
class Bucket:
    """The test's bucket, read straight from moto."""

    client: Any
    name: str

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def read(self, key: str) -> bytes | None:
        try:
            return bytes(self.client.get_object(Bucket=self.name, Key=key)["Body"].read())
        except self.client.exceptions.NoSuchKey:
            return None

    def json(self, key: str) -> Any | None:
        body = self.read(key)
        return json.loads(body) if body is not None else None

    def registered(self, cell_dir: str) -> dict[str, Any]:
        """Metrics of the latest checkpoint Ray Train has registered for a cell ({} before the first)."""
        snapshot = self.json(f"{cell_dir}/checkpoint_manager_snapshot.json") or {}
        return dict((snapshot.get("latest_checkpoint_result") or {}).get("metrics") or {})

    def states(self, cell_dir: str) -> dict[int, dict[str, Any]]:
        """Every checkpoint's training state of a cell, by epoch."""
        found = {}
        for key in self.keys(f"{cell_dir}/checkpoint_"):
            if key.endswith("/state.pt"):
                state = torch.load(io.BytesIO(self.read(key) or b""), map_location="cpu", weights_only=False)
                found[int(state["epoch"])] = state
        return found


@pytest.fixture
def bucket(s3_server: str, s3_bucket: str) -> Bucket:
    import boto3

    return Bucket(boto3.client("s3", endpoint_url=s3_server), s3_bucket.removeprefix("s3://"))


@dataclass
class Clusters:
    """The module's cluster; a test may replace it with a new one (the old one is then gone)."""

    current: LocalCluster

    def start(self) -> LocalCluster:
        import ray

        cluster = LocalCluster.create()
        self.current = cluster
        ray.init(address=cluster.address)  # this process watches: Ray Train's state actor, the GCS's tables
        return cluster


@pytest.fixture(scope="module")
def clusters(s3_server: str) -> Iterator[Clusters]:
    # s3_server first: the nodes' processes inherit the stand-in's endpoint and credentials from this process.
    holder = Clusters(current=None)  # type: ignore[arg-type]
    try:
        cluster = holder.start()
        for name in WORKER_NODES:
            cluster.add(name, num_cpus=1)
        yield holder
    finally:
        if holder.current is not None:
            holder.current.destroy()


def running(driver: subprocess.Popen[bytes], log: Path, what: str, check: Callable[[], T | None]) -> T:
    """Wait for `check` while the sweep's driver runs; fail at once (with its log) if the driver ends first."""

    def ready() -> T | None:
        assert driver.poll() is None, f"the driver exited ({driver.returncode}) before {what}:\n{tail(log)}"
        return check()

    return wait_for(what, ready, RUN_TIMEOUT_S)


def finish(driver: subprocess.Popen[bytes], log: Path) -> int:
    try:
        return driver.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        driver.kill()
        raise AssertionError(f"the driver did not finish in {RUN_TIMEOUT_S:.0f} s:\n{tail(log)}") from None


def tail(log: Path) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    # moto's request lines are not the driver's; leave them out of failure messages.
    return "\n".join(line for line in text.splitlines() if '" 200 -' not in line)[-5000:]


def placed(cluster: LocalCluster, ranks: dict[int, str]) -> dict[int, str]:
    return {rank: cluster.name_of(node_id) for rank, node_id in sorted(ranks.items())}


def held_mid_epoch(driver: subprocess.Popen[bytes], log: Path, bucket: Bucket, cell_dir: str, marker: Path) -> None:
    """Return once rank 1 holds halfway through epoch 2 (the "hold" fault of workloads.faults, which creates
    `marker`), with epoch 1's checkpoint registered: the node can be lost mid-epoch however fast epochs run."""

    def held() -> bool:
        # Train registers a checkpoint after the workers have gone on: wait for epoch 1's to be registered too.
        return marker.exists() and bucket.registered(cell_dir).get("epoch") == 1

    running(driver, log, "rank 1 held halfway through epoch 2, epoch 1's checkpoint registered", held)


def lose_a_node_mid_epoch(
    clusters: Clusters, bucket: Bucket, tmp_path: Path, name: str, seed: int, victim_of: Callable[[Any], str]
) -> dict[str, Any]:
    """Run a 3-epoch 2-worker cell, lose the node `victim_of(first attempt)` names halfway through epoch 2, let a
    new node join (the node pool replacing it), and check what the sweep did. Returns what was seen."""
    cluster = clusters.current
    spec = write_spec(tmp_path, spec_dict(name, [seed], epochs=3))
    (cell,) = cell_ids(spec).values()
    cell_dir = f"study/{name}/cells/{cell}"
    log = tmp_path / "driver.log"
    # Rank 1 holds halfway through epoch 2 until its process dies; the marker file (test instrumentation on this
    # machine's disk, not data the nodes share) says it got there, and keeps a retried attempt from holding.
    marker = tmp_path / "held"
    fault = {"seed": seed, "epoch": 2, "kind": "hold", "rank": 1, "once_file": str(marker)}
    # What `ray job submit --runtime-env-json` hands a driver: the job's runtime env, which its workers inherit.
    job = {RAY_JOB_CONFIG_JSON_ENV_VAR: json.dumps({"runtime_env": {"env_vars": {FAULT_ENV: json.dumps(fault)}}})}
    started = time.monotonic()
    driver = cluster.driver([str(spec), "--storage", f"{bucket.url}/study"], log, env=job)
    try:
        first = running(driver, log, "the cell's workers", lambda: running_attempt(cell, 2))
        ranks = placed(cluster, first.ranks)
        controller = cluster.name_of(actor_node(first.controller_actor_id) or "")
        # One worker fills a node: the ranks are on two different worker nodes, the trial and its controller on
        # a third; the head runs none of them.
        assert len(set(ranks.values())) == 2 and "head" not in ranks.values(), ranks
        assert controller not in {*ranks.values(), "head"}, (controller, ranks)
        victim = victim_of({"ranks": ranks, "controller": controller})
        held_mid_epoch(driver, log, bucket, cell_dir, marker)
        lost_at = time.monotonic() - started
        killed = cluster.kill(victim)
        cluster.add(f"{victim}r", num_cpus=1)  # short: Ray's socket paths under the node's folder must stay < 108 bytes
        code = finish(driver, log)
    finally:
        if driver.poll() is None:
            driver.kill()
    output = log.read_text(errors="replace")
    seconds = time.monotonic() - started
    attempts = [a for a in train_attempts() if a.run_name == cell]
    last = attempts[-1]
    summary = {
        "first attempt": ranks,
        "controller": controller,
        "lost": victim,
        "processes killed": len(killed),
        "lost at s": round(lost_at),
        "attempts": [(a.status, placed(cluster, a.ranks)) for a in attempts],
        "seconds": round(seconds),
        "trial retried": f"cell {cell} lost its trial" in output,
    }
    print(f"\n{name}: {dump(summary)}")
    # The progress counts stay whole through a retried trial (each line ends "(F finished, R running, ...)").
    assert not re.search(r"-\d+ (finished|running|pending|failed)", output), tail(log)
    assert code == 0, tail(log)
    result = bucket.json(f"{cell_dir}/result.json")
    assert result is not None and result["status"] == "finished" and result["epochs"] == 3, result
    # Lost halfway through epoch 2: that epoch is trained again from epoch 1's checkpoint, read from S3.
    assert result["resumed_from_epoch"] == 1, (result, summary)
    seen = epoch_lines(output, cell)
    assert set(seen) == {1, 2, 3} and seen.count(1) == 1 and seen[-1] == 3, seen
    # Nothing lost: a readable checkpoint for every epoch, the last one the finished model.
    assert sorted(bucket.states(cell_dir)) == [1, 2, 3]
    # The worker group that finished ran on live nodes only, still one rank per node.
    final = placed(cluster, last.ranks)
    assert last.status == "FINISHED" and len(set(final.values())) == 2, summary
    assert victim not in final.values() and set(final.values()) <= set(cluster.nodes), summary
    assert cluster.foreign_opens() == []
    return summary


def test_losing_the_node_of_rank_1_mid_epoch_resumes_on_the_nodes_left(
    clusters: Clusters, bucket: Bucket, tmp_path: Path
) -> None:
    summary = lose_a_node_mid_epoch(clusters, bucket, tmp_path, "lose-rank1", 51, lambda seen: seen["ranks"][1])
    # Rank 1's node went with its raylet; the trial and its controller lived on and restarted the worker group.
    assert summary["controller"] not in summary["lost"] and not summary["trial retried"]
    assert [status for status, _ in summary["attempts"]][-1] == "FINISHED"


# The trial dies with its node; Tune retries it (orchestrator/sweep.py's tune.FailureConfig) and the second trial
# resumes the cell from S3, after orchestrator.placement has removed the dead controller's placement group
# (ray_compat says why).
def test_losing_the_node_of_the_trial_and_its_train_controller_resumes_the_cell(
    clusters: Clusters, bucket: Bucket, tmp_path: Path
) -> None:
    summary = lose_a_node_mid_epoch(clusters, bucket, tmp_path, "lose-trial", 52, lambda seen: seen["controller"])
    assert summary["lost"] not in summary["first attempt"].values()
    assert summary["trial retried"], summary


def test_cells_span_nodes_and_a_new_cluster_finishes_the_sweep_as_one_node_would(
    clusters: Clusters, bucket: Bucket, tmp_path: Path
) -> None:
    """Cross-node DDP, then the whole cluster lost mid-sweep and the sweep resubmitted to a new one (new head,
    the same S3 storage); last, the finished cell trained again on a single node gives the same model."""
    first = clusters.current
    spec = write_spec(tmp_path, spec_dict("moved", [61, 62], epochs=2))
    ids = cell_ids(spec)
    study = f"{bucket.url}/study"

    # 1. On the first cluster: one cell finishes, the other has a checkpoint; both spanned two nodes.
    log = tmp_path / "first.log"
    driver = first.driver([str(spec), "--storage", study], log)
    spans: dict[str, dict[int, str]] = {}

    def one_finished_one_interrupted() -> tuple[str, str] | None:
        for cell in ids.values():
            attempt = None if cell in spans else running_attempt(cell, 2)
            if attempt is not None:
                spans[cell] = placed(first, attempt.ranks)
        done = [c for c in ids.values() if bucket.read(f"study/moved/cells/{c}/result.json") is not None]
        begun = [c for c in ids.values() if c not in done and bucket.registered(f"study/moved/cells/{c}")]
        return (done[0], begun[0]) if done and begun else None

    try:
        finished, interrupted = running(
            driver, log, "one cell finished and one checkpointed", one_finished_one_interrupted
        )
        at_loss = bucket.registered(f"study/moved/cells/{interrupted}")["epoch"]
        first.shutdown()  # head, nodes and driver: every process SIGKILLed at once
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert set(spans) == set(ids.values()), spans
    for cell, ranks in spans.items():
        assert len(set(ranks.values())) == 2 and "head" not in ranks.values(), (cell, spans)
    assert first.foreign_opens() == []
    finished_dir = f"study/moved/cells/{finished}"
    finished_keys = bucket.keys(finished_dir)
    finished_result = bucket.read(f"{finished_dir}/result.json")

    # 2. A new cluster: a new head and one 3-CPU node (both workers of a cell fit on it), the same storage.
    second = clusters.start()
    second.add("big", num_cpus=3)
    log = tmp_path / "second.log"
    code = finish(second.driver([str(spec), "--storage", study], log), log)
    assert code == 0, tail(log)
    output = log.read_text(errors="replace")
    assert "2 cells, 1 already finished, 1 to run" in output, tail(log)
    assert bucket.keys(finished_dir) == finished_keys, "the finished cell was touched again"
    assert bucket.read(f"{finished_dir}/result.json") == finished_result
    assert epoch_lines(output, finished) == []
    resumed = bucket.json(f"study/moved/cells/{interrupted}/result.json")
    assert resumed is not None and resumed["status"] == "finished" and resumed["epochs"] == 2, resumed
    assert resumed["resumed_from_epoch"] == at_loss >= 1, (resumed, at_loss)
    (moved,) = [a for a in train_attempts() if a.run_name == interrupted]
    assert set(placed(second, moved.ranks).values()) == {"big"}
    rows = bucket.keys("study/moved/results.parquet")
    assert rows == ["study/moved/results.parquet"]

    # 3. The cell that finished across two nodes, trained again with both ranks on one node: the same model.
    seed = next(s for s, c in ids.items() if c == finished)
    alone = write_spec(tmp_path, spec_dict("one-node", [seed], epochs=2))
    assert cell_ids(alone)[seed] == finished  # the same cell: ids do not depend on the sweep's name
    log = tmp_path / "one-node.log"
    code = finish(second.driver([str(alone), "--storage", f"{bucket.url}/one-node"], log), log)
    assert code == 0, tail(log)
    (single,) = [a for a in train_attempts() if a.run_name == finished]
    assert set(placed(second, single.ranks).values()) == {"big"}
    across = bucket.states(finished_dir)[2]["model"]
    on_one = bucket.states(f"one-node/one-node/cells/{finished}")[2]["model"]
    assert across.keys() == on_one.keys()
    worst = max((across[k].double() - on_one[k].double()).abs().max().item() for k in across)
    print(f"\ncross-node vs one node: largest weight difference {worst:.3g}; spans {dump(spans)}")
    for key in across:
        torch.testing.assert_close(on_one[key], across[key], rtol=1e-5, atol=1e-6, msg=key)
    one = bucket.json(f"one-node/one-node/cells/{finished}/result.json")
    assert one is not None and json.loads(finished_result or b"{}")["branches"] == one["branches"]
    assert second.foreign_opens() == []
