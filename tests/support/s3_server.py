"""A moto S3 server in a process of its own, for tests that change server-wide state — authentication, request
recording — which the session's in-process ThreadedMotoServer shares with every other test."""

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
