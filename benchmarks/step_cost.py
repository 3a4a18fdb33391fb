"""Cost of one adversarial training step relative to a clean step, against the cost model's lower bound.

`python -m benchmarks.step_cost [--batch 32] [--repeats 7] [--threads 1]`

A training step is what `workloads.train.run` does per micro-batch: `adversarial_loss` (PGD-N on the bare
model, then one forward of the training batch), backward, optimizer step. The clean step is the same call with
strategy `standard`. The cost model (`orchestrator.plan`) counts a forward + backward as 3 forward-equivalents and
a PGD iteration (forward + input-gradient backward, no weight gradients) as 2, so at clean ratio 0 a PGD-N step
costs (2N + 3) / 3 clean steps. measured / bound above 1 is work the cost model does not count (the attack
loop's elementwise ops, its random start); below 1 means a PGD iteration costs less than 2 forwards (an input-only
backward skips the weight gradients) or the clean step carries fixed costs (optimizer step, loss) that the ratio
divides away. The last column solves ratio = (2N a + 3) / 3 for a, a PGD iteration's cost in forward-equivalents.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch

from benchmarks._common import (
    DEFAULT_THREADS,
    Check,
    format_table,
    interleave,
    load_average,
    median,
    paired_ratio,
    print_checks,
    set_torch_threads,
)
from workloads.bn_fold import FoldedForAttack
from workloads.config import AttackConfig, DataConfig, ModelConfig, RecipeConfig, TrainConfig, TrainingConfig
from workloads.data import synthetic_batch
from workloads.models import build_model
from workloads.train import adversarial_loss

NAME = "step_cost"
NUM_CLASSES = 10
PGD_STEPS = (1, 2, 5, 10)
GOAL = 1.15
MODEL = ModelConfig(depth=18, norm="bn", width=0.25, stem="small")


def config(steps: int | None, batch: int) -> TrainConfig:
    """A cell's config: PGD-`steps` mixture training at clean ratio 0, or `standard` when steps is None."""
    training = (
        TrainingConfig(strategy="standard") if steps is None else TrainingConfig(strategy="mixture", clean_ratio=0.0)
    )
    return TrainConfig(
        # adversarial_loss never reads data; the URL only has to validate.
        data=DataConfig(url="memory://unused"),
        model=MODEL,
        attack=AttackConfig(steps=steps or 0),
        training=training,
        recipe=RecipeConfig(batch_size=batch, per_worker_batch=batch),
    )


def bound(steps: int) -> float:
    """Forward-equivalents of a PGD-N step over those of a clean step (orchestrator.plan's cost model)."""
    return (2 * steps + 3) / 3


def run(batch: int = 32, repeats: int = 7, steps_per_sample: int = 2, threads: int = DEFAULT_THREADS) -> dict[str, Any]:
    threads = set_torch_threads(threads)
    torch.manual_seed(0)
    base = build_model(MODEL, NUM_CLASSES, in_channels=3)
    images, labels = synthetic_batch(batch, (3, 32, 32), NUM_CLASSES, seed=0)

    def make_case(steps: int | None) -> Callable[[], None]:
        # Each case trains its own copy, so one case's updates never change another's weights (and with them,
        # say, how often a ReLU is active); the cost of a step does not otherwise depend on the weights.
        cfg = config(steps, batch)
        model = copy.deepcopy(base)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.recipe.lr, momentum=cfg.recipe.momentum, weight_decay=cfg.recipe.weight_decay
        )
        generator = torch.Generator().manual_seed(0)
        folded = FoldedForAttack(model)  # what the training loop attacks (train.Models.attacked())

        def step() -> None:
            model.train()
            for _ in range(steps_per_sample):
                optimizer.zero_grad(set_to_none=True)
                attacked = folded.current() if cfg.training.strategy != "standard" else model
                loss, _ = adversarial_loss(cfg, model, attacked, images, labels, NUM_CLASSES, generator)
                loss.backward()
                float(loss.detach())  # run() reads the loss every step
                optimizer.step()

        return step

    cases = {"clean": make_case(None)} | {f"pgd-{n}": make_case(n) for n in PGD_STEPS}
    load_before = load_average()
    timings = interleave(cases, repeats, warmup=1)
    load_after = load_average()

    clean_seconds = median(timings["clean"].cpu) / steps_per_sample
    rows: dict[str, dict[str, float]] = {}
    checks = []
    for n in PGD_STEPS:
        t = timings[f"pgd-{n}"]
        ratio = paired_ratio(t.cpu, timings["clean"].cpu)
        wall_ratio = paired_ratio(t.wall, timings["clean"].wall)
        rows[f"pgd-{n}"] = {
            "steps": n,
            "seconds_per_step_cpu": median(t.cpu) / steps_per_sample,
            "ratio_cpu": ratio,
            "ratio_wall": wall_ratio,
            "bound": bound(n),
            "measured_over_bound": ratio / bound(n),
            # Solve ratio = (2N a + 3) / 3 for a: what one PGD iteration costs in forward-equivalents (model: 2).
            "pgd_iteration_forwards": 3 * (ratio - 1) / n,
        }
        checks.append(
            Check(
                NAME,
                f"PGD-{n} step / clean step, over (2N+3)/3 = {bound(n):.2f}",
                f"{ratio / bound(n):.3f} (ratio {ratio:.2f}, wall {wall_ratio:.2f})",
                f"<= {GOAL}",
                ratio / bound(n) <= GOAL,
            )
        )
    return {
        "name": NAME,
        "setup": {
            "model": MODEL.model_dump(),
            "batch": batch,
            "image_shape": [3, 32, 32],
            "strategy": "mixture, clean_ratio 0 (clean baseline: standard)",
            "repeats": repeats,
            "steps_per_sample": steps_per_sample,
            "torch_threads": threads,
            "load_average_before_after": [round(load_before, 2), round(load_after, 2)],
        },
        "clean_seconds_per_step_cpu": clean_seconds,
        "pgd": rows,
        "checks": checks,
    }


def print_result(result: dict[str, Any]) -> None:
    print(f"clean step: {result['clean_seconds_per_step_cpu'] * 1000:.0f} ms CPU")
    print(
        format_table(
            ["N", "ms/step (CPU)", "ratio", "bound", "measured/bound", "fwd-eq per PGD iter"],
            [
                [
                    r["steps"],
                    f"{r['seconds_per_step_cpu'] * 1000:.0f}",
                    f"{r['ratio_cpu']:.2f}",
                    f"{r['bound']:.2f}",
                    f"{r['measured_over_bound']:.3f}",
                    f"{r['pgd_iteration_forwards']:.2f}",
                ]
                for r in result["pgd"].values()
            ],
        )
    )
    print_checks(NAME, result["checks"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps-per-sample", type=int, default=2)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    args = parser.parse_args(argv)
    result = run(args.batch, args.repeats, args.steps_per_sample, args.threads)
    print_result(result)
    return result


if __name__ == "__main__":
    main()
