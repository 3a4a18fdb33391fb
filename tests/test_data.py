"""The sharded Parquet format and its streaming reader (workloads/data.py), locally and on S3 (moto)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from workloads import data
from workloads.data import (
    batches_per_epoch,
    digits_to_parquet,
    iter_batches,
    load_split,
    read_info,
    synthetic_batch,
    synthetic_to_parquet,
    write_dataset,
)
from workloads.fs import open_fs


def _indexed_images(n: int) -> np.ndarray:
    """(n, 1, 2, 2) images whose four bytes spell their index, so every yielded image can be identified."""
    return np.arange(n, dtype=">u4").view(np.uint8).reshape(n, 1, 2, 2).copy()


def _ids(images: torch.Tensor) -> list[int]:
    if images.dtype != torch.uint8:  # load_split scales to [0, 1]; the reader's batches are the stored pixels
        images = (images * 255).round().to(torch.uint8)
    raw = images.reshape(len(images), 4).numpy()
    return [int(i) for i in raw.copy().view(">u4").reshape(-1)]


def _write_indexed(url: str, n: int, shard_size: int, row_group_size: int = 4) -> data.DatasetInfo:
    labels = np.arange(n) % 10
    return write_dataset(
        url,
        {"train": (_indexed_images(n), labels)},
        [str(c) for c in range(10)],
        shard_size=shard_size,
        row_group_size=row_group_size,
    )


def _epoch_ids(info: data.DatasetInfo, world_size: int, batch_size: int, **kwargs: int) -> list[list[int]]:
    per_rank = []
    for rank in range(world_size):
        ids: list[int] = []
        for images, labels in iter_batches(
            info, "train", batch_size=batch_size, rank=rank, world_size=world_size, **kwargs
        ):
            assert images.shape == (batch_size, 1, 2, 2) and images.dtype == torch.uint8
            assert labels.dtype == torch.int64
            batch_ids = _ids(images)
            assert labels.tolist() == [i % 10 for i in batch_ids]  # labels travel with their images
            ids += batch_ids
        per_rank.append(ids)
    return per_rank


def test_write_read_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # Non-square, multi-channel shape: a C/H/W mix-up cannot pass.
    train = rng.integers(0, 256, (23, 3, 5, 7), dtype=np.uint8), rng.integers(0, 4, 23)
    test = rng.integers(0, 256, (6, 3, 5, 7), dtype=np.uint8), rng.integers(0, 4, 6)
    url = str(tmp_path / "ds")
    written = write_dataset(url, {"train": train, "test": test}, ["a", "b", "c", "d"], shard_size=7, row_group_size=3)

    info = read_info(url)
    assert info == written
    assert info.num_classes == 4 and info.classes == ("a", "b", "c", "d") and info.image_shape == (3, 5, 7)
    assert [s.num_images for s in info.split("train").shards] == [7, 7, 7, 2]
    assert info.split("test").num_images == 6
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert (
        meta["image_shape"] == [3, 5, 7] and meta["splits"]["train"]["shards"][0]["path"] == "train/part-00000.parquet"
    )
    table = pq.read_table(tmp_path / "ds" / "train" / "part-00000.parquet")
    assert table.column_names == ["image", "label"] and len(table.column("image")[0].as_py()) == 3 * 5 * 7

    for split, (images, labels) in {"train": train, "test": test}.items():
        x, y = load_split(url, split, None)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x, torch.from_numpy(images).float() / 255)
        assert torch.equal(y, torch.from_numpy(labels))
    x, y = load_split(info, "train", limit=9)  # spans two shards and stops inside the second
    assert torch.equal(x, torch.from_numpy(train[0][:9]).float() / 255)
    assert len(load_split(url, "test", limit=100)[0]) == 6


def test_rewrite_replaces_the_dataset(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    _write_indexed(url, 30, shard_size=5)
    _write_indexed(url, 8, shard_size=5)
    assert read_info(url).split("train").num_images == 8
    assert _ids(load_split(url, "train")[0]) == list(range(8))

    # A rewrite that fails part-way must not leave the old meta.json describing the new shards.
    bad_labels = np.full(4, 99)
    with pytest.raises(ValueError, match="labels must lie in"):
        write_dataset(
            url,
            {"train": (_indexed_images(12), np.zeros(12, int)), "test": (_indexed_images(4), bad_labels)},
            ["a"],
            shard_size=5,
        )
    with pytest.raises(FileNotFoundError):
        read_info(url)


@pytest.mark.parametrize(
    ("n", "shard_size", "world_size", "batch_size"),
    [
        (103, 10, 1, 4),
        (103, 10, 2, 4),
        (103, 10, 3, 5),
        (103, 10, 4, 3),
        (50, 40, 3, 4),  # fewer shards than ranks: ranks split shards by row groups
        (9, 100, 3, 1),  # a single shard shared by every rank
    ],
)
@pytest.mark.parametrize("shuffle_buffer", [0, 16])
def test_rank_shares_are_disjoint_equal_and_cover_the_split(
    tmp_path: Path, n: int, shard_size: int, world_size: int, batch_size: int, shuffle_buffer: int
) -> None:
    info = _write_indexed(str(tmp_path / "ds"), n, shard_size)
    expected = batches_per_epoch(info, "train", world_size, batch_size)
    assert expected == (n // world_size) // batch_size > 0
    for epoch in range(3):
        per_rank = _epoch_ids(info, world_size, batch_size, epoch=epoch, seed=7, shuffle_buffer=shuffle_buffer)
        # DDP: equal step counts on every rank, or the collectives deadlock.
        assert [len(ids) for ids in per_rank] == [expected * batch_size] * world_size
        union = set().union(*per_rank)
        assert len(union) == world_size * expected * batch_size  # disjoint
        assert union <= set(range(n))
        # Only remainders are dropped: each rank loses less than a batch plus the one-image share imbalance.
        assert n - len(union) <= world_size * batch_size


def test_union_is_the_whole_split_when_nothing_needs_dropping(tmp_path: Path) -> None:
    info = _write_indexed(str(tmp_path / "ds"), 60, shard_size=7)
    per_rank = _epoch_ids(info, 3, 4, epoch=1, shuffle_buffer=8)
    assert sorted(i for ids in per_rank for i in ids) == list(range(60))


def test_each_rank_fetches_only_its_share(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n, world_size, row_group = 100, 3, 4
    # Shards larger than a share: ranks 1 and 2 start deep inside a shard.
    info = _write_indexed(str(tmp_path / "ds"), n, shard_size=50, row_group_size=row_group)
    fetched: list[int] = []
    original = pq.ParquetFile.read_row_group

    def spy(self: pq.ParquetFile, i: int, *args: object, **kwargs: object) -> object:
        table = original(self, i, *args, **kwargs)
        fetched.append(table.num_rows)
        return table

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    for rank in range(world_size):
        fetched.clear()
        for _ in iter_batches(info, "train", batch_size=1, rank=rank, world_size=world_size, prefetch=0):
            pass
        # Its own ~n/3 rows, plus at most a partial row group at each end of its range.
        assert sum(fetched) <= -(-n // world_size) + 2 * (row_group - 1)


def test_order_is_deterministic_per_seed_and_epoch(tmp_path: Path) -> None:
    info = _write_indexed(str(tmp_path / "ds"), 200, shard_size=16)

    def run(epoch: int, seed: int = 3, prefetch: int = 2) -> list[list[int]]:
        return _epoch_ids(info, 2, 8, epoch=epoch, seed=seed, shuffle_buffer=32, prefetch=prefetch)

    first = run(epoch=0)
    assert run(epoch=0) == first
    assert run(epoch=0, prefetch=0) == first  # read-ahead changes timing, never order
    assert run(epoch=1) != first
    assert run(epoch=0, seed=4) != first
    # Without a shuffle buffer the shard order alone must still change with the epoch.
    in_file_order = [_epoch_ids(info, 2, 8, epoch=epoch, shuffle_buffer=0) for epoch in (0, 0, 1)]
    assert in_file_order[0] == in_file_order[1] != in_file_order[2]


def test_shuffle_buffer_mixes_within_a_rank(tmp_path: Path) -> None:
    info = _write_indexed(str(tmp_path / "ds"), 64, shard_size=64)  # one shard: no shard-order shuffling
    (in_order,) = _epoch_ids(info, 1, 1, shuffle_buffer=0)
    (mixed,) = _epoch_ids(info, 1, 1, shuffle_buffer=16)
    assert in_order == list(range(64))
    assert sorted(mixed) == in_order and mixed != in_order
    # Once the buffer is full, the image let out is drawn from the whole buffer, by a seeded draw.
    firsts = {_epoch_ids(info, 1, 1, shuffle_buffer=16, seed=seed)[0][0] for seed in range(10)}
    assert len(firsts) > 3


def test_epochs_differ_and_an_abandoned_epoch_stops(tmp_path: Path) -> None:
    info = _write_indexed(str(tmp_path / "ds"), 50, shard_size=8)
    kwargs: dict[str, Any] = {"batch_size": 4, "rank": 1, "world_size": 2, "shuffle_buffer": 8}
    epoch0 = [_ids(x) for x, _ in iter_batches(info, "train", epoch=0, **kwargs)]
    epoch1 = [_ids(x) for x, _ in iter_batches(info, "train", epoch=1, **kwargs)]
    assert len(epoch0) == len(epoch1) == 6 == batches_per_epoch(info, "train", 2, 4) and epoch0 != epoch1
    # Abandoning an epoch part-way must not hang on the read-ahead thread.
    batches = iter_batches(info, "train", **kwargs)
    next(batches)
    batches.close()  # type: ignore[attr-defined]


def test_digits_dataset(digits_url: str, tmp_path: Path) -> None:
    info = read_info(digits_url)
    assert info.num_classes == 10 and info.image_shape == (1, 32, 32)
    assert info.classes == tuple(str(d) for d in range(10))
    assert info.split("train").num_images + info.split("test").num_images == 1797
    # 80/20, stratified: every class in both splits, in proportion.
    assert info.split("test").num_images == pytest.approx(1797 * 0.2, abs=5)
    for split in ("train", "test"):
        x, y = load_split(digits_url, split)
        assert x.shape == (info.split(split).num_images, 1, 32, 32)
        assert float(x.min()) >= 0.0 and float(x.max()) == 1.0
        assert sorted(set(y.tolist())) == list(range(10))
    _, test_labels = load_split(digits_url, "test")
    assert torch.bincount(test_labels).min() >= 30
    # Stored in a seeded random order: the first shard of train, and the first 100 test images (the fixed
    # evaluation subset), hold every class.
    first_shard = info.split("train").shards[0].num_images
    assert set(load_split(digits_url, "train", limit=first_shard)[1].tolist()) == set(range(10))
    assert set(load_split(digits_url, "test", limit=100)[1].tolist()) == set(range(10))

    # The split and its bytes are fixed: a second conversion is byte-identical.
    again = tmp_path / "digits"
    digits_to_parquet(str(again))
    original = sorted(p.relative_to(digits_url) for p in Path(digits_url).rglob("*") if p.is_file())
    assert original == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in original:
        assert (Path(digits_url) / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_digits_stream_trains_shape(digits_url: str) -> None:
    x, y = next(iter(iter_batches(digits_url, "train", batch_size=32, rank=1, world_size=2, shuffle_buffer=256)))
    assert x.shape == (32, 1, 32, 32) and y.shape == (32,)


def test_synthetic(tmp_path: Path) -> None:
    info = synthetic_to_parquet(str(tmp_path / "ds"), 40, (3, 6, 5), num_classes=3, seed=1, shard_size=16)
    assert info.split("train").num_images == 40 and info.split("test").num_images == 8
    assert [s.num_images for s in info.split("train").shards] == [16, 16, 8]
    x, y = load_split(info, "train")
    assert x.shape == (40, 3, 6, 5) and int(y.max()) < 3
    images, labels = synthetic_batch(8, (3, 6, 5), num_classes=3, seed=1)
    assert images.shape == (8, 3, 6, 5) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    assert torch.equal(synthetic_batch(8, (3, 6, 5), 3, seed=1)[0], images)
    assert not torch.equal(synthetic_batch(8, (3, 6, 5), 3, seed=2)[0], images)


def test_s3_round_trip(s3_bucket: str, tmp_path: Path) -> None:
    import boto3

    url = f"{s3_bucket}/datasets/synth"
    synthetic_to_parquet(url, 60, (1, 4, 4), num_classes=5, seed=2, shard_size=16)
    local = synthetic_to_parquet(str(tmp_path / "synth"), 60, (1, 4, 4), num_classes=5, seed=2, shard_size=16)
    assert read_info(url).to_json() == local.to_json()

    bucket = s3_bucket.removeprefix("s3://")
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]}
    assert "datasets/synth/meta.json" in keys and "datasets/synth/train/part-00003.parquet" in keys

    for got, want in zip(load_split(url, "test"), load_split(local, "test"), strict=True):
        assert torch.equal(got, want)
    for rank in range(2):
        kwargs = {"batch_size": 8, "rank": rank, "world_size": 2, "epoch": 1, "shuffle_buffer": 10}
        got_batches = list(iter_batches(url, "train", **kwargs))
        want_batches = list(iter_batches(local, "train", **kwargs))
        assert len(got_batches) == len(want_batches) == 3
        for (gx, gy), (wx, wy) in zip(got_batches, want_batches, strict=True):
            assert torch.equal(gx, wx) and torch.equal(gy, wy)

    fs, root = open_fs(url)
    assert root == f"{bucket}/datasets/synth" and fs.exists(f"{root}/meta.json")
    with pytest.raises(FileNotFoundError, match="python -m workloads.data digits"):
        read_info(f"{s3_bucket}/datasets/missing")


def test_error_messages(tmp_path: Path, digits_url: str) -> None:
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as excinfo:
        read_info(missing)
    assert missing in str(excinfo.value) and f"python -m workloads.data digits {missing}" in str(excinfo.value)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_split(missing, "test")

    for call in (
        lambda: load_split(digits_url, "validation"),
        lambda: iter_batches(digits_url, "validation", batch_size=4),
        lambda: batches_per_epoch(read_info(digits_url), "validation", 1, 4),
    ):
        with pytest.raises(ValueError, match=r"no split 'validation'; available splits: test, train"):
            call()
    with pytest.raises(ValueError, match="no rank would get a full batch"):
        iter_batches(digits_url, "test", batch_size=200, world_size=2)
    with pytest.raises(ValueError, match="rank must lie in"):
        iter_batches(digits_url, "test", batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="images must be uint8"):
        write_dataset(str(tmp_path / "bad"), {"train": (np.zeros((2, 1, 2, 2)), np.zeros(2, int))}, ["a"])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\)"):
        write_dataset(str(tmp_path / "bad"), {"train": (np.zeros((2, 1, 2, 2), np.uint8), np.ones(2, int))}, ["a"])


def test_corrupt_shard_fails_loudly_through_the_read_ahead_thread(tmp_path: Path) -> None:
    info = _write_indexed(str(tmp_path / "ds"), 40, shard_size=10)
    shard = tmp_path / "ds" / info.split("train").shards[2].path
    pq.write_table(pq.read_table(shard).slice(0, 7), shard)
    with pytest.raises(ValueError, match="has 7 rows but meta.json says 10"):
        for _ in iter_batches(info, "train", batch_size=2, prefetch=2):
            pass


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = str(tmp_path / "synth")
    argv = ["synthetic", url, "--num-images", "20", "--image-shape", "1", "4", "4", "--num-classes", "3"]
    assert data.main(argv) == 0
    assert "train 20 images" in capsys.readouterr().out
    assert read_info(url).image_shape == (1, 4, 4)
    assert data.main(["folder", str(tmp_path / "no-such-dir"), str(tmp_path / "out")]) == 2
    assert "no-such-dir is not a directory" in capsys.readouterr().err
