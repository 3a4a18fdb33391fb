"""Sharded Parquet image datasets on any fsspec URL, and the streaming reader that DDP workers train from.

Layout under a dataset root URL (local path, ``file://`` or ``s3://bucket/prefix``)::

    meta.json                 {"format_version", "num_classes", "image_shape": [C, H, W], "classes": [...],
                               "splits": {"train": {"num_images", "shards": [{"path", "num_images"}, ...]}}}
    train/part-00000.parquet  columns ``image`` (binary), ``label`` (int16/32)
    test/part-00000.parquet

Two encodings of the ``image`` column. Decoded (format 1, the small CPU datasets: digits, synthetic): C*H*W uint8
bytes, row-major, read without any codec and bit-for-bit reproducible. Encoded (format 2, ``"encoding":
"encoded"``, ImageNet from ``python -m workloads.data folder``, see workloads/imagenet.py): the image file's bytes,
decoded and augmented by the reader every epoch as the paper's pipeline does (workloads/augment.py); its
``image_shape`` is the side the reader yields by default, and meta.json also lists the images the converter
skipped.

``meta.json`` is written last (and removed first when a dataset is overwritten), so a reader never pairs it
with half-written shards.

Why shards: the paper trains on 128 GPUs (Section 3); each worker streams only its own share from object
storage (:func:`iter_batches`) instead of every worker downloading the whole set. The small real dataset for
CPU runs, scikit-learn's bundled digits, goes through the same format and code path
(:func:`digits_to_parquet`).

Decoding encoded images runs in processes beside the training process (the paper's pipeline decodes in about 50
processes per 8-GPU machine), as many as the worker's CPUs less one; the choice against Ray Data, with the
measurements, is in docs/benchmarks.md (input_pipeline).

Create a dataset with ``python -m workloads.data digits URL`` (or ``folder SRC URL``, ``synthetic URL ...``).

The package, one module a job: `format` (meta.json and the dataset's description), `writer` (shards, then
meta.json), `converters` (digits, a folder of images, synthetic), `shards` (a rank's rows of a split's shards),
`reader` (the training stream), `decoding` (the decoding processes and evaluation loading), `cli`.
"""

from workloads.data.cli import main
from workloads.data.converters import digits_to_parquet, folder_to_parquet, synthetic_batch, synthetic_to_parquet
from workloads.data.decoding import decode_processes, load_split
from workloads.data.format import DEFAULT_ROW_GROUP_SIZE, META_FILE, DatasetInfo, ShardInfo, SplitInfo, read_info
from workloads.data.reader import batches_per_epoch, iter_batches
from workloads.data.writer import write_dataset

__all__ = [
    "DEFAULT_ROW_GROUP_SIZE",
    "META_FILE",
    "DatasetInfo",
    "ShardInfo",
    "SplitInfo",
    "batches_per_epoch",
    "decode_processes",
    "digits_to_parquet",
    "folder_to_parquet",
    "iter_batches",
    "load_split",
    "main",
    "read_info",
    "synthetic_batch",
    "synthetic_to_parquet",
    "write_dataset",
]
