"""Every YAML file in the repository parses (sweeps, manifests, CI), and every sweep is a valid, plannable spec."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from orchestrator.grid import expand
from orchestrator.plan import plan_spec
from orchestrator.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def tracked(*patterns: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    return sorted(out.stdout.split())


YAML_FILES = tracked("*.yaml", "*.yml")
SWEEPS = tracked("sweeps/*.yaml")


def test_the_repository_has_the_yaml_it_should() -> None:
    assert {"sweeps/smoke.yaml", "sweeps/tiny.yaml", "sweeps/ablation.yaml"} <= set(SWEEPS)
    assert any(name.startswith("deploy/") for name in YAML_FILES)


@pytest.mark.parametrize("name", YAML_FILES)
def test_yaml_parses(name: str) -> None:
    documents = list(yaml.safe_load_all((ROOT / name).read_text()))
    assert any(doc is not None for doc in documents), f"{name} is empty"


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_is_a_valid_plannable_spec(name: str) -> None:
    spec = load_spec(ROOT / name)
    cells = expand(spec)
    plan = plan_spec(spec, cells)
    assert cells and len(plan.cells) == len(cells)
