"""The Kubernetes deployment (deploy/, orchestrator/deploy/), checked offline: no API server, no cluster, no Docker.

Manifests are built with orchestrator.deploy's kustomize subset (and compared with `kubectl kustomize` where kubectl
is installed), validated against the strict KubeRay v1.7.0 JSON schemas the project ships (deploy/schemas/kuberay; a
missing schema fails, it never skips), and checked against the project's rules; every rule is also shown to catch a
deliberately broken manifest.

Kubernetes' own OpenAPI schemas are not available offline here, so ConfigMap, Secret, Service, Deployment, Job and
PodMonitor get structure checks (`structure_problems`), and the pod templates of the Deployment and the Job are
validated against the core/v1 PodTemplateSpec schema that the KubeRay CRD embeds.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import placement, ray_job
from orchestrator.deploy import checks, cli, layout, manifests, monitoring, rendering, rules, validation
from orchestrator.deploy.checks import (
    check_autoscaler_budget,
    check_committed_files,
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
)
from orchestrator.deploy.cli import deploy_targets
from orchestrator.deploy.layout import GPU, S3_SECRET
from orchestrator.deploy.manifests import apply_json_patch, build
from orchestrator.deploy.monitoring import check_grafana_dashboard
from orchestrator.deploy.rendering import render, set_autoscaler_budget, size_worker_group
from orchestrator.deploy.rules import (
    DO_NOT_DISRUPT,
    DeployError,
    Doc,
    autoscaler_budget,
    check_head_disruption,
    check_head_priority,
    check_head_qos,
    check_image_digests,
    check_object_store,
    check_pod_security,
    check_service_account_tokens,
    is_pinned,
)
from orchestrator.deploy.validation import check_dockerfile, check_manifests, schema_problems, structure_problems
from orchestrator.grid import expand
from orchestrator.plan import plan_spec
from orchestrator.spec import load_spec, parse_spec

ROOT = layout.PROJECT_ROOT
TARGETS = deploy_targets()
RAY_TARGETS = [name for name in TARGETS if name != "monitoring"]
PINS = pinned_versions()
# Targets a cluster pulls for from a registry (their images need digests); the local overlay runs a local build.
CLUSTER_TARGETS = {name for name in TARGETS if name != "overlays/local"}
DIGEST = "sha256:" + "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
PUSHED_IMAGE = f"registry.example.org/team/adversarial-sweep:{PINS['ray']}-gpu-1a2b3c4@{DIGEST}"


@pytest.fixture(scope="module")
def built() -> dict[str, list[Doc]]:
    return {name: build(path) for name, path in TARGETS.items()}


@pytest.fixture(scope="module")
def schemas() -> dict[str, Doc]:
    return validation.load_schemas()


def fresh(built: dict[str, list[Doc]], target: str) -> list[Doc]:
    return copy.deepcopy(built[target])


def ray_doc(docs: list[Doc]) -> Doc:
    return next(doc for doc in docs if doc["kind"] in ("RayJob", "RayCluster"))


def cluster(docs: list[Doc]) -> Doc:
    found = rules.cluster_spec(ray_doc(docs))
    assert found is not None
    return found


def head(docs: list[Doc]) -> Doc:
    container: Doc = cluster(docs)["headGroupSpec"]["template"]["spec"]["containers"][0]
    return container


def worker(docs: list[Doc]) -> Doc:
    container: Doc = cluster(docs)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    return container


def head_env(docs: list[Doc]) -> dict[str, Doc]:
    return {entry["name"]: entry for entry in head(docs).get("env") or []}


def head_group(docs: list[Doc]) -> Doc:
    group: Doc = cluster(docs)["headGroupSpec"]
    return group


def canonical(docs: list[Any]) -> list[Any]:
    return sorted((d for d in docs if d), key=lambda d: (d["kind"], d["metadata"]["name"]))


# ------------------------------------------------------------------------------------------------------------
# Building (our kustomize subset)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: no reference kustomize")
@pytest.mark.parametrize("target", list(TARGETS))
def test_build_equals_kubectl_kustomize(built: dict[str, list[Doc]], target: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(TARGETS[target])], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert canonical(list(yaml.safe_load_all(out))) == canonical(built[target])


def test_build_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: b}\n")
    kustomization = tmp_path / "kustomization.yaml"
    kustomization.write_text("resources: [cm.yaml]\nnamePrefix: x-\n")
    with pytest.raises(DeployError, match="namePrefix not supported"):
        build(tmp_path)
    kustomization.write_text(
        "resources: [cm.yaml]\npatches:\n- patch: '{data: {a: c}}'\n  target: {kind: ConfigMap, name: c}\n"
    )
    with pytest.raises(DeployError, match="only JSON 6902 patches"):
        build(tmp_path)
    kustomization.write_text(
        "resources: [cm.yaml]\npatches:\n- patch: '[{op: replace, path: /data/a, value: c}]'\n"
        "  target: {kind: ConfigMap, name: other}\n"
    )
    with pytest.raises(DeployError, match="matches nothing"):
        build(tmp_path)
    kustomization.write_text("resources: [../outside.yaml]\n")
    (tmp_path.parent / "outside.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: o}\n")
    with pytest.raises(DeployError, match="outside"):
        build(tmp_path)


def test_json_patch_operations() -> None:
    doc: Doc = {"a": {"b": [1, 2]}, "c": "x", "d/e": 0}
    apply_json_patch(
        doc,
        [
            {"op": "add", "path": "/a/b/-", "value": 3},
            {"op": "add", "path": "/a/b/0", "value": 0},
            {"op": "replace", "path": "/c", "value": {"y": 1}},
            {"op": "remove", "path": "/d~1e"},
            {"op": "test", "path": "/a/b/3", "value": 3},
        ],
    )
    assert doc == {"a": {"b": [0, 1, 2, 3]}, "c": {"y": 1}}
    for bad in (
        {"op": "replace", "path": "/missing", "value": 1},
        {"op": "remove", "path": "/a/b/9"},
        {"op": "test", "path": "/c/y", "value": 2},
        {"op": "move", "path": "/c", "from": "/a"},
    ):
        with pytest.raises(DeployError):
            apply_json_patch(copy.deepcopy(doc), [bad])


# ------------------------------------------------------------------------------------------------------------
# Schemas and structure


@pytest.mark.parametrize("target", RAY_TARGETS)
def test_ray_resources_validate_against_kuberay_v1_schemas(
    built: dict[str, list[Doc]], schemas: dict[str, Doc], target: str
) -> None:
    docs = built[target]
    assert any(doc["kind"] in ("RayJob", "RayCluster") for doc in docs)
    assert schema_problems(docs, schemas) == []


def test_schemas_catch_a_misspelled_field(built: dict[str, list[Doc]], schemas: dict[str, Doc]) -> None:
    docs = fresh(built, "overlays/gpu-cluster")
    group = cluster(docs)["workerGroupSpecs"][0]
    group["minReplica"] = group.pop("minReplicas")
    assert any("minReplica" in problem for problem in schema_problems(docs, schemas))
    docs = fresh(built, "overlays/local")
    next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["imge"] = "x"
    assert any("imge" in problem for problem in schema_problems(docs, schemas))


def test_every_object_has_the_basic_structure(built: dict[str, list[Doc]]) -> None:
    docs = [doc for docs in built.values() for doc in docs]
    docs += manifests.load_yaml_documents(layout.DEPLOY_DIR / "base" / "secret.template.yaml")
    assert {"ConfigMap", "Secret", "Service", "Deployment", "Job", "PodMonitor", "RayJob", "RayCluster"} <= {
        doc["kind"] for doc in docs
    }
    assert [problem for doc in docs for problem in structure_problems(doc)] == []


def _deployment(docs: list[Doc]) -> Doc:
    return next(d for d in docs if d["kind"] == "Deployment")


STRUCTURE_BREAKS: dict[str, tuple[str, Callable[[list[Doc]], None], str]] = {
    "no name": ("overlays/local", lambda docs: docs[0]["metadata"].pop("name"), "metadata.name"),
    "wrong apiVersion": ("overlays/local", lambda docs: _deployment(docs).update(apiVersion="v1"), "apps/v1"),
    "selector mismatch": (
        "overlays/local",
        lambda docs: _deployment(docs)["spec"]["selector"]["matchLabels"].update(app="other"),
        "matchLabels",
    ),
    "service without ports": (
        "overlays/local",
        lambda docs: next(d for d in docs if d["kind"] == "Service")["spec"].pop("ports"),
        "spec.ports",
    ),
    "job restarting always": (
        "overlays/local",
        lambda docs: next(d for d in docs if d["kind"] == "Job")["spec"]["template"]["spec"].update(
            restartPolicy="Always"
        ),
        "restartPolicy",
    ),
    "non-string config": (
        "overlays/local",
        lambda docs: next(d for d in docs if d["kind"] == "ConfigMap")["data"].update(N=3),
        "strings",
    ),
    "podmonitor without port": (
        "monitoring",
        lambda docs: docs[0]["spec"]["podMetricsEndpoints"][0].pop("port"),
        "port",
    ),
}


@pytest.mark.parametrize("case", list(STRUCTURE_BREAKS))
def test_structure_checks_catch_broken_objects(built: dict[str, list[Doc]], case: str) -> None:
    target, breaks, expected = STRUCTURE_BREAKS[case]
    docs = fresh(built, target)
    breaks(docs)
    problems = [problem for doc in docs for problem in structure_problems(doc)]
    assert any(expected in problem for problem in problems), problems


# ------------------------------------------------------------------------------------------------------------
# Our rules: the committed and rendered manifests pass, and a broken manifest fails each rule


@pytest.mark.parametrize("target", list(TARGETS))
def test_committed_manifests_pass_every_rule(built: dict[str, list[Doc]], target: str) -> None:
    assert check_manifests(built[target], cluster_target=target in CLUSTER_TARGETS) == []


def test_committed_files_hold_no_secret_and_keep_token_auth() -> None:
    assert check_committed_files() == []


def test_tags_and_ray_version_are_the_pinned_ones(built: dict[str, list[Doc]]) -> None:
    for target in RAY_TARGETS:
        docs = built[target]
        assert cluster(docs)["rayVersion"] == PINS["ray"]
        for doc in docs:
            for container in rules.containers(doc):
                if manifests.is_project_image(container["image"]):
                    assert rules.split_image(container["image"])[1] in (f"{PINS['ray']}-gpu", f"{PINS['ray']}-cpu")


def _set_tag(container: Doc, tag: str) -> None:
    container["image"] = f"{rules.split_image(container['image'])[0]}:{tag}"


# (target, what to break, the rule, a fragment of the expected message)
RULE_BREAKS: dict[str, tuple[str, Callable[[list[Doc]], Any], Callable[[list[Doc]], list[str]], str]] = {
    # image tag and rayVersion = the pinned Ray
    "old ray image tag": ("overlays/gpu-cluster", lambda d: _set_tag(worker(d), "2.59.0-gpu"), check_versions, "tag"),
    "tag without flavour": ("raycluster", lambda d: _set_tag(head(d), PINS["ray"]), check_versions, "tag"),
    "latest tag": ("overlays/local", lambda d: _set_tag(head(d), "latest"), check_versions, "tag"),
    "bucket job tag": (
        "overlays/local",
        lambda d: _set_tag(next(x for x in d if x["kind"] == "Job")["spec"]["template"]["spec"]["containers"][0], "1"),
        check_versions,
        "tag",
    ),
    "rayVersion": (
        "overlays/gpu-cluster",
        lambda d: cluster(d).update(rayVersion="2.59.0"),
        check_versions,
        "rayVersion",
    ),
    "plain ray image": (
        "raycluster",
        lambda d: worker(d).update(image=f"rayproject/ray:{PINS['ray']}-py311-gpu"),
        check_versions,
        "not the project image",
    ),
    # the entrypoint runs an existing, valid sweep file
    "missing spec": (
        "overlays/gpu-cluster",
        lambda d: ray_doc(d)["spec"].update(entrypoint="python -m orchestrator.sweep sweeps/nope.yaml"),
        check_entrypoint,
        "not found",
    ),
    "spec outside sweeps": (
        "overlays/local",
        lambda d: ray_doc(d)["spec"].update(entrypoint="python -m orchestrator.sweep README.md"),
        check_entrypoint,
        "under sweeps/",
    ),
    "shell sequence": (
        "overlays/local",
        lambda d: ray_doc(d)["spec"].update(entrypoint="cd /tmp && python -m orchestrator.sweep sweeps/smoke.yaml"),
        check_entrypoint,
        "one plain command",
    ),
    "not the sweep": (
        "overlays/local",
        lambda d: ray_doc(d)["spec"].update(entrypoint="python train.py sweeps/smoke.yaml"),
        check_entrypoint,
        "does not run",
    ),
    "plan only": (
        "overlays/local",
        lambda d: ray_doc(d)["spec"].update(entrypoint="python -m orchestrator.sweep sweeps/smoke.yaml --plan"),
        check_entrypoint,
        "only `--storage URL`",
    ),
    "storage variable nobody sets": (
        "overlays/local",
        lambda d: ray_doc(d)["spec"].update(entrypoint='python -m orchestrator.sweep sweeps/smoke.yaml --storage "$X"'),
        check_entrypoint,
        "no ConfigMap provides",
    ),
    "empty storage": (
        "overlays/local",
        lambda d: ray_doc(d)["spec"].update(entrypoint="python -m orchestrator.sweep sweeps/smoke.yaml --storage ''"),
        check_entrypoint,
        "--storage is empty",
    ),
    "no working dir": (
        "overlays/local",
        lambda d: ray_doc(d)["spec"].pop("runtimeEnvYAML"),
        check_entrypoint,
        "working_dir",
    ),
    # every pod template that runs Ray reads the S3 Secret (and the ConfigMap)
    "worker without secret": (
        "overlays/gpu-cluster",
        lambda d: worker(d)["envFrom"].pop(1),
        check_pod_env,
        f"worker group gpu-workers: does not read the Secret {S3_SECRET}",
    ),
    "head without secret": (
        "raycluster",
        lambda d: head(d)["envFrom"].pop(1),
        check_pod_env,
        f"head: does not read the Secret {S3_SECRET}",
    ),
    "head without config": (
        "overlays/local",
        lambda d: head(d)["envFrom"].pop(0),
        check_pod_env,
        f"head: does not read the ConfigMap {layout.SWEEP_CONFIG}",
    ),
    "one of two keys": (
        "overlays/gpu-cluster",
        lambda d: worker(d).update(
            envFrom=worker(d)["envFrom"][:1],
            env=[
                {
                    "name": "AWS_ACCESS_KEY_ID",
                    "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": "AWS_ACCESS_KEY_ID"}},
                }
            ],
        ),
        check_pod_env,
        "does not read the Secret",
    ),
    "worker without config": (
        "overlays/gpu-cluster",
        lambda d: worker(d)["envFrom"].pop(0),
        check_pod_env,
        "does not read the ConfigMap",
    ),
    # submitted and polled by the operator (HTTPMode), retried when interrupted, not when invalid
    "K8sJobMode": (
        "overlays/gpu-cluster",
        lambda d: ray_doc(d)["spec"].update(submissionMode="K8sJobMode"),
        check_submission,
        "submissionMode is K8sJobMode",
    ),
    "mode left to KubeRay's default": (
        "overlays/local",
        lambda d: ray_doc(d)["spec"].pop("submissionMode"),
        check_submission,
        "submissionMode is K8sJobMode",
    ),
    "submitter settings": (
        "overlays/gpu-cluster",
        lambda d: ray_doc(d)["spec"].update(submitterConfig={"backoffLimit": 2}),
        check_submission,
        "submitterConfig belongs to K8sJobMode",
    ),
    "interrupted sweep not retried": (
        "overlays/gpu-cluster",
        lambda d: ray_doc(d)["spec"].update(backoffLimit=0),
        check_submission,
        "backoffLimit is 0",
    ),
    "invalid spec retried": (
        "overlays/local",
        lambda d: head(d).update(env=[e for e in head(d)["env"] if e["name"] != ray_job.STOP_ON_INVALID_ENV]),
        check_submission,
        f"sets no {ray_job.STOP_ON_INVALID_ENV}=1",
    ),
    "working dir uploaded": (
        "overlays/gpu-cluster",
        lambda d: ray_doc(d)["spec"].update(runtimeEnvYAML="working_dir: /home/ray/app\n"),
        check_entrypoint,
        "working_dir: local:///home/ray/app",
    ),
    # GPU workers request GPUs, the head none and num-cpus "0"
    "head takes work": (
        "overlays/gpu-cluster",
        lambda d: cluster(d)["headGroupSpec"]["rayStartParams"].update({"num-cpus": "8"}),
        check_resources,
        'num-cpus must be "0"',
    ),
    "head num-cpus left out": (
        "raycluster",
        lambda d: cluster(d)["headGroupSpec"]["rayStartParams"].pop("num-cpus"),
        check_resources,
        'num-cpus must be "0"',
    ),
    "head with a GPU": (
        "overlays/gpu-cluster",
        lambda d: head(d)["resources"]["limits"].update({GPU: 1}),
        check_resources,
        "head: must not request GPUs",
    ),
    "GPU worker without GPUs": (
        "overlays/gpu-cluster",
        lambda d: [worker(d)["resources"][key].pop(GPU) for key in ("limits", "requests")],
        check_resources,
        "sets no nvidia.com/gpu limit",
    ),
    "GPU request differs": (
        "raycluster",
        lambda d: worker(d)["resources"]["requests"].update({GPU: 4}),
        check_resources,
        "differs from its limit",
    ),
    "CPU worker with a GPU": (
        "overlays/local",
        lambda d: worker(d)["resources"]["limits"].update({GPU: 1}),
        check_resources,
        "CPU image but requests GPUs",
    ),
    "autoscaling off": (
        "overlays/gpu-cluster",
        lambda d: cluster(d).update(enableInTreeAutoscaling=False),
        check_resources,
        "enableInTreeAutoscaling",
    ),
    "replicas above max": (
        "raycluster",
        lambda d: cluster(d)["workerGroupSpecs"][0].update(replicas=17),
        check_resources,
        "minReplicas <= replicas <= maxReplicas",
    ),
    "never scales down": (
        "overlays/gpu-cluster",
        lambda d: cluster(d)["workerGroupSpecs"][0].update(minReplicas=16),
        check_resources,
        "minReplicas 16 >= maxReplicas 16",
    ),
    # the head stays on a CPU node and off the GPUs, and serves its metrics
    "head counts GPUs": (
        "overlays/gpu-cluster",
        lambda d: head_group(d)["rayStartParams"].pop("num-gpus"),
        check_head,
        'num-gpus must be "0"',
    ),
    "head sees every GPU": (
        "raycluster",
        lambda d: head(d).update(env=[e for e in head(d)["env"] if e["name"] != "NVIDIA_VISIBLE_DEVICES"]),
        check_head,
        "NVIDIA_VISIBLE_DEVICES must be void",
    ),
    "head on any node": (
        "overlays/gpu-cluster",
        lambda d: head_group(d)["template"]["spec"].pop("nodeSelector"),
        check_head,
        "needs a nodeSelector for a CPU node pool",
    ),
    "head on the GPU pool": (
        "raycluster",
        lambda d: head_group(d)["template"]["spec"].update(nodeSelector={"nvidia.com/gpu.present": "true"}),
        check_head,
        "needs a nodeSelector for a CPU node pool",
    ),
    "head tolerates the GPU taint": (
        "overlays/gpu-cluster",
        lambda d: head_group(d)["template"]["spec"].update(
            tolerations=[{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
        ),
        check_head,
        "must not land on a GPU node",
    ),
    "head tolerates everything": (
        "overlays/local",
        lambda d: head_group(d)["template"]["spec"].update(tolerations=[{"operator": "Exists"}]),
        check_head,
        "must not land on a GPU node",
    ),
    "head unsized": (
        "overlays/gpu-cluster",
        lambda d: head(d)["resources"].pop("requests"),
        check_head,
        "needs cpu and memory requests",
    ),
    "head without the autoscaler's metrics port": (
        "raycluster",
        lambda d: head(d).update(ports=[p for p in head(d)["ports"] if p["name"] != "as-metrics"]),
        check_head,
        "as-metrics = 44217",
    ),
    "head PodMonitor without dashboard metrics": (
        "monitoring",
        lambda d: d[0]["spec"]["podMetricsEndpoints"].pop(2),
        check_monitoring,
        "scrapes no dash-metrics of the head pods",
    ),
    "worker PodMonitor without metrics": (
        "monitoring",
        lambda d: d[1]["spec"]["podMetricsEndpoints"][0].update(port="other"),
        check_monitoring,
        "scrapes no metrics of the worker pods",
    ),
    # the driver's budget (on the head) is what the worker groups can grow to
    "GPU budget below the worker group": (
        "overlays/gpu-cluster",
        lambda d: head_env(d)["SWEEP_AUTOSCALER_MAX_GPUS"].update(value="64"),
        check_autoscaler_budget,
        "SWEEP_AUTOSCALER_MAX_GPUS is '64' but the cluster holds at most 128 GPUs",
    ),
    "maxReplicas raised, budget not": (
        "raycluster",
        lambda d: cluster(d)["workerGroupSpecs"][0].update(maxReplicas=20),
        check_autoscaler_budget,
        "SWEEP_AUTOSCALER_MAX_GPUS is '128' but the cluster holds at most 160 GPUs",
    ),
    "worker pods resized, CPU budget not": (
        "overlays/local",
        lambda d: worker(d)["resources"]["limits"].update(cpu="4"),
        check_autoscaler_budget,
        "SWEEP_AUTOSCALER_MAX_CPUS is '2' but the cluster holds at most 4 CPUs",
    ),
    "fractional worker CPUs round up": (
        "overlays/local",
        lambda d: worker(d)["resources"]["limits"].update(cpu="2500m"),
        check_autoscaler_budget,
        "at most 3 CPUs",
    ),
    "num-gpus start parameter": (
        "raycluster",
        lambda d: cluster(d)["workerGroupSpecs"][0]["rayStartParams"].update({"num-gpus": "4"}),
        check_autoscaler_budget,
        "at most 64 GPUs",
    ),
    "head takes CPUs": (
        "overlays/local",
        lambda d: cluster(d)["headGroupSpec"]["rayStartParams"].update({"num-cpus": "1"}),
        check_autoscaler_budget,
        "at most 3 CPUs",
    ),
    "no budget on the head": (
        "overlays/gpu-cluster",
        lambda d: head(d).pop("env"),
        check_autoscaler_budget,
        "sets no SWEEP_AUTOSCALER_MAX_GPUS",
    ),
    "budget from a reference": (
        "raycluster",
        lambda d: head(d).update(
            env=[
                head_env(d)["SWEEP_AUTOSCALER_MAX_GPUS"],
                {
                    "name": "SWEEP_AUTOSCALER_MAX_CPUS",
                    "valueFrom": {"configMapKeyRef": {"name": "sweep-config", "key": "MAX_CPUS"}},
                },
            ]
        ),
        check_autoscaler_budget,
        "SWEEP_AUTOSCALER_MAX_CPUS is 'not a literal value'",
    ),
    "budget in the shared ConfigMap": (
        "overlays/local",
        lambda d: next(x for x in d if x["kind"] == "ConfigMap")["data"].update(SWEEP_AUTOSCALER_MAX_GPUS="0"),
        check_autoscaler_budget,
        "ConfigMap/sweep-config: sets SWEEP_AUTOSCALER_MAX_GPUS",
    ),
    "budget in the runtime env": (
        "overlays/gpu-cluster",
        lambda d: ray_doc(d)["spec"].update(
            runtimeEnvYAML="working_dir: /home/ray/app\nenv_vars: {SWEEP_AUTOSCALER_MAX_GPUS: '8'}\n"
        ),
        check_autoscaler_budget,
        "runtimeEnvYAML sets SWEEP_AUTOSCALER_MAX_GPUS",
    ),
    # names within KubeRay's limits
    "long RayJob name": (
        "overlays/local",
        lambda d: ray_doc(d)["metadata"].update(name="s" * 48),
        check_names,
        "at most 47",
    ),
    "long RayCluster name": (
        "raycluster",
        lambda d: ray_doc(d)["metadata"].update(name="s" * 54),
        check_names,
        "at most 53",
    ),
    "not DNS-1035": (
        "overlays/local",
        lambda d: ray_doc(d)["metadata"].update(name="Sweep_1"),
        check_names,
        "DNS-1035",
    ),
    # token authentication never disabled
    "no authOptions": (
        "overlays/gpu-cluster",
        lambda d: cluster(d).pop("authOptions"),
        check_token_auth,
        "mode must be token",
    ),
    "auth disabled": (
        "raycluster",
        lambda d: cluster(d)["authOptions"].update(mode="disabled"),
        check_token_auth,
        "mode must be token",
    ),
    "RAY_AUTH_MODE=disabled": (
        "overlays/local",
        lambda d: worker(d).setdefault("env", []).append({"name": "RAY_AUTH_MODE", "value": "disabled"}),
        check_token_auth,
        "RAY_AUTH_MODE=disabled",
    ),
    # the head: Guaranteed QoS in every container, the autoscaler sidecar and any sidecar of ours included
    "autoscaler sidecar burstable": (
        "overlays/gpu-cluster",
        lambda d: cluster(d)["autoscalerOptions"]["resources"]["requests"].update(cpu="250m"),
        check_head_qos,
        "head container autoscaler: cpu request 250m differs from its limit 500m",
    ),
    "head memory burstable": (
        "overlays/local",
        lambda d: head(d)["resources"]["requests"].update(memory="2Gi"),
        check_head_qos,
        "head container ray-head: memory request 2Gi differs from its limit 3Gi",
    ),
    "head without limits": (
        "raycluster",
        lambda d: head(d)["resources"].pop("limits"),
        check_head_qos,
        "head container ray-head: sets no cpu limit",
    ),
    "a sidecar of ours without limits": (
        "overlays/gpu-cluster",
        lambda d: head_group(d)["template"]["spec"]["containers"].append(
            {"name": "log-shipper", "image": PUSHED_IMAGE, "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}
        ),
        check_head_qos,
        "head container log-shipper: sets no memory limit",
    ),
    # the head's priority
    "head without a priority class": (
        "overlays/gpu-cluster",
        lambda d: head_group(d)["template"]["spec"].pop("priorityClassName"),
        check_head_priority,
        "head: sets no priorityClassName",
    ),
    "priority class not shipped": (
        "raycluster",
        lambda d: d.remove(next(x for x in d if x["kind"] == "PriorityClass")),
        check_head_priority,
        "priorityClassName sweep-head-critical names no PriorityClass these manifests ship",
    ),
    "priority class as the global default": (
        "overlays/local",
        lambda d: next(x for x in d if x["kind"] == "PriorityClass").update(globalDefault=True),
        check_head_priority,
        "PriorityClass/sweep-head-critical: needs a positive integer value and globalDefault false",
    ),
    # no voluntary eviction of the head
    "no disruption budget": (
        "overlays/gpu-cluster",
        lambda d: d.remove(next(x for x in d if x["kind"] == "PodDisruptionBudget")),
        check_head_disruption,
        "head: no PodDisruptionBudget with maxUnavailable 0 selects it",
    ),
    "budget allows an eviction": (
        "raycluster",
        lambda d: next(x for x in d if x["kind"] == "PodDisruptionBudget")["spec"].update(maxUnavailable=1),
        check_head_disruption,
        "head: no PodDisruptionBudget with maxUnavailable 0 selects it",
    ),
    "budget selects the workers": (
        "overlays/local",
        lambda d: next(x for x in d if x["kind"] == "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].update(
            {"ray.io/node-type": "worker"}
        ),
        check_head_disruption,
        "head: no PodDisruptionBudget with maxUnavailable 0 selects it",
    ),
    "budget selects another app": (
        "overlays/gpu-cluster",
        lambda d: next(x for x in d if x["kind"] == "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].update(
            {"app.kubernetes.io/part-of": "other"}
        ),
        check_head_disruption,
        "head: no PodDisruptionBudget with maxUnavailable 0 selects it",
    ),
    # the object store fits the memory-backed /dev/shm
    "head object store unsized": (
        "overlays/gpu-cluster",
        lambda d: head_group(d)["rayStartParams"].pop("object-store-memory"),
        check_object_store,
        "head: sets no rayStartParams object-store-memory",
    ),
    "head object store above /dev/shm": (
        "overlays/local",
        lambda d: head_group(d)["rayStartParams"].update({"object-store-memory": str(2 * 2**30)}),
        check_object_store,
        f"head: object-store-memory {2 * 2**30} is not below its /dev/shm sizeLimit ({2**30} bytes)",
    ),
    "/dev/shm on disk": (
        "raycluster",
        lambda d: head_group(d)["template"]["spec"]["volumes"][0]["emptyDir"].pop("medium"),
        check_object_store,
        "head: sets object-store-memory but mounts no emptyDir of medium Memory with a sizeLimit at /dev/shm",
    ),
    "worker object store above /dev/shm": (
        "raycluster",
        lambda d: cluster(d)["workerGroupSpecs"][0]["rayStartParams"].update({"object-store-memory": str(80 * 2**30)}),
        check_object_store,
        "worker group gpu-workers: object-store-memory 85899345920 is not below its /dev/shm sizeLimit",
    ),
    # Pod Security "restricted" on every pod and container
    "head may escalate": (
        "overlays/gpu-cluster",
        lambda d: head(d)["securityContext"].pop("allowPrivilegeEscalation"),
        check_pod_security,
        "head container ray-head: needs allowPrivilegeEscalation: false (Pod Security restricted)",
    ),
    "worker keeps its capabilities": (
        "raycluster",
        lambda d: worker(d)["securityContext"].pop("capabilities"),
        check_pod_security,
        "worker group gpu-workers container ray-worker: needs capabilities.drop [ALL]",
    ),
    "worker adds a capability": (
        "overlays/gpu-cluster",
        lambda d: worker(d)["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
        check_pod_security,
        "container ray-worker: needs no added capability but NET_BIND_SERVICE",
    ),
    "autoscaler sidecar may escalate": (
        "overlays/local",
        lambda d: cluster(d)["autoscalerOptions"]["securityContext"].pop("allowPrivilegeEscalation"),
        check_pod_security,
        "head container autoscaler: needs allowPrivilegeEscalation: false",
    ),
    "head unconfined": (
        "raycluster",
        lambda d: head_group(d)["template"]["spec"]["securityContext"].pop("seccompProfile"),
        check_pod_security,
        "head container ray-head: needs seccompProfile.type RuntimeDefault",
    ),
    "MinIO as root": (
        "overlays/local",
        lambda d: _deployment(d)["spec"]["template"]["spec"]["securityContext"].update(runAsUser=0),
        check_pod_security,
        "Deployment/minio container minio: needs a non-zero runAsUser",
    ),
    "bucket Job may run as root": (
        "overlays/local",
        lambda d: next(x for x in d if x["kind"] == "Job")["spec"]["template"]["spec"]["securityContext"].pop(
            "runAsNonRoot"
        ),
        check_pod_security,
        "Job/sweep-bucket container create-bucket: needs runAsNonRoot: true",
    ),
    "worker on the host network": (
        "overlays/gpu-cluster",
        lambda d: cluster(d)["workerGroupSpecs"][0]["template"]["spec"].update(hostNetwork=True),
        check_pod_security,
        "worker group gpu-workers: hostNetwork is not allowed",
    ),
    "worker mounts the host": (
        "raycluster",
        lambda d: cluster(d)["workerGroupSpecs"][0]["template"]["spec"]["volumes"].append(
            {"name": "nvme", "hostPath": {"path": "/mnt/nvme"}}
        ),
        check_pod_security,
        "worker group gpu-workers: volume nvme is a hostPath",
    ),
    # no service-account token where nothing calls the Kubernetes API
    "worker with a token": (
        "overlays/gpu-cluster",
        lambda d: cluster(d)["workerGroupSpecs"][0]["template"]["spec"].pop("automountServiceAccountToken"),
        check_service_account_tokens,
        "worker group gpu-workers: mounts a service-account token",
    ),
    "worker token switched on": (
        "raycluster",
        lambda d: cluster(d)["workerGroupSpecs"][0]["template"]["spec"].update(automountServiceAccountToken=True),
        check_service_account_tokens,
        "worker group gpu-workers: mounts a service-account token",
    ),
    "MinIO with a token": (
        "overlays/local",
        lambda d: _deployment(d)["spec"]["template"]["spec"].pop("automountServiceAccountToken"),
        check_service_account_tokens,
        "Deployment/minio: mounts a service-account token",
    ),
}


@pytest.mark.parametrize("case", list(RULE_BREAKS))
def test_each_rule_catches_a_broken_manifest(built: dict[str, list[Doc]], case: str) -> None:
    target, breaks, rule, expected = RULE_BREAKS[case]
    docs = fresh(built, target)
    assert rule(docs) == []
    breaks(docs)
    problems = rule(docs)
    assert any(expected in problem for problem in problems), problems
    assert any(expected in problem for problem in check_manifests(docs))


def test_the_head_may_carry_the_do_not_disrupt_annotations_instead(built: dict[str, list[Doc]]) -> None:
    docs = fresh(built, "overlays/gpu-cluster")
    docs.remove(next(x for x in docs if x["kind"] == "PodDisruptionBudget"))
    metadata = head_group(docs)["template"]["metadata"]
    metadata["annotations"] = dict(list(DO_NOT_DISRUPT.items())[:1])  # one autoscaler's is not enough
    assert any("no PodDisruptionBudget" in problem for problem in check_head_disruption(docs))
    metadata["annotations"] = dict(DO_NOT_DISRUPT)
    assert check_head_disruption(docs) == []


def test_the_head_keeps_its_service_account_token_for_the_autoscaler(built: dict[str, list[Doc]]) -> None:
    for target in RAY_TARGETS:
        spec = head_group(built[target])["template"]["spec"]
        assert spec.get("automountServiceAccountToken") is not False, target
        assert cluster(built[target])["enableInTreeAutoscaling"] is True


def _without_digests(docs: list[Doc]) -> list[Doc]:
    for doc in docs:
        for container in rules.containers(doc):
            container["image"] = container["image"].split("@")[0]
    return docs


# (target, what to break, the container the message names)
DIGEST_BREAKS: dict[str, tuple[str, Callable[[list[Doc]], Any], str]] = {
    "worker by tag": (
        "overlays/gpu-cluster",
        lambda d: _set_tag(worker(d), f"{PINS['ray']}-gpu"),
        "worker group gpu-workers container ray-worker: image 'registry.example.com/ml/adversarial-sweep:2.60.0-gpu' "
        "is a mutable tag",
    ),
    "head by tag": ("raycluster", lambda d: _set_tag(head(d), f"{PINS['ray']}-gpu"), "head container ray-head"),
    "a short digest": (
        "overlays/gpu-cluster",
        lambda d: head(d).update(image=head(d)["image"].split("@")[0] + "@sha256:abc123"),
        "head container ray-head",
    ),
    "autoscaler image by tag": (
        "raycluster",
        lambda d: cluster(d)["autoscalerOptions"].update(image=f"rayproject/ray:{PINS['ray']}-py311"),
        "head container autoscaler: image 'rayproject/ray:2.60.0-py311' is a mutable tag",
    ),
}


@pytest.mark.parametrize("case", list(DIGEST_BREAKS))
def test_cluster_targets_pull_images_by_digest(built: dict[str, list[Doc]], case: str) -> None:
    target, breaks, expected = DIGEST_BREAKS[case]
    docs = fresh(built, target)
    assert check_image_digests(docs, cluster_target=True) == []
    breaks(docs)
    problems = check_image_digests(docs, cluster_target=True)
    assert any(expected in problem for problem in problems), problems
    assert any(expected in problem for problem in check_manifests(docs, cluster_target=True))
    # The same objects for a local cluster run the local build, by tag.
    assert check_image_digests(docs, cluster_target=False) == []


def test_the_local_overlay_runs_its_images_by_tag(built: dict[str, list[Doc]]) -> None:
    docs = built["overlays/local"]
    assert check_manifests(docs) == []
    problems = check_image_digests(docs, cluster_target=True)
    assert any("container minio" in problem for problem in problems)
    assert any("container ray-head: image 'adversarial-sweep:2.60.0-cpu' is a mutable tag" in p for p in problems)


def test_cli_check_refuses_a_tag_on_a_cluster_target_only(monkeypatch: Any, capsys: Any) -> None:
    real_build = manifests.build
    broken = layout.OVERLAYS_DIR / "gpu-cluster"
    monkeypatch.setattr(
        cli, "build", lambda path: _without_digests(real_build(path)) if path == broken else real_build(path)
    )
    assert cli.main(["check"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out and all(line.startswith("overlays/gpu-cluster: ") and "is a mutable tag" in line for line in out)


def test_render_for_a_cluster_takes_an_image_by_digest() -> None:
    docs = render(ROOT / "sweeps/ablation.yaml", "gpu-cluster", image=PUSHED_IMAGE)
    images = {c["image"] for doc in docs for c in rules.containers(doc) if manifests.is_project_image(c["image"])}
    assert images == {PUSHED_IMAGE}
    with pytest.raises(DeployError, match="is a mutable tag"):
        render(ROOT / "sweeps/ablation.yaml", "gpu-cluster", image=PUSHED_IMAGE.split("@")[0])
    # The committed overlay names the image by digest: rendered without --image, it still passes.
    assert all(
        is_pinned(c["image"])
        for doc in render(ROOT / "sweeps/ablation.yaml", "gpu-cluster")
        for c in rules.containers(doc)
    )


def test_kustomize_images_with_a_tag_and_a_digest() -> None:
    docs: list[Doc] = [{"kind": "Pod", "spec": {"containers": [{"name": "c", "image": "adversarial-sweep:x"}]}}]
    manifests._set_image(
        {"name": "adversarial-sweep", "newName": "r.io/a/adversarial-sweep", "newTag": "t", "digest": DIGEST}, docs
    )
    assert docs[0]["spec"]["containers"][0]["image"] == f"r.io/a/adversarial-sweep:t@{DIGEST}"


# What each cluster can grow to: (GPUs, CPUs) = maxReplicas x (GPUs, CPUs) per worker pod; the heads have none.
BUDGETS = {"overlays/gpu-cluster": (16 * 8, 16 * 64), "overlays/local": (0, 1 * 2), "raycluster": (16 * 8, 16 * 64)}


@pytest.mark.parametrize("target", RAY_TARGETS)
def test_driver_budget_is_the_worker_groups_maximum(built: dict[str, list[Doc]], target: str) -> None:
    docs = built[target]
    group = cluster(docs)["workerGroupSpecs"][0]
    limits = worker(docs)["resources"]["limits"]
    gpus, cpus = BUDGETS[target]
    assert (group["maxReplicas"] * limits.get(GPU, 0), group["maxReplicas"] * int(limits["cpu"])) == (gpus, cpus)
    env = head_env(docs)
    assert env["SWEEP_AUTOSCALER_MAX_GPUS"]["value"] == str(gpus)
    assert env["SWEEP_AUTOSCALER_MAX_CPUS"]["value"] == str(cpus)
    assert autoscaler_budget(ray_doc(docs)) == {"GPU": gpus, "CPU": cpus}
    # Only the head (where the driver runs) sets them.
    assert not {e["name"] for e in worker(docs).get("env") or []} & set(placement.AUTOSCALER_MAX_ENV.values())


def test_driver_on_the_rendered_head_budgets_the_whole_cluster(monkeypatch: Any) -> None:
    """The variables the manifests set are the ones orchestrator.sweep reads: a driver started with the head's
    environment on a cluster scaled down to one node still budgets all 16 nodes."""
    from orchestrator import sweep

    for name, entry in head_env(render(ROOT / "sweeps/ablation.yaml", "gpu-cluster")).items():
        monkeypatch.setenv(name, entry["value"])
    assert sweep._resource_budget({"CPU": 64.0, "GPU": 8.0}) == {"CPU": 1024.0, "GPU": 128.0}


def test_without_the_variables_the_autoscalers_node_types_set_the_budget(monkeypatch: Any) -> None:
    """A cluster started by `ray start --autoscaling-config` (no KubeRay manifests, so no SWEEP_AUTOSCALER_MAX_*)
    is budgeted from what Ray's GCS says its autoscaler may add; tests/test_autoscaling_ray.py runs one."""
    from orchestrator import sweep

    for variable in sweep.AUTOSCALER_MAX_ENV.values():
        monkeypatch.delenv(variable, raising=False)
    head = {"CPU": 2.0, "node:__internal_head__": 1.0}
    types = [("gpu", {"CPU": 4.0, "GPU": 2.0}, 3), ("cpu", {"CPU": 8.0}, 1)]
    assert sweep._resource_budget(head, types, head) == {"CPU": 2 + 12 + 8, "GPU": 6.0}
    # A type without a limit (-1) gives no ceiling to plan on: only the live cluster counts.
    assert sweep._resource_budget(head, [*types, ("any", {"GPU": 1.0}, -1)], head) == {"CPU": 2.0, "GPU": 0.0}
    assert sweep._resource_budget(head) == {"CPU": 2.0, "GPU": 0.0}  # no autoscaler
    monkeypatch.setenv("SWEEP_AUTOSCALER_MAX_GPUS", "4")  # the deployment's word wins
    assert sweep._resource_budget(head, types, head)["GPU"] == 4.0


def test_render_sets_the_budget_of_the_sized_worker_group(monkeypatch: Any) -> None:
    """`render` sizes the worker group from the spec's plan and the head's budget follows the same numbers."""
    sized = rendering.WorkerGroupSize(
        replicas=3, min_replicas=1, max_replicas=3, gpus_per_pod=0, workers_per_pod=1, cpus_per_pod=2
    )
    monkeypatch.setattr(rendering, "size_worker_group", lambda *args: sized)
    docs = render(ROOT / "sweeps/tiny.yaml", "local")
    assert cluster(docs)["workerGroupSpecs"][0]["maxReplicas"] == 3
    assert {k: v["value"] for k, v in head_env(docs).items() if k in placement.AUTOSCALER_MAX_ENV.values()} == {
        "SWEEP_AUTOSCALER_MAX_GPUS": "0",
        "SWEEP_AUTOSCALER_MAX_CPUS": "6",
    }
    assert check_manifests(docs) == []


def test_set_autoscaler_budget_adds_or_replaces(built: dict[str, list[Doc]]) -> None:
    docs = fresh(built, "raycluster")
    cluster(docs)["workerGroupSpecs"][0]["maxReplicas"] = 32
    head(docs).pop("env")
    head(docs)["env"] = [{"name": "SWEEP_AUTOSCALER_MAX_CPUS", "valueFrom": {"configMapKeyRef": {"name": "x"}}}]
    set_autoscaler_budget(ray_doc(docs))
    assert head(docs)["env"] == [
        {"name": "SWEEP_AUTOSCALER_MAX_CPUS", "value": "2048"},
        {"name": "SWEEP_AUTOSCALER_MAX_GPUS", "value": "256"},
    ]
    assert check_autoscaler_budget(docs) == []


def test_length_limit_is_inclusive(built: dict[str, list[Doc]]) -> None:
    docs = fresh(built, "overlays/local")
    ray_doc(docs)["metadata"]["name"] = "s" * layout.MAX_RAYJOB_NAME
    assert check_names(docs) == []


def test_entrypoint_rule_validates_the_spec(built: dict[str, list[Doc]], tmp_path: Path) -> None:
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "smoke.yaml").write_text(
        "name: smoke\nworkload: {data: {url: x}}\ngrid: {norm: [batchnorm]}\n"
    )
    problems = check_entrypoint(built["overlays/local"], root=tmp_path)
    assert problems and "'batchnorm' is not one of" in problems[0]


def test_secret_env_from_keys_is_accepted(built: dict[str, list[Doc]]) -> None:
    docs = fresh(built, "overlays/gpu-cluster")
    worker(docs)["envFrom"] = worker(docs)["envFrom"][:1]
    worker(docs)["env"] = [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": key}}} for key in layout.S3_SECRET_KEYS
    ]
    assert check_pod_env(docs) == []


def test_secret_template_holds_placeholders_only(built: dict[str, list[Doc]]) -> None:
    [template] = manifests.load_yaml_documents(layout.DEPLOY_DIR / "base" / "secret.template.yaml")
    assert (template["kind"], template["metadata"]["name"]) == ("Secret", S3_SECRET)
    assert set(template["stringData"]) == set(layout.S3_SECRET_KEYS)
    assert all(checks.is_placeholder(value) and value for value in template["stringData"].values())
    # Never applied by `kubectl apply -k`: it would overwrite the real credentials with placeholders.
    assert not any(doc["kind"] == "Secret" for docs in built.values() for doc in docs)


LEAKS = {
    "aws key id": ("notes.txt", "key: AKIA" + "ABCDEFGHIJKLMNOP\n", "AWS access key id"),
    "private key": ("id.txt", "-----BEGIN RSA " + "PRIVATE KEY-----\nabc\n", "private key"),
    "secret value": (
        "s.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {AWS_SECRET_ACCESS_KEY: hunter2hunter2}\n",
        "stringData.AWS_SECRET_ACCESS_KEY holds a value",
    ),
    "base64 secret value": (
        "s.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {AWS_ACCESS_KEY_ID: c2VjcmV0}\n",
        "data.AWS_ACCESS_KEY_ID holds a value",
    ),
    "literal env": (
        "p.yaml",
        "- op: add\n  path: /spec/template/spec/containers/-\n"
        "  value: {name: c, image: i, env: [{name: AWS_SECRET_ACCESS_KEY, value: abc}]}\n",
        "env AWS_SECRET_ACCESS_KEY has a literal value",
    ),
    "password in a URL": (
        "c.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {AWS_ENDPOINT_URL: 'http://u:p4ss@minio:9000'}\n",
        "password in the URL",
    ),
    "credential in a ConfigMap": (
        "c.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {MINIO_ROOT_PASSWORD: abc}\n",
        "looks like a credential",
    ),
    "auth off in a manifest": (
        "w.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: c\n    image: i\n"
        "    env: [{name: RAY_AUTH_MODE, value: disabled}]\n",
        "RAY_AUTH_MODE=disabled",
    ),
    "baked into the image": ("Dockerfile", "FROM x\nENV AWS_SECRET_ACCESS_KEY=abc\n", "bakes a credential"),
    "auth off in the image": ("Dockerfile", "FROM x\nENV RAY_AUTH_MODE=disabled\n", "RAY_AUTH_MODE=disabled"),
}


@pytest.mark.parametrize("case", list(LEAKS))
def test_committed_file_scan_catches_secrets(tmp_path: Path, case: str) -> None:
    name, text, expected = LEAKS[case]
    root = tmp_path / "deploy"
    root.mkdir()
    (root / "ok.yaml").write_text(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {AWS_ACCESS_KEY_ID: REPLACE_ME, B: '<token>'}\n"
    )
    assert check_committed_files(root) == []
    (root / name).write_text(text)
    problems = check_committed_files(root)
    assert any(expected in problem for problem in problems), problems


# ------------------------------------------------------------------------------------------------------------
# The Dockerfile installs exactly the pinned versions


DOCKERFILE = (layout.DEPLOY_DIR / "Dockerfile").read_text()


def test_dockerfile_builds_on_the_pinned_ray_and_torch() -> None:
    assert check_dockerfile(DOCKERFILE, PINS) == []
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE, re.MULTILINE))
    assert (args["RAY_VERSION"], args["TORCH_VERSION"]) == (PINS["ray"], PINS["torch"])


DOCKER_BREAKS = {
    "old ray": (("ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.59.0"), "pinned Ray"),
    "old torch": (("ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.12.0"), "not the pinned torch"),
    "torch pinned by hand": (
        ('"torch==${TORCH_VERSION}" --index-url "', '"torch==2.12.1" --index-url "'),
        "torch==2.12.1",
    ),
    "no CPU flavour": (("-py311 AS flavour-cpu", "-py311-gpu AS flavour-cpu"), "no CPU stage"),
    "CUDA torch on CPU": (("whl/cpu", "whl/cu128"), "CPU stage does not install torch"),
    "python 3.12": (("-py311-gpu", "-py312-gpu"), "no GPU stage"),
    "root": (("USER 1000:100", "USER root"), "non-root"),
    "project not installed": (("--no-deps . &&", "--no-deps -e /nowhere &&"), "pip install ."),
    "torchattacks": (("--no-deps . &&", "--no-deps . torchattacks==3.5.1 &&"), "torchattacks"),
}


@pytest.mark.parametrize("case", list(DOCKER_BREAKS))
def test_dockerfile_check_catches_drift(case: str) -> None:
    (old, new), expected = DOCKER_BREAKS[case]
    assert old in DOCKERFILE
    problems = check_dockerfile(DOCKERFILE.replace(old, new), PINS)
    assert any(expected in problem for problem in problems), problems


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", "runs", ".git", "**/__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"):
        assert entry in ignored


# ------------------------------------------------------------------------------------------------------------
# Rendering for a spec


def _group(docs: list[Doc]) -> Doc:
    group: Doc = cluster(docs)["workerGroupSpecs"][0]
    return group


def test_render_ablation_on_the_gpu_cluster_holds_the_largest_cell(schemas: dict[str, Doc]) -> None:
    docs = render(ROOT / "sweeps/ablation.yaml", "gpu-cluster")
    spec = load_spec(ROOT / "sweeps/ablation.yaml")
    largest = max(cell.gpus for cell in expand(spec))
    assert largest == 128  # batch 4096 = 128 workers x 32 images (Section 3)
    group = _group(docs)
    gpus_per_pod = worker(docs)["resources"]["limits"][GPU]
    assert worker(docs)["resources"]["requests"][GPU] == gpus_per_pod == spec.resources.gpus_per_node
    assert group["maxReplicas"] * gpus_per_pod >= largest
    assert group["replicas"] == group["maxReplicas"] > group["minReplicas"] == 0  # starts full, autoscales down
    assert group["maxReplicas"] * gpus_per_pod <= spec.resources.cluster_gpus
    job = ray_doc(docs)
    assert job["spec"]["entrypoint"].split()[:4] == ["python", "-m", "orchestrator.sweep", "sweeps/ablation.yaml"]
    assert job["metadata"]["name"] == "sweep-ablation"
    assert check_manifests(docs) == [] and schema_problems(docs, schemas) == []


def test_render_smoke_on_the_local_cluster_requests_no_gpu(schemas: dict[str, Doc]) -> None:
    docs = render(ROOT / "sweeps/smoke.yaml", "local")
    for doc in docs:
        for container in rules.containers(doc):
            resources = container.get("resources") or {}
            assert GPU not in (resources.get("limits") or {}) and GPU not in (resources.get("requests") or {})
        assert "nvidia.com/gpu.present" not in json.dumps(doc)
    assert "sweeps/smoke.yaml" in ray_doc(docs)["spec"]["entrypoint"]
    assert check_manifests(docs) == [] and schema_problems(docs, schemas) == []


@pytest.mark.parametrize(("overlay", "spec"), [("gpu-cluster", "ablation"), ("local", "smoke")])
def test_committed_overlays_are_what_render_gives_for_their_spec(
    built: dict[str, list[Doc]], overlay: str, spec: str
) -> None:
    """`kubectl apply -k` of an overlay and `render` of its spec create the same objects (the deadline aside,
    which an overlay may round up)."""
    committed = fresh(built, f"overlays/{overlay}")
    rendered = render(ROOT / f"sweeps/{spec}.yaml", overlay)
    committed_deadline = ray_doc(committed)["spec"].pop("activeDeadlineSeconds")
    assert committed_deadline >= ray_doc(rendered)["spec"].pop("activeDeadlineSeconds")
    assert canonical(committed) == canonical(rendered)


def test_render_sets_the_image_everywhere_the_project_runs() -> None:
    image = f"registry.example.org/team/adversarial-sweep:{PINS['ray']}-cpu-1a2b3c4"
    docs = render(ROOT / "sweeps/tiny.yaml", "local", image=image)
    images = {c["image"] for doc in docs for c in rules.containers(doc) if manifests.is_project_image(c["image"])}
    assert images == {image}
    with pytest.raises(DeployError, match="tag"):
        render(ROOT / "sweeps/tiny.yaml", "local", image="registry.example.org/adversarial-sweep:latest")


def _ablation_with(**resources: Any) -> Any:
    spec = load_spec(ROOT / "sweeps/ablation.yaml")
    return spec.model_copy(update={"resources": spec.resources.model_copy(update=resources)})


def test_worker_group_sizing() -> None:
    spec = _ablation_with(cluster_gpus=256)
    size = size_worker_group(spec, expand(spec), pod_cpus=64, pod_gpus=8)
    assert (size.min_replicas, size.replicas, size.max_replicas, size.gpus_per_pod) == (0, 32, 32, 8)
    spec = _ablation_with(gpus_per_node=4)
    assert size_worker_group(spec, expand(spec), 64, 8).max_replicas == 32
    with pytest.raises(DeployError, match="raise the overlay's worker cpu"):
        spec = _ablation_with(cpus_per_worker=12)
        size_worker_group(spec, expand(spec), 64, 8)
    with pytest.raises(DeployError, match="requests none"):
        size_worker_group(_ablation_with(), expand(_ablation_with()), 2, 0)
    cpu = parse_spec(
        "name: c\nworkload: {data: {url: builtin://digits}, recipe: {batch_size: 128, per_worker_batch: 32}}\n"
        "resources: {use_gpu: false, cpus_per_worker: 1, max_workers_per_cell: 4, cluster_cpus: 12}\n"
    )
    size = size_worker_group(cpu, expand(cpu), pod_cpus=3, pod_gpus=0)  # 2 workers per pod, 1 CPU for Ray
    assert (size.min_replicas, size.max_replicas, size.gpus_per_pod) == (0, 4, 0)
    with pytest.raises(DeployError, match="holds only 1"):
        small = cpu.model_copy(update={"resources": cpu.resources.model_copy(update={"cluster_cpus": 3})})
        size_worker_group(small, expand(small), pod_cpus=3, pod_gpus=0)


def test_gpu_pods_get_the_cpus_their_input_pipelines_need() -> None:
    # ResNet-50 with PGD-1 consumes images fast: the plan asks for 3 CPUs per worker (2 decoding + the loop), so
    # pods of 8 GPUs need 8 x 3 + 1 (Ray) = 25 CPUs, more than the 16 given; the spec's own 1 CPU per worker fits.
    spec = parse_spec(
        "name: g\nworkload: {data: {url: s3://b/d}, model: {depth: 50}, attack: {steps: 1},"
        " recipe: {batch_size: 256, per_worker_batch: 32}}\n"
        "resources: {use_gpu: true, cpus_per_worker: 1, cluster_gpus: 16, gpus_per_node: 8}\n"
    )
    cells = expand(spec)
    need = rendering.input_cpus_per_worker(plan_spec(spec, cells).cells)
    assert need == 3
    assert size_worker_group(spec, cells, 16, 8, need).cpus_per_pod == 8 * need + layout.RAY_CPU_HEADROOM
    # Pods that already have more keep what they have; without an input need, the spec's CPUs per worker count.
    assert size_worker_group(spec, cells, 64, 8, need).cpus_per_pod == 64
    assert size_worker_group(spec, cells, 16, 8).cpus_per_pod == 16


def test_render_raises_the_worker_pods_cpus_and_the_budget_with_them(monkeypatch: Any, capsys: Any) -> None:
    monkeypatch.setattr(rendering, "input_cpus_per_worker", lambda plans: 10)
    docs = render(ROOT / "sweeps/ablation.yaml", "gpu-cluster")
    resources = worker(docs)["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == "81"  # 8 workers x 10 + 1 for Ray
    group = _group(docs)
    assert autoscaler_budget(ray_doc(docs))["CPU"] == group["maxReplicas"] * 81
    assert check_manifests(docs) == []
    assert "of 8 GPUs and 81 CPUs each" in rendering.worker_group_summary(docs)


def test_render_refuses_a_cluster_that_cannot_hold_the_largest_cell(tmp_path: Path, monkeypatch: Any) -> None:
    # 12 GPUs in nodes of 8: a pod holds one node, so 12 one-GPU workers would need 16 GPUs.
    spec = parse_spec(
        "name: g\nworkload: {data: {url: s3://b/d}, recipe: {batch_size: 384, per_worker_batch: 32}}\n"
        "resources: {use_gpu: true, cpus_per_worker: 1, cluster_gpus: 12, gpus_per_node: 8}\n"
    )
    with pytest.raises(DeployError, match="cluster_gpus"):
        size_worker_group(spec, expand(spec), 64, 8)


# ------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_render_writes_one_applyable_file(tmp_path: Path) -> None:
    out = tmp_path / "sweep.yaml"
    image = PUSHED_IMAGE
    args = ["render", "--spec", "sweeps/ablation.yaml", "--overlay", "gpu-cluster", "--image", image]
    assert cli.main([*args, "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Rendered by: python -m orchestrator.deploy render --spec sweeps/ablation.yaml")
    assert canonical(list(yaml.safe_load_all(text))) == canonical(render("sweeps/ablation.yaml", "gpu-cluster", image))


def test_cli_render_for_a_cluster_requires_an_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep.yaml"
    assert cli.main(["render", "--spec", "sweeps/ablation.yaml", "--overlay", "gpu-cluster", "--out", str(out)]) == 2
    assert "--image is required for overlay 'gpu-cluster'" in capsys.readouterr().err and not out.exists()
    # A tag can be pushed again: a cluster overlay takes the image by digest only.
    tagged = PUSHED_IMAGE.split("@")[0]
    args = ["render", "--spec", "sweeps/ablation.yaml", "--overlay", "gpu-cluster", "--image", tagged]
    assert cli.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--image {tagged!r} is a mutable tag" in err and not out.exists()
    # The local overlay runs the image built on this machine: no registry, no --image needed.
    assert cli.main(["render", "--spec", "sweeps/tiny.yaml", "--overlay", "local", "--out", str(out)]) == 0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--spec", "sweeps/smoke.yaml", "--overlay", "nope"], "unknown overlay 'nope'; one of gpu-cluster, local"),
        (["--spec", "sweeps/nope.yaml", "--overlay", "local"], "spec file not found"),
        (["--spec", "sweeps/ablation.yaml", "--overlay", "local"], "uses GPUs"),
        (["--spec", "README.md", "--overlay", "local"], "under sweeps/"),
    ],
)
def test_cli_errors_are_one_line_with_status_2(capsys: Any, args: list[str], expected: str) -> None:
    assert cli.main(["render", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err


def test_cli_invalid_spec_is_one_line(tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    (tmp_path / "sweeps").mkdir()
    bad = tmp_path / "sweeps" / "bad.yaml"
    bad.write_text("name: Bad\nworkload: {data: {url: x}}\ngrid: {norm: [batchnorm]}\n")
    monkeypatch.setattr(rendering, "PROJECT_ROOT", tmp_path)
    assert cli.main(["render", "--spec", str(bad), "--overlay", "local"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "name" in err and "batchnorm" in err


def test_cli_check_passes_on_the_committed_tree(capsys: Any) -> None:
    assert cli.main(["check"]) == 0
    assert capsys.readouterr().out == ""


def test_cli_cell_larger_than_the_cluster_is_one_line(tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    (tmp_path / "sweeps").mkdir()
    spec = tmp_path / "sweeps" / "big.yaml"
    spec.write_text(
        "name: big\nworkload: {data: {url: s3://b/d}, recipe: {batch_size: 8192, per_worker_batch: 32}}\n"
        "grid: {seed: [0, 1]}\nresources: {use_gpu: true, max_workers_per_cell: 256, cluster_gpus: 128}\n"
    )
    monkeypatch.setattr(rendering, "PROJECT_ROOT", tmp_path)
    assert cli.main(["render", "--spec", str(spec), "--overlay", "gpu-cluster", "--image", PUSHED_IMAGE]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "256 GPUs" in err and "cluster_gpus" in err


def test_rayjob_names_fit_kuberay() -> None:
    assert rendering.rayjob_name("tiny_v2") == "sweep-tiny-v2"
    long = rendering.rayjob_name("a" * 40 + "-" + "b" * 22)
    assert len(long) <= layout.MAX_RAYJOB_NAME and layout.DNS_1035.fullmatch(long)


# ------------------------------------------------------------------------------------------------------------
# The schemas travel with the project; a missing one is an error


def test_schemas_ship_with_the_project() -> None:
    assert layout.SCHEMA_DIR == ROOT / "deploy" / "schemas" / "kuberay"
    readme = (layout.SCHEMA_DIR / "README.md").read_text()
    assert "v1.7.0" in readme and "59d663aeec13760646da3db9c1cf8cfe883e30b7" in readme
    assert set(validation.load_schemas()) == {"RayJob", "RayCluster"}


def test_a_missing_schema_is_an_error(tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    (tmp_path / "rayjob-ray.io-v1.json").write_text((layout.SCHEMA_DIR / "rayjob-ray.io-v1.json").read_text())
    with pytest.raises(DeployError, match="raycluster-ray.io-v1.json is missing"):
        validation.load_schemas(tmp_path)
    monkeypatch.setattr(validation, "SCHEMA_DIR", tmp_path)
    assert cli.main(["check"]) == 1
    assert "raycluster-ray.io-v1.json is missing" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------------
# The local overlay fits a 4-CPU minikube or kind node

# What a fresh minikube (kubeadm defaults) and the KubeRay operator request before anything of ours: kube-apiserver
# 250m, kube-controller-manager 200m, etcd 100m + 100Mi, kube-scheduler 100m, coredns 100m + 70Mi; the
# kuberay-operator Helm chart 100m + 512Mi.
LOCAL_NODE = {"cpu": 4.0, "memory": 12 * 2**30}  # minikube start --cpus 4 --memory 12g (docs/kubernetes.md)
ALREADY_REQUESTED = {"cpu": 0.25 + 0.2 + 0.1 + 0.1 + 0.1 + 0.1, "memory": (100 + 70 + 512) * 2**20}


def test_local_overlay_fits_a_four_cpu_node(built: dict[str, list[Doc]]) -> None:
    ours = checks.requested_resources(built["overlays/local"])
    # head 1 and autoscaler 250m (Guaranteed: requests = limits), one worker pod 1, MinIO 100m, the bucket Job 100m
    assert ours["cpu"] == pytest.approx(2.45)
    for resource in ("cpu", "memory"):
        assert ours[resource] + ALREADY_REQUESTED[resource] <= LOCAL_NODE[resource], (resource, ours)
    # Ray still gets the 2 CPUs of the worker's limit: two smoke cells of 0.9 CPU run at once.
    assert rules.autoscaler_budget(ray_doc(built["overlays/local"]))["CPU"] == 2


def test_local_overlay_check_catches_pods_that_do_not_fit(built: dict[str, list[Doc]]) -> None:
    docs = fresh(built, "overlays/local")
    # The sizes before: head 1, worker 2, MinIO 250m, autoscaler 500m (and a submitter pod of 500m).
    head(docs)["resources"]["requests"]["cpu"] = "1"
    worker(docs)["resources"]["requests"]["cpu"] = "2"
    cluster(docs)["autoscalerOptions"]["resources"]["requests"]["cpu"] = "500m"
    ours = checks.requested_resources(docs)
    assert ours["cpu"] + ALREADY_REQUESTED["cpu"] > LOCAL_NODE["cpu"]


def test_requested_resources_counts_every_pod() -> None:
    docs = build(layout.OVERLAYS_DIR / "gpu-cluster")
    ours = checks.requested_resources(docs)
    assert ours["cpu"] == pytest.approx(8 + 0.5 + 16 * 64)  # head, autoscaler, 16 GPU pods
    assert rules.parse_memory("512Mi") == 512 * 2**20 and rules.parse_memory("1G") == 1e9
    with pytest.raises(DeployError):
        rules.parse_memory("lots")


# ------------------------------------------------------------------------------------------------------------
# The Grafana dashboard charts what the product exports


def test_grafana_dashboard_parses_and_charts_exported_metrics() -> None:
    dashboard = json.loads(layout.GRAFANA_DASHBOARD.read_text())
    assert check_grafana_dashboard() == []
    titles = [panel["title"] for panel in dashboard["panels"] if panel["type"] != "row"]
    assert {
        "Cells by state",
        "Epoch per cell",
        "Images/s per cell",
        "Robust accuracy per cell",
        "Storage unreachable",
    } <= set(titles)
    exported = monitoring.exported_metrics()
    assert exported["sweep"] == {
        "ray_sweep_cells",
        "ray_sweep_cell_epoch",
        "ray_sweep_cell_images_per_second",
        "ray_sweep_cell_robust_accuracy",
        "ray_sweep_storage_unreachable_seconds",  # workloads.fs, set while a storage call retries
    }
    used = {name for _, expr in monitoring.dashboard_queries(dashboard) for name in monitoring.promql_metrics(expr)}
    assert used & exported["ray"], "Ray's own metrics are charted next to the sweep's"


def test_promql_metric_names() -> None:
    assert monitoring.promql_metrics('sum by (state) (ray_sweep_cells{sweep=~"$sweep"})') == {"ray_sweep_cells"}
    assert monitoring.promql_metrics(
        'sum(ray_resources{Name="GPU",State="USED"}) / on() (sum(ray_node_gpus_available[5m]) or vector(0))'
    ) == {"ray_resources", "ray_node_gpus_available"}
    assert monitoring.promql_metrics("max_over_time(up[1h]) * 100") == {"up"}


def _broken_dashboard(tmp_path: Path, change: Callable[[Doc], Any]) -> Path:
    dashboard = json.loads(layout.GRAFANA_DASHBOARD.read_text())
    change(dashboard)
    path = tmp_path / "dashboard.json"
    path.write_text(json.dumps(dashboard))
    return path


def _panel(dashboard: Doc, title: str) -> Doc:
    found: Doc = next(p for p in dashboard["panels"] if p["title"] == title)
    return found


DASHBOARD_BREAKS: dict[str, tuple[Callable[[Doc], Any], str]] = {
    "unknown sweep metric": (
        lambda d: _panel(d, "Epoch per cell")["targets"][0].update(expr="max by (cell_id) (ray_sweep_cell_epochs)"),
        "queries ray_sweep_cell_epochs, which nothing in a sweep cluster exports",
    ),
    "metric without the ray_ prefix": (
        lambda d: _panel(d, "Cells by state")["targets"][0].update(expr="sum by (state) (sweep_cells)"),
        "queries sweep_cells",
    ),
    "unknown Ray metric": (
        lambda d: _panel(d, "GPU utilization by node")["targets"][0].update(expr="avg(ray_gpu_util)"),
        "queries ray_gpu_util",
    ),
    "variable on a made-up metric": (
        lambda d: d["templating"]["list"][2]["query"].update(query="label_values(sweep_info, sweep)"),
        "variable 'sweep' queries sweep_info",
    ),
    "gauge not charted": (
        lambda d: d.update(panels=[p for p in d["panels"] if p["title"] != "Robust accuracy per cell"]),
        "charts no ray_sweep_cell_robust_accuracy",
    ),
    "panel without a query": (
        lambda d: _panel(d, "Sweep throughput").update(targets=[]),
        "panel 'Sweep throughput' has no query",
    ),
    "no panels": (lambda d: d.update(panels=[]), "no panels"),
}


@pytest.mark.parametrize("case", list(DASHBOARD_BREAKS))
def test_grafana_dashboard_check_catches(tmp_path: Path, case: str) -> None:
    change, expected = DASHBOARD_BREAKS[case]
    problems = check_grafana_dashboard(_broken_dashboard(tmp_path, change))
    assert any(expected in problem for problem in problems), problems


def test_grafana_dashboard_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "dashboard.json"
    path.write_text("{panels: [")
    assert "not a readable JSON file" in check_grafana_dashboard(path)[0]


# ------------------------------------------------------------------------------------------------------------
# An invalid spec is not retried: the driver stops its own Ray job


class _FakeJobClient:
    calls: list[tuple[str, str]] = []
    fail = False

    def __init__(self, address: str) -> None:
        self.address = address

    def stop_job(self, job_id: str) -> bool:
        if self.fail:
            raise ConnectionError("refused")
        self.calls.append((self.address, job_id))
        return True


@pytest.fixture
def job_client(monkeypatch: Any) -> type[_FakeJobClient]:
    import ray.job_submission

    _FakeJobClient.calls, _FakeJobClient.fail = [], False
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _FakeJobClient)
    monkeypatch.setattr(ray_job.time, "sleep", lambda seconds: None)
    return _FakeJobClient


JOB_CONFIG = json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": "sweep-ablation-x7k2p"}})


def test_driver_stops_its_ray_job_when_the_rayjob_asks(job_client: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv(ray_job.STOP_ON_INVALID_ENV, "1")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", JOB_CONFIG)
    assert ray_job.stop_this_ray_job() is True
    assert job_client.calls == [(ray_job.HEAD_DASHBOARD_URL, "sweep-ablation-x7k2p")]


@pytest.mark.parametrize("situation", ["not asked", "not a Ray job", "job API unreachable"])
def test_driver_leaves_its_ray_job_alone(job_client: Any, monkeypatch: Any, situation: str) -> None:
    monkeypatch.setenv(ray_job.STOP_ON_INVALID_ENV, "1")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", JOB_CONFIG)
    if situation == "not asked":
        monkeypatch.delenv(ray_job.STOP_ON_INVALID_ENV)
    elif situation == "not a Ray job":
        monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    else:
        job_client.fail = True
    assert ray_job.stop_this_ray_job() is False
    assert job_client.calls == []


def test_invalid_spec_stops_the_ray_job_and_exits_2(tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    from orchestrator import sweep

    stopped: list[bool] = []
    monkeypatch.setattr(ray_job, "stop_this_ray_job", lambda *why: stopped.append(True) or True)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nworkload: {data: {url: x}}\ngrid: {norm: [batchnorm]}\n")
    assert sweep.main([str(bad)]) == 2
    assert stopped == [True]
    assert sweep.main([str(bad), "--plan"]) == 2  # planning on a laptop stops no job
    assert stopped == [True]
    assert "batchnorm" in capsys.readouterr().err


def test_the_rayjob_runs_its_entrypoint_with_the_variables_the_driver_reads() -> None:
    """The head's environment is the driver's: it expands ${SWEEP_STORAGE} (HTTPMode runs the entrypoint with
    /bin/sh on the head) and carries the opt-in that `stop_this_ray_job` reads."""
    for overlay in ("gpu-cluster", "local"):
        docs = build(layout.OVERLAYS_DIR / overlay)
        job = ray_doc(docs)
        assert job["spec"]["submissionMode"] == "HTTPMode" and "submitterPodTemplate" not in job["spec"]
        assert head_env(docs)[ray_job.STOP_ON_INVALID_ENV]["value"] == "1"
        assert {"configMapRef": {"name": layout.SWEEP_CONFIG}} in head(docs)["envFrom"]
        assert layout.STORAGE_VAR in next(d for d in docs if d["kind"] == "ConfigMap")["data"]
