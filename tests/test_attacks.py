"""Targeted PGD (workloads.attacks) against the paper's recipe (Section 3, docs/design.md section 5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workloads.attacks import pgd, pgd_curve, random_targets
from workloads.config import ModelConfig
from workloads.models import build_model

EPS = 16.0


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(depth=18, norm="bn", width=1 / 16, stem="small"), num_classes=10)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)


def test_outputs_stay_in_eps_ball_and_pixel_range(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = batch
    images = images.clone()
    images[0] = 0.0  # pixels at the range's edges must be clipped, not pushed outside
    images[1] = 1.0
    adv = pgd(_model(), images, labels, num_classes=10, steps=5, eps=EPS, step_size=4.0, clean_start_prob=0.2)
    assert (adv - images).abs().max() <= EPS / 255 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - images).abs().max() > EPS / 255 * 0.5  # it moved


def test_targets_never_equal_labels_and_are_uniform_over_the_others() -> None:
    labels = torch.full((90_000,), 3)
    targets = random_targets(labels, 10, torch.Generator().manual_seed(0))
    assert not (targets == labels).any()
    counts = torch.bincount(targets, minlength=10).double()
    others = torch.cat([counts[:3], counts[4:]])
    expected = labels.numel() / 9
    chi2 = float(((others - expected) ** 2 / expected).sum())
    assert chi2 < 26.1  # chi-square, 8 degrees of freedom, p = 0.001


def test_clean_start_fraction_is_one_in_five() -> None:
    images = torch.rand(20_000, 1, 2, 2)
    labels = torch.zeros(20_000, dtype=torch.long)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 10))
    start = pgd(model, images, labels, num_classes=10, steps=0, eps=EPS, step_size=1.0, clean_start_prob=0.2)
    clean = (start == images).flatten(1).all(1).double().mean().item()
    # binomial standard deviation at n=20000 is 0.0028; 5 sigma
    assert abs(clean - 0.2) < 0.014


def test_attack_leaves_weights_grads_and_bn_stats_untouched(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = batch
    model = _model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pgd(model, images, labels, num_classes=10, steps=3, eps=EPS, step_size=1.0)
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert model.training  # mode restored


def test_more_steps_never_make_a_model_look_more_robust() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10))
    images = torch.rand(256, 3, 8, 8)
    with torch.no_grad():
        labels = model(images).argmax(1)  # a model that is 100% right on clean data
    targets = random_targets(labels, 10, torch.Generator().manual_seed(0))
    accuracies = []
    for steps in (1, 5, 20, 50):
        adv = pgd(
            model,
            images,
            labels,
            num_classes=10,
            steps=steps,
            eps=EPS,
            step_size=1.0,
            targets=targets,
            generator=torch.Generator().manual_seed(0),
        )
        with torch.no_grad():
            accuracies.append(float((model(adv).argmax(1) == labels).float().mean()))
    assert accuracies == sorted(accuracies, reverse=True), accuracies
    assert accuracies[-1] < accuracies[0]


def test_one_trajectory_gives_every_pgd_k_of_separate_runs() -> None:
    """PGD-k is the first k steps of PGD-K from the same start: the curve's images at each k are bit for bit the
    separate attacks', from a generator in the same state."""
    model = _model().eval()
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))
    targets = random_targets(labels, 10, torch.Generator().manual_seed(2))
    common = {"num_classes": 10, "eps": EPS, "step_size": 4.0, "targets": targets}
    curve = pgd_curve(
        model, images, labels, record_at=[5, 0, 2, 5], generator=torch.Generator().manual_seed(3), **common
    )
    assert list(curve) == [0, 2, 5]
    for k, adv in curve.items():  # the same images, hence the same adversarial accuracy at every k
        alone = pgd(model, images, labels, steps=k, generator=torch.Generator().manual_seed(3), **common)
        assert torch.equal(adv, alone), k
    assert not torch.equal(curve[2], curve[5])  # the steps moved the images
    # Untargeted, the labels are the goal: the same prefix property.
    away = pgd_curve(
        model, images, labels, record_at=[1, 3], targeted=False, generator=torch.Generator().manual_seed(4), **common
    )
    alone = pgd(model, images, labels, steps=3, targeted=False, generator=torch.Generator().manual_seed(4), **common)
    assert torch.equal(away[3], alone)
    with pytest.raises(ValueError, match="record_at"):
        pgd_curve(model, images, labels, record_at=[], **common)


def test_targeted_attack_reaches_its_targets_and_untargeted_leaves_the_label() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    images = torch.rand(128, 3, 8, 8)
    with torch.no_grad():
        labels = model(images).argmax(1)
    targets = random_targets(labels, 10, torch.Generator().manual_seed(1))
    adv = pgd(model, images, labels, num_classes=10, steps=40, eps=64.0, step_size=4.0, targets=targets)
    hit = (model(adv).argmax(1) == targets).float().mean()
    assert hit > 0.5
    away = pgd(model, images, labels, num_classes=10, steps=40, eps=64.0, step_size=4.0, targeted=False)
    assert (model(away).argmax(1) != labels).float().mean() > 0.5


# --- bf16 autocast and channels-last (the GPU path, exercised on the CPU) ---


def _trained_linear() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10))
    images = torch.rand(256, 3, 8, 8)
    with torch.no_grad():
        labels = model(images).argmax(1)
    return model, images, labels, random_targets(labels, 10, torch.Generator().manual_seed(0))


def test_bf16_attack_keeps_fp32_images_exactly_in_the_eps_box_and_is_as_strong() -> None:
    model, images, labels, targets = _trained_linear()
    seen: list[torch.dtype] = []
    model[1].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    common = {"num_classes": 10, "steps": 10, "eps": EPS, "step_size": 2.0, "targets": targets}
    adv16 = pgd(model, images, labels, amp_dtype=torch.bfloat16, generator=torch.Generator().manual_seed(3), **common)
    assert set(seen) == {torch.bfloat16} and len(seen) == 10  # every iteration's forward ran in bf16
    seen.clear()
    adv32 = pgd(model, images, labels, generator=torch.Generator().manual_seed(3), **common)
    assert set(seen) == {torch.float32}
    # The image, the sign step and the projection stay fp32: the box is exact, not bf16-rounded.
    assert adv16.dtype == torch.float32
    assert (adv16 - images).abs().max() <= EPS / 255 + 1e-7 and adv16.min() >= 0 and adv16.max() <= 1
    # Same random start; the steps follow sign(grad), which bf16 flips only where the gradient is tiny.
    assert float((adv16 == adv32).float().mean()) > 0.8  # measured 0.96
    with torch.no_grad():
        hit16 = float((model(adv16).argmax(1) == targets).float().mean())
        hit32 = float((model(adv32).argmax(1) == targets).float().mean())
    assert hit32 > 0.3 and abs(hit16 - hit32) <= 0.05  # 256 images: 0.05 is about 2 binomial SE


def test_channels_last_images_stay_channels_last_and_give_the_same_attack() -> None:
    model = _model().eval()
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))
    common = {"num_classes": 10, "steps": 3, "eps": EPS, "step_size": 4.0, "clean_start_prob": 0.5}
    plain = pgd(model, images, labels, generator=torch.Generator().manual_seed(2), **common)
    nhwc = images.contiguous(memory_format=torch.channels_last)
    adv = pgd(model, nhwc, labels, generator=torch.Generator().manual_seed(2), **common)
    assert adv.is_contiguous(memory_format=torch.channels_last) and not adv.is_contiguous()
    assert plain.is_contiguous()
    assert float((adv == plain).float().mean()) > 0.99  # measured 1.0; only sign(~0) could differ with the layout
