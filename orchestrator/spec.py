"""The sweep spec: one YAML file -> a validated, typed `Spec` (docs/design.md sections 3.1 and 4).

A researcher describes a whole ablation study (Xie & Yuille, ICLR 2020, Tables 1-7) in one file::

    name: smoke                      # becomes a storage folder: [a-z0-9][a-z0-9-_]{0,62}
    storage: ./runs                  # local path, file:// or s3://bucket/prefix (--storage overrides)
    workload:                        # defaults for every cell: TrainConfig minus the derived fields
      data: {url: ./data/digits}
      model: {depth: 18, norm: bn, width: 0.125, stem: small}
      ...
    grid:                            # a mapping (cartesian product) or a list of mappings (union of products)
      norm: [bn, mbn, gn, bn*]
      seed: [0, 1, 2]
    resources: {use_gpu: true, max_workers_per_cell: 128, cluster_gpus: 128, gpus_per_node: 8}

Validation is strict (unknown keys, wrong types and out-of-range values are errors) and every error becomes
one line that names the field path, the bad value and what is allowed, e.g.
``grid.norm[2]: 'batchnorm' is not one of bn, mbn, gn, bn*, mbn*``. Credentials are never accepted: a key
that looks like one, or a URL carrying a user:password or signed query, is rejected without echoing the
value, because the spec is copied to storage (``spec.yaml``) and printed in logs (docs/design.md section 4).

This module imports neither torch nor ray: a spec is validated and planned in well under a second.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from orchestrator.axes import AXES, AXIS_TABLE, default_axes
from orchestrator.credentials import CREDENTIALS_HINT, credential_in_text
from orchestrator.overrides import OverrideError, apply_overrides
from orchestrator.spec_messages import SpecError, format_validation_error, join_lines, show_value
from orchestrator.spec_yaml import MAX_SPEC_BYTES, SpecLoader, scan
from workloads.config import WorkloadConfig

MAX_AXIS_VALUES = 10_000

# Storage every part of a sweep can write: the driver and its records (fsspec), and Ray Train's checkpoints
# (pyarrow, orchestrator.storage.ray_storage), from every node. Google Cloud Storage and Azure would need gcsfs or
# adlfs, which the project does not install; memory:// lives inside one process, so no Train worker could see it.
STORAGE_SCHEMES: tuple[str, ...] = ("file", "s3")
NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"


def _check_url(url: str, what: str) -> str:
    """For `storage` and `--storage`: a local path or an fsspec URL, without credentials or query string."""
    if not url.strip() or url != url.strip():
        raise ValueError(f"{show_value(url)} is not a valid {what} (empty or surrounded by whitespace)")
    if "\x00" in url:
        raise ValueError(f"not a valid {what} (contains a NUL character)")
    why = credential_in_text(url)
    if why:
        raise ValueError(f"contains {why}; {CREDENTIALS_HINT}")
    if "://" in url:
        parts = urlsplit(url)
        if parts.scheme not in STORAGE_SCHEMES:
            allowed = ", ".join(f"{s}://" for s in STORAGE_SCHEMES)
            raise ValueError(f"scheme {parts.scheme!r} is not one of {allowed} (or a local path)")
        if parts.query or parts.fragment:
            raise ValueError(
                "query parameters and fragments are not supported in a storage URL; configure the filesystem "
                "through the environment"
            )
        if parts.scheme in ("s3", "gs", "gcs") and not parts.netloc:
            raise ValueError(f"{show_value(url)} names no bucket; write {parts.scheme}://bucket/prefix")
    return url


# ------------------------------------------------------------------------------------------------------------
# Schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _GridEntryBase(_Strict):
    """One product of axis values; an axis left out takes the workload default (docs/design.md section 4)."""

    @field_validator("*", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        # A single value is a one-element axis; an explicit null or [] is an error, not "use the default".
        if value is None or value == []:
            raise ValueError("empty; give at least one value, or leave the axis out to use the workload default")
        if not isinstance(value, list):
            value = [value]
        if len(value) > MAX_AXIS_VALUES:
            raise ValueError(f"{len(value)} values; at most {MAX_AXIS_VALUES} per axis")
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> _GridEntryBase:
        if not self.axes():
            raise ValueError(f"empty mapping; list values for at least one axis of {', '.join(AXES)}")
        return self

    def axes(self) -> dict[str, list[Any]]:
        """The axes this entry lists, in canonical axis order."""
        return {axis: values for axis in AXES if (values := getattr(self, axis)) is not None}

    def size(self) -> int:
        return math.prod(len(values) for values in self.axes().values())


if TYPE_CHECKING:
    GridEntry = _GridEntryBase
else:
    # One optional list field per axis of the table, with the axis's own allowed values (orchestrator.axes).
    GridEntry = create_model(
        "GridEntry",
        __base__=_GridEntryBase,
        __doc__=_GridEntryBase.__doc__,
        **{axis.name: (list[axis.value] | None, None) for axis in AXIS_TABLE},
    )


# The spec's `workload` section is the workload's own config class: its fields, defaults and bounds are defined
# once, in workloads.config. The per-cell fields the orchestrator decides (workers, GPU use, checkpointing) are
# TrainConfig's additions and come from `resources` and the top-level keys.
Workload = WorkloadConfig


class Resources(_Strict):
    use_gpu: bool = True
    gpus_per_worker: int = Field(1, ge=1, le=64)
    # Fractional CPUs let several workers share a core on small machines (docs/design.md section 6).
    cpus_per_worker: float = Field(1.0, gt=0, le=1024)
    # workers = min(batch_size // per_worker_batch, max_workers_per_cell); the rest is gradient accumulation.
    max_workers_per_cell: int = Field(128, ge=1, le=100_000)
    # Used for planning and feasibility when no cluster is connected (e.g. --plan on a laptop).
    cluster_gpus: int = Field(128, ge=1, le=1_000_000)
    gpus_per_node: int = Field(8, ge=1, le=1024)
    # CPU specs (use_gpu: false) plan on this many CPUs; null: the planning machine's CPU count.
    cluster_cpus: int | None = Field(None, ge=1, le=10_000_000)
    # A cell whose workers fit on none of the live nodes is reported at once (log line, status "unschedulable")
    # and fails after this long: time for an autoscaler to add a node (a GPU node boots in minutes).
    placement_timeout_s: float = Field(900.0, gt=0, le=7 * 86_400)


class Tracking(_Strict):
    """Opt-in experiment tracking through Ray Tune's logger callbacks (orchestrator.tracking): one tracked run per
    cell, named by its cell id, with its resolved configuration, per-epoch metrics and final evaluation."""

    # An MLflow tracking URI (http://host:5000, databricks, a file path). Credentials stay in the environment
    # (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD), never in the spec.
    mlflow: str | None = Field(None, min_length=1)
    # The MLflow experiment; default: the sweep's name.
    experiment: str | None = Field(None, min_length=1, max_length=500)
    # TensorBoard event files under <storage>/<name>/tensorboard/<cell_id>/, kept with the sweep.
    tensorboard: bool = False

    @field_validator("mlflow")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        why = credential_in_text(uri) if uri else None
        if why:
            raise ValueError(f"contains {why}; {CREDENTIALS_HINT}")
        return uri


class Replication(_Strict):
    """Noise-adaptive replication (orchestrator.replication): seeds [min, max] per setting, more seeds only for
    settings whose named comparisons are still undecided, within a budget."""

    seeds: tuple[int, int]
    effect: float = Field(gt=0, le=100)  # the smallest difference that matters, in accuracy points
    budget_device_hours: float | None = Field(None, gt=0)  # GPU-hours (worker-hours for a CPU spec), planned
    metric: str | None = None  # a results column: acc_clean or acc_pgd_<N>; default the strongest PGD-N
    decide: list[str] = Field(min_length=1)

    @field_validator("seeds")
    @classmethod
    def _seed_range(cls, seeds: tuple[int, int]) -> tuple[int, int]:
        low, high = seeds
        if low < 2 or high < low or high > 1000:
            raise ValueError(f"[{low}, {high}]: want [min, max] with 2 <= min <= max <= 1000 (a test needs 2 seeds)")
        return seeds


class Planning(_Strict):
    """Inputs of the cost model (orchestrator.plan); defaults are the paper's ImageNet setting (Section 3)."""

    train_images: int = Field(1_281_167, ge=1, le=10**11)
    image_size: int = Field(224, ge=8, le=8192)
    # Wall seconds a cell holds its workers without training: its trial, Train controller and worker processes
    # starting, data opened, the model built, the evaluation set loaded (benchmarks/orchestration_overhead
    # measures 13-18 s of it on 2 cores; a GPU node adds its CUDA and NCCL set-up).
    cell_overhead_s: float = Field(20.0, ge=0, le=86_400)
    # Wall seconds of the sweep's own start and end: Ray's start, built-in data converted, results and report.
    sweep_overhead_s: float = Field(30.0, ge=0, le=86_400)
    # Throughput of one worker device relative to one of the paper's GPUs as the cost model estimates it (e.g.
    # ~0.01 for a CPU worker; an H200 ran PGD-10 ResNets at ~4.7 in bf16 with 32 images per GPU, ~8 with 64,
    # ~2.5 in fp32: docs/benchmarks.md, gpu_throughput).
    relative_speed: float = Field(1.0, gt=0, le=1000)


class Spec(_Strict):
    name: str
    storage: str = "./runs"
    workload: Workload
    grid: list[GridEntry] | None = None
    resources: Resources = Resources()
    planning: Planning = Planning()
    tracking: Tracking = Tracking()
    replication: Replication | None = None
    checkpoint_every: int = Field(5, ge=1, le=100_000)
    keep_checkpoints: int = Field(2, ge=1, le=1_000)
    # How long every storage operation of the sweep (records, checkpoint upload and restore, shard reads) rides
    # out an unreachable store before it fails: training waits meanwhile (workloads.fs.with_retries).
    storage_outage_tolerance_s: float = Field(3600.0, ge=1, le=30 * 86_400)
    # Ray Train worker-group restarts per cell; finite on purpose (docs/design.md section 6).
    max_failures: int = Field(2, ge=0, le=1_000)
    # Bound on the product sizes before duplicates collapse: guards against a typo that expands to millions.
    max_cells: int = Field(100_000, ge=1, le=10_000_000)
    # BN* cells start from their BN twin's training state at the switch epoch instead of training the epochs they
    # share again (Section 4.3: BN* differs from BN only in the last epochs; orchestrator.grid.fork_twins). Forks
    # run after the other cells. Operational: a forked cell's results equal its from-scratch ones, and so does its id.
    fork_bn_star: bool = False

    _grid_is_mapping: bool = PrivateAttr(False)

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not re.fullmatch(NAME_PATTERN, name):
            raise ValueError(
                f"{show_value(name)} must match {NAME_PATTERN} (lowercase letters, digits, '-' and '_'; "
                "it names the sweep's storage folder)"
            )
        return name

    @field_validator("storage")
    @classmethod
    def _storage(cls, storage: str) -> str:
        return _check_url(storage, "storage URL")

    @model_validator(mode="after")
    def _no_credentials_in_data_url(self) -> Spec:
        # parse_spec scans the whole document; this covers specs built in Python (dump_yaml stays clean).
        why = credential_in_text(self.workload.data.url)
        if why:
            raise ValueError(f"workload.data.url contains {why}; {CREDENTIALS_HINT}")
        return self

    @field_validator("grid", mode="before")
    @classmethod
    def _grid_as_list(cls, grid: Any) -> Any:
        # `grid` may be one mapping (a cartesian product) or a list of them (a union of products): one shape
        # is validated; parse_spec remembers the form for paths in messages and for dump_yaml.
        if grid is None or grid == [] or grid == {}:
            raise ValueError(
                "empty; list values for at least one axis, or leave `grid` out for a single cell of defaults"
            )
        return [grid] if isinstance(grid, dict) else grid

    # -- grid helpers ----------------------------------------------------------------------------------------

    def grid_entries(self) -> list[GridEntry]:
        """The grid as a list of products; [] when the spec has no grid (a single cell of defaults)."""
        return list(self.grid or [])

    def grid_path(self, index: int) -> str:
        """How messages name grid entry `index`: `grid` for the mapping form, `grid[i]` for the list form."""
        return "grid" if self._grid_is_mapping else f"grid[{index}]"

    def default_axes(self) -> dict[str, Any]:
        """Axis values of a cell that lists no axis: the workload defaults (orchestrator.axes)."""
        return default_axes(self.workload)

    def raw_cell_count(self) -> int:
        """Cells before duplicates collapse (the quantity `max_cells` bounds)."""
        entries = self.grid_entries()
        return sum(entry.size() for entry in entries) if entries else 1

    # -- checks that span fields -----------------------------------------------------------------------------

    def check(self) -> None:
        """Cross-field checks (batch sizes vs workers, ALP vs clean ratio, max_cells, replication vs grid); raises
        SpecError."""
        from orchestrator import replication

        errors = list(_semantic_errors(self)) + replication.check(self)
        if errors:
            raise SpecError(join_lines(errors))

    # -- derived copies --------------------------------------------------------------------------------------

    def with_storage(self, url: str) -> Spec:
        """This spec with `storage` replaced (the CLI's --storage), validated like the spec's own field."""
        try:
            _check_url(url, "storage URL")
        except ValueError as exc:
            raise SpecError(f"--storage: {exc}") from None
        return self.model_copy(update={"storage": url})

    def dump_yaml(self) -> str:
        """The fully resolved spec (every default written out) as YAML, for `<storage>/<name>/spec.yaml`.

        No secrets by construction: a spec containing credentials never validates. `parse_spec` of the output
        gives an equal Spec.
        """
        data = self.model_dump(mode="json", exclude={"grid"})
        if self.grid is not None:
            entries = [entry.model_dump(mode="json", exclude_none=True) for entry in self.grid]
            grid: Any = entries[0] if self._grid_is_mapping else entries
            ordered = {}
            for key, value in data.items():
                ordered[key] = value
                if key == "workload":
                    ordered["grid"] = grid
            data = ordered
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110)


def workers_for(batch_size: int, per_worker_batch: int, max_workers: int) -> int:
    """Data-parallel workers of a cell: one per `per_worker_batch` images of the global batch, capped by
    `max_workers`; the remaining factor becomes gradient accumulation (Section 3: 4096 = 128 GPUs x 32)."""
    return min(batch_size // per_worker_batch, max_workers)


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _batch_problem(batch: int, spec: Spec) -> str | None:
    per = spec.workload.recipe.per_worker_batch
    cap = spec.resources.max_workers_per_cell
    if batch < per or batch % per:
        return (
            f"{batch} is not a multiple of workload.recipe.per_worker_batch {per} "
            f"(allowed: {per}, {2 * per}, {3 * per}, ...)"
        )
    workers = workers_for(batch, per, cap)
    if batch % (workers * per):
        fit = _largest_divisor_at_most(batch // per, cap)
        return (
            f"{batch} is not divisible by workers x per_worker_batch = {workers} x {per} = {workers * per} "
            f"(workers = min({batch} // {per}, resources.max_workers_per_cell {cap})); set "
            f"resources.max_workers_per_cell to a divisor of {batch // per}, e.g. {fit}"
        )
    return None


def _semantic_errors(spec: Spec) -> Iterator[str]:
    raw = spec.raw_cell_count()
    if raw > spec.max_cells:
        yield (
            f"grid: expands to {raw:,} cells before duplicates collapse, more than max_cells "
            f"{spec.max_cells:,}; shrink the grid or raise max_cells"
        )
        return
    defaults = spec.default_axes()
    entries = spec.grid_entries()
    problems: dict[int, str | None] = {}  # batch size -> problem, each size checked once

    def batch_problem(batch: int) -> str | None:
        if batch not in problems:
            problems[batch] = _batch_problem(batch, spec)
        return problems[batch]

    if not entries or any("batch_size" not in entry.axes() for entry in entries):
        problem = batch_problem(defaults["batch_size"])
        if problem:
            yield f"workload.recipe.batch_size: {problem}"
    for index, entry in enumerate(entries):
        for j, batch in enumerate(entry.axes().get("batch_size", [])):
            problem = batch_problem(batch)
            if problem:
                yield f"{spec.grid_path(index)}.batch_size[{j}]: {problem}"
    # ALP pairs each adversarial image's logits with its clean counterpart's (Kannan et al. 2018; paper
    # Section 4.1 / Appendix A): with no clean images kept there is nothing to pair.
    options: list[GridEntry | None] = [*entries] if entries else [None]
    for index, option in enumerate(options):
        axes = option.axes() if option is not None else {}
        strategies = axes.get("strategy", [defaults["strategy"]])
        ratios = axes.get("clean_ratio", [defaults["clean_ratio"]])
        if "alp" in strategies and 0.0 in ratios:
            where = spec.grid_path(index) if option is not None else "workload.training"
            path = f"{where}.strategy" if "strategy" in axes else "workload.training.strategy"
            source = f"{where}.clean_ratio" if "clean_ratio" in axes else "workload.training.clean_ratio"
            yield (
                f"{path}: 'alp' cannot be combined with clean_ratio 0 (from {source}): ALP pairs clean and "
                "adversarial logits, so it needs clean_ratio > 0; drop 0 from clean_ratio or give alp its "
                "own grid entry"
            )


def parse_spec(text: str, source: str = "<spec>", overrides: Sequence[str] = ()) -> Spec:
    """Validate spec `text` (YAML) with the command line's KEY=VALUE `overrides` applied (orchestrator.overrides);
    `source` names it in messages. Raises SpecError, one line per problem."""
    if len(text.encode("utf-8", errors="replace")) > MAX_SPEC_BYTES:
        raise SpecError(f"{source}: larger than {MAX_SPEC_BYTES // (1 << 20)} MiB; a spec is a short YAML file")
    try:
        data = yaml.load(text, Loader=SpecLoader)  # noqa: S506 - SpecLoader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        # Only the problem and its position: the default rendering quotes the offending line (maybe a secret).
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        raise SpecError(f"{where}: YAML syntax error: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: YAML syntax error: {type(exc).__name__}") from None
    except RecursionError:
        raise SpecError(f"{source}: nested too deeply") from None
    if not isinstance(data, dict):
        got = "the file is empty" if data is None else f"got {show_value(data)}"
        raise SpecError(f"{source}: the top level must be a mapping with keys {', '.join(Spec.model_fields)} ({got})")
    try:
        data = apply_overrides(data, overrides)
    except OverrideError as exc:
        raise SpecError(str(exc)) from None
    scan(data)
    grid_is_mapping = isinstance(data.get("grid"), dict)

    def rename(loc: tuple[Any, ...]) -> tuple[Any, ...]:
        if grid_is_mapping and loc[:2] == ("grid", 0):
            return ("grid", *loc[2:])
        return loc

    try:
        # Strict JSON-mode validation: "3" is not an integer and `true` is not 1 (YAML would let both through
        # lax mode), while lists still fill tuple fields.
        spec = Spec.model_validate_json(json.dumps(data, allow_nan=True), strict=True)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, Spec, rename=rename)) from None
    spec._grid_is_mapping = grid_is_mapping
    spec.check()
    return spec


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> Spec:
    """Read and validate the spec file at `path`, KEY=VALUE `overrides` applied. Raises SpecError (missing file,
    too large, invalid)."""
    file = Path(path)
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec file ({exc.strerror})") from None
    if file.is_dir():
        raise SpecError(f"{path}: is a directory, not a spec file")
    if size > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: {size:,} bytes; a spec file may be at most {MAX_SPEC_BYTES // (1 << 20)} MiB")
    try:
        raw = file.read_bytes()[: MAX_SPEC_BYTES + 1]
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec file ({exc.strerror})") from None
    return parse_spec(text, str(path), overrides)
