"""Running a sweep on Kubernetes with KubeRay: render the manifests for a spec and check them (docs/design.md 7).

    python -m orchestrator.deploy render --spec SPEC --overlay gpu-cluster --image IMAGE@DIGEST [--out OUT]
    python -m orchestrator.deploy check

`render` builds an overlay of deploy/overlays, fits its worker group to the spec's plan (the largest cell must fit,
the whole group must stay within resources.cluster_gpus), points the RayJob's entrypoint at the spec, checks the
result against the rules below and writes one multi-document YAML file for `kubectl apply -f`. Exit status 2 with
a one-line message for an unknown overlay, an invalid spec or a spec the overlay cannot run. `check` builds every
overlay, deploy/raycluster and deploy/monitoring, validates the RayJob and RayCluster objects against the KubeRay
schemas in deploy/schemas/kuberay (a missing schema is a problem, not a skipped check), checks the Grafana dashboard,
scans deploy/ for secrets, and prints every broken rule (exit status 1 if any).

Rendering is a small, exact subset of kustomize in Python (`build`): `resources` (files, and directories with a
kustomization.yaml), `patches` holding RFC 6902 JSON patches with a `target`, and `images`. Anything else in a
kustomization.yaml is an error, never silently ignored, so neither kubectl nor kustomize is needed to render;
tests/test_deploy.py compares `build` with `kubectl kustomize` where kubectl is installed, so `kubectl apply -k`
creates the same objects.

The rules, each a function that returns one line per problem (and each broken on purpose in the tests):

- `check_versions`: rayVersion and the project image's tag carry the Ray version pinned in pyproject.toml
  (tags are `<ray version>-<gpu|cpu>[-<revision>]`, e.g. 2.60.0-gpu-1a2b3c4).
- `check_entrypoint`: a RayJob runs `python -m orchestrator.sweep sweeps/<file> [--storage ...]`, one plain
  command (the submitter's shell would run `;` or `&&` itself), on a spec that exists and validates.
- `check_submission`: a RayJob is submitted in HTTPMode (the operator submits and polls the job; no submitter pod
  follows a log stream), has no submitter settings, is retried (`backoffLimit` >= 1) and stops its own Ray job on
  an invalid spec (`SWEEP_STOP_JOB_ON_INVALID_SPEC=1` on the head), which KubeRay does not retry.
- `check_pod_env`: the head, every worker group and any job submitter read the S3 Secret and the ConfigMap.
- `check_resources`: the head has `num-cpus: "0"` and no GPU; workers of the GPU image request GPUs, workers of
  the CPU image none; autoscaling bounds are consistent and real (`minReplicas` < `maxReplicas`).
- `check_head`: the head stays off the GPUs: `num-gpus: "0"`, `NVIDIA_VISIBLE_DEVICES=void`, a CPU-pool node
  selector and no GPU toleration, CPU and memory requests; it declares the metrics ports Prometheus scrapes.
- `check_monitoring`: the head PodMonitor scrapes `metrics`, `as-metrics` and `dash-metrics`, the workers'
  `metrics`.
- `check_autoscaler_budget`: the head, where the driver runs, sets the driver's budget on an autoscaling cluster,
  SWEEP_AUTOSCALER_MAX_GPUS and SWEEP_AUTOSCALER_MAX_CPUS (orchestrator.sweep), to the most the cluster can hold:
  the head's own plus, for every worker group, maxReplicas x its pods' GPUs (CPUs), as KubeRay starts them.
- `check_names`: RayJob names at most 47 characters, RayCluster names at most 53, both DNS-1035 labels
  (KubeRay's MaxRayJobNameLength / MaxRayClusterNameLength).
- `check_token_auth`: Ray token authentication stays on (`authOptions.mode: token`, never RAY_AUTH_MODE=disabled).
- `check_committed_files`: no credential in any file under deploy/ (AWS key ids, private keys, tokens, passwords
  in URLs, and Secret or credential-named values other than placeholders such as REPLACE_WITH_...).
- `check_grafana_dashboard`: deploy/monitoring/grafana-dashboard.json parses and every query names a metric the
  product exports (the sweep's gauges, orchestrator.progress) or Ray's own dashboards chart.
- `check_dockerfile`: the Dockerfile builds on rayproject/ray of the pinned Ray version and installs the pinned
  torch (CUDA build for GPU, CPU wheel for CPU), then the project, as a non-root user.
- orchestrator.deploy_rules: the head's Guaranteed QoS, priority, disruption guard and object store, Pod Security
  "restricted" everywhere, no service-account token but the head's, and images pinned by digest on a cluster
  target (every target but LOCAL_OVERLAYS; `render --image` for a cluster overlay must name a digest too).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import copy
import json
import math
import os
import re
import shlex
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.deploy_rules import (
    DeployError,
    Doc,
    check_head_disruption,
    check_head_priority,
    check_head_qos,
    check_image_digests,
    check_object_store,
    check_pod_security,
    check_service_account_tokens,
    cluster_spec,
    containers,
    doc_id,
    is_pinned,
    parse_cpu,
    parse_memory,
    ray_container,
    ray_pods,
    split_image,
    walk_mappings,
)
from orchestrator.grid import Cell, expand
from orchestrator.plan import input_cpus_per_worker, plan_spec
from orchestrator.spec import Spec, SpecError, _credential_in_text, load_spec, looks_like_credential_name
from orchestrator.sweep import AUTOSCALER_MAX_ENV

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEPLOY_DIR = PROJECT_ROOT / "deploy"
OVERLAYS_DIR = DEPLOY_DIR / "overlays"
RAYCLUSTER_DIR = DEPLOY_DIR / "raycluster"
MONITORING_DIR = DEPLOY_DIR / "monitoring"
# The KubeRay v1.7.0 JSON schemas (strict, offline) travel with the project; their README names the source.
SCHEMA_DIR = DEPLOY_DIR / "schemas" / "kuberay"
GRAFANA_DASHBOARD = MONITORING_DIR / "grafana-dashboard.json"

LOCAL_OVERLAYS = ("local",)  # overlays whose cluster runs on this machine, with the image built here
IMAGE_NAME = "adversarial-sweep"  # the last path component of the project image, any registry
FLAVOURS = ("gpu", "cpu")
S3_SECRET = "sweep-s3-credentials"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
SWEEP_CONFIG = "sweep-config"
STORAGE_VAR = "SWEEP_STORAGE"
APP_DIR = "/home/ray/app"  # the project inside the image (deploy/Dockerfile's WORKDIR)
# HTTPMode has no client to upload a working directory from: the image's copy is used in place.
WORKING_DIR = f"local://{APP_DIR}"
SUBMISSION_MODE = "HTTPMode"
STOP_ON_INVALID_ENV = "SWEEP_STOP_JOB_ON_INVALID_SPEC"
# The head's Ray job API, where the driver runs (KubeRay starts the dashboard on the head, port 8265).
HEAD_DASHBOARD_URL = "http://127.0.0.1:8265"
# What the head must carry to stay off the GPUs of the node it lands on.
HEAD_HIDDEN_GPUS = ("NVIDIA_VISIBLE_DEVICES", "void")
# Metrics ports of the head: the node's (Ray and the sweep), the autoscaler's and the dashboard's.
HEAD_METRICS_PORTS = {"metrics": 8080, "as-metrics": 44217, "dash-metrics": 44227}
SPEC_DIR = "sweeps"  # specs must live here: the image holds it, and the RayJob uploads it as the working directory
GPU = "nvidia.com/gpu"
ENTRYPOINT_COMMAND = ("python", "-m", "orchestrator.sweep")
MAX_RAYJOB_NAME = 47  # KubeRay: MaxRayClusterNameLength (53) - 6 for the generated cluster name's suffix
MAX_RAYCLUSTER_NAME = 53  # KubeRay: 63 - len("-serve-svc")
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
INT32_MAX = 2**31 - 1
# One CPU of every worker pod is left to the cell's Tune trial (0.01 CPU) and Ray's own processes.
RAY_CPU_HEADROOM = 1.0
STARTUP_SECONDS = 6 * 3600  # image pulls and node provisioning, added to twice the plan's makespan
PLACEHOLDER = re.compile(r"(REPLACE|CHANGE)[A-Z0-9_]*|<[^<>]+>|")
KUSTOMIZATION_KEYS = frozenset({"apiVersion", "kind", "resources", "patches", "images"})
RAY_KINDS = ("RayJob", "RayCluster")
PREEMPTION_POLICIES = ("PreemptLowerPriority", "Never")
# The kinds under deploy/ and their API versions (structure_problems knows their basic shape).
API_VERSIONS = {
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "Job": "batch/v1",
    "PriorityClass": "scheduling.k8s.io/v1",
    "PodDisruptionBudget": "policy/v1",
    "PodMonitor": "monitoring.coreos.com/v1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "RayJob": "ray.io/v1",
    "RayCluster": "ray.io/v1",
}


# ------------------------------------------------------------------------------------------------------------
# Reading YAML and walking manifests


def load_yaml_documents(path: Path) -> list[Doc]:
    """The non-empty documents of a (multi-document) YAML file; each must be a mapping."""
    try:
        documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except yaml.YAMLError as exc:
        raise DeployError(f"{path}: not valid YAML ({type(exc).__name__})") from None
    docs = [doc for doc in documents if doc is not None]
    for doc in docs:
        if not isinstance(doc, dict):
            raise DeployError(f"{path}: every document must be a mapping")
    return docs


def is_project_image(ref: str) -> bool:
    return split_image(ref)[0].rsplit("/", 1)[-1] == IMAGE_NAME


def image_flavour(ref: str) -> str | None:
    """'gpu' or 'cpu' from a project image tag like 2.60.0-gpu-1a2b3c4 (None if it has no flavour)."""
    tag = split_image(ref)[1] or ""
    match = re.fullmatch(r"[0-9][^-]*-(gpu|cpu)(-.+)?", tag)
    return match.group(1) if match else None


# ------------------------------------------------------------------------------------------------------------
# Building a kustomization (the subset the manifests use)


def build(path: Path) -> list[Doc]:
    """The objects `kubectl kustomize PATH` would print, for kustomizations within our subset."""
    return _build(path.resolve(), ())


def _build(path: Path, stack: tuple[Path, ...]) -> list[Doc]:
    if path in stack:
        raise DeployError(f"{path}: kustomization cycle")
    file = path / "kustomization.yaml"
    if not file.is_file():
        raise DeployError(f"{path}: no kustomization.yaml")
    loaded = load_yaml_documents(file)
    if len(loaded) != 1:
        raise DeployError(f"{file}: expected one document")
    kustomization = loaded[0]
    unknown = sorted(set(kustomization) - KUSTOMIZATION_KEYS)
    if unknown:
        raise DeployError(
            f"{file}: {', '.join(unknown)} not supported by orchestrator.deploy's renderer "
            f"(it supports {', '.join(sorted(KUSTOMIZATION_KEYS))}); express it as a JSON patch"
        )
    docs: list[Doc] = []
    for entry in kustomization.get("resources") or []:
        target = path / str(entry)
        if target.is_dir():
            docs.extend(_build(target.resolve(), (*stack, path)))
        elif target.is_file():
            # kustomize's default load restrictor: files must lie inside the kustomization's own folder.
            if not target.resolve().is_relative_to(path):
                raise DeployError(f"{file}: {entry!r} lies outside {path}; kustomize refuses it (use a directory)")
            docs.extend(load_yaml_documents(target))
        else:
            raise DeployError(f"{file}: resource {entry!r} not found")
    seen: set[str] = set()
    for doc in docs:
        if doc_id(doc) in seen:
            raise DeployError(f"{file}: {doc_id(doc)} defined twice")
        seen.add(doc_id(doc))
    for patch in kustomization.get("patches") or []:
        _apply_patch_entry(file, patch, docs)
    for image in kustomization.get("images") or []:
        _set_image(image, docs)
    return docs


def _apply_patch_entry(file: Path, entry: Doc, docs: list[Doc]) -> None:
    if "path" in entry:
        ops = yaml.safe_load((file.parent / entry["path"]).read_text(encoding="utf-8"))
    else:
        ops = yaml.safe_load(entry.get("patch") or "")
    if not isinstance(ops, list):
        raise DeployError(f"{file}: only JSON 6902 patches (a list of operations) are supported")
    target = entry.get("target") or {}
    extra = set(target) - {"group", "version", "kind", "name"}
    if not target or extra:
        raise DeployError(f"{file}: a patch needs a target of group, version, kind and name")
    matched = [doc for doc in docs if _matches(doc, target)]
    if not matched:
        raise DeployError(f"{file}: patch target {target} matches nothing")
    for doc in matched:
        try:
            apply_json_patch(doc, ops)
        except DeployError as err:
            raise DeployError(f"{file}: {err}") from None


def _matches(doc: Doc, target: Doc) -> bool:
    group, _, version = str(doc.get("apiVersion", "")).rpartition("/")
    actual = {
        "group": group,
        "version": version,
        "kind": doc.get("kind"),
        "name": (doc.get("metadata") or {}).get("name"),
    }
    return all(actual[key] == value for key, value in target.items())


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise DeployError(f"JSON pointer {path!r} must start with '/'")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _index(container: list[Any], token: str, path: str, *, end_ok: bool = False) -> int:
    if end_ok and token == "-":
        return len(container)
    if not token.isdigit() or int(token) > len(container) - (0 if end_ok else 1):
        raise DeployError(f"{path}: index {token} out of range")
    return int(token)


def apply_json_patch(doc: Doc, ops: Sequence[Any]) -> None:
    """RFC 6902 add, remove, replace and test, in place."""
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise DeployError(f"not a JSON patch operation: {op!r}")
        kind, path = op["op"], op["path"]
        tokens = _pointer(path)
        if not tokens:
            raise DeployError(f"{path!r}: patching the whole document is not supported")
        parent: Any = doc
        for token in tokens[:-1]:
            try:
                parent = parent[_index(parent, token, path)] if isinstance(parent, list) else parent[token]
            except (KeyError, TypeError):
                raise DeployError(f"{path}: {token!r} not found") from None
        last = tokens[-1]
        if kind == "add":
            if isinstance(parent, list):
                parent.insert(_index(parent, last, path, end_ok=True), copy.deepcopy(op["value"]))
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif kind in ("replace", "remove", "test"):
            if isinstance(parent, list):
                key: Any = _index(parent, last, path)
            elif isinstance(parent, dict) and last in parent:
                key = last
            else:
                raise DeployError(f"{path}: nothing to {kind}")
            if kind == "replace":
                parent[key] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[key]
            elif parent[key] != op["value"]:
                raise DeployError(f"{path}: test failed")
        else:
            raise DeployError(f"{path}: JSON patch op {kind!r} not supported (add, remove, replace, test)")


def _set_image(entry: Doc, docs: list[Doc]) -> None:
    """kustomize's `images`: a container whose image name equals `name` gets newName, newTag and/or digest (both:
    `name:tag@digest`, as kustomize 5 writes it)."""
    for doc in docs:
        for container in containers(doc):
            name, tag, digest = split_image(str(container.get("image", "")))
            if name != entry.get("name"):
                continue
            name = entry.get("newName") or name
            if "digest" in entry and "newTag" in entry:
                tag, digest = str(entry["newTag"]), entry["digest"]
            elif "digest" in entry:
                tag, digest = None, entry["digest"]
            elif "newTag" in entry:
                tag, digest = str(entry["newTag"]), None
            container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def overlay_names() -> list[str]:
    return sorted(p.name for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").is_file())


def overlay_dir(name: str) -> Path:
    names = overlay_names()
    if name not in names:
        raise DeployError(f"unknown overlay {name!r}; one of {', '.join(names)}")
    return OVERLAYS_DIR / name


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


def _pod_shape(group: Doc) -> tuple[float, int]:
    """(CPUs, GPUs) of a worker group's pods: KubeRay takes them from the limits, else the requests."""
    resources = ray_container(group.get("template") or {}).get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    cpu = limits.get("cpu", requests.get("cpu"))
    if cpu is None:
        raise DeployError(f"worker group {group.get('groupName')} sets no cpu limit or request")
    return parse_cpu(cpu), _gpu_count(limits.get(GPU, requests.get(GPU)))


def ray_node_resources(params: Doc, container: Doc) -> dict[str, float]:
    """The CPUs and GPUs of the Ray node KubeRay starts in a pod: rayStartParams num-cpus / num-gpus, else the Ray
    container's cpu (rounded up, as KubeRay does) and nvidia.com/gpu limits, else its requests."""
    resources = container.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    if "num-cpus" in params:
        cpus = float(params["num-cpus"])
    else:
        cpu = limits.get("cpu", requests.get("cpu"))
        cpus = float(math.ceil(parse_cpu(cpu) - 1e-9)) if cpu is not None else 0.0
    gpus = float(params["num-gpus"]) if "num-gpus" in params else float(_gpu_count(limits.get(GPU, requests.get(GPU))))
    return {"CPU": cpus, "GPU": gpus}


def autoscaler_budget(doc: Doc) -> dict[str, float]:
    """The most CPUs and GPUs a RayJob's or RayCluster's cluster can have: the head's own, plus maxReplicas pods of
    every worker group. Raises DeployError for a quantity that is not a number."""
    budget = {"CPU": 0.0, "GPU": 0.0}
    for pod in ray_pods(doc):
        if pod.role == "submitter":
            continue
        group = pod.group or {}
        try:
            node = ray_node_resources(group.get("rayStartParams") or {}, ray_container(pod.template))
        except ValueError:
            raise DeployError(f"{pod.where}: num-cpus or num-gpus is not a number") from None
        count = 1 if pod.role == "head" else group.get("maxReplicas")
        if not isinstance(count, int):
            raise DeployError(f"{pod.where}: maxReplicas is not an integer")
        for resource in budget:
            budget[resource] += count * node[resource]
    return budget


def _env_value(amount: float) -> str:
    return str(int(amount)) if float(amount).is_integer() else f"{amount:g}"


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
        entry["value"] = _env_value(budget[resource])


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
    pod_cpus, pod_gpus = _pod_shape(group)
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
    cpus, gpus = _pod_shape(group)
    return (
        f"worker group {group.get('groupName')}: {group['minReplicas']}-{group['maxReplicas']} pods "
        f"(starting at {group['replicas']}) of {gpus} GPUs and {cpus:g} CPUs each"
    )


def dump_documents(docs: Sequence[Doc], header: str = "") -> str:
    body = yaml.safe_dump_all(list(docs), sort_keys=False, default_flow_style=False, width=120)
    return header + body


# ------------------------------------------------------------------------------------------------------------
# Rules


def pinned_versions(pyproject: Path = PROJECT_ROOT / "pyproject.toml") -> dict[str, str]:
    """{'ray': '2.60.0', 'torch': '2.13.0', ...}: the `==` pins of pyproject.toml's runtime dependencies."""
    with pyproject.open("rb") as fh:
        dependencies = tomllib.load(fh)["project"]["dependencies"]
    pins: dict[str, str] = {}
    for requirement in dependencies:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*==\s*([^\s;,]+)\s*", requirement)
        if match:
            pins[match.group(1).lower()] = match.group(3)
    return pins


def check_versions(docs: Sequence[Doc], ray_version: str | None = None) -> list[str]:
    """rayVersion and every project image tag carry the pinned Ray version; Ray pods run the project image."""
    version = ray_version or pinned_versions()["ray"]
    tag_pattern = re.compile(rf"{re.escape(version)}-(gpu|cpu)(-[A-Za-z0-9_.-]+)?")
    problems: list[str] = []
    for doc in docs:
        cluster = cluster_spec(doc)
        if cluster is not None and str(cluster.get("rayVersion")) != version:
            problems.append(f"{doc_id(doc)}: rayVersion is {cluster.get('rayVersion')!r}, not the pinned {version!r}")
        for pod in ray_pods(doc):
            image = str(ray_container(pod.template).get("image", ""))
            if not is_project_image(image):
                problems.append(f"{pod.where}: runs {image!r}, not the project image (.../{IMAGE_NAME}:TAG)")
        for container in containers(doc):
            image = str(container.get("image", ""))
            tag = split_image(image)[1]
            if is_project_image(image) and (tag is None or not tag_pattern.fullmatch(tag)):
                problems.append(
                    f"{doc_id(doc)} container {container.get('name')}: image tag {tag!r} is not "
                    f"{version}-gpu or {version}-cpu (optionally -<revision>): the image must carry the pinned Ray"
                )
    return problems


def check_entrypoint(docs: Sequence[Doc], root: Path = PROJECT_ROOT) -> list[str]:
    """A RayJob runs one plain `python -m orchestrator.sweep sweeps/<spec> [--storage URL|${VAR}]` on a valid spec."""
    problems: list[str] = []
    config_keys = {
        key for doc in docs if doc.get("kind") == "ConfigMap" for key in (doc.get("data") or {}) if isinstance(key, str)
    }
    for doc in docs:
        if doc.get("kind") != "RayJob":
            continue
        where = f"{doc_id(doc)} entrypoint"
        spec = doc.get("spec") or {}
        entrypoint = str(spec.get("entrypoint", ""))
        # KubeRay pastes the entrypoint into the submitter's `bash -c` script: these would run in the submitter.
        if re.search(r"[;&|<>`\n]|\$\(", entrypoint):
            problems.append(f"{where}: {entrypoint!r} must be one plain command (no ; & | < > ` $( or newlines)")
            continue
        try:
            words = shlex.split(entrypoint)
        except ValueError as exc:
            problems.append(f"{where}: cannot be parsed ({exc})")
            continue
        if tuple(words[:3]) != ENTRYPOINT_COMMAND or len(words) < 4:
            problems.append(f"{where}: {entrypoint!r} does not run `{' '.join(ENTRYPOINT_COMMAND)} SPEC`")
            continue
        path, rest = words[3], words[4:]
        if len(rest) not in (0, 2) or (rest and rest[0] != "--storage"):
            problems.append(f"{where}: only `--storage URL` may follow the spec, got {' '.join(rest)!r}")
        elif rest:
            variable = re.fullmatch(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", rest[1])
            if not rest[1]:
                problems.append(f"{where}: --storage is empty")
            elif variable and variable.group(1) not in config_keys:
                problems.append(f"{where}: --storage uses ${variable.group(1)}, which no ConfigMap provides")
        if Path(path).is_absolute() or ".." in Path(path).parts or Path(path).parts[0] != SPEC_DIR:
            problems.append(f"{where}: spec {path!r} must be a relative path under {SPEC_DIR}/ (the image has it)")
            continue
        try:
            load_spec(root / path)
        except SpecError as err:
            problems.append(f"{where}: spec {path}: {str(err).splitlines()[0]}")
        runtime_env = yaml.safe_load(str(spec.get("runtimeEnvYAML") or "")) or {}
        if not isinstance(runtime_env, dict) or runtime_env.get("working_dir") != WORKING_DIR:
            problems.append(
                f"{where}: runtimeEnvYAML must set working_dir: {WORKING_DIR} (the image's project, used in place), "
                "where the relative spec path resolves"
            )
    return problems


def _reads(container: Doc, kind: str, name: str) -> bool:
    """Does `container` read the Secret/ConfigMap `name` (envFrom, or env valueFrom for every key we need)?"""
    ref_key = "secretRef" if kind == "Secret" else "configMapRef"
    for source in container.get("envFrom") or []:
        if ((source or {}).get(ref_key) or {}).get("name") == name:
            return True
    if kind == "Secret":
        wanted = set(S3_SECRET_KEYS)
        for env in container.get("env") or []:
            ref = ((env or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            if ref.get("name") == name:
                wanted.discard(env.get("name"))
        return not wanted
    return False


def check_pod_env(docs: Sequence[Doc]) -> list[str]:
    """Head, every worker group and any submitter read the S3 Secret and the sweep ConfigMap. The head's copy of
    the ConfigMap is also what expands ${SWEEP_STORAGE} in an HTTPMode entrypoint."""
    problems: list[str] = []
    for doc in docs:
        for pod in ray_pods(doc):
            container = ray_container(pod.template)
            if not _reads(container, "Secret", S3_SECRET):
                problems.append(f"{pod.where}: does not read the Secret {S3_SECRET} (envFrom secretRef)")
            if not _reads(container, "ConfigMap", SWEEP_CONFIG):
                problems.append(f"{pod.where}: does not read the ConfigMap {SWEEP_CONFIG} (envFrom configMapRef)")
    return problems


def _gpu_amounts(container: Doc) -> tuple[Any, Any]:
    resources = container.get("resources") or {}
    return (resources.get("limits") or {}).get(GPU), (resources.get("requests") or {}).get(GPU)


def _gpu_count(value: Any) -> int:
    """A GPU quantity (8 or "8") as an int; 0 when absent or not a whole number."""
    text = str(value).strip() if value is not None else ""
    return int(text) if text.isdigit() else 0


def _asks_gpus(value: Any) -> bool:
    return value is not None and str(value).strip() not in ("0", "")


def check_resources(docs: Sequence[Doc]) -> list[str]:
    """The head takes no work (num-cpus "0", no GPU); GPU-image workers request GPUs, CPU-image workers none."""
    problems: list[str] = []
    for doc in docs:
        cluster = cluster_spec(doc)
        if cluster is None:
            continue
        if cluster.get("enableInTreeAutoscaling") is not True:
            problems.append(f"{doc_id(doc)}: enableInTreeAutoscaling must be true (the worker group autoscales)")
        for pod in ray_pods(doc):
            container = ray_container(pod.template)
            limit, request = _gpu_amounts(container)
            params = (pod.group or {}).get("rayStartParams") or {}
            if pod.role == "head":
                if params.get("num-cpus") != "0":
                    problems.append(f'{pod.where}: rayStartParams num-cpus must be "0" (no training on the head)')
                if _asks_gpus(limit) or _asks_gpus(request) or _asks_gpus(params.get("num-gpus")):
                    problems.append(f"{pod.where}: must not request GPUs")
            elif pod.role == "worker":
                group: Doc = pod.group or {}
                bounds: list[Any] = [group.get(key) for key in ("minReplicas", "replicas", "maxReplicas")]
                if all(isinstance(b, int) for b in bounds) and not bounds[0] <= bounds[1] <= bounds[2]:
                    problems.append(f"{pod.where}: needs minReplicas <= replicas <= maxReplicas, got {bounds}")
                elif all(isinstance(b, int) for b in bounds) and bounds[0] >= bounds[2]:
                    problems.append(
                        f"{pod.where}: minReplicas {bounds[0]} >= maxReplicas {bounds[2]}: nothing is ever released; "
                        "an autoscaled group needs minReplicas below maxReplicas"
                    )
                flavour = image_flavour(str(container.get("image", "")))
                if flavour == "gpu" and _gpu_count(limit) < 1:
                    problems.append(f"{pod.where}: runs the GPU image but sets no {GPU} limit of at least 1")
                elif flavour == "gpu" and request is not None and _gpu_count(request) != _gpu_count(limit):
                    problems.append(f"{pod.where}: {GPU} request {request} differs from its limit {limit}")
                elif flavour == "cpu" and (
                    _asks_gpus(limit) or _asks_gpus(request) or _asks_gpus(params.get("num-gpus"))
                ):
                    problems.append(f"{pod.where}: runs the CPU image but requests GPUs")
    return problems


def _env(container: Doc) -> dict[str, Doc]:
    return {str(e.get("name")): e for e in container.get("env") or [] if isinstance(e, dict)}


def check_submission(docs: Sequence[Doc]) -> list[str]:
    """A RayJob survives months: HTTPMode (KubeRay submits the entrypoint and polls the job's status itself, and
    submits it again when a restarted head has lost it), so no submitter pod depends on a long-lived log stream;
    retries on (an interrupted sweep resumes from storage); an invalid spec stops its own Ray job, which KubeRay
    does not retry (`stop_this_ray_job`)."""
    problems: list[str] = []
    for doc in docs:
        if doc.get("kind") != "RayJob":
            continue
        where, spec = doc_id(doc), doc.get("spec") or {}
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode != SUBMISSION_MODE:
            problems.append(
                f"{where}: submissionMode is {mode}; use {SUBMISSION_MODE}: in K8sJobMode a submitter pod follows the "
                "job's log, and when that stream drops KubeRay fails the RayJob and deletes the cluster"
            )
        for field in ("submitterPodTemplate", "submitterConfig"):
            if field in spec:
                problems.append(f"{where}: {field} belongs to K8sJobMode; {SUBMISSION_MODE} has no submitter pod")
        backoff = spec.get("backoffLimit", 0)
        if not isinstance(backoff, int) or backoff < 1:
            problems.append(
                f"{where}: backoffLimit is {backoff!r}; an interrupted sweep must be retried (at least 1): it "
                "resumes from storage"
            )
        pods = ray_pods(doc)
        head = ray_container(pods[0].template) if pods else {}
        if str(_env(head).get(STOP_ON_INVALID_ENV, {}).get("value")) != "1":
            problems.append(
                f"{where} head: sets no {STOP_ON_INVALID_ENV}=1; a driver that refuses an invalid spec would fail "
                "its Ray job, and KubeRay would retry it on a new cluster backoffLimit times"
            )
    return problems


def _gpu_selector(selector: Doc) -> bool:
    return any(re.search(r"gpu|accelerator", f"{k}={v}", re.IGNORECASE) for k, v in selector.items())


def check_head(docs: Sequence[Doc]) -> list[str]:
    """The head stays off the GPUs and on a CPU node: num-gpus "0" (KubeRay passes none without a GPU limit, and
    Ray would count what the container sees), NVIDIA_VISIBLE_DEVICES=void (the CUDA image sets "all"), a node
    selector that is not a GPU one and no toleration of a GPU taint, CPU and memory requests the docs size the
    node by; and the metrics ports the head PodMonitor scrapes."""
    problems: list[str] = []
    for doc in docs:
        pods = [pod for pod in ray_pods(doc) if pod.role == "head"]
        for pod in pods:
            params = (pod.group or {}).get("rayStartParams") or {}
            spec = pod.template.get("spec") or {}
            container = ray_container(pod.template)
            if str(params.get("num-gpus")) != "0":
                problems.append(f'{pod.where}: rayStartParams num-gpus must be "0" (Ray would count visible GPUs)')
            name, value = HEAD_HIDDEN_GPUS
            if str(_env(container).get(name, {}).get("value")) != value:
                problems.append(f"{pod.where}: env {name} must be {value} (the CUDA image shows every GPU)")
            selector = spec.get("nodeSelector") or {}
            if not selector or _gpu_selector(selector):
                problems.append(f"{pod.where}: needs a nodeSelector for a CPU node pool, got {selector or 'none'}")
            for toleration in spec.get("tolerations") or []:
                key = str((toleration or {}).get("key") or "")
                # A GPU taint's key, or a toleration of every taint (no key, operator Exists).
                if GPU in key or (not key and (toleration or {}).get("operator") == "Exists"):
                    problems.append(f"{pod.where}: tolerates {toleration}; the head must not land on a GPU node")
            requests = (container.get("resources") or {}).get("requests") or {}
            if "cpu" not in requests or "memory" not in requests:
                problems.append(f"{pod.where}: needs cpu and memory requests (its node is sized by them)")
            ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or [] if isinstance(p, dict)}
            for port, number in HEAD_METRICS_PORTS.items():
                if ports.get(port) != number:
                    problems.append(f"{pod.where}: needs container port {port} = {number} for Prometheus")
    return problems


def check_monitoring(docs: Sequence[Doc]) -> list[str]:
    """The head PodMonitor scrapes the node's, the autoscaler's and the dashboard's metrics; the workers' PodMonitor
    the node's (KubeRay's and Ray's own samples do the same)."""
    problems: list[str] = []
    wanted = {"head": set(HEAD_METRICS_PORTS), "worker": {"metrics"}}
    for doc in docs:
        if doc.get("kind") != "PodMonitor":
            continue
        spec = doc.get("spec") or {}
        role = ((spec.get("selector") or {}).get("matchLabels") or {}).get("ray.io/node-type")
        ports = {e.get("port") for e in spec.get("podMetricsEndpoints") or [] if isinstance(e, dict)}
        missing = sorted(wanted.get(str(role), set()) - ports)
        if missing:
            problems.append(f"{doc_id(doc)}: scrapes no {', '.join(missing)} of the {role} pods")
    return problems


def requested_resources(docs: Sequence[Doc]) -> dict[str, float]:
    """What every pod of these objects asks the scheduler for, at the most pods they run at once: CPUs and bytes
    of memory. Counts the Ray head, the autoscaler beside it, maxReplicas pods of each worker group, any submitter,
    and Deployments (x replicas) and Jobs (one pod at a time)."""
    total = {"cpu": 0.0, "memory": 0.0}

    def add(resources: Doc | None, count: int = 1) -> None:
        requests = (resources or {}).get("requests") or {}
        total["cpu"] += count * (parse_cpu(requests["cpu"]) if "cpu" in requests else 0.0)
        total["memory"] += count * (parse_memory(requests["memory"]) if "memory" in requests else 0.0)

    for doc in docs:
        cluster = cluster_spec(doc)
        if cluster is not None:
            for pod in ray_pods(doc):
                count = int((pod.group or {}).get("maxReplicas") or 0) if pod.role == "worker" else 1
                for container in (pod.template.get("spec") or {}).get("containers") or []:
                    add(container.get("resources"), count)
            if cluster.get("enableInTreeAutoscaling"):
                add((cluster.get("autoscalerOptions") or {}).get("resources"))
        elif doc.get("kind") in ("Deployment", "Job"):
            spec = doc.get("spec") or {}
            count = int(spec.get("replicas", 1)) if doc.get("kind") == "Deployment" else 1
            for container in ((spec.get("template") or {}).get("spec") or {}).get("containers") or []:
                add(container.get("resources"), count)
    return total


# ------------------------------------------------------------------------------------------------------------
# The Grafana dashboard


_PROMQL_WORDS = frozenset(
    {
        *("sum", "avg", "min", "max", "count", "count_values", "topk", "bottomk", "quantile", "stddev", "stdvar"),
        *("by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool"),
        *("rate", "irate", "increase", "delta", "deriv", "abs", "ceil", "floor", "round", "clamp_min", "clamp_max"),
        *("vector", "scalar", "time", "absent", "sort", "sort_desc", "histogram_quantile"),
        *("max_over_time", "min_over_time", "avg_over_time", "last_over_time"),
        *("label_values", "label_replace", "label_join"),
    }
)


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers outside label matchers, groupings, strings,
    durations and function names. Grafana variables ($sweep) count as none."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set(re.findall(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)", text))
    return {name for name in names if name not in _PROMQL_WORDS and not re.fullmatch(r"[0-9eE]+", name)}


def exported_metrics() -> dict[str, set[str]]:
    """Metric names a sweep cluster exports, by source: the sweep's gauges (declared in orchestrator.progress and,
    for storage outages, workloads.fs; exported with Ray's `ray_` prefix) and those Ray's own Grafana dashboards
    chart."""
    sweep: set[str] = set()
    for module in ("orchestrator/progress.py", "workloads/fs.py"):
        source = (PROJECT_ROOT / module).read_text(encoding="utf-8")
        sweep |= {f"ray_{name}" for name in re.findall(r'Gauge\(\s*"([a-z_]+)"', source)}
    from ray.dashboard.modules.metrics.dashboards import default_dashboard_panels

    config = default_dashboard_panels.default_dashboard_config
    ray_own: set[str] = set()
    for panel in [*config.panels, *(panel for row in config.rows for panel in row.panels)]:
        for target in panel.targets:
            # Ray's expressions are format strings with a {global_filters} field.
            ray_own |= promql_metrics(target.expr.format(global_filters='ray_io_cluster=~".*"'))
    return {"sweep": sweep, "ray": ray_own}


def dashboard_queries(dashboard: Doc) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of a Grafana dashboard."""
    queries: list[tuple[str, str]] = []
    for panel in dashboard.get("panels") or []:
        for target in panel.get("targets") or []:
            queries.append((f"panel {panel.get('title')!r}", str(target.get("expr", ""))))
    for variable in (dashboard.get("templating") or {}).get("list") or []:
        if variable.get("type") == "query":
            query = variable.get("query")
            text = query.get("query", "") if isinstance(query, dict) else str(query or "")
            inner = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", text)
            queries.append((f"variable {variable.get('name')!r}", inner.group(1) if inner else text))
    return queries


def check_grafana_dashboard(path: Path = GRAFANA_DASHBOARD, exported: dict[str, set[str]] | None = None) -> list[str]:
    """The dashboard parses as JSON, has panels, every panel has a query, and every query names only metrics the
    product exports (`exported_metrics`); it charts each of the sweep's gauges."""
    where = path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path
    try:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{where}: not a readable JSON file ({type(exc).__name__})"]
    if not isinstance(dashboard, dict) or not dashboard.get("panels"):
        return [f"{where}: no panels"]
    exported = exported if exported is not None else exported_metrics()
    known = set().union(*exported.values())
    problems: list[str] = []
    used: set[str] = set()
    for panel in dashboard["panels"]:
        if panel.get("type") != "row" and not panel.get("targets"):
            problems.append(f"{where}: panel {panel.get('title')!r} has no query")
    for label, expr in dashboard_queries(dashboard):
        names = promql_metrics(expr)
        if not names:
            problems.append(f"{where}: {label} names no metric: {expr!r}")
        used |= names
        for name in sorted(names - known):
            problems.append(f"{where}: {label} queries {name}, which nothing in a sweep cluster exports")
    for name in sorted(exported.get("sweep", set()) - used):
        problems.append(f"{where}: charts no {name}")
    return problems


# ------------------------------------------------------------------------------------------------------------
# In the driver: an invalid spec is not retried


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


def check_autoscaler_budget(docs: Sequence[Doc]) -> list[str]:
    """The driver budgets an autoscaling cluster by SWEEP_AUTOSCALER_MAX_GPUS / SWEEP_AUTOSCALER_MAX_CPUS, read on
    the head (where the driver runs): each is set there, as a literal, to the most the cluster can hold (the
    head's own plus maxReplicas x each worker group's pods), and nowhere else that could override or shadow it."""
    problems: list[str] = []
    for doc in docs:
        if doc.get("kind") == "ConfigMap":
            for variable in AUTOSCALER_MAX_ENV.values():
                if variable in (doc.get("data") or {}):
                    problems.append(
                        f"{doc_id(doc)}: sets {variable}, which depends on each cluster's size; set it on the head"
                    )
        cluster = cluster_spec(doc)
        if cluster is None:
            continue
        runtime_env = yaml.safe_load(str((doc.get("spec") or {}).get("runtimeEnvYAML") or "")) or {}
        env_vars = (runtime_env.get("env_vars") or {}) if isinstance(runtime_env, dict) else {}
        for variable in AUTOSCALER_MAX_ENV.values():
            if isinstance(env_vars, dict) and variable in env_vars:
                problems.append(f"{doc_id(doc)}: runtimeEnvYAML sets {variable}, overriding the head's; set it there")
        try:
            budget = autoscaler_budget(doc)
        except DeployError as err:
            problems.append(str(err))
            continue
        head = ray_pods(doc)[0]
        env = {e.get("name"): e for e in ray_container(head.template).get("env") or [] if isinstance(e, dict)}
        for resource, variable in AUTOSCALER_MAX_ENV.items():
            wanted = _env_value(budget[resource])
            entry = env.get(variable)
            if entry is None:
                problems.append(
                    f"{head.where}: sets no {variable}; the driver would budget only the {resource}s present when it "
                    f"starts, not the {wanted} the worker groups can grow to"
                )
                continue
            value = str(entry.get("value", ""))
            try:
                matches = "value" in entry and float(value) == budget[resource]
            except ValueError:
                matches = False
            if not matches:
                problems.append(
                    f"{head.where}: {variable} is {value or 'not a literal value'!r} but the cluster holds at most "
                    f"{wanted} {resource}s (the head's plus maxReplicas x {resource}s per pod of each worker group)"
                )
    return problems


def check_names(docs: Sequence[Doc]) -> list[str]:
    """RayJob names <= 47 characters, RayCluster names <= 53, DNS-1035 labels (KubeRay's own validation)."""
    problems: list[str] = []
    limits = {"RayJob": MAX_RAYJOB_NAME, "RayCluster": MAX_RAYCLUSTER_NAME}
    for doc in docs:
        limit = limits.get(str(doc.get("kind")))
        if limit is None:
            continue
        name = str((doc.get("metadata") or {}).get("name", ""))
        if len(name) > limit:
            problems.append(f"{doc_id(doc)}: name has {len(name)} characters; KubeRay allows at most {limit}")
        if not DNS_1035.fullmatch(name):
            problems.append(f"{doc_id(doc)}: name must be a DNS-1035 label (lowercase letters, digits, '-')")
    return problems


def check_token_auth(docs: Sequence[Doc]) -> list[str]:
    """Ray token authentication stays on: authOptions.mode token, and nothing sets RAY_AUTH_MODE=disabled."""
    problems: list[str] = []
    for doc in docs:
        cluster = cluster_spec(doc)
        if cluster is not None and (cluster.get("authOptions") or {}).get("mode") != "token":
            problems.append(f"{doc_id(doc)}: authOptions.mode must be token (Ray token authentication stays on)")
        problems += [f"{doc_id(doc)}: {problem}" for problem in _auth_mode_overrides(doc)]
    return problems


def _auth_mode_overrides(node: Any) -> list[str]:
    """Environment entries anywhere in `node` that set RAY_AUTH_MODE to anything but token."""
    return [
        f"sets RAY_AUTH_MODE={env.get('value')}; token authentication stays on"
        for mapping in walk_mappings(node)
        for env in mapping.get("env") or []
        if isinstance(env, dict) and env.get("name") == "RAY_AUTH_MODE" and env.get("value") != "token"
    ]


def is_placeholder(value: Any) -> bool:
    return isinstance(value, str) and PLACEHOLDER.fullmatch(value.strip()) is not None


_AUTH_DISABLED = re.compile(r"RAY_AUTH_MODE\W{0,6}disabled", re.IGNORECASE)
_DOCKER_ASSIGNMENT = re.compile(r"^\s*(?:ENV|ARG)\s+(.*)$", re.IGNORECASE | re.MULTILINE)


def secret_values_in(doc: Doc) -> list[str]:
    """Credential values written into a manifest: Secret data, literal credential env values, ConfigMap keys."""
    problems: list[str] = []
    if doc.get("kind") == "Secret":
        for key, value in (doc.get("stringData") or {}).items():
            if not is_placeholder(value):
                problems.append(f"{doc_id(doc)}: stringData.{key} holds a value, not a placeholder")
        for key, value in (doc.get("data") or {}).items():
            try:
                decoded = base64.b64decode(str(value), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                decoded = "?"
            if not is_placeholder(decoded):
                problems.append(f"{doc_id(doc)}: data.{key} holds a value, not a placeholder")
    if doc.get("kind") == "ConfigMap":
        for key in doc.get("data") or {}:
            if looks_like_credential_name(str(key)):
                problems.append(f"{doc_id(doc)}: {key} looks like a credential; credentials go in the Secret")
    for mapping in walk_mappings(doc):
        for env in mapping.get("env") or []:
            if not isinstance(env, dict) or "value" not in env:
                continue
            if looks_like_credential_name(str(env.get("name", ""))) and not is_placeholder(env["value"]):
                problems.append(f"{doc_id(doc)}: env {env.get('name')} has a literal value; use valueFrom.secretKeyRef")
    return problems


def check_committed_files(root: Path = DEPLOY_DIR) -> list[str]:
    """No credential in any file under `root` (deploy/), and nothing there turns token authentication off."""
    problems: list[str] = []
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        where = file.relative_to(root.parent)
        # The spec's own detector, line by line: AWS key ids, private keys, bearer tokens, secret-key-shaped
        # lines and passwords in URLs.
        for number, line in enumerate(text.splitlines(), 1):
            why = _credential_in_text(line.strip())
            if why:
                problems.append(f"{where}:{number}: contains {why}")
        if _AUTH_DISABLED.search(text):
            problems.append(f"{where}: sets RAY_AUTH_MODE=disabled; token authentication stays on")
        if file.suffix in (".yaml", ".yml"):
            try:
                documents = list(yaml.safe_load_all(text))
            except yaml.YAMLError as exc:
                problems.append(f"{where}: not valid YAML ({type(exc).__name__})")
                continue
            for document in documents:
                # A manifest, or a JSON patch whose operations carry manifest fragments as values.
                fragments = (
                    [op.get("value") for op in document if isinstance(op, dict)]
                    if isinstance(document, list)
                    else [document]
                )
                for fragment in fragments:
                    if isinstance(fragment, dict):
                        found = secret_values_in(fragment) + _auth_mode_overrides(fragment)
                        problems.extend(f"{where}: {problem}" for problem in found)
        elif file.name == "Dockerfile" or file.name.endswith(".Dockerfile"):
            for line in _DOCKER_ASSIGNMENT.findall(text):
                for name, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)[= ]+(\S+)", line):
                    if looks_like_credential_name(name) and not is_placeholder(value.strip("\"'")):
                        problems.append(f"{where}: ENV/ARG {name} bakes a credential into the image")
    return problems


def structure_problems(doc: Doc) -> list[str]:
    """apiVersion, kind, metadata.name and the basic shape of the kinds the manifests use besides Ray's."""
    where = doc_id(doc)
    problems = [f"{where}: missing {key}" for key in ("apiVersion", "kind") if not doc.get(key)]
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) or len(name) > 253:
        problems.append(f"{where}: metadata.name must be a DNS subdomain name")
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if kind not in API_VERSIONS:
        return [*problems, f"{where}: kind {kind!r} is not one the manifests are checked for"]
    if api != API_VERSIONS[str(kind)]:
        problems.append(f"{where}: apiVersion must be {API_VERSIONS[str(kind)]}, not {api!r}")
    spec = doc.get("spec") or {}
    if kind in ("ConfigMap", "Secret"):
        for field in ("data", "stringData") if kind == "Secret" else ("data",):
            values = doc.get(field) or {}
            if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
                problems.append(f"{where}: {field} must map names to strings")
    elif kind == "Service":
        ports = spec.get("ports") or []
        if not ports or not all(isinstance(p, dict) and isinstance(p.get("port"), int) for p in ports):
            problems.append(f"{where}: spec.ports must list ports with an integer port")
        if not spec.get("selector"):
            problems.append(f"{where}: spec.selector is empty")
    elif kind in ("Deployment", "Job"):
        template = spec.get("template") or {}
        pod_spec = template.get("spec") or {}
        if not all(c.get("name") and c.get("image") for c in pod_spec.get("containers") or [{}]):
            problems.append(f"{where}: every container needs a name and an image")
        if kind == "Deployment":
            selector = (spec.get("selector") or {}).get("matchLabels") or {}
            labels = (template.get("metadata") or {}).get("labels") or {}
            if not selector or any(labels.get(k) != v for k, v in selector.items()):
                problems.append(f"{where}: spec.selector.matchLabels must match the pod template's labels")
        elif pod_spec.get("restartPolicy") not in ("Never", "OnFailure"):
            problems.append(f"{where}: a Job's pods need restartPolicy Never or OnFailure")
    elif kind == "PriorityClass":
        if not isinstance(doc.get("value"), int) or doc.get("preemptionPolicy") not in (None, *PREEMPTION_POLICIES):
            problems.append(
                f"{where}: needs an integer value and a preemptionPolicy of {', '.join(PREEMPTION_POLICIES)}"
            )
    elif kind == "PodDisruptionBudget":
        bounds = [key for key in ("minAvailable", "maxUnavailable") if key in spec]
        if not (spec.get("selector") or {}).get("matchLabels") or len(bounds) != 1:
            problems.append(f"{where}: needs spec.selector.matchLabels and one of minAvailable or maxUnavailable")
    elif kind in ("PodMonitor", "ServiceMonitor"):
        endpoints = spec.get("podMetricsEndpoints" if kind == "PodMonitor" else "endpoints") or []
        if (
            not (spec.get("selector") or {}).get("matchLabels")
            or not all(e.get("port") for e in endpoints)
            or not endpoints
        ):
            problems.append(f"{where}: needs spec.selector.matchLabels and endpoints naming a port")
    return problems


def check_manifests(
    docs: Sequence[Doc], root: Path = PROJECT_ROOT, ray_version: str | None = None, *, cluster_target: bool = False
) -> list[str]:
    """Every rule on a set of objects (schema validation aside: see `schema_problems`). `cluster_target`: the
    objects are for a cluster that pulls from a registry (not a LOCAL_OVERLAYS one), so images need digests."""
    problems: list[str] = []
    for doc in docs:
        problems.extend(structure_problems(doc))
        problems.extend(secret_values_in(doc))
    problems += check_versions(docs, ray_version)
    problems += check_entrypoint(docs, root)
    problems += check_submission(docs)
    problems += check_pod_env(docs)
    problems += check_resources(docs)
    problems += check_head(docs)
    problems += check_monitoring(docs)
    problems += check_autoscaler_budget(docs)
    problems += check_names(docs)
    problems += check_token_auth(docs)
    problems += check_head_qos(docs)
    problems += check_head_priority(docs)
    problems += check_head_disruption(docs)
    problems += check_object_store(docs)
    problems += check_pod_security(docs)
    problems += check_service_account_tokens(docs)
    problems += check_image_digests(docs, cluster_target)
    return problems


def load_schemas(schema_dir: Path | None = None) -> dict[str, Doc]:
    """The KubeRay v1 JSON schemas by kind (from SCHEMA_DIR unless given); DeployError if one is missing or
    unreadable: validation is never silently skipped."""
    schemas: dict[str, Doc] = {}
    for kind in RAY_KINDS:
        file = (schema_dir or SCHEMA_DIR) / f"{kind.lower()}-ray.io-v1.json"
        try:
            schemas[kind] = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DeployError(
                f"KubeRay schema {file} is missing or unreadable ({type(exc).__name__}); it ships with the project "
                "(deploy/schemas/kuberay/README.md)"
            ) from None
    return schemas


def schema_problems(docs: Sequence[Doc], schemas: dict[str, Doc]) -> list[str]:
    """RayJob/RayCluster against KubeRay's strict v1 schemas; the pod templates of Deployments and Jobs against
    the Kubernetes PodTemplateSpec schema embedded in the RayCluster CRD. Needs the `jsonschema` package (a dev
    dependency): DeployError without it."""
    try:
        import jsonschema
    except ImportError:
        raise DeployError("schema validation needs the jsonschema package: pip install -e '.[dev]'") from None

    pod_template = schemas["RayCluster"]["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]
    validators = {kind: jsonschema.Draft7Validator(schema) for kind, schema in schemas.items()}
    pod_validator = jsonschema.Draft7Validator(pod_template)
    problems: list[str] = []
    for doc in docs:
        kind = doc.get("kind")
        if kind in validators:
            errors = validators[str(kind)].iter_errors(doc)
        elif kind in ("Deployment", "Job"):
            errors = pod_validator.iter_errors((doc.get("spec") or {}).get("template") or {})
        else:
            continue
        problems.extend(f"{doc_id(doc)} {error.json_path}: {error.message}" for error in errors)
    return problems


_DOCKER_ARG = re.compile(r"^\s*ARG\s+([A-Za-z_][A-Za-z0-9_]*)(?:=(\S*))?\s*$", re.IGNORECASE)


def _docker_instructions(text: str) -> list[str]:
    """Dockerfile instructions with line continuations joined and comments dropped."""
    instructions: list[str] = []
    current = ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        instructions.append((current + line).strip())
        current = ""
    if current:
        instructions.append(current.strip())
    return instructions


def check_dockerfile(text: str, pins: dict[str, str] | None = None) -> list[str]:
    """The image is rayproject/ray of the pinned Ray (py311, GPU and CPU flavours) plus the pinned torch (CUDA
    index for GPU, CPU index for CPU) and the project, installed and run as a non-root user."""
    pins = pins or pinned_versions()
    ray, torch = pins["ray"], pins["torch"]
    problems: list[str] = []
    global_args: dict[str, str] = {}
    stages: list[dict[str, Any]] = []  # {"base": str, "args": {...}, "runs": [...]}
    users: list[str] = []
    for instruction in _docker_instructions(text):
        keyword, _, rest = instruction.partition(" ")
        keyword = keyword.upper()
        arg = _DOCKER_ARG.match(instruction)
        if keyword == "ARG" and arg:
            name, default = arg.group(1), arg.group(2)
            scope = stages[-1]["args"] if stages else global_args
            scope[name] = default if default is not None else global_args.get(name, "")
        elif keyword == "FROM":
            base = rest.split()[0]
            stages.append({"base": _substitute(base, global_args), "args": {}, "runs": []})
        elif keyword == "RUN" and stages:
            stages[-1]["runs"].append(_substitute(rest, {**global_args, **stages[-1]["args"]}))
        elif keyword == "USER":
            users.append(rest.strip())
    ray_bases = [s for s in stages if s["base"].startswith("rayproject/ray:")]
    for flavour in FLAVOURS:
        suffix = "-gpu" if flavour == "gpu" else ""
        wanted = f"rayproject/ray:{ray}-py311{suffix}"
        stage = next((s for s in ray_bases if s["base"] == wanted), None)
        if stage is None:
            problems.append(f"no {flavour.upper()} stage FROM {wanted} (the pinned Ray {ray}, Python 3.11)")
            continue
        torch_runs = [run for run in stage["runs"] if re.search(r"\btorch==", run)]
        index = "https://download.pytorch.org/whl/cu" if flavour == "gpu" else "https://download.pytorch.org/whl/cpu"
        if not any(index in run and "--index-url" in run for run in torch_runs):
            problems.append(f"the {flavour.upper()} stage does not install torch from {index}... with --index-url")
    for stage in ray_bases:
        tag = stage["base"].split(":", 1)[1]
        if not tag.startswith(f"{ray}-"):
            problems.append(f"FROM {stage['base']}: the Ray image tag must be the pinned Ray {ray}")
    for version in re.findall(r"\btorch==([^\s\"']+)", " ".join(r for s in stages for r in s["runs"])):
        if version != torch:
            problems.append(f"installs torch=={version}, not the pinned torch=={torch}")
    runs = [run for stage in stages for run in stage["runs"]]
    if not any(re.search(r"pip install\b.*\s\.(\s|$)", run) for run in runs):
        problems.append("does not `pip install .` the project")
    if any("torchattacks" in run for run in runs):
        problems.append("installs torchattacks (a benchmark baseline only)")
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the image must end as a non-root USER (the Ray image's ray user, 1000)")
    return problems


def _substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(
        r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", lambda m: args.get(m[1] or m[2], m[0]), text
    )


# ------------------------------------------------------------------------------------------------------------
# Command line


def deploy_targets() -> dict[str, Path]:
    """Every directory `kubectl apply -k` is pointed at: the overlays, the RayCluster and the monitoring."""
    targets = {f"overlays/{name}": OVERLAYS_DIR / name for name in overlay_names()}
    targets["raycluster"] = RAYCLUSTER_DIR
    targets["monitoring"] = MONITORING_DIR
    return targets


def _one_line(message: str) -> str:
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m orchestrator.deploy", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    render_cmd = commands.add_parser("render", help="render an overlay for a spec (for kubectl apply -f)")
    render_cmd.add_argument("--spec", required=True, help="the sweep file, under sweeps/ (e.g. sweeps/ablation.yaml)")
    render_cmd.add_argument("--overlay", required=True, help=f"one of deploy/overlays: {', '.join(overlay_names())}")
    render_cmd.add_argument(
        "--image",
        help="the project image: REGISTRY/adversarial-sweep:<ray version>-<gpu|cpu>[-<revision>]@sha256:<digest> "
        "(the digest is required for every overlay but local)",
    )
    render_cmd.add_argument("--out", help="write here instead of standard output")
    commands.add_parser("check", help="check every overlay, deploy/raycluster and the files under deploy/")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check_all()
    if args.image is None and args.overlay in overlay_names() and args.overlay not in LOCAL_OVERLAYS:
        # The base manifests name the image a local build is tagged with; a cluster would pull that name from a
        # registry (Docker Hub, for an unqualified name) and fail or, worse, run someone else's image.
        print(
            f"error: --image is required for overlay {args.overlay!r}: name the image you pushed to your registry by "
            "digest, e.g. --image registry.example.org/team/adversarial-sweep:2.60.0-gpu@sha256:<64 hex> "
            f"(only {', '.join(LOCAL_OVERLAYS)} runs a locally built image)",
            file=sys.stderr,
        )
        return 2
    why = image_problem(args.image, args.overlay) if args.image is not None else None
    if why and args.overlay in overlay_names():
        # A tag can be pushed again: pods rescheduled weeks into a study would run other bytes than their peers.
        print(f"error: {why}", file=sys.stderr)
        return 2
    try:
        docs = render(args.spec, args.overlay, args.image)
    except (DeployError, SpecError) as err:
        print(f"error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    header = (
        f"# Rendered by: python -m orchestrator.deploy render --spec {args.spec} --overlay {args.overlay}\n"
        "# Apply with: kubectl apply -f THIS_FILE (create the Secret sweep-s3-credentials first)\n"
    )
    text = dump_documents(docs, header)
    print(worker_group_summary(docs), file=sys.stderr)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def _check_all() -> int:
    problems = check_committed_files()
    try:
        schemas: dict[str, Doc] | None = load_schemas()
    except DeployError as err:
        schemas = None
        problems.append(str(err))
    for name, directory in deploy_targets().items():
        try:
            docs = build(directory)
        except DeployError as err:
            problems.append(f"{name}: {err}")
            continue
        cluster_target = name not in {f"overlays/{local}" for local in LOCAL_OVERLAYS}
        problems += [f"{name}: {problem}" for problem in check_manifests(docs, cluster_target=cluster_target)]
        if schemas is not None:
            try:
                problems += [f"{name}: {problem}" for problem in schema_problems(docs, schemas)]
            except DeployError as err:
                problems.append(str(err))
                schemas = None
    problems += check_grafana_dashboard()
    dockerfile = DEPLOY_DIR / "Dockerfile"
    problems += [f"deploy/Dockerfile: {problem}" for problem in check_dockerfile(dockerfile.read_text())]
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s)" if problems else "deploy/: all checks passed", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
