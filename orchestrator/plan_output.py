"""`--plan`'s two forms of a Plan (orchestrator.plan): the text a researcher reads, and the JSON a tool reads."""

from __future__ import annotations

from typing import Any

from orchestrator.axes import AXES
from orchestrator.packing import exclusion_bound
from orchestrator.plan import (
    DECODE_IMAGES_PER_CORE_SECOND,
    PAPER_DEPTH,
    PAPER_EPOCHS,
    PAPER_GPUS,
    PAPER_PGD_STEPS,
    PAPER_WALL_HOURS,
    Plan,
    input_cpus_per_worker,
)


def _hours(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.1f}"
    if value >= 0.01:
        return f"{value:.2f}"
    return f"{value:.1e}" if value else "0"


def _readable(hours: float) -> str:
    """'52 h', or minutes/seconds for short runs (the smoke spec), or days for long ones."""
    if hours >= 48:
        return f"{_hours(hours)} h = {hours / 24:,.1f} days"
    if hours >= 1:
        return f"{_hours(hours)} h"
    if hours * 60 >= 1:
        return f"{_hours(hours)} h = {hours * 60:.1f} min"
    return f"{_hours(hours)} h = {hours * 3600:.1f} s"


def format_plan(plan: Plan) -> str:
    """The cell table and totals for `--plan`."""
    dev = "GPU" if plan.device == "GPU" else "worker"
    headers = ["cell", *AXES, "workers", "accum", "GPUs", f"est {dev}-h", "est wall-h", "img/s", "input CPUs/worker"]
    rows = [
        [
            p.cell_id,
            *(str(p.axes[axis]) for axis in AXES),
            str(p.num_workers),
            str(p.grad_accum_steps),
            str(p.gpus),
            _hours(p.device_hours),
            _hours(p.wall_hours),
            f"{p.images_per_second:,.0f}",
            str(p.input_cpus_per_worker) if plan.device == "GPU" else "-",
        ]
        for p in plan.cells
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    numeric = set(range(len(AXES) + 1, len(headers))) | {
        1 + AXES.index(a) for a in ("clean_ratio", "pgd_steps", "depth", "batch_size", "seed")
    }

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    where = (
        f"{plan.capacity} GPUs ({plan.gpus_per_node} per node)"
        if plan.device == "GPU"
        else f"{plan.capacity} CPU worker slots"
    )
    out = [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows), ""]
    out.append(f"cells: {len(plan.cells)}")
    out.append(f"total: {_hours(plan.total_device_hours)} {plan.unit} (estimated)")
    out.append(f"makespan on {where}: {_readable(plan.makespan_hours)}")
    out.append(f"lower bound: {_readable(plan.lower_bound_hours)} (max(total / {plan.capacity}, longest cell))")
    exclusive = exclusion_bound([p.slots for p in plan.cells], [p.wall_hours for p in plan.cells], plan.capacity)
    if exclusive > plan.lower_bound_hours * 1.001:
        out.append(f"  and at least {_readable(exclusive)}: cells too wide to share the cluster run one after another")
    out.append(
        f"cost model: calibrated to ResNet-{PAPER_DEPTH} PGD-{PAPER_PGD_STEPS}, {PAPER_EPOCHS} epochs of "
        f"ImageNet on {PAPER_GPUS} GPUs in {PAPER_WALL_HOURS:g} h (Section 3); "
        f"{plan.planning.train_images:,} train images at {plan.planning.image_size} px, "
        f"relative speed {plan.planning.relative_speed:g}"
    )
    if plan.dataset is not None:
        out.append(f"dataset size: {plan.dataset.source}")
    if plan.device == "GPU":  # a CPU worker's own training is far slower than its decoding: nothing to size
        out.append(
            f"input: {DECODE_IMAGES_PER_CORE_SECOND:g} images per CPU core per second (decode + the paper's "
            f"augmentation, docs/benchmarks.md); CPUs per worker to keep the GPUs fed: "
            f"{input_cpus_per_worker(plan.cells)}"
        )
    if plan.forks:
        out.append(
            f"forks: {len(plan.forks)} BN* cells start from their BN twins' state at the switch epoch, after the "
            f"other cells: {_hours(plan.fork_saved_device_hours)} {plan.unit} saved (already left out of the total)"
        )
    if plan.twinless:
        out.append(
            f"forks: {len(plan.twinless)} BN* cells have no BN twin in the grid (or use BN* from the first epoch) "
            f"and train from scratch: {', '.join(plan.twinless)}"
        )
    out += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(out)


def plan_to_json(plan: Plan) -> dict[str, Any]:
    """`--plan --json`: the same content as `format_plan`, json.dumps-able."""
    return {
        "device": plan.device,
        "unit": plan.unit,
        "capacity": plan.capacity,
        "gpus_per_node": plan.gpus_per_node,
        "num_cells": len(plan.cells),
        "total_device_hours": plan.total_device_hours,
        "total_gpu_hours": plan.total_gpu_hours,
        "makespan_hours": plan.makespan_hours,
        "lower_bound_hours": plan.lower_bound_hours,
        "planning": plan.planning.model_dump(mode="json"),
        # Whether planning's train_images and image_size were read from the dataset or are the spec's guess.
        "dataset": None if plan.dataset is None else {"read": plan.dataset.read, "source": plan.dataset.source},
        "decode_images_per_core_second": DECODE_IMAGES_PER_CORE_SECOND,
        # Sized for GPU workers only, as the table shows: a CPU worker trains far slower than it decodes.
        "input_cpus_per_worker": input_cpus_per_worker(plan.cells) if plan.device == "GPU" else None,
        "warnings": list(plan.warnings),
        # fork_bn_star: what the forks save (left out of total_device_hours) and the BN* cells that train from scratch.
        "fork_saved_device_hours": plan.fork_saved_device_hours,
        "forks": [
            {"cell_id": f.cell_id, "parent": f.parent, "epoch": f.epoch, "saved_device_hours": f.saved_device_hours}
            for f in plan.forks
        ],
        "twinless_bn_star_cells": list(plan.twinless),
        "cells": [
            {
                "cell_id": p.cell_id,
                "axes": dict(p.axes),
                "num_workers": p.num_workers,
                "grad_accum_steps": p.grad_accum_steps,
                "gpus": p.gpus,
                "slots": p.slots,
                "device_hours": p.device_hours,
                "gpu_hours": p.gpu_hours,
                "wall_hours": p.wall_hours,
                "start_hours": p.start_hours,
                "end_hours": p.end_hours,
                "images_per_second": p.images_per_second,
                "input_cores": p.input_cores,
                "input_cpus_per_worker": p.input_cpus_per_worker if plan.device == "GPU" else None,
            }
            for p in plan.cells
        ],
    }
