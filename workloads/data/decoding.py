"""Encoded images decoded and augmented in processes beside the training process (the paper's pipeline decodes
in about 50 processes per 8-GPU machine), and whole splits loaded for evaluation."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from workloads import augment as aug
from workloads import slots
from workloads.augment import AugmentConfig
from workloads.data.format import _SHUFFLE, DatasetInfo, SplitInfo, _as_info
from workloads.data.shards import _pixel_tensors, _prefetched, _rank_pieces, _read_rows, _to_tensors
from workloads.fs import open_fs

# ------------------------------------------------------------------------------------------------------------
# Decoding and augmentation


@dataclass(frozen=True)
class _View:
    """How stored images become model inputs for one epoch of one split (train) or for evaluation."""

    info: DatasetInfo
    cfg: AugmentConfig
    name: str  # resolved transform: "paper", "crop_flip" or "none"
    train: bool
    seed: int = 0
    epoch: int = 0
    colour_on_device: bool = False

    @property
    def defers_colour(self) -> bool:
        """Whether the colour maps travel with the batch, for the training device to apply. Only for 3-channel
        datasets: a 1-channel one keeps one plane of colour images, too little for the device to apply an RGB
        map to."""
        return self.colour_on_device and self.train and self.name == "paper" and self.info.image_shape[0] == 3

    @property
    def channels_last(self) -> bool:
        """Whether decoded batches come channels-last in memory: for a GPU worker (the one that takes its colour
        maps to the device), which trains in that layout; a CPU worker gets contiguous (N, C, H, W)."""
        return self.colour_on_device and self.info.encoded

    @property
    def size(self) -> int:
        return self.cfg.size or self.info.image_shape[1]

    def check(self) -> None:
        _, h, w = self.info.image_shape
        if not self.info.encoded and self.name != "paper" and self.size != h:
            raise ValueError(
                f"data.augment.size {self.size} differs from the stored {h}x{w} images of {self.info.url}; only "
                "the 'paper' transform resamples decoded images (or leave size unset)"
            )
        if self.info.encoded and self.name == "crop_flip":
            raise ValueError(
                f"data.augment.name 'crop_flip' needs decoded images of a fixed size; {self.info.url} stores "
                "encoded images: use 'paper' (or 'auto') or 'none'"
            )

    def task_fn(self) -> Callable[..., Any]:
        """fn(*task_args(stored, indices)) -> (N, C, size, size) uint8, and the (N, COLOUR_PARAMS) colour maps with
        them when :attr:`defers_colour`. For encoded images a function of workloads.augment alone with small
        arguments: it is pickled to decoding processes, which import no torch."""
        common: dict[str, Any] = {
            "name": self.name,
            "cfg": self.cfg,
            "size": self.size,
            "seed": self.seed,
            "epoch": self.epoch,
        }
        if self.info.encoded:
            fn: Callable[..., Any] = partial(
                aug.decode_batch,
                train=self.train,
                channels=self.info.image_shape[0],
                channels_last=self.channels_last,
                **common,
            )
        elif self.train and self.name != "none":
            fn = partial(aug.augment_decoded, **common)
        else:
            return _stored
        return partial(aug.deferring_colour, fn) if self.defers_colour else fn

    def task_args(self, stored: np.ndarray, indices: np.ndarray) -> tuple[Any, ...]:
        return (list(stored), indices.tolist()) if self.info.encoded else (stored, indices)


def _stored(images: np.ndarray, indices: np.ndarray) -> np.ndarray:
    return images


def decode_processes() -> int:
    """Decoding processes beside a training process: its CPUs (the Ray worker's CPU resources, else the CPUs this
    process may run on) less the one its own loop keeps busy. 0 decodes in a thread of the training process."""
    cpus: float | None = None
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        with contextlib.suppress(Exception):
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cpus = os.cpu_count() or 1
    return max(0, int(cpus) - 1)


_POOLS: dict[int, ProcessPoolExecutor] = {}
# How long a reader stopped early waits for batches its decoding processes are still writing (one batch each).
STRAGGLER_WAIT_S = 30.0


def _pool(processes: int) -> ProcessPoolExecutor:
    """One pool per process and size, kept across epochs (starting processes every epoch would cost seconds)."""
    pool = _POOLS.get(processes)
    if pool is None or getattr(pool, "_broken", False):
        # forkserver: decoding processes import only workloads.augment and workloads.slots (no torch, no CUDA
        # context, no Ray threads).
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(
            ["workloads.augment", "workloads.slots", "PIL.Image", "PIL.JpegImagePlugin", "numpy"]
        )
        pool = _POOLS[processes] = ProcessPoolExecutor(max_workers=processes, mp_context=ctx)
    return pool


def _ordered_map(
    fn: Callable[..., Any],
    tasks: Iterator[tuple[tuple[Any, ...], Any]],
    processes: int,
    window: int,
    ring: slots.SlotRing | None = None,
    payloads: slots.PayloadSlots | None = None,
) -> Generator[tuple[Any, Any], None, None]:
    """(fn(*args), extra) for every task (args, extra), in task order, at most ``window`` tasks in flight.

    With a ``ring`` of ``window`` slots, decoding processes write fn's result (``fn(*args, out=...)``) into slot
    k % window and the result yielded is a view of that slot: the caller must copy it before asking for the next
    one, when the slot is handed to task k + window. An fn returning (rows, extra) yields (view, extra). With
    ``payloads`` as well, each task's first argument, a list of byte strings, travels through its slot k % window.
    """
    if processes == 0:
        # One thread: PIL releases the GIL while decoding and resampling, so this still overlaps the step.
        yield from _prefetched(((fn(*args), extra) for args, extra in tasks), window)
        return
    if ring is not None and ring.slots < window:
        raise ValueError(f"a ring of {ring.slots} slots cannot hold {window} batches in flight")
    pool = _pool(processes)
    futures: deque[tuple[Future[Any], int, Any]] = deque()

    def submit(k: int, args: tuple[Any, ...]) -> Future[Any]:
        if ring is None:
            return pool.submit(fn, *args)
        if payloads is not None:
            args = (payloads.pack(k % window, args[0]), *args[1:])
        return pool.submit(slots.fill_slot, ring.name, k % window, ring.shape, fn, *args)

    def collect() -> tuple[Any, Any]:
        future, k, extra = futures.popleft()
        result = future.result()
        if ring is not None:
            rows, sent = result
            result = ring.view(k % window)[:rows] if sent is None else (ring.view(k % window)[:rows], sent)
        return result, extra

    try:
        for k, (args, extra) in enumerate(tasks):
            futures.append((submit(k, args), k, extra))
            if len(futures) >= window:
                yield collect()
        while futures:
            yield collect()
    finally:
        running = [future for future, _, _ in futures if not future.cancel()]
        if ring is not None and running:
            # Stopped early: a decoding process may be writing into a slot. Wait for it, or the ring must not be
            # lent again (the late write would land in the next reader's batch).
            _, late = wait(running, timeout=STRAGGLER_WAIT_S)
            if late:
                ring.reusable = False
                if payloads is not None:
                    payloads.reusable = False


def _shuffled_rows(
    chunks: Iterator[tuple[np.ndarray, ...]], capacity: int, rng: np.random.Generator
) -> Generator[tuple[np.ndarray, ...], None, None]:
    """:func:`_shuffled` over rows of several columns (stored image, label, index in the split)."""
    buffers: list[np.ndarray] = []
    size = 0
    for columns in chunks:
        if not buffers:
            buffers = [np.empty((capacity, *c.shape[1:]), dtype=c.dtype) for c in columns]
        n = len(columns[0])
        pos = 0
        if size < capacity:
            pos = min(capacity - size, n)
            for buf, col in zip(buffers, columns, strict=True):
                buf[size : size + pos] = col[:pos]
            size += pos
        while pos < n:
            k = min(capacity, n - pos)
            slots = rng.choice(capacity, size=k, replace=False)
            yield tuple(buf[slots] for buf in buffers)
            for buf, col in zip(buffers, columns, strict=True):
                buf[slots] = col[pos : pos + k]
            pos += k
    if buffers:
        order = rng.permutation(size)
        yield tuple(buf[order] for buf in buffers)


def _row_batches(
    rows: Iterator[tuple[np.ndarray, ...]], batch_size: int, num_batches: int
) -> Generator[tuple[np.ndarray, ...], None, None]:
    pending: list[tuple[np.ndarray, ...]] = []
    count = emitted = 0
    for columns in rows:
        pos = 0
        n = len(columns[0])
        while pos < n:
            k = min(batch_size - count, n - pos)
            pending.append(tuple(c[pos : pos + k] for c in columns))
            count += k
            pos += k
            if count == batch_size:
                yield tuple(np.concatenate(parts) for parts in zip(*pending, strict=True))
                pending, count = [], 0
                emitted += 1
                if emitted == num_batches:
                    return


def _augmented_batches(
    view: _View,
    split: SplitInfo,
    rank: int,
    world_size: int,
    batch_size: int,
    shuffle_buffer: int,
    prefetch: int,
    num_batches: int,
    pinned: bool,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """The reader for transformed images: the same rows in the same order as :func:`_batches` would yield them
    (shard order, rank ranges, a shuffle buffer from the same seed), each carrying its index in the split, which
    seeds its transform; whole batches go to the decoding processes, and come back in order."""
    info = view.info
    fs, root = open_fs(info.url)
    shape = info.image_shape
    starts: dict[str, int] = {}
    offset = 0
    for shard in split.shards:
        starts[shard.path] = offset
        offset += shard.num_images
    pieces = _rank_pieces(split, rank, world_size, view.epoch, view.seed)

    def rows() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for shard, lo, hi in pieces:
            pos = starts[shard.path] + lo
            for stored, labels in _read_rows(fs, root, shard, shape, lo, hi, encoded=info.encoded):
                yield stored, labels, np.arange(pos, pos + len(labels), dtype=np.int64)
                pos += len(labels)

    chunks = _prefetched(rows(), prefetch)
    share = sum(hi - lo for _, lo, hi in pieces)
    shuffled = (
        _shuffled_rows(
            chunks, min(shuffle_buffer, share), np.random.default_rng([_SHUFFLE, view.seed, view.epoch, rank])
        )
        if shuffle_buffer > 0
        else chunks
    )
    processes = decode_processes() if info.encoded else 0
    window = max(2, 2 * processes, prefetch)
    # Decoding processes write batches into shared memory (workloads.slots); decoding threads return them.
    lent = contextlib.ExitStack()
    # Slots hold the batches as `workloads.augment.decode_batch` writes them.
    slot_shape = (
        (batch_size, view.size, view.size, shape[0])
        if view.channels_last
        else (batch_size, shape[0], view.size, view.size)
    )
    ring = lent.enter_context(slots.lent_ring(window, slot_shape)) if processes else None
    payloads = slots.PayloadSlots(window) if processes and info.encoded else None
    if payloads is not None:
        lent.callback(payloads.close)
    batches = _row_batches(shuffled, batch_size, num_batches)
    labelled = _ordered_map(
        view.task_fn(),
        ((view.task_args(stored, indices), labels) for stored, labels, indices in batches),
        processes,
        window,
        ring,
        payloads,
    )
    emitted = 0
    try:
        for result, labels in labelled:
            images, colour = result if isinstance(result, tuple) else (result, None)
            if ring is not None and view.channels_last:
                images = images.transpose(0, 3, 1, 2)  # (N, C, H, W), as decode_batch returns it without a ring
            batch = _pixel_tensors(images, labels, pinned)  # copies the slot, which the next task may overwrite
            del images, result
            yield batch if colour is None else (*batch, torch.from_numpy(colour))
            emitted += 1
        if emitted < num_batches:
            raise RuntimeError(f"{info.url}: rank {rank} ran out of images after {emitted} of {num_batches} batches")
    finally:
        try:
            labelled.close()  # waits for a batch still being written into the ring
            batches.close()
            shuffled.close()
            chunks.close()
        finally:
            lent.close()


def load_split(
    source: str | DatasetInfo, split: str, limit: int | None = None, augment: AugmentConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` images of a split in file order (all if None): the fixed evaluation subset.

    Converters store splits in a seeded random order, so the first k images are a uniform sample. Holds the
    result in memory as float32: pass a limit for large splits. Encoded images get the evaluation view (shorter
    side to size / eval_crop, centre crop; ``augment`` sets size and eval_crop), decoded ones are as stored.
    """
    info = _as_info(source)
    split_info = info.split(split)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    n = split_info.num_images if limit is None else min(limit, split_info.num_images)
    fs, root = open_fs(info.url)
    if not info.encoded:
        images = np.empty((n, *info.image_shape), dtype=np.uint8)
        labels = np.empty(n, dtype=np.int64)
        pos = 0
        for shard in split_info.shards:
            if pos >= n:
                break
            for x, y in _read_rows(fs, root, shard, info.image_shape, 0, min(shard.num_images, n - pos)):
                images[pos : pos + len(x)] = x
                labels[pos : pos + len(y)] = y
                pos += len(x)
        return _to_tensors(images, labels)
    view = _View(info, augment or AugmentConfig(), "none", train=False)
    images = np.empty((n, info.image_shape[0], view.size, view.size), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    tasks = (
        (view.task_args(x, np.arange(len(x))), y)
        for shard in split_info.shards
        for x, y in _read_rows(fs, root, shard, info.image_shape, 0, shard.num_images, encoded=info.encoded)
    )
    processes = decode_processes()
    pos = 0
    results = _ordered_map(view.task_fn(), _until(tasks, n), processes, max(2, 2 * processes))
    try:
        for x, y in results:
            k = min(len(y), n - pos)
            images[pos : pos + k] = x[:k]
            labels[pos : pos + k] = y[:k]
            pos += k
    finally:
        results.close()
    return _to_tensors(images, labels)


def _until(tasks: Iterator[tuple[tuple[Any, ...], np.ndarray]], n: int) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Tasks until they cover ``n`` rows (the last one cut to fit)."""
    if n == 0:
        return
    seen = 0
    for args, labels in tasks:
        take = min(len(labels), n - seen)
        yield tuple(a[:take] for a in args), labels[:take]
        seen += take
        if seen >= n:
            return
