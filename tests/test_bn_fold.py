"""The attack's BN-folded copy (workloads.bn_fold): the same function as the network, rebuilt only when the
network's tensors are replaced, refreshed bit for bit from its current weights, statistics and MBN branch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workloads.bn_fold import FoldedForAttack, fold_batch_norms
from workloads.config import ModelConfig, Norm
from workloads.models import ResNet, build_model, use_channels_last


def model_config(norm: Norm) -> ModelConfig:
    return ModelConfig(depth=50, norm=norm, width=1 / 16, stem="small")


def small(norm: Norm = "bn", depth: int = 18) -> ResNet:
    torch.manual_seed(0)
    return build_model(ModelConfig(depth=depth, norm=norm, width=1 / 16, stem="small"), num_classes=10)


@pytest.mark.parametrize(("norm", "branch"), [("bn", "adv"), ("mbn", "adv"), ("mbn", "clean"), ("gn", "adv")])
def test_bn_folded_attack_copy_computes_the_same_function(norm: Norm, branch: str) -> None:
    torch.manual_seed(0)
    model = build_model(model_config(norm), num_classes=10)
    model.train()
    model(torch.rand(8, 3, 32, 32), split=4)  # non-trivial running statistics in every branch
    if model.has_mbn:
        model.set_mbn_branch(branch)  # type: ignore[arg-type]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batch_norms(model)
    model.eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # the original is untouched
    convs_with_bias = sum(isinstance(m, nn.Conv2d) and m.bias is not None for m in folded.modules())
    assert (convs_with_bias > 0) == (norm != "gn")  # BN folded into the convs; GN cannot be
    assert not any(p.requires_grad for p in folded.parameters())


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


@pytest.mark.parametrize("norm", ["bn", "mbn", "gn"])
def test_attack_twin_is_built_once_and_tracks_weights_statistics_and_branch(norm: Norm) -> None:
    torch.manual_seed(0)
    model = build_model(model_config(norm), num_classes=10)
    view = FoldedForAttack(model)
    twin = view.current()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):  # train steps change weights (in place) and BN running statistics
        model.train()
        optimizer.zero_grad()
        model(torch.rand(8, 3, 32, 32), split=4).square().mean().backward()
        optimizer.step()
        assert view.current() is twin  # refreshed in place, not rebuilt
        assert_same_params(twin, fold_batch_norms(model))  # bit for bit what a fresh fold computes
    if model.has_mbn:
        model.set_mbn_branch("clean")
        assert view.current() is twin
        assert_same_params(twin, fold_batch_norms(model))
        model.eval()
        x = torch.rand(4, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(twin(x), model(x), atol=1e-5)
    # The twin is invisible to everything that walks the model: state dict, parameters, submodules, DDP.
    assert model.state_dict().keys() == build_model(model_config(norm), num_classes=10).state_dict().keys()
    twin_params = {id(p) for p in twin.parameters()}
    assert not twin_params & {id(p) for p in model.parameters()}
    assert not any(m is twin for m in model.modules())
    assert not any(p.requires_grad for p in twin.parameters())


def test_attack_twin_is_rebuilt_when_the_model_tensors_are_replaced() -> None:
    model = small()
    view = FoldedForAttack(model)
    twin = view.current()
    model.double()
    rebuilt = view.current()
    assert rebuilt is not twin and next(rebuilt.parameters()).dtype == torch.float64
    use_channels_last(model)
    again = view.current()
    assert again is not rebuilt and again.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_folded_copy_drops_the_folded_norms() -> None:
    folded = fold_batch_norms(small("bn", depth=50))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())  # last_norm aliases included
