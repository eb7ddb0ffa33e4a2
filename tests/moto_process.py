"""A moto S3 server in a process of its own, for tests that change server-wide state — authentication, request
recording — which the session's in-process ThreadedMotoServer shares with every other test."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def moto_server(**env: str) -> Iterator[str]:
    """Start ``python -m moto.server`` on a free local port with ``env`` added; yields its URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=2).read()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def require_authentication(url: str) -> None:
    """From now on the server checks every request's signature and IAM policies (moto's reset-auth)."""
    request = urllib.request.Request(f"{url}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
    assert json.loads(urllib.request.urlopen(request, timeout=10).read())["status"] == "ok"


def recorded_requests(path: str) -> list[dict]:
    """The requests a server started with MOTO_ENABLE_RECORDING=1 and MOTO_RECORDER_FILEPATH=path received."""
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
