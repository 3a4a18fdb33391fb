"""Open any storage URL the project accepts: a local path, ``file://...`` or ``s3://bucket/prefix``.

S3 endpoint and credentials come from the environment only (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, or whatever else botocore's default credential chain finds,
e.g. IRSA on Kubernetes), never from a spec, so nothing the project writes or logs can hold a secret
(DESIGN.md section 4). This module never logs or returns credentials.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["is_transient", "open_fs", "process_exists", "with_retries", "write_atomic"]


def open_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the root path inside it (no protocol, no trailing slash)."""
    protocol = fsspec.utils.get_protocol(url)
    options: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        client_kwargs: dict[str, str] = {}
        # Not every botocore/aiobotocore release honours AWS_ENDPOINT_URL (pyarrow never does), so a MinIO,
        # Ceph or moto endpoint is passed explicitly; the service-specific variable wins, as in botocore.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            client_kwargs["region_name"] = region
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
RETRY_DEADLINE_S = 120.0


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


def with_retries(operation: Callable[[], T], what: str, deadline_s: float = RETRY_DEADLINE_S) -> T:
    """Run a storage operation, retrying transient failures with exponential backoff and full jitter until
    `deadline_s`; then the last error propagates and the caller fails cleanly. Every retry is said on stdout
    (the job log), so an outage is visible while it lasts."""
    started = time.monotonic()
    delay = 0.5
    while True:
        try:
            return operation()
        except Exception as err:
            if not is_transient(err) or time.monotonic() - started + delay > deadline_s:
                raise
            waited = time.monotonic() - started
            print(
                f"storage: {what} failed ({type(err).__name__}, {waited:.0f} s so far); retry in <= {delay:.1f} s",
                flush=True,
            )
            time.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 8.0)


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
