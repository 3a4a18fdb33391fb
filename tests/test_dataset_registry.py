"""Datasets in one registry (workloads/builtin_data.py), and the plan's dataset sizes (orchestrator/plan.py): read
from a built-in dataset's registry entry or a local dataset's meta.json, the spec's `planning` numbers otherwise."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.grid import expand
from orchestrator.plan import dataset_sizes, estimate_device_hours, plan_spec
from orchestrator.plan_output import format_plan, plan_to_json
from orchestrator.spec import Spec, SpecError, parse_spec
from tests.conftest import tiny_spec
from workloads import builtin_data, data

# The spec's own guess, deliberately unlike the datasets written below.
STATED = {"train_images": 1000, "image_size": 32, "relative_speed": 0.01}


def spec_for(url: str, planning: dict[str, Any] | None = None, **data_fields: Any) -> Spec:
    spec = tiny_spec("reg", {"seed": [0, 1]}, planning=planning or STATED)
    spec["workload"]["data"] = {"url": url, **data_fields}
    return parse_spec(yaml.safe_dump(spec), "reg.yaml")


def write_small(url: str, num_images: int = 40, side: int = 12) -> None:
    data.synthetic_to_parquet(url, num_images, (1, side, side), num_classes=4, num_test=8, shard_size=16)


def test_plan_reads_a_local_datasets_meta_json(tmp_path: Path) -> None:
    url = str(tmp_path / "small")
    write_small(url)
    for spelled in (url, f"file://{url}"):
        spec = spec_for(spelled)
        plan = plan_spec(spec)
        assert (plan.planning.train_images, plan.planning.image_size) == (40, 12)
        assert plan.dataset is not None and plan.dataset.read
        # The cells cost what the dataset's numbers give, not the spec's.
        cell = expand(spec)[0]
        counted = spec.planning.model_copy(update={"train_images": 40, "image_size": 12})
        assert plan.cells[0].device_hours == pytest.approx(
            estimate_device_hours(cell.config, counted) + spec.planning.cell_overhead_s / 3600
        )
        assert estimate_device_hours(cell.config, counted) < estimate_device_hours(cell.config, spec.planning)
        text = format_plan(plan)
        assert f"dataset size: read from {url}/meta.json" in text
        assert "40 train images at 12 px" in text
        # The spec stated other numbers: the plan says it replaced them.
        assert "warning: planning.train_images is 1,000 but the dataset's is 40" in text
        assert "warning: planning.image_size is 32 but the dataset's is 12" in text
        assert plan_to_json(plan)["dataset"] == {"read": True, "source": f"read from {url}/meta.json"}


def test_the_plan_guesses_until_the_dataset_exists(tmp_path: Path) -> None:
    url = str(tmp_path / "later")
    spec = spec_for(url)
    before = plan_spec(spec)
    assert (before.planning.train_images, before.planning.image_size) == (1000, 32)
    assert before.dataset is not None and not before.dataset.read
    text = format_plan(before)
    assert "dataset size: guessed from the spec's planning section: no meta.json at" in text
    assert "1,000 train images at 32 px" in text and "warning: planning." not in text

    write_small(url, num_images=24, side=10)
    after = plan_spec(spec)  # the same spec, now that the dataset is there
    assert (after.planning.train_images, after.planning.image_size) == (24, 10)
    assert after.dataset is not None and after.dataset.read
    assert after.total_device_hours < before.total_device_hours


def test_a_rewritten_dataset_is_read_again(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    write_small(url, num_images=24)
    assert dataset_sizes(spec_for(url)).train_images == 24
    write_small(url, num_images=48)
    assert dataset_sizes(spec_for(url)).train_images == 48


def test_remote_datasets_are_not_read() -> None:
    # No network for a plan: an s3:// dataset (even an unreachable endpoint) takes the spec's numbers, at once.
    start = time.perf_counter()
    sizes = dataset_sizes(spec_for("s3://no-such-bucket/imagenet"))
    assert time.perf_counter() - start < 1.0
    assert (sizes.train_images, sizes.image_size, sizes.read) == (1000, 32, False)
    assert "s3://no-such-bucket/imagenet is not read for a plan" in sizes.source


def test_augment_size_split_and_unreadable_meta(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    write_small(url, side=12)
    # The model sees data.augment.size when a cell sets it; the count is the spec's train split's.
    resized = dataset_sizes(spec_for(url, augment={"name": "crop_flip", "size": 8}))
    assert (resized.train_images, resized.image_size) == (40, 8)
    assert dataset_sizes(spec_for(url, train_split="test")).train_images == 8
    missing_split = dataset_sizes(spec_for(url, train_split="val"))
    assert not missing_split.read and f"{url} has no split 'val'" in missing_split.source
    (Path(url) / "meta.json").write_text("{not json")
    broken = dataset_sizes(spec_for(url))
    assert not broken.read and "meta.json is unreadable" in broken.source


def test_builtin_counts_are_known_without_converting() -> None:
    digits = builtin_data.DATASETS["digits"]
    # A spec that restates the counts gets no warning; one without a planning section plans on them too.
    restated = dataset_sizes(spec_for("builtin://digits", {"train_images": 1438, "image_size": 32}))
    assert (restated.train_images, restated.image_size, restated.read, restated.warnings) == (1438, 32, True, ())
    unstated = plan_spec(spec_for("builtin://digits", {"relative_speed": 0.01}))
    assert unstated.planning.train_images == digits.split_images["train"]
    assert unstated.planning.image_size == digits.image_size
    assert "dataset size: known: builtin://digits" in format_plan(unstated)


def test_registry_counts_match_the_conversion(tmp_path: Path) -> None:
    # What the plan counts for a built-in dataset is what the sweep driver converts.
    logged: list[str] = []
    for name, entry in builtin_data.DATASETS.items():
        info = data.read_info(builtin_data.materialise(f"builtin://{name}", str(tmp_path), log=logged.append))
        assert {split: s.num_images for split, s in info.splits.items()} == dict(entry.split_images)
        assert info.image_shape[1:] == (entry.image_size, entry.image_size)
    assert len(logged) == len(builtin_data.DATASETS)


def test_one_entry_registers_a_dataset_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation, the data CLI, the conversion the driver runs and the plan all read the one registry."""
    calls: list[tuple[str, int, int]] = []

    def tiny_to_parquet(url: str, image_size: int, shard_size: int) -> data.DatasetInfo:
        calls.append((url, image_size, shard_size))
        return data.synthetic_to_parquet(url, 20, (1, image_size, image_size), 2, num_test=4, shard_size=shard_size)

    entry = builtin_data.BuiltinDataset("twenty noise images", "tiny_to_parquet", 8, 16, {"train": 20, "test": 4})
    monkeypatch.setattr(data, "tiny_to_parquet", tiny_to_parquet, raising=False)
    with pytest.raises(SpecError, match=r"unknown built-in dataset 'builtin://tiny' \(known: builtin://digits\)"):
        spec_for("builtin://tiny")
    monkeypatch.setitem(builtin_data.DATASETS, "tiny", entry)

    spec = spec_for("builtin://tiny")  # validates now
    assert (plan_spec(spec).planning.train_images, plan_spec(spec).planning.image_size) == (20, 8)
    with pytest.raises(SpecError, match=r"known: builtin://digits, builtin://tiny\)"):
        spec_for("builtin://tinny")
    assert data.main(["tiny", str(tmp_path / "cli"), "--shard-size", "8"]) == 0  # a subcommand of its own
    target = builtin_data.materialise("builtin://tiny", str(tmp_path / "storage"), log=lambda _: None)
    assert calls == [(str(tmp_path / "cli"), 8, 8), (target, 8, 16)]  # the registry's sizes unless given
    assert data.read_info(target).split("train").num_images == 20
