"""Encoded-image datasets: the converter (workloads/imagenet.py), the paper's augmentation (workloads/augment.py)
and the decoding reader (workloads/data/), on real JPEGs made here from scikit-learn's bundled photographs."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from workloads import augment as aug
from workloads import data, execution, imagenet
from workloads.augment import AugmentConfig
from workloads.config import DataConfig, PerformanceConfig, TrainConfig
from workloads.data import decoding


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4 classes x 8 JPEGs of 96-900 px (about half above 512 px), a greyscale and a CMYK one per class, a PNG and
    # one truncated JPEG; val/ is flat with a label file.
    return imagenet.sample_tree(tmp_path_factory.mktemp("src") / "imagenet")


@pytest.fixture(scope="module")
def dataset(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> data.DatasetInfo:
    url = str(tmp_path_factory.mktemp("ds") / "imagenet")
    labels = tree.parent / "imagenet_val_labels.txt"
    return data.folder_to_parquet(tree, url, shard_size=8, val_labels=labels, workers=2)


def _photos() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(a) for a in load_sample_images().images]


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------------
# Converter


def test_converter_stores_bytes_re_encodes_large_and_skips_broken(tree: Path, dataset: data.DatasetInfo) -> None:
    info = dataset
    assert info.encoded and info.image_shape == (3, 224, 224)
    assert info.classes == tuple(f"n{c:08d}" for c in range(4))
    assert info.split("train").num_images == 4 * 8 + 1  # + the PNG, - the truncated JPEG
    assert info.split("val").num_images == 8
    assert [Path(p).name for p in info.skipped] == ["n00000001_truncated.JPEG"]
    meta = json.loads((Path(info.url) / "meta.json").read_text())
    assert "truncated" in meta["skipped"][0]["error"]

    sources = {p.read_bytes() for p in [*tree.glob("train/*/*"), *tree.glob("val/*")] if "truncated" not in p.name}
    stored: list[bytes] = []
    labels: list[int] = []
    for shard in info.split("train").shards + info.split("val").shards:
        table = pq.read_table(Path(info.url) / shard.path)
        stored += table.column("image").to_pylist()
        labels += table.column("label").to_pylist()
    kept = [b for b in stored if b in sources]
    reencoded = [b for b in stored if b not in sources]
    assert kept and reencoded and meta["conversion"]["reencoded"] == len(reencoded)
    for b in kept:
        assert max(Image.open(io.BytesIO(b)).size) <= 512
    for b in reencoded:
        img = Image.open(io.BytesIO(b))
        assert img.format == "JPEG" and max(img.size) == 512
    assert sorted(np.bincount(labels).tolist()) == [10, 10, 10, 11]
    # Stored JPEG bytes against the decoded 3 x 224 x 224 format (150,528 bytes an image).
    assert meta["conversion"]["stored_image_bytes"] / len(stored) < 3 * 224 * 224


def test_odd_images_decode_to_rgb(dataset: data.DatasetInfo) -> None:
    x, y = data.load_split(dataset, "train")
    assert x.shape == (33, 3, 224, 224) and x.dtype == torch.float32
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    grey = (x[:, 0] == x[:, 1]).all(dim=(1, 2)) & (x[:, 1] == x[:, 2]).all(dim=(1, 2))
    assert int(grey.sum()) == 4  # one greyscale JPEG per class, repeated to 3 channels
    assert len(set(y.tolist())) == 4


def test_rerun_keeps_finished_shards_and_rewrites_missing_ones(tree: Path, tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    labels = tree.parent / "imagenet_val_labels.txt"
    first = imagenet.convert(tree, url, shard_size=8, val_labels=labels, workers=1, progress=None)
    shards = sorted((tmp_path / "ds" / "train").glob("part-*.parquet"))
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    # An interrupted job: no meta.json, one shard missing, a temp file of a killed write, an extra old shard.
    (tmp_path / "ds" / "meta.json").unlink()
    shards[1].unlink()
    (tmp_path / "ds" / "train" / "part-00001.parquet.tmp-dead").write_bytes(b"partial")
    (tmp_path / "ds" / "train" / "part-00099.parquet").write_bytes(b"stale")
    out = io.StringIO()
    second = imagenet.convert(tree, url, shard_size=8, val_labels=labels, workers=1, progress=out)
    assert second["splits"] == first["splits"] and second["skipped"] == first["skipped"]
    assert "train: 5/5 shards" in out.getvalue()
    assert shards[1].exists()
    for p in shards[:1] + shards[2:]:
        assert p.stat().st_mtime_ns == stamps[p]  # kept, not rewritten
    assert sorted(p.name for p in (tmp_path / "ds" / "train").iterdir()) == [p.name for p in shards]
    # Other settings change every shard's inputs: all are rewritten.
    third = imagenet.convert(tree, url, shard_size=8, max_side=256, val_labels=labels, workers=1, progress=None)
    assert third["conversion"]["reencoded"] > first["conversion"]["reencoded"]


def test_sklearn_sample_photographs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for k, img in enumerate(_photos()):
        (src / "train" / f"c{k}").mkdir(parents=True)
        img.save(src / "train" / f"c{k}" / "photo.jpg", quality=95)
    info = data.folder_to_parquet(src, str(tmp_path / "ds"), workers=1)
    x, y = data.load_split(info, "train")
    assert x.shape == (2, 3, 224, 224) and sorted(y.tolist()) == [0, 1]
    # The evaluation view: shorter side to 256, bicubic, centre crop 224 (reference: resize, then crop).
    for k, img in enumerate(_photos()):
        stored = Image.open(io.BytesIO(_jpeg(img.resize((512, 341), Image.Resampling.BICUBIC), 95)))
        w, h = stored.size
        ref = stored.convert("RGB").resize((round(w * 256 / h), 256), Image.Resampling.BICUBIC)
        left = (ref.size[0] - 224) // 2
        ref_px = np.asarray(ref.crop((left, 16, left + 224, 240)), dtype=np.float64)
        ours = np.asarray(aug.eval_view(stored, AugmentConfig(), 224), dtype=np.float64)
        assert np.abs(ours - ref_px).mean() < 2.0, k


def _bad(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    out = tmp_path / "out"
    assert data.main([*argv[:2], str(out), *argv[2:]]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert not (out / "meta.json").exists() and not list(out.glob("*/part-*"))


def test_bad_input_names_problem_and_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str], tree: Path) -> None:
    _bad(tmp_path, capsys, ["folder", str(tmp_path / "nope")], "is not a directory")
    no_classes = tmp_path / "flat"
    (no_classes / "train").mkdir(parents=True)
    _bad(tmp_path, capsys, ["folder", str(no_classes)], "has no class folders; expected")
    empty_class = tmp_path / "empty"
    (empty_class / "train" / "cat").mkdir(parents=True)
    (empty_class / "train" / "dog").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(empty_class / "train" / "cat" / "a.jpg")
    _bad(tmp_path, capsys, ["folder", str(empty_class)], "class folder")
    _bad(tmp_path, capsys, ["folder", str(tree)], "pass --val-labels FILE")
    wrong = tmp_path / "labels.txt"
    wrong.write_text("ILSVRC2012_val_00000000.JPEG n99999999\n")
    _bad(tmp_path, capsys, ["folder", str(tree), "--val-labels", str(wrong)], "which is not a class folder name")
    wrong.write_text("ILSVRC2012_val_00000000.JPEG n00000000\n")
    _bad(tmp_path, capsys, ["folder", str(tree), "--val-labels", str(wrong)], "has no label for")
    with pytest.raises(FileNotFoundError, match="meta.json does not exist"):
        data.read_info(str(tmp_path / "no-dataset"))


def test_unknown_augmentation_is_rejected_with_the_choices() -> None:
    with pytest.raises(ValidationError) as e:
        TrainConfig(data={"url": "x", "augment": {"name": "randaugment"}})
    text = str(e.value)
    assert "data.augment.name" in text and "'paper'" in text and "'crop_flip'" in text
    with pytest.raises(ValidationError, match="area"):
        AugmentConfig(area=(0.5, 0.1))
    with pytest.raises(ValidationError, match="Extra inputs"):
        AugmentConfig(rotate=10)  # type: ignore[call-arg]


def test_default_augment_keeps_cell_ids() -> None:
    from orchestrator.grid import cell_id

    cfg = TrainConfig(data=DataConfig(url="builtin://digits"))
    payload = cfg.model_dump(mode="json", exclude={"checkpoint_every": True, "keep_checkpoints": True})
    payload["performance"].pop("compile")
    payload.pop("performance")
    del payload["data"]["augment"]
    for later in ("trajectory", "restarts"):  # evaluation options added after augment, out of the id at defaults
        del payload["eval"][later]
    old = hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]
    assert cell_id(cfg) == old
    flipped = TrainConfig(data=DataConfig(url="builtin://digits", augment=AugmentConfig(name="crop_flip")))
    assert cell_id(flipped) != old


# ------------------------------------------------------------------------------------------------------------
# Augmentation


def test_random_crop_box_follows_the_paper() -> None:
    cfg = AugmentConfig()
    rng = np.random.default_rng(0)
    areas, aspects = [], []
    for _ in range(2000):
        left, top, right, bottom = aug.random_crop_box(500, 375, cfg, rng)
        assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375
        w, h = right - left, bottom - top
        areas.append(w * h / (500 * 375))
        aspects.append(w / h)
    assert 0.07 <= min(areas) < 0.12 and max(areas) <= 1.0
    assert min(aspects) >= 0.74 and max(aspects) <= 1.34
    # 10 failed tries (a 50:1 strip cannot hold a 3/4..4/3 crop of >= 8 % of its area): the central square.
    assert aug.random_crop_box(1000, 20, cfg, rng) == (490, 0, 510, 20)


def _tensorpack_jitter(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """FAIR's pipeline in float, ops applied one by one, clip once at the end (clip=False), in RGB."""
    order = rng.permutation(4)
    b, c, s = (rng.uniform(0.6, 1.4) for _ in range(3))
    alpha = rng.standard_normal(3) * 0.1
    x = np.asarray(img, dtype=np.float64)
    g = np.asarray(aug.GREY)
    for op in order:
        if op == 0:
            x = x * b
        elif op == 1:
            x = x * c + (x @ g).mean() * (1 - c)
        elif op == 2:
            x = x * s + (x @ g)[..., None] * (1 - s)
        else:
            x = x + np.asarray(aug.PCA_EIGVEC) @ (alpha * np.asarray(aug.PCA_EIGVAL) * 255)
    return np.clip(x, 0, 255)


def _colour_jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The paper's colour augmentation of one image as the decoding processes apply it."""
    return aug.apply_colour(img, aug.colour_map(img.mode == "RGB", AugmentConfig(), rng))


def test_colour_jitter_matches_the_float_pipeline() -> None:
    worst = 0.0
    for i in range(40):
        img = _photos()[i % 2].resize((224, 224))
        ours = np.asarray(_colour_jitter(img, aug.image_rng(0, 0, i)), dtype=np.float64)
        ref = _tensorpack_jitter(img, aug.image_rng(0, 0, i))
        worst = max(worst, float(np.abs(ours - ref).max()))
    # One rounding at the end, and the contrast mean from 8 x 8 box averages.
    assert worst <= 0.75
    grey = _photos()[0].resize((224, 224)).convert("L")
    assert _colour_jitter(grey, aug.image_rng(0, 0, 1)).mode == "L"


def test_colour_maps_applied_on_a_device_match_the_float_pipeline() -> None:
    cfg = AugmentConfig()
    images = [_photos()[i % 2].resize((224, 224)).rotate(9 * i) for i in range(16)]
    pixels = torch.from_numpy(np.stack([np.asarray(img).transpose(2, 0, 1) for img in images]))
    maps = torch.from_numpy(np.stack([aug.colour_map(True, cfg, aug.image_rng(0, 0, i)) for i in range(16)]))
    ours = execution.apply_colour(pixels, maps).numpy().transpose(0, 2, 3, 1)
    ref = np.stack([_tensorpack_jitter(img, aug.image_rng(0, 0, i)) for i, img in enumerate(images)])
    # The exact mean grey and one rounding, in float32.
    assert np.abs(ours - ref).max() <= 0.501
    with pytest.raises(ValueError, match="1- or 3-channel"):
        execution.apply_colour(pixels[:, :2], maps)
    with pytest.raises(ValueError, match="already scaled"):
        execution.to_unit_range(pixels.float(), maps)
    # A greyscale image: brightness and contrast only, whether the dataset has one channel or three.
    grey = _photos()[0].resize((224, 224)).convert("L")
    pil = np.asarray(_colour_jitter(grey, aug.image_rng(0, 0, 1)), dtype=np.float32)
    one = aug.colour_map(False, cfg, aug.image_rng(0, 0, 1))[None]
    flat = torch.from_numpy(np.array(grey))[None, None]
    for channels in (1, 3):
        device = execution.apply_colour(flat.repeat(1, channels, 1, 1), torch.from_numpy(one))[0].numpy()
        assert all(np.abs(plane - pil).max() <= 1 for plane in device)  # PIL's mean is from 8 x 8 box averages


@pytest.mark.parametrize("processes", [0, 1])
def test_a_reader_leaving_colour_to_the_device_feeds_the_same_images(
    dataset: data.DatasetInfo, monkeypatch: pytest.MonkeyPatch, processes: int
) -> None:
    monkeypatch.setattr(decoding, "decode_processes", lambda: processes)
    kwargs = {"batch_size": 4, "epoch": 1, "seed": 3, "shuffle_buffer": 6, "augment": AugmentConfig(size=48)}
    applied = list(data.iter_batches(dataset, "train", **kwargs))  # type: ignore[arg-type]
    deferred = list(data.iter_batches(dataset, "train", colour_on_device=True, **kwargs))  # type: ignore[arg-type]
    assert len(deferred) == len(applied) == 8 and all(len(batch) == 3 for batch in deferred)
    assert deferred[0][2].shape == (4, aug.COLOUR_PARAMS) and not torch.equal(deferred[0][0], applied[0][0])
    cpu = execution.resolve_execution(PerformanceConfig(), torch.device("cpu"))
    for (x, y), (scaled, labels) in zip(applied, execution.on_device(iter(deferred), cpu), strict=True):
        assert torch.equal(labels, y)
        diff = (scaled * 255 - x.to(torch.float32)).abs()
        # Same crops, flips and draws; the decoding processes' mean grey comes from 8 x 8 box averages.
        assert float(diff.max()) <= 1.001 and float(diff.mean()) < 0.05
    # Transforms without colour yield pairs whatever the device.
    plain = AugmentConfig(name="none", size=32)
    assert len(next(data.iter_batches(dataset, "train", batch_size=4, augment=plain, colour_on_device=True))) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests/test_cuda.py reads pinned batches on a GPU")
def test_pinned_batches_without_cuda_are_refused_before_reading(dataset: data.DatasetInfo) -> None:
    with pytest.raises(ValueError, match="CUDA GPU, and this process sees none"):
        data.iter_batches(dataset, "train", batch_size=4, pinned=True)


@pytest.mark.parametrize("box", [(0, 0, 1920, 1280), (100, 50, 1300, 1250), (500, 200, 1500, 1200)])
def test_reduced_decoding_matches_full_decoding(box: tuple[int, int, int, int]) -> None:
    # Stated tolerance: mean absolute difference < 1 level, 99th percentile <= 4 levels (0-255).
    for photo in _photos():
        payload = _jpeg(photo.resize((1920, 1280), Image.Resampling.BICUBIC))
        reduced_img = aug.open_image(payload)
        reduced = np.asarray(aug._resized(reduced_img, box, 224), dtype=np.float64)
        assert reduced_img.size[0] < 1920  # the crop was large enough: libjpeg decoded at reduced scale
        full = np.asarray(aug._resized(aug.open_image(payload), box, 224, reduce=False), dtype=np.float64)
        diff = np.abs(reduced - full)
        assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4


def test_same_draws_for_the_same_seed_epoch_and_index() -> None:
    payloads = [_jpeg(p.resize((500, 375))) for p in _photos()] * 3
    kwargs = {"train": True, "name": "paper", "cfg": AugmentConfig(), "size": 64, "channels": 3, "seed": 7}
    a = aug.decode_batch(payloads, [0, 1, 2, 3, 4, 5], epoch=2, **kwargs)  # type: ignore[arg-type]
    b = aug.decode_batch(payloads[::-1], [5, 4, 3, 2, 1, 0], epoch=2, **kwargs)  # type: ignore[arg-type]
    np.testing.assert_array_equal(a, b[::-1])
    c = aug.decode_batch(payloads, [0, 1, 2, 3, 4, 5], epoch=3, **kwargs)  # type: ignore[arg-type]
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[2])  # same image, different index: different draws
    # The batch holds each image's train_view as (C, H, W); for a GPU the same pixels, laid out channels-last.
    views = [
        aug.train_view(aug.open_image(p), "paper", AugmentConfig(), 64, aug.image_rng(7, 2, i))
        for i, p in enumerate(payloads)
    ]
    np.testing.assert_array_equal(a, np.stack([np.asarray(v).transpose(2, 0, 1) for v in views]))
    assert a.shape == (6, 3, 64, 64) and a.flags.c_contiguous
    gpu = aug.decode_batch(payloads, [0, 1, 2, 3, 4, 5], epoch=2, channels_last=True, **kwargs)  # type: ignore[arg-type]
    np.testing.assert_array_equal(gpu, a)
    assert gpu.transpose(0, 2, 3, 1).flags.c_contiguous


# ------------------------------------------------------------------------------------------------------------
# Reader


def _epoch(info: data.DatasetInfo, epoch: int, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(data.iter_batches(info, "train", batch_size=4, epoch=epoch, seed=3, shuffle_buffer=6, **kwargs))  # type: ignore[arg-type]
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def test_resumed_run_sees_the_same_images(dataset: data.DatasetInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = AugmentConfig(size=48)
    uninterrupted = [_epoch(dataset, e, augment=cfg) for e in range(3)]
    # A resumed run starts at epoch 2 in a fresh reader, here decoding in the training process instead of one
    # decoding process: the same images, bit for bit.
    monkeypatch.setattr(decoding, "decode_processes", lambda: 0)
    resumed = _epoch(dataset, 2, augment=cfg)
    assert torch.equal(resumed[0], uninterrupted[2][0]) and torch.equal(resumed[1], uninterrupted[2][1])
    assert not torch.equal(uninterrupted[1][0], uninterrupted[2][0])
    assert resumed[0].shape == (32, 3, 48, 48)


def test_none_feeds_the_evaluation_view(dataset: data.DatasetInfo) -> None:
    x, y = _epoch(dataset, 0, augment=AugmentConfig(name="none", size=32))
    ev, ey = data.load_split(dataset, "train", augment=AugmentConfig(size=32))
    lookup = {bytes((v * 255).round().to(torch.uint8).numpy()): int(c) for v, c in zip(ev, ey, strict=True)}
    assert x.dtype == torch.uint8  # the reader's batches are pixels; load_split's are scaled to [0, 1]
    for v, c in zip(x, y, strict=True):
        assert lookup[bytes(v.numpy())] == int(c)


def test_decoded_data_is_untouched_by_default_and_augmented_on_request(digits_url: str) -> None:
    info = data.read_info(digits_url)
    plain = list(data.iter_batches(info, "train", batch_size=8, shuffle_buffer=32))
    auto = list(data.iter_batches(info, "train", batch_size=8, shuffle_buffer=32, augment=AugmentConfig()))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, auto, strict=True))
    flipped = list(
        data.iter_batches(info, "train", batch_size=8, shuffle_buffer=32, augment=AugmentConfig(name="crop_flip"))
    )
    assert len(flipped) == len(plain)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(plain, flipped, strict=True))  # same images, same order
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(plain, flipped, strict=True))
    again = list(
        data.iter_batches(info, "train", batch_size=8, shuffle_buffer=32, augment=AugmentConfig(name="crop_flip"))
    )
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, flipped, strict=True))
    with pytest.raises(ValueError, match="only the 'paper' transform resamples"):
        data.iter_batches(info, "train", batch_size=8, augment=AugmentConfig(name="crop_flip", size=16))
