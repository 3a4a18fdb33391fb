"""The manifests as the rules read them, and the rules a months-long study adds (docs/kubernetes.md, docs/design.md 7).

`orchestrator.deploy` builds, renders and checks the manifests; this module holds what its rules share (pod
templates, containers, quantities) and the rules that keep one RayJob alive for the study of Xie & Yuille (ICLR
2020, Section 3: about 80 days on 128 GPUs in sweeps/ablation.yaml), where a cluster will drain, consolidate and
upgrade nodes many times:

- `check_head_qos`: every container of the head pod, the autoscaler sidecar KubeRay adds included, has cpu and
  memory requests equal to its limits (Guaranteed QoS: the last pod the kubelet evicts under memory pressure).
- `check_head_priority`: the head names a PriorityClass the manifests ship (not a global default), so a head
  rescheduled onto a busy CPU pool is placed before other pods.
- `check_head_disruption`: a PodDisruptionBudget that allows no eviction selects the head pods (or the head carries
  Karpenter's and the cluster autoscaler's do-not-disrupt annotations): a drain or a consolidation that evicted
  it would restart the sweep's driver and, after RAYJOB_STATUS_CHECK_TIMEOUT_SECONDS, fail the RayJob.
- `check_object_store`: the head sets Ray's object-store-memory, and every Ray pod that sets it keeps it below the
  sizeLimit of the memory-backed emptyDir at /dev/shm (Ray's object store lives there; a larger one falls back to
  disk, or the pod is evicted for exceeding the volume).
- `check_pod_security`: every pod and container meets Pod Security "restricted": runAsNonRoot, no privilege
  escalation, all capabilities dropped, the RuntimeDefault seccomp profile, no host namespaces or hostPath.
- `check_service_account_tokens`: no pod but the head mounts a service-account token (only the head's
  autoscaler sidecar calls the Kubernetes API).
- `check_image_digests`: on a cluster target every image is pinned by digest (`NAME[:TAG]@sha256:<64 hex>`), so a
  pod rescheduled in month two runs the bytes the study started with.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.deploy.layout import GPU

Doc = dict[str, Any]

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
SHM_PATH = "/dev/shm"
# Each annotation speaks to one node autoscaler: Karpenter never voluntarily disrupts a node running the pod, and
# the cluster autoscaler never removes it. Accepted instead of a PodDisruptionBudget (docs/kubernetes.md).
DO_NOT_DISRUPT = {"karpenter.sh/do-not-disrupt": "true", "cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
# KubeRay labels every head pod so; a guard that selects no more than heads leaves worker nodes free to drain.
HEAD_POD_LABEL = ("ray.io/node-type", "head")
SECCOMP_TYPES = ("RuntimeDefault", "Localhost")  # what Pod Security "restricted" allows
ALLOWED_ADDED_CAPABILITIES = {"NET_BIND_SERVICE"}


class DeployError(Exception):
    """A problem with the manifests or with what was asked of them; the CLI prints it and exits with status 2."""


# ------------------------------------------------------------------------------------------------------------
# Walking manifests


def doc_id(doc: Doc) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def walk_mappings(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping inside `node` (depth first), `node` included."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk_mappings(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk_mappings(value)


def containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container and init container anywhere in `node` (pod templates of any kind, CRDs included)."""
    for mapping in walk_mappings(node):
        for key in ("containers", "initContainers"):
            for container in mapping.get(key) or []:
                if isinstance(container, dict):
                    yield container


def cluster_spec(doc: Doc) -> Doc | None:
    """The RayCluster spec of a RayJob or RayCluster (None for other kinds)."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayJob":
        return spec.get("rayClusterSpec")
    if doc.get("kind") == "RayCluster":
        return spec
    return None


@dataclass(frozen=True)
class RayPod:
    """A pod template that runs Ray (or submits to it), named the way messages name it."""

    where: str  # e.g. "RayJob/sweep-ablation worker group gpu-workers"
    template: Doc
    role: str  # head, worker or submitter
    group: Doc | None = None  # the workerGroupSpecs entry, for workers


def ray_pods(doc: Doc) -> list[RayPod]:
    pods: list[RayPod] = []
    cluster = cluster_spec(doc)
    if cluster is None:
        return pods
    name = doc_id(doc)
    head = cluster.get("headGroupSpec") or {}
    pods.append(RayPod(f"{name} head", head.get("template") or {}, "head", head))
    for group in cluster.get("workerGroupSpecs") or []:
        pods.append(
            RayPod(f"{name} worker group {group.get('groupName')}", group.get("template") or {}, "worker", group)
        )
    submitter = (doc.get("spec") or {}).get("submitterPodTemplate") if doc.get("kind") == "RayJob" else None
    if submitter is not None:
        pods.append(RayPod(f"{name} submitter", submitter, "submitter"))
    return pods


def ray_container(template: Doc) -> Doc:
    """KubeRay runs Ray in (and submits from) the first container of a pod template."""
    found = ((template.get("spec") or {}).get("containers") or [{}])[0]
    return found if isinstance(found, dict) else {}


def split_image(ref: str) -> tuple[str, str | None, str | None]:
    """'reg:5000/a/b:tag@sha256:x' -> ('reg:5000/a/b', 'tag', 'sha256:x')."""
    name, _, digest = ref.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :], digest or None
    return name, None, digest or None


def parse_cpu(quantity: Any) -> float:
    """A Kubernetes CPU quantity ('500m', '2', 2, 1.5) in cores."""
    text = str(quantity).strip()
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        raise DeployError(f"{quantity!r} is not a CPU quantity") from None


def parse_memory(quantity: Any) -> float:
    """A Kubernetes memory quantity ('512Mi', '3Gi', '1G', 1024) in bytes."""
    match = re.fullmatch(r"([0-9.]+)([KMGTE]i?|k)?", str(quantity).strip())
    if not match:
        raise DeployError(f"{quantity!r} is not a memory quantity")
    units = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "E": 1e18}
    units |= {f"{u}i": 1024 ** (i + 1) for i, u in enumerate("KMGTPE")}
    return float(match.group(1)) * units[match.group(2) or ""]


# ------------------------------------------------------------------------------------------------------------
# Pod templates, with the autoscaler sidecar KubeRay adds to the head


AUTOSCALER = "autoscaler"  # the name KubeRay gives the sidecar it adds to the head with in-tree autoscaling


@dataclass(frozen=True)
class PodTemplate:
    """A pod template of any kind, and every container its pods will run."""

    where: str
    role: str  # head, worker, submitter, or pod (a Deployment's or a Job's)
    template: Doc
    containers: list[Doc]  # containers and init containers, plus the autoscaler sidecar for a head
    group: Doc | None = None  # the headGroupSpec or workerGroupSpecs entry of a Ray pod


def autoscaler_sidecar(cluster: Doc) -> Doc | None:
    """The sidecar KubeRay adds to the head pod (from autoscalerOptions), as a container; None without one."""
    if cluster.get("enableInTreeAutoscaling") is not True:
        return None
    options = cluster.get("autoscalerOptions") or {}
    sidecar: Doc = {"name": AUTOSCALER}
    for key in ("image", "resources", "securityContext"):
        if key in options:
            sidecar[key] = options[key]
    return sidecar


def pod_templates(doc: Doc) -> list[PodTemplate]:
    """The pod templates of a RayJob, RayCluster, Deployment or Job (none for other kinds)."""
    found: list[PodTemplate] = []
    cluster = cluster_spec(doc)
    if cluster is not None:
        sidecar = autoscaler_sidecar(cluster)
        for pod in ray_pods(doc):
            spec = pod.template.get("spec") or {}
            listed = [c for key in ("containers", "initContainers") for c in spec.get(key) or [] if isinstance(c, dict)]
            if pod.role == "head" and sidecar is not None:
                listed.append(sidecar)
            found.append(PodTemplate(pod.where, pod.role, pod.template, listed, pod.group))
    elif doc.get("kind") in ("Deployment", "Job"):
        template = (doc.get("spec") or {}).get("template") or {}
        found.append(PodTemplate(doc_id(doc), "pod", template, list(containers(template))))
    return found


def _spec(pod: PodTemplate) -> Doc:
    spec: Doc = pod.template.get("spec") or {}
    return spec


def _labels(template: Doc) -> dict[str, Any]:
    labels: dict[str, Any] = (template.get("metadata") or {}).get("labels") or {}
    return labels


# ------------------------------------------------------------------------------------------------------------
# The head survives months of cluster operations


def _quantity(resource: str, value: Any) -> float | None:
    try:
        return parse_cpu(value) if resource == "cpu" else parse_memory(value)
    except DeployError:
        return None


def check_head_qos(docs: Sequence[Doc]) -> list[str]:
    """Guaranteed QoS for the head pod: every container (the autoscaler sidecar included) has cpu and memory limits,
    and requests equal to them (a request left out defaults to the limit). Any Burstable container makes the whole
    pod Burstable, evicted before Guaranteed pods when its node runs short of memory."""
    problems: list[str] = []
    for doc in docs:
        for pod in pod_templates(doc):
            if pod.role != "head":
                continue
            for container in pod.containers:
                resources = container.get("resources") or {}
                limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
                for resource in ("cpu", "memory"):
                    limit, request = limits.get(resource), requests.get(resource, limits.get(resource))
                    if limit is None:
                        problems.append(
                            f"{pod.where} container {container.get('name')}: sets no {resource} limit; the head "
                            "needs Guaranteed QoS (requests equal to limits in every container)"
                        )
                    elif _quantity(resource, request) != _quantity(resource, limit):
                        problems.append(
                            f"{pod.where} container {container.get('name')}: {resource} request {request} differs "
                            f"from its limit {limit}; the head needs Guaranteed QoS (requests equal to limits)"
                        )
    return problems


def check_head_priority(docs: Sequence[Doc]) -> list[str]:
    """The head names a PriorityClass that the same manifests ship, with a positive value and not the cluster's
    global default (which would raise every pod without a class to the head's priority)."""
    classes = {(doc.get("metadata") or {}).get("name"): doc for doc in docs if doc.get("kind") == "PriorityClass"}
    problems: list[str] = []
    for doc in docs:
        for pod in pod_templates(doc):
            if pod.role != "head":
                continue
            name = _spec(pod).get("priorityClassName")
            if not name:
                problems.append(
                    f"{pod.where}: sets no priorityClassName; a rescheduled head would queue behind every other pod"
                )
                continue
            found = classes.get(name)
            if found is None:
                problems.append(f"{pod.where}: priorityClassName {name} names no PriorityClass these manifests ship")
                continue
            value = found.get("value")
            if not isinstance(value, int) or value <= 0 or found.get("globalDefault") is True:
                problems.append(
                    f"{doc_id(found)}: needs a positive integer value and globalDefault false (got value {value!r})"
                )
    return problems


def _guards(pdb: Doc, labels: dict[str, Any]) -> bool:
    """Does the PodDisruptionBudget select pods with `labels` (matchLabels only) and allow none to be evicted?"""
    spec = pdb.get("spec") or {}
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    selects = bool(selector) and all(labels.get(key) == value for key, value in selector.items())
    key, value = HEAD_POD_LABEL
    heads_only = selector.get(key) == value
    blocks = str(spec.get("maxUnavailable")) in ("0", "0%") or str(spec.get("minAvailable")) == "100%"
    return selects and heads_only and blocks


def check_head_disruption(docs: Sequence[Doc]) -> list[str]:
    """A PodDisruptionBudget with maxUnavailable 0 selects the head pods (by their labels plus KubeRay's
    ray.io/node-type: head), or the head carries both do-not-disrupt annotations."""
    budgets = [doc for doc in docs if doc.get("kind") == "PodDisruptionBudget"]
    problems: list[str] = []
    key, value = HEAD_POD_LABEL
    for doc in docs:
        for pod in pod_templates(doc):
            if pod.role != "head":
                continue
            labels = {**_labels(pod.template), key: value}
            annotations = (pod.template.get("metadata") or {}).get("annotations") or {}
            annotated = all(str(annotations.get(name)) == wanted for name, wanted in DO_NOT_DISRUPT.items())
            if not annotated and not any(_guards(pdb, labels) for pdb in budgets):
                problems.append(
                    f"{pod.where}: no PodDisruptionBudget with maxUnavailable 0 selects it (nor the annotations "
                    f"{', '.join(f'{k}: {v!r}' for k, v in DO_NOT_DISRUPT.items())}); a node drain would evict it"
                )
    return problems


def _shm_size(pod: PodTemplate) -> float | None:
    """The sizeLimit in bytes of the memory-backed emptyDir the Ray container mounts at /dev/shm (None if none)."""
    mounts = ray_container(pod.template).get("volumeMounts") or []
    names = {m.get("name") for m in mounts if isinstance(m, dict) and m.get("mountPath") == SHM_PATH}
    for volume in _spec(pod).get("volumes") or []:
        empty_dir = (volume or {}).get("emptyDir")
        if volume.get("name") in names and isinstance(empty_dir, dict) and empty_dir.get("medium") == "Memory":
            size = empty_dir.get("sizeLimit")
            return _quantity("memory", size) if size is not None else None
    return None


def check_object_store(docs: Sequence[Doc]) -> list[str]:
    """The head sets rayStartParams object-store-memory (bytes); wherever it is set, it stays below the sizeLimit of
    the memory-backed emptyDir at /dev/shm, where Ray keeps the object store."""
    problems: list[str] = []
    for doc in docs:
        for pod in pod_templates(doc):
            params = (pod.group or {}).get("rayStartParams") or {}
            text = params.get("object-store-memory")
            if text is None:
                if pod.role == "head":
                    problems.append(
                        f"{pod.where}: sets no rayStartParams object-store-memory; Ray would size it from the pod's "
                        f"memory (30%), beyond its {SHM_PATH}"
                    )
                continue
            shm = _shm_size(pod)
            if not str(text).isdigit():
                problems.append(f"{pod.where}: object-store-memory {text!r} is not a number of bytes")
            elif shm is None:
                problems.append(
                    f"{pod.where}: sets object-store-memory but mounts no emptyDir of medium Memory "
                    f"with a sizeLimit at {SHM_PATH}"
                )
            elif int(str(text)) >= shm:
                problems.append(
                    f"{pod.where}: object-store-memory {text} is not below its {SHM_PATH} sizeLimit "
                    f"({math.floor(shm)} bytes)"
                )
    return problems


# ------------------------------------------------------------------------------------------------------------
# Pod Security "restricted", and no service-account token where nothing calls the Kubernetes API


def _container_security(pod: PodTemplate, container: Doc) -> list[str]:
    pod_context = _spec(pod).get("securityContext") or {}
    context = container.get("securityContext") or {}
    missing: list[str] = []
    if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
        missing.append("runAsNonRoot: true")
    if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
        missing.append("a non-zero runAsUser")
    if context.get("allowPrivilegeEscalation") is not False:
        missing.append("allowPrivilegeEscalation: false")
    if context.get("privileged") is True:
        missing.append("privileged off")
    capabilities = context.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        missing.append("capabilities.drop [ALL]")
    if set(capabilities.get("add") or []) - ALLOWED_ADDED_CAPABILITIES:
        missing.append("no added capability but NET_BIND_SERVICE")
    seccomp = (context.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
    if seccomp not in SECCOMP_TYPES:
        missing.append("seccompProfile.type RuntimeDefault")
    return missing


def check_pod_security(docs: Sequence[Doc]) -> list[str]:
    """Every pod and container meets Pod Security "restricted" (the fields this project's pods can set): non-root,
    no privilege escalation, all capabilities dropped, RuntimeDefault seccomp, no host namespaces or hostPath."""
    problems: list[str] = []
    for doc in docs:
        for pod in pod_templates(doc):
            spec = _spec(pod)
            for field in ("hostNetwork", "hostPID", "hostIPC"):
                if spec.get(field) is True:
                    problems.append(f"{pod.where}: {field} is not allowed (Pod Security restricted)")
            for volume in spec.get("volumes") or []:
                if isinstance(volume, dict) and "hostPath" in volume:
                    problems.append(f"{pod.where}: volume {volume.get('name')} is a hostPath (Pod Security restricted)")
            for container in pod.containers:
                missing = _container_security(pod, container)
                if missing:
                    problems.append(
                        f"{pod.where} container {container.get('name')}: needs {', '.join(missing)} "
                        "(Pod Security restricted)"
                    )
    return problems


def check_service_account_tokens(docs: Sequence[Doc]) -> list[str]:
    """automountServiceAccountToken: false on every pod but the head: workers, MinIO and the bucket Job never call
    the Kubernetes API, and a token there would let code on a worker act as the pod's service account. The head
    keeps its token: KubeRay's autoscaler sidecar scales the worker group through the API with it."""
    return [
        f"{pod.where}: mounts a service-account token; set automountServiceAccountToken: false (only the head's "
        "autoscaler calls the Kubernetes API)"
        for doc in docs
        for pod in pod_templates(doc)
        if pod.role != "head" and _spec(pod).get("automountServiceAccountToken") is not False
    ]


# ------------------------------------------------------------------------------------------------------------
# Images pinned by digest on a cluster


def is_pinned(ref: str) -> bool:
    """Is the image reference pinned by a sha256 digest (`NAME[:TAG]@sha256:<64 hex>`)?"""
    digest = split_image(ref)[2]
    return digest is not None and DIGEST.fullmatch(digest) is not None


def check_image_digests(docs: Sequence[Doc], cluster_target: bool) -> list[str]:
    """On a cluster target (every overlay but the local ones, deploy/raycluster, `render` for a cluster) every image
    is pinned by digest: a tag can be pushed again, and a pod rescheduled weeks into the study would pull other
    bytes than its peers. A local cluster runs the image built on its own machine, by tag."""
    if not cluster_target:
        return []
    problems: list[str] = []
    for doc in docs:
        for pod in pod_templates(doc):
            for container in pod.containers:
                image = container.get("image")
                if image is None and container.get("name") == AUTOSCALER:
                    continue  # KubeRay runs the sidecar on the head's image
                if not is_pinned(str(image)):
                    problems.append(
                        f"{pod.where} container {container.get('name')}: image {image!r} is a mutable tag; pin it by "
                        "digest (NAME[:TAG]@sha256:<64 hex>)"
                    )
    return problems


# Shared by `deploy render` (which sets the autoscaler budget) and `deploy check` (which compares it)


def gpu_amounts(container: Doc) -> tuple[Any, Any]:
    resources = container.get("resources") or {}
    return (resources.get("limits") or {}).get(GPU), (resources.get("requests") or {}).get(GPU)


def gpu_count(value: Any) -> int:
    """A GPU quantity (8 or "8") as an int; 0 when absent or not a whole number."""
    text = str(value).strip() if value is not None else ""
    return int(text) if text.isdigit() else 0


def asks_gpus(value: Any) -> bool:
    return value is not None and str(value).strip() not in ("0", "")


def pod_shape(group: Doc) -> tuple[float, int]:
    """(CPUs, GPUs) of a worker group's pods: KubeRay takes them from the limits, else the requests."""
    resources = ray_container(group.get("template") or {}).get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    cpu = limits.get("cpu", requests.get("cpu"))
    if cpu is None:
        raise DeployError(f"worker group {group.get('groupName')} sets no cpu limit or request")
    return parse_cpu(cpu), gpu_count(limits.get(GPU, requests.get(GPU)))


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
    gpus = float(params["num-gpus"]) if "num-gpus" in params else float(gpu_count(limits.get(GPU, requests.get(GPU))))
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


def env_value(amount: float) -> str:
    return str(int(amount)) if float(amount).is_integer() else f"{amount:g}"
