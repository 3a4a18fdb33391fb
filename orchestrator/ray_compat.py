"""Every place where the sweep reaches into Ray's private modules or flips a process-global Ray switch.

Written for and checked against Ray 2.60.0 (`RAY_VERSION`, the version pyproject.toml pins). Each function is one
workaround and says why it exists; on another Ray version the driver says once that these may no longer hold
(`check_ray_version`). The rest of the orchestrator uses Ray's public API only, and `orchestrator.sweep` has no
process-global side effects of its own: it calls `driver_environment` before `ray.init` and `prepare_driver`
after it; the runner calls `quiet_train_worker` in every Train worker.
"""

from __future__ import annotations

import logging
import os
import sys

RAY_VERSION = "2.60.0"

# The dashboard's Train view lists runs only with Train's state tracking on; it must be set before the Train
# controllers start, so it goes into the driver's environment and the job's runtime environment.
TRAIN_STATE_TRACKING = {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}

# Ray 2.60's Train state tracking builds Ray Data's default ingest options in every Train controller, and they
# set a field that Ray itself marks deprecated: two warning lines per cell in the sweep's log that no user can act
# on. The filter matches that message only.
RAY_INTERNAL_WARNING_FILTER = "ignore:`ExecutionOptions.exclude_resources` is deprecated:DeprecationWarning"

PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def check_ray_version(installed: str | None = None) -> str | None:
    """A warning line when the installed Ray is not the one these workarounds were written for, else None."""
    if installed is None:
        import ray

        installed = ray.__version__
    if installed == RAY_VERSION:
        return None
    return (
        f"warning: running on Ray {installed}; the sweep's Ray workarounds (orchestrator/ray_compat.py) were "
        f"written for Ray {RAY_VERSION} and may no longer apply"
    )


# Ray Train 2.60 fails a worker group that has not started within 60 s, and counts that against the cell's
# max_failures. A cell's trial starts its worker group only once the cluster can hold it
# (orchestrator.placement.wait_until_placeable), but the group's workers still have to start there: on a node the
# autoscaler has just added (a GPU pod pulling its image), or on a node that replaced a lost one, or on a 2-core
# machine running four raylets (tests/test_multinode_ray.py), that takes longer than 60 s. A user's own setting
# wins.
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
WORKER_GROUP_START_TIMEOUT_S = 600


def driver_environment() -> dict[str, str]:
    """Set the driver's Ray switches in its environment, before `ray.init`; return them for the job's runtime
    environment, so that a local Ray instance's processes (trials, Train controllers) get them too."""
    switches = dict(TRAIN_STATE_TRACKING)
    switches[WORKER_GROUP_START_TIMEOUT_ENV] = os.environ.get(
        WORKER_GROUP_START_TIMEOUT_ENV, str(WORKER_GROUP_START_TIMEOUT_S)
    )
    os.environ.update(switches)
    return switches


def prepare_driver(node_count: int, autoscaled: bool) -> None:
    """Everything the driver changes in Ray's own state once Ray is up (the docstrings below say why)."""
    warning = check_ray_version()
    if warning:
        print(warning, file=sys.stderr)
    keep_credentials_out_of_trial_runtime_envs()
    quiet_ray_console()
    skip_preemption_watcher_without_nodes_to_lose(node_count, autoscaled)


def keep_credentials_out_of_trial_runtime_envs() -> None:
    """Ray Tune copies AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/session tokens from the driver's environment into
    every trial actor's runtime_env, and Ray's runtime-env agent logs each runtime_env it creates in plain text
    (logs/runtime_env_agent.log, readable from the dashboard). Trials and Train workers get their credentials
    from their own environment instead: the raylet's (which `ray.init` and `ray start` inherit from the shell)
    or the pod's Secret on Kubernetes (deploy/). Found by tests/test_faults_ray.py's grep of the session logs."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = {
        name for name in class_cache.ENV_VARS_TO_PROPAGATE if not name.startswith("AWS_")
    }


def quiet_ray_console() -> None:
    """Keep the sweep's log to the sweep's own lines, plus whatever Ray says that a user can act on.

    - Every trial (and the Train controller each trial starts, which inherits the trial's environment) gets a
      PYTHONWARNINGS filter for `RAY_INTERNAL_WARNING_FILTER`, beside whatever filter the user set; Tune passes
      a variable on to its trials only if it is in its (private) propagation list.
    - Tune's newer console output prints a header and the path of its experiment folder even when silent; that
      folder is scratch here (deleted at the end: a sweep resumes from storage), so the classic output is used,
      which at verbosity 0 prints nothing, and Tune's INFO line naming the folder is dropped.
    """
    from ray.tune.execution import class_cache

    filters = [f for f in os.environ.get("PYTHONWARNINGS", "").split(",") if f]
    if RAY_INTERNAL_WARNING_FILTER not in filters:
        os.environ["PYTHONWARNINGS"] = ",".join([*filters, RAY_INTERNAL_WARNING_FILTER])
    class_cache.ENV_VARS_TO_PROPAGATE = set(class_cache.ENV_VARS_TO_PROPAGATE) | {"PYTHONWARNINGS"}
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger("ray.tune.tune").setLevel(logging.WARNING)
    # Tune's TensorBoard logger (one of the default trial loggers, whose files Tune's result grid reads back, so
    # they stay on) says at INFO, per trial, that it cannot store the trial's config: the whole grid Cell.
    logging.getLogger("ray.tune.logger.tensorboardx").setLevel(logging.WARNING)


def skip_preemption_watcher_without_nodes_to_lose(node_count: int, autoscaled: bool) -> bool:
    """Switch off Ray Train's preemption watcher on a single-node cluster that cannot grow; True if switched off.

    Ray Train 2.60 starts a PreemptionWatcher actor for every worker group (every cell) that polls for nodes being
    drained (a reclaimed spot instance, a KubeRay scale-down), so that workers learn of it before their node
    goes. One node and no autoscaler budget (a laptop, a CI box) leaves no node to drain but the one the driver
    itself runs on, so there the watcher is only one more process per cell and an error-level line per cell in
    the sweep's log (about its restart arguments). Wherever nodes can come and go it stays on, and a value the
    user set wins. Train reads the variable in the process that calls `fit()`, the Tune trial, which gets it
    from this (the driver's) environment: Tune passes Train's variables on to every trial.
    """
    if node_count != 1 or autoscaled or PREEMPTION_WATCHER_ENV in os.environ:
        return False
    os.environ[PREEMPTION_WATCHER_ENV] = "0"
    return True


def quiet_train_worker() -> None:
    """In a Train worker: Ray Train 2.60 logs every report at INFO ("Reporting training result N:
    TrainingReport(...)", hundreds of characters per epoch per cell, forwarded into the sweep's log) through a
    logger named after its source file, outside the "ray.train" logger that the runner's
    LoggingConfig(log_level="WARNING") quiets."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


# --- several nodes: nodes lost, nodes added by an autoscaler (issue 15, tests/test_multinode_ray.py) ----------

TRAIN_CONTROLLER_CLASS = "TrainController"


def remove_placement_groups_of_dead_train_controllers() -> list[str]:
    """Remove the worker placement groups whose Ray Train controller is dead; return their ids (hex).

    A cell's Train controller lives on its Tune trial's node (Train 2.60 pins it there). When that node is lost,
    the controller and the workers it owned die with it, but not the placement group it created for the workers:
    a placement group lives as long as the job that created it (here the sweep's driver), not as long as its
    creating actor. Ray Train 2.60 removes such groups from a detached `PlacementGroupCleaner` actor that polls
    the controller's liveness through the State API, which the dashboard serves (ray-project/ray#58515); on a
    cluster started without a dashboard every poll fails ("State API may be temporarily unavailable. Continuing
    to monitor.") and the group keeps the cell's CPUs and GPUs reserved on the nodes that survived. The retried
    trial's new worker group then waits for resources that never free up and fails after
    RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S. Found by tests/test_multinode_ray.py (losing the node of a trial and
    its controller).

    The GCS records who created each placement group and whether that actor is dead; a group created by a
    Train controller that is dead can never be used again, so removing it does what the cleaner would have done.
    Called before a cell's worker group is placed (orchestrator.placement.wait_until_placeable), and every few
    seconds by the driver while cells run (orchestrator.placement.releasing_dead_controllers_resources).
    """
    import ray
    from ray._private.state import actors, state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    table_data = gcs_pb2.PlacementGroupTableData  # type: ignore[attr-defined]  # generated, no stubs
    removed = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        group = table_data.FromString(raw)
        if group.is_detached or not group.creator_actor_dead or group.state == table_data.REMOVED:
            continue
        creator = actors(ray.ActorID(group.creator_actor_id).hex()) or {}
        if creator.get("ActorClassName") != TRAIN_CONTROLLER_CLASS:
            continue
        group_id = ray.PlacementGroupID(group.placement_group_id)
        try:
            remove_placement_group(PlacementGroup(group_id))
        except Exception:  # removed meanwhile (by Ray's own cleaner, where a dashboard runs): nothing left to do
            continue
        removed.append(group_id.hex())
    return removed


def autoscaler_node_types() -> list[tuple[str, dict[str, float], int]] | None:
    """The node types an autoscaler may add: (name, resources of one node, most nodes of the type; -1 for no
    limit), or None when the cluster has no autoscaler that reported its configuration.

    Ray's autoscaler (the KubeRay one and `ray start --autoscaling-config`) publishes its node types to the GCS;
    Ray reads them only through a private accessor (`ray._private.state.state.get_cluster_config`, which Ray
    Train 2.60 itself uses to refuse a worker group larger than the cluster can ever be).
    """
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    return [
        (group.name, {key: float(value) for key, value in group.resources.items()}, int(group.max_count))
        for group in config.node_group_configs
    ]
