"""Structure, KubeRay schemas, the whole rule set on a set of objects, and the Dockerfile."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.deploy.checks import (
    check_autoscaler_budget,
    check_entrypoint,
    check_head,
    check_monitoring,
    check_names,
    check_pod_env,
    check_resources,
    check_submission,
    check_token_auth,
    check_versions,
    pinned_versions,
    secret_values_in,
)
from orchestrator.deploy.layout import (
    API_VERSIONS,
    FLAVOURS,
    PREEMPTION_POLICIES,
    PROJECT_ROOT,
    RAY_KINDS,
    SCHEMA_DIR,
)
from orchestrator.deploy.rules import (
    DeployError,
    Doc,
    check_head_disruption,
    check_head_priority,
    check_head_qos,
    check_image_digests,
    check_object_store,
    check_pod_security,
    check_service_account_tokens,
    doc_id,
)


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
