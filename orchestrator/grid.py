"""Grid expansion: a `Spec` -> the list of resolved cells, each with a stable id (docs/design.md section 3.2).

Every derived parameter is resolved here, in `_Resolver.resolve`, and nowhere else:

- PGD step size from the number of training steps N (Appendix B.1, footnote 6: 4 for PGD-5, 2 for PGD-10,
  else 1), unless the workload sets `attack.step_size`; with `attack.reach_eps` (the default) at least eps/N, as
  the pipeline's adv_model.py (PGDAttacker) has it;
- the learning rate follows the batch size through `RecipeConfig.lr` (linear scaling): nothing to store;
- data-parallel workers from the batch size (`spec.workers_for`), the rest being gradient accumulation;
- BN* epochs from a starred norm (Section 4.3: running statistics in training for the last 10 of 110 epochs);
- the strategy `standard` (the paper's "0% adv + 100% clean") trains on clean images only, so it is
  normalised to clean_ratio 1.0 and pgd_steps 0, and standard cells differing only in those axes collapse.

A cell's id is the first 12 hex digits of the SHA-256 of its resolved config as canonical JSON, without the purely
operational fields (`checkpoint_every`, `keep_checkpoints`, `performance.compile` and `.graph_attack`, `fork`): the same
cell gets the same id on every submission and machine, so a re-run finds its checkpoints and results. Equal ids
collapse (first one kept). Fields and sections added after ids were first handed out (`LATE_FIELDS`) enter the id
only when they differ from their defaults, so the cells of existing sweeps keep their ids (and with them their
checkpoints and results). The public pipeline's recipe (Nesterov, label smoothing, decay on conv/fc weights only,
warm-up from 0.1, the eps/N step floor) came later with defaults unlike the earlier behaviour: those fields
(`AS_BEFORE`) enter the id only where they change what the cell trains, so studies that keep the earlier recipe keep
their ids and the paper's cells, which take the pipeline's defaults, got new ids once.

No torch, no ray.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from orchestrator.axes import AXES, AXIS_TABLE, set_at
from orchestrator.spec import GridEntry, Spec, SpecError, workers_for
from orchestrator.spec_messages import format_validation_error
from workloads.config import ForkConfig, TrainConfig, attack_step_size

# Changing these does not change what a cell trains, so they stay out of its id. `fork` (where a run saves or
# starts from a fork point) is never dumped at all; it is named here too so that it could never enter an id.
OPERATIONAL_FIELDS = frozenset({"checkpoint_every", "keep_checkpoints", "fork"})
# Per section: operational fields inside it (torch.compile runs the same arithmetic as eager, up to rounding).
OPERATIONAL_SUBFIELDS: dict[str, frozenset[str]] = {"performance": frozenset({"compile", "graph_attack"})}
# Fields (dotted paths) that enter the id only when set away from their defaults: they came after the first ids.
# A new config field goes here, or every existing cell would get a new id and lose its checkpoints and results.
# The eval options' defaults (a separate attack per N, one random start) evaluate as before they existed.
LATE_FIELDS: tuple[str, ...] = ("performance", "data.augment", "eval.trajectory", "eval.restarts")
# Late fields whose defaults train differently from the code before them: the public pipeline's recipe
# (workloads.config cites each one's source). Each test says whether a config trains exactly as before the field
# existed (the field at its earlier behaviour, or without effect); there the field stays out of the id.
AS_BEFORE: dict[str, Callable[[TrainConfig], bool]] = {
    "recipe.nesterov": lambda c: not c.recipe.nesterov,
    "recipe.label_smoothing": lambda c: c.recipe.label_smoothing == 0,
    "recipe.weight_decay_on": lambda c: c.recipe.weight_decay_on == "all",
    # Unused without warm-up. With warm-up it always enters: the earlier ramp (from lr x 1e-3 / warmup_epochs, up
    # to the scaled LR whatever it was) is gone, so a warm-up cell trained before must not be resumed.
    "recipe.warmup_start_lr": lambda c: c.recipe.warmup_epochs == 0,
    # The rule only derives the step: where the resolved step is the one stored, the stored step (in the id) says it;
    # without an attack (standard training) there is no step.
    "attack.reach_eps": lambda c: (
        not c.attack.reach_eps or c.attack.steps == 0 or c.attack.step_size == c.attack.resolved_step_size
    ),
}
ID_HEX_DIGITS = 12


@dataclass(frozen=True)
class Cell:
    """One training run of the study, the one object a Tune trial receives: its grid coordinates, the resolved
    config the workload reads (workers, GPU use and checkpoint policy included), and the resources and failure
    policy only the orchestrator uses."""

    cell_id: str
    axes: dict[str, Any]  # the 7 grid axes after normalisation; norm keeps its '*'
    config: TrainConfig
    gpus_per_worker: int  # per worker when use_gpu (resources.gpus_per_worker), else unused
    cpus_per_worker: float
    max_failures: int  # Ray Train worker-group restarts
    placement_timeout_s: float  # how long an unplaceable worker group may wait for the cluster to grow

    @property
    def num_workers(self) -> int:
        return self.config.num_workers

    @property
    def use_gpu(self) -> bool:
        return self.config.use_gpu

    @property
    def gpus(self) -> int:
        """GPUs of the whole cell: num_workers x gpus_per_worker when use_gpu, else 0."""
        return self.num_workers * self.gpus_per_worker if self.use_gpu else 0

    @property
    def grad_accum_steps(self) -> int:
        return self.config.grad_accum_steps

    def worker_bundle(self) -> dict[str, float]:
        """The resources of one Train worker (one placement-group bundle)."""
        bundle = {"CPU": float(self.cpus_per_worker)}
        if self.use_gpu:
            bundle["GPU"] = float(self.gpus_per_worker)
        return bundle

    def with_data_url(self, url: str) -> Cell:
        """The same cell reading its data from `url` (a bundled dataset materialised in storage): the id and
        what it trains do not change, only where the bytes come from."""
        data = self.config.data.model_copy(update={"url": url})
        return replace(self, config=self.config.model_copy(update={"data": data}))

    def with_fork(self, fork: ForkConfig) -> Cell:
        """The same cell saving or starting from a fork point (`fork_twins`): operational, the id stays."""
        return replace(self, config=self.config.model_copy(update={"fork": fork}))

    def describe(self) -> str:
        return describe_axes(self.axes)


def describe_axes(axes: dict[str, Any]) -> str:
    """'clean_ratio=0.0 norm=bn* pgd_steps=30 ...' in canonical axis order, for messages and tables."""
    return " ".join(f"{axis}={axes[axis]}" for axis in AXES if axis in axes)


def bn_star_epochs(epochs: int) -> int:
    """BN* length for a run of `epochs`: the paper's 10 of 110 (Section 4.3), scaled, at least one epoch."""
    return max(1, round(epochs * 10 / 110))


def revisions(config: TrainConfig) -> list[str]:
    """Changes to what an unchanged config trains, for the cells they affect. They enter those cells' ids, so a
    sweep never resumes (or keeps the results of) a cell trained before the change; other cells keep their ids."""
    found = []
    if config.model.norm == "gn" and config.model.width != 1.0:
        found.append("gn-groups-scale-with-width")  # workloads.models.gn_groups_at_width
    return found


def cell_id(config: TrainConfig) -> str:
    """Stable id of a resolved config: sha256 of canonical JSON (sorted keys, compact), 12 hex digits."""
    exclude: dict[str, Any] = {name: True for name in OPERATIONAL_FIELDS}
    exclude |= {name: set(fields) for name, fields in OPERATIONAL_SUBFIELDS.items()}
    payload = config.model_dump(mode="json", exclude=exclude)
    defaults = _default_config(config).model_dump(mode="json", exclude=exclude)
    for path in LATE_FIELDS:
        *parents, leaf = path.split(".")
        mine, theirs = payload, defaults
        for name in parents:
            mine, theirs = mine[name], theirs[name]
        if mine.get(leaf) == theirs.get(leaf):
            mine.pop(leaf, None)
    for path, as_before in AS_BEFORE.items():
        if as_before(config):
            section, leaf = path.split(".")
            payload[section].pop(leaf)
    if changed := revisions(config):
        payload["revisions"] = changed
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:ID_HEX_DIGITS]


def _default_config(config: TrainConfig) -> TrainConfig:
    """A config with every field at its default (the data URL is required, so it is taken from `config`)."""
    return TrainConfig(data=type(config.data)(url=config.data.url))


@dataclass(frozen=True)
class Fork:
    """A BN* cell that can start from its BN twin's training state (the spec's `fork_bn_star`).

    BN* differs from BN only in the last `bn_star_epochs` epochs (Section 4.3, Table 2: running statistics in
    training for the last 10 of 110), and the loop's randomness is a function of the seed and epoch, so the two
    cells train bit for bit alike up to the switch epoch. The fork resumes from the twin's state there: the same
    result as training it from scratch, for the epochs after the switch only."""

    cell_id: str  # the BN* cell (the fork)
    parent: str  # its twin: the same resolved config without BN*
    epoch: int  # the switch epoch: the fork trains epochs epoch..end (0-based), the parent saves its state there


def fork_twins(cells: list[Cell]) -> tuple[dict[str, Fork], list[Cell]]:
    """The forks among `cells` (by the BN* cell's id) and the BN* cells that have no twin among them.

    A twin is the cell whose resolved config equals the BN* cell's with `model.bn_star_epochs` 0, compared as the
    cell id compares configs (operational fields aside): MBN* pairs with MBN the same way. A BN* cell whose BN* spans
    every epoch has nothing to share and counts as twinless."""
    ids = {cell.cell_id for cell in cells}
    forks: dict[str, Fork] = {}
    alone: list[Cell] = []
    for cell in cells:
        config = cell.config
        if not config.model.bn_star_epochs:
            continue
        parent = cell_id(without_bn_star(config))
        switch = config.recipe.epochs - config.model.bn_star_epochs
        if parent in ids and switch > 0:
            forks[cell.cell_id] = Fork(cell.cell_id, parent, switch)
        else:
            alone.append(cell)
    return forks, alone


def without_bn_star(config: TrainConfig) -> TrainConfig:
    """`config` with BN* off: a BN* cell's twin."""
    return config.model_copy(update={"model": config.model.model_copy(update={"bn_star_epochs": 0})})


def fork_mismatch(parent: TrainConfig, fork: TrainConfig) -> str | None:
    """Why `fork` cannot start from `parent`'s state: the first field (dotted path) in which they differ other than
    BN* and the operational fields, with both values; None where `parent` is `fork`'s twin."""
    if cell_id(parent) == cell_id(without_bn_star(fork)) and not parent.model.bn_star_epochs:
        return None
    exclude: dict[str, Any] = {name: True for name in OPERATIONAL_FIELDS}
    exclude |= {name: set(fields) for name, fields in OPERATIONAL_SUBFIELDS.items()}
    mine = _flat(without_bn_star(parent).model_dump(mode="json", exclude=exclude))
    theirs = _flat(without_bn_star(fork).model_dump(mode="json", exclude=exclude))
    for path in sorted(mine.keys() | theirs.keys()):
        if mine.get(path) != theirs.get(path):
            return f"{path} is {mine.get(path)!r} in the parent but {theirs.get(path)!r} in the fork"
    if parent.model.bn_star_epochs:
        return f"model.bn_star_epochs is {parent.model.bn_star_epochs} in the parent: a parent trains without BN*"
    return "their cell ids differ"


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def expand(spec: Spec) -> list[Cell]:
    """All cells of `spec` in grid order (entries, then the product in axis order), duplicates collapsed.

    Raises SpecError for grid-level problems (with the grid path) and for cells whose config is invalid
    (naming the cell's axis values).
    """
    spec.check()
    defaults = spec.default_axes()
    resolver = _Resolver(spec)
    cells: dict[str, Cell] = {}
    entries: list[GridEntry | None] = [*spec.grid_entries()] or [None]
    for entry in entries:
        listed = entry.axes() if entry is not None else {}
        values = [listed.get(axis, [defaults[axis]]) for axis in AXES]
        for combo in itertools.product(*values):
            cell = resolver.resolve(dict(zip(AXES, combo, strict=True)))
            cells.setdefault(cell.cell_id, cell)
    return list(cells.values())


def resolve_cell(spec: Spec, axes: dict[str, Any]) -> Cell:
    """The cell of `spec` with these axis values (every axis named), resolved as `expand` resolves it."""
    return _Resolver(spec).resolve(dict(axes))


class _Resolver:
    """Turns one combination of axis values into a Cell: the one place where derived values are computed."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.workload = spec.workload
        # Unchanged sections are passed as validated instances (pydantic does not revalidate them).
        self.base: dict[str, Any] = {
            "data": self.workload.data,
            "eval": self.workload.eval,
            "performance": self.workload.performance,
            "num_workers": 1,
            "use_gpu": spec.resources.use_gpu,
            "checkpoint_every": spec.checkpoint_every,
            "keep_checkpoints": spec.keep_checkpoints,
        }
        # The sections an axis writes into, as dicts to be completed per cell.
        self.sections: dict[str, dict[str, Any]] = {
            "model": self.workload.model.model_dump(),
            "attack": self.workload.attack.model_dump(),
            "training": self.workload.training.model_dump(),
            "recipe": self.workload.recipe.model_dump(),
        }

    def resolve(self, axes: dict[str, Any]) -> Cell:
        spec, workload = self.spec, self.workload
        if axes["strategy"] == "standard":
            # "0% adv + 100% clean" (Section 4.1): no attack, every clean image kept.
            axes = {**axes, "clean_ratio": 1.0, "pgd_steps": 0}
        axes["clean_ratio"] = float(axes["clean_ratio"])
        norm: str = axes["norm"]
        star = norm.endswith("*")
        steps: int = axes["pgd_steps"]
        step_size = workload.attack.step_size
        if steps > 0:
            # Appendix B.1, footnote 6; at least eps/N with reach_eps (the pipeline's adv_model.py, PGDAttacker).
            attack = workload.attack
            step_size = attack_step_size(steps, attack.eps, step_size, reach_eps=attack.reach_eps)
        num_workers = workers_for(
            axes["batch_size"], workload.recipe.per_worker_batch, spec.resources.max_workers_per_cell
        )
        data: dict[str, Any] = {
            **self.base,
            **{section: dict(values) for section, values in self.sections.items()},
        }
        for axis in AXIS_TABLE:  # each axis's value at its place in the config (orchestrator.axes)
            set_at(data, axis.config_path, axes[axis.name])
        # What some axes decide beyond their own field.
        data["model"]["norm"] = norm.rstrip("*")
        # Section 4.3 / Table 2: the last 10 of 110 epochs, scaled, unless the workload fixes it.
        data["model"]["bn_star_epochs"] = (
            (workload.model.bn_star_epochs or bn_star_epochs(workload.recipe.epochs)) if star else 0
        )
        data["attack"]["step_size"] = step_size
        data["num_workers"] = max(1, num_workers)
        try:
            config = TrainConfig.model_validate(data)
        except ValidationError as exc:
            raise SpecError(format_validation_error(exc, TrainConfig, prefix=f"cell {describe_axes(axes)}: ")) from None
        return Cell(
            cell_id=cell_id(config),
            axes=axes,
            config=config,
            gpus_per_worker=spec.resources.gpus_per_worker,
            cpus_per_worker=spec.resources.cpus_per_worker,
            max_failures=spec.max_failures,
            placement_timeout_s=spec.resources.placement_timeout_s,
        )
