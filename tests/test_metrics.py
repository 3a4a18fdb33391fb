"""The names of a cell's evaluation metrics (`workloads.metrics`): built and parsed in one place."""

from __future__ import annotations

import pytest

from workloads import metrics


def test_pgd_names_round_trip_and_sort_by_steps_not_text() -> None:
    names = [metrics.pgd_metric(n) for n in (2000, 10, 100, 20)]
    assert [metrics.pgd_steps(n) for n in names] == [2000, 10, 100, 20]
    # As text "acc_pgd_100" < "acc_pgd_20"; by attack strength it is the other way round.
    assert metrics.pgd_metrics([*names, "acc_clean", "loss"]) == [
        "acc_pgd_10",
        "acc_pgd_20",
        "acc_pgd_100",
        "acc_pgd_2000",
    ]
    assert metrics.strongest_pgd(names) == "acc_pgd_2000"
    assert metrics.strongest_pgd(["acc_clean"]) is None


@pytest.mark.parametrize("name", ["acc_clean", "acc_pgd_", "acc_pgd_x", "train_acc_adv", "acc_pgd_-1"])
def test_other_names_are_no_pgd_metric(name: str) -> None:
    assert metrics.pgd_steps(name) is None


def test_labels() -> None:
    assert metrics.metric_label("acc_clean") == "clean"
    assert metrics.metric_label(metrics.pgd_metric(200)) == "PGD-200"
    assert metrics.metric_label("loss") == "loss"


def test_eval_keys_carry_the_branch() -> None:
    key = metrics.eval_key("mbn_clean", metrics.pgd_metric(10))
    assert key == "eval/mbn_clean/acc_pgd_10"
    assert metrics.parse_eval_key(key) == ("mbn_clean", "acc_pgd_10")
    assert metrics.parse_eval_key("eval/main") is None
    assert metrics.parse_eval_key("train/main/acc_clean") is None
