"""Our targeted PGD (workloads.attacks.pgd) against torchattacks 3.5.1's PGD on the same model and batch.

`python -m benchmarks.pgd_vs_torchattacks [--batch 64] [--repeats 5] [--threads 1]`

Setup: ResNet-18, small stem, width 0.25, 10 classes, 3x32x32, eval mode, briefly trained on the synthetic
prototype data (`workloads.data.synthetic_batch`) so that clean and robust accuracy are far from 0 and 1 and can
tell the two attacks apart. Attack: L-inf eps 16/255, step 2/255 (the paper's PGD-10 step, Appendix B.1), 10
steps, random start in both. Both attacks are *targeted*, at the same target per image: torchattacks'
`set_mode_targeted_by_label` takes the targets in place of the labels and descends the cross-entropy to them, as
ours does. The random starts differ (ours: `torch.rand` from a seeded generator, theirs: `uniform_` from the
global RNG), so robust accuracies agree only within noise; a second, deterministic run with the random start
switched off in both (ours: `clean_start_prob=1`, theirs: `random_start=False`) must give the same adversarial
images up to float rounding and the same accuracies.

What the two do, step by step: torchattacks' `Attack.__call__` puts the model in eval mode and restores train
mode afterwards (as ours does); both take the input gradient with `torch.autograd.grad` (no weight .grad), take
the sign, step, and project onto the eps-box and [0, 1]. The op profile below shows the same number of
convolutions, convolution backwards and BN calls in both: the model's forward and input-gradient backward are
almost all of the time, so neither loop can be much faster than the other, except by running a cheaper model:
ours attacks the BN-folded copy the product attacks (`workloads.bn_fold.FoldedForAttack`, refreshed before every
attack as the training loop does), the same function with fewer layers. Rows marked "proposal" time changes that
are not product code (channels-last layout on the CPU), to size what a change could gain.
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._common import (
    DEFAULT_THREADS,
    Check,
    Timings,
    interleave,
    load_average,
    median,
    paired_ratio,
    print_checks,
    set_torch_threads,
)
from workloads.attacks import pgd, random_targets
from workloads.bn_fold import FoldedForAttack, fold_batch_norms
from workloads.config import ModelConfig
from workloads.data import synthetic_batch
from workloads.models import ResNet, build_model

NAME = "pgd_vs_torchattacks"
NUM_CLASSES = 10
EPS = 16.0  # 0-255 scale, as workloads.attacks takes it
STEP = 2.0
STEPS = 10
GOAL_SPEEDUP = 1.2
MODEL = ModelConfig(depth=18, norm="bn", width=0.25, stem="small")


def trained_model(train_images: int = 512, epochs: int = 2, seed: int = 0) -> ResNet:
    """A model a few SGD steps into training: an untrained one is at chance, where every attack 'agrees'."""
    torch.manual_seed(seed)
    model = build_model(MODEL, NUM_CLASSES, in_channels=3)
    images, labels = synthetic_batch(train_images, (3, 32, 32), NUM_CLASSES, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for start in range(0, train_images, 64):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(images[start : start + 64]), labels[start : start + 64]).backward()
            optimizer.step()
    return model.eval()


def channels_last(model: nn.Module) -> nn.Module:
    """Proposal, not product code: a copy with its convolution weights in channels-last (NHWC) layout.

    oneDNN's CPU convolutions work in NHWC; with NCHW tensors every convolution and its backward reorders.
    (`Module.to(memory_format=...)` does the same, but its type stubs do not declare the argument.)
    """
    out = copy.deepcopy(model)
    for param in out.parameters():
        if param.dim() == 4:
            param.data = param.data.contiguous(memory_format=torch.channels_last)
    return out


def op_profile(fn: Callable[[], Any]) -> dict[str, float]:
    """Call counts and self-CPU shares of one call: where an attack's time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0

    def share(pred: Callable[[str], bool]) -> float:
        return sum(e.self_cpu_time_total for e in events if pred(e.key)) / total

    def calls(key: str) -> int:
        return sum(e.count for e in events if e.key == key)

    return {
        "conv_calls": calls("aten::convolution"),
        "conv_backward_calls": calls("aten::convolution_backward"),
        "batch_norm_calls": calls("aten::native_batch_norm"),
        "batch_norm_backward_calls": calls("aten::native_batch_norm_backward"),
        "conv_share": share(lambda k: "convolution" in k),
        "batch_norm_share": share(lambda k: "batch_norm" in k),
    }


def _accuracy(model: nn.Module, adv: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        pred = model(adv).argmax(1)
    return float((pred == labels).float().mean()), float((pred == targets).float().mean())


def run(batch: int = 64, repeats: int = 5, threads: int = DEFAULT_THREADS, proposals: bool = True) -> dict[str, Any]:
    import torchattacks  # installed without torchvision: only its attacks are used

    threads = set_torch_threads(threads)
    model = trained_model()
    # The attacked batch is held out from the training images (another seed would change the prototypes).
    pool, pool_labels = synthetic_batch(512 + batch, (3, 32, 32), NUM_CLASSES, seed=0)
    images, labels = pool[512:], pool_labels[512:]
    targets = random_targets(labels, NUM_CLASSES, torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(2)

    attack = torchattacks.PGD(model, eps=EPS / 255, alpha=STEP / 255, steps=STEPS, random_start=True)
    attack.set_mode_targeted_by_label(quiet=True)

    product_view = FoldedForAttack(model)

    def ours(net: nn.Module | None = None, x: torch.Tensor = images) -> torch.Tensor:
        return pgd(
            net if net is not None else product_view.current(),
            x,
            labels,
            num_classes=NUM_CLASSES,
            steps=STEPS,
            eps=EPS,
            step_size=STEP,
            targets=targets,
            generator=generator,
        )

    cases: dict[str, Callable[[], Any]] = {"ours": ours, "torchattacks": lambda: attack(images, targets)}
    if proposals:
        folded_cl = channels_last(fold_batch_norms(model))
        images_cl = images.contiguous(memory_format=torch.channels_last)
        cases["proposal: channels_last"] = lambda: ours(folded_cl, images_cl)
    with torch.no_grad():
        fold_error = float((product_view.current()(images) - model(images)).abs().max())

    accuracies: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}

    def record(name: str, adv: torch.Tensor) -> None:
        accuracies[name].append(_accuracy(model, adv, labels, targets))

    load_before = load_average()
    timings = interleave(cases, repeats, warmup=1, on_result=record)
    load_after = load_average()

    # Deterministic cross-check: no random start in either, so both walk the same path up to rounding. Our attack
    # runs on a BN-folded copy of the model, whose logits differ from the unfolded one by ~1e-7; where a pixel's
    # gradient is ~0 that can flip sign(grad) and move the pixel by one step. The attack is the same when the
    # robust accuracy is identical.
    adv_ours = pgd(
        product_view.current(),
        images,
        labels,
        num_classes=NUM_CLASSES,
        steps=STEPS,
        eps=EPS,
        step_size=STEP,
        clean_start_prob=1.0,
        targets=targets,
    )
    plain = torchattacks.PGD(model, eps=EPS / 255, alpha=STEP / 255, steps=STEPS, random_start=False)
    plain.set_mode_targeted_by_label(quiet=True)
    adv_theirs = plain(images, targets)
    det_diff = float((adv_ours - adv_theirs).abs().max())
    det_ours, det_theirs = _accuracy(model, adv_ours, labels, targets), _accuracy(model, adv_theirs, labels, targets)
    with torch.no_grad():
        clean_acc = float((model(images).argmax(1) == labels).float().mean())

    profile_ours = op_profile(lambda: ours())
    profile_theirs = op_profile(lambda: attack(images, targets))

    def rate(t: Timings, clock: str) -> float:
        return batch / median(t.cpu if clock == "cpu" else t.wall)

    per_case = {
        name: {
            "images_per_cpu_second": rate(t, "cpu"),
            "images_per_wall_second": rate(t, "wall"),
            "robust_accuracy": sum(a for a, _ in accuracies[name]) / len(accuracies[name]),
            "target_hit_rate": sum(h for _, h in accuracies[name]) / len(accuracies[name]),
            # >1: faster than torchattacks, median over rounds of the paired ratio
            "speedup_vs_torchattacks_cpu": paired_ratio(timings["torchattacks"].cpu, t.cpu),
            "speedup_vs_torchattacks_wall": paired_ratio(timings["torchattacks"].wall, t.wall),
        }
        for name, t in timings.items()
    }
    speedup = per_case["ours"]["speedup_vs_torchattacks_cpu"]
    acc_ours, acc_theirs = per_case["ours"]["robust_accuracy"], per_case["torchattacks"]["robust_accuracy"]
    # Binomial standard error of a difference of two accuracies over batch x repeats attacks each: the random
    # starts are the only source of disagreement, so 3 SE is a generous band for "equal within noise".
    n = batch * repeats
    p = (acc_ours + acc_theirs) / 2
    tolerance = max(3 * math.sqrt(2 * p * (1 - p) / n), 1 / n)

    checks = [
        Check(
            NAME,
            "speed ours / torchattacks (CPU time, median of paired ratios)",
            f"{speedup:.3f}x (wall {per_case['ours']['speedup_vs_torchattacks_wall']:.3f}x)",
            f">= {GOAL_SPEEDUP}x",
            speedup >= GOAL_SPEEDUP,
        ),
        Check(
            NAME,
            "robust accuracy ours vs torchattacks (random start)",
            f"{acc_ours:.3f} vs {acc_theirs:.3f} (clean {clean_acc:.3f})",
            f"|diff| <= {tolerance:.3f} (3 SE)",
            abs(acc_ours - acc_theirs) <= tolerance,
        ),
        Check(
            NAME,
            "no random start: robust acc (max |adv_ours - adv_ta|)",
            f"{det_ours[0]:.3f} vs {det_theirs[0]:.3f} ({det_diff:.1e})",
            "equal",
            det_ours == det_theirs,
        ),
    ]
    for name in cases:
        if name.startswith("proposal"):
            checks.append(
                Check(
                    NAME,
                    f"{name} / torchattacks (not product code)",
                    f"{per_case[name]['speedup_vs_torchattacks_cpu']:.3f}x",
                    "",
                    None,
                )
            )
    return {
        "name": NAME,
        "setup": {
            "model": MODEL.model_dump(),
            "batch": batch,
            "eps": f"{EPS:g}/255",
            "step": f"{STEP:g}/255",
            "steps": STEPS,
            "targeted": True,
            "repeats": repeats,
            "torch_threads": threads,
            "load_average_before_after": [round(load_before, 2), round(load_after, 2)],
        },
        "cases": per_case,
        "clean_accuracy": clean_acc,
        "deterministic": {"max_abs_diff": det_diff, "ours": det_ours, "torchattacks": det_theirs},
        "fold_max_logit_error": fold_error,
        "op_profile": {"ours": profile_ours, "torchattacks": profile_theirs},
        "checks": checks,
    }


def print_result(result: dict[str, Any]) -> None:
    rows = [
        [
            name,
            f"{c['images_per_cpu_second']:.1f}",
            f"{c['images_per_wall_second']:.1f}",
            f"{c['speedup_vs_torchattacks_cpu']:.3f}",
            f"{c['robust_accuracy']:.3f}",
            f"{c['target_hit_rate']:.3f}",
        ]
        for name, c in result["cases"].items()
    ]
    from benchmarks._common import format_table

    print(format_table(["attack", "img/cpu-s", "img/wall-s", "speedup", "robust acc", "target hit"], rows))
    prof = result["op_profile"]
    print(
        format_table(
            ["profile", *prof["ours"]],
            [[name, *(f"{v:.2f}" if isinstance(v, float) else v for v in p.values())] for name, p in prof.items()],
        )
    )
    print_checks(NAME, result["checks"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--no-proposals", action="store_true", help="time only ours and torchattacks")
    args = parser.parse_args(argv)
    result = run(args.batch, args.repeats, args.threads, proposals=not args.no_proposals)
    print_result(result)
    return result


if __name__ == "__main__":
    main()
