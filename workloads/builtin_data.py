"""Datasets shipped with the project's dependencies, named `builtin://<name>` in a spec: the registry.

A built-in dataset is converted once into the sharded format every other dataset uses (workloads.data), under a
folder the caller chooses (the sweep's storage, or a single-cell run's output), so training reads it through the
same code path as ImageNet shards. The names are known without importing torch, so a spec naming an unknown one
is refused at validation (`--plan` included).
"""

from __future__ import annotations

from collections.abc import Callable

PREFIX = "builtin://"

# name -> what it is (for messages and docs); the converters are looked up lazily (they import torch).
DATASETS: dict[str, str] = {
    "digits": "scikit-learn's 1,797 handwritten digits (8x8, 10 classes), shipped inside the package",
}


def is_builtin(url: str) -> bool:
    return url.startswith(PREFIX)


def check_builtin(url: str) -> None:
    """ValueError naming the known datasets when `url` is `builtin://<unknown>`; nothing for other URLs."""
    if is_builtin(url) and url.removeprefix(PREFIX) not in DATASETS:
        known = ", ".join(f"{PREFIX}{name}" for name in DATASETS)
        raise ValueError(f"unknown built-in dataset {url!r} (known: {known})")


def _converter(name: str) -> Callable[[str], object]:
    from workloads import data

    converters: dict[str, Callable[[str], object]] = {"digits": data.digits_to_parquet}
    return converters[name]


def materialise(url: str, root: str, log: Callable[[str], None] = print) -> str:
    """The sharded dataset for built-in `url`, converted into `<root>/datasets/<name>` unless already there."""
    from workloads import data

    check_builtin(url)
    name = url.removeprefix(PREFIX)
    target = f"{root.rstrip('/')}/datasets/{name}"
    try:
        data.read_info(target)
    except FileNotFoundError:
        log(f"preparing {url} in {target}")
        _converter(name)(target)
    return target
