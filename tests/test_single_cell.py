"""`python -m workloads.train CELL_CONFIG.json --out DIR`: one cell, one process, no Ray, from what a sweep stored."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.grid import expand
from orchestrator.spec import load_spec

REPO = Path(__file__).resolve().parents[1]


def _smoke_cell_config(tmp_path: Path) -> Path:
    """A smoke cell's config.json exactly as the sweep driver writes it (orchestrator.sweep), one epoch."""
    cell = expand(load_spec(REPO / "sweeps" / "smoke.yaml", ["workload.recipe.epochs=1", "workload.eval.subset=50"]))[0]
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps({"cell_id": cell.cell_id, "axes": cell.axes, "train": cell.config.model_dump(mode="json")})
    )
    return path


def _train(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workloads.train", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


@pytest.mark.timeout(300)
def test_a_smoke_cells_config_json_trains_as_stored(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _train(str(_smoke_cell_config(tmp_path)), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preparing builtin://digits" in proc.stdout  # converted into the output folder, as a sweep does
    assert (out / "datasets" / "digits" / "meta.json").is_file()
    epochs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [e["epoch"] for e in epochs] == [1]
    assert 0.0 <= epochs[-1]["eval/main/acc_clean"] <= 1.0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file or directory"),
        ("{not json", "not JSON"),
        ('{"train": {"data": {"url": "builtin://digitz"}}}', "unknown built-in dataset 'builtin://digitz'"),
        ('{"train": {"data": {"url": "x"}, "recipe": {"epochs": 0}}}', "recipe.epochs"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "cell.json"
    if content is not None:
        path.write_text(content)
    proc = _train(str(path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
