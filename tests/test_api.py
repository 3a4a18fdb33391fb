"""The results API on the committed studies (docs/results/): one DataFrame across sweeps, told apart by config."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orchestrator.api import compare, load_results

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
WEAK, STRONG = RESULTS / "digits-weak-gap", RESULTS / "digits-strong-gap"


def test_load_results_returns_the_table_with_config_and_sweep_name() -> None:
    frame = load_results(str(WEAK))
    assert len(frame) == pq.read_metadata(WEAK / "results.parquet").num_rows
    assert set(frame["sweep"]) == {"digits-weak-gap"}
    assert {"cell_id", "norm", "acc_clean", "config.attack.eps", "config.model.width", "source_hash"} <= set(frame)


def test_two_studies_differ_by_eps() -> None:
    both = compare(str(WEAK), str(STRONG))
    assert len(both) == len(load_results(str(WEAK))) + len(load_results(str(STRONG)))
    eps = both.groupby("sweep")["config.attack.eps"].unique().to_dict()
    assert {k: list(v) for k, v in eps.items()} == {"digits-weak-gap": [16.0], "digits-strong-gap": [76.0]}
    assert "config.attack.eps" in both.attrs["factors"]
    assert "config.model.depth" not in both.attrs["factors"]  # the same in both studies: not a factor


def test_copies_of_one_sweep_are_told_apart_by_location(tmp_path: Path) -> None:
    copy = tmp_path / "digits-weak-gap"
    shutil.copytree(WEAK, copy)
    both = compare(str(WEAK), str(copy))
    assert both["sweep"].nunique() == 2 and both.attrs["factors"] == []


def test_missing_results_and_too_few_sweeps_are_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_results(str(tmp_path))
    with pytest.raises(ValueError, match="at least two"):
        compare(str(WEAK))
