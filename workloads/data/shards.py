"""Reading a split's shards: a rank's share of rows, decoded pixels as tensors, prefetched from storage."""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections.abc import Generator, Iterator
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from workloads.data.format import _SHARD_ORDER, META_FILE, ShardInfo, SplitInfo
from workloads.fs import with_retries


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
