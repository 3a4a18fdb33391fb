"""The results API: a sweep's results as a pandas DataFrame, and several sweeps side by side.

    from orchestrator.api import load_results, compare
    df = load_results("s3://bucket/sweeps/digits-weak-gap")       # or a local folder
    both = compare("runs/digits-weak-gap", "runs/digits-strong-gap")
    both.attrs["factors"]                                         # ['config.attack.eps', ...]

One row per (cell, evaluation branch), as in `results.parquet` (README "Storage layout"): the grid axes, the
accuracies, `sweep` (the sweep's name), the cell's provenance (code hash, commit, library versions, device) and
its whole resolved configuration as `config.<path>` columns. Reading needs only the storage: no Ray, no torch.
"""

from __future__ import annotations

import io

import pandas as pd
import pyarrow.parquet as pq

from orchestrator.results import RESULTS_FILE
from orchestrator.storage import SweepStorage

__all__ = ["compare", "load_results"]


def load_results(url: str) -> pd.DataFrame:
    """`<url>/results.parquet` as a DataFrame (FileNotFoundError naming the file when there is none)."""
    storage = SweepStorage(url.rstrip("/"))
    path = storage.path(RESULTS_FILE)
    with storage.fs.open(path, "rb") as f:
        frame = pq.read_table(io.BytesIO(f.read())).to_pandas()
    if "sweep" not in frame.columns or frame["sweep"].isna().all():
        frame["sweep"] = url.rstrip("/").rsplit("/", 1)[-1]  # written before the column existed: the folder name
    return frame


def compare(*urls: str) -> pd.DataFrame:
    """The results of several sweeps in one DataFrame. The configuration fields whose values differ between the
    sweeps (e.g. `config.attack.eps` for a weak-gap and a strong-gap study) are listed, in column order, in
    `.attrs["factors"]`, so they can serve as factors beside the grid axes."""
    if len(urls) < 2:
        raise ValueError("compare needs at least two sweeps")
    frames = [load_results(url) for url in urls]
    names = [frame["sweep"].iloc[0] if len(frame) else url for frame, url in zip(frames, urls, strict=True)]
    if len(set(names)) < len(names):  # two copies of one sweep: tell them apart by their location
        for frame, url in zip(frames, urls, strict=True):
            frame["sweep"] = url.rstrip("/")
    combined = pd.concat(frames, ignore_index=True, sort=False)
    factors = []
    for column in combined.columns:
        if not column.startswith("config."):
            continue
        per_sweep = combined.groupby("sweep", sort=False)[column].agg(lambda s: frozenset(s.dropna().astype(str)))
        if per_sweep.nunique() > 1:
            factors.append(column)
    combined.attrs["factors"] = factors
    return combined
