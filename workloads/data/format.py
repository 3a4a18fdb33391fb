"""The dataset format: meta.json and what it says of the shards (workloads.data's docstring has the layout)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from workloads import builtin_data
from workloads.fs import open_fs, with_retries

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
