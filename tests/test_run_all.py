"""`benchmarks.run_all` keeps each result it measures, and a `--only` pass renders the benchmarks it does not re-run
from their last results instead of dropping their sections. The benchmarks here are stand-ins: the real ones take
minutes each."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks import run_all
from benchmarks._common import Check


def _bench(name: str, value: str, calls: list[str]) -> SimpleNamespace:
    def run() -> dict[str, Any]:
        calls.append(name)
        return {"name": name, "value": value, "checks": [Check(name, "speed", value, "", None)]}

    return SimpleNamespace(run=run, print_result=lambda result: None)


def test_only_re_runs_what_it_names_and_keeps_the_other_sections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    doc = tmp_path / "benchmarks.md"
    monkeypatch.setattr(run_all, "DOC", doc)
    monkeypatch.setattr(run_all, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(run_all, "ROOT", tmp_path)
    monkeypatch.setattr(
        run_all, "MODULES", {"fast": _bench("fast", "1 img/s", calls), "slow": _bench("slow", "2 img/s", calls)}
    )
    monkeypatch.setattr(run_all, "DETAILS", {name: (lambda r: f"value {r['value']}") for name in ("fast", "slow")})

    run_all.run()
    assert calls == ["fast", "slow"]
    assert {p.name for p in (tmp_path / "results").iterdir()} == {"fast.json", "slow.json"}

    monkeypatch.setitem(run_all.MODULES, "fast", _bench("fast", "3 img/s", calls))
    run_all.run(only=["fast"])
    assert calls == ["fast", "slow", "fast"]  # slow is not run again
    text = doc.read_text()
    assert "## fast (" in text and "value 3 img/s" in text  # measured now
    assert "## slow (" in text and "value 2 img/s" in text  # kept, and said to be kept
    assert "Not re-run in this pass: measured on " in text and "`results/slow.json`" in text
    assert "| slow | speed | 2 img/s |" in text  # its summary row too
    assert text.index("## fast") < text.index("## slow")  # in the registry's order


def test_a_benchmark_never_measured_here_has_no_section_in_an_only_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(run_all, "DOC", tmp_path / "benchmarks.md")
    monkeypatch.setattr(run_all, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(run_all, "ROOT", tmp_path)
    monkeypatch.setattr(
        run_all, "MODULES", {"fast": _bench("fast", "1 img/s", calls), "slow": _bench("slow", "2 img/s", calls)}
    )
    monkeypatch.setattr(run_all, "DETAILS", {name: (lambda r: f"value {r['value']}") for name in ("fast", "slow")})
    out = run_all.run(only=["fast"])
    assert calls == ["fast"] and set(out["results"]) == {"fast"}
    assert "## slow" not in (tmp_path / "benchmarks.md").read_text()
