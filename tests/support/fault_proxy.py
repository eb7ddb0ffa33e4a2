"""A fault-injecting HTTP proxy in front of an S3 endpoint (moto's server on 127.0.0.1): real requests reach the
real server, and chosen ones instead get a 503 or a reset connection, as a throttling or flaky store would do.

Faults, chosen per request by a policy ``(method, path) -> fault or None``:

* ``"unavailable"``: 503 ServiceUnavailable (s3fs does not retry this code itself: only botocore's retries and the
  project's ``with_retries`` can absorb it);
* ``"slowdown"``: 503 SlowDown (s3fs retries this one on its own, up to 5 times);
* ``"reset"``: the connection is reset (TCP RST) before the request reaches the store;
* ``"reset_after"``: the request reaches the store and is carried out, then the connection is reset before the
  answer (a PUT applied whose response was lost).
"""

from __future__ import annotations

import collections
import http.client
import http.server
import random
import socket
import struct
import threading
import time
import urllib.parse
from typing import Callable

Policy = Callable[[str, str], "str | None"]

_ERRORS = {
    "unavailable": (b"<Error><Code>ServiceUnavailable</Code><Message>Service is unable to handle the request; try "
                    b"again.</Message></Error>"),
    "slowdown": b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
}
FAULTS = (*_ERRORS, "reset", "reset_after")


def is_object_request(path: str) -> bool:
    """A request for one object (``/bucket/key``), not a bucket-level listing."""
    return "/" in urllib.parse.urlsplit(path).path.strip("/")


def first_attempts(count: int, fault: str = "unavailable", methods=("GET", "PUT", "HEAD")) -> Policy:
    """Fault the first ``count`` attempts of every distinct object request (method + path + query)."""
    seen: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def policy(method: str, path: str) -> str | None:
        if method not in methods or not is_object_request(path):
            return None
        with lock:
            seen[method, path] += 1
            return fault if seen[method, path] <= count else None

    return policy


def random_faults(rates: dict[str, float], seed: int) -> Policy:
    """Fault any request at random: ``rates`` maps each fault to its probability per request."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def policy(method: str, path: str) -> str | None:
        with lock:
            draw = rng.random()
        for fault, rate in rates.items():
            if draw < rate:
                return fault
            draw -= rate
        return None

    return policy


class FaultProxy(http.server.ThreadingHTTPServer):
    """``with FaultProxy(target, policy) as proxy:`` serves on ``proxy.url``; ``injected`` counts faults by kind,
    ``log`` holds (monotonic time, method, path, fault or None) for every request."""

    daemon_threads = True

    def __init__(self, target: str, policy: Policy):
        self.target = urllib.parse.urlsplit(target)
        self.policy = policy
        self.injected: collections.Counter = collections.Counter()
        self.log: list[tuple[float, str, str, str | None]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> "FaultProxy":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()
        self.server_close()

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients that die (killed drivers) are expected
            super().handle_error(request, client_address)

    def choose(self, method: str, path: str) -> str | None:
        fault = self.policy(method, path)
        with self.lock:
            self.log.append((time.monotonic(), method, path, fault))
            if fault:
                self.injected[fault] += 1
        return fault


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultProxy

    def log_message(self, *args) -> None:
        pass

    def _reset(self) -> None:
        # SO_LINGER 0 then close: the kernel answers with RST, the client sees ECONNRESET / a dropped connection.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fault = self.server.choose(self.command, self.path)
        if fault == "reset":
            return self._reset()
        if fault in _ERRORS:
            payload = _ERRORS[fault]
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        upstream = http.client.HTTPConnection(self.server.target.hostname, self.server.target.port, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        if fault == "reset_after":
            return self._reset()
        self.send_response(response.status)
        for name, value in response.getheaders():
            # a HEAD's Content-Length is the object's size: passed on as it is
            if name.lower() not in ("transfer-encoding", "connection") and (
                    name.lower() != "content-length" or self.command == "HEAD"):
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward
