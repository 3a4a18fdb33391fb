"""An outage longer than the sweep's storage_outage_tolerance_s fails the worker whose upload gave up; the cell is
retried inside the same sweep and resumes from its last registered checkpoint: by Train's worker-group restart,
or, when that fails too, queued again by the sweep after a backoff (orchestrator.runner.lost_to_the_cluster), its
attempts recorded in storage (`cells/<id>/attempts.json`, orchestrator.attempts).

Real Ray (one local instance for this module, started with a 2-second tolerance in every process's environment,
as the driver hands it to a Ray instance it starts itself) and S3 through `OutageProxy` in front of the session's
moto server, which refuses connections for OUTAGE_S seconds from the moment the second checkpoint's upload starts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from orchestrator import sweep
from orchestrator.grid import expand
from orchestrator.spec import load_spec
from tests.conftest import tiny_spec, write_spec
from tests.outage_proxy import OutageProxy
from workloads.fs import OUTAGE_TOLERANCE_ENV

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.fault]

TOLERANCE_S = 2.0
OUTAGE_S = 25.0  # longer than the tolerance, Train's one worker-group restart and its start-up together


@pytest.fixture(scope="module")
def proxy(s3_server: str) -> Iterator[OutageProxy]:
    upstream = urlparse(s3_server)
    assert upstream.hostname and upstream.port
    relay = OutageProxy((upstream.hostname, upstream.port), outage_s=OUTAGE_S).start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", relay.endpoint)
        mp.setenv(OUTAGE_TOLERANCE_ENV, f"{TOLERANCE_S:g}")
        try:
            yield relay
        finally:
            relay.close()


@pytest.fixture(scope="module")
def ray_short_tolerance(proxy: OutageProxy) -> Iterator[None]:
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {OUTAGE_TOLERANCE_ENV: f"{TOLERANCE_S:g}", "OMP_NUM_THREADS": "1"}},
    )
    try:
        yield
    finally:
        ray.shutdown()


def test_an_outage_beyond_the_tolerance_is_retried_in_the_sweep_and_the_cell_resumes(
    ray_short_tolerance: None, proxy: OutageProxy, s3_bucket: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    import boto3

    epochs = 3
    spec = write_spec(
        tmp_path,
        tiny_spec(
            "requeue",
            {"seed": [31]},
            workload={"recipe": {"epochs": epochs}},
            storage_outage_tolerance_s=TOLERANCE_S,
            keep_checkpoints=4,
            max_failures=1,  # one worker-group restart inside Train, then the cell is lost to the outage
        ),
    )
    (cell,) = [c.cell_id for c in expand(load_spec(spec))]
    proxy.arm(rb"/cells/" + cell.encode() + rb"/checkpoint_[^/]*/state\.pt$", nth=2)

    code = sweep.main([str(spec), "--storage", f"{s3_bucket}/study"])
    out = capfd.readouterr().out
    (tmp_path / "driver.log").write_text(out)

    assert len(proxy.outages) == 1, "the outage never started: no second checkpoint upload was seen"
    assert code == sweep.EXIT_OK, out[-4000:]
    client = boto3.client("s3", endpoint_url=proxy.endpoint)
    bucket = s3_bucket.removeprefix("s3://")

    def stored(name: str) -> dict:
        body = client.get_object(Bucket=bucket, Key=f"study/requeue/cells/{cell}/{name}")["Body"].read()
        return dict(json.loads(body))

    assert re.search(
        r"storage: unreachable for \d+ s \(upload checkpoint checkpoint_\S+: OSError\); retrying for up to", out
    )
    # The worker gave up after the tolerance (not the hour a real sweep allows) and the cell went on in this sweep,
    # from the checkpoint registered before the outage: through Train's worker-group restart when the outage had
    # ended by then, else queued again by the sweep after its backoff (a machine's load decides which).
    assert re.search(rf"cell {cell} epoch 2/{epochs}, resumed from epoch 1", out), out[-4000:]
    outcomes = [a["outcome"] for a in stored("attempts.json")["attempts"]]
    assert outcomes[-1] == "finished" and set(outcomes[:-1]) <= {"lost"}, outcomes
    if "lost" in outcomes:
        assert f"cell {cell}: lost 1 time(s) so far; waiting 15 s before attempt 2" in out, out[-4000:]
    result = stored("result.json")
    assert result["status"] == "finished" and result["epochs"] == epochs and result["resumed_from_epoch"] == 1, result
