"""What a sweep's deployment is made of: the folders under deploy/, names, ports and API versions."""

from __future__ import annotations

import re
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
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
