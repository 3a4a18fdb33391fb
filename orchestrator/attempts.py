"""Each cell's attempts, kept in its storage folder (`cells/<cell_id>/attempts.json`) so they outlive drivers.

Tune counts a trial's retries only within one driver, and a study of months sees many drivers (every head restart
resubmits one). The cell's own record counts across all of them: each attempt is written when it begins and
closed with its outcome:
- `finished` or `failed` (the cell's own failure: a diverged loss, a bad config; never retried);
- `lost` (the infrastructure failed under it: a node or process died, storage unreachable past the outage
  tolerance; `orchestrator.runner.lost_to_the_cluster`); the cell is queued again at once, after a backoff;
- `interrupted` (the attempt ended with no word: its driver or trial died with it; found by the next attempt).

A cell lost more than `max_failures` times in all fails for good, so a cell that kills whatever node it lands on
cannot cycle forever; the backoff (BACKOFF_BASE_S doubling per consecutive loss, at most BACKOFF_CAP_S) gives a
flapping node pool or store time to settle. Interruptions count towards neither: a driver resubmitted after a head
restart resumes its cells at once.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

from orchestrator.storage import SweepStorage

ATTEMPTS_FILE = "attempts.json"
BACKOFF_BASE_S = 15.0
BACKOFF_CAP_S = 600.0
OUTCOMES = ("running", "finished", "failed", "lost", "interrupted")


@dataclass
class CellAttempts:
    storage: SweepStorage
    cell_id: str

    @property
    def path(self) -> str:
        return self.storage.cell_path(self.cell_id, ATTEMPTS_FILE)

    def read(self) -> list[dict[str, Any]]:
        return list((self.storage.read_json(self.path) or {}).get("attempts") or [])

    def begin(self) -> list[dict[str, Any]]:
        """Record a new attempt; an earlier one still `running` ended with no word (`interrupted`). Returns the
        attempts before this one."""
        earlier = self.read()
        for attempt in earlier:
            if attempt.get("outcome") == "running":
                attempt["outcome"] = "interrupted"
        mine = {"attempt": len(earlier) + 1, "started_at": time.time(), "host": socket.gethostname()}
        self.storage.write_json(self.path, {"attempts": [*earlier, mine | {"outcome": "running"}]})
        return earlier

    def end(self, outcome: str, reason: str = "") -> None:
        """Close the latest attempt with `outcome`."""
        assert outcome in OUTCOMES[1:], outcome
        attempts = self.read()
        if not attempts:
            return
        attempts[-1] |= {"outcome": outcome, "ended_at": time.time()} | ({"reason": reason} if reason else {})
        self.storage.write_json(self.path, {"attempts": attempts})


def losses(attempts: list[dict[str, Any]]) -> int:
    return sum(1 for attempt in attempts if attempt.get("outcome") == "lost")


def backoff_s(attempts: list[dict[str, Any]]) -> float:
    """How long a new attempt waits: nothing unless the latest attempts were lost, then BACKOFF_BASE_S doubling
    per consecutive loss (interruptions in between neither count nor break the run), at most BACKOFF_CAP_S."""
    run = 0
    for attempt in reversed(attempts):
        outcome = attempt.get("outcome")
        if outcome == "lost":
            run += 1
        elif outcome != "interrupted":
            break
    return 0.0 if run == 0 else min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (run - 1))
