"""Writing a dataset: shards first, meta.json last (and removed first when a dataset is overwritten)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workloads.data.format import _SPLIT_NAME, DEFAULT_ROW_GROUP_SIZE, META_FILE, DatasetInfo, ShardInfo, SplitInfo
from workloads.fs import open_fs, write_atomic

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
