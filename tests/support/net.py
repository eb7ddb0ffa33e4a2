"""Local ports and servers that take a while to answer."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_url(url: str, process: subprocess.Popen, what: str, timeout: float = 60, interval: float = 0.1) -> None:
    """Poll ``url`` until it answers; fail as soon as ``process`` (the server) exits or after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return
        except OSError:
            assert process.poll() is None, f"{what} exited (code {process.returncode})"
            assert time.monotonic() < deadline, f"{what} did not answer {url} within {timeout} s"
            time.sleep(interval)
