"""Datasets shipped with the project's dependencies, named `builtin://<name>` in a spec: the registry.

A built-in dataset is converted once into the sharded format every other dataset uses (workloads.data), under a
folder the caller chooses (the sweep's storage, or a single-cell run's output), so training reads it through the
same code path as ImageNet shards. Everything that names built-in datasets reads `DATASETS`: spec validation
(workloads.config, so `--plan` refuses an unknown name before Ray starts), the conversion (`materialise`, which
the sweep driver and `python -m workloads.train` call), the `python -m workloads.data` subcommands, and the plan's
image counts. The registry imports neither torch nor the converters, so validation and planning stay fast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workloads.data import DatasetInfo

PREFIX = "builtin://"


@dataclass(frozen=True)
class BuiltinDataset:
    """One bundled dataset and its conversion."""

    description: str  # for messages and the data CLI's help
    # Name of the function in workloads.data that writes it: (url, image_size, shard_size) -> DatasetInfo.
    # A name, not the function: workloads.data imports torch, which validation and planning do without.
    converter: str
    image_size: int  # side of the converted images (the data CLI may choose another; `materialise` uses this)
    shard_size: int  # images per shard
    # Images per split of the conversion at `image_size`: fixed by the dataset's definition (a seeded split),
    # so the plan knows them without converting (tests/test_dataset_registry.py checks them against a conversion).
    split_images: Mapping[str, int]


DATASETS: dict[str, BuiltinDataset] = {
    "digits": BuiltinDataset(
        description="scikit-learn's 1,797 handwritten digits (8x8, 10 classes), shipped inside the package",
        converter="digits_to_parquet",
        image_size=32,
        shard_size=256,
        split_images={"train": 1438, "test": 359},
    ),
}


def is_builtin(url: str) -> bool:
    return url.startswith(PREFIX)


def known() -> str:
    """The registered URLs, for messages: 'builtin://digits, ...'."""
    return ", ".join(f"{PREFIX}{name}" for name in DATASETS)


def lookup(url: str) -> BuiltinDataset:
    """The registry entry of `builtin://<name>`; ValueError naming the known datasets when there is none."""
    dataset = DATASETS.get(url.removeprefix(PREFIX)) if is_builtin(url) else None
    if dataset is None:
        raise ValueError(f"unknown built-in dataset {url!r} (known: {known()})")
    return dataset


def check_builtin(url: str) -> None:
    """ValueError naming the known datasets when `url` is `builtin://<unknown>`; nothing for other URLs."""
    if is_builtin(url):
        lookup(url)


def convert(name: str, url: str, image_size: int | None = None, shard_size: int | None = None) -> DatasetInfo:
    """Write built-in dataset `name` to `url` (the registry's image and shard sizes unless given); its DatasetInfo."""
    from workloads import data

    dataset = DATASETS[name]
    converter: Callable[[str, int, int], DatasetInfo] = getattr(data, dataset.converter)
    return converter(url, image_size or dataset.image_size, shard_size or dataset.shard_size)


def materialise(url: str, root: str, log: Callable[[str], None] = print) -> str:
    """The sharded dataset for built-in `url`, converted into `<root>/datasets/<name>` unless already there."""
    from workloads import data

    lookup(url)
    name = url.removeprefix(PREFIX)
    target = f"{root.rstrip('/')}/datasets/{name}"
    try:
        data.read_info(target)
    except FileNotFoundError:
        log(f"preparing {url} in {target}")
        convert(name, target)
    return target
