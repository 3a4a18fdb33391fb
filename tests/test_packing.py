"""The placement policy (orchestrator.packing): worked instances, invariants on random ones, and the Tune searcher
running the same decisions as the simulation. No Ray instance is started."""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Sequence
from types import SimpleNamespace

import pytest

from orchestrator.packing import (
    LARGEST_FIRST,
    POLICIES,
    WIDEST_THEN_LONGEST,
    Packer,
    Policy,
    exclusion_bound,
    simulate,
)


def gpus(*slots: int) -> list[dict[str, float]]:
    return [{"GPU": float(s)} for s in slots]


def makespan_of(starts: Sequence[float], hours: Sequence[float]) -> float:
    return max(s + h for s, h in zip(starts, hours, strict=True))


# --- worked instances -------------------------------------------------------------------------------------


def test_a_long_narrow_cell_starts_first_and_reaches_the_optimum() -> None:
    # 4 GPUs: a 1-GPU cell of 12 h and four 2-GPU cells of 3 h. Nothing finishes before the 12-hour cell, so 12 h
    # is optimal: start it at once and run the 2-GPU cells one at a time beside it.
    slots, hours = [1, 2, 2, 2, 2], [12.0, 3.0, 3.0, 3.0, 3.0]
    starts = simulate(gpus(*slots), hours, {"GPU": 4})
    assert starts[0] == 0.0
    assert makespan_of(starts, hours) == pytest.approx(12.0)
    # Most GPUs first runs the 2-GPU cells two by two and the long cell alone at the end: 6 + 12 hours.
    old = simulate(gpus(*slots), hours, {"GPU": 4}, LARGEST_FIRST)
    assert makespan_of(old, hours) == pytest.approx(18.0)


def test_equal_work_gangs_reach_the_area_bound() -> None:
    # Equal work H = 1 per cell on 1, 2 or 4 GPUs of a 4-GPU cluster: 6 H / 4 GPUs = 1.5 is a lower bound.
    slots = [4, 4, 2, 2, 1, 1]
    hours = [1 / s for s in slots]
    starts = simulate(gpus(*slots), hours, {"GPU": 4})
    assert makespan_of(starts, hours) == pytest.approx(1.5)
    assert makespan_of(simulate(gpus(*slots), hours, {"GPU": 4}, LARGEST_FIRST), hours) == pytest.approx(2.0)


def test_a_backfill_never_delays_the_reserved_cell() -> None:
    # 4 GPUs; job 0 (3 GPUs, 10 h) runs. Job 1 (4 GPUs, 50 h) is next but must wait until hour 10. Job 2 (1 GPU,
    # 20 h) ranks before job 3 (1 GPU, 5 h) but would hold a GPU past hour 10; job 3 is done by then.
    packer = Packer(gpus(3, 4, 1, 1), [10.0, 50.0, 20.0, 5.0], {"GPU": 4})
    packer.start(0, 0.0)
    assert packer.select(0.0) == 3
    packer.start(3, 0.0)
    assert packer.select(0.0) is None  # nothing free
    packer.finish(3, 5.0)
    assert packer.select(5.0) is None  # job 2 would still delay job 1
    packer.finish(0, 10.0)
    assert packer.select(10.0) == 1
    packer.start(1, 10.0)
    packer.finish(1, 60.0)
    assert packer.select(60.0) == 2


def test_first_fit_lets_narrow_cells_take_what_a_wide_one_needs() -> None:
    # The same situation under plain first fit (the old policy): job 2 starts at once and job 1 waits for it.
    packer = Packer(gpus(3, 4, 1, 1), [10.0, 50.0, 20.0, 5.0], {"GPU": 4}, LARGEST_FIRST)
    packer.start(0, 0.0)
    assert packer.select(0.0) == 2


def test_while_every_cell_is_short_the_widest_goes_first() -> None:
    # 40 one-hour cells of 1, 2, 4 and 8 GPUs on 8 GPUs: 150 GPU-hours, ~19 hours of work; no cell is long
    # next to that, so the cluster is packed widest first (the longest of a width first).
    rng = random.Random(0)
    slots = [rng.choice([1, 2, 4, 8]) for _ in range(40)]
    hours = [rng.uniform(0.9, 1.1) for _ in slots]
    packer = Packer(gpus(*slots), hours, {"GPU": 8})
    first = packer.select(0.0)
    assert first is not None and slots[first] == 8
    assert hours[first] == max(h for s, h in zip(slots, hours, strict=True) if s == 8)


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy 'fifo'"):
        Packer(gpus(1), [1.0], {"GPU": 1}, "fifo")  # type: ignore[arg-type]


def test_a_cell_larger_than_the_cluster_is_refused() -> None:
    with pytest.raises(ValueError, match="needs"):
        simulate(gpus(2, 8), [1.0, 1.0], {"GPU": 4})


# --- invariants on random instances -----------------------------------------------------------------------


def random_instance(seed: int) -> tuple[list[int], list[float], list[float], int]:
    rng = random.Random(seed)
    capacity = rng.choice([4, 8, 16, 32])
    n = rng.randint(1, 9)
    slots = [rng.randint(1, capacity) for _ in range(n)]
    estimates = [rng.choice([0.5, 1.0, 2.0, 3.0]) * rng.uniform(0.5, 2.0) for _ in range(n)]
    actual = [e * rng.uniform(0.7, 1.3) for e in estimates]
    return slots, estimates, actual, capacity


def drive(packer: Packer, actual: Sequence[float]) -> list[float]:
    """An event loop of its own (not `simulate`): start what the policy names, advance to the next end."""
    starts: dict[int, float] = {}
    ends: list[tuple[float, int]] = []
    now = 0.0
    while len(starts) < len(actual):
        job = packer.select(now)
        if job is not None:
            assert job not in starts, f"job {job} selected twice"
            starts[job] = now
            packer.start(job, now)
            heapq.heappush(ends, (now + actual[job], job))
            continue
        assert ends, "the policy waits although nothing runs"
        now, job = heapq.heappop(ends)
        packer.finish(job, now)
    assert packer.select(now) is None and packer.pending == 0
    return [starts[i] for i in range(len(actual))]


def peak_use(slots: Sequence[int], starts: Sequence[float], hours: Sequence[float]) -> int:
    return peak_of([(g, s, s + h) for g, s, h in zip(slots, starts, hours, strict=True)])


def peak_of(intervals: Sequence[tuple[int, float, float]]) -> int:
    """Largest sum of GPUs over overlapping [start, end) intervals (an end before a start at equal times)."""
    events = sorted([(end, 0, -g) for g, _, end in intervals] + [(start, 1, g) for g, start, _ in intervals])
    used = peak = 0
    for _, _, delta in events:
        used += delta
        peak = max(peak, used)
    return peak


def brute_force_exclusion(slots: Sequence[int], hours: Sequence[float], capacity: int) -> float:
    """Heaviest set of jobs no two of which fit side by side, by enumeration."""
    best = 0.0
    for size in range(1, len(slots) + 1):
        for subset in itertools.combinations(range(len(slots)), size):
            if all(slots[a] + slots[b] > capacity for a, b in itertools.combinations(subset, 2)):
                best = max(best, sum(hours[i] for i in subset))
    return best


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", range(60))
def test_every_cell_runs_once_within_the_cluster_and_no_sooner_than_the_bounds(policy: Policy, seed: int) -> None:
    slots, estimates, actual, capacity = random_instance(seed)
    starts = drive(Packer(gpus(*slots), estimates, {"GPU": capacity}, policy), actual)
    assert min(starts) == 0.0
    assert peak_use(slots, starts, actual) <= capacity
    span = makespan_of(starts, actual)
    area = sum(s * h for s, h in zip(slots, actual, strict=True)) / capacity
    assert span >= max(area, max(actual)) * (1 - 1e-9)
    exclusive = brute_force_exclusion(slots, actual, capacity)
    assert exclusion_bound(slots, actual, capacity) == pytest.approx(exclusive)
    assert span >= exclusive * (1 - 1e-9)
    # `simulate` is the same loop: the plan and this test see the same schedule.
    assert simulate(gpus(*slots), estimates, {"GPU": capacity}, policy, actual) == pytest.approx(starts)


@pytest.mark.parametrize("seed", range(20))
def test_a_cost_model_off_by_a_constant_factor_only_stretches_the_schedule(seed: int) -> None:
    # Cells take exactly 3x their estimates. Decisions are made at completions, and by the first one the policy
    # has rescaled its estimates, so every cell starts at 3x the time it would with exact estimates.
    rng = random.Random(seed)
    slots = [rng.choice([1, 2, 4, 8, 16, 32]) for _ in range(30)]
    hours = [rng.uniform(1.0, 100.0) for _ in slots]
    exact = simulate(gpus(*slots), hours, {"GPU": 64})
    slow = simulate(gpus(*slots), hours, {"GPU": 64}, actual_hours=[3 * h for h in hours])
    assert slow == pytest.approx([3 * s for s in exact])


def test_calibration_is_the_ratio_of_summed_durations_and_skips_failures() -> None:
    packer = Packer(gpus(1, 1, 1, 1), [1.0, 3.0, 2.0, 2.0], {"GPU": 4})
    for job in range(4):
        packer.start(job, 0.0)
    packer.finish(0, 0.01, calibrate=False)  # failed at once: says nothing about the cost model
    assert packer.scale == 1.0
    packer.finish(1, 6.0)
    assert packer.scale == pytest.approx(2.0)
    packer.finish(2, 1.0)  # (6 + 1) / (3 + 2)
    assert packer.scale == pytest.approx(1.4)
    assert packer.remaining_work(1.0) == pytest.approx(0.25 * (2.0 * 1.4 - 1.0))  # job 3, estimated to end at 2.8


def test_the_plan_of_ten_thousand_cells_stays_fast() -> None:
    import time

    rng = random.Random(1)
    slots = [rng.choice([8, 16, 32, 64, 128]) for _ in range(10_000)]
    hours = [rng.uniform(1.0, 100.0) for _ in slots]
    started = time.process_time()
    starts = simulate(gpus(*slots), hours, {"GPU": 128}, WIDEST_THEN_LONGEST)
    assert time.process_time() - started < 5.0  # ~0.3 s here; quadratic work would take minutes
    assert peak_use(slots, starts, hours) <= 128


# --- the Tune searcher makes the same decisions -------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


@pytest.mark.parametrize("seed", range(5))
def test_the_searcher_starts_cells_when_the_simulation_does(seed: int) -> None:
    from ray.tune.search import Searcher

    from orchestrator.scheduler import ResourceBudgetSearcher

    rng = random.Random(seed)
    n = 25
    slots = [rng.choice([1, 2, 4, 8, 16]) for _ in range(n)]
    wall = [rng.uniform(1.0, 50.0) for _ in range(n)]
    actual = [w * rng.uniform(0.7, 1.3) for w in wall]
    cells = [SimpleNamespace(cell_id=f"c{i}", num_workers=s) for i, s in enumerate(slots)]
    demands = [{"CPU": 0.5 * s + 0.01, "GPU": float(s)} for s in slots]
    budget = {"CPU": 64.0, "GPU": 32.0}
    clock = FakeClock()
    # What sweep.py passes: estimated GPU-hours per cell.
    searcher = ResourceBudgetSearcher(
        cells, demands, budget, priority=[w * s for w, s in zip(wall, slots, strict=True)], clock=clock
    )

    starts: dict[int, float] = {}
    intervals: list[tuple[int, float, float]] = []  # GPUs, start and end in the clock's seconds
    running: list[tuple[float, str]] = []
    trial = itertools.count()
    finished = False
    while not finished or running:
        while not finished:
            trial_id = f"t{next(trial)}"
            suggestion = searcher.suggest(trial_id)
            if suggestion is None:
                break
            if suggestion is Searcher.FINISHED:
                finished = True
                break
            index = int(suggestion["cell"].cell_id[1:])
            starts[index] = clock.seconds / 3600
            end = clock.seconds + actual[index] * 3600
            intervals.append((slots[index], clock.seconds, end))
            heapq.heappush(running, (end, trial_id))
        if running:
            clock.seconds, trial_id = heapq.heappop(running)
            searcher.on_trial_complete(trial_id)
        else:
            assert finished, "the searcher waits although nothing runs"

    assert sorted(starts) == list(range(n))
    assert peak_of(intervals) <= 32
    assert searcher.peak_use["GPU"] <= 32
    expected = simulate(demands, wall, budget, actual_hours=actual)
    assert [starts[i] for i in range(n)] == pytest.approx(expected)
    in_order = [expected[i] for i in searcher.started]
    assert in_order == sorted(in_order)
