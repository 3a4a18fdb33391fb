"""The streaming reader DDP workers train from: each rank reads only its own share of the shards."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import numpy as np
import torch

from workloads.augment import AugmentConfig
from workloads.data.decoding import _augmented_batches, _View
from workloads.data.format import _SHUFFLE, DatasetInfo, SplitInfo, _as_info
from workloads.data.shards import _pixel_tensors, _prefetched, _rank_pieces, _read_rows
from workloads.fs import open_fs

# ------------------------------------------------------------------------------------------------------------
# Reading


def batches_per_epoch(source: str | DatasetInfo, split: str, world_size: int, batch_size: int) -> int:
    """Full batches every rank yields per epoch: the smallest rank share // batch_size.

    Shares are contiguous ranges of the split in an epoch's shard order and differ by at most one image
    (see :func:`iter_batches`), so the smallest is num_images // world_size in every epoch.
    """
    if world_size < 1 or batch_size < 1:
        raise ValueError("world_size and batch_size must be >= 1")
    return (_as_info(source).split(split).num_images // world_size) // batch_size


def _shuffled(
    chunks: Iterator[tuple[np.ndarray, np.ndarray]],
    capacity: int,
    shape: tuple[int, ...],
    rng: np.random.Generator,
) -> Generator[tuple[np.ndarray, np.ndarray], None, None]:
    """A bounded shuffle buffer: once full, each incoming image replaces (and emits) a randomly chosen one."""
    buf_images = np.empty((capacity, *shape), dtype=np.uint8)
    buf_labels = np.empty(capacity, dtype=np.int64)
    size = 0
    for images, labels in chunks:
        pos = 0
        if size < capacity:
            pos = min(capacity - size, len(images))
            buf_images[size : size + pos] = images[:pos]
            buf_labels[size : size + pos] = labels[:pos]
            size += pos
        while pos < len(images):
            k = min(capacity, len(images) - pos)
            slots = rng.choice(capacity, size=k, replace=False)
            yield buf_images[slots], buf_labels[slots]  # fancy indexing copies before the slots are refilled
            buf_images[slots] = images[pos : pos + k]
            buf_labels[slots] = labels[pos : pos + k]
            pos += k
    order = rng.permutation(size)
    yield buf_images[order], buf_labels[order]


def iter_batches(
    source: str | DatasetInfo,
    split: str,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    seed: int = 0,
    shuffle_buffer: int = 0,
    prefetch: int = 2,
    augment: AugmentConfig | None = None,
    colour_on_device: bool = False,
    pinned: bool = False,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Stream this rank's share of a split as (uint8 (B, C, H, W), int64 (B,)) batches; the training loop scales
    the pixels to [0, 1] on its device (`workloads.execution.on_device`).

    The shard order is a permutation drawn from (seed, epoch), the same on every rank; each rank reads only a
    contiguous range of about num_images / world_size rows of that order (disjoint across ranks, together the
    whole split), shard by shard and row group by row group, never the whole split. ``shuffle_buffer`` images
    are mixed in a buffer seeded by (seed, epoch, rank); 0 keeps the (permuted) file order. Every rank stops
    after exactly :func:`batches_per_epoch` full batches and drops the rest: DDP collectives deadlock when
    ranks run different numbers of steps. Arguments are checked here, before the first batch is requested.

    ``augment`` (a cell's ``data.augment``; None is its default) transforms each image with draws seeded by
    (seed, epoch, the image's index in the split): encoded datasets are decoded and augmented in processes
    beside this one (:func:`decode_processes`), decoded ones read as stored unless a transform is asked for.

    ``colour_on_device`` (a GPU worker): the "paper" transform's colour jitter and lighting, an eighth of the
    decoding processes' work, are left to the device; each batch then carries a third element, the images'
    (B, COLOUR_PARAMS) float32 colour maps (`workloads.augment.colour_map`), which `workloads.execution.on_device`
    applies there. Other transforms ignore it and yield pairs. Decoded images then also come laid out
    channels-last in memory, the GPU's layout. ``pinned`` (a CUDA worker): batches are copied
    out into page-locked memory, which the upload to the GPU reads without another copy; it needs CUDA.
    """
    info = _as_info(source)
    split_info = info.split(split)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    if seed < 0 or epoch < 0 or shuffle_buffer < 0:
        raise ValueError("seed, epoch and shuffle_buffer must be >= 0")
    if pinned and not torch.cuda.is_available():
        raise ValueError("pinned batches are for uploads to a CUDA GPU, and this process sees none: pinned=False")
    num_batches = batches_per_epoch(info, split, world_size, batch_size)
    if num_batches == 0:
        raise ValueError(
            f"split {split!r} of {info.url} has {split_info.num_images} images, fewer than "
            f"world_size x batch_size = {world_size} x {batch_size}: no rank would get a full batch"
        )
    cfg = augment or AugmentConfig()
    name = cfg.resolved(info.encoded)
    if not info.encoded and name == "none":
        return _batches(
            info, split_info, rank, world_size, batch_size, epoch, seed, shuffle_buffer, prefetch, num_batches, pinned
        )
    view = _View(info, cfg, name, train=True, seed=seed, epoch=epoch, colour_on_device=colour_on_device)
    view.check()
    return _augmented_batches(
        view, split_info, rank, world_size, batch_size, shuffle_buffer, prefetch, num_batches, pinned
    )


def _batches(
    info: DatasetInfo,
    split: SplitInfo,
    rank: int,
    world_size: int,
    batch_size: int,
    epoch: int,
    seed: int,
    shuffle_buffer: int,
    prefetch: int,
    num_batches: int,
    pinned: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    fs, root = open_fs(info.url)
    shape = info.image_shape
    pieces = _rank_pieces(split, rank, world_size, epoch, seed)
    chunks = _prefetched(
        (chunk for shard, lo, hi in pieces for chunk in _read_rows(fs, root, shard, shape, lo, hi)), prefetch
    )
    share = sum(hi - lo for _, lo, hi in pieces)
    samples = (
        _shuffled(chunks, min(shuffle_buffer, share), shape, np.random.default_rng([_SHUFFLE, seed, epoch, rank]))
        if shuffle_buffer > 0
        else chunks
    )
    batch_images = np.empty((batch_size, *shape), dtype=np.uint8)
    batch_labels = np.empty(batch_size, dtype=np.int64)
    fill = emitted = 0
    try:
        for images, labels in samples:
            pos = 0
            while pos < len(images):
                k = min(batch_size - fill, len(images) - pos)
                batch_images[fill : fill + k] = images[pos : pos + k]
                batch_labels[fill : fill + k] = labels[pos : pos + k]
                fill += k
                pos += k
                if fill == batch_size:
                    yield _pixel_tensors(batch_images, batch_labels, pinned)
                    emitted += 1
                    fill = 0
                    if emitted == num_batches:
                        return
        raise RuntimeError(f"{info.url}: rank {rank} ran out of images after {emitted} of {num_batches} batches")
    finally:
        samples.close()
        chunks.close()
