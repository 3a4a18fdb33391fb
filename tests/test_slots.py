"""Shared-memory slots between the reader and its decoding processes (workloads/slots.py), on real JPEGs."""

from __future__ import annotations

from multiprocessing.shared_memory import SharedMemory

import numpy as np
import pytest
import torch

from workloads import data, imagenet, slots
from workloads.augment import AugmentConfig


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> data.DatasetInfo:
    root = tmp_path_factory.mktemp("slots")
    src = imagenet.sample_tree(root / "src", classes=3, per_class=8, val_per_class=1, sizes=(64, 300), odd_files=False)
    return data.folder_to_parquet(src, str(root / "ds"), shard_size=8, val_labels=root / "src_val_labels.txt")


def _gone(name: str) -> bool:
    try:
        SharedMemory(name=name).close()
    except FileNotFoundError:
        return True
    return False


def test_ring_views_are_disjoint_and_close_unlinks_the_segment() -> None:
    ring = slots.SlotRing(3, (2, 3, 4, 4))
    for k in range(3):
        ring.view(k)[:] = k + 1
    assert [int(ring.view(k).min()) for k in range(3)] == [1, 2, 3]
    held = ring.view(1)  # a view still held does not stop the segment from being unlinked
    ring.close()
    assert _gone(ring.name)
    assert int(held.max()) == 2
    with pytest.raises(ValueError, match="closed"):
        ring.view(0)
    with pytest.raises(ValueError, match="slots"):
        slots.SlotRing(0, (1,))


def _batches(info: data.DatasetInfo, processes: int, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    monkeypatch.setattr(data, "decode_processes", lambda: processes)
    return [
        x
        for x, _ in data.iter_batches(
            info, "train", batch_size=4, epoch=1, seed=2, shuffle_buffer=8, augment=AugmentConfig(size=40)
        )
    ]


def test_batches_through_shared_memory_equal_decoding_in_the_training_process(
    dataset: data.DatasetInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    threaded = _batches(dataset, 0, monkeypatch)
    # Two processes keep 4 batches in flight through a ring of 4 slots, reused every 4 batches: every batch held
    # here must still be the one it was when it was yielded.
    shared = _batches(dataset, 2, monkeypatch)
    assert len(shared) == len(threaded) == 6
    assert all(torch.equal(a, b) for a, b in zip(shared, threaded, strict=True))
    assert len({bytes(x.numpy()) for x in shared}) == len(shared)


def test_a_reader_closed_early_unlinks_its_ring(dataset: data.DatasetInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[slots.SlotRing] = []
    original = slots.SlotRing

    def recording(*args: object) -> slots.SlotRing:
        ring = original(*args)  # type: ignore[arg-type]
        made.append(ring)
        return ring

    monkeypatch.setattr(slots, "SlotRing", recording)
    monkeypatch.setattr(data, "decode_processes", lambda: 1)
    batches = data.iter_batches(dataset, "train", batch_size=4, augment=AugmentConfig(size=40))
    first, _ = next(batches)
    batches.close()  # type: ignore[attr-defined]
    assert len(made) == 1 and _gone(made[0].name)
    assert first.shape == (4, 3, 40, 40) and first.dtype == torch.uint8 and int(first.max()) > 0
    # The processes attached to the old segment write into the next epoch's new one.
    again = list(data.iter_batches(dataset, "train", batch_size=4, augment=AugmentConfig(size=40)))
    assert len(made) == 2 and _gone(made[1].name)
    assert torch.equal(again[0][0], first)


def test_fill_slot_writes_only_its_slot() -> None:
    with slots.SlotRing(2, (3, 2)) as ring:
        ring.view(0)[:] = 7

        def fill(value: int, out: np.ndarray) -> np.ndarray:
            out[:2] = value
            return out[:2]

        assert slots.fill_slot(ring.name, 1, (3, 2), fill, 5) == 2
        assert ring.view(0).tolist() == [[7, 7]] * 3
        assert ring.view(1).tolist() == [[5, 5], [5, 5], [0, 0]]
    assert _gone(ring.name)
