"""The placement policy: which pending cell starts now, given what is free and what is running (docs/design.md s. 6).

One implementation serves both the real run and the plan: `orchestrator.scheduler.ResourceBudgetSearcher` asks a
`Packer` each time Tune wants a trial, with the wall clock; `orchestrator.plan` replays the same `Packer` on a
simulated clock (`simulate`) to get the makespan it prints. Pure Python: no ray, no torch.

Policy: widest first, longest first near the end (`WIDEST_THEN_LONGEST`, the default)
-------------------------------------------------------------------------------------
A schedule loses time in two ways: GPUs left idle while cells wait (packing), and a long cell that starts late
and runs alone at the end (the tail). Which one matters depends on how much work is left. At each decision:

    W = estimated work still to do (pending cells, and what is left of the running ones) / cluster size,

the time the cluster needs at least, from now on.

1. While every pending cell is short next to W (the longest estimated wall time < W / 2), a late start costs
   nothing yet: pack densely. The widest pending cell that fits starts (then the longest of that width), so
   narrow cells fill what wide ones leave (first fit, largest first; the previous policy).
2. Once the longest pending cell takes W / 2 or more, it decides the makespan if it starts late: cells go
   longest first (Graham's LPT rule), whatever their width; a 16-GPU cell of 400 hours goes before a 128-GPU
   cell of 50, or it runs alone at the end. The longest cell starts as soon as it fits; if it does not fit, it
   gets a reservation, the earliest time enough resources free up by the running cells' estimated ends (an
   overdue cell counts as ending now), and another cell starts now only if it fits now and is estimated to end
   by then or fits in what the reserved cell leaves free: small cells fill holes but never push the long one
   back (EASY backfilling, Lifka 1995), which plain first fit does, and without bound.
3. Estimates are calibrated online: they are scaled by (sum of actual durations) / (sum of estimates) of the
   cells finished so far, so a cost model off by a constant factor (a guessed `planning.relative_speed`, GPUs
   slower than the paper's) only misleads the reservations until the first cells finish.

The threshold W / 2: a cell of at least half the remaining time has no more slack than its own length. It was
chosen on the instances of `benchmarks/scheduler_sim.py`: 1/4 to 1/2 perform alike, 1 is clearly worse, and 0
(step 2 throughout, `LPT_EASY`, shown there) packs worse while many narrow cells remain (200 cells of 1-32 GPUs
on 64: 1.05 x the lower bound, against 1.02). Estimates only steer the choice: resources are counted exactly, so a
cell that overruns its estimate delays others but never oversubscribes the cluster, and every decision is made
afresh from the current clock. `LARGEST_FIRST` (step 1 alone, throughout) is the previous policy, kept with
`LPT_EASY` for comparison in the benchmark.

Every ranking orders cells of equal demand by decreasing wall time, so pending cells are kept in one queue per
distinct demand: a decision costs O(distinct demands x log cells) plus a pass over the running cells, which
keeps the plan of a 10,000-cell spec well under a second.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Policy = Literal["widest-then-longest", "lpt-easy", "largest-first"]
WIDEST_THEN_LONGEST: Policy = "widest-then-longest"
LPT_EASY: Policy = "lpt-easy"
LARGEST_FIRST: Policy = "largest-first"
POLICIES: tuple[Policy, ...] = (WIDEST_THEN_LONGEST, LPT_EASY, LARGEST_FIRST)
DEFAULT_POLICY: Policy = WIDEST_THEN_LONGEST
# Step 2 starts when the longest pending cell takes this fraction of the remaining work / cluster size.
URGENT_FRACTION = 0.5

EPS = 1e-9  # resource amounts are floats (fractional CPUs): compare with a tolerance


def fits(demand: Mapping[str, float], free: Mapping[str, float]) -> bool:
    return all(free.get(resource, 0.0) + EPS >= amount for resource, amount in demand.items())


def share(demand: Mapping[str, float], capacity: Mapping[str, float]) -> float:
    """The fraction of the cluster a demand takes: its largest fraction of any one resource (dominant share)."""
    return max((amount / capacity[r] for r, amount in demand.items() if capacity.get(r, 0.0) > 0), default=0.0)


def priority_order(
    demands: Sequence[Mapping[str, float]],
    wall_hours: Sequence[float],
    capacity: Mapping[str, float],
    policy: Policy = DEFAULT_POLICY,
) -> list[int]:
    """Job indices, best first: longest first (ties: widest), or widest first for `LARGEST_FIRST` (ties:
    longest). Remaining ties keep the given order, so the result is deterministic."""
    shares = [share(d, capacity) for d in demands]
    if policy in (WIDEST_THEN_LONGEST, LPT_EASY):
        return sorted(range(len(demands)), key=lambda i: (-wall_hours[i], -shares[i], i))
    if policy == LARGEST_FIRST:
        return sorted(range(len(demands)), key=lambda i: (-shares[i], -wall_hours[i], i))
    raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")


@dataclass
class _Queue:
    """Pending jobs of one demand, best rank first; their wall times are then non-increasing."""

    demand: dict[str, float]
    share: float
    ranks: list[int]
    neg_walls: list[float]  # -wall per entry: non-decreasing, for bisect


class Packer:
    """Online state of the policy: pending jobs, running jobs with their estimated ends, free resources.

    `select(now)` names the job to start now (or None: wait for a completion); the caller then calls
    `start(job, now)`, and `finish(job, now)` when it completes. Times are in hours on any clock (the
    simulation's, or the wall clock's): only differences matter. `scale` is the calibration of step 3.
    """

    def __init__(
        self,
        demands: Sequence[Mapping[str, float]],
        wall_hours: Sequence[float],
        capacity: Mapping[str, float],
        policy: Policy = DEFAULT_POLICY,
    ) -> None:
        if len(demands) != len(wall_hours):
            raise ValueError("one wall time per demand")
        self.policy = policy
        self.demands = [dict(d) for d in demands]
        self.wall_hours = [max(0.0, float(w)) for w in wall_hours]
        self.capacity = dict(capacity)
        self.free = dict(capacity)
        self.order = priority_order(self.demands, self.wall_hours, self.capacity, policy)
        self._shares = [share(d, self.capacity) for d in self.demands]
        self._rank = [0] * len(self.order)
        queues: dict[tuple[tuple[str, float], ...], _Queue] = {}
        self._queue_of: dict[int, _Queue] = {}
        for rank, job in enumerate(self.order):
            self._rank[job] = rank
            key = tuple(sorted(self.demands[job].items()))
            queue = queues.setdefault(key, _Queue(self.demands[job], self._shares[job], [], []))
            queue.ranks.append(rank)
            queue.neg_walls.append(-self.wall_hours[job])
            self._queue_of[job] = queue
        self._queues = list(queues.values())
        self._pending = len(self.order)
        self._pending_work = sum(s * w for s, w in zip(self._shares, self.wall_hours, strict=True))
        self._started: dict[int, float] = {}
        self._running: list[tuple[float, int]] = []  # (estimated end, job), sorted
        self._actual = 0.0  # summed durations of finished jobs
        self._estimated = 0.0  # and their summed estimates
        self.scale = 1.0

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def running(self) -> list[int]:
        return [job for _, job in self._running]

    def remaining_work(self, now: float) -> float:
        """W: estimated hours the whole cluster needs for what is pending and what is left of what runs."""
        running = sum(self._shares[job] * max(0.0, end - now) for end, job in self._running)
        return max(0.0, self._pending_work) * self.scale + running

    def select(self, now: float) -> int | None:
        """The job the policy starts at time `now`, or None if it waits for a completion."""
        heads = [q.ranks[0] for q in self._queues if q.ranks]
        if not heads:
            return None
        head = self.order[min(heads)]
        if self.policy == LARGEST_FIRST:  # first fit in rank order
            ranks = [q.ranks[0] for q in self._queues if q.ranks and fits(q.demand, self.free)]
            return self.order[min(ranks)] if ranks else None
        urgent = self.policy == LPT_EASY or (
            self.wall_hours[head] * self.scale >= URGENT_FRACTION * self.remaining_work(now)
        )
        if urgent and fits(self.demands[head], self.free):
            return head  # step 2: the longest first
        fitting = [q for q in self._queues if q.ranks and fits(q.demand, self.free)]
        if not fitting:
            return None
        if not urgent:  # step 1: the widest that fits, then the longest of that width
            widest = max(fitting, key=lambda q: (q.share, -q.ranks[0]))
            return self.order[widest.ranks[0]]
        # Step 2, the longest does not fit: a backfill that does not delay its reserved start.
        shadow, extra = self._reservation(self.demands[head], now)
        limit = (shadow - now) / self.scale  # in estimated hours
        best: int | None = None
        for queue in fitting:
            if fits(queue.demand, extra):
                index = 0  # leaves the head what it needs at its reserved start, however long it runs
            else:
                # The best-ranked job of this demand estimated to end by the head's reserved start.
                index = bisect.bisect_left(queue.neg_walls, -limit - EPS)
                if index == len(queue.ranks):
                    continue
            rank = queue.ranks[index]
            if best is None or rank < best:
                best = rank
        return None if best is None else self.order[best]

    def _reservation(self, head: Mapping[str, float], now: float) -> tuple[float, dict[str, float]]:
        """When `head` can start if running jobs end as estimated, and what it leaves free then."""
        available = dict(self.free)
        shadow = now
        index = 0
        while not fits(head, available) and index < len(self._running):
            shadow = max(shadow, self._running[index][0])  # an overdue job counts as ending now
            # Everything estimated to end by then is free then.
            while index < len(self._running) and self._running[index][0] <= shadow:
                for resource, amount in self.demands[self._running[index][1]].items():
                    available[resource] = available.get(resource, 0.0) + amount
                index += 1
        extra = {r: available.get(r, 0.0) - head.get(r, 0.0) for r in set(available) | set(head)}
        return shadow, extra

    def start(self, job: int, now: float) -> None:
        queue = self._queue_of[job]
        position = bisect.bisect_left(queue.ranks, self._rank[job])
        if position == len(queue.ranks) or queue.ranks[position] != self._rank[job]:
            raise ValueError(f"job {job} is not pending")
        del queue.ranks[position]
        del queue.neg_walls[position]
        self._pending -= 1
        self._pending_work -= self._shares[job] * self.wall_hours[job]
        for resource, amount in self.demands[job].items():
            self.free[resource] = self.free.get(resource, 0.0) - amount
        self._started[job] = now
        bisect.insort(self._running, (now + self.wall_hours[job] * self.scale, job))

    def finish(self, job: int, now: float, calibrate: bool = True) -> None:
        """`job` ended at `now`; `calibrate=False` keeps its duration out of `scale` (e.g. it failed early)."""
        started = self._started.pop(job, None)
        if started is None:
            raise ValueError(f"job {job} is not running")
        self._running = [(end, other) for end, other in self._running if other != job]
        for resource, amount in self.demands[job].items():
            self.free[resource] = self.free.get(resource, 0.0) + amount
        if not calibrate:
            return
        self._actual += max(0.0, now - started)
        self._estimated += self.wall_hours[job]
        if self._estimated > 0 and self._actual > 0:
            scale = self._actual / self._estimated
            if abs(scale - self.scale) > 1e-9 * self.scale:
                self.scale = scale
                self._running = sorted((self._started[j] + self.wall_hours[j] * scale, j) for _, j in self._running)


def simulate(
    demands: Sequence[Mapping[str, float]],
    wall_hours: Sequence[float],
    capacity: Mapping[str, float],
    policy: Policy = DEFAULT_POLICY,
    actual_hours: Sequence[float] | None = None,
) -> list[float]:
    """Start time of each job when `policy` admits them on `capacity`, all pending at time 0.

    The policy sees `wall_hours` (the estimates); jobs run for `actual_hours` (default: the estimates). Raises
    ValueError if a job can never start (it needs more than the capacity).
    """
    actual = list(actual_hours) if actual_hours is not None else list(wall_hours)
    if len(actual) != len(demands):
        raise ValueError("one actual duration per demand")
    for index, demand in enumerate(demands):
        if not fits(demand, capacity):
            raise ValueError(f"job {index} needs {dict(demand)} but the capacity is {dict(capacity)}")
    packer = Packer(demands, wall_hours, capacity, policy)
    starts = [0.0] * len(demands)
    ends: list[tuple[float, int]] = []  # heap of (actual end, job)
    now = 0.0
    while packer.pending:
        while (job := packer.select(now)) is not None:
            packer.start(job, now)
            starts[job] = now
            heapq.heappush(ends, (now + actual[job], job))
        if packer.pending:
            # Nothing else starts now: advance to the next completion (feasibility guarantees there is one).
            now, done = heapq.heappop(ends)
            packer.finish(done, now)
            while ends and ends[0][0] <= now:
                end, done = heapq.heappop(ends)
                packer.finish(done, end)
    return starts


def makespan(starts: Sequence[float], hours: Sequence[float]) -> float:
    return max((s + h for s, h in zip(starts, hours, strict=True)), default=0.0)


def lower_bound(slots: Sequence[float], hours: Sequence[float], capacity: float) -> float:
    """No schedule finishes before max(total slot-hours / capacity, longest job)."""
    area = sum(s * h for s, h in zip(slots, hours, strict=True))
    return max(area / capacity if capacity else 0.0, max(hours, default=0.0))


def exclusion_bound(slots: Sequence[float], hours: Sequence[float], capacity: float) -> float:
    """A second bound: jobs that pairwise do not fit side by side (a + b > capacity) run one after another.

    A set is pairwise exclusive iff its two narrowest jobs do not fit together, so for each job m taken as the
    narrowest, the heaviest such set is m plus every job at least as wide as m and wider than capacity - m.
    Catches what the area bound misses, e.g. a spec whose cells mostly take the whole cluster.
    """
    jobs = sorted(zip(slots, hours, strict=True))
    widths = [s for s, _ in jobs]
    suffix = [0.0] * (len(jobs) + 1)  # suffix[i] = sum of hours of jobs[i:]
    for i in range(len(jobs) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + jobs[i][1]
    best = 0.0
    for i, (width, hours_i) in enumerate(jobs):
        # Others: index > i (as wide or wider), width > capacity - width.
        first = max(i + 1, bisect.bisect_right(widths, capacity - width + EPS))
        best = max(best, hours_i + suffix[first])
    return best
