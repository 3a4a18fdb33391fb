"""End to end, the way DESIGN.md section 1 runs a study: `ray start --head`, then
`ray job submit --working-dir . -- python -m orchestrator.sweep sweeps/tiny.yaml`, then the results in storage.

The cluster is this module's own: free ports, a dedicated `--temp-dir`, and its own auth token. Token
authentication stays on (DESIGN.md section 6): the token is generated here and handed to the head and to every
client through `RAY_AUTH_TOKEN_PATH`, with `RAY_AUTH_MODE=token`, so the user's `~/.ray/auth_token` is neither read
nor overwritten. `ray stop` would stop every Ray instance on the machine (other sessions' included), so teardown
stops only this cluster: the head's process group (`ray start` runs in a session of its own), processes whose
command line names this module's temp dir or storage dir, and all their descendants (Ray workers and the job's
driver get sessions of their own). It stops them in `ray stop`'s order (raylet, the rest, GCS), SIGTERM then
SIGKILL after a grace period, and checks that none is left.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, closing, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.grid import expand
from orchestrator.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
SPEC = "sweeps/tiny.yaml"
SWEEP_NAME = "tiny"
START_TIMEOUT_S = 240
SUBMIT_TIMEOUT_S = 600
STOP_GRACE_S = 10  # per stage of the shutdown, as `ray stop --grace-period 30` gives each of 3

needs_ray_cli = pytest.mark.skipif(not RAY.exists(), reason=f"no ray CLI next to {sys.executable}")


def free_ports(count: int) -> list[int]:
    """Distinct ports free right now on every interface (Ray binds some to the node's address, not 127.0.0.1)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM))) for _ in range(count)]
        for sock in socks:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in socks]


# --- processes of this module's cluster, found through /proc (Linux) ---------------------------------------


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


class ClusterProcesses:
    """The processes of one cluster: its process group, command lines naming one of `markers`, all their
    descendants (Ray workers get a session of their own and a command line like `ray::RayTrainWorker`), and
    every process seen before (a worker whose raylet died is re-parented and would otherwise be missed)."""

    def __init__(self, pgid: int, markers: list[str]) -> None:
        self.pgid, self.markers = pgid, markers
        self.seen: set[tuple[int, int]] = set()

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
        """What `ray stop` does, limited to this cluster: SIGTERM the raylet, then everything else, then the GCS
        (which must outlive the others or they exit with errors), each stage given `grace` seconds before
        SIGKILL. Returns (the processes that needed SIGKILL, those still alive after it)."""
        killed: list[Proc] = []
        for stage in ("raylet", "other", "gcs"):
            procs = [p for p in self.live() if _stage(p) == stage]
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for proc in procs:
                    with suppress(ProcessLookupError):
                        os.kill(proc.pid, sig)
                procs = self._wait_gone(procs, grace if sig == signal.SIGTERM else 10)
                if not procs:
                    break
                if sig == signal.SIGTERM:
                    killed.extend(procs)
        for proc in self.live():  # started while stopping (e.g. a worker the raylet was starting): no grace
            with suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            killed.append(proc)
        return killed, self._wait_gone(self.live(), 10)

    def _wait_gone(self, procs: list[Proc], timeout: float) -> list[Proc]:
        deadline = time.monotonic() + timeout
        while True:
            live = {(p.pid, p.start) for p in processes().values()}
            procs = [p for p in procs if (p.pid, p.start) in live]
            if not procs or time.monotonic() >= deadline:
                return procs
            time.sleep(0.25)


def _stage(proc: Proc) -> str:
    if "/raylet/raylet " in proc.cmdline:
        return "raylet"
    return "gcs" if "/gcs/gcs_server " in proc.cmdline else "other"


# --- the cluster ------------------------------------------------------------------------------------------


@dataclass
class Cluster:
    dashboard: str  # http://127.0.0.1:<port>: the job submission address
    env: dict[str, str]  # a client environment that authenticates
    token_path: Path
    temp_dir: Path
    storage: Path  # for the sweep's results

    def ray(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the ray CLI against this cluster (stdout and stderr together in .stdout)."""
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


def _home_token_state() -> tuple[bool, int, int]:
    """Whether ~/.ray/auth_token exists, its mtime and size (never its content)."""
    path = Path.home() / ".ray" / "auth_token"
    try:
        st = path.stat()
    except FileNotFoundError:
        return (False, 0, 0)
    return (True, st.st_mtime_ns, st.st_size)


@pytest.fixture(scope="module")
def home_token_before() -> tuple[bool, int, int]:
    return _home_token_state()


@pytest.fixture(scope="module")
def cluster(home_token_before: tuple[bool, int, int]) -> Iterator[Cluster]:
    # A short path: Ray puts Unix sockets under <temp-dir>/session_*/sockets (at most 107 bytes per path).
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-e2e-", dir="/tmp"))
    storage = Path(tempfile.mkdtemp(prefix="sweep-e2e-storage-"))
    token_path = temp_dir / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS")}
    env.update(
        # The job's `python` (and the head's workers) must be this virtual environment's.
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_USAGE_STATS_ENABLED="0",
    )
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
    # Its own session, so every process it spawns shares one process group that teardown can find.
    head = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    tracked = ClusterProcesses(pgid=head.pid, markers=[str(temp_dir), str(storage)])
    started = time.monotonic()
    try:
        try:
            out, _ = head.communicate(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            head.kill()
            out, _ = head.communicate()
            pytest.fail(f"ray start did not finish in {START_TIMEOUT_S} s:\n{out[-4000:]}")
        assert head.returncode == 0, f"ray start failed:\n{out[-4000:]}"
        print(f"\nray start --head: {time.monotonic() - started:.1f} s (temp dir {temp_dir})")
        tracked.live()  # remember the cluster's first processes
        yield Cluster(f"http://127.0.0.1:{dashboard}", env, token_path, temp_dir, storage)
    finally:
        stopping = time.monotonic()
        killed, left = tracked.stop(STOP_GRACE_S)
        print(f"cluster stopped in {time.monotonic() - stopping:.1f} s")
        if killed:
            print("needed SIGKILL:", *(f"{p.pid} {p.cmdline[:100]}" for p in killed), sep="\n  ")
        shutil.rmtree(storage, ignore_errors=True)
        if not left:
            shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test cluster survived SIGKILL: {left}"


@dataclass
class Submission:
    submission_id: str
    returncode: int
    output: str
    seconds: float


@pytest.fixture(scope="module")
def submitted(cluster: Cluster) -> Submission:
    """The tiny sweep, submitted once; `ray job submit` waits for the job and streams its log."""
    submission_id = f"sweep-e2e-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    proc = cluster.ray(
        "job",
        "submit",
        f"--address={cluster.dashboard}",
        f"--submission-id={submission_id}",
        f"--working-dir={REPO}",
        "--",
        "python",
        "-m",
        "orchestrator.sweep",
        SPEC,
        "--storage",
        str(cluster.storage),
        timeout=SUBMIT_TIMEOUT_S,
    )
    seconds = time.monotonic() - started
    print(f"\nray job submit {SPEC}: {seconds:.1f} s, exit {proc.returncode}")
    return Submission(submission_id, proc.returncode, proc.stdout, seconds)


def tiny_cell_ids() -> list[str]:
    return [cell.cell_id for cell in expand(load_spec(REPO / SPEC))]


def assert_progress(log: str, cell_ids: list[str]) -> None:
    """The sweep's progress lines (orchestrator/progress.py): every cell reaches 'finished'."""
    assert f"[sweep {SWEEP_NAME} " in log, log[-4000:]
    finished = set(re.findall(rf"\[sweep {SWEEP_NAME} \+\s*\d+s\] cell ([0-9a-f]{{12}}) finished", log))
    assert finished == set(cell_ids), log[-4000:]
    assert f"({len(cell_ids)} finished, 0 failed)" in log, log[-4000:]


# --- tests ------------------------------------------------------------------------------------------------


@needs_ray_cli
def test_working_dir_upload_is_small_and_leaves_out_the_venv(tmp_path: Path) -> None:
    """`--working-dir .` packs the repository the way `ray job submit` does: .gitignore and Ray's default
    excludes respected, far below the upload limit."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package

    package = tmp_path / "pkg.zip"
    create_package(
        str(REPO), package, include_gitignore=True, excludes=ray_constants.get_runtime_env_default_excludes()
    )
    names = zipfile.ZipFile(package).namelist()
    assert "orchestrator/sweep.py" in names and SPEC in names and "workloads/train.py" in names
    for left_out in (".venv/", ".git/", "runs/", "data/", "__pycache__/"):
        assert not any(name.startswith(left_out) or f"/{left_out}" in name for name in names), left_out
    size = package.stat().st_size
    print(f"\nworking-dir package: {len(names)} files, {size / 1024:.0f} KiB (limit {GCS_STORAGE_MAX_SIZE >> 20} MiB)")
    assert size < 10 << 20


@pytest.mark.slow
@pytest.mark.timeout(SUBMIT_TIMEOUT_S + START_TIMEOUT_S + 120)
@needs_ray_cli
def test_submitted_sweep_succeeds(submitted: Submission) -> None:
    log = submitted.output
    assert submitted.returncode == 0, log[-6000:]
    assert f"Job '{submitted.submission_id}' succeeded" in log, log[-6000:]
    assert_progress(log, tiny_cell_ids())
    # The driver joined the 2-CPU cluster rather than starting a local Ray instance of its own.
    assert "Started a local Ray instance" not in log
    assert "cluster: 2 CPUs, 0 GPUs" in log, log[-6000:]
    # One node, no autoscaler: the sweep switched Ray Train's preemption watcher off, and with it the error-level
    # line Ray logs for every cell about the watcher's restart arguments.
    assert "PreemptionWatcher" not in log, log[-6000:]
    # Nothing else from Ray's internals that a user cannot act on: per-report lines from every Train worker, a
    # deprecation warning Ray raises against itself in every controller, Tune's scratch-folder paths.
    for noise in ("Reporting training result", "RayDeprecationWarning", "View detailed results", "sweep-tune-"):
        assert noise not in log, (noise, log[-6000:])


@pytest.mark.slow
@pytest.mark.timeout(SUBMIT_TIMEOUT_S + START_TIMEOUT_S + 120)
@needs_ray_cli
def test_job_status_and_logs(cluster: Cluster, submitted: Submission) -> None:
    status = cluster.ray("job", "status", f"--address={cluster.dashboard}", submitted.submission_id)
    assert status.returncode == 0, status.stdout
    assert f"Job '{submitted.submission_id}' succeeded" in status.stdout, status.stdout
    logs = cluster.ray("job", "logs", f"--address={cluster.dashboard}", submitted.submission_id)
    assert logs.returncode == 0, logs.stdout[-4000:]
    assert_progress(logs.stdout, tiny_cell_ids())
    assert f"results: {cluster.storage}/{SWEEP_NAME}/results.parquet (2 finished, 0 failed)" in logs.stdout


@pytest.mark.slow
@pytest.mark.timeout(SUBMIT_TIMEOUT_S + START_TIMEOUT_S + 120)
@needs_ray_cli
def test_results_in_storage(cluster: Cluster, submitted: Submission) -> None:
    import pyarrow.parquet as pq

    assert submitted.returncode == 0, submitted.output[-4000:]
    root = cluster.storage / SWEEP_NAME
    ids = tiny_cell_ids()
    assert (root / "spec.yaml").is_file()
    assert (root / "datasets" / "digits").is_dir()  # builtin://digits, materialised by the driver
    for cell_id in ids:
        result = json.loads((root / "cells" / cell_id / "result.json").read_text())
        assert result["cell_id"] == cell_id and result["status"] == "finished", result
        assert (root / "cells" / cell_id / "config.json").is_file()
    table = pq.read_table(root / "results.parquet").to_pylist()
    assert sorted(row["cell_id"] for row in table) == sorted(ids)  # tiny: BN cells, one 'main' branch each
    for row in table:
        assert row["status"] == "finished" and row["branch"] == "main" and row["epochs"] == 2, row
        assert 0.0 <= row["acc_clean"] <= 1.0 and 0.0 <= row["acc_pgd_2"] <= 1.0, row
    assert {row["clean_ratio"] for row in table} == {0.0, 1.0}


@pytest.mark.slow
@pytest.mark.timeout(START_TIMEOUT_S + 300)
@needs_ray_cli
def test_clients_without_the_token_are_rejected(cluster: Cluster, tmp_path: Path) -> None:
    """Token auth is on: without RAY_AUTH_MODE=token the CLI sends no token, and a wrong token is refused."""
    no_mode = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    wrong_token = {**cluster.env, "RAY_AUTH_TOKEN_PATH": str(wrong)}
    rejected = []
    for env, why in ((no_mode, "Missing authentication token"), (wrong_token, "Invalid authentication token")):
        submission_id = f"rejected-{uuid.uuid4().hex[:8]}"
        proc = cluster.ray(
            "job",
            "submit",
            f"--address={cluster.dashboard}",
            f"--submission-id={submission_id}",
            "--",
            "python",
            "-c",
            "print('should not run')",
            env=env,
        )
        assert proc.returncode != 0, proc.stdout
        assert why in proc.stdout, proc.stdout[-3000:]
        assert "should not run" not in proc.stdout
        rejected.append(submission_id)
    jobs = cluster.ray("job", "list", f"--address={cluster.dashboard}")
    assert jobs.returncode == 0, jobs.stdout[-3000:]
    for submission_id in rejected:
        assert submission_id not in jobs.stdout  # refused before anything was created
    assert cluster.token_path.read_text() not in jobs.stdout


@pytest.mark.slow
@needs_ray_cli
def test_users_own_token_is_untouched(cluster: Cluster, home_token_before: tuple[bool, int, int]) -> None:
    assert _home_token_state() == home_token_before
