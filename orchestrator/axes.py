"""The grid's axes, one table: each axis names where its value goes in a cell's config, its type and allowed values,
the workload default a cell takes when the grid leaves it out, and its results.parquet column type.

Everything else reads this table: the spec's `GridEntry` (one list-valued field per axis), `Spec.default_axes`,
the resolution of a cell's config (`orchestrator.grid`), the results schema (`orchestrator.results`) and the
report's setting key (`orchestrator.paper.SettingKey`, checked against it by tests/test_axes.py). Adding an axis
is one entry here (plus, where its value also changes other fields, a line in the resolver) and its test.

Axis order is part of a cell's description and of the results' column order; a cell's id does not depend on it
(the id hashes the resolved config: tests/test_grid.py pins the smoke sweep's ids).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator

from orchestrator.spec_messages import show_number, show_value
from workloads.config import MAX_SEED, NORMS, RESNET_STAGES, RUNNING_STATS_NORMS, Strategy, WorkloadConfig

# The grid's norm values: the workload's norms, plus BN* of those with running statistics ('bn*', 'mbn*':
# running statistics used in training for the last epochs, Section 4.3, Table 2).
GRID_NORMS: tuple[str, ...] = NORMS + tuple(f"{norm}*" for norm in RUNNING_STATS_NORMS)


def in_range(lo: float, hi: float) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        # `not lo <= v <= hi` also rejects NaN.
        if not lo <= value <= hi:
            raise ValueError(f"{show_number(value)} is out of range [{show_number(lo)}, {show_number(hi)}]")
        return value

    return check


def _known_depth(depth: int) -> int:
    if depth not in RESNET_STAGES:
        raise ValueError(f"{depth} is not one of {', '.join(str(d) for d in RESNET_STAGES)}")
    return depth


def _grid_norm(value: str) -> str:
    if value not in GRID_NORMS:
        raise ValueError(f"{show_value(value)} is not one of {', '.join(GRID_NORMS)}")
    return value


def _default_norm(w: WorkloadConfig) -> str:
    star = w.model.bn_star_epochs > 0 and w.model.norm != "gn"
    return w.model.norm + ("*" if star else "")


@dataclass(frozen=True)
class Axis:
    name: str
    config_path: str  # where the value goes in the cell's TrainConfig (the resolver may derive more from it)
    value: Any  # the pydantic type of one value, with its allowed values
    column_type: str  # its results.parquet column (a pyarrow type alias)
    default: Callable[[WorkloadConfig], Any]  # a cell's value when the grid leaves the axis out
    meaning: str


AXIS_TABLE: tuple[Axis, ...] = (
    Axis(
        "clean_ratio",
        "training.clean_ratio",
        Annotated[float, AfterValidator(in_range(0.0, 1.0)), AfterValidator(float)],
        "float64",
        lambda w: float(w.training.clean_ratio),
        "share of each batch kept clean (Section 4.1)",
    ),
    Axis(
        "norm",
        "model.norm",  # a trailing * sets model.bn_star_epochs instead (BN*, Section 4.3)
        Annotated[str, AfterValidator(_grid_norm)],
        "string",
        _default_norm,
        "normalisation: bn, mbn, gn, their BN* variants (Sections 4.2-4.3)",
    ),
    Axis(
        "pgd_steps",
        "attack.steps",  # also sets attack.step_size (Appendix B.1)
        Annotated[int, AfterValidator(in_range(0, 10_000))],
        "int64",
        lambda w: w.attack.steps,
        "PGD-N of the training attack (Section 5.1)",
    ),
    Axis(
        "depth",
        "model.depth",
        Annotated[int, AfterValidator(_known_depth)],
        "int64",
        lambda w: w.model.depth,
        "ResNet depth (Section 5.3)",
    ),
    Axis(
        "batch_size",
        "recipe.batch_size",  # also sets num_workers (per_worker_batch each)
        Annotated[int, AfterValidator(in_range(1, 1 << 24))],
        "int64",
        lambda w: w.recipe.batch_size,
        "global batch size (Section 5.2)",
    ),
    Axis(
        "strategy",
        "training.strategy",  # standard also sets clean_ratio 1 and pgd_steps 0
        Strategy,
        "string",
        lambda w: w.training.strategy,
        "mixture, standard or ALP training",
    ),
    Axis(
        "seed",
        "seed",
        Annotated[int, AfterValidator(in_range(0, MAX_SEED))],
        "int64",
        lambda w: w.seed,
        "the run's seed",
    ),
)

AXES: tuple[str, ...] = tuple(axis.name for axis in AXIS_TABLE)
BY_NAME: dict[str, Axis] = {axis.name: axis for axis in AXIS_TABLE}


def default_axes(workload: WorkloadConfig) -> dict[str, Any]:
    """Axis values of a cell that lists no axis: the workload defaults."""
    return {axis.name: axis.default(workload) for axis in AXIS_TABLE}


def set_at(config: dict[str, Any], path: str, value: Any) -> None:
    """Put `value` at dotted `path` of a config dict (the sections are dicts already)."""
    *sections, field = path.split(".")
    for section in sections:
        config = config[section]
    config[field] = value
