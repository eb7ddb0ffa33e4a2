"""The run's one progress display: a line every ``run.progress_interval_s`` seconds, counted in inputs (photos,
videos, frame sequences) like the run's summary — done, failed, remaining — plus frames for clips, items and
frames per minute and an ETA; one JSON line per finished unit at debug level; and the job's Ray metrics.

A film's segments can each take minutes, so frames are counted as the upscaling actors finish them (a
``FrameCounter`` actor they report to after every chunk of frames), not only when a segment ends.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import ray

from .metrics import RunMetrics
from .plan import Plan

log = logging.getLogger("pipeline")

CLIP_UNITS = ("video", "sequence")
# Manifest columns in each finished unit's JSON log line (everything but the URIs' common prefixes).
_LOGGED = ("run_id", "source_key", "output_key", "status", "error_type", "error_message", "width", "height",
           "out_width", "out_height", "seconds", "started_at", "finished_at", "worker")


@ray.remote(num_cpus=0)
class FrameCounter:
    """Frames upscaled so far in this run, reported by the upscaling actors after each chunk."""

    def __init__(self) -> None:
        self.frames = 0

    def add(self, frames: int) -> None:
        self.frames += frames

    def count(self) -> int:
        return self.frames


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Counts finished rows (``add``: images, segments and finished clips) and logs ``line()`` from a background
    thread while the run lasts."""

    def __init__(self, plan: Plan, interval: float, metrics: RunMetrics, counter: Any = None):
        self.interval, self.metrics, self.counter = interval, metrics, counter
        self.images = plan.todo_images  # counted by planning: the to-do units stay in the object store
        self.total = self.images + len(plan.clips) + len(plan.rejected)
        self.frames_total = plan.todo_frames
        self.frames = self.frames_of_segments = 0  # the actors' count; the finished segments' (exact, later)
        self.ok, self.failed = 0, len(plan.rejected)
        self.images_done = 0
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def __enter__(self) -> "Progress":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()

    def add(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row["unit"] == "segment":
                tile_steps = self.metrics.record(row)
                self.frames_of_segments += row.get("frames_out") or 0
            else:
                tile_steps = self.metrics.record(row) if row["unit"] not in CLIP_UNITS else 0
                self.ok += row["status"] == "ok"
                self.failed += row["status"] == "failed"
                self.images_done += row["unit"] == "image"
            if log.isEnabledFor(logging.DEBUG):
                log.debug(json.dumps({"event": "input_finished", **{key: row.get(key) for key in _LOGGED},
                                      "tile_steps": tile_steps}, default=str))

    def _frames_done(self) -> int:
        if self.counter is not None:
            try:  # a lost counter leaves the last count shown
                self.frames = ray.get(self.counter.count.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - progress is a display: it never fails the run
                pass
        # Redone batches count twice in the actors' tally; finished segments are the floor.
        self.frames = min(self.frames_total, max(self.frames, self.frames_of_segments))
        return self.frames

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        finished = self.ok + self.failed
        parts = [f"progress: {self.ok} done, {self.failed} failed, {self.total - finished} remaining of "
                 f"{self.total} inputs"]
        rates = f"{finished / elapsed * 60:.1f} items/min"
        if self.frames_total:
            frames = self._frames_done()
            parts.append(f"{frames} of {self.frames_total} frames")
            rates += f", {frames / elapsed * 60:.1f} frames/min"
        parts.append(rates)
        parts.append(f"{self.metrics.rate():.1f} tile-steps/s")
        # ETA from the work done so far: photos and clip frames weigh one frame each
        work_total = self.images + self.frames_total
        work_done = self.images_done + (self.frames if self.frames_total else 0)
        if finished == self.total:
            parts.append("ETA 0 s")
        elif work_done:
            parts.append(f"ETA {_duration((work_total - work_done) * elapsed / work_done)}")
        else:
            parts.append("ETA unknown until the first input finishes")
        return " — ".join(parts)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            log.info(self.line())
