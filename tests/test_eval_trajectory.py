"""The evaluation's PGD curve from one attack trajectory (eval.trajectory) and its sanity checks: untargeted PGD and
the worst case over several random starts (eval.restarts), on a tiny trained ResNet and synthetic data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.grid import cell_id
from orchestrator.paper import paper_differences
from orchestrator.spec import load_spec
from workloads import data
from workloads import evaluate as evaluation
from workloads.attacks import pgd, random_targets
from workloads.bn_fold import FoldedForAttack
from workloads.config import TrainConfig
from workloads.data import synthetic_to_parquet
from workloads.evaluate import evaluate, random_start_seed, trajectory_start_seed
from workloads.models import ResNet, build_model
from workloads.sessions import LocalSession

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
STEPS = (1, 2, 4, 8)
SUBSET, BATCH = 64, 32  # two eval batches
# eps 16 with step 4 on these 16x16 images: the curve falls with N and a second start finds images the first
# missed, so equal accuracies below are not equal by saturation.
EVAL: dict[str, Any] = {"pgd_steps": list(STEPS), "subset": SUBSET, "batch_size": BATCH, "eps": 16, "step_size": 4}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("datasets") / "synthetic")
    synthetic_to_parquet(url, 256, (1, 16, 16), NUM_CLASSES, seed=3, num_test=SUBSET, shard_size=64)
    return url


def config(url: str, **options: Any) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "data": {"url": url},
            "model": {"depth": 18, "width": 1 / 16, "stem": "small"},
            "eval": {**EVAL, **options},
        }
    )


@pytest.fixture(scope="module")
def model(url: str) -> ResNet:
    """A few epochs of clean training: most test images right, so an attack has something to flip."""
    torch.manual_seed(0)
    network = build_model(config(url).model, NUM_CLASSES, in_channels=1)
    images, labels = data.load_split(url, "train", 256)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    network.train()
    for _ in range(3):
        for i in range(0, len(labels), 32):
            loss = F.cross_entropy(network(images[i : i + 32]), labels[i : i + 32])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return network.eval()


def curve(results: dict[str, dict[str, float]]) -> list[float]:
    return [results["main"][f"acc_pgd_{n}"] for n in STEPS]


def run(cfg: TrainConfig, model: ResNet, tmp_path: Path) -> dict[str, dict[str, float]]:
    return evaluate(cfg, model, LocalSession(tmp_path), NUM_CLASSES)


@pytest.mark.parametrize("targeted", [True, False])
def test_one_trajectory_reads_the_accuracies_of_separate_attacks_from_its_start(
    url: str, model: ResNet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, targeted: bool
) -> None:
    trajectory = run(config(url, trajectory=True, targeted=targeted), model, tmp_path)
    assert len(set(curve(trajectory))) > 1  # the attack flips more images with more steps
    # Separate pgd(..., steps=N) per N, each from the start the trajectory takes.
    monkeypatch.setattr(
        evaluation,
        "random_start_seed",
        lambda seed, steps, batch, restart=0: trajectory_start_seed(seed, batch, restart),
    )
    separate = run(config(url, trajectory=False, targeted=targeted), model, tmp_path)
    assert separate == trajectory
    # The start depends on no N: PGD-4 alone is the curve's PGD-4.
    monkeypatch.undo()
    alone = run(config(url, trajectory=True, targeted=targeted, pgd_steps=[4]), model, tmp_path)
    assert alone["main"]["acc_pgd_4"] == trajectory["main"]["acc_pgd_4"]


def by_hand(url: str, model: ResNet, trajectory: bool, restarts: int) -> list[float]:
    """Accuracy at each N where an image counts only if every one of `restarts` starts leaves it correct, from
    separate `pgd` calls seeded as the evaluation seeds its starts."""
    whole = config(url)
    cfg = whole.eval
    images, labels = data.load_split(url, whole.data.eval_split, SUBSET)
    targets = random_targets(labels, NUM_CLASSES, torch.Generator().manual_seed(cfg.seed))
    attacked = FoldedForAttack(model).current()
    robust = {n: 0 for n in STEPS}
    for b in range(SUBSET // BATCH):
        part = slice(b * BATCH, (b + 1) * BATCH)
        x, y, t = images[part], labels[part], targets[part]
        for n in STEPS:
            survived = torch.ones(len(y), dtype=torch.bool)
            for r in range(restarts):
                seed = trajectory_start_seed(cfg.seed, b, r) if trajectory else random_start_seed(cfg.seed, n, b, r)
                adv = pgd(
                    attacked,
                    x,
                    y,
                    num_classes=NUM_CLASSES,
                    steps=n,
                    eps=cfg.eps,
                    step_size=cfg.step_size,
                    targets=t,
                    generator=torch.Generator().manual_seed(seed),
                )
                with torch.no_grad():
                    survived &= model(adv).argmax(1) == y
            robust[n] += int(survived.sum())
    return [robust[n] / SUBSET for n in STEPS]


@pytest.mark.parametrize("trajectory", [False, True])
def test_restarts_count_an_image_robust_only_if_it_survives_every_start(
    url: str, model: ResNet, tmp_path: Path, trajectory: bool
) -> None:
    one = curve(run(config(url, trajectory=trajectory), model, tmp_path))
    two = curve(run(config(url, trajectory=trajectory, restarts=2), model, tmp_path))
    assert one == by_hand(url, model, trajectory, restarts=1)  # the first start is the one-start evaluation's
    assert two == by_hand(url, model, trajectory, restarts=2)
    assert all(a <= b for a, b in zip(two, one, strict=True))
    assert two != one  # the second start found images the first missed


class _Counted(nn.Module):
    """The attacked model, counting its forwards (one per PGD step)."""

    def __init__(self, model: nn.Module, forwards: list[int]) -> None:
        super().__init__()
        self.model, self.forwards = model, forwards

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards[0] += 1
        return self.model(x)


@pytest.mark.parametrize("restarts", [1, 2])
def test_the_trajectory_costs_its_longest_attack_not_the_sum_over_n(
    url: str, model: ResNet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restarts: int
) -> None:
    forwards = [0]

    class CountingFold(FoldedForAttack):
        def current(self) -> Any:
            return _Counted(super().current(), forwards)

    monkeypatch.setattr(evaluation, "FoldedForAttack", CountingFold)
    batches = SUBSET // BATCH
    run(config(url, restarts=restarts), model, tmp_path)
    assert forwards == [batches * restarts * sum(STEPS)]
    forwards[0] = 0
    run(config(url, trajectory=True, restarts=restarts), model, tmp_path)
    assert forwards == [batches * restarts * max(STEPS)]  # 8 steps per start instead of 1 + 2 + 4 + 8


def test_the_default_evaluation_keeps_its_cell_id_and_the_options_enter_it() -> None:
    # The id of the default config before eval.trajectory and eval.restarts existed (orchestrator.grid LATE_FIELDS):
    # at their defaults they evaluate as before, so cells keep their ids, checkpoints and results.
    absent = "b980677fdd36"
    at_default = TrainConfig(data={"url": "builtin://digits"}, eval={"trajectory": False, "restarts": 1})
    assert cell_id(TrainConfig(data={"url": "builtin://digits"})) == absent
    assert cell_id(at_default) == absent
    # Either option changes what the cell reports, so it changes the id.
    ids = {cell_id(TrainConfig(data={"url": "builtin://digits"}, eval=options)) for options in ({}, *_OPTIONS)}
    assert len(ids) == 1 + len(_OPTIONS)


_OPTIONS: list[dict[str, Any]] = [{"trajectory": True}, {"restarts": 2}, {"trajectory": True, "restarts": 2}]


def test_start_seeds_restart_zero_is_the_one_start_seed_and_the_others_differ() -> None:
    assert random_start_seed(0, 10, 0) == random_start_seed(0, 10, 0, 0) == 15840629139254201865
    seeds = {random_start_seed(0, n, b, r) for n in (10, 20) for b in (0, 1) for r in (0, 1, 2)}
    seeds |= {trajectory_start_seed(0, b, r) for b in (0, 1) for r in (0, 1, 2)}
    assert len(seeds) == 12 + 6


def test_the_papers_sweeps_read_one_trajectory_and_stay_comparable_unless_restarts_strengthen_the_attack() -> None:
    for name in ("ablation", "paper-study"):
        spec = load_spec(ROOT / "sweeps" / f"{name}.yaml")
        assert spec.workload.eval.trajectory and spec.workload.eval.restarts == 1
        # Every N is still PGD-N from a random start (Section 3): the paper's numbers stay comparable.
        assert paper_differences(spec) == []
        stronger = spec.workload.eval.model_copy(update={"restarts": 3})
        spec = spec.model_copy(update={"workload": spec.workload.model_copy(update={"eval": stronger})})
        assert paper_differences(spec) == ["evaluation takes the worst of 3 random starts per image (paper: one)"]
