"""Several Ray nodes on one machine, each as separate as a machine of its own can be made here.

`LocalCluster` runs a head and worker nodes on this machine with `ray.cluster_utils.Cluster`: every node is its own
raylet (with its object store and agents) with its own declared resources, its own Ray temp folder and its own
TMPDIR, under `<root>/nodes/<name>/`. The sweep driver runs as a subprocess "on the head" (its temp folder is the
head's), connected through RAY_ADDRESS like a `ray job submit` entrypoint. Storage is S3 only.

What a shared disk would hide: every process of a node carries the node's folder in its environment
(`SWEEP_NODE_ROOT`, inherited from the raylet that started it) and a `sitecustomize` on PYTHONPATH that installs an
audit hook; any file under another node's folder that the process opens (for reading or writing) is appended to
`<its node folder>/foreign-opens.log`. `foreign_opens()` collects them; a test asserts there are none, so nothing
reaches one node from another except through S3 (or Ray's own object transfer).

Losing a node: `kill(name)` sends SIGKILL to every process whose environment names that node's folder (the raylet,
its agents, every worker and actor it started) at once, with no chance to clean up, and deletes the node's folder:
what a spot instance that disappears does. Processes are found through /proc, so nothing outside this cluster is
touched (never `ray stop`, which would stop every Ray instance on the machine).

`ray.cluster_utils.Cluster` writes the head's address to `<ray temp dir>/ray_current_cluster`, where a plain
`ray.init()` elsewhere on the machine would find it and connect; RAY_TMPDIR points that file into this cluster's
folder instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
NODE_ENV = "SWEEP_NODE_ROOT"
CLUSTER_ENV = "SWEEP_CLUSTER_NODES"
FOREIGN_LOG = "foreign-opens.log"
START_ATTEMPTS = 3
# The Train state actor answers in milliseconds, but a 2-core machine running four raylets and a sweep can keep it
# from being scheduled for tens of seconds.
STATE_TIMEOUT_S = 120

# Runs at start-up in every Python process of the cluster (Ray workers, actors, the driver), before any user code.
SITECUSTOMIZE = f'''
import os
import sys

_nodes = os.environ.get("{CLUSTER_ENV}")
_mine = os.environ.get("{NODE_ENV}")
if _nodes and _mine:
    _inside = [False]

    def _foreign_open(event, args):
        if event != "open" or _inside[0] or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        try:
            path = os.path.abspath(os.fsdecode(args[0]))
        except Exception:
            return
        if path.startswith(_nodes + os.sep) and not (path + os.sep).startswith(_mine + os.sep):
            _inside[0] = True  # the log write below is an "open" event too
            try:
                with open(os.path.join(_mine, "{FOREIGN_LOG}"), "a") as log:
                    log.write(f"{{os.getpid()}} {{path}}\\n")
            except OSError:
                pass
            finally:
                _inside[0] = False

    sys.addaudithook(_foreign_open)
'''

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float, poll_s: float = 0.25) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def processes_with(variable: str, value: str) -> list[int]:
    """Live processes (not this one) whose start-up environment sets `variable` to `value`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and _environ(int(entry.name)).get(variable) == value:
            found.append(int(entry.name))
    return [pid for pid in found if _alive(pid)]


def kill_all(pids: list[int], timeout_s: float = 30) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for(f"processes {pids} to die", lambda: not any(_alive(p) for p in pids), timeout_s)


@dataclass
class Node:
    name: str
    root: Path
    ray_node: Any  # ray._private.node.Node
    resources: dict[str, float]

    @property
    def node_id(self) -> str:
        return str(self.ray_node.node_id)


@dataclass
class LocalCluster:
    """A head (no CPUs by default: like a KubeRay head, it runs no work) and worker nodes added by `add`."""

    root: Path
    head_cpus: int = 0
    nodes: dict[str, Node] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)  # node id -> name, for nodes killed or removed
    _cluster: Any = None

    @classmethod
    def create(cls, head_cpus: int = 0) -> LocalCluster:
        # Short: Ray's Unix socket paths live under each node's temp folder and must stay below 108 bytes.
        root = Path(tempfile.mkdtemp(prefix="smn-", dir="/tmp"))
        (root / "site").mkdir()
        (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        (root / "nodes").mkdir()
        (root / "ray-tmp" / "ray").mkdir(parents=True)
        cluster = cls(root, head_cpus)
        cluster._start_head()
        return cluster

    @property
    def address(self) -> str:
        return str(self._cluster.address)

    @property
    def head(self) -> Node:
        return self.nodes["head"]

    def _node_env(self, root: Path) -> dict[str, str]:
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        python_path = [str(self.root / "site"), str(REPO), os.environ.get("PYTHONPATH", "")]
        return {
            NODE_ENV: str(root),
            CLUSTER_ENV: str(self.root / "nodes"),
            "TMPDIR": str(root / "tmp"),
            "RAY_TMPDIR": str(self.root / "ray-tmp"),
            "PYTHONPATH": os.pathsep.join(p for p in python_path if p),
            "OMP_NUM_THREADS": "1",
        }

    @contextlib.contextmanager
    def _environment(self, updates: dict[str, str]) -> Iterator[None]:
        """Ray starts a node's processes with this process's environment: set the node's for the duration."""
        saved = {k: os.environ.get(k) for k in updates}
        os.environ.update(updates)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    @staticmethod
    def _starting(root: Path, start: Callable[[], T]) -> T:
        """Start a node, again if it does not come up: Ray 2.60 gives a new raylet a fixed 30 s to register
        (node.py, `raylet_start_wait_time_s`) and the raylet gives its agents 25 s, which a 2-core machine busy
        with other work can exceed. A failed start's processes are killed before the next try."""
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                return start()
            except Exception as err:
                kill_all(processes_with(NODE_ENV, str(root)))
                if attempt == START_ATTEMPTS:
                    raise
                print(f"node {root.name} did not start ({err}); starting it again", flush=True)
        raise AssertionError("unreachable")

    def _start_head(self) -> None:
        from ray.cluster_utils import Cluster

        root = self.root / "nodes" / "head"
        args = {
            "num_cpus": self.head_cpus,
            "temp_dir": str(root / "ray"),
            "include_dashboard": False,
            "object_store_memory": 80 * 1024 * 1024,
        }
        with self._environment(self._node_env(root)):
            self._cluster = self._starting(root, lambda: Cluster(initialize_head=True, head_node_args=args))
        head = self._cluster.head_node
        self.nodes["head"] = Node("head", root, head, {"CPU": float(self.head_cpus)})

    def add(self, name: str, num_cpus: int, num_gpus: int = 0, resources: dict[str, float] | None = None) -> Node:
        assert name not in self.nodes, name
        root = self.root / "nodes" / name
        with self._environment(self._node_env(root)):
            ray_node = self._starting(
                root,
                lambda: self._cluster.add_node(
                    num_cpus=num_cpus,
                    num_gpus=num_gpus,
                    resources=resources or {},
                    temp_dir=str(root / "ray"),
                    object_store_memory=80 * 1024 * 1024,
                ),
            )
        node = Node(name, root, ray_node, {"CPU": float(num_cpus), "GPU": float(num_gpus), **(resources or {})})
        self.nodes[name] = node
        return node

    def processes(self, name: str) -> list[int]:
        return processes_with(NODE_ENV, str(self.nodes[name].root))

    def kill(self, name: str) -> list[int]:
        """The node is lost: SIGKILL everything on it at once, then its disk goes too. Returns the pids killed."""
        assert name != "head", "losing the head loses the cluster: use shutdown()"
        node = self.nodes.pop(name)
        pids = processes_with(NODE_ENV, str(node.root))
        kill_all(pids)
        # Tidy Ray's bookkeeping of the (already dead) processes; nothing graceful happens here.
        with contextlib.suppress(Exception):
            self._cluster.remove_node(node.ray_node, allow_graceful=False)
        shutil.rmtree(node.root, ignore_errors=True)
        self.lost[node.node_id] = name
        return pids

    def remove(self, name: str) -> None:
        """A graceful scale-down: the node's raylet shuts down its workers first."""
        node = self.nodes.pop(name)
        self._cluster.remove_node(node.ray_node, allow_graceful=True)
        kill_all(processes_with(NODE_ENV, str(node.root)))
        self.lost[node.node_id] = name

    def name_of(self, node_id: str) -> str:
        for node in self.nodes.values():
            if node.node_id == node_id:
                return node.name
        return self.lost.get(node_id, f"unknown node {node_id[:8]}")

    def driver(
        self, args: list[str], log: Path, env: dict[str, str] | None = None, host: str | None = None
    ) -> subprocess.Popen[bytes]:
        """`python -m orchestrator.sweep ARGS` on the head, connected to this cluster (its own session). With
        `host`, the driver runs in a UTS namespace of its own under that host name: what a driver resubmitted on
        another pod looks like to the sweep's lease (needs root, as here)."""
        environment = {
            **os.environ,
            **self._node_env(self.head.root),
            "RAY_ADDRESS": self.address,
            **(env or {}),
        }
        command = [sys.executable, "-m", "orchestrator.sweep", *args]
        if host is not None:
            command = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', host, *command]
        with open(log, "ab") as out:
            return subprocess.Popen(
                command,
                cwd=REPO,
                env=environment,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def foreign_opens(self) -> list[str]:
        """Files a node's processes opened under another node's folder (see the module docstring)."""
        found = []
        for log in (self.root / "nodes").glob(f"*/{FOREIGN_LOG}"):
            found += [f"{log.parent.name}: {line}" for line in log.read_text().splitlines()]
        return found

    def shutdown(self) -> None:
        """Every process of this cluster, the driver included, SIGKILLed; its folders removed."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        kill_all(processes_with(CLUSTER_ENV, str(self.root / "nodes")))
        self._cluster = None
        self.nodes.clear()

    def destroy(self) -> None:
        self.shutdown()
        shutil.rmtree(self.root, ignore_errors=True)


# --- what Ray itself records about a cell's Train run -------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One start of a cell's worker group, as Ray Train's state actor records it (the dashboard's Train view)."""

    run_name: str
    attempt_id: str
    status: str
    start_ns: int
    ranks: dict[int, str]  # world rank -> node id
    pids: dict[int, int]  # world rank -> worker process id
    controller_actor_id: str


def train_attempts() -> list[Attempt]:
    """Every worker-group start of every Train run on the connected cluster, oldest first.

    Ray Train 2.60 keeps these in a detached actor on the head (RAY_TRAIN_ENABLE_STATE_TRACKING, which the sweep
    sets); each records its workers' world rank, node id and pid.
    """
    import ray
    from ray.train.v2._internal.state.state_actor import get_state_actor

    actor = get_state_actor()
    if actor is None:
        return []
    runs: Any = ray.get(actor.get_train_runs.remote(), timeout=STATE_TIMEOUT_S)
    attempts: Any = ray.get(actor.get_train_run_attempts.remote(), timeout=STATE_TIMEOUT_S)
    found: list[Attempt] = []
    for run_id, by_attempt in attempts.items():
        run = runs.get(run_id)
        if run is None:
            continue
        for attempt in by_attempt.values():
            found.append(
                Attempt(
                    run.name,
                    attempt.attempt_id,
                    str(getattr(attempt.status, "value", attempt.status)),
                    attempt.start_time_ns,
                    {w.world_rank: w.node_id for w in attempt.workers},
                    {w.world_rank: w.pid for w in attempt.workers},
                    run.controller_actor_id,
                )
            )
    return sorted(found, key=lambda a: a.start_ns)


def running_attempt(run_name: str, world_size: int) -> Attempt | None:
    """The cell's worker group while it trains (all its ranks placed), else None."""
    for attempt in reversed(train_attempts()):
        if attempt.run_name == run_name and attempt.status == "RUNNING" and len(attempt.ranks) == world_size:
            return attempt
    return None


def actor_node(actor_id: str) -> str | None:
    """The node id an actor lives on (from the GCS actor table), or None."""
    import ray

    info = ray._private.state.actors(actor_id)  # the GCS's table: needs no dashboard
    node = (info or {}).get("Address", {}).get("NodeID")
    return str(node) if node else None


def dump(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=True, default=str)
