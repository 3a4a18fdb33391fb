"""ImageNet-style folders to sharded Parquet of encoded image bytes: ``python -m workloads.data folder SRC URL``.

The paper's pipeline (FAIR ImageNet-Adversarial-Training) reads the original JPEGs and draws a new random crop of
each image every epoch, so the stored form must be the image, not a fixed crop of it. Following FFCV's advice
for ResNets, images whose longer side exceeds ``max_side`` (default 512) are re-encoded at that side with JPEG
quality 90 (ImageNet's median image is about 500 x 375, so most are kept byte for byte); the model's 224 px crops
of up to 100 % of the area never need more. Encoded bytes are also smaller than decoded pixels in object storage.

Source layout: ``SRC/<split>/<class>/<image>``, class ids being the sorted class-folder names; a split folder may
instead hold its images directly (ImageNet's ``val/``) with a label file (``--val-labels``: one ``file class``
per line, or the ``ImageId,PredictionString`` CSV of the Kaggle release, whose first token is the class).

Conversion uses every core (one process per shard at a time), prints progress, and can be re-run to finish an
interrupted job: a shard whose footer records the same inputs and settings is kept. An image that does not
decode completely is skipped, counted and listed in ``meta.json`` (``skipped``), never a crash hours in.

This module imports neither torch nor ray: converting processes import it alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workloads.fs import open_fs, write_atomic

DEFAULT_MAX_SIDE = 512
JPEG_QUALITY = 90
DEFAULT_SHARD_SIZE = 1024
# 64 encoded images (~7 MB for ImageNet) per row group: a rank whose share starts inside a shard reads little more
# than it needs.
ROW_GROUP_SIZE = 64
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
SHARD_KEY = b"adversarial_sweep.shard"
# Bumped when what a shard holds for the same inputs changes, so a re-run rewrites shards of an older converter.
CONVERTER_VERSION = 1
_EXIF_ORIENTATION = 0x0112


class SourceError(ValueError):
    """The source tree or label file is not what the converter needs; the message says how to fix it."""


@dataclass(frozen=True)
class ShardTask:
    url: str
    path: str  # relative to the dataset root
    files: tuple[tuple[str, int], ...]  # (absolute source path, label)
    max_side: int
    quality: int
    label_type: str  # "int16" or "int32"

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([CONVERTER_VERSION, self.max_side, self.quality, self.label_type]).encode())
        for path, label in self.files:
            try:
                size = os.stat(path).st_size
            except OSError:
                size = -1
            h.update(f"\0{path}\0{label}\0{size}".encode())
        return h.hexdigest()


# ------------------------------------------------------------------------------------------------------------
# Source tree


def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


def _read_labels(path: Path) -> dict[str, str]:
    """File name (with and without extension) -> class name, from a ``file class`` or Kaggle CSV label file."""
    if not path.is_file():
        raise SourceError(f"label file {path} does not exist")
    labels: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.replace(",", " ").split()
        if not fields or (n == 1 and fields[0].lower() in {"imageid", "file", "filename", "image"}):
            continue
        if len(fields) < 2:
            raise SourceError(f"{path}:{n}: expected 'FILE CLASS', got {line!r}")
        name, cls = fields[0], fields[1]
        labels[name] = cls
        labels.setdefault(Path(name).stem, cls)
    return labels


def list_source(src: Path, val_labels: Path | None = None) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Class names and, per split, the (file, label) pairs in sorted order; every error names the fix."""
    if not src.is_dir():
        raise SourceError(f"{src} is not a directory; expected {src}/<split>/<class>/<images> (e.g. train/n01440764)")
    split_dirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not split_dirs:
        raise SourceError(f"{src} has no split folders; expected {src}/train/<class>/<images> (and val/...)")
    class_dirs = {
        s.name: sorted(c for c in s.iterdir() if c.is_dir() and not c.name.startswith(".")) for s in split_dirs
    }
    classes = sorted({c.name for dirs in class_dirs.values() for c in dirs})
    if not classes:
        raise SourceError(
            f"{src} has no class folders; expected {src}/<split>/<class>/<images>, e.g. {src}/train/n01440764/"
        )
    class_id = {name: i for i, name in enumerate(classes)}
    splits: dict[str, list[tuple[str, int]]] = {}
    for split_dir in split_dirs:
        files: list[tuple[str, int]] = []
        if class_dirs[split_dir.name]:
            for c in class_dirs[split_dir.name]:
                images = _images_in(c)
                if not images:
                    raise SourceError(
                        f"class folder {c} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                        "add its images or remove the folder"
                    )
                files += [(str(f), class_id[c.name]) for f in images]
            loose = _images_in(split_dir)
            if loose:
                raise SourceError(
                    f"{split_dir} mixes class folders with {len(loose)} loose images (e.g. {loose[0].name}); "
                    "move them into their class folders"
                )
        else:
            images = _images_in(split_dir)
            if not images:
                raise SourceError(f"split folder {split_dir} holds neither class folders nor images")
            if val_labels is None:
                raise SourceError(
                    f"{split_dir} holds {len(images)} images but no class folders: pass --val-labels FILE "
                    "(one 'FILE CLASS' per line, or the Kaggle LOC_val_solution.csv)"
                )
            labels = _read_labels(val_labels)
            for f in images:
                cls = labels.get(f.name, labels.get(f.stem))
                if cls is None:
                    raise SourceError(f"{val_labels} has no label for {f}; every image of {split_dir} needs one")
                if cls not in class_id:
                    raise SourceError(
                        f"{val_labels} labels {f.name} as {cls!r}, which is not a class folder name of {src}"
                    )
                files.append((str(f), class_id[cls]))
        splits[split_dir.name] = files
    return classes, splits


def shard_tasks(
    url: str,
    split: str,
    files: Sequence[tuple[str, int]],
    *,
    num_classes: int,
    shard_size: int,
    max_side: int,
    quality: int,
    seed: int,
) -> list[ShardTask]:
    """The split's images in a seeded random order, cut into shards: a class-sorted listing would give shards of
    one class each, which a streaming reader's bounded shuffle buffer could never mix. Seeded by the split's name,
    so adding a split leaves the others' shards unchanged (and resumable)."""
    order = np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(len(files))
    ordered = [files[j] for j in order]
    label_type = "int16" if num_classes <= np.iinfo(np.int16).max + 1 else "int32"
    return [
        ShardTask(
            url=url,
            path=f"{split}/part-{k:05d}.parquet",
            files=tuple(ordered[start : start + shard_size]),
            max_side=max_side,
            quality=quality,
            label_type=label_type,
        )
        for k, start in enumerate(range(0, len(ordered), shard_size))
    ]


# ------------------------------------------------------------------------------------------------------------
# One image, one shard (these run in the converting processes)


def encode_image(raw: bytes, max_side: int, quality: int) -> tuple[bytes, bool]:
    """The bytes to store for one source file and whether they were re-encoded; raises if it does not decode.

    Kept byte for byte: images within ``max_side`` with no EXIF rotation. Otherwise: decoded (a large JPEG at the
    smallest DCT scale still >= the target, libjpeg's scaled decode), rotated upright, bicubic to a longer side of
    ``max_side`` and saved as JPEG at ``quality``.
    """
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
            if max(width, height) <= max_side and orientation == 1:
                # Decode every pixel once (at 1/8 scale for JPEGs: the whole entropy-coded stream is still read),
                # so a truncated or corrupt file is found here, not in a training epoch.
                img.draft(None, (max(1, width // 8), max(1, height // 8)))
                img.load()
                return raw, False
            scale = min(1.0, max_side / max(width, height))
            target = (max(1, round(width * scale)), max(1, round(height * scale)))
            img.draft("RGB" if img.mode not in ("L", "RGB") else img.mode, target)
            img.load()
            upright = ImageOps.exif_transpose(img)
            if orientation in (5, 6, 7, 8):
                target = (target[1], target[0])
            out = upright.convert("L" if upright.mode == "L" else "RGB")
            if out.size != target:
                out = out.resize(target, Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            out.save(buf, "JPEG", quality=quality)
            return buf.getvalue(), True


def _footer(fs: Any, where: str) -> dict[str, Any] | None:
    try:
        with fs.open(where, "rb") as f:
            meta = pq.read_schema(f).metadata or {}
        return dict(json.loads(meta[SHARD_KEY]))
    except Exception:  # absent, partial or foreign: the shard is (re)written
        return None


def convert_shard(task: ShardTask) -> dict[str, Any]:
    """Write one shard (or keep it if an earlier run wrote it from the same inputs); returns its summary."""
    fs, root = open_fs(task.url)
    where = f"{root}/{task.path}"
    fingerprint = task.fingerprint()
    done = _footer(fs, where)
    if done is not None and done.get("fingerprint") == fingerprint:
        return done | {"path": task.path, "kept": True}
    started = time.process_time()
    payloads: list[bytes] = []
    labels: list[int] = []
    skipped: list[dict[str, str]] = []
    bytes_in = reencoded = 0
    for path, label in task.files:
        try:
            raw = Path(path).read_bytes()
            payload, changed = encode_image(raw, task.max_side, task.quality)
        except Exception as e:  # unreadable, truncated, corrupt, too large to decode: skipped and listed
            skipped.append({"path": path, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        bytes_in += len(raw)
        reencoded += changed
        payloads.append(payload)
        labels.append(label)
    summary = {
        "fingerprint": fingerprint,
        "num_images": len(payloads),
        "skipped": skipped,
        "bytes_in": bytes_in,
        "bytes_out": sum(len(p) for p in payloads),
        "reencoded": reencoded,
        "cpu_seconds": time.process_time() - started,
    }
    table = pa.table(
        {"image": pa.array(payloads, type=pa.binary()), "label": pa.array(labels, type=getattr(pa, task.label_type)())}
    )
    table = table.replace_schema_metadata({SHARD_KEY: json.dumps(summary).encode()})
    buf = io.BytesIO()
    # JPEG bytes do not compress further; no dictionary or statistics on them either.
    pq.write_table(
        table,
        buf,
        row_group_size=ROW_GROUP_SIZE,
        compression="zstd",
        use_dictionary=["label"],
        write_statistics=["label"],
    )
    write_atomic(fs, where, buf.getvalue())
    return summary | {"path": task.path, "kept": False}


# ------------------------------------------------------------------------------------------------------------
# Driver


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _remove_strays(fs: Any, root: str, split: str, keep: set[str]) -> None:
    """Shards of an earlier conversion with more shards, and temp files of a killed write: nothing the new
    meta.json does not list stays behind."""
    folder = f"{root}/{split}"
    if not fs.exists(folder):
        return
    for entry in fs.ls(folder, detail=False):
        name = str(entry).rstrip("/").rsplit("/", 1)[-1]
        if f"{split}/{name}" not in keep and name.startswith("part-"):
            fs.rm_file(entry)


def _progress(out: Any) -> Callable[[str, int, int, int, int, float], None]:
    last = [0.0]

    def report(split: str, shards_done: int, shards: int, images: int, skipped: int, started: float) -> None:
        now = time.monotonic()
        if shards_done < shards and now - last[0] < 5.0:
            return
        last[0] = now
        rate = images / max(now - started, 1e-9)
        eta = (shards - shards_done) * (now - started) / max(shards_done, 1)
        print(
            f"{split}: {shards_done}/{shards} shards, {images} images ({rate:.0f}/s), {skipped} skipped"
            + (f", about {eta / 60:.0f} min left" if shards_done < shards else ""),
            file=out,
            flush=True,
        )

    return report


def convert(
    src: str | Path,
    url: str,
    *,
    image_size: int = 224,
    max_side: int = DEFAULT_MAX_SIDE,
    quality: int = JPEG_QUALITY,
    shard_size: int = DEFAULT_SHARD_SIZE,
    seed: int = 0,
    workers: int | None = None,
    val_labels: str | Path | None = None,
    progress: Any = sys.stderr,
) -> dict[str, Any]:
    """Convert ``src`` and write ``URL/meta.json`` last; returns the meta.json content.

    ``image_size`` is the side the reader yields by default (the model's input; ``data.augment.size`` overrides
    it per cell). Raises SourceError (before anything is written) when the tree is not usable.
    """
    if image_size < 1 or max_side < 1 or shard_size < 1 or not 1 <= quality <= 100:
        raise SourceError("image_size, max_side and shard_size must be >= 1 and quality in [1, 100]")
    classes, splits = list_source(Path(src), Path(val_labels) if val_labels is not None else None)
    fs, root = open_fs(url)
    meta_path = f"{root}/meta.json"
    # Hide any earlier dataset while shards change under it: readers see a dataset only with its meta.json.
    if fs.exists(meta_path):
        fs.rm_file(meta_path)
    plans = {
        name: shard_tasks(
            url,
            name,
            files,
            num_classes=len(classes),
            shard_size=shard_size,
            max_side=max_side,
            quality=quality,
            seed=seed,
        )
        for name, files in splits.items()
    }
    report = _progress(progress) if progress is not None else None
    workers = max(1, workers or default_workers())
    results: dict[str, list[dict[str, Any]]] = {}
    # forkserver: the converting processes start clean (no threads inherited from an s3fs event loop) and import
    # only this module, not torch.
    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for name, tasks in plans.items():
            _remove_strays(fs, root, name, {t.path for t in tasks})
            results[name] = _convert_split(pool, name, tasks, workers, report)
    meta = _meta(classes, image_size, max_side, quality, results)
    empty = [name for name, s in meta["splits"].items() if not s["num_images"]]
    if empty:
        raise SourceError(f"no image of split {', '.join(empty)} could be decoded; see the skipped list above")
    write_atomic(fs, meta_path, json.dumps(meta, indent=1).encode())
    return meta


def _convert_split(
    pool: ProcessPoolExecutor, name: str, tasks: list[ShardTask], workers: int, report: Any
) -> list[dict[str, Any]]:
    """Convert one split's shards on `pool`, reporting progress; the shards' results in the tasks' order."""
    started = time.monotonic()
    done: list[dict[str, Any]] = []
    pending: set[Future[dict[str, Any]]] = set()
    queue = list(reversed(tasks))
    while queue or pending:
        # A bounded window: a shard's images are in memory until its process has written it.
        while queue and len(pending) < 2 * workers:
            pending.add(pool.submit(convert_shard, queue.pop()))
        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in finished:
            done.append(future.result())
        if report is not None:
            images = sum(d["num_images"] for d in done)
            report(name, len(done), len(tasks), images, sum(len(d["skipped"]) for d in done), started)
    order = {t.path: k for k, t in enumerate(tasks)}
    return sorted(done, key=lambda d: order[d["path"]])


def _meta(
    classes: list[str], image_size: int, max_side: int, quality: int, results: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """meta.json of an encoded dataset: its splits' shards, the skipped images, and what the conversion did."""
    shards = [d for split in results.values() for d in split]
    return {
        "format_version": 2,
        "encoding": "encoded",
        "num_classes": len(classes),
        "image_shape": [3, image_size, image_size],
        "classes": classes,
        "splits": {
            name: {
                "num_images": sum(d["num_images"] for d in split),
                "shards": [{"path": d["path"], "num_images": d["num_images"]} for d in split if d["num_images"]],
            }
            for name, split in results.items()
        },
        "skipped": [s for d in shards for s in d["skipped"]],
        "conversion": {
            "max_side": max_side,
            "quality": quality,
            "source_bytes": sum(d["bytes_in"] for d in shards),
            "stored_image_bytes": sum(d["bytes_out"] for d in shards),
            "reencoded": sum(d["reencoded"] for d in shards),
            "cpu_seconds": sum(d["cpu_seconds"] for d in shards),
        },
    }


# ------------------------------------------------------------------------------------------------------------
# A small real tree, for tests and benchmarks (no download)


def sample_tree(
    dst: str | Path,
    *,
    classes: int = 4,
    per_class: int = 8,
    val_per_class: int = 2,
    sizes: tuple[int, int] = (96, 900),
    seed: int = 0,
    odd_files: bool = True,
) -> Path:
    """An ImageNet-style tree of real photographs: crops of scikit-learn's two bundled sample photos (china.jpg,
    flower.jpg, 640 x 427) at random sizes (longer side in ``sizes``) and aspect ratios (1/2 to 2), saved as JPEG
    at qualities 75-95; ``val/`` is flat with ``val_labels.txt`` beside the tree. ``odd_files`` adds a greyscale
    and a CMYK JPEG to every class, a PNG, and one truncated JPEG (the converter must skip it)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    root = Path(dst)
    (root / "val").mkdir(parents=True, exist_ok=True)
    labels: list[str] = []

    def photo() -> Image.Image:
        src = photos[int(rng.integers(len(photos)))]
        w, h = src.size
        cw, ch = int(rng.integers(w // 3, w + 1)), int(rng.integers(h // 3, h + 1))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        longer = int(rng.integers(sizes[0], sizes[1] + 1))
        aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        size = (longer, max(16, round(longer / aspect))) if aspect >= 1 else (max(16, round(longer * aspect)), longer)
        return src.crop((left, top, left + cw, top + ch)).resize(size, Image.Resampling.BICUBIC)

    for c in range(classes):
        name = f"n{c:08d}"
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = photo()
            if odd_files and i == 0:
                img = img.convert("L")
            elif odd_files and i == 1:
                img = img.convert("CMYK")
            img.save(folder / f"{name}_{i}.JPEG", "JPEG", quality=int(rng.integers(75, 96)))
        for i in range(val_per_class):
            file = f"ILSVRC2012_val_{c * val_per_class + i:08d}.JPEG"
            photo().save(root / "val" / file, "JPEG", quality=90)
            labels.append(f"{file} {name}")
    if odd_files:
        photo().save(root / "train" / "n00000000" / "n00000000_png.png")
        whole = root / "train" / "n00000001" / "n00000001_truncated.JPEG"
        photo().save(whole, "JPEG", quality=90)
        whole.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    (root.parent / f"{root.name}_val_labels.txt").write_text("\n".join(labels) + "\n")
    return root
