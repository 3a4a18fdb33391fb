"""Fault injection for the test suite's fault matrix: a real failure in a real worker, not a mock.

`SWEEP_INJECT_FAULT` holds JSON, one fault or a list: {"seed": S, "epoch": E, "kind": "raise" | "nan" |
"sigkill" | "hold", "rank": R?, "once_file": PATH?}. In cells with seed S, halfway through epoch E (1-based), on
rank R (default: every rank): raise an error, make the loss non-finite from there on, SIGKILL the worker's own
process (what the kernel's OOM killer or a lost node does to it), or hold there until something kills the process
from outside (a test that loses a whole node mid-epoch waits for `once_file` to appear, so the node is lost at a
known point and never after the epoch has ended). With `once_file` the fault fires only if it can create that
file, so a retry can succeed. Unset (every real run), the hook does nothing.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading

FAULT_ENV = "SWEEP_INJECT_FAULT"


def mid_epoch(seed: int, epoch: int, rank: int) -> float:
    """The training loop's one hook, called halfway through each epoch (0-based `epoch`): fires the fault meant
    for this cell, epoch and rank, if any, and returns the factor for the loss from here on (1, or NaN)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return 1.0
    faults = json.loads(spec)
    for fault in faults if isinstance(faults, list) else [faults]:
        if fault.get("seed") != seed or fault.get("epoch", 1) != epoch + 1:
            continue
        if fault.get("rank", rank) != rank:
            continue
        once = fault.get("once_file")
        if once:
            try:  # O_EXCL: of several ranks (or attempts) racing for a one-shot fault, exactly one fires it
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
        kind = str(fault["kind"])
        print(f"fault injection: {kind} at epoch {epoch + 1} on rank {rank}", flush=True)
        if kind == "raise":
            raise RuntimeError(f"injected fault at epoch {epoch + 1}")
        if kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "nan":
            return math.nan
        if kind == "hold":
            threading.Event().wait()  # until the process is killed
    return 1.0
