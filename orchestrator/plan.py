"""Planning: per-cell cost, total cost, makespan and feasibility, without Ray (docs/design.md section 3.3).

Cost model
----------
Calibration. The paper trains ResNet-152 with PGD-30 for 110 epochs of ImageNet (1,281,167 images, 224 px)
on 128 GPUs (Section 3), with the public pipeline of Xie et al. (2019b); such a run takes about 52 hours,
i.e. 52 x 128 = 6656 GPU-hours (the figure reported for that pipeline; the seed text gives no training time).
We assume that run is "100% adv + 0% clean" (clean_ratio 0), the paper's default for its depth and PGD-N
studies, and that evaluation is not part of the 52 hours.

Work of a cell, in multiply-accumulates (MACs):

    MACs(depth, width, stem, image_size)   analytic forward cost of the ResNet (`resnet_macs`, counted from
                                           `workloads.config.RESNET_STAGES`; ResNet-50 ~4.1 G, -152 ~11.5 G)
  x forward-equivalents per train image:   a training step (forward + backward) ~ 3 forwards; one PGD
                                           iteration (forward + input-gradient backward) ~ 2 forwards; so an
                                           adversarial image costs 2N + 3 and a kept clean one 3:
                                           2N + 3 + 3 x clean_ratio   (standard training: 3)
  x train_images x epochs
  + eval: eval.subset x (1 clean forward + sum over eval PGD-N of (2N + 1)), x 2 for MBN (both branches);
          with eval.trajectory one attack serves every N: 2 max(N) + one forward per N instead of the sum;
          the attacks (not the clean forward) x eval.restarts

GPU-hours = work x (6656 GPU-h / work of the paper's cell) / planning.relative_speed, plus the cell's start-up
(planning.cell_overhead_s) on each of its GPUs. A cell's wall time is its GPU-hours over its GPUs (perfect
data-parallel scaling; communication and input pipelines are not modelled, so read it as a lower estimate at very
large worker counts). Depth, PGD-N, clean ratio, epochs, dataset size and resolution enter through the formula; the
norm type (BN, MBN, GN, BN*) is cost-neutral.

CPU specs (use_gpu false): every worker is one slot, the cluster has floor(cluster_cpus / cpus_per_worker)
slots, and hours are worker-hours of a device `relative_speed` times as fast as one of the paper's GPUs (set
planning.relative_speed accordingly, e.g. ~0.01 for a CPU core on a small ResNet).

Makespan: planning.sweep_overhead_s (Ray's start, data conversion, the report) plus the driver's admission policy
(`orchestrator.packing`, the same code the Tune searcher in orchestrator/scheduler.py runs) replayed on a simulated
clock with the estimated wall times:
the widest cell that fits first while every pending cell is short next to the remaining work / GPUs; then the
longest first, a cell that does not fit getting a reservation at the earliest time enough GPUs free up, which
smaller cells may fill only if they end by then or leave it what it needs (EASY backfilling). It is never below
the lower bound max(total / cluster GPUs, longest cell), and within a few percent of it on the paper's study
(sweeps/paper-study.yaml on 64-256 GPUs: `python -m benchmarks.scheduler_sim`). The bound itself can be loose:
when most cells take the whole cluster (sweeps/ablation.yaml) no two of them overlap, and `--plan` also prints
`packing.exclusion_bound`, which the makespan then meets.

Input pipeline. A cell's GPUs consume train_images x epochs images over its estimated wall time; decoding and
augmenting them (workloads/augment.py, the paper's pipeline) costs CPU at DECODE_IMAGES_PER_CORE_SECOND per core
(measured by benchmarks/input_pipeline.py, docs/benchmarks.md). A worker needs that many decoding cores plus one
for its training loop (workloads.data.decode_processes uses a worker's CPUs less one); GPU specs whose
resources.cpus_per_worker is below that get a warning, and `input_cpus_per_worker` sizes a deployment.

Dataset size. train_images and image_size are read from the dataset when that is cheap and local: a built-in
dataset's counts are known (workloads.builtin_data), a local or file:// dataset's from its meta.json
(workloads.data). An s3:// dataset is not read (a plan needs no network), nor one not converted yet: the spec's
`planning` numbers stand in, and the plan says which it did.

No torch, no ray.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import fsspec

from orchestrator.grid import Cell, Fork, describe_axes, fork_twins
from orchestrator.packing import DEFAULT_POLICY, Policy, simulate
from orchestrator.spec import Planning, Spec, SpecError
from workloads import builtin_data
from workloads.config import RESNET_STAGES, TrainConfig

# Paper calibration point (Section 3): ResNet-152, PGD-30, 110 epochs of ImageNet, 128 GPUs, ~52 hours.
PAPER_DEPTH = 152
PAPER_PGD_STEPS = 30
PAPER_EPOCHS = 110
PAPER_GPUS = 128
PAPER_WALL_HOURS = 52.0
PAPER_GPU_HOURS = PAPER_GPUS * PAPER_WALL_HOURS  # 6656
IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_IMAGE_SIZE = 224
NUM_CLASSES = 1000  # the classifier head is < 0.1% of the MACs; its class count does not matter for planning

TRAIN_STEP_FORWARDS = 3.0  # forward + weight backward ~ 3 forwards
PGD_ITER_FORWARDS = 2.0  # forward + input-gradient backward (no weight gradients) ~ 2 forwards
EVAL_FORWARDS = 1.0  # the final forward that scores an image
# Images one CPU core decodes and augments per second with the paper's pipeline (ImageNet-sized JPEGs stored at
# <= 512 px, random-resized crop to 224, colour jitter, flip). benchmarks/input_pipeline.py measured 422 per
# CPU-second for the whole reader on this project's 2-core machine, 434 with the colour maps left to a GPU, and
# benchmarks/gpu_feed.py 285 on an H200 machine's 16 Xeon cores (docs/benchmarks.md); planning takes the low end
# of docs/design.md's 150-200 budget, headroom for larger source images, slower cores and the training process's work.
DECODE_IMAGES_PER_CORE_SECOND = 150.0


def _conv_out(size: int, stride: int) -> int:
    # 'same' padding (k // 2) as in workloads.models: ceil(size / stride).
    return (size + stride - 1) // stride


@lru_cache(maxsize=256)
def resnet_macs(
    depth: int,
    width: float = 1.0,
    stem: Literal["imagenet", "small"] = "imagenet",
    image_size: int = IMAGENET_IMAGE_SIZE,
    in_channels: int = 3,
    num_classes: int = NUM_CLASSES,
) -> float:
    """Forward multiply-accumulates of ResNet-`depth` (torchvision v1.5 layout, as workloads.models builds).

    Counts convolutions and the classifier; normalisation, activations and pooling are negligible.
    """
    block, layers = RESNET_STAGES[depth]
    planes = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
    expansion = 4 if block == "bottleneck" else 1
    if stem == "imagenet":  # 7x7/2 conv, then 3x3/2 max-pool
        size = _conv_out(image_size, 2)
        macs = 7 * 7 * in_channels * planes[0] * size * size
        size = _conv_out(size, 2)
    else:  # 3x3/1 conv, no pool
        size = image_size
        macs = 3 * 3 * in_channels * planes[0] * size * size
    c_in = planes[0]
    for stage, (p, blocks) in enumerate(zip(planes, layers, strict=True)):
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            out = _conv_out(size, stride)
            c_out = p * expansion
            if block == "bottleneck":
                macs += c_in * p * size * size  # 1x1 reduce (at input resolution)
                macs += 9 * p * p * out * out  # 3x3, carries the stride (v1.5)
                macs += p * c_out * out * out  # 1x1 expand
            else:
                macs += 9 * c_in * p * out * out + 9 * p * p * out * out
            if stride != 1 or c_in != c_out:
                macs += c_in * c_out * out * out  # 1x1 projection shortcut
            c_in, size = c_out, out
    return float(macs + c_in * num_classes)


def train_forwards_per_image(config: TrainConfig) -> float:
    """Forward-equivalents per training image and epoch: 2N + 3 + 3 x clean_ratio (standard training: 3)."""
    if config.training.strategy == "standard":
        return TRAIN_STEP_FORWARDS
    adversarial = PGD_ITER_FORWARDS * config.attack.steps + TRAIN_STEP_FORWARDS
    return adversarial + TRAIN_STEP_FORWARDS * config.training.clean_ratio


def eval_forwards_per_image(config: TrainConfig) -> float:
    """Forward-equivalents per eval image: a clean forward plus (2N + 1) per eval PGD-N, or with eval.trajectory
    2 max(N) for the one attack plus a forward per N; the attacks once per eval.restarts; MBN evaluates both
    branches (Table 1: MBN_adv and MBN_clean)."""
    steps = config.eval.pgd_steps
    attacked = max(steps, default=0) if config.eval.trajectory else sum(steps)
    attacks = PGD_ITER_FORWARDS * attacked + EVAL_FORWARDS * len(steps)
    per_branch = EVAL_FORWARDS + attacks * config.eval.restarts
    return per_branch * (2 if config.model.norm == "mbn" else 1)


def _paper_work() -> float:
    return (
        resnet_macs(PAPER_DEPTH)
        * (PGD_ITER_FORWARDS * PAPER_PGD_STEPS + TRAIN_STEP_FORWARDS)
        * IMAGENET_TRAIN_IMAGES
        * PAPER_EPOCHS
    )


# Device-hours per MAC of one of the paper's GPUs.
HOURS_PER_MAC = PAPER_GPU_HOURS / _paper_work()


def estimate_device_hours(config: TrainConfig, planning: Planning | None = None) -> float:
    """Estimated device-hours (GPU-hours, or worker-hours for CPU cells) of training plus final evaluation."""
    planning = planning or Planning()
    model = config.model
    macs = resnet_macs(model.depth, model.width, model.stem, planning.image_size)
    train = train_forwards_per_image(config) * planning.train_images * config.recipe.epochs
    evaluation = eval_forwards_per_image(config) * config.eval.subset
    return macs * (train + evaluation) * HOURS_PER_MAC / planning.relative_speed


def fork_saved_device_hours(config: TrainConfig, epochs: int, planning: Planning | None = None) -> float:
    """What a fork does not train (the spec's `fork_bn_star`): the `epochs` it takes from its parent's state."""
    planning = planning or Planning()
    model = config.model
    macs = resnet_macs(model.depth, model.width, model.stem, planning.image_size)
    train = train_forwards_per_image(config) * planning.train_images * epochs
    return macs * train * HOURS_PER_MAC / planning.relative_speed


@dataclass(frozen=True)
class DatasetSizes:
    """The dataset numbers the cost model uses, and where they come from (the plan prints it)."""

    train_images: int
    image_size: int
    read: bool  # counted from the dataset; False: the spec's planning numbers, a guess
    source: str  # what was read, or why the spec's numbers stand in
    warnings: tuple[str, ...] = ()


# The dataset format's metadata file (workloads.data.format.META_FILE; that package imports torch, a plan does not).
META_FILE = "meta.json"


@lru_cache(maxsize=16)
def _read_meta(path: str, mtime_ns: int, size: int) -> Mapping[str, Any]:
    """meta.json at local `path`, parsed once per version of the file (the replication rounds plan often)."""
    meta = json.loads(Path(path).read_bytes())
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    return meta


def _meta_sizes(meta: Mapping[str, Any]) -> tuple[dict[str, int], int]:
    """Images per split and the side the reader yields (image_shape [C, H, W]) from a dataset's meta.json."""
    splits = {str(name): int(split["num_images"]) for name, split in meta["splits"].items()}
    side = int(meta["image_shape"][1])
    if side < 1 or any(n < 1 for n in splits.values()):
        raise ValueError("image sizes and split counts must be positive")
    return splits, side


def dataset_sizes(spec: Spec) -> DatasetSizes:
    """train_images (of the spec's train split) and image_size (data.augment.size, else the stored side) of the
    spec's dataset when it can be counted without the network; otherwise the spec's planning numbers."""
    data, planning = spec.workload.data, spec.planning

    def guessed(why: str) -> DatasetSizes:
        return DatasetSizes(
            planning.train_images,
            planning.image_size,
            read=False,
            source=f"guessed from the spec's planning section: {why}",
        )

    if builtin_data.is_builtin(data.url):
        dataset = builtin_data.lookup(data.url)
        splits, side = dict(dataset.split_images), dataset.image_size
        where = f"known: {data.url} converts to fixed splits (workloads.builtin_data)"
    elif fsspec.utils.get_protocol(data.url) in ("file", "local"):
        from workloads.fs import open_fs

        path = f"{open_fs(data.url)[1].rstrip('/')}/{META_FILE}"
        try:
            stat = os.stat(path)
            splits, side = _meta_sizes(_read_meta(path, stat.st_mtime_ns, stat.st_size))
        except FileNotFoundError:
            return guessed(f"no {META_FILE} at {data.url} (not converted yet?)")
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
            return guessed(f"{path} is unreadable ({type(err).__name__})")
        where = f"read from {path}"
    else:
        return guessed(f"{data.url} is not read for a plan (remote storage)")
    if data.train_split not in splits:
        return guessed(f"{data.url} has no split {data.train_split!r}")
    train_images, image_size = splits[data.train_split], data.augment.size or side
    # A spec that states other numbers was written for another dataset, or before this one was converted.
    stated = {"train_images": train_images, "image_size": image_size}
    differ = tuple(
        f"planning.{field} is {getattr(planning, field):,} but the dataset's is {value:,} ({where}); "
        "the plan uses the dataset's"
        for field, value in stated.items()
        if field in planning.model_fields_set and getattr(planning, field) != value
    )
    return DatasetSizes(train_images, image_size, read=True, source=where, warnings=differ)


@dataclass(frozen=True)
class CellPlan:
    cell_id: str
    axes: dict[str, Any]
    num_workers: int
    grad_accum_steps: int
    gpus: int
    slots: int  # what the scheduler counts: GPUs, or workers for a CPU spec
    device_hours: float  # GPU-hours, or worker-hours for a CPU spec
    wall_hours: float
    start_hours: float  # in the makespan simulation
    end_hours: float
    images_per_second: float = 0.0  # what the cell's devices consume, all workers together
    cpus_per_worker: float = 1.0  # what the spec gives each worker

    @property
    def gpu_hours(self) -> float:
        return self.device_hours if self.gpus else 0.0

    @property
    def input_cores(self) -> float:
        """CPU cores the cell's input pipeline needs at the measured per-core rate, all workers together."""
        return self.images_per_second / DECODE_IMAGES_PER_CORE_SECOND

    @property
    def input_cpus_per_worker(self) -> int:
        """CPUs one worker needs: its decoding cores (rounded up) plus one for its training loop."""
        return math.ceil(self.input_cores / self.num_workers - 1e-9) + 1


@dataclass(frozen=True)
class ForkPlan:
    """A BN* cell that starts from its BN twin's state (orchestrator.grid.Fork) and the device-hours that saves."""

    cell_id: str
    parent: str
    epoch: int  # the epochs it takes from the parent
    saved_device_hours: float


@dataclass(frozen=True)
class Plan:
    device: Literal["GPU", "CPU"]
    capacity: int  # cluster GPUs, or worker slots for a CPU spec
    gpus_per_node: int
    cells: tuple[CellPlan, ...]  # in expansion order
    total_device_hours: float
    makespan_hours: float
    lower_bound_hours: float
    planning: Planning
    warnings: tuple[str, ...] = ()
    dataset: DatasetSizes | None = None  # where planning's train_images and image_size came from
    # With the spec's fork_bn_star: the forks (their cells' device_hours are already without the epochs they take
    # from their parents, and they start after the other cells), and the BN* cells with no twin to fork from.
    forks: tuple[ForkPlan, ...] = ()
    twinless: tuple[str, ...] = ()

    @property
    def fork_saved_device_hours(self) -> float:
        return sum(fork.saved_device_hours for fork in self.forks)

    @property
    def total_gpu_hours(self) -> float:
        return self.total_device_hours if self.device == "GPU" else 0.0

    @property
    def unit(self) -> str:
        return "GPU-hours" if self.device == "GPU" else "worker-hours"


def _infeasible(cell: Cell, needed: str, limit: str, fix: str) -> str:
    return f"cell {cell.cell_id} ({describe_axes(cell.axes)}): needs {needed} but {limit}; {fix}"


def _check_feasible(cells: Sequence[Cell], device: str, capacity: int, gpus_per_node: int) -> None:
    problems: list[str] = []
    for cell in cells:
        if device == "GPU":
            if cell.gpus_per_worker > gpus_per_node:
                problems.append(
                    _infeasible(
                        cell,
                        f"{cell.gpus_per_worker} GPUs per worker",
                        f"resources.gpus_per_node is {gpus_per_node}",
                        "a worker must fit on one node; lower resources.gpus_per_worker",
                    )
                )
            elif cell.gpus > capacity:
                problems.append(
                    _infeasible(
                        cell,
                        f"{cell.gpus} GPUs ({cell.num_workers} workers x {cell.gpus_per_worker} GPU)",
                        f"the cluster has {capacity} (resources.cluster_gpus)",
                        "lower batch_size or resources.max_workers_per_cell (the rest becomes gradient accumulation)",
                    )
                )
        elif cell.num_workers > capacity:
            problems.append(
                _infeasible(
                    cell,
                    f"{cell.num_workers} workers x {cell.cpus_per_worker:g} CPUs",
                    f"the cluster has room for {capacity} workers (resources.cluster_cpus / cpus_per_worker)",
                    "lower resources.max_workers_per_cell or resources.cpus_per_worker",
                )
            )
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more cells"] if len(problems) > 10 else [])
        raise SpecError("\n".join(shown))


def make_plan(
    cells: Sequence[Cell],
    cluster_gpus: int,
    gpus_per_node: int,
    *,
    cluster_cpus: int | None = None,
    planning: Planning | None = None,
    policy: Policy = DEFAULT_POLICY,
    dataset: DatasetSizes | None = None,
    forks: Mapping[str, Fork] | None = None,
    twinless: Sequence[str] = (),
) -> Plan:
    """Cost, makespan and feasibility of `cells` on `cluster_gpus` GPUs in nodes of `gpus_per_node`.

    CPU cells (gpus == 0) are planned on `cluster_cpus` (default: this machine's CPU count) in worker slots.
    `policy` is the admission policy the makespan simulates (`orchestrator.packing`; the default is the driver's).
    `dataset`, when given, replaces planning's train_images and image_size (`dataset_sizes`).
    `forks` (by cell id, orchestrator.grid.fork_twins): those cells cost their epochs after the fork only and run
    in a second round, after every other cell, as the driver runs them; `twinless` names BN* cells without a twin.
    Raises SpecError, naming the cell's axes and the numbers, if a cell can never be placed.
    """
    planning = planning or Planning()
    if dataset is not None:
        planning = planning.model_copy(update={"train_images": dataset.train_images, "image_size": dataset.image_size})
    device: Literal["GPU", "CPU"] = "GPU" if any(cell.gpus for cell in cells) else "CPU"
    if device == "GPU":
        capacity = cluster_gpus
    else:
        cpus = cluster_cpus if cluster_cpus is not None else (os.cpu_count() or 1)
        per_worker = max((cell.cpus_per_worker for cell in cells), default=1.0)
        capacity = max(0, int(cpus / per_worker + 1e-9))
    _check_feasible(cells, device, capacity, gpus_per_node)

    forks = {cid: fork for cid, fork in (forks or {}).items() if cid in {cell.cell_id for cell in cells}}
    costs: list[tuple[int, float, float]] = []  # (slots, device_hours, wall_hours)
    fork_plans: list[ForkPlan] = []
    overhead = planning.cell_overhead_s / 3600
    for cell in cells:
        slots = cell.gpus if device == "GPU" else cell.num_workers
        # The devices are held through the cell's start-up too: its overhead costs device-hours on every slot.
        hours = estimate_device_hours(cell.config, planning) + overhead * slots
        fork = forks.get(cell.cell_id)
        if fork is not None:
            saved = fork_saved_device_hours(cell.config, fork.epoch, planning)
            fork_plans.append(ForkPlan(cell.cell_id, fork.parent, fork.epoch, saved))
            hours -= saved
        costs.append((slots, hours, hours / slots))
    # The driver's policy on a simulated clock; the scheduler counts one resource here (GPUs, or worker slots).
    # Forks are a second round that starts when the first has ended (orchestrator.sweep).
    starts = [0.0] * len(cells)
    round_start = 0.0
    for in_round in (False, True):
        jobs = [i for i, cell in enumerate(cells) if (cell.cell_id in forks) == in_round]
        round_starts = simulate(
            [{"slots": costs[i][0]} for i in jobs], [costs[i][2] for i in jobs], {"slots": capacity}, policy
        )
        for i, start in zip(jobs, round_starts, strict=True):
            starts[i] = round_start + start
        round_start = max((starts[i] + costs[i][2] for i in jobs), default=round_start)

    plans = tuple(
        CellPlan(
            cell_id=cell.cell_id,
            axes=cell.axes,
            num_workers=cell.num_workers,
            grad_accum_steps=cell.grad_accum_steps,
            gpus=cell.gpus,
            slots=slots,
            device_hours=hours,
            wall_hours=wall,
            start_hours=starts[i],
            end_hours=starts[i] + wall,
            images_per_second=planning.train_images * cell.config.recipe.epochs / (wall * 3600) if wall else 0.0,
            cpus_per_worker=cell.cpus_per_worker,
        )
        for i, (cell, (slots, hours, wall)) in enumerate(zip(cells, costs, strict=True))
    )
    total = sum(hours for _, hours, _ in costs)
    longest = max((wall for _, _, wall in costs), default=0.0)
    return Plan(
        device=device,
        capacity=capacity,
        gpus_per_node=gpus_per_node,
        cells=plans,
        total_device_hours=total,
        makespan_hours=max((p.end_hours for p in plans), default=0.0) + planning.sweep_overhead_s / 3600,
        lower_bound_hours=max(total / capacity if capacity else 0.0, longest) + planning.sweep_overhead_s / 3600,
        planning=planning,
        warnings=(dataset.warnings if dataset else ())
        + (_input_warnings(plans) if device == "GPU" else ())
        + _reach_warnings(cells),
        dataset=dataset,
        forks=tuple(fork_plans),
        twinless=tuple(twinless),
    )


def _reach_warnings(cells: Sequence[Cell]) -> tuple[str, ...]:
    """Evaluation attacks that cannot reach eps (N x step < eps): their accuracy measures a weaker attack than
    the eps the table names, and PGD-k curves flatten for that reason, not because the attack converged."""
    short: dict[tuple[float, float], set[int]] = {}
    for cell in cells:
        evaluation = cell.config.eval
        if evaluation.unreachable_steps():
            short.setdefault((evaluation.eps, evaluation.step_size), set()).update(evaluation.unreachable_steps())
    return tuple(
        f"evaluation PGD-{', PGD-'.join(str(n) for n in sorted(steps))} with step {step:g} cannot reach eps {eps:g} "
        f"(N x step < eps); their accuracies measure a weaker attack (workload.eval.step_size or pgd_steps)"
        for (eps, step), steps in sorted(short.items())
    )


def _input_warnings(plans: Sequence[CellPlan]) -> tuple[str, ...]:
    """GPU cells whose workers get fewer CPUs than their input pipeline needs: their GPUs would wait on data."""
    starved = [p for p in plans if p.cpus_per_worker + 1e-9 < p.input_cpus_per_worker]
    if not starved:
        return ()
    worst = max(starved, key=lambda p: p.input_cpus_per_worker / p.cpus_per_worker)
    return (
        f"{len(starved)} of {len(plans)} cells need more CPUs per worker than resources.cpus_per_worker "
        f"({worst.cpus_per_worker:g}) to decode their images: cell {worst.cell_id} ({describe_axes(worst.axes)}) "
        f"consumes {worst.images_per_second:,.0f} img/s, {worst.input_cores:.1f} cores at "
        f"{DECODE_IMAGES_PER_CORE_SECOND:g} img/s per core, {worst.input_cpus_per_worker} CPUs per worker with its "
        f"training loop; set resources.cpus_per_worker to {input_cpus_per_worker(plans)} (the GPUs would wait on "
        "data otherwise)",
    )


def input_cpus_per_worker(plans: Sequence[CellPlan]) -> int:
    """CPUs per worker that let every cell's input pipeline keep up with its GPUs (decoding cores + 1): what a
    deployment should give each GPU worker (orchestrator.deploy sizes its worker groups with it)."""
    return max((p.input_cpus_per_worker for p in plans), default=1)


def plan_spec(spec: Spec, cells: Sequence[Cell] | None = None) -> Plan:
    """`make_plan` with the cluster and cost-model inputs of `spec` (expanding it unless `cells` is given)."""
    if cells is None:
        from orchestrator.grid import expand

        cells = expand(spec)
    forks: dict[str, Fork] = {}
    twinless: list[str] = []
    if spec.fork_bn_star:
        forks, alone = fork_twins(list(cells))
        twinless = [cell.cell_id for cell in alone]
    r = spec.resources
    return make_plan(
        cells,
        r.cluster_gpus,
        r.gpus_per_node,
        cluster_cpus=r.cluster_cpus,
        planning=spec.planning,
        dataset=dataset_sizes(spec),
        forks=forks,
        twinless=twinless,
    )
