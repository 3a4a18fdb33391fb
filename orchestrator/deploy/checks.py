"""The rules `deploy check` enforces on built manifests, each returning one line per problem (module docstring of
`orchestrator.deploy` lists them)."""

from __future__ import annotations

import base64
import binascii
import re
import shlex
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from orchestrator.credentials import credential_in_text, looks_like_credential_name
from orchestrator.deploy.layout import (
    DEPLOY_DIR,
    DNS_1035,
    ENTRYPOINT_COMMAND,
    GPU,
    HEAD_HIDDEN_GPUS,
    HEAD_METRICS_PORTS,
    IMAGE_NAME,
    MAX_RAYCLUSTER_NAME,
    MAX_RAYJOB_NAME,
    PLACEHOLDER,
    PROJECT_ROOT,
    S3_SECRET,
    S3_SECRET_KEYS,
    SPEC_DIR,
    SUBMISSION_MODE,
    SWEEP_CONFIG,
    WORKING_DIR,
)
from orchestrator.deploy.manifests import image_flavour, is_project_image
from orchestrator.deploy.rules import (
    DeployError,
    Doc,
    asks_gpus,
    autoscaler_budget,
    cluster_spec,
    containers,
    doc_id,
    env_value,
    gpu_amounts,
    gpu_count,
    parse_cpu,
    parse_memory,
    ray_container,
    ray_pods,
    split_image,
    walk_mappings,
)
from orchestrator.placement import AUTOSCALER_MAX_ENV
from orchestrator.ray_job import STOP_ON_INVALID_ENV
from orchestrator.spec import SpecError, load_spec

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
            limit, request = gpu_amounts(container)
            params = (pod.group or {}).get("rayStartParams") or {}
            if pod.role == "head":
                if params.get("num-cpus") != "0":
                    problems.append(f'{pod.where}: rayStartParams num-cpus must be "0" (no training on the head)')
                if asks_gpus(limit) or asks_gpus(request) or asks_gpus(params.get("num-gpus")):
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
                if flavour == "gpu" and gpu_count(limit) < 1:
                    problems.append(f"{pod.where}: runs the GPU image but sets no {GPU} limit of at least 1")
                elif flavour == "gpu" and request is not None and gpu_count(request) != gpu_count(limit):
                    problems.append(f"{pod.where}: {GPU} request {request} differs from its limit {limit}")
                elif flavour == "cpu" and (asks_gpus(limit) or asks_gpus(request) or asks_gpus(params.get("num-gpus"))):
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
            wanted = env_value(budget[resource])
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
            why = credential_in_text(line.strip())
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
