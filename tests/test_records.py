"""The per-cell records in storage (`orchestrator.records`): written and read through one class each, and every
record an earlier version wrote still reads."""

from __future__ import annotations

from orchestrator.records import CellError, CellResult, Unschedulable
from orchestrator.results import result_rows


def _result(**changes: object) -> CellResult:
    fields: dict = {
        "cell_id": "abc123def456",
        "axes": {"seed": 1, "norm": "bn"},
        "epochs": 3,
        "train_seconds": 30.0,
        "gpu_hours": 0.0,
        "branches": {"main": {"acc_clean": 0.9, "acc_pgd_10": 0.4}},
    }
    return CellResult(**(fields | changes))


def test_a_result_round_trips_and_leaves_out_what_it_did_not_measure() -> None:
    result = _result(resumed_from_epoch=2, provenance={"code": "f00"})
    document = result.to_json()
    assert {"forked_from", "domain_gap", "bn_statistics"}.isdisjoint(document)
    assert document["status"] == "finished"
    assert CellResult.from_json(document) == result
    forked = _result(forked_from="0123456789ab", domain_gap=0.002, bn_statistics={"layer": "layer2.1.bn1"})
    assert CellResult.from_json(forked.to_json()) == forked


def test_records_an_earlier_version_wrote_still_read() -> None:
    # A result.json from before provenance, forks and BN statistics, with a key this version does not know.
    old = {"cell_id": "c", "axes": {"seed": 0}, "status": "finished", "epochs": 2, "branches": {"main": {}}, "x": 1}
    result = CellResult.from_json(old)
    assert (result.epochs, result.provenance, result.forked_from, result.train_seconds) == (2, {}, None, 0.0)
    error = CellError.from_json({"cell_id": "c", "status": "failed", "error": "FloatingPointError: loss is nan"})
    assert error.error.startswith("FloatingPointError") and error.axes == {} and error.failed_at == 0.0
    assert Unschedulable.from_json({}).problem == ""


def test_results_rows_come_from_the_records() -> None:
    failed = CellError("dead00000000", {"seed": 2, "norm": "bn"}, "NodeDiedError: node gone").to_json()
    rows = result_rows([_result().to_json(), failed])
    by_cell = {row["cell_id"]: row for row in rows}
    assert by_cell["abc123def456"]["acc_pgd_10"] == 0.4 and by_cell["abc123def456"]["status"] == "finished"
    assert by_cell["dead00000000"]["status"] == "failed" and by_cell["dead00000000"]["error"].startswith("NodeDied")
    assert by_cell["dead00000000"]["epochs"] == 0 and by_cell["dead00000000"]["seed"] == 2
