"""The compiled training step's two graphs (workloads.train.Models, workloads.bn_fold.FoldedForAttack): the attack
differentiates the BN-folded copy, compiled on its own, w.r.t. the input only; training runs the network's own
compiled graph. Also the graphed attack (attacks.GraphedAttack) as far as the CPU runs it: everything but the
CUDA-graph capture, which tests/test_cuda.py covers.

Compiled with aot_eager: dynamo's capture and aot_autograd's forward/backward split, which is where parameter
gradients are kept or pruned, without inductor's code generation (minutes on two cores). One compiled setup per
module; tiny shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.debugging import boxed_nop

from workloads import execution, train
from workloads.attacks import GraphedAttack, pgd
from workloads.bn_fold import FoldedForAttack
from workloads.config import (
    AttackConfig,
    DataConfig,
    ModelConfig,
    PerformanceConfig,
    RecipeConfig,
    TrainConfig,
    TrainingConfig,
)
from workloads.models import ResNet, build_model

NUM_CLASSES = 10
BATCH = 8


def config(**performance: bool) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(url="memory://unused"),  # batches are made here
        model=ModelConfig(depth=18, width=1 / 8, stem="small"),
        attack=AttackConfig(steps=2, eps=16.0, step_size=4.0),
        training=TrainingConfig(strategy="mixture", clean_ratio=0.5),
        recipe=RecipeConfig(batch_size=BATCH, per_worker_batch=BATCH),
        performance=PerformanceConfig(**performance),
    )


def network() -> ResNet:
    torch.manual_seed(0)
    return build_model(config().model, NUM_CLASSES)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(BATCH, 3, 16, 16, generator=g), torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)


@dataclass
class Compiled:
    cfg: TrainConfig
    models: train.Models
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    backward_gradients: list[int]  # per backward graph compiled: how many gradients it returns

    def step(self, seed: int) -> None:
        """One training step as train_epoch takes it: the attack on the folded copy, then the training graph."""
        images, labels = batch(seed)
        self.optimizer.zero_grad(set_to_none=True)
        self.models.network.train()
        loss, _ = train.adversarial_loss(
            self.cfg, self.models.trained, self.models.attacked(), images, labels, NUM_CLASSES, self.generator
        )
        loss.backward()
        self.optimizer.step()


def recording_backend(backward_gradients: list[int]) -> Callable[..., Any]:
    """aot_eager, noting how many gradients each compiled backward graph returns (None: input needs none)."""

    def backward(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable[..., Any]:
        (output,) = (node for node in gm.graph.nodes if node.op == "output")
        backward_gradients.append(sum(grad is not None for grad in output.args[0]))
        return boxed_nop(gm, inputs)

    return aot_autograd(fw_compiler=boxed_nop, bw_compiler=backward)


@pytest.fixture(scope="module")
def compiled() -> Iterator[Compiled]:
    gradients: list[int] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(execution, "COMPILE_BACKEND", recording_backend(gradients))
        torch._dynamo.reset()
        execution.reset_compile_counts()
        cfg = config(compile=True)
        net = network()
        ex = execution.resolve_execution(cfg.performance, torch.device("cpu"))
        models = train.Models.around(net, ex, world_size=1, grad_accum_steps=1)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        setup = Compiled(cfg, models, optimizer, torch.Generator().manual_seed(0), gradients)
        setup.step(seed=0)  # warm-up: both graphs compiled
        try:
            yield setup
        finally:
            torch._dynamo.reset()


def test_the_attack_graph_computes_no_parameter_gradients(compiled: Compiled) -> None:
    attacked = compiled.models.attacked()
    params = list(attacked.parameters())
    assert params and not any(p.requires_grad for p in params)
    # Two backward graphs: the attack's returns the input's gradient alone, training's one per parameter.
    weights = sum(p.requires_grad for p in compiled.models.network.parameters())
    assert sorted(compiled.backward_gradients) == [1, weights]
    # The training network's gradients are untouched by an attack: none appear, existing ones keep their values.
    net = compiled.models.network
    images, labels = batch(1)
    compiled.optimizer.zero_grad(set_to_none=True)
    pgd(attacked, images, labels, num_classes=NUM_CLASSES, steps=2, eps=16.0, step_size=4.0)
    assert all(p.grad is None for p in net.parameters())
    assert all(p.grad is None for p in attacked.parameters())
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.5)
    pgd(compiled.models.attacked(), images, labels, num_classes=NUM_CLASSES, steps=2, eps=16.0, step_size=4.0)
    assert all(p.grad is not None and bool((p.grad == 0.5).all()) for p in net.parameters())
    compiled.optimizer.zero_grad(set_to_none=True)


def test_the_compiled_attack_equals_the_eager_attack_on_the_current_weights(compiled: Compiled) -> None:
    net = compiled.models.network
    eager = FoldedForAttack(net)  # the uncompiled copy of the same network
    for seed in (2, 3):  # a training step in between: the compiled graph must read the refreshed weights
        images, labels = batch(seed)
        common: dict[str, Any] = {"num_classes": NUM_CLASSES, "steps": 3, "eps": 16.0, "step_size": 4.0}
        fast = pgd(compiled.models.attacked(), images, labels, generator=torch.Generator().manual_seed(seed), **common)
        slow = pgd(eager.current(), images, labels, generator=torch.Generator().manual_seed(seed), **common)
        assert torch.allclose(fast, slow, atol=1e-6)
        net.eval()
        with torch.no_grad():
            assert torch.equal(net(fast).argmax(1), net(slow).argmax(1))
        compiled.step(seed)
    # It ran through the attack's own graph, compiled once.
    assert execution.compile_counts()["attack_graphs"] == 1


def test_attack_and_training_steps_add_no_compilations_after_warm_up(compiled: Compiled) -> None:
    compiled.step(seed=4)
    warm = execution.compile_counts()
    for seed in range(5, 9):
        compiled.step(seed)
    after = execution.compile_counts()
    assert after == warm
    # One graph each: the attack's (eval mode, the folded copy) and training's (train mode, the network).
    assert (after["attack_graphs"], after["train_graphs"], after["dynamo_graphs"]) == (1, 1, 2)


def test_the_graphed_attack_runs_the_eager_attack_from_its_own_input_tensors() -> None:
    """On the CPU a GraphedAttack runs its static program uncaptured: the same arithmetic and random draws as the
    eager attack, its batch copied into the program's own tensors (which a CUDA graph's replay reads)."""
    cfg = config(graph_attack=True)
    net = network()
    ex = execution.resolve_execution(cfg.performance, torch.device("cpu"))
    assert ex.graph_attack
    models = train.Models.around(net, ex, world_size=1, grad_accum_steps=1)
    graphed = models.attacked()
    assert isinstance(graphed, GraphedAttack) and graphed.model is models.folded.current()
    eager = FoldedForAttack(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    common: dict[str, Any] = {"num_classes": NUM_CLASSES, "steps": 2, "eps": 16.0, "step_size": 4.0}
    for seed in (0, 1, 2):
        images, labels = batch(seed)
        for clean_start_prob in (0.0, 0.5):
            kwargs = common | {"clean_start_prob": clean_start_prob}
            run = pgd(models.attacked(), images, labels, generator=torch.Generator().manual_seed(seed), **kwargs)
            ref = pgd(eager.current(), images, labels, generator=torch.Generator().manual_seed(seed), **kwargs)
            assert torch.equal(run, ref)
        # Weights change in place between attacks; the graphed module is the same object, still current.
        optimizer.zero_grad()
        net.train()
        nn.functional.cross_entropy(net(images), labels).backward()
        optimizer.step()
        assert models.attacked() is graphed
    assert graphed.programs == 2  # one per schedule (with and without clean starts), reused across batches
