"""`python -m orchestrator.sweep SPEC [KEY=VALUE ...] [--storage URL] [--plan [--json]]`: run (or plan) a study.

Exit status: 0 every cell finished; 1 some cells failed (listed with their error); 2 invalid spec or arguments.
Under `ray job submit` the driver connects to the cluster; elsewhere `ray.init()` starts a local Ray instance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

# `ray job submit` runs the driver on the Ray head's Python, which may lack the project's packages (a head
# started outside .venv): one line naming the interpreter and the fix, not a traceback from the first import.
if __name__ == "__main__":
    from orchestrator.interpreter import check_interpreter

    check_interpreter()

from orchestrator import replication  # noqa: E402
from orchestrator.grid import Cell, Fork, describe_axes, fork_mismatch, fork_twins  # noqa: E402
from orchestrator.lease import DriverLease, LeaseHeldError  # noqa: E402
from orchestrator.placement import AUTOSCALER_MAX_ENV, NodeType  # noqa: E402
from orchestrator.plan import Plan, plan_spec  # noqa: E402
from orchestrator.plan_output import format_plan, plan_to_json  # noqa: E402
from orchestrator.provenance import changed_code, driver_provenance  # noqa: E402
from orchestrator.redact import redact  # noqa: E402
from orchestrator.report import build_report  # noqa: E402
from orchestrator.results import merge_epochs, write_results  # noqa: E402
from orchestrator.spec import Spec, SpecError, load_spec  # noqa: E402
from orchestrator.storage import (  # noqa: E402
    CONFIG_FILE,
    ERROR_FILE,
    HISTORY_FILE,
    RESULT_FILE,
    SweepStorage,
    resolve_storage_url,
)
from workloads.config import ForkConfig, TrainConfig, fork_point_file  # noqa: E402
from workloads.fs import OUTAGE_TOLERANCE_ENV, is_transient  # noqa: E402

# cells/<cell_id>/fork_point/epoch_<k>.pt (+ .json): a fork's parent's training state at the fork's switch epoch.
FORK_POINT_DIR = "fork_point"

# The exit-status and retry contract (README "Exit status and retries"): 0 and 1 are final, 2 is final and stops
# the driver's own Ray job (so KubeRay does not retry it on a new cluster), 3 is worth retrying as it is.
EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_RETRY = 0, 1, 2, 3


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
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="change a field of the spec, validated like the YAML: workload.recipe.epochs=2, grid.seed=[0,1,2], "
        "grid[1].norm=[bn] for a list-form grid; the stored spec.yaml holds the result",
    )
    parser.add_argument("--storage", help="storage URL overriding the spec's (path, file://, s3://bucket/prefix)")
    parser.add_argument("--plan", action="store_true", help="validate and plan only; runs nothing, needs no Ray")
    parser.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")
    parser.add_argument(
        "--rerun-changed",
        action="store_true",
        help="train again the finished cells whose results came from other workload code (their old result.json "
        "is kept under superseded/); without it they are listed and kept",
    )
    parser.add_argument(
        "--takeover", action="store_true", help="take the sweep over from a driver that holds its lease but is gone"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    if args.json and not args.plan:
        print("error: --json only goes with --plan", file=sys.stderr)
        return EXIT_INVALID
    try:
        spec = load_spec(args.spec, args.overrides)
        if args.storage is not None:  # an empty --storage (unset shell variable) is an error, not "no override"
            spec = spec.with_storage(args.storage)
        if not args.plan:
            spec = _lasting_storage(spec)
        cells = replication.initial_cells(spec)
        plan = plan_spec(spec, cells)
    except SpecError as err:
        if args.plan:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_INVALID
        # KubeRay retries a RayJob whose driver failed; an invalid spec would fail again on every new cluster.
        return _refuse(str(err), "an invalid spec")
    if args.plan:
        document, text = plan_to_json(plan), format_plan(plan)
        if spec.replication is not None:
            bounds = _replication_bounds(spec, plan)
            document["replication"] = bounds
            text += (
                f"\nreplication: {bounds['min_cells']} cells first ({bounds['min_device_hours']:.3g} {plan.unit}), "
                f"at most {bounds['max_cells']} ({bounds['max_device_hours']:.3g} {plan.unit}"
                + (", the budget" if bounds["budget_bound"] else "")
                + ") as undecided comparisons get more seeds"
            )
        print(json.dumps(document, indent=2) if args.json else text)
        return EXIT_OK
    return run_sweep(spec, cells, plan, takeover=args.takeover, rerun_changed=args.rerun_changed)


def _refuse(message: str, why: str) -> int:
    """Exit 2 for what no retry can change, stopping this driver's Ray job where the deployment asks for it."""
    from orchestrator import ray_job

    print(f"error: {message}", file=sys.stderr)
    ray_job.stop_this_ray_job(why)
    return EXIT_INVALID


def _replication_bounds(spec: Spec, plan: Plan) -> dict[str, float | int | bool]:
    """The least and the most a replicated sweep costs: its first seeds, and every setting at the maximum (capped
    by the budget, which the driver never exceeds)."""
    rep = spec.replication
    assert rep is not None
    most = plan_spec(spec, replication.maximum_cells(spec))
    budget = rep.budget_device_hours
    capped = budget is not None and most.total_device_hours > budget
    return {
        "min_cells": len(plan.cells),
        "min_device_hours": plan.total_device_hours,
        "max_cells": len(most.cells),
        "max_device_hours": min(most.total_device_hours, budget) if capped and budget else most.total_device_hours,
        "budget_bound": capped,
    }


def _lasting_storage(spec: Spec) -> Spec:
    """The spec with its storage outside a Ray job's temporary working directory (storage.resolve_storage_url)."""
    try:
        url, note = resolve_storage_url(spec.storage)
    except ValueError as err:
        raise SpecError(f"storage: {err}") from None
    if note:
        print(f"storage: {note}")
        spec = spec.with_storage(url)
    return spec


def run_sweep(spec: Spec, cells: list[Cell], plan: Plan, takeover: bool = False, rerun_changed: bool = False) -> int:
    storage = SweepStorage.for_sweep(spec.storage, spec.name)
    os.environ[OUTAGE_TOLERANCE_ENV] = f"{spec.storage_outage_tolerance_s:g}"  # the driver's own records too
    lease = DriverLease(storage)
    try:
        lease.acquire(takeover=takeover)
    except LeaseHeldError as err:
        return _refuse(str(err), "a sweep another live driver runs")
    except Exception as err:
        if is_transient(err):
            return _storage_unreachable(storage, err)
        raise
    try:
        status = _run_and_collect(spec, cells, plan, storage, rerun_changed)
    except Exception as err:
        if not is_transient(err):
            raise
        return _storage_unreachable(storage, err)
    finally:
        try:
            lease.release()
        except Exception as err:  # storage gone at the very end: the lease expires on its own after its TTL
            print(f"warning: the lease could not be released ({type(err).__name__}); it expires by itself")
    if status == EXIT_FAILED:
        # Cells that failed on their own (NaN, their own bugs) fail again on a new cluster: a person decides.
        from orchestrator import ray_job

        ray_job.stop_this_ray_job("a sweep whose cells failed on their own")
    return status


def _storage_unreachable(storage: SweepStorage, err: BaseException) -> int:
    print(
        f"error: the sweep's storage {storage.url} stayed unreachable ({type(err).__name__}: "
        f"{redact(str(err))[:300]}); submitting again resumes the sweep",
        file=sys.stderr,
    )
    return EXIT_RETRY


def _finished_cells(storage: SweepStorage, wanted: set[str], rerun_changed: bool) -> set[str]:
    """The cells to skip: finished ones, less those from other workload code when `rerun_changed` (whose old
    result is set aside first). Cells from other code that are kept are listed, so a table mixing two code
    versions is never a surprise (orchestrator.provenance)."""
    records = {cid: r for cid, r in storage.cell_records().items() if r["status"] == "finished" and cid in wanted}
    current = driver_provenance()["source_hash"]
    changed = changed_code(records, current)
    if changed:
        hashes = sorted({str((records[c].get("provenance") or {}).get("source_hash")) for c in changed})
        print(
            f"code: {len(changed)} finished cells came from other workload code (source hash "
            f"{', '.join(hashes)}; now {current}): {', '.join(changed)}"
        )
        if rerun_changed:
            for cell_id in changed:
                storage.set_aside_cell(cell_id)
            print("code: --rerun-changed: training them again (old results under cells/ID/superseded/)")
            return set(records) - set(changed)
        print("code: kept; pass --rerun-changed to train them again with this code")
    return set(records)


def _run_round(
    spec: Spec,
    storage: SweepStorage,
    cells: list[Cell],
    plan: Plan,
    rerun_changed: bool,
    total: int,
    *,
    later: Sequence[Cell] = (),
    prepare: Callable[[list[Cell]], list[Cell]] | None = None,
) -> int | None:
    """Run whichever of `cells` have not finished; an exit status when the sweep must stop, else None.

    `later`: cells of a next round that wait for these (forks), counted as still to run. `prepare` turns the cells
    about to run into what runs (a fork's parent that saves its fork point, a fork that starts from one)."""
    wanted = {cell.cell_id for cell in cells}
    finished = _finished_cells(storage, wanted, rerun_changed)
    todo = [cell for cell in cells if cell.cell_id not in finished]
    print(f"sweep {spec.name}: {len(cells)} cells, {len(finished)} already finished, {len(todo)} to run")
    print(f"storage: {storage.url}")
    if not todo:
        return None
    if prepare is not None:
        todo = prepare(todo)
    waiting = 0
    if later:
        records = storage.cell_records()
        waiting = sum(1 for cell in later if (records.get(cell.cell_id) or {}).get("status") != "finished")
    for cell in todo:
        storage.write_json(
            storage.cell_path(cell.cell_id, CONFIG_FILE),
            {
                "cell_id": cell.cell_id,
                "axes": cell.axes,
                "train": cell.config.model_dump(mode="json"),
                "provenance": driver_provenance(),
            },
        )
    try:
        _run_cells(spec, storage, todo, plan, already_finished=total - len(todo) - waiting, total=total)
    except InfeasibleError as err:
        return _refuse(str(err), "a sweep this cluster cannot run")
    return None


def _run_forking_round(
    spec: Spec, storage: SweepStorage, cells: list[Cell], plan: Plan, rerun_changed: bool, total: int
) -> int | None:
    """`_run_round`, in two rounds where the spec's `fork_bn_star` finds forks among `cells`: first every cell but
    the forks, their BN twins saving their state at the switch epoch, then the forks starting from those states
    (orchestrator.grid.fork_twins; Section 4.3). A fork that cannot start from its twin is said and trains from
    scratch: the same result, at the full cost."""
    forks = fork_twins(cells)[0] if spec.fork_bn_star else {}
    if not forks:
        return _run_round(spec, storage, cells, plan, rerun_changed, total)
    save_epochs: dict[str, set[int]] = {}
    for fork in forks.values():
        save_epochs.setdefault(fork.parent, set()).add(fork.epoch)

    def parents_save(todo: list[Cell]) -> list[Cell]:
        saving = []
        for cell in todo:
            if cell.cell_id in save_epochs:
                epochs = tuple(sorted(save_epochs[cell.cell_id]))
                cell = cell.with_fork(ForkConfig(save_epochs=epochs, save_to=fork_folder(storage, cell.cell_id)))
            saving.append(cell)
        return saving

    def forks_start(todo: list[Cell]) -> list[Cell]:
        parents = {cell.cell_id: cell for cell in cells}
        started = []
        for cell in todo:
            fork = forks[cell.cell_id]
            refusal = fork_refusal(storage, fork, cell.config, parents[fork.parent].axes)
            if refusal:
                print(f"fork: {refusal}; it trains from scratch")
                started.append(cell)
                continue
            start = fork_point_file(fork_folder(storage, fork.parent), fork.epoch)
            print(f"fork: cell {cell.cell_id} starts from cell {fork.parent} at epoch {fork.epoch}")
            started.append(cell.with_fork(ForkConfig(start_from=start, parent=fork.parent)))
        return started

    first = [cell for cell in cells if cell.cell_id not in forks]
    second = [cell for cell in cells if cell.cell_id in forks]
    print(f"fork: {len(second)} BN* cells start from their BN twins once these have trained")
    stop = _run_round(spec, storage, first, plan, rerun_changed, total, later=second, prepare=parents_save)
    if stop is not None:
        return stop
    stop = _run_round(spec, storage, second, plan, rerun_changed, total, prepare=forks_start)
    copy_fork_histories(storage, [forks[cell.cell_id] for cell in second])
    return stop


def fork_folder(storage: SweepStorage, cell_id: str) -> str:
    """Where cell `cell_id` keeps its fork points: beside its checkpoints, out of reach of their rotation."""
    return f"{storage.url.rstrip('/')}/cells/{cell_id}/{FORK_POINT_DIR}"


def fork_refusal(storage: SweepStorage, fork: Fork, config: TrainConfig, parent_axes: dict[str, Any]) -> str | None:
    """Why `fork` (whose resolved config is `config`) cannot start from its parent's state, naming both cells; None
    when it can: the parent finished, its stored config is the fork's twin, and its fork point is in storage."""
    child, parent = fork.cell_id, fork.parent
    what = f"cell {child} cannot fork from cell {parent} ({describe_axes(parent_axes)})"
    record = storage.read_json(storage.cell_path(parent, RESULT_FILE))
    if record is None or record.get("status", "finished") != "finished":
        error = storage.read_json(storage.cell_path(parent, ERROR_FILE)) or {}
        why = f"failed: {redact(str(error['error']))[:300]}" if error.get("error") else "has no result"
        return f"{what}: the parent {why}"
    stored = storage.read_json(storage.cell_path(parent, CONFIG_FILE)) or {}
    try:
        parent_config = TrainConfig.model_validate(stored.get("train"))
    except ValidationError:
        return f"{what}: the parent's {CONFIG_FILE} is missing or not a valid config"
    mismatch = fork_mismatch(parent_config, config)
    if mismatch:
        return f"{what}: their configs differ beyond BN*: {mismatch}"
    marker = storage.read_json(fork_point_file(storage.cell_path(parent, FORK_POINT_DIR), fork.epoch, ".json"))
    if marker is None:
        return (
            f"{what}: the parent saved no fork point at epoch {fork.epoch} (it trained without fork_bn_star, or "
            "before that epoch was asked for)"
        )
    return None


def copy_fork_histories(storage: SweepStorage, forks: Sequence[Fork]) -> None:
    """Give each finished fork the training curve of the epochs it took from its parent: the parent's history rows
    up to the fork's epoch, marked `forked_from`, where the fork has no row of its own (they are the epochs both
    trained alike, so the report's per-epoch curves run from the first epoch)."""
    for fork in forks:
        record = storage.read_json(storage.cell_path(fork.cell_id, RESULT_FILE)) or {}
        if record.get("forked_from") != fork.parent:
            continue
        parent = storage.read_json(storage.cell_path(fork.parent, HISTORY_FILE)) or {}
        prefix = [
            dict(row) | {"forked_from": fork.parent}
            for row in parent.get("epochs") or []
            if int(row["epoch"]) <= fork.epoch
        ]
        path = storage.cell_path(fork.cell_id, HISTORY_FILE)
        own = storage.read_json(path) or {"cell_id": fork.cell_id, "axes": record.get("axes") or {}}
        own["epochs"] = merge_epochs(prefix, own.get("epochs") or [])
        storage.write_json(path, own)


def _more_seeds(spec: Spec, storage: SweepStorage, cells: list[Cell], cost: dict[str, float]) -> list[Cell]:
    """The next round of noise-adaptive replication (orchestrator.replication), said in the log."""
    metric = replication.metric_of(spec)
    values = {cid: replication.result_value(r, metric) for cid, r in storage.cell_records().items()}
    known = {cell.cell_id for cell in cells}
    judgements = replication.judge(spec, cells, values)
    undecided = [j for j in judgements if not j.decided]
    more = [c for c in replication.next_cells(spec, cells, values, cost, judgements) if c.cell_id not in known]
    print(
        f"replication: {len(judgements) - len(undecided)} of {len(judgements)} comparisons decided on {metric}; "
        + (f"{len(more)} more cells (one more seed each)" if more else "no more cells (decided, at most, or budget)")
    )
    return more


def _run_and_collect(spec: Spec, cells: list[Cell], plan: Plan, storage: SweepStorage, rerun_changed: bool) -> int:
    storage.write_bytes_atomic(storage.path("spec.yaml"), spec.dump_yaml().encode())
    round_cells, round_plan = list(cells), plan
    cells = list(cells)
    cost = {c.cell_id: c.device_hours for c in plan.cells}
    while True:
        stop = _run_forking_round(spec, storage, round_cells, round_plan, rerun_changed, total=len(cells))
        if stop is not None:
            return stop
        if spec.replication is None:
            break
        round_cells = _more_seeds(spec, storage, cells, cost)
        if not round_cells:
            break
        round_plan = plan_spec(spec, round_cells)
        cost |= {c.cell_id: c.device_hours for c in round_plan.cells}
        cells += round_cells
    wanted = {cell.cell_id for cell in cells}
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
    write_results(storage, records.values(), spec.name, {cell.cell_id: cell.config for cell in cells})
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


def _resource_budget(
    cluster: dict[str, float],
    node_types: list[NodeType] | None = None,
    head: dict[str, float] | None = None,
) -> dict[str, float]:
    """The most the sweep may plan on: the live cluster, or what it can grow to. The deployment's
    SWEEP_AUTOSCALER_MAX_* say it where set; otherwise the autoscaler's own node types do (`node_types`, from
    Ray's GCS: the head's resources plus each type's node resources x its most nodes), unless a type has no limit
    (-1), where only the live cluster counts."""
    bounded = bool(node_types) and all(most >= 0 for _, _, most in node_types or [])
    budget = {}
    for resource, variable in AUTOSCALER_MAX_ENV.items():
        ceiling = os.environ.get(variable, "").strip()
        if ceiling:
            most = float(ceiling)
        elif bounded:
            most = (head or {}).get(resource, 0.0) + sum(r.get(resource, 0.0) * n for _, r, n in node_types or [])
        else:
            most = 0.0
        budget[resource] = max(float(cluster.get(resource, 0.0)), most)
    return budget


def _head_resources() -> dict[str, float]:
    """The head node's resources (the node holding Ray's `node:__internal_head__` marker)."""
    import ray

    for node in ray.nodes():
        resources = dict(node.get("Resources") or {})
        if node.get("Alive") and "node:__internal_head__" in resources:
            return resources
    return {}


def _materialise_data(storage: SweepStorage, cells: list[Cell]) -> dict[str, str]:
    """Bundled datasets (`builtin://digits`: scikit-learn's handwritten digits, shipped in the package) are
    converted once into the sweep's storage, so every worker reads them like any other sharded dataset."""
    from workloads import builtin_data

    urls = sorted({cell.config.data.url for cell in cells if builtin_data.is_builtin(cell.config.data.url)})
    try:
        return {url: builtin_data.materialise(url, storage.url) for url in urls}
    except ValueError as err:
        raise InfeasibleError(f"workload.data.url: {err}") from None


def request_capacity(running: list[Cell]) -> None:
    """Ask the autoscaler for room for every running cell's worker group: one bundle per worker. A cell's Train
    workers ask only once its trial has checked they can be placed (placement.wait_until_placeable), so without
    this a cluster that scaled down would never be asked to grow back. The request replaces the previous one;
    an empty list withdraws it."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[cell.worker_bundle() for cell in running for _ in range(cell.num_workers)])


def _run_cells(
    spec: Spec, storage: SweepStorage, todo: list[Cell], plan: Plan, already_finished: int, total: int
) -> None:
    import ray
    from ray import tune

    from orchestrator import ray_compat
    from orchestrator.placement import autoscaler_node_types, live_nodes, releasing_dead_controllers_resources
    from orchestrator.progress import SweepProgress
    from orchestrator.runner import TRIAL_CPU, resource_demand, run_cell
    from orchestrator.scheduler import ResourceBudgetSearcher
    from orchestrator.tracking import tracking_callbacks

    env = ray_compat.driver_environment()
    # Every process of the sweep rides out storage outages as long as the spec says (workloads.fs).
    env[OUTAGE_TOLERANCE_ENV] = os.environ[OUTAGE_TOLERANCE_ENV] = f"{spec.storage_outage_tolerance_s:g}"
    dashboard = "(connected to an existing Ray instance)"
    if not ray.is_initialized():
        context = ray.init(runtime_env={"env_vars": env})
        dashboard = f"dashboard: http://{context.dashboard_url}" if context.dashboard_url else "no dashboard"
    node_types = autoscaler_node_types()
    autoscaled = node_types is not None or any(os.environ.get(v, "").strip() for v in AUTOSCALER_MAX_ENV.values())
    ray_compat.prepare_driver(len(live_nodes()), autoscaled)
    data_urls = _materialise_data(storage, todo)
    runnable = [cell.with_data_url(data_urls.get(cell.config.data.url, cell.config.data.url)) for cell in todo]
    budget = _resource_budget(ray.cluster_resources(), node_types, _head_resources() if node_types else None)
    cost = {c.cell_id: c.device_hours for c in plan.cells}
    try:
        searcher = ResourceBudgetSearcher(
            runnable,
            [resource_demand(cell) for cell in runnable],
            budget,
            priority=[cost[cell.cell_id] for cell in runnable],
            on_running_change=request_capacity if autoscaled else None,
        )
    except ValueError as err:
        raise InfeasibleError(f"infeasible on this cluster: {err}") from None
    print(f"cluster: {budget['CPU']:g} CPUs, {budget['GPU']:g} GPUs; {dashboard}")
    epochs = {c.cell_id: c.config.recipe.epochs for c in todo}
    progress = SweepProgress(spec.name, storage.url, total, already_finished, epochs)
    # Tune's own experiment state is scratch: resuming works from the cells' Train checkpoints in storage.
    with tempfile.TemporaryDirectory(prefix="sweep-tune-") as scratch:
        tuner = tune.Tuner(
            tune.with_resources(
                tune.with_parameters(run_cell, sweep_url=storage.url, provenance=driver_provenance()),
                {"CPU": TRIAL_CPU},
            ),
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=len(todo), reuse_actors=False),
            run_config=tune.RunConfig(
                name=f"{spec.name}-{int(time.time())}",
                storage_path=scratch,
                callbacks=[progress, *tracking_callbacks(spec, storage.url, driver_provenance())],
                verbose=0,
                # A trial lost with its node (or its Train controller lost with one) is run again and resumes
                # from the cell's checkpoints in storage; cells that fail on their own end their trials
                # normally (orchestrator.runner), so this retries only what the cluster lost.
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            ),
        )
        try:
            with releasing_dead_controllers_resources():
                grid = tuner.fit()
        finally:
            if autoscaled:
                request_capacity([])  # the sweep needs nothing more: let the autoscaler scale down
    for error in grid.errors:
        print(f"trial error: {redact(str(error).splitlines()[-1] if str(error) else repr(error))}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
