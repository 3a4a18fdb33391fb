"""The command line, as a user meets it: `python -m orchestrator.sweep SPEC [--storage URL] [--plan [--json]]`.

Every test runs the real CLI in a subprocess (no Ray is started anywhere in this file). Contracts from docs/design.md
sections 3 and 4: an invalid spec or argument exits with status 2 and one message that names the field and what
is allowed, never a traceback, and never echoes a secret; `--plan` validates and plans without Ray.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.grid import expand
from orchestrator.spec import load_spec
from tests.conftest import tiny_spec

REPO = Path(__file__).resolve().parents[1]
EXIT_OK, EXIT_INVALID = 0, 2
LOCAL_RAY_BANNER = "Started a local Ray instance"

# A small, valid CPU spec; each bad-input test changes one thing.
BASE = tiny_spec(
    "cli",
    {"clean_ratio": [0.0, 1.0]},
    workload={"eval": {"pgd_steps": [2], "subset": 64, "batch_size": 64}},
    resources={"cluster_cpus": 2},
)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float  # user + system time of the child: unlike wall time, not inflated by a busy machine

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def sweep(*args: str | Path, timeout: float = 120) -> Run:
    """Run the CLI from the repository root, as a user would."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.sweep", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Run(proc.returncode, proc.stdout, proc.stderr, wall, cpu)


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` deep-merged in (mappings merge, anything else replaces)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and value and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def write_spec(tmp_path: Path, data: dict[str, Any] | str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def assert_invalid(run: Run, *needles: str, secret: str | None = None) -> None:
    """Exit status 2, a user-facing message containing every needle, no traceback, the secret nowhere."""
    assert run.returncode == EXIT_INVALID, run.output
    assert "Traceback" not in run.output, run.output
    assert run.stderr.strip(), "the error must be explained on stderr"
    for needle in needles:
        assert needle in run.stderr, f"{needle!r} not in:\n{run.stderr}"
    if secret is not None:
        assert secret not in run.output, "a credential was echoed"


def test_the_base_spec_is_valid(tmp_path: Path) -> None:
    """Guards the bad-input tests below: each must fail for its own change, not for the base."""
    run = sweep(write_spec(tmp_path, BASE), "--plan")
    assert run.returncode == EXIT_OK, run.output


# --- bad specs --------------------------------------------------------------------------------------------


def test_missing_spec_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert_invalid(sweep(missing, "--plan"), str(missing), "spec file not found")
    assert_invalid(sweep(missing), str(missing), "spec file not found")  # without --plan too: nothing starts


def test_spec_that_is_a_directory(tmp_path: Path) -> None:
    assert_invalid(sweep(tmp_path, "--plan"), str(tmp_path), "is a directory")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        # An unclosed flow mapping: the parser notices on the next line.
        ("name: t\nworkload:\n  data: {url: builtin://digits}\n  recipe: {epochs: 2\ngrid: {seed: [0]}\n", ":5:"),
        # A key indented one space short.
        ("name: t\nworkload:\n  data: {url: builtin://digits}\n  recipe:\n    epochs: 2\n   batch_size: 64\n", ":6:"),
    ],
    ids=["unclosed-mapping", "bad-indent"],
)
def test_yaml_syntax_error_names_the_line(tmp_path: Path, text: str, where: str) -> None:
    path = write_spec(tmp_path, text)
    assert_invalid(sweep(path, "--plan"), f"{path}{where}", "YAML syntax error")


def test_yaml_syntax_error_does_not_quote_the_line(tmp_path: Path) -> None:
    # PyYAML's default message quotes the offending line, which may hold a secret.
    secret = "hunter2-secret-value"
    path = write_spec(tmp_path, f"name: t\nworkload:\n  data: {{url: builtin://digits}}\n  note: {secret}: x\n")
    assert_invalid(sweep(path, "--plan"), f"{path}:4:", "YAML syntax error", secret=secret)


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ({"foo": 1}, ["foo: unknown key", "allowed: name, storage, workload, grid"]),
        (
            {"workload": {"recipe": {"epoch": 3}}},
            ["workload.recipe.epoch: unknown key", "allowed: epochs,", "did you mean epochs?"],
        ),
        ({"grid": {"seeds": [0, 1]}}, ["grid.seeds: unknown key", "seed", "did you mean seed?"]),
    ],
    ids=["top-level", "nested-typo", "grid-axis-typo"],
)
def test_unknown_key(tmp_path: Path, override: dict[str, Any], needles: list[str]) -> None:
    assert_invalid(sweep(write_spec(tmp_path, merged(BASE, override)), "--plan"), *needles)


@pytest.mark.parametrize("plan", [True, False], ids=["plan", "run"])
def test_unknown_builtin_dataset(tmp_path: Path, plan: bool) -> None:
    """A typo in builtin://NAME is refused at validation, in one line naming the registered datasets, before
    Ray starts (without --plan too)."""
    path = write_spec(tmp_path, merged(BASE, {"workload": {"data": {"url": "builtin://typo"}}}))
    run = sweep(path, *(["--plan"] if plan else []))
    assert_invalid(run, "workload.data.url: unknown built-in dataset 'builtin://typo' (known: builtin://digits)")
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert LOCAL_RAY_BANNER not in run.output


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ({"checkpoint_every": "three"}, ["checkpoint_every: 'three' is not an integer"]),
        ({"resources": {"use_gpu": "maybe"}}, ["resources.use_gpu: 'maybe' is not a boolean (true or false)"]),
        ({"workload": {"recipe": {"base_lr": "fast"}}}, ["workload.recipe.base_lr: 'fast' is not a number"]),
        ({"workload": "digits"}, ["workload: 'digits' is not a mapping; expected a mapping with keys data, model"]),
        ({"grid": {"seed": ["one"]}}, ["grid.seed[0]: 'one' is not an integer"]),
    ],
    ids=["int", "bool", "float", "mapping", "grid-int"],
)
def test_wrong_type(tmp_path: Path, override: dict[str, Any], needles: list[str]) -> None:
    assert_invalid(sweep(write_spec(tmp_path, merged(BASE, override)), "--plan"), *needles)


@pytest.mark.parametrize(
    ("grid", "needles"),
    [
        ({}, ["grid: empty", "list values for at least one axis"]),
        ([], ["grid: empty"]),
        ({"norm": []}, ["grid.norm: empty", "give at least one value"]),
        ([{"seed": [0]}, {}], ["grid[1]: empty mapping", "clean_ratio, norm, pgd_steps, depth"]),
    ],
    ids=["empty-mapping", "empty-list", "empty-axis", "empty-entry"],
)
def test_empty_grid(tmp_path: Path, grid: Any, needles: list[str]) -> None:
    assert_invalid(sweep(write_spec(tmp_path, {**BASE, "grid": grid}), "--plan"), *needles)


def test_unknown_norm(tmp_path: Path) -> None:
    run = sweep(write_spec(tmp_path, {**BASE, "grid": {"norm": ["bn", "batchnorm"]}}), "--plan")
    assert_invalid(run, "grid.norm[1]: 'batchnorm' is not one of bn, mbn, gn, bn*, mbn*")


def test_unknown_depth(tmp_path: Path) -> None:
    run = sweep(write_spec(tmp_path, {**BASE, "grid": {"depth": [18, 19]}}), "--plan")
    assert_invalid(run, "grid.depth[1]: 19 is not one of 18, 34, 50, 101, 152, 200, 338, 638")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"grid": {"clean_ratio": [0.5, 1.5]}}, "grid.clean_ratio[1]: 1.5 is out of range [0, 1]"),
        (
            {"workload": {"training": {"clean_ratio": -0.5}}},
            "workload.training.clean_ratio: -0.5 is out of range [0, 1]",
        ),
    ],
    ids=["grid", "workload"],
)
def test_clean_ratio_out_of_range(tmp_path: Path, override: dict[str, Any], needle: str) -> None:
    assert_invalid(sweep(write_spec(tmp_path, merged(BASE, override)), "--plan"), needle)


def test_batch_size_not_a_multiple_of_per_worker_batch(tmp_path: Path) -> None:
    run = sweep(write_spec(tmp_path, {**BASE, "grid": {"batch_size": [64, 100]}}), "--plan")
    assert_invalid(run, "grid.batch_size[1]: 100 is not a multiple of workload.recipe.per_worker_batch 32")


def test_batch_size_not_divisible_by_workers_times_per_worker_batch(tmp_path: Path) -> None:
    # 96 = 3 x 32, but at most 2 workers: 2 x 32 does not divide 96.
    spec = merged(BASE, {"workload": {"recipe": {"batch_size": 96}}, "resources": {"max_workers_per_cell": 2}})
    run = sweep(write_spec(tmp_path, {**spec, "grid": {"seed": [0]}}), "--plan")
    assert_invalid(
        run,
        "workload.recipe.batch_size: 96 is not divisible by workers x per_worker_batch = 2 x 32 = 64",
        "resources.max_workers_per_cell",
    )


# --- credentials: rejected, never echoed (docs/design.md section 4) -------------------------------------------

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYzzSECRET"


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        (f"s3://user:{SECRET}@bucket/prefix", "a user name or password in the URL"),
        (f"s3://bucket/prefix?X-Amz-Signature={SECRET}", "X-Amz-Signature"),
        (f"https://bucket.example.com/p?X-Amz-Credential=AK%2F1&X-Amz-Signature={SECRET}", "X-Amz-"),
    ],
    ids=["user-password", "signed-query", "signed-https"],
)
def test_storage_url_with_credentials(tmp_path: Path, url: str, needle: str) -> None:
    run = sweep(write_spec(tmp_path, {**BASE, "storage": url}), "--plan")
    assert_invalid(run, "storage:", needle, "from the environment", secret=SECRET)


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        (f"s3://user:{SECRET}@bucket/prefix", "a user name or password in the URL"),
        (f"s3://bucket/prefix?X-Amz-Signature={SECRET}", "X-Amz-Signature"),
    ],
    ids=["user-password", "signed-query"],
)
@pytest.mark.parametrize("plan", [True, False], ids=["plan", "run"])
def test_storage_flag_with_credentials(tmp_path: Path, url: str, needle: str, plan: bool) -> None:
    # Without --plan too: the override is checked before anything starts.
    run = sweep(write_spec(tmp_path, BASE), "--storage", url, *(["--plan"] if plan else []))
    assert_invalid(run, "--storage:", needle, "from the environment", secret=SECRET)


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ({"storage_options": {"aws_secret_access_key": SECRET}}, "storage_options.aws_secret_access_key"),
        (
            {"workload": {"data": {"storage_options": {"aws_secret_access_key": SECRET}}}},
            "workload.data.storage_options.aws_secret_access_key",
        ),
        ({"resources": {"AWS_SECRET_ACCESS_KEY": SECRET}}, "resources.AWS_SECRET_ACCESS_KEY"),
        ({"storage_options": {"key": "AKIDEXAMPLE", "secret": SECRET}}, "storage_options.secret"),
        ({"grid": [{"seed": [0], "session_token": SECRET}]}, "grid[0].session_token"),
    ],
    ids=["top-level", "data-options", "resources", "fsspec-key-secret", "grid-entry"],
)
def test_credential_keys_anywhere(tmp_path: Path, override: dict[str, Any], path: str) -> None:
    run = sweep(write_spec(tmp_path, merged(BASE, override)), "--plan")
    assert_invalid(run, f"{path}: looks like a credential key", "from the environment", secret=SECRET)


def test_credential_values_anywhere(tmp_path: Path) -> None:
    key_id = "AKIAIOSFODNN7EXAMPLE"  # AWS documentation example key
    spec = merged(BASE, {"workload": {"data": {"url": f"s3://bucket/{key_id}/digits"}}})
    run = sweep(write_spec(tmp_path, spec), "--plan")
    assert_invalid(run, "workload.data.url: looks like a credential (an AWS access key id)", secret=key_id)


# --- feasibility ------------------------------------------------------------------------------------------


def test_cell_needing_more_gpus_than_the_cluster(tmp_path: Path) -> None:
    # The paper's cell: batch 4096 = 128 workers x 32, one GPU each, on a 64-GPU cluster.
    spec = {"name": "gpu", "workload": {"data": {"url": "s3://bucket/imagenet"}}, "resources": {"cluster_gpus": 64}}
    run = sweep(write_spec(tmp_path, spec), "--plan")
    assert_invalid(run, "needs 128 GPUs (128 workers x 1 GPU)", "the cluster has 64 (resources.cluster_gpus)")
    assert_invalid(sweep(write_spec(tmp_path, spec)), "resources.cluster_gpus")  # checked before a run, too


def test_worker_needing_more_gpus_than_a_node(tmp_path: Path) -> None:
    spec = {
        "name": "gpu",
        "workload": {"data": {"url": "s3://bucket/imagenet"}},
        "resources": {"cluster_gpus": 64, "gpus_per_node": 8, "gpus_per_worker": 16, "max_workers_per_cell": 2},
    }
    run = sweep(write_spec(tmp_path, spec), "--plan")
    assert_invalid(run, "needs 16 GPUs per worker but resources.gpus_per_node is 8")


# --- bad command lines ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["SPEC", "--bogus"], "unrecognized arguments: --bogus"),
        (["SPEC", "--json"], "--json only goes with --plan"),
        ([], "the following arguments are required: spec"),
        (["SPEC", "--plan", "--storage"], "argument --storage: expected one argument"),
        (["SPEC", "--plan", "--storage", ""], "--storage: '' is not a valid storage URL"),
        (["SPEC", "--plan", "--storage", "ftp://host/x"], "--storage: scheme 'ftp' is not one of file://, s3://"),
    ],
    ids=["unknown-flag", "json-without-plan", "no-spec", "storage-without-value", "empty-storage", "bad-scheme"],
)
def test_bad_usage(tmp_path: Path, args: list[str], needle: str) -> None:
    spec = str(write_spec(tmp_path, BASE))
    assert_invalid(sweep(*(spec if a == "SPEC" else a for a in args)), needle)


# --- --plan -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["smoke", "tiny"])
def test_plan_table_lists_every_cell(name: str) -> None:
    path = REPO / "sweeps" / f"{name}.yaml"
    ids = [cell.cell_id for cell in expand(load_spec(path))]
    run = sweep(f"sweeps/{name}.yaml", "--plan")
    assert run.returncode == EXIT_OK, run.output
    assert "Traceback" not in run.output and LOCAL_RAY_BANNER not in run.output
    lines = run.stdout.splitlines()
    assert lines[0].split()[:3] == ["cell", "clean_ratio", "norm"]
    rows = [line for line in lines if line.split() and line.split()[0] in ids]
    assert [row.split()[0] for row in rows] == ids  # one row per cell, in expansion order
    assert f"cells: {len(ids)}" in lines
    assert any(line.startswith("total: ") for line in lines)
    assert any(line.startswith("makespan on ") for line in lines)


@pytest.mark.parametrize("name", ["smoke", "tiny"])
def test_plan_json(name: str) -> None:
    ids = [cell.cell_id for cell in expand(load_spec(REPO / "sweeps" / f"{name}.yaml"))]
    run = sweep(f"sweeps/{name}.yaml", "--plan", "--json")
    assert run.returncode == EXIT_OK, run.output
    plan = json.loads(run.stdout)  # stdout is the JSON document and nothing else
    assert plan["num_cells"] == len(plan["cells"]) == len(ids)
    assert [c["cell_id"] for c in plan["cells"]] == ids
    for cell in plan["cells"]:
        assert set(cell["axes"]) == {"clean_ratio", "norm", "pgd_steps", "depth", "batch_size", "strategy", "seed"}
        assert cell["num_workers"] >= 1 and cell["device_hours"] > 0 and cell["gpus"] == 0  # CPU specs
        assert cell["end_hours"] == pytest.approx(cell["start_hours"] + cell["wall_hours"])
    assert plan["device"] == "CPU" and plan["unit"] == "worker-hours"
    assert plan["total_device_hours"] == pytest.approx(sum(c["device_hours"] for c in plan["cells"]))
    assert plan["makespan_hours"] >= plan["lower_bound_hours"] > 0
    start = plan["planning"]["sweep_overhead_s"] / 3600  # the sweep's own start and end, once
    assert plan["makespan_hours"] == pytest.approx(max(c["end_hours"] for c in plan["cells"]) + start)
    assert plan["input_cpus_per_worker"] is None  # sized for GPU workers only, as the table shows "-"


def test_plan_neither_starts_ray_nor_imports_it() -> None:
    code = (
        "import sys\n"
        "from orchestrator.sweep import main\n"
        "rc = main(['sweeps/tiny.yaml', '--plan'])\n"
        "heavy = sorted(m for m in ('ray', 'torch') if m in sys.modules)\n"
        "print('IMPORTED', heavy, 'RC', rc, file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED [] RC 0" in proc.stderr
    run = sweep("sweeps/smoke.yaml", "--plan")
    assert run.returncode == EXIT_OK and LOCAL_RAY_BANNER not in run.output
    # CPU time, not wall time: a busy shared machine stretches the latter. Starting Ray alone costs more.
    print(f"--plan smoke: {run.wall_s:.2f} s wall, {run.cpu_s:.2f} s CPU")
    assert run.cpu_s < 10, f"--plan took {run.cpu_s:.1f} s of CPU"


def test_plan_writes_nothing_to_storage(tmp_path: Path) -> None:
    """--storage is validated under --plan but nothing is created there, and the plan does not depend on it."""
    storage = tmp_path / "storage"
    with_flag = sweep("sweeps/tiny.yaml", "--plan", "--json", "--storage", storage)
    without = sweep("sweeps/tiny.yaml", "--plan", "--json")
    assert with_flag.returncode == without.returncode == EXIT_OK, with_flag.output + without.output
    assert json.loads(with_flag.stdout) == json.loads(without.stdout)
    assert not storage.exists()
    assert str(storage) not in with_flag.output
    table = sweep("sweeps/tiny.yaml", "--plan", "--storage", f"file://{storage}")
    assert table.returncode == EXIT_OK, table.output
    assert not storage.exists()


def test_plan_of_10000_cells(tmp_path: Path) -> None:
    # A product of axes: 2,500 seeds x 4 norms = 10,000 distinct cells.
    seeds, norms = list(range(2500)), ["bn", "mbn", "gn", "bn*"]
    path = write_spec(tmp_path, {**BASE, "name": "big", "grid": {"seed": seeds, "norm": norms}, "max_cells": 10_000})

    as_json = sweep(path, "--plan", "--json")
    assert as_json.returncode == EXIT_OK, as_json.stderr
    plan = json.loads(as_json.stdout)
    ids = [c["cell_id"] for c in plan["cells"]]
    assert plan["num_cells"] == len(ids) == len(set(ids)) == 10_000
    assert {(c["axes"]["seed"], c["axes"]["norm"]) for c in plan["cells"]} == {(s, n) for s in seeds for n in norms}
    assert plan["total_device_hours"] == pytest.approx(sum(c["device_hours"] for c in plan["cells"]))

    table = sweep(path, "--plan")
    assert table.returncode == EXIT_OK, table.stderr
    rows = {line.split()[0] for line in table.stdout.splitlines() if line.split()}
    assert rows.issuperset(ids)
    assert "cells: 10000" in table.stdout.splitlines()
    assert LOCAL_RAY_BANNER not in table.output + as_json.output
    print(
        f"--plan of 10,000 cells: JSON {as_json.wall_s:.2f} s wall / {as_json.cpu_s:.2f} s CPU, "
        f"table {table.wall_s:.2f} s wall / {table.cpu_s:.2f} s CPU"
    )


def test_spec_over_max_cells(tmp_path: Path) -> None:
    spec = {**BASE, "grid": {"seed": list(range(100)), "norm": ["bn", "gn"]}, "max_cells": 100}
    run = sweep(write_spec(tmp_path, spec), "--plan")
    assert_invalid(run, "grid: expands to 200 cells", "max_cells 100")
