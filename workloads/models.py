"""ResNet family with switchable normalisation (BN, GN, mixture BN) and BN* (Xie & Yuille 2020, Section 4).

Single-device code: distribution wraps it elsewhere. Layout follows torchvision ("ResNet v1.5": the stride
sits on the 3x3 conv of a bottleneck, projection shortcuts are 1x1 conv + norm), so at ImageNet settings the
parameter counts equal torchvision's (ResNet-50/101/152: 25,557,032 / 44,549,160 / 60,192,808). Depths are
data (`config.RESNET_STAGES`); this module only turns them into layers.

Do not convert these models with `nn.SyncBatchNorm.convert_sync_batchnorm`: the paper normalises per GPU
(batch 32, Section 3), and the conversion would drop the BN* flag and the MBN routing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from workloads.config import NORMS, RESNET_STAGES, ModelConfig

Branch = Literal["adv", "clean"]
NormFactory = Callable[[int], nn.Module]

# Inputs live in [0, 1] pixel space because the attacks and their eps/step sizes are defined there (Section 3:
# eps 16 on the 0-255 scale). The model maps pixels to roughly zero-mean, unit-scale inputs itself, with fixed
# constants and no parameters or buffers, so attacks never need to know about normalisation and parameter
# counts stay standard.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25


class BatchNormStar2d(nn.BatchNorm2d):
    """BatchNorm2d that can normalise with its running statistics while training (BN*, Section 4.3, Table 2).

    The paper applies "pre-computed running statistics for model training during the last 10 epochs" so that
    BN behaves the same at training and test time. With `use_running_stats` set in training mode, the layer
    normalises with the running mean/var (as in eval), gamma/beta still receive gradients, and the running
    statistics are frozen.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.use_running_stats = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.use_running_stats):
            return super().forward(x)
        # training=False: normalise with the running stats and leave them as they are; autograd still reaches
        # weight and bias.
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, eps=self.eps)


class MixedBatchNorm2d(nn.Module):
    """Mixture BN (Section 4.2, Xie et al. 2019a): one BN for adversarial images, one for clean images.

    The paper's point is that clean and adversarial images come from two domains whose statistics should not
    be mixed (Figure 5); convolutions stay shared, only normalisation is split. A training batch is the
    concatenation [adversarial; clean]: with `split` set, x[:split] goes to MBN_adv and x[split:] to MBN_clean
    (uneven splits, 0 and len(x) allowed). Without a split, the whole batch goes to `branch` ("adv" by
    default; at test time the paper evaluates with either branch, Table 1). `ResNet.forward` sets `split` for
    the duration of one forward.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.adv = BatchNormStar2d(num_features)
        self.clean = BatchNormStar2d(num_features)
        self.branch: Branch = "adv"
        self.split: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split is None:
            return self.adv(x) if self.branch == "adv" else self.clean(x)
        # An empty part is skipped: BN over zero images would be undefined (and would corrupt running stats).
        parts = []
        if self.split > 0:
            parts.append(self.adv(x[: self.split]))
        if self.split < x.shape[0]:
            parts.append(self.clean(x[self.split :]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def group_count(channels: int, gn_groups: int = 32) -> int:
    """GN groups for `channels`: `gn_groups` if it divides them, else the largest divisor below it.

    Channel counts that `gn_groups` does not divide (e.g. 24 at width 3/8) fall back to the largest divisor
    <= gn_groups, which keeps groups of equal size.
    """
    return max(g for g in range(1, min(gn_groups, channels) + 1) if channels % g == 0)


def gn_groups_at_width(gn_groups: int, width: float) -> int:
    """GN groups of a network `width` times as wide as the standard one that has `gn_groups` groups.

    The paper uses GN with 32 groups (Wu & He's default; Section 4.2) on full-width ResNets, whose layers of
    64-2048 channels then hold 2-64 channels per group. A narrowed network keeps those channels per group, so its
    group count shrinks with its width: at width 1/8 (the CPU replay) 4 groups, not 32 groups of 1-2 channels,
    which would be instance normalisation, a different normaliser from the one the paper studies.
    """
    return max(1, round(gn_groups * width))


# The norm layer of each `config.NORMS` name, as data: (channels, GN groups) -> layer.
NORM_LAYERS: dict[str, Callable[[int, int], nn.Module]] = {
    "bn": lambda channels, _: BatchNormStar2d(channels),  # with the BN* switch (Section 4.3)
    "mbn": lambda channels, _: MixedBatchNorm2d(channels),  # Section 4.2
    "gn": lambda channels, groups: nn.GroupNorm(group_count(channels, groups), channels),  # Section 4.2
}


def make_norm(kind: str, channels: int, gn_groups: int = 32) -> nn.Module:
    """The normalisation layer for `kind` (one of `config.NORMS`)."""
    if kind not in NORM_LAYERS:
        raise ValueError(f"unknown norm kind {kind!r}; allowed: {', '.join(NORMS)}")
    return NORM_LAYERS[kind](channels, gn_groups)


def _conv(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1, self.bn1 = _conv(c_in, planes, 3, stride), norm(planes)
        self.conv2, self.bn2 = _conv(planes, c_out, 3), norm(c_out)
        self.last_norm = self.bn2
        self.downsample = _shortcut(c_in, c_out, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1, self.bn1 = _conv(c_in, planes, 1), norm(planes)
        # Stride on the 3x3 conv (torchvision's "v1.5"), not on the first 1x1 as in the original paper.
        self.conv2, self.bn2 = _conv(planes, planes, 3, stride), norm(planes)
        self.conv3, self.bn3 = _conv(planes, c_out, 1), norm(c_out)
        self.last_norm = self.bn3
        self.downsample = _shortcut(c_in, c_out, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def _shortcut(c_in: int, c_out: int, stride: int, norm: NormFactory) -> nn.Sequential | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(_conv(c_in, c_out, 1, stride), norm(c_out))


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, ...],
        num_classes: int,
        in_channels: int = 3,
        width: float = 1.0,
        stem: Literal["imagenet", "small"] = "imagenet",
        norm: NormFactory = BatchNormStar2d,
    ) -> None:
        super().__init__()
        planes = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        if stem == "imagenet":  # 224px inputs: 7x7/2 conv + 3x3/2 max-pool
            self.conv1 = nn.Conv2d(in_channels, planes[0], 7, stride=2, padding=3, bias=False)
            self.pool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        elif stem == "small":  # 32px CPU inputs: keep resolution, as CIFAR ResNets do
            self.conv1 = _conv(in_channels, planes[0], 3)
            self.pool = nn.Identity()
        else:
            raise ValueError(f"unknown stem {stem!r}; allowed: imagenet, small")
        self.bn1 = norm(planes[0])

        stages: list[nn.Sequential] = []
        c_in = planes[0]
        for i, (p, n) in enumerate(zip(planes, layers, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(block(c_in, p, 2 if (i > 0 and j == 0) else 1, norm))
                c_in = p * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(c_in, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last norm gamma of every residual block, so each block starts as the identity. The
        # paper's pipeline (ImageNet-Adversarial-Training, Section 3) does this, after Goyal et al. 2017 (Sec.
        # 5.1), who found it eases optimisation at large batch; the paper trains with batch 4096.
        for m in self.modules():
            if isinstance(m, BasicBlock | Bottleneck):
                for norm_layer in m.last_norm.modules():
                    if isinstance(norm_layer, nn.BatchNorm2d | nn.GroupNorm):
                        nn.init.zeros_(norm_layer.weight)

        # Plain lists (not registered as submodules again) of the layers the switches below act on.
        self._mbn: list[MixedBatchNorm2d] = [m for m in self.modules() if isinstance(m, MixedBatchNorm2d)]
        self._bn: list[BatchNormStar2d] = [m for m in self.modules() if isinstance(m, BatchNormStar2d)]
        self._mbn_branch: Branch = "adv"

    @property
    def has_mbn(self) -> bool:
        return bool(self._mbn)

    @property
    def mbn_branch(self) -> Branch:
        return self._mbn_branch

    def set_mbn_branch(self, branch: Branch) -> None:
        """Branch MBN layers use when no split is given: evaluation with MBN_adv or MBN_clean (Table 1)."""
        if branch not in ("adv", "clean"):
            raise ValueError(f"unknown MBN branch {branch!r}; allowed: adv, clean")
        self._mbn_branch = branch
        for m in self._mbn:
            m.branch = branch

    def set_bn_star(self, enabled: bool) -> None:
        """BN* (Section 4.3): every BN, both MBN branches included, trains with its running statistics."""
        for m in self._bn:
            m.use_running_stats = enabled

    def forward(self, x: torch.Tensor, split: int | None = None) -> torch.Tensor:
        """Logits for pixels `x` in [0, 1]. `split`: x[:split] are adversarial, x[split:] clean (MBN routing).

        The split travels with the forward call, so one [adversarial; clean] batch is one forward (one DDP
        forward); non-MBN models ignore it.
        """
        if split is not None and not 0 <= split <= x.shape[0]:
            raise ValueError(f"split {split} outside [0, {x.shape[0]}]")
        if split is None or not self._mbn:
            return self._forward(x)
        for m in self._mbn:
            m.split = split
        try:
            return self._forward(x)
        finally:
            for m in self._mbn:
                m.split = None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - PIXEL_MEAN) / PIXEL_STD
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def use_channels_last(model: nn.Module) -> nn.Module:
    """Store every 4-d weight channels-last (NHWC), in place (Parameters keep their identity).

    cuDNN's tensor-core convolutions work in NHWC; with NCHW weights and activations every convolution and its
    backward transposes. `Module.to(memory_format=...)` does the same, but its type stubs do not declare it.
    """
    for param in model.parameters():
        if param.dim() == 4:
            param.data = param.data.contiguous(memory_format=torch.channels_last)
    return model


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int = 3) -> ResNet:
    """The ResNet described by `cfg` (depth, norm, width, stem) for `num_classes` classes."""
    block_kind, layers = RESNET_STAGES[cfg.depth]

    groups = gn_groups_at_width(cfg.gn_groups, cfg.width)

    def norm(channels: int) -> nn.Module:
        return make_norm(cfg.norm, channels, groups)

    return ResNet(BLOCKS[block_kind], layers, num_classes, in_channels, cfg.width, cfg.stem, norm)
