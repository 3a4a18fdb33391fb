"""`deploy render`: an overlay fitted to a spec (its worker group sized from the plan, the entrypoint pointed at
the spec, deadlines and the autoscaler budget set), checked, as one multi-document YAML file."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestrator.deploy.layout import (
    ENTRYPOINT_COMMAND,
    GPU,
    IMAGE_NAME,
    INT32_MAX,
    LOCAL_OVERLAYS,
    MAX_RAYJOB_NAME,
    PROJECT_ROOT,
    RAY_CPU_HEADROOM,
    SPEC_DIR,
    STARTUP_SECONDS,
    STORAGE_VAR,
)
from orchestrator.deploy.manifests import build, is_project_image, overlay_dir
from orchestrator.deploy.rules import (
    DeployError,
    Doc,
    autoscaler_budget,
    cluster_spec,
    containers,
    doc_id,
    env_value,
    is_pinned,
    pod_shape,
    ray_container,
    ray_pods,
)
from orchestrator.deploy.validation import check_manifests
from orchestrator.grid import Cell, expand
from orchestrator.placement import AUTOSCALER_MAX_ENV
from orchestrator.plan import input_cpus_per_worker, plan_spec
from orchestrator.spec import Spec, load_spec

# ------------------------------------------------------------------------------------------------------------
# Fitting the worker group to a spec


@dataclass(frozen=True)
class WorkerGroupSize:
    """The worker group a spec needs: it starts at `replicas` pods, can grow to `max_replicas` (the spec's whole
    cluster, which holds its largest cell) and the autoscaler may release idle pods down to `min_replicas` (0)."""

    replicas: int
    min_replicas: int
    max_replicas: int
    gpus_per_pod: int  # 0 for a CPU group
    workers_per_pod: int
    cpus_per_pod: float  # the overlay's, or more where the cells' input pipelines need more to feed the GPUs


def size_worker_group(
    spec: Spec, cells: Sequence[Cell], pod_cpus: float, pod_gpus: int, input_cpus_per_worker: int = 1
) -> WorkerGroupSize:
    """Size a worker group of pods with `pod_cpus` CPUs and `pod_gpus` GPUs (the overlay's) for `spec`.

    GPU specs: a pod holds one node's GPUs (resources.gpus_per_node, at most cluster_gpus); the group grows to at
    most cluster_gpus GPUs, which must hold the largest cell. Its pods get the overlay's CPUs, or more where
    `input_cpus_per_worker` (the plan's CPUs per worker that decode images as fast as the GPUs consume them, the
    training loop included) times the workers of a pod, plus Ray's headroom, exceeds them: the decoding processes
    run beside each worker, and GPUs that wait on data waste the most expensive part of the cluster. The spec's
    own resources.cpus_per_worker must fit the overlay's pods as they are (that is what Ray reserves).
    CPU specs: as many pods as the largest cell needs, or
    resources.cluster_cpus worth of pods. The group starts at its maximum, so the first cells need not wait for
    nodes, and `min_replicas` is 0: the autoscaler releases nodes that stay idle (the sweep's tail, a wait for a
    large cell) and adds them back on demand. Raises DeployError if impossible.
    """
    r = spec.resources
    if r.use_gpu:
        if pod_gpus == 0:
            raise DeployError(
                f"spec {spec.name!r} uses GPUs (resources.use_gpu: true) but the overlay's worker group requests "
                "none; use an overlay with a GPU worker group, e.g. gpu-cluster"
            )
        gpus_per_pod = min(r.gpus_per_node, r.cluster_gpus)
        slots = gpus_per_pod // r.gpus_per_worker
        needed_cpus = slots * r.cpus_per_worker + RAY_CPU_HEADROOM
        if needed_cpus > pod_cpus + 1e-9:
            raise DeployError(
                f"a worker pod holds {slots} workers x {r.cpus_per_worker:g} CPUs (resources.cpus_per_worker) + "
                f"{RAY_CPU_HEADROOM:g} for Ray = {needed_cpus:g} CPUs but the overlay's worker pods have "
                f"{pod_cpus:g}; lower resources.cpus_per_worker or raise the overlay's worker cpu"
            )
        min_pods = max(math.ceil(cell.num_workers / slots) for cell in cells)
        max_pods = r.cluster_gpus // gpus_per_pod
        if max_pods < min_pods:
            raise DeployError(
                f"the largest cell needs {min_pods} pods of {gpus_per_pod} GPUs but resources.cluster_gpus "
                f"({r.cluster_gpus}) holds only {max_pods}; make cluster_gpus a multiple of gpus_per_node"
            )
        fed = slots * max(r.cpus_per_worker, input_cpus_per_worker) + RAY_CPU_HEADROOM
        return WorkerGroupSize(max_pods, 0, max_pods, gpus_per_pod, slots, max(pod_cpus, fed))
    slots = math.floor((pod_cpus - RAY_CPU_HEADROOM) / r.cpus_per_worker + 1e-9)
    if slots < 1:
        raise DeployError(
            f"a worker needs {r.cpus_per_worker:g} CPUs (resources.cpus_per_worker) + {RAY_CPU_HEADROOM:g} for Ray "
            f"but the overlay's worker pods have {pod_cpus:g}; lower cpus_per_worker or raise the overlay's worker cpu"
        )
    min_pods = max(math.ceil(cell.num_workers / slots) for cell in cells)
    max_pods = min_pods if r.cluster_cpus is None else math.floor(r.cluster_cpus / pod_cpus + 1e-9)
    if max_pods < min_pods:
        raise DeployError(
            f"the largest cell needs {min_pods} worker pods of {pod_cpus:g} CPUs but resources.cluster_cpus "
            f"({r.cluster_cpus}) holds only {max_pods}"
        )
    return WorkerGroupSize(max_pods, 0, max_pods, pod_gpus, slots, pod_cpus)


def deadline_seconds(makespan_hours: float) -> int:
    """activeDeadlineSeconds for a sweep: twice the plan's makespan plus start-up, in whole hours (int32)."""
    seconds = 2 * makespan_hours * 3600 + STARTUP_SECONDS
    return min(INT32_MAX, math.ceil(seconds / 3600) * 3600)


def rayjob_name(spec_name: str) -> str:
    """`sweep-<spec name>` as a DNS-1035 label within KubeRay's RayJob name limit."""
    name = re.sub(r"[^a-z0-9-]", "-", f"sweep-{spec_name}".lower())[:MAX_RAYJOB_NAME]
    return name.rstrip("-")


def entrypoint_for(spec_path: str) -> str:
    return f'{" ".join(ENTRYPOINT_COMMAND)} {spec_path} --storage "${{{STORAGE_VAR}}}"'


def project_spec_path(path: str | Path) -> str:
    """`path` relative to the project root, as the image has it; it must be a file under sweeps/."""
    resolved = Path(path).resolve()
    try:
        relative = resolved.relative_to(PROJECT_ROOT)
    except ValueError:
        raise DeployError(
            f"{path}: a spec must be inside the project's {SPEC_DIR}/ (the image holds that folder)"
        ) from None
    text = relative.as_posix()
    if relative.parts[0] != SPEC_DIR or not re.fullmatch(r"[A-Za-z0-9._/-]+", text):
        raise DeployError(f"{path}: a spec must be a file under {SPEC_DIR}/ with a plain name (letters, digits, ._-)")
    return text


def _worker_group(job: Doc) -> Doc:
    groups = (cluster_spec(job) or {}).get("workerGroupSpecs") or []
    if len(groups) != 1:
        raise DeployError(f"{doc_id(job)}: render fits exactly one worker group, found {len(groups)}")
    group: Doc = groups[0]
    return group


def set_autoscaler_budget(doc: Doc) -> None:
    """Set the driver's budget variables on the head's Ray container to the cluster's maximum (in place)."""
    budget = autoscaler_budget(doc)
    head = ray_container(ray_pods(doc)[0].template)
    env = head.setdefault("env", [])
    for resource, variable in AUTOSCALER_MAX_ENV.items():
        entry = next((e for e in env if isinstance(e, dict) and e.get("name") == variable), None)
        if entry is None:
            entry = {"name": variable}
            env.append(entry)
        entry.pop("valueFrom", None)
        entry["value"] = env_value(budget[resource])


def image_problem(image: str, overlay: str) -> str | None:
    """Why `image` cannot run on `overlay` (None if it can): a cluster overlay pulls from a registry, by digest."""
    if overlay in LOCAL_OVERLAYS or is_pinned(image):
        return None
    return (
        f"--image {image!r} is a mutable tag; overlay {overlay!r} pulls from a registry and needs a digest: "
        f"REGISTRY/{IMAGE_NAME}:TAG@sha256:<64 hex> (docs/kubernetes.md)"
    )


def render(spec_path: str | Path, overlay: str, image: str | None = None) -> list[Doc]:
    """The overlay's objects with its RayJob fitted to the spec at `spec_path`; raises DeployError or SpecError."""
    directory = overlay_dir(overlay)
    why = image_problem(image, overlay) if image is not None else None
    if why:
        raise DeployError(why)
    relative = project_spec_path(spec_path)
    spec = load_spec(spec_path)
    cells = expand(spec)
    docs = build(directory)
    jobs = [doc for doc in docs if doc.get("kind") == "RayJob"]
    if len(jobs) != 1:
        raise DeployError(f"overlay {overlay!r} must define exactly one RayJob, found {len(jobs)}")
    job = jobs[0]
    group = _worker_group(job)
    pod_cpus, pod_gpus = pod_shape(group)
    r = spec.resources
    if r.use_gpu:
        plan = plan_spec(spec, cells)  # the checks and makespan of `--plan`: a cell that never fits is a SpecError
        size = size_worker_group(spec, cells, pod_cpus, pod_gpus, input_cpus_per_worker(plan.cells))
    else:
        size = size_worker_group(spec, cells, pod_cpus, pod_gpus)
        # Plan on the worker pods being rendered, not on the CPUs of the machine that renders them.
        cpus = max(1, math.floor(size.max_replicas * size.workers_per_pod * r.cpus_per_worker + 1e-9))
        plan = plan_spec(spec.model_copy(update={"resources": r.model_copy(update={"cluster_cpus": cpus})}), cells)

    job["metadata"]["name"] = rayjob_name(spec.name)
    job["spec"]["entrypoint"] = entrypoint_for(relative)
    job["spec"]["activeDeadlineSeconds"] = deadline_seconds(plan.makespan_hours)
    group["replicas"], group["minReplicas"], group["maxReplicas"] = (
        size.replicas,
        size.min_replicas,
        size.max_replicas,
    )
    resources = ray_container(group["template"]).setdefault("resources", {})
    if size.gpus_per_pod:
        for key in ("requests", "limits"):
            resources.setdefault(key, {})[GPU] = size.gpus_per_pod
    if size.cpus_per_pod > pod_cpus:
        # Whole CPUs: KubeRay rounds a fractional cpu up for Ray's num-cpus, so the budget below stays exact.
        for key in ("requests", "limits"):
            resources.setdefault(key, {})["cpu"] = str(math.ceil(size.cpus_per_pod - 1e-9))
    set_autoscaler_budget(job)
    if image is not None:
        for doc in docs:
            for container in containers(doc):
                if is_project_image(str(container.get("image", ""))):
                    container["image"] = image
    problems = check_manifests(docs, cluster_target=overlay not in LOCAL_OVERLAYS)
    if problems:
        raise DeployError(f"the rendered manifests break {len(problems)} rule(s): {'; '.join(problems)}")
    return docs


def worker_group_summary(docs: Sequence[Doc]) -> str:
    """One line on the rendered RayJob's worker group: pods, and each pod's GPUs and CPUs."""
    job = next(doc for doc in docs if doc.get("kind") == "RayJob")
    group = _worker_group(job)
    cpus, gpus = pod_shape(group)
    return (
        f"worker group {group.get('groupName')}: {group['minReplicas']}-{group['maxReplicas']} pods "
        f"(starting at {group['replicas']}) of {gpus} GPUs and {cpus:g} CPUs each"
    )


def dump_documents(docs: Sequence[Doc], header: str = "") -> str:
    body = yaml.safe_dump_all(list(docs), sort_keys=False, default_flow_style=False, width=120)
    return header + body
