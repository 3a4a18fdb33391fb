"""`python -m orchestrator.deploy render|check`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import orchestrator.deploy as deploy
from orchestrator.deploy.checks import check_committed_files
from orchestrator.deploy.layout import (
    DEPLOY_DIR,
    LOCAL_OVERLAYS,
    MONITORING_DIR,
    OVERLAYS_DIR,
    RAYCLUSTER_DIR,
)
from orchestrator.deploy.manifests import build, overlay_names
from orchestrator.deploy.monitoring import check_grafana_dashboard
from orchestrator.deploy.rendering import dump_documents, image_problem, render, worker_group_summary
from orchestrator.deploy.rules import (
    DeployError,
    Doc,
)
from orchestrator.deploy.validation import check_dockerfile, check_manifests, load_schemas, schema_problems
from orchestrator.spec import SpecError

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
    parser = _Parser(prog="python -m orchestrator.deploy", description=(deploy.__doc__ or "").split("\n")[0])
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
