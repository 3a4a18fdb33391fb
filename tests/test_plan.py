"""Planning: FLOP counter, the cost model's calibration to the paper, makespan simulation, feasibility."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.grid import expand
from orchestrator.packing import LARGEST_FIRST, simulate
from orchestrator.plan import (
    PAPER_GPU_HOURS,
    estimate_device_hours,
    eval_forwards_per_image,
    make_plan,
    plan_spec,
    resnet_macs,
)
from orchestrator.plan_output import format_plan, plan_to_json
from orchestrator.spec import Spec, SpecError, load_spec, parse_spec
from tests.test_spec import make_spec
from workloads.config import RESNET_STAGES, TrainConfig

PAPER = "name: paper\nworkload: {data: {url: s3://bucket/imagenet}}\n"
LIMIT_32 = "resources: {cluster_gpus: 128, max_workers_per_cell: 32}\n"
SWEEPS = Path(__file__).resolve().parent.parent / "sweeps"


def paper_spec(grid: dict[str, Any] | None = None, resources: str = "") -> Spec:
    text = PAPER + (f"grid: {json.dumps(grid)}\n" if grid else "") + resources
    return parse_spec(text, "paper.yaml")


def hours(config: TrainConfig) -> float:
    return estimate_device_hours(config)


# --- FLOP counter -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("depth", "gmacs"), [(18, 1.82), (34, 3.67), (50, 4.1), (101, 7.8), (152, 11.5)])
def test_resnet_macs_match_the_published_counts(depth: int, gmacs: float) -> None:
    assert resnet_macs(depth) / 1e9 == pytest.approx(gmacs, rel=0.02)


def test_macs_grow_with_depth_width_and_resolution() -> None:
    depths = sorted(RESNET_STAGES)
    macs = [resnet_macs(d) for d in depths]
    assert macs == sorted(macs) and len(set(macs)) == len(macs)
    assert resnet_macs(50, width=2.0) > 3.5 * resnet_macs(50)
    assert resnet_macs(50, image_size=448) == pytest.approx(4 * resnet_macs(50), rel=0.01)
    # The CPU stem keeps the full resolution: at 32 px the body costs what it costs behind the ImageNet stem
    # (/4) at 128 px; only the cheaper 3x3 stem conv differs.
    small, imagenet = (
        resnet_macs(18, stem="small", image_size=32),
        resnet_macs(18, stem="imagenet", image_size=128),
    )
    assert small < imagenet and small == pytest.approx(imagenet, rel=0.1)


# --- calibration and monotonicity -------------------------------------------------------------------------


def test_the_papers_cell_costs_6656_gpu_hours_and_52_hours_on_128_gpus() -> None:
    spec = paper_spec()
    (cell,) = expand(spec)
    assert (cell.config.model.depth, cell.config.attack.steps, cell.config.recipe.epochs) == (152, 30, 110)
    assert (cell.num_workers, cell.gpus, cell.grad_accum_steps) == (128, 128, 1)
    plan = plan_spec(spec, [cell])
    (p,) = plan.cells
    # Evaluation (PGD up to 2000 on 1000 images) adds well under 1%.
    assert p.gpu_hours == pytest.approx(PAPER_GPU_HOURS, rel=0.01)
    assert p.gpu_hours > PAPER_GPU_HOURS
    assert p.wall_hours == pytest.approx(52.0, rel=0.01)
    assert plan.makespan_hours == pytest.approx(p.wall_hours + spec.planning.sweep_overhead_s / 3600)
    assert plan.total_gpu_hours == pytest.approx(p.gpu_hours)


def test_start_up_overheads_enter_cost_and_makespan() -> None:
    """A cell holds its devices while it starts (planning.cell_overhead_s), and the sweep pays its own start
    once (planning.sweep_overhead_s): negligible for the paper's cell, most of a CPU smoke cell."""
    spec = paper_spec()
    (cell,) = expand(spec)
    lean = spec.model_copy(
        update={"planning": spec.planning.model_copy(update={"cell_overhead_s": 0.0, "sweep_overhead_s": 0.0})}
    )
    slow = spec.model_copy(
        update={"planning": spec.planning.model_copy(update={"cell_overhead_s": 3600.0, "sweep_overhead_s": 7200.0})}
    )
    base, padded = plan_spec(lean, [cell]), plan_spec(slow, [cell])
    assert padded.cells[0].gpu_hours == pytest.approx(base.cells[0].gpu_hours + cell.gpus)  # an hour on each GPU
    assert padded.cells[0].wall_hours == pytest.approx(base.cells[0].wall_hours + 1.0)
    assert padded.makespan_hours == pytest.approx(base.makespan_hours + 1.0 + 2.0)


def test_cost_is_monotone_in_depth() -> None:
    cells = expand(paper_spec({"depth": sorted(RESNET_STAGES)}))
    costs = [hours(c.config) for c in cells]
    assert costs == sorted(costs) and len(set(costs)) == len(costs)
    # ResNet-638 is about 4x ResNet-152 (Section 5's depth study).
    by_depth = {c.axes["depth"]: cost for c, cost in zip(cells, costs, strict=True)}
    assert 3.5 < by_depth[638] / by_depth[152] < 4.5


def test_cost_is_monotone_in_pgd_steps_and_clean_ratio() -> None:
    cells = expand(paper_spec({"pgd_steps": [5, 10, 20, 30]}))
    costs = [hours(c.config) for c in cells]
    assert costs == sorted(costs) and len(set(costs)) == 4
    # (2N + 3): PGD-5 costs 13/63 of PGD-30.
    assert costs[0] / costs[3] == pytest.approx(13 / 63, rel=0.01)
    ratios = expand(paper_spec({"clean_ratio": [0.0, 0.5, 1.0]}))
    clean_costs = [hours(c.config) for c in ratios]
    assert clean_costs == sorted(clean_costs) and clean_costs[2] / clean_costs[0] == pytest.approx(66 / 63, rel=0.01)


def test_standard_training_costs_three_forwards_per_image() -> None:
    standard, adversarial = expand(paper_spec({"strategy": ["standard", "mixture"]}))
    assert hours(standard.config) / hours(adversarial.config) == pytest.approx(3 / 63, rel=0.02)


def test_mbn_evaluates_both_branches_and_norm_is_otherwise_cost_neutral() -> None:
    bn, mbn, gn = (hours(c.config) for c in expand(paper_spec({"norm": ["bn", "mbn", "gn"]})))
    assert bn == gn and mbn > bn
    # The extra cost is one more evaluation: clean + sum over eval PGD-N of (2N + 1), on 1000 images.
    eval_forwards = 1000 * (1 + sum(2 * n + 1 for n in (10, 20, 100, 500, 2000)))
    train_forwards = 1_281_167 * 110 * 63
    assert (mbn - bn) / bn == pytest.approx(eval_forwards / (train_forwards + eval_forwards), rel=0.01)


def test_one_trajectory_costs_its_longest_attack_and_restarts_repeat_the_attacks() -> None:
    (cell,) = expand(paper_spec())
    separate = eval_forwards_per_image(cell.config)
    assert separate == 1 + sum(2 * n + 1 for n in (10, 20, 100, 500, 2000))

    def evaluated(**options: Any) -> float:
        return eval_forwards_per_image(
            cell.config.model_copy(update={"eval": cell.config.eval.model_copy(update=options)})
        )

    # One PGD-2000 attack read after each of the 5 N, instead of 2630 steps over 5 attacks.
    assert evaluated(trajectory=True) == 1 + 2 * 2000 + 5
    assert evaluated(restarts=3) == 1 + 3 * (separate - 1)  # the clean forward once
    assert evaluated(trajectory=True, restarts=2) == 1 + 2 * (2 * 2000 + 5)


def test_cost_scales_with_epochs_images_and_speed() -> None:
    spec = make_spec(grid={"depth": [18]})
    (cell,) = expand(spec)

    def cost(images: int = 1437, epochs: int = 3) -> float:
        planning = spec.planning.model_copy(update={"train_images": images})
        recipe = cell.config.recipe.model_copy(update={"epochs": epochs})
        return estimate_device_hours(cell.config.model_copy(update={"recipe": recipe}), planning)

    base = cost()
    # Training is linear in images and epochs; the fixed remainder is the final evaluation.
    assert cost(images=2 * 1437) - base == pytest.approx(cost(images=3 * 1437) - cost(images=2 * 1437))
    assert cost(epochs=6) - base == pytest.approx(cost(images=2 * 1437) - base)
    assert 0 < 2 * base - cost(images=2 * 1437) < base  # the eval share
    slower = spec.planning.model_copy(update={"relative_speed": spec.planning.relative_speed / 2})
    assert estimate_device_hours(cell.config, slower) == pytest.approx(2 * base)


# --- makespan ---------------------------------------------------------------------------------------------


def gang_spec(cluster_gpus: int, batches: list[int], seeds: list[int]) -> Spec:
    resources = f"resources: {{cluster_gpus: {cluster_gpus}, gpus_per_node: 8}}\n"
    # No start-up overheads: the cells' work is then independent of their width, which these tests rely on.
    text = (
        "name: gang\n"
        "workload: {data: {url: x}, model: {depth: 18}, recipe: {epochs: 1, per_worker_batch: 32}}\n"
        f"grid: {{batch_size: {batches}, seed: {seeds}}}\n{resources}"
        "planning: {cell_overhead_s: 0, sweep_overhead_s: 0}\n"
    )
    return parse_spec(text)


def test_makespan_of_gangs_reaches_the_lower_bound_where_largest_first_does_not() -> None:
    # Equal work per cell (cost does not depend on batch size), so wall time = H / GPUs.
    spec = gang_spec(4, [128, 64, 32], [0, 1])
    plan = plan_spec(spec)
    assert [p.gpus for p in plan.cells] == [4, 4, 2, 2, 1, 1]
    h = plan.cells[-1].wall_hours  # a 1-GPU cell: all of its work on one GPU
    assert [p.wall_hours for p in plan.cells] == pytest.approx([h / 4, h / 4, h / 2, h / 2, h, h])
    assert plan.lower_bound_hours == pytest.approx(6 * h / 4)  # 6 H of work on 4 GPUs
    # The longest cells first: both 1-GPU cells and one 2-GPU cell at once, the other 2-GPU cell when that one
    # ends, then the 4-GPU cells one after the other; no GPU idles until the end, so this is optimal.
    starts = sorted((p.gpus, p.start_hours) for p in plan.cells)
    assert [s for _, s in starts] == pytest.approx([0.0, 0.0, 0.0, h / 2, h, 5 * h / 4])
    assert plan.makespan_hours == pytest.approx(plan.lower_bound_hours)
    # The previous policy (most GPUs first) runs the 1-GPU cells last, side by side, for a whole H.
    old = make_plan(expand(spec), 4, 8, planning=spec.planning, policy=LARGEST_FIRST)
    assert old.makespan_hours == pytest.approx(2 * h)


def test_plan_replays_the_searchers_policy() -> None:
    # The plan's start times are what orchestrator.packing decides for the same cells and estimates.
    spec = paper_spec({"depth": [50, 152, 338], "pgd_steps": [5, 30], "batch_size": [512, 4096]}, LIMIT_32)
    plan = plan_spec(spec)
    starts = simulate([{"GPU": p.gpus} for p in plan.cells], [p.wall_hours for p in plan.cells], {"GPU": 128})
    assert [p.start_hours for p in plan.cells] == pytest.approx(starts)
    assert len({p.gpus for p in plan.cells}) > 1  # heterogeneous: 16 and 32 GPUs


def test_whole_cluster_cells_run_one_after_another_and_the_plan_says_so() -> None:
    # sweeps/ablation.yaml gives almost every cell all 128 GPUs: none of those can overlap any other cell, so
    # the best makespan is their summed wall time plus the longest of the other cells, well above total / 128.
    plan = plan_spec(load_spec(SWEEPS / "ablation.yaml"))
    whole = sum(p.wall_hours for p in plan.cells if p.gpus == 128)
    others = max(p.wall_hours for p in plan.cells if p.gpus < 128)
    assert plan.makespan_hours == pytest.approx(whole + others + plan.planning.sweep_overhead_s / 3600)
    assert plan.makespan_hours > 1.1 * plan.lower_bound_hours
    assert "cells too wide to share the cluster run one after another" in format_plan(plan)
    # A study whose cells take a quarter of the cluster at most is packed close to the lower bound.
    paper = plan_spec(load_spec(SWEEPS / "paper-study.yaml"))
    assert max(p.gpus for p in paper.cells) == 32 and len(paper.cells) == 49
    assert paper.makespan_hours <= 1.10 * paper.lower_bound_hours
    assert "too wide" not in format_plan(paper)


@pytest.mark.parametrize("cluster", [8, 128, 1000])
def test_makespan_is_at_least_the_lower_bound(cluster: int) -> None:
    grid = {"depth": [50, 152, 338], "pgd_steps": [5, 30], "batch_size": [256, 1024, 4096], "seed": [0, 1]}
    spec = paper_spec(grid, f"resources: {{cluster_gpus: {cluster}, max_workers_per_cell: 8}}\n")
    plan = plan_spec(spec)
    longest = max(p.wall_hours for p in plan.cells)
    start = plan.planning.sweep_overhead_s / 3600
    assert plan.lower_bound_hours == pytest.approx(max(plan.total_gpu_hours / cluster, longest) + start)
    assert plan.makespan_hours >= plan.lower_bound_hours * (1 - 1e-9)
    # Never two cells more than the cluster at once.
    events = sorted({p.start_hours for p in plan.cells})
    for t in events:
        in_use = sum(p.gpus for p in plan.cells if p.start_hours <= t < p.end_hours)
        assert in_use <= cluster


# --- feasibility ------------------------------------------------------------------------------------------


def test_cell_needing_more_gpus_than_the_cluster_is_an_error() -> None:
    spec = paper_spec({"batch_size": [2048, 8192]}, "resources: {cluster_gpus: 128, max_workers_per_cell: 256}\n")
    cells = expand(spec)
    with pytest.raises(SpecError) as info:
        make_plan(cells, spec.resources.cluster_gpus, spec.resources.gpus_per_node)
    message = info.value.message
    assert len(message.splitlines()) == 1
    assert "batch_size=8192" in message and "needs 256 GPUs (256 workers x 1 GPU)" in message
    assert "the cluster has 128 (resources.cluster_gpus)" in message


def test_worker_larger_than_a_node_is_an_error() -> None:
    spec = paper_spec(None, "resources: {gpus_per_worker: 16, gpus_per_node: 8, cluster_gpus: 4096}\n")
    with pytest.raises(SpecError, match=r"needs 16 GPUs per worker but resources.gpus_per_node is 8"):
        plan_spec(spec)


def test_cpu_spec_plans_in_worker_slots() -> None:
    spec = make_spec(grid={"batch_size": [32, 64]})
    plan = plan_spec(spec)  # cluster_cpus 4, cpus_per_worker 0.5 -> 8 worker slots
    assert plan.device == "CPU" and plan.capacity == 8 and plan.unit == "worker-hours"
    assert [(p.gpus, p.slots, p.num_workers) for p in plan.cells] == [(0, 1, 1), (0, 2, 2)]
    assert plan.total_gpu_hours == 0.0 and plan.total_device_hours > 0
    # Digits at 32 px for 3 epochs: minutes, not GPU-days.
    assert plan.total_device_hours < 1.0
    small = make_spec(grid={"batch_size": [32, 64]}, resources={"cpus_per_worker": 1, "cluster_cpus": 1})
    with pytest.raises(SpecError, match="needs 2 workers x 1 CPUs but the cluster has room for 1 workers"):
        plan_spec(small)


# --- output -----------------------------------------------------------------------------------------------


def test_format_and_json() -> None:
    spec = paper_spec({"depth": [50, 152], "norm": ["bn", "mbn*"]})
    plan = plan_spec(spec)
    text = format_plan(plan)
    assert all(p.cell_id in text for p in plan.cells)
    assert "est GPU-h" in text and "makespan on 128 GPUs" in text and "lower bound" in text
    data = json.loads(json.dumps(plan_to_json(plan)))
    assert data["num_cells"] == 4 and data["device"] == "GPU"
    assert data["total_gpu_hours"] == pytest.approx(sum(c["gpu_hours"] for c in data["cells"]))
    assert set(data["cells"][0]["axes"]) == {
        "clean_ratio",
        "norm",
        "pgd_steps",
        "depth",
        "batch_size",
        "strategy",
        "seed",
    }
    assert data["cells"][0]["gpus"] == 128 and data["makespan_hours"] >= data["lower_bound_hours"]


def test_ten_thousand_cells_expand_and_plan() -> None:
    grid = {
        "clean_ratio": [0.0, 0.2, 0.4, 0.6, 0.8],
        "norm": ["bn", "mbn", "gn", "bn*", "mbn*"],
        "pgd_steps": [5, 10, 20, 30],
        "depth": [50, 101, 152, 200, 338],
        "batch_size": [512, 1024, 2048, 4096],
        "seed": [0, 1, 2, 3, 4],
    }
    spec = paper_spec(grid)
    cells = expand(spec)
    assert len(cells) == 10_000 and len({c.cell_id for c in cells}) == 10_000
    plan = plan_spec(spec, cells)
    assert len(plan.cells) == 10_000
    assert plan.makespan_hours >= plan.lower_bound_hours
    assert len(format_plan(plan).splitlines()) > 10_000


# --- Input pipeline -----------------------------------------------------------------------------------------


def test_input_cost_of_the_papers_cell() -> None:
    from orchestrator.plan import DECODE_IMAGES_PER_CORE_SECOND, input_cpus_per_worker

    plan = plan_spec(paper_spec())
    (cell,) = plan.cells
    # 110 epochs of 1,281,167 images in 52 h: about 750 img/s over 128 GPUs (docs/design.md section 5).
    assert cell.images_per_second == pytest.approx(1_281_167 * 110 / (52 * 3600), rel=0.02)
    assert cell.input_cores == pytest.approx(cell.images_per_second / DECODE_IMAGES_PER_CORE_SECOND)
    assert cell.input_cpus_per_worker == 2 and input_cpus_per_worker(plan.cells) == 2
    assert plan.warnings and "resources.cpus_per_worker to 2" in plan.warnings[0]
    fed = plan_spec(paper_spec(resources="resources: {cpus_per_worker: 2}\n"))
    assert not [w for w in fed.warnings if "cpus_per_worker" in w]


def test_cheap_cells_need_more_input_cpus_and_the_plan_says_so() -> None:
    plan = plan_spec(
        paper_spec({"strategy": ["standard", "mixture"], "depth": [50]}, "resources: {cpus_per_worker: 2}\n")
    )
    by_strategy = {p.axes["strategy"]: p for p in plan.cells}
    clean, adversarial = by_strategy["standard"], by_strategy["mixture"]
    # Standard training costs 3 forward-equivalents per image against PGD-30's 63: 21x the images per GPU-second.
    assert clean.images_per_second / adversarial.images_per_second == pytest.approx(63 / 3, rel=0.05)
    assert adversarial.input_cpus_per_worker == 2 and clean.input_cpus_per_worker > 2
    text = format_plan(plan)
    assert "input CPUs/worker" in text and "warning: 1 of 2 cells" in text
    payload = plan_to_json(plan)
    assert payload["input_cpus_per_worker"] == clean.input_cpus_per_worker and payload["warnings"]
    assert payload["cells"][0]["images_per_second"] > 0


def test_cpu_specs_get_no_input_warning_nor_input_sizing() -> None:
    # A CPU worker trains far slower than it decodes (and the smoke sweep's digits are decoded already).
    spec = load_spec(SWEEPS / "smoke.yaml")
    plan = plan_spec(spec)
    assert not [w for w in plan.warnings if "cpus_per_worker" in w]
    text = format_plan(plan)
    assert "CPUs per worker to keep the GPUs fed" not in text
    assert all(line.endswith(" -") for line in text.splitlines()[2 : 2 + len(plan.cells)])


def test_the_plan_warns_of_evaluation_attacks_that_cannot_reach_eps() -> None:
    short = plan_spec(paper_spec(None, "")).warnings  # the paper's eval: PGD-10 at step 1 moves at most 10 < 16
    assert any("evaluation PGD-10 with step 1 cannot reach eps 16" in w for w in short)
    reaching = parse_spec(
        "name: paper\nworkload: {data: {url: s3://bucket/imagenet}, eval: {pgd_steps: [20, 100], step_size: 1}}\n"
    )
    assert not any("cannot reach eps" in w for w in plan_spec(reaching).warnings)
