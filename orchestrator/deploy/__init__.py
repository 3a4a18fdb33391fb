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
- `rules`: the head's Guaranteed QoS, priority, disruption guard and object store, Pod Security
  "restricted" everywhere, no service-account token but the head's, and images pinned by digest on a cluster
  target (every target but LOCAL_OVERLAYS; `render --image` for a cluster overlay must name a digest too).

The package, one module a job: `layout` (the folders, names and ports of a deployment), `manifests` (reading YAML,
the kustomize subset, overlays), `rendering` (`deploy render`), `rules` (what the rules share, and the head,
Pod Security and digest rules), `checks` (the other rules), `validation` (structure, schemas, the Dockerfile, the
whole rule set), `monitoring` (the Grafana dashboard), `cli` (the command line). The driver's own Ray job is
`orchestrator.ray_job`'s, not this package's: the sweep never imports the deployment.
"""
