"""One driver per sweep: a lease object in the sweep's storage, renewed by a heartbeat.

Two drivers on one sweep would run the same cells twice and race on result.json and results.parquet. The driver
writes `<sweep>/driver.lease` ({owner, host, pid, expires_at}) and renews it every `ttl / 3` seconds. Another
driver refuses to start while the lease is live, unless
- the holder ran on this host and its process is gone (a killed driver: take over at once), or
- the lease has expired (the holder stopped renewing: its host died or lost storage), or
- `takeover=True` (the user says the holder is dead, e.g. its node was lost before the lease expired).

Object stores offer no compare-and-swap through fsspec, so acquisition is write-then-read-back: two drivers
starting within the same second could both write; the read-back makes the later writer win and the earlier one
notice at its next heartbeat, where it stops (`lost` is set). That window is accepted; the common case, a second
submission minutes or days later, is refused with a message naming the holder.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from orchestrator.storage import SweepStorage
from workloads.fs import process_exists

LEASE_FILE = "driver.lease"
DEFAULT_TTL_S = 60.0


class LeaseHeldError(Exception):
    pass


@dataclass
class DriverLease:
    storage: SweepStorage
    ttl_s: float = DEFAULT_TTL_S
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return self.storage.path(LEASE_FILE)

    def _record(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "expires_at": time.time() + self.ttl_s,
        }

    def current(self) -> dict[str, Any] | None:
        return self.storage.read_json(self.path)

    def acquire(self, takeover: bool = False) -> None:
        held = self.current()
        if held and held.get("owner") != self.owner and not takeover and _is_live(held):
            left = max(0.0, held["expires_at"] - time.time())
            raise LeaseHeldError(
                f"another driver is running this sweep (host {held.get('host')}, pid {held.get('pid')}); "
                f"its lease expires in {left:.0f} s unless renewed. Wait for it to finish, or pass --takeover "
                "if you know it is gone."
            )
        self.storage.write_json(self.path, self._record())
        if (self.current() or {}).get("owner") != self.owner:
            raise LeaseHeldError("another driver took this sweep's lease at the same moment; try again")
        self._thread = threading.Thread(target=self._heartbeat, name="sweep-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                held = self.current()
                if held and held.get("owner") != self.owner:
                    self.lost.set()
                    return
                self.storage.write_json(self.path, self._record())
            except Exception:  # a storage hiccup: the next beat retries; the lease lasts ttl_s meanwhile
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self.current()
        if held and held.get("owner") == self.owner:
            self.storage.remove(self.path)

    def __enter__(self) -> DriverLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _is_live(held: dict[str, Any]) -> bool:
    if held.get("expires_at", 0) < time.time():
        return False
    if held.get("host") == socket.gethostname():
        return process_exists(int(held.get("pid", -1)))
    return True
