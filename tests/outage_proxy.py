"""A TCP relay in front of the moto S3 server that can take the "server" down, for the S3-outage fault test.

Clients talk to 127.0.0.1:<proxy port>; every connection is relayed to the real server. `arm(pattern, nth)` makes
the proxy watch the request lines going through: when the `nth` distinct object key matching `pattern` is first
requested, that request is cut off mid-flight (its connection closed before the server sees it), every open
connection is dropped and the listening socket is closed, so for `outage_s` seconds the port refuses connections
exactly as a stopped server's does. Then it listens again on the same port. `cut(seconds)` starts such an outage
at once (the chaos soak's storage incident). Request lines are recorded with their times so a test can see what
was retried after the outage.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from dataclasses import dataclass, field

REQUEST_LINE = re.compile(rb"(GET|PUT|POST|HEAD|DELETE) (/[^ ?]*)(\?[^ ]*)? HTTP/1\.[01]\r\n")


@dataclass
class Outage:
    key: str  # the object key whose request was cut off
    started: float  # time.monotonic()
    ended: float | None = None


@dataclass
class OutageProxy:
    upstream: tuple[str, int]
    outage_s: float = 20.0
    requests: list[tuple[float, str, str]] = field(default_factory=list)  # (monotonic time, method, path)
    outages: list[Outage] = field(default_factory=list)
    port: int = 0
    _pattern: re.Pattern[bytes] | None = None
    _nth: int = 0
    _seen_keys: list[str] = field(default_factory=list)
    _listener: socket.socket | None = None
    _sockets: set[socket.socket] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: threading.Event = field(default_factory=threading.Event)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OutageProxy:
        self._listen()
        return self

    def arm(self, pattern: bytes, nth: int) -> None:
        """Go down when the `nth` distinct path matching `pattern` is requested for the first time."""
        with self._lock:
            self._pattern, self._nth, self._seen_keys = re.compile(pattern), nth, []

    def cut(self, outage_s: float) -> Outage:
        """Take the server down now for `outage_s` seconds (open connections dropped, the port refusing)."""
        return self._go_down("(cut)", outage_s)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._listener is not None:
                self._listener.close()
            for sock in list(self._sockets):
                _close(sock)

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="outage-proxy-accept", daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed: an outage began, or the proxy shut down
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._sockets |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_client: bool) -> None:
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    break
                if from_client and self._inspect(chunk):
                    return  # the outage began with this request: it never reaches the server
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                _close(sock)
                with self._lock:
                    self._sockets.discard(sock)

    def _inspect(self, chunk: bytes) -> bool:
        """Record the request lines in `chunk`; start the outage (and return True) when the armed one comes."""
        now = time.monotonic()
        trigger = None
        with self._lock:
            for match in REQUEST_LINE.finditer(chunk):
                method, path = match[1].decode(), match[2].decode()
                self.requests.append((now, method, path))
                if self._pattern is None or not self._pattern.search(match[2]):
                    continue
                if path not in self._seen_keys:
                    self._seen_keys.append(path)
                    if len(self._seen_keys) == self._nth:
                        trigger = path
                        self._pattern = None  # one outage per arming
        if trigger is None:
            return False
        self._go_down(trigger)
        return True

    def _go_down(self, key: str, outage_s: float | None = None) -> Outage:
        outage = Outage(key, time.monotonic())
        down_for = self.outage_s if outage_s is None else outage_s
        with self._lock:
            self.outages.append(outage)
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            for sock in list(self._sockets):
                _close(sock)
            self._sockets.clear()

        def come_back() -> None:
            if self._closed.wait(down_for):
                return
            self._listen()
            outage.ended = time.monotonic()

        threading.Thread(target=come_back, name="outage-proxy-restore", daemon=True).start()
        return outage

    def requests_after(self, moment: float, path: str) -> list[str]:
        with self._lock:
            return [method for at, method, p in self.requests if at > moment and p == path]


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
