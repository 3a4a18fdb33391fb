"""Shared-memory slots between the reader and its decoding processes (workloads/slots.py), on real JPEGs."""

from __future__ import annotations

from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np
import pytest
import torch

from workloads import data, imagenet, slots
from workloads.augment import AugmentConfig
from workloads.config import PerformanceConfig
from workloads.data import decoding
from workloads.execution import on_device, resolve_execution


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
    monkeypatch.setattr(decoding, "decode_processes", lambda: processes)
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
    # A CPU worker's batches are contiguous (N, C, H, W) as the decoders wrote them; a GPU worker's (colour left to
    # the device) come channels-last, the same pixels, through the ring and from a thread alike.
    assert all(x.is_contiguous() for x in shared + threaded)
    for processes in (2, 0):
        monkeypatch.setattr(decoding, "decode_processes", lambda n=processes: n)
        gpu = [
            x
            for x, _, _ in data.iter_batches(
                dataset,
                "train",
                batch_size=4,
                epoch=1,
                seed=2,
                shuffle_buffer=8,
                augment=AugmentConfig(size=40),
                colour_on_device=True,
            )
        ]
        assert len(gpu) == 6 and all(x.is_contiguous(memory_format=torch.channels_last) for x in gpu)
        assert not any(x.is_contiguous() for x in gpu)


def test_the_cpu_path_makes_channels_last_batches_contiguous(
    dataset: data.DatasetInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decoding, "decode_processes", lambda: 1)
    batches = data.iter_batches(dataset, "train", batch_size=4, augment=AugmentConfig(size=40), colour_on_device=True)
    first_two = [next(batches), next(batches)]
    batches.close()  # type: ignore[attr-defined]
    assert all(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() for x, *_ in first_two)
    cpu = resolve_execution(PerformanceConfig(), torch.device("cpu"))
    scaled = [images for images, _ in on_device(iter(first_two), cpu)]
    assert len(scaled) == 2
    assert all(x.is_contiguous() and x.dtype == torch.float32 and x.shape == (4, 3, 40, 40) for x in scaled)


def _recording_rings(monkeypatch: pytest.MonkeyPatch) -> list[slots.SlotRing]:
    made: list[slots.SlotRing] = []
    original = slots.SlotRing

    def recording(*args: object) -> slots.SlotRing:
        ring = original(*args)  # type: ignore[arg-type]
        made.append(ring)
        return ring

    monkeypatch.setattr(slots, "SlotRing", recording)
    slots.close_idle_rings()  # rings lent to earlier tests' readers
    return made


def test_readers_reuse_their_rings_and_keep_at_most_four_idle(
    dataset: data.DatasetInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = _recording_rings(monkeypatch)
    monkeypatch.setattr(decoding, "decode_processes", lambda: 1)
    batches = data.iter_batches(dataset, "train", batch_size=4, augment=AugmentConfig(size=40))
    first, _ = next(batches)
    batches.close()  # type: ignore[attr-defined]
    # One ring for decoded batches, one (a byte ring) for the encoded images going the other way.
    assert [len(ring.shape) for ring in made] == [4, 1] and all(r.reusable and not _gone(r.name) for r in made)
    assert first.shape == (4, 3, 40, 40) and first.dtype == torch.uint8 and int(first.max()) > 0
    # The next epoch's reader borrows the same segments and reads the same images through them.
    again = list(data.iter_batches(dataset, "train", batch_size=4, augment=AugmentConfig(size=40)))
    assert len(made) == 2 and torch.equal(again[0][0], first)
    threaded = _batches(dataset, 0, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(_batches(dataset, 1, monkeypatch), threaded, strict=True))
    # Readers of three more batch geometries (their encoded images fit the same byte ring): the least recently
    # used idle ring is let go.
    for size in (40, 44, 48):
        list(data.iter_batches(dataset, "train", batch_size=2, augment=AugmentConfig(size=size)))
    batch_rings = [ring for ring in made if len(ring.shape) == 4]
    assert len(made) == 5 and len(batch_rings) == 4
    assert _gone(batch_rings[0].name) and not any(_gone(r.name) for r in made if r is not batch_rings[0])
    slots.close_idle_rings()
    assert all(_gone(ring.name) for ring in made)


def test_encoded_images_reach_decoding_processes_through_shared_memory(
    dataset: data.DatasetInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[object] = []
    submit = decoding.ProcessPoolExecutor.submit

    def recording(pool: decoding.ProcessPoolExecutor, fn: object, *args: object) -> object:
        sent.append(args[4])  # fill_slot's (name, slot, shape, fn, payloads, ...)
        return submit(pool, fn, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(decoding.ProcessPoolExecutor, "submit", recording)
    threaded = _batches(dataset, 0, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(_batches(dataset, 1, monkeypatch), threaded, strict=True))
    assert sent and all(isinstance(p, slots.Packed) and len(p.ends) == 4 for p in sent)
    # A batch too large for its slot travels through the pipe, and decodes the same.
    sent.clear()
    monkeypatch.setattr(slots.PayloadSlots, "pack", lambda self, slot, items: items)
    assert all(torch.equal(a, b) for a, b in zip(_batches(dataset, 1, monkeypatch), threaded, strict=True))
    assert sent and all(isinstance(p, list) for p in sent)


def test_byte_slots_round_trip_and_refuse_what_does_not_fit() -> None:
    items = [b"", b"abc", bytes(range(256)) * 10]
    payloads = slots.PayloadSlots(2)
    try:
        packed = payloads.pack(1, items)
        assert isinstance(packed, slots.Packed) and packed.capacity == slots.PayloadSlots.MIN_CAPACITY
        assert slots._unpacked(packed) == items
        empty = payloads.pack(0, [])
        assert isinstance(empty, slots.Packed) and slots._unpacked(empty) == []
        big = [b"x" * (packed.capacity + 1)]
        assert payloads.pack(0, big) is big
    finally:
        payloads.close()
        slots.close_idle_rings()  # not lent to a later test's reader


def test_a_payload_ring_a_straggler_may_still_read_is_not_lent_again() -> None:
    payloads = slots.PayloadSlots(2)
    packed = payloads.pack(0, [b"jpeg"])
    assert isinstance(packed, slots.Packed)
    payloads.reusable = False  # what the reader sets when a decoding process outlived its wait
    payloads.close()
    assert _gone(packed.name)
    kept = slots.PayloadSlots(2)
    again = kept.pack(0, [b"jpeg"])
    kept.close()  # reusable: kept idle for the next reader
    assert isinstance(again, slots.Packed) and again.name != packed.name and not _gone(again.name)
    slots.close_idle_rings()
    assert _gone(again.name)


def _slow_fill(value: int, seconds: float, out: np.ndarray) -> np.ndarray:
    """A decoding task that takes ``seconds`` (a slow image), then fills its slot with ``value``."""
    import time

    time.sleep(seconds)
    out[:] = value
    return out


def test_a_reader_stopped_early_waits_for_the_batches_still_being_written(monkeypatch: pytest.MonkeyPatch) -> None:
    made = _recording_rings(monkeypatch)
    with slots.lent_ring(2, (2, 3)) as ring:
        # Two decoding processes: task 1 is still being written when the reader stops after task 0.
        tasks = iter([((0, 0.0), None), ((9, 1.0), None)])
        results = decoding._ordered_map(_slow_fill, tasks, 2, 2, ring)
        first, _ = next(results)
        assert first.tolist() == [[0, 0, 0]] * 2
        del first
        results.close()
        # Nothing writes into the ring once its reader has closed: the next reader may have it.
        assert ring.view(1).tolist() == [[9, 9, 9]] * 2 and ring.reusable
    assert len(made) == 1 and not _gone(made[0].name)
    slots.close_idle_rings()


def _wait_for(path: str, value: int, out: np.ndarray) -> np.ndarray:
    """A task that fills its slot only once ``path`` exists (or after a minute)."""
    import os
    import time

    deadline = time.monotonic() + 60
    while value and not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    out[:] = value
    return out


def test_a_ring_still_being_written_after_its_reader_stopped_is_never_lent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = _recording_rings(monkeypatch)
    monkeypatch.setattr(decoding, "STRAGGLER_WAIT_S", 0.2)
    release = str(tmp_path / "release")
    try:
        with slots.lent_ring(2, (2, 3)) as ring:
            # Task 0 returns at once, task 1 blocks in the decoding process until released.
            results = decoding._ordered_map(_wait_for, iter([((release, 0), None), ((release, 1), None)]), 1, 2, ring)
            first, _ = next(results)
            assert first.tolist() == [[0, 0, 0]] * 2
            del first
            results.close()
            assert not ring.reusable
        assert _gone(made[0].name)  # closed and unlinked, not kept for the next reader
    finally:
        open(release, "w").close()  # let the decoding process finish (into its own, now nameless, mapping)
    with slots.lent_ring(2, (2, 3)) as fresh:
        assert len(made) == 2 and fresh.reusable
    slots.close_idle_rings()


def test_fill_slot_writes_only_its_slot() -> None:
    with slots.SlotRing(2, (3, 2)) as ring:
        ring.view(0)[:] = 7

        def fill(value: int, out: np.ndarray) -> np.ndarray:
            out[:2] = value
            return out[:2]

        assert slots.fill_slot(ring.name, 1, (3, 2), fill, 5) == (2, None)
        assert ring.view(0).tolist() == [[7, 7]] * 3
        assert ring.view(1).tolist() == [[5, 5], [5, 5], [0, 0]]
        # Something small beside the rows comes back with their count.
        assert slots.fill_slot(ring.name, 0, (3, 2), lambda out: (fill(4, out), "maps")) == (2, "maps")
        assert ring.view(0).tolist() == [[4, 4], [4, 4], [7, 7]]
    assert _gone(ring.name)
