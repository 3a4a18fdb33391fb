"""A cell's evaluation: clean accuracy and the targeted-PGD curve on a fixed subset (Section 3), per MBN branch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from workloads import data, metrics
from workloads.attacks import pgd, pgd_curve, random_targets
from workloads.bn_fold import FoldedForAttack
from workloads.config import EvalConfig, TrainConfig
from workloads.execution import all_reduce, ieee_fp32
from workloads.models import ResNet
from workloads.sessions import Session


def _use_rank0_buffers(network: nn.Module) -> None:
    """Give every rank rank 0's BN running statistics before evaluating.

    DDP broadcasts rank 0's buffers at the start of each forward, but each rank then updates its own copy on its
    own batch, so after training the ranks hold slightly different statistics. The checkpoint stores rank 0's;
    evaluating with rank 0's on every rank makes the reported numbers those of the saved model.
    """
    if dist.is_available() and dist.is_initialized():
        for buffer in network.buffers():
            dist.broadcast(buffer, src=0)


# Leads the seed sequence of every evaluation start: numpy's SeedSequence treats trailing zeros as absent, so the
# varying parts must come after a non-zero tag (and the tag keeps these streams apart from workloads.data's).
_RANDOM_START = 101
# The same for the starts of eval.trajectory, which no N owns.
_TRAJECTORY_START = 102


def random_start_seed(eval_seed: int, steps: int, batch: int, restart: int = 0) -> int:
    """The seed of eval batch `batch`'s random start under PGD-`steps`: numpy's SeedSequence, which is specified
    (unlike Python's `hash` of a tuple, which changed between Python versions), so every cell, on any machine and
    any Python, is attacked from the same starts. `restart` r > 0 seeds the (r+1)-th start of eval.restarts; the
    first is the one-start evaluation's, so adding restarts only adds attacks."""
    words = [_RANDOM_START, eval_seed, steps, batch, *([restart] if restart else [])]  # r = 0: the seed as before
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


def trajectory_start_seed(eval_seed: int, batch: int, restart: int = 0) -> int:
    """The seed of eval batch `batch`'s random start under eval.trajectory, whose one attack serves every N.

    It depends on no N, so PGD-N's accuracy still does not depend on which other N are evaluated (the curve's
    longest attack only decides how far the trajectory runs)."""
    words = [_TRAJECTORY_START, eval_seed, batch, restart]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


def evaluate(cfg: TrainConfig, network: ResNet, session: Session, num_classes: int) -> dict[str, dict[str, float]]:
    """Clean accuracy and targeted-PGD accuracy for each N in eval.pgd_steps on a fixed subset (Section 3).

    Every cell is attacked identically, whatever the number of workers and whichever other N are evaluated: the
    subset is the first `eval.subset` images of the eval split, each image's target class is drawn once from
    eval.seed, and the random start of eval batch b under PGD-N comes from a generator seeded by
    `random_start_seed(seed, N, b)`.
    Ranks take whole eval batches round-robin and sum their counts. By default each N is a separate attack from a
    random start of its own (never resumed from a weaker one). With eval.trajectory one attack per batch, from the
    start `trajectory_start_seed(seed, b)`, runs to the largest N and is read after every N: PGD-k is the first k
    steps of PGD-K from the same start, so the curve costs max N attack steps instead of their sum. With
    eval.restarts R > 1, an image counts as robust at N only if it survives all R starts (restart r seeded with r
    as the last argument of the seed functions). eval.targeted false: untargeted PGD on the label.
    MBN models are evaluated once per branch (Table 1: MBN_adv and MBN_clean).

    Always in IEEE fp32, whatever the cell trained in: a low-precision attack can be weaker, so a bf16 evaluation
    could flatter a bf16-trained model; one fp32 evaluation keeps every cell comparable. The paper's pipeline did
    the same with its fp16 attack ("evaluation during training will still use FP32, for fair comparison").
    """
    with ieee_fp32(session.device):
        return _evaluate(cfg, network, session, num_classes)


def _evaluate(cfg: TrainConfig, network: ResNet, session: Session, num_classes: int) -> dict[str, dict[str, float]]:
    _use_rank0_buffers(network)
    layout = torch.channels_last if session.device.type == "cuda" else torch.contiguous_format
    images, labels = data.load_split(cfg.data.url, cfg.data.eval_split, cfg.eval.subset, augment=cfg.data.augment)
    targets = random_targets(labels, num_classes, torch.Generator().manual_seed(cfg.eval.seed))
    size = cfg.eval.batch_size
    my_batches = range(session.rank, -(-len(labels) // size), session.world_size)
    branches: list[Literal["adv", "clean"] | None] = ["adv", "clean"] if network.has_mbn else [None]
    network.eval()
    folded = FoldedForAttack(network)
    results: dict[str, dict[str, float]] = {}
    for branch in branches:
        if branch is not None:
            network.set_mbn_branch(branch)
        counts = [0.0] * (2 + len(cfg.eval.pgd_steps))  # clean, one per N, images seen
        for b in my_batches:
            part = slice(b * size, (b + 1) * size)
            x, y, t = (v[part].to(session.device) for v in (images, labels, targets))
            x = x.contiguous(memory_format=layout)
            counts[-1] += len(y)
            with torch.no_grad():
                counts[0] += float((network(x).argmax(1) == y).sum())
            survived = torch.ones(len(cfg.eval.pgd_steps), len(y), dtype=torch.bool, device=y.device)
            for restart in range(cfg.eval.restarts):
                attacks = _attacks(cfg.eval, folded.current(), x, y, t, num_classes, batch=b, restart=restart)
                for i, adv in enumerate(attacks):
                    with torch.no_grad():
                        survived[i] &= network(adv).argmax(1) == y  # worst case over the restarts
            for i, robust in enumerate(survived, start=1):
                counts[i] += float(robust.sum())
        totals = all_reduce(counts, session.device)
        seen = max(totals[-1], 1.0)
        name = "main" if branch is None else f"mbn_{branch}"
        results[name] = {"acc_clean": totals[0] / seen} | {
            metrics.pgd_metric(n): totals[i] / seen for i, n in enumerate(cfg.eval.pgd_steps, start=1)
        }
    if network.has_mbn:
        network.set_mbn_branch("adv")
    return results


def _attacks(
    cfg: EvalConfig,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    *,
    batch: int,
    restart: int,
) -> Iterator[torch.Tensor]:
    """One eval batch's adversarial images under PGD-N for each N of cfg.pgd_steps in order, from its `restart`-th
    random start: one trajectory read at every N (cfg.trajectory), or a separate attack per N, made as consumed."""
    common: dict[str, Any] = {
        "num_classes": num_classes,
        "eps": cfg.eps,
        "step_size": cfg.step_size,
        "targeted": cfg.targeted,
        "targets": targets,
    }
    if cfg.trajectory:
        start = torch.Generator().manual_seed(trajectory_start_seed(cfg.seed, batch, restart))
        curve = pgd_curve(model, x, y, record_at=cfg.pgd_steps, generator=start, **common)
        yield from (curve[steps] for steps in cfg.pgd_steps)
        return
    for steps in cfg.pgd_steps:
        start = torch.Generator().manual_seed(random_start_seed(cfg.seed, steps, batch, restart))
        yield pgd(model, x, y, steps=steps, generator=start, **common)


def eval_metrics(cfg: TrainConfig, network: ResNet, session: Session, num_classes: int) -> dict[str, float]:
    """`evaluate` flattened into report keys `eval/<branch>/<metric>` (the orchestrator parses them back)."""
    results = evaluate(cfg, network, session, num_classes)
    return {metrics.eval_key(branch, key): value for branch, values in results.items() for key, value in values.items()}
