"""The README's cluster sequence as written: `ray job submit --working-dir . -- python -m orchestrator.sweep
sweeps/tiny.yaml`, with the spec's relative `storage: ./runs`. The driver runs inside Ray's temporary copy of the
project, so the results must not land there: they go under $SWEEP_STORAGE_ROOT (the README sets it to the project
folder before `ray start --head`). After the cluster is stopped and a new one started, a resubmission finds the
finished cells and trains nothing.

Each cluster is this test's own (scripts/local_ray.py: free ports, its own temp dir and token).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from orchestrator.grid import expand
from orchestrator.spec import load_spec
from orchestrator.storage import STORAGE_ROOT_ENV
from scripts.local_ray import RAY, REPO, START_TIMEOUT_S, ray_head

SPEC = "sweeps/tiny.yaml"
SUBMIT_TIMEOUT_S = 600

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not RAY.exists(), reason=f"no ray CLI next to {RAY.parent}"),
]


def _submit_tiny(root: Path) -> str:
    """Start a cluster whose head has SWEEP_STORAGE_ROOT=root, submit the tiny sweep as the README does, stop the
    cluster; the job's log."""
    with ray_head(prefix="ray-e2e-storage-", markers=(str(root),), head_env={STORAGE_ROOT_ENV: str(root)}) as cluster:
        proc = cluster.ray(
            "job",
            "submit",
            f"--address={cluster.dashboard}",
            f"--submission-id=storage-{uuid.uuid4().hex[:8]}",
            f"--working-dir={REPO}",
            "--",
            "python",
            "-m",
            "orchestrator.sweep",
            SPEC,
            timeout=SUBMIT_TIMEOUT_S,
        )
    assert not cluster.survivors
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc.stdout


@pytest.mark.timeout(2 * (SUBMIT_TIMEOUT_S + START_TIMEOUT_S) + 120)
def test_results_land_under_the_storage_root_and_survive_a_cluster_restart() -> None:
    root = Path(tempfile.mkdtemp(prefix="sweep-root-"))
    try:
        ids = sorted(cell.cell_id for cell in expand(load_spec(REPO / SPEC)))
        first = _submit_tiny(root)
        sweep = root / "runs" / "tiny"
        assert f"storage: {sweep}" in first, first[-4000:]
        assert f"resolves under {root}" in first, first[-4000:]
        for cell_id in ids:
            record = json.loads((sweep / "cells" / cell_id / "result.json").read_text())
            assert record["status"] == "finished"
        assert (sweep / "results.parquet").is_file()
        assert "_ray_pkg_" not in first.split("results: ", 1)[-1].splitlines()[0]

        second = _submit_tiny(root)  # a new cluster: another session folder, another unpacked working dir
        assert f"sweep tiny: {len(ids)} cells, {len(ids)} already finished, 0 to run" in second, second[-4000:]
    finally:
        shutil.rmtree(root, ignore_errors=True)
