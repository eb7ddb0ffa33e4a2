"""Helpers for the operations tests: job subprocesses whose output can be awaited line by line, and the stores
(local folder or moto S3) those jobs read and write."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
import time

import yaml
from catalog_support import REPO

from pipeline.manifest import read_manifests
from pipeline.storage import Location

JOB = REPO / "jobs" / "upscale_catalog.py"


def session_ray_address() -> str:
    """The GCS address of this test session's local Ray, for job subprocesses to join (starting a Ray of
    their own would cost each of them many seconds)."""
    import ray

    return ray.get_runtime_context().gcs_address


class Job:
    """``jobs/upscale_catalog.py`` in a subprocess of its own session, joining the Ray at ``RAY_ADDRESS`` in
    ``env`` (else starting a local one); its output collected line by line. ``kill`` SIGKILLs the driver's
    process group: the driver dies, and with it the job's actors and tasks."""

    def __init__(self, config: dict, path: pathlib.Path, *args: str, env: dict[str, str] | None = None):
        path.write_text(yaml.safe_dump(config))
        environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
        self.process = subprocess.Popen([sys.executable, str(JOB), "--config", str(path), *args], cwd=REPO,
                                        env={**environment, **(env or {})}, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, condition, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"the job ended before {what}:\n{self.log}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.log}"
            time.sleep(0.05)

    def finish(self, timeout: float = 300) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return code

    def kill(self) -> None:
        import signal

        os.killpg(self.process.pid, signal.SIGKILL)
        self.finish()


def manifest_rows(output: Location):
    """Every run's manifest rows under ``output`` (each once), as a pandas frame."""
    return read_manifests(output).to_pandas()


def upload(location: Location, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        location.write_atomic(key, data)
