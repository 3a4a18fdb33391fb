"""`python -m orchestrator.sweep SPEC [--storage URL] [--plan [--json]]`: run (or plan) a whole study.

Exit status: 0 every cell finished; 1 some cells failed (listed with their error); 2 invalid spec or arguments.
Under `ray job submit` the driver connects to the cluster; elsewhere `ray.init()` starts a local Ray instance.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence

# `ray job submit` runs the driver on the Ray head's Python, which may lack the project's packages (a head
# started outside .venv): one line naming the interpreter and the fix, not a traceback from the first import.
if __name__ == "__main__":
    from orchestrator.interpreter import check_interpreter

    check_interpreter()
from typing import Any  # noqa: E402

from orchestrator.grid import Cell, describe_axes, expand  # noqa: E402
from orchestrator.lease import DriverLease, LeaseHeldError  # noqa: E402
from orchestrator.plan import Plan, format_plan, plan_spec, plan_to_json  # noqa: E402
from orchestrator.redact import redact  # noqa: E402
from orchestrator.report import build_report  # noqa: E402
from orchestrator.results import write_results  # noqa: E402
from orchestrator.spec import Spec, SpecError, load_spec  # noqa: E402
from orchestrator.storage import CONFIG_FILE, SweepStorage  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


class InfeasibleError(Exception):
    """The connected cluster cannot run the sweep as specified (found only once Ray is up)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_INVALID)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m orchestrator.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("spec", help="the study's YAML file, e.g. sweeps/smoke.yaml")
    parser.add_argument("--storage", help="storage URL overriding the spec's (path, file://, s3://bucket/prefix)")
    parser.add_argument("--plan", action="store_true", help="validate and plan only; runs nothing, needs no Ray")
    parser.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")
    parser.add_argument(
        "--takeover", action="store_true", help="take the sweep over from a driver that holds its lease but is gone"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.json and not args.plan:
        print("error: --json only goes with --plan", file=sys.stderr)
        return EXIT_INVALID
    try:
        spec = load_spec(args.spec)
        if args.storage is not None:  # an empty --storage (unset shell variable) is an error, not "no override"
            spec = spec.with_storage(args.storage)
        cells = expand(spec)
        plan = plan_spec(spec, cells)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        if not args.plan:
            # KubeRay retries a RayJob whose driver failed; an invalid spec would fail again on every new cluster.
            from orchestrator.deploy import stop_this_ray_job

            stop_this_ray_job()
        return EXIT_INVALID
    if args.plan:
        print(json.dumps(plan_to_json(plan), indent=2) if args.json else format_plan(plan))
        return EXIT_OK
    return run_sweep(spec, cells, plan, takeover=args.takeover)


def run_sweep(spec: Spec, cells: list[Cell], plan: Plan, takeover: bool = False) -> int:
    storage = SweepStorage.for_sweep(spec.storage, spec.name)
    lease = DriverLease(storage)
    try:
        lease.acquire(takeover=takeover)
    except LeaseHeldError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    try:
        return _run_and_collect(spec, cells, plan, storage)
    finally:
        lease.release()


def _run_and_collect(spec: Spec, cells: list[Cell], plan: Plan, storage: SweepStorage) -> int:
    storage.write_bytes_atomic(storage.path("spec.yaml"), spec.dump_yaml().encode())
    wanted = {cell.cell_id for cell in cells}
    finished = {cid for cid, r in storage.cell_records().items() if r["status"] == "finished" and cid in wanted}
    todo = [cell for cell in cells if cell.cell_id not in finished]
    print(f"sweep {spec.name}: {len(cells)} cells, {len(finished)} already finished, {len(todo)} to run")
    print(f"storage: {storage.url}")
    if todo:
        for cell in todo:
            storage.write_json(
                storage.cell_path(cell.cell_id, CONFIG_FILE),
                {"cell_id": cell.cell_id, "axes": cell.axes, "train": cell.config.model_dump(mode="json")},
            )
        try:
            _run_cells(spec, storage, todo, plan, already_finished=len(finished), total=len(cells))
        except InfeasibleError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_INVALID
    records = {cid: r for cid, r in storage.cell_records().items() if cid in wanted}
    missing = wanted - records.keys()
    for cell_id in sorted(missing):  # a trial that died before writing anything still shows as failed
        cell = next(c for c in cells if c.cell_id == cell_id)
        records[cell_id] = {
            "cell_id": cell_id,
            "axes": cell.axes,
            "status": "failed",
            "error": "no result recorded",
        }
    write_results(storage, records.values())
    failed = sorted((r for r in records.values() if r["status"] != "finished"), key=lambda r: r["cell_id"])
    print(f"results: {storage.url}/results.parquet ({len(records) - len(failed)} finished, {len(failed)} failed)")
    try:
        print(f"report: {build_report(storage.url)}")
    except Exception as err:  # the results are safe in storage; a report can be rebuilt with orchestrator.report
        print(f"warning: could not build the report ({type(err).__name__}: {redact(str(err))})", file=sys.stderr)
    for record in failed:
        axes = describe_axes(record["axes"])
        print(
            f"FAILED cell {record['cell_id']} ({axes}): {redact(record.get('error', 'unknown error'))}",
            file=sys.stderr,
        )
    return EXIT_FAILED if failed else EXIT_OK


# An autoscaling cluster (KubeRay) starts smaller than it can grow: its maximum is the budget, and cells wait for
# the autoscaler instead of being refused. Set by the deployment, e.g. SWEEP_AUTOSCALER_MAX_GPUS=128.
AUTOSCALER_MAX_ENV = {"CPU": "SWEEP_AUTOSCALER_MAX_CPUS", "GPU": "SWEEP_AUTOSCALER_MAX_GPUS"}


def _resource_budget(cluster: dict[str, float]) -> dict[str, float]:
    budget = {}
    for resource, variable in AUTOSCALER_MAX_ENV.items():
        ceiling = os.environ.get(variable, "").strip()
        budget[resource] = max(float(cluster.get(resource, 0.0)), float(ceiling) if ceiling else 0.0)
    return budget


BUILTIN_DATA = "builtin://"


def _materialise_data(storage: SweepStorage, cells: list[Cell]) -> dict[str, str]:
    """Bundled datasets (`builtin://digits`: scikit-learn's handwritten digits, shipped in the package) are
    converted once into the sweep's storage, so every worker reads them like any other sharded dataset."""
    from workloads import data

    converters = {"digits": data.digits_to_parquet}
    resolved: dict[str, str] = {}
    for url in sorted({cell.config.data.url for cell in cells if cell.config.data.url.startswith(BUILTIN_DATA)}):
        name = url.removeprefix(BUILTIN_DATA)
        if name not in converters:
            raise InfeasibleError(
                f"workload.data.url: unknown built-in dataset {url!r} (known: {', '.join(converters)})"
            )
        target = f"{storage.url}/datasets/{name}"
        try:
            data.read_info(target)
        except FileNotFoundError:
            print(f"preparing {url} in {target}")
            converters[name](target)
        resolved[url] = target
    return resolved


def _with_data_url(cell: Cell, data_urls: dict[str, str]) -> dict[str, Any]:
    """The cell's TrainConfig for the workers; only where the data lives changes (the cell id does not)."""
    config = cell.config.model_dump(mode="json")
    config["data"]["url"] = data_urls.get(cell.config.data.url, cell.config.data.url)
    return config


def request_capacity(running: list[dict[str, Any]]) -> None:
    """Ask the autoscaler for room for every running cell's worker group: one bundle per worker. A cell's Train
    workers ask only once its trial has checked they can be placed (runner.wait_until_placeable), so without
    this a cluster that scaled down would never be asked to grow back. The request replaces the previous one;
    an empty list withdraws it."""
    from ray.autoscaler.sdk import request_resources

    from orchestrator.runner import worker_bundle

    request_resources(bundles=[worker_bundle(cell) for cell in running for _ in range(cell["num_workers"])])


# Ray 2.60's Train state tracking (on for the dashboard's Train view) builds Ray Data's default ingest options in
# every Train controller, and they set a field that Ray itself marks deprecated: two warning lines per cell in the
# sweep's log that no user can act on. The filter matches that message only.
RAY_INTERNAL_WARNING_FILTER = "ignore:`ExecutionOptions.exclude_resources` is deprecated:DeprecationWarning"


def _quiet_ray_console() -> None:
    """Keep the sweep's log to the sweep's own lines, plus whatever Ray says that a user can act on.

    - Every trial (and the Train controller each trial starts, which inherits the trial's environment) gets a
      PYTHONWARNINGS filter for `RAY_INTERNAL_WARNING_FILTER`, beside whatever filter the user set.
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


def _keep_credentials_out_of_trial_runtime_envs() -> None:
    """Ray Tune copies AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/session tokens from the driver's environment into
    every trial actor's runtime_env, and Ray's runtime-env agent logs each runtime_env it creates in plain text
    (logs/runtime_env_agent.log, readable from the dashboard). Trials and Train workers get their credentials
    from their own environment instead: the raylet's (which `ray.init` and `ray start` inherit from the shell)
    or the pod's Secret on Kubernetes (deploy/). Found by tests/test_faults_ray.py's grep of the session logs."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = {
        name for name in class_cache.ENV_VARS_TO_PROPAGATE if not name.startswith("AWS_")
    }


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


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


def _run_cells(
    spec: Spec, storage: SweepStorage, todo: list[Cell], plan: Plan, already_finished: int, total: int
) -> None:
    import ray
    from ray import tune

    from orchestrator.progress import SweepProgress
    from orchestrator.runner import TRIAL_CPU, cell_payload, live_nodes, resource_demand, run_cell
    from orchestrator.scheduler import ResourceBudgetSearcher

    # The dashboard's Train view lists runs only with state tracking on; it must be set before the Train
    # controllers start, so it travels in the job's runtime environment.
    env = {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}
    os.environ.update(env)
    dashboard = "(connected to an existing Ray instance)"
    if not ray.is_initialized():
        context = ray.init(runtime_env={"env_vars": env})
        dashboard = f"dashboard: http://{context.dashboard_url}" if context.dashboard_url else "no dashboard"
    _keep_credentials_out_of_trial_runtime_envs()
    _quiet_ray_console()
    autoscaled = any(os.environ.get(variable, "").strip() for variable in AUTOSCALER_MAX_ENV.values())
    skip_preemption_watcher_without_nodes_to_lose(len(live_nodes()), autoscaled)
    data_urls = _materialise_data(storage, todo)
    budget = _resource_budget(ray.cluster_resources())
    payloads = [
        cell_payload(
            cell.cell_id,
            cell.axes,
            _with_data_url(cell, data_urls),
            sweep_url=storage.url,
            num_workers=cell.num_workers,
            use_gpu=spec.resources.use_gpu,
            gpus_per_worker=spec.resources.gpus_per_worker,
            cpus_per_worker=cell.cpus_per_worker,
            max_failures=cell.max_failures,
            keep_checkpoints=spec.keep_checkpoints,
            placement_timeout_s=spec.resources.placement_timeout_s,
        )
        for cell in todo
    ]
    cost = {c.cell_id: c.device_hours for c in plan.cells}
    try:
        searcher = ResourceBudgetSearcher(
            payloads,
            [resource_demand(p) for p in payloads],
            budget,
            priority=[cost[cell.cell_id] for cell in todo],
            on_running_change=request_capacity if autoscaled else None,
        )
    except ValueError as err:
        raise InfeasibleError(f"infeasible on this cluster: {err}") from None
    print(f"cluster: {budget['CPU']:g} CPUs, {budget['GPU']:g} GPUs; {dashboard}")
    progress = SweepProgress(spec.name, total, already_finished, {c.cell_id: c.config.recipe.epochs for c in todo})
    # Tune's own experiment state is scratch: resuming works from the cells' Train checkpoints in storage.
    with tempfile.TemporaryDirectory(prefix="sweep-tune-") as scratch:
        tuner = tune.Tuner(
            tune.with_resources(run_cell, {"CPU": TRIAL_CPU}),
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=len(todo), reuse_actors=False),
            run_config=tune.RunConfig(
                name=f"{spec.name}-{int(time.time())}", storage_path=scratch, callbacks=[progress], verbose=0
            ),
        )
        try:
            grid = tuner.fit()
        finally:
            if autoscaled:
                request_capacity([])  # the sweep needs nothing more: let the autoscaler scale down
    for error in grid.errors:
        print(f"trial error: {redact(str(error).splitlines()[-1] if str(error) else repr(error))}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
