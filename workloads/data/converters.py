"""Datasets made from scikit-learn's digits, a folder of images (ImageNet), or synthetic prototypes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workloads.data.format import (
    _PROTOTYPES,
    _SYNTHETIC,
    DIGITS_SPLIT_SEED,
    DIGITS_TEST_FRACTION,
    DatasetInfo,
    read_info,
)
from workloads.data.shards import _to_tensors
from workloads.data.writer import _DatasetWriter, write_dataset

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
