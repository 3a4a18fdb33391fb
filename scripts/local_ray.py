"""A one-node Ray head of its own on 127.0.0.1, for the end-to-end test and the monitoring snapshot.

`ray_head()` starts `ray start --head` on free ports with a temp dir of its own and token authentication on
(docs/design.md section 6): a fresh token is written to that temp dir and handed to the head and to every client through
`RAY_AUTH_TOKEN_PATH` with `RAY_AUTH_MODE=token`, so the user's `~/.ray/auth_token` is neither read nor written.

`ray stop` would stop every Ray instance on the machine (other sessions' included), so on exit only this head's
processes are stopped: the process group of its `ray start` (which runs in a session of its own), processes whose
command line names its temp dir or one of the caller's markers (a sweep's storage folder), and all their
descendants (Ray workers and a job's driver get sessions of their own). They are stopped in `ray stop`'s order
(raylet, the rest, GCS), SIGTERM then SIGKILL after a grace period. Linux only: processes are found through /proc.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
START_TIMEOUT_S = 240.0
STOP_GRACE_S = 10.0  # per stage of the shutdown, as `ray stop --grace-period 30` gives each of 3
KILL_WAIT_S = 10.0
# Variables that would point a client at some other Ray instance or authenticate it with another token.
FOREIGN_ENV = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS")


def free_ports(count: int) -> list[int]:
    """Distinct ports free right now on every interface (Ray binds some to the node's address, not 127.0.0.1)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM))) for _ in range(count)]
        for sock in socks:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in socks]


# --- processes, found through /proc -----------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    start: int  # start time in clock ticks since boot: (pid, start) names a process even if its pid is reused
    ppid: int
    pgid: int
    cmdline: str


def processes() -> dict[int, Proc]:
    """Every live (non-zombie) process but this one."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            pid = int(entry.name)
            found[pid] = Proc(pid, int(fields[19]), int(fields[1]), int(fields[2]), cmdline)
    return found


@dataclass
class OwnProcesses:
    """The processes of one Ray instance: the process group of its `ray start`, command lines naming one of
    `markers`, all their descendants (Ray workers get a session of their own and a command line like
    `ray::RayTrainWorker`), and every process seen before (a worker whose raylet died is re-parented and would
    otherwise be missed)."""

    pgid: int
    markers: list[str]
    seen: set[tuple[int, int]] = field(default_factory=set)

    def live(self) -> list[Proc]:
        procs = processes()
        wanted = {
            p.pid
            for p in procs.values()
            if p.pgid == self.pgid or (p.pid, p.start) in self.seen or any(m in p.cmdline for m in self.markers)
        }
        children: dict[int, list[int]] = {}
        for p in procs.values():
            children.setdefault(p.ppid, []).append(p.pid)
        stack = list(wanted)
        while stack:
            for child in children.get(stack.pop(), []):
                if child not in wanted:
                    wanted.add(child)
                    stack.append(child)
        found = [procs[pid] for pid in sorted(wanted)]
        self.seen.update((p.pid, p.start) for p in found)
        return found

    def stop(self, grace: float) -> tuple[list[Proc], list[Proc]]:
        """What `ray stop` does, limited to this instance: SIGTERM the raylet, then everything else, then the GCS
        (which must outlive the others or they exit with errors), each stage given `grace` seconds before
        SIGKILL. Returns (the processes that needed SIGKILL, those still alive after it)."""
        killed: list[Proc] = []
        for stage in ("raylet", "other", "gcs"):
            procs = [p for p in self.live() if _stage(p) == stage]
            for sig, timeout in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_WAIT_S)):
                for proc in procs:
                    with suppress(ProcessLookupError):
                        os.kill(proc.pid, sig)
                procs = _wait_gone(procs, timeout)
                if not procs:
                    break
                if sig == signal.SIGTERM:
                    killed.extend(procs)
        for proc in self.live():  # started while stopping (e.g. a worker the raylet was starting): no grace
            with suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            killed.append(proc)
        return killed, _wait_gone(self.live(), KILL_WAIT_S)


def _stage(proc: Proc) -> str:
    if "/raylet/raylet " in proc.cmdline:
        return "raylet"
    return "gcs" if "/gcs/gcs_server " in proc.cmdline else "other"


def _wait_gone(procs: list[Proc], timeout: float) -> list[Proc]:
    deadline = time.monotonic() + timeout
    while True:
        live = {(p.pid, p.start) for p in processes().values()}
        procs = [p for p in procs if (p.pid, p.start) in live]
        if not procs or time.monotonic() >= deadline:
            return procs
        time.sleep(0.25)


# --- the Ray instance -------------------------------------------------------------------------------------


@dataclass
class Cluster:
    dashboard: str  # http://127.0.0.1:<port>: the job submission address and the dashboard's REST API
    metrics: str  # http://127.0.0.1:<port>/metrics
    token: str
    token_path: Path
    temp_dir: Path
    env: dict[str, str]  # a client environment that authenticates
    # Set on exit: processes that needed SIGKILL, and those that survived it (the temp dir is then kept).
    killed: list[Proc] = field(default_factory=list)
    survivors: list[Proc] = field(default_factory=list)

    def ray(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the ray CLI against this instance (stdout and stderr together in .stdout)."""
        return subprocess.run(
            [str(RAY), *args],
            cwd=REPO,
            env=self.env if env is None else env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )

    def job(self, command: str, *args: str, timeout: float = 300) -> str:
        """`ray job COMMAND --address=... ARGS` against this instance; its output (RuntimeError on failure)."""
        proc = self.ray("job", command, f"--address={self.dashboard}", *args, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"ray job {command} exited with {proc.returncode}:\n{proc.stdout[-3000:]}")
        out: str = proc.stdout
        return out

    def get(self, path: str) -> Any:
        """GET a dashboard API path as JSON (None while it answers with an error)."""
        request = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError, ConnectionError):
            return None

    def scrape(self) -> str:
        """The metrics endpoint's page ("" while it does not answer)."""
        try:
            with urllib.request.urlopen(self.metrics, timeout=30) as response:
                text: str = response.read().decode()
                return text
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            return ""


def sweep_entrypoint(spec: str, storage: Path) -> tuple[str, ...]:
    """A job's entrypoint that runs the sweep `spec` (relative to the working dir) into `storage`."""
    return ("python", "-m", "orchestrator.sweep", spec, "--storage", str(storage))


def _client_env(token_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    env.update(
        # A job's `python` (and the head's workers) must be this virtual environment's.
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


@contextmanager
def ray_head(
    prefix: str = "ray-local-",
    markers: tuple[str, ...] = (),
    log: Callable[[str], None] = print,
    head_env: dict[str, str] | None = None,
) -> Iterator[Cluster]:
    """A one-node Ray head on 127.0.0.1 with 2 CPUs, no GPU and token authentication; on exit, its processes (and
    every process whose command line names its temp dir or one of `markers`) are stopped and nothing else. The
    temp dir (named `prefix`...) is removed unless some process survived SIGKILL: see `Cluster.survivors`.
    RuntimeError if `ray start` fails or takes longer than START_TIMEOUT_S. `head_env` adds variables to the head's
    environment only (its processes and the jobs' drivers inherit them), not to the clients'."""
    # A short path: Ray puts Unix sockets under <temp-dir>/session_*/sockets (at most 107 bytes per path).
    temp_dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    token = secrets.token_hex(32)
    token_path = temp_dir / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    env = _client_env(token_path)
    gcs, dashboard, client, agent_http, agent_grpc, runtime_env_agent, metrics = free_ports(7)
    command = [
        str(RAY),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env_agent}",
        f"--metrics-export-port={metrics}",
        "--num-cpus=2",
        "--num-gpus=0",
        "--include-dashboard=true",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    log(f"ray start --head (dashboard port {dashboard}, metrics port {metrics}, temp dir {temp_dir})")
    started = time.monotonic()
    # A session of its own: every process `ray start` spawns shares one process group that teardown can find.
    head = subprocess.Popen(
        command,
        cwd=REPO,
        env={**env, **(head_env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    own = OwnProcesses(pgid=head.pid, markers=[str(temp_dir), *markers])
    cluster = Cluster(
        f"http://127.0.0.1:{dashboard}", f"http://127.0.0.1:{metrics}/metrics", token, token_path, temp_dir, env
    )
    try:
        try:
            out, _ = head.communicate(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            head.kill()
            out, _ = head.communicate()
            raise RuntimeError(f"ray start did not finish in {START_TIMEOUT_S:.0f} s:\n{out[-4000:]}") from None
        if head.returncode != 0:
            raise RuntimeError(f"ray start failed with exit status {head.returncode}:\n{out[-4000:]}")
        log(f"ray start --head: ready in {time.monotonic() - started:.1f} s")
        own.live()  # remember the instance's first processes
        yield cluster
    finally:
        stopping = time.monotonic()
        cluster.killed, cluster.survivors = own.stop(STOP_GRACE_S)
        log(f"Ray instance stopped in {time.monotonic() - stopping:.1f} s (temp dir {temp_dir})")
        if cluster.killed:
            log("\n  ".join(["needed SIGKILL:", *(f"{p.pid} {p.cmdline[:100]}" for p in cluster.killed)]))
        if cluster.survivors:
            log(f"WARNING: processes survived SIGKILL: {[p.pid for p in cluster.survivors]}; kept {temp_dir}")
        else:
            shutil.rmtree(temp_dir, ignore_errors=True)
