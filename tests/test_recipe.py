"""The public pipeline's recipe (facebookresearch/ImageNet-Adversarial-Training, which the paper trained with,
Section 3) as the default of a cell: Nesterov momentum, weight decay on conv/fc weights only, label smoothing 0.1,
a per-step warm-up from 0.1, and the eps/N floor on the PGD step. Each test checks the loop's own objects (the
optimizer `set_up` builds, the loss `adversarial_loss` returns, the LR `learning_rate` gives each step)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from orchestrator.grid import expand
from tests.test_spec import make_spec
from workloads import train
from workloads.config import AttackConfig, EvalConfig, RecipeConfig, TrainConfig, paper_step_size
from workloads.data import synthetic_to_parquet
from workloads.models import build_model
from workloads.sessions import LocalSession
from workloads.train import adversarial_loss, learning_rate, set_up

NUM_CLASSES = 10


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synthetic_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("datasets") / "synthetic")
    synthetic_to_parquet(url, 64, (1, 16, 16), NUM_CLASSES, seed=3, num_test=16, shard_size=64)
    return url


def cell(url: str, **sections: dict[str, Any]) -> TrainConfig:
    """A tiny cell (ResNet-18 at width 1/16, small stem, batch 16) with the recipe's defaults unless overridden."""
    spec: dict[str, Any] = {
        "data": {"url": url},
        "model": {"depth": 18, "width": 1 / 16, "stem": "small"},
        "attack": {"steps": 1},
        "recipe": {"batch_size": 16, "per_worker_batch": 16},
    }
    for name, value in sections.items():
        spec[name] = {**spec.get(name, {}), **value}
    return TrainConfig.model_validate(spec)


# --- optimizer --------------------------------------------------------------------------------------------


def test_the_loops_optimizer_is_nesterov_momentum_0_9(synthetic_url: str, tmp_path: Path) -> None:
    """third_party/imagenet_utils.py: tf.train.MomentumOptimizer(lr, 0.9, use_nesterov=True)."""
    optimizer = set_up(cell(synthetic_url), LocalSession(tmp_path)).optimizer
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(g["nesterov"] and g["momentum"] == 0.9 and g["dampening"] == 0 for g in optimizer.param_groups)
    plain = set_up(cell(synthetic_url, recipe={"nesterov": False}), LocalSession(tmp_path / "plain")).optimizer
    assert not any(g["nesterov"] for g in plain.param_groups)


def test_nesterov_without_momentum_is_rejected() -> None:
    with pytest.raises(ValidationError, match="nesterov needs momentum > 0"):
        RecipeConfig(momentum=0.0)
    assert not RecipeConfig(momentum=0.0, nesterov=False).nesterov


def decay_by_name(network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert len(decay) == sum(len(g["params"]) for g in optimizer.param_groups)  # no parameter in two groups
    return {name: decay[id(p)] for name, p in network.named_parameters()}


@pytest.mark.parametrize("norm", ["bn", "mbn", "gn"])
def test_weight_decay_reaches_exactly_the_conv_and_fc_weights(norm: str, synthetic_url: str, tmp_path: Path) -> None:
    """The pipeline decays `.*/W` (third_party/imagenet_utils.py, weight_decay_pattern): the kernels of its Conv2D
    and FullyConnected layers. Not BN/GN gamma and beta (both MBN branches), not the fc bias."""
    run = set_up(cell(synthetic_url, model={"norm": norm}), LocalSession(tmp_path))
    network = run.models.network
    decay = decay_by_name(network, run.optimizer)
    assert set(decay) == {name for name, _ in network.named_parameters()}  # every parameter is optimised
    # Conv kernels are 4-d and the fc weight 2-d; norm scales and shifts and the fc bias are 1-d.
    kernels = {name for name, p in network.named_parameters() if name.endswith("weight") and p.dim() in (2, 4)}
    assert "fc.weight" in kernels and "fc.bias" not in kernels
    assert {name for name, d in decay.items() if d > 0} == kernels
    assert {d for name, d in decay.items() if name in kernels} == {1e-4}
    assert {d for name, d in decay.items() if name not in kernels} == {0.0}
    if norm == "mbn":  # both branches' gamma and beta are kept from decay
        assert any(".adv." in name for name in decay) and any(".clean." in name for name in decay)


def test_decay_on_every_parameter_is_one_group_as_before(synthetic_url: str, tmp_path: Path) -> None:
    """weight_decay_on "all" keeps the earlier optimizer exactly (one group), so its checkpoints still load."""
    run = set_up(cell(synthetic_url, recipe={"weight_decay_on": "all"}), LocalSession(tmp_path))
    (group,) = run.optimizer.param_groups
    assert group["weight_decay"] == 1e-4 and len(group["params"]) == len(list(run.models.network.parameters()))


# --- loss -------------------------------------------------------------------------------------------------


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.rand(8, 1, 16, 16, generator=g), torch.randint(0, NUM_CLASSES, (8,), generator=g)


def test_standard_training_loss_is_label_smoothed_cross_entropy(synthetic_url: str) -> None:
    """adv_model.py: AdvImageNetModel.label_smoothing = 0.1 in the training loss (its standard training, the
    pipeline run without an attacker, uses the same model class)."""
    cfg = cell(synthetic_url, training={"strategy": "standard", "clean_ratio": 1.0}, attack={"steps": 0})
    torch.manual_seed(0)
    model = build_model(cfg.model, NUM_CLASSES, in_channels=1).eval()  # eval: the same logits on every call
    images, labels = fixed_batch()
    loss, _ = adversarial_loss(cfg, model, model, images, labels, NUM_CLASSES, torch.Generator())
    logits = model(images)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, label_smoothing=0.1), rtol=0, atol=0)
    assert not torch.allclose(loss, F.cross_entropy(logits, labels))  # smoothing is not a no-op on this batch


def test_adversarial_training_loss_is_label_smoothed_over_the_mixed_batch(
    synthetic_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mixture loss is the smoothed cross-entropy over [adversarial; clean] (the attack is replaced by the
    identity so the expected value can be written down)."""
    monkeypatch.setattr(train, "pgd", lambda model, images, labels, **_: images.clone())
    cfg = cell(synthetic_url, training={"strategy": "mixture", "clean_ratio": 0.5})
    torch.manual_seed(0)
    model = build_model(cfg.model, NUM_CLASSES, in_channels=1).eval()
    images, labels = fixed_batch()
    loss, _ = adversarial_loss(cfg, model, model, images, labels, NUM_CLASSES, torch.Generator())
    batch, targets = torch.cat([images, images[:4]]), torch.cat([labels, labels[:4]])
    expected = F.cross_entropy(model(batch, split=8), targets, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


# --- learning rate ----------------------------------------------------------------------------------------


def per_step(recipe: RecipeConfig, steps_per_epoch: int, epochs: int) -> list[float]:
    """The LR of every optimizer step of the first `epochs` epochs, as train_epoch asks for it."""
    return [learning_rate(recipe, e + s / steps_per_epoch) for e in range(epochs) for s in range(steps_per_epoch)]


def test_warmup_rises_per_step_from_0_1_to_the_scaled_lr_over_5_epochs() -> None:
    """main.py (do_train): ScheduledHyperParamSetter [(0, 0.1), (5 x steps_per_epoch, BASE_LR)], linear and
    step-based, when BASE_LR = 0.1 x batch/256 exceeds 0.1."""
    recipe = RecipeConfig()  # the paper's batch 4096: lr 1.6
    steps = 7
    ramp = per_step(recipe, steps, 5)
    assert ramp[0] == pytest.approx(0.1)
    increments = [b - a for a, b in zip(ramp, ramp[1:], strict=False)]
    assert increments == pytest.approx([(1.6 - 0.1) / (5 * steps)] * (5 * steps - 1))  # linear, every step
    assert learning_rate(recipe, 5.0) == pytest.approx(1.6)
    assert per_step(recipe, steps, 35)[5 * steps :] == pytest.approx([1.6] * (30 * steps))
    assert learning_rate(recipe, 35.0) == pytest.approx(0.16)


@pytest.mark.parametrize("batch_size", [64, 128, 256])
def test_no_warmup_when_the_scaled_lr_does_not_exceed_0_1(batch_size: int) -> None:
    """main.py warms up only `if BASE_LR > 0.1`: a smaller LR is never raised towards 0.1."""
    recipe = RecipeConfig(batch_size=batch_size, per_worker_batch=32)
    assert not recipe.warms_up()
    assert per_step(recipe, 4, 6) == pytest.approx([0.1 * batch_size / 256] * 24)


def test_warmup_from_a_stated_start() -> None:
    recipe = RecipeConfig(batch_size=1024, warmup_epochs=2, warmup_start_lr=0.0)  # lr 0.4
    assert learning_rate(recipe, 0.0) == 0.0
    assert learning_rate(recipe, 1.0) == pytest.approx(0.2)
    assert learning_rate(recipe, 2.0) == pytest.approx(0.4)
    assert per_step(RecipeConfig(batch_size=1024, warmup_epochs=0), 3, 1) == pytest.approx([0.4] * 3)


# --- attack step ------------------------------------------------------------------------------------------


def test_the_step_is_the_papers_raised_to_eps_over_n() -> None:
    """adv_model.py, PGDAttacker: step_size = max(step_size, epsilon / num_iter)."""
    for steps in range(1, 41):
        attack = AttackConfig(steps=steps, eps=16.0)
        assert attack.resolved_step_size == max(paper_step_size(steps), 16.0 / steps)
        assert steps * attack.resolved_step_size >= 16.0 - 1e-9  # N steps can always cover eps
        assert AttackConfig(steps=steps, eps=16.0, reach_eps=False).resolved_step_size == paper_step_size(steps)
    # The paper's N at eps 16 keep footnote 6's steps (4, 2, 1, 1); short attacks are lifted.
    assert [AttackConfig(steps=n).resolved_step_size for n in (5, 10, 20, 30)] == [4.0, 2.0, 1.0, 1.0]
    assert AttackConfig(steps=1).resolved_step_size == 16.0
    assert AttackConfig(steps=12).resolved_step_size == pytest.approx(16 / 12)
    # A set step is floored too (Feature Denoising Sec. 6.1, quoted there: step 1 with PGD-10 becomes 1.6).
    assert AttackConfig(steps=10, step_size=1.0).resolved_step_size == pytest.approx(1.6)


def test_the_grid_stores_the_floored_step_in_the_cell() -> None:
    spec = make_spec(grid={"pgd_steps": [1, 3, 5, 12]}, workload={"attack": {"eps": 16}})
    steps = {c.axes["pgd_steps"]: c.config.attack.step_size for c in expand(spec)}
    assert steps == pytest.approx({1: 16.0, 3: 16 / 3, 5: 4.0, 12: 16 / 12})
    legacy = make_spec(grid={"pgd_steps": [1, 3, 5, 12]}, workload={"attack": {"eps": 16, "reach_eps": False}})
    assert {c.axes["pgd_steps"]: c.config.attack.step_size for c in expand(legacy)} == {1: 4, 3: 4, 5: 4, 12: 1}


# --- evaluation reach -------------------------------------------------------------------------------------


def test_unreachable_steps_are_the_attacks_that_cannot_cover_eps() -> None:
    """PGD-N moves at most N x step from its start: at the paper's step 1 and eps 16, PGD-10 cannot reach eps."""
    assert EvalConfig().unreachable_steps() == (10,)  # of 10, 20, 100, 500, 2000
    assert EvalConfig(pgd_steps=(5, 16, 20), step_size=1.0, eps=16.0).unreachable_steps() == (5,)
    assert EvalConfig(pgd_steps=(10, 100, 200), eps=76.0, step_size=4.75).unreachable_steps() == (10,)
    assert EvalConfig(pgd_steps=(3, 7), eps=16.0, step_size=16 / 3).unreachable_steps() == ()  # 3 x 16/3 is eps
