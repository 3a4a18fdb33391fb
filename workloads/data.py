"""Sharded Parquet image datasets on any fsspec URL, and the streaming reader that DDP workers train from.

Layout under a dataset root URL (local path, ``file://`` or ``s3://bucket/prefix``)::

    meta.json                 {"format_version", "num_classes", "image_shape": [C, H, W], "classes": [...],
                               "splits": {"train": {"num_images", "shards": [{"path", "num_images"}, ...]}}}
    train/part-00000.parquet  columns ``image`` (binary), ``label`` (int16/32)
    test/part-00000.parquet

Two encodings of the ``image`` column. Decoded (format 1, the small CPU datasets: digits, synthetic): C*H*W uint8
bytes, row-major, read without any codec and bit-for-bit reproducible. Encoded (format 2, ``"encoding":
"encoded"``, ImageNet from ``python -m workloads.data folder``, see workloads/imagenet.py): the image file's bytes,
decoded and augmented by the reader every epoch as the paper's pipeline does (workloads/augment.py); its
``image_shape`` is the side the reader yields by default, and meta.json also lists the images the converter
skipped.

``meta.json`` is written last (and removed first when a dataset is overwritten), so a reader never pairs it
with half-written shards.

Why shards: the paper trains on 128 GPUs (Section 3); each worker streams only its own share from object
storage (:func:`iter_batches`) instead of every worker downloading the whole set. The small real dataset for
CPU runs, scikit-learn's bundled digits, goes through the same format and code path
(:func:`digits_to_parquet`).

Decoding encoded images runs in processes beside the training process (the paper's pipeline decodes in about 50
processes per 8-GPU machine), as many as the worker's CPUs less one; the choice against Ray Data, with the
measurements, is in docs/benchmarks.md (input_pipeline).

Create a dataset with ``python -m workloads.data digits URL`` (or ``folder SRC URL``, ``synthetic URL ...``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import queue
import re
import sys
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from workloads import augment as aug
from workloads import builtin_data, slots
from workloads.augment import AugmentConfig
from workloads.fs import open_fs, with_retries, write_atomic

__all__ = [
    "DatasetInfo",
    "ShardInfo",
    "SplitInfo",
    "batches_per_epoch",
    "decode_processes",
    "digits_to_parquet",
    "folder_to_parquet",
    "iter_batches",
    "load_split",
    "read_info",
    "synthetic_batch",
    "synthetic_to_parquet",
    "write_dataset",
]

META_FILE = "meta.json"
FORMAT_VERSION = 1  # decoded images; encoded ones are format 2 (workloads/imagenet.py writes them)
ENCODED = "encoded"
# Small row groups let a rank whose share starts or ends inside a shard read only the rows it needs, and bound
# the memory of one read (64 ImageNet images at 224px are ~10 MB).
DEFAULT_ROW_GROUP_SIZE = 64
# Splits become directory names; keep them to one safe path component.
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Purpose tags lead every seed sequence: numpy's SeedSequence treats trailing zeros as absent ([s] == [s, 0]),
# so streams for different purposes must differ before their variable parts.
_SHARD_ORDER, _SHUFFLE, _PROTOTYPES, _SYNTHETIC = 1, 2, 3, 4

# The digits split is part of the dataset's definition: every conversion, on any machine, gives the same one.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


# ------------------------------------------------------------------------------------------------------------
# Metadata


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset root, e.g. "train/part-00000.parquet"
    num_images: int


@dataclass(frozen=True)
class SplitInfo:
    num_images: int
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class DatasetInfo:
    """What ``meta.json`` says, plus the URL it was read from (the file itself holds none: datasets move)."""

    url: str
    num_classes: int
    image_shape: tuple[int, int, int]
    classes: tuple[str, ...]
    splits: dict[str, SplitInfo]
    encoding: str = "raw"  # or "encoded": image files' bytes, decoded by the reader
    skipped: tuple[str, ...] = ()  # source files the converter could not decode

    @property
    def encoded(self) -> bool:
        return self.encoding == ENCODED

    def split(self, name: str) -> SplitInfo:
        try:
            return self.splits[name]
        except KeyError:
            available = ", ".join(sorted(self.splits)) or "none"
            raise ValueError(f"dataset {self.url} has no split {name!r}; available splits: {available}") from None

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "classes": list(self.classes),
            "splits": {
                name: {
                    "num_images": s.num_images,
                    "shards": [{"path": sh.path, "num_images": sh.num_images} for sh in s.shards],
                }
                for name, s in self.splits.items()
            },
        }


def _missing_dataset_message(url: str) -> str:
    bundled = "".join(
        f"`python -m workloads.data {name} {url}` ({dataset.description}, no download), "
        for name, dataset in builtin_data.DATASETS.items()
    )
    return (
        f"no dataset at {url}: {url.rstrip('/')}/{META_FILE} does not exist. Create one with {bundled}"
        f"`python -m workloads.data folder SRC_DIR {url} --image-size 224` (an ImageNet-style tree) or "
        f"`python -m workloads.data synthetic {url} --num-images N`"
    )


def read_info(url: str) -> DatasetInfo:
    """Read ``meta.json`` under ``url``; a clear error says how to create the dataset when there is none."""
    fs, root = open_fs(url)
    try:
        raw = with_retries(lambda: fs.cat_file(f"{root}/{META_FILE}"), f"read {url}/{META_FILE}")
    except FileNotFoundError:
        raise FileNotFoundError(_missing_dataset_message(url)) from None
    try:
        meta = json.loads(raw)
        if int(meta["format_version"]) not in (1, 2):
            raise ValueError(f"format_version {meta['format_version']} is newer than this reader (1 or 2)")
        c, h, w = (int(d) for d in meta["image_shape"])
        splits = {
            str(name): SplitInfo(
                num_images=int(s["num_images"]),
                shards=tuple(ShardInfo(str(sh["path"]), int(sh["num_images"])) for sh in s["shards"]),
            )
            for name, s in meta["splits"].items()
        }
        info = DatasetInfo(
            url=url,
            num_classes=int(meta["num_classes"]),
            image_shape=(c, h, w),
            classes=tuple(str(x) for x in meta["classes"]),
            splits=splits,
            encoding=str(meta.get("encoding", "raw")),
            skipped=tuple(str(x["path"]) for x in meta.get("skipped", ())),
        )
        if info.encoding not in ("raw", ENCODED):
            raise ValueError(f"unknown encoding {info.encoding!r}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{url}/{META_FILE} is malformed ({e!r}); re-create the dataset") from e
    for name, s in info.splits.items():
        if s.num_images != sum(sh.num_images for sh in s.shards):
            raise ValueError(f"{url}/{META_FILE}: split {name!r} num_images does not match its shards")
    return info


def _as_info(source: str | DatasetInfo) -> DatasetInfo:
    return source if isinstance(source, DatasetInfo) else read_info(source)


# ------------------------------------------------------------------------------------------------------------
# Writing


class _DatasetWriter:
    """Appends images split by split and cuts shards as they fill: a converter never holds a whole split."""

    def __init__(
        self,
        url: str,
        image_shape: Sequence[int],
        classes: Sequence[str],
        shard_size: int,
        row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    ) -> None:
        if len(image_shape) != 3 or any(int(d) < 1 for d in image_shape):
            raise ValueError(f"image_shape must be [C, H, W] with positive sizes, got {list(image_shape)}")
        if not classes:
            raise ValueError("a dataset needs at least one class")
        if shard_size < 1 or row_group_size < 1:
            raise ValueError("shard_size and row_group_size must be >= 1")
        self.url = url
        self.image_shape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))
        self.classes = tuple(str(c) for c in classes)
        self.shard_size = shard_size
        self.row_group_size = row_group_size
        self._label_type = pa.int16() if len(self.classes) <= np.iinfo(np.int16).max + 1 else pa.int32()
        self._fs, self._root = open_fs(url)
        self._pending: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._pending_count: dict[str, int] = {}
        self._shards: dict[str, list[ShardInfo]] = {}
        # Hide a previous dataset before its shards are overwritten: its meta.json must not describe new
        # shards.
        meta = f"{self._root}/{META_FILE}"
        if self._fs.exists(meta):
            self._fs.rm_file(meta)

    def add(self, split: str, images: np.ndarray, labels: np.ndarray) -> None:
        if not _SPLIT_NAME.match(split):
            raise ValueError(f"split name {split!r} must be letters, digits, '_', '-' or '.'")
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != self.image_shape:
            raise ValueError(
                f"split {split!r}: images must be uint8 of shape (N, {', '.join(map(str, self.image_shape))})"
                f", got {images.dtype} {images.shape}"
            )
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"split {split!r}: labels must be {len(images)} integers, got {labels.dtype} {labels.shape}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise ValueError(f"split {split!r}: labels must lie in [0, {len(self.classes)})")
        self._pending.setdefault(split, []).append((images, labels))
        self._pending_count[split] = self._pending_count.get(split, 0) + len(images)
        self._shards.setdefault(split, [])
        while self._pending_count[split] >= self.shard_size:
            self._flush(split, self.shard_size)

    def _flush(self, split: str, count: int) -> None:
        # Slices of the pending arrays: one big write_dataset() call must not re-copy its rest for every
        # shard.
        pending = self._pending[split]
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        need = count
        while need:
            images, labels = pending[0]
            if len(images) <= need:
                parts.append(pending.pop(0))
                need -= len(images)
            else:
                parts.append((images[:need], labels[:need]))
                pending[0] = (images[need:], labels[need:])
                need = 0
        self._pending_count[split] -= count
        if len(parts) == 1:
            images, labels = parts[0]
        else:
            images, labels = np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
        self._write_shard(split, images, labels)

    def _write_shard(self, split: str, images: np.ndarray, labels: np.ndarray) -> None:
        shards = self._shards[split]
        rel = f"{split}/part-{len(shards):05d}.parquet"
        table = pa.table({"image": _encode_images(images), "label": pa.array(labels, type=self._label_type)})
        with self._fs.open(f"{self._root}/{rel}", "wb") as f:
            pq.write_table(
                table,
                f,
                row_group_size=self.row_group_size,
                compression="zstd",
                # Pixels are near-random bytes: dictionaries and min/max statistics would only add size.
                use_dictionary=["label"],
                write_statistics=["label"],
            )
        shards.append(ShardInfo(rel, len(images)))

    def close(self) -> DatasetInfo:
        if not self._shards:
            raise ValueError("no split was written")
        for split, rest in self._pending_count.items():
            if rest:
                self._flush(split, rest)
        for split, shards in self._shards.items():
            if not shards:
                raise ValueError(f"split {split!r} has no images")
        info = DatasetInfo(
            url=self.url,
            num_classes=len(self.classes),
            image_shape=self.image_shape,
            classes=self.classes,
            splits={
                name: SplitInfo(sum(s.num_images for s in shards), tuple(shards))
                for name, shards in self._shards.items()
            },
        )
        # Last, and atomically: the dataset exists for readers only once every shard is complete.
        write_atomic(self._fs, f"{self._root}/{META_FILE}", json.dumps(info.to_json(), indent=1).encode())
        return info


def _encode_images(images: np.ndarray) -> pa.Array:
    """A binary column whose values are the images' raw bytes, built without one Python object per image."""
    n = len(images)
    item = math.prod(images.shape[1:])
    data = np.ascontiguousarray(images).reshape(-1)
    # 32-bit offsets overflow past 2 GiB in one shard; large_binary reads back the same way.
    large = n * item > np.iinfo(np.int32).max
    offsets = np.arange(n + 1, dtype=np.int64 if large else np.int32) * item
    return pa.Array.from_buffers(
        pa.large_binary() if large else pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )


def write_dataset(
    url: str,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    classes: Sequence[str],
    shard_size: int = 512,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
) -> DatasetInfo:
    """Write in-memory splits ``{name: (uint8 images (N, C, H, W), integer labels (N,))}`` as a dataset."""
    if not splits:
        raise ValueError("no splits to write")
    shape = next(iter(splits.values()))[0].shape[1:]
    writer = _DatasetWriter(url, shape, classes, shard_size, row_group_size)
    for name, (images, labels) in splits.items():
        writer.add(name, images, labels)
    return writer.close()


# ------------------------------------------------------------------------------------------------------------
# Converters


def _digits_splits(image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 values 0..16 -> 0..255, then bilinear upsampling (torch, align_corners=False, i.e. pixel centres
    # aligned as in PIL/OpenCV) so the ResNet stems built for 32px inputs apply unchanged.
    x = torch.from_numpy(digits.images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = x.round().clamp_(0, 255).to(torch.uint8).numpy()
    labels = digits.target.astype(np.int64)

    # Stratified 80/20 split from a fixed seed. Both splits are stored in a seeded random order, so every
    # shard mixes classes and the first k test images (the fixed evaluation subset) are a uniform sample.
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    train_idx: list[np.ndarray] = []
    test_idx: list[np.ndarray] = []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(len(idx) * DIGITS_TEST_FRACTION)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train = rng.permutation(np.concatenate(train_idx))
    test = rng.permutation(np.concatenate(test_idx))
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


def digits_to_parquet(url: str, image_size: int = 32, shard_size: int = 256) -> DatasetInfo:
    """scikit-learn's bundled handwritten digits (1797 images, 10 classes, no download) as a dataset.

    Images are 1 x image_size x image_size (bilinear upsampling of the 8x8 originals). The split is a fixed
    stratified 80/20 split (seed 0, per-class counts rounded half to even): 1438 train and 359 test
    images on every machine.
    """
    if image_size < 1:
        raise ValueError("image_size must be >= 1")
    return write_dataset(url, _digits_splits(image_size), [str(d) for d in range(10)], shard_size)


def folder_to_parquet(
    src_dir: str | Path,
    url: str,
    image_size: int = 224,
    shard_size: int = 1024,
    *,
    max_side: int = 512,
    quality: int = 90,
    seed: int = 0,
    workers: int | None = None,
    val_labels: str | Path | None = None,
    progress: Any = None,
) -> DatasetInfo:
    """Convert an ImageNet-style tree into an encoded dataset (workloads/imagenet.py: layout, re-encoding,
    resuming, skipped images). ``image_size`` is the side the reader yields unless a cell's ``data.augment.size``
    says otherwise."""
    from workloads.imagenet import convert

    convert(
        src_dir,
        url,
        image_size=image_size,
        max_side=max_side,
        quality=quality,
        shard_size=shard_size,
        seed=seed,
        workers=workers,
        val_labels=val_labels,
        progress=progress,
    )
    return read_info(url)


def _synthetic_arrays(
    n: int, image_shape: Sequence[int], num_classes: int, seed: int, stream: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images = (class prototype + uniform noise) / 2, so the task is learnable, not just shaped right.

    Prototypes are random 4x4 colour blocks upsampled to H x W: tiny even for 1000 classes at 224px, and drawn
    from ``seed`` alone, so every stream of one seed (train, test, in-memory batches) shares them.
    """
    c, h, w = (int(d) for d in image_shape)
    gh, gw = min(4, h), min(4, w)
    protos = np.random.default_rng([_PROTOTYPES, seed]).integers(0, 256, (num_classes, c, gh, gw), dtype=np.uint16)
    rng = np.random.default_rng([_SYNTHETIC, seed, stream])
    labels = rng.integers(0, num_classes, n)
    mean = protos[labels].repeat(-(-h // gh), axis=2).repeat(-(-w // gw), axis=3)[:, :, :h, :w]
    noise = rng.integers(0, 256, (n, c, h, w), dtype=np.uint16)
    return ((mean + noise) // 2).astype(np.uint8), labels


def synthetic_to_parquet(
    url: str,
    num_images: int,
    image_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    seed: int = 0,
    *,
    num_test: int | None = None,
    shard_size: int = 512,
) -> DatasetInfo:
    """A synthetic dataset: ``num_images`` train and ``num_test`` (default num_images // 5) test images."""
    if num_images < 1 or num_classes < 1:
        raise ValueError("num_images and num_classes must be >= 1")
    num_test = max(1, num_images // 5) if num_test is None else num_test
    writer = _DatasetWriter(url, image_shape, [str(i) for i in range(num_classes)], shard_size)
    for stream, (split, total) in enumerate((("train", num_images), ("test", num_test)), start=1):
        # One shard at a time, each from its own seeded stream: memory stays bounded at any size.
        for k, start in enumerate(range(0, total, shard_size)):
            n = min(shard_size, total - start)
            writer.add(split, *_synthetic_arrays(n, image_shape, num_classes, seed, stream * 1_000_003 + k))
    return writer.close()


def synthetic_batch(
    batch: int, image_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One in-memory batch (float32 (B, C, H, W) in [0, 1], int64 labels) for benchmarks; no storage."""
    images, labels = _synthetic_arrays(batch, image_shape, num_classes, seed, stream=0)
    return _to_tensors(images, labels)


# ------------------------------------------------------------------------------------------------------------
# Reading


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # Copies, so callers may reuse their buffers (an int64 .to(torch.int64) would alias them: a caller holding
    # batch k would see batch k+1's labels).
    return torch.from_numpy(images).to(torch.float32).div_(255.0), torch.from_numpy(labels).to(torch.int64, copy=True)


def _pixel_tensors(images: np.ndarray, labels: np.ndarray, pinned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch as stored: uint8 pixels and int64 labels, copied (callers reuse their buffers), into
    page-locked memory when ``pinned`` (a CUDA worker's batches: the upload then needs no second copy).

    Scaling to [0, 1] happens on the worker's device (`workloads.execution.on_device`): a quarter of the bytes
    cross to a GPU, and the input processes spend no CPU on a float copy of every image.
    """
    if pinned:
        # numpy's single-threaded copy into torch's cached pinned blocks. `Tensor.pin_memory()` of a pageable
        # batch costs a second copy, which torch spreads over its intra-op threads: on a 16-core H200 machine that
        # path cost the training process 5.5 ms of CPU per image, this one 0.2 ms (benchmarks/gpu_feed.py).
        # The block keeps the batch's memory layout (channels-last from decoding processes): a straight copy.
        layout = torch.channels_last if _channels_last(images) else torch.contiguous_format
        out = torch.empty(images.shape, dtype=torch.uint8, pin_memory=True, memory_format=layout)
        np.copyto(out.numpy(), images)
        pinned_labels = torch.empty(labels.shape, dtype=torch.int64, pin_memory=True)
        np.copyto(pinned_labels.numpy(), labels, casting="same_kind")
        return out, pinned_labels
    # numpy's copy, not Tensor.clone(): torch maps a fresh 4.8 MB block for every 224 px batch of 32 and faults in
    # each page (1.2 ms a batch on this machine), numpy's allocator reuses freed blocks (0.3 ms). order="K" keeps
    # the memory layout.
    return torch.from_numpy(np.array(images, copy=True, order="K")), torch.from_numpy(labels).to(torch.int64, copy=True)


def _channels_last(images: np.ndarray) -> bool:
    """Whether (N, C, H, W) ``images`` lie in memory as (N, H, W, C)."""
    return images.ndim == 4 and images.transpose(0, 2, 3, 1).flags.c_contiguous and not images.flags.c_contiguous


def _decode(table: pa.Table, shape: tuple[int, int, int], where: str) -> tuple[np.ndarray, np.ndarray]:
    item = math.prod(shape)
    out = np.empty((table.num_rows, item), dtype=np.uint8)
    pos = 0
    for chunk in table.column("image").chunks:
        n = len(chunk)
        if n == 0:
            continue
        if chunk.null_count:
            raise ValueError(f"{where}: null images")
        if not (pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type)):
            chunk = chunk.cast(pa.large_binary())
        offset_type = np.int32 if pa.types.is_binary(chunk.type) else np.int64
        # Slice the raw buffers instead of materialising one bytes object per image.
        offsets = np.frombuffer(chunk.buffers()[1], dtype=offset_type, count=chunk.offset + n + 1)[chunk.offset :]
        if np.any(np.diff(offsets) != item):
            raise ValueError(f"{where}: image sizes differ from image_shape {list(shape)} in {META_FILE}")
        out[pos : pos + n] = np.frombuffer(
            chunk.buffers()[2], np.uint8, count=n * item, offset=int(offsets[0])
        ).reshape(n, item)
        pos += n
    labels = table.column("label").to_numpy().astype(np.int64)
    return out.reshape(table.num_rows, *shape), labels


class _Shard:
    """One open shard file that reopens itself after a storage error (the connection under it may be gone)."""

    def __init__(self, fs: Any, where: str) -> None:
        self.fs, self.where = fs, where
        self._handle: Any = None
        self._file: pq.ParquetFile | None = None

    def file(self) -> pq.ParquetFile:
        if self._file is None:
            self._handle = self.fs.open(self.where, "rb")
            try:
                self._file = pq.ParquetFile(self._handle)
            except Exception:
                self.close()
                raise
        return self._file

    def row_group(self, g: int) -> pa.Table:
        try:
            return self.file().read_row_group(g, columns=["image", "label"])
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(Exception):
                self._handle.close()
        self._handle = self._file = None


def _encoded_rows(table: pa.Table, where: str) -> tuple[np.ndarray, np.ndarray]:
    column = table.column("image")
    if column.null_count:
        raise ValueError(f"{where}: null images")
    payloads = np.empty(table.num_rows, dtype=object)
    payloads[:] = column.to_pylist()
    return payloads, table.column("label").to_numpy().astype(np.int64)


def _read_rows(
    fs: Any, root: str, shard: ShardInfo, shape: tuple[int, int, int], lo: int, hi: int, encoded: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rows [lo, hi) of one shard, one row group at a time; row groups outside the range are never fetched.
    Decoded images come as (N, C, H, W) uint8, encoded ones as an object array of their bytes.

    A storage outage mid-epoch does not end the epoch: opening the shard and each row-group read are retried
    (`fs.with_retries`), on a freshly opened file.
    """
    where = f"{root}/{shard.path}"
    source = _Shard(fs, where)
    try:
        pf = with_retries(source.file, f"open {where}")
        if pf.metadata.num_rows != shard.num_images:
            raise ValueError(
                f"{where} has {pf.metadata.num_rows} rows but {META_FILE} says {shard.num_images}: "
                "the dataset is corrupt or being rewritten"
            )
        start = 0
        for g in range(pf.num_row_groups):
            end = start + pf.metadata.row_group(g).num_rows
            if end > lo and start < hi:
                table = with_retries(partial(source.row_group, g), f"read {where}")
                a, b = max(lo, start) - start, min(hi, end) - start
                part = table.slice(a, b - a)
                yield _encoded_rows(part, where) if encoded else _decode(part, shape, where)
            start = end
            if start >= hi:
                break
    finally:
        source.close()


def batches_per_epoch(source: str | DatasetInfo, split: str, world_size: int, batch_size: int) -> int:
    """Full batches every rank yields per epoch: the smallest rank share // batch_size.

    Shares are contiguous ranges of the split in an epoch's shard order and differ by at most one image
    (see :func:`iter_batches`), so the smallest is num_images // world_size in every epoch.
    """
    if world_size < 1 or batch_size < 1:
        raise ValueError("world_size and batch_size must be >= 1")
    return (_as_info(source).split(split).num_images // world_size) // batch_size


def _rank_pieces(
    split: SplitInfo, rank: int, world_size: int, epoch: int, seed: int
) -> list[tuple[ShardInfo, int, int]]:
    # Every rank derives the same shard order from (seed, epoch), then takes its own contiguous range of the
    # concatenated rows. Ranges are equal to within one image however many shards there are (fewer than ranks
    # included), whereas whole-shard round-robin would leave some ranks a shard short and drop up to a shard
    # per rank each epoch; only the (at most two) shards at a range's ends are shared, by row group.
    order = np.random.default_rng([_SHARD_ORDER, seed, epoch]).permutation(len(split.shards))
    first = split.num_images * rank // world_size
    last = split.num_images * (rank + 1) // world_size
    pieces = []
    start = 0
    for i in order:
        shard = split.shards[i]
        end = start + shard.num_images
        lo, hi = max(first, start), min(last, end)
        if lo < hi:
            pieces.append((shard, lo - start, hi - start))
        start = end
    return pieces


def _prefetched(chunks: Iterator[Any], depth: int) -> Generator[Any, None, None]:
    """Read ahead in a thread, so fetching the next row group from storage overlaps the training step."""
    if depth <= 0:
        yield from chunks
        return
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for chunk in chunks:
                if not put(("chunk", chunk)):
                    return
            put(("end", None))
        except BaseException as e:  # re-raised in the consumer, with its traceback
            put(("error", e))
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # closes the open shard file here, not whenever the generator is collected

    thread = threading.Thread(target=produce, name="shard-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


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


# ------------------------------------------------------------------------------------------------------------
# Command line


def describe(info: DatasetInfo) -> str:
    c, h, w = info.image_shape
    splits = ", ".join(f"{name} {s.num_images} images in {len(s.shards)} shards" for name, s in info.splits.items())
    stored = f"encoded images read as {c}x{h}x{w}" if info.encoded else f"images {c}x{h}x{w}"
    skipped = f"; {len(info.skipped)} unreadable source images skipped (listed in {META_FILE})" if info.skipped else ""
    return f"{info.url}: {splits}; {stored}, {info.num_classes} classes{skipped}"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workloads.data",
        description="Write a sharded Parquet dataset to a local path or s3:// URL.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # One subcommand per built-in dataset, from the registry the sweep's builtin:// URLs are checked against.
    for name, dataset in builtin_data.DATASETS.items():
        bundled = sub.add_parser(name, help=f"{dataset.description} (no download; builtin://{name} in a spec)")
        bundled.add_argument("url")
        bundled.add_argument("--image-size", type=_positive, default=dataset.image_size)
        bundled.add_argument("--shard-size", type=_positive, default=dataset.shard_size)
    folder = sub.add_parser(
        "folder",
        help="an ImageNet-style tree SRC/<split>/<class>/<image> as encoded images (re-run to finish a stopped job)",
    )
    folder.add_argument("src")
    folder.add_argument("url")
    folder.add_argument("--image-size", type=_positive, default=224, help="side the reader yields (default 224)")
    folder.add_argument("--max-side", type=_positive, default=512, help="longer side above which images are re-encoded")
    folder.add_argument("--quality", type=_positive, default=90, help="JPEG quality of re-encoded images")
    folder.add_argument("--shard-size", type=_positive, default=1024)
    folder.add_argument("--val-labels", default=None, help="labels of a split folder without class folders")
    folder.add_argument("--seed", type=int, default=0)
    folder.add_argument("--workers", type=_positive, default=None, help="converting processes (default: every core)")
    synthetic = sub.add_parser("synthetic", help="random class-dependent images, for benchmarks and tests")
    synthetic.add_argument("url")
    synthetic.add_argument("--num-images", type=_positive, required=True)
    synthetic.add_argument("--num-test", type=_positive, default=None)
    synthetic.add_argument("--image-shape", type=_positive, nargs=3, default=[3, 32, 32], metavar=("C", "H", "W"))
    synthetic.add_argument("--num-classes", type=_positive, default=10)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--shard-size", type=_positive, default=512)
    args = parser.parse_args(argv)

    try:
        if args.command in builtin_data.DATASETS:
            info = builtin_data.convert(args.command, args.url, args.image_size, args.shard_size)
        elif args.command == "folder":
            info = folder_to_parquet(
                args.src,
                args.url,
                args.image_size,
                args.shard_size,
                max_side=args.max_side,
                quality=args.quality,
                seed=args.seed,
                workers=args.workers,
                val_labels=args.val_labels,
                progress=sys.stderr,
            )
        else:
            info = synthetic_to_parquet(
                args.url,
                args.num_images,
                args.image_shape,
                args.num_classes,
                args.seed,
                num_test=args.num_test,
                shard_size=args.shard_size,
            )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {describe(info)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
