"""Open any storage URL the project accepts: a local path, ``file://...`` or ``s3://bucket/prefix``.

S3 endpoint and credentials come from the environment only (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, or whatever else botocore's default credential chain finds,
e.g. IRSA on Kubernetes), never from a spec, so nothing the project writes or logs can hold a secret
(docs/design.md section 4). This module never logs or returns credentials.
"""

from __future__ import annotations

import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "OUTAGE_TOLERANCE_ENV",
    "S3Settings",
    "is_transient",
    "open_fs",
    "process_exists",
    "retry_deadline",
    "with_retries",
    "write_atomic",
]


@dataclass(frozen=True)
class S3Settings:
    """Where S3 requests go, as botocore reads the environment: the service-specific endpoint variable wins over
    the general one (AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL), AWS_REGION over AWS_DEFAULT_REGION. The one
    source for both clients the project uses (fsspec's s3fs here, pyarrow's S3FileSystem for Ray Train's
    checkpoints in orchestrator.storage), so sweep records and checkpoints can never go to two different stores."""

    endpoint_url: str | None
    region: str | None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> S3Settings:
        env = os.environ if environ is None else environ
        endpoint = (env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or "").strip() or None
        region = (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "").strip() or None
        return cls(endpoint, region)


def open_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the root path inside it (no protocol, no trailing slash)."""
    protocol = fsspec.utils.get_protocol(url)
    options: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        settings = S3Settings.from_environment()
        client_kwargs: dict[str, str] = {}
        # Not every botocore/aiobotocore release honours AWS_ENDPOINT_URL (pyarrow never does), so a MinIO,
        # Ceph or moto endpoint is passed explicitly.
        if settings.endpoint_url:
            client_kwargs["endpoint_url"] = settings.endpoint_url
        if settings.region:
            client_kwargs["region_name"] = settings.region
        options["client_kwargs"] = client_kwargs
        # The driver, trial actors and train workers write the same prefixes from different processes; s3fs
        # answers exists()/ls() from a per-process listings cache, which would hide the other processes'
        # writes.
        options["use_listings_cache"] = False
    elif protocol in ("file", "local"):
        options["auto_mkdir"] = True
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path.rstrip("/") or path


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that a concurrent reader sees either no file or the whole file, never a prefix."""
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)  # a rename within one directory, atomic on POSIX
    else:
        # A single PUT: object stores never expose a partly written object.
        fs.pipe_file(path, data)


T = TypeVar("T")
# How long a storage operation rides out an outage before it fails: the spec's storage_outage_tolerance_s, which
# the sweep's driver hands every process of the sweep through this variable; an hour where it is not set. A
# 10-minute S3 or MinIO outage then pauses training (every save and read waits) instead of failing cells.
OUTAGE_TOLERANCE_ENV = "SWEEP_STORAGE_OUTAGE_TOLERANCE_S"
RETRY_DEADLINE_S = 3600.0
RETRY_LOG_INTERVAL_S = 60.0  # an outage is said at its first failure, then once a minute while it lasts


def retry_deadline() -> float:
    """The outage tolerance of this process: $SWEEP_STORAGE_OUTAGE_TOLERANCE_S, else RETRY_DEADLINE_S."""
    try:
        return float(os.environ[OUTAGE_TOLERANCE_ENV])
    except (KeyError, ValueError):
        return RETRY_DEADLINE_S


def _transient_types() -> tuple[type[BaseException], ...]:
    """Errors that say "the store is unreachable or overloaded right now", as each client library spells it.

    pyarrow's S3 filesystem raises OSError; s3fs lets botocore's connection and HTTP-client errors through
    untranslated (EndpointConnectionError is not an OSError), and aiohttp's when the connection drops mid-body.
    """
    found: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        found += [BotoConnectionError, HTTPClientError]
    except ImportError:  # local storage only: no botocore installed
        pass
    try:
        from aiohttp import ClientError

        found.append(ClientError)
    except ImportError:
        pass
    return tuple(found)


def is_transient(err: BaseException) -> bool:
    """Worth retrying: a connection error, a timeout, throttling or a 5xx. A missing object or a refusal is an
    answer (retrying cannot change it); so is anything that is not an I/O error at all (e.g. a corrupt file)."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    return isinstance(err, _transient_types())


def with_retries(operation: Callable[[], T], what: str, deadline_s: float | None = None) -> T:
    """Run a storage operation, retrying transient failures with capped exponential backoff and full jitter for
    up to `deadline_s` (default: `retry_deadline()`); then the last error propagates and the caller fails cleanly.
    The outage is said on stdout (the job log) at its first failure, then once a minute, and when it ends."""
    deadline_s = retry_deadline() if deadline_s is None else deadline_s
    started = time.monotonic()
    delay = 0.5
    said_at: float | None = None
    while True:
        try:
            result = operation()
        except Exception as err:
            waited = time.monotonic() - started
            if not is_transient(err) or waited + delay > deadline_s:
                raise
            _publish_unreachable(waited)
            if said_at is None or time.monotonic() - said_at >= RETRY_LOG_INTERVAL_S:
                print(
                    f"storage: unreachable for {waited:.0f} s ({what}: {type(err).__name__}); retrying for up to "
                    f"{deadline_s - waited:.0f} s more",
                    flush=True,
                )
                said_at = time.monotonic()
            time.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 8.0)
            continue
        if said_at is not None:
            _publish_unreachable(0.0)
            print(f"storage: reachable again after {time.monotonic() - started:.0f} s ({what})", flush=True)
        return result


_gauge: list[Any] = []  # the process's storage gauge, made at its first outage


def _publish_unreachable(seconds: float) -> None:
    """Set this process's `sweep_storage_unreachable_seconds` gauge (the dashboard's "Storage unreachable" panel):
    how long its current storage operation has been failing, 0 once it succeeds. Only inside a Ray process; a
    metrics failure never gets in the way of the retry."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    try:
        if not _gauge:
            from ray.util.metrics import Gauge

            _gauge.append(
                Gauge(
                    "sweep_storage_unreachable_seconds",
                    "How long a process of the sweep has been unable to reach its storage (0: reachable)",
                )
            )
        _gauge[0].set(seconds)
    except Exception:  # noqa: BLE001 - the gauge is an aid; the outage handling must go on without it
        return


def process_exists(pid: int) -> bool:
    """Whether a process with this id runs on this machine (another user's counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
