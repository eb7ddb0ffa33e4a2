"""The job's metrics through Ray's metrics API, so a Prometheus scraping the cluster sees them.

Every Ray node's metrics agent serves them on its metrics export port (``ray start --metrics-export-port``;
KubeRay and the cluster launcher wire it to Prometheus), named with Ray's ``ray_`` prefix:

* ``ray_dit4sr_inputs_total{status, error_type}`` — units of work finished (images; video segments, whose
  status is ``staged``) by status, counted by the driver;
* ``ray_dit4sr_input_seconds`` — histogram of seconds per unit, from read to committed (or staged) output;
* ``ray_dit4sr_tile_steps_total`` and ``ray_dit4sr_tile_steps_per_second`` — sampler work done (tiles x frames x
  steps of each finished unit, as the dry run estimates it) and its rate over the run so far;
* ``ray_dit4sr_gpu_memory_peak_bytes`` — per upscaling actor, the peak of CUDA memory allocated (GPU actors only).
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any

from ray.util.metrics import Counter, Gauge, Histogram

from . import engine
from .spec import RunSpec

SECONDS_BOUNDARIES = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]


@functools.cache
def _instruments() -> dict[str, Any]:
    """Created once per process (Ray registers each name once)."""
    return {
        "inputs": Counter("dit4sr_inputs", description="Inputs finished, by status and error type.",
                          tag_keys=("status", "error_type")),
        "seconds": Histogram("dit4sr_input_seconds", description="Seconds per input, from read to committed output.",
                             boundaries=SECONDS_BOUNDARIES),
        "tile_steps": Counter("dit4sr_tile_steps", description="Sampler tile-steps of finished inputs."),
        "tile_steps_per_second": Gauge("dit4sr_tile_steps_per_second",
                                       description="Sampler tile-steps per second over the run so far."),
        "gpu_peak": Gauge("dit4sr_gpu_memory_peak_bytes",
                          description="Peak CUDA memory allocated by an upscaling actor."),
    }


def unit_tile_steps(spec: RunSpec, row: dict[str, Any]) -> int:
    """Sampler work of one finished unit: tiles per frame x frames (a segment's range, else one) x steps; 0 when
    it failed or its size is unknown."""
    if row["status"] not in ("ok", "staged") or not row.get("width") or not row.get("height"):
        return 0
    frames = row["frame_stop"] - row["frame_start"] if row.get("frame_stop") is not None else 1
    return engine.tile_steps(spec, row["width"], row["height"], frames)


class RunMetrics:
    """Driver side: records each finished input and the run's tile-step rate."""

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.started = time.monotonic()
        self.tile_steps = 0
        self._metrics = _instruments()

    def record(self, row: dict[str, Any]) -> int:
        """Count one finished input; returns its tile-steps."""
        self._metrics["inputs"].inc(tags={"status": row["status"], "error_type": row.get("error_type") or ""})
        if row.get("seconds") is not None:
            self._metrics["seconds"].observe(row["seconds"])
        steps = unit_tile_steps(self.spec, row)
        if steps:
            self.tile_steps += steps
            self._metrics["tile_steps"].inc(steps)
        return steps

    def rate(self) -> float:
        """Tile-steps per second so far (also published as a gauge)."""
        elapsed = time.monotonic() - self.started
        value = self.tile_steps / elapsed if elapsed > 0 else 0.0
        self._metrics["tile_steps_per_second"].set(value)
        return value


def gpu_memory_peak() -> int | None:
    """Peak CUDA memory allocated by this process, or None where it never used CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return max(torch.cuda.max_memory_allocated(device) for device in range(torch.cuda.device_count()))


def publish_gpu_memory_peak() -> None:
    """Called by the upscaling actor after each batch; nothing is published where CUDA was never used."""
    peak = gpu_memory_peak()
    if peak is not None:
        _instruments()["gpu_peak"].set(peak)
