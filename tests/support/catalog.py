"""Helpers for the catalog tests: tiny image files, catalogs, job configs, reading results back, and job
subprocesses whose output can be awaited line by line."""

from __future__ import annotations

import io
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import yaml
from PIL import Image

from support import REPO

JOB = REPO / "jobs" / "upscale_catalog.py"


def image_bytes(width: int, height: int, fmt: str = "PNG", mode: str = "RGB", seed: int = 0, **options) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def write_catalog(root: pathlib.Path, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def manifests(output: pathlib.Path):
    """Every committed manifest row under a local output folder, as a pandas frame."""
    import pyarrow.parquet as pq

    from pipeline.manifest import SCHEMA

    parts = sorted(output.glob("_manifests/run=*/part-*.parquet"))
    return (pq.read_table(parts) if parts else SCHEMA.empty_table()).to_pandas()


def run_index(output: pathlib.Path):
    """The runs index (one row per run: outcome, exit code, counts incl. skipped inputs), oldest first."""
    import pyarrow.parquet as pq

    from pipeline.state import RUNS_DIR, RUNS_SCHEMA

    files = sorted(output.glob(f"{RUNS_DIR}/*.parquet"))
    table = pq.read_table(files) if files else RUNS_SCHEMA.empty_table()
    return table.to_pandas().sort_values(["started_at", "run_id"])


def outputs(root: pathlib.Path) -> dict[str, bytes]:
    """Every output object (not manifests, not hidden temp files) under a local output folder."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "_manifests" not in p.parts and not p.name.startswith(".")}


def small_catalog(count: int = 6) -> dict[str, bytes]:
    """Tiny, varied, valid inputs: a few folders, PNG and JPEG, odd sizes."""
    files = {}
    for i in range(count):
        fmt, ext = ("PNG", "png") if i % 2 == 0 else ("JPEG", "jpg")
        files[f"album{i % 3}/photo {i}.{ext}"] = image_bytes(5 + i, 4 + (i % 3), fmt, seed=i)
    return files


def job_config(input_uri: str, output_uri: str, **sections) -> dict:
    """A bicubic-engine job config as a dict; ``sections`` override whole keys per section."""
    config = {
        "input": {"uri": input_uri},
        "output": {"uri": output_uri, "format": "png"},
        "model": {"path": "bicubic"},
        "upscale": {"scale": 2},
        "compute": {"actors": {"min": 1, "max": 2}, "batch_size": 2, "cpus_per_actor": 1},
        "run": {"progress_interval_s": 1},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def session_ray_address() -> str:
    """The GCS address of this test session's local Ray, for job subprocesses to join (starting a Ray of
    their own would cost each of them many seconds)."""
    import ray

    return ray.get_runtime_context().gcs_address


class Job:
    """``jobs/upscale_catalog.py --config <path>`` (``config`` written there) in a subprocess of its own session,
    its output collected line by line. It joins the Ray at ``RAY_ADDRESS`` in ``env`` (``session_ray_address()``:
    a Ray of its own costs many seconds) or, without it, starts a local Ray of its own. ``kill_at``, a
    ``pipeline.manifest.kill_point`` name, SIGKILLs the job's process group (the driver, and a local Ray of its
    own with it) and the worker at that point; ``killed_at`` says which point fired. ``kill`` SIGKILLs the
    driver's process group. Ray ends a dead driver's actors and tasks."""

    def __init__(self, config: dict, path: pathlib.Path, *args: str, env: dict[str, str] | None = None,
                 kill_at: str | None = None):
        path.write_text(yaml.safe_dump(config))
        self.marker = path.with_suffix(".killed")
        environment = {key: value for key, value in os.environ.items()
                       if key != "RAY_ADDRESS" and not key.startswith("DIT4SR_TEST_KILL")}
        if kill_at:
            environment.update(DIT4SR_TEST_KILL_AT=kill_at, DIT4SR_TEST_KILL_MARKER=str(self.marker))
        command = [sys.executable, str(JOB), "--config", str(path), *args]
        if kill_at:  # the job's process group (its session's, started here) is the shell's pid, kept by exec
            command = ["sh", "-c", 'DIT4SR_TEST_KILL_PGID=$$ exec "$0" "$@"', *command]
        self.process = subprocess.Popen(command, cwd=REPO,
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

    @property
    def killed_at(self) -> str | None:
        return self.marker.read_text() if self.marker.exists() else None

    def wait_for(self, condition, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"the job ended before {what}:\n{self.log}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.log}"
            time.sleep(0.05)

    def finish(self, timeout: float = 600) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=30)
        try:  # whatever a killed job's group left behind (its own Ray's processes): the group is the job's alone
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return code

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.finish()


def manifest_rows(output):
    """Every run's manifest rows under ``output`` (a ``Location``, each row once), as a pandas frame."""
    from pipeline.manifest import read_manifests

    return read_manifests(output).to_pandas()


def upload(location, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        location.write_atomic(key, data)


def read_runs(output):
    """The runs index (``pipeline.state``'s ``_index/runs/``), oldest run first, as a pyarrow table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.state import RUNS_DIR, RUNS_SCHEMA
    from pipeline.storage import Location

    entries = Location(output.url(RUNS_DIR), output.storage_options).list(include=["*.parquet"])
    tables = [pq.read_table(output.fs.open(output.path(f"{RUNS_DIR}/{entry.relative}"), "rb")) for entry in entries]
    table = pa.concat_tables(tables) if tables else RUNS_SCHEMA.empty_table()
    return table.sort_by([("started_at", "ascending"), ("run_id", "ascending")])
