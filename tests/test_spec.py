"""Spec validation: every bad input is a SpecError whose one-line message names path, value and choices."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from orchestrator.credentials import looks_like_credential_name
from orchestrator.spec import Spec, SpecError, load_spec, parse_spec
from orchestrator.spec_yaml import MAX_SPEC_BYTES

BASE: dict[str, Any] = {
    "name": "t",
    "storage": "./runs",
    "workload": {
        "data": {"url": "./data/digits"},
        "model": {"depth": 18, "norm": "bn", "width": 0.125, "stem": "small"},
        "attack": {"steps": 3},
        "recipe": {"epochs": 3, "batch_size": 64, "per_worker_batch": 32},
        "eval": {"pgd_steps": [10, 20], "subset": 200, "batch_size": 100},
    },
    "grid": {"norm": ["bn", "gn"], "seed": [0, 1]},
    "resources": {"use_gpu": False, "cpus_per_worker": 0.5, "max_workers_per_cell": 2, "cluster_cpus": 4},
    "planning": {"train_images": 1437, "image_size": 32, "relative_speed": 0.01},
}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is _DROP:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and value:
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_DROP = object()


def spec_text(**override: Any) -> str:
    """BASE with `override` deep-merged in (`grid` replaced; a value of _DROP removes the key), as YAML."""
    data = _merge(BASE, {k: v for k, v in override.items() if k != "grid"})
    if "grid" in override:
        data.pop("grid")
        if override["grid"] is not _DROP:
            data["grid"] = copy.deepcopy(override["grid"])
    return yaml.safe_dump(data, sort_keys=False)


def make_spec(**override: Any) -> Spec:
    return parse_spec(spec_text(**override), "test.yaml")


def error_of(text: str) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(text, "test.yaml")
    return info.value.message


def test_base_spec_is_valid() -> None:
    spec = make_spec()
    assert spec.name == "t"
    assert spec.grid is not None and spec.grid[0].norm == ["bn", "gn"]
    assert spec.workload.recipe.batch_size == 64


# --- field errors: path, bad value, what is allowed -------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            {"grid": {"norm": ["bn", "gn", "batchnorm"]}},
            "grid.norm[2]: 'batchnorm' is not one of bn, mbn, gn, bn*, mbn*",
        ),
        (
            {"workload": {"recipe": {"batch_sze": 64}}},
            "workload.recipe.batch_sze: unknown key (allowed: epochs, batch_size, per_worker_batch",
        ),
        (
            {"workload": {"training": {"clean_ratio": 1.5}}},
            "workload.training.clean_ratio: 1.5 is out of range [0, 1]",
        ),
        ({"grid": {"clean_ratio": [0.5, -0.1]}}, "grid.clean_ratio[1]: -0.1 is out of range [0, 1]"),
        (
            {"grid": {"depth": [18, 19]}},
            "grid.depth[1]: 19 is not one of 18, 34, 50, 101, 152, 200, 338, 638",
        ),
        ({"workload": {"model": {"depth": 19}}}, "workload.model.depth: 19 is not one of 18, 34, 50"),
        ({"workload": {"model": {"norm": "ln"}}}, "workload.model.norm: 'ln' is not one of bn, mbn, gn"),
        ({"workload": {"model": {"norm": "bn*"}}}, "set workload.model.bn_star_epochs"),
        (
            {"grid": {"strategy": ["trades"]}},
            "grid.strategy[0]: 'trades' is not one of mixture, alp, standard",
        ),
        ({"grid": {"norm": ["gn*"]}}, "grid.norm[0]: 'gn*' is not one of bn, mbn, gn, bn*, mbn*"),
        ({"grid": {"pgd_steps": [10, -1]}}, "grid.pgd_steps[1]: -1 is out of range [0, 10000]"),
        ({"grid": {"seed": ["zero"]}}, "grid.seed[0]: 'zero' is not an integer"),
        ({"grid": {"widht": [1]}}, "grid.widht: unknown key (allowed: clean_ratio, norm, pgd_steps, depth"),
        ({"workload": {"recipe": {"epochs": "three"}}}, "workload.recipe.epochs: 'three' is not an integer"),
        ({"workload": {"recipe": {"epochs": "3"}}}, "workload.recipe.epochs: '3' is not an integer"),
        ({"workload": {"recipe": {"epochs": True}}}, "workload.recipe.epochs: true is not an integer"),
        ({"workload": {"recipe": {"epochs": 2.5}}}, "workload.recipe.epochs: 2.5 is not an integer"),
        ({"workload": {"recipe": {"epochs": 0}}}, "workload.recipe.epochs: 0 is out of range [1, 10000]"),
        ({"workload": {"attack": {"eps": 0}}}, "workload.attack.eps: 0 is out of range (0, 255]"),
        (
            {"workload": {"recipe": "fast"}},
            "workload.recipe: 'fast' is not a mapping; expected a mapping with keys",
        ),
        ({"resources": {"use_gpu": "yes"}}, "resources.use_gpu: 'yes' is not a boolean (true or false)"),
        ({"resources": {"cpus_per_worker": 0}}, "resources.cpus_per_worker: 0 is out of range (0, 1024]"),
        ({"resources": {"cluster_gpus": 0}}, "resources.cluster_gpus: 0 is out of range [1, 1000000]"),
        ({"checkpoint_every": 0}, "checkpoint_every: 0 is out of range [1, 100000]"),
        ({"max_failures": -1}, "max_failures: -1 is out of range [0, 1000]"),
        ({"workload": {"data": _DROP}}, "workload.data: required but missing"),
        ({"name": _DROP}, "name: required but missing"),
        ({"nmae": "x"}, "nmae: unknown key (allowed: name, storage, workload, grid, resources, planning"),
        ({"name": "../evil"}, "name: '../evil' must match [a-z0-9][a-z0-9_-]{0,62}"),
        ({"name": "a/b"}, "name: 'a/b' must match"),
        ({"name": "Upper"}, "name: 'Upper' must match"),
        ({"name": "x" * 64}, "must match"),
        ({"storage": "ftp://host/x"}, "storage: scheme 'ftp' is not one of file://, s3://"),
        ({"storage": "s3:///prefix"}, "names no bucket"),
        ({"storage": ""}, "storage: '' is not a valid storage URL"),
        (
            {"storage": "s3://bucket/x?versioning=on"},
            "storage: query parameters and fragments are not supported",
        ),
    ],
)
def test_field_errors(override: dict[str, Any], expected: str) -> None:
    message = error_of(spec_text(**override))
    assert expected in message
    assert "Traceback" not in message


def test_unknown_key_suggests_the_closest_name() -> None:
    message = error_of(spec_text(workload={"recipe": {"batch_sze": 64}}))
    assert "did you mean batch_size?" in message


def test_several_errors_one_line_each_in_stable_order() -> None:
    text = spec_text(workload={"recipe": {"epochs": 0, "batch_sze": 1}}, grid={"norm": ["x"], "depth": [7]})
    message = error_of(text)
    lines = message.splitlines()
    assert len(lines) == 4
    assert [line.split(":")[0] for line in lines] == [
        "workload.recipe.epochs",
        "workload.recipe.batch_sze",
        "grid.norm[0]",
        "grid.depth[0]",
    ]
    assert error_of(text) == message


def test_list_form_grid_paths_carry_the_entry_index() -> None:
    message = error_of(spec_text(grid=[{"norm": ["bn"]}, {"norm": ["bn", "xn"]}]))
    assert message == "grid[1].norm[1]: 'xn' is not one of bn, mbn, gn, bn*, mbn*"


# --- document-level errors ----------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_directory_is_not_a_spec(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)


def test_file_too_large(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(spec_text() + "#" * (MAX_SPEC_BYTES + 1))
    with pytest.raises(SpecError, match="at most 1 MiB"):
        load_spec(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(SpecError, match="not UTF-8"):
        load_spec(path)


def test_load_spec_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(spec_text())
    assert load_spec(path) == make_spec()


def test_yaml_syntax_error_names_the_line() -> None:
    text = "name: t\nworkload:\n  data: {url: x}\ngrid: [norm: bn\nresources: {}\n"
    message = error_of(text)
    assert message.startswith("test.yaml:")
    assert "YAML syntax error" in message
    line = int(message.split(":")[1])
    assert line in (4, 5, 6)


def test_yaml_error_does_not_quote_the_document() -> None:
    text = "name: t\nstorage: s3://bucket/hunter2-not-a-secret-but-quoted\n  bad: [\n"
    assert "hunter2" not in error_of(text)


def test_duplicate_key_is_an_error_with_its_line() -> None:
    text = "name: t\nworkload:\n  data: {url: x}\nname: u\n"
    message = error_of(text)
    assert "test.yaml:4:" in message and "duplicate key 'name'" in message


@pytest.mark.parametrize(("text", "got"), [("", "the file is empty"), ("- a\n- b\n", "got a list"), ("3\n", "got 3")])
def test_top_level_must_be_a_mapping(text: str, got: str) -> None:
    message = error_of(text)
    assert "the top level must be a mapping with keys name, storage, workload" in message
    assert got in message


def test_non_string_key_and_date_value() -> None:
    assert "key 1 is not a string" in error_of(spec_text(grid={1: [0]}))
    assert "workload.data.url: a YAML date value is not supported" in error_of(
        spec_text(workload={"data": {"url": "2020-01-01"}}).replace("'2020-01-01'", "2020-01-01")
    )


def test_alias_bomb_is_rejected_quickly() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    message = error_of("\n".join(lines) + "\n")
    assert "expands to more than" in message


# --- grid emptiness and size ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grid", "expected"),
    [
        ({}, "grid: empty; list values for at least one axis"),
        ([], "grid: empty; list values for at least one axis"),
        (None, "grid: empty"),
        ({"norm": []}, "grid.norm: empty; give at least one value"),
        ({"norm": None}, "grid.norm: empty; give at least one value"),
        ([{"norm": ["bn"]}, {}], "grid[1]: empty mapping; list values for at least one axis of clean_ratio"),
    ],
)
def test_empty_grid_is_an_error(grid: Any, expected: str) -> None:
    data = _merge(BASE, {})
    data["grid"] = grid
    assert expected in error_of(yaml.safe_dump(data))


def test_absent_grid_is_a_single_default_cell() -> None:
    spec = make_spec(grid=_DROP)
    assert spec.grid is None and spec.grid_entries() == [] and spec.raw_cell_count() == 1


def test_scalar_axis_is_a_one_value_axis() -> None:
    assert make_spec(grid={"depth": 34}).grid_entries()[0].depth == [34]


def test_max_cells() -> None:
    grid = {"seed": list(range(100)), "clean_ratio": [0.0, 0.5]}
    message = error_of(spec_text(grid=[grid], max_cells=150))
    assert message.startswith("grid: expands to 200 cells") and "max_cells 150" in message
    assert make_spec(grid=[grid], max_cells=200).raw_cell_count() == 200


# --- batch size vs workers --------------------------------------------------------------------------------


def test_batch_not_a_multiple_of_per_worker_batch() -> None:
    message = error_of(spec_text(grid={"batch_size": [64, 100]}))
    assert message == (
        "grid.batch_size[1]: 100 is not a multiple of workload.recipe.per_worker_batch 32 (allowed: 32, 64, 96, ...)"
    )


def test_batch_smaller_than_per_worker_batch_in_workload_default() -> None:
    message = error_of(spec_text(workload={"recipe": {"batch_size": 16}}))
    assert message.startswith("workload.recipe.batch_size: 16 is not a multiple of workload.recipe.per_worker_batch")


def test_batch_not_divisible_by_workers_x_per_worker_batch() -> None:
    message = error_of(spec_text(grid={"batch_size": [128]}, resources={"max_workers_per_cell": 3}))
    assert "grid.batch_size[0]: 128 is not divisible by workers x per_worker_batch = 3 x 32 = 96" in message
    assert "set resources.max_workers_per_cell to a divisor of 4, e.g. 2" in message


# --- credentials ------------------------------------------------------------------------------------------

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # AWS documentation example shape
KEY_ID = "AKIAIOSFODNN7EXAMPLE"


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ({"storage": f"s3://{KEY_ID}:{SECRET}@bucket/prefix"}, "storage"),
        ({"storage": f"s3://bucket/prefix?X-Amz-Signature={SECRET}"}, "storage"),
        ({"storage": f"https://host/prefix?token={SECRET}"}, "storage"),
        ({"storage": f"https://host/prefix?sig={SECRET}&se=2030"}, "storage"),
        ({"workload": {"data": {"url": f"s3://user:{SECRET}@bucket/data"}}}, "workload.data.url"),
        ({"workload": {"data": {"url": "s3://user:hunter2pass@bucket/data"}}}, "workload.data.url"),
        ({"aws_secret_access_key": SECRET}, "aws_secret_access_key"),
        ({"AWS_ACCESS_KEY_ID": KEY_ID}, "AWS_ACCESS_KEY_ID"),
        ({"workload": {"data": {"url": "x", "secret_key": SECRET}}}, "workload.data.secret_key"),
        ({"storage_options": {"key": KEY_ID, "secret": SECRET}}, "storage_options.key"),
        ({"resources": {"session_token": SECRET}}, "resources.session_token"),
        ({"resources": {"password": SECRET}}, "resources.password"),
        ({"resources": {"token": SECRET}}, "resources.token"),
        ({"resources": {"secretAccessKey": SECRET}}, "resources.secretAccessKey"),
        ({"grid": {"api-key": [SECRET]}}, "grid.api-key"),
        ({"name": KEY_ID}, "name"),
        ({"name": SECRET}, "name"),
        (
            {"workload": {"data": {"url": "x", "train_split": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0"}}},
            "workload.data.train_split",
        ),
    ],
)
def test_credentials_are_rejected_without_echoing_them(override: dict[str, Any], path: str) -> None:
    message = error_of(spec_text(**override))
    assert message.split(":")[0].startswith(path.split(".")[0])
    assert path.split(".")[-1] in message
    assert "credentials must come from the environment" in message
    for secret in (SECRET, KEY_ID, "eyJhbGciOiJIUzI1NiJ9", "hunter2pass", "bPxRfiCY"):
        assert secret not in message


def test_credentials_win_over_other_errors() -> None:
    # An unknown key or a bad type would echo the value; the credential scan runs first.
    message = error_of(spec_text(secret=SECRET, workload={"recipe": {"epochs": "x"}}))
    assert SECRET not in message and "credentials must come from the environment" in message


def test_no_schema_field_looks_like_a_credential() -> None:
    # Guards the key heuristic against false positives as the schema grows.
    def names(model: type[BaseModel], seen: set[type]) -> set[str]:
        if model in seen:
            return set()
        seen.add(model)
        out = set(model.model_fields)
        for field in model.model_fields.values():
            for sub in _models_in(field.annotation):
                out |= names(sub, seen)
        return out

    fields = names(Spec, set())
    assert "per_worker_batch" in fields and "keep_checkpoints" in fields
    assert [f for f in fields if looks_like_credential_name(f)] == []


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    from typing import get_args

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def test_with_storage_validates_the_override() -> None:
    spec = make_spec()
    assert spec.with_storage("s3://bucket/sweeps").storage == "s3://bucket/sweeps"
    assert spec.with_storage("s3://bucket/sweeps").grid_path(0) == "grid"
    with pytest.raises(SpecError) as info:
        spec.with_storage(f"s3://k:{SECRET}@bucket/x")
    assert info.value.message.startswith("--storage:") and SECRET not in info.value.message


# --- parsing details and the stored copy ------------------------------------------------------------------


def test_yaml_exponent_without_dot_is_a_float() -> None:
    spec = parse_spec(spec_text().replace("per_worker_batch: 32", "per_worker_batch: 32\n    weight_decay: 5e-5"))
    assert spec.workload.recipe.weight_decay == pytest.approx(5e-5)


def test_int_is_accepted_where_a_float_is_expected() -> None:
    assert make_spec(grid={"clean_ratio": [0, 1]}).grid_entries()[0].clean_ratio == [0.0, 1.0]


@pytest.mark.parametrize("grid", [{"norm": ["bn", "bn*"]}, [{"norm": ["gn"]}, {"depth": [34], "seed": [3]}], _DROP])
def test_dump_yaml_round_trips(grid: Any) -> None:
    spec = make_spec(grid=grid, checkpoint_every=7)
    dumped = spec.dump_yaml()
    again = parse_spec(dumped, "spec.yaml")
    assert again == spec
    assert again.dump_yaml() == dumped
    assert "checkpoint_every: 7" in dumped
    if isinstance(grid, dict):
        assert "grid:\n  norm:" in dumped


def test_defaults_are_the_papers() -> None:
    spec = parse_spec("name: paper\nworkload: {data: {url: s3://bucket/imagenet}}\n")
    w = spec.workload
    assert (w.model.depth, w.attack.steps, w.recipe.epochs, w.recipe.batch_size) == (152, 30, 110, 4096)
    assert spec.storage == "./runs" and spec.resources.use_gpu and spec.max_cells == 100_000
