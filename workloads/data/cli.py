"""`python -m workloads.data digits|folder|synthetic|... URL`: create a dataset."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from workloads import builtin_data
from workloads.data.converters import folder_to_parquet, synthetic_to_parquet
from workloads.data.format import META_FILE, DatasetInfo

# ------------------------------------------------------------------------------------------------------------
# Command line


def describe(info: DatasetInfo) -> str:
    c, h, w = info.image_shape
    splits = ", ".join(f"{name} {s.num_images} images in {len(s.shards)} shards" for name, s in info.splits.items())
    stored = f"encoded images read as {c}x{h}x{w}" if info.encoded else f"images {c}x{h}x{w}"
    skipped = f"; {len(info.skipped)} unreadable source images skipped (listed in {META_FILE})" if info.skipped else ""
    return f"{info.url}: {splits}; {stored}, {info.num_classes} classes{skipped}"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workloads.data",
        description="Write a sharded Parquet dataset to a local path or s3:// URL.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # One subcommand per built-in dataset, from the registry the sweep's builtin:// URLs are checked against.
    for name, dataset in builtin_data.DATASETS.items():
        bundled = sub.add_parser(name, help=f"{dataset.description} (no download; builtin://{name} in a spec)")
        bundled.add_argument("url")
        bundled.add_argument("--image-size", type=_positive, default=dataset.image_size)
        bundled.add_argument("--shard-size", type=_positive, default=dataset.shard_size)
    folder = sub.add_parser(
        "folder",
        help="an ImageNet-style tree SRC/<split>/<class>/<image> as encoded images (re-run to finish a stopped job)",
    )
    folder.add_argument("src")
    folder.add_argument("url")
    folder.add_argument("--image-size", type=_positive, default=224, help="side the reader yields (default 224)")
    folder.add_argument("--max-side", type=_positive, default=512, help="longer side above which images are re-encoded")
    folder.add_argument("--quality", type=_positive, default=90, help="JPEG quality of re-encoded images")
    folder.add_argument("--shard-size", type=_positive, default=1024)
    folder.add_argument("--val-labels", default=None, help="labels of a split folder without class folders")
    folder.add_argument("--seed", type=int, default=0)
    folder.add_argument("--workers", type=_positive, default=None, help="converting processes (default: every core)")
    synthetic = sub.add_parser("synthetic", help="random class-dependent images, for benchmarks and tests")
    synthetic.add_argument("url")
    synthetic.add_argument("--num-images", type=_positive, required=True)
    synthetic.add_argument("--num-test", type=_positive, default=None)
    synthetic.add_argument("--image-shape", type=_positive, nargs=3, default=[3, 32, 32], metavar=("C", "H", "W"))
    synthetic.add_argument("--num-classes", type=_positive, default=10)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--shard-size", type=_positive, default=512)
    args = parser.parse_args(argv)

    try:
        if args.command in builtin_data.DATASETS:
            info = builtin_data.convert(args.command, args.url, args.image_size, args.shard_size)
        elif args.command == "folder":
            info = folder_to_parquet(
                args.src,
                args.url,
                args.image_size,
                args.shard_size,
                max_side=args.max_side,
                quality=args.quality,
                seed=args.seed,
                workers=args.workers,
                val_labels=args.val_labels,
                progress=sys.stderr,
            )
        else:
            info = synthetic_to_parquet(
                args.url,
                args.num_images,
                args.image_shape,
                args.num_classes,
                args.seed,
                num_test=args.num_test,
                shard_size=args.shard_size,
            )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {describe(info)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
