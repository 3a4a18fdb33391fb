"""The Ray workarounds in one place (orchestrator.ray_compat): what each switches, and where it must not."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from orchestrator import ray_compat


@pytest.mark.parametrize(
    ("live_nodes", "autoscaled", "user_value", "switched_off"),
    [
        (1, False, None, True),  # a laptop or CI box: no node to drain but the driver's own
        (2, False, None, False),  # another node could be drained
        (1, True, None, False),  # a KubeRay cluster that starts with its head alone and grows
        (1, False, "1", False),  # the user's own setting wins
    ],
)
def test_preemption_watcher_is_off_only_where_no_node_can_be_lost(
    live_nodes: int, autoscaled: bool, user_value: str | None, switched_off: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if user_value is None:
        monkeypatch.delenv(ray_compat.PREEMPTION_WATCHER_ENV, raising=False)
    else:
        monkeypatch.setenv(ray_compat.PREEMPTION_WATCHER_ENV, user_value)
    assert ray_compat.skip_preemption_watcher_without_nodes_to_lose(live_nodes, autoscaled) is switched_off
    expected = "0" if switched_off else user_value
    assert os.environ.get(ray_compat.PREEMPTION_WATCHER_ENV) == expected


def test_version_check_names_both_versions_only_on_a_mismatch() -> None:
    assert ray_compat.check_ray_version(ray_compat.RAY_VERSION) is None
    warning = ray_compat.check_ray_version("2.61.0")
    assert warning is not None and "2.61.0" in warning and ray_compat.RAY_VERSION in warning


def test_installed_ray_is_the_one_the_workarounds_were_written_for() -> None:
    """pyproject.toml pins Ray; a bump must come with a look at every workaround in ray_compat."""
    import ray

    assert ray.__version__ == ray_compat.RAY_VERSION
    assert ray_compat.check_ray_version() is None


def test_driver_set_up_keeps_credentials_out_of_trials_and_passes_the_warning_filter_on() -> None:
    """Run in a fresh interpreter: the functions change Ray's process-global propagation list."""
    code = (
        "from ray.tune.execution import class_cache\n"
        "assert any(n.startswith('AWS_') for n in class_cache.ENV_VARS_TO_PROPAGATE), 'Tune no longer copies AWS_*'\n"
        "from orchestrator import ray_compat\n"
        "ray_compat.keep_credentials_out_of_trial_runtime_envs()\n"
        "ray_compat.quiet_ray_console()\n"
        "import os\n"
        "assert not any(n.startswith('AWS_') for n in class_cache.ENV_VARS_TO_PROPAGATE)\n"
        "assert 'PYTHONWARNINGS' in class_cache.ENV_VARS_TO_PROPAGATE\n"
        "assert ray_compat.RAY_INTERNAL_WARNING_FILTER in os.environ['PYTHONWARNINGS'].split(',')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_trials_get_a_worker_group_start_timeout_a_new_node_can_meet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ray_compat.WORKER_GROUP_START_TIMEOUT_ENV, raising=False)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_STATE_TRACKING", raising=False)
    switches = ray_compat.driver_environment()
    assert switches[ray_compat.WORKER_GROUP_START_TIMEOUT_ENV] == "600"
    assert os.environ[ray_compat.WORKER_GROUP_START_TIMEOUT_ENV] == "600"  # the driver's own Ray processes too
    assert switches["RAY_TRAIN_ENABLE_STATE_TRACKING"] == "1"
    monkeypatch.setenv(ray_compat.WORKER_GROUP_START_TIMEOUT_ENV, "90")  # the user's choice wins
    assert ray_compat.driver_environment()[ray_compat.WORKER_GROUP_START_TIMEOUT_ENV] == "90"
