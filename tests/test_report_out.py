"""`report --out DIR` for a sweep one may only read, and the report's account of which code produced which rows."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator import report

COMMITTED = Path(__file__).resolve().parents[1] / "docs" / "results" / "digits-weak-gap"


def test_report_out_writes_elsewhere_and_leaves_the_sweep_untouched(tmp_path: Path) -> None:
    sweep = tmp_path / "digits-weak-gap"
    shutil.copytree(COMMITTED, sweep)
    before = {p.relative_to(sweep): p.stat().st_mtime_ns for p in sweep.rglob("*")}
    out = tmp_path / "elsewhere"
    (out).mkdir()
    (out / "mine.png").write_bytes(b"not the report's")
    assert report.main([str(sweep), "--out", str(out)]) == report.EXIT_OK
    assert {p.relative_to(sweep): p.stat().st_mtime_ns for p in sweep.rglob("*")} == before
    assert (out / "report.md").is_file() and (out / "training_curves.png").is_file()
    assert (out / "mine.png").read_bytes() == b"not the report's"  # nothing of the user's is removed


def test_the_report_says_when_rows_come_from_two_code_versions(tmp_path: Path) -> None:
    sweep = tmp_path / "digits-weak-gap"
    shutil.copytree(COMMITTED, sweep)
    table = pq.read_table(sweep / "results.parquet")
    ids = sorted(set(table.column("cell_id").to_pylist()))
    hashes = ["aaaa" if ids.index(cid) % 2 else "bbbb" for cid in table.column("cell_id").to_pylist()]
    index = table.column_names.index("source_hash")
    pq.write_table(table.set_column(index, "source_hash", pa.array(hashes, pa.string())), sweep / "results.parquet")
    markdown = Path(report.build_report(str(sweep))).read_text()
    section = markdown.split("## Code that produced these results", 1)[1].split("\n## ", 1)[0]
    assert "more than one version of the workload code" in section
    assert "| `aaaa` |" in section and "| `bbbb` |" in section
