"""The replication rule on fixed results: a decided comparison gets no seed, an undecided one does, the maximum
and the budget hold, and a comparison naming what is not in the grid is refused at validation."""

from __future__ import annotations

import random

import pytest
import yaml

from orchestrator import replication
from orchestrator.plan import plan_spec
from orchestrator.spec import Spec, SpecError, parse_spec
from tests.conftest import tiny_spec

DECIDE = ["clean_ratio 0.0 vs 1.0", "norm bn* vs bn"]


def spec(budget: float | None = None, **replicate: object) -> Spec:
    document = tiny_spec("rep", {"clean_ratio": [0.0, 1.0], "norm": ["bn", "bn*"]})
    document["replication"] = {"seeds": [2, 4], "effect": 5.0, "decide": DECIDE, **replicate}
    if budget is not None:
        document["replication"]["budget_device_hours"] = budget
    return parse_spec(yaml.safe_dump(document))


def cost(s: Spec) -> dict[str, float]:
    return {p.cell_id: p.device_hours for p in plan_spec(s, replication.maximum_cells(s)).cells}


def values_for(s: Spec, accuracy: dict[tuple[float, str], list[float]]) -> tuple[list, dict[str, float]]:
    """The first seeds' cells and their metric, per (clean_ratio, norm) a list over seeds 0, 1."""
    cells = replication.initial_cells(s)
    values = {c.cell_id: accuracy[(c.axes["clean_ratio"], c.axes["norm"])][c.axes["seed"]] for c in cells}
    return cells, values


def test_initial_cells_are_the_minimum_seeds_of_every_setting() -> None:
    s = spec()
    cells = replication.initial_cells(s)
    assert len(cells) == 4 * 2 and {c.axes["seed"] for c in cells} == {0, 1}
    assert len(replication.maximum_cells(s)) == 4 * 4


def test_decided_comparisons_get_no_seed() -> None:
    s = spec()
    # clean ratio: about 40 points apart in every setting (the CI excludes 0); BN* vs BN: within 0.5 points of
    # each other, paired by seed, far inside the 5-point effect of interest.
    accuracy = {
        (0.0, "bn"): [0.90, 0.92],
        (0.0, "bn*"): [0.903, 0.921],
        (1.0, "bn"): [0.50, 0.53],
        (1.0, "bn*"): [0.502, 0.531],
    }
    cells, values = values_for(s, accuracy)
    judgements = replication.judge(s, cells, values)
    assert len(judgements) == 4 and all(j.decided for j in judgements)
    assert replication.next_cells(s, cells, values, cost(s)) == []


def test_undecided_comparisons_get_one_more_seed_per_setting() -> None:
    s = spec()
    accuracy = {
        (0.0, "bn"): [0.90, 0.50],  # noisy: the CI of every clean-ratio pair spans 0 and the effect
        (0.0, "bn*"): [0.91, 0.51],
        (1.0, "bn"): [0.70, 0.60],
        (1.0, "bn*"): [0.71, 0.61],
    }
    cells, values = values_for(s, accuracy)
    more = replication.next_cells(s, cells, values, cost(s))
    assert {c.axes["seed"] for c in more} == {2}
    assert {(c.axes["clean_ratio"], c.axes["norm"]) for c in more} == set(accuracy)
    # BN* vs BN is decided (paired, every difference 1 point): it alone would add nothing; the settings get
    # their seed from the undecided clean-ratio pairs.
    judged = {(j.comparison.axis, j.a, j.b): j.decided for j in replication.judge(s, cells, values)}
    assert [decided for (axis, *_), decided in judged.items() if axis == "norm"] == [True, True]


def test_the_maximum_number_of_seeds_holds() -> None:
    s = spec()
    cells = replication.maximum_cells(s)  # every setting at 4 seeds already
    values = {c.cell_id: random.Random(c.cell_id).random() for c in cells}
    assert replication.next_cells(s, cells, values, cost(s)) == []


@pytest.mark.parametrize("seed", range(5))
def test_the_budget_is_never_exceeded_over_rounds(seed: int) -> None:
    rng = random.Random(seed)
    full = spec()
    budget = sum(cost(full).values()) * rng.uniform(0.55, 0.9)
    s = spec(budget=budget)
    costs = cost(s)
    cells = replication.initial_cells(s)
    values: dict[str, float] = {}
    for _ in range(10):
        values |= {c.cell_id: rng.random() for c in cells if c.cell_id not in values}  # noise: never decided
        more = replication.next_cells(s, cells, values, costs)
        if not more:
            break
        cells += more
        assert sum(costs[c.cell_id] for c in cells) <= budget
    assert len(cells) < len(replication.maximum_cells(s))  # the budget, not the maximum, stopped it


@pytest.mark.parametrize(
    ("decide", "message"),
    [
        ("depth 18 vs 34", "34 not in the grid's depth values (18)"),
        ("norm gn vs bn", "'gn' not in the grid's norm values (bn, bn*)"),
        ("gn vs bn", "no grid axis takes both 'gn' and 'bn'"),
        ("colour red vs blue", "'colour' is not a grid axis"),
        ("clean_ratio 0.0 vs 0.0", "compares a setting with itself"),
        ("bn versus bn*", "write 'AXIS A vs B'"),
        ("seed 0 vs 1", "'seed' is not a grid axis"),
    ],
)
def test_a_comparison_outside_the_grid_is_refused_at_validation(decide: str, message: str) -> None:
    with pytest.raises(SpecError, match=None) as err:
        spec(decide=[decide])
    assert message in str(err.value), str(err.value)


def test_seeds_in_the_grid_and_a_bad_metric_are_refused() -> None:
    document = tiny_spec("rep", {"clean_ratio": [0.0, 1.0], "seed": [0, 1]})
    document["replication"] = {"seeds": [2, 3], "effect": 5.0, "decide": ["clean_ratio 0.0 vs 1.0"]}
    with pytest.raises(SpecError, match="leave `seed` out"):
        parse_spec(yaml.safe_dump(document))
    with pytest.raises(SpecError, match="replication.metric: 'acc_pgd_7' is not acc_clean or one of acc_pgd_1"):
        spec(metric="acc_pgd_7")
    with pytest.raises(SpecError, match="2 <= min <= max"):
        spec(seeds=[1, 3])


def test_the_replay_on_a_committed_study_finds_every_cell_and_saves_some() -> None:
    from benchmarks.adaptive_replication import replay

    result = replay("digits-weak-gap", "acc_clean")  # raises if a replayed cell's id is not in the results
    assert result["adaptive_cells"] < result["fixed_cells"] == 15
    assert all(pair["fixed"] == pair["adaptive"] for pair in result["pairs"])
