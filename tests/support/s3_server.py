"""A moto S3 server in a process of its own (the session's, see conftest.py: one for all tests, its load off the
test process), and its server-wide switches: authentication and the request recorder."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.request
from typing import Iterator

from support.net import free_port, wait_for_url


@contextlib.contextmanager
def moto_server(**env: str) -> Iterator[str]:
    """Start ``python -m moto.server`` on a free local port with ``env`` added; yields its URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_url(f"{url}/moto-api/data.json", process, "the moto server")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _post(url: str, data: bytes = b"") -> bytes:
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def set_authentication(url: str, on: bool) -> None:
    """From now on the server checks every request's signature and IAM policies (``on``), or none (moto's
    reset-auth: the number of requests left unchecked)."""
    assert json.loads(_post(f"{url}/moto-api/reset-auth", b"0" if on else b"inf"))["status"] == "ok"


def recorder(url: str, action: str) -> None:
    """moto's request recorder: ``reset-recording``, ``start-recording`` or ``stop-recording``."""
    _post(f"{url}/moto-api/recorder/{action}")


def recorded_requests(path: str) -> list[dict]:
    """The requests recorded in ``path`` (the server's MOTO_RECORDER_FILEPATH) while its recorder was on."""
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
