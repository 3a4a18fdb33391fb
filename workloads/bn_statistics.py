"""BN statistics of a trained network: the evidence of Section 4.2 ("two domains", Figure 5) and Section 4.3
(batch vs running statistics, Figure 6), and one scalar domain gap per cell.

- Figure 5: the running mean and variance of MBN_clean and MBN_adv on 20 sampled channels of one BN layer in res3.
- Figure 6: for a BN network, the batch mean and variance of that layer's input over a batch of clean images and
  over a batch of adversarial ones, beside the layer's running statistics.
- The domain gap: how far apart the clean and the adversarial domain are in the statistics the network normalises
  with (`domain_gap`).

Read-only measurements after training: nothing here changes a weight, a running statistic or a random stream of
training. `measure` runs in the worker after the evaluation and returns report metrics; the rest are pure functions
of a network and tensors.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from workloads import data
from workloads.attacks import pgd
from workloads.bn_fold import FoldedForAttack
from workloads.config import TrainConfig
from workloads.execution import ieee_fp32
from workloads.models import MixedBatchNorm2d, ResNet
from workloads.sessions import Session

# The paper plots "randomly sampled 20 channels" (Figures 5 and 6). A fixed seed samples the same channels in every
# cell of one width, so the cells' figures can be compared channel by channel.
FIGURE_CHANNELS = 20
CHANNEL_SEED = 0
# Report metrics: the scalar travels as a number; the figure data as JSON text, the one non-scalar form every
# consumer of a report passes through unchanged (Ray Train, Tune, metrics.jsonl), as "device" does.
GAP_METRIC = "domain_gap"
STATISTICS_METRIC = "bn_statistics"


class Moments(NamedTuple):
    """Per-channel mean and variance of one BN layer's input (running or over one batch)."""

    mean: torch.Tensor
    var: torch.Tensor


def norm_layers(network: nn.Module) -> dict[str, nn.Module]:
    """The network's BN layers by name, in forward order: its `MixedBatchNorm2d`s when it has any (each holds the
    two branches), else its `BatchNorm2d`s. Empty for GN."""
    mixed: dict[str, nn.Module] = {n: m for n, m in network.named_modules() if isinstance(m, MixedBatchNorm2d)}
    if mixed:
        return mixed
    return {name: m for name, m in network.named_modules() if isinstance(m, nn.BatchNorm2d)}


def figure_layer(network: ResNet) -> str | None:
    """The layer the figures show: the first BN of the last residual block of res3.

    The paper's figures sample "a ResNet-152's res3 block". res3 is He et al.'s conv3_x, the network's third stage
    counting the stem (`layer2` here: 28 x 28 feature maps at 224 px). Every depth of `config.RESNET_STAGES` has at
    least 2 blocks there, so the layer exists for every depth. Its first BN normalises the block's first
    convolution of the residual stream, whose gamma is not zero-initialised (the last one's is, `models.ResNet`).
    None for a network without BN (GN).
    """
    layers = norm_layers(network)
    block = network.layer2[-1]
    for name, module in layers.items():
        if module is getattr(block, "bn1", None):
            return name
    return None


def sample_channels(num_channels: int, count: int = FIGURE_CHANNELS, seed: int = CHANNEL_SEED) -> list[int]:
    """`count` distinct channel indices drawn once from `seed`, sorted; every channel when there are fewer."""
    if num_channels <= count:
        return list(range(num_channels))
    order = torch.randperm(num_channels, generator=torch.Generator().manual_seed(seed))
    return sorted(int(c) for c in order[:count])


def running_statistics(layer: nn.Module) -> dict[str, Moments]:
    """The running mean and variance of a BN layer: {"adv", "clean"} for an MBN layer (MBN_adv and MBN_clean),
    {"main"} for a BN layer."""
    if isinstance(layer, MixedBatchNorm2d):
        return {"adv": _running(layer.adv), "clean": _running(layer.clean)}
    if isinstance(layer, nn.BatchNorm2d):
        return {"main": _running(layer)}
    raise TypeError(f"{type(layer).__name__} keeps no running statistics")


def _running(bn: nn.BatchNorm2d) -> Moments:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("this BN layer does not track running statistics")
    return Moments(bn.running_mean.detach().clone(), bn.running_var.detach().clone())


def trained_branches(layer: MixedBatchNorm2d) -> bool:
    """Whether both branches of an MBN layer saw training data: at clean ratio 0 (or in standard training) one
    branch never normalised a batch and its running statistics are still the initial (0, 1)."""
    return all(
        bn.num_batches_tracked is not None and int(bn.num_batches_tracked) > 0 for bn in (layer.adv, layer.clean)
    )


@torch.no_grad()
def batch_statistics(network: nn.Module, images: torch.Tensor, layers: Iterable[str]) -> dict[str, Moments]:
    """Per-channel mean and variance (unbiased, as BN's running variance averages it) of the input of each named
    layer, over the whole batch `images` and every position, from one forward in eval mode.

    Eval mode: both domains pass through the same fixed function (upstream BNs normalise with their running
    statistics), so a difference at the layer comes from the images alone. In training mode each batch's upstream
    BNs would standardise it by its own statistics and hide part of the difference. Hooks only read; the network's
    mode is restored and its buffers are untouched.
    """
    modules = dict(network.named_modules())
    found: dict[str, Moments] = {}

    def hook(name: str) -> Any:
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            var, mean = torch.var_mean(inputs[0].float(), dim=(0, 2, 3), correction=1)
            found[name] = Moments(mean, var)

        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in layers]
    was_training = network.training
    network.eval()
    try:
        network(images)
    finally:
        network.train(was_training)
        for handle in handles:
            handle.remove()
    return found


def bhattacharyya(a: Moments, b: Moments, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel Bhattacharyya distance between the Gaussians N(a.mean, a.var) and N(b.mean, b.var).

    Symmetric, 0 exactly where the two agree, growing with a shift of the mean and with a ratio of the variances:
    (mu_a - mu_b)^2 / (4 (var_a + var_b)) + 1/2 ln((var_a + var_b) / (2 sqrt(var_a var_b))). The first term is
    d^2 / 8, d the shift in pooled standard deviations; the second counts the variance mismatch that Figures 5 and
    6 show beside the mean shift (adversarial images have the larger variance, Section 4.2). `eps` (BN's) is added
    to each variance, as BN adds it before dividing: a channel that is constant in both domains then stays finite.
    """
    var_a, var_b = a.var.double() + eps, b.var.double() + eps
    shift = (a.mean.double() - b.mean.double()) ** 2 / (4 * (var_a + var_b))
    spread = 0.5 * torch.log((var_a + var_b) / (2 * torch.sqrt(var_a * var_b)))
    return shift + spread


def domain_gap(pairs: Iterable[tuple[Moments, Moments]], eps: float = 1e-5) -> float | None:
    """The mean over BN layers of the mean over channels of `bhattacharyya`; None without layers.

    Every layer counts once whatever its width, so the gap describes the whole depth of the network (the first
    layers see the pixel difference, the deep ones what the convolutions make of it) rather than its widest stage.
    """
    per_layer = [float(bhattacharyya(a, b, eps).mean()) for a, b in pairs]
    return sum(per_layer) / len(per_layer) if per_layer else None


def _listed(moments: Moments, channels: list[int]) -> dict[str, list[float]]:
    return {
        "mean": [float(f"{float(v):.6g}") for v in moments.mean[channels]],
        "var": [float(f"{float(v):.6g}") for v in moments.var[channels]],
    }


def mbn_summary(network: ResNet) -> dict[str, Any] | None:
    """Figure 5's data and the domain gap of an MBN network: the gap between MBN_clean's and MBN_adv's running
    statistics over every MBN layer (None when a branch never trained). None for a network without MBN."""
    layers = {name: m for name, m in norm_layers(network).items() if isinstance(m, MixedBatchNorm2d)}
    shown = figure_layer(network)
    if not layers or shown is None:
        return None
    stats = {name: running_statistics(m) for name, m in layers.items()}
    trained = all(trained_branches(m) for m in layers.values())
    channels = sample_channels(stats[shown]["adv"].mean.numel())
    return {
        "layer": shown,
        "channels": channels,
        "running": {branch: _listed(moments, channels) for branch, moments in stats[shown].items()},
        "domain_gap": domain_gap((s["clean"], s["adv"]) for s in stats.values()) if trained else None,
        "gap_of": "running statistics of MBN_clean and MBN_adv",
        "layers": len(layers),
    }


def bn_summary(network: ResNet, clean: torch.Tensor, adversarial: torch.Tensor) -> dict[str, Any] | None:
    """Figure 6's data and the domain gap of a BN network: the batch statistics of `clean` and of `adversarial`
    images at every BN layer; the gap between the two over all layers. None for a network without plain BN."""
    layers = norm_layers(network)
    shown = figure_layer(network)
    if not layers or shown is None or network.has_mbn:
        return None
    on_clean = batch_statistics(network, clean, layers)
    on_adv = batch_statistics(network, adversarial, layers)
    channels = sample_channels(on_clean[shown].mean.numel())
    return {
        "layer": shown,
        "channels": channels,
        "running": {"main": _listed(running_statistics(layers[shown])["main"], channels)},
        "batch": {"clean": _listed(on_clean[shown], channels), "adv": _listed(on_adv[shown], channels)},
        "images": len(clean),
        "domain_gap": domain_gap((on_clean[name], on_adv[name]) for name in layers),
        "gap_of": "batch statistics of clean and adversarial images",
        "layers": len(layers),
    }


def measure(cfg: TrainConfig, network: ResNet, session: Session, num_classes: int) -> dict[str, Any]:
    """Report metrics of the trained network: `domain_gap` (when defined) and `bn_statistics` (JSON text of the
    figures' data); {} for a network without BN.

    The images are the first evaluation batch (`eval.batch_size` images of the evaluation subset), the same on
    every rank and for any number of workers. The adversarial batch is made by the cell's training attack
    (`attack`: its steps, eps, step and clean-start probability), targets and starts drawn from `eval.seed`,
    against the BN-folded network as in training: those are the images whose statistics a BN model's running
    statistics estimate at clean ratio 0 (Figure 6). In IEEE fp32, as the evaluation.
    """
    if not norm_layers(network):
        return {}
    with ieee_fp32(session.device):
        if network.has_mbn:
            summary = mbn_summary(network)
        else:
            count = min(cfg.eval.batch_size, cfg.eval.subset)
            images, labels = data.load_split(cfg.data.url, cfg.data.eval_split, count, augment=cfg.data.augment)
            images, labels = images.to(session.device), labels.to(session.device)
            adversarial = pgd(
                FoldedForAttack(network).current(),
                images,
                labels,
                num_classes=num_classes,
                steps=cfg.attack.steps,
                eps=cfg.attack.eps,
                step_size=cfg.attack.resolved_step_size,
                clean_start_prob=cfg.attack.clean_start_prob,
                generator=torch.Generator().manual_seed(cfg.eval.seed),
            )
            summary = bn_summary(network, images, adversarial)
    return report_metrics(summary)


def report_metrics(summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """A summary as report metrics: the gap as a number, the whole summary as JSON text."""
    if summary is None:
        return {}
    metrics: dict[str, Any] = {STATISTICS_METRIC: json.dumps(summary, separators=(",", ":"))}
    if summary.get("domain_gap") is not None:
        metrics[GAP_METRIC] = float(summary["domain_gap"])
    return metrics
