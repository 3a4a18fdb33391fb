"""End to end, the way docs/design.md section 1 runs a study: `ray start --head`, then
`ray job submit --working-dir . -- python -m orchestrator.sweep sweeps/tiny.yaml`, then the results in storage.

The cluster is this module's own (scripts/local_ray.py): free ports, a dedicated `--temp-dir`, and its own auth
token. Token authentication stays on (docs/design.md section 6): the token is generated there and handed to the head and
to every client through `RAY_AUTH_TOKEN_PATH`, with `RAY_AUTH_MODE=token`, so the user's `~/.ray/auth_token` is
neither read nor overwritten (checked below). `ray stop` would stop every Ray instance on the machine (other
sessions' included), so teardown stops only this cluster: its head's process group, processes whose command line
names its temp dir or this module's storage dir, and all their descendants, in `ray stop`'s order, SIGTERM then
SIGKILL after a grace period; and checks that none is left.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.grid import expand
from orchestrator.spec import load_spec
from scripts.local_ray import RAY, REPO, START_TIMEOUT_S, Cluster, ray_head, sweep_entrypoint

SPEC = "sweeps/tiny.yaml"
SWEEP_NAME = "tiny"
SUBMIT_TIMEOUT_S = 600

needs_ray_cli = pytest.mark.skipif(not RAY.exists(), reason=f"no ray CLI next to {sys.executable}")


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
def storage() -> Iterator[Path]:
    """The sweep's storage; removed after the cluster has stopped (the cluster fixture depends on it)."""
    path = Path(tempfile.mkdtemp(prefix="sweep-e2e-storage-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(home_token_before: tuple[bool, int, int], storage: Path) -> Iterator[Cluster]:
    with ray_head(prefix="ray-e2e-", markers=(str(storage),), log=print) as cluster:
        yield cluster
    assert not cluster.survivors, f"processes of the test cluster survived SIGKILL: {cluster.survivors}"


@dataclass
class Submission:
    submission_id: str
    returncode: int
    output: str
    seconds: float


@pytest.fixture(scope="module")
def submitted(cluster: Cluster, storage: Path) -> Submission:
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
        *sweep_entrypoint(SPEC, storage),
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
    # The repository's own folders of environments, runs and datasets (workloads/data/ is code, and goes).
    for left_out in (".venv/", ".venv-mlflow/", ".git/", "runs/", "data/"):
        assert not any(name.startswith(left_out) for name in names), left_out
    assert not any("__pycache__/" in name for name in names)
    assert "workloads/data/reader.py" in names
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
    # deprecation warning Ray raises against itself in every controller, Tune's scratch-folder paths, Tune's
    # TensorBoard logger refusing each trial's config.
    noises = (
        "Reporting training result",
        "RayDeprecationWarning",
        "View detailed results",
        "sweep-tune-",
        "Removed the following hyperparameter values",
    )
    for noise in noises:
        assert noise not in log, (noise, log[-6000:])


@pytest.mark.slow
@pytest.mark.timeout(SUBMIT_TIMEOUT_S + START_TIMEOUT_S + 120)
@needs_ray_cli
def test_job_status_and_logs(cluster: Cluster, storage: Path, submitted: Submission) -> None:
    status = cluster.ray("job", "status", f"--address={cluster.dashboard}", submitted.submission_id)
    assert status.returncode == 0, status.stdout
    assert f"Job '{submitted.submission_id}' succeeded" in status.stdout, status.stdout
    logs = cluster.ray("job", "logs", f"--address={cluster.dashboard}", submitted.submission_id)
    assert logs.returncode == 0, logs.stdout[-4000:]
    assert_progress(logs.stdout, tiny_cell_ids())
    assert f"results: {storage}/{SWEEP_NAME}/results.parquet (2 finished, 0 failed)" in logs.stdout


@pytest.mark.slow
@pytest.mark.timeout(SUBMIT_TIMEOUT_S + START_TIMEOUT_S + 120)
@needs_ray_cli
def test_results_in_storage(storage: Path, submitted: Submission) -> None:
    import pyarrow.parquet as pq

    assert submitted.returncode == 0, submitted.output[-4000:]
    root = storage / SWEEP_NAME
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
