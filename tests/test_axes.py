"""The grid's axis table (`orchestrator.axes`) is the one place an axis is defined: the spec's grid fields, the
workload defaults, the cell's config, the results schema and the report's setting key all follow it."""

from __future__ import annotations

import dataclasses
from typing import Any

import pyarrow as pa
import pytest

from orchestrator.axes import AXES, AXIS_TABLE, BY_NAME
from orchestrator.grid import expand
from orchestrator.paper import SettingKey
from orchestrator.results import results_table
from orchestrator.spec import GridEntry, SpecError, parse_spec

SPEC = """
name: axes
workload:
  data: {url: builtin://digits}
  recipe: {epochs: 4, batch_size: 64, per_worker_batch: 32}
  attack: {steps: 3}
grid: {GRID}
resources: {use_gpu: false, max_workers_per_cell: 4}
"""
# One value per axis, none of them the workload default.
VALUES: dict[str, Any] = {
    "clean_ratio": 0.25,
    "norm": "gn",
    "pgd_steps": 5,
    "depth": 50,
    "batch_size": 128,
    "strategy": "alp",
    "seed": 7,
}


def _at(config: Any, path: str) -> Any:
    for part in path.split("."):
        config = getattr(config, part)
    return config


def test_the_table_names_every_axis_once_and_the_grid_entry_follows_it() -> None:
    assert set(VALUES) == set(AXES) and len(AXES) == len(set(AXES))
    assert list(GridEntry.model_fields) == list(AXES)


def test_each_axis_lands_at_its_config_path() -> None:
    grid = "{" + ", ".join(f"{name}: [{value}]" for name, value in VALUES.items()) + "}"
    (cell,) = expand(parse_spec(SPEC.replace("{GRID}", grid)))
    defaults = parse_spec(SPEC.replace("{GRID}", "{seed: [0]}")).default_axes()
    for axis in AXIS_TABLE:
        assert cell.axes[axis.name] == VALUES[axis.name]
        assert _at(cell.config, axis.config_path) == VALUES[axis.name], axis.name
        assert defaults[axis.name] != VALUES[axis.name], f"{axis.name}: pick a value that is not the default"


def test_derived_fields_follow_their_axes() -> None:
    grid = "[{norm: [bn*], pgd_steps: [5], batch_size: [128]}, {strategy: [standard]}]"
    star, standard = expand(parse_spec(SPEC.replace("{GRID}", grid)))
    assert star.config.model.norm == "bn" and star.config.model.bn_star_epochs > 0  # BN*, Section 4.3
    assert star.config.attack.step_size == 4.0  # PGD-5's step, Appendix B.1
    assert star.num_workers == 4  # 128 images at 32 per worker
    # Standard training: no attack, every image clean (Section 4.1), whatever the workload's defaults say.
    assert (standard.axes["clean_ratio"], standard.axes["pgd_steps"]) == (1.0, 0)


@pytest.mark.parametrize(
    ("axis", "bad"),
    [("clean_ratio", 1.5), ("norm", "batchnorm"), ("pgd_steps", -1), ("depth", 19), ("batch_size", 0), ("seed", -3)],
)
def test_each_axis_refuses_what_its_entry_does_not_allow(axis: str, bad: Any) -> None:
    with pytest.raises(SpecError, match=rf"grid\.{axis}\[0\]"):
        parse_spec(SPEC.replace("{GRID}", f"{{{axis}: [{bad}]}}"))


def test_results_columns_take_each_axis_type() -> None:
    record = {"cell_id": "c", "axes": VALUES, "status": "finished", "branches": {"main": {"acc_clean": 0.5}}}
    schema = results_table([record]).schema
    for axis in AXIS_TABLE:
        assert schema.field(axis.name).type == pa.type_for_alias(axis.column_type), axis.name


def test_the_reports_setting_key_is_the_axes_without_the_seed_plus_the_branch() -> None:
    fields = {field.name for field in dataclasses.fields(SettingKey)}
    assert fields == (set(AXES) - {"seed"}) | {"branch"}
    assert BY_NAME["seed"].column_type == "int64"
