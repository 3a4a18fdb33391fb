"""The driver's own Ray job: stopped, where the deployment asks for it, when no retry could help.

KubeRay reads only the Ray job's status, never the driver's exit status (README "Exit status and retries").
"""

from __future__ import annotations

import json
import os
import sys
import time

STOP_ON_INVALID_ENV = "SWEEP_STOP_JOB_ON_INVALID_SPEC"
# The head's Ray job API, where the driver runs (KubeRay starts the dashboard on the head, port 8265).
HEAD_DASHBOARD_URL = "http://127.0.0.1:8265"


def stop_this_ray_job(why: str = "an invalid spec", wait_s: float = 60.0) -> bool:
    """Where the deployment asks for it (SWEEP_STOP_JOB_ON_INVALID_SPEC=1 on a RayJob's head), stop the Ray job
    this driver runs in, so that it ends STOPPED rather than FAILED; returns False where it did not.

    KubeRay reads only the Ray job's status, never the driver's exit status: a FAILED job (any non-zero exit) is
    retried on a new cluster up to backoffLimit times, a STOPPED one is complete and never retried. A spec that is
    invalid stays invalid, so `orchestrator.sweep` calls this before it exits with status 2. The job supervisor
    then ends this process; were it still alive after `wait_s`, the driver exits as usual. The driver does the same
    for every other outcome a retry cannot change (README "Exit status and retries"), named by `why`.
    """
    if os.environ.get(STOP_ON_INVALID_ENV) != "1":
        return False
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", ""))
        submission_id = str(config["metadata"]["job_submission_id"])
    except (ValueError, KeyError, TypeError):
        return False  # not inside a Ray job
    try:
        from ray.job_submission import JobSubmissionClient

        JobSubmissionClient(HEAD_DASHBOARD_URL).stop_job(submission_id)
    except Exception as exc:  # the exit status still reports the error; KubeRay may retry, which is safe
        print(
            f"warning: could not stop Ray job {submission_id} ({type(exc).__name__}); it may be retried",
            file=sys.stderr,
        )
        return False
    print(f"stopping Ray job {submission_id}: {why} is not retried", file=sys.stderr, flush=True)
    time.sleep(wait_s)
    return True
