"""One grid cell: adversarial training of a ResNet, then evaluation against a PGD curve.

The loop reads like the plain PyTorch loop it is: `set_up` (model, optimizer, resume), then per epoch
`train_epoch` (attack, loss, step) and, after the last, `evaluate`; `Session.report` once per epoch.
Distribution is added around single-device code: the session says which rank this is, `Models` wraps the
network for DDP, and `execution` moves batches and counts. Everything Ray-specific lives in the session
(workloads.sessions).

`train_loop_per_worker` is the function a `ray.train.torch.TorchTrainer` runs on every worker (DDP); `main` runs
the same loop in one process without Ray, for debugging a cell: `python -m workloads.train CELL.json --out DIR`.
Standard training is the strategy "no attack" of this one loop (docs/design.md section 9), not a second loop.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from workloads import bn_statistics, builtin_data, data, faults
from workloads.attacks import autocast, memory_format_of, pgd
from workloads.bn_fold import FoldedForAttack
from workloads.config import RecipeConfig, TrainConfig
from workloads.evaluate import eval_metrics
from workloads.execution import (
    Execution,
    all_reduce,
    compile_model,
    configure_backends,
    data_parallel,
    on_device,
    resolve_execution,
)
from workloads.models import ResNet, build_model, use_channels_last
from workloads.sessions import LocalSession, RaySession, Session, load_fork_point, save_fork_point

# Per-epoch sums, reduced across ranks once per epoch.
EPOCH_SUMS = ("loss", "adv_correct", "adv_seen", "clean_correct", "clean_seen")


@dataclass
class Models:
    """The one network of a cell and the two ways it is called.

    `network` owns the weights: the optimizer steps it, checkpoints save it, evaluation attacks it. `trained` is
    what the training forward calls: the network wrapped for DDP (several workers) and/or compiled, else the
    network itself. `attacked()` is what PGD differentiates: never the DDP wrapper (an all-reduce per attack
    step would be wrong and slow) but the network's BN-folded copy (workloads.bn_fold), refreshed with the
    current weights; when compiling, a compiled graph of its own, apart from training's.
    """

    network: ResNet
    trained: nn.Module
    folded: FoldedForAttack

    @classmethod
    def around(cls, network: ResNet, execution: Execution, world_size: int, grad_accum_steps: int) -> Models:
        # torch.compile (optional): two graphs. Training compiles the network in train mode (under DDP, the DDP
        # wrapper: see execution.data_parallel); the attack compiles the BN-folded copy, in eval mode, with no
        # parameter needing a gradient (the paper's pipeline: the attack takes gradients w.r.t. the input only).
        # One module serving both would switch modes every step and its attack backward would compute weight
        # gradients only to drop them.
        if world_size > 1:
            trained = data_parallel(network, grad_accum_steps, compiled=execution.compile)
        else:
            trained = compile_model(network, "train") if execution.compile else network
        folded = FoldedForAttack(network, compiled=execution.compile, graphed=execution.graph_attack)
        return cls(network, trained, folded)

    def attacked(self) -> nn.Module:
        return self.folded.attacked()


@dataclass
class TrainingRun:
    """Everything `train_epoch` needs, built once by `set_up`."""

    cfg: TrainConfig
    session: Session
    info: data.DatasetInfo
    execution: Execution
    models: Models
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # the attack's random draws (targets, starts), saved with every checkpoint
    steps_per_epoch: int
    start_epoch: int  # where this attempt starts: 0, or the epoch of the checkpoint it resumed from
    train_seconds: float  # training time so far, across attempts
    forked_from: str | None = None  # the cell whose fork point this run started from (kept in its checkpoints)


def set_up(cfg: TrainConfig, session: Session) -> TrainingRun:
    """Model, optimizer and RNG state, resumed from the session's newest readable checkpoint if there is one, else
    (a fork, `cfg.fork.start_from`) from its parent's fork point."""
    info = data.read_info(cfg.data.url)
    execution = resolve_execution(cfg.performance, session.device)
    configure_backends(execution)
    generator = seed_everything(cfg.seed * 1009 + session.rank)
    network = build_model(cfg.model, info.num_classes, in_channels=info.image_shape[0]).to(session.device)
    if execution.channels_last:
        use_channels_last(network)
    optimizer = make_optimizer(network, cfg.recipe)
    start_epoch, train_seconds = 0, 0.0
    state = session.latest_state()
    forked_from = state.get("forked_from") if state is not None else None
    if state is None and cfg.fork is not None and cfg.fork.start_from:
        state = start_of_fork(cfg)
        forked_from = cfg.fork.parent
        # The fork's own training time: the parent's prefix was paid for (and recorded) by the parent.
        state["train_seconds"] = 0.0
    if state is not None:
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["attack_rng"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, train_seconds = state["epoch"], state["train_seconds"]
    micro_per_epoch = data.batches_per_epoch(
        info, cfg.data.train_split, session.world_size, cfg.recipe.per_worker_batch
    )
    steps_per_epoch = micro_per_epoch // cfg.grad_accum_steps
    if steps_per_epoch < 1:
        raise ValueError(
            f"recipe.batch_size {cfg.recipe.batch_size} is larger than one epoch of {cfg.data.train_split} data"
        )
    models = Models.around(network, execution, session.world_size, cfg.grad_accum_steps)
    return TrainingRun(
        cfg,
        session,
        info,
        execution,
        models,
        optimizer,
        generator,
        steps_per_epoch,
        start_epoch,
        train_seconds,
        forked_from,
    )


def bn_star_switch_epoch(cfg: TrainConfig) -> int:
    """The first epoch (0-based) that trains with BN* (Section 4.3); `recipe.epochs` for a model without BN*. Up to
    it, a BN* cell trains exactly as the same cell without BN*."""
    return cfg.recipe.epochs - cfg.model.bn_star_epochs


def start_of_fork(cfg: TrainConfig) -> dict[str, Any]:
    """A fork's starting state: its parent's fork point, which must be at this cell's BN* switch epoch (where the
    two runs part); anything else would train another cell than the one named."""
    assert cfg.fork is not None
    state = load_fork_point(cfg.fork.start_from)
    switch = bn_star_switch_epoch(cfg)
    if state["epoch"] != switch or not cfg.model.bn_star_epochs:
        raise ValueError(
            f"fork point {cfg.fork.start_from} of cell {cfg.fork.parent} is at epoch {state['epoch']}, but this cell "
            f"switches to BN* at epoch {switch} (recipe.epochs {cfg.recipe.epochs}, model.bn_star_epochs "
            f"{cfg.model.bn_star_epochs}): it cannot fork there"
        )
    return state


def train_epoch(run: TrainingRun, epoch: int) -> dict[str, Any]:
    """One epoch (0-based) of adversarial training; returns the epoch's metrics, reduced across ranks."""
    cfg, session, models = run.cfg, run.session, run.models
    accum = cfg.grad_accum_steps
    # BN* (Section 4.3, Table 2): running statistics in training for the last K epochs.
    models.network.set_bn_star(cfg.model.bn_star_epochs > 0 and epoch >= bn_star_switch_epoch(cfg))
    models.network.train()
    started = time.perf_counter()
    # Summed on the device and read once per epoch (float64: the same sums as Python floats on the CPU).
    sums = {key: torch.zeros((), dtype=torch.float64, device=session.device) for key in EPOCH_SUMS}
    batches = on_device(micro_batches(cfg, run.info, session, epoch), run.execution)
    loss_scale = 1.0
    attacks = cfg.training.strategy != "standard"  # standard training attacks nothing: no folded copy to refresh
    for step in range(run.steps_per_epoch):
        if step == run.steps_per_epoch // 2:
            loss_scale = faults.mid_epoch(cfg.seed, epoch, session.rank)  # 1.0 unless a fault test asks
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(cfg.recipe, epoch + step / run.steps_per_epoch)
        run.optimizer.zero_grad(set_to_none=True)
        for micro in range(accum):
            images, labels = next(batches)
            # Accumulating micro-batches: only the last backward of a step all-reduces gradients.
            last_micro = micro == accum - 1 or session.world_size == 1
            with nullcontext() if last_micro else models.trained.no_sync():  # type: ignore[operator]
                loss, stats = adversarial_loss(
                    cfg,
                    models.trained,
                    models.attacked() if attacks else models.network,
                    images,
                    labels,
                    run.info.num_classes,
                    run.generator,
                    amp_dtype=run.execution.amp_dtype,
                )
                loss = loss * loss_scale
                (loss / accum).backward()
            sums["loss"] += loss.detach()
            for key, value in stats.items():
                sums[key] += value
        run.optimizer.step()
    totals = dict(zip(sums, all_reduce(torch.stack(list(sums.values())).tolist(), session.device), strict=True))
    seconds = time.perf_counter() - started
    run.train_seconds += seconds
    mean_loss = totals["loss"] / (run.steps_per_epoch * accum * session.world_size)
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}: {mean_loss}")
    metrics: dict[str, Any] = {
        "epoch": epoch + 1,
        "loss": mean_loss,
        "lr": run.optimizer.param_groups[0]["lr"],
        "images_per_sec": run.steps_per_epoch * cfg.recipe.batch_size / seconds,
        "epoch_seconds": seconds,
        "train_seconds": run.train_seconds,
        "start_epoch": run.start_epoch,  # where this attempt resumed: shows how much an interruption cost
    }
    for kind in ("adv", "clean"):
        if totals[f"{kind}_seen"]:
            metrics[f"train_acc_{kind}"] = totals[f"{kind}_correct"] / totals[f"{kind}_seen"]
    return metrics


def run(cfg: TrainConfig, session: Session) -> dict[str, Any]:
    """Train one cell from its last checkpoint (or its parent's fork point, or scratch), evaluate it, and return the
    final metrics. A fork's last report says `forked_from`; a fork's parent saves its fork points on the way."""
    training = set_up(cfg, session)
    network, num_classes = training.models.network, training.info.num_classes
    # Where this run's forks start (orchestrator.grid.fork_twins): its state at their BN* switch epochs.
    fork_points = set(cfg.fork.save_epochs) if cfg.fork is not None and cfg.fork.save_to else set()
    origin = {"forked_from": training.forked_from} if training.forked_from else {}
    for epoch in range(training.start_epoch, cfg.recipe.epochs):
        metrics = train_epoch(training, epoch)
        last = epoch + 1 == cfg.recipe.epochs
        if last:
            metrics |= final_metrics(cfg, network, session, num_classes) | {"device": device_model(cfg.use_gpu)}
            metrics |= origin
        save = last or (epoch + 1) % cfg.checkpoint_every == 0
        fork_point = epoch + 1 in fork_points and session.rank == 0
        state = None
        if save or fork_point:
            state = training_state(
                network,
                training.optimizer,
                training.generator,
                epoch + 1,
                training.train_seconds,
                forked_from=training.forked_from,
            )
        if fork_point and state is not None and cfg.fork is not None:
            save_fork_point(cfg.fork.save_to, state)
        session.report(metrics, state if save else None)
    if training.start_epoch >= cfg.recipe.epochs:
        # Fitting a run whose last checkpoint is the final epoch (Ray Train resumes it from storage; the sweep only
        # does so when result.json was never written): nothing left to train, report the evaluation again.
        final: dict[str, Any] = {
            "epoch": training.start_epoch,
            "train_seconds": training.train_seconds,
            "start_epoch": training.start_epoch,
            "device": device_model(cfg.use_gpu),
        }
        session.report(final | final_metrics(cfg, network, session, num_classes) | origin, None)
    return session.history[-1] if isinstance(session, LocalSession) and session.history else {}


def final_metrics(cfg: TrainConfig, network: ResNet, session: Session, num_classes: int) -> dict[str, Any]:
    """What the last report adds: the evaluation (`eval/<branch>/<metric>`), then the BN statistics of the
    trained network (Figures 5 and 6, the domain gap: `workloads.bn_statistics`), measured after it so they
    change none of its numbers."""
    return eval_metrics(cfg, network, session, num_classes) | bn_statistics.measure(cfg, network, session, num_classes)


def device_model(use_gpu: bool) -> str:
    """What trained the cell, for its provenance: the GPU's name, or the CPU's model."""
    if use_gpu and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    return f"cpu {platform.machine()} ({os.cpu_count()} cores)"


def training_state(
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    epoch: int,
    train_seconds: float,
    forked_from: str | None = None,
) -> dict[str, Any]:
    """What a checkpoint (and a fork point) holds: enough to continue exactly where the run stopped (weights,
    momentum, RNGs), and, for a fork, the cell it started from."""
    state = {
        "epoch": epoch,
        "train_seconds": train_seconds,
        "model": network.state_dict(),
        "optimizer": optimizer.state_dict(),
        "attack_rng": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    if forked_from:
        state["forked_from"] = forked_from
    return state


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: `config["train"]` is the cell's TrainConfig."""
    run(config["train"], RaySession())


def make_optimizer(network: nn.Module, recipe: RecipeConfig) -> torch.optim.SGD:
    """Momentum SGD (Section 3) as the pipeline configures it: Nesterov when `recipe.nesterov`, weight decay on the
    parameters `recipe.weight_decay_on` names (third_party/imagenet_utils.py: `weight_decay_pattern = '.*/W'`).

    The pipeline adds 1e-4 x sum(W^2) / 2 (tf l2_regularizer) to the loss, whose gradient 1e-4 x W is what torch's
    SGD weight_decay adds. With "all" there is one parameter group, as before the option existed, so the optimizer
    state of older checkpoints still loads.
    """
    options: dict[str, Any] = {"lr": recipe.lr, "momentum": recipe.momentum, "nesterov": recipe.nesterov}
    if recipe.weight_decay_on == "all":
        return torch.optim.SGD(network.parameters(), weight_decay=recipe.weight_decay, **options)
    decayed, kept = split_decayed_parameters(network)
    groups = [{"params": decayed, "weight_decay": recipe.weight_decay}, {"params": kept, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, **options)


def split_decayed_parameters(network: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(conv and fc weights, every other parameter): the pipeline's `.*/W` variables are the weights of its Conv2D
    and FullyConnected layers; BN/GN gamma and beta and the fc bias are left undecayed (third_party/imagenet_utils.py,
    resnet_model.py). Grouped by layer type, not by name, so MBN's two branches and GN are covered alike."""
    layers = {id(m.weight) for m in network.modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    params = list(network.parameters())
    return [p for p in params if id(p) in layers], [p for p in params if id(p) not in layers]


def learning_rate(recipe: RecipeConfig, epoch: float) -> float:
    """The LR at `epoch` (fractional: the loop asks once per optimizer step, at epoch + step / steps_per_epoch):
    the linear scaling rule, a linear warm-up from `warmup_start_lr` over `warmup_epochs` when the scaled LR exceeds
    it (the pipeline's main.py), and /10 at each decay point (Section 3)."""
    lr = recipe.lr
    if recipe.warms_up() and epoch < recipe.warmup_epochs:
        lr = recipe.warmup_start_lr + (lr - recipe.warmup_start_lr) * epoch / recipe.warmup_epochs
    return lr * 0.1 ** sum(epoch >= m for m in recipe.lr_milestones())


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def micro_batches(cfg: TrainConfig, info: data.DatasetInfo, session: Session, epoch: int) -> Iterator[Any]:
    """This rank's training micro-batches of `epoch`, a deterministic function of (seed, epoch, rank)
    (`data.iter_batches`)."""
    # A GPU applies the colour augmentation itself (an eighth of the decoding work, a few element-wise ops there)
    # and uploads batches the reader copied into pinned memory.
    cuda = session.device.type == "cuda"
    return data.iter_batches(
        info,
        cfg.data.train_split,
        rank=session.rank,
        world_size=session.world_size,
        batch_size=cfg.recipe.per_worker_batch,
        epoch=epoch,
        seed=cfg.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        augment=cfg.data.augment,
        colour_on_device=cuda,
        pinned=cuda,
    )


def adversarial_loss(
    cfg: TrainConfig,
    model: nn.Module,
    attacked: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    generator: torch.Generator,
    *,
    amp_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | int]]:
    """Loss of one micro-batch under the cell's strategy, and counts for the train accuracies.

    The batch is [adversarial images; the first round(r * B) clean counterparts] (Section 4.1, clean ratio r),
    and the cross-entropy is averaged over it: at r = 1 this is Eq. 1 with alpha = 0.5. MBN models get the split
    index so each part is normalised by its own BN branch, in one forward that DDP sees once (Section 4.2).

    `model` is what the training forward calls (`Models.trained`), `attacked` what PGD differentiates
    (`Models.attacked()`). `amp_dtype` (bf16): the forward passes of the attack and of training run under
    autocast; the weights stay fp32 (the optimizer updates them in fp32), and the loss is taken on fp32 logits.
    The counts are tensors on the device: reading them here would make the host wait for the GPU every
    micro-batch.
    """
    training = cfg.training
    n = images.shape[0]
    if training.strategy == "standard":
        with autocast(images.device, amp_dtype):
            logits = model(images)
        logits = logits.float() if amp_dtype is not None else logits
        loss = F.cross_entropy(logits, labels, label_smoothing=cfg.recipe.label_smoothing)
        return loss, {"clean_correct": (logits.argmax(1) == labels).sum(), "clean_seen": n}

    adv = pgd(
        attacked,
        images,
        labels,
        num_classes=num_classes,
        steps=cfg.attack.steps,
        eps=cfg.attack.eps,
        step_size=cfg.attack.resolved_step_size,
        clean_start_prob=cfg.attack.clean_start_prob,
        generator=generator,
        amp_dtype=amp_dtype,
    )
    n_clean = round(training.clean_ratio * n)
    batch, targets = adv, labels
    if n_clean:
        batch = torch.cat([adv, images[:n_clean]]).contiguous(memory_format=memory_format_of(images))
        targets = torch.cat([labels, labels[:n_clean]])
    with autocast(images.device, amp_dtype):
        logits = model(batch, split=n)
    logits = logits.float() if amp_dtype is not None else logits
    # Label smoothing as in the pipeline's training loss (adv_model.py, AdvImageNetModel.label_smoothing).
    loss = F.cross_entropy(logits, targets, label_smoothing=cfg.recipe.label_smoothing)
    if training.strategy == "alp" and n_clean:
        # ALP (Kannan et al. 2018, Section 4.1 "Adversarial logits pairing"): pull each adversarial image's logits
        # towards its clean counterpart's.
        loss = loss + training.alp_weight * F.mse_loss(logits[:n_clean], logits[n:])
    stats: dict[str, torch.Tensor | int] = {
        "adv_correct": (logits[:n].argmax(1) == labels).sum(),
        "adv_seen": n,
        "clean_correct": (logits[n:].argmax(1) == labels[:n_clean]).sum(),
        "clean_seen": n_clean,
    }
    return loss, stats


def read_cell_config(path: Path) -> TrainConfig:
    """A TrainConfig from `path`: either a TrainConfig as JSON or a cell's `config.json` as the sweep writes it
    (`{"cell_id", "axes", "train": {...}}`). ValueError with a one-line reason for anything else."""
    try:
        document = json.loads(path.read_text())
    except OSError as err:
        raise ValueError(f"{path}: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    if isinstance(document, dict) and isinstance(document.get("train"), dict):
        document = document["train"]
    try:
        return TrainConfig.model_validate(document)
    except ValidationError as err:
        # One line: pydantic's own text spends three lines on each error.
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors())
        raise ValueError(f"{path}: {' '.join(problems.split())}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workloads.train",
        description="Train and evaluate one cell in this process, without Ray (for debugging a cell).",
    )
    parser.add_argument(
        "config",
        type=Path,
        help="a cell's config.json as the sweep stores it (cells/ID/config.json) or a TrainConfig",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/single"), help="checkpoints and metrics.jsonl")
    args = parser.parse_args(argv)
    try:
        cfg = read_cell_config(args.config)
        if builtin_data.is_builtin(cfg.data.url):
            # Converted once into the output folder, as the sweep converts it into its storage.
            url = builtin_data.materialise(cfg.data.url, os.fspath(args.out.resolve()))
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"url": url})})
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    session = LocalSession(args.out, use_gpu=cfg.use_gpu)
    final = run(cfg, session)
    for line in session.history:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in line.items()}))
    print(f"finished {cfg.recipe.epochs} epochs; checkpoints and metrics in {os.fspath(args.out)}")
    return 0 if final else 1


if __name__ == "__main__":
    raise SystemExit(main())
