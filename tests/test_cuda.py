"""The CUDA path of the input pipeline and of a training epoch. Skipped on machines without a CUDA GPU (CI has
none); `scripts/gpu_checks.sh` runs this module on a GPU machine.

What only a GPU exercises: `execution.on_device` uploads uint8 batches and their colour maps through pinned
memory on a side stream and applies the maps there; the reader copies batches out into pinned memory;
`train.train_epoch` asks the reader for both when the device is CUDA; and the graphed attack
(`attacks.GraphedAttack`) captures the whole training attack as a CUDA graph.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from workloads import data, execution, imagenet, train
from workloads.attacks import GraphedAttack, pgd
from workloads.augment import AugmentConfig
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
from workloads.data import decoding
from workloads.models import build_model, use_channels_last
from workloads.sessions import LocalSession

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_checks.sh)")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> data.DatasetInfo:
    src = imagenet.sample_tree(tmp_path_factory.mktemp("src") / "imagenet", per_class=6, val_per_class=2)
    url = str(tmp_path_factory.mktemp("ds") / "imagenet")
    return data.folder_to_parquet(src, url, shard_size=8, val_labels=src.parent / "imagenet_val_labels.txt")


@pytest.mark.parametrize("processes", [0, 2])
def test_colour_maps_applied_on_the_gpu_match_the_cpu(
    dataset: data.DatasetInfo, monkeypatch: pytest.MonkeyPatch, processes: int
) -> None:
    monkeypatch.setattr(decoding, "decode_processes", lambda: processes)
    kwargs = {"batch_size": 8, "epoch": 2, "seed": 5, "shuffle_buffer": 16, "colour_on_device": True}
    batches = list(data.iter_batches(dataset, "train", pinned=True, **kwargs))  # type: ignore[arg-type]
    assert batches and all(len(batch) == 3 for batch in batches)
    # What a CUDA worker reads: batches copied out into page-locked memory, the same pixels as pageable ones.
    assert all(images.is_pinned() and labels.is_pinned() for images, labels, _ in batches)
    # Laid out channels-last, as the decoding processes wrote them and as the GPU trains: no transpose anywhere.
    assert all(images.is_contiguous(memory_format=torch.channels_last) for images, _, _ in batches)
    # on_device's pin_memory() then hands them over as they are: no second copy.
    assert all(images.pin_memory().data_ptr() == images.data_ptr() for images, _, _ in batches)
    pageable = list(data.iter_batches(dataset, "train", **kwargs))  # type: ignore[arg-type]
    assert all(torch.equal(a[0], b[0]) and not b[0].is_pinned() for a, b in zip(batches, pageable, strict=True))
    gpu = execution.resolve_execution(PerformanceConfig(precision="bf16"), torch.device("cuda"))
    cpu = execution.resolve_execution(PerformanceConfig(), torch.device("cpu"))
    assert gpu.channels_last
    pairs = list(zip(execution.on_device(iter(batches), gpu), execution.on_device(iter(batches), cpu), strict=True))
    assert len(pairs) == len(batches)
    for (x_gpu, y_gpu), (x_cpu, y_cpu) in pairs:
        assert x_gpu.is_cuda and x_gpu.dtype == torch.float32
        assert x_gpu.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y_gpu.cpu(), y_cpu)
        diff = (x_gpu.cpu() - x_cpu).abs() * 255
        # The same float32 arithmetic; the GPU sums the mean grey in another order, which can move a rounding.
        assert float(diff.max()) <= 1.001 and float(diff.mean()) < 1e-3
    # The maps changed the pixels: a batch scaled without its maps differs.
    plain = execution.to_unit_range(batches[0][0]).cuda()
    assert not torch.allclose(plain, pairs[0][0][0])


def test_a_training_epoch_on_the_gpu_reads_jpeg_shards(
    dataset: data.DatasetInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = TrainConfig(
        data=DataConfig(url=dataset.url, eval_split="val", augment=AugmentConfig(size=64)),
        model=ModelConfig(depth=18, width=0.25, stem="imagenet"),
        attack=AttackConfig(steps=2),
        training=TrainingConfig(strategy="mixture", clean_ratio=0.5),
        recipe=RecipeConfig(batch_size=8, per_worker_batch=8, epochs=2),
        use_gpu=True,
    )
    run = train.set_up(cfg, LocalSession(tmp_path, use_gpu=True))
    assert run.execution.device.type == "cuda" and run.execution.precision == "bf16"
    seen: list[int] = []
    original = train.on_device

    def counting(batches, ex):  # type: ignore[no-untyped-def]
        def read():  # type: ignore[no-untyped-def]
            for batch in batches:  # the reader's batches: pinned, with colour maps for the device
                assert len(batch) == 3 and batch[0].is_pinned()
                yield batch

        for images, labels in original(read(), ex):
            assert images.is_cuda and images.shape[1:] == (3, 64, 64)
            seen.append(len(labels))
            yield images, labels

    monkeypatch.setattr(train, "on_device", counting)
    first = train.train_epoch(run, 0)
    second = train.train_epoch(run, 1)
    assert sum(seen) == 2 * run.steps_per_epoch * 8
    assert math.isfinite(first["loss"]) and math.isfinite(second["loss"])
    assert 0 <= second["train_acc_adv"] <= 1 and 0 <= second["train_acc_clean"] <= 1


def test_the_graphed_attack_is_as_strong_as_the_eager_attack() -> None:
    """The training attack as one captured CUDA graph over the compiled BN-folded copy (bf16, channels-last, as a
    GPU cell trains), against the eager attack on the uncompiled copy from the same random draws: robust accuracy
    on a fixed batch of 64 within one image, before and after a training step changes the weights in place (the
    replay must read the refreshed copy)."""
    device = torch.device("cuda")
    ex = execution.resolve_execution(PerformanceConfig(precision="bf16", compile=True, graph_attack=True), device)
    execution.configure_backends(ex)
    torch.manual_seed(0)
    net = build_model(ModelConfig(depth=18, width=0.25, stem="small"), num_classes=10).to(device)
    use_channels_last(net)
    models = train.Models.around(net, ex, world_size=1, grad_accum_steps=1)
    eager = FoldedForAttack(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    images = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    images = images.contiguous(memory_format=torch.channels_last)
    common: dict[str, Any] = {"num_classes": 10, "steps": 10, "eps": 16.0, "step_size": 4.0, "clean_start_prob": 0.2}
    common["amp_dtype"] = ex.amp_dtype
    for attempt in range(2):
        net.eval()
        with torch.no_grad():
            labels = net(images).argmax(1)  # clean accuracy 64 / 64: what the attack removes is what it found
        graphed_model = models.attacked()
        assert isinstance(graphed_model, GraphedAttack)
        graphed = pgd(graphed_model, images, labels, generator=torch.Generator().manual_seed(attempt), **common)
        reference = pgd(eager.current(), images, labels, generator=torch.Generator().manual_seed(attempt), **common)
        assert graphed.is_contiguous(memory_format=torch.channels_last)
        assert float((graphed - images).abs().max()) <= 16 / 255 + 1e-6 and 0 <= graphed.min() <= graphed.max() <= 1
        with torch.no_grad():
            robust_graphed = int((net(graphed).argmax(1) == labels).sum())
            robust_eager = int((net(reference).argmax(1) == labels).sum())
        assert robust_eager < 64  # the attack worked
        assert abs(robust_graphed - robust_eager) <= 1, (attempt, robust_graphed, robust_eager)
        net.train()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(images), (labels + 1) % 10).backward()
        optimizer.step()
    assert graphed_model.programs == 1  # captured once, replayed after the weights changed
