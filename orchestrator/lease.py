"""One driver per sweep: a lease object in the sweep's storage, renewed by a heartbeat.

Two drivers on one sweep would run the same cells twice and race on result.json and results.parquet. The driver
writes `<sweep>/driver.lease` ({owner, host, pid, expires_at, ttl_s}) and renews it every `ttl / 3` seconds.
Another driver
- takes the lease at once when it has expired, when its holder ran on this host and that process is gone, or with
  `takeover=True` (the user says the holder is dead);
- otherwise watches it for one renewal interval (and a margin): a holder that renews it is alive, and the new
  driver is refused (LeaseHeldError); a holder that does not is gone (a head restarted by KubeRay, whose
  resubmitted driver runs on a new pod; a container restarted in place with a reused pid), and the new driver
  waits until the lease expires, saying why and for how long, then takes it. A resubmission after a crash thus
  costs at most one TTL, never a failed job.

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
from collections.abc import Callable
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
    poll_s: float = 2.0  # how often a waiting driver reads the lease
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
            "ttl_s": self.ttl_s,
        }

    def current(self) -> dict[str, Any] | None:
        return self.storage.read_json(self.path)

    def acquire(self, takeover: bool = False, log: Callable[[str], None] = print) -> None:
        held = self.current()
        if held and held.get("owner") != self.owner and not takeover and _is_live(held):
            self._wait_for_a_silent_holder(held, log)
        self.storage.write_json(self.path, self._record())
        if (self.current() or {}).get("owner") != self.owner:
            raise LeaseHeldError("another driver took this sweep's lease at the same moment; try again")
        self._thread = threading.Thread(target=self._heartbeat, name="sweep-lease", daemon=True)
        self._thread.start()

    def _wait_for_a_silent_holder(self, held: dict[str, Any], log: Callable[[str], None]) -> None:
        """Return once `held` has expired without a renewal; LeaseHeldError as soon as its holder renews it."""
        who = f"host {held.get('host')}, pid {held.get('pid')}"
        ttl = lease_ttl(held)
        # A live holder renews every ttl/3: watching one interval (and a margin for a slow store) tells.
        watch_until = time.time() + ttl / 3 + max(1.0, ttl / 12)
        said = False
        while True:
            now = time.time()
            expires = float(held.get("expires_at", 0))
            if now >= expires:
                if said:
                    log("lease: the silent driver's lease expired; this driver takes over the sweep")
                return
            if now >= watch_until and not said:
                log(
                    f"lease: the driver holding this sweep ({who}) has not renewed its lease for "
                    f"{now - (expires - ttl):.0f} s: it is gone; waiting {expires - now:.0f} s for the lease to expire"
                )
                said = True
            time.sleep(min(self.poll_s, max(0.05, expires - now)))
            latest = self.current()
            if not latest or latest.get("owner") == self.owner:
                return  # released meanwhile
            if latest.get("owner") != held.get("owner") or float(latest.get("expires_at", 0)) > expires:
                left = max(0.0, float(latest["expires_at"]) - time.time())
                raise LeaseHeldError(
                    f"another driver is running this sweep (host {latest.get('host')}, pid {latest.get('pid')}) "
                    f"and renews its lease (it expires in {left:.0f} s unless renewed again). Wait for it to finish, "
                    "or pass --takeover if you know it is gone."
                )

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


def lease_ttl(record: dict[str, Any]) -> float:
    """How long a lease record lasts after each renewal (records written before `ttl_s` was kept: the default)."""
    return float(record.get("ttl_s") or DEFAULT_TTL_S)


def _is_live(held: dict[str, Any]) -> bool:
    if held.get("expires_at", 0) < time.time():
        return False
    if held.get("host") == socket.gethostname():
        return process_exists(int(held.get("pid", -1)))
    return True
