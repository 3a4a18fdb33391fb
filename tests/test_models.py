"""ResNet family and its normalisation layers (BN, BN*, GN, MBN)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workloads.config import NORMS, RESNET_STAGES, ModelConfig, Norm
from workloads.models import (
    NORM_LAYERS,
    BasicBlock,
    BatchNormStar2d,
    Bottleneck,
    MixedBatchNorm2d,
    ResNet,
    build_model,
    group_count,
    make_norm,
    use_channels_last,
)


def small(norm: Norm = "bn", depth: int = 18, num_classes: int = 10) -> ResNet:
    torch.manual_seed(0)
    return build_model(ModelConfig(depth=depth, norm=norm, width=1 / 16, stem="small"), num_classes)


def images(n: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 32, 32, generator=g) * scale + shift).clamp(0, 1)


def randomise_gammas(model: nn.Module) -> None:
    """Zero-initialised last gammas hide residual branches: give every norm layer random affine params."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


@pytest.mark.parametrize(("depth", "count"), [(50, 25_557_032), (101, 44_549_160), (152, 60_192_808)])
def test_imagenet_parameter_counts_match_torchvision(depth: int, count: int) -> None:
    with torch.device("meta"):  # counts only: no memory, no init cost
        model = build_model(ModelConfig(depth=depth), num_classes=1000, in_channels=3)
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("depth", sorted(RESNET_STAGES))
def test_every_depth_builds_and_runs_small(depth: int) -> None:
    model = small(depth=depth, num_classes=7)
    block_kind, layers = RESNET_STAGES[depth]
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert [len(s) for s in stages] == list(layers)
    assert type(model.layer1[0]).__name__ == {"basic": "BasicBlock", "bottleneck": "Bottleneck"}[block_kind]
    assert model(images(2, 0)).shape == (2, 7)


def test_width_and_in_channels() -> None:
    model = build_model(ModelConfig(depth=50, width=1 / 64, stem="small"), 5, in_channels=1)
    assert model.conv1.in_channels == 1 and model.conv1.out_channels == 1
    assert model.fc.in_features == 8 * 4  # 512/64 planes x bottleneck expansion 4
    assert model(torch.rand(3, 1, 16, 16)).shape == (3, 5)


def test_last_norm_of_each_block_starts_at_zero_gamma() -> None:
    norm: Norm
    for norm in ("bn", "gn", "mbn"):
        for depth in (18, 50):
            model = small(norm, depth)
            blocks = [m for m in model.modules() if isinstance(m, BasicBlock | Bottleneck)]
            assert len(blocks) == sum(RESNET_STAGES[depth][1])
            for block in blocks:
                assert gammas(block.last_norm) and all(torch.all(g == 0) for g in gammas(block.last_norm))
                assert all(torch.all(g == 1) for g in gammas(block.bn1))
                # The zeroed norm is the last on the residual path, so a block without projection starts as
                # the identity (bn2 zeroed would too at init, hence the structural check as well).
                assert block.last_norm is (block.bn3 if isinstance(block, Bottleneck) else block.bn2)
                if block.downsample is None:
                    x = torch.rand(2, block.conv1.in_channels, 8, 8)
                    assert torch.equal(block.eval()(x), x)


def gammas(norm: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in norm.modules() if isinstance(m, nn.BatchNorm2d | nn.GroupNorm)]


def test_model_normalises_pixels_internally() -> None:
    # A fixed (x - 0.5) / 0.25: mid-grey pixels reach the first conv as zeros, and the conv has no bias.
    model = small().eval()
    seen: list[torch.Tensor] = []
    model.conv1.register_forward_hook(lambda _m, _i, out: seen.append(out))
    model(torch.full((1, 3, 32, 32), 0.5))
    assert torch.count_nonzero(seen[0]) == 0
    model(torch.ones(1, 3, 32, 32))
    assert torch.allclose(seen[1], model.conv1(torch.full((1, 3, 32, 32), 2.0)))


# --- norm factory ---


def test_make_norm_kinds() -> None:
    assert type(make_norm("bn", 8)) is BatchNormStar2d
    assert isinstance(make_norm("mbn", 8), MixedBatchNorm2d)
    gn = make_norm("gn", 64)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 32


def test_make_norm_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown norm kind 'ln'") as err:
        make_norm("ln", 8)
    for kind in ("bn", "gn", "mbn"):
        assert kind in str(err.value)


@pytest.mark.parametrize(("channels", "groups", "expected"), [(64, 32, 32), (48, 32, 24), (4, 32, 4), (20, 8, 5)])
def test_gn_groups_fall_back_to_largest_divisor(channels: int, groups: int, expected: int) -> None:
    assert group_count(channels, groups) == expected
    norm = make_norm("gn", channels, groups)
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == expected


# --- GN ---


def test_gn_output_does_not_depend_on_the_batch() -> None:
    model = small("gn").train()
    randomise_gammas(model)
    x = images(1, 0)
    a = model(torch.cat([x, images(3, 1)]))[0]
    b = model(torch.cat([x, images(5, 2, scale=0.2, shift=0.7)]))[0]
    assert torch.allclose(a, b, atol=1e-5)


# --- BN* ---


def bn_state(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for n, t in model.state_dict().items() if "running" in n or "num_batches" in n]


@pytest.mark.parametrize("norm", ["bn", "mbn"])
def test_bn_star_uses_running_stats_in_training(norm: Norm) -> None:
    model = small(norm).train()
    randomise_gammas(model)
    model(images(8, 5, scale=0.5))  # move running stats away from their (0, 1) initial values
    x = images(1, 0)
    other_a, other_b = images(3, 1), images(5, 2, scale=0.2, shift=0.7)

    # Plain BN: batch statistics, so an image's output depends on its batch-mates.
    assert not torch.allclose(model(torch.cat([x, other_a]))[0], model(torch.cat([x, other_b]))[0], atol=1e-4)

    model.set_bn_star(True)
    assert all(m.use_running_stats for m in model.modules() if isinstance(m, BatchNormStar2d))
    before = bn_state(model)
    a = model(torch.cat([x, other_a]))[0]
    b = model(torch.cat([x, other_b]))[0]
    assert torch.allclose(a, b, atol=1e-5)
    assert all(torch.equal(s, t) for s, t in zip(before, bn_state(model), strict=True))
    # Same as eval mode, which is the point of BN* (train/test consistency).
    model.eval()
    assert torch.allclose(model(x)[0], a, atol=1e-5)
    model.train()

    a.sum().backward()
    stem = model.bn1.adv if norm == "mbn" else model.bn1
    assert isinstance(stem, BatchNormStar2d)
    assert stem.weight.grad is not None and stem.weight.grad.abs().sum() > 0
    assert stem.bias.grad is not None and stem.bias.grad.abs().sum() > 0

    model.set_bn_star(False)
    assert not any(m.use_running_stats for m in model.modules() if isinstance(m, BatchNormStar2d))
    model(images(4, 3))
    assert any(not torch.equal(s, t) for s, t in zip(before, bn_state(model), strict=True))


# --- MBN ---


def mbn_layers(model: nn.Module) -> list[MixedBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, MixedBatchNorm2d)]


def test_mbn_shares_convolutions_and_only_duplicates_norms() -> None:
    bn, mbn = small("bn"), small("mbn")
    assert mbn.has_mbn and not bn.has_mbn
    conv_names = {n for n, m in bn.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    assert conv_names == {n for n, m in mbn.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    n_bn = sum(p.numel() for m in bn.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    extra = sum(p.numel() for p in mbn.parameters()) - sum(p.numel() for p in bn.parameters())
    assert extra == n_bn  # exactly one extra BN per BN, nothing else duplicated
    for m in mbn_layers(mbn):
        assert not any(isinstance(c, nn.Conv2d) for c in m.modules())


def test_mbn_keeps_separate_running_stats_per_branch() -> None:
    model = small("mbn").train()
    randomise_gammas(model)
    adv, clean = images(3, 0, scale=0.3, shift=0.7), images(2, 1, scale=0.3)
    out = model(torch.cat([adv, clean]), split=3)  # uneven split
    assert out.shape == (5, 10)
    for m in mbn_layers(model):
        assert m.split is None  # reset after the forward
        assert m.adv.running_mean is not None and m.clean.running_mean is not None
        assert not torch.allclose(m.adv.running_mean, m.clean.running_mean)
        assert m.adv.num_batches_tracked == m.clean.num_batches_tracked == 1

    # Both halves train the same (shared) conv weights.
    model.zero_grad()
    model(torch.cat([adv, clean]), split=3)[:3].sum().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    grad_adv = model.conv1.weight.grad.clone()
    model.zero_grad()
    model(torch.cat([adv, clean]), split=3)[3:].sum().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert not torch.allclose(grad_adv, model.conv1.weight.grad)

    # Evaluation with either branch gives different outputs (Table 1: MBN_adv vs MBN_clean).
    model.eval()
    x = images(2, 7)
    assert model.mbn_branch == "adv"
    out_adv = model(x)
    model.set_mbn_branch("clean")
    out_clean = model(x)
    assert not torch.allclose(out_adv, out_clean, atol=1e-4)
    model.set_mbn_branch("adv")
    assert torch.allclose(model(x), out_adv)
    with pytest.raises(ValueError, match="adv, clean"):
        model.set_mbn_branch("both")  # type: ignore[arg-type]


def test_mbn_split_equals_routing_each_part_separately() -> None:
    model = small("mbn").train()
    randomise_gammas(model)
    adv, clean = images(3, 0, scale=0.5), images(4, 1, scale=0.5, shift=0.5)
    both = model(torch.cat([adv, clean]), split=3)
    model.set_mbn_branch("adv")
    only_adv = model(adv)
    model.set_mbn_branch("clean")
    only_clean = model(clean)
    assert torch.allclose(both, torch.cat([only_adv, only_clean]), atol=1e-5)


@pytest.mark.parametrize("split_at_end", [False, True])
def test_mbn_split_may_send_everything_to_one_branch(split_at_end: bool) -> None:
    model = small("mbn").train()
    randomise_gammas(model)
    x = images(4, 0)
    split = len(x) if split_at_end else 0
    used, unused = ("adv", "clean") if split_at_end else ("clean", "adv")
    out = model(x, split=split)
    for m in mbn_layers(model):
        assert getattr(m, used).num_batches_tracked == 1
        assert getattr(m, unused).num_batches_tracked == 0
    model.set_mbn_branch(used)  # type: ignore[arg-type]
    assert torch.allclose(out, model(x), atol=1e-5)


def test_mbn_split_is_reset_after_an_exception_and_validated() -> None:
    model = small("mbn")
    with pytest.raises(RuntimeError):
        model(torch.rand(2, 5, 32, 32), split=1)  # wrong channel count fails inside the forward
    assert all(m.split is None for m in mbn_layers(model))
    with pytest.raises(ValueError, match="split 3"):
        model(torch.rand(2, 3, 32, 32), split=3)


def test_non_mbn_models_ignore_split() -> None:
    model = small("bn").eval()
    x = images(4, 0)
    assert torch.equal(model(x, split=2), model(x))


def test_use_channels_last_converts_conv_weights_in_place() -> None:
    model = small().eval()
    x = images(2, 0)
    with torch.no_grad():
        before = model(x)
    weight = model.conv1.weight
    assert use_channels_last(model) is model
    assert model.conv1.weight is weight  # the same Parameter: optimizers and DDP keep working
    four_d = [p for p in model.parameters() if p.dim() == 4]
    assert four_d and all(p.is_contiguous(memory_format=torch.channels_last) for p in four_d)
    assert not model.conv1.weight.is_contiguous()  # 3x3: NHWC strides differ from NCHW (1x1 kernels: both hold)
    assert all(p.is_contiguous() for p in model.parameters() if p.dim() != 4)
    with torch.no_grad():
        assert torch.allclose(model(x.contiguous(memory_format=torch.channels_last)), before, atol=1e-5)


def test_every_configurable_norm_has_a_layer() -> None:
    """`config.NORMS` is the single list of norm names; the model's layer map must cover exactly those."""
    assert set(NORM_LAYERS) == set(NORMS)


@pytest.mark.parametrize(("depth", "width"), [(18, 1 / 8), (18, 1 / 4), (50, 1 / 16)])
def test_narrow_gn_keeps_the_full_width_channels_per_group(depth: int, width: float) -> None:
    """GN at width w has the paper's channels per group in every layer (32 groups at width 1, Section 4.2), not
    32 groups of one or two channels, which would be instance normalisation."""

    def per_group(w: float) -> list[float]:
        model = build_model(ModelConfig(depth=depth, norm="gn", width=w, stem="small"), num_classes=10)
        return [m.num_channels / m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)]

    narrow, full = per_group(width), per_group(1.0)
    assert narrow == full
    assert min(narrow) >= 2  # the paper's narrowest groups: 64 channels / 32


def test_only_cells_whose_gn_changed_get_new_ids() -> None:
    """Narrow GN cells train differently under the width-scaled groups: a new id, so no old checkpoint or result is
    taken for theirs. Full-width GN and every BN cell keep their ids (and their stored work)."""
    from orchestrator.grid import cell_id, revisions
    from workloads.config import TrainConfig

    def config(norm: str, width: float) -> TrainConfig:
        return TrainConfig.model_validate({"data": {"url": "x"}, "model": {"norm": norm, "width": width}})

    assert revisions(config("gn", 0.125)) and not revisions(config("gn", 1.0)) and not revisions(config("bn", 0.125))
    assert cell_id(config("gn", 0.125)) != cell_id(config("gn", 1.0))
